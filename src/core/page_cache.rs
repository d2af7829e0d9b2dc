//! Whether the kernel's page cache keeps the bytes of a handle the daemon serves.
//!
//! Filling the page cache is not free: on the VMs this was measured on, every new page
//! costs a fault in the host, and a cold 1 GiB read through it took twice the daemon's
//! CPU of the same read past it (write-through, 357 against 522 MiB/s). So bytes that will
//! be read once go past it, and bytes that are read again stay in it.

use std::sync::atomic::{AtomicBool, Ordering};

/// The kernel's page cache for a handle the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCache {
    /// Kept across opens: every change the kernel did not make itself (another tool's
    /// version, a failed check) is invalidated explicitly.
    Keep,
    /// Not used (direct I/O): the bytes go between the daemon and the caller's buffer.
    Bypass,
}

/// Write-through files this large are streamed past the page cache at their first
/// read-only open: a restore or a copy reads them once, and keeping them would push out
/// what the host reads again. Smaller files are cheap to keep and often read again.
pub const STREAM_ONCE_MIN_BYTES: u64 = 64 << 20;
/// Files remembered as read once; one forgotten is streamed past the page cache again.
const REMEMBERED_FILES: u64 = 65_536;

/// The mount's page-cache choices.
pub struct PageCachePolicy {
    /// The kernel allows mmap of direct I/O handles (FUSE 7.39, Linux 6.6+); without it
    /// every handle keeps the page cache, or `mmap` would fail with `ENODEV`.
    direct_io_mmap: AtomicBool,
    /// Large write-through files already streamed once: their next opens keep the page
    /// cache, so a file that is read again is served by the kernel from then on.
    streamed_once: moka::sync::Cache<u64, ()>,
}

impl Default for PageCachePolicy {
    fn default() -> Self {
        PageCachePolicy {
            direct_io_mmap: AtomicBool::new(false),
            streamed_once: moka::sync::Cache::new(REMEMBERED_FILES),
        }
    }
}

impl PageCachePolicy {
    pub fn set_direct_io_mmap(&self, allowed: bool) {
        self.direct_io_mmap.store(allowed, Ordering::Relaxed);
    }

    fn bypass_allowed(&self) -> bool {
        self.direct_io_mmap.load(Ordering::Relaxed)
    }

    /// Cached and sync modes, a handle the daemon serves: where the kernel serves complete
    /// files itself (passthrough), the cache file's page cache is the one copy, and a file
    /// read cold is found warm by its next (passthrough) open.
    pub fn cached_mode(&self, passthrough: bool) -> PageCache {
        if passthrough {
            PageCache::Bypass
        } else {
            PageCache::Keep
        }
    }

    /// A write-through writer of a new or truncated file: its bytes go to the upload, and a
    /// page-cache copy of them slowed the writer and doubled the daemon's CPU (1 GiB
    /// written: 97 against 110 MiB/s, daemon CPU 1.8-2.5 s against 1.1-1.2 s).
    pub fn streamed_writer(&self) -> PageCache {
        if self.bypass_allowed() {
            PageCache::Bypass
        } else {
            PageCache::Keep
        }
    }

    /// A write-through handle of an existing file. Only a read-only open of a large file
    /// that no other handle has open, and that this mount has not streamed before, goes
    /// past the page cache; the file is remembered, so its next open keeps it.
    pub fn streamed_reader(
        &self,
        ino: u64,
        size: u64,
        writes: bool,
        open_elsewhere: bool,
    ) -> PageCache {
        // A writer's or another handle's pages may be newer than the bucket's bytes.
        if writes || open_elsewhere || size < STREAM_ONCE_MIN_BYTES || !self.bypass_allowed() {
            return PageCache::Keep;
        }
        if self.streamed_once.entry(ino).or_insert(()).is_fresh() {
            PageCache::Bypass
        } else {
            PageCache::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PageCachePolicy {
        let policy = PageCachePolicy::default();
        policy.set_direct_io_mmap(true);
        policy
    }

    #[test]
    fn a_large_file_streams_past_the_page_cache_once_then_keeps_it() {
        let policy = policy();
        let big = STREAM_ONCE_MIN_BYTES;
        assert_eq!(
            policy.streamed_reader(7, big, false, false),
            PageCache::Bypass
        );
        assert_eq!(
            policy.streamed_reader(7, big, false, false),
            PageCache::Keep
        );
        assert_eq!(
            policy.streamed_reader(8, big, false, false),
            PageCache::Bypass
        );
    }

    #[test]
    fn small_files_writers_and_shared_files_keep_the_page_cache() {
        let policy = policy();
        let big = STREAM_ONCE_MIN_BYTES;
        assert_eq!(
            policy.streamed_reader(1, big - 1, false, false),
            PageCache::Keep
        );
        assert_eq!(policy.streamed_reader(2, big, true, false), PageCache::Keep);
        assert_eq!(policy.streamed_reader(3, big, false, true), PageCache::Keep);
        // None of those counted as the file's streamed read.
        assert_eq!(
            policy.streamed_reader(2, big, false, false),
            PageCache::Bypass
        );
        assert_eq!(
            policy.streamed_reader(3, big, false, false),
            PageCache::Bypass
        );
    }

    #[test]
    fn without_mmap_of_direct_io_every_handle_keeps_the_page_cache() {
        let policy = PageCachePolicy::default();
        assert_eq!(policy.streamed_writer(), PageCache::Keep);
        assert_eq!(
            policy.streamed_reader(1, u64::MAX, false, false),
            PageCache::Keep
        );
        policy.set_direct_io_mmap(true);
        assert_eq!(policy.streamed_writer(), PageCache::Bypass);
    }
}
