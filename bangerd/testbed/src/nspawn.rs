//! A Debian tree booted with systemd-nspawn, for tests that need systemd
//! as PID 1 (this host's PID 1 is not systemd).
//!
//! The tree comes from `scripts/build-nspawn-rootfs` (cached). A test
//! names a oneshot unit that runs its steps inside the container, writes
//! what it saw into `/opt/results` (a host temp directory) and powers the
//! container off; the test then judges those files. `--volatile=overlay`
//! keeps the cached tree untouched, `--private-network` keeps the
//! container's bridges, NAT and DNS off the host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The container tree, built (or found in the cache) by its script.
///
/// # Panics
/// When the script fails or prints something that is not a systemd tree.
pub fn nspawn_rootfs() -> PathBuf {
    let out = Command::new(repo().join("scripts/build-nspawn-rootfs"))
        .output()
        .expect("run scripts/build-nspawn-rootfs");
    assert!(
        out.status.success(),
        "scripts/build-nspawn-rootfs failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.join("usr/lib/systemd/systemd").exists() || path.join("lib/systemd/systemd").exists(),
        "{} is not a systemd tree",
        path.display()
    );
    path
}

/// The partial Debian mirror `scripts/build-local-mirror` makes (cached):
/// the signed index and the packages a fresh banger host needs.
///
/// # Panics
/// When the script fails.
pub fn local_mirror() -> PathBuf {
    let out = Command::new(repo().join("scripts/build-local-mirror"))
        .output()
        .expect("run scripts/build-local-mirror");
    assert!(
        out.status.success(),
        "scripts/build-local-mirror failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.join("dists/bookworm/InRelease").is_file(),
        "{} is not a mirror",
        path.display()
    );
    path
}

/// `scripts/build-deb --debug --out DIR`: the .deb of the debug binaries.
///
/// # Panics
/// When the script fails.
pub fn build_deb(out: &Path) -> PathBuf {
    let run = Command::new(repo().join("scripts/build-deb"))
        .args(["--debug", "--out"])
        .arg(out)
        .output()
        .expect("run scripts/build-deb");
    assert!(
        run.status.success(),
        "scripts/build-deb failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&run.stdout).trim())
}

/// One boot of the container.
#[derive(Debug)]
pub struct Nspawn {
    rootfs: PathBuf,
    machine: String,
    binds: Vec<String>,
    unit: String,
    timeout_secs: u64,
    results: tempfile::TempDir,
}

impl Nspawn {
    /// A boot of `rootfs` named `machine` that starts `unit` (a file
    /// under `/etc/systemd/system`, e.g. bound with [`Nspawn::unit_file`]).
    pub fn new(rootfs: &Path, machine: &str, unit: &str) -> Self {
        Self {
            rootfs: rootfs.to_owned(),
            machine: machine.to_owned(),
            binds: vec!["--bind=/dev/net/tun".to_owned()],
            unit: unit.to_owned(),
            timeout_secs: 600,
            results: tempfile::tempdir().expect("results directory"),
        }
    }

    /// Bind `from` read-only at `to`.
    #[must_use]
    pub fn bind_ro(mut self, from: &Path, to: &str) -> Self {
        self.binds
            .push(format!("--bind-ro={}:{to}", from.display()));
        self
    }

    /// Bind `file` as the unit `name` the boot starts.
    #[must_use]
    pub fn unit_file(self, file: &Path) -> Self {
        let to = format!("/etc/systemd/system/{}", self.unit);
        self.bind_ro(file, &to)
    }

    /// Kill the container after this many seconds (default 600).
    #[must_use]
    pub fn timeout_secs(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }

    /// Boot, wait for the power-off, and return nspawn's output.
    /// `/opt/results` inside is [`Nspawn::results`] outside.
    pub fn run(&self) -> Output {
        Command::new("timeout")
            .args([
                "--kill-after=10".to_owned(),
                self.timeout_secs.to_string(),
                "systemd-nspawn".to_owned(),
            ])
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                "--private-network",
            ])
            .arg("--directory")
            .arg(&self.rootfs)
            .arg(format!("--machine={}", self.machine))
            .args(&self.binds)
            .arg(format!(
                "--bind={}:/opt/results",
                self.results.path().display()
            ))
            .args(["--boot", "--", &format!("systemd.wants={}", self.unit)])
            .stdin(Stdio::null())
            .output()
            .expect("run systemd-nspawn")
    }

    /// The results directory (`/opt/results` inside).
    pub fn results(&self) -> &Path {
        self.results.path()
    }

    /// A result file's text, empty when it was not written.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.results.path().join(name)).unwrap_or_default()
    }

    /// Panics unless the in-container script wrote `PASS` to `verdict`,
    /// with its steps and log.
    pub fn assert_passed(&self, out: &Output) {
        let verdict = self.read("verdict");
        assert_eq!(
            verdict.trim(),
            "PASS",
            "the container said {verdict:?} (nspawn {}: {})\nsteps:\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.read("steps"),
            self.read("log")
        );
    }
}

/// The overall exposure `systemd-analyze security UNIT` reports
/// (`→ Overall exposure level for UNIT: 1.5 OK`).
///
/// # Panics
///
/// If the report has no such line.
pub fn exposure(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"))
}

/// `Key=value` lines of `systemctl show`: the value of `key`.
pub fn unit_property<'a>(show: &'a str, key: &str) -> Option<&'a str> {
    show.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}
