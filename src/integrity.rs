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

/// Checks an object's bytes against its stored crc64 as reads fetch them. Bytes count
/// only when they continue the prefix checked so far, so a sequential read of the whole
/// object (a restore, a copy) is verified before its last bytes are handed out; random
/// reads leave the check incomplete rather than guessing.
#[derive(Clone, Debug)]
pub struct ReadVerifier {
    key: String,
    expected: u64,
    size: u64,
    running: Crc64,
    done: bool,
}

impl ReadVerifier {
    pub fn new(key: &str, expected: u64, size: u64) -> ReadVerifier {
        ReadVerifier {
            key: key.to_string(),
            expected,
            size,
            running: Crc64::default(),
            done: false,
        }
    }

    /// Feeds bytes read from the object at `offset`. Fails (EIO, logged with the key) when
    /// they complete the object and its crc64 differs from the stored one.
    pub fn feed(&mut self, offset: u64, data: &[u8]) -> FsResult<()> {
        let next = self.running.bytes();
        let end = offset + data.len() as u64;
        if self.done || offset > next || end <= next {
            return Ok(());
        }
        let fresh = &data[(next - offset) as usize..];
        let room = (self.size - next).min(fresh.len() as u64) as usize;
        self.running.update(&fresh[..room]);
        if self.running.bytes() < self.size {
            return Ok(());
        }
        self.done = true;
        let actual = self.running.value();
        if actual == self.expected {
            tracing::debug!(key = %self.key, "crc64 verified");
            return Ok(());
        }
        Err(mismatch(&self.key, self.expected, actual))
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
}
