//! Spawning child processes that die with the test process, and stopping
//! them again.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread all tied children are forked from. `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked the child exits, not the process: forking
/// from a test's own thread (or a tokio blocking thread) would kill the
/// child when that thread ends. This thread lives until the process exits.
static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<Request> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("banger-testbed-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // The requester may have gone away; then the child is
                    // dropped (and killed by nobody): nothing else to do.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the banger-testbed spawner thread");
        tx
    })
}

/// Spawns `command` so that the child gets `SIGKILL` when the test process
/// exits for any reason, including `SIGKILL`.
///
/// Does not survive a change of the child's credentials (a setuid binary, or
/// a daemon that switches user itself, like polkitd).
pub(crate) fn spawn_tied(mut command: Command) -> io::Result<Child> {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec; it only makes the
    // async-signal-safe system calls prctl(2) and getppid(2), and builds
    // io::Errors from raw error numbers, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before prctl took effect.
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("the banger-testbed spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the banger-testbed spawner thread did not answer"))?
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal_pid(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), signal);
    }
}

/// Waits for `child` to exit for at most `timeout`.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops `child`: `SIGTERM`, then `SIGKILL` if it has not exited after
/// `grace`. Returns its exit status.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal_pid(child.id(), Signal::SIGTERM);
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    kill_and_wait(child)
}

/// `SIGKILL`s `child` and reaps it.
pub(crate) fn kill_and_wait(child: &mut Child) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // Fails only if it has exited in the meantime; wait() reaps it either way.
    let _ = child.kill();
    child.wait()
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces and parentheses.
        Ok(stat) => match stat.rfind(')') {
            Some(end) => !matches!(stat[end + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => false,
        },
        Err(_) => false,
    }
}
