//! banger's kernel and image catalogs: what `banger kernel pull` and
//! `banger image pull` can fetch by name.
//!
//! Each catalog is a JSON document (`kernels.json`, `images.json`, shape
//! in `schema.json`) with a minisign signature whose trusted comment reads
//! `catalog:<kind> serial:<n>`: the signature covers the kind and serial,
//! so a kernels catalog cannot pass as an images catalog and an old one
//! cannot pass as new. The catalogs in this directory are compiled into
//! the binaries ([`embedded`]) and verified at load like any other; an
//! updated catalog from the release channel replaces the embedded one only
//! when its signature verifies and its serial is higher ([`newest`]).

use std::collections::BTreeSet;
use std::fmt;

use banger_release::Version;
use banger_release::signed::{self, PublicKey};
use serde::{Deserialize, Serialize};

/// The catalog format this build reads.
pub const SCHEMA: u32 = 1;

/// Largest catalog document accepted.
pub const MAX_BYTES: usize = 1 << 20;

/// Largest bundle an entry may promise (a guard against nonsense).
pub const MAX_BUNDLE_BYTES: u64 = 64 << 30;

/// Architectures an entry may name.
pub const ARCHES: [&str; 2] = ["x86_64", "aarch64"];

/// Which catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Kernels (`kernels.json`).
    Kernels,
    /// Images (`images.json`).
    Images,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Self; 2] = [Self::Kernels, Self::Images];

    /// `kernels` or `images`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernels => "kernels",
            Self::Images => "images",
        }
    }

    /// The document's file name, e.g. `kernels.json` (its signature adds
    /// `.minisig`).
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Kernels => "kernels.json",
            Self::Images => "images.json",
        }
    }

    /// What one entry is, for messages.
    fn noun(self) -> &'static str {
        match self {
            Self::Kernels => "kernel",
            Self::Images => "image",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One catalog document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Format version ([`SCHEMA`]).
    pub schema: u32,
    /// Which catalog this is.
    pub kind: Kind,
    /// Increases with every published change.
    pub serial: u64,
    /// What can be pulled.
    pub entries: Vec<Entry>,
}

/// One pullable kernel or image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Name to pull it by, a DNS label; unique in its catalog.
    pub name: String,
    /// Its own version (e.g. the kernel release, the image build date).
    pub version: String,
    /// Machine architecture: one of [`ARCHES`].
    pub arch: String,
    /// One line for listings.
    pub description: String,
    /// The bundle (`tar` + `zstd`): https, or http to loopback.
    pub url: String,
    /// The bundle's exact size in bytes.
    pub size: u64,
    /// The bundle's lowercase hex SHA-256.
    pub sha256: String,
    /// Images only: the name of the kernel-catalog entry it boots with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The oldest banger that can use it (semver).
    pub min_banger: String,
}

impl Entry {
    /// Whether banger `version` is new enough for this entry.
    pub fn usable_by(&self, version: &Version) -> bool {
        Version::parse(&self.min_banger).is_ok_and(|min| *version >= min)
    }
}

impl Catalog {
    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Why a catalog was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// No trusted key verifies its signature.
    #[error(
        "the {kind} catalog's signature does not verify with banger's release keys ({why}); it was not published by banger or it was altered"
    )]
    Signature {
        /// Which catalog.
        kind: Kind,
        /// What the verifier said.
        why: String,
    },
    /// The signature vouches for another kind or serial.
    #[error(
        "the {kind} catalog's signature vouches for {signed:?} but the document says \"catalog:{kind} serial:{serial}\"; refusing a catalog passed off as another"
    )]
    Mismatch {
        /// Which catalog.
        kind: Kind,
        /// The trusted comment.
        signed: String,
        /// The document's serial.
        serial: u64,
    },
    /// The document is malformed.
    #[error("the {kind} catalog is invalid: {why}")]
    Invalid {
        /// Which catalog.
        kind: Kind,
        /// What is wrong.
        why: String,
    },
}

/// The catalog of `kind` built into this binary, as (document, signature).
pub fn embedded(kind: Kind) -> (&'static [u8], &'static str) {
    match kind {
        Kind::Kernels => (
            include_bytes!("../kernels.json"),
            include_str!("../kernels.json.minisig"),
        ),
        Kind::Images => (
            include_bytes!("../images.json"),
            include_str!("../images.json.minisig"),
        ),
    }
}

/// The trusted comment a catalog's signature must carry.
pub fn trusted_comment(kind: Kind, serial: u64) -> String {
    format!("catalog:{kind} serial:{serial}")
}

