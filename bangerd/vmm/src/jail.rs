//! VMMs as users of their own. A VMM is the largest thing banger runs on a
//! guest's behalf; taken over, it must hold nothing but its own VM. So it
//! does not open its VM's files itself. bangerd opens what a [`Jail`]
//! lists (the disks, the console log, the listening QMP and agent
//! sockets, the attached TAP) and offers them on a root-only socket
//! ([`Handoff`]); `bangerd vmm-exec` (this module's [`exec`], bangerd's
//! own binary, started by the supervisor in the VMM's place) takes them
//! (or, for the KVM probe, opens them itself), puts each at the
//! descriptor number the VMM's arguments name, leaves the host's network
//! namespace where systemd did not, becomes the VM's own uid and gid (no
//! capability, an empty bounding set, no root group, `no_new_privs`) and
//! execs the VMM. What the VMM opens by path after
//! that is only what any uid may open: the kernel and initramfs (group
//! [`VMM_GROUP`]) and `/dev/kvm` (its group is added when it grants
//! read and write).
//!
//! Each VM's uid and gid are [`VMM_IDS`]`.start` plus the host index of
//! its address: unique among the VMs that hold an address, in the range
//! systemd leaves unused (no account, container or dynamic user has
//! them), and never a uid of anything else on the host. Two VMMs never
//! share a uid, so neither can signal, trace or read the other.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The host ids VMMs run as: the first is [`VMM_GROUP`] (and the KVM
/// probe's uid), the rest one per VM.
pub const VMM_IDS: std::ops::Range<u32> = 0x7B01_0000..0x7B02_0000;

/// The group of the files every VMM may read (kernels and initramfs
/// images), and a supplementary group of every VMM.
pub const VMM_GROUP: u32 = VMM_IDS.start;

/// bangerd's argument that makes it this module's [`exec`].
pub const HELPER_ARG: &str = "vmm-exec";

/// The uid (and gid) of the VM whose address has host index `index`
/// (its offset in the subnet: 1 and up; subnets are /16 or smaller).
pub fn vm_uid(index: u32) -> Option<u32> {
    (index > 0)
        .then(|| VMM_IDS.start.checked_add(index))
        .flatten()
        .filter(|id| VMM_IDS.contains(id))
}

/// How a file is opened for the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
    /// Write at the end, created (mode 0600) when missing.
    Append,
}

/// What one descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A file (a disk, a device, the console log).
    File {
        /// Its path.
        path: PathBuf,
        /// How it is opened.
        access: Access,
    },
    /// A unix stream socket bound at `path` (a stale socket there is
    /// replaced), mode 0600, listening.
    Listen {
        /// Where it is bound.
        path: PathBuf,
    },
    /// A unix stream socket connected to the one listening at `path`
    /// (the sockets of a VM's host folders).
    Connect {
        /// Where the listener is.
        path: PathBuf,
    },
    /// The persistent TAP `name`, attached (`IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, as QEMU asks for its own).
    Tap {
        /// The interface.
        name: String,
    },
}

/// One descriptor the VMM gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pass {
    /// Its number in the VMM (3 to 63).
    pub fd: RawFd,
    /// What it is.
    pub source: Source,
}

/// Who a VMM runs as and what it is handed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jail {
    /// Its uid and gid (from [`VMM_IDS`], never 0).
    pub uid: u32,
    /// Supplementary groups besides the `/dev/kvm` group.
    pub groups: Vec<u32>,
    /// Its descriptors.
    pub fds: Vec<Pass>,
    /// The pid whose end kills it (`PR_SET_PDEATHSIG`, which leaving
    /// root clears, is set again); it exits at once when that process is
    /// already gone. `None`: it outlives its starter (VMMs).
    #[serde(default)]
    pub parent: Option<u32>,
    /// Leave the host's network namespace for an empty one of its own
    /// once everything is open (the TAP is attached by then). Takes
    /// `CAP_SYS_ADMIN`: only where vmm-exec is bangerd's child.
    #[serde(default)]
    pub private_network: bool,
    /// Where bangerd hands over the descriptors it opened itself
    /// ([`Handoff`]); `None`: vmm-exec opens each [`Pass::source`].
    #[serde(default)]
    pub handoff: Option<PathBuf>,
}

/// The highest descriptor number a [`Pass`] may name.
const MAX_FD: RawFd = 63;

