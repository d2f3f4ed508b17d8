//! Bus latency against a running bangerd, from one in-process client (no
//! process start in the figures): `Properties.Get` of a VM's `State`,
//! the bus daemon's own `GetId` for comparison, `Peer.Ping` of bangerd
//! (the floor of any call to it: the same hops, no work) and of polkitd
//! (another service on the bus), and `GetManagedObjects`.
//! Prints one line per call: `NAME n p50_ms p99_ms`. Run by
//! `scripts/bench-scale` with `DBUS_SYSTEM_BUS_ADDRESS` set.
//!
//!     bench_bus VM_OBJECT_PATH [ROUNDS]

use std::future::Future;
use std::time::{Duration, Instant};

use zbus::Connection;
use zbus::fdo::{DBusProxy, ObjectManagerProxy, PeerProxy, PropertiesProxy};
use zbus::names::InterfaceName;

async fn sample<F, Fut>(rounds: usize, mut call: F) -> zbus::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = zbus::Result<()>>,
{
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        call().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name} {} {:.3} {:.3}",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let vm = args
        .next()
        .ok_or("usage: bench_bus VM_OBJECT_PATH [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let conn = Connection::system().await?;
        let props = PropertiesProxy::builder(&conn)
            .destination("org.banger.Manager")
            .path(vm.as_str())
            .build()
            .await?;
        let bus = DBusProxy::new(&conn).await?;
        let peer = PeerProxy::builder(&conn)
            .destination("org.banger.Manager")
            .path("/org/banger/Manager")
            .build()
            .await?;
        // Another service on the same bus (GDBus in C), for scale.
        let polkit = PeerProxy::builder(&conn)
            .destination("org.freedesktop.PolicyKit1")
            .path("/org/freedesktop/PolicyKit1/Authority")
            .build()
            .await?;
        polkit.ping().await?;
        let objects = ObjectManagerProxy::builder(&conn)
            .destination("org.banger.Manager")
            .path("/org/banger/Manager")
            .build()
            .await?;
        let iface = InterfaceName::try_from("org.banger.VM")?;
        // Warm both paths first.
        props.get(iface.clone(), "State").await?;
        bus.get_id().await?;
        // Interleaved, one of each in turn: whatever else the host does
        // during the run (a daemon's timer, the page cache, another
        // process) falls on both alike, so their ratio is the cost of
        // bangerd's own hops rather than of when each block ran.
        let (mut get, mut id, mut ping, mut polkit_ping) = (
            Vec::with_capacity(rounds),
            Vec::with_capacity(rounds),
            Vec::with_capacity(rounds),
            Vec::with_capacity(rounds),
        );
        for _ in 0..rounds {
            get.extend(
                sample(1, || async {
                    props.get(iface.clone(), "State").await.map(drop)?;
                    Ok(())
                })
                .await?,
            );
            id.extend(
                sample(1, || async {
                    bus.get_id().await.map(drop)?;
                    Ok(())
                })
                .await?,
            );
            ping.extend(
                sample(1, || async {
                    peer.ping().await?;
                    Ok(())
                })
                .await?,
            );
            polkit_ping.extend(
                sample(1, || async {
                    polkit.ping().await?;
                    Ok(())
                })
                .await?,
            );
        }
        let managed = sample(20, || async {
            objects.get_managed_objects().await.map(drop)?;
            Ok(())
        })
        .await?;
        report("get", get);
        report("getid", id);
        report("ping", ping);
        report("polkitping", polkit_ping);
        report("managed", managed);
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
