//! Through real mounts of a bucket on a moto S3 server on 127.0.0.1, in every mode:
//! interoperability with s3fs-style metadata, multipart round trips with bounded memory,
//! and a remount with a fresh cache. Contents are checked with boto3, not the mount.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use common::{unique_name, vm_hwm_kib, Moto, Mount};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn s3_bucket_round_trips_in_every_mode() {
    let moto = Moto::start();
    for mode in ["cached", "sync", "write-through"] {
        let bucket = unique_name(&format!("bg-{mode}"));
        moto.create_bucket(&bucket);
        // An object written by s3fs: its attributes must show in the mount.
        moto.put_object(
            &bucket,
            "from-s3fs/report.txt",
            b"written by s3fs",
            &[
                ("mode", "33184"),
                ("uid", "1234"),
                ("gid", "99"),
                ("mtime", "1600000000"),
            ],
        );

        // And one written by a tool that sets no metadata: mount defaults apply.
        moto.put_object(&bucket, "plain.txt", b"no metadata", &[]);
        let mount = Mount::s3(
            &moto,
            &bucket,
            mode,
            &["--part-size", "5M", "--upload-delay", "100ms"],
        );
        let plain = fs::metadata(mount.path("plain.txt")).expect("stat plain object");
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(
            (plain.mode(), plain.uid(), plain.len()),
            (0o100644, me, 11),
            "{mode}: defaults for objects without metadata"
        );
        let meta = fs::metadata(mount.path("from-s3fs/report.txt")).expect("stat s3fs object");
        assert_eq!(
            (meta.mode(), meta.uid(), meta.gid(), meta.mtime()),
            (0o100640, 1234, 99, 1_600_000_000)
        );
        assert_eq!(
            fs::read(mount.path("from-s3fs/report.txt")).expect("read"),
            b"written by s3fs"
        );

        // A multi-part file, written in 1 MiB chunks.
        let big = pattern(24 << 20, 5);
        let mut f = fs::File::create(mount.path("big.bin")).expect("create big");
        for chunk in big.chunks(1 << 20) {
            f.write_all(chunk).expect("write chunk");
        }
        f.sync_all().expect("fsync big");
        drop(f);
        fs::create_dir(mount.path("docs")).expect("mkdir");
        fs::write(mount.path("docs/a.txt"), b"alpha").expect("write a");
        std::os::unix::fs::symlink("a.txt", mount.path("docs/link")).expect("symlink");
        let hwm_mib = vm_hwm_kib(mount.pid()) / 1024;
        assert!(
            hwm_mib < 160,
            "daemon peak RSS {hwm_mib} MiB while writing 24 MiB with 5 MiB parts"
        );
        mount.unmount();

        // The bucket holds the same bytes and s3fs-style metadata headers.
        assert!(
            moto.get_object(&bucket, "big.bin") == big,
            "{mode}: big.bin differs in the bucket"
        );
        let head = moto
            .head_object(&bucket, "big.bin")
            .expect("big.bin in bucket");
        assert_eq!(
            head.metadata.get("mode").map(String::as_str),
            Some("33188"),
            "{mode}"
        );
        assert!(head.metadata.contains_key("mtime") && head.metadata.contains_key("uid"));
        let uploaded_in_parts = moto
            .log()
            .lines()
            .any(|l| l.contains(&format!("/{bucket}/big.bin?")) && l.contains("partNumber="));
        assert!(
            uploaded_in_parts,
            "{mode}: a 24 MiB file with 5 MiB parts goes up as a multipart upload"
        );
        let marker = moto
            .head_object(&bucket, "docs/")
            .expect("directory marker");
        assert_eq!(
            marker.metadata.get("mode").map(String::as_str),
            Some("16877")
        );
        assert_eq!(moto.get_object(&bucket, "docs/link"), b"a.txt");
        assert_eq!(
            moto.list_multipart_uploads(&bucket),
            0,
            "{mode}: no abandoned multipart uploads"
        );

        // A fresh cache sees the same tree, contents and attributes.
        let again = Mount::s3(&moto, &bucket, mode, &[]);
        assert!(fs::read(again.path("big.bin")).expect("read big again") == big);
        assert_eq!(
            fs::read(again.path("docs/a.txt")).expect("read a again"),
            b"alpha"
        );
        assert_eq!(
            fs::read_link(again.path("docs/link"))
                .expect("readlink again")
                .to_string_lossy(),
            "a.txt"
        );
        let meta = fs::metadata(again.path("docs")).expect("stat docs");
        assert!(meta.is_dir() && meta.mode() & 0o7777 == 0o755);
        again.unmount();
    }
}

