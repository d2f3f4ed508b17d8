//! Catalog pulls through the real daemon, bus and polkitd: catalogs signed
//! with the real `minisign` (a test key the root-owned config trusts) and
//! taken in by `banger update --check`, bundles (tar + zstd of the test
//! kernel and the tiny image) served on loopback. An image pull brings
//! its kernel, resumes a dropped connection and is shared by a second
//! caller; a bad SHA-256, a wrong size, a truncated or stalled download, a
//! bundle with foreign files and a full disk (a small loop-mounted state
//! directory) are each refused and leave nothing behind. Needs root and
//! the guest artifacts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::process::Stdio;

use banger_testbed::output_text as text;
use banger_testbed::{
    FileServer, NetNs, Options, TestBed, artifacts_dir, bin_path, catalog, channel, guest_artifact,
    keypair, sha256_hex,
};

/// A tar + zstd bundle at `to` of (name in the archive, file).
fn bundle(to: &Path, files: &[(&str, PathBuf)]) -> (u64, String) {
    let file = std::fs::File::create(to).unwrap();
    let encoder = zstd::stream::write::Encoder::new(file, 3)
        .unwrap()
        .auto_finish();
    let mut tar = tar::Builder::new(encoder);
    for (name, path) in files {
        tar.append_path_with_name(path, name).unwrap();
    }
    tar.into_inner().unwrap();
    let bytes = std::fs::read(to).unwrap();
    (bytes.len() as u64, sha256_hex(&bytes))
}

/// `scripts/pack-bundle image DIR` into `web/bundles/tiny.tar.zst`,
/// signed with `key`: its (size, sha256) from the entry it prints, after
/// checking the signature with the real minisign.
fn pack_bundle(dir: &Path, web: &Path, key: &banger_testbed::Keypair) -> (u64, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pack-bundle");
    let out = Command::new(script)
        .arg("image")
        .arg(dir)
        .args(["--name", "tiny", "--url-base", "https://bundles.example/b"])
        .args([
            "--kernel",
            "test-kernel",
            "--min-banger",
            "0.1.0",
            "--level",
            "3",
        ])
        .arg("--key")
        .arg(&key.secret)
        .arg("--out")
        .arg(web.join("bundles"))
        .output()
        .unwrap();
    assert!(out.status.success(), "pack-bundle: {}", text(&out));
    let entry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        entry["url"], "https://bundles.example/b/tiny.tar.zst",
        "{entry}"
    );
    assert_eq!(entry["kernel"], "test-kernel", "{entry}");
    let bundle = web.join("bundles/tiny.tar.zst");
    let verified = Command::new("minisign")
        .arg("-Vm")
        .arg(&bundle)
        .arg("-p")
        .arg(&key.public_file)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", text(&verified));
    let bytes = std::fs::read(&bundle).unwrap();
    assert_eq!(entry["sha256"], sha256_hex(&bytes));
    (entry["size"].as_u64().unwrap(), sha256_hex(&bytes))
}

/// A catalog entry.
fn entry(
    name: &str,
    url: &str,
    size: u64,
    sha256: &str,
    kernel: Option<&str>,
) -> serde_json::Value {
    let mut e = serde_json::json!({
        "name": name,
        "version": "2026.12.02",
        "arch": "x86_64",
        "description": format!("test bundle {name}"),
        "url": url,
        "size": size,
        "sha256": sha256,
        "min_banger": "0.1.0",
    });
    if let Some(k) = kernel {
        e["kernel"] = k.into();
    }
    e
}

/// Everything under the state directory's kernels/ and images/ whose
/// name starts with `.tmp-` (a pull's staging).
fn leftovers(state: &Path) -> Vec<PathBuf> {
    ["kernels", "images"]
        .iter()
        .filter_map(|d| std::fs::read_dir(state.join(d)).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
        })
        .collect()
}

struct Fixture {
    _keys: tempfile::TempDir,
    web: tempfile::TempDir,
    server: FileServer,
    config: String,
    tiny: (u64, String),
}

/// Bundles, a channel with signed catalogs, and the server.
fn fixture() -> Fixture {
    fixture_in(None)
}

