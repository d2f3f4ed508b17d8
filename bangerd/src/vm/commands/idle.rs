//! Suspending idle VMs (`vm.suspend_idle_secs`, off by default). A
//! running VM is idle while nothing bangerd can see moves: no packet
//! through its TAP (SSH, its services, NAT) and no stream through its
//! agent opened or ended (exec, cp, forwarded connections). One that has
//! been idle for the configured time is suspended as `vm suspend` would
//! (a job of root's); its next `vm start` resumes it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::suspend::suspendable;
use super::{Vms, blocking};
use crate::auth::Caller;
use crate::vm::VmState;

/// What a VM has done so far, as far as bangerd sees: counters that only
/// grow while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    /// Packets through its TAP, both ways.
    pub packets: u64,
    /// Streams through its agent opened or ended.
    pub streams: u64,
}

/// Since when each running VM has done nothing.
#[derive(Debug, Default)]
pub struct IdleWatch {
    seen: HashMap<String, (Activity, Instant)>,
}

impl IdleWatch {
    /// Record VM `id`'s `activity` as seen at `now`; how long it has been
    /// idle (zero when it did something since the last look, or is new).
    pub fn observe(&mut self, id: &str, activity: Activity, now: Instant) -> Duration {
        match self.seen.get_mut(id) {
            Some((last, since)) if *last == activity => now.saturating_duration_since(*since),
            Some(entry) => {
                *entry = (activity, now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(id.to_owned(), (activity, now));
                Duration::ZERO
            }
        }
    }

    /// Forget every VM but those in `running` (a VM that stops and
    /// starts again is idle from its new start).
    pub fn retain(&mut self, running: &HashSet<String>) {
        self.seen.retain(|id, _| running.contains(id));
    }

    /// Forget VM `id`.
    pub fn forget(&mut self, id: &str) {
        self.seen.remove(id);
    }
}

/// How often the idle watch looks, for an idle time of `idle`: a third of
/// it, between 1 and 30 seconds.
pub fn look_every(idle: Duration) -> Duration {
    (idle / 3).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Packets through TAP `name` both ways; `None` when it is not there.
fn tap_packets(name: &str) -> Option<u64> {
    let read = |what: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("rx_packets")?.saturating_add(read("tx_packets")?))
}

impl Vms {
    /// One look of the idle watch: every running VM's activity noted, and
    /// those idle for `vm.suspend_idle_secs` suspended. Returns the VMs
    /// whose suspend started.
    pub async fn suspend_idle(self: &Arc<Self>, watch: &mut IdleWatch) -> Vec<String> {
        let config = self.config();
        let idle = Duration::from_secs(config.vm.suspend_idle_secs);
        let Ok(vms) = self.list_with_process().await else {
            return Vec::new();
        };
        let running: Vec<_> = vms
            .into_iter()
            .filter(|v| v.state == VmState::Running)
            .collect();
        let ids: HashSet<String> = running.iter().map(|v| v.id.clone()).collect();
        watch.retain(&ids);
        self.runtime
            .stream_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
        if idle.is_zero() {
            return Vec::new();
        }
        let taps: Vec<Option<String>> = running.iter().map(|v| v.tap.clone()).collect();
        let Ok(packets) = blocking(move || {
            Ok(taps
                .iter()
                .map(|t| t.as_deref().and_then(tap_packets).unwrap_or(0))
                .collect::<Vec<_>>())
        })
        .await
        else {
            return Vec::new();
        };
        let streams: HashMap<String, u64> = self
            .runtime
            .stream_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let open: HashSet<String> = self
            .runtime
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let now = Instant::now();
        let mut suspended = Vec::new();
        for (vm, packets) in running.iter().zip(packets) {
            let activity = Activity {
                packets,
                streams: streams.get(&vm.id).copied().unwrap_or(0),
            };
            let quiet = watch.observe(&vm.id, activity, now);
            // An open stream (a shell through the agent) is use, however quiet.
            if quiet < idle || open.contains(&vm.id) || suspendable(&config, vm).is_err() {
                continue;
            }
            match self.suspend_vm(&Caller::root(), &vm.id).await {
                Ok(job) => {
                    tracing::info!(banger_vm_id = %vm.id, banger_vm_name = %vm.name, banger_job_id = job, "suspending vm idle for {}s", quiet.as_secs());
                    watch.forget(&vm.id);
                    suspended.push(vm.id.clone());
                }
                // Busy with another operation: looked at again later.
                Err(e) => {
                    tracing::debug!(banger_vm_id = %vm.id, "not suspending the idle vm: {e}");
                }
            }
        }
        suspended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_idle_from_the_last_change_it_made() {
        let mut watch = IdleWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let a = Activity {
            packets: 10,
            streams: 0,
        };
        assert_eq!(watch.observe("one", a, at(0)), Duration::ZERO);
        assert_eq!(watch.observe("one", a, at(5)), Duration::from_secs(5));
        // A packet: busy again, idle from now.
        let b = Activity { packets: 11, ..a };
        assert_eq!(watch.observe("one", b, at(7)), Duration::ZERO);
        assert_eq!(watch.observe("one", b, at(10)), Duration::from_secs(3));
        // A stream opened or ended counts as much.
        let c = Activity { streams: 1, ..b };
        assert_eq!(watch.observe("one", c, at(11)), Duration::ZERO);
        // Each VM on its own.
        assert_eq!(watch.observe("two", a, at(11)), Duration::ZERO);
        assert_eq!(watch.observe("two", a, at(20)), Duration::from_secs(9));
        // A VM that stopped is forgotten: idle from its next start.
        watch.retain(&HashSet::from(["two".to_owned()]));
        assert_eq!(watch.observe("one", c, at(30)), Duration::ZERO);
        watch.forget("two");
        assert_eq!(watch.observe("two", a, at(30)), Duration::ZERO);
    }

    #[test]
    fn the_watch_looks_thrice_per_idle_time_within_bounds() {
        assert_eq!(look_every(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(look_every(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(look_every(Duration::from_secs(60)), Duration::from_secs(20));
        assert_eq!(
            look_every(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn a_missing_tap_has_no_packets() {
        assert_eq!(tap_packets("bgtap-none-such"), None);
        // Loopback is always there, with counters.
        assert!(tap_packets("lo").is_some());
    }
}
