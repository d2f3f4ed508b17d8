//! VMs marked autostart start when bangerd first starts after a host
//! boot, and only then; the flag file that makes the package's
//! `banger-autostart.service` start bangerd at boot exists exactly while
//! some VM is marked.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use banger_testbed::eventually;

use crate::vm_lifecycle::setup_with;

#[test]
fn vms_marked_autostart_start_on_the_first_daemon_start_after_a_boot() {
    let mut env = setup_with("");
    let flag = env.bed.state_dir().join("autostart");
    let booted = env.bed.runtime_dir().join("autostarted-boot");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    // The daemon's first start recorded the boot it ran under.
    assert_eq!(
        std::fs::read_to_string(&booted).unwrap().trim(),
        boot_id.trim()
    );
    assert!(!flag.exists(), "no VM is marked");

    env.ok(&[
        "vm",
        "create",
        "--name",
        "auto",
        "--autostart",
        "--no-start",
    ]);
    env.ok(&["vm", "create", "--name", "manual", "--no-start"]);
    assert!(flag.exists(), "a VM is marked");
    assert_eq!(env.vm("auto")["autostart"], true);
    assert_eq!(env.vm("manual")["autostart"], false);
    assert!(
        env.ok(&["vm", "show", "auto"])
            .contains("autostart:   at host boot")
    );

    // Restarted within the same boot: nothing starts.
    env.bed.stop_daemon().unwrap();
    env.bed.start_daemon().unwrap();
    assert_eq!(env.vm("auto")["state"], "stopped");

    // After a boot (which empties the runtime directory): the marked VM
    // starts, the other does not.
    env.bed.stop_daemon().unwrap();
    std::fs::remove_file(&booted).unwrap();
    env.bed.start_daemon().unwrap();
    let running = eventually(Duration::from_secs(200), || {
        (env.vm("auto")["state"] == "running").then_some(())
    });
    assert!(running.is_some(), "{}", env.vm("auto"));
    assert_eq!(env.vm("manual")["state"], "stopped");
    assert_eq!(
        std::fs::read_to_string(&booted).unwrap().trim(),
        boot_id.trim()
    );

    // The flag follows the marks: set off, set on, deleted.
    env.ok(&["vm", "set", "auto", "--no-autostart"]);
    assert_eq!(env.vm("auto")["autostart"], false);
    assert!(!flag.exists());
    env.ok(&["vm", "set", "manual", "--autostart"]);
    assert!(flag.exists());
    env.ok(&["vm", "delete", "manual"]);
    assert!(!flag.exists());
    env.ok(&["vm", "stop", "auto"]);
    env.ok(&["vm", "delete", "auto"]);
    assert!(env.vms().is_empty());
}
