//! `banger web`: a local web dashboard served by the user's own process
//! (never by bangerd), a client of the same D-Bus API as the CLI, so
//! polkit decides what it may do exactly as for the CLI.
//!
//! The page's state comes from the [`live`](crate::live) model, pushed to
//! the browser as Server-Sent Events (`/api/events`) whenever it changes;
//! actions are `POST /api/...` calls. Access: loopback only unless
//! `--listen` says otherwise; a random token in the printed URL is traded
//! for an `HttpOnly`, `SameSite=Strict` session cookie; every `POST` also
//! needs the page's CSRF token in a header (which a cross-site form cannot
//! send) and an `Origin`, when sent, of this server; the `Host` header must
//! name this server (no DNS rebinding). Everything the pages use is
//! embedded in the binary.

mod routes;
mod snapshot;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::cli::Options;
use crate::client::Client;
use crate::exit::{self, Failure, Kind};
use crate::live::{self, Model, Update};
use crate::session;

/// How often the running VMs are asked for their `Stats` while a page
/// is open.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// At most this many VMs are asked for `Stats` each round.
const STATS_MAX: usize = 64;

/// The secrets of one `banger web` run.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// In the printed URL; traded for the cookie.
    pub token: String,
    /// The session cookie's value.
    pub session: String,
    /// Sent by the page with every POST.
    pub csrf: String,
}

impl Secrets {
    pub fn new() -> Result<Self, Failure> {
        Ok(Self {
            token: random_hex()?,
            session: random_hex()?,
            csrf: random_hex()?,
        })
    }
}

/// 32 random bytes from the kernel, as hex.
fn random_hex() -> Result<String, Failure> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Failure::new(Kind::Failed, format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the guard of every request checks against.
#[derive(Debug)]
pub struct Gate {
    pub secrets: Secrets,
    /// Where the server listens.
    pub addr: SocketAddr,
    /// This host's name, which a browser elsewhere may use.
    pub hostname: String,
}

impl Gate {
    /// Whether a request's `Host` header names this server. Names other
    /// than `localhost` and this host's are refused, so a page whose own
    /// name was made to resolve here (DNS rebinding) gets nothing; an
    /// address literal cannot be rebound. On loopback only the address
    /// listened on and `localhost` are this server.
    pub fn allows_host(&self, host: &str) -> bool {
        let Some((name, port)) = host.rsplit_once(':') else {
            return false;
        };
        if port.parse::<u16>().ok() != Some(self.addr.port()) {
            return false;
        }
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) if self.addr.ip().is_loopback() => ip == self.addr.ip(),
            Ok(_) => true,
            Err(_) => {
                !self.addr.ip().is_loopback()
                    && !self.hostname.is_empty()
                    && (name.eq_ignore_ascii_case(&self.hostname)
                        || name.eq_ignore_ascii_case(&format!("{}.local", self.hostname)))
            }
        }
    }
}

/// What every request handler shares.
pub struct Shared {
    pub client: Client,
    pub model: Mutex<Model>,
    /// Bumped after every change of the model; pages wait on it.
    pub changed: watch::Sender<u64>,
    /// Open event streams (Stats are only asked for while there is one).
    pub viewers: AtomicUsize,
    /// The caller's uid.
    pub me: u32,
    pub gate: Arc<Gate>,
}

impl Shared {
    /// Apply `updates` and tell the pages.
    fn apply(&self, updates: impl IntoIterator<Item = Update>) {
        {
            let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            for update in updates {
                model.apply(update, now);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// `banger web`.
pub async fn run(opts: Options, listen: SocketAddr, open: bool) -> anyhow::Result<u8> {
    let client = session::connect(opts).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Failure::new(
            Kind::Unavailable,
            format!("cannot listen on {listen}: {e}; pick another with --listen ADDR:PORT"),
        )
    })?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "banger: warning: listening on {addr}, reachable from other hosts; \
             anyone with the URL acts as you"
        );
    }
    let secrets = Secrets::new()?;
    let url = format!("http://{addr}/?token={}", secrets.token);
    let (tx, mut updates) = mpsc::channel(1024);
    let feed = tokio::spawn(live::feed::run(client.clone(), tx));
    let shared = Arc::new(Shared {
        client,
        model: Mutex::new(Model::default()),
        changed: watch::Sender::new(0),
        viewers: AtomicUsize::new(0),
        me: nix::unistd::getuid().as_raw(),
        gate: Arc::new(Gate {
            secrets,
            addr,
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }),
    });
    // The model, fed in batches.
    let pump = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(first) = updates.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = updates.try_recv() {
                    batch.push(more);
                }
                shared.apply(batch);
            }
        })
    };
    let stats = tokio::spawn(stats_loop(shared.clone()));

    // Whoever reads stdout may stop after the URL (`banger web | head -1`):
    // the server goes on without its stdout.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "banger web: open {url}\n\
         banger web: the link is yours alone (it carries a secret); Ctrl-C stops the server"
    )
    .and_then(|()| out.flush());
    if open {
        let opened = std::process::Command::new("xdg-open")
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = opened {
            eprintln!("banger: cannot start xdg-open ({e}); open the URL yourself");
        }
    }
    let app = routes::router(shared);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    feed.abort();
    pump.abort();
    stats.abort();
    served.map_err(|e| Failure::new(Kind::Failed, format!("the web server failed: {e}")))?;
    Ok(exit::OK)
}

/// `VM.Stats` of the caller's running VMs while a page is open.
async fn stats_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(STATS_EVERY);
    loop {
        tick.tick().await;
        if shared.viewers.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let paths: Vec<String> = {
            let model = shared.model.lock().unwrap_or_else(|e| e.into_inner());
            model
                .vms()
                .into_iter()
                .filter(|v| v.state == "running" && snapshot::visible(v, shared.me))
                .take(STATS_MAX)
                .map(|v| v.path)
                .collect()
        };
        let updates = live::feed::stats(&shared.client, paths).await;
        if !updates.is_empty() {
            shared.apply(updates);
        }
    }
}
