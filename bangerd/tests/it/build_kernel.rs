//! Kernels built from the host's Debian archive through the real daemon,
//! bus and polkitd: `banger kernel build` runs the host's apt sources into
//! banger's own lists under the cache directory, downloads the release's
//! cloud kernel, makes its initramfs and records a system kernel, leaving
//! the host's apt state alone; the tiny image then boots with the recorded
//! kernel and initramfs under QEMU to a live agent. Needs root, the Debian
//! mirror the host's apt uses, and the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use banger_testbed::output_text as text;
use banger_testbed::{Options, TestBed, guest_artifact};

use crate::guest_boot::boot_tiny;

/// The names and contents of the entries of a gzip-compressed newc cpio.
fn initramfs_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut r: Box<dyn Read> = Box::new(flate2::read::GzDecoder::new(
        std::fs::File::open(path).unwrap(),
    ));
    let mut out = Vec::new();
    loop {
        let mut entry = cpio::NewcReader::new(r).unwrap();
        if entry.entry().is_trailer() {
            break;
        }
        let name = entry.entry().name().to_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((name, data));
        r = Box::new(entry.finish().unwrap());
    }
    out
}

fn modified(path: &str) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_built_from_the_archive_is_recorded_and_boots() {
    guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let bed = TestBed::start(Options::default()).expect("test bed");
    let host_apt = ["/var/lib/apt/lists", "/var/lib/dpkg/status"].map(modified);

    let out = bed
        .banger()
        .args(["--json", "kernel", "build", "--name", "built"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages: Vec<&str> = made["job"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    eprintln!("kernel build stages: {}", made["job"]["stages"]);
    assert_eq!(stages[..3], ["apt update", "resolve package", stages[2]]);
    assert!(stages[2].starts_with("download linux-image-"), "{stages:?}");
    assert_eq!(
        stages[3..],
        [
            "unpack",
            "modules",
            "initramfs",
            "check vmlinux",
            "digest",
            "record"
        ]
    );
    let kernel = &made["kernel"];
    assert_eq!(kernel["name"], "built", "{made}");
    assert_eq!(kernel["owner_uid"], 0, "a system kernel: {kernel}");
    let version = kernel["version"].as_str().unwrap().to_owned();
    assert!(!version.is_empty(), "{kernel}");
    let bzimage = Path::new(kernel["bzimage"].as_str().unwrap()).to_owned();
    let initrd = Path::new(kernel["initrd"].as_str().unwrap()).to_owned();
    let modules = Path::new(kernel["modules"].as_str().unwrap()).to_owned();
    assert!(modules.join("modules.dep").is_file(), "{kernel}");

    // The initramfs: busybox, banger's /init, and the modules in order.
    let entries = initramfs_entries(&initrd);
    let find = |n: &str| entries.iter().find(|(name, _)| name == n);
    assert!(find("bin/busybox").is_some());
    let init = include_bytes!("../../../scripts/guest/initramfs-init");
    assert_eq!(find("init").unwrap().1, init);
    let order = String::from_utf8(find("etc/modules.order").unwrap().1.clone()).unwrap();
    let position = |m: &str| order.lines().position(|l| l.ends_with(&format!("/{m}.ko")));
    for m in ["virtio_blk", "virtio_console", "virtio_mmio", "virtio_net"] {
        let at = position(m).unwrap_or_else(|| panic!("no {m} in\n{order}"));
        assert!(find(&format!("lib/modules/{}", order.lines().nth(at).unwrap())).is_some());
    }
    if let (Some(ring), Some(blk)) = (position("virtio_ring"), position("virtio_blk")) {
        assert!(ring < blk, "dependencies load first:\n{order}");
    }

    // Nothing of the build is left over, and the host's apt is untouched.
    assert_eq!(
        named(&bed.cache_dir(), ""),
        ["apt"],
        "only apt's state is kept"
    );
    assert!(named(&bed.state_dir().join("kernels"), ".tmp-").is_empty());
    assert!(bed.cache_dir().join("apt/lists").is_dir());
    assert_eq!(
        ["/var/lib/apt/lists", "/var/lib/dpkg/status"].map(modified),
        host_apt
    );

    // The recorded kernel boots the tiny image.
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut qemu = boot_tiny(&bzimage, &initrd, dir.path());
    let (conn, _, _) = qemu
        .agent(
            dir.path(),
            Duration::from_secs(150),
            Duration::from_millis(100),
        )
        .await;
    let info = conn.info(Duration::from_secs(30)).await.unwrap();
    eprintln!(
        "built kernel {} booted to the agent in {:?}",
        info.kernel_release,
        t0.elapsed()
    );
    assert!(
        version.starts_with(&info.kernel_release),
        "{version} vs {}",
        info.kernel_release
    );
    assert_eq!(info.os_id.as_deref(), Some("banger-tiny"));
    let _ = conn.shutdown(false, Duration::from_secs(10)).await;
    let _ = qemu.child.kill();

    // Refusals, before any job: the name is taken, a package name that is
    // no package, a source that is not Debian.
    let out = bed
        .banger()
        .args(["kernel", "build", "--name", "built"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    let out = bed
        .banger()
        .args(["kernel", "build", "--name", "other", "--package=-oAPT::x=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("is no package name"), "{}", text(&out));
    let out = bed.busctl([
        "call",
        "org.banger.Manager",
        "/org/banger/Manager",
        "org.banger.Manager",
        "BuildKernel",
        "sa{sv}",
        "other",
        "1",
        "from",
        "s",
        "fedora",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the only source is \"debian\""),
        "{}",
        text(&out)
    );
}

/// The entries of `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_kernel_build_leaves_nothing() {
    use banger_dbus::proxy::{JobProxy, ManagerProxy};
    // Slow stages, so the cancel lands while the package is unpacked and
    // its initramfs is being made.
    let bed = TestBed::start(Options {
        config_toml: Some("[debug]\njob_stage_delay_ms = 1500\n".to_owned()),
        ..Options::default()
    })
    .expect("test bed");
    let conn = zbus::connection::Builder::address(bed.bus_address())
        .build()
        .await
        .unwrap();
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let job_path = manager
        .build_kernel("doomed", std::collections::HashMap::new())
        .await
        .unwrap();
    let job = JobProxy::builder(&conn)
        .path(job_path.clone())
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stage = job.stage().await.unwrap();
        if stage == "initramfs" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the build never reached its initramfs stage (at {stage:?}, state {:?})",
            job.state().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Mid-build, the unpacked package is inside the staging directory.
    let staging = named(&bed.state_dir().join("kernels"), ".tmp-");
    assert_eq!(staging.len(), 1, "mid-build: {staging:?}");
    assert!(
        bed.state_dir()
            .join("kernels")
            .join(&staging[0])
            .join(".build/pkg")
            .is_dir()
    );
    job.cancel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while job.state().await.map(|s| s == "running").unwrap_or(false) {
        assert!(Instant::now() < deadline, "the cancel did not end the job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(job.state().await.unwrap(), "cancelled");
    // A moment for the blocking step the cancel interrupted to unwind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        named(&bed.cache_dir(), ""),
        ["apt"],
        "only apt's state is kept"
    );
    assert!(named(&bed.state_dir().join("kernels"), ".tmp-").is_empty());
    assert!(
        bed.banger()
            .args(["kernel", "show", "doomed"])
            .output()
            .map(|o| !o.status.success())
            .unwrap()
    );
}
