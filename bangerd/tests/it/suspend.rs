//! `vm suspend` and the resume at `vm start`, end to end with the tiny
//! image under QEMU (TCG): a resumed guest is the same boot, with its
//! processes, its memory-only files and a clock set right; a state that
//! does not load falls back to a boot that says why; a stop drops it.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::vm_lifecycle::{Env, setup_with};

fn state_file(env: &Env, vm: &str) -> PathBuf {
    let id = env.vm(vm)["id"].as_str().unwrap().to_owned();
    env.bed
        .state_dir()
        .join("vms")
        .join(id)
        .join("suspend.state")
}

fn guest(env: &Env, vm: &str, script: &str) -> String {
    env.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_suspended_vm_resumes_where_it_was() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "nap"]);
    // A process, and a file that lives only in the guest's memory.
    let out = guest(
        &env,
        "nap",
        "mkdir -p /mnt/mem && mount -t tmpfs mem /mnt/mem && echo kept > /mnt/mem/marker; \
         setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!; \
         cat /proc/sys/kernel/random/boot_id",
    );
    let lines: Vec<&str> = out.lines().collect();
    let (pid, boot_id) = (lines[0].to_owned(), lines[1].to_owned());
    // The host's randomness through a virtio-rng device.
    let rng = "cat /sys/class/misc/hw_random/rng_current";
    assert!(
        guest(&env, "nap", rng).starts_with("virtio_rng"),
        "no virtio-rng"
    );
    assert_eq!(
        guest(&env, "nap", "head -c 16 /dev/hwrng | wc -c").trim(),
        "16"
    );

    // Only a running VM can be suspended.
    env.ok(&["vm", "create", "--name", "idle", "--no-start"]);
    let out = env.run(&["vm", "suspend", "idle"]);
    assert_eq!(out.status.code(), Some(7), "busy: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only a running vm"),
        "{out:?}"
    );

    let out = env.ok(&["vm", "suspend", "nap"]);
    assert!(out.contains("save"), "no save stage in:\n{out}");
    let vm = env.vm("nap");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["suspended"], true);
    assert!(env.ok(&["vm", "show", "nap"]).contains("suspended"));
    let saved = std::fs::metadata(state_file(&env, "nap")).unwrap();
    assert!(saved.len() > 1 << 20, "{} bytes", saved.len());
    // A suspended VM is suspended already.
    assert!(env.ok(&["vm", "suspend", "nap"]).contains("already"));

    // Long enough for a clock left alone to be seen behind.
    std::thread::sleep(Duration::from_secs(5));
    let out = env.ok(&["vm", "start", "nap"]);
    assert!(out.contains("restore"), "no restore stage in:\n{out}");
    assert!(!out.contains("cold boot"), "{out}");
    let vm = env.vm("nap");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["suspended"], false);
    assert!(!state_file(&env, "nap").exists(), "a state is loaded once");
    let out = guest(
        &env,
        "nap",
        &format!(
            "cat /mnt/mem/marker; kill -0 {pid} && echo alive; \
             cat /proc/sys/kernel/random/boot_id; date +%s"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["kept", "alive", boot_id.as_str()], "{out}");
    // The random device came along and still answers.
    let read = "head -c 16 /dev/hwrng | wc -c";
    assert_eq!(guest(&env, "nap", read).trim(), "16");
    let guest_now: u64 = lines[3].trim().parse().unwrap();
    assert!(
        guest_now.abs_diff(host_now()) <= 3,
        "the guest's clock is {guest_now}, the host's {}",
        host_now()
    );
    // SSH works as before.
    assert_eq!(
        env.ok(&["vm", "ssh", "nap", "--", "echo", "ssh"]).trim(),
        "ssh"
    );

    // A state that does not load: the VM boots from its disks, and says
    // why.
    env.ok(&["vm", "suspend", "nap"]);
    std::fs::write(state_file(&env, "nap"), vec![0x5a; 1 << 20]).unwrap();
    let out = env.ok(&["vm", "start", "nap"]);
    assert!(
        out.contains("cold boot: the saved memory did not load"),
        "{out}"
    );
    let vm = env.vm("nap");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["suspended"], false);
    let out = guest(
        &env,
        "nap",
        "cat /proc/sys/kernel/random/boot_id; test -e /mnt/mem/marker && echo marker; true",
    );
    assert!(
        !out.contains(&boot_id),
        "the same boot after a failed resume"
    );
    assert!(!out.contains("marker"), "{out}");

    // A stop of a suspended VM drops its memory: the next start boots.
    env.ok(&["vm", "suspend", "nap"]);
    assert!(state_file(&env, "nap").exists());
    env.ok(&["vm", "stop", "nap"]);
    assert_eq!(env.vm("nap")["suspended"], false);
    assert!(!state_file(&env, "nap").exists());
    let out = env.ok(&["vm", "start", "nap"]);
    assert!(!out.contains("restore"), "{out}");

    // A restart boots afresh, suspended or not.
    env.ok(&["vm", "suspend", "nap"]);
    let out = env.ok(&["vm", "restart", "nap"]);
    assert!(out.contains("discard saved memory"), "{out}");
    assert!(!out.contains("restore"), "{out}");
    assert_eq!(env.vm("nap")["suspended"], false);
    assert!(!state_file(&env, "nap").exists());

    // So does a new size: the memory fits only the machine it came from.
    env.ok(&["vm", "suspend", "nap"]);
    env.ok(&["vm", "set", "nap", "--memory", "320"]);
    assert_eq!(env.vm("nap")["suspended"], false);
    assert!(!state_file(&env, "nap").exists());
}

#[test]
fn an_idle_vm_is_suspended_and_one_in_use_is_not() {
    let env = setup_with("suspend_idle_secs = 5\n");
    env.ok(&["vm", "create", "--name", "one"]);
    let running = |env: &Env| {
        let vm = env.vm("one");
        vm["state"] == "running" && vm["suspended"] == false
    };
    // A stream through the agent, however quiet, is use.
    let exec = env
        .banger(&["vm", "exec", "one", "--", "sleep", "12"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        running(&env),
        "suspended with a stream open: {}",
        env.vm("one")
    );
    let status = exec.wait_with_output().unwrap().status;
    assert!(status.success(), "{status:?}");
    // So are packets through its TAP: a TCP connection a second from the
    // host to its SSH port.
    let ip: std::net::Ipv4Addr = env.vm("one")["ipv4"].as_str().unwrap().parse().unwrap();
    env.ns.run(move || {
        for _ in 0..10 {
            let c = std::net::TcpStream::connect_timeout(&(ip, 22).into(), Duration::from_secs(5));
            assert!(c.is_ok(), "{c:?}");
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(
        running(&env),
        "suspended while in use over the network: {}",
        env.vm("one")
    );
    // Left alone, it is suspended, and its next start resumes it.
    let suspended = banger_testbed::eventually(Duration::from_secs(60), || {
        let vm = env.vm("one");
        (vm["state"] == "stopped" && vm["suspended"] == true).then_some(())
    });
    assert!(suspended.is_some(), "never suspended: {}", env.vm("one"));
    assert!(state_file(&env, "one").is_file());
    let out = env.ok(&["vm", "start", "one"]);
    assert!(out.contains("restore"), "{out}");
    assert!(!out.contains("cold boot"), "{out}");
    assert!(running(&env));
}
