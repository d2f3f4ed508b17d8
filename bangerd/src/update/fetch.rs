//! Downloads from a release channel: HTTPS (or HTTP to loopback), bounded
//! sizes, a stall timeout, and artifacts checked while they stream.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::UpdateError;

/// Validate a channel URL: `https://…`, or `http://` to a loopback
/// address (tests, local mirrors). Returns it with a trailing `/`, so
/// relative paths resolve inside it.
pub fn channel_url(text: &str) -> Result<Url, UpdateError> {
    let bad = |why: &str| UpdateError::Channel {
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

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// An HTTP client for one update.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    stall: Duration,
}

impl Fetcher {
    /// A client that gives up on a connection that sends nothing for
    /// `stall`.
    pub fn new(stall: Duration) -> Result<Self, UpdateError> {
        // reqwest is built without a default TLS provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(stall)
            .read_timeout(stall)
            .user_agent(format!("bangerd/{}", crate::core::VERSION))
            .https_only(false)
            .build()
            .map_err(|e| UpdateError::Http(chain(&e)))?;
        Ok(Self { client, stall })
    }

    async fn get(&self, url: &Url) -> Result<reqwest::Response, UpdateError> {
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.describe(url, &e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(UpdateError::Missing {
                url: url.to_string(),
            });
        }
        if !status.is_success() {
            return Err(UpdateError::Fetch {
                url: url.to_string(),
                why: format!("the server answered {status}"),
            });
        }
        Ok(response)
    }

    fn describe(&self, url: &Url, e: &reqwest::Error) -> UpdateError {
        if e.is_timeout() {
            return UpdateError::Stalled {
                url: url.to_string(),
                secs: self.stall.as_secs(),
            };
        }
        UpdateError::Fetch {
            url: url.to_string(),
            why: chain(e),
        }
    }

    /// A small document (manifest, signature), refused past `limit` bytes.
    pub async fn small(&self, url: &Url, limit: usize) -> Result<Vec<u8>, UpdateError> {
        let response = self.get(url).await?;
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.describe(url, &e))?;
            if body.len() + chunk.len() > limit {
                return Err(UpdateError::Fetch {
                    url: url.to_string(),
                    why: format!("larger than {limit} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Download `url` to `to` (mode 0755), checking that exactly `size`
    /// bytes arrive and that they hash to `sha256`. `progress` sees the
    /// bytes so far. On error a partial file stays: `to` belongs in a
    /// staging directory its caller removes.
    pub async fn artifact(
        &self,
        name: &str,
        url: &Url,
        to: &Path,
        size: u64,
        sha256: &str,
        mut progress: impl FnMut(u64),
    ) -> Result<(), UpdateError> {
        let io = |source| UpdateError::Io {
            path: to.to_owned(),
            source,
        };
        let response = self.get(url).await?;
        if let Some(len) = response.content_length().filter(|l| *l > size) {
            return Err(UpdateError::TooLarge {
                name: name.to_owned(),
                expected: size,
                got: len,
            });
        }
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(to)
            .await
            .map_err(io)?;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // A connection closed early is a short body, said plainly.
                Err(e) if !e.is_timeout() && got < size => {
                    tracing::debug!("download of {url} ended early: {e}");
                    break;
                }
                Err(e) => return Err(self.describe(url, &e)),
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(UpdateError::TooLarge {
                    name: name.to_owned(),
                    expected: size,
                    got,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
            progress(got);
        }
        if got != size {
            return Err(UpdateError::Truncated {
                name: name.to_owned(),
                expected: size,
                got,
            });
        }
        let digest = hex(&hasher.finalize());
        if digest != sha256 {
            return Err(UpdateError::Digest {
                name: name.to_owned(),
                expected: sha256.to_owned(),
                got: digest,
            });
        }
        file.sync_all().await.map_err(io)?;
        Ok(())
    }
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
