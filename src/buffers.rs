//! Reused buffers for the data path: a read's reply and a download's block.
//!
//! Each was a fresh allocation of up to a MiB, which the allocator maps, the first write
//! faults in page by page (zeroed by the kernel), and the free unmaps again. For a cold
//! read of 1 GiB in cached mode that cost more of the daemon's CPU than the copies into
//! the buffers did (perf: `exc_page_fault`, `clear_page_erms` under the cache file's
//! `pread`, and `munmap`). Buffers handed back are kept, up to a bound, and reused.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Size of a pooled buffer: the largest FUSE read, and one cache block.
pub const POOLED_SIZE: usize = 1 << 20;
/// Buffers kept for reuse at the most (each [`POOLED_SIZE`]): enough for the reads and
/// downloads in flight at once; more at once allocate and free as before.
const MAX_KEPT: usize = 32;

/// The storage kept for reuse.
struct Pool {
    kept: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            kept: Mutex::new(Vec::new()),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&'static self, len: usize) -> Buffer {
        if len > POOLED_SIZE {
            return Buffer::from(vec![0; len]);
        }
        let storage = self.kept().pop().unwrap_or_else(|| vec![0; POOLED_SIZE]);
        Buffer {
            storage,
            len,
            pool: Some(self),
        }
    }

    fn give_back(&self, storage: Vec<u8>) {
        let mut kept = self.kept();
        if kept.len() < MAX_KEPT {
            kept.push(storage);
        }
    }
}

static POOL: Pool = Pool::new();

/// A byte buffer of a given length whose storage goes back to the pool when dropped.
/// Its bytes are unspecified (left over from an earlier use) until written: whoever
/// takes one fills all of it, or truncates it to what it filled.
pub struct Buffer {
    storage: Vec<u8>,
    len: usize,
    /// Where the storage goes back to; `None` for a plain allocation.
    pool: Option<&'static Pool>,
}

impl Buffer {
    /// A buffer of `len` bytes: pooled storage when `len` fits, else a plain allocation.
    pub fn take(len: usize) -> Buffer {
        POOL.take(len)
    }

    /// An empty buffer: `take(0)` without touching the pool.
    pub fn empty() -> Buffer {
        Buffer::from(Vec::new())
    }

    /// Shortens the buffer to its first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(storage: Vec<u8>) -> Buffer {
        let len = storage.len();
        Buffer {
            storage,
            len,
            pool: None,
        }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[..self.len]
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.len)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            pool.give_back(std::mem::take(&mut self.storage));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_storage_is_reused_up_to_the_bound() {
        static TEST_POOL: Pool = Pool::new();
        let mut first = TEST_POOL.take(4096);
        assert_eq!(first.len(), 4096);
        first.fill(7);
        let address = first.storage.as_ptr();
        drop(first);
        assert_eq!(TEST_POOL.kept().len(), 1);
        let again = TEST_POOL.take(100);
        assert_eq!(again.len(), 100);
        assert_eq!(
            again.storage.as_ptr(),
            address,
            "the kept storage is handed out"
        );
        assert_eq!(TEST_POOL.kept().len(), 0);
        drop(again);
        let many: Vec<Buffer> = (0..MAX_KEPT + 3).map(|_| TEST_POOL.take(1)).collect();
        drop(many);
        assert_eq!(TEST_POOL.kept().len(), MAX_KEPT);
    }

    #[test]
    fn a_buffer_larger_than_pooled_is_a_plain_allocation() {
        static TEST_POOL: Pool = Pool::new();
        let big = TEST_POOL.take(POOLED_SIZE + 1);
        assert_eq!(big.len(), POOLED_SIZE + 1);
        assert!(big.pool.is_none());
        drop(big);
        assert_eq!(TEST_POOL.kept().len(), 0);
    }

    #[test]
    fn truncate_only_shortens() {
        let mut buffer = Buffer::from(vec![1, 2, 3, 4]);
        buffer.truncate(20);
        assert_eq!(&*buffer, &[1, 2, 3, 4]);
        buffer.truncate(3);
        assert_eq!(&*buffer, &[1, 2, 3]);
        assert_eq!(Buffer::empty().len(), 0);
    }
}
