//! `banger vm ...` and `banger ssh-config`: VM commands, the per-user SSH
//! key, and what is printed.
//!
//! JSON shapes (one value on stdout):
//! - vm: `{"id", "name", "state", "owner_uid", "ipv4", "mac", "vcpus",
//!   "memory_mib", "disk_bytes", "nat", "image", "kernel", "unit",
//!   "disk_method", "created_at_usec", "last_error", "suspended", "path"}`; `vm list`
//!   prints an array of them.
//! - `vm create`/`start`/`stop`/`restart`/`delete` with one VM: the job
//!   report; with several: `[{"ref", "ok", "job", "error"}]`.
//! - `vm stats`: `{"cpu_usec", "rss_bytes", "uptime_secs", "guest_kernel",
//!   "guest_hostname", "guest_memory_total_bytes",
//!   "guest_memory_available_bytes", "guest_disks": [{"path",
//!   "total_bytes", "used_bytes"}]}`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use zbus::OwnedObjectPath;

use crate::artifacts::{self, human_bytes, human_time};
use crate::cli::{Options, SnapshotCommand, VmCommand, VmSpec};
use crate::client::{Client, VmChange, VmInfo, VmJob};
use crate::exit::{self, Failure, Kind};
use crate::output::{emit, emit_json};
use crate::progress::{self, Display, Followed, Stream, Subscription, Tracker};
use crate::session::{Authorization, connect, follow_and_report};

impl artifacts::Named for VmInfo {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn owner_uid(&self) -> u32 {
        self.owner_uid
    }
}

/// `8G`, `512M`, `1T`, `4096K` (binary units; a bare number is bytes).
pub fn parse_size(text: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure::new(
            Kind::InvalidArgument,
            format!("{text:?} is not a size: give a number with K, M, G or T (e.g. 8G)"),
        )
    };
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Where the CLI keeps the user's SSH key and banger's known hosts.
pub fn ssh_dir() -> Result<PathBuf, Failure> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| {
            Failure::new(
                Kind::Failed,
                "neither XDG_CONFIG_HOME nor HOME is set: cannot find the banger ssh key",
            )
        })?;
    Ok(base.join("banger").join("ssh"))
}

