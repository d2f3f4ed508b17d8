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

    // A stopped VM says so.
    env.ok(&["vm", "stop", "ex"]);
    let out = env.run(&["vm", "exec", "ex", "--", "true"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("banger vm start ex"),
        "{out:?}"
    );
    env.ok(&["vm", "delete", "ex"]);
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
