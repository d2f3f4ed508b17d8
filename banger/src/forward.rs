//! `banger vm forward`: listen on this host and carry each connection to a
//! port on the guest's loopback through `VM.ConnectPort`, until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use banger_agent_proto::stream::{CHUNK, Channel, StreamFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::Options;
use crate::client::{Client, Interaction};
use crate::exit::{Failure, Kind};
use crate::output::emit;
use crate::session::Authorization;

/// One `[ADDR:]HOST_PORT:GUEST_PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Where to listen on this host.
    pub listen: SocketAddr,
    /// The guest port.
    pub guest_port: u16,
}

impl Spec {
    /// Read `[ADDR:]HOST_PORT:GUEST_PORT` (an IPv6 address in brackets);
    /// the address is 127.0.0.1 unless given, a host port of 0 picks a
    /// free one.
    pub fn parse(text: &str) -> Result<Spec, Failure> {
        let bad = |why: &str| {
            Failure::new(
                Kind::InvalidArgument,
                format!("{text:?}: {why}; want [ADDR:]HOST_PORT:GUEST_PORT, e.g. 8080:80"),
            )
        };
        let (rest, guest) = text.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
        let guest_port: u16 = guest
            .parse()
            .map_err(|_| bad("the guest port is not a port"))?;
        if guest_port == 0 {
            return Err(bad("the guest port cannot be 0"));
        }
        let (addr, host) = match rest.rsplit_once(':') {
            Some((addr, host)) => {
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| bad("the address is not an IP address"))?;
                (ip, host)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let host_port: u16 = host
            .parse()
            .map_err(|_| bad("the host port is not a port"))?;
        Ok(Spec {
            listen: SocketAddr::new(addr, host_port),
            guest_port,
        })
    }

    /// Whether others than this host can reach it.
    pub fn exposed(&self) -> bool {
        !self.listen.ip().is_loopback()
    }
}

/// Read `[ADDR:]HOST_PORT` (what `--remove` takes): the address is
/// 127.0.0.1 unless given.
pub fn parse_listen(text: &str) -> Result<SocketAddr, Failure> {
    // The same grammar as a spec, with a guest port to satisfy it.
    Spec::parse(&format!("{text}:1"))
        .map(|s| s.listen)
        .map_err(|_| {
            Failure::new(
                Kind::InvalidArgument,
                format!("{text:?}: want [ADDR:]HOST_PORT, e.g. 8080"),
            )
        })
}

/// `ADDR:PORT` as a person writes it (brackets around IPv6).
pub fn host_port_text(address: &str, port: u16) -> String {
    match address.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{address}:{port}"),
    }
}

/// `--background`: have bangerd keep `specs` for `vm`'s lifetime.
pub async fn background(
    opts: Options,
    client: &Client,
    vm: &crate::client::VmInfo,
    specs: Vec<Spec>,
) -> anyhow::Result<u8> {
    let mut bound = Vec::new();
    for spec in &specs {
        let auth = Authorization::prepare(opts).await;
        let address = spec.listen.ip().to_string();
        let result = client
            .vm_add_forward(
                &vm.path,
                &address,
                spec.listen.port(),
                spec.guest_port,
                auth.interaction,
            )
            .await;
        let port = auth.finish(result).await.map_err(|f| {
            anyhow::Error::from(f).context(format!(
                "cannot forward {} to port {} of {}",
                spec.listen, spec.guest_port, vm.name
            ))
        })?;
        let at = SocketAddr::new(spec.listen.ip(), port);
        bound.push(serde_json::json!({
            "address": address, "host_port": port, "guest_port": spec.guest_port,
        }));
        if !opts.json {
            emit(&format!(
                "bangerd forwards {at} to port {} of {} (until `banger vm forward {} --remove {at}`)",
                spec.guest_port, vm.name, vm.name
            ))?;
        }
    }
    if opts.json {
        crate::output::emit_json(&bound)?;
    }
    Ok(crate::exit::OK)
}

/// `--remove`: stop the background forwards listening on `listens`.
pub async fn remove(
    opts: Options,
    client: &Client,
    vm: &crate::client::VmInfo,
    listens: Vec<SocketAddr>,
) -> anyhow::Result<u8> {
    for at in listens {
        let auth = Authorization::prepare(opts).await;
        let result = client
            .vm_remove_forward(&vm.path, &at.ip().to_string(), at.port(), auth.interaction)
            .await;
        auth.finish(result).await.map_err(|f| {
            anyhow::Error::from(f).context(format!("cannot remove the forward of {at}"))
        })?;
        if !opts.json {
            emit(&format!("removed the forward of {at} to {}", vm.name))?;
        }
    }
    Ok(crate::exit::OK)
}

