//! Integration tests of the `banger` binary.
//!
//! The first group needs nothing but the binary. The second runs it against
//! the real bangerd on a private system bus with the project's policy, real
//! polkitd and journald (`banger-testbed`); it needs root and the binaries
//! built first (`cargo build --workspace --bins`).
//!
//! Every run of `banger` here is bounded: it is killed (with its process
//! group) and the test fails when it does not exit in time.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use banger_testbed::{Options, TestBed, TestUser, doctor_check, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const NO_BUS: &str = "unix:path=/nonexistent/banger-test/bus";

/// How long one run of `banger` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The stages of `Manager.Maintain`, in order (docs/dbus-api.md).
const MAINTAIN_STAGES: [&str; 4] = [
    "check integrity",
    "prune job history",
    "checkpoint",
    "optimize",
];

const INTERACTIVE_AUTH_REQUIRED: &str =
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";

// --- helpers ---------------------------------------------------------------

/// The `banger` binary on a bus that does not exist.
fn banger(bus_address: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_banger"));
    cmd.env("DBUS_SYSTEM_BUS_ADDRESS", bus_address);
    cmd
}

/// A slow job: every stage pauses 10 s (cancelling interrupts the pause).
/// Finished jobs stay visible for the default 10 s.
fn slow_jobs() -> Options {
    Options {
        config_toml: Some("[debug]\njob_stage_delay_ms = 10000\n".into()),
        ..Options::default()
    }
}

fn start(options: Options) -> TestBed {
    TestBed::start(options)
        .expect("start the test bed (needs root and `cargo build --workspace --bins`)")
}

