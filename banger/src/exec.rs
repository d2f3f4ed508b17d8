//! `banger vm exec`: run a command in a VM through bangerd's `VM.Exec`
//! and speak the stream on the socket it hands back
//! (`banger_agent_proto::stream`, stream id 0).

use std::io::{IsTerminal, Read};
use std::os::fd::{AsFd, OwnedFd};

use banger_agent_proto::codec::{Frame, FrameCodec};
use banger_agent_proto::stream::{
    Broken, CHUNK, Channel, Control, ExitStatus, StreamFrame, is_json,
};
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::cli::Options;
use crate::client::Client;
use crate::exit::{Failure, Kind};
use crate::session::Authorization;

/// Run `command` in the VM at `path`; the exit code is the command's.
pub async fn run(
    opts: Options,
    client: &Client,
    path: &str,
    command: Vec<String>,
    mut options: banger_dbus::options::Exec,
) -> anyhow::Result<u8> {
    let terminal = if options.tty {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::new(
                Kind::InvalidArgument,
                "--tty needs a terminal on stdin; leave it out to pipe input",
            )
            .into());
        }
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        options.rows = Some(u32::from(rows));
        options.cols = Some(u32::from(cols));
        options.term = std::env::var("TERM").ok().filter(|t| !t.is_empty());
        true
    } else {
        false
    };
    let auth = Authorization::prepare(opts).await;
    let fd = client
        .vm_exec(path, &command, &options, auth.interaction)
        .await;
    let fd = auth.finish(fd).await?;
    let raw = if terminal { RawMode::enter() } else { None };
    // Plain blocking writes: a hop to tokio's blocking pool per chunk
    // (tokio::io::stdout) cost most of the output rate.
    let status = stream(
        fd,
        Box::new(std::io::stdin()),
        terminal,
        |channel, bytes| {
            use std::io::Write;
            match channel {
                Channel::Stderr => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&bytes).and_then(|()| err.flush())
                }
                _ => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes).and_then(|()| out.flush())
                }
            }
        },
    )
    .await;
    drop(raw);
    Ok(shell_code(status?))
}

/// The exit code a shell would give for `status`.
pub fn shell_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(c) => u8::try_from(c & 0xff).unwrap_or(1),
        ExitStatus::Signal(s) => u8::try_from((128 + s) & 0xff).unwrap_or(1),
    }
}

/// Speak the stream on `fd` until the command ends: `input` becomes its
/// stdin (read on a thread of its own), its output goes to `output`.
/// With `terminal`, size changes are passed on too. A broken pipe on
/// output ends it as SIGPIPE would.
pub async fn stream(
    fd: OwnedFd,
    input: Box<dyn Read + Send>,
    terminal: bool,
    output: impl FnMut(Channel, bytes::Bytes) -> std::io::Result<()>,
) -> Result<ExitStatus, Failure> {
    let mut output = output;
    stream_frames(
        fd,
        |tx, tasks| {
            read_input(input, tx.clone());
            tasks.spawn(forward_signals(tx, terminal));
        },
        |channel, bytes| std::future::ready(output(channel, bytes)),
    )
    .await
}

