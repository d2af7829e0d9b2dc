//! The command-line contract: background mounts that return once ready, `status`, two
//! mounts with their own caches, and clear, fast failures.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{force_unmount, is_fuse_mounted, run_bounded, temp_dir, Moto, Mount, Ran};

const BIN: &str = env!("CARGO_BIN_EXE_bucketgate");

fn bucketgate(args: &[&str]) -> Ran {
    common::bucketgate(args, Duration::from_secs(60))
}

/// The daemon's pid, from the line `mount` prints.
fn daemon_pid(ran: &Ran) -> Option<i32> {
    let out = String::from_utf8_lossy(&ran.stdout);
    out.split("pid ")
        .nth(1)?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

/// Ends a background daemon the test started, if it is still there.
struct Daemon {
    pid: Option<i32>,
    mountpoint: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if is_fuse_mounted(&self.mountpoint) {
            force_unmount(&self.mountpoint);
        }
        if let Some(pid) = self.pid {
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                if let Err(err) = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    eprintln!("could not end daemon {pid}: {err}");
                }
            }
        }
    }
}

fn status_json(mountpoint: &Path) -> serde_json::Value {
    let ran = bucketgate(&["status", &mountpoint.to_string_lossy(), "--json"]);
    assert!(ran.status.success(), "status failed: {}", ran.stderr);
    serde_json::from_slice(&ran.stdout).expect("status --json prints JSON")
}

#[test]
fn background_mounts_report_status_keep_separate_caches_and_unmount() {
    let bucket_a = temp_dir("cli-bucket-a");
    let bucket_b = temp_dir("cli-bucket-b");
    let mnt_a = temp_dir("cli-mnt-a");
    let mnt_b = temp_dir("cli-mnt-b");
    let cache_a = temp_dir("cli-cache-a");
    let (mp_a, mp_b) = (
        mnt_a.path().to_string_lossy().into_owned(),
        mnt_b.path().to_string_lossy().into_owned(),
    );

    let ran = bucketgate(&[
        "mount",
        &bucket_a.path().to_string_lossy(),
        &mp_a,
        "--cache-dir",
        &cache_a.path().to_string_lossy(),
    ]);
    let _a = Daemon {
        pid: daemon_pid(&ran),
        mountpoint: mnt_a.path().to_path_buf(),
    };
    assert!(ran.status.success(), "mount a: {}", ran.stderr);
    assert!(
        is_fuse_mounted(mnt_a.path()),
        "mount returned before the mount was ready"
    );

    // The second mount uses the default cache dir, one per mount point.
    let ran = bucketgate(&[
        "mount",
        &bucket_b.path().to_string_lossy(),
        &mp_b,
        "--mode",
        "write-through",
    ]);
    let _b = Daemon {
        pid: daemon_pid(&ran),
        mountpoint: mnt_b.path().to_path_buf(),
    };
    assert!(ran.status.success(), "mount b: {}", ran.stderr);

    std::fs::write(mnt_a.path().join("a.txt"), b"in a").expect("write a");
    std::fs::write(mnt_b.path().join("b.txt"), b"in b").expect("write b");
    let (status_a, status_b) = (status_json(mnt_a.path()), status_json(mnt_b.path()));
    assert_eq!(status_a["mode"], "cached");
    assert_eq!(status_b["mode"], "write-through");
    assert!(
        status_a["cache_limit_bytes"]
            .as_u64()
            .is_some_and(|v| v > 0),
        "{status_a}"
    );
    assert!(
        cache_a.path().join("meta.db").exists(),
        "mount a keeps its metadata in its --cache-dir"
    );
    let default_cache = bucketgate::config::default_cache_dir(mnt_b.path());
    assert!(
        default_cache.join("meta.db").exists(),
        "mount b uses its own default cache {}",
        default_cache.display()
    );
    assert_ne!(default_cache, cache_a.path());

    for mp in [&mp_a, &mp_b] {
        let ran = bucketgate(&["umount", mp]);
        assert!(ran.status.success(), "umount {mp}: {}", ran.stderr);
    }
    assert_eq!(
        std::fs::read(bucket_a.path().join("a.txt")).expect("a in bucket"),
        b"in a"
    );
    assert_eq!(
        std::fs::read(bucket_b.path().join("b.txt")).expect("b in bucket"),
        b"in b"
    );
    assert!(
        !bucketgate(&["status", &mp_a]).status.success(),
        "status of an unmounted point must fail"
    );
    if let Err(err) = std::fs::remove_dir_all(&default_cache) {
        eprintln!("leaving {}: {err}", default_cache.display());
    }
}

