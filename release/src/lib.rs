//! Where `banger update` installs releases, and how the packaged binaries
//! hand over to them.
//!
//! The Debian package owns `/usr/bin/banger` and `/usr/libexec/banger/*`;
//! an update never writes there (dpkg would not know, and bangerd's unit
//! keeps `/usr` read-only). Releases go to their own root instead:
//!
//! ```text
//! /var/lib/banger-releases/
//!     0.2.0/{banger,bangerd,banger-agent}
//!     0.1.5/{banger,bangerd,banger-agent}
//!     current  -> 0.2.0      (the set in use)
//!     previous -> 0.1.5      (what `banger update --rollback` restores)
//! ```
//!
//! Swapping a set is one `rename(2)` of the `current` symlink, so a reader
//! sees the old set or the new one, never a mix. Each packaged binary calls
//! [`exec_newest`] first thing: when `current` holds a newer version than
//! its own, and every path to it is owned by root and writable by nobody
//! else, it becomes that binary. An `apt upgrade` past the installed
//! release therefore wins again without anyone cleaning up, and a missing
//! `current` means the packaged set.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use semver::Version;

pub mod signed;

/// The binaries a release carries.
pub const BINARIES: [&str; 3] = ["banger", "bangerd", "banger-agent"];

/// The running build's version ([`VERSION`]; 0.0.0 if it does not parse).
pub fn running_version() -> Version {
    Version::parse(VERSION).unwrap_or_else(|_| Version::new(0, 0, 0))
}

