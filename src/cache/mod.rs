//! The disk data cache: one sparse file per inode, block presence, capacity and eviction.
//!
//! A byte of a cached file is valid when its block is present, or when it lies at or past
//! the file's `fetch_limit` (beyond what the bucket holds for it: zeros or local writes).

pub mod blocks;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use blocks::BlockSet;

use crate::backend::Backend;
use crate::error::{FsError, FsResult};
use crate::integrity::ReadVerifier;

/// Cache granularity: what one ranged GET fills at the least.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// Space on the cache disk that data never takes (a tenth of the disk, within bounds).
const METADATA_RESERVE_MIN: u64 = 1 << 20;
const METADATA_RESERVE_MAX: u64 = 256 << 20;

/// Mutable state of one cached file; one owner, behind one lock.
#[derive(Debug)]
pub struct FileState {
    pub blocks: BlockSet,
    /// Bytes at or past this offset are never fetched from the bucket.
    pub fetch_limit: u64,
    /// Logical size as the writers see it.
    pub size: u64,
    /// Bumped on every change; an upload that started at another value must run again.
    pub gen: u64,
    /// Changes not yet in the bucket.
    pub dirty: bool,
    /// The key missing blocks are fetched from.
    pub source_key: Option<String>,
    pub last_access: Instant,
    /// Open file handles on this inode.
    pub open_handles: u32,
    /// `gen` when the state was last made durable and journaled.
    pub persisted_gen: u64,
    /// Checks fetched bytes against the object's stored crc64.
    pub verifier: Option<ReadVerifier>,
    /// Set when the object failed its check: reads fail until the content is replaced.
    pub corrupt: Option<String>,
    /// Bumped when another tool's version of the object replaces the cached one, so a
    /// download that started before does not store the old version's bytes.
    pub source_epoch: u64,
}

impl FileState {
    fn check_not_corrupt(&self) -> FsResult<()> {
        match &self.corrupt {
            Some(message) => Err(FsError::new(libc::EIO, message.clone())),
            None => Ok(()),
        }
    }
}

/// How to initialise a cached file that is not loaded yet.
#[derive(Debug, Clone)]
pub struct FileInit {
    pub size: u64,
    pub fetch_limit: u64,
    pub source_key: Option<String>,
    pub dirty: bool,
    pub saved_blocks: Option<Vec<u8>>,
    pub verifier: Option<ReadVerifier>,
}

pub struct CacheFile {
    pub ino: u64,
    file: File,
    path: PathBuf,
    state: Mutex<FileState>,
    /// One download at a time per file, so parallel readers do not fetch a block twice.
    fetch_lock: tokio::sync::Mutex<()>,
}

/// What a local write needs first.
pub enum WriteOutcome {
    Written,
    /// These block runs must be fetched before the write can land.
    NeedFetch(Vec<Range<u64>>),
}

fn block_of(offset: u64) -> u64 {
    offset / BLOCK_SIZE
}

fn blocks_covering(range: &Range<u64>) -> Range<u64> {
    if range.start >= range.end {
        return 0..0;
    }
    block_of(range.start)..block_of(range.end - 1) + 1
}

impl CacheFile {
    pub fn lock(&self) -> MutexGuard<'_, FileState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Block runs in `range` that must come from the bucket.
    fn missing(state: &FileState, range: Range<u64>) -> Vec<Range<u64>> {
        let end = range.end.min(state.fetch_limit);
        if range.start >= end {
            return Vec::new();
        }
        state
            .blocks
            .missing_runs(blocks_covering(&(range.start..end)))
    }

