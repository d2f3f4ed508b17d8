//! bangerd on a real private system bus with real polkitd and journald.
//! Needs root (the test bed installs polkit files and creates users).

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use banger_dbus::proxy::{JobProxy, ManagerProxy};
use banger_dbus::{Error as WireError, INTERFACE_XML, JOB_INTERFACE, MANAGER_INTERFACE};
use banger_testbed::{Journald, Options, TestBed, TestUser, eventually};
use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, Variant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(bed: &TestBed) -> Connection {
    zbus::connection::Builder::address(bed.bus_address())
        .build()
        .await
        .expect("connect to the test bus")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `gdbus call` (a real, independent D-Bus client) of Manager.Maintain.
fn gdbus_maintain(cmd: &mut std::process::Command, interactive: bool) -> Output {
    gdbus_manager(cmd, "Maintain", interactive, "{}")
}

/// `gdbus call` of the manager's `method` with `argument`.
fn gdbus_manager(
    cmd: &mut std::process::Command,
    method: &str,
    interactive: bool,
    argument: &str,
) -> Output {
    cmd.args([
        "call",
        "--system",
        "--dest",
        "org.banger.Manager",
        "--object-path",
        "/org/banger/Manager",
        "--method",
    ])
    .arg(format!("org.banger.Manager.{method}"));
    if interactive {
        cmd.arg("--interactive");
    }
    cmd.arg(argument).output().expect("run gdbus")
}

fn quick_config(extra: &str) -> Options {
    Options {
        config_toml: Some(format!("[daemon]\njob_retention_secs = 2\n{extra}")),
        ..Options::default()
    }
}

#[derive(Debug, PartialEq)]
enum Signal {
    Progress(String),
    StageFinished(String),
    Completed(bool, String),
}

/// Subscribe to every job signal before any call, as clients must.
async fn job_signals(conn: &Connection) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface(JOB_INTERFACE)
        .path_namespace("/org/banger/Manager/job")
        .build()
        .expect("match rule");
    MessageStream::for_match_rule(rule, conn, None)
        .await
        .expect("subscribe")
}

async fn collect_until_completed(stream: &mut MessageStream, job: &OwnedObjectPath) -> Vec<Signal> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await {
        let msg = msg.expect("message");
        let header = msg.header();
        if header.path().map(|p| p.as_str()) != Some(job.as_str()) {
            continue;
        }
        let body = msg.body();
        match header.member().map(|m| m.as_str()) {
            Some("Progress") => {
                let (stage, _detail, _fraction): (String, String, f64) =
                    body.deserialize().expect("Progress body");
                out.push(Signal::Progress(stage));
            }
            Some("StageFinished") => {
                let (stage, _usec): (String, u64) = body.deserialize().expect("StageFinished body");
                out.push(Signal::StageFinished(stage));
            }
            Some("Completed") => {
                let (success, name, _message, _result): (bool, String, String, OwnedObjectPath) =
                    body.deserialize().expect("Completed body");
                out.push(Signal::Completed(success, name));
                return out;
            }
            other => panic!("unexpected job signal {other:?}"),
        }
    }
    panic!("no Completed within 30 s; got {out:?}");
}

