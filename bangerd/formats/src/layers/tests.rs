use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// One entry of a test layer.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    /// Path, body, mode, uid, gid.
    Owned(&'a str, &'a [u8], u32, u64, u64),
    /// Path, body, xattr name, value.
    Xattr(&'a str, &'a [u8], &'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDev(&'a str),
}

/// A layer blob at `path` (gzip when `gzip`).
fn layer(path: &Path, gzip: bool, entries: &[E<'_>]) {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, p, std::io::empty()).expect("dir");
            }
            E::File(p, body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(body.len() as u64);
                // The name as it is: the tar crate refuses `..` and `/`.
                let raw = &mut h.as_old_mut().name;
                raw[..p.len()].copy_from_slice(p.as_bytes());
                h.set_cksum();
                tar.append(&h, *body).expect("file");
            }
            E::Owned(p, body, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(body.len() as u64);
                tar.append_data(&mut h, p, *body).expect("owned");
            }
            E::Xattr(p, body, name, value) => {
                let key = format!("SCHILY.xattr.{name}");
                tar.append_pax_extensions([(key.as_str(), *value)])
                    .expect("pax");
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(body.len() as u64);
                tar.append_data(&mut h, p, *body).expect("xattr file");
            }
            E::Symlink(p, to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, p, to).expect("symlink");
            }
            E::HardLink(p, to) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                tar.append_link(&mut h, p, to).expect("hard link");
            }
            E::CharDev(p) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(1).expect("major");
                h.set_device_minor(3).expect("minor");
                tar.append_data(&mut h, p, std::io::empty()).expect("dev");
            }
        }
    }
    let bytes = tar.into_inner().expect("tar");
    if gzip {
        let file = std::fs::File::create(path).expect("create");
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).expect("gzip");
        gz.finish().expect("finish");
    } else {
        std::fs::write(path, bytes).expect("write");
    }
}

fn apply_all(root: &Path, blobs: &[PathBuf]) -> Result<()> {
    for (i, blob) in blobs.iter().enumerate() {
        apply(root, blob, i + 1, &mut |_| Ok(()))?;
    }
    Ok(())
}

#[test]
fn layers_apply_with_whiteouts_owners_modes_links_and_xattrs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let one = tmp.path().join("1.tar");
    let two = tmp.path().join("2.tar.gz");
    layer(
        &one,
        false,
        &[
            E::Dir("etc"),
            E::File("etc/keep", b"a file, then a directory"),
            E::File("etc/gone", b"whited out"),
            E::Dir("opq"),
            E::File("opq/a", b"a"),
            E::Dir("opq/sub"),
            E::File("opq/sub/b", b"b"),
            E::Dir("bin"),
            E::Owned("bin/tool", b"#!/bin/sh\n", 0o4755, 0, 0),
            E::HardLink("bin/tool2", "bin/tool"),
            E::Dir("home"),
            E::Owned("home/file", b"private", 0o640, 1000, 1001),
            E::Xattr("etc/labelled", b"x", "user.banger", b"yes"),
            E::Dir("usr"),
            E::Dir("usr/lib"),
            E::File("usr/lib/x", b"x"),
            E::Symlink("lib", "usr/lib"),
            E::CharDev("dev-null"),
        ],
    );
    layer(
        &two,
        true,
        &[
            // This layer's own entry comes before the marker and stays.
            E::File("opq/new", b"new"),
            E::File("opq/.wh..wh..opq", b""),
            E::File("etc/.wh.gone", b""),
            E::Dir("etc/keep"),
            E::File("etc/keep/inside", b"inside"),
        ],
    );
    apply_all(&root, &[one, two]).expect("applied");

    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).expect(p);
    assert!(!root.join("etc/gone").exists());
    assert_eq!(
        std::fs::read(root.join("etc/keep/inside")).expect("read"),
        b"inside"
    );
    let mut opq: Vec<_> = std::fs::read_dir(root.join("opq"))
        .expect("opq")
        .map(|e| e.expect("entry").file_name())
        .collect();
    opq.sort();
    assert_eq!(opq, ["new"]);
    assert_eq!(meta("bin/tool").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("bin/tool").ino(), meta("bin/tool2").ino());
    assert_eq!(meta("bin/tool").nlink(), 2);
    let home = meta("home/file");
    assert_eq!((home.uid(), home.gid()), (1000, 1001));
    assert_eq!(home.permissions().mode() & 0o7777, 0o640);
    assert_eq!(
        xattr::get(root.join("etc/labelled"), "user.banger").expect("xattr"),
        Some(b"yes".to_vec())
    );
    assert_eq!(
        std::fs::read_link(root.join("lib")).expect("link"),
        Path::new("usr/lib")
    );
    assert_eq!(meta("usr/lib/x").mtime(), 1_700_000_000);
    assert!(!root.join("dev-null").exists(), "device nodes are skipped");
}

#[test]
fn layers_that_reach_outside_the_root_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let cases: [(&[E<'_>], &str); 4] = [
        (&[E::File("../evil", b"x")], "plain relative path"),
        (&[E::File("/abs", b"x")], "plain relative path"),
        (
            &[
                E::Symlink("out", outside.to_str().expect("utf-8")),
                E::File("out/evil", b"x"),
            ],
            "through a symlink",
        ),
        (
            &[E::File("a", b"a"), E::HardLink("h", "../../etc/hostname")],
            "bad hard link",
        ),
    ];
    for (i, (entries, want)) in cases.into_iter().enumerate() {
        let root = tmp.path().join(format!("root{i}"));
        std::fs::create_dir(&root).expect("root");
        let blob = tmp.path().join(format!("{i}.tar"));
        layer(&blob, false, entries);
        let e = apply(&root, &blob, 1, &mut |_| Ok(())).expect_err(want);
        assert!(e.message.contains(want), "{want}: {}", e.message);
    }
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0);
}
