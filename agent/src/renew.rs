//! `Renew`: a guest restored from another guest's memory (a template's,
//! or a forked VM's) made a VM of its own. Every part of the old guest's
//! identity that lives in memory or on its disks is replaced: the random
//! pool first, so that nothing made after shares the old guest's
//! randomness, then the clock, names, ids, the NIC, root's keys and the
//! SSH host keys.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_agent_proto::{AgentError, ErrorKind, Identity, MIN_SEED, Response};

use crate::nic::Nic;

fn invalid(message: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, message)
}

fn failed(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Failed, format!("{what}: {e}"))
}

/// The most random bytes a seed may carry.
const MAX_SEED: usize = 4096;

/// Whether `identity` is well formed, with the NIC it describes;
/// nothing is changed before it is.
pub fn validate(identity: &Identity) -> Result<Nic<'_>, AgentError> {
    let n = identity.seed.len();
    if !(MIN_SEED..=MAX_SEED).contains(&n) {
        return Err(invalid(format!(
            "the seed has {n} bytes; give {MIN_SEED} to {MAX_SEED}"
        )));
    }
    let h = &identity.hostname;
    let label = !h.is_empty()
        && h.len() <= 63
        && !h.starts_with('-')
        && !h.ends_with('-')
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label {
        return Err(invalid(format!("hostname {h:?} is not a DNS label")));
    }
    let hex = |s: &str, len: std::ops::RangeInclusive<usize>| {
        len.contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(&identity.vm_id, 1..=64) {
        return Err(invalid(format!("vm id {:?} is not hex", identity.vm_id)));
    }
    if !hex(&identity.machine_id, 32..=32) {
        return Err(invalid(format!(
            "machine id {:?} is not 32 hex digits",
            identity.machine_id
        )));
    }
    let d = &identity.device;
    if d.is_empty() || d.len() > 15 || !d.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(format!("{d:?} is not a network device name")));
    }
    let mac = parse_mac(&identity.mac)?;
    let (address, prefix) = parse_cidr(&identity.address)?;
    let ipv4 = |what: &str, addr: &Option<String>| {
        addr.as_deref()
            .map(|a| {
                a.parse::<Ipv4Addr>()
                    .map_err(|_| invalid(format!("{what} {a:?} is not an IPv4 address")))
            })
            .transpose()
    };
    let gateway = ipv4("gateway", &identity.gateway)?;
    ipv4("dns", &identity.dns)?;
    if identity.authorized_keys.len() > 64 {
        return Err(invalid("more than 64 authorized keys".to_owned()));
    }
    for key in &identity.authorized_keys {
        if key.is_empty() || key.len() > 16 << 10 || key.contains(['\n', '\r', '\0']) {
            return Err(invalid(format!(
                "authorized key {:?} is not one line",
                key.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(Nic {
        device: d,
        mac,
        address,
        prefix,
        gateway,
    })
}

fn parse_mac(mac: &str) -> Result<[u8; 6], AgentError> {
    let bad = || invalid(format!("{mac:?} is not a MAC address"));
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), AgentError> {
    let bad = || invalid(format!("{cidr:?} is not an address/prefix"));
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let addr = addr.parse::<Ipv4Addr>().map_err(|_| bad())?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(bad)?;
    Ok((addr, prefix))
}

/// Renew the guest as `identity` says (validated first).
pub async fn renew(identity: Identity) -> Result<Response, AgentError> {
    let steps = tokio::task::spawn_blocking(move || {
        let nic = validate(&identity)?;
        renew_blocking(&identity, &nic)
    })
    .await
    .map_err(|e| failed("renew task", e))??;
    Ok(Response::Renewed { steps })
}

fn renew_blocking(identity: &Identity, nic: &Nic<'_>) -> Result<Vec<(String, u64)>, AgentError> {
    let mut steps = Vec::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<(), AgentError>| {
        let t = Instant::now();
        f()?;
        let ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        steps.push((name.to_owned(), ms));
        Ok::<(), AgentError>(())
    };
    step("random", &mut || reseed(&identity.seed))?;
    step("clock", &mut || {
        crate::clock::set(identity.unix_ns).map(|_| ())
    })?;
    step("hostname", &mut || {
        nix::unistd::sethostname(&identity.hostname).map_err(|e| failed("sethostname", e))
    })?;
    step("files", &mut || write_files(Path::new("/"), identity))?;
    step("network", &mut || {
        tokio::runtime::Handle::current()
            .block_on(crate::nic::readdress(nic))
            .map_err(|e| failed("network", e))
    })?;
    let listeners = ssh_listeners(Path::new("/proc"));
    let mut restart = Vec::new();
    step("host keys", &mut || {
        restart = renew_host_keys(Path::new("/"), &listeners)?;
        Ok(())
    })?;
    step("ssh", &mut || restart_ssh(&restart))?;
    // On disk before anyone logs in: a VM killed later must not come
    // back with the template's keys.
    step("sync", &mut || {
        nix::unistd::sync();
        Ok(())
    })?;
    Ok(steps)
}

nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<i32>()),
    u8
);
nix::ioctl_none_bad!(rnd_reseed_crng, nix::request_code_none!(b'R', 0x07));

/// Add `seed` to the kernel's pool, credited, and force the CRNG to
/// reseed from it (Linux 5.18 and later; older kernels reseed as the
/// credited entropy arrives).
fn reseed(seed: &[u8]) -> Result<(), AgentError> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| failed("cannot open /dev/random", e))?;
    let len = i32::try_from(seed.len()).map_err(|e| failed("seed", e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a rand_pool_info of `len` bytes, alive for the call.
    unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr()) }
        .map_err(|e| failed("RNDADDENTROPY", e))?;
    // SAFETY: an ioctl without argument.
    match unsafe { rnd_reseed_crng(random.as_raw_fd()) } {
        Ok(_) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOTTY) => Ok(()),
        Err(e) => Err(failed("RNDRESEEDCRNG", e)),
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed(&format!("{}", dir.display()), e))?;
    }
    let tmp = path.with_extension("banger-new");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| failed(&format!("cannot write {}", path.display()), e))
}

