//! A file that leaves its name while its bytes are on the way to the bucket must not land
//! at the key of the name it left: another file may stand there by then, and its object
//! would be replaced by bytes that are not its own.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault::{FaultRule, ProxiedBucket};
use common::posix::{flush, pattern, MODES};
use common::{temp_dir, Mount};

/// What the writer of the old file does with its name while the file is still open.
#[derive(Debug, Clone, Copy)]
enum Leaves {
    Renamed,
    Unlinked,
}

/// A log rotation: `log` is open and being written when it is renamed to `log.1` (or
/// unlinked), a new `log` is written and closed, and only then does the old writer
/// finish and close. The new `log` keeps its bytes, in the bucket, on the mount and on a
/// fresh mount; the old file's final bytes are at `log.1`.
#[test]
fn a_file_renamed_or_unlinked_while_open_leaves_the_new_file_at_its_name_alone() {
    use std::io::Write;

    let first = pattern(1 << 20, 3);
    let rest = pattern(1000, 4);
    let whole: Vec<u8> = [first.clone(), rest.clone()].concat();
    let new_log = b"the new log\n".to_vec();
    for mode in MODES {
        for leaves in [Leaves::Renamed, Leaves::Unlinked] {
            let what = format!("{mode}, {leaves:?}");
            let bucket = temp_dir(&format!("bucket-rotate-{mode}"));
            let source = bucket.path().to_string_lossy().into_owned();
            let mount = Mount::start(&source, mode, &["--upload-delay", "0ms"], &[]);
            let mut old = fs::File::create(mount.path("log")).expect("create log");
            old.write_all(&first).expect("write the old log");
            match leaves {
                Leaves::Renamed => {
                    fs::rename(mount.path("log"), mount.path("log.1")).expect("rename")
                }
                Leaves::Unlinked => fs::remove_file(mount.path("log")).expect("unlink"),
            }
            fs::write(mount.path("log"), &new_log).expect("write the new log");
            old.write_all(&rest).expect("the old writer goes on");
            drop(old);
            flush(&mount);

            let mut expected = vec![("log", new_log.clone())];
            if matches!(leaves, Leaves::Renamed) {
                expected.push(("log.1", whole.clone()));
            }
            check_objects(bucket.path(), &expected, &what, &mount);
            let seen = fs::read(mount.path("log")).expect("read log on the mount");
            assert!(
                seen == new_log,
                "{what}: the mount's log: {} bytes",
                seen.len()
            );
            mount.unmount();

            let fresh = Mount::start(&source, mode, &[], &[]);
            let seen = fs::read(fresh.path("log")).expect("read log on a fresh mount");
            assert!(
                seen == new_log,
                "{what}: a fresh mount's log: {} bytes",
                seen.len()
            );
            fresh.unmount();
        }
    }
}

/// Write-through: a file renamed while its writer still writes (a log rotation) moves
/// only its last complete object. The bucket never shows the writer's partial bytes at
/// the new name: the overwritten file's old version is there until the close, and a new
/// file appears only at its close, whole.
#[test]
fn a_write_through_rename_of_a_file_being_written_moves_only_its_last_complete_version() {
    use std::io::Write;

    let bucket = temp_dir("bucket-rename-open");
    let source = bucket.path().to_string_lossy().into_owned();
    let mount = Mount::start(&source, "write-through", &[], &[]);
    let old_version = pattern(64 << 10, 5);
    fs::write(mount.path("log"), &old_version).expect("write the last complete log");
    // 3 MiB: below one part, so the whole prefix sits in the spool and the stream.
    let first = pattern(3 << 20, 6);
    let rest = pattern(4096, 7);
    let mut log = fs::File::create(mount.path("log")).expect("truncate log");
    log.write_all(&first).expect("write the new log");
    let mut fresh = fs::File::create(mount.path("fresh")).expect("create fresh");
    fresh.write_all(&first).expect("write fresh");

    fs::rename(mount.path("log"), mount.path("log.1")).expect("rename log");
    fs::rename(mount.path("fresh"), mount.path("fresh.1")).expect("rename fresh");
    let before_close = "write-through, renamed while written";
    check_objects(
        bucket.path(),
        &[("log.1", old_version.clone())],
        before_close,
        &mount,
    );

    log.write_all(&rest).expect("the writer goes on");
    fresh.write_all(&rest).expect("the writer of fresh goes on");
    drop((log, fresh));
    let whole: Vec<u8> = [first, rest].concat();
    check_objects(
        bucket.path(),
        &[("log.1", whole.clone()), ("fresh.1", whole.clone())],
        "write-through, after the close",
        &mount,
    );
    mount.unmount();
}

