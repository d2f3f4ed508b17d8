//! polkit: the project's action file, a polkitd on the private bus, and
//! rule files for tests.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::shared::{self, Lease, SHARED_DIR, Setup, remove_if_exists, shell_quote, write_atomic};
use crate::spawn::{kill_and_wait, signal_pid, wait_timeout};

/// The project's polkit action file, as shipped.
pub(crate) const POLICY_SOURCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../packaging/org.banger.policy"
);
/// Where polkitd reads it from.
pub(crate) const POLICY_DEST: &str = "/usr/share/polkit-1/actions/org.banger.policy";
/// Where local rules go; polkitd watches it with inotify.
pub(crate) const RULES_DIR: &str = "/etc/polkit-1/rules.d";
/// The daemon itself.
pub(crate) const POLKITD: &str = "/usr/lib/polkit-1/polkitd";

/// Installs the project's action file for as long as the lease is held. If
/// the project has no action file yet, returns `None`.
pub(crate) fn install_policy() -> io::Result<Option<Lease>> {
    let contents = match fs::read(POLICY_SOURCE) {
        Ok(contents) => contents,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("read {POLICY_SOURCE}: {e}"),
            ));
        }
    };
    install_file_shared("polkit-policy", &contents, Path::new(POLICY_DEST)).map(Some)
}

