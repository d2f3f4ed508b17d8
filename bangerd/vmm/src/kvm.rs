//! Whether KVM really runs guests here, for `vm.accel = "auto"`.
//!
//! `/dev/kvm` opening, and even `KVM_CREATE_VM` succeeding, prove little:
//! on a PVM host both work and a stock guest kernel still hangs in early
//! boot. So the probe boots the guest kernel VMs will use under QEMU with
//! `-accel kvm`, with no disk and `panic=-1`, and watches its console: a
//! kernel that gets as far as looking for its root filesystem (or
//! panicking for want of one) has passed every stage that needs working
//! virtualization. A stall is a verdict too, after `timeout`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Console lines a kernel prints only after the real-mode setup, the
/// switch to long mode, interrupts and timers work.
const PAST_EARLY_BOOT: &[&str] = &[
    "Freeing unused kernel",
    "VFS: Unable to mount root",
    "Run /init",
    "Kernel panic",
];

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    /// A guest kernel got through early boot in this time.
    Usable(Duration),
    /// Why KVM cannot be used; VMs fall back to software emulation.
    Unusable(String),
    /// Why there was no probe (no QEMU to run it with, or no need).
    NotProbed(String),
}

impl KvmVerdict {
    /// Whether guests can run under KVM.
    pub fn usable(&self) -> bool {
        matches!(self, Self::Usable(_))
    }
}

/// The QEMU arguments that boot `kernel` with no disk under `accel`
/// (`kvm`, or `tcg` to check the probe itself), console to `console`.
pub fn probe_args(kernel: &Path, accel: &str, console: &Path) -> Vec<String> {
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let mut a: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push(kernel.to_string_lossy().into_owned());
    a.push("-append".into());
    a.push(if accel == "kvm" {
        "console=ttyS0 panic=-1".into()
    } else {
        // As for every TCG boot.
        format!("console=ttyS0 panic=-1 tsc=unstable {}", super::TCG_TSC_KHZ)
    });
    a.push("-serial".into());
    a.push(format!(
        "file:{}",
        console.to_string_lossy().replace(',', ",,")
    ));
    a
}

/// The probe's QEMU with its console handed over as descriptor 3 (a
/// jailed probe's QEMU opens nothing of ours by path).
fn jailed_probe_args(kernel: &Path, accel: &str, console: &Path) -> Vec<String> {
    let mut a = probe_args(kernel, accel, console);
    a.truncate(a.len() - 2);
    let label = console.to_string_lossy().replace(',', ",,");
    a.extend([
        "-add-fd".to_owned(),
        format!("fd=3,set=1,opaque={label}"),
        "-chardev".to_owned(),
        "file,id=console,path=/dev/fdset/1,append=on".to_owned(),
        "-serial".to_owned(),
        "chardev:console".to_owned(),
    ]);
    a
}

/// Where a probe's QEMU runs: as bangerd's user, or jailed by bangerd's
/// binary `helper` ([`crate::jail`]) as the VMMs' own first uid.
#[derive(Debug, Clone, Copy)]
pub enum ProbeAs<'a> {
    /// As the caller's user (the drivers' own tests).
    Caller,
    /// Through `helper vmm-exec`.
    Jailed(&'a Path),
}

/// Boot `kernel` under KVM with `qemu` and judge it within `timeout`.
/// `kvm` is the device node (`/dev/kvm`); `work` a directory for the
/// console file.
pub async fn probe(
    qemu: &Path,
    kernel: &Path,
    kvm: &Path,
    work: &Path,
    timeout: Duration,
    by: ProbeAs<'_>,
) -> KvmVerdict {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return KvmVerdict::Unusable(format!("cannot open {}: {e}", kvm.display()));
    }
    boot_probe(qemu, kernel, "kvm", work, timeout, by).await
}

