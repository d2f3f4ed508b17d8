//! NAT with real packets. Three namespaces: the "host" (this test thread's
//! own, with the bridge and banger's nftables table), a "guest" on the
//! bridge through a veth, and an "upstream" the host reaches through
//! another veth and that has no route back to the VM subnet. A TCP connect
//! from the guest to the upstream works only while the guest's address is
//! in the NAT set, and arrives from the host's address. Needs root.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use bangerd::net::leases::Subnet;
use bangerd::net::link::Links;
use bangerd::net::nat::Nat;

/// A named network namespace (`ip netns add`), deleted on drop.
struct NamedNs(String);

impl NamedNs {
    fn new(role: &str) -> Self {
        let name = format!("bgt-{role}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run("ip", &["netns", "add", &name]);
        Self(name)
    }

    /// Run `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `CMD ARGS` in the namespace at `/proc/.../ns/net` `ns`.
fn in_host(ns: &str, program: &str, args: &[&str]) -> String {
    let mut all = vec![format!("--net={ns}"), program.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    run("nsenter", &refs)
}

/// Connect from inside `guest` to the upstream's listener.
fn connect_from(guest: &NamedNs) -> Result<(), std::io::Error> {
    guest.run(|| {
        TcpStream::connect_timeout(&"192.0.2.2:8080".parse().unwrap(), Duration::from_secs(2))
            .map(|_| ())
    })
}

#[test]
fn nat_lets_a_guest_out_only_while_on_and_touches_no_other_table() {
    let guest = NamedNs::new("guest");
    let upstream = NamedNs::new("up");
    run("ip", &["-n", &upstream.0, "link", "set", "lo", "up"]);

    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let host = format!(
                    "/proc/{}/task/{}/ns/net",
                    std::process::id(),
                    nix::unistd::gettid()
                );
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(scenario(&host, &guest, &upstream));
            })
            .join()
            .unwrap();
    });
}

async fn scenario(host: &str, guest: &NamedNs, upstream: &NamedNs) {
    let (g, u) = (guest.0.as_str(), upstream.0.as_str());
    // A table of somebody else's that must survive everything.
    in_host(host, "nft", &["add", "table", "ip", "someone_else"]);
    in_host(host, "nft", &["add", "chain", "ip", "someone_else", "keep"]);

    let links = Links::connect().unwrap();
    let subnet = Subnet::parse("10.213.42.0/24").unwrap();
    links.ensure_bridge("bgnat0", &subnet).await.unwrap();
    // The guest: a veth with one end on the bridge.
    in_host(
        host,
        "ip",
        &[
            "link", "add", "vg-h", "type", "veth", "peer", "name", "vg-g", "netns", g,
        ],
    );
    in_host(
        host,
        "ip",
        &["link", "set", "vg-h", "master", "bgnat0", "up"],
    );
    run(
        "ip",
        &["-n", g, "addr", "add", "10.213.42.2/24", "dev", "vg-g"],
    );
    run("ip", &["-n", g, "link", "set", "vg-g", "up"]);
    run("ip", &["-n", g, "link", "set", "lo", "up"]);
    run(
        "ip",
        &["-n", g, "route", "add", "default", "via", "10.213.42.1"],
    );
    // The upstream: 192.0.2.0/24, with no route back to the VMs.
    in_host(
        host,
        "ip",
        &[
            "link", "add", "vu-h", "type", "veth", "peer", "name", "vu-u", "netns", u,
        ],
    );
    in_host(host, "ip", &["addr", "add", "192.0.2.1/24", "dev", "vu-h"]);
    in_host(host, "ip", &["link", "set", "vu-h", "up"]);
    run(
        "ip",
        &["-n", u, "addr", "add", "192.0.2.2/24", "dev", "vu-u"],
    );
    run("ip", &["-n", u, "link", "set", "vu-u", "up"]);

    let listener = upstream.run(|| TcpListener::bind("192.0.2.2:8080").unwrap());
    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Ok(peer) = conn.peer_addr() {
                let _ = seen_tx.send(peer);
            }
        }
    });

    let nat = Nat::new("bgnat0");
    let guest_ip = Ipv4Addr::new(10, 213, 42, 2);

    nat.apply(&[]).await.unwrap();
    assert!(
        connect_from(guest).is_err(),
        "reached the upstream without NAT"
    );

    nat.apply(&[guest_ip]).await.unwrap();
    assert_eq!(
        in_host(host, "cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    connect_from(guest).expect("NAT on: the guest reaches the upstream");
    let peer = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from([192, 0, 2, 1]),
        "masqueraded to the host"
    );
    let listing = in_host(host, "nft", &["list", "table", "inet", "banger"]);
    assert!(
        listing.contains("10.213.42.2") && listing.contains("masquerade"),
        "{listing}"
    );

    // Applying is idempotent, and reconciles: off again.
    nat.apply(&[guest_ip]).await.unwrap();
    nat.apply(&[]).await.unwrap();
    assert!(
        connect_from(guest).is_err(),
        "NAT off, yet the guest got out"
    );

    // Nobody else's table was touched; removing ours leaves theirs.
    let tables = in_host(host, "nft", &["list", "tables"]);
    assert!(tables.contains("table ip someone_else"), "{tables}");
    nat.remove().await.unwrap();
    nat.remove().await.unwrap();
    let tables = in_host(host, "nft", &["list", "tables"]);
    assert!(!tables.contains("banger"), "{tables}");
    assert!(in_host(host, "nft", &["list", "table", "ip", "someone_else"]).contains("chain keep"));
}
