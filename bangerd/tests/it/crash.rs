//! A daemon killed at any moment restarts consistent: bangerd killed with
//! SIGKILL at the start of every stage of `vm create` (which starts the
//! VM), `vm start`, `vm stop`, `vm delete`, `vm clone --start`, `vm
//! snapshot create`, `vm restore`, `vm start` of a VM with a host
//! folder, `vm suspend`, `vm start` of a suspended VM and `vm fork`
//! (whose source must run on, its guest answering), with the real CLI,
//! bangerd
//! in its own network namespace and real QEMU (TCG) guests. After each
//! restart: every VM is stopped or running, a VMM runs exactly for the
//! running ones, and nothing is left without an owner (VM directories,
//! TAPs beyond the pool, NAT set elements, loop and device-mapper
//! devices, half-made snapshots or restores, virtiofsds); a VM adopted
//! running has its host folder mounted; the VM can then be
//! deleted, leaving nothing either. The
//! `debug.job_stage_delay_ms` aid holds each stage open for the kill.
//! Needs root and the guest artifacts (scripts/build-test-kernel,
//! scripts/build-tiny-image).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm_lifecycle::{Env, setup_with};

/// The TAPs the pool keeps (tap_pool_size in vm_lifecycle's config).
const POOL: usize = 1;

/// What is wrong with the host and the store now, if anything.
fn inconsistencies(env: &Env) -> Vec<String> {
    let mut wrong = Vec::new();
    let vms = env.vms();
    let running: BTreeSet<String> = vms
        .iter()
        .filter(|v| v["state"] == "running")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let all: BTreeSet<String> = vms
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    for v in &vms {
        if v["state"] != "running" && v["state"] != "stopped" {
            wrong.push(format!("vm {} is {}", v["name"], v["state"]));
        }
    }
    // A VMM runs exactly for the running VMs.
    let runs = [
        env.bed.runtime_dir().join("vms"),
        env.bed.state_dir().join("vms"),
    ];
    let vmms: BTreeSet<String> = banger_vmm::supervise::processes_under(&runs)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if vmms != running {
        wrong.push(format!(
            "VMMs run for {vmms:?}, running VMs are {running:?}"
        ));
    }
    // Host folders are served exactly for the running VMs.
    let served = folder_helpers(env);
    if !served.is_subset(&running) {
        wrong.push(format!(
            "host folders are served for {served:?}, running VMs are {running:?}"
        ));
    }
    // Every VM directory has its VM.
    let dirs: BTreeSet<String> = std::fs::read_dir(env.bed.state_dir().join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !dirs.is_subset(&all) {
        wrong.push(format!("VM directories {dirs:?}, VMs {all:?}"));
    }
    // No restore or snapshot half made.
    for id in &dirs {
        let dir = env.bed.state_dir().join("vms").join(id);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.extend(
            std::fs::read_dir(dir.join("snapshots"))
                .map(|d| {
                    d.flatten()
                        .map(|e| format!("snapshots/{}", e.file_name().to_string_lossy()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
        for name in names {
            if name.ends_with(".restore")
                || name == "restore.ready"
                || name.starts_with("snapshots/.partial-")
                || name.starts_with("suspend.") && name.ends_with(".tmp")
                || name == "suspend.tmp"
            {
                wrong.push(format!("{name} left in the directory of vm {id}"));
            }
        }
        // Saved memory exactly where the VM says it is suspended.
        let saved = dir.join("suspend.state").exists() && dir.join("suspend.key").exists();
        let said = vms
            .iter()
            .find(|v| v["id"] == id.as_str())
            .is_some_and(|v| v["suspended"] == true);
        if saved != said {
            wrong.push(format!("vm {id}: saved memory {saved}, suspended {said}"));
        }
    }
    // TAPs: the pool's and the running VMs'.
    let taps = env.ip(&["-o", "link", "show", "type", "tun"]);
    if taps.lines().count() > POOL + running.len() {
        wrong.push(format!("TAPs left:\n{taps}"));
    }
    // NAT: only running VMs' addresses.
    let set = env.nft(&["list", "set", "inet", "banger", "nat_vms"]);
    for v in &vms {
        let ip = v["ipv4"].as_str().unwrap_or_default();
        if !ip.is_empty() && v["state"] != "running" && set.contains(&format!("{ip},"))
            || !ip.is_empty() && v["state"] != "running" && set.contains(&format!("{ip} "))
        {
            wrong.push(format!(
                "{ip} of stopped vm {} is in the NAT set",
                v["name"]
            ));
        }
    }
    // The firewall lets only running VMs' MACs send; `.vm` names only for
    // running VMs.
    let guests = env.nft(&["list", "set", "bridge", "banger", "guests"]);
    let listen = std::fs::read_to_string(env.bed.config_path()).unwrap();
    let port = listen
        .lines()
        .find_map(|l| l.strip_prefix("dns_listen = \"127.0.0.1:"))
        .and_then(|p| p.strip_suffix('"'))
        .expect("the bed's dns_listen")
        .to_owned();
    for v in &vms {
        let (name, mac) = (
            v["name"].as_str().unwrap(),
            v["mac"].as_str().unwrap_or_default(),
        );
        let running = v["state"] == "running";
        if !running && !mac.is_empty() && guests.contains(mac) {
            wrong.push(format!("{mac} of stopped vm {name} may send on the bridge"));
        }
        let answer = env
            .ns
            .command("dig")
            .args(["+short", "+time=2", "+tries=2", "-p", &port, "@127.0.0.1"])
            .arg(format!("{name}.vm"))
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer.stdout).trim().to_owned();
        if running == answer.is_empty() {
            wrong.push(format!(
                "{name}.vm answers {answer:?} while the vm is {}",
                v["state"]
            ));
        }
    }
    // Loop and device-mapper devices: only under running VMs.
    let root = env.bed.dir().to_string_lossy().into_owned();
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout).into_owned();
    let ours = loops.lines().filter(|l| l.contains(&root)).count();
    if running.is_empty() && ours > 0 {
        wrong.push(format!("loop devices left:\n{loops}"));
    }
    let dm = Command::new("dmsetup").args(["ls"]).output();
    if let Ok(dm) = dm {
        let dm = String::from_utf8_lossy(&dm.stdout).into_owned();
        for line in dm.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(id) = all.iter().find(|id| name.contains(id.as_str()))
                && !running.contains(id)
            {
                wrong.push(format!("device-mapper device {name} of a VM not running"));
            }
        }
    }
    wrong
}

/// The VMs this bed's `virtiofsd-exec` helpers serve folders for.
fn folder_helpers(env: &Env) -> BTreeSet<String> {
    let run = env.bed.runtime_dir().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.get(1).copied() != Some(b"virtiofsd-exec".as_slice()) {
                return None;
            }
            let spec: serde_json::Value = serde_json::from_slice(args.get(2)?).ok()?;
            spec["handoff"]
                .as_str()?
                .starts_with(&run)
                .then(|| spec["vm"].as_str().map(str::to_owned))?
        })
        .collect()
}

/// The stages `banger ARGS` (a job) goes through, from its JSON report.
fn stages(env: &Env, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = env.ok(&all);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let job = if report["job"].is_object() {
        &report["job"]
    } else {
        &report
    };
    job["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no stages in {report}"))
        .iter()
        .map(|s| s["stage"].as_str().unwrap().to_owned())
        .collect()
}