impl Jail {
    /// The command that runs `program args` in this jail: bangerd's
    /// binary `helper` as `vmm-exec SPEC -- PROGRAM ARGS...`.
    pub fn command(
        &self,
        helper: &Path,
        program: &Path,
        args: &[String],
    ) -> (PathBuf, Vec<String>) {
        let spec = serde_json::to_string(self).unwrap_or_default();
        let mut argv = vec![HELPER_ARG.to_owned(), spec, "--".to_owned()];
        argv.push(program.to_string_lossy().into_owned());
        argv.extend(args.iter().cloned());
        (helper.to_owned(), argv)
    }

    fn check(&self) -> Result<(), String> {
        if !VMM_IDS.contains(&self.uid) {
            return Err(format!("uid {} is not a VMM's", self.uid));
        }
        if self.groups.contains(&0) {
            return Err("a VMM never gets the root group".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.fds {
            if !(3..=MAX_FD).contains(&p.fd) || !seen.insert(p.fd) {
                return Err(format!(
                    "descriptor {} is not 3 to {MAX_FD} or named twice",
                    p.fd
                ));
            }
        }
        Ok(())
    }
}

/// `/dev/kvm`'s group when it grants read and write to its group (udev
/// makes it `root:kvm 0660`); not root's group.
pub fn kvm_group(kvm: &Path) -> Option<u32> {
    let meta = std::fs::metadata(kvm).ok()?;
    (meta.gid() != 0 && meta.mode() & 0o060 == 0o060).then_some(meta.gid())
}

/// Whether a VMM's uid may open `/dev/kvm` read-write: through its group
/// ([`kvm_group`]) or because anyone may. The reason when not.
pub fn kvm_access(kvm: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(kvm).map_err(|e| format!("{}: {e}", kvm.display()))?;
    if meta.mode() & 0o006 == 0o006 || kvm_group(kvm).is_some() {
        return Ok(());
    }
    Err(format!(
        "{} is mode {:o}, uid {} gid {}: VMMs run as users of their own and need it \
         group read-write for a group such as kvm (udev's default: root:kvm 0660)",
        kvm.display(),
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid()
    ))
}

fn open(source: &Source) -> Result<OwnedFd, String> {
    match source {
        Source::File { path, access } => {
            let mut o = std::fs::OpenOptions::new();
            match access {
                Access::Read => o.read(true),
                Access::ReadWrite => o.read(true).write(true),
                Access::Append => o.append(true).create(true).mode(0o600),
            };
            let file = o
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            Ok(file.into())
        }
        Source::Listen { path } => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
            Ok(listener.into())
        }
        Source::Connect { path } => std::os::unix::net::UnixStream::connect(path)
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display())),
        Source::Tap { name } => banger_net::link::attach_tap(name).map_err(|e| e.message),
    }
}

/// The most descriptors one jail takes.
const MAX_PASSES: usize = 16;

/// Descriptors bangerd opened for a VMM (its disks, console, sockets and
/// attached TAP), waiting on a unix socket in the VM's root-only runtime
/// directory for the one vmm-exec that takes them. So the VMM's unit
/// needs neither the right to open them nor the host's network
/// namespace (the TAP is attached by name in it): systemd's
/// `PrivateNetwork=` comes before vmm-exec runs.
#[derive(Debug)]
pub struct Handoff {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    fds: Vec<OwnedFd>,
}

impl Handoff {
    /// Open every source of `passes` and listen at `path` (a stale
    /// socket there is replaced).
    pub fn open(path: &Path, passes: &[Pass]) -> Result<Self, String> {
        if passes.len() > MAX_PASSES {
            return Err(format!(
                "{} descriptors are more than {MAX_PASSES}",
                passes.len()
            ));
        }
        let fds = passes
            .iter()
            .map(|p| open(&p.source))
            .collect::<Result<Vec<_>, _>>()?;
        let listener = std::os::unix::net::UnixListener::from(open(&Source::Listen {
            path: path.to_owned(),
        })?);
        Ok(Self {
            listener,
            path: path.to_owned(),
            fds,
        })
    }

    /// Hand the descriptors to the first process of root's that connects
    /// within `limit` (another is turned away); the socket goes either way.
    pub fn serve(self, limit: std::time::Duration) -> Result<(), String> {
        self.serve_to(limit).map(drop)
    }