#[test]
fn an_unreachable_endpoint_fails_fast_with_the_cause() {
    let mnt = temp_dir("cli-unreachable");
    let cache = temp_dir("cli-unreachable-cache");
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "mount",
        "s3://nowhere",
        &mnt.path().to_string_lossy(),
        "--cache-dir",
        &cache.path().to_string_lossy(),
    ])
    .args(["--endpoint", "http://127.0.0.1:9", "--foreground"])
    .env("AWS_ACCESS_KEY_ID", "test")
    .env("AWS_SECRET_ACCESS_KEY", "test");
    let ran = run_bounded(
        &mut cmd,
        "mount against a closed port",
        Duration::from_secs(60),
    );
    assert!(!ran.status.success());
    assert!(
        ran.stderr.contains("cannot reach s3://nowhere"),
        "{}",
        ran.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(!is_fuse_mounted(mnt.path()));
}

#[test]
fn invalid_options_name_the_offending_key() {
    let mnt = temp_dir("cli-invalid");
    let ran = bucketgate(&[
        "mount",
        "/tmp",
        &mnt.path().to_string_lossy(),
        "--part-size",
        "1M",
        "--foreground",
    ]);
    assert!(!ran.status.success());
    assert!(ran.stderr.contains("part-size"), "{}", ran.stderr);
    let ran = bucketgate(&[
        "mount",
        "/tmp",
        &mnt.path().to_string_lossy(),
        "-o",
        "uid=abc",
        "--foreground",
    ]);
    assert!(!ran.status.success());
    assert!(ran.stderr.contains("uid=`abc`"), "{}", ran.stderr);
    let missing = "/nonexistent/bucketgate-bucket";
    let ran = bucketgate(&[
        "mount",
        missing,
        &mnt.path().to_string_lossy(),
        "--foreground",
    ]);
    assert!(ran.stderr.contains("does not exist"), "{}", ran.stderr);
    assert!(!is_fuse_mounted(mnt.path()));
}

/// `mount --foreground` of `source` against `endpoint` with the given keys.
fn mount_with_keys(source: &str, endpoint: &str, id: &str, secret: &str) -> (Ran, Duration) {
    let mnt = temp_dir("cli-auth");
    let cache = temp_dir("cli-auth-cache");
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "mount",
        source,
        &mnt.path().to_string_lossy(),
        "--cache-dir",
        &cache.path().to_string_lossy(),
        "--endpoint",
        endpoint,
        "--foreground",
    ])
    .env("AWS_ACCESS_KEY_ID", id)
    .env("AWS_SECRET_ACCESS_KEY", secret);
    let ran = run_bounded(&mut cmd, "mount with bad input", Duration::from_secs(60));
    assert!(!is_fuse_mounted(mnt.path()));
    (ran, started.elapsed())
}

