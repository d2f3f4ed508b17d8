//! What makes a registry image boot as a VM: the first-boot wrapper
//! (`agent/banger-first-boot`, started as the kernel's `init=`), the
//! banger agent and its systemd unit, and masks for units that wait for
//! what a microVM never has. Written into the staged root before the ext4
//! image is built.
//!
//! The root is the image's own tree, so its symlinks are untrusted: every
//! path here is resolved inside the root the way the guest would see it
//! (absolute links restart at the root, `..` stops there) and nothing
//! is ever written through a link.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The wrapper, as shipped in the repository.
pub const FIRST_BOOT: &str = include_str!("../../../../agent/banger-first-boot");
/// The agent's unit for guests with systemd.
pub const AGENT_UNIT: &str = include_str!("../../../../agent/banger-agent.service");
/// Where the wrapper lands in the image; the image's `init`.
pub const INIT_PATH: &str = "/usr/lib/banger/first-boot";
/// Where the agent lands (its unit runs it from there).
pub const AGENT_PATH: &str = "/usr/sbin/banger-agent";
/// Units masked in every pulled image, and why.
pub const MASKED: &[(&str, &str)] = &[
    (
        "systemd-firstboot.service",
        "asks for a locale and a root password on the console at first boot",
    ),
    (
        "systemd-networkd-wait-online.service",
        "waits two minutes for links networkd does not manage (banger configures the NIC)",
    ),
    (
        "systemd-udev-settle.service",
        "waits for every device to settle; there is nothing to wait for",
    ),
    (
        "systemd-hwdb-update.service",
        "rebuilds a hardware database a microVM never uses",
    ),
    (
        "getty@tty1.service",
        "a login prompt on a virtual terminal a microVM has no display for",
    ),
];

fn failed(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::failed(format!("cannot {what} {}: {e}", path.display()))
}

/// The components of `path` as the guest would walk them.
fn parts(path: &Path) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

/// `path` (absolute in the guest) resolved inside `root`: symlinks are
/// followed as the guest would (the last one only when `follow_last`),
/// never out of `root`. Components that do not exist yet are kept as
/// they are.
pub fn resolve(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf> {
    let mut pending: VecDeque<OsString> = parts(Path::new(path)).collect();
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            at.pop();
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&at);
        here.push(&part);
        let last = pending.is_empty();
        match std::fs::symlink_metadata(&here) {
            Ok(meta) if meta.file_type().is_symlink() && (follow_last || !last) => {
                hops += 1;
                if hops > 40 {
                    return Err(Error::invalid(format!(
                        "the image's {path} goes through too many symbolic links"
                    )));
                }
                let target =
                    std::fs::read_link(&here).map_err(|e| failed("read the link", &here, e))?;
                if target.is_absolute() {
                    at.clear();
                }
                for t in parts(&target).rev() {
                    pending.push_front(t);
                }
            }
            _ => at.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&at);
    Ok(out)
}

/// Give what was made at `at` to `owner` (uid and gid; the root id of
/// the tools that build the image's file system), unless that is 0.
fn own(at: &Path, owner: u32) -> Result<()> {
    if owner == 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(at, Some(owner), Some(owner))
        .map_err(|e| failed("change the owner of", at, e))
}

/// The directory `dir` (absolute in the guest) inside `root`, made with
/// mode 0755 where missing (whatever bangerd's umask) and given to `owner`.
fn directory(root: &Path, dir: &str, owner: u32) -> Result<PathBuf> {
    let resolved = resolve(root, dir, true)?;
    let rel = resolved.strip_prefix(root).unwrap_or(Path::new(""));
    let mut here = root.to_path_buf();
    for part in rel.components() {
        here.push(part);
        match std::fs::symlink_metadata(&here) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid(format!(
                    "the image's {dir} is not a directory ({} is in the way)",
                    here.strip_prefix(root).unwrap_or(&here).display()
                )));
            }
            Err(_) => {
                std::fs::create_dir(&here).map_err(|e| failed("create", &here, e))?;
                std::fs::set_permissions(&here, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| failed("set the mode of", &here, e))?;
                own(&here, owner)?;
            }
        }
    }
    Ok(resolved)
}

