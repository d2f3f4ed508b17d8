//! `banger vm cp`: copy files and directories between this host and a VM
//! as tar streams through `VM.Exec` (the guest's own `tar` packs or
//! unpacks). Modes, modification times and symbolic links are kept; on
//! the host the archive is made and unpacked by this process, as the
//! user, so a guest's archive can write only where the user can and never
//! outside the destination.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use banger_agent_proto::stream::{Channel, ExitStatus};

use crate::artifacts::human_bytes;
use crate::cli::Options;
use crate::client::Client;
use crate::exec::stream;
use crate::exit::{Failure, Kind};
use crate::session::Authorization;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A path on this host.
    Local(PathBuf),
    /// `-`: a tar archive on stdin or stdout.
    Stdio,
    /// `VM:PATH`.
    Remote {
        /// The VM reference.
        vm: String,
        /// The path in the guest.
        path: String,
    },
}

impl Place {
    /// Read one argument: `-`, `VM:PATH` (a `:` before any `/`), or a
    /// local path (write `./a:b` for a local name with a colon).
    pub fn parse(arg: &str) -> Result<Place, Failure> {
        if arg == "-" {
            return Ok(Place::Stdio);
        }
        match arg.split_once(':') {
            Some((vm, path)) if !vm.contains('/') => {
                if vm.is_empty() {
                    return Err(Failure::new(
                        Kind::InvalidArgument,
                        format!("{arg:?}: name the VM before the colon (VM:PATH)"),
                    ));
                }
                if path.is_empty() {
                    return Err(Failure::new(
                        Kind::InvalidArgument,
                        format!("{arg:?}: give a path in the VM after the colon"),
                    ));
                }
                Ok(Place::Remote {
                    vm: vm.to_owned(),
                    path: path.to_owned(),
                })
            }
            _ => Ok(Place::Local(PathBuf::from(arg))),
        }
    }
}

/// Which way a copy goes, with the VM's object path resolved.
#[derive(Debug)]
pub enum Copy {
    /// From this host (a path, or a tar archive on stdin) to the guest.
    Up {
        /// The source; `None` for stdin.
        from: Option<PathBuf>,
        /// The guest path.
        to: String,
    },
    /// From the guest to this host (a path, or a tar archive on stdout).
    Down {
        /// The guest path.
        from: String,
        /// The destination; `None` for stdout.
        to: Option<PathBuf>,
    },
}

/// Run `copy` with the VM at `vm_path`, as guest user `user`.
pub async fn run(
    opts: Options,
    client: &Client,
    vm_path: &str,
    copy: Copy,
    user: Option<String>,
) -> anyhow::Result<u8> {
    let started = Instant::now();
    let auth = Authorization::prepare(opts).await;
    let guest = Guest {
        client,
        vm_path,
        user,
        auth: &auth,
    };
    let result = match copy {
        Copy::Up { from, to } => up(&guest, from, &to).await,
        Copy::Down { from, to } => down(&guest, &from, to).await,
    };
    let moved = auth.finish(result).await?;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "copied {} in {:.1}s",
            human_bytes(moved),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(crate::exit::OK)
}

struct Guest<'a> {
    client: &'a Client,
    vm_path: &'a str,
    user: Option<String>,
    auth: &'a Authorization,
}

impl Guest<'_> {
    /// Run `argv` in the guest with `input` as stdin; stdout goes to
    /// `out`. Fails with the command's stderr when it does not exit 0.
    async fn run(
        &self,
        argv: &[&str],
        input: Box<dyn Read + Send>,
        mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), Failure> {
        let options = banger_dbus::options::Exec {
            user: self.user.clone(),
            ..banger_dbus::options::Exec::default()
        };
        let command: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
        let fd = self
            .client
            .vm_exec(self.vm_path, &command, &options, self.auth.interaction)
            .await?;
        let mut errors = Vec::new();
        let status = stream(fd, input, false, |channel, bytes| match channel {
            Channel::Stderr => {
                if errors.len() < 64 * 1024 {
                    errors.extend_from_slice(&bytes);
                }
                Ok(())
            }
            _ => out(&bytes),
        })
        .await?;
        if status == ExitStatus::Code(0) {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&errors);
        let said = said.trim();
        Err(Failure::new(
            Kind::Failed,
            if said.is_empty() {
                format!("{} in the VM failed ({status:?})", argv[0])
            } else {
                format!("in the VM: {said}")
            },
        ))
    }

    /// Whether `path` is a directory in the guest.
    async fn is_dir(&self, path: &str) -> Result<bool, Failure> {
        match self
            .run(
                &["test", "-d", path],
                Box::new(std::io::empty()),
                |_| Ok(()),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(f) if f.kind() == Kind::Failed => Ok(false),
            Err(f) => Err(f),
        }
    }
}

