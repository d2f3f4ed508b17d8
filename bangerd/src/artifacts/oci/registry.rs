//! Fetching an image from an OCI registry (oci-client): the manifest for
//! linux/amd64 (chosen from an index when the reference names one), then
//! every layer blob into a directory, each checked against its size and
//! digest. Anonymous access (with the bearer tokens registries hand out
//! to anonymous pulls), or a username and password or token that the
//! registry's token service (or its basic auth) takes; plain HTTP only to
//! a loopback registry, and credentials never sent in clear text to
//! anything else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};

/// Layer media types banger can apply.
const LAYER_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// What [`fetch`] brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The manifest's digest.
    pub digest: String,
    /// The layer blobs, bottom first.
    pub layers: Vec<PathBuf>,
}

/// A username and password (or access token) for a registry. Its Debug
/// never shows the password; it is kept only for the one pull.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Check and take a username and password: both non-empty, no
    /// control characters, a username without `:` (HTTP basic auth joins
    /// them with one), at most 256 and 16384 bytes.
    pub fn new(username: String, password: String) -> Result<Self> {
        let bad = |what: &str, why: &str| {
            Err(Error::invalid(format!(
                "the registry {what} {why}; pass the username and password (or token) the registry gave you"
            )))
        };
        if username.is_empty() {
            return bad("username", "is empty");
        }
        if username.len() > 256 {
            return bad("username", "is longer than 256 bytes");
        }
        if username.contains(':') {
            return bad("username", "contains ':'");
        }
        if password.is_empty() {
            return bad("password", "is empty");
        }
        if password.len() > 16 * 1024 {
            return bad("password", "is longer than 16 KiB");
        }
        if username.chars().any(char::is_control) {
            return bad("username", "contains control characters");
        }
        if password.chars().any(char::is_control) {
            return bad(
                "password",
                "contains control characters (a trailing newline from a file?)",
            );
        }
        Ok(Self { username, password })
    }

    /// The username (never the password).
    pub fn username(&self) -> &str {
        &self.username
    }
}

/// Parse `registry/repo[:tag|@digest]`.
pub fn parse_reference(text: &str) -> Result<Reference> {
    text.parse::<Reference>().map_err(|e| {
        Error::invalid(format!(
            "{text:?} is not an OCI reference (registry/repository[:tag|@digest]): {e}"
        ))
    })
}

/// Whether `registry` (`host[:port]`) is a loopback address.
fn loopback(registry: &str) -> bool {
    reqwest::Url::parse(&format!("http://{registry}/"))
        .is_ok_and(|u| crate::channel::is_loopback(&u))
}

/// The `realm` of a `WWW-Authenticate: Bearer realm="…",…` challenge.
fn bearer_realm(header: &str) -> Option<String> {
    let rest = header.trim_start();
    let params = rest
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case("bearer"))
        .map(|_| &rest[6..])?;
    let at = params.find("realm=")?;
    let value = &params[at + "realm=".len()..];
    let value = value.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_owned())
}

/// Before credentials leave the host: ask the registry where its token
/// service is, and refuse one reached over plain HTTP anywhere but
/// loopback (oci-client would send the password there as it is).
async fn check_token_service(registry: &str, scheme: &str, stall: Duration) -> Result<()> {
    let url = reqwest::Url::parse(&format!("{scheme}://{registry}/v2/"))
        .map_err(|e| Error::invalid(format!("{registry} is not a registry address: {e}")))?;
    let challenge = crate::update::Fetcher::new(stall)?
        .header(&url, reqwest::header::WWW_AUTHENTICATE)
        .await?;
    let Some(realm) = challenge.as_deref().and_then(bearer_realm) else {
        return Ok(());
    };
    // A realm that is no URL is no place oci-client can send anything.
    let clear = reqwest::Url::parse(&realm)
        .is_ok_and(|u| u.scheme() == "http" && !crate::channel::is_loopback(&u));
    if clear {
        return Err(Error::denied(format!(
            "{registry} sends clients to the token service {realm} over plain HTTP; \
             banger does not send credentials there unencrypted"
        )));
    }
    Ok(())
}