/// The entry `path` (absolute in the guest) cleared for a new file or
/// link: its directory made, whatever was there (a file or a link, never
/// followed) removed. A directory in the way is an error.
fn slot(root: &Path, path: &str, owner: u32) -> Result<PathBuf> {
    let p = Path::new(path);
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(Error::invalid(format!("{path} names no file")));
    };
    let dir = directory(root, &parent.to_string_lossy(), owner)?;
    let at = dir.join(name);
    match std::fs::symlink_metadata(&at) {
        Ok(meta) if meta.is_dir() => Err(Error::invalid(format!(
            "the image has a directory where banger puts {path}"
        ))),
        Ok(_) => std::fs::remove_file(&at)
            .map_err(|e| failed("replace", &at, e))
            .map(|()| at),
        Err(_) => Ok(at),
    }
}

fn write(root: &Path, path: &str, body: &[u8], mode: u32, owner: u32) -> Result<()> {
    let at = slot(root, path, owner)?;
    std::fs::write(&at, body).map_err(|e| failed("write", &at, e))?;
    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))
        .map_err(|e| failed("set the mode of", &at, e))?;
    own(&at, owner)
}

fn link(root: &Path, path: &str, target: &str, owner: u32) -> Result<()> {
    let at = slot(root, path, owner)?;
    std::os::unix::fs::symlink(target, &at).map_err(|e| failed("link", &at, e))?;
    own(&at, owner)
}

/// Check that `agent` (`vm.agent_bin`) can run in any guest: a regular
/// x86-64 ELF executable without an interpreter (statically linked), so
/// neither the image's libc nor its absence matters. The error says what
/// is wrong and what to set.
pub fn check_agent(agent: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let refuse = |why: String| {
        Error::unavailable(format!(
            "the guest agent {} that registry images get {why}: install banger's package, \
             or set vm.agent_bin to a static banger-agent (scripts/build-agent)",
            agent.display()
        ))
    };
    let mut file =
        std::fs::File::open(agent).map_err(|e| refuse(format!("cannot be opened ({e})")))?;
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("cannot be read ({e})")))?;
    if !meta.is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| refuse("is not an ELF executable".into()))?;
    // ELF64, little-endian, EM_X86_64 (62).
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(refuse(
            "is not a 64-bit little-endian ELF executable".into(),
        ));
    }
    if u16::from_le_bytes([header[18], header[19]]) != 62 {
        return Err(refuse("is not built for x86-64".into()));
    }
    let phoff = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
    let phentsize = u64::from(u16::from_le_bytes([header[54], header[55]]));
    let phnum = u64::from(u16::from_le_bytes([header[56], header[57]]));
    if phentsize < 56 || phnum == 0 {
        return Err(refuse("has no program headers".into()));
    }
    let mut table = vec![0u8; usize::try_from(phentsize * phnum).unwrap_or(0)];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|_| refuse("has a truncated program header table".into()))?;
    const PT_INTERP: u32 = 3;
    let dynamic = table
        .chunks_exact(usize::try_from(phentsize).unwrap_or(56))
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == PT_INTERP);
    if dynamic {
        return Err(refuse(
            "is dynamically linked (it names an interpreter), so it would not run in images with another libc".into(),
        ));
    }
    Ok(())
}

