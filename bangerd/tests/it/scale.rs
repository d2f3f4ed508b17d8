//! Many VMs at once, at a size CI affords: 200 VMs made without starting
//! them, then deleted in one command. Every VM must be reported done and
//! the command must exit 0: the daemon publishes job events one after
//! another, and a front end that fell behind once lost the completions of
//! jobs whose retention had run out (`banger` then reported jobs that had
//! succeeded as vanished). A stop of them all, stopped already, is done
//! at once.

#![allow(clippy::unwrap_used)]

use crate::vm_lifecycle::setup_with;

const VMS: usize = 200;

#[test]
fn two_hundred_vms_are_deleted_in_one_command_and_each_is_reported() {
    // One second of retention: a front end a second behind would lose
    // completions if retention started when a job ended.
    let env = setup_with("[daemon]\njob_retention_secs = 1\n");
    let names: Vec<String> = (0..VMS).map(|i| format!("s{i:03}")).collect();
    // Made by 8 clients at once.
    std::thread::scope(|scope| {
        for chunk in names.chunks(VMS / 8) {
            let env = &env;
            scope.spawn(move || {
                for name in chunk {
                    env.ok(&["vm", "create", "--no-start", "--name", name]);
                }
            });
        }
    });
    assert_eq!(env.vms().len(), VMS);

    // Stopping stopped VMs is done already, one or many (as `systemctl
    // stop` of a stopped unit is): exit 0, a line each.
    let out = env.run(&["vm", "stop", "s000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", out.status);
    assert_eq!(stdout, "s000: stopped already\n");
    every_one_reported(&env, "stop", &names, "stopped already");
    every_one_reported(&env, "delete", &names, "delete done");
    assert!(env.vms().is_empty());
}

/// `banger vm VERB NAMES...` exits 0, prints `NAME: LINE` for each and
/// the summary.
fn every_one_reported(env: &crate::vm_lifecycle::Env, verb: &str, names: &[String], line: &str) {
    let mut args = vec!["vm", verb];
    args.extend(names.iter().map(String::as_str));
    let out = env.run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    for name in names {
        assert!(
            stdout.contains(&format!("{name}: {line}\n")),
            "{name} not reported:\n{stdout}\n{stderr}"
        );
    }
    let n = names.len();
    assert!(
        stdout.contains(&format!("{verb}: {n} of {n} VMs done")),
        "{stdout}"
    );
}