/// Speak the stream on `fd` until its end: `feed` is given the sender of
/// the frames for bangerd (stdin frames, an empty one last, and
/// controls) and a set for the tasks that make them, aborted at the end;
/// every data frame that comes back, the empty one that ends a channel
/// too, goes to `output`. A broken pipe on output ends it as SIGPIPE
/// would.
pub async fn stream_frames<F>(
    fd: OwnedFd,
    feed: impl FnOnce(mpsc::Sender<Vec<u8>>, &mut tokio::task::JoinSet<()>),
    mut output: impl FnMut(Channel, bytes::Bytes) -> F,
) -> Result<ExitStatus, Failure>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    let broken = |e: std::io::Error| {
        Failure::new(Kind::Failed, format!("the stream from bangerd failed: {e}"))
    };
    let socket = std::os::unix::net::UnixStream::from(fd);
    socket.set_nonblocking(true).map_err(broken)?;
    let socket = tokio::net::UnixStream::from_std(socket).map_err(broken)?;
    let (read, write) = socket.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let mut tasks = tokio::task::JoinSet::new();
    // The writer ends with the stream, not with the input: closing our
    // side early would look like a caller that left.
    let _open = tx.clone();
    tasks.spawn(async move {
        let mut sink = FramedWrite::new(write, FrameCodec::new());
        while let Some(frame) = rx.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    });
    feed(tx, &mut tasks);
    let mut frames = FramedRead::new(read, FrameCodec::new());
    loop {
        let payload = match frames.next().await {
            Some(Ok(Frame::Data(p))) => p,
            Some(Ok(Frame::Oversized(_))) => continue,
            Some(Err(e)) => {
                return Err(Failure::new(
                    Kind::Failed,
                    format!("the stream from bangerd failed: {e}"),
                ));
            }
            None => {
                return Err(Failure::new(
                    Kind::Failed,
                    "bangerd closed the stream before the command ended; see `journalctl -u bangerd`",
                ));
            }
        };
        if is_json(&payload) {
            let why = serde_json::from_slice::<Broken>(&payload)
                .map(|b| b.error)
                .unwrap_or_else(|_| "an unreadable message".to_owned());
            return Err(Failure::new(
                Kind::Failed,
                format!("the command's stream broke: {why}"),
            ));
        }
        match StreamFrame::decode(&payload) {
            Ok(StreamFrame::Data { channel, bytes, .. }) => {
                if let Err(e) = output(channel, bytes).await {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        // Our reader left: so does the command, as with a pipe.
                        return Ok(ExitStatus::Signal(nix::libc::SIGPIPE));
                    }
                    return Err(broken(e));
                }
            }
            Ok(StreamFrame::Exit { status, .. }) => return Ok(status),
            Ok(_) => {}
            Err(e) => {
                return Err(Failure::new(
                    Kind::Failed,
                    format!("bangerd sent a bad stream frame: {e}"),
                ));
            }
        }
    }
}

/// Read `input` on a thread of its own (a blocked read must not hold the
/// process at exit) and send it as stdin frames, then the end.
fn read_input(mut input: Box<dyn Read + Send>, tx: mpsc::Sender<Vec<u8>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            let frame = StreamFrame::Data {
                id: 0,
                channel: Channel::Stdin,
                bytes: bytes::Bytes::copy_from_slice(&buf[..n]),
            };
            if tx.blocking_send(frame.encode()).is_err() || n == 0 {
                return;
            }
        }
    });
}

/// Pass SIGINT, SIGTERM, SIGHUP and SIGQUIT on to the command, and with a
/// terminal its size changes. Runs until aborted.
async fn forward_signals(tx: mpsc::Sender<Vec<u8>>, terminal: bool) {
    let mut kinds = vec![
        (SignalKind::interrupt(), Some(nix::libc::SIGINT)),
        (SignalKind::terminate(), Some(nix::libc::SIGTERM)),
        (SignalKind::hangup(), Some(nix::libc::SIGHUP)),
        (SignalKind::quit(), Some(nix::libc::SIGQUIT)),
    ];
    if terminal {
        kinds.push((SignalKind::window_change(), None));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (kind, number) in kinds {
        let Ok(mut s) = signal(kind) else { continue };
        let tx = tx.clone();
        tasks.spawn(async move {
            while s.recv().await.is_some() {
                let control = match number {
                    Some(signal) => Control::Signal { signal },
                    None => match terminal_size() {
                        Some((rows, cols)) => Control::Resize { rows, cols },
                        None => continue,
                    },
                };
                let body = serde_json::to_vec(&control).unwrap_or_default();
                if tx.send(body).await.is_err() {
                    return;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The controlling terminal's size (stdout's, else stdin's).
fn terminal_size() -> Option<(u16, u16)> {
    nix::ioctl_read_bad!(get_winsize, nix::libc::TIOCGWINSZ, nix::libc::winsize);
    use std::os::fd::AsRawFd;
    for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
        let mut ws = nix::libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which
        // lives for the call.
        if unsafe { get_winsize(fd, &mut ws) }.is_ok() && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// The terminal in raw mode, restored when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}
