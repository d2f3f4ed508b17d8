//! Rendering: every result as human text or as JSON. Pure functions from
//! data to a `String` / `serde_json::Value`; printing happens in [`emit`].

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use banger_dbus::{DoctorCheck, StageTiming, verdict};
use serde::Serialize;

use crate::client::{DaemonInfo, JobInfo};
use crate::progress::{JobReport, format_duration};

/// Write `text` to stdout (a closed pipe is reported as an error).
pub fn emit(text: &str) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.write_all(text.as_bytes())?;
    if !text.is_empty() && !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Write a value to stdout as pretty-printed JSON (fields in declaration order).
pub fn emit_json(value: &impl Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    emit(&text)
}

/// An error: `{"name","message"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorJson {
    pub name: String,
    pub message: String,
}

/// What `--json` prints for a failed command: `{"error":{"name","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorReply {
    pub error: ErrorJson,
}

/// The `{"error":{"name","message"}}` object.
pub fn error_json(name: &str, message: &str) -> ErrorReply {
    ErrorReply {
        error: ErrorJson {
            name: name.to_owned(),
            message: message.to_owned(),
        },
    }
}

/// Counts of `banger doctor`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DoctorSummary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

impl DoctorSummary {
    /// Count verdicts; an unknown verdict counts as a warning.
    pub fn of(checks: &[DoctorCheck]) -> Self {
        let mut summary = Self::default();
        for check in checks {
            match check.verdict.as_str() {
                verdict::PASS => summary.pass += 1,
                verdict::FAIL => summary.fail += 1,
                _ => summary.warn += 1,
            }
        }
        summary
    }
}

/// `banger doctor --json`: `{"checks":[...], "summary":{"pass","warn","fail"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoctorJson {
    pub checks: Vec<DoctorCheck>,
    pub summary: DoctorSummary,
}

/// `banger doctor --json`.
pub fn doctor_json(checks: &[DoctorCheck]) -> DoctorJson {
    DoctorJson {
        checks: checks.to_vec(),
        summary: DoctorSummary::of(checks),
    }
}

/// `banger doctor`: a mark, the name and the detail per check; the hint
/// indented below warnings and failures; a summary line.
pub fn doctor_human(checks: &[DoctorCheck]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for check in checks {
        let mark = match check.verdict.as_str() {
            verdict::PASS => "✓",
            verdict::WARN => "!",
            verdict::FAIL => "✗",
            _ => "?",
        };
        let line = format!("{mark} {:<width$}  {}", check.name, check.detail);
        text.push_str(line.trim_end());
        text.push('\n');
        if check.verdict != verdict::PASS && !check.hint.is_empty() {
            text.push_str(&format!("  {:<width$}  hint: {}\n", "", check.hint));
        }
    }
    let summary = DoctorSummary::of(checks);
    if !checks.is_empty() {
        text.push('\n');
    }
    text.push_str(&format!(
        "{} passed, {} {}, {} failed\n",
        summary.pass,
        summary.warn,
        if summary.warn == 1 {
            "warning"
        } else {
            "warnings"
        },
        summary.fail
    ));
    text
}

/// Whether the daemon speaks at least the API this CLI was built for
/// (the API evolves additively).
pub fn api_compatible(daemon_api: u32) -> bool {
    daemon_api >= banger_dbus::API_VERSION
}

/// `banger daemon status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusJson {
    pub version: String,
    pub api_version: u32,
    pub cli_api_version: u32,
    pub api_compatible: bool,
    pub status: String,
    pub bus_name: &'static str,
    pub unique_name: String,
    pub pid: Option<u32>,
}

/// `banger daemon status --json`.
pub fn status_json(info: &DaemonInfo) -> StatusJson {
    StatusJson {
        version: info.version.clone(),
        api_version: info.api_version,
        cli_api_version: banger_dbus::API_VERSION,
        api_compatible: api_compatible(info.api_version),
        status: info.status.clone(),
        bus_name: banger_dbus::BUS_NAME,
        unique_name: info.unique_name.clone(),
        pid: info.pid,
    }
}

/// `banger daemon status`.
pub fn status_human(info: &DaemonInfo) -> String {
    let api = if info.api_version == banger_dbus::API_VERSION {
        format!("{} (matches banger)", info.api_version)
    } else if api_compatible(info.api_version) {
        format!(
            "{} (newer than banger's {}: compatible)",
            info.api_version,
            banger_dbus::API_VERSION
        )
    } else {
        format!(
            "{} (older than banger's {}: some commands may fail; update bangerd)",
            info.api_version,
            banger_dbus::API_VERSION
        )
    };
    let pid = info
        .pid
        .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let status = if info.status.is_empty() {
        "-"
    } else {
        info.status.as_str()
    };
    table(&[
        ("bangerd", "running"),
        ("version", &info.version),
        ("api version", &api),
        ("status", status),
        ("bus name", banger_dbus::BUS_NAME),
        ("unique name", &info.unique_name),
        ("pid", &pid),
    ])
}

