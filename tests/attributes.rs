//! Attributes through a real mount, against moto behind the request-recording proxy: new
//! objects get a content type by extension, a chmod or utimens of a stored file replaces its object's metadata in place
//! (no data moves), a time set on an open write-through file reaches the bucket with the
//! object, and an object that cannot take the change in place gets it with an upload.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fault::{FaultRule, FaultStats, ProxiedBucket};
use common::posix::{flush, pattern};
use common::Mount;

/// A time with a fraction of a second, as `cp -p` and rsync set them.
fn long_ago() -> SystemTime {
    UNIX_EPOCH + Duration::new(1_500_000_000, 250_000_000)
}

/// `long_ago()` as the objects' `mtime` metadata spells it.
const LONG_AGO_METADATA: &str = "1500000000.250000000";

/// utimensat on a path, as rsync and `touch -d` set times (no descriptor open).
fn set_mtime_of_path(path: &Path, when: SystemTime) {
    let since = when.duration_since(UNIX_EPOCH).expect("after the epoch");
    let spec = libc::timespec {
        tv_sec: since.as_secs() as libc::time_t,
        tv_nsec: since.subsec_nanos() as libc::c_long,
    };
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: a valid C string and two timespecs that outlive the call.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), [spec, spec].as_ptr(), 0) };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// The requests the proxy saw for keys containing `name`: (method, copy source, body bytes).
fn requests_for(stats: &FaultStats, name: &str) -> Vec<(String, Option<String>, u64)> {
    stats
        .recent
        .iter()
        .filter(|r| r.target.as_deref().is_some_and(|t| t.contains(name)))
        .map(|r| {
            (
                r.method.clone().unwrap_or_default(),
                r.copy_source.clone(),
                r.body_bytes,
            )
        })
        .collect()
}

/// Uploads of data among `requests`: PUTs that are not copies, and multipart starts.
fn data_uploads(requests: &[(String, Option<String>, u64)]) -> usize {
    requests
        .iter()
        .filter(|(method, copy, _)| (method == "PUT" && copy.is_none()) || method == "POST")
        .count()
}

/// `what` made no request that moves the file's bytes: no upload, no GET.
fn assert_no_data_moved(requests: &[(String, Option<String>, u64)], what: &str, mount: &Mount) {
    assert_eq!(
        data_uploads(requests),
        0,
        "{what} uploaded data: {requests:?}\n{}",
        mount.log()
    );
    assert!(
        requests.iter().all(|(method, _, _)| method != "GET"),
        "{what} read the object: {requests:?}"
    );
}

/// `name` carries the time `long_ago()` and mode 0640, in its object's metadata and as
/// `mount` shows it.
fn assert_long_ago_and_0640(bucket: &ProxiedBucket, mount: &Mount, name: &str) {
    let head = bucket
        .moto
        .head_object(&bucket.bucket, name)
        .expect("stored");
    assert_eq!(
        (
            head.metadata.get("mtime").map(String::as_str),
            head.metadata.get("mode").map(String::as_str)
        ),
        (Some(LONG_AGO_METADATA), Some("33184")),
        "{name}: {head:?}\n{}",
        mount.log()
    );
    let meta = fs::metadata(mount.path(name)).expect("stat");
    assert_eq!(
        meta.modified().expect("mtime"),
        long_ago(),
        "{name}: mtime on the mount"
    );
    assert_eq!(meta.mode() & 0o7777, 0o640, "{name}: mode on the mount");
}

fn copies(requests: &[(String, Option<String>, u64)]) -> usize {
    requests
        .iter()
        .filter(|(method, copy, _)| method == "PUT" && copy.is_some())
        .count()
}

