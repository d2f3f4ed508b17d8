//! A real OCI registry (`docker-registry`, the distribution project's) on
//! loopback, with filesystem storage in a directory of its own, for the
//! tests that pull images.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{NetNs, eventually, free_loopback_port};

/// A `docker-registry` on a loopback port, killed on drop (its storage
/// removed with it).
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// The port it listens on at 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// A registry on loopback: the host's, or that of `ns` (port 5000);
    /// `extra` is more of its YAML configuration (an `auth:` section).
    ///
    /// # Panics
    ///
    /// If docker-registry cannot run or does not listen within 20 s.
    pub fn start(ns: Option<&NetNs>, extra: &str) -> Registry {
        let dir = tempfile::tempdir().expect("registry directory");
        let port = match ns {
            Some(_) => 5000,
            None => free_loopback_port().expect("a free loopback port"),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                dir.path().join("store").display()
            ),
        )
        .expect("registry configuration");
        // Its request log (404s for blobs skopeo probes) stays in its directory.
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let mut cmd = match ns {
            Some(ns) => ns.command("docker-registry"),
            None => Command::new("docker-registry"),
        };
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("run docker-registry (apt install docker-registry)");
        let registry = Registry { child, port, dir };
        let up = eventually(Duration::from_secs(20), || {
            let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
            let mut cmd = match ns {
                Some(ns) => ns.command("bash"),
                None => Command::new("bash"),
            };
            cmd.args(["-c", &probe])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                .then_some(())
        });
        assert!(up.is_some(), "docker-registry did not listen on {port}");
        registry
    }

    /// Its storage (the `filesystem` driver's root directory), which
    /// another registry can serve.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}
