//! Refresh of outside changes: directories listed longer ago than `--meta-ttl` are listed
//! again (one delimiter listing) and compared with what the mount knows. New names appear,
//! names gone from the bucket vanish, and objects with another version (ETag) replace the
//! local record and drop its stale cached data. A local change not yet uploaded always
//! wins: a remote replacement of it is kept under a conflict key (see `sync::conflict`).
//!
//! Every change a listing suggests is confirmed with a HEAD (or a prefix probe for
//! directories) before it is applied, and applied only if the local state it was decided
//! on still holds: a listing can be older than an upload or unlink that just finished.
//! When the directory was last listed is kept in memory only.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{Core, MAX_NAME_BYTES, PARALLEL_HEADS};
use crate::backend::{AttrIndex, Kind, ListedEntry, ObjectAttrs, ObjectInfo};
use crate::cache::FileInit;
use crate::error::{FsError, FsResult};
use crate::integrity::ReadVerifier;
use crate::meta::{Inode, NewInode, RemoteState, ROOT_INO};
use crate::sync::conflict;

/// Directories whose last listing time is remembered; beyond it the oldest are listed
/// again on their next use.
const TRACKED_DIRS: u64 = 100_000;
/// Most directories one `bucketgate refresh` lists; the report says when it stopped short.
pub const MAX_REFRESH_DIRS: u64 = 10_000;

/// When each directory was last listed, and one listing of a directory at a time.
pub(super) struct Freshness {
    ttl: Option<Duration>,
    /// The instant the last completed listing of each directory started.
    listed_at: moka::sync::Cache<u64, Instant>,
    locks: moka::sync::Cache<u64, Arc<tokio::sync::Mutex<()>>>,
}

impl Freshness {
    /// `ttl`: how long a listing is trusted; `None`: forever.
    pub(super) fn new(ttl: Option<Duration>) -> Freshness {
        let mut listed_at = moka::sync::Cache::builder().max_capacity(TRACKED_DIRS);
        if let Some(ttl) = ttl {
            // Zero is checked by hand; the cache itself only needs to forget eventually.
            listed_at = listed_at.time_to_live(ttl.max(Duration::from_secs(1)));
        }
        Freshness {
            ttl,
            listed_at: listed_at.build(),
            locks: moka::sync::Cache::builder()
                .max_capacity(TRACKED_DIRS)
                .time_to_idle(Duration::from_secs(60))
                .build(),
        }
    }

    /// Whether `dir`'s local entries answer a question asked at `asked`: a listing that
    /// started after it always does; otherwise one younger than the TTL does, unless
    /// `force`.
    fn is_fresh(&self, dir: &Inode, asked: Instant, force: bool) -> bool {
        if !dir.listed {
            return false;
        }
        let started = self.listed_at.get(&dir.ino);
        if started.is_some_and(|at| at >= asked) {
            return true;
        }
        if force {
            return false;
        }
        match self.ttl {
            None => true,
            Some(ttl) => started.is_some_and(|at| at.elapsed() < ttl),
        }
    }

    pub(super) fn mark(&self, ino: u64, started: Instant) {
        self.listed_at.insert(ino, started);
    }

    fn lock_for(&self, ino: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .get_with(ino, || Arc::new(tokio::sync::Mutex::new(())))
    }
}

/// What a refresh found, summed over directories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefreshReport {
    pub directories: u64,
    pub added: u64,
    pub replaced: u64,
    pub deleted: u64,
    pub conflicts: u64,
    /// The refresh stopped at [`MAX_REFRESH_DIRS`] directories.
    pub truncated: bool,
}

impl RefreshReport {
    fn add(&mut self, other: RefreshReport) {
        self.directories += other.directories;
        self.added += other.added;
        self.replaced += other.replaced;
        self.deleted += other.deleted;
        self.conflicts += other.conflicts;
        self.truncated |= other.truncated;
    }

    fn one(field: fn(&mut RefreshReport)) -> RefreshReport {
        let mut report = RefreshReport::default();
        field(&mut report);
        report
    }
}

