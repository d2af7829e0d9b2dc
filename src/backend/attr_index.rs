//! A directory's attribute index: the user metadata (the same `mode`, `uid`, `gid`,
//! `mtime` and crc64 entries the objects carry) of the files the gateway stored in one
//! directory, kept in one object under the reserved prefix. The first listing of a
//! directory on a fresh mount reads it beside the listing, instead of one HEAD per file.
//!
//! The listing stays the authority: an entry stands for an object only while the listing
//! shows the version it describes (same ETag and size) and that version was written before
//! the index (its modification time is earlier than the index's). A file rewritten, retagged
//! in place or added by another tool since fails that test and gets its HEAD as before; a
//! stale or missing index only costs those HEADs.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{attrs, AttrDefaults, Kind, ListedEntry, ObjectAttrs, RESERVED_PREFIX};

/// Directories with more files than this get no index: rewriting a huge one after every
/// batch of uploads would cost more than the HEADs it saves. Their index is removed.
pub const MAX_INDEXED_FILES: usize = 20_000;

const FORMAT_VERSION: u32 = 1;

/// The key of the index of the directory at `dir_key`. Flat and fixed-length (a crc64 of
/// the directory key), so a deep or long path never makes an over-long key, and a file
/// name never collides with an index path on the directory bucket; the body names its
/// directory, which rules out a hash collision.
pub fn index_key(dir_key: &str) -> String {
    let mut digest = crc64fast::Digest::new();
    digest.write(dir_key.as_bytes());
    format!("{RESERVED_PREFIX}attr-index/{:016x}", digest.sum64())
}

/// One file as the index records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexedFile {
    pub name: String,
    pub etag: String,
    pub size: u64,
    /// The object's user metadata, as [`ObjectAttrs::encode`] writes it.
    pub meta: HashMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct IndexBody {
    version: u32,
    dir: String,
    files: Vec<IndexedFile>,
}

/// The body of the index of `dir_key` listing `files`.
pub fn encode(dir_key: &str, files: Vec<IndexedFile>) -> serde_json::Result<Vec<u8>> {
    let body = IndexBody {
        version: FORMAT_VERSION,
        dir: dir_key.to_string(),
        files,
    };
    serde_json::to_vec(&body)
}

/// An index read back, with the time the bucket says it was written.
#[derive(Debug)]
pub struct AttrIndex {
    files: HashMap<String, IndexedFile>,
    written: SystemTime,
}

impl AttrIndex {
    /// Parses the index of `dir_key`; an error says why it cannot be used (another
    /// format, another directory's index, a damaged body).
    pub fn decode(dir_key: &str, body: &[u8], written: SystemTime) -> Result<AttrIndex, String> {
        let body: IndexBody = serde_json::from_slice(body).map_err(|err| err.to_string())?;
        if body.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not {FORMAT_VERSION}",
                body.version
            ));
        }
        if body.dir != dir_key {
            return Err(format!("it describes `{}`", body.dir));
        }
        let files = body
            .files
            .into_iter()
            .map(|file| (file.name.clone(), file))
            .collect();
        Ok(AttrIndex { files, written })
    }

    /// The attributes and crc64 of the listed file, when the index describes the version
    /// the listing shows and nothing wrote it after the index.
    pub fn attrs_for(
        &self,
        entry: &ListedEntry,
        defaults: AttrDefaults,
    ) -> Option<(ObjectAttrs, Option<u64>)> {
        if entry.is_dir {
            return None;
        }
        let file = self.files.get(&entry.name)?;
        let modified = entry.last_modified?;
        if entry.etag.as_deref() != Some(file.etag.as_str())
            || entry.size != file.size
            || modified >= self.written
        {
            return None;
        }
        let get = |key: &str| file.meta.get(key).cloned();
        let attrs = ObjectAttrs::decode(get, false, Some(modified), defaults);
        (attrs.kind == Kind::File).then(|| (attrs, attrs::stored_crc64(get)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const DEFAULTS: AttrDefaults = attrs::TEST_DEFAULTS;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn stored_attrs() -> ObjectAttrs {
        ObjectAttrs {
            kind: Kind::File,
            perm: 0o600,
            uid: 1000,
            gid: 100,
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
        }
    }

    fn index_of_one_file() -> AttrIndex {
        let file = IndexedFile {
            name: "a.txt".into(),
            etag: "\"e1\"".into(),
            size: 5,
            meta: stored_attrs().encode(Some(42)),
        };
        let body = encode("docs/", vec![file]).expect("encodes");
        AttrIndex::decode("docs/", &body, at(200)).expect("decodes")
    }

    fn listed(etag: &str, size: u64, modified: u64) -> ListedEntry {
        ListedEntry {
            name: "a.txt".into(),
            is_dir: false,
            size,
            etag: Some(etag.into()),
            last_modified: Some(at(modified)),
        }
    }

    #[test]
    fn a_file_unchanged_since_the_index_takes_its_attributes() {
        let index = index_of_one_file();
        let (attrs, crc) = index
            .attrs_for(&listed("\"e1\"", 5, 100), DEFAULTS)
            .expect("indexed");
        assert_eq!(attrs, stored_attrs());
        assert_eq!(crc, Some(42));
    }

    #[test]
    fn another_version_or_a_later_write_is_not_trusted() {
        let index = index_of_one_file();
        assert!(index
            .attrs_for(&listed("\"e2\"", 5, 100), DEFAULTS)
            .is_none());
        assert!(index
            .attrs_for(&listed("\"e1\"", 6, 100), DEFAULTS)
            .is_none());
        // Same bytes, retagged in place after the index (a metadata copy keeps the ETag).
        assert!(index
            .attrs_for(&listed("\"e1\"", 5, 200), DEFAULTS)
            .is_none());
        let mut no_time = listed("\"e1\"", 5, 100);
        no_time.last_modified = None;
        assert!(index.attrs_for(&no_time, DEFAULTS).is_none());
        let mut other_name = listed("\"e1\"", 5, 100);
        other_name.name = "b.txt".into();
        assert!(index.attrs_for(&other_name, DEFAULTS).is_none());
    }

    #[test]
    fn another_directory_s_index_is_refused() {
        let body = encode("docs/", Vec::new()).expect("encodes");
        assert!(AttrIndex::decode("other/", &body, at(1)).is_err());
        assert!(AttrIndex::decode("docs/", b"not json", at(1)).is_err());
    }

    #[test]
    fn index_keys_are_flat_and_distinct() {
        let root = index_key("");
        let docs = index_key("docs/");
        assert!(root.starts_with(RESERVED_PREFIX) && docs.starts_with(RESERVED_PREFIX));
        assert_ne!(root, docs);
        assert_eq!(docs.len(), index_key("a/very/deep/path/").len());
    }
}
