//! The release manifest and its minisign signature.
//!
//! A channel serves `manifest.json` and `manifest.json.minisig`. The
//! signature's trusted comment (covered by the signature) must carry
//! `version:<v>` naming the manifest's own version, so a validly signed
//! manifest cannot be passed off as another release.

use std::collections::BTreeSet;

use banger_release::signed::{self, PublicKey};
use banger_release::{BINARIES, Version};
use serde::{Deserialize, Serialize};

use super::UpdateError;

/// Largest artifact a manifest may promise (a guard against nonsense, not
/// a budget).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The release's version (semver).
    pub version: String,
    /// One entry per binary of the release.
    pub artifacts: Vec<Artifact>,
}

/// One binary of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Which binary: `banger`, `bangerd` or `banger-agent`.
    pub name: String,
    /// Where it is, relative to the channel URL.
    pub path: String,
    /// Exact size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// A manifest whose signature verified and whose fields make sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The release's version.
    pub version: Version,
    /// Its artifacts, one per entry of [`BINARIES`].
    pub artifacts: Vec<Artifact>,
}

/// Parse one minisign public key: a bare base64 key line, or a whole
/// `.pub` file (comment line and key line).
pub fn parse_key(text: &str) -> Result<PublicKey, UpdateError> {
    crate::channel::parse_key(text).map_err(UpdateError::from)
}

/// Check `signature` over `manifest` against `keys`, then the manifest
/// itself.
pub fn verify(
    manifest: &[u8],
    signature: &str,
    keys: &[PublicKey],
) -> Result<Verified, UpdateError> {
    let comment = signed::verify(manifest, signature, keys)
        .map_err(|e| UpdateError::Signature(e.to_string()))?;
    let parsed: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| UpdateError::Manifest(format!("not a banger manifest: {e}")))?;
    let signed = signed::trusted_field(&comment, "version");
    if signed != Some(parsed.version.as_str()) {
        return Err(UpdateError::VersionMismatch {
            signed: signed.unwrap_or("").to_owned(),
            manifest: parsed.version,
        });
    }
    validate(parsed)
}

fn validate(manifest: Manifest) -> Result<Verified, UpdateError> {
    let bad = |m: String| UpdateError::Manifest(m);
    let version = Version::parse(&manifest.version)
        .map_err(|e| bad(format!("version {:?} is not semver: {e}", manifest.version)))?;
    let mut seen = BTreeSet::new();
    for a in &manifest.artifacts {
        if !BINARIES.contains(&a.name.as_str()) {
            return Err(bad(format!("unknown artifact {:?}", a.name)));
        }
        if !seen.insert(a.name.as_str()) {
            return Err(bad(format!("artifact {:?} is listed twice", a.name)));
        }
        let path_ok = !a.path.is_empty()
            && !a.path.starts_with('/')
            && !a.path.contains("://")
            && !a.path.contains('?')
            && a.path
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
        if !path_ok {
            return Err(bad(format!(
                "artifact {:?} has path {:?}; it must be relative to the channel, without `..`",
                a.name, a.path
            )));
        }
        if a.size == 0 || a.size > MAX_ARTIFACT_BYTES {
            return Err(bad(format!("artifact {:?} has size {}", a.name, a.size)));
        }
        if a.sha256.len() != 64
            || !a
                .sha256
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad(format!(
                "artifact {:?} has sha256 {:?}; expected 64 lowercase hex digits",
                a.name, a.sha256
            )));
        }
    }
    if let Some(missing) = BINARIES.iter().find(|b| !seen.contains(*b)) {
        return Err(bad(format!("artifact {missing:?} is missing")));
    }
    Ok(Verified {
        version,
        artifacts: manifest.artifacts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str) -> Manifest {
        Manifest {
            version: version.into(),
            artifacts: BINARIES
                .iter()
                .map(|b| Artifact {
                    name: (*b).into(),
                    path: format!("{version}/{b}"),
                    size: 10,
                    sha256: "ab".repeat(32),
                })
                .collect(),
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert_eq!(
            validate(manifest("0.2.0")).expect("ok").version,
            Version::new(0, 2, 0)
        );
        type Breakage = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Breakage, &str)> = vec![
            (Box::new(|m| m.version = "two".into()), "not semver"),
            (
                Box::new(|m| m.artifacts[0].name = "sh".into()),
                "unknown artifact",
            ),
            (
                Box::new(|m| m.artifacts[1].name = "banger".into()),
                "listed twice",
            ),
            (
                Box::new(|m| {
                    m.artifacts.pop();
                }),
                "is missing",
            ),
            (
                Box::new(|m| m.artifacts[0].path = "../x".into()),
                "relative to the channel",
            ),
            (
                Box::new(|m| m.artifacts[0].path = "/etc/x".into()),
                "relative to the channel",
            ),
            (
                Box::new(|m| m.artifacts[0].path = "https://evil/x".into()),
                "relative",
            ),
            (Box::new(|m| m.artifacts[0].size = 0), "has size 0"),
            (
                Box::new(|m| m.artifacts[0].sha256 = "AB".repeat(32)),
                "lowercase hex",
            ),
        ];
        for (break_it, want) in cases {
            let mut m = manifest("0.2.0");
            break_it(&mut m);
            let e = validate(m).expect_err(want);
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
    }

    #[test]
    fn keys_parse_as_lines_or_files() {
        let line = "RWSoWe9kXFMXtvu5gv1Aw+RFeWBhbsKPY8V8eLnjK1IJaW4QZ5jTKG44";
        parse_key(line).expect("line");
        parse_key(&format!("untrusted comment: k\n{line}\n")).expect("file");
        parse_key(include_str!("../../../packaging/release-key.pub")).expect("built-in key");
        let e = parse_key("not a key").expect_err("bad");
        assert!(e.to_string().contains("not a minisign public key"), "{e}");
    }
}
