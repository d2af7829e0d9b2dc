//! `bucketgate verify`: reads objects back and checks them against the crc64 stored with
//! them, reporting progress and a final tally.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Kind};
use crate::integrity::Crc64;

/// Objects read in parallel.
const PARALLEL: usize = 4;
/// Bytes per ranged read: memory stays flat whatever the object size.
const CHUNK: u64 = 8 << 20;

/// The tally of a scrub; also its progress while it runs.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Objects found under the prefix (regular files).
    pub total: u64,
    pub checked: u64,
    pub ok: u64,
    /// Keys whose bytes do not match their stored crc64.
    pub mismatched: Vec<String>,
    pub without_checksum: u64,
    /// Keys that could not be read, with the reason.
    pub errors: Vec<String>,
    pub bytes: u64,
}

impl ScrubReport {
    pub fn clean(&self) -> bool {
        self.mismatched.is_empty() && self.errors.is_empty()
    }
}

enum Verdict {
    Ok(u64),
    Mismatch(u64),
    NoChecksum,
    Skipped,
    Error(String),
}

/// Checks every object under `path` (a key, or a directory's path; `""` for all).
/// `progress` is called after each object.
pub async fn scrub(
    backend: &Backend,
    path: &str,
    mut progress: impl FnMut(&ScrubReport),
) -> anyhow::Result<ScrubReport> {
    let keys = keys_under(backend, path).await?;
    let mut report = ScrubReport {
        total: keys.len() as u64,
        ..Default::default()
    };
    let mut verdicts = futures::stream::iter(keys)
        .map(|key| async move {
            let verdict = check_object(backend, &key).await;
            (key, verdict)
        })
        .buffer_unordered(PARALLEL);
    while let Some((key, verdict)) = verdicts.next().await {
        match verdict {
            Verdict::Ok(bytes) => {
                report.ok += 1;
                report.bytes += bytes;
            }
            Verdict::Mismatch(bytes) => {
                tracing::error!(key = %key, "crc64 mismatch: the object's bytes differ from its stored checksum");
                report.mismatched.push(key);
                report.bytes += bytes;
            }
            Verdict::NoChecksum => report.without_checksum += 1,
            Verdict::Skipped => {
                report.total -= 1;
                continue;
            }
            Verdict::Error(message) => report.errors.push(format!("{key}: {message}")),
        }
        report.checked += 1;
        progress(&report);
    }
    Ok(report)
}

async fn keys_under(backend: &Backend, path: &str) -> anyhow::Result<Vec<String>> {
    let path = path.trim_matches('/');
    if path.is_empty() {
        return Ok(backend.list_objects("").await?);
    }
    if !backend.layout().lists_lazily() {
        return hashed_keys_under(backend, path).await;
    }
    let keys = backend.list_objects(&format!("{path}/")).await?;
    if !keys.is_empty() {
        return Ok(keys);
    }
    if backend.stat(path).await?.is_some() {
        return Ok(vec![path.to_string()]);
    }
    anyhow::bail!("nothing in the bucket at `{path}`")
}

/// In `hashed` a path's objects are spread over the hash prefixes: list everything and
/// keep the keys whose path is `path` or below it.
async fn hashed_keys_under(backend: &Backend, path: &str) -> anyhow::Result<Vec<String>> {
    let layout = backend.layout();
    let below = format!("{path}/");
    let keys: Vec<String> = backend
        .list_objects("")
        .await?
        .into_iter()
        .filter(|key| {
            layout
                .path_of_key(key)
                .is_some_and(|(p, _)| p == path || p.starts_with(&below))
        })
        .collect();
    if keys.is_empty() {
        anyhow::bail!("nothing in the bucket at `{path}`");
    }
    Ok(keys)
}

async fn check_object(backend: &Backend, key: &str) -> Verdict {
    let info = match backend.stat(key).await {
        Ok(Some(info)) => info,
        Ok(None) => return Verdict::Error("vanished while scrubbing".to_string()),
        Err(err) => return Verdict::Error(err.to_string()),
    };
    if info.attrs.kind != Kind::File {
        return Verdict::Skipped;
    }
    let Some(expected) = info.crc64 else {
        return Verdict::NoChecksum;
    };
    let mut crc = Crc64::default();
    let mut offset = 0;
    // Bounded by the object size.
    while offset < info.size {
        let end = (offset + CHUNK).min(info.size);
        match backend.read_range(key, offset..end).await {
            Ok(data) => {
                let data = data.to_bytes();
                if data.is_empty() {
                    return Verdict::Error(format!("object ended at {offset} of {}", info.size));
                }
                crc.update(&data);
                offset += data.len() as u64;
            }
            Err(err) => return Verdict::Error(err.to_string()),
        }
    }
    if crc.value() == expected {
        Verdict::Ok(info.size)
    } else {
        Verdict::Mismatch(info.size)
    }
}