#[test]
fn serves_the_checked_in_interfaces() {
    let bed = TestBed::start(quick_config("")).expect("test bed");
    let out = bed.busctl(["introspect", "org.banger.Manager", "/org/banger/Manager"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    for member in [
        ".Doctor",
        ".Maintain",
        ".Reload",
        ".ApiVersion",
        ".Status",
        ".Version",
    ] {
        assert!(
            listing.contains(member),
            "busctl does not show {member}:\n{listing}"
        );
    }
    assert!(listing.contains("org.freedesktop.DBus.ObjectManager"));

    let xml = |path: &str| {
        let out = bed.busctl(["--xml-interface", "introspect", "org.banger.Manager", path]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let checked_in = |name: &str| {
        let (_, file) = INTERFACE_XML
            .iter()
            .find(|(n, _)| *n == name)
            .expect("checked-in xml");
        banger_dbus::interface_element(file, name).expect("element in file")
    };
    let served = banger_dbus::interface_element(&xml("/org/banger/Manager"), MANAGER_INTERFACE)
        .expect("manager served");
    assert_eq!(
        served,
        checked_in(MANAGER_INTERFACE),
        "the served org.banger.Manager drifted from dbus/interfaces/org.banger.Manager.xml"
    );

    let rt = runtime();
    let job = rt.block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");
        manager.maintain(HashMap::new()).await.expect("maintain")
    });
    let served =
        banger_dbus::interface_element(&xml(job.as_str()), JOB_INTERFACE).expect("job served");
    assert_eq!(
        served,
        checked_in(JOB_INTERFACE),
        "the served org.banger.Job drifted from dbus/interfaces/org.banger.Job.xml"
    );
}

#[test]
fn root_maintain_job_reports_stages_in_order_then_disappears() {
    let bed = TestBed::start(quick_config("")).expect("test bed");
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let mut signals = job_signals(&conn).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");
        assert_eq!(
            manager.api_version().await.expect("ApiVersion"),
            banger_dbus::API_VERSION
        );
        assert_eq!(
            manager.version().await.expect("Version"),
            env!("CARGO_PKG_VERSION")
        );

        let mut options = HashMap::new();
        let yes = Variant::from(true);
        options.insert("vacuum", &yes);
        let job = manager.maintain(options).await.expect("root may maintain");
        assert!(banger_dbus::parse_job_path(job.as_str()).is_some(), "{job}");

        let got = collect_until_completed(&mut signals, &job).await;
        let stages = [
            "check integrity",
            "prune job history",
            "checkpoint",
            "optimize",
            "vacuum",
        ];
        let mut expected = Vec::new();
        for stage in stages {
            expected.push(Signal::Progress(stage.into()));
            if stage == "check integrity" || stage == "prune job history" {
                // These two report a detail within the stage.
                expected.push(Signal::Progress(stage.into()));
            }
            expected.push(Signal::StageFinished(stage.into()));
        }
        expected.push(Signal::Completed(true, String::new()));
        assert_eq!(got, expected);

        let proxy = JobProxy::builder(&conn)
            .path(job.clone())
            .build()
            .await
            .expect("job proxy");
        assert_eq!(proxy.state().await.expect("State"), "succeeded");
        assert_eq!(proxy.kind().await.expect("Kind"), "maintain");
        assert_eq!(proxy.owner_uid().await.expect("OwnerUID"), 0);
        assert!(!proxy.cancelable().await.expect("Cancelable"));
        assert!((proxy.progress().await.expect("Progress") - 1.0).abs() < f64::EPSILON);
        let timings = proxy.stages().await.expect("Stages");
        assert_eq!(
            timings.iter().map(|t| t.stage.as_str()).collect::<Vec<_>>(),
            stages
        );

        // Cancelling a finished job is a typed error, not a crash.
        let err = proxy.cancel().await.expect_err("already finished");
        assert!(matches!(err, WireError::Failed(_)), "{err:?}");

        // Retention is 2 s: the object goes away, and ObjectManager says so.
        let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
            .destination("org.banger.Manager")
            .path("/org/banger/Manager")
            .build()
            .await
            .expect("object manager");
        let listed = om.get_managed_objects().await.expect("GetManagedObjects");
        assert!(
            listed.keys().any(|p| p.as_str() == job.as_str()),
            "job listed while retained"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let listed = om.get_managed_objects().await.expect("GetManagedObjects");
        assert!(
            !listed.keys().any(|p| p.as_str() == job.as_str()),
            "job still listed"
        );

        // Its outcome outlives its object: a client that comes late still
        // learns how it ended.
        let n = banger_dbus::parse_job_path(job.as_str()).expect("number");
        let outcome = manager.job_outcome(n).await.expect("JobOutcome");
        assert_eq!(outcome.state, "succeeded");
        assert_eq!(
            (outcome.error_name.as_str(), outcome.message.as_str()),
            ("", "")
        );
        assert_eq!(outcome.result.as_str(), "/");
        assert_eq!(outcome.stages, timings);
        let err = manager
            .job_outcome(n + 1000)
            .await
            .expect_err("no such job");
        assert!(matches!(err, WireError::NotFound(_)), "{err:?}");
    });
}

#[test]
fn cancel_stops_a_running_job() {
    // Stages pause 60 s; a cancel must end the job long before that, even
    // on a loaded machine.
    let bed =
        TestBed::start(quick_config("[debug]\njob_stage_delay_ms = 60000\n")).expect("test bed");
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let mut signals = job_signals(&conn).await;
        // Uncached: each Status read asks the daemon.
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("proxy");
        let job = manager.maintain(HashMap::new()).await.expect("maintain");
        assert_eq!(manager.status().await.expect("Status"), "1 job running");
        let proxy = JobProxy::builder(&conn)
            .path(job.clone())
            .build()
            .await
            .expect("job proxy");
        assert!(proxy.cancelable().await.expect("Cancelable"));
        let started = std::time::Instant::now();
        proxy.cancel().await.expect("cancel");
        let got = collect_until_completed(&mut signals, &job).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cancel did not interrupt the stage"
        );
        assert_eq!(
            got.last(),
            Some(&Signal::Completed(
                false,
                "org.banger.Error.Cancelled".into()
            ))
        );
        assert_eq!(proxy.state().await.expect("State"), "cancelled");
        assert_eq!(manager.status().await.expect("Status"), "idle");
        let n = banger_dbus::parse_job_path(job.as_str()).expect("number");
        let outcome = manager.job_outcome(n).await.expect("JobOutcome");
        assert_eq!(outcome.state, "cancelled");
        assert_eq!(outcome.error_name, "org.banger.Error.Cancelled");
        assert!(
            outcome.message.contains("cancelled by uid 0"),
            "{outcome:?}"
        );
    });
}

