//! The core's error type: every error knows the errno the kernel should see.

use std::fmt;

/// How loudly an error deserves to be logged when it reaches the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Expected outcomes (ENOENT on lookup, EEXIST on O_EXCL).
    Debug,
    /// Something the user should hear about (failed upload, unreadable object).
    Error,
}

/// An error from a filesystem operation, with the errno it maps to.
#[derive(Debug, Clone)]
pub struct FsError {
    pub errno: i32,
    pub message: String,
    pub level: Level,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
            level: Level::Debug,
        }
    }

    /// An error worth logging at error level (I/O against the bucket or the cache).
    pub fn loud(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
            level: Level::Error,
        }
    }

    pub fn not_found() -> Self {
        Self::new(libc::ENOENT, "no such file or directory")
    }

    pub fn io(context: &str, err: std::io::Error) -> Self {
        let errno = match err.raw_os_error() {
            Some(libc::ENOSPC) => libc::ENOSPC,
            Some(libc::EDQUOT) => libc::ENOSPC,
            _ => libc::EIO,
        };
        Self::loud(errno, format!("{context}: {err}"))
    }

    pub fn meta(err: rusqlite::Error) -> Self {
        let full = matches!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
        let errno = if full { libc::ENOSPC } else { libc::EIO };
        Self::loud(errno, format!("metadata store: {err}"))
    }

    pub fn backend(context: &str, err: opendal::Error) -> Self {
        let errno = match err.kind() {
            opendal::ErrorKind::NotFound => libc::ENOENT,
            opendal::ErrorKind::PermissionDenied => libc::EACCES,
            _ => libc::EIO,
        };
        Self::loud(errno, format!("{context}: {err}"))
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for FsError {}

impl From<rusqlite::Error> for FsError {
    fn from(err: rusqlite::Error) -> Self {
        Self::meta(err)
    }
}