/// The user's banger key pair, made on first use. Returns the private
/// key's path and the public key line.
pub fn ssh_key() -> Result<(PathBuf, String), Failure> {
    let dir = ssh_dir()?;
    let key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !key.exists() || !public.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| {
            Failure::new(
                Kind::Failed,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        // Several bangers started at once (a script's parallel creates)
        // make the key once: the first holds the lock, the others find
        // its key when they get it.
        let lock_path = dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                Failure::new(
                    Kind::Failed,
                    format!("cannot open {}: {e}", lock_path.display()),
                )
            })?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| {
                Failure::new(
                    Kind::Failed,
                    format!("cannot lock {}: {e}", lock_path.display()),
                )
            },
        )?;
        if key.exists() && public.exists() {
            return ssh_key();
        }
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(&public);
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg(format!("banger@{host}"))
            .arg("-f")
            .arg(&key)
            .output()
            .map_err(|e| {
                Failure::new(
                    Kind::Unavailable,
                    format!("cannot run ssh-keygen: {e}; install openssh-client"),
                )
            })?;
        if !out.status.success() {
            return Err(Failure::new(
                Kind::Failed,
                format!(
                    "ssh-keygen failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    let line = std::fs::read_to_string(&public).map_err(|e| {
        Failure::new(
            Kind::Failed,
            format!("cannot read {}: {e}", public.display()),
        )
    })?;
    Ok((key, line.trim().to_owned()))
}

/// The ssh command line for `vm` (without the remote command).
pub fn ssh_args(vm: &VmInfo, key: &std::path::Path, dir: &std::path::Path) -> Vec<String> {
    vec![
        "-i".into(),
        key.to_string_lossy().into_owned(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", dir.join("known_hosts").display()),
        "-o".into(),
        "StrictHostKeyChecking=accept-new".into(),
        "-o".into(),
        format!("HostKeyAlias=banger-{}", vm.id),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        format!("root@{}", vm.ipv4),
    ]
}

/// The remote command line: one argument is a shell command as given;
/// several are an argv, quoted so the remote shell sees each one intact
/// (`banger vm ssh web -- sh -c 'a; b'` runs what it says).
pub fn remote_command(argv: &[String]) -> String {
    if let [one] = argv {
        return one.clone();
    }
    argv.iter()
        .map(|a| {
            let safe = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
            if safe {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `Include`-able ssh_config block for `<name>.vm`.
pub fn ssh_config(dir: &std::path::Path) -> String {
    format!(
        "# banger VMs: add `Include {}` to ~/.ssh/config (or paste this)\n\
         Host *.vm\n\
         \x20 User root\n\
         \x20 IdentityFile {}\n\
         \x20 IdentitiesOnly yes\n\
         \x20 UserKnownHostsFile {}\n\
         \x20 StrictHostKeyChecking accept-new\n",
        dir.join("config").display(),
        dir.join("id_ed25519").display(),
        dir.join("known_hosts").display(),
    )
}

fn vm_json(vm: &VmInfo) -> serde_json::Value {
    serde_json::json!({
        "id": vm.id, "name": vm.name, "state": vm.state, "owner_uid": vm.owner_uid,
        "ipv4": vm.ipv4, "mac": vm.mac, "vcpus": vm.vcpus, "memory_mib": vm.memory_mib,
        "disk_bytes": vm.disk_bytes, "nat": vm.nat, "peers": vm.peers, "autostart": vm.autostart,
        "image": vm.image, "kernel": vm.kernel,
        "unit": vm.unit, "disk_method": vm.disk_method, "created_at_usec": vm.created_at_usec,
        "last_error": vm.last_error, "suspended": vm.suspended, "path": vm.path,
        "snapshots": vm.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "forwards": vm.forwards.iter().map(|(address, host, guest)| serde_json::json!({
            "address": address, "host_port": host, "guest_port": guest,
        })).collect::<Vec<_>>(),
        "mounts": vm.mounts.iter().map(|(source, target, read_only)| serde_json::json!({
            "source": source, "target": target, "read_only": read_only,
        })).collect::<Vec<_>>(),
    })
}

fn snapshot_json((name, created, bytes): &(String, u64, u64)) -> serde_json::Value {
    serde_json::json!({"name": name, "created_at_usec": created, "bytes": bytes})
}

fn vms_table(vms: &[VmInfo], image_name: impl Fn(&str) -> String) -> String {
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "STATE".to_owned(),
        "IPV4".to_owned(),
        "VCPUS".to_owned(),
        "MEMORY".to_owned(),
        "DISK".to_owned(),
        "NAT".to_owned(),
        "IMAGE".to_owned(),
        "ID".to_owned(),
    ]];
    for v in vms {
        rows.push(vec![
            v.name.clone(),
            shown_state(v).to_owned(),
            if v.ipv4.is_empty() {
                "-".into()
            } else {
                v.ipv4.clone()
            },
            v.vcpus.to_string(),
            human_bytes(u64::from(v.memory_mib) << 20),
            human_bytes(v.disk_bytes),
            if v.nat { "yes".into() } else { "no".into() },
            image_name(&v.image),
            v.id[..v.id.len().min(12)].to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == row.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.pop();
    out
}

/// A VM's state as people read it: a stopped VM with its memory saved
/// is `suspended`.
pub fn shown_state(v: &VmInfo) -> &str {
    if v.suspended && v.state == "stopped" {
        "suspended"
    } else {
        &v.state
    }
}

fn vm_human(v: &VmInfo, image: &str, kernel: &str) -> String {
    let mut lines = vec![
        format!("name:        {}", v.name),
        format!("id:          {}", v.id),
        format!("state:       {}", shown_state(v)),
        format!(
            "ipv4:        {}",
            if v.ipv4.is_empty() { "-" } else { &v.ipv4 }
        ),
        format!("dns:         {}.vm", v.name),
        format!(
            "mac:         {}",
            if v.mac.is_empty() { "-" } else { &v.mac }
        ),
        format!("vcpus:       {}", v.vcpus),
        format!(
            "memory:      {}",
            human_bytes(u64::from(v.memory_mib) << 20)
        ),
        format!("work disk:   {}", human_bytes(v.disk_bytes)),
        format!(
            "system disk: {}",
            if v.disk_method.is_empty() {
                "-"
            } else {
                &v.disk_method
            }
        ),
        format!("nat:         {}", if v.nat { "yes" } else { "no" }),
        format!("peers:       {}", if v.peers { "yes" } else { "no" }),
        format!(
            "autostart:   {}",
            if v.autostart { "at host boot" } else { "no" }
        ),
        format!("image:       {image}"),
        format!("kernel:      {kernel}"),
        format!(
            "vmm:         {}",
            if v.unit.is_empty() { "-" } else { &v.unit }
        ),
        format!("owner uid:   {}", v.owner_uid),
        format!("created:     {}", human_time(v.created_at_usec)),
    ];
    if !v.last_error.is_empty() {
        lines.push(format!("last error:  {}", v.last_error));
    }
    for (source, target, read_only) in &v.mounts {
        let how = if *read_only { " (read-only)" } else { "" };
        lines.push(format!("mount:       {source} → {target}{how}"));
    }
    for (address, host, guest) in &v.forwards {
        let at = crate::forward::host_port_text(address, *host);
        lines.push(format!("forward:     {at} → guest port {guest}"));
    }
    if !v.snapshots.is_empty() {
        let names: Vec<&str> = v.snapshots.iter().map(|s| s.0.as_str()).collect();
        lines.push(format!("snapshots:   {}", names.join(", ")));
    }
    lines.join("\n")
}

async fn find(client: &Client, reference: &str) -> Result<VmInfo, Failure> {
    let catalog = client.catalog().await?;
    artifacts::resolve(&catalog.vms, reference, "vm").cloned()
}

/// Run one `banger vm ...` command.
pub async fn run(opts: Options, command: VmCommand) -> anyhow::Result<u8> {
    match command {
        VmCommand::List { all } => list(opts, all).await,
        VmCommand::Show(r) => show(opts, &r.vm).await,
        VmCommand::Create(spec) => create(opts, spec, Stream::Stdout)
            .await
            .map(|(code, ..)| code),
        VmCommand::Run { spec, rm, command } => run_vm(opts, spec, rm, command).await,
        VmCommand::Start(refs) => each_job(opts, VmJob::Start, "start", refs.vms).await,
        VmCommand::Stop(refs) => each_job(opts, VmJob::Stop, "stop", refs.vms).await,
        VmCommand::Restart(refs) => each_job(opts, VmJob::Restart, "restart", refs.vms).await,
        VmCommand::Suspend(refs) => each_job(opts, VmJob::Suspend, "suspend", refs.vms).await,
        VmCommand::Delete(refs) => each_job(opts, VmJob::Delete, "delete", refs.vms).await,
        VmCommand::Kill { refs, signal } => kill(opts, refs.vms, &signal).await,
        VmCommand::Set {
            refs,
            memory,
            vcpus,
            disk_size,
            nat,
            no_nat,
            peers,
            no_peers,
            autostart,
            no_autostart,
            mounts,
            no_mounts,
        } => {
            let switches = Switches {
                nat: (nat || no_nat).then_some(nat),
                peers: (peers || no_peers).then_some(peers),
                autostart: (autostart || no_autostart).then_some(autostart),
            };
            let mounts = (!mounts.is_empty() || no_mounts).then_some(mounts);
            set(opts, refs.vms, memory, vcpus, disk_size, switches, mounts).await
        }
        VmCommand::Stats(r) => stats(opts, &r.vm).await,
        VmCommand::Ssh { vm, command } => {
            let client = connect(opts).await?;
            let info = find(&client, &vm.vm).await?;
            ssh(&info, &command, true, opts)
        }
        VmCommand::Logs { vm, follow } => logs(opts, &vm.vm, follow).await,
        VmCommand::Forward {
            vm,
            background,
            remove,
            ports,
        } => {
            if remove {
                let listens = ports
                    .iter()
                    .map(|p| crate::forward::parse_listen(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = connect(opts).await?;
                let info = find(&client, &vm.vm).await?;
                return crate::forward::remove(opts, &client, &info, listens).await;
            }
            let specs = ports
                .iter()
                .map(|p| crate::forward::Spec::parse(p))
                .collect::<Result<Vec<_>, _>>()?;
            let client = connect(opts).await?;
            let info = find(&client, &vm.vm).await?;
            if background {
                return crate::forward::background(opts, &client, &info, specs).await;
            }
            crate::forward::run(opts, &client, &info.path, &info.name, specs).await
        }
        VmCommand::Cp { src, dst, user } => {
            use crate::cp::{Copy, Place};
            let (vm, copy) = match (Place::parse(&src)?, Place::parse(&dst)?) {
                (Place::Remote { vm, path }, Place::Local(to)) => (
                    vm,
                    Copy::Down {
                        from: path,
                        to: Some(to),
                    },
                ),
                (Place::Remote { vm, path }, Place::Stdio) => (
                    vm,
                    Copy::Down {
                        from: path,
                        to: None,
                    },
                ),
                (Place::Local(from), Place::Remote { vm, path }) => (
                    vm,
                    Copy::Up {
                        from: Some(from),
                        to: path,
                    },
                ),
                (Place::Stdio, Place::Remote { vm, path }) => (
                    vm,
                    Copy::Up {
                        from: None,
                        to: path,
                    },
                ),
                _ => {
                    return Err(Failure::new(
                        Kind::InvalidArgument,
                        "one of SRC and DST must be VM:PATH and the other a local path or -",
                    )
                    .into());
                }
            };
            let client = connect(opts).await?;
            let info = find(&client, &vm).await?;
            crate::cp::run(opts, &client, &info.path, copy, user).await
        }
        VmCommand::Clone {
            source,
            name,
            start,
        } => from_source(opts, &source, FromSource::Clone { name: &name, start }).await,
        VmCommand::Fork {
            source,
            name,
            count,
        } => from_source(opts, &source, FromSource::Fork { name: &name, count }).await,
        VmCommand::Snapshot(command) => snapshot(opts, command).await,
        VmCommand::Restore { vm, snapshot } => snapshot_job(opts, &vm, &snapshot, true).await,
        VmCommand::Exec {
            vm,
            tty,
            env,
            workdir,
            user,
            command,
        } => {
            let options = banger_dbus::options::Exec {
                env,
                workdir,
                user,
                tty,
                ..banger_dbus::options::Exec::default()
            };
            let client = connect(opts).await?;
            let info = find(&client, &vm.vm).await?;
            crate::exec::run(opts, &client, &info.path, command, options).await
        }
    }
}

async fn list(opts: Options, all: bool) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    let me = nix::unistd::getuid().as_raw();
    let vms: Vec<VmInfo> = catalog
        .vms
        .iter()
        .filter(|v| all || me == 0 || v.owner_uid == me)
        .cloned()
        .collect();
    if opts.json {
        emit_json(&vms.iter().map(vm_json).collect::<Vec<_>>())?;
    } else if vms.is_empty() {
        emit("no VMs; create one with `banger vm run`")?;
    } else {
        emit(&vms_table(&vms, |path| {
            catalog
                .images
                .iter()
                .find(|i| i.path == path)
                .map(|i| i.name.clone())
                .unwrap_or_else(|| "-".into())
        }))?;
    }
    Ok(exit::OK)
}

async fn show(opts: Options, reference: &str) -> anyhow::Result<u8> {
    let catalog = connect(opts).await?.catalog().await?;
    let v = artifacts::resolve(&catalog.vms, reference, "vm")?;
    if opts.json {
        emit_json(&vm_json(v))?;
    } else {
        let image = catalog
            .images
            .iter()
            .find(|i| i.path == v.image)
            .map_or("-", |i| i.name.as_str());
        let kernel = catalog
            .kernels
            .iter()
            .find(|k| k.path == v.kernel)
            .map_or("-", |k| k.name.as_str());
        emit(&vm_human(v, image, kernel))?;
    }
    Ok(exit::OK)
}

/// The public keys in `file` (an authorized_keys or `.pub` file): its
/// lines but blank ones and comments. The daemon checks each.
fn public_keys_in(file: &std::path::Path) -> Result<Vec<String>, Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Failure::new(
            Kind::InvalidArgument,
            format!("cannot read the SSH key file {}: {e}", file.display()),
        )
    })?;
    if text.contains("PRIVATE KEY") {
        // Never sent anywhere: the daemon gets public keys only.
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!(
                "{} is a private key; give its .pub file instead",
                file.display()
            ),
        ));
    }
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!(
                "{} holds no public key; give a .pub file or an authorized_keys file",
                file.display()
            ),
        ));
    }
    Ok(keys)
}

