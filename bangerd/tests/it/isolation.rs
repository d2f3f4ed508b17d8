//! Guest isolation with two real guests (tiny image, QEMU under TCG) on
//! the test bed: from inside one VM, the other VM, a host port other than
//! DNS and IPv6 get nowhere, while DNS on the gateway answers and the host
//! still reaches both VMs; two VMs with the peers switch on talk, and
//! stop when one has it off. The rules themselves, each shown to matter
//! before banger's tables exist, are in `net_firewall.rs`.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;

use crate::vm_lifecycle::setup_with;

#[test]
fn a_guest_reaches_neither_the_other_guest_nor_host_ports_but_dns() {
    let env = setup_with("");
    // A service on every address of the bed's host namespace.
    let _service = env.ns.run(|| TcpListener::bind("0.0.0.0:8765").unwrap());
    env.ok(&["vm", "create", "--name", "left"]);
    env.ok(&["vm", "create", "--name", "right"]);
    let b_ip = env.vm("right")["ipv4"].as_str().unwrap().to_owned();
    let addrs = env.ip(&["-6", "-o", "addr", "show", "dev", "banger0"]);
    let host_ll = addrs
        .split_whitespace()
        .find(|w| w.starts_with("fe80:"))
        .and_then(|w| w.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address on the bridge: {addrs}"))
        .to_owned();

    // The host reaches both guests (ssh) and its own service.
    let host_nc = |ip: &str, port: &str| {
        let to: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        env.ns.run(move || {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3)).is_ok()
        })
    };
    assert!(host_nc(&b_ip, "22"), "the host reaches right's sshd");
    assert!(host_nc("10.213.42.1", "8765"), "the service listens");

    let script = format!(
        "try() {{ nc -w 3 \"$1\" \"$2\" -e true >/dev/null 2>&1; echo \"$1:$2 $?\"; }}
         try 10.213.42.1 53; try 10.213.42.1 8765; try {b_ip} 22
         nslookup -type=a right.vm 10.213.42.1
         ping6 -c 1 -W 3 -I eth0 {host_ll} >/dev/null 2>&1; echo \"ipv6 $?\""
    );
    let out = env.ok(&["vm", "ssh", "left", "--", "sh", "-c", &script]);
    assert!(
        out.contains("10.213.42.1:53 0"),
        "DNS on the gateway:\n{out}"
    );
    assert!(
        out.contains(&format!("Address: {b_ip}")),
        "right.vm resolves:\n{out}"
    );
    assert!(
        out.contains("10.213.42.1:8765 1"),
        "another host port:\n{out}"
    );
    assert!(
        out.contains(&format!("{b_ip}:22 1")),
        "the other guest:\n{out}"
    );
    assert!(out.contains("ipv6 1"), "IPv6 to the host:\n{out}");

    // Peers: both switched on, running, they talk; one switched off again,
    // they do not. Other host ports stay closed either way.
    env.ok(&["vm", "set", "left", "right", "--peers"]);
    assert_eq!(env.vm("right")["peers"], true);
    let probe = format!(
        "try() {{ nc -w 3 \"$1\" \"$2\" -e true >/dev/null 2>&1; echo \"$1:$2 $?\"; }}
         try {b_ip} 22; try 10.213.42.1 8765"
    );
    let out = env.ok(&["vm", "ssh", "left", "--", "sh", "-c", &probe]);
    assert!(out.contains(&format!("{b_ip}:22 0")), "peers:\n{out}");
    assert!(
        out.contains("10.213.42.1:8765 1"),
        "a peer and a host port:\n{out}"
    );
    env.ok(&["vm", "set", "right", "--no-peers"]);
    let out = env.ok(&["vm", "ssh", "left", "--", "sh", "-c", &probe]);
    assert!(
        out.contains(&format!("{b_ip}:22 1")),
        "a peer and a VM that is not:\n{out}"
    );
    env.ok(&["vm", "delete", "left", "right"]);
}
