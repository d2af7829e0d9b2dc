//! Writing a directory's attribute index (see `backend::attr_index`) from what the local
//! store knows of the objects the gateway stored there.

use std::collections::HashSet;
use std::time::Duration;

use super::{attrs_of, Uploader};
use crate::backend::attr_index::{self, IndexedFile};
use crate::backend::Kind;
use crate::error::{FsError, FsResult};
use crate::meta::Inode;

/// How long after the latest recorded object an index is written: a second and a bit, so
/// the bucket's whole-second clock dates every object recorded before it earlier.
const INDEX_AFTER_LAST_OBJECT: Duration = Duration::from_millis(1100);

impl Uploader {
    /// Rewrites the index of directory `dir_ino`: one entry per file whose object the
    /// gateway stored and is current at its path. A file still to upload, moved, or whose
    /// metadata the mount never read is left out; its next upload queues a rewrite.
    pub(super) async fn store_attr_index(&self, dir_ino: u64) -> FsResult<()> {
        let Some(dir_key) = self.directory_key(dir_ino)? else {
            return Ok(());
        };
        // An entry counts only for objects the bucket dates before the index, to the
        // second: one written just now would not pass (a flush runs this at once).
        let since = self.meta.since_index_queued();
        if since < INDEX_AFTER_LAST_OBJECT {
            tokio::time::sleep(INDEX_AFTER_LAST_OBJECT - since).await;
        }
        let index_key = attr_index::index_key(&dir_key);
        let _key = self.busy_keys.lock(index_key.clone()).await;
        // Again under the lock: a rename may have moved the directory meanwhile (its old
        // index is deleted by the rename, its files queue the new one as they move).
        if self.directory_key(dir_ino)?.as_deref() != Some(dir_key.as_str()) {
            return Ok(());
        }
        let files: Vec<IndexedFile> = self
            .meta
            .children(dir_ino)?
            .iter()
            .filter_map(|child| indexed_file(&dir_key, child))
            .collect();
        let indexed = !files.is_empty() && files.len() <= attr_index::MAX_INDEXED_FILES;
        if !indexed && self.unindexed_dirs().contains(&dir_ino) {
            return Ok(()); // removed already this run
        }
        let stored = if indexed {
            self.backend.write_attr_index(&dir_key, files).await
        } else {
            self.backend.delete(&index_key).await
        };
        stored.map_err(|err| {
            FsError::backend(&format!("storing the attribute index of `{dir_key}`"), err)
        })?;
        if indexed {
            self.unindexed_dirs().remove(&dir_ino);
        } else {
            self.unindexed_dirs().insert(dir_ino);
        }
        Ok(())
    }

    fn unindexed_dirs(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.unindexed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key of a directory still in the tree; `None` once removed or unstorable.
    fn directory_key(&self, dir_ino: u64) -> FsResult<Option<String>> {
        let Some(dir) = self.meta.get(dir_ino)? else {
            return Ok(None);
        };
        // Off for this mount (a rewrite queued by an earlier run with the index on).
        if dir.kind != Kind::Dir || !self.meta.indexes_directories() {
            return Ok(None);
        }
        let Some(names) = self.meta.path_of(dir_ino)? else {
            return Ok(None);
        };
        Ok(self.backend.layout().key_for(&names, Kind::Dir).ok())
    }
}

/// The index entry of `child`, if its object in the bucket is the one the store describes.
fn indexed_file(dir_key: &str, child: &Inode) -> Option<IndexedFile> {
    // Without a crc64 the object is not one a gateway stored (or not known whole): its
    // metadata may be absent, and the index would bake this mount's defaults into it.
    if child.kind != Kind::File || child.dirty || !child.attrs_loaded {
        return None;
    }
    child.remote_crc64?;
    let name = std::str::from_utf8(child.name.as_deref()?).ok()?;
    let key = child.remote_key.as_deref()?;
    if key.strip_prefix(dir_key) != Some(name) {
        return None;
    }
    Some(IndexedFile {
        name: name.to_string(),
        etag: child.remote_etag.clone()?,
        size: child.remote_size?,
        meta: attrs_of(child).encode(child.remote_crc64),
    })
}
