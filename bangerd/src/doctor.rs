//! `doctor`: host checks that tell the truth about what banger can do here.
//!
//! Each check looks at the real thing (opens the device, runs the ioctl,
//! binds the port) rather than trusting that a file exists. Checks that need
//! the bus get their answers through [`BusProbe`].

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::auth::BoxFuture;
use crate::config::{Config, VmmKind};
use crate::store::Store;

/// Verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works with a caveat, or a feature is degraded.
    Warn,
    /// Broken; banger cannot do something it needs.
    Fail,
}

impl Verdict {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable short name.
    pub name: &'static str,
    /// Verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do; empty on pass.
    pub hint: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Pass,
            detail: detail.into(),
            hint: String::new(),
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            hint: hint.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            hint: hint.into(),
        }
    }
}

/// Whether a bus name can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameState {
    /// Someone owns it.
    Owned,
    /// Nobody owns it, but the bus can start its owner.
    Activatable,
    /// Nobody owns it and nothing would start.
    Absent,
    /// The bus could not be asked.
    Unknown,
}

impl NameState {
    /// Owned or activatable.
    pub fn reachable(self) -> bool {
        matches!(self, Self::Owned | Self::Activatable)
    }
}

/// Questions about the bus the daemon is on.
pub trait BusProbe: Send + Sync + std::fmt::Debug {
    /// Can `name` be reached?
    fn name_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, NameState>;
}

/// Host paths the checks look at; overridable so the checks can be tested.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// `/dev/kvm`.
    pub kvm: PathBuf,
    /// `/dev/net/tun`.
    pub tun: PathBuf,
    /// `/dev/loop-control`.
    pub loop_control: PathBuf,
    /// `/dev/mapper/control`.
    pub mapper_control: PathBuf,
    /// journald's native socket.
    pub journal_socket: PathBuf,
    /// Exists when systemd is PID 1.
    pub systemd_runtime: PathBuf,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            kvm: "/dev/kvm".into(),
            tun: "/dev/net/tun".into(),
            loop_control: "/dev/loop-control".into(),
            mapper_control: "/dev/mapper/control".into(),
            journal_socket: "/run/systemd/journal/socket".into(),
            systemd_runtime: "/run/systemd/system".into(),
            ip_forward: "/proc/sys/net/ipv4/ip_forward".into(),
        }
    }
}

/// Bus names the checks ask about.
pub const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";
/// systemd-resolved's bus name.
pub const RESOLVED_NAME: &str = "org.freedesktop.resolve1";

/// Run every check. Bus questions first (async), the rest on a blocking thread.
pub async fn run(
    config: &Config,
    state_dir: &Path,
    store: &std::sync::Arc<Store>,
    bus: &dyn BusProbe,
    host: &HostPaths,
    dns_served: Option<std::net::SocketAddr>,
    resolved_link: &crate::net::resolved::Registration,
) -> Vec<Check> {
    let polkit = bus.name_state(POLKIT_NAME).await;
    let resolved = bus.name_state(RESOLVED_NAME).await;
    let network = check_network(config).await;
    let config = config.clone();
    let state_dir = state_dir.to_owned();
    let store = store.clone();
    let host = host.clone();
    let resolved_link = resolved_link.clone();
    tokio::task::spawn_blocking(move || {
        vec![
            check_store(&store),
            check_disk_space(&state_dir, config.daemon.min_free_disk_gib),
            check_kvm(&host.kvm),
            check_vmm(&config),
            check_guest_agent(&config.vm.agent_bin),
            check_char_device(
                "tun",
                &host.tun,
                "TAP devices for VM networking",
                "modprobe tun",
            ),
            check_char_device(
                "loop",
                &host.loop_control,
                "loop devices for disk images",
                "modprobe loop",
            ),
            check_nftables(),
            check_polkit(polkit),
            check_journald(&host.journal_socket),
            check_systemd(&host.systemd_runtime),
            check_resolved(resolved, &resolved_link),
            check_dns_port(config.network.dns_listen, dns_served),
            check_ip_forward(&host.ip_forward),
        ]
        .into_iter()
        .chain(network)
        .collect()
    })
    .await
    .unwrap_or_else(|e| {
        vec![Check::fail(
            "doctor",
            format!("the checks crashed: {e}"),
            "report this as a bug",
        )]
    })
}

