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

/// Shared-writable mmap of a file just created and written, in every mode: the kernel
/// must allow it on handles it serves without the page cache (write-through writers,
/// cached-mode handles the daemon serves), and the mapped change must reach the bucket.
#[test]
fn mmap_writes_to_a_new_file_reach_the_bucket_in_every_mode() {
    use std::os::fd::AsRawFd;
    const LEN: usize = 8192;
    for mode in MODES {
        let bucket = temp_dir(&format!("bucket-mmap-{mode}"));
        let source = bucket.path().to_string_lossy().into_owned();
        let mount = Mount::start(&source, mode, &[], &[]);
        let mut expected = pattern(LEN, 7);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mount.path("mapped.bin"))
            .expect("create");
        std::io::Write::write_all(&mut &file, &expected).expect("write before mapping");
        // SAFETY: a fresh shared mapping of LEN bytes of an open file of LEN bytes, used
        // only within this block and unmapped before the file closes.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "{mode}: mmap: {}",
                std::io::Error::last_os_error()
            );
            let bytes = std::slice::from_raw_parts_mut(addr.cast::<u8>(), LEN);
            assert!(bytes == expected.as_slice(), "{mode}: mapped bytes differ");
            bytes[100..105].copy_from_slice(b"MAPPD");
            assert_eq!(libc::msync(addr, LEN, libc::MS_SYNC), 0, "{mode}: msync");
            assert_eq!(libc::munmap(addr, LEN), 0, "{mode}: munmap");
        }
        file.sync_all().expect("fsync");
        drop(file);
        expected[100..105].copy_from_slice(b"MAPPD");
        assert!(
            fs::read(mount.path("mapped.bin")).expect("read back") == expected,
            "{mode}: the mount shows the mapped change"
        );
        flush(&mount);
        assert!(
            fs::read(bucket.path().join("mapped.bin")).expect("object") == expected,
            "{mode}: the bucket holds the mapped change"
        );
        mount.unmount();
    }
}

/// Pages of `file` (of `len` bytes) in the kernel's page cache, by `mincore` of a read-only
/// mapping: mapping and asking fault nothing in.
fn resident_pages(file: &fs::File, len: usize) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: page_size is a constant query.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a fresh read-only shared mapping of an open file of `len` bytes, unmapped in
    // this block; `vec` has one byte per page of it, as mincore needs.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::mincore(addr, len, vec.as_mut_ptr()),
            0,
            "mincore: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::munmap(addr, len), 0, "munmap");
    }
    (vec.iter().filter(|b| **b & 1 == 1).count(), pages)
}

/// Write-through: a large file's first read streams past the kernel's page cache (a
/// restore reads it once), and the file is kept from its next open on (it is read again).
#[test]
fn write_through_streams_a_large_file_past_the_page_cache_until_it_is_read_again() {
    const LEN: usize = 64 << 20;
    let bucket = temp_dir("bucket-stream-once");
    let body = pattern(LEN, 11);
    fs::write(bucket.path().join("large.bin"), &body).expect("object");
    fs::write(bucket.path().join("small.bin"), &body[..1 << 20]).expect("small object");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start(&source, "write-through", &[], &[]);

    // Each check opens the file again and closes it before the next read, so the second
    // read keeps the page cache because the file was read before, not because it is shared.
    let resident_of = |name: &str, len: usize| {
        let file = fs::File::open(mount.path(name)).expect("open to map");
        resident_pages(&file, len)
    };
    assert!(fs::read(mount.path("large.bin")).expect("first read") == body);
    let (resident, pages) = resident_of("large.bin", LEN);
    assert_eq!(
        resident, 0,
        "the first read left {resident} of {pages} pages in the page cache"
    );

    assert!(fs::read(mount.path("large.bin")).expect("second read") == body);
    let (resident, pages) = resident_of("large.bin", LEN);
    assert!(
        resident > pages * 9 / 10,
        "the second read left only {resident} of {pages} pages in the page cache"
    );

    // A small file is kept from its first read.
    assert!(fs::read(mount.path("small.bin")).expect("small read") == body[..1 << 20]);
    let (resident, pages) = resident_of("small.bin", 1 << 20);
    assert!(
        resident > pages * 9 / 10,
        "a small file's read left only {resident} of {pages} pages in the page cache"
    );
    mount.unmount();
}