#[test]
fn polkit_decides_for_other_users() {
    let bed = TestBed::start(quick_config("")).expect("test bed");
    let user = TestUser::create().expect("test user");

    // Without a rule, the action needs an administrator's password: a call
    // that does not allow interaction is told so, one that does is denied
    // because no agent can ask.
    let out = gdbus_maintain(&mut bed.command_as(&user, "gdbus"), false);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains("banger group"),
        "message says what to do: {err}"
    );

    let out = gdbus_maintain(&mut bed.command_as(&user, "gdbus"), true);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("org.banger.Error.PermissionDenied"),
        "{}",
        text(&out)
    );

    // Root is allowed by polkit.
    let out = gdbus_maintain(&mut bed.command("gdbus"), false);
    assert!(out.status.success(), "{}", text(&out));

    // How root's job ended is root's (and VM managers') to read.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let number = stdout
        .split("/job/")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("a job path")
        .to_owned();
    let out = gdbus_manager(
        &mut bed.command_as(&user, "gdbus"),
        "JobOutcome",
        false,
        &number,
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InteractiveAuthorizationRequired"),
        "{}",
        text(&out)
    );

    // A rule granting this user the action makes the same call succeed.
    let _rule = bed
        .install_polkit_rule(
            &format!("10-{}", user.name()),
            &format!(
                "polkit.addRule(function (action, subject) {{\n\
                   if (action.id == \"org.banger.maintain\" && subject.user == \"{}\")\n\
                     return polkit.Result.YES;\n\
                 }});\n",
                user.name()
            ),
        )
        .expect("rule");
    let granted = eventually(Duration::from_secs(10), || {
        let out = gdbus_maintain(&mut bed.command_as(&user, "gdbus"), false);
        out.status.success().then_some(out)
    });
    let out = granted.expect("the rule grants the user");
    assert!(String::from_utf8_lossy(&out.stdout).contains("/org/banger/Manager/job/"));

    // Reading stays open to everyone.
    let out = bed
        .command_as(&user, "busctl")
        .args([
            "--system",
            "get-property",
            "org.banger.Manager",
            "/org/banger/Manager",
        ])
        .args(["org.banger.Manager", "Status"])
        .output()
        .expect("busctl");
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_shipped_rules_file_grants_the_banger_group_everyday_actions_only() {
    let bed = TestBed::start(quick_config("")).expect("test bed");
    let member = TestUser::create_in_group("banger").expect("member");
    let rules = include_str!("../../../packaging/50-banger.rules");
    let _rule = bed
        .install_polkit_rule(&format!("50-banger-{}", member.name()), rules)
        .expect("install the shipped rules");
    // Maintenance is not an everyday action: still refused for members.
    std::thread::sleep(Duration::from_secs(1));
    let out = gdbus_maintain(&mut bed.command_as(&member, "gdbus"), false);
    assert!(!out.status.success(), "{}", text(&out));
    // pkcheck, a real polkit client, confirms the grant for an everyday
    // action, asked about a process of the member.
    let mut sleeper = member
        .command("sleep")
        .arg("60")
        .spawn()
        .expect("a process of the member");
    let granted = eventually(Duration::from_secs(10), || {
        let out = bed
            .command("pkcheck")
            .args(["--action-id", "org.banger.vm.create", "--process"])
            .arg(sleeper.id().to_string())
            .output()
            .ok()?;
        out.status.success().then_some(())
    });
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        granted.is_some(),
        "the banger group is not granted org.banger.vm.create"
    );
}

