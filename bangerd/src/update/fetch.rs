//! Downloads from a release channel: HTTPS (or HTTP to loopback), bounded
//! sizes, a stall timeout, and artifacts checked while they stream.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::UpdateError;
pub use crate::channel::{channel_url, is_loopback};

/// How many times a dropped download is resumed before it counts as
/// truncated.
pub const RESUMES: u32 = 3;

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
            .user_agent(format!("bangerd/{}", banger_release::VERSION))
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

    /// Header `name` of the answer to a GET of `url`, whatever its status
    /// (a registry's 401 challenge, say); the body is not read.
    pub async fn header(
        &self,
        url: &Url,
        name: reqwest::header::HeaderName,
    ) -> Result<Option<String>, UpdateError> {
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.describe(url, &e))?;
        Ok(response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned))
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
    /// bytes arrive and that they hash to `sha256`. A connection that
    /// drops early is resumed from where it stopped (an HTTP range
    /// request; from the start when the server ignores ranges), up to
    /// [`RESUMES`] times; a stall is an error at once. `progress` sees the
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
        let too_large = |got| UpdateError::TooLarge {
            name: name.to_owned(),
            expected: size,
            got,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(to)
            .await
            .map_err(io)?;
        // The mode whatever bangerd's umask (0077 in its unit).
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .await
            .map_err(io)?;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut resumes = 0;
        loop {
            let response = self.get_from(url, got).await?;
            if got > 0 && response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                // The server ignored the range: start over.
                tracing::debug!("{url} ignored the range request; downloading it again");
                file.set_len(0).await.map_err(io)?;
                file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
                hasher = Sha256::new();
                got = 0;
            } else if got > 0 && !content_range_starts_at(&response, got) {
                return Err(UpdateError::Fetch {
                    url: url.to_string(),
                    why: format!(
                        "the server answered a request for bytes {got}- with another range"
                    ),
                });
            }
            if let Some(len) = response.content_length().filter(|l| got + *l > size) {
                return Err(too_large(got + len));
            }
            let mut dropped = false;
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) if !e.is_timeout() && got < size => {
                        tracing::debug!("download of {url} dropped at {got} bytes: {e}");
                        dropped = true;
                        break;
                    }
                    Err(e) => return Err(self.describe(url, &e)),
                };
                got += chunk.len() as u64;
                if got > size {
                    return Err(too_large(got));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io)?;
                progress(got);
            }
            // A body that ends early without an error is a drop too.
            dropped |= got < size;
            if !dropped || resumes == RESUMES {
                break;
            }
            resumes += 1;
            tracing::info!("resuming {url} at {got} of {size} bytes (attempt {resumes})");
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

    /// GET `url`, from byte `from` on when it is not 0.
    async fn get_from(&self, url: &Url, from: u64) -> Result<reqwest::Response, UpdateError> {
        if from == 0 {
            return self.get(url).await;
        }
        let response = self
            .client
            .get(url.clone())
            .header(reqwest::header::RANGE, format!("bytes={from}-"))
            .send()
            .await
            .map_err(|e| self.describe(url, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(UpdateError::Fetch {
                url: url.to_string(),
                why: format!("the server answered {status} when resuming"),
            });
        }
        Ok(response)
    }
}

