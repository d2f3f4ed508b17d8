//! A VM's host folders: one `virtiofsd` per folder, run as the VM's
//! owner, that QEMU's `vhost-user-fs-device` talks to.
//!
//! bangerd binds each folder's socket itself (in the VM's root-only
//! runtime directory) and hands the listeners to `bangerd virtiofsd-exec`
//! over a [`Handoff`], as it does for a jailed VMM. That helper starts as
//! root in a unit of its own (`banger-fs-<id>.service`, not the VMM's:
//! the VMM's sandbox allows no namespace and no mount) and for each
//! folder forks a child that becomes the owner (its groups, gid and uid),
//! checks that the owner may use the folder, and makes a user namespace
//! in which the helper maps root to the owner and nothing else. There
//! `virtiofsd -o sandbox=namespace` gets the capabilities it needs to
//! confine itself to the folder, and whatever the guest writes lands as
//! the owner: a VM shares only what its owner can read and write. A
//! read-only folder is a read-only bind mount of it, made in a mount
//! namespace of the child's own.
//!
//! The helper answers on the handoff connection once every virtiofsd
//! runs (`ok`) or why one could not (`error: ...`), so a folder the owner
//! may not use fails the start with that reason. A virtiofsd ends when
//! its VMM goes; the helper ends with the last of them.

use std::ffi::CString;
use std::io::{BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::jail::{self, Handoff, Pass, Source};
use crate::process::Watched;
use crate::supervise::{Launcher, StartRequest, Supervisor};
use banger_error::{Error, Result};

pub use crate::supervise::{
    FOLDERS_HELPER_ARG as HELPER_ARG, folder_helpers as helpers_of, folders_unit as unit_name,
};

/// The most host folders one VM has.
pub const MAX_SHARES: usize = 8;

/// One folder as the helper serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folder {
    /// The host directory (absolute).
    pub source: PathBuf,
    /// Served read-only.
    pub read_only: bool,
}

/// What `virtiofsd-exec` is told (JSON, its one argument before `--`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The VM (so that a leftover helper can be found again).
    pub vm: String,
    /// Who the virtiofsds run as: the VM's owner.
    pub uid: u32,
    /// The owner's primary group.
    pub gid: u32,
    /// The owner's supplementary groups.
    pub groups: Vec<u32>,
    /// The folders, in the order of the listeners handed over.
    pub folders: Vec<Folder>,
    /// bangerd's [`Handoff`].
    pub handoff: PathBuf,
}

/// A folder of a VM to start: where it is and how the guest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    /// The host directory.
    pub folder: Folder,
    /// The socket virtiofsd listens on and QEMU connects to.
    pub socket: PathBuf,
}

/// The tag of a VM's `index`th folder.
pub fn tag(index: usize) -> String {
    format!("banger{index}")
}

/// The socket of a VM's `index`th folder, in its runtime directory.
pub fn socket(run: &Path, index: usize) -> PathBuf {
    run.join(format!("fs{index}.sock"))
}

/// How long bangerd waits for the helper to take its listeners and then
/// to have every virtiofsd running.
const TIMEOUT: Duration = Duration::from_secs(15);

/// What bangerd starts for one VM's folders.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The VM's id and name.
    pub vm: (&'a str, &'a str),
    /// bangerd's own binary.
    pub helper: &'a Path,
    /// The virtiofsd binary.
    pub virtiofsd: &'a Path,
    /// The owner's uid, gid and supplementary groups.
    pub owner: (u32, u32, Vec<u32>),
    /// The folders.
    pub shares: &'a [Share],
    /// The VM's runtime directory (the handoff goes there).
    pub run: &'a Path,
    /// The helper's log.
    pub log: &'a Path,
}

