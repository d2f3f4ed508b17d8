//! The test bed's own tests: real dbus-daemon, polkitd, journald and
//! bangerd. Run as root after `cargo build --workspace --bins`:
//! `cargo test -p banger-testbed`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_testbed::{
    Journald, MANAGER_NAME, Options, POLKIT_NAME, TestBed, TestUser, eventually, journal_entries,
    pid_alive,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the banger-testbed self-tests must run as root"
    );
}

/// A bus and nothing else.
fn bare() -> Options {
    Options {
        polkit: false,
        journald: false,
        start_daemon: false,
        ..Options::default()
    }
}

/// The real bangerd behind a small shell wrapper that prints its
/// environment first and, when `WRAPPER_EXIT` is set, fails like a daemon
/// with a bad configuration instead of starting.
fn wrapped_bangerd(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("bangerd-wrapper");
    let script = format!(
        "#!/bin/sh\nenv\nif [ -n \"$WRAPPER_EXIT\" ]; then echo 'wrapped bangerd: bad config'; exit \"$WRAPPER_EXIT\"; fi\nexec {}\n",
        banger_testbed::bin_path("bangerd").display()
    );
    std::fs::write(&path, script).expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn show(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn bus_starts_and_answers_root_and_other_users() {
    require_root();
    let bed = TestBed::start(bare()).expect("start the test bed");
    assert!(
        bed.bus_address()
            .starts_with("unix:path=/tmp/banger-testbed-")
    );

    let list = bed.busctl(["list"]);
    assert!(list.status.success(), "{}", show(&list));
    assert!(String::from_utf8_lossy(&list.stdout).contains("org.freedesktop.DBus"));

    // busctl --system honors DBUS_SYSTEM_BUS_ADDRESS.
    let system = bed
        .command("busctl")
        .args(["--system", "status", "org.freedesktop.DBus"])
        .output()
        .expect("busctl --system");
    assert!(system.status.success(), "{}", show(&system));
    let bus_pid = bed.bus_pid().expect("a bus");
    assert!(
        String::from_utf8_lossy(&system.stdout).contains(&format!("PID={bus_pid}")),
        "busctl --system reached another bus: {}",
        show(&system)
    );

    // A non-root user gets in (allow user="*", a 0755 directory).
    let user = TestUser::create().expect("create a test user");
    let as_user = bed
        .command_as(&user, "busctl")
        .args(["--system", "list"])
        .output()
        .expect("busctl as the test user");
    assert!(as_user.status.success(), "{}", show(&as_user));

    // No daemon, no service activation: nobody owns org.banger.Manager.
    assert!(!bed.name_has_owner(MANAGER_NAME));
}

fn pkcheck(command: &mut Command) -> Output {
    // $$ is pkcheck's own pid after exec: the subject is pkcheck itself.
    command
        .args([
            "-c",
            "exec pkcheck --action-id org.freedesktop.policykit.exec --process $$",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run pkcheck")
}

#[test]
fn polkit_answers_for_real() {
    require_root();
    let bed = TestBed::start(Options {
        journald: false,
        start_daemon: false,
        ..Options::default()
    })
    .expect("start the test bed");
    assert!(bed.name_has_owner(POLKIT_NAME));
    if Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/org.banger.policy"
    ))
    .exists()
    {
        assert!(Path::new("/usr/share/polkit-1/actions/org.banger.policy").exists());
    }

    let root = pkcheck(&mut bed.command("sh"));
    assert!(
        root.status.success(),
        "root is not authorized: {}",
        show(&root)
    );

    let user = TestUser::create().expect("create a test user");
    let denied = pkcheck(&mut bed.command_as(&user, "sh"));
    assert!(
        !denied.status.success(),
        "the user is authorized: {}",
        show(&denied)
    );

    let rule = bed
        .install_polkit_rule(
            &format!("10-{}", user.name()),
            &format!(
                r#"polkit.addRule(function(action, subject) {{
    if (action.id == "org.freedesktop.policykit.exec" && subject.user == "{}") {{
        return polkit.Result.YES;
    }}
}});
"#,
                user.name()
            ),
        )
        .expect("install a rule");
    let allowed = eventually(Duration::from_secs(5), || {
        pkcheck(&mut bed.command_as(&user, "sh"))
            .status
            .success()
            .then_some(())
    });
    assert!(allowed.is_some(), "the rule did not take effect");

    drop(rule);
    let denied_again = eventually(Duration::from_secs(5), || {
        (!pkcheck(&mut bed.command_as(&user, "sh")).status.success()).then_some(())
    });
    assert!(
        denied_again.is_some(),
        "removing the rule did not take effect"
    );
}

