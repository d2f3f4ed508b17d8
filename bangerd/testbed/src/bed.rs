//! The test bed: a private system bus, polkitd, journald and bangerd.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::journald::Journald;
use crate::polkit::{Polkitd, RuleGuard};
use crate::shared::Lease;
use crate::spawn::{kill_and_wait, pid_alive, spawn_tied, terminate, wait_timeout};
use crate::user::TestUser;
use crate::{bin_path, eventually, polkit};

/// The bus configuration template shared with `scripts/testbed`.
const BUS_CONF_TEMPLATE: &str = include_str!("../bus.conf.in");
/// The project's bus policy, included as shipped.
pub const BANGER_BUS_POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../dbus/org.banger.Manager.conf"
);
/// bangerd's well-known name.
pub const MANAGER_NAME: &str = "org.banger.Manager";
/// polkitd's well-known name.
pub const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";

/// How long `start_daemon` waits for bangerd to own its name.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long polkitd gets to own its name.
const POLKIT_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `stop_daemon` waits after SIGTERM before SIGKILL.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(10);

/// What [`TestBed::start`] sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Start a polkitd on the bus, after installing the project's action
    /// file `packaging/org.banger.policy` (if it exists) into
    /// `/usr/share/polkit-1/actions/`. Default: true.
    pub polkit: bool,
    /// Make sure a journald is running ([`Journald::ensure`]). Default: true.
    pub journald: bool,
    /// Written to `<config_dir>/bangerd.toml`, with `network.dns_listen`
    /// added on a free loopback port unless it names one. Default: none.
    pub config_toml: Option<String>,
    /// Start bangerd and wait for it to own `org.banger.Manager`. Default:
    /// true.
    pub start_daemon: bool,
    /// The daemon's executable; default: [`bin_path`]`("bangerd")`.
    pub bangerd_path: Option<PathBuf>,
    /// Run bangerd inside this network namespace (`ip netns exec NAME`),
    /// e.g. one made by [`crate::NetNs`]. Default: the caller's.
    pub netns: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            polkit: true,
            journald: true,
            config_toml: None,
            start_daemon: true,
            bangerd_path: None,
            netns: None,
        }
    }
}

/// A private system bus with the project's bus policy, optionally polkitd,
/// journald and bangerd, all in a fresh temporary directory `DIR`:
///
/// | path | what |
/// | --- | --- |
/// | `DIR/system_bus_socket` | the bus, `unix:path=DIR/system_bus_socket` |
/// | `DIR/bus.conf`, `DIR/dbus-daemon.log` | its configuration and output |
/// | `DIR/polkitd.log` | polkitd's output |
/// | `DIR/state`, `DIR/cache`, `DIR/runtime`, `DIR/config` | bangerd's `STATE_DIRECTORY`, `CACHE_DIRECTORY`, `RUNTIME_DIRECTORY`, `CONFIGURATION_DIRECTORY` |
/// | `DIR/bangerd.log` | bangerd's standard output and error, appended |
///
/// `DIR` is `/tmp/banger-testbed-XXXXXX`, mode 0755 so that test users
/// reach the socket. Dropping the test bed stops everything and removes
/// `DIR`; set `BANGER_TESTBED_KEEP=1` to keep it. (The directory of a test
/// process that was killed is removed by the next process that starts a
/// test bed: `DIR/owner.pid` names its process.) If the test is panicking, the tails
/// of the logs are printed first.
#[derive(Debug)]
pub struct TestBed {
    dir: Option<TempDir>,
    root: PathBuf,
    address: String,
    bangerd_path: Option<PathBuf>,
    netns: Option<String>,
    bus: Option<Child>,
    polkitd: Option<Polkitd>,
    daemon: Option<Child>,
    /// When the running daemon was started.
    daemon_since: std::time::SystemTime,
    journald: Option<Journald>,
    policy: Option<Lease>,
}

/// Escapes `text` for an XML text node.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The releases root variable of `banger-release`.
const RELEASES_ENV: &str = "BANGER_RELEASES_DIR";