/// The daemon side of `banger version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonVersion {
    /// Reachable: version and API version.
    Reachable { version: String, api_version: u32 },
    /// Not reachable: why (error name and message).
    Unreachable { name: String, message: String },
}

/// One side of `banger version --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionJson {
    pub version: String,
    pub api_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_compatible: Option<bool>,
}

/// `banger version --json`: `{"banger":{...}, "bangerd":{...}|null, "bangerd_error":{...}|null}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionsJson {
    pub banger: VersionJson,
    pub bangerd: Option<VersionJson>,
    pub bangerd_error: Option<ErrorJson>,
}

/// `banger version --json`.
pub fn version_json(daemon: &DaemonVersion) -> VersionsJson {
    let banger = VersionJson {
        version: banger_release::VERSION.to_owned(),
        api_version: banger_dbus::API_VERSION,
        api_compatible: None,
    };
    match daemon {
        DaemonVersion::Reachable {
            version,
            api_version,
        } => VersionsJson {
            banger,
            bangerd: Some(VersionJson {
                version: version.clone(),
                api_version: *api_version,
                api_compatible: Some(api_compatible(*api_version)),
            }),
            bangerd_error: None,
        },
        DaemonVersion::Unreachable { name, message } => VersionsJson {
            banger,
            bangerd: None,
            bangerd_error: Some(ErrorJson {
                name: name.clone(),
                message: message.clone(),
            }),
        },
    }
}

/// `banger version`.
pub fn version_human(daemon: &DaemonVersion) -> String {
    let cli = format!(
        "{} (D-Bus API {})",
        banger_release::VERSION,
        banger_dbus::API_VERSION
    );
    let daemon = match daemon {
        DaemonVersion::Reachable {
            version,
            api_version,
        } => {
            let mut text = format!("{version} (D-Bus API {api_version})");
            if !api_compatible(*api_version) {
                text.push_str(": older than banger, update bangerd");
            }
            text
        }
        DaemonVersion::Unreachable { message, .. } => format!("not reachable: {message}"),
    };
    table(&[("banger", &cli), ("bangerd", &daemon)])
}

/// A finished stage: `{"stage","duration_ms"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageJson {
    pub stage: String,
    pub duration_ms: f64,
}

fn stages_json(stages: &[StageTiming]) -> Vec<StageJson> {
    stages
        .iter()
        .map(|s| StageJson {
            stage: s.stage.clone(),
            duration_ms: usec_to_ms(s.duration_usec),
        })
        .collect()
}

fn usec_to_ms(usec: u64) -> f64 {
    // Exact to the microsecond for any duration a job can take.
    usec as f64 / 1000.0
}

/// A followed job (`banger daemon maintain --json`):
/// `{"job", "success", "error":{"name","message"}|null, "stages":[...], "total_ms"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobReportJson {
    pub job: String,
    pub success: bool,
    pub error: Option<ErrorJson>,
    pub stages: Vec<StageJson>,
    pub total_ms: f64,
}

/// The JSON object of a followed job.
pub fn job_report_json(report: &JobReport) -> JobReportJson {
    JobReportJson {
        job: report.job.clone(),
        success: report.success,
        error: report.error.as_ref().map(|e| ErrorJson {
            name: e.name.clone(),
            message: e.message.clone(),
        }),
        stages: stages_json(&report.stages),
        total_ms: usec_to_ms(report.total_usec),
    }
}

/// The last line of a followed job.
pub fn job_report_human(report: &JobReport) -> String {
    let job = crate::progress::job_label(&report.job);
    if report.success {
        format!(
            "job {job} finished in {}",
            format_duration(report.total_usec)
        )
    } else {
        format!(
            "job {job} ended after {}",
            format_duration(report.total_usec)
        )
    }
}

/// `banger job show --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobInfoJson {
    pub job: String,
    pub kind: String,
    pub state: String,
    pub stage: String,
    pub progress: f64,
    pub bytes: u64,
    pub started_at_usec: u64,
    pub owner_uid: u32,
    pub cancelable: bool,
    pub stages: Vec<StageJson>,
}

