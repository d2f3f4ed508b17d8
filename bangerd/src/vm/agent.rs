//! The guest agent as the VM commands use it: [`GuestAgent`] (wait for
//! it, connect) and [`AgentSession`] (the requests the lifecycle makes).
//! [`HostAgent`] is the real one, over `banger_agent_host`'s transports;
//! the agent transport and guest boot tests run it against a real agent.

use std::time::Duration;

pub use banger_agent_host::{AgentConn, AgentConnectError, AgentEndpoint, AgentWaitError};
use banger_agent_proto::client::{ClientError, ExecStream};
use banger_agent_proto::{ExecSpec, Health, Info};

use crate::auth::BoxFuture;

/// One open connection to a guest's agent.
pub trait AgentSession: Send {
    /// The guest's kernel, hostname and the like.
    fn info(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Info, ClientError>>;
    /// Wait up to `wait` until something listens on TCP `port` in the
    /// guest; returns how long that took.
    fn wait_port(
        &mut self,
        port: u16,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Duration, ClientError>>;
    /// Ask the guest to power off (or reboot).
    fn shutdown(
        &mut self,
        reboot: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ClientError>>;
    /// Mount the virtio-fs share `tag` at `target` in the guest (made
    /// when missing), read-only when asked; already mounted there counts
    /// as done. An agent too old for this answers [`ClientError::Agent`]
    /// with [`banger_agent_proto::ErrorKind::UnknownRequest`].
    fn mount(
        &mut self,
        tag: &str,
        target: &str,
        read_only: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ClientError>>;
    /// Set the guest's wall clock to the host's (after a resume, when
    /// it has stood still for as long as the guest was saved).
    fn sync_time(&mut self, timeout: Duration) -> BoxFuture<'_, Result<(), ClientError>> {
        let _ = timeout;
        Box::pin(async {
            Err(ClientError::Protocol(
                "this agent session cannot set the clock".to_owned(),
            ))
        })
    }
    /// Give a guest restored from another's memory its own identity;
    /// returns the steps with their durations (ms).
    fn renew(
        &mut self,
        identity: banger_agent_proto::Identity,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, ClientError>> {
        let _ = (identity, timeout);
        Box::pin(async {
            Err(ClientError::Protocol(
                "this agent session cannot renew a guest".to_owned(),
            ))
        })
    }
    /// Run a command in the guest; `timeout` bounds the wait for it to
    /// start.
    fn exec(
        &mut self,
        spec: ExecSpec,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecStream, ClientError>> {
        let _ = (spec, timeout);
        Box::pin(async {
            Err(ClientError::Protocol(
                "this agent session cannot run commands".to_owned(),
            ))
        })
    }
    /// Connect to TCP `port` on the guest's loopback.
    fn connect_port(
        &mut self,
        port: u16,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecStream, ClientError>> {
        let _ = (port, timeout);
        Box::pin(async {
            Err(ClientError::Protocol(
                "this agent session cannot connect to ports".to_owned(),
            ))
        })
    }
}

/// An agent that answered `Health`.
pub struct Ready {
    /// The connection it answered on.
    pub session: Box<dyn AgentSession>,
    /// What it said.
    pub health: Health,
    /// How long waiting took.
    pub took: Duration,
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("health", &self.health)
            .field("took", &self.took)
            .finish_non_exhaustive()
    }
}

/// Reaching the agent of a guest.
pub trait GuestAgent: Send + Sync + std::fmt::Debug {
    /// Keep connecting (every `poll`) until the agent at `endpoint`
    /// answers `Health` or `overall` runs out.
    fn wait_ready<'a>(
        &'a self,
        endpoint: &'a AgentEndpoint,
        overall: Duration,
        poll: Duration,
    ) -> BoxFuture<'a, Result<Ready, AgentWaitError>>;
    /// One connection within `timeout`.
    fn connect<'a>(
        &'a self,
        endpoint: &'a AgentEndpoint,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn AgentSession>, AgentConnectError>>;
}

impl AgentSession for AgentConn {
    fn info(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Info, ClientError>> {
        Box::pin(AgentConn::info(self, timeout))
    }

    fn wait_port(
        &mut self,
        port: u16,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Duration, ClientError>> {
        Box::pin(AgentConn::wait_port(self, port, wait))
    }

    fn shutdown(
        &mut self,
        reboot: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(AgentConn::shutdown(self, reboot, timeout))
    }

    fn mount(
        &mut self,
        tag: &str,
        target: &str,
        read_only: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let (tag, target) = (tag.to_owned(), target.to_owned());
        Box::pin(async move { AgentConn::mount(self, &tag, &target, read_only, timeout).await })
    }

    fn exec(
        &mut self,
        spec: ExecSpec,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecStream, ClientError>> {
        Box::pin(AgentConn::exec(self, spec, timeout))
    }

    fn sync_time(&mut self, timeout: Duration) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move { AgentConn::sync_time(self, timeout).await.map(|_| ()) })
    }

    fn renew(
        &mut self,
        identity: banger_agent_proto::Identity,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, ClientError>> {
        Box::pin(AgentConn::renew(self, identity, timeout))
    }

    fn connect_port(
        &mut self,
        port: u16,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecStream, ClientError>> {
        Box::pin(AgentConn::connect_port(self, port, timeout))
    }
}

/// The real agent: `banger_agent_host` over the endpoint's transport,
/// one shared connection per virtio-serial port.
#[derive(Debug, Clone, Default)]
pub struct HostAgent {
    connections: banger_agent_host::Connections,
}

impl GuestAgent for HostAgent {
    fn wait_ready<'a>(
        &'a self,
        endpoint: &'a AgentEndpoint,
        overall: Duration,
        poll: Duration,
    ) -> BoxFuture<'a, Result<Ready, AgentWaitError>> {
        Box::pin(async move {
            let (conn, health, took) = self
                .connections
                .wait_until_ready(endpoint, overall, poll)
                .await?;
            Ok(Ready {
                session: Box::new(conn),
                health,
                took,
            })
        })
    }

    fn connect<'a>(
        &'a self,
        endpoint: &'a AgentEndpoint,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn AgentSession>, AgentConnectError>> {
        Box::pin(async move {
            let conn = self.connections.connect(endpoint, timeout).await?;
            Ok(Box::new(conn) as Box<dyn AgentSession>)
        })
    }
}