/// Boot `kernel` alone under `accel` and judge it within `timeout`.
pub async fn boot_probe(
    qemu: &Path,
    kernel: &Path,
    accel: &str,
    work: &Path,
    timeout: Duration,
    by: ProbeAs<'_>,
) -> KvmVerdict {
    let dir = match tempfile::Builder::new()
        .prefix("kvm-probe.")
        .tempdir_in(work)
    {
        Ok(d) => d,
        Err(e) => {
            return KvmVerdict::Unusable(format!(
                "cannot make a probe directory in {}: {e}",
                work.display()
            ));
        }
    };
    let console = dir.path().join("console");
    let started = Instant::now();
    // The probe dies with the daemon, even a killed one (kill_on_drop
    // needs the daemon alive): a probe left behind would spin forever on
    // a host whose KVM hangs the guest. The signal follows the thread
    // that forks it, a runtime thread that lives as long as the daemon.
    let parent = nix::unistd::getpid();
    let mut cmd = match by {
        ProbeAs::Caller => {
            let mut cmd = tokio::process::Command::new(qemu);
            cmd.args(probe_args(kernel, accel, &console));
            cmd
        }
        ProbeAs::Jailed(helper) => {
            let jail = crate::jail::Jail {
                uid: crate::jail::VMM_GROUP,
                groups: vec![crate::jail::VMM_GROUP],
                fds: vec![crate::jail::Pass {
                    fd: 3,
                    source: crate::jail::Source::File {
                        path: console.clone(),
                        access: crate::jail::Access::Append,
                    },
                }],
                // Leaving root clears the parent-death signal: set again.
                parent: Some(parent.as_raw().unsigned_abs()),
                // The probe is bangerd's child, never a unit.
                private_network: true,
                handoff: None,
            };
            let (program, argv) =
                jail.command(helper, qemu, &jailed_probe_args(kernel, accel, &console));
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(argv);
            cmd
        }
    };
    // A jailed probe runs as another uid, which bangerd (no CAP_KILL in
    // its unit) may not signal: its keeper kills it when this pipe ends.
    let jailed = matches!(by, ProbeAs::Jailed(_));
    cmd.stdin(if jailed {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe system calls prctl(2) and getppid(2); its errors
    // are made from raw error numbers, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The daemon may have died before prctl took effect.
            if nix::unistd::getppid() != parent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return KvmVerdict::Unusable(format!("cannot run {}: {e}", qemu.display()));
        }
    };
    let passed = |text: &str| PAST_EARLY_BOOT.iter().any(|m| text.contains(m));
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if passed(&text) {
            end(&mut child).await;
            return KvmVerdict::Usable(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if passed(&text) {
                return KvmVerdict::Usable(started.elapsed());
            }
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = stderr.read_to_string(&mut err).await;
            }
            return KvmVerdict::Unusable(format!(
                "qemu -accel {accel} exited ({status}) before the guest kernel booted: {}",
                last_line(&err).unwrap_or("no message")
            ));
        }
        if started.elapsed() > timeout {
            end(&mut child).await;
            let seen = match last_line(&text) {
                Some(line) => format!("its console stopped at {line:?}"),
                None => "no console output".to_owned(),
            };
            return KvmVerdict::Unusable(format!(
                "a guest kernel did not get through early boot under {accel} in {} s ({seen})",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// End a probe: close its standard input (a jailed probe's keeper then
/// kills it), kill it (where bangerd may), and reap it.
async fn end(child: &mut tokio::process::Child) {
    drop(child.stdin.take());
    let _ = child.start_kill();
    let _ = child.wait().await;
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rev().find(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_boots_the_kernel_alone_under_kvm() {
        let args = probe_args(Path::new("/k/vm,linuz"), "kvm", Path::new("/t/con,sole"));
        let line = args.join(" ");
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(line.contains("-no-reboot"), "{line}");
        assert!(
            !line.contains("-drive") && !line.contains("-initrd"),
            "{line}"
        );
        assert!(line.contains("panic=-1"), "{line}");
        // -kernel takes a plain path; option values double their commas.
        assert!(line.contains("-kernel /k/vm,linuz"), "{line}");
        assert!(line.ends_with("-serial file:/t/con,,sole"), "{line}");
        let jailed = jailed_probe_args(Path::new("/k/vmlinuz"), "kvm", Path::new("/t/con,sole"));
        let line = jailed.join(" ");
        assert!(
            line.ends_with(
                "-add-fd fd=3,set=1,opaque=/t/con,,sole -chardev file,id=console,path=/dev/fdset/1,append=on -serial chardev:console"
            ),
            "{line}"
        );
    }

    /// The probe with the real test kernel and QEMU: under TCG it must see
    /// the kernel through early boot (so the markers match a real
    /// console); under KVM it must come back with a verdict within its
    /// time, whichever it is (TESTBED.md: on this PVM host, a stall).
    #[tokio::test]
    async fn a_real_kernel_is_judged_under_tcg_and_kvm() {
        let kernel = banger_testbed::guest_artifact("kernel/vmlinuz", "build-test-kernel");
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        let dir = tempfile::tempdir().expect("tempdir");
        let tcg = boot_probe(
            qemu,
            &kernel,
            "tcg",
            dir.path(),
            Duration::from_secs(60),
            ProbeAs::Caller,
        )
        .await;
        assert!(tcg.usable(), "{tcg:?}");
        let started = Instant::now();
        let kvm = probe(
            qemu,
            &kernel,
            Path::new("/dev/kvm"),
            dir.path(),
            Duration::from_secs(8),
            ProbeAs::Caller,
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(12), "{kvm:?}");
        match &kvm {
            KvmVerdict::Usable(t) => assert!(*t < Duration::from_secs(8)),
            KvmVerdict::NotProbed(why) => panic!("QEMU is installed: {why}"),
            KvmVerdict::Unusable(why) => assert!(
                why.contains("early boot") || why.contains("/dev/kvm") || why.contains("exited"),
                "{why}"
            ),
        }
        // Nothing is left running or lying around.
        assert_eq!(std::fs::read_dir(dir.path()).expect("the dir").count(), 0);
    }

    #[test]
    fn last_lines_skip_blanks() {
        assert_eq!(last_line("a\nb\n\n  \n"), Some("b"));
        assert_eq!(last_line(""), None);
    }

    #[tokio::test]
    async fn a_missing_device_or_program_is_unusable_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = probe(
            Path::new("/bin/true"),
            Path::new("/nonexistent"),
            Path::new("/nonexistent/kvm"),
            dir.path(),
            Duration::from_secs(5),
            ProbeAs::Caller,
        )
        .await;
        assert!(
            matches!(&v, KvmVerdict::Unusable(m) if m.contains("/nonexistent/kvm")),
            "{v:?}"
        );
        if Path::new("/dev/kvm").exists() {
            let v = probe(
                Path::new("/nonexistent/qemu"),
                Path::new("/nonexistent"),
                Path::new("/dev/kvm"),
                dir.path(),
                Duration::from_secs(5),
                ProbeAs::Caller,
            )
            .await;
            assert!(
                matches!(&v, KvmVerdict::Unusable(m) if m.contains("cannot run")),
                "{v:?}"
            );
        }
    }
}
