//! The filesystem itself, with no FUSE types: inodes, handles, modes and their semantics.
//! Every method may be called from any task; none blocks on the network while holding a
//! lock another request needs.

mod handle;
mod listing;
mod page_cache;
mod passthrough;
mod prefetch;
mod refresh;
mod window;

pub use listing::Listing;
pub use page_cache::PageCache;
pub use refresh::{RefreshReport, MAX_REFRESH_DIRS};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use crate::backend::{attr_index, AttrDefaults, Backend, Kind};
use crate::cache::{CacheFile, DataCache, WriteOutcome, BLOCK_SIZE, PART_BLOCKS};
use crate::config::Mode;
use crate::error::{FsError, FsResult};
use crate::meta::{AttrChange, Inode, JournalOp, JournalSummary, MetaStore, NewInode, ROOT_INO};
use crate::sync::upload::{Ledger, StreamUpload, Uploaded};
use crate::sync::{
    attrs_of, discard_cache_file, file_init, read_verifier, unload_idle_files, FlushScope, Uploader,
};
use handle::{Handle, Opener};

/// Longest name of one path component.
pub const MAX_NAME_BYTES: usize = 255;
/// HEAD requests in flight while readdirplus fills in attributes.
const PARALLEL_HEADS: usize = 32;
/// Syncs a write-through directory rename runs at once (copies and deletes, small
/// requests that wait on the network), as many as a direct client's 16 threads.
const WRITE_THROUGH_PARALLEL_SYNCS: usize = 16;
/// Largest read-ahead for a sequential reader in cached and sync mode: this many parts
/// of [`PART_BLOCKS`] in flight at once, streamed to the cache disk.
const MAX_READ_AHEAD: u64 = 8 * PART_BLOCKS * BLOCK_SIZE;
/// The write-through spool keeps at most about two of these in the page cache.
const SPOOL_WINDOW: u64 = 8 << 20;
/// Largest read-ahead in write-through mode, where it is held in memory.
const MAX_STREAM_AHEAD: u64 = window::MAX_PARTS_AHEAD as u64 * window::STREAM_PART;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub mode: Mode,
    pub part_size: u64,
    pub upload_concurrency: usize,
    pub upload_delay: Duration,
    pub flush_timeout: Duration,
    /// How long a writer waits for room when unsent data fills the cache.
    pub dirty_wait: Duration,
    pub read_only: bool,
    pub defaults: AttrDefaults,
    /// How long listings are trusted before the bucket is asked again; `None`: forever.
    pub meta_ttl: Option<Duration>,
    /// Whether complete cached files may be served by the kernel itself (passthrough).
    pub passthrough: bool,
    /// Whether a directory's first listing reads its attribute index.
    pub attr_index: bool,
}

/// A handle as opened: its number, and when the kernel is to serve it from the cache
/// file itself (FUSE passthrough), a descriptor of that file.
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    pub backing: Option<std::fs::File>,
    /// How the kernel's page cache treats the handle when the daemon serves it.
    pub page_cache: PageCache,
}

/// Attributes as the adapter reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// A setattr request.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub fh: Option<u64>,
}

/// Open flags the core cares about.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
}

impl OpenMode {
    pub fn from_flags(flags: i32) -> OpenMode {
        let acc = flags & libc::O_ACCMODE;
        OpenMode {
            write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            truncate: flags & libc::O_TRUNC != 0,
            append: flags & libc::O_APPEND != 0,
        }
    }
}

/// Who asks: the kernel's caller of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// One directory entry for readdir.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
    /// Filled for readdirplus.
    pub attr: Option<Attr>,
}

/// What `status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub mode: &'static str,
    pub source: String,
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    pub uploads_in_flight: u64,
    /// Whether new handles of complete cached files may be served by the kernel.
    pub passthrough: bool,
    /// Handles the kernel served itself (passthrough) since the mount.
    pub passthrough_handles: u64,
    #[serde(flatten)]
    pub journal: JournalSummary,
}

/// What the kernel may have cached about outside changes and must forget; the adapter
/// implements it. Calls must not block: they come from inside requests.
pub trait KernelCache: Send + Sync {
    /// A name in `parent` changed (removed in the bucket).
    fn forget_entry(&self, parent: u64, name: &[u8]);
    /// An inode's attributes and pages are stale (replaced in the bucket).
    fn forget_inode(&self, ino: u64);
}

pub struct Core {
    config: CoreConfig,
    meta: Arc<MetaStore>,
    backend: Backend,
    cache: Arc<DataCache>,
    uploader: Arc<Uploader>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Open directories and what each lists.
    listings: listing::Listings,
    next_fh: AtomicU64,
    /// Sizes of files being streamed (write-through), ahead of the metadata store.
    live_sizes: Mutex<HashMap<u64, u64>>,
    /// The last dirty-bytes count and when it was taken (back-pressure).
    dirty_sample: Mutex<(std::time::Instant, u64)>,
    /// Open handles per inode (all modes); an unlinked inode lives until this drops to 0.
    open_counts: Mutex<HashMap<u64, u32>>,
    /// When directories were last listed (refresh of outside changes).
    fresh: refresh::Freshness,
    /// Sync mode: discovered objects waiting for their data.
    prefetch: Option<prefetch::Prefetch>,
    /// The kernel's caches, told about outside changes once the mount is up.
    kernel: std::sync::OnceLock<Arc<dyn KernelCache>>,
    /// Which handles the kernel serves itself (passthrough).
    kernel_io: passthrough::KernelIo,
    /// Which handles the kernel's page cache keeps.
    page_cache: page_cache::PageCachePolicy,
}

/// Bytes of cache that block runs take.
fn run_bytes(runs: &[std::ops::Range<u64>]) -> u64 {
    runs.iter().map(|r| (r.end - r.start) * BLOCK_SIZE).sum()
}

/// A name a new entry may take: storable, and not the gateway's reserved top-level name.
fn check_new_name(parent: u64, name: &[u8]) -> FsResult<()> {
    check_name(name)?;
    let reserved = crate::backend::RESERVED_PREFIX
        .trim_end_matches('/')
        .as_bytes();
    if parent == ROOT_INO && name == reserved {
        return Err(FsError::loud(
            libc::EPERM,
            "`.bucketgate` at the top of the bucket is reserved for the gateway's own objects; choose another name",
        ));
    }
    Ok(())
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("name of {} bytes is over {MAX_NAME_BYTES}", name.len()),
        ));
    }
    if std::str::from_utf8(name).is_err() {
        return Err(FsError::loud(
            libc::EINVAL,
            "name is not UTF-8; object keys must be UTF-8",
        ));
    }
    Ok(())
}