/// The setup script at `path`, read as the user (at most 256 KiB).
fn read_setup(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    const MAX: u64 = 256 * 1024;
    let file = std::fs::File::open(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            Kind::NotFound
        } else {
            Kind::Failed
        };
        Failure::new(kind, format!("cannot read {}: {e}", path.display()))
    })?;
    let mut script = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut script)
        .map_err(|e| Failure::new(Kind::Failed, format!("cannot read {}: {e}", path.display())))?;
    if script.len() as u64 > MAX {
        return Err(Failure::new(
            Kind::Limit,
            format!(
                "{} is over 256 KiB; a setup script that large should fetch the rest",
                path.display()
            ),
        ));
    }
    if script.is_empty() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(script)
}

/// Create (and normally start) a VM, following the job, its progress on
/// `stream`. Returns the exit code, the VM's object path and its name
/// (a readable random one when `spec` has none).
async fn create(
    opts: Options,
    spec: VmSpec,
    stream: Stream,
) -> anyhow::Result<(u8, Option<String>, String)> {
    let (_, public) = ssh_key()?;
    let mut ssh_keys = vec![public.clone()];
    for file in &spec.ssh_keys {
        ssh_keys.extend(public_keys_in(file)?);
    }
    let disk_bytes = spec.disk_size.as_deref().map(parse_size).transpose()?;
    let setup = spec.setup.as_deref().map(read_setup).transpose()?;
    let options = banger_dbus::options::CreateVm {
        vcpus: spec.vcpus,
        memory_mib: spec.memory,
        disk_bytes,
        nat: spec.nat.then_some(true),
        peers: spec.peers.then_some(true),
        autostart: spec.autostart.then_some(true),
        ssh_keys,
        start: !spec.no_start,
        setup,
        mounts: spec.mounts.clone(),
        cold_boot: spec.cold_boot,
    };
    let client = connect(opts).await?;
    // Without a name: a readable one no VM the caller sees has (another
    // draw if the daemon still finds it taken).
    let chosen = spec.name.clone();
    let generated = chosen.is_none();
    let mut taken: Vec<String> = if generated {
        client
            .catalog()
            .await?
            .vms
            .into_iter()
            .map(|v| v.name)
            .collect()
    } else {
        Vec::new()
    };
    let fresh = |taken: &[String]| {
        let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
        crate::names::random(&taken)
    };
    let mut name = chosen.unwrap_or_else(|| fresh(&taken));
    // The daemon is given the image's id; a name no image has yet goes as
    // it is, so a NotFound can pull it from the catalog.
    let image = match spec.image.as_deref() {
        None => String::new(),
        Some(reference) => match crate::session::image_id(&client, reference).await {
            Ok(id) => id,
            Err(f) if f.kind() == Kind::NotFound => reference.to_owned(),
            Err(f) => return Err(f.into()),
        },
    };
    let image = image.as_str();
    let mut subscription = Subscription::new(&client).await?;
    let mut started = Instant::now();
    let (client_ref, options_ref) = (&client, &options);
    let attempt = |name: String| async move {
        let (client, options) = (client_ref, options_ref);
        let auth = Authorization::prepare(opts).await;
        let result = client
            .create_vm(&name, image, options, auth.interaction)
            .await;
        auth.finish(result).await
    };
    let mut created = attempt(name.clone()).await;
    for _ in 0..3 {
        match &created {
            Err(f) if generated && f.name().ends_with(".AlreadyExists") => {
                taken.push(std::mem::take(&mut name));
                name = fresh(&taken);
                created = attempt(name.clone()).await;
            }
            _ => break,
        }
    }
    let created = match created {
        // A missing image the catalog has is pulled (one with a recipe
        // here is built), then the create is tried again.
        Err(f) if f.kind() == Kind::NotFound => {
            if fetch_missing_image(opts, &client, &mut subscription, image, stream).await? {
                started = Instant::now();
                attempt(name.clone()).await
            } else {
                Err(f)
            }
        }
        other => other,
    };
    let (vm, job) = created.with_context(|| format!("cannot create vm {name}"))?;
    let display = Display::for_stream(opts.json, stream);
    if display != Display::Quiet {
        stream.write(
            format!(
                "creating vm {name} (job {}; Ctrl-C cancels it)\n",
                progress::job_label(job.as_str())
            )
            .as_bytes(),
        )?;
    }
    let tracker = Tracker::new(job.as_str(), display, Vec::new()).on(stream);
    let code = follow_and_report(&client, &mut subscription, &job, tracker, started, opts).await?;
    Ok((code, Some(vm.to_string()), name))
}