/// The bus configuration for a bus listening on `listen`.
pub fn bus_config(listen: &str) -> String {
    let policy = fs::canonicalize(BANGER_BUS_POLICY).unwrap_or_else(|_| BANGER_BUS_POLICY.into());
    BUS_CONF_TEMPLATE
        .replace("@LISTEN@", &xml_escape(listen))
        .replace("@BANGER_POLICY@", &xml_escape(&policy.to_string_lossy()))
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> &str {
    let mut start = text.len();
    for _ in 0..lines {
        match text[..start].trim_end_matches('\n').rfind('\n') {
            Some(i) => start = i + 1,
            None => return text,
        }
        if start == 0 {
            break;
        }
    }
    &text[start..]
}

/// Where test beds make their directories.
const PARENT_DIR: &str = "/tmp";
/// Prefix of a test bed's directory name.
const DIR_PREFIX: &str = "banger-testbed-";
/// In a test bed's directory: the pid of the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the directories of test beds whose process died without cleaning
/// up (killed); they hold an [`OWNER_FILE`] naming a process that is gone.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(PARENT_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(owner) = fs::read_to_string(path.join(OWNER_FILE)) else {
            continue;
        };
        match owner.trim().parse::<u32>() {
            Ok(pid) if pid != std::process::id() && !pid_alive(pid) => {
                let _ = fs::remove_dir_all(&path);
            }
            _ => {}
        }
    }
}

impl TestBed {
    /// Starts a test bed; see [`Options`]. On error, whatever was started
    /// is stopped again; the error names the log to look at.
    pub fn start(options: Options) -> io::Result<TestBed> {
        static CLEAN: Once = Once::new();
        CLEAN.call_once(remove_stale_dirs);
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(PARENT_DIR)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let root = dir.path().to_path_buf();
        fs::write(root.join(OWNER_FILE), format!("{}\n", std::process::id()))?;
        for sub in ["state", "cache", "runtime", "config"] {
            fs::create_dir(root.join(sub))?;
        }
        let toml = with_own_dns_port(options.config_toml.as_deref().unwrap_or(""));
        fs::write(root.join("config").join("bangerd.toml"), toml)?;
        let address = format!("unix:path={}", root.join("system_bus_socket").display());
        let mut bed = TestBed {
            dir: Some(dir),
            root,
            address,
            bangerd_path: options.bangerd_path.clone(),
            netns: options.netns.clone(),
            bus: None,
            polkitd: None,
            daemon: None,
            daemon_since: std::time::SystemTime::UNIX_EPOCH,
            journald: None,
            policy: None,
        };
        bed.start_bus()?;
        if options.journald {
            bed.journald = Some(Journald::ensure()?);
        }
        if options.polkit {
            bed.start_polkitd()?;
        }
        if options.start_daemon {
            bed.start_daemon()?;
        }
        Ok(bed)
    }

