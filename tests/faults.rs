//! Backend faults, injected by a proxy (tests/common/fault_proxy.py) between the daemon
//! and moto: throttling and server errors are retried; during an outage cached mode keeps
//! accepting writes, reports the backlog and the last error, and uploads everything once
//! the bucket is back; write-through fails close()
//! with EIO and leaves no partial object and no multipart upload.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::fault::{FaultRule, ProxiedBucket};
use common::posix::{flush, pattern};
use common::{bucketgate, close_checked, vm_hwm_kib};

/// (attempt, pause in seconds) of every retry the daemon logged, e.g. from
/// `attempt=1 retry_in=312.5ms`.
fn logged_retry_pauses(log: &str) -> Vec<(u32, f64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.find(name)? + name.len();
        let rest = &line[start..];
        Some(rest.split_whitespace().next()?.to_string())
    };
    log.lines()
        .filter(|line| line.contains("bucket request failed; retrying"))
        .filter_map(|line| {
            let attempt = field(line, "attempt=")?.parse().ok()?;
            let pause = field(line, "retry_in=")?;
            let seconds = if let Some(ms) = pause.strip_suffix("ms") {
                ms.parse::<f64>().ok()? / 1000.0
            } else {
                pause.strip_suffix('s')?.parse().ok()?
            };
            Some((attempt, seconds))
        })
        .collect()
}

#[test]
fn throttling_and_server_errors_are_retried() {
    let setup = ProxiedBucket::start("faults-retry");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount("cached", None, &["--upload-delay", "0ms"]);
    let data = pattern(700 << 10, 5);
    proxy.set(
        FaultRule::status(503, "SlowDown")
            .count(2)
            .methods(&["PUT"]),
    );
    fs::write(mount.path("a.bin"), &data).expect("write");
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "flush after 503s: {flushed:?}");
    assert_eq!(moto.get_object(bucket, "a.bin"), data);
    let stats = proxy.stats();
    assert!(
        stats.faulted >= 2,
        "the proxy answered 503 twice: {stats:?}"
    );

    // A 500 is an unexpected error, which OpenDAL gives a backtrace (the daemon runs with
    // RUST_BACKTRACE=1). Its retry is logged with the message only: printing the backtrace
    // would load the binary's debug info, ~170 MiB of RSS for the rest of the run.
    proxy.set(
        FaultRule::status(500, "InternalError")
            .count(2)
            .methods(&["PUT"]),
    );
    fs::write(mount.path("d.bin"), &data).expect("write d");
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "flush after 500s: {flushed:?}");
    assert_eq!(moto.get_object(bucket, "d.bin"), data);
    assert!(
        mount.log().contains("bucket request failed; retrying"),
        "retries are logged:\n{}",
        mount.log()
    );
    // A log file gets no terminal colour codes.
    assert!(!mount.log().contains('\u{1b}'), "escape codes in the log");
    // The schedule: retry n after 250 ms x 3^(n-1), plus jitter of up to as much again.
    let pauses = logged_retry_pauses(&mount.log());
    for attempt in [1, 2] {
        assert!(
            pauses.iter().any(|(n, _)| *n == attempt),
            "retry {attempt} logged:\n{}",
            mount.log()
        );
    }
    for (attempt, pause) in pauses {
        let low = 0.25 * 3f64.powi(attempt as i32 - 1);
        assert!(
            (low..2.0 * low).contains(&pause),
            "retry {attempt} after {pause} s, expected {low}-{} s",
            2.0 * low
        );
    }
    let hwm_mib = vm_hwm_kib(mount.pid()) / 1024;
    assert!(hwm_mib < 100, "daemon peak RSS {hwm_mib} MiB after retries");

    proxy.set(FaultRule::reset().count(1).methods(&["PUT"]));
    fs::write(mount.path("b.bin"), &data).expect("write b");
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "flush after a reset: {flushed:?}");
    assert_eq!(moto.get_object(bucket, "b.bin"), data);

    // Slow answers (within the request timeout) only cost time.
    proxy.set(FaultRule::slow_ms(400).count(6));
    fs::write(mount.path("c.bin"), &data).expect("write c");
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(
        flushed.status.success(),
        "flush with slow answers: {flushed:?}"
    );
    assert_eq!(moto.get_object(bucket, "c.bin"), data);
    mount.unmount();
}

