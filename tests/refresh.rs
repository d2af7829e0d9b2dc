//! Refresh of outside changes through real mounts: objects added, replaced and deleted in
//! the bucket by another client (boto3 against moto, or plain file operations on the
//! directory bucket) show in the mount after `--meta-ttl` and at once after
//! `bucketgate refresh`; a replaced object is read anew, not from the stale cache; a local
//! change not yet uploaded wins a conflict and the remote version is kept under a
//! conflict key; sync mode fetches discovered objects and serves them with the bucket down.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault::{FaultRule, ProxiedBucket};
use common::{bucketgate, temp_dir, unique_name, Moto, Mount};

/// How long a change may take to show with a 1 s TTL (listing, HEADs, kernel TTL).
const SHOW_DEADLINE: Duration = Duration::from_secs(15);

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Polls `check` until it holds or `SHOW_DEADLINE` passes; panics with `what` and the
/// daemon's log then.
fn wait_until(mount: &Mount, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + SHOW_DEADLINE;
    // Bounded by the deadline.
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what}: not seen within {SHOW_DEADLINE:?}\ndaemon log:\n{}",
        common::tail(&mount.log(), 60)
    );
}

/// `bucketgate refresh MOUNTPOINT [PATH]`, which must succeed; its stdout.
fn refresh(mount: &Mount, path: Option<&str>) -> String {
    let mnt = mount
        .mountpoint
        .to_str()
        .expect("utf-8 mount point")
        .to_string();
    let mut args = vec!["refresh", mnt.as_str()];
    let full;
    if let Some(path) = path {
        full = mount.path(path).to_str().expect("utf-8 path").to_string();
        args.push(&full);
    }
    let ran = bucketgate(&args, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&ran.stdout).into_owned();
    assert!(
        ran.status.success(),
        "bucketgate refresh failed: {out}\n{}\ndaemon log:\n{}",
        ran.stderr,
        common::tail(&mount.log(), 40)
    );
    out
}

fn read(mount: &Mount, rel: &str) -> Vec<u8> {
    fs::read(mount.path(rel)).unwrap_or_else(|e| panic!("reading {rel} through the mount: {e}"))
}

#[test]
fn s3_outside_changes_show_after_the_ttl_and_a_replaced_object_is_read_anew() {
    let moto = Moto::start();
    let bucket = unique_name("refresh-ttl");
    moto.create_bucket(&bucket);
    moto.put_object(&bucket, "keep.txt", b"version one", &[]);
    moto.put_object(&bucket, "doomed.txt", b"delete me", &[]);
    moto.put_object(&bucket, "sub/inner.txt", b"inner one", &[]);
    let mount = Mount::s3(&moto, &bucket, "cached", &["--meta-ttl", "1s"]);
    assert_eq!(
        names(&mount.mountpoint),
        set(&["doomed.txt", "keep.txt", "sub"])
    );
    // Cached now: a stale copy would be served if the replacement were missed.
    assert_eq!(read(&mount, "keep.txt"), b"version one");
    assert_eq!(read(&mount, "sub/inner.txt"), b"inner one");

    moto.put_object(&bucket, "added.txt", b"new here", &[("mode", "33188")]);
    // Same length: only the ETag tells the versions apart.
    moto.put_object(&bucket, "keep.txt", b"version two", &[]);
    moto.put_object(&bucket, "sub/inner.txt", b"inner two, longer", &[]);
    moto.delete_object(&bucket, "doomed.txt");

    wait_until(&mount, "added and deleted names in the root", || {
        names(&mount.mountpoint) == set(&["added.txt", "keep.txt", "sub"])
    });
    wait_until(&mount, "the replaced object's new content", || {
        read(&mount, "keep.txt") == b"version two"
    });
    wait_until(&mount, "the replaced object in a subdirectory", || {
        read(&mount, "sub/inner.txt") == b"inner two, longer"
    });
    assert_eq!(read(&mount, "added.txt"), b"new here");
    assert_eq!(
        fs::metadata(mount.path("sub/inner.txt"))
            .expect("stat")
            .len(),
        17,
        "the size follows the new version"
    );
    assert!(!mount.path("doomed.txt").exists());
    mount.unmount();
}

