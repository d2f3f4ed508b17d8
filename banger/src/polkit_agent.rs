//! A text authentication agent (`pkttyagent`) for the duration of one call,
//! so polkit can ask for a password on this terminal (also over SSH).
//!
//! Protocol: `pkttyagent --process <our pid> --notify-fd <fd> --fallback`
//! closes `fd` once it has registered with polkit; only then is it safe to
//! make the call. When pkttyagent is missing or does not register in time,
//! banger goes on without it (a desktop session agent may still answer).

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// How long pkttyagent gets to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long pkttyagent gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

const PKTTYAGENT: &str = "pkttyagent";

/// Whether banger may prompt: the user did not say `--no-ask-password`, and
/// there is a terminal to prompt on (stdin and stderr).
pub fn can_prompt(ask_password: bool) -> bool {
    ask_password && std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// A running, registered pkttyagent. Stop it with [`Agent::stop`]; dropping
/// it kills it.
#[derive(Debug)]
pub struct Agent {
    child: Child,
}

impl Agent {
    /// Start pkttyagent for this process and wait until it has registered.
    /// `Err` says why there is no agent; the caller goes on without one.
    pub async fn start() -> Result<Agent, String> {
        // The write end is inherited by pkttyagent only: it is created
        // close-on-exec, and the flag is cleared just for this spawn (banger
        // starts no other process concurrently).
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot create a pipe: {e}"))?;
        fcntl(&write_end, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| format!("cannot pass the notify pipe: {e}"))?;

        let mut command = Command::new(PKTTYAGENT);
        command
            .arg("--process")
            .arg(std::process::id().to_string())
            .arg("--notify-fd")
            .arg(write_end.as_raw_fd().to_string())
            .arg("--fallback")
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let spawned = command.spawn();
        drop(write_end);
        let child = spawned.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{PKTTYAGENT} is not installed (package pkexec or polkitd)")
            }
            _ => format!("cannot start {PKTTYAGENT}: {e}"),
        })?;
        let mut agent = Agent { child };

        let mut notify = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)
            .map_err(|e| format!("cannot watch the notify pipe: {e}"))?;
        let mut sink = Vec::new();
        match tokio::time::timeout(REGISTER_TIMEOUT, notify.read_to_end(&mut sink)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("cannot read the notify pipe: {e}")),
            Err(_) => {
                return Err(format!(
                    "{PKTTYAGENT} did not register within {} s",
                    REGISTER_TIMEOUT.as_secs()
                ));
            }
        }
        // The pipe also closes when pkttyagent exits (e.g. it could not
        // register); a short grace lets such an exit be reaped and seen.
        tokio::time::sleep(Duration::from_millis(10)).await;
        match agent.child.try_wait() {
            Ok(Some(status)) => Err(format!("{PKTTYAGENT} exited early ({status})")),
            _ => Ok(agent),
        }
    }

    /// Stop the agent: SIGTERM, then SIGKILL if it lingers.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}