/// Make the staged `root` bootable by banger: the first-boot wrapper at
/// [`INIT_PATH`], `agent` at [`AGENT_PATH`] with its unit enabled, and
/// the [`MASKED`] units masked, all owned by `owner` (root in the guest:
/// the tools' root id, [`banger_formats::tool::Tools::root_id`]). Refuses
/// a root without `/bin/sh` (the wrapper is a shell script; a distroless
/// image cannot be a VM).
pub fn prepare(root: &Path, agent: &Path, owner: u32) -> Result<()> {
    let sh = resolve(root, "/bin/sh", true)?;
    let runnable = std::fs::metadata(&sh)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !runnable {
        return Err(Error::invalid(
            "the image has no /bin/sh: banger boots registry images through a shell-script \
             first-boot wrapper, so it needs one (base the image on a distribution such as \
             debian, alpine or fedora)",
        ));
    }
    let agent_bytes = std::fs::read(agent).map_err(|e| {
        Error::unavailable(format!(
            "cannot read the guest agent {} for the image ({e}): install banger's package, \
             or set vm.agent_bin to a static banger-agent",
            agent.display()
        ))
    })?;
    write(root, INIT_PATH, FIRST_BOOT.as_bytes(), 0o755, owner)?;
    write(root, AGENT_PATH, &agent_bytes, 0o755, owner)?;
    write(
        root,
        "/etc/systemd/system/banger-agent.service",
        AGENT_UNIT.as_bytes(),
        0o644,
        owner,
    )?;
    link(
        root,
        "/etc/systemd/system/sysinit.target.wants/banger-agent.service",
        "/etc/systemd/system/banger-agent.service",
        owner,
    )?;
    for (unit, _) in MASKED {
        link(
            root,
            &format!("/etc/systemd/system/{unit}"),
            "/dev/null",
            owner,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executable (mode 0755) file at `path` holding `body`.
    fn executable(path: &Path, body: &str) {
        std::fs::write(path, body).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("mode");
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tmp");
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).expect("usr/bin");
        std::fs::create_dir_all(r.join("usr/lib")).expect("usr/lib");
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).expect("bin");
        executable(&r.join("usr/bin/sh"), "#!/bin/false\n");
        dir
    }

    fn agent(dir: &Path) -> PathBuf {
        let a = dir.join("agent");
        std::fs::write(&a, "agent").expect("agent");
        a
    }

    #[test]
    fn resolution_follows_links_inside_the_root_only() {
        let t = tree();
        let r = t.path();
        std::os::unix::fs::symlink("/usr/lib", r.join("lib")).expect("abs");
        std::os::unix::fs::symlink("../../../../../../etc", r.join("usr/up")).expect("up");
        std::os::unix::fs::symlink("loop", r.join("loop")).expect("loop");
        assert_eq!(
            resolve(r, "/bin/sh", true).expect("sh"),
            r.join("usr/bin/sh")
        );
        assert_eq!(resolve(r, "/bin", false).expect("bin"), r.join("bin"));
        assert_eq!(
            resolve(r, "/lib/banger/x", true).expect("abs"),
            r.join("usr/lib/banger/x")
        );
        // `..` stops at the root: the host's /etc is never reached.
        assert_eq!(
            resolve(r, "/usr/up/passwd", true).expect("up"),
            r.join("etc/passwd")
        );
        assert!(resolve(r, "/loop/x", true).is_err());
    }

    #[test]
    fn a_prepared_root_has_the_wrapper_the_agent_and_the_masks() {
        let t = tree();
        let r = t.path();
        let a = agent(r);
        // The image's links are replaced, not written through.
        std::fs::create_dir_all(r.join("etc/systemd/system")).expect("etc");
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(
            outside.path().join("victim"),
            r.join("etc/systemd/system/banger-agent.service"),
        )
        .expect("trap");
        // What it makes is the sandbox's root's (where this may chown).
        let owner = if nix::unistd::Uid::effective().is_root() {
            banger_formats::tool::SANDBOX_IDS.start
        } else {
            0
        };
        prepare(r, &a, owner).expect("prepare");
        assert!(!outside.path().join("victim").exists());
        if owner != 0 {
            use std::os::unix::fs::MetadataExt;
            for made in [
                "usr/lib/banger",
                INIT_PATH,
                AGENT_PATH,
                "etc/systemd/system/banger-agent.service",
                "etc/systemd/system/sysinit.target.wants",
                "etc/systemd/system/sysinit.target.wants/banger-agent.service",
                "etc/systemd/system/getty@tty1.service",
            ] {
                let meta =
                    std::fs::symlink_metadata(r.join(made.trim_start_matches('/'))).expect("made");
                assert_eq!((meta.uid(), meta.gid()), (owner, owner), "{made}");
            }
            // What the image had stays as it was.
            assert_eq!(std::fs::metadata(r.join("usr/bin")).expect("bin").uid(), 0);
        }

        let init = r.join(INIT_PATH.trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(&init).expect("init"), FIRST_BOOT);
        assert_eq!(
            std::fs::metadata(&init).expect("meta").permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(r.join("usr/lib/banger"))
                .expect("dir")
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read(r.join("usr/sbin/banger-agent")).expect("agent"),
            b"agent"
        );
        let unit = r.join("etc/systemd/system/banger-agent.service");
        assert!(!std::fs::symlink_metadata(&unit).expect("unit").is_symlink());
        assert_eq!(
            std::fs::read_link(
                r.join("etc/systemd/system/sysinit.target.wants/banger-agent.service")
            )
            .expect("wants"),
            Path::new("/etc/systemd/system/banger-agent.service")
        );
        for (masked, _) in MASKED {
            assert_eq!(
                std::fs::read_link(r.join("etc/systemd/system").join(masked)).expect("mask"),
                Path::new("/dev/null")
            );
        }
        // Twice is the same.
        prepare(r, &a, owner).expect("again");
    }

    #[test]
    fn images_without_a_shell_or_without_an_agent_are_refused() {
        let t = tree();
        let r = t.path();
        let e = prepare(r, &r.join("nonesuch"), 0).expect_err("no agent");
        assert!(e.message.contains("vm.agent_bin"), "{e:?}");
        std::fs::remove_file(r.join("usr/bin/sh")).expect("rm");
        let e = prepare(r, &agent(r), 0).expect_err("no shell");
        assert!(e.message.contains("/bin/sh"), "{e:?}");
        assert!(!r.join("usr/lib/banger").exists());
    }

    /// A minimal ELF64 x86-64 header with one program header of `ptype`.
    fn elf(ptype: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&ptype.to_le_bytes());
        b
    }

    #[test]
    fn only_a_static_x86_64_agent_passes() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let check = |name: &str, bytes: &[u8]| {
            let p = d.join(name);
            std::fs::write(&p, bytes).expect("write");
            check_agent(&p)
        };
        // PT_LOAD only: static.
        check("static", &elf(1)).expect("static passes");
        let e = check("dynamic", &elf(3)).expect_err("PT_INTERP");
        assert!(e.message.contains("dynamically linked"), "{e:?}");
        let mut arm = elf(1);
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        let e = check("arm", &arm).expect_err("aarch64");
        assert!(e.message.contains("x86-64"), "{e:?}");
        let e = check("script", b"#!/bin/sh\necho hi\n").expect_err("script");
        assert!(e.message.contains("ELF"), "{e:?}");
        let e = check("short", &elf(1)[..70]).expect_err("truncated");
        assert!(e.message.contains("truncated"), "{e:?}");
        let e = check_agent(d).expect_err("a directory");
        assert!(e.message.contains("regular file"), "{e:?}");
        let e = check_agent(&d.join("nonesuch")).expect_err("missing");
        assert!(e.message.contains("vm.agent_bin"), "{e:?}");
        assert_eq!(e.kind, crate::error::ErrorKind::Unavailable);
        // This test binary: dynamically linked on a glibc host.
        let me = std::env::current_exe().expect("exe");
        if std::fs::read(&me)
            .expect("read")
            .windows(16)
            .any(|w| w == b"/lib64/ld-linux")
        {
            assert!(check_agent(&me).is_err());
        }
    }

    #[test]
    fn the_wrapper_is_valid_posix_shell() {
        let dir = tempfile::tempdir().expect("tmp");
        let script = dir.path().join("first-boot");
        std::fs::write(&script, FIRST_BOOT).expect("write");
        for shell in ["sh", "bash"] {
            let out = std::process::Command::new(shell)
                .arg("-n")
                .arg(&script)
                .output()
                .expect("shell");
            assert!(
                out.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Run `snippet` in `sh` (dash on Debian, the strictest POSIX shell
    /// here) after sourcing the wrapper's functions; `dir` holds the
    /// script and whatever the snippet needs. Returns stdout.
    fn wrapper_sh(dir: &Path, snippet: &str) -> String {
        let script = dir.join("first-boot");
        std::fs::write(&script, FIRST_BOOT).expect("write");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(". {}; {snippet}", script.display()))
            .env("BANGER_FIRST_BOOT_SOURCED", "1")
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{snippet}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_wrapper_knows_the_families_by_id_then_id_like() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let cases = [
            ("ID=debian", "debian"),
            ("ID=ubuntu\nID_LIKE=debian", "debian"),
            ("ID=alpine", "alpine"),
            ("ID=fedora", "fedora"),
            ("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"", "fedora"),
            ("ID=arch", "arch"),
            (
                "ID=\"opensuse-tumbleweed\"\nID_LIKE=\"opensuse suse\"",
                "suse",
            ),
            ("ID=sles", "suse"),
            // Unknown ID, known ID_LIKE: the fallback.
            ("ID=pop\nID_LIKE=\"ubuntu debian\"", "debian"),
            ("ID=linuxmint\nID_LIKE=ubuntu", "debian"),
            ("ID=endeavouros\nID_LIKE=arch", "arch"),
            ("ID=postmarketos\nID_LIKE=alpine", "alpine"),
            ("ID=nixos", "none"),
            ("NAME=nothing", "none"),
        ];
        for (i, (release, want)) in cases.iter().enumerate() {
            let file = d.join(format!("os-release-{i}"));
            std::fs::write(&file, format!("{release}\n")).expect("write");
            let got = wrapper_sh(d, &format!("family {} || echo none", file.display()));
            assert_eq!(got.trim(), *want, "{release}");
        }
        let got = wrapper_sh(d, "family ./no-such-file || echo none");
        assert_eq!(got.trim(), "none");
    }

    #[test]
    fn the_wrapper_turns_netmasks_into_prefixes() {
        let dir = tempfile::tempdir().expect("tmp");
        for (mask, want) in [
            ("255.255.255.0", "24"),
            ("255.255.0.0", "16"),
            ("255.255.255.252", "30"),
            ("255.255.240.0", "20"),
            ("255.128.0.0", "9"),
            ("255.255.255.255", "32"),
            ("", "24"),
            ("nonsense", "24"),
            ("255.255.7.0", "24"),
        ] {
            let got = wrapper_sh(dir.path(), &format!("prefix_of '{mask}'"));
            assert_eq!(got.trim(), want, "{mask:?}");
        }
    }

    /// A long install keeps the console busy (the host reboots a guest
    /// whose console is silent for 30 s before its agent answers): the
    /// package manager's output and a heartbeat reach the console, the
    /// output the log too, and its exit status comes back.
    #[test]
    fn a_long_install_keeps_the_console_busy_and_keeps_its_status() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let apk = bin.join("apk");
        executable(
            &apk,
            "#!/bin/sh\necho fetching\nsleep 2.5\necho broken >&2\nexit 7\n",
        );
        let got = wrapper_sh(
            d,
            &format!(
                "PATH={}:$PATH; console=./console; log=./log; rc_file=./rc; beat_secs=1; \
                 install_loudly alpine; echo status=$?",
                bin.display()
            ),
        );
        assert_eq!(got.trim(), "status=7");
        let console = std::fs::read_to_string(d.join("console")).expect("console");
        assert!(
            console.contains("fetching") && console.contains("broken"),
            "{console}"
        );
        assert!(
            console.contains("first boot: still installing"),
            "{console}"
        );
        let log = std::fs::read_to_string(d.join("log")).expect("log");
        assert_eq!(log, "fetching\nbroken\n");
        assert!(!d.join("rc").exists());
    }

    /// Each family's package manager is asked for systemd and an SSH
    /// server (fake package managers on PATH record their arguments);
    /// apt runs with a policy-rc.d that stops services from starting,
    /// which is gone afterwards, and finishes a cut-short dpkg first.
    #[test]
    fn the_wrapper_asks_each_package_manager_for_systemd_and_sshd() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let fake = |name: &str| {
            let body = format!(
                "#!/bin/sh\necho \"{name} $* policy=$([ -x \"$POLICY\" ] && \"$POLICY\"; echo $?)\" >>\"$CALLS\"\n"
            );
            executable(&bin.join(name), &body);
        };
        for name in [
            "dpkg", "apt-get", "apk", "microdnf", "yum", "pacman", "zypper",
        ] {
            fake(name);
        }
        let calls = d.join("calls");
        let policy = d.join("policy-rc.d");
        let run = |family: &str| {
            let _ = std::fs::remove_file(&calls);
            wrapper_sh(
                d,
                &format!(
                    "PATH={}:$PATH; policy_rc_d={}; export CALLS={} POLICY={}; install_packages {family}",
                    bin.display(),
                    policy.display(),
                    calls.display(),
                    policy.display()
                ),
            );
            std::fs::read_to_string(&calls).expect("calls")
        };
        assert_eq!(
            run("debian"),
            "dpkg --configure -a policy=101\n\
             apt-get update policy=101\n\
             apt-get install -y --no-install-recommends systemd systemd-sysv udev openssh-server policy=101\n"
        );
        assert!(!policy.exists(), "policy-rc.d left behind");
        assert_eq!(
            run("alpine"),
            "apk add --no-cache openssh-server policy=1\n"
        );
        // No dnf here: microdnf is next.
        assert_eq!(
            run("fedora"),
            "microdnf install -y systemd openssh-server policy=1\n"
        );
        assert_eq!(
            run("arch"),
            "pacman -Sy --noconfirm --needed systemd openssh policy=1\n"
        );
        assert_eq!(
            run("suse"),
            "zypper --non-interactive install --no-recommends systemd openssh-server policy=1\n"
        );
    }
}
