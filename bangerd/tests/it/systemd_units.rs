//! VMMs under a real systemd: a Debian tree booted with systemd-nspawn
//! (`scripts/build-nspawn-rootfs`; this host's PID 1 is not systemd) runs
//! bangerd as a service, creates a VM from the tiny image under QEMU TCG
//! and checks that its VMM is the transient unit `banger-vm-<id>.service`
//! in `banger.slice` with the VM's memory and CPU limits, that machined
//! lists it, that systemd-resolved resolves `<name>.vm` on the host
//! (bangerd registered `~vm` on the bridge), that SSH works, that killing bangerd leaves the unit running
//! and the restarted bangerd adopts it, that a unit whose start the store
//! never recorded is stopped by the next bangerd, that a host folder is
//! served from a unit of its own, and that stop ends the units. The
//! steps run inside the container (`tests/nspawn/vm-units.sh`); this file
//! boots it and judges what it wrote. Needs root and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use banger_testbed::unit_property as property;
use banger_testbed::{Nspawn, artifacts_dir, bin_path, guest_artifact, nspawn_rootfs};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Check `name` of the `banger doctor --json` output saved as `file`.
fn doctor_check(dir: &Path, file: &str, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let doctor: serde_json::Value = serde_json::from_str(&text).unwrap();
    banger_testbed::doctor_check(&doctor, name)
}

#[test]
fn vmms_run_as_transient_units_under_systemd() {
    guest_artifact("kernel/vmlinuz", "build-test-kernel");
    guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let bin_dir = bin_path("bangerd").parent().unwrap().to_path_buf();
    let tests = repo().join("bangerd/tests/nspawn");
    let boot = Nspawn::new(&nspawn_rootfs(), "banger-test", "banger-test.service")
        .bind_ro(&bin_dir, "/opt/banger")
        .bind_ro(&artifacts_dir(), "/opt/guest")
        .bind_ro(&tests, "/opt/banger-test")
        .unit_file(&tests.join("banger-test.service"))
        .bind_ro(
            &repo().join("dbus/org.banger.Manager.conf"),
            "/etc/dbus-1/system.d/org.banger.Manager.conf",
        )
        // polkitd runs in the tree: it must know banger's actions.
        .bind_ro(
            &repo().join("packaging/org.banger.policy"),
            "/usr/share/polkit-1/actions/org.banger.policy",
        );
    let out = boot.run();
    boot.assert_passed(&out);
    let dir = boot.results();
    let read = |name: &str| boot.read(name);

    // The VM's VMM is its own unit, in banger's slice, with its limits.
    let unit_name = read("unit-name").trim().to_owned();
    let vm: serde_json::Value = serde_json::from_str(&read("vm.json")).unwrap();
    assert_eq!(
        unit_name,
        format!("banger-vm-{}.service", vm["id"].as_str().unwrap())
    );
    assert_eq!(vm["unit"], unit_name.as_str(), "{vm}");
    assert_eq!(vm["state"], "running");
    let unit = read("unit");
    eprintln!("{unit_name}:\n{unit}machinectl list:\n{}", read("machines"));
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
    let machines = read("machines");
    assert!(
        machines
            .lines()
            .any(|l| l.split_whitespace().next() == Some("unitvm")),
        "machinectl list: {machines}"
    );
    assert!(read("ssh").trim().starts_with("6."), "{}", read("ssh"));
    // The VM boots inside its sandbox: a user of its own, no capability,
    // no new privileges, a seccomp filter, and systemd's exposure score
    // at most 4.0.
    let status = read("vmm-status");
    let ids = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let uid = ids("Uid")[0];
    assert!(
        banger_vmm::jail::VMM_IDS.contains(&uid) && uid != banger_vmm::jail::VMM_GROUP,
        "{status}"
    );
    assert_eq!(ids("Uid"), [uid; 4], "{status}");
    assert_eq!(ids("Gid"), [uid; 4], "{status}");
    assert!(
        ids("Groups").contains(&banger_vmm::jail::VMM_GROUP),
        "{status}"
    );
    assert!(!ids("Groups").contains(&0), "{status}");
    // Its unit gave it a network namespace of its own (its TAP and
    // sockets came from bangerd as descriptors).
    let netns = read("vmm-netns");
    let spaces: Vec<&str> = netns.lines().filter(|l| l.starts_with("net:[")).collect();
    assert!(spaces.len() == 2 && spaces[0] != spaces[1], "{netns}");
    for line in [
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(status.contains(line), "{line} in\n{status}");
    }
    let security = read("vm-security");
    eprintln!("systemd-analyze security {unit_name}:\n{security}");
    let exposure = banger_testbed::exposure(&security);
    assert!(exposure <= 4.0, "exposure {exposure}:\n{security}");

    // systemd-resolved routes ~vm to the guests' DNS server on the bridge,
    // so the host resolves the VM's name; doctor says so.
    let resolved = read("resolved");
    assert!(resolved.contains("~vm"), "{resolved}");
    assert!(resolved.contains("10.213.42.1"), "{resolved}");
    let query = read("query");
    let ip = vm["ipv4"].as_str().unwrap();
    assert!(query.contains(&format!("unitvm.vm: {ip}")), "{query}");
    let check = doctor_check(dir, "doctor-up.json", "resolved");
    assert_eq!(check["verdict"], "pass", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains("routes ~vm"),
        "{check}"
    );

    // Killing bangerd left the unit running; the new bangerd adopted it.
    assert_eq!(read("after-kill").trim(), "active");
    let after: serde_json::Value = serde_json::from_str(&read("vm-after.json")).unwrap();
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["unit"], unit_name.as_str());

    // A start cut short by a crash left a unit the store had no pid for:
    // the next bangerd stopped it and recorded the VM stopped.
    let orphan = read("unit-orphan");
    assert!(
        matches!(
            property(&orphan, "ActiveState"),
            Some("inactive" | "failed")
        ),
        "{orphan}"
    );
    let vm_orphan: serde_json::Value = serde_json::from_str(&read("vm-orphan.json")).unwrap();
    assert_eq!(vm_orphan["state"], "stopped", "{vm_orphan}");

    // A host folder: served by virtiofsd from a unit of its own, in
    // banger's slice, with no network and no new privileges; it ends with
    // the VM.
    assert_eq!(
        read("folder-read"),
        "from the host\n",
        "{}",
        read("folder-start")
    );
    let folder = read("folder-unit");
    assert_eq!(property(&folder, "ActiveState"), Some("active"), "{folder}");
    assert_eq!(property(&folder, "Slice"), Some("banger.slice"), "{folder}");
    assert_eq!(
        property(&folder, "NoNewPrivileges"),
        Some("yes"),
        "{folder}"
    );
    assert_eq!(property(&folder, "PrivateNetwork"), Some("yes"), "{folder}");
    let caps = property(&folder, "CapabilityBoundingSet").unwrap_or_default();
    assert!(
        caps.contains("cap_setuid") && !caps.contains("cap_net_admin"),
        "{folder}"
    );
    let folder_stopped = read("folder-unit-stopped");
    assert_eq!(
        property(&folder_stopped, "ActiveState"),
        Some("inactive"),
        "{folder_stopped}"
    );

    // Stopping the VM ended its unit.
    let stopped = read("unit-stopped");
    assert_eq!(
        property(&stopped, "ActiveState"),
        Some("inactive"),
        "{stopped}"
    );

    // doctor inside saw systemd as PID 1.
    let systemd = doctor_check(dir, "doctor.json", "systemd");
    assert_eq!(systemd["verdict"], "pass", "{systemd}");
}
