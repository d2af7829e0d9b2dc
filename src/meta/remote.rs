//! What refreshing a directory from the bucket asks of the store: whether a key or an
//! inode still has local work pending, and the records of remote additions, replacements
//! and deletions. Refresh bookkeeping (when a directory was last listed) stays in memory.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::{get_in, to_ns, MetaStore, DIRTY_ONLY_ATTRS};
use crate::backend::{Kind, ObjectInfo};
use crate::error::FsResult;

/// The smallest string above every string starting with `prefix` (for index range scans).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

fn key_in_use_in(conn: &Connection, key: &str) -> FsResult<bool> {
    let owned: bool = conn
        .prepare_cached("SELECT 1 FROM inodes WHERE remote_key = ?1 LIMIT 1")?
        .exists(params![key])?;
    let deleting: bool = conn
        .prepare_cached("SELECT 1 FROM journal WHERE op = 'delete' AND key = ?1 LIMIT 1")?
        .exists(params![key])?;
    if owned || deleting || !key.ends_with('/') {
        return Ok(owned || deleting);
    }
    // A directory prefix stays in use while objects below it still belong to an inode
    // (a directory renamed locally whose children have not moved yet) or wait to be deleted.
    let end = prefix_end(key);
    let below: bool = conn
        .prepare_cached("SELECT 1 FROM inodes WHERE remote_key >= ?1 AND remote_key < ?2 LIMIT 1")?
        .exists(params![key, end])?;
    let below_deleting: bool = conn
        .prepare_cached(
            "SELECT 1 FROM journal WHERE op = 'delete' AND key >= ?1 AND key < ?2 LIMIT 1",
        )?
        .exists(params![key, end])?;
    Ok(below || below_deleting)
}

