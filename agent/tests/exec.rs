//! `Exec` against the real agent binary on a unix socket: output, exit
//! status, stdin, signals, terminals, flow control and many streams.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use banger_agent_proto::client::{Client, ClientError, StreamEvent};
use banger_agent_proto::stream::{Channel, ExitStatus};
use banger_agent_proto::{ErrorKind, ExecSpec, TtySize};

mod common;

use common::{AgentProc, T};

fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Vec::new(),
        workdir: None,
        user: None,
        tty: None,
    }
}

/// Run `spec` with `stdin`, collecting stdout, stderr and the status.
async fn run(c: &Client, spec: ExecSpec, stdin: &[u8]) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let s = c.exec(spec, T).await.unwrap();
    let input = s.input.clone();
    let stdin = stdin.to_vec();
    tokio::spawn(async move {
        input.write(&stdin).await.unwrap();
        input.close().await.unwrap();
    });
    collect(s.output).await
}

async fn collect(
    mut out: banger_agent_proto::client::ExecOutput,
) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let (mut o, mut e) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(T * 3, out.next()).await.unwrap() {
            Some(StreamEvent::Output(ch, bytes)) => {
                match ch {
                    Channel::Stderr => e.extend_from_slice(&bytes),
                    _ => o.extend_from_slice(&bytes),
                }
                out.consumed(ch, bytes.len()).await.unwrap();
            }
            Some(StreamEvent::Exit(status)) => return (o, e, status),
            other => panic!("stream ended without an exit: {other:?}"),
        }
    }
}

#[tokio::test]
async fn runs_a_command_with_stdin_output_and_exit_code() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo out; echo err >&2; read x; echo \"got $x in $PWD as $GREETING\"; exit 3",
    ]);
    s.env = vec!["GREETING=hello".into()];
    s.workdir = Some("/tmp".into());
    let (out, err, status) = run(&c, s, b"line\n").await;
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "out\ngot line in /tmp as hello\n"
    );
    assert_eq!(String::from_utf8(err).unwrap(), "err\n");
    assert_eq!(status, ExitStatus::Code(3));
}

#[tokio::test]
async fn bad_commands_are_typed_errors() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let kind = |e: ClientError| match e {
        ClientError::Agent { source, .. } => source.kind,
        other => panic!("{other}"),
    };
    let e = c
        .exec(spec(&["no-such-program-here"]), T)
        .await
        .unwrap_err();
    assert_eq!(kind(e), ErrorKind::NotFound);
    let e = c.exec(spec(&[]), T).await.unwrap_err();
    assert_eq!(kind(e), ErrorKind::InvalidArgument);
    let mut s = spec(&["true"]);
    s.workdir = Some("/no/such/dir".into());
    assert_eq!(kind(c.exec(s, T).await.unwrap_err()), ErrorKind::NotFound);
    let mut s = spec(&["true"]);
    s.user = Some("no-such-user-here".into());
    assert_eq!(kind(c.exec(s, T).await.unwrap_err()), ErrorKind::NotFound);
    let mut s = spec(&["true"]);
    s.env = vec!["=x".into()];
    assert_eq!(
        kind(c.exec(s, T).await.unwrap_err()),
        ErrorKind::InvalidArgument
    );
    // The connection is fine afterwards.
    let (out, _, status) = run(&c, spec(&["echo", "ok"]), b"").await;
    assert_eq!((out, status), (b"ok\n".to_vec(), ExitStatus::Code(0)));
}

#[tokio::test]
async fn runs_as_another_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let agent = AgentProc::start();
    let c = agent.client().await;
    let mut s = spec(&["sh", "-c", "id -u; echo $HOME"]);
    s.user = Some("nobody".into());
    let (out, _, status) = run(&c, s, b"").await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{}\n{}\n", nobody.uid, nobody.dir.display())
    );
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn signals_reach_the_process_group() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let s = c
        .exec(spec(&["sh", "-c", "sleep 30; echo not reached"]), T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.input.signal(15, T).await.unwrap();
    let (out, _, status) = collect(s.output).await;
    assert!(out.is_empty());
    assert_eq!(status, ExitStatus::Signal(15));
    let e = s.input.signal(15, T).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Agent { source, .. } if source.kind == ErrorKind::NotFound),
        "{e}"
    );
}

