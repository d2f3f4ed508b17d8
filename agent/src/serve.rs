//! Transports and the per-stream request loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_agent_proto::codec::{Frame, FrameCodec, MAX_FRAME_LEN};
use banger_agent_proto::stream::{StreamFrame, is_json};
use banger_agent_proto::{AgentError, ErrorKind, Request, encode_response, parse_request};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::exec::{Opened, Streams};
use crate::handlers::{self, AfterReply};

/// Shared state of the serving agent.
#[derive(Debug)]
pub struct Agent {
    /// Where procfs is (tests point it elsewhere only for failures).
    pub proc_root: PathBuf,
    /// Ask the main loop to shut the guest down.
    pub shutdown: mpsc::Sender<bool>,
}

/// Serve one byte stream until the peer closes it; returns how many
/// frames it read.
pub async fn serve_stream<R, W>(agent: Arc<Agent>, reader: R, writer: W) -> usize
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut frames = FramedRead::new(reader, FrameCodec::new());
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer_task = tokio::spawn(async move {
        let mut sink = FramedWrite::new(writer, FrameCodec::new());
        while let Some(reply) = rx.recv().await {
            if let Err(e) = sink.send(reply.as_slice()).await {
                eprintln!("banger-agent: cannot send a reply: {e}");
                break;
            }
        }
    });
    let streams = Arc::new(Streams::default());
    let mut count = 0;
    while let Some(frame) = frames.next().await {
        count += 1;
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                eprintln!("banger-agent: read failed: {e}");
                break;
            }
        };
        let payload = match frame {
            Frame::Oversized(n) => {
                let err = AgentError::new(
                    ErrorKind::FrameTooLarge,
                    format!(
                        "frame of {n} bytes is over the {MAX_FRAME_LEN}-byte limit; it was skipped"
                    ),
                );
                if tx.send(encode_response(0, Err(err))).await.is_err() {
                    break;
                }
                continue;
            }
            Frame::Data(p) => p,
        };
        if !is_json(&payload) {
            match StreamFrame::decode(&payload) {
                Ok(frame) => streams.route(frame),
                Err(e) => {
                    let err = AgentError::new(
                        ErrorKind::BadFrame,
                        format!("frame is neither a JSON request nor a stream frame: {e}"),
                    );
                    if tx.send(encode_response(0, Err(err))).await.is_err() {
                        break;
                    }
                }
            }
            continue;
        }
        let env = match parse_request(&payload) {
            Ok(env) => env,
            Err((id, err)) => {
                if tx.send(encode_response(id, Err(err))).await.is_err() {
                    break;
                }
                continue;
            }
        };
        // Stream requests act on this connection's streams at once, so
        // that the stdin which follows an Exec finds its stream.
        let direct = match env.request {
            Request::Exec(spec) => {
                streams.open(env.id, Opened::Exec(spec), tx.clone());
                continue;
            }
            Request::Connect { port } => {
                streams.open(env.id, Opened::Connect(port), tx.clone());
                continue;
            }
            Request::Signal { stream, signal } => Some(streams.signal(stream, signal)),
            Request::Resize { stream, rows, cols } => Some(streams.resize(stream, rows, cols)),
            other => {
                // Requests run concurrently so a long WaitPort holds up nothing.
                let tx = tx.clone();
                let agent = agent.clone();
                tokio::spawn(async move {
                    let (result, after) = handlers::handle(other, &agent.proc_root).await;
                    let _ = tx.send(encode_response(env.id, result)).await;
                    if let AfterReply::Shutdown { reboot } = after {
                        let _ = agent.shutdown.send(reboot).await;
                    }
                });
                None
            }
        };
        if let Some(result) = direct
            && tx.send(encode_response(env.id, result)).await.is_err()
        {
            break;
        }
    }
    // The host is gone: so are the commands it ran.
    streams.kill_all();
    drop(tx);
    let _ = writer_task.await;
    count
}

/// Accept connections on a unix socket (for tests and debugging).
pub async fn serve_unix(agent: Arc<Agent>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    ready(&format!("unix socket {}", path.display()));
    loop {
        let (stream, _) = listener.accept().await?;
        let (r, w) = stream.into_split();
        tokio::spawn(serve_stream(agent.clone(), r, w));
    }
}

/// Accept connections on AF_VSOCK `port`.
pub async fn serve_vsock(agent: Arc<Agent>, port: u32) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    ready(&format!("vsock port {port}"));
    loop {
        let (stream, _) = listener.accept().await?;
        let (r, w) = tokio::io::split(stream);
        tokio::spawn(serve_stream(agent.clone(), r, w));
    }
}

/// Find the virtio-serial port called `name` under `sys_ports`
/// (`/sys/class/virtio-ports`): its device node in /dev.
pub fn find_serial_port(sys_ports: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_ports).ok()?;
    entries.flatten().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Serve the virtio-serial port `name`, waiting for it to appear and
/// starting a new session whenever the host side comes back.
pub async fn serve_serial(agent: Arc<Agent>, name: &str) -> std::io::Result<()> {
    let sys = Path::new("/sys/class/virtio-ports");
    let mut said_waiting = false;
    loop {
        let Some(dev) = find_serial_port(sys, name) else {
            if !said_waiting {
                eprintln!("banger-agent: waiting for virtio-serial port {name}");
                said_waiting = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        // Blocking reads and writes on the blocking pool, not epoll: the
        // port's readiness events were seen to go missing while the
        // agent read and wrote at once, leaving host data unread (the
        // same stall as issue 20, item 8). A blocked read wakes on the
        // port's own wait queue.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&dev)?;
        // A port may be opened once; the writer gets a duplicate.
        let write_file = file.try_clone()?;
        let mut reader = tokio::fs::File::from_std(file);
        ready(&format!("virtio-serial port {name} ({})", dev.display()));
        // The port stays open for good: closing it makes the guest kernel
        // drop whatever the host sent meanwhile, and a host client that
        // connected just then would wait for an answer forever. While no
        // host is connected a read says end of stream at once, so each
        // session (one host connection, with a clean codec) starts after
        // a pause that grows while the host stays away.
        let mut pause = SERIAL_POLL_MIN;
        loop {
            let writer = tokio::fs::File::from_std(write_file.try_clone()?);
            let served = serve_stream(agent.clone(), &mut reader, writer).await;
            pause = if served > 0 {
                SERIAL_POLL_MIN
            } else {
                (pause * 2).min(SERIAL_POLL_MAX)
            };
            tokio::time::sleep(pause).await;
        }
    }
}

/// How soon the serial port is read again after its host went away, and
/// how far that pause grows while none comes back (an idle guest wakes
/// five times a second; a new host connection waits at most that long).
const SERIAL_POLL_MIN: Duration = Duration::from_millis(5);
const SERIAL_POLL_MAX: Duration = Duration::from_millis(200);

use std::os::unix::fs::OpenOptionsExt;

/// Say the agent serves on `what`: stderr, and the kernel log so a serial
/// console shows it.
fn ready(what: &str) {
    let line = format!("banger-agent: ready on {what}");
    eprintln!("{line}");
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        use std::io::Write;
        let _ = writeln!(kmsg, "{line}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_port() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", "org.banger.agent"),
        ] {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir(dir.path().join("vport2p1")).unwrap();
        assert_eq!(
            find_serial_port(dir.path(), "org.banger.agent"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_serial_port(dir.path(), "nope"), None);
        assert_eq!(find_serial_port(&dir.path().join("missing"), "x"), None);
    }
}
