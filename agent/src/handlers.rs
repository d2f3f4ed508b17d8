//! What each request does inside the guest.

use std::path::Path;
use std::time::{Duration, Instant};

use banger_agent_proto::{
    AgentError, DiskUsage, ErrorKind, Health, Info, PROTOCOL_VERSION, Request, Response,
};

/// The longest `WaitPort` the agent accepts.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// What the agent does after answering a `Shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReply {
    /// Nothing.
    Continue,
    /// Power off or reboot.
    Shutdown { reboot: bool },
}

/// Answer one request.
pub async fn handle(
    request: Request,
    proc_root: &Path,
) -> (Result<Response, AgentError>, AfterReply) {
    match request {
        Request::Health => (health(proc_root), AfterReply::Continue),
        Request::Info => (info(proc_root), AfterReply::Continue),
        Request::WaitPort { port, timeout_ms } => (
            wait_port(proc_root, port, timeout_ms).await,
            AfterReply::Continue,
        ),
        Request::Shutdown { reboot } => (
            Ok(Response::ShuttingDown { reboot }),
            AfterReply::Shutdown { reboot },
        ),
        Request::SyncTime { unix_ns } => (sync_time(unix_ns), AfterReply::Continue),
        Request::Mount {
            tag,
            target,
            read_only,
        } => (
            mount(proc_root, tag, target, read_only).await,
            AfterReply::Continue,
        ),
        Request::Renew(identity) => (crate::renew::renew(*identity).await, AfterReply::Continue),
        // Streams belong to a connection: serve.rs handles these.
        Request::Exec(_)
        | Request::Connect { .. }
        | Request::Signal { .. }
        | Request::Resize { .. } => (
            Err(AgentError::new(
                ErrorKind::Failed,
                "stream requests are handled by the connection",
            )),
            AfterReply::Continue,
        ),
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Failed, format!("{what}: {e}"))
}

fn read(path: &Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path).map_err(|e| failed(&format!("cannot read {}", path.display()), e))
}

fn health(proc_root: &Path) -> Result<Response, AgentError> {
    let uptime = read(&proc_root.join("uptime"))?;
    let uptime_secs = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| failed("cannot parse /proc/uptime", uptime.trim()))?;
    let boot_id = read(&proc_root.join("sys/kernel/random/boot_id"))?
        .trim()
        .to_owned();
    Ok(Response::Health(Health {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol: PROTOCOL_VERSION,
        uptime_secs,
        boot_id,
    }))
}

fn info(proc_root: &Path) -> Result<Response, AgentError> {
    let uts = nix::sys::utsname::uname().map_err(|e| failed("uname", e))?;
    let os = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let meminfo = read(&proc_root.join("meminfo"))?;
    let mut disks = Vec::new();
    for path in ["/", "/root"] {
        if let Ok(st) = nix::sys::statvfs::statvfs(path) {
            let frsize = st.fragment_size();
            let total = st.blocks().saturating_mul(frsize);
            let free = st.blocks_free().saturating_mul(frsize);
            disks.push(DiskUsage {
                path: path.to_owned(),
                total_bytes: total,
                used_bytes: total.saturating_sub(free),
                available_bytes: st.blocks_available().saturating_mul(frsize),
            });
        }
    }
    Ok(Response::Info(Box::new(Info {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        kernel_version: uts.version().to_string_lossy().into_owned(),
        machine: uts.machine().to_string_lossy().into_owned(),
        hostname: uts.nodename().to_string_lossy().into_owned(),
        os_id: os_release_field(&os, "ID"),
        os_pretty_name: os_release_field(&os, "PRETTY_NAME"),
        memory_total_bytes: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) * 1024,
        memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) * 1024,
        disks,
    })))
}

/// A field of an os-release file, unquoted.
pub fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        if k.trim() != key {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        Some(v.replace("\\\"", "\""))
    })
}

