//! The C allocator's share of bangerd's resident memory.
//!
//! glibc gives each thread that allocates while others do an arena of its
//! own (up to eight per core) and keeps what is freed in them: after a
//! burst of jobs on tokio's blocking pool the daemon's RSS stays megabytes
//! above what it uses. Two arenas are plenty for a daemon that mostly
//! waits, and handing free pages back when the last job ends keeps an
//! idle daemon small. A burst of bus calls does the same without a job
//! (a `GetManagedObjects` of 1,000 VMs builds megabytes of reply), so
//! the free pages also go back once the bus has been quiet for a second
//! ([`trim_after_calls`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::idle::Activity;

/// How long the bus must be quiet before a burst's memory goes back.
const QUIET: Duration = Duration::from_secs(1);

/// Cap the allocator's arenas. Call before any thread is started.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // before the process has other threads.
        let _ = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2) };
    }
}

/// Return the free memory of every arena to the kernel. Takes a few
/// milliseconds with a large heap: run it on the blocking pool.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim takes the arenas' locks itself and touches
        // only free chunks.
        let _ = unsafe { nix::libc::malloc_trim(0) };
    }
}

/// Trim once after each burst of bus calls, when no call came for
/// [`QUIET`] (one look a second; runs until the daemon exits).
pub async fn trim_after_calls(activity: Arc<Activity>) {
    let mut trimmed = Instant::now();
    loop {
        tokio::time::sleep(QUIET).await;
        if due(activity.idle_for(), trimmed.elapsed()) {
            trimmed = Instant::now();
            let _ = crate::blocking::value(trim).await;
        }
    }
}

/// Whether to trim, `idle` after the last bus call and `since_trim`
/// after the last trim: a call came after that trim, and none for
/// [`QUIET`].
fn due(idle: Duration, since_trim: Duration) -> bool {
    idle >= QUIET && idle < since_trim
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_burst_is_trimmed_once_after_a_quiet_second() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Calls still coming.
        assert!(!super::due(ms(200), s(10)));
        // Quiet for a second after a call that came after the last trim.
        assert!(super::due(ms(1100), s(10)));
        // Trimmed since that call: not again until another comes.
        assert!(!super::due(s(5), s(3)));
    }

    #[test]
    fn trimming_after_a_burst_gives_memory_back() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").expect("status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("VmRSS")
        }
        // Many small blocks, freed but for every 64th, so the heap's top
        // is pinned and only trimming inside it returns the pages.
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 1000]).collect();
        let before = rss_kib();
        let kept: Vec<Vec<u8>> = blocks
            .drain(..)
            .enumerate()
            .filter(|(i, _)| i % 64 == 0)
            .map(|(_, b)| b)
            .collect();
        let full = rss_kib();
        super::trim();
        let after = rss_kib();
        assert!(kept.len() > 600);
        assert!(
            after + 16 * 1024 < full.max(before),
            "trim returned too little: {before} KiB with the blocks, {full} KiB after freeing, {after} KiB after trimming"
        );
    }
}
