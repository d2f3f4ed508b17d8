//! Templates end to end with the tiny image under QEMU (TCG): the first
//! create boots and a template is made behind it; later creates restore
//! the template and renew the guest, each with an identity of its own; a
//! template that does not load falls back to a boot that says why; an
//! image deleted and registered again has none.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use banger_testbed::eventually;

use crate::fork::{guest, identity, own_identity};
use crate::vm_lifecycle::{Env, setup_with};

/// The templates made so far.
fn templates(env: &Env) -> Vec<PathBuf> {
    let dir = env.bed.state_dir().join("templates");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("template.json").is_file())
        .collect()
}

#[test]
fn later_creates_restore_a_template_and_renew_the_guest() {
    let mut env = setup_with("templates = true\n");
    let out = env.ok(&["vm", "create", "--name", "first"]);
    assert!(!out.contains("restore"), "{out}");
    guest(&env, "first", "echo first > /root/first && sync");
    // While it is made, its NIC is on a TAP of its own, on no bridge and
    // down; the TAP goes once the template is saved.
    let mut lone = None;
    let made = eventually(Duration::from_secs(180), || {
        let links = env.ip(&["-d", "-o", "link", "show"]);
        if let Some(l) = links.lines().find(|l| l.contains(": bglone")) {
            lone = Some(l.to_owned());
        }
        templates(&env).into_iter().next()
    })
    .expect("a template after the first create");
    let lone = lone.expect("the template's TAP, seen while it booted");
    assert!(!lone.contains("master") && !lone.contains(",UP"), "{lone}");
    assert!(lone.contains("tun type tap"), "{lone}");
    let links = env.ip(&["-o", "link", "show"]);
    assert!(!links.contains("bglone"), "{links}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(made.join("template.json")).unwrap())
            .unwrap();
    eprintln!("template: {info}");
    assert_eq!(info["memory_mib"], 256);
    // banger image show says so.
    let image: serde_json::Value =
        serde_json::from_str(&env.ok(&["image", "show", "tiny", "--json"])).unwrap();
    assert_eq!(image["templates"][0]["memory_mib"], 256, "{image}");
    assert!(
        image["templates"][0]["state_bytes"].as_u64().unwrap() > 1 << 20,
        "{image}"
    );

    let mut seen = vec![identity(&env, "first")];
    for name in ["one", "two"] {
        let out = env.ok(&["vm", "create", "--name", name]);
        eprintln!("{out}");
        for stage in ["system disk", "work disk", "restore", "identity"] {
            assert!(out.contains(stage), "no {stage} stage in:\n{out}");
        }
        assert!(!out.contains("cold boot"), "{out}");
        let vm = env.vm(name);
        assert_eq!(vm["state"], "running");
        assert_eq!(vm["suspended"], false);
        let me = own_identity(&env, name, &seen);
        // Its own /root, with its owner's key: SSH with the pinned host key.
        assert_eq!(
            guest(&env, name, "test -e /root/first || echo clean"),
            "clean\n"
        );
        assert_eq!(
            env.ok(&["vm", "ssh", name, "--", "echo", "ssh"]).trim(),
            "ssh"
        );
        seen.push(me);
    }

    // --cold-boot boots.
    let out = env.ok(&["vm", "create", "--name", "cold", "--cold-boot"]);
    assert!(!out.contains("restore"), "{out}");

    // A template whose state does not load: the create boots from the
    // template's disks instead, says why, and SSH works; the template
    // goes, and is made again.
    std::fs::write(made.join("suspend.state"), vec![0x5a; 1 << 20]).unwrap();
    let out = env.ok(&["vm", "create", "--name", "broken"]);
    assert!(
        out.contains("cold boot: the saved memory did not load"),
        "{out}"
    );
    assert_eq!(env.vm("broken")["state"], "running");
    assert_eq!(
        env.ok(&["vm", "ssh", "broken", "--", "hostname"]).trim(),
        "broken"
    );
    eventually(Duration::from_secs(180), || {
        let again = templates(&env).into_iter().next()?;
        let state = std::fs::read(again.join("suspend.state")).ok()?;
        (state.first() != Some(&0x5a)).then_some(())
    })
    .expect("the template made again");

    // Its image deleted, the template goes with it.
    env.ok(&["vm", "delete", "first", "one", "two", "cold", "broken"]);
    env.ok(&["image", "delete", "tiny"]);
    assert!(templates(&env).is_empty(), "{:?}", templates(&env));

    // Registered again, it is another image: its first create boots.
    env.register_tiny();
    let out = env.ok(&["vm", "create", "--name", "again"]);
    assert!(!out.contains("restore"), "{out}");
    assert_eq!(env.vm("again")["state"], "running");

    // bangerd killed while that image's template boots: the next start
    // stops its VMM and removes its TAP and its half-made directory.
    eventually(Duration::from_secs(120), || {
        env.ip(&["-o", "link", "show"])
            .contains("bglone")
            .then_some(())
    })
    .expect("a template on its way");
    env.bed.kill_daemon();
    env.bed.start_daemon().unwrap();
    assert_eq!(env.vm("again")["state"], "running");
    let runs = [env.bed.runtime_dir().join("templates")];
    assert!(banger_vmm::supervise::processes_under(&runs).is_empty());
    let links = env.ip(&["-o", "link", "show"]);
    assert!(!links.contains("bglone"), "{links}");
    let left: Vec<_> = std::fs::read_dir(env.bed.state_dir().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
