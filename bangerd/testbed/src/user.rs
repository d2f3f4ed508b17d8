//! Throw-away system users for tests.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User, chown, setgid, setgroups, setuid};
use tempfile::TempDir;

use crate::shared::{self, Lease, Setup, shell_quote};
use crate::spawn::pid_alive;

/// Prefix of every test user's name: `banger-t<pid>-<n>`.
const PREFIX: &str = "banger-t";

/// A unique system user (and its own primary group), deleted with `userdel`
/// when dropped.
///
/// Created with `useradd --system --no-create-home --user-group`, named
/// `banger-t<pid>-<n>`. Users left behind by test processes that died are
/// deleted the next time a process creates one.
#[derive(Debug)]
pub struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: TempDir,
    // Released after `Drop::drop` has deleted the user.
    _group_leases: Vec<Lease>,
}

/// Runs a shadow-utils command, retrying while another one holds the
/// passwd/group lock.
fn shadow_tool(program: &str, args: &[&str]) -> io::Result<Output> {
    let mut attempt = 0;
    loop {
        let output = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        attempt += 1;
        if output.status.success() || attempt >= 10 || !stderr.contains("lock") {
            return Ok(output);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn check(what: &str, output: Output) -> io::Result<()> {
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Deletes `banger-t<pid>-<n>` users whose process is gone.
fn delete_stale_users() {
    let Ok(passwd) = fs::read_to_string("/etc/passwd") else {
        return;
    };
    for name in passwd.lines().filter_map(|line| line.split(':').next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = shadow_tool("userdel", &[name]);
        }
    }
}

/// Makes sure group `name` exists for as long as the lease is held; a group
/// the test beds created is deleted after its last user on the machine.
fn group_lease(name: &str) -> io::Result<Lease> {
    shared::acquire(&format!("group-{name}"), |managed| {
        if managed || Group::from_name(name)?.is_some() {
            return Ok(Setup::Nothing);
        }
        check(
            &format!("groupadd --system {name}"),
            shadow_tool("groupadd", &["--system", name])?,
        )?;
        Ok(Setup::Managed {
            start: String::new(),
            cleanup: format!("groupdel {} 2>/dev/null", shell_quote(name)),
        })
    })
}

impl TestUser {
    /// Creates a user that belongs to its own group only.
    pub fn create() -> io::Result<TestUser> {
        Self::create_in_groups(&[])
    }

    /// Creates a user that is also a member of the supplementary group
    /// `group` (created with `groupadd --system` if missing, and then
    /// deleted again after the last test bed on the machine is done with it).
    pub fn create_in_group(group: &str) -> io::Result<TestUser> {
        Self::create_in_groups(&[group])
    }

    /// Creates a user that is also a member of each of `groups` (see
    /// [`TestUser::create_in_group`]). The membership is both in
    /// `/etc/group` and in the supplementary groups of
    /// [`TestUser::command`]'s processes.
    pub fn create_in_groups(groups: &[&str]) -> io::Result<TestUser> {
        static CLEAN: Once = Once::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        CLEAN.call_once(delete_stale_users);

        let group_leases = groups
            .iter()
            .map(|group| group_lease(group))
            .collect::<io::Result<Vec<_>>>()?;
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let joined = groups.join(",");
        let mut args = vec![
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
        ];
        if !groups.is_empty() {
            args.extend(["--groups", &joined]);
        }
        args.push(&name);
        check(&format!("useradd {name}"), shadow_tool("useradd", &args)?)?;

        let finish = || -> io::Result<(User, TempDir, Vec<u32>)> {
            let entry = User::from_name(&name)?
                .ok_or_else(|| io::Error::other(format!("useradd did not create {name}")))?;
            let home = tempfile::Builder::new()
                .prefix(&format!("{name}-home-"))
                .tempdir()?;
            chown(home.path(), Some(entry.uid), Some(entry.gid))?;
            fs::set_permissions(home.path(), fs::Permissions::from_mode(0o700))?;
            let mut gids = Vec::new();
            for group in groups {
                let group = Group::from_name(group)?
                    .ok_or_else(|| io::Error::other(format!("group {group} does not exist")))?;
                gids.push(group.gid.as_raw());
            }
            Ok((entry, home, gids))
        };
        match finish() {
            Ok((entry, home, gids)) => Ok(TestUser {
                name,
                uid: entry.uid.as_raw(),
                gid: entry.gid.as_raw(),
                groups: gids,
                home,
                _group_leases: group_leases,
            }),
            Err(e) => {
                let _ = shadow_tool("userdel", &[&name]);
                Err(e)
            }
        }
    }

    /// The user name, `banger-t<pid>-<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The primary group id (the user's own group).
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The supplementary groups asked for at creation.
    pub fn supplementary_gids(&self) -> &[u32] {
        &self.groups
    }

    /// A temporary home directory owned by the user, removed on drop.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// A command that runs as this user: its uid, its gid, and exactly the
    /// supplementary groups asked for at creation.
    ///
    /// The environment is cleared except for `PATH`, `LANG`, `RUST_LOG`
    /// and `RUST_BACKTRACE`; `HOME` is [`TestUser::home`] (also the working
    /// directory), `USER` and `LOGNAME` the user's name. Use
    /// [`crate::TestBed::command_as`] to also point it at a test bed's bus.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("HOME", self.home.path())
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .current_dir(self.home.path());
        for key in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        let uid = Uid::from_raw(self.uid);
        let gid = Gid::from_raw(self.gid);
        let groups: Vec<Gid> = self.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        // std's uid()/gid() would drop all supplementary groups (it calls
        // setgroups(0) itself, and groups() is unstable): switch here, in
        // the order that works, groups first and uid last.
        // SAFETY: the closure runs between fork and exec; it only makes the
        // async-signal-safe system calls setgroups(2), setgid(2) and
        // setuid(2) on data prepared before the fork, and converts their
        // error numbers to io::Errors without allocating.
        unsafe {
            command.pre_exec(move || {
                setgroups(&groups)?;
                setgid(gid)?;
                setuid(uid)?;
                Ok(())
            });
        }
        command
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        match shadow_tool("userdel", &[&self.name]) {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "banger-testbed: userdel {}: {}: {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(e) => eprintln!("banger-testbed: userdel {}: {e}", self.name),
        }
    }
}
