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
use crate::stream::{CHUNK, Channel, ExitStatus, Inflow, StreamFrame, is_json};
use crate::{
    AgentError, ExecSpec, Health, Info, Request, Response, encode_request, parse_response,
};

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
    streams: Arc<Mutex<Streams>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

/// Open streams by id.
type Streams = HashMap<u64, Slot>;

/// What the reader task needs of an open stream.
#[derive(Debug)]
struct Slot {
    events: tokio::sync::mpsc::UnboundedSender<StreamEvent>,
    inflow: Arc<[Inflow; 3]>,
    credit: Arc<Credit>,
}

/// What happens on a stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Bytes on stdout or stderr; empty means that channel ended. Say
    /// [`ExecOutput::consumed`] once they are passed on.
    Output(Channel, bytes::Bytes),
    /// The process ended; nothing follows.
    Exit(ExitStatus),
    /// The stream broke (the connection ended, or the agent broke the
    /// protocol); nothing follows.
    Broken(String),
}

/// Credit to send on a channel: bytes the peer is ready to take
/// ([`crate::stream`]'s flow control).
#[derive(Debug, Default)]
pub struct Credit {
    state: Mutex<(u64, bool)>,
    notify: tokio::sync::Notify,
}

impl Credit {
    /// The peer granted `n` more bytes.
    pub fn add(&self, n: u32) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_add(u64::from(n));
        drop(st);
        self.notify.notify_waiters();
    }

    /// No more credit will come: wake every waiter with 0.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.notify.notify_waiters();
    }

    /// Up to `want` bytes of credit, waiting for some; 0 once closed.
    pub async fn take(&self, want: usize) -> usize {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.1 {
                    return 0;
                }
                if st.0 > 0 {
                    let n = st.0.min(want as u64);
                    st.0 -= n;
                    return n as usize;
                }
            }
            notified.await;
        }
    }
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
        let streams: Arc<Mutex<Streams>> = Arc::default();
        let reader = tokio::spawn(read_replies(read, waiting.clone(), streams.clone()));
        let writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(write);
        Self {
            shared: Arc::new(Shared {
                writer: tokio::sync::Mutex::new(WriterBox(FramedWrite::new(
                    writer,
                    FrameCodec::new(),
                ))),
                waiting,
                streams,
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
        let id = self.new_id();
        self.call_as(id, request, timeout).await
    }

    fn new_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed).max(1)
    }

    /// Send one frame as it is.
    async fn send_frame(&self, payload: &[u8]) -> Result<(), ClientError> {
        let sent = self.shared.writer.lock().await.0.send(payload).await;
        sent.map_err(|e| {
            let e = ClientError::from(e);
            *lock(&self.shared.waiting) = Err(e.to_string());
            e
        })
    }

    /// Run a command in the guest ([`Request::Exec`]); `timeout` bounds
    /// the wait for it to start. Its input, output and end go through the
    /// returned stream.
    pub async fn exec(&self, spec: ExecSpec, timeout: Duration) -> Result<ExecStream, ClientError> {
        match self.open_stream(Request::Exec(spec), timeout).await? {
            (stream, Response::ExecStarted { pid }) => Ok(ExecStream { pid, ..stream }),
            (_, other) => Err(unexpected("exec", &other)),
        }
    }

    /// Connect to TCP `port` on the guest's loopback ([`Request::Connect`]);
    /// the stream's stdin goes to the connection, its stdout comes from it.
    pub async fn connect_port(
        &self,
        port: u16,
        timeout: Duration,
    ) -> Result<ExecStream, ClientError> {
        match self.open_stream(Request::Connect { port }, timeout).await? {
            (stream, Response::Connected) => Ok(stream),
            (_, other) => Err(unexpected("connect", &other)),
        }
    }

    /// Send a request that opens a stream; the stream and the reply.
    async fn open_stream(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<(ExecStream, Response), ClientError> {
        let id = self.new_id();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let inflow: Arc<[Inflow; 3]> = Arc::default();
        let credit = Arc::new(Credit::default());
        credit.add(crate::stream::WINDOW);
        lock_streams(&self.shared.streams).insert(
            id,
            Slot {
                events: events_tx,
                inflow: inflow.clone(),
                credit: credit.clone(),
            },
        );
        let reply = match self.call_as(id, request, timeout).await {
            Ok(reply) => reply,
            Err(e) => {
                lock_streams(&self.shared.streams).remove(&id);
                return Err(e);
            }
        };
        let stream = ExecStream {
            input: ExecInput {
                id,
                client: self.clone(),
                credit,
            },
            output: ExecOutput {
                id,
                client: self.clone(),
                events,
                inflow,
            },
            pid: 0,
        };
        Ok((stream, reply))
    }

    async fn call_as(
        &self,
        id: u64,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let op = request.op();
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

    /// `Mount`: mount the virtio-fs share `tag` at `target` in the guest
    /// (read-only when asked); already mounted there counts as done. An
    /// agent older than this request answers [`ClientError::Agent`] with
    /// [`crate::ErrorKind::UnknownRequest`].
    pub async fn mount(
        &self,
        tag: &str,
        target: &str,
        read_only: bool,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let req = Request::Mount {
            tag: tag.to_owned(),
            target: target.to_owned(),
            read_only,
        };
        match self.call(req, timeout).await? {
            Response::Mounted => Ok(()),
            other => Err(unexpected("mount", &other)),
        }
    }

    /// `Renew`: give a restored guest `identity`; returns what was
    /// renewed with how long each step took. An agent older than this
    /// request answers [`ClientError::Agent`] with
    /// [`crate::ErrorKind::UnknownRequest`].
    pub async fn renew(
        &self,
        identity: crate::Identity,
        timeout: Duration,
    ) -> Result<Vec<(String, u64)>, ClientError> {
        match self
            .call(Request::Renew(Box::new(identity)), timeout)
            .await?
        {
            Response::Renewed { steps } => Ok(steps),
            other => Err(unexpected("renew", &other)),
        }
    }
}

fn lock_streams(m: &Mutex<Streams>) -> std::sync::MutexGuard<'_, Streams> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running command: its input side and its output side, which may be
/// used from different tasks.
#[derive(Debug)]
pub struct ExecStream {
    /// Stdin, signals, resizes.
    pub input: ExecInput,
    /// Output and the end.
    pub output: ExecOutput,
    /// The process's pid in the guest (0 for a connection).
    pub pid: u32,
}

/// The sending side of a running command.
#[derive(Debug, Clone)]
pub struct ExecInput {
    id: u64,
    client: Client,
    credit: Arc<Credit>,
}

impl ExecInput {
    /// Send `bytes` to the command's stdin, as fast as the agent takes them.
    pub async fn write(&self, mut bytes: &[u8]) -> Result<(), ClientError> {
        while !bytes.is_empty() {
            let n = self.credit.take(bytes.len().min(CHUNK)).await;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let frame = StreamFrame::Data {
                id: self.id,
                channel: Channel::Stdin,
                bytes: bytes::Bytes::copy_from_slice(&bytes[..n]),
            };
            self.client.send_frame(&frame.encode()).await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// End the command's stdin.
    pub async fn close(&self) -> Result<(), ClientError> {
        let frame = StreamFrame::Data {
            id: self.id,
            channel: Channel::Stdin,
            bytes: bytes::Bytes::new(),
        };
        self.client.send_frame(&frame.encode()).await
    }

    /// Send `signal` to the command's process group.
    pub async fn signal(&self, signal: i32, timeout: Duration) -> Result<(), ClientError> {
        let req = Request::Signal {
            stream: self.id,
            signal,
        };
        match self.client.call(req, timeout).await? {
            Response::Signalled => Ok(()),
            other => Err(unexpected("signal", &other)),
        }
    }

    /// Resize the command's terminal.
    pub async fn resize(&self, rows: u16, cols: u16, timeout: Duration) -> Result<(), ClientError> {
        let req = Request::Resize {
            stream: self.id,
            rows,
            cols,
        };
        match self.client.call(req, timeout).await? {
            Response::Resized => Ok(()),
            other => Err(unexpected("resize", &other)),
        }
    }
}

/// The receiving side of a running command.
#[derive(Debug)]
pub struct ExecOutput {
    id: u64,
    client: Client,
    events: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
    inflow: Arc<[Inflow; 3]>,
}

impl ExecOutput {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.events.recv().await
    }

    /// `n` bytes of `channel` were passed on: let the agent send more.
    pub async fn consumed(&self, channel: Channel, n: usize) -> Result<(), ClientError> {
        if n == 0 {
            return Ok(());
        }
        let n = self.inflow[channel.index()].passed_on(n);
        let frame = StreamFrame::Credit {
            id: self.id,
            channel,
            n,
        };
        self.client.send_frame(&frame.encode()).await
    }
}

impl Drop for ExecOutput {
    fn drop(&mut self) {
        lock_streams(&self.client.shared.streams).remove(&self.id);
    }
}

/// Route one stream frame to its stream.
fn route(streams: &Mutex<Streams>, frame: StreamFrame) {
    let mut map = lock_streams(streams);
    let id = frame.id();
    let Some(slot) = map.get(&id) else {
        return;
    };
    match frame {
        StreamFrame::Data { channel, bytes, .. } => {
            if channel == Channel::Stdin {
                return;
            }
            if !slot.inflow[channel.index()].receive(bytes.len()) {
                if let Some(slot) = map.remove(&id) {
                    slot.credit.close();
                    let _ = slot.events.send(StreamEvent::Broken(
                        "the agent sent past the flow-control window".to_owned(),
                    ));
                }
                return;
            }
            let _ = slot.events.send(StreamEvent::Output(channel, bytes));
        }
        StreamFrame::Credit { channel, n, .. } => {
            if channel == Channel::Stdin {
                slot.credit.add(n);
            }
        }
        StreamFrame::Exit { status, .. } => {
            if let Some(slot) = map.remove(&id) {
                slot.credit.close();
                let _ = slot.events.send(StreamEvent::Exit(status));
            }
        }
    }
}

/// Hand each reply to the call waiting for its id and each stream frame
/// to its stream until the connection ends; then every waiting call and
/// open stream learns it.
async fn read_replies<R: AsyncRead + Send + Unpin>(
    read: R,
    waiting: Arc<Mutex<Waiting>>,
    streams: Arc<Mutex<Streams>>,
) {
    let mut frames = FramedRead::new(read, FrameCodec::new());
    let why = loop {
        match frames.next().await {
            None => break String::new(),
            Some(Err(e)) => break ClientError::from(e).to_string(),
            // Skipped: its caller's call cannot be told apart.
            Some(Ok(Frame::Oversized(_))) => continue,
            Some(Ok(Frame::Data(bytes))) if !is_json(&bytes) => {
                if let Ok(frame) = StreamFrame::decode(&bytes) {
                    route(&streams, frame);
                }
            }
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
    *lock(&waiting) = Err(why.clone());
    let why = if why.is_empty() {
        "the agent connection ended".to_owned()
    } else {
        why
    };
    for (_, slot) in lock_streams(&streams).drain() {
        slot.credit.close();
        let _ = slot.events.send(StreamEvent::Broken(why.clone()));
    }
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
    async fn mount_sends_its_arguments_and_maps_an_old_agents_answer() {
        let (a, b) = tokio::io::duplex(4096);
        tokio::spawn(fake_agent(b, |id, req| match req {
            Request::Mount {
                tag,
                target,
                read_only: true,
            } if tag == "share" && target == "/mnt/share" => {
                vec![encode_response(id, Ok(Response::Mounted))]
            }
            // What an agent from before Mount answers (parse_request).
            other => vec![encode_response(
                id,
                Err(AgentError::new(
                    ErrorKind::UnknownRequest,
                    format!("unknown request {:?}", other.op()),
                )),
            )],
        }));
        let c = Client::new(a);
        c.mount("share", "/mnt/share", true, Duration::from_secs(5))
            .await
            .unwrap();
        let err = c
            .mount("share", "/mnt/share", false, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Agent { op: "mount", ref source } if source.kind == ErrorKind::UnknownRequest),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the agent refused mount: unknown request \"mount\""
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
