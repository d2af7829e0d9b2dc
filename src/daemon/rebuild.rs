//! The key layout a bucket was first used with, and rebuilding the local namespace from
//! a listing of the bucket (a `hashed` mount with a new store, and `bucketgate recover`).
//!
//! A rebuild records objects from their listing alone (size, ETag, time): no data is
//! downloaded, and attributes (mode, uid, symlink targets) are read by HEAD on first use,
//! as for objects found by a plain directory listing. The listing streams into SQLite in
//! batched transactions, so memory holds one batch and the directories seen, not the
//! objects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::backend::layout::LAYOUT_MARKER_KEY;
use crate::backend::{AttrDefaults, Backend, KeyLayout, Kind, RESERVED_PREFIX};
use crate::core::MAX_NAME_BYTES;
use crate::error::FsResult;
use crate::meta::{MetaStore, NewInode, RemoteState, ROOT_INO};

/// Listings in flight at once, unless told otherwise.
pub const PARALLEL_LISTINGS: usize = 16;
/// Objects recorded per transaction (each commit is an fsync).
const BATCH: usize = 2000;
/// Listed objects waiting for the recorder: bounds memory when SQLite is the slower side.
const QUEUE: usize = 4 * BATCH;
/// State of the store saying its namespace came from a whole-bucket scan.
const SCANNED_STATE: &str = "namespace-scanned";
/// State of the store naming the layout its keys follow.
const LAYOUT_STATE: &str = "key-layout";

/// Why a layout cannot be used on a bucket.
#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("{bucket} was set up with --key-layout {recorded} (its {LAYOUT_MARKER_KEY} says so), but this mount asks for --key-layout {requested}; mount with --key-layout {recorded}, or use another bucket or prefix for {requested}")]
    Mismatch {
        bucket: String,
        recorded: KeyLayout,
        requested: KeyLayout,
    },
    #[error("{bucket} already holds objects and no {LAYOUT_MARKER_KEY}, so its layout is plain, but this mount asks for --key-layout {requested}; mount with --key-layout plain, or use an empty bucket or prefix for {requested}")]
    UnmarkedNotPlain {
        bucket: String,
        requested: KeyLayout,
    },
    #[error("the cache dir was built for --key-layout {stored} and this mount uses {requested}; give this mount another --cache-dir (or run `bucketgate recover`)")]
    StoreMismatch {
        stored: String,
        requested: KeyLayout,
    },
    #[error("{0}")]
    Bucket(String),
}

/// The layout to use on `backend`: the recorded one, which `requested` must match.
/// `requested = None` (recover without `--key-layout`) takes whatever is recorded.
/// A bucket without a marker is plain when it holds objects; an empty one takes the
/// requested layout, recorded in the marker when `record` (a writable mount) and the
/// layout is not plain: no marker means plain, so plain buckets stay untouched.
pub async fn settle_layout(
    backend: &Backend,
    requested: Option<KeyLayout>,
    record: bool,
) -> Result<KeyLayout, LayoutError> {
    let bucket = backend.description.clone();
    if let Some(recorded) = backend
        .recorded_layout()
        .await
        .map_err(LayoutError::Bucket)?
    {
        return match requested {
            Some(requested) if requested != recorded => Err(LayoutError::Mismatch {
                bucket,
                recorded,
                requested,
            }),
            _ => Ok(recorded),
        };
    }
    let requested = requested.unwrap_or_default();
    if requested == KeyLayout::Plain {
        return Ok(requested);
    }
    let occupied = backend
        .has_objects()
        .await
        .map_err(|err| LayoutError::Bucket(format!("listing {bucket}: {err}")))?;
    if occupied {
        return Err(LayoutError::UnmarkedNotPlain { bucket, requested });
    }
    if record {
        backend
            .clone()
            .with_layout(requested)
            .record_layout()
            .await
            .map_err(|err| LayoutError::Bucket(format!("writing {LAYOUT_MARKER_KEY}: {err}")))?;
        tracing::info!(layout = %requested, "recorded the key layout in the bucket");
    }
    Ok(requested)
}

/// Checks the store's keys follow `layout` (a store records the layout it was built with)
/// and whether its namespace still has to be scanned from the bucket.
pub fn store_needs_scan(meta: &MetaStore, layout: KeyLayout) -> anyhow::Result<bool> {
    let err = |e: crate::error::FsError| anyhow!("{e}");
    match meta.state(LAYOUT_STATE).map_err(err)? {
        Some(stored) if stored != layout.to_string() => {
            return Err(LayoutError::StoreMismatch {
                stored,
                requested: layout,
            }
            .into())
        }
        Some(_) => {}
        None => meta
            .set_state(LAYOUT_STATE, &layout.to_string())
            .map_err(err)?,
    }
    let scanned = meta.state(SCANNED_STATE).map_err(err)?.is_some();
    Ok(!layout.lists_lazily() && !scanned)
}

