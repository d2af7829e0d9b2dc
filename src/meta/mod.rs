//! The metadata store (SQLite): inodes, directory entries, attributes, remote keys, the
//! upload journal. It speaks the filesystem's language; no SQL leaves this module.

mod log;
mod remote;
mod schema;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use crate::backend::{Kind, ObjectAttrs};
use crate::error::{FsError, FsResult};

pub const ROOT_INO: u64 = 1;

/// One inode as stored.
#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u64,
    pub parent: Option<u64>,
    pub name: Option<Vec<u8>>,
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub target: Option<Vec<u8>>,
    pub attrs_loaded: bool,
    pub listed: bool,
    pub remote_key: Option<String>,
    pub remote_etag: Option<String>,
    pub remote_size: Option<u64>,
    pub fetch_limit: Option<u64>,
    /// The bucket lacks a local change (data, attributes or both).
    pub dirty: bool,
    /// Of the local changes, only attributes are missing from the bucket (chmod, chown,
    /// utimens of a stored file): a metadata replacement stores them, no upload.
    pub only_attrs_dirty: bool,
    /// The crc64 of the object at `remote_key`, when known.
    pub remote_crc64: Option<u64>,
}

impl Inode {
    /// Whether the bucket lacks some of the inode's data (or its whole object).
    pub fn data_dirty(&self) -> bool {
        self.dirty && !self.only_attrs_dirty
    }
}

/// Attributes of a new inode.
#[derive(Debug, Clone)]
pub struct NewInode {
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub target: Option<Vec<u8>>,
    /// Set for objects found in the bucket.
    pub remote: Option<RemoteState>,
    pub attrs_loaded: bool,
    pub listed: bool,
    pub dirty: bool,
}

/// What the bucket holds for an inode.
#[derive(Debug, Clone)]
pub struct RemoteState {
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    pub crc64: Option<u64>,
}

/// Changes to an inode's attributes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct AttrChange {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub fetch_limit: Option<u64>,
    pub dirty: Option<bool>,
}

/// An upload in the ledger that was never recorded as ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedUpload {
    pub key: String,
    /// The write-through file whose writer streamed it, if any.
    pub streamed_ino: Option<u64>,
}

/// What an upload recorded by [`MetaStore::set_remote`] settles.
#[derive(Debug, Clone, Copy)]
pub enum Settles {
    /// Newer data arrived while it went up: the inode stays dirty.
    Nothing,
    /// The bucket now holds the inode's data and attributes.
    Everything,
    /// The data is current; the attributes are if they still are these (the ones the
    /// object was stored with).
    IfAttrsStill(ObjectAttrs),
    /// A metadata replacement stored these attributes: it settles an inode whose only
    /// change was its attributes, if they still are these (a data change since, or a
    /// passthrough writer's open, leaves it dirty).
    OnlyAttrsIfStill(ObjectAttrs),
}

/// One piece of bucket work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    /// Make the bucket match this inode (upload, move, marker, symlink).
    Sync(u64),
    /// Delete this key unless a live inode owns it again.
    Delete(String),
    /// Store the inode's attributes and crc64 in its object's metadata: after a stream
    /// completed (its metadata left before the crc64 was known), or after an attribute
    /// change of a stored file (chmod, chown, utimens: no upload of its data).
    Metadata(u64),
    /// Rewrite the attribute index of this directory (see `backend::attr_index`).
    AttrIndex(u64),
}

#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub id: i64,
    pub op: JournalOp,
    pub gen: i64,
    pub attempts: i64,
}

/// Which due journal entries a scan returns, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct DueScan {
    pub limit: usize,
    /// Also the changes still in their quiet delay (a flush is waiting).
    pub ignore_delay: bool,
    /// With `ignore_delay`, the attribute-index rewrites too.
    pub indexes_too: bool,
    /// Deletes too: the scheduler leaves out the ones it is holding back.
    pub deletes_too: bool,
}

impl DueScan {
    /// Everything due now, up to `limit` entries.
    pub fn due_now(limit: usize) -> Self {
        Self {
            limit,
            ignore_delay: false,
            indexes_too: false,
            deletes_too: true,
        }
    }
}

/// Counts for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JournalSummary {
    pub pending: u64,
    pub dirty_files: u64,
    pub dirty_bytes: u64,
    pub last_errors: Vec<String>,
}

pub struct MetaStore {
    conn: Mutex<Connection>,
    /// Which commits are durable; see [`log`].
    log: log::CommitLog,
    /// Inodes whose creation committed unsynced, with the commit's number: see
    /// [`MetaStore::transaction_deferred`].
    deferred: Mutex<HashMap<u64, u64>>,
    /// Whether recording an object queues a rewrite of its directory's attribute index.
    indexes_directories: AtomicBool,
    /// When (ms since the epoch) a recorded object last queued an index rewrite.
    last_index_queued_ms: AtomicI64,
}

/// How long a directory's attribute index waits after an object in it was recorded:
/// one rewrite covers a burst of uploads (a backup writing thousands of files).
pub const ATTR_INDEX_DELAY: Duration = Duration::from_secs(2);

/// Prepared statements kept: more than the store has distinct cached statements.
const STATEMENT_CACHE: usize = 128;

const CHANGES_PENDING: &str = "SELECT COUNT(*) FROM journal WHERE op != 'attr-index'";

/// Deferred creations remembered before the ones already durable are pruned.
const DEFERRED_PRUNE_AT: usize = 1024;

pub fn to_ns(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(_) => 0,
    }
}

