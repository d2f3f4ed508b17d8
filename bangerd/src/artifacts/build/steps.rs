//! The steps of an image build that need more than bangerd's own rights:
//! debootstrap and the recipe's `configure` chroot into the tree, make
//! device nodes, mount /proc in it and set file capabilities, none of
//! which the hardened `bangerd.service` may do. Where systemd is PID 1
//! each step runs in its own transient unit with exactly those rights
//! and only the build's directory writable (`os::systemd::SystemdSteps`,
//! properties from [`unit_properties`]); elsewhere bangerd runs it as a
//! child in its own process group ([`Direct`]). Either way the step's
//! output comes back through a pipe, line by line ([`run`]), and a
//! cancelled job stops the step and everything it started.
//!
//! The file system tools' sandbox (`os::sandbox`) runs through the same
//! runners: making namespaces is one more thing bangerd's unit may not do.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::auth::BoxFuture;
use crate::error::{Error, Result};
use banger_vmm::supervise::UnitProperty;

/// One step to run.
#[derive(Debug, Clone)]
pub struct Step {
    /// Unique among running steps; names the unit (`banger-<id>`): an
    /// image build's step is `build-<build id>-<step>`, a sandboxed
    /// tool's `tool-<pid>-<n>`.
    pub id: String,
    /// What it is, for messages (`debootstrap`).
    pub what: String,
    /// The program, an absolute path.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The only paths it may write (the build's directory).
    pub writable: Vec<PathBuf>,
    /// The unprivileged account it runs as, with no capabilities and a
    /// private temporary directory of its own (`TMPDIR`); `None` runs it
    /// as root with [`STEP_CAPABILITIES`].
    pub user: Option<Account>,
}

/// A system account a step may run as: `banger-build`, which has
/// subordinate ids for the user namespace `mmdebstrap --mode=unshare`
/// makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A started step.
pub struct Running {
    /// Resolves when the step has ended: `Err` says how it failed.
    pub done: BoxFuture<'static, std::result::Result<(), String>>,
    /// Stops the step and all it started; `done` resolves afterwards.
    pub stop: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

/// Runs build steps.
pub trait StepRunner: Send + Sync + std::fmt::Debug {
    /// `systemd` or `process`.
    fn name(&self) -> &'static str;

    /// Start `step` with its standard error on `output`, and its
    /// standard output there too or, when given, on `stdout`.
    fn start<'a>(
        &'a self,
        step: &'a Step,
        output: OwnedFd,
        stdout: Option<OwnedFd>,
    ) -> BoxFuture<'a, Result<Running>>;
}

/// A step id no other step of this daemon has: `<kind>-<pid>-<n>`, for
/// steps that run many times (a tool, an apt call).
pub fn unique_id(kind: &str) -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{kind}-{}-{n}", std::process::id())
}

/// The unit a step runs in.
pub fn unit_name(step: &Step) -> String {
    format!("banger-{}.service", step.id)
}

/// Capabilities a step keeps, by number (`linux/capability.h`): files
/// owned and moded as the packages say (chown, fowner, fsetid,
/// dac_override, dac_read_search), maintainer scripts that switch users
/// (setuid, setgid, kill), `chroot`, device nodes (mknod), /proc and
/// /sys mounted in the tree (sys_admin), and file capabilities
/// (`setcap` in iputils-ping's postinst: setfcap).
const STEP_CAPABILITIES: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_MKNOD", 27),
    ("CAP_SETFCAP", 31),
];