/// A difference between a listing and the local entries, still to be confirmed.
enum Change {
    /// A name the mount does not know.
    Added { key: String, entry: ListedEntry },
    /// The listing shows another version of the object than the one recorded.
    Changed { key: String, ino: u64 },
    /// The local record has no version yet: take the listing's.
    Adopt { ino: u64, etag: String },
    /// A name the mount knows is not in the listing.
    Gone { key: String, inode: Inode },
}

/// The key of a child named `name` of the directory at `dir_key`.
fn child_key(dir_key: &str, name: &str, is_dir: bool) -> String {
    if is_dir {
        format!("{dir_key}{name}/")
    } else {
        format!("{dir_key}{name}")
    }
}

/// What a listing says about a name the mount knows, if anything needs doing.
fn compare(child: Inode, key: String, entry: &ListedEntry) -> Option<Change> {
    if (child.kind == Kind::Dir) != entry.is_dir {
        tracing::debug!(
            key,
            "a file and a directory share this name; the local one stays"
        );
        return None;
    }
    if child.kind == Kind::Dir || child.remote_key.as_deref() != Some(key.as_str()) {
        return None; // directories carry no version; a moved file is the uploader's
    }
    match (&child.remote_etag, &entry.etag) {
        (Some(known), Some(listed)) if known == listed => None,
        (Some(_), Some(_)) => Some(Change::Changed {
            key,
            ino: child.ino,
        }),
        (None, Some(listed)) if child.remote_size == Some(entry.size) => Some(Change::Adopt {
            ino: child.ino,
            etag: listed.clone(),
        }),
        _ if child.remote_size != Some(entry.size) => Some(Change::Changed {
            key,
            ino: child.ino,
        }),
        _ => None,
    }
}

impl Core {
    /// How long the kernel may cache entries and attributes: at most a second, and never
    /// longer than the mount trusts its own metadata, or the kernel would hide changes.
    pub fn kernel_ttl(&self) -> Duration {
        let most = Duration::from_secs(1);
        self.config.meta_ttl.map_or(most, |ttl| ttl.min(most))
    }

    /// Makes sure the children of a directory are known locally and no older than the
    /// TTL (plain layout: one delimiter listing on first use, and again once stale).
    /// In `hashed` a listing shows hash prefixes, not children: local metadata is
    /// authoritative (rebuilt from a whole-bucket scan when the store is new), so neither
    /// this nor `refresh` lists anything there.
    pub(super) async fn ensure_listed(&self, dir: &Inode) -> FsResult<()> {
        if dir.kind != Kind::Dir
            || !self.backend.layout().lists_lazily()
            || self.fresh.is_fresh(dir, Instant::now(), false)
        {
            return Ok(());
        }
        self.revalidate(dir.ino, Instant::now(), false)
            .await
            .map(|_| ())
    }

    /// Lists a directory and brings its local entries in line, unless a listing started
    /// since `asked` (or, without `force`, a fresh one) already did. An already-listed
    /// directory whose listing fails keeps its entries (the bucket may be down) until the
    /// next TTL; `force` reports the failure instead.
    async fn revalidate(&self, ino: u64, asked: Instant, force: bool) -> FsResult<RefreshReport> {
        let lock = self.fresh.lock_for(ino);
        let _one_listing = lock.lock().await;
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir
            || !self.backend.layout().lists_lazily()
            || self.fresh.is_fresh(&dir, asked, force)
        {
            return Ok(RefreshReport::default());
        }
        let started = Instant::now();
        let key = self.key_of(&dir)?;
        let (listed, index) = self.list_with_index(&key, !dir.listed).await;
        let listed = match listed {
            Ok(listed) => listed,
            Err(err) => {
                let err = FsError::backend(
                    &format!("listing {}", if key.is_empty() { "/" } else { &key }),
                    err,
                );
                if !dir.listed || force {
                    return Err(err);
                }
                tracing::warn!(error = %err, "could not refresh a directory; serving what the mount knows until the next try");
                self.fresh.mark(ino, started);
                return Ok(RefreshReport::default());
            }
        };
        let mut report = if dir.listed {
            self.reconcile(&dir, &key, listed).await?
        } else {
            self.first_listing(&dir, &key, listed, index.as_ref())?
        };
        report.directories = 1;
        self.fresh.mark(ino, started);
        Ok(report)
    }