/// The bucket holds what `exercise` leaves, checked with boto3.
fn check_s3_bucket(moto: &Moto, bucket: &str, mode: &str) {
    assert_eq!(moto.get_object(bucket, "hello.txt"), b"short", "{mode}");
    let head = moto
        .head_object(bucket, "hello.txt")
        .expect("hello.txt in bucket");
    let meta = |k: &str| head.metadata.get(k).cloned();
    assert_eq!(
        (meta("mode"), meta("uid"), meta("gid"), meta("mtime")),
        (
            Some("33184".into()),
            Some("1234".into()),
            Some("4321".into()),
            Some("1600000000".into())
        ),
        "{mode}"
    );
    assert_eq!(
        moto.get_object(bucket, "moved/sub/leaf.txt"),
        b"leaf",
        "{mode}"
    );
    assert_eq!(
        moto.get_object(bucket, "victim.txt"),
        b"renamed file",
        "{mode}"
    );
    assert_eq!(moto.get_object(bucket, "link"), b"hello.txt", "{mode}");
    assert_eq!(
        moto.head_object(bucket, "big.bin").expect("big.bin").size,
        2_100_000,
        "{mode}"
    );
    let keys = moto.list_keys(bucket, "");
    for gone in [
        "dir/",
        "dir/inner.txt",
        "dir/sub/",
        "dir/sub/leaf.txt",
        "old.txt",
        "new.txt",
        "open.txt",
        "gone/",
    ] {
        assert!(
            !keys.iter().any(|k| k == gone),
            "{mode}: {gone} must not stay in the bucket: {keys:?}"
        );
    }
    assert_eq!(moto.list_multipart_uploads(bucket), 0, "{mode}");
}

#[test]
fn every_operation_in_every_mode_on_s3_and_listing_uses_readdirplus() {
    let moto = Moto::start();
    let env_owned: Vec<(String, String)> = Moto::env()
        .into_iter()
        .chain([(
            "BUCKETGATE_LOG".to_string(),
            "info,bucketgate::fs=trace".to_string(),
        )])
        .collect();
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let connect = moto.mount_args();
    for mode in common::posix::MODES {
        let bucket = unique_name(&format!("ops-{mode}"));
        moto.create_bucket(&bucket);
        let source = format!("s3://{bucket}");
        let mut args: Vec<&str> = connect.iter().map(String::as_str).collect();
        args.extend(["--part-size", "5M", "--upload-delay", "100ms"]);
        let mount = Mount::start(&source, mode, &args, &env);
        common::posix::exercise(&mount);
        common::posix::flush(&mount);
        check_s3_bucket(&moto, &bucket, mode);
        mount.unmount();

        let args: Vec<&str> = connect.iter().map(String::as_str).collect();
        let again = Mount::start(&source, mode, &args, &env);
        common::posix::check_tree(&again);
        let listed = fs::read_dir(again.path("moved"))
            .expect("list moved")
            .count();
        assert_eq!(listed, 2, "{mode}: moved/ holds inner.txt and sub");
        assert!(
            again
                .log()
                .lines()
                .any(|l| l.contains("readdirplus") && l.contains("request")),
            "{mode}: the kernel should list through readdirplus\n{}",
            again.log()
        );
        again.unmount();
    }
}

/// The ETag S3 gives a multipart object: MD5 of the parts' MD5s, then `-` and the count.
/// Whether `etag` proves the object holds `body`: either the multipart ETag of an upload in
/// `part_size` parts, or the plain MD5 it gets once its crc64 is stored in place (a copy
/// onto itself).
fn etag_matches(etag: &str, body: &[u8], part_size: usize) -> bool {
    use md5::Digest;
    let plain: String = md5::Md5::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    etag == multipart_etag(body, part_size) || etag == plain
}