/// Write-through: the local copy a long stream keeps in case its writer seeks back (the
/// spool) leaves the page cache as the stream passes, and serves the seek back from disk.
#[test]
fn write_through_spool_leaves_the_page_cache_and_still_serves_a_seek_back() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    const LEN: usize = 48 << 20;
    let bucket = temp_dir("bucket-spool");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start(&source, "write-through", &[], &[]);
    let mut body = pattern(LEN, 5);
    let mut file = fs::File::create(mount.path("stream.bin")).expect("create");
    for chunk in body.chunks(1 << 20) {
        file.write_all(chunk).expect("stream");
    }
    let ino = file.metadata().expect("stat").ino();
    let spool =
        fs::File::open(mount.cache_dir.join("data").join(ino.to_string())).expect("spool file");
    let (resident, pages) = resident_pages(&spool, LEN);
    assert!(
        resident <= pages / 4,
        "the spool kept {resident} of {pages} pages in the page cache"
    );

    file.seek(SeekFrom::Start((1 << 20) + 3))
        .expect("seek back");
    file.write_all(b"SEEKBACK")
        .expect("write after seeking back");
    body[(1 << 20) + 3..(1 << 20) + 11].copy_from_slice(b"SEEKBACK");
    drop((file, spool));
    flush(&mount);
    assert!(
        fs::read(bucket.path().join("stream.bin")).expect("object") == body,
        "the object holds the streamed bytes and the change after the seek back"
    );
    mount.unmount();
}

/// Requests with no object form get the answers a local file's callers cope with, at once
/// and without a warning each: `isatty()` (which Python's `open()` asks of every file),
/// `fallocate` (and `posix_fallocate`'s fallback), `SEEK_DATA`/`SEEK_HOLE` and
/// `copy_file_range`.
#[test]
fn requests_without_an_object_form_answer_plainly_and_quietly() {
    use std::os::fd::AsRawFd;

    let bucket = temp_dir("bucket-no-object-form");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start(&source, "cached", &[], &[]);
    let body = pattern(300_000, 7);
    fs::write(mount.path("src.bin"), &body).expect("write");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.path("src.bin"))
        .expect("open");
    let fd = file.as_raw_fd();
    // SAFETY (each call below): plain syscalls on an open descriptor of ours.
    assert_eq!(unsafe { libc::isatty(fd) }, 0, "a file is not a terminal");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 1 << 20) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) }, 0);
    assert_eq!(
        unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) },
        body.len() as i64
    );

    let grown = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(mount.path("grown.bin"))
        .expect("create");
    assert_eq!(
        unsafe { libc::posix_fallocate(grown.as_raw_fd(), 0, 100_000) },
        0
    );
    assert_eq!(grown.metadata().expect("stat").len(), 100_000);

    let copy = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(mount.path("copy.bin"))
        .expect("create");
    let (mut off_in, mut off_out) = (0i64, 0i64);
    let copied = unsafe {
        libc::copy_file_range(
            fd,
            &mut off_in,
            copy.as_raw_fd(),
            &mut off_out,
            body.len(),
            0,
        )
    };
    assert_eq!(
        copied,
        body.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    drop((file, grown, copy));
    assert!(fs::read(mount.path("copy.bin")).expect("read copy") == body);

    let log = mount.log();
    assert!(!log.contains("Not Implemented"), "log noise:\n{log}");
    mount.unmount();
}

/// `cp -p` through the daemon (no passthrough): write, set the times on the descriptor,
/// close. The close must store those times, not the time of the writes; a write after
/// the utimens changes the mtime again.
#[test]
fn an_mtime_set_on_a_descriptor_the_daemon_serves_survives_the_close() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, UNIX_EPOCH};

    for mode in ["cached", "sync"] {
        let bucket = temp_dir(&format!("bucket-utimens-{mode}"));
        let source = bucket.path().to_string_lossy().into_owned();
        let mount = Mount::start(&source, mode, &["--passthrough", "off"], &[]);
        let when = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        let kept = fs::File::create(mount.path("kept")).expect("create");
        kept.write_all_at(b"preserved times", 0).expect("write");
        kept.set_modified(when).expect("futimens");
        drop(kept);
        let later = fs::File::create(mount.path("later")).expect("create");
        later.write_all_at(b"x", 0).expect("write");
        later.set_modified(when).expect("futimens");
        later.write_all_at(b"y", 1).expect("write after");
        drop(later);
        flush(&mount);
        assert_eq!(
            xattr(&bucket.path().join("kept"), "mtime").as_deref(),
            Some("1500000000"),
            "{mode}"
        );
        let later_mtime: f64 = xattr(&bucket.path().join("later"), "mtime")
            .expect("mtime of later")
            .parse()
            .expect("a number");
        assert!(later_mtime > 1_600_000_000.0, "{mode}: {later_mtime}");
        mount.unmount();
    }
}
