//! The `.vm` DNS server: an authoritative `vm.` zone (A records for VM
//! names, PTR records for the subnet) served with hickory-server, and a
//! forwarder for every other name to the host's real upstream resolvers
//! (never a local stub such as systemd-resolved's 127.0.0.53, which would
//! loop back or be unreachable from guests).
//!
//! Records change live: [`VmZone::set`] and [`VmZone::remove`] edit the
//! in-memory zones the running server answers from. Sockets are passed in
//! (bound here or handed over by systemd socket activation).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hickory_proto::rr::rdata::{A, NS, PTR, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_resolver::config::NameServerConfig;
use hickory_server::Server;
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};

use super::leases::Subnet;
use banger_error::Error;

/// TTL of VM records: short, VMs come and go.
const TTL: u32 = 5;

/// The zone every VM name lives in.
pub const ZONE: &str = "vm.";

/// The `vm.` zone and the subnet's reverse zone, editable while served.
#[derive(Clone)]
pub struct VmZone {
    forward: Arc<InMemoryZoneHandler>,
    reverse: Arc<InMemoryZoneHandler>,
    forward_origin: Name,
    reverse_origin: Name,
    serial: Arc<AtomicU32>,
}

impl std::fmt::Debug for VmZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmZone")
            .field("forward", &self.forward_origin.to_string())
            .field("reverse", &self.reverse_origin.to_string())
            .finish()
    }
}

fn name(text: &str) -> Result<Name, Error> {
    Name::from_ascii(text).map_err(|e| Error::invalid(format!("{text:?} is not a DNS name: {e}")))
}

/// The reverse zone of a subnet: whole octets only (a /24 gives
/// `42.213.10.in-addr.arpa.`, a /20 the enclosing /16's zone).
fn reverse_origin(subnet: &Subnet) -> Result<Name, Error> {
    let o = subnet.net().network().octets();
    let whole = usize::from(subnet.net().prefix_len() / 8);
    let labels: Vec<String> = o[..whole].iter().rev().map(u8::to_string).collect();
    name(&format!("{}.in-addr.arpa.", labels.join(".")))
}

fn zone(origin: &Name, serial: u32) -> Result<InMemoryZoneHandler, Error> {
    let ns = name("ns.vm.")?;
    let soa = SOA::new(
        ns.clone(),
        name("hostmaster.vm.")?,
        serial,
        60,
        30,
        3600,
        TTL,
    );
    let mut records = BTreeMap::new();
    let mut soa_set = hickory_proto::rr::RecordSet::new(origin.clone(), RecordType::SOA, serial);
    soa_set.insert(
        Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)),
        serial,
    );
    records.insert(RrKey::new(LowerName::new(origin), RecordType::SOA), soa_set);
    let mut ns_set = hickory_proto::rr::RecordSet::new(origin.clone(), RecordType::NS, serial);
    ns_set.insert(
        Record::from_rdata(origin.clone(), TTL, RData::NS(NS(ns))),
        serial,
    );
    records.insert(RrKey::new(LowerName::new(origin), RecordType::NS), ns_set);
    InMemoryZoneHandler::new(origin.clone(), records, ZoneType::Primary, AxfrPolicy::Deny)
        .map_err(|e| Error::failed(format!("cannot build the {origin} zone: {e}")))
}

impl VmZone {
    /// Empty zones for `subnet`.
    pub fn new(subnet: &Subnet) -> Result<Self, Error> {
        let forward_origin = name(ZONE)?;
        let reverse_origin = reverse_origin(subnet)?;
        Ok(Self {
            forward: Arc::new(zone(&forward_origin, 1)?),
            reverse: Arc::new(zone(&reverse_origin, 1)?),
            forward_origin,
            reverse_origin,
            serial: Arc::new(AtomicU32::new(1)),
        })
    }

