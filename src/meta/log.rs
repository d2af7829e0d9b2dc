//! Which commits are durable, and a group commit for the ones that are not yet.
//!
//! The connection runs with synchronous=NORMAL: a commit writes its frames to the
//! write-ahead log file, so a SIGKILL loses nothing (they are in the page cache), and
//! [`CommitLog::sync_to`] makes them durable with one fdatasync of the log.
//! `MetaStore::transaction` syncs before it releases the connection, so what it commits is
//! durable before anyone else can see it, as with synchronous=FULL. Bookkeeping that
//! recovery can redo (`MetaStore::bookkeeping`) is synced later, by the next transaction,
//! a checkpoint or an explicit `sync_to`. The log is appended in commit order and SQLite
//! replays it up to the last complete commit, so a power loss can only lose a suffix of
//! the commits: the store comes back as it was after some commit, never with a later
//! record but without an earlier one.
//!
//! Syncing the log ourselves instead of switching the connection between FULL and NORMAL
//! saves two PRAGMA statements per bookkeeping commit (4 % of the daemon's CPU for a
//! write-through small file).
//!
//! `sync_to` is a group commit: one fdatasync of the log file covers every commit made
//! before it, and callers that arrive while it runs share the next one.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{FsError, FsResult};

pub(super) struct CommitLog {
    wal: PathBuf,
    /// Commits so far, as a sequence number.
    written: AtomicU64,
    /// Commits up to this number are known to be durable.
    synced: AtomicU64,
    /// Held while the log file is fsync'd, so that callers waiting for it share one.
    syncing: Mutex<()>,
}

impl CommitLog {
    pub(super) fn new(db: &Path) -> CommitLog {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        CommitLog {
            wal: PathBuf::from(wal),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: Mutex::new(()),
        }
    }

    /// A commit was made (under the connection lock); returns its number.
    pub(super) fn wrote(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    #[cfg(test)]
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    pub(super) fn is_synced(&self, seq: u64) -> bool {
        self.synced.load(Ordering::SeqCst) >= seq
    }

    /// Makes every commit up to number `seq` durable.
    pub(super) fn sync_to(&self, seq: u64) -> FsResult<()> {
        if self.synced.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let _turn = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if self.synced.load(Ordering::SeqCst) >= seq {
            return Ok(()); // the sync we waited for covered it
        }
        self.sync_now()
    }

    /// Makes every commit so far durable at once, without waiting for a group commit under
    /// way: for a caller holding the connection, which everyone else is waiting for.
    pub(super) fn sync_now(&self) -> FsResult<()> {
        // Every commit counted here has its frames in the file already.
        let upto = self.written.load(Ordering::SeqCst);
        match File::open(&self.wal) {
            Ok(file) => file
                .sync_data()
                .map_err(|err| FsError::io("syncing the metadata log", err))?,
            // No log: a checkpoint moved everything into the database file and synced it.
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(FsError::io("opening the metadata log", err)),
        }
        self.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every commit so far durable.
    pub(super) fn sync_all(&self) -> FsResult<()> {
        self.sync_to(self.written.load(Ordering::SeqCst))
    }
}