#[test]
fn a_missing_bucket_and_wrong_credentials_fail_fast_naming_the_cause() {
    let moto = Moto::start();
    let (ran, took) = mount_with_keys("s3://no-such-bucket-here", &moto.endpoint, "test", "test");
    assert!(!ran.status.success());
    assert!(
        ran.stderr.contains("the bucket does not exist"),
        "{}",
        ran.stderr
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    // moto checks keys and signatures once its free requests are used up.
    let moto = Moto::start_with_auth();
    let bucket = common::unique_name("cli-auth");
    moto.create_bucket(&bucket);
    let (id, _secret) = moto.create_access_key();
    moto.enforce_auth();
    let source = format!("s3://{bucket}");

    let (ran, took) = mount_with_keys(&source, &moto.endpoint, &id, "not-the-secret");
    assert!(!ran.status.success());
    assert!(
        ran.stderr.contains("check the credentials"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("SignatureDoesNotMatch"),
        "{}",
        ran.stderr
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    let (ran, took) = mount_with_keys(&source, &moto.endpoint, "AKIANOSUCHKEY0000000", "x");
    assert!(!ran.status.success());
    assert!(
        ran.stderr.contains("check the credentials"),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains("InvalidAccessKeyId"), "{}", ran.stderr);
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// A process in the mount point for a moment does not make `bucketgate umount` fail: the
/// daemon retries a busy unmount for a few seconds. One that stays gets an error that says
/// what holds the mount and what to do, and the mount keeps working (as with umount(8)):
/// no dead mount is left behind.
#[test]
fn umount_waits_out_a_brief_holder_and_explains_a_lasting_one() {
    let bucket = temp_dir("busy-bucket");
    let source = bucket.path().to_str().expect("utf-8 temp path").to_string();
    let mount = Mount::start(&source, "cached", &[], &[]);
    std::fs::write(mount.path("kept"), b"flushed before exit").expect("write through the mount");
    let mut brief = Command::new("sleep")
        .arg("1")
        .current_dir(&mount.mountpoint)
        .spawn()
        .expect("spawning sleep in the mount point");
    mount.unmount(); // asserts success and a free mount point
    assert!(brief.wait().expect("waiting for sleep").success());
    assert_eq!(
        std::fs::read(bucket.path().join("kept")).expect("object in the bucket"),
        b"flushed before exit"
    );

    let mount = Mount::start(&source, "cached", &[], &[]);
    let mut lasting = Command::new("sleep")
        .arg("60")
        .current_dir(&mount.mountpoint)
        .spawn()
        .expect("spawning sleep in the mount point");
    let mountpoint = mount
        .mountpoint
        .to_str()
        .expect("utf-8 mount point")
        .to_string();
    let ran = bucketgate(&["umount", &mountpoint]);
    lasting.kill().expect("ending the sleep this test started");
    lasting.wait().expect("reaping sleep");
    assert!(
        !ran.status.success(),
        "umount of a busy mount reported success"
    );
    assert!(
        ran.stderr.contains("could not unmount") && ran.stderr.contains("stays mounted"),
        "unclear error: {}",
        ran.stderr
    );
    assert!(mount.is_mounted(), "a refused unmount left no mount");
    std::fs::write(mount.path("after"), b"still served").expect("write after the refusal");
    assert_eq!(
        std::fs::read(mount.path("after")).expect("read after the refusal"),
        b"still served"
    );
    mount.unmount(); // the holder is gone: succeeds, and the daemon exits
    assert_eq!(
        std::fs::read(bucket.path().join("after")).expect("object in the bucket"),
        b"still served"
    );
}

/// SIGTERM (systemd stopping the unit) on a mount a process still writes to: the daemon
/// detaches the mount instead of leaving a dead one, the open file keeps working until it
/// is closed, and what it wrote after the signal is uploaded before the daemon exits.
#[test]
fn sigterm_on_a_busy_mount_detaches_it_and_serves_the_open_file_until_closed() {
    use std::io::Write;
    let bucket = temp_dir("sigterm-bucket");
    let source = bucket.path().to_str().expect("utf-8 temp path").to_string();
    let mount = Mount::start(&source, "cached", &[], &[]);
    let mut open = std::fs::File::create(mount.path("open-at-stop")).expect("create");
    open.write_all(b"before the signal, ")
        .expect("write before");
    let pid = nix::unistd::Pid::from_raw(mount.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while mount.is_mounted() {
        assert!(
            Instant::now() < deadline,
            "the busy mount was not detached within 30 s of SIGTERM\ndaemon log:\n{}",
            mount.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    open.write_all(b"after it")
        .expect("write to the open file after the detach");
    open.sync_all().expect("fsync after the detach");
    drop(open);
    let log_path = mount.log_path.clone();
    mount.wait_exit(Duration::from_secs(60));
    assert_eq!(
        std::fs::read(bucket.path().join("open-at-stop")).expect("object in the bucket"),
        b"before the signal, after it",
        "daemon log:\n{}",
        common::read_log(&log_path)
    );
}