fn multipart_etag(body: &[u8], part_size: usize) -> String {
    use md5::Digest;
    let parts: Vec<_> = body.chunks(part_size).map(md5::Md5::digest).collect();
    let mut all = md5::Md5::new();
    for digest in &parts {
        all.update(digest);
    }
    let hex: String = all.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{}", parts.len())
}

/// With each mode's default parts in flight (6 in write-through, 4 in cached).
#[test]
fn memory_stays_bounded_while_a_file_ten_times_the_bound_is_written() {
    const FILE: usize = 256 << 20;
    const PART: usize = 5 << 20;
    const BOUND_MIB: u64 = 96;
    let moto = Moto::start();
    let body = pattern(FILE, 11);
    let expected = multipart_etag(&body, PART);
    for mode in ["write-through", "cached"] {
        let bucket = unique_name(&format!("mem-{mode}"));
        moto.create_bucket(&bucket);
        let mount = Mount::s3(
            &moto,
            &bucket,
            mode,
            &["--part-size", "5M", "--upload-delay", "0ms"],
        );
        let mut f = fs::File::create(mount.path("backup.img")).expect("create");
        for chunk in body.chunks(1 << 20) {
            f.write_all(chunk).expect("write");
        }
        f.sync_all().expect("fsync");
        drop(f);
        common::posix::flush(&mount);
        let hwm_mib = vm_hwm_kib(mount.pid()) / 1024;
        mount.unmount();
        let head = moto
            .head_object(&bucket, "backup.img")
            .expect("object in bucket");
        assert_eq!(head.size, FILE as u64, "{mode}");
        assert!(
            etag_matches(&head.etag, &body, PART),
            "{mode}: the bytes in the bucket differ from what was written ({} vs {expected})",
            head.etag
        );
        eprintln!(
            "{mode}: peak RSS {hwm_mib} MiB for a {} MiB file",
            FILE >> 20
        );
        assert!(
            hwm_mib <= BOUND_MIB,
            "{mode}: peak RSS {hwm_mib} MiB over {BOUND_MIB} MiB"
        );
    }
}

/// Backup tools fork helpers while writing; each child closes its copy of the descriptor
/// at exec, which the kernel reports as a flush. That must neither publish part of the
/// file nor lose the bytes streamed so far.
#[test]
fn a_forked_child_closing_its_descriptor_does_not_cut_a_write_through_stream() {
    let moto = Moto::start();
    let bucket = unique_name("fork-close");
    moto.create_bucket(&bucket);
    let mount = Mount::s3(&moto, &bucket, "write-through", &["--part-size", "5M"]);
    let body = pattern(24 << 20, 17);
    let (first, second) = body.split_at(12 << 20);
    let mut f = fs::File::create(mount.path("stream.bin")).expect("create");
    f.write_all(first).expect("first half");
    let status = std::process::Command::new("true")
        .status()
        .expect("fork and exec a child");
    assert!(status.success());
    assert!(
        moto.head_object(&bucket, "stream.bin").is_none(),
        "a child's close must not complete the object half-written"
    );
    f.write_all(second).expect("second half");
    // fsync completes the object, and the file stays writable afterwards.
    f.sync_all().expect("fsync");
    let head = moto
        .head_object(&bucket, "stream.bin")
        .expect("complete after fsync");
    assert_eq!(head.size, body.len() as u64);
    assert!(
        etag_matches(&head.etag, &body, 5 << 20),
        "the object must hold every byte, in order ({})",
        head.etag
    );
    f.write_all(b"appended after fsync")
        .expect("write after fsync");
    drop(f);
    let mut expected = body.clone();
    expected.extend_from_slice(b"appended after fsync");
    assert!(
        moto.get_object(&bucket, "stream.bin") == expected,
        "the close after fsync stores the appended bytes"
    );
    mount.unmount();
}