    /// Lists a directory and, for its first listing (`first`), reads its attribute index
    /// at the same time. An index that cannot be read only costs the HEADs it would save.
    async fn list_with_index(
        &self,
        key: &str,
        first: bool,
    ) -> (opendal::Result<Vec<ListedEntry>>, Option<AttrIndex>) {
        if !(first && self.config.attr_index) {
            return (self.backend.list_dir(key).await, None);
        }
        let (listed, index) = futures::join!(
            self.backend.list_dir(key),
            self.backend.read_attr_index(key)
        );
        let index = index.unwrap_or_else(|err| {
            tracing::debug!(key, error = %err, "no attribute index: each file gets a HEAD");
            None
        });
        (listed, index)
    }

    /// The local record of an object a listing found: with its attributes when the
    /// directory's index vouches for them, else to be completed by a HEAD.
    fn listed_inode(
        &self,
        key: String,
        entry: &ListedEntry,
        index: Option<&AttrIndex>,
    ) -> NewInode {
        let new = self.unheaded_inode(key, entry);
        match index.and_then(|index| index.attrs_for(entry, self.config.defaults)) {
            Some((attrs, crc64)) => with_indexed_attrs(new, &attrs, crc64),
            None => new,
        }
    }

    /// The local record of an object a listing found, before any HEAD.
    fn unheaded_inode(&self, key: String, entry: &ListedEntry) -> NewInode {
        let defaults = self.config.defaults;
        let kind = if entry.is_dir { Kind::Dir } else { Kind::File };
        let perm = match kind {
            Kind::Dir => 0o777 & !defaults.umask,
            _ => 0o666 & !defaults.umask,
        };
        NewInode {
            kind,
            perm,
            uid: defaults.uid,
            gid: defaults.gid,
            size: entry.size,
            mtime: entry
                .last_modified
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH),
            target: None,
            remote: Some(RemoteState {
                key,
                etag: entry.etag.clone(),
                size: entry.size,
                crc64: None,
            }),
            attrs_loaded: false,
            listed: false,
            dirty: false,
        }
    }

    /// The first listing of a directory: every name not known locally is added.
    fn first_listing(
        &self,
        dir: &Inode,
        key: &str,
        listed: Vec<ListedEntry>,
        index: Option<&AttrIndex>,
    ) -> FsResult<RefreshReport> {
        let found: Vec<(Vec<u8>, NewInode)> = listed
            .into_iter()
            .filter(|entry| entry.name.len() <= MAX_NAME_BYTES)
            .map(|entry| {
                let new =
                    self.listed_inode(child_key(key, &entry.name, entry.is_dir), &entry, index);
                (entry.name.into_bytes(), new)
            })
            .collect();
        let files: Vec<Vec<u8>> = found
            .iter()
            .filter(|(_, new)| new.kind == Kind::File)
            .map(|(name, _)| name.clone())
            .collect();
        let created = self.meta.add_listed(dir.ino, &found)?;
        if self.prefetch.is_some() {
            for name in files {
                if let Some(child) = self.meta.lookup(dir.ino, &name)? {
                    if created.contains(&child.ino) {
                        self.prefetch_later(child.ino);
                    }
                }
            }
        }
        Ok(RefreshReport {
            added: created.len() as u64,
            ..Default::default()
        })
    }

    /// Compares a new listing of an already-listed directory with its local entries and
    /// applies the confirmed differences, with HEADs in parallel.
    async fn reconcile(
        &self,
        dir: &Inode,
        key: &str,
        listed: Vec<ListedEntry>,
    ) -> FsResult<RefreshReport> {
        let mut local: HashMap<Vec<u8>, Inode> = self
            .meta
            .children(dir.ino)?
            .into_iter()
            .filter_map(|child| Some((child.name.clone()?, child)))
            .collect();
        let mut changes = Vec::new();
        for entry in listed
            .into_iter()
            .filter(|entry| entry.name.len() <= MAX_NAME_BYTES)
        {
            let child = child_key(key, &entry.name, entry.is_dir);
            match local.remove(entry.name.as_bytes()) {
                None => changes.push(Change::Added { key: child, entry }),
                Some(inode) => changes.extend(compare(inode, child, &entry)),
            }
        }
        for inode in local.into_values() {
            let name = String::from_utf8_lossy(inode.name.as_deref().unwrap_or_default());
            let child = child_key(key, &name, inode.kind == Kind::Dir);
            changes.push(Change::Gone { key: child, inode });
        }
        let results: Vec<FsResult<RefreshReport>> = futures::stream::iter(
            changes
                .into_iter()
                .map(|change| self.apply_change(dir.ino, change)),
        )
        .buffer_unordered(PARALLEL_HEADS)
        .collect()
        .await;
        let mut report = RefreshReport::default();
        for result in results {
            report.add(result?);
        }
        Ok(report)
    }

    async fn apply_change(&self, parent: u64, change: Change) -> FsResult<RefreshReport> {
        match change {
            Change::Added { key, entry } => self.apply_added(parent, key, entry).await,
            Change::Changed { key, ino } => self.apply_changed(ino, &key).await,
            Change::Adopt { ino, etag } => {
                self.meta.set_remote_etag(ino, Some(&etag))?;
                Ok(RefreshReport::default())
            }
            Change::Gone { key, inode } => self.apply_gone(&key, &inode).await,
        }
    }

    fn head_error(key: &str) -> impl FnOnce(opendal::Error) -> FsError + '_ {
        move |err| FsError::backend(&format!("HEAD {key}"), err)
    }

    /// A name new to the mount: added once the bucket confirms it, unless the key still
    /// belongs to local work (a rename or delete not carried out yet).
    async fn apply_added(
        &self,
        parent: u64,
        key: String,
        entry: ListedEntry,
    ) -> FsResult<RefreshReport> {
        let mut new = self.unheaded_inode(key.clone(), &entry);
        if entry.is_dir {
            let exists = self
                .backend
                .prefix_exists(&key)
                .await
                .map_err(Self::head_error(&key))?;
            if !exists {
                return Ok(RefreshReport::default());
            }
        } else {
            let info = self
                .backend
                .stat(&key)
                .await
                .map_err(Self::head_error(&key))?;
            let Some(info) = info else {
                return Ok(RefreshReport::default());
            };
            new = with_object_info(new, &info);
        }
        let name = entry.name.as_bytes();
        let created = self.meta.transaction(|tx| {
            if self.meta.key_in_use_tx(tx, &key)? {
                return Ok(None);
            }
            match self.meta.create_entry(tx, parent, name, &new) {
                Ok(inode) => Ok(Some(inode.ino)),
                Err(err) if err.errno == libc::EEXIST => Ok(None),
                Err(err) => Err(err),
            }
        })?;
        let Some(ino) = created else {
            return Ok(RefreshReport::default());
        };
        if new.kind == Kind::File {
            self.prefetch_later(ino);
        }
        Ok(RefreshReport::one(|r| r.added = 1))
    }

    /// Whether the kernel reads the inode's cache file itself (FUSE passthrough).
    fn served_by_kernel(&self, ino: u64) -> bool {
        self.cache
            .loaded(ino)
            .is_some_and(|file| file.lock().passthrough_opens > 0)
    }

    /// Whether the inode holds changes the bucket does not have yet.
    fn has_local_changes(&self, ino: u64) -> FsResult<bool> {
        let cached_dirty = self.cache.loaded(ino).is_some_and(|file| file.lock().dirty);
        Ok(cached_dirty || self.meta.has_local_changes(ino)?)
    }

    /// The listing shows another version of an object: after a HEAD confirms it, the
    /// local record follows and the cached bytes of the old version go; or, when the
    /// inode has local changes, the remote version is preserved (the local one wins).
    async fn apply_changed(&self, ino: u64, key: &str) -> FsResult<RefreshReport> {
        let info = self
            .backend
            .stat(key)
            .await
            .map_err(Self::head_error(key))?;
        let Some(info) = info else {
            return Ok(RefreshReport::default()); // gone too: the next listing says so
        };
        let Some(current) = self.meta.get(ino)? else {
            return Ok(RefreshReport::default());
        };
        if current.remote_key.as_deref() != Some(key) || conflict::same_version(&current, &info) {
            return Ok(RefreshReport::default()); // moved, or our own upload seen late
        }
        if self.served_by_kernel(ino) {
            // A passthrough reader reads the cached bytes without asking: they stay until
            // it closes, and a later refresh replaces them.
            tracing::debug!(
                key,
                "replaced in the bucket while open in passthrough; later"
            );
            return Ok(RefreshReport::default());
        }
        if !self.has_local_changes(ino)? && self.replace_record(&current, key, &info)? {
            if let Some(kernel) = self.kernel.get() {
                kernel.forget_inode(ino);
            }
            tracing::info!(
                key,
                etag = info.etag.as_deref().unwrap_or("-"),
                "replaced in the bucket by another tool; cached data of the old version dropped"
            );
            self.prefetch_later(ino);
            return Ok(RefreshReport::one(|r| r.replaced = 1));
        }
        conflict::preserve_remote(
            &self.backend,
            &self.meta,
            ino,
            key,
            current.remote_etag.as_deref(),
            info.etag.as_deref(),
        )
        .await?;
        Ok(RefreshReport::one(|r| r.conflicts = 1))
    }

    /// Records another version of an inode's object and drops the cached bytes of the old
    /// one, together. `false` when the cached file turned out to have local changes.
    fn replace_record(&self, inode: &Inode, key: &str, info: &ObjectInfo) -> FsResult<bool> {
        let init = FileInit {
            size: info.size,
            fetch_limit: info.size,
            source_key: Some(key.to_string()),
            dirty: false,
            saved_blocks: None,
            verifier: info.crc64.map(|crc| ReadVerifier::new(key, crc, info.size)),
        };
        let ino = inode.ino;
        self.cache.invalidate(ino, init, || {
            self.meta.record_replaced(ino, info)?;
            self.meta.forget_blocks(ino)
        })
    }

    /// A name the mount knows is no longer in the bucket. It goes (a directory with
    /// everything below it) once a HEAD or prefix probe confirms it, unless it or
    /// something below it has local changes: those stay and are uploaded again.
    async fn apply_gone(&self, key: &str, inode: &Inode) -> FsResult<RefreshReport> {
        if inode.remote_key.as_deref() != Some(key) {
            return Ok(RefreshReport::default()); // never stored, or moving: local work
        }
        if inode.kind != Kind::Dir && self.has_local_changes(inode.ino)? {
            tracing::warn!(
                key,
                local_etag = inode.remote_etag.as_deref().unwrap_or("-"),
                remote_etag = "deleted",
                "conflict: another tool deleted this object while a local change was not uploaded yet; the local version wins and is uploaded again"
            );
            return Ok(RefreshReport::one(|r| r.conflicts = 1));
        }
        let exists = if inode.kind == Kind::Dir {
            self.backend.prefix_exists(key).await
        } else {
            self.backend.stat(key).await.map(|info| info.is_some())
        }
        .map_err(Self::head_error(key))?;
        if exists {
            return Ok(RefreshReport::default());
        }
        let removed = self.meta.transaction(|tx| {
            if !self.meta.still_at_key_tx(tx, inode.ino, key)? {
                return Ok(Vec::new());
            }
            let mut inos = self.meta.descendants(tx, inode.ino)?;
            inos.push(inode.ino);
            for ino in &inos {
                if self.meta.has_local_changes_tx(tx, *ino)? {
                    return Ok(Vec::new());
                }
            }
            for ino in &inos {
                self.meta.remove_gone_tx(tx, *ino, self.is_open(*ino))?;
            }
            Ok(inos)
        })?;
        if removed.is_empty() {
            return Ok(RefreshReport::default());
        }
        for ino in &removed {
            self.drop_cached_data(*ino)?;
        }
        if let (Some(kernel), Some(parent), Some(name)) =
            (self.kernel.get(), inode.parent, inode.name.as_deref())
        {
            kernel.forget_entry(parent, name);
        }
        tracing::info!(key, "deleted in the bucket by another tool");
        Ok(RefreshReport::one(|r| r.deleted = 1))
    }

    /// `bucketgate refresh`: revalidates `path` (names from the mount's root; a file
    /// means its directory) and every directory known locally below it, now, whatever
    /// their age. Bounded by [`MAX_REFRESH_DIRS`] listings.
    pub async fn refresh(&self, path: &str) -> FsResult<RefreshReport> {
        let mut report = RefreshReport::default();
        let target = self.resolve_refreshing(path, &mut report).await?;
        let start = match target.kind {
            Kind::Dir => target.ino,
            _ => target.parent.unwrap_or(ROOT_INO),
        };
        let mut pending = VecDeque::from([start]);
        let mut listed = 0u64;
        // Bounded by MAX_REFRESH_DIRS.
        while let Some(ino) = pending.pop_front() {
            if listed >= MAX_REFRESH_DIRS {
                report.truncated = true;
                break;
            }
            report.add(self.revalidate(ino, Instant::now(), true).await?);
            listed += 1;
            if target.kind != Kind::Dir {
                break;
            }
            pending.extend(
                self.meta
                    .children(ino)?
                    .into_iter()
                    .filter(|child| child.kind == Kind::Dir && child.listed)
                    .map(|child| child.ino),
            );
        }
        Ok(report)
    }

    /// The inode at `path`, listing directories on the way where a name is not known
    /// locally yet (it may be new in the bucket).
    async fn resolve_refreshing(&self, path: &str, report: &mut RefreshReport) -> FsResult<Inode> {
        let mut current = self.inode(ROOT_INO)?;
        for name in path.split('/').filter(|name| !name.is_empty()) {
            if current.kind != Kind::Dir {
                return Err(FsError::new(
                    libc::ENOTDIR,
                    format!("{path}: not a directory"),
                ));
            }
            let found = match self.meta.lookup(current.ino, name.as_bytes())? {
                Some(child) => child,
                None => {
                    report.add(self.revalidate(current.ino, Instant::now(), true).await?);
                    self.meta
                        .lookup(current.ino, name.as_bytes())?
                        .ok_or_else(|| {
                            FsError::new(
                                libc::ENOENT,
                                format!("{path}: not in the mount or the bucket"),
                            )
                        })?
                }
            };
            current = found;
        }
        Ok(current)
    }
}

/// A listed object's record completed with what its HEAD said.
fn with_object_info(mut new: NewInode, info: &ObjectInfo) -> NewInode {
    let attrs = &info.attrs;
    new.kind = attrs.kind;
    new.perm = attrs.perm;
    new.uid = attrs.uid;
    new.gid = attrs.gid;
    new.mtime = attrs.mtime;
    new.size = info.size;
    // A symlink's target is read with its attributes, on first use.
    new.attrs_loaded = attrs.kind != Kind::Symlink;
    if let Some(remote) = new.remote.as_mut() {
        remote.etag = info.etag.clone();
        remote.size = info.size;
        remote.crc64 = info.crc64;
    }
    new
}

/// A listed file's record completed with what its directory's index says.
fn with_indexed_attrs(mut new: NewInode, attrs: &ObjectAttrs, crc64: Option<u64>) -> NewInode {
    new.perm = attrs.perm;
    new.uid = attrs.uid;
    new.gid = attrs.gid;
    new.mtime = attrs.mtime;
    new.attrs_loaded = true;
    if let Some(remote) = new.remote.as_mut() {
        remote.crc64 = crc64;
    }
    new
}
