//! `vm clone` end to end: real guests under QEMU (TCG) from the tiny
//! image. A clone boots with the files of both of its source's disks, its
//! own address, name, host keys and machine id, and leaves its source as
//! it was.

#![allow(clippy::unwrap_used)]

use crate::vm_lifecycle::{Env, setup_with};

/// What identifies a running guest, read through the agent. The tiny
/// image's dropbear makes its host key at the first connection: one SSH
/// connection first, with the key banger pinned.
fn identity(env: &Env, vm: &str) -> String {
    env.ok(&["vm", "ssh", vm, "--", "true"]);
    env.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/banger/vm-id /etc/machine-id; \
         sha256sum /etc/dropbear/dropbear_ed25519_host_key | cut -c1-16",
    ])
}

#[test]
fn a_clone_boots_with_its_sources_files_and_an_identity_of_its_own() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "src"]);
    env.ok(&[
        "vm",
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "echo work > /root/marker && echo system > /etc/marker && sync",
    ]);
    let source = env.vm("src");
    let source_id = source["id"].as_str().unwrap().to_owned();
    let source_ip = source["ipv4"].as_str().unwrap().to_owned();
    let source_identity = identity(&env, "src");
    let lines: Vec<&str> = source_identity.lines().collect();
    assert_eq!(lines[0], "src", "{source_identity}");
    assert_eq!(lines[1], source_id, "{source_identity}");

    // A running source is refused, with what to do.
    let out = env.run(&["vm", "clone", "src", "copy"]);
    assert_eq!(out.status.code(), Some(7), "busy: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stop it first"), "{stderr}");
    assert!(
        env.vms().iter().all(|v| v["name"] != "copy"),
        "a refused clone left a vm"
    );

    env.ok(&["vm", "stop", "src"]);
    // A taken name is refused too, and nothing is left of the attempt.
    let out = env.run(&["vm", "clone", "src", "src"]);
    assert_eq!(out.status.code(), Some(6), "name taken: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{out:?}"
    );
    assert_eq!(env.vms().len(), 1);

    let out = env.ok(&["vm", "clone", "src", "copy", "--start"]);
    for stage in ["system disk", "work disk", "agent ready"] {
        assert!(out.contains(stage), "no {stage} stage in:\n{out}");
    }
    let copy = env.vm("copy");
    let copy_id = copy["id"].as_str().unwrap().to_owned();
    assert_eq!(copy["state"], "running");
    assert_eq!(copy["image"], source["image"]);
    assert_eq!(copy["vcpus"], source["vcpus"]);
    assert_eq!(copy["disk_bytes"], source["disk_bytes"]);
    assert_ne!(copy_id, source_id);
    assert_ne!(copy["ipv4"].as_str().unwrap(), source_ip);
    assert_ne!(copy["mac"], source["mac"]);

    // The files of both disks came along.
    assert_eq!(
        env.ok(&[
            "vm",
            "exec",
            "copy",
            "--",
            "cat",
            "/root/marker",
            "/etc/marker"
        ]),
        "work\nsystem\n"
    );
    // Its own name, id, machine id and host key.
    let copy_identity = identity(&env, "copy");
    let (a, b): (Vec<&str>, Vec<&str>) = (
        source_identity.lines().collect(),
        copy_identity.lines().collect(),
    );
    assert_eq!(b[0], "copy", "{copy_identity}");
    assert_eq!(b[1], copy_id, "{copy_identity}");
    assert_ne!(a[2], b[2], "the machine id was copied");
    assert_ne!(a[3], b[3], "the host key was copied");
    // And SSH works with the new key.
    assert_eq!(
        env.ok(&["vm", "ssh", "copy", "--", "cat", "/root/marker"]),
        "work\n"
    );

    // The source boots as itself beside its clone, keys unchanged, and a
    // change in the clone does not reach it.
    env.ok(&[
        "vm",
        "exec",
        "copy",
        "--",
        "sh",
        "-c",
        "echo clone > /root/marker && sync",
    ]);
    env.ok(&["vm", "start", "src"]);
    assert_eq!(identity(&env, "src"), source_identity);
    assert_eq!(
        env.ok(&["vm", "exec", "src", "--", "cat", "/root/marker"]),
        "work\n"
    );
    assert_eq!(env.vm("src")["ipv4"].as_str().unwrap(), source_ip);

    // Deleting the clone leaves the source whole.
    env.ok(&["vm", "delete", "copy"]);
    assert_eq!(
        env.ok(&["vm", "exec", "src", "--", "cat", "/etc/marker"]),
        "system\n"
    );
    env.ok(&["vm", "delete", "src"]);
    assert!(env.vms().is_empty());
}

