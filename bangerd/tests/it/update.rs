//! `banger update` through the real daemon, bus and polkitd, against a
//! release channel served on loopback and signed with the real `minisign`
//! tool: a good release installs (and rolls back); a tampered artifact, a
//! signature by an untrusted key, a manifest whose version differs from
//! the signed one, a downgrade, a truncated download and a server that
//! hangs are each refused with a clear error and leave the releases
//! directory exactly as it was. (The daemon here is not under systemd, so
//! it reports that a restart is needed instead of restarting; the package
//! test covers the restart.)

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

use banger_testbed::output_text as text;
use banger_testbed::{FileServer, Options, TestBed, channel, keypair, tree_snapshot as snapshot};

const RELEASE: &str = "9.0.0";

fn update(bed: &TestBed, args: &[&str]) -> Output {
    bed.banger()
        .env("BANGER_TEST_MARK", bed.dir().join("handed-over"))
        .arg("update")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn signed_updates_install_roll_back_and_refuse_bad_releases() {
    let keys = tempfile::tempdir().unwrap();
    let test = keypair(keys.path(), "test");
    let (key, public) = (test.secret, test.public);
    let rogue = keypair(keys.path(), "rogue").secret;
    let web = tempfile::tempdir().unwrap();
    let root = web.path();
    channel(root, "good", RELEASE, RELEASE, &key);
    let tampered = channel(root, "tampered", RELEASE, RELEASE, &key);
    let mut bytes = std::fs::read(tampered.join(RELEASE).join("bangerd")).unwrap();
    bytes[20] ^= 1;
    std::fs::write(tampered.join(RELEASE).join("bangerd"), bytes).unwrap();
    channel(root, "wrongkey", RELEASE, RELEASE, &rogue);
    channel(root, "mismatch", RELEASE, "9.0.1", &key);
    channel(root, "downgrade", "0.0.1", "0.0.1", &key);
    // The server breaks the good channel's artifacts under these prefixes.
    let server = FileServer::start(root.to_owned());
    let url = |name: &str| match name {
        "truncated" | "hang" => server.url(&format!("{name}/good/")),
        _ => server.url(&format!("{name}/")),
    };

    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[update]\nchannel = \"{}\"\nextra_keys = [\"{public}\"]\nstall_timeout_secs = 2\n",
            url("good")
        )),
        ..Options::default()
    })
    .expect("test bed");
    let releases = bed.releases_dir();
    let before = snapshot(&releases);

    // Each bad release is refused, says why, and changes nothing.
    for (name, why) in [
        ("tampered", "does not match the signed"),
        ("wrongkey", "does not verify with banger's release key"),
        ("mismatch", "the signature vouches for version \"9.0.1\""),
        ("downgrade", "refusing a downgrade"),
        ("truncated", "the download stopped after"),
        ("hang", "the server stalled"),
    ] {
        let out = update(&bed, &["--channel", &url(name)]);
        let said = text(&out);
        assert!(!out.status.success(), "{name}: {said}");
        assert!(said.contains(why), "{name}: {said:?} lacks {why:?}");
        assert_eq!(snapshot(&releases), before, "{name} changed the releases");
    }

    // A check reports and changes nothing.
    let out = update(&bed, &["--check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("available {RELEASE}")),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&releases), before);

    // The good release lands as `current`, byte for byte.
    let out = update(&bed, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("to {RELEASE}; restart bangerd")),
        "{report}"
    );
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(
        stages.contains(&"download bangerd") && stages.contains(&"install"),
        "{stages:?}"
    );
    assert_eq!(
        std::fs::read_link(releases.join("current")).unwrap(),
        Path::new(RELEASE)
    );
    for binary in ["banger", "bangerd", "banger-agent"] {
        let installed = releases.join(RELEASE).join(binary);
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(root.join("good").join(RELEASE).join(binary)).unwrap()
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&installed).unwrap().permissions(),
        );
        assert_eq!(mode & 0o7777, 0o755, "{binary}");
    }
    let names: Vec<_> = std::fs::read_dir(&releases)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".staging")),
        "{names:?}"
    );

    // A bad release after a good one leaves the good one in place.
    let installed = snapshot(&releases);
    let out = update(&bed, &["--channel", &url("tampered")]);
    assert!(!out.status.success());
    assert_eq!(snapshot(&releases), installed);

    // The packaged CLI now hands over to the installed release, which
    // asks for the rollback: back to the packaged set, where a second
    // rollback has nothing to do.
    let out = update(&bed, &["--rollback"]);
    let ran = std::fs::read_to_string(bed.dir().join("handed-over")).unwrap_or_default();
    assert!(
        ran.contains("update --rollback"),
        "the CLI did not hand over: {ran:?}"
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rolled back from 9.0.0 to the packaged release"),
        "{}",
        text(&out)
    );
    assert!(std::fs::symlink_metadata(releases.join("current")).is_err());
    let out = update(&bed, &["--rollback"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("nothing to roll back to"),
        "{}",
        text(&out)
    );

    // Bad arguments are refused before any job starts.
    let out = update(&bed, &["--channel", "http://example.com/"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("loopback addresses only"),
        "{}",
        text(&out)
    );
}

/// One catalog entry of `kind`, for a listing.
fn entry(kind: &str, serial: u64) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "name": if kind == "kernels" { "generic-6-1" } else { "debian-bookworm" },
        "version": "2026.12.01",
        "arch": "x86_64",
        "description": format!("a test {kind} entry, serial {serial}"),
        "url": "http://127.0.0.1:9/bundle.tar.zst",
        "size": 4096,
        "sha256": "ab".repeat(32),
        "min_banger": "0.1.0",
    });
    if kind == "images" {
        entry["kernel"] = "generic-6-1".into();
    }
    entry
}

