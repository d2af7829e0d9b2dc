//! The control socket: `status`, `flush`, `verify`, `refresh` and `umount` talk to a running daemon through a
//! Unix socket named after its mount point.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Status,
    Flush,
    Unmount,
    /// Scrub objects under `path` against their crc64; answered by progress lines, then
    /// the final response.
    Verify {
        path: String,
    },
    /// Check `path` (and every directory known below it) against the bucket now.
    Refresh {
        path: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// Set on the intermediate lines of a long command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
}

impl Response {
    /// The final line of a command that ends with a report (or fails with an error).
    pub fn of_report<T: Serialize>(result: Result<T, String>) -> Response {
        match result {
            Ok(report) => Response {
                ok: true,
                status: serde_json::to_value(report).ok(),
                ..Default::default()
            },
            Err(error) => Response::failed(error),
        }
    }

    /// A command that failed, with what to tell the user.
    pub fn failed(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

fn runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/bucketgate");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("bucketgate"),
        None => PathBuf::from(format!("/tmp/bucketgate-{}", nix::unistd::geteuid())),
    }
}

/// The socket of the daemon serving `mountpoint`.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canonical = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let digest = crate::config::md5::compute_hex(canonical.to_string_lossy().as_bytes());
    runtime_dir().join(format!("{}.sock", &digest[..16]))
}

/// Sends one command and reads the answer; `timeout` bounds the wait for a reply.
pub fn request(mountpoint: &Path, command: Command, timeout: Duration) -> anyhow::Result<Response> {
    request_with_progress(mountpoint, command, timeout, |_| {})
}

/// Like [`request`], handing each progress line to `progress` until the final answer.
pub fn request_with_progress(
    mountpoint: &Path,
    command: Command,
    timeout: Duration,
    mut progress: impl FnMut(&serde_json::Value),
) -> anyhow::Result<Response> {
    let path = socket_path(mountpoint);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no bucketgate daemon answers for {} (socket {})",
            mountpoint.display(),
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .context("setting socket timeout")?;
    let mut line = serde_json::to_string(&command).context("encoding command")?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending command to the daemon")?;
    let mut reader = BufReader::new(stream);
    // Bounded: each line is either progress or the answer; the daemon ends the stream.
    loop {
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .context("reading the daemon's answer")?;
        if answer.is_empty() {
            bail!("the daemon closed the connection without answering");
        }
        let response: Response =
            serde_json::from_str(&answer).context("decoding the daemon's answer")?;
        match &response.progress {
            Some(line) => progress(line),
            None => return Ok(response),
        }
    }
}