/// Check `signature` over `document` against `keys`, then the document:
/// it must be a catalog of `kind` whose serial the signature names.
pub fn verify(
    kind: Kind,
    document: &[u8],
    signature: &str,
    keys: &[PublicKey],
) -> Result<Catalog, CatalogError> {
    let invalid = |why: String| CatalogError::Invalid { kind, why };
    if document.len() > MAX_BYTES {
        return Err(invalid(format!("larger than {MAX_BYTES} bytes")));
    }
    let comment =
        signed::verify(document, signature, keys).map_err(|e| CatalogError::Signature {
            kind,
            why: e.to_string(),
        })?;
    let catalog: Catalog =
        serde_json::from_slice(document).map_err(|e| invalid(format!("not a catalog: {e}")))?;
    let signed_kind = signed::trusted_field(&comment, "catalog");
    let signed_serial = signed::trusted_field(&comment, "serial");
    if catalog.kind != kind
        || signed_kind != Some(kind.as_str())
        || signed_serial != Some(catalog.serial.to_string().as_str())
    {
        return Err(CatalogError::Mismatch {
            kind,
            signed: comment,
            serial: catalog.serial,
        });
    }
    validate(&catalog).map_err(invalid)?;
    Ok(catalog)
}

/// Of two verified catalogs of one kind, the one with the higher serial
/// (the first on a tie).
pub fn newest(a: Catalog, b: Option<Catalog>) -> Catalog {
    match b {
        Some(b) if b.serial > a.serial => b,
        _ => a,
    }
}

fn validate(catalog: &Catalog) -> Result<(), String> {
    if catalog.schema != SCHEMA {
        return Err(format!(
            "schema {} is not {SCHEMA}; a newer banger reads it",
            catalog.schema
        ));
    }
    let noun = catalog.kind.noun();
    let mut names = BTreeSet::new();
    for e in &catalog.entries {
        let name = &e.name;
        if !dns_label(name) {
            return Err(format!(
                "{noun} name {name:?} is not a DNS label bangerd accepts (1-63 of a-z, 0-9, inner -, not hex digits only)"
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("{noun} {name:?} is listed twice"));
        }
        let field = |what: &str| format!("{noun} {name:?}: {what}");
        if e.version.is_empty() || e.version.len() > 64 || e.version.contains(char::is_whitespace) {
            return Err(field("version must be 1-64 characters without spaces"));
        }
        if !ARCHES.contains(&e.arch.as_str()) {
            return Err(field(&format!(
                "arch {:?} is not one of {}",
                e.arch,
                ARCHES.join(", ")
            )));
        }
        if e.description.contains('\n') || e.description.len() > 200 {
            return Err(field("description must be one line of at most 200 bytes"));
        }
        if !bundle_url(&e.url) {
            return Err(field(&format!(
                "url {:?} must be https (or http to 127.0.0.1, [::1] or localhost)",
                e.url
            )));
        }
        if e.size == 0 || e.size > MAX_BUNDLE_BYTES {
            return Err(field(&format!(
                "size {} is not in 1..={MAX_BUNDLE_BYTES}",
                e.size
            )));
        }
        if e.sha256.len() != 64
            || !e
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(field("sha256 must be 64 lowercase hex digits"));
        }
        if Version::parse(&e.min_banger).is_err() {
            return Err(field(&format!(
                "min_banger {:?} is not a semantic version",
                e.min_banger
            )));
        }
        match (catalog.kind, &e.kernel) {
            (Kind::Images, Some(k)) if dns_label(k) => {}
            (Kind::Images, _) => {
                return Err(field("kernel must name a kernel-catalog entry"));
            }
            (Kind::Kernels, Some(_)) => return Err(field("a kernel has no kernel field")),
            (Kind::Kernels, None) => {}
        }
    }
    Ok(())
}

/// A DNS label that is not all hex digits (bangerd's rule for names, so
/// no catalog name can pass for an id).
fn dns_label(name: &str) -> bool {
    !name.bytes().all(|b| b.is_ascii_hexdigit())
        && !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// https anywhere, plain http to loopback only (tests, local mirrors); no
/// credentials, query or fragment.
fn bundle_url(text: &str) -> bool {
    let Ok(url) = url::Url::parse(text) else {
        return false;
    };
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return false;
    }
    match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Domain(d))) => d == "localhost",
        _ => false,
    }
}

#[cfg(test)]
mod tests;