/// The version these binaries were built as: `BANGER_VERSION` at build
/// time when set (`scripts/publish-release --version`, the update tests'
/// second release), else the workspace's version.
pub const VERSION: &str = match option_env!("BANGER_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// The releases root of a packaged install.
pub const DEFAULT_ROOT: &str = "/var/lib/banger-releases";

/// Overrides [`DEFAULT_ROOT`] (tests, and installs outside the package).
pub const ROOT_ENV: &str = "BANGER_RELEASES_DIR";

/// Set in a release's environment by [`exec_newest`]: the version that
/// handed over. Stops a second hand-over.
pub const LAUNCHED_ENV: &str = "BANGER_LAUNCHED_BY";

const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const STAGING_PREFIX: &str = ".staging-";

/// What can go wrong with the releases root.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path operated on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A link names something that is not a version.
    #[error("{}: {target:?} is not a release version", path.display())]
    BadLink {
        /// The link.
        path: PathBuf,
        /// Where it points.
        target: OsString,
    },
    /// Someone other than root could change what would be run.
    #[error("{}: {why}", path.display())]
    Untrusted {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A release directory lacks one of [`BINARIES`].
    #[error("{}: release {version} has no {binary}", root.display())]
    Incomplete {
        /// The releases root.
        root: PathBuf,
        /// The release.
        version: Version,
        /// The missing binary.
        binary: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One releases root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Releases {
    root: PathBuf,
}

impl Releases {
    /// The releases under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$BANGER_RELEASES_DIR`, or [`DEFAULT_ROOT`].
    pub fn system() -> Self {
        Self::new(
            std::env::var_os(ROOT_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from),
        )
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of release `version`.
    pub fn dir(&self, version: &Version) -> PathBuf {
        self.root.join(version.to_string())
    }

    /// Binary `name` of release `version`.
    pub fn binary(&self, version: &Version, name: &str) -> PathBuf {
        self.dir(version).join(name)
    }

    /// Where release `version` is assembled before [`Releases::commit`]
    /// (same filesystem, so the move is a rename).
    pub fn staging(&self, version: &Version) -> PathBuf {
        self.root.join(format!("{STAGING_PREFIX}{version}"))
    }

    /// The release in use, if an update installed one.
    pub fn current(&self) -> Result<Option<Version>, ReleaseError> {
        self.link(CURRENT)
    }

    /// The release `--rollback` restores; `None` with a current release
    /// means the packaged set.
    pub fn previous(&self) -> Result<Option<Version>, ReleaseError> {
        self.link(PREVIOUS)
    }

    fn link(&self, name: &str) -> Result<Option<Version>, ReleaseError> {
        let path = self.root.join(name);
        let target = match std::fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let bad = || ReleaseError::BadLink {
            path: path.clone(),
            target: target.clone().into_os_string(),
        };
        let name = target.to_str().ok_or_else(bad)?;
        if name.contains('/') {
            return Err(bad());
        }
        Version::parse(name).map(Some).map_err(|_| bad())
    }

    /// Create the root (mode 0755: users run the CLI from it).
    pub fn create(&self) -> Result<(), ReleaseError> {
        use std::os::unix::fs::DirBuilderExt;
        use std::os::unix::fs::PermissionsExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io_err(&self.root))?;
        // Whatever the daemon's umask (0077 in its unit): users run the
        // releases' binaries.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(&self.root))
    }

    /// Move the staged release `version` into place, replacing a directory
    /// of the same version that is neither current nor previous (a release
    /// rolled back from). Does not make it current.
    pub fn commit(&self, version: &Version) -> Result<PathBuf, ReleaseError> {
        let staged = self.staging(version);
        for binary in BINARIES {
            if !staged.join(binary).is_file() {
                return Err(ReleaseError::Incomplete {
                    root: self.root.clone(),
                    version: version.clone(),
                    binary,
                });
            }
        }
        let dir = self.dir(version);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&staged, &dir).map_err(io_err(&dir))?;
        sync_dir(&self.root)?;
        Ok(dir)
    }

    /// Make `version` current; the release current so far becomes
    /// previous (or, when there was none, previous goes: rollback then
    /// means the packaged set).
    pub fn activate(&self, version: &Version) -> Result<(), ReleaseError> {
        let old = self.current()?;
        self.set_link(PREVIOUS, old.as_ref())?;
        self.set_link(CURRENT, Some(version))?;
        sync_dir(&self.root)
    }

    /// Undo the last activation: previous becomes current again (no
    /// current at all when previous is the packaged set). Returns the
    /// release now current, `None` for the packaged set.
    pub fn rollback(&self) -> Result<Option<Version>, ReleaseError> {
        let previous = self.previous()?;
        self.set_link(CURRENT, previous.as_ref())?;
        self.set_link(PREVIOUS, None)?;
        sync_dir(&self.root)?;
        Ok(previous)
    }

    /// Point `name` at `version` (or remove it), atomically.
    fn set_link(&self, name: &str, version: Option<&Version>) -> Result<(), ReleaseError> {
        let path = self.root.join(name);
        let Some(version) = version else {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
                _ => Ok(()),
            };
        };
        let tmp = self.root.join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version.to_string(), &tmp).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Remove staging leftovers and every release that is neither current
    /// nor previous. Returns what went.
    pub fn prune(&self) -> Result<Vec<PathBuf>, ReleaseError> {
        let keep: Vec<String> = [self.current()?, self.previous()?]
            .into_iter()
            .flatten()
            .map(|v| v.to_string())
            .collect();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let stale = name.starts_with(STAGING_PREFIX)
                || (Version::parse(name).is_ok() && !keep.iter().any(|k| k == name));
            if is_dir && stale {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Binary `name` of the current release when that release is newer
    /// than `own` and safe to run.
    pub fn newer_binary(&self, name: &str, own: &Version) -> Result<Option<PathBuf>, ReleaseError> {
        let Some(current) = self.current()? else {
            return Ok(None);
        };
        if current <= *own {
            return Ok(None);
        }
        let path = self.binary(&current, name);
        trusted(&path)?;
        Ok(Some(path))
    }
}

fn sync_dir(dir: &Path) -> Result<(), ReleaseError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Check that only root could have put `file` there: it is a regular file
/// owned by root and writable by no one else, and so is every directory
/// above it (a root-owned sticky directory such as `/tmp` is allowed).
pub fn trusted(file: &Path) -> Result<(), ReleaseError> {
    let untrusted = |path: &Path, why: &str| ReleaseError::Untrusted {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let meta = std::fs::symlink_metadata(file).map_err(io_err(file))?;
    if !meta.file_type().is_file() {
        return Err(untrusted(file, "not a regular file"));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            file,
            "must be owned by root and writable by no one else",
        ));
    }
    let mut dir = file.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        let meta = std::fs::metadata(d).map_err(io_err(d))?;
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.uid() != 0 || (meta.mode() & 0o022 != 0 && !sticky) {
            return Err(untrusted(
                d,
                "a directory above a release must be owned by root and writable by no one else",
            ));
        }
        dir = d.parent();
    }
    Ok(())
}

/// Become the current release's `name` when it is newer than `own_version`.
///
/// Call first thing in `main`, before any thread exists. Returns when
/// there is nothing newer, when this process was itself handed over to, or
/// when the hand-over fails (with a warning on stderr: the packaged binary
/// still works).
pub fn exec_newest(name: &str, own_version: &str) {
    use std::os::unix::process::CommandExt;

    if std::env::var_os(LAUNCHED_ENV).is_some() {
        return;
    }
    let Ok(own) = Version::parse(own_version) else {
        return;
    };
    let path = match Releases::system().newer_binary(name, &own) {
        Ok(Some(path)) => path,
        Ok(None) => return,
        Err(e) => {
            eprintln!("{name}: not running the updated release: {e}");
            return;
        }
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| name.into());
    let e = std::process::Command::new(&path)
        .arg0(arg0)
        .args(args)
        .env(LAUNCHED_ENV, own_version)
        .exec();
    eprintln!("{name}: could not run {}: {e}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    fn stage(releases: &Releases, version: &str) {
        let dir = releases.staging(&v(version));
        std::fs::create_dir_all(&dir).expect("staging");
        for b in BINARIES {
            std::fs::write(dir.join(b), format!("{b} {version}")).expect("write");
        }
        releases.commit(&v(version)).expect("commit");
    }

    fn read(releases: &Releases, version: &Version, name: &str) -> String {
        std::fs::read_to_string(releases.binary(version, name)).expect("read")
    }

    #[test]
    fn the_build_version_is_semver() {
        assert!(Version::parse(VERSION).is_ok(), "{VERSION}");
    }

    #[test]
    fn activate_keeps_the_previous_set_and_rollback_restores_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let releases = Releases::new(tmp.path().join("releases"));
        releases.create().expect("create");
        assert_eq!(releases.current().expect("current"), None);

        stage(&releases, "0.2.0");
        releases.activate(&v("0.2.0")).expect("activate");
        assert_eq!(releases.current().expect("current"), Some(v("0.2.0")));
        assert_eq!(releases.previous().expect("previous"), None);

        stage(&releases, "0.3.0");
        releases.activate(&v("0.3.0")).expect("activate");
        assert_eq!(releases.current().expect("current"), Some(v("0.3.0")));
        assert_eq!(releases.previous().expect("previous"), Some(v("0.2.0")));
        assert_eq!(read(&releases, &v("0.3.0"), "bangerd"), "bangerd 0.3.0");

        assert_eq!(releases.rollback().expect("rollback"), Some(v("0.2.0")));
        assert_eq!(releases.current().expect("current"), Some(v("0.2.0")));
        assert_eq!(releases.previous().expect("previous"), None);
        // A second rollback goes back to the packaged set.
        assert_eq!(releases.rollback().expect("rollback"), None);
        assert_eq!(releases.current().expect("current"), None);
    }

    #[test]
    fn prune_keeps_current_and_previous_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let releases = Releases::new(tmp.path());
        for version in ["0.2.0", "0.3.0", "0.4.0"] {
            stage(&releases, version);
            releases.activate(&v(version)).expect("activate");
        }
        std::fs::create_dir(releases.staging(&v("0.5.0"))).expect("stale staging");
        let removed = releases.prune().expect("prune");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!releases.dir(&v("0.2.0")).exists());
        assert!(releases.dir(&v("0.3.0")).exists());
        assert!(releases.dir(&v("0.4.0")).exists());
        assert!(!releases.staging(&v("0.5.0")).exists());
    }

    #[test]
    fn commit_refuses_an_incomplete_release_and_replaces_a_stale_one() {
        let tmp = tempfile::tempdir().expect("tmp");
        let releases = Releases::new(tmp.path());
        let staged = releases.staging(&v("0.2.0"));
        std::fs::create_dir_all(&staged).expect("staging");
        std::fs::write(staged.join("banger"), "x").expect("write");
        let e = releases.commit(&v("0.2.0")).expect_err("incomplete");
        assert!(e.to_string().contains("has no bangerd"), "{e}");

        stage(&releases, "0.2.0");
        std::fs::write(releases.binary(&v("0.2.0"), "bangerd"), "old").expect("write");
        stage(&releases, "0.2.0");
        assert_eq!(read(&releases, &v("0.2.0"), "bangerd"), "bangerd 0.2.0");
    }

    #[test]
    fn a_link_to_something_else_is_an_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let releases = Releases::new(tmp.path());
        std::os::unix::fs::symlink("/usr/bin", tmp.path().join("current")).expect("link");
        let e = releases.current().expect_err("bad link");
        assert!(matches!(e, ReleaseError::BadLink { .. }), "{e}");
    }

    #[test]
    fn newer_binary_only_for_a_newer_trusted_release() {
        let tmp = tempfile::tempdir().expect("tmp");
        let releases = Releases::new(tmp.path().join("r"));
        releases.create().expect("create");
        stage(&releases, "0.2.0");
        releases.activate(&v("0.2.0")).expect("activate");
        let path = releases.binary(&v("0.2.0"), "bangerd");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");

        let uid = nix_uid();
        let found = releases.newer_binary("bangerd", &v("0.1.0"));
        if uid == 0 {
            assert_eq!(found.expect("newer"), Some(path.clone()));
        } else {
            assert!(matches!(found, Err(ReleaseError::Untrusted { .. })));
        }
        assert_eq!(
            releases.newer_binary("bangerd", &v("0.2.0")).expect("same"),
            None
        );
        assert_eq!(
            releases
                .newer_binary("bangerd", &v("0.3.0"))
                .expect("older"),
            None
        );

        if uid == 0 {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .expect("chmod");
            let e = releases
                .newer_binary("bangerd", &v("0.1.0"))
                .expect_err("world-writable");
            assert!(e.to_string().contains("writable by no one else"), "{e}");
        }
    }

    fn nix_uid() -> u32 {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(u32::MAX)
    }
}