#[tokio::test]
async fn a_terminal_has_the_size_asked_and_follows_resizes() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let mut sp = spec(&["sh", "-c", "stty size; tty; read x; stty size; exit 4"]);
    sp.tty = Some(TtySize {
        rows: 33,
        cols: 77,
        term: Some("vt100".into()),
    });
    let mut s = c.exec(sp, T).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("/dev/pts/") {
        match tokio::time::timeout(T, s.output.next()).await.unwrap() {
            Some(StreamEvent::Output(ch, b)) => {
                assert_eq!(ch, Channel::Stdout);
                seen.extend_from_slice(&b);
                s.output.consumed(ch, b.len()).await.unwrap();
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(String::from_utf8_lossy(&seen).contains("33 77"), "{seen:?}");
    s.input.resize(40, 100, T).await.unwrap();
    s.input.write(b"\n").await.unwrap();
    let (out, err, status) = collect(s.output).await;
    assert!(String::from_utf8_lossy(&out).contains("40 100"), "{out:?}");
    assert!(err.is_empty());
    assert_eq!(status, ExitStatus::Code(4));
}

#[tokio::test]
async fn a_slow_reader_gets_everything_and_never_more_than_the_window() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let total = 5_000_000usize;
    let s = c
        .exec(spec(&["head", "-c", &total.to_string(), "/dev/zero"]), T)
        .await
        .unwrap();
    let mut out = s.output;
    // Nothing acknowledged: the agent stops at the window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = 0usize;
    let mut held = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), out.next()).await {
        match ev {
            StreamEvent::Output(ch, b) => {
                got += b.len();
                held.push((ch, b.len()));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, banger_agent_proto::stream::WINDOW as usize);
    for (ch, n) in held {
        out.consumed(ch, n).await.unwrap();
    }
    let (rest, _, status) = collect(out).await;
    assert_eq!(got + rest.len(), total);
    assert_eq!(status, ExitStatus::Code(0));
    // Stdin the other way: more than a window, through `wc -c`.
    let input = vec![b'x'; 3_000_000];
    let (out, _, status) = run(&c, spec(&["wc", "-c"]), &input).await;
    assert_eq!(String::from_utf8(out).unwrap().trim(), "3000000");
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn a_thousand_sequential_and_fifty_concurrent_streams() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    for i in 0..1000 {
        let (out, _, status) = run(&c, spec(&["echo", &i.to_string()]), b"").await;
        assert_eq!(out, format!("{i}\n").into_bytes());
        assert_eq!(status, ExitStatus::Code(0));
    }
    let runs = (0..50).map(|i| {
        let c = c.clone();
        async move {
            let (out, _, status) = run(&c, spec(&["cat"]), format!("{i}").as_bytes()).await;
            (i, out, status)
        }
    });
    for (i, out, status) in futures_util::future::join_all(runs).await {
        assert_eq!(out, format!("{i}").into_bytes());
        assert_eq!(status, ExitStatus::Code(0));
    }
}

#[tokio::test]
async fn a_lost_connection_kills_its_commands() {
    let agent = AgentProc::start();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("pid");
    let c = agent.client().await;
    let s = c
        .exec(
            spec(&[
                "sh",
                "-c",
                &format!("echo $$ > {}; sleep 60", mark.display()),
            ]),
            T,
        )
        .await
        .unwrap();
    let start = Instant::now();
    while !mark.exists() || std::fs::read_to_string(&mark).unwrap().trim().is_empty() {
        assert!(start.elapsed() < T);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: i32 = std::fs::read_to_string(&mark)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(s);
    drop(c);
    let start = Instant::now();
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        // A zombie until the agent reaps it counts as gone too.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z") {
            break;
        }
        assert!(start.elapsed() < T, "the command outlived its connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connect_carries_a_tcp_connection_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = AgentProc::start();
    let c = agent.client().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(&got.to_ascii_uppercase()).await.unwrap();
            });
        }
    });
    // Many connections at once, each a stream of its own.
    let runs = (0..20).map(|i| {
        let c = c.clone();
        async move {
            let s = c.connect_port(port, T).await.unwrap();
            let payload = format!("ping {i} ").repeat(20_000);
            let input = s.input.clone();
            let sent = payload.clone();
            tokio::spawn(async move {
                input.write(sent.as_bytes()).await.unwrap();
                input.close().await.unwrap();
            });
            let (out, _, status) = collect(s.output).await;
            assert_eq!(out, payload.to_ascii_uppercase().into_bytes());
            assert_eq!(status, ExitStatus::Code(0));
        }
    });
    futures_util::future::join_all(runs).await;
    // Nothing listening: a typed error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = closed.local_addr().unwrap().port();
    drop(closed);
    let e = c.connect_port(free, T).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Agent { source, .. } if source.kind == ErrorKind::NotFound),
        "{e}"
    );
}

/// A host that gives up on a connection (SIGKILL on its stream, as
/// bangerd sends when its caller left) closes it in the guest, even
/// while the guest side still has things to say.
#[tokio::test]
async fn a_killed_connection_stream_closes_the_guest_side() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = AgentProc::start();
    let c = agent.client().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // More than a window, so the agent stops reading the host's
        // side waiting for credit; then wait for the end.
        let big = vec![b'x'; 4 << 20];
        let _ = s.write_all(&big).await;
        let mut buf = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let _ = closed_tx.send(matches!(end, Ok(Ok(0)) | Ok(Err(_))));
    });
    let s = c.connect_port(port, T).await.unwrap();
    // Take a little, never acknowledge it.
    let mut output = s.output;
    let first = output.next().await;
    assert!(matches!(first, Some(StreamEvent::Output(..))), "{first:?}");
    s.input.signal(9, T).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(15), closed_rx).await,
        Ok(Ok(true)),
        "the guest side stayed open"
    );
    // The connection to the agent still serves others.
    let (out, _, status) = run(&c, spec(&["echo", "alive"]), b"").await;
    assert_eq!(
        (out.as_slice(), status),
        (&b"alive\n"[..], ExitStatus::Code(0))
    );
}
