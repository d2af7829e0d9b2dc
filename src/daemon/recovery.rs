//! What a crash leaves behind in the bucket, cleaned up at the next mount: multipart
//! uploads that were never completed (their parts cost storage forever) and the embedded
//! directory bucket's temporary files.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::backend::source::LOCAL_TMP_DIR;
use crate::backend::{Backend, Kind};
use crate::meta::{JournalOp, MetaStore, RemoteState, Settles, UnfinishedUpload};
use crate::sync::Uploader;

/// Temporary files of the directory bucket older than this belong to no live writer.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

/// Settles the write-through streams the ledger still lists (see [`settle_stream`]), first
/// of all: until then, such a file's queued upload would send its spool, which was never
/// fsync'd, over the object its close stored. So unlike the rest of the cleanup, a failure
/// here must stop the mount. Their multipart leftovers (initiated before `started`) are
/// aborted first. Runs before the uploader starts, so nothing races it.
pub async fn settle_streams(
    meta: &MetaStore,
    uploader: &Uploader,
    backend: &Backend,
    started: SystemTime,
) -> anyhow::Result<()> {
    let uploads = meta
        .unfinished_uploads()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut aborted, mut adopted, mut forgotten) = (0, 0, 0);
    for UnfinishedUpload { key, streamed_ino } in &uploads {
        let Some(ino) = streamed_ino else {
            continue;
        };
        aborted += abort_leftovers(backend, key, started).await?;
        match settle_stream(meta, uploader, backend, key, *ino).await? {
            StreamSettled::Adopted => adopted += 1,
            StreamSettled::Forgotten => forgotten += 1,
            StreamSettled::Neither => {}
        }
    }
    if adopted + forgotten > 0 {
        tracing::info!(
            adopted,
            forgotten,
            aborted,
            "settled write-through uploads an earlier run left unrecorded"
        );
    }
    Ok(())
}

/// Aborts the multipart uploads to `key` initiated before `started` (ours: the ledger
/// lists the key). The directory bucket writes through temporary files, and the memory
/// bucket died with the process: neither has multipart uploads.
async fn abort_leftovers(backend: &Backend, key: &str, started: SystemTime) -> anyhow::Result<u32> {
    let Some(janitor) = backend.direct() else {
        return Ok(0);
    };
    let mut aborted = 0;
    for upload in janitor.list(key).await? {
        if upload.key == key && upload.initiated <= started {
            janitor.abort(&upload).await?;
            aborted += 1;
        }
    }
    Ok(aborted)
}

