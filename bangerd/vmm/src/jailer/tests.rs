//! The jail against upstream's documented contract (`docs/jailer.md`:
//! usage, chroot layout, what the user must put in the chroot), on the
//! real file system (these tests run as root, as bangerd does).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::*;
use crate::jail::VMM_GROUP;
use crate::{Accel, VmPaths};

const UID: u32 = VMM_GROUP + 9;

/// A VM with real files under `dir`: kernel, initramfs, disks.
fn vm_in(dir: &Path) -> LaunchSpec {
    let paths = VmPaths::new(&dir.join("state"), &dir.join("run"), "0123456789abcdef");
    std::fs::create_dir_all(&paths.dir).expect("vm dir");
    std::fs::create_dir_all(&paths.run).expect("run dir");
    let kernels = dir.join("state/kernels");
    std::fs::create_dir_all(&kernels).expect("kernels");
    for (file, text) in [
        (kernels.join("vmlinux"), "kernel"),
        (kernels.join("initrd.img"), "initrd"),
        (paths.system_disk.clone(), "system"),
        (paths.work_disk.clone(), "work"),
    ] {
        std::fs::write(&file, text).expect("file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("mode");
    }
    LaunchSpec {
        id: "0123456789abcdef".into(),
        name: "web".into(),
        kernel: kernels.join("vmlinux"),
        initrd: Some(kernels.join("initrd.img")),
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        memory_mib: 256,
        system_disk: paths.system_disk.clone(),
        paths,
        net: None,
        accel: Accel::Kvm,
        confine: None,
        shares: Vec::new(),
        incoming: false,
    }
}

#[test]
fn the_arguments_are_the_documented_usage() {
    let paths = VmPaths::new(
        Path::new("/var/lib/banger"),
        Path::new("/run/banger"),
        "ab12",
    );
    let fc = Path::new("/usr/bin/firecracker");
    let layout = Layout::new(&paths, fc);
    // `<chroot_base>/<exec_file_name>/<id>/root`.
    assert_eq!(layout.base, Path::new("/var/lib/banger/vms/ab12/jail"));
    assert_eq!(
        layout.root,
        Path::new("/var/lib/banger/vms/ab12/jail/firecracker/ab12/root")
    );
    assert_eq!(
        layout.host(inside::API),
        Path::new("/var/lib/banger/vms/ab12/jail/firecracker/ab12/root/api.sock")
    );
    let args = super::args(&layout, fc, "ab12", UID, VMM_GROUP);
    let (ours, firecrackers) = args.split_at(args.iter().position(|a| a == "--").expect("--"));
    let pairs: Vec<(&str, &str)> = ours
        .chunks(2)
        .map(|c| (c[0].as_str(), c[1].as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("--id", "ab12"),
            ("--exec-file", "/usr/bin/firecracker"),
            ("--uid", UID.to_string().as_str()),
            ("--gid", VMM_GROUP.to_string().as_str()),
            ("--chroot-base-dir", "/var/lib/banger/vms/ab12/jail"),
        ]
    );
    // Firecracker's own: the API socket in the chroot; never `--id`,
    // which the jailer passes itself.
    assert_eq!(firecrackers, ["--", "--api-sock", "/api.sock"]);

    // What the jailer refuses is refused before it runs.
    check(fc, "0123456789abcdef").expect("a VM id");
    check(fc, "ab-12").expect("hyphens");
    assert!(matches!(
        check(Path::new("/usr/bin/fc"), "ab12"),
        Err(JailerError::ExecName(_))
    ));
    for bad in ["", "a_b", "a/b", &"a".repeat(65)] {
        assert!(matches!(check(fc, bad), Err(JailerError::Id(_))), "{bad:?}");
    }
}

#[test]
fn the_chroot_holds_links_of_the_vms_files_and_release_gives_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = vm_in(dir.path());
    let layout = Layout::new(&spec.paths, Path::new("/usr/bin/firecracker"));
    // A stale jail with a link out of it: removed, not followed.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::write(outside.join("keep"), "keep").expect("keep");
    std::fs::create_dir_all(&layout.root).expect("stale root");
    std::os::unix::fs::symlink(&outside, layout.root.join("evil")).expect("symlink");

    let nodes = prepare(&layout, &spec, UID, VMM_GROUP).expect("prepared");
    assert!(nodes.nodes.is_empty(), "a file system disk is linked");
    assert!(
        outside.join("keep").exists(),
        "the stale link was not followed"
    );
    assert!(!layout.root.join("evil").exists());
    let p = &spec.paths;
    for (original, name, owner) in [
        (spec.kernel.clone(), inside::KERNEL, 0),
        (spec.initrd.clone().expect("initrd"), inside::INITRD, 0),
        (p.system_disk.clone(), inside::SYSTEM_DISK, UID),
        (p.work_disk.clone(), inside::WORK_DISK, UID),
        (p.console_log.clone(), inside::CONSOLE, UID),
        (p.vmm_log.clone(), inside::LOG, UID),
    ] {
        let linked = std::fs::symlink_metadata(layout.host(name)).expect(name);
        let real = std::fs::metadata(&original).expect("original");
        assert!(linked.file_type().is_file(), "{name}");
        assert_eq!(
            (linked.dev(), linked.ino()),
            (real.dev(), real.ino()),
            "{name} is the VM's file itself"
        );
        assert_eq!(real.uid(), owner, "{name}");
        if owner == UID {
            assert_eq!(real.gid(), VMM_GROUP, "{name}");
            assert_eq!(real.mode() & 0o777, 0o600, "{name} stays private");
        }
    }

    let metrics = std::fs::symlink_metadata(layout.host(inside::METRICS)).expect("metrics");
    assert!(metrics.file_type().is_file());
    assert_eq!((metrics.uid(), metrics.mode() & 0o777), (UID, 0o600));

    release(p).expect("released");
    assert!(!Layout::base_of(p).exists());
    for file in [&p.system_disk, &p.work_disk, &p.console_log, &p.vmm_log] {
        let meta = std::fs::metadata(file).expect("still there");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", file.display());
    }
    // Nothing to release for an unjailed VM.
    release(p).expect("nothing");
}