pub fn from_ns(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

fn now_ms() -> i64 {
    to_ns(SystemTime::now()) / 1_000_000
}

/// The `dirty` column: 0 clean, 1 data (and perhaps attributes) not in the bucket, 2 only
/// attributes not in the bucket. A change of data (`AttrChange::dirty`) writes 1.
const DIRTY_CLEAN: i64 = 0;
const DIRTY_ONLY_ATTRS: i64 = 2;

const INODE_COLUMNS: &str =
    "ino, parent, name, kind, perm, uid, gid, size, mtime_ns, ctime_ns, target, \
     attrs_loaded, listed, remote_key, remote_etag, remote_size, fetch_limit, dirty, remote_crc64";

fn inode_from_row(row: &Row<'_>) -> rusqlite::Result<Inode> {
    let kind: i64 = row.get(3)?;
    Ok(Inode {
        ino: row.get::<_, i64>(0)? as u64,
        parent: row.get::<_, Option<i64>>(1)?.map(|p| p as u64),
        name: row.get(2)?,
        kind: Kind::from_i64(kind).unwrap_or(Kind::File),
        perm: row.get(4)?,
        uid: row.get(5)?,
        gid: row.get(6)?,
        size: row.get::<_, i64>(7)? as u64,
        mtime: from_ns(row.get(8)?),
        ctime: from_ns(row.get(9)?),
        target: row.get(10)?,
        attrs_loaded: row.get(11)?,
        listed: row.get(12)?,
        remote_key: row.get(13)?,
        remote_etag: row.get(14)?,
        remote_size: row.get::<_, Option<i64>>(15)?.map(|s| s as u64),
        fetch_limit: row.get::<_, Option<i64>>(16)?.map(|s| s as u64),
        dirty: row.get::<_, i64>(17)? != DIRTY_CLEAN,
        only_attrs_dirty: row.get::<_, i64>(17)? == DIRTY_ONLY_ATTRS,
        remote_crc64: row.get::<_, Option<i64>>(18)?.map(|c| c as u64),
    })
}

/// Clears the dirty flag if the inode's attributes still are `attrs` (and, with
/// `only_attrs`, if its only change was its attributes). Returns the rows changed.
fn settle_if_attrs_still(
    tx: &Transaction<'_>,
    ino: u64,
    attrs: &ObjectAttrs,
    only_attrs: bool,
) -> FsResult<usize> {
    Ok(tx
        .prepare_cached(
            "UPDATE inodes SET dirty = 0
             WHERE ino = ?1 AND perm = ?2 AND uid = ?3 AND gid = ?4 AND mtime_ns = ?5
               AND (NOT ?6 OR dirty = 2)",
        )?
        .execute(params![
            ino as i64,
            attrs.perm,
            attrs.uid,
            attrs.gid,
            to_ns(attrs.mtime),
            only_attrs
        ])?)
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

impl MetaStore {
    /// Opens (creating if needed) the store; the root directory always exists.
    pub fn open(path: &Path, root_perm: u32, uid: u32, gid: u32) -> FsResult<MetaStore> {
        let mut conn = Connection::open(path)?;
        // EXCLUSIVE: one process uses the store (the cache dir is locked), so SQLite
        // takes its file lock once and keeps the WAL index in memory, instead of ~80
        // fcntl lock calls per file written; set before WAL mode, as SQLite requires.
        // FULL until the schema is in place; then NORMAL (see `log`).
        conn.execute_batch(
            "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=OFF;",
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Plans stay as compiled: without this, SQLite recompiles a cached statement
        // whenever a bound integer moves between 0/1 and other values (an inode number
        // walking up to the root, 1), which was 5 % of the daemon's CPU for small files.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        // rusqlite keeps 16 prepared statements by default; a write-through small file
        // uses more than that, and each one evicted was parsed again at its next use
        // (12 % of the daemon's samples in W4 once the attribute index added two).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        schema::migrate(&mut conn)?;
        let now = to_ns(SystemTime::now());
        conn.prepare_cached("INSERT OR IGNORE INTO inodes(ino, parent, name, kind, perm, uid, gid, mtime_ns, ctime_ns, remote_key)
             VALUES (1, NULL, NULL, 2, ?1, ?2, ?3, ?4, ?4, '')")?.execute(
            params![root_perm, uid, gid, now],
        )?;
        // Commits sync the log themselves from here on: `transaction` before it returns,
        // `bookkeeping` later (see `log`).
        conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
        Ok(MetaStore {
            conn: Mutex::new(conn),
            log: log::CommitLog::new(path),
            deferred: Mutex::new(HashMap::new()),
            indexes_directories: AtomicBool::new(false),
            last_index_queued_ms: AtomicI64::new(0),
        })
    }

    /// From now on, recording a file's object queues its directory's attribute index.
    pub fn index_directories(&self, on: bool) {
        self.indexes_directories.store(on, Ordering::Relaxed);
    }

    /// Whether this mount keeps attribute indexes (see [`Self::index_directories`]).
    pub fn indexes_directories(&self) -> bool {
        self.indexes_directories.load(Ordering::Relaxed)
    }

    /// How long ago a recorded object last queued an index rewrite.
    pub fn since_index_queued(&self) -> Duration {
        let then = self.last_index_queued_ms.load(Ordering::Relaxed);
        Duration::from_millis(now_ms().saturating_sub(then).max(0) as u64)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent; carry on.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in one transaction committed without an fsync (synchronous=NORMAL). Only
    /// for records that recovery redoes or does without when a power loss drops them (a
    /// SIGKILL does not: see `log`). A caller about to do something that relies on the
    /// record and cannot be undone (a PUT, a DELETE) first calls [`Self::sync_log`].
    pub fn bookkeeping<T>(&self, f: impl FnOnce(&Transaction<'_>) -> FsResult<T>) -> FsResult<T> {
        self.commit_unsynced(f).map(|(out, _)| out)
    }

    /// Runs `f` (which names the inode it creates) in one unsynced transaction, made
    /// durable by [`Self::make_durable`] for that inode or by any later synced commit. For
    /// a new file: its close makes it durable, so create need not wait for a disk flush
    /// (a power loss before that close loses a file no close acknowledged).
    pub fn transaction_deferred<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> FsResult<(T, u64)>,
    ) -> FsResult<T> {
        let ((out, ino), seq) = self.commit_unsynced(f)?;
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        if deferred.len() >= DEFERRED_PRUNE_AT {
            deferred.retain(|_, seq| !self.log.is_synced(*seq));
        }
        deferred.insert(ino, seq);
        Ok(out)
    }

    /// Makes the deferred creation of `ino`, if any, durable (usually already done by a
    /// later synced commit, at no cost).
    pub fn make_durable(&self, ino: u64) -> FsResult<()> {
        let seq = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
        match seq {
            Some(seq) => self.log.sync_to(seq),
            None => Ok(()),
        }
    }

    /// One transaction committed without a sync; returns its commit number.
    fn commit_unsynced<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> FsResult<T>,
    ) -> FsResult<(T, u64)> {
        let mut conn = self.lock();
        let out = commit_in(&mut conn, f)?;
        Ok((out, self.log.wrote()))
    }

    /// Makes every commit so far durable: one fsync of the log, shared by the callers
    /// that arrive while it runs (group commit).
    pub fn sync_log(&self) -> FsResult<()> {
        self.log.sync_all()
    }

    /// Runs `f` in one transaction, durable when this returns.
    pub fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> FsResult<T>) -> FsResult<T> {
        let conn = &mut self.lock();
        let changes = conn.total_changes();
        let out = commit_in(conn, f)?;
        self.sync_held_commit(conn, changes)?;
        Ok(out)
    }

    /// Syncs the commit just made on `conn` (held), as synchronous=FULL would: before the
    /// lock goes, so no other caller sees (and acts on) it while a power loss could still
    /// take it back. A commit that changed no row (`changes` is the count before it) wrote
    /// nothing to the log, and SQLite would not sync it either (a release's forgetting of
    /// a presence map that was never saved: an fsync per write-through small file).
    fn sync_held_commit(&self, conn: &Connection, changes: u64) -> FsResult<()> {
        if conn.total_changes() == changes {
            return Ok(());
        }
        self.log.wrote();
        self.log.sync_now()
    }

    pub fn get(&self, ino: u64) -> FsResult<Option<Inode>> {
        get_in(&self.lock(), ino)
    }

    /// Reads an inode inside a transaction.
    pub fn get_in_tx(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<Option<Inode>> {
        get_in(tx, ino)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Option<Inode>> {
        lookup_in(&self.lock(), parent, name)
    }

    /// Looks up a name inside a transaction.
    pub fn lookup_in_tx(
        &self,
        tx: &Transaction<'_>,
        parent: u64,
        name: &[u8],
    ) -> FsResult<Option<Inode>> {
        lookup_in(tx, parent, name)
    }

    pub fn children(&self, parent: u64) -> FsResult<Vec<Inode>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {INODE_COLUMNS} FROM inodes WHERE parent = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map(params![parent as i64], inode_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn has_children(&self, parent: u64) -> FsResult<bool> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM inodes WHERE parent = ?1 LIMIT 1")?;
        Ok(stmt.exists(params![parent as i64])?)
    }

    /// Creates a directory entry; EEXIST if the name is taken.
    pub fn create_entry(
        &self,
        tx: &Transaction<'_>,
        parent: u64,
        name: &[u8],
        new: &NewInode,
    ) -> FsResult<Inode> {
        let now = to_ns(SystemTime::now());
        let remote = new.remote.as_ref();
        let result = tx.prepare_cached("INSERT INTO inodes(parent, name, kind, perm, uid, gid, size, mtime_ns, ctime_ns, target, attrs_loaded,
                                listed, remote_key, remote_etag, remote_size, fetch_limit, dirty, remote_crc64)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)")?.execute(
            params![
                parent as i64,
                name,
                new.kind.as_i64(),
                new.perm,
                new.uid,
                new.gid,
                new.size as i64,
                to_ns(new.mtime),
                now,
                new.target,
                new.attrs_loaded,
                new.listed,
                remote.map(|r| r.key.clone()),
                remote.and_then(|r| r.etag.clone()),
                remote.map(|r| r.size as i64),
                remote.map(|r| r.size as i64).unwrap_or(0),
                new.dirty,
                remote.and_then(|r| r.crc64).map(|c| c as i64),
            ],
        );
        match result {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                return Err(FsError::new(libc::EEXIST, "file exists"))
            }
            Err(err) => return Err(err.into()),
        }
        let ino = tx.last_insert_rowid() as u64;
        get_in(tx, ino)?.ok_or_else(|| FsError::loud(libc::EIO, "inserted inode vanished"))
    }

    /// Records what a listing of `parent` found: adds names not known locally, marks the
    /// directory listed. Local entries always win. Returns the inodes created.
    pub fn add_listed(&self, parent: u64, found: &[(Vec<u8>, NewInode)]) -> FsResult<Vec<u64>> {
        self.transaction(|tx| {
            let mut created = Vec::new();
            for (name, new) in found {
                match self.create_entry(tx, parent, name, new) {
                    Ok(inode) => created.push(inode.ino),
                    Err(err) if err.errno == libc::EEXIST => {}
                    Err(err) => return Err(err),
                }
            }
            tx.prepare_cached("UPDATE inodes SET listed = 1 WHERE ino = ?1")?
                .execute(params![parent as i64])?;
            Ok(created)
        })
    }

    /// Fills in attributes read by a HEAD of an inode found by listing.
    pub fn set_loaded_attrs(
        &self,
        ino: u64,
        attrs: &ObjectAttrs,
        crc64: Option<u64>,
    ) -> FsResult<()> {
        // What a HEAD said: lost in a power loss, it is asked again (no fsync per file
        // for a cold `ls -l`).
        self.bookkeeping(|tx| {
            tx.prepare_cached("UPDATE inodes SET perm = ?2, uid = ?3, gid = ?4, mtime_ns = ?5, kind = ?6, attrs_loaded = 1,
                 remote_crc64 = ?7 WHERE ino = ?1")?.execute(
                params![
                    ino as i64,
                    attrs.perm,
                    attrs.uid,
                    attrs.gid,
                    to_ns(attrs.mtime),
                    attrs.kind.as_i64(),
                    crc64.map(|c| c as i64)
                ],
            )?;
            Ok(())
        })
    }

    pub fn set_target(&self, ino: u64, target: &[u8]) -> FsResult<()> {
        // Read from the bucket: asked again if a power loss drops it.
        self.bookkeeping(|tx| {
            tx.prepare_cached("UPDATE inodes SET target = ?2 WHERE ino = ?1")?
                .execute(params![ino as i64, target])?;
            Ok(())
        })
    }

    /// Applies an attribute change inside a transaction.
    pub fn change_attrs(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        change: &AttrChange,
    ) -> FsResult<()> {
        let now = to_ns(SystemTime::now());
        tx.prepare_cached("UPDATE inodes SET perm = COALESCE(?2, perm), uid = COALESCE(?3, uid), gid = COALESCE(?4, gid),
                 size = COALESCE(?5, size), mtime_ns = COALESCE(?6, mtime_ns),
                 fetch_limit = COALESCE(?7, fetch_limit), dirty = COALESCE(?8, dirty), ctime_ns = ?9
             WHERE ino = ?1")?.execute(
            params![
                ino as i64,
                change.perm,
                change.uid,
                change.gid,
                change.size.map(|s| s as i64),
                change.mtime.map(to_ns),
                change.fetch_limit.map(|s| s as i64),
                change.dirty,
                now
            ],
        )?;
        Ok(())
    }

    /// Marks a change of attributes only (the data in the bucket stays current), unless
    /// the inode already waits for an upload. Returns whether its only pending change is
    /// now its attributes: then a metadata replacement stores them
    /// ([`JournalOp::Metadata`], queued here), otherwise the caller queues a sync.
    pub fn mark_attrs_changed(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        delay: Duration,
    ) -> FsResult<bool> {
        let only_attrs = tx
            .prepare_cached("UPDATE inodes SET dirty = 2 WHERE ino = ?1 AND dirty IN (0, 2)")?
            .execute(params![ino as i64])?
            > 0;
        if only_attrs {
            self.enqueue(tx, &JournalOp::Metadata(ino), delay)?;
        }
        Ok(only_attrs)
    }

    /// Records that the bucket now holds `remote` for the inode, and whether that settles
    /// its local changes. Returns whether the dirty flag was cleared.
    pub fn set_remote(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        remote: &RemoteState,
        settles: Settles,
    ) -> FsResult<bool> {
        // A metadata replacement moved no data: what may be fetched stays as it is.
        let data_current = matches!(settles, Settles::Everything | Settles::IfAttrsStill(_));
        tx.prepare_cached("UPDATE inodes SET remote_key = ?2, remote_etag = ?3, remote_size = ?4, remote_crc64 = ?6,
                 fetch_limit = CASE WHEN ?5 THEN ?4 ELSE fetch_limit END
             WHERE ino = ?1")?.execute(
            params![
                ino as i64,
                remote.key,
                remote.etag,
                remote.size as i64,
                data_current,
                remote.crc64.map(|c| c as i64)
            ],
        )?;
        let cleared = match settles {
            Settles::Nothing => 0,
            Settles::Everything => tx
                .prepare_cached("UPDATE inodes SET dirty = 0 WHERE ino = ?1")?
                .execute(params![ino as i64])?,
            // An attribute change (chmod, utimens) made while the object went up is not in
            // it: the inode stays dirty, and its queued sync uploads it.
            Settles::IfAttrsStill(attrs) => settle_if_attrs_still(tx, ino, &attrs, false)?,
            Settles::OnlyAttrsIfStill(attrs) => settle_if_attrs_still(tx, ino, &attrs, true)?,
        };
        if self.indexes_directories() {
            self.queue_attr_index(tx, ino)?;
        }
        Ok(cleared > 0)
    }

    /// Removes a directory entry. Returns the inode; it stays (parentless) while open.
    pub fn detach(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<()> {
        tx.prepare_cached("UPDATE inodes SET parent = NULL, name = NULL WHERE ino = ?1")?
            .execute(params![ino as i64])?;
        Ok(())
    }

    pub fn delete_inode(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<()> {
        tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
            .execute(params![ino as i64])?;
        tx.prepare_cached("DELETE FROM cache_blocks WHERE ino = ?1")?
            .execute(params![ino as i64])?;
        Ok(())
    }

    /// Moves an entry to a new parent and name (the target name must be free).
    pub fn move_entry(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> FsResult<()> {
        let now = to_ns(SystemTime::now());
        tx.prepare_cached(
            "UPDATE inodes SET parent = ?2, name = ?3, ctime_ns = ?4 WHERE ino = ?1",
        )?
        .execute(params![ino as i64, new_parent as i64, new_name, now])?;
        Ok(())
    }

    /// Every inode below a directory (not the directory itself).
    pub fn descendants(&self, tx: &Transaction<'_>, dir: u64) -> FsResult<Vec<u64>> {
        let mut stmt = tx.prepare_cached(
            "WITH RECURSIVE sub(ino) AS (SELECT ino FROM inodes WHERE parent = ?1
                 UNION ALL SELECT i.ino FROM inodes i JOIN sub ON i.parent = sub.ino)
             SELECT ino FROM sub",
        )?;
        let rows = stmt.query_map(params![dir as i64], |row| row.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The names from the root down to `ino`; `None` for an unlinked inode.
    pub fn path_of(&self, ino: u64) -> FsResult<Option<Vec<Vec<u8>>>> {
        let conn = self.lock();
        let mut names = Vec::new();
        let mut current = ino;
        let mut stmt = conn.prepare_cached("SELECT parent, name FROM inodes WHERE ino = ?1")?;
        // Bounded: no path is deeper than the number of inodes a sane tree holds.
        for _ in 0..4096 {
            if current == ROOT_INO {
                names.reverse();
                return Ok(Some(names));
            }
            let row: Option<(Option<i64>, Option<Vec<u8>>)> = stmt
                .query_row(params![current as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?;
            match row {
                Some((Some(parent), Some(name))) => {
                    names.push(name);
                    current = parent as u64;
                }
                _ => return Ok(None),
            }
        }
        Err(FsError::loud(
            libc::ELOOP,
            format!("inode {ino}: path deeper than 4096 levels"),
        ))
    }

    /// Resolves a path (names from the root) to an inode, without listing the bucket.
    pub fn resolve(&self, names: &[&[u8]]) -> FsResult<Option<Inode>> {
        let mut current = match self.get(ROOT_INO)? {
            Some(root) => root,
            None => return Ok(None),
        };
        for name in names {
            match self.lookup(current.ino, name)? {
                Some(child) => current = child,
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    /// Inodes left parentless by a previous run (unlinked while open): deletable now.
    pub fn orphans(&self) -> FsResult<Vec<u64>> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT ino FROM inodes WHERE parent IS NULL AND ino != 1")?;
        let rows = stmt.query_map([], |row| row.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    // --- journal ---

    /// Queues bucket work. Re-queuing a pending entry bumps its generation, so a worker
    /// that is running it knows to run it again.
    pub fn enqueue(&self, tx: &Transaction<'_>, op: &JournalOp, delay: Duration) -> FsResult<()> {
        let (name, ino, key) = journal_target(op);
        let not_before = now_ms() + delay.as_millis() as i64;
        tx.prepare_cached("INSERT INTO journal(op, ino, key, not_before_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(op, ino, key) DO UPDATE SET gen = gen + 1, not_before_ms = MAX(not_before_ms, ?4), attempts = 0")?.execute(
            params![name, ino, key, not_before],
        )?;
        Ok(())
    }

    /// Queues a rewrite of the attribute index of the directory holding file `ino`, due
    /// [`ATTR_INDEX_DELAY`] from now. Unlike [`Self::enqueue`], a rewrite still waiting
    /// keeps its time (a directory written to without pause still gets one per delay);
    /// one already due or running waits a delay again.
    fn queue_attr_index(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<()> {
        let now = now_ms();
        self.last_index_queued_ms.store(now, Ordering::Relaxed);
        tx.prepare_cached(
            "INSERT INTO journal(op, ino, key, not_before_ms)
             SELECT 'attr-index', parent, '', ?2 FROM inodes
             WHERE ino = ?1 AND kind = ?4 AND parent IS NOT NULL
             ON CONFLICT(op, ino, key) DO UPDATE SET gen = gen + 1, attempts = 0,
               not_before_ms = CASE WHEN not_before_ms <= ?3 THEN ?2 ELSE not_before_ms END",
        )?
        .execute(params![
            ino as i64,
            now + ATTR_INDEX_DELAY.as_millis() as i64,
            now,
            Kind::File.as_i64()
        ])?;
        Ok(())
    }

    /// The entries `scan` asks for (see [`DueScan`]).
    pub fn due_entries(&self, scan: DueScan) -> FsResult<Vec<JournalEntry>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, op, ino, key, gen, attempts FROM journal
             WHERE ((?1 AND attempts = 0 AND (?4 OR op != 'attr-index')) OR not_before_ms <= ?2)
               AND (?5 OR op != 'delete')
             ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                scan.ignore_delay,
                now_ms(),
                scan.limit as i64,
                scan.indexes_too,
                scan.deletes_too
            ],
            entry_from_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The queued entry for `op`, if any (one indexed lookup).
    pub fn queued(&self, op: &JournalOp) -> FsResult<Option<JournalEntry>> {
        let (name, ino, key) = journal_target(op);
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, op, ino, key, gen, attempts FROM journal WHERE op = ?1 AND ino = ?2 AND key = ?3",
        )?;
        Ok(stmt
            .query_row(params![name, ino, key], entry_from_row)
            .optional()?)
    }

    /// The entry's work is done; it is dropped unless re-queued meanwhile (then this
    /// returns false). Unsynced: if a power loss drops it, the entry runs again and finds
    /// nothing to do.
    pub fn complete(&self, entry: &JournalEntry) -> FsResult<bool> {
        self.bookkeeping(|tx| {
            let dropped = tx
                .prepare_cached("DELETE FROM journal WHERE id = ?1 AND gen = ?2")?
                .execute(params![entry.id, entry.gen])?;
            Ok(dropped > 0)
        })
    }

    /// The entry failed; it is retried after `retry_in`.
    /// Unsynced: losing a retry count only retries sooner.
    pub fn fail(&self, entry: &JournalEntry, error: &str, retry_in: Duration) -> FsResult<()> {
        self.bookkeeping(|tx| {
            tx.prepare_cached(
                "UPDATE journal SET attempts = attempts + 1, last_error = ?2, not_before_ms = ?3 WHERE id = ?1",
            )?
            .execute(params![entry.id, error, now_ms() + retry_in.as_millis() as i64])?;
            Ok(())
        })
    }

    /// The entry cannot run yet (it did not fail): it is tried again after `delay`.
    pub fn postpone(&self, entry: &JournalEntry, delay: Duration) -> FsResult<()> {
        self.transaction(|tx| {
            tx.execute(
                "UPDATE journal SET not_before_ms = ?2 WHERE id = ?1",
                params![entry.id, now_ms() + delay.as_millis() as i64],
            )?;
            Ok(())
        })
    }

    /// Queues an upload for every inode the store says is changed but that has none:
    /// what a crash leaves of a file the kernel wrote unseen (passthrough), which
    /// counts as changed from its open until its close is uploaded.
    pub fn requeue_dirty(&self) -> FsResult<u64> {
        self.transaction(|tx| {
            let mut queued = 0;
            // An inode whose only change is its attributes gets their metadata replacement.
            for (op, dirty) in [("sync", 1), ("checksum", DIRTY_ONLY_ATTRS)] {
                queued += tx.execute(
                    "INSERT INTO journal(op, ino, key, not_before_ms)
                     SELECT ?2, ino, '', 0 FROM inodes
                     WHERE dirty = ?3 AND (parent IS NOT NULL OR ino = ?1)
                     ON CONFLICT(op, ino, key) DO NOTHING",
                    params![ROOT_INO as i64, op, dirty],
                )?;
            }
            Ok(queued as u64)
        })
    }

    pub fn journal_len(&self) -> FsResult<u64> {
        let conn = self.lock();
        Ok(conn.query_row("SELECT COUNT(*) FROM journal", [], |row| {
            row.get::<_, i64>(0)
        })? as u64)
    }

    /// Journal entries that carry changes: all but attribute-index rewrites, which only
    /// save a later mount some HEADs and are redone from the store when lost.
    pub fn changes_pending(&self) -> FsResult<u64> {
        let conn = self.lock();
        Ok(conn.query_row(CHANGES_PENDING, [], |row| row.get::<_, i64>(0))? as u64)
    }

    pub fn summary(&self) -> FsResult<JournalSummary> {
        let conn = self.lock();
        let pending = conn.query_row(CHANGES_PENDING, [], |row| row.get::<_, i64>(0))? as u64;
        let (dirty_files, dirty_bytes) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM inodes WHERE dirty = 1 AND kind = 1",
            [],
            |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
        )?;
        let mut stmt = conn.prepare_cached(
            "SELECT op || ' ' || CASE WHEN op = 'delete' THEN key ELSE 'inode ' || ino END || ': ' || last_error
             FROM journal WHERE last_error IS NOT NULL ORDER BY id DESC LIMIT 5",
        )?;
        let last_errors = stmt
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(JournalSummary {
            pending,
            dirty_files,
            dirty_bytes,
            last_errors,
        })
    }

    // --- cache presence and state ---

    pub fn save_blocks(&self, ino: u64, block_size: u64, bitmap: &[u8]) -> FsResult<()> {
        self.transaction(|tx| save_blocks_in(tx, ino, block_size, bitmap))
    }

    /// Saves the presence map inside a transaction (with the change it goes with).
    pub fn save_blocks_tx(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        block_size: u64,
        bitmap: &[u8],
    ) -> FsResult<()> {
        save_blocks_in(tx, ino, block_size, bitmap)
    }

    /// Saves the presence map of a file the bucket now holds, unsynced: after an unclean
    /// stop the maps of clean files are dropped anyway (`drop_clean_blocks`).
    pub fn save_clean_blocks(&self, ino: u64, block_size: u64, bitmap: &[u8]) -> FsResult<()> {
        self.save_clean_blocks_of(block_size, &[(ino, bitmap.to_vec())])
    }

    /// [`MetaStore::save_clean_blocks`] of several files (being unloaded), in one commit.
    pub fn save_clean_blocks_of(&self, block_size: u64, maps: &[(u64, Vec<u8>)]) -> FsResult<()> {
        if maps.is_empty() {
            return Ok(());
        }
        self.bookkeeping(|tx| {
            for (ino, bitmap) in maps {
                save_blocks_in(tx, *ino, block_size, bitmap)?;
            }
            Ok(())
        })
    }

    pub fn load_blocks(&self, ino: u64) -> FsResult<Option<(u64, Vec<u8>)>> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT block_size, bitmap FROM cache_blocks WHERE ino = ?1")?;
        Ok(stmt
            .query_row(params![ino as i64], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get(1)?))
            })
            .optional()?)
    }

    /// Forgets cached blocks of files whose data has no local changes (after an unclean
    /// stop, their bytes may not have reached the disk); a change of attributes only
    /// counts as none.
    pub fn drop_clean_blocks(&self) -> FsResult<Vec<u64>> {
        self.transaction(|tx| {
            let inos = tx
                .prepare_cached(
                    "SELECT c.ino FROM cache_blocks c JOIN inodes i ON i.ino = c.ino WHERE i.dirty IN (0, 2)",
                )?
                .query_map([], |row| row.get::<_, i64>(0))?
                .map(|r| r.map(|v| v as u64))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.prepare_cached(
                "DELETE FROM cache_blocks WHERE ino IN (SELECT ino FROM inodes WHERE dirty IN (0, 2))",
            )?
            .execute([])?;
            tx.prepare_cached("DELETE FROM cache_blocks WHERE ino NOT IN (SELECT ino FROM inodes)")?
                .execute([])?;
            Ok(inos)
        })
    }

    /// Files with a name that never got an object in the bucket (a write-through create
    /// whose first close never completed). Files whose stream the ledger lists are left
    /// to the recovery of that upload: the bucket may hold their object.
    pub fn files_never_stored(&self) -> FsResult<Vec<u64>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT ino FROM inodes WHERE kind = 1 AND parent IS NOT NULL
             AND (remote_key IS NULL OR remote_key = '')
             AND ino NOT IN (SELECT streamed_ino FROM uploads WHERE streamed_ino IS NOT NULL)",
        )?;
        let rows = stmt.query_map([], |row| row.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Removes an inode and its pending uploads, as if it had never been created.
    pub fn forget_inode(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<()> {
        tx.prepare_cached("DELETE FROM journal WHERE op IN ('sync', 'checksum') AND ino = ?1")?
            .execute(params![ino as i64])?;
        self.delete_inode(tx, ino)
    }

    /// Forgets which blocks of an inode's cache file were present (the file is going).
    /// Synced, and called before a cache file is deleted: its fsync also makes durable the
    /// uploader's unsynced record that the file is clean, which deleting its data relies on.
    pub fn forget_blocks(&self, ino: u64) -> FsResult<()> {
        self.forget_blocks_of(&[ino])
    }

    /// [`MetaStore::forget_blocks`] of several files (being evicted), in one commit.
    pub fn forget_blocks_of(&self, inos: &[u64]) -> FsResult<()> {
        if inos.is_empty() {
            return Ok(());
        }
        self.transaction(|tx| {
            let mut stmt = tx.prepare_cached("DELETE FROM cache_blocks WHERE ino = ?1")?;
            for ino in inos {
                stmt.execute(params![*ino as i64])?;
            }
            Ok(())
        })
    }

    /// An inode whose data lives at `key` in the bucket, if any.
    pub fn key_owner(&self, key: &str) -> FsResult<Option<Inode>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {INODE_COLUMNS} FROM inodes WHERE remote_key = ?1 LIMIT 1"
        ))?;
        Ok(stmt.query_row(params![key], inode_from_row).optional()?)
    }

    /// Records that an upload to `key` is starting, without a sync: the caller syncs the
    /// log ([`Self::sync_log`], group committed) before the object or any of its parts can
    /// appear, since only this record lets the next mount clean them up.
    /// `streamed_ino`: the write-through file whose writer streams the upload (see
    /// [`Self::record_streamed_object`]); None for an upload of bytes the cache holds.
    pub fn upload_starting(&self, key: &str, streamed_ino: Option<u64>) -> FsResult<()> {
        self.bookkeeping(|tx| {
            tx.prepare_cached(
                "INSERT INTO uploads(key, started_ms, streamed_ino) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET started_ms = ?2, streamed_ino = ?3",
            )?
            .execute(params![key, now_ms(), streamed_ino.map(|ino| ino as i64)])?;
            Ok(())
        })
    }

    /// The stream to `key` failed: whatever the bucket holds there is not the file's
    /// content (the spool, staged for a later upload, is).
    pub fn stream_abandoned(&self, key: &str) -> FsResult<()> {
        self.bookkeeping(|tx| {
            tx.prepare_cached("UPDATE uploads SET streamed_ino = NULL WHERE key = ?1")?
                .execute(params![key])?;
            Ok(())
        })
    }

    /// Records that a write-through file's stream completed `remote`: the file is clean,
    /// its size is the object's and its mtime `mtime`, the sync its creation queued is
    /// moot, and the upload leaves the ledger. `crc_stored`: the object's metadata carries
    /// its crc64 and the inode's attributes already; otherwise the uploader stores them
    /// later.
    ///
    /// A close commits this without a sync (one fsync less per file, with the writer
    /// waiting): a power loss can drop it, but not the ledger's record of the stream
    /// (synced before the upload began), and the next mount records the object again
    /// from the bucket (`daemon::recovery`).
    pub fn record_streamed_object(
        &self,
        tx: &Transaction<'_>,
        ino: u64,
        remote: &RemoteState,
        mtime: SystemTime,
        crc_stored: bool,
    ) -> FsResult<()> {
        let change = AttrChange {
            size: Some(remote.size),
            mtime: Some(mtime),
            dirty: Some(false),
            ..Default::default()
        };
        self.change_attrs(tx, ino, &change)?;
        self.set_remote(tx, ino, remote, Settles::Everything)?;
        tx.prepare_cached("DELETE FROM journal WHERE op = 'sync' AND ino = ?1")?
            .execute([ino as i64])?;
        self.upload_ended_tx(tx, &remote.key)?;
        if crc_stored {
            return Ok(());
        }
        self.enqueue(tx, &JournalOp::Metadata(ino), Duration::ZERO)
    }

    /// Records that the upload to `key` was completed or aborted. Unsynced: a record lost
    /// to a power loss only makes the next mount check the key again (it keeps an object
    /// an inode owns).
    pub fn upload_ended(&self, key: &str) -> FsResult<()> {
        self.bookkeeping(|tx| self.upload_ended_tx(tx, key))
    }

    /// [`Self::upload_ended`] inside the transaction that records the object.
    pub fn upload_ended_tx(&self, tx: &Transaction<'_>, key: &str) -> FsResult<()> {
        tx.prepare_cached("DELETE FROM uploads WHERE key = ?1")?
            .execute(params![key])?;
        Ok(())
    }

    /// Uploads started and never ended (a crash interrupted them, or their record).
    pub fn unfinished_uploads(&self) -> FsResult<Vec<UnfinishedUpload>> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT key, streamed_ino FROM uploads ORDER BY key")?;
        let rows = stmt.query_map([], |row| {
            Ok(UnfinishedUpload {
                key: row.get(0)?,
                streamed_ino: row.get::<_, Option<i64>>(1)?.map(|ino| ino as u64),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn state(&self, name: &str) -> FsResult<Option<String>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT value FROM state WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()?)
    }

    pub fn set_state(&self, name: &str, value: &str) -> FsResult<()> {
        self.transaction(|tx| {
            tx.prepare_cached("INSERT INTO state(name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2")?
                .execute(params![name, value])?;
            Ok(())
        })
    }
}

fn commit_in<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Transaction<'_>) -> FsResult<T>,
) -> FsResult<T> {
    let tx = conn.transaction()?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// The journal's unique target columns (op, ino, key) of an operation.
fn journal_target(op: &JournalOp) -> (&'static str, i64, String) {
    match op {
        JournalOp::Sync(ino) => ("sync", *ino as i64, String::new()),
        JournalOp::Delete(key) => ("delete", 0, key.clone()),
        // Named for its first use (the crc64 of a stream); stores written by earlier
        // versions hold it so.
        JournalOp::Metadata(ino) => ("checksum", *ino as i64, String::new()),
        JournalOp::AttrIndex(ino) => ("attr-index", *ino as i64, String::new()),
    }
}

fn entry_from_row(row: &Row<'_>) -> rusqlite::Result<JournalEntry> {
    let op: String = row.get(1)?;
    let ino: i64 = row.get(2)?;
    let key: String = row.get(3)?;
    Ok(JournalEntry {
        id: row.get(0)?,
        op: match op.as_str() {
            "sync" => JournalOp::Sync(ino as u64),
            "checksum" => JournalOp::Metadata(ino as u64),
            "attr-index" => JournalOp::AttrIndex(ino as u64),
            _ => JournalOp::Delete(key),
        },
        gen: row.get(4)?,
        attempts: row.get(5)?,
    })
}

fn save_blocks_in(conn: &Connection, ino: u64, block_size: u64, bitmap: &[u8]) -> FsResult<()> {
    conn.prepare_cached(
        "INSERT INTO cache_blocks(ino, block_size, bitmap) VALUES (?1, ?2, ?3)
         ON CONFLICT(ino) DO UPDATE SET block_size = ?2, bitmap = ?3",
    )?
    .execute(params![ino as i64, block_size as i64, bitmap])?;
    Ok(())
}

fn lookup_in(conn: &Connection, parent: u64, name: &[u8]) -> FsResult<Option<Inode>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {INODE_COLUMNS} FROM inodes WHERE parent = ?1 AND name = ?2"
    ))?;
    Ok(stmt
        .query_row(params![parent as i64, name], inode_from_row)
        .optional()?)
}

fn get_in(conn: &Connection, ino: u64) -> FsResult<Option<Inode>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {INODE_COLUMNS} FROM inodes WHERE ino = ?1"
    ))?;
    Ok(stmt
        .query_row(params![ino as i64], inode_from_row)
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> NewInode {
        NewInode {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime: SystemTime::now(),
            target: None,
            remote: None,
            attrs_loaded: true,
            listed: false,
            dirty: true,
        }
    }

    #[test]
    fn a_transaction_is_synced_before_it_returns_and_bookkeeping_waits_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        let synced = |store: &MetaStore| {
            let written = store.log.written();
            (written, store.log.is_synced(written))
        };
        store.set_state("a", "1").expect("state");
        assert_eq!(synced(&store), (1, true));
        store
            .bookkeeping(|tx| {
                tx.execute("INSERT INTO state(name, value) VALUES ('b', '2')", [])?;
                Ok(())
            })
            .expect("bookkeeping");
        assert_eq!(synced(&store), (2, false));
        // A transaction that changes nothing writes nothing to the log, and syncs nothing.
        store
            .transaction(|tx| {
                tx.execute("DELETE FROM state WHERE name = 'none'", [])?;
                Ok(())
            })
            .expect("empty transaction");
        assert_eq!(synced(&store), (2, false));
        // One that changes something syncs the bookkeeping before it too.
        store.set_state("a", "3").expect("state");
        assert_eq!(synced(&store), (3, true));
        assert_eq!(store.state("b").expect("read"), Some("2".to_owned()));
    }

    #[test]
    fn entries_paths_and_renames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        let sub = store
            .transaction(|tx| {
                store.create_entry(
                    tx,
                    ROOT_INO,
                    b"d",
                    &NewInode {
                        kind: Kind::Dir,
                        ..file(0)
                    },
                )
            })
            .expect("mkdir");
        let f = store
            .transaction(|tx| store.create_entry(tx, sub.ino, b"f", &file(3)))
            .expect("create");
        let dup = store.transaction(|tx| store.create_entry(tx, sub.ino, b"f", &file(3)));
        assert_eq!(dup.expect_err("duplicate").errno, libc::EEXIST);
        assert_eq!(
            store.path_of(f.ino).expect("path"),
            Some(vec![b"d".to_vec(), b"f".to_vec()])
        );
        store
            .transaction(|tx| store.move_entry(tx, sub.ino, ROOT_INO, b"e"))
            .expect("rename");
        assert_eq!(
            store.path_of(f.ino).expect("path"),
            Some(vec![b"e".to_vec(), b"f".to_vec()])
        );
        let found = store
            .resolve(&[b"e", b"f"])
            .expect("resolve")
            .expect("exists");
        assert_eq!(found.ino, f.ino);
        let below = store
            .transaction(|tx| store.descendants(tx, sub.ino))
            .expect("descendants");
        assert_eq!(below, vec![f.ino]);
    }

    #[test]
    fn journal_requeue_while_running_keeps_the_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        store
            .transaction(|tx| store.enqueue(tx, &JournalOp::Sync(5), Duration::ZERO))
            .expect("enqueue");
        let due = store.due_entries(DueScan::due_now(10)).expect("due");
        assert_eq!(due.len(), 1);
        store
            .transaction(|tx| store.enqueue(tx, &JournalOp::Sync(5), Duration::ZERO))
            .expect("requeue");
        assert!(
            !store.complete(&due[0]).expect("complete"),
            "the entry stays queued"
        );
        assert_eq!(
            store.journal_len().expect("len"),
            1,
            "a change during the upload must be uploaded again"
        );
        let due = store.due_entries(DueScan::due_now(10)).expect("due");
        assert!(store.complete(&due[0]).expect("complete"));
        assert_eq!(store.journal_len().expect("len"), 0);
    }

    #[test]
    fn a_scan_without_deletes_leaves_out_only_the_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        let ops = [
            JournalOp::Delete("a".into()),
            JournalOp::Sync(5),
            JournalOp::Delete("b".into()),
            JournalOp::Sync(6),
        ];
        for op in &ops {
            store
                .transaction(|tx| store.enqueue(tx, op, Duration::ZERO))
                .expect("enqueue");
        }
        let ops_of = |scan| -> Vec<JournalOp> {
            let due = store.due_entries(scan).expect("due");
            due.into_iter().map(|e| e.op).collect()
        };
        assert_eq!(ops_of(DueScan::due_now(10)), ops);
        let held = DueScan {
            deletes_too: false,
            ..DueScan::due_now(10)
        };
        assert_eq!(ops_of(held), vec![JournalOp::Sync(5), JournalOp::Sync(6)]);
    }

    /// A chmod or utimens of a stored file waits as a change of attributes only: a data
    /// change overrides it, its metadata replacement settles it only while nothing else
    /// changed, a restart queues that replacement (not an upload), and another tool's new
    /// version of the object becomes the file's data while the attributes stay.
    #[test]
    fn a_change_of_attributes_only_stays_apart_from_data_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        let stored = NewInode {
            dirty: false,
            remote: Some(RemoteState {
                key: "f".into(),
                etag: Some("v1".into()),
                size: 3,
                crc64: None,
            }),
            ..file(3)
        };
        let f = store
            .transaction(|tx| store.create_entry(tx, ROOT_INO, b"f", &stored))
            .expect("create")
            .ino;
        let chmod = AttrChange {
            perm: Some(0o600),
            ..Default::default()
        };
        let only_attrs = store
            .transaction(|tx| {
                store.change_attrs(tx, f, &chmod)?;
                store.mark_attrs_changed(tx, f, Duration::ZERO)
            })
            .expect("chmod");
        assert!(only_attrs);
        let inode = store.get(f).expect("get").expect("inode");
        assert!(inode.dirty && inode.only_attrs_dirty && !inode.data_dirty());
        assert!(store
            .queued(&JournalOp::Metadata(f))
            .expect("queued")
            .is_some());
        assert!(
            !store.has_local_changes(f).expect("changes"),
            "no data change"
        );

        // Another tool's version becomes the data; the mode set here stays.
        let theirs = crate::backend::ObjectInfo {
            size: 9,
            etag: Some("v2".into()),
            attrs: ObjectAttrs {
                kind: Kind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                mtime: SystemTime::now(),
            },
            crc64: None,
        };
        store.record_replaced(f, &theirs).expect("replaced");
        let inode = store.get(f).expect("get").expect("inode");
        assert_eq!((inode.size, inode.perm), (9, 0o600));

        // A restart queues the metadata replacement again, not an upload.
        let due = store.due_entries(DueScan::due_now(10)).expect("due");
        store.complete(&due[0]).expect("complete");
        store.requeue_dirty().expect("requeue");
        assert!(store
            .queued(&JournalOp::Metadata(f))
            .expect("queued")
            .is_some());
        assert!(store.queued(&JournalOp::Sync(f)).expect("queued").is_none());

        // A data change (a passthrough writer's open) is not settled by the replacement.
        let write = AttrChange {
            dirty: Some(true),
            ..Default::default()
        };
        store
            .transaction(|tx| store.change_attrs(tx, f, &write))
            .expect("write");
        let again = store
            .transaction(|tx| store.mark_attrs_changed(tx, f, Duration::ZERO))
            .expect("chmod");
        assert!(!again, "a pending upload carries the attributes");
        let inode = store.get(f).expect("get").expect("inode");
        assert!(inode.data_dirty());
        let remote = RemoteState {
            key: "f".into(),
            etag: Some("v3".into()),
            size: 9,
            crc64: None,
        };
        let settles = Settles::OnlyAttrsIfStill(crate::sync::attrs_of(&inode));
        let cleared = store
            .transaction(|tx| store.set_remote(tx, f, &remote, settles))
            .expect("record");
        assert!(!cleared, "the data change is still to upload");
        assert!(store.get(f).expect("get").expect("inode").data_dirty());
    }
}