#[test]
fn s3_refresh_shows_outside_changes_at_once_and_never_means_never() {
    let moto = Moto::start();
    let bucket = unique_name("refresh-now");
    moto.create_bucket(&bucket);
    moto.put_object(&bucket, "a.txt", b"aaaa", &[]);
    moto.put_object(&bucket, "b.txt", b"bbbb", &[]);
    moto.put_object(&bucket, "dir/c.txt", b"cccc", &[]);
    let mount = Mount::s3(&moto, &bucket, "cached", &["--meta-ttl", "never"]);
    assert_eq!(names(&mount.mountpoint), set(&["a.txt", "b.txt", "dir"]));
    assert_eq!(names(&mount.path("dir")), set(&["c.txt"]));
    assert_eq!(read(&mount, "a.txt"), b"aaaa");

    moto.put_object(&bucket, "a.txt", b"AAAA", &[]);
    moto.delete_object(&bucket, "b.txt");
    moto.put_object(&bucket, "new.txt", b"fresh", &[]);
    moto.put_object(&bucket, "dir/d.txt", b"dddd", &[]);
    moto.put_object(&bucket, "newdir/e.txt", b"eeee", &[]);
    // With `never`, the mount keeps what it knows.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(names(&mount.mountpoint), set(&["a.txt", "b.txt", "dir"]));
    assert_eq!(read(&mount, "a.txt"), b"aaaa");

    // PATH limits the refresh: only `dir` is listed again.
    let out = refresh(&mount, Some("dir"));
    assert!(
        out.contains("1 added, 0 replaced, 0 deleted, 0 conflicts"),
        "{out}"
    );
    assert_eq!(names(&mount.path("dir")), set(&["c.txt", "d.txt"]));
    assert_eq!(names(&mount.mountpoint), set(&["a.txt", "b.txt", "dir"]));

    let out = refresh(&mount, None);
    assert!(
        out.contains("2 added, 1 replaced, 1 deleted, 0 conflicts"),
        "new.txt and newdir added, a.txt replaced, b.txt deleted: {out}"
    );
    assert_eq!(
        names(&mount.mountpoint),
        set(&["a.txt", "dir", "new.txt", "newdir"])
    );
    assert_eq!(read(&mount, "a.txt"), b"AAAA", "not the stale cached copy");
    assert_eq!(read(&mount, "newdir/e.txt"), b"eeee");
    assert!(!mount.path("b.txt").exists());
    let again = refresh(&mount, None);
    assert!(
        again.contains("0 added, 0 replaced, 0 deleted, 0 conflicts"),
        "a second refresh finds nothing new: {again}"
    );
    mount.unmount();
}

#[test]
fn s3_a_local_change_wins_a_conflict_and_the_remote_version_is_kept() {
    let moto = Moto::start();
    let bucket = unique_name("refresh-conflict");
    moto.create_bucket(&bucket);
    moto.put_object(&bucket, "a/seen.txt", b"base", &[]);
    moto.put_object(&bucket, "b/unseen.txt", b"base", &[]);
    let mount = Mount::s3(
        &moto,
        &bucket,
        "cached",
        &["--meta-ttl", "never", "--upload-delay", "60s"],
    );
    assert_eq!(read(&mount, "a/seen.txt"), b"base");
    assert_eq!(read(&mount, "b/unseen.txt"), b"base");
    // Local changes, held back by the upload delay.
    fs::write(mount.path("a/seen.txt"), b"local seen").expect("local write");
    fs::write(mount.path("b/unseen.txt"), b"local unseen").expect("local write");
    moto.put_object(&bucket, "a/seen.txt", b"remote seen", &[]);
    moto.put_object(&bucket, "b/unseen.txt", b"remote unseen", &[]);

    // A refresh of a/ notices one conflict now...
    let out = refresh(&mount, Some("a/seen.txt"));
    assert!(out.contains("0 replaced, 0 deleted, 1 conflicts"), "{out}");
    assert_eq!(
        read(&mount, "a/seen.txt"),
        b"local seen",
        "the local version wins"
    );
    // ...and the uploader notices the other before it would overwrite it.
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "flush: {flushed:?}");

    let keys = moto.list_keys(&bucket, "");
    assert_eq!(
        keys.len(),
        4,
        "two objects and two conflict copies: {keys:?}"
    );
    for (name, local, remote) in [
        ("a/seen.txt", "local seen", "remote seen"),
        ("b/unseen.txt", "local unseen", "remote unseen"),
    ] {
        assert_eq!(moto.get_object(&bucket, name), local.as_bytes(), "{name}");
        let kept: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{name}.bucketgate-conflict-")))
            .collect();
        assert_eq!(kept.len(), 1, "one conflict copy of {name}: {keys:?}");
        assert_eq!(
            moto.get_object(&bucket, kept[0]),
            remote.as_bytes(),
            "{name}: the remote version is kept"
        );
    }
    let log = mount.log();
    assert!(
        log.contains("conflict") && log.contains("a/seen.txt") && log.contains("b/unseen.txt"),
        "the conflicts are logged with their keys:\n{log}"
    );
    mount.unmount();
}

