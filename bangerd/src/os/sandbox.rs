//! The sandbox the e2fsprogs tools run in when they parse a user's or a
//! guest's file system (`banger_formats::tool`): no capability on the
//! host, no network, and none of the host's data but the files the run
//! names.
//!
//! bangerd cannot make namespaces itself (`RestrictNamespaces=yes`, no
//! `@mount` in its unit), so each run is a step ([`crate::artifacts::build::steps`]):
//! a transient unit where systemd is PID 1, else a child. The step runs
//! bangerd's own binary as `bangerd sandbox-exec SPEC` ([`exec`]), which,
//! as root, forks a child that
//!
//! 1. makes a mount namespace whose root is an empty tmpfs holding
//!    `/usr` (and the `/bin`, `/lib`... links or mounts), a minimal
//!    `/etc` (the e2fsprogs configuration, the loader cache, an empty
//!    `mtab`), `/dev/null` and friends, an empty `/tmp`, and each named
//!    file at its own path (read-only unless writable), all `nosuid`;
//!    the old root is detached (`pivot_root`), so nothing else is there
//!    to reach, not even `/proc`;
//! 2. makes a user namespace (its root is host uid/gid [`IDS`], its ids
//!    0–65535 host ids `IDS`–`IDS + 65535`), a network namespace with
//!    only a down loopback, and an IPC namespace;
//! 3. becomes that namespace's root with only the file capabilities a
//!    tool needs over its own ids (chown, dac_override, dac_read_search,
//!    fowner, fsetid: `debugfs rdump` keeps owners, `mkfs.ext4 -d` reads
//!    every file), `no_new_privs`, and execs the tool.
//!
//! The named files are given to [`IDS`] for the run and handed back
//! afterwards, so the tool may open them and nothing else of the host's
//! is its own. Files a tool makes in a writable directory (the work-seed's
//! scratch copy) belong to ids in the range; their caller removes them.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, fork};
use serde::{Deserialize, Serialize};

use crate::artifacts::build::steps::{self, Step, StepRunner};
use crate::error::{Error, Result};
use banger_formats::tool::{Output, Tool, Tools};

/// The first of the 65536 host ids a sandbox's user namespace maps: its
/// root is this uid and gid. In the range systemd leaves unused
/// (`0x70000000`–`0x7FFEFFFF`, docs/security.md), so no account and no
/// container's ids are these.
pub const IDS: u32 = banger_formats::tool::SANDBOX_IDS.start;
/// How many ids the namespace maps.
pub const ID_COUNT: u32 = banger_formats::tool::SANDBOX_IDS.end - IDS;

/// The argument that makes `bangerd` the sandbox's helper.
pub const HELPER_ARG: &str = "sandbox-exec";

/// Exit status of the helper when the sandbox could not be made (as
/// `env` and `systemd-nspawn` use it).
pub const SETUP_FAILED: i32 = 125;

/// Capabilities the tool keeps inside its user namespace (over its own
/// ids' files only), by number.
const KEPT_CAPABILITIES: &[u32] = &[
    0, // CAP_CHOWN
    1, // CAP_DAC_OVERRIDE
    2, // CAP_DAC_READ_SEARCH
    3, // CAP_FOWNER
    4, // CAP_FSETID
];

/// What the helper runs, as its argument (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// The tool, an absolute path under `/usr` or a link to one.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Files and directories it sees, each at its own path.
    pub files: Vec<Visible>,
    /// `RLIMIT_FSIZE` of the tool.
    pub max_file_bytes: Option<u64>,
    /// Milliseconds it may run before it is killed.
    #[serde(default)]
    pub time_limit_ms: Option<u64>,
}

/// One file of the host's in the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Visible {
    pub path: PathBuf,
    pub writable: bool,
}

/// Runs tools in the sandbox through bangerd's step runner.
#[derive(Debug, Clone)]
pub struct Sandboxed {
    steps: Arc<dyn StepRunner>,
    /// The helper: bangerd's own binary.
    helper: PathBuf,
    runtime: tokio::runtime::Handle,
}

