//! The uploader: works through the journal, making the bucket match local metadata
//! (uploads, directory markers, symlinks, moves after renames, deletes), with retries.

mod attr_index;
pub mod conflict;
pub mod upload;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Notify, Semaphore};

use crate::backend::{Backend, Kind, MetadataReplaced, ObjectAttrs};
use crate::cache::{CacheFile, DataCache, FileInit};
use crate::error::{FsError, FsResult};
use crate::integrity::{crc64, Crc64, ReadVerifier};
use crate::meta::{DueScan, Inode, JournalEntry, JournalOp, MetaStore, RemoteState, Settles};
use upload::{StreamUpload, Uploaded};

/// Retry delays grow from this, doubling, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// An upload that cannot run yet (not a failure) reports this errno and is tried again
/// after [`POSTPONE_DELAY`], without counting as an attempt.
const POSTPONE_ERRNO: i32 = libc::EBUSY;
/// Short: the close that ends the wait re-queues the upload anyway.
const POSTPONE_DELAY: Duration = Duration::from_millis(200);

/// Journal entries run at once per unit of `concurrency`. Most entries hold little
/// memory (a small file's PUT, a copy, a delete, a marker) and wait on the network, so
/// many go at once, as a direct client's small PUTs on 16 threads do; uploads that hold
/// more than [`SMALL_UPLOAD`] bytes also take one of `concurrency` large-upload slots,
/// which keeps memory where it was: (concurrency + 1) x part size per large upload.
const ENTRIES_PER_SLOT: usize = 4;
/// Files smaller than this upload without a large-upload slot.
const SMALL_UPLOAD: u64 = 1 << 20;
/// How long due deletes wait for running syncs (see [`Uploader::run`]): long enough to
/// gather a directory's moves, short enough that the bucket soon agrees.
const DELETE_GATHER: Duration = Duration::from_secs(1);
/// New journal entries the scheduler takes up per scan.
const DUE_SCAN: usize = 256;

/// What a flush waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushScope {
    /// Every change made so far in the bucket (`bucketgate flush`).
    Changes,
    /// That, and the attribute indexes of the directories changed (before unmounting:
    /// the next mount's first listings read them).
    Everything,
}

#[derive(Debug, Clone)]
pub struct UploaderConfig {
    pub part_size: u64,
    pub concurrency: usize,
    /// Keep file data in the cache after upload (cached/sync) or drop it (write-through).
    pub keep_data: bool,
}

pub struct Uploader {
    meta: Arc<MetaStore>,
    backend: Backend,
    cache: Arc<DataCache>,
    config: UploaderConfig,
    wake: Notify,
    /// Journal entries being worked on, by id.
    running: Mutex<HashSet<i64>>,
    /// Inodes being synced: one sync per inode at a time.
    busy_inodes: BusySet<u64>,
    /// Keys being written: an upload, its record and the cleanup after it go as one.
    busy_keys: BusySet<String>,
    workers: Arc<Semaphore>,
    /// Slots for uploads of [`SMALL_UPLOAD`] bytes or more.
    large_uploads: Semaphore,
    flushing: AtomicU64,
    /// Flushes that also run the attribute-index rewrites at once (before unmounting).
    flushing_indexes: AtomicU64,
    /// Directories whose index this run removed (too many files, or none): not removed
    /// again at every rewrite.
    unindexed: Mutex<HashSet<u64>>,
    in_flight: AtomicU64,
    /// Syncs running: while any do, due deletes wait to go together.
    syncs_running: AtomicU64,
    /// The last scan of the journal filled its limit: due entries may lie past it, so a
    /// finished entry (which leaves the window) wakes the scheduler.
    scan_was_full: AtomicBool,
    stopped: AtomicBool,
}

/// The attributes an inode's object carries.
pub fn attrs_of(inode: &Inode) -> ObjectAttrs {
    ObjectAttrs {
        kind: inode.kind,
        perm: inode.perm,
        uid: inode.uid,
        gid: inode.gid,
        mtime: inode.mtime,
    }
}

/// What a metadata replacement came to.
enum MetadataStored {
    Done,
    /// Nothing to store: the data waits for an upload, or a completed stream's crc64
    /// cannot be stored in place (it stays local).
    NotNeeded,
    /// An attribute change the object cannot take in place: it goes up with the data.
    NeedsUpload,
    /// The file moved since its object was stored, and only its attributes changed: the
    /// object moves by a copy, and the attributes follow in place at the new key.
    Moved,
}

/// How a sync stores a file whose only change is its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttrsOnly {
    /// In place, by a metadata replacement (after a server-side copy if the file moved).
    InPlace,
    /// With an upload of the data: the object could not take them in place.
    WithData,
}

impl MetadataStored {
    /// Where the object cannot take the metadata in place: an attribute change still has
    /// to reach the bucket (by an upload); a crc64 stays local.
    fn unless_attrs_wait(inode: &Inode) -> MetadataStored {
        if inode.only_attrs_dirty {
            MetadataStored::NeedsUpload
        } else {
            MetadataStored::NotNeeded
        }
    }
}

/// How to load an inode's cached file from its stored state.
pub fn file_init(meta: &MetaStore, inode: &Inode) -> FsResult<FileInit> {
    let saved = meta.load_blocks(inode.ino)?.map(|(_, bitmap)| bitmap);
    Ok(FileInit {
        size: inode.size,
        fetch_limit: inode
            .fetch_limit
            .unwrap_or(inode.remote_size.unwrap_or(0))
            .min(inode.remote_size.unwrap_or(0)),
        source_key: inode.remote_key.clone().filter(|k| !k.is_empty()),
        dirty: inode.data_dirty(),
        saved_blocks: saved,
        verifier: read_verifier(inode),
    })
}

/// Deletes an inode's cache file and what the store says was present in it: a saved
/// presence map without its file would make zeros pass for data.
pub fn discard_cache_file(meta: &MetaStore, cache: &DataCache, ino: u64) -> FsResult<()> {
    cache.remove(ino, &|ino| meta.forget_blocks(ino))
}

