//! A named network namespace for one test, removed on drop.

use std::process::Command;

/// `ip netns add NAME` with loopback up; `ip netns delete NAME` on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A fresh namespace named `<prefix>-<pid>-<n>` (an old one of that
    /// name, left by a killed run, is deleted first).
    ///
    /// # Panics
    ///
    /// If `ip` fails (package iproute2; needs root).
    pub fn new(prefix: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `f` on a thread inside the namespace (sockets it opens stay
    /// there).
    ///
    /// # Panics
    ///
    /// If the namespace cannot be entered, or `f` panics.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("the namespace");
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("setns");
            f()
        })
        .join()
        .expect("the thread in the namespace")
    }

    /// `ip netns exec NAME program`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}
