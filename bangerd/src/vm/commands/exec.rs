//! `vm exec`: run a command in a running guest through its agent. The
//! caller is authorized once and gets one end of a socket pair; bangerd
//! relays between the other end and the agent's stream, so the bytes
//! never travel in D-Bus messages.
//!
//! On the caller's socket (stream id 0, `banger_agent_proto::stream`):
//! the caller sends stdin as `D` frames (an empty one ends it) and
//! [`Control`] JSON frames (signal, resize); bangerd sends `D` frames of
//! stdout and stderr, then one `X` frame with the exit status, or a
//! [`Broken`] JSON frame when the stream broke. The socket's own
//! backpressure paces both ways: bangerd reads stdin only as fast as the
//! agent takes it and acknowledges output to the agent only once it is
//! written to the socket, so it never holds more than a window per
//! channel.

use std::os::fd::OwnedFd;
use std::time::Duration;

use banger_agent_proto::client::{ClientError, ExecInput, ExecOutput, StreamEvent};
use banger_agent_proto::codec::{Frame, FrameCodec};
use banger_agent_proto::stream::{Broken, Channel, Control, StreamFrame, is_json};
use banger_agent_proto::{ExecSpec, TtySize};
use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use std::sync::Arc;

use super::{StreamSlot, Vms, vmm_named};
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::{Vm, VmState};

/// The most arguments and environment entries a command may have.
const MAX_ARGS: usize = 4096;
/// The most bytes of arguments and environment together.
const MAX_ARG_BYTES: usize = 256 * 1024;
/// How long the agent gets to start the command.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a signal or resize may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Where to run it (absolute).
    pub workdir: Option<String>,
    /// The guest user.
    pub user: Option<String>,
    /// A terminal of this many rows and columns, and its `TERM`.
    pub tty: Option<(u16, u16, Option<String>)>,
}

impl ExecRequest {
    /// Check what a caller may ask for.
    pub fn validate(&self) -> Result<()> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(Error::invalid("no command to run; give one after --"));
        }
        if self.argv.len() + self.env.len() > MAX_ARGS {
            return Err(Error::invalid(format!(
                "too many arguments and environment entries (at most {MAX_ARGS})"
            )));
        }
        let bytes: usize = self.argv.iter().chain(&self.env).map(String::len).sum();
        if bytes > MAX_ARG_BYTES {
            return Err(Error::invalid(format!(
                "arguments and environment are over {} KiB",
                MAX_ARG_BYTES / 1024
            )));
        }
        for kv in &self.env {
            let ok = kv.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !k.as_bytes()[0].is_ascii_digit()
            });
            if !ok {
                return Err(Error::invalid(format!(
                    "bad environment entry {kv:?}: want NAME=value with NAME of letters, digits and _"
                )));
            }
        }
        if let Some(dir) = &self.workdir
            && !dir.starts_with('/')
        {
            return Err(Error::invalid(format!(
                "the working directory {dir:?} must be an absolute path in the guest"
            )));
        }
        if let Some(user) = &self.user
            && (user.is_empty() || user.len() > 64 || user.contains(['/', ':', '\n']))
        {
            return Err(Error::invalid(format!("bad user name {user:?}")));
        }
        if let Some((rows, cols, term)) = &self.tty {
            if *rows == 0 || *cols == 0 {
                return Err(Error::invalid(
                    "a terminal needs at least one row and column",
                ));
            }
            if let Some(term) = term
                && (term.len() > 64 || !term.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(Error::invalid(format!("bad terminal type {term:?}")));
            }
        }
        Ok(())
    }

    fn spec(self) -> ExecSpec {
        ExecSpec {
            argv: self.argv,
            env: self.env,
            workdir: self.workdir,
            user: self.user,
            tty: self
                .tty
                .map(|(rows, cols, term)| TtySize { rows, cols, term }),
        }
    }
}

