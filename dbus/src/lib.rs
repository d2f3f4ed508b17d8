//! `banger-dbus`: everything both sides of banger's D-Bus API agree on.
//!
//! This is the only crate that defines wire names and wire types. The daemon's
//! core logic never uses these types directly; its D-Bus front end converts at
//! the edge. Clients (the `banger` CLI, tests) use the proxies in [`proxy`].

pub mod error;
pub mod names;
pub mod options;
pub mod proxy;
pub mod types;

pub use error::{Error, Reply};
pub use names::*;
pub use types::*;

/// The interface XML files checked in under `dbus/interfaces/`, keyed by
/// interface name. The daemon's test suite compares what it serves with these.
pub const INTERFACE_XML: &[(&str, &str)] = &[
    (
        names::MANAGER_INTERFACE,
        include_str!("../interfaces/org.banger.Manager.xml"),
    ),
    (
        names::JOB_INTERFACE,
        include_str!("../interfaces/org.banger.Job.xml"),
    ),
    (
        names::KERNEL_INTERFACE,
        include_str!("../interfaces/org.banger.Kernel.xml"),
    ),
    (
        names::IMAGE_INTERFACE,
        include_str!("../interfaces/org.banger.Image.xml"),
    ),
    (
        names::VM_INTERFACE,
        include_str!("../interfaces/org.banger.VM.xml"),
    ),
];

/// The bus policy file installed to `/usr/share/dbus-1/system.d/`.
pub const BUS_POLICY: &str = include_str!("../org.banger.Manager.conf");

/// The D-Bus activation file installed to `/usr/share/dbus-1/system-services/`.
pub const ACTIVATION_FILE: &str = include_str!("../org.banger.Manager.service");

/// The `<interface name="NAME">…</interface>` element of an introspection
/// document, one trimmed line per source line, blank lines dropped. Used to
/// compare what the daemon serves with the checked-in XML regardless of
/// indentation and of the other interfaces on the object.
pub fn interface_element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<interface name=\"{name}\">");
    let start = xml.find(&open)?;
    let end = start + xml[start..].find("</interface>")? + "</interface>".len();
    Some(
        xml[start..end]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_xml_holds_its_interface() {
        for (name, xml) in INTERFACE_XML {
            let element = interface_element(xml, name).expect("interface element");
            assert!(element.contains("<method") || element.contains("<property"));
        }
    }

    #[test]
    fn interface_element_ignores_indentation_and_neighbours() {
        let a = "<node>\n  <interface name=\"a.B\">\n    <method name=\"X\">\n    </method>\n  </interface>\n  <interface name=\"c.D\"/>\n</node>";
        let b = "<node><interface name=\"z\"></interface>\n<interface name=\"a.B\">\n<method name=\"X\">\n\n</method>\n</interface></node>";
        assert_eq!(interface_element(a, "a.B"), interface_element(b, "a.B"));
        assert_eq!(interface_element(a, "missing"), None);
    }

    #[test]
    fn bus_policy_covers_every_banger_interface() {
        for (served, _) in INTERFACE_XML {
            assert!(
                BUS_POLICY.contains(&format!("send_interface=\"{served}\"")),
                "the bus policy does not admit the served interface {served}"
            );
        }
        for iface in [
            names::MANAGER_INTERFACE,
            names::JOB_INTERFACE,
            names::VM_INTERFACE,
            names::IMAGE_INTERFACE,
            names::KERNEL_INTERFACE,
        ] {
            assert!(
                BUS_POLICY.contains(&format!("send_interface=\"{iface}\"")),
                "policy does not let callers reach {iface}"
            );
        }
        assert!(
            BUS_POLICY.contains("<policy user=\"root\">\n    <allow own=\"org.banger.Manager\"/>")
        );
        assert!(ACTIVATION_FILE.contains("SystemdService=bangerd.service"));
        assert!(ACTIVATION_FILE.contains(&format!("Name={}", names::BUS_NAME)));
    }
}
