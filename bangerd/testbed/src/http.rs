//! A file server on loopback for download tests, with broken behaviours
//! chosen by the first path segment:
//!
//! | path | answer |
//! | --- | --- |
//! | `/X` | `ROOT/X`, honouring `Range: bytes=N-` (206) |
//! | `/truncated/X` | a `Content-Length` for all of `ROOT/X`, half the body, then the connection closes (ranges ignored) |
//! | `/hang/X` | the headers and the first 4 KiB (all of a smaller file), then nothing for a minute |
//! | `/drop-once/X` | the first request as `/truncated/`, later ones as `/X` |
//!
//! Documents (`*.json`, `*.minisig`) always come whole, so a broken
//! channel breaks at its artifacts. Every request is recorded with the
//! start of its range.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path asked for.
    pub path: String,
    /// `N` of `Range: bytes=N-`.
    pub range_from: Option<u64>,
}

/// The server; it runs until the test process ends.
#[derive(Debug, Clone)]
pub struct FileServer {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl FileServer {
    /// Serve `root` on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub fn start(root: PathBuf) -> Self {
        Self::start_in(root, None)
    }

    /// Serve `root` on a free loopback port of the named network
    /// namespace (`ip netns`), or of the test's own when `None`.
    ///
    /// # Panics
    /// When the namespace cannot be entered or no port can be bound.
    pub fn start_in(root: PathBuf, netns: Option<&str>) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let dropped = Arc::new(Mutex::new(HashSet::new()));
        let netns = netns.map(|n| PathBuf::from("/run/netns").join(n));
        let (tx, rx) = std::sync::mpsc::channel();
        // The serving thread enters the namespace; the listener (and so
        // every connection) lives there.
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let file = std::fs::File::open(&ns).expect("open the network namespace");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the network namespace");
            }
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            let _ = tx.send(listener.local_addr().expect("local address").port());
            for stream in listener.incoming().flatten() {
                let (root, seen, dropped) = (root.clone(), seen.clone(), dropped.clone());
                std::thread::spawn(move || answer(stream, &root, &seen, &dropped));
            }
        });
        let port = rx.recv().expect("the server thread's port");
        Self { port, requests }
    }

    /// The loopback port it serves on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn answer(
    mut stream: TcpStream,
    root: &Path,
    seen: &Mutex<Vec<Request>>,
    dropped: &Mutex<HashSet<String>>,
) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range_from = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_from = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Request {
            path: path.clone(),
            range_from,
        });
    let (mode, file) = match path.trim_start_matches('/').split_once('/') {
        Some((m @ ("truncated" | "hang" | "drop-once"), rest)) => (m, rest.to_owned()),
        _ => ("", path.trim_start_matches('/').to_owned()),
    };
    let Ok(body) = std::fs::read(root.join(&file)) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
    };
    let whole = |stream: &mut TcpStream, sent: &[u8]| {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(sent);
    };
    let document = file.ends_with(".json") || file.ends_with(".minisig");
    let mode = if document { "" } else { mode };
    let first_drop = mode == "drop-once"
        && dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file.clone());
    match mode {
        "truncated" => whole(&mut stream, &body[..body.len() / 2]),
        _ if first_drop => whole(&mut stream, &body[..body.len() / 2]),
        "hang" => {
            whole(&mut stream, &body[..body.len().min(4096)]);
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => match range_from {
            Some(from) if (from as usize) < body.len() => {
                let from = from as usize;
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {from}-{}/{}\r\nconnection: close\r\n\r\n",
                    body.len() - from,
                    body.len() - 1,
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[from..]);
            }
            _ => whole(&mut stream, &body),
        },
    }
}
