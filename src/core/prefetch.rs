//! Sync mode keeps a full copy: objects discovered in the bucket (by a listing or a
//! refresh) are fetched into the cache in the background, a bounded number of files at a
//! time, in bounded pieces, through the same block fetch reads use.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore};

use super::{lock, run_bytes, Core};
use crate::backend::Kind;
use crate::cache::BLOCK_SIZE;
use crate::error::FsResult;

/// Blocks fetched per request: memory per file in flight stays at this many MiB.
const PIECE_BLOCKS: u64 = 8;

/// Inodes waiting for their data, each once.
#[derive(Default)]
pub(super) struct Prefetch {
    queue: Mutex<VecDeque<u64>>,
    queued: Mutex<HashSet<u64>>,
    wake: Notify,
}

impl Prefetch {
    fn push(&self, ino: u64) {
        if lock(&self.queued).insert(ino) {
            lock(&self.queue).push_back(ino);
            self.wake.notify_one();
        }
    }

    fn pop(&self) -> Option<u64> {
        lock(&self.queue).pop_front()
    }

    fn done(&self, ino: u64) {
        lock(&self.queued).remove(&ino);
    }
}

/// Block runs cut into pieces of at most [`PIECE_BLOCKS`].
fn pieces(runs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.into_iter()
        .flat_map(|run| {
            (run.start..run.end)
                .step_by(PIECE_BLOCKS as usize)
                .map(move |start| start..(start + PIECE_BLOCKS).min(run.end))
        })
        .collect()
}

impl Core {
    /// Queues an inode's data for the background fetch (sync mode; a no-op otherwise).
    pub(super) fn prefetch_later(&self, ino: u64) {
        if let Some(prefetch) = &self.prefetch {
            prefetch.push(ino);
        }
    }

    /// The background fetcher of sync mode: runs until the runtime stops, with at most
    /// `concurrency` files downloading at once.
    pub async fn run_prefetch(self: Arc<Self>, concurrency: usize) {
        let Some(prefetch) = &self.prefetch else {
            return;
        };
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        loop {
            let Some(ino) = prefetch.pop() else {
                prefetch.wake.notified().await;
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let core = self.clone();
            tokio::spawn(async move {
                if let Err(err) = core.prefetch_one(ino).await {
                    // Not fatal: the data is fetched on its first read instead.
                    tracing::warn!(ino, error = %err, "background fetch of a discovered object failed");
                }
                if let Some(prefetch) = &core.prefetch {
                    prefetch.done(ino);
                }
                drop(permit);
            });
        }
    }

    /// Fetches every missing block of one clean file, then closes its cache file (its
    /// presence saved) so a large bucket does not hold a descriptor per file.
    async fn prefetch_one(&self, ino: u64) -> FsResult<()> {
        let Some(inode) = self.meta.get(ino)? else {
            return Ok(()); // gone meanwhile
        };
        if inode.kind != Kind::File || inode.dirty || inode.remote_key.is_none() {
            return Ok(());
        }
        let file = self.cache_file(&inode)?;
        for piece in pieces(file.missing_all()) {
            let bytes = run_bytes(std::slice::from_ref(&piece));
            if self.cache.room_on_disk()? < bytes {
                tracing::warn!(
                    ino,
                    "the cache disk is too full for the full copy sync mode keeps; the rest is fetched when read"
                );
                return Ok(());
            }
            file.fetch(&self.backend, vec![piece]).await?;
        }
        self.cache.unload_if_idle(file, |state| {
            self.meta
                .save_blocks(ino, BLOCK_SIZE, &state.blocks.to_bytes())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_into_bounded_pieces() {
        assert_eq!(
            pieces(vec![0..3, 10..27]),
            vec![0..3, 10..18, 18..26, 26..27]
        );
        assert!(pieces(Vec::new()).is_empty());
    }
}
