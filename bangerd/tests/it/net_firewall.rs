//! The guests' firewall and NAT with real packets. Four namespaces: the
//! "host" (this test thread's own, with the bridge and banger's nftables
//! tables), two "guests" on the bridge through veths named like banger's
//! TAPs and carrying their leases' MACs, and an "upstream" the host reaches
//! through a router link (198.51.100.0/30, a network the host is attached
//! to) with a "remote" address behind it (192.0.2.2) and no route back to
//! the VM subnet. Each rule is first shown to matter: before banger's
//! tables exist, the guest does what the firewall then stops. Needs root.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use banger_testbed::NetNs;
use bangerd::net::firewall::{Firewall, Guest, Policy};
use bangerd::net::leases::{Subnet, mac_for};
use bangerd::net::link::Links;

/// `/run/netns/NAME` of `ns`, for `nsenter --net=`.
fn path(ns: &NetNs) -> String {
    format!("/run/netns/{}", ns.name())
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

/// `PROGRAM ARGS` in the namespace at `ns` (a path).
fn inside(ns: &str, program: &str, args: &[&str]) -> String {
    let mut all = vec![format!("--net={ns}"), program.to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    run("nsenter", &refs)
}

/// Whether a TCP connect from namespace `ns` (optionally from address
/// `from`) to `to:port` completes within 1.5 s.
fn reaches(ns: &str, from: Option<&str>, to: &str, port: u16) -> bool {
    let src = from.map_or("None".to_owned(), |f| format!("('{f}', 0)"));
    let script = format!(
        "import socket\nsocket.create_connection(('{to}', {port}), timeout=1.5, source_address={src})"
    );
    Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .args(["python3", "-c", &script])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Send one IPv6 router advertisement for `prefix::/64` from `ns` out of
/// its `eth0`, to all nodes.
fn advertise(ns: &str, prefix: &str) {
    let script = format!(
        r#"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
idx = socket.if_nametoindex('eth0')
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
ra = struct.pack('!BBHBBHII', 134, 0, 0, 64, 0, 1800, 0, 0)
pi = struct.pack('!BBBBIII', 3, 4, 64, 0xc0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, '{prefix}::')
s.sendto(ra + pi, ('ff02::1', 0, 0, idx))
"#
    );
    inside(ns, "python3", &["-c", &script]);
}

/// A listener on `addr` in the calling thread's namespace, kept open.
fn listen(addr: &str) -> TcpListener {
    TcpListener::bind(addr).unwrap()
}

#[test]
fn guests_are_confined_and_nat_lets_them_out_only_while_on() {
    let g1 = NetNs::new("bgt-g1");
    let g2 = NetNs::new("bgt-g2");
    let upstream = NetNs::new("bgt-up");

    crate::net_links::in_netns(move |host| async move {
        scenario(&host, &g1, &g2, &upstream).await;
    });
}

/// Put guest namespace `g` on the bridge as `tap` with `ip` and its
/// lease's MAC.
fn add_guest(host: &str, g: &NetNs, tap: &str, ip: Ipv4Addr) {
    inside(
        host,
        "ip",
        &[
            "link",
            "add",
            tap,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            g.name(),
        ],
    );
    inside(host, "ip", &["link", "set", tap, "master", "bgfw0", "up"]);
    let n = g.name();
    // No duplicate address detection: the link-local address is usable
    // at once (the router advertisement needs one).
    run(
        "ip",
        &[
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.eth0.accept_dad=0",
        ],
    );
    run(
        "ip",
        &["-n", n, "link", "set", "eth0", "address", &mac_for(ip)],
    );
    run(
        "ip",
        &["-n", n, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    );
    run("ip", &["-n", n, "link", "set", "eth0", "up"]);
    run(
        "ip",
        &["-n", n, "route", "add", "default", "via", "10.213.42.1"],
    );
}

async fn scenario(host: &str, g1: &NetNs, g2: &NetNs, upstream: &NetNs) {
    let (a, b) = (Ipv4Addr::new(10, 213, 42, 2), Ipv4Addr::new(10, 213, 42, 3));
    let (ga, gb, u) = (path(g1), path(g2), upstream.name());
    // A table of somebody else's that must survive everything.
    inside(host, "nft", &["add", "table", "ip", "someone_else"]);
    inside(host, "nft", &["add", "chain", "ip", "someone_else", "keep"]);
    // The host learns from router advertisements on the bridge if any
    // reach it (and forwards, so NAT can work).
    inside(
        host,
        "sysctl",
        &["-qw", "net.ipv6.conf.default.accept_ra=2"],
    );

    let links = Links::connect().unwrap();
    let subnet = Subnet::parse("10.213.42.0/24").unwrap();
    let bridge = links.ensure_bridge("bgfw0", &subnet).await.unwrap();
    add_guest(host, g1, "bgtapg1", a);
    add_guest(host, g2, "bgtapg2", b);
    // The upstream: a router at 198.51.100.2 (the host's directly
    // attached network) with 192.0.2.2 behind it.
    inside(
        host,
        "ip",
        &[
            "link", "add", "vu-h", "type", "veth", "peer", "name", "vu-u", "netns", u,
        ],
    );
    inside(
        host,
        "ip",
        &["addr", "add", "198.51.100.1/30", "dev", "vu-h"],
    );
    inside(host, "ip", &["link", "set", "vu-h", "up"]);
    inside(
        host,
        "ip",
        &["route", "add", "192.0.2.0/24", "via", "198.51.100.2"],
    );
    run(
        "ip",
        &["-n", u, "addr", "add", "198.51.100.2/30", "dev", "vu-u"],
    );
    run("ip", &["-n", u, "addr", "add", "192.0.2.2/32", "dev", "lo"]);
    run("ip", &["-n", u, "link", "set", "vu-u", "up"]);

    let remote = upstream.run(|| listen("192.0.2.2:8080"));
    let _lan = upstream.run(|| listen("198.51.100.2:8081"));
    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        for conn in remote.incoming().flatten() {
            if let Ok(peer) = conn.peer_addr() {
                let _ = seen_tx.send(peer);
            }
        }
    });
    // The host: DNS on the gateway, and a service guests must not reach.
    let _dns = listen("10.213.42.1:53");
    let _sshd = listen("0.0.0.0:2222");
    let _b_sshd = g2.run(|| listen("10.213.42.3:22"));
    let _a_web = g1.run(|| listen("10.213.42.2:7000"));

    // Without banger's tables, a guest reaches the host's every port and
    // the other guest, and its router advertisement configures the host.
    assert!(reaches(&ga, None, "10.213.42.1", 2222));
    assert!(reaches(&ga, None, "10.213.42.3", 22));
    advertise(&ga, "2001:db8:1");
    let mut learned = String::new();
    for _ in 0..50 {
        learned = inside(host, "ip", &["-6", "addr", "show", "dev", "bgfw0"]);
        if learned.contains("2001:db8:1:") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        learned.contains("2001:db8:1:"),
        "the RA was not heard: {learned}"
    );

    let host_nets = links.host_networks(Some(bridge)).await.unwrap();
    assert_eq!(
        host_nets,
        vec!["198.51.100.0/30".parse::<ipnet::Ipv4Net>().unwrap()],
        "the host's attached networks, not the bridge's"
    );
    let guests = [
        Guest {
            tap: "bgtapg1".into(),
            ipv4: a,
        },
        Guest {
            tap: "bgtapg2".into(),
            ipv4: b,
        },
    ];
    let fw = Firewall::new(Policy::isolated("bgfw0", subnet.gateway()));
    fw.apply(&guests, &[], &[], &host_nets).await.unwrap();

    // The host: DNS only, and what the host starts.
    assert!(reaches(&ga, None, "10.213.42.1", 53), "DNS on the gateway");
    assert!(
        !reaches(&ga, None, "10.213.42.1", 2222),
        "another host port"
    );
    assert!(
        !reaches(&ga, None, "198.51.100.1", 2222),
        "the host's other address"
    );
    assert!(
        reaches(host, None, "10.213.42.2", 7000),
        "the host reaches a guest"
    );
    // No guest-to-guest.
    assert!(!reaches(&ga, None, "10.213.42.3", 22), "the other guest");
    // No address or MAC but its own.
    run(
        "ip",
        &[
            "-n",
            g1.name(),
            "addr",
            "add",
            "10.213.42.9/24",
            "dev",
            "eth0",
        ],
    );
    assert!(
        !reaches(&ga, Some("10.213.42.9"), "10.213.42.1", 53),
        "a spoofed address"
    );
    run(
        "ip",
        &[
            "-n",
            g1.name(),
            "link",
            "set",
            "eth0",
            "address",
            "0a:b6:00:00:00:09",
        ],
    );
    assert!(!reaches(&ga, None, "10.213.42.1", 53), "a spoofed MAC");
    run(
        "ip",
        &[
            "-n",
            g1.name(),
            "link",
            "set",
            "eth0",
            "address",
            &mac_for(a),
        ],
    );
    assert!(reaches(&ga, None, "10.213.42.1", 53), "its own again");
    // A guest on another guest's TAP is nobody.
    assert!(reaches(&gb, None, "10.213.42.1", 53));
    // Router advertisements get nowhere.
    advertise(&ga, "2001:db8:2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let addrs = inside(host, "ip", &["-6", "addr", "show", "dev", "bgfw0"]);
    assert!(!addrs.contains("2001:db8:2:"), "an RA got through: {addrs}");

    // NAT off: not out.
    assert!(!reaches(&ga, None, "192.0.2.2", 8080), "out without NAT");
    // NAT on: out, masqueraded, but not into the host's own network.
    fw.apply(&guests, &[a], &[], &host_nets).await.unwrap();
    assert_eq!(
        inside(host, "cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert!(reaches(&ga, None, "192.0.2.2", 8080), "NAT on: out");
    let peer = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from([198, 51, 100, 1]),
        "masqueraded"
    );
    assert!(
        !reaches(&ga, None, "198.51.100.2", 8081),
        "NAT into the host's network"
    );
    assert!(!reaches(&gb, None, "192.0.2.2", 8080), "NAT is per guest");
    assert!(
        !reaches(&ga, None, "10.213.42.3", 22),
        "routed to the other guest"
    );
    let listing = inside(host, "nft", &["list", "table", "inet", "banger"]);
    assert!(
        listing.contains("10.213.42.2") && listing.contains("masquerade"),
        "{listing}"
    );

    // The policy's exceptions.
    let mut open = Policy::isolated("bgfw0", subnet.gateway());
    open.guest_to_guest = true;
    open.host_ports = vec![2222];
    open.nat_allow = vec!["198.51.100.0/30".parse().unwrap()];
    let open = Firewall::new(open);
    open.apply(&guests, &[a], &[], &host_nets).await.unwrap();
    assert!(reaches(&ga, None, "10.213.42.3", 22), "guests may talk");
    assert!(
        reaches(&ga, None, "10.213.42.1", 2222),
        "a listed host port"
    );
    assert!(
        reaches(&ga, None, "198.51.100.2", 8081),
        "an allowed network"
    );

    // Peers: guests that both have the switch on talk (ARP included);
    // one alone reaches no one, and no one reaches it.
    fw.apply(&guests, &[], &[a], &host_nets).await.unwrap();
    assert!(!reaches(&ga, None, "10.213.42.3", 22), "a peer alone");
    assert!(
        !reaches(&gb, None, "10.213.42.2", 7000),
        "a guest to a peer that is not its"
    );
    fw.apply(&guests, &[], &[a, b], &host_nets).await.unwrap();
    assert!(reaches(&ga, None, "10.213.42.3", 22), "peers talk");
    assert!(reaches(&gb, None, "10.213.42.2", 7000), "both ways");
    assert!(
        !reaches(&ga, None, "10.213.42.1", 2222),
        "peers still reach no other host port"
    );
    // Still only as itself.
    run(
        "ip",
        &[
            "-n",
            g1.name(),
            "addr",
            "add",
            "10.213.42.10/24",
            "dev",
            "eth0",
        ],
    );
    assert!(
        !reaches(&ga, Some("10.213.42.10"), "10.213.42.3", 22),
        "a peer with a spoofed address"
    );

    // Applying is idempotent and reconciles: NAT off, b forgotten.
    fw.apply(&guests, &[a], &[], &host_nets).await.unwrap();
    fw.apply(&guests[..1], &[], &[], &host_nets).await.unwrap();
    assert!(!reaches(&ga, None, "192.0.2.2", 8080), "NAT off, yet out");
    assert!(!reaches(&gb, None, "10.213.42.1", 53), "a forgotten guest");

    // Nobody else's table was touched; removing ours leaves theirs.
    let tables = inside(host, "nft", &["list", "tables"]);
    assert!(tables.contains("table ip someone_else"), "{tables}");
    fw.remove().await.unwrap();
    fw.remove().await.unwrap();
    let tables = inside(host, "nft", &["list", "tables"]);
    assert!(!tables.contains("banger"), "{tables}");
    assert!(inside(host, "nft", &["list", "table", "ip", "someone_else"]).contains("chain keep"));
}