/// `banger job show --json`.
pub fn job_info_json(info: &JobInfo) -> JobInfoJson {
    JobInfoJson {
        job: info.path.clone(),
        kind: info.kind.clone(),
        state: info.state.clone(),
        stage: info.stage.clone(),
        progress: info.progress,
        bytes: info.bytes,
        started_at_usec: info.started_at_usec,
        owner_uid: info.owner_uid,
        cancelable: info.cancelable,
        stages: stages_json(&info.stages),
    }
}

/// `banger job show`. `now_usec` is the current time (µs since the epoch).
pub fn job_info_human(info: &JobInfo, now_usec: u64) -> String {
    let started = if info.started_at_usec == 0 {
        "-".to_owned()
    } else {
        format!(
            "{} ago",
            format_duration(now_usec.saturating_sub(info.started_at_usec))
        )
    };
    let progress = format!("{:.0}%", (info.progress.clamp(0.0, 1.0)) * 100.0);
    let stage = if info.stage.is_empty() {
        "-"
    } else {
        info.stage.as_str()
    };
    let mut text = table(&[
        ("job", &info.path),
        ("kind", &info.kind),
        ("state", &info.state),
        ("stage", stage),
        ("progress", &progress),
        ("bytes", &info.bytes.to_string()),
        ("started", &started),
        ("owner uid", &info.owner_uid.to_string()),
        ("cancelable", if info.cancelable { "yes" } else { "no" }),
    ]);
    if !info.stages.is_empty() {
        text.push_str("stages:\n");
        for stage in &info.stages {
            text.push_str(&format!(
                "  ✓ {}  {}\n",
                stage.stage,
                format_duration(stage.duration_usec)
            ));
        }
    }
    text
}

/// Microseconds since the Unix epoch, now.
pub fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, crate::progress::usec)
}

