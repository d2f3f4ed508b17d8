//! The guests' firewall and NAT, in banger's own nftables tables (`bridge
//! banger` and `inet banger`) and nowhere else: never a flush of, or an
//! edit to, anyone else's tables.
//!
//! - `bridge banger` polices what enters the bridge from a guest's port
//!   (every port banger makes is a `bgtap*` device): a frame passes only
//!   with its VM's MAC and IPv4 as source on its own TAP (ARP included),
//!   only as IPv4 or ARP (no IPv6, so no router advertisements or
//!   neighbour tricks), and never as a DHCP server's reply. Frames from one
//!   guest's port to another's are dropped unless guests may talk.
//! - `inet banger` lets guests reach the host only on the gateway's DNS
//!   (plus any `host_ports`) and as replies to what the host started; lets
//!   VMs with NAT out, masqueraded, except to link-local addresses and the
//!   host's own directly attached networks (unless listed in `nat_allow`);
//!   and drops other forwarded traffic to or from the bridge.
//!
//! [`Firewall::apply`] replaces both tables in one nft transaction from the
//! whole desired state, so it is also the reconciliation after a restart:
//! elements of deleted VMs vanish, missing ones come back. A guest with no
//! element gets nowhere: the firewall fails closed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nftables::schema::Nftables;
use serde_json::{Value, json};

use super::leases::mac_for;
use super::link::TAP_PREFIX;
use banger_error::Error;

/// The tables' name (families `inet` and `bridge`).
pub const TABLE: &str = "banger";

/// What guests may do, from `[network]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The bridge the guests' TAPs join.
    pub bridge: String,
    /// The bridge's address: the guests' gateway and DNS server.
    pub gateway: Ipv4Addr,
    /// Whether guests may reach each other.
    pub guest_to_guest: bool,
    /// Host ports (TCP and UDP, on the gateway) guests may reach besides
    /// DNS.
    pub host_ports: Vec<u16>,
    /// Networks VMs with NAT may reach although the host is attached to
    /// them (or they are link-local).
    pub nat_allow: Vec<Ipv4Net>,
}

impl Policy {
    /// The default policy on `bridge` with gateway `gateway`: guests
    /// isolated, DNS only, no exceptions.
    pub fn isolated(bridge: &str, gateway: Ipv4Addr) -> Self {
        Self {
            bridge: bridge.to_owned(),
            gateway,
            guest_to_guest: false,
            host_ports: Vec::new(),
            nat_allow: Vec::new(),
        }
    }
}

/// One guest on the bridge: its TAP and its address (its MAC follows from
/// the address, [`mac_for`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Guest {
    /// The TAP (bridge port) the guest's frames arrive on.
    pub tap: String,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
}

/// The link-local network, never reached through NAT unless allowed
/// (cloud metadata services live there).
pub const LINK_LOCAL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("169.254.0.0/16"),
};

/// The guests' firewall for one bridge.
#[derive(Debug, Clone)]
pub struct Firewall {
    policy: Policy,
    nft: PathBuf,
    ip_forward: PathBuf,
}

fn add(family: &str, what: &str, body: Value) -> Value {
    let mut body = body;
    body["family"] = json!(family);
    json!({"add": {what: body}})
}

/// Commands that drop both tables whether or not they exist (add, then
/// delete).
fn drop_tables() -> Vec<Value> {
    ["inet", "bridge"]
        .into_iter()
        .flat_map(|family| {
            [
                add(family, "table", json!({"name": TABLE})),
                json!({"delete": {"table": {"family": family, "name": TABLE}}}),
            ]
        })
        .collect()
}

/// Elements `elems` into set `name` of our table of `family`.
fn elements(family: &str, name: &str, elems: Value) -> Value {
    add(
        family,
        "element",
        json!({"table": TABLE, "name": name, "elem": elems}),
    )
}

fn rule(family: &str, chain: &str, expr: Value) -> Value {
    add(
        family,
        "rule",
        json!({"table": TABLE, "chain": chain, "expr": expr}),
    )
}

/// A set in our table of `family`; `interval` for one of networks.
fn set(family: &str, name: &str, kind: Value, interval: bool) -> Value {
    let mut body = json!({"table": TABLE, "name": name, "type": kind});
    if interval {
        body["flags"] = json!(["interval"]);
    }
    add(family, "set", body)
}

