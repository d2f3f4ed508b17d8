//! Who runs a VMM process. Where systemd is PID 1, systemd does: each VMM
//! is a transient unit `banger-vm-<id>.service` in `banger.slice`, with
//! memory and CPU limits from the VM (`os::systemd::SystemdSupervisor`,
//! which also registers the VM with systemd-machined when it runs).
//! Elsewhere bangerd starts the VMM itself as a child in its own session
//! ([`Direct`]). Either way the VMM never shares bangerd's process group,
//! so bangerd's death never takes a VM with it, and bangerd finds it again
//! by pid and start time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::BoxFuture;
use crate::process::{self, ProcessId, Watched};
use banger_error::Result;

/// The slice every VM unit goes into.
pub const SLICE: &str = "banger.slice";

/// What to start, for which VM.
#[derive(Debug, Clone, Copy)]
pub struct StartRequest<'a> {
    /// The VM's id.
    pub vm_id: &'a str,
    /// The VM's name.
    pub vm_name: &'a str,
    /// The VMM executable.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [String],
    /// Where its standard output and error are appended.
    pub log: &'a Path,
    /// The guest's memory.
    pub memory_mib: u32,
    /// The guest's CPUs.
    pub vcpus: u32,
    /// The directories the VMM writes (the VM's state and runtime
    /// directories); the rest of the file system is read-only to it.
    pub writable: &'a [PathBuf],
    /// Whether the VMM generates code at run time (QEMU's TCG), so it
    /// needs writable and executable memory.
    pub jit: bool,
    /// What `program` is: the VMM itself, bangerd's `vmm-exec` or
    /// Firecracker's jailer. It decides the unit's capabilities.
    pub launcher: Launcher,
}

/// What a VMM's unit starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// The VMM, with no capability (the drivers' own tests).
    Bare,
    /// bangerd's `vmm-exec` ([`crate::jail`]), which needs `CAP_SETUID`
    /// and `CAP_SETGID` to become the VM's user before it execs the VMM
    /// (with none); the VMM gets no network namespace of the host's.
    VmmExec,
    /// Firecracker's jailer ([`crate::jailer`]), maybe behind
    /// `jailer-exec`: root with what upstream's `docs/jailer.md` says it
    /// does (a mount namespace, `pivot_root`, `chroot`, `mknod`, `chown`,
    /// becoming the VM's user); Firecracker it execs keeps none of it.
    Jailer,
    /// bangerd's `virtiofsd-exec` (the `virtiofs` module), in a unit of
    /// its own (`banger-fs-<id>.service`): root that makes children the
    /// VM's owner in user namespaces of their own and writes their maps;
    /// the virtiofsds hold capabilities only there.
    Virtiofsd,
}

impl Launcher {
    /// The unit of VM `vm_id` this launcher's program runs in.
    pub fn unit(self, vm_id: &str) -> String {
        match self {
            Self::Virtiofsd => folders_unit(vm_id),
            _ => unit_name(vm_id),
        }
    }
}

/// Starts VMM processes.
pub trait Supervisor: Send + Sync + std::fmt::Debug {
    /// `systemd` or `process`.
    fn name(&self) -> &'static str;

    /// Start the VMM; the process and how to watch it.
    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<(Watched, ProcessId)>>;

    /// Whether `vmm-exec` may give a jailed VMM a network namespace of
    /// its own: it runs with bangerd's rights as its child. In a unit it
    /// may not (no `CAP_SYS_ADMIN`, `RestrictNamespaces=`), and systemd's
    /// `PrivateNetwork=` would come before the TAP is attached, by name,
    /// in the host's namespace.
    fn vmm_network_namespace(&self) -> bool {
        true
    }

    /// The unit a VM's VMM runs in, when there is one.
    fn unit(&self, vm_id: &str) -> Option<String> {
        let _ = vm_id;
        None
    }

    /// The VMMs running now, by VM id, whatever the store says: what a
    /// restarted bangerd checks its records against (a crash between
    /// starting a VMM and recording its pid leaves one it has no record
    /// of). `runs` is the directory of the VMs' runtime directories
    /// (`<runtime>/vms`), which every VMM's arguments name.
    fn running<'a>(
        &'a self,
        runs: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Vec<(String, ProcessId)>>>;