/// `banger vm snapshot ...`.
async fn snapshot(opts: Options, command: SnapshotCommand) -> anyhow::Result<u8> {
    match command {
        SnapshotCommand::Create { vm, name } => snapshot_job(opts, &vm, &name, false).await,
        SnapshotCommand::List { vm } => {
            let client = connect(opts).await?;
            let info = find(&client, &vm).await?;
            if opts.json {
                emit_json(&info.snapshots.iter().map(snapshot_json).collect::<Vec<_>>())?;
            } else if info.snapshots.is_empty() {
                emit(&format!(
                    "vm {} has no snapshots; make one with `banger vm snapshot create {} NAME`",
                    info.name, info.name
                ))?;
            } else {
                let rows: Vec<Vec<String>> = info
                    .snapshots
                    .iter()
                    .map(|(name, created, bytes)| {
                        vec![name.clone(), human_time(*created), human_bytes(*bytes)]
                    })
                    .collect();
                emit(&artifacts::table(&["NAME", "CREATED", "SIZE"], &rows))?;
            }
            Ok(crate::exit::OK)
        }
        SnapshotCommand::Delete { vm, name } => {
            let client = connect(opts).await?;
            let info = find(&client, &vm).await?;
            let auth = Authorization::prepare(opts).await;
            let result = client
                .vm_delete_snapshot(&info.path, &name, auth.interaction)
                .await;
            auth.finish(result)
                .await
                .with_context(|| format!("cannot delete snapshot {name} of vm {}", info.name))?;
            if !opts.json {
                emit(&format!("deleted snapshot {name} of vm {}", info.name))?;
            }
            Ok(crate::exit::OK)
        }
    }
}

/// Make (or with `restore`, restore) snapshot `name` of `vm`, following
/// the job.
async fn snapshot_job(opts: Options, vm: &str, name: &str, restore: bool) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let info = find(&client, vm).await?;
    let mut subscription = Subscription::new(&client).await?;
    let started = Instant::now();
    let auth = Authorization::prepare(opts).await;
    let result = client
        .vm_snapshot(&info.path, name, restore, auth.interaction)
        .await;
    let doing = if restore { "restore" } else { "make" };
    let job = auth
        .finish(result)
        .await
        .with_context(|| format!("cannot {doing} snapshot {name} of vm {}", info.name))?;
    let display = Display::for_stream(opts.json, Stream::Stdout);
    if display != Display::Quiet {
        let what = if restore {
            "restoring vm"
        } else {
            "snapshotting vm"
        };
        emit(&format!(
            "{what} {} {} {name} (job {}; Ctrl-C cancels it)",
            info.name,
            if restore { "from" } else { "as" },
            progress::job_label(job.as_str())
        ))?;
    }
    let tracker = Tracker::new(job.as_str(), display, Vec::new()).on(Stream::Stdout);
    follow_and_report(&client, &mut subscription, &job, tracker, started, opts).await
}

