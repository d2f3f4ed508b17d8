//! The bridge and TAPs for real, each test in a fresh network namespace
//! (the test thread unshares one; netlink sockets and /dev/net/tun bind to
//! it). What the code made is checked with the real `ip` run inside the
//! same namespace. Needs root.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;

use bangerd::error::ErrorKind;
use bangerd::net::leases::Subnet;
use bangerd::net::link::{Links, TAP_PREFIX};

/// Run `f` on a runtime whose threads all live in a new network namespace.
/// The namespace goes away with the thread: nothing leaks into the host.
pub(crate) fn in_netns<F, Fut>(f: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare a network namespace (root)");
        let ns = format!(
            "/proc/{}/task/{}/ns/net",
            std::process::id(),
            nix::unistd::gettid()
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f(ns));
    })
    .join()
    .unwrap();
}

/// `ip ARGS` inside the namespace at `ns`.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter and ip run");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bridge_and_taps_are_made_attached_owned_and_removed() {
    in_netns(|ns| async move {
        let links = Links::connect().unwrap();
        let subnet = Subnet::parse("10.213.42.0/24").unwrap();
        let bridge = links.ensure_bridge("banger0", &subnet).await.unwrap();
        // Idempotent: same index, one address.
        assert_eq!(
            links.ensure_bridge("banger0", &subnet).await.unwrap(),
            bridge
        );
        let shown = ip(&ns, &["-4", "addr", "show", "dev", "banger0"]);
        assert_eq!(shown.matches("inet 10.213.42.1/24").count(), 1, "{shown}");
        assert!(ip(&ns, &["-d", "link", "show", "banger0"]).contains("bridge"));

        let t0 = format!("{TAP_PREFIX}0");
        let t1 = format!("{TAP_PREFIX}1");
        links.create_tap(&t0, 54_321, bridge).await.unwrap();
        links.create_tap(&t1, 54_322, bridge).await.unwrap();
        let details = ip(&ns, &["-d", "link", "show", &t0]);
        assert!(details.contains("master banger0"), "{details}");
        assert!(
            details.contains("tap") && details.contains("persist on"),
            "{details}"
        );
        assert!(details.contains("user 54321"), "{details}");
        assert!(details.contains("vnet_hdr on"), "{details}");
        assert_eq!(
            links.bridge_members(bridge).await.unwrap(),
            vec![t0.clone(), t1.clone()]
        );
        // Re-making an existing TAP hands it to a new owner.
        links.create_tap(&t0, 54_323, bridge).await.unwrap();
        assert!(ip(&ns, &["-d", "link", "show", &t0]).contains("user 54323"));

        for t in [&t0, &t1] {
            links.delete(t).await.unwrap();
        }
        links.delete("does-not-exist").await.unwrap();
        assert!(
            links
                .names_with_prefix(TAP_PREFIX)
                .await
                .unwrap()
                .is_empty()
        );
        links.delete("banger0").await.unwrap();
        assert_eq!(links.index_of("banger0").await.unwrap(), None);
        let left = ip(&ns, &["-o", "link", "show"]);
        assert_eq!(left.lines().count(), 1, "only lo is left: {left}");
    });
}

#[test]
fn a_subnet_that_overlaps_a_host_route_is_refused() {
    in_netns(|ns| async move {
        let links = Links::connect().unwrap();
        // Someone else's network on another interface.
        ip(&ns, &["link", "add", "other0", "type", "bridge"]);
        ip(&ns, &["addr", "add", "10.77.0.5/16", "dev", "other0"]);
        ip(&ns, &["link", "set", "other0", "up"]);
        for clashing in ["10.77.3.0/24", "10.76.0.0/16"] {
            let subnet = Subnet::parse(clashing).unwrap();
            let expect_clash = clashing.starts_with("10.77");
            let result = links.ensure_bridge("banger0", &subnet).await;
            if expect_clash {
                let err = result.unwrap_err();
                assert_eq!(err.kind, ErrorKind::InvalidArgument);
                assert!(
                    err.message.contains("10.77.0.0/16 via other0"),
                    "{}",
                    err.message
                );
                assert!(
                    err.message.contains("pick a free subnet"),
                    "{}",
                    err.message
                );
                assert_eq!(
                    links.index_of("banger0").await.unwrap(),
                    None,
                    "nothing made"
                );
            } else {
                result.unwrap();
            }
        }
    });
}

