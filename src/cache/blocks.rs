//! Which blocks of a cached file hold valid bytes.

use std::ops::Range;

/// A growable bitset of block presence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    bits: Vec<u64>,
}

impl BlockSet {
    pub fn from_bytes(bytes: &[u8]) -> BlockSet {
        let bits = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect();
        BlockSet { bits }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn contains(&self, block: u64) -> bool {
        let (word, bit) = ((block / 64) as usize, block % 64);
        self.bits.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    pub fn insert(&mut self, block: u64) {
        let (word, bit) = ((block / 64) as usize, block % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << bit;
    }

    /// Forgets every block from `first` on.
    pub fn truncate_from(&mut self, first: u64) {
        let word = (first / 64) as usize;
        if word >= self.bits.len() {
            return;
        }
        let keep_bits = first % 64;
        self.bits[word] &= (1u64 << keep_bits).wrapping_sub(1);
        self.bits.truncate(word + 1);
    }

    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn clear(&mut self) {
        self.bits.clear();
    }

    /// The runs of blocks in `blocks` that are absent, merged.
    pub fn missing_runs(&self, blocks: Range<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for block in blocks {
            if self.contains(block) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == block => run.end = block + 1,
                _ => runs.push(block..block + 1),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_runs_and_truncation() {
        let mut set = BlockSet::default();
        for b in [0, 1, 5, 64, 65] {
            set.insert(b);
        }
        assert_eq!(set.missing_runs(0..8), vec![2..5, 6..8]);
        assert_eq!(set.count(), 5);
        let copy = BlockSet::from_bytes(&set.to_bytes());
        assert_eq!(copy, set);
        set.truncate_from(5);
        assert!(!set.contains(5) && !set.contains(64) && set.contains(1));
        assert_eq!(set.count(), 2);
    }
}
