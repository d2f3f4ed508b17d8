//! Command line, stage one: the clap definitions (no I/O here), and
//! stage two: [`Cli::resolve`], which turns them into an [`Invocation`].
//!
//! The man page and the shell completions are generated from [`Cli::command`],
//! so they always match what is parsed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::exit;

const ABOUT: &str = "Persistent, fast Linux microVMs on your own host";

const LONG_ABOUT: &str = "\
banger manages persistent, fast Linux microVMs on this host. It talks to the \
bangerd system service over the D-Bus system bus (name org.banger.Manager); \
anything banger does, busctl or any D-Bus client can do too.

Changes are authorized by polkit. When run from a terminal, banger starts a \
text authentication agent (pkttyagent) so polkit can ask for a password; \
members of the `banger` group are not asked for the everyday actions.

The bus is the one DBUS_SYSTEM_BUS_ADDRESS names, or the default system bus.";

/// `banger`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version = banger_release::VERSION,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = exit::exit_codes_help(),
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Print machine-readable JSON on stdout (errors too, as {"error":{...}})
    #[arg(long, global = true)]
    pub json: bool,

    /// Never ask for a password: do not start an authentication agent and
    /// do not let polkit prompt (fails with exit code 4 when a prompt would be needed)
    #[arg(long, global = true)]
    pub no_ask_password: bool,

    /// Say more about what banger does (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check whether this host can run banger VMs
    ///
    /// Asks bangerd to run its host checks (KVM, VMM, guest agent, TUN, bridge, nftables,
    /// loop, device-mapper, reflink, polkit, journald, systemd, resolved, DNS
    /// port, disk space, default image) and prints pass/warn/fail with a hint
    /// per problem. Exits with 10 when any check fails.
    Doctor,

    /// Inspect and maintain the bangerd daemon
    #[command(subcommand)]
    Daemon(DaemonCommand),

    /// Inspect and cancel long-running operations (jobs)
    #[command(subcommand)]
    Job(JobCommand),

    /// Create and manage VMs
    #[command(subcommand)]
    Vm(VmCommand),

    /// Manage root filesystem images
    #[command(subcommand)]
    Image(ImageCommand),

    /// Manage guest kernels
    #[command(subcommand)]
    Kernel(KernelCommand),

    /// Update banger to the newest signed release (or check, or roll back)
    Update(UpdateArgs),

    /// Open a live terminal view of your VMs, images, kernels and jobs
    ///
    /// A table kept current from bangerd's signals, with keys to start,
    /// stop, restart, delete, create, follow the console, ssh, and pull or
    /// delete images and kernels. Press `?` inside for every key.
    Tui,

    /// Serve a local web dashboard of your VMs, images, kernels and jobs
    ///
    /// The server runs in this process, as you, on loopback unless --listen
    /// says otherwise. It prints a URL with a secret token; the browser
    /// trades it for a session cookie. Pages update live from bangerd's
    /// signals. Ctrl-C stops it.
    Web(WebArgs),

    /// Print an ssh_config block for `<name>.vm` hosts
    SshConfig,

    /// Print the versions of banger and bangerd
    Version,

    /// Print a shell completion script
    ///
    /// For example: `banger completions bash > /etc/bash_completion.d/banger`.
    Completions {
        /// The shell to write completions for
        #[arg(value_enum)]
        shell: Shell,
    },

    /// Print the man page (roff) of the whole command tree
    ///
    /// Without --dir, one page describing every command is written to stdout
    /// (`banger man | man -l -`). With --dir, one page per command is written
    /// into DIR (banger.1, banger-vm-create.1, ...).
    Man {
        /// Write one page per command into this directory instead
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `banger web` options.
#[derive(Debug, Args)]
pub struct WebArgs {
    /// Address and port to serve on; port 0 picks a free one. Anything
    /// but loopback lets other hosts reach the dashboard (they still need
    /// the URL's token)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,

    /// Open the dashboard in the desktop's browser (xdg-open)
    #[arg(long)]
    pub open: bool,
}

/// `banger daemon ...`
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show the daemon's version, API version, status, unique bus name and pid
    Status,

    /// Run store maintenance (integrity check, checkpoint; optionally VACUUM)
    ///
    /// Starts a job on bangerd and follows it, printing each stage with its
    /// duration. Ctrl-C cancels the job.
    Maintain {
        /// Also VACUUM the store (slower; reclaims disk space)
        #[arg(long)]
        vacuum: bool,

        /// Print the job path and return without following the job
        #[arg(long)]
        no_wait: bool,
    },
}

/// `banger job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show a job's properties
    Show {
        /// Job number (`7`) or object path (`/org/banger/Manager/job/7`)
        job: JobRef,
    },

    /// Follow a running job until it completes
    Watch {
        /// Job number (`7`) or object path (`/org/banger/Manager/job/7`)
        job: JobRef,
    },

    /// Ask a job to stop; it completes as cancelled
    Cancel {
        /// Job number (`7`) or object path (`/org/banger/Manager/job/7`)
        job: JobRef,
    },
}