/// Forward `specs` to the VM at `vm_path` (called `name`) until Ctrl-C.
pub async fn run(
    opts: Options,
    client: &Client,
    vm_path: &str,
    name: &str,
    specs: Vec<Spec>,
) -> anyhow::Result<u8> {
    let mut listeners = Vec::new();
    for spec in &specs {
        let listener = TcpListener::bind(spec.listen).await.map_err(|e| {
            Failure::new(
                Kind::Unavailable,
                format!("cannot listen on {}: {e}", spec.listen),
            )
        })?;
        let local = listener.local_addr().unwrap_or(spec.listen);
        listeners.push((listener, *spec));
        emit(&format!(
            "forwarding {local} to port {} of {name}",
            spec.guest_port
        ))?;
    }
    let auth = Authorization::prepare(opts).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, spec) in listeners {
        let client = client.clone();
        let vm_path = vm_path.to_owned();
        let interaction = auth.interaction;
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("banger: cannot accept on {}: {e}", spec.listen);
                        continue;
                    }
                };
                let client = client.clone();
                let vm_path = vm_path.clone();
                tokio::spawn(async move {
                    if let Err(f) = carry(&client, &vm_path, spec, interaction, tcp).await {
                        eprintln!("banger: {peer} to guest port {}: {f}", spec.guest_port);
                    }
                });
            }
        });
    }
    let _ = tokio::signal::ctrl_c().await;
    tasks.abort_all();
    let _ = auth.finish(Ok::<_, Failure>(())).await;
    Ok(crate::exit::OK)
}

/// Carry one TCP connection over a `ConnectPort` stream.
async fn carry(
    client: &Client,
    vm_path: &str,
    spec: Spec,
    interaction: Interaction,
    tcp: TcpStream,
) -> Result<(), Failure> {
    let fd = client
        .vm_connect_port(vm_path, spec.guest_port, spec.exposed(), interaction)
        .await?;
    let _ = tcp.set_nodelay(true);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let feed = |tx: tokio::sync::mpsc::Sender<Vec<u8>>, tasks: &mut tokio::task::JoinSet<()>| {
        tasks.spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = tcp_read.read(&mut buf).await.unwrap_or(0);
                let frame = StreamFrame::Data {
                    id: 0,
                    channel: Channel::Stdin,
                    bytes: bytes::Bytes::copy_from_slice(&buf[..n]),
                };
                if tx.send(frame.encode()).await.is_err() || n == 0 {
                    return;
                }
            }
        });
    };
    // A writer of its own, so the stream's future stays Send: the guest
    // side's end (an empty frame) closes ours for writing; a client that
    // went away ends the stream like a reader that left.
    let (to_tcp, mut from_stream) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Some(bytes) = from_stream.recv().await {
            let written = if bytes.is_empty() {
                tcp_write.shutdown().await
            } else {
                tcp_write.write_all(&bytes).await
            };
            if written.is_err() {
                break;
            }
        }
        drop(done_tx);
    });
    let output = move |_: Channel, bytes: bytes::Bytes| {
        let to_tcp = to_tcp.clone();
        async move {
            to_tcp
                .send(bytes)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    };
    let result = crate::exec::stream_frames(fd, feed, output)
        .await
        .map(|_| ());
    let _ = done_rx.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = |t: &str| Spec::parse(t).ok();
        assert_eq!(
            s("8080:80"),
            Some(Spec {
                listen: "127.0.0.1:8080".parse().expect("addr"),
                guest_port: 80
            })
        );
        assert_eq!(
            s("0.0.0.0:9000:3000").map(|x| (x.listen.port(), x.exposed())),
            Some((9000, true))
        );
        assert_eq!(
            s("[::1]:5432:5432").map(|x| (x.listen.ip().is_loopback(), x.exposed())),
            Some((true, false))
        );
        assert_eq!(s("0:22").map(|x| x.listen.port()), Some(0));
        for bad in ["80", "8080:0", "x:80", "8080:70000", "host:1:2"] {
            assert_eq!(s(bad), None, "{bad}");
        }
    }
}
