//! VMMs under a real systemd: a Debian tree booted with systemd-nspawn
//! (`scripts/build-nspawn-rootfs`; this host's PID 1 is not systemd) runs
//! bangerd as a service, creates a VM from the tiny image under QEMU TCG
//! and checks that its VMM is the transient unit `banger-vm-<id>.service`
//! in `banger.slice` with the VM's memory and CPU limits, that machined
//! lists it, that systemd-resolved resolves `<name>.vm` on the host
//! (bangerd registered `~vm` on the bridge), that SSH works, that killing bangerd leaves the unit running
//! and the restarted bangerd adopts it, and that stop ends the unit. The
//! steps run inside the container (`tests/nspawn/vm-units.sh`); this file
//! boots it and judges what it wrote. Needs root and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_testbed::{artifacts_dir, bin_path, guest_artifact};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The container tree, built (or found in the cache) by its script.
fn rootfs() -> PathBuf {
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
        path.join("usr/lib/systemd/systemd").exists() || path.join("lib/systemd/systemd").exists()
    );
    path
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// `Key=value` lines of `systemctl show`.
fn property<'a>(show: &'a str, key: &str) -> Option<&'a str> {
    show.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Check `name` of the `banger doctor --json` output saved as `file`.
fn doctor_check(dir: &Path, file: &str, name: &str) -> serde_json::Value {
    let doctor: serde_json::Value = serde_json::from_str(&read(dir, file)).unwrap();
    banger_testbed::doctor_check(&doctor, name)
}

#[test]
fn vmms_run_as_transient_units_under_systemd() {
    guest_artifact("kernel/vmlinuz", "build-test-kernel");
    guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let rootfs = rootfs();
    let results = tempfile::tempdir().unwrap();
    let bin_dir = bin_path("bangerd").parent().unwrap().to_path_buf();
    let tests = repo().join("bangerd/tests/nspawn");
    let bind = |flag: &str, from: &Path, to: &str| format!("--{flag}={}:{to}", from.display());
    let out = Command::new("timeout")
        .args(["--kill-after=10", "600", "systemd-nspawn"])
        .args([
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
        ])
        .arg("--directory")
        .arg(&rootfs)
        .arg("--machine=banger-test")
        .arg("--bind=/dev/net/tun")
        .arg(bind("bind-ro", &bin_dir, "/opt/banger"))
        .arg(bind("bind-ro", &artifacts_dir(), "/opt/guest"))
        .arg(bind("bind", results.path(), "/opt/results"))
        .arg(bind("bind-ro", &tests, "/opt/banger-test"))
        .arg(bind(
            "bind-ro",
            &tests.join("banger-test.service"),
            "/etc/systemd/system/banger-test.service",
        ))
        .arg(bind(
            "bind-ro",
            &repo().join("dbus/org.banger.Manager.conf"),
            "/etc/dbus-1/system.d/org.banger.Manager.conf",
        ))
        .args(["--boot", "--", "systemd.wants=banger-test.service"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let dir = results.path();
    let log = read(dir, "log");
    let verdict = read(dir, "verdict");
    assert_eq!(
        verdict.trim(),
        "PASS",
        "the container said {verdict:?} (nspawn {}: {})\nsteps:\n{}\nlog:\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        read(dir, "steps")
    );

    // The VM's VMM is its own unit, in banger's slice, with its limits.
    let unit_name = read(dir, "unit-name").trim().to_owned();
    let vm: serde_json::Value = serde_json::from_str(&read(dir, "vm.json")).unwrap();
    assert_eq!(
        unit_name,
        format!("banger-vm-{}.service", vm["id"].as_str().unwrap())
    );
    assert_eq!(vm["unit"], unit_name.as_str(), "{vm}");
    assert_eq!(vm["state"], "running");
    let unit = read(dir, "unit");
    eprintln!(
        "{unit_name}:\n{unit}machinectl list:\n{}",
        read(dir, "machines")
    );
    assert_eq!(property(&unit, "ActiveState"), Some("active"), "{unit}");
    assert_eq!(property(&unit, "Slice"), Some("banger.slice"), "{unit}");
    assert_eq!(property(&unit, "Type"), Some("exec"), "{unit}");
    // 256 MiB of guest memory + an eighth + 256 MiB for QEMU itself.
    assert_eq!(
        property(&unit, "MemoryMax"),
        Some(((256u64 + 32 + 256) << 20).to_string().as_str()),
        "{unit}"
    );
    assert_eq!(property(&unit, "CPUQuotaPerSecUSec"), Some("1s"), "{unit}");
    let main_pid: u32 = property(&unit, "MainPID").unwrap().parse().unwrap();
    assert!(main_pid > 0, "{unit}");

    // machined lists it; SSH reached it.
    let machines = read(dir, "machines");
    assert!(
        machines
            .lines()
            .any(|l| l.split_whitespace().next() == Some("unitvm")),
        "machinectl list: {machines}"
    );
    assert!(
        read(dir, "ssh").trim().starts_with("6."),
        "{}",
        read(dir, "ssh")
    );

    // systemd-resolved routes ~vm to the guests' DNS server on the bridge,
    // so the host resolves the VM's name; doctor says so.
    let resolved = read(dir, "resolved");
    assert!(resolved.contains("~vm"), "{resolved}");
    assert!(resolved.contains("10.213.42.1"), "{resolved}");
    let query = read(dir, "query");
    let ip = vm["ipv4"].as_str().unwrap();
    assert!(query.contains(&format!("unitvm.vm: {ip}")), "{query}");
    let check = doctor_check(dir, "doctor-up.json", "resolved");
    assert_eq!(check["verdict"], "pass", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains("routes ~vm"),
        "{check}"
    );

    // Killing bangerd left the unit running; the new bangerd adopted it.
    assert_eq!(read(dir, "after-kill").trim(), "active");
    let after: serde_json::Value = serde_json::from_str(&read(dir, "vm-after.json")).unwrap();
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["unit"], unit_name.as_str());

    // Stopping the VM ended its unit.
    let stopped = read(dir, "unit-stopped");
    assert_eq!(
        property(&stopped, "ActiveState"),
        Some("inactive"),
        "{stopped}"
    );

    // doctor inside saw systemd as PID 1.
    let systemd = doctor_check(dir, "doctor.json", "systemd");
    assert_eq!(systemd["verdict"], "pass", "{systemd}");
}
