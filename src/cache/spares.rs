//! Empty cache files kept for reuse. A stream of small files created and unlinked one
//! inode each, and ext4's inode allocator skips recently freed inodes by scanning for
//! them (`recently_deleted` and `find_get_block_common` were 8 % of the daemon's samples
//! writing 16 KiB files in write-through mode). Renaming a kept empty file into place
//! allocates nothing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{FsError, FsResult};

/// Spares kept at most: enough for the files that come and go at once.
const KEPT: usize = 32;

pub struct SpareFiles {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next_name: AtomicU64,
}

impl SpareFiles {
    /// Spares live in `dir`; what an earlier run left there is removed (a spare is empty,
    /// so nothing of value is lost, and none is half-moved across a restart).
    pub fn open(dir: PathBuf) -> FsResult<SpareFiles> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(FsError::io(&format!("emptying {}", dir.display()), err)),
        }
        std::fs::create_dir_all(&dir)
            .map_err(|err| FsError::io(&format!("creating {}", dir.display()), err))?;
        Ok(SpareFiles {
            dir,
            free: Mutex::new(Vec::new()),
            next_name: AtomicU64::new(0),
        })
    }

    fn free(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves an empty spare to `path`, replacing what is there. `false` when none is kept
    /// or the move failed: the caller creates the file.
    pub fn take_to(&self, path: &Path) -> bool {
        let Some(spare) = self.free().pop() else {
            return false;
        };
        match std::fs::rename(&spare, path) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(spare = %spare.display(), error = %err, "spare cache file not reusable");
                false
            }
        }
    }

    /// Empties `file` (open at `path`) and keeps it as a spare. `false` when enough are
    /// kept or it could not be moved: the caller deletes it.
    pub fn keep(&self, file: &File, path: &Path) -> bool {
        if self.free().len() >= KEPT {
            return false;
        }
        // Truncated through the descriptor the caller closes next: on ext4 a truncate to
        // 0 arms auto_da_alloc, which that close disarms with nothing to write back.
        if let Err(err) = file.set_len(0) {
            tracing::debug!(path = %path.display(), error = %err, "could not empty a cache file for reuse");
            return false;
        }
        let spare = self
            .dir
            .join(self.next_name.fetch_add(1, Ordering::Relaxed).to_string());
        match std::fs::rename(path, &spare) {
            Ok(()) => {
                self.free().push(spare);
                true
            }
            Err(err) => {
                tracing::debug!(path = %path.display(), error = %err, "could not keep a cache file for reuse");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_kept_file_comes_back_empty_at_its_new_path() {
        let root = tempfile::tempdir().expect("tempdir");
        let spares = SpareFiles::open(root.path().join("spare")).expect("open");
        let old = root.path().join("7");
        let mut file = File::create(&old).expect("create");
        file.write_all(b"bytes of a discarded file").expect("write");
        assert!(spares.keep(&file, &old));
        drop(file);
        assert!(!old.exists());
        let new = root.path().join("8");
        assert!(spares.take_to(&new));
        assert_eq!(std::fs::metadata(&new).expect("stat").len(), 0);
        assert!(!spares.take_to(&root.path().join("9")), "only one was kept");
    }

    #[test]
    fn at_most_kept_files_are_held_and_a_restart_drops_them() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("spare");
        let spares = SpareFiles::open(dir.clone()).expect("open");
        let mut kept = 0;
        for i in 0..KEPT + 3 {
            let path = root.path().join(i.to_string());
            let file = File::create(&path).expect("create");
            if spares.keep(&file, &path) {
                kept += 1;
            } else {
                assert!(
                    path.exists(),
                    "a file not kept stays for the caller to delete"
                );
            }
        }
        assert_eq!(kept, KEPT);
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), KEPT);
        drop(spares);
        SpareFiles::open(dir.clone()).expect("reopen");
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 0);
    }
}