#[test]
fn a_device_system_disk_becomes_a_node_that_jailer_exec_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = vm_in(dir.path());
    // A block device node standing for a device-mapper snapshot (loop0's
    // number; nothing opens it).
    let device = dir.path().join("dm-0");
    let rdev = nix::sys::stat::makedev(7, 0);
    nix::sys::stat::mknod(
        &device,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        rdev,
    )
    .expect("mknod");
    spec.system_disk = device;
    let layout = Layout::new(&spec.paths, Path::new("/usr/bin/firecracker"));
    let nodes = prepare(&layout, &spec, UID, VMM_GROUP).expect("prepared");
    let node = layout.host(inside::SYSTEM_DISK);
    assert_eq!(
        nodes.nodes,
        [Node {
            path: node.clone(),
            rdev,
            uid: UID,
            gid: VMM_GROUP,
        }]
    );
    assert!(!node.exists(), "bangerd makes no device node itself");

    // The helper runs in the jailer's place and then execs it.
    let (program, argv) = command(
        Path::new("/usr/libexec/bangerd"),
        &nodes,
        Path::new("/usr/bin/jailer"),
        &["--id".into(), "x".into()],
    );
    assert_eq!(program, Path::new("/usr/libexec/bangerd"));
    assert_eq!(argv[0], HELPER_ARG);
    assert_eq!(
        serde_json::from_str::<Nodes>(&argv[1]).expect("spec"),
        nodes
    );
    assert_eq!(argv[2..], ["--", "/usr/bin/jailer", "--id", "x"]);
    let (program, argv) = command(
        Path::new("/usr/libexec/bangerd"),
        &Nodes { nodes: vec![] },
        Path::new("/usr/bin/jailer"),
        &["--id".into()],
    );
    assert_eq!(
        (program.as_path(), argv),
        (Path::new("/usr/bin/jailer"), vec!["--id".to_owned()])
    );

    // A stale file in the node's place is replaced.
    std::fs::write(&node, "stale").expect("stale");
    make_nodes(&nodes).expect("made");
    let meta = std::fs::symlink_metadata(&node).expect("node");
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.rdev(), rdev);
    assert_eq!((meta.uid(), meta.gid()), (UID, VMM_GROUP));
    assert_eq!(meta.mode() & 0o7777, 0o600);

    // `jailer-exec` says what is wrong with what it is given.
    assert!(exec(&["{}".into()]).contains("usage"));
    assert!(
        exec(&["nope".into(), "--".into(), "/bin/true".into()]).contains("bad jailer-exec spec")
    );
    release(&spec.paths).expect("released");
    assert!(!node.exists());
}

#[test]
fn a_kernel_on_another_file_system_is_copied_with_its_owner_and_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = vm_in(dir.path());
    let elsewhere = tempfile::tempdir_in("/dev/shm").expect("tmpfs");
    let kernel = elsewhere.path().join("vmlinux");
    std::fs::write(&kernel, "kernel").expect("kernel");
    std::os::unix::fs::lchown(&kernel, Some(0), Some(VMM_GROUP)).expect("group");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o640)).expect("mode");
    spec.kernel = kernel.clone();
    let layout = Layout::new(&spec.paths, Path::new("/usr/bin/firecracker"));
    prepare(&layout, &spec, UID, VMM_GROUP).expect("prepared");
    let copy = std::fs::symlink_metadata(layout.host(inside::KERNEL)).expect("kernel");
    let real = std::fs::metadata(&kernel).expect("original");
    assert_ne!(copy.dev(), real.dev(), "another file system");
    assert_eq!(
        (copy.uid(), copy.gid(), copy.mode() & 0o7777),
        (0, VMM_GROUP, 0o640)
    );
    assert_eq!(
        std::fs::read(layout.host(inside::KERNEL)).expect("read"),
        b"kernel"
    );
    release(&spec.paths).expect("released");
}