    /// Reads locally if every needed byte is valid; `Ok(None)` means fetch first.
    pub fn read_local(&self, offset: u64, len: u64) -> FsResult<Option<Vec<u8>>> {
        let mut state = self.lock();
        state.check_not_corrupt()?;
        let end = offset.saturating_add(len).min(state.size);
        if offset >= end {
            return Ok(Some(Vec::new()));
        }
        if !Self::missing(&state, offset..end).is_empty() {
            return Ok(None);
        }
        state.last_access = Instant::now();
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut buf, offset).or_else(|err| {
            // A sparse tail past the file's physical end reads as zeros.
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                let got = self.file.read_at(&mut buf, offset).unwrap_or(0);
                buf[got..].fill(0);
                Ok(())
            } else {
                Err(FsError::io("reading cache file", err))
            }
        })?;
        Ok(Some(buf))
    }

    /// The block runs a read of `range` would fetch, widened by `read_ahead` bytes.
    pub fn missing_for_read(&self, range: Range<u64>, read_ahead: u64) -> Vec<Range<u64>> {
        let state = self.lock();
        let end = range
            .end
            .saturating_add(read_ahead)
            .min(state.size.max(range.end));
        Self::missing(&state, range.start..end)
    }

    /// Every block run still needed for the whole file (before an upload).
    pub fn missing_all(&self) -> Vec<Range<u64>> {
        let state = self.lock();
        Self::missing(&state, 0..state.size)
    }

    /// Downloads block runs from the bucket into the file. Blocks written locally in the
    /// meantime are left alone.
    pub async fn fetch(&self, backend: &Backend, runs: Vec<Range<u64>>) -> FsResult<()> {
        let _one_at_a_time = self.fetch_lock.lock().await;
        for run in runs {
            let (key, limit, still_missing, epoch) = {
                let state = self.lock();
                state.check_not_corrupt()?;
                (
                    state.source_key.clone(),
                    state.fetch_limit,
                    !state.blocks.missing_runs(run.clone()).is_empty(),
                    state.source_epoch,
                )
            };
            if !still_missing {
                continue;
            }
            let Some(key) = key else {
                return Err(FsError::loud(
                    libc::EIO,
                    format!(
                        "inode {}: data missing and no object to fetch it from",
                        self.ino
                    ),
                ));
            };
            let start = run.start * BLOCK_SIZE;
            let end = (run.end * BLOCK_SIZE).min(limit);
            if start >= end {
                continue;
            }
            let data = backend
                .read_range(&key, start..end)
                .await
                .map_err(|err| {
                    FsError::backend(&format!("fetching {key} bytes {start}..{end}"), err)
                })?
                .to_bytes();
            if (data.len() as u64) < end - start {
                return Err(FsError::loud(
                    libc::EIO,
                    format!("{key}: object is shorter than expected ({} bytes at {start}); it changed in the bucket", data.len()),
                ));
            }
            let mut state = self.lock();
            if state.source_epoch != epoch {
                continue; // the object was replaced meanwhile: these bytes are stale
            }
            Self::verify(&mut state, start, &data)?;
            for block in run {
                if state.blocks.contains(block) {
                    continue;
                }
                let from = block * BLOCK_SIZE;
                if from >= end {
                    break;
                }
                let to = ((block + 1) * BLOCK_SIZE).min(end);
                let slice = &data[(from - start) as usize..(to - start) as usize];
                self.file
                    .write_all_at(slice, from)
                    .map_err(|err| FsError::io("writing cache file", err))?;
                state.blocks.insert(block);
            }
        }
        Ok(())
    }

    /// Feeds fetched bytes to the crc64 check. On a mismatch nothing of the object stays
    /// servable: fetched blocks are dropped (unless local writes are mixed in) and every
    /// later read fails.
    fn verify(state: &mut FileState, start: u64, data: &[u8]) -> FsResult<()> {
        let Some(verifier) = state.verifier.as_mut() else {
            return Ok(());
        };
        if let Err(err) = verifier.feed(start, data) {
            state.verifier = None;
            state.corrupt = Some(err.message.clone());
            if !state.dirty {
                state.blocks.clear();
            }
            return Err(err);
        }
        Ok(())
    }

    /// Writes locally when the partly covered edge blocks are valid.
    pub fn write_local(&self, offset: u64, data: &[u8]) -> FsResult<WriteOutcome> {
        let end = offset + data.len() as u64;
        let mut state = self.lock();
        let touched = blocks_covering(&(offset..end));
        let mut need = Vec::new();
        for edge in [touched.start, touched.end.saturating_sub(1)] {
            let block_start = edge * BLOCK_SIZE;
            let fully_covered = offset <= block_start && end >= block_start + BLOCK_SIZE;
            let must_fetch = !fully_covered
                && !state.blocks.contains(edge)
                && block_start < state.fetch_limit.min(state.size);
            if must_fetch && need.last() != Some(&(edge..edge + 1)) {
                need.push(edge..edge + 1);
            }
        }
        if !need.is_empty() {
            return Ok(WriteOutcome::NeedFetch(need));
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|err| FsError::io("writing cache file", err))?;
        for block in touched {
            state.blocks.insert(block);
        }
        state.size = state.size.max(end);
        state.gen += 1;
        state.dirty = true;
        state.last_access = Instant::now();
        Ok(WriteOutcome::Written)
    }

    /// The block run a truncation to `size` needs valid first (the block it cuts into).
    pub fn missing_for_truncate(&self, size: u64) -> Vec<Range<u64>> {
        let state = self.lock();
        if size >= state.size || size.is_multiple_of(BLOCK_SIZE) {
            return Vec::new();
        }
        Self::missing(&state, size..size + 1)
    }

    /// Sets the size. Bytes cut off are never fetched again; growth reads as zeros.
    pub fn truncate(&self, size: u64) -> FsResult<()> {
        let mut state = self.lock();
        self.file
            .set_len(size)
            .map_err(|err| FsError::io("truncating cache file", err))?;
        state.blocks.truncate_from(size.div_ceil(BLOCK_SIZE));
        state.fetch_limit = state.fetch_limit.min(size);
        if state.fetch_limit == 0 {
            // Nothing of the object is used any more: its check no longer matters.
            state.corrupt = None;
            state.verifier = None;
        }
        state.size = size;
        state.gen += 1;
        state.dirty = true;
        Ok(())
    }

    /// Makes the file's bytes durable.
    pub fn sync_data(&self) -> FsResult<()> {
        self.file
            .sync_data()
            .map_err(|err| FsError::io("fsync of cache file", err))
    }

    /// Reads raw bytes for an upload (the caller made sure they are valid).
    pub fn read_for_upload(&self, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        // Bounded: each pass reads at least one byte or stops.
        while done < len {
            let got = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|err| FsError::io("reading cache file for upload", err))?;
            if got == 0 {
                break; // sparse tail: zeros
            }
            done += got;
        }
        Ok(buf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the bucket's data held locally.
    pub fn present_bytes(&self) -> u64 {
        self.lock().blocks.count() * BLOCK_SIZE
    }
}

