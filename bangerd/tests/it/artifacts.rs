//! Kernels and images through the real daemon on the test bed: import,
//! register, promote, delete, the refusals, and cleanup after failures.
//! Needs root.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_dbus::proxy::{ImageProxy, JobProxy, KernelProxy, ManagerProxy};
use banger_dbus::{Error as WireError, ServicePort};
use banger_testbed::{Options, TestBed, TestUser, mkfs_ext4, output_text as text, tiny_vmlinux};
use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, Variant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bed(extra: &str) -> TestBed {
    TestBed::start(Options {
        config_toml: Some(format!("[daemon]\njob_retention_secs = 30\n{extra}")),
        ..Options::default()
    })
    .expect("test bed")
}

async fn connect(bed: &TestBed) -> Connection {
    zbus::connection::Builder::address(bed.bus_address())
        .build()
        .await
        .unwrap()
}

async fn job_signals(conn: &Connection) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface(banger_dbus::JOB_INTERFACE)
        .member("Completed")
        .build()
        .unwrap();
    MessageStream::for_match_rule(rule, conn, None)
        .await
        .unwrap()
}

/// (success, error name, message, result) of `job`.
async fn completed(
    stream: &mut MessageStream,
    job: &OwnedObjectPath,
) -> (bool, String, String, OwnedObjectPath) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await {
        let msg = msg.unwrap();
        if msg.header().path().map(|p| p.as_str()) == Some(job.as_str()) {
            return msg.body().deserialize().unwrap();
        }
    }
    panic!("job {job} did not complete within 60 s");
}

/// Files for a kernel and an image, in a directory every user can read.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path();
        std::fs::write(p.join("vmlinux"), tiny_vmlinux(8192)).unwrap();
        std::fs::write(p.join("initrd.img"), b"not really a cpio, but a file").unwrap();
        std::fs::create_dir_all(p.join("modules/kernel/drivers")).unwrap();
        std::fs::write(p.join("modules/modules.dep"), b"").unwrap();
        std::fs::write(p.join("modules/kernel/drivers/virtio.ko"), b"ko").unwrap();
        std::os::unix::fs::symlink("/usr/src/nowhere", p.join("modules/build")).unwrap();
        let tree = p.join("tree");
        std::fs::create_dir_all(tree.join("root/.config")).unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("root/.profile"), b"echo hi\n").unwrap();
        std::fs::write(tree.join("etc/os-release"), b"ID=test\n").unwrap();
        mkfs_ext4(&tree, &p.join("rootfs.ext4"), "32M").unwrap();
        std::fs::write(p.join("notes.txt"), b"hello").unwrap();
        for f in ["vmlinux", "initrd.img", "rootfs.ext4", "notes.txt"] {
            std::fs::set_permissions(p.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

fn opts<'a>(pairs: &'a [(&'a str, Variant<'a>)]) -> HashMap<&'a str, &'a Variant<'a>> {
    pairs.iter().map(|(k, v)| (*k, v)).collect()
}

async fn import_tiny(
    conn: &Connection,
    inputs: &Inputs,
    name: &str,
) -> Result<OwnedObjectPath, WireError> {
    let manager = ManagerProxy::new(conn).await.unwrap();
    let mut signals = job_signals(conn).await;
    let initrd = Variant::from(inputs.path("initrd.img"));
    let modules = Variant::from(inputs.path("modules"));
    let job = manager
        .import_kernel(
            name,
            &inputs.path("vmlinux"),
            opts(&[("initrd", initrd), ("modules", modules)]),
        )
        .await?;
    let (ok, err, msg, result) = completed(&mut signals, &job).await;
    assert!(ok, "import failed: {err}: {msg}");
    Ok(result)
}

