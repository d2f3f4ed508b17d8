//! bangerd's agent client against the real `banger-agent` binary: over a
//! unix socket, and through a Firecracker hybrid-vsock socket that follows
//! Firecracker's contract (`CONNECT <port>\n` → `OK <host_port>\n`, then
//! the raw stream).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use banger_agent_host::{AgentConnectError, AgentEndpoint, connect, wait_until_ready};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const T: Duration = Duration::from_secs(10);

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(socket: &Path) -> Agent {
    Agent(
        Command::new(banger_testbed::bin_path("banger-agent"))
            .arg("--unix")
            .arg(socket)
            .arg("--no-power")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Wait until the agent listens at `path`: a connection gets through.
/// The socket file appears at bind(2), before listen(2); a connection in
/// between is refused (seen under load in CI), so its mere existence is
/// not enough.
async fn wait_for(path: &Path) {
    for _ in 0..200 {
        if UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens at {}", path.display());
}

/// How the fake Firecracker answers a `CONNECT`.
#[derive(Clone, Copy, Debug)]
enum Fc {
    /// Like Firecracker with a listening guest: OK, then splice.
    Accept,
    /// Like Firecracker with nobody listening on the port: close.
    Close,
    /// Something that is not Firecracker.
    Garbage,
    /// Never answer.
    Silent,
}

/// A unix listener at `uds` playing Firecracker's vsock device in front of
/// the agent's socket `agent`, for guest port `port`.
fn fake_firecracker(uds: PathBuf, agent: PathBuf, port: u32, mode: Fc) {
    let listener = UnixListener::bind(&uds).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                let mut stream = reader.into_inner();
                let asked: Option<u32> = line
                    .strip_prefix("CONNECT ")
                    .and_then(|p| p.trim_end_matches('\n').parse().ok());
                match mode {
                    Fc::Accept if asked == Some(port) => {
                        stream.write_all(b"OK 1073741824\n").await.unwrap();
                        let mut guest = UnixStream::connect(&agent).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
                    }
                    Fc::Accept | Fc::Close => drop(stream),
                    Fc::Garbage => {
                        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    }
                    Fc::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
}

#[tokio::test]
async fn health_and_info_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _agent = start_agent(&sock);
    wait_for(&sock).await;
    let conn = connect(&AgentEndpoint::Unix(sock), T).await.unwrap();
    let health = conn.health(T).await.unwrap();
    assert_eq!(
        health.boot_id,
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap()
            .trim()
    );
    let info = conn.info(T).await.unwrap();
    assert_eq!(info.machine, "x86_64");
}

/// A transport with a stream per connection (a unix socket here, vsock
/// in a guest): a thousand short connections one after another, then
/// fifty at once, each answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_short_streams_and_fifty_at_once_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _agent = start_agent(&sock);
    wait_for(&sock).await;
    let endpoint = AgentEndpoint::Unix(sock);
    for i in 0..1000 {
        let conn = connect(&endpoint, T)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        conn.health(T)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    // All fifty open before any asks.
    let all_open = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let calls = (0..50).map(|i| {
        let (endpoint, all_open) = (endpoint.clone(), all_open.clone());
        tokio::spawn(async move {
            let conn = connect(&endpoint, T).await;
            all_open.wait().await;
            let conn = conn.map_err(|e| format!("{i}: {e}"))?;
            conn.health(T).await.map_err(|e| format!("{i}: {e}"))
        })
    });
    let failed: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap().err())
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test]
async fn firecracker_hybrid_vsock_handshake_then_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let _agent = start_agent(&agent_sock);
    wait_for(&agent_sock).await;

    let uds = dir.path().join("v.sock");
    fake_firecracker(uds.clone(), agent_sock.clone(), 1024, Fc::Accept);
    let ok = AgentEndpoint::FirecrackerVsock {
        uds: uds.clone(),
        port: 1024,
    };
    let conn = connect(&ok, T).await.unwrap();
    conn.health(T).await.unwrap();
    conn.info(T).await.unwrap();

    // The guest does not listen on that port: Firecracker closes.
    let wrong = AgentEndpoint::FirecrackerVsock { uds, port: 52 };
    let err = connect(&wrong, T).await.unwrap_err();
    assert!(
        matches!(err, AgentConnectError::Handshake { ref answer, .. } if answer == "connection closed"),
        "{err}"
    );

    for (mode, check) in [
        (Fc::Close, "connection closed"),
        (Fc::Garbage, "HTTP/1.1 400"),
    ] {
        let uds = dir.path().join(format!("{mode:?}.sock"));
        fake_firecracker(uds.clone(), agent_sock.clone(), 1024, mode);
        let err = connect(&AgentEndpoint::FirecrackerVsock { uds, port: 1024 }, T)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AgentConnectError::Handshake { answer, .. } if answer.contains(check)),
            "{mode:?}: {err}"
        );
    }
    let uds = dir.path().join("silent.sock");
    fake_firecracker(uds.clone(), agent_sock, 1024, Fc::Silent);
    let err = connect(
        &AgentEndpoint::FirecrackerVsock { uds, port: 1024 },
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AgentConnectError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn wait_until_ready_rides_out_a_late_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let uds = dir.path().join("v.sock");
    // Firecracker is up at once; the guest's agent comes a second later.
    fake_firecracker(uds.clone(), agent_sock.clone(), 1024, Fc::Accept);
    let late = {
        let agent_sock = agent_sock.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_secs(1));
            start_agent(&agent_sock)
        })
    };
    let endpoint = AgentEndpoint::FirecrackerVsock { uds, port: 1024 };
    // Until then the fake cannot reach the agent and drops the connection.
    let (conn, health, took) = wait_until_ready(&endpoint, T, Duration::from_millis(100))
        .await
        .unwrap();
    let _agent = late.await.unwrap();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(!health.boot_id.is_empty());
    conn.info(T).await.unwrap();

    let nothing = AgentEndpoint::Unix(dir.path().join("never.sock"));
    let err = wait_until_ready(
        &nothing,
        Duration::from_millis(500),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("did not answer within"), "{err}");
}

