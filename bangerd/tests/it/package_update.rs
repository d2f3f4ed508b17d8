//! `banger update` of the packaged daemon under a real systemd: the .deb
//! (version A) installed in a Debian tree booted with systemd-nspawn, a
//! VM running, and a release channel on the container's loopback holding
//! version B, built by `scripts/publish-release --version B --debug` and
//! signed with a test key the root-owned config trusts, next to broken
//! variants of it (a tampered artifact, an untrusted key, a manifest
//! version its signature does not vouch for, a downgrade, a replay of A,
//! a truncated and a stalled download). `tests/nspawn/package-update.sh`
//! runs the steps inside; this file builds the channel and judges what the
//! script saw: each broken release refused with its reason and nothing
//! changed, B installed and bangerd restarted by systemd into B while the
//! VM's unit ran on, the packaged CLI handing over to B, and a rollback
//! back to A. Needs root and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_release::Version;
use banger_testbed::{
    Nspawn, artifacts_dir, build_deb, guest_artifact, keypair, nspawn_rootfs, sign_manifest,
    unit_property,
};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Version B, published into `channel` with `key` from its own target
/// directory (cached between runs under `target/update-b`).
fn publish(channel: &Path, key: &Path, version: &Version) {
    let run = Command::new(repo().join("scripts/publish-release"))
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(channel)
        .arg("--target-dir")
        .arg(repo().join("target/update-b"))
        .args(["--debug", "--version", &version.to_string()])
        .output()
        .expect("run scripts/publish-release");
    assert!(
        run.status.success(),
        "scripts/publish-release failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// A variant of the good channel: its manifest with `version` (artifacts
/// in a `version/` directory linked to the good ones), signed by `key` as
/// `signed`.
fn variant(root: &Path, name: &str, good: &Version, version: &str, signed: &str, key: &Path) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    symlink(format!("../good/{good}"), dir.join(version)).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("good/manifest.json")).unwrap()).unwrap();
    manifest["version"] = version.into();
    for artifact in manifest["artifacts"].as_array_mut().unwrap() {
        let name = artifact["name"].as_str().unwrap().to_owned();
        artifact["path"] = format!("{version}/{name}").into();
    }
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    sign_manifest(&path, key, signed);
}

