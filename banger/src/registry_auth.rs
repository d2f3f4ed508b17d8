//! Registry logins for `image pull REGISTRY/REPO`: `--username` with
//! `--password-stdin`, or what `podman login`, `skopeo login` or `docker
//! login` stored for the registry. The CLI reads them as the calling user
//! and hands them to bangerd for the one pull; bangerd never stores them.
//!
//! Auth files are read in the order podman reads them: `--authfile`, else
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `~/.config/containers/auth.json`, then docker's
//! `$DOCKER_CONFIG/config.json` (`~/.docker/config.json`). The first file
//! with an entry for the registry wins. Entries are `auths.KEY.auth`
//! (base64 of `user:password`); credential helpers are not run.

use std::path::{Path, PathBuf};

use base64::Engine;

/// A registry login.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why no login could be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("cannot read the auth file {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{path} is not a registry auth file: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error(
        "{path} keeps the login for {registry} in the credential helper {helper:?}, which banger does not run; pass --username and --password-stdin"
    )]
    Helper {
        path: PathBuf,
        registry: String,
        helper: String,
    },
}

/// The registry host (`host[:port]`, `docker.io` for short names) and
/// repository of an image reference, as docker and podman read it.
pub fn split_reference(reference: &str) -> (String, String) {
    let (first, rest) = match reference.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest)
        }
        _ => ("docker.io".to_owned(), reference),
    };
    let repo = rest.split('@').next().unwrap_or(rest);
    // A tag is the part after the last ':' of the last path segment.
    let repo = match repo.rfind(':') {
        Some(i) if !repo[i..].contains('/') => &repo[..i],
        _ => repo,
    };
    (first, repo.to_owned())
}

/// An auth-file key as `host[/path]`, without a scheme, trailing slash
/// or docker's `/v1/`; Docker Hub's aliases as `docker.io`.
fn normalize_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.trim_end_matches('/');
    let key = key.strip_suffix("/v1").unwrap_or(key);
    let key = key.strip_suffix("/v2").unwrap_or(key);
    match key.split_once('/') {
        Some((host, path)) => format!("{}/{path}", hub(host)),
        None => hub(key).to_owned(),
    }
}

fn hub(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        h => h,
    }
}

/// The login in one auth file's text for `registry`/`repository`: the
/// entry with the longest key that is the registry or a namespace of
/// the repository in it (podman's rule), or an error when a credential
/// helper holds it.
pub fn lookup(
    text: &str,
    path: &Path,
    registry: &str,
    repository: &str,
) -> Result<Option<Login>, AuthError> {
    let malformed = |why: String| AuthError::Malformed {
        path: path.to_owned(),
        why,
    };
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    let registry = hub(registry);
    let full = format!("{registry}/{repository}");
    let matches = |key: &str| {
        let key = normalize_key(key);
        (key == registry || full == key || full.starts_with(&format!("{key}/")))
            .then_some(key.len())
    };
    let mut best: Option<(usize, &serde_json::Value)> = None;
    if let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) {
        for (key, entry) in auths {
            if let Some(len) = matches(key)
                && best.is_none_or(|(l, _)| len > l)
            {
                best = Some((len, entry));
            }
        }
    }
    if let Some((_, entry)) = best
        && let Some(auth) = entry.get("auth").and_then(|a| a.as_str())
        && !auth.is_empty()
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| malformed(format!("the entry for {registry} is not base64: {e}")))?;
        let raw = String::from_utf8(raw)
            .map_err(|_| malformed(format!("the entry for {registry} is not UTF-8")))?;
        let (username, password) = raw
            .split_once(':')
            .ok_or_else(|| malformed(format!("the entry for {registry} is not user:password")))?;
        return Ok(Some(Login {
            username: username.to_owned(),
            password: password.to_owned(),
        }));
    }
    let helper = doc
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| matches(k).is_some())
                .and_then(|(_, v)| v.as_str())
        })
        .or_else(|| {
            best.and(doc.get("credsStore").and_then(|s| s.as_str()))
                .filter(|s| !s.is_empty())
        });
    match helper {
        Some(helper) => Err(AuthError::Helper {
            path: path.to_owned(),
            registry: registry.to_owned(),
            helper: helper.to_owned(),
        }),
        None => Ok(None),
    }
}

/// The auth files to look in, in order, when no `--authfile` is named.
pub fn auth_files() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut files = Vec::new();
    if let Some(p) = env("REGISTRY_AUTH_FILE") {
        files.push(p);
    }
    if let Some(run) = env("XDG_RUNTIME_DIR") {
        files.push(run.join("containers/auth.json"));
    }
    let home = env("HOME");
    match (env("XDG_CONFIG_HOME"), &home) {
        (Some(c), _) => files.push(c.join("containers/auth.json")),
        (None, Some(h)) => files.push(h.join(".config/containers/auth.json")),
        (None, None) => {}
    }
    match (env("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push(d.join("config.json")),
        (None, Some(h)) => files.push(h.join(".docker/config.json")),
        (None, None) => {}
    }
    files
}