fn pull_failed(
    reference: &Reference,
    credentials: Option<&Credentials>,
    e: &oci_client::errors::OciDistributionError,
) -> Error {
    use oci_client::errors::OciDistributionError as E;
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    let unknown = match e {
        E::ImageManifestNotFoundError(_) => true,
        E::RegistryError { envelope, .. } => envelope.errors.iter().any(|err| {
            matches!(
                err.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        _ => false,
    };
    if unknown {
        return Error::not_found(format!(
            "{reference}: the registry has no such image ({why})"
        ));
    }
    match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => match credentials {
            None => Error::denied(format!(
                "{reference}: the registry refused an anonymous pull ({why}); \
                 log in with `podman login` or `docker login`, or pass --username and --password-stdin"
            )),
            Some(_) => Error::denied(format!(
                "{reference}: the registry refused the credentials given ({why}); \
                 check the username and password or token, and that it may pull this repository"
            )),
        },
        _ => Error::unavailable(format!("{reference}: cannot pull from the registry: {why}")),
    }
}

/// Fetch `reference`'s linux/amd64 manifest and its layers into `dir`,
/// anonymously or with `credentials`. `progress` sees (bytes so far,
/// total bytes) after each layer. An image whose layers the manifest
/// says are more than `max_bytes` together is refused before a byte of
/// them is fetched, and a registry that sends more bytes for a layer than
/// the manifest says is cut off at that size: a hostile registry cannot
/// fill the disk.
pub async fn fetch(
    reference: &Reference,
    credentials: Option<&Credentials>,
    dir: &Path,
    stall: Duration,
    max_bytes: u64,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched> {
    // reqwest is built without a default TLS provider; ring is ours.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = reference.resolve_registry().to_owned();
    let (protocol, scheme) = if loopback(&registry) {
        (ClientProtocol::HttpsExcept(vec![registry.clone()]), "http")
    } else {
        (ClientProtocol::Https, "https")
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        read_timeout: Some(stall),
        connect_timeout: Some(stall),
        ..ClientConfig::default()
    });
    let auth = match credentials {
        Some(c) => {
            check_token_service(&registry, scheme, stall).await?;
            RegistryAuth::Basic(c.username.clone(), c.password.clone())
        }
        None => RegistryAuth::Anonymous,
    };
    let (manifest, digest) = client
        .pull_image_manifest(reference, &auth)
        .await
        .map_err(|e| pull_failed(reference, credentials, &e))?;
    let mut total = 0u64;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let size = u64::try_from(layer.size).map_err(|_| {
            Error::invalid(format!(
                "{reference}: layer {} has a negative size in the manifest",
                i + 1
            ))
        })?;
        total = total.saturating_add(size);
    }
    if total > max_bytes {
        return Err(Error::limit(format!(
            "{reference}: its layers are {total} bytes, more than the {} GiB an image may have here (limits.image_max_gib)",
            max_bytes >> 30
        )));
    }
    crate::space::check_room(dir, total, "the image's layers")?;
    let mut done = 0u64;
    let mut layers = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(Error::invalid(format!(
                "{reference}: layer {} has media type {}, which banger cannot apply",
                i + 1,
                layer.media_type
            )));
        }
        let path = dir.join(format!("layer-{i}"));
        let size = u64::try_from(layer.size).unwrap_or(0);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", path.display())))?;
        let mut out = Capped::new(file, size);
        let pulled = client.pull_blob(reference, layer, &mut out).await;
        if out.overflowed {
            return Err(Error::failed(format!(
                "{reference}: layer {}: the registry sent more than the {size} bytes the manifest says; refused",
                i + 1
            )));
        }
        pulled.map_err(|e| pull_failed(reference, credentials, &e))?;
        check_blob(&path, &layer.digest, size)
            .await
            .map_err(|why| Error::failed(format!("{reference}: layer {}: {why}", i + 1)))?;
        done += size;
        progress(done, total);
        layers.push(path);
    }
    Ok(Fetched { digest, layers })
}

/// A writer that takes at most `cap` bytes: a write past it fails (and
/// sets `overflowed`), which ends the download.
struct Capped<W> {
    inner: W,
    left: u64,
    overflowed: bool,
}

