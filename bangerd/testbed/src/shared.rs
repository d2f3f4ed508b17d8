//! Host-wide resources shared by the test beds of every process on the
//! machine: installed files, a journald, a group.
//!
//! Several test beds may run at once, in one test process (cargo's test
//! threads) or in several (two crates' tests, two developers' sessions on
//! one machine). A resource is set up by the first user and removed when the
//! last one is gone, coordinated by two `flock`s in [`SHARED_DIR`]:
//!
//! - `NAME.mutex`, held exclusively while a user sets up or adopts the
//!   resource and while the watchdog removes it;
//! - `NAME.users`, held shared by every user for as long as it uses the
//!   resource (a [`Lease`]). The kernel drops it when the user's process
//!   dies, however it dies.
//!
//! The user that sets a resource up also starts a detached watchdog (a small
//! `sh` script, in its own session, outliving the test process). Every half
//! second it takes the mutex and tries to take `NAME.users` exclusively;
//! once that succeeds nobody uses the resource, and it runs the cleanup
//! command and exits. Its pid and the cleanup command are kept in
//! `NAME.state`; a state whose watchdog is gone (the machine was restarted,
//! someone killed it) is cleaned up by the next user.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::eventually;
use crate::spawn::pid_alive;

/// Where the locks and states of shared resources live.
pub(crate) const SHARED_DIR: &str = "/run/banger-testbed";

/// `$0` of every watchdog, to recognize them in `/proc/PID/cmdline`.
const WATCHDOG_TAG: &str = "banger-testbed-watchdog";

/// The watchdog: `$1` mutex, `$2` users lock, `$3` state file, `$4` start
/// command, `$5` cleanup command (both evaluated by this shell).
const WATCHDOG_SCRIPT: &str = r#"
wd_mutex=$1 wd_users=$2 wd_state=$3 wd_start=$4 wd_cleanup=$5
exec 8>>"$wd_mutex" 9>>"$wd_users" </dev/null >/dev/null 2>&1
eval "$wd_start"
printf '%s\n%s\n' "$$" "$wd_cleanup" >"$wd_state.tmp" && mv -f "$wd_state.tmp" "$wd_state"
while sleep 0.5; do
  flock -x 8 || continue
  if flock -n -x 9; then
    # A subshell, so that the cleanup's variables cannot clobber ours.
    (eval "$wd_cleanup")
    rm -f "$wd_state"
    exit 0
  fi
  flock -u 8
done
"#;

/// What a user found, and what it did, when it set up a resource.
pub(crate) enum Setup {
    /// Nothing to undo: the resource was there already (not installed by a
    /// test bed), or nothing needed doing.
    Nothing,
    /// Hand the resource to a watchdog: it runs `start` (a shell command,
    /// e.g. starting a daemon as its own child) right away, and `cleanup`
    /// once the last user is gone. `cleanup` must be safe to run more than
    /// once and must not depend on variables set by `start`.
    Managed { start: String, cleanup: String },
}

/// A use of a shared resource; the resource is released when it is dropped
/// (and removed, shortly after, if this was its last user).
#[derive(Debug)]
pub(crate) struct Lease {
    _users: Flock<File>,
}

fn lock(path: &Path, arg: FlockArg) -> io::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    Flock::lock(file, arg).map_err(|(_, errno)| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("flock {}: {errno}", path.display()),
        )
    })
}

/// Uses the shared resource `name`.
///
/// `setup` runs with the resource's mutex held. Its argument says whether a
/// live watchdog already manages the resource; then it may refresh it (e.g.
/// rewrite a changed file) but must return [`Setup::Nothing`].
pub(crate) fn acquire(
    name: &str,
    setup: impl FnOnce(bool) -> io::Result<Setup>,
) -> io::Result<Lease> {
    let dir = Path::new(SHARED_DIR);
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let mutex_path = dir.join(format!("{name}.mutex"));
    let users_path = dir.join(format!("{name}.users"));
    let state_path = dir.join(format!("{name}.state"));

    let mutex = lock(&mutex_path, FlockArg::LockExclusive)?;
    // The watchdog holds the users lock exclusively only while it holds the
    // mutex, which is ours now: this does not block.
    let users = lock(&users_path, FlockArg::LockShared)?;

    let managed = match read_state(&state_path)? {
        Some((pid, _)) if watchdog_alive(pid, &state_path) => true,
        Some((_, cleanup)) => {
            // Its watchdog is gone: undo what it was to undo, start afresh.
            let _ = Command::new("sh")
                .args(["-c", &cleanup])
                .stdin(Stdio::null())
                .status();
            remove_if_exists(&state_path)?;
            false
        }
        None => false,
    };

    match setup(managed)? {
        Setup::Managed { start, cleanup } if !managed => {
            start_watchdog(&mutex_path, &users_path, &state_path, &start, &cleanup)?;
        }
        _ => {}
    }
    drop(mutex);
    Ok(Lease { _users: users })
}

fn read_state(path: &Path) -> io::Result<Option<(u32, String)>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (pid, cleanup) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    // An unreadable pid counts as a dead watchdog.
    Ok(Some((pid.trim().parse().unwrap_or(0), cleanup.to_owned())))
}

fn watchdog_alive(pid: u32, state_path: &Path) -> bool {
    if pid == 0 || !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let state = state_path.as_os_str().as_encoded_bytes();
    args.contains(&WATCHDOG_TAG.as_bytes()) && args.contains(&state)
}

fn start_watchdog(
    mutex: &Path,
    users: &Path,
    state: &Path,
    start: &str,
    cleanup: &str,
) -> io::Result<()> {
    // setsid -f forks: the watchdog is not our child, it is in a session of
    // its own and outlives this process.
    let status = Command::new("setsid")
        .arg("-f")
        .args(["sh", "-c", WATCHDOG_SCRIPT, WATCHDOG_TAG])
        .arg(mutex)
        .arg(users)
        .arg(state)
        .args([start, cleanup])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "setsid -f sh (the watchdog): {status}"
        )));
    }
    let started = eventually(Duration::from_secs(10), || {
        let (pid, _) = read_state(state).ok()??;
        watchdog_alive(pid, state).then_some(())
    });
    started.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the watchdog did not write {}", state.display()),
        )
    })
}

/// Removes `path`; a file that is not there is fine.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `contents` to `path` atomically (a temporary file in the same
/// directory, renamed), so that a watching daemon never reads half a file.
/// The temporary name starts with a dot and ends in `.tmp`, which neither
/// polkitd's actions nor its rules directory loads.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path without a file name"))?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, contents)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Quotes `s` for a POSIX shell.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
