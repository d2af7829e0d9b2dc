//! The bucket: an OpenDAL operator built from the mount's SOURCE, with the few operations
//! the gateway needs, expressed in keys relative to the mount's prefix.

pub mod attr_index;
pub mod attrs;
mod deletes;
pub mod layout;
pub mod retry;
pub mod s3_direct;
pub mod source;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use opendal::{Buffer, ErrorKind, Operator};

use crate::error::{FsError, FsResult};
use deletes::DeleteBatcher;
use s3_direct::S3Direct;

pub use attr_index::AttrIndex;
pub use attrs::{AttrDefaults, Kind, ObjectAttrs};
pub use layout::KeyLayout;

/// Keys under this prefix belong to the gateway itself and never show in the mount.
pub const RESERVED_PREFIX: &str = ".bucketgate/";

/// The longest key S3 and OSS store.
pub const MAX_KEY_BYTES: usize = 1023;

/// What a HEAD (stat) of an object tells.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
    pub attrs: ObjectAttrs,
    pub crc64: Option<u64>,
}

/// What [`Backend::replace_metadata`] did.
#[derive(Debug)]
pub enum MetadataReplaced {
    /// Replaced; the object's new ETag when it changed.
    Done { etag: Option<String> },
    /// This bucket (or object size) allows no in-place change.
    Unsupported,
    /// The object is no longer the version the caller named (another writer replaced it).
    VersionChanged,
}

/// One child of a directory listing.
#[derive(Debug, Clone)]
pub struct ListedEntry {
    /// The child's name (no slashes).
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<SystemTime>,
}

/// The bucket behind one mount.
#[derive(Clone)]
pub struct Backend {
    op: Operator,
    /// For the embedded local-directory bucket: its root, where directory markers'
    /// attributes are kept as xattrs (the fs service cannot write metadata on a directory).
    local_root: Option<PathBuf>,
    defaults: AttrDefaults,
    /// The S3 calls OpenDAL lacks (S3 sources only).
    direct: Option<Arc<S3Direct>>,
    /// How paths map to keys in this bucket.
    layout: KeyLayout,
    /// Concurrent deletes, sent together.
    deletes: Arc<DeleteBatcher>,
    /// Human-readable description, e.g. `s3://bucket/prefix`.
    pub description: String,
}

impl Backend {
    pub fn new(
        op: Operator,
        local_root: Option<PathBuf>,
        defaults: AttrDefaults,
        direct: Option<S3Direct>,
        description: String,
    ) -> Self {
        Backend {
            op,
            local_root,
            defaults,
            direct: direct.map(Arc::new),
            layout: KeyLayout::Plain,
            deletes: Arc::default(),
            description,
        }
    }

    /// The same bucket, addressed with `layout`.
    pub fn with_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// The layout recorded in the bucket's marker, if there is one (unparsable text is
    /// an error: guessing could scatter keys).
    pub async fn recorded_layout(&self) -> Result<Option<KeyLayout>, String> {
        let body = match self.op.read(layout::LAYOUT_MARKER_KEY).await {
            Ok(body) => body.to_vec(),
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(format!("reading {}: {err}", layout::LAYOUT_MARKER_KEY)),
        };
        let text = String::from_utf8_lossy(&body);
        KeyLayout::parse(&text).map(Some).map_err(|err| {
            format!(
                "the bucket's {} is unreadable: {err}",
                layout::LAYOUT_MARKER_KEY
            )
        })
    }

    /// Records this mount's layout in the bucket's marker.
    pub async fn record_layout(&self) -> opendal::Result<()> {
        self.op
            .write(
                layout::LAYOUT_MARKER_KEY,
                self.layout.to_string().into_bytes(),
            )
            .await
            .map(|_| ())
    }