impl Sandboxed {
    /// With `helper` the bangerd binary. Must be made on the runtime.
    pub fn new(steps: Arc<dyn StepRunner>, helper: PathBuf) -> Self {
        Sandboxed {
            steps,
            helper,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

/// Files given to the sandbox's ids for a run; handed back when dropped
/// with the owner and mode they had (the tool, their owner meanwhile, may
/// have changed the mode).
struct Lent(Vec<(std::fs::File, u32, u32, u32)>);

impl Lent {
    fn lend(files: &[Visible]) -> Result<Lent> {
        let mut lent = Lent(Vec::new());
        for f in files {
            // Never a link: the file itself, which stays open so that it
            // is that file that is handed back.
            let fd = open(
                &f.path,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| Error::failed(format!("cannot open {}: {e}", f.path.display())))?;
            let file = std::fs::File::from(fd);
            let meta = file
                .metadata()
                .map_err(|e| Error::failed(format!("cannot stat {}: {e}", f.path.display())))?;
            if !meta.is_file() && !meta.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is neither a file nor a directory",
                    f.path.display()
                )));
            }
            nix::unistd::fchown(
                file.as_fd(),
                Some(Uid::from_raw(IDS)),
                Some(Gid::from_raw(IDS)),
            )
            .map_err(|e| Error::failed(format!("cannot lend {}: {e}", f.path.display())))?;
            lent.0
                .push((file, meta.uid(), meta.gid(), meta.mode() & 0o7777));
        }
        Ok(lent)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        for (file, uid, gid, mode) in self.0.drain(..) {
            let back = nix::unistd::fchown(
                file.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .and_then(|()| nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode)));
            if let Err(e) = back {
                tracing::error!("cannot hand a file back from the sandbox: {e}");
            }
        }
    }
}

impl Tools for Sandboxed {
    fn root_id(&self) -> u32 {
        IDS
    }

    fn run(&self, tool: &Tool) -> Result<Output> {
        let program = crate::program::find(Path::new(&tool.program)).ok_or_else(|| {
            Error::unavailable(format!(
                "{} is not installed here; install e2fsprogs",
                tool.program
            ))
        })?;
        let spec = Spec {
            program,
            args: tool.args.clone(),
            files: tool
                .files
                .iter()
                .map(|f| Visible {
                    path: f.path.clone(),
                    writable: f.writable,
                })
                .collect(),
            max_file_bytes: tool.max_file_bytes,
            time_limit_ms: Some(u64::try_from(tool.time_limit.as_millis()).unwrap_or(u64::MAX)),
        };
        let json = serde_json::to_string(&spec)
            .map_err(|e| Error::failed(format!("cannot describe the sandbox: {e}")))?;
        let step = Step {
            id: steps::unique_id("tool"),
            what: tool.program.clone(),
            program: self.helper.clone(),
            args: vec![HELPER_ARG.to_owned(), json],
            writable: spec
                .files
                .iter()
                .filter(|f| f.writable)
                .map(|f| f.path.clone())
                .collect(),
            user: None,
        };
        let lent = Lent::lend(&spec.files)?;
        // The helper appends the tool's status after the tool has ended.
        let captured =
            self.runtime
                .block_on(steps::capture(self.steps.as_ref(), &step, &|| Ok(())));
        drop(lent);
        let (ended, captured) = captured?;
        ended.map_err(|e| {
            Error::failed(format!(
                "cannot run {} in its sandbox: {}",
                tool.program, e.message
            ))
        })?;
        let mut out = captured.stdout;
        let code = split_status(&mut out).ok_or_else(|| {
            Error::failed(format!(
                "{} ended without the sandbox saying how",
                tool.program
            ))
        })?;
        Ok(Output {
            code,
            stdout: out,
            stderr: captured.stderr.into_bytes(),
        })
    }
}

