//! `bangerd.toml`: the daemon's configuration.
//!
//! Every key has a default, so an absent file is a valid configuration.
//! Unknown keys and wrong types are errors that name the key and the file.
//! `docs/configuration.md` documents every key; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name looked up in the configuration directory.
pub const FILE_NAME: &str = crate::paths::CONFIG_FILE_NAME;

/// The configuration in force, shared by the core and its services: a
/// reload swaps it for all of them at once.
#[derive(Debug, Clone, Default)]
pub struct SharedConfig(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl SharedConfig {
    /// Shares `config`.
    pub fn new(config: Config) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(config),
        )))
    }

    /// The configuration in force now.
    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Put `config` in force.
    pub fn set(&self, config: std::sync::Arc<Config>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[daemon]`
    pub daemon: DaemonConfig,
    /// `[network]`
    pub network: NetworkConfig,
    /// `[vm]`
    pub vm: VmConfig,
    /// `[update]`
    pub update: UpdateConfig,
    /// `[limits]`
    pub limits: LimitsConfig,
    /// `[images]`
    pub images: ImagesConfig,
    /// `[debug]`
    pub debug: DebugConfig,
}

/// `[daemon]`: the service itself.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `bangerd=debug`.
    pub log_level: String,
    /// How long finished jobs stay visible on the bus, in seconds.
    pub job_retention_secs: u64,
    /// Days of finished-job history kept in the store by maintenance.
    pub job_history_days: u32,
    /// Free space on the state filesystem below which `doctor` warns, in GiB.
    pub min_free_disk_gib: u64,
    /// Under systemd, exit after this many seconds without jobs, bus calls
    /// or running VMs (D-Bus and socket activation bring it back); 0 never.
    pub idle_exit_secs: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            job_retention_secs: 10,
            job_history_days: 30,
            min_free_disk_gib: 10,
            idle_exit_secs: 120,
        }
    }
}

/// `[network]`: host networking for VMs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Address of the `.vm` DNS server on the host.
    pub dns_listen: SocketAddr,
    /// Name of the bridge VMs' TAPs join.
    pub bridge: String,
    /// The VMs' IPv4 subnet; its first host address is the bridge's.
    pub subnet: String,
    /// Idle TAP devices kept ready so a create does not wait for one.
    pub tap_pool_size: u32,
    /// Whether guests may reach each other (off: each guest sees only the
    /// gateway).
    pub guest_to_guest: bool,
    /// Ports on the gateway (TCP and UDP) guests may reach besides DNS.
    pub host_ports: Vec<u16>,
    /// Networks (CIDR) VMs with NAT may reach although the host is
    /// attached to them or they are link-local (169.254.0.0/16).
    pub nat_allow: Vec<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            dns_listen: SocketAddr::from(([127, 0, 0, 1], 42069)),
            bridge: "banger0".into(),
            subnet: "10.213.42.0/24".into(),
            tap_pool_size: 2,
            guest_to_guest: false,
            host_ports: Vec::new(),
            nat_allow: Vec::new(),
        }
    }
}

impl NetworkConfig {
    /// The subnet, parsed (validated when the configuration is loaded).
    pub fn subnet(&self) -> Result<crate::net::leases::Subnet, crate::error::Error> {
        crate::net::leases::Subnet::parse(&self.subnet)
    }

    /// `nat_allow`, parsed (validated when the configuration is loaded).
    pub fn nat_allow(&self) -> Result<Vec<ipnet::Ipv4Net>, String> {
        self.nat_allow
            .iter()
            .map(|n| {
                n.parse::<ipnet::Ipv4Net>()
                    .map(|n| n.trunc())
                    .map_err(|_| format!("`{n}` is not an IPv4 network such as 192.168.1.0/24"))
            })
            .collect()
    }
}

/// Which VMM to use.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// Firecracker when found, else QEMU.
    #[default]
    Auto,
    /// Firecracker only.
    Firecracker,
    /// QEMU `microvm` only.
    Qemu,
}

/// `[vm]`: virtual machine monitors.
/// The longest `vm.suspend_idle_secs`: 30 days.
pub const MAX_SUSPEND_IDLE_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `auto`, `firecracker` or `qemu`.
    pub vmm: VmmKind,
    /// Firecracker binary; a bare name is looked up on `PATH`.
    pub firecracker_bin: PathBuf,
    /// Firecracker's jailer, used when found (a bare name is looked up
    /// on `PATH`); empty: Firecracker runs without it.
    pub jailer_bin: PathBuf,
    /// QEMU binary; a bare name is looked up on `PATH`.
    pub qemu_bin: PathBuf,
    /// virtiofsd, which serves a VM's host folders (`--mount`) to QEMU;
    /// a bare name is looked up on `PATH`.
    pub virtiofsd_bin: PathBuf,
    /// QEMU accelerator: `kvm`, `tcg`, or `auto` (see docs/configuration.md).
    pub accel: Accel,
    /// Image used when a create names none.
    pub default_image: String,
    /// Default vCPUs of a new VM.
    pub vcpus: u32,
    /// Default memory of a new VM, in MiB.
    pub memory_mib: u32,
    /// Default work disk size of a new VM, in MiB.
    pub disk_mib: u64,
    /// How long a start waits for the guest agent and services, in seconds.
    pub boot_timeout_secs: u64,
    /// How long a stop waits for a clean shutdown before forcing, in seconds.
    pub stop_timeout_secs: u64,
    /// Who runs VMMs: `auto` (systemd units where systemd is PID 1),
    /// `systemd` or `process` (bangerd's own children).
    pub supervisor: SupervisorKind,
    /// The static banger-agent put into images pulled from registries.
    pub agent_bin: PathBuf,
    /// The most streams through a VM's agent (exec, cp, forwarded
    /// connections) open at once.
    pub max_streams: u32,
    /// Boot a template of each image and machine shape once, in the
    /// background after its first create, and create later VMs of it by
    /// restoring that template instead of booting.
    pub templates: bool,
    /// Suspend a running VM after this many seconds without a packet
    /// through its TAP or a stream through its agent; 0: never.
    pub suspend_idle_secs: u64,
}

/// Who runs VMM processes.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorKind {
    /// systemd where it is PID 1, else bangerd's own children.
    #[default]
    Auto,
    /// Transient systemd units (fails where systemd is not PID 1).
    Systemd,
    /// Children of bangerd in their own sessions.
    Process,
}

/// QEMU accelerator choice.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it really works here, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vmm: VmmKind::Auto,
            firecracker_bin: "firecracker".into(),
            jailer_bin: "jailer".into(),
            qemu_bin: "qemu-system-x86_64".into(),
            virtiofsd_bin: "/usr/lib/qemu/virtiofsd".into(),
            accel: Accel::Auto,
            default_image: "debian-bookworm".into(),
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 8192,
            boot_timeout_secs: 180,
            stop_timeout_secs: 30,
            supervisor: SupervisorKind::Auto,
            agent_bin: "/usr/libexec/banger/banger-agent".into(),
            max_streams: 256,
            templates: true,
            suspend_idle_secs: 0,
        }
    }
}

/// `[update]`: where `banger update` looks for releases.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// Base URL of the release channel (`manifest.json` and its
    /// `.minisig` live there). HTTPS, or HTTP to a loopback address only.
    pub channel: String,
    /// minisign public keys trusted besides the one built in (base64 key
    /// lines). Honoured only while this file is owned by root and writable
    /// by no one else.
    pub extra_keys: Vec<String>,
    /// Give up on a download that sends nothing for this many seconds.
    pub stall_timeout_secs: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            channel: "https://releases.banger.dev/stable/".into(),
            extra_keys: Vec::new(),
            stall_timeout_secs: 30,
        }
    }
}

/// `[limits]`: per-user quotas and size caps. A quota of 0 means none.
/// Root is never limited; holders of `org.banger.vm.manage-others` are
/// not either while `exempt_admins` is true.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// VMs one uid may have (running or not).
    pub max_vms: u32,
    /// VMs one uid may have running at once.
    pub max_running_vms: u32,
    /// vCPUs of one VM.
    pub max_vcpus_per_vm: u32,
    /// vCPUs of one uid's running VMs together.
    pub max_vcpus: u32,
    /// Memory of one uid's running VMs together, in MiB.
    pub max_memory_mib: u64,
    /// Disk one uid may hold, in GiB: the work disks of its VMs and the
    /// images and kernels it owns.
    pub max_disk_gib: u64,
    /// Whether `org.banger.vm.manage-others` holders are exempt.
    pub exempt_admins: bool,
    /// Largest kernel file an import takes, in MiB.
    pub kernel_max_mib: u64,
    /// Largest initramfs an import takes, in MiB.
    pub initrd_max_mib: u64,
    /// Largest modules archive (all files together) an import takes, in MiB.
    pub modules_max_mib: u64,
    /// Largest image an import or pull makes (rootfs, work-seed, or all of
    /// an OCI image's layers), in GiB.
    pub image_max_gib: u64,
    /// A VM's console log is rotated past this size, in MiB (one old
    /// generation is kept).
    pub console_log_max_mib: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_vms: 50,
            max_running_vms: 10,
            max_vcpus_per_vm: 16,
            max_vcpus: 32,
            max_memory_mib: 32768,
            max_disk_gib: 500,
            exempt_admins: true,
            kernel_max_mib: 256,
            initrd_max_mib: 1024,
            modules_max_mib: 2048,
            image_max_gib: 64,
            console_log_max_mib: 8,
        }
    }
}

/// `[images]`: images built here from a recipe (`banger image build`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Where the recipes are: a directory per image, with its package
    /// list, configure script and image.json.
    pub recipes: PathBuf,
    /// The Debian mirror images are bootstrapped from.
    pub mirror: String,
    /// Where local builds (`kernel build`, `image build`, and `vm create`
    /// falling back to them) take their packages from; `none` turns them
    /// off.
    pub build_from: BuildFrom,
}

/// `images.build_from`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BuildFrom {
    /// The Debian archive: apt's sources for kernels, `images.mirror`
    /// for images.
    #[default]
    Debian,
    /// No local builds: images come from catalogs and registries only.
    None,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            recipes: "/usr/share/banger/images".into(),
            mirror: "http://deb.debian.org/debian".into(),
            build_from: BuildFrom::Debian,
        }
    }
}

/// `[debug]`: knobs for testing and for developing front ends.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Pause added at the start of every job stage, in milliseconds. Makes
    /// progress display and cancellation observable; 0 in production.
    pub job_stage_delay_ms: u64,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("invalid configuration in {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration in {path}: key `{key}` {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `daemon.job_retention_secs`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Parse `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&e, text),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Load `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        if !(1..=3600).contains(&self.daemon.job_retention_secs) {
            return Err(invalid(
                "daemon.job_retention_secs",
                "must be between 1 and 3600",
            ));
        }
        if crate::shape::validate_sizes(self.vm.vcpus, self.vm.memory_mib, self.vm.disk_mib << 20)
            .is_err()
        {
            return Err(invalid(
                "vm.vcpus, vm.memory_mib or vm.disk_mib",
                "out of range (1-64 vCPUs, 128 MiB-256 GiB memory, disk at least 64 MiB)",
            ));
        }
        if self.vm.boot_timeout_secs == 0 || self.vm.stop_timeout_secs == 0 {
            return Err(invalid(
                "vm.boot_timeout_secs or vm.stop_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.vm.suspend_idle_secs > MAX_SUSPEND_IDLE_SECS {
            return Err(invalid(
                "vm.suspend_idle_secs",
                "must be at most 2592000 (30 days); 0 turns it off",
            ));
        }
        if self.vm.max_streams == 0 {
            return Err(invalid("vm.max_streams", "must be at least 1"));
        }
        if self.daemon.job_history_days == 0 {
            return Err(invalid("daemon.job_history_days", "must be at least 1"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.daemon.log_level).is_err() {
            return Err(invalid(
                "daemon.log_level",
                "is not a valid filter (try `info` or `bangerd=debug`)",
            ));
        }
        if !(1..=600).contains(&self.update.stall_timeout_secs) {
            return Err(invalid(
                "update.stall_timeout_secs",
                "must be between 1 and 600",
            ));
        }
        if let Err(e) = crate::channel::channel_url(&self.update.channel) {
            return Err(invalid("update.channel", &e.to_string()));
        }
        for key in &self.update.extra_keys {
            if let Err(e) = crate::channel::parse_key(key) {
                return Err(invalid("update.extra_keys", &e.to_string()));
            }
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.kernel_max_mib", l.kernel_max_mib),
            ("limits.initrd_max_mib", l.initrd_max_mib),
            ("limits.modules_max_mib", l.modules_max_mib),
            ("limits.image_max_gib", l.image_max_gib),
            ("limits.console_log_max_mib", l.console_log_max_mib),
        ] {
            if !(1..=1 << 20).contains(&value) {
                return Err(invalid(key, "must be between 1 and 1048576"));
            }
        }
        if self.debug.job_stage_delay_ms > 60_000 {
            return Err(invalid("debug.job_stage_delay_ms", "must be at most 60000"));
        }
        if let Err(e) = self.network.subnet() {
            return Err(invalid("network.subnet", &e.message));
        }
        let b = &self.network.bridge;
        if b.is_empty()
            || b.len() > 15
            || !b
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        {
            return Err(invalid(
                "network.bridge",
                "must be an interface name: 1-15 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.network.tap_pool_size > 64 {
            return Err(invalid("network.tap_pool_size", "must be at most 64"));
        }
        if let Err(e) = self.network.nat_allow() {
            return Err(invalid("network.nat_allow", &e));
        }
        if self.network.host_ports.contains(&0) {
            return Err(invalid(
                "network.host_ports",
                "must be ports from 1 to 65535",
            ));
        }
        if !self.images.recipes.is_absolute() {
            return Err(invalid("images.recipes", "must be an absolute path"));
        }
        let mirror = url::Url::parse(&self.images.mirror).ok();
        if !mirror.as_ref().is_some_and(|u| match u.scheme() {
            "http" | "https" => u.host().is_some(),
            // A mirror on this host's disk (an offline host's).
            "file" => u.host().is_none() && u.path().len() > 1,
            _ => false,
        }) || self
            .images
            .mirror
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "images.mirror",
                "must be an http, https or file URL of a Debian mirror, like http://deb.debian.org/debian or file:///srv/debian",
            ));
        }
        for (key, bin) in [
            ("vm.firecracker_bin", &self.vm.firecracker_bin),
            ("vm.qemu_bin", &self.vm.qemu_bin),
        ] {
            if bin.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        Ok(())
    }
}

/// toml's message spans several lines with a source excerpt; keep it on one
/// line so it reads well in the journal and in `systemctl status`.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/banger/bangerd.toml"))
    }

    #[test]
    fn network_keys_are_checked() {
        let c =
            parse("[network]\nsubnet = \"10.50.0.0/16\"\nbridge = \"br-vm\"\ntap_pool_size = 0\n")
                .expect("ok");
        assert_eq!(c.network.subnet().expect("subnet").capacity(), 65_533);
        assert!(!c.network.guest_to_guest);
        let open = parse(
            "[network]\nguest_to_guest = true\nhost_ports = [3142]\nnat_allow = [\"192.168.1.7/24\"]\n",
        )
        .expect("exceptions");
        assert!(open.network.guest_to_guest);
        assert_eq!(open.network.host_ports, [3142]);
        assert_eq!(
            open.network.nat_allow().expect("nets")[0].to_string(),
            "192.168.1.0/24"
        );
        let local = parse("[images]\nmirror = \"file:///srv/debian\"\n").expect("a local mirror");
        assert_eq!(local.images.mirror, "file:///srv/debian");
        assert_eq!(local.images.build_from, BuildFrom::Debian);
        let off = parse("[images]\nbuild_from = \"none\"\n").expect("builds off");
        assert_eq!(off.images.build_from, BuildFrom::None);
        assert!(parse("[images]\nbuild_from = \"ubuntu\"\n").is_err());
        for (text, key) in [
            ("[network]\nsubnet = \"10.50.0.1/16\"\n", "network.subnet"),
            ("[network]\nsubnet = \"nope\"\n", "network.subnet"),
            (
                "[network]\nbridge = \"this-name-is-too-long\"\n",
                "network.bridge",
            ),
            ("[network]\nbridge = \"a b\"\n", "network.bridge"),
            ("[network]\ntap_pool_size = 1000\n", "network.tap_pool_size"),
            (
                "[network]\nnat_allow = [\"192.168.1.0\"]\n",
                "network.nat_allow",
            ),
            (
                "[network]\nnat_allow = [\"fd00::/8\"]\n",
                "network.nat_allow",
            ),
            ("[network]\nhost_ports = [0]\n", "network.host_ports"),
            ("[images]\nrecipes = \"images\"\n", "images.recipes"),
            (
                "[images]\nmirror = \"ftp://deb.debian.org/debian\"\n",
                "images.mirror",
            ),
            (
                "[images]\nmirror = \"http://deb.debian.org/debian -o x\"\n",
                "images.mirror",
            ),
            ("[images]\nmirror = \"file://host/srv\"\n", "images.mirror"),
            ("[images]\nmirror = \"file:///\"\n", "images.mirror"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").expect("empty config"), Config::default());
    }

    #[test]
    fn documented_example_parses() {
        let config = parse(
            r#"
            [daemon]
            log_level = "bangerd=debug"
            job_retention_secs = 30
            [network]
            dns_listen = "127.0.0.1:5353"
            [vm]
            vmm = "qemu"
            qemu_bin = "/usr/bin/qemu-system-x86_64"
            "#,
        )
        .expect("valid config");
        assert_eq!(config.daemon.job_retention_secs, 30);
        assert_eq!(config.vm.vmm, VmmKind::Qemu);
        assert_eq!(config.network.dns_listen.port(), 5353);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[daemon]\njob_retention = 5\n").expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("job_retention"), "{text}");
        assert!(text.contains("/etc/banger/bangerd.toml"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line 2, column 1"), "{text}");
    }

    #[test]
    fn unknown_section_is_named() {
        let err = parse("[netwrk]\n").expect_err("unknown section");
        assert!(err.to_string().contains("netwrk"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = parse("[daemon]\njob_retention_secs = \"ten\"\n").expect_err("wrong type");
        assert!(err.to_string().contains("invalid"), "{err}");
        let err = parse("[vm]\nvmm = \"kvmtool\"\n").expect_err("bad enum");
        assert!(err.to_string().contains("kvmtool"), "{err}");
    }

    #[test]
    fn out_of_range_names_the_key() {
        let err = parse("[daemon]\njob_retention_secs = 0\n").expect_err("zero");
        assert!(
            err.to_string().contains("daemon.job_retention_secs"),
            "{err}"
        );
        let err = parse("[daemon]\nlog_level = \"[[[\"\n").expect_err("bad filter");
        assert!(err.to_string().contains("daemon.log_level"), "{err}");
    }

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::load(&dir.path().join(FILE_NAME)).expect("defaults");
        assert_eq!(config, Config::default());
    }
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    /// The shipped sample documents every key with its default.
    #[test]
    fn shipped_sample_is_the_defaults() {
        let sample = include_str!("../../packaging/bangerd.toml");
        let parsed =
            Config::parse(sample, Path::new("packaging/bangerd.toml")).expect("sample parses");
        assert_eq!(parsed, Config::default());
    }

    /// ... and leaves none out: every key the daemon knows is in it.
    #[test]
    fn shipped_sample_holds_every_key() {
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let name = format!("{prefix}{k}");
                    if v.is_table() {
                        keys(&format!("{name}."), v, out);
                    } else {
                        out.push(name);
                    }
                }
            }
        }
        let sample: toml::Value =
            toml::from_str(include_str!("../../packaging/bangerd.toml")).expect("sample");
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialize");
        let (mut have, mut want) = (Vec::new(), Vec::new());
        keys("", &sample, &mut have);
        keys("", &defaults, &mut want);
        have.sort();
        want.sort();
        let missing: Vec<_> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "packaging/bangerd.toml lacks {missing:?}"
        );
        assert_eq!(have, want);
    }
}
