//! `banger image pull REGISTRY/REPO:TAG` through the real daemon and bus
//! from a real registry (`docker-registry`) on loopback, filled with
//! images built by `umoci` and pushed by `skopeo`: two layers (the second
//! deletes a file of the first, so it carries a whiteout), a setuid file,
//! a hard link, a symlink, a file owned by a non-root uid, and a
//! multi-arch index whose linux/amd64 image must be the one chosen. The
//! pulled root file system (loop-mounted read-only by the test; bangerd
//! itself mounts nothing) must hold exactly the source tree. Needs root,
//! the guest artifacts, docker-registry, umoci and skopeo.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use banger_testbed::output_text as text;
use banger_testbed::{
    NetNs, Options, Registry, TestBed, eventually, free_loopback_port, guest_artifact, sha256_hex,
};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `banger kernel import` of the test kernel (build-test-kernel) as
/// `test-kernel`.
fn test_kernel_import() -> Vec<String> {
    let vmlinuz = guest_artifact("kernel/vmlinuz", "build-test-kernel");
    let initrd = guest_artifact("kernel/initrd.img", "build-test-kernel");
    let mut args: Vec<String> = ["kernel", "import", "--name", "test-kernel", "--kernel"]
        .map(String::from)
        .into();
    args.push(vmlinuz.display().to_string());
    args.push("--initrd".into());
    args.push(initrd.display().to_string());
    args
}

fn argv(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn registry() -> Registry {
    Registry::start(None, "")
}

/// An OCI layout `dir` with image `:t` for `arch`: returns the unpacked
/// bundle whose rootfs is the image's final tree.
fn umoci_image(dir: &Path, arch: &str, fill: impl Fn(&Path, u8)) -> PathBuf {
    let layout = dir.to_str().unwrap();
    run(Command::new("umoci").args(["init", "--layout", layout]));
    let image = format!("{layout}:t");
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci").args(["config", "--image", &image, "--architecture", arch]));
    let bundle = dir.with_extension("bundle");
    // Two layers: `fill` makes the first tree, then changes it.
    for step in 0..2u8 {
        if step == 0 {
            run(Command::new("umoci")
                .args(["unpack", "--image", &image])
                .arg(&bundle));
        }
        fill(&bundle.join("rootfs"), step);
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
    }
    bundle.join("rootfs")
}

fn fill_amd64(root: &Path, step: u8) {
    let w = |p: &str, body: &str| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    };
    if step == 0 {
        w("etc/hostname", "oci\n");
        w("etc/gone", "the second layer deletes this\n");
        w("arch", "amd64\n");
        w("root/.profile", "export BANGER=1\n");
        w("usr/bin/sh", "#!/bin/false\n");
        std::fs::set_permissions(
            root.join("usr/bin/sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        w("usr/bin/tool", "#!/bin/sh\necho tool\n");
        std::fs::set_permissions(
            root.join("usr/bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-link")).unwrap();
        w("usr/bin/ping", "#!/bin/sh\necho ping\n");
        run(Command::new("setcap")
            .arg("cap_net_raw+ep")
            .arg(root.join("usr/bin/ping")));
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        w("home/user/notes", "mine\n");
        std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(root.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
    } else {
        std::fs::remove_file(root.join("etc/gone")).unwrap();
        w("etc/added", "second layer\n");
    }
}

/// One entry of a tree, for comparing trees.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: String,
}

/// Every entry under `root` (not following symlinks), and the groups of
/// paths sharing an inode.
fn tree(root: &Path) -> (BTreeMap<PathBuf, Node>, Vec<Vec<PathBuf>>) {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let (kind, content) = if meta.file_type().is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&path)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            } else if meta.is_dir() {
                stack.push(path.clone());
                ("dir", String::new())
            } else {
                inodes.entry(meta.ino()).or_default().push(rel.clone());
                ("file", sha256_hex(&std::fs::read(&path).unwrap()))
            };
            nodes.insert(
                rel,
                Node {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    content,
                },
            );
        }
    }
    let mut links: Vec<Vec<PathBuf>> = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    links.sort();
    (nodes, links)
}