/// New objects get a `Content-Type` by their name's extension, as s3fs and rclone set it
/// (a bucket served over HTTP needs it), whether they go up in one PUT or in parts; a name
/// without a known extension gets the server's default. A chmod afterwards keeps it.
#[test]
fn new_files_get_a_content_type_by_their_extension() {
    let bucket = ProxiedBucket::start("attrs-content-type");
    let files = [
        ("index.html", 2_000, Some("text/html")),
        ("data.json", 7 << 20, Some("application/json")), // two parts of 5 MiB
        ("notes", 100, None),
    ];
    for mode in ["cached", "write-through"] {
        let mount = bucket.mount(
            mode,
            None,
            &["--upload-delay", "100ms", "--part-size", "5M"],
        );
        for (name, size, _) in files {
            fs::write(mount.path(format!("{mode}-{name}")), pattern(size, 3)).expect("write");
        }
        flush(&mount);
        fs::set_permissions(
            mount.path(format!("{mode}-index.html")),
            fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        flush(&mount);
        for (name, size, expected) in files {
            let key = format!("{mode}-{name}");
            let head = bucket
                .moto
                .head_object(&bucket.bucket, &key)
                .expect("the object is there");
            assert_eq!(head.size, size as u64, "{key}: {head:?}");
            match expected {
                Some(content_type) => assert_eq!(
                    head.content_type.as_deref(),
                    Some(content_type),
                    "{key}: {head:?}\n{}",
                    mount.log()
                ),
                // The server's default for an object stored without one.
                None => assert_eq!(
                    head.content_type.as_deref(),
                    Some("binary/octet-stream"),
                    "{key}: {head:?}"
                ),
            }
        }
        mount.unmount();
    }
}

/// rsync writes `.index.html.Xy12Ab`, then renames it: the object at the final name gets
/// the final name's content type, by a server-side copy that keeps the metadata (no data
/// moves through the mount). A rename between names of one type is a plain copy, and a
/// symlink gets no type from its name.
#[test]
fn a_rename_to_a_name_of_another_type_sets_its_content_type() {
    let bucket = ProxiedBucket::start("attrs-retype");
    let body = pattern(300_000, 5);
    for mode in ["write-through", "cached"] {
        let mount = bucket.mount(mode, None, &["--upload-delay", "100ms"]);
        let (temp, page) = (format!(".{mode}.html.Xy12Ab"), format!("{mode}.html"));
        fs::write(mount.path(&temp), &body).expect("write");
        flush(&mount);
        let stored = bucket
            .moto
            .head_object(&bucket.bucket, &temp)
            .expect("stored under its temporary name");
        assert_eq!(stored.content_type.as_deref(), Some("binary/octet-stream"));
        bucket.proxy.clear_stats();
        fs::rename(mount.path(&temp), mount.path(&page)).expect("rename");
        flush(&mount);
        let requests = requests_for(&bucket.proxy.stats(), mode);
        assert_no_data_moved(&requests, "the rename", &mount);
        let head = bucket
            .moto
            .head_object(&bucket.bucket, &page)
            .expect("the object is at its new name");
        assert_eq!(
            head.content_type.as_deref(),
            Some("text/html"),
            "{mode}: {head:?}\n{}",
            mount.log()
        );
        assert_eq!(head.metadata, stored.metadata, "{mode}: metadata kept");
        assert!(bucket.moto.get_object(&bucket.bucket, &page) == body);
        assert!(bucket.moto.head_object(&bucket.bucket, &temp).is_none());

        bucket.proxy.clear_stats();
        let copy = format!("{mode}-2.html");
        fs::rename(mount.path(&page), mount.path(&copy)).expect("rename");
        flush(&mount);
        let requests = requests_for(&bucket.proxy.stats(), mode);
        assert!(
            requests.iter().all(|(method, _, _)| method != "HEAD"),
            "{mode}: a rename within one type asked a HEAD: {requests:?}"
        );
        let head = bucket
            .moto
            .head_object(&bucket.bucket, &copy)
            .expect("moved");
        assert_eq!(head.content_type.as_deref(), Some("text/html"), "{mode}");

        // A symlink's object is no page: a name with an extension gives it no type (its
        // rename stores it anew, with none).
        let (link_temp, link) = (format!(".{mode}-link.Xy12Ab"), format!("{mode}-link.html"));
        std::os::unix::fs::symlink(&copy, mount.path(&link_temp)).expect("symlink");
        flush(&mount);
        fs::rename(mount.path(&link_temp), mount.path(&link)).expect("rename the symlink");
        flush(&mount);
        let head = bucket
            .moto
            .head_object(&bucket.bucket, &link)
            .expect("the symlink's object is at its new name");
        assert_eq!(
            head.content_type.as_deref(),
            Some("binary/octet-stream"),
            "{mode}: {head:?}"
        );
        assert_eq!(
            fs::read_link(mount.path(&link)).expect("still a symlink"),
            std::path::PathBuf::from(&copy)
        );
        mount.unmount();
    }
}

/// An object another tool stored, with its own content type and user metadata: a chmod
/// through the mount replaces only the attributes the mount owns, in either mode.
#[test]
fn a_chmod_keeps_the_content_type_and_metadata_other_tools_stored() {
    let bucket = ProxiedBucket::start("attrs-foreign");
    let body = b"name,size\na,1\n".to_vec();
    let stored = [("owner", "backup-tool"), ("retention", "7y")];
    let (name, content_type) = ("report.csv", "text/csv");
    bucket
        .moto
        .put_object_as(&bucket.bucket, name, &body, &stored, Some(content_type));
    for (mode, perm) in [("cached", 0o600), ("write-through", 0o640)] {
        let mount = bucket.mount(mode, None, &["--upload-delay", "100ms"]);
        let path = mount.path(name);
        fs::set_permissions(&path, fs::Permissions::from_mode(perm)).expect("chmod");
        flush(&mount);
        let head = bucket
            .moto
            .head_object(&bucket.bucket, name)
            .expect("the object is there");
        let mode_stored = (libc::S_IFREG | perm).to_string();
        assert_eq!(
            head.metadata.get("mode"),
            Some(&mode_stored),
            "{mode}: {head:?}\n{}",
            mount.log()
        );
        for (key, value) in stored {
            assert_eq!(
                head.metadata.get(key).map(String::as_str),
                Some(value),
                "{mode}: {head:?}"
            );
        }
        assert_eq!(
            head.content_type.as_deref(),
            Some(content_type),
            "{mode}: {head:?}"
        );
        assert!(
            bucket.moto.get_object(&bucket.bucket, name) == body,
            "{mode}: content"
        );
        mount.unmount();
    }
}

/// rsync's and `chmod`'s pattern on a file already in the bucket: each change is a
/// CopyObject of the object onto itself with the new metadata; no byte of the file is
/// read or sent again. A fresh mount shows what was set.
#[test]
fn a_chmod_or_utimens_of_a_stored_file_moves_no_data() {
    let bucket = ProxiedBucket::start("attrs-in-place");
    let body = pattern(3 << 20, 7);
    for mode in ["write-through", "cached"] {
        let name = format!("{mode}.bin");
        let mount = bucket.mount(mode, None, &["--upload-delay", "100ms"]);
        let path = mount.path(&name);
        fs::write(&path, &body).expect("write");
        flush(&mount);
        bucket.proxy.clear_stats();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        set_mtime_of_path(&path, long_ago());
        flush(&mount);
        let requests = requests_for(&bucket.proxy.stats(), &name);
        assert_no_data_moved(&requests, &format!("{mode}: an attribute change"), &mount);
        // Write-through stores each change at once; cached mode may store both in one.
        let expected_copies = if mode == "write-through" {
            2..=2
        } else {
            1..=2
        };
        let made = copies(&requests);
        assert!(
            expected_copies.contains(&made),
            "{mode}: {made} metadata copies for a chmod and a utimens: {requests:?}"
        );
        let head = bucket
            .moto
            .head_object(&bucket.bucket, &name)
            .expect("the object is there");
        assert_eq!(
            head.metadata.get("mode").map(String::as_str),
            Some("33152"),
            "{mode}: {head:?}"
        );
        assert_eq!(
            head.metadata.get("mtime").map(String::as_str),
            Some(LONG_AGO_METADATA),
            "{mode}: {head:?}"
        );
        assert!(
            head.metadata.contains_key("bucketgate-crc64"),
            "{mode}: the replacement keeps the object's crc64: {head:?}"
        );
        assert!(
            bucket.moto.get_object(&bucket.bucket, &name) == body,
            "{mode}: content"
        );
        mount.unmount();

        let fresh = bucket.mount(mode, None, &[]);
        let meta = fs::metadata(fresh.path(&name)).expect("stat on a fresh mount");
        assert_eq!(meta.mode() & 0o7777, 0o600, "{mode}: mode on a fresh mount");
        assert_eq!(
            meta.modified().expect("mtime"),
            long_ago(),
            "{mode}: mtime on a fresh mount"
        );
        assert!(
            fs::read(fresh.path(&name)).expect("read") == body,
            "{mode}: read back"
        );
        fresh.unmount();
    }
}

/// A chmod of a stored file, then a rename before the change was stored (cached mode,
/// within `upload-delay`; a file no read brought into the cache): the object is copied to
/// the new name and its metadata replaced there. No byte of it is read or uploaded.
#[test]
fn a_rename_right_after_a_chmod_moves_no_data() {
    let bucket = ProxiedBucket::start("attrs-rename");
    let body = pattern(3 << 20, 9);
    bucket
        .moto
        .put_object(&bucket.bucket, "before.bin", &body, &[]);
    let mount = bucket.mount("cached", None, &["--upload-delay", "2s"]);
    bucket.proxy.clear_stats();
    fs::set_permissions(mount.path("before.bin"), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    fs::rename(mount.path("before.bin"), mount.path("after.bin")).expect("rename");
    flush(&mount);
    let requests = requests_for(&bucket.proxy.stats(), ".bin");
    assert_no_data_moved(&requests, "the rename", &mount);
    assert!(
        bucket
            .moto
            .head_object(&bucket.bucket, "before.bin")
            .is_none(),
        "the old key is gone"
    );
    let head = bucket
        .moto
        .head_object(&bucket.bucket, "after.bin")
        .expect("the object moved");
    assert_eq!(
        head.metadata.get("mode").map(String::as_str),
        Some("33152"),
        "{head:?}"
    );
    assert!(bucket.moto.get_object(&bucket.bucket, "after.bin") == body);
    mount.unmount();

    let fresh = bucket.mount("cached", None, &[]);
    let meta = fs::metadata(fresh.path("after.bin")).expect("stat on a fresh mount");
    assert_eq!(meta.mode() & 0o7777, 0o600, "mode on a fresh mount");
    fresh.unmount();
}

/// A write after a futimens takes the write's time, as on a local disk: `path`'s mtime is
/// no earlier than `since` (less 2 s for the bucket's clock).
fn assert_changed_since(path: &Path, since: SystemTime, what: &str) {
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime");
    assert!(
        mtime + Duration::from_secs(2) >= since,
        "{}: {what}, the write after the futimens must set the mtime: {mtime:?}",
        path.display()
    );
}

/// `cp -p` into a write-through mount: write, futimens, fchmod, close. The object carries
/// the time and mode set, with no extra request for a file of one PUT; a multipart
/// object gets them with the metadata job that stores its crc64. A write after the
/// futimens takes the write's time, as on a local disk.
#[test]
fn times_and_modes_set_on_an_open_write_through_file_reach_the_bucket() {
    let bucket = ProxiedBucket::start("attrs-open");
    let mount = bucket.mount("write-through", None, &["--part-size", "5M"]);
    let small = pattern(100 << 10, 3);
    let large = pattern(12 << 20, 4);

    bucket.proxy.clear_stats();
    let mut file = fs::File::create(mount.path("small.bin")).expect("create");
    file.write_all(&small).expect("write");
    file.set_modified(long_ago()).expect("futimens");
    file.set_permissions(fs::Permissions::from_mode(0o640))
        .expect("fchmod");
    drop(file);
    let requests = requests_for(&bucket.proxy.stats(), "small.bin");
    assert_eq!(
        (data_uploads(&requests), copies(&requests)),
        (1, 0),
        "one PUT carries data and attributes: {requests:?}"
    );

    let mut file = fs::File::create(mount.path("large.bin")).expect("create");
    file.write_all(&large).expect("write");
    file.set_modified(long_ago()).expect("futimens");
    file.set_permissions(fs::Permissions::from_mode(0o640))
        .expect("fchmod");
    drop(file);

    let before_close = SystemTime::now();
    let mut file = fs::File::create(mount.path("later.bin")).expect("create");
    file.set_modified(long_ago()).expect("futimens");
    file.write_all(&small).expect("write after the futimens");
    drop(file);
    flush(&mount);

    for name in ["small.bin", "large.bin"] {
        assert_long_ago_and_0640(&bucket, &mount, name);
    }
    assert!(
        bucket.moto.get_object(&bucket.bucket, "large.bin") == large,
        "large.bin content"
    );
    assert_changed_since(&mount.path("later.bin"), before_close, "on the mount");
    mount.unmount();

    let fresh = bucket.mount("write-through", None, &[]);
    for name in ["small.bin", "large.bin"] {
        assert_long_ago_and_0640(&bucket, &fresh, name);
    }
    assert_changed_since(&fresh.path("later.bin"), before_close, "on a fresh mount");
    fresh.unmount();
}

/// A utimens and a chmod from another process, landing while a write-through close is
/// completing the stream (its last request slowed by the proxy): the object left with
/// the attributes of the close's start, and the ones set meanwhile must still reach the
/// bucket, not be overwritten on the mount by the close's record.
#[test]
fn a_time_and_mode_set_while_a_write_through_close_completes_are_kept() {
    let bucket = ProxiedBucket::start("attrs-close-race");
    let mount = bucket.mount("write-through", None, &["--part-size", "5M"]);
    let cases = [
        // One PUT at the close.
        (
            "race-small.bin",
            100 << 10,
            FaultRule::slow_ms(1500).methods(&["PUT"]),
        ),
        // Parts while writing, CompleteMultipartUpload at the close.
        (
            "race-large.bin",
            12 << 20,
            FaultRule::slow_ms(1500)
                .methods(&["POST"])
                .query_contains("uploadId="),
        ),
    ];
    for (name, size, slow_close) in cases.clone() {
        let path = mount.path(name);
        let mut file = fs::File::create(&path).expect("create");
        file.write_all(&pattern(size, 9)).expect("write");
        bucket.proxy.set(slow_close.path_contains(name).count(1));
        let other = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                set_mtime_of_path(&path, long_ago());
                fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
            })
        };
        let started = std::time::Instant::now();
        drop(file);
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "{name}: the close did not wait for the slowed request"
        );
        other.join().expect("the other thread");
        bucket.proxy.set(FaultRule::pass());
        flush(&mount);
        assert_long_ago_and_0640(&bucket, &mount, name);
    }
    mount.unmount();
    let fresh = bucket.mount("write-through", None, &[]);
    for (name, _, _) in cases {
        assert_long_ago_and_0640(&bucket, &fresh, name);
    }
    fresh.unmount();
}