    /// [`Handoff::serve`], keeping the connection the descriptors went
    /// over (on which a helper answers how it got on).
    pub fn serve_to(
        self,
        limit: std::time::Duration,
    ) -> Result<std::os::unix::net::UnixStream, String> {
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, getsockopt, sendmsg, sockopt};
        let until = std::time::Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no vmm-exec came for its descriptors within {} s",
                    limit.as_secs()
                ));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&self.listener),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(format!("cannot wait for vmm-exec: {e}")),
            }
            let (stream, _) = self
                .listener
                .accept()
                .map_err(|e| format!("cannot take vmm-exec's connection: {e}"))?;
            let uid = getsockopt(&stream, sockopt::PeerCredentials)
                .map_err(|e| format!("cannot tell who connected: {e}"))?
                .uid();
            if uid != 0 {
                continue;
            }
            let raw: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(b"fds")],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )
            .map_err(|e| format!("cannot hand the descriptors over: {e}"))?;
            return Ok(stream);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take `count` descriptors from bangerd's [`Handoff`] at `path` (what
/// vmm-exec does; bangerd itself takes them back when the VMM's start
/// failed before it came).
pub fn receive(path: &Path, count: usize) -> Result<Vec<OwnedFd>, String> {
    receive_on(path, count).map(|(_, fds)| fds)
}

/// [`receive`], keeping the connection to bangerd.
pub fn receive_on(
    path: &Path,
    count: usize,
) -> Result<(std::os::unix::net::UnixStream, Vec<OwnedFd>), String> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("cannot reach bangerd at {}: {e}", path.display()))?;
    let mut buf = [0u8; 8];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSES]);
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("cannot take the descriptors: {e}"))?;
    let mut fds = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| format!("cannot read the descriptors: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if fds.len() != count {
        return Err(format!(
            "bangerd handed over {} descriptors, not {count}",
            fds.len()
        ));
    }
    Ok((stream, fds))
}

/// Put every opened descriptor at its number, inheritable; nothing else
/// of ours stays open across exec (Rust opens everything close-on-exec).
pub(crate) fn place(opened: Vec<(RawFd, OwnedFd)>) -> Result<(), String> {
    // First above every target, so that placing one never closes another.
    let mut high = Vec::new();
    for (fd, owned) in opened {
        let moved = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(MAX_FD + 1))
            .map_err(|e| format!("cannot move descriptor {fd}: {e}"))?;
        drop(owned);
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
        high.push((fd, unsafe { OwnedFd::from_raw_fd(moved) }));
    }
    for (fd, owned) in high {
        // dup2 leaves the new descriptor without close-on-exec.
        // SAFETY: both are descriptor numbers; `fd` is 3..=63, which
        // nothing of ours holds any more.
        if unsafe { nix::libc::dup2(owned.as_raw_fd(), fd) } != fd {
            return Err(format!(
                "cannot place descriptor {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The capability sets of this process, from `/proc/self/status`.
fn capabilities() -> Result<Vec<(String, u64)>, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    Ok(status
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let set = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"].contains(&k);
            Some((k.to_owned(), u64::from_str_radix(v.trim(), 16).ok()?)).filter(|_| set)
        })
        .collect())
}

fn become_vmm(jail: &Jail) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let mut groups: Vec<Gid> = jail.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    if let Some(kvm) = kvm_group(Path::new("/dev/kvm")) {
        groups.push(Gid::from_raw(kvm));
    }
    // The bounding set first (that takes CAP_SETPCAP, which leaving
    // root drops): nothing the VMM execs may ever hold a capability.
    for cap in 0..=63 {
        // SAFETY: prctl(2) with integer arguments only.
        let done = unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if done != 0 {
            let e = std::io::Error::last_os_error();
            // Past the kernel's last capability.
            if e.raw_os_error() == Some(nix::libc::EINVAL) {
                break;
            }
            return Err(format!(
                "cannot drop capability {cap} from the bounding set: {e}"
            ));
        }
    }
    setgroups(&groups).map_err(|e| format!("cannot set the groups: {e}"))?;
    let gid = Gid::from_raw(jail.uid);
    setresgid(gid, gid, gid).map_err(|e| format!("cannot become gid {gid}: {e}"))?;
    let uid = Uid::from_raw(jail.uid);
    setresuid(uid, uid, uid).map_err(|e| format!("cannot become uid {uid}: {e}"))?;
    if let Some(parent) = jail.parent {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
        if nix::unistd::getppid().as_raw().unsigned_abs() != parent {
            return Err(format!("its starter {parent} is gone"));
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
    // Leaving uid 0 for good clears every capability; make sure of it.
    if let Some((set, value)) = capabilities()?.into_iter().find(|(_, v)| *v != 0) {
        return Err(format!("{set} is {value:x} after becoming uid {uid}"));
    }
    Ok(())
}

/// For a jail with a [`Jail::parent`] (the KVM probe, which its starter
/// must be able to end): fork, and in the parent keep the program
/// (its child, same uid) until standard input reaches its end, which is
/// how the starter, holding no `CAP_KILL` over another uid, ends it:
/// then the program is killed. The keeper exits with the program's
/// status; the program dies with the keeper. Returns in the child, which
/// goes on to exec.
fn keep(program: &CString) -> Result<(), String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, getpid};
    let keeper = getpid();
    // SAFETY: vmm-exec runs before bangerd starts any thread.
    match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Child => {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
            if nix::unistd::getppid() != keeper {
                return Err("its keeper is gone".into());
            }
            Ok(())
        }
        ForkResult::Parent { child } => {
            let stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        std::process::exit(128 + signal as i32)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(format!(
                            "cannot wait for {}: {e}",
                            program.to_string_lossy()
                        ));
                    }
                }
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&stdin),
                    nix::poll::PollFlags::POLLIN,
                )];
                let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16))
                    .map_err(|e| format!("cannot poll standard input: {e}"))?;
                if ready > 0 {
                    let n = std::io::Read::read(&mut stdin.lock(), &mut buf).unwrap_or(0);
                    if n == 0 {
                        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                        let _ = waitpid(child, None);
                        std::process::exit(137);
                    }
                }
            }
        }
    }
}