/// A new VM (or several) made from a source VM.
#[derive(Debug, Clone, Copy)]
enum FromSource<'a> {
    /// `banger vm clone SRC NEW [--start]`.
    Clone { name: &'a str, start: bool },
    /// `banger vm fork SRC NEW [--count N]`.
    Fork { name: &'a str, count: u32 },
}

/// `banger vm clone` and `banger vm fork`: start the job on `source`
/// and follow it like a create.
async fn from_source(opts: Options, source: &str, what: FromSource<'_>) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let src = find(&client, source).await?;
    let mut subscription = Subscription::new(&client).await?;
    let started = Instant::now();
    let auth = Authorization::prepare(opts).await;
    let (result, verb, ing, names) = match what {
        FromSource::Clone { name, start } => (
            client
                .vm_clone(&src.path, name, start, auth.interaction)
                .await
                .map(|(_, job)| job),
            "clone",
            "cloning",
            name.to_owned(),
        ),
        FromSource::Fork { name, count } => (
            client
                .vm_fork(&src.path, name, count, auth.interaction)
                .await
                .map(|(_, job)| job),
            "fork",
            "forking",
            if count > 1 {
                format!("{name}-1 … {name}-{count}")
            } else {
                name.to_owned()
            },
        ),
    };
    let job = auth
        .finish(result)
        .await
        .with_context(|| format!("cannot {verb} vm {} as {names}", src.name))?;
    let display = Display::for_stream(opts.json, Stream::Stdout);
    if display != Display::Quiet {
        emit(&format!(
            "{ing} vm {} as {names} (job {}; Ctrl-C cancels it)",
            src.name,
            progress::job_label(job.as_str())
        ))?;
    }
    let tracker = Tracker::new(job.as_str(), display, Vec::new()).on(Stream::Stdout);
    follow_and_report(&client, &mut subscription, &job, tracker, started, opts).await
}

/// After a create failed with NotFound: bring `image` ("" for the
/// configured default): pull it from the catalog, or, where no catalog
/// has it, build it here from its recipe (its kernel too); the job is
/// followed. False when neither can (not in the catalog and no recipe, or
/// the image is there and something else was missing).
async fn fetch_missing_image(
    opts: Options,
    client: &Client,
    subscription: &mut Subscription,
    image: &str,
    stream: Stream,
) -> anyhow::Result<bool> {
    let what = if image.is_empty() {
        "the default image"
    } else {
        image
    };
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    let result = client.pull(true, image, auth.interaction).await;
    let (job, how, later, doing) = match auth.finish(result).await {
        Ok(job) => (job, "pulling it from the catalog", "", "pull"),
        Err(f) if f.kind() == Kind::InvalidArgument => return Ok(false),
        Err(f) if f.kind() == Kind::NotFound => {
            let auth = Authorization::prepare(opts).await;
            let result = client
                .build_image(image, None, None, auth.interaction)
                .await;
            match auth.finish(result).await {
                Ok(job) => (
                    job,
                    "no catalog has it, so it is built here from its recipe",
                    "; minutes the first time, seconds later",
                    "build",
                ),
                Err(f) if matches!(f.kind(), Kind::NotFound | Kind::InvalidArgument) => {
                    return Ok(false);
                }
                Err(f) => {
                    return Err(f).context(format!("{what} is missing and building it failed"));
                }
            }
        }
        Err(f) => return Err(f).context(format!("{what} is missing and pulling it failed")),
    };
    let display = Display::for_stream(opts.json, stream);
    if display != Display::Quiet {
        stream.write(
            format!(
                "{what} is not here: {how} (job {}{later})\n",
                progress::job_label(job.as_str())
            )
            .as_bytes(),
        )?;
    }
    let mut tracker = Tracker::new(job.as_str(), display, Vec::new()).on(stream);
    let followed = progress::follow(
        client,
        subscription,
        &job,
        &mut tracker,
        started,
        opts.verbose,
    )
    .await?;
    match followed {
        Followed::Completed(report) => match report.failure() {
            Some(f) => Err(anyhow::Error::from(f).context(format!("cannot {doing} {what}"))),
            None => Ok(true),
        },
        Followed::Interrupted { .. } => Err(Failure::new(
            Kind::Failed,
            format!("interrupted while {what} was being made ({doing})"),
        )
        .into()),
    }
}

async fn run_vm(opts: Options, spec: VmSpec, rm: bool, command: Vec<String>) -> anyhow::Result<u8> {
    // With a command, stdout is the command's: progress goes to stderr.
    let stream = if command.is_empty() {
        Stream::Stdout
    } else {
        Stream::Stderr
    };
    let (code, vm, name) = create(opts, spec, stream).await?;
    if code != exit::OK {
        return Ok(code);
    }
    let client = connect(opts).await?;
    let info = match vm {
        Some(path) => client
            .catalog()
            .await?
            .vms
            .into_iter()
            .find(|v| v.path == path)
            .ok_or_else(|| Failure::new(Kind::NotFound, format!("vm {name} vanished")))?,
        None => find(&client, &name).await?,
    };
    let code = ssh(&info, &command, !rm, opts);
    if rm {
        remove(&client, &info, opts)
            .await
            .with_context(|| format!("cannot delete vm {name}: `banger vm delete {name}`"))?;
    }
    code
}

/// Delete `vm` quietly (`vm run --rm`), saying so on stderr.
async fn remove(client: &Client, vm: &VmInfo, opts: Options) -> anyhow::Result<()> {
    let mut subscription = Subscription::new(client).await?;
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    let result = client
        .vm_job(&vm.path, VmJob::Delete, auth.interaction)
        .await;
    let job = auth.finish(result).await?;
    let mut tracker = Tracker::new(job.as_str(), Display::Quiet, Vec::new());
    let followed = progress::follow(
        client,
        &mut subscription,
        &job,
        &mut tracker,
        started,
        opts.verbose,
    )
    .await?;
    match followed {
        Followed::Completed(report) => match report.failure() {
            Some(f) => Err(f.into()),
            None => {
                if !opts.json {
                    eprintln!("banger: deleted vm {}", vm.name);
                }
                Ok(())
            }
        },
        Followed::Interrupted { .. } => Err(Failure::new(
            Kind::Failed,
            format!("interrupted while vm {} was being deleted", vm.name),
        )
        .into()),
    }
}

/// Run the user's ssh to `vm`; its exit code is ours.
fn ssh(vm: &VmInfo, command: &[String], remind: bool, opts: Options) -> anyhow::Result<u8> {
    if vm.state != "running" {
        return Err(Failure::new(
            Kind::Busy,
            format!(
                "vm {} is {}: start it with `banger vm start {}`",
                vm.name, vm.state, vm.name
            ),
        )
        .into());
    }
    let (key, _) = ssh_key()?;
    let dir = ssh_dir()?;
    let mut args = ssh_args(vm, &key, &dir);
    let interactive = command.is_empty();
    if !interactive {
        args.push("--".into());
        args.push(remote_command(command));
    }
    if opts.verbose > 0 {
        eprintln!("banger: ssh {}", args.join(" "));
    }
    let status = std::process::Command::new("ssh")
        .args(&args)
        .status()
        .map_err(|e| {
            Failure::new(
                Kind::Unavailable,
                format!("cannot run ssh: {e}; install openssh-client"),
            )
        })?;
    if interactive && remind {
        eprintln!(
            "banger: vm {} is still running; `banger vm stop {}` stops it",
            vm.name, vm.name
        );
    }
    Ok(status
        .code()
        .map_or(exit::FAILURE, |c| c.clamp(0, 255) as u8))
}

/// How many jobs a command on several VMs keeps in flight at once.
const IN_FLIGHT: usize = 16;

/// One VM of a command on several: its position among the VMs named, the
/// name, its job and how that ended.
/// `Ok(Some(state))`: nothing to do, the VM is in that state already.
type BatchResult = (
    usize,
    String,
    Option<OwnedObjectPath>,
    Result<Option<&'static str>, String>,
);

/// The state a VM in `state` is in already when asked to `job`: a stop
/// of a stopped VM, or a start of a running one, is done without a job
/// (as `systemctl stop` of a stopped unit is), in one command or many.
fn done_already(job: VmJob, vm: &VmInfo) -> Option<&'static str> {
    match (job, vm.state.as_str(), vm.suspended) {
        // A stop of a suspended VM drops its saved memory.
        (VmJob::Stop, "stopped", false) => Some("stopped"),
        (VmJob::Suspend, "stopped", true) => Some("suspended"),
        (VmJob::Start, "running", _) => Some("running"),
        _ => None,
    }
}