/// Exec streams through Firecracker's hybrid vsock, where every stream
/// is a connection of its own through the `CONNECT` handshake: a
/// thousand one after another, then fifty at once, each with its output
/// and exit status.
#[tokio::test(flavor = "multi_thread")]
async fn exec_streams_through_firecracker_vsock_one_connection_each() {
    use banger_agent_proto::client::StreamEvent;
    use banger_agent_proto::stream::ExitStatus;
    let dir = tempfile::tempdir().unwrap();
    let agent_sock = dir.path().join("agent.sock");
    let _agent = start_agent(&agent_sock);
    wait_for(&agent_sock).await;
    let uds = dir.path().join("v.sock");
    fake_firecracker(uds.clone(), agent_sock, 1024, Fc::Accept);
    let endpoint = AgentEndpoint::FirecrackerVsock { uds, port: 1024 };
    async fn run(endpoint: &AgentEndpoint, word: String) -> (Vec<u8>, ExitStatus) {
        let conn = connect(endpoint, T).await.unwrap();
        let spec = banger_agent_proto::ExecSpec {
            argv: vec!["echo".into(), word],
            env: Vec::new(),
            workdir: None,
            user: None,
            tty: None,
        };
        let mut s = conn.exec(spec, T).await.unwrap();
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(T, s.output.next()).await.unwrap() {
                Some(StreamEvent::Output(ch, b)) => {
                    out.extend_from_slice(&b);
                    s.output.consumed(ch, b.len()).await.unwrap();
                }
                Some(StreamEvent::Exit(status)) => return (out, status),
                other => panic!("{other:?}"),
            }
        }
    }
    for i in 0..1000 {
        let (out, status) = run(&endpoint, i.to_string()).await;
        assert_eq!(
            (out, status),
            (format!("{i}\n").into_bytes(), ExitStatus::Code(0))
        );
    }
    let runs = (0..50).map(|i| {
        let endpoint = endpoint.clone();
        tokio::spawn(async move { (i, run(&endpoint, i.to_string()).await) })
    });
    for r in futures_util::future::join_all(runs).await {
        let (i, (out, status)) = r.unwrap();
        assert_eq!(
            (out, status),
            (format!("{i}\n").into_bytes(), ExitStatus::Code(0))
        );
    }
}
