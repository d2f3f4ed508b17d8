//! A systemd-journald for tests, on a machine where PID 1 is not systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::eventually;
use crate::shared::{self, Lease, SHARED_DIR, Setup, remove_if_exists, shell_quote};

/// journald's native protocol socket; its presence alone proves nothing (a
/// journald that was killed leaves it behind).
pub(crate) const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The daemon.
const JOURNALD: &str = "/lib/systemd/systemd-journald";
/// The sockets journald binds by itself when not socket-activated.
const JOURNALD_SOCKETS: [&str; 4] = [
    "/run/systemd/journal/socket",
    "/run/systemd/journal/stdout",
    "/run/systemd/journal/dev-log",
    "/run/systemd/journal/io.systemd.journal",
];

/// A running journald, shared by every test bed on the machine.
///
/// If a journald already answers on `/run/systemd/journal/socket` it is used
/// as it is and never stopped. Otherwise one is started; the last user on
/// the machine to drop its `Journald` has it stopped (by the watchdog
/// described in the crate docs, half a second or so later) and its sockets
/// removed.
#[derive(Debug)]
pub struct Journald {
    _lease: Lease,
    managed: bool,
}

fn socket_answers() -> bool {
    UnixDatagram::unbound()
        .and_then(|socket| socket.connect(JOURNAL_SOCKET))
        .is_ok()
}

impl Journald {
    /// Makes sure a journald is running, starting one if needed; see
    /// [`Journald`].
    pub fn ensure() -> io::Result<Journald> {
        let pid_file = Path::new(SHARED_DIR).join("journald.pid");
        let mut managed = false;
        let lease = shared::acquire("journald", |already_managed| {
            managed = already_managed;
            if already_managed || socket_answers() {
                return Ok(Setup::Nothing);
            }
            // Sockets left behind by a journald that is gone.
            for socket in JOURNALD_SOCKETS {
                remove_if_exists(Path::new(socket))?;
            }
            managed = true;
            let pid_file = shell_quote(&pid_file.to_string_lossy());
            let sockets = JOURNALD_SOCKETS.join(" ");
            Ok(Setup::Managed {
                // The watchdog's lock descriptors must not leak into journald.
                start: format!("{JOURNALD} 8>&- 9>&- & echo $! >{pid_file}"),
                cleanup: format!(
                    r#"p=$(cat {pid_file} 2>/dev/null) || p=
if [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = systemd-journal ]; then
  kill -TERM "$p"
  i=0
  while [ "$i" -lt 50 ]; do
    state=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null) || break
    [ "$state" = Z ] && break
    sleep 0.1
    i=$((i + 1))
  done
  kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null
fi
rm -f {pid_file} {sockets}"#
                ),
            })
        })?;
        let up = eventually(Duration::from_secs(10), || socket_answers().then_some(()));
        if up.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("journald does not answer on {JOURNAL_SOCKET} after 10 s"),
            ));
        }
        Ok(Journald {
            _lease: lease,
            managed,
        })
    }

    /// Whether this journald was started by a test bed (in this or another
    /// process) rather than found running.
    pub fn started_by_testbed(&self) -> bool {
        self.managed
    }

    /// The same as [`journal_entries`].
    pub fn entries(&self, filter: &[&str]) -> Vec<serde_json::Value> {
        journal_entries(filter)
    }
}

/// Journal entries matching `filter`, each as the JSON object of
/// `journalctl -o json`.
///
/// Runs `journalctl --sync` (journald answers it over its varlink socket,
/// no systemd needed) and then `journalctl --no-pager -o json FILTER...`.
/// `filter` is passed as it is: matches like `SYSLOG_IDENTIFIER=bangerd` or
/// `_PID=123` (several are ANDed, or ORed for the same field, `+` ORs
/// groups), or options like `--since=...`.
///
/// The journal may be persistent (`/var/log/journal` exists on Debian) and
/// hold entries of earlier runs, even of an earlier bangerd with the same
/// pid: for a daemon's entries use [`daemon_journal`]. Entries may still
/// take a moment to show up: wrap the check in [`crate::eventually`].
///
/// # Panics
///
/// If `journalctl` cannot be run.
/// The entries bangerd with process id `pid`, started at `since` or later,
/// logged: its `SYSLOG_IDENTIFIER` and `_PID`, no earlier than `since` (a
/// pid alone also matches an earlier daemon's entries in a persistent
/// journal).
pub fn daemon_journal(pid: u32, since: std::time::SystemTime) -> Vec<serde_json::Value> {
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    journal_entries(&[
        "SYSLOG_IDENTIFIER=bangerd",
        &format!("_PID={pid}"),
        &format!("--since=@{}.{:06}", since.as_secs(), since.subsec_micros()),
    ])
}

pub fn journal_entries(filter: &[&str]) -> Vec<serde_json::Value> {
    let _ = Command::new("journalctl")
        .arg("--sync")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let output = Command::new("journalctl")
        .args(["--no-pager", "-o", "json"])
        .args(filter)
        .stdin(Stdio::null())
        .output()
        .expect("run journalctl (package systemd)");
    if !output.status.success() {
        eprintln!(
            "banger-testbed: journalctl {filter:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
