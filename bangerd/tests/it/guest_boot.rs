//! The slow tier: a real guest. The tiny image (scripts/build-tiny-image)
//! boots the Debian test kernel (scripts/build-test-kernel) under QEMU's
//! microvm machine with TCG, and bangerd's agent client talks to
//! banger-agent over virtio-serial: Health, Info, WaitPort(22), SyncTime,
//! then a clean Shutdown that makes QEMU exit by itself.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_agent_host::{AgentConn, AgentEndpoint, wait_until_ready};
use banger_agent_proto::Health;
use banger_testbed::guest_artifact;

/// QEMU, killed on drop whatever happens; keeps the console log for
/// failure messages.
pub(crate) struct Qemu {
    pub(crate) child: Child,
    console: std::path::PathBuf,
}

impl Qemu {
    /// Wait up to `wait` (trying every `poll`) for the agent on the socket
    /// [`boot`] made in `dir` to answer; fails the test with the console's
    /// last lines when it does not.
    pub(crate) async fn agent(
        &self,
        dir: &Path,
        wait: Duration,
        poll: Duration,
    ) -> (AgentConn, Health, Duration) {
        let endpoint = AgentEndpoint::Unix(dir.join("agent.sock"));
        match wait_until_ready(&endpoint, wait, poll).await {
            Ok(ready) => ready,
            Err(e) => panic!("{e}\nconsole:\n{}", self.console_tail(50)),
        }
    }