fn state(bed: &TestBed, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(bed.state_dir().join(sub))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn kernel_import_makes_a_managed_kernel_object() {
    let bed = bed("");
    let inputs = Inputs::new();
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let path = import_tiny(&conn, &inputs, "tiny-elf").await.unwrap();
        let kernel = KernelProxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        let id = kernel.id().await.unwrap();
        assert_eq!(path.as_str(), format!("/org/banger/Manager/kernel/{id}"));
        assert_eq!(kernel.name().await.unwrap(), "tiny-elf");
        assert_eq!(kernel.bz_image().await.unwrap(), "", "an ELF was imported");
        let vmlinux = PathBuf::from(kernel.vmlinux().await.unwrap());
        assert!(vmlinux.starts_with(bed.state_dir().join("kernels").join(&id)));
        assert_eq!(std::fs::read(&vmlinux).unwrap(), tiny_vmlinux(8192));
        let modules = PathBuf::from(kernel.modules().await.unwrap());
        assert_eq!(
            std::fs::read(modules.join("kernel/drivers/virtio.ko")).unwrap(),
            b"ko"
        );
        assert!(
            std::fs::symlink_metadata(modules.join("build"))
                .unwrap()
                .is_symlink()
        );
        let initrd = kernel.initrd().await.unwrap();
        assert_eq!(
            std::fs::read(initrd).unwrap(),
            b"not really a cpio, but a file"
        );
        let sha = kernel.sha256().await.unwrap();
        let want = std::process::Command::new("sha256sum")
            .arg(&vmlinux)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&want.stdout).starts_with(&sha),
            "sha256 {sha}"
        );
        assert_eq!(kernel.owner_uid().await.unwrap(), 0);

        // The job's stages carry timings.
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let mut signals = job_signals(&conn).await;
        let job = manager
            .import_kernel("second", &inputs.path("vmlinux"), HashMap::new())
            .await
            .unwrap();
        completed(&mut signals, &job).await;
        let stages: Vec<String> = JobProxy::builder(&conn)
            .path(job)
            .build()
            .await
            .unwrap()
            .stages()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.stage)
            .collect();
        assert_eq!(stages, ["copy vmlinux", "digest", "record"]);
    });
    assert_eq!(
        state(&bed, "kernels").len(),
        2,
        "no leftovers: {:?}",
        state(&bed, "kernels")
    );
}

#[test]
fn bad_kernel_imports_get_typed_errors_and_leave_nothing() {
    let bed = bed("");
    let inputs = Inputs::new();
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let vmlinux = inputs.path("vmlinux");
        type Case<'a> = (&'a str, String, Vec<(&'a str, Variant<'a>)>, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("Bad_Name", vmlinux.clone(), vec![], "DNS label"),
            ("k", "relative/vmlinux".into(), vec![], "relative"),
            ("k", inputs.path("missing"), vec![], "does not exist"),
            ("k", inputs.path("modules"), vec![], "not a regular file"),
            ("k", inputs.path("notes.txt"), vec![], "vmlinux"),
            (
                "k",
                vmlinux.clone(),
                vec![("initrd", Variant::from(7u32))],
                "(s)",
            ),
            (
                "k",
                vmlinux.clone(),
                vec![("initrd", Variant::from(inputs.path("missing")))],
                "does not exist",
            ),
            (
                "k",
                vmlinux.clone(),
                vec![("modules", Variant::from(vmlinux.clone()))],
                "not a directory",
            ),
            (
                "k",
                vmlinux.clone(),
                vec![("cmdline", Variant::from("x"))],
                "unknown option",
            ),
        ];
        for (name, path, options, needle) in cases {
            let err = manager
                .import_kernel(name, &path, opts(&options))
                .await
                .expect_err(needle);
            assert!(
                matches!(&err, WireError::InvalidArgument(m) if m.contains(needle)),
                "{name} {path}: want InvalidArgument with {needle:?}, got {err:?}"
            );
        }
        import_tiny(&conn, &inputs, "k").await.unwrap();
        let err = manager
            .import_kernel("k", &vmlinux, HashMap::new())
            .await
            .expect_err("duplicate");
        assert!(matches!(err, WireError::AlreadyExists(_)), "{err:?}");
    });
    assert_eq!(
        state(&bed, "kernels").len(),
        1,
        "{:?}",
        state(&bed, "kernels")
    );
}