/// The parent and last component of a guest path (`.` for a bare name).
fn split_guest(path: &str) -> Result<(String, String), Failure> {
    let trimmed = path.trim_end_matches('/');
    let bad = || {
        Failure::new(
            Kind::InvalidArgument,
            format!("{path:?} names no file or directory to copy"),
        )
    };
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".to_owned(), name),
        Some((parent, name)) => (parent.to_owned(), name),
        None => (".".to_owned(), trimmed),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad());
    }
    Ok((parent, name.to_owned()))
}

fn io_failure(what: String) -> impl Fn(std::io::Error) -> Failure {
    move |e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            Kind::NotFound
        } else {
            Kind::Failed
        };
        Failure::new(kind, format!("{what}: {e}"))
    }
}

async fn up(guest: &Guest<'_>, from: Option<PathBuf>, to: &str) -> Result<u64, Failure> {
    let Some(from) = from else {
        // A tar archive on stdin, unpacked into the guest directory.
        let counted = Counted::new(Box::new(std::io::stdin()), None);
        let moved = counted.count.clone();
        guest
            .run(
                &["tar", "-x", "-f", "-", "-C", to],
                Box::new(counted),
                |_| Ok(()),
            )
            .await?;
        return Ok(moved.load(Ordering::Relaxed));
    };
    let meta = std::fs::symlink_metadata(&from)
        .map_err(io_failure(format!("cannot read {}", from.display())))?;
    let Some(source_name) = from.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!("{} names no file or directory to copy", from.display()),
        ));
    };
    // Into an existing directory under the source's name, else as `to`.
    let (dir, name) = if guest.is_dir(to).await? {
        (to.to_owned(), source_name)
    } else if to.ends_with('/') {
        return Err(Failure::new(
            Kind::NotFound,
            format!("there is no directory {to} in the VM"),
        ));
    } else {
        split_guest(to)?
    };
    let entries = walk(&from, &meta)?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let (reader, writer) = std::io::pipe().map_err(io_failure("cannot make a pipe".to_owned()))?;
    let packer = std::thread::spawn(move || pack(writer, &from, &name, &entries));
    let counted = Counted::new(Box::new(reader), Some(total));
    let moved = counted.count.clone();
    let copied = guest
        .run(
            &["tar", "-x", "-f", "-", "-C", &dir],
            Box::new(counted),
            |_| Ok(()),
        )
        .await;
    let packed = packer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the archive thread failed")));
    copied?;
    packed.map_err(io_failure("cannot read what to copy".to_owned()))?;
    Ok(moved.load(Ordering::Relaxed))
}