/// Unloads idle cache files beyond the cache's cap on loaded files, keeping their bytes
/// (see [`DataCache::unload_idle`]).
pub fn unload_idle_files(meta: &MetaStore, cache: &DataCache) -> FsResult<()> {
    cache.unload_idle(&|maps| meta.save_clean_blocks_of(crate::cache::BLOCK_SIZE, maps))?;
    Ok(())
}

/// The check of an inode's object against its crc64, when one is known and the file
/// still reads the whole object.
pub fn read_verifier(inode: &Inode) -> Option<ReadVerifier> {
    let key = inode.remote_key.as_deref().filter(|k| !k.is_empty())?;
    let size = inode.remote_size?;
    let crc = inode.remote_crc64?;
    let whole = inode.fetch_limit.is_none_or(|limit| limit >= size);
    whole.then(|| ReadVerifier::new(key, crc, size))
}

impl Uploader {
    pub fn new(
        meta: Arc<MetaStore>,
        backend: Backend,
        cache: Arc<DataCache>,
        config: UploaderConfig,
    ) -> Arc<Uploader> {
        let workers = Arc::new(Semaphore::new(config.concurrency * ENTRIES_PER_SLOT));
        let large_uploads = Semaphore::new(config.concurrency);
        Arc::new(Uploader {
            meta,
            backend,
            cache,
            config,
            wake: Notify::new(),
            running: Mutex::new(HashSet::new()),
            busy_inodes: BusySet::default(),
            busy_keys: BusySet::default(),
            workers,
            large_uploads,
            flushing: AtomicU64::new(0),
            flushing_indexes: AtomicU64::new(0),
            unindexed: Mutex::new(HashSet::new()),
            in_flight: AtomicU64::new(0),
            syncs_running: AtomicU64::new(0),
            scan_was_full: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    /// Drops inode `ino`'s cache file and the record of its blocks.
    pub fn discard_cache_file(&self, ino: u64) -> FsResult<()> {
        discard_cache_file(&self.meta, &self.cache, ino)
    }

    /// Holds `key` against the uploader's own work on it (an upload, a delete, the
    /// checksum job's copy of the object onto itself) until the guard drops: a
    /// write-through close completing its object there takes it, or a copy running
    /// across its PUT could put the previous version back.
    pub async fn hold_key(&self, key: &str) -> impl Drop + '_ {
        self.busy_keys.lock(key.to_string()).await
    }

    /// Whether inode `ino`'s write-through stream may complete at `key` (the caller holds
    /// the key, see [`Self::hold_key`]): only while the file still stands at that key. A
    /// file renamed or unlinked while open must not complete there, or its bytes would
    /// replace the file that stands there now. An earlier file that moved away from the
    /// key and has not copied its object yet is copied first (EAGAIN if that copy did not
    /// happen: the stream must not replace the only copy of that file's data).
    pub async fn ready_to_complete_stream(&self, ino: u64, key: &str) -> FsResult<bool> {
        let Some(inode) = self.meta.get(ino)? else {
            return Ok(false);
        };
        if self.key_now(&inode)?.as_deref() != Some(key) {
            return Ok(false);
        }
        if let Some(owner) = self.meta.key_owner(key)? {
            if owner.ino != ino && self.moved_away_from(&owner, key)? {
                // Only its copy: the delete of this key it journals must wait for the
                // lock the caller holds, and then finds this file's object and keeps it.
                self.run_now(JournalOp::Sync(owner.ino)).await?;
                self.check_not_a_pending_source(&inode, key)?;
            }
        }
        Ok(true)
    }

    /// New work is queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// The scheduling loop: picks due entries and runs them on a bounded set of workers.
    /// Due deletes wait while syncs run (a directory's moves queue one delete per object
    /// as each copy ends), for at most [`DELETE_GATHER`], then go as one group: a batch
    /// request per thousand keys where the store has them.
    pub async fn run(self: Arc<Self>) {
        let mut deletes_held_since: Option<Instant> = None;
        let mut syncs_were_due = false;
        while !self.stopped.load(Ordering::SeqCst) {
            // While deletes are held, the scan leaves them out: every finished copy wakes
            // this loop, and re-reading the held group each time cost a 2,000-file rename
            // more daemon CPU than its copies (BENCHMARKS.md, twelfth session).
            let holding = deletes_held_since.is_some_and(|since| since.elapsed() < DELETE_GATHER)
                && (syncs_were_due || self.syncs_running.load(Ordering::SeqCst) > 0);
            let scan = DueScan {
                // The scan returns the oldest due entries, running ones included: look
                // past those, or a group of deletes in flight would hold back every newer
                // entry.
                limit: DUE_SCAN + self.running_count(),
                ignore_delay: self.flushing.load(Ordering::SeqCst) > 0,
                indexes_too: self.flushing_indexes.load(Ordering::SeqCst) > 0,
                deletes_too: !holding,
            };
            let entries = match self.meta.due_entries(scan) {
                Ok(entries) => entries,
                Err(err) => {
                    tracing::error!(error = %err, "reading the upload journal failed");
                    Vec::new()
                }
            };
            self.scan_was_full
                .store(entries.len() >= scan.limit, Ordering::SeqCst);
            let (deletes, others): (Vec<_>, Vec<_>) = entries
                .into_iter()
                .partition(|entry| matches!(entry.op, JournalOp::Delete(_)));
            syncs_were_due = others
                .iter()
                .any(|entry| matches!(entry.op, JournalOp::Sync(_)));
            for entry in others {
                if !self.spawn_entries(vec![entry]).await {
                    return;
                }
            }
            let syncs_busy = syncs_were_due || self.syncs_running.load(Ordering::SeqCst) > 0;
            if holding {
                if !syncs_busy {
                    continue; // the syncs just ended: the held deletes go now
                }
            } else if deletes.is_empty() {
                deletes_held_since = None;
            } else {
                let held_since = *deletes_held_since.get_or_insert_with(Instant::now);
                if !syncs_busy || held_since.elapsed() >= DELETE_GATHER {
                    deletes_held_since = None;
                    if !self.spawn_entries(deletes).await {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Runs the entries not already running, together, on one worker; false once the
    /// uploader has stopped.
    async fn spawn_entries(self: &Arc<Self>, entries: Vec<JournalEntry>) -> bool {
        let entries: Vec<JournalEntry> = entries
            .into_iter()
            .filter(|entry| self.claim(entry.id))
            .collect();
        if entries.is_empty() {
            return true;
        }
        let Ok(permit) = self.workers.clone().acquire_owned().await else {
            return false;
        };
        let this = self.clone();
        tokio::spawn(async move {
            futures::future::join_all(entries.iter().map(|entry| this.run_claimed(entry))).await;
            drop(permit);
        });
        true
    }

    /// Runs a claimed entry and releases it.
    async fn run_claimed(&self, entry: &JournalEntry) {
        if let Err(err) = self.run_entry(entry).await {
            tracing::debug!(error = %err, "journal entry will be retried");
        }
        self.release(entry.id);
    }

    fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn claim(&self, id: i64) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }

    /// Lets go of a finished entry. It wakes the scheduler only when that can show it
    /// something new: a rescan at every finished copy of a directory rename re-read all
    /// the entries still running, the most CPU the daemon spent on it.
    fn release(&self, id: i64) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if self.scan_was_full.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Runs one journal entry, recording success or scheduling a retry.
    async fn run_entry(&self, entry: &JournalEntry) -> FsResult<()> {
        let is_sync = matches!(entry.op, JournalOp::Sync(_));
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if is_sync {
            self.syncs_running.fetch_add(1, Ordering::SeqCst);
        }
        tracing::debug!(op = ?entry.op, gen = entry.gen, "bucket work");
        let result = self.perform(&entry.op).await;
        let syncs_ended = is_sync && self.syncs_running.fetch_sub(1, Ordering::SeqCst) == 1;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Ok(true): done, but queued again meanwhile, so due again.
        let recorded = match &result {
            Ok(()) => self.meta.complete(entry).map(|dropped| !dropped),
            Err(err) if err.errno == POSTPONE_ERRNO => {
                tracing::debug!(op = ?entry.op, "{}", err.message);
                self.meta.postpone(entry, POSTPONE_DELAY).map(|()| false)
            }
            Err(err) => {
                let delay = FIRST_RETRY_DELAY
                    .saturating_mul(1 << entry.attempts.clamp(0, 7) as u32)
                    .min(MAX_RETRY_DELAY);
                tracing::error!(op = ?entry.op, attempt = entry.attempts + 1, retry_in = ?delay, error = %err, "bucket work failed; will retry");
                self.meta.fail(entry, &err.message, delay).map(|()| false)
            }
        };
        // Woken after the record, so that its scan sees it: the deletes held for the syncs
        // can go once the last one has ended, and an entry queued again is due again.
        if syncs_ended || matches!(recorded, Ok(true)) {
            self.wake.notify_one();
        }
        recorded?;
        result
    }

    /// Runs the queued entry for `op` now and waits for it (write-through mode).
    pub async fn run_now(&self, op: JournalOp) -> FsResult<()> {
        // An entry leaves the journal only once its work is done (or moot): another
        // caller's `sync_now` may have run it, as deletes due together run in one batch.
        let Some(entry) = self.meta.queued(&op)? else {
            tracing::debug!(?op, "already done by another worker");
            return Ok(());
        };
        self.run_entry_now(entry).await
    }

    /// Runs `entry` now, once a background worker holding it has let go; an entry that
    /// worker completed meanwhile is not run again.
    async fn run_entry_now(&self, entry: JournalEntry) -> FsResult<()> {
        let mut claimed = false;
        for _ in 0..6000 {
            claimed = self.claim(entry.id);
            if claimed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if claimed && self.meta.queued(&entry.op)?.is_none() {
            self.release(entry.id);
            return Ok(());
        }
        let result = self.run_entry(&entry).await;
        if claimed {
            self.release(entry.id);
        }
        result
    }

    /// Runs the queued syncs of `inos` now, `parallel` at a time (write-through mode),
    /// then deletes the keys the files and links among them moved away from, all at once:
    /// a directory rename then costs the bucket a few batch requests for its old keys,
    /// not one delete per object. The first error, once all have ended; a key another
    /// pending move still needs stays queued for that move.
    pub async fn sync_now(&self, inos: Vec<u64>, parallel: usize) -> FsResult<()> {
        let mut old_keys = Vec::new();
        for &ino in &inos {
            if let Some(inode) = self.meta.get(ino)?.filter(|i| i.kind != Kind::Dir) {
                old_keys.extend(inode.remote_key.filter(|k| !k.is_empty()));
            }
        }
        let synced: Vec<FsResult<()>> = futures::stream::iter(inos)
            .map(|ino| self.run_now(JournalOp::Sync(ino)))
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        // Only a key a sync moved away from has its delete queued.
        let mut deletes = Vec::new();
        for key in old_keys {
            deletes.extend(self.meta.queued(&JournalOp::Delete(key))?);
        }
        let deleted =
            futures::future::join_all(deletes.into_iter().map(|entry| self.run_entry_now(entry)))
                .await;
        synced.into_iter().collect::<FsResult<()>>()?;
        deleted
            .into_iter()
            .filter(|result| !matches!(result, Err(err) if err.errno == libc::EAGAIN))
            .collect()
    }

    /// Waits until the journal is empty of changes, uploading without the quiet delay,
    /// and with [`FlushScope::Everything`] then of attribute-index rewrites too (run once
    /// the changes are in, so each directory's is written once); fails with what is still
    /// pending when `timeout` passes.
    pub async fn flush(&self, timeout: Duration, scope: FlushScope) -> FsResult<()> {
        let deadline = Instant::now() + timeout;
        self.flushing.fetch_add(1, Ordering::SeqCst);
        let mut result = self
            .drain(deadline, timeout, || self.meta.changes_pending())
            .await;
        if result.is_ok() && scope == FlushScope::Everything {
            self.flushing_indexes.fetch_add(1, Ordering::SeqCst);
            result = self
                .drain(deadline, timeout, || self.meta.journal_len())
                .await;
            self.flushing_indexes.fetch_sub(1, Ordering::SeqCst);
        }
        self.flushing.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Waits until `pending` counts nothing, or fails at `deadline` saying what is left.
    async fn drain(
        &self,
        deadline: Instant,
        timeout: Duration,
        pending: impl Fn() -> FsResult<u64>,
    ) -> FsResult<()> {
        loop {
            self.wake.notify_one();
            let left = pending()?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let summary = self.meta.summary()?;
                return Err(FsError::loud(
                    libc::EIO,
                    format!("{left} change(s) not yet in the bucket after {timeout:?}; last errors: {:?}", summary.last_errors),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn perform(&self, op: &JournalOp) -> FsResult<()> {
        match op {
            JournalOp::Sync(ino) => {
                let _guard = self.busy_inodes.lock(*ino).await;
                self.sync_inode(*ino, AttrsOnly::InPlace).await
            }
            JournalOp::Delete(key) => {
                let _key = self.busy_keys.lock(key.clone()).await;
                self.delete_if_unclaimed(key).await
            }
            JournalOp::Metadata(ino) => {
                let _guard = self.busy_inodes.lock(*ino).await;
                self.store_metadata(*ino).await
            }
            JournalOp::AttrIndex(ino) => self.store_attr_index(*ino).await,
        }
    }

    /// Deletes `key` unless an inode still needs it: one whose data lives there at its
    /// own path (or unlinked but open), which keeps it; or one that moved away and has
    /// not copied it yet, for which the delete fails with EAGAIN and is retried later.
    pub async fn delete_if_unclaimed(&self, key: &str) -> FsResult<()> {
        if let Some(owner) = self.meta.key_owner(key)? {
            if !self.moved_away_from(&owner, key)? {
                tracing::debug!(key, ino = owner.ino, "kept object: an inode owns it");
                return Ok(());
            }
            return Err(FsError::new(
                libc::EAGAIN,
                format!("{key} is still the source of a pending move; deleting it later"),
            ));
        }
        // The records that free this key (a move, an unlink) must outlive a power loss
        // before the object goes: unsynced ones would come back pointing at nothing.
        self.meta.sync_log()?;
        self.backend
            .delete(key)
            .await
            .map_err(|err| FsError::backend(&format!("deleting {key}"), err))?;
        self.prune_implicit_dirs(key)
    }

    /// After a delete on the directory bucket: parent directories no inode stands for
    /// (made implicitly by a file stored under a path renamed meanwhile, or in `hashed`,
    /// the hash prefix and path directories a file's key made) go once empty, as they
    /// would on S3. Bounded by the key's depth.
    fn prune_implicit_dirs(&self, key: &str) -> FsResult<()> {
        if self.backend.local_root().is_none() {
            return Ok(());
        }
        let mut dir_key = key.trim_end_matches('/');
        while let Some((parent, _)) = dir_key.rsplit_once('/') {
            dir_key = parent;
            let candidate = format!("{parent}/");
            if self.is_directory_of_the_mount(&candidate)? {
                return Ok(()); // a directory the mount has: keep it
            }
            if !self.backend.remove_empty_local_dir(&candidate) {
                return Ok(()); // not empty (or gone)
            }
        }
        Ok(())
    }

    /// Whether `dir_key` is the marker key of a directory the mount has.
    fn is_directory_of_the_mount(&self, dir_key: &str) -> FsResult<bool> {
        let layout = self.backend.layout();
        let Some((path, true)) = layout.path_of_key(dir_key) else {
            return Ok(false);
        };
        let names: Vec<&[u8]> = path.split('/').map(str::as_bytes).collect();
        Ok(match self.meta.resolve(&names)? {
            Some(inode) if inode.kind == Kind::Dir => {
                let owned: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
                layout
                    .key_for(&owned, Kind::Dir)
                    .is_ok_and(|k| k == dir_key)
            }
            _ => false,
        })
    }

    /// Stores the inode's attributes (and its crc64, when known) in its object's metadata
    /// without moving its data: after a stream completed (its metadata left before the
    /// crc64 was known), or after a chmod, chown or utimens of a stored file. An inode
    /// whose data waits for an upload needs nothing here: that upload carries them. Where
    /// the object cannot be changed in place (moved since, replaced by another writer, a
    /// bucket without metadata replacement), an attribute change goes up as an upload.
    async fn store_metadata(&self, ino: u64) -> FsResult<()> {
        match self.replace_object_metadata(ino).await? {
            MetadataStored::Done | MetadataStored::NotNeeded => Ok(()),
            MetadataStored::NeedsUpload => self.sync_inode(ino, AttrsOnly::WithData).await,
            MetadataStored::Moved => self.sync_inode(ino, AttrsOnly::InPlace).await,
        }
    }

    async fn replace_object_metadata(&self, ino: u64) -> FsResult<MetadataStored> {
        let Some(inode) = self.meta.get(ino)? else {
            return Ok(MetadataStored::NotNeeded);
        };
        let Some(key) = self.key_in_place(&inode)? else {
            if inode.only_attrs_dirty && self.stored_elsewhere(&inode)? {
                return Ok(MetadataStored::Moved);
            }
            return Ok(MetadataStored::unless_attrs_wait(&inode));
        };
        let _key = self.busy_keys.lock(key.clone()).await;
        // Read again under the key's lock: a write-through close may have replaced the
        // object meanwhile (it holds this lock while it does), and copying the new object
        // onto itself with the old one's checksum would make it unreadable.
        let Some(inode) = self.meta.get(ino)? else {
            return Ok(MetadataStored::NotNeeded);
        };
        let (Some(size), true) = (
            inode.remote_size,
            self.key_in_place(&inode)?.as_deref() == Some(key.as_str()),
        ) else {
            return Ok(MetadataStored::unless_attrs_wait(&inode));
        };
        let metadata = attrs_of(&inode).encode(inode.remote_crc64);
        let replaced = self
            .backend
            .replace_metadata(&key, size, &metadata, inode.remote_etag.as_deref())
            .await;
        match replaced {
            Ok(MetadataReplaced::Done { etag }) => {
                let remote = RemoteState {
                    key,
                    etag: etag.or(inode.remote_etag.clone()),
                    size,
                    crc64: inode.remote_crc64,
                };
                let settles = Settles::OnlyAttrsIfStill(attrs_of(&inode));
                self.meta
                    .transaction(|tx| self.meta.set_remote(tx, ino, &remote, settles).map(drop))?;
                Ok(MetadataStored::Done)
            }
            Ok(MetadataReplaced::Unsupported) => {
                tracing::debug!(key = %key, "this object's metadata cannot change in place");
                Ok(MetadataStored::unless_attrs_wait(&inode))
            }
            Ok(MetadataReplaced::VersionChanged) => {
                tracing::info!(key = %key, "the object changed in the bucket since this mount stored it; its metadata is left alone");
                Ok(MetadataStored::unless_attrs_wait(&inode))
            }
            Err(message) => Err(FsError::loud(
                libc::EIO,
                format!("storing the attributes of {key} in its metadata: {message}"),
            )),
        }
    }

    /// The key of an inode whose object in the bucket holds its current data at its
    /// current path (a metadata replacement can apply there); `None` otherwise.
    fn key_in_place(&self, inode: &Inode) -> FsResult<Option<String>> {
        if inode.data_dirty() || inode.remote_size.is_none() {
            return Ok(None);
        }
        let current = self.key_now(inode)?;
        Ok(inode
            .remote_key
            .clone()
            .filter(|key| current.as_ref() == Some(key)))
    }

    /// Whether the inode's current data is stored, at a key other than its path's.
    fn stored_elsewhere(&self, inode: &Inode) -> FsResult<bool> {
        let stored = inode.remote_key.as_ref().filter(|k| !k.is_empty());
        match stored {
            Some(key) if !inode.data_dirty() && inode.remote_size.is_some() => {
                self.moved_away_from(inode, key)
            }
            _ => Ok(false),
        }
    }

    /// Stores the inode at the key of its path, under that key's lock (see
    /// [`Self::lock_current_key`]).
    async fn sync_inode(&self, ino: u64, attrs_only: AttrsOnly) -> FsResult<()> {
        let Some(CurrentKey {
            inode,
            key,
            guard: _key,
        }) = self.lock_current_key(ino).await?
        else {
            return Ok(()); // gone or unlinked (nothing to store), or the root (no marker)
        };
        let old_key = inode
            .remote_key
            .clone()
            .filter(|k| !k.is_empty() && *k != key);
        if inode.kind == Kind::File {
            return self.sync_file(&inode, &key, old_key, attrs_only).await;
        }
        // Under the key's lock, as a file upload: a delete of the same key (an rmdir and a
        // new mkdir there) must not run between the marker and its record.
        self.store_marker_or_link(&inode, &key, old_key.as_deref())
            .await?;
        // Removed or moved while the marker or link was written: do not leave it behind.
        self.delete_unless_still_needed(&key).await
    }

    /// The inode, the key of its current path, and that key's lock, with the path read
    /// again once the lock is held. The lock may take seconds (another inode's upload to
    /// the same key holds it), and the file may be renamed or unlinked meanwhile. Storing
    /// it at the key it left would overwrite whatever file stands there now. `None`
    /// for an inode that is gone or unlinked, and for the root (it has no marker).
    async fn lock_current_key(&self, ino: u64) -> FsResult<Option<CurrentKey<'_>>> {
        for _ in 0..KEY_LOCK_ATTEMPTS {
            let Some(inode) = self.meta.get(ino)? else {
                return Ok(None);
            };
            let Some(names) = self.meta.path_of(ino)? else {
                return Ok(None);
            };
            let key = self.backend.layout().key_for(&names, inode.kind)?;
            if key.is_empty() {
                return Ok(None);
            }
            let guard = self.busy_keys.lock(key.clone()).await;
            let Some(inode) = self.meta.get(ino)? else {
                return Ok(None);
            };
            if self.key_now(&inode)?.as_deref() == Some(key.as_str()) {
                return Ok(Some(CurrentKey { inode, key, guard }));
            }
            tracing::debug!(
                ino,
                key,
                "moved while waiting for its key: taking the new one"
            );
        }
        Err(FsError::new(
            libc::EAGAIN,
            format!("inode {ino} kept moving while waiting for its key; storing it later"),
        ))
    }

    /// [`Self::delete_if_unclaimed`] where a key still needed by a pending move is not an
    /// error: the delete that move journals with its copy removes it.
    async fn delete_unless_still_needed(&self, key: &str) -> FsResult<()> {
        match self.delete_if_unclaimed(key).await {
            Err(err) if err.errno == libc::EAGAIN => Ok(()),
            other => other,
        }
    }

    /// Writes a directory's marker (when it changed or moved) or a symlink's object at
    /// `key`, and records it.
    async fn store_marker_or_link(
        &self,
        inode: &Inode,
        key: &str,
        old_key: Option<&str>,
    ) -> FsResult<()> {
        let metadata = attrs_of(inode).encode(None);
        let remote = if inode.kind == Kind::Dir {
            if inode.dirty || old_key.is_some() || inode.remote_key.is_none() {
                self.backend
                    .put_dir_marker(key, metadata)
                    .await
                    .map_err(|err| {
                        FsError::backend(&format!("writing directory marker {key}"), err)
                    })?;
            }
            RemoteState {
                key: key.to_string(),
                etag: None,
                size: 0,
                crc64: None,
            }
        } else {
            let target = inode.target.clone().unwrap_or_default();
            let size = target.len() as u64;
            let etag = self
                .backend
                .put(key, target, metadata, Kind::Symlink)
                .await
                .map_err(|err| FsError::backend(&format!("writing symlink {key}"), err))?;
            RemoteState {
                key: key.to_string(),
                etag,
                size,
                crc64: None,
            }
        };
        let settles = Settles::IfAttrsStill(attrs_of(inode));
        self.record_remote(inode.ino, &remote, settles, old_key, None)
            .map(drop)
    }

    /// Records where the inode's object now is. The key it moved from is journaled for
    /// deletion in the same transaction: once the new key is recorded nothing else
    /// remembers the old one, and a crash before its delete would leave it in the bucket
    /// for good. The entry is the only delete of the old key: the uploader runs the ones
    /// due together as one group (write-through runs them at once after its syncs, see
    /// `sync_now`), so a directory's old keys go in batch requests. A directory's old
    /// marker is retried until its children moved out (some stores refuse to drop a
    /// non-empty dir).
    ///
    /// Committed unsynced: if a power loss drops it, the inode is still dirty with its
    /// sync queued, the ledger (synced before the PUT) makes the next mount delete the
    /// object unless an inode owns it, and the sync uploads again. What cannot be undone
    /// and relies on this record syncs the log first: deleting the old key (see
    /// `delete_if_unclaimed`), and deleting the now clean file's cache data (eviction and
    /// discard call `forget_blocks`, a synced commit, before removing the file).
    fn record_remote(
        &self,
        ino: u64,
        remote: &RemoteState,
        settles: Settles,
        old_key: Option<&str>,
        follow_up: Option<&JournalOp>,
    ) -> FsResult<bool> {
        self.meta.bookkeeping(|tx| {
            let cleared = self.meta.set_remote(tx, ino, remote, settles)?;
            if let Some(old) = old_key {
                self.meta
                    .enqueue(tx, &JournalOp::Delete(old.to_string()), Duration::ZERO)?;
            }
            if let Some(op) = follow_up {
                self.meta.enqueue(tx, op, Duration::ZERO)?;
            }
            Ok(cleared)
        })
    }

    /// Stores a file's object at `key`. The key is in the upload ledger from before the
    /// object can appear until local metadata records it, so a crash in between leaves a
    /// trace the next mount cleans up (the object is deleted unless an inode owns it).
    /// The caller holds the key's lock.
    async fn sync_file(
        &self,
        inode: &Inode,
        key: &str,
        old_key: Option<String>,
        attrs_only: AttrsOnly,
    ) -> FsResult<()> {
        self.check_not_a_pending_source(inode, key)?;
        // Synced before the object can appear: see `ledger_ready_for_put`.
        self.meta.upload_starting(key, None)?;
        self.store_file(inode, key, old_key.as_deref(), attrs_only)
            .await?;
        // The file may have been unlinked while it uploaded. If it moved, the sync its
        // rename queued copies the object, and that copy's journaled delete removes this
        // key.
        self.delete_unless_still_needed(key).await?;
        self.meta.upload_ended(key)
    }

    /// Whether inode `ino`, whose data lives at `key`, now stands at another path.
    pub fn moved_away(&self, ino: u64, key: &str) -> FsResult<bool> {
        match self.meta.get(ino)? {
            Some(inode) => self.moved_away_from(&inode, key),
            None => Ok(false),
        }
    }

    /// Whether `owner`, whose data lives at `key`, now sits at another path and has not
    /// copied it there yet. An unlinked-but-open owner has not moved: it reads from `key`.
    fn moved_away_from(&self, owner: &Inode, key: &str) -> FsResult<bool> {
        Ok(self.key_now(owner)?.is_some_and(|k| k != key))
    }

    /// The key the inode's current path maps to (`None` when unlinked or unstorable).
    fn key_now(&self, inode: &Inode) -> FsResult<Option<String>> {
        Ok(self
            .meta
            .path_of(inode.ino)?
            .and_then(|names| self.backend.layout().key_for(&names, inode.kind).ok()))
    }

    /// Refuses (EAGAIN, retried later) to overwrite a key another inode moved away from
    /// and still has to copy: its data would be lost.
    fn check_not_a_pending_source(&self, inode: &Inode, key: &str) -> FsResult<()> {
        match self.meta.key_owner(key)? {
            Some(owner) if owner.ino != inode.ino => {
                if self.moved_away_from(&owner, key)? {
                    return Err(FsError::new(
                        libc::EAGAIN,
                        format!("{key} still holds the data of a moved file; uploading after it is copied"),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether the file's latest writes wait for their writer's close to become visible:
    /// write-through publishes a file only whole, at close or fsync (which persist it
    /// first), so a sync meanwhile (a rename's) must not upload the spool.
    fn writes_wait_for_close(&self, file: &CacheFile) -> bool {
        let state = file.lock();
        !self.config.keep_data && state.gen > state.persisted_gen
    }

    /// Copies the object stored at `old` to `key` on the server and records it there; the
    /// old key's delete (and `follow_up`) is journaled with the record.
    async fn move_stored_version(
        &self,
        inode: &Inode,
        old: &str,
        key: &str,
        settles: Settles,
        follow_up: Option<&JournalOp>,
    ) -> FsResult<()> {
        let etag = self
            .backend
            .copy(old, key, inode.remote_size)
            .await
            .map_err(|err| FsError::backend(&format!("copying {old} to {key}"), err))?;
        let remote = RemoteState {
            key: key.to_string(),
            etag,
            size: inode.remote_size.unwrap_or(0),
            crc64: inode.remote_crc64,
        };
        self.record_remote(inode.ino, &remote, settles, Some(old), follow_up)?;
        // A loaded cache file fetches what it lacks from its source key: point it at the
        // copy before the old key goes (a file loaded from the store before the record
        // still names the old key).
        if let Some(file) = self.cache.loaded(inode.ino) {
            let mut state = file.lock();
            if state.source_key.as_deref() == Some(old) {
                state.source_key = Some(key.to_string());
            }
        }
        Ok(())
    }

    async fn store_file(
        &self,
        inode: &Inode,
        key: &str,
        old_key: Option<&str>,
        attrs_only: AttrsOnly,
    ) -> FsResult<()> {
        let cached = self.cache.loaded(inode.ino);
        let cache_dirty = cached.as_ref().is_some_and(|c| c.lock().dirty);
        let data_dirty = inode.data_dirty() || cache_dirty;
        let unpublished = cached
            .as_ref()
            .is_some_and(|file| self.writes_wait_for_close(file));
        // Only its attributes changed (a chmod, then a rename before they were stored),
        // and the object can take them in place: the data need not move.
        let attrs_in_place = attrs_only == AttrsOnly::InPlace
            && !data_dirty
            && !unpublished
            && inode.only_attrs_dirty
            && self
                .backend
                .replaces_metadata_in_place(inode.remote_size.unwrap_or(0));
        if attrs_in_place && old_key.is_none() {
            // Where it stands: its metadata job stores them (and uploads the data itself
            // if the object cannot take them after all).
            let op = JournalOp::Metadata(inode.ino);
            return self
                .meta
                .bookkeeping(|tx| self.meta.enqueue(tx, &op, Duration::ZERO));
        }
        let attrs_follow = attrs_in_place && old_key.is_some();
        if unpublished || !(inode.dirty || cache_dirty) || attrs_follow {
            if let Some(old) = old_key {
                // A rename of an unchanged file, of a file whose only change is its
                // attributes (they follow as a metadata replacement at the new key), or of
                // a write-through file whose writer has not closed: the last complete
                // version moves by a server-side copy, no data through us. A write-through
                // writer's bytes become visible only at its close (which stores them where
                // the file stands then), never as a partial object at the new name.
                let (settles, follow_up) = if attrs_follow {
                    (Settles::Nothing, Some(JournalOp::Metadata(inode.ino)))
                } else if unpublished {
                    (Settles::Nothing, None)
                } else {
                    (Settles::IfAttrsStill(attrs_of(inode)), None)
                };
                self.move_stored_version(inode, old, key, settles, follow_up.as_ref())
                    .await?;
            }
            return Ok(());
        }
        let file = match cached {
            Some(file) => file,
            None => self
                .cache
                .get_or_load(inode.ino, || file_init(&self.meta, inode))?,
        };
        if file.lock().kernel_writers > 0 && self.flushing.load(Ordering::SeqCst) == 0 {
            return Err(FsError::new(
                POSTPONE_ERRNO,
                format!(
                    "inode {} is open for writing in passthrough; uploading after it closes",
                    inode.ino
                ),
            ));
        }
        let missing = file.missing_all();
        if !missing.is_empty() {
            file.fetch(&self.backend, missing).await?;
        }
        let (gen, size) = {
            let state = file.lock();
            (state.gen, state.size)
        };
        if inode.remote_key.as_deref() == Some(key) {
            self.keep_remote_if_changed(inode.ino, key).await?;
        }
        let uploaded = self.upload_from_cache(&file, inode, key, size).await?;
        let remote = uploaded.remote();
        // Memory and store change together, under the file's lock (as `persist` does).
        let clean = {
            let mut state = file.lock();
            // A kernel writer may have changed bytes unseen (a flush uploads what is
            // there, but only its close settles the file).
            let unchanged = state.gen == gen && state.kernel_writers == 0;
            let settles = if unchanged {
                Settles::IfAttrsStill(attrs_of(inode))
            } else {
                Settles::Nothing
            };
            let cleared = self.record_remote(inode.ino, &remote, settles, old_key, None)?;
            if unchanged {
                state.source_key = Some(uploaded.key.clone());
                state.fetch_limit = uploaded.size;
                state.verifier = None; // every block is local: nothing left to fetch
            }
            if cleared {
                state.dirty = false;
            }
            cleared
        };
        if clean {
            self.meta.save_clean_blocks(
                inode.ino,
                crate::cache::BLOCK_SIZE,
                &file.lock().blocks.to_bytes(),
            )?;
            if !self.cache.is_current(&file) {
                // Discarded while uploading: a saved map must not outlive its file.
                self.meta.forget_blocks(inode.ino)?;
            }
            if !self.config.keep_data {
                self.cache
                    .discard_if_unused(file, &|ino| self.meta.forget_blocks(ino))?;
            } else {
                // Closed before its upload ended (the usual case): idle only now.
                drop(file);
                unload_idle_files(&self.meta, &self.cache)?;
            }
        }
        Ok(())
    }

    /// Before a local version replaces the object at its own key: if another tool changed
    /// the object since this mount last saw it, that version is kept under a conflict key
    /// first. (A change landing between this HEAD and the upload is not caught: S3 offers
    /// no conditional overwrite that every service here speaks.)
    async fn keep_remote_if_changed(&self, ino: u64, key: &str) -> FsResult<()> {
        // Read afresh: a refresh may have preserved and recorded a newer version.
        let Some(inode) = self.meta.get(ino)? else {
            return Ok(());
        };
        let Some(known) = inode.remote_etag.clone() else {
            return Ok(()); // version unknown: nothing to compare with
        };
        let current = self
            .backend
            .stat(key)
            .await
            .map_err(|err| FsError::backend(&format!("HEAD {key}"), err))?;
        let Some(info) = current else {
            return Ok(()); // deleted meanwhile: nothing to keep
        };
        let Some(remote) = info.etag.clone() else {
            return Ok(()); // no version to compare
        };
        if conflict::same_version(&inode, &info) {
            if remote != known {
                self.meta.set_remote_etag(ino, Some(&remote))?;
            }
            return Ok(());
        }
        conflict::preserve_remote(
            &self.backend,
            &self.meta,
            ino,
            key,
            Some(&known),
            Some(&remote),
        )
        .await
        .map(|_| ())
    }

    /// Before a single PUT to `key`, the ledger entry `sync_file` wrote unsynced is synced,
    /// unless losing it to a power loss would leave nothing behind: when the inode has
    /// never stored an object at `key` and still stands at a path whose key it is. A
    /// power loss that drops the entry drops every later commit too (see `meta::log`),
    /// while namespace changes are synced commits, and the inode's creation is made
    /// durable here. So the store after it still has the inode at that path, dirty, with
    /// this sync queued, and the sync stores the object at `key` again: nothing is left
    /// that no inode owns. (A rename or unlink before the entry shows in the check; one
    /// after it syncs the entry with itself.) An overwrite of an object the inode stored
    /// needs the entry: the next mount records the version the upload left, or the redo
    /// would take it for another tool's change.
    fn ledger_ready_for_put(&self, inode: &Inode, key: &str) -> FsResult<()> {
        if inode.remote_key.as_deref() != Some(key) {
            self.meta.make_durable(inode.ino)?;
            if self.key_now(inode)?.as_deref() == Some(key) {
                return Ok(());
            }
        }
        self.meta.sync_log()
    }

    /// Uploads a cached file to `key`: one PUT when small, else growing parts. The
    /// object carries the crc64 of its bytes; a multipart upload reads the file twice (the
    /// checksum must go out with the first request) and is abandoned if the bytes changed
    /// in between, so no object ever carries a checksum that does not match it.
    async fn upload_from_cache(
        &self,
        file: &CacheFile,
        inode: &Inode,
        key: &str,
        size: u64,
    ) -> FsResult<Uploaded> {
        let _large = if size >= SMALL_UPLOAD {
            let permit = self.large_uploads.acquire().await;
            Some(permit.map_err(|_| FsError::loud(libc::EIO, "the uploader stopped"))?)
        } else {
            None
        };
        let attrs = attrs_of(inode);
        if size < self.config.part_size {
            self.ledger_ready_for_put(inode, key)?;
            let body = file.read_for_upload(0, size as usize)?;
            let crc = crc64(&body);
            let etag = self
                .backend
                .put(key, body, attrs.encode(Some(crc)), Kind::File)
                .await
                .map_err(|err| FsError::backend(&format!("uploading {key}"), err))?;
            return Ok(Uploaded {
                key: key.to_string(),
                etag,
                size,
                crc64: Some(crc),
                crc_stored: true,
            });
        }
        let mut expected = Crc64::default();
        for_each_chunk(file, size, |chunk| {
            expected.update(&chunk);
            Ok(())
        })?;
        let expected = expected.value();
        let mut upload = StreamUpload::start(
            &self.backend,
            key,
            attrs.encode(Some(expected)),
            self.config.part_size,
            self.config.concurrency,
            Some(upload::Ledger {
                store: self.meta.clone(),
                streamed_ino: None,
                new_file: false,
            }),
        )
        .await?;
        if let Err(err) = push_file(&mut upload, file, size).await {
            upload.abort().await;
            return Err(err);
        }
        if upload.crc64() != expected {
            upload.abort().await;
            return Err(FsError::new(
                libc::EAGAIN,
                format!("{key}: the file changed while it was uploading; uploading again"),
            ));
        }
        upload.finish().await
    }
}

/// Bytes read from the cache file per step of an upload.
const UPLOAD_CHUNK: u64 = 4 << 20;

/// Streams the file's bytes `0..size` into an upload.
async fn push_file(upload: &mut StreamUpload, file: &CacheFile, size: u64) -> FsResult<()> {
    let mut offset = 0u64;
    while offset < size {
        let len = UPLOAD_CHUNK.min(size - offset) as usize;
        upload.push(&file.read_for_upload(offset, len)?).await?;
        offset += len as u64;
    }
    Ok(())
}

/// Calls `each` with the file's bytes `0..size` in order, a chunk at a time.
fn for_each_chunk(
    file: &CacheFile,
    size: u64,
    mut each: impl FnMut(crate::buffers::Buffer) -> FsResult<()>,
) -> FsResult<()> {
    let mut offset = 0u64;
    while offset < size {
        let len = UPLOAD_CHUNK.min(size - offset) as usize;
        each(file.read_for_upload(offset, len)?)?;
        offset += len as u64;
    }
    Ok(())
}

/// Items (inodes, keys) worked on by one task at a time.
struct BusySet<T> {
    items: Mutex<HashSet<T>>,
    changed: Notify,
}

impl<T> Default for BusySet<T> {
    fn default() -> Self {
        BusySet {
            items: Mutex::new(HashSet::new()),
            changed: Notify::new(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Clone> BusySet<T> {
    fn items(&self) -> std::sync::MutexGuard<'_, HashSet<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `item` is free and takes it until the guard drops.
    async fn lock(&self, item: T) -> BusyGuard<'_, T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.items().insert(item.clone()) {
                return BusyGuard { set: self, item };
            }
            notified.await;
        }
    }
}

/// Times [`Uploader::lock_current_key`] follows an inode that moves while it waits.
const KEY_LOCK_ATTEMPTS: usize = 8;

/// An inode to store, the key its path maps to, and that key's lock.
struct CurrentKey<'a> {
    inode: Inode,
    key: String,
    guard: BusyGuard<'a, String>,
}

struct BusyGuard<'a, T: std::hash::Hash + Eq + Clone> {
    set: &'a BusySet<T>,
    item: T,
}

impl<T: std::hash::Hash + Eq + Clone> Drop for BusyGuard<'_, T> {
    fn drop(&mut self) {
        self.set.items().remove(&self.item);
        self.set.changed.notify_waiters();
    }
}