/// Makes `cmd` safe to run from a test: no terminal on stdin, no session
/// bus, its own process group (so a timeout kills what it started too).
fn prepare(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Kills the process group of `child` (it leads one, see [`prepare`]).
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child`; kills it (and its group) and panics
/// when it does not exit in time.
fn wait_bounded(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return status;
        }
        if Instant::now() >= deadline {
            kill_group(child);
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion within `timeout` and collects its output.
fn run_for(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = prepare(cmd).spawn().expect("start the command");
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let status = wait_bounded(&mut child, timeout, &what);
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn run(cmd: &mut Command) -> Output {
    run_for(cmd, RUN_TIMEOUT)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything about a run, for assertion messages.
fn shown(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

/// stdout parsed as JSON.
fn json(out: &Output) -> Value {
    match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => panic!("stdout is not JSON ({e}):\n{}", shown(out)),
    }
}

/// The last `{"error": ...}` object in text that may hold other output
/// (a terminal mixes stdout and stderr).
fn json_error_in(text: &str) -> Option<Value> {
    text.match_indices('{').rev().find_map(|(i, _)| {
        let mut values = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) if value.get("error").is_some() => Some(value),
            _ => None,
        }
    })
}

/// Whether `text` is a duration as banger prints it (`850 µs`, `3 ms`,
/// `1.2 s`, `2 min 5 s`, `1 h 3 min`).
fn is_duration(text: &str) -> bool {
    let words: Vec<&str> = text.split(' ').collect();
    let number = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_digit());
    let tenths = |w: &str| {
        w.split_once('.')
            .is_some_and(|(a, b)| number(a) && b.len() == 1 && number(b))
    };
    match words.as_slice() {
        [n, "µs" | "ms"] => number(n),
        [n, "s"] => tenths(n),
        [m, "min", s, "s"] => number(m) && number(s),
        [h, "h", m, "min"] => number(h) && number(m),
        _ => false,
    }
}

/// `line` with a trailing duration (after `"  "` or `" in "`) replaced
/// by `<duration>`.
fn without_duration(line: &str) -> String {
    for sep in ["  ", " in "] {
        if let Some((head, tail)) = line.rsplit_once(sep)
            && is_duration(tail)
        {
            return format!("{head}{sep}<duration>");
        }
    }
    line.to_owned()
}

/// The job number of a job path.
fn job_number(path: &str) -> u64 {
    banger_dbus::parse_job_path(path).unwrap_or_else(|| panic!("not a job path: {path:?}"))
}

/// The bus's answer to `GetNameOwner(name)`.
fn name_owner(bed: &TestBed, name: &str) -> String {
    let out = bed.busctl([
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        "s",
        name,
    ]);
    assert!(out.status.success(), "{}", shown(&out));
    // `s ":1.4"`
    let text = stdout(&out);
    text.trim()
        .strip_prefix("s ")
        .map(|s| s.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("unexpected busctl output {text:?}"))
}

/// `banger job show N --json` as root.
fn job_show(bed: &TestBed, job: u64) -> Value {
    let out = run(bed
        .banger()
        .args(["job", "show", &job.to_string(), "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    json(&out)
}

/// A `banger` that runs in the background, its stdout read line by line;
/// killed (with its group) when dropped.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    seen: Vec<String>,
}

impl Background {
    fn start(cmd: &mut Command) -> Self {
        let mut child = prepare(cmd).spawn().expect("start banger");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Some(read_all(child.stderr.take()));
        Background {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a line that `want` accepts, and returns it.
    fn line_where(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    kill_group(&mut self.child);
                    panic!("no such line within {timeout:?} ({e}); got {:?}", self.seen);
                }
            }
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    /// Waits for the exit (bounded); returns the exit code, the rest of
    /// stdout and all of stderr.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
        let status = wait_bounded(&mut self.child, timeout, "banger");
        let rest: Vec<String> = self.lines.iter().collect();
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (
            status.code(),
            rest,
            String::from_utf8_lossy(&err).into_owned(),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_group(&mut self.child);
        }
    }
}

// --- without a daemon ------------------------------------------------------

#[test]
fn completions_for_bash() {
    let out = run(banger(NO_BUS).args(["completions", "bash"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.contains("banger"));
    assert!(script.contains("maintain"));
}

#[test]
fn man_page_on_stdout() {
    let out = run(banger(NO_BUS).arg("man"));
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH banger"), "{page}");
    assert!(page.contains(".SS \"banger daemon maintain\""));
    assert!(page.contains(".SH \"EXIT STATUS\""));
}

#[test]
fn man_pages_into_a_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(banger(NO_BUS).args(["man", "--dir"]).arg(dir.path()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("banger.1").is_file());
    assert!(dir.path().join("banger-daemon-maintain.1").is_file());
}

#[test]
fn help_documents_exit_codes() {
    let out = run(banger(NO_BUS).arg("--help"));
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("  9  not implemented yet"), "{help}");
    assert!(help.contains("130  interrupted"), "{help}");
}

#[test]
fn planned_commands_fail_with_9() {
    for args in [
        &["image", "pull", "debian-bookworm", "--kernel", "k"][..],
        &["image", "pull", "debian-bookworm", "--name", "other"],
    ] {
        let out = run(banger(NO_BUS).args(args));
        assert_eq!(out.status.code(), Some(9), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("is not implemented yet"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
}

#[test]
fn json_error_shape() {
    let out = run(banger(NO_BUS).args(["image", "pull", "debian", "--name", "x", "--json"]));
    assert_eq!(out.status.code(), Some(9));
    let value = json(&out);
    assert_eq!(
        value["error"]["name"],
        "org.banger.Cli.Error.NotImplemented"
    );
    assert_eq!(
        value["error"]["message"],
        "`banger image pull CATALOG-NAME --name/--kernel/--username/--authfile` is not implemented yet"
    );
    assert_eq!(value.as_object().map(|o| o.len()), Some(1));
}

#[test]
fn unreachable_bus_exits_3_with_a_hint() {
    let out = run(banger(NO_BUS).arg("doctor"));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("error: cannot reach the system bus at {NO_BUS}")),
        "{err}"
    );
    assert!(err.contains("DBUS_SYSTEM_BUS_ADDRESS"), "{err}");
    assert!(err.contains("\n  caused by: "), "{err}");
    assert!(stdout(&out).is_empty());

    let out = run(banger(NO_BUS).args(["--json", "doctor"]));
    assert_eq!(out.status.code(), Some(3));
    let value = json(&out);
    assert_eq!(value["error"]["name"], "org.banger.Cli.Error.Unreachable");
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot reach the system bus"), "{message}");
}

#[test]
fn bad_bus_address_exits_3() {
    let out = run(banger("this is no address").arg("daemon").arg("status"));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DBUS_SYSTEM_BUS_ADDRESS"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_without_daemon_still_succeeds() {
    let out = run(banger(NO_BUS).arg("version"));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(text.contains("bangerd  not reachable"), "{text}");

    let out = run(banger(NO_BUS).args(["version", "--json"]));
    assert!(out.status.success());
    let value = json(&out);
    assert_eq!(value["banger"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value["banger"]["api_version"], banger_dbus::API_VERSION);
    assert!(value["bangerd"].is_null());
    assert!(value["bangerd_error"]["message"].is_string());
}

#[test]
fn usage_errors_exit_2() {
    let out = run(banger(NO_BUS).args(["daemon", "maintain", "--bogus"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).is_empty());

    let out = run(banger(NO_BUS).args(["--json", "job", "cancel", "garbage"]));
    assert_eq!(out.status.code(), Some(2));
    let value = json(&out);
    assert_eq!(value["error"]["name"], "org.banger.Cli.Error.Usage");
    assert!(
        stderr(&out).contains("expected a job number"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_tests_read_what_banger_prints() {
    for good in ["850 µs", "3 ms", "1.2 s", "2 min 5 s", "1 h 3 min"] {
        assert!(is_duration(good), "{good}");
    }
    for bad in ["", "3", "1.25 s", "ms", "3 ms ", "x ms"] {
        assert!(!is_duration(bad), "{bad}");
    }
    let mixed = "banger: note\n{\n  \"error\": {\"name\": \"a.B\", \"message\": \"m {x}\"}\n}\n";
    assert_eq!(
        json_error_in(mixed).map(|v| v["error"]["name"].clone()),
        Some(Value::from("a.B"))
    );
}

// --- against the real bangerd ----------------------------------------------

#[test]
fn daemon_not_running_exits_3() {
    let bed = start(Options {
        start_daemon: false,
        polkit: false,
        journald: false,
        ..Options::default()
    });
    let out = run(bed.banger().arg("doctor"));
    assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: bangerd is not running: start it with `systemctl start bangerd`"),
        "{err}"
    );
    assert!(
        err.contains("org.freedesktop.DBus.Error.ServiceUnknown"),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "{}", shown(&out));

    let out = run(bed.banger().args(["doctor", "--json"]));
    assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
    assert_eq!(
        json(&out)["error"]["name"],
        "org.freedesktop.DBus.Error.ServiceUnknown"
    );
}

#[test]
fn doctor_reports_the_host_checks() {
    let bed = start(Options::default());

    let out = run(bed.banger().args(["doctor", "--json"]));
    let value = json(&out);
    let checks = value["checks"].as_array().expect("checks is an array");
    assert!(!checks.is_empty(), "{value}");
    let mut counts = [0u64; 3];
    for check in checks {
        let object = check.as_object().expect("a check is an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["detail", "hint", "name", "verdict"], "{check}");
        for key in keys {
            assert!(object[key].is_string(), "{check}");
        }
        match check["verdict"].as_str() {
            Some("pass") => counts[0] += 1,
            Some("warn") => counts[1] += 1,
            Some("fail") => counts[2] += 1,
            other => panic!("unknown verdict {other:?} in {check}"),
        }
    }
    assert_eq!(
        value["summary"],
        serde_json::json!({"pass": counts[0], "warn": counts[1], "fail": counts[2]})
    );
    let verdict = |name: &str| doctor_check(&value, name)["verdict"].clone();
    assert_eq!(verdict("store"), "pass", "{value}");
    assert_eq!(
        verdict("polkit"),
        "pass",
        "polkitd runs on the test bus: {value}"
    );
    verdict("kvm");
    let expected_code = if counts[2] > 0 { 10 } else { 0 };
    assert_eq!(out.status.code(), Some(expected_code), "{}", shown(&out));

    // The same checks, in the same order, for people.
    let out = run(bed.banger().arg("doctor"));
    assert_eq!(out.status.code(), Some(expected_code), "{}", shown(&out));
    let text = stdout(&out);
    let marked: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(['✓', '!', '✗']))
        .collect();
    assert_eq!(marked.len(), checks.len(), "{text}");
    for (line, check) in marked.iter().zip(checks) {
        let mark = match check["verdict"].as_str() {
            Some("pass") => '✓',
            Some("warn") => '!',
            _ => '✗',
        };
        let name = check["name"].as_str().unwrap_or_default();
        let rest = line
            .strip_prefix(mark)
            .and_then(|l| l.strip_prefix(' '))
            .and_then(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{line:?} is not the line of {check}"));
        assert!(rest.is_empty() || rest.starts_with("  "), "{line:?}");
        let hint = check["hint"].as_str().unwrap_or_default();
        if mark != '✓' && !hint.is_empty() {
            assert!(text.contains(&format!("hint: {hint}\n")), "{text}");
        }
    }
    let warnings = if counts[1] == 1 {
        "warning"
    } else {
        "warnings"
    };
    assert!(
        text.ends_with(&format!(
            "\n\n{} passed, {} {warnings}, {} failed\n",
            counts[0], counts[1], counts[2]
        )),
        "{text}"
    );
}

#[test]
fn daemon_status_and_version() {
    let bed = start(Options::default());
    let pid = bed.daemon_pid().expect("bangerd runs");
    let owner = name_owner(&bed, "org.banger.Manager");
    assert!(owner.starts_with(':'), "{owner}");

    let out = run(bed.banger().args(["daemon", "status", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    let value = json(&out);
    assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value["api_version"], banger_dbus::API_VERSION);
    assert_eq!(value["cli_api_version"], banger_dbus::API_VERSION);
    assert_eq!(value["api_compatible"], true);
    assert_eq!(value["status"], "idle");
    assert_eq!(value["bus_name"], "org.banger.Manager");
    assert_eq!(value["unique_name"], owner.as_str());
    assert_eq!(value["pid"], pid);

    let out = run(bed.banger().args(["daemon", "status"]));
    assert!(out.status.success(), "{}", shown(&out));
    let text = stdout(&out);
    assert!(text.starts_with("bangerd      running\n"), "{text}");
    assert!(
        text.contains(&format!("version      {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "api version  {} (matches banger)\n",
            banger_dbus::API_VERSION
        )),
        "{text}"
    );
    assert!(text.contains("status       idle\n"), "{text}");
    assert!(text.contains(&format!("unique name  {owner}\n")), "{text}");
    assert!(text.contains(&format!("pid          {pid}\n")), "{text}");

    let out = run(bed.banger().args(["version", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    let value = json(&out);
    assert_eq!(value["bangerd"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value["bangerd"]["api_version"], banger_dbus::API_VERSION);
    assert_eq!(value["bangerd"]["api_compatible"], true);
    assert!(value["bangerd_error"].is_null(), "{value}");
}

#[test]
fn maintain_follows_the_job_stage_by_stage() {
    let bed = start(Options::default());
    let out = run(bed.banger().args(["daemon", "maintain"]));
    assert!(out.status.success(), "{}", shown(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.first().copied().unwrap_or_default();
    let job = first
        .strip_prefix("job ")
        .and_then(|l| l.strip_suffix(" started (Ctrl-C cancels it)"))
        .unwrap_or_else(|| panic!("first line {first:?}:\n{text}"));
    // Not on a terminal: one line per stage start and per stage end.
    let mut expected = Vec::new();
    for stage in MAINTAIN_STAGES {
        expected.push(format!("→ {stage}"));
        expected.push(format!("✓ {stage}  <duration>"));
    }
    expected.push(format!("job {job} finished in <duration>"));
    let got: Vec<String> = lines[1..].iter().map(|l| without_duration(l)).collect();
    assert_eq!(got, expected, "{text}");
    assert!(stderr(&out).is_empty(), "{}", shown(&out));

    // The job is over: the daemon is idle again.
    let out = run(bed.banger().args(["daemon", "status", "--json"]));
    assert_eq!(json(&out)["status"], "idle", "{}", shown(&out));
}

#[test]
fn maintain_vacuum_json() {
    let bed = start(Options::default());
    let out = run(bed
        .banger()
        .args(["daemon", "maintain", "--vacuum", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    let value = json(&out);
    let job = value["job"].as_str().expect("job path");
    job_number(job);
    assert_eq!(value["success"], true, "{value}");
    assert!(value["error"].is_null(), "{value}");
    let stages: Vec<&str> = value["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["stage"].as_str().expect("stage name"))
        .collect();
    let mut expected = MAINTAIN_STAGES.to_vec();
    expected.push("vacuum");
    assert_eq!(stages, expected, "{value}");
    let mut sum = 0.0;
    for stage in value["stages"].as_array().expect("stages") {
        let ms = stage["duration_ms"].as_f64().expect("duration_ms");
        assert!(ms >= 0.0, "{stage}");
        sum += ms;
    }
    let total = value["total_ms"].as_f64().expect("total_ms");
    assert!(total > 0.0 && total + 1.0 >= sum, "{value}");
}

#[test]
fn no_wait_prints_the_job_path() {
    let bed = start(Options::default());
    let out = run(bed.banger().args(["daemon", "maintain", "--no-wait"]));
    assert!(out.status.success(), "{}", shown(&out));
    let text = stdout(&out);
    let path = text.strip_suffix('\n').expect("one line");
    assert!(!path.contains('\n'), "{text}");
    let first = job_number(path);

    let out = run(bed
        .banger()
        .args(["daemon", "maintain", "--no-wait", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    let value = json(&out);
    let second = job_number(value["job"].as_str().expect("job path"));
    assert!(second > first, "job numbers grow: {first}, {second}");
    assert_eq!(value.as_object().map(|o| o.len()), Some(1), "{value}");
}

#[test]
fn job_show_watch_and_cancel() {
    let bed = start(slow_jobs());
    let out = run(bed.banger().args(["daemon", "maintain", "--no-wait"]));
    assert!(out.status.success(), "{}", shown(&out));
    let path = stdout(&out).trim().to_owned();
    let job = job_number(&path);

    let value = job_show(&bed, job);
    assert_eq!(value["job"], path.as_str());
    assert_eq!(value["kind"], "maintain");
    assert_eq!(value["state"], "running");
    assert_eq!(value["stage"], "check integrity");
    assert_eq!(value["owner_uid"], 0);
    assert_eq!(value["cancelable"], true);

    let out = run(bed.banger().args(["job", "show", &job.to_string()]));
    assert!(out.status.success(), "{}", shown(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("job         {path}\n")), "{text}");
    assert!(text.contains("state       running\n"), "{text}");
    assert!(text.contains("stage       check integrity\n"), "{text}");

    // `job watch` takes a number or a path.
    let mut watch = Background::start(bed.banger().args(["job", "watch", &path]));
    let first = watch.line_where(Duration::from_secs(20), |_| true);
    assert_eq!(first, format!("job {job} (maintain): running"));
    watch.line_where(Duration::from_secs(20), |l| l == "→ check integrity");

    let out = run(bed.banger().args(["job", "cancel", &job.to_string()]));
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(stdout(&out), format!("asked job {job} to cancel\n"));

    let (code, rest, err) = watch.finish(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{rest:?}\n{err}");
    assert_eq!(
        rest.first().map(String::as_str),
        Some("✗ check integrity"),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|l| l.starts_with(&format!("job {job} ended after "))),
        "{rest:?}"
    );
    assert!(
        err.starts_with(&format!("error: job {job} was cancelled")),
        "{err}"
    );

    // Finished jobs stay visible for job_retention_secs (10 s by default).
    let out = run(bed.banger().args(["job", "show", &job.to_string()]));
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        stdout(&out).contains("state       cancelled\n"),
        "{}",
        shown(&out)
    );
    let value = job_show(&bed, job);
    assert_eq!(value["state"], "cancelled");
    assert_eq!(value["cancelable"], false);

    // Cancelling it again is refused by the daemon.
    let out = run(bed
        .banger()
        .args(["job", "cancel", &job.to_string(), "--json"]));
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert_eq!(json(&out)["error"]["name"], "org.banger.Error.Failed");
}

#[test]
fn missing_job_exits_5() {
    let bed = start(Options {
        polkit: false,
        journald: false,
        ..Options::default()
    });
    let out = run(bed.banger().args(["job", "show", "424242"]));
    assert_eq!(out.status.code(), Some(5), "{}", shown(&out));
    assert!(
        stderr(&out).starts_with("error: job 424242 does not exist"),
        "{}",
        shown(&out)
    );
    for args in [
        &["job", "show", "424242", "--json"][..],
        &["job", "watch", "424242", "--json"],
        &["job", "cancel", "424242", "--json"],
    ] {
        let out = run(bed.banger().args(args));
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", shown(&out));
        assert_eq!(
            json(&out)["error"]["name"],
            "org.freedesktop.DBus.Error.UnknownObject",
            "{args:?}: {}",
            shown(&out)
        );
    }
}

#[test]
fn ctrl_c_cancels_the_job() {
    let bed = start(slow_jobs());
    let mut maintain = Background::start(bed.banger().args(["daemon", "maintain", "-v"]));
    let first = maintain.line_where(Duration::from_secs(20), |_| true);
    let job: u64 = first
        .strip_prefix("job ")
        .and_then(|l| l.strip_suffix(" started (Ctrl-C cancels it)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("first line {first:?}"));
    maintain.line_where(Duration::from_secs(20), |l| l == "→ check integrity");
    // banger follows the job (and listens for Ctrl-C) once it has printed
    // the first stage; the job itself waits 10 s in that stage.
    assert_eq!(job_show(&bed, job)["state"], "running");

    kill(maintain.pid(), Signal::SIGINT).expect("send SIGINT");
    let (code, rest, err) = maintain.finish(Duration::from_secs(20));
    assert_eq!(code, Some(130), "{rest:?}\n{err}");
    assert!(
        err.contains(&format!("banger: interrupted, cancelling job {job}")),
        "{err}"
    );
    assert!(
        err.contains(&format!("error: interrupted: job {job} was cancelled")),
        "{err}"
    );
    assert_eq!(rest, ["✗ check integrity"], "{err}");
    assert_eq!(job_show(&bed, job)["state"], "cancelled");
}

#[test]
fn a_user_without_a_prompt_is_told_to_join_the_banger_group() {
    let bed = start(Options::default());
    let user = TestUser::create().expect("create a test user");

    // Not on a terminal: banger does not let polkit prompt, and polkit
    // would need an administrator's password.
    let out = run(bed.banger_as(&user).args(["daemon", "maintain"]));
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot start store maintenance\n"),
        "{err}"
    );
    assert!(err.contains("run banger from a terminal"), "{err}");
    assert!(err.contains("`banger` group"), "{err}");
    assert!(err.contains(INTERACTIVE_AUTH_REQUIRED), "{err}");
    assert!(stdout(&out).is_empty(), "{}", shown(&out));

    for args in [
        &["daemon", "maintain", "--json"][..],
        &["daemon", "maintain", "--json", "--no-ask-password"],
    ] {
        let out = run(bed.banger_as(&user).args(args));
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", shown(&out));
        let value = json(&out);
        assert_eq!(value["error"]["name"], INTERACTIVE_AUTH_REQUIRED, "{value}");
        let message = value["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("banger` group"), "{message}");
        // The daemon's own message is kept in the chain.
        assert!(message.contains("org.banger.maintain"), "{message}");
    }

    // A rule granting the user the action: the same call succeeds (polkitd
    // reloads rules asynchronously).
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
        .expect("install a polkit rule");
    let granted = eventually(Duration::from_secs(15), || {
        let out = run(bed.banger_as(&user).args(["daemon", "maintain", "--json"]));
        out.status.success().then_some(out)
    });
    let out = granted.expect("the rule grants the user org.banger.maintain");
    let value = json(&out);
    assert_eq!(value["success"], true, "{value}");
    let job = job_number(value["job"].as_str().expect("job path"));
    assert_eq!(job_show(&bed, job)["owner_uid"], user.uid());
}

