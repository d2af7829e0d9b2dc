//! Open directories: one listing per handle, taken when its reader starts at offset 0.
//! The kernel pages through a directory one buffer (about 25 entries with attributes) at
//! a time; without a listing kept per handle, every page rebuilt the whole directory, and
//! an `ls -l` of 2,000 entries read 80 × 2,000 rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::DirEntry;

/// What one open directory handle lists.
pub struct Listing {
    /// Whether `entries` carry attributes (readdirplus).
    pub with_attrs: bool,
    pub entries: Vec<DirEntry>,
}

#[derive(Default)]
pub(super) struct Listings {
    by_handle: Mutex<HashMap<u64, Option<Arc<Listing>>>>,
}

impl Listings {
    pub(super) fn open(&self, fh: u64) {
        self.lock().insert(fh, None);
    }

    /// The listing a reader continuing at `offset` pages through, if the handle has a
    /// suitable one: a reader starting over (offset 0) gets a fresh listing, as POSIX's
    /// rewinddir asks.
    pub(super) fn kept(&self, fh: u64, offset: u64, with_attrs: bool) -> Option<Arc<Listing>> {
        if offset == 0 {
            return None;
        }
        let listing = self.lock().get(&fh)?.clone()?;
        (listing.with_attrs || !with_attrs).then_some(listing)
    }

    /// Keeps `listing` for the handle's next pages (not for a handle already released).
    pub(super) fn keep(&self, fh: u64, listing: Arc<Listing>) {
        if let Some(slot) = self.lock().get_mut(&fh) {
            *slot = Some(listing);
        }
    }

    pub(super) fn release(&self, fh: u64) {
        self.lock().remove(&fh);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Option<Arc<Listing>>>> {
        self.by_handle.lock().unwrap_or_else(|p| p.into_inner())
    }
}
