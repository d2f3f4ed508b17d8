//! The KVM probe (`vm.accel = "auto"`) with the real daemon and
//! `/dev/kvm`. On the test bed a stock guest kernel under KVM hangs, or
//! QEMU aborts at once, at random (see TESTBED.md); the hang is what left
//! probes behind, so `vm.qemu_bin` here is a wrapper that makes no
//! progress for 30 s (as such a guest) and then execs the real QEMU: the
//! probe runs until its 10 s timeout every time. bangerd killed with
//! SIGKILL while it runs takes the probe with it; the verdict of a probe
//! that ran to its end is kept in the cache directory, so the next
//! daemon start does not probe again. Needs root and the guest artifacts
//! (scripts/build-test-kernel, scripts/build-tiny-image).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use banger_testbed::{Options, TestBed, eventually, guest_artifact, output_text};

fn config(accel: &str, qemu: &Path) -> String {
    format!(
        "[vm]\nvmm = \"qemu\"\naccel = \"{accel}\"\ndefault_image = \"tiny\"\nqemu_bin = \"{}\"\n",
        qemu.display()
    )
}

/// A QEMU whose guest makes no progress for 30 s, then the real one
/// (exec'd). It waits in a shell builtin on a FIFO of its own, so there
/// is no other process to leave behind.
fn hanging_qemu(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.exists())
        .expect("qemu-system-x86_64 on the PATH");
    // The probe runs as the VMMs' uid: it must reach the script and make
    // its FIFO.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fifos = dir.join("fifos");
    std::fs::create_dir(&fifos).unwrap();
    std::fs::set_permissions(&fifos, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = dir.join("qemu-hanging");
    std::fs::write(
        &path,
        format!(
            "#!/bin/bash\nfifo={}/fifo.$$\nmkfifo \"$fifo\"\nread -r -t 30 <>\"$fifo\"\nrm -f \"$fifo\"\nexec {} \"$@\"\n",
            fifos.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The pids of the probes of KVM for the daemon whose runtime directory
/// is `runtime` (QEMU's arguments, with the console file in it: a
/// descriptor's label), and of their keepers (`bangerd vmm-exec`).
fn probes(runtime: &Path) -> Vec<u32> {
    let marker = format!("{}/kvm-probe.", runtime.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let args: Vec<String> = c
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    args.windows(2).any(|w| w[0] == "-accel" && w[1] == "kvm")
                        && args.iter().any(|a| a.contains(&marker))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn the_kvm_probe_dies_with_the_daemon_and_its_verdict_outlives_it() {
    let vmlinuz = guest_artifact("kernel/vmlinuz", "build-test-kernel");
    let initrd = guest_artifact("kernel/initrd.img", "build-test-kernel");
    let rootfs = guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let seed = guest_artifact("tiny/work-seed.ext4", "build-tiny-image");
    let dir = tempfile::tempdir().unwrap();
    let qemu = hanging_qemu(dir.path());
    // The default image is registered with no probe (accel = "tcg").
    let mut bed = TestBed::start(Options {
        config_toml: Some(config("tcg", &qemu)),
        ..Options::default()
    })
    .unwrap();
    let ok = |args: &[&str]| {
        let out = bed.banger().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            output_text(&out)
        );
    };
    ok(&[
        "kernel",
        "import",
        "--name",
        "test-kernel",
        "--kernel",
        vmlinuz.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    ok(&[
        "image",
        "register",
        "--name",
        "tiny",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--work-seed",
        seed.to_str().unwrap(),
        "--kernel",
        "test-kernel",
    ]);
    bed.stop_daemon().unwrap();
    std::fs::write(bed.config_path(), config("auto", &qemu)).unwrap();
    let runtime = bed.runtime_dir();
    let memory = bed.cache_dir().join("kvm-probe.json");

    // With accel = "auto" the daemon probes KVM with the default image's
    // kernel at its start; killed meanwhile, its probe goes with it.
    bed.start_daemon().unwrap();
    let running = eventually(Duration::from_secs(20), || {
        Some(probes(&runtime)).filter(|p| !p.is_empty())
    })
    .expect("bangerd started no KVM probe");
    // It runs jailed: its keeper and QEMU, both as the VMMs' first uid.
    let uid_of = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let jailed = eventually(Duration::from_secs(10), || {
        let p = probes(&runtime);
        (p.len() == 2
            && p.iter()
                .all(|pid| uid_of(*pid) == Some(banger_vmm::jail::VMM_GROUP)))
        .then_some(p)
    });
    assert!(
        jailed.is_some(),
        "not a keeper and a QEMU as uid {}: {:?}",
        banger_vmm::jail::VMM_GROUP,
        probes(&runtime)
            .into_iter()
            .map(|p| (p, uid_of(p)))
            .collect::<Vec<_>>()
    );
    bed.kill_daemon();
    let t0 = Instant::now();
    let left = eventually(Duration::from_secs(5), || {
        Some(()).filter(|()| probes(&runtime).is_empty())
    });
    assert!(
        left.is_some(),
        "the probe {running:?} outlived the killed daemon: {:?}",
        probes(&runtime)
    );
    eprintln!("probe {running:?} gone {:?} after the kill", t0.elapsed());
    assert!(!memory.exists(), "a cut-short probe is no verdict");

    // The next start probes again, to the end, and keeps the verdict.
    bed.start_daemon().unwrap();
    eventually(Duration::from_secs(60), || {
        Some(()).filter(|()| memory.exists())
    })
    .unwrap_or_else(|| panic!("no verdict kept:\n{}", bed.daemon_log()));
    let kept = std::fs::read_to_string(&memory).unwrap();
    assert!(
        kept.contains("\"usable\": false") && kept.contains("did not get through early boot"),
        "{kept}"
    );
    bed.stop_daemon().unwrap();

    // And the one after that takes it from there: no probe runs (the
    // daemon's start would have begun one at once, as above).
    bed.start_daemon().unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        assert!(probes(&runtime).is_empty(), "probed again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // doctor reports the kept verdict without probing either.
    let doctor = bed
        .banger()
        .args(["--json", "doctor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let doctor = std::thread::spawn(move || doctor.wait_with_output().unwrap());
    while !doctor.is_finished() {
        assert!(probes(&runtime).is_empty(), "doctor probed again");
        assert!(t0.elapsed() < Duration::from_secs(60), "doctor hangs");
        std::thread::sleep(Duration::from_millis(50));
    }
    let doctor = doctor.join().unwrap();
    let accel =
        banger_testbed::doctor_check(&serde_json::from_slice(&doctor.stdout).unwrap(), "accel");
    assert!(
        accel["detail"]
            .as_str()
            .unwrap()
            .contains("did not get through early boot under kvm"),
        "{accel}"
    );
}
