//! The `.vm` DNS server on loopback, asked by the real `dig`: A and PTR
//! answers that change live, NXDOMAIN for unknown names, forwarding of
//! other names to an upstream (another server we run), and garbage or
//! oversized packets that do not disturb it.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use bangerd::net::dns::{DnsServer, VmZone, catalog};
use bangerd::net::leases::Subnet;
use tokio::io::AsyncWriteExt;

/// Bind UDP and TCP on the same free loopback port.
async fn sockets() -> (tokio::net::UdpSocket, tokio::net::TcpListener, SocketAddr) {
    loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            return (udp, tcp, addr);
        }
    }
}

/// `dig +short` in a blocking thread; returns (status line, short answer).
async fn dig(server: SocketAddr, args: &[&str]) -> (String, String) {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("dig (dnsutils) runs"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find(|l| l.contains("status:"))
        .unwrap_or("")
        .to_owned();
    let answer: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    (status, answer.join("\n"))
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_names_answer_change_live_and_other_names_are_forwarded() {
    let subnet = Subnet::parse("10.213.42.0/24").unwrap();

    // An "upstream" resolver: another server, authoritative for example.test.
    let upstream_zone = VmZone::new(&Subnet::parse("10.99.0.0/24").unwrap()).unwrap();
    upstream_zone
        .set("far", Ipv4Addr::new(10, 99, 0, 9))
        .await
        .unwrap();
    let (uu, ut, upstream) = sockets().await;
    let up = DnsServer::serve(catalog(&upstream_zone, &[]).unwrap(), vec![uu], vec![ut]);

    // Ours, forwarding to it. (The upstream also serves `vm.`, so a name
    // there that ours lacks would show forwarding was used wrongly.)
    let zone = VmZone::new(&subnet).unwrap();
    zone.set("box", Ipv4Addr::new(10, 213, 42, 2))
        .await
        .unwrap();
    let (u, t, addr) = sockets().await;
    let ours = DnsServer::serve(catalog(&zone, &[upstream]).unwrap(), vec![u], vec![t]);

    let (status, answer) = dig(addr, &["box.vm", "A"]).await;
    assert!(status.contains("NOERROR"), "{status}");
    assert!(answer.contains("10.213.42.2"), "{answer}");
    let (_, answer) = dig(addr, &["-x", "10.213.42.2"]).await;
    assert!(answer.contains("box.vm."), "{answer}");
    let (_, answer) = dig(addr, &["+tcp", "box.vm", "A"]).await;
    assert!(answer.contains("10.213.42.2"), "over TCP: {answer}");

    // Unknown name in our zone: NXDOMAIN, not forwarded.
    let (status, _) = dig(addr, &["far.vm", "A"]).await;
    assert!(status.contains("NXDOMAIN"), "{status}");

    // Live changes.
    zone.set("box", Ipv4Addr::new(10, 213, 42, 9))
        .await
        .unwrap();
    let (_, answer) = dig(addr, &["box.vm", "A"]).await;
    assert!(
        answer.contains("10.213.42.9") && !answer.contains("10.213.42.2"),
        "{answer}"
    );
    let (_, answer) = dig(addr, &["-x", "10.213.42.2"]).await;
    assert!(answer.is_empty(), "stale PTR: {answer}");
    zone.remove("box").await.unwrap();
    let (status, _) = dig(addr, &["box.vm", "A"]).await;
    assert!(status.contains("NXDOMAIN"), "{status}");

    // Garbage: random datagrams, a truncated header, an oversized TCP
    // length prefix that never delivers. The server keeps answering.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for packet in [
        &b""[..],
        b"\x00",
        &[0xffu8; 600][..],
        &[0u8; 12][..],
        &vec![0x41u8; 65_000][..],
    ] {
        let _ = junk.send_to(packet, addr);
    }
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    zone.set("again", Ipv4Addr::new(10, 213, 42, 3))
        .await
        .unwrap();
    let (_, answer) = dig(addr, &["again.vm", "A"]).await;
    assert!(answer.contains("10.213.42.3"), "after garbage: {answer}");

    // Another name: forwarded to the upstream, which knows far.vm... only
    // under its own zone, so ask it for something only it has.
    let (status, answer) = dig(addr, &["far.vm.", "A", "+norecurse"]).await;
    assert!(
        status.contains("NXDOMAIN"),
        "vm. stays ours: {status} {answer}"
    );
    let (status, answer) = dig(addr, &["-x", "10.99.0.9"]).await;
    assert!(
        status.contains("NOERROR"),
        "forwarded reverse lookup: {status}"
    );
    assert!(answer.contains("far.vm."), "forwarded: {answer}");

    drop(stuck);
    tokio::time::timeout(Duration::from_secs(10), ours.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), up.shutdown())
        .await
        .unwrap();
}