/// The stored login for `reference`, from the first of `files` that has
/// one. Missing files are skipped, except an `--authfile` the user named.
pub fn stored_login(
    reference: &str,
    files: &[PathBuf],
    named: bool,
) -> Result<Option<Login>, AuthError> {
    let (registry, repository) = split_reference(reference);
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => continue,
            Err(e) => {
                return Err(AuthError::Read {
                    path: path.clone(),
                    why: e.to_string(),
                });
            }
        };
        if let Some(login) = lookup(&text, path, &registry, &repository)? {
            return Ok(Some(login));
        }
    }
    Ok(None)
}

/// The password from standard input, as `docker login --password-stdin`
/// takes it: the whole input without its trailing line break.
pub fn password_from(mut input: impl std::io::Read) -> std::io::Result<String> {
    let mut text = String::new();
    input.read_to_string(&mut text)?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn references_split_as_docker_reads_them() {
        let cases = [
            ("debian:bookworm", ("docker.io", "debian")),
            ("library/debian", ("docker.io", "library/debian")),
            ("127.0.0.1:5000/team/dev:v1", ("127.0.0.1:5000", "team/dev")),
            ("localhost/dev@sha256:abc", ("localhost", "dev")),
            ("ghcr.io/o/r:1.2", ("ghcr.io", "o/r")),
            ("registry:5000/r", ("registry:5000", "r")),
        ];
        for (reference, (registry, repo)) in cases {
            assert_eq!(
                split_reference(reference),
                (registry.to_owned(), repo.to_owned()),
                "{reference}"
            );
        }
    }

    #[test]
    fn the_most_specific_entry_wins_and_docker_hub_has_aliases() {
        let text = serde_json::json!({
            "auths": {
                "ghcr.io": { "auth": b64("any:one") },
                "ghcr.io/team": { "auth": b64("team:two") },
                "https://index.docker.io/v1/": { "auth": b64("hub:three") },
                "http://127.0.0.1:5000": { "auth": b64("me:pa:ss") },
            }
        })
        .to_string();
        let p = Path::new("auth.json");
        let get = |r: &str, repo: &str| lookup(&text, p, r, repo).expect("read");
        assert_eq!(get("ghcr.io", "team/app").expect("team").username, "team");
        assert_eq!(get("ghcr.io", "teammate/app").expect("any").username, "any");
        assert_eq!(
            get("docker.io", "library/debian").expect("hub").username,
            "hub"
        );
        let local = get("127.0.0.1:5000", "x").expect("local");
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("me", "pa:ss")
        );
        assert!(!format!("{local:?}").contains("pa:ss"));
        assert_eq!(get("quay.io", "x"), None);
    }

    #[test]
    fn helpers_and_bad_files_say_what_to_do() {
        let p = Path::new("config.json");
        let text = r#"{"auths":{"ghcr.io":{}},"credsStore":"desktop"}"#;
        let e = lookup(text, p, "ghcr.io", "o/r").expect_err("store");
        assert!(e.to_string().contains("--password-stdin"), "{e}");
        let text = r#"{"credHelpers":{"gcr.io":"gcloud"}}"#;
        assert!(matches!(
            lookup(text, p, "gcr.io", "o/r"),
            Err(AuthError::Helper { .. })
        ));
        assert_eq!(lookup(text, p, "ghcr.io", "o/r"), Ok(None));
        assert!(matches!(
            lookup("not json", p, "ghcr.io", "o/r"),
            Err(AuthError::Malformed { .. })
        ));
        let text = r#"{"auths":{"ghcr.io":{"auth":"%%%"}}}"#;
        assert!(matches!(
            lookup(text, p, "ghcr.io", "o/r"),
            Err(AuthError::Malformed { .. })
        ));
    }

    #[test]
    fn files_are_read_in_order_and_a_named_one_must_exist() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        let missing = dir.path().join("missing.json");
        std::fs::write(&a, r#"{"auths":{"other.io":{"auth":"eDp5"}}}"#).expect("a");
        std::fs::write(
            &b,
            serde_json::json!({"auths":{"ghcr.io":{"auth": b64("b:pw")}}}).to_string(),
        )
        .expect("b");
        let files = [missing.clone(), a.clone(), b.clone()];
        let login = stored_login("ghcr.io/o/r:1", &files, false)
            .expect("read")
            .expect("found");
        assert_eq!(login.username, "b");
        assert_eq!(stored_login("quay.io/o/r", &files, false), Ok(None));
        assert!(matches!(
            stored_login("ghcr.io/o/r", &[missing], true),
            Err(AuthError::Read { .. })
        ));
    }

    #[test]
    fn a_password_from_stdin_loses_only_its_line_break() {
        assert_eq!(password_from(&b"tok en\n"[..]).expect("read"), "tok en");
        assert_eq!(password_from(&b"pw\r\n"[..]).expect("read"), "pw");
        assert_eq!(password_from(&b"pw"[..]).expect("read"), "pw");
    }
}