    fn start_bus(&mut self) -> io::Result<()> {
        let conf = self.root.join("bus.conf");
        fs::write(&conf, bus_config(&self.address))?;
        let log = self.root.join("dbus-daemon.log");
        let mut command = Command::new("dbus-daemon");
        command
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(append(&log)?);
        let mut child = spawn_tied(command)
            .map_err(|e| io::Error::new(e.kind(), format!("run dbus-daemon: {e}")))?;
        let stdout = child.stdout.take();
        self.bus = Some(child);
        // dbus-daemon prints its address once it listens, or exits.
        let mut line = String::new();
        if let Some(stdout) = stdout {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        if line.trim().is_empty() {
            return Err(io::Error::other(format!(
                "dbus-daemon did not start; {}:\n{}",
                log.display(),
                read_lossy(&log)
            )));
        }
        UnixStream::connect(self.bus_socket()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("connect to {}: {e}", self.bus_socket().display()),
            )
        })?;
        Ok(())
    }

    fn start_polkitd(&mut self) -> io::Result<()> {
        self.policy = polkit::install_policy()?;
        let log = self.root.join("polkitd.log");
        let polkitd = Polkitd::start(&self.address, &log)?;
        let pid = polkitd.pid();
        self.polkitd = Some(polkitd);
        let owned = eventually(POLKIT_START_TIMEOUT, || {
            if !pid_alive(pid) {
                return Some(false);
            }
            self.name_has_owner(POLKIT_NAME).then_some(true)
        });
        let problem = match owned {
            Some(true) => return Ok(()),
            Some(false) => "exited",
            None => "did not own its name in time",
        };
        Err(io::Error::other(format!(
            "polkitd {problem}; {}:\n{}",
            log.display(),
            read_lossy(&log)
        )))
    }

    /// The bus address, `unix:path=DIR/system_bus_socket`.
    pub fn bus_address(&self) -> &str {
        &self.address
    }

    /// The bus socket.
    pub fn bus_socket(&self) -> PathBuf {
        self.root.join("system_bus_socket")
    }

    /// The test bed's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// bangerd's `STATE_DIRECTORY`, `DIR/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// bangerd's `CACHE_DIRECTORY`, `DIR/cache`.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// bangerd's `RUNTIME_DIRECTORY`, `DIR/runtime`.
    pub fn runtime_dir(&self) -> PathBuf {
        self.root.join("runtime")
    }

    /// bangerd's `CONFIGURATION_DIRECTORY`, `DIR/config`.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }

    /// `DIR/config/bangerd.toml`, where [`Options::config_toml`] goes. Tests
    /// may rewrite it between daemon runs.
    pub fn config_path(&self) -> PathBuf {
        self.config_dir().join("bangerd.toml")
    }

    /// The dbus-daemon's pid.
    pub fn bus_pid(&self) -> Option<u32> {
        self.bus.as_ref().map(Child::id)
    }

    /// polkitd's pid, if the test bed runs one.
    pub fn polkitd_pid(&self) -> Option<u32> {
        self.polkitd.as_ref().map(Polkitd::pid)
    }

    /// Every process the test bed runs now, by role: `dbus-daemon`,
    /// `polkitd`, `polkitd-wrapper` (the shell that stops polkitd) and
    /// `bangerd`.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        let mut processes = Vec::new();
        if let Some(pid) = self.bus_pid() {
            processes.push(("dbus-daemon", pid));
        }
        if let Some(polkitd) = &self.polkitd {
            processes.push(("polkitd", polkitd.pid()));
            processes.push(("polkitd-wrapper", polkitd.wrapper_pid()));
        }
        if let Some(pid) = self.daemon_pid() {
            processes.push(("bangerd", pid));
        }
        processes
    }

    /// A command with `DBUS_SYSTEM_BUS_ADDRESS` set to the test bed's bus
    /// (zbus, sd-bus, GDBus, pkcheck and polkitd all honor it).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address);
        command.env(RELEASES_ENV, self.releases_dir());
        command
    }

    /// [`TestUser::command`] with `DBUS_SYSTEM_BUS_ADDRESS` set to the test
    /// bed's bus.
    pub fn command_as(&self, user: &TestUser, program: impl AsRef<OsStr>) -> Command {
        let mut command = user.command(program);
        command.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address);
        command.env(RELEASES_ENV, self.releases_dir());
        command
    }

    /// Where `banger update` installs releases for this bed's daemon and
    /// CLI (`$BANGER_RELEASES_DIR`), `DIR/releases`; never the host's.
    pub fn releases_dir(&self) -> PathBuf {
        self.dir().join("releases")
    }

    /// The `banger` CLI ([`bin_path`]`("banger")`) on the test bed's bus.
    pub fn banger(&self) -> Command {
        self.command(bin_path("banger"))
    }

    /// The `banger` CLI on the test bed's bus, run as `user`.
    pub fn banger_as(&self, user: &TestUser) -> Command {
        self.command_as(user, bin_path("banger"))
    }

    /// Runs `busctl --address=<bus address> ARGS...` as root.
    ///
    /// `--address` is used rather than `--system`; `busctl --system` honors
    /// `DBUS_SYSTEM_BUS_ADDRESS` too (checked with systemd 252), so
    /// `bed.command("busctl").arg("--system")` works as well.
    ///
    /// # Panics
    ///
    /// If busctl cannot be run (package systemd).
    pub fn busctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run busctl (package systemd)")
    }

    /// Whether `name` has an owner on the bus now.
    pub fn name_has_owner(&self, name: &str) -> bool {
        let output = self.busctl([
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ]);
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "b true"
    }

    /// Waits up to `timeout` for `name` to have an owner.
    pub fn wait_for_name(&self, name: &str, timeout: Duration) -> bool {
        eventually(timeout, || self.name_has_owner(name).then_some(())).is_some()
    }

    /// Waits up to `timeout` for `name` to have no owner.
    pub fn wait_for_name_gone(&self, name: &str, timeout: Duration) -> bool {
        eventually(timeout, || (!self.name_has_owner(name)).then_some(())).is_some()
    }

    /// Installs a polkit rule until the guard is dropped; see
    /// [`crate::install_polkit_rule`] (rules are host-wide, reloaded
    /// asynchronously: retry checks with [`eventually`]).
    pub fn install_polkit_rule(&self, name: &str, javascript: &str) -> io::Result<RuleGuard> {
        polkit::install_polkit_rule(name, javascript)
    }

    /// `DIR/bangerd.log`.
    pub fn daemon_log_path(&self) -> PathBuf {
        self.root.join("bangerd.log")
    }

    /// Everything bangerd wrote to standard output and error, in every run
    /// of this test bed.
    pub fn daemon_log(&self) -> String {
        read_lossy(&self.daemon_log_path())
    }

    /// The running bangerd's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// What the running daemon logged to the journal
    /// ([`crate::daemon_journal`]); nothing when none runs.
    pub fn daemon_journal(&self) -> Vec<serde_json::Value> {
        self.daemon_pid()
            .map(|pid| crate::daemon_journal(pid, self.daemon_since))
            .unwrap_or_default()
    }

    fn daemon_command(&self, extra: &[(&str, &str)]) -> io::Result<Command> {
        let path = match &self.bangerd_path {
            Some(path) => path.clone(),
            None => bin_path("bangerd"),
        };
        let log = append(&self.daemon_log_path())?;
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(path);
                c
            }
            None => Command::new(path),
        };
        // Like a systemd service: a clean environment, plus the variables
        // systemd sets from the unit's *Directory= settings.
        command.env_clear();
        for key in [
            "PATH",
            "LANG",
            "LC_ALL",
            "RUST_LOG",
            "RUST_BACKTRACE",
            "RUST_LIB_BACKTRACE",
            "LLVM_PROFILE_FILE",
        ] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .env("STATE_DIRECTORY", self.state_dir())
            .env("CACHE_DIRECTORY", self.cache_dir())
            .env("RUNTIME_DIRECTORY", self.runtime_dir())
            .env("CONFIGURATION_DIRECTORY", self.config_dir())
            .env(RELEASES_ENV, self.releases_dir())
            .envs(extra.iter().copied())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }

    /// Starts bangerd and waits until it owns `org.banger.Manager`.
    pub fn start_daemon(&mut self) -> io::Result<()> {
        self.start_daemon_with_env(&[])
    }

    /// Starts bangerd with extra environment variables (e.g.
    /// `NOTIFY_SOCKET`) and waits up to 20 s until it owns
    /// `org.banger.Manager`. If it exits first, or does not get there in
    /// time (then it is killed), the error includes its log.
    pub fn start_daemon_with_env(&mut self, extra: &[(&str, &str)]) -> io::Result<()> {
        if let Some(daemon) = &mut self.daemon {
            if daemon.try_wait()?.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("bangerd is running already (pid {})", daemon.id()),
                ));
            }
            self.daemon = None;
        }
        let command = self.daemon_command(extra)?;
        let log_path = self.daemon_log_path();
        let offset = file_len(&log_path);
        let started = Instant::now();
        self.daemon_since = std::time::SystemTime::now();
        let child = spawn_tied(command)
            .map_err(|e| io::Error::new(e.kind(), format!("run bangerd: {e}")))?;
        self.daemon = Some(child);
        loop {
            let exited = match self.daemon.as_mut() {
                Some(daemon) => daemon.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.daemon = None;
                return Err(io::Error::other(format!(
                    "bangerd exited ({status}) before owning {MANAGER_NAME}; its output:\n{}",
                    read_from(&log_path, offset)
                )));
            }
            if self.name_has_owner(MANAGER_NAME) {
                return Ok(());
            }
            if started.elapsed() > DAEMON_START_TIMEOUT {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_daemon();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "bangerd did not own {MANAGER_NAME} within {} s (killed it); its output:\n{}",
                DAEMON_START_TIMEOUT.as_secs(),
                read_from(&log_path, offset)
            ),
        ))
    }

    /// Stops bangerd: SIGTERM, then SIGKILL if it has not exited after
    /// 10 s. Returns its exit status.
    pub fn stop_daemon(&mut self) -> io::Result<ExitStatus> {
        let mut daemon = self
            .daemon
            .take()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "bangerd is not running"))?;
        terminate(&mut daemon, DAEMON_STOP_GRACE)
    }

    /// Waits up to `timeout` for bangerd to exit on its own. Returns its
    /// exit status, or `None` if it still runs (it is left running).
    pub fn wait_daemon_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let Some(daemon) = self.daemon.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "bangerd is not running",
            ));
        };
        let status = wait_timeout(daemon, timeout)?;
        if status.is_some() {
            self.daemon = None;
        }
        Ok(status)
    }

    /// Kills bangerd with SIGKILL and reaps it. Returns its exit status, or
    /// `None` if it was not running.
    pub fn kill_daemon(&mut self) -> Option<ExitStatus> {
        let mut daemon = self.daemon.take()?;
        kill_and_wait(&mut daemon).ok()
    }

    /// Runs bangerd without waiting for its name, for tests that expect it
    /// to exit (a bad configuration): waits up to `timeout` for it to exit
    /// and returns its exit status (`None` if it was still running, then it
    /// is killed) and what it wrote in this run.
    pub fn run_daemon_to_exit(
        &self,
        timeout: Duration,
    ) -> io::Result<(Option<ExitStatus>, String)> {
        self.run_daemon_to_exit_with_env(&[], timeout)
    }

    /// [`TestBed::run_daemon_to_exit`] with extra environment variables.
    pub fn run_daemon_to_exit_with_env(
        &self,
        extra: &[(&str, &str)],
        timeout: Duration,
    ) -> io::Result<(Option<ExitStatus>, String)> {
        let command = self.daemon_command(extra)?;
        let log_path = self.daemon_log_path();
        let offset = file_len(&log_path);
        let mut child = spawn_tied(command)
            .map_err(|e| io::Error::new(e.kind(), format!("run bangerd: {e}")))?;
        let status = wait_timeout(&mut child, timeout)?;
        if status.is_none() {
            kill_and_wait(&mut child)?;
        }
        Ok((status, read_from(&log_path, offset)))
    }

    fn print_logs(&self) {
        for name in ["bangerd.log", "polkitd.log", "dbus-daemon.log"] {
            let path = self.root.join(name);
            if let Ok(text) = fs::read(&path) {
                let text = String::from_utf8_lossy(&text);
                eprintln!(
                    "---- banger-testbed: last lines of {} ----\n{}",
                    path.display(),
                    tail(&text, 100)
                );
            }
        }
    }
}

