//! Streaming uploads with growing parts: the final size of a stream is unknown (a backup
//! writing it), so the part size doubles every 1,000 parts and a file of 1 TiB and more
//! fits in S3's 10,000 parts without any setting.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::{Backend, Kind};
use crate::config::MAX_PART_SIZE;
use crate::error::{FsError, FsResult};
use crate::integrity::Crc64;
use crate::meta::{MetaStore, RemoteState};

/// S3's limit on parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts at one size before the size doubles.
const PARTS_PER_STEP: u64 = 1_000;

/// The size of part number `index` (0-based) for a first part size of `base`.
pub fn part_size(base: u64, index: u64) -> u64 {
    let doublings = (index / PARTS_PER_STEP).min(20) as u32;
    base.saturating_mul(1u64 << doublings).min(MAX_PART_SIZE)
}

/// The largest object a stream with first part `base` can hold.
pub fn max_object_size(base: u64) -> u64 {
    (0..MAX_PARTS).map(|i| part_size(base, i)).sum()
}

/// One object being written as a stream of parts.
pub struct StreamUpload {
    key: String,
    /// Made when the first part leaves: a stream that ends within its first part goes
    /// up as one PUT, with its crc64 in its metadata.
    writer: Option<opendal::Writer>,
    metadata: HashMap<String, String>,
    concurrency: usize,
    /// Reads the finished object's version tag.
    backend: Backend,
    base_part: u64,
    buffer: Vec<u8>,
    parts_sent: u64,
    bytes: u64,
    /// Over every byte accepted, so the finished object's checksum is known at once.
    crc: Crc64,
    /// Where the upload is recorded while it runs, so a crash's leftovers get aborted.
    ledger: Option<Arc<MetaStore>>,
    /// The one PUT of a stream that ends within its first part may leave before the
    /// ledger's record is durable (see [`Ledger::new_file`]).
    put_before_record: bool,
    /// The fsync that makes the ledger's record durable, running while the writer goes
    /// on: nothing reaches the bucket before it ends (but a new file's one PUT, see
    /// [`Ledger::new_file`]).
    ledger_sync: Option<tokio::task::JoinHandle<FsResult<()>>>,
}

/// Where an upload is recorded while it runs, so that the next mount finds what a crash
/// left of it.
pub struct Ledger {
    pub store: Arc<MetaStore>,
    /// The write-through file whose writer streams the upload, if any.
    pub streamed_ino: Option<u64>,
    /// The streamed file has never stored an object (a new file). Its one PUT, if the
    /// stream ends within its first part, leaves without waiting for the fsync of the
    /// ledger's record, which runs meanwhile; the close still waits for both. A power loss
    /// before the record is durable makes the next mount forget the file as a creation
    /// never completed (`MetaStore::files_never_stored`) and touch nothing in the bucket:
    /// the object, if the PUT landed, stays there, complete, like another tool's. A file
    /// stored before needs the record first: the next mount settles it from the bucket
    /// only when the ledger lists it. Saves a small new file's close most of the wait for
    /// one fsync (W4 write-through; BENCHMARKS.md, nineteenth session).
    pub new_file: bool,
}

/// What a finished upload left in the bucket.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    pub crc64: Option<u64>,
    /// The object's metadata carries its crc64 already (no later metadata update needed).
    pub crc_stored: bool,
}

impl Uploaded {
    /// What the bucket now holds, as local metadata records it.
    pub fn remote(&self) -> RemoteState {
        RemoteState {
            key: self.key.clone(),
            etag: self.etag.clone(),
            size: self.size,
            crc64: self.crc64,
        }
    }
}

impl StreamUpload {
    pub async fn start(
        backend: &Backend,
        key: &str,
        metadata: HashMap<String, String>,
        base_part: u64,
        concurrency: usize,
        ledger: Option<Ledger>,
    ) -> FsResult<StreamUpload> {
        let (ledger, put_before_record) = match ledger {
            Some(Ledger {
                store,
                streamed_ino,
                new_file,
            }) => {
                store.upload_starting(key, streamed_ino)?;
                (Some(store), new_file && streamed_ino.is_some())
            }
            None => (None, false),
        };
        let ledger_sync = ledger
            .clone()
            .map(|store| tokio::task::spawn_blocking(move || store.sync_log()));
        Ok(StreamUpload {
            key: key.to_string(),
            writer: None,
            metadata,
            concurrency,
            backend: backend.clone(),
            base_part,
            buffer: Vec::new(),
            parts_sent: 0,
            bytes: 0,
            crc: Crc64::default(),
            ledger,
            put_before_record,
            ledger_sync,
        })
    }

