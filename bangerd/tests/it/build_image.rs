//! Images built from the shipped recipe through the real daemon, bus and
//! polkitd. On a fresh host (no kernel, no image, an empty catalog)
//! `banger vm create` builds the default image and its kernel and then
//! creates the VM; `banger image build debian-bookworm` with a kernel that
//! is not here builds that kernel first, takes the base system from the
//! cache, puts banger-agent and the kernel's modules in, runs the recipe's
//! configure and records a system image, whose root filesystem then boots
//! with the recorded kernel under QEMU to a live agent. Needs root, the
//! Debian mirror and the guest artifacts (agent).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_testbed::output_text as text;
use banger_testbed::{Options, TestBed, doctor_check, guest_artifact};

use crate::guest_boot::boot;

/// `debugfs -R REQUEST IMAGE`'s output; fails the test when it fails.
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs {request}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_debian_recipe_builds_its_kernel_and_an_image_that_boots() {
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    let agent = guest_artifact("banger-agent", "build-agent");
    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[vm]\nagent_bin = \"{}\"\n[images]\nrecipes = \"{}\"\n",
            agent.display(),
            recipes.canonicalize().unwrap().display()
        )),
        ..Options::default()
    })
    .expect("test bed");

    // A fresh host: no kernel, no image, an empty catalog. doctor says
    // where the default image will come from; `vm create` builds it here,
    // its kernel first, then creates.
    let doctor = || -> serde_json::Value {
        let out = bed.banger().args(["--json", "doctor"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let before = doctor_check(&doctor(), "default-image");
    assert_eq!(before["verdict"], "pass", "{before}");
    assert!(
        before["detail"]
            .as_str()
            .unwrap()
            .contains("builds it from its recipe"),
        "{before}"
    );
    let t0 = Instant::now();
    let out = bed
        .banger()
        .args(["vm", "create", "--name", "first", "--no-start"])
        .output()
        .unwrap();
    let said = text(&out);
    eprintln!("vm create on a fresh host ({:?}):\n{said}", t0.elapsed());
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(
            "the default image is not here: no catalog has it, so it is built here from its recipe"
        ),
        "{said}"
    );
    for stage in [
        "build kernel debian-bookworm",
        "base system",
        "configure",
        "build rootfs",
        "record",
    ] {
        assert!(said.contains(&format!("✓ {stage}")), "no {stage} in {said}");
    }
    let shown: serde_json::Value = serde_json::from_slice(
        &bed.banger()
            .args(["--json", "image", "show", "debian-bookworm"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(shown["kernel_name"], "debian-bookworm", "{shown}");
    let after = doctor_check(&doctor(), "default-image");
    assert!(
        after["detail"]
            .as_str()
            .unwrap()
            .contains("kernel debian-bookworm"),
        "{after}"
    );

    // An image of another name with another kernel: the base system
    // comes from the cache this time.
    let t0 = Instant::now();
    let out = bed
        .banger()
        .args([
            "--json",
            "image",
            "build",
            "debian-bookworm",
            "--name",
            "built-deb",
            "--kernel",
            "deb-kernel",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "image build in {:?}: {}",
        t0.elapsed(),
        made["job"]["stages"]
    );
    let stages: Vec<&str> = made["job"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "build kernel deb-kernel",
            "base system",
            "agent",
            "configure",
            "build rootfs",
            "make work-seed",
            "digest",
            "record"
        ]
    );
    let image = &made["image"];
    assert_eq!(image["name"], "built-deb", "{made}");
    assert_eq!(image["kernel_name"], "deb-kernel", "{image}");
    assert_eq!(image["owner_uid"], 0, "a system image: {image}");
    assert_eq!(image["init"], "/sbin/init", "{image}");
    assert_eq!(image["services"][0]["port"], 22, "{image}");
    let rootfs = Path::new(image["rootfs"].as_str().unwrap()).to_owned();
    let seed = Path::new(image["work_seed"].as_str().unwrap()).to_owned();

    // What the recipe and the build put in.
    let kernel: serde_json::Value = serde_json::from_slice(
        &bed.banger()
            .args(["--json", "kernel", "show", "deb-kernel"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let release = kernel["version"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(debugfs(&rootfs, "stat /usr/sbin/banger-agent").contains("Mode:  0755"));
    assert!(debugfs(&rootfs, "cat /etc/fstab").contains("LABEL=banger-root /"));
    assert!(debugfs(&rootfs, "ls /lib/modules").contains(&release));
    assert!(
        debugfs(&rootfs, "ls /etc/systemd/system/sysinit.target.wants")
            .contains("banger-agent.service")
    );
    assert!(debugfs(&rootfs, "stat /usr/lib/banger/firstboot").contains("Mode:  0755"));

    // Nothing of either build's tree is left.
    let staging: Vec<_> = std::fs::read_dir(bed.state_dir().join("images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");

    // One cached base system served both builds.
    let cached: Vec<_> = std::fs::read_dir(bed.cache_dir().join("images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached.len() == 1 && cached[0].starts_with("bookworm-") && cached[0].ends_with(".tar"),
        "{cached:?}"
    );

    // It boots with the kernel built for it.
    let dir = tempfile::tempdir().unwrap();
    let t_boot = Instant::now();
    let mut qemu = boot(
        Path::new(kernel["bzimage"].as_str().unwrap()),
        Path::new(kernel["initrd"].as_str().unwrap()),
        &rootfs,
        &seed,
        "/sbin/init",
        dir.path(),
    );
    let (mut conn, _, _) = qemu
        .agent(
            dir.path(),
            Duration::from_secs(240),
            Duration::from_millis(200),
        )
        .await;
    let info = conn.info(Duration::from_secs(30)).await.unwrap();
    eprintln!(
        "built image booted to its agent in {:?} ({} {})",
        t_boot.elapsed(),
        info.os_id.as_deref().unwrap_or("?"),
        info.kernel_release
    );
    assert_eq!(info.os_id.as_deref(), Some("debian"));
    assert_eq!(info.kernel_release, release);
    assert!(info.disks.iter().any(|d| d.path == "/root"), "{info:?}");
    let _ = conn.shutdown(false, Duration::from_secs(10)).await;
    let _ = qemu.child.kill();

    // A recipe that is not there is named with the ones that are.
    let out = bed
        .banger()
        .args(["image", "build", "nonesuch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no image recipe nonesuch") && text(&out).contains("debian-bookworm"),
        "{}",
        text(&out)
    );
}
