//! Logging: journald with structured `BANGER_*` fields when the journal
//! socket exists, stderr otherwise.
//!
//! Fields are passed unprefixed, so `tracing::info!(banger_vm_id = ..)`
//! becomes the journal field `BANGER_VM_ID`. Every entry carries
//! `SYSLOG_IDENTIFIER=bangerd`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

/// Changes the log filter after start-up (configuration reload).
#[derive(Debug, Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Replace the filter; a bad filter keeps the old one.
    pub fn set_filter(&self, filter: &str) {
        match EnvFilter::try_new(filter) {
            Ok(f) => {
                if let Err(e) = self.handle.reload(f) {
                    tracing::warn!("cannot change the log filter: {e}");
                }
            }
            Err(e) => tracing::warn!("ignoring bad log filter {filter:?}: {e}"),
        }
    }
}

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// journald's native protocol.
    Journal,
    /// Formatted lines on stderr.
    Stderr,
}

/// Install the global subscriber. `RUST_LOG` overrides `filter`.
pub fn init(filter: &str) -> (LogControl, Sink) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = tracing_journald::layer().ok().map(|layer| {
        layer
            .with_syslog_identifier("bangerd".to_owned())
            .with_field_prefix(None)
    });
    let sink = if journald.is_some() {
        Sink::Journal
    } else {
        Sink::Stderr
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .init();
    (LogControl { handle }, sink)
}