/// `bangerd vmm-exec SPEC -- PROGRAM ARGS...`: set the VMM up as SPEC
/// (a [`Jail`] in JSON) says and exec it. Returns only on failure, with
/// the reason (bangerd prints it to the VMM's log and exits 126).
pub fn exec(args: &[String]) -> String {
    let run = || -> Result<std::convert::Infallible, String> {
        let (spec, program, rest) =
            helper_args(args, "usage: bangerd vmm-exec SPEC -- PROGRAM [ARGS...]")?;
        let jail: Jail =
            serde_json::from_str(spec).map_err(|e| format!("bad vmm-exec spec: {e}"))?;
        jail.check()?;
        let opened = match &jail.handoff {
            Some(path) => jail
                .fds
                .iter()
                .map(|p| p.fd)
                .zip(receive(path, jail.fds.len())?)
                .collect(),
            None => jail
                .fds
                .iter()
                .map(|p| open(&p.source).map(|fd| (p.fd, fd)))
                .collect::<Result<Vec<_>, _>>()?,
        };
        place(opened)?;
        if jail.private_network {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot make a network namespace: {e}"))?;
        }
        become_vmm(&jail)?;
        let (program, argv) = command_line(program, rest)?;
        if jail.parent.is_some() {
            keep(&program)?;
        }
        execv(&program, &argv)
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The arguments of bangerd's exec helpers, `SPEC -- PROGRAM [ARGS...]`:
/// the spec, the program and its arguments, or `usage`.
pub(crate) fn helper_args<'a>(
    args: &'a [String],
    usage: &str,
) -> Result<(&'a str, &'a str, &'a [String]), String> {
    match args {
        [spec, dashes, program, rest @ ..] if dashes == "--" => Ok((spec, program, rest)),
        _ => Err(usage.to_owned()),
    }
}

/// `program` and its argv (`program`, then `rest`) for execv(2).
pub(crate) fn command_line(
    program: &str,
    rest: &[String],
) -> Result<(CString, Vec<CString>), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"));
    let program = c(program)?;
    let mut argv = vec![program.clone()];
    for a in rest {
        argv.push(c(a)?);
    }
    Ok((program, argv))
}

