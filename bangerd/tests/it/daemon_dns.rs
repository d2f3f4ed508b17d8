//! bangerd serves the `.vm` zone on `network.dns_listen`, says so in
//! doctor, and keeps running (with doctor telling why) when the port is
//! taken. Needs root (the test bed).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use banger_dbus::proxy::ManagerProxy;
use banger_testbed::{Options, TestBed, free_loopback_port};

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
    let port = free_loopback_port().unwrap();
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

/// Kills the socket-activated daemon on drop.
struct Activated(std::process::Child);

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// systemd's own `systemd-socket-activate` binds the UDP socket, names it
/// `dns`, and starts bangerd on the first datagram with `LISTEN_FDS`.
/// `dns_listen` names the same port, so bangerd could not have bound it
/// itself: an answer proves it served the passed socket.
#[test]
fn socket_activated_dns() {
    let port = free_loopback_port().unwrap();
    let bed = TestBed::start(Options {
        config_toml: Some(format!("[network]\ndns_listen = \"127.0.0.1:{port}\"\n")),
        start_daemon: false,
        ..Options::default()
    })
    .unwrap();
    let env = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
        format!("--setenv={k}={}", v.as_ref().to_string_lossy())
    };
    let child = Command::new("systemd-socket-activate")
        .arg("--datagram")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--fdname=dns")
        .arg(env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus_address()))
        .arg(env("STATE_DIRECTORY", &bed.state_dir()))
        .arg(env("CACHE_DIRECTORY", &bed.cache_dir()))
        .arg(env("RUNTIME_DIRECTORY", &bed.runtime_dir()))
        .arg(env("CONFIGURATION_DIRECTORY", &bed.config_dir()))
        .arg(banger_testbed::bin_path("bangerd"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) runs");
    let since = std::time::SystemTime::now();
    let pid = child.id();
    let _daemon = Activated(child);
    // The first datagram starts bangerd; dig retries until it answers.
    let answered = banger_testbed::eventually(std::time::Duration::from_secs(30), || {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+time=2",
                "+tries=1",
                "vm.",
                "SOA",
            ])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("hostmaster.vm.").then_some(text)
    });
    assert!(
        answered.is_some(),
        "no answer from the socket-activated daemon"
    );
    // And it says it used the passed socket rather than binding its own.
    let used = banger_testbed::eventually(std::time::Duration::from_secs(10), || {
        banger_testbed::daemon_journal(pid, since)
            .into_iter()
            .find(|e| {
                e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("using the DNS sockets systemd passed"))
            })
    });
    assert!(
        used.is_some(),
        "bangerd did not report using the passed socket"
    );
    assert!(bed.wait_for_name(banger_dbus::BUS_NAME, std::time::Duration::from_secs(10)));
    let (verdict, detail) = dns_port_check(&bed);
    assert_eq!(verdict, "pass", "{detail}");
}