#[test]
fn image_register_promote_and_delete_with_refusals() {
    let bed = bed("");
    let inputs = Inputs::new();
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let kernel_path = import_tiny(&conn, &inputs, "k1").await.unwrap();

        // Refusals first.
        let rootfs = inputs.path("rootfs.ext4");
        let err = manager
            .register_image("img", &inputs.path("notes.txt"), "k1", HashMap::new())
            .await
            .expect_err("not ext4");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("ext4")),
            "{err:?}"
        );
        let err = manager
            .register_image("img", &rootfs, "nokernel", HashMap::new())
            .await
            .expect_err("no kernel");
        assert!(
            matches!(&err, WireError::NotFound(m) if m.contains("kernel list")),
            "{err:?}"
        );
        let bad = [("services", Variant::from(vec!["ssh".to_owned()]))];
        let err = manager
            .register_image("img", &rootfs, "k1", opts(&bad))
            .await
            .expect_err("bad service");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("name:port")),
            "{err:?}"
        );

        let good = [
            (
                "services",
                Variant::from(vec!["ssh:22".to_owned(), "opencode:4096".to_owned()]),
            ),
            ("init", Variant::from("/sbin/banger-init")),
        ];
        let path = manager
            .register_image("img", &rootfs, "k1", opts(&good))
            .await
            .unwrap();
        let image = ImageProxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        assert!(!image.managed().await.unwrap());
        assert_eq!(image.rootfs().await.unwrap(), rootfs);
        assert_eq!(image.work_seed().await.unwrap(), "");
        assert_eq!(image.kernel().await.unwrap(), kernel_path);
        assert_eq!(
            image.services().await.unwrap(),
            vec![
                ServicePort {
                    name: "ssh".into(),
                    port: 22
                },
                ServicePort {
                    name: "opencode".into(),
                    port: 4096
                }
            ]
        );
        let err = manager
            .register_image("img", &rootfs, "k1", HashMap::new())
            .await
            .expect_err("dup");
        assert!(matches!(err, WireError::AlreadyExists(_)), "{err:?}");

        // The kernel is in use now.
        let err = manager.delete_kernel("k1").await.expect_err("in use");
        assert!(
            matches!(&err, WireError::Busy(m) if m.contains("img")),
            "{err:?}"
        );

        // Promote: copied, work-seed made from the rootfs's /root.
        let mut signals = job_signals(&conn).await;
        let job = manager.promote_image("img").await.unwrap();
        let (ok, name, msg, result) = completed(&mut signals, &job).await;
        assert!(ok, "{name}: {msg}");
        assert_eq!(result, path);
        assert!(image.managed().await.unwrap());
        let managed_rootfs = PathBuf::from(image.rootfs().await.unwrap());
        assert!(managed_rootfs.starts_with(bed.state_dir().join("images")));
        assert_eq!(
            std::fs::read(&managed_rootfs).unwrap(),
            std::fs::read(&rootfs).unwrap()
        );
        let seed = PathBuf::from(image.work_seed().await.unwrap());
        let listing = std::process::Command::new("debugfs")
            .args(["-R", "ls /"])
            .arg(&seed)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.contains(".profile") && listing.contains(".config"),
            "{listing}"
        );
        assert_eq!(image.work_seed_sha256().await.unwrap().len(), 64);
        let err = manager.promote_image("img").await.expect_err("twice");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("already managed")),
            "{err:?}"
        );

        // Delete the image (its files go), then the kernel is free.
        manager.delete_image("img").await.unwrap();
        assert!(!managed_rootfs.exists());
        assert!(
            std::fs::metadata(&rootfs).is_ok(),
            "the user's own file is untouched"
        );
        let err = manager.delete_image("img").await.expect_err("gone");
        assert!(matches!(err, WireError::NotFound(_)), "{err:?}");
        manager.delete_kernel("k1").await.unwrap();
        assert!(
            KernelProxy::builder(&conn)
                .path(kernel_path)
                .build()
                .await
                .unwrap()
                .name()
                .await
                .is_err()
        );
    });
    assert!(
        state(&bed, "images").is_empty(),
        "{:?}",
        state(&bed, "images")
    );
    assert!(
        state(&bed, "kernels").is_empty(),
        "{:?}",
        state(&bed, "kernels")
    );
}

#[test]
fn failed_and_cancelled_promotes_leave_nothing_behind() {
    // Slow stages so the cancel lands mid-job.
    let bed = bed("[debug]\njob_stage_delay_ms = 1500\n");
    let inputs = Inputs::new();
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        import_tiny(&conn, &inputs, "k").await.unwrap();
        let copy = inputs.path("doomed.ext4");
        std::fs::copy(inputs.path("rootfs.ext4"), &copy).unwrap();
        manager
            .register_image("doomed", &copy, "k", HashMap::new())
            .await
            .unwrap();
        manager
            .register_image(
                "cancelled",
                &inputs.path("rootfs.ext4"),
                "k",
                HashMap::new(),
            )
            .await
            .unwrap();

        // The rootfs vanishes after registration: the copy fails.
        std::fs::remove_file(&copy).unwrap();
        let mut signals = job_signals(&conn).await;
        let job = manager.promote_image("doomed").await.unwrap();
        let (ok, name, msg, _) = completed(&mut signals, &job).await;
        assert!(!ok);
        assert_eq!(name, "org.banger.Error.Failed", "{msg}");
        assert!(msg.contains("doomed.ext4"), "{msg}");

        let job = manager.promote_image("cancelled").await.unwrap();
        // A second promote of the same image while the first runs is Busy.
        let err = manager.promote_image("cancelled").await.expect_err("busy");
        assert!(matches!(err, WireError::Busy(_)), "{err:?}");
        let err = manager.delete_image("cancelled").await.expect_err("busy");
        assert!(matches!(err, WireError::Busy(_)), "{err:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        JobProxy::builder(&conn)
            .path(job.clone())
            .build()
            .await
            .unwrap()
            .cancel()
            .await
            .unwrap();
        let (ok, name, _, _) = completed(&mut signals, &job).await;
        assert!(!ok);
        assert_eq!(name, "org.banger.Error.Cancelled");

        // Both are still unmanaged and usable.
        for name in ["doomed", "cancelled"] {
            let path = banger_dbus::image_path(&bed_image_id(&conn, name).await);
            let image = ImageProxy::builder(&conn).path(path).build().await.unwrap();
            assert!(!image.managed().await.unwrap(), "{name}");
        }
        manager.delete_image("cancelled").await.unwrap();
    });
    // Give a cancelled blocking copy a moment to notice, then look.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        state(&bed, "images").is_empty(),
        "leftovers: {:?}",
        state(&bed, "images")
    );
}

