//! Write-through reads: the parts of an object a handle fetched ahead, each its own ranged
//! GET, in flight in parallel and held in memory (nothing is kept on disk in this mode).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};

use crate::backend::Backend;
use crate::buffers::Buffer;
use crate::error::{FsError, FsResult};

/// Bytes of one ranged GET of a sequential reader. 8 MiB, as the direct client uses: on
/// s3rver a cold 1 GiB read ran at 0.70x the direct client with 4 MiB parts (6 ahead) and
/// 0.79-0.83x with 8 MiB (4 ahead); the server spends less CPU per byte on fewer, larger
/// GETs. 16 MiB parts were slower (0.68x): a read waits for its whole part.
pub const STREAM_PART: u64 = 8 << 20;
/// Parts held ahead of the reader at the most (one more is kept behind it for reads the
/// kernel sends slightly out of order): memory per reader stays near this × [`STREAM_PART`].
pub const MAX_PARTS_AHEAD: usize = 4;

/// Bytes of one GET of a random reader: the aligned span around the read. A page-cache
/// miss of a random reader is rarely alone: the kernel drops runs of neighbouring pages
/// (measured on Garage: 8,370 pages lost during a W6 run lay in 52 aligned MiB), and
/// each lost page came back with a GET of its own, 44 ms each on Garage whatever the
/// length. (Cached mode fetches whole 1 MiB cache blocks too.)
pub const RANDOM_PART: u64 = 1 << 20;
/// Random parts a handle keeps (the oldest goes first): their memory stays within
/// this × [`RANDOM_PART`] (twice that if every read crossed a boundary), a fraction of a
/// sequential reader's window.
pub const RANDOM_PARTS_KEPT: usize = 8;

/// One part's bytes, once its GET (and its crc64 check) is done; every read that needs
/// the part awaits the same fetch and answers with a slice of it.
pub type PartData = Shared<BoxFuture<'static, Result<Bytes, Arc<FsError>>>>;

/// One GET of `range` into one pooled buffer, and the crc64 of its bytes. The network's
/// chunks are copied and freed as they arrive, so a part in memory is its buffer alone,
/// and reads within it are answered with slices of it, not copies.
pub async fn fetch_part(backend: &Backend, key: &str, range: Range<u64>) -> FsResult<(Bytes, u64)> {
    let mut part = Buffer::take((range.end - range.start) as usize);
    let mut filled = 0usize;
    let crc = backend
        .stream_range(key, range, |chunk| {
            // The stream refuses bytes past the range, so every chunk has room.
            let room = part
                .get_mut(filled..filled + chunk.len())
                .ok_or_else(|| FsError::loud(libc::EIO, format!("{key}: long read")))?;
            room.copy_from_slice(chunk);
            filled += chunk.len();
            Ok(true)
        })
        .await?
        .ok_or_else(|| FsError::loud(libc::EIO, format!("{key}: read stopped")))?;
    Ok((Bytes::from(part), crc))
}

/// The bytes of a read from the slices of the parts it spans: the one slice itself when
/// it lies within one part (the common case), else a copy joining them.
pub fn join(pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.into_iter().next().unwrap_or_default();
    }
    let mut out = Buffer::take(pieces.iter().map(Bytes::len).sum());
    let mut filled = 0;
    for piece in &pieces {
        out[filled..filled + piece.len()].copy_from_slice(piece);
        filled += piece.len();
    }
    Bytes::from(out)
}

pub struct Part {
    pub range: Range<u64>,
    pub data: PartData,
}

/// A handle's parts: those of a sequential reader, contiguous, in object order; and the
/// last few of a random reader, each an aligned span, oldest first.
#[derive(Default)]
pub struct Window {
    parts: VecDeque<Part>,
    random: VecDeque<Part>,
}