/// An inode whose only change is its attributes (a chmod or utimens waiting for its
/// metadata replacement) has none here: another tool's new version of the object is its
/// data, and the attributes go onto that version.
fn has_local_changes_in(conn: &Connection, ino: u64) -> FsResult<bool> {
    let row: Option<(i64, bool)> = conn
        .prepare_cached("SELECT dirty, remote_key IS NULL AND ino != 1 FROM inodes WHERE ino = ?1")?
        .query_row(params![ino as i64], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let only_attrs = row.is_some_and(|(dirty, _)| dirty == DIRTY_ONLY_ATTRS);
    let queued: bool = conn
        .prepare_cached(
            "SELECT 1 FROM journal WHERE op != 'delete' AND (op != 'checksum' OR NOT ?2)
             AND ino = ?1 LIMIT 1",
        )?
        .exists(params![ino as i64, only_attrs])?;
    Ok(queued
        || row.is_some_and(|(dirty, never_stored)| (dirty != 0 && !only_attrs) || never_stored))
}

impl MetaStore {
    /// Whether a key found in the bucket still belongs to local work: an inode's data
    /// lives there (a rename not yet carried out), or a delete of it is queued. Such a key
    /// is not a new object from another tool.
    pub fn key_in_use_tx(&self, tx: &Transaction<'_>, key: &str) -> FsResult<bool> {
        key_in_use_in(tx, key)
    }

    /// Whether an inode has changes the bucket does not have yet: dirty, never stored, or
    /// with queued bucket work.
    pub fn has_local_changes(&self, ino: u64) -> FsResult<bool> {
        has_local_changes_in(&self.lock(), ino)
    }

    pub fn has_local_changes_tx(&self, tx: &Transaction<'_>, ino: u64) -> FsResult<bool> {
        has_local_changes_in(tx, ino)
    }

    /// Records the version of the remote object last seen at the inode's key, without
    /// touching anything else (a conflict whose remote side was preserved elsewhere).
    pub fn set_remote_etag(&self, ino: u64, etag: Option<&str>) -> FsResult<()> {
        self.transaction(|tx| {
            tx.prepare_cached("UPDATE inodes SET remote_etag = ?2 WHERE ino = ?1")?
                .execute(params![ino as i64, etag])?;
            Ok(())
        })
    }

    /// Another tool replaced the object at the inode's key with `info`: the remote state,
    /// and (unless local changes arrived meanwhile) size and attributes follow it. An
    /// attribute change waiting for its metadata replacement keeps its attributes.
    pub fn record_replaced(&self, ino: u64, info: &ObjectInfo) -> FsResult<()> {
        let attrs = &info.attrs;
        // A symlink's target is read again with its attributes.
        let loaded = attrs.kind != Kind::Symlink;
        self.transaction(|tx| {
            tx.prepare_cached(
                "UPDATE inodes SET remote_etag = ?2, remote_size = ?3, remote_crc64 = ?4,
                 size = CASE WHEN dirty = 1 THEN size ELSE ?3 END,
                 fetch_limit = CASE WHEN dirty = 1 THEN fetch_limit ELSE ?3 END,
                 perm = CASE WHEN dirty THEN perm ELSE ?5 END,
                 uid = CASE WHEN dirty THEN uid ELSE ?6 END,
                 gid = CASE WHEN dirty THEN gid ELSE ?7 END,
                 mtime_ns = CASE WHEN dirty THEN mtime_ns ELSE ?8 END,
                 attrs_loaded = CASE WHEN dirty THEN attrs_loaded ELSE ?9 END,
                 target = CASE WHEN dirty THEN target ELSE NULL END
             WHERE ino = ?1",
            )?
            .execute(params![
                ino as i64,
                info.etag,
                info.size as i64,
                info.crc64.map(|c| c as i64),
                attrs.perm,
                attrs.uid,
                attrs.gid,
                to_ns(attrs.mtime),
                loaded,
            ])?;
            Ok(())
        })
    }

    /// Another tool deleted the object at the inode's key: the entry goes. An open inode
    /// is only detached, and forgets its key, so its last close deletes nothing in the
    /// bucket (the key may hold someone else's object by then).
    pub fn remove_gone_tx(&self, tx: &Transaction<'_>, ino: u64, open: bool) -> FsResult<()> {
        if !open {
            return self.delete_inode(tx, ino);
        }
        self.detach(tx, ino)?;
        tx.prepare_cached("UPDATE inodes SET remote_key = NULL WHERE ino = ?1")?
            .execute(params![ino as i64])?;
        Ok(())
    }

    /// Re-reads an inode inside a transaction and says whether it still stands at `key`.
    pub fn still_at_key_tx(&self, tx: &Transaction<'_>, ino: u64, key: &str) -> FsResult<bool> {
        Ok(get_in(tx, ino)?.is_some_and(|inode| inode.remote_key.as_deref() == Some(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{JournalOp, NewInode, RemoteState, ROOT_INO};
    use std::time::{Duration, SystemTime};

    fn remote_file(key: &str) -> NewInode {
        NewInode {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: 3,
            mtime: SystemTime::now(),
            target: None,
            remote: Some(RemoteState {
                key: key.to_string(),
                etag: Some("e1".into()),
                size: 3,
                crc64: None,
            }),
            attrs_loaded: true,
            listed: false,
            dirty: false,
        }
    }

    #[test]
    fn keys_owned_or_being_deleted_are_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("m.db"), 0o755, 0, 0).expect("open");
        store
            .transaction(|tx| store.create_entry(tx, ROOT_INO, b"b", &remote_file("a/x")))
            .expect("create");
        store
            .transaction(|tx| store.enqueue(tx, &JournalOp::Delete("gone".into()), Duration::ZERO))
            .expect("enqueue");
        let in_use = |key: &str| {
            store
                .transaction(|tx| store.key_in_use_tx(tx, key))
                .expect("query")
        };
        assert!(in_use("a/x"));
        assert!(in_use("a/"), "a prefix with an owned object below");
        assert!(in_use("gone"));
        assert!(!in_use("new"));
        assert!(!in_use("b/"));
    }
}