/// The properties of `step`'s transient unit, but for its output (the
/// systemd runner adds the pipe): a oneshot whose start job ends when
/// the step does, with no time limit (a debootstrap over a slow mirror
/// takes minutes), the rights in `STEP_CAPABILITIES`, the system
/// read-only but for the build's directory, homes read-only, its own
/// /tmp, no kernel tunables, modules, logs, clock or cgroups to touch.
pub fn unit_properties(step: &Step) -> Vec<UnitProperty> {
    use UnitProperty::{Bool, ExecStart, Str, Strs, U64};
    let program = step.program.to_string_lossy().into_owned();
    let mut argv = vec![program.clone()];
    argv.extend(step.args.iter().cloned());
    // An account's step has none of them on the host: they bound what
    // newuidmap/newgidmap (setuid) and the root of its user namespace
    // may have, the latter over that namespace's files only.
    let caps = STEP_CAPABILITIES
        .iter()
        .fold(0u64, |set, (_, bit)| set | (1u64 << bit));
    let mut env = vec!["LC_ALL=C".to_owned()];
    if step.user.is_some() {
        // On disk, private to the unit and removed with it, even when
        // the step is killed: the user namespace's files (owned by
        // subordinate ids) never outlive it.
        env.push("TMPDIR=/var/tmp".to_owned());
    }
    let mut props = vec![
        Str(
            "Description",
            format!("banger: {} ({})", step.what, step.id),
        ),
        Str("Slice", banger_vmm::supervise::SLICE.to_owned()),
        Str("Type", "oneshot".to_owned()),
        ExecStart(program, argv),
        U64("TimeoutStartUSec", u64::MAX),
        Str("StandardInput", "null".to_owned()),
        Str("WorkingDirectory", "/".to_owned()),
        Strs("Environment", env),
        Str("CollectMode", "inactive-or-failed".to_owned()),
        U64("CapabilityBoundingSet", caps),
        Str("ProtectSystem", "strict".to_owned()),
        Strs(
            "ReadWritePaths",
            step.writable
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        ),
        Str("ProtectHome", "read-only".to_owned()),
        Bool("PrivateTmp", true),
    ];
    match &step.user {
        Some(user) => props.extend([
            Str("User", user.name.clone()),
            Str("Group", user.name.clone()),
            // newuidmap and newgidmap map its subordinate ids: setuid
            // programs, so privileges may not be frozen, and nothing
            // that freezes them for a user's unit may be set (systemd's
            // seccomp-based settings: ProtectClock, RestrictRealtime,
            // LockPersonality...). The user namespace mounts its own
            // /proc and /sys, which the kernel allows only while the
            // unit's are not masked in parts (ProtectKernelTunables and
            // friends). This account may write none of it anyway.
            Bool("NoNewPrivileges", false),
        ]),
        None => props.extend([
            Bool("NoNewPrivileges", true),
            Bool("ProtectKernelTunables", true),
            Bool("ProtectKernelModules", true),
            Bool("ProtectKernelLogs", true),
            Bool("ProtectControlGroups", true),
            Bool("ProtectClock", true),
            Bool("RestrictRealtime", true),
            Bool("LockPersonality", true),
        ]),
    }
    props
}

/// Run `step` with `runner` to its end. Each line of its output goes to
/// `line`, and `check` is asked twice a second whether to go on; either
/// failing (the job was cancelled) stops the step, and that error is the
/// result. A step that fails is an error with its last lines.
pub async fn run(
    runner: &dyn StepRunner,
    step: &Step,
    line: &mut (dyn FnMut(&str) -> Result<()> + Send),
    check: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    run_to(runner, step, None, line, check).await
}