/// Start one job per VM (they run concurrently in bangerd) and follow
/// them; with one VM, live stage lines, with several, a result line each.
async fn each_job(opts: Options, job: VmJob, verb: &str, refs: Vec<String>) -> anyhow::Result<u8> {
    use futures_util::StreamExt;

    let client = connect(opts).await?;
    let catalog = client.catalog().await?;
    let auth = Authorization::prepare(opts).await;
    let started = Instant::now();
    if let [r] = refs.as_slice() {
        let resolved = artifacts::resolve(&catalog.vms, r, "vm");
        if let Ok(vm) = &resolved
            && let Some(already) = done_already(job, vm)
        {
            let _ = auth.finish(Ok::<_, Failure>(())).await;
            if opts.json {
                emit_json(&serde_json::json!({ "ref": r, "ok": true, "already": already }))?;
            } else {
                emit(&format!("{r}: {already} already"))?;
            }
            return Ok(exit::OK);
        }
        let mut subscription = Subscription::new(&client).await?;
        let result = match resolved {
            Ok(vm) => client.vm_job(&vm.path, job, auth.interaction).await,
            Err(f) => Err(f),
        };
        let _ = auth.finish(Ok::<_, Failure>(())).await;
        let job = result.with_context(|| format!("cannot {verb} vm {r}"))?;
        let display = Display::for_stdout(opts.json);
        let tracker = Tracker::new(job.as_str(), display, Vec::new());
        return follow_and_report(&client, &mut subscription, &job, tracker, started, opts).await;
    }
    // Several: a bounded number at a time, each started and followed
    // quietly, one line as each ends, then a summary.
    let interaction = auth.interaction;
    let one = |(i, r): (usize, String)| {
        let (client, catalog) = (client.clone(), &catalog);
        async move {
            let mut sub = match Subscription::new(&client).await {
                Ok(s) => s,
                Err(f) => return (i, r, None, Err(f.to_string())),
            };
            let started_job = match artifacts::resolve(&catalog.vms, &r, "vm") {
                Ok(vm) => match done_already(job, vm) {
                    Some(already) => return (i, r, None, Ok(Some(already))),
                    None => client.vm_job(&vm.path, job, interaction).await,
                },
                Err(f) => Err(f),
            };
            let job = match started_job {
                Ok(job) => job,
                Err(f) => return (i, r, None, Err(f.to_string())),
            };
            let mut tracker = Tracker::new(job.as_str(), Display::Quiet, Vec::new());
            let result =
                match progress::follow(&client, &mut sub, &job, &mut tracker, started, 0).await {
                    Ok(Followed::Completed(report)) => match report.failure() {
                        None => Ok(None),
                        Some(f) => Err(f.to_string()),
                    },
                    Ok(Followed::Interrupted { .. }) => Err("interrupted".into()),
                    Err(f) => Err(f.to_string()),
                };
            (i, r, Some(job), result)
        }
    };
    let mut results: Vec<BatchResult> =
        futures_util::stream::iter(refs.iter().cloned().enumerate())
            .map(one)
            .buffer_unordered(IN_FLIGHT)
            .inspect(|(_, r, _, result)| {
                if opts.json {
                    return;
                }
                match result {
                    Ok(None) => {
                        let _ = emit(&format!("{r}: {verb} done"));
                    }
                    Ok(Some(already)) => {
                        let _ = emit(&format!("{r}: {already} already"));
                    }
                    Err(e) => eprintln!("error: {r}: cannot {verb}: {e}"),
                }
            })
            .collect()
            .await;
    let _ = auth.finish(Ok::<_, Failure>(())).await;
    let failed = results.iter().filter(|(.., r)| r.is_err()).count();
    if opts.json {
        // In the order the VMs were named.
        results.sort_by_key(|(i, ..)| *i);
        let json: Vec<_> = results
            .iter()
            .map(|(_, r, job, result)| {
                serde_json::json!({
                    "ref": r,
                    "ok": result.is_ok(),
                    "job": job.as_ref().map(|j| j.as_str()),
                    "already": result.as_ref().ok().copied().flatten(),
                    "error": result.as_ref().err(),
                })
            })
            .collect();
        emit_json(&json)?;
    } else if failed == 0 {
        emit(&format!(
            "{verb}: {} of {} VMs done",
            results.len(),
            results.len()
        ))?;
    } else {
        eprintln!(
            "{verb}: {} of {} VMs done, {failed} failed",
            results.len() - failed,
            results.len()
        );
    }
    Ok(if failed > 0 { exit::FAILURE } else { exit::OK })
}

