//! The kernel and image catalogs in use: the ones built into this binary,
//! or a newer signed one fetched from the release channel by `banger
//! update` and kept in `$STATE_DIRECTORY/catalog/<kind>.json` (document
//! and signature in one file, replaced atomically, verified again at every
//! load, so a file altered on disk is ignored).

use std::io::Write;
use std::path::{Path, PathBuf};

use banger_catalog::{Catalog, CatalogError, Entry, Kind};
use banger_release::signed::PublicKey;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A fetched catalog as kept on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    document: String,
    signature: String,
}

/// Where the fetched catalog of `kind` is kept.
pub fn kept_path(state: &Path, kind: Kind) -> PathBuf {
    state.join("catalog").join(kind.file_name())
}

/// The catalog of `kind` in use and whether it was fetched (else built
/// in). A kept catalog that no longer verifies is logged and ignored.
pub fn load(state: &Path, kind: Kind, keys: &[PublicKey]) -> Result<(Catalog, bool)> {
    let (document, signature) = banger_catalog::embedded(kind);
    let embedded = banger_catalog::verify(kind, document, signature, keys).map_err(|e| {
        Error::failed(format!(
            "the built-in {kind} catalog does not verify ({e}); this build is broken, reinstall banger"
        ))
    })?;
    let kept = match read_kept(state, kind, keys) {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!("ignoring the fetched {kind} catalog: {e}");
            None
        }
    };
    let fetched = kept.as_ref().is_some_and(|k| k.serial > embedded.serial);
    Ok((banger_catalog::newest(embedded, kept), fetched))
}

fn read_kept(state: &Path, kind: Kind, keys: &[PublicKey]) -> Result<Option<Catalog>> {
    let path = kept_path(state, kind);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::failed(format!("{}: {e}", path.display()))),
    };
    let kept: Kept = serde_json::from_slice(&bytes)
        .map_err(|e| Error::failed(format!("{}: {e}", path.display())))?;
    banger_catalog::verify(kind, kept.document.as_bytes(), &kept.signature, keys)
        .map(Some)
        .map_err(|e| Error::failed(format!("{}: {e}", path.display())))
}

/// What offering a fetched catalog did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// It replaced the catalog in use.
    Taken {
        /// The serial in use before.
        from: u64,
        /// The new serial.
        to: u64,
    },
    /// Its serial is not higher than the one in use; nothing changed.
    NotNewer {
        /// The serial in use.
        serial: u64,
    },
}

/// Keep `document` + `signature` as the catalog of `kind` when they verify
/// and the serial is higher than the one in use.
pub fn offer(
    state: &Path,
    kind: Kind,
    document: &[u8],
    signature: &str,
    keys: &[PublicKey],
) -> std::result::Result<Offered, OfferError> {
    let catalog = banger_catalog::verify(kind, document, signature, keys)?;
    let (current, _) = load(state, kind, keys).map_err(|e| OfferError::Io(e.message))?;
    if catalog.serial <= current.serial {
        return Ok(Offered::NotNewer {
            serial: current.serial,
        });
    }
    let kept = Kept {
        document: String::from_utf8(document.to_vec())
            .map_err(|_| OfferError::Io("the catalog is not UTF-8".into()))?,
        signature: signature.to_owned(),
    };
    let path = kept_path(state, kind);
    write_atomically(&path, &serde_json::to_vec(&kept).unwrap_or_default())
        .map_err(|e| OfferError::Io(format!("{}: {e}", path.display())))?;
    Ok(Offered::Taken {
        from: current.serial,
        to: catalog.serial,
    })
}

/// Why a fetched catalog was not kept.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// It did not verify.
    #[error(transparent)]
    Refused(#[from] CatalogError),
    /// It could not be written.
    #[error("{0}")]
    Io(String),
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A catalog entry and how it relates to this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailableEntry {
    /// The entry.
    pub entry: Entry,
    /// A kernel / image of that name is registered here.
    pub installed: bool,
    /// This banger is new enough for it (`min_banger`).
    pub usable: bool,
}

/// The catalog of one kind, as `banger <kind> list --available` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    /// Which catalog.
    pub kind: Kind,
    /// Its serial.
    pub serial: u64,
    /// Fetched from the release channel (else built in).
    pub fetched: bool,
    /// Its entries.
    pub entries: Vec<AvailableEntry>,
}

/// The catalogs in use, as a service: the keys they are checked with and
/// what each offers. Knows no store: callers say what is installed.
#[derive(Debug)]
pub struct Catalogs {
    /// The configuration in force (extra keys).
    pub config: crate::config::SharedConfig,
    /// The configuration file: extra keys count only when root owns it.
    pub config_file: PathBuf,
    /// The state directory, where fetched catalogs are kept.
    pub state: PathBuf,
}

impl Catalogs {
    /// The keys catalogs and releases are checked with; when the config's
    /// extra keys are not trustworthy, the built-in key alone (logged).
    pub fn keys(&self) -> Vec<PublicKey> {
        let config = self.config.get();
        crate::channel::trusted_keys(&config.update.extra_keys, &self.config_file).unwrap_or_else(
            |e| {
                tracing::warn!("catalogs: only the built-in key is trusted: {e}");
                crate::channel::trusted_keys(&[], &self.config_file).unwrap_or_default()
            },
        )
    }

    /// The catalog of `kind` in use, each entry marked installed when its
    /// name is in `installed`. Open to everyone.
    pub async fn available(&self, kind: Kind, installed: &[String]) -> Result<Available> {
        let keys = self.keys();
        let state = self.state.clone();
        let (catalog, fetched) =
            crate::blocking::blocking(move || load(&state, kind, &keys)).await?;
        let running = banger_release::running_version();
        Ok(Available {
            kind,
            serial: catalog.serial,
            fetched,
            entries: catalog
                .entries
                .into_iter()
                .map(|entry| AvailableEntry {
                    installed: installed.contains(&entry.name),
                    usable: entry.usable_by(&running),
                    entry,
                })
                .collect(),
        })
    }
}

/// Parse a catalog kind as callers spell it.
pub fn kind(text: &str) -> Result<Kind> {
    match text {
        "kernels" | "kernel" => Ok(Kind::Kernels),
        "images" | "image" => Ok(Kind::Images),
        other => Err(Error::invalid(format!(
            "unknown catalog {other:?}: use \"kernels\" or \"images\""
        ))),
    }
}
