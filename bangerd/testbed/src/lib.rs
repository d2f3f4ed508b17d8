//! A test bed that runs the real `bangerd` on a real private system bus,
//! with a real `polkitd` and `systemd-journald`, for integration tests.
//!
//! Everything here must run as **root** (it installs polkit files, creates
//! users and starts system daemons). It is meant for `#[test]` functions and
//! uses plain `std::process`; tests may use tokio themselves. It needs the
//! Debian packages `dbus-daemon`, `polkitd` (polkitd, pkcheck), `systemd`
//! (busctl, journald, journalctl), `util-linux` (setsid, flock) and `passwd`
//! (useradd). `scripts/testbed` starts the same set-up by hand, from the same
//! bus configuration template (`bus.conf.in`).
//!
//! ```no_run
//! use banger_testbed::{Options, TestBed, TestUser, eventually};
//! use std::time::Duration;
//!
//! let bed = TestBed::start(Options::default()).expect("start the test bed");
//! let user = TestUser::create().expect("create a test user");
//! let out = bed.banger_as(&user).arg("list").output().expect("run banger");
//! assert!(out.status.success());
//! // polkit rules are reloaded asynchronously: retry the check.
//! let _rule = bed
//!     .install_polkit_rule(
//!         &format!("10-{}", user.name()),
//!         &format!(
//!             "polkit.addRule(function(action, subject) {{\n\
//!                if (subject.user == \"{}\") return polkit.Result.YES;\n\
//!              }});",
//!             user.name()
//!         ),
//!     )
//!     .expect("install a polkit rule");
//! let ok = eventually(Duration::from_secs(5), || {
//!     let out = bed.banger_as(&user).args(["vm", "start", "x"]).output().ok()?;
//!     out.status.success().then_some(())
//! });
//! assert!(ok.is_some());
//! ```
//!
//! # Teardown
//!
//! Everything is torn down by `Drop`, also when the test panics. Processes
//! the test bed starts also die when the test process is killed outright:
//! `dbus-daemon` and `bangerd` get `PR_SET_PDEATHSIG` = `SIGKILL` (they are
//! forked from one long-lived thread, because the kernel ties that signal to
//! the *thread* that forked); `polkitd` clears that setting when it switches
//! to its own user, so it runs under a small shell wrapper that stops it as
//! soon as its standard input (a pipe from the test process) reaches end of
//! file. Files installed on the host (the polkit action file, a `journald`
//! the test bed started, a group it created) are shared between test beds of
//! every process on the machine through `flock`s under `/run/banger-testbed`
//! and removed by a small watchdog process once the last user is gone, even
//! if that user was killed.

mod bed;
mod fixtures;
mod http;
mod journald;
mod netns;
mod nspawn;
mod polkit;
mod registry;
mod release;
mod shared;
mod spawn;
mod user;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use bed::{BANGER_BUS_POLICY, MANAGER_NAME, Options, POLKIT_NAME, TestBed, bus_config};
pub use bed::{free_loopback_port, kill_strays};
pub use fixtures::{Tool, artifacts_dir, guest_artifact, mkfs_ext4, tiny_vmlinux, tool_packages};
pub use http::{FileServer, Request};
pub use journald::{Journald, daemon_journal, journal_entries};
pub use netns::NetNs;
pub use nspawn::{Nspawn, build_deb, exposure, local_mirror, nspawn_rootfs, unit_property};
pub use polkit::{RuleGuard, install_polkit_rule};
pub use registry::Registry;
pub use release::{
    Keypair, catalog, channel, keypair, sha256_hex, sign, sign_manifest, tree_snapshot,
};
pub use spawn::pid_alive;
pub use user::TestUser;

/// A finished command's stdout and then stderr, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The check called `name` in `banger doctor --json` output; panics,
/// showing the output, when there is none.
pub fn doctor_check(doctor: &serde_json::Value, name: &str) -> serde_json::Value {
    doctor["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} check in {doctor}"))
}

/// Calls `f` until it returns `Some`, every 100 ms, for at most `timeout`
/// (at least once, and once more at the deadline). Returns the first `Some`,
/// or `None` if `f` never gave one.
///
/// For things that settle asynchronously: polkitd reloading a rule file,
/// journald writing an entry, a watchdog removing a file.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

/// Path of the workspace binary `name` (e.g. `"bangerd"`, `"banger"`) in
/// the cargo target directory of the running test.
///
/// A test executable is `target/<profile>/deps/<name>-<hash>` (examples:
/// `target/<profile>/examples/<name>`); binaries are in
/// `target/<profile>/`. The environment variable `BANGER_BIN_DIR` overrides
/// the directory.
///
/// # Panics
///
/// If the binary does not exist: run `cargo build --workspace` first.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("BANGER_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe =
                std::env::current_exe().expect("find the path of the running test executable");
            let mut dir = exe
                .parent()
                .expect("the test executable is in a directory")
                .to_path_buf();
            if dir.ends_with("deps") || dir.ends_with("examples") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace` first",
        path.display()
    );
    path
}
