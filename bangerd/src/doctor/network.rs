//! Networking checks: the subnet against the host's routes, forwarding,
//! nftables, `.vm` names through systemd-resolved, the DNS port.

use std::path::Path;

use crate::config::Config;

use super::vms::program_version;
use super::{Check, NameState};

/// `bridge` and `subnet`: read-only netlink questions about this host.
pub(super) async fn check_network(config: &Config) -> Vec<Check> {
    let bridge = config.network.bridge.clone();
    let subnet = match config.network.subnet() {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "subnet",
                e.message,
                "fix network.subnet in bangerd.toml",
            )];
        }
    };
    let links = match crate::net::link::Links::connect() {
        Ok(l) => l,
        Err(e) => {
            let hint = "bangerd needs netlink (CAP_NET_ADMIN) for VM networking";
            return vec![
                Check::fail("bridge", e.message.clone(), hint),
                Check::fail("subnet", e.message, hint),
            ];
        }
    };
    let index = links.index_of(&bridge).await;
    let bridge_check = match &index {
        Ok(Some(i)) => Check::pass(
            "bridge",
            format!(
                "{bridge} exists (ifindex {i}), gateway {}",
                subnet.gateway()
            ),
        ),
        Ok(None) => Check::pass(
            "bridge",
            format!("{bridge} does not exist yet; bangerd creates it for the first VM"),
        ),
        Err(e) => Check::warn("bridge", e.message.clone(), "check netlink access"),
    };
    let subnet_check = match links.route_clash(&subnet, index.ok().flatten()).await {
        Ok(None) => Check::pass("subnet", format!("{subnet}: no host route overlaps it")),
        Ok(Some(route)) => Check::fail(
            "subnet",
            format!("{subnet} overlaps the host route {route}"),
            "set network.subnet in bangerd.toml to a network no route uses",
        ),
        Err(e) => Check::warn("subnet", e.message, "check netlink access"),
    };
    vec![bridge_check, subnet_check]
}

pub(super) fn check_ip_forward(path: &Path) -> Check {
    const NAME: &str = "ip-forward";
    match std::fs::read_to_string(path).map(|s| s.trim().to_owned()) {
        Ok(v) if v == "1" => Check::pass(NAME, "IPv4 forwarding is on"),
        Ok(_) => Check::pass(
            NAME,
            "IPv4 forwarding is off; bangerd switches it on when a VM gets NAT",
        ),
        Err(e) => Check::warn(
            NAME,
            format!("cannot read {}: {e}", path.display()),
            "VM NAT needs net.ipv4.ip_forward",
        ),
    }
}

pub(super) fn check_nftables() -> Check {
    const NAME: &str = "nftables";
    match crate::program::find(Path::new("nft")) {
        Some(nft) => Check::pass(
            NAME,
            program_version(&nft).unwrap_or_else(|| format!("{} (version unknown)", nft.display())),
        ),
        None => Check::fail(
            NAME,
            "nft not found",
            "install nftables (apt install nftables) for NAT",
        ),
    }
}

/// `resolved`: whether `<name>.vm` resolves on the host through
/// systemd-resolved (see `net::resolved`).
pub fn check_resolved(state: NameState, link: &crate::net::resolved::Registration) -> Check {
    use crate::net::resolved::Registration;
    const NAME: &str = "resolved";
    if !state.reachable() {
        return Check::warn(
            NAME,
            "systemd-resolved is not on the system bus: the host will not resolve <name>.vm by itself",
            "use systemd-resolved, or point your resolver at banger's DNS for the vm. domain",
        );
    }
    match link {
        Registration::Active { bridge, server } => Check::pass(
            NAME,
            format!(
                "systemd-resolved routes ~vm to {server} on {bridge}: <name>.vm resolves on the host"
            ),
        ),
        Registration::Pending | Registration::Absent => Check::pass(
            NAME,
            "systemd-resolved is on the system bus; ~vm is registered with it when the bridge comes up (first VM start)",
        ),
        Registration::Failed(why) => Check::warn(
            NAME,
            format!("systemd-resolved is running but did not take ~vm: {why}"),
            "see journalctl -u systemd-resolved; resolvectl domain/dns on the bridge do the same by hand",
        ),
    }
}

