//! Conflicts: another tool changed an object while this mount holds a local change to it
//! that is not in the bucket yet. The local version wins (it is what the user wrote here
//! last), and the remote version is kept: copied on the server to
//! `<key>.bucketgate-conflict-<unix seconds>` before the local upload replaces it, and
//! logged with both versions. Nothing is overwritten unseen.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, ObjectInfo, MAX_KEY_BYTES};
use crate::core::MAX_NAME_BYTES;
use crate::error::{FsError, FsResult};
use crate::meta::{Inode, MetaStore};

/// Whether `info` (a HEAD of the inode's key) is the version the inode records. The
/// version tag decides, except that an object carrying the crc64 and size this mount
/// recorded for it is ours whatever its tag says: the directory bucket's tag is size
/// plus mtime, which its writes do not always report as a later HEAD does, and taking
/// our own object for another tool's would make a false conflict copy.
pub fn same_version(inode: &Inode, info: &ObjectInfo) -> bool {
    let ours = info.crc64.is_some()
        && info.crc64 == inode.remote_crc64
        && inode.remote_size == Some(info.size);
    ours || match (&inode.remote_etag, &info.etag) {
        (Some(known), Some(now)) => known == now,
        _ => inode.remote_size == Some(info.size),
    }
}

/// Conflict keys tried for one conflict before giving up (same second, same key).
const MAX_CONFLICT_NAMES: u32 = 16;

/// The key the remote version of `key` is kept under: `<key>.bucketgate-conflict-<secs>`,
/// with `-N` added when that is taken. `None` when it would not be a storable key.
fn conflict_key(key: &str, secs: u64, attempt: u32) -> Option<String> {
    let suffix = match attempt {
        0 => format!(".bucketgate-conflict-{secs}"),
        n => format!(".bucketgate-conflict-{secs}-{n}"),
    };
    let candidate = format!("{key}{suffix}");
    let name_len = candidate.rsplit('/').next().map_or(0, str::len);
    (candidate.len() <= MAX_KEY_BYTES && name_len <= MAX_NAME_BYTES).then_some(candidate)
}

/// A free conflict key for `key`, or `None` when none can be formed.
async fn free_conflict_key(backend: &Backend, key: &str) -> FsResult<Option<String>> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for attempt in 0..MAX_CONFLICT_NAMES {
        let Some(candidate) = conflict_key(key, secs, attempt) else {
            return Ok(None);
        };
        let taken = backend
            .stat(&candidate)
            .await
            .map_err(|err| FsError::backend(&format!("HEAD {candidate}"), err))?;
        if taken.is_none() {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// The remote object at `key` (version `remote_etag`) differs from the version the local
/// change of inode `ino` was based on (`local_etag`): copies it to a conflict key, logs
/// the conflict, and records the remote version as seen, so it is preserved once and the
/// local upload may then replace it. Returns the conflict key, or `None` when the remote
/// version could only be reported (its conflict key would be too long).
pub async fn preserve_remote(
    backend: &Backend,
    meta: &MetaStore,
    ino: u64,
    key: &str,
    local_etag: Option<&str>,
    remote_etag: Option<&str>,
) -> FsResult<Option<String>> {
    let kept = match free_conflict_key(backend, key).await? {
        Some(target) => {
            // The copy's own version does not matter: nothing of the mount owns it. Its
            // size is another tool's, unknown here.
            backend
                .copy(key, &target, None)
                .await
                .map_err(|err| FsError::backend(&format!("copying {key} to {target}"), err))?;
            tracing::warn!(
                key,
                local_etag = local_etag.unwrap_or("-"),
                remote_etag = remote_etag.unwrap_or("-"),
                conflict_key = %target,
                "conflict: another tool changed this object while a local change was not uploaded yet; the local version wins, the remote version is kept under the conflict key"
            );
            Some(target)
        }
        None => {
            tracing::warn!(
                key,
                local_etag = local_etag.unwrap_or("-"),
                remote_etag = remote_etag.unwrap_or("-"),
                "conflict: another tool changed this object while a local change was not uploaded yet; the local version wins; no conflict key fits beside this key, so the remote version is only reported and will be replaced"
            );
            None
        }
    };
    meta.set_remote_etag(ino, remote_etag)?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_keys_sit_beside_the_key_and_fit() {
        assert_eq!(
            conflict_key("a/b.txt", 1700000000, 0).as_deref(),
            Some("a/b.txt.bucketgate-conflict-1700000000")
        );
        assert_eq!(
            conflict_key("b", 5, 2).as_deref(),
            Some("b.bucketgate-conflict-5-2")
        );
        let long = "x".repeat(250);
        assert_eq!(conflict_key(&long, 5, 0), None);
    }
}