#[test]
fn the_tap_pool_hands_out_refills_reuses_and_adopts() {
    use bangerd::net::pool::TapPool;
    in_netns(|ns| async move {
        let links = Links::connect().unwrap();
        let subnet = Subnet::parse("10.213.42.0/24").unwrap();
        let bridge = links.ensure_bridge("banger0", &subnet).await.unwrap();
        let pool = TapPool::new(links.clone(), bridge, 2);
        pool.adopt(&[]).await.unwrap();
        let (idle, used) = pool.snapshot().await;
        assert_eq!(idle, ["bgtap0", "bgtap1"]);
        assert!(used.is_empty());

        let a = pool.acquire(54_321).await.unwrap();
        assert!(ip(&ns, &["-d", "link", "show", &a]).contains("user 54321"));
        // The pool refills in the background.
        let mut refilled = false;
        for _ in 0..100 {
            if pool.snapshot().await.0.len() == 2 {
                refilled = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(refilled, "{:?}", pool.snapshot().await);
        let b = pool.acquire(54_322).await.unwrap();
        let c = pool.acquire(54_323).await.unwrap();
        assert_eq!([&a, &b, &c].iter().collect::<BTreeSet<_>>().len(), 3);
        // Let the background refill after b and c finish, so what a
        // release does below does not depend on how fast it runs.
        let mut full = false;
        for _ in 0..100 {
            if pool.snapshot().await.0.len() == 2 {
                full = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(full, "{:?}", pool.snapshot().await);

        // A released TAP goes when the pool is full...
        pool.release(&a).await.unwrap();
        let all = links.names_with_prefix("bgtap").await.unwrap();
        assert!(!all.contains(&a), "{a} kept in a full pool: {all:?}");
        // ... and returns to the pool, its owner reset, when it is short.
        pool.drain().await.unwrap();
        pool.release(&b).await.unwrap();
        let details = ip(&ns, &["-d", "link", "show", &b]);
        assert!(
            details.contains("user root") || details.contains("user 0"),
            "{details}"
        );
        assert_eq!(pool.snapshot().await.0, vec![b.clone()]);
        // A daemon restart: a new pool adopts what exists. c stays in use.
        let restarted = TapPool::new(links.clone(), bridge, 2);
        restarted.adopt(std::slice::from_ref(&c)).await.unwrap();
        let (idle, used) = restarted.snapshot().await;
        assert_eq!(idle.len(), 2);
        assert_eq!(used, vec![c.clone()]);
        let all = links.names_with_prefix("bgtap").await.unwrap();
        assert_eq!(all.len(), 3, "pool of 2 + c; extras deleted: {all:?}");
        restarted.release(&c).await.unwrap();
        restarted.drain().await.unwrap();
        assert!(links.names_with_prefix("bgtap").await.unwrap().is_empty());

        // Acquires racing the background refills never pick the same name
        // (a refill creating bgtapN while an acquire did was EBUSY).
        let racing = TapPool::new(links.clone(), bridge, 1);
        racing.adopt(&[]).await.unwrap();
        let got = futures_util::future::join_all((0..8).map(|i| {
            let pool = racing.clone();
            async move { pool.acquire(54_400 + i).await }
        }))
        .await;
        let names: BTreeSet<String> = got.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(names.len(), 8, "{names:?}");
        // Releases racing the refills: a released name is not free until
        // its TAP is back in the pool or gone.
        let released = futures_util::future::join_all(names.iter().map(|name| {
            let pool = racing.clone();
            async move { pool.release(name).await }
        }))
        .await;
        for r in released {
            r.unwrap();
        }
        racing.drain().await.unwrap();
        for _ in 0..100 {
            if links.names_with_prefix("bgtap").await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            racing.drain().await.unwrap();
        }
        assert!(links.names_with_prefix("bgtap").await.unwrap().is_empty());
    });
}

#[test]
fn a_vm_network_is_attached_and_detached_leaving_nothing() {
    use bangerd::net::dns::VmZone;
    use bangerd::net::network::Network;
    use bangerd::store::Store;
    use std::sync::Arc;
    in_netns(|ns| async move {
        // A /29: five guest addresses, so exhaustion is easy to reach.
        let subnet = Subnet::parse("10.213.42.0/29").unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let zone = VmZone::new(&subnet).unwrap();
        let net = Network::up(
            bangerd::net::firewall::Policy::isolated("banger0", subnet.gateway()),
            subnet,
            1,
            store.clone(),
            Some(zone.clone()),
            &Default::default(),
        )
        .await
        .unwrap();

        let a = net
            .attach("vm-a", "alpha", 54_321, nat(true))
            .await
            .unwrap();
        let b = net
            .attach("vm-b", "beta", 54_322, nat(false))
            .await
            .unwrap();
        assert_eq!(a.lease.ipv4.to_string(), "10.213.42.2");
        assert_eq!(
            a.ip_arg,
            "10.213.42.2::10.213.42.1:255.255.255.248:alpha:eth0:off:10.213.42.1"
        );
        assert!(ip(&ns, &["-d", "link", "show", &a.tap]).contains("user 54321"));
        assert!(ip(&ns, &["-d", "link", "show", &b.tap]).contains("master banger0"));
        assert_eq!(zone.lookup("alpha").await, Some(a.lease.ipv4));
        let nft = |args: &[&str]| {
            let out = Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .arg("nft")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let set = nft(&["list", "set", "inet", "banger", "nat_vms"]);
        assert!(
            set.contains("10.213.42.2") && !set.contains("10.213.42.3"),
            "{set}"
        );
        net.set_nat(b.lease.ipv4, true).await.unwrap();
        assert!(nft(&["list", "set", "inet", "banger", "nat_vms"]).contains("10.213.42.3"));
        // Each guest may send from its own TAP, MAC and address only.
        let guests = nft(&["list", "set", "bridge", "banger", "guests"]);
        for v in [&a, &b] {
            let element = format!("\"{}\" . {} . {}", v.tap, v.lease.mac, v.lease.ipv4);
            assert!(guests.contains(&element), "{element} in {guests}");
        }

        // Exhaust the subnet: the failing attach leaves no TAP and no lease.
        for owner in ["c", "d", "e"] {
            net.attach(owner, owner, 54_330, nat(false)).await.unwrap();
        }
        // Let the pool's background refill settle first.
        for _ in 0..100 {
            if net.pool().snapshot().await.0.len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let taps_before = links_now(&ns);
        let err = net
            .attach("vm-f", "foxtrot", 54_331, nat(true))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "{}", err.message);
        assert_eq!(
            links_now(&ns),
            taps_before,
            "a failed attach changed the links"
        );
        assert_eq!(store.leases().unwrap().len(), 5);
        assert_eq!(zone.lookup("foxtrot").await, None);

        // Detach (a stop): name, NAT and TAP go, the lease stays.
        net.detach("alpha", a.lease.ipv4, Some(&a.tap))
            .await
            .unwrap();
        assert!(store.leases().unwrap().iter().any(|l| l.owner == "vm-a"));
        let guests = nft(&["list", "set", "bridge", "banger", "guests"]);
        assert!(!guests.contains(&a.lease.mac), "{guests}");
        // Adopt (a restart found it running): name, NAT and its place in
        // the firewall come back.
        let lease = net
            .adopt("vm-a", "alpha", nat(true), Some(&a.tap))
            .await
            .unwrap();
        assert_eq!(lease, a.lease);
        assert_eq!(zone.lookup("alpha").await, Some(a.lease.ipv4));
        let guests = nft(&["list", "set", "bridge", "banger", "guests"]);
        assert!(guests.contains(&a.lease.mac), "{guests}");
        // Forget (a delete): everything, the lease too.
        net.forget("vm-a", "alpha", a.lease.ipv4, None)
            .await
            .unwrap();
        assert_eq!(zone.lookup("alpha").await, None);
        let set = nft(&["list", "set", "inet", "banger", "nat_vms"]);
        assert!(
            !set.contains("10.213.42.2") && set.contains("10.213.42.3"),
            "{set}"
        );
        let guests = nft(&["list", "set", "bridge", "banger", "guests"]);
        assert!(!guests.contains(&a.lease.mac), "{guests}");
        assert!(store.leases().unwrap().iter().all(|l| l.owner != "vm-a"));
        let (idle, used) = net.pool().snapshot().await;
        assert!(!used.contains(&a.tap));
        assert!(idle.len() <= 1, "pool of 1: {idle:?}");
        // Its address is the next one handed out.
        let again = net
            .attach("vm-g", "golf", 54_332, nat(false))
            .await
            .unwrap();
        assert_eq!(again.lease.ipv4, a.lease.ipv4);
    });
}

/// A lone TAP (a template's): its owner's, on no bridge, down, so the
/// kernel refuses every frame the guest sends through it; deleted when
/// asked, and one left over is deleted when the network comes up.
#[test]
fn a_lone_tap_leads_nowhere_and_leaves_nothing() {
    use bangerd::net::network::Network;
    use bangerd::store::Store;
    use std::io::Write;
    use std::sync::Arc;
    in_netns(|ns| async move {
        let links = Links::connect().unwrap();
        let subnet = Subnet::parse("10.213.42.0/24").unwrap();
        let bridge = links.ensure_bridge("banger0", &subnet).await.unwrap();
        // Left by a crash, on the bridge and up.
        links.create_tap("bglonestale", 0, bridge).await.unwrap();
        // Made as a pool TAP first: taken off the bridge and set down.
        links.create_tap("bglonecafe", 0, bridge).await.unwrap();
        let net = Network::up(
            bangerd::net::firewall::Policy::isolated("banger0", subnet.gateway()),
            subnet,
            0,
            Arc::new(Store::open_in_memory().unwrap()),
            None,
            &Default::default(),
        )
        .await
        .unwrap();
        assert!(!links_now(&ns).contains(&"bglonestale".to_owned()));

        let tap = net.lone_tap("cafe", 54_400).await.unwrap();
        assert_eq!(tap, "bglonecafe");
        let details = ip(&ns, &["-d", "link", "show", &tap]);
        assert!(details.contains("user 54400"), "{details}");
        assert!(!details.contains("master"), "on no bridge: {details}");
        assert!(details.contains("state DOWN"), "{details}");
        assert!(links.bridge_members(bridge).await.unwrap().is_empty());

        // What a guest sends: a virtio-net header and an ARP request.
        let mut frame = vec![0u8; 12];
        frame.extend([0xff; 6]);
        frame.extend([0x0a, 0xb6, 0, 0, 0, 1, 0x08, 0x06]);
        frame.extend([0u8; 28]);
        let mut guest = std::fs::File::from(bangerd::net::link::attach_tap(&tap).unwrap());
        let refused = guest.write(&frame).expect_err("refused");
        assert_eq!(refused.raw_os_error(), Some(nix::libc::EIO), "{refused}");
        // Up, the same frame would reach the host.
        ip(&ns, &["link", "set", &tap, "up"]);
        assert_eq!(guest.write(&frame).unwrap(), frame.len());
        drop(guest);

        for bad in ["../x", "toolongforatap", ""] {
            let err = net.lone_tap(bad, 54_400).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{bad:?}");
        }
        assert_eq!(
            net.drop_lone_tap(&format!("{TAP_PREFIX}0"))
                .await
                .unwrap_err()
                .kind,
            ErrorKind::InvalidArgument
        );
        net.drop_lone_tap(&tap).await.unwrap();
        net.drop_lone_tap(&tap).await.unwrap();
        assert!(!links_now(&ns).contains(&tap));
    });
}

/// `ip -o link` names in the namespace, sorted.
fn links_now(ns: &str) -> Vec<String> {
    let mut names: Vec<String> = ip(ns, &["-o", "link", "show"])
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_host_network_comes_up_once_for_concurrent_callers() {
    use bangerd::net::host::{HostNetwork, InUse, Settings};
    use bangerd::net::resolved::{NoLinkDns, Registration};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    in_netns(|ns| async move {
        let store = Arc::new(bangerd::store::Store::open_in_memory().unwrap());
        let net = HostNetwork::new(store, Arc::new(NoLinkDns));
        assert!(net.if_up().await.is_none());
        assert_eq!(net.resolved(), Registration::Pending);
        let settings = Settings {
            bridge: "banger0".into(),
            subnet: Subnet::parse("10.213.42.0/24").unwrap(),
            tap_pool_size: 1,
            guest_to_guest: false,
            host_ports: Vec::new(),
            nat_allow: Vec::new(),
        };
        // Two callers at once: one bring-up, and only it asks what
        // running VMs hold.
        let asked = AtomicUsize::new(0);
        let in_use = || async {
            asked.fetch_add(1, Ordering::SeqCst);
            Ok(InUse::default())
        };
        let (a, b) = tokio::join!(net.up(&settings, in_use()), net.up(&settings, in_use()));
        assert_eq!(a.unwrap().bridge_index(), b.unwrap().bridge_index());
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(net.if_up().await.is_some());
        let addr = ip(&ns, &["-br", "addr", "show", "banger0"]);
        assert!(addr.contains("10.213.42.1/24"), "{addr}");
        // No resolved here: recorded for doctor, not an error.
        assert_eq!(net.resolved(), Registration::Absent);
        assert!(net.lease_of("no-such-vm").await.is_none());
    });
}

/// NAT on or off, no peers.
fn nat(on: bool) -> bangerd::net::network::Switches {
    bangerd::net::network::Switches {
        nat: on,
        peers: false,
    }
}
