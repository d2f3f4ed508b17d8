//! The sandbox e2fsprogs run in when they parse a user's or a guest's
//! file system (`bangerd::os::sandbox`): the real helper (the bangerd
//! binary), the real tools, started as bangerd starts them where systemd
//! is not PID 1 (`steps::Direct`; the nspawn tier runs the systemd way
//! with every VM it makes). Needs root.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use banger_formats::tool::{Tool, Tools, Unconfined};
use banger_testbed::bin_path;
use bangerd::artifacts::build::steps::Direct;
use bangerd::os::sandbox::{IDS, Sandboxed};

/// The sandboxed runner, and the runtime its steps run on (to be kept).
fn sandboxed() -> (tokio::runtime::Runtime, Sandboxed) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tools = {
        let _on = rt.enter();
        Sandboxed::new(Arc::new(Direct), bin_path("bangerd"))
    };
    (rt, tools)
}

fn root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// The work-seed's scratch copy is gone from `dir`.
fn no_scratch_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("scratch"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image whose /root holds a symlink `DUPLICATEA` to `target`
/// (a host path) and then a regular file of the same name holding
/// `PLANTED`: two directory entries with one name, which `debugfs rdump`
/// writes out in order, the file through the link. Made with debugfs,
/// then one entry's name patched in place (no metadata checksums: the
/// attacker picks the features).
fn crafted(dir: &Path, target: &Path, extra: &str) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("root")).unwrap();
    let rootfs = dir.join("crafted.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^metadata_csum", "-d"])
        .arg(&tree)
        .arg(&rootfs)
        .arg("16M"));
    let payload = dir.join("payload");
    std::fs::write(&payload, b"PLANTED\n").unwrap();
    let script = dir.join("craft");
    std::fs::write(
        &script,
        format!(
            "symlink /root/DUPLICATEA {}\nwrite {} /root/DUPLICATEB\n{extra}",
            target.display(),
            payload.display()
        ),
    )
    .unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&rootfs));
    let mut bytes = std::fs::read(&rootfs).unwrap();
    let at = bytes
        .windows(10)
        .position(|w| w == b"DUPLICATEB")
        .expect("the entry's name in the image");
    bytes[at..at + 10].copy_from_slice(b"DUPLICATEA");
    std::fs::write(&rootfs, &bytes).unwrap();
    let listing = Command::new("debugfs")
        .args(["-R", "ls /root"])
        .arg(&rootfs)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(
        listing.matches("DUPLICATEA").count(),
        2,
        "two entries of one name: {listing}"
    );
    rootfs
}

#[test]
fn a_crafted_root_cannot_write_outside_its_scratch_directory() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.join("planted");
    let rootfs = crafted(dir.path(), &target, "");

    // Unconfined (as bangerd ran it, as root), the attack works: the
    // file lands where the link points.
    banger_formats::files::make_work_seed(&Unconfined, &rootfs, &dir.path().join("seed-1.ext4"))
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"PLANTED\n");
    std::fs::remove_file(&target).unwrap();

    // Sandboxed, the link points at nothing there is.
    let (_rt, tools) = sandboxed();
    let before = std::fs::read(&rootfs).unwrap();
    let seed = dir.path().join("seed-2.ext4");
    banger_formats::files::make_work_seed(&tools, &rootfs, &seed).unwrap();
    assert!(!target.exists(), "the crafted image wrote outside");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // The seed holds the link (a link is data), owned by root as in the
    // image; the image was only read and is root's again.
    let out = Command::new("debugfs")
        .args(["-R", "stat /DUPLICATEA"])
        .arg(&seed)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Type: symlink") && text.contains("User:     0"),
        "{text}"
    );
    assert_eq!(std::fs::read(&rootfs).unwrap(), before);
    let meta = std::fs::metadata(&rootfs).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    let seed_meta = std::fs::metadata(&seed).unwrap();
    assert_eq!((seed_meta.uid(), seed_meta.gid()), (0, 0));
    no_scratch_left(dir.path());
}

#[test]
fn a_huge_sparse_file_stops_at_the_images_size() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("small");
    std::fs::write(&payload, b"x").unwrap();
    // 64 GiB said, 1 byte held: rdump writes the zeros out.
    let rootfs = crafted(
        dir.path(),
        &dir.path().join("nowhere"),
        &format!(
            "write {} /root/big\nsif /root/big size 0x1000000000\n",
            payload.display()
        ),
    );
    let (_rt, tools) = sandboxed();
    let seed = dir.path().join("seed.ext4");
    let started = std::time::Instant::now();
    let e = banger_formats::files::make_work_seed(&tools, &rootfs, &seed).unwrap_err();
    assert!(e.message.contains("debugfs failed"), "{}", e.message);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(!seed.exists(), "a failed seed is removed");
    no_scratch_left(dir.path());
}