/// A base chain of `kind` on the hook of the same name, accepting what its
/// rules do not decide.
fn chain(family: &str, hook: &str, kind: &str, prio: i32) -> Value {
    add(
        family,
        "chain",
        json!({"table": TABLE, "name": hook, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}),
    )
}

fn meta(key: &str, op: &str, value: &str) -> Value {
    json!({"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}})
}

fn field(protocol: &str, name: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": name}})
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn prefixes(nets: &[Ipv4Net]) -> Vec<Value> {
    Ipv4Net::aggregate(&nets.to_vec())
        .into_iter()
        .map(|n| json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}}))
        .collect()
}

impl Firewall {
    /// The firewall for `policy`, using the `nft` on PATH.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            nft: PathBuf::from("nft"),
            ip_forward: PathBuf::from("/proc/sys/net/ipv4/ip_forward"),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The nft JSON document that makes both tables hold exactly `guests`,
    /// `nat` (addresses with NAT on) and `peers` (addresses that may talk
    /// with each other), with `host_networks` (the host's directly
    /// attached networks) closed to NAT.
    pub fn document(
        &self,
        guests: &[Guest],
        nat: &[Ipv4Addr],
        peers: &[Ipv4Addr],
        host_networks: &[Ipv4Net],
    ) -> Value {
        let p = &self.policy;
        let b = p.bridge.as_str();
        let taps = format!("{TAP_PREFIX}*");
        let mut cmds = drop_tables();
        for family in ["inet", "bridge"] {
            cmds.push(add(family, "table", json!({"name": TABLE})));
        }

        // bridge: what a guest's port may send.
        let br = "bridge";
        cmds.extend([
            set(
                br,
                "guests",
                json!(["ifname", "ether_addr", "ipv4_addr"]),
                false,
            ),
            set(br, "peer_ports", json!("ifname"), false),
            chain(br, "prerouting", "filter", -200),
            chain(br, "forward", "filter", 0),
        ]);
        let port_is =
            |mac: Value, ip: Value| json!({"concat": [{"meta": {"key": "iifname"}}, mac, ip]});
        cmds.extend([
            rule(br, "prerouting", json!([meta("iifname", "!=", &taps), {"accept": null}])),
            rule(br, "prerouting", json!([
                matches(port_is(field("ether", "saddr"), field("arp", "saddr ip")), json!("@guests")),
                matches(port_is(field("arp", "saddr ether"), field("arp", "saddr ip")), json!("@guests")),
                {"accept": null}
            ])),
            rule(br, "prerouting", json!([matches(field("udp", "sport"), json!(67)), {"drop": null}])),
            rule(br, "prerouting", json!([
                matches(port_is(field("ether", "saddr"), field("ip", "saddr")), json!("@guests")),
                {"accept": null}
            ])),
            rule(br, "prerouting", json!([{"drop": null}])),
        ]);
        if !p.guest_to_guest {
            // Guests with the peers switch on reach each other (ARP
            // included), and no one else.
            cmds.push(rule(
                br,
                "forward",
                json!([
                    matches(json!({"meta": {"key": "iifname"}}), json!("@peer_ports")),
                    matches(json!({"meta": {"key": "oifname"}}), json!("@peer_ports")),
                    {"accept": null}
                ]),
            ));
            cmds.push(rule(
                br,
                "forward",
                json!([
                    meta("iifname", "==", &taps), meta("oifname", "==", &taps), {"drop": null}
                ]),
            ));
        }
        if !guests.is_empty() {
            let elems: Vec<Value> = guests
                .iter()
                .map(|g| json!({"concat": [g.tap, mac_for(g.ipv4), g.ipv4.to_string()]}))
                .collect();
            cmds.push(elements(br, "guests", json!(elems)));
            let ports: Vec<&str> = guests
                .iter()
                .filter(|g| peers.contains(&g.ipv4))
                .map(|g| g.tap.as_str())
                .collect();
            if !ports.is_empty() {
                cmds.push(elements(br, "peer_ports", json!(ports)));
            }
        }

        // inet: the host, and NAT.
        let inet = "inet";
        cmds.extend([
            set(inet, "nat_vms", json!("ipv4_addr"), false),
            set(inet, "peers", json!("ipv4_addr"), false),
            set(inet, "nat_allow", json!("ipv4_addr"), true),
            set(inet, "nat_block", json!("ipv4_addr"), true),
            set(inet, "host_ports", json!("inet_service"), false),
            chain(inet, "input", "filter", 0),
            chain(inet, "forward", "filter", 0),
            chain(inet, "postrouting", "nat", 100),
        ]);
        let established = json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
            "right": ["established", "related"]}});
        let from_nat = matches(field("ip", "saddr"), json!("@nat_vms"));
        cmds.extend([
            rule(
                inet,
                "input",
                json!([meta("iifname", "==", b), established, {"accept": null}]),
            ),
            rule(
                inet,
                "input",
                json!([
                    meta("iifname", "==", b),
                    matches(field("ip", "daddr"), json!(p.gateway.to_string())),
                    matches(json!({"meta": {"key": "l4proto"}}), json!({"set": ["tcp", "udp"]})),
                    matches(field("th", "dport"), json!("@host_ports")),
                    {"accept": null}
                ]),
            ),
            rule(
                inet,
                "input",
                json!([meta("iifname", "==", b), {"drop": null}]),
            ),
            // Routed between guests (when bridged traffic is seen here):
            // peers to peers only, as on the bridge.
            rule(
                inet,
                "forward",
                json!([
                    meta("iifname", "==", b),
                    meta("oifname", "==", b),
                    matches(field("ip", "saddr"), json!("@peers")),
                    matches(field("ip", "daddr"), json!("@peers")),
                    {"accept": null}
                ]),
            ),
            rule(
                inet,
                "forward",
                json!([
                    meta("iifname", "==", b),
                    meta("oifname", "==", b),
                    if p.guest_to_guest {
                        json!({"accept": null})
                    } else {
                        json!({"drop": null})
                    }
                ]),
            ),
            rule(
                inet,
                "forward",
                json!([meta("oifname", "==", b), established, {"accept": null}]),
            ),
            rule(
                inet,
                "forward",
                json!([
                    meta("iifname", "==", b), from_nat,
                    matches(field("ip", "daddr"), json!("@nat_allow")), {"accept": null}
                ]),
            ),
            rule(
                inet,
                "forward",
                json!([
                    meta("iifname", "==", b),
                    matches(field("ip", "daddr"), json!("@nat_block")), {"drop": null}
                ]),
            ),
            rule(
                inet,
                "forward",
                json!([meta("iifname", "==", b), from_nat, {"accept": null}]),
            ),
            rule(
                inet,
                "forward",
                json!([meta("iifname", "==", b), {"drop": null}]),
            ),
            rule(
                inet,
                "forward",
                json!([meta("oifname", "==", b), {"drop": null}]),
            ),
            rule(
                inet,
                "postrouting",
                json!([from_nat, meta("oifname", "!=", b), {"masquerade": null}]),
            ),
        ]);
        let mut ports: Vec<u16> = vec![53];
        ports.extend(&p.host_ports);
        ports.sort_unstable();
        ports.dedup();
        cmds.push(elements(inet, "host_ports", json!(ports)));
        let mut block = vec![LINK_LOCAL];
        block.extend(host_networks);
        cmds.push(elements(inet, "nat_block", json!(prefixes(&block))));
        if !p.nat_allow.is_empty() {
            cmds.push(elements(inet, "nat_allow", json!(prefixes(&p.nat_allow))));
        }
        if !nat.is_empty() {
            let elems: Vec<String> = nat.iter().map(ToString::to_string).collect();
            cmds.push(elements(inet, "nat_vms", json!(elems)));
        }
        if !peers.is_empty() {
            let elems: Vec<String> = peers.iter().map(ToString::to_string).collect();
            cmds.push(elements(inet, "peers", json!(elems)));
        }
        json!({"nftables": cmds})
    }

    /// Make both tables hold exactly `guests`, `nat` and `peers` (one
    /// atomic nft transaction) and switch IPv4 forwarding on when any VM
    /// has NAT. Forwarding is never switched off again: other software
    /// may rely on it.
    pub async fn apply(
        &self,
        guests: &[Guest],
        nat: &[Ipv4Addr],
        peers: &[Ipv4Addr],
        host_networks: &[Ipv4Net],
    ) -> Result<(), Error> {
        self.run(self.document(guests, nat, peers, host_networks), "apply")
            .await?;
        if !nat.is_empty() {
            enable_forwarding(&self.ip_forward)?;
        }
        Ok(())
    }

    /// Remove both tables (networking torn down, or uninstall).
    pub async fn remove(&self) -> Result<(), Error> {
        self.run(json!({ "nftables": drop_tables() }), "remove")
            .await
    }

    /// Run the nft JSON document `doc` in one transaction; `verb` says
    /// what it does, for the error.
    async fn run(&self, doc: Value, verb: &str) -> Result<(), Error> {
        let doc: Nftables = serde_json::from_value(doc)
            .map_err(|e| Error::failed(format!("bad nftables document: {e}")))?;
        nftables::helper::apply_ruleset_with_args_async(
            &doc,
            Some(self.nft.as_os_str()),
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(|e| Error::failed(format!("cannot {verb} banger's nftables tables: {e}")))
    }
}