    /// Stop what serves VM `vm_id`'s host folders, if anything does
    /// (the `virtiofs` module); a no-op otherwise. Its virtiofsds end with
    /// their VMM's connection; this is for a start that failed before or
    /// a helper left behind.
    fn stop_folders<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let id = vm_id.to_owned();
            let helpers = tokio::task::spawn_blocking(move || folder_helpers(&id))
                .await
                .unwrap_or_default();
            for helper in helpers {
                // Each is a process group leader (its own session).
                let group = nix::unistd::Pid::from_raw(helper.pid.cast_signed());
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            }
        })
    }

    /// Send `signal` to VM `vm_id`'s VMM `process`. bangerd holds no
    /// `CAP_KILL` and VMMs run as users of their own: where systemd runs
    /// them, systemd signals the unit's main process.
    fn signal<'a>(
        &'a self,
        vm_id: &'a str,
        process: ProcessId,
        signal: nix::sys::signal::Signal,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = vm_id;
        Box::pin(async move { process.signal(signal) })
    }
}

/// The VM id a process with arguments `args` runs for: the directory
/// under one of `runs` one of them names (`.../vms/<id>/control.sock`;
/// a jailed QEMU names its files only as the labels of its descriptors).
pub fn vm_of(args: &[String], runs: &[PathBuf]) -> Option<String> {
    runs.iter().find_map(|runs| vm_under(args, runs))
}

fn vm_under(args: &[String], runs: &Path) -> Option<String> {
    let prefix = format!("{}/", runs.display());
    args.iter().find_map(|a| {
        let at = a.find(&prefix)?;
        let id = a[at + prefix.len()..].split('/').next()?;
        let plausible = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        // Only a path below the VM's directory, not a name that starts
        // with the id.
        (plausible && a[at + prefix.len() + id.len()..].starts_with('/')).then(|| id.to_owned())
    })
}

/// The VM id a jailed Firecracker runs for: the jailer execs it as
/// `<exec_file_name> --id=<id> ...` inside its chroot, so its arguments
/// name no directory of the host's; its uid, one only a VM's VMM has
/// ([`crate::jail::VMM_IDS`]), says it is one of banger's.
pub fn jailed_vm_of(args: &[String], uid: u32) -> Option<String> {
    let vm_uid = crate::jail::VMM_IDS.contains(&uid) && uid != crate::jail::VMM_GROUP;
    let firecracker = args
        .first()
        .is_some_and(|a| crate::jailer::check_exec_name(Path::new(a)).is_ok());
    if !vm_uid || !firecracker {
        return None;
    }
    args.iter().find_map(|a| {
        let id = a.strip_prefix("--id=")?;
        crate::jailer::check_id(id).ok()?;
        Some(id.to_owned())
    })
}

/// Every process's pid and arguments, from `/proc` (a process that ends
/// meanwhile is left out).
fn processes() -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// The processes whose arguments name a VM's directory under one of
/// `runs` (see [`vm_of`]): a direct supervisor's VMMs, found by what
/// they were started with.
pub fn processes_under(runs: &[PathBuf]) -> Vec<(String, ProcessId)> {
    processes()
        .into_iter()
        .filter_map(|(pid, args)| {
            // A VM's folders' helper names its runtime directory too.
            if args.get(1).map(String::as_str) == Some(FOLDERS_HELPER_ARG) {
                return None;
            }
            let id = vm_of(&args, runs).or_else(|| {
                let uid = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
                jailed_vm_of(&args, uid)
            })?;
            let process = ProcessId::of(pid).filter(ProcessId::alive)?;
            Some((id, process))
        })
        .collect()
}

/// bangerd's own children, each in a new session.
#[derive(Debug, Default, Clone, Copy)]
pub struct Direct;

impl Supervisor for Direct {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, req: StartRequest<'a>) -> BoxFuture<'a, Result<(Watched, ProcessId)>> {
        Box::pin(async move {
            let (child, id) = process::spawn(req.program, req.args, req.log)?;
            Ok((Watched::Child(child), id))
        })
    }

    fn running<'a>(
        &'a self,
        runs: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Vec<(String, ProcessId)>>> {
        let runs = runs.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || processes_under(&runs))
                .await
                .map_err(|e| banger_error::Error::failed(format!("cannot list processes: {e}")))
        })
    }
}

/// The transient unit of VM `vm_id`.
pub fn unit_name(vm_id: &str) -> String {
    format!("banger-vm-{vm_id}.service")
}