/// The id of the image named `name`, from the ObjectManager.
async fn bed_image_id(conn: &Connection, name: &str) -> String {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination("org.banger.Manager")
        .path("/org/banger/Manager")
        .build()
        .await
        .unwrap();
    let objects = om.get_managed_objects().await.unwrap();
    for (path, ifaces) in objects {
        if let Some(props) = ifaces.get(banger_dbus::IMAGE_INTERFACE) {
            let n: String = props
                .get("Name")
                .unwrap()
                .try_clone()
                .unwrap()
                .try_into()
                .unwrap();
            if n == name {
                return banger_dbus::parse_image_path(path.as_str())
                    .unwrap()
                    .to_owned();
            }
        }
    }
    panic!("no image {name}");
}

#[test]
fn restart_republishes_objects_and_removes_half_made_files() {
    let mut bed = bed("");
    let inputs = Inputs::new();
    let rt = runtime();
    let kernel_path = rt.block_on(async {
        let conn = connect(&bed).await;
        import_tiny(&conn, &inputs, "survivor").await.unwrap()
    });
    // What a daemon killed mid-import leaves behind.
    bed.kill_daemon();
    let kernels = bed.state_dir().join("kernels");
    std::fs::create_dir_all(kernels.join(".tmp-0123456789abcdef/modules")).unwrap();
    std::fs::create_dir_all(kernels.join("feedfacefeedface")).unwrap();
    bed.start_daemon().unwrap();
    rt.block_on(async {
        let conn = connect(&bed).await;
        let kernel = KernelProxy::builder(&conn)
            .path(kernel_path)
            .build()
            .await
            .unwrap();
        assert_eq!(kernel.name().await.unwrap(), "survivor");
        assert!(Path::new(&kernel.vmlinux().await.unwrap()).exists());
    });
    assert_eq!(
        state(&bed, "kernels").len(),
        1,
        "{:?}",
        state(&bed, "kernels")
    );
}

