//! The POSIX workload every backend's mount test runs: each operation of the core
//! gateway once, then checks of the tree it leaves.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use super::Mount;

/// The three modes, as `--mode` spells them.
pub const MODES: [&str; 3] = ["cached", "sync", "write-through"];

/// `bucketgate flush MOUNTPOINT` must succeed.
pub fn flush(mount: &Mount) {
    let out = Command::new(env!("CARGO_BIN_EXE_bucketgate"))
        .arg("flush")
        .arg(&mount.mountpoint)
        .output()
        .expect("running bucketgate flush");
    assert!(
        out.status.success(),
        "flush failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mount.log()
    );
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Exercises every operation of the issue once.
pub fn exercise(mount: &Mount) {
    let p = |rel: &str| mount.path(rel);

    // create, write, read, O_EXCL
    fs::write(p("hello.txt"), b"hello world").expect("write hello");
    assert_eq!(
        fs::read(p("hello.txt")).expect("read hello"),
        b"hello world"
    );
    let excl = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p("hello.txt"));
    assert_eq!(
        excl.expect_err("O_EXCL on existing").kind(),
        ErrorKind::AlreadyExists
    );

    // O_APPEND
    let mut f = OpenOptions::new()
        .append(true)
        .open(p("hello.txt"))
        .expect("open append");
    f.write_all(b"!!").expect("append");
    drop(f);
    assert_eq!(fs::read(p("hello.txt")).expect("read"), b"hello world!!");

    // O_TRUNC then rewrite
    fs::write(p("hello.txt"), b"short").expect("truncate-write");
    assert_eq!(fs::read(p("hello.txt")).expect("read"), b"short");

    // backup software: write, truncate, reopen and append
    fs::write(p("backup.log"), b"generation one").expect("write log");
    OpenOptions::new()
        .write(true)
        .open(p("backup.log"))
        .expect("open log")
        .set_len(0)
        .expect("truncate log");
    for part in [b"v2;".as_slice(), b"v3;"] {
        OpenOptions::new()
            .append(true)
            .open(p("backup.log"))
            .expect("reopen append")
            .write_all(part)
            .expect("append");
    }
    assert_eq!(fs::read(p("backup.log")).expect("read log"), b"v2;v3;");

    // write at an offset in the middle of a multi-block file, then truncate down and up
    let big = pattern(3 << 20, 7);
    fs::write(p("big.bin"), &big).expect("write big");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("big.bin"))
        .expect("open big rw");
    f.seek(SeekFrom::Start(1_500_000)).expect("seek");
    f.write_all(b"MIDDLE").expect("write middle");
    f.sync_all().expect("fsync big");
    drop(f);
    let mut expected = big.clone();
    expected[1_500_000..1_500_006].copy_from_slice(b"MIDDLE");
    assert!(
        fs::read(p("big.bin")).expect("read big") == expected,
        "middle overwrite"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(p("big.bin"))
        .expect("open for truncate");
    f.set_len(2_000_000).expect("truncate down");
    f.set_len(2_100_000).expect("truncate up");
    drop(f);
    expected.truncate(2_000_000);
    expected.resize(2_100_000, 0);
    let got = fs::read(p("big.bin")).expect("read truncated");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "truncate down then up must leave zeros");

    // mkdir, rmdir, ENOTEMPTY
    fs::create_dir(p("dir")).expect("mkdir");
    fs::write(p("dir/inner.txt"), b"inner").expect("write inner");
    fs::create_dir(p("dir/sub")).expect("mkdir sub");
    fs::write(p("dir/sub/leaf.txt"), b"leaf").expect("write leaf");
    let err = fs::remove_dir(p("dir")).expect_err("rmdir non-empty");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::create_dir(p("gone")).expect("mkdir gone");
    fs::remove_dir(p("gone")).expect("rmdir empty");

    // rename of a file, of a non-empty directory, RENAME_NOREPLACE
    fs::write(p("old.txt"), b"renamed file").expect("write old");
    fs::rename(p("old.txt"), p("new.txt")).expect("rename file");
    assert!(!p("old.txt").exists());
    fs::rename(p("dir"), p("moved")).expect("rename dir");
    assert_eq!(
        fs::read(p("moved/sub/leaf.txt")).expect("read moved leaf"),
        b"leaf"
    );
    let noreplace = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &p("new.txt"),
        nix::fcntl::AT_FDCWD,
        &p("hello.txt"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(
        noreplace,
        Err(nix::errno::Errno::EEXIST),
        "RENAME_NOREPLACE must refuse"
    );
    fs::write(p("victim.txt"), b"to be replaced").expect("write victim");
    fs::rename(p("new.txt"), p("victim.txt")).expect("rename over existing");
    assert_eq!(
        fs::read(p("victim.txt")).expect("read replaced"),
        b"renamed file"
    );

    // symlink, readlink
    std::os::unix::fs::symlink("hello.txt", p("link")).expect("symlink");
    assert_eq!(
        fs::read_link(p("link")).expect("readlink"),
        Path::new("hello.txt")
    );
    assert_eq!(fs::read(p("link")).expect("read through link"), b"short");

    // chmod, chown, utimens
    fs::set_permissions(p("hello.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(p("hello.txt"), Some(1234), Some(4321)).expect("chown");
    let when = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let f = OpenOptions::new()
        .write(true)
        .open(p("hello.txt"))
        .expect("open for utimens");
    f.set_modified(when).expect("utimens");
    drop(f);
    let meta = fs::metadata(p("hello.txt")).expect("stat");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o640, 1234, 4321)
    );
    assert_eq!(meta.mtime(), 1_600_000_000);

    // unlink while open: still readable and writable until the last close
    fs::write(p("open.txt"), b"still here").expect("write open");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("open.txt"))
        .expect("open before unlink");
    fs::remove_file(p("open.txt")).expect("unlink open file");
    assert!(!p("open.txt").exists());
    let mut text = String::new();
    f.read_to_string(&mut text).expect("read after unlink");
    assert_eq!(text, "still here");
    f.write_all(b" and writable").expect("write after unlink");
    drop(f);

    // hard links are refused with a clear errno
    let err = fs::hard_link(p("hello.txt"), p("hard")).expect_err("hard link");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    // names over 255 bytes
    let long = "x".repeat(256);
    let err = fs::write(p(&long), b"x").expect_err("long name");
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));

    // statfs and readdir
    nix::sys::statvfs::statvfs(&mount.mountpoint).expect("statfs");
    let mut names: Vec<String> = fs::read_dir(&mount.mountpoint)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "backup.log",
            "big.bin",
            "hello.txt",
            "link",
            "moved",
            "victim.txt"
        ]
    );
}

/// The tree `exercise` leaves, as seen through any mount of the bucket.
pub fn check_tree(mount: &Mount) {
    let p = |rel: &str| mount.path(rel);
    assert_eq!(fs::read(p("hello.txt")).expect("hello"), b"short");
    assert_eq!(fs::read(p("backup.log")).expect("backup.log"), b"v2;v3;");
    let meta = fs::metadata(p("hello.txt")).expect("stat hello");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()),
        (0o640, 1234, 4321, 1_600_000_000)
    );
    assert_eq!(fs::metadata(p("big.bin")).expect("big").len(), 2_100_000);
    assert_eq!(fs::read(p("victim.txt")).expect("victim"), b"renamed file");
    assert_eq!(fs::read(p("moved/inner.txt")).expect("inner"), b"inner");
    assert_eq!(fs::read(p("moved/sub/leaf.txt")).expect("leaf"), b"leaf");
    assert_eq!(
        fs::read_link(p("link")).expect("link"),
        Path::new("hello.txt")
    );
    assert!(
        !p("dir").exists()
            && !p("old.txt").exists()
            && !p("new.txt").exists()
            && !p("open.txt").exists()
    );
}
