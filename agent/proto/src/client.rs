//! An async client over any byte stream to the agent.
//!
//! The transport is the caller's business (bangerd dials vsock, the
//! Firecracker hybrid vsock socket or a QEMU virtio-serial socket); this
//! only speaks the protocol. A [`Client`] is shared: clones send their
//! requests over the same stream at once, each with an id of its own,
//! and a reader task hands every reply to the call that waits for its
//! id. Replies nobody waits for (left over from an earlier client on a
//! virtio-serial port, or for a call that gave up) are skipped. That is
//! how one virtio-serial port, which carries one host connection at a
//! time, serves any number of callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{CodecError, Frame, FrameCodec};
use crate::{AgentError, Health, Info, Request, Response, encode_request, parse_response};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport failed.
    #[error("agent connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The agent closed the stream before answering.
    #[error("the agent closed the connection before answering")]
    Closed,
    /// No answer within the deadline.
    #[error("the agent did not answer {op} within {secs:.1}s")]
    Timeout {
        /// The request.
        op: &'static str,
        /// The deadline.
        secs: f64,
    },
    /// The agent answered with something that is not a reply.
    #[error("the agent sent a malformed reply: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("the agent refused {op}: {source}")]
    Agent {
        /// The request.
        op: &'static str,
        /// The agent's error.
        #[source]
        source: AgentError,
    },
}

impl From<CodecError> for ClientError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

type Reply = Result<Response, AgentError>;
type Writer = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, FrameCodec>;

/// Calls waiting for their reply, by request id; `Err` once the stream
/// ended (with why, empty at a clean end).
type Waiting = Result<HashMap<u64, oneshot::Sender<Reply>>, String>;

#[derive(Debug)]
struct Shared {
    writer: tokio::sync::Mutex<WriterBox>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

struct WriterBox(Writer);

impl std::fmt::Debug for WriterBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connected client; clones share its stream.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// Takes a call's entry out of the waiting map however the call ends.
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(map) = lock(self.waiting).as_mut() {
            map.remove(&self.id);
        }
    }
}