/// The VM id as the first-boot scripts of Debian and container images
/// record it (`images/debian-bookworm/firstboot`, `banger-first-boot`).
const FIRST_BOOT_VM_ID: &str = "/var/lib/banger/vm-id";

/// The files of the identity under `root`: hostname, machine and VM
/// ids, root's authorized keys and (with a resolver) resolv.conf.
pub fn write_files(root: &Path, identity: &Identity) -> Result<(), AgentError> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    write_file(
        &at("/etc/hostname"),
        &format!("{}\n", identity.hostname),
        0o644,
    )?;
    write_file(
        &at("/etc/machine-id"),
        &format!("{}\n", identity.machine_id),
        0o444,
    )?;
    write_file(
        &at("/etc/banger/vm-id"),
        &format!("{}\n", identity.vm_id),
        0o644,
    )?;
    // Where the first-boot scripts of Debian and container images keep
    // it: left the source's, their next boot would take the VM for a
    // clone and make new host keys behind the host's pinned ones.
    let first_boot = at(FIRST_BOOT_VM_ID);
    if first_boot.exists() {
        write_file(&first_boot, &format!("{}\n", identity.vm_id), 0o644)?;
    }
    let ssh = at("/root/.ssh");
    std::fs::create_dir_all(&ssh).map_err(|e| failed("/root/.ssh", e))?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| failed("/root/.ssh", e))?;
    let mut keys = identity.authorized_keys.join("\n");
    if !keys.is_empty() {
        keys.push('\n');
    }
    write_file(&ssh.join("authorized_keys"), &keys, 0o600)?;
    if let Some(dns) = &identity.dns {
        write_file(
            &at("/etc/resolv.conf"),
            &format!("nameserver {dns}\n"),
            0o644,
        )?;
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<(), AgentError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| failed(&format!("cannot run {program}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(failed(
        &format!("{program} {}", args.join(" ")),
        String::from_utf8_lossy(&out.stderr).trim(),
    ))
}

