//! QEMU's `microvm` machine: virtio-mmio block and net devices, the agent
//! on a virtio-serial port, QMP on a unix socket for status and powerdown.
//! Used where Firecracker is absent or KVM is unusable (`accel = "tcg"`).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Accel, LaunchSpec, Saved, StateFds, Vmm, exited_at_start, kill_failed, start_process};
use crate::BoxFuture;
use crate::VmPaths;
use crate::jail::{Access, Jail, Pass, Source, VMM_GROUP};
use crate::process::{ProcessId, Watched};
use crate::supervise::{Launcher, Supervisor};
use banger_agent_host::AgentEndpoint;
use banger_error::{Error, Result};

/// The virtio-serial port name the agent listens on.
pub const AGENT_PORT: &str = "org.banger.agent";

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A QEMU option value with its commas doubled (QEMU's escape).
fn esc(p: &Path) -> String {
    path(p).replace(',', ",,")
}

/// The descriptors of a jailed QEMU ([`crate::jail`]): its disks (each
/// read-write and read-only in one fd set, as QEMU opens an image both
/// ways), the console log, the QMP and agent sockets, the TAP.
mod fds {
    pub const SYSTEM: (i32, i32, u32) = (3, 4, 1);
    pub const WORK: (i32, i32, u32) = (5, 6, 2);
    pub const CONSOLE: (i32, u32) = (7, 3);
    pub const QMP: i32 = 8;
    pub const AGENT: i32 = 9;
    pub const TAP: i32 = 10;
    /// The first host folder's connected socket; the rest follow.
    pub const FOLDERS: i32 = 11;
}

impl Qemu {
    /// The command line for `spec`, QEMU opening its files itself.
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
        self.command(spec, false).1
    }

    /// The command line for `spec` in a jail that hands QEMU every file
    /// and socket as a descriptor, and what the jail opens.
    pub fn jailed_args(&self, spec: &LaunchSpec) -> (Vec<Pass>, Vec<String>) {
        self.command(spec, true)
    }

    fn command(&self, spec: &LaunchSpec, jailed: bool) -> (Vec<Pass>, Vec<String>) {
        let p = &spec.paths;
        let mut passes: Vec<Pass> = Vec::new();
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
        let mut pass = |fd: i32, source: Source| passes.push(Pass { fd, source });
        let (accel, cpu) = match spec.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        // Host folders need the guest's memory shared with virtiofsd (a
        // memfd) and virtio-mmio devices in their modern (version 2) form.
        let machine = if spec.shares.is_empty() {
            "microvm"
        } else {
            "microvm,memory-backend=mem"
        };
        push(&[
            "-name", "banger", "-M", machine, "-accel", accel, "-cpu", cpu,
        ]);
        if !spec.shares.is_empty() {
            push(&[
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    spec.memory_mib
                ),
                "-global",
                "virtio-mmio.force-legacy=false",
            ]);
        }
        push(&[
            "-m",
            &spec.memory_mib.to_string(),
            "-smp",
            &spec.vcpus.to_string(),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // QEMU's own seccomp filter: no obsolete system calls, no setuid
        // and friends, no new processes, no scheduler or affinity
        // changes. A device model taken over by the guest, or anyone on
        // the QMP socket (`migrate exec:`), cannot start a program.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&["-kernel", &path(&spec.kernel)]);
        if let Some(initrd) = &spec.initrd {
            push(&["-initrd", &path(initrd)]);
        }
        push(&["-append", &spec.cmdline]);
        // A descriptor in an fd set, labelled with the path it came from.
        let add_fd = |fd: i32, set: u32, from: &Path| {
            [
                "-add-fd".to_owned(),
                format!("fd={fd},set={set},opaque={}", esc(from)),
            ]
        };
        let console = if jailed {
            let (fd, set) = fds::CONSOLE;
            pass(
                fd,
                Source::File {
                    path: p.console_log.clone(),
                    access: Access::Append,
                },
            );
            a.extend(add_fd(fd, set, &p.console_log));
            format!("/dev/fdset/{set}")
        } else {
            esc(&p.console_log)
        };
        a.extend([
            "-chardev".to_owned(),
            format!("file,id=console,path={console},append=on"),
            "-serial".to_owned(),
            "chardev:console".to_owned(),
        ]);
        for (id, disk, (rw, ro, set)) in [
            ("system", &spec.system_disk, fds::SYSTEM),
            ("work", &p.work_disk, fds::WORK),
        ] {
            let file = if jailed {
                for (fd, access) in [(rw, Access::ReadWrite), (ro, Access::Read)] {
                    pass(
                        fd,
                        Source::File {
                            path: disk.clone(),
                            access,
                        },
                    );
                    a.extend(add_fd(fd, set, disk));
                }
                format!("/dev/fdset/{set}")
            } else {
                esc(disk)
            };
            // A jailed QEMU's fd sets keep every descriptor open, and with
            // them the image locks of the one it let go of: after a
            // migration, `cont` could not take its write lock back. Only
            // this VMM opens these files; bangerd makes sure of that.
            let locking = if jailed { ",file.locking=off" } else { "" };
            a.extend([
                "-drive".to_owned(),
                format!("id={id},file={file},format=raw,if=none,discard=unmap{locking}"),
                "-device".to_owned(),
                format!("virtio-blk-device,drive={id}"),
            ]);
        }
        if let Some((tap, mac)) = &spec.net {
            let netdev = if jailed {
                pass(fds::TAP, Source::Tap { name: tap.clone() });
                format!("tap,id=net0,fd={}", fds::TAP)
            } else {
                format!("tap,id=net0,ifname={tap},script=no,downscript=no")
            };
            a.extend([
                "-netdev".to_owned(),
                netdev,
                "-device".to_owned(),
                format!("virtio-net-device,netdev=net0,mac={mac}"),
            ]);
        }
        for (i, share) in spec.shares.iter().enumerate() {
            let chardev = if jailed {
                let fd = fds::FOLDERS + i32::try_from(i).unwrap_or(i32::MAX - fds::FOLDERS);
                pass(
                    fd,
                    Source::Connect {
                        path: share.socket.clone(),
                    },
                );
                format!("fd={fd}")
            } else {
                format!("path={}", esc(&share.socket))
            };
            a.extend([
                "-chardev".to_owned(),
                format!("socket,id=fs{i},{chardev}"),
                "-device".to_owned(),
                format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
            ]);
        }
        // The sockets: bound by the jail and handed over listening, or
        // made by QEMU.
        let mut socket = |fd: i32, at: &Path| {
            if jailed {
                pass(
                    fd,
                    Source::Listen {
                        path: at.to_owned(),
                    },
                );
                format!("fd={fd}")
            } else {
                format!("path={}", esc(at))
            }
        };
        let agent = socket(fds::AGENT, &p.agent_socket);
        let qmp = socket(fds::QMP, &p.control_socket);
        a.extend([
            "-device".to_owned(),
            "virtio-serial-device".to_owned(),
            "-chardev".to_owned(),
            format!("socket,id=agent,{agent},server=on,wait=off"),
            "-device".to_owned(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            "-chardev".to_owned(),
            format!("socket,id=qmp,{qmp},server=on,wait=off"),
            "-mon".to_owned(),
            "chardev=qmp,mode=control".to_owned(),
            // Randomness from the host (QEMU's getrandom): the guest's
            // pool fills at boot, and again after a restore.
            "-object".to_owned(),
            "rng-builtin,id=rng0".to_owned(),
            "-device".to_owned(),
            "virtio-rng-device,rng=rng0".to_owned(),
        ]);
        // The guest's state arrives over QMP ([`Qemu::restore`]), from a
        // descriptor bangerd passes: QEMU opens nothing for it.
        if spec.incoming {
            a.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        (passes, a)
    }
}

/// A QMP session: greeting read, capabilities negotiated.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connect to `socket` and negotiate, within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let fail = |e: String| Error::failed(format!("qmp {}: {e}", socket.display()));
        tokio::time::timeout(timeout, async {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let (r, w) = stream.into_split();
            let mut qmp = Self {
                reader: BufReader::new(r),
                writer: w,
            };
            let greeting = qmp.read().await?;
            if greeting.get("QMP").is_none() {
                return Err(fail(format!("unexpected greeting {greeting}")));
            }
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        })
        .await
        .map_err(|_| fail("no answer".into()))?
    }

    async fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| Error::failed(format!("qmp read: {e}")))?;
        if n == 0 {
            return Err(Error::failed("qmp: QEMU closed the connection"));
        }
        serde_json::from_str(&line)
            .map_err(|e| Error::failed(format!("qmp: bad reply {line:?}: {e}")))
    }

    fn message(command: &str, arguments: Option<Value>) -> String {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        text
    }

    /// Run `command`, skipping asynchronous events, and return its result.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let text = Self::message(command, arguments);
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| Error::failed(format!("qmp write: {e}")))?;
        self.answer(command).await
    }

    /// Run `command` with `fd` passed beside it (`SCM_RIGHTS`), as
    /// `getfd` wants: QEMU takes the descriptor with the message.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let text = Self::message(command, arguments);
        let stream: &UnixStream = self.writer.as_ref();
        let sent = loop {
            stream
                .writable()
                .await
                .map_err(|e| Error::failed(format!("qmp write: {e}")))?;
            let tried = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let fds = [fd.as_raw_fd()];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(text.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match tried {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::failed(format!("qmp write: {e}"))),
            }
        };
        // The descriptor went with the first byte; the rest follows plain.
        self.writer
            .write_all(&text.as_bytes()[sent..])
            .await
            .map_err(|e| Error::failed(format!("qmp write: {e}")))?;
        self.answer(command).await
    }

    async fn answer(&mut self, command: &str) -> Result<Value> {
        loop {
            let reply = self.read().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(Error::failed(format!("qmp {command}: {e}")));
            }
        }
    }

    /// Wait for the outgoing migration to end, within `timeout`.
    async fn migrated(&mut self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(Error::failed(format!(
                        "qemu could not write the guest's state ({status}): {why}"
                    )));
                }
                _ if Instant::now() > until => {
                    let _ = self.execute("migrate_cancel", None).await;
                    return Err(Error::failed(format!(
                        "qemu did not write the guest's state within {}s",
                        timeout.as_secs()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// `query-status`: `running`, `paused`, `shutdown`, ...
    pub async fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None).await?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }
}

impl Vmm for Qemu {
    fn driver(&self) -> crate::VmmDriver {
        crate::VmmDriver::Qemu
    }

    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        supervisor: &'a dyn Supervisor,
    ) -> BoxFuture<'a, Result<(Watched, ProcessId)>> {
        Box::pin(async move {
            let p = &spec.paths;
            let (mut watched, id) = match &spec.confine {
                Some(confine) => {
                    let (fds, args) = self.jailed_args(spec);
                    let jail = Jail {
                        uid: confine.uid,
                        groups: vec![VMM_GROUP],
                        fds,
                        parent: None,
                        private_network: true,
                        handoff: None,
                    };
                    start_process(
                        spec,
                        supervisor,
                        &self.binary,
                        &args,
                        Some(&jail),
                        Launcher::Bare,
                    )
                    .await?
                }
                None => {
                    start_process(
                        spec,
                        supervisor,
                        &self.binary,
                        &self.args(spec),
                        None,
                        Launcher::Bare,
                    )
                    .await?
                }
            };
            // QEMU has parsed its arguments and set up every device once
            // QMP answers; a bad argument makes it exit before.
            let started = Instant::now();
            loop {
                if watched.ended() {
                    return Err(exited_at_start("qemu", &p.vmm_log));
                }
                if let Ok(mut qmp) = Qmp::connect(&p.control_socket, Duration::from_secs(2)).await
                    && qmp.status().await.is_ok()
                {
                    return Ok((watched, id));
                }
                if started.elapsed() > Duration::from_secs(30) {
                    kill_failed(supervisor, &spec.id, &mut watched, id).await;
                    return Err(Error::failed("qemu did not answer on QMP within 30 s"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    fn agent(&self, paths: &VmPaths) -> AgentEndpoint {
        AgentEndpoint::Unix(paths.agent_socket.clone())
    }

    fn request_shutdown<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut qmp = Qmp::connect(&paths.control_socket, Duration::from_secs(2)).await?;
            qmp.execute("system_powerdown", None).await?;
            Ok(())
        })
    }

    fn confined(&self) -> bool {
        true
    }

    fn program(&self) -> &Path {
        &self.binary
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn save<'a>(&'a self, paths: &'a VmPaths, to: StateFds) -> BoxFuture<'a, Result<Saved>> {
        let to = to.state;
        Box::pin(async move {
            let mut qmp = Qmp::connect(&paths.control_socket, Duration::from_secs(5)).await?;
            let kvm = qmp.execute("query-kvm", None).await?;
            let accel = if kvm.get("enabled").and_then(Value::as_bool) == Some(true) {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
            // Stopped first, so that memory is written once rather than
            // chased while the guest dirties it; no bandwidth cap.
            qmp.execute("stop", None).await?;
            let written = async {
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": MIGRATE_BANDWIDTH })),
                )
                .await?;
                qmp.execute_with_fd("getfd", Some(json!({ "fdname": SNAPSHOT_FD })), to.as_fd())
                    .await?;
                drop(to);
                qmp.execute(
                    "migrate",
                    Some(json!({ "uri": format!("fd:{SNAPSHOT_FD}") })),
                )
                .await?;
                qmp.migrated(SAVE_TIMEOUT).await
            }
            .await;
            if let Err(e) = written {
                // The guest goes on as it was.
                let _ = qmp.execute("cont", None).await;
                return Err(e);
            }
            Ok(Saved { accel })
        })
    }

    fn restore<'a>(&'a self, spec: &'a LaunchSpec, from: StateFds) -> BoxFuture<'a, Result<()>> {
        let (paths, from) = (&spec.paths, from.state);
        Box::pin(async move {
            let gone = |e: Error| {
                Error::failed(format!(
                    "qemu could not load the guest's state: {}",
                    e.message
                ))
            };
            let mut qmp = Qmp::connect(&paths.control_socket, Duration::from_secs(5)).await?;
            qmp.execute_with_fd(
                "getfd",
                Some(json!({ "fdname": SNAPSHOT_FD })),
                from.as_fd(),
            )
            .await?;
            drop(from);
            qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{SNAPSHOT_FD}") })),
            )
            .await
            .map_err(gone)?;
            // QEMU runs the guest once its state is in (it exits when
            // the state does not load).
            let until = Instant::now() + SAVE_TIMEOUT;
            loop {
                match qmp.status().await.map_err(gone)?.as_str() {
                    "running" => return Ok(()),
                    "paused" | "postmigrate" => {
                        qmp.execute("cont", None).await?;
                        return Ok(());
                    }
                    _ if Instant::now() > until => {
                        return Err(Error::failed(format!(
                            "qemu did not load the guest's state within {}s",
                            SAVE_TIMEOUT.as_secs()
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        })
    }

    fn resume<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut qmp = Qmp::connect(&paths.control_socket, Duration::from_secs(5)).await?;
            qmp.execute("cont", None).await?;
            Ok(())
        })
    }

    fn awaits_state<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match Qmp::connect(&paths.control_socket, Duration::from_secs(2)).await {
                Ok(mut qmp) => qmp.status().await.is_ok_and(|s| s == "inmigrate"),
                Err(_) => false,
            }
        })
    }

    fn quit<'a>(&'a self, paths: &'a VmPaths) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut qmp = Qmp::connect(&paths.control_socket, Duration::from_secs(5)).await?;
            // QEMU may close the connection before it answers.
            match qmp.execute("quit", None).await {
                Ok(_) => Ok(()),
                Err(e) if e.message.contains("closed the connection") => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// The name a snapshot's descriptor has in QEMU (`getfd`).
const SNAPSHOT_FD: &str = "banger-snapshot";

/// The migration bandwidth cap while saving, in bytes per second: none
/// worth the name (QEMU's default is 128 MiB/s).
const MIGRATE_BANDWIDTH: u64 = 1 << 36;

/// How long writing or loading a guest's state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            id: "abc".into(),
            name: "web".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            vcpus: 2,
            memory_mib: 512,
            paths: VmPaths::new(Path::new("/s,tate"), Path::new("/run/b"), "abc"),
            system_disk: "/s,tate/vms/abc/system.ext4".into(),
            net: Some(("bgtap3".into(), "0a:b6:0a:00:00:02".into())),
            accel: Accel::Tcg,
            confine: None,
            shares: Vec::new(),
            incoming: false,
        }
    }

    #[test]
    fn a_jailed_qemu_gets_descriptors_for_everything_but_its_kernel() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        let (passes, args) = q.jailed_args(&spec());
        let a = args.join(" ");
        for want in [
            "-add-fd fd=3,set=1,opaque=/s,,tate/vms/abc/system.ext4",
            "-add-fd fd=4,set=1,opaque=/s,,tate/vms/abc/system.ext4",
            "id=system,file=/dev/fdset/1,format=raw,if=none,discard=unmap,file.locking=off",
            "-add-fd fd=5,set=2,opaque=/s,,tate/vms/abc/work.ext4",
            "id=work,file=/dev/fdset/2,format=raw",
            "-add-fd fd=7,set=3,opaque=/s,,tate/vms/abc/console.log",
            "file,id=console,path=/dev/fdset/3,append=on",
            "tap,id=net0,fd=10",
            "socket,id=agent,fd=9,server=on,wait=off",
            "socket,id=qmp,fd=8,server=on,wait=off",
            "-kernel /k/vmlinuz -initrd /k/initrd.img",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        // No path of the VM's is left for QEMU to open but as a label.
        for (i, arg) in args.iter().enumerate() {
            if arg.contains("/vms/abc") {
                assert_eq!(args[i - 1], "-add-fd", "{arg} is opened by path");
            }
        }
        let source = |fd: i32| {
            passes
                .iter()
                .find(|p| p.fd == fd)
                .map(|p| p.source.clone())
                .expect("passed")
        };
        assert_eq!(
            source(3),
            Source::File {
                path: "/s,tate/vms/abc/system.ext4".into(),
                access: Access::ReadWrite
            }
        );
        assert_eq!(
            source(4),
            Source::File {
                path: "/s,tate/vms/abc/system.ext4".into(),
                access: Access::Read
            }
        );
        assert_eq!(
            source(7),
            Source::File {
                path: "/s,tate/vms/abc/console.log".into(),
                access: Access::Append
            }
        );
        assert_eq!(
            source(8),
            Source::Listen {
                path: "/run/b/vms/abc/control.sock".into()
            }
        );
        assert_eq!(
            source(10),
            Source::Tap {
                name: "bgtap3".into()
            }
        );
        assert_eq!(passes.len(), 8);
    }

    #[test]
    fn host_folders_get_shared_memory_and_a_vhost_user_fs_device_each() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        assert!(!q.args(&spec()).iter().any(|a| a.contains("memory-backend")));
        let share = |i: usize| crate::virtiofs::Share {
            tag: crate::virtiofs::tag(i),
            folder: crate::virtiofs::Folder {
                source: format!("/home/me/f{i}").into(),
                read_only: i == 1,
            },
            socket: crate::virtiofs::socket(Path::new("/run/b/vms/abc"), i),
        };
        let spec = LaunchSpec {
            shares: vec![share(0), share(1)],
            ..spec()
        };
        let args = q.args(&spec).join(" ");
        for want in [
            "-M microvm,memory-backend=mem ",
            "-object memory-backend-memfd,id=mem,size=512M,share=on",
            "-global virtio-mmio.force-legacy=false",
            "-chardev socket,id=fs0,path=/run/b/vms/abc/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=banger0",
            "-chardev socket,id=fs1,path=/run/b/vms/abc/fs1.sock -device vhost-user-fs-device,chardev=fs1,tag=banger1",
        ] {
            assert!(args.contains(want), "{want} in {args}");
        }
        // Jailed, QEMU gets each socket connected by bangerd.
        let (passes, args) = q.jailed_args(&spec);
        let args = args.join(" ");
        assert!(args.contains("-chardev socket,id=fs1,fd=12 "), "{args}");
        assert!(passes.contains(&Pass {
            fd: 12,
            source: Source::Connect {
                path: "/run/b/vms/abc/fs1.sock".into()
            }
        }));
        assert!(!args.contains("fs0.sock"), "{args}");
    }

    #[test]
    fn the_command_line_has_every_device() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        let a = q.args(&spec()).join(" ");
        for want in [
            "-M microvm -accel tcg -cpu max",
            "-m 512 -smp 2",
            "-kernel /k/vmlinuz -initrd /k/initrd.img",
            "-append console=ttyS0 root=/dev/vda",
            "file,id=console,path=/s,,tate/vms/abc/console.log,append=on",
            "id=system,file=/s,,tate/vms/abc/system.ext4,format=raw",
            "id=work,file=/s,,tate/vms/abc/work.ext4,format=raw",
            "tap,id=net0,ifname=bgtap3,script=no,downscript=no",
            "virtio-net-device,netdev=net0,mac=0a:b6:0a:00:00:02",
            "socket,id=agent,path=/run/b/vms/abc/agent.sock,server=on,wait=off",
            "virtserialport,chardev=agent,name=org.banger.agent",
            "socket,id=qmp,path=/run/b/vms/abc/control.sock,server=on,wait=off",
            "-mon chardev=qmp,mode=control",
            "-object rng-builtin,id=rng0 -device virtio-rng-device,rng=rng0",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        // The system disk comes first: it is /dev/vda in the guest.
        assert!(a.find("id=system").unwrap_or(usize::MAX) < a.find("id=work").unwrap_or(0));
        let kvm = LaunchSpec {
            accel: Accel::Kvm,
            ..spec()
        };
        assert!(q.args(&kvm).join(" ").contains("-accel kvm -cpu host"));
    }

    #[tokio::test]
    async fn a_real_qemu_answers_qmp_and_a_bad_one_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec();
        s.paths = VmPaths::new(dir.path(), dir.path(), "abc");
        s.system_disk = s.paths.system_disk.clone();
        std::fs::create_dir_all(&s.paths.dir).expect("dir");
        std::fs::create_dir_all(&s.paths.run).expect("run");
        s.net = None;
        std::fs::write(&s.paths.system_disk, vec![0u8; 4096]).expect("disk");
        std::fs::write(&s.paths.work_disk, vec![0u8; 4096]).expect("disk");
        // No such kernel: QEMU refuses at start, and the error says why.
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        if which("qemu-system-x86_64").is_none() {
            panic!("qemu-system-x86_64 is missing: run scripts/install-deps");
        }
        let e = q
            .launch(&s, &crate::supervise::Direct)
            .await
            .expect_err("no kernel");
        assert!(e.message.contains("qemu exited at start"), "{}", e.message);
        assert!(e.message.contains("/k/vmlinuz"), "{}", e.message);
    }

    /// QEMU asked to start a program (QMP `migrate` to `exec:`, which a
    /// QEMU without the sandbox runs as its own user) is killed by its
    /// seccomp filter instead, and the program never runs.
    #[tokio::test]
    async fn the_sandbox_keeps_qemu_from_starting_programs() {
        let kernel = banger_testbed::guest_artifact("kernel/vmlinuz", "build-test-kernel");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec();
        s.kernel = kernel;
        s.initrd = None;
        s.memory_mib = 128;
        s.vcpus = 1;
        s.paths = VmPaths::new(dir.path(), dir.path(), "abc");
        s.system_disk = s.paths.system_disk.clone();
        std::fs::create_dir_all(&s.paths.dir).expect("dir");
        std::fs::create_dir_all(&s.paths.run).expect("run");
        s.net = None;
        std::fs::write(&s.paths.system_disk, vec![0u8; 4096]).expect("disk");
        std::fs::write(&s.paths.work_disk, vec![0u8; 4096]).expect("disk");
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        let (mut watched, id) = q
            .launch(&s, &crate::supervise::Direct)
            .await
            .expect("qemu starts");
        let marker = dir.path().join("escaped");
        let mut qmp = Qmp::connect(&s.paths.control_socket, Duration::from_secs(5))
            .await
            .expect("qmp");
        let _ = qmp
            .execute(
                "migrate",
                Some(json!({ "uri": format!("exec:touch {}", marker.display()) })),
            )
            .await;
        let until = Instant::now() + Duration::from_secs(10);
        while !watched.ended() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = watched.ended();
        if !ended {
            let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
        }
        assert!(!marker.exists(), "QEMU started a program");
        assert!(ended, "QEMU went on after trying to start a program");
    }

    /// A tiny guest of `dir`, booted under `Direct` (no network).
    fn tiny_spec(dir: &Path) -> LaunchSpec {
        let kernel = banger_testbed::guest_artifact("kernel/vmlinuz", "build-test-kernel");
        let initrd = banger_testbed::guest_artifact("kernel/initrd.img", "build-test-kernel");
        let rootfs = banger_testbed::guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
        let seed = banger_testbed::guest_artifact("tiny/work-seed.ext4", "build-tiny-image");
        let mut s = spec();
        s.kernel = kernel;
        s.initrd = Some(initrd);
        s.cmdline = format!(
            "console=ttyS0 root=/dev/vda rw rootfstype=ext4 tsc=unstable {} init=/sbin/banger-init",
            crate::TCG_TSC_KHZ
        );
        s.memory_mib = 256;
        s.vcpus = 1;
        s.paths = VmPaths::new(dir, dir, "abc");
        s.system_disk = s.paths.system_disk.clone();
        s.net = None;
        std::fs::create_dir_all(&s.paths.dir).expect("dir");
        std::fs::create_dir_all(&s.paths.run).expect("run");
        std::fs::copy(&rootfs, &s.system_disk).expect("rootfs");
        std::fs::copy(&seed, &s.paths.work_disk).expect("work disk");
        s
    }

    async fn health(paths: &VmPaths, wait: Duration) -> banger_agent_proto::Health {
        let endpoint = AgentEndpoint::Unix(paths.agent_socket.clone());
        match banger_agent_host::wait_until_ready(&endpoint, wait, Duration::from_millis(50)).await
        {
            Ok((_, health, _)) => health,
            Err(e) => panic!(
                "{e}\nconsole:\n{}",
                std::fs::read_to_string(&paths.console_log).unwrap_or_default()
            ),
        }
    }

    fn state_fds(file: std::fs::File) -> StateFds {
        StateFds {
            state: file.into(),
            memory: None,
        }
    }

    /// A guest written to a file and loaded into a new QEMU goes on where
    /// it was: the same boot, its uptime carried over. A file that is not
    /// a guest's state fails the load, and QEMU says why.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_saved_guest_loads_into_a_new_qemu_and_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = tiny_spec(dir.path());
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
        };
        let direct = crate::supervise::Direct;
        let (mut watched, _) = q.launch(&s, &direct).await.expect("qemu starts");
        let before = health(&s.paths, Duration::from_secs(120)).await;
        let file = dir.path().join("guest.state");
        let out = std::fs::File::create(&file).expect("create");
        let t = Instant::now();
        let saved = q.save(&s.paths, state_fds(out)).await.expect("saved");
        let took = t.elapsed();
        assert_eq!(saved.accel, Accel::Tcg);
        let size = std::fs::metadata(&file).expect("meta").len();
        eprintln!("saved {size} bytes in {took:?}");
        assert!(size > 1 << 20, "{size} bytes");
        q.quit(&s.paths).await.expect("quit");
        let until = Instant::now() + Duration::from_secs(10);
        while !watched.ended() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(watched.ended(), "qemu went on after quit");

        let incoming = LaunchSpec {
            incoming: true,
            ..s.clone()
        };
        let t = Instant::now();
        let (mut watched, id) = q.launch(&incoming, &direct).await.expect("qemu starts");
        let from = state_fds(std::fs::File::open(&file).expect("open"));
        q.restore(&incoming, from).await.expect("restored");
        let after = health(&s.paths, Duration::from_secs(30)).await;
        eprintln!("restored to agent health in {:?}", t.elapsed());
        assert_eq!(after.boot_id, before.boot_id, "a boot, not the same guest");
        assert!(after.uptime_secs >= before.uptime_secs);
        let _ = id.signal(nix::sys::signal::Signal::SIGKILL);
        if let Watched::Child(child) = &mut watched {
            let _ = child.wait();
        }

        // Garbage is refused, and QEMU ends.
        std::fs::write(&file, vec![7u8; 1 << 16]).expect("garbage");
        let (mut watched, _) = q.launch(&incoming, &direct).await.expect("qemu starts");
        let e = q
            .restore(
                &incoming,
                state_fds(std::fs::File::open(&file).expect("open")),
            )
            .await
            .expect_err("garbage loads");
        assert!(e.message.contains("could not load"), "{}", e.message);
        let until = Instant::now() + Duration::from_secs(10);
        while !watched.ended() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(watched.ended(), "qemu went on without a guest");
    }

    fn which(name: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
    }
}