fn lock(m: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Speak the protocol over `stream` (a reader task is spawned on the
    /// current tokio runtime).
    pub fn new<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let waiting: Arc<Mutex<Waiting>> = Arc::new(Mutex::new(Ok(HashMap::new())));
        let reader = tokio::spawn(read_replies(read, waiting.clone()));
        let writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(write);
        Self {
            shared: Arc::new(Shared {
                writer: tokio::sync::Mutex::new(WriterBox(FramedWrite::new(
                    writer,
                    FrameCodec::new(),
                ))),
                waiting,
                // Start somewhere unlikely to match a stale reply's id.
                next_id: AtomicU64::new(u64::from(std::process::id()) << 32 | 1),
                reader,
            }),
        }
    }

    /// Whether the stream has ended (a new connection is needed).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.waiting).is_err()
    }

    /// Send `request` and wait up to `timeout` for its reply.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Response, ClientError> {
        let op = request.op();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = oneshot::channel();
        match lock(&self.shared.waiting).as_mut() {
            Ok(map) => map.insert(id, tx),
            Err(_) => return Err(ClientError::Closed),
        };
        let _forget = Forget {
            waiting: &self.shared.waiting,
            id,
        };
        let payload = encode_request(id, request);
        let exchange = async {
            let sent = self
                .shared
                .writer
                .lock()
                .await
                .0
                .send(payload.as_slice())
                .await;
            if let Err(e) = sent {
                // The stream is broken for every caller.
                let e = ClientError::from(e);
                *lock(&self.shared.waiting) = Err(e.to_string());
                return Err(e);
            }
            match rx.await {
                Ok(result) => result.map_err(|source| ClientError::Agent { op, source }),
                Err(_) => match &*lock(&self.shared.waiting) {
                    Err(why) if !why.is_empty() => Err(ClientError::Protocol(why.clone())),
                    _ => Err(ClientError::Closed),
                },
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                op,
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// `Health`.
    pub async fn health(&self, timeout: Duration) -> Result<Health, ClientError> {
        match self.call(Request::Health, timeout).await? {
            Response::Health(h) => Ok(h),
            other => Err(unexpected("health", &other)),
        }
    }

    /// `Info`.
    pub async fn info(&self, timeout: Duration) -> Result<Info, ClientError> {
        match self.call(Request::Info, timeout).await? {
            Response::Info(i) => Ok(*i),
            other => Err(unexpected("info", &other)),
        }
    }

    /// `WaitPort`: the agent waits up to `wait`; the call allows a little
    /// more for the round trip.
    pub async fn wait_port(&self, port: u16, wait: Duration) -> Result<Duration, ClientError> {
        let req = Request::WaitPort {
            port,
            timeout_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        match self.call(req, wait + Duration::from_secs(5)).await? {
            Response::PortReady { waited_ms, .. } => Ok(Duration::from_millis(waited_ms)),
            other => Err(unexpected("wait_port", &other)),
        }
    }

    /// `Shutdown`.
    pub async fn shutdown(&self, reboot: bool, timeout: Duration) -> Result<(), ClientError> {
        match self.call(Request::Shutdown { reboot }, timeout).await? {
            Response::ShuttingDown { .. } => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }

    /// `SyncTime` with the host's clock now; returns the offset fixed.
    pub async fn sync_time(&self, timeout: Duration) -> Result<i64, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        match self
            .call(Request::SyncTime { unix_ns: now }, timeout)
            .await?
        {
            Response::TimeSynced { offset_ns } => Ok(offset_ns),
            other => Err(unexpected("sync_time", &other)),
        }
    }
}

/// Hand each reply to the call waiting for its id until the stream ends;
/// then every waiting call learns it.
async fn read_replies<R: AsyncRead + Send + Unpin>(read: R, waiting: Arc<Mutex<Waiting>>) {
    let mut frames = FramedRead::new(read, FrameCodec::new());
    let why = loop {
        match frames.next().await {
            None => break String::new(),
            Some(Err(e)) => break ClientError::from(e).to_string(),
            // Skipped: its caller's call cannot be told apart.
            Some(Ok(Frame::Oversized(_))) => continue,
            Some(Ok(Frame::Data(bytes))) => {
                let Ok(env) = parse_response(&bytes) else {
                    continue;
                };
                let tx = lock(&waiting).as_mut().ok().and_then(|m| m.remove(&env.id));
                if let Some(tx) = tx {
                    let _ = tx.send(env.result);
                }
            }
        }
    };
    // Dropping the senders wakes every waiting call.
    *lock(&waiting) = Err(why);
}

fn unexpected(op: &str, got: &Response) -> ClientError {
    ClientError::Protocol(format!("{op} was answered with {got:?}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{ErrorKind, encode_response, parse_request};
    use tokio_util::codec::Framed;

    /// A scripted agent: answers each request with `answer(request)`.
    async fn fake_agent<F>(stream: tokio::io::DuplexStream, answer: F)
    where
        F: Fn(u64, Request) -> Vec<Vec<u8>>,
    {
        let mut framed = Framed::new(stream, FrameCodec::new());
        while let Some(Ok(Frame::Data(bytes))) = framed.next().await {
            let env = parse_request(&bytes).unwrap();
            for reply in answer(env.id, env.request) {
                framed.send(reply.as_slice()).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn skips_stale_replies_and_maps_errors() {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(fake_agent(b, |id, req| match req {
            Request::Health => vec![
                encode_response(
                    id.wrapping_sub(1),
                    Ok(Response::ShuttingDown { reboot: false }),
                ),
                encode_response(
                    id,
                    Ok(Response::Health(Health {
                        agent_version: "t".into(),
                        protocol: 1,
                        uptime_secs: 1.5,
                        boot_id: "b".into(),
                    })),
                ),
            ],
            _ => vec![encode_response(
                id,
                Err(AgentError::new(ErrorKind::Failed, "no")),
            )],
        }));
        let c = Client::new(a);
        let h = c.health(Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.boot_id, "b");
        let err = c.info(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Agent { op: "info", ref source } if source.kind == ErrorKind::Failed),
            "{err}"
        );
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_stream_and_get_their_own_replies() {
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (r, w) = tokio::io::split(b);
            let mut frames = FramedRead::new(r, FrameCodec::new());
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
            tokio::spawn(async move {
                let mut sink = FramedWrite::new(w, FrameCodec::new());
                while let Some(m) = rx.recv().await {
                    sink.send(m.as_slice()).await.unwrap();
                }
            });
            let mut n = 0u64;
            while let Some(Ok(Frame::Data(bytes))) = frames.next().await {
                let env = parse_request(&bytes).unwrap();
                let Request::WaitPort { port, .. } = env.request else {
                    panic!("{:?}", env.request)
                };
                n += 1;
                let tx = tx.clone();
                // Later requests are answered first.
                let delay = Duration::from_millis(200u64.saturating_sub(n * 4));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let reply = Response::PortReady {
                        port,
                        waited_ms: u64::from(port),
                    };
                    tx.send(encode_response(env.id, Ok(reply))).await.unwrap();
                });
            }
        });
        let c = Client::new(a);
        let calls = (1..=50u16).map(|port| {
            let c = c.clone();
            async move { (port, c.wait_port(port, Duration::from_secs(5)).await) }
        });
        for (port, waited) in futures_util::future::join_all(calls).await {
            assert_eq!(waited.unwrap(), Duration::from_millis(port.into()));
        }
        assert!(!c.is_closed());
    }

    #[tokio::test]
    async fn times_out_and_reports_closed() {
        let (a, b) = tokio::io::duplex(4096);
        let c = Client::new(a);
        let err = c.health(Duration::from_millis(50)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "health", .. }),
            "{err}"
        );
        drop(b);
        let err = c.health(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Closed | ClientError::Io(_)),
            "{err}"
        );
        assert!(c.is_closed());
    }
}
