//! Release channels: the URLs and the keys banger trusts for releases and
//! catalogs. One decision each, used by the configuration's checks, the
//! updater and the catalogs.

use std::path::{Path, PathBuf};

use banger_release::ReleaseError;
use banger_release::signed::{PublicKey, RELEASE_KEY};
use reqwest::Url;

/// Why a channel URL or a key is refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The channel URL is not acceptable.
    #[error("bad release channel {url:?}: {why}")]
    Url {
        /// As given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// A public key could not be parsed.
    #[error("{0}")]
    Key(String),
    /// `update.extra_keys` came from a file others could have written.
    #[error(
        "{}: update.extra_keys is honoured only while the file is owned by root and writable by no one else ({why}); fix its owner and mode, or remove the keys",
        path.display()
    )]
    UntrustedConfig {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Validate a channel URL: `https://…`, or `http://` to a loopback
/// address (tests, local mirrors). Returns it with a trailing `/`, so
/// relative paths resolve inside it.
pub fn channel_url(text: &str) -> Result<Url, ChannelError> {
    let bad = |why: &str| ChannelError::Url {
        url: text.to_owned(),
        why: why.to_owned(),
    };
    let mut url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(bad(
                "plain HTTP is allowed to loopback addresses only; use https",
            ));
        }
        _ => return Err(bad("the scheme must be https")),
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("no query, fragment or credentials allowed"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Whether `url`'s host is a loopback address (or `localhost`).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Parse one minisign public key: a bare base64 key line, or a whole
/// `.pub` file (comment line and key line).
pub fn parse_key(text: &str) -> Result<PublicKey, ChannelError> {
    banger_release::signed::parse_key(text).map_err(|e| ChannelError::Key(e.to_string()))
}

/// The keys that may sign a release: the built-in one, and
/// `update.extra_keys` when `config_file` is root's alone.
pub fn trusted_keys(extra: &[String], config_file: &Path) -> Result<Vec<PublicKey>, ChannelError> {
    let mut keys = vec![parse_key(RELEASE_KEY)?];
    if extra.is_empty() {
        return Ok(keys);
    }
    banger_release::trusted(config_file).map_err(|e| ChannelError::UntrustedConfig {
        path: config_file.to_owned(),
        why: match e {
            ReleaseError::Untrusted { why, .. } => why,
            other => other.to_string(),
        },
    })?;
    for key in extra {
        keys.push(parse_key(key)?);
    }
    Ok(keys)
}

impl From<ChannelError> for crate::error::Error {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::UntrustedConfig { .. } => Self::denied(e.to_string()),
            ChannelError::Url { .. } | ChannelError::Key(_) => Self::invalid(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_urls_are_https_or_loopback_http() {
        assert_eq!(
            channel_url("https://releases.example/stable")
                .expect("https")
                .as_str(),
            "https://releases.example/stable/"
        );
        channel_url("http://127.0.0.1:8080/").expect("loopback");
        channel_url("http://[::1]/ch/").expect("loopback v6");
        channel_url("http://localhost/").expect("localhost");
        for (bad, why) in [
            ("http://releases.example/", "loopback addresses only"),
            ("ftp://127.0.0.1/", "must be https"),
            ("https://u:p@releases.example/", "credentials"),
            ("https://releases.example/?x=1", "query"),
            ("releases", "relative URL"),
        ] {
            let e = channel_url(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn extra_keys_need_a_root_owned_config() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("bangerd.toml");
        std::fs::write(&file, "").expect("write");
        let key = "RWSoWe9kXFMXtvu5gv1Aw+RFeWBhbsKPY8V8eLnjK1IJaW4QZ5jTKG44".to_owned();
        assert_eq!(trusted_keys(&[], &file).expect("built-in").len(), 1);
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod");
        let e = trusted_keys(std::slice::from_ref(&key), &file).expect_err("writable");
        assert!(e.to_string().contains("owned by root"), "{e}");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(trusted_keys(&[key], &file).expect("root-owned").len(), 2);
        }
    }
}
