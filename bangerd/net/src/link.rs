//! The bridge and the VMs' TAP devices, through rtnetlink; TAPs are made
//! with the TUNSETIFF ioctl (the kernel refuses to create them over
//! netlink) and made persistent and owned by the VMM's user.
//!
//! Everything here acts on the network namespace of the calling thread
//! (netlink sockets and `/dev/net/tun` bind to it when opened), which is
//! how the tests run it in a fresh namespace each.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

use super::leases::Subnet;
use banger_error::{Error, ErrorKind};

/// Prefix of every TAP banger makes (`bgtap<n>`), so leftovers can be told
/// from anyone else's devices.
pub const TAP_PREFIX: &str = "bgtap";

/// Prefix of a lone TAP (`bglone<…>`): one on no bridge and down, for a
/// guest whose NIC must lead nowhere (a template's).
pub const LONE_TAP_PREFIX: &str = "bglone";

fn nl(context: &str, e: rtnetlink::Error) -> Error {
    Error::failed(format!("{context}: {e}"))
}

/// A netlink connection in the calling thread's network namespace.
#[derive(Debug, Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Open the connection (its I/O task is spawned on the current runtime).
    pub fn connect() -> Result<Self, Error> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| Error::unavailable(format!("cannot open a netlink socket: {e}")))?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of interface `name`, if it exists.
    pub async fn index_of(&self, name: &str) -> Result<Option<u32>, Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(nl(&format!("cannot look up {name}"), e)),
        }
    }

    /// Names of every interface whose name starts with `prefix`.
    pub async fn names_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| nl("cannot list links", e))?
        {
            for attr in link.attributes {
                if let LinkAttribute::IfName(name) = attr
                    && name.starts_with(prefix)
                {
                    out.push(name);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// A host route that overlaps `subnet` and is not on `except` (the
    /// bridge itself), described for an error message.
    pub async fn route_clash(
        &self,
        subnet: &Subnet,
        except: Option<u32>,
    ) -> Result<Option<String>, Error> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let ours = subnet.net();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|e| nl("cannot list routes", e))?
        {
            let prefix = route.header.destination_prefix_length;
            // The default route overlaps everything; that is fine.
            if prefix == 0 {
                continue;
            }
            let mut dst = None;
            let mut oif = None;
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let Some(dst) = dst else { continue };
            if except.is_some() && oif == except {
                continue;
            }
            let Ok(theirs) = ipnet::Ipv4Net::new(dst, prefix) else {
                continue;
            };
            // Local/broadcast host routes of our own gateway live in the
            // local table with the bridge as oif; others are real clashes.
            if theirs.contains(&ours.network()) || ours.contains(&theirs.network()) {
                let dev = match oif {
                    Some(i) => self
                        .name_of(i)
                        .await
                        .unwrap_or_else(|| format!("ifindex {i}")),
                    None => "no device".to_owned(),
                };
                return Ok(Some(format!("{} via {dev}", theirs.trunc())));
            }
        }
        Ok(None)
    }

    /// The networks the host is directly attached to (main-table routes of
    /// link scope with no gateway), other than those on `except` (the
    /// bridge). NAT keeps guests out of them.
    pub async fn host_networks(&self, except: Option<u32>) -> Result<Vec<ipnet::Ipv4Net>, Error> {
        use rtnetlink::packet_route::route::{RouteHeader, RouteScope, RouteType};
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut nets = Vec::new();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|e| nl("cannot list routes", e))?
        {
            let h = &route.header;
            if h.destination_prefix_length == 0
                || h.scope != RouteScope::Link
                || h.kind != RouteType::Unicast
            {
                continue;
            }
            let mut table = u32::from(h.table);
            let (mut dst, mut oif, mut via) = (None, None, false);
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(_) => via = true,
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if table != u32::from(RouteHeader::RT_TABLE_MAIN)
                || via
                || (except.is_some() && oif == except)
            {
                continue;
            }
            if let Some(net) =
                dst.and_then(|d| ipnet::Ipv4Net::new(d, h.destination_prefix_length).ok())
            {
                nets.push(net.trunc());
            }
        }
        Ok(nets)
    }

    async fn name_of(&self, index: u32) -> Option<String> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links.try_next().await.ok()??;
        link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }

    /// Make sure bridge `name` exists, is up and has the subnet's gateway
    /// address. Refuses (InvalidArgument) when another route overlaps the
    /// subnet. Returns the bridge's index.
    pub async fn ensure_bridge(&self, name: &str, subnet: &Subnet) -> Result<u32, Error> {
        let existing = self.index_of(name).await?;
        if let Some(clash) = self.route_clash(subnet, existing).await? {
            return Err(Error::invalid(format!(
                "network.subnet {subnet} overlaps the host route {clash}; pick a free subnet in bangerd.toml"
            )));
        }
        let index = match existing {
            Some(i) => i,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).up().build())
                    .execute()
                    .await
                    .map_err(|e| nl(&format!("cannot create bridge {name}"), e))?;
                self.index_of(name).await?.ok_or_else(|| {
                    Error::failed(format!("bridge {name} vanished after creation"))
                })?
            }
        };
        let gateway = IpAddr::V4(subnet.gateway());
        let prefix = subnet.net().prefix_len();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut has = false;
        while let Some(a) = addrs
            .try_next()
            .await
            .map_err(|e| nl("cannot list addresses", e))?
        {
            let ip = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if ip == Some(gateway) && a.header.prefix_len == prefix {
                has = true;
            }
        }
        if !has {
            self.handle
                .address()
                .add(index, gateway, prefix)
                .execute()
                .await
                .map_err(|e| {
                    nl(
                        &format!("cannot give {name} the address {gateway}/{prefix}"),
                        e,
                    )
                })?;
        }
        self.set_up(index).await?;
        Ok(index)
    }

    async fn set_up(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl("cannot bring the link up", e))
    }

    /// Make the persistent TAP `name`, owned by `owner_uid`, attached to
    /// `bridge` and up; an existing TAP of that name is reused (its owner
    /// set anew).
    pub async fn create_tap(&self, name: &str, owner_uid: u32, bridge: u32) -> Result<u32, Error> {
        self.make_tap(name, owner_uid, Some(bridge)).await
    }

    /// Make the persistent TAP `name`, owned by `owner_uid`, on no bridge
    /// and down: a VMM can open it, and the kernel refuses what the guest
    /// sends through it (EIO), so the host never sees a frame. An
    /// existing TAP of that name is taken off its bridge and set down.
    pub async fn create_lone_tap(&self, name: &str, owner_uid: u32) -> Result<u32, Error> {
        self.make_tap(name, owner_uid, None).await
    }

    /// The persistent TAP `name`, owned by `owner_uid`: on `bridge` and
    /// up, or (`None`) on no bridge and down. Its index.
    async fn make_tap(
        &self,
        name: &str,
        owner_uid: u32,
        bridge: Option<u32>,
    ) -> Result<u32, Error> {
        let n = name.to_owned();
        tokio::task::block_in_place(|| tun::make_persistent_tap(&n, owner_uid))?;
        let index = self
            .index_of(name)
            .await?
            .ok_or_else(|| Error::failed(format!("TAP {name} vanished after creation")))?;
        let link = LinkUnspec::new_with_index(index);
        let (link, failed) = match bridge {
            Some(bridge) => (
                link.controller(bridge).up(),
                format!("cannot attach {name} to the bridge"),
            ),
            None => (
                link.nocontroller().down(),
                format!("cannot set {name} apart"),
            ),
        };
        self.handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(|e| nl(&failed, e))?;
        Ok(index)
    }

    /// Hand the existing TAP `name` (already attached and up) to
    /// `owner_uid`: one ioctl, no netlink round trip.
    pub fn set_tap_owner(&self, name: &str, owner_uid: u32) -> Result<(), Error> {
        tun::make_persistent_tap(name, owner_uid)
    }

    /// Delete interface `name`; absent is fine.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(());
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| nl(&format!("cannot delete {name}"), e))
    }

    /// The bridge `index`'s member interfaces' names.
    pub async fn bridge_members(&self, bridge: u32) -> Result<Vec<String>, Error> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| nl("cannot list links", e))?
        {
            let mut name = None;
            let mut controller = None;
            for attr in link.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Controller(c) => controller = Some(c),
                    _ => {}
                }
            }
            if controller == Some(bridge)
                && let Some(n) = name
            {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }
}

