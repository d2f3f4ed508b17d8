//! First-boot setup: a script a create brings (`vm create --setup FILE`),
//! run once as root through the agent after the VM's first boot, its
//! output shown line by line as the job's `setup` stage. A script that
//! fails leaves the VM running for a look; the job reports its status and
//! last lines.

use std::path::PathBuf;

use banger_agent_proto::ExecSpec;
use banger_agent_proto::client::StreamEvent;
use banger_agent_proto::stream::ExitStatus;

use super::{Vms, blocking};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::JobContext;

/// The largest setup script taken.
pub const MAX_SETUP: usize = 256 * 1024;

/// Where a VM's pending script waits, in its root-only directory.
const SETUP_FILE: &str = "setup.script";

/// How many last lines of output a failure shows.
const TAIL_LINES: usize = 15;

/// Runs the script from stdin as a file of its own, so a `#!` line picks
/// its interpreter (a script without one runs under sh).
const WRAPPER: &str = "f=$(mktemp /tmp/banger-setup.XXXXXX) || exit 1; cat > \"$f\" && \
                       chmod 700 \"$f\" && \"$f\"; s=$?; rm -f \"$f\"; exit $s";

/// Check a setup script a caller sent.
pub fn validate_setup(script: &[u8]) -> Result<()> {
    if script.is_empty() {
        return Err(Error::invalid("the setup script is empty"));
    }
    if script.len() > MAX_SETUP {
        return Err(Error::new(
            ErrorKind::LimitExceeded,
            format!(
                "the setup script is {} KiB, over the {} KiB limit; have it fetch the rest",
                script.len() / 1024,
                MAX_SETUP / 1024
            ),
        ));
    }
    Ok(())
}

impl Vms {
    pub(super) fn setup_path(&self, id: &str) -> PathBuf {
        self.vm_paths(id).dir.join(SETUP_FILE)
    }

    /// Keep `script` for VM `id`'s first boot (its directory exists).
    pub(super) async fn keep_setup(&self, id: &str, script: Vec<u8>) -> Result<()> {
        let path = self.setup_path(id);
        blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(&script).map(|()| f))
                .map_err(|e| Error::failed(format!("cannot keep the setup script: {e}")))?;
            f.flush()
                .map_err(|e| Error::failed(format!("cannot keep the setup script: {e}")))
        })
        .await
    }

    /// Run VM `id`'s pending setup script, if it has one, as the `setup`
    /// stage at `fraction`. The script is taken first: it runs once.
    pub(super) async fn run_setup(&self, ctx: &JobContext, id: &str, fraction: f64) -> Result<()> {
        let path = self.setup_path(id);
        let script = blocking(move || match std::fs::read(&path) {
            Ok(s) => {
                let _ = std::fs::remove_file(&path);
                Ok(Some(s))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::failed(format!("cannot read the setup script: {e}"))),
        })
        .await?;
        let Some(script) = script else {
            return Ok(());
        };
        ctx.stage("setup", fraction).await?;
        let vm = self.vm_by_id(id).await?;
        let mut session = self.agent_session(&vm).await?;
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), WRAPPER.into()],
            env: Vec::new(),
            workdir: None,
            user: None,
            tty: None,
        };
        let stream = session
            .exec(spec, super::exec::START_TIMEOUT)
            .await
            .map_err(|e| {
                Error::failed(format!(
                    "cannot start the setup script of vm {}: {e}",
                    vm.name
                ))
            })?;
        let (input, mut output) = (stream.input, stream.output);
        let feed = tokio::spawn(async move {
            let _ = input.write(&script).await;
            let _ = input.close().await;
            input
        });
        let mut lines = Lines::default();
        let status = loop {
            let event = tokio::select! {
                e = output.next() => e,
                () = ctx.token().cancelled() => {
                    if let Ok(input) = feed.await {
                        let _ = input.signal(nix::libc::SIGKILL, std::time::Duration::from_secs(5)).await;
                    }
                    return Err(Error::new(ErrorKind::Cancelled, format!(
                        "the setup script of vm {} was cancelled; the vm is left running", vm.name)));
                }
            };
            match event {
                Some(StreamEvent::Output(channel, bytes)) => {
                    for line in lines.push(&bytes) {
                        ctx.progress(&line, fraction, None);
                    }
                    let _ = output.consumed(channel, bytes.len()).await;
                }
                Some(StreamEvent::Exit(status)) => break status,
                Some(StreamEvent::Broken(why)) => {
                    return Err(Error::failed(format!(
                        "the setup script of vm {} lost its agent: {why}",
                        vm.name
                    )));
                }
                None => {
                    return Err(Error::failed(format!(
                        "the setup script of vm {} lost its agent",
                        vm.name
                    )));
                }
            }
        };
        if let Some(line) = lines.finish() {
            ctx.progress(&line, fraction, None);
        }
        if status == ExitStatus::Code(0) {
            return Ok(());
        }
        let how = match status {
            ExitStatus::Code(c) => format!("exited with status {c}"),
            ExitStatus::Signal(s) => format!("was killed by signal {s}"),
        };
        Err(Error::failed(format!(
            "the setup script of vm {name} {how}; the vm is left running for a look \
             (banger vm ssh {name}). Its last output:\n{tail}",
            name = vm.name,
            tail = lines.tail()
        )))
    }
}

/// Output cut into lines, keeping the last few.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    last: std::collections::VecDeque<String>,
}

impl Lines {
    /// Add output; returns the lines it completed.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                done.push(self.take());
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        done
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_owned();
        self.partial.clear();
        if self.last.len() == TAIL_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line.clone());
        line
    }

    /// The unfinished last line, if any.
    fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn tail(&self) -> String {
        self.last
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_the_tail_kept() {
        let mut l = Lines::default();
        assert_eq!(l.push(b"a\nb"), vec!["a".to_owned()]);
        assert_eq!(l.push(b"c\r\n"), vec!["bc".to_owned()]);
        for i in 0..20 {
            l.push(format!("{i}\n").as_bytes());
        }
        l.push(b"end");
        assert_eq!(l.finish().as_deref(), Some("end"));
        let tail = l.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.ends_with("  end") && !tail.contains("  bc"), "{tail}");
    }

    #[test]
    fn scripts_are_checked() {
        assert!(validate_setup(b"echo hi").is_ok());
        assert_eq!(
            validate_setup(b"").map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
        assert_eq!(
            validate_setup(&vec![b'x'; MAX_SETUP + 1]).map_err(|e| e.kind),
            Err(ErrorKind::LimitExceeded)
        );
    }
}
