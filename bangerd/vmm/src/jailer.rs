//! Firecracker under its own jailer, as upstream's `docs/jailer.md`
//! describes it: the jailer (root) makes a chroot per VM, makes
//! `/dev/kvm` and `/dev/net/tun` in it, pivots into it, becomes the VM's
//! uid and gid and execs Firecracker, which then opens only what the
//! chroot holds.
//!
//! What the VM needs must be in the chroot before that, owned by (or
//! readable to) that uid: [`prepare`] hard-links the VM's files into it
//! (the links are the files themselves, so what the guest writes lands in
//! the VM's directory) and hands the disks and logs to the VM's uid; the
//! kernel stays root's, readable to [`crate::jail::VMM_GROUP`], the
//! jailed gid. A device-mapper system disk cannot be linked across file
//! systems and bangerd may not make device nodes (no `CAP_MKNOD`), so
//! its node is made by `bangerd jailer-exec` ([`exec`]), which runs in
//! the jailer's place inside the VM's unit, where the jailer's own
//! capabilities are, and then execs the jailer.
//!
//! The chroot's root belongs to the VM's uid once the jailer ran, so
//! bangerd never follows a path inside it: the sockets are reached with
//! [`banger_agent_host::connect_nofollow`], files only through their
//! links in the VM's own (root's) directory, and [`release`] removes the
//! chroot without following links.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{LaunchSpec, VmPaths};

/// bangerd's argument that makes it this module's [`exec`].
pub const HELPER_ARG: &str = "jailer-exec";

/// Names inside the chroot, as the jailed Firecracker sees them.
pub mod inside {
    /// The kernel.
    pub const KERNEL: &str = "/vmlinux";
    /// The initramfs.
    pub const INITRD: &str = "/initrd.img";
    /// The system disk (a link, or a device node).
    pub const SYSTEM_DISK: &str = "/system.disk";
    /// The work disk.
    pub const WORK_DISK: &str = "/work.ext4";
    /// The serial console's output.
    pub const CONSOLE: &str = "/console.log";
    /// Firecracker's own log.
    pub const LOG: &str = "/firecracker.log";
    /// Firecracker's metrics.
    pub const METRICS: &str = "/metrics.json";
    /// The API socket.
    pub const API: &str = "/api.sock";
    /// The hybrid vsock's host socket.
    pub const VSOCK: &str = "/vsock.sock";
    /// A snapshot's device state, while it is written or loaded.
    pub const STATE: &str = "/snapshot.state";
    /// A snapshot's memory, while it is written or loaded.
    pub const MEMORY: &str = "/snapshot.mem";
}

/// Where one VM's chroot is: `<chroot_base>/<exec_file_name>/<id>/root`,
/// with the base inside the VM's directory (same file system as its
/// disks, gone with the VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The jailer's `--chroot-base-dir`.
    pub base: PathBuf,
    /// The chroot.
    pub root: PathBuf,
}

impl Layout {
    /// The chroot of the VM whose files are `paths`, for the Firecracker
    /// executable `exec_file`.
    pub fn new(paths: &VmPaths, exec_file: &Path) -> Self {
        let id = paths.dir.file_name().unwrap_or_default();
        let name = exec_file.file_name().unwrap_or_default();
        let base = Self::base_of(paths);
        let root = base.join(name).join(id).join("root");
        Self { base, root }
    }

    /// The jail base of the VM whose files are `paths`, whatever the
    /// executable.
    pub fn base_of(paths: &VmPaths) -> PathBuf {
        paths.dir.join("jail")
    }

