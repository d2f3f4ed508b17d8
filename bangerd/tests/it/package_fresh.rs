//! The headline flow on a fresh host: a Debian container with systemd and
//! no network, whose only package source is a local Debian mirror (the
//! archive's signed index and the packages needed, from
//! `scripts/build-local-mirror`), installs the .deb with `apt-get install
//! ./banger.deb` and runs `banger vm run --nat -- cat /etc/os-release`
//! with no kernel, no image and an empty catalog
//! (`tests/nspawn/package-fresh.sh` runs the steps inside). The packaged,
//! hardened bangerd builds the kernel and the debian-bookworm image from
//! the mirror (mmdebstrap without privilege, unpack and configure in
//! their own transient units), boots it and the command prints bookworm,
//! with the stages of both builds shown; at its first boot the VM
//! installs opencode through banger's NAT from a namespace standing in
//! for the internet, and it listens; a second run builds nothing. Needs
//! root, the Debian mirror (to fill the local one), opencode's pinned
//! package and the nspawn tree.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use banger_testbed::{Nspawn, build_deb, doctor_check, local_mirror, nspawn_rootfs, tool_packages};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn a_fresh_host_builds_and_boots_the_default_image_from_a_mirror() {
    let mirror = local_mirror();
    let debs = tempfile::tempdir().unwrap();
    let deb = build_deb(debs.path());
    // The pinned opencode package, served inside the container at the
    // address its tools.list is rewritten to name.
    let tools = tempfile::tempdir().unwrap();
    let opencode = tool_packages()
        .into_iter()
        .find(|t| t.name == "opencode")
        .expect("opencode in the recipe's tools.list");
    std::fs::copy(&opencode.package, tools.path().join("opencode.tgz")).unwrap();
    let tests = repo().join("bangerd/tests/nspawn");
    let boot = Nspawn::new(
        &nspawn_rootfs(),
        "banger-fresh",
        "banger-package-fresh-test.service",
    )
    .bind_ro(&deb, "/opt/pkg/banger.deb")
    .bind_ro(&mirror, "/opt/mirror")
    .bind_ro(tools.path(), "/opt/tools")
    .bind_ro(&tests, "/opt/banger-test")
    .unit_file(&tests.join("banger-package-fresh-test.service"))
    .timeout_secs(1800);
    let out = boot.run();
    let read = |name: &str| boot.read(name);
    // bangerd's last words, for when something below fails.
    let journal: Vec<String> = read("journal.json")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["MESSAGE"].as_str().map(str::to_owned))
        .collect();
    eprintln!(
        "bangerd's journal (end):\n{}\nfirst vm run: {} s, second: {} s\n{}{}",
        journal[journal.len().saturating_sub(40)..].join("\n"),
        read("run1-secs").trim(),
        read("run2-secs").trim(),
        read("run1"),
        read("run1.err")
    );
    eprintln!("build units:\n{}", read("build-units"));
    boot.assert_passed(&out);

    // apt took the package's recommends from the mirror.
    let recommends = read("recommends");
    for p in ["mmdebstrap", "uidmap", "busybox-static", "kmod"] {
        assert!(
            recommends.contains(&format!("{p} install ok installed")),
            "{recommends}\n{}",
            read("apt-install")
        );
    }

    // The postinst made the unprivileged build account, with its ids.
    let user = read("build-user");
    assert!(
        user.contains("banger-build:x:")
            && user.contains("/etc/subuid:banger-build:")
            && user.contains("/etc/subgid:banger-build:"),
        "{user}"
    );

    // Before: nothing here, and doctor says the image will be built,
    // with a base system made without privilege.
    let before: serde_json::Value = serde_json::from_str(&read("doctor-before.json"))
        .unwrap_or_else(|e| panic!("doctor: {e}\n{}", read("doctor-before.err")));
    let check = doctor_check(&before, "image-build");
    assert_eq!(check["verdict"], "pass", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("mmdebstrap --mode=unshare as banger-build"),
        "{check}"
    );
    let check = doctor_check(&before, "default-image");
    assert_eq!(check["verdict"], "pass", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("builds it from its recipe"),
        "{check}"
    );

    // The first run built both, with their stages shown, and ran the
    // command in the guest: its output alone on stdout, banger's
    // progress on stderr.
    let (out1, err1) = (read("run1"), read("run1.err"));
    assert_eq!(read("run1-rc").trim(), "0", "{out1}\n{err1}");
    assert!(out1.contains("VERSION_CODENAME=bookworm"), "{out1}\n{err1}");
    assert!(out1.starts_with("PRETTY_NAME="), "{out1}");
    for stage in [
        "no catalog has it, so it is built here from its recipe",
        "build kernel debian-bookworm",
        "base system",
        "configure",
        "build rootfs",
    ] {
        assert!(err1.contains(stage), "no {stage:?} in:\n{err1}");
    }
    // The base system (mmdebstrap, unprivileged), the unpacking of its
    // tree and configure ran to the end in their own units, not in
    // bangerd's.
    let units = read("build-units");
    assert!(
        units
            .lines()
            .any(|l| l.contains("-bootstrap.service") && l.contains("mmdebstrap")),
        "{units}"
    );
    for step in ["bootstrap", "unpack", "configure"] {
        assert!(
            units
                .lines()
                .any(|l| l.contains("Finished banger-build-")
                    && l.contains(&format!("-{step}.service"))),
            "{step}:\n{units}"
        );
    }
    // At its first boot the VM, with --nat, fetched opencode through
    // banger's NAT from the "internet" namespace, checked its digest,
    // installed and started it.
    eprintln!(
        "opencode listening after {} s:\n{}\n{}",
        read("opencode-secs").trim(),
        read("tools-journal"),
        read("http.log")
    );
    assert_eq!(
        read("opencode-rc").trim(),
        "0",
        "{}\n{}",
        read("opencode"),
        read("tools-journal")
    );
    assert!(
        read("tools-journal").contains(&format!("installed opencode {}", opencode.version)),
        "{}",
        read("tools-journal")
    );
    assert!(
        read("http.log").contains("GET /opencode.tgz"),
        "{}",
        read("http.log")
    );
    let images: serde_json::Value = serde_json::from_str(&read("images.json")).unwrap();
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "debian-bookworm"),
        "{images}"
    );

    // The second run built nothing and printed the same.
    let (out2, err2) = (read("run2"), read("run2.err"));
    assert_eq!(read("run2-rc").trim(), "0", "{out2}\n{err2}");
    assert!(out2.contains("VERSION_CODENAME=bookworm"), "{out2}\n{err2}");
    assert!(out2.starts_with("PRETTY_NAME="), "{out2}");
    assert!(!err2.contains("base system"), "{err2}");
    let (first, second): (f64, f64) = (
        read("run1-secs").trim().parse().unwrap(),
        read("run2-secs").trim().parse().unwrap(),
    );
    assert!(second < first, "second run {second} s, first {first} s");
    let after: serde_json::Value = serde_json::from_str(&read("doctor-after.json")).unwrap();
    let check = doctor_check(&after, "default-image");
    assert_eq!(check["verdict"], "pass", "{check}");

    // Nothing of the builds is left: mounts, staging trees, units.
    assert_eq!(read("delete-rc").trim(), "0", "{}", read("delete"));
    assert_eq!(read("mounts-left").trim(), "0");
    assert_eq!(read("tmp-left").trim(), "0");
    assert_eq!(read("units-left").trim(), "", "{}", read("units-left"));
}