#[test]
fn journald_records_entries() {
    require_root();
    let journald = Journald::ensure().expect("a journald");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    let tag = format!("banger-testbed-selftest-{}-{nanos}", std::process::id());
    let status = Command::new("systemd-cat")
        .args(["-t", &tag, "echo", "hello from the self-test"])
        .status()
        .expect("run systemd-cat");
    assert!(status.success());
    let filter = format!("SYSLOG_IDENTIFIER={tag}");
    let entry = eventually(Duration::from_secs(10), || {
        journald
            .entries(&[&filter])
            .into_iter()
            .find(|entry| entry["MESSAGE"] == "hello from the self-test")
    })
    .expect("the entry reached the journal");
    assert_eq!(entry["_TRANSPORT"], "stdout");
    // The free function finds it too.
    assert!(!journal_entries(&[&filter]).is_empty());
}

#[test]
fn teardown_leaves_no_process_behind() {
    require_root();
    let bed = TestBed::start(Options {
        journald: false,
        start_daemon: true,
        ..Options::default()
    })
    .expect("start the test bed");
    let processes = bed.processes();
    let roles: BTreeSet<&str> = processes.iter().map(|(role, _)| *role).collect();
    assert_eq!(
        roles,
        BTreeSet::from(["bangerd", "dbus-daemon", "polkitd", "polkitd-wrapper"])
    );
    for (role, pid) in &processes {
        assert!(pid_alive(*pid), "{role} ({pid}) is not running");
    }
    let dir = bed.dir().to_path_buf();
    drop(bed);
    for (role, pid) in &processes {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{role} ({pid}) is left"
        );
    }
    assert!(!dir.exists(), "{} is left", dir.display());
}

const HOLD_ENV: &str = "BANGER_TESTBED_SELFTEST_HOLD";

