//! The disk data cache: one sparse file per inode, block presence, capacity and eviction.
//!
//! A byte of a cached file is valid when its block is present, or when it lies at or past
//! the file's `fetch_limit` (beyond what the bucket holds for it: zeros or local writes).

pub mod blocks;
mod registry;
mod spares;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blocks::BlockSet;
use futures::StreamExt;
pub use registry::SavedFile;
use registry::{Registry, Unloaded};
use spares::SpareFiles;

use crate::backend::Backend;
use crate::buffers::Buffer;
use crate::error::{FsError, FsResult};
use crate::integrity::ReadVerifier;

/// An inode and its presence map, as the metadata store saves it.
pub type SavedMap = (u64, Vec<u8>);

/// Cache granularity: what one ranged GET fills at the least.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// Blocks of one ranged GET at the most: runs are cut into parts on a grid of this many
/// blocks, and the parts of one fetch are downloaded in parallel.
pub const PART_BLOCKS: u64 = 8;
/// The cache file is written in pieces of at most this size. On the VMs this was
/// measured on, a 1 MiB write into the page cache cost 2-6x the kernel CPU of four of
/// 256 KiB (the large folio the kernel allocates for it comes from memory the host has to
/// fault in again): `pwrite` of 1 GiB took 1.1-2.4 s of system time in 1 MiB writes and
/// 0.2-0.8 s in 256 KiB ones.
const WRITE_PIECE: usize = 256 << 10;
/// Parts of one fetch call downloading at once.
const PARTS_IN_FLIGHT: usize = 8;
/// How long a fetch waits for blocks another task is downloading.
const FETCH_WAIT: Duration = Duration::from_secs(300);
/// Passes of claiming and waiting one fetch makes at the most (each pass downloads what it
/// claimed or waits for a download to land).
const FETCH_PASSES: usize = 10_000;

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
    /// Handles the kernel serves from this file itself (FUSE passthrough).
    pub passthrough_opens: u32,
    /// Of those, the ones open for writing: the bytes may change without the daemon
    /// seeing a write, so the file never counts as settled while any is open.
    pub kernel_writers: u32,
    /// When the file last changed, for the next persist: taken in with kernel writes
    /// (the cache file's own mtime), or set by a utimens; `None`: now (a write the
    /// daemon served, or a truncation, clears it).
    pub changed_at: Option<std::time::SystemTime>,
    /// The cache file's length, mtime and ctime when kernel writes were last taken in:
    /// the release after a close's flush takes nothing in twice when they still match.
    pub absorbed_stamp: Option<DiskStamp>,
}

impl FileState {
    /// Bytes of the bucket's data held locally, in whole blocks.
    pub fn present_bytes(&self) -> u64 {
        self.blocks.count() * BLOCK_SIZE
    }
}