/// `bridge` and `subnet`: read-only netlink questions about this host.
async fn check_network(config: &Config) -> Vec<Check> {
    let bridge = config.network.bridge.clone();
    let subnet = match config.network.subnet() {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "subnet",
                e.message,
                "fix network.subnet in bangerd.toml",
            )];
        }
    };
    let links = match crate::net::link::Links::connect() {
        Ok(l) => l,
        Err(e) => {
            let hint = "bangerd needs netlink (CAP_NET_ADMIN) for VM networking";
            return vec![
                Check::fail("bridge", e.message.clone(), hint),
                Check::fail("subnet", e.message, hint),
            ];
        }
    };
    let index = links.index_of(&bridge).await;
    let bridge_check = match &index {
        Ok(Some(i)) => Check::pass(
            "bridge",
            format!(
                "{bridge} exists (ifindex {i}), gateway {}",
                subnet.gateway()
            ),
        ),
        Ok(None) => Check::pass(
            "bridge",
            format!("{bridge} does not exist yet; bangerd creates it for the first VM"),
        ),
        Err(e) => Check::warn("bridge", e.message.clone(), "check netlink access"),
    };
    let subnet_check = match links.route_clash(&subnet, index.ok().flatten()).await {
        Ok(None) => Check::pass("subnet", format!("{subnet}: no host route overlaps it")),
        Ok(Some(route)) => Check::fail(
            "subnet",
            format!("{subnet} overlaps the host route {route}"),
            "set network.subnet in bangerd.toml to a network no route uses",
        ),
        Err(e) => Check::warn("subnet", e.message, "check netlink access"),
    };
    vec![bridge_check, subnet_check]
}

fn check_ip_forward(path: &Path) -> Check {
    const NAME: &str = "ip-forward";
    match std::fs::read_to_string(path).map(|s| s.trim().to_owned()) {
        Ok(v) if v == "1" => Check::pass(NAME, "IPv4 forwarding is on"),
        Ok(_) => Check::pass(
            NAME,
            "IPv4 forwarding is off; bangerd switches it on when a VM gets NAT",
        ),
        Err(e) => Check::warn(
            NAME,
            format!("cannot read {}: {e}", path.display()),
            "VM NAT needs net.ipv4.ip_forward",
        ),
    }
}

fn check_store(store: &Store) -> Check {
    match (store.schema_version(), store.quick_check()) {
        (Ok(v), Ok(None)) => Check::pass("store", format!("schema version {v}, integrity ok")),
        (_, Ok(Some(problem))) => Check::fail(
            "store",
            format!("integrity check found: {problem}"),
            "stop bangerd and restore the store from a backup",
        ),
        (Err(e), _) | (_, Err(e)) => {
            Check::fail("store", e.to_string(), "check the state directory")
        }
    }
}

fn check_disk_space(dir: &Path, min_free_gib: u64) -> Check {
    const GIB: u64 = 1 << 30;
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            let detail = format!(
                "{:.1} GiB free in {}",
                free as f64 / GIB as f64,
                dir.display()
            );
            if free < GIB {
                Check::fail(
                    "disk-space",
                    detail,
                    "free space on the state filesystem; VM disks need room",
                )
            } else if free < min_free_gib * GIB {
                Check::warn(
                    "disk-space",
                    detail,
                    format!("less than {min_free_gib} GiB free; creating VMs may run out of space"),
                )
            } else {
                Check::pass("disk-space", detail)
            }
        }
        Err(e) => Check::fail(
            "disk-space",
            format!("statvfs {}: {e}", dir.display()),
            "check the state directory",
        ),
    }
}

mod ioctls {
    // KVM_GET_API_VERSION and KVM_CREATE_VM from <linux/kvm.h>.
    nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);
    nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));
}