/// [`run`], with the step's standard output on `stdout` (a file
/// bangerd opened: mmdebstrap writes its tarball there), its standard
/// error still line by line.
pub async fn run_to(
    runner: &dyn StepRunner,
    step: &Step,
    stdout: Option<OwnedFd>,
    line: &mut (dyn FnMut(&str) -> Result<()> + Send),
    check: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    let (tx, rx) = tokio::net::unix::pipe::pipe()
        .map_err(|e| Error::failed(format!("cannot make a pipe for {}: {e}", step.what)))?;
    let tx = tx
        .into_blocking_fd()
        .map_err(|e| Error::failed(format!("cannot make a pipe for {}: {e}", step.what)))?;
    check()?;
    let Running { mut done, stop } = runner.start(step, tx, stdout).await?;
    let mut stop = Some(stop);
    let mut lines = tokio::io::BufReader::new(rx).lines();
    let mut tail = VecDeque::new();
    let mut keep = |l: String| {
        tail.push_back(l);
        if tail.len() > 8 {
            tail.pop_front();
        }
    };
    let mut stopped: Option<Error> = None;
    let mut open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let end = loop {
        let outcome = tokio::select! {
            biased;
            next = lines.next_line(), if open => match next {
                Ok(Some(l)) => {
                    let r = if stopped.is_none() { line(&l) } else { Ok(()) };
                    keep(l);
                    r
                }
                _ => {
                    open = false;
                    Ok(())
                }
            },
            _ = tick.tick() => if stopped.is_none() { check() } else { Ok(()) },
            end = &mut done => break end,
        };
        if let Err(e) = outcome {
            stopped = Some(e);
            if let Some(stop) = stop.take() {
                stop().await;
            }
        }
    };
    // The step has ended; what it wrote last may still be in the pipe
    // (its end is read until it closes, or stays quiet for a moment: a
    // unit's copy of the pipe can outlive its process briefly).
    while open {
        match tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
            Ok(Ok(Some(l))) => {
                if stopped.is_none()
                    && let Err(e) = line(&l)
                {
                    stopped = Some(e);
                }
                keep(l);
            }
            _ => open = false,
        }
    }
    if let Some(e) = stopped {
        return Err(e);
    }
    end.map_err(|why| {
        Error::failed(format!(
            "{} failed ({why}): {}",
            step.what,
            Vec::from(tail).join(" / ")
        ))
    })
}

/// What a step wrote: its standard output whole, its standard error's
/// lines.
#[derive(Debug, Default)]
pub struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Run `step` to its end with its standard output kept in a temporary
/// file (opened for appending) and its standard error's lines collected;
/// `check` as for [`run`]. The outcome, and what it wrote either way.
pub async fn capture(
    runner: &dyn StepRunner,
    step: &Step,
    check: &(dyn Fn() -> Result<()> + Sync),
) -> Result<(Result<()>, Captured)> {
    use std::io::{Read, Seek};
    let cannot =
        |e: std::io::Error| Error::failed(format!("cannot keep {}'s output: {e}", step.what));
    let mut file = tempfile::tempfile().map_err(cannot)?;
    let fd = OwnedFd::from(file.try_clone().map_err(cannot)?);
    // Appending: whatever else writes to it lands after the step's own.
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND),
    )
    .map_err(|e| cannot(e.into()))?;
    let mut stderr = String::new();
    let ended = run_to(
        runner,
        step,
        Some(fd),
        &mut |line| {
            stderr.push_str(line);
            stderr.push('\n');
            Ok(())
        },
        check,
    )
    .await;
    let mut stdout = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut stdout))
        .map_err(cannot)?;
    Ok((ended, Captured { stdout, stderr }))
}

/// Steps as bangerd's children, each in its own process group.
#[derive(Debug, Default, Clone, Copy)]
pub struct Direct;

impl StepRunner for Direct {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start<'a>(
        &'a self,
        step: &'a Step,
        output: OwnedFd,
        stdout: Option<OwnedFd>,
    ) -> BoxFuture<'a, Result<Running>> {
        Box::pin(async move {
            let cannot = |e: std::io::Error| {
                Error::unavailable(format!(
                    "cannot run {} ({}): {e}",
                    step.what,
                    step.program.display()
                ))
            };
            let err = output.try_clone().map_err(cannot)?;
            let out = match stdout {
                Some(fd) => fd,
                None => output,
            };
            // The user's own temporary directory, removed when the step
            // has ended (by root: the user namespace's files belong to
            // subordinate ids).
            let scratch = match &step.user {
                Some(user) => Some(scratch_for(step, user).map_err(cannot)?),
                None => None,
            };
            // The command holds the pipe's write end until it is dropped:
            // only the child may keep it open, or the output never ends.
            let mut child = {
                let mut cmd = tokio::process::Command::new(&step.program);
                cmd.args(&step.args)
                    .env("LC_ALL", "C")
                    .current_dir("/")
                    .stdin(Stdio::null())
                    .stdout(Stdio::from(out))
                    .stderr(Stdio::from(err))
                    .process_group(0)
                    .kill_on_drop(true);
                // A transient unit's default file mode mask, not bangerd's.
                // SAFETY: umask(2) is async-signal-safe and touches no memory.
                unsafe {
                    cmd.pre_exec(|| {
                        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
                        Ok(())
                    });
                }
                if let (Some(user), Some(dir)) = (&step.user, &scratch) {
                    // std drops the supplementary groups with the uid.
                    cmd.uid(user.uid)
                        .gid(user.gid)
                        .env("TMPDIR", dir.path())
                        .env("HOME", dir.path())
                        .env("USER", &user.name)
                        .env("LOGNAME", &user.name);
                }
                cmd.spawn().map_err(cannot)?
            };
            let group = child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw);
            let done: BoxFuture<'static, std::result::Result<(), String>> = Box::pin(async move {
                let status = child.wait().await.map_err(|e| e.to_string());
                if let Some(dir) = scratch {
                    let _ = crate::blocking::value(move || drop(dir)).await;
                }
                let status = status?;
                if status.success() {
                    Ok(())
                } else {
                    Err(status.to_string())
                }
            });
            let stop = Box::new(move || -> BoxFuture<'static, ()> {
                Box::pin(async move {
                    if let Some(group) = group {
                        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
                    }
                })
            });
            Ok(Running { done, stop })
        })
    }
}

