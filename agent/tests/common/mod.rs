//! What the agent's integration tests share: the real agent binary on a
//! unix socket of its own.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_agent_proto::client::Client;
use tokio::net::UnixStream;

/// The tests' patience.
pub const T: Duration = Duration::from_secs(10);

/// A running `banger-agent --unix SOCKET --no-power`, killed on drop.
pub struct AgentProc {
    /// The agent process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    /// Start one and wait until it listens.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
            .arg("--unix")
            .arg(&socket)
            .arg("--no-power")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The socket file appears at bind(), a moment before listen():
        // wait until a connection is accepted, not until the file exists.
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(start.elapsed() < T, "agent did not listen on its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// A client on a new connection.
    pub async fn client(&self) -> Client {
        Client::new(UnixStream::connect(&self.socket).await.unwrap())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
