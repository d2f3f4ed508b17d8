//! `Exec`: run a command for the host and carry its bytes as a stream
//! (`banger_agent_proto::stream`), with or without a terminal.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use banger_agent_proto::client::Credit;
use banger_agent_proto::stream::{CHUNK, Channel, ExitStatus, Inflow, StreamFrame, WINDOW};
use banger_agent_proto::{AgentError, ErrorKind, ExecSpec, Response, encode_response};
use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The `PATH` a command gets unless the host sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::libc::winsize);

/// The streams of one host connection, by id.
#[derive(Debug, Default)]
pub struct Streams {
    map: Mutex<HashMap<u64, Arc<Running>>>,
}

/// One command the host runs.
#[derive(Debug)]
struct Running {
    stdin: mpsc::UnboundedSender<Bytes>,
    stdin_inflow: Inflow,
    /// Credit for stdout and stderr.
    credit: [Credit; 2],
    /// Its process group once started; 0 before.
    pgid: AtomicI32,
    /// Its terminal's controlling side, when it has one.
    pty: Mutex<Option<Arc<OwnedFd>>>,
    /// The task serving it, stopped when the host goes away.
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// What a stream carries.
#[derive(Debug)]
pub enum Opened {
    /// A command ([`banger_agent_proto::Request::Exec`]).
    Exec(ExecSpec),
    /// A TCP connection to a guest loopback port
    /// ([`banger_agent_proto::Request::Connect`]).
    Connect(u16),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError::new(kind, message)
}

impl Streams {
    fn get(&self, id: u64) -> Option<Arc<Running>> {
        lock(&self.map).get(&id).cloned()
    }

    /// A stream frame from the host.
    pub fn route(&self, frame: StreamFrame) {
        let Some(running) = self.get(frame.id()) else {
            return;
        };
        match frame {
            StreamFrame::Data {
                channel: Channel::Stdin,
                bytes,
                ..
            } => {
                if !running.stdin_inflow.receive(bytes.len()) {
                    eprintln!("banger-agent: the host sent stdin past the window; dropped");
                    return;
                }
                let _ = running.stdin.send(bytes);
            }
            StreamFrame::Credit { channel, n, .. } => match channel {
                Channel::Stdout => running.credit[0].add(n),
                Channel::Stderr => running.credit[1].add(n),
                Channel::Stdin => {}
            },
            _ => {}
        }
    }

    /// `Signal`.
    pub fn signal(&self, id: u64, signal: i32) -> Result<Response, AgentError> {
        let sig = Signal::try_from(signal)
            .map_err(|_| err(ErrorKind::InvalidArgument, format!("no signal {signal}")))?;
        let running = self
            .get(id)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no stream {id}")))?;
        let pgid = running.pgid.load(Ordering::Acquire);
        if pgid > 0 {
            killpg(Pid::from_raw(pgid), sig)
                .map_err(|e| err(ErrorKind::Failed, format!("cannot signal: {e}")))?;
        } else if matches!(sig, Signal::SIGKILL | Signal::SIGTERM | Signal::SIGHUP) {
            // No process (a connection, or a command not started yet):
            // a signal that ends things ends the stream, which closes its
            // connection in the guest.
            lock(&self.map).remove(&id);
            running.credit[0].close();
            running.credit[1].close();
            if let Some(task) = lock(&running.task).take() {
                task.abort();
            }
        }
        Ok(Response::Signalled)
    }

    /// `Resize`.
    pub fn resize(&self, id: u64, rows: u16, cols: u16) -> Result<Response, AgentError> {
        let running = self
            .get(id)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no stream {id}")))?;
        let pty = lock(&running.pty).clone().ok_or_else(|| {
            err(
                ErrorKind::InvalidArgument,
                format!("stream {id} has no terminal"),
            )
        })?;
        resize(&pty, rows, cols).map_err(|e| err(ErrorKind::Failed, format!("resize: {e}")))?;
        Ok(Response::Resized)
    }