/// `dir/catalog/<kind>.json` with `serial` and one entry, signed by `key`
/// with the trusted comment `signed`.
fn catalog(dir: &Path, kind: &str, serial: u64, signed: &str, key: &Path) {
    banger_testbed::catalog(dir, kind, serial, &[entry(kind, serial)], signed, key);
}

fn available(bed: &TestBed, kind: &str) -> serde_json::Value {
    let out = bed
        .banger()
        .args([kind, "list", "--available", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn catalogs_are_replaced_only_by_newer_signed_ones() {
    let keys = tempfile::tempdir().unwrap();
    let test = keypair(keys.path(), "test");
    let rogue = keypair(keys.path(), "rogue").secret;
    let web = tempfile::tempdir().unwrap();
    let root = web.path();
    let running = bangerd::core::VERSION;
    // Channels at the running version: a check offers only their catalogs.
    let good = channel(root, "good", running, running, &test.secret);
    catalog(
        &good,
        "kernels",
        5,
        "catalog:kernels serial:5",
        &test.secret,
    );
    catalog(&good, "images", 3, "catalog:images serial:3", &test.secret);
    let bad = channel(root, "bad", running, running, &test.secret);
    catalog(&bad, "kernels", 9, "catalog:kernels serial:9", &rogue);
    catalog(&bad, "images", 9, "catalog:kernels serial:9", &test.secret);
    let old = channel(root, "old", running, running, &test.secret);
    catalog(&old, "kernels", 4, "catalog:kernels serial:4", &test.secret);
    let server = FileServer::start(root.to_owned());
    let url = |name: &str| server.url(&format!("{name}/"));
    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[update]\nchannel = \"{}\"\nextra_keys = [\"{}\"]\n",
            url("good"),
            test.public
        )),
        ..Options::default()
    })
    .expect("test bed");

    // The built-in catalogs to begin with, open to everyone.
    let before = available(&bed, "kernel");
    assert_eq!(before["source"], "built-in", "{before}");
    let built_in_serial = before["serial"].as_u64().unwrap();
    assert!(built_in_serial < 3, "{before}");

    // Refused: a catalog signed by an unknown key, one whose signature
    // names another kind. The check itself still succeeds.
    let out = update(&bed, &["--check", "--channel", &url("bad")]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    eprintln!("bad catalogs: {said}");
    assert!(
        said.contains("kept the kernels catalog") && said.contains("does not verify"),
        "{said}"
    );
    assert!(
        said.contains("kept the images catalog") && said.contains("passed off as another"),
        "{said}"
    );
    assert_eq!(available(&bed, "kernel"), before);

    // Taken: newer and signed by a trusted key.
    let out = update(&bed, &["--check"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("kernels catalog serial {built_in_serial} -> 5"))
            && said.contains("images catalog serial"),
        "{said}"
    );
    let kernels = available(&bed, "kernel");
    assert_eq!(kernels["source"], "fetched", "{kernels}");
    assert_eq!(kernels["serial"], 5);
    assert_eq!(kernels["entries"][0]["name"], "generic-6-1");
    assert_eq!(kernels["entries"][0]["installed"], false);
    assert_eq!(kernels["entries"][0]["usable"], true);
    assert_eq!(kernels["entries"][0]["kernel"], serde_json::Value::Null);
    let images = available(&bed, "image");
    assert_eq!(images["serial"], 3);
    assert_eq!(images["entries"][0]["kernel"], "generic-6-1");
    let human = bed
        .banger()
        .args(["image", "list", "--available"])
        .output()
        .unwrap();
    let human = text(&human);
    eprintln!("{human}");
    assert!(
        human.contains("images catalog serial 3 (fetched)") && human.contains("debian-bookworm"),
        "{human}"
    );

    // Not taken: an older serial, however well signed.
    let out = update(&bed, &["--check", "--channel", &url("old")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("catalog serial"), "{}", text(&out));
    assert_eq!(available(&bed, "kernel")["serial"], 5);

    // A kept catalog altered on disk is ignored: the built-in one is back.
    let kept = bed.state_dir().join("catalog/kernels.json");
    let mut bytes = std::fs::read(&kept).unwrap();
    let at = bytes.iter().position(|b| *b == b'5').unwrap();
    bytes[at] = b'7';
    std::fs::write(&kept, bytes).unwrap();
    assert_eq!(available(&bed, "kernel"), before);

    // An unknown catalog is a clear error.
    let out = bed.busctl([
        "call",
        "org.banger.Manager",
        "/org/banger/Manager",
        "org.banger.Manager",
        "ListAvailable",
        "s",
        "firmware",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown catalog"), "{}", text(&out));
}
