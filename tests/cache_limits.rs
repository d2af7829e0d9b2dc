//! Cache limits: far more data than `--cache-size` goes through the mount (writers wait for
//! uploads to make room, dirty data is never evicted), and a cache disk that fills up
//! gives ENOSPC without corrupting anything: clean data is evicted to make room, data
//! already written survives and reaches the bucket.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fault::{FaultRule, ProxiedBucket};
use common::posix::pattern;
use common::{bucketgate, close_checked, run_bounded, temp_dir, Mount};

/// A small tmpfs mounted on a temp dir for the test's lifetime (the full-disk case).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = temp_dir("small-disk");
        let ran = run_bounded(
            Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.path().to_str().expect("utf-8"),
            ]),
            "mount tmpfs",
            Duration::from_secs(20),
        );
        assert!(ran.status.success(), "mounting a tmpfs needs root: {ran:?}");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let ran = run_bounded(
            Command::new("umount").arg(self.dir.path()),
            "umount tmpfs",
            Duration::from_secs(20),
        );
        if !ran.status.success() {
            eprintln!("could not unmount the test tmpfs: {ran:?}");
        }
    }
}

#[test]
fn six_times_the_cache_size_goes_through_a_cached_mount() {
    let bucket = temp_dir("limits-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(
        &source,
        "cached",
        &["--cache-size", "4M", "--upload-delay", "0ms"],
        &[],
    );
    let files: Vec<Vec<u8>> = (0..24).map(|i| pattern(1 << 20, i as u8)).collect();
    for (i, data) in files.iter().enumerate() {
        fs::write(mount.path(format!("f{i:02}")), data).expect("write under back-pressure");
    }
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let status = bucketgate(&["status", &mnt, "--json"], Duration::from_secs(30));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status");
    let used = status["cache_used_bytes"]
        .as_u64()
        .expect("cache_used_bytes");
    assert!(
        used <= 6 << 20,
        "clean data is evicted down to about the limit: {status}"
    );
    for (i, data) in files.iter().enumerate() {
        assert_eq!(
            &fs::read(mount.path(format!("f{i:02}"))).expect("read back"),
            data
        );
    }
    mount.unmount();
    for (i, data) in files.iter().enumerate() {
        assert_eq!(
            &fs::read(bucket.path().join(format!("f{i:02}"))).expect("object"),
            data,
            "f{i:02} in the bucket"
        );
    }
}

#[test]
fn a_full_cache_disk_evicts_clean_data_then_gives_enospc_and_loses_nothing() {
    let disk = SmallDisk::new("12m");
    let setup = ProxiedBucket::start("limits-disk");
    let (moto, bucket, proxy) = (&setup.moto, &setup.bucket, &setup.proxy);
    let cache = disk.path().join("cache");
    let mount = setup.mount(
        "cached",
        Some(&cache),
        &[
            "--upload-delay",
            "0ms",
            "--cache-size",
            "1G",
            "--retries",
            "1",
        ],
    );
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    // Clean data first: uploaded, kept in the cache (the limit is far away).
    let clean: Vec<Vec<u8>> = (0..6).map(|i| pattern(1 << 20, 100 + i as u8)).collect();
    for (i, data) in clean.iter().enumerate() {
        fs::write(mount.path(format!("clean{i}")), data).expect("write clean");
    }
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "{flushed:?}");
    // Then the bucket goes away and dirty data fills the disk.
    proxy.set(FaultRule::down());
    let mut kept = Vec::new();
    let mut enospc = None;
    for i in 0..20 {
        let data = pattern(1 << 20, i as u8);
        let path = mount.path(format!("dirty{i:02}"));
        let result = fs::File::create(&path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &data)?;
            close_checked(f)
        });
        match result {
            Ok(()) => kept.push((path, data)),
            Err(err) => {
                enospc = Some(err);
                break;
            }
        }
    }
    let err = enospc.expect("a 12 MiB disk cannot hold 20 MiB of unsent data");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        kept.len() >= 8,
        "clean data was evicted to make room: only {} files fitted",
        kept.len()
    );
    // Nothing written before is damaged; the bucket comes back and gets all of it.
    for (path, data) in &kept {
        assert_eq!(&fs::read(path).expect("read back"), data);
    }
    proxy.set(FaultRule::pass());
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(180));
    assert!(
        flushed.status.success(),
        "flush after the outage: {flushed:?}"
    );
    for (path, data) in &kept {
        let key = path.file_name().expect("name").to_str().expect("utf-8");
        assert_eq!(&moto.get_object(bucket, key), data, "{key}");
    }
    for (i, data) in clean.iter().enumerate() {
        assert_eq!(
            &fs::read(mount.path(format!("clean{i}"))).expect("refetched"),
            data
        );
    }
    mount.unmount();
}

/// Descriptors process `pid` holds open.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing the daemon's descriptors")
        .count()
}

/// The soft and hard limits on open files of process `pid`.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("reading limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// A backup writes far more files than the daemon may hold open, into a cache that holds
/// only some of them: every file lands, reads back, and the cache stays within its limit.
/// Each cache file used to stay open until evicted: at a soft limit of 1,024 the
/// thousandth file's create failed with EIO.
#[test]
fn a_cached_mount_takes_more_files_than_it_may_hold_open() {
    let bucket = temp_dir("fd-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let files = 1_200;
    let mount = Mount::start_with_open_files_limit(
        &source,
        "cached",
        (256, 256),
        &["--cache-size", "300M", "--upload-delay", "0ms"],
    );
    let pid = mount.pid();
    let content = |i: usize| format!("file {i} ").repeat(1 + i % 50).into_bytes();
    for i in 0..files {
        fs::write(mount.path(format!("f{i:04}")), content(i))
            .unwrap_or_else(|err| panic!("writing f{i:04}: {err}"));
    }
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let flushed = bucketgate(&["flush", &mnt], Duration::from_secs(120));
    assert!(flushed.status.success(), "flush: {flushed:?}");
    let held = open_fds(pid);
    assert!(held < 256, "the daemon holds {held} descriptors");
    let status = bucketgate(&["status", &mnt, "--json"], Duration::from_secs(30));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status");
    let used = status["cache_used_bytes"].as_u64().expect("used bytes");
    assert!(used <= 300 << 20, "over the cache size: {status}");
    let cached = fs::read_dir(mount.cache_dir.join("data"))
        .expect("cache data dir")
        .count();
    assert!(
        cached <= 320,
        "{cached} cache files for 300 MiB (1 MiB blocks) and a spare or two"
    );
    // Read back: the unloaded files load again, the evicted ones come from the bucket.
    for i in (0..files).rev() {
        assert_eq!(
            fs::read(mount.path(format!("f{i:04}"))).expect("read back"),
            content(i),
            "f{i:04} through the mount"
        );
    }
    assert!(open_fds(pid) < 256, "reading them back holds descriptors");
    mount.unmount();
    for i in 0..files {
        assert_eq!(
            fs::read(bucket.path().join(format!("f{i:04}"))).expect("object"),
            content(i),
            "f{i:04} in the bucket"
        );
    }
}

/// A shell's soft limit on open files (often 1,024) is raised to the hard limit.
#[test]
fn the_daemon_raises_its_soft_open_files_limit() {
    let bucket = temp_dir("fd-limit-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start_with_open_files_limit(&source, "cached", (512, 4096), &[]);
    assert_eq!(open_files_limits(mount.pid()), (4096, 4096));
    mount.unmount();
}