/// The image's root file system mounted read-only; unmounted on drop.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(image)
            .arg(dir.path()));
        Self(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn oci_images_pull_from_a_registry_into_exact_bootable_trees() {
    let kernel_import = test_kernel_import();
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let source = umoci_image(&work.path().join("amd"), "amd64", fill_amd64);
    let push = |layout: &str, repo: &str, all: bool| {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        cmd.arg(format!("oci:{}:t", work.path().join(layout).display()))
            .arg(format!("docker://127.0.0.1:{}/test/{repo}:t", reg.port));
        run(&mut cmd);
    };
    push("amd", "img", false);

    // A multi-arch index: an arm64 image listed first, then the amd64 one.
    umoci_image(&work.path().join("arm"), "arm64", |root, step| {
        if step == 0 {
            std::fs::write(root.join("arch"), "arm64\n").unwrap();
        }
    });
    multi_arch_layout(work.path());
    push("multi", "multi", true);

    let agent = guest_artifact("banger-agent", "build-agent");
    let bed = TestBed::start(Options {
        config_toml: Some(format!("[vm]\nagent_bin = \"{}\"\n", agent.display())),
        ..Options::default()
    })
    .expect("test bed");
    let banger = |args: &[&str]| bed.banger().args(args).output().unwrap();
    let out = banger(&argv(&kernel_import));
    assert!(out.status.success(), "{}", text(&out));

    let reference = format!("127.0.0.1:{}/test/img:t", reg.port);
    let out = banger(&[
        "--json",
        "image",
        "pull",
        &reference,
        "--kernel-ref",
        "test-kernel",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = &report["image"];
    assert_eq!(image["name"], "img-t", "{report}");
    assert_eq!(image["managed"], true, "{report}");
    assert_eq!(image["kernel_name"], "test-kernel", "{report}");
    let stages: Vec<&str> = report["job"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "fetch layers",
            "apply layers",
            "first-boot wrapper",
            "build rootfs",
            "make work-seed",
            "digest",
            "record"
        ],
        "{report}"
    );

    // It boots through the first-boot wrapper and has an SSH server.
    assert_eq!(image["init"], "/usr/lib/banger/first-boot", "{report}");
    assert_eq!(
        image["services"],
        serde_json::json!([{"name": "ssh", "port": 22}]),
        "{report}"
    );

    // Exactly the source tree: types, modes (setuid), owners, contents,
    // link targets and hard links; the whited-out file is gone. Besides
    // it, only what banger adds to boot it: the wrapper, the agent, its
    // unit and the masked units.
    let rootfs = PathBuf::from(image["rootfs"].as_str().unwrap());
    let mounted = Mounted::new(&rootfs);
    let (want, want_links) = tree(&source);
    let (mut got, got_links) = tree(mounted.0.path());
    let added: Vec<PathBuf> = got
        .keys()
        .filter(|p| !want.contains_key(*p))
        .cloned()
        .collect();
    for p in &added {
        assert!(
            ["usr/lib", "usr/sbin", "etc/systemd"]
                .iter()
                .any(|prefix| p.starts_with(prefix)),
            "unexpected {p:?} in the pulled image"
        );
    }
    let node = |got: &BTreeMap<PathBuf, Node>, p: &str| {
        got.get(Path::new(p))
            .unwrap_or_else(|| panic!("no {p} in {added:?}"))
            .content
            .clone()
    };
    assert_eq!(
        node(&got, "usr/sbin/banger-agent"),
        sha256_hex(&std::fs::read(&agent).unwrap())
    );
    assert_eq!(
        node(&got, "usr/lib/banger/first-boot"),
        sha256_hex(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/banger-first-boot")
            )
            .unwrap()
        )
    );
    assert_eq!(got[Path::new("usr/lib/banger/first-boot")].mode, 0o755);
    assert_eq!(
        node(
            &got,
            "etc/systemd/system/sysinit.target.wants/banger-agent.service"
        ),
        "/etc/systemd/system/banger-agent.service"
    );
    assert_eq!(
        node(&got, "etc/systemd/system/systemd-firstboot.service"),
        "/dev/null"
    );
    // What banger adds is root's in the guest (the tools' sandbox that
    // builds the file system sees the tree's owners shifted).
    for p in &added {
        assert_eq!((got[p].uid, got[p].gid), (0, 0), "{p:?}");
    }
    // The file capability came through the layers and the sandbox.
    let caps = run(Command::new("getcap").arg(mounted.0.path().join("usr/bin/ping")));
    assert!(caps.contains("cap_net_raw=ep"), "{caps}");
    got.retain(|p, _| !added.contains(p));
    assert_eq!(got, want);
    assert_eq!(got_links, want_links);
    assert!(!got.contains_key(Path::new("etc/gone")));
    assert_eq!(got[Path::new("usr/bin/tool")].mode, 0o4755);
    assert_eq!(got[Path::new("home/user/notes")].uid, 1000);
    assert_eq!(
        want_links,
        [vec![
            PathBuf::from("usr/bin/tool"),
            PathBuf::from("usr/bin/tool-link")
        ]]
    );
    drop(mounted);
    // Its work-seed is its /root.
    let seed = PathBuf::from(image["work_seed"].as_str().unwrap());
    let listing = run(Command::new("debugfs").args(["-R", "ls -l /"]).arg(&seed));
    assert!(listing.contains(".profile"), "{listing}");

    // From the index, the linux/amd64 image.
    let multi = format!("127.0.0.1:{}/test/multi:t", reg.port);
    let out = banger(&[
        "--json",
        "image",
        "pull",
        &multi,
        "--kernel-ref",
        "test-kernel",
        "--name",
        "multi",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mounted = Mounted::new(Path::new(report["image"]["rootfs"].as_str().unwrap()));
    assert_eq!(
        std::fs::read_to_string(mounted.0.path().join("arch")).unwrap(),
        "amd64\n"
    );
    drop(mounted);

    // Refusals: no such tag, no such kernel, an existing name; nothing left.
    for (args, why) in [
        (
            vec![
                format!("127.0.0.1:{}/test/img:nope", reg.port),
                "--kernel-ref".into(),
                "test-kernel".into(),
            ],
            "no such image",
        ),
        (
            vec![
                reference.clone(),
                "--kernel-ref".into(),
                "nonesuch".into(),
                "--name".into(),
                "x".into(),
            ],
            "no kernel named",
        ),
        (
            vec![
                reference.clone(),
                "--kernel-ref".into(),
                "test-kernel".into(),
            ],
            "already exists",
        ),
    ] {
        let mut all = vec!["image".to_owned(), "pull".to_owned()];
        all.extend(args);
        let out = bed.banger().args(&all).output().unwrap();
        assert!(!out.status.success(), "{all:?}");
        assert!(text(&out).contains(why), "{all:?}: {}", text(&out));
    }
    let images = bed.state_dir().join("images");
    let staging: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| e.path())
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

/// `work/multi`: an OCI layout whose `:t` is an image index of the arm64
/// image of `work/arm` and the amd64 image of `work/amd`.
fn multi_arch_layout(work: &Path) {
    let multi = work.join("multi");
    let blobs = multi.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        multi.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut manifests = Vec::new();
    for (layout, arch) in [("arm", "arm64"), ("amd", "amd64")] {
        let from = work.join(layout);
        for blob in std::fs::read_dir(from.join("blobs/sha256"))
            .unwrap()
            .flatten()
        {
            let to = blobs.join(blob.file_name());
            if !to.exists() {
                std::fs::copy(blob.path(), to).unwrap();
            }
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(from.join("index.json")).unwrap()).unwrap();
        let mut manifest = index["manifests"][0].clone();
        manifest.as_object_mut().unwrap().remove("annotations");
        manifest["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
        manifests.push(manifest);
    }
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let digest = sha256_hex(&nested);
    std::fs::write(blobs.join(&digest), &nested).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{digest}"),
            "size": nested.len(),
            "annotations": { "org.opencontainers.image.ref.name": "t" },
        }],
    });
    std::fs::write(multi.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

/// A registry behind token auth (docker-registry `auth: token`, with the
/// test's token service in `tests/registry/token-server.py` signing JWTs
/// with an openssl key): an anonymous pull and a wrong password are
/// refused with what to do; the login from a docker auth file and one
/// from `--username` with `--password-stdin` both pull; the token
/// service saw the username, and the password is in no log.
#[test]
fn a_registry_behind_token_auth_takes_the_right_login_only() {
    let kernel_import = test_kernel_import();
    let agent = guest_artifact("banger-agent", "build-agent");
    const PASSWORD: &str = "tok-3f9a c0de";
    let work = tempfile::tempdir().unwrap();
    let (key, cert) = (work.path().join("key.pem"), work.path().join("cert.pem"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=banger-test-tokens", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null()));
    let token_port = free_loopback_port().unwrap();
    let token_log = work.path().join("tokens.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry/token-server.py");
    let _tokens = Killed(
        Command::new("python3")
            .arg(&script)
            .arg(token_port.to_string())
            .args([&key, &cert])
            .args(["banger-test-tokens", "dev", PASSWORD])
            .arg(&token_log)
            .spawn()
            .unwrap(),
    );
    let listening = eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", token_port))
            .ok()
            .map(|_| ())
    });
    assert!(listening.is_some(), "the token service did not listen");
    let reg = Registry::start(
        None,
        &format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    \
             service: banger-test-registry\n    issuer: banger-test-tokens\n    \
             rootcertbundle: {}\n",
            cert.display()
        ),
    );
    umoci_image(&work.path().join("amd"), "amd64", fill_amd64);
    let reference = format!("127.0.0.1:{}/team/private:t", reg.port);
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("dev:{PASSWORD}"))
        .arg(format!("oci:{}:t", work.path().join("amd").display()))
        .arg(format!("docker://{reference}")));

    let mut bed = TestBed::start(Options {
        config_toml: Some(format!("[vm]\nagent_bin = \"{}\"\n", agent.display())),
        start_daemon: false,
        ..Options::default()
    })
    .expect("test bed");
    // Everything logged, oci-client's and reqwest's requests included.
    bed.start_daemon_with_env(&[("RUST_LOG", "debug")])
        .expect("bangerd");
    let home = tempfile::tempdir().unwrap();
    let banger = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = bed.banger();
        cmd.args(args)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    };
    let out = banger(&argv(&kernel_import), None);
    assert!(out.status.success(), "{}", text(&out));
    let pull = |extra: &[&str], stdin: Option<&str>| {
        let mut args = vec!["--json", "image", "pull", reference.as_str()];
        args.extend_from_slice(&["--kernel-ref", "test-kernel"]);
        args.extend_from_slice(extra);
        banger(&args, stdin)
    };
    let refused = |out: &Output, says: &str| {
        assert!(!out.status.success(), "pulled: {}", text(out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let error = &report["error"];
        assert_eq!(
            error["name"], "org.banger.Error.PermissionDenied",
            "{report}"
        );
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{report}");
    };

    // Bad logins on the bus itself: refused before any job.
    for (args, says) in [
        (&["1", "username", "s", "dev"][..], "go together"),
        (&["2", "username", "s", "d:v", "password", "s", "x"], "':'"),
        (
            &["2", "username", "s", "dev", "password", "s", "a\nb"],
            "control",
        ),
        (
            &["2", "username", "s", "dev", "password", "u", "7"],
            "must be a string",
        ),
    ] {
        let mut argv = vec![
            "call",
            "org.banger.Manager",
            "/org/banger/Manager",
            "org.banger.Manager",
            "PullImage",
            "sa{sv}",
            reference.as_str(),
        ];
        argv.extend_from_slice(args);
        let out = bed.busctl(argv);
        let said = text(&out);
        assert!(!out.status.success(), "{args:?}: {said}");
        assert!(said.contains(says), "{args:?}: {said}");
    }

    // Anonymous: refused, with how to log in.
    refused(&pull(&[], None), "podman login");
    // A wrong password: refused, naming the user.
    let out = pull(&["--username", "dev", "--password-stdin"], Some("wrong\n"));
    refused(&out, "refused the credentials given");
    // Nothing of either is left.
    let images = bed
        .banger()
        .args(["--json", "image", "list"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&images.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let leftovers: Vec<_> = std::fs::read_dir(bed.state_dir().join("images"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The login docker or podman stored: a docker auth file in $HOME.
    let docker = home.path().join(".docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("dev:{PASSWORD}"))
    };
    std::fs::write(
        docker.join("config.json"),
        serde_json::json!({"auths": {format!("http://127.0.0.1:{}", reg.port): {"auth": auth}}})
            .to_string(),
    )
    .unwrap();
    let out = pull(&["--name", "from-file"], None);
    assert!(out.status.success(), "{}", text(&out));
    // --username with the password (a token with a space) on stdin.
    std::fs::remove_dir_all(&docker).unwrap();
    let out = pull(
        &[
            "--name",
            "from-stdin",
            "--username",
            "dev",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["image"]["name"], "from-stdin", "{report}");

    // The token service saw dev refused once and granted since; the
    // password went nowhere else.
    let seen = std::fs::read_to_string(&token_log).unwrap();
    let lines: Vec<serde_json::Value> = seen
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["user"] == "dev" && l["granted"] == false),
        "{seen}"
    );
    assert!(
        lines.iter().any(|l| l["user"] == "dev"
            && l["granted"] == true
            && l["scope"][0] == "repository:team/private:pull"),
        "{seen}"
    );
    let logged = || {
        let mut all = bed.daemon_log();
        for entry in bed.daemon_journal() {
            all.push_str(entry["MESSAGE"].as_str().unwrap_or_default());
            all.push('\n');
        }
        all
    };
    let log = eventually(Duration::from_secs(10), || {
        let log = logged();
        log.contains("image layers fetched").then_some(log)
    })
    .expect("bangerd's log of the pulls");
    assert!(!log.contains(PASSWORD), "the password is in bangerd's log");
    assert!(
        !log.contains(&auth),
        "the encoded login is in bangerd's log"
    );
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The slow tier (scripts/ci-images): Debian as its container image is
/// (scripts/build-oci-debian: no init, no systemd, no SSH server) pushed
/// to a registry, pulled by banger and booted under QEMU. The first-boot
/// wrapper mounts what a VM needs, installs systemd, udev and
/// openssh-server with the guest's own apt (from a repository served in
/// the test's namespace, where the image's apt source points), and execs
/// systemd, which starts the agent and sshd; `vm ssh` then runs commands.
/// A second boot skips the install.
#[test]
#[ignore = "slow: boots a registry image and installs packages under TCG (scripts/ci-images)"]
fn a_debian_registry_image_boots_through_the_first_boot_wrapper() {
    let kernel_import = test_kernel_import();
    let agent = guest_artifact("banger-agent", "build-agent");
    let layout = guest_artifact("oci-debian/layout", "build-oci-debian");
    let repo = guest_artifact("oci-debian/repo", "build-oci-debian");
    let ns = NetNs::new("bgoci");
    let reg = Registry::start(Some(&ns), "");
    let reference = format!("127.0.0.1:{}/library/debian:bookworm", reg.port);
    run(ns
        .command("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:bookworm", layout.display()))
        .arg(format!("docker://{reference}")));
    // The image's apt source: http://10.213.42.1:8080/ (the bridge; the
    // firewall opens that host port to guests through `host_ports`).
    let _apt = Killed(
        ns.command("python3")
            .args([
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(&repo)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[network]\ntap_pool_size = 1\nhost_ports = [8080]\n\
             [vm]\nvmm = \"qemu\"\naccel = \"tcg\"\nagent_bin = \"{}\"\n\
             boot_timeout_secs = 900\nstop_timeout_secs = 60\n",
            agent.display()
        )),
        netns: Some(ns.name().to_owned()),
        ..Options::default()
    })
    .expect("test bed");
    let home = tempfile::tempdir().unwrap();
    let call = |args: &[&str]| {
        ns.command(banger_testbed::bin_path("banger"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bed.bus_address())
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let banger = |args: &[&str]| {
        let out = call(args);
        if !out.status.success() {
            // The guest's console says why a boot went wrong.
            let logs = call(&["vm", "logs", "oci"]);
            let console = String::from_utf8_lossy(&logs.stdout);
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            panic!(
                "banger {args:?}: {}\n---- the last lines of the console ----\n{tail}",
                text(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    banger(&argv(&kernel_import));
    eprintln!(
        "{}",
        banger(&["image", "pull", &reference, "--kernel-ref", "test-kernel"])
    );

    let out = banger(&[
        "vm",
        "create",
        "--name",
        "oci",
        "--image",
        "debian-bookworm",
        "--vcpus",
        "2",
        "--memory",
        "1024",
        "--disk-size",
        "1G",
    ]);
    eprintln!("{out}");
    for stage in ["agent ready", "ssh ready"] {
        assert!(out.contains(stage), "no {stage} in:\n{out}");
    }
    let check = "systemctl is-system-running --wait; \
                 cat /proc/1/comm; \
                 dpkg-query -W -f='${Status}\\n' openssh-server; \
                 test -e /var/lib/banger/first-boot.done && echo first-boot-done; \
                 systemctl is-active banger-agent.service; \
                 systemctl is-enabled systemd-firstboot.service; \
                 findmnt -n -o SOURCE /root; hostname";
    let out = banger(&["vm", "ssh", "oci", "--", "sh", "-c", check]);
    eprintln!("{out}");
    for want in [
        "running",
        "systemd",
        "install ok installed",
        "first-boot-done",
        "active",
        "masked",
        "/dev/vdb",
        "oci",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // Packages went into the VM's system disk: installed once, kept.
    banger(&["vm", "stop", "oci"]);
    let out = banger(&["vm", "start", "oci"]);
    assert!(out.contains("ssh ready"), "{out}");
    let out = banger(&[
        "vm",
        "ssh",
        "oci",
        "--",
        "sh",
        "-c",
        "grep -c 'Setting up openssh-server' /var/log/banger-first-boot.log",
    ]);
    assert_eq!(out.trim(), "1", "installed more than once: {out}");
    banger(&["vm", "delete", "oci"]);
}

/// Registry pulls on a shared host: a member cannot take the default
/// image's name through a pull (by `--name`, or by a repository whose
/// derived name it is), and a pull's job shows no one the caller's
/// registry or repository, not even in its failure (job signals reach
/// every user on the bus).
#[test]
fn registry_pulls_squat_no_name_and_show_no_arguments() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    umoci_image(&work.path().join("amd"), "amd64", fill_amd64);
    for repo in ["private-team/secret-repo:t", "test/debian:bookworm"] {
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:t", work.path().join("amd").display()))
            .arg(format!("docker://127.0.0.1:{}/{repo}", reg.port)));
    }
    let agent = guest_artifact("banger-agent", "build-agent");
    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[daemon]\njob_retention_secs = 30\n[vm]\nagent_bin = \"{}\"\n",
            agent.display()
        )),
        ..Options::default()
    })
    .expect("test bed");
    let member = banger_testbed::TestUser::create_in_group("banger").unwrap();
    let _rules = bed
        .install_polkit_rule(
            &format!("50-banger-oci-{}", member.name()),
            include_str!("../../../packaging/50-banger.rules"),
        )
        .unwrap();
    import_base_kernel(&bed);
    let as_member = |args: &[&str]| {
        bed.banger_as(&member)
            .arg("--no-ask-password")
            .args(args)
            .output()
            .unwrap()
    };

    // Squats: refused, by an explicit name and by a derived one.
    let squats = [
        vec![
            format!("127.0.0.1:{}/private-team/secret-repo:t", reg.port),
            "--name".into(),
            "debian-bookworm".into(),
        ],
        vec![format!("127.0.0.1:{}/test/debian:bookworm", reg.port)],
    ];
    for squat in &squats {
        let refused = eventually(Duration::from_secs(15), || {
            let mut args = vec!["image", "pull"];
            args.extend(squat.iter().map(String::as_str));
            args.extend(["--kernel-ref", "base-kernel"]);
            let out = as_member(&args);
            // 4: permission (the rules may still be loading: 4 too).
            (out.status.code() == Some(4)
                && String::from_utf8_lossy(&out.stderr).contains("reserved"))
            .then_some(())
        });
        assert!(refused.is_some(), "the squat {squat:?} was not refused");
    }
    let images = bed
        .banger()
        .args(["image", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&images.stdout).trim(), "[]");

    // A failed pull: its job's signals and properties never name the
    // registry or repository, while the member's CLI does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bed.bus_address())
            .build()
            .await
            .unwrap();
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .path_namespace(banger_dbus::MANAGER_PATH)
            .build()
            .unwrap();
        let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None)
            .await
            .unwrap();
        let reference = format!("127.0.0.1:{}/private-team/no-such-repo:t", reg.port);
        let out = tokio::task::spawn_blocking({
            let cmd = bed
                .banger_as(&member)
                .args(["image", "pull", &reference, "--kernel-ref", "base-kernel"])
                .output();
            move || cmd
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(out.status.code(), Some(5), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no-such-repo"),
            "{}",
            text(&out)
        );
        let mut seen = Vec::new();
        use futures_util::StreamExt;
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(500), stream.next()).await
        {
            seen.push(msg.body().data().to_vec());
        }
        seen
    });
    assert!(
        seen.len() >= 2,
        "the pull's job sent too few signals: {}",
        seen.len()
    );
    for body in &seen {
        let body = String::from_utf8_lossy(body);
        assert!(
            !body.contains("private-team") && !body.contains("no-such-repo"),
            "a signal every user receives names the caller's repository: {body:?}"
        );
    }
}

/// `base-kernel`: a tiny ELF vmlinux root imports, for pulls that need a
/// kernel but never boot.
fn import_base_kernel(bed: &TestBed) {
    let inputs = tempfile::tempdir().unwrap();
    let vmlinux = inputs.path().join("vmlinux");
    std::fs::write(&vmlinux, banger_testbed::tiny_vmlinux(4096)).unwrap();
    let out = bed
        .banger()
        .args(["kernel", "import", "--name", "base-kernel", "--kernel"])
        .arg(&vmlinux)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Re-tag `repo:t` on the loopback registry at `port` as `repo:tag` with
/// its manifest changed by `edit` (the registry checks that blobs exist,
/// not their sizes, as a hostile registry would not either).
fn retag(port: u16, repo: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // reqwest is built without a default TLS provider (plain HTTP here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}/v2/{repo}/manifests");
        let got = client
            .get(format!("{base}/t"))
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .unwrap();
        assert!(got.status().is_success(), "{got:?}");
        let media = got.headers()["content-type"].to_str().unwrap().to_owned();
        let mut manifest: serde_json::Value = got.json().await.unwrap();
        edit(&mut manifest);
        let put = client
            .put(format!("{base}/{tag}"))
            .header("Content-Type", media)
            .body(serde_json::to_vec(&manifest).unwrap())
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "{put:?}");
    });
}