/// Settles the uploads the ledger says were running when the daemon stopped without
/// recording them (after [`settle_streams`]): their multipart uploads (initiated before
/// `started`) are aborted, and an object that did get completed is deleted unless an inode
/// owns it (the journal uploads the file again). Only those keys are touched: other
/// writers' uploads are not ours. Runs before the uploader starts, so nothing races it.
pub async fn abort_abandoned_uploads(
    meta: &MetaStore,
    uploader: &Uploader,
    backend: &Backend,
    started: SystemTime,
) -> anyhow::Result<()> {
    let uploads = meta
        .unfinished_uploads()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if uploads.is_empty() {
        return Ok(());
    }
    let mut aborted = 0;
    for UnfinishedUpload { key, streamed_ino } in &uploads {
        tracing::debug!(key, "settling an upload interrupted by an earlier run");
        // A stream's leftovers went in `settle_streams`, which ran without error.
        if streamed_ino.is_none() {
            aborted += abort_leftovers(backend, key, started).await?;
        }
        match uploader.delete_if_unclaimed(key).await {
            // A moved file still copies from it: the journal deletes it afterwards.
            Err(err) if err.errno == libc::EAGAIN => meta
                .transaction(|tx| meta.enqueue(tx, &JournalOp::Delete(key.clone()), Duration::ZERO))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            other => other.map_err(|e| anyhow::anyhow!("{e}"))?,
        }
        record_kept_object(meta, backend, key).await?;
        meta.upload_ended(key).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    tracing::info!(
        keys = uploads.len(),
        aborted,
        "settled uploads interrupted by an earlier run"
    );
    Ok(())
}

/// What the recovery of a write-through stream did with its file.
enum StreamSettled {
    /// The bucket holds the stream's object: it is the file.
    Adopted,
    /// A new file whose stream left nothing: it never existed.
    Forgotten,
    /// The file is gone or was stored before: the ledger's usual cleanup applies.
    Neither,
}

/// A write-through stream the ledger still lists: the daemon stopped before its record was
/// durable (a close commits it without a sync, `MetaStore::record_streamed_object`).
/// The local spool was never made durable, so the bucket decides. An object at the key is
/// the file as its writer closed it, or, had the upload not landed, the file's earlier
/// version (a close that never returned may leave that): it is recorded as the file's
/// content. No object and no earlier one: the file's creation never completed, and it is
/// dropped, as write-through promises the old object or none.
async fn settle_stream(
    meta: &MetaStore,
    uploader: &Uploader,
    backend: &Backend,
    key: &str,
    ino: u64,
) -> anyhow::Result<StreamSettled> {
    let err = |e: crate::error::FsError| anyhow::anyhow!("{e}");
    let Some(inode) = meta.get(ino).map_err(err)? else {
        return Ok(StreamSettled::Neither);
    };
    if inode.kind != Kind::File || inode.parent.is_none() {
        return Ok(StreamSettled::Neither);
    }
    let info = backend
        .stat(key)
        .await
        .map_err(|e| anyhow::anyhow!("HEAD {key}: {e}"))?;
    let Some(info) = info else {
        if inode.remote_key.as_deref().is_some_and(|k| !k.is_empty()) {
            return Ok(StreamSettled::Neither);
        }
        meta.transaction(|tx| meta.forget_inode(tx, ino))
            .map_err(err)?;
        uploader.discard_cache_file(ino).map_err(err)?;
        return Ok(StreamSettled::Forgotten);
    };
    let remote = RemoteState {
        key: key.to_string(),
        etag: info.etag,
        size: info.size,
        crc64: info.crc64,
    };
    let crc_stored = remote.crc64.is_some();
    let now = std::time::SystemTime::now();
    meta.transaction(|tx| meta.record_streamed_object(tx, ino, &remote, now, crc_stored))
        .map_err(err)?;
    // Whatever the spool kept is not the object: reads fetch it.
    uploader.discard_cache_file(ino).map_err(err)?;
    tracing::info!(
        key,
        ino,
        size = remote.size,
        "recorded the object a write-through close left unrecorded"
    );
    Ok(StreamSettled::Adopted)
}

/// A key its owner still stands at holds either the version the store records or the
/// one our interrupted run uploaded and did not record. Either is ours: recording what is
/// there keeps the next upload from taking our own object for another tool's change (a
/// false conflict copy) and keeps reads checked against the right crc64.
async fn record_kept_object(meta: &MetaStore, backend: &Backend, key: &str) -> anyhow::Result<()> {
    let err = |e: crate::error::FsError| anyhow::anyhow!("{e}");
    let Some(owner) = meta.key_owner(key).map_err(err)? else {
        return Ok(());
    };
    let Some(info) = backend
        .stat(key)
        .await
        .map_err(|e| anyhow::anyhow!("HEAD {key}: {e}"))?
    else {
        return Ok(());
    };
    if info.etag == owner.remote_etag && Some(info.size) == owner.remote_size {
        return Ok(());
    }
    let remote = RemoteState {
        key: key.to_string(),
        etag: info.etag,
        size: info.size,
        crc64: info.crc64,
    };
    tracing::debug!(
        key,
        ino = owner.ino,
        "recorded the object an interrupted upload left"
    );
    meta.transaction(|tx| meta.set_remote(tx, owner.ino, &remote, Settles::Nothing))
        .map(drop)
        .map_err(err)
}

/// Removes the directory bucket's temporary files that no writer has touched for an hour.
pub fn sweep_local_tmp(root: &Path) {
    let dir = root.join(LOCAL_TMP_DIR);
    let mut removed = 0;
    // Bounded by the directory's size; nested dirs mirror key paths.
    for entry in walk(&dir) {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_TMP_AGE);
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(path = %entry.path().display(), error = %err, "removing a stale temporary file")
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed stale temporary files of interrupted writes"
        );
    }
}

fn walk(dir: &Path) -> Vec<std::fs::DirEntry> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => files.push(entry),
                _ => {}
            }
        }
    }
    files
}
