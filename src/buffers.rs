//! Reused buffers for the data path: a read's reply, a write's bytes, a download's block,
//! a write-through reader's part, an upload's part.
//!
//! Each was a fresh allocation of one to several MiB, which the allocator maps, the first
//! write faults in page by page (zeroed by the kernel), and the free unmaps again. For a
//! cold read of 1 GiB in cached mode that cost more of the daemon's CPU than the copies
//! into the buffers did (perf: `exc_page_fault`, `clear_page_erms` under the cache file's
//! `pread`, and `munmap`); for a write-through write of 1 GiB, page faults were a third of
//! the daemon's samples. Storage handed back is kept, up to a bound, and reused.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Storage of at least this size is pooled; smaller buffers are cheap to allocate.
const POOLED_MIN: usize = 64 << 10;
/// Storage larger than this is never kept (a rare huge part).
const KEPT_MAX_ONE: usize = 64 << 20;
/// Bytes of storage kept for reuse at the most: about what the reads, writes and uploads
/// in flight at once use (8 upload parts of 8 MiB), so keeping it adds little to the peak.
const KEPT_MAX_BYTES: usize = 64 << 20;

/// The storage kept for reuse.
struct Pool {
    kept: Mutex<Kept>,
}

struct Kept {
    storages: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            kept: Mutex::new(Kept {
                storages: Vec::new(),
                bytes: 0,
            }),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Kept storage with room for `capacity` bytes (at most twice that, so a small
    /// request does not pin a big one), or a new allocation.
    fn storage(&self, capacity: usize) -> Vec<u8> {
        if capacity >= POOLED_MIN {
            let mut kept = self.kept();
            let fits = |s: &Vec<u8>| s.capacity() >= capacity && s.capacity() <= 2 * capacity;
            if let Some(at) = kept.storages.iter().position(fits) {
                let storage = kept.storages.swap_remove(at);
                kept.bytes -= storage.capacity();
                return storage;
            }
        }
        Vec::with_capacity(capacity)
    }

    fn give_back(&self, storage: Vec<u8>) {
        let size = storage.capacity();
        if !(POOLED_MIN..=KEPT_MAX_ONE).contains(&size) {
            return;
        }
        let mut kept = self.kept();
        if kept.bytes + size <= KEPT_MAX_BYTES {
            kept.bytes += size;
            kept.storages.push(storage);
        }
    }

    fn take(&'static self, len: usize) -> Buffer {
        let mut storage = self.storage(len);
        // Only bytes never initialized are zeroed here; kept storage keeps its old bytes.
        if storage.len() < len {
            storage.resize(len, 0);
        }
        Buffer {
            storage,
            len,
            pool: Some(self),
        }
    }
}

static POOL: Pool = Pool::new();

/// Empty storage with room for `capacity` bytes, from the pool when it has some; give it
/// back with [`give_back`] or hand it on as a [`Buffer`].
pub fn vec_with_capacity(capacity: usize) -> Vec<u8> {
    let mut storage = POOL.storage(capacity);
    storage.clear();
    storage
}

/// Returns storage to the pool (kept if it is within the bounds).
pub fn give_back(storage: Vec<u8>) {
    POOL.give_back(storage);
}

/// A byte buffer of a given length whose storage goes back to the pool when dropped.
/// Its bytes are unspecified (left over from an earlier use) until written: whoever
/// takes one fills all of it, or truncates it to what it filled.
pub struct Buffer {
    storage: Vec<u8>,
    len: usize,
    /// Where the storage goes back to; `None` for storage that is not pooled.
    pool: Option<&'static Pool>,
}

impl Buffer {
    /// A buffer of `len` bytes, on pooled storage.
    pub fn take(len: usize) -> Buffer {
        POOL.take(len)
    }

    /// An empty buffer, touching no pool.
    pub fn empty() -> Buffer {
        Buffer {
            storage: Vec::new(),
            len: 0,
            pool: None,
        }
    }

