//! `doctor`: host checks that tell the truth about what banger can do here.
//!
//! Each check looks at the real thing (opens the device, runs the ioctl,
//! binds the port) rather than trusting that a file exists. Checks that need
//! the bus get their answers through [`BusProbe`].

mod host;
mod network;
mod vms;

use host::*;
pub use network::*;
pub use vms::*;

use std::path::Path;

use crate::auth::BoxFuture;
use crate::config::Config;
use crate::store::Store;

/// Verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works with a caveat, or a feature is degraded.
    Warn,
    /// Broken; banger cannot do something it needs.
    Fail,
}

impl Verdict {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable short name.
    pub name: &'static str,
    /// Verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do; empty on pass.
    pub hint: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Pass,
            detail: detail.into(),
            hint: String::new(),
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            hint: hint.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            hint: hint.into(),
        }
    }
}

/// Whether a bus name can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameState {
    /// Someone owns it.
    Owned,
    /// Nobody owns it, but the bus can start its owner.
    Activatable,
    /// Nobody owns it and nothing would start.
    Absent,
    /// The bus could not be asked.
    Unknown,
}

impl NameState {
    /// Owned or activatable.
    pub fn reachable(self) -> bool {
        matches!(self, Self::Owned | Self::Activatable)
    }
}

/// Questions about the bus the daemon is on.
pub trait BusProbe: Send + Sync + std::fmt::Debug {
    /// Can `name` be reached?
    fn name_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, NameState>;
}

pub use crate::paths::HostPaths;

/// Bus names the checks ask about.
pub const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";

pub use crate::net::resolved::RESOLVED_NAME;

/// The `tools-sandbox` check: one sandboxed run through `tools`, on a
/// blocking thread (the sandbox runs a step and waits for it).
pub async fn tools_sandbox(tools: std::sync::Arc<dyn banger_formats::tool::Tools>) -> Check {
    crate::blocking::value(move || check_tools_sandbox(tools.as_ref()))
        .await
        .unwrap_or_else(|crate::blocking::Lost(e)| {
            Check::fail(
                "tools-sandbox",
                format!("the check crashed: {e}"),
                "report this as a bug",
            )
        })
}

/// Run every check. Bus questions first (async), the rest on a blocking thread.
pub async fn run(
    config: &Config,
    state_dir: &Path,
    store: &std::sync::Arc<Store>,
    bus: &dyn BusProbe,
    host: &HostPaths,
    dns_served: Option<std::net::SocketAddr>,
    resolved_link: &crate::net::resolved::Registration,
) -> Vec<Check> {
    let polkit = bus.name_state(POLKIT_NAME).await;
    let resolved = bus.name_state(RESOLVED_NAME).await;
    let network = check_network(config).await;
    let config = config.clone();
    let state_dir = state_dir.to_owned();
    let store = store.clone();
    let host = host.clone();
    let resolved_link = resolved_link.clone();
    crate::blocking::value(move || {
        vec![
            check_store(&store),
            check_disk_space(&state_dir, config.daemon.min_free_disk_gib),
            check_kvm(&host.kvm),
            check_vmm(&config),
            check_folders(
                &config,
                Path::new("/proc/sys/user/max_user_namespaces"),
                Path::new("/proc/sys/kernel/unprivileged_userns_clone"),
            ),
            check_guest_agent(&config.vm.agent_bin),
            check_char_device(
                "tun",
                &host.tun,
                "TAP devices for VM networking",
                "modprobe tun",
            ),
            check_char_device(
                "loop",
                &host.loop_control,
                "loop devices for disk images",
                "modprobe loop",
            ),
            check_nftables(),
            check_kernel_build(&config.images),
            check_image_build(&config.images),
            check_polkit(polkit),
            check_journald(&host.journal_socket),
            check_systemd(&host.systemd_runtime),
            check_resolved(resolved, &resolved_link),
            check_dns_port(config.network.dns_listen, dns_served),
            check_ip_forward(&host.ip_forward),
        ]
        .into_iter()
        .chain(network)
        .collect()
    })
    .await
    .unwrap_or_else(|e| {
        vec![Check::fail(
            "doctor",
            format!("the checks crashed: {e}"),
            "report this as a bug",
        )]
    })
}
