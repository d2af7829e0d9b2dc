//! POSIX behaviour through a real FUSE mount of the embedded local-directory bucket, in
//! every mode; results are checked in the bucket directory itself, and after a remount
//! with a fresh cache.

mod common;

use std::fs;
use std::path::Path;

use common::posix::{check_tree, exercise, flush, pattern, MODES};
use common::{temp_dir, xattr, Mount};

/// The bucket itself (the directory behind the mount) holds the objects and attributes.
fn check_bucket(bucket: &Path) {
    assert_eq!(
        fs::read(bucket.join("hello.txt")).expect("object hello"),
        b"short"
    );
    assert_eq!(
        xattr(&bucket.join("hello.txt"), "mode").as_deref(),
        Some("33184")
    );
    assert_eq!(
        xattr(&bucket.join("hello.txt"), "uid").as_deref(),
        Some("1234")
    );
    assert_eq!(
        xattr(&bucket.join("hello.txt"), "mtime").as_deref(),
        Some("1600000000")
    );
    assert_eq!(
        fs::read(bucket.join("moved/sub/leaf.txt")).expect("object leaf"),
        b"leaf"
    );
    assert!(
        !bucket.join("dir").exists(),
        "the renamed directory's old keys must be gone"
    );
    assert!(!bucket.join("old.txt").exists() && !bucket.join("open.txt").exists());
    assert_eq!(
        fs::read(bucket.join("link")).expect("symlink object"),
        b"hello.txt"
    );
    assert_eq!(
        xattr(&bucket.join("link"), "mode").map(|m| m.parse::<u32>().expect("mode") & libc::S_IFMT),
        Some(libc::S_IFLNK)
    );
    assert_eq!(
        fs::metadata(bucket.join("big.bin"))
            .expect("object big")
            .len(),
        2_100_000
    );
}

#[test]
fn every_operation_in_every_mode_survives_a_remount_with_a_fresh_cache() {
    for mode in MODES {
        let bucket = temp_dir(&format!("bucket-{mode}"));
        let source = bucket.path().to_string_lossy().into_owned();
        let mount = Mount::start(&source, mode, &["--upload-delay", "100ms"], &[]);
        exercise(&mount);
        flush(&mount);
        check_bucket(bucket.path());
        mount.unmount();

        let again = Mount::start(&source, mode, &[], &[]);
        check_tree(&again);
        again.unmount();
    }
}

#[test]
fn cached_mode_keeps_data_across_a_remount_on_the_same_cache() {
    let bucket = temp_dir("bucket-same-cache");
    let cache = temp_dir("cache-same");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start_with_cache(
        &source,
        "cached",
        cache.path(),
        &["--upload-delay", "10s"],
        &[],
    );
    let body = pattern(1 << 20, 3);
    fs::write(mount.path("f.bin"), &body).expect("write");
    // close() returned: the data is in the journal even though the quiet period has not
    // passed; umount flushes it.
    mount.unmount();
    assert!(fs::read(bucket.path().join("f.bin")).expect("uploaded at umount") == body);
    let again = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    assert!(fs::read(again.path("f.bin")).expect("read again") == body);
    again.unmount();
}