fn libc_enodev() -> i32 {
    nix::libc::ENODEV
}

/// A descriptor attached to the existing TAP `name` (a jailed VMM's
/// network, handed to it: `banger_vmm::jail`). Attaching one owned by
/// another uid takes `CAP_NET_ADMIN`.
pub fn attach_tap(name: &str) -> Result<std::os::fd::OwnedFd, Error> {
    tun::open_tap(name, "cannot attach TAP").map(Into::into)
}

/// The TUN/TAP ioctls.
mod tun {
    use super::*;

    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: nix::libc::c_ulong = 0x4004_54cb;
    const TUNSETOWNER: nix::libc::c_ulong = 0x4004_54cc;
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    const IFF_VNET_HDR: i16 = 0x4000;

    /// `struct ifreq` with the flags member of its union.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }

    fn ioctl(
        fd: i32,
        request: nix::libc::c_ulong,
        arg: nix::libc::c_ulong,
        what: &str,
    ) -> Result<(), Error> {
        // SAFETY: `fd` is an open /dev/net/tun descriptor and `arg` is
        // either an integer or the address of a live, correctly sized
        // `IfReq`, as each of these requests expects.
        let rc = unsafe { nix::libc::ioctl(fd, request, arg) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            let kind = if e.raw_os_error() == Some(nix::libc::EPERM) {
                ErrorKind::PermissionDenied
            } else {
                ErrorKind::Failed
            };
            return Err(Error::new(kind, format!("{what}: {e}")));
        }
        Ok(())
    }

    /// `/dev/net/tun` attached to the TAP `name` (made when it does not
    /// exist), as QEMU asks for its own: `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`. `what` says what failed.
    pub fn open_tap(name: &str, what: &str) -> Result<std::fs::File, Error> {
        if name.is_empty() || name.len() > 15 {
            return Err(Error::invalid(format!("{name:?} is not an interface name")));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot open /dev/net/tun: {e}; load the tun module"
                ))
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ioctl(
            file.as_raw_fd(),
            TUNSETIFF,
            &mut req as *mut IfReq as nix::libc::c_ulong,
            &format!("{what} {name}"),
        )?;
        Ok(file)
    }

    pub fn make_persistent_tap(name: &str, owner: u32) -> Result<(), Error> {
        let file = open_tap(name, "cannot create TAP")?;
        let fd = file.as_raw_fd();
        ioctl(
            fd,
            TUNSETOWNER,
            nix::libc::c_ulong::from(owner),
            &format!("cannot give TAP {name} to uid {owner}"),
        )?;
        ioctl(
            fd,
            TUNSETPERSIST,
            1,
            &format!("cannot make TAP {name} persistent"),
        )?;
        Ok(())
    }
}
