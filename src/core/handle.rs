//! Open file handles: access mode, the write-through stream, read-ahead state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::OpenMode;
use crate::error::{FsError, FsResult};
use crate::integrity::ReadVerifier;
use crate::sync::upload::StreamUpload;

/// State a handle's I/O owns; one writer at a time.
#[derive(Default)]
pub struct HandleIo {
    /// Write-through: the object being streamed while writes stay sequential.
    pub stream: Option<StreamUpload>,
    /// Write-through: writes go to the cache file and upload at close.
    pub staged: bool,
    /// Write-through: this handle counted itself as a user of the cache file.
    pub holds_cache_file: bool,
}

#[derive(Default)]
struct ReadState {
    /// Where the previous read ended (sequential detection).
    next_offset: u64,
    /// Current read-ahead, doubled while reads stay sequential.
    ahead: u64,
    /// Write-through reads: bytes fetched ahead, and where they start.
    window_start: u64,
    window: Bytes,
    /// Write-through reads: the object's crc64 check, and its verdict once it failed.
    verifier: Option<ReadVerifier>,
    corrupt: Option<String>,
}

pub struct Handle {
    pub ino: u64,
    pub mode: OpenMode,
    /// Write-through: opened empty (created or O_TRUNC), so sequential writes can stream.
    pub streamable: bool,
    /// The process (thread group) that opened the handle, when known.
    pub opener: Option<u32>,
    pub io: tokio::sync::Mutex<HandleIo>,
    read: Mutex<ReadState>,
    /// The kernel does this handle's reads and writes on the cache file (passthrough).
    kernel_io: AtomicBool,
}

const FIRST_READ_AHEAD: u64 = 1 << 20;

impl Handle {
    pub fn new(ino: u64, mode: OpenMode, streamable: bool, opener: Option<u32>) -> Handle {
        Handle {
            ino,
            mode,
            streamable,
            opener,
            io: tokio::sync::Mutex::new(HandleIo::default()),
            read: Mutex::new(ReadState::default()),
            kernel_io: AtomicBool::new(false),
        }
    }

    /// Whether the kernel serves this handle itself (FUSE passthrough).
    pub fn kernel_io(&self) -> bool {
        self.kernel_io.load(Ordering::Relaxed)
    }

    pub fn set_kernel_io(&self, kernel: bool) {
        self.kernel_io.store(kernel, Ordering::Relaxed);
    }

    fn read_state(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read-ahead for a read at `offset`: grows while the reader is sequential, drops to
    /// nothing on a seek.
    pub fn read_ahead(&self, offset: u64, len: u64, max: u64) -> u64 {
        let mut state = self.read_state();
        let sequential = offset == state.next_offset;
        state.ahead = if sequential {
            (state.ahead * 2).clamp(FIRST_READ_AHEAD, max)
        } else {
            0
        };
        state.next_offset = offset + len;
        state.ahead
    }

    /// Serves `offset..end` from the fetched window if it holds all of it.
    pub fn window_read(&self, offset: u64, end: u64) -> Option<Vec<u8>> {
        let state = self.read_state();
        let window_end = state.window_start + state.window.len() as u64;
        if offset >= state.window_start && end <= window_end {
            let from = (offset - state.window_start) as usize;
            let to = (end - state.window_start) as usize;
            return Some(state.window[from..to].to_vec());
        }
        None
    }

    pub fn set_verifier(&self, verifier: Option<ReadVerifier>) {
        self.read_state().verifier = verifier;
    }

    /// Checks bytes fetched for a write-through read; once the object failed its check,
    /// every read of this handle fails.
    pub fn verify(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let mut state = self.read_state();
        if let Some(message) = &state.corrupt {
            return Err(FsError::new(libc::EIO, message.clone()));
        }
        let Some(verifier) = state.verifier.as_mut() else {
            return Ok(());
        };
        if let Err(err) = verifier.feed(offset, data) {
            state.verifier = None;
            state.corrupt = Some(err.message.clone());
            return Err(err);
        }
        Ok(())
    }

    pub fn set_window(&self, start: u64, data: Bytes) {
        let mut state = self.read_state();
        state.window_start = start;
        state.window = data;
    }
}

/// The process (thread group id) a kernel-reported caller id belongs to: FUSE reports the
/// calling thread, and a writer's threads are one process.
pub fn process_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}