fn check_kvm(path: &Path) -> Check {
    const NAME: &str = "kvm";
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("cannot open {}: {e}", path.display()),
                "VMs will run under QEMU's software emulation (slow); enable virtualization or load kvm_intel/kvm_amd",
            );
        }
    };
    // SAFETY: the fd is an open /dev/kvm; KVM_GET_API_VERSION takes no argument.
    let version = unsafe { ioctls::kvm_get_api_version(file.as_raw_fd()) };
    match version {
        Ok(12) => {}
        other => {
            return Check::warn(
                NAME,
                format!(
                    "{} answers KVM_GET_API_VERSION with {other:?}, expected 12",
                    path.display()
                ),
                "VMs will run under software emulation",
            );
        }
    }
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default) and
    // returns a new fd that we own and close below.
    let vm = unsafe { ioctls::kvm_create_vm(file.as_raw_fd(), 0) };
    match vm {
        Ok(fd) => {
            // SAFETY: `fd` was just returned by KVM_CREATE_VM and nobody else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Check::pass(
                NAME,
                "/dev/kvm opens and creates VMs (whether a guest boots under it: see accel)",
            )
        }
        Err(e) => Check::warn(
            NAME,
            format!("KVM_CREATE_VM failed: {e}"),
            "KVM is not usable here; VMs will run under software emulation",
        ),
    }
}

/// First line of `bin --version`, with a timeout.
fn program_version(bin: &Path) -> Option<String> {
    let mut child = Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let output = child.wait_with_output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

fn check_vmm(config: &Config) -> Check {
    const NAME: &str = "vmm";
    // Whether a VM could start is the lifecycle's own decision, with its
    // own message: doctor and create cannot disagree.
    if let Err(e) = crate::vm::commands::check_vmm(config) {
        return Check::fail(
            NAME,
            e.message,
            "install qemu-system-x86 (or firecracker), or point vm.qemu_bin / vm.firecracker_bin at an executable",
        );
    }
    let firecracker = crate::os::program::find(&config.vm.firecracker_bin);
    let qemu = crate::os::program::find(&config.vm.qemu_bin);
    let describe = |bin: &Path| {
        let version = program_version(bin).unwrap_or_else(|| "version unknown".into());
        format!("{} ({version})", bin.display())
    };
    match (config.vm.vmm, firecracker, qemu) {
        (VmmKind::Firecracker, Some(fc), _) => {
            Check::pass(NAME, format!("firecracker: {}", describe(&fc)))
        }
        (VmmKind::Auto, Some(fc), qemu) => Check::pass(
            NAME,
            format!(
                "firecracker where KVM works (see accel): {}; else qemu microvm: {}",
                describe(&fc),
                qemu.as_deref()
                    .map_or_else(|| "not installed".to_owned(), describe)
            ),
        ),
        (VmmKind::Firecracker, None, _) => Check::fail(
            NAME,
            format!(
                "vm.vmm is \"firecracker\" but {} was not found",
                config.vm.firecracker_bin.display()
            ),
            "install firecracker or set vm.firecracker_bin, or set vm.vmm = \"auto\"",
        ),
        (VmmKind::Auto, None, Some(q)) => Check::warn(
            NAME,
            format!(
                "firecracker not found; using qemu microvm: {}",
                describe(&q)
            ),
            "install firecracker for faster VMs where KVM works",
        ),
        (VmmKind::Qemu, _, Some(q)) => Check::pass(NAME, format!("qemu microvm: {}", describe(&q))),
        (_, _, None) => Check::fail(
            NAME,
            "neither firecracker nor qemu-system-x86_64 was found".to_owned(),
            "install firecracker, or qemu-system-x86 (apt install qemu-system-x86)",
        ),
    }
}

fn check_char_device(name: &'static str, path: &Path, what: &str, fix: &str) -> Check {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Check::pass(
            name,
            format!("{} opens read-write ({what})", path.display()),
        ),
        Err(e) => Check::fail(
            name,
            format!("cannot open {}: {e}", path.display()),
            format!("banger needs {what}; as root: {fix}"),
        ),
    }
}

