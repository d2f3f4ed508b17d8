//! The real agent binary, serving a unix socket on this host, driven by
//! the same client bangerd uses.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use banger_agent_proto::client::{Client, ClientError};
use banger_agent_proto::codec::MAX_FRAME_LEN;
use banger_agent_proto::{ErrorKind, Request, Response, parse_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

mod common;

use common::{AgentProc, T};

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn answers_health_and_info_with_this_hosts_facts() {
    let agent = AgentProc::start();
    let c = agent.client().await;
    let h = c.health(T).await.unwrap();
    assert_eq!(h.boot_id, boot_id());
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(h.uptime_secs > 0.0);
    let info = c.info(T).await.unwrap();
    let uts = nix::sys::utsname::uname().unwrap();
    assert_eq!(info.kernel_release, uts.release().to_string_lossy());
    assert_eq!(info.machine, "x86_64");
    assert!(info.memory_total_bytes > info.memory_available_bytes);
    let root = info.disks.iter().find(|d| d.path == "/").unwrap();
    assert!(root.total_bytes >= root.used_bytes && root.total_bytes > 0);
}

#[tokio::test]
async fn wait_port_returns_when_a_listener_appears() {
    let agent = AgentProc::start();
    let waiter = agent.client().await;
    // Reserve a free port, then release it so nothing listens yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let wait = tokio::spawn(async move { waiter.wait_port(port, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A concurrent request on another connection is not held up.
    let other = agent.client().await;
    other.health(Duration::from_secs(2)).await.unwrap();
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let waited = wait.await.unwrap().unwrap();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");

    let c = agent.client().await;
    let err = c
        .call(
            Request::WaitPort {
                port: 1,
                timeout_ms: 100,
            },
            T,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Agent { source, .. } if source.kind == ErrorKind::Timeout),
        "{err}"
    );
}

/// Write one raw frame and read one raw reply.
async fn raw_exchange(
    s: &mut UnixStream,
    len: u32,
    body: &[u8],
) -> banger_agent_proto::ResponseEnvelope {
    s.write_all(&len.to_be_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut n = [0u8; 4];
    s.read_exact(&mut n).await.unwrap();
    let mut reply = vec![0; u32::from_be_bytes(n) as usize];
    s.read_exact(&mut reply).await.unwrap();
    parse_response(&reply).unwrap()
}

#[tokio::test]
async fn bad_frames_get_error_replies_and_the_connection_goes_on() {
    let agent = AgentProc::start();
    let mut s = UnixStream::connect(&agent.socket).await.unwrap();

    let garbage = b"\xff\xfe not json";
    let r = raw_exchange(&mut s, garbage.len() as u32, garbage).await;
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::BadFrame);

    let r = raw_exchange(&mut s, 0, b"").await;
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::BadFrame);

    let newer = br#"{"v":99,"id":12,"op":"health"}"#;
    let r = raw_exchange(&mut s, newer.len() as u32, newer).await;
    assert_eq!(
        (r.id, r.result.unwrap_err().kind),
        (12, ErrorKind::UnsupportedVersion)
    );

    let unknown = br#"{"v":1,"id":13,"op":"format_disk"}"#;
    let r = raw_exchange(&mut s, unknown.len() as u32, unknown).await;
    assert_eq!(
        (r.id, r.result.unwrap_err().kind),
        (13, ErrorKind::UnknownRequest)
    );

    // An oversized frame: the agent answers at once and skips the body.
    let big = vec![b'x'; MAX_FRAME_LEN + 1];
    let r = raw_exchange(&mut s, big.len() as u32, &big).await;
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::FrameTooLarge);

    // The same connection still works.
    let c = Client::new(s);
    c.health(T).await.unwrap();
    let err = c
        .call(Request::SyncTime { unix_ns: -3 }, T)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Agent { source, .. } if source.kind == ErrorKind::InvalidArgument),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_replies_before_the_agent_acts() {
    let mut agent = AgentProc::start();
    let c = agent.client().await;
    let reply = c
        .call(Request::Shutdown { reboot: false }, T)
        .await
        .unwrap();
    assert_eq!(reply, Response::ShuttingDown { reboot: false });
    // With --no-power the agent exits instead of powering off this host.
    let start = Instant::now();
    loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(start.elapsed() < T, "agent did not exit after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn call_subcommand_prints_the_reply() {
    let agent = AgentProc::start();
    let out = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
        .args(["call", "--connect"])
        .arg(&agent.socket)
        .arg("health")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "health");
    assert_eq!(v["boot_id"], boot_id());

    let out = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
        .args(["call", "--connect"])
        .arg(Path::new("/nonexistent/agent.sock"))
        .arg("health")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