/// What the tool is on the host: the sandbox's root (uid and gid
/// [`IDS`]), no capability beyond its namespace's file ones, no_new_privs,
/// its own network and user namespaces, and a view of the host that holds
/// only its files.
#[test]
fn the_tool_is_nobody_on_the_host_and_sees_only_its_files() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mode = std::fs::metadata(&work).unwrap().mode() & 0o7777;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"s").unwrap();
    let (_rt, tools) = sandboxed();
    let script = format!(
        "echo $$ > {w}/pid; echo made > {w}/made; chmod 6777 {w}; \
         for p in {s} /var/lib /root /home /etc/shadow /etc/passwd /proc/1; do \
           test -e $p && echo \"sees $p\"; done; \
         echo x > /etc/x 2>/dev/null && echo 'writes /etc'; \
         echo x > /usr/x 2>/dev/null && echo 'writes /usr'; \
         sleep 2; exit 7",
        w = work.display(),
        s = secret.display()
    );
    let runner = std::thread::spawn({
        let work = work.clone();
        move || {
            tools
                .run(&Tool::new("sh").arg("-c").arg(script).read_write(&work))
                .unwrap()
        }
    });
    let pid_file = work.join("pid");
    banger_testbed::eventually(std::time::Duration::from_secs(10), || {
        pid_file.exists().then_some(())
    })
    .expect("the tool started");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec![IDS.to_string(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![IDS.to_string(); 4], "{status}");
    assert_eq!(field("Groups:"), Vec::<&str>::new(), "{status}");
    // chown, dac_override, dac_read_search, fowner, fsetid: in its own
    // user namespace only.
    assert_eq!(field("CapEff:"), ["000000000000001f"], "{status}");
    assert_eq!(field("CapBnd:"), ["000000000000001f"], "{status}");
    assert_eq!(field("CapAmb:"), ["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    for ns in ["user", "net", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared");
    }
    let out = runner.join().unwrap();
    assert_eq!(out.code, Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{out:?}");
    // What it made belongs to the sandbox's root on the host; the
    // directory is handed back as it was, whatever the tool did to it.
    assert_eq!(std::fs::metadata(work.join("made")).unwrap().uid(), IDS);
    let meta = std::fs::metadata(&work).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, mode));
}

/// The tools bangerd runs on a work disk, sandboxed, do what they did
/// unconfined: make, grow, key it.
/// A tool that runs past its time is killed, and says so.
#[test]
fn a_tool_past_its_time_limit_is_killed() {
    if !root() {
        return;
    }
    let (_rt, tools) = sandboxed();
    let started = std::time::Instant::now();
    let e = tools
        .run(
            &Tool::new("sleep")
                .arg("30")
                .time_limit(std::time::Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(e.message.contains("ran longer than 1 s"), "{}", e.message);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Within its time it runs to its end.
    let out = tools
        .run(
            &Tool::new("sleep")
                .arg("0.2")
                .time_limit(std::time::Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(out.code, Some(0));
}

#[test]
fn a_work_disk_is_made_grown_and_keyed_in_the_sandbox() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("work.ext4");
    let (_rt, tools) = sandboxed();
    let keys = vec!["ssh-ed25519 AAAA one@host".to_owned()];
    bangerd::vm::disk::make_work_disk(&tools, None, &disk, 96 << 20, &keys).unwrap();
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 << 20);
    let cat = tools
        .check(
            &Tool::new("debugfs")
                .arg("-R")
                .arg("cat /.ssh/authorized_keys")
                .reads(&disk),
        )
        .unwrap();
    assert_eq!(cat.stdout, b"ssh-ed25519 AAAA one@host\n");
    bangerd::vm::disk::grow_ext4(&tools, &disk, 128 << 20).unwrap();
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let blocks: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(blocks * size, 128 << 20);
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    // Nothing of the keys' temporary files is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A tool that is not there is a clear error.
    let e = tools.run(&Tool::new("no-such-tool")).unwrap_err();
    assert!(e.message.contains("not installed"), "{}", e.message);
}
