//! The key layout: the one place where a path of the mount becomes an object key, and
//! where a key found in the bucket is read back as a path.
//!
//! - `plain`: key = the path (`a/b/c`, `a/b/` for a directory marker).
//! - `hashed:N`: key = the first N hex characters of the MD5 of the path (without a
//!   trailing slash), `/`, then the plain key, so sequential names spread over up to
//!   16^N partitions of the bucket's index.
//!
//! Keys are relative to the mount's prefix (the operator's root), so the hash is of the
//! path inside the mount, whatever the prefix.

use std::fmt;

use super::{Kind, MAX_KEY_BYTES, RESERVED_PREFIX};
use crate::error::{FsError, FsResult};

/// Where the layout a bucket was first used with is recorded.
pub const LAYOUT_MARKER_KEY: &str = ".bucketgate/layout";

/// Hash characters of `hashed` when none are given.
pub const DEFAULT_HASH_CHARS: u8 = 4;
/// Most hash characters `hashed:N` takes.
pub const MAX_HASH_CHARS: u8 = 8;

/// How paths map to object keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyLayout {
    /// Key = path: interoperable with every other tool, directories listed lazily.
    #[default]
    Plain,
    /// Key = `hash/path`; local metadata is authoritative.
    Hashed { chars: u8 },
}

impl KeyLayout {
    /// Parses `plain`, `hashed` or `hashed:N` (N in 1..=8).
    pub fn parse(text: &str) -> Result<KeyLayout, String> {
        let text = text.trim();
        let bad_n = |n: &str| {
            format!("`{text}`: the hash length `{n}` must be a number of hex characters from 1 to {MAX_HASH_CHARS}")
        };
        match text.split_once(':') {
            None if text == "plain" => Ok(KeyLayout::Plain),
            None if text == "hashed" => Ok(KeyLayout::Hashed {
                chars: DEFAULT_HASH_CHARS,
            }),
            Some(("hashed", n)) => {
                let chars: u8 = n.trim().parse().map_err(|_| bad_n(n))?;
                if !(1..=MAX_HASH_CHARS).contains(&chars) {
                    return Err(bad_n(n));
                }
                Ok(KeyLayout::Hashed { chars })
            }
            _ => Err(format!(
                "`{text}` is not a key layout; write plain, hashed or hashed:N (N from 1 to {MAX_HASH_CHARS})"
            )),
        }
    }

    /// Whether directories are discovered by delimiter listing on first use (plain) rather
    /// than known from local metadata (hashed, where a listing shows hash prefixes).
    pub fn lists_lazily(self) -> bool {
        self == KeyLayout::Plain
    }