#[test]
fn a_stalled_request_times_out_and_is_retried() {
    let setup = ProxiedBucket::start("faults-stall");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount("write-through", None, &["--request-timeout", "2s"]);
    proxy.set(FaultRule::stall().count(1).methods(&["PUT"]));
    let data = pattern(100 << 10, 9);
    fs::write(mount.path("s.bin"), &data).expect("write-through close after a stall");
    assert_eq!(moto.get_object(bucket, "s.bin"), data);
    mount.unmount();
}

#[test]
fn during_an_outage_writes_land_in_the_cache_status_shows_the_backlog_and_all_uploads_after() {
    let setup = ProxiedBucket::start("faults-outage");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount(
        "cached",
        None,
        &[
            "--upload-delay",
            "0ms",
            "--cache-size",
            "4M",
            "--dirty-wait",
            "2s",
            "--retries",
            "1",
        ],
    );
    // Listed before the outage: new names in it need no bucket round trip.
    fs::read_dir(&mount.mountpoint)
        .expect("list the root")
        .for_each(drop);
    proxy.set(FaultRule::down());
    let files: Vec<Vec<u8>> = (0..3).map(|i| pattern(1 << 20, i as u8)).collect();
    for (i, data) in files.iter().enumerate() {
        fs::write(mount.path(format!("f{i}")), data).expect("writes land in the cache");
    }
    // The backlog and the cause show in status.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = mount.status_json();
        let has_error = status["last_errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty());
        if has_error || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status["pending"].as_u64().unwrap_or(0) >= 3, "{status}");
    assert!(
        status["last_errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "status names the last error: {status}"
    );
    proxy.set(FaultRule::pass());
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(180));
    assert!(
        flushed.status.success(),
        "flush after the outage: {flushed:?}"
    );
    for (i, data) in files.iter().enumerate() {
        assert_eq!(&moto.get_object(bucket, &format!("f{i}")), data, "f{i}");
    }
    mount.unmount();
}

#[test]
fn write_through_close_fails_with_eio_and_leaves_nothing_when_retries_run_out() {
    let setup = ProxiedBucket::start("faults-wt");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount(
        "write-through",
        None,
        &["--part-size", "5M", "--retries", "1"],
    );
    // Every UploadPart fails: the stream cannot complete.
    proxy.set(FaultRule::status(500, "InternalError").query_contains("partNumber="));
    let data = pattern(12 << 20, 3);
    let mut file = fs::File::create(mount.path("big.bin")).expect("create");
    // Parts go up in the background: the failure may show at a write or at close.
    let err = std::io::Write::write_all(&mut file, &data)
        .and_then(|()| close_checked(file))
        .expect_err("the object cannot be completed");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        moto.head_object(bucket, "big.bin").is_none(),
        "no partial object"
    );
    assert!(mount.log().contains("big.bin"), "the log names the object");
    // The bytes were kept: once the bucket works again they arrive whole, and no
    // multipart upload is left over from the failed attempts.
    proxy.set(FaultRule::pass());
    mount.unmount();
    assert_eq!(moto.get_object(bucket, "big.bin"), data);
    assert_eq!(moto.list_multipart_uploads(bucket), 0, "parts aborted");
}

