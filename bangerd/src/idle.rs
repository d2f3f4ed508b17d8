//! When bangerd may exit because nobody needs it.
//!
//! Under systemd, bangerd is started on demand (D-Bus activation for
//! `org.banger.Manager`, socket activation for `.vm` DNS) and exits after
//! `daemon.idle_exit_secs` of idleness: no job running, no method call on
//! the bus, and no VM running (bangerd serves the guests' DNS on the bridge
//! and notices VMMs that end). [`Activity`] remembers the last call;
//! [`IdleRule`] decides from a snapshot, so the rule is tested without a
//! clock or a bus.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The last time someone needed the daemon.
#[derive(Debug)]
pub struct Activity {
    last: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            last: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    /// Someone needed the daemon now.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// How long since the last [`Activity::touch`] (or since start).
    pub fn idle_for(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// What the daemon is doing, sampled once per tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Jobs running.
    pub jobs: usize,
    /// VMs running.
    pub vms: usize,
    /// Time since the last bus call.
    pub quiet: Duration,
}

/// When to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleRule {
    /// Quiet time needed; `None` never exits.
    pub after: Option<Duration>,
}

impl IdleRule {
    /// `idle_exit_secs` from the configuration, applied only when systemd
    /// started the daemon (something must bring it back).
    pub fn new(idle_exit_secs: u64, under_systemd: bool) -> Self {
        let after =
            (under_systemd && idle_exit_secs > 0).then(|| Duration::from_secs(idle_exit_secs));
        Self { after }
    }

    /// Whether the daemon should exit now.
    pub fn should_exit(&self, load: Load) -> bool {
        match self.after {
            Some(after) => load.jobs == 0 && load.vms == 0 && load.quiet >= after,
            None => false,
        }
    }

    /// How often to sample: often enough to exit within a second or so of
    /// the deadline, never busier than twice a second.
    pub fn tick(&self) -> Duration {
        match self.after {
            Some(after) => (after / 4).clamp(Duration::from_millis(500), Duration::from_secs(5)),
            None => Duration::from_secs(5),
        }
    }
}

/// Whether systemd started this process (the unit's invocation id is set).
pub fn started_by_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(jobs: usize, vms: usize, quiet_secs: u64) -> Load {
        Load {
            jobs,
            vms,
            quiet: Duration::from_secs(quiet_secs),
        }
    }

    #[test]
    fn exits_only_when_nothing_needs_it_for_long_enough() {
        let rule = IdleRule::new(60, true);
        assert!(rule.should_exit(load(0, 0, 60)));
        assert!(rule.should_exit(load(0, 0, 61)));
        assert!(!rule.should_exit(load(0, 0, 59)), "not quiet long enough");
        assert!(!rule.should_exit(load(1, 0, 600)), "a job runs");
        assert!(!rule.should_exit(load(0, 1, 600)), "a VM runs");
    }

    #[test]
    fn never_exits_outside_systemd_or_when_disabled() {
        assert!(!IdleRule::new(60, false).should_exit(load(0, 0, 6000)));
        assert!(!IdleRule::new(0, true).should_exit(load(0, 0, 6000)));
    }

    #[test]
    fn ticks_scale_with_the_deadline() {
        assert_eq!(IdleRule::new(1, true).tick(), Duration::from_millis(500));
        assert_eq!(IdleRule::new(8, true).tick(), Duration::from_secs(2));
        assert_eq!(IdleRule::new(600, true).tick(), Duration::from_secs(5));
        assert_eq!(IdleRule::new(0, true).tick(), Duration::from_secs(5));
    }

    #[test]
    fn touching_resets_the_quiet_time() {
        let activity = Activity::default();
        std::thread::sleep(Duration::from_millis(20));
        assert!(activity.idle_for() >= Duration::from_millis(20));
        activity.touch();
        assert!(activity.idle_for() < Duration::from_millis(20));
    }
}
