//! Deletes that arrive while another is in flight go out together, as one batch request
//! (S3's and OSS's DeleteObjects take up to 1,000 keys). A directory rename or an `rm -r`
//! then costs the bucket a few requests, not one per object, and each caller still
//! learns its own key's result.
//!
//! Group commit: callers queue their key, then take turns; whoever holds the turn sends
//! everything queued so far, so the callers that queued meanwhile find their result done
//! when their turn comes.
//!
//! A store without batch deletes (the directory bucket) deletes each key on its own, at
//! once: there a batch would only serialise the deletes, and a directory's delete that
//! fails until its children are gone would hold the turn, through its retries, while
//! those children wait behind it.

use std::sync::Mutex;

use opendal::{ErrorKind, Operator};
use tokio::sync::oneshot;

/// The most keys S3 and OSS accept in one DeleteObjects request.
const MAX_BATCH: usize = 1000;

struct Queued {
    key: String,
    done: oneshot::Sender<opendal::Result<()>>,
}

#[derive(Default)]
pub(super) struct DeleteBatcher {
    queue: Mutex<Vec<Queued>>,
    /// Held while a batch is sent.
    turn: tokio::sync::Mutex<()>,
}

impl DeleteBatcher {
    /// Deletes `key`, in a batch with whatever else is queued; a missing key is not an
    /// error.
    pub(super) async fn delete(&self, op: &Operator, key: &str) -> opendal::Result<()> {
        let batch_size = batch_size(op);
        if batch_size < 2 {
            return delete_one(op, key).await;
        }
        let (done, mut result) = oneshot::channel();
        self.lock_queue().push(Queued {
            key: key.to_string(),
            done,
        });
        let _turn = self.turn.lock().await;
        // One yield lets deletes started together (a group the uploader runs at once)
        // queue their keys before this batch goes.
        tokio::task::yield_now().await;
        // Bounded: every pass sends at least one of the oldest queued keys (a marker
        // `take_batch` holds back has a key below it that goes), ours among them once the
        // keys queued before it have gone; and only the turn holder drains the queue.
        loop {
            match result.try_recv() {
                Ok(outcome) => return outcome,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(opendal::Error::new(
                        ErrorKind::Unexpected,
                        "a batched delete ended without a result",
                    ))
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = self.take_batch(batch_size);
            send_batch(op, batch).await;
        }
    }

    /// The oldest queued keys, up to `batch_size`, less any directory marker with keys
    /// below it in the same batch: the marker goes back to the front of the queue, for a
    /// later request. A store that keeps real directories (s3rver, a file-system S3
    /// server) removes a directory with its last object, and runs the deletes of one
    /// request at once: with the marker among them, two of the last deletes can race to
    /// remove the directory, and the loser fails the whole request (s3rver answers 500).
    /// While the marker is there the directory is not empty.
    fn take_batch(&self, batch_size: usize) -> Vec<Queued> {
        let mut queue = self.lock_queue();
        let n = queue.len().min(batch_size);
        let batch: Vec<Queued> = queue.drain(..n).collect();
        let held: Vec<bool> = batch
            .iter()
            .map(|queued| has_keys_below(&queued.key, &batch))
            .collect();
        let (later, now): (Vec<_>, Vec<_>) = batch.into_iter().zip(held).partition(|(_, h)| *h);
        queue.splice(0..0, later.into_iter().map(|(queued, _)| queued));
        now.into_iter().map(|(queued, _)| queued).collect()
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `key` is a directory marker (`dir/`) with another key of `batch` below it.
fn has_keys_below(key: &str, batch: &[Queued]) -> bool {
    key.ends_with('/')
        && batch
            .iter()
            .any(|other| other.key.len() > key.len() && other.key.starts_with(key))
}

/// How many keys one delete request of this store takes (1 where it has no batch delete).
fn batch_size(op: &Operator) -> usize {
    op.info()
        .capability()
        .delete_max_size
        .unwrap_or(1)
        .min(MAX_BATCH)
}

/// Sends one batch and tells every caller in it. A batch the bucket refuses as a whole
/// (a store without batch deletes, one failed key) is retried key by key, so that each
/// caller gets the error of its own key.
async fn send_batch(op: &Operator, batch: Vec<Queued>) {
    if batch.len() > 1 {
        match delete_together(op, &batch).await {
            Ok(()) => {
                tracing::debug!(keys = batch.len(), "deleted objects in one batch");
                for queued in batch {
                    tracing::debug!(key = %queued.key, "deleted object");
                    deliver(queued.done, Ok(()));
                }
                return;
            }
            Err(err) => {
                tracing::debug!(keys = batch.len(), error = %err, "batch delete failed; deleting one by one")
            }
        }
    }
    for queued in batch {
        let outcome = delete_one(op, &queued.key).await;
        deliver(queued.done, outcome);
    }
}

async fn delete_together(op: &Operator, batch: &[Queued]) -> opendal::Result<()> {
    let mut deleter = op.deleter().await?;
    for queued in batch {
        deleter.delete(queued.key.as_str()).await?;
    }
    deleter.close().await
}

async fn delete_one(op: &Operator, key: &str) -> opendal::Result<()> {
    match op.delete(key).await {
        Err(err) if err.kind() != ErrorKind::NotFound => Err(err),
        _ => {
            tracing::debug!(key, "deleted object");
            Ok(())
        }
    }
}

/// The caller may have gone (its request was cancelled); the key is deleted anyway.
fn deliver(done: oneshot::Sender<opendal::Result<()>>, outcome: opendal::Result<()>) {
    if done.send(outcome).is_err() {
        tracing::debug!("a batched delete's caller was gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Results = Vec<oneshot::Receiver<opendal::Result<()>>>;

    fn queue_keys(batcher: &DeleteBatcher, keys: &[&str]) -> Results {
        keys.iter()
            .map(|key| {
                let (done, result) = oneshot::channel();
                batcher.lock_queue().push(Queued {
                    key: key.to_string(),
                    done,
                });
                result
            })
            .collect()
    }

    fn next_batch(batcher: &DeleteBatcher, batch_size: usize) -> Vec<String> {
        batcher
            .take_batch(batch_size)
            .into_iter()
            .map(|queued| queued.key)
            .collect()
    }

    #[test]
    fn a_directory_marker_goes_in_a_request_after_the_keys_below_it() {
        let batcher = DeleteBatcher::default();
        let _results = queue_keys(&batcher, &["d/", "d/a", "d/e/", "d/e/b", "other", "x/"]);
        assert_eq!(
            next_batch(&batcher, MAX_BATCH),
            ["d/a", "d/e/b", "other", "x/"]
        );
        assert_eq!(
            next_batch(&batcher, MAX_BATCH),
            ["d/e/"],
            "d/ had d/e/ below it"
        );
        assert_eq!(next_batch(&batcher, MAX_BATCH), ["d/"]);
        assert!(next_batch(&batcher, MAX_BATCH).is_empty());
    }

    #[test]
    fn a_held_marker_stays_ahead_of_newer_keys() {
        let batcher = DeleteBatcher::default();
        let _results = queue_keys(&batcher, &["d/", "d/a", "d/b"]);
        assert_eq!(next_batch(&batcher, 2), ["d/a"]);
        let _more = queue_keys(&batcher, &["later"]);
        assert_eq!(next_batch(&batcher, 2), ["d/b"]);
        assert_eq!(next_batch(&batcher, 2), ["d/", "later"]);
    }
}
