//! Host side of the guest agent: dialing it over each transport.
//!
//! - [`AgentEndpoint::Unix`]: a unix socket that is the agent's byte
//!   stream, e.g. QEMU's `-chardev socket` behind the virtio-serial port
//!   `org.banger.agent` (or the agent's own `--unix` in tests).
//! - [`AgentEndpoint::FirecrackerVsock`]: Firecracker's hybrid vsock. The
//!   VM's vsock device is a unix socket on the host (`uds_path` of
//!   `PUT /vsock`); a host-initiated connection writes `CONNECT <port>\n`
//!   and Firecracker answers `OK <host_port>\n` once the guest accepted.
//! - [`AgentEndpoint::Vsock`]: plain AF_VSOCK (QEMU with vhost-vsock).
//!
//! The protocol itself is `banger_agent_proto`; this module only makes the
//! stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use banger_agent_proto::Health;
use banger_agent_proto::client::{Client, ClientError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;

/// Where a VM's agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A unix socket carrying the agent's stream.
    Unix(PathBuf),
    /// Firecracker's hybrid vsock socket and the guest port.
    FirecrackerVsock {
        /// The VM's vsock unix socket.
        uds: PathBuf,
        /// The agent's vsock port in the guest.
        port: u32,
    },
    /// AF_VSOCK to a guest context id.
    Vsock {
        /// The guest's CID.
        cid: u32,
        /// The agent's port.
        port: u32,
    },
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::Unix(p) => write!(f, "unix socket {}", p.display()),
            AgentEndpoint::FirecrackerVsock { uds, port } => {
                write!(f, "firecracker vsock {} port {port}", uds.display())
            }
            AgentEndpoint::Vsock { cid, port } => write!(f, "vsock cid {cid} port {port}"),
        }
    }
}

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum AgentConnectError {
    /// The socket file is not there (the VMM has not made it yet?).
    #[error("{endpoint}: the socket does not exist; is the VM running?")]
    Missing {
        /// Where.
        endpoint: String,
    },
    /// Nobody accepts on it.
    #[error("{endpoint}: connection refused; the VMM is not listening")]
    Refused {
        /// Where.
        endpoint: String,
    },
    /// Firecracker answered the `CONNECT` with something else than `OK`.
    #[error(
        "{endpoint}: the vsock handshake was refused ({answer:?}); the guest agent is not listening yet"
    )]
    Handshake {
        /// Where.
        endpoint: String,
        /// What came back, truncated.
        answer: String,
    },
    /// Connecting took too long.
    #[error("{endpoint}: no connection within {secs:.1}s")]
    Timeout {
        /// Where.
        endpoint: String,
        /// The limit.
        secs: f64,
    },
    /// Any other I/O failure.
    #[error("{endpoint}: {source}")]
    Io {
        /// Where.
        endpoint: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Waiting for an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentWaitError {
    /// Nothing answered before the deadline; the last failure is kept.
    #[error("the guest agent did not answer within {secs:.0}s (last: {last})")]
    Timeout {
        /// The deadline.
        secs: f64,
        /// The last error seen.
        last: String,
    },
}

/// A connected stream to an agent, whatever the transport.
#[derive(Debug)]
pub enum AgentStream {
    /// Unix socket (serial chardev, Firecracker vsock after the handshake).
    Unix(UnixStream),
    /// AF_VSOCK.
    Vsock(tokio_vsock::VsockStream),
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            AgentStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A protocol client on an agent stream.
pub type AgentConn = Client;

/// The longest handshake line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

async fn connect_unix(
    path: &std::path::Path,
    endpoint: &str,
) -> Result<UnixStream, AgentConnectError> {
    connect_nofollow(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AgentConnectError::Missing {
            endpoint: endpoint.to_owned(),
        },
        std::io::ErrorKind::ConnectionRefused => AgentConnectError::Refused {
            endpoint: endpoint.to_owned(),
        },
        _ => AgentConnectError::Io {
            endpoint: endpoint.to_owned(),
            source: e,
        },
    })
}

/// Connect to the unix socket at `path` without following a symbolic
/// link in its last component: a jailed VMM owns the directory its
/// sockets are in (Firecracker's chroot) and could put a link to another
/// socket of the host's there. The socket is opened with `O_PATH |
/// O_NOFOLLOW`, checked to be a socket, and connected to through
/// `/proc/self/fd`, which names exactly the inode opened. Anything but a
/// socket is `InvalidInput`; a missing one `NotFound`.
pub async fn connect_nofollow(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !opened.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    let named = format!("/proc/self/fd/{}", opened.as_raw_fd());
    let stream = UnixStream::connect(&named).await;
    drop(opened);
    stream
}

/// Firecracker's host-initiated vsock handshake on a connected socket:
/// send `CONNECT <port>\n`, expect `OK <host_port>\n`. Reads byte by byte
/// so nothing after the newline (protocol data) is consumed.
pub async fn firecracker_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
    endpoint: &str,
) -> Result<u32, AgentConnectError> {
    let io = |source| AgentConnectError::Io {
        endpoint: endpoint.to_owned(),
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io)?;
        if n == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    host_port.ok_or_else(|| AgentConnectError::Handshake {
        endpoint: endpoint.to_owned(),
        answer: if text.is_empty() {
            "connection closed".to_owned()
        } else {
            text.chars().take(MAX_HANDSHAKE_LINE).collect()
        },
    })
}