/// bangerd's argument that makes it the helper serving a VM's host
/// folders (the `virtiofs` module).
pub const FOLDERS_HELPER_ARG: &str = "virtiofsd-exec";

/// The transient unit of VM `vm_id`'s host folders.
pub fn folders_unit(vm_id: &str) -> String {
    format!("banger-fs-{vm_id}.service")
}

/// The folders' helpers of VM `vm_id` running as bangerd's children
/// (found by their arguments: `virtiofsd-exec SPEC`, the spec naming
/// the VM); each leads its process group.
pub fn folder_helpers(vm_id: &str) -> Vec<ProcessId> {
    processes()
        .into_iter()
        .filter_map(|(pid, args)| {
            if args.get(1).map(String::as_str) != Some(FOLDERS_HELPER_ARG) {
                return None;
            }
            let spec: serde_json::Value = serde_json::from_str(args.get(2)?).ok()?;
            (spec.get("vm")?.as_str()? == vm_id).then_some(())?;
            ProcessId::of(pid).filter(ProcessId::alive)
        })
        .collect()
}

/// The unit's `MemoryMax`: the guest's memory plus room for the VMM
/// itself (page tables, device buffers, QEMU's own heap), an eighth more
/// and 256 MiB. A guest can use all its memory without the VMM being
/// killed; a runaway VMM cannot take the host.
pub fn memory_max_bytes(memory_mib: u32) -> u64 {
    let mib = u64::from(memory_mib);
    (mib + mib / 8 + 256) << 20
}

/// The unit's `CPUQuotaPerSecUSec`: one host CPU per vCPU.
pub fn cpu_quota_usec(vcpus: u32) -> u64 {
    u64::from(vcpus) * 1_000_000
}