/// What the helper appends to the tool's output once the tool has ended:
/// this, then three digits (the exit code, or `128 +` the signal).
const STATUS_MARK: &[u8; 13] = b"\0banger-exit ";

/// Take the helper's status off the end of `out`: `Some(code)` (`None`
/// inside when a signal ended the tool), or `None` when it is not there.
fn split_status(out: &mut Vec<u8>) -> Option<Option<i32>> {
    let at = out.len().checked_sub(STATUS_MARK.len() + 3)?;
    let (mark, digits) = out[at..].split_at(STATUS_MARK.len());
    if mark != STATUS_MARK {
        return None;
    }
    let code: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    out.truncate(at);
    Some((code < 128).then_some(code))
}

/// The helper's main: run `spec` (JSON) in the sandbox; once the tool
/// has ended, append its status to standard output ([`STATUS_MARK`]) and
/// exit 0. Exits [`SETUP_FAILED`] (the tool never ran) when the sandbox
/// could not be made, saying why on standard error. Called before any
/// thread exists.
pub fn exec(spec: &str) -> i32 {
    let spec: Spec = match serde_json::from_str(spec) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("bangerd sandbox-exec: bad specification: {e}");
            return SETUP_FAILED;
        }
    };
    // Die with whoever started the step (bangerd, when not a unit).
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    match supervise(&spec) {
        Ok(code) => {
            let mark = [
                STATUS_MARK.as_slice(),
                format!("{:03}", code.clamp(0, 255)).as_bytes(),
            ]
            .concat();
            match std::io::stdout().write_all(&mark) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("bangerd sandbox-exec: cannot report the tool's status: {e}");
                    SETUP_FAILED
                }
            }
        }
        Err(e) => {
            eprintln!("bangerd sandbox-exec: {e}");
            SETUP_FAILED
        }
    }
}

type Fallible<T> = std::result::Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: std::result::Result<T, E>, what: &str) -> Fallible<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Fork the sandboxed child, map its user namespace, wait for it; the
/// tool's exit code (`128 +` a signal's number).
///
/// The child talks on `report` (closed when it execs the tool): `r` once
/// its user namespace exists, `E` and why when it gives up. It waits on
/// `go` until the ids are mapped.
fn supervise(spec: &Spec) -> Fallible<i32> {
    let (report_r, report_w) = ctx(nix::unistd::pipe2(OFlag::O_CLOEXEC), "cannot make a pipe")?;
    let (go_r, go_w) = ctx(nix::unistd::pipe2(OFlag::O_CLOEXEC), "cannot make a pipe")?;
    // SAFETY: the helper is single-threaded (it runs before any runtime
    // or thread exists), so the child may allocate.
    let child = match ctx(unsafe { fork() }, "cannot fork")? {
        ForkResult::Child => {
            drop(report_r);
            drop(go_w);
            let e = child(spec, &report_w, go_r);
            let _ = nix::unistd::write(&report_w, format!("E{e}").as_bytes());
            std::process::exit(SETUP_FAILED);
        }
        ForkResult::Parent { child } => child,
    };
    drop(report_w);
    drop(go_r);
    let mut report = std::fs::File::from(report_r);
    let mut first = [0u8; 1];
    let mapped = match report.read(&mut first) {
        Ok(1) if first[0] == b'r' => map_ids(child.as_raw()),
        _ => Err("the sandbox was not made".to_owned()),
    };
    if mapped.is_ok() {
        let _ = std::fs::File::from(go_w).write_all(b"g");
    }
    let mut rest = Vec::new();
    let _ = report.read_to_end(&mut rest);
    if mapped.is_err() || !rest.is_empty() {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(ms) = spec.time_limit_ms
        && !ended_within(child, Duration::from_millis(ms))?
    {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(format!(
            "{} ran longer than {} s and was killed",
            spec.program.display(),
            ms.div_ceil(1000)
        ));
    }
    let status = loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break ctx(other, "cannot wait for the tool")?,
        }
    };
    let said = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes.strip_prefix(b"E").unwrap_or(bytes)).into_owned()
    };
    if first[0] == b'E' {
        return Err(said(&[first.as_slice(), &rest].concat()));
    }
    if !rest.is_empty() {
        return Err(said(&rest));
    }
    mapped?;
    match status {
        WaitStatus::Exited(_, code) => Ok(code),
        WaitStatus::Signaled(_, signal, _) => Ok(128 + signal as i32),
        other => Err(format!("the tool ended oddly: {other:?}")),
    }
}