/// A fresh directory only `user` may write, for `step`'s `TMPDIR`;
/// removed when dropped. Others may pass through it (not list it): the
/// root of mmdebstrap's user namespace is another uid on the host, and
/// works in a directory of its own inside.
fn scratch_for(step: &Step, user: &Account) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(&format!("banger-{}-", step.id))
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))?;
    Ok(dir)
}

/// `name` on the PATH, as the absolute path a unit needs.
pub fn program(name: &str) -> Result<PathBuf> {
    crate::program::find(Path::new(name))
        .ok_or_else(|| Error::unavailable(format!("{name} is not installed here")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(script: &str, dir: &Path) -> Step {
        Step {
            id: "t-1".to_owned(),
            what: "the test step".to_owned(),
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".to_owned(), script.to_owned()],
            writable: vec![dir.to_owned()],
            user: None,
        }
    }

    #[tokio::test]
    async fn output_comes_line_by_line_and_failures_carry_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = Vec::new();
        run(
            &Direct,
            &step("echo one; echo two >&2; echo three", dir.path()),
            &mut |l| {
                seen.push(l.to_owned());
                Ok(())
            },
            &|| Ok(()),
        )
        .await
        .expect("runs");
        assert_eq!(seen, ["one", "two", "three"]);

        let e = run(
            &Direct,
            &step("echo it broke >&2; exit 3", dir.path()),
            &mut |_| Ok(()),
            &|| Ok(()),
        )
        .await
        .expect_err("fails");
        assert!(
            e.message
                .contains("the test step failed (exit status: 3): it broke"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_cancel_stops_the_step_and_what_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("grandchild");
        // A grandchild that would write the marker if it outlived the stop.
        let script = format!("(sleep 2; touch {}) & echo started; wait", marker.display());
        let cancelled = std::sync::atomic::AtomicBool::new(false);
        let t0 = std::time::Instant::now();
        let e = run(
            &Direct,
            &step(&script, dir.path()),
            &mut |_| {
                cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            },
            &|| {
                if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                    Err(Error::cancelled("cancelled"))
                } else {
                    Ok(())
                }
            },
        )
        .await
        .expect_err("cancelled");
        assert_eq!(e.kind, crate::error::ErrorKind::Cancelled);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the step's child outlived the cancel");
    }

    #[test]
    fn units_get_the_rights_of_a_bootstrap_and_no_more() {
        let s = step("true", Path::new("/var/lib/banger/images/.tmp-x"));
        let props = unit_properties(&s);
        assert_eq!(unit_name(&s), "banger-t-1.service");
        let caps = props
            .iter()
            .find_map(|p| match p {
                UnitProperty::U64("CapabilityBoundingSet", v) => Some(*v),
                _ => None,
            })
            .expect("a bounding set");
        // chroot, mknod and setfcap, which bangerd's own unit lacks; no
        // module loading, raw I/O, network administration or ptrace.
        for bit in [18, 27, 31] {
            assert_ne!(caps & (1 << bit), 0, "cap {bit}");
        }
        for bit in [12, 16, 17, 19] {
            assert_eq!(caps & (1 << bit), 0, "cap {bit}");
        }
        assert!(props.contains(&UnitProperty::Strs(
            "ReadWritePaths",
            vec!["/var/lib/banger/images/.tmp-x".to_owned()]
        )));
        assert!(props.contains(&UnitProperty::Str("ProtectSystem", "strict".to_owned())));
        assert!(props.contains(&UnitProperty::Str("Type", "oneshot".to_owned())));
        assert!(props.contains(&UnitProperty::ExecStart(
            "/bin/sh".to_owned(),
            vec!["/bin/sh".to_owned(), "-c".to_owned(), "true".to_owned()]
        )));
    }

    fn nobody() -> Account {
        Account {
            name: "nobody".to_owned(),
            uid: 65534,
            gid: 65534,
        }
    }

    #[tokio::test]
    async fn a_step_as_a_user_runs_unprivileged_with_its_own_tmpdir_and_stdout() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "bangerd's unit tests run as root (as bangerd does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = step(
            "id -u; id -G; echo \"$TMPDIR\"; touch \"$TMPDIR/made\" && echo wrote; \
             touch /etc/banger-step-test 2>/dev/null && echo escaped; echo on-stderr >&2",
            dir.path(),
        );
        s.user = Some(nobody());
        let out_path = dir.path().join("stdout");
        let out = std::fs::File::create(&out_path).expect("stdout file");
        let mut seen = Vec::new();
        run_to(
            &Direct,
            &s,
            Some(out.into()),
            &mut |l| {
                seen.push(l.to_owned());
                Ok(())
            },
            &|| Ok(()),
        )
        .await
        .expect("runs");
        assert_eq!(seen, ["on-stderr"]);
        let out = std::fs::read_to_string(&out_path).expect("stdout");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], "65534", "{out}");
        // No supplementary group of root's is kept.
        assert_eq!(lines[1], "65534", "{out}");
        assert!(lines[2].contains("banger-t-1-"), "{out}");
        assert_eq!(lines[3], "wrote", "{out}");
        assert!(!Path::new("/etc/banger-step-test").exists());
        assert!(
            !Path::new(lines[2]).exists(),
            "the step's TMPDIR outlived it"
        );
    }

    #[test]
    fn a_users_unit_has_no_capabilities_but_may_map_its_ids() {
        let mut s = step("true", Path::new("/var/lib/banger/images/.tmp-x"));
        s.user = Some(nobody());
        let props = unit_properties(&s);
        // No capability of its own (it is not root), but newuidmap needs
        // setuid/setgid and its namespace's root the rest.
        let caps = props
            .iter()
            .find_map(|p| match p {
                UnitProperty::U64("CapabilityBoundingSet", v) => Some(*v),
                _ => None,
            })
            .expect("a bounding set");
        for bit in [6, 7, 18] {
            assert_ne!(caps & (1 << bit), 0, "cap {bit}");
        }
        for bit in [12, 16, 17, 19] {
            assert_eq!(caps & (1 << bit), 0, "cap {bit}");
        }
        assert!(props.contains(&UnitProperty::Str("User", "nobody".to_owned())));
        assert!(props.contains(&UnitProperty::Bool("NoNewPrivileges", false)));
        assert!(props.contains(&UnitProperty::Bool("PrivateTmp", true)));
        // Nothing that would freeze privileges for a user's unit.
        for implies_nnp in ["ProtectClock", "RestrictRealtime", "LockPersonality"] {
            assert!(
                !props
                    .iter()
                    .any(|p| matches!(p, UnitProperty::Bool(n, true) if *n == implies_nnp)),
                "{implies_nnp}"
            );
        }
        assert!(props.contains(&UnitProperty::Strs(
            "Environment",
            vec!["LC_ALL=C".to_owned(), "TMPDIR=/var/tmp".to_owned()]
        )));
        // Root's steps keep their privileges frozen.
        let root = unit_properties(&step("true", Path::new("/x")));
        assert!(root.contains(&UnitProperty::Bool("NoNewPrivileges", true)));
        assert!(
            !root
                .iter()
                .any(|p| matches!(p, UnitProperty::Str("User", _)))
        );
    }
}
