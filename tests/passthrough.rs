//! FUSE passthrough on real mounts of the directory bucket: a file whose bytes are all in
//! the cache is read and written by the kernel itself, and everything the kernel writes
//! unseen still reaches the bucket: sizes, in-place overwrites, truncation, the mtime a
//! copy tool sets on the open descriptor, and data fsync'd before a SIGKILL.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, UNIX_EPOCH};

use common::{bucketgate, temp_dir, xattr, Mount};

fn served(mount: &Mount) -> u64 {
    mount.status_json()["passthrough_handles"]
        .as_u64()
        .expect("passthrough_handles")
}

fn flush(mount: &Mount) {
    let mnt = mount.mountpoint.to_str().expect("utf-8");
    let out = bucketgate(&["flush", mnt], Duration::from_secs(120));
    assert!(out.status.success(), "flush: {out:?}");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn kernel_writes_reads_and_truncation_reach_the_bucket() {
    let bucket = temp_dir("pt-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(&source, "cached", &["--upload-delay", "0ms"], &[]);
    assert_eq!(mount.status_json()["passthrough"], true, "{}", mount.log());
    let path = mount.path("big.bin");
    let mut expected = pattern(3 << 20, 7);
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    assert_eq!(
        served(&mount),
        1,
        "a new file is complete: the kernel serves it"
    );
    file.write_all_at(&expected, 0).expect("write");
    assert_eq!(
        fs::metadata(&path).expect("stat while open").len(),
        expected.len() as u64,
        "the size of unseen kernel writes shows while the file is open"
    );
    file.write_all_at(b"OVERWRITTEN", 1000).expect("overwrite");
    expected[1000..1011].copy_from_slice(b"OVERWRITTEN");
    file.set_len(2 << 20).expect("ftruncate");
    expected.truncate(2 << 20);
    file.write_all_at(b"tail", (2 << 20) + 10)
        .expect("write past the end");
    expected.resize((2 << 20) + 10, 0);
    expected.extend_from_slice(b"tail");
    file.sync_all().expect("fsync");
    drop(file);
    assert_eq!(fs::read(&path).expect("read back"), expected);
    flush(&mount);
    assert_eq!(
        fs::read(bucket.path().join("big.bin")).expect("object"),
        expected
    );
    // A second writer of the now clean file: unseen writes make it changed again.
    let again = OpenOptions::new().write(true).open(&path).expect("reopen");
    again.write_all_at(b"SECOND", 0).expect("second write");
    expected[..6].copy_from_slice(b"SECOND");
    drop(again);
    flush(&mount);
    assert_eq!(
        fs::read(bucket.path().join("big.bin")).expect("object"),
        expected
    );
    assert!(served(&mount) >= 3, "reads and writes were the kernel's");
    mount.unmount();
    let fresh = Mount::start(&source, "cached", &[], &[]);
    assert_eq!(
        fs::read(fresh.path("big.bin")).expect("fresh read"),
        expected
    );
    fresh.unmount();
}

#[test]
fn an_mtime_set_on_the_open_descriptor_is_kept() {
    let bucket = temp_dir("pt-mtime");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(&source, "cached", &["--upload-delay", "0ms"], &[]);
    let path = mount.path("copied");
    let when = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    // What `cp -p` does: write, set the times on the descriptor, then close.
    let file = fs::File::create(&path).expect("create");
    file.write_all_at(b"preserved times", 0).expect("write");
    file.set_modified(when).expect("futimens");
    drop(file);
    // And a descriptor opened for writing but never written leaves the mtime alone.
    drop(OpenOptions::new().write(true).open(&path).expect("reopen"));
    let mtime = fs::metadata(&path)
        .expect("stat")
        .modified()
        .expect("mtime");
    assert_eq!(mtime, when, "mtime after close");
    flush(&mount);
    assert_eq!(
        xattr(&bucket.path().join("copied"), "mtime").as_deref(),
        Some("1500000000")
    );
    assert!(served(&mount) >= 2);
    mount.unmount();
}

#[test]
fn an_incomplete_file_goes_through_the_daemon_and_off_means_never() {
    let bucket = temp_dir("pt-partial");
    let data = pattern(4 << 20, 3);
    fs::write(bucket.path().join("outside"), &data).expect("object from another tool");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(&source, "cached", &[], &[]);
    let path = mount.path("outside");
    let mut head = [0u8; 4096];
    let partial = fs::File::open(&path).expect("open cold");
    partial.read_exact_at(&mut head, 0).expect("read cold");
    assert_eq!(&head[..], &data[..4096]);
    assert_eq!(
        served(&mount),
        0,
        "nothing of it was cached: the daemon serves it"
    );
    // Another handle while the daemon's is open: the daemon's too (the kernel would
    // refuse a mix), even once the bytes are all there.
    assert_eq!(fs::read(&path).expect("read all"), data);
    assert_eq!(served(&mount), 0);
    drop(partial);
    assert_eq!(fs::read(&path).expect("read warm"), data);
    assert_eq!(
        served(&mount),
        1,
        "complete and no daemon handle: the kernel's"
    );
    mount.unmount();

    let off = Mount::start(&source, "cached", &["--passthrough", "off"], &[]);
    assert_eq!(fs::read(off.path("outside")).expect("read"), data);
    fs::write(off.path("new"), b"daemon only").expect("write");
    assert_eq!(fs::read(off.path("new")).expect("read new"), b"daemon only");
    assert_eq!(off.status_json()["passthrough"], false);
    assert_eq!(served(&off), 0);
    off.unmount();
    assert_eq!(
        fs::read(bucket.path().join("new")).expect("object"),
        b"daemon only"
    );
}

#[test]
fn kernel_writes_fsynced_before_a_sigkill_reach_the_bucket() {
    let bucket = temp_dir("pt-crash");
    let cache = temp_dir("pt-crash-cache");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mut mount = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    fs::write(mount.path("kept"), pattern(1 << 20, 1)).expect("first version");
    flush(&mount);
    // Overwritten in place by the kernel, fsync'd, and the daemon dies with it open.
    let file = OpenOptions::new()
        .write(true)
        .open(mount.path("kept"))
        .expect("open");
    let second = pattern(1 << 20, 2);
    file.write_all_at(&second, 0).expect("overwrite");
    file.sync_all().expect("fsync");
    assert!(served(&mount) >= 1);
    mount.kill_daemon();
    drop(file);
    mount.crash();
    let again = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    assert_eq!(
        fs::read(again.path("kept")).expect("read after crash"),
        second
    );
    flush(&again);
    assert_eq!(
        fs::read(bucket.path().join("kept")).expect("object"),
        second,
        "acknowledged kernel writes were uploaded after the crash"
    );
    again.unmount();
}

#[test]
fn after_a_sigkill_the_bucket_gets_what_the_cache_shows() {
    let bucket = temp_dir("pt-diverge");
    let cache = temp_dir("pt-diverge-cache");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mut mount = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    fs::write(mount.path("doc"), pattern(300_000, 1)).expect("first version");
    flush(&mount);
    // Overwritten by the kernel, never fsync'd or closed before the daemon dies: either
    // version may survive, but the cache and the bucket must not disagree afterwards.
    let file = OpenOptions::new()
        .write(true)
        .open(mount.path("doc"))
        .expect("open");
    file.write_all_at(&pattern(300_000, 2), 0)
        .expect("overwrite");
    mount.kill_daemon();
    drop(file);
    mount.crash();
    let again = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    let shown = fs::read(again.path("doc")).expect("read after crash");
    flush(&again);
    assert_eq!(
        fs::read(bucket.path().join("doc")).expect("object"),
        shown,
        "the bucket has what the mount shows"
    );
    again.unmount();
}