/// `script` (util-linux) runs `banger ARGS` as `user` on a pseudo-terminal,
/// so banger believes someone can answer a password prompt. Nobody does:
/// stdin is `/dev/null`, and callers bound the run (see [`run_for`]).
fn banger_on_a_terminal(bed: &TestBed, user: &TestUser, args: &[&str]) -> Command {
    let quote = |word: &str| format!("'{}'", word.replace('\'', r"'\''"));
    let mut line = quote(&banger_testbed::bin_path("banger").display().to_string());
    for arg in args {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    let mut cmd = bed.command_as(user, "script");
    cmd.args(["--quiet", "--return", "--command", &line, "/dev/null"]);
    cmd
}

#[test]
fn on_a_terminal_polkit_may_prompt() {
    let bed = start(Options::default());
    let user = TestUser::create().expect("create a test user");

    // banger starts pkttyagent and makes the call with the interactive
    // flag. polkit may prompt through the agent (nobody answers) or find
    // no agent to ask; either way the call is denied, not answered
    // InteractiveAuthorizationRequired.
    let out = run_for(
        &mut banger_on_a_terminal(&bed, &user, &["daemon", "maintain", "--json", "-v"]),
        Duration::from_secs(20),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    assert!(text.contains("banger: started pkttyagent"), "{text}");
    let value = json_error_in(&text).unwrap_or_else(|| panic!("no JSON error in {text}"));
    // Denied after the attempt (PermissionDenied here: without a login
    // session polkitd does not use a `--fallback` agent), never refused
    // for want of the flag.
    assert_ne!(value["error"]["name"], INTERACTIVE_AUTH_REQUIRED, "{text}");

    // With --no-ask-password, the flag is not set even on a terminal.
    let out = run_for(
        &mut banger_on_a_terminal(
            &bed,
            &user,
            &["daemon", "maintain", "--json", "--no-ask-password"],
        ),
        Duration::from_secs(20),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    let value = json_error_in(&text).unwrap_or_else(|| panic!("no JSON error in {text}"));
    assert_eq!(value["error"]["name"], INTERACTIVE_AUTH_REQUIRED, "{text}");
}

#[test]
fn without_polkit_only_root_may_maintain() {
    let bed = start(Options {
        polkit: false,
        ..Options::default()
    });
    let user = TestUser::create().expect("create a test user");

    let out = run(bed.banger_as(&user).args(["daemon", "maintain", "--json"]));
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    let value = json(&out);
    assert_eq!(value["error"]["name"], "org.banger.Error.PermissionDenied");
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("polkit is not running"), "{message}");

    // On a terminal, pkttyagent cannot register without polkitd; banger
    // says why no prompt was possible.
    let out = run_for(
        &mut banger_on_a_terminal(&bed, &user, &["daemon", "maintain", "-v"]),
        Duration::from_secs(20),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    assert!(text.contains("banger: no authentication agent"), "{text}");
    assert!(
        text.contains("note: no password prompt was possible"),
        "{text}"
    );
    assert!(text.contains("polkit is not running"), "{text}");

    // The doctor says so too, and root may still maintain.
    let out = run(bed.banger().args(["doctor", "--json"]));
    let value = json(&out);
    let polkit = doctor_check(&value, "polkit");
    assert_eq!(polkit["verdict"], "fail", "{polkit}");
    assert_eq!(out.status.code(), Some(10), "{}", shown(&out));

    let out = run(bed.banger().args(["daemon", "maintain", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(json(&out)["success"], true);
}

// --- kernels and images ------------------------------------------------------

/// Files for a kernel and an image in a directory everyone can read.
fn artifact_inputs() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(p.join("vmlinux"), banger_testbed::tiny_vmlinux(4096)).expect("vmlinux");
    std::fs::write(p.join("initrd.img"), b"initrd").expect("initrd");
    std::fs::create_dir_all(p.join("modules/kernel")).expect("modules");
    std::fs::write(p.join("modules/modules.dep"), b"").expect("modules.dep");
    std::fs::create_dir_all(p.join("tree/root")).expect("tree");
    std::fs::write(p.join("tree/root/.profile"), b"echo hi\n").expect("profile");
    banger_testbed::mkfs_ext4(&p.join("tree"), &p.join("rootfs.ext4"), "16M").expect("mkfs");
    for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
        std::fs::set_permissions(p.join(f), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    dir
}

#[test]
fn kernel_and_image_lifecycle_through_the_cli() {
    let bed = start(Options::default());
    let inputs = artifact_inputs();
    let dir = inputs.path();

    // Relative paths are resolved against banger's own directory.
    let out = run(bed.banger().current_dir(dir).args([
        "kernel",
        "import",
        "--name",
        "tiny-k",
        "--kernel",
        "vmlinux",
        "--initrd",
        "initrd.img",
        "--modules",
        "modules",
    ]));
    assert!(out.status.success(), "{}", shown(&out));
    let text = stdout(&out);
    for stage in [
        "copy vmlinux",
        "copy initrd",
        "copy modules",
        "digest",
        "record",
    ] {
        assert!(text.contains(&format!("✓ {stage}")), "{text}");
    }
    assert!(text.contains("name:     tiny-k"), "{text}");

    let out = run(bed.banger().args(["kernel", "list", "--json"]));
    let kernels = json(&out);
    assert_eq!(kernels.as_array().map(Vec::len), Some(1), "{kernels}");
    let id = kernels[0]["id"].as_str().expect("id").to_owned();
    assert!(
        kernels[0]["initrd"]
            .as_str()
            .expect("initrd")
            .ends_with("initrd.img")
    );
    let out = run(bed.banger().args(["kernel", "show", &id[..6]]));
    assert!(stdout(&out).contains("name:     tiny-k"), "{}", shown(&out));
    let out = run(bed.banger().args(["kernel", "list"]));
    assert!(
        stdout(&out).starts_with("NAME    ID            VERSION  SIZE"),
        "{}",
        shown(&out)
    );

    // A taken name, a missing file, a file that is no kernel.
    let vmlinux = dir.join("vmlinux").display().to_string();
    let out = run(bed
        .banger()
        .args(["kernel", "import", "--name", "tiny-k", "--kernel", &vmlinux]));
    assert_eq!(out.status.code(), Some(6), "{}", shown(&out));
    assert!(stderr(&out).contains("already exists"), "{}", shown(&out));
    let out = run(bed.banger().args([
        "kernel",
        "import",
        "--name",
        "x",
        "--kernel",
        "/nonexistent/vmlinuz",
    ]));
    assert_eq!(out.status.code(), Some(6), "{}", shown(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", shown(&out));
    let initrd = dir.join("initrd.img").display().to_string();
    let out = run(bed
        .banger()
        .args(["kernel", "import", "--name", "x", "--kernel", &initrd]));
    assert_eq!(out.status.code(), Some(6), "{}", shown(&out));
    assert!(
        stderr(&out).contains("neither an ELF vmlinux nor an x86 bzImage"),
        "{}",
        shown(&out)
    );

    // Images.
    let rootfs = dir.join("rootfs.ext4").display().to_string();
    let out = run(bed.banger().args([
        "image",
        "register",
        "--name",
        "tiny",
        "--rootfs",
        &rootfs,
        "--kernel",
        "tiny-k",
        "--service",
        "ssh:22",
        "--init",
        "/sbin/banger-init",
        "--json",
    ]));
    assert!(out.status.success(), "{}", shown(&out));
    // Registering copies the rootfs, read through the descriptor banger
    // opened, into managed storage as a job.
    let registered = json(&out);
    assert_eq!(registered["job"]["success"], true, "{registered}");
    let image = &registered["image"];
    assert_eq!(image["managed"], true, "{registered}");
    assert_eq!(image["kernel_name"], "tiny-k");
    assert_eq!(image["services"][0]["port"], 22);
    let stages: Vec<&str> = registered["job"]["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert_eq!(
        stages,
        ["copy rootfs", "make work-seed", "digest", "record"]
    );
    let out = run(bed.banger().args([
        "image",
        "register",
        "--name",
        "bad",
        "--rootfs",
        &rootfs,
        "--kernel",
        "tiny-k",
        "--service",
        "ssh",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));

    // Nothing to promote: it is managed already.
    let out = run(bed.banger().args(["image", "promote", "tiny"]));
    assert_eq!(out.status.code(), Some(6), "{}", shown(&out));
    assert!(stderr(&out).contains("already managed"), "{}", shown(&out));
    let out = run(bed.banger().args(["image", "list"]));
    assert!(
        stdout(&out)
            .lines()
            .nth(1)
            .unwrap_or("")
            .contains("yes      tiny-k"),
        "{}",
        shown(&out)
    );

    // The kernel is in use: Busy (7), with the image named.
    let out = run(bed.banger().args(["kernel", "delete", "tiny-k"]));
    assert_eq!(out.status.code(), Some(7), "{}", shown(&out));
    assert!(stderr(&out).contains("tiny"), "{}", shown(&out));

    // Several refs: each reported, the worst code returned.
    let out = run(bed
        .banger()
        .args(["image", "delete", "tiny", "ghost", "--json"]));
    assert_eq!(out.status.code(), Some(5), "{}", shown(&out));
    let results = json(&out);
    assert_eq!(results[0]["deleted"], true, "{results}");
    assert_eq!(results[1]["deleted"], false, "{results}");
    let out = run(bed.banger().args(["kernel", "delete", "tiny-k"]));
    assert!(out.status.success(), "{}", shown(&out));
    let out = run(bed.banger().args(["kernel", "list"]));
    assert!(stdout(&out).contains("no kernels"), "{}", shown(&out));
}

#[test]
fn users_without_authorization_cannot_import() {
    let bed = start(Options::default());
    let inputs = artifact_inputs();
    let user = TestUser::create().expect("create a test user");
    let vmlinux = inputs.path().join("vmlinux").display().to_string();
    let out = run(bed
        .banger_as(&user)
        .args(["kernel", "import", "--name", "mine", "--kernel", &vmlinux]));
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    assert!(
        stderr(&out).contains("cannot import kernel mine"),
        "{}",
        shown(&out)
    );
    // Listing is open to everyone.
    let out = run(bed.banger_as(&user).args(["kernel", "list", "--json"]));
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(json(&out), serde_json::json!([]));
}