/// A loopback port free for both UDP and TCP right now.
pub fn free_loopback_port() -> io::Result<u16> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// `toml` with `network.dns_listen` on a free loopback port unless it sets
/// one: beds run side by side, and the default port would make them race
/// for it (doctor's verdict would then depend on which bed won).
fn with_own_dns_port(toml: &str) -> String {
    if toml.contains("dns_listen") {
        return toml.to_owned();
    }
    let port = free_loopback_port().unwrap_or(0);
    let line = format!("dns_listen = \"127.0.0.1:{port}\"\n");
    let mut out = String::with_capacity(toml.len() + line.len() + 12);
    let mut placed = false;
    for l in toml.lines() {
        out.push_str(l);
        out.push('\n');
        if !placed && l.trim() == "[network]" {
            out.push_str(&line);
            placed = true;
        }
    }
    if !placed {
        out.push_str("[network]\n");
        out.push_str(&line);
    }
    out
}

/// SIGKILL every process whose command line mentions `dir` (a bed's VMMs,
/// which run in their own sessions and outlive bangerd on purpose).
pub fn kill_strays(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            crate::spawn::signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if let Some(mut daemon) = self.daemon.take() {
            let _ = terminate(&mut daemon, DAEMON_STOP_GRACE);
        }
        if let Some(mut polkitd) = self.polkitd.take() {
            polkitd.stop();
        }
        if let Some(mut bus) = self.bus.take() {
            let _ = terminate(&mut bus, Duration::from_secs(5));
        }
        // VMMs outlive bangerd by design; here they must go with the bed.
        // Last, so that only strays match: polkitd and the bus name the
        // bed's directory too and are stopped (and reaped) above.
        kill_strays(&self.root);
        self.journald = None;
        self.policy = None;
        if let Some(dir) = self.dir.take()
            && std::env::var_os("BANGER_TESTBED_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
        {
            let _ = fs::remove_file(dir.path().join(OWNER_FILE));
            eprintln!("banger-testbed: kept {}", dir.keep().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\n", 5), "a\nb\n");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn each_bed_gets_its_own_dns_port() {
        let added = with_own_dns_port("[daemon]\njob_retention_secs = 5\n");
        assert!(
            added.starts_with(
                "[daemon]\njob_retention_secs = 5\n[network]\ndns_listen = \"127.0.0.1:"
            )
        );
        let table: toml::Table = added.parse().expect("still TOML");
        assert!(table["network"]["dns_listen"].is_str());
        let inside = with_own_dns_port("[network]\nsubnet = \"10.9.0.0/24\"\n");
        let table: toml::Table = inside.parse().expect("still TOML");
        assert_eq!(table["network"].as_table().map(|t| t.len()), Some(2));
        let kept = "[network]\ndns_listen = \"127.0.0.1:5353\"\n";
        assert_eq!(with_own_dns_port(kept), kept);
    }

    #[test]
    fn bus_config_fills_the_template() {
        let conf = bus_config("unix:path=/tmp/x&y/system_bus_socket");
        assert!(conf.contains("<listen>unix:path=/tmp/x&amp;y/system_bus_socket</listen>"));
        assert!(conf.contains("org.banger.Manager.conf</include>"));
        assert!(!conf.contains('@'), "a placeholder was left: {conf}");
        assert!(conf.contains(r#"<allow user="*"/>"#));
    }
}
