//! bucketgate: mount an object-storage bucket as a POSIX filesystem through FUSE, with a
//! local disk cache. See README.md for the user's manual and DESIGN.md for the map.

pub mod backend;
pub mod buffers;
pub mod cache;
pub mod config;
pub mod core;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod integrity;
pub mod meta;
pub mod scrub;
pub mod sync;
