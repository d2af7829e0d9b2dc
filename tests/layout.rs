//! Key layouts and recovery from the bucket, through real mounts of the daemon on moto
//! (127.0.0.1) and on the embedded directory bucket: objects written straight to the
//! bucket appear with their attributes, hashed keys sit where the MD5 says, renames move
//! them, a lost cache dir is rebuilt (`recover`, or a hashed mount with an empty cache),
//! and wrong layouts are refused.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::posix::{flush, pattern};
use common::{bucketgate, set_xattrs, temp_dir, unique_name, Moto, Mount};
use md5::Digest;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The MD5 of `text` in hex, straight from the md-5 crate (not the daemon's code).
fn md5_hex(bytes: &[u8]) -> String {
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key of `path` in `layout` (`plain`, `hashed:N`), computed here independently.
fn key(layout: &str, path: &str) -> String {
    match layout.strip_prefix("hashed:") {
        Some(n) => {
            let n: usize = n.parse().expect("hash length");
            let bare = path.trim_end_matches('/');
            format!("{}/{path}", &md5_hex(bare.as_bytes())[..n])
        }
        None => path.to_string(),
    }
}

/// s3fs-style attributes: a regular file 0640 of 1234:5678 modified at 1600000000.
const S3FS_FILE: [(&str, &str); 4] = [
    ("mode", "33184"),
    ("uid", "1234"),
    ("gid", "5678"),
    ("mtime", "1600000000"),
];
/// A symlink (mode 0120777).
const S3FS_LINK: [(&str, &str); 2] = [("mode", "41471"), ("mtime", "1600000100")];
/// A directory marker (mode 040750).
const S3FS_DIR: [(&str, &str); 2] = [("mode", "16872"), ("mtime", "1600000200")];

/// What the tests put in a bucket straight away: (path, body, attributes).
/// An object to put in a bucket: path, body, user metadata.
type DirectObject = (
    &'static str,
    Vec<u8>,
    &'static [(&'static str, &'static str)],
);

fn direct_objects() -> Vec<DirectObject> {
    vec![
        ("docs/report.txt", b"quarterly".to_vec(), &S3FS_FILE),
        ("docs/", Vec::new(), &S3FS_DIR),
        ("top.bin", pattern(70_000, 3), &[]),
        ("ln", b"top.bin".to_vec(), &S3FS_LINK),
        // Directories without markers above it.
        ("deep/a/b/c.txt", b"deep".to_vec(), &S3FS_FILE),
    ]
}

/// Checks a mount shows [`direct_objects`] with their attributes.
fn check_direct_objects(mount: &Mount, what: &str) {
    let mut top: Vec<String> = fs::read_dir(&mount.mountpoint)
        .expect("reading the mount's root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["deep", "docs", "ln", "top.bin"], "{what}");
    let report = fs::symlink_metadata(mount.path("docs/report.txt")).expect("report");
    assert_eq!(
        (
            report.mode(),
            report.uid(),
            report.gid(),
            report.mtime(),
            report.len()
        ),
        (0o100640, 1234, 5678, 1_600_000_000, 9),
        "{what}: s3fs attributes"
    );
    assert_eq!(
        fs::read(mount.path("docs/report.txt")).expect("read"),
        b"quarterly"
    );
    let docs = fs::symlink_metadata(mount.path("docs")).expect("docs");
    assert_eq!(
        (docs.mode(), docs.mtime()),
        (0o40750, 1_600_000_200),
        "{what}: marker"
    );
    let top_bin = fs::symlink_metadata(mount.path("top.bin")).expect("top.bin");
    assert_eq!(
        (top_bin.mode() & 0o777, top_bin.len()),
        (0o644, 70_000),
        "{what}: mount defaults"
    );
    assert_eq!(
        fs::read(mount.path("top.bin")).expect("read"),
        pattern(70_000, 3)
    );
    assert_eq!(
        fs::read_link(mount.path("ln")).expect("readlink"),
        Path::new("top.bin"),
        "{what}"
    );
    assert!(
        fs::symlink_metadata(mount.path("deep/a/b"))
            .expect("implicit directory")
            .is_dir(),
        "{what}"
    );
    assert_eq!(
        fs::read(mount.path("deep/a/b/c.txt")).expect("deep file"),
        b"deep",
        "{what}"
    );
}

#[test]
fn objects_written_to_s3_directly_appear_in_plain_and_hashed() {
    let moto = Moto::start();
    for layout in ["plain", "hashed:4", "hashed:1"] {
        let bucket = unique_name("direct");
        moto.create_bucket(&bucket);
        if layout != "plain" {
            // A tool following the layout records it as the gateway does.
            moto.put_object(&bucket, ".bucketgate/layout", layout.as_bytes(), &[]);
        }
        for (path, body, attrs) in direct_objects() {
            moto.put_object(&bucket, &key(layout, path), &body, attrs);
        }
        let mount = Mount::s3(&moto, &bucket, "cached", &["--key-layout", layout]);
        check_direct_objects(&mount, &format!("s3 {layout}"));
        mount.unmount();
    }
}

#[test]
fn objects_written_to_the_directory_bucket_directly_appear_in_plain_and_hashed() {
    for layout in ["plain", "hashed:2"] {
        let bucket = temp_dir("direct-local");
        if layout != "plain" {
            fs::create_dir(bucket.path().join(".bucketgate")).expect("reserved dir");
            fs::write(bucket.path().join(".bucketgate/layout"), layout).expect("marker");
        }
        for (path, body, attrs) in direct_objects() {
            let at = bucket.path().join(key(layout, path));
            if path.ends_with('/') {
                fs::create_dir_all(&at).expect("marker dir");
            } else {
                fs::create_dir_all(at.parent().expect("parent")).expect("parents");
                fs::write(&at, &body).expect("object");
            }
            set_xattrs(&at, attrs);
        }
        let source = bucket.path().to_string_lossy().into_owned();
        let mount = Mount::start(&source, "cached", &["--key-layout", layout], &[]);
        check_direct_objects(&mount, &format!("local {layout}"));
        mount.unmount();
    }
}

#[test]
fn hashed_keys_follow_the_md5_and_renames_move_them() {
    let moto = Moto::start();
    let layout = "hashed:4";
    let bucket = unique_name("hashed");
    moto.create_bucket(&bucket);
    let mount = Mount::s3(&moto, &bucket, "cached", &["--key-layout", layout]);
    fs::write(mount.path("a.txt"), b"a").expect("write a");
    fs::create_dir_all(mount.path("dir/sub")).expect("mkdir");
    fs::create_dir(mount.path("dir/empty")).expect("mkdir empty");
    fs::write(mount.path("dir/x"), b"x").expect("write x");
    fs::write(mount.path("dir/sub/y"), pattern(10_000, 1)).expect("write y");
    flush(&mount);
    let expect = |paths: &[&str]| {
        let mut keys: Vec<String> = paths.iter().map(|p| key(layout, p)).collect();
        keys.push(".bucketgate/layout".to_string());
        keys.sort();
        keys
    };
    assert_eq!(
        moto.list_keys(&bucket, ""),
        expect(&[
            "a.txt",
            "dir/",
            "dir/sub/",
            "dir/empty/",
            "dir/x",
            "dir/sub/y"
        ])
    );
    assert_eq!(
        moto.get_object(&bucket, ".bucketgate/layout"),
        layout.as_bytes()
    );
    fs::rename(mount.path("a.txt"), mount.path("b.txt")).expect("rename file");
    fs::rename(mount.path("dir"), mount.path("moved")).expect("rename dir");
    flush(&mount);
    assert_eq!(
        moto.list_keys(&bucket, ""),
        expect(&[
            "b.txt",
            "moved/",
            "moved/sub/",
            "moved/empty/",
            "moved/x",
            "moved/sub/y"
        ]),
        "every key moved with its path"
    );
    assert_eq!(
        moto.get_object(&bucket, &key(layout, "moved/sub/y")),
        pattern(10_000, 1)
    );
    mount.unmount();
}

/// Everything a mount shows of a tree: kind, size, mode, owner, mtime (with nanoseconds),
/// symlink target or content digest, by path.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    // Bounded by the tree's size.
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .into_owned();
            let what = if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).expect("readlink").display())
            } else if meta.is_dir() {
                pending.push(path.clone());
                "dir".to_string()
            } else {
                md5_hex(&fs::read(&path).expect("read"))
            };
            // Directory times are left out: a directory's own mtime is the marker's, and
            // the kernel's view of it after children change is not what this checks.
            let mtime = if meta.is_dir() {
                String::new()
            } else {
                format!("{}.{:09}", meta.mtime(), meta.mtime_nsec())
            };
            out.insert(
                rel,
                format!(
                    "{what} size={} mode={:o} owner={}:{} mtime={mtime}",
                    if meta.is_dir() { 0 } else { meta.len() },
                    meta.mode(),
                    meta.uid(),
                    meta.gid()
                ),
            );
        }
    }
    out
}