/// New SSH host keys of every type there is, for dropbear and OpenSSH;
/// returns the listeners that must start again to serve them.
///
/// A dropbear listener that makes its keys as needed (`-R`, no `-r`)
/// and found none at its start reads the key files at each connection:
/// its keys are removed rather than made, so the first connection makes
/// fresh ones. With no key on disk it cannot hold one in memory, and it
/// goes on without a restart (the template's case: nobody connected).
pub fn renew_host_keys(root: &Path, listeners: &[Listener]) -> Result<Vec<Listener>, AgentError> {
    let keys = |dir: &str, prefix: &str, suffix: &str| -> Vec<(String, std::path::PathBuf)> {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            return Vec::new();
        };
        let mut found: Vec<_> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let kind = name.strip_prefix(prefix)?.strip_suffix(suffix)?.to_owned();
                Some((kind, e.path()))
            })
            .collect();
        found.sort();
        found
    };
    let dropbear: Vec<&Listener> = listeners.iter().filter(|l| l.name == "dropbear").collect();
    let per_connection = !dropbear.is_empty() && dropbear.iter().all(|l| l.keys_per_connection);
    let dropbear_keys = keys("etc/dropbear", "dropbear_", "_host_key");
    for (kind, path) in &dropbear_keys {
        std::fs::remove_file(path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| failed(&format!("cannot remove {}", path.display()), e))?;
        if !per_connection {
            run("dropbearkey", &["-t", kind, "-f", &path.to_string_lossy()])?;
        }
    }
    for (kind, path) in keys("etc/ssh", "ssh_host_", "_key") {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("pub"));
        let _ = std::fs::remove_file(format!("{}.pub", path.display()));
        run(
            "ssh-keygen",
            &["-q", "-t", &kind, "-N", "", "-f", &path.to_string_lossy()],
        )?;
    }
    Ok(listeners
        .iter()
        .filter(|l| !(per_connection && l.name == "dropbear" && dropbear_keys.is_empty()))
        .cloned()
        .collect())
}

/// The SSH server started again, so that it serves the new host keys:
/// through systemd where it runs; elsewhere the `listeners` are ended
/// and the init respawns them (started here when nothing does).
fn restart_ssh(listeners: &[Listener]) -> Result<(), AgentError> {
    // Under systemd: the services the listeners run in, reloaded where
    // they can be (OpenSSH re-executes itself on SIGHUP and reads its
    // keys again; the connections it serves stay) and restarted
    // otherwise.
    let units: std::collections::BTreeSet<&str> =
        listeners.iter().filter_map(|l| l.unit.as_deref()).collect();
    if !listeners.is_empty() && listeners.iter().all(|l| l.unit.is_some()) {
        let mut args = vec!["try-reload-or-restart"];
        args.extend(units);
        return run("systemctl", &args);
    }
    if listeners.is_empty() {
        return Ok(());
    }
    let pids: Vec<i32> = listeners.iter().map(|l| l.pid).collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        let now = ssh_listeners(Path::new("/proc"));
        if !now.is_empty() && now.iter().all(|l| !pids.contains(&l.pid)) {
            return Ok(());
        }
    }
    // Nobody respawned it: start it as the init would have.
    if listeners[0].name == "dropbear" {
        run("/usr/sbin/dropbear", &["-R", "-E", "-p", "22"])
    } else {
        std::fs::create_dir_all("/run/sshd").map_err(|e| failed("/run/sshd", e))?;
        run("/usr/sbin/sshd", &[])
    }
}

/// An SSH server's listening process: a child of PID 1 named
/// `dropbear` or `sshd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub pid: i32,
    pub name: String,
    /// dropbear with `-R` and no `-r`: it reads the default key files
    /// at each connection unless it found them at its start.
    pub keys_per_connection: bool,
    /// The systemd service it runs in, if any.
    pub unit: Option<String>,
}

/// The systemd service of a process whose `/proc/PID/cgroup` is
/// `cgroup`: the last part of its path in the unified hierarchy (`0::`)
/// or systemd's own (`name=systemd`), when that is a `.service`.
fn service_of(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if !controllers.is_empty() && controllers != "name=systemd" {
            return None;
        }
        let last = path.rsplit('/').next()?;
        last.ends_with(".service").then(|| last.to_owned())
    })
}

/// The SSH servers' listening processes under `proc_root`.
pub fn ssh_listeners(proc_root: &Path) -> Vec<Listener> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found: Vec<Listener> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (name, rest) = parse_stat(&stat)?;
            let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            if ppid != 1 || (name != "dropbear" && name != "sshd") {
                return None;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .skip(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            Some(Listener {
                pid,
                name: name.to_owned(),
                keys_per_connection: name == "dropbear" && makes_keys_as_needed(&args),
                unit: service_of(&cgroup),
            })
        })
        .collect();
    found.sort_by_key(|l| l.pid);
    found
}

/// Whether dropbear's arguments have `-R` (make host keys as needed)
/// and no `-r` (a key file named, loaded at start). Flags may be
/// combined (`-FER`); an option's value is the rest of its argument or
/// the next one.
fn makes_keys_as_needed(args: &[String]) -> bool {
    const WITH_VALUE: &[char] = &['b', 'c', 'G', 'I', 'K', 'p', 'P', 'r', 'T', 'W'];
    let (mut as_needed, mut named) = (false, false);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(flags) = arg.strip_prefix('-') else {
            continue;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'R' => as_needed = true,
                'r' => named = true,
                _ => {}
            }
            if WITH_VALUE.contains(&c) {
                if i + c.len_utf8() == flags.len() {
                    args.next();
                }
                break;
            }
        }
    }
    as_needed && !named
}