/// Start the virtiofsds of `launch` through `supervisor`; returns once
/// every one runs, or why one could not.
pub async fn start(launch: &Launch<'_>, supervisor: &dyn Supervisor) -> Result<()> {
    // A helper left by an earlier run (bangerd killed between starting it
    // and its VMM) holds the unit's name.
    supervisor.stop_folders(launch.vm.0).await;
    let at = launch.run.join("fs-handoff.sock");
    let passes: Vec<Pass> = launch
        .shares
        .iter()
        .enumerate()
        .map(|(i, s)| Pass {
            fd: 3 + i32::try_from(i).unwrap_or(0),
            source: Source::Listen {
                path: s.socket.clone(),
            },
        })
        .collect();
    let opened = Handoff::open(&at, &passes)
        .map_err(|e| Error::failed(format!("cannot make the host folders' sockets: {e}")))?;
    let serving = tokio::task::spawn_blocking(move || {
        let stream = opened.serve_to(TIMEOUT)?;
        answer(stream)
    });
    let spec = Spec {
        vm: launch.vm.0.to_owned(),
        uid: launch.owner.0,
        gid: launch.owner.1,
        groups: launch.owner.2.clone(),
        folders: launch.shares.iter().map(|s| s.folder.clone()).collect(),
        handoff: at.clone(),
    };
    let args = vec![
        HELPER_ARG.to_owned(),
        serde_json::to_string(&spec).map_err(|e| Error::failed(e.to_string()))?,
        "--".to_owned(),
        launch.virtiofsd.to_string_lossy().into_owned(),
    ];
    let started = supervisor
        .start(StartRequest {
            vm_id: launch.vm.0,
            vm_name: launch.vm.1,
            program: launch.helper,
            args: &args,
            log: launch.log,
            memory_mib: 0,
            vcpus: 1,
            writable: &[],
            jit: false,
            launcher: Launcher::Virtiofsd,
        })
        .await;
    let answered = match &started {
        Ok(_) => serving
            .await
            .map_err(|e| Error::failed(format!("internal task failed: {e}")))?,
        Err(_) => {
            // Nobody comes for them: take them back.
            let _ = tokio::task::spawn_blocking(move || jail::receive(&at, passes.len())).await;
            let _ = serving.await;
            Ok(())
        }
    };
    let (watched, _) = started?;
    if let Watched::Child(mut child) = watched {
        // bangerd's own child (no systemd): reaped when it ends.
        std::thread::spawn(move || child.wait());
    }
    if let Err(why) = answered {
        supervisor.stop_folders(launch.vm.0).await;
        return Err(Error::failed(format!(
            "cannot share the host folders of vm {}: {why}",
            launch.vm.1
        )));
    }
    Ok(())
}

/// The helper's answer on `stream`: `ok`, or its reason.
fn answer(stream: std::os::unix::net::UnixStream) -> std::result::Result<(), String> {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(stream.take(4096))
        .read_line(&mut line)
        .map_err(|e| format!("virtiofsd-exec did not answer: {e}"))?;
    match line.trim_end().strip_prefix("error: ") {
        _ if line.trim_end() == "ok" => Ok(()),
        Some(why) => Err(why.to_owned()),
        None => Err("virtiofsd-exec ended without an answer; see the vm's virtiofsd.log".into()),
    }
}

/// The arguments of one folder's virtiofsd: the socket at fd 3, confined
/// to `folder` in namespaces of its own, with the descriptor limit it
/// has.
pub fn virtiofsd_args(folder: &Folder) -> Vec<String> {
    vec![
        "--fd=3".to_owned(),
        "-o".to_owned(),
        format!("source={}", folder.source.display()),
        "-o".to_owned(),
        "sandbox=namespace".to_owned(),
        "--rlimit-nofile=0".to_owned(),
    ]
}

/// Whether `path` is absolute, below `/`, at most 4096 bytes, with no
/// empty, `.` or `..` component (no `//`, no trailing `/`).
pub fn is_plain_absolute(path: &str) -> bool {
    path.len() > 1
        && path.len() <= 4096
        && path.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
        })
}

/// Check a host folder's path as banger takes it: absolute, plain (no
/// `.`, `..`, `//` or trailing `/`), no comma (virtiofsd's option
/// separator) and no control character.
pub fn check_source(source: &str) -> std::result::Result<(), String> {
    if !(source == "/" || is_plain_absolute(source)) {
        return Err(format!(
            "host folder {source:?} is not an absolute path without '.' or '..'"
        ));
    }
    if source.contains(',') || source.chars().any(char::is_control) {
        return Err(format!(
            "host folder {source:?} holds a comma or a control character, which virtiofsd cannot take"
        ));
    }
    Ok(())
}