    /// Kill every command of this connection (the host went away).
    pub fn kill_all(&self) {
        for (_, running) in lock(&self.map).drain() {
            let pgid = running.pgid.load(Ordering::Acquire);
            if pgid > 0 {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            running.credit[0].close();
            running.credit[1].close();
            if let Some(task) = lock(&running.task).take() {
                task.abort();
            }
        }
    }

    /// Start `what` as stream `id`: the stream exists (its stdin is
    /// taken) from now, before the command or connection is made.
    pub fn open(self: &Arc<Self>, id: u64, what: Opened, out: mpsc::Sender<Vec<u8>>) {
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let running = Arc::new(Running {
            stdin: stdin_tx,
            stdin_inflow: Inflow::default(),
            credit: [Credit::default(), Credit::default()],
            pgid: AtomicI32::new(0),
            pty: Mutex::new(None),
            task: Mutex::new(None),
        });
        running.credit[0].add(WINDOW);
        running.credit[1].add(WINDOW);
        lock(&self.map).insert(id, running.clone());
        let streams = self.clone();
        let held = running.clone();
        let task = tokio::spawn(async move {
            let result = match what {
                Opened::Exec(spec) => run(id, spec, running, stdin_rx, &out).await,
                Opened::Connect(port) => connect(id, port, running, stdin_rx, &out).await,
            };
            lock(&streams.map).remove(&id);
            if let Err(e) = result {
                let _ = out.send(encode_response(id, Err(e))).await;
            }
        });
        *lock(&held.task) = Some(task.abort_handle());
    }
}

fn resize(pty: &OwnedFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives
    // for the call; the descriptor is a terminal we own.
    unsafe { set_winsize(pty.as_raw_fd(), &ws) }.map(|_| ())
}

/// Who runs the command.
struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    name: String,
    home: String,
    shell: String,
}

fn identity(user: Option<&str>) -> Result<Identity, AgentError> {
    let user_text = user.unwrap_or("root");
    let found = match user_text.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user_text),
    }
    .map_err(|e| {
        err(
            ErrorKind::Failed,
            format!("cannot look up user {user_text}: {e}"),
        )
    })?;
    let Some(u) = found else {
        if user.is_none() {
            // A guest without a passwd entry for root still runs as root.
            return Ok(Identity {
                uid: Uid::from_raw(0),
                gid: Gid::from_raw(0),
                groups: Vec::new(),
                name: "root".into(),
                home: "/root".into(),
                shell: "/bin/sh".into(),
            });
        }
        return Err(err(
            ErrorKind::NotFound,
            format!("there is no user {user_text} in the guest"),
        ));
    };
    let cname = CString::new(u.name.clone())
        .map_err(|_| err(ErrorKind::InvalidArgument, "user name has a NUL byte"))?;
    let groups = nix::unistd::getgrouplist(&cname, u.gid).unwrap_or_else(|_| vec![u.gid]);
    Ok(Identity {
        uid: u.uid,
        gid: u.gid,
        groups,
        name: u.name,
        home: u.dir.to_string_lossy().into_owned(),
        shell: u.shell.to_string_lossy().into_owned(),
    })
}