/// `accel`: what VMs will run under, from the configuration and the KVM
/// probe's verdict on the default image's kernel (`None`: no such kernel).
pub fn check_accel(
    accel: crate::config::Accel,
    probe: Option<(&Path, &crate::vm::vmm::kvm::KvmVerdict)>,
    default_image: &str,
) -> Check {
    use crate::config::Accel;
    use crate::vm::vmm::kvm::KvmVerdict;
    const NAME: &str = "accel";
    let Some((kernel, verdict)) = probe else {
        return match accel {
            Accel::Tcg => Check::pass(NAME, "vm.accel = \"tcg\": VMs run under software emulation"),
            _ => Check::warn(
                NAME,
                format!(
                    "KVM not probed: the default image {default_image:?} or its kernel is not registered"
                ),
                "register or pull the default image (or set vm.default_image); the probe boots its kernel",
            ),
        };
    };
    match (accel, verdict) {
        (Accel::Tcg, _) => {
            Check::pass(NAME, "vm.accel = \"tcg\": VMs run under software emulation")
        }
        (_, KvmVerdict::Usable(t)) => Check::pass(
            NAME,
            format!(
                "{} booted under KVM in {} ms: VMs use KVM",
                kernel.display(),
                t.as_millis()
            ),
        ),
        (Accel::Auto, KvmVerdict::Unusable(why)) => Check::warn(
            NAME,
            format!("{why}: VMs run under software emulation (slow)"),
            "on a nested or PVM host KVM needs a guest kernel made for it; set vm.accel = \"tcg\" to skip the probe",
        ),
        (_, KvmVerdict::NotProbed(why)) => Check::warn(
            NAME,
            format!("KVM not probed: {why}"),
            "install qemu-system-x86: the probe boots the guest kernel under it",
        ),
        (Accel::Kvm, KvmVerdict::Unusable(why)) => Check::fail(
            NAME,
            format!("vm.accel = \"kvm\" but {why}"),
            "VMs would hang at boot: set vm.accel = \"auto\" or \"tcg\" in bangerd.toml",
        ),
    }
}

/// The `accel` check with create's own choice of VMM and accelerator
/// (`vm::commands::choose_vmm`) folded in: its refusal (e.g. Firecracker
/// with `vm.accel = "tcg"`) fails the check with create's message, its
/// pick is named. `None`: no choice to report (no probe to decide with).
pub fn with_choice(
    check: Check,
    choice: Option<crate::error::Result<(&str, crate::vm::vmm::Accel)>>,
) -> Check {
    match choice {
        None => check,
        Some(Err(e)) => Check::fail(
            check.name,
            e.message,
            "set vm.vmm and vm.accel in bangerd.toml to a pair this host can run",
        ),
        Some(Ok(_)) if check.verdict == Verdict::Fail => check,
        Some(Ok((vmm, accel))) => Check {
            detail: format!(
                "{}; new VMs boot with {vmm} under {}",
                check.detail,
                accel.as_str()
            ),
            ..check
        },
    }
}

/// `default-image`: whether `vm create` without `--image` has an image.
pub fn check_default_image(name: &str, found: Option<(&str, &str)>) -> Check {
    const NAME: &str = "default-image";
    match found {
        Some((id, kernel)) => Check::pass(
            NAME,
            format!("{name} (id {id}, kernel {kernel}) for `vm create` without --image"),
        ),
        None => Check::warn(
            NAME,
            format!("vm.default_image is {name:?}, and there is no such image"),
            "register one (scripts/build-tiny-image or build-debian-image), or set vm.default_image in bangerd.toml",
        ),
    }
}

/// The static agent registry images get (`image pull REGISTRY/REPO`).
fn check_guest_agent(path: &Path) -> Check {
    const NAME: &str = "guest-agent";
    match crate::artifacts::oci::boot::check_agent(path) {
        Ok(()) => Check::pass(
            NAME,
            format!(
                "{} is a static x86-64 executable; images pulled from registries get it",
                path.display()
            ),
        ),
        Err(e) => Check::warn(
            NAME,
            e.message,
            "pulls from OCI registries are refused until vm.agent_bin names a static banger-agent; catalog images and imported ones are unaffected",
        ),
    }
}

/// How system disks are made here, as two checks ("device-mapper" and
/// "reflink") over the lifecycle's own decision: `dm_available` is the
/// `DeviceMapper::available` create asks, and the reflink probe is
/// `vm::disk`'s, so doctor says what create will do.
pub fn check_disks(dm_available: bool, control: &Path, state_dir: &Path) -> [Check; 2] {
    use crate::vm::disk::{self, DiskMethod};
    let dm = if dm_available {
        Check::pass(
            "device-mapper",
            format!(
                "{} works: system disks are dm snapshots over loop devices (instant, the image shared)",
                control.display()
            ),
        )
    } else {
        Check::pass(
            "device-mapper",
            format!(
                "{} does not work here; not needed: system disks are reflink clones or sparse copies (see reflink)",
                control.display()
            ),
        )
    };
    const NAME: &str = "reflink";
    let reflink = match disk::reflink_works(state_dir) {
        Err(e) => Check::fail(
            NAME,
            format!("cannot write a probe file in {}: {e}", state_dir.display()),
            "check the state directory",
        ),
        Ok(_) if disk::planned_method(dm_available, state_dir) == DiskMethod::DeviceMapper => {
            Check::pass(
                NAME,
                "not needed: system disks are dm snapshots (see device-mapper)",
            )
        }
        Ok(true) => Check::pass(
            NAME,
            format!(
                "{} supports reflink (FICLONE): system disks are instant clones",
                state_dir.display()
            ),
        ),
        Ok(false) => Check::warn(
            NAME,
            format!(
                "{} has no reflink: system disks are sparse copies (time grows with the image's data)",
                state_dir.display()
            ),
            "put the state directory on btrfs or xfs for instant copy-on-write clones",
        ),
    };
    [dm, reflink]
}

