//! An async client over any byte stream to the agent.
//!
//! The transport is the caller's business (bangerd dials vsock, the
//! Firecracker hybrid vsock socket or a QEMU virtio-serial socket); this
//! only speaks the protocol: one request at a time, replies matched by id,
//! stale replies (left over from an earlier client on a virtio-serial
//! port) skipped.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

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

/// A connected client.
#[derive(Debug)]
pub struct Client<S> {
    framed: Framed<S, FrameCodec>,
    next_id: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Speak the protocol over `stream`.
    pub fn new(stream: S) -> Self {
        Self {
            framed: Framed::new(stream, FrameCodec::new()),
            // Start somewhere unlikely to match a stale reply's id.
            next_id: u64::from(std::process::id()) << 32 | 1,
        }
    }

    /// Send `request` and wait up to `timeout` for its reply.
    pub async fn call(
        &mut self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let op = request.op();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let payload = encode_request(id, request);
        let exchange = async {
            self.framed.send(payload.as_slice()).await?;
            loop {
                match self.framed.next().await {
                    None => return Err(ClientError::Closed),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Frame::Oversized(n))) => {
                        return Err(ClientError::Protocol(format!(
                            "reply of {n} bytes is over the limit"
                        )));
                    }
                    Some(Ok(Frame::Data(bytes))) => {
                        let env = parse_response(&bytes)
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        if env.id != id {
                            // A reply to somebody else's request; skip it.
                            continue;
                        }
                        return env
                            .result
                            .map_err(|source| ClientError::Agent { op, source });
                    }
                }
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
    pub async fn health(&mut self, timeout: Duration) -> Result<Health, ClientError> {
        match self.call(Request::Health, timeout).await? {
            Response::Health(h) => Ok(h),
            other => Err(unexpected("health", &other)),
        }
    }

    /// `Info`.
    pub async fn info(&mut self, timeout: Duration) -> Result<Info, ClientError> {
        match self.call(Request::Info, timeout).await? {
            Response::Info(i) => Ok(*i),
            other => Err(unexpected("info", &other)),
        }
    }

    /// `WaitPort`: the agent waits up to `wait`; the call allows a little
    /// more for the round trip.
    pub async fn wait_port(&mut self, port: u16, wait: Duration) -> Result<Duration, ClientError> {
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
    pub async fn shutdown(&mut self, reboot: bool, timeout: Duration) -> Result<(), ClientError> {
        match self.call(Request::Shutdown { reboot }, timeout).await? {
            Response::ShuttingDown { .. } => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }

    /// `SyncTime` with the host's clock now; returns the offset fixed.
    pub async fn sync_time(&mut self, timeout: Duration) -> Result<i64, ClientError> {
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

    /// The stream back, e.g. to close it.
    pub fn into_inner(self) -> S {
        self.framed.into_inner()
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
        let mut c = Client::new(a);
        let h = c.health(Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.boot_id, "b");
        let err = c.info(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Agent { op: "info", ref source } if source.kind == ErrorKind::Failed),
            "{err}"
        );
    }

    #[tokio::test]
    async fn times_out_and_reports_closed() {
        let (a, b) = tokio::io::duplex(4096);
        let mut c = Client::new(a);
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
    }
}