/// The good channel with one artifact's byte flipped (the signed
/// manifest as it is).
fn tampered(root: &Path, good: &Version) {
    let dir = root.join("tampered").join(good.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["manifest.json", "manifest.json.minisig"] {
        std::fs::copy(
            root.join("good").join(file),
            root.join("tampered").join(file),
        )
        .unwrap();
    }
    for binary in ["banger", "bangerd"] {
        symlink(format!("../../good/{good}/{binary}"), dir.join(binary)).unwrap();
    }
    let mut bytes = std::fs::read(root.join(format!("good/{good}/banger-agent"))).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(dir.join("banger-agent"), bytes).unwrap();
}

/// The lines of a fingerprint that name the packaged binaries.
fn packaged(fingerprint: &str) -> Vec<&str> {
    fingerprint
        .lines()
        .filter(|l| l.contains("/usr/"))
        .collect()
}

#[test]
fn the_packaged_daemon_updates_restarts_and_rolls_back_under_systemd() {
    guest_artifact("kernel/vmlinuz", "build-test-kernel");
    guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let a = Version::parse(bangerd::core::VERSION).unwrap();
    let b = Version::new(a.major, a.minor, a.patch + 1);
    let next = Version::new(a.major, a.minor, a.patch + 2);

    let debs = tempfile::tempdir().unwrap();
    let deb = build_deb(debs.path());
    let keys = tempfile::tempdir().unwrap();
    let test = keypair(keys.path(), "test");
    let rogue = keypair(keys.path(), "rogue");
    let web = tempfile::tempdir().unwrap();
    let root = web.path();
    publish(&root.join("good"), &test.secret, &b);
    let (bs, as_) = (b.to_string(), a.to_string());
    tampered(root, &b);
    variant(root, "wrongkey", &b, &bs, &bs, &rogue.secret);
    variant(root, "mismatch", &b, &bs, &next.to_string(), &test.secret);
    variant(root, "downgrade", &b, "0.0.1", "0.0.1", &test.secret);
    variant(root, "replay", &b, &as_, &as_, &test.secret);
    std::fs::copy(&test.public_file, root.join("test.pub")).unwrap();
    std::fs::write(root.join("version-a"), &as_).unwrap();
    std::fs::write(root.join("version-b"), &bs).unwrap();

    let tests = repo().join("bangerd/tests/nspawn");
    let boot = Nspawn::new(
        &nspawn_rootfs(),
        "banger-update",
        "banger-package-update-test.service",
    )
    .bind_ro(&deb, "/opt/pkg/banger.deb")
    .bind_ro(&artifacts_dir(), "/opt/guest")
    .bind_ro(&tests, "/opt/banger-test")
    .bind_ro(root, "/opt/channel")
    .unit_file(&tests.join("banger-package-update-test.service"));
    let out = boot.run();
    let read = |name: &str| boot.read(name);
    boot.assert_passed(&out);

    assert_eq!(read("version-before").trim(), as_);
    let vm_before = read("vm-unit-before");
    assert_eq!(
        unit_property(&vm_before, "ActiveState"),
        Some("active"),
        "{vm_before}"
    );
    let daemon_before = read("daemon-before");
    let pid_before = unit_property(&daemon_before, "MainPID").unwrap().to_owned();

    // Each broken release is refused, says why, and changes nothing:
    // neither the packaged binaries nor the releases root, nor the daemon.
    let before = read("fp-before");
    for (case, why) in [
        ("tampered", "does not match the signed"),
        ("wrongkey", "does not verify with banger's release key"),
        ("mismatch", "the signature vouches for version"),
        ("downgrade", "refusing a downgrade"),
        ("replay", "already"),
        ("truncated", "the download stopped after"),
        ("hang", "the server stalled"),
    ] {
        let said = read(&format!("refused-{case}"));
        eprintln!("{case}: {}", said.trim());
        assert_ne!(
            read(&format!("refused-{case}-rc")).trim(),
            "0",
            "{case}: {said}"
        );
        assert!(said.contains(why), "{case}: {said:?} lacks {why:?}");
        assert_eq!(
            read(&format!("fp-{case}")),
            before,
            "{case} changed something"
        );
    }
    assert_eq!(read("version-refused").trim(), as_);
    assert_eq!(
        unit_property(&read("daemon-refused"), "MainPID"),
        Some(pid_before.as_str())
    );

    // A check names B; the update installs it and systemd restarts
    // bangerd into it, while the VM's unit runs on untouched.
    let check: serde_json::Value = serde_json::from_str(&read("check.json"))
        .unwrap_or_else(|e| panic!("{e}: {}{}", read("check.json"), read("check.err")));
    assert!(
        check["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("available {bs}"))),
        "{check}"
    );
    assert_eq!(read("update-rc").trim(), "0", "{}", read("update"));
    assert!(
        read("update").contains(&format!("updated from {as_} to {bs}; bangerd restarts now")),
        "{}",
        read("update")
    );
    let updated = read("daemon-updated");
    assert_eq!(
        unit_property(&updated, "ActiveState"),
        Some("active"),
        "{updated}"
    );
    assert_ne!(
        unit_property(&updated, "MainPID"),
        Some(pid_before.as_str()),
        "{updated}"
    );
    assert_eq!(read("vm-unit-updated"), vm_before, "the VM's unit changed");
    let vm: serde_json::Value = serde_json::from_str(&read("vm-updated.json")).unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
    let versions: serde_json::Value = serde_json::from_str(&read("version-updated.json")).unwrap();
    assert_eq!(versions["banger"]["version"], bs.as_str(), "{versions}");
    assert_eq!(versions["bangerd"]["version"], bs.as_str(), "{versions}");
    assert_eq!(read("current-updated").trim(), bs);
    let fp = read("fp-updated");
    assert_eq!(packaged(&fp), packaged(&before), "dpkg's files changed");
    for binary in ["banger", "bangerd", "banger-agent"] {
        let published = std::fs::read(root.join(format!("good/{bs}/{binary}"))).unwrap();
        let sha: String = Sha256::digest(&published)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            fp.contains(&format!("{sha}  /var/lib/banger-releases/{bs}/{binary}")),
            "{binary} is not the published one:\n{fp}"
        );
    }

    // Rollback: back to the packaged A, the VM still untouched.
    assert_eq!(read("rollback-rc").trim(), "0", "{}", read("rollback"));
    assert!(
        read("rollback").contains(&format!("rolled back from {bs} to the packaged release")),
        "{}",
        read("rollback")
    );
    eprintln!(
        "update: {}\nrollback: {}",
        read("update").trim(),
        read("rollback").trim()
    );
    let rolled = read("daemon-rolled-back");
    assert_eq!(unit_property(&rolled, "ActiveState"), Some("active"));
    assert_ne!(
        unit_property(&rolled, "MainPID"),
        unit_property(&updated, "MainPID")
    );
    assert_eq!(
        read("vm-unit-rolled-back"),
        vm_before,
        "the VM's unit changed"
    );
    let vm: serde_json::Value = serde_json::from_str(&read("vm-rolled-back.json")).unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
    let versions: serde_json::Value =
        serde_json::from_str(&read("version-rolled-back.json")).unwrap();
    assert_eq!(versions["banger"]["version"], as_.as_str(), "{versions}");
    assert_eq!(versions["bangerd"]["version"], as_.as_str(), "{versions}");
    assert_eq!(packaged(&read("fp-rolled-back")), packaged(&before));
}