#[test]
fn sync_mode_fetches_discovered_objects_and_serves_them_with_the_bucket_down() {
    let setup = ProxiedBucket::start("refresh-sync");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let big: Vec<u8> = (0..(9 << 20) + 123).map(|i| (i % 251) as u8).collect();
    moto.put_object(bucket, "big.bin", &big, &[]);
    moto.put_object(bucket, "docs/small.txt", b"small", &[]);
    let mount = setup.mount(
        "sync",
        None,
        &[
            "--meta-ttl",
            "1s",
            "--retries",
            "1",
            "--request-timeout",
            "5s",
        ],
    );
    // Listing discovers them; stat loads their attributes. Nothing is read.
    for rel in ["big.bin", "docs/small.txt"] {
        fs::metadata(mount.path(rel)).expect("stat");
    }
    // An object added later and found by a refresh is fetched too.
    moto.put_object(bucket, "docs/later.txt", b"later", &[]);
    let out = refresh(&mount, Some("docs"));
    assert!(out.contains("1 added"), "{out}");
    fs::metadata(mount.path("docs/later.txt")).expect("stat");
    let want = big.len() as u64 + 2;
    wait_until(&mount, "the full copy in the cache", || {
        mount.status_json()["cache_used_bytes"]
            .as_u64()
            .unwrap_or(0)
            >= want
    });

    proxy.set(FaultRule::down());
    assert_eq!(read(&mount, "big.bin"), big, "served from the cache");
    assert_eq!(read(&mount, "docs/small.txt"), b"small");
    assert_eq!(read(&mount, "docs/later.txt"), b"later");
    // Past the TTL, a listing fails: the mount keeps serving what it knows.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(&mount.path("docs")), set(&["later.txt", "small.txt"]));
    assert_eq!(read(&mount, "docs/small.txt"), b"small");
    proxy.set(FaultRule::pass());
    mount.unmount();
}

#[test]
fn directory_bucket_outside_changes_show_and_conflicts_keep_both() {
    let root = temp_dir("refresh-dir");
    let bucket = root.path().join("bucket");
    fs::create_dir_all(bucket.join("sub")).expect("bucket dir");
    fs::write(bucket.join("same.txt"), b"12345").expect("object");
    fs::write(bucket.join("gone.txt"), b"bye").expect("object");
    fs::write(bucket.join("sub/mine.txt"), b"base").expect("object");
    let source = bucket.to_str().expect("utf-8").to_string();
    let mount = Mount::start(
        &source,
        "cached",
        &["--meta-ttl", "1s", "--upload-delay", "60s"],
        &[],
    );
    assert_eq!(
        names(&mount.mountpoint),
        set(&["gone.txt", "same.txt", "sub"])
    );
    assert_eq!(read(&mount, "same.txt"), b"12345");
    assert_eq!(read(&mount, "sub/mine.txt"), b"base");

    // Same size: the modification time tells the versions apart on this bucket.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(bucket.join("same.txt"), b"54321").expect("replace");
    fs::remove_file(bucket.join("gone.txt")).expect("delete");
    fs::write(bucket.join("sub/new.txt"), b"new").expect("add");
    wait_until(&mount, "added, replaced and deleted objects", || {
        names(&mount.mountpoint) == set(&["same.txt", "sub"])
            && names(&mount.path("sub")) == set(&["mine.txt", "new.txt"])
            && read(&mount, "same.txt") == b"54321"
    });

    // A local change not uploaded yet, and another tool's change to the same object.
    fs::write(mount.path("sub/mine.txt"), b"local").expect("local write");
    fs::write(bucket.join("sub/mine.txt"), b"remote!").expect("remote write");
    let out = refresh(&mount, Some("sub"));
    assert!(out.contains("1 conflicts"), "{out}");
    assert_eq!(read(&mount, "sub/mine.txt"), b"local");
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(60));
    assert!(flushed.status.success(), "flush: {flushed:?}");
    assert_eq!(
        fs::read(bucket.join("sub/mine.txt")).expect("object"),
        b"local"
    );
    let kept: Vec<String> = names(&bucket.join("sub"))
        .into_iter()
        .filter(|n| n.starts_with("mine.txt.bucketgate-conflict-"))
        .collect();
    assert_eq!(kept.len(), 1, "one conflict copy: {kept:?}");
    assert_eq!(
        fs::read(bucket.join("sub").join(&kept[0])).expect("conflict copy"),
        b"remote!"
    );
    mount.unmount();
}