/// The cache directory and the files loaded from it.
pub struct DataCache {
    dir: PathBuf,
    limit: u64,
    files: Mutex<HashMap<u64, Arc<CacheFile>>>,
    /// Present bytes of files not loaded in this session (from the saved bitmaps).
    unloaded_bytes: AtomicU64,
}

impl DataCache {
    pub fn open(dir: &Path, limit: u64, saved_bytes: u64) -> FsResult<DataCache> {
        std::fs::create_dir_all(dir)
            .map_err(|err| FsError::io(&format!("creating {}", dir.display()), err))?;
        Ok(DataCache {
            dir: dir.to_path_buf(),
            limit,
            files: Mutex::new(HashMap::new()),
            unloaded_bytes: AtomicU64::new(saved_bytes),
        })
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<u64, Arc<CacheFile>>> {
        self.files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn file_path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    pub fn loaded(&self, ino: u64) -> Option<Arc<CacheFile>> {
        self.registry().get(&ino).cloned()
    }

    /// The cached file of an inode, loading it with `init` if needed.
    pub fn get_or_load(
        &self,
        ino: u64,
        init: impl FnOnce() -> FsResult<FileInit>,
    ) -> FsResult<Arc<CacheFile>> {
        let mut files = self.registry();
        if let Some(file) = files.get(&ino) {
            return Ok(file.clone());
        }
        let init = init()?;
        let path = self.file_path(ino);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|err| FsError::io(&format!("opening cache file {}", path.display()), err))?;
        let blocks = match &init.saved_blocks {
            Some(bytes) => BlockSet::from_bytes(bytes),
            None => {
                // Without saved presence, nothing on disk is trusted.
                file.set_len(0)
                    .map_err(|err| FsError::io("resetting cache file", err))?;
                BlockSet::default()
            }
        };
        let saved = blocks.count() * BLOCK_SIZE;
        let _ = self
            .unloaded_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(saved))
            });
        file.set_len(init.size)
            .map_err(|err| FsError::io("sizing cache file", err))?;
        let cached = Arc::new(CacheFile {
            ino,
            file,
            path,
            state: Mutex::new(FileState {
                blocks,
                fetch_limit: init.fetch_limit,
                size: init.size,
                gen: 0,
                dirty: init.dirty,
                source_key: init.source_key,
                last_access: Instant::now(),
                open_handles: 0,
                persisted_gen: 0,
                verifier: init.verifier,
                corrupt: None,
                source_epoch: 0,
            }),
            fetch_lock: tokio::sync::Mutex::new(()),
        });
        files.insert(ino, cached.clone());
        Ok(cached)
    }

    /// Drops an inode's cached data; `forget` drops its saved block map under the
    /// registry's lock (see [`DataCache::evict_to`]).
    pub fn remove(&self, ino: u64, forget: &dyn Fn(u64) -> FsResult<()>) -> FsResult<()> {
        let mut files = self.registry();
        files.remove(&ino);
        self.delete_file(ino)?;
        forget(ino)
    }

    /// Drops `file` (the caller's reference included) when nobody else holds it and it has
    /// nothing unsent; otherwise leaves it for a later try. Returns whether it was dropped.
    /// Removing a file someone is still working on would strand their changes.
    pub fn discard_if_unused(
        &self,
        file: Arc<CacheFile>,
        forget: &dyn Fn(u64) -> FsResult<()>,
    ) -> FsResult<bool> {
        let mut files = self.registry();
        let registered = files.get(&file.ino).is_some_and(|f| Arc::ptr_eq(f, &file));
        let idle = {
            let state = file.lock();
            !state.dirty && state.open_handles == 0
        };
        // Two references: the registry's and the caller's.
        if !registered || !idle || Arc::strong_count(&file) > 2 {
            return Ok(false);
        }
        let ino = file.ino;
        drop(file);
        files.remove(&ino);
        // The map goes first: `forget` is a synced commit, which the records saying the
        // file is clean must reach before its data goes (see `sync::record_remote`).
        forget(ino)?;
        self.delete_file(ino)?;
        Ok(true)
    }

    /// Another version of an inode's object replaced the cached one: `record` (the
    /// metadata update) runs, and the cached bytes go, both under the registry's lock, so
    /// no load in between sees one without the other. A loaded file (perhaps open) is
    /// emptied in place and refetches from `init`. Refused (`false`, nothing done) when
    /// the file has local changes: those are never dropped. `record` returns the bytes
    /// of saved presence it forgot (of a file not loaded).
    pub fn invalidate(
        &self,
        ino: u64,
        init: FileInit,
        record: impl FnOnce() -> FsResult<u64>,
    ) -> FsResult<bool> {
        let files = self.registry();
        let Some(file) = files.get(&ino) else {
            let forgotten = record()?;
            self.delete_file(ino)?;
            self.forget_unloaded(forgotten);
            return Ok(true);
        };
        let mut state = file.lock();
        if state.dirty {
            return Ok(false);
        }
        record()?;
        file.file
            .set_len(0)
            .and_then(|()| file.file.set_len(init.size))
            .map_err(|err| FsError::io("emptying cache file", err))?;
        state.blocks.clear();
        state.size = init.size;
        state.fetch_limit = init.fetch_limit;
        state.source_key = init.source_key;
        state.verifier = init.verifier;
        state.corrupt = None;
        state.source_epoch += 1;
        Ok(true)
    }

    /// Closes an idle, clean file but keeps its bytes: `save` records its presence map
    /// first (under the registry's lock, so an invalidation cannot slip in between), and
    /// the next use loads it from there. Keeps files loaded in the background from
    /// holding a descriptor each. Returns whether it was unloaded.
    pub fn unload_if_idle(
        &self,
        file: Arc<CacheFile>,
        save: impl FnOnce(&FileState) -> FsResult<()>,
    ) -> FsResult<bool> {
        let mut files = self.registry();
        let registered = files.get(&file.ino).is_some_and(|f| Arc::ptr_eq(f, &file));
        // Two references: the registry's and the caller's.
        if !registered || Arc::strong_count(&file) > 2 {
            return Ok(false);
        }
        let present = {
            let state = file.lock();
            if state.dirty || state.open_handles > 0 || state.corrupt.is_some() {
                return Ok(false);
            }
            save(&state)?;
            state.blocks.count() * BLOCK_SIZE
        };
        files.remove(&file.ino);
        self.unloaded_bytes.fetch_add(present, Ordering::Relaxed);
        Ok(true)
    }

    /// Saved bytes of a file not loaded were dropped.
    fn forget_unloaded(&self, bytes: u64) {
        // The closure always returns Some: the update cannot fail.
        let _ = self
            .unloaded_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            });
    }

    /// Whether `file` is still the registered cache file of its inode.
    pub fn is_current(&self, file: &Arc<CacheFile>) -> bool {
        self.registry()
            .get(&file.ino)
            .is_some_and(|current| Arc::ptr_eq(current, file))
    }

    fn delete_file(&self, ino: u64) -> FsResult<()> {
        match std::fs::remove_file(self.file_path(ino)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(FsError::io("removing cache file", err)),
        }
    }

    /// Bytes of bucket data held in the cache.
    pub fn used_bytes(&self) -> u64 {
        let loaded: u64 = self.registry().values().map(|f| f.present_bytes()).sum();
        loaded + self.unloaded_bytes.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Free bytes on the cache's filesystem beyond what is kept back for the metadata
    /// store: with the disk full, the journal could not record uploads, and nothing would
    /// ever drain.
    pub fn room_on_disk(&self) -> FsResult<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.dir).map_err(|err| {
            FsError::io(&format!("statvfs of {}", self.dir.display()), err.into())
        })?;
        let fragment = stat.fragment_size() as u64;
        let total = stat.blocks() as u64 * fragment;
        let free = stat.blocks_available() as u64 * fragment;
        let reserve = (total / 10).clamp(METADATA_RESERVE_MIN, METADATA_RESERVE_MAX);
        Ok(free.saturating_sub(reserve))
    }

    /// Bytes held for files with changes not yet in the bucket (never evicted).
    pub fn dirty_bytes(&self) -> u64 {
        self.registry()
            .values()
            .map(|f| {
                let state = f.lock();
                if state.dirty {
                    state.blocks.count() * BLOCK_SIZE
                } else {
                    0
                }
            })
            .sum()
    }

    /// Evicts clean, closed files, least recently used first, until under the limit.
    /// Returns the inodes evicted (their saved presence must be forgotten).
    pub fn evict_to_limit(&self, forget: &dyn Fn(u64) -> FsResult<()>) -> FsResult<Vec<u64>> {
        self.evict_to(self.limit, forget)
    }

    /// Evicts clean, closed files, least recently used first, until at most `target`
    /// bytes are held. Returns the inodes evicted.
    /// `forget` drops an evicted file's saved block map, under the registry's lock: a
    /// reload in between would otherwise trust the map of a file that is gone.
    pub fn evict_to(
        &self,
        target: u64,
        forget: &dyn Fn(u64) -> FsResult<()>,
    ) -> FsResult<Vec<u64>> {
        let mut evicted = Vec::new();
        let mut used = self.used_bytes();
        if used <= target {
            return Ok(evicted);
        }
        // The registry stays locked from choice to removal, and only files nobody else
        // holds are chosen: a handle, a read or an upload in progress keeps a reference,
        // and nothing can take a new one meanwhile. (An upload records the file clean and
        // its block map while holding it; evicting under it would strand that map.)
        let mut files = self.registry();
        let mut candidates: Vec<(Instant, u64, u64)> = files
            .values()
            .filter(|f| Arc::strong_count(f) == 1)
            .filter_map(|f| {
                let state = f.lock();
                let evictable = !state.dirty && state.open_handles == 0;
                evictable.then(|| (state.last_access, f.ino, state.blocks.count() * BLOCK_SIZE))
            })
            .collect();
        candidates.sort();
        for (_, ino, bytes) in candidates {
            if used <= target {
                break;
            }
            files.remove(&ino);
            // Map first, as in `discard_if_unused`.
            forget(ino)?;
            self.delete_file(ino)?;
            used = used.saturating_sub(bytes);
            evicted.push(ino);
        }
        Ok(evicted)
    }
}