    /// Waits until the ledger's record of this upload is durable: called before any
    /// request that can leave parts or an object behind (after it, for a new file's one
    /// PUT).
    async fn ledger_durable(&mut self) -> FsResult<()> {
        let Some(sync) = self.ledger_sync.take() else {
            return Ok(());
        };
        match sync.await {
            Ok(result) => result,
            Err(err) => Err(FsError::loud(
                libc::EIO,
                format!("recording the upload of {}: {err}", self.key),
            )),
        }
    }

    fn current_part_size(&self) -> usize {
        part_size(self.base_part, self.parts_sent) as usize
    }

    /// The key the object is written to.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The crc64 of the bytes accepted so far.
    pub fn crc64(&self) -> u64 {
        self.crc.value()
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Whether parts already left for the bucket (the stream can no longer be rewound).
    pub fn has_sent_parts(&self) -> bool {
        self.parts_sent > 0
    }

    /// The bytes not sent yet (all of them while no part has left).
    pub fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// Appends bytes; full parts go to the bucket (in parallel, bounded by the writer's
    /// concurrency, so this waits when that many parts are in flight).
    pub async fn push(&mut self, mut data: &[u8]) -> FsResult<()> {
        self.bytes += data.len() as u64;
        self.crc.update(data);
        // Bounded: each pass consumes input or sends a part.
        while !data.is_empty() {
            let part = self.current_part_size();
            if self.buffer.capacity() < part {
                let mut storage = crate::buffers::vec_with_capacity(part);
                storage.extend_from_slice(&self.buffer);
                crate::buffers::give_back(std::mem::replace(&mut self.buffer, storage));
            }
            let room = part - self.buffer.len();
            let take = room.min(data.len());
            self.buffer.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buffer.len() == part {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// The multipart writer, made on first use (no request leaves until a part does).
    async fn writer(&mut self) -> FsResult<&mut opendal::Writer> {
        if self.writer.is_none() {
            self.ledger_durable().await?;
            let writer = self
                .backend
                .writer(&self.key, self.metadata.clone(), self.concurrency)
                .await
                .map_err(|err| {
                    FsError::backend(&format!("starting upload of {}", self.key), err)
                })?;
            self.writer = Some(writer);
        }
        self.writer
            .as_mut()
            .ok_or_else(|| FsError::loud(libc::EIO, "upload writer vanished"))
    }

    async fn send_part(&mut self) -> FsResult<()> {
        // Sent without a copy; its storage rejoins the pool once the part is sent.
        let part = crate::buffers::Buffer::from(std::mem::take(&mut self.buffer));
        let number = self.parts_sent + 1;
        let key = self.key.clone();
        self.writer()
            .await?
            .write(part)
            .await
            .map_err(|err| FsError::backend(&format!("uploading part {number} of {key}"), err))?;
        self.parts_sent += 1;
        Ok(())
    }

    /// The metadata the object is to carry, as it is at the writer's close (a utimens or
    /// chmod may have come after the first write). It applies to an object still unsent,
    /// which goes up as one PUT; a multipart upload's left at its start, and the caller
    /// replaces it afterwards ([`Uploaded::crc_stored`] is false).
    pub fn set_metadata(&mut self, metadata: HashMap<String, String>) {
        self.metadata = metadata;
    }

    /// Sends the last part and completes the object.
    pub async fn finish(mut self) -> FsResult<Uploaded> {
        if self.writer.is_none() {
            return self.put_whole().await;
        }
        if !self.buffer.is_empty() {
            if let Err(err) = self.send_part().await {
                self.abort_quietly().await;
                return Err(err);
            }
        }
        let closed = match self.writer.as_mut() {
            Some(writer) => writer.close().await,
            None => return Err(FsError::loud(libc::EIO, "upload writer vanished")),
        };
        let meta = match closed {
            Ok(meta) => meta,
            Err(err) => {
                self.abort_quietly().await;
                return Err(FsError::backend(
                    &format!("completing upload of {}", self.key),
                    err,
                ));
            }
        };
        tracing::debug!(key = %self.key, parts = self.parts_sent, "completed streamed object");
        let etag = self.backend.written_tag(&self.key, &meta).await;
        // The ledger entry stays until the caller has recorded the object.
        Ok(Uploaded {
            key: self.key,
            etag,
            size: self.bytes,
            crc64: Some(self.crc.value()),
            crc_stored: false,
        })
    }

    /// A stream that ended within its first part: one PUT whose metadata carries the
    /// crc64, known now (a multipart upload's metadata leaves before it is).
    async fn put_whole(mut self) -> FsResult<Uploaded> {
        let record_first = !self.put_before_record;
        if record_first {
            self.record_durable_or_abandon().await?;
        }
        let crc = self.crc.value();
        let mut metadata = std::mem::take(&mut self.metadata);
        metadata.extend(crate::backend::ObjectAttrs::crc64_entry(crc));
        let body = crate::buffers::Buffer::from(std::mem::take(&mut self.buffer));
        let etag = match self
            .backend
            .put(&self.key, body, metadata, Kind::File)
            .await
        {
            Ok(etag) => etag,
            Err(err) => {
                // The PUT may still have landed: the ledger keeps the key for the next
                // mount, which deletes the object unless an inode owns it.
                self.abandon_in_ledger();
                return Err(FsError::backend(&format!("uploading {}", self.key), err));
            }
        };
        if !record_first {
            self.record_durable_or_abandon().await?;
        }
        // The ledger entry stays until the caller has recorded the object.
        Ok(Uploaded {
            key: self.key,
            etag,
            size: self.bytes,
            crc64: Some(crc),
            crc_stored: true,
        })
    }

    /// Waits for the ledger's record (see [`Self::ledger_durable`]); when it cannot be made
    /// durable, the stream is abandoned in the ledger and fails.
    async fn record_durable_or_abandon(&mut self) -> FsResult<()> {
        let result = self.ledger_durable().await;
        if result.is_err() {
            self.abandon_in_ledger();
        }
        result
    }

    /// Abandons the upload and its parts.
    pub async fn abort(mut self) {
        self.abort_quietly().await;
    }

    async fn abort_quietly(&mut self) {
        let Some(writer) = self.writer.as_mut() else {
            // Nothing left for the bucket: there is nothing to abort.
            return self.end_in_ledger();
        };
        match writer.abort().await {
            Ok(()) => self.end_in_ledger(),
            // The ledger keeps the key: the next mount aborts what is left, and takes
            // nothing at the key for the writer's file.
            Err(err) => {
                tracing::warn!(key = %self.key, error = %err, "aborting multipart upload failed; the next mount retries");
                self.abandon_in_ledger();
            }
        }
    }

    /// What the bucket holds at the key is not the writer's file (a stream that failed or
    /// was abandoned): the next mount must not take it for the file's content.
    fn abandon_in_ledger(&self) {
        if let Some(ledger) = &self.ledger {
            if let Err(err) = ledger.stream_abandoned(&self.key) {
                tracing::warn!(key = %self.key, error = %err, "could not record that a stream was abandoned");
            }
        }
    }

    fn end_in_ledger(&self) {
        if let Some(ledger) = &self.ledger {
            if let Err(err) = ledger.upload_ended(&self.key) {
                tracing::warn!(key = %self.key, error = %err, "could not record the end of an upload; the next mount checks the bucket for its parts");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_tib_stream_fits_in_ten_thousand_parts_at_the_minimum_part_size() {
        let min_part = crate::config::MIN_PART_SIZE;
        assert!(
            max_object_size(min_part) >= 1 << 40,
            "{}",
            max_object_size(min_part)
        );
        assert_eq!(part_size(8 << 20, 0), 8 << 20);
        assert_eq!(part_size(8 << 20, 999), 8 << 20);
        assert_eq!(part_size(8 << 20, 1000), 16 << 20);
        assert!(part_size(8 << 20, 9_999) <= MAX_PART_SIZE);
    }

    #[tokio::test]
    async fn a_stream_round_trips_through_a_real_backend() {
        let backend = crate::backend::source::open(
            "memory://",
            &crate::backend::source::Connection::default(),
            crate::backend::AttrDefaults {
                uid: 0,
                gid: 0,
                umask: 0o022,
            },
        )
        .expect("memory backend");
        let body: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut upload = StreamUpload::start(&backend, "big", HashMap::new(), 5 << 20, 2, None)
            .await
            .expect("start");
        for chunk in body.chunks(128 << 10) {
            upload.push(chunk).await.expect("push");
        }
        assert!(upload.has_sent_parts());
        let done = upload.finish().await.expect("finish");
        assert_eq!(done.size, body.len() as u64);
        assert_eq!(done.crc64, Some(crate::integrity::crc64(&body)));
        let stored = backend.read_all("big").await.expect("read back").to_vec();
        assert!(stored == body, "stored object differs");
    }
}
