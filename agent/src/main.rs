//! `banger-agent`: the guest agent.
//!
//! Run with no arguments inside a guest it serves the protocol of
//! `banger-agent-proto` on AF_VSOCK port 1024 and on the virtio-serial
//! port `org.banger.agent`, whichever the VMM offers. `--unix PATH` serves
//! a unix socket instead (tests, debugging). `banger-agent call` is a small
//! client for the same protocol, for people poking at a guest by hand.

mod clock;
mod exec;
mod handlers;
mod nic;
mod renew;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use banger_agent_proto::client::Client;
use banger_agent_proto::{Request, SERIAL_PORT_NAME, VSOCK_PORT};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

/// How long init gets to take the guest down before the agent forces it.
const FORCE_AFTER: Duration = Duration::from_secs(90);

#[derive(Debug, Parser)]
#[command(name = "banger-agent", version, about = "The banger guest agent")]
struct Cli {
    /// AF_VSOCK port to listen on.
    #[arg(long, default_value_t = VSOCK_PORT)]
    vsock_port: u32,
    /// Do not listen on AF_VSOCK.
    #[arg(long)]
    no_vsock: bool,
    /// Name of the virtio-serial port to serve.
    #[arg(long, default_value = SERIAL_PORT_NAME)]
    serial: String,
    /// Do not serve a virtio-serial port.
    #[arg(long)]
    no_serial: bool,
    /// Serve a unix socket at this path (and neither vsock nor serial).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Handle Shutdown by exiting instead of taking the system down (tests).
    #[arg(long, hide = true)]
    no_power: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one request to an agent and print the reply as JSON.
    Call {
        /// The unix socket to dial (a QEMU virtio-serial chardev or `--unix`).
        #[arg(long, value_name = "PATH")]
        connect: PathBuf,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[command(subcommand)]
        request: CallRequest,
    },
}

#[derive(Debug, Subcommand)]
enum CallRequest {
    /// Uptime, boot id and agent version.
    Health,
    /// Kernel, OS, memory and disk use.
    Info,
    /// Wait until something listens on a guest TCP port.
    WaitPort {
        /// The port.
        port: u16,
    },
    /// Power the guest off (or reboot it).
    Shutdown {
        /// Reboot instead.
        #[arg(long)]
        reboot: bool,
    },
    /// Set the guest clock to this host's.
    SyncTime,
    /// Mount a virtio-fs share (made when missing).
    Mount {
        /// The share's virtio-fs tag.
        tag: String,
        /// Where to mount it: an absolute path in the guest.
        target: String,
        /// Mount it read-only.
        #[arg(long)]
        read_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("banger-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Call {
            connect,
            timeout,
            request,
        }) => rt.block_on(call(connect, timeout, request)),
        None => rt.block_on(run(cli)),
    }
}

async fn call(connect: PathBuf, timeout: f64, request: CallRequest) -> ExitCode {
    let timeout = Duration::from_secs_f64(timeout.clamp(0.1, 3600.0));
    let request = match request {
        CallRequest::Health => Request::Health,
        CallRequest::Info => Request::Info,
        CallRequest::WaitPort { port } => Request::WaitPort {
            port,
            timeout_ms: timeout.as_millis() as u64,
        },
        CallRequest::Shutdown { reboot } => Request::Shutdown { reboot },
        CallRequest::SyncTime => Request::SyncTime {
            unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
        },
        CallRequest::Mount {
            tag,
            target,
            read_only,
        } => Request::Mount {
            tag,
            target,
            read_only,
        },
    };
    let stream = match tokio::net::UnixStream::connect(&connect).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("banger-agent: cannot connect to {}: {e}", connect.display());
            return ExitCode::FAILURE;
        }
    };
    let client = Client::new(stream);
    match client.call(request, timeout + Duration::from_secs(1)).await {
        Ok(reply) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("banger-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
    let agent = Arc::new(serve::Agent {
        proc_root: PathBuf::from("/proc"),
        shutdown: shutdown_tx,
    });
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = cli.unix.clone() {
        let agent = agent.clone();
        tasks.spawn(async move {
            serve::serve_unix(agent, &path)
                .await
                .map_err(|e| format!("unix socket {}: {e}", path.display()))
        });
    } else {
        if !cli.no_vsock {
            let agent = agent.clone();
            let port = cli.vsock_port;
            tasks.spawn(async move {
                serve::serve_vsock(agent, port)
                    .await
                    .map_err(|e| format!("vsock port {port}: {e}"))
            });
        }
        if !cli.no_serial {
            let agent = agent.clone();
            let name = cli.serial.clone();
            tasks.spawn(async move {
                serve::serve_serial(agent, &name)
                    .await
                    .map_err(|e| format!("virtio-serial port {name}: {e}"))
            });
        }
    }
    if tasks.is_empty() {
        eprintln!("banger-agent: nothing to serve: every transport is turned off");
        return ExitCode::from(2);
    }
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("banger-agent: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => return ExitCode::SUCCESS,
            _ = int.recv() => return ExitCode::SUCCESS,
            Some(reboot) = shutdown_rx.recv() => {
                // Let the reply reach the host first.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if cli.no_power {
                    eprintln!("banger-agent: shutdown requested; exiting (--no-power)");
                    return ExitCode::SUCCESS;
                }
                if handlers::request_shutdown(reboot).await {
                    // Init stops us with SIGTERM (handled above) as it goes
                    // down; only if it never does, force it.
                    tokio::spawn(async move {
                        tokio::time::sleep(FORCE_AFTER).await;
                        handlers::force_shutdown(reboot);
                    });
                } else {
                    handlers::force_shutdown(reboot);
                    return ExitCode::FAILURE;
                }
            }
            done = tasks.join_next() => match done {
                // A transport failed (e.g. no vsock in this guest); the
                // others go on. With none left, there is nothing to do.
                Some(Ok(Err(msg))) => {
                    eprintln!("banger-agent: {msg}");
                    if tasks.is_empty() {
                        eprintln!("banger-agent: no transport left to serve");
                        return ExitCode::FAILURE;
                    }
                }
                Some(Ok(Ok(()))) => {}
                Some(Err(e)) => {
                    eprintln!("banger-agent: a transport task died: {e}");
                    if tasks.is_empty() {
                        return ExitCode::FAILURE;
                    }
                }
                None => return ExitCode::FAILURE,
            },
        }
    }
}