/// Run `banger ARGS` and kill bangerd with SIGKILL once the CLI shows
/// stage `stage` (whose start the stage delay holds open).
fn kill_at(env: &mut Env, args: &[&str], stage: &str) {
    let mut child = env
        .banger(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let want = format!("→ {stage}");
    let until = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.trim() == want => break,
            Ok(line) => seen.push(line),
            Err(_) => panic!("banger {args:?} never showed {want}:\n{}", seen.join("\n")),
        }
    }
    env.bed.kill_daemon();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_daemon_killed_at_any_stage_restarts_consistent() {
    let mut env = setup_with("[debug]\njob_stage_delay_ms = 500\n");
    let exists = |env: &Env| env.vms().iter().any(|v| v["name"] == "crash");
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("hello"), "from the host\n").unwrap();
    let mount = format!("{}:/mnt/host", folder.path().display());
    let with_folder = [
        "vm",
        "create",
        "--name",
        "crash",
        "--no-start",
        "--mount",
        &mount,
    ];
    // The stages of each operation, from one that is not interrupted.
    let create = stages(&env, &["vm", "create", "--name", "crash", "--nat"]);
    let stop = stages(&env, &["vm", "stop", "crash"]);
    let start = stages(&env, &["vm", "start", "crash"]);
    let delete = stages(&env, &["vm", "delete", "crash"]);
    env.ok(&["vm", "create", "--name", "origin", "--no-start"]);
    let clone = stages(&env, &["vm", "clone", "origin", "crash", "--start"]);
    env.ok(&["vm", "stop", "crash"]);
    let snapshot = stages(&env, &["vm", "snapshot", "create", "crash", "s1"]);
    let restore = stages(&env, &["vm", "restore", "crash", "s1"]);
    env.ok(&["vm", "delete", "crash", "origin"]);
    env.ok(&with_folder);
    let folders = stages(&env, &["vm", "start", "crash"]);
    assert!(folders.iter().any(|s| s == "host folders"), "{folders:?}");
    env.ok(&["vm", "delete", "crash"]);
    env.ok(&["vm", "create", "--name", "crash"]);
    let suspend = stages(&env, &["vm", "suspend", "crash"]);
    let resume = stages(&env, &["vm", "start", "crash"]);
    assert!(resume.iter().any(|s| s == "restore"), "{resume:?}");
    env.ok(&["vm", "delete", "crash"]);
    env.ok(&["vm", "create", "--name", "origin"]);
    // The stage that says how long the source stood still has a text of
    // its own each time: it cannot be waited for.
    let fork: Vec<String> = stages(&env, &["vm", "fork", "origin", "crash"])
        .into_iter()
        .filter(|s| !s.contains("paused for"))
        .collect();
    assert!(fork.iter().any(|s| s == "identity"), "{fork:?}");
    env.ok(&["vm", "delete", "crash", "origin"]);
    eprintln!(
        "create {create:?}\nstart {start:?}\nstop {stop:?}\ndelete {delete:?}\n\
         clone {clone:?}\nsnapshot {snapshot:?}\nrestore {restore:?}\nfolders {folders:?}"
    );
    assert!(
        create.len() >= 5 && !start.is_empty(),
        "{create:?} {start:?}"
    );

    let cases: Vec<(&str, Vec<&str>, &Vec<String>, &str)> = vec![
        (
            "create",
            vec!["vm", "create", "--name", "crash", "--nat"],
            &create,
            "none",
        ),
        ("start", vec!["vm", "start", "crash"], &start, "stopped"),
        ("stop", vec!["vm", "stop", "crash"], &stop, "running"),
        ("delete", vec!["vm", "delete", "crash"], &delete, "running"),
        (
            "clone",
            vec!["vm", "clone", "origin", "crash", "--start"],
            &clone,
            "origin",
        ),
        (
            "snapshot",
            vec!["vm", "snapshot", "create", "crash", "s2"],
            &snapshot,
            "stopped",
        ),
        (
            "restore",
            vec!["vm", "restore", "crash", "s1"],
            &restore,
            "snapshot",
        ),
        ("folders", vec!["vm", "start", "crash"], &folders, "folders"),
        (
            "suspend",
            vec!["vm", "suspend", "crash"],
            &suspend,
            "running",
        ),
        ("resume", vec!["vm", "start", "crash"], &resume, "suspended"),
        (
            "fork",
            vec!["vm", "fork", "origin", "crash"],
            &fork,
            "running origin",
        ),
    ];
    let mut report = Vec::new();
    for (op, args, op_stages, before) in cases {
        for stage in op_stages {
            // The VM as the operation expects it.
            match before {
                "stopped" => {
                    env.ok(&["vm", "create", "--name", "crash", "--nat", "--no-start"]);
                }
                "running" => {
                    env.ok(&["vm", "create", "--name", "crash", "--nat"]);
                }
                "origin" => {
                    env.ok(&["vm", "create", "--name", "origin", "--no-start"]);
                }
                "snapshot" => {
                    env.ok(&["vm", "create", "--name", "crash", "--nat", "--no-start"]);
                    env.ok(&["vm", "snapshot", "create", "crash", "s1"]);
                }
                "folders" => {
                    env.ok(&with_folder);
                }
                "suspended" => {
                    env.ok(&["vm", "create", "--name", "crash"]);
                    env.ok(&["vm", "suspend", "crash"]);
                }
                "running origin" => {
                    env.ok(&["vm", "create", "--name", "origin"]);
                }
                _ => {}
            }
            kill_at(&mut env, &args, stage);
            env.bed.start_daemon().unwrap();
            let wrong = inconsistencies(&env);
            let state = env
                .vms()
                .iter()
                .find(|v| v["name"] == "crash")
                .map_or("gone".to_owned(), |v| {
                    v["state"].as_str().unwrap().to_owned()
                });
            eprintln!("{op} killed at {stage:?}: vm {state}; {wrong:?}");
            assert!(
                wrong.is_empty(),
                "{op} killed at {stage:?}:\n{}",
                wrong.join("\n")
            );
            // A VM adopted running has its folder, even when its start was
            // cut short before the guest mounted it.
            if op == "folders" && state == "running" {
                let read = banger_testbed::eventually(Duration::from_secs(60), || {
                    let out = env.run(&["vm", "exec", "crash", "--", "cat", "/mnt/host/hello"]);
                    out.status
                        .success()
                        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
                });
                assert_eq!(
                    read.as_deref(),
                    Some("from the host\n"),
                    "the folder after {op} killed at {stage:?}"
                );
            }
            // A fork's source runs on, its guest not left paused.
            if op == "fork" {
                let origin = env.vms().into_iter().find(|v| v["name"] == "origin");
                assert_eq!(
                    origin.as_ref().map(|v| v["state"].clone()),
                    Some("running".into()),
                    "the source after {op} killed at {stage:?}"
                );
                let answers = banger_testbed::eventually(Duration::from_secs(60), || {
                    env.run(&["vm", "exec", "origin", "--", "true"])
                        .status
                        .success()
                        .then_some(())
                });
                assert!(
                    answers.is_some(),
                    "the source's guest after {op} killed at {stage:?}"
                );
            }
            // Whatever is left can be deleted, and leaves nothing.
            if exists(&env) {
                env.ok(&["vm", "delete", "crash"]);
            }
            if env.vms().iter().any(|v| v["name"] == "origin") {
                env.ok(&["vm", "delete", "origin"]);
            }
            let wrong = inconsistencies(&env);
            assert!(
                wrong.is_empty(),
                "after deleting what {op} killed at {stage:?} left:\n{}",
                wrong.join("\n")
            );
            assert!(env.vms().is_empty());
            report.push(format!("{op}@{stage}: {state}"));
        }
    }
    eprintln!("{}", report.join("\n"));
}
