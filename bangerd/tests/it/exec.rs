//! `vm exec` end to end: the CLI, bangerd's `VM.Exec` and the agent in a
//! real guest under QEMU, over the virtio-serial port.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_agent_proto::codec::{Frame, FrameCodec};
use banger_agent_proto::stream::{ExitStatus, StreamFrame, is_json};
use futures_util::StreamExt;
use tokio_util::codec::FramedRead;

use crate::vm_lifecycle::setup_with;

/// `VM.Exec(command)` over D-Bus; returns stdout and the status.
async fn exec(
    vm: &banger_dbus::proxy::VmQuietProxy<'_>,
    command: &[&str],
) -> (Vec<u8>, ExitStatus) {
    let fd = vm.exec(command, Default::default()).await.unwrap();
    let socket = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UnixStream::from_std(socket).unwrap();
    let mut frames = FramedRead::new(socket, FrameCodec::new());
    let mut out = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), frames.next())
            .await
            .expect("no end of the stream within 60 s")
            .expect("the stream ended early")
            .unwrap();
        let Frame::Data(p) = frame else {
            panic!("oversized frame")
        };
        assert!(!is_json(&p), "broken: {}", String::from_utf8_lossy(&p));
        match StreamFrame::decode(&p).unwrap() {
            StreamFrame::Data { bytes, .. } => out.extend_from_slice(&bytes),
            StreamFrame::Exit { status, .. } => return (out, status),
            StreamFrame::Credit { .. } => {}
        }
    }
}

