//! Where the daemon keeps things, following systemd's directory variables.

use std::path::{Path, PathBuf};

/// The daemon's directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// `$STATE_DIRECTORY`, default `/var/lib/banger`: the store and disks.
    pub state: PathBuf,
    /// `$CACHE_DIRECTORY`, default `/var/cache/banger`: downloads.
    pub cache: PathBuf,
    /// `$RUNTIME_DIRECTORY`, default `/run/banger`: sockets.
    pub runtime: PathBuf,
    /// `$CONFIGURATION_DIRECTORY`, default `/etc/banger`: `bangerd.toml`.
    pub config: PathBuf,
}

impl Dirs {
    /// Read the variables from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name).map(PathBuf::from))
    }

    /// Resolve with an explicit variable lookup (testable without touching the environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<PathBuf>) -> Self {
        // systemd passes a colon-separated list when a unit names several
        // directories; banger's unit names one, the first is ours.
        let pick = |var: &str, default: &str| {
            lookup(var)
                .and_then(|v| {
                    v.to_str()
                        .and_then(|s| s.split(':').next())
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                })
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self {
            state: pick("STATE_DIRECTORY", "/var/lib/banger"),
            cache: pick("CACHE_DIRECTORY", "/var/cache/banger"),
            runtime: pick("RUNTIME_DIRECTORY", "/run/banger"),
            config: pick("CONFIGURATION_DIRECTORY", "/etc/banger"),
        }
    }

    /// The SQLite store.
    pub fn store_file(&self) -> PathBuf {
        self.state.join("banger.db")
    }

    /// The configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.config.join(CONFIG_FILE_NAME)
    }

    /// Create the directories bangerd writes to (systemd does this for the
    /// unit; a hand-started daemon does it itself), private to root.
    pub fn create(&self) -> std::io::Result<()> {
        for dir in [&self.state, &self.cache, &self.runtime] {
            create_private_dir(dir)?;
        }
        Ok(())
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The configuration file's name in the configuration directory.
pub const CONFIG_FILE_NAME: &str = "bangerd.toml";

/// Host paths the daemon and its checks look at; overridable so tests
/// can point them elsewhere.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_variables() {
        let dirs = Dirs::from_lookup(|_| None);
        assert_eq!(dirs.state, Path::new("/var/lib/banger"));
        assert_eq!(dirs.config_file(), Path::new("/etc/banger/bangerd.toml"));
    }

    #[test]
    fn first_of_a_colon_list_wins() {
        let dirs = Dirs::from_lookup(|v| match v {
            "STATE_DIRECTORY" => Some("/a:/b".into()),
            "CACHE_DIRECTORY" => Some("".into()),
            _ => None,
        });
        assert_eq!(dirs.state, Path::new("/a"));
        assert_eq!(dirs.cache, Path::new("/var/cache/banger"));
    }
}