fn check_nftables() -> Check {
    const NAME: &str = "nftables";
    match crate::os::program::find(Path::new("nft")) {
        Some(nft) => Check::pass(
            NAME,
            program_version(&nft).unwrap_or_else(|| format!("{} (version unknown)", nft.display())),
        ),
        None => Check::fail(
            NAME,
            "nft not found",
            "install nftables (apt install nftables) for NAT",
        ),
    }
}

fn check_polkit(state: NameState) -> Check {
    const NAME: &str = "polkit";
    match state {
        NameState::Owned => Check::pass(NAME, "polkit authority is running on the system bus"),
        NameState::Activatable => {
            Check::pass(NAME, "polkit authority is activatable on the system bus")
        }
        NameState::Absent => Check::fail(
            NAME,
            "polkit is not on the system bus: only root can create or change anything",
            "install and start polkitd (apt install polkitd)",
        ),
        NameState::Unknown => Check::warn(
            NAME,
            "could not ask the bus about polkit",
            "check the system bus",
        ),
    }
}

fn check_journald(socket: &Path) -> Check {
    if socket.exists() {
        Check::pass(
            "journald",
            format!("logging to the journal ({})", socket.display()),
        )
    } else {
        Check::warn(
            "journald",
            "no journal socket: bangerd logs to stderr",
            "run bangerd under systemd to get structured logs in the journal",
        )
    }
}

fn check_systemd(runtime: &Path) -> Check {
    if runtime.is_dir() {
        Check::pass("systemd", "systemd is PID 1")
    } else {
        Check::warn(
            "systemd",
            "PID 1 is not systemd: VMs will be supervised by bangerd directly",
            "on a systemd host VMs run in their own units and outlive daemon restarts",
        )
    }
}

/// `resolved`: whether `<name>.vm` resolves on the host through
/// systemd-resolved (see `net::resolved`).
pub fn check_resolved(state: NameState, link: &crate::net::resolved::Registration) -> Check {
    use crate::net::resolved::Registration;
    const NAME: &str = "resolved";
    if !state.reachable() {
        return Check::warn(
            NAME,
            "systemd-resolved is not on the system bus: the host will not resolve <name>.vm by itself",
            "use systemd-resolved, or point your resolver at banger's DNS for the vm. domain",
        );
    }
    match link {
        Registration::Active { bridge, server } => Check::pass(
            NAME,
            format!(
                "systemd-resolved routes ~vm to {server} on {bridge}: <name>.vm resolves on the host"
            ),
        ),
        Registration::Pending | Registration::Absent => Check::pass(
            NAME,
            "systemd-resolved is on the system bus; ~vm is registered with it when the bridge comes up (first VM start)",
        ),
        Registration::Failed(why) => Check::warn(
            NAME,
            format!("systemd-resolved is running but did not take ~vm: {why}"),
            "see journalctl -u systemd-resolved; resolvectl domain/dns on the bridge do the same by hand",
        ),
    }
}

fn check_dns_port(addr: std::net::SocketAddr, served: Option<std::net::SocketAddr>) -> Check {
    const NAME: &str = "dns-port";
    if let Some(ours) = served
        && (ours == addr || (addr.port() == 0 && ours.ip() == addr.ip()))
    {
        return Check::pass(
            NAME,
            format!("bangerd serves the .vm zone on {ours} (udp and tcp)"),
        );
    }
    let udp = std::net::UdpSocket::bind(addr);
    let tcp = std::net::TcpListener::bind(addr);
    match (udp, tcp) {
        (Ok(_), Ok(_)) => Check::pass(NAME, format!("{addr} is free for the .vm DNS server")),
        (Err(e), _) | (_, Err(e)) => Check::fail(
            NAME,
            format!("cannot bind {addr}: {e}"),
            "another program uses the port; stop it or set network.dns_listen in bangerd.toml",
        ),
    }
}