#[test]
fn users_need_polkit_and_pass_descriptors() {
    let bed = bed("");
    let inputs = Inputs::new();
    let user = TestUser::create().expect("user");
    let gdbus_import = |kernel: &str| {
        bed.command_as(&user, "gdbus")
            .args([
                "call",
                "--system",
                "--dest",
                "org.banger.Manager",
                "--object-path",
                "/org/banger/Manager",
                "--method",
                "org.banger.Manager.ImportKernel",
                "mine",
                kernel,
                "{}",
            ])
            .output()
            .unwrap()
    };
    let out = gdbus_import(&inputs.path("vmlinux"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // polkit would have to ask an admin, and gdbus did not allow a prompt.
    assert!(
        stderr.contains("InteractiveAuthorizationRequired") || stderr.contains("PermissionDenied"),
        "{stderr}"
    );

    let _rule = bed
        .install_polkit_rule(
            "image-manage",
            &format!(
                "polkit.addRule(function(action, subject) {{ if (action.id == \"org.banger.image.manage\" && subject.user == \"{}\") return polkit.Result.YES; }});",
                user.name()
            ),
        )
        .unwrap();
    // Allowed by polkit, but a path is refused: bangerd opens paths for
    // root only, whatever the file's mode.
    let refused = banger_testbed::eventually(Duration::from_secs(10), || {
        let out = gdbus_import(&inputs.path("vmlinux"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.contains("takes host paths").then_some(stderr)
    });
    let stderr = refused.expect("a path from a user is refused");
    assert!(
        stderr.contains("org.banger.Error.PermissionDenied") && stderr.contains("ImportKernelFd"),
        "{stderr}"
    );
    // Through the CLI, which opens the files as the user: a root-only
    // initrd cannot even be opened, so nothing reaches bangerd.
    let secret = inputs.path("secret");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cli = |extra: &[&str]| {
        let mut cmd = bed.banger_as(&user);
        cmd.args(["--no-ask-password", "kernel", "import", "--name", "mine"])
            .args(["--kernel", &inputs.path("vmlinux")])
            .args(extra);
        cmd.output().unwrap()
    };
    let out = cli(&["--initrd", &secret]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out)
    );
    assert!(state(&bed, "kernels").iter().all(|n| n.starts_with('.')));
    let out = cli(&["--initrd", &inputs.path("initrd.img")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(state(&bed, "kernels").iter().any(|n| !n.starts_with('.')));
}

#[test]
fn kernel_and_image_objects_serve_the_checked_in_interfaces() {
    let bed = bed("");
    let inputs = Inputs::new();
    let (kernel, image) = runtime().block_on(async {
        let conn = connect(&bed).await;
        let kernel = import_tiny(&conn, &inputs, "k").await.unwrap();
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let image = manager
            .register_image("i", &inputs.path("rootfs.ext4"), "k", HashMap::new())
            .await
            .unwrap();
        (kernel, image)
    });
    for (path, iface) in [
        (kernel.as_str(), banger_dbus::KERNEL_INTERFACE),
        (image.as_str(), banger_dbus::IMAGE_INTERFACE),
    ] {
        let out = bed.busctl(["--xml-interface", "introspect", "org.banger.Manager", path]);
        assert!(out.status.success());
        let served = banger_dbus::interface_element(&String::from_utf8_lossy(&out.stdout), iface)
            .expect("served");
        let (_, file) = banger_dbus::INTERFACE_XML
            .iter()
            .find(|(n, _)| *n == iface)
            .expect("checked in");
        assert_eq!(
            served,
            banger_dbus::interface_element(file, iface).expect("in file"),
            "the served {iface} drifted from dbus/interfaces/{iface}.xml"
        );
    }
}

/// The real Debian cloud kernel from `scripts/build-test-kernel`: imported
/// as a bzImage (the vmlinux is extracted), then that vmlinux imported again
/// as an ELF. Both must look like something Firecracker's loader takes.
#[test]
fn real_debian_kernel_imports_as_bzimage_and_as_extracted_elf() {
    let vmlinuz = banger_testbed::guest_artifact("kernel/vmlinuz", "build-test-kernel");
    let initrd = banger_testbed::guest_artifact("kernel/initrd.img", "build-test-kernel");
    let bed = bed("");
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let mut signals = job_signals(&conn).await;
        let initrd = Variant::from(initrd.to_string_lossy().into_owned());
        let job = manager
            .import_kernel(
                "debian",
                &vmlinuz.to_string_lossy(),
                opts(&[("initrd", initrd)]),
            )
            .await
            .unwrap();
        let (ok, name, msg, path) = completed(&mut signals, &job).await;
        assert!(ok, "{name}: {msg}");
        let kernel = KernelProxy::builder(&conn)
            .path(path)
            .build()
            .await
            .unwrap();
        assert!(
            kernel.version().await.unwrap().starts_with("6.1"),
            "{}",
            kernel.version().await.unwrap()
        );
        assert_eq!(
            std::fs::read(kernel.bz_image().await.unwrap()).unwrap(),
            std::fs::read(&vmlinuz).unwrap()
        );
        let vmlinux = kernel.vmlinux().await.unwrap();
        let out = std::process::Command::new("readelf")
            .args(["-h", "-l"])
            .arg(&vmlinux)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        for want in [
            "ELF64",
            "Advanced Micro Devices X86-64",
            "EXEC (Executable file)",
            "LOAD",
        ] {
            assert!(text.contains(want), "readelf lacks {want:?}:\n{text}");
        }

        let job = manager
            .import_kernel("debian-elf", &vmlinux, HashMap::new())
            .await
            .unwrap();
        let (ok, name, msg, path) = completed(&mut signals, &job).await;
        assert!(ok, "{name}: {msg}");
        let elf = KernelProxy::builder(&conn)
            .path(path)
            .build()
            .await
            .unwrap();
        assert_eq!(elf.bz_image().await.unwrap(), "");
        assert_eq!(elf.sha256().await.unwrap(), kernel.sha256().await.unwrap());
    });
}