impl Vms {
    /// Run `request` in running VM `id` (its owner with `vm.manage`, or
    /// with `vm.manage-others`); returns the caller's end of the stream.
    pub async fn exec_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        request: ExecRequest,
    ) -> Result<OwnedFd> {
        request.validate()?;
        let vm = self.running_vm_for(caller, id).await?;
        let slot = self.stream_slot(&vm)?;
        let mut session = self.agent_session(&vm).await?;
        let stream = session
            .exec(request.spec(), START_TIMEOUT)
            .await
            .map_err(|e| stream_error(&vm.name, "run commands", e))?;
        tracing::info!(vm = %vm.name, uid = caller.uid, pid = stream.pid, "exec started");
        hand_over(stream, slot)
    }

    /// Connect to TCP `port` on running VM `id`'s loopback, authorized as
    /// [`Vms::exec_vm`]; `exposed` (the caller serves it beyond this
    /// host's loopback) also needs `network.configure`. Returns the
    /// caller's end of the stream.
    pub async fn connect_port_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        port: u16,
        exposed: bool,
    ) -> Result<OwnedFd> {
        if port == 0 {
            return Err(Error::invalid("port 0 is not a port to connect to"));
        }
        let vm = self.running_vm_for(caller, id).await?;
        if exposed {
            self.authorizer
                .authorize(caller, Action::NetworkConfigure)
                .await?;
        }
        let slot = self.stream_slot(&vm)?;
        let mut session = self.agent_session(&vm).await?;
        let stream = session
            .connect_port(port, START_TIMEOUT)
            .await
            .map_err(|e| stream_error(&vm.name, "forward ports", e))?;
        hand_over(stream, slot)
    }

    /// VM `id`, which the caller may manage and which runs.
    async fn running_vm_for(&self, caller: &Caller, id: &str) -> Result<Vm> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        if vm.state != VmState::Running {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "vm {} is {}; start it first: banger vm start {}",
                    vm.name,
                    vm.state.as_str(),
                    vm.name
                ),
            ));
        }
        Ok(vm)
    }

    pub(super) async fn agent_session(
        &self,
        vm: &Vm,
    ) -> Result<Box<dyn crate::vm::agent::AgentSession>> {
        let vmm = vmm_named(&self.config(), vm.vmm)?;
        let endpoint = vmm.agent(&self.vm_paths(&vm.id));
        self.agent
            .connect(&endpoint, Duration::from_secs(5))
            .await
            .map_err(|e| {
                Error::unavailable(format!("cannot reach the agent of vm {}: {e}", vm.name))
            })
    }
}

/// Relay `stream` from a socket pair's end (holding `slot` until it
/// ends); returns the caller's end.
fn hand_over(stream: banger_agent_proto::client::ExecStream, slot: StreamSlot) -> Result<OwnedFd> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::failed(format!("cannot make a socket pair: {e}")))?;
    let theirs = theirs
        .into_std()
        .and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        })
        .map_err(|e| Error::failed(format!("cannot make a socket pair: {e}")))?;
    tokio::spawn(async move {
        relay(ours, stream.input, stream.output).await;
        drop(slot);
    });
    Ok(OwnedFd::from(theirs))
}

/// The error for an agent that does not know a request: it is older
/// than this bangerd; `what` says what it cannot do.
pub(super) fn agent_too_old(vm: &str, what: &str) -> Error {
    Error::unavailable(format!(
        "the agent in vm {vm} is too old to {what}; update banger-agent in its image (or rebuild the image)"
    ))
}

/// The caller-facing error for a stream the agent did not open; `what`
/// says what an old agent cannot do.
fn stream_error(vm: &str, what: &str, e: ClientError) -> Error {
    use banger_agent_proto::ErrorKind as A;
    match e {
        ClientError::Agent { source, .. } => match source.kind {
            A::UnknownRequest => agent_too_old(vm, what),
            A::NotFound => Error::not_found(format!("vm {vm}: {}", source.message)),
            A::InvalidArgument => Error::invalid(format!("vm {vm}: {}", source.message)),
            _ => Error::failed(format!("vm {vm}: {}", source.message)),
        },
        other => Error::unavailable(format!(
            "the agent of vm {vm} did not start the command: {other}"
        )),
    }
}

/// Relay between the caller's socket and the agent's stream until the
/// command ended and its end reached the caller, or the caller left (then
/// the command is killed).
async fn relay(socket: UnixStream, input: ExecInput, output: ExecOutput) {
    let (read, write) = socket.into_split();
    let to_agent = tokio::spawn(caller_to_agent(read, input.clone()));
    let delivered = agent_to_caller(output, write).await;
    if !delivered {
        // The caller is gone before the end: so is its command.
        let _ = input.signal(nix::libc::SIGKILL, CONTROL_TIMEOUT).await;
    }
    to_agent.abort();
}

