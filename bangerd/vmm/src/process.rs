//! VMM processes under the direct-child supervisor: each in its own
//! process group and session, so a signal to bangerd or its death never
//! reaches a VM. A process is named by its pid *and* its start time, so a
//! recycled pid is never taken for a VM after a restart.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use banger_error::{Error, Result};

/// A running VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

/// The start time and state letter of `pid`, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

impl ProcessId {
    /// The process `pid` as it is now.
    pub fn of(pid: u32) -> Option<Self> {
        stat(pid).map(|(start, _)| Self { pid, start })
    }

    /// Whether this very process still runs (not a zombie, not a reused pid).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((start, state)) if start == self.start && state != 'Z' && state != 'X')
    }

    /// Send `signal`, unless the process is gone.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if !self.alive() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid as i32), signal)
            .map_err(|e| Error::failed(format!("cannot signal process {}: {e}", self.pid)))
    }
}

/// Start `program` with `args` in a new session (its own process group)
/// with `no_new_privs` set, stdin from /dev/null, stdout and stderr
/// appended to `log`.
pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<(Child, ProcessId)> {
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", log.display())))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir("/");
    // SAFETY: setsid and prctl are async-signal-safe system calls and
    // touch no memory. The VMM gets a session of its own and can never gain
    // privileges (setuid programs, file capabilities) after exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::unavailable(format!("cannot start {}: {e}", program.display())))?;
    let id = ProcessId::of(child.id()).ok_or_else(|| {
        Error::failed(format!(
            "{} exited at once; see {}",
            program.display(),
            log.display()
        ))
    })?;
    Ok((child, id))
}

/// Watch a process until it ends. For a child of ours, reaps it.
#[derive(Debug)]
pub enum Watched {
    /// Our child: `try_wait` reaps it.
    Child(Child),
    /// Adopted after a restart (someone else's child now).
    Adopted(ProcessId),
}

impl Watched {
    /// Whether it has ended (reaping it if it is ours).
    pub fn ended(&mut self) -> bool {
        match self {
            Self::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Self::Adopted(id) => !id.alive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_process_has_its_own_session_and_is_watched_to_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let (child, id) = spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo hello; exec sleep 30".into()],
            &log,
        )
        .expect("spawn");
        assert!(id.alive());
        for _ in 0..250 {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("hello")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let sid = nix::unistd::getsid(Some(Pid::from_raw(id.pid as i32))).expect("sid");
        assert_eq!(sid.as_raw() as u32, id.pid, "session leader");
        let mut watched = Watched::Child(child);
        assert!(!watched.ended());
        id.signal(Signal::SIGKILL).expect("kill");
        for _ in 0..100 {
            if watched.ended() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(watched.ended());
        assert!(!id.alive());
        id.signal(Signal::SIGKILL)
            .expect("signalling the dead is a no-op");
        assert!(
            std::fs::read_to_string(&log)
                .expect("log")
                .contains("hello")
        );
    }

    #[test]
    fn a_reused_pid_is_not_the_same_process() {
        let me = ProcessId::of(std::process::id()).expect("me");
        assert!(me.alive());
        let other = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!other.alive());
        assert!(!Watched::Adopted(me).ended());
    }

    #[test]
    fn a_missing_program_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e =
            spawn(Path::new("/nonexistent/qemu"), &[], &dir.path().join("l")).expect_err("missing");
        assert_eq!(e.kind, banger_error::ErrorKind::Unavailable);
    }
}