/// What a rebuild found.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    pub objects: u64,
    pub directories: u64,
    pub bytes: u64,
    /// Keys the mount cannot address (another layout's, names too long, a file and a
    /// directory of the same name): left alone in the bucket.
    pub skipped: u64,
    pub elapsed: Duration,
}

/// One object of a listing.
struct Listed {
    key: String,
    size: u64,
    etag: Option<String>,
    modified: Option<SystemTime>,
}

/// Rebuilds the namespace of `meta` (a new or emptied store) from a listing of the whole
/// bucket, every part of it listed in parallel, and marks the store scanned. `progress`
/// is called after each batch.
pub async fn rebuild(
    meta: Arc<MetaStore>,
    backend: &Backend,
    defaults: AttrDefaults,
    parallel: usize,
    mut progress: impl FnMut(&RebuildReport) + Send + 'static,
) -> anyhow::Result<RebuildReport> {
    let started = Instant::now();
    let (sender, receiver) = mpsc::channel::<Listed>(QUEUE);
    let lister = list_everything(backend.clone(), sender, parallel.max(1));
    let layout = backend.layout();
    let meta_done = meta.clone();
    let recorder = tokio::task::spawn_blocking(move || {
        let mut recorder = Recorder::new(&meta, layout, defaults);
        recorder.run(receiver, &mut |report: &RebuildReport| {
            let mut shown = report.clone();
            shown.elapsed = started.elapsed();
            progress(&shown);
        })?;
        Ok::<RebuildReport, crate::error::FsError>(recorder.report)
    });
    // The lister ends first (its sender drops), then the recorder drains the queue.
    let listed = lister.await;
    let recorded = recorder
        .await
        .context("the recorder of the listing stopped")?;
    listed?;
    let mut report = recorded.map_err(|err| anyhow!("recording the listing: {err}"))?;
    // Only a complete listing makes the store scanned (a failed one is scanned again).
    let err = |e: crate::error::FsError| anyhow!("{e}");
    meta_done.add_listed(ROOT_INO, &[]).map_err(err)?;
    meta_done.set_state(SCANNED_STATE, "1").map_err(err)?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Lists every object of the bucket into `sender`. S3/OSS in `hashed`: the 16 prefixes of
/// the first hash character, in parallel (a listing per hash prefix would be up to 16^N
/// requests). Otherwise: the top level by delimiter, then each top-level directory
/// recursively. `parallel` listings at a time.
async fn list_everything(
    backend: Backend,
    sender: mpsc::Sender<Listed>,
    parallel: usize,
) -> anyhow::Result<()> {
    let prefixes: Vec<String> =
        if !backend.layout().lists_lazily() && backend.local_root().is_none() {
            (0..16u32)
                .filter_map(|d| char::from_digit(d, 16))
                .map(String::from)
                .collect()
        } else {
            top_level(&backend, &sender).await?
        };
    futures::stream::iter(prefixes)
        .map(|prefix| list_prefix(&backend, prefix, &sender))
        .buffer_unordered(parallel)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

/// Sends the top level's objects and returns its directories, to be listed recursively.
async fn top_level(
    backend: &Backend,
    sender: &mpsc::Sender<Listed>,
) -> anyhow::Result<Vec<String>> {
    let mut lister = backend
        .lister_dir("")
        .await
        .with_context(|| format!("listing the top of {}", backend.description))?;
    let mut dirs = Vec::new();
    while let Some(entry) = lister
        .try_next()
        .await
        .with_context(|| format!("listing the top of {}", backend.description))?
    {
        let key = entry.path();
        if key.is_empty() || key == "/" || key.starts_with(RESERVED_PREFIX) {
            continue;
        }
        if key.ends_with('/') {
            dirs.push(key.to_string());
        } else {
            send(sender, &entry).await?;
        }
    }
    Ok(dirs)
}

async fn list_prefix(
    backend: &Backend,
    prefix: String,
    sender: &mpsc::Sender<Listed>,
) -> anyhow::Result<()> {
    let context = || format!("listing {prefix} in {}", backend.description);
    let mut lister = backend
        .lister_recursive(&prefix)
        .await
        .with_context(context)?;
    while let Some(entry) = lister.try_next().await.with_context(context)? {
        if !entry.path().starts_with(RESERVED_PREFIX) {
            send(sender, &entry).await?;
        }
    }
    Ok(())
}

async fn send(sender: &mpsc::Sender<Listed>, entry: &opendal::Entry) -> anyhow::Result<()> {
    let meta = entry.metadata();
    let key = entry.path().to_string();
    let listed = Listed {
        size: if key.ends_with('/') {
            0
        } else {
            meta.content_length()
        },
        etag: meta.etag().map(str::to_string),
        modified: meta.last_modified().map(SystemTime::from),
        key,
    };
    sender
        .send(listed)
        .await
        .map_err(|_| anyhow!("the recorder of the listing stopped"))
}

/// Writes listed objects into the store, creating the directories above them.
struct Recorder<'a> {
    meta: &'a MetaStore,
    layout: KeyLayout,
    defaults: AttrDefaults,
    /// Directories known so far, by path (the root is `""`): one entry per directory,
    /// not per object.
    dirs: HashMap<String, u64>,
    /// Time given to directories without a marker (none of their own to show).
    now: SystemTime,
    report: RebuildReport,
}

impl<'a> Recorder<'a> {
    fn new(meta: &'a MetaStore, layout: KeyLayout, defaults: AttrDefaults) -> Self {
        Recorder {
            meta,
            layout,
            defaults,
            dirs: HashMap::from([(String::new(), ROOT_INO)]),
            now: SystemTime::now(),
            report: RebuildReport::default(),
        }
    }

    /// Records the queue's objects in batches until the lister is done.
    fn run(
        &mut self,
        mut receiver: mpsc::Receiver<Listed>,
        progress: &mut dyn FnMut(&RebuildReport),
    ) -> FsResult<()> {
        let meta = self.meta;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = receiver.blocking_recv() {
            batch.push(first);
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            meta.transaction(|tx| {
                batch
                    .drain(..)
                    .try_for_each(|listed| self.record(tx, listed))
            })?;
            progress(&self.report);
        }
        Ok(())
    }

    fn record(&mut self, tx: &rusqlite::Transaction<'_>, listed: Listed) -> FsResult<()> {
        let Some((path, is_dir)) = self.layout.path_of_key(&listed.key) else {
            // Directories of the directory bucket (hash prefixes, paths below them) are
            // listed too; they are no objects, so nothing is left out.
            if !listed.key.ends_with('/') {
                self.report.skipped += 1;
            }
            return Ok(());
        };
        let path = path.to_string();
        if path
            .split('/')
            .any(|name| name.is_empty() || name.len() > MAX_NAME_BYTES)
        {
            tracing::warn!(key = %listed.key, "skipped: a name of its path is empty or too long");
            self.report.skipped += 1;
            return Ok(());
        }
        if is_dir {
            if self.dir(tx, &path)?.is_none() {
                self.report.skipped += 1;
            }
            return Ok(());
        }
        let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", &path));
        let Some(parent) = self.dir(tx, parent_path)? else {
            self.report.skipped += 1;
            return Ok(());
        };
        let new = NewInode {
            kind: Kind::File,
            perm: 0o666 & !self.defaults.umask,
            uid: self.defaults.uid,
            gid: self.defaults.gid,
            size: listed.size,
            mtime: listed.modified.unwrap_or(self.now),
            target: None,
            remote: Some(RemoteState {
                key: listed.key.clone(),
                etag: listed.etag,
                size: listed.size,
                crc64: None,
            }),
            attrs_loaded: false,
            listed: false,
            dirty: false,
        };
        match self.meta.create_entry(tx, parent, name.as_bytes(), &new) {
            Ok(_) => {
                self.report.objects += 1;
                self.report.bytes += listed.size;
            }
            Err(err) if err.errno == libc::EEXIST => {
                let known = self.meta.lookup_in_tx(tx, parent, name.as_bytes())?;
                if known.and_then(|k| k.remote_key).as_deref() != Some(&listed.key) {
                    tracing::warn!(key = %listed.key, "skipped: a directory of the same name is in the bucket");
                    self.report.skipped += 1;
                } // else recorded by an earlier scan that did not finish
            }
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// The directory at `path`, created (and its parents) when first seen; `None` when a
    /// file holds the name. Its attributes come from its marker by HEAD on first use, or
    /// the mount's defaults where it has none. Recursion is bounded by the path's depth.
    fn dir(&mut self, tx: &rusqlite::Transaction<'_>, path: &str) -> FsResult<Option<u64>> {
        if let Some(&ino) = self.dirs.get(path) {
            return Ok(Some(ino));
        }
        let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
        let Some(parent) = self.dir(tx, parent_path)? else {
            return Ok(None);
        };
        let new = NewInode {
            kind: Kind::Dir,
            perm: 0o777 & !self.defaults.umask,
            uid: self.defaults.uid,
            gid: self.defaults.gid,
            size: 0,
            mtime: self.now,
            target: None,
            remote: Some(RemoteState {
                key: self.layout.key_of_path(path, Kind::Dir),
                etag: None,
                size: 0,
                crc64: None,
            }),
            attrs_loaded: false,
            listed: true,
            dirty: false,
        };
        let ino = match self.meta.create_entry(tx, parent, name.as_bytes(), &new) {
            Ok(inode) => {
                self.report.directories += 1;
                inode.ino
            }
            Err(err) if err.errno == libc::EEXIST => {
                match self.meta.lookup_in_tx(tx, parent, name.as_bytes())? {
                    Some(inode) if inode.kind == Kind::Dir => inode.ino,
                    _ => return Ok(None),
                }
            }
            Err(err) => return Err(err),
        };
        self.dirs.insert(path.to_string(), ino);
        Ok(Some(ino))
    }
}

/// Options of `bucketgate recover`.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    pub cache_dir: std::path::PathBuf,
    /// `None`: the layout the bucket records.
    pub layout: Option<KeyLayout>,
    /// Discard journaled changes not yet in the bucket.
    pub force: bool,
    pub defaults: AttrDefaults,
    /// Listings in flight at once.
    pub parallel: usize,
}

/// `bucketgate recover`: replaces the cache dir's metadata store (and its cached data,
/// which belongs to the old inode numbers) with one rebuilt from the bucket.
pub async fn recover_cache_dir(
    backend: Backend,
    options: &RecoverOptions,
    progress: impl FnMut(&RebuildReport) + Send + 'static,
) -> anyhow::Result<RebuildReport> {
    let layout = settle_layout(&backend, options.layout, false).await?;
    let backend = backend.with_layout(layout);
    let _lock = super::lock_cache_dir(&options.cache_dir)?;
    refuse_unsynced(&options.cache_dir, options.force)?;
    remove_store(&options.cache_dir)?;
    let data = options.cache_dir.join("data");
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    let meta = Arc::new(
        MetaStore::open(
            &options.cache_dir.join("meta.db"),
            0o777 & !options.defaults.umask,
            options.defaults.uid,
            options.defaults.gid,
        )
        .map_err(|err| anyhow!("creating the metadata store: {err}"))?,
    );
    store_needs_scan(&meta, layout)?;
    tracing::info!(%layout, "rebuilding the metadata store from the bucket");
    let report = match rebuild(
        meta.clone(),
        &backend,
        options.defaults,
        options.parallel,
        progress,
    )
    .await
    {
        Ok(report) => report,
        Err(err) => {
            // A half-built store would show a tree with holes: leave none.
            drop(meta);
            remove_store(&options.cache_dir)?;
            return Err(err.context("nothing was recovered; run recover again"));
        }
    };
    meta.set_state("clean", "1")
        .map_err(|err| anyhow!("{err}"))?;
    Ok(report)
}

/// Removes the metadata store of a cache dir (the database and its WAL files).
fn remove_store(cache_dir: &std::path::Path) -> anyhow::Result<()> {
    for name in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        remove_if_present(&cache_dir.join(name))?;
    }
    Ok(())
}

/// Refuses to drop a store whose journal still holds changes the bucket lacks.
fn refuse_unsynced(cache_dir: &std::path::Path, force: bool) -> anyhow::Result<()> {
    let path = cache_dir.join("meta.db");
    if !path.exists() {
        return Ok(());
    }
    let meta = MetaStore::open(&path, 0o755, 0, 0).map_err(|err| {
        anyhow!(
            "opening the existing metadata store {}: {}",
            path.display(),
            err.message
        )
    })?;
    let pending = meta.changes_pending().map_err(|err| anyhow!("{err}"))?;
    if pending > 0 && !force {
        bail!(
            "{} holds {pending} change(s) not yet in the bucket; recovering would lose them. \
             Mount with this cache dir to upload them first, or pass --force to discard them",
            cache_dir.display()
        );
    }
    if pending > 0 {
        tracing::warn!(
            pending,
            "discarding changes that never reached the bucket (--force)"
        );
    }
    Ok(())
}

pub(crate) fn remove_if_present(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}