    /// The object key of a path (names from the root); the root has the key `""`.
    pub fn key_for(self, names: &[Vec<u8>], kind: Kind) -> FsResult<String> {
        let mut path = String::new();
        for (i, name) in names.iter().enumerate() {
            let name = std::str::from_utf8(name)
                .map_err(|_| FsError::new(libc::EINVAL, "the bucket stores only UTF-8 names"))?;
            if i > 0 {
                path.push('/');
            }
            path.push_str(name);
        }
        let key = self.key_of_path(&path, kind);
        if key.len() > MAX_KEY_BYTES {
            return Err(FsError::loud(
                libc::ENAMETOOLONG,
                format!(
                    "key of {} bytes is over the bucket's {MAX_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        Ok(key)
    }

    /// The key of a `/`-separated path without leading or trailing slash.
    pub fn key_of_path(self, path: &str, kind: Kind) -> String {
        if path.is_empty() {
            return String::new(); // the root: no marker, in any layout
        }
        let slash = if kind == Kind::Dir { "/" } else { "" };
        match self {
            KeyLayout::Plain => format!("{path}{slash}"),
            KeyLayout::Hashed { chars } => {
                format!("{}/{path}{slash}", hash_prefix(path, chars))
            }
        }
    }

    /// The path of the mount a key stands for, and whether it is a directory marker;
    /// `None` for the reserved prefix, the root, and (hashed) keys whose prefix is not
    /// the hash of their path: objects some other tool put there, which the mount cannot
    /// address.
    pub fn path_of_key(self, key: &str) -> Option<(&str, bool)> {
        if key.starts_with(RESERVED_PREFIX) {
            return None;
        }
        let plain = match self {
            KeyLayout::Plain => key,
            KeyLayout::Hashed { chars } => {
                let (prefix, rest) = key.split_once('/')?;
                let path = rest.trim_end_matches('/');
                if path.is_empty() || prefix != hash_prefix(path, chars) {
                    return None;
                }
                rest
            }
        };
        let is_dir = plain.ends_with('/');
        let path = plain.trim_end_matches('/');
        (!path.is_empty()).then_some((path, is_dir))
    }
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyLayout::Plain => write!(f, "plain"),
            KeyLayout::Hashed { chars } => write!(f, "hashed:{chars}"),
        }
    }
}

/// The first `chars` hex characters of the MD5 of `path`.
fn hash_prefix(path: &str, chars: u8) -> String {
    let mut hex = crate::config::md5::compute_hex(path.as_bytes());
    hex.truncate(chars as usize);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(path: &str) -> Vec<Vec<u8>> {
        path.split('/').map(|n| n.as_bytes().to_vec()).collect()
    }

    #[test]
    fn plain_keys_follow_paths() {
        let plain = KeyLayout::Plain;
        assert_eq!(
            plain.key_for(&names("a/b"), Kind::File).expect("key"),
            "a/b"
        );
        assert_eq!(
            plain.key_for(&names("a/b"), Kind::Dir).expect("key"),
            "a/b/"
        );
        assert_eq!(plain.key_for(&[], Kind::Dir).expect("root"), "");
        let long = vec![vec![b'x'; 200]; 6];
        assert_eq!(
            plain
                .key_for(&long, Kind::File)
                .expect_err("too long")
                .errno,
            libc::ENAMETOOLONG
        );
        assert_eq!(plain.path_of_key("a/b/"), Some(("a/b", true)));
        assert_eq!(plain.path_of_key(".bucketgate/layout"), None);
    }

    #[test]
    fn hashed_keys_carry_the_md5_of_the_path() {
        let hashed = KeyLayout::Hashed { chars: 4 };
        let file = hashed.key_for(&names("a/b"), Kind::File).expect("key");
        let dir = hashed.key_for(&names("a/b"), Kind::Dir).expect("key");
        let expected = &md5_hex("a/b")[..4];
        assert_eq!(file, format!("{expected}/a/b"));
        assert_eq!(dir, format!("{expected}/a/b/"));
        assert_eq!(hashed.key_for(&[], Kind::Dir).expect("root"), "");
        assert_eq!(hashed.path_of_key(&file), Some(("a/b", false)));
        assert_eq!(hashed.path_of_key(&dir), Some(("a/b", true)));
        assert_eq!(hashed.path_of_key("0000/a/b"), None, "wrong hash");
        assert_eq!(hashed.path_of_key("a/b"), None);
        // The hash prefix counts toward the key limit.
        let near = vec![vec![b'x'; 1023 - 4]];
        assert!(KeyLayout::Plain.key_for(&near, Kind::File).is_ok());
        assert!(hashed.key_for(&near, Kind::File).is_err());
    }

    /// Independent of the code under test: the md-5 crate straight.
    fn md5_hex(text: &str) -> String {
        use md5::Digest;
        md5::Md5::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn layouts_parse_and_print() {
        assert_eq!(KeyLayout::parse("plain"), Ok(KeyLayout::Plain));
        assert_eq!(
            KeyLayout::parse("hashed"),
            Ok(KeyLayout::Hashed { chars: 4 })
        );
        assert_eq!(
            KeyLayout::parse("hashed:8"),
            Ok(KeyLayout::Hashed { chars: 8 })
        );
        for bad in ["hashed:0", "hashed:9", "hashed:x", "hash", "plain:2", ""] {
            assert!(KeyLayout::parse(bad).is_err(), "{bad}");
        }
        for layout in [KeyLayout::Plain, KeyLayout::Hashed { chars: 2 }] {
            assert_eq!(KeyLayout::parse(&layout.to_string()), Ok(layout));
        }
    }

    /// Sequential names (backup chunks) spread evenly over the first hash character.
    #[test]
    fn sequential_names_spread_over_the_first_hex_character() {
        let hashed = KeyLayout::Hashed { chars: 4 };
        let total = 100_000;
        let mut counts = [0u64; 16];
        for i in 1..=total {
            let key = hashed.key_of_path(&format!("backup-{i:06}.chunk"), Kind::File);
            let first = key.chars().next().and_then(|c| c.to_digit(16));
            counts[first.expect("hex first character") as usize] += 1;
        }
        let uniform = 1.0 / 16.0;
        let max_deviation = counts
            .iter()
            .map(|&c| ((c as f64 / total as f64) - uniform).abs() / uniform)
            .fold(0.0, f64::max);
        println!(
            "shares per first hex character: {counts:?}; max deviation from 1/16: {:.2}%",
            max_deviation * 100.0
        );
        assert!(max_deviation < 0.03, "{max_deviation}");
    }
}
