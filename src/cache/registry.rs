//! Which cache files are loaded (a descriptor and their state in memory) and which keep
//! their bytes on disk unloaded, with their presence map in the metadata store.
//!
//! Unloaded files hold no descriptor: a mount that wrote or read a million files keeps
//! only the files in use loaded, and still evicts the others, least recently used first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{CacheFile, FileState};

/// A cache file with a saved presence map (from the metadata store at startup).
#[derive(Debug, Clone, Copy)]
pub struct SavedFile {
    pub ino: u64,
    /// Bytes its presence map says are on disk.
    pub bytes: u64,
    /// The bucket holds its data (it may be evicted).
    pub clean: bool,
}

/// A file whose bytes stay on disk while it is not loaded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unloaded {
    pub bytes: u64,
    pub last_access: Instant,
    pub clean: bool,
}

impl Unloaded {
    /// A clean file about to be unloaded.
    pub fn of(state: &FileState) -> Unloaded {
        Unloaded {
            bytes: state.present_bytes(),
            last_access: state.last_access,
            clean: true,
        }
    }
}

pub(super) struct Registry {
    pub loaded: HashMap<u64, Arc<CacheFile>>,
    unloaded: HashMap<u64, Unloaded>,
    unloaded_bytes: u64,
}

impl Registry {
    /// The files a previous session left on disk count as least recently used.
    pub fn new(saved: Vec<SavedFile>) -> Registry {
        let mut registry = Registry {
            loaded: HashMap::new(),
            unloaded: HashMap::with_capacity(saved.len()),
            unloaded_bytes: 0,
        };
        let started = Instant::now();
        for file in saved {
            registry.put_unloaded(
                file.ino,
                Unloaded {
                    bytes: file.bytes,
                    last_access: started,
                    clean: file.clean,
                },
            );
        }
        registry
    }

    pub fn put_unloaded(&mut self, ino: u64, entry: Unloaded) {
        if let Some(old) = self.unloaded.insert(ino, entry) {
            self.unloaded_bytes -= old.bytes;
        }
        self.unloaded_bytes += entry.bytes;
    }

    /// The file is loaded again, or goes.
    pub fn take_unloaded(&mut self, ino: u64) -> Option<Unloaded> {
        let entry = self.unloaded.remove(&ino)?;
        self.unloaded_bytes -= entry.bytes;
        Some(entry)
    }

    pub fn unloaded_bytes(&self) -> u64 {
        self.unloaded_bytes
    }

    /// Unloaded files the bucket holds: (last access, inode, bytes).
    pub fn evictable_unloaded(&self) -> impl Iterator<Item = (Instant, u64, u64)> + '_ {
        self.unloaded
            .iter()
            .filter(|(_, entry)| entry.clean)
            .map(|(ino, entry)| (entry.last_access, *ino, entry.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unloaded_bytes_follow_every_entry_in_and_out() {
        let mut registry = Registry::new(vec![
            SavedFile {
                ino: 1,
                bytes: 10,
                clean: true,
            },
            SavedFile {
                ino: 2,
                bytes: 5,
                clean: false,
            },
        ]);
        assert_eq!(registry.unloaded_bytes(), 15);
        let evictable: Vec<u64> = registry
            .evictable_unloaded()
            .map(|(_, ino, _)| ino)
            .collect();
        assert_eq!(evictable, vec![1], "a file with changes is never evictable");
        registry.put_unloaded(
            1,
            Unloaded {
                bytes: 3,
                last_access: Instant::now(),
                clean: true,
            },
        );
        assert_eq!(registry.unloaded_bytes(), 8, "a replaced entry counts once");
        assert_eq!(registry.take_unloaded(2).map(|e| e.bytes), Some(5));
        assert!(registry.take_unloaded(2).is_none());
        assert_eq!(registry.unloaded_bytes(), 3);
    }
}
