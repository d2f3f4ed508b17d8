use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A minisign key pair made by the real tool: (secret key, public key).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PublicKey) {
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let out = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret)
        .output()
        .expect("run minisign (apt install minisign)");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&public).expect("public key");
    (secret, signed::parse_key(&text).expect("parse"))
}

/// `document` signed by `secret` with trusted comment `comment`.
fn sign(dir: &Path, secret: &Path, document: &[u8], comment: &str) -> String {
    let file = dir.join("doc.json");
    std::fs::write(&file, document).expect("write");
    let out = Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(secret)
        .args(["-t", comment, "-m"])
        .arg(&file)
        .output()
        .expect("run minisign");
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(dir.join("doc.json.minisig")).expect("signature")
}

fn entry(name: &str, kernel: Option<&str>) -> Entry {
    Entry {
        name: name.into(),
        version: "6.1.0-28".into(),
        arch: "x86_64".into(),
        description: "a test entry".into(),
        url: format!("https://releases.example/bundles/{name}.tar.zst"),
        size: 1234,
        sha256: "ab".repeat(32),
        kernel: kernel.map(Into::into),
        min_banger: "0.1.0".into(),
    }
}

fn catalog(kind: Kind, serial: u64) -> Catalog {
    let entries = match kind {
        Kind::Kernels => vec![entry("generic-6-1", None)],
        Kind::Images => vec![entry("debian-bookworm", Some("generic-6-1"))],
    };
    Catalog {
        schema: SCHEMA,
        kind,
        serial,
        entries,
    }
}

#[test]
fn the_embedded_catalogs_verify_with_the_release_key() {
    let key = signed::parse_key(signed::RELEASE_KEY).expect("release key");
    for kind in Kind::ALL {
        let (document, signature) = embedded(kind);
        let catalog = verify(kind, document, signature, std::slice::from_ref(&key))
            .unwrap_or_else(|e| panic!("{kind}: {e} (run scripts/sign-catalog)"));
        assert_eq!(catalog.kind, kind);
    }
}

#[test]
fn a_signed_catalog_verifies_and_tampering_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (secret, key) = keypair(tmp.path(), "test");
    let (rogue, _) = keypair(tmp.path(), "rogue");
    let keys = [key];
    let good = catalog(Kind::Images, 7);
    let document = serde_json::to_vec_pretty(&good).expect("json");
    let signature = sign(tmp.path(), &secret, &document, "catalog:images serial:7");
    assert_eq!(
        verify(Kind::Images, &document, &signature, &keys).expect("good"),
        good
    );

    // Altered after signing.
    let mut altered = document.clone();
    let at = altered.len() - 3;
    altered[at] = b' ';
    let e = verify(Kind::Images, &altered, &signature, &keys).expect_err("altered");
    assert!(matches!(e, CatalogError::Signature { .. }), "{e}");

    // Signed by a key banger does not trust.
    let signature_rogue = sign(tmp.path(), &rogue, &document, "catalog:images serial:7");
    let e = verify(Kind::Images, &document, &signature_rogue, &keys).expect_err("rogue");
    assert!(e.to_string().contains("does not verify"), "{e}");

    // A good signature that vouches for another serial or kind.
    for comment in [
        "catalog:images serial:8",
        "catalog:kernels serial:7",
        "serial:7",
    ] {
        let signature = sign(tmp.path(), &secret, &document, comment);
        let e = verify(Kind::Images, &document, &signature, &keys).expect_err(comment);
        assert!(matches!(e, CatalogError::Mismatch { .. }), "{comment}: {e}");
    }
    // An images catalog offered as the kernels catalog.
    let e = verify(Kind::Kernels, &document, &signature, &keys).expect_err("kind");
    assert!(matches!(e, CatalogError::Mismatch { .. }), "{e}");

    // Signed, but not a catalog.
    let junk = br#"{"schema": 1, "kind": "images"}"#;
    let signature = sign(tmp.path(), &secret, junk, "catalog:images serial:0");
    let e = verify(Kind::Images, junk, &signature, &keys).expect_err("junk");
    assert!(e.to_string().contains("not a catalog"), "{e}");
}