impl<W> Capped<W> {
    fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            left: cap,
            overflowed: false,
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Capped<W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if buf.len() as u64 > this.left {
            this.overflowed = true;
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "more bytes than the manifest says",
            )));
        }
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &written {
            this.left -= *n as u64;
        }
        written
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether the file at `path` has `size` bytes and hashes to `digest`
/// (`sha256:<hex>`).
async fn check_blob(path: &Path, digest: &str, size: u64) -> std::result::Result<(), String> {
    let Some(want) = digest.strip_prefix("sha256:") else {
        return Err(format!("digest {digest} is not sha256"));
    };
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        hasher.update(&buf[..n]);
    }
    if got != size {
        return Err(format!("{got} bytes, the manifest says {size}"));
    }
    let hex = crate::update::hex(&hasher.finalize());
    if hex != want {
        return Err(format!("sha256 {hex} does not match the digest {digest}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_loopback_is_recognised() {
        let r = parse_reference("127.0.0.1:5000/test/img:v1").expect("parse");
        assert_eq!(r.resolve_registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/img");
        assert_eq!(r.tag(), Some("v1"));
        assert!(loopback("127.0.0.1:5000"));
        assert!(loopback("localhost:5000"));
        assert!(loopback("[::1]:5000"));
        assert!(!loopback("registry.example:5000"));
        assert!(!loopback("10.0.0.1"));
        assert!(parse_reference("not a reference!").is_err());
    }

    #[test]
    fn credentials_are_checked_and_never_shown() {
        let c = Credentials::new("dev".into(), "s3cret-token".into()).expect("fine");
        assert_eq!(c.username(), "dev");
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        for (user, pass, why) in [
            ("", "p", "empty"),
            ("dev", "", "empty"),
            ("a:b", "p", "':'"),
            ("dev", "line\n", "control"),
            ("d\u{7}", "p", "control"),
        ] {
            let e = Credentials::new(user.into(), pass.into()).expect_err(why);
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument, "{e:?}");
            assert!(e.message.contains(why), "{why}: {e:?}");
        }
        assert!(Credentials::new("x".repeat(257), "p".into()).is_err());
        assert!(Credentials::new("dev".into(), "p".repeat(16 * 1024 + 1)).is_err());
    }

    #[test]
    fn the_token_service_is_read_from_the_challenge() {
        assert_eq!(
            bearer_realm(r#"Bearer realm="https://auth.example/token",service="registry""#),
            Some("https://auth.example/token".to_owned())
        );
        assert_eq!(
            bearer_realm(r#"bearer service="r",realm="http://127.0.0.1:9/t""#),
            Some("http://127.0.0.1:9/t".to_owned())
        );
        assert_eq!(bearer_realm(r#"Basic realm="registry""#), None);
        assert_eq!(bearer_realm("Bearer"), None);
    }

    /// A registry whose challenge names a plain-HTTP token service that is
    /// not on loopback is refused before any credentials go out; one on
    /// loopback is fine. A real HTTP server on loopback answers /v2/.
    #[tokio::test]
    async fn credentials_never_go_to_a_clear_text_token_service() {
        async fn serve(challenge: &'static str) -> std::net::SocketAddr {
            use tokio::io::AsyncWriteExt;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                }
            });
            addr
        }
        let stall = Duration::from_secs(5);
        let far = serve(r#"Bearer realm="http://auth.example/token",service="r""#).await;
        let e = check_token_service(&far.to_string(), "http", stall)
            .await
            .expect_err("clear text");
        assert_eq!(e.kind, crate::error::ErrorKind::PermissionDenied, "{e:?}");
        assert!(e.message.contains("unencrypted"), "{e:?}");
        let near = serve(r#"Bearer realm="http://127.0.0.1:1/token",service="r""#).await;
        check_token_service(&near.to_string(), "http", stall)
            .await
            .expect("loopback token service");
        let tls = serve(r#"Bearer realm="https://auth.example/token""#).await;
        check_token_service(&tls.to_string(), "http", stall)
            .await
            .expect("https token service");
    }
}