/// Makes a tree worth recovering: nested and empty directories, modes, times, a symlink,
/// a binary file.
fn make_tree(mount: &Mount) {
    fs::create_dir_all(mount.path("projects/alpha/src")).expect("mkdir");
    fs::create_dir(mount.path("empty")).expect("mkdir empty");
    fs::write(mount.path("projects/alpha/src/main.rs"), b"fn main() {}\n").expect("write");
    fs::write(mount.path("projects/notes.md"), b"# notes\n").expect("write");
    fs::write(mount.path("blob.bin"), pattern(300_000, 7)).expect("write blob");
    fs::set_permissions(
        mount.path("projects/notes.md"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    fs::set_permissions(mount.path("empty"), fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::symlink("projects/notes.md", mount.path("notes-link")).expect("symlink");
    let when = std::time::UNIX_EPOCH + Duration::new(1_500_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(mount.path("blob.bin"))
        .and_then(|f| f.set_modified(when))
        .expect("set mtime");
    for i in 0..30 {
        fs::write(
            mount.path(format!("projects/alpha/chunk-{i:03}")),
            format!("{i}"),
        )
        .expect("write chunk");
    }
}

/// `bucketgate recover` with the connection flags of `source`; returns the Ran.
fn recover(source: &str, cache: &Path, extra: &[&str], moto: Option<&Moto>) -> common::Ran {
    let mut args = vec!["recover", source, "--cache-dir"];
    let cache_s = cache.to_str().expect("utf-8 cache path").to_string();
    args.push(&cache_s);
    let moto_args = moto.map(Moto::mount_args).unwrap_or_default();
    args.extend(moto_args.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bucketgate"));
    cmd.args(&args).envs(Moto::env());
    common::run_bounded(&mut cmd, &format!("bucketgate {}", args.join(" ")), TIMEOUT)
}

/// Writes a tree, loses the cache dir, recovers (or, hashed, just mounts with an empty
/// cache) and compares what the mount shows.
fn recover_round_trip(
    start: &dyn Fn(&Path) -> Mount,
    source: &str,
    moto: Option<&Moto>,
    layout: &str,
) {
    let cache = temp_dir("recover-cache");
    let mount = start(cache.path());
    make_tree(&mount);
    flush(&mount);
    let before = snapshot(&mount.mountpoint);
    mount.unmount();

    fs::remove_dir_all(cache.path()).expect("losing the cache dir");
    let ran = recover(source, cache.path(), &[], moto);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{layout}: recover failed: {stdout}\n{}",
        ran.stderr
    );
    // 30 chunks + main.rs, notes.md, blob.bin, notes-link; projects, alpha, src, empty.
    assert!(
        stdout.contains("recovered 34 objects, 4 directories"),
        "{layout}: {stdout}"
    );
    let shows = |cache: &Path, what: &str| {
        let mount = start(cache);
        assert_eq!(snapshot(&mount.mountpoint), before, "{layout}: {what}");
        mount.unmount();
    };
    shows(cache.path(), "the recovered tree");
    if layout != "plain" {
        // A hashed mount with an empty cache dir rebuilds the namespace itself.
        let fresh = temp_dir("recover-fresh");
        shows(fresh.path(), "the tree a new hashed mount rebuilt");
    }
}

#[test]
fn recover_after_losing_the_cache_reproduces_the_tree_on_s3() {
    let moto = Moto::start();
    for layout in ["plain", "hashed:4"] {
        let bucket = unique_name("recover");
        moto.create_bucket(&bucket);
        let start = |cache: &Path| {
            Mount::s3_with_cache(&moto, &bucket, "cached", cache, &["--key-layout", layout])
        };
        recover_round_trip(&start, &format!("s3://{bucket}"), Some(&moto), layout);
    }
}

#[test]
fn recover_after_losing_the_cache_reproduces_the_tree_on_the_directory_bucket() {
    for layout in ["plain", "hashed:2"] {
        let bucket = temp_dir("recover-local");
        let source = bucket.path().to_string_lossy().into_owned();
        let start = |cache: &Path| {
            Mount::start_with_cache(&source, "cached", cache, &["--key-layout", layout], &[])
        };
        recover_round_trip(&start, &source, None, layout);
    }
}

/// A directory bucket, and a cache dir holding a change not yet uploaded (`pending.txt`),
/// as a crash left them.
fn crashed_with_a_pending_change(name: &str) -> (tempfile::TempDir, String, tempfile::TempDir) {
    let bucket = temp_dir(name);
    let source = bucket.path().to_string_lossy().into_owned();
    let cache = temp_dir(&format!("{name}-cache"));
    let mount = Mount::start_with_cache(
        &source,
        "cached",
        cache.path(),
        &["--upload-delay", "1h"],
        &[],
    );
    fs::write(mount.path("pending.txt"), b"not uploaded").expect("write");
    mount.crash();
    (bucket, source, cache)
}

#[test]
fn recover_refuses_a_cache_dir_with_changes_not_yet_uploaded() {
    let (_bucket, source, cache) = crashed_with_a_pending_change("unsynced");
    let ran = recover(&source, cache.path(), &[], None);
    assert!(!ran.status.success(), "recover must refuse");
    assert!(
        ran.stderr.contains("not yet in the bucket") && ran.stderr.contains("--force"),
        "{}",
        ran.stderr
    );
    let ran = recover(&source, cache.path(), &["--force"], None);
    assert!(ran.status.success(), "{}", ran.stderr);
}

/// A cache dir a newer build wrote may hold rows this build cannot read right (an older
/// build took an attribute-only change for one it need not upload): mount and recover
/// refuse it, saying what to do, and leave it as it is, so the newer build still finds
/// its pending change.
#[test]
fn a_cache_dir_of_a_newer_build_is_refused_and_kept() {
    let (bucket, source, cache) = crashed_with_a_pending_change("newer");
    let store = cache.path().join("meta.db");
    let version = |set: Option<i64>| -> i64 {
        let conn = rusqlite::Connection::open(&store).expect("open the store");
        if let Some(version) = set {
            conn.pragma_update(None, "user_version", version)
                .expect("set the version");
        }
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("read the version")
    };
    let ours = version(None);
    version(Some(ours + 1));
    let err = mount_fails_with_cache(&source, cache.path(), &[]);
    assert!(
        err.contains("newer bucketgate") && err.contains("--cache-dir"),
        "{err}"
    );
    let ran = recover(&source, cache.path(), &["--force"], None);
    assert!(!ran.status.success(), "recover must refuse it too");
    assert!(ran.stderr.contains("newer bucketgate"), "{}", ran.stderr);
    assert_eq!(version(None), ours + 1, "the store is left as it was");
    assert!(!bucket.path().join("pending.txt").exists());

    // The build that wrote it (here: the version put back) still uploads the change.
    version(Some(ours));
    let mount = Mount::start_with_cache(&source, "cached", cache.path(), &[], &[]);
    flush(&mount);
    assert_eq!(
        fs::read(bucket.path().join("pending.txt")).expect("uploaded"),
        b"not uploaded"
    );
    mount.unmount();
}

/// `bucketgate mount` in the background with a fresh cache dir, expected to fail; returns
/// its stderr.
fn mount_fails(source: &str, extra: &[&str]) -> String {
    let cache = temp_dir("refused-cache");
    mount_fails_with_cache(source, cache.path(), extra)
}

/// `bucketgate mount` in the background on `cache`, expected to fail; returns its stderr.
fn mount_fails_with_cache(source: &str, cache: &Path, extra: &[&str]) -> String {
    let mnt = temp_dir("refused-mnt");
    let mut args = vec![
        "mount",
        source,
        mnt.path().to_str().expect("utf-8"),
        "--cache-dir",
        cache.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let ran = bucketgate(&args, TIMEOUT);
    assert!(
        !ran.status.success(),
        "mount {extra:?} must be refused: {}",
        String::from_utf8_lossy(&ran.stdout)
    );
    ran.stderr
}

#[test]
fn a_mismatched_layout_is_refused() {
    let bucket = temp_dir("mismatch");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start(&source, "cached", &["--key-layout", "hashed:2"], &[]);
    fs::write(mount.path("f"), b"f").expect("write");
    mount.unmount();
    for (asked, flags) in [
        ("plain", vec![]),
        ("hashed:3", vec!["--key-layout", "hashed:3"]),
    ] {
        let err = mount_fails(&source, &flags);
        assert!(
            err.contains("--key-layout hashed:2")
                && err.contains(&format!("asks for --key-layout {asked}")),
            "{err}"
        );
    }
    // A bucket with objects and no marker is plain.
    let plain = temp_dir("mismatch-plain");
    fs::write(plain.path().join("existing"), b"x").expect("object");
    let err = mount_fails(&plain.path().to_string_lossy(), &["--key-layout", "hashed"]);
    assert!(
        err.contains("no .bucketgate/layout") && err.contains("hashed:4"),
        "{err}"
    );
}

#[test]
fn invalid_key_layout_values_are_refused_naming_the_key() {
    let bucket = temp_dir("invalid");
    let source = bucket.path().to_string_lossy().into_owned();
    for bad in ["hashed:0", "hashed:9", "hashed:x", "sharded"] {
        let err = mount_fails(&source, &["--key-layout", bad]);
        assert!(err.contains("key-layout") && err.contains(bad), "{err}");
    }
    let config = temp_dir("invalid-config");
    let path = config.path().join("m.toml");
    fs::write(&path, "key-layout = \"hashed:12\"\n").expect("config");
    let err = mount_fails(&source, &["--config", path.to_str().expect("utf-8")]);
    assert!(
        err.contains("key-layout") && err.contains("hashed:12"),
        "{err}"
    );
}
