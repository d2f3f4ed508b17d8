//! Running the e2fsprogs tools on data a user or a guest controls. A
//! crafted file system is parsed by `e2fsck`, `resize2fs`, `debugfs` and
//! `mkfs.ext4 -d`; none of them may do so with privilege. Callers say
//! which files a tool needs ([`Tool::files`]) and hand the tool to a
//! [`Tools`]: bangerd's (`os::sandbox`) runs it without capabilities, in
//! a user namespace of its own, with no network and a mount namespace in
//! which those files are the only ones of the host's data it can see, at
//! the paths the arguments name. [`Unconfined`] runs it as the caller,
//! for tests of what the tools make.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_error::{Error, Result};

/// The host ids a sandbox's user namespace maps (its root is the first),
/// in the range systemd leaves unused: no account, container or dynamic
/// user has them.
pub const SANDBOX_IDS: std::ops::Range<u32> = 0x7B00_0000..0x7B01_0000;

/// Hand back to root what sandboxed runs still held when their daemon
/// died: every file and directory under `dir`, down to `depth` levels,
/// owned by a [`SANDBOX_IDS`] uid or gid becomes root's, without setuid,
/// setgid or write for others. Links are not followed. Returns how many
/// were handed back.
pub fn reclaim(dir: &Path, depth: usize) -> std::io::Result<usize> {
    let mut done = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if SANDBOX_IDS.contains(&meta.uid()) || SANDBOX_IDS.contains(&meta.gid()) {
            std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
            if !meta.file_type().is_symlink() {
                let mode = meta.mode() & 0o7777 & !0o6002;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            done += 1;
        }
        if depth > 1 && meta.is_dir() {
            done += reclaim(&path, depth - 1)?;
        }
    }
    Ok(done)
}

/// How many ids a sandbox maps: the owners a tree may have.
const MAPPED_IDS: u32 = SANDBOX_IDS.end - SANDBOX_IDS.start;

/// Make the tree at `root` (itself included; links not followed, hard
/// links shifted once) owned as a tool whose root is host id `by` sees it:
/// each entry's uid and gid go up by `by`, keeping setuid and setgid bits
/// and file capabilities (`security.capability`), which a change of owner
/// clears. A tree with an owner the sandbox does not map (65536 and up)
/// is refused. Needs `CAP_CHOWN`, `CAP_FSETID` and `CAP_SETFCAP`; `by` 0
/// changes nothing. Returns how many entries were shifted.
pub fn shift_owners(root: &Path, by: u32) -> Result<u64> {
    if by == 0 {
        return Ok(0);
    }
    let fail = |what: &str, p: &Path, e: std::io::Error| {
        Error::failed(format!("cannot {what} {}: {e}", p.display()))
    };
    let mut seen = std::collections::HashSet::new();
    let mut done = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail("stat", &path, e))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| fail("read", &path, e))? {
                stack.push(entry.map_err(|e| fail("read", &path, e))?.path());
            }
        } else if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid >= MAPPED_IDS || gid >= MAPPED_IDS {
            return Err(Error::invalid(format!(
                "{} is owned by uid {uid} and gid {gid}: banger maps ids 0 to {} only",
                path.strip_prefix(root).unwrap_or(&path).display(),
                MAPPED_IDS - 1
            )));
        }
        let caps = if meta.is_file() {
            xattr::get(&path, CAPABILITY).map_err(|e| fail("read the capabilities of", &path, e))?
        } else {
            None
        };
        std::os::unix::fs::lchown(&path, Some(uid + by), Some(gid + by))
            .map_err(|e| fail("change the owner of", &path, e))?;
        let mode = meta.mode() & 0o7777;
        if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail("set the mode of", &path, e))?;
        }
        if let Some(caps) = caps {
            xattr::set(&path, CAPABILITY, &caps)
                .map_err(|e| fail("set the capabilities of", &path, e))?;
        }
        done += 1;
    }
    Ok(done)
}