/// A registry could once send any number of bytes for a layer and list
/// layers of any size: the pull wrote until the disk was full. Now the
/// manifest's sizes are held to limits.image_max_gib before anything is
/// fetched, and a layer is cut off at the size its manifest gives.
#[test]
fn a_registry_cannot_send_more_than_its_manifest_or_the_limit_says() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    umoci_image(&work.path().join("amd"), "amd64", fill_amd64);
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:t", work.path().join("amd").display()))
        .arg(format!("docker://127.0.0.1:{}/test/img:t", reg.port)));
    // The first layer said to be one byte short of what it is, and one
    // said to be 2 GiB.
    retag(reg.port, "test/img", "short", |m| {
        let size = m["layers"][0]["size"].as_u64().unwrap();
        m["layers"][0]["size"] = (size - 1).into();
    });
    retag(reg.port, "test/img", "huge", |m| {
        m["layers"][0]["size"] = (2u64 << 30).into();
    });
    let agent = guest_artifact("banger-agent", "build-agent");
    let bed = TestBed::start(Options {
        config_toml: Some(format!(
            "[limits]\nimage_max_gib = 1\n[vm]\nagent_bin = \"{}\"\n",
            agent.display()
        )),
        ..Options::default()
    })
    .expect("test bed");
    import_base_kernel(&bed);
    let pull = |tag: &str| {
        bed.banger()
            .args(["image", "pull", "--kernel-ref", "base-kernel", "--name"])
            .arg(format!("img-{tag}"))
            .arg(format!("127.0.0.1:{}/test/img:{tag}", reg.port))
            .output()
            .unwrap()
    };

    let out = pull("huge");
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert!(
        text(&out).contains("limits.image_max_gib"),
        "{}",
        text(&out)
    );

    let out = pull("short");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("more than the") && text(&out).contains("bytes the manifest says"),
        "{}",
        text(&out)
    );

    // Neither left an image behind.
    let images = bed
        .banger()
        .args(["image", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&images.stdout).trim(), "[]");
    // The honest tag still pulls.
    let out = pull("t");
    assert!(out.status.success(), "{}", text(&out));
}