/// A job, named by number or object path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRef(pub u64);

impl JobRef {
    /// The job's object path.
    pub fn path(self) -> zbus::OwnedObjectPath {
        banger_dbus::job_path(self.0)
    }
}

impl FromStr for JobRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = if s.starts_with('/') {
            banger_dbus::parse_job_path(s)
        } else if !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'))
        {
            s.parse().ok()
        } else {
            None
        };
        number.map(JobRef).ok_or_else(|| {
            format!(
                "expected a job number such as `7` or a job path such as `{}`",
                banger_dbus::job_path(7).as_str()
            )
        })
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One or more VM references (name or unique id prefix). With several,
/// 16 jobs run at a time; each VM gets a line as it ends, then a summary.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct VmRefs {
    /// VM names or unique id prefixes
    #[arg(required = true, value_name = "VM")]
    pub vms: Vec<String>,
}

/// One VM reference.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct VmRef {
    /// VM name or unique id prefix
    #[arg(value_name = "VM")]
    pub vm: String,
}

/// Settings of a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct VmSpec {
    /// VM name (a DNS label; the VM is reachable as `<name>.vm`); a
    /// readable random one (e.g. brisk-otter) when left out
    #[arg(long)]
    pub name: Option<String>,
    /// Image to boot (default: the configured default image)
    #[arg(long)]
    pub image: Option<String>,
    /// Number of virtual CPUs
    #[arg(long, alias = "vcpu")]
    pub vcpus: Option<u32>,
    /// Memory in MiB
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Size of the persistent work disk mounted at /root (e.g. 8G)
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<String>,
    /// Give the VM outbound internet access through NAT
    #[arg(long)]
    pub nat: bool,
    /// Let the VM talk with the other VMs created or set with --peers
    #[arg(long)]
    pub peers: bool,
    /// Start the VM whenever the host boots
    #[arg(long)]
    pub autostart: bool,
    /// Only create it; start it later with `banger vm start`
    #[arg(long)]
    pub no_start: bool,
    /// Boot from the image even where a template of it could be restored
    #[arg(long)]
    pub cold_boot: bool,
    /// Also authorize the public keys in FILE for root's SSH (one per
    /// line, as in authorized_keys; repeatable)
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<std::path::PathBuf>,
    /// Run this script once as root after the first boot (its output is
    /// shown as the `setup` stage; if it fails, the VM is left running)
    #[arg(long, value_name = "FILE")]
    pub setup: Option<std::path::PathBuf>,
    /// Share a host folder, served as you: HOST_DIR:GUEST_DIR, or
    /// HOST_DIR:GUEST_DIR:ro read-only (QEMU only; repeatable)
    #[arg(long = "mount", value_name = "HOST_DIR:GUEST_DIR[:ro]", value_parser = parse_mount)]
    pub mounts: Vec<banger_dbus::options::Mount>,
}