/// A directory rename moves every object under the new prefix and removes every old key,
/// in both modes; the old keys go in batch requests (DeleteObjects), not one request each.
#[test]
fn a_directory_rename_moves_every_object_and_deletes_the_old_keys_in_batches() {
    const FILES: usize = 60;
    let moto = Moto::start();
    for mode in ["cached", "write-through"] {
        let bucket = unique_name(&format!("bg-mv-{mode}"));
        moto.create_bucket(&bucket);
        let mount = Mount::s3(&moto, &bucket, mode, &["--upload-delay", "100ms"]);
        fs::create_dir(mount.path("old")).expect("mkdir old");
        for i in 0..FILES {
            fs::write(mount.path(format!("old/f{i:03}")), pattern(100, i as u8)).expect("write");
        }
        // Every file is in the bucket before the rename, so the move is copy + delete.
        flush(&mount);
        let deletes_before = batch_deletes(&moto.log(), &bucket);
        let old_heads = format!("HEAD /{bucket}/old/");
        let heads_before = requests_logged(&moto.log(), &old_heads);
        fs::rename(mount.path("old"), mount.path("new")).expect("rename the directory");
        if mode == "cached" {
            flush(&mount);
        }
        // Write-through: the bucket agrees when rename returns.
        let moved = moto.list_keys(&bucket, "new/");
        let left = moto.list_keys(&bucket, "old");
        assert_eq!(moved.len(), FILES + 1, "{mode}: keys under new/: {moved:?}");
        assert!(left.is_empty(), "{mode}: old keys left behind: {left:?}");
        for i in [0, FILES / 2, FILES - 1] {
            assert_eq!(
                moto.get_object(&bucket, &format!("new/f{i:03}")),
                pattern(100, i as u8),
                "{mode}: new/f{i:03}"
            );
        }
        let batches = batch_deletes(&moto.log(), &bucket) - deletes_before;
        assert!(
            (1..FILES / 4).contains(&batches),
            "{mode}: {FILES} old keys went in {batches} DeleteObjects requests"
        );
        // The store knows each object's size: a copy needs no HEAD of its source.
        let heads = requests_logged(&moto.log(), &old_heads) - heads_before;
        assert_eq!(heads, 0, "{mode}: the move sent {heads} HEADs of old keys");
        mount.unmount();
    }
}

fn flush(mount: &Mount) {
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = common::bucketgate(&["flush", &mnt], std::time::Duration::from_secs(120));
    assert!(flushed.status.success(), "{flushed:?}");
}

/// DeleteObjects requests (`POST /bucket/?delete`) in moto's log.
fn batch_deletes(log: &str, bucket: &str) -> usize {
    requests_logged(log, &format!("POST /{bucket}/?delete"))
}

/// Requests in moto's log that start with `request` (method and path).
fn requests_logged(log: &str, request: &str) -> usize {
    let quoted = format!("\"{request}");
    log.lines().filter(|l| l.contains(&quoted)).count()
}

