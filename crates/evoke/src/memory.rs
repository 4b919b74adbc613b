//! Keeping the long-running daemons (`evoke server`, `evoke agent`) small.
//!
//! Measured with 100 pods (docs/benchmarks.md, "Orchestration"), two things
//! beside live data made most of the server's RSS:
//!
//! - glibc malloc kept freed memory. Each thread that allocates gets an
//!   arena (up to 8 per core), so the free holes of a burst are spread over
//!   16 heaps, and its mmap threshold grows after large frees, putting later
//!   big buffers (JSON bodies, LIST results) inside those heaps too. glibc
//!   only returns the top of a heap to the OS, never a free hole below live
//!   chunks. After 100 pods were started, deleted and started again, 12.7 MB
//!   of the 31.5 MB of heap was free but resident. [`tune_allocator`] caps
//!   the arenas at two and fixes the mmap threshold; [`scavenge`] hands free
//!   pages back once a burst has freed a lot (what Go's scavenger or
//!   jemalloc's decay do; glibc has no such thing).
//! - The binary's own pages. Each fault on a file mapping maps its 64 KiB
//!   neighbourhood (the kernel's fault-around), so starting up (clap, TLS
//!   certificates, schema set-up, first lists) leaves most of the 27 MB of
//!   text resident although the steady state uses about half. The scavenger
//!   drops those mappings once, after start-up; pages still in use fault
//!   back in from the page cache (evoke_vmm::residency explains why that is
//!   safe).
#![allow(unsafe_code)]

use std::time::Duration;

/// Largest number of malloc arenas. Two cores run two tokio workers; the
/// blocking threads share their arenas rather than adding their own.
const ARENA_MAX: i32 = 2;

/// Allocations from this size go to their own mapping and are unmapped when
/// freed. 128 KiB is glibc's starting value; setting it stops glibc from
/// raising it (up to 32 MiB) after large frees.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Free memory at the top of a heap beyond this is returned at once.
const TRIM_THRESHOLD: i32 = 128 << 10;

/// How long after start the start-up pages are dropped: the first lists,
/// node registration and the pod network are set up by then.
const SETTLE: Duration = Duration::from_secs(10);

/// How often the heap is looked at.
const PERIOD: Duration = Duration::from_secs(5);

/// Free heap that must have appeared since the last trim before trimming
/// again: a burst's worth, not the churn of a quiet server.
const TRIM_STEP: usize = 1 << 20;

/// Sets glibc malloc's limits for a long-running daemon. Call it before the
/// async runtime starts its threads.
pub fn tune_allocator() {
    for (param, value, name) in [
        (libc::M_ARENA_MAX, ARENA_MAX, "M_ARENA_MAX"),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ] {
        // SAFETY: mallopt only sets a tunable of glibc's allocator; it takes
        // the allocator's own locks and touches no memory of ours.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::debug!(param = name, value, "mallopt refused");
        }
    }
}

/// Bytes malloc holds free in its heaps (they may or may not be resident).
fn heap_free() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics under its
    // locks and returns them by value.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks
}

/// Returns the free pages of every malloc heap to the OS; the memory stays
/// free in malloc's books and faults back in when it is used again.
fn trim() {
    // SAFETY: malloc_trim walks the allocator's free lists under its locks
    // and madvises whole free pages away; no live allocation is touched.
    unsafe { libc::malloc_trim(0) };
}

/// Whether enough free heap has appeared since `baseline` to trim.
fn worth_trimming(free: usize, baseline: usize) -> bool {
    free >= baseline.saturating_add(TRIM_STEP)
}

/// Runs until the runtime stops: once, [`SETTLE`] after start, drops the
/// start-up pages of the binary; then every [`PERIOD`] trims the heap if a
/// burst freed at least [`TRIM_STEP`] since the last look.
pub async fn scavenge() {
    tokio::time::sleep(SETTLE).await;
    match tokio::task::spawn_blocking(evoke_vmm::residency::drop_clean_file_pages).await {
        Ok(Ok(kib)) => tracing::debug!(kib, "dropped start-up pages of the binary"),
        Ok(Err(e)) => tracing::debug!(error = %e, "could not drop start-up pages"),
        Err(e) => tracing::debug!(error = %e, "dropping start-up pages panicked"),
    }
    let mut baseline = heap_free();
    trim();
    loop {
        tokio::time::sleep(PERIOD).await;
        let free = heap_free();
        if worth_trimming(free, baseline) {
            let started = std::time::Instant::now();
            // Trimming takes the arenas' locks: off the async workers.
            let _ = tokio::task::spawn_blocking(trim).await;
            tracing::debug!(free, took = ?started.elapsed(), "returned free heap pages");
            baseline = free;
        } else {
            // Memory was reused: the next burst is measured from here.
            baseline = baseline.min(free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_waits_for_a_burst_worth_of_freed_memory() {
        assert!(!worth_trimming(5 << 20, 5 << 20));
        assert!(!worth_trimming((5 << 20) + 1000, 5 << 20));
        assert!(worth_trimming(6 << 20, 5 << 20));
        // Less free than before (memory was reused): nothing to trim.
        assert!(!worth_trimming(1 << 20, 5 << 20));
    }

    #[test]
    fn trimming_after_a_large_free_lowers_the_heap_kept_resident() {
        fn rss_anon_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").expect("status");
            let line = s
                .lines()
                .find(|l| l.starts_with("RssAnon:"))
                .expect("RssAnon line");
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .expect("RssAnon value")
        }
        // Many small blocks (under the mmap threshold, so inside the heap),
        // every page touched, then all freed but one at the end that pins
        // the top of the heap: glibc alone keeps the freed pages.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 8 << 10]).collect();
        let pin = std::hint::black_box(Box::new([2u8; 100]));
        let before_free = rss_anon_kib();
        blocks.clear();
        blocks.shrink_to_fit();
        let kept = rss_anon_kib();
        trim();
        let after = rss_anon_kib();
        assert_eq!(pin[0], 2);
        assert!(
            kept.saturating_sub(after) > 16 << 10,
            "trim returned only {} KiB (before free {before_free}, after free {kept}, after trim {after})",
            kept.saturating_sub(after)
        );
    }
}
