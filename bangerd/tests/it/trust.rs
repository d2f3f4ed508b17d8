//! The line between users, on the real test bed: two members of group
//! `banger` (alice and bob) under the shipped polkit rules, and a stranger
//! (carol). Each attack here once worked; each is refused now with a typed
//! error, and the refused call leaves nothing behind. Needs root.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use banger_testbed::{Options, RuleGuard, TestBed, TestUser, eventually, mkfs_ext4, tiny_vmlinux};

/// The CLI's exit codes (banger/src/exit.rs).
const PERMISSION: i32 = 4;
const NOT_FOUND: i32 = 5;
const INVALID_ARGUMENT: i32 = 6;
const LIMIT: i32 = 11;

struct Bed {
    bed: TestBed,
    alice: TestUser,
    bob: TestUser,
    carol: TestUser,
    _rules: RuleGuard,
    /// Root's inputs (a kernel), readable by everyone.
    inputs: tempfile::TempDir,
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Bed {
    fn start() -> Self {
        Self::start_with("")
    }

    /// A bed whose bangerd.toml also holds `extra`.
    fn start_with(extra: &str) -> Self {
        let bed = TestBed::start(Options {
            config_toml: Some(format!("[daemon]\njob_retention_secs = 30\n{extra}")),
            ..Options::default()
        })
        .unwrap();
        let alice = TestUser::create_in_group("banger").unwrap();
        let bob = TestUser::create_in_group("banger").unwrap();
        let carol = TestUser::create().unwrap();
        let rules = bed
            .install_polkit_rule(
                &format!("50-banger-trust-{}", alice.name()),
                include_str!("../../../packaging/50-banger.rules"),
            )
            .unwrap();
        let inputs = tempfile::tempdir().unwrap();
        std::fs::set_permissions(inputs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(inputs.path().join("vmlinux"), tiny_vmlinux(4096)).unwrap();
        std::fs::set_permissions(
            inputs.path().join("vmlinux"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let b = Self {
            bed,
            alice,
            bob,
            carol,
            _rules: rules,
            inputs,
        };
        // A system kernel everyone may build images on.
        b.root_ok(&[
            "kernel",
            "import",
            "--name",
            "base-kernel",
            "--kernel",
            b.inputs.path().join("vmlinux").to_str().unwrap(),
        ]);
        // The rules file loads asynchronously: wait until it grants alice
        // (asked about a process of hers).
        let mut sleeper = b.alice.command("sleep").arg("60").spawn().unwrap();
        let granted = eventually(Duration::from_secs(15), || {
            let out = b
                .bed
                .command("pkcheck")
                .args(["--action-id", "org.banger.image.manage", "--process"])
                .arg(sleeper.id().to_string())
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(granted.is_some(), "polkit did not load the rules");
        b
    }

    fn root(&self, args: &[&str]) -> Output {
        self.bed
            .banger()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn root_ok(&self, args: &[&str]) -> String {
        let out = self.root(args);
        assert!(out.status.success(), "banger {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_as(&self, user: &TestUser, args: &[&str]) -> Output {
        self.bed
            .banger_as(user)
            .arg("--no-ask-password")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok_as(&self, user: &TestUser, args: &[&str]) -> String {
        let out = self.run_as(user, args);
        assert!(
            out.status.success(),
            "{} banger {args:?}: {}",
            user.name(),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `args` as `user` fails with exit code `code`, saying `needle`.
    fn refused(&self, user: &TestUser, args: &[&str], code: i32, needle: &str) {
        let out = self.run_as(user, args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{} banger {args:?}: {}",
            user.name(),
            text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle:?} not in: {}", text(&out));
    }

    /// An ext4 rootfs owned by `user` in their home.
    fn rootfs_of(&self, user: &TestUser, name: &str) -> PathBuf {
        let tree = user.home().join(format!("{name}-tree"));
        std::fs::create_dir_all(tree.join("root")).unwrap();
        std::fs::write(tree.join("owner"), user.name()).unwrap();
        let image = user.home().join(format!("{name}.ext4"));
        mkfs_ext4(&tree, &image, "16M").unwrap();
        chown(&image, user);
        image
    }

    /// `user` registers their own image `name` on the system kernel.
    fn image_of(&self, user: &TestUser, name: &str) -> serde_json::Value {
        let rootfs = self.rootfs_of(user, name);
        self.ok_as(
            user,
            &[
                "image",
                "register",
                "--name",
                name,
                "--rootfs",
                rootfs.to_str().unwrap(),
                "--kernel",
                "base-kernel",
            ],
        );
        self.image(name).expect("registered")
    }

    fn image(&self, name: &str) -> Option<serde_json::Value> {
        let list = self.root_ok(&["image", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
    }

    fn kernel(&self, name: &str) -> Option<serde_json::Value> {
        let list = self.root_ok(&["kernel", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .cloned()
    }

    fn vms(&self) -> Vec<serde_json::Value> {
        let list = self.root_ok(&["vm", "list", "--all", "--json"]);
        serde_json::from_str::<serde_json::Value>(&list)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn chown(path: &Path, user: &TestUser) {
    std::os::unix::fs::chown(path, Some(user.uid()), Some(user.gid())).unwrap();
}

/// No name can pass for an id or an id prefix: a member once registered
/// an image named after another user's image id, and that user's next
/// `vm run --image <id>` booted the attacker's rootfs (lookups were
/// `name = ?1 OR id = ?1`). Now such names are refused, lookups by id
/// never see names, and the owner's id reference gets the owner's image.
#[test]
fn names_that_could_pass_for_ids_are_refused() {
    let b = Bed::start();
    let alices = b.image_of(&b.alice, "alices");
    let alice_id = alices["id"].as_str().unwrap().to_owned();

    // bob: an image named alice's id, or any all-hex word.
    let bobs_rootfs = b.rootfs_of(&b.bob, "bobs");
    for name in [alice_id.as_str(), &alice_id[..4], "cafe"] {
        b.refused(
            &b.bob,
            &[
                "image",
                "register",
                "--name",
                name,
                "--rootfs",
                bobs_rootfs.to_str().unwrap(),
                "--kernel",
                "base-kernel",
            ],
            INVALID_ARGUMENT,
            "hex digits",
        );
    }
    // The same for kernels and VMs.
    b.refused(
        &b.bob,
        &[
            "kernel",
            "import",
            "--name",
            "deadbeef",
            "--kernel",
            b.inputs.path().join("vmlinux").to_str().unwrap(),
        ],
        INVALID_ARGUMENT,
        "hex digits",
    );
    b.refused(
        &b.bob,
        &[
            "vm",
            "create",
            "--name",
            &alice_id,
            "--image",
            "alices",
            "--no-start",
        ],
        INVALID_ARGUMENT,
        "hex digits",
    );
    // Nothing was made by the refusals.
    let list = b.root_ok(&["image", "list", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "{list}"
    );
    assert!(b.kernel("deadbeef").is_none());
    assert!(b.vms().is_empty());

    // alice's VM from her image's id is made from her image.
    b.ok_as(
        &b.alice,
        &[
            "vm",
            "create",
            "--name",
            "alices-vm",
            "--image",
            &alice_id,
            "--no-start",
        ],
    );
    let vms = b.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["image"], alices["path"], "{vms:?}");

    // Over the bus directly, an id-shaped reference is looked up by id
    // only: a name never answers it.
    let out = b
        .bed
        .command_as(&b.bob, "busctl")
        .args([
            "--system",
            "call",
            "org.banger.Manager",
            "/org/banger/Manager",
            "org.banger.Manager",
            "CreateVM",
            "ssa{sv}",
            "bobs-vm",
            "0123456789abcdef",
            "1",
            "start",
            "b",
            "false",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no image"),
        "{}",
        text(&out)
    );
}

/// Images and kernels belong to who made them: another member can
/// neither delete, promote nor boot them, and the system kernel is no
/// member's to delete. A stranger can make none.
#[test]
fn others_images_and_kernels_are_not_theirs() {
    let b = Bed::start();
    b.image_of(&b.alice, "alices");
    let kernel_file = b.alice.home().join("vmlinux");
    std::fs::write(&kernel_file, tiny_vmlinux(4096)).unwrap();
    chown(&kernel_file, &b.alice);
    b.ok_as(
        &b.alice,
        &[
            "kernel",
            "import",
            "--name",
            "alices-kernel",
            "--kernel",
            kernel_file.to_str().unwrap(),
        ],
    );
    let k = b.kernel("alices-kernel").expect("alice's kernel");
    assert_eq!(k["owner_uid"], b.alice.uid());

    for args in [
        &["image", "delete", "alices"][..],
        &["image", "promote", "alices"],
        &["kernel", "delete", "alices-kernel"],
        &["kernel", "delete", "base-kernel"],
    ] {
        b.refused(&b.bob, args, PERMISSION, "belongs to");
    }
    b.refused(
        &b.bob,
        &[
            "vm",
            "create",
            "--name",
            "bobs-vm",
            "--image",
            "alices",
            "--no-start",
        ],
        PERMISSION,
        "belongs to",
    );
    // bob's image on alice's kernel: refused too.
    let bobs_rootfs = b.rootfs_of(&b.bob, "bobs");
    b.refused(
        &b.bob,
        &[
            "image",
            "register",
            "--name",
            "bobs",
            "--rootfs",
            bobs_rootfs.to_str().unwrap(),
            "--kernel",
            "alices-kernel",
        ],
        PERMISSION,
        "belongs to",
    );
    // carol is not a member: she may not even register.
    let carols_rootfs = b.rootfs_of(&b.carol, "carols");
    b.refused(
        &b.carol,
        &[
            "image",
            "register",
            "--name",
            "carols",
            "--rootfs",
            carols_rootfs.to_str().unwrap(),
            "--kernel",
            "base-kernel",
        ],
        PERMISSION,
        "",
    );
    // Everything is as it was.
    assert!(b.image("alices").is_some());
    assert!(b.image("bobs").is_none() && b.image("carols").is_none());
    assert!(b.kernel("alices-kernel").is_some() && b.kernel("base-kernel").is_some());
    assert!(b.vms().is_empty());

    // Their owner may; root may delete anyone's.
    b.ok_as(&b.alice, &["image", "delete", "alices"]);
    b.ok_as(&b.alice, &["kernel", "delete", "alices-kernel"]);
    b.root_ok(&["kernel", "delete", "base-kernel"]);
}

/// The default image's name (and every catalog name) is the system's:
/// a member who registers `debian-bookworm` first would have every
/// user's `vm run` boot their rootfs. Only an administrator may.
#[test]
fn the_default_image_name_cannot_be_squatted() {
    let b = Bed::start();
    let rootfs = b.rootfs_of(&b.bob, "squat");
    b.refused(
        &b.bob,
        &[
            "image",
            "register",
            "--name",
            "debian-bookworm",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            "base-kernel",
        ],
        PERMISSION,
        "reserved",
    );
    assert!(b.image("debian-bookworm").is_none());
    // A create without --image finds no default image, not bob's.
    b.refused(
        &b.alice,
        &["vm", "create", "--name", "alices-vm", "--no-start"],
        NOT_FOUND,
        "debian-bookworm",
    );
    assert!(b.vms().is_empty());

    // Root may make it; it is then the system's, no member's to delete.
    let root_rootfs = b.inputs.path().join("root.ext4");
    let tree = b.inputs.path().join("tree");
    std::fs::create_dir_all(tree.join("root")).unwrap();
    mkfs_ext4(&tree, &root_rootfs, "16M").unwrap();
    b.root_ok(&[
        "image",
        "register",
        "--name",
        "debian-bookworm",
        "--rootfs",
        root_rootfs.to_str().unwrap(),
        "--kernel",
        "base-kernel",
    ]);
    assert_eq!(b.image("debian-bookworm").unwrap()["owner_uid"], 0);
    b.refused(
        &b.bob,
        &["image", "delete", "debian-bookworm"],
        PERMISSION,
        "belongs to the system",
    );
    // Members boot it.
    b.ok_as(
        &b.alice,
        &["vm", "create", "--name", "alices-vm", "--no-start"],
    );
}

impl Bed {
    /// `busctl --system ARGS` as `user`.
    fn busctl_as(&self, user: &TestUser, args: &[&str]) -> Output {
        self.bed
            .command_as(user, "busctl")
            .arg("--system")
            .args(args)
            .output()
            .unwrap()
    }

    /// The served introspection XML of `path`.
    fn introspect(&self, path: &str) -> String {
        let out = self
            .bed
            .busctl(["--xml-interface", "introspect", "org.banger.Manager", path]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn vm(&self, name: &str) -> serde_json::Value {
        self.vms()
            .into_iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no vm {name}"))
    }
}

/// A polkit rule granting `user` exactly `actions` (`org.banger.` left
/// out).
fn grant(bed: &TestBed, user: &TestUser, actions: &[&str]) -> RuleGuard {
    let list = actions
        .iter()
        .map(|a| format!("\"org.banger.{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    bed.install_polkit_rule(
        &format!("10-banger-trust-{}", user.name()),
        &format!(
            "polkit.addRule(function(action, subject) {{ if ([{list}].indexOf(action.id) >= 0 && subject.user == \"{}\") return polkit.Result.YES; }});",
            user.name()
        ),
    )
    .unwrap()
}

/// A refusal by polkit as a bus error: `PermissionDenied`, or
/// `InteractiveAuthorizationRequired` where an administrator could say yes.
fn denied_by_polkit(out: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success()
        && (stderr.contains("not authorized to")
            || stderr.contains("Interactive authentication required"))
}

/// NAT is asked for when a create wants it (it used to be asked only by
/// `Set`), `Set` checks it before it grows the disk, and another user's
/// `Stats` and `ConsoleLog` are refused (`Stats` had no check at all).
#[test]
fn every_vm_method_asks_before_it_acts() {
    let b = Bed::start();
    // dave may create and manage VMs, but not give them NAT.
    let dave = TestUser::create().unwrap();
    let _rule = grant(&b.bed, &dave, &["vm.create", "vm.manage"]);
    let tree = b.inputs.path().join("tree");
    std::fs::create_dir_all(tree.join("root")).unwrap();
    let sys = b.inputs.path().join("sys.ext4");
    mkfs_ext4(&tree, &sys, "16M").unwrap();
    b.root_ok(&[
        "image",
        "register",
        "--name",
        "system-image",
        "--rootfs",
        sys.to_str().unwrap(),
        "--kernel",
        "base-kernel",
    ]);
    let made = eventually(Duration::from_secs(15), || {
        let out = b.run_as(
            &dave,
            &[
                "vm",
                "create",
                "--name",
                "daves",
                "--image",
                "system-image",
                "--no-start",
            ],
        );
        out.status.success().then_some(())
    });
    assert!(made.is_some(), "dave could not create a VM");
    b.refused(
        &dave,
        &[
            "vm",
            "create",
            "--name",
            "daves-nat",
            "--image",
            "system-image",
            "--no-start",
            "--nat",
        ],
        PERMISSION,
        "",
    );
    assert_eq!(b.vms().len(), 1, "the refused create left a VM");

    // Set: the disk must not grow when the NAT half is refused.
    let before = b.vm("daves")["disk_bytes"].as_u64().unwrap();
    b.refused(
        &dave,
        &["vm", "set", "daves", "--disk-size", "2G", "--nat"],
        PERMISSION,
        "",
    );
    let vm = b.vm("daves");
    assert_eq!(vm["disk_bytes"].as_u64().unwrap(), before, "{vm}");
    assert_eq!(vm["nat"], false, "{vm}");
    // Members of banger have NAT by the shipped rules.
    b.ok_as(
        &b.alice,
        &[
            "vm",
            "create",
            "--name",
            "alices-nat",
            "--image",
            "system-image",
            "--no-start",
            "--nat",
        ],
    );

    // bob reads neither the usage nor the console of dave's VM.
    let path = vm["path"].as_str().unwrap();
    for (method, signature, args) in [("Stats", "", &[][..]), ("ConsoleLog", "t", &["0"][..])] {
        let mut call = vec!["call", "org.banger.Manager", path, "org.banger.VM", method];
        if !signature.is_empty() {
            call.push(signature);
        }
        call.extend_from_slice(args);
        let out = b.busctl_as(&b.bob, &call);
        assert!(denied_by_polkit(&out), "{method}: {}", text(&out));
        // The owner gets past the check (the VM is not running).
        let out = b.busctl_as(&dave, &call);
        assert!(
            !denied_by_polkit(&out),
            "{method} of the owner: {}",
            text(&out)
        );
    }
}

/// Every method bangerd serves has a line in docs/dbus-api.md's table of
/// actions and ownership rules, so none ships unauthorized by oversight.
#[test]
fn every_served_method_is_in_the_authorization_table() {
    let b = Bed::start();
    b.image_of(&b.alice, "alices");
    b.ok_as(
        &b.alice,
        &[
            "vm",
            "create",
            "--name",
            "alices-vm",
            "--image",
            "alices",
            "--no-start",
        ],
    );
    let vm = b.vm("alices-vm")["path"].as_str().unwrap().to_owned();
    let image = b.image("alices").unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let kernel = b.kernel("base-kernel").unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned();
    // A job object, alive for the retention time.
    let job = b
        .root_ok(&["daemon", "maintain", "--no-wait", "--json"])
        .trim()
        .to_owned();
    let job: serde_json::Value = serde_json::from_str(&job).unwrap();
    let job = job["job"].as_str().unwrap().to_owned();

    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dbus-api.md"))
            .unwrap();
    let mut seen = Vec::new();
    for (path, interface) in [
        ("/org/banger/Manager", "org.banger.Manager"),
        (vm.as_str(), "org.banger.VM"),
        (image.as_str(), "org.banger.Image"),
        (kernel.as_str(), "org.banger.Kernel"),
        (job.as_str(), "org.banger.Job"),
    ] {
        let xml = b.introspect(path);
        let element = banger_dbus::interface_element(&xml, interface)
            .unwrap_or_else(|| panic!("{interface} not served at {path}"));
        let short = interface.trim_start_matches("org.banger.");
        for part in element.split("<method name=\"").skip(1) {
            let method = part.split('"').next().unwrap();
            let row = format!("| `{short}.{method}` |");
            assert!(
                doc.contains(&row),
                "{interface}.{method} is served but has no line in docs/dbus-api.md's authorization table"
            );
            seen.push(format!("{short}.{method}"));
        }
    }
    assert!(seen.len() >= 20, "too few methods found: {seen:?}");
}

/// A root-only file with `marker` in it, in a directory everyone can
/// search.
fn root_only(bed: &Bed, name: &str, marker: &[u8]) -> PathBuf {
    let path = bed.inputs.path().join(name);
    let mut data = marker.repeat(64);
    data.resize(64 << 10, b'#');
    std::fs::write(&path, data).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Whether any file under `dir` holds `marker`.
fn tree_holds(dir: &Path, marker: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            tree_holds(&e.path(), marker)
        } else if ty.is_file() {
            file_holds(&e.path(), marker)
        } else {
            false
        }
    })
}

/// Whether the data regions of `path` hold `marker`. VM disks are
/// sparse and gigabytes long; only their written extents are read.
fn file_holds(path: &Path, marker: &[u8]) -> bool {
    use nix::unistd::{Whence, lseek};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut at = 0i64;
    while at < len {
        let Ok(start) = lseek(&f, at, Whence::SeekData) else {
            return false; // no data past `at`
        };
        let end = lseek(&f, start, Whence::SeekHole).unwrap();
        // Overlap the regions by a marker's length so no match is split.
        let from = (start - marker.len() as i64).max(0);
        f.seek(SeekFrom::Start(from as u64)).unwrap();
        let mut region = Vec::with_capacity((end - from) as usize);
        (&mut f)
            .take((end - from) as u64)
            .read_to_end(&mut region)
            .unwrap();
        if region.windows(marker.len()).any(|w| w == marker) {
            return true;
        }
        at = end;
    }
    false
}

/// Root never opens a path a member named: files reach bangerd as
/// descriptors the member's own CLI opened, and what bangerd keeps is
/// copied while it holds them. Once, a member registered an image from a
/// file in their home, swapped it for a symlink to a root-only file, and
/// their next VM's disk held that file's bytes; a symlink at registration
/// or a `--modules` tree did the same.
#[test]
fn files_arrive_as_descriptors_and_are_copied_at_once() {
    let b = Bed::start();
    let marker = b"ROOT-ONLY-MARKER-7c1d";
    let secret = root_only(&b, "secret", marker);

    // A symlink swapped in after the registration changes nothing.
    let rootfs = b.rootfs_of(&b.alice, "alices");
    b.ok_as(
        &b.alice,
        &[
            "image",
            "register",
            "--name",
            "alices",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            "base-kernel",
        ],
    );
    assert_eq!(b.image("alices").unwrap()["managed"], true);
    std::fs::remove_file(&rootfs).unwrap();
    std::os::unix::fs::symlink(&secret, &rootfs).unwrap();
    b.ok_as(
        &b.alice,
        &[
            "vm",
            "create",
            "--name",
            "alices-vm",
            "--image",
            "alices",
            "--no-start",
        ],
    );
    let state = b.bed.state_dir();
    assert!(
        !tree_holds(&state, marker),
        "a root-only file's bytes reached bangerd's state"
    );

    // A symlink to a root-only file at registration: the CLI, running
    // as alice, cannot open it, so nothing reaches bangerd.
    let link = b.alice.home().join("link.ext4");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    b.refused(
        &b.alice,
        &[
            "image",
            "register",
            "--name",
            "linked",
            "--rootfs",
            link.to_str().unwrap(),
            "--kernel",
            "base-kernel",
        ],
        PERMISSION,
        "Permission denied",
    );
    assert!(b.image("linked").is_none());

    // Modules: a root-only file in the tree stops the CLI; a symlink to
    // one is stored as a link, which bangerd does not keep; `/etc` as a
    // modules tree is read as alice, so its secrets stay out.
    let kernel = b.alice.home().join("vmlinux");
    std::fs::write(&kernel, tiny_vmlinux(4096)).unwrap();
    chown(&kernel, &b.alice);
    let modules = b.alice.home().join("modules");
    std::fs::create_dir_all(modules.join("kernel")).unwrap();
    std::fs::write(modules.join("modules.dep"), b"").unwrap();
    std::fs::write(modules.join("kernel/virtio.ko"), b"ko").unwrap();
    std::os::unix::fs::symlink(&secret, modules.join("kernel/evil.ko")).unwrap();
    for entry in ["", "kernel", "modules.dep", "kernel/virtio.ko"] {
        chown(&modules.join(entry), &b.alice);
    }
    let import = |name: &str, modules: &Path| {
        b.run_as(
            &b.alice,
            &[
                "kernel",
                "import",
                "--name",
                name,
                "--kernel",
                kernel.to_str().unwrap(),
                "--modules",
                modules.to_str().unwrap(),
            ],
        )
    };
    let out = import("linked-modules", &modules);
    assert!(out.status.success(), "{}", text(&out));
    let k = b.kernel("linked-modules").unwrap();
    let kept = PathBuf::from(k["modules"].as_str().unwrap());
    assert!(kept.join("kernel/virtio.ko").is_file());
    assert!(!kept.join("kernel/evil.ko").exists());
    assert!(!tree_holds(&state, marker));

    std::fs::copy(&secret, modules.join("kernel/secret.ko")).unwrap();
    std::fs::set_permissions(
        modules.join("kernel/secret.ko"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = import("secret-modules", &modules);
    assert_eq!(out.status.code(), Some(PERMISSION), "{}", text(&out));
    let out = import("etc-modules", Path::new("/etc"));
    assert_eq!(out.status.code(), Some(PERMISSION), "{}", text(&out));
    assert!(b.kernel("secret-modules").is_none() && b.kernel("etc-modules").is_none());
    assert!(!tree_holds(&state, marker));
    let kernels = std::fs::read_dir(state.join("kernels")).unwrap().count();
    assert_eq!(kernels, 2, "only base-kernel and linked-modules");

    // A path where a descriptor belongs is refused by its type.
    let out = b.busctl_as(
        &b.alice,
        &[
            "call",
            "org.banger.Manager",
            "/org/banger/Manager",
            "org.banger.Manager",
            "ImportKernelFd",
            "ssa{sv}",
            "by-path",
            kernel.to_str().unwrap(),
            "0",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("expected `(sha{sv})`"),
        "the error says a descriptor is wanted: {}",
        text(&out)
    );
}

/// A sparse file the size of RAM once took the host down: kernel import
/// read it whole into memory. Now its size is checked against the cap
/// (`limits.kernel_max_mib`) with fstat before anything is read.
#[test]
fn a_huge_sparse_kernel_is_refused_by_size() {
    let b = Bed::start();
    let huge = b.alice.home().join("huge");
    let f = std::fs::File::create(&huge).unwrap();
    let mut head = tiny_vmlinux(4096);
    head.truncate(4096);
    std::io::Write::write_all(&mut &f, &head).unwrap();
    f.set_len(20 << 30).unwrap();
    drop(f);
    chown(&huge, &b.alice);
    b.refused(
        &b.alice,
        &[
            "kernel",
            "import",
            "--name",
            "huge",
            "--kernel",
            huge.to_str().unwrap(),
        ],
        LIMIT,
        "limits.kernel_max_mib",
    );
    assert!(b.kernel("huge").is_none());
    // Still serving.
    b.ok_as(&b.alice, &["image", "list"]);
}

/// One member could once fill the host: nothing limited how many VMs,
/// vCPUs, memory or disk a uid took. Now `[limits]` does, per uid, and
/// says which limit and what to do; nothing is made when it says no, and
/// one user's usage does not count against another. Root is exempt.
#[test]
fn per_user_limits_refuse_before_anything_is_made() {
    let b = Bed::start_with(
        "[limits]\nmax_vms = 2\nmax_vcpus_per_vm = 2\nmax_vcpus = 1\nmax_memory_mib = 768\nmax_disk_gib = 3\n",
    );
    b.image_of(&b.alice, "alices");
    let create = |user: &TestUser, name: &str, more: &[&str]| {
        let mut args = vec![
            "vm",
            "create",
            "--name",
            name,
            "--image",
            "alices",
            "--no-start",
        ];
        args.extend_from_slice(more);
        b.run_as(user, &args)
    };
    let limited = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(LIMIT), "{}", text(&out));
        assert!(text(&out).contains(needle), "{needle}: {}", text(&out));
    };
    let names = || {
        b.vms()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    let ok = create(
        &b.alice,
        "one",
        &["--disk-size", "1G", "--vcpus", "1", "--memory", "1024"],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    limited(
        create(&b.alice, "big", &["--vcpus", "3", "--disk-size", "64M"]),
        "limits.max_vcpus_per_vm",
    );
    // 1 GiB + 16 MiB of image held; 2 GiB more is past 3 GiB.
    limited(
        create(&b.alice, "two", &["--disk-size", "2G"]),
        "limits.max_disk_gib",
    );
    let ok = create(
        &b.alice,
        "two",
        &["--disk-size", "1G", "--vcpus", "2", "--memory", "512"],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    limited(
        create(&b.alice, "three", &["--disk-size", "64M"]),
        "limits.max_vms",
    );
    assert_eq!(names(), ["one", "two"], "a refused create made nothing");

    // Growing a disk past the limit changes nothing.
    b.refused(
        &b.alice,
        &["vm", "set", "one", "--disk-size", "2G"],
        LIMIT,
        "limits.max_disk_gib",
    );
    assert_eq!(b.vm("one")["disk_bytes"], 1u64 << 30);
    // Starting a VM whose memory is past what alice may run is refused by
    // the call itself, and the VM stays stopped.
    b.refused(
        &b.alice,
        &["vm", "start", "one"],
        LIMIT,
        "limits.max_memory_mib",
    );
    assert_eq!(b.vm("one")["state"], "stopped");
    // Two vCPUs where alice may run one.
    b.refused(
        &b.alice,
        &["vm", "start", "two"],
        LIMIT,
        "limits.max_vcpus)",
    );
    assert_eq!(b.vm("two")["state"], "stopped");

    // Doctor tells alice where she stands.
    let doctor = b.run_as(&b.alice, &["doctor", "--json"]);
    let doctor = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(
        doctor.contains("you have 2 of 2 VMs") && doctor.contains("limits.max_vms"),
        "{doctor}"
    );

    // Bob's count is his own; root is not held to the limits at all.
    b.image_of(&b.bob, "bobs");
    b.ok_as(
        &b.bob,
        &[
            "vm",
            "create",
            "--name",
            "bob-one",
            "--image",
            "bobs",
            "--no-start",
            "--disk-size",
            "1G",
        ],
    );
    b.root_ok(&[
        "vm",
        "create",
        "--name",
        "root-one",
        "--image",
        "alices",
        "--no-start",
        "--vcpus",
        "3",
    ]);
}