/// An object replaced since the mount stored it fails the copy's condition (412), as
/// does any in-place change the bucket refuses: the attribute change then goes up with
/// the file's data, and nothing is lost.
#[test]
fn an_attribute_change_the_object_cannot_take_in_place_goes_up_with_its_data() {
    let bucket = ProxiedBucket::start("attrs-412");
    let mount = bucket.mount("write-through", None, &[]);
    let body = pattern(1 << 20, 9);
    let path = mount.path("f.bin");
    fs::write(&path, &body).expect("write");
    bucket.proxy.clear_stats();
    bucket.proxy.set(
        FaultRule::status(412, "PreconditionFailed")
            .methods(&["PUT"])
            .count(1),
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).expect("chmod");
    let requests = requests_for(&bucket.proxy.stats(), "f.bin");
    assert_eq!(copies(&requests), 1, "the in-place attempt: {requests:?}");
    assert!(
        requests.iter().any(|(method, copy, bytes)| method == "PUT"
            && copy.is_none()
            && *bytes == body.len() as u64),
        "the data went up with the attributes: {requests:?}\n{}",
        mount.log()
    );
    let head = bucket
        .moto
        .head_object(&bucket.bucket, "f.bin")
        .expect("stored");
    assert_eq!(
        head.metadata.get("mode").map(String::as_str),
        Some("33156"),
        "{head:?}"
    );
    assert!(
        bucket.moto.get_object(&bucket.bucket, "f.bin") == body,
        "content"
    );
    mount.unmount();
}