/// The caller's usage against the per-user `[limits]`: `None` when the
/// caller is exempt (root, or `vm.manage-others` with
/// `limits.exempt_admins`). Warns at a cap, since the next create or start
/// of that kind will be refused.
pub fn check_limits(
    limits: &crate::config::LimitsConfig,
    usage: Option<&crate::vm::quota::Usage>,
) -> Check {
    let Some(u) = usage else {
        return Check::pass("limits", "you are exempt from the per-user limits");
    };
    const GIB: f64 = (1u64 << 30) as f64;
    let detail = format!(
        "you have {} of {} VMs, {} of {} running, {} of {} vCPUs and {} of {} MiB running, {:.1} of {} GiB of disk",
        u.vms,
        limits.max_vms,
        u.running,
        limits.max_running_vms,
        u.vcpus,
        limits.max_vcpus,
        u.memory_mib,
        limits.max_memory_mib,
        u.disk_bytes as f64 / GIB,
        limits.max_disk_gib
    );
    // A cap of 0 is none.
    let at = |value: u64, cap: u64| cap != 0 && value >= cap;
    let full: Vec<&str> = [
        (at(u.vms.into(), limits.max_vms.into()), "limits.max_vms"),
        (
            at(u.running.into(), limits.max_running_vms.into()),
            "limits.max_running_vms",
        ),
        (
            at(u.vcpus.into(), limits.max_vcpus.into()),
            "limits.max_vcpus",
        ),
        (
            at(u.memory_mib, limits.max_memory_mib),
            "limits.max_memory_mib",
        ),
        (
            at(u.disk_bytes, limits.max_disk_gib.saturating_mul(1 << 30)),
            "limits.max_disk_gib",
        ),
    ]
    .into_iter()
    .filter_map(|(at, name)| at.then_some(name))
    .collect();
    if full.is_empty() {
        Check::pass("limits", detail)
    } else {
        Check::warn(
            "limits",
            format!("{detail}; at {}", full.join(", ")),
            "stop or delete VMs (or images) you no longer need, or ask an admin to raise [limits] in bangerd.toml",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_devices_fail_with_a_hint() {
        let check = check_char_device(
            "tun",
            Path::new("/nonexistent/tun"),
            "TAP devices",
            "modprobe tun",
        );
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.hint.contains("modprobe tun"));
        // Without device-mapper, disks are clones or copies; said so.
        let dir = tempfile::tempdir().expect("tempdir");
        let [dm, reflink] = check_disks(false, Path::new("/nonexistent/control"), dir.path());
        assert_eq!(dm.verdict, Verdict::Pass);
        assert!(dm.detail.contains("not needed"), "{dm:?}");
        let planned = crate::vm::disk::planned_method(false, dir.path());
        assert_eq!(
            reflink.verdict == Verdict::Pass,
            planned == crate::vm::disk::DiskMethod::Reflink,
            "{reflink:?} vs {planned:?}"
        );
        let [dm, reflink] = check_disks(true, Path::new("/dev/mapper/control"), dir.path());
        assert!(dm.detail.contains("dm snapshots"), "{dm:?}");
        assert!(reflink.detail.contains("not needed"), "{reflink:?}");
        let kvm = check_kvm(Path::new("/nonexistent/kvm"));
        assert_eq!(kvm.verdict, Verdict::Warn);
    }

    #[test]
    fn a_regular_file_is_not_kvm() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let check = check_kvm(file.path());
        assert_eq!(check.verdict, Verdict::Warn);
        assert!(
            check.detail.contains("KVM_GET_API_VERSION"),
            "{}",
            check.detail
        );
    }

    #[test]
    fn busy_port_fails() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        assert_eq!(check_dns_port(addr, None).verdict, Verdict::Fail);
        drop(held);
    }

    #[test]
    fn the_accelerator_follows_the_probe_and_the_configuration() {
        use crate::config::Accel;
        use crate::vm::vmm::kvm::KvmVerdict;
        let k = Path::new("/k/vmlinuz");
        let ok = KvmVerdict::Usable(std::time::Duration::from_millis(420));
        let stalled = KvmVerdict::Unusable("a guest kernel did not get through early boot".into());
        let c = check_accel(Accel::Auto, Some((k, &ok)), "tiny");
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(
            c.detail.contains("420 ms") && c.detail.contains("use KVM"),
            "{c:?}"
        );
        let c = check_accel(Accel::Auto, Some((k, &stalled)), "tiny");
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("early boot") && c.detail.contains("software emulation"));
        let c = check_accel(Accel::Kvm, Some((k, &stalled)), "tiny");
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.hint.contains("vm.accel"), "{c:?}");
        assert_eq!(check_accel(Accel::Tcg, None, "tiny").verdict, Verdict::Pass);
        let c = check_accel(Accel::Auto, None, "tiny");
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("\"tiny\""), "{c:?}");
    }

    #[test]
    fn the_default_image_is_named_or_missed() {
        let c = check_default_image("tiny", Some(("abc123", "test-kernel")));
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("test-kernel"));
        let c = check_default_image("debian-bookworm", None);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.hint.contains("vm.default_image"));
    }

    #[test]
    fn a_missing_or_dynamic_guest_agent_is_a_warning() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = check_guest_agent(&dir.path().join("banger-agent"));
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("cannot be opened"), "{}", c.detail);
        assert!(c.hint.contains("vm.agent_bin"), "{}", c.hint);
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        assert_eq!(check_guest_agent(&script).verdict, Verdict::Warn);
    }

    #[test]
    fn resolved_says_whether_vm_names_resolve_on_the_host() {
        use crate::net::resolved::Registration;
        let up = NameState::Owned;
        let c = check_resolved(
            up,
            &Registration::Active {
                bridge: "banger0".into(),
                server: std::net::Ipv4Addr::new(10, 213, 42, 1),
            },
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.detail.contains("10.213.42.1 on banger0"), "{c:?}");
        let c = check_resolved(up, &Registration::Failed("access denied".into()));
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.detail.contains("access denied"));
        assert!(
            check_resolved(up, &Registration::Pending)
                .detail
                .contains("first VM")
        );
        assert_eq!(
            check_resolved(NameState::Absent, &Registration::Pending).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn missing_vmm_fails_and_named_one_is_found() {
        let mut config = Config::default();
        config.vm.firecracker_bin = "/nonexistent/firecracker".into();
        config.vm.qemu_bin = "/nonexistent/qemu".into();
        assert_eq!(check_vmm(&config).verdict, Verdict::Fail);
        config.vm.vmm = VmmKind::Firecracker;
        assert!(check_vmm(&config).detail.contains("was not found"));
        // `sh` exists everywhere; stand it in for qemu to exercise the found path.
        config.vm.vmm = VmmKind::Qemu;
        config.vm.qemu_bin = "sh".into();
        assert_eq!(check_vmm(&config).verdict, Verdict::Pass);
    }

    #[test]
    fn reflink_probe_runs_on_a_real_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [_, check] = check_disks(false, Path::new("/dev/mapper/control"), dir.path());
        assert_ne!(check.verdict, Verdict::Fail, "{check:?}");
        let [_, missing] = check_disks(
            false,
            Path::new("/dev/mapper/control"),
            Path::new("/nonexistent/dir"),
        );
        assert_eq!(missing.verdict, Verdict::Fail);
    }

    #[test]
    fn ip_forward_is_read_truthfully() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("ip_forward");
        std::fs::write(&f, "1\n").expect("write");
        assert!(check_ip_forward(&f).detail.contains("is on"));
        std::fs::write(&f, "0\n").expect("write");
        assert!(check_ip_forward(&f).detail.contains("switches it on"));
        assert_eq!(
            check_ip_forward(&dir.path().join("nope")).verdict,
            Verdict::Warn
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn network_checks_see_a_clash_in_a_private_namespace() {
        // A thread in its own network namespace, with a route that
        // overlaps the default subnet.
        let checks = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let ns = format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                nix::unistd::gettid()
            );
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("nsenter")
                    .arg(format!("--net={ns}"))
                    .arg("ip")
                    .args(args)
                    .status()
                    .expect("ip");
                assert!(st.success(), "ip {args:?}");
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let before = rt.block_on(check_network(&Config::default()));
            ip(&["link", "add", "clash0", "type", "bridge"]);
            ip(&["addr", "add", "10.213.0.1/16", "dev", "clash0"]);
            ip(&["link", "set", "clash0", "up"]);
            let after = rt.block_on(check_network(&Config::default()));
            (before, after)
        })
        .join()
        .expect("thread");
        let (before, after) = checks;
        assert_eq!(before.len(), 2);
        assert!(
            before.iter().all(|c| c.verdict == Verdict::Pass),
            "{before:?}"
        );
        assert!(
            before[0].detail.contains("does not exist yet"),
            "{:?}",
            before[0]
        );
        assert_eq!(after[1].verdict, Verdict::Fail, "{:?}", after[1]);
        assert!(
            after[1].detail.contains("10.213.0.0/16 via clash0"),
            "{:?}",
            after[1]
        );
    }

    #[test]
    fn absent_polkit_is_a_failure() {
        assert_eq!(check_polkit(NameState::Absent).verdict, Verdict::Fail);
        assert_eq!(check_polkit(NameState::Activatable).verdict, Verdict::Pass);
    }

    #[test]
    fn limits_pass_below_the_caps_and_warn_at_one() {
        use crate::vm::quota::Usage;
        let limits = crate::config::LimitsConfig::default();
        assert_eq!(check_limits(&limits, None).verdict, Verdict::Pass);
        let some = Usage {
            vms: 3,
            running: 1,
            vcpus: 2,
            memory_mib: 1024,
            disk_bytes: 24 << 30,
        };
        let c = check_limits(&limits, Some(&some));
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        assert!(c.detail.contains("3 of 50 VMs") && c.detail.contains("24.0 of 500 GiB"));
        let full = Usage {
            running: limits.max_running_vms,
            ..some
        };
        let c = check_limits(&limits, Some(&full));
        assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
        assert!(c.detail.ends_with("at limits.max_running_vms"), "{c:?}");
    }

    /// doctor and create share one decision: a `qemu_bin` that is no
    /// executable fails doctor's check with the very message create
    /// refuses with (create once took it and failed at spawn).
    #[test]
    fn doctor_and_create_agree_on_the_vmm() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = dir.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut config = Config::default();
        config.vm.firecracker_bin = dir.path().join("firecracker");
        config.vm.qemu_bin = qemu.clone();
        for vmm in [VmmKind::Auto, VmmKind::Qemu, VmmKind::Firecracker] {
            config.vm.vmm = vmm;
            let refused = crate::vm::commands::check_vmm(&config).expect_err("refused");
            let check = check_vmm(&config);
            assert_eq!(check.verdict, Verdict::Fail, "{vmm:?}");
            assert_eq!(check.detail, refused.message, "{vmm:?}");
        }
        config.vm.vmm = VmmKind::Qemu;
        assert!(
            check_vmm(&config)
                .detail
                .contains("is not an executable file"),
            "{:?}",
            check_vmm(&config)
        );
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        crate::vm::commands::check_vmm(&config).expect("executable now");
        assert_ne!(check_vmm(&config).verdict, Verdict::Fail);
    }

    /// doctor reports create's own VMM choice: a pair create refuses
    /// (Firecracker under `tcg`) fails the check with create's words, and
    /// what create picks is named.
    #[test]
    fn the_accel_check_carries_creates_choice() {
        use crate::config::Accel;
        use crate::vm::commands::choose_vmm;
        use crate::vm::vmm::kvm::KvmVerdict;
        let mut config = Config::default();
        config.vm.vmm = VmmKind::Firecracker;
        config.vm.accel = Accel::Tcg;
        let refused = choose_vmm(&config, || KvmVerdict::NotProbed(String::new()))
            .map(|(v, a)| (v.name(), a))
            .expect_err("firecracker under tcg");
        let plain = check_accel(Accel::Tcg, None, "tiny");
        assert_eq!(plain.verdict, Verdict::Pass, "alone it saw no problem");
        let c = with_choice(plain.clone(), Some(Err(refused.clone())));
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(c.detail, refused.message);
        let c = with_choice(
            plain.clone(),
            Some(Ok(("qemu", crate::vm::vmm::Accel::Tcg))),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(
            c.detail.ends_with("new VMs boot with qemu under tcg"),
            "{c:?}"
        );
        assert_eq!(with_choice(plain.clone(), None), plain);
    }
}
