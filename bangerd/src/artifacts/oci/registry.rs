//! Fetching an image from an OCI registry (oci-client): the manifest for
//! linux/amd64 (chosen from an index when the reference names one), then
//! every layer blob into a directory, each checked against its size and
//! digest. Anonymous access, and the bearer tokens registries hand out to
//! anonymous pulls; plain HTTP only to a loopback registry.

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
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn pull_failed(reference: &Reference, e: &oci_client::errors::OciDistributionError) -> Error {
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
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => Error::denied(format!(
            "{reference}: the registry refused an anonymous pull ({why})"
        )),
        _ => Error::unavailable(format!("{reference}: cannot pull from the registry: {why}")),
    }
}

/// Fetch `reference`'s linux/amd64 manifest and its layers into `dir`.
/// `progress` sees (bytes so far, total bytes) after each layer.
pub async fn fetch(
    reference: &Reference,
    dir: &Path,
    stall: Duration,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched> {
    // reqwest is built without a default TLS provider; ring is ours.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = reference.resolve_registry().to_owned();
    let protocol = if loopback(&registry) {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        read_timeout: Some(stall),
        connect_timeout: Some(stall),
        ..ClientConfig::default()
    });
    let auth = RegistryAuth::Anonymous;
    let (manifest, digest) = client
        .pull_image_manifest(reference, &auth)
        .await
        .map_err(|e| pull_failed(reference, &e))?;
    let total: u64 = manifest
        .layers
        .iter()
        .map(|l| u64::try_from(l.size).unwrap_or(0))
        .sum();
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
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", path.display())))?;
        client
            .pull_blob(reference, layer, file)
            .await
            .map_err(|e| pull_failed(reference, &e))?;
        check_blob(
            &path,
            &layer.digest,
            u64::try_from(layer.size).unwrap_or(u64::MAX),
        )
        .await
        .map_err(|why| Error::failed(format!("{reference}: layer {}: {why}", i + 1)))?;
        done += u64::try_from(layer.size).unwrap_or(0);
        progress(done, total);
        layers.push(path);
    }
    Ok(Fetched { digest, layers })
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
}