/// `banger vm snapshot ...`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum SnapshotCommand {
    /// Keep a copy of a stopped VM's disks (reflink or sparse copy; at
    /// most 16 per VM)
    Create {
        /// VM name or unique id prefix
        #[arg(value_name = "VM")]
        vm: String,
        /// Name of the snapshot (a DNS label)
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List a VM's snapshots with their time and size
    List {
        /// VM name or unique id prefix
        #[arg(value_name = "VM")]
        vm: String,
    },
    /// Delete a snapshot
    Delete {
        /// VM name or unique id prefix
        #[arg(value_name = "VM")]
        vm: String,
        /// The snapshot to delete
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `banger vm ...`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum VmCommand {
    /// Create a VM and start it
    Create(VmSpec),
    /// Start stopped VMs
    Start(VmRefs),
    /// Stop VMs gracefully (forced after vm.stop_timeout_secs); disks are kept
    Stop(VmRefs),
    /// Restart VMs
    Restart(VmRefs),
    /// Save running VMs' memory to disk and stop them; `vm start` resumes
    /// each where it was (`vm stop` drops the saved memory instead)
    Suspend(VmRefs),
    /// Send a signal to the VMs' VMM
    Kill {
        #[command(flatten)]
        refs: VmRefs,
        /// Signal to send
        #[arg(long, short, default_value = "KILL")]
        signal: String,
    },
    /// Delete VMs and everything they own
    Delete(VmRefs),
    /// Change memory, vCPUs, disk size, host folders, NAT, peers or
    /// autostart of VMs
    Set {
        #[command(flatten)]
        refs: VmRefs,
        /// Memory in MiB
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// Number of virtual CPUs
        #[arg(long, alias = "vcpu")]
        vcpus: Option<u32>,
        /// Grow the work disk to this size
        #[arg(long, value_name = "SIZE")]
        disk_size: Option<String>,
        /// Enable NAT
        #[arg(long, conflicts_with = "no_nat")]
        nat: bool,
        /// Disable NAT
        #[arg(long)]
        no_nat: bool,
        /// Let them talk with the other VMs that have peers on
        #[arg(long, conflicts_with = "no_peers")]
        peers: bool,
        /// Keep them apart from other VMs again
        #[arg(long)]
        no_peers: bool,
        /// Start them whenever the host boots
        #[arg(long, conflicts_with = "no_autostart")]
        autostart: bool,
        /// Do not start them when the host boots
        #[arg(long)]
        no_autostart: bool,
        /// Share these host folders instead of the ones they have:
        /// HOST_DIR:GUEST_DIR[:ro] (stopped VMs; repeatable)
        #[arg(long = "mount", value_name = "HOST_DIR:GUEST_DIR[:ro]", value_parser = parse_mount, conflicts_with = "no_mounts")]
        mounts: Vec<banger_dbus::options::Mount>,
        /// Share no host folder any more (stopped VMs)
        #[arg(long)]
        no_mounts: bool,
    },
    /// List VMs
    List {
        /// Include VMs of other users (needs org.banger.vm.manage-others)
        #[arg(long)]
        all: bool,
    },
    /// Show one VM
    Show(VmRef),
    /// Show resource usage of a VM
    Stats(VmRef),
    /// Open an SSH session to a VM (or run a command in it)
    Ssh {
        #[command(flatten)]
        vm: VmRef,
        /// Command to run instead of a login shell
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command in a running VM through its agent, without SSH
    ///
    /// Stdin, stdout and stderr stream both ways and banger exits with the
    /// command's status (128 + N when signal N ended it). Ctrl-C and
    /// SIGTERM are passed on to the command; with --tty the guest gets a
    /// terminal of this one's size and follows its resizes.
    Exec {
        #[command(flatten)]
        vm: VmRef,
        /// Run the command on a terminal (for interactive programs)
        #[arg(long, short = 't')]
        tty: bool,
        /// Set an environment variable for the command (repeatable)
        #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Directory to run in (default: the user's home directory)
        #[arg(long, short = 'w', value_name = "DIR")]
        workdir: Option<String>,
        /// Guest user to run as, a name or uid (default: root)
        #[arg(long, short = 'u', value_name = "USER")]
        user: Option<String>,
        /// The command and its arguments, after --
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Copy files or directories between this host and a VM
    ///
    /// One side is VM:PATH (a relative PATH is in the guest user's home).
    /// Modes, modification times and symbolic links are kept. Copying into
    /// an existing directory puts SRC in it under its own name; otherwise
    /// DST is the new name. `-` is a tar archive on stdin (unpacked into
    /// the VM directory) or stdout (of the VM path).
    Cp {
        /// What to copy: PATH, VM:PATH or -
        #[arg(value_name = "SRC")]
        src: String,
        /// Where to: PATH, VM:PATH or -
        #[arg(value_name = "DST")]
        dst: String,
        /// Guest user that reads or writes the files (default: root)
        #[arg(long, short = 'u', value_name = "USER")]
        user: Option<String>,
    },
    /// Make a new VM from copies of a stopped VM's disks
    ///
    /// The clone has the source's image, settings, files on both disks and
    /// setup state, and its own name, address, MAC, SSH host keys and
    /// machine id. Copies share extents where the file system allows
    /// (reflink), else they are sparse copies. Autostart is left off.
    Clone {
        /// The stopped VM to copy (name or unique id prefix)
        #[arg(value_name = "SRC")]
        source: String,
        /// Name of the new VM
        #[arg(value_name = "NEW")]
        name: String,
        /// Start the clone once its disks are copied
        #[arg(long)]
        start: bool,
    },
    /// Make running copies of a running VM
    ///
    /// The source is paused while its memory is saved and its disks are
    /// copied, then runs on; the pause is reported. Each fork goes on from
    /// that moment: its processes, its files and everything in its memory,
    /// every secret included. banger renews what makes it a VM of its own:
    /// its address, MAC, hostname, SSH host keys, machine id, the guest's
    /// random pool and clock. QEMU, or Firecracker under its jailer; not
    /// with host folders.
    Fork {
        /// The running VM to copy (name or unique id prefix)
        #[arg(value_name = "SRC")]
        source: String,
        /// Name of the new VM (with --count N: NEW-1 … NEW-N)
        #[arg(value_name = "NEW")]
        name: String,
        /// How many forks to make (1 to 16)
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Keep, list and delete copies of a stopped VM's disks
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Put a stopped VM's disks back as they were in one of its snapshots
    ///
    /// The snapshot stays, so it can be restored again; a work disk grown
    /// since keeps its size.
    Restore {
        /// VM name or unique id prefix
        #[arg(value_name = "VM")]
        vm: String,
        /// The snapshot to restore
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
    },
    /// Forward ports of this host to ports of a VM until Ctrl-C, or in
    /// the background
    ///
    /// Each PORTS is [ADDR:]HOST_PORT:GUEST_PORT: banger listens on
    /// ADDR:HOST_PORT (127.0.0.1 unless given; a HOST_PORT of 0 picks a
    /// free one) and carries every connection through the guest agent to
    /// GUEST_PORT on the guest's loopback, so services that listen only
    /// there are reachable too. Listening on an address other than
    /// loopback also needs org.banger.network.configure. With
    /// --background bangerd listens instead, for the VM's lifetime (`vm
    /// show` lists them; a port below 1024 also needs
    /// network.configure), until --remove [ADDR:]HOST_PORT.
    Forward {
        #[command(flatten)]
        vm: VmRef,
        /// Have bangerd keep the forwards for the VM's lifetime
        #[arg(long, conflicts_with = "remove")]
        background: bool,
        /// Remove background forwards; PORTS are [ADDR:]HOST_PORT
        #[arg(long)]
        remove: bool,
        /// [ADDR:]HOST_PORT:GUEST_PORT, one or more
        #[arg(required = true, value_name = "PORTS")]
        ports: Vec<String>,
    },
    /// Print a VM's console log
    Logs {
        #[command(flatten)]
        vm: VmRef,
        /// Keep printing new output
        #[arg(long, short)]
        follow: bool,
    },
    /// Create and start a VM, wait until it is ready, then SSH into it
    Run {
        #[command(flatten)]
        spec: VmSpec,
        /// Delete the VM when the session or command ends
        #[arg(long)]
        rm: bool,
        /// Command to run instead of a login shell
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// `banger image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images (--available: what the image catalog offers)
    List {
        /// List the image catalog's entries instead: what `image pull` can fetch
        #[arg(long)]
        available: bool,
    },
    /// Show one image
    Show {
        /// Image name, id or unique id prefix
        image: String,
    },
    /// Pull an image from the catalog (a job: download, unpack, work-seed; its kernel too when
    /// missing) or from an OCI registry (registry/repo[:tag|@digest]: layers applied, ext4 built)
    Pull {
        /// Catalog name (`banger image list --available`), or an OCI reference
        reference: String,
        /// Name to record an OCI image under [default: repository-tag]
        #[arg(long)]
        name: Option<String>,
        /// Kernel an OCI image boots with [default: the default image's]
        #[arg(long, alias = "kernel-ref")]
        kernel: Option<String>,
        /// Registry username for an OCI pull (the password or token comes from --password-stdin)
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password or token from standard input
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Registry auth file to read the login from [default: podman's, then docker's]
        #[arg(long, value_name = "PATH", conflicts_with = "username")]
        authfile: Option<PathBuf>,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Build an image from a recipe here (a job: its kernel first when missing, the Debian
    /// base system, agent, configure, root filesystem, work-seed); the package ships the
    /// debian-bookworm recipe
    Build {
        /// Recipe name (a directory under images.recipes)
        recipe: String,
        /// Name to record the image under [default: the recipe's]
        #[arg(long)]
        name: Option<String>,
        /// Kernel it boots [default: the one `banger kernel build` makes, built first when
        /// missing]
        #[arg(long)]
        kernel: Option<String>,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Register an unmanaged image from host paths (nothing is copied)
    Register {
        /// Image name (a DNS label)
        #[arg(long)]
        name: String,
        /// Root filesystem (an ext4 image)
        #[arg(long)]
        rootfs: PathBuf,
        /// Kernel to boot it with (name or id)
        #[arg(long)]
        kernel: String,
        /// Seed of every VM's /root disk (an ext4 image); made from the
        /// rootfs's /root when left out
        #[arg(long)]
        work_seed: Option<PathBuf>,
        /// A guest service readiness waits for, NAME:PORT (repeatable), e.g. ssh:22
        #[arg(long = "service", value_name = "NAME:PORT", value_parser = parse_service)]
        services: Vec<String>,
        /// The init the kernel starts, e.g. /sbin/banger-init for images without systemd
        #[arg(long)]
        init: Option<String>,
    },
    /// Copy an unmanaged image into managed storage (a job)
    Promote {
        /// Image name, id or unique id prefix
        image: String,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete images (refused while VMs use them)
    Delete {
        /// Image names or ids
        #[arg(required = true)]
        images: Vec<String>,
    },
}

/// Whether an `image pull` reference names an OCI image
/// (`registry/repo[:tag|@digest]`) rather than a catalog entry.
/// Where an OCI pull's registry login comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginSource {
    /// `--username U --password-stdin`.
    Stdin(String),
    /// `--authfile PATH`.
    AuthFile(PathBuf),
    /// podman's and docker's auth files, if they hold one; else anonymous.
    Stored,
}

fn is_oci_reference(reference: &str) -> bool {
    reference.contains('/')
}

/// `NAME:PORT` with a non-empty name and a port in 1..=65535.
fn parse_service(s: &str) -> Result<String, String> {
    let (name, port) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:PORT (e.g. ssh:22)"))?;
    if name.is_empty() {
        return Err(format!("{s:?} has no service name (e.g. ssh:22)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: the port must be 1 to 65535")),
    }
}

/// `banger kernel ...`
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// List kernels (--available: what the kernel catalog offers)
    List {
        /// List the kernel catalog's entries instead: what `kernel pull` can fetch
        #[arg(long)]
        available: bool,
    },
    /// Show one kernel
    Show {
        /// Kernel name, id or unique id prefix
        kernel: String,
    },
    /// Import a kernel (an ELF vmlinux or a bzImage) with optional initrd and modules (a job)
    Import {
        /// Kernel name (a DNS label)
        #[arg(long)]
        name: String,
        /// The kernel image: an ELF vmlinux, or a bzImage (vmlinuz) from which
        /// the vmlinux is extracted
        #[arg(long)]
        kernel: PathBuf,
        /// Initramfs to boot with it
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Its lib/modules/VERSION directory
        #[arg(long)]
        modules: Option<PathBuf>,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Pull a kernel from the catalog (a job: download with rate and ETA, unpack, record)
    Pull {
        /// Catalog name (`banger kernel list --available`)
        name: String,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Build a kernel from the host's Debian archive (a job: apt update, download, unpack,
    /// modules, initramfs, record); nothing is installed on the host
    Build {
        /// Where the kernel comes from: the host's apt sources
        #[arg(long, value_enum, default_value_t = KernelSource::Debian)]
        from: KernelSource,
        /// Kernel name (a DNS label); default debian-CODENAME of this host
        #[arg(long)]
        name: Option<String>,
        /// The kernel image package; default the release's cloud kernel (what
        /// linux-image-cloud-amd64 depends on)
        #[arg(long)]
        package: Option<String>,
        /// Print the job's path and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete kernels (refused while an image uses them)
    Delete {
        /// Kernel names or ids
        #[arg(required = true)]
        kernels: Vec<String>,
    },
}

/// Where `kernel build` takes a kernel from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelSource {
    /// Debian's cloud kernel, through the host's apt sources and mirrors
    Debian,
}

/// `banger update`
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Only check whether a newer release exists; change nothing
    #[arg(long, conflicts_with = "rollback")]
    pub check: bool,
    /// Release channel URL instead of the configured `update.channel`
    #[arg(long, value_name = "URL", conflicts_with = "rollback")]
    pub channel: Option<String>,
    /// Return to the binaries installed before the last update
    #[arg(long)]
    pub rollback: bool,
}

/// The resolved command line: what to do and how to talk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub options: Options,
    pub action: Action,
}

/// How to run, whatever the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Print JSON on stdout.
    pub json: bool,
    /// The user allows banger to start an agent and polkit to prompt
    /// (whether a terminal is there is decided when running).
    pub ask_password: bool,
    /// Verbosity (0 = quiet).
    pub verbose: u8,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Doctor,
    DaemonStatus,
    Maintain {
        vacuum: bool,
        wait: bool,
    },
    JobShow(JobRef),
    JobWatch(JobRef),
    JobCancel(JobRef),
    Version,
    Completions(Shell),
    Man {
        dir: Option<PathBuf>,
    },
    KernelList,
    /// `kernel list --available` / `image list --available`: the catalog kind.
    Available(&'static str),
    KernelShow(String),
    KernelImport {
        name: String,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        modules: Option<PathBuf>,
        wait: bool,
    },
    KernelDelete(Vec<String>),
    /// `image build`.
    ImageBuild {
        recipe: String,
        name: Option<String>,
        kernel: Option<String>,
        wait: bool,
    },
    /// `kernel build`.
    KernelBuild {
        name: Option<String>,
        package: Option<String>,
        wait: bool,
    },
    ImageList,
    ImageShow(String),
    ImageRegister {
        name: String,
        rootfs: PathBuf,
        kernel: String,
        work_seed: Option<PathBuf>,
        services: Vec<String>,
        init: Option<String>,
    },
    ImagePromote {
        image: String,
        wait: bool,
    },
    ImageDelete(Vec<String>),
    /// `kernel pull` (image false) / `image pull` of a catalog entry.
    Pull {
        image: bool,
        name: String,
        wait: bool,
    },
    /// `image pull REGISTRY/REPO[:TAG]`.
    PullOci {
        reference: String,
        name: Option<String>,
        kernel: Option<String>,
        login: LoginSource,
        wait: bool,
    },
    Vm(VmCommand),
    SshConfig,
    Tui,
    /// `banger web`
    Web {
        listen: std::net::SocketAddr,
        open: bool,
    },
    /// A planned command: fails with [`exit::NOT_IMPLEMENTED`].
    NotImplemented(&'static str),
    /// `banger update`
    Update {
        check: bool,
        channel: Option<String>,
        rollback: bool,
    },
}

impl Cli {
    /// Stage two: the invocation this command line asks for.
    pub fn resolve(self) -> Invocation {
        let options = Options {
            json: self.global.json,
            ask_password: !self.global.no_ask_password,
            verbose: self.global.verbose,
        };
        let action = match self.command {
            Command::Doctor => Action::Doctor,
            Command::Daemon(DaemonCommand::Status) => Action::DaemonStatus,
            Command::Daemon(DaemonCommand::Maintain { vacuum, no_wait }) => Action::Maintain {
                vacuum,
                wait: !no_wait,
            },
            Command::Job(JobCommand::Show { job }) => Action::JobShow(job),
            Command::Job(JobCommand::Watch { job }) => Action::JobWatch(job),
            Command::Job(JobCommand::Cancel { job }) => Action::JobCancel(job),
            Command::Vm(c) => Action::Vm(c),
            Command::Image(ImageCommand::List { available: false }) => Action::ImageList,
            Command::Image(ImageCommand::List { available: true }) => Action::Available("images"),
            Command::Image(ImageCommand::Show { image }) => Action::ImageShow(image),
            Command::Image(ImageCommand::Register {
                name,
                rootfs,
                kernel,
                work_seed,
                services,
                init,
            }) => Action::ImageRegister {
                name,
                rootfs,
                kernel,
                work_seed,
                services,
                init,
            },
            Command::Image(ImageCommand::Promote { image, no_wait }) => Action::ImagePromote {
                image,
                wait: !no_wait,
            },
            Command::Image(ImageCommand::Delete { images }) => Action::ImageDelete(images),
            Command::Image(ImageCommand::Pull {
                reference,
                name: None,
                kernel: None,
                username: None,
                password_stdin: false,
                authfile: None,
                no_wait,
            }) if !is_oci_reference(&reference) => Action::Pull {
                image: true,
                name: reference,
                wait: !no_wait,
            },
            Command::Image(ImageCommand::Pull {
                reference,
                name,
                kernel,
                username,
                authfile,
                no_wait,
                ..
            }) if is_oci_reference(&reference) => Action::PullOci {
                reference,
                name,
                kernel,
                login: match (username, authfile) {
                    (Some(username), _) => LoginSource::Stdin(username),
                    (None, Some(path)) => LoginSource::AuthFile(path),
                    (None, None) => LoginSource::Stored,
                },
                wait: !no_wait,
            },
            Command::Image(ImageCommand::Pull { .. }) => Action::NotImplemented(
                "image pull CATALOG-NAME --name/--kernel/--username/--authfile",
            ),
            Command::Kernel(KernelCommand::List { available: false }) => Action::KernelList,
            Command::Kernel(KernelCommand::List { available: true }) => {
                Action::Available("kernels")
            }
            Command::Kernel(KernelCommand::Show { kernel }) => Action::KernelShow(kernel),
            Command::Kernel(KernelCommand::Import {
                name,
                kernel,
                initrd,
                modules,
                no_wait,
            }) => Action::KernelImport {
                name,
                kernel,
                initrd,
                modules,
                wait: !no_wait,
            },
            Command::Kernel(KernelCommand::Delete { kernels }) => Action::KernelDelete(kernels),
            Command::Image(ImageCommand::Build {
                recipe,
                name,
                kernel,
                no_wait,
            }) => Action::ImageBuild {
                recipe,
                name,
                kernel,
                wait: !no_wait,
            },
            Command::Kernel(KernelCommand::Build {
                from: KernelSource::Debian,
                name,
                package,
                no_wait,
            }) => Action::KernelBuild {
                name,
                package,
                wait: !no_wait,
            },
            Command::Kernel(KernelCommand::Pull { name, no_wait }) => Action::Pull {
                image: false,
                name,
                wait: !no_wait,
            },
            Command::Update(UpdateArgs {
                check,
                channel,
                rollback,
            }) => Action::Update {
                check,
                channel,
                rollback,
            },
            Command::SshConfig => Action::SshConfig,
            Command::Tui => Action::Tui,
            Command::Web(WebArgs { listen, open }) => Action::Web { listen, open },
            Command::Version => Action::Version,
            Command::Completions { shell } => Action::Completions(shell),
            Command::Man { dir } => Action::Man { dir },
        };
        Invocation { options, action }
    }

    /// The clap command tree (for man pages and completions).
    pub fn command_tree() -> clap::Command {
        <Self as CommandFactory>::command()
    }
}

/// `--mount HOST_DIR:GUEST_DIR[:ro]`: the host folder made absolute and
/// followed to where it is (as the user, who must be able to reach it),
/// the guest folder absolute. The last `:` before the guest folder
/// splits them, so a host folder may hold one.
pub fn parse_mount(text: &str) -> Result<banger_dbus::options::Mount, String> {
    let (rest, read_only) = match text.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    let Some((host, guest)) = rest.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not HOST_DIR:GUEST_DIR or HOST_DIR:GUEST_DIR:ro"
        ));
    };
    if host.is_empty() || !guest.starts_with('/') {
        return Err(format!(
            "{text:?}: give a host folder and an absolute guest folder, as in ~/src:/src"
        ));
    }
    let source =
        std::fs::canonicalize(host).map_err(|e| format!("cannot use host folder {host}: {e}"))?;
    if !source.is_dir() {
        return Err(format!("host folder {host} is not a directory"));
    }
    let source = source
        .to_str()
        .ok_or_else(|| format!("host folder {host} is not UTF-8"))?
        .to_owned();
    Ok(banger_dbus::options::Mount {
        source,
        target: guest.trim_end_matches('/').to_owned(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn resolve(args: &[&str]) -> Invocation {
        let argv = std::iter::once("banger").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.resolve(),
            Err(e) => panic!("{args:?} did not parse: {e}"),
        }
    }

    fn rejects(args: &[&str]) -> clap::error::ErrorKind {
        let argv = std::iter::once("banger").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command_tree().debug_assert();
    }

    #[test]
    fn maintain_resolves() {
        let inv = resolve(&["daemon", "maintain", "--vacuum"]);
        assert_eq!(
            inv.action,
            Action::Maintain {
                vacuum: true,
                wait: true
            }
        );
        assert_eq!(
            inv.options,
            Options {
                json: false,
                ask_password: true,
                verbose: 0
            }
        );
        let inv = resolve(&["--json", "daemon", "maintain", "--no-wait", "-vv"]);
        assert_eq!(
            inv.action,
            Action::Maintain {
                vacuum: false,
                wait: false
            }
        );
        assert!(inv.options.json);
        assert_eq!(inv.options.verbose, 2);
    }

    #[test]
    fn global_flags_go_anywhere() {
        let inv = resolve(&["doctor", "--json", "--no-ask-password"]);
        assert_eq!(inv.action, Action::Doctor);
        assert!(inv.options.json);
        assert!(!inv.options.ask_password);
        let inv = resolve(&["--json", "daemon", "status"]);
        assert_eq!(inv.action, Action::DaemonStatus);
        assert!(inv.options.json);
    }

    #[test]
    fn job_refs() {
        assert_eq!(
            resolve(&["job", "cancel", "7"]).action,
            Action::JobCancel(JobRef(7))
        );
        assert_eq!(
            resolve(&["job", "show", "/org/banger/Manager/job/7"]).action,
            Action::JobShow(JobRef(7))
        );
        assert_eq!(
            resolve(&["job", "watch", "0"]).action,
            Action::JobWatch(JobRef(0))
        );
        for bad in [
            "",
            "x",
            "-1",
            "+7",
            "07",
            "7a",
            "/org/banger/Manager/vm/7",
            "/org/banger/Manager/job/",
            "/org/banger/Manager/job/7/8",
            "99999999999999999999999",
        ] {
            assert!(bad.parse::<JobRef>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            rejects(&["job", "cancel", "garbage"]),
            clap::error::ErrorKind::ValueValidation
        );
        assert_eq!(JobRef(7).path().as_str(), "/org/banger/Manager/job/7");
    }

    #[test]
    fn kernel_and_image_commands_resolve() {
        assert_eq!(
            resolve(&[
                "kernel",
                "import",
                "--name",
                "k",
                "--kernel",
                "vmlinuz",
                "--initrd",
                "i",
                "--no-wait"
            ])
            .action,
            Action::KernelImport {
                name: "k".into(),
                kernel: "vmlinuz".into(),
                initrd: Some("i".into()),
                modules: None,
                wait: false,
            }
        );
        assert_eq!(
            resolve(&["kernel", "delete", "a", "b"]).action,
            Action::KernelDelete(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            resolve(&[
                "image",
                "register",
                "--name",
                "t",
                "--rootfs",
                "r.ext4",
                "--kernel",
                "k",
                "--service",
                "ssh:22",
                "--service",
                "web:8080"
            ])
            .action,
            Action::ImageRegister {
                name: "t".into(),
                rootfs: "r.ext4".into(),
                kernel: "k".into(),
                work_seed: None,
                services: vec!["ssh:22".into(), "web:8080".into()],
                init: None,
            }
        );
        assert_eq!(
            resolve(&["image", "promote", "t"]).action,
            Action::ImagePromote {
                image: "t".into(),
                wait: true
            }
        );
        assert_eq!(
            resolve(&["image", "show", "t", "--json"]).action,
            Action::ImageShow("t".into())
        );
        for bad in [
            &["kernel", "import", "--name", "k"][..],
            &["kernel", "delete"],
            &[
                "image",
                "register",
                "--name",
                "t",
                "--rootfs",
                "r",
                "--kernel",
                "k",
                "--service",
                "ssh:0",
            ],
            &[
                "image",
                "register",
                "--name",
                "t",
                "--rootfs",
                "r",
                "--kernel",
                "k",
                "--service",
                ":22",
            ],
            &[
                "image",
                "register",
                "--name",
                "t",
                "--rootfs",
                "r",
                "--kernel",
                "k",
                "--service",
                "ssh",
            ],
        ] {
            let argv = std::iter::once("banger").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn pulls_resolve_for_catalog_names_and_oci_references() {
        assert_eq!(
            resolve(&[
                "image",
                "pull",
                "127.0.0.1:5000/library/debian:bookworm",
                "--kernel-ref",
                "k"
            ])
            .action,
            Action::PullOci {
                reference: "127.0.0.1:5000/library/debian:bookworm".into(),
                name: None,
                kernel: Some("k".into()),
                login: LoginSource::Stored,
                wait: true
            }
        );
        let reference = "ghcr.io/o/r:1";
        assert!(matches!(
            resolve(&["image", "pull", reference, "--username", "u", "--password-stdin"]).action,
            Action::PullOci { login: LoginSource::Stdin(u), .. } if u == "u"
        ));
        assert!(matches!(
            resolve(&["image", "pull", reference, "--authfile", "/a.json"]).action,
            Action::PullOci { login: LoginSource::AuthFile(p), .. } if p == Path::new("/a.json")
        ));
        for bad in [
            &["image", "pull", reference, "--username", "u"][..],
            &["image", "pull", reference, "--password-stdin"],
            &[
                "image",
                "pull",
                reference,
                "--username",
                "u",
                "--password-stdin",
                "--authfile",
                "/a",
            ],
        ] {
            let argv = std::iter::once("banger").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            resolve(&["image", "pull", "debian-bookworm", "--name", "x"]).action,
            Action::NotImplemented("image pull CATALOG-NAME --name/--kernel/--username/--authfile")
        );
        assert_eq!(
            resolve(&["image", "pull", "debian-bookworm"]).action,
            Action::Pull {
                image: true,
                name: "debian-bookworm".into(),
                wait: true
            }
        );
        assert_eq!(
            resolve(&["kernel", "pull", "generic", "--no-wait"]).action,
            Action::Pull {
                image: false,
                name: "generic".into(),
                wait: false
            }
        );
    }

    #[test]
    fn update_resolves_and_refuses_contradictions() {
        assert_eq!(
            resolve(&["update", "--check", "--channel", "https://x/"]).action,
            Action::Update {
                check: true,
                channel: Some("https://x/".into()),
                rollback: false,
            }
        );
        assert_eq!(
            resolve(&["update", "--rollback"]).action,
            Action::Update {
                check: false,
                channel: None,
                rollback: true,
            }
        );
        for bad in [
            &["update", "--check", "--rollback"][..],
            &["update", "--rollback", "--channel", "https://x/"],
        ] {
            let argv = std::iter::once("banger").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn mounts_are_host_and_guest_folders_read_only_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("a:b");
        std::fs::create_dir(&host).expect("mkdir");
        let host_text = host.to_str().expect("utf-8");
        let m = parse_mount(&format!("{host_text}:/src")).expect("parses");
        assert_eq!(
            (m.source.as_str(), m.target.as_str(), m.read_only),
            (
                std::fs::canonicalize(&host)
                    .expect("real")
                    .to_str()
                    .expect("utf-8"),
                "/src",
                false
            )
        );
        let m = parse_mount(&format!("{host_text}/../a:b:/data/:ro")).expect("parses");
        assert!(
            m.read_only && m.target == "/data" && !m.source.contains(".."),
            "{m:?}"
        );
        for bad in [
            "/src",
            "relative",
            &format!("{host_text}:rel"),
            "/no/such/dir:/x",
        ] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
        let file = dir.path().join("f");
        std::fs::write(&file, "").expect("write");
        let e = parse_mount(&format!("{}:/f", file.display())).expect_err("a file");
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn usage_errors() {
        use clap::error::ErrorKind;
        assert_eq!(
            rejects(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(
            rejects(&["vm", "start"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            rejects(&["daemon", "maintain", "--bogus"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(rejects(&["completions", "tcsh"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn long_help_documents_exit_codes() {
        let help = Cli::command_tree().render_long_help().to_string();
        for (code, meaning) in exit::EXIT_CODES {
            assert!(
                help.contains(meaning),
                "exit code {code} missing from --help"
            );
        }
    }
}