/// Two aligned columns.
fn table(rows: &[(&str, &str)]) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// Console bytes as text for a screen or a page: escape sequences and control
/// characters other than newlines and tabs dropped.
pub fn printable(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte; other escapes: one more char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RemoteError;
    use serde_json::{Value, json};

    fn to_json(v: &impl Serialize) -> Value {
        serde_json::to_value(v).expect("serializable")
    }

    fn check(name: &str, verdict: &str, detail: &str, hint: &str) -> DoctorCheck {
        DoctorCheck {
            name: name.into(),
            verdict: verdict.into(),
            detail: detail.into(),
            hint: hint.into(),
        }
    }

    fn checks() -> Vec<DoctorCheck> {
        vec![
            check("kvm", "pass", "/dev/kvm usable", ""),
            check("nftables", "warn", "nft not found", "apt install nftables"),
            check("tun", "fail", "/dev/net/tun missing", "modprobe tun"),
        ]
    }

    #[test]
    fn doctor_shapes() {
        let value = to_json(&doctor_json(&checks()));
        assert_eq!(value["summary"], json!({"pass": 1, "warn": 1, "fail": 1}));
        assert_eq!(
            value["checks"][2],
            json!({"name": "tun", "verdict": "fail", "detail": "/dev/net/tun missing", "hint": "modprobe tun"})
        );
        assert_eq!(value["checks"].as_array().map(Vec::len), Some(3));

        let text = doctor_human(&checks());
        assert_eq!(
            text,
            "✓ kvm       /dev/kvm usable\n\
             ! nftables  nft not found\n\
             \x20           hint: apt install nftables\n\
             ✗ tun       /dev/net/tun missing\n\
             \x20           hint: modprobe tun\n\
             \n\
             1 passed, 1 warning, 1 failed\n"
        );
        assert_eq!(doctor_human(&[]), "0 passed, 0 warnings, 0 failed\n");
    }

    #[test]
    fn unknown_verdicts_count_as_warnings() {
        let summary = DoctorSummary::of(&[check("x", "maybe", "", "")]);
        assert_eq!(
            summary,
            DoctorSummary {
                pass: 0,
                warn: 1,
                fail: 0
            }
        );
    }

    #[test]
    fn job_report_shape() {
        let report = JobReport {
            job: "/org/banger/Manager/job/4".into(),
            success: false,
            error: Some(RemoteError {
                name: "org.banger.Error.Busy".into(),
                message: "store is locked".into(),
            }),
            stages: vec![StageTiming {
                stage: "checkpoint".into(),
                duration_usec: 3_215,
            }],
            total_usec: 1_500_000,
            result: None,
            detail: String::new(),
        };
        assert_eq!(
            to_json(&job_report_json(&report)),
            json!({
                "job": "/org/banger/Manager/job/4",
                "success": false,
                "error": {"name": "org.banger.Error.Busy", "message": "store is locked"},
                "stages": [{"stage": "checkpoint", "duration_ms": 3.215}],
                "total_ms": 1500.0,
            })
        );
        let ok = JobReport {
            success: true,
            error: None,
            ..report
        };
        assert_eq!(to_json(&job_report_json(&ok))["error"], Value::Null);
        assert_eq!(job_report_human(&ok), "job 4 finished in 1.5 s");
    }

    #[test]
    fn error_shape() {
        assert_eq!(
            to_json(&error_json("org.banger.Error.NotFound", "no such vm")),
            json!({"error": {"name": "org.banger.Error.NotFound", "message": "no such vm"}})
        );
    }

    fn info(api_version: u32) -> DaemonInfo {
        DaemonInfo {
            version: "0.1.0".into(),
            api_version,
            status: "idle".into(),
            unique_name: ":1.7".into(),
            pid: Some(42),
        }
    }

    #[test]
    fn status_shapes() {
        let value = to_json(&status_json(&info(banger_dbus::API_VERSION)));
        assert_eq!(value["bus_name"], "org.banger.Manager");
        assert_eq!(value["unique_name"], ":1.7");
        assert_eq!(value["pid"], 42);
        assert_eq!(value["api_compatible"], true);
        assert_eq!(value["cli_api_version"], banger_dbus::API_VERSION);
        let text = status_human(&info(banger_dbus::API_VERSION));
        assert!(text.contains("unique name  :1.7\n"), "{text}");
        assert!(text.contains("(matches banger)"), "{text}");
        let text = status_human(&info(0));
        assert!(text.contains("older than banger"), "{text}");
    }

    #[test]
    fn version_shapes() {
        let down = DaemonVersion::Unreachable {
            name: "org.freedesktop.DBus.Error.ServiceUnknown".into(),
            message: "bangerd is not running".into(),
        };
        let value = to_json(&version_json(&down));
        assert_eq!(value["banger"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(value["bangerd"], Value::Null);
        assert_eq!(value["bangerd_error"]["message"], "bangerd is not running");
        assert!(version_human(&down).contains("bangerd  not reachable: bangerd is not running"));
        let up = DaemonVersion::Reachable {
            version: "0.1.0".into(),
            api_version: banger_dbus::API_VERSION,
        };
        assert_eq!(to_json(&version_json(&up))["bangerd"]["version"], "0.1.0");
        assert_eq!(to_json(&version_json(&up))["bangerd_error"], Value::Null);
    }

    #[test]
    fn an_older_daemon_is_flagged() {
        let old = DaemonVersion::Reachable {
            version: "0.0.9".into(),
            api_version: 0,
        };
        assert_eq!(
            to_json(&version_json(&old))["bangerd"]["api_compatible"],
            false
        );
        let text = version_human(&old);
        assert!(
            text.contains("bangerd  0.0.9 (D-Bus API 0): older than banger, update bangerd"),
            "{text}"
        );
        let value = to_json(&status_json(&info(0)));
        assert_eq!(value["api_compatible"], false);
        assert_eq!(value["api_version"], 0);

        // A newer daemon is fine: the API only grows.
        let newer = banger_dbus::API_VERSION + 1;
        assert_eq!(to_json(&status_json(&info(newer)))["api_compatible"], true);
        let text = status_human(&info(newer));
        assert!(text.contains("(newer than banger's"), "{text}");
        let text = version_human(&DaemonVersion::Reachable {
            version: "9.0.0".into(),
            api_version: newer,
        });
        assert!(!text.contains("older"), "{text}");
    }

    #[test]
    fn job_info_shapes() {
        let info = JobInfo {
            path: "/org/banger/Manager/job/2".into(),
            kind: "maintain".into(),
            state: "running".into(),
            stage: "checkpoint".into(),
            progress: 0.5,
            bytes: 0,
            started_at_usec: 1_000_000,
            owner_uid: 1000,
            cancelable: true,
            stages: vec![StageTiming {
                stage: "integrity-check".into(),
                duration_usec: 3_000,
            }],
        };
        let value = to_json(&job_info_json(&info));
        assert_eq!(value["state"], "running");
        assert_eq!(value["stages"][0]["duration_ms"], 3.0);
        let text = job_info_human(&info, 3_500_000);
        assert!(text.contains("started     2.5 s ago\n"), "{text}");
        assert!(text.contains("progress    50%\n"), "{text}");
        assert!(text.contains("  ✓ integrity-check  3 ms\n"), "{text}");
    }
}