/// [`fixture`] with the server in network namespace `netns`.
fn fixture_in(netns: Option<&str>) -> Fixture {
    guest_artifact("kernel/vmlinuz", "build-test-kernel");
    guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let guest = artifacts_dir();
    let keys = tempfile::tempdir().unwrap();
    let test = keypair(keys.path(), "test");
    let web = tempfile::tempdir().unwrap();
    let root = web.path();
    let server = FileServer::start_in(root.to_owned(), netns);
    std::fs::create_dir_all(root.join("bundles")).unwrap();
    let kernel = bundle(
        &root.join("bundles/kernel.tar.zst"),
        &[
            ("vmlinuz", guest.join("kernel/vmlinuz")),
            ("initrd.img", guest.join("kernel/initrd.img")),
        ],
    );
    let meta = root.join("image.json");
    std::fs::write(
        &meta,
        r#"{"services": ["ssh:22"], "init": "/sbin/banger-init"}"#,
    )
    .unwrap();
    let tiny_files = [
        ("rootfs.ext4", guest.join("tiny/rootfs.ext4")),
        ("work-seed.ext4", guest.join("tiny/work-seed.ext4")),
        ("image.json", meta.clone()),
    ];
    // The tiny image as scripts/pack-bundle packs it (sparse tar, signed).
    let tiny = pack_bundle(&guest.join("tiny"), root, &test);
    let mut foreign_files = tiny_files.to_vec();
    foreign_files.push(("etc/passwd", meta));
    let foreign = bundle(&root.join("bundles/foreign.tar.zst"), &foreign_files);

    let running = bangerd::core::VERSION;
    let good = channel(root, "good", running, running, &test.secret);
    let url = |p: &str| server.url(p);
    catalog(
        &good,
        "kernels",
        2,
        &[entry(
            "test-kernel",
            &url("bundles/kernel.tar.zst"),
            kernel.0,
            &kernel.1,
            None,
        )],
        "catalog:kernels serial:2",
        &test.secret,
    );
    let image = |name: &str, path: &str, size: u64, sha: &str| {
        entry(name, &url(path), size, sha, Some("test-kernel"))
    };
    let mut future = image("future", "bundles/tiny.tar.zst", tiny.0, &tiny.1);
    future["min_banger"] = "99.0.0".into();
    catalog(
        &good,
        "images",
        2,
        &[
            // Its first connection drops halfway: the pull resumes.
            image("tiny", "drop-once/bundles/tiny.tar.zst", tiny.0, &tiny.1),
            image("bad-sha", "bundles/tiny.tar.zst", tiny.0, &"00".repeat(32)),
            image("bad-size", "bundles/tiny.tar.zst", tiny.0 - 1, &tiny.1),
            image("cut", "truncated/bundles/tiny.tar.zst", tiny.0, &tiny.1),
            image("stalled", "hang/bundles/tiny.tar.zst", tiny.0, &tiny.1),
            image("foreign", "bundles/foreign.tar.zst", foreign.0, &foreign.1),
            // Past limits.image_max_gib where it is 1: never fetched.
            image("huge", "bundles/tiny.tar.zst", 2 << 30, &tiny.1),
            future,
        ],
        "catalog:images serial:2",
        &test.secret,
    );
    let config = format!(
        "[update]\nchannel = \"{}\"\nextra_keys = [\"{}\"]\nstall_timeout_secs = 2\n",
        server.url("good/"),
        test.public
    );
    Fixture {
        _keys: keys,
        web,
        server,
        config,
        tiny,
    }
}

