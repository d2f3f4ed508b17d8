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
use banger_testbed::{FileServer, Options, TestBed, doctor_check, guest_artifact, tool_packages};

use crate::guest_boot::{GUEST_FORWARD, boot_with};

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
    // The base system is made without privilege (scripts/install-deps
    // made the account as the package does).
    let how = doctor_check(&doctor(), "image-build");
    assert_eq!(how["verdict"], "pass", "{how}");
    assert!(
        how["detail"].as_str().unwrap().contains("mmdebstrap"),
        "{how}"
    );
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
    assert!(debugfs(&rootfs, "stat /usr/lib/banger/tools").contains("Mode:  0755"));
    assert!(
        debugfs(&rootfs, "ls /etc/systemd/system/multi-user.target.wants")
            .contains("banger-tools.service")
    );
    // debootstrap's downloads are not kept in the image.
    assert!(!debugfs(&rootfs, "ls /var/cache/apt/archives").contains(".deb"));

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

    // It boots with the kernel built for it, and at its first boot with
    // network installs the recipe's tools from the URLs its tools.list
    // names: here a loopback server with the pinned packages, the only
    // address the guest reaches; mise is offered with a wrong digest, so
    // it must not be installed.
    let tools = tool_packages();
    let served = tempfile::tempdir().unwrap();
    let mut list = String::new();
    for t in &tools {
        std::fs::copy(&t.package, served.path().join(format!("{}.tgz", t.name))).unwrap();
        let sha = if t.name == "mise" {
            "0".repeat(64)
        } else {
            t.sha256.clone()
        };
        list.push_str(&format!(
            "{} {} http://{GUEST_FORWARD}/{}.tgz {sha} {}\n",
            t.name, t.version, t.name, t.member
        ));
    }
    let server = FileServer::start(served.path().to_owned());
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("with-local-tools.ext4");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&rootfs)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let list_file = dir.path().join("tools.list");
    std::fs::write(&list_file, list).unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .args(["-R", "rm /usr/lib/banger/tools.list"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("debugfs")
        .arg("-w")
        .args([
            "-R",
            &format!("write {} /usr/lib/banger/tools.list", list_file.display()),
        ])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t_boot = Instant::now();
    let mut qemu = boot_with(
        Path::new(kernel["bzimage"].as_str().unwrap()),
        Path::new(kernel["initrd"].as_str().unwrap()),
        &image,
        &seed,
        "/sbin/init",
        dir.path(),
        Some(server.port()),
    );
    let (conn, _, _) = qemu
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
    let t_tools = Instant::now();
    let waited = conn.wait_port(4096, Duration::from_secs(300)).await;
    eprintln!(
        "opencode from banger-tools.service listening after {:?}: {waited:?}",
        t_tools.elapsed()
    );
    assert!(
        waited.is_ok(),
        "opencode did not listen: {waited:?}\nrequests: {:?}\nconsole:\n{}",
        server.requests(),
        qemu.console_tail(40)
    );
    let fetched: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert!(
        fetched.iter().any(|p| p == "/opencode.tgz") && fetched.iter().any(|p| p == "/mise.tgz"),
        "{fetched:?}"
    );
    conn.shutdown(false, Duration::from_secs(30)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while qemu.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the guest did not power off");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // opencode is in; mise, whose digest did not match, is not, so the
    // next boot tries again.
    let booted = dir.path().join("rootfs.ext4");
    assert!(debugfs(&booted, "stat /usr/local/bin/opencode").contains("Mode:  0755"));
    assert!(!debugfs(&booted, "ls -l /usr/local/bin").contains("mise"));
    assert!(!debugfs(&booted, "ls -l /var/lib/banger").contains("tools.done"));

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
