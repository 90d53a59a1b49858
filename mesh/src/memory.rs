//! Giving freed heap memory back to the kernel once load drops. glibc's malloc keeps what is
//! freed in its arenas (one per thread that allocates) and returns pages on its own only from
//! the top of the main heap: after a burst of connections a proxy's RSS stayed near its peak
//! (2000 connections: 12 → 41 MiB, still 40.6 MiB afterwards). A periodic `malloc_trim`
//! releases the free pages inside every arena, and runs only when there is enough free to be
//! worth the arena walk.

use std::time::Duration;

use tracing::debug;

/// How often the free heap is looked at.
pub const TRIM_PERIOD: Duration = Duration::from_secs(5);
/// Free bytes held by the allocator above which a trim runs.
pub const TRIM_THRESHOLD: usize = 1024 * 1024;

/// Bytes the allocator holds free (glibc's `fordblks`), if it can tell.
pub fn free_heap_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Return free heap pages to the kernel; true if any were.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the arenas' locks itself; 0 keeps no extra padding.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Trim every `period` while the allocator holds more than `threshold` free, on a blocking
/// thread (the arena walk takes a few milliseconds on a large heap). Runs until the runtime
/// stops; does nothing where the allocator is not glibc's.
pub async fn trim_periodically(period: Duration, threshold: usize) {
    if free_heap_bytes().is_none() {
        return;
    }
    // The trimming is done here, off the request path: `free` itself must not give pages back
    // (a read buffer freed and taken again per burst would otherwise cost a `brk` each time
    // the top of the heap crossed glibc's default 128 KiB threshold).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024 * 1024);
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        trim_if_worth_it(threshold).await;
    }
}

/// Trim on a blocking thread if the allocator holds at least `threshold` free.
async fn trim_if_worth_it(threshold: usize) {
    let Some(free) = free_heap_bytes() else {
        return;
    };
    if free < threshold {
        return;
    }
    match tokio::task::spawn_blocking(trim).await {
        Ok(released) => debug!(free, released, "heap trimmed"),
        Err(e) => debug!("heap trim did not run: {e}"),
    }
}

/// Trim once `quiet` has passed since the last of a burst of `notify` signals, if the
/// allocator then holds more than `threshold` free. For a server whose large transient
/// allocations come in bursts it can name (pilot's first full pushes: megabytes of encoded
/// responses per connection, all freed once sent), so that the memory goes back when the burst
/// ends rather than at the next periodic look. Runs until the runtime stops.
pub async fn trim_after_bursts(
    notify: std::sync::Arc<tokio::sync::Notify>,
    quiet: Duration,
    threshold: usize,
) {
    if free_heap_bytes().is_none() {
        return;
    }
    loop {
        notify.notified().await;
        // Wait until the burst has been quiet for `quiet`.
        while tokio::time::timeout(quiet, notify.notified()).await.is_ok() {}
        trim_if_worth_it(threshold).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory freed in the middle of the heap goes back to the kernel after a trim.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trim_returns_freed_memory() {
        let rss = || -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        };
        // Many small blocks (below the mmap threshold, so they live in the heap), touched;
        // then all but the last freed, so the top of the heap stays in use and glibc cannot
        // shrink it on its own.
        let mut blocks: Vec<Vec<u8>> = (0..4000).map(|_| vec![1u8; 16 * 1024]).collect();
        let keep = blocks.pop();
        drop(blocks);
        assert!(free_heap_bytes().unwrap() >= 60 * 1024 * 1024);
        let before = rss();
        trim();
        let after = rss();
        drop(keep);
        // Half of what was freed, leaving room for other tests allocating meanwhile.
        assert!(
            after + 32 * 1024 * 1024 <= before,
            "RSS {before} before the trim, {after} after"
        );
    }
}
