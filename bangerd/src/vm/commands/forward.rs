//! `vm forward --background`: host ports bangerd listens on and carries
//! to ports on a VM's loopback through its agent, for the VM's lifetime.
//! Each forward is recorded with the VM, so a restarted bangerd listens
//! again; it ends when removed or when the VM is deleted. A connection
//! that arrives while the VM is not running is closed at once.
//!
//! bangerd listens as root, so it refuses for a caller what that caller
//! could not do alone: a port below 1024, or an address other than
//! loopback (reachable from elsewhere), also needs
//! `org.banger.network.configure`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use banger_agent_proto::client::{ExecInput, ExecOutput, StreamEvent};
use banger_agent_proto::stream::CHUNK;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Vms;
use super::exec::START_TIMEOUT;
use crate::auth::{Action, Caller};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::{PortForward, VmState};

/// The most forwards one VM keeps.
pub const MAX_FORWARDS: usize = 16;

/// How long a signal to the agent may take.
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Listen on `address:port` for a forward.
fn listen(address: IpAddr, port: u16) -> Result<TcpListener> {
    let at = SocketAddr::new(address, port);
    let listener = std::net::TcpListener::bind(at).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::new(
            ErrorKind::Busy,
            format!("port {port} of {address} is in use; pick another (0 picks a free one)"),
        ),
        std::io::ErrorKind::AddrNotAvailable => Error::invalid(format!(
            "{address} is not an address of this host; give one it has (or leave it out for 127.0.0.1)"
        )),
        _ => Error::failed(format!("cannot listen on {at}: {e}")),
    })?;
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| Error::failed(format!("cannot listen on {at}: {e}")))
}