impl Window {
    /// The parts holding `need`, after starting (with `start`) the parts missing for it and
    /// for `ahead` bytes past it, within `object_end`. A read outside the window (a seek)
    /// drops it; `ahead == 0` (a random reader) is answered by one random part.
    pub fn parts_for(
        &mut self,
        need: Range<u64>,
        ahead: u64,
        object_end: u64,
        mut start: impl FnMut(Range<u64>) -> PartData,
    ) -> Vec<(Range<u64>, PartData)> {
        self.forget_failed();
        self.forget_outside(need.start);
        if ahead == 0 {
            return vec![self.random_part(need, object_end, start)];
        }
        let want = need.end.saturating_add(ahead).min(object_end).max(need.end);
        let mut next = self.parts.back().map_or(need.start, |p| p.range.end);
        // Bounded: each pass adds a part of at least one byte, and at most
        // MAX_PARTS_AHEAD of them go past the bytes this read needs.
        while next < want {
            let end = (next + STREAM_PART).min(object_end);
            let needed = next < need.end;
            let whole = next + STREAM_PART <= want || end == object_end;
            if !needed && (!whole || self.ahead_of(need.end) >= MAX_PARTS_AHEAD) {
                break;
            }
            let range = next..end;
            self.parts.push_back(Part {
                data: start(range.clone()),
                range,
            });
            next = end;
        }
        self.parts
            .iter()
            .filter(|p| p.range.start < need.end && p.range.end > need.start)
            .map(|p| (p.range.clone(), p.data.clone()))
            .collect()
    }

    /// The part of a random read: a kept part that holds all of `need`, else a new one
    /// for the aligned [`RANDOM_PART`] span around it (or spans, for a read across a
    /// boundary), which is kept in place of the oldest.
    fn random_part(
        &mut self,
        need: Range<u64>,
        object_end: u64,
        start: impl FnOnce(Range<u64>) -> PartData,
    ) -> (Range<u64>, PartData) {
        let holds = |p: &&Part| p.range.start <= need.start && p.range.end >= need.end;
        if let Some(part) = self.parts.iter().chain(&self.random).find(holds) {
            return (part.range.clone(), part.data.clone());
        }
        let first = need.start - need.start % RANDOM_PART;
        let end = need
            .end
            .div_ceil(RANDOM_PART)
            .saturating_mul(RANDOM_PART)
            .min(object_end)
            .max(need.end);
        let range = first..end;
        let data = start(range.clone());
        if self.random.len() >= RANDOM_PARTS_KEPT {
            self.random.pop_front();
        }
        self.random.push_back(Part {
            range: range.clone(),
            data: data.clone(),
        });
        (range, data)
    }

    /// Drops the parts whose GET failed (and a sequential reader's parts after one, which
    /// must stay contiguous), so that a read after the bucket came back fetches them again
    /// instead of answering the old error.
    fn forget_failed(&mut self) {
        let failed = |p: &Part| matches!(p.data.peek(), Some(Err(_)));
        if let Some(first) = self.parts.iter().position(failed) {
            self.parts.truncate(first);
        }
        self.random.retain(|p| !failed(p));
    }

    /// Drops every part on a seek out of the window, else the parts more than one part
    /// behind `offset`.
    fn forget_outside(&mut self, offset: u64) {
        let inside = match (self.parts.front(), self.parts.back()) {
            (Some(first), Some(last)) => offset >= first.range.start && offset <= last.range.end,
            _ => false,
        };
        if !inside {
            self.parts.clear();
            return;
        }
        // Bounded: each pass removes a part.
        while self.parts.len() > 1 && self.parts[1].range.end <= offset {
            self.parts.pop_front();
        }
    }

    /// Parts that start at or past `offset`.
    fn ahead_of(&self, offset: u64) -> usize {
        self.parts.iter().filter(|p| p.range.end > offset).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn ready(_: Range<u64>) -> PartData {
        async { Ok(Bytes::new()) }.boxed().shared()
    }

    fn ranges(window: &Window) -> Vec<Range<u64>> {
        window.parts.iter().map(|p| p.range.clone()).collect()
    }

    #[test]
    fn sequential_reads_fetch_whole_parts_ahead_and_seeks_drop_them() {
        const MIB: u64 = 1 << 20;
        const PART: u64 = STREAM_PART;
        let mut window = Window::default();
        let got = window.parts_for(0..MIB, MIB, 100 * MIB, ready);
        assert_eq!(got.len(), 1);
        assert_eq!(ranges(&window), vec![0..PART]);
        window.parts_for(MIB..2 * MIB, 4 * PART, 100 * MIB, ready);
        assert_eq!(ranges(&window).last(), Some(&(3 * PART..4 * PART)));
        window.parts_for(2 * MIB..3 * MIB, 64 * MIB, 100 * MIB, ready);
        assert!(
            window.ahead_of(3 * MIB) <= MAX_PARTS_AHEAD,
            "{:?}",
            ranges(&window)
        );
        // A random read: its aligned span, the sequential window gone.
        let got = window.parts_for(50 * MIB + 8192..50 * MIB + 12288, 0, 100 * MIB, ready);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 50 * MIB..51 * MIB);
        assert!(ranges(&window).is_empty());
        // Near the end of the object, the last part is short.
        let mut window = Window::default();
        window.parts_for(98 * MIB..99 * MIB, 8 * MIB, 100 * MIB, ready);
        assert_eq!(ranges(&window), vec![98 * MIB..100 * MIB]);
    }

