//! Virtual machines: the record, its explicit state machine, and the
//! commands on it ([`commands`]). Disks are in [`disk`], VMM drivers in
//! [`vmm`] (crate `banger-vmm`), VMM processes in [`process`], the store rows in [`store`].

pub mod agent;
pub mod commands;
pub mod disk;
pub mod quota;
pub mod snapshot;
pub mod store;

pub use banger_vmm as vmm;
pub use banger_vmm::{VmPaths, VmmDriver, process, supervise, vms_dir};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a VM is in its life. Every change goes through
/// [`VmState::after`], which knows the only legal moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Disks and record being made; not yet startable.
    Creating,
    /// Not running; disks kept.
    Stopped,
    /// VMM launched, waiting for the guest.
    Starting,
    /// The guest is up.
    Running,
    /// Shutting down.
    Stopping,
    /// Being removed.
    Deleting,
}

/// What someone or something does to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The create job finished making the disks.
    Created,
    /// Start asked.
    Start,
    /// The guest answered (agent and services ready).
    Ready,
    /// Stop asked (graceful, then forced).
    Stop,
    /// The VMM process ended (by itself, a kill, or a stop).
    Exited,
    /// Delete asked.
    Delete,
}

impl VmState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Deleting => "deleting",
        }
    }

    /// Parse a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "creating" => Self::Creating,
            "stopped" => Self::Stopped,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "deleting" => Self::Deleting,
            _ => return None,
        })
    }

    /// Whether a VMM process belongs to this state.
    pub fn has_process(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping)
    }

    /// The state after `event`, or a Busy/InvalidArgument error that says
    /// why not and what to do.
    pub fn after(self, event: VmEvent, name: &str) -> Result<VmState> {
        use VmEvent as E;
        use VmState as S;
        let next = match (self, event) {
            (S::Creating, E::Created) => S::Stopped,
            (S::Stopped, E::Start) => S::Starting,
            (S::Starting, E::Ready) => S::Running,
            (S::Starting | S::Running, E::Stop) => S::Stopping,
            (S::Starting | S::Running | S::Stopping, E::Exited) => S::Stopped,
            (S::Stopped | S::Creating, E::Delete) => S::Deleting,
            (S::Running, E::Start) => {
                return Err(Error::new(
                    crate::error::ErrorKind::Busy,
                    format!("vm {name} is running already"),
                ));
            }
            (S::Stopped, E::Stop) => {
                return Err(Error::new(
                    crate::error::ErrorKind::Busy,
                    format!("vm {name} is stopped already"),
                ));
            }
            (S::Running | S::Starting | S::Stopping, E::Delete) => {
                return Err(Error::new(
                    crate::error::ErrorKind::Busy,
                    format!(
                        "vm {name} is {}: stop it first (banger vm stop {name})",
                        self.as_str()
                    ),
                ));
            }
            (state, event) => {
                return Err(Error::new(
                    crate::error::ErrorKind::Busy,
                    format!(
                        "vm {name} is {}: cannot {} it now; wait for the operation on it to end",
                        state.as_str(),
                        event.verb()
                    ),
                ));
            }
        };
        Ok(next)
    }
}

impl VmEvent {
    fn verb(self) -> &'static str {
        match self {
            Self::Created => "finish creating",
            Self::Start => "start",
            Self::Ready => "mark ready",
            Self::Stop => "stop",
            Self::Exited => "mark exited",
            Self::Delete => "delete",
        }
    }
}