/// Whether `child` ends within `limit` (it is left to be reaped): its
/// pidfd turns readable when it does.
fn ended_within(child: nix::unistd::Pid, limit: Duration) -> Fallible<bool> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor, which is owned here.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, child.as_raw(), 0) };
    let fd = ctx(
        i32::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(std::io::Error::last_os_error),
        "cannot watch the tool",
    )?;
    // SAFETY: a descriptor pidfd_open just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let until = std::time::Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(true),
            Err(e) => return Err(format!("cannot watch the tool: {e}")),
        }
    }
}

fn map_ids(pid: i32) -> Fallible<()> {
    for (file, what) in [("uid_map", "uids"), ("gid_map", "gids")] {
        ctx(
            std::fs::write(
                format!("/proc/{pid}/{file}"),
                format!("0 {IDS} {ID_COUNT}\n"),
            ),
            &format!("cannot map the sandbox's {what}"),
        )?;
    }
    Ok(())
}

/// The child: build the sandbox, become its root, exec the tool. Returns
/// only on failure.
fn child(spec: &Spec, report: &OwnedFd, go: OwnedFd) -> String {
    match build_and_exec(spec, report, go) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The new root is built on a tmpfs mounted over `/tmp` of the child's
/// own mount namespace (a directory every host has).
const NEW_ROOT: &str = "/tmp";

fn build_and_exec(
    spec: &Spec,
    report: &OwnedFd,
    go: OwnedFd,
) -> Fallible<std::convert::Infallible> {
    // Die with the helper (and so with the step).
    ctx(
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
        "cannot set the parent-death signal",
    )?;
    for f in &spec.files {
        if !f.path.is_absolute() {
            return Err(format!("{} is not an absolute path", f.path.display()));
        }
    }
    ctx(
        unshare(CloneFlags::CLONE_NEWNS),
        "cannot make a mount namespace",
    )?;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        "cannot make the mounts private",
    )?;
    // The named files, opened (in this namespace: a mount of another
    // cannot be bound) before anything is hidden.
    let opened: Vec<(OwnedFd, bool)> = spec
        .files
        .iter()
        .map(|f| {
            let fd = ctx(
                open(
                    &f.path,
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ),
                &format!("cannot open {}", f.path.display()),
            )?;
            let dir = ctx(
                nix::sys::stat::fstat(fd.as_fd()),
                &format!("cannot stat {}", f.path.display()),
            )?
            .st_mode
                & nix::libc::S_IFMT
                == nix::libc::S_IFDIR;
            Ok((fd, dir))
        })
        .collect::<Fallible<_>>()?;

    let root = Path::new(NEW_ROOT);
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    ctx(
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            base,
            Some("mode=0755,size=1m"),
        ),
        "cannot mount the sandbox's root",
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));

    // The system: /usr, and /bin, /sbin, /lib... as the host has them.
    for name in ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(name);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = ctx(std::fs::read_link(&host), "cannot read a link")?;
            ctx(
                std::os::unix::fs::symlink(target, inside(&host)),
                "cannot link",
            )?;
        } else if meta.is_dir() {
            bind(&host, &inside(&host), true, false)?;
        }
    }
    // /etc: what e2fsprogs and the loader read, and an empty mtab (no
    // /proc: nothing is mounted as far as the tools can tell).
    let etc = inside(Path::new("/etc"));
    ctx(std::fs::create_dir(&etc), "cannot make /etc")?;
    ctx(
        std::fs::write(etc.join("mtab"), b""),
        "cannot make /etc/mtab",
    )?;
    for name in ["mke2fs.conf", "e2fsck.conf", "ld.so.cache"] {
        let host = Path::new("/etc").join(name);
        if host.is_file() {
            bind(&host, &inside(&host), false, false)?;
        }
    }
    // /dev: the harmless nodes.
    let dev = inside(Path::new("/dev"));
    ctx(std::fs::create_dir(&dev), "cannot make /dev")?;
    for name in ["null", "zero", "full", "random", "urandom"] {
        let host = Path::new("/dev").join(name);
        bind(&host, &inside(&host), false, true)?;
    }
    // An empty /tmp, before the named files (one may sit in the host's).
    let tmp = inside(Path::new("/tmp"));
    if !tmp.exists() {
        ctx(std::fs::create_dir(&tmp), "cannot make /tmp")?;
    }
    ctx(
        mount(
            Some("tmpfs"),
            &tmp,
            Some("tmpfs"),
            base,
            Some("mode=1777,size=64m"),
        ),
        "cannot mount /tmp",
    )?;
    // The named files, at their own paths.
    for (f, (fd, dir)) in spec.files.iter().zip(&opened) {
        let at = inside(&f.path);
        make_mount_point(&at, *dir)?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        ctx(
            mount(
                Some(source.as_str()),
                &at,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            &format!("cannot show {} in the sandbox", f.path.display()),
        )?;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | base;
        if !f.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        ctx(
            mount(None::<&str>, &at, None::<&str>, flags, None::<&str>),
            &format!("cannot restrict {} in the sandbox", f.path.display()),
        )?;
    }
    drop(opened);
    // The root itself read-only, then swapped in; the old root goes.
    ctx(
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
            None::<&str>,
        ),
        "cannot make the sandbox's root read-only",
    )?;
    ctx(nix::unistd::chdir(root), "cannot enter the sandbox")?;
    ctx(
        nix::unistd::pivot_root(".", "."),
        "cannot pivot into the sandbox",
    )?;
    ctx(
        umount2(".", MntFlags::MNT_DETACH),
        "cannot detach the host's root",
    )?;
    ctx(nix::unistd::chdir("/"), "cannot enter the sandbox")?;

    // Its own user, network and IPC namespaces; the helper maps the ids.
    ctx(
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC),
        "cannot make the user and network namespaces (user namespaces must be allowed: sysctl user.max_user_namespaces above 0)",
    )?;
    ctx(nix::unistd::write(report, b"r"), "cannot tell the helper")?;
    let mut byte = [0u8; 1];
    if !matches!(std::fs::File::from(go).read(&mut byte), Ok(1)) {
        return Err("the helper did not map the ids".to_owned());
    }
    let zero_gid = Gid::from_raw(0);
    let zero_uid = Uid::from_raw(0);
    ctx(nix::unistd::setgroups(&[]), "cannot drop groups")?;
    ctx(
        nix::unistd::setresgid(zero_gid, zero_gid, zero_gid),
        "cannot become the sandbox's group",
    )?;
    ctx(
        nix::unistd::setresuid(zero_uid, zero_uid, zero_uid),
        "cannot become the sandbox's root",
    )?;
    if let Some(bytes) = spec.max_file_bytes {
        ctx(
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE, bytes, bytes),
            "cannot limit file sizes",
        )?;
    }
    drop_capabilities()?;
    ctx(
        nix::sys::prctl::set_no_new_privs(),
        "cannot set no_new_privs",
    )?;

    let program = cstring(spec.program.as_os_str().as_encoded_bytes())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(cstring(a.as_bytes())?);
    }
    let env = [
        cstring(b"PATH=/usr/sbin:/usr/bin:/sbin:/bin")?,
        cstring(b"LC_ALL=C")?,
        cstring(b"HOME=/tmp")?,
    ];
    ctx(
        nix::unistd::execve(&program, &argv, &env),
        &format!("cannot run {}", spec.program.display()),
    )
}