/// Stdin and controls from the caller to the agent. Returns when the
/// caller closed its socket (or broke the framing).
async fn caller_to_agent(read: tokio::net::unix::OwnedReadHalf, input: ExecInput) {
    let mut frames = FramedRead::new(read, FrameCodec::new());
    let mut stdin_open = true;
    while let Some(Ok(frame)) = frames.next().await {
        let Frame::Data(payload) = frame else {
            return;
        };
        if is_json(&payload) {
            let Ok(control) = serde_json::from_slice::<Control>(&payload) else {
                return;
            };
            let _ = match control {
                Control::Signal { signal } => input.signal(signal, CONTROL_TIMEOUT).await,
                Control::Resize { rows, cols } => input.resize(rows, cols, CONTROL_TIMEOUT).await,
            };
            continue;
        }
        match StreamFrame::decode(&payload) {
            Ok(StreamFrame::Data {
                channel: Channel::Stdin,
                bytes,
                ..
            }) if stdin_open => {
                let sent = if bytes.is_empty() {
                    stdin_open = false;
                    input.close().await
                } else {
                    input.write(&bytes).await
                };
                if sent.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Output and the end from the agent to the caller. Returns whether the
/// caller got the end.
async fn agent_to_caller(mut output: ExecOutput, write: tokio::net::unix::OwnedWriteHalf) -> bool {
    let mut sink = FramedWrite::new(write, FrameCodec::new());
    while let Some(event) = output.next().await {
        match event {
            StreamEvent::Output(channel, bytes) => {
                let n = bytes.len();
                let frame = StreamFrame::Data {
                    id: 0,
                    channel,
                    bytes,
                };
                if sink.send(frame.encode()).await.is_err() {
                    return false;
                }
                if output.consumed(channel, n).await.is_err() {
                    let _ = send_broken(&mut sink, "the agent connection failed").await;
                    return true;
                }
            }
            StreamEvent::Exit(status) => {
                let frame = StreamFrame::Exit { id: 0, status };
                return sink.send(frame.encode()).await.is_ok();
            }
            StreamEvent::Broken(why) => {
                return send_broken(&mut sink, &why).await;
            }
        }
    }
    send_broken(&mut sink, "the agent connection ended").await
}

async fn send_broken(
    sink: &mut FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>,
    why: &str,
) -> bool {
    let body = serde_json::to_vec(&Broken {
        error: why.to_owned(),
    })
    .unwrap_or_default();
    sink.send(body).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecRequest::default()
        }
    }

    #[test]
    fn an_agent_without_streams_is_called_too_old() {
        use banger_agent_proto::{AgentError, ErrorKind as A};
        // What an agent that predates Exec answers (parse_request).
        let old = ClientError::Agent {
            op: "exec",
            source: AgentError::new(A::UnknownRequest, "unknown request \"exec\""),
        };
        let e = stream_error("dev", "run commands", old);
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(
            e.message.contains("too old to run commands"),
            "{}",
            e.message
        );
        let missing = ClientError::Agent {
            op: "exec",
            source: AgentError::new(A::NotFound, "cannot run nope: No such file"),
        };
        assert_eq!(
            stream_error("dev", "run commands", missing).kind,
            ErrorKind::NotFound
        );
    }

    #[test]
    fn requests_are_checked() {
        assert!(req(&["ls"]).validate().is_ok());
        for bad in [
            req(&[]),
            req(&[""]),
            ExecRequest {
                env: vec!["1A=x".into()],
                ..req(&["ls"])
            },
            ExecRequest {
                env: vec!["NOVALUE".into()],
                ..req(&["ls"])
            },
            ExecRequest {
                workdir: Some("relative".into()),
                ..req(&["ls"])
            },
            ExecRequest {
                user: Some("a/b".into()),
                ..req(&["ls"])
            },
            ExecRequest {
                tty: Some((0, 80, None)),
                ..req(&["ls"])
            },
            ExecRequest {
                tty: Some((24, 80, Some("x y".into()))),
                ..req(&["ls"])
            },
            ExecRequest {
                argv: vec!["x".repeat(MAX_ARG_BYTES + 1)],
                ..ExecRequest::default()
            },
        ] {
            let e = bad.validate().expect_err("refused");
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad:?}");
        }
    }
}