/// `/proc/PID/stat`: the command name (in parentheses, which it may
/// contain) and the fields after it.
fn parse_stat(stat: &str) -> Option<(&str, &str)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((stat.get(open + 1..close)?, stat.get(close + 1..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            seed: vec![1; MIN_SEED],
            unix_ns: 1_700_000_000_000_000_000,
            hostname: "web-2".into(),
            vm_id: "0123456789abcdef".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            device: "eth0".into(),
            mac: "0a:b6:0a:00:00:02".into(),
            address: "10.0.0.2/24".into(),
            gateway: Some("10.0.0.1".into()),
            dns: Some("10.0.0.1".into()),
            authorized_keys: vec!["ssh-ed25519 AAAA me@host".into()],
        }
    }

    #[test]
    fn a_good_identity_passes_and_each_bad_field_is_named() {
        validate(&identity()).expect("good");
        type Change = Box<dyn Fn(&mut Identity)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.seed = vec![1; MIN_SEED - 1]), "seed"),
            (Box::new(|i| i.seed = vec![1; MAX_SEED + 1]), "seed"),
            (Box::new(|i| i.hostname = "Web".into()), "hostname"),
            (Box::new(|i| i.hostname = "-web".into()), "hostname"),
            (Box::new(|i| i.hostname = String::new()), "hostname"),
            (Box::new(|i| i.hostname = "a".repeat(64)), "hostname"),
            (Box::new(|i| i.vm_id = "../x".into()), "vm id"),
            (Box::new(|i| i.machine_id = "0".repeat(31)), "machine id"),
            (Box::new(|i| i.device = "eth0; reboot".into()), "device"),
            (Box::new(|i| i.mac = "0a:b6:0a:00:00".into()), "MAC"),
            (Box::new(|i| i.mac = "0a:b6:0a:00:00:zz".into()), "MAC"),
            (Box::new(|i| i.address = "10.0.0.2".into()), "address"),
            (Box::new(|i| i.address = "10.0.0.2/33".into()), "address"),
            (Box::new(|i| i.gateway = Some("gw".into())), "gateway"),
            (Box::new(|i| i.dns = Some("1.2.3".into())), "dns"),
            (
                Box::new(|i| i.authorized_keys = vec!["a\nb".into()]),
                "one line",
            ),
        ];
        for (change, says) in cases {
            let mut bad = identity();
            change(&mut bad);
            let e = validate(&bad).expect_err(says);
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains(says), "{says}: {}", e.message);
        }
    }

    #[test]
    fn the_identity_files_are_replaced_with_their_modes() {
        let root = tempfile::tempdir().expect("tempdir");
        let ssh = root.path().join("root/.ssh");
        std::fs::create_dir_all(&ssh).expect("dirs");
        std::fs::write(ssh.join("authorized_keys"), "ssh-rsa OLD template\n").expect("old");
        write_files(root.path(), &identity()).expect("written");
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).expect(p);
        let mode = |p: &str| {
            std::fs::metadata(root.path().join(p))
                .expect(p)
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(read("etc/hostname"), "web-2\n");
        assert_eq!(read("etc/machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert_eq!(read("etc/banger/vm-id"), "0123456789abcdef\n");
        assert!(
            !root.path().join("var/lib/banger").exists(),
            "made only where a first-boot script keeps it"
        );
        assert_eq!(
            read("root/.ssh/authorized_keys"),
            "ssh-ed25519 AAAA me@host\n"
        );
        assert_eq!(mode("root/.ssh/authorized_keys"), 0o600);
        assert_eq!(mode("root/.ssh"), 0o700);
        assert_eq!(read("etc/resolv.conf"), "nameserver 10.0.0.1\n");
        // No keys: an empty file, not the template's.
        let none = Identity {
            authorized_keys: Vec::new(),
            ..identity()
        };
        write_files(root.path(), &none).expect("written");
        assert_eq!(read("root/.ssh/authorized_keys"), "");
        // A first-boot script's record is the new VM's too.
        std::fs::create_dir_all(root.path().join("var/lib/banger")).expect("dir");
        std::fs::write(root.path().join("var/lib/banger/vm-id"), "fedcba\n").expect("old id");
        write_files(root.path(), &identity()).expect("written");
        assert_eq!(read("var/lib/banger/vm-id"), "0123456789abcdef\n");
    }

    #[test]
    fn ssh_listeners_are_the_servers_init_started() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        for (pid, stat, cmdline) in [
            (
                10,
                "10 (dropbear) S 1 10 10 0",
                "dropbear\0-F\0-E\0-R\0-p\x0022\0",
            ),
            (11, "11 (dropbear) S 10 10 10 0", "dropbear\0-R\0"),
            (12, "12 (sshd) S 1 12 12 0", "sshd\0-R\0"),
            (13, "13 (sh) S 1 13 13 0", "sh\0"),
            (14, "14 (odd) name) S 1 14 14 0", ""),
            (15, "15 (dropbear) S 1 15 15 0", "dropbear\0-FER\0-r\0/k\0"),
        ] {
            let dir = proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("stat"), stat).expect("stat");
            std::fs::write(dir.join("cmdline"), cmdline).expect("cmdline");
        }
        std::fs::write(
            proc_root.path().join("12/cgroup"),
            "0::/system.slice/ssh.service\n",
        )
        .expect("cgroup");
        std::fs::write(proc_root.path().join("10/cgroup"), "0::/\n").expect("cgroup");
        std::fs::create_dir_all(proc_root.path().join("self")).expect("self");
        let listener = |pid, name: &str, keys_per_connection, unit: Option<&str>| Listener {
            pid,
            name: name.to_owned(),
            keys_per_connection,
            unit: unit.map(str::to_owned),
        };
        assert_eq!(
            ssh_listeners(proc_root.path()),
            vec![
                listener(10, "dropbear", true, None),
                listener(12, "sshd", false, Some("ssh.service")),
                listener(15, "dropbear", false, None),
            ]
        );
    }

    #[test]
    fn a_listeners_service_is_read_from_its_cgroup() {
        for (cgroup, want) in [
            ("0::/system.slice/ssh.service\n", Some("ssh.service")),
            (
                "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/dropbear.service\n0::/\n",
                Some("dropbear.service"),
            ),
            ("0::/\n", None),
            ("0::/user.slice/user-0.slice/session-1.scope\n", None),
            ("12:pids:/system.slice/ssh.service\n", None),
            ("", None),
        ] {
            assert_eq!(service_of(cgroup).as_deref(), want, "{cgroup:?}");
        }
    }

    #[test]
    fn dropbear_makes_keys_as_needed_only_with_r_and_no_key_file() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        for (a, want) in [
            (args(&["-F", "-E", "-R", "-p", "22"]), true),
            (args(&["-FER", "-p22"]), true),
            // -p's value is the next argument, not flags.
            (args(&["-p", "-R"]), false),
            (args(&["-R", "-r", "/etc/dropbear/k"]), false),
            (args(&["-Rr/etc/dropbear/k"]), false),
            (args(&["-F", "-E"]), false),
            // A value that looks like -r is a value.
            (args(&["-R", "-b", "-r"]), true),
        ] {
            assert_eq!(makes_keys_as_needed(&a), want, "{a:?}");
        }
    }

    #[test]
    fn keys_made_per_connection_are_removed_and_their_listener_goes_on() {
        let root = tempfile::tempdir().expect("tempdir");
        let keys = root.path().join("etc/dropbear");
        let lazy = Listener {
            pid: 10,
            name: "dropbear".into(),
            keys_per_connection: true,
            unit: None,
        };
        // A template nobody connected to: no key, nothing to restart.
        std::fs::create_dir_all(&keys).expect("dir");
        assert_eq!(
            renew_host_keys(root.path(), std::slice::from_ref(&lazy)).expect("renewed"),
            Vec::new()
        );
        assert_eq!(std::fs::read_dir(&keys).expect("dir").count(), 0);
        // A VM connected to: its keys may be in the listener's memory
        // (made before it started), so they go and the listener starts
        // again, to make fresh ones at the next connection.
        std::fs::write(keys.join("dropbear_ed25519_host_key"), "old").expect("key");
        assert_eq!(
            renew_host_keys(root.path(), std::slice::from_ref(&lazy)).expect("renewed"),
            vec![lazy.clone()]
        );
        assert_eq!(std::fs::read_dir(&keys).expect("dir").count(), 0);
        // Any other listener starts again.
        let sshd = Listener {
            pid: 12,
            name: "sshd".into(),
            keys_per_connection: false,
            unit: Some("ssh.service".into()),
        };
        assert_eq!(
            renew_host_keys(root.path(), &[lazy, sshd.clone()]).expect("renewed"),
            vec![sshd]
        );
    }
}