/// The bucket directory holds exactly `expected` (name, bytes), nothing else.
fn check_objects(bucket: &Path, expected: &[(&str, Vec<u8>)], what: &str, mount: &Mount) {
    let mut names: Vec<String> = fs::read_dir(bucket)
        .expect("list the bucket")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(".bucketgate"))
        .collect();
    names.sort();
    let mut wanted: Vec<String> = expected.iter().map(|(n, _)| n.to_string()).collect();
    wanted.sort();
    assert_eq!(
        names,
        wanted,
        "{what}: objects in the bucket\n{}",
        mount.log()
    );
    for (name, bytes) in expected {
        let stored = fs::read(bucket.join(name)).expect("read an object");
        assert!(
            &stored == bytes,
            "{what}: {name} holds {} bytes of the wrong file, not its own {}\n{}",
            stored.len(),
            bytes.len(),
            common::tail(&mount.log(), 40)
        );
    }
}

/// Cached mode: a file's upload waits for its key while another upload to that key is
/// stalled; meanwhile the file is renamed away and the stalled file comes back to that
/// name. Once the stall ends, the waiting upload goes to the file's new name, and the
/// file standing at the key keeps its object.
#[test]
fn an_upload_waiting_for_its_key_follows_a_rename_made_meanwhile() {
    let setup = ProxiedBucket::start("key-race");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount("cached", None, &["--upload-delay", "0ms"]);
    // Listed first, so new names need no lookup in the bucket.
    fs::read_dir(&mount.mountpoint)
        .expect("list the root")
        .for_each(drop);
    let staying = pattern(64 << 10, 1);
    let moving = pattern(96 << 10, 2);

    stall_next_put(&setup, "slot");
    fs::write(mount.path("slot"), &staying).expect("write the file that comes back");
    wait_until("the first upload to stall", Duration::from_secs(20), || {
        proxy.log().contains("stalled")
    });
    fs::rename(mount.path("slot"), mount.path("away")).expect("move it away");
    fs::write(mount.path("slot"), &moving).expect("write the file that moves");
    let moving_ino = fs::metadata(mount.path("slot")).expect("stat").ino();
    // Its upload starts at once (no upload delay) and waits for the stalled key.
    wait_until("the second upload to wait", Duration::from_secs(20), || {
        uploads_in_flight(&mount) >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    fs::rename(mount.path("slot"), mount.path("moved")).expect("move the second away");
    fs::rename(mount.path("away"), mount.path("slot")).expect("the first comes back");
    assert_eq!(
        fs::metadata(mount.path("moved")).expect("stat").ino(),
        moving_ino
    );
    proxy.set(FaultRule::pass());
    flush(&mount);

    assert_object(&setup, "slot", &staying, &mount);
    assert_object(&setup, "moved", &moving, &mount);
    let keys = moto.list_keys(bucket, "");
    assert!(
        !keys.iter().any(|k| k == "away"),
        "the first file's interim name is gone: {keys:?}"
    );
    mount.unmount();
}

/// The bucket's object at `key` is `expected`; on a mismatch, the daemon log's tail.
fn assert_object(setup: &ProxiedBucket, key: &str, expected: &[u8], mount: &Mount) {
    let stored = setup.moto.get_object(&setup.bucket, key);
    assert!(
        stored == expected,
        "{key} holds {} bytes of another file, not its own {}\n{}",
        stored.len(),
        expected.len(),
        common::tail(&mount.log(), 40)
    );
}

/// The next PUT to `key` (an upload or a copy) is held until the rule changes.
fn stall_next_put(setup: &ProxiedBucket, key: &str) {
    setup.proxy.set(
        FaultRule::stall()
            .count(1)
            .methods(&["PUT"])
            .path_contains(&format!("/{}/{key}", setup.bucket)),
    );
}

fn uploads_in_flight(mount: &Mount) -> u64 {
    mount.status_json()["uploads_in_flight"]
        .as_u64()
        .expect("uploads_in_flight in status")
}

/// Polls `done` every 50 ms until it holds; panics after `timeout`.
fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    for _ in 0..=timeout.as_millis() / 50 {
        if done() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {timeout:?}");
}

/// Write-through: the file is renamed while its close completes the multipart upload at
/// the old key. The object follows the file: it ends at the new name, and nothing is left
/// at the old one.
#[test]
fn a_rename_while_a_write_through_close_completes_its_object_is_followed() {
    use std::io::Write;

    let setup = ProxiedBucket::start("key-race-close");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount("write-through", None, &["--part-size", "5M"]);
    let data = pattern(11 << 20, 5);
    let mut file = fs::File::create(mount.path("closing")).expect("create");
    file.write_all(&data).expect("write three parts");
    proxy.set(
        FaultRule::stall()
            .count(1)
            .methods(&["POST"])
            .query_contains("uploadId"),
    );
    let closer = std::thread::spawn(move || drop(file));
    wait_until("the completion to stall", Duration::from_secs(30), || {
        proxy.log().contains("stalled")
    });
    fs::rename(mount.path("closing"), mount.path("renamed")).expect("rename during the close");
    proxy.set(FaultRule::pass());
    closer.join().expect("the closing thread");
    flush(&mount);

    let keys = moto.list_keys(bucket, "");
    assert!(
        !keys.iter().any(|k| k == "closing"),
        "the old name's object is left behind: {keys:?}\n{}",
        common::tail(&mount.log(), 40)
    );
    assert_object(&setup, "renamed", &data, &mount);
    let seen = fs::read(mount.path("renamed")).expect("read on the mount");
    assert!(seen == data, "the mount reads {} bytes", seen.len());
    mount.unmount();
}

/// Write-through: a file renamed away from `log` has not copied its object to its new
/// name yet (the rename was journaled by a cached mount that then died; the copy runs at
/// the next mount and is held up). A new `log` written meanwhile waits for that copy
/// before its own object replaces the old one, so both files keep their bytes.
#[test]
fn a_write_through_close_waits_for_the_copy_of_the_file_that_left_its_name() {
    let setup = ProxiedBucket::start("key-race-copy");
    let proxy = &setup.proxy;
    let cache = temp_dir("key-race-copy-cache");
    let old_log = pattern(200 << 10, 6);
    let new_log = pattern(150 << 10, 7);
    let cached = setup.mount("cached", Some(cache.path()), &["--upload-delay", "0ms"]);
    fs::write(cached.path("log"), &old_log).expect("write the first log");
    flush(&cached);
    stall_next_put(&setup, "log.1");
    fs::rename(cached.path("log"), cached.path("log.1")).expect("rename");
    wait_until(
        "the rename's copy to stall",
        Duration::from_secs(30),
        || proxy.log().contains("stalled"),
    );
    cached.crash();

    // The next mount runs the journaled copy, held up again.
    stall_next_put(&setup, "log.1");
    let mount = setup.mount("write-through", Some(cache.path()), &[]);
    wait_until(
        "the journaled copy to stall",
        Duration::from_secs(30),
        || proxy.log().matches("stalled").count() >= 2,
    );
    let (path, bytes) = (mount.path("log"), new_log.clone());
    let writer = std::thread::spawn(move || fs::write(path, bytes));
    // Let the new file's close reach the copy it waits for, then free the copy.
    std::thread::sleep(Duration::from_millis(500));
    proxy.set(FaultRule::pass());
    writer.join().expect("writer").expect("write the new log");
    flush(&mount);

    assert_object(&setup, "log.1", &old_log, &mount);
    assert_object(&setup, "log", &new_log, &mount);
    assert!(fs::read(mount.path("log.1")).expect("read log.1") == old_log);
    mount.unmount();
}