    /// Whether the bucket holds anything besides the gateway's own reserved objects.
    pub async fn has_objects(&self) -> opendal::Result<bool> {
        use futures::TryStreamExt;
        let mut lister = self.op.lister("").await?;
        // Bounded: the reserved prefix is one entry of a delimiter listing.
        while let Some(entry) = lister.try_next().await? {
            let path = entry.path();
            if !path.is_empty() && path != "/" && !path.starts_with(RESERVED_PREFIX) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A lister over every key under `prefix` (a raw key prefix), recursively.
    pub async fn lister_recursive(&self, prefix: &str) -> opendal::Result<opendal::Lister> {
        self.op.lister_with(prefix).recursive(true).await
    }

    /// A lister over the direct children of `dir_key` (delimiter listing).
    pub async fn lister_dir(&self, dir_key: &str) -> opendal::Result<opendal::Lister> {
        self.op.lister(dir_key).await
    }

    /// Direct S3 calls (abandoned uploads, metadata replacement), where the bucket is S3.
    pub fn direct(&self) -> Option<&S3Direct> {
        self.direct.as_deref()
    }

    pub fn operator(&self) -> &Operator {
        &self.op
    }

    /// Checks the bucket answers: fails fast on an unreachable endpoint, a missing bucket
    /// or bad credentials.
    pub async fn check(&self) -> opendal::Result<()> {
        self.op.list_with("").limit(1).await.map(|_| ())
    }

    /// HEAD of a key; `None` when there is no such object.
    pub async fn stat(&self, key: &str) -> opendal::Result<Option<ObjectInfo>> {
        let meta = match self.op.stat(key).await {
            Ok(meta) => meta,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let marker_metadata = match &self.direct {
            Some(direct) if key.ends_with('/') => direct
                .user_metadata(key)
                .await
                .map_err(|err| opendal::Error::new(ErrorKind::Unexpected, err.to_string()))?,
            _ => None,
        };
        Ok(Some(self.object_info(key, &meta, marker_metadata.as_ref())))
    }

    /// `marker` is the metadata of an S3 directory marker, read directly (OpenDAL answers
    /// their stat from a listing, without metadata); else OpenDAL's is used.
    fn object_info(
        &self,
        key: &str,
        meta: &opendal::Metadata,
        marker: Option<&HashMap<String, String>>,
    ) -> ObjectInfo {
        let user = meta.user_metadata();
        let get = |k: &str| match marker {
            Some(marker) => marker.get(k).cloned(),
            None => user.as_ref().and_then(|u| u.get(k)).map(str::to_string),
        };
        let last_modified = meta.last_modified().map(SystemTime::from);
        ObjectInfo {
            size: if key.ends_with('/') {
                0
            } else {
                meta.content_length()
            },
            etag: self.version_tag(meta),
            attrs: ObjectAttrs::decode(get, key.ends_with('/'), last_modified, self.defaults),
            crc64: attrs::stored_crc64(get),
        }
    }

    /// The version of an object as listings, HEADs and writes report it, to tell when
    /// another tool replaced it: the ETag; the directory bucket has none, so there its
    /// size and modification time (nanoseconds) stand in.
    pub fn version_tag(&self, meta: &opendal::Metadata) -> Option<String> {
        if let Some(etag) = meta.etag() {
            return Some(etag.to_string());
        }
        self.local_root.as_ref()?;
        let modified = SystemTime::from(meta.last_modified()?);
        let nanos = modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        Some(format!("local-{}-{nanos}", meta.content_length()))
    }

    /// The version tag of an object just written. The directory bucket's tag is size plus
    /// mtime, and what its writer reports is not always what a later HEAD (or listing)
    /// reads, which would make our own object look replaced by another tool: ask it.
    pub async fn written_tag(&self, key: &str, meta: &opendal::Metadata) -> Option<String> {
        if meta.etag().is_some() || self.local_root.is_none() {
            return self.version_tag(meta);
        }
        match self.op.stat(key).await {
            Ok(now) => self.version_tag(&now),
            Err(err) => {
                tracing::debug!(key, error = %err, "no version tag for a written object");
                None
            }
        }
    }

    /// Whether anything is stored at or below a directory key (a marker or any object):
    /// a directory found missing in a listing may have reappeared since.
    pub async fn prefix_exists(&self, dir_key: &str) -> opendal::Result<bool> {
        match self.op.list_with(dir_key).limit(1).await {
            Ok(entries) => Ok(!entries.is_empty()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// The embedded directory bucket's root, if that is what this is.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
    }

    /// Reads `range` of an object.
    pub async fn read_range(&self, key: &str, range: Range<u64>) -> opendal::Result<Buffer> {
        self.op.read_with(key).range(range).await
    }

    /// Streams `range` of an object: its bytes as they arrive, one GET.
    pub async fn read_stream(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> opendal::Result<opendal::FuturesBytesStream> {
        self.op.reader(key).await?.into_bytes_stream(range).await
    }

    /// One GET of `range`, its bytes handed to `sink` as they arrive and hashed on the
    /// way: the crc64 of the range, or `None` when `sink` stopped it (by returning false:
    /// its bytes went stale). Bytes past the range are refused, and an object shorter than
    /// the range changed in the bucket: both are errors.
    pub async fn stream_range(
        &self,
        key: &str,
        range: Range<u64>,
        mut sink: impl FnMut(&[u8]) -> FsResult<bool>,
    ) -> FsResult<Option<u64>> {
        use futures::StreamExt;
        let context = || format!("fetching {key} bytes {}..{}", range.start, range.end);
        let mut stream = self
            .read_stream(key, range.clone())
            .await
            .map_err(|err| FsError::backend(&context(), err))?;
        let len = range.end - range.start;
        let mut received = 0u64;
        let mut digest = crc64fast::Digest::new();
        // Bounded: the stream ends after the range's bytes (extra bytes are refused).
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| FsError::io(&context(), err))?;
            received += chunk.len() as u64;
            if received > len {
                return Err(FsError::loud(
                    libc::EIO,
                    format!("{}: more bytes than asked for", context()),
                ));
            }
            digest.write(&chunk);
            if !sink(&chunk)? {
                return Ok(None);
            }
        }
        if received < len {
            return Err(FsError::loud(
                libc::EIO,
                format!(
                    "{key}: object is shorter than expected ({received} bytes at {}); it changed in the bucket",
                    range.start
                ),
            ));
        }
        Ok(Some(digest.sum64()))
    }

    /// Every object key under `prefix` (recursively), without directory markers and the
    /// gateway's reserved prefix.
    pub async fn list_objects(&self, prefix: &str) -> opendal::Result<Vec<String>> {
        let entries = self.op.list_with(prefix).recursive(true).await?;
        Ok(entries
            .into_iter()
            .map(|entry| entry.path().to_string())
            .filter(|path| !path.ends_with('/') && !path.starts_with(RESERVED_PREFIX))
            .collect())
    }

    /// Reads a whole (small) object.
    pub async fn read_all(&self, key: &str) -> opendal::Result<Buffer> {
        self.op.read(key).await
    }

    /// Lists the direct children of a directory key (`""` for the root, else ending `/`),
    /// hiding the gateway's reserved prefix.
    pub async fn list_dir(&self, dir_key: &str) -> opendal::Result<Vec<ListedEntry>> {
        let entries = self.op.list(dir_key).await?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let path = entry.path();
            if path == dir_key || path.starts_with(RESERVED_PREFIX) {
                continue;
            }
            let Some(rest) = path.strip_prefix(dir_key) else {
                continue;
            };
            let is_dir = rest.ends_with('/');
            let name = rest.trim_end_matches('/');
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let meta = entry.metadata();
            out.push(ListedEntry {
                name: name.to_string(),
                is_dir,
                size: if is_dir { 0 } else { meta.content_length() },
                etag: if is_dir { None } else { self.version_tag(meta) },
                last_modified: meta.last_modified().map(SystemTime::from),
            });
        }
        Ok(out)
    }

    /// The attribute index of the directory at `dir_key`, if there is a usable one. A
    /// damaged or foreign index is not an error (the listing falls back to HEADs), only
    /// logged.
    pub async fn read_attr_index(&self, dir_key: &str) -> opendal::Result<Option<AttrIndex>> {
        let key = attr_index::index_key(dir_key);
        let Some((body, written)) = self.read_with_write_time(&key).await? else {
            return Ok(None);
        };
        match AttrIndex::decode(dir_key, &body.to_vec(), written) {
            Ok(index) => Ok(Some(index)),
            Err(reason) => {
                tracing::warn!(key, reason, "ignoring an attribute index");
                Ok(None)
            }
        }
    }

    /// A whole object and the time the bucket wrote it, or `None` if there is no such
    /// object (or the bucket gives no time). Where the GET's reply carries the object's
    /// metadata (S3, OSS) that is one request: on a single-threaded server a HEAD beside
    /// a directory's listing took as long as a listing page. Elsewhere a HEAD goes first,
    /// so an object rewritten between the two pairs a newer body with an older time, which
    /// only makes the caller trust less.
    async fn read_with_write_time(
        &self,
        key: &str,
    ) -> opendal::Result<Option<(Buffer, SystemTime)>> {
        use futures::TryStreamExt;
        let absent = |err: opendal::Error| match err.kind() {
            ErrorKind::NotFound => Ok(None),
            _ => Err(err),
        };
        let opened = match self.op.reader(key).await {
            Ok(reader) => reader.into_stream(..).await,
            Err(err) => Err(err),
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(err) => return absent(err),
        };
        let written = match stream.metadata().await {
            Ok(meta) => meta.last_modified().map(SystemTime::from),
            Err(err) if err.kind() == ErrorKind::Unsupported => None,
            Err(err) => return absent(err),
        };
        if let Some(written) = written {
            return match stream.try_collect::<Vec<Buffer>>().await {
                Ok(parts) => Ok(Some((parts.into_iter().flatten().collect(), written))),
                Err(err) => absent(err),
            };
        }
        drop(stream);
        let written = match self.op.stat(key).await {
            Ok(meta) => meta.last_modified().map(SystemTime::from),
            Err(err) => return absent(err),
        };
        let Some(written) = written else {
            return Ok(None);
        };
        match self.op.read(key).await {
            Ok(body) => Ok(Some((body, written))),
            Err(err) => absent(err),
        }
    }

    /// Stores the attribute index of the directory at `dir_key`.
    pub async fn write_attr_index(
        &self,
        dir_key: &str,
        files: Vec<attr_index::IndexedFile>,
    ) -> opendal::Result<()> {
        let key = attr_index::index_key(dir_key);
        let count = files.len();
        let body = attr_index::encode(dir_key, files)
            .map_err(|err| opendal::Error::new(ErrorKind::Unexpected, err.to_string()))?;
        self.op.write(&key, body).await?;
        tracing::debug!(dir_key, files = count, "stored an attribute index");
        Ok(())
    }

    /// Writes a small object in one request: a file (with a content type, see
    /// [`content_type_of`]) or a symlink.
    pub async fn put(
        &self,
        key: &str,
        body: impl Into<opendal::Buffer>,
        metadata: HashMap<String, String>,
        kind: Kind,
    ) -> opendal::Result<Option<String>> {
        let mut write = self.op.write_with(key, body.into()).user_metadata(metadata);
        if let Some(content_type) = content_type_of(key).filter(|_| kind == Kind::File) {
            write = write.content_type(content_type);
        }
        let meta = write.await?;
        tracing::debug!(key, "stored object");
        Ok(self.written_tag(key, &meta).await)
    }

    /// Starts a streaming (multipart above the first part) upload of a file. Each `write`
    /// on the returned writer becomes one part; the caller sizes them.
    pub async fn writer(
        &self,
        key: &str,
        metadata: HashMap<String, String>,
        concurrency: usize,
    ) -> opendal::Result<opendal::Writer> {
        let mut writer = self
            .op
            .writer_with(key)
            .concurrent(concurrency)
            .user_metadata(metadata);
        if let Some(content_type) = content_type_of(key) {
            writer = writer.content_type(content_type);
        }
        writer.await
    }

    /// Writes a directory marker `key` (ending in `/`) carrying the directory's attributes.
    pub async fn put_dir_marker(
        &self,
        key: &str,
        metadata: HashMap<String, String>,
    ) -> opendal::Result<()> {
        if let Some(root) = &self.local_root {
            self.op.create_dir(key).await?;
            return set_local_xattrs(&root.join(key.trim_end_matches('/')), &metadata);
        }
        // Operator::write refuses keys ending in `/`; the raw service writes the marker
        // object itself, with its metadata, as S3 tools expect.
        let (ctx, service) = self.op.clone().into_parts();
        let options = opendal::options::WriteOptions {
            user_metadata: Some(metadata),
            ..Default::default()
        };
        let (args, _) = opendal::raw::OpWrite::from_options(&service.capability_dyn(), options)?;
        let mut writer = service.write_dyn(&ctx, key, args)?;
        writer.close_dyn().await.map(|_| ())
    }

    /// Whether [`Self::replace_metadata`] can change an object of `size` bytes in place:
    /// on the directory bucket, and on S3 up to one CopyObject's limit.
    pub fn replaces_metadata_in_place(&self, size: u64) -> bool {
        self.local_root.is_some() || (self.direct.is_some() && size <= s3_direct::MAX_COPY_SIZE)
    }

    /// Replaces an object's user metadata in place, where the bucket allows it: S3 (a
    /// CopyObject onto itself, up to 5 GiB) and the directory bucket (its xattrs).
    /// `if_version`: an S3 ETag the object must still have (the copy is conditional).
    pub async fn replace_metadata(
        &self,
        key: &str,
        size: u64,
        metadata: &HashMap<String, String>,
        if_version: Option<&str>,
    ) -> Result<MetadataReplaced, String> {
        if let Some(root) = &self.local_root {
            set_local_xattrs(&root.join(key), metadata).map_err(|err| err.to_string())?;
            return Ok(MetadataReplaced::Done { etag: None });
        }
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| self.replaces_metadata_in_place(size))
        else {
            return Ok(MetadataReplaced::Unsupported);
        };
        match direct.replace_metadata(key, metadata, if_version).await {
            Ok(etag) => Ok(MetadataReplaced::Done { etag }),
            Err(err) if err.is_precondition_failed() => Ok(MetadataReplaced::VersionChanged),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Server-side copy, keeping the source's metadata. Returns the copy's version tag: a
    /// copy is a new version (a new modification time on the directory bucket, a plain
    /// ETag for a multipart source on S3), asked with a HEAD when the copy did not say.
    /// `source_size`, when the store knows it, spares a HEAD of the source: OpenDAL's S3
    /// copier otherwise asks one, only to choose between one CopyObject and a multipart
    /// copy (a directory rename of 2,000 files sent 2,000 of them).
    pub async fn copy(
        &self,
        from: &str,
        to: &str,
        source_size: Option<u64>,
    ) -> opendal::Result<Option<String>> {
        let tag = match self.retyped_copy(from, to, source_size) {
            Some((direct, content_type)) => {
                let etag = direct
                    .copy_retyped(from, to, content_type)
                    .await
                    .map_err(s3_direct::S3DirectError::into_opendal)?;
                tracing::debug!(from, to, content_type, "copied object, new content type");
                etag
            }
            None => {
                let options = opendal::options::CopyOptions {
                    source_content_length_hint: source_size,
                    ..Default::default()
                };
                let meta = self.op.copy_options(from, to, options).await?;
                tracing::debug!(from, to, "copied object");
                self.version_tag(&meta)
            }
        };
        match tag {
            Some(tag) => Ok(Some(tag)),
            None => Ok(self.stat(to).await?.and_then(|info| info.etag)),
        }
    }

    /// The content type a copy of `from` to `to` must set instead of keeping the source's:
    /// a rename to a name whose extension means another type (rsync's temporary name
    /// renamed to `index.html`). Only where a copy can replace headers (S3, up to one
    /// CopyObject's size); elsewhere the copy keeps them.
    fn retyped_copy(
        &self,
        from: &str,
        to: &str,
        source_size: Option<u64>,
    ) -> Option<(&S3Direct, &'static str)> {
        let new = content_type_of(to)?;
        let direct = self.direct.as_ref()?;
        let fits = source_size.is_some_and(|size| size <= s3_direct::MAX_COPY_SIZE);
        (fits && content_type_of(from) != Some(new)).then_some((direct, new))
    }

    /// Deletes a key; a missing key is not an error. Deletes made at the same time go to
    /// the bucket in one batch request.
    pub async fn delete(&self, key: &str) -> opendal::Result<()> {
        match &self.local_root {
            Some(root) if !key.ends_with('/') => remove_local_file(&root.join(key)),
            _ => self.deletes.delete(&self.op, key).await,
        }
    }

    /// The directory bucket creates directories for any key stored under them; on S3 a
    /// prefix with no marker vanishes with its last object. This removes such a directory
    /// (`dir_key` ends in `/`) when it is empty and carries no marker attributes. Returns
    /// whether it was removed; a no-op elsewhere.
    pub fn remove_empty_local_dir(&self, dir_key: &str) -> bool {
        let Some(root) = &self.local_root else {
            return false;
        };
        let path = root.join(dir_key.trim_end_matches('/'));
        !has_marker_xattr(&path) && std::fs::remove_dir(&path).is_ok()
    }
}

/// The `Content-Type` a file's new object gets, from its name's extension, as s3fs and
/// rclone set it: a bucket served over HTTP (a static site, a download link) needs it.
/// `None` for an unknown extension (the server's default applies) and for directory
/// markers. Services without content types (the directory bucket) ignore it.
pub fn content_type_of(key: &str) -> Option<&'static str> {
    if key.ends_with('/') {
        return None;
    }
    mime_guess::from_path(key).first_raw()
}

/// Deletes a file's object on the directory bucket. A file's key can name a directory
/// by then (a file `d` renamed away, then `mkdir d`, and the old key's delete runs
/// after): that directory is not the file and stays. OpenDAL's fs service would remove
/// it when empty, marker attributes and all.
fn remove_local_file(path: &std::path::Path) -> opendal::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound || path.is_dir() => Ok(()),
        Err(err) => Err(opendal::Error::new(
            ErrorKind::Unexpected,
            format!("deleting {}: {err}", path.display()),
        )),
    }
}

/// Whether a directory of the directory bucket carries marker attributes (`user.mode`).
fn has_marker_xattr(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true; // cannot tell: keep it
    };
    let Ok(c_name) = std::ffi::CString::new(format!("user.{}", attrs::keys::MODE)) else {
        return true;
    };
    // SAFETY: NUL-terminated strings; a zero-size query writes nothing.
    let len = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), std::ptr::null_mut(), 0) };
    len >= 0
}