pub(super) fn check_dns_port(
    addr: std::net::SocketAddr,
    served: Option<std::net::SocketAddr>,
) -> Check {
    const NAME: &str = "dns-port";
    if let Some(ours) = served
        && (ours == addr || (addr.port() == 0 && ours.ip() == addr.ip()))
    {
        return Check::pass(
            NAME,
            format!("bangerd serves the .vm zone on {ours} (udp and tcp)"),
        );
    }
    let udp = std::net::UdpSocket::bind(addr);
    let tcp = std::net::TcpListener::bind(addr);
    match (udp, tcp) {
        (Ok(_), Ok(_)) => Check::pass(NAME, format!("{addr} is free for the .vm DNS server")),
        (Err(e), _) | (_, Err(e)) => Check::fail(
            NAME,
            format!("cannot bind {addr}: {e}"),
            "another program uses the port; stop it or set network.dns_listen in bangerd.toml",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{NameState, Verdict};

    #[test]
    fn busy_port_fails() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        assert_eq!(check_dns_port(addr, None).verdict, Verdict::Fail);
        drop(held);
    }

    #[test]
    fn resolved_says_whether_vm_names_resolve_on_the_host() {
        use crate::net::resolved::Registration;
        let up = NameState::Owned;
        let c = check_resolved(
            up,
            &Registration::Active {
                bridge: "banger0".into(),
                server: std::net::Ipv4Addr::new(10, 213, 42, 1),
            },
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("10.213.42.1 on banger0"), "{c:?}");
        let c = check_resolved(up, &Registration::Failed("access denied".into()));
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("access denied"));
        assert!(
            check_resolved(up, &Registration::Pending)
                .detail
                .contains("first VM")
        );
        assert_eq!(
            check_resolved(NameState::Absent, &Registration::Pending).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn ip_forward_is_read_truthfully() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("ip_forward");
        std::fs::write(&f, "1\n").expect("write");
        assert!(check_ip_forward(&f).detail.contains("is on"));
        std::fs::write(&f, "0\n").expect("write");
        assert!(check_ip_forward(&f).detail.contains("switches it on"));
        assert_eq!(
            check_ip_forward(&dir.path().join("nope")).verdict,
            Verdict::Warn
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn network_checks_see_a_clash_in_a_private_namespace() {
        // A thread in its own network namespace, with a route that
        // overlaps the default subnet.
        let checks = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let ns = format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                nix::unistd::gettid()
            );
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("nsenter")
                    .arg(format!("--net={ns}"))
                    .arg("ip")
                    .args(args)
                    .status()
                    .expect("ip");
                assert!(st.success(), "ip {args:?}");
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let before = rt.block_on(check_network(&Config::default()));
            ip(&["link", "add", "clash0", "type", "bridge"]);
            ip(&["addr", "add", "10.213.0.1/16", "dev", "clash0"]);
            ip(&["link", "set", "clash0", "up"]);
            let after = rt.block_on(check_network(&Config::default()));
            (before, after)
        })
        .join()
        .expect("thread");
        let (before, after) = checks;
        assert_eq!(before.len(), 2);
        assert!(
            before.iter().all(|c| c.verdict == Verdict::Pass),
            "{before:?}"
        );
        assert!(
            before[0].detail.contains("does not exist yet"),
            "{:?}",
            before[0]
        );
        assert_eq!(after[1].verdict, Verdict::Fail, "{:?}", after[1]);
        assert!(
            after[1].detail.contains("10.213.0.0/16 via clash0"),
            "{:?}",
            after[1]
        );
    }
}