/// A fresh mount's first `ls -l` of a directory the gateway wrote takes the files'
/// attributes from the directory's index, not from one HEAD each; a file another tool
/// replaced, retagged in place or added since gets its HEAD and shows what it is now.
#[test]
fn a_fresh_mount_lists_a_directory_from_its_attribute_index() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, UNIX_EPOCH};
    const FILES: usize = 40;
    let moto = Moto::start();
    let bucket = unique_name("bg-index");
    moto.create_bucket(&bucket);
    let mount = Mount::s3(&moto, &bucket, "cached", &["--upload-delay", "100ms"]);
    fs::create_dir(mount.path("docs")).expect("mkdir");
    for i in 0..FILES {
        fs::write(
            mount.path(format!("docs/f{i:03}")),
            pattern(100 + i, i as u8),
        )
        .expect("write");
    }
    fs::set_permissions(mount.path("docs/f001"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let long_ago = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    fs::File::options()
        .write(true)
        .open(mount.path("docs/f002"))
        .and_then(|f| f.set_modified(long_ago))
        .expect("set mtime");
    mount.unmount();
    let indexes = moto.attr_index_keys(&bucket);
    assert_eq!(indexes.len(), 1, "one index, of docs/: {indexes:?}");

    // Another tool, a second later (the bucket dates objects to the second): new bytes
    // in f003, new metadata on the same bytes in f004 (same ETag), and a new file.
    std::thread::sleep(Duration::from_millis(1100));
    moto.put_object(&bucket, "docs/f003", b"replaced", &[("mode", "33216")]);
    moto.put_object(
        &bucket,
        "docs/f004",
        &pattern(104, 4),
        &[("mode", "33184"), ("uid", "1234")],
    );
    moto.put_object(&bucket, "docs/new", b"new", &[("mode", "33261")]);

    let file_heads = format!("HEAD /{bucket}/docs/f");
    let new_heads = format!("HEAD /{bucket}/docs/new");
    let index_heads = format!("HEAD /{bucket}/{}", indexes[0]);
    let index_gets = format!("GET /{bucket}/{}", indexes[0]);
    let before = (
        requests_logged(&moto.log(), &file_heads),
        requests_logged(&moto.log(), &new_heads),
    );
    let index_before = (
        requests_logged(&moto.log(), &index_heads),
        requests_logged(&moto.log(), &index_gets),
    );
    let mount = Mount::s3(&moto, &bucket, "cached", &[]);
    let listed: Vec<(String, fs::Metadata)> = fs::read_dir(mount.path("docs"))
        .expect("readdir")
        .map(|entry| {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(entry.path()).expect("stat");
            (name, meta)
        })
        .collect();
    assert_eq!(listed.len(), FILES + 1);
    let heads = (
        requests_logged(&moto.log(), &file_heads) - before.0,
        requests_logged(&moto.log(), &new_heads) - before.1,
    );
    assert_eq!(
        heads,
        (2, 1),
        "HEADs of (unchanged and changed files, the new one)"
    );
    // The index's write time comes with its GET: one request, no HEAD.
    assert_eq!(
        (
            requests_logged(&moto.log(), &index_heads) - index_before.0,
            requests_logged(&moto.log(), &index_gets) - index_before.1,
        ),
        (0, 1),
        "(HEADs, GETs) of the index"
    );
    let attrs = |name: &str| {
        let (_, meta) = listed
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} listed"));
        (meta.mode(), meta.uid(), meta.len(), meta.mtime())
    };
    let me = nix::unistd::getuid().as_raw();
    assert_eq!(attrs("f001").0, 0o100600, "chmod before the index");
    assert_eq!(attrs("f002").3, 1_500_000_000, "mtime before the index");
    let (mode, uid, size, _) = attrs("f000");
    assert_eq!(
        (mode, uid, size),
        (0o100644, me, 100),
        "stored with defaults"
    );
    assert_eq!(attrs("f003").0, 0o100700, "replaced: its own metadata");
    assert_eq!(attrs("f003").2, 8);
    assert_eq!(
        (attrs("f004").0, attrs("f004").1),
        (0o100640, 1234),
        "retagged"
    );
    assert_eq!((attrs("new").0, attrs("new").2), (0o100755, 3), "added");
    // The crc64 the index carried checks the bytes read.
    assert_eq!(
        fs::read(mount.path("docs/f001")).expect("read"),
        pattern(101, 1)
    );

    // A rename takes the index along: the old one goes, the new directory gets its own.
    fs::rename(mount.path("docs"), mount.path("archive")).expect("rename");
    mount.unmount();
    let after_rename = moto.attr_index_keys(&bucket);
    assert_eq!(after_rename.len(), 1, "{after_rename:?}");
    assert_ne!(after_rename, indexes, "the index of archive/, not of docs/");

    // Off: a directory written then gets no index, and the listing sends its HEADs.
    let mount = Mount::s3(&moto, &bucket, "cached", &["--attr-index", "off"]);
    fs::create_dir(mount.path("plain")).expect("mkdir");
    fs::write(mount.path("plain/one"), b"1").expect("write");
    let archive_heads = format!("HEAD /{bucket}/archive/");
    let before = requests_logged(&moto.log(), &archive_heads);
    let mut count = 0;
    for entry in fs::read_dir(mount.path("archive")).expect("readdir") {
        fs::symlink_metadata(entry.expect("entry").path()).expect("stat");
        count += 1;
    }
    assert_eq!(count, FILES + 1);
    let heads = requests_logged(&moto.log(), &archive_heads) - before;
    assert!(
        heads > FILES,
        "with the index off every file gets a HEAD ({heads})"
    );
    mount.unmount();
    assert_eq!(moto.attr_index_keys(&bucket), after_rename);
}
