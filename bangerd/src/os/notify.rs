//! sd_notify: readiness and status for systemd (a no-op without `NOTIFY_SOCKET`).

use libsystemd::daemon::{self, NotifyState};

/// Tell the service manager we are serving, with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status.to_owned())]);
}

/// Update the status line (`systemctl status bangerd`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status.to_owned())]);
}

/// Tell the service manager we are stopping.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping".to_owned()),
    ]);
}

/// Tell the service manager we are reloading the configuration.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// The watchdog interval systemd expects pings within (`WatchdogSec=`),
/// when it set one for this process.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    daemon::watchdog_enabled(false)
}

/// Tell the service manager we are alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = daemon::notify(false, states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}