/// Helper of `children_die_with_a_killed_test_process`: starts a test bed,
/// prints its processes and waits to be killed.
#[test]
#[ignore = "run by children_die_with_a_killed_test_process"]
fn hold_a_testbed_until_killed() {
    if std::env::var_os(HOLD_ENV).is_none() {
        return;
    }
    let bed = TestBed::start(Options {
        journald: false,
        ..Options::default()
    })
    .expect("start the test bed");
    let pids: Vec<String> = bed
        .processes()
        .iter()
        .map(|(role, pid)| format!("{role}={pid}"))
        .collect();
    println!("HOLDING {} {}", bed.dir().display(), pids.join(" "));
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn children_die_with_a_killed_test_process() {
    require_root();
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "hold_a_testbed_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run this test executable again");
    let stdout = child.stdout.take().expect("stdout");
    let holding = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // libtest prints "test NAME ... " on the same line first.
        .find_map(|line| Some(line[line.find("HOLDING ")?..].to_owned()));
    let Some(holding) = holding else {
        let _ = child.kill();
        let status = child.wait().expect("wait");
        panic!("the helper test did not start its test bed ({status})");
    };
    let mut words = holding.split_whitespace().skip(1);
    let dir = PathBuf::from(words.next().expect("a directory"));
    let processes: Vec<(String, u32)> = words
        .map(|word| {
            let (role, pid) = word.split_once('=').expect("role=pid");
            (role.to_owned(), pid.parse().expect("a pid"))
        })
        .collect();
    assert_eq!(processes.len(), 4, "{holding}");
    for (role, pid) in &processes {
        assert!(pid_alive(*pid), "{role} ({pid}) is not running");
    }

    child.kill().expect("SIGKILL the helper");
    let status = child.wait().expect("wait for the helper");
    assert_eq!(status.signal(), Some(9));

    let left = eventually(Duration::from_secs(10), || {
        let left: Vec<_> = processes
            .iter()
            .filter(|(_, pid)| pid_alive(*pid))
            .collect();
        left.is_empty().then_some(())
    });
    let still: Vec<_> = processes
        .iter()
        .filter(|(_, pid)| pid_alive(*pid))
        .collect();
    // Nothing else cleans up after a killed process: do it here.
    for (_, pid) in &still {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(left.is_some(), "left running after SIGKILL: {still:?}");
    // The next test bed (of any process but the dead one) removes the dead
    // one's directory; this process may have started its test beds already.
    assert!(dir.join("owner.pid").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_lifecycle_with_the_real_bangerd() {
    require_root();
    let wrapper_dir = tempfile::tempdir().expect("tempdir");
    let mut bed = TestBed::start(Options {
        polkit: false,
        journald: false,
        start_daemon: true,
        config_toml: Some("[daemon]\njob_retention_secs = 5\n".to_owned()),
        bangerd_path: Some(wrapped_bangerd(wrapper_dir.path())),
        netns: None,
    })
    .expect("start the test bed");
    assert!(bed.name_has_owner(MANAGER_NAME));
    assert!(bed.daemon_pid().is_some());
    // The configuration given, plus a DNS port of the bed's own.
    let config = std::fs::read_to_string(bed.config_path()).expect("the configuration");
    assert!(
        config
            .starts_with("[daemon]\njob_retention_secs = 5\n[network]\ndns_listen = \"127.0.0.1:"),
        "{config}"
    );
    let log = bed.daemon_log();
    for (key, dir) in [
        ("STATE_DIRECTORY", bed.state_dir()),
        ("CACHE_DIRECTORY", bed.cache_dir()),
        ("RUNTIME_DIRECTORY", bed.runtime_dir()),
        ("CONFIGURATION_DIRECTORY", bed.config_dir()),
    ] {
        assert!(dir.is_dir());
        assert!(
            log.contains(&format!("{key}={}\n", dir.display())),
            "{key}: {log}"
        );
    }
    assert!(log.contains(&format!("DBUS_SYSTEM_BUS_ADDRESS={}\n", bed.bus_address())));

    // A second start while it runs is refused.
    assert!(bed.start_daemon().is_err());

    // bangerd exits cleanly on SIGTERM.
    let status = bed.stop_daemon().expect("stop");
    assert!(status.success(), "{status:?}");
    assert!(bed.daemon_pid().is_none());
    assert!(bed.wait_for_name_gone(MANAGER_NAME, Duration::from_secs(5)));

    bed.start_daemon_with_env(&[("NOTIFY_SOCKET", "/nonexistent/notify")])
        .expect("start again");
    assert!(
        bed.daemon_log()
            .contains("NOTIFY_SOCKET=/nonexistent/notify\n")
    );
    let status = bed.kill_daemon().expect("it was running");
    assert_eq!(status.signal(), Some(9));
    assert!(bed.kill_daemon().is_none());

    // A daemon that fails to start: the error carries its output.
    let err = bed
        .start_daemon_with_env(&[("WRAPPER_EXIT", "3")])
        .expect_err("it exits");
    assert!(
        err.to_string().contains("wrapped bangerd: bad config"),
        "{err}"
    );

    // Run to exit: the status and this run's output.
    let (status, log) = bed
        .run_daemon_to_exit_with_env(&[("WRAPPER_EXIT", "3")], Duration::from_secs(10))
        .expect("run");
    assert_eq!(status.and_then(|s| s.code()), Some(3));
    assert!(log.contains("wrapped bangerd: bad config"), "{log}");
    assert_eq!(log.matches("bad config").count(), 1, "{log}");

    // One that does not exit in time is killed and reported as None.
    let (status, log) = bed.run_daemon_to_exit(Duration::from_secs(1)).expect("run");
    assert!(status.is_none());
    // (bangerd's own lines may have gone to a journal; the wrapper's did not.)
    assert!(log.contains("DBUS_SYSTEM_BUS_ADDRESS="), "{log}");
}

#[test]
fn user_with_a_supplementary_group() {
    require_root();
    let user = TestUser::create_in_group("banger").expect("create a test user in group banger");
    let banger = nix::unistd::Group::from_name("banger")
        .expect("look up group banger")
        .expect("group banger exists");
    assert_eq!(user.supplementary_gids(), [banger.gid.as_raw()]);
    assert!(
        banger.mem.iter().any(|m| m == user.name()),
        "{:?}",
        banger.mem
    );

    let id = |flag: &str| {
        let out = user.command("id").arg(flag).output().expect("run id");
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(id("-u"), user.uid().to_string());
    assert_eq!(id("-g"), user.gid().to_string());
    let groups: BTreeSet<String> = id("-G").split_whitespace().map(str::to_owned).collect();
    assert_eq!(
        groups,
        BTreeSet::from([user.gid().to_string(), banger.gid.to_string()])
    );
    let home = user
        .command("sh")
        .args(["-c", "echo $HOME; pwd"])
        .output()
        .expect("sh");
    let home_text = String::from_utf8_lossy(&home.stdout);
    let home_path = user.home().to_string_lossy();
    assert_eq!(
        home_text.lines().collect::<Vec<_>>(),
        [&*home_path, &*home_path]
    );

    // A plain user has no supplementary group.
    let plain = TestUser::create().expect("create a test user");
    let out = plain.command("id").arg("-G").output().expect("run id");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        plain.gid().to_string()
    );

    let name = user.name().to_owned();
    drop(user);
    let gone = Command::new("getent")
        .args(["passwd", &name])
        .output()
        .expect("getent");
    assert!(!gone.status.success(), "{name} is left");
}