/// Write-through: a rename and an unlink the bucket refuses return `EIO`, but they stand
/// locally (journaled): the mount shows them at once, not the kernel's old entries, and
/// the bucket gets them once it is back.
#[test]
fn a_write_through_rename_the_bucket_refuses_fails_with_eio_and_lands_once_it_is_back() {
    let setup = ProxiedBucket::start("faults-wt-rename");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let mount = setup.mount("write-through", None, &["--retries", "0"]);
    fs::write(mount.path("a"), b"first").expect("write a");
    fs::write(mount.path("gone"), b"x").expect("write gone");
    // The kernel caches both entries for a second from here.
    fs::metadata(mount.path("a")).expect("stat a");
    fs::metadata(mount.path("gone")).expect("stat gone");
    proxy.set(FaultRule::status(500, "InternalError"));

    let err = fs::rename(mount.path("a"), mount.path("b")).expect_err("the bucket is down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = fs::remove_file(mount.path("gone")).expect_err("the bucket is down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Well within the kernel's entry TTL: only the invalidation makes the old names go.
    let deadline = Instant::now() + Duration::from_millis(600);
    let shows_the_changes = || {
        // (Reading `b` needs the bucket: write-through keeps no data.)
        !mount.path("a").exists() && !mount.path("gone").exists() && mount.path("b").exists()
    };
    while !shows_the_changes() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(shows_the_changes(), "the mount still shows the old names");

    proxy.set(FaultRule::pass());
    flush(&mount);
    assert_eq!(moto.get_object(bucket, "b"), b"first");
    assert!(
        moto.head_object(bucket, "a").is_none(),
        "the old key is deleted"
    );
    assert!(
        moto.head_object(bucket, "gone").is_none(),
        "the unlink landed"
    );
    mount.unmount();
}

#[test]
fn umount_with_the_bucket_down_says_what_stays_journaled_and_the_next_mount_uploads_it() {
    let setup = ProxiedBucket::start("faults-umount");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let cache = common::temp_dir("faults-umount-cache");
    let extra = ["--flush-timeout", "3s", "--retries", "1"];
    let mount = setup.mount("cached", Some(cache.path()), &extra);
    fs::read_dir(&mount.mountpoint)
        .expect("list the root")
        .for_each(drop);
    proxy.set(FaultRule::down());
    let data = pattern(300 << 10, 21);
    fs::write(mount.path("late.bin"), &data).expect("lands in the cache");
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let started = std::time::Instant::now();
    let ran = bucketgate(&["umount", &mnt], Duration::from_secs(60));
    assert!(!ran.status.success(), "umount must report unflushed data");
    assert!(
        ran.stderr.contains("upload at the next mount"),
        "{}",
        ran.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(30), "bounded wait");
    mount.wait_exit(Duration::from_secs(30));
    assert!(moto.head_object(bucket, "late.bin").is_none());

    proxy.set(FaultRule::pass());
    let again = setup.mount("cached", Some(cache.path()), &[]);
    let flushed = bucketgate(
        &["flush", again.mountpoint.to_str().expect("utf-8")],
        Duration::from_secs(120),
    );
    assert!(flushed.status.success(), "{flushed:?}");
    assert_eq!(moto.get_object(bucket, "late.bin"), data);
    again.unmount();
}

/// Every regular file under `dir` cut to nothing, as a power loss may leave files that were
/// never fsync'd. Bounded by the directory's size.
fn lose_unsynced_files(dir: &std::path::Path) -> usize {
    let mut cut = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read cache dir").flatten() {
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                fs::File::options()
                    .write(true)
                    .open(entry.path())
                    .and_then(|file| file.set_len(0))
                    .expect("truncate a cache file");
                cut += 1;
            }
        }
    }
    cut
}

