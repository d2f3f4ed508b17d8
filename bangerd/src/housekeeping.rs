//! Periodic housekeeping while bangerd runs: console logs of running VMs
//! are rotated past `limits.console_log_max_mib` (one old generation,
//! `console.log.1`, is kept) and the job history is pruned to
//! `daemon.job_history_days`. Without this a chatty guest filled the
//! state directory and the job table grew forever. [`suspend_idle`]
//! suspends VMs idle for `vm.suspend_idle_secs`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::Core;

/// How often console logs are looked at.
const ROTATE_EVERY: Duration = Duration::from_secs(30);
/// How often the job history is pruned (also once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What [`rotate_console`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The log is within its limit (or absent).
    NotNeeded,
    /// The log moved to `<log>.1` and was started anew.
    Rotated,
    /// The writer does not append: truncating under it would leave a
    /// hole as long as the old log, so the log was left as it is.
    WriterDoesNotAppend,
}

/// Rotate `log` when it is longer than `max_bytes`: copy it to `<log>.1`
/// (replacing the older generation) and truncate it. The writer (`pid`,
/// the VMM) keeps its descriptor; because it appends (QEMU opens the
/// console file with `append=on`), its next write lands at the new end.
/// Bytes written between the copy and the truncation are lost, as with
/// logrotate's copytruncate.
pub fn rotate_console(log: &Path, writer: Option<u32>, max_bytes: u64) -> io::Result<Rotation> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Rotation::NotNeeded),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(Rotation::NotNeeded);
    }
    if let Some(pid) = writer
        && !appends(pid, log)?
    {
        return Ok(Rotation::WriterDoesNotAppend);
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    let mut tmp = log.as_os_str().to_owned();
    tmp.push(".1.tmp");
    std::fs::copy(log, &tmp)?;
    std::fs::rename(&tmp, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(Rotation::Rotated)
}

/// Whether process `pid` holds `path` open, and every such descriptor
/// appends (`O_APPEND` in `/proc/PID/fdinfo`). A process that does not
/// hold it at all writes nothing to it: that counts as appending.
fn appends(pid: u32, path: &Path) -> io::Result<bool> {
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(d) => d,
        // Gone: it writes nothing more.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .ok_or_else(|| io::Error::other("fdinfo has no flags line"))?;
        if flags & nix::libc::O_APPEND as u32 == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Run housekeeping until the daemon exits.
pub async fn run(core: Arc<Core>) {
    let mut last_prune: Option<Instant> = None;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            prune_jobs(&core).await;
        }
        rotate_consoles(&core).await;
        tokio::time::sleep(ROTATE_EVERY).await;
    }
}

/// Suspend idle VMs until the daemon exits: a look every
/// [`look_every`](crate::vm::commands::look_every) of the configured idle
/// time (read again at each look, so a reload applies), every 30 s while
/// it is off.
pub async fn suspend_idle(core: Arc<Core>) {
    let mut watch = crate::vm::commands::IdleWatch::default();
    loop {
        core.vms().suspend_idle(&mut watch).await;
        let idle = Duration::from_secs(core.config().vm.suspend_idle_secs);
        let every = if idle.is_zero() {
            ROTATE_EVERY
        } else {
            crate::vm::commands::look_every(idle)
        };
        tokio::time::sleep(every).await;
    }
}

async fn prune_jobs(core: &Arc<Core>) {
    let days = core.config().daemon.job_history_days;
    match core.prune_job_history(days).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("pruned {n} jobs older than {days} days"),
        Err(e) => tracing::warn!("cannot prune the job history: {e}"),
    }
}

async fn rotate_consoles(core: &Arc<Core>) {
    let max = core
        .config()
        .limits
        .console_log_max_mib
        .saturating_mul(1 << 20);
    // Only the VMs that run: with a thousand stopped ones, reading every
    // row twice a minute is a burst of allocations for nothing.
    let Ok(vms) = core.vms().list_with_process().await else {
        return;
    };
    let logs: Vec<_> = vms
        .into_iter()
        // QEMU's console descriptor appends (`append=on`, and a jailed
        // QEMU's is opened so by vmm-exec): no need to look, which bangerd
        // may not do for a VMM of another user (no CAP_SYS_PTRACE).
        .map(|v| {
            let writer = v
                .pid
                .filter(|_| v.vmm != Some(crate::vm::vmm::VmmDriver::Qemu));
            (v.id.clone(), core.vms().console_log_path(&v.id), writer)
        })
        .collect();
    let done = crate::blocking::value(move || {
        for (id, log, pid) in logs {
            match rotate_console(&log, pid, max) {
                Ok(Rotation::NotNeeded) => {}
                Ok(Rotation::Rotated) => {
                    tracing::info!(banger_vm_id = %id, "console log rotated past {max} bytes");
                }
                Ok(Rotation::WriterDoesNotAppend) => {
                    tracing::warn!(banger_vm_id = %id, "console log past {max} bytes, but its VMM does not append to it; not rotated");
                }
                Err(e) => tracing::warn!(banger_vm_id = %id, "cannot rotate the console log: {e}"),
            }
        }
    })
    .await;
    if let Err(e) = done {
        tracing::warn!("console rotation failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;

    /// A real process that writes a line to `log` every few ms through a
    /// descriptor opened by the shell with `>>` (append) or `<>` (not).
    fn writer(log: &Path, append: bool) -> Child {
        let redirect = if append { ">>" } else { "<>" };
        let script = format!(
            "exec 3{redirect}'{}'; while :; do echo 0123456789abcdef >&3; sleep 0.005; done",
            log.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .expect("sh")
    }

    fn wait_len(log: &Path, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) < at_least {
            assert!(Instant::now() < deadline, "the writer wrote nothing");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_appending_writer_goes_on_at_the_top_of_the_new_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        std::fs::write(&log, vec![b'x'; 4096]).expect("log");
        let mut child = writer(&log, true);
        wait_len(&log, 4096 + 170);
        assert_eq!(
            rotate_console(&log, Some(child.id()), 1 << 20).expect("rotate"),
            Rotation::NotNeeded
        );
        assert_eq!(
            rotate_console(&log, Some(child.id()), 1024).expect("rotate"),
            Rotation::Rotated
        );
        let old = std::fs::read(dir.path().join("console.log.1")).expect("old");
        assert!(old.starts_with(&[b'x'; 4096]) && old.len() > 4096);
        // The writer's next lines start the new log: no hole where the
        // old bytes were.
        wait_len(&log, 170);
        let _ = child.kill();
        let _ = child.wait();
        let new = std::fs::read(&log).expect("new");
        assert!(new.starts_with(b"0123456789abcdef\n"), "{:?}", &new[..32]);
        assert!(!new.contains(&0), "a hole in the rotated log");
    }

    #[test]
    fn a_writer_that_does_not_append_keeps_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        std::fs::write(&log, vec![b'x'; 4096]).expect("log");
        let mut child = writer(&log, false);
        wait_len(&log, 4096);
        // `<>` writes from offset 0; let it write something first.
        std::thread::sleep(Duration::from_millis(50));
        let result = rotate_console(&log, Some(child.id()), 1024);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(result.expect("rotate"), Rotation::WriterDoesNotAppend);
        assert!(!dir.path().join("console.log.1").exists());
        // Without a writer (the VM stopped), it rotates.
        assert_eq!(
            rotate_console(&log, None, 1024).expect("rotate"),
            Rotation::Rotated
        );
        assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
    }
}