#[test]
fn exec_runs_commands_in_a_guest_with_stdio_status_signals_and_a_terminal() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "ex"]);

    // Output on both channels and the exit status.
    let out = env.run(&[
        "vm",
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("err"),
        "{out:?}"
    );

    // Environment, working directory, user.
    let line = env.ok(&[
        "vm",
        "exec",
        "ex",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING $PWD $(id -u)",
    ]);
    assert_eq!(line, "hi /tmp 0\n");
    // Another guest user; its home does not exist, so it starts in /.
    let line = env.ok(&[
        "vm",
        "exec",
        "ex",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; pwd",
    ]);
    assert_eq!(line, "65534\n/\n");
    let out = env.run(&["vm", "exec", "ex", "-u", "nosuchuser", "--", "true"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // Stdin, more than a flow-control window of it.
    let mut child = env
        .banger(&["vm", "exec", "ex", "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&vec![b'x'; 3_000_000]).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000000");
    assert_eq!(out.status.code(), Some(0));

    // A missing command: the not-found exit code and a message.
    let out = env.run(&["vm", "exec", "ex", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-command"),
        "{out:?}"
    );

    // SIGTERM to banger reaches the command.
    let mut child = env
        .banger(&["vm", "exec", "ex", "--", "sh", "-c", "echo up; sleep 60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"up\n");
    let start = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    assert!(start.elapsed() < Duration::from_secs(10));

    // A terminal, under script(1) so that banger has one too.
    let banger = banger_testbed::bin_path("banger");
    let cmdline = format!(
        "{} vm exec -t ex -- sh -c 'tty; test -t 0 && echo interactive'",
        banger.display()
    );
    let out = env
        .ns
        .command("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", env.bed.bus_address())
        .env("HOME", env.home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/dev/pts/") && text.contains("interactive"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    copy_both_ways(&env);
    forward_ports(&env);
    let mut env = env;
    forward_in_the_background(&mut env);
    let out = env.ok(&["vm", "forward", "ex", "--background", "--json", "0:8000"]);
    let bound: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kept = format!("127.0.0.1:{}", bound[0]["host_port"]);

    // A stopped VM says so; its background forward still listens but
    // closes each connection at once.
    env.ok(&["vm", "stop", "ex"]);
    let out = env.run(&["vm", "exec", "ex", "--", "true"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("banger vm start ex"),
        "{out:?}"
    );
    let probe = |addr: String| {
        env.ns.run(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(&addr)?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            Ok::<usize, std::io::Error>(got.len())
        })
    };
    assert_eq!(probe(kept.clone()).unwrap(), 0, "closed at once");
    // Deleting the VM ends its forwards.
    env.ok(&["vm", "delete", "ex"]);
    let refused = probe(kept).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

/// Many short streams over the one virtio-serial connection bangerd holds:
/// a thousand one after another, then fifty at once.
#[test]
fn a_thousand_sequential_and_fifty_concurrent_execs_over_virtio_serial() {
    let env = setup_with("");
    env.ok(&["vm", "create", "--name", "many"]);
    let path = env.vm("many")["path"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(env.bed.bus_address())
            .build()
            .await
            .unwrap();
        let vm = banger_dbus::proxy::VmQuietProxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        let start = Instant::now();
        for i in 0..1000 {
            let (out, status) = exec(&vm, &["echo", &i.to_string()]).await;
            assert_eq!(
                (out, status),
                (format!("{i}\n").into_bytes(), ExitStatus::Code(0))
            );
        }
        eprintln!("1000 sequential execs took {:?}", start.elapsed());
        let runs = (0..50).map(|i| {
            let vm = vm.clone();
            async move {
                (
                    i,
                    exec(&vm, &["sh", "-c", &format!("sleep 0.2; echo {i}")]).await,
                )
            }
        });
        for (i, (out, status)) in futures_util::future::join_all(runs).await {
            assert_eq!(
                (out, status),
                (format!("{i}\n").into_bytes(), ExitStatus::Code(0))
            );
        }
    });
    env.ok(&["vm", "delete", "many"]);
}

/// `vm cp` with VM "ex": a tree up and back with modes, times and links
/// kept, tar archives on stdin and stdout, and the errors.
fn copy_both_ways(env: &crate::vm_lifecycle::Env) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    let script = tree.join("sub/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o751)).unwrap();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&script)
        .unwrap()
        .set_modified(when)
        .unwrap();
    std::os::unix::fs::symlink("sub/run.sh", tree.join("link")).unwrap();
    let big: Vec<u8> = (0..3_000_000u64).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(tree.join("big"), &big).unwrap();

    // Up, into an existing directory.
    env.ok(&["vm", "cp", tree.to_str().unwrap(), "ex:/root/"]);
    let facts = env.ok(&[
        "vm",
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "stat -c '%a %Y' /root/tree/sub/run.sh; readlink /root/tree/link; wc -c < /root/tree/big",
    ]);
    assert_eq!(facts, "751 1000000000\nsub/run.sh\n3000000\n");

    // Down, under a new name.
    let back = dir.path().join("back");
    env.ok(&["vm", "cp", "ex:/root/tree", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(back.join("big")).unwrap(), big);
    let meta = std::fs::metadata(back.join("sub/run.sh")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o751);
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::PathBuf::from("sub/run.sh")
    );
    // A file up under a new name, and back.
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "a note\n").unwrap();
    env.ok(&["vm", "cp", note.to_str().unwrap(), "ex:/root/renamed.txt"]);
    assert_eq!(
        env.ok(&["vm", "exec", "ex", "--", "cat", "/root/renamed.txt"]),
        "a note\n"
    );
    // A file into an existing directory.
    env.ok(&[
        "vm",
        "cp",
        "ex:/root/tree/sub/run.sh",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run.sh")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );

    // Tar archives on stdout and stdin.
    let out = env.run(&["vm", "cp", "ex:/root/tree/sub", "-"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listing = tar_list(&out.stdout);
    assert!(listing.contains("sub/run.sh"), "{listing}");
    let mut child = env
        .banger(&["vm", "cp", "-", "ex:/tmp"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        env.ok(&["vm", "exec", "ex", "--", "/tmp/sub/run.sh"]),
        "hi\n"
    );

    // Errors: a missing guest path, two local paths.
    let out = env.run(&["vm", "cp", "ex:/no/such/file", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/no/such"),
        "{out:?}"
    );
    let out = env.run(&["vm", "cp", "a", "b"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
}

/// The member names of a tar archive, by the host's tar.
fn tar_list(archive: &[u8]) -> String {
    let mut child = std::process::Command::new("tar")
        .args(["-tf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// `vm forward` with VM "ex" to a web server that listens only on the
/// guest's loopback: a small page, a large file, ten at once, Ctrl-C.
fn forward_ports(env: &crate::vm_lifecycle::Env) {
    use std::io::BufRead;
    env.ok(&[
        "vm",
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello > /tmp/www/hello.txt && \
         head -c 1000000 /dev/urandom > /tmp/www/big && \
         busybox httpd -p 127.0.0.1:8000 -h /tmp/www",
    ]);
    let big = env
        .banger(&["vm", "exec", "ex", "--", "cat", "/tmp/www/big"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(big.len(), 1_000_000);
    let mut child = env
        .banger(&["vm", "forward", "ex", "0:8000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "forwarding 127.0.0.1:PORT to port 8000 of ex"
    let addr = line.split_whitespace().nth(1).unwrap().to_owned();
    assert!(
        addr.starts_with("127.0.0.1:") && line.contains("port 8000 of ex"),
        "{line}"
    );
    let get = |path: &str| http_get(env, &addr, path).unwrap();
    assert_eq!(get("/hello.txt"), b"hello\n");
    assert_eq!(get("/big"), big);
    let many: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10).map(|_| scope.spawn(|| get("/hello.txt"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(many.iter().all(|b| b == b"hello\n"), "{many:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// An HTTP GET of `path` from `addr` in the bed's namespace: the body.
fn http_get(env: &crate::vm_lifecycle::Env, addr: &str, path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (addr, path) = (addr.to_owned(), path.to_owned());
    env.ns.run(move || {
        let mut s = std::net::TcpStream::connect(&addr)?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        let at = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
        Ok(reply.split_off(at + 4))
    })
}

/// `vm forward --background` with VM "ex" (its httpd from
/// [`forward_ports`]): bangerd listens, `vm show` lists it, a taken port
/// is refused, a restarted bangerd listens again, and `--remove` ends it.
fn forward_in_the_background(env: &mut crate::vm_lifecycle::Env) {
    let out = env.ok(&["vm", "forward", "ex", "--background", "--json", "0:8000"]);
    let bound: serde_json::Value = serde_json::from_str(&out).unwrap();
    let port = bound[0]["host_port"].as_u64().unwrap();
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(http_get(env, &addr, "/hello.txt").unwrap(), b"hello\n");
    let shown = env.vm("ex");
    assert_eq!(
        shown["forwards"][0]["host_port"].as_u64(),
        Some(port),
        "{shown}"
    );
    assert_eq!(shown["forwards"][0]["guest_port"], 8000, "{shown}");
    assert!(
        env.ok(&["vm", "show", "ex"])
            .contains(&format!("forward:     {addr} → guest port 8000")),
    );
    // Its port is taken now.
    let out = env.run(&[
        "vm",
        "forward",
        "ex",
        "--background",
        &format!("{port}:8000"),
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );

    // bangerd dies and comes back: it listens again.
    env.bed.kill_daemon();
    assert!(
        http_get(env, &addr, "/hello.txt").is_err(),
        "nobody should listen"
    );
    env.bed.start_daemon().unwrap();
    assert_eq!(http_get(env, &addr, "/hello.txt").unwrap(), b"hello\n");

    let out = env.run(&["vm", "forward", "ex", "--remove", "1"]);
    assert_eq!(out.status.code(), Some(5), "no such forward: {out:?}");
    env.ok(&["vm", "forward", "ex", "--remove", &port.to_string()]);
    assert!(
        http_get(env, &addr, "/hello.txt").is_err(),
        "still forwarded"
    );
    assert_eq!(env.vm("ex")["forwards"], serde_json::json!([]));
}

/// `vm create --setup FILE`: the script runs once as root after the first
/// boot with its output shown as the `setup` stage; a failing one leaves
/// the VM running and says how it ended; `--no-start` runs it at the
/// first start instead.
#[test]
fn a_setup_script_runs_once_after_the_first_boot() {
    let env = setup_with("");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.sh");
    std::fs::write(
        &good,
        "#!/bin/sh\necho step one\necho step two >&2\necho ran >> /root/setup-runs\n",
    )
    .unwrap();
    let out = env.ok(&[
        "vm",
        "create",
        "--name",
        "set",
        "--setup",
        good.to_str().unwrap(),
    ]);
    assert!(out.contains("→ setup") && out.contains("✓ setup"), "{out}");
    assert!(
        out.contains("  step one") && out.contains("  step two"),
        "{out}"
    );
    assert_eq!(
        env.ok(&["vm", "exec", "set", "--", "cat", "/root/setup-runs"]),
        "ran\n"
    );
    // Once: a restart does not run it again.
    env.ok(&["vm", "restart", "set"]);
    assert_eq!(
        env.ok(&["vm", "exec", "set", "--", "cat", "/root/setup-runs"]),
        "ran\n"
    );
    env.ok(&["vm", "delete", "set"]);

    // A failing script: the create fails with its status and output, and
    // the VM stays running.
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "echo about to fail\nexit 3\n").unwrap();
    let out = env.run(&[
        "vm",
        "create",
        "--name",
        "broken",
        "--setup",
        bad.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("exited with status 3") && stderr.contains("about to fail"),
        "{stderr}"
    );
    assert_eq!(env.vm("broken")["state"], "running");
    env.ok(&["vm", "delete", "broken"]);

    // Made without starting: the first start runs it.
    env.ok(&[
        "vm",
        "create",
        "--name",
        "later",
        "--no-start",
        "--setup",
        good.to_str().unwrap(),
    ]);
    let out = env.ok(&["vm", "start", "later"]);
    assert!(out.contains("  step one"), "{out}");
    assert_eq!(
        env.ok(&["vm", "exec", "later", "--", "cat", "/root/setup-runs"]),
        "ran\n"
    );
    env.ok(&["vm", "delete", "later"]);
}

/// `vm.max_streams` bounds the streams open through one VM's agent: one
/// more is refused with the limit's exit code, and a stream that ends
/// frees its place.
#[test]
fn a_vm_holds_no_more_streams_than_the_limit() {
    // Appended to the bed's [vm] table.
    let env = setup_with("max_streams = 2\n");
    env.ok(&["vm", "create", "--name", "lim"]);
    // Each holds a stream until killed; it has once it printed.
    let sleeper = || {
        use std::io::BufRead;
        let mut child = env
            .banger(&[
                "vm",
                "exec",
                "lim",
                "--",
                "sh",
                "-c",
                "echo up; exec sleep 60",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "up\n");
        child
    };
    let mut first = sleeper();
    let mut second = sleeper();
    let out = env.run(&["vm", "exec", "lim", "--", "true"]);
    assert_eq!(out.status.code(), Some(11), "{out:?}");
    let refused = String::from_utf8_lossy(&out.stderr);
    assert!(
        refused.contains("max_streams") && refused.contains("lim"),
        "{refused}"
    );
    // One ends (SIGTERM reaches its command): there is room again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    first.wait().unwrap();
    assert_eq!(
        env.ok(&["vm", "exec", "lim", "--", "echo", "room"]),
        "room\n"
    );
    second.kill().unwrap();
    second.wait().unwrap();
    env.ok(&["vm", "delete", "lim"]);
}