fn cstring(bytes: &[u8]) -> Fallible<CString> {
    CString::new(bytes).map_err(|_| "an argument holds a NUL byte".to_owned())
}

/// An empty file or directory at `at`, with its parents (in the tmpfs).
fn make_mount_point(at: &Path, dir: bool) -> Fallible<()> {
    if let Some(parent) = at.parent() {
        ctx(
            std::fs::create_dir_all(parent),
            &format!("cannot make {}", parent.display()),
        )?;
    }
    if dir {
        ctx(
            std::fs::create_dir_all(at),
            &format!("cannot make {}", at.display()),
        )
    } else {
        ctx(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(at)
                .map(drop),
            &format!("cannot make {}", at.display()),
        )
    }
}

/// Bind `host` at `at` read-only (`rec`ursively for /usr), devices
/// allowed only where `device`.
fn bind(host: &Path, at: &Path, rec: bool, device: bool) -> Fallible<()> {
    make_mount_point(at, host.is_dir())?;
    let mut flags = MsFlags::MS_BIND;
    if rec {
        flags |= MsFlags::MS_REC;
    }
    ctx(
        mount(Some(host), at, None::<&str>, flags, None::<&str>),
        &format!("cannot show {} in the sandbox", host.display()),
    )?;
    let mut flags =
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
    if !device {
        flags |= MsFlags::MS_NODEV;
    }
    ctx(
        mount(None::<&str>, at, None::<&str>, flags, None::<&str>),
        &format!("cannot make {} read-only in the sandbox", host.display()),
    )
}