#[test]
fn snapshots_keep_and_restore_a_stopped_vms_disks() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "snap"]);
    let write = |what: &str| {
        env.ok(&[
            "vm",
            "exec",
            "snap",
            "--",
            "sh",
            "-c",
            &format!("echo {what} > /root/f && echo {what} > /etc/f && sync"),
        ]);
    };
    let read = || env.ok(&["vm", "exec", "snap", "--", "cat", "/root/f", "/etc/f"]);
    write("one");
    // Only a stopped VM's disks.
    let out = env.run(&["vm", "snapshot", "create", "snap", "first"]);
    assert_eq!(out.status.code(), Some(7), "busy: {out:?}");
    env.ok(&["vm", "stop", "snap"]);

    let out = env.ok(&["vm", "snapshot", "create", "snap", "first"]);
    for stage in ["system disk", "work disk"] {
        assert!(out.contains(stage), "no {stage} stage in:\n{out}");
    }
    let out = env.run(&["vm", "snapshot", "create", "snap", "first"]);
    assert_eq!(out.status.code(), Some(6), "taken: {out:?}");
    let out = env.run(&["vm", "snapshot", "create", "snap", "Not_A_Label"]);
    assert_eq!(out.status.code(), Some(6), "bad name: {out:?}");
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["vm", "snapshot", "list", "snap", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "first");
    assert!(listed[0]["bytes"].as_u64().unwrap() > 0, "{listed}");
    assert!(
        listed[0]["created_at_usec"].as_u64().unwrap() > 0,
        "{listed}"
    );
    assert_eq!(env.vm("snap")["snapshots"][0]["name"], "first");

    // Changed afterwards, then restored: both disks are as they were,
    // and the work disk keeps the size it grew to since.
    env.ok(&["vm", "start", "snap"]);
    write("two");
    assert_eq!(read(), "two\ntwo\n");
    env.ok(&["vm", "stop", "snap"]);
    env.ok(&["vm", "set", "snap", "--disk-size", "256M"]);
    let out = env.run(&["vm", "restore", "snap", "nosuch"]);
    assert_eq!(out.status.code(), Some(5), "no such snapshot: {out:?}");
    env.ok(&["vm", "restore", "snap", "first"]);
    env.ok(&["vm", "start", "snap"]);
    assert_eq!(read(), "one\none\n");
    let df = env.ok(&["vm", "exec", "snap", "--", "df", "-k", "/root"]);
    let total: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(total > 200_000, "the work disk shrank back: {df}");

    // Restored twice from the same snapshot: it stays until deleted.
    write("three");
    env.ok(&["vm", "stop", "snap"]);
    env.ok(&["vm", "restore", "snap", "first"]);
    env.ok(&["vm", "snapshot", "delete", "snap", "first"]);
    let listed = env.ok(&["vm", "snapshot", "list", "snap", "--json"]);
    assert_eq!(listed.trim(), "[]");
    env.ok(&["vm", "start", "snap"]);
    assert_eq!(read(), "one\none\n");
    env.ok(&["vm", "delete", "snap"]);
    assert!(env.vms().is_empty());
}