/// One property of the transient unit, as plain data (the systemd
/// supervisor turns these into D-Bus `(sv)` pairs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitProperty {
    /// A string property.
    Str(&'static str, String),
    /// A `t` property.
    U64(&'static str, u64),
    /// A `b` property.
    Bool(&'static str, bool),
    /// An `as` property.
    Strs(&'static str, Vec<String>),
    /// A `u` property.
    U32(&'static str, u32),
    /// An `i` property.
    I32(&'static str, i32),
    /// An `a(ss)` property (`DeviceAllow`).
    Pairs(&'static str, Vec<(String, String)>),
    /// A `(bas)` property: an allow-list (true) or deny-list (false).
    Filter(&'static str, bool, Vec<String>),
    /// `ExecStart`: the program and its whole argv.
    ExecStart(String, Vec<String>),
}

/// The devices a VMM may open: KVM, TAPs, vhost, and the loop and
/// device-mapper devices system disks are made of. Everything else under
/// `/dev` is closed to it (`DevicePolicy=closed` keeps the harmless
/// pseudo-devices).
pub const VMM_DEVICES: [&str; 6] = [
    "/dev/kvm",
    "/dev/net/tun",
    "/dev/vhost-vsock",
    "/dev/vhost-net",
    "block-loop",
    "block-device-mapper",
];

/// The capabilities' numbers (linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_CHROOT: u32 = 18;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_MKNOD: u32 = 27;

/// `CLONE_NEWNS`: the one namespace the jailer makes.
const CLONE_NEWNS: u64 = 0x0002_0000;

/// What the jailer's unit refuses: what neither the jailer nor
/// Firecracker call (Firecracker installs its own, narrower filter).
pub const JAILER_DENIED: [&str; 17] = [
    "@clock",
    "@cpu-emulation",
    "@debug",
    "@module",
    "@obsolete",
    "@raw-io",
    "@reboot",
    "@swap",
    "acct",
    "bpf",
    "fanotify_init",
    "fanotify_mark",
    "open_by_handle_at",
    "quotactl",
    "setdomainname",
    "sethostname",
    "vhangup",
];

/// What a jailed VMM's unit refuses: `@privileged` and `@resources` but
/// for the calls `vmm-exec` makes to leave root (`@setuid`); QEMU's own
/// filter (`-sandbox elevateprivileges=deny`) refuses those afterwards.
pub const PRIVILEGED_BUT_SETUID: [&str; 19] = [
    "@resources",
    "@chown",
    "@clock",
    "@module",
    "@raw-io",
    "@reboot",
    "@swap",
    "acct",
    "bpf",
    "capset",
    "chroot",
    "fanotify_init",
    "fanotify_mark",
    "open_by_handle_at",
    "pivot_root",
    "quotactl",
    "setdomainname",
    "sethostname",
    "vhangup",
];

/// The properties of `req`'s transient unit.
pub fn unit_properties(req: &StartRequest<'_>) -> Vec<UnitProperty> {
    use UnitProperty::{Bool, Filter, I32, Pairs, Str, Strs, U32, U64};
    if req.launcher == Launcher::Virtiofsd {
        return folder_unit_properties(req);
    }
    let mut props = started(req, &format!("banger VM {} ({})", req.vm_name, req.vm_id));
    props.extend([
        U64("MemoryMax", memory_max_bytes(req.memory_mib)),
        U64("CPUQuotaPerSecUSec", cpu_quota_usec(req.vcpus)),
        // A VMM that exits is done; its unit goes away with it.
        Str("CollectMode", "inactive-or-failed".to_owned()),
        // Stopping the unit (systemctl stop) signals QEMU first, then the rest.
        Str("KillMode", "mixed".to_owned()),
        // The sandbox (docs/security.md): the VMM reads the system, writes
        // only its VM's directories, opens only the devices a VM needs,
        // keeps no capability and makes no namespace, socket other than a
        // unix one or privileged system call.
        Bool("NoNewPrivileges", true),
        Str("ProtectSystem", "strict".to_owned()),
        Strs(
            "ReadWritePaths",
            req.writable
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        ),
        Str("ProtectHome", "yes".to_owned()),
        Bool("PrivateTmp", true),
        Bool("PrivateIPC", true),
        // A jailed VMM gets its TAP and sockets as descriptors from
        // bangerd: no network of the host's is its business, loopback
        // and abstract unix sockets included. (Firecracker opens its TAP
        // by name, in the host's namespace.)
        Bool("PrivateNetwork", req.launcher == Launcher::VmmExec),
        Str("DevicePolicy", "closed".to_owned()),
        // The jailer makes `/dev/kvm` and `/dev/net/tun` in its chroot,
        // and jailer-exec a device-mapper system disk's node: `m`.
        Pairs(
            "DeviceAllow",
            VMM_DEVICES
                .iter()
                .map(|d| {
                    let access = if req.launcher == Launcher::Jailer {
                        "rwm"
                    } else {
                        "rw"
                    };
                    ((*d).to_owned(), access.to_owned())
                })
                .collect(),
        ),
        // vmm-exec needs setuid and setgid to leave root and setpcap to
        // empty the bounding set; the VMM it execs has no capability.
        U64(
            "CapabilityBoundingSet",
            match req.launcher {
                Launcher::Bare => 0,
                Launcher::VmmExec => (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_SETPCAP),
                Launcher::Jailer | Launcher::Virtiofsd => {
                    (1 << CAP_CHOWN)
                        | (1 << CAP_SETGID)
                        | (1 << CAP_SETUID)
                        | (1 << CAP_SYS_CHROOT)
                        | (1 << CAP_SYS_ADMIN)
                        | (1 << CAP_MKNOD)
                }
            },
        ),
        U64(
            "RestrictNamespaces",
            if req.launcher == Launcher::Jailer {
                CLONE_NEWNS
            } else {
                0
            },
        ),
        Filter("RestrictAddressFamilies", true, vec!["AF_UNIX".to_owned()]),
        // `seccomp` (in no group of systemd 252): QEMU's `-sandbox` and
        // Firecracker install filters of their own on top of this one.
        Filter("SystemCallFilter", true, {
            let mut allowed = vec!["@system-service".to_owned(), "seccomp".to_owned()];
            if req.launcher == Launcher::Jailer {
                allowed.extend(
                    ["@mount", "@chown", "@setuid", "chroot", "mknod", "mknodat"]
                        .map(str::to_owned),
                );
            }
            allowed
        }),
        Filter(
            "SystemCallFilter",
            false,
            match req.launcher {
                Launcher::Bare => vec!["@privileged".to_owned(), "@resources".to_owned()],
                Launcher::VmmExec => PRIVILEGED_BUT_SETUID.map(str::to_owned).to_vec(),
                Launcher::Jailer | Launcher::Virtiofsd => JAILER_DENIED.map(str::to_owned).to_vec(),
            },
        ),
        // A refused call fails (QEMU probes io_uring and the like) rather
        // than killing the VM.
        I32("SystemCallErrorNumber", nix::errno::Errno::EPERM as i32),
        Strs("SystemCallArchitectures", vec!["native".to_owned()]),
        Bool("MemoryDenyWriteExecute", !req.jit),
        Bool("LockPersonality", true),
        Bool("RestrictRealtime", true),
        Bool("RestrictSUIDSGID", true),
        Bool("ProtectKernelTunables", true),
        Bool("ProtectKernelModules", true),
        Bool("ProtectKernelLogs", true),
        Bool("ProtectControlGroups", true),
        Bool("ProtectClock", true),
        Bool("ProtectHostname", true),
        Str("ProtectProc", "invisible".to_owned()),
        Str("KeyringMode", "private".to_owned()),
        U32("UMask", 0o077),
    ]);
    props
}

/// What every banger unit starts with: `description`, banger's slice,
/// `req`'s program (`Type=exec`: the start job fails when it cannot be
/// run), no input, its output appended to `req.log`, run in `/`.
fn started(req: &StartRequest<'_>, description: &str) -> Vec<UnitProperty> {
    use UnitProperty::{ExecStart, Str};
    let program = req.program.to_string_lossy().into_owned();
    let mut argv = vec![program.clone()];
    argv.extend(req.args.iter().cloned());
    let log = req.log.to_string_lossy().into_owned();
    vec![
        Str("Description", description.to_owned()),
        Str("Slice", SLICE.to_owned()),
        Str("Type", "exec".to_owned()),
        ExecStart(program, argv),
        Str("StandardInput", "null".to_owned()),
        Str("StandardOutputFileToAppend", log.clone()),
        Str("StandardErrorFileToAppend", log),
        Str("WorkingDirectory", "/".to_owned()),
    ]
}

/// The capabilities a folders' unit may hold: `virtiofsd-exec` (root)
/// needs `CAP_SETUID`/`CAP_SETGID` to become the owner and write the
/// children's maps; the rest bounds what each virtiofsd holds inside its
/// user namespace, where root is the owner: file ownership and modes
/// (`chown`, `fowner`, `fsetid`, `dac_override`, `mknod`, `setfcap`) and
/// making its own sandbox (`sys_admin`).
pub const FOLDER_CAPABILITIES: [u32; 9] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
    CAP_SYS_ADMIN,
    CAP_MKNOD,
    CAP_SETFCAP,
];

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SETFCAP: u32 = 31;

/// The unit of a VM's folders' helper. It sees the host's file system as
/// it is (the folders are wherever their owner keeps them, `/home`
/// included, and virtiofsd mounts a `/proc` of its own, which the kernel
/// allows only where `/proc` is not partly hidden): the confinement is
/// the owner's uid and each virtiofsd's own sandbox, plus no network, no
/// device and no system call a file server has no use for.
fn folder_unit_properties(req: &StartRequest<'_>) -> Vec<UnitProperty> {
    use UnitProperty::{Bool, Filter, I32, Str, Strs, U64};
    let mut props = started(
        req,
        &format!("banger VM {} ({}) host folders", req.vm_name, req.vm_id),
    );
    props.extend([
        Str("CollectMode", "inactive-or-failed".to_owned()),
        Bool("NoNewPrivileges", true),
        Bool("PrivateNetwork", true),
        Str("DevicePolicy", "closed".to_owned()),
        U64(
            "CapabilityBoundingSet",
            FOLDER_CAPABILITIES.iter().map(|c| 1u64 << c).sum(),
        ),
        Filter("RestrictAddressFamilies", true, vec!["AF_UNIX".to_owned()]),
        Filter(
            "SystemCallFilter",
            false,
            [
                "@clock",
                "@cpu-emulation",
                "@debug",
                "@module",
                "@obsolete",
                "@raw-io",
                "@reboot",
                "@swap",
                "bpf",
                "kexec_load",
                "kexec_file_load",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        I32("SystemCallErrorNumber", nix::errno::Errno::EPERM as i32),
        Strs("SystemCallArchitectures", vec!["native".to_owned()]),
        Bool("MemoryDenyWriteExecute", true),
        Bool("LockPersonality", true),
        Bool("RestrictRealtime", true),
        Bool("RestrictSUIDSGID", true),
        Str("KeyringMode", "private".to_owned()),
    ]);
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_unit_holds_only_what_virtiofsd_exec_and_virtiofsd_use() {
        let args = Vec::new();
        let props = unit_properties(&StartRequest {
            vm_id: "0123456789abcdef",
            vm_name: "web",
            program: Path::new("/usr/libexec/bangerd"),
            args: &args,
            log: Path::new("/var/lib/banger/vms/x/virtiofsd.log"),
            memory_mib: 0,
            vcpus: 1,
            writable: &[],
            jit: false,
            launcher: Launcher::Virtiofsd,
        });
        let caps = props
            .iter()
            .find_map(|p| match p {
                UnitProperty::U64("CapabilityBoundingSet", c) => Some(*c),
                _ => None,
            })
            .expect("a bounding set");
        assert_eq!(caps & (1 << CAP_SYS_CHROOT), 0);
        assert_ne!(caps & (1 << CAP_SETUID), 0);
        assert_eq!(caps.count_ones(), 9);
        assert!(props.contains(&UnitProperty::Bool("PrivateNetwork", true)));
        assert!(props.contains(&UnitProperty::Bool("NoNewPrivileges", true)));
        // /proc stays whole (virtiofsd mounts its own) and /home visible.
        assert!(!props.iter().any(|p| matches!(
            p,
            UnitProperty::Str("ProtectProc" | "ProtectHome" | "ProtectSystem", _)
                | UnitProperty::Bool("ProtectKernelTunables", _)
        )));
        assert_eq!(
            Launcher::Virtiofsd.unit("0123456789abcdef"),
            "banger-fs-0123456789abcdef.service"
        );
        assert_eq!(
            Launcher::VmmExec.unit("0123456789abcdef"),
            "banger-vm-0123456789abcdef.service"
        );
    }

    #[test]
    fn units_are_named_sized_and_sliced() {
        assert_eq!(
            unit_name("0123456789abcdef"),
            "banger-vm-0123456789abcdef.service"
        );
        assert_eq!(memory_max_bytes(1024), (1024 + 128 + 256) << 20);
        assert_eq!(cpu_quota_usec(2), 2_000_000);
        let args = vec!["-M".to_owned(), "microvm".to_owned()];
        let writable = [
            PathBuf::from("/var/lib/banger/vms/x"),
            PathBuf::from("/run/banger/vms/x"),
        ];
        let request = |jit| StartRequest {
            vm_id: "0123456789abcdef",
            vm_name: "web",
            program: Path::new("/usr/bin/qemu-system-x86_64"),
            args: &args,
            log: Path::new("/var/lib/banger/vms/x/vmm.log"),
            memory_mib: 512,
            vcpus: 2,
            writable: &writable,
            jit,
            launcher: Launcher::Bare,
        };
        let props = unit_properties(&request(false));
        let name_of = |p: &UnitProperty| match p {
            UnitProperty::Str(n, _)
            | UnitProperty::U64(n, _)
            | UnitProperty::U32(n, _)
            | UnitProperty::I32(n, _)
            | UnitProperty::Bool(n, _)
            | UnitProperty::Strs(n, _)
            | UnitProperty::Pairs(n, _)
            | UnitProperty::Filter(n, ..) => *n,
            UnitProperty::ExecStart(..) => "ExecStart",
        };
        let find = |name: &str| props.iter().find(|p| name_of(p) == name);
        // The sandbox: no capability, writes only in the VM's directories,
        // W^X unless the VMM compiles code at run time.
        assert_eq!(
            find("CapabilityBoundingSet"),
            Some(&UnitProperty::U64("CapabilityBoundingSet", 0))
        );
        assert_eq!(
            find("ReadWritePaths"),
            Some(&UnitProperty::Strs(
                "ReadWritePaths",
                vec!["/var/lib/banger/vms/x".into(), "/run/banger/vms/x".into()]
            ))
        );
        assert_eq!(
            find("MemoryDenyWriteExecute"),
            Some(&UnitProperty::Bool("MemoryDenyWriteExecute", true))
        );
        assert!(
            unit_properties(&request(true))
                .contains(&UnitProperty::Bool("MemoryDenyWriteExecute", false))
        );
        assert!(find("DeviceAllow").is_some_and(|p| format!("{p:?}").contains("/dev/kvm")));
        assert_eq!(
            find("ExecStart"),
            Some(&UnitProperty::ExecStart(
                "/usr/bin/qemu-system-x86_64".into(),
                vec![
                    "/usr/bin/qemu-system-x86_64".into(),
                    "-M".into(),
                    "microvm".into()
                ]
            ))
        );
        assert_eq!(
            find("Slice"),
            Some(&UnitProperty::Str("Slice", "banger.slice".into()))
        );
        assert_eq!(
            find("MemoryMax"),
            Some(&UnitProperty::U64("MemoryMax", (512 + 64 + 256) << 20))
        );
        assert_eq!(
            find("StandardErrorFileToAppend"),
            Some(&UnitProperty::Str(
                "StandardErrorFileToAppend",
                "/var/lib/banger/vms/x/vmm.log".into()
            ))
        );
        assert!(find("Description").is_some_and(|p| format!("{p:?}").contains("web")));
    }

    #[test]
    fn each_launcher_gets_only_what_it_does() {
        let args = Vec::new();
        let writable = [PathBuf::from("/var/lib/banger/vms/x")];
        let props = |launcher| {
            unit_properties(&StartRequest {
                vm_id: "0123456789abcdef",
                vm_name: "web",
                program: Path::new("/usr/bin/jailer"),
                args: &args,
                log: Path::new("/var/lib/banger/vms/x/vmm.log"),
                memory_mib: 512,
                vcpus: 1,
                writable: &writable,
                jit: false,
                launcher,
            })
        };
        let get = |props: &[UnitProperty], name: &str, nth: usize| {
            props
                .iter()
                .filter(|p| format!("{p:?}").contains(&format!("\"{name}\"")))
                .nth(nth)
                .cloned()
                .unwrap_or_else(|| panic!("{name}"))
        };
        let caps = |props: &[UnitProperty]| match get(props, "CapabilityBoundingSet", 0) {
            UnitProperty::U64(_, v) => v,
            other => panic!("{other:?}"),
        };
        let bare = props(Launcher::Bare);
        let exec = props(Launcher::VmmExec);
        let jailer = props(Launcher::Jailer);
        assert_eq!(caps(&bare), 0);
        assert_eq!(caps(&exec), (1 << 6) | (1 << 7) | (1 << 8));
        // docs/jailer.md: chown, mknod, chroot, pivot_root in a mount
        // namespace of its own, setuid/setgid to the VM's user. No raw
        // I/O, module loading, ptrace, network administration or kill.
        assert_eq!(
            caps(&jailer),
            (1 << 0) | (1 << 6) | (1 << 7) | (1 << 18) | (1 << 21) | (1 << 27)
        );
        assert_eq!(
            get(&jailer, "RestrictNamespaces", 0),
            UnitProperty::U64("RestrictNamespaces", 0x0002_0000)
        );
        assert_eq!(
            get(&exec, "RestrictNamespaces", 0),
            UnitProperty::U64("RestrictNamespaces", 0)
        );
        // The jailer makes device nodes (`m`); the others only open them.
        let devices = |props: &[UnitProperty]| match get(props, "DeviceAllow", 0) {
            UnitProperty::Pairs(_, pairs) => pairs,
            other => panic!("{other:?}"),
        };
        assert!(devices(&jailer).iter().all(|(_, a)| a == "rwm"));
        assert!(devices(&exec).iter().all(|(_, a)| a == "rw"));
        // Firecracker opens its TAP by name: the host's network.
        assert_eq!(
            get(&jailer, "PrivateNetwork", 0),
            UnitProperty::Bool("PrivateNetwork", false)
        );
        assert_eq!(
            get(&exec, "PrivateNetwork", 0),
            UnitProperty::Bool("PrivateNetwork", true)
        );
        match get(&jailer, "SystemCallFilter", 0) {
            UnitProperty::Filter(_, true, allowed) => {
                for call in ["@mount", "chroot", "mknod", "@setuid", "@chown"] {
                    assert!(allowed.iter().any(|a| a == call), "{call}");
                }
            }
            other => panic!("{other:?}"),
        }
        match get(&bare, "SystemCallFilter", 0) {
            UnitProperty::Filter(_, true, allowed) => {
                assert!(!allowed.iter().any(|a| a == "@mount" || a == "chroot"));
            }
            other => panic!("{other:?}"),
        }
        match get(&jailer, "SystemCallFilter", 1) {
            UnitProperty::Filter(_, false, denied) => {
                for call in ["@raw-io", "@module", "@reboot", "@debug", "bpf"] {
                    assert!(denied.iter().any(|a| a == call), "{call}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn direct_children_run_in_their_own_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let args = vec!["-c".to_owned(), "echo started; sleep 5".to_owned()];
        let (mut watched, id) = Direct
            .start(StartRequest {
                vm_id: "0123456789abcdef",
                vm_name: "t",
                program: Path::new("/bin/sh"),
                args: &args,
                log: &log,
                memory_mib: 128,
                vcpus: 1,
                writable: &[],
                jit: false,
                launcher: Launcher::Bare,
            })
            .await
            .expect("start");
        assert!(id.alive());
        assert!(!watched.ended());
        let sid =
            nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(id.pid as i32))).expect("sid");
        assert_eq!(sid.as_raw(), id.pid as i32, "a session of its own");
        let status = std::fs::read_to_string(format!("/proc/{}/status", id.pid)).expect("status");
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        id.signal(nix::sys::signal::Signal::SIGKILL).expect("kill");
        let ended = banger_testbed::eventually(std::time::Duration::from_secs(5), || {
            watched.ended().then_some(())
        });
        assert!(ended.is_some());
        assert_eq!(Direct.unit("x"), None);
    }

    #[test]
    fn a_vmm_is_known_by_the_runtime_directory_its_arguments_name() {
        let runs = &[PathBuf::from("/run/banger/vms")];
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            vm_of(
                &args(&[
                    "-qmp",
                    "unix:/run/banger/vms/0123abcd/control.sock,server=on"
                ]),
                runs
            )
            .as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            vm_of(
                &args(&["--api-sock", "/run/banger/vms/ff00/control.sock"]),
                runs
            )
            .as_deref(),
            Some("ff00")
        );
        // The directory itself, another runtime directory, odd names.
        assert_eq!(vm_of(&args(&["/run/banger/vms/"]), runs), None);
        assert_eq!(vm_of(&args(&["/run/banger/vms/abc"]), runs), None);
        assert_eq!(vm_of(&args(&["/run/other/vms/abc/x"]), runs), None);
        assert_eq!(vm_of(&args(&["/run/banger/vms/a b/x"]), runs), None);
        assert_eq!(vm_of(&args(&["/run/banger/vms/../x"]), runs), None);
    }

    #[test]
    fn a_jailed_firecracker_is_known_by_its_id_and_uid() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let uid = crate::jail::VMM_GROUP + 3;
        // What the jailer execs (docs/jailer.md).
        let exec = args(&[
            "/firecracker",
            "--id=0123abcd",
            "--start-time-us=12",
            "--start-time-cpu-us=3",
            "--api-sock",
            "/api.sock",
        ]);
        assert_eq!(jailed_vm_of(&exec, uid).as_deref(), Some("0123abcd"));
        // Not a VM's uid (root, anyone, the group's own id), another
        // program, or an id the jailer would refuse.
        for other in [0, 1000, crate::jail::VMM_GROUP, crate::jail::VMM_IDS.end] {
            assert_eq!(jailed_vm_of(&exec, other), None, "{other}");
        }
        assert_eq!(
            jailed_vm_of(&args(&["/bin/sleep", "--id=0123abcd"]), uid),
            None
        );
        assert_eq!(
            jailed_vm_of(&args(&["/firecracker", "--id=a/b"]), uid),
            None
        );
        assert_eq!(jailed_vm_of(&args(&["/firecracker"]), uid), None);
    }

    #[tokio::test]
    async fn the_direct_supervisor_finds_the_vmms_that_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runs = dir.path().join("vms");
        let log = dir.path().join("log");
        // A process started as a VMM is: its arguments name its socket
        // (tail complains about the missing file and follows /dev/null).
        let args = vec![
            "-f".to_owned(),
            "/dev/null".to_owned(),
            format!("{}/beef01/control.sock", runs.display()),
        ];
        let (mut watched, id) = Direct
            .start(StartRequest {
                vm_id: "beef01",
                vm_name: "v",
                program: Path::new("/usr/bin/tail"),
                args: &args,
                log: &log,
                memory_mib: 64,
                vcpus: 1,
                writable: &[],
                jit: false,
                launcher: Launcher::Bare,
            })
            .await
            .expect("started");
        let seen = Direct
            .running(std::slice::from_ref(&runs))
            .await
            .expect("listed");
        assert_eq!(seen, [("beef01".to_owned(), id)]);
        id.signal(nix::sys::signal::Signal::SIGKILL)
            .expect("killed");
        while !watched.ended() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            Direct
                .running(std::slice::from_ref(&runs))
                .await
                .expect("listed")
                .is_empty()
        );
    }
}
