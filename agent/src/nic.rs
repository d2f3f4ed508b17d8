//! The guest's NIC made another VM's: its MAC, its only IPv4 address and
//! the default route, through rtnetlink (no `ip` processes, and the link
//! stays up: virtio-net takes a new MAC while running).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// What the NIC becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic<'a> {
    pub device: &'a str,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// Readdress `nic.device` in the current network namespace: its MAC,
/// then its IPv4 addresses (the old ones removed, the new one added),
/// then the default route. Doing it twice is doing it once.
pub async fn readdress(nic: &Nic<'_>) -> Result<(), String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
    let io = tokio::spawn(connection);
    let done = apply(&handle, nic).await;
    io.abort();
    done
}

async fn apply(handle: &Handle, nic: &Nic<'_>) -> Result<(), String> {
    let dev = nic.device;
    let link = handle
        .link()
        .get()
        .match_name(dev.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("cannot find {dev}: {e}"))?
        .ok_or_else(|| format!("no device {dev}"))?;
    let index = link.header.index;
    let mac = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    });
    if mac.as_deref() != Some(&nic.mac[..]) {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(nic.mac.to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| format!("cannot set the MAC of {dev}: {e}"))?;
    }
    let old: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("cannot list the addresses of {dev}: {e}"))?;
    let new = IpAddr::V4(nic.address);
    let is = |m: &AddressMessage, ip: IpAddr| {
        m.header.prefix_len == nic.prefix
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
    };
    // The old ones go first: removing a primary address removes the
    // secondaries of its subnet with it (unless promote_secondaries).
    let mut has = false;
    for m in old {
        if is(&m, new) {
            has = true;
            continue;
        }
        let v4 = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(_))));
        if v4 {
            handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|e| format!("cannot remove an old address of {dev}: {e}"))?;
        }
    }
    if !has {
        handle
            .address()
            .add(index, new, nic.prefix)
            .execute()
            .await
            .map_err(|e| format!("cannot add {}/{} to {dev}: {e}", nic.address, nic.prefix))?;
    }
    if let Some(gateway) = nic.gateway {
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .output_interface(index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(|e| format!("cannot route through {gateway}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip` with `args` in the network namespace of thread `ns`.
    fn ip(ns: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .arg("ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_nic_takes_the_new_mac_address_and_route_and_keeps_only_those() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let ns = format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                nix::unistd::gettid()
            );
            // The template's NIC: its MAC, address and route.
            ip(
                &ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                ],
            );
            ip(
                &ns,
                &["link", "set", "eth0", "address", "0a:b6:0a:00:00:02"],
            );
            ip(&ns, &["link", "set", "eth0", "up"]);
            ip(&ns, &["link", "set", "peer0", "up"]);
            ip(&ns, &["addr", "add", "10.9.0.2/24", "dev", "eth0"]);
            ip(&ns, &["route", "add", "default", "via", "10.9.0.1"]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let nic = Nic {
                device: "eth0",
                mac: [0x0a, 0xb6, 0x0a, 0x00, 0x00, 0x07],
                address: Ipv4Addr::new(10, 9, 0, 7),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 9, 0, 1)),
            };
            rt.block_on(readdress(&nic)).expect("readdressed");
            // Twice is the same as once.
            rt.block_on(readdress(&nic)).expect("readdressed again");
            let link = ip(&ns, &["-o", "link", "show", "eth0"]);
            assert!(link.contains("link/ether 0a:b6:0a:00:00:07"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            let addrs = ip(&ns, &["-o", "-4", "addr", "show", "dev", "eth0"]);
            assert_eq!(addrs.lines().count(), 1, "{addrs}");
            assert!(addrs.contains("inet 10.9.0.7/24"), "{addrs}");
            let routes = ip(&ns, &["-4", "route", "show", "default"]);
            assert_eq!(routes.lines().count(), 1, "{routes}");
            assert!(
                routes.starts_with("default via 10.9.0.1 dev eth0 "),
                "{routes}"
            );
            // A device that is not there is named.
            let e = rt
                .block_on(readdress(&Nic {
                    device: "eth9",
                    ..nic
                }))
                .expect_err("no eth9");
            assert!(e.contains("eth9"), "{e}");
        })
        .join()
        .expect("thread");
    }
}