#[test]
fn without_polkit_root_is_allowed_and_others_are_told_why_not() {
    let bed = TestBed::start(Options {
        polkit: false,
        ..quick_config("")
    })
    .expect("test bed");
    let out = gdbus_maintain(&mut bed.command("gdbus"), false);
    assert!(out.status.success(), "{}", text(&out));

    let user = TestUser::create().expect("test user");
    let out = gdbus_maintain(&mut bed.command_as(&user, "gdbus"), true);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("org.banger.Error.PermissionDenied"), "{err}");
    assert!(err.contains("polkit is not running"), "{err}");

    runtime().block_on(async {
        let conn = connect(&bed).await;
        let checks = ManagerProxy::new(&conn)
            .await
            .expect("proxy")
            .doctor()
            .await
            .expect("doctor");
        let polkit = checks
            .iter()
            .find(|c| c.name == "polkit")
            .expect("polkit check");
        assert_eq!(polkit.verdict, "fail", "{polkit:?}");
        // The tools' sandbox, made by the real helper as a child here.
        let sandbox = checks
            .iter()
            .find(|c| c.name == "tools-sandbox")
            .expect("tools-sandbox check");
        assert_eq!(sandbox.verdict, "pass", "{sandbox:?}");
    });
}

#[test]
fn bad_arguments_get_typed_errors_and_the_daemon_keeps_serving() {
    let bed = TestBed::start(quick_config("")).expect("test bed");
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");

        let typo = Variant::from(true);
        let err = manager
            .maintain(HashMap::from([("vacum", &typo)]))
            .await
            .expect_err("unknown key");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("vacum")),
            "{err:?}"
        );

        let wrong = Variant::from("yes");
        let err = manager
            .maintain(HashMap::from([("vacuum", &wrong)]))
            .await
            .expect_err("wrong type");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("(b)")),
            "{err:?}"
        );

        // Wrong signature: the bus layer refuses it before any code runs.
        let raw = zbus::Proxy::new(
            &conn,
            "org.banger.Manager",
            "/org/banger/Manager",
            "org.banger.Manager",
        )
        .await
        .expect("raw proxy");
        let err = raw
            .call::<_, _, OwnedObjectPath>("Maintain", &("not a dict",))
            .await
            .expect_err("bad signature");
        assert!(
            matches!(&err, zbus::Error::FDO(e) if matches!(**e, zbus::fdo::Error::InvalidArgs(_))),
            "{err:?}"
        );

        // A job that never existed.
        let ghost = JobProxy::builder(&conn)
            .path("/org/banger/Manager/job/999999")
            .build()
            .await
            .expect("proxy");
        assert!(ghost.cancel().await.is_err());

        // Still serving.
        assert!(!manager.doctor().await.expect("doctor").is_empty());
    });
}

#[test]
fn bad_config_stops_start_up_and_a_bad_reload_keeps_the_old_config() {
    let bed = TestBed::start(Options {
        start_daemon: false,
        config_toml: Some("[daemon]\njob_retention = 5\n".into()),
        ..Options::default()
    })
    .expect("test bed");
    let (status, log) = bed
        .run_daemon_to_exit(Duration::from_secs(20))
        .expect("run bangerd");
    let status = status.expect("bangerd exits on a bad config");
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("job_retention"),
        "the error names the key: {log}"
    );

    std::fs::write(bed.config_path(), "[daemon]\njob_retention_secs = 2\n").expect("good config");
    let mut bed = bed;
    bed.start_daemon().expect("starts with a good config");
    runtime().block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");
        std::fs::write(bed.config_path(), "[vm]\nvmm = \"kvmtool\"\n").expect("bad config");
        let err = manager.reload().await.expect_err("bad reload");
        assert!(
            matches!(&err, WireError::InvalidArgument(m) if m.contains("kvmtool")),
            "{err:?}"
        );
        // SIGHUP with the same bad file: logged, not fatal.
        let pid = bed.daemon_pid().expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(manager.status().await.expect("still serving"), "idle");
        std::fs::write(bed.config_path(), "[daemon]\njob_retention_secs = 2\n")
            .expect("good config");
        manager.reload().await.expect("good reload");
    });
    let refused = eventually(Duration::from_secs(10), || {
        bed.daemon_journal().into_iter().find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("reload refused"))
        })
    });
    assert!(refused.is_some(), "the refused SIGHUP reload is logged");
}

