//! bangerd serves the `.vm` zone on `network.dns_listen`, says so in
//! doctor, and keeps running (with doctor telling why) when the port is
//! taken. Needs root (the test bed).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use banger_dbus::proxy::ManagerProxy;
use banger_testbed::{Options, TestBed};

fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn bed_on(port: u16) -> TestBed {
    TestBed::start(Options {
        config_toml: Some(format!("[network]\ndns_listen = \"127.0.0.1:{port}\"\n")),
        ..Options::default()
    })
    .unwrap()
}

fn dns_port_check(bed: &TestBed) -> (String, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bed.bus_address())
            .build()
            .await
            .unwrap();
        let checks = ManagerProxy::new(&conn)
            .await
            .unwrap()
            .doctor()
            .await
            .unwrap();
        let c = checks.into_iter().find(|c| c.name == "dns-port").unwrap();
        (c.verdict, c.detail)
    })
}

#[test]
fn the_daemon_answers_for_vm_and_doctor_knows_it() {
    let port = free_port();
    let bed = bed_on(port);
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+time=2",
            "+tries=2",
            "nothing.vm",
            "A",
        ])
        .output()
        .expect("dig (dnsutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: NXDOMAIN"), "{text}");
    assert!(
        text.contains(" aa"),
        "authoritative answer expected: {text}"
    );
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+time=2",
            "+tries=2",
            "vm.",
            "SOA",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("hostmaster.vm."));
    let (verdict, detail) = dns_port_check(&bed);
    assert_eq!(verdict, "pass", "{detail}");
    assert!(detail.contains("bangerd serves"), "{detail}");
}

#[test]
fn a_taken_port_does_not_stop_the_daemon() {
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let bed = bed_on(port);
    let (verdict, detail) = dns_port_check(&bed);
    assert_eq!(verdict, "fail", "{detail}");
    assert!(detail.contains(&format!("127.0.0.1:{port}")), "{detail}");
    drop(held);
}