fn set_local_xattrs(
    path: &std::path::Path,
    metadata: &HashMap<String, String>,
) -> opendal::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|err| opendal::Error::new(ErrorKind::Unexpected, err.to_string()))?;
    for (name, value) in metadata {
        let c_name = CString::new(format!("user.{name}"))
            .map_err(|err| opendal::Error::new(ErrorKind::Unexpected, err.to_string()))?;
        // SAFETY: both strings are NUL-terminated and live across the call.
        let rc = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(opendal::Error::new(
                ErrorKind::Unexpected,
                format!("setxattr {}: {err}", path.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_come_from_the_extension_of_files_only() {
        assert_eq!(content_type_of("site/index.html"), Some("text/html"));
        assert_eq!(
            content_type_of("exports/Data.JSON"),
            Some("application/json")
        );
        assert_eq!(content_type_of("notes"), None);
        assert_eq!(content_type_of(".index.html.Xy12Ab"), None);
        assert_eq!(content_type_of("pages.html/"), None, "a directory marker");
    }

    /// The directory bucket, as the daemon opens it.
    fn local_backend(root: &std::path::Path) -> Backend {
        let source = root.to_string_lossy().into_owned();
        let defaults = AttrDefaults {
            uid: 0,
            gid: 0,
            umask: 0o022,
        };
        source::open(&source, &source::Connection::default(), defaults).expect("open")
    }

    #[tokio::test]
    async fn a_file_key_deletes_only_a_file_on_the_directory_bucket() {
        let root = tempfile::tempdir().expect("tempdir");
        let backend = local_backend(root.path());
        backend
            .put(
                "f",
                Buffer::from(b"bytes".to_vec()),
                HashMap::new(),
                Kind::File,
            )
            .await
            .expect("put f");
        backend.delete("f").await.expect("delete f");
        assert!(!root.path().join("f").exists(), "the file is deleted");
        backend
            .delete("f")
            .await
            .expect("a missing key is no error");

        // The old file key `d` names the directory the mount made there since.
        let marker = HashMap::from([(attrs::keys::MODE.to_string(), "16877".to_string())]);
        backend.put_dir_marker("d/", marker).await.expect("mkdir d");
        backend.delete("d").await.expect("delete the file key d");
        assert!(
            root.path().join("d").is_dir() && has_marker_xattr(&root.path().join("d")),
            "the directory and its marker stay"
        );
    }
}