/// Keep only [`KEPT_CAPABILITIES`] (in the sandbox's user namespace):
/// the rest leave the bounding set, and none is inheritable or ambient.
fn drop_capabilities() -> Fallible<()> {
    for cap in 0..64u32 {
        if KEPT_CAPABILITIES.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe {
            nix::libc::prctl(
                nix::libc::PR_CAPBSET_DROP,
                cap as nix::libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Past the last capability this kernel knows.
            if e.raw_os_error() == Some(nix::libc::EINVAL) {
                break;
            }
            return Err(format!("cannot drop capability {cap}: {e}"));
        }
    }
    let keep = KEPT_CAPABILITIES.iter().fold(0u32, |set, c| set | (1 << c));
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit halves.
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        Data {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads the header and two data structs, as declared.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        return Err(format!(
            "cannot set the capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        nix::libc::prctl(
            nix::libc::PR_CAP_AMBIENT,
            nix::libc::PR_CAP_AMBIENT_CLEAR_ALL as nix::libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_comes_off_the_end_of_the_output() {
        let mut out = b"some output\n\0banger-exit 004".to_vec();
        assert_eq!(split_status(&mut out), Some(Some(4)));
        assert_eq!(out, b"some output\n");
        let mut out = b"\0banger-exit 137".to_vec();
        assert_eq!(split_status(&mut out), Some(None));
        // A tool's own output is not a status.
        let mut out = b"banger-exit 000".to_vec();
        assert_eq!(split_status(&mut out), None);
        assert_eq!(split_status(&mut Vec::new()), None);
    }

    #[test]
    fn the_spec_goes_through_json() {
        let spec = Spec {
            program: PathBuf::from("/usr/sbin/e2fsck"),
            args: vec![
                "-f".to_owned(),
                "/var/lib/banger/vms/x/work \"1\".ext4".to_owned(),
            ],
            files: vec![Visible {
                path: PathBuf::from("/var/lib/banger/vms/x/work \"1\".ext4"),
                writable: true,
            }],
            max_file_bytes: Some(1 << 30),
            time_limit_ms: Some(1500),
        };
        let json = serde_json::to_string(&spec).expect("json");
        assert_eq!(serde_json::from_str::<Spec>(&json).expect("back"), spec);
    }
}