/// `banger update --check`, which takes in the channel's catalogs.
fn take_catalogs(bed: &TestBed) {
    let out = bed.banger().args(["update", "--check"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("images catalog serial"),
        "{}",
        text(&out)
    );
}

fn pull(bed: &TestBed, name: &str) -> Output {
    bed.banger()
        .args(["--json", "image", "pull", name])
        .output()
        .unwrap()
}

#[test]
fn catalog_pulls_bring_kernel_and_image_and_refuse_bad_bundles() {
    let f = fixture();
    let bed = TestBed::start(Options {
        config_toml: Some(format!("{}[limits]\nimage_max_gib = 1\n", f.config)),
        ..Options::default()
    })
    .expect("test bed");
    take_catalogs(&bed);
    let state = bed.state_dir();

    // Two callers, one job.
    let call = || {
        let out = bed.busctl([
            "call",
            "org.banger.Manager",
            "/org/banger/Manager",
            "org.banger.Manager",
            "PullImage",
            "sa{sv}",
            "tiny",
            "0",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let first = call();
    let second = call();
    assert_eq!(first, second, "a second pull did not join the first");
    let job = first
        .trim_start_matches("o \"")
        .trim_end_matches('"')
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let out = bed
        .banger()
        .args(["--json", "job", "watch", &job])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "pull kernel test-kernel",
            "download",
            "unpack",
            "digest",
            "record"
        ],
        "{report}"
    );

    // The kernel came with it; the image is managed, with its meta.
    let show = |what: &str, name: &str| -> serde_json::Value {
        let out = bed
            .banger()
            .args(["--json", what, "show", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let kernel = show("kernel", "test-kernel");
    assert!(
        kernel["initrd"]
            .as_str()
            .is_some_and(|p| p.ends_with("initrd.img")),
        "{kernel}"
    );
    assert!(
        kernel["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{kernel}"
    );
    let image = show("image", "tiny");
    assert_eq!(image["managed"], true, "{image}");
    assert_eq!(image["kernel_name"], "test-kernel", "{image}");
    assert_eq!(image["init"], "/sbin/banger-init", "{image}");
    assert_eq!(image["services"][0]["port"], 22, "{image}");
    // Catalog names are the system's, whoever pulled them.
    assert_eq!(image["owner_uid"], 0, "{image}");
    assert_eq!(kernel["owner_uid"], 0, "{kernel}");
    let rootfs = PathBuf::from(image["rootfs"].as_str().unwrap());
    assert!(rootfs.starts_with(&state), "{}", rootfs.display());
    assert_eq!(
        std::fs::read(&rootfs).unwrap(),
        std::fs::read(artifacts_dir().join("tiny/rootfs.ext4")).unwrap()
    );
    // Its first connection dropped and it resumed with a range.
    let tiny_requests: Vec<_> = f
        .server
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("tiny.tar.zst"))
        .collect();
    assert_eq!(tiny_requests.len(), 2, "{tiny_requests:?}");
    assert_eq!(tiny_requests[1].range_from, Some(f.tiny.0 / 2));
    let available: serde_json::Value = serde_json::from_slice(
        &bed.banger()
            .args(["--json", "image", "list", "--available"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let tiny = available["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "tiny")
        .unwrap();
    assert_eq!(tiny["installed"], true, "{available}");

    // A second pull of something that is here is refused.
    let out = pull(&bed, "tiny");
    assert!(!out.status.success());
    assert!(text(&out).contains("already exists"), "{}", text(&out));

    // Each bad bundle is refused, says why, and leaves nothing behind.
    for (name, why) in [
        ("bad-sha", "does not match"),
        ("bad-size", "more than the"),
        ("cut", "the download stopped after"),
        ("stalled", "stalled"),
        ("foreign", "unexpected \\\"etc\\\""),
        ("future", "needs banger 99.0.0"),
        ("huge", "limits.image_max_gib"),
        ("nonesuch", "has no image nonesuch"),
    ] {
        let out = pull(&bed, name);
        let said = text(&out);
        eprintln!("{name}: {said}");
        assert!(!out.status.success(), "{name}: {said}");
        assert!(said.contains(why), "{name}: {said:?} lacks {why:?}");
        assert!(
            leftovers(&state).is_empty(),
            "{name}: {:?}",
            leftovers(&state)
        );
        let out = bed.banger().args(["image", "show", name]).output().unwrap();
        assert!(!out.status.success(), "{name} was recorded");
    }
    drop(f.web);
}

/// Unmounts (lazily) on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_pull_and_leaves_nothing() {
    let f = fixture();
    let mut bed = TestBed::start(Options {
        config_toml: Some(f.config.clone()),
        start_daemon: false,
        ..Options::default()
    })
    .expect("test bed");
    // A state directory too small for the tiny image (its rootfs alone
    // is bigger).
    let state = bed.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let img = bed.dir().join("state.img");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    };
    run(Command::new("truncate").args(["-s", "24M"]).arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&state));
    let _mount = Mount(state.clone());
    bed.start_daemon().expect("bangerd");
    take_catalogs(&bed);

    let out = pull(&bed, "tiny");
    let said = text(&out);
    eprintln!("full disk: {said}");
    assert!(!out.status.success(), "{said}");
    assert!(said.to_lowercase().contains("no space left"), "{said}");
    assert!(leftovers(&state).is_empty(), "{:?}", leftovers(&state));
    let out = bed
        .banger()
        .args(["image", "show", "tiny"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn vm_run_on_a_host_without_images_pulls_them_and_lands_in_the_vm() {
    let ns = NetNs::new("bgpull");
    let f = fixture_in(Some(ns.name()));
    let config = format!(
        "{}[network]\ntap_pool_size = 1\n[vm]\nvmm = \"qemu\"\naccel = \"tcg\"\n\
         default_image = \"tiny\"\nvcpus = 1\nmemory_mib = 256\ndisk_mib = 128\n\
         boot_timeout_secs = 150\n",
        f.config
    );
    let bed = TestBed::start(Options {
        config_toml: Some(config),
        netns: Some(ns.name().to_owned()),
        ..Options::default()
    })
    .expect("test bed");
    let home = tempfile::tempdir().unwrap();
    let banger = |args: &[&str]| {
        ns.command(bin_path("banger"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bed.bus_address())
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = banger(&["update", "--check"]);
    assert!(out.status.success(), "{}", text(&out));
    let images: serde_json::Value =
        serde_json::from_slice(&banger(&["--json", "image", "list"]).stdout).unwrap();
    assert_eq!(images.as_array().map(Vec::len), Some(0), "{images}");

    // No kernel, no image: `vm run` pulls both, shows it, boots, runs.
    let out = banger(&["vm", "run", "--rm", "--name", "pulled", "--", "uname", "-r"]);
    let said = text(&out);
    eprintln!("vm run:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("the default image is not here: pulling it from the catalog"),
        "{said}"
    );
    for stage in ["pull kernel test-kernel", "download", "unpack", "record"] {
        assert!(said.contains(&format!("✓ {stage}")), "no {stage} in {said}");
    }
    let release = std::fs::read_to_string(artifacts_dir().join("kernel/version")).unwrap();
    assert!(said.contains(release.trim()), "{said}");
    assert!(said.contains("deleted vm pulled"), "{said}");
    let image: serde_json::Value =
        serde_json::from_slice(&banger(&["--json", "image", "show", "tiny"]).stdout).unwrap();
    assert_eq!(image["managed"], true, "{image}");
    assert_eq!(image["kernel_name"], "test-kernel", "{image}");
}

/// Catalog names are the system's: a member may pull one (the catalog is
/// signed, so what arrives is what the administrator trusted), but what
/// lands is owned by the system, not by them, so they cannot delete or
/// replace it, and no one else's `vm run` can be steered by it.
#[test]
fn a_members_catalog_pull_is_the_systems() {
    let f = fixture();
    let bed = TestBed::start(Options {
        config_toml: Some(f.config.clone()),
        ..Options::default()
    })
    .expect("test bed");
    take_catalogs(&bed);
    let member = banger_testbed::TestUser::create_in_group("banger").unwrap();
    let _rules = bed
        .install_polkit_rule(
            &format!("50-banger-pull-{}", member.name()),
            include_str!("../../../packaging/50-banger.rules"),
        )
        .unwrap();
    let as_member = |args: &[&str]| {
        bed.banger_as(&member)
            .arg("--no-ask-password")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The rules file loads asynchronously: wait until it grants the pull.
    let pulled = banger_testbed::eventually(std::time::Duration::from_secs(15), || {
        let out = as_member(&["--json", "image", "pull", "tiny"]);
        (out.status.code() != Some(4)).then_some(out)
    })
    .expect("the rules never granted the pull");
    assert!(pulled.status.success(), "{}", text(&pulled));
    for what in ["image", "kernel"] {
        let name = if what == "image" {
            "tiny"
        } else {
            "test-kernel"
        };
        let out = as_member(&["--json", what, "show", name]);
        assert!(out.status.success(), "{}", text(&out));
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(shown["owner_uid"], 0, "{shown}");
        let out = as_member(&[what, "delete", name]);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    }
    let out = bed
        .banger()
        .args(["image", "show", "tiny"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