async fn down(guest: &Guest<'_>, from: &str, to: Option<PathBuf>) -> Result<u64, Failure> {
    let (parent, name) = split_guest(from)?;
    let argv = ["tar", "-c", "-f", "-", "-C", &parent, &name];
    let Some(to) = to else {
        let mut stdout = std::io::stdout().lock();
        let mut moved = 0u64;
        guest
            .run(&argv, Box::new(std::io::empty()), |bytes| {
                moved += bytes.len() as u64;
                stdout.write_all(bytes)
            })
            .await?;
        stdout
            .flush()
            .map_err(io_failure("cannot write stdout".to_owned()))?;
        return Ok(moved);
    };
    // Into an existing directory, else as `to` (through a directory of
    // its own beside it, then one rename).
    let into_dir = to.is_dir();
    let parent_dir = if into_dir {
        to.clone()
    } else {
        match to.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let staging = tempfile::Builder::new()
        .prefix(".banger-cp-")
        .tempdir_in(&parent_dir)
        .map_err(io_failure(format!(
            "cannot write in {}",
            parent_dir.display()
        )))?;
    let (reader, mut writer) =
        std::io::pipe().map_err(io_failure("cannot make a pipe".to_owned()))?;
    let target = staging.path().to_path_buf();
    let unpacker = std::thread::spawn(move || {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(false);
        archive.set_overwrite(true);
        archive.unpack(&target)
    });
    let mut progress = Progress::new(None);
    let mut moved = 0u64;
    let copied = guest
        .run(&argv, Box::new(std::io::empty()), |bytes| {
            moved += bytes.len() as u64;
            progress.show(moved);
            writer.write_all(bytes)
        })
        .await;
    drop(writer);
    progress.done();
    let unpacked = unpacker
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the unpacking thread failed")));
    copied?;
    unpacked.map_err(io_failure("cannot unpack what the VM sent".to_owned()))?;
    let got = staging.path().join(&name);
    let dest = if into_dir { to.join(&name) } else { to.clone() };
    if std::fs::symlink_metadata(&got).is_err() {
        return Err(Failure::new(Kind::Failed, format!("the VM sent no {name}")));
    }
    if let Ok(existing) = std::fs::symlink_metadata(&dest)
        && existing.is_dir()
        && !std::fs::symlink_metadata(&got)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        return Err(Failure::new(
            Kind::InvalidArgument,
            format!("{} is a directory; the VM's {name} is not", dest.display()),
        ));
    }
    if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
        // An existing directory: merge into it, as tar itself would.
        merge(&got, &dest)?;
    } else {
        std::fs::rename(&got, &dest)
            .map_err(io_failure(format!("cannot put {}", dest.display())))?;
    }
    Ok(moved)
}

/// Move the entries of `from` into the existing directory `to`.
fn merge(from: &Path, to: &Path) -> Result<(), Failure> {
    let entries =
        std::fs::read_dir(from).map_err(io_failure(format!("cannot read {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_failure(format!("cannot read {}", from.display())))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let both_dirs = std::fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir())
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if both_dirs {
            merge(&src, &dst)?;
        } else {
            std::fs::rename(&src, &dst)
                .map_err(io_failure(format!("cannot put {}", dst.display())))?;
        }
    }
    Ok(())
}

/// One thing to pack, relative to the source.
#[derive(Debug)]
struct Entry {
    relative: PathBuf,
    size: u64,
}

/// Everything under `root` (itself first), without following links.
fn walk(root: &Path, meta: &std::fs::Metadata) -> Result<Vec<Entry>, Failure> {
    let mut out = vec![Entry {
        relative: PathBuf::new(),
        size: if meta.is_file() { meta.len() } else { 0 },
    }];
    if meta.is_dir() {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .map_err(io_failure(format!("cannot read {}", dir.display())))?
                .filter_map(Result::ok)
                .collect();
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let rel = rel.join(e.file_name());
                let m = e.metadata().map_err(io_failure(format!(
                    "cannot read {}",
                    root.join(&rel).display()
                )))?;
                if m.is_dir() {
                    stack.push(rel.clone());
                }
                out.push(Entry {
                    relative: rel,
                    size: if m.is_file() { m.len() } else { 0 },
                });
            }
        }
    }
    Ok(out)
}

/// Write `entries` of `root` as a tar archive whose top is `name`, owned
/// by root in the guest (the guest user's own with `--user`, since tar
/// run as a user cannot give files away).
fn pack(
    writer: std::io::PipeWriter,
    root: &Path,
    name: &str,
    entries: &[Entry],
) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    for e in entries {
        // Joining an empty path would add a trailing slash.
        let (path, in_archive) = if e.relative.as_os_str().is_empty() {
            (root.to_path_buf(), PathBuf::from(name))
        } else {
            (root.join(&e.relative), Path::new(name).join(&e.relative))
        };
        let meta = std::fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root")?;
        header.set_groupname("root")?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&path)?;
            builder.append_link(&mut header, &in_archive, &target)?;
        } else if kind.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, &in_archive, std::io::empty())?;
        } else if kind.is_file() {
            let file = std::fs::File::open(&path)?;
            builder.append_data(&mut header, &in_archive, file)?;
        } else {
            eprintln!(
                "banger: skipped {}: not a file, directory or link",
                path.display()
            );
        }
    }
    builder.into_inner()?.flush()
}

/// A reader that counts what passes and shows it on a terminal.
struct Counted {
    inner: Box<dyn Read + Send>,
    count: Arc<AtomicU64>,
    progress: Progress,
}

