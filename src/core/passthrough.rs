//! FUSE passthrough bookkeeping: which handles the kernel serves from the cache file
//! itself, with no round trip through the daemon.
//!
//! The kernel refuses (EIO) to have one inode open both ways at once, so every handle of
//! an inode takes the kind of the handles already open; only the first decides, from
//! whether the file is complete in the cache and, for writers, whether the cache has
//! room. Kernel writes are unseen: a writer marks the file changed when it opens, and its
//! writes are taken in (size, presence, a new generation) at flush, fsync and release.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock;

/// Room a passthrough writer needs when it opens, on the cache disk and under
/// `--cache-size`: its writes bypass the daemon's back-pressure, so they are only allowed
/// where they cannot crowd out the metadata store or unsent data.
pub const KERNEL_WRITE_HEADROOM: u64 = 1 << 30;

/// Open handles of one inode, by who does their I/O.
#[derive(Debug, Default, Clone, Copy)]
struct InodeIo {
    kernel: u32,
    daemon: u32,
}

/// Which handles are served by the kernel, per inode; and whether passthrough is on.
pub struct KernelIo {
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Handles the kernel served since the mount (`status`).
    served: AtomicU64,
}

/// What the first handle of an inode is decided on.
pub struct Eligibility {
    /// Every byte of the file is valid in the cache.
    pub complete: bool,
    /// The handle may write.
    pub write: bool,
    /// The cache has [`KERNEL_WRITE_HEADROOM`] free for unseen writes.
    pub room_for_writes: bool,
}

impl KernelIo {
    pub fn new(enabled: bool) -> KernelIo {
        KernelIo {
            enabled: AtomicBool::new(enabled),
            inodes: Mutex::new(HashMap::new()),
            served: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The kernel or the mount cannot do passthrough: every later handle goes through the
    /// daemon (handles open already keep their kind).
    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::info!(
                why,
                "FUSE passthrough off; reads and writes go through the daemon"
            );
        }
    }

    /// Counts a new handle of `ino` and says whether the kernel serves it.
    pub fn open(&self, ino: u64, eligible: Eligibility) -> bool {
        let mut inodes = lock(&self.inodes);
        let io = inodes.entry(ino).or_default();
        let kernel = if io.kernel > 0 {
            true
        } else if io.daemon > 0 || !self.enabled() {
            false
        } else {
            eligible.complete && (!eligible.write || eligible.room_for_writes)
        };
        if kernel {
            io.kernel += 1;
            self.served.fetch_add(1, Ordering::Relaxed);
        } else {
            io.daemon += 1;
        }
        kernel
    }

    /// A handle counted as served by the kernel turned out not to be (the kernel refused
    /// its backing file): it counts as a daemon handle now.
    pub fn demote(&self, ino: u64) {
        let mut inodes = lock(&self.inodes);
        let io = inodes.entry(ino).or_default();
        io.kernel = io.kernel.saturating_sub(1);
        io.daemon += 1;
        self.served.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles the kernel served since the mount.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// A handle of `ino` was released.
    pub fn close(&self, ino: u64, kernel: bool) {
        let mut inodes = lock(&self.inodes);
        let Some(io) = inodes.get_mut(&ino) else {
            return;
        };
        if kernel {
            io.kernel = io.kernel.saturating_sub(1);
        } else {
            io.daemon = io.daemon.saturating_sub(1);
        }
        if io.kernel == 0 && io.daemon == 0 {
            inodes.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eligible(complete: bool, write: bool, room: bool) -> Eligibility {
        Eligibility {
            complete,
            write,
            room_for_writes: room,
        }
    }

    #[test]
    fn the_first_handle_decides_and_later_ones_follow() {
        let io = KernelIo::new(true);
        assert!(io.open(1, eligible(true, false, false)));
        // Incomplete or short of room: still the kernel's, as the kernel requires.
        assert!(io.open(1, eligible(false, true, false)));
        io.close(1, true);
        io.close(1, true);
        assert!(!io.open(1, eligible(false, false, true)));
        assert!(
            !io.open(1, eligible(true, false, true)),
            "a daemon handle is open"
        );
        io.close(1, false);
        io.close(1, false);
        assert!(io.open(1, eligible(true, true, true)));
    }

    #[test]
    fn writers_need_room_and_disabled_means_never() {
        let io = KernelIo::new(true);
        assert!(!io.open(2, eligible(true, true, false)));
        io.close(2, false);
        io.disable("test");
        assert!(!io.open(3, eligible(true, false, true)));
    }

    #[test]
    fn a_demoted_handle_counts_as_the_daemons() {
        let io = KernelIo::new(true);
        assert!(io.open(4, eligible(true, false, true)));
        io.demote(4);
        assert!(!io.open(4, eligible(true, false, true)));
    }
}