    /// Where bangerd finds `inside` (one of [`inside`]).
    pub fn host(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

/// Why the jailer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    /// The jailer execs only a file whose name holds `firecracker`.
    #[error(
        "the jailer runs only an executable whose name contains \"firecracker\", and vm.firecracker_bin is {0}"
    )]
    ExecName(PathBuf),
    /// A VM id the jailer refuses (alphanumerics and hyphens, at most 64).
    #[error("{0:?} is not an id the jailer accepts")]
    Id(String),
    /// Preparing the chroot failed.
    #[error("cannot prepare the jail at {at}: {source}")]
    Prepare {
        /// What was being made.
        at: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Check what the jailer checks of its arguments.
pub fn check(exec_file: &Path, id: &str) -> Result<(), JailerError> {
    check_exec_name(exec_file)?;
    check_id(id)
}

/// The jailer execs only a file whose name contains `firecracker`.
pub fn check_exec_name(exec_file: &Path) -> Result<(), JailerError> {
    let named = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("firecracker"));
    if named {
        Ok(())
    } else {
        Err(JailerError::ExecName(exec_file.to_owned()))
    }
}

/// The jailer takes ids of alphanumerics and hyphens, at most 64.
pub fn check_id(id: &str) -> Result<(), JailerError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(JailerError::Id(id.to_owned()));
    }
    Ok(())
}

/// The jailer's arguments for `spec` (documented usage: id, exec file,
/// uid, gid, chroot base; Firecracker's own after `--`, where the jailer
/// adds `--id` itself). No `--daemonize` (the supervisor watches the
/// process, which becomes Firecracker) and no `--new-pid-ns` (which
/// would fork); limits come from the VM's unit, not `--cgroup`.
pub fn args(layout: &Layout, exec_file: &Path, id: &str, uid: u32, gid: u32) -> Vec<String> {
    vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        exec_file.to_string_lossy().into_owned(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        gid.to_string(),
        "--chroot-base-dir".into(),
        layout.base.to_string_lossy().into_owned(),
        "--".into(),
        "--api-sock".into(),
        inside::API.into(),
    ]
}

/// A block device node `jailer-exec` makes in the chroot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its path.
    pub path: PathBuf,
    /// The device's number (`st_rdev`).
    pub rdev: u64,
    /// Its owner (uid and gid).
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

/// What `jailer-exec` does before it execs the jailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes {
    /// The nodes to make.
    pub nodes: Vec<Node>,
}

/// Put what VM `spec` needs into its chroot (made afresh): hard links
/// of its kernel, initramfs, disks and logs, the disks and logs handed
/// to `uid`:`gid`. Returns the device nodes only `jailer-exec` can make.
pub fn prepare(
    layout: &Layout,
    spec: &LaunchSpec,
    uid: u32,
    gid: u32,
) -> Result<Nodes, JailerError> {
    let err = |at: &Path| {
        let at = at.to_owned();
        move |source| JailerError::Prepare { at, source }
    };
    remove(&layout.base).map_err(err(&layout.base))?;
    std::fs::create_dir_all(&layout.root).map_err(err(&layout.root))?;
    let p = &spec.paths;
    // The outputs exist beforehand: Firecracker appends to them.
    for file in [&p.vmm_log, &p.console_log] {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(err(file))?;
    }
    let own = |at: &Path| -> Result<(), JailerError> {
        // Its own, and nobody else's (the group is every jailed VMM's).
        std::os::unix::fs::lchown(at, Some(uid), Some(gid)).map_err(err(at))?;
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600)).map_err(err(at))
    };
    let link = |from: &Path, to: &str| -> Result<(), JailerError> {
        let at = layout.host(to);
        std::fs::hard_link(from, &at).map_err(err(&at))?;
        own(&at)
    };
    // Shared with every VMM already (root's, group VMM_GROUP): linked,
    // or copied with the same owner and mode from another file system.
    let shared = |from: &Path, to: &str| -> Result<(), JailerError> {
        let at = layout.host(to);
        match std::fs::hard_link(from, &at) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                let meta = std::fs::metadata(from).map_err(err(from))?;
                std::fs::copy(from, &at).map_err(err(&at))?;
                std::os::unix::fs::lchown(&at, Some(meta.uid()), Some(meta.gid()))
                    .map_err(err(&at))?;
                std::fs::set_permissions(&at, meta.permissions()).map_err(err(&at))
            }
            other => other.map_err(err(&at)),
        }
    };
    shared(&spec.kernel, inside::KERNEL)?;
    if let Some(initrd) = &spec.initrd {
        shared(initrd, inside::INITRD)?;
    }
    link(&p.work_disk, inside::WORK_DISK)?;
    link(&p.console_log, inside::CONSOLE)?;
    link(&p.vmm_log, inside::LOG)?;
    // Nobody reads the metrics but the guest's operator: a file of the
    // chroot's own (the runtime directory is another file system).
    let metrics = layout.host(inside::METRICS);
    std::fs::File::create(&metrics).map_err(err(&metrics))?;
    own(&metrics)?;
    let meta = std::fs::metadata(&spec.system_disk).map_err(err(&spec.system_disk))?;
    let mut nodes = Vec::new();
    if meta.file_type().is_block_device() {
        nodes.push(Node {
            path: layout.host(inside::SYSTEM_DISK),
            rdev: meta.rdev(),
            uid,
            gid,
        });
    } else {
        link(&spec.system_disk, inside::SYSTEM_DISK)?;
    }
    Ok(Nodes { nodes })
}