    #[test]
    fn random_reads_reuse_their_last_spans_and_fetch_a_new_one_only_when_none_holds_them() {
        const MIB: u64 = 1 << 20;
        let mut window = Window::default();
        let mut fetched = Vec::new();
        let mut read = |window: &mut Window, at: u64, len: u64, end: u64| {
            window.parts_for(at..at + len, 0, end, |r| {
                fetched.push(r);
                ready(0..0)
            })[0]
                .0
                .clone()
        };
        assert_eq!(
            read(&mut window, 3 * MIB + 4096, 4096, 100 * MIB),
            3 * MIB..4 * MIB
        );
        // Another page of the same span: no GET.
        assert_eq!(
            read(&mut window, 3 * MIB + 900_000, 4096, 100 * MIB),
            3 * MIB..4 * MIB
        );
        // A read across a boundary: both spans, one GET.
        assert_eq!(
            read(&mut window, 5 * MIB - 10, 20, 100 * MIB),
            4 * MIB..6 * MIB
        );
        // The object's end bounds the span.
        assert_eq!(
            read(&mut window, 99 * MIB + 5, 5, 99 * MIB + 100),
            99 * MIB..99 * MIB + 100
        );
        for k in 0..RANDOM_PARTS_KEPT as u64 {
            read(&mut window, (10 + k) * MIB, 4096, 100 * MIB);
        }
        // The oldest spans made room: the first is fetched again.
        assert_eq!(
            read(&mut window, 3 * MIB, 4096, 100 * MIB),
            3 * MIB..4 * MIB
        );
        assert_eq!(fetched.len(), 3 + RANDOM_PARTS_KEPT + 1, "{fetched:?}");
        assert_eq!(window.random.len(), RANDOM_PARTS_KEPT);
    }

    fn failing(_: Range<u64>) -> PartData {
        async { Err(Arc::new(FsError::new(libc::EIO, "bucket away"))) }
            .boxed()
            .shared()
    }

    #[test]
    fn parts_whose_get_failed_are_fetched_again_by_the_next_read() {
        const MIB: u64 = 1 << 20;
        // A random reader's span.
        let mut window = Window::default();
        let (_, data) = window.parts_for(MIB..MIB + 4096, 0, 10 * MIB, failing)[0].clone();
        assert!(matches!(data.now_or_never(), Some(Err(_))));
        let mut fetched = Vec::new();
        window.parts_for(MIB + 8192..MIB + 12288, 0, 10 * MIB, |r| {
            fetched.push(r);
            ready(0..0)
        });
        assert_eq!(
            fetched,
            vec![MIB..2 * MIB],
            "the failed span is fetched again"
        );
        assert_eq!(window.random.len(), 1);

        // A sequential reader's part, and the parts after it.
        let mut window = Window::default();
        let parts = window.parts_for(0..MIB, 2 * STREAM_PART, 100 * MIB, failing);
        assert!(matches!(parts[0].1.clone().now_or_never(), Some(Err(_))));
        let mut fetched = Vec::new();
        window.parts_for(MIB..2 * MIB, 2 * STREAM_PART, 100 * MIB, |r| {
            fetched.push(r);
            ready(0..0)
        });
        // The window starts again at the read.
        assert_eq!(
            fetched.first(),
            Some(&(MIB..MIB + STREAM_PART)),
            "{fetched:?}"
        );
        assert_eq!(ranges(&window).first(), Some(&(MIB..MIB + STREAM_PART)));
    }

    #[test]
    fn a_read_within_one_part_is_a_slice_of_it_and_one_across_parts_a_copy() {
        let part = Bytes::from(vec![1u8, 2, 3, 4, 5]);
        let within = join(vec![part.slice(1..4)]);
        assert_eq!(&within[..], &[2, 3, 4]);
        assert_eq!(within.as_ptr(), part[1..].as_ptr(), "no copy");
        let next = Bytes::from(vec![6u8, 7]);
        let across = join(vec![part.slice(3..), next.slice(..1)]);
        assert_eq!(&across[..], &[4, 5, 6]);
        assert!(join(Vec::new()).is_empty());
    }
}