#[test]
fn sd_notify_ready_status_and_clean_sigterm() {
    let mut bed = TestBed::start(Options {
        start_daemon: false,
        ..quick_config("")
    })
    .expect("test bed");
    let socket_path = bed.state_dir().with_file_name("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    bed.start_daemon_with_env(&[
        ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
        // WatchdogSec=1s
        ("WATCHDOG_USEC", "1000000"),
    ])
    .expect("start");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(first.lines().any(|l| l == "STATUS=idle"), "{first}");
    // Watchdog pings at half the interval: three within two seconds.
    let started = std::time::Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let n = socket.recv(&mut buf).expect("a watchdog ping");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let status = bed.stop_daemon().expect("stop");
    assert!(
        status.success(),
        "SIGTERM is a clean exit: {status:?}\n{}",
        bed.daemon_log()
    );
    // Pings may still be queued before it.
    loop {
        let n = socket.recv(&mut buf).expect("stopping notification");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

#[test]
fn exits_when_idle_under_systemd_and_not_while_called() {
    let mut bed = TestBed::start(Options {
        start_daemon: false,
        ..quick_config("idle_exit_secs = 2\n")
    })
    .expect("test bed");
    // systemd's mark on the processes it starts: something brings bangerd
    // back, so it may go.
    bed.start_daemon_with_env(&[("INVOCATION_ID", "0123456789abcdef0123456789abcdef")])
        .expect("start");
    // Calls every half second keep it serving well past the idle time.
    let rt = runtime();
    rt.block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("proxy");
        for _ in 0..10 {
            assert_eq!(manager.status().await.expect("Status"), "idle");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert!(
        bed.name_has_owner(banger_dbus::BUS_NAME),
        "bangerd left while called:\n{}",
        bed.daemon_log()
    );
    // Then quiet: it exits cleanly (systemd does not restart it).
    let status = bed
        .wait_daemon_exit(Duration::from_secs(10))
        .expect("wait")
        .unwrap_or_else(|| panic!("still running after 10 s idle:\n{}", bed.daemon_log()));
    assert!(status.success(), "{status:?}\n{}", bed.daemon_log());
    assert!(!bed.name_has_owner(banger_dbus::BUS_NAME));
}

#[test]
fn does_not_exit_when_idle_without_systemd() {
    let mut bed = TestBed::start(quick_config("idle_exit_secs = 1\n")).expect("test bed");
    assert_eq!(
        bed.wait_daemon_exit(Duration::from_secs(4)).expect("wait"),
        None,
        "nothing would start it again:\n{}",
        bed.daemon_log()
    );
    assert!(bed.name_has_owner(banger_dbus::BUS_NAME));
}

#[test]
fn a_killed_daemon_restarts_consistent() {
    let mut bed =
        TestBed::start(quick_config("[debug]\njob_stage_delay_ms = 20000\n")).expect("test bed");
    let rt = runtime();
    let first = rt.block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");
        manager.maintain(HashMap::new()).await.expect("maintain")
    });
    bed.kill_daemon();
    bed.start_daemon().expect("restart");
    let first_id = banger_dbus::parse_job_path(first.as_str()).expect("job id");
    let db = rusqlite::Connection::open(bed.state_dir().join("banger.db")).expect("store");
    let state: String = db
        .query_row(
            "SELECT state FROM jobs WHERE id = ?1",
            [first_id as i64],
            |r| r.get(0),
        )
        .expect("job row");
    assert_eq!(state, "interrupted");
    rt.block_on(async {
        let conn = connect(&bed).await;
        let manager = ManagerProxy::new(&conn).await.expect("proxy");
        assert_eq!(manager.status().await.expect("Status"), "idle");
        let second = manager.maintain(HashMap::new()).await.expect("maintain");
        let second_id = banger_dbus::parse_job_path(second.as_str()).expect("job id");
        assert!(second_id > first_id, "job numbers are never reused");
    });
}

#[test]
fn journald_holds_structured_entries() {
    let _journald = Journald::ensure().expect("journald");
    let bed = TestBed::start(quick_config("")).expect("test bed");
    let job = runtime().block_on(async {
        let conn = connect(&bed).await;
        ManagerProxy::new(&conn)
            .await
            .expect("proxy")
            .maintain(HashMap::new())
            .await
            .expect("maintain")
    });
    let id = banger_dbus::parse_job_path(job.as_str())
        .expect("id")
        .to_string();
    let entry = eventually(Duration::from_secs(10), || {
        bed.daemon_journal()
            .into_iter()
            .find(|e| e["MESSAGE"] == "job succeeded")
    })
    .expect("bangerd's job entry in the journal");
    assert_eq!(entry["BANGER_JOB_ID"], id.as_str(), "{entry}");
    assert_eq!(entry["BANGER_JOB_KIND"], "maintain", "{entry}");
    assert!(
        !bed.daemon_log().contains("job succeeded"),
        "with a journal, logs go there and not to stderr"
    );
}