/// A VM as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Stable id (16 lowercase hex digits).
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// Uid that created it.
    pub owner_uid: u32,
    /// Its image's id.
    pub image_id: String,
    /// The kernel it boots.
    pub kernel_id: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Size of the work disk in bytes.
    pub disk_bytes: u64,
    /// Whether its traffic is NAT'd to the outside.
    pub nat: bool,
    /// Whether it may talk with the other VMs that may (`peers`).
    pub peers: bool,
    /// Whether bangerd starts it when it first starts after a host boot.
    pub autostart: bool,
    /// Where it is in its life.
    pub state: VmState,
    /// Which VMM runs it; `None` before its first start.
    pub vmm: Option<VmmDriver>,
    /// The VMM process, when one runs.
    pub pid: Option<u32>,
    /// The process's start time (clock ticks after boot, from
    /// `/proc/PID/stat`), so a reused pid is never mistaken for it.
    pub pid_start: Option<u64>,
    /// Its TAP while running.
    pub tap: Option<String>,
    /// SSH public keys put into root's authorized_keys at create.
    pub ssh_keys: Vec<String>,
    /// How the system disk was made; `None` until it is.
    pub disk_method: Option<disk::DiskMethod>,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// The last failure, for `show`; empty when none.
    pub last_error: String,
    /// The port forwards bangerd keeps for it.
    pub forwards: Vec<PortForward>,
    /// The host folders it shares, served as its owner (QEMU only).
    pub mounts: Vec<Mount>,
    /// Whether it is stopped with its memory saved (`vm suspend`): its
    /// next start resumes the guest rather than booting it.
    pub suspended: bool,
}

/// A host folder a VM shares (`--mount HOST_DIR:GUEST_DIR[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// The host directory (absolute, checked by
    /// [`vmm::virtiofs::check_source`]).
    pub source: String,
    /// Where the guest mounts it (absolute).
    pub target: String,
    /// Shared read-only.
    pub read_only: bool,
}

/// A port of the host that bangerd forwards to a port on a VM's loopback
/// (`vm forward --background`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    /// The host address it listens on.
    pub address: std::net::IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
}

impl Vm {
    /// The VM's directory under the state directory: disks, console log.
    pub fn dir(state: &Path, id: &str) -> PathBuf {
        vms_dir(state).join(id)
    }

    /// A new VM `id`/`name` of `owner_uid`, made at `created_at`, with
    /// this one's settings (a clone's or a fork's row), still to be
    /// created. What belongs to this VM alone stays with it: its process,
    /// TAP, disk method, host ports and saved memory; autostart is off
    /// until asked for (`vm set`).
    #[must_use]
    pub fn copy_of(&self, id: String, name: String, owner_uid: u32, created_at: i64) -> Self {
        Self {
            id,
            name,
            owner_uid,
            state: VmState::Creating,
            vmm: None,
            pid: None,
            pid_start: None,
            tap: None,
            disk_method: None,
            autostart: false,
            created_at,
            last_error: String::new(),
            forwards: Vec::new(),
            suspended: false,
            ..self.clone()
        }
    }
}

/// The machine id (`/etc/machine-id`, 32 lowercase hex digits shaped as
/// a version 4 UUID) of VM `id`: derived from the id, so it is stable
/// across boots and differs between VMs, clones included.
pub fn machine_id(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("banger machine-id {id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    crate::artifacts::hex(&bytes)
}

/// What `CreateVM` was asked, before defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmRequest {
    /// Name (a DNS label).
    pub name: String,
    /// Image name or id; empty means the default image.
    pub image: String,
    /// Virtual CPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Work disk size in bytes.
    pub disk_bytes: Option<u64>,
    /// NAT on.
    pub nat: Option<bool>,
    /// Peers on.
    pub peers: Option<bool>,
    /// Started when bangerd first starts after a host boot.
    pub autostart: Option<bool>,
    /// Public keys for root.
    pub ssh_keys: Vec<String>,
    /// Start it once created.
    pub start: bool,
    /// A script run once as root through the agent after the first boot.
    pub setup: Option<Vec<u8>>,
    /// Host folders to share.
    pub mounts: Vec<Mount>,
    /// Boot from the image even where a template could be restored.
    pub cold_boot: bool,
}