#[test]
fn a_write_through_object_stored_before_its_record_is_the_file_after_a_crash() {
    let setup = ProxiedBucket::start("faults-wt-record");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let cache = common::temp_dir("faults-wt-record-cache");
    let mut mount = setup.mount("write-through", Some(cache.path()), &[]);
    // The PUT reaches the bucket, its answer never reaches the daemon: the daemon dies
    // after the upload and before its record (which a close commits without a sync, so
    // a power loss after close drops it the same way).
    proxy.set(
        FaultRule::stall()
            .after_forward()
            .methods(&["PUT"])
            .path_contains("doc.bin"),
    );
    let data = pattern(300 << 10, 9);
    let (path, sent) = (mount.path("doc.bin"), data.clone());
    let writer = std::thread::spawn(move || {
        let mut file = fs::File::create(path)?;
        std::io::Write::write_all(&mut file, &sent)?;
        close_checked(file)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while moto.head_object(bucket, "doc.bin").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the PUT did not reach the bucket within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mount.kill_daemon();
    let closed = writer.join().expect("writer thread");
    assert!(closed.is_err(), "close cannot succeed without the daemon");
    mount.crash();
    // The spool was never fsync'd: a power loss may leave nothing of it.
    assert!(
        lose_unsynced_files(&cache.path().join("data")) > 0,
        "a spool file"
    );
    // While the bucket cannot say what the stream left, the mount does not start: the
    // file's queued upload would send the lost spool over the stored object.
    proxy.set(
        FaultRule::status(500, "InternalError")
            .methods(&["HEAD"])
            .path_contains("doc.bin"),
    );
    let mnt = common::temp_dir("faults-wt-record-mnt");
    let mut args = vec![
        "mount".to_string(),
        format!("s3://{bucket}"),
        mnt.path().to_string_lossy().into_owned(),
        "--mode".into(),
        "write-through".into(),
        "--cache-dir".into(),
        cache.path().to_string_lossy().into_owned(),
        "--retries".into(),
        "1".into(),
        "--foreground".into(),
    ];
    args.extend(proxy.mount_args());
    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_bucketgate"));
    refused.args(&args).envs(common::Moto::env());
    let refused = common::run_bounded(
        &mut refused,
        "mount while HEAD fails",
        Duration::from_secs(60),
    );
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("settling the write-through uploads"),
        "{}",
        refused.stderr
    );
    assert!(
        moto.head_object(bucket, "doc.bin").is_some(),
        "the object stays"
    );
    proxy.set(FaultRule::pass());
    let again = setup.mount("write-through", Some(cache.path()), &[]);
    assert_eq!(
        fs::read(again.path("doc.bin")).expect("read after the crash"),
        data,
        "the object the stream stored is the file"
    );
    assert!(again
        .log()
        .contains("recorded the object a write-through close left unrecorded"));
    again.unmount();
    assert_eq!(
        moto.get_object(bucket, "doc.bin"),
        data,
        "the object was kept, not replaced by the lost spool"
    );
}

/// A write-through read that failed while the bucket was away is answered once the bucket
/// is back: the part whose GET failed is fetched again, not its error served from memory.
#[test]
fn a_write_through_read_that_failed_succeeds_once_the_bucket_is_back() {
    use std::os::unix::fs::FileExt;

    let setup = ProxiedBucket::start("faults-read-again");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let data = pattern(3 << 20, 5);
    moto.put_object(bucket, "r.bin", &data, &[]);
    let mount = setup.mount("write-through", None, &["--retries", "0"]);
    let mut page = vec![0u8; 4096];
    // A first read at 2 MiB is a random reader's; one at 0, on a handle of its own, a
    // sequential reader's (its window starts there).
    for (offset, what) in [(2 << 20, "a random read"), (0, "a sequential read")] {
        let file = fs::File::open(mount.path("r.bin")).expect("open");
        proxy.set(FaultRule::status(500, "InternalError").methods(&["GET"]));
        let err = file
            .read_exact_at(&mut page, offset)
            .expect_err("the bucket answers 500");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}: {err}");
        proxy.set(FaultRule::pass());
        file.read_exact_at(&mut page, offset)
            .unwrap_or_else(|err| panic!("{what} once the bucket is back: {err}"));
        let at = offset as usize;
        assert!(page == data[at..at + 4096], "{what}: the object's bytes");
    }
    mount.unmount();
}