/// A `kB` field of /proc/meminfo.
pub fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Whether a /proc/net/tcp{,6} table has a socket listening on `port`.
pub fn tcp_table_listens(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        // State 0A is TCP_LISTEN.
        state == "0A"
            && local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

fn listening(proc_root: &Path, port: u16) -> bool {
    ["net/tcp", "net/tcp6"].iter().any(|t| {
        std::fs::read_to_string(proc_root.join(t))
            .map(|text| tcp_table_listens(&text, port))
            .unwrap_or(false)
    })
}

async fn wait_port(proc_root: &Path, port: u16, timeout_ms: u64) -> Result<Response, AgentError> {
    if port == 0 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "port 0 cannot be waited for",
        ));
    }
    let timeout = Duration::from_millis(timeout_ms);
    if timeout > MAX_WAIT {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!(
                "timeout of {timeout_ms} ms is over the limit of {} s",
                MAX_WAIT.as_secs()
            ),
        ));
    }
    let start = Instant::now();
    loop {
        if listening(proc_root, port) {
            let waited_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            return Ok(Response::PortReady { port, waited_ms });
        }
        if start.elapsed() >= timeout {
            return Err(AgentError::new(
                ErrorKind::Timeout,
                format!("nothing listens on tcp port {port} after {timeout_ms} ms"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sync_time(unix_ns: i64) -> Result<Response, AgentError> {
    let offset_ns = crate::clock::set(unix_ns)?;
    Ok(Response::TimeSynced { offset_ns })
}

/// The longest virtio-fs tag (the `tag` field of the device's config).
const MAX_TAG_LEN: usize = 36;

/// The longest mount point accepted (`PATH_MAX`).
const MAX_TARGET_LEN: usize = 4096;

/// Check a virtio-fs tag: 1 to 36 bytes of ASCII letters, digits, `-`
/// and `_`.
pub fn validate_tag(tag: &str) -> Result<(), AgentError> {
    let invalid = |why: String| AgentError::new(ErrorKind::InvalidArgument, why);
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(invalid(format!(
            "virtio-fs tag {tag:?} is {} bytes long; a tag has 1 to {MAX_TAG_LEN}",
            tag.len()
        )));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "virtio-fs tag {tag:?} has {c:?}; a tag is made of ASCII letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

/// Check a mount point: an absolute path, not `/`, without `.` or `..`
/// components or NUL bytes, at most 4096 bytes. Returns it without
/// repeated or trailing slashes, as /proc/self/mountinfo shows it.
pub fn validate_target(target: &str) -> Result<String, AgentError> {
    let invalid = |why: String| AgentError::new(ErrorKind::InvalidArgument, why);
    if target.len() > MAX_TARGET_LEN {
        return Err(invalid(format!(
            "mount point of {} bytes is over the limit of {MAX_TARGET_LEN}",
            target.len()
        )));
    }
    if target.contains('\0') {
        return Err(invalid(format!("mount point {target:?} has a NUL byte")));
    }
    if !target.starts_with('/') {
        return Err(invalid(format!(
            "mount point {target:?} is not an absolute path"
        )));
    }
    let parts: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(dots) = parts.iter().find(|p| **p == "." || **p == "..") {
        return Err(invalid(format!(
            "mount point {target:?} has a {dots:?} component"
        )));
    }
    if parts.is_empty() {
        return Err(invalid(format!(
            "mount point {target:?} is the root directory"
        )));
    }
    Ok(parts.iter().fold(String::new(), |mut path, part| {
        path.push('/');
        path.push_str(part);
        path
    }))
}

/// Undo the octal escapes of /proc/self/mountinfo (`\040` for a space,
/// `\011` tab, `\012` newline, `\134` backslash).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Whether the file system mounted last (the one seen) at `target` in a
/// /proc/self/mountinfo table is virtio-fs with source `tag`.
pub fn virtiofs_mounted_at(mountinfo: &str, tag: &str, target: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let target = target.as_os_str().as_bytes();
    let mut seen = false;
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount_point) = fields.get(4) else {
            continue;
        };
        if unescape_mountinfo(mount_point) != target {
            continue;
        }
        let after_dash = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 7);
        seen = match after_dash.map(|at| (fields.get(at), fields.get(at + 1))) {
            Some((Some(fstype), Some(source))) => {
                *fstype == "virtiofs" && unescape_mountinfo(source) == tag.as_bytes()
            }
            _ => false,
        };
    }
    seen
}

/// Mounts are made one at a time, so that two requests for the same share
/// do not both find it unmounted and stack two mounts.
static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

async fn mount(
    proc_root: &Path,
    tag: String,
    target: String,
    read_only: bool,
) -> Result<Response, AgentError> {
    validate_tag(&tag)?;
    let target = validate_target(&target)?;
    let mountinfo = proc_root.join("self/mountinfo");
    // mount(2) and the mkdir may block (a slow virtiofsd); the runtime
    // has a single thread that must go on serving.
    tokio::task::spawn_blocking(move || mount_blocking(&mountinfo, &tag, &target, read_only))
        .await
        .map_err(|e| failed("the mount task failed", e))?
}

fn mount_blocking(
    mountinfo: &Path,
    tag: &str,
    target: &str,
    read_only: bool,
) -> Result<Response, AgentError> {
    use nix::errno::Errno;
    use nix::mount::MsFlags;
    use std::os::unix::fs::DirBuilderExt;

    let _one_at_a_time = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let path = Path::new(target);
    let already = || -> Result<bool, AgentError> {
        let table = read(mountinfo)?;
        if virtiofs_mounted_at(&table, tag, path) {
            return Ok(true);
        }
        // The kernel lists mount points with symlinks resolved.
        Ok(match std::fs::canonicalize(path) {
            Ok(real) if real != path => virtiofs_mounted_at(&table, tag, &real),
            _ => false,
        })
    };
    if already()? {
        return Ok(Response::Mounted);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| failed(&format!("cannot make the mount point {target}"), e))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(tag), path, Some("virtiofs"), flags, None::<&str>).map_err(|errno| {
        let hint = match errno {
            Errno::ENODEV => "; the guest kernel has no virtio-fs (CONFIG_VIRTIO_FS)",
            Errno::EINVAL => "; is a virtio-fs device with this tag attached to the VM?",
            Errno::EPERM => "; the agent is not allowed to mount (is it root?)",
            _ => "",
        };
        failed(
            &format!("cannot mount virtio-fs tag {tag:?} at {target}"),
            format!("{errno}{hint}"),
        )
    })?;
    Ok(Response::Mounted)
}

/// Ask the init system to take the guest down. Returns whether it
/// accepted; then init stops every service, this agent included (SIGTERM).
pub async fn request_shutdown(reboot: bool) -> bool {
    use tokio::process::Command;
    let verb = if reboot { "reboot" } else { "poweroff" };
    eprintln!("banger-agent: {verb} requested by the host");
    nix::unistd::sync();
    let asked = if Path::new("/run/systemd/system").exists() {
        Command::new("systemctl").arg(verb).status().await
    } else {
        Command::new(verb).status().await
    };
    matches!(asked, Ok(st) if st.success())
}

/// The last resort when init does not take the guest down: sync and the
/// reboot syscall.
pub fn force_shutdown(reboot: bool) {
    let verb = if reboot { "reboot" } else { "poweroff" };
    eprintln!("banger-agent: init did not {verb}; using the reboot syscall");
    nix::unistd::sync();
    let how = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let Err(e) = nix::sys::reboot::reboot(how);
    eprintln!("banger-agent: {verb} failed: {e}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_os_release() {
        let text = "NAME=\"Debian GNU/Linux\"\nID=debian\nPRETTY_NAME='Debian 12'\n";
        assert_eq!(os_release_field(text, "ID").as_deref(), Some("debian"));
        assert_eq!(
            os_release_field(text, "PRETTY_NAME").as_deref(),
            Some("Debian 12")
        );
        assert_eq!(
            os_release_field(text, "NAME").as_deref(),
            Some("Debian GNU/Linux")
        );
        assert_eq!(os_release_field(text, "VERSION"), None);
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:        1000 kB\nMemFree: 5 kB\nMemAvailable:     800 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(1000));
        assert_eq!(meminfo_kib(text, "MemAvailable"), Some(800));
        assert_eq!(meminfo_kib(text, "Mem"), None);
    }

    #[test]
    fn finds_listening_sockets_in_tcp_tables() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 00000000:0016 00000000:0000 0A 00000000:00000000\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000\n";
        assert!(tcp_table_listens(table, 22));
        // Port 8080 is only in an established connection.
        assert!(!tcp_table_listens(table, 8080));
        let table6 = "  sl  local_address                         remote_address\n\
   0: 00000000000000000000000000000000:1010 00000000000000000000000000000000:0000 0A\n";
        assert!(tcp_table_listens(table6, 4112));
        assert!(!tcp_table_listens("garbage\nmore garbage", 22));
    }

    #[tokio::test]
    async fn wait_port_sees_a_real_listener_and_times_out_without_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let proc_root = Path::new("/proc");
        let r = wait_port(proc_root, port, 1000).await.unwrap();
        assert!(matches!(r, Response::PortReady { port: p, .. } if p == port));
        drop(l);
        // A process forked by another test at that moment holds a copy of
        // the socket until it execs (close-on-exec): the port listens
        // until then. Once no copy is left, nothing can bring it back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while listening(proc_root, port) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = wait_port(proc_root, port, 200).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Timeout);
        let err = wait_port(proc_root, 22, u64::MAX).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn mount_tags_are_checked() {
        for good in ["a", "share0", "my-share_1", &"x".repeat(36)] {
            validate_tag(good).unwrap();
        }
        for bad in [
            "",
            &"x".repeat(37),
            "has space",
            "sl/ash",
            "dot.ted",
            "nul\0",
            "ünï",
            "-o,ro",
        ] {
            let err = validate_tag(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{bad:?}");
            assert!(err.message.contains("tag"), "{}", err.message);
        }
    }

    #[test]
    fn mount_points_are_checked_and_tidied() {
        for (given, tidy) in [
            ("/mnt/share", "/mnt/share"),
            ("/mnt//share/", "/mnt/share"),
            ("//srv", "/srv"),
            ("/a/.hidden/b..c/...", "/a/.hidden/b..c/..."),
        ] {
            assert_eq!(validate_target(given).unwrap(), tidy);
        }
        let long = format!("/{}", "x".repeat(4096));
        for (bad, says) in [
            ("", "not an absolute path"),
            ("mnt/share", "not an absolute path"),
            ("./mnt", "not an absolute path"),
            ("/", "root directory"),
            ("///", "root directory"),
            ("/mnt/../etc", "\"..\" component"),
            ("/mnt/..", "\"..\" component"),
            ("/mnt/./share", "\".\" component"),
            ("/mnt/.", "\".\" component"),
            ("/mnt/sh\0are", "NUL"),
            (long.as_str(), "over the limit"),
        ] {
            let err = validate_target(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{bad:?}");
            assert!(err.message.contains(says), "{bad:?}: {}", err.message);
        }
        let longest = format!("/{}", "x".repeat(4095));
        assert_eq!(validate_target(&longest).unwrap(), longest);
    }

    #[tokio::test]
    async fn mount_requests_with_bad_arguments_are_refused_before_mounting() {
        for (tag, target) in [("bad tag", "/mnt/x"), ("ok", "/mnt/../x"), ("ok", "/")] {
            let (result, after) = handle(
                Request::Mount {
                    tag: tag.into(),
                    target: target.into(),
                    read_only: false,
                },
                Path::new("/proc"),
            )
            .await;
            assert_eq!(after, AfterReply::Continue);
            assert_eq!(result.unwrap_err().kind, ErrorKind::InvalidArgument);
        }
    }

    #[test]
    fn finds_virtiofs_mounts_in_mountinfo() {
        let table = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
30 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 30 0:40 / /mnt/share rw,nosuid,nodev,relatime shared:20 - virtiofs share0 rw
41 30 0:41 / /mnt/with\\040space ro,nosuid,nodev - virtiofs other rw
42 30 0:42 / /mnt/over rw - virtiofs share0 rw
43 42 0:43 / /mnt/over rw master:3 - tmpfs tmpfs rw
";
        let at = |tag: &str, p: &str| virtiofs_mounted_at(table, tag, Path::new(p));
        assert!(at("share0", "/mnt/share"));
        assert!(!at("share1", "/mnt/share"));
        assert!(!at("share0", "/mnt"));
        assert!(!at("share0", "/mnt/share/sub"));
        assert!(at("other", "/mnt/with space"));
        // Something else was mounted over the share: it is not what is seen.
        assert!(!at("share0", "/mnt/over"));
        assert!(!at("proc", "/proc"));
        assert!(!virtiofs_mounted_at(
            "garbage\n1 2 3\n",
            "x",
            Path::new("/")
        ));
    }

    #[test]
    fn sync_time_rejects_nonsense() {
        assert_eq!(sync_time(-1).unwrap_err().kind, ErrorKind::InvalidArgument);
    }
}