/// Open a stream to the agent at `endpoint` within `timeout`.
pub async fn connect(
    endpoint: &AgentEndpoint,
    timeout: Duration,
) -> Result<AgentConn, AgentConnectError> {
    let name = endpoint.to_string();
    let dial = async {
        match endpoint {
            AgentEndpoint::Unix(path) => Ok(AgentStream::Unix(connect_unix(path, &name).await?)),
            AgentEndpoint::FirecrackerVsock { uds, port } => {
                let mut s = connect_unix(uds, &name).await?;
                firecracker_handshake(&mut s, *port, &name).await?;
                Ok(AgentStream::Unix(s))
            }
            AgentEndpoint::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                tokio_vsock::VsockStream::connect(addr)
                    .await
                    .map(AgentStream::Vsock)
                    .map_err(|source| AgentConnectError::Io {
                        endpoint: name.clone(),
                        source,
                    })
            }
        }
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(r) => r.map(Client::new),
        Err(_) => Err(AgentConnectError::Timeout {
            endpoint: name.clone(),
            secs: timeout.as_secs_f64(),
        }),
    }
}

/// Keep connecting and asking `Health` until the agent answers or
/// `overall` runs out. For QEMU's chardev socket the connection succeeds
/// as soon as QEMU runs and the answer comes once the guest's agent
/// starts; for Firecracker the `CONNECT` fails until the guest listens.
/// Returns the connection, the health and how long it took.
pub async fn wait_until_ready(
    endpoint: &AgentEndpoint,
    overall: Duration,
    poll: Duration,
) -> Result<(AgentConn, Health, Duration), AgentWaitError> {
    Connections::default()
        .wait_until_ready(endpoint, overall, poll)
        .await
}

/// Connections to guests' agents, shared where the transport needs it.
///
/// A virtio-serial port carries one host connection at a time (QEMU's
/// chardev socket refuses a second while the first is open), so every
/// caller of a [`AgentEndpoint::Unix`] endpoint gets a clone of one
/// connection and the client multiplexes their requests over it; a new
/// one is dialed only when it has ended. Vsock transports give each
/// caller a connection of its own.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    serial: std::sync::Arc<tokio::sync::Mutex<HashMap<PathBuf, AgentConn>>>,
}

impl Connections {
    /// A connection to the agent at `endpoint` (shared on serial) within
    /// `timeout`.
    pub async fn connect(
        &self,
        endpoint: &AgentEndpoint,
        timeout: Duration,
    ) -> Result<AgentConn, AgentConnectError> {
        let AgentEndpoint::Unix(path) = endpoint else {
            return connect(endpoint, timeout).await;
        };
        // Held while dialing, so that two callers never dial one port.
        let mut serial = self.serial.lock().await;
        serial.retain(|_, conn| !conn.is_closed());
        if let Some(conn) = serial.get(path) {
            return Ok(conn.clone());
        }
        let conn = connect(endpoint, timeout).await?;
        serial.insert(path.clone(), conn.clone());
        Ok(conn)
    }

    /// [`wait_until_ready`] through these connections.
    pub async fn wait_until_ready(
        &self,
        endpoint: &AgentEndpoint,
        overall: Duration,
        poll: Duration,
    ) -> Result<(AgentConn, Health, Duration), AgentWaitError> {
        let start = Instant::now();
        let mut last = String::from("nothing tried yet");
        loop {
            let left = overall.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(AgentWaitError::Timeout {
                    secs: overall.as_secs_f64(),
                    last,
                });
            }
            let attempt = left.min(Duration::from_secs(5));
            match self.connect(endpoint, attempt).await {
                Ok(conn) => {
                    // On serial, an answer may take as long as the guest
                    // needs to boot.
                    let wait = left
                        .min(Duration::from_secs(10))
                        .max(Duration::from_millis(100));
                    match conn.health(wait).await {
                        Ok(h) => return Ok((conn, h, start.elapsed())),
                        Err(ClientError::Timeout { .. }) => {
                            last = "connected, but the agent did not answer yet".to_owned();
                            continue;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(poll.min(overall.saturating_sub(start.elapsed()))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_accepts_ok_and_leaves_the_rest() {
        let (mut host, mut fc) = tokio::io::duplex(256);
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            fc.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"CONNECT 1024\n");
            fc.write_all(b"OK 1073741824\nPROTOCOL")
                .await
                .expect("write");
            fc
        });
        let port = firecracker_handshake(&mut host, 1024, "t")
            .await
            .expect("ok");
        assert_eq!(port, 1_073_741_824);
        let mut rest = [0u8; 8];
        host.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"PROTOCOL");
        drop(server.await);
    }

    #[tokio::test]
    async fn handshake_refusals_are_typed() {
        for answer in [&b""[..], b"NOPE\n", b"OK notanumber\n", &[b'x'; 200][..]] {
            let (mut host, mut fc) = tokio::io::duplex(1024);
            let answer = answer.to_vec();
            tokio::spawn(async move {
                let mut buf = [0u8; 13];
                let _ = fc.read_exact(&mut buf).await;
                let _ = fc.write_all(&answer).await;
            });
            let err = firecracker_handshake(&mut host, 1024, "t")
                .await
                .expect_err("refused");
            match err {
                AgentConnectError::Handshake { answer, .. } => {
                    assert!(answer.len() <= MAX_HANDSHAKE_LINE)
                }
                other => panic!("{other}"),
            }
        }
    }

    #[tokio::test]
    async fn missing_and_refused_sockets_are_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = AgentEndpoint::Unix(dir.path().join("nope.sock"));
        assert!(matches!(
            connect(&missing, Duration::from_secs(1)).await,
            Err(AgentConnectError::Missing { .. })
        ));
        let path = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let dead = AgentEndpoint::FirecrackerVsock {
            uds: path,
            port: 1024,
        };
        assert!(matches!(
            connect(&dead, Duration::from_secs(1)).await,
            Err(AgentConnectError::Refused { .. })
        ));
        let err = wait_until_ready(
            &missing,
            Duration::from_millis(300),
            Duration::from_millis(50),
        )
        .await
        .expect_err("times out");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
