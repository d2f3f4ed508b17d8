//! An image's layers applied in a step of their own. The tree they make
//! holds what the image says: files of any owner, setuid and setgid
//! modes, file capabilities (`security.capability`), device nodes. The
//! hardened `bangerd.service` may make none of the last three
//! (`RestrictSUIDSGID=yes`, no `CAP_SETFCAP` or `CAP_MKNOD`), so the
//! layers are applied by bangerd's own binary as `bangerd layers-apply
//! SPEC` ([`exec`]) through the build steps' runner: a transient unit
//! with the rights a build step has and only the pull's directory
//! writable where systemd is PID 1, a child elsewhere.
//!
//! The helper reports on its standard output: `unpacked N BYTES` as
//! layer `N` goes, and `error KIND MESSAGE` (its last line) when it fails.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifacts::build::steps::{self, Step, StepRunner};
use crate::error::{Error, ErrorKind, Result};
use banger_formats::layers;

/// The argument that makes `bangerd` apply layers.
pub const HELPER_ARG: &str = "layers-apply";

/// What the helper applies: `blobs` in order onto `root`, each removed
/// once applied; then every owner in the tree goes up by `shift`
/// ([`banger_formats::tool::shift_owners`]), for the sandbox that builds
/// its file system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    pub root: PathBuf,
    pub blobs: Vec<PathBuf>,
    #[serde(default)]
    pub shift: u32,
}

/// The error in a helper's `error KIND MESSAGE` line.
fn error_line(line: &str) -> Option<Error> {
    let (word, message) = line.strip_prefix("error ")?.split_once(' ')?;
    let kind = ErrorKind::from_name(word)?;
    Some(Error::new(kind, message))
}

/// The layer and bytes in a helper's `unpacked N BYTES` line.
fn progress_line(line: &str) -> Option<(usize, u64)> {
    let (n, bytes) = line.strip_prefix("unpacked ")?.split_once(' ')?;
    Some((n.parse().ok()?, bytes.parse().ok()?))
}

/// The helper's main: apply `spec` (JSON); 0 when every layer went on.
pub fn exec(spec: &str) -> i32 {
    let mut out = std::io::stdout().lock();
    let fail = |out: &mut std::io::StdoutLock<'_>, e: &Error| {
        // One line: the message's own line breaks would split it.
        let message = e.message.replace('\n', " ");
        let _ = writeln!(out, "error {} {message}", e.kind.name());
        let _ = out.flush();
        1
    };
    let spec: Spec = match serde_json::from_str(spec) {
        Ok(spec) => spec,
        Err(e) => return fail(&mut out, &Error::invalid(format!("bad specification: {e}"))),
    };
    for (i, blob) in spec.blobs.iter().enumerate() {
        let n = i + 1;
        let mut said = std::time::Instant::now();
        let applied = layers::apply(&spec.root, blob, n, &mut |done| {
            if said.elapsed().as_millis() >= 200 {
                said = std::time::Instant::now();
                writeln!(out, "unpacked {n} {done}")
                    .and_then(|()| out.flush())
                    .map_err(|e| Error::failed(format!("cannot report progress: {e}")))?;
            }
            Ok(())
        })
        .and_then(|()| {
            std::fs::remove_file(blob)
                .map_err(|e| Error::failed(format!("cannot remove {}: {e}", blob.display())))
        });
        if let Err(e) = applied {
            return fail(&mut out, &e);
        }
    }
    match banger_formats::tool::shift_owners(&spec.root, spec.shift) {
        Ok(_) => 0,
        Err(e) => fail(&mut out, &e),
    }
}

/// Run `spec` in the step `id` (unique, e.g. `pull-IMAGE-layers`), run
/// by `runner` with `helper` (bangerd's binary): its blobs applied onto
/// its root, then the tree's owners shifted. `tick` sees each layer's
/// number and bytes unpacked so far, `check` is asked twice a second;
/// either failing stops the step.
pub async fn apply(
    runner: &dyn StepRunner,
    helper: &Path,
    id: &str,
    spec: &Spec,
    tick: &mut (dyn FnMut(usize, u64) -> Result<()> + Send),
    check: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    let json = serde_json::to_string(spec)
        .map_err(|e| Error::failed(format!("cannot describe the layers: {e}")))?;
    let mut writable = vec![spec.root.clone()];
    writable.extend(
        spec.blobs
            .iter()
            .filter_map(|b| b.parent())
            .map(Path::to_owned),
    );
    writable.dedup();
    let what = if spec.blobs.is_empty() {
        "shift the tree's owners"
    } else {
        "apply layers"
    };
    let step = Step {
        id: id.to_owned(),
        what: what.to_owned(),
        program: helper.to_owned(),
        args: vec![HELPER_ARG.to_owned(), json],
        writable,
        user: None,
    };
    let mut failure = None;
    let ran = steps::run(
        runner,
        &step,
        &mut |line| {
            if let Some((n, bytes)) = progress_line(line) {
                tick(n, bytes)
            } else {
                if let Some(e) = error_line(line) {
                    failure = Some(e);
                }
                Ok(())
            }
        },
        check,
    )
    .await;
    match (ran, failure) {
        (Err(_), Some(e)) => Err(e),
        (ran, _) => ran,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_progress_go_through_lines() {
        for kind in ErrorKind::ALL {
            let line = format!("error {} layer 2: bad entry", kind.name());
            assert_eq!(
                error_line(&line),
                Some(Error::new(kind, "layer 2: bad entry"))
            );
        }
        assert_eq!(error_line("error nonsense x"), None);
        assert_eq!(error_line("something else"), None);
        assert_eq!(progress_line("unpacked 3 1048576"), Some((3, 1 << 20)));
        assert_eq!(progress_line("unpacked x 1"), None);
    }
}