/// `bangerd virtiofsd-exec SPEC -- VIRTIOFSD`: start one virtiofsd per
/// folder as [`Spec`] says, answer bangerd, and wait for them. Returns
/// only on failure, with the reason.
pub fn exec(args: &[String]) -> String {
    let run = || -> std::result::Result<std::convert::Infallible, String> {
        let (spec, program, rest) =
            jail::helper_args(args, "usage: bangerd virtiofsd-exec SPEC -- VIRTIOFSD")?;
        if !rest.is_empty() {
            return Err("virtiofsd-exec takes no arguments for virtiofsd".into());
        }
        let spec: Spec =
            serde_json::from_str(spec).map_err(|e| format!("bad virtiofsd-exec spec: {e}"))?;
        if spec.folders.is_empty() || spec.folders.len() > MAX_SHARES {
            return Err(format!("{} folders", spec.folders.len()));
        }
        let (mut stream, fds) = jail::receive_on(&spec.handoff, spec.folders.len())?;
        let mut children = Vec::new();
        let mut failed = None;
        for (folder, fd) in spec.folders.iter().zip(fds) {
            match start_one(&spec, folder, fd, program) {
                Ok(child) => children.push(child),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let reply = match &failed {
            None => "ok\n".to_owned(),
            Some(why) => format!("error: {}\n", why.replace('\n', " ")),
        };
        let _ = stream.write_all(reply.as_bytes());
        drop(stream);
        if let Some(why) = failed {
            for child in children {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            return Err(why);
        }
        // Wait for every virtiofsd; each ends with its VMM's connection.
        let mut worst = 0;
        while !children.is_empty() {
            match nix::sys::wait::waitpid(None, None) {
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if children.contains(&pid) {
                        children.retain(|c| *c != pid);
                        if let nix::sys::wait::WaitStatus::Exited(_, code) = status {
                            worst = worst.max(code);
                        } else if let nix::sys::wait::WaitStatus::Signaled(..) = status {
                            worst = worst.max(1);
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("cannot wait for virtiofsd: {e}")),
            }
        }
        std::process::exit(worst);
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// What a child says once it is in its user namespace: a byte no reason
/// (text) starts with.
const IN_NAMESPACE: u8 = 0;

/// Fork one folder's virtiofsd as [`exec`] describes; its pid.
fn start_one(
    spec: &Spec,
    folder: &Folder,
    socket: OwnedFd,
    program: &str,
) -> std::result::Result<nix::unistd::Pid, String> {
    use nix::unistd::{ForkResult, fork, pipe2};
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    // The child says how far it got ([`IN_NAMESPACE`]) or why it stopped
    // (text); the pipe closes when it execs. The parent says go.
    let (from_child, to_parent) = pipe2(cloexec).map_err(|e| format!("cannot make a pipe: {e}"))?;
    let (from_parent, to_child) = pipe2(cloexec).map_err(|e| format!("cannot make a pipe: {e}"))?;
    let (mut virtiofsd_args, argv0) = (virtiofsd_args(folder), program.to_owned());
    virtiofsd_args.insert(0, argv0);
    let argv = virtiofsd_args
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| format!("{a:?} holds a NUL byte")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let parent = nix::unistd::getpid();
    // SAFETY: virtiofsd-exec is single-threaded (it runs before bangerd
    // starts any thread).
    match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Child => {
            drop((from_child, to_child));
            let mut to_parent = std::fs::File::from(to_parent);
            let why = match child(
                spec,
                folder,
                socket,
                parent,
                from_parent,
                &mut to_parent,
                &argv,
            ) {
                Ok(never) => match never {},
                Err(why) => why,
            };
            let _ = to_parent.write_all(why.as_bytes());
            // SAFETY: leaving the forked child without running the
            // parent's destructors or atexit handlers.
            unsafe { nix::libc::_exit(126) }
        }
        ForkResult::Parent { child } => {
            drop((to_parent, from_parent, socket));
            let mut from_child = std::fs::File::from(from_child);
            let mut to_child = std::fs::File::from(to_child);
            let fail = |why: String| {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                why
            };
            let mut said = [0u8; 1];
            let n = from_child.read(&mut said).unwrap_or(0);
            if n == 0 || said[0] != IN_NAMESPACE {
                let mut rest = String::new();
                let _ = from_child.read_to_string(&mut rest);
                let why = String::from_utf8_lossy(&said[..n]).into_owned() + &rest;
                return Err(fail(if why.is_empty() {
                    "virtiofsd's child ended at start".into()
                } else {
                    why
                }));
            }
            // Root in the child's namespace is the owner, and only it.
            for (map, id) in [("uid_map", spec.uid), ("gid_map", spec.gid)] {
                std::fs::write(format!("/proc/{child}/{map}"), format!("0 {id} 1\n"))
                    .map_err(|e| fail(format!("cannot write the child's {map}: {e}")))?;
            }
            to_child
                .write_all(b"g")
                .map_err(|e| fail(format!("cannot wake the child: {e}")))?;
            let mut why = String::new();
            let _ = from_child.read_to_string(&mut why);
            if !why.is_empty() {
                return Err(fail(why));
            }
            Ok(child)
        }
    }
}

/// The forked child: become the owner, check the folder, make the user
/// namespace, wait for its maps, make a read-only folder's bind mount,
/// and exec virtiofsd with the socket at fd 3.
fn child(
    spec: &Spec,
    folder: &Folder,
    socket: OwnedFd,
    parent: nix::unistd::Pid,
    go: OwnedFd,
    said: &mut std::fs::File,
    argv: &[CString],
) -> std::result::Result<std::convert::Infallible, String> {
    use nix::sched::{CloneFlags, unshare};
    use nix::unistd::{AccessFlags, Gid, Uid, access, setgroups, setresgid, setresuid};
    let mut groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    groups.insert(0, Gid::from_raw(spec.gid));
    setgroups(&groups).map_err(|e| format!("cannot set the groups: {e}"))?;
    let gid = Gid::from_raw(spec.gid);
    setresgid(gid, gid, gid).map_err(|e| format!("cannot become gid {gid}: {e}"))?;
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).map_err(|e| format!("cannot become uid {uid}: {e}"))?;
    let source = &folder.source;
    let meta = std::fs::metadata(source)
        .map_err(|e| format!("uid {uid} cannot reach {}: {e}", source.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", source.display()));
    }
    let mut wanted = AccessFlags::R_OK | AccessFlags::X_OK;
    if !folder.read_only {
        wanted |= AccessFlags::W_OK;
    }
    access(source.as_path(), wanted).map_err(|e| {
        let how = if folder.read_only {
            "read"
        } else {
            "read and write"
        };
        format!(
            "uid {uid} may not {how} {} ({e}); share a folder the vm's owner may use, or add :ro",
            source.display()
        )
    })?;
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("cannot make a user namespace (are they allowed here?): {e}"))?;
    said.write_all(&[IN_NAMESPACE])
        .map_err(|e| format!("cannot tell the parent: {e}"))?;
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if go.read(&mut byte).unwrap_or(0) != 1 {
        return Err("the parent went away".into());
    }
    if folder.read_only {
        read_only(source)?;
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    if nix::unistd::getppid() != parent {
        return Err("its starter is gone".into());
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
    jail::place(vec![(3, socket)])?;
    // The answer pipe closes as virtiofsd starts (it is close-on-exec).
    jail::execv(&argv[0], argv).map(|never| match never {})
}

/// Make `source` read-only in a mount namespace of this process's own
/// (it holds `CAP_SYS_ADMIN` in its user namespace): a bind mount of it
/// on itself, remounted read-only with the flags the kernel locks kept.
fn read_only(source: &Path) -> std::result::Result<(), String> {
    use nix::mount::{MsFlags, mount};
    use nix::sys::statvfs::{FsFlags, statvfs};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot make a mount namespace: {e}"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("cannot make the mounts private: {e}"))?;
    mount(
        Some(source),
        source,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("cannot bind {}: {e}", source.display()))?;
    let have = statvfs(source).map_err(|e| format!("cannot stat {}: {e}", source.display()))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.flags().contains(f) {
            flags |= m;
        }
    }
    mount(none, source, none, flags, none)
        .map_err(|e| format!("cannot make {} read-only: {e}", source.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_plain_absolute_paths_virtiofsd_can_take() {
        for ok in ["/", "/home/alice/src", "/srv/a b", "/x/.hidden"] {
            assert_eq!(check_source(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "rel", "/a/../b", "/a/./b", "/a//b", "/a/", "/a,b", "/a\nb", "./x",
        ] {
            assert!(check_source(bad).is_err(), "{bad}");
        }
        assert!(check_source(&format!("/{}", "a".repeat(4096))).is_err());
    }

    #[test]
    fn each_folder_gets_its_socket_and_tag() {
        let folder = Folder {
            source: "/srv/data".into(),
            read_only: false,
        };
        assert_eq!(
            virtiofsd_args(&folder),
            [
                "--fd=3",
                "-o",
                "source=/srv/data",
                "-o",
                "sandbox=namespace",
                "--rlimit-nofile=0"
            ]
        );
        assert_eq!(tag(1), "banger1");
        assert_eq!(
            socket(Path::new("/run/banger/vms/x"), 0),
            Path::new("/run/banger/vms/x/fs0.sock")
        );
        assert_eq!(unit_name("abc"), "banger-fs-abc.service");
    }

    #[test]
    fn a_helper_is_found_by_its_vm_only() {
        assert!(helpers_of("no-such-vm-id").is_empty());
    }
}