/// What shows a cache file changed on disk: length, mtime and ctime (nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl DiskStamp {
    fn of(meta: &std::fs::Metadata) -> DiskStamp {
        use std::os::unix::fs::MetadataExt;
        DiskStamp {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
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

impl FileInit {
    /// A file with no bytes anywhere yet, local changes from the start (a new file).
    pub fn new_empty() -> FileInit {
        FileInit {
            size: 0,
            fetch_limit: 0,
            source_key: None,
            dirty: true,
            saved_blocks: None,
            verifier: None,
        }
    }
}

pub struct CacheFile {
    pub ino: u64,
    file: File,
    path: PathBuf,
    state: Mutex<FileState>,
    /// Blocks some task is downloading now: claimed before the GET, released after it,
    /// so parallel readers and the read-ahead never fetch a block twice.
    in_flight: Mutex<HashSet<u64>>,
    /// Bumped whenever claimed blocks are released (landed or failed).
    landed: tokio::sync::watch::Sender<u64>,
    /// Taken (before the state lock) by everything that writes the file; see
    /// [`CacheFile::write_lock`].
    writes: Mutex<()>,
}

/// Blocks one fetch claimed: released (and waiters woken) when dropped, also on an error
/// or a cancelled task.
struct Claim<'a> {
    file: &'a CacheFile,
    blocks: Range<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut in_flight = lock_set(&self.file.in_flight);
        for block in self.blocks.clone() {
            in_flight.remove(&block);
        }
        drop(in_flight);
        self.file.landed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What a download of claimed parts needs from the file's state, read once when claiming.
struct Source {
    key: String,
    limit: u64,
    epoch: u64,
}

fn lock_set(set: &Mutex<HashSet<u64>>) -> MutexGuard<'_, HashSet<u64>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pieces of byte range `range` that lie in blocks absent from `blocks`.
fn absent_segments(blocks: &BlockSet, range: Range<u64>) -> Vec<Range<u64>> {
    let mut segments: Vec<Range<u64>> = Vec::new();
    let mut from = range.start;
    // Bounded: each pass moves to the next block boundary.
    while from < range.end {
        let block = block_of(from);
        let to = ((block + 1) * BLOCK_SIZE).min(range.end);
        if !blocks.contains(block) {
            match segments.last_mut() {
                Some(last) if last.end == from => last.end = to,
                _ => segments.push(from..to),
            }
        }
        from = to;
    }
    segments
}

/// `run` cut on the grid of [`PART_BLOCKS`].
fn grid_parts(run: Range<u64>) -> impl Iterator<Item = Range<u64>> {
    let mut start = run.start;
    std::iter::from_fn(move || {
        if start >= run.end {
            return None;
        }
        let end = ((start / PART_BLOCKS + 1) * PART_BLOCKS).min(run.end);
        let part = start..end;
        start = end;
        Some(part)
    })
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
    pub fn read_local(&self, offset: u64, len: u64) -> FsResult<Option<Buffer>> {
        let mut state = self.lock();
        state.check_not_corrupt()?;
        let end = offset.saturating_add(len).min(state.size);
        if offset >= end {
            return Ok(Some(Buffer::empty()));
        }
        if !Self::missing(&state, offset..end).is_empty() {
            return Ok(None);
        }
        state.last_access = Instant::now();
        let mut buf = Buffer::take((end - offset) as usize);
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

    /// Downloads block runs from the bucket into the file and returns once all of them are
    /// present: parts nobody is fetching are downloaded (in parallel), parts another task
    /// is fetching are waited for. Blocks written locally in the meantime are left alone.
    pub async fn fetch(&self, backend: &Backend, runs: Vec<Range<u64>>) -> FsResult<()> {
        let deadline = tokio::time::Instant::now() + FETCH_WAIT;
        for _ in 0..FETCH_PASSES {
            // Subscribed before claiming: a release in between still wakes the wait below.
            let mut landed = self.landed.subscribe();
            let (claims, source, others) = self.claim(&runs)?;
            if let Some(source) = source {
                self.download(backend, &source, claims).await?;
            }
            if !others {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, landed.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        Err(FsError::loud(
            libc::EIO,
            format!(
                "inode {}: blocks another read was downloading did not arrive",
                self.ino
            ),
        ))
    }

    /// Downloads the blocks of `runs` nobody is fetching yet, without waiting for the ones
    /// in flight elsewhere: the read-ahead.
    pub async fn fetch_ahead(&self, backend: &Backend, runs: Vec<Range<u64>>) -> FsResult<()> {
        let (claims, source, _others) = self.claim(&runs)?;
        match source {
            Some(source) => self.download(backend, &source, claims).await,
            None => Ok(()),
        }
    }

    /// Claims the missing blocks of `runs` nobody is fetching, as parts on the grid.
    /// Returns the claims, what to fetch them from (`None` when nothing was claimed), and
    /// whether some blocks were in flight elsewhere.
    fn claim(&self, runs: &[Range<u64>]) -> FsResult<(Vec<Claim<'_>>, Option<Source>, bool)> {
        let state = self.lock();
        state.check_not_corrupt()?;
        let limit_block = state.fetch_limit.div_ceil(BLOCK_SIZE);
        let mut in_flight = lock_set(&self.in_flight);
        let mut others = false;
        let mut claims = Vec::new();
        for run in runs {
            for missing in state
                .blocks
                .missing_runs(run.start..run.end.min(limit_block))
            {
                for part in grid_parts(missing) {
                    others |= self.claim_part(&mut in_flight, part, &mut claims);
                }
            }
        }
        drop(in_flight);
        if claims.is_empty() {
            return Ok((claims, None, others));
        }
        let Some(key) = state.source_key.clone() else {
            return Err(FsError::loud(
                libc::EIO,
                format!(
                    "inode {}: data missing and no object to fetch it from",
                    self.ino
                ),
            ));
        };
        let source = Source {
            key,
            limit: state.fetch_limit,
            epoch: state.source_epoch,
        };
        Ok((claims, Some(source), others))
    }

    /// Claims the blocks of `part` not in flight, as contiguous claims; returns whether
    /// some were in flight.
    fn claim_part<'a>(
        &'a self,
        in_flight: &mut HashSet<u64>,
        part: Range<u64>,
        claims: &mut Vec<Claim<'a>>,
    ) -> bool {
        let mut busy = false;
        let mut start = None;
        for block in part.clone() {
            if in_flight.insert(block) {
                start.get_or_insert(block);
                continue;
            }
            busy = true;
            if let Some(from) = start.take() {
                claims.push(Claim {
                    file: self,
                    blocks: from..block,
                });
            }
        }
        if let Some(from) = start {
            claims.push(Claim {
                file: self,
                blocks: from..part.end,
            });
        }
        busy
    }

    /// Downloads claimed parts, [`PARTS_IN_FLIGHT`] at a time; the first error wins (the
    /// other parts' claims are released as they end).
    async fn download(
        &self,
        backend: &Backend,
        source: &Source,
        claims: Vec<Claim<'_>>,
    ) -> FsResult<()> {
        let mut waiting = claims.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut first_error = None;
        // Bounded: one pass per claim, plus one to see the set empty.
        loop {
            while running.len() < PARTS_IN_FLIGHT {
                let Some(claim) = waiting.next() else { break };
                running.push(self.download_claim(backend, source, claim));
            }
            let Some(result) = running.next().await else {
                break;
            };
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn download_claim(
        &self,
        backend: &Backend,
        source: &Source,
        claim: Claim<'_>,
    ) -> FsResult<()> {
        // The claim is released (its waiters woken) when this returns.
        self.download_part(backend, source, &claim.blocks).await
    }

    /// Streams one part to the file as its bytes arrive (memory stays at one block),
    /// hashing it on the way, then checks it and marks its blocks present.
    async fn download_part(
        &self,
        backend: &Backend,
        source: &Source,
        blocks: &Range<u64>,
    ) -> FsResult<()> {
        let start = blocks.start * BLOCK_SIZE;
        let end = (blocks.end * BLOCK_SIZE).min(source.limit);
        if start >= end {
            return Ok(());
        }
        // Network chunks are small: they are gathered into a block per write.
        let mut block = Buffer::take(BLOCK_SIZE as usize);
        let mut filled = 0usize;
        let mut at = start;
        let crc = backend
            .stream_range(&source.key, start..end, |chunk| {
                // A chunk may cross a block boundary: the block is written when full.
                let mut rest = chunk;
                while !rest.is_empty() {
                    let n = rest.len().min(block.len() - filled);
                    block[filled..filled + n].copy_from_slice(&rest[..n]);
                    (filled, rest) = (filled + n, &rest[n..]);
                    if filled == block.len() {
                        if !self.store_chunk(at, &block, source.epoch)? {
                            return Ok(false);
                        }
                        at += filled as u64;
                        filled = 0;
                    }
                }
                Ok(true)
            })
            .await?;
        // `None`: the object was replaced meanwhile, and these bytes are stale.
        let Some(crc) = crc else {
            return Ok(());
        };
        if filled > 0 && !self.store_chunk(at, &block[..filled], source.epoch)? {
            return Ok(());
        }
        let mut state = self.lock();
        if state.source_epoch != source.epoch {
            return Ok(());
        }
        Self::verify(&mut state, start, end - start, crc)?;
        // A truncation meanwhile cut these bytes off: they are not the file's any more.
        let kept = blocks.start..blocks.end.min(state.fetch_limit.div_ceil(BLOCK_SIZE));
        for block in kept {
            state.blocks.insert(block);
        }
        Ok(())
    }

    /// Writes fetched bytes at `at`, except into blocks that became present meanwhile
    /// (local writes win). Returns false when the object was replaced since the claim.
    fn store_chunk(&self, at: u64, chunk: &[u8], epoch: u64) -> FsResult<bool> {
        // Held across the write, the state lock is not: readers of present blocks go on
        // meanwhile, while local writes and truncations (which take this lock) wait.
        let _writes = self.write_lock();
        let segments = {
            let state = self.lock();
            if state.source_epoch != epoch {
                return Ok(false);
            }
            // Bytes a truncation cut off are not written (they would regrow the file).
            let end = (at + chunk.len() as u64).min(state.fetch_limit);
            absent_segments(&state.blocks, at..end)
        };
        for segment in &segments {
            let slice = &chunk[(segment.start - at) as usize..(segment.end - at) as usize];
            write_in_pieces(&self.file, slice, segment.start)?;
        }
        let state = self.lock();
        if state.source_epoch == epoch {
            return Ok(true);
        }
        // The object was replaced during the write: its blocks are not marked present, so
        // the stale bytes are refetched before use, except past the new size, cut here.
        let wrote_to = segments.last().map_or(0, |s| s.end);
        if wrote_to > state.size {
            self.file
                .set_len(state.size)
                .map_err(|err| FsError::io("truncating cache file", err))?;
        }
        Ok(false)
    }

    /// Serialises writes to the cache file (fetched bytes, local writes, truncation).
    fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Feeds fetched bytes to the crc64 check. On a mismatch nothing of the object stays
    /// servable: fetched blocks are dropped (unless local writes are mixed in) and every
    /// later read fails.
    fn verify(state: &mut FileState, start: u64, len: u64, crc: u64) -> FsResult<()> {
        let Some(verifier) = state.verifier.as_mut() else {
            return Ok(());
        };
        if let Err(err) = verifier.feed_hashed(start, len, crc) {
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
        let _writes = self.write_lock();
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
        write_in_pieces(&self.file, data, offset)?;
        for block in touched {
            state.blocks.insert(block);
        }
        state.size = state.size.max(end);
        state.gen += 1;
        state.changed_at = None; // changed now
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
        let _writes = self.write_lock();
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
        state.changed_at = None; // changed now
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
    pub fn read_for_upload(&self, offset: u64, len: usize) -> FsResult<Buffer> {
        let mut buf = Buffer::take(len);
        let mut done = 0;
        // Bounded: each pass reads at least one byte or stops.
        while done < len {
            let got = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|err| FsError::io("reading cache file for upload", err))?;
            if got == 0 {
                buf[done..].fill(0); // sparse tail: zeros
                break;
            }
            done += got;
        }
        Ok(buf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether every byte is valid on disk, so the kernel may serve the file itself.
    pub fn is_complete(&self) -> bool {
        let state = self.lock();
        state.corrupt.is_none() && Self::missing(&state, 0..state.size).is_empty()
    }

    /// A second descriptor of the file, for the kernel's passthrough I/O.
    pub fn backing_file(&self) -> FsResult<File> {
        self.file
            .try_clone()
            .map_err(|err| FsError::io("duplicating cache file descriptor", err))
    }

    /// A handle opens for passthrough: the kernel reads (and, for a writer, writes) the
    /// file directly from now on. A writer makes the file changed at once: its writes
    /// never reach the daemon, so an upload that started before must not settle it. A
    /// writer gives the inode's mtime (`writer_mtime`): the cache file's starts there, so
    /// that afterwards it tells when the file last changed: at a kernel write, or at a
    /// utimens (which sets both).
    pub fn start_passthrough(&self, writer_mtime: Option<std::time::SystemTime>) -> FsResult<()> {
        if let Some(mtime) = writer_mtime {
            self.set_disk_mtime(mtime)?;
        }
        let mut state = self.lock();
        state.passthrough_opens += 1;
        state.absorbed_stamp = None;
        if let Some(mtime) = writer_mtime {
            // The new generation holds no change yet: a persist it causes before any
            // kernel write is taken in (say, by a release racing this open) must keep the
            // mtime, not stamp the file as changed now.
            if state.gen == state.persisted_gen && state.changed_at.is_none() {
                state.changed_at = Some(mtime);
            }
            state.kernel_writers += 1;
            state.gen += 1;
            state.dirty = true;
        }
        state.last_access = Instant::now();
        Ok(())
    }

    /// Sets the cache file's own mtime (see [`CacheFile::start_passthrough`]).
    /// Whether bytes are being written into the file now: by the kernel (passthrough) or
    /// through a handle the daemon serves.
    pub fn being_written(&self) -> bool {
        let state = self.lock();
        state.kernel_writers > 0 || (state.dirty && state.open_handles > 0)
    }

    /// Starts (does not wait for) writeback of the file's dirty pages, so that the
    /// fdatasync a close owes finds most of them on disk already.
    pub fn start_writeback(&self) {
        // SAFETY: the descriptor is this file's own, open for as long as `self` lives;
        // sync_file_range reads no memory of ours.
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            // Only an early start is lost: the close's fdatasync still writes everything.
            let err = std::io::Error::last_os_error();
            tracing::debug!(ino = self.ino, error = %err, "starting writeback of a cache file");
        }
    }

    /// Writes `range` of the file to disk, waiting for it, and drops it from the page
    /// cache. For bytes kept only in case they are read back (the write-through spool):
    /// on the VMs measured, page cache that grows into memory the host has taken back costs
    /// a host fault per page, while pages dropped here are reused warm by the next writes.
    pub fn write_out_and_forget(&self, range: Range<u64>) -> FsResult<()> {
        let fd = self.file.as_raw_fd();
        let (start, len) = (
            range.start as libc::off64_t,
            (range.end - range.start) as libc::off64_t,
        );
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: the descriptor is this file's own, open for as long as `self` lives;
        // neither call reads memory of ours.
        if unsafe { libc::sync_file_range(fd, start, len, flags) } != 0 {
            return Err(FsError::io(
                "writing the cache file to disk",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: as above.
        let rc = unsafe { libc::posix_fadvise(fd, start, len, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            // Only memory is lost: the pages stay cached until the file goes.
            let err = std::io::Error::from_raw_os_error(rc);
            tracing::debug!(ino = self.ino, error = %err, "dropping cache file pages");
        }
        Ok(())
    }

    pub fn set_disk_mtime(&self, mtime: std::time::SystemTime) -> FsResult<()> {
        self.file
            .set_modified(mtime)
            .map_err(|err| FsError::io("setting the cache file's mtime", err))
    }

    /// A passthrough handle was released (its writes were taken in before).
    pub fn end_passthrough(&self, write: bool) {
        let mut state = self.lock();
        state.passthrough_opens = state.passthrough_opens.saturating_sub(1);
        if write {
            state.kernel_writers = state.kernel_writers.saturating_sub(1);
        }
    }

    /// Takes in what kernel writers did, unseen: the size is the file's length on disk
    /// (which always equals the logical size: every resize goes through the daemon or
    /// through a write that extends the file), every block of it is local data, and the
    /// content is a new generation to upload. Nothing is taken in when the file is as it
    /// was at the last call (a close's flush, then its release): every close(2) flushes,
    /// so what remains unseen is mmap writes after the last close, and those move the
    /// file's mtime and ctime (nanoseconds; multigrain on kernels that have it).
    pub fn absorb_kernel_writes(&self) -> FsResult<()> {
        let disk = self.disk_metadata()?;
        let mut state = self.lock();
        let stamp = DiskStamp::of(&disk);
        if state.kernel_writers == 0 || state.absorbed_stamp == Some(stamp) {
            return Ok(());
        }
        state.absorbed_stamp = Some(stamp);
        let len = disk.len();
        state.changed_at = disk.modified().ok();
        state.size = len;
        for block in 0..len.div_ceil(BLOCK_SIZE) {
            state.blocks.insert(block);
        }
        state.gen += 1;
        state.dirty = true;
        state.last_access = Instant::now();
        Ok(())
    }

    /// The size writers see, with kernel writers' growth that was not taken in yet.
    pub fn current_size(&self) -> FsResult<u64> {
        let (size, kernel_writing) = {
            let state = self.lock();
            (state.size, state.kernel_writers > 0)
        };
        if kernel_writing {
            return self.disk_len();
        }
        Ok(size)
    }

    fn disk_len(&self) -> FsResult<u64> {
        Ok(self.disk_metadata()?.len())
    }

    fn disk_metadata(&self) -> FsResult<std::fs::Metadata> {
        self.file
            .metadata()
            .map_err(|err| FsError::io("stat of cache file", err))
    }

    /// Bytes of the bucket's data held locally.
    pub fn present_bytes(&self) -> u64 {
        self.lock().present_bytes()
    }
}

/// The cache directory and the files loaded from it.
pub struct DataCache {
    dir: PathBuf,
    limit: u64,
    files: Mutex<Registry>,
    /// Idle files kept loaded at most (each holds a descriptor); the least recently used
    /// beyond this are unloaded, their bytes kept.
    max_idle_loaded: usize,
    spares: SpareFiles,
}

/// Writes `data` at `offset` in pieces of [`WRITE_PIECE`].
fn write_in_pieces(file: &File, data: &[u8], offset: u64) -> FsResult<()> {
    let mut at = offset;
    for piece in data.chunks(WRITE_PIECE) {
        file.write_all_at(piece, at)
            .map_err(|err| FsError::io("writing cache file", err))?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Drops every byte of a cache file, keeping its size. Not a truncate to 0: on ext4 that
/// arms auto_da_alloc, which makes the next close of the file (a reader's, or the
/// kernel's passthrough handle) write back all its dirty pages in the closer's time: a
/// first warm read of 1 GiB just fetched ran at 2.4 GB/s instead of 12 (perf: the reader
/// in `mpage_process_page_bufs`). A new, empty file has nothing to drop.
fn discard_contents(file: &File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let punch = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match nix::fcntl::fallocate(file, punch, 0, len as libc::off_t) {
        Ok(()) => Ok(()),
        // A filesystem without hole punching: truncating is correct, only slower later.
        Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(0),
        Err(err) => Err(err.into()),
    }
}

impl DataCache {
    /// `saved`: the files with a saved presence map (bytes on disk from earlier sessions).
    pub fn open(
        dir: &Path,
        limit: u64,
        saved: Vec<SavedFile>,
        max_idle_loaded: usize,
    ) -> FsResult<DataCache> {
        std::fs::create_dir_all(dir)
            .map_err(|err| FsError::io(&format!("creating {}", dir.display()), err))?;
        Ok(DataCache {
            dir: dir.to_path_buf(),
            limit,
            files: Mutex::new(Registry::new(saved)),
            max_idle_loaded,
            // Not a number, so never an inode's file name.
            spares: SpareFiles::open(dir.join("spare"))?,
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn file_path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    /// Starts writeback of every file being written now (see [`CacheFile::start_writeback`]).
    pub fn start_writeback_of_writes(&self) {
        let files: Vec<Arc<CacheFile>> = self
            .registry()
            .loaded
            .values()
            .filter(|file| file.being_written())
            .cloned()
            .collect();
        for file in files {
            file.start_writeback();
        }
    }

    pub fn loaded(&self, ino: u64) -> Option<Arc<CacheFile>> {
        self.registry().loaded.get(&ino).cloned()
    }

    /// The cached file of an inode, loading it with `init` if needed.
    pub fn get_or_load(
        &self,
        ino: u64,
        init: impl FnOnce() -> FsResult<FileInit>,
    ) -> FsResult<Arc<CacheFile>> {
        let mut files = self.registry();
        if let Some(file) = files.loaded.get(&ino) {
            return Ok(file.clone());
        }
        let init = init()?;
        let path = self.file_path(ino);
        if init.saved_blocks.is_none() {
            // Nothing on disk is trusted (below): an empty spare may replace it.
            self.spares.take_to(&path);
        }
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
                discard_contents(&file).map_err(|err| FsError::io("resetting cache file", err))?;
                BlockSet::default()
            }
        };
        files.take_unloaded(ino);
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
                passthrough_opens: 0,
                kernel_writers: 0,
                changed_at: None,
                absorbed_stamp: None,
            }),
            in_flight: Mutex::new(HashSet::new()),
            landed: tokio::sync::watch::Sender::new(0),
            writes: Mutex::new(()),
        });
        files.loaded.insert(ino, cached.clone());
        Ok(cached)
    }

    /// Drops an inode's cached data; `forget` drops its saved block map under the
    /// registry's lock (see [`DataCache::evict_to`]).
    pub fn remove(&self, ino: u64, forget: &dyn Fn(u64) -> FsResult<()>) -> FsResult<()> {
        let mut files = self.registry();
        files.loaded.remove(&ino);
        files.take_unloaded(ino);
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
        let registered = files
            .loaded
            .get(&file.ino)
            .is_some_and(|f| Arc::ptr_eq(f, &file));
        let idle = {
            let state = file.lock();
            !state.dirty && state.open_handles == 0
        };
        // Two references: the registry's and the caller's.
        if !registered || !idle || Arc::strong_count(&file) > 2 {
            return Ok(false);
        }
        let ino = file.ino;
        files.loaded.remove(&ino);
        // The map goes first: `forget` is a synced commit, which the records saying the
        // file is clean must reach before its data goes (see `sync::record_remote`).
        forget(ino)?;
        self.retire(file)?;
        Ok(true)
    }

    /// Deletes the file of an inode the registry no longer holds, or keeps it emptied for
    /// reuse. Not while the kernel may still read it as a passthrough backing file.
    fn retire(&self, file: Arc<CacheFile>) -> FsResult<()> {
        let kept = file.lock().passthrough_opens == 0 && self.spares.keep(&file.file, &file.path);
        let ino = file.ino;
        drop(file);
        if kept {
            return Ok(());
        }
        self.delete_file(ino)
    }

    /// Another version of an inode's object replaced the cached one: `record` (the
    /// metadata update) runs, and the cached bytes go, both under the registry's lock, so
    /// no load in between sees one without the other. A loaded file (perhaps open) is
    /// emptied in place and refetches from `init`. Refused (`false`, nothing done) when
    /// the file has local changes (those are never dropped) or the kernel serves it
    /// itself (passthrough). `record` returns the bytes of saved presence it forgot (of a
    /// file not loaded).
    pub fn invalidate(
        &self,
        ino: u64,
        init: FileInit,
        record: impl FnOnce() -> FsResult<()>,
    ) -> FsResult<bool> {
        let mut files = self.registry();
        let Some(file) = files.loaded.get(&ino).cloned() else {
            record()?;
            self.delete_file(ino)?;
            files.take_unloaded(ino);
            return Ok(true);
        };
        let mut state = file.lock();
        if state.dirty || state.passthrough_opens > 0 {
            // Local changes win; and the kernel reads a passthrough file without asking.
            return Ok(false);
        }
        record()?;
        discard_contents(&file.file)
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
        let registered = files
            .loaded
            .get(&file.ino)
            .is_some_and(|f| Arc::ptr_eq(f, &file));
        // Two references: the registry's and the caller's.
        if !registered || Arc::strong_count(&file) > 2 {
            return Ok(false);
        }
        let entry = {
            let state = file.lock();
            if state.dirty || state.open_handles > 0 || state.corrupt.is_some() {
                return Ok(false);
            }
            save(&state)?;
            Unloaded::of(&state)
        };
        files.loaded.remove(&file.ino);
        files.put_unloaded(file.ino, entry);
        Ok(true)
    }

    /// Whether `file` is still the registered cache file of its inode.
    pub fn is_current(&self, file: &Arc<CacheFile>) -> bool {
        self.registry()
            .loaded
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
        let files = self.registry();
        let loaded: u64 = files.loaded.values().map(|f| f.present_bytes()).sum();
        loaded + files.unloaded_bytes()
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
            .loaded
            .values()
            .map(|f| {
                let state = f.lock();
                if state.dirty {
                    state.present_bytes()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Evicts clean, closed files once the cache holds more than its limit, down to a
    /// sixteenth below it: a full cache then evicts in batches, not one file per close.
    pub fn evict_to_limit(&self, forget: &dyn Fn(&[u64]) -> FsResult<()>) -> FsResult<Vec<u64>> {
        if self.used_bytes() <= self.limit {
            return Ok(Vec::new());
        }
        self.evict_to(self.limit - self.limit / 16, forget)
    }

    /// Evicts clean, closed files, least recently used first, until at most `target`
    /// bytes are held. Returns the inodes evicted.
    /// `forget` drops the evicted files' saved block maps (in one commit), under the
    /// registry's lock: a reload in between would otherwise trust the map of a file that
    /// is gone.
    pub fn evict_to(
        &self,
        target: u64,
        forget: &dyn Fn(&[u64]) -> FsResult<()>,
    ) -> FsResult<Vec<u64>> {
        let mut used = self.used_bytes();
        if used <= target {
            return Ok(Vec::new());
        }
        // The registry stays locked from choice to removal, and only files nobody else
        // holds are chosen: a handle, a read or an upload in progress keeps a reference,
        // and nothing can take a new one meanwhile. (An upload records the file clean and
        // its block map while holding it; evicting under it would strand that map.)
        let mut files = self.registry();
        let mut candidates: Vec<(Instant, u64, u64)> = files
            .loaded
            .values()
            .filter(|f| Arc::strong_count(f) == 1)
            .filter_map(|f| {
                let state = f.lock();
                let evictable = !state.dirty && state.open_handles == 0;
                evictable.then(|| (state.last_access, f.ino, state.present_bytes()))
            })
            .chain(files.evictable_unloaded())
            .collect();
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, ino, bytes) in candidates {
            if used <= target {
                break;
            }
            used = used.saturating_sub(bytes);
            evicted.push(ino);
        }
        // Maps first, as in `discard_if_unused`; on an error nothing is gone.
        forget(&evicted)?;
        for ino in &evicted {
            files.loaded.remove(ino);
            files.take_unloaded(*ino);
        }
        for ino in &evicted {
            self.delete_file(*ino)?;
        }
        Ok(evicted)
    }

    /// Unloads the least recently used idle files once more than `max_idle_loaded` are
    /// loaded, down to three quarters of it. Their bytes stay (and count, and are evicted
    /// like any others); `save` stores their presence maps first, in one commit, for the
    /// next load. Idle: clean, closed, not served by the kernel, and held by nobody.
    pub fn unload_idle(&self, save: &dyn Fn(&[SavedMap]) -> FsResult<()>) -> FsResult<usize> {
        let mut files = self.registry();
        if files.loaded.len() <= self.max_idle_loaded {
            return Ok(0);
        }
        let mut idle: Vec<(Instant, u64)> = files
            .loaded
            .values()
            .filter(|f| Arc::strong_count(f) == 1)
            .filter_map(|f| {
                let state = f.lock();
                let idle = !state.dirty
                    && state.open_handles == 0
                    && state.passthrough_opens == 0
                    && state.corrupt.is_none()
                    && state.gen == state.persisted_gen;
                idle.then_some((state.last_access, f.ino))
            })
            .collect();
        idle.sort();
        let excess = files.loaded.len() - self.max_idle_loaded * 3 / 4;
        idle.truncate(excess);
        let mut maps: Vec<SavedMap> = Vec::with_capacity(idle.len());
        let mut entries = Vec::with_capacity(idle.len());
        for (_, ino) in idle {
            let Some(file) = files.loaded.get(&ino) else {
                continue;
            };
            let state = file.lock();
            maps.push((ino, state.blocks.to_bytes()));
            entries.push((ino, Unloaded::of(&state)));
        }
        save(&maps)?;
        for (ino, entry) in &entries {
            files.loaded.remove(ino);
            files.put_unloaded(*ino, *entry);
        }
        Ok(entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A 1 GiB cache in a directory of its own (kept alive by the returned guard).
    fn new_cache() -> (tempfile::TempDir, DataCache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DataCache::open(dir.path(), 1 << 30, Vec::new(), 64).expect("open cache");
        (dir, cache)
    }

    fn new_file(cache: &DataCache, ino: u64) -> Arc<CacheFile> {
        cache
            .get_or_load(ino, || Ok(FileInit::new_empty()))
            .unwrap_or_else(|err| panic!("load {ino}: {err:?}"))
    }

    #[test]
    fn a_passthrough_writer_start_keeps_the_mtime_for_a_persist_before_any_write() {
        let (_dir, cache) = new_cache();
        let file = new_file(&cache, 7);
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
        {
            let mut state = file.lock();
            state.persisted_gen = state.gen;
        }
        file.start_passthrough(Some(when)).expect("start");
        {
            let state = file.lock();
            assert!(
                state.gen > state.persisted_gen,
                "uploads must not settle it"
            );
            assert_eq!(state.changed_at, Some(when), "nothing changed yet");
        }
        file.end_passthrough(true);
        // After a persist, a daemon-served write is pending (`None`: it changed the file
        // now): the next writer's start leaves that time alone.
        {
            let mut state = file.lock();
            state.changed_at = None;
            state.persisted_gen = state.gen;
        }
        file.write_local(0, b"served").expect("write");
        file.start_passthrough(Some(when)).expect("start again");
        assert_eq!(file.lock().changed_at, None);
    }

    #[test]
    fn a_discarded_file_comes_back_empty_as_the_next_new_file() {
        let (_dir, cache) = new_cache();
        let first = new_file(&cache, 5);
        assert!(matches!(
            first.write_local(0, b"bytes of inode 5").expect("write"),
            WriteOutcome::Written
        ));
        let old_inode = std::fs::metadata(cache.file_path(5)).expect("stat").ino();
        first.lock().dirty = false;
        assert!(cache
            .discard_if_unused(first, &|_| Ok(()))
            .expect("discard"));
        assert!(!cache.file_path(5).exists());

        let second = new_file(&cache, 6);
        let disk = std::fs::metadata(cache.file_path(6)).expect("stat");
        assert_eq!(disk.ino(), old_inode, "the discarded file was reused");
        assert_eq!(disk.len(), 0, "nothing of inode 5 is left in it");
        assert!(matches!(
            second.write_local(0, b"six").expect("write"),
            WriteOutcome::Written
        ));
        let read = second.read_local(0, 16).expect("read").expect("present");
        assert_eq!(&read[..], b"six");
    }
}