/// Whether the store says the bucket holds the file's current data (a stored file with
/// no data change pending), so that an attribute change can go into its object's metadata.
fn data_stored(inode: &Inode) -> bool {
    inode.kind == Kind::File
        && !inode.data_dirty()
        && inode.remote_key.as_ref().is_some_and(|key| !key.is_empty())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Core {
    pub fn new(
        config: CoreConfig,
        meta: Arc<MetaStore>,
        backend: Backend,
        cache: Arc<DataCache>,
        uploader: Arc<Uploader>,
    ) -> Core {
        let fresh = refresh::Freshness::new(config.meta_ttl);
        let prefetch = (config.mode == Mode::Sync).then(prefetch::Prefetch::default);
        let kernel_io = passthrough::KernelIo::new(config.passthrough && config.mode.keeps_data());
        Core {
            kernel_io,
            page_cache: page_cache::PageCachePolicy::default(),
            config,
            fresh,
            prefetch,
            kernel: std::sync::OnceLock::new(),
            meta,
            backend,
            cache,
            uploader,
            handles: Mutex::new(HashMap::new()),
            listings: listing::Listings::default(),
            next_fh: AtomicU64::new(1),
            live_sizes: Mutex::new(HashMap::new()),
            dirty_sample: Mutex::new((std::time::Instant::now(), 0)),
            open_counts: Mutex::new(HashMap::new()),
        }
    }

    /// Connects the kernel's caches (after mounting), so outside changes reach them.
    pub fn set_kernel_cache(&self, kernel: Arc<dyn KernelCache>) {
        if self.kernel.set(kernel).is_err() {
            tracing::debug!("kernel cache already connected");
        }
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    fn write_through(&self) -> bool {
        self.config.mode == Mode::WriteThrough
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.config.read_only {
            return Err(FsError::new(libc::EROFS, "mounted read-only"));
        }
        Ok(())
    }

    fn inode(&self, ino: u64) -> FsResult<Inode> {
        self.meta.get(ino)?.ok_or_else(FsError::not_found)
    }

    fn attr_of(&self, inode: &Inode) -> Attr {
        let mut size = inode.size;
        if let Some(live) = lock(&self.live_sizes).get(&inode.ino) {
            size = *live;
        } else if let Some(file) = self.cache.loaded(inode.ino) {
            size = file.current_size().unwrap_or_else(|err| {
                tracing::debug!(ino = inode.ino, error = %err, "size of a passthrough file");
                file.lock().size
            });
        }
        if inode.kind == Kind::Symlink {
            size = inode.target.as_ref().map_or(size, |t| t.len() as u64);
        }
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            size,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            mtime: inode.mtime,
            ctime: inode.ctime,
        }
    }

    fn key_of(&self, inode: &Inode) -> FsResult<String> {
        let names = self
            .meta
            .path_of(inode.ino)?
            .ok_or_else(FsError::not_found)?;
        self.backend.layout().key_for(&names, inode.kind)
    }

    /// Queues bucket work for an inode and, in write-through mode, does it now.
    async fn sync_now_or_later(&self, ops: Vec<JournalOp>) -> FsResult<()> {
        if !self.write_through() {
            self.uploader.wake();
            return Ok(());
        }
        // The inodes a directory rename moved are independent (each under its own key's
        // lock), so their syncs run side by side, as the background uploader runs them;
        // every other op (a replaced target's delete, old markers deepest first) keeps its
        // place in the order.
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            let JournalOp::Sync(ino) = op else {
                self.uploader.run_now(op).await?;
                continue;
            };
            let mut inos = vec![ino];
            while let Some(JournalOp::Sync(next)) =
                ops.next_if(|op| matches!(op, JournalOp::Sync(_)))
            {
                inos.push(next);
            }
            self.uploader
                .sync_now(inos, WRITE_THROUGH_PARALLEL_SYNCS)
                .await?;
        }
        Ok(())
    }

    fn delay(&self) -> Duration {
        if self.write_through() {
            // Run by the caller at once; keep background workers off it meanwhile.
            Duration::from_secs(3600)
        } else {
            self.config.upload_delay
        }
    }

    // --- namespace ---

    /// Fills in the attributes of an inode found by listing (one HEAD).
    async fn ensure_attrs(&self, inode: Inode) -> FsResult<Inode> {
        if inode.attrs_loaded {
            return Ok(inode);
        }
        let Some(key) = inode.remote_key.clone() else {
            return Ok(inode);
        };
        let info = self
            .backend
            .stat(&key)
            .await
            .map_err(|err| FsError::backend(&format!("HEAD {key}"), err))?;
        if let Some(info) = info {
            let attrs = info.attrs;
            if attrs.kind == Kind::Symlink {
                // The target first: attributes marked loaded promise it is there.
                let target = self
                    .backend
                    .read_all(&key)
                    .await
                    .map_err(|err| FsError::backend(&format!("reading symlink {key}"), err))?
                    .to_vec();
                self.meta.set_target(inode.ino, &target)?;
            }
            self.meta.set_loaded_attrs(inode.ino, &attrs, info.crc64)?;
        } else {
            // A directory known only from a common prefix has no marker: keep defaults.
            self.meta
                .set_loaded_attrs(inode.ino, &attrs_of(&inode), None)?;
        }
        self.inode(inode.ino)
    }

    async fn child(&self, parent: u64, name: &[u8]) -> FsResult<Option<Inode>> {
        let dir = self.inode(parent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        self.ensure_listed(&dir).await?;
        self.meta.lookup(parent, name)
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        let inode = self
            .child(parent, name)
            .await?
            .ok_or_else(FsError::not_found)?;
        let inode = self.ensure_attrs(inode).await?;
        Ok(self.attr_of(&inode))
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let inode = self.ensure_attrs(self.inode(ino)?).await?;
        Ok(self.attr_of(&inode))
    }

    /// A directory's entries. With `with_attrs` (readdirplus), each carries its
    /// attributes; those not known yet are fetched with parallel HEADs, not one by one.
    /// Opens a directory for reading; returns its handle.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.listings.open(fh);
        Ok(fh)
    }

    pub fn releasedir(&self, fh: u64) {
        self.listings.release(fh);
    }

    /// What the directory handle `fh` lists, for a reader at `offset`: the listing taken
    /// when the reader started, or a new one.
    pub async fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        with_attrs: bool,
    ) -> FsResult<Arc<Listing>> {
        if let Some(listing) = self.listings.kept(fh, offset, with_attrs) {
            return Ok(listing);
        }
        let listing = Arc::new(Listing {
            with_attrs,
            entries: self.list_dir(ino, with_attrs).await?,
        });
        self.listings.keep(fh, listing.clone());
        Ok(listing)
    }

    async fn list_dir(&self, ino: u64, with_attrs: bool) -> FsResult<Vec<DirEntry>> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        self.ensure_listed(&dir).await?;
        let parent = self.inode(dir.parent.unwrap_or(ROOT_INO))?;
        let mut children = self.meta.children(ino)?;
        if with_attrs {
            children =
                futures::stream::iter(children.into_iter().map(|child| self.ensure_attrs(child)))
                    .buffered(PARALLEL_HEADS)
                    .collect::<Vec<FsResult<Inode>>>()
                    .await
                    .into_iter()
                    .collect::<FsResult<Vec<Inode>>>()?;
        }
        let entry = |inode: &Inode, name: Vec<u8>| DirEntry {
            ino: inode.ino,
            kind: inode.kind,
            name,
            attr: with_attrs.then(|| self.attr_of(inode)),
        };
        let mut entries = vec![entry(&dir, b".".to_vec()), entry(&parent, b"..".to_vec())];
        for child in &children {
            if let Some(name) = &child.name {
                entries.push(entry(child, name.clone()));
            }
        }
        Ok(entries)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.ensure_attrs(self.inode(ino)?).await?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::new(libc::EINVAL, "not a symlink"));
        }
        Ok(inode.target.unwrap_or_default())
    }

    fn new_entry(
        &self,
        kind: Kind,
        perm: u32,
        uid: u32,
        gid: u32,
        target: Option<Vec<u8>>,
    ) -> NewInode {
        NewInode {
            kind,
            perm,
            uid,
            gid,
            size: 0,
            mtime: SystemTime::now(),
            target,
            remote: None,
            attrs_loaded: true,
            listed: true,
            dirty: true,
        }
    }

    /// Creates an entry and queues its upload, in one transaction; checks the key fits.
    async fn create_node(&self, parent: u64, name: &[u8], new: NewInode) -> FsResult<Inode> {
        self.check_writable()?;
        check_new_name(parent, name)?;
        if self.child(parent, name).await?.is_some() {
            return Err(FsError::new(libc::EEXIST, "file exists"));
        }
        let mut names = self.meta.path_of(parent)?.ok_or_else(FsError::not_found)?;
        names.push(name.to_vec());
        self.backend.layout().key_for(&names, new.kind)?;
        let delay = self.delay();
        let create = |tx: &rusqlite::Transaction<'_>| {
            let inode = self.meta.create_entry(tx, parent, name, &new)?;
            self.meta.enqueue(tx, &JournalOp::Sync(inode.ino), delay)?;
            Ok(inode)
        };
        let inode = if new.kind == Kind::File {
            // Made durable by the file's close (`persist`) or its upload's ledger entry.
            self.meta
                .transaction_deferred(|tx| create(tx).map(|i| (i.clone(), i.ino)))?
        } else {
            self.meta.transaction(create)?
        };
        if new.kind == Kind::Dir {
            // Made here, so known to be empty: no listing needed until the TTL passes.
            self.fresh.mark(inode.ino, std::time::Instant::now());
        }
        Ok(inode)
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let inode = self
            .create_node(
                parent,
                name,
                self.new_entry(Kind::Dir, mode & 0o7777, uid, gid, None),
            )
            .await?;
        self.sync_now_or_later(vec![JournalOp::Sync(inode.ino)])
            .await?;
        Ok(self.attr_of(&inode))
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let new = self.new_entry(Kind::Symlink, 0o777, uid, gid, Some(target.to_vec()));
        let inode = self.create_node(parent, name, new).await?;
        self.sync_now_or_later(vec![JournalOp::Sync(inode.ino)])
            .await?;
        Ok(self.attr_of(&inode))
    }

    /// Removes an entry's inode and queues deletion of its object; an open inode is only
    /// detached, and its object goes at the last close (readers may still need it).
    fn remove_inode_tx(
        &self,
        tx: &rusqlite::Transaction<'_>,
        inode: &Inode,
        ops: &mut Vec<JournalOp>,
    ) -> FsResult<()> {
        if self.is_open(inode.ino) {
            return self.meta.detach(tx, inode.ino);
        }
        if let Some(key) = inode.remote_key.clone().filter(|k| !k.is_empty()) {
            if inode.kind == Kind::Dir {
                self.queue_attr_index_removal(tx, &key)?;
            }
            let op = JournalOp::Delete(key);
            self.meta.enqueue(tx, &op, Duration::ZERO)?;
            ops.push(op);
        }
        self.meta.delete_inode(tx, inode.ino)
    }

    /// Queues the delete of the attribute index of a directory leaving `dir_key`. In the
    /// background, even in write-through mode: a stale index is harmless (its entries no
    /// longer match any listing), so the rename or rmdir does not wait for it.
    fn queue_attr_index_removal(
        &self,
        tx: &rusqlite::Transaction<'_>,
        dir_key: &str,
    ) -> FsResult<()> {
        if !self.config.attr_index || self.config.read_only {
            return Ok(());
        }
        let op = JournalOp::Delete(attr_index::index_key(dir_key));
        self.meta.enqueue(tx, &op, Duration::ZERO)
    }

    fn drop_cached_data(&self, ino: u64) -> FsResult<()> {
        if !self.is_open(ino) {
            discard_cache_file(&self.meta, &self.cache, ino)?;
        }
        Ok(())
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.check_writable()?;
        let inode = self
            .child(parent, name)
            .await?
            .ok_or_else(FsError::not_found)?;
        if inode.kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, "is a directory"));
        }
        let mut ops = Vec::new();
        self.meta
            .transaction(|tx| self.remove_inode_tx(tx, &inode, &mut ops))?;
        self.drop_cached_data(inode.ino)?;
        self.sync_name_change(ops, &[(parent, name)]).await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.check_writable()?;
        let inode = self
            .child(parent, name)
            .await?
            .ok_or_else(FsError::not_found)?;
        if inode.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        self.ensure_listed(&inode).await?;
        if self.meta.has_children(inode.ino)? {
            return Err(FsError::new(libc::ENOTEMPTY, "directory not empty"));
        }
        let mut ops = Vec::new();
        self.meta
            .transaction(|tx| self.remove_inode_tx(tx, &inode, &mut ops))?;
        self.sync_name_change(ops, &[(parent, name)]).await
    }

    /// Lists every directory below `dir`, so a rename moves objects never looked at.
    async fn ensure_subtree_listed(&self, dir: &Inode) -> FsResult<()> {
        let mut pending = vec![dir.clone()];
        // Bounded by the number of directories in the tree.
        while let Some(current) = pending.pop() {
            self.ensure_listed(&current).await?;
            for child in self.meta.children(current.ino)? {
                if child.kind == Kind::Dir {
                    pending.push(child);
                }
            }
        }
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        check_new_name(new_parent, new_name)?;
        let source = self
            .child(parent, name)
            .await?
            .ok_or_else(FsError::not_found)?;
        let target = self.child(new_parent, new_name).await?;
        if let Some(target) = &target {
            if target.ino == source.ino {
                return Ok(());
            }
            if no_replace {
                return Err(FsError::new(
                    libc::EEXIST,
                    "target exists (RENAME_NOREPLACE)",
                ));
            }
            match (source.kind == Kind::Dir, target.kind == Kind::Dir) {
                (true, false) => {
                    return Err(FsError::new(libc::ENOTDIR, "target is not a directory"))
                }
                (false, true) => return Err(FsError::new(libc::EISDIR, "target is a directory")),
                (true, true) => {
                    self.ensure_listed(target).await?;
                    if self.meta.has_children(target.ino)? {
                        return Err(FsError::new(libc::ENOTEMPTY, "target directory not empty"));
                    }
                }
                (false, false) => {}
            }
        }
        // A directory cannot move below itself.
        if source.kind == Kind::Dir {
            let mut names = self
                .meta
                .path_of(new_parent)?
                .ok_or_else(FsError::not_found)?;
            let own = self
                .meta
                .path_of(source.ino)?
                .ok_or_else(FsError::not_found)?;
            if names.starts_with(&own) {
                return Err(FsError::new(
                    libc::EINVAL,
                    "cannot move a directory below itself",
                ));
            }
            names.push(new_name.to_vec());
            self.backend.layout().key_for(&names, Kind::Dir)?;
            self.ensure_subtree_listed(&source).await?;
        }
        let mut new_names = self
            .meta
            .path_of(new_parent)?
            .ok_or_else(FsError::not_found)?;
        new_names.push(new_name.to_vec());
        // Refuses a destination whose key the bucket cannot store, before anything changes.
        self.backend.layout().key_for(&new_names, source.kind)?;
        let delay = self.delay();
        let mut ops = Vec::new();
        self.meta.transaction(|tx| {
            if let Some(target) = &target {
                // The replaced object is deleted even though the moved one will take its
                // key: if the moved file goes away before its copy, nothing else would.
                // Once the copy is done the delete finds the key owned and does nothing.
                self.remove_inode_tx(tx, target, &mut ops)?;
            }
            self.meta.move_entry(tx, source.ino, new_parent, new_name)?;
            let mut moved = vec![source.ino];
            if source.kind == Kind::Dir {
                moved.extend(self.meta.descendants(tx, source.ino)?);
            }
            let mut old_dir_keys = Vec::new();
            for ino in moved {
                let op = JournalOp::Sync(ino);
                self.meta.enqueue(tx, &op, delay)?;
                ops.push(op);
                if let Some(inode) = self.meta.get_in_tx(tx, ino)? {
                    if inode.kind == Kind::Dir {
                        old_dir_keys.extend(inode.remote_key.filter(|k| !k.is_empty()));
                    }
                }
            }
            // Deepest first, after the moves: old markers go once their children left.
            old_dir_keys.sort_by_key(|key| std::cmp::Reverse(key.len()));
            for key in old_dir_keys {
                self.queue_attr_index_removal(tx, &key)?;
                let op = JournalOp::Delete(key);
                self.meta.enqueue(tx, &op, delay)?;
                ops.push(op);
            }
            Ok(())
        })?;
        if let Some(target) = &target {
            self.drop_cached_data(target.ino)?;
        }
        self.sync_name_change(ops, &[(parent, name), (new_parent, new_name)])
            .await
    }

    /// Runs the bucket work of a change that removed or moved `names` (write-through:
    /// now). The local change stands either way: it is journaled and retried until the
    /// bucket takes it. When the bucket refused it, the caller gets the error, and the
    /// kernel, which keeps its old entries after a call that failed, is told to look the
    /// names up again, so the mount shows the change at once.
    async fn sync_name_change(&self, ops: Vec<JournalOp>, names: &[(u64, &[u8])]) -> FsResult<()> {
        let result = self.sync_now_or_later(ops).await;
        if let (Err(err), Some(kernel)) = (&result, self.kernel.get()) {
            tracing::warn!(error = %err, "the bucket did not take a name change yet; it stays journaled and is retried");
            for (parent, name) in names {
                kernel.forget_entry(*parent, name);
            }
        }
        result
    }

    pub async fn setattr(&self, ino: u64, change: SetAttr) -> FsResult<Attr> {
        let inode = self.ensure_attrs(self.inode(ino)?).await?;
        let touches = change.mode.is_some()
            || change.uid.is_some()
            || change.gid.is_some()
            || change.size.is_some()
            || change.mtime.is_some();
        if !touches {
            return Ok(self.attr_of(&inode));
        }
        self.check_writable()?;
        if let Some(size) = change.size {
            if inode.kind != Kind::File {
                return Err(FsError::new(libc::EISDIR, "not a regular file"));
            }
            self.truncate(&inode, size, change.fh).await?;
        }
        let op = self.record_attr_change(&inode, &change)?;
        // With a handle open, write-through uploads at close; otherwise now. A metadata
        // job moves no data: it runs now either way (a stream's close stores the
        // attributes again if they change meanwhile).
        let metadata_only = matches!(op, JournalOp::Metadata(_));
        if metadata_only || !(self.write_through() && self.is_open(ino)) {
            self.sync_now_or_later(vec![op]).await?;
        }
        self.getattr(ino).await
    }

    /// Records a setattr in the store and in the loaded cache file, and queues what takes
    /// it to the bucket: a metadata replacement when the bucket holds the file's current
    /// data, else a sync. The cache file stays locked throughout, as in `persist`: a
    /// persist racing this (a forked child's close of its copy of the descriptor) then
    /// either comes before, or takes the time set here, and never stamps its own time
    /// over it.
    fn record_attr_change(&self, inode: &Inode, change: &SetAttr) -> FsResult<JournalOp> {
        let ino = inode.ino;
        let file = self.cache.loaded(ino);
        let mut state = file.as_ref().map(|file| file.lock());
        let cache_clean = state
            .as_ref()
            .is_none_or(|state| !state.dirty && state.kernel_writers == 0);
        let only_attrs = change.size.is_none() && cache_clean && data_stored(inode);
        let attrs = AttrChange {
            perm: change.mode.map(|m| m & 0o7777),
            uid: change.uid,
            gid: change.gid,
            mtime: change.mtime.or(change.size.map(|_| SystemTime::now())),
            dirty: (!only_attrs).then_some(true),
            ..Default::default()
        };
        let delay = self.delay();
        let op = self.meta.transaction(|tx| {
            self.meta.change_attrs(tx, ino, &attrs)?;
            if only_attrs && self.meta.mark_attrs_changed(tx, ino, delay)? {
                return Ok(JournalOp::Metadata(ino));
            }
            self.meta.enqueue(tx, &JournalOp::Sync(ino), delay)?;
            Ok(JournalOp::Sync(ino))
        })?;
        let Some(state) = state.as_mut() else {
            return Ok(op);
        };
        // The cached bytes change only with the data (not for a metadata job).
        state.dirty |= op == JournalOp::Sync(ino);
        let Some(mtime) = change.mtime else {
            return Ok(op);
        };
        // The next persist (a close after `cp -p`'s futimens) records this time, not the
        // time of the writes before it.
        state.changed_at = Some(mtime);
        if state.kernel_writers > 0 {
            // Kernel writes are taken in with the cache file's mtime: keep it true.
            if let Some(file) = &file {
                file.set_disk_mtime(mtime)?;
            }
        }
        Ok(op)
    }

    async fn truncate(&self, inode: &Inode, size: u64, fh: Option<u64>) -> FsResult<()> {
        if let Some(handle) = fh.and_then(|fh| self.handle(fh).ok()) {
            if self.write_through() {
                let mut io = handle.io.lock().await;
                self.stage(&handle, &mut io).await?;
            }
        }
        let file = self.cache_file(inode)?;
        file.absorb_kernel_writes()?;
        let missing = file.missing_for_truncate(size);
        if !missing.is_empty() {
            file.fetch(&self.backend, missing).await?;
        }
        file.truncate(size)?;
        lock(&self.live_sizes).remove(&inode.ino);
        self.persist(&file, inode.ino, false)
    }

    // --- files ---

    fn cache_file(&self, inode: &Inode) -> FsResult<Arc<CacheFile>> {
        self.cache
            .get_or_load(inode.ino, || file_init(&self.meta, inode))
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, "no such file handle"))
    }

    /// Whether any handle of the inode is open (an unlinked inode lives until none is).
    fn is_open(&self, ino: u64) -> bool {
        lock(&self.open_counts).get(&ino).is_some_and(|n| *n > 0)
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        *lock(&self.open_counts).entry(handle.ino).or_insert(0) += 1;
        lock(&self.handles).insert(fh, Arc::new(handle));
        fh
    }

    /// Opens a file for process `pid` (the kernel's caller).
    pub async fn open(&self, ino: u64, mode: OpenMode, pid: u32) -> FsResult<Opened> {
        let inode = self.ensure_attrs(self.inode(ino)?).await?;
        if inode.kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, "is a directory"));
        }
        if mode.write {
            self.check_writable()?;
        }
        let fresh = mode.write && mode.truncate;
        self.open_inode(&inode, mode, fresh, pid).await
    }

    async fn open_inode(
        &self,
        inode: &Inode,
        mode: OpenMode,
        fresh: bool,
        pid: u32,
    ) -> FsResult<Opened> {
        let handle = Handle::new(
            inode.ino,
            mode,
            fresh && self.write_through(),
            self.write_through().then(|| Opener::of(pid)),
        );
        if self.write_through() {
            if fresh {
                lock(&self.live_sizes).insert(inode.ino, 0);
            } else {
                handle.set_verifier(read_verifier(inode));
            }
        } else {
            let file = self.cache_file(inode)?;
            file.lock().open_handles += 1;
            if fresh && file.lock().size > 0 {
                file.truncate(0)?;
                self.persist(&file, inode.ino, false)?;
            }
            let backing = self.open_kernel_io(&handle, inode, &file)?;
            let fh = self.add_handle(handle);
            return Ok(Opened {
                fh,
                backing,
                page_cache: self.page_cache.cached_mode(self.kernel_io.enabled()),
            });
        }
        let page_cache = if fresh {
            self.page_cache.streamed_writer()
        } else {
            self.page_cache.streamed_reader(
                inode.ino,
                inode.size,
                mode.write,
                self.is_open(inode.ino),
            )
        };
        let fh = self.add_handle(handle);
        Ok(Opened {
            fh,
            backing: None,
            page_cache,
        })
    }

    /// Whether the kernel lets direct I/O handles be mmapped (FUSE 7.39, Linux 6.6+).
    pub fn set_direct_io_mmap(&self, allowed: bool) {
        self.page_cache.set_direct_io_mmap(allowed);
    }

    /// Decides whether the kernel serves a cached-mode handle itself, and if so, readies
    /// the file: a writer marks it changed in the store first, so that after a crash the
    /// bytes the kernel wrote unseen are uploaded, never mistaken for the bucket's.
    fn open_kernel_io(
        &self,
        handle: &Handle,
        inode: &Inode,
        file: &CacheFile,
    ) -> FsResult<Option<std::fs::File>> {
        let write = handle.mode.write;
        let eligible = passthrough::Eligibility {
            complete: self.kernel_io.enabled() && file.is_complete(),
            write,
            room_for_writes: write && self.room_for_kernel_writes()?,
        };
        if !self.kernel_io.open(inode.ino, eligible) {
            return Ok(None);
        }
        // A writer starts from the store's mtime, not `inode`'s: opening with O_TRUNC
        // just changed it. A reader needs no read of the store.
        let started = match write {
            true => self
                .inode(inode.ino)
                .and_then(|current| file.start_passthrough(Some(current.mtime))),
            false => file.start_passthrough(None),
        };
        if let Err(err) = started {
            self.kernel_io.demote(inode.ino);
            return Err(err);
        }
        // From here no upload can settle the file (its generation moved on), so the
        // store's dirty flag read next is the last word.
        let ready = file.backing_file().and_then(|backing| {
            if write {
                self.mark_dirty_in_store(inode.ino)?;
            }
            Ok(backing)
        });
        match ready {
            Ok(backing) => {
                handle.set_kernel_io(true);
                Ok(Some(backing))
            }
            Err(err) => {
                self.leave_kernel_io(inode.ino, file, write);
                Err(err)
            }
        }
    }

    /// Undoes a handle's passthrough start: the daemon serves it after all.
    fn leave_kernel_io(&self, ino: u64, file: &CacheFile, write: bool) {
        file.end_passthrough(write);
        self.kernel_io.demote(ino);
    }

    /// Records an inode as changed unless the store says so already (one read, and a
    /// commit only for a clean file).
    fn mark_dirty_in_store(&self, ino: u64) -> FsResult<()> {
        if self.inode(ino)?.data_dirty() {
            return Ok(());
        }
        let change = AttrChange {
            dirty: Some(true),
            ..Default::default()
        };
        self.meta
            .transaction(|tx| self.meta.change_attrs(tx, ino, &change))
    }

    /// Whether unseen kernel writes could take [`passthrough::KERNEL_WRITE_HEADROOM`]
    /// without crowding the cache disk or `--cache-size`.
    fn room_for_kernel_writes(&self) -> FsResult<bool> {
        let headroom = passthrough::KERNEL_WRITE_HEADROOM;
        let under_limit = self.dirty_bytes_estimate(0) + headroom <= self.cache.limit();
        Ok(under_limit && self.cache.room_on_disk()? >= headroom)
    }

    /// Whether passthrough is to be asked of the kernel at all.
    pub fn passthrough_wanted(&self) -> bool {
        self.kernel_io.enabled()
    }

    /// The kernel (or the mount's privileges) cannot do passthrough.
    pub fn disable_passthrough(&self, why: &str) {
        self.kernel_io.disable(why);
    }

    /// The kernel refused the backing file of handle `fh`: the daemon serves it.
    pub fn passthrough_refused(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle(fh)?;
        if !handle.kernel_io() {
            return Ok(());
        }
        handle.set_kernel_io(false);
        match self.cache.loaded(handle.ino) {
            Some(file) => self.leave_kernel_io(handle.ino, &file, handle.mode.write),
            None => self.kernel_io.demote(handle.ino),
        }
        Ok(())
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, Opened)> {
        let open_mode = OpenMode::from_flags(flags);
        let new = self.new_entry(Kind::File, mode & 0o7777, caller.uid, caller.gid, None);
        let inode = self.create_node(parent, name, new).await?;
        let opened = self.open_inode(&inode, open_mode, true, caller.pid).await?;
        if !self.write_through() {
            self.uploader.wake();
        }
        Ok((self.attr_of(&inode), opened))
    }

    /// The bytes of a read: a slice of a part a write-through reader fetched, or a pooled
    /// buffer read from the cache file (its storage goes back to the pool once replied).
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<bytes::Bytes> {
        let result = self.read_data(fh, offset, size).await;
        if let Err(err) = &result {
            if err.errno == libc::EIO {
                // An object failing its check may have served bytes before the check
                // ended: the kernel's page cache (kept across opens) must not keep them.
                if let (Ok(handle), Some(kernel)) = (self.handle(fh), self.kernel.get()) {
                    kernel.forget_inode(handle.ino);
                }
            }
        }
        result
    }

    async fn read_data(&self, fh: u64, offset: u64, size: u32) -> FsResult<bytes::Bytes> {
        let handle = self.handle(fh)?;
        let inode = self.inode(handle.ino)?;
        let staged = self.cache.loaded(inode.ino);
        if self.write_through() && staged.is_none() {
            let read_ahead = handle.read_ahead(offset, size as u64, MAX_STREAM_AHEAD);
            return self
                .read_streamed(&handle, &inode, offset, size as u64, read_ahead)
                .await;
        }
        let read_ahead = handle.read_ahead(offset, size as u64, MAX_READ_AHEAD);
        let file = match staged {
            Some(file) => file,
            None => self.cache_file(&inode)?,
        };
        let range = offset..offset + size as u64;
        // Bounded: a block fetched stays present unless evicted between the two steps.
        for _ in 0..4 {
            self.read_ahead_in_background(&file, &range, read_ahead)?;
            if let Some(data) = file.read_local(offset, size as u64)? {
                return Ok(bytes::Bytes::from(data));
            }
            let missing = file.missing_for_read(range.clone(), 0);
            self.ensure_disk_room(run_bytes(&missing))?;
            file.fetch(&self.backend, missing).await?;
        }
        Err(FsError::loud(
            libc::EIO,
            format!("inode {}: data could not be kept in the cache", inode.ino),
        ))
    }

    /// Starts fetching the whole parts of the next `read_ahead` bytes after `range` that
    /// nobody fetches yet, in a task of their own: the read itself waits only for its own
    /// blocks. Skipped on a nearly full cache disk.
    fn read_ahead_in_background(
        &self,
        file: &Arc<CacheFile>,
        range: &std::ops::Range<u64>,
        read_ahead: u64,
    ) -> FsResult<()> {
        if read_ahead == 0 {
            return Ok(());
        }
        let part = PART_BLOCKS * BLOCK_SIZE;
        let size = file.lock().size;
        let mut end = range.end.saturating_add(read_ahead).min(size);
        if end < size {
            end -= end % part; // whole parts only: one GET each, never a block at a time
        }
        if end <= range.end {
            return Ok(());
        }
        let ahead = file.missing_for_read(range.end..end, 0);
        if ahead.is_empty() || self.cache.room_on_disk()? < run_bytes(&ahead) {
            return Ok(());
        }
        let (file, backend) = (file.clone(), self.backend.clone());
        tokio::spawn(async move {
            match file.fetch_ahead(&backend, ahead).await {
                Ok(()) => {}
                // Said where it is found (a crc64 mismatch, names the key): the reads that
                // fail on it later only see the file marked corrupt.
                Err(err) if err.level == crate::error::Level::Error => {
                    tracing::error!(ino = file.ino, "read-ahead: {}", err.message)
                }
                // Not fatal: the read that needs these bytes fetches them itself.
                Err(err) => {
                    tracing::debug!(ino = file.ino, error = %err.message, "read-ahead failed")
                }
            }
        });
        Ok(())
    }

    /// Write-through reads: ranged GETs in parallel into a per-handle window of parts,
    /// nothing on disk.
    async fn read_streamed(
        &self,
        handle: &Arc<Handle>,
        inode: &Inode,
        offset: u64,
        size: u64,
        read_ahead: u64,
    ) -> FsResult<bytes::Bytes> {
        let total = lock(&self.live_sizes)
            .get(&inode.ino)
            .copied()
            .unwrap_or(inode.size);
        let end = (offset + size).min(total);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        handle.check_not_corrupt()?;
        let key = inode
            .remote_key
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| FsError::loud(libc::EIO, "object not in the bucket yet"))?;
        let object_end = inode.remote_size.unwrap_or(total).max(end);
        let parts = handle.window_parts(offset..end, read_ahead, object_end, |range| {
            self.start_part(handle, &key, range)
        });
        let mut pieces = Vec::with_capacity(parts.len());
        for (range, data) in parts {
            let data = data.await.map_err(|err| (*err).clone())?;
            let from = (offset.max(range.start) - range.start) as usize;
            let to = (end.min(range.end) - range.start) as usize;
            if to > data.len() {
                return Err(FsError::loud(libc::EIO, format!("{key}: short read")));
            }
            pieces.push(data.slice(from..to));
        }
        let data = window::join(pieces);
        if data.len() as u64 != end - offset {
            return Err(FsError::loud(libc::EIO, format!("{key}: short read")));
        }
        handle.check_not_corrupt()?;
        Ok(data)
    }

    /// Starts the GET of one write-through read part in its own task; the part is checked
    /// against the object's crc64 when it lands.
    fn start_part(
        &self,
        handle: &Arc<Handle>,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> window::PartData {
        use futures::FutureExt;
        let (backend, handle, key) = (self.backend.clone(), handle.clone(), key.to_string());
        let task = tokio::spawn(async move {
            let (data, crc) = window::fetch_part(&backend, &key, range.clone())
                .await
                .map_err(Arc::new)?;
            handle
                .verify_hashed(range.start, range.end - range.start, crc)
                .map_err(Arc::new)?;
            Ok(data)
        });
        async move {
            task.await.unwrap_or_else(|err| {
                Err(Arc::new(FsError::loud(
                    libc::EIO,
                    format!("read task failed: {err}"),
                )))
            })
        }
        .boxed()
        .shared()
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let handle = self.handle(fh)?;
        if !handle.mode.write {
            return Err(FsError::new(libc::EBADF, "file not open for writing"));
        }
        if self.write_through() {
            let mut io = handle.io.lock().await;
            // Read under the handle's lock: a flush that ran meanwhile may have completed
            // the stream and recorded the object this write now builds on.
            let inode = self.inode(handle.ino)?;
            let offset = if handle.mode.append {
                self.size_now(&inode)
            } else {
                offset
            };
            if !io.staged {
                let position = io.stream.as_ref().map_or(0, StreamUpload::len);
                if handle.streamable && offset == position {
                    return self.write_stream(&handle, &mut io, &inode, data).await;
                }
                self.stage(&handle, &mut io).await?;
            }
            drop(io);
            return self.write_cached(&inode, offset, data).await;
        }
        let inode = self.inode(handle.ino)?;
        let offset = if handle.mode.append {
            self.size_now(&inode)
        } else {
            offset
        };
        self.write_cached(&inode, offset, data).await
    }

    fn size_now(&self, inode: &Inode) -> u64 {
        self.attr_of(inode).size
    }

    async fn write_cached(&self, inode: &Inode, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.wait_for_room(data.len() as u64).await?;
        self.ensure_disk_room(data.len() as u64)?;
        let file = self.cache_file(inode)?;
        for _ in 0..4 {
            match file.write_local(offset, data)? {
                WriteOutcome::Written => return Ok(data.len() as u32),
                WriteOutcome::NeedFetch(runs) => file.fetch(&self.backend, runs).await?,
            }
        }
        Err(FsError::loud(
            libc::EIO,
            format!(
                "inode {}: could not prepare the cache for a write",
                inode.ino
            ),
        ))
    }

    /// Back-pressure: while data not yet in the bucket fills the cache, a writer waits for
    /// uploads to make room, up to `dirty_wait`, then gets ENOSPC. Clean data is evicted
    /// first; dirty data never is.
    async fn wait_for_room(&self, incoming: u64) -> FsResult<()> {
        let limit = self.cache.limit();
        if self.dirty_bytes_estimate(incoming) <= limit {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut waited_log = false;
        // Bounded by `dirty_wait`.
        loop {
            self.evict_clean()?;
            self.uploader.wake();
            let dirty = self.cache.dirty_bytes();
            *lock(&self.dirty_sample) = (std::time::Instant::now(), dirty + incoming);
            if dirty + incoming <= limit {
                return Ok(());
            }
            if started.elapsed() >= self.config.dirty_wait {
                let errors = self.meta.summary()?.last_errors;
                return Err(FsError::loud(
                    libc::ENOSPC,
                    format!(
                        "the cache holds {dirty} bytes not yet uploaded, at its limit of {limit} (--cache-size); uploads made no room within {:?} (--dirty-wait); last upload errors: {errors:?}",
                        self.config.dirty_wait
                    ),
                ));
            }
            if !waited_log {
                tracing::warn!(
                    dirty,
                    limit,
                    "cache full of data not yet uploaded; writers wait for uploads"
                );
                waited_log = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// ENOSPC before the cache disk is so full that the metadata store could not record
    /// uploads any more. Clean data (it is in the bucket) is evicted first.
    fn ensure_disk_room(&self, incoming: u64) -> FsResult<()> {
        if self.cache.room_on_disk()? >= incoming {
            return Ok(());
        }
        self.cache
            .evict_to(0, &|inos| self.meta.forget_blocks_of(inos))?;
        let room = self.cache.room_on_disk()?;
        if room >= incoming {
            return Ok(());
        }
        Err(FsError::loud(
            libc::ENOSPC,
            format!(
                "the cache disk is full ({room} bytes left beyond the metadata reserve); data not yet uploaded stays, writes fail until uploads finish or space is freed"
            ),
        ))
    }

    /// Dirty bytes once `incoming` is written: counted exactly at most every 100 ms (it
    /// walks every loaded file), and in between the last count plus every byte written
    /// since, so a fast writer cannot outrun the check.
    fn dirty_bytes_estimate(&self, incoming: u64) -> u64 {
        let mut sample = lock(&self.dirty_sample);
        if sample.0.elapsed() >= Duration::from_millis(100) {
            *sample = (std::time::Instant::now(), self.cache.dirty_bytes());
        }
        sample.1 += incoming;
        sample.1
    }

    /// Evicts clean, closed files beyond the cache limit and forgets their saved blocks.
    fn evict_clean(&self) -> FsResult<()> {
        self.cache
            .evict_to_limit(&|inos| self.meta.forget_blocks_of(inos))?;
        Ok(())
    }

    async fn write_stream(
        &self,
        handle: &Handle,
        io: &mut handle::HandleIo,
        inode: &Inode,
        data: &[u8],
    ) -> FsResult<u32> {
        if io.stream.is_none() {
            let key = self.key_of(inode)?;
            let metadata = attrs_of(inode).encode(None);
            let stream = StreamUpload::start(
                &self.backend,
                &key,
                metadata,
                self.config.part_size,
                self.config.upload_concurrency,
                Some(Ledger {
                    store: self.meta.clone(),
                    streamed_ino: Some(inode.ino),
                    new_file: inode.remote_key.as_deref().is_none_or(str::is_empty),
                }),
            )
            .await?;
            io.stream = Some(stream);
        }
        let offset = io.stream.as_ref().map_or(0, StreamUpload::len);
        self.spool(io, inode.ino, offset, data)?;
        let stream = io
            .stream
            .as_mut()
            .ok_or_else(|| FsError::loud(libc::EIO, "stream vanished"))?;
        if let Err(err) = stream.push(data).await {
            // The stream is broken: drop it; the spool still holds everything written.
            if let Some(broken) = io.stream.take() {
                broken.abort().await;
            }
            io.staged = true;
            lock(&self.live_sizes).remove(&handle.ino);
            return Err(err);
        }
        lock(&self.live_sizes).insert(handle.ino, stream.len());
        Ok(data.len() as u32)
    }

    /// Keeps a local copy of what a write-through stream sent, so that a writer who seeks
    /// back can continue from it after the stream is abandoned: the bucket never sees a
    /// partial object. The copy is dropped once the object is complete.
    fn spool(&self, io: &mut handle::HandleIo, ino: u64, offset: u64, data: &[u8]) -> FsResult<()> {
        let file = self.start_spool(io, ino)?;
        if let WriteOutcome::NeedFetch(_) = file.write_local(offset, data)? {
            return Err(FsError::loud(
                libc::EIO,
                format!("inode {ino}: the write-through spool needs data it never had"),
            ));
        }
        // Each time the stream passes a window, the window before the last goes to disk
        // and leaves the page cache (it is read only if the writer seeks back).
        let end = offset + data.len() as u64;
        let windows = end / SPOOL_WINDOW;
        if windows > offset / SPOOL_WINDOW && windows >= 2 {
            file.write_out_and_forget((windows - 2) * SPOOL_WINDOW..(windows - 1) * SPOOL_WINDOW)?;
        }
        Ok(())
    }

    /// The local copy a write-through handle opened empty (created or O_TRUNC) writes to:
    /// it starts empty, while the old object stays in the bucket until close replaces it.
    fn start_spool(&self, io: &mut handle::HandleIo, ino: u64) -> FsResult<Arc<CacheFile>> {
        let file = self
            .cache
            .get_or_load(ino, || Ok(crate::cache::FileInit::new_empty()))?;
        if !io.holds_cache_file {
            file.lock().open_handles += 1;
            io.holds_cache_file = true;
            let old = {
                let state = file.lock();
                state.size > 0 || state.fetch_limit > 0
            };
            if old {
                file.truncate(0)?;
            }
        }
        Ok(file)
    }

    /// The handle leaves the streaming path: from here on its writes go to the local copy,
    /// uploaded whole at close.
    async fn stage(&self, handle: &Handle, io: &mut handle::HandleIo) -> FsResult<()> {
        if io.staged {
            return Ok(());
        }
        if let Some(stream) = io.stream.take() {
            self.stage_stream(handle, io, stream).await?;
        } else if handle.streamable {
            self.start_spool(io, handle.ino)?;
            lock(&self.live_sizes).remove(&handle.ino);
        }
        io.staged = true;
        Ok(())
    }

    /// A write-through writer left the sequential path (or truncated): the stream is
    /// abandoned, nothing of it becomes visible, and writes continue on the spooled copy,
    /// uploaded whole at close.
    async fn stage_stream(
        &self,
        handle: &Handle,
        io: &mut handle::HandleIo,
        stream: StreamUpload,
    ) -> FsResult<()> {
        stream.abort().await;
        if self.cache.loaded(handle.ino).is_none() || !io.holds_cache_file {
            return Err(FsError::loud(
                libc::EIO,
                format!("inode {}: the write-through spool is missing", handle.ino),
            ));
        }
        lock(&self.live_sizes).remove(&handle.ino);
        Ok(())
    }

    /// Makes a cached file's changes durable and journals its upload (cached/sync), or
    /// uploads it now (write-through, when `upload_now`).
    fn persist(&self, file: &CacheFile, ino: u64, force: bool) -> FsResult<()> {
        let gen = {
            let state = file.lock();
            if state.gen == state.persisted_gen && !force {
                // Nothing written: still, a close acknowledges the file's creation.
                return self.meta.make_durable(ino);
            }
            state.gen
        };
        // Everything up to `gen` is on disk after this; later writes persist again.
        file.sync_data()?;
        let delay = self.delay();
        // The state stays locked while the store is written: the uploader updates the same
        // fields (clean, fetch limit) under the same lock, so the two never interleave and
        // leave the store saying less is fetchable than memory knows.
        let mut state = file.lock();
        if state.persisted_gen >= gen && !force {
            // Another persist of this generation ran meanwhile (a close's flush and its
            // release overlap): it recorded the change and took `changed_at`, and a
            // second record would stamp the file as changed now.
            return Ok(());
        }
        let change = AttrChange {
            size: Some(state.size),
            fetch_limit: Some(state.fetch_limit),
            mtime: Some(state.changed_at.take().unwrap_or_else(SystemTime::now)),
            dirty: Some(true),
            ..Default::default()
        };
        // One commit (one fsync): the presence map, the size and the journal entry.
        let bitmap = state.blocks.to_bytes();
        self.meta.transaction(|tx| {
            self.meta.save_blocks_tx(tx, ino, BLOCK_SIZE, &bitmap)?;
            self.meta.change_attrs(tx, ino, &change)?;
            self.meta.enqueue(tx, &JournalOp::Sync(ino), delay)
        })?;
        state.dirty = true;
        state.persisted_gen = state.persisted_gen.max(gen);
        Ok(())
    }

    /// close() by process `pid`. A close by another process (a forked child closing its
    /// copy of the descriptor at exec) must not complete a write-through stream: that
    /// would publish part of the file. The opener's close, fsync or the release do.
    pub async fn flush(&self, fh: u64, pid: u32) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let other_process = handle.opener.is_some_and(|o| o.is_other_process(pid));
        if self.write_through() && other_process {
            return Ok(());
        }
        self.complete(fh).await
    }

    /// Cached/sync: makes the data durable locally. Write-through: completes the object in
    /// the bucket. Errors reach the writer.
    async fn complete(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle(fh)?;
        if !handle.mode.write {
            return Ok(());
        }
        let inode = self.inode(handle.ino)?;
        if !self.write_through() {
            let file = self.cache_file(&inode)?;
            if handle.kernel_io() {
                file.absorb_kernel_writes()?;
            }
            self.persist(&file, inode.ino, false)?;
            self.uploader.wake();
            return Ok(());
        }
        let mut io = handle.io.lock().await;
        if let Some(mut stream) = io.stream.take() {
            // Until recorded: the uploader's metadata job must not copy the key meanwhile.
            let held = self.uploader.hold_key(stream.key()).await;
            let ready = self
                .uploader
                .ready_to_complete_stream(inode.ino, stream.key())
                .await;
            if !matches!(ready, Ok(true)) {
                // Renamed or unlinked while open, or the key's earlier file could not be
                // copied away: nothing becomes visible at the key, and the spool goes up
                // as a staged upload to where the file stands now.
                if let Err(err) = &ready {
                    tracing::info!(key = stream.key(), error = %err, "completing the stream later");
                }
                stream.abort().await;
                drop(held);
                io.staged = true;
                lock(&self.live_sizes).remove(&inode.ino);
                // Its error, if any, is the one a failed upload of the spool gives.
                return self.complete_staged(&inode).await;
            }
            let attrs = self.attrs_at_stream_close(inode.ino)?;
            stream.set_metadata(attrs.encode(None));
            let uploaded = match stream.finish().await {
                Ok(uploaded) => uploaded,
                Err(err) => {
                    // Nothing became visible; the spool keeps the bytes for a staged
                    // upload at the next close (and the journal after that).
                    io.staged = true;
                    lock(&self.live_sizes).remove(&inode.ino);
                    return Err(err);
                }
            };
            self.record_stream_close(inode.ino, &uploaded, &attrs)?;
            self.uploader.wake();
            lock(&self.live_sizes).remove(&inode.ino);
            // Further writes append to a complete object: they go through the cache file.
            io.staged = true;
            drop(held);
            // Renamed while the stream completed: the record dropped the rename's queued
            // sync with the close's own, and the object must still follow the file.
            if self.uploader.moved_away(inode.ino, &uploaded.key)? {
                let delay = self.delay();
                self.meta
                    .transaction(|tx| self.meta.enqueue(tx, &JournalOp::Sync(inode.ino), delay))?;
                self.uploader.sync_now(vec![inode.ino], 1).await?;
            }
            return Ok(());
        }
        if io.staged {
            return self.complete_staged(&inode).await;
        }
        if handle.streamable {
            // Opened with O_TRUNC (or created) and nothing written: an empty object.
            if self.meta.queued(&JournalOp::Sync(inode.ino))?.is_none() {
                let delay = self.delay();
                let change = AttrChange {
                    size: Some(0),
                    dirty: Some(true),
                    ..Default::default()
                };
                self.meta.transaction(|tx| {
                    self.meta.change_attrs(tx, inode.ino, &change)?;
                    self.meta.enqueue(tx, &JournalOp::Sync(inode.ino), delay)
                })?;
            }
            let file = self.cache_file(&self.inode(inode.ino)?)?;
            file.truncate(0)?;
            {
                // Complete as it is: the close publishes it (a rename's sync meanwhile
                // moves only a complete version, see `Uploader::writes_wait_for_close`).
                let mut state = file.lock();
                state.persisted_gen = state.gen;
            }
            self.uploader.sync_now(vec![inode.ino], 1).await?;
            lock(&self.live_sizes).remove(&inode.ino);
        }
        Ok(())
    }

    /// Records the object a write-through stream completed, whose metadata carried
    /// `sent`. The spool stays locked throughout, as in a setattr: a chmod or utimens that
    /// came while the stream completed is kept (its time, not the one the object left
    /// with), and the metadata job stores it in the object.
    ///
    /// Without a sync: the ledger's record of the stream is durable, and the next mount
    /// records the object from the bucket if a power loss drops this commit. A multipart
    /// object's metadata left before its crc64 was known: the uploader stores it in the
    /// background (close does not wait for a copy).
    fn record_stream_close(
        &self,
        ino: u64,
        uploaded: &Uploaded,
        sent: &crate::backend::ObjectAttrs,
    ) -> FsResult<()> {
        let file = self.cache.loaded(ino);
        let mut state = file.as_ref().map(|file| file.lock());
        let set_meanwhile = state.as_ref().and_then(|state| state.changed_at);
        let mut current = attrs_of(&self.inode(ino)?);
        current.mtime = set_meanwhile.unwrap_or(sent.mtime);
        let in_object = uploaded.crc_stored && current == *sent;
        self.meta.bookkeeping(|tx| {
            self.meta
                .record_streamed_object(tx, ino, &uploaded.remote(), current.mtime, in_object)
        })?;
        if let Some(state) = state.as_mut() {
            // The spool now equals the object: clean, and the base of any later write.
            state.dirty = false;
            state.source_key = Some(uploaded.key.clone());
            state.fetch_limit = uploaded.size;
            state.persisted_gen = state.gen;
            state.changed_at = None;
        }
        Ok(())
    }

    /// A write-through close of a file whose bytes are in its spool, not in a stream:
    /// they go up as one upload before the close returns.
    async fn complete_staged(&self, inode: &Inode) -> FsResult<()> {
        let file = self.cache_file(inode)?;
        self.persist(&file, inode.ino, false)?;
        if self.meta.queued(&JournalOp::Sync(inode.ino))?.is_some() {
            self.uploader.sync_now(vec![inode.ino], 1).await?;
        }
        Ok(())
    }

    /// The attributes a write-through stream's object gets at its close: the inode's as
    /// they are now (a chmod may have come after the first write), with the time of the
    /// last write, or the time a utimens after it set (`cp -p`: write, futimens, close).
    fn attrs_at_stream_close(&self, ino: u64) -> FsResult<crate::backend::ObjectAttrs> {
        let mut attrs = attrs_of(&self.inode(ino)?);
        let set_after_last_write = self
            .cache
            .loaded(ino)
            .and_then(|file| file.lock().changed_at);
        attrs.mtime = set_after_last_write.unwrap_or_else(SystemTime::now);
        Ok(attrs)
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.complete(fh).await
    }

    /// The kernel released handle `fh`: called in the order requests arrive, before the
    /// release work runs, so that an open right after a close sees the inode as the
    /// kernel does (it dropped the handle's I/O mode before sending the release).
    pub fn note_release(&self, fh: u64) {
        if let Ok(handle) = self.handle(fh) {
            self.kernel_io.close(handle.ino, handle.kernel_io());
        }
    }

    /// Completes and forgets handle `fh`; [`Core::note_release`] came first.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let result = self.complete(fh).await;
        let Some(handle) = lock(&self.handles).remove(&fh) else {
            return result;
        };
        let ino = handle.ino;
        let remaining = {
            let mut counts = lock(&self.open_counts);
            let count = counts.entry(ino).or_insert(1);
            *count = count.saturating_sub(1);
            let remaining = *count;
            if remaining == 0 {
                counts.remove(&ino);
            }
            remaining
        };
        if let Some(file) = self.cache.loaded(ino) {
            if handle.kernel_io() {
                file.end_passthrough(handle.mode.write);
                if handle.mode.write {
                    // Its upload waited for the kernel writers to go.
                    self.uploader.wake();
                }
            }
            let mut state = file.lock();
            let held = if self.write_through() {
                u32::from(handle.io.try_lock().is_ok_and(|io| io.holds_cache_file))
            } else {
                1
            };
            state.open_handles = state.open_handles.saturating_sub(held);
        }
        let inode = self.meta.get(ino)?;
        if remaining == 0 {
            lock(&self.live_sizes).remove(&ino);
            if inode
                .as_ref()
                .is_some_and(|i| i.parent.is_none() && i.ino != ROOT_INO)
            {
                // Unlinked while open: its last close frees it and its object.
                let mut ops = Vec::new();
                if let Some(orphan) = &inode {
                    self.meta
                        .transaction(|tx| self.remove_inode_tx(tx, orphan, &mut ops))?;
                }
                discard_cache_file(&self.meta, &self.cache, ino)?;
                self.sync_now_or_later(ops).await?;
            } else if self.write_through() {
                if let Some(file) = self.cache.loaded(ino) {
                    self.cache
                        .discard_if_unused(file, &|ino| self.meta.forget_blocks(ino))?;
                }
            }
        }
        if self.config.mode == Mode::Cached {
            self.evict_clean()?;
        }
        if !self.write_through() {
            unload_idle_files(&self.meta, &self.cache)?;
        }
        result
    }

    /// The bucket behind the mount.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn statfs(&self) -> (u64, u64) {
        // Buckets have no fixed size: report plenty, as s3fs does.
        (1 << 48, 4096)
    }

    pub fn status(&self, source: &str) -> FsResult<Status> {
        Ok(Status {
            mode: self.config.mode.as_str(),
            source: source.to_string(),
            cache_used_bytes: self.cache.used_bytes(),
            cache_limit_bytes: self.cache.limit(),
            uploads_in_flight: self.uploader.in_flight(),
            passthrough: self.kernel_io.enabled(),
            passthrough_handles: self.kernel_io.served(),
            journal: self.meta.summary()?,
        })
    }

    /// Persists every open file's changes and waits until the bucket has them (and with
    /// [`FlushScope::Everything`], the directories' attribute indexes).
    pub async fn flush_all(&self, timeout: Duration, scope: FlushScope) -> FsResult<()> {
        let handles: Vec<u64> = lock(&self.handles).keys().copied().collect();
        for fh in handles {
            match self.complete(fh).await {
                // Released meanwhile: release completes a handle before it drops it, so
                // its changes are journaled already (an umount right after a close).
                Err(err) if err.errno == libc::EBADF && self.handle(fh).is_err() => {}
                other => other?,
            }
        }
        self.uploader.flush(timeout, scope).await
    }
}