/// The command as `std` will spawn it, and its terminal when it has one.
fn command(spec: &ExecSpec) -> Result<(std::process::Command, Option<OwnedFd>), AgentError> {
    let Some(program) = spec.argv.first() else {
        return Err(err(ErrorKind::InvalidArgument, "no command to run"));
    };
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "an argument has a NUL byte",
        ));
    }
    let who = identity(spec.user.as_deref())?;
    let workdir = spec.workdir.clone().unwrap_or_else(|| who.home.clone());
    let workdir = if spec.workdir.is_none() && !Path::new(&workdir).is_dir() {
        "/".to_owned()
    } else {
        workdir
    };
    if !Path::new(&workdir).is_dir() {
        return Err(err(
            ErrorKind::NotFound,
            format!("there is no directory {workdir} in the guest"),
        ));
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(&spec.argv[1..]).env_clear().current_dir(&workdir);
    cmd.env("PATH", DEFAULT_PATH)
        .env("HOME", &who.home)
        .env("USER", &who.name)
        .env("LOGNAME", &who.name)
        .env("SHELL", &who.shell);
    if let Some(tty) = &spec.tty {
        cmd.env("TERM", tty.term.as_deref().unwrap_or("xterm-256color"));
    }
    for kv in &spec.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
                cmd.env(k, v);
            }
            _ => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("bad environment entry {kv:?}: want NAME=value"),
                ));
            }
        }
    }
    let pty = match &spec.tty {
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
        Some(tty) => {
            let ws = nix::pty::Winsize {
                ws_row: tty.rows,
                ws_col: tty.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pair = nix::pty::openpty(Some(&ws), None)
                .map_err(|e| err(ErrorKind::Failed, format!("cannot open a terminal: {e}")))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| err(ErrorKind::Failed, format!("cannot open a terminal: {e}")))
            };
            cmd.stdin(Stdio::from(dup(&pair.slave)?))
                .stdout(Stdio::from(dup(&pair.slave)?))
                .stderr(Stdio::from(pair.slave));
            Some(pair.master)
        }
    };
    let with_tty = pty.is_some();
    let (uid, gid, groups) = (who.uid, who.gid, who.groups);
    // SAFETY: the closure runs in the child between fork and exec and
    // makes only system calls (setsid, ioctl, setgroups, setgid, setuid)
    // on values computed before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if with_tty && nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    Ok((cmd, pty))
}

async fn run(
    id: u64,
    spec: ExecSpec,
    running: Arc<Running>,
    stdin_rx: mpsc::UnboundedReceiver<Bytes>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), AgentError> {
    let (cmd, pty) = command(&spec)?;
    let program = spec.argv[0].clone();
    let mut child = tokio::process::Command::from(cmd).spawn().map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Failed
        };
        err(kind, format!("cannot run {program}: {e}"))
    })?;
    let pid = child.id().unwrap_or(0);
    running
        .pgid
        .store(i32::try_from(pid).unwrap_or(0), Ordering::Release);
    // The reply goes out before any output: frames leave in order.
    let _ = out
        .send(encode_response(id, Ok(Response::ExecStarted { pid })))
        .await;
    let mut tasks = tokio::task::JoinSet::new();
    match pty {
        Some(master) => {
            let master = Arc::new(master);
            *lock(&running.pty) = Some(master.clone());
            let ends = nonblocking_dup(&master)
                .and_then(tokio::net::unix::pipe::Receiver::from_file_unchecked)
                .and_then(|r| {
                    let w = nonblocking_dup(&master)
                        .and_then(tokio::net::unix::pipe::Sender::from_file_unchecked)?;
                    Ok((r, w))
                });
            let (reader, writer) = ends.map_err(|e| failed_io("terminal", e))?;
            tasks.spawn(feed_stdin(
                id,
                writer,
                stdin_rx,
                out.clone(),
                running.clone(),
                true,
            ));
            let output = relay_output(id, Channel::Stdout, reader, &running.credit[0], out);
            let (_, status) = tokio::join!(output, child.wait());
            tasks.abort_all();
            *lock(&running.pty) = None;
            send_exit(id, status, out).await
        }
        None => {
            if let Some(stdin) = child.stdin.take() {
                tasks.spawn(feed_stdin(
                    id,
                    stdin,
                    stdin_rx,
                    out.clone(),
                    running.clone(),
                    false,
                ));
            }
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let o1 = async {
                if let Some(s) = stdout {
                    relay_output(id, Channel::Stdout, s, &running.credit[0], out).await;
                }
            };
            let o2 = async {
                if let Some(s) = stderr {
                    relay_output(id, Channel::Stderr, s, &running.credit[1], out).await;
                }
            };
            let (_, _, status) = tokio::join!(o1, o2, child.wait());
            tasks.abort_all();
            send_exit(id, status, out).await
        }
    }
}