/// Remove a tree without following links (std's `remove_dir_all` opens
/// each directory with `O_NOFOLLOW`); a missing one is fine.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Undo [`prepare`] once the VMM is gone: remove the chroot and give the
/// VM's files back to root. Does nothing for a VM that ran unjailed.
pub fn release(paths: &VmPaths) -> std::io::Result<()> {
    let base = Layout::base_of(paths);
    if std::fs::symlink_metadata(&base).is_err() {
        return Ok(());
    }
    remove(&base)?;
    for file in [
        &paths.work_disk,
        &paths.system_disk,
        &paths.console_log,
        &paths.vmm_log,
    ] {
        match std::os::unix::fs::lchown(file, Some(0), Some(0)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Make `nodes` (mode 0600, a stale file in the way replaced).
pub fn make_nodes(nodes: &Nodes) -> Result<(), String> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    for node in &nodes.nodes {
        let _ = std::fs::remove_file(&node.path);
        mknod(
            &node.path,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            node.rdev,
        )
        .map_err(|e| format!("cannot make {}: {e}", node.path.display()))?;
        std::os::unix::fs::lchown(&node.path, Some(node.uid), Some(node.gid))
            .map_err(|e| format!("cannot hand over {}: {e}", node.path.display()))?;
    }
    Ok(())
}

/// The command that makes `nodes` and then runs the jailer `jailer`
/// with `args`: bangerd's `helper` as `jailer-exec`, or the jailer
/// itself when there is nothing to make.
pub fn command(
    helper: &Path,
    nodes: &Nodes,
    jailer: &Path,
    args: &[String],
) -> (PathBuf, Vec<String>) {
    if nodes.nodes.is_empty() {
        return (jailer.to_owned(), args.to_vec());
    }
    let mut argv = vec![
        HELPER_ARG.to_owned(),
        serde_json::to_string(nodes).unwrap_or_default(),
        "--".to_owned(),
        jailer.to_string_lossy().into_owned(),
    ];
    argv.extend(args.iter().cloned());
    (helper.to_owned(), argv)
}

/// `bangerd jailer-exec NODES -- JAILER [ARGS...]`: make the nodes, exec
/// the jailer. Returns only on failure, with why.
pub fn exec(args: &[String]) -> String {
    let run = || -> Result<std::convert::Infallible, String> {
        let (spec, program, rest) =
            crate::jail::helper_args(args, "usage: bangerd jailer-exec NODES -- JAILER [ARGS...]")?;
        let nodes: Nodes =
            serde_json::from_str(spec).map_err(|e| format!("bad jailer-exec spec: {e}"))?;
        make_nodes(&nodes)?;
        let (program, argv) = crate::jail::command_line(program, rest)?;
        crate::jail::execv(&program, &argv)
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests;
