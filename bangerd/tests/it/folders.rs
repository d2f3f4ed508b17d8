//! Host folders (`--mount`): a virtiofsd per folder, run as the VM's
//! owner, QEMU's vhost-user-fs device, and the agent mounting each in a
//! real guest. What the guest writes is the owner's; a read-only folder
//! refuses writes; a folder the owner may not use fails the start and
//! leaves nothing running.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use banger_testbed::{TestUser, eventually};

use crate::vm_lifecycle::{as_user, setup_with};

#[test]
fn host_folders_are_served_as_the_vms_owner() {
    let env = setup_with("");
    let alice = TestUser::create().unwrap();
    let _rule = env
        .bed
        .install_polkit_rule(
            "10-banger-folders",
            &format!(
                "polkit.addRule(function(action, subject) {{ if ([\"org.banger.vm.create\", \"org.banger.vm.manage\"].indexOf(action.id) >= 0 && subject.user == \"{}\") return polkit.Result.YES; }});",
                alice.name()
            ),
        )
        .unwrap();
    // Alice's folders in her home; root's own beside them.
    let home = alice.home();
    let chown = |p: &std::path::Path| {
        std::os::unix::fs::chown(p, Some(alice.uid()), Some(alice.gid())).unwrap();
    };
    let shared = home.join("shared");
    let papers = home.join("papers");
    for dir in [&shared, &papers] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("hello"), "from the host\n").unwrap();
        chown(dir);
        chown(&dir.join("hello"));
    }
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = roots.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();

    let mount = |dir: &std::path::Path, at: &str| format!("{}:{at}", dir.display());
    let created = eventually(Duration::from_secs(10), || {
        let (code, out, err) = as_user(
            &env,
            &alice,
            &[
                "vm",
                "create",
                "--name",
                "fs",
                "--mount",
                &mount(&shared, "/mnt/shared"),
                "--mount",
                &mount(&papers, "/mnt/papers:ro"),
            ],
        );
        // Only the polkit rule's loading is waited for.
        match code {
            Some(0) => Some(Ok(out + &err)),
            Some(4) => None,
            _ => Some(Err(format!("{code:?}\n{out}\n{err}"))),
        }
    });
    let stages = created.expect("alice could not create her VM").unwrap();
    assert!(stages.contains("host folders"), "{stages}");
    let vm = env.vm("fs");
    assert_eq!(vm["mounts"].as_array().unwrap().len(), 2, "{vm}");
    assert_eq!(vm["mounts"][1]["read_only"], true, "{vm}");

    let exec = |script: &str| {
        as_user(
            &env,
            &alice,
            &["vm", "exec", "fs", "--", "sh", "-c", script],
        )
    };
    let (code, out, err) = exec("cat /mnt/shared/hello /mnt/papers/hello");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "from the host\nfrom the host\n");
    // Guest root writes as alice.
    let (code, _, err) = exec("echo from the guest > /mnt/shared/made && mkdir /mnt/shared/d");
    assert_eq!(code, Some(0), "{err}");
    let made = std::fs::metadata(shared.join("made")).unwrap();
    assert_eq!((made.uid(), made.gid()), (alice.uid(), alice.gid()));
    assert_eq!(
        std::fs::read_to_string(shared.join("made")).unwrap(),
        "from the guest\n"
    );
    assert_eq!(
        std::fs::metadata(shared.join("d")).unwrap().uid(),
        alice.uid()
    );
    // Read-only is read-only, also to guest root.
    let (code, _, err) = exec("echo no > /mnt/papers/new");
    assert_ne!(code, Some(0));
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!papers.join("new").exists());
    // Alice's rights, not root's: a file of root's in her folder stays
    // closed to guest root.
    std::fs::write(shared.join("roots"), "root only\n").unwrap();
    std::fs::set_permissions(shared.join("roots"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = exec("cat /mnt/shared/roots");
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("Permission denied"), "{err}");

    // A folder alice may not use: the start fails saying why, and leaves
    // the VM stopped with nothing serving it.
    let (code, _, err) = as_user(&env, &alice, &["vm", "stop", "fs"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = as_user(
        &env,
        &alice,
        &["vm", "set", "fs", "--mount", &mount(&secret, "/mnt/secret")],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = as_user(&env, &alice, &["vm", "start", "fs"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("may not read and write"), "{err}");
    assert!(err.contains(&secret.display().to_string()), "{err}");
    let vm = env.vm("fs");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(
        banger_vmm::supervise::folder_helpers(vm["id"].as_str().unwrap()).is_empty(),
        "a virtiofsd-exec is left"
    );

    // Without folders it starts again; then it is deleted with nothing left.
    let (code, _, err) = as_user(&env, &alice, &["vm", "set", "fs", "--no-mounts"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(env.vm("fs")["mounts"].as_array().unwrap().is_empty());
    let (code, _, err) = as_user(&env, &alice, &["vm", "delete", "fs"]);
    assert_eq!(code, Some(0), "{err}");
}
