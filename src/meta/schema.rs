//! Schema and migrations, versioned with `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::{FsError, FsResult};

/// The schema version this build writes.
pub const VERSION: i64 = 3;

const V1: &str = "
CREATE TABLE inodes(
    ino INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the kernel caches inode numbers
    parent INTEGER,                         -- NULL for the root and for unlinked-but-open files
    name BLOB,
    kind INTEGER NOT NULL,                  -- 1 file, 2 dir, 3 symlink
    perm INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    target BLOB,                            -- symlink target
    attrs_loaded INTEGER NOT NULL DEFAULT 1,-- 0: found by a listing, HEAD not done yet
    listed INTEGER NOT NULL DEFAULT 0,      -- dirs: children are known locally
    remote_key TEXT,                        -- where the bytes live in the bucket now
    remote_etag TEXT,
    remote_size INTEGER,
    fetch_limit INTEGER,                    -- bytes at or past this offset are not fetched
    dirty INTEGER NOT NULL DEFAULT 0        -- 1: local changes not yet in the bucket
);
CREATE UNIQUE INDEX dentries ON inodes(parent, name);
CREATE TABLE cache_blocks(
    ino INTEGER PRIMARY KEY,
    block_size INTEGER NOT NULL,
    bitmap BLOB NOT NULL
);
CREATE TABLE journal(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,                       -- 'sync' (make the bucket match inode) or 'delete' (key)
    ino INTEGER NOT NULL DEFAULT 0,
    key TEXT NOT NULL DEFAULT '',
    gen INTEGER NOT NULL DEFAULT 0,         -- bumped when re-queued while running
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE UNIQUE INDEX journal_target ON journal(op, ino, key);
CREATE TABLE state(name TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// Version 2: the crc64 the bucket's object carries (or that this gateway computed while
/// streaming it), as the bits of a u64; NULL when unknown.
/// And the ledger of multipart uploads started and not yet completed or aborted, so the
/// ones a crash abandoned can be aborted at the next mount.
const V2: &str = "
ALTER TABLE inodes ADD COLUMN remote_crc64 INTEGER;
CREATE TABLE uploads(key TEXT PRIMARY KEY, started_ms INTEGER NOT NULL);
CREATE INDEX inodes_remote_key ON inodes(remote_key);
";

/// Version 3: the write-through file an upload streams, if any. Its close records the
/// object without a sync, and its local bytes are never made durable, so the next mount
/// takes an object this upload left as the file's content (`daemon::recovery`).
const V3: &str = "
ALTER TABLE uploads ADD COLUMN streamed_ino INTEGER;
";

/// Brings a database to [`VERSION`], in one transaction. A database a newer build wrote
/// is refused: its rows may mean what this build does not know (a `dirty` value, a
/// journal op), and acting on them could drop a change the bucket still lacks.
pub fn migrate(conn: &mut Connection) -> FsResult<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > VERSION {
        return Err(FsError::new(
            libc::EIO,
            format!(
                "it was written by a newer bucketgate (schema version {version}; this build \
                 knows up to {VERSION}) and may hold changes not yet in the bucket: mount it \
                 with that newer build, or give this one another --cache-dir"
            ),
        ));
    }
    if version == VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    if version < 1 {
        tx.execute_batch(V1)?;
    }
    if version < 2 {
        tx.execute_batch(V2)?;
    }
    if version < 3 {
        tx.execute_batch(V3)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_a_newer_build_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let mut conn = Connection::open(&path).expect("open");
        migrate(&mut conn).expect("a new store");
        migrate(&mut conn).expect("this build's own store");
        conn.execute_batch(&format!("PRAGMA user_version = {}", VERSION + 1))
            .expect("set a newer version");
        let err = migrate(&mut conn).expect_err("a newer store").to_string();
        assert!(err.contains("newer bucketgate"), "{err}");
        assert!(err.contains("--cache-dir"), "{err}");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, VERSION + 1, "the store is left untouched");
    }
}