impl Counted {
    fn new(inner: Box<dyn Read + Send>, total: Option<u64>) -> Self {
        Self {
            inner,
            count: Arc::default(),
            progress: Progress::new(total),
        }
    }
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let so_far = self.count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if n == 0 {
            self.progress.done();
        } else {
            self.progress.show(so_far);
        }
        Ok(n)
    }
}

/// Bytes moved, rate and (when known) the share done, redrawn on stderr
/// at most four times a second, only on a terminal.
struct Progress {
    on: bool,
    total: Option<u64>,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(total: Option<u64>) -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
            total,
            started: Instant::now(),
            last: None,
        }
    }

    fn show(&mut self, moved: u64) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = human_bytes((moved as f64 / secs) as u64);
        let share = match self.total {
            Some(t) if t > 0 => format!(
                " of {} ({:.0}%)",
                human_bytes(t),
                moved as f64 * 100.0 / t as f64
            ),
            _ => String::new(),
        };
        eprint!("\r\x1b[Kcopying {}{share}, {rate}/s", human_bytes(moved));
    }

    fn done(&mut self) {
        if self.on && self.last.is_some() {
            eprint!("\r\x1b[K");
            self.last = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse() {
        assert_eq!(Place::parse("-").ok(), Some(Place::Stdio));
        assert_eq!(
            Place::parse("dev:/etc/hosts").ok(),
            Some(Place::Remote {
                vm: "dev".into(),
                path: "/etc/hosts".into()
            })
        );
        assert_eq!(
            Place::parse("./a:b").ok(),
            Some(Place::Local(PathBuf::from("./a:b")))
        );
        assert_eq!(
            Place::parse("notes.txt").ok(),
            Some(Place::Local(PathBuf::from("notes.txt")))
        );
        for bad in [":x", "dev:"] {
            assert_eq!(
                Place::parse(bad).map_err(|f| f.kind()).err(),
                Some(Kind::InvalidArgument),
                "{bad}"
            );
        }
    }

    #[test]
    fn guest_paths_split() {
        let s = |p: &str| split_guest(p).ok();
        assert_eq!(s("/etc/hosts"), Some(("/etc".into(), "hosts".into())));
        assert_eq!(s("/root/"), Some(("/".into(), "root".into())));
        assert_eq!(s("notes"), Some((".".into(), "notes".into())));
        assert_eq!(s("a/b/"), Some(("a".into(), "b".into())));
        for bad in ["/", "..", "a/.", "//"] {
            assert_eq!(s(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_single_file_is_packed_as_a_file() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "hi").expect("write");
        let meta = std::fs::symlink_metadata(&file).expect("meta");
        let entries = walk(&file, &meta).expect("walk");
        let (reader, writer) = std::io::pipe().expect("pipe");
        let t = std::thread::spawn(move || pack(writer, &file, "renamed.txt", &entries));
        let mut archive = tar::Archive::new(reader);
        let names: Vec<(String, tar::EntryType)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        t.join().expect("join").expect("pack");
        assert_eq!(
            names,
            vec![("renamed.txt".to_owned(), tar::EntryType::Regular)]
        );
    }

    #[test]
    fn packs_modes_links_and_times_as_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        std::fs::write(src.join("sub/run.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            src.join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/run.sh", src.join("link")).expect("symlink");
        let meta = std::fs::symlink_metadata(&src).expect("meta");
        let entries = walk(&src, &meta).expect("walk");
        assert_eq!(entries.iter().map(|e| e.size).sum::<u64>(), 10);
        let (reader, writer) = std::io::pipe().expect("pipe");
        let src2 = src.clone();
        let t = std::thread::spawn(move || pack(writer, &src2, "top", &entries));
        let mut archive = tar::Archive::new(reader);
        let mut seen = Vec::new();
        for e in archive.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (0, 0));
            seen.push((
                e.path().expect("path").display().to_string(),
                h.entry_type(),
                h.mode().expect("mode") & 0o7777,
                e.link_name()
                    .expect("link")
                    .map(|l| l.display().to_string()),
            ));
        }
        t.join().expect("join").expect("pack");
        assert!(
            seen.contains(&(
                "top/sub/run.sh".into(),
                tar::EntryType::Regular,
                0o751,
                None
            )),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|(p, t, _, l)| p == "top/link"
                && *t == tar::EntryType::Symlink
                && l.as_deref() == Some("sub/run.sh")),
            "{seen:?}"
        );
        assert_eq!(seen[0].0.trim_end_matches('/'), "top");
    }
}
