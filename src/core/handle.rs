//! Open file handles: access mode, the write-through stream, read-ahead state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::window::{PartData, Window};
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
    /// Where the furthest read so far ended (sequential detection).
    next_offset: u64,
    /// Current read-ahead, doubled while reads stay sequential.
    ahead: u64,
    /// Write-through reads: the parts fetched ahead.
    window: Window,
    /// Write-through reads: the object's crc64 check, and its verdict once it failed.
    verifier: Option<ReadVerifier>,
    corrupt: Option<String>,
}

/// The thread that opened a handle and its process (thread group), when known.
#[derive(Debug, Clone, Copy)]
pub struct Opener {
    pub thread: u32,
    pub process: Option<u32>,
}

impl Opener {
    pub fn of(pid: u32) -> Opener {
        Opener {
            thread: pid,
            process: process_of(pid),
        }
    }

    /// Whether `pid` (a thread, as FUSE reports callers) belongs to another process. The
    /// opening thread itself needs no look-up in /proc.
    pub fn is_other_process(&self, pid: u32) -> bool {
        pid != self.thread && self.process.is_some() && process_of(pid) != self.process
    }
}

pub struct Handle {
    pub ino: u64,
    pub mode: OpenMode,
    /// Write-through: opened empty (created or O_TRUNC), so sequential writes can stream.
    pub streamable: bool,
    /// Who opened the handle (write-through only, where a close by another process
    /// must not complete the stream).
    pub opener: Option<Opener>,
    pub io: tokio::sync::Mutex<HandleIo>,
    read: Mutex<ReadState>,
    /// The kernel does this handle's reads and writes on the cache file (passthrough).
    kernel_io: AtomicBool,
}

const FIRST_READ_AHEAD: u64 = 1 << 20;
/// How far a read may start from where the furthest one ended and still count as
/// sequential: the kernel sends a sequential reader's requests in parallel, and the tasks
/// serving them start in any order.
const SEQUENTIAL_SLACK: u64 = 4 << 20;

impl Handle {
    pub fn new(ino: u64, mode: OpenMode, streamable: bool, opener: Option<Opener>) -> Handle {
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
        let sequential = offset.abs_diff(state.next_offset) <= SEQUENTIAL_SLACK
            && (state.ahead > 0 || offset == state.next_offset);
        if sequential {
            state.ahead = (state.ahead * 2).clamp(FIRST_READ_AHEAD, max);
            state.next_offset = state.next_offset.max(offset + len);
        } else {
            state.ahead = 0;
            state.next_offset = offset + len;
        }
        state.ahead
    }

    /// Write-through: the parts holding `need`, starting the missing ones and those
    /// `ahead` bytes further (see [`Window::parts_for`]).
    pub fn window_parts(
        &self,
        need: std::ops::Range<u64>,
        ahead: u64,
        object_end: u64,
        start: impl FnMut(std::ops::Range<u64>) -> PartData,
    ) -> Vec<(std::ops::Range<u64>, PartData)> {
        self.read_state()
            .window
            .parts_for(need, ahead, object_end, start)
    }

    pub fn set_verifier(&self, verifier: Option<ReadVerifier>) {
        self.read_state().verifier = verifier;
    }

    /// Fails once the object failed its check: every later read of this handle fails.
    pub fn check_not_corrupt(&self) -> FsResult<()> {
        match &self.read_state().corrupt {
            Some(message) => Err(FsError::new(libc::EIO, message.clone())),
            None => Ok(()),
        }
    }

    /// Checks a part fetched for a write-through read (`crc` of `len` bytes at `offset`);
    /// parts may land in any order (see [`ReadVerifier::feed_hashed`]).
    pub fn verify_hashed(&self, offset: u64, len: u64, crc: u64) -> FsResult<()> {
        let mut state = self.read_state();
        if let Some(message) = &state.corrupt {
            return Err(FsError::new(libc::EIO, message.clone()));
        }
        let Some(verifier) = state.verifier.as_mut() else {
            return Ok(());
        };
        if let Err(err) = verifier.feed_hashed(offset, len, crc) {
            state.verifier = None;
            state.corrupt = Some(err.message.clone());
            return Err(err);
        }
        Ok(())
    }
}

/// The process (thread group id) a kernel-reported caller id belongs to: FUSE reports the
/// calling thread, and a writer's threads are one process.
fn process_of(pid: u32) -> Option<u32> {
    // Most files are opened by a process's main thread, whose id is the process's: one
    // cheap check instead of reading /proc, which was 4 % of the daemon's CPU at every
    // write-through create.
    if leads_a_process(pid) {
        return Some(pid);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether thread `tid` is its process's main thread: `pidfd_open` accepts only those
/// (without `PIDFD_THREAD`). False when it cannot tell (a kernel before 5.3, or the
/// thread is gone).
fn leads_a_process(tid: u32) -> bool {
    let Ok(tid) = libc::pid_t::try_from(tid) else {
        return false;
    };
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, 0) };
    let Ok(fd) = std::os::fd::RawFd::try_from(fd) else {
        return false;
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_thread() -> u32 {
        // SAFETY: gettid takes nothing and cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) as u32 }
    }

    #[test]
    fn a_thread_belongs_to_its_process_whether_or_not_it_leads_it() {
        let process = std::process::id();
        let (leader, worker) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let tid = this_thread();
                (tid, leads_a_process(tid), process_of(tid), Opener::of(tid))
            });
            let leader = (process, leads_a_process(process), process_of(process));
            (leader, worker.join().expect("worker thread"))
        });
        assert_eq!(leader, (process, true, Some(process)));
        let (tid, leads, of, opener) = worker;
        assert_ne!(tid, process);
        assert_eq!((leads, of), (false, Some(process)));
        // Opened by a thread that has ended since: its process is still known.
        assert_eq!(opener.process, Some(process));
        assert!(!opener.is_other_process(process));
        // pid 1 is another process (init), and leads it.
        assert!(opener.is_other_process(1));
    }
}