#[test]
fn entries_are_validated() {
    type Break = fn(&mut Catalog);
    let cases: [(Kind, Break, &str); 15] = [
        (Kind::Kernels, |c| c.schema = 2, "schema 2"),
        (
            Kind::Kernels,
            |c| c.entries[0].name = "Bad_Name".into(),
            "not a DNS label",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].name = "deadbeef".into(),
            "not a DNS label",
        ),
        (
            Kind::Kernels,
            |c| c.entries.push(c.entries[0].clone()),
            "listed twice",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].version = String::new(),
            "version",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].arch = "riscv".into(),
            "arch",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].description = "two\nlines".into(),
            "one line",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].url = "http://example.com/k.tar.zst".into(),
            "must be https",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].url = "https://u:p@example.com/k".into(),
            "must be https",
        ),
        (Kind::Kernels, |c| c.entries[0].size = 0, "size 0"),
        (
            Kind::Kernels,
            |c| c.entries[0].sha256 = "AB".repeat(32),
            "sha256",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].min_banger = "one".into(),
            "min_banger",
        ),
        (
            Kind::Kernels,
            |c| c.entries[0].kernel = Some("k".into()),
            "no kernel field",
        ),
        (
            Kind::Images,
            |c| c.entries[0].kernel = None,
            "kernel must name",
        ),
        (
            Kind::Images,
            |c| c.entries[0].kernel = Some("-x".into()),
            "kernel must name",
        ),
    ];
    for kind in Kind::ALL {
        validate(&catalog(kind, 1)).expect("a good catalog");
    }
    for (kind, break_it, want) in cases {
        let mut c = catalog(kind, 1);
        break_it(&mut c);
        let e = validate(&c).expect_err(want);
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
}

#[test]
fn loopback_http_is_allowed_for_bundles() {
    for ok in [
        "https://releases.example/b.tar.zst",
        "http://127.0.0.1:8080/b.tar.zst",
        "http://[::1]/b",
        "http://localhost:1/b",
    ] {
        assert!(bundle_url(ok), "{ok}");
    }
    for bad in [
        "http://10.0.0.1/b",
        "http://127.0.0.1.example/b",
        "ftp://127.0.0.1/b",
        "https://releases.example/b?x=1",
        "not a url",
    ] {
        assert!(!bundle_url(bad), "{bad}");
    }
}

#[test]
fn the_higher_serial_wins() {
    let old = catalog(Kind::Kernels, 3);
    let new = catalog(Kind::Kernels, 4);
    assert_eq!(newest(old.clone(), Some(new.clone())).serial, 4);
    assert_eq!(newest(new.clone(), Some(old.clone())).serial, 4);
    assert_eq!(newest(old.clone(), Some(old.clone())), old);
    assert_eq!(newest(old.clone(), None), old);
}

#[test]
fn min_banger_gates_entries() {
    let mut e = entry("k", None);
    e.min_banger = "0.2.0".into();
    assert!(!e.usable_by(&Version::new(0, 1, 9)));
    assert!(e.usable_by(&Version::new(0, 2, 0)));
}

/// The keys of a JSON object.
fn keys(value: &serde_json::Value) -> BTreeSet<String> {
    value.as_object().expect("object").keys().cloned().collect()
}

#[test]
fn schema_json_describes_what_the_parser_reads() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../schema.json")).expect("schema.json");
    let image = serde_json::to_value(catalog(Kind::Images, 1)).expect("json");
    assert_eq!(keys(&schema["properties"]), keys(&image));
    let entry = &image["entries"][0];
    let def = &schema["$defs"]["entry"];
    assert_eq!(keys(&def["properties"]), keys(entry));
    // Required: every field except the images-only kernel.
    let required: BTreeSet<String> = def["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|v| v.as_str().expect("name").to_owned())
        .collect();
    let kernel = serde_json::to_value(catalog(Kind::Kernels, 1)).expect("json");
    assert_eq!(required, keys(&kernel["entries"][0]));
    assert_eq!(def["properties"]["arch"]["enum"], serde_json::json!(ARCHES));
}
