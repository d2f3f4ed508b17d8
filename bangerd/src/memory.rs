//! The C allocator's share of bangerd's resident memory.
//!
//! glibc gives each thread that allocates while others do an arena of its
//! own (up to eight per core) and keeps what is freed in them: after a
//! burst of jobs on tokio's blocking pool the daemon's RSS stays megabytes
//! above what it uses. Two arenas are plenty for a daemon that mostly
//! waits, and handing free pages back when the last job ends keeps an
//! idle daemon small.

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

#[cfg(test)]
mod tests {
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
