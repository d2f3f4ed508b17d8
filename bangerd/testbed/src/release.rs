//! Release channels for the update tests: minisign keys and signatures
//! made by the real `minisign` tool, and a snapshot of a directory tree to
//! show that a refused update changed nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A minisign key pair made with `minisign -G -W` (no password).
#[derive(Debug, Clone)]
pub struct Keypair {
    /// The secret key file.
    pub secret: PathBuf,
    /// The public key file (what `scripts/publish-release` users keep).
    pub public_file: PathBuf,
    /// The public key line (what `update.extra_keys` takes).
    pub public: String,
}

fn minisign(args: &[&std::ffi::OsStr]) {
    let out = Command::new("minisign")
        .args(args)
        .output()
        .expect("run minisign (apt install minisign)");
    assert!(
        out.status.success(),
        "minisign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new key pair `dir/<name>.key` + `dir/<name>.pub`.
///
/// # Panics
/// When minisign is missing or fails.
pub fn keypair(dir: &Path, name: &str) -> Keypair {
    let secret = dir.join(format!("{name}.key"));
    let public_file = dir.join(format!("{name}.pub"));
    minisign(&[
        "-G".as_ref(),
        "-W".as_ref(),
        "-p".as_ref(),
        public_file.as_os_str(),
        "-s".as_ref(),
        secret.as_os_str(),
    ]);
    let public = std::fs::read_to_string(&public_file)
        .expect("read the public key")
        .lines()
        .nth(1)
        .expect("a minisign public key has two lines")
        .to_owned();
    Keypair {
        secret,
        public_file,
        public,
    }
}

/// Signs `manifest` (writing `<manifest>.minisig`) with `secret`, with the
/// trusted comment `version:<signed_version>` bangerd checks.
///
/// # Panics
/// When minisign fails.
pub fn sign_manifest(manifest: &Path, secret: &Path, signed_version: &str) {
    sign(manifest, secret, &format!("version:{signed_version}"));
}

/// Signs `file` (writing `<file>.minisig`) with `secret` and the trusted
/// comment `comment` (a catalog's is `catalog:<kind> serial:<n>`).
///
/// # Panics
/// When minisign fails.
pub fn sign(file: &Path, secret: &Path, comment: &str) {
    minisign(&[
        "-S".as_ref(),
        "-s".as_ref(),
        secret.as_os_str(),
        "-t".as_ref(),
        comment.as_ref(),
        "-m".as_ref(),
        file.as_os_str(),
    ]);
}

/// Every entry under `dir`, sorted, with its contents (a symlink as its
/// target, a directory as nothing): equal snapshots mean an unchanged tree.
///
/// # Panics
/// When an entry cannot be read.
pub fn tree_snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("read link");
            out.push((path, target.into_os_string().into_encoded_bytes()));
        } else if kind.is_dir() {
            out.push((path.clone(), Vec::new()));
            out.extend(tree_snapshot(&path));
        } else {
            let bytes = std::fs::read(&path).expect("read file");
            out.push((path, bytes));
        }
    }
    out.sort();
    out
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A release channel `root/name` for `version`, signed by `secret` with the
/// trusted comment `version:<signed>`. Its artifacts are scripts that
/// append their arguments to `$BANGER_TEST_MARK` and run the real binary
/// (so a hand-over to them shows), padded to 300 KB so a truncated
/// download is really cut.
///
/// # Panics
/// On I/O errors or when minisign fails.
pub fn channel(root: &Path, name: &str, version: &str, signed: &str, secret: &Path) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join(version)).expect("channel directory");
    let mut artifacts = Vec::new();
    for binary in ["banger", "bangerd", "banger-agent"] {
        let mut body = format!(
            "#!/bin/sh\n# {binary} {version}\necho \"$@\" >>\"${{BANGER_TEST_MARK:-/dev/null}}\"\nexec {} \"$@\"\n",
            crate::bin_path(binary).display()
        );
        for i in 0..20_000 {
            body.push_str(&format!("# padding {i}\n"));
        }
        let body = body.into_bytes();
        std::fs::write(dir.join(version).join(binary), &body).expect("artifact");
        artifacts.push(serde_json::json!({
            "name": binary,
            "path": format!("{version}/{binary}"),
            "size": body.len(),
            "sha256": sha256_hex(&body),
        }));
    }
    let manifest = serde_json::json!({ "version": version, "artifacts": artifacts });
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).expect("json")).expect("manifest");
    sign_manifest(&path, secret, signed);
    dir
}

/// `channel/catalog/<kind>.json` with `serial` and `entries`, signed by
/// `secret` with the trusted comment `comment` (a good one is
/// `catalog:<kind> serial:<serial>`).
///
/// # Panics
/// On I/O errors or when minisign fails.
pub fn catalog(
    channel: &Path,
    kind: &str,
    serial: u64,
    entries: &[serde_json::Value],
    comment: &str,
    secret: &Path,
) {
    let dir = channel.join("catalog");
    std::fs::create_dir_all(&dir).expect("catalog directory");
    let document = serde_json::json!({
        "schema": 1, "kind": kind, "serial": serial, "entries": entries,
    });
    let path = dir.join(format!("{kind}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&document).expect("json")).expect("catalog");
    sign(&path, secret, comment);
}