fn enable_forwarding(path: &Path) -> Result<(), Error> {
    let on = std::fs::read_to_string(path)
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    if !on {
        std::fs::write(path, "1\n").map_err(|e| {
            Error::failed(format!(
                "cannot switch on IPv4 forwarding ({}): {e}",
                path.display()
            ))
        })?;
        tracing::info!("switched on IPv4 forwarding for VM NAT");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn the_document_parses_as_nftables_and_names_only_our_tables() {
        let mut policy = Policy::isolated("banger0", Ipv4Addr::new(10, 213, 42, 1));
        policy.host_ports = vec![8080, 53];
        policy.nat_allow = vec![net("192.168.1.0/24")];
        let fw = Firewall::new(policy);
        let guests = [
            Guest {
                tap: "bgtap0".into(),
                ipv4: Ipv4Addr::new(10, 213, 42, 2),
            },
            Guest {
                tap: "bgtap1".into(),
                ipv4: Ipv4Addr::new(10, 213, 42, 3),
            },
        ];
        let doc = fw.document(
            &guests,
            &[Ipv4Addr::new(10, 213, 42, 2)],
            &[Ipv4Addr::new(10, 213, 42, 3)],
            &[
                net("192.168.1.0/24"),
                net("169.254.0.0/16"),
                net("169.254.3.0/24"),
            ],
        );
        let parsed: Nftables = serde_json::from_value(doc.clone()).expect("schema");
        assert!(!parsed.objects.is_empty());
        let text = doc.to_string();
        assert!(text.contains("\"elem\":[\"10.213.42.2\"]"), "{text}");
        assert!(
            text.contains(r#"{"concat":["bgtap0","0a:b6:0a:d5:2a:02","10.213.42.2"]}"#),
            "{text}"
        );
        assert!(text.contains(r#""elem":[53,8080]"#), "{text}");
        // The peers: by port on the bridge, by address in inet.
        assert!(
            text.contains(r#""elem":["bgtap1"],"family":"bridge","name":"peer_ports""#),
            "{text}"
        );
        assert!(
            text.contains(r#""elem":["10.213.42.3"],"family":"inet","name":"peers""#),
            "{text}"
        );
        // Overlapping networks are merged (nft refuses overlaps).
        assert!(
            text.contains(r#"{"prefix":{"addr":"169.254.0.0","len":16}}"#),
            "{text}"
        );
        assert!(!text.contains("169.254.3.0"), "{text}");
        // Every command addresses a table named banger, inet or bridge.
        for cmd in doc["nftables"].as_array().expect("array") {
            let body = cmd
                .as_object()
                .and_then(|o| o.values().next())
                .expect("cmd");
            let obj = body
                .as_object()
                .and_then(|o| o.values().next())
                .expect("object");
            let family = obj.get("family").and_then(Value::as_str);
            assert!(matches!(family, Some("inet" | "bridge")), "{cmd}");
            let table = obj
                .get("table")
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str);
            assert!(table == Some(TABLE) || obj.get("table").is_some(), "{cmd}");
        }
        // Guest-to-guest drops appear only when guests are kept apart.
        let bridge_forward = |doc: &Value| {
            doc["nftables"]
                .as_array()
                .expect("array")
                .iter()
                .filter(|c| {
                    let r = &c["add"]["rule"];
                    r["family"] == "bridge" && r["chain"] == "forward"
                })
                .count()
        };
        assert_eq!(
            bridge_forward(&doc),
            2,
            "peers accepted, other guests dropped"
        );
        let mut open = fw.policy().clone();
        open.guest_to_guest = true;
        let doc = Firewall::new(open).document(&[], &[], &[], &[]);
        assert_eq!(bridge_forward(&doc), 0);
        let text = doc.to_string();
        assert!(!text.contains("nat_vms\",\"elem"), "{text}");
    }
}
