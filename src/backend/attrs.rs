//! The object metadata codec: POSIX attributes as user metadata, in the form s3fs and
//! ossfs write (`mode`, `uid`, `gid`, `mtime`), so buckets interoperate both ways.
//!
//! Reading also accepts the other common conventions: `file-permissions` (octal) with
//! `file-owner`/`file-group`, and rclone's RFC 3339 `mtime`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What kind of inode an object stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
        }
    }

    pub fn as_i64(self) -> i64 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
        }
    }

    pub fn from_i64(value: i64) -> Option<Kind> {
        match value {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// Metadata keys (without the `x-amz-meta-`/`x-oss-meta-` prefix the service adds).
pub mod keys {
    pub const MODE: &str = "mode";
    pub const UID: &str = "uid";
    pub const GID: &str = "gid";
    pub const MTIME: &str = "mtime";
    pub const CRC64: &str = "bucketgate-crc64";
    pub const ALT_PERMISSIONS: &str = "file-permissions";
    pub const ALT_OWNER: &str = "file-owner";
    pub const ALT_GROUP: &str = "file-group";
}

/// POSIX attributes of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectAttrs {
    pub kind: Kind,
    /// Permission bits only (0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

/// Attributes given to objects that carry none (written by other tools).
#[derive(Debug, Clone, Copy)]
pub struct AttrDefaults {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
}

impl ObjectAttrs {
    /// Encodes as s3fs-style user metadata.
    pub fn encode(&self, crc64: Option<u64>) -> HashMap<String, String> {
        let mut map = HashMap::new();
        map.insert(
            keys::MODE.to_string(),
            (self.kind.type_bits() | (self.perm & 0o7777)).to_string(),
        );
        map.insert(keys::UID.to_string(), self.uid.to_string());
        map.insert(keys::GID.to_string(), self.gid.to_string());
        map.insert(keys::MTIME.to_string(), format_mtime(self.mtime));
        if let Some(crc) = crc64 {
            map.extend(Self::crc64_entry(crc));
        }
        map
    }

    /// The metadata entry that carries an object's crc64.
    pub fn crc64_entry(crc: u64) -> [(String, String); 1] {
        [(keys::CRC64.to_string(), crc.to_string())]
    }

    /// Decodes user metadata. `key_is_dir` says the key ends in `/`; `last_modified`
    /// stands in for a missing mtime.
    pub fn decode(
        get: impl Fn(&str) -> Option<String>,
        key_is_dir: bool,
        last_modified: Option<SystemTime>,
        defaults: AttrDefaults,
    ) -> ObjectAttrs {
        let mode = get(keys::MODE).and_then(|v| v.trim().parse::<u32>().ok());
        let alt_perm =
            get(keys::ALT_PERMISSIONS).and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        let kind = if key_is_dir {
            Kind::Dir
        } else {
            match mode.map(|m| m & libc::S_IFMT) {
                Some(libc::S_IFLNK) => Kind::Symlink,
                Some(libc::S_IFDIR) => Kind::Dir,
                _ => Kind::File,
            }
        };
        let default_perm = match kind {
            Kind::Dir => 0o777 & !defaults.umask,
            Kind::File => 0o666 & !defaults.umask,
            Kind::Symlink => 0o777,
        };
        let perm = mode
            .or(alt_perm)
            .map(|m| m & 0o7777)
            .unwrap_or(default_perm);
        let parse_id = |primary: &str, alt: &str| {
            get(primary)
                .or_else(|| get(alt))
                .and_then(|v| v.trim().parse().ok())
        };
        ObjectAttrs {
            kind,
            perm,
            uid: parse_id(keys::UID, keys::ALT_OWNER).unwrap_or(defaults.uid),
            gid: parse_id(keys::GID, keys::ALT_GROUP).unwrap_or(defaults.gid),
            mtime: get(keys::MTIME)
                .and_then(|v| parse_mtime(&v))
                .or(last_modified)
                .unwrap_or(UNIX_EPOCH),
        }
    }
}

/// Reads the crc64 this gateway stored with an object, if any.
pub fn stored_crc64(get: impl Fn(&str) -> Option<String>) -> Option<u64> {
    get(keys::CRC64).and_then(|v| v.trim().parse().ok())
}

/// Epoch seconds, with nanoseconds after a dot when there are any.
pub fn format_mtime(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    if since.subsec_nanos() == 0 {
        since.as_secs().to_string()
    } else {
        format!("{}.{:09}", since.as_secs(), since.subsec_nanos())
    }
}

/// Epoch seconds (optionally fractional), or RFC 3339 as rclone writes it.
pub fn parse_mtime(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if let Some((secs, frac)) = text.split_once('.') {
        if let (Ok(secs), true) = (
            secs.parse::<u64>(),
            frac.chars().all(|c| c.is_ascii_digit()),
        ) {
            let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
            let nanos: u32 = digits.parse().ok()?;
            return Some(UNIX_EPOCH + Duration::new(secs, nanos));
        }
    } else if let Ok(secs) = text.parse::<u64>() {
        return Some(UNIX_EPOCH + Duration::from_secs(secs));
    }
    text.parse::<opendal::raw::Timestamp>()
        .ok()
        .map(SystemTime::from)
}

/// Mount defaults for the tests of this module and its neighbours.
#[cfg(test)]
pub(super) const TEST_DEFAULTS: AttrDefaults = AttrDefaults {
    uid: 7,
    gid: 8,
    umask: 0o022,
};

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: AttrDefaults = TEST_DEFAULTS;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn s3fs_metadata_round_trips() {
        let attrs = ObjectAttrs {
            kind: Kind::File,
            perm: 0o640,
            uid: 1000,
            gid: 100,
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
        };
        let map = attrs.encode(Some(42));
        assert_eq!(map["mode"], "33184");
        assert_eq!(map["mtime"], "1700000000.000000005");
        let decoded = ObjectAttrs::decode(|k| map.get(k).cloned(), false, None, DEFAULTS);
        assert_eq!(decoded, attrs);
        assert_eq!(stored_crc64(|k| map.get(k).cloned()), Some(42));
    }

    #[test]
    fn symlinks_are_recognised_by_mode() {
        let get = lookup(&[("mode", "41471")]);
        assert_eq!(
            ObjectAttrs::decode(get, false, None, DEFAULTS).kind,
            Kind::Symlink
        );
    }

    #[test]
    fn other_conventions_are_read() {
        let get = lookup(&[
            ("file-permissions", "0750"),
            ("file-owner", "33"),
            ("file-group", "44"),
            ("mtime", "2023-11-14T22:13:20Z"),
        ]);
        let attrs = ObjectAttrs::decode(get, false, None, DEFAULTS);
        assert_eq!((attrs.perm, attrs.uid, attrs.gid), (0o750, 33, 44));
        assert_eq!(attrs.mtime, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn objects_without_metadata_get_mount_defaults() {
        let modified = UNIX_EPOCH + Duration::from_secs(99);
        let file = ObjectAttrs::decode(|_| None, false, Some(modified), DEFAULTS);
        assert_eq!(
            (file.perm, file.uid, file.gid, file.mtime),
            (0o644, 7, 8, modified)
        );
        let dir = ObjectAttrs::decode(|_| None, true, None, DEFAULTS);
        assert_eq!((dir.kind, dir.perm), (Kind::Dir, 0o755));
    }
}