/// The extended attribute that holds a file's capabilities.
const CAPABILITY: &str = "security.capability";

/// A file or directory a tool may see, at its own path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    /// Whether the tool may write it (else it is mounted read-only).
    pub writable: bool,
}

/// One run of a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// The program's name on the PATH (`e2fsck`).
    pub program: String,
    pub args: Vec<String>,
    /// Every file it reads or writes; nothing else of the host's data is
    /// there for it.
    pub files: Vec<File>,
    /// No file it writes may grow past this (`RLIMIT_FSIZE`): a crafted
    /// file system's huge sparse file stops there.
    pub max_file_bytes: Option<u64>,
    /// It is killed when it runs longer ([`DEFAULT_TIME_LIMIT`] unless
    /// set): a crafted file system that keeps a tool busy forever holds
    /// its operation (and the VM or image) no longer.
    pub time_limit: std::time::Duration,
}

/// How long a tool may run unless told otherwise: e2fsck and resize2fs of
/// a large work disk take minutes, not hours.
pub const DEFAULT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl Tool {
    pub fn new(program: &str) -> Self {
        Tool {
            program: program.to_owned(),
            args: Vec::new(),
            files: Vec::new(),
            max_file_bytes: None,
            time_limit: DEFAULT_TIME_LIMIT,
        }
    }

    /// Kill it when it runs longer than `limit`.
    pub fn time_limit(mut self, limit: std::time::Duration) -> Self {
        self.time_limit = limit;
        self
    }

    /// Limit every file it writes to `bytes`.
    pub fn max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = Some(bytes);
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `path` as an argument, readable by the tool.
    pub fn reads(mut self, path: &std::path::Path) -> Self {
        self.args.push(path.to_string_lossy().into_owned());
        self.read_only(path)
    }

    /// `path` as an argument, writable by the tool.
    pub fn writes(mut self, path: &std::path::Path) -> Self {
        self.args.push(path.to_string_lossy().into_owned());
        self.read_write(path)
    }

    /// `path` readable by the tool, not an argument.
    pub fn read_only(mut self, path: &std::path::Path) -> Self {
        self.files.push(File {
            path: path.to_owned(),
            writable: false,
        });
        self
    }

    /// `path` writable by the tool, not an argument.
    pub fn read_write(mut self, path: &std::path::Path) -> Self {
        self.files.push(File {
            path: path.to_owned(),
            writable: true,
        });
        self
    }
}

/// What a tool did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Its exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The output, or an error with what the tool said when it exited
    /// with anything but one of `ok`.
    pub fn expect_codes(self, what: &str, ok: &[i32]) -> Result<Output> {
        if self.code.is_some_and(|c| ok.contains(&c)) {
            return Ok(self);
        }
        let said = if self.stderr.iter().all(u8::is_ascii_whitespace) {
            &self.stdout
        } else {
            &self.stderr
        };
        Err(Error::failed(format!(
            "{what} failed ({}): {}",
            self.code
                .map_or_else(|| "killed".to_owned(), |c| format!("exit status {c}")),
            String::from_utf8_lossy(said).trim()
        )))
    }
}

/// Runs tools. Blocking: callers are on a blocking thread already.
pub trait Tools: Send + Sync + std::fmt::Debug {
    fn run(&self, tool: &Tool) -> Result<Output>;

    /// The host id a tool's root is. A tree a tool reads with its owners
    /// (`mkfs.ext4 -d`) must be owned by ids this much higher
    /// ([`shift_owners`]); 0 where tools run as the caller.
    fn root_id(&self) -> u32 {
        0
    }