    /// Bytes copied into a pooled buffer.
    pub fn copy_of(data: &[u8]) -> Buffer {
        let mut buffer = Buffer::take(data.len());
        buffer.copy_from_slice(data);
        buffer
    }

    /// Shortens the buffer to its first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl From<Vec<u8>> for Buffer {
    /// The vector's bytes; its storage joins the pool when the buffer is dropped.
    fn from(storage: Vec<u8>) -> Buffer {
        let len = storage.len();
        Buffer {
            storage,
            len,
            pool: Some(&POOL),
        }
    }
}

impl From<Buffer> for bytes::Bytes {
    /// Without a copy: the storage goes back to the pool when the last `Bytes` of it is
    /// dropped (an upload's part, once sent).
    fn from(buffer: Buffer) -> bytes::Bytes {
        bytes::Bytes::from_owner(buffer)
    }
}

impl From<Buffer> for opendal::Buffer {
    fn from(buffer: Buffer) -> opendal::Buffer {
        opendal::Buffer::from(bytes::Bytes::from(buffer))
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
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

    const MIB: usize = 1 << 20;

    #[test]
    fn returned_storage_is_reused_for_a_request_it_fits() {
        static TEST_POOL: Pool = Pool::new();
        let mut first = TEST_POOL.take(MIB);
        first.fill(7);
        let address = first.storage.as_ptr();
        drop(first);
        assert_eq!(TEST_POOL.kept().bytes, MIB);
        let again = TEST_POOL.take(MIB - 100);
        assert_eq!(again.len(), MIB - 100);
        assert_eq!(
            again.storage.as_ptr(),
            address,
            "the kept storage is handed out"
        );
        assert_eq!(TEST_POOL.kept().bytes, 0);
        drop(again);
        // Too big for a small request: a small one gets storage of its own.
        let small = TEST_POOL.take(POOLED_MIN);
        assert_ne!(small.storage.as_ptr(), address);
        assert_eq!(TEST_POOL.kept().bytes, MIB);
    }

    #[test]
    fn kept_storage_is_bounded() {
        static TEST_POOL: Pool = Pool::new();
        let many: Vec<Buffer> = (0..KEPT_MAX_BYTES / MIB + 5)
            .map(|_| TEST_POOL.take(MIB))
            .collect();
        drop(many);
        assert_eq!(TEST_POOL.kept().bytes, KEPT_MAX_BYTES);
        drop(TEST_POOL.take(KEPT_MAX_ONE + 1));
        drop(TEST_POOL.take(POOLED_MIN - 1));
        assert_eq!(TEST_POOL.kept().bytes, KEPT_MAX_BYTES);
    }

    #[test]
    fn bytes_made_of_a_buffer_give_its_storage_back_when_dropped() {
        static TEST_POOL: Pool = Pool::new();
        let mut buffer = TEST_POOL.take(3 * MIB + 5);
        buffer[..3].copy_from_slice(b"abc");
        buffer.truncate(3);
        let bytes = bytes::Bytes::from(buffer);
        assert_eq!(&bytes[..], b"abc");
        let address = bytes.as_ptr();
        let kept_with = |a| TEST_POOL.kept().storages.iter().any(|s| s.as_ptr() == a);
        assert!(!kept_with(address));
        drop(bytes);
        assert!(kept_with(address), "storage back in the pool");
    }

    #[test]
    fn truncate_only_shortens() {
        let mut buffer = Buffer::from(vec![1, 2, 3, 4]);
        buffer.truncate(20);
        assert_eq!(&*buffer, &[1, 2, 3, 4]);
        buffer.truncate(3);
        assert_eq!(&*buffer, &[1, 2, 3]);
        assert_eq!(Buffer::empty().len(), 0);
        assert_eq!(&*Buffer::copy_of(b"xy"), b"xy");
    }
}