/// Whether a 206 answer's `Content-Range` starts at byte `from`.
fn content_range_starts_at(response: &reqwest::Response, from: u64) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split_once('-'))
        .and_then(|(start, _)| start.parse::<u64>().ok())
        == Some(from)
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

    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// How the test server answers its `n`th request (from 0).
    #[derive(Clone, Copy)]
    enum Serve {
        /// The first answer stops halfway; then ranges are honoured.
        DropOnceRanged,
        /// The first answer stops halfway; ranges are ignored.
        DropOnceWhole,
        /// Every answer stops halfway.
        AlwaysDrop,
        /// Headers and a few bytes, then nothing.
        Stall,
        /// The first answer stops halfway; the resume names byte 0.
        WrongRange,
    }

    /// Serves `body` on loopback as `how` says; returns the URL and the
    /// `Range` header of each request ("" when absent).
    fn serve(body: Vec<u8>, how: Serve) -> (Url, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = Url::parse(&format!(
            "http://{}/a",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().flatten().enumerate() {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut range = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').to_owned();
                    }
                }
                seen.lock().expect("lock").push(range.clone());
                let mut out = stream;
                let half = body.len() / 2;
                let from: usize = range.parse().unwrap_or(0);
                let (head, sent) = match (how, n) {
                    (Serve::Stall, _) => {
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        let _ = out.write_all(head.as_bytes());
                        let _ = out.write_all(&body[..10]);
                        std::thread::sleep(Duration::from_secs(5));
                        continue;
                    }
                    (Serve::DropOnceRanged, n) if n > 0 && !range.is_empty() => (
                        format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {from}-{}/{}\r\n\r\n",
                            body.len() - from,
                            body.len() - 1,
                            body.len()
                        ),
                        &body[from..],
                    ),
                    (Serve::WrongRange, n) if n > 0 => (
                        format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes 0-{}/{}\r\n\r\n",
                            body.len(),
                            body.len() - 1,
                            body.len()
                        ),
                        &body[..],
                    ),
                    (Serve::DropOnceWhole, n) if n > 0 => (
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()),
                        &body[..],
                    ),
                    _ => (
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()),
                        &body[..half],
                    ),
                };
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(sent);
            }
        });
        (url, ranges)
    }

    /// Fetch `how`'s answer into a temp dir: the result, the file's bytes
    /// and the ranges asked for.
    async fn fetch(how: Serve) -> (Result<(), UpdateError>, Vec<u8>, Vec<u8>, Vec<String>) {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sha = hex(&Sha256::digest(&body));
        let (url, ranges) = serve(body.clone(), how);
        let dir = tempfile::tempdir().expect("tmp");
        let to = dir.path().join("a");
        let fetcher = Fetcher::new(Duration::from_secs(1)).expect("fetcher");
        let result = fetcher
            .artifact("a", &url, &to, body.len() as u64, &sha, |_| {})
            .await;
        let got = std::fs::read(&to).unwrap_or_default();
        let ranges = ranges.lock().expect("lock").clone();
        (result, got, body, ranges)
    }

    #[tokio::test]
    async fn a_dropped_download_resumes_where_it_stopped() {
        let (result, got, body, ranges) = fetch(Serve::DropOnceRanged).await;
        result.expect("resumed");
        assert_eq!(got, body);
        assert_eq!(ranges, ["".to_owned(), (body.len() / 2).to_string()]);
    }

    #[tokio::test]
    async fn a_server_without_ranges_is_read_again_from_the_start() {
        let (result, got, body, ranges) = fetch(Serve::DropOnceWhole).await;
        result.expect("restarted");
        assert_eq!(got, body);
        assert_eq!(ranges.len(), 2);
    }

    #[tokio::test]
    async fn a_download_that_keeps_dropping_is_truncated() {
        let (result, _, _, ranges) = fetch(Serve::AlwaysDrop).await;
        let e = result.expect_err("truncated");
        assert!(e.to_string().contains("the download stopped after"), "{e}");
        assert_eq!(ranges.len(), 1 + RESUMES as usize);
    }

    #[tokio::test]
    async fn a_stall_is_not_resumed() {
        let (result, _, _, ranges) = fetch(Serve::Stall).await;
        let e = result.expect_err("stalled");
        assert!(matches!(e, UpdateError::Stalled { .. }), "{e}");
        assert_eq!(ranges.len(), 1);
    }

    #[tokio::test]
    async fn a_resume_answered_with_another_range_is_refused() {
        let (result, _, _, _) = fetch(Serve::WrongRange).await;
        let e = result.expect_err("wrong range");
        assert!(e.to_string().contains("another range"), "{e}");
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