/// Become `program`; returns only with why not.
pub(crate) fn execv(
    program: &CString,
    argv: &[CString],
) -> Result<std::convert::Infallible, String> {
    nix::unistd::execv(program, argv)
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_uids_come_from_their_own_range() {
        assert_eq!(vm_uid(0), None, "the network address is no VM's");
        assert_eq!(vm_uid(1), Some(0x7B01_0001));
        assert_eq!(vm_uid(65535), Some(0x7B01_FFFF));
        assert_eq!(vm_uid(65536), None);
        assert!(!VMM_IDS.contains(&0));
    }

    #[test]
    fn a_jail_round_trips_as_the_helper_command() {
        let jail = Jail {
            uid: vm_uid(7).expect("uid"),
            groups: vec![VMM_GROUP],
            fds: vec![
                Pass {
                    fd: 3,
                    source: Source::File {
                        path: "/var/lib/banger/vms/x/work.ext4".into(),
                        access: Access::ReadWrite,
                    },
                },
                Pass {
                    fd: 4,
                    source: Source::Tap {
                        name: "tap-x".into(),
                    },
                },
            ],
            parent: None,
            private_network: true,
            handoff: None,
        };
        let (program, argv) = jail.command(
            Path::new("/usr/libexec/bangerd"),
            Path::new("/usr/bin/qemu-system-x86_64"),
            &["-M".into(), "microvm".into()],
        );
        assert_eq!(program, Path::new("/usr/libexec/bangerd"));
        assert_eq!(argv[0], HELPER_ARG);
        assert_eq!(
            argv[2..],
            ["--", "/usr/bin/qemu-system-x86_64", "-M", "microvm"]
        );
        let back: Jail = serde_json::from_str(&argv[1]).expect("json");
        assert_eq!(back, jail);
        assert!(jail.check().is_ok());
    }

    #[test]
    fn bad_jails_are_refused_before_anything_is_opened() {
        let jail = |uid, groups: Vec<u32>, fds: &[RawFd]| Jail {
            uid,
            groups,
            fds: fds
                .iter()
                .map(|fd| Pass {
                    fd: *fd,
                    source: Source::Listen {
                        path: "/nonexistent/x".into(),
                    },
                })
                .collect(),
            parent: None,
            private_network: false,
            handoff: None,
        };
        assert!(jail(0, vec![], &[]).check().is_err(), "root");
        assert!(jail(1000, vec![], &[]).check().is_err(), "a user's uid");
        let uid = vm_uid(2).expect("uid");
        assert!(jail(uid, vec![0], &[]).check().is_err(), "root's group");
        assert!(jail(uid, vec![], &[2]).check().is_err(), "stderr");
        assert!(jail(uid, vec![], &[64]).check().is_err(), "too high");
        assert!(jail(uid, vec![], &[5, 5]).check().is_err(), "twice");
        assert!(jail(uid, vec![VMM_GROUP], &[3, 9]).check().is_ok());
        // Bad arguments fail with a reason, without touching anything.
        assert!(exec(&["{}".into()]).contains("usage"));
        assert!(
            exec(&["nojson".into(), "--".into(), "/bin/true".into()]).contains("bad vmm-exec spec")
        );
    }

    #[test]
    fn a_handoff_gives_its_descriptors_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk");
        std::fs::write(&disk, b"disk bytes").expect("write");
        let passes = [
            Pass {
                fd: 3,
                source: Source::File {
                    path: disk.clone(),
                    access: Access::Read,
                },
            },
            Pass {
                fd: 4,
                source: Source::Listen {
                    path: dir.path().join("qmp.sock"),
                },
            },
        ];
        let at = dir.path().join("handoff.sock");
        let handoff = Handoff::open(&at, &passes).expect("opened");
        let server = std::thread::spawn(move || handoff.serve(std::time::Duration::from_secs(5)));
        let fds = receive(&at, 2).expect("received");
        server.join().expect("thread").expect("served");
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::fs::File::from(fds[0].try_clone().expect("dup")),
            &mut text,
        )
        .expect("read");
        assert_eq!(text, "disk bytes");
        // The second is the listening socket: a client gets through.
        let listener = std::os::unix::net::UnixListener::from(fds[1].try_clone().expect("dup"));
        let _client =
            std::os::unix::net::UnixStream::connect(dir.path().join("qmp.sock")).expect("connect");
        listener.accept().expect("accepted");
        // Once only: the socket is gone.
        assert!(!at.exists());
        assert!(receive(&at, 2).is_err());
        // Nobody comes: it gives up in time, and says so.
        let lonely = Handoff::open(&at, &passes[..1]).expect("opened");
        let e = lonely
            .serve(std::time::Duration::from_millis(200))
            .expect_err("nobody came");
        assert!(e.contains("no vmm-exec came"), "{e}");
        assert!(!at.exists());
    }

    #[test]
    fn kvm_access_needs_a_group_or_everyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("kvm");
        std::fs::write(&node, b"").expect("write");
        let set = |mode, gid| {
            std::fs::set_permissions(&node, std::fs::Permissions::from_mode(mode)).expect("chmod");
            std::os::unix::fs::chown(&node, None, Some(gid)).expect("chgrp");
        };
        set(0o600, 0);
        assert!(
            kvm_access(&node).is_err_and(|e| e.contains("group read-write")),
            "root only"
        );
        assert_eq!(kvm_group(&node), None);
        set(0o660, 0);
        assert!(kvm_access(&node).is_err(), "root's group is never given");
        set(0o660, 4242);
        assert_eq!(kvm_group(&node), Some(4242));
        assert!(kvm_access(&node).is_ok());
        set(0o666, 0);
        assert!(kvm_access(&node).is_ok());
    }
}