/// Carry a TCP connection to `port` on the guest's loopback (IPv4, then
/// IPv6) as stream `id`.
async fn connect(
    id: u64,
    port: u16,
    running: Arc<Running>,
    stdin_rx: mpsc::UnboundedReceiver<Bytes>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), AgentError> {
    let v4 = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await;
    let socket = match v4 {
        Ok(s) => s,
        Err(e4) => tokio::net::TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, port))
            .await
            .map_err(|_| {
                let kind = if e4.kind() == std::io::ErrorKind::ConnectionRefused {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Failed
                };
                err(
                    kind,
                    format!("nothing accepts connections on port {port} in the guest: {e4}"),
                )
            })?,
    };
    let _ = socket.set_nodelay(true);
    let _ = out.send(encode_response(id, Ok(Response::Connected))).await;
    let (read, write) = socket.into_split();
    // In a set, so the feeder (and the socket's write half) goes when this
    // task is aborted, closing the connection.
    let mut feeder = tokio::task::JoinSet::new();
    feeder.spawn(feed_stdin(
        id,
        write,
        stdin_rx,
        out.clone(),
        running.clone(),
        false,
    ));
    relay_output(id, Channel::Stdout, read, &running.credit[0], out).await;
    // The guest side closed: the connection is over, whatever the host
    // still sends.
    feeder.abort_all();
    send_exit(id, Ok(std::process::ExitStatus::from_raw(0)), out).await
}

fn failed_io(what: &str, e: std::io::Error) -> AgentError {
    err(ErrorKind::Failed, format!("{what}: {e}"))
}

async fn send_exit(
    id: u64,
    status: std::io::Result<std::process::ExitStatus>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), AgentError> {
    let status = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(255),
        },
        Err(e) => {
            eprintln!("banger-agent: cannot wait for stream {id}'s command: {e}");
            ExitStatus::Code(255)
        }
    };
    let _ = out.send(StreamFrame::Exit { id, status }.encode()).await;
    Ok(())
}

/// A duplicate of a terminal's controlling side, without blocking, for
/// one async pipe end.
fn nonblocking_dup(master: &OwnedFd) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::from(master.try_clone()?);
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(file)
}

/// Write what the host sends to the command's stdin, acknowledging each
/// piece once written; an empty piece ends stdin (with a terminal, the
/// terminal stays: its keys carry their own end).
async fn feed_stdin<W: AsyncWrite + Unpin>(
    id: u64,
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
    running: Arc<Running>,
    tty: bool,
) {
    let ack = |n: usize| credit(id, running.stdin_inflow.passed_on(n) as usize);
    while let Some(bytes) = rx.recv().await {
        if bytes.is_empty() {
            if tty {
                continue;
            }
            break;
        }
        if writer.write_all(&bytes).await.is_err() {
            // The command closed its stdin; what comes is dropped, but
            // acknowledged so the host is not left waiting.
            let _ = out.send(ack(bytes.len())).await;
            continue;
        }
        let _ = writer.flush().await;
        let _ = out.send(ack(bytes.len())).await;
    }
    let _ = writer.shutdown().await;
}

fn credit(id: u64, n: usize) -> Vec<u8> {
    StreamFrame::Credit {
        id,
        channel: Channel::Stdin,
        n: u32::try_from(n).unwrap_or(WINDOW),
    }
    .encode()
}

/// Send what `reader` gives as `channel` frames, no faster than the
/// host's credit allows; then the channel's end.
async fn relay_output<R: AsyncRead + Unpin>(
    id: u64,
    channel: Channel,
    mut reader: R,
    credit: &Credit,
    out: &mpsc::Sender<Vec<u8>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let allowed = credit.take(CHUNK).await;
        if allowed == 0 {
            return;
        }
        // A terminal whose last user closed it reads EIO: its end.
        let n = reader.read(&mut buf[..allowed]).await.unwrap_or(0);
        if n < allowed {
            credit.add(u32::try_from(allowed - n).unwrap_or(0));
        }
        let frame = StreamFrame::Data {
            id,
            channel,
            bytes: Bytes::copy_from_slice(&buf[..n]),
        };
        if out.send(frame.encode()).await.is_err() || n == 0 {
            return;
        }
    }
}
