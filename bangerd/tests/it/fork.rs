//! `vm fork` end to end with the tiny image under QEMU (TCG): forks go on
//! from their source's moment (its files, its memory, its processes) and
//! each takes an identity of its own; the source runs on unchanged.

#![allow(clippy::unwrap_used)]

use crate::vm_lifecycle::{Env, setup_with};

/// `script` run by `sh` in VM `vm`; its output.
pub(crate) fn guest(env: &Env, vm: &str, script: &str) -> String {
    env.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

/// What a guest says of itself, one item per line: hostname, VM id,
/// machine id, host key digest, address, MAC, 32 random bytes. The tiny
/// image's dropbear makes its host key at the first connection: one SSH
/// connection first, with the key banger pinned.
pub(crate) fn identity(env: &Env, vm: &str) -> Vec<String> {
    env.ok(&["vm", "ssh", vm, "--", "true"]);
    guest(
        env,
        vm,
        "hostname; cat /etc/banger/vm-id /etc/machine-id; \
         sha256sum /etc/dropbear/dropbear_ed25519_host_key | cut -c1-16; \
         ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*' | cut -d' ' -f2; \
         cat /sys/class/net/eth0/address; \
         head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn forks_go_on_from_their_source_with_identities_of_their_own() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "src"]);
    let out = guest(
        &env,
        "src",
        "echo disk > /root/marker && sync; \
         mkdir -p /mnt/mem && mount -t tmpfs mem /mnt/mem && echo mem > /mnt/mem/marker; \
         setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let pid = out.trim().to_owned();
    let source = identity(&env, "src");

    // A stopped VM cannot be forked.
    env.ok(&["vm", "create", "--name", "idle", "--no-start"]);
    let out = env.run(&["vm", "fork", "idle", "nope"]);
    assert_eq!(out.status.code(), Some(7), "busy: {out:?}");
    assert!(env.vms().iter().all(|v| v["name"] != "nope"));

    let out = env.ok(&["vm", "fork", "src", "kid", "--count", "2"]);
    for stage in ["save", "src paused for", "restore", "identity"] {
        assert!(out.contains(stage), "no {stage} stage in:\n{out}");
    }
    assert!(!out.contains("cold boot"), "{out}");
    eprintln!(
        "fork: {}",
        out.lines().find(|l| l.contains("paused for")).unwrap_or("")
    );
    let mut seen = vec![source.clone()];
    for kid in ["kid-1", "kid-2"] {
        let vm = env.vm(kid);
        assert_eq!(vm["state"], "running", "{kid}");
        assert_eq!(vm["suspended"], false, "{kid}");
        let id = vm["id"].as_str().unwrap();
        // Its source's moment: disk, memory, processes.
        assert_eq!(
            guest(
                &env,
                kid,
                &format!("cat /root/marker /mnt/mem/marker; kill -0 {pid} && echo alive")
            ),
            "disk\nmem\nalive\n",
            "{kid}"
        );
        let me = own_identity(&env, kid, &seen);
        assert_eq!(me[2], banger_machine_id(id), "machine id: {me:?}");
        // SSH with the host key banger pinned for this VM.
        assert_eq!(
            env.ok(&["vm", "ssh", kid, "--", "echo", "ssh"]).trim(),
            "ssh"
        );
        seen.push(me);
    }

    // What a fork writes stays its own; the source ran on unchanged.
    guest(
        &env,
        "kid-1",
        "echo kid > /root/after && echo kid > /mnt/mem/after; sync",
    );
    assert_eq!(
        guest(
            &env,
            "src",
            &format!(
                "test -e /root/after || echo disk; test -e /mnt/mem/after || echo mem; \
                 kill -0 {pid} && echo alive"
            )
        ),
        "disk\nmem\nalive\n"
    );
    let after = identity(&env, "src");
    assert_eq!(after[..6], source[..6], "the source changed");
}

/// VM `vm`'s [`identity`], checked: its own name, id, address and MAC
/// as bangerd records them, and no machine id, host key, address, MAC or
/// random bytes shared with any of `seen`.
pub(crate) fn own_identity(env: &Env, vm: &str, seen: &[Vec<String>]) -> Vec<String> {
    let record = env.vm(vm);
    let me = identity(env, vm);
    assert_eq!(me[0], vm, "hostname: {me:?}");
    assert_eq!(me[1], record["id"].as_str().unwrap(), "vm id: {me:?}");
    assert_eq!(me[4], record["ipv4"].as_str().unwrap(), "address: {me:?}");
    assert_eq!(me[5], record["mac"].as_str().unwrap(), "mac: {me:?}");
    for other in seen {
        for (i, what) in [
            (2, "machine id"),
            (3, "host key"),
            (4, "address"),
            (5, "mac"),
            (6, "random bytes"),
        ] {
            assert_ne!(me[i], other[i], "{vm} shares its {what} with {other:?}");
        }
    }
    me
}

/// The machine id banger gives VM `id` (as `systemd.machine_id=`).
fn banger_machine_id(id: &str) -> String {
    bangerd::vm::machine_id(id)
}