    pub(crate) fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sparse_copy(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Boot the tiny image (copies of its disks in `dir`) with `vmlinuz` and
/// `initrd` under QEMU microvm with TCG; the agent's socket is
/// `dir/agent.sock`.
pub(crate) fn boot_tiny(vmlinuz: &Path, initrd: &Path, dir: &Path) -> Qemu {
    let rootfs = guest_artifact("tiny/rootfs.ext4", "build-tiny-image");
    let seed = guest_artifact("tiny/work-seed.ext4", "build-tiny-image");
    boot(vmlinuz, initrd, &rootfs, &seed, "/sbin/banger-init", dir)
}

/// Boot copies (in `dir`) of `rootfs` and the work disk `seed` with
/// `vmlinuz` and `initrd`, starting `init`, under QEMU microvm with TCG;
/// the agent's socket is `dir/agent.sock`.
pub(crate) fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    rootfs: &Path,
    seed: &Path,
    init: &str,
    dir: &Path,
) -> Qemu {
    boot_with(vmlinuz, initrd, rootfs, seed, init, dir, None)
}

/// The address at which a guest of [`boot_with`] reaches the host's
/// loopback port it was given.
pub(crate) const GUEST_FORWARD: &str = "10.0.2.100:80";

/// [`boot`], with a NIC on QEMU's user-mode network when `forward` names
/// a loopback port of this host: the guest gets an address by DHCP and
/// reaches that port as [`GUEST_FORWARD`], and nothing else
/// (`restrict=on`).
pub(crate) fn boot_with(
    vmlinuz: &Path,
    initrd: &Path,
    rootfs: &Path,
    seed: &Path,
    init: &str,
    dir: &Path,
    forward: Option<u16>,
) -> Qemu {
    let qemu_bin = "qemu-system-x86_64";
    assert!(
        Command::new(qemu_bin).arg("--version").output().is_ok(),
        "{qemu_bin} is missing: apt-get install qemu-system-x86 (scripts/install-deps does)"
    );
    let disk = dir.join("rootfs.ext4");
    let work = dir.join("work.ext4");
    sparse_copy(rootfs, &disk);
    sparse_copy(seed, &work);
    let sock = dir.join("agent.sock");
    let console = dir.join("console.log");
    let child = Command::new(qemu_bin)
        .args([
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 root=/dev/vda rw rootfstype=ext4 tsc=unstable tsc_early_khz=2000000 init={init}"
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-drive")
        .arg(format!(
            "id=work,file={},format=raw,if=none",
            work.display()
        ))
        .args(["-device", "virtio-blk-device,drive=work"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.banger.agent",
        ])
        .args(forward.map_or_else(Vec::new, |port| {
            vec![
                "-netdev".to_owned(),
                // `cmd:` runs once per guest connection (a `tcp:` target
                // is one connection opened at start, shared by all).
                format!(
                    "user,id=net0,restrict=on,guestfwd=tcp:{GUEST_FORWARD}-cmd:bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; cat <&3 & cat >&3; wait'"
                ),
                "-device".to_owned(),
                "virtio-net-device,netdev=net0".to_owned(),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Qemu { child, console }
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_image_boots_and_its_agent_answers_over_virtio_serial() {
    let vmlinuz = guest_artifact("kernel/vmlinuz", "build-test-kernel");
    let initrd = guest_artifact("kernel/initrd.img", "build-test-kernel");
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut qemu = boot_tiny(&vmlinuz, &initrd, dir.path());

    let (conn, health, took) = qemu
        .agent(
            dir.path(),
            Duration::from_secs(120),
            Duration::from_millis(100),
        )
        .await;
    eprintln!(
        "guest boot: agent ready after {took:?} (guest uptime {:.2}s)",
        health.uptime_secs
    );
    assert_eq!(health.boot_id.len(), 36, "{}", health.boot_id);
    assert_eq!(health.boot_id.matches('-').count(), 4);
    assert!(health.uptime_secs > 0.0 && health.uptime_secs < 120.0);

    let t = Duration::from_secs(30);
    let info = conn.info(t).await.unwrap();
    let version = std::fs::read_to_string(vmlinuz.with_file_name("version")).unwrap_or_default();
    if !version.trim().is_empty() {
        assert_eq!(info.kernel_release, version.trim());
    }
    assert_eq!(info.os_id.as_deref(), Some("banger-tiny"));
    assert!(
        info.memory_total_bytes > 256 << 20,
        "{}",
        info.memory_total_bytes
    );
    assert!(info.disks.iter().any(|d| d.path == "/"));
    let root_disk = info.disks.iter().find(|d| d.path == "/root").unwrap();
    assert!(
        root_disk.total_bytes > 32 << 20,
        "the work disk is mounted on /root"
    );

    let t_port = Instant::now();
    let waited = conn.wait_port(22, Duration::from_secs(60)).await.unwrap();
    eprintln!(
        "guest boot: sshd listening ({waited:?} in the guest, {:?} here)",
        t_port.elapsed()
    );

    conn.sync_time(t).await.unwrap();

    let t_down = Instant::now();
    conn.shutdown(false, t).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = qemu.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not power off\nconsole:\n{}",
            qemu.console_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "guest boot: powered off in {:?}; {:?} from QEMU start to exit",
        t_down.elapsed(),
        t0.elapsed()
    );
    assert!(status.success(), "qemu exited with {status}");
    assert!(
        qemu.console_tail(200).contains("banger-init: work disk"),
        "{}",
        qemu.console_tail(50)
    );
}

/// A thousand short connections over virtio-serial, one after another,
/// each connecting, asking Health and hanging up; then fifty callers at
/// once over one shared connection.
/// The agent once closed the port when a host client went away and
/// opened it again 200 ms later; the guest kernel drops what arrived in
/// between, so a client that connected in that window never got an
/// answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_answers_a_thousand_short_connections_over_virtio_serial() {
    let vmlinuz = guest_artifact("kernel/vmlinuz", "build-test-kernel");
    let initrd = guest_artifact("kernel/initrd.img", "build-test-kernel");
    let dir = tempfile::tempdir().unwrap();
    let qemu = boot_tiny(&vmlinuz, &initrd, dir.path());
    let (conn, first, _) = qemu
        .agent(
            dir.path(),
            Duration::from_secs(120),
            Duration::from_millis(100),
        )
        .await;
    drop(conn);
    let endpoint = AgentEndpoint::Unix(dir.path().join("agent.sock"));
    let t = Duration::from_secs(10);
    let started = Instant::now();
    for i in 0..1000 {
        let answered = async {
            let conn = banger_agent_host::connect(&endpoint, t)
                .await
                .map_err(|e| e.to_string())?;
            conn.health(t).await.map_err(|e| e.to_string())
        }
        .await;
        match answered {
            Ok(h) => assert_eq!(h.boot_id, first.boot_id),
            Err(e) => panic!(
                "connection {i} of 1000 got no answer: {e}\nconsole:\n{}",
                qemu.console_tail(30)
            ),
        }
    }
    eprintln!("1000 sequential connections in {:?}", started.elapsed());

    // Fifty callers at once, as bangerd has them (boot, stats, stop):
    // QEMU serves one host connection on the port at a time and refuses
    // more, so they share one connection and their requests are
    // multiplexed over it. A slow request does not hold up the others.
    let connections = banger_agent_host::Connections::default();
    let started = Instant::now();
    let calls = (0..50).map(|i| {
        let (connections, endpoint) = (connections.clone(), endpoint.clone());
        tokio::spawn(async move {
            let conn = connections
                .connect(&endpoint, t)
                .await
                .map_err(|e| format!("{i}: {e}"))?;
            if i % 10 == 0 {
                // Nothing listens on port 1: the agent waits it out.
                let _ = conn.wait_port(1, Duration::from_secs(2)).await;
            }
            conn.health(t).await.map_err(|e| format!("{i}: {e}"))
        })
    });
    let failed: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{failed:?}\nconsole:\n{}",
        qemu.console_tail(30)
    );
    eprintln!("50 concurrent callers in {:?}", started.elapsed());
}