/// Installs `contents` at `dest`, shared between all test beds on the
/// machine (see [`crate::shared`]): the last user's watchdog removes it, or
/// puts back the file that was there before. A file that already had these
/// contents, and was not installed by a test bed, is left alone.
pub(crate) fn install_file_shared(
    lease_name: &str,
    contents: &[u8],
    dest: &Path,
) -> io::Result<Lease> {
    let backup = Path::new(SHARED_DIR).join(format!("{lease_name}.orig"));
    shared::acquire(lease_name, |managed| {
        let current = match fs::read(dest) {
            Ok(current) => Some(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if current.as_deref() == Some(contents) {
            return Ok(Setup::Nothing);
        }
        if managed {
            // Installed by a test bed, from another version of the file.
            write_atomic(dest, contents, 0o644)?;
            return Ok(Setup::Nothing);
        }
        if current.is_some() {
            fs::copy(dest, &backup)?;
        } else {
            remove_if_exists(&backup)?;
        }
        write_atomic(dest, contents, 0o644)?;
        let (backup, dest) = (
            shell_quote(&backup.to_string_lossy()),
            shell_quote(&dest.to_string_lossy()),
        );
        Ok(Setup::Managed {
            start: String::new(),
            cleanup: format!(
                "if [ -e {backup} ]; then mv -f {backup} {dest}; else rm -f {dest}; fi"
            ),
        })
    })
}

/// Runs polkitd's command line (`$2...`) in the background with its output
/// appended to `$1`, prints its pid, and stops it (SIGTERM, SIGKILL after
/// 5 s) once standard input reaches end of file: when the test bed closes
/// the pipe, or when the test process dies.
const WRAPPER_SCRIPT: &str = r#"
log=$1; shift
"$@" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid"
read -r line || :
kill -TERM "$pid" 2>/dev/null
i=0
while [ "$i" -lt 50 ]; do
  state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) || break
  [ "$state" = Z ] && break
  sleep 0.1
  i=$((i + 1))
done
kill -KILL "$pid" 2>/dev/null
wait "$pid"
"#;

/// A polkitd on the test bed's bus.
///
/// polkitd switches to its own user at start, which clears
/// `PR_SET_PDEATHSIG`, so it runs under [`WRAPPER_SCRIPT`] instead.
#[derive(Debug)]
pub(crate) struct Polkitd {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl Polkitd {
    /// Starts polkitd on the bus at `address`, its output appended to `log`.
    /// Does not wait for it to own its name.
    pub(crate) fn start(address: &str, log: &Path) -> io::Result<Polkitd> {
        let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut wrapper = Command::new("sh")
            .args(["-c", WRAPPER_SCRIPT, "banger-testbed-polkitd"])
            .arg(log)
            .args([POLKITD, "--no-debug"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", address)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()?;
        let stdin = wrapper.stdin.take();
        let mut line = String::new();
        if let Some(stdout) = wrapper.stdout.take() {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        let Ok(pid) = line.trim().parse() else {
            let _ = kill_and_wait(&mut wrapper);
            return Err(io::Error::other(format!(
                "the polkitd wrapper printed {line:?} instead of a pid"
            )));
        };
        Ok(Polkitd {
            wrapper,
            stdin,
            pid,
        })
    }

    /// polkitd's own pid (not the wrapper's).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The wrapper's pid.
    pub(crate) fn wrapper_pid(&self) -> u32 {
        self.wrapper.id()
    }

    /// Stops polkitd and reaps the wrapper.
    pub(crate) fn stop(&mut self) {
        // End of file on the wrapper's standard input: it stops polkitd.
        self.stdin = None;
        if let Ok(Some(_)) = wait_timeout(&mut self.wrapper, Duration::from_secs(10)) {
            return;
        }
        signal_pid(self.pid, Signal::SIGKILL);
        let _ = kill_and_wait(&mut self.wrapper);
    }
}

impl Drop for Polkitd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A polkit rule file installed for a test; deleted when dropped.
#[derive(Debug)]
#[must_use = "the rule is removed when the guard is dropped"]
pub struct RuleGuard {
    path: PathBuf,
}

impl RuleGuard {
    /// The installed file, `/etc/polkit-1/rules.d/NAME.rules`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuleGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Installs `javascript` as `/etc/polkit-1/rules.d/<name>.rules` until the
/// returned guard is dropped.
///
/// Every polkitd on the machine, the test beds' and any other, loads it: the
/// rules directory is host-wide. So `name` must be unique (include the test
/// user's name) and the rule should only match that user. polkitd evaluates
/// rule files in the lexical order of their names, across
/// `/etc/polkit-1/rules.d` and `/usr/share/polkit-1/rules.d`, and the first
/// rule that returns a result wins: start the name with a low number (e.g.
/// `10-`) to come before rules the project ships.
///
/// polkitd notices the file through inotify and reloads its rules
/// asynchronously, usually within milliseconds; there is no way to wait for
/// that, so retry the check for a few seconds ([`crate::eventually`]). The
/// same holds after the guard is dropped.
pub fn install_polkit_rule(name: &str, javascript: &str) -> io::Result<RuleGuard> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid polkit rule name {name:?}: use [A-Za-z0-9._-]"),
        ));
    }
    let path = Path::new(RULES_DIR).join(format!("{name}.rules"));
    if path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists already: rule names must be unique",
                path.display()
            ),
        ));
    }
    write_atomic(&path, javascript.as_bytes(), 0o644)?;
    Ok(RuleGuard { path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventually;

    #[test]
    fn rule_names_are_checked() {
        for bad in ["", ".hidden", "a/b", "a b", "../x"] {
            let err = install_polkit_rule(bad, "").expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
    }

    /// The shared install: a second user adopts the first's install, the
    /// file stays until the last one is gone, then the watchdog removes it,
    /// or puts back what was there before.
    #[test]
    fn shared_file_install_is_removed_after_the_last_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lease_name = format!("selftest-{}", std::process::id());
        let fresh = dir.path().join("fresh.policy");

        let first = install_file_shared(&lease_name, b"one", &fresh).expect("first install");
        assert_eq!(fs::read(&fresh).expect("installed"), b"one");
        let second = install_file_shared(&lease_name, b"one", &fresh).expect("second install");
        drop(first);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(fresh.exists(), "removed while still in use");
        drop(second);
        let gone = eventually(Duration::from_secs(10), || (!fresh.exists()).then_some(()));
        assert!(gone.is_some(), "not removed after the last user");

        // A file that was there before, with other contents, comes back.
        let existing = dir.path().join("existing.policy");
        fs::write(&existing, b"theirs").expect("write");
        let lease = install_file_shared(&lease_name, b"ours", &existing).expect("install");
        assert_eq!(fs::read(&existing).expect("read"), b"ours");
        drop(lease);
        let restored = eventually(Duration::from_secs(10), || {
            (fs::read(&existing).ok()? == b"theirs").then_some(())
        });
        assert!(restored.is_some(), "the original file was not restored");

        // A file that was there before with the same contents is not ours.
        let lease = install_file_shared(&lease_name, b"theirs", &existing).expect("install");
        drop(lease);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(fs::read(&existing).expect("still there"), b"theirs");

        let state = Path::new(SHARED_DIR).join(format!("{lease_name}.state"));
        let idle = eventually(Duration::from_secs(10), || (!state.exists()).then_some(()));
        assert!(idle.is_some(), "the watchdog did not finish");
        for suffix in ["mutex", "users", "orig"] {
            let _ = fs::remove_file(Path::new(SHARED_DIR).join(format!("{lease_name}.{suffix}")));
        }
    }
}