fn signal_number(name: &str) -> Result<i32, Failure> {
    if let Ok(n) = name.parse::<i32>() {
        return Ok(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| {
            Failure::new(
                Kind::InvalidArgument,
                format!("{name:?} is not a signal: give a name like TERM or KILL, or a number"),
            )
        })
}

async fn kill(opts: Options, refs: Vec<String>, signal: &str) -> anyhow::Result<u8> {
    let number = signal_number(signal)?;
    call_each(opts, &refs, VmChange::Kill(number), |r| {
        if opts.json {
            Ok(())
        } else {
            emit(&format!("{r}: sent signal {signal}"))
        }
    })
    .await
}

/// Call `method` with `body` on each VM in `refs`, one after the other:
/// `done` reports a success, a failure is a line on stderr. The exit code
/// is the last failure's, or OK.
async fn call_each(
    opts: Options,
    refs: &[String],
    change: VmChange<'_>,
    done: impl Fn(&str) -> std::io::Result<()>,
) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let catalog = client.catalog().await?;
    let auth = Authorization::prepare(opts).await;
    let mut worst = None;
    for r in refs {
        let result = match artifacts::resolve(&catalog.vms, r, "vm") {
            Ok(vm) => client.vm_change(&vm.path, change, auth.interaction).await,
            Err(f) => Err(f),
        };
        match result {
            Ok(()) => done(r)?,
            Err(f) => {
                eprintln!("error: {r}: {f}");
                worst = Some(f);
            }
        }
    }
    let _ = auth.finish(Ok::<_, Failure>(())).await;
    Ok(worst.map_or(exit::OK, |f| f.kind().code()))
}

/// The network switches `vm set` turns on (`Some(true)`) or off.
#[derive(Debug, Clone, Copy)]
struct Switches {
    nat: Option<bool>,
    peers: Option<bool>,
    autostart: Option<bool>,
}

async fn set(
    opts: Options,
    refs: Vec<String>,
    memory: Option<u32>,
    vcpus: Option<u32>,
    disk_size: Option<String>,
    switches: Switches,
    mounts: Option<Vec<banger_dbus::options::Mount>>,
) -> anyhow::Result<u8> {
    let changes = banger_dbus::options::SetVm {
        vcpus,
        memory_mib: memory,
        disk_bytes: disk_size.as_deref().map(parse_size).transpose()?,
        nat: switches.nat,
        peers: switches.peers,
        autostart: switches.autostart,
        mounts,
    };
    if changes.is_empty() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "nothing to change: give --memory, --vcpus, --disk-size, --mount, --no-mounts, --nat, --no-nat, --peers, --no-peers, --autostart or --no-autostart",
        )
        .into());
    }
    call_each(opts, &refs, VmChange::Set(&changes), |r| {
        emit(&format!("{r}: changed"))
    })
    .await
}

async fn stats(opts: Options, reference: &str) -> anyhow::Result<u8> {
    let client = connect(opts).await?;
    let vm = find(&client, reference).await?;
    let stats = client.vm_stats(&vm.path).await?;
    let u = |k: &str| {
        stats
            .get(k)
            .and_then(|v| v.try_clone().ok())
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0)
    };
    let s = |k: &str| {
        stats
            .get(k)
            .and_then(|v| v.try_clone().ok())
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_default()
    };
    let uptime = stats
        .get("uptime_secs")
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| f64::try_from(v).ok())
        .unwrap_or(0.0);
    let disks: Vec<(String, u64, u64)> = stats
        .get("guest_disks")
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| Vec::<(String, u64, u64)>::try_from(v).ok())
        .unwrap_or_default();
    let (mem_total, mem_available) = (
        u("guest_memory_total_bytes"),
        u("guest_memory_available_bytes"),
    );
    if opts.json {
        let disks: Vec<_> = disks
            .iter()
            .map(|(path, total, used)| {
                serde_json::json!({"path": path, "total_bytes": total, "used_bytes": used})
            })
            .collect();
        emit_json(&serde_json::json!({
            "cpu_usec": u("cpu_usec"), "rss_bytes": u("rss_bytes"), "uptime_secs": uptime,
            "guest_kernel": s("guest_kernel"), "guest_hostname": s("guest_hostname"),
            "guest_memory_total_bytes": mem_total,
            "guest_memory_available_bytes": mem_available,
            "guest_disks": disks,
        }))?;
    } else {
        let mut guest = Vec::new();
        if mem_total > 0 {
            guest.push(format!(
                "guest mem: {} used of {}",
                human_bytes(mem_total.saturating_sub(mem_available)),
                human_bytes(mem_total)
            ));
        }
        for (path, total, used) in &disks {
            guest.push(format!(
                "disk {path:<5} {} used of {}",
                human_bytes(*used),
                human_bytes(*total)
            ));
        }
        let guest = guest.iter().map(|l| format!("\n{l}")).collect::<String>();
        emit(&format!(
            "vm:        {}\nuptime:    {}\ncpu time:  {}\nmemory:    {} resident\nguest:     {} ({}){guest}",
            vm.name,
            progress::format_duration((uptime * 1e6) as u64),
            progress::format_duration(u("cpu_usec")),
            human_bytes(u("rss_bytes")),
            if s("guest_hostname").is_empty() {
                "-".to_owned()
            } else {
                s("guest_hostname")
            },
            if s("guest_kernel").is_empty() {
                "agent not answering".to_owned()
            } else {
                s("guest_kernel")
            },
        ))?;
    }
    Ok(exit::OK)
}