    fn next_serial(&self) -> u32 {
        self.serial.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn host(&self, vm: &str) -> Result<Name, Error> {
        name(&format!("{vm}.{ZONE}"))
    }

    /// `vm.vm.` answers `ip`, and `ip`'s PTR answers `vm.vm.`; any earlier
    /// address of `vm` is forgotten.
    pub async fn set(&self, vm: &str, ip: Ipv4Addr) -> Result<(), Error> {
        self.remove(vm).await?;
        let host = self.host(vm)?;
        let serial = self.next_serial();
        let a = Record::from_rdata(host.clone(), TTL, RData::A(A(ip)));
        let ptr = Record::from_rdata(Name::from(ip), TTL, RData::PTR(PTR(host)));
        let ok = self.forward.upsert(a, serial).await;
        let ok = ok
            && (!self.reverse_origin.zone_of(&Name::from(ip))
                || self.reverse.upsert(ptr, serial).await);
        if ok {
            Ok(())
        } else {
            Err(Error::failed(format!("cannot add DNS records for {vm}")))
        }
    }

    /// Forget `vm`'s records (and the PTR of its address).
    pub async fn remove(&self, vm: &str) -> Result<(), Error> {
        let host = self.host(vm)?;
        let key = RrKey::new(LowerName::new(&host), RecordType::A);
        let old = self.forward.records_mut().await.remove(&key);
        if let Some(set) = old {
            for record in set.records_without_rrsigs() {
                if let RData::A(A(ip)) = record.data {
                    let key = RrKey::new(LowerName::new(&Name::from(ip)), RecordType::PTR);
                    self.reverse.records_mut().await.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// The address `vm` answers with, if any (for tests and doctor).
    pub async fn lookup(&self, vm: &str) -> Option<Ipv4Addr> {
        let key = RrKey::new(LowerName::new(&self.host(vm).ok()?), RecordType::A);
        let records = self.forward.records().await;
        let set = records.get(&key)?;
        set.records_without_rrsigs().find_map(|r| match r.data {
            RData::A(A(ip)) => Some(ip),
            _ => None,
        })
    }
}

/// The host's real upstream resolvers: systemd-resolved's list of
/// upstream servers when it runs (`resolved` is usually
/// /run/systemd/resolve/resolv.conf), else `resolv_conf`; loopback stubs
/// are skipped in both.
pub fn upstream_resolvers(resolved: &Path, resolv_conf: &Path) -> Vec<IpAddr> {
    for file in [resolved, resolv_conf] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let found: Vec<IpAddr> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// Everything the server answers: the `vm.` zone, its reverse zone, and
/// (when there are upstreams, normally port 53 of [`upstream_resolvers`])
/// a forwarder for the rest.
pub fn catalog(zone: &VmZone, upstreams: &[std::net::SocketAddr]) -> Result<Catalog, Error> {
    let mut catalog = Catalog::new();
    catalog.upsert(
        LowerName::new(&zone.forward_origin),
        vec![zone.forward.clone() as Arc<dyn ZoneHandler>],
    );
    catalog.upsert(
        LowerName::new(&zone.reverse_origin),
        vec![zone.reverse.clone() as Arc<dyn ZoneHandler>],
    );
    if !upstreams.is_empty() {
        let config = ForwardConfig {
            name_servers: upstreams
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut ns.connections {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect(),
            options: None,
        };
        let forwarder = ForwardZoneHandler::builder_tokio(config)
            .build()
            .map_err(|e| Error::failed(format!("cannot set up DNS forwarding: {e}")))?;
        catalog.upsert(
            LowerName::new(&Name::root()),
            vec![Arc::new(forwarder) as Arc<dyn ZoneHandler>],
        );
    }
    Ok(catalog)
}

/// Bind UDP and TCP on `addr` and serve the `.vm` zone for `subnet` there,
/// forwarding other names to the host's upstream resolvers. With port 0
/// both sockets share one free port. Returns the server, its zone and the
/// address it listens on.
pub async fn start(
    addr: std::net::SocketAddr,
    subnet: &Subnet,
) -> Result<(DnsServer, VmZone, std::net::SocketAddr), Error> {
    let bind_err = |e: std::io::Error| {
        Error::unavailable(format!(
            "cannot listen on {addr} for .vm DNS: {e}; free the port or set network.dns_listen"
        ))
    };
    let (udp, tcp, bound) = loop {
        let udp = tokio::net::UdpSocket::bind(addr).await.map_err(bind_err)?;
        let bound = udp.local_addr().map_err(bind_err)?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => break (udp, tcp, bound),
            // An ephemeral UDP port whose TCP twin is taken: try another.
            Err(_) if addr.port() == 0 => continue,
            Err(e) => return Err(bind_err(e)),
        }
    };
    let (server, zone) = serve_on(vec![udp], vec![tcp], subnet)?;
    Ok((server, zone, bound))
}

/// Serve the `.vm` zone for `subnet` on sockets bound elsewhere (e.g. by
/// systemd), forwarding other names to the host's upstream resolvers.
pub fn serve_on(
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
    subnet: &Subnet,
) -> Result<(DnsServer, VmZone), Error> {
    let zone = VmZone::new(subnet)?;
    let server = serve_zone(&zone, udp, tcp)?;
    Ok((server, zone))
}

/// Serve an existing `zone` on more sockets (e.g. the bridge gateway for
/// guests), forwarding other names to the host's upstream resolvers.
pub fn serve_zone(
    zone: &VmZone,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
) -> Result<DnsServer, Error> {
    let upstreams: Vec<std::net::SocketAddr> = upstream_resolvers(
        Path::new("/run/systemd/resolve/resolv.conf"),
        Path::new("/etc/resolv.conf"),
    )
    .into_iter()
    .map(|ip| std::net::SocketAddr::new(ip, 53))
    .collect();
    Ok(DnsServer::serve(catalog(zone, &upstreams)?, udp, tcp))
}

/// A running DNS server.
pub struct DnsServer {
    server: Server<Catalog>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsServer")
    }
}

impl DnsServer {
    /// Serve `catalog` on the given sockets (UDP and TCP on the same
    /// addresses, normally).
    pub fn serve(
        catalog: Catalog,
        udp: Vec<tokio::net::UdpSocket>,
        tcp: Vec<tokio::net::TcpListener>,
    ) -> Self {
        let mut server = Server::new(catalog);
        for s in udp {
            server.register_socket(s);
        }
        for l in tcp {
            server.register_listener(l, Duration::from_secs(5), 64);
        }
        Self { server }
    }

    /// Stop serving.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_zones() {
        let z = |s| {
            reverse_origin(&Subnet::parse(s).expect("subnet"))
                .expect("name")
                .to_string()
        };
        assert_eq!(z("10.213.42.0/24"), "42.213.10.in-addr.arpa.");
        assert_eq!(z("10.50.0.0/16"), "50.10.in-addr.arpa.");
        assert_eq!(z("10.50.16.0/20"), "50.10.in-addr.arpa.");
    }

    #[test]
    fn upstreams_skip_stubs_and_prefer_resolved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolved = dir.path().join("resolved.conf");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.53\nsearch lan\n").expect("write");
        assert!(upstream_resolvers(&resolved, &resolv).is_empty());
        std::fs::write(
            &resolv,
            "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\n",
        )
        .expect("write");
        assert_eq!(
            upstream_resolvers(&resolved, &resolv),
            vec![
                "192.0.2.1".parse::<IpAddr>().expect("ip"),
                "fe80::1".parse().expect("ip")
            ]
        );
        std::fs::write(&resolved, "nameserver 198.51.100.7\n").expect("write");
        assert_eq!(
            upstream_resolvers(&resolved, &resolv),
            vec!["198.51.100.7".parse::<IpAddr>().expect("ip")]
        );
    }

    #[tokio::test]
    async fn records_change_live() {
        let zone = VmZone::new(&Subnet::parse("10.213.42.0/24").expect("subnet")).expect("zone");
        zone.set("box", Ipv4Addr::new(10, 213, 42, 2))
            .await
            .expect("set");
        assert_eq!(
            zone.lookup("box").await,
            Some(Ipv4Addr::new(10, 213, 42, 2))
        );
        zone.set("box", Ipv4Addr::new(10, 213, 42, 3))
            .await
            .expect("move");
        assert_eq!(
            zone.lookup("box").await,
            Some(Ipv4Addr::new(10, 213, 42, 3))
        );
        zone.remove("box").await.expect("remove");
        assert_eq!(zone.lookup("box").await, None);
        assert!(zone.set("bad name", Ipv4Addr::LOCALHOST).await.is_err());
    }
}