/// Check a VM's host folders: at most [`vmm::virtiofs::MAX_SHARES`],
/// plain absolute paths on both sides (the host's as virtiofsd takes
/// them), the guest's not `/`, each guest folder once.
pub fn validate_mounts(mounts: &[Mount]) -> crate::error::Result<()> {
    use crate::error::Error;
    let max = vmm::virtiofs::MAX_SHARES;
    if mounts.len() > max {
        return Err(Error::invalid(format!(
            "{} host folders are more than {max}",
            mounts.len()
        )));
    }
    for (i, m) in mounts.iter().enumerate() {
        vmm::virtiofs::check_source(&m.source).map_err(Error::invalid)?;
        let plain =
            vmm::virtiofs::is_plain_absolute(&m.target) && !m.target.chars().any(char::is_control);
        if !plain {
            return Err(Error::invalid(format!(
                "guest folder {:?} is not an absolute path other than / without '.' or '..'",
                m.target
            )));
        }
        if mounts[..i].iter().any(|o| o.target == m.target) {
            return Err(Error::invalid(format!(
                "guest folder {} is named twice",
                m.target
            )));
        }
    }
    Ok(())
}

pub use crate::shape::validate_sizes;

/// Check an SSH public key line: `TYPE BASE64 [COMMENT]`, one line.
pub fn validate_ssh_key(key: &str) -> Result<()> {
    let mut parts = key.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    let known =
        kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    let base64 = !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if !known || !base64 || key.contains('\n') || key.len() > 16 * 1024 {
        return Err(Error::invalid(format!(
            "{:?} is not an ssh public key line (TYPE BASE64 [COMMENT]); pass the contents of a .pub file",
            key.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn machine_ids_are_stable_distinct_uuid_shaped_hex() {
        let a = machine_id("0123456789abcdef");
        assert_eq!(a, machine_id("0123456789abcdef"));
        assert_ne!(a, machine_id("0123456789abcdee"));
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(&a[12..13], "4", "version 4: {a}");
        assert!("89ab".contains(&a[16..17]), "variant 1: {a}");
    }

    const ALL: [VmState; 6] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Deleting,
    ];
    const EVENTS: [VmEvent; 6] = [
        VmEvent::Created,
        VmEvent::Start,
        VmEvent::Ready,
        VmEvent::Stop,
        VmEvent::Exited,
        VmEvent::Delete,
    ];

    #[test]
    fn the_legal_moves_and_only_those() {
        let mut legal = Vec::new();
        for s in ALL {
            for e in EVENTS {
                if let Ok(next) = s.after(e, "x") {
                    legal.push((s, e, next));
                }
            }
        }
        use VmEvent as E;
        use VmState as S;
        assert_eq!(
            legal,
            [
                (S::Creating, E::Created, S::Stopped),
                (S::Creating, E::Delete, S::Deleting),
                (S::Stopped, E::Start, S::Starting),
                (S::Stopped, E::Delete, S::Deleting),
                (S::Starting, E::Ready, S::Running),
                (S::Starting, E::Stop, S::Stopping),
                (S::Starting, E::Exited, S::Stopped),
                (S::Running, E::Stop, S::Stopping),
                (S::Running, E::Exited, S::Stopped),
                (S::Stopping, E::Exited, S::Stopped),
            ]
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = VmState::Running
            .after(VmEvent::Delete, "web")
            .expect_err("refused");
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("banger vm stop web"), "{}", e.message);
        let e = VmState::Running
            .after(VmEvent::Start, "web")
            .expect_err("refused");
        assert!(e.message.contains("running already"), "{}", e.message);
        let e = VmState::Deleting
            .after(VmEvent::Start, "web")
            .expect_err("refused");
        assert!(e.message.contains("is deleting"), "{}", e.message);
    }

    #[test]
    fn states_round_trip_and_processes() {
        for s in ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("zombie"), None);
        let with: Vec<_> = ALL.into_iter().filter(|s| s.has_process()).collect();
        assert_eq!(
            with,
            [VmState::Starting, VmState::Running, VmState::Stopping]
        );
    }

    #[test]
    fn ssh_keys_are_checked() {
        assert!(validate_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA me@host").is_ok());
        assert!(validate_ssh_key("ecdsa-sha2-nistp256 AAAA=").is_ok());
        for bad in [
            "",
            "hello",
            "ssh-ed25519",
            "ssh-ed25519 AA\nAA",
            "rsa AAAA",
            "ssh-rsa A$",
        ] {
            assert!(validate_ssh_key(bad).is_err(), "{bad:?}");
        }
    }
}