    /// Run `tool`, an error unless it exits 0.
    fn check(&self, tool: &Tool) -> Result<Output> {
        self.run(tool)?.expect_codes(&tool.program, &[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_trees_keep_setuid_bits_capabilities_and_links() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        let tool = root.join("usr/bin/tool");
        std::fs::write(&tool, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
        std::fs::hard_link(&tool, root.join("usr/bin/tool2")).expect("link");
        let ping = root.join("usr/bin/ping");
        std::fs::write(&ping, b"ping").expect("write");
        // cap_net_raw+ep, a version 2 capability set.
        let mut caps = vec![0u8; 20];
        caps[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        caps[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
        xattr::set(&ping, CAPABILITY, &caps).expect("setcap");
        let home = root.join("home/user");
        std::fs::create_dir_all(&home).expect("mkdir");
        std::os::unix::fs::chown(&home, Some(1000), Some(1001)).expect("chown");
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).expect("symlink");

        let by = SANDBOX_IDS.start;
        assert_eq!(shift_owners(&root, by).expect("shifted"), 8);
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).expect("meta");
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        assert_eq!(owner(&root), (by, by, 0o755));
        assert_eq!(owner(&tool), (by, by, 0o4755));
        assert_eq!(owner(&home), (by + 1000, by + 1001, 0o755));
        assert_eq!(owner(&root.join("bin")).0, by);
        assert_eq!(
            xattr::get(&ping, CAPABILITY).expect("getcap"),
            Some(caps.clone())
        );
        // 0 changes nothing.
        assert_eq!(shift_owners(&root, 0).expect("nothing"), 0);
        assert_eq!(owner(&tool).0, by);

        // An owner the sandbox cannot map is refused, by name.
        let far = dir.path().join("far");
        std::fs::create_dir(&far).expect("mkdir");
        std::fs::write(far.join("file"), b"x").expect("write");
        std::os::unix::fs::chown(far.join("file"), Some(70_000), None).expect("chown");
        let e = shift_owners(&far, by).expect_err("unmapped");
        assert!(e.message.contains("file is owned by uid 70000"), "{e}");
    }

    #[test]
    fn what_a_dead_sandbox_held_goes_back_to_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = dir.path().join("vms/x");
        std::fs::create_dir_all(&vm).expect("mkdir");
        let disk = vm.join("work.ext4");
        std::fs::write(&disk, b"disk").expect("write");
        let mine = vm.join("console.log");
        std::fs::write(&mine, b"log").expect("write");
        std::os::unix::fs::chown(&disk, Some(SANDBOX_IDS.start), Some(SANDBOX_IDS.start))
            .expect("chown");
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o6777)).expect("chmod");
        std::os::unix::fs::chown(&mine, Some(1000), Some(1000)).expect("chown");
        let deep = vm.join("a/b");
        std::fs::create_dir_all(&deep).expect("mkdir");
        std::os::unix::fs::chown(&deep, Some(SANDBOX_IDS.start + 5), None).expect("chown");

        assert_eq!(reclaim(dir.path(), 3).expect("reclaim"), 1);
        let meta = std::fs::metadata(&disk).expect("meta");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o775)
        );
        // Others' files stay theirs; deeper than asked is left alone.
        assert_eq!(std::fs::metadata(&mine).expect("meta").uid(), 1000);
        assert_eq!(
            std::fs::metadata(&deep).expect("meta").uid(),
            SANDBOX_IDS.start + 5
        );
        assert_eq!(reclaim(dir.path(), 5).expect("reclaim"), 1);
        assert_eq!(std::fs::metadata(&deep).expect("meta").uid(), 0);
    }
}

/// Runs a tool as the caller, with everything the caller may reach: for
/// tests, never for bangerd's work on a user's or a guest's data.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unconfined;

impl Tools for Unconfined {
    fn run(&self, tool: &Tool) -> Result<Output> {
        let out = Command::new(&tool.program)
            .args(&tool.args)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| {
                Error::unavailable(format!(
                    "cannot run {}: {e}; install e2fsprogs",
                    tool.program
                ))
            })?;
        Ok(Output {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}