impl Vms {
    /// Forward `address:host_port` (0 picks a free port) to `guest_port`
    /// on VM `id`'s loopback until removed or the VM is deleted. Returns
    /// the forward as bound.
    pub async fn add_forward(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        address: IpAddr,
        host_port: u16,
        guest_port: u16,
    ) -> Result<PortForward> {
        if guest_port == 0 {
            return Err(Error::invalid("the guest port cannot be 0"));
        }
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        if !address.is_loopback() || (host_port != 0 && host_port < 1024) {
            self.authorizer
                .authorize(caller, Action::NetworkConfigure)
                .await?;
        }
        if address.is_multicast() {
            return Err(Error::invalid(format!("{address} is a multicast address")));
        }
        // One change to forwards at a time; the row read again under it.
        let _changing = self.runtime.forward_changes.lock().await;
        let vm = self.vm_by_id(id).await?;
        if vm.forwards.len() >= MAX_FORWARDS {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "vm {} has {MAX_FORWARDS} forwards, the most it keeps; remove one first",
                    vm.name
                ),
            ));
        }
        let listener = listen(address, host_port)?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::failed(format!("cannot read the port bound: {e}")))?;
        let forward = PortForward {
            address,
            host_port: bound.port(),
            guest_port,
        };
        self.modify(&vm.id, move |v| v.forwards.push(forward))
            .await?;
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, uid = caller.uid, "forwarding {bound} to guest port {guest_port}");
        self.serve_forward(&vm.id, forward, listener);
        Ok(forward)
    }

    /// Stop forwarding `address:host_port` of VM `id`.
    pub async fn remove_forward(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        address: IpAddr,
        host_port: u16,
    ) -> Result<()> {
        let vm = self.vm_by_id(id).await?;
        self.authorize_vm(caller, &vm).await?;
        let _changing = self.runtime.forward_changes.lock().await;
        let vm = self.vm_by_id(id).await?;
        let matches = move |f: &PortForward| f.address == address && f.host_port == host_port;
        if !vm.forwards.iter().any(matches) {
            return Err(Error::not_found(format!(
                "vm {} has no forward of {}; see banger vm show {}",
                vm.name,
                SocketAddr::new(address, host_port),
                vm.name
            )));
        }
        self.modify(&vm.id, move |v| v.forwards.retain(|f| !matches(f)))
            .await?;
        let mut all = self.forward_tasks();
        if let Some(list) = all.get_mut(&vm.id) {
            list.retain(|(f, task)| {
                let keep = !matches(f);
                if !keep {
                    task.abort();
                }
                keep
            });
        }
        tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "no longer forwarding {}", SocketAddr::new(address, host_port));
        Ok(())
    }

    /// Listen again for every forward recorded for `vms` (at start). One that
    /// cannot (its port taken meanwhile) is logged and stays recorded.
    pub(super) fn resume_forwards(self: &Arc<Self>, vms: &[crate::vm::Vm]) {
        for vm in vms {
            for forward in &vm.forwards {
                match listen(forward.address, forward.host_port) {
                    Ok(listener) => self.serve_forward(&vm.id, *forward, listener),
                    Err(e) => {
                        tracing::warn!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, "cannot forward {}:{} again: {e}", forward.address, forward.host_port);
                    }
                }
            }
        }
    }

    /// Stop every forward of VM `id` (it is being deleted).
    pub(super) fn stop_forwards(&self, id: &str) {
        if let Some(list) = self.forward_tasks().remove(id) {
            for (_, task) in list {
                task.abort();
            }
        }
    }

    fn forward_tasks(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<super::ForwardTask>>> {
        self.runtime
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn serve_forward(self: &Arc<Self>, id: &str, forward: PortForward, listener: TcpListener) {
        let core = self.clone();
        let vm = id.to_owned();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => {
                            let core = core.clone();
                            let vm = vm.clone();
                            connections.spawn(async move { core.carry(&vm, forward.guest_port, tcp).await });
                        }
                        Err(e) => {
                            tracing::warn!(banger_vm_id = %vm, "cannot accept a forwarded connection: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        self.forward_tasks()
            .entry(id.to_owned())
            .or_default()
            .push((forward, task.abort_handle()));
    }

    /// Carry one connection to `guest_port` of VM `id`, if it runs and
    /// has room for one more stream.
    async fn carry(self: &Arc<Self>, id: &str, guest_port: u16, tcp: TcpStream) {
        let Ok(vm) = self.vm_by_id(id).await else {
            return;
        };
        if vm.state != VmState::Running {
            return;
        }
        let _slot = match self.stream_slot(&vm) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(banger_vm_id = %vm.id, "forwarded connection refused: {e}");
                return;
            }
        };
        let stream = match self.agent_session(&vm).await {
            Ok(mut session) => session.connect_port(guest_port, START_TIMEOUT).await,
            Err(e) => {
                tracing::debug!(banger_vm_id = %vm.id, "forwarded connection: {e}");
                return;
            }
        };
        match stream {
            Ok(stream) => {
                let _ = tcp.set_nodelay(true);
                relay_tcp(tcp, stream.input, stream.output).await;
            }
            Err(e) => {
                tracing::debug!(banger_vm_id = %vm.id, "forwarded connection to guest port {guest_port}: {e}");
            }
        }
    }
}

/// Relay between a TCP connection and an agent connection stream until
/// the guest side ends or the TCP side goes away (then the stream is
/// ended in the guest too).
async fn relay_tcp(tcp: TcpStream, input: ExecInput, mut output: ExecOutput) {
    let (mut read, mut write) = tcp.into_split();
    let up_input = input.clone();
    let mut up = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = up_input.close().await;
                    return;
                }
                Ok(n) => {
                    if up_input.write(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut ended = false;
    while let Some(event) = output.next().await {
        match event {
            StreamEvent::Output(channel, bytes) => {
                if write.write_all(&bytes).await.is_err() {
                    break;
                }
                if output.consumed(channel, bytes.len()).await.is_err() {
                    break;
                }
            }
            StreamEvent::Exit(_) | StreamEvent::Broken(_) => {
                ended = true;
                break;
            }
        }
    }
    let _ = write.shutdown().await;
    if !ended {
        let _ = input.signal(nix::libc::SIGKILL, CONTROL_TIMEOUT).await;
    }
    up.abort();
    let _ = (&mut up).await;
}