async fn logs(opts: Options, reference: &str, follow: bool) -> anyhow::Result<u8> {
    use std::io::Write;
    let client = connect(opts).await?;
    let vm = find(&client, reference).await?;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let (data, next) = client.vm_console_log(&vm.path, offset).await?;
        if !data.is_empty() && out.write_all(&data).and_then(|()| out.flush()).is_err() {
            return Ok(exit::OK);
        }
        let more = next > offset && data.len() == 1 << 20;
        offset = next;
        if more {
            continue;
        }
        if !follow {
            return Ok(exit::OK);
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// `banger ssh-config`.
pub fn print_ssh_config() -> anyhow::Result<u8> {
    let dir = ssh_dir()?;
    let _ = ssh_key()?;
    let text = ssh_config(&dir);
    let _ = std::fs::write(dir.join("config"), &text);
    emit(text.trim_end())?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_in(state: &str, suspended: bool) -> VmInfo {
        VmInfo {
            state: state.into(),
            suspended,
            ..test_vm()
        }
    }

    #[test]
    fn only_a_stop_of_a_stopped_vm_or_a_start_of_a_running_one_is_done_already() {
        let done = |job, state| done_already(job, &vm_in(state, false));
        assert_eq!(done(VmJob::Stop, "stopped"), Some("stopped"));
        assert_eq!(done(VmJob::Start, "running"), Some("running"));
        // In between, the daemon decides (and says what to wait for).
        for state in ["starting", "stopping", "creating", "deleting", "running"] {
            assert_eq!(done(VmJob::Stop, state), None, "{state}");
            assert_eq!(done(VmJob::Suspend, state), None, "{state}");
        }
        for state in ["starting", "stopping", "stopped"] {
            assert_eq!(done(VmJob::Start, state), None, "{state}");
        }
        assert_eq!(done(VmJob::Restart, "stopped"), None);
        assert_eq!(done(VmJob::Delete, "stopped"), None);
        // A stopped VM is suspended only when its memory is saved; a
        // stop of a suspended one drops that memory, so it is asked.
        assert_eq!(done(VmJob::Suspend, "stopped"), None);
        let suspended = vm_in("stopped", true);
        assert_eq!(done_already(VmJob::Suspend, &suspended), Some("suspended"));
        assert_eq!(done_already(VmJob::Stop, &suspended), None);
        assert_eq!(done_already(VmJob::Start, &suspended), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G").ok(), Some(8 << 30));
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("2t").ok(), Some(2 << 40));
        for bad in ["", "G", "-1G", "1.5G", "99999999999T", "8X"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_commands_keep_their_arguments() {
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(remote_command(&argv(&["ls -la /"])), "ls -la /");
        assert_eq!(remote_command(&argv(&["uname", "-a"])), "uname -a");
        assert_eq!(
            remote_command(&argv(&["sh", "-c", "echo 'hi'; id"])),
            "sh -c 'echo '\\''hi'\\''; id'"
        );
        assert_eq!(remote_command(&argv(&["echo", ""])), "echo ''");
    }

    #[test]
    fn signals() {
        assert_eq!(signal_number("KILL").ok(), Some(9));
        assert_eq!(signal_number("sigterm").ok(), Some(15));
        assert_eq!(signal_number("2").ok(), Some(2));
        assert!(signal_number("NOPE").is_err());
    }

    fn test_vm() -> VmInfo {
        VmInfo {
            path: "/p".into(),
            id: "abcdef0123456789".into(),
            name: "web".into(),
            state: "running".into(),
            owner_uid: 0,
            ipv4: "10.0.0.2".into(),
            mac: String::new(),
            vcpus: 1,
            memory_mib: 256,
            disk_bytes: 0,
            nat: false,
            peers: false,
            autostart: false,
            image: String::new(),
            kernel: String::new(),
            unit: String::new(),
            disk_method: String::new(),
            created_at_usec: 0,
            last_error: String::new(),
            snapshots: Vec::new(),
            forwards: Vec::new(),
            mounts: Vec::new(),
            suspended: false,
        }
    }

    #[test]
    fn ssh_arguments_pin_the_host_key_to_the_vm() {
        let vm = test_vm();
        let a = ssh_args(
            &vm,
            std::path::Path::new("/k/id"),
            std::path::Path::new("/k"),
        )
        .join(" ");
        assert!(a.contains("HostKeyAlias=banger-abcdef0123456789"), "{a}");
        assert!(a.contains("UserKnownHostsFile=/k/known_hosts"), "{a}");
        assert!(a.ends_with("root@10.0.0.2"), "{a}");
        let c = ssh_config(std::path::Path::new("/k"));
        assert!(
            c.contains("Host *.vm") && c.contains("IdentityFile /k/id_ed25519"),
            "{c}"
        );
        let t = vms_table(&[vm], |_| "tiny".into());
        assert!(t.starts_with("NAME"), "{t}");
        assert!(
            t.contains("web") && t.contains("tiny") && t.contains("256 MiB"),
            "{t}"
        );
    }
}
