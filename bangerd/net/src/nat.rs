//! NAT for VMs, in banger's own nftables table `inet banger` and nowhere
//! else: never a flush of, or an edit to, anyone else's tables.
//!
//! The table holds a set `nat_vms` of VM addresses with NAT on, a
//! postrouting chain that masquerades their traffic leaving by any
//! interface but the bridge, and a forward chain that lets them out, lets
//! replies back in, and drops other forwarded traffic to or from the bridge
//! (a VM without NAT reaches the host and other VMs, not the world).
//!
//! [`Nat::apply`] replaces the whole table in one nft transaction from the
//! desired list of addresses, so it is also the reconciliation after a
//! restart: rules of deleted VMs vanish, missing ones come back.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nftables::schema::Nftables;
use serde_json::{Value, json};

use banger_error::Error;

/// The table's name (family `inet`).
pub const TABLE: &str = "banger";

/// The NAT setup for one bridge.
#[derive(Debug, Clone)]
pub struct Nat {
    bridge: String,
    nft: PathBuf,
    ip_forward: PathBuf,
}

fn rule(chain: &str, expr: Value) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}})
}

fn meta(key: &str, op: &str, value: &str) -> Value {
    json!({"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}})
}

impl Nat {
    /// NAT for VMs on `bridge`, using the `nft` on PATH.
    pub fn new(bridge: &str) -> Self {
        Self {
            bridge: bridge.to_owned(),
            nft: PathBuf::from("nft"),
            ip_forward: PathBuf::from("/proc/sys/net/ipv4/ip_forward"),
        }
    }

    /// The nft JSON document that makes the table hold exactly `vms`.
    pub fn document(&self, vms: &[Ipv4Addr]) -> Value {
        let b = self.bridge.as_str();
        let mut cmds = vec![
            // add + delete: drop the old table whether or not it exists.
            json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
            json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
            json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
            json!({"add": {"set": {"family": "inet", "table": TABLE, "name": "nat_vms", "type": "ipv4_addr"}}}),
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "postrouting",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
            rule(
                "forward",
                json!([
                    meta("oifname", "==", b),
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                    {"accept": null}
                ]),
            ),
            rule(
                "forward",
                json!([
                    meta("iifname", "==", b),
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@nat_vms"}},
                    {"accept": null}
                ]),
            ),
            rule("forward", json!([meta("iifname", "==", b), {"drop": null}])),
            rule("forward", json!([meta("oifname", "==", b), {"drop": null}])),
            rule(
                "postrouting",
                json!([
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@nat_vms"}},
                    meta("oifname", "!=", b),
                    {"masquerade": null}
                ]),
            ),
        ];
        if !vms.is_empty() {
            let elems: Vec<String> = vms.iter().map(ToString::to_string).collect();
            cmds.push(json!({"add": {"element": {"family": "inet", "table": TABLE, "name": "nat_vms", "elem": elems}}}));
        }
        json!({"nftables": cmds})
    }

    /// Make the table hold exactly `vms` (one atomic nft transaction) and
    /// switch IPv4 forwarding on when any VM has NAT. Forwarding is never
    /// switched off again: other software may rely on it.
    pub async fn apply(&self, vms: &[Ipv4Addr]) -> Result<(), Error> {
        let doc: Nftables = serde_json::from_value(self.document(vms))
            .map_err(|e| Error::failed(format!("bad nftables document: {e}")))?;
        nftables::helper::apply_ruleset_with_args_async(
            &doc,
            Some(self.nft.as_os_str()),
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(|e| Error::failed(format!("cannot apply banger's nftables table: {e}")))?;
        if !vms.is_empty() {
            enable_forwarding(&self.ip_forward)?;
        }
        Ok(())
    }

    /// Remove the table (networking torn down, or uninstall).
    pub async fn remove(&self) -> Result<(), Error> {
        let doc: Nftables = serde_json::from_value(json!({"nftables": [
            {"add": {"table": {"family": "inet", "name": TABLE}}},
            {"delete": {"table": {"family": "inet", "name": TABLE}}}
        ]}))
        .map_err(|e| Error::failed(format!("bad nftables document: {e}")))?;
        nftables::helper::apply_ruleset_with_args_async(
            &doc,
            Some(self.nft.as_os_str()),
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(|e| Error::failed(format!("cannot remove banger's nftables table: {e}")))
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

    #[test]
    fn the_document_parses_as_nftables_and_names_only_our_table() {
        let nat = Nat::new("banger0");
        let doc = nat.document(&[Ipv4Addr::new(10, 213, 42, 2)]);
        let parsed: Nftables = serde_json::from_value(doc.clone()).expect("schema");
        assert!(!parsed.objects.is_empty());
        let text = doc.to_string();
        assert!(text.contains("\"elem\":[\"10.213.42.2\"]"), "{text}");
        // Every command addresses table inet banger.
        for cmd in doc["nftables"].as_array().expect("array") {
            let body = cmd
                .as_object()
                .and_then(|o| o.values().next())
                .expect("cmd");
            let obj = body
                .as_object()
                .and_then(|o| o.values().next())
                .expect("object");
            let table = obj
                .get("table")
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str);
            assert_eq!(
                obj.get("family").and_then(Value::as_str),
                Some("inet"),
                "{cmd}"
            );
            assert!(table == Some(TABLE) || obj.get("table").is_some(), "{cmd}");
        }
        assert!(!nat.document(&[]).to_string().contains("element"));
    }
}
