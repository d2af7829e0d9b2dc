//! crc64 integrity: the checksum uploads store with objects (CRC-64/XZ, the ECMA-182
//! polynomial OSS reports as `x-oss-hash-crc64ecma`), and the check of whole-object reads.

use crate::error::{FsError, FsResult};

/// The crc64 of `data` in one go.
pub fn crc64(data: &[u8]) -> u64 {
    let mut digest = crc64fast::Digest::new();
    digest.write(data);
    digest.sum64()
}

/// A running crc64 over bytes fed in order.
#[derive(Clone)]
pub struct Crc64 {
    digest: crc64fast::Digest,
    bytes: u64,
}

impl Default for Crc64 {
    fn default() -> Self {
        Crc64 {
            digest: crc64fast::Digest::new(),
            bytes: 0,
        }
    }
}

impl std::fmt::Debug for Crc64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crc64({:016x} over {} bytes)", self.value(), self.bytes)
    }
}

impl Crc64 {
    pub fn update(&mut self, data: &[u8]) {
        self.digest.write(data);
        self.bytes += data.len() as u64;
    }

    pub fn value(&self) -> u64 {
        self.digest.sum64()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The reflected ECMA-182 polynomial of CRC-64/XZ.
const POLY_REFLECTED: u64 = 0xc96c_5795_d787_0f42;

/// The crc64 of `a` followed by `b`, from the crc64 of each and the length of `b` (zlib's
/// `crc32_combine`, in 64 bits): parts fetched in parallel are checked as they land, and
/// their checksums joined in object order without keeping their bytes.
pub fn crc64_combine(crc_a: u64, crc_b: u64, len_b: u64) -> u64 {
    if len_b == 0 {
        return crc_a;
    }
    // The operator that appends one zero bit to a crc, squared into one zero byte.
    let mut op = [0u64; 64];
    op[0] = POLY_REFLECTED;
    for (n, row) in op.iter_mut().enumerate().skip(1) {
        *row = 1 << (n - 1);
    }
    for _ in 0..3 {
        op = gf2_square(&op);
    }
    // Appends `len_b` zero bytes: the operator for 2^k bytes for each bit k set.
    let (mut crc, mut len) = (crc_a, len_b);
    // Bounded: one pass per bit of `len_b` (at most 64).
    while len != 0 {
        if len & 1 != 0 {
            crc = gf2_times(&op, crc);
        }
        len >>= 1;
        if len != 0 {
            op = gf2_square(&op);
        }
    }
    crc ^ crc_b
}

fn gf2_times(mat: &[u64; 64], vec: u64) -> u64 {
    (0..64)
        .filter(|bit| vec >> bit & 1 != 0)
        .fold(0, |sum, bit| sum ^ mat[bit])
}

fn gf2_square(mat: &[u64; 64]) -> [u64; 64] {
    let mut square = [0u64; 64];
    for (row, &m) in square.iter_mut().zip(mat.iter()) {
        *row = gf2_times(mat, m);
    }
    square
}

/// Pieces checked ahead of the verified prefix that a verifier remembers; past this, more
/// are not judged (a random reader would otherwise grow the map without end).
const MAX_PENDING: usize = 4096;

/// A checksummed piece of the object past the verified prefix.
#[derive(Clone, Copy, Debug)]
struct Piece {
    len: u64,
    crc: u64,
}

/// Checks an object's bytes against its stored crc64 as reads fetch them. The verified
/// prefix grows as bytes continue it; bytes that land further on (parallel fetches, a
/// read-ahead that finished first) are kept as checksums only and joined to the prefix
/// once the gap before them fills, so a sequential read of the whole object (a restore, a
/// copy) is verified before its last bytes are handed out. Pieces that overlap the prefix
/// or each other are not judged: random reads leave the check incomplete rather than
/// guessing.
#[derive(Clone, Debug)]
pub struct ReadVerifier {
    key: String,
    expected: u64,
    size: u64,
    /// crc64 and length of the verified prefix.
    prefix_crc: u64,
    prefix_len: u64,
    /// Pieces past the prefix, by offset; adjacent ones are merged.
    pending: std::collections::BTreeMap<u64, Piece>,
    done: bool,
}

impl ReadVerifier {
    pub fn new(key: &str, expected: u64, size: u64) -> ReadVerifier {
        ReadVerifier {
            key: key.to_string(),
            expected,
            size,
            prefix_crc: crc64(&[]),
            prefix_len: 0,
            pending: std::collections::BTreeMap::new(),
            done: false,
        }
    }

    /// Feeds bytes read from the object at `offset`. Fails (EIO, logged with the key) when
    /// they complete the object and its crc64 differs from the stored one.
    pub fn feed(&mut self, offset: u64, data: &[u8]) -> FsResult<()> {
        let next = self.prefix_len;
        let end = (offset + data.len() as u64).min(self.size);
        if self.done || end <= next || offset >= end {
            return Ok(());
        }
        let from = offset.max(next);
        let bytes = &data[(from - offset) as usize..(end - offset) as usize];
        self.feed_hashed(from, bytes.len() as u64, crc64(bytes))
    }

    /// Feeds the crc64 `crc` of `len` bytes at `offset` (hashed by the caller, e.g. while
    /// streaming them to disk). A piece that starts inside the verified prefix cannot be
    /// cut to its new part and is not judged.
    pub fn feed_hashed(&mut self, offset: u64, len: u64, crc: u64) -> FsResult<()> {
        if self.done || len == 0 || offset < self.prefix_len || offset + len > self.size {
            return Ok(());
        }
        self.remember(offset, Piece { len, crc });
        // Bounded: each pass takes one piece out of the map.
        while let Some(entry) = self.pending.first_entry() {
            let start = *entry.key();
            if start > self.prefix_len {
                break;
            }
            let piece = entry.remove();
            if start == self.prefix_len {
                self.prefix_crc = crc64_combine(self.prefix_crc, piece.crc, piece.len);
                self.prefix_len += piece.len;
            }
        }
        if self.prefix_len < self.size {
            return Ok(());
        }
        self.done = true;
        if self.prefix_crc == self.expected {
            tracing::debug!(key = %self.key, "crc64 verified");
            return Ok(());
        }
        Err(mismatch(&self.key, self.expected, self.prefix_crc))
    }

    /// Adds a piece to the pending map, merged with the neighbours it touches; one that
    /// overlaps a piece already there is dropped.
    fn remember(&mut self, offset: u64, piece: Piece) {
        let end = offset + piece.len;
        let before = self.pending.range(..end).next_back().map(|(&s, &p)| (s, p));
        if let Some((start, prev)) = before {
            if start + prev.len > offset {
                return; // overlaps
            }
        }
        let (mut start, mut merged) = (offset, piece);
        if let Some((prev_start, prev)) = before.filter(|(s, p)| s + p.len == offset) {
            self.pending.remove(&prev_start);
            start = prev_start;
            merged = Piece {
                len: prev.len + piece.len,
                crc: crc64_combine(prev.crc, piece.crc, piece.len),
            };
        }
        if let Some(after) = self.pending.remove(&end) {
            merged = Piece {
                len: merged.len + after.len,
                crc: crc64_combine(merged.crc, after.crc, after.len),
            };
        }
        if self.pending.len() < MAX_PENDING || self.pending.contains_key(&start) {
            self.pending.insert(start, merged);
        }
    }
}

/// The error for an object whose bytes do not match its stored checksum.
pub fn mismatch(key: &str, expected: u64, actual: u64) -> FsError {
    FsError::loud(
        libc::EIO,
        format!(
            "{key}: crc64 mismatch (stored {expected:016x}, read {actual:016x}): the object was changed behind the gateway's back or corrupted; not serving it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_is_the_xz_ecma_variant() {
        // The CRC-64/XZ check value, which is what OSS's x-oss-hash-crc64ecma reports.
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn sequential_overlapping_reads_verify_and_gaps_do_not() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let good = crc64(&data);
        let mut verifier = ReadVerifier::new("k", good, data.len() as u64);
        verifier.feed(0, &data[..4000]).expect("first");
        verifier.feed(3000, &data[3000..8000]).expect("overlap");
        verifier.feed(8000, &data[8000..]).expect("last");

        let mut bad = data.clone();
        bad[9000] ^= 1;
        let mut verifier = ReadVerifier::new("k", good, data.len() as u64);
        verifier.feed(0, &bad[..5000]).expect("prefix is fine");
        let err = verifier.feed(5000, &bad[5000..]).expect_err("mismatch");
        assert_eq!(err.errno, libc::EIO);
        assert!(err.message.contains("crc64 mismatch"), "{}", err.message);

        let mut gap = ReadVerifier::new("k", 0, data.len() as u64);
        gap.feed(5000, &bad[5000..])
            .expect("a read that skips the prefix is not judged");
    }

    #[test]
    fn combined_checksums_match_the_checksum_of_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0, 1, 7, 4096, 65_537, 100_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(
                crc64_combine(crc64(a), crc64(b), b.len() as u64),
                crc64(&data),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn pieces_landing_out_of_order_are_verified_once_the_gap_fills() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
        let good = crc64(&data);
        let mut verifier = ReadVerifier::new("k", good, data.len() as u64);
        verifier.feed(6000, &data[6000..]).expect("last first");
        verifier.feed(3000, &data[3000..6000]).expect("middle");
        verifier.feed(0, &data[..3000]).expect("first completes it");
        assert!(verifier.done);

        let mut bad = data.clone();
        bad[7000] ^= 1;
        let mut verifier = ReadVerifier::new("k", good, data.len() as u64);
        verifier.feed(6000, &bad[6000..]).expect("not judged yet");
        verifier
            .feed(3000, &bad[3000..6000])
            .expect("not judged yet");
        let err = verifier.feed(0, &bad[..3000]).expect_err("mismatch");
        assert!(err.message.contains("crc64 mismatch"), "{}", err.message);

        let mut overlapping = ReadVerifier::new("k", good, data.len() as u64);
        overlapping.feed(5000, &data[5000..8000]).expect("ahead");
        overlapping
            .feed(4000, &data[4000..6000])
            .expect("overlap: dropped");
        overlapping.feed(0, &data[..5000]).expect("prefix");
        overlapping.feed(8000, &data[8000..]).expect("rest");
        assert!(
            overlapping.done,
            "the overlapping piece did not stop the check"
        );
    }
}
