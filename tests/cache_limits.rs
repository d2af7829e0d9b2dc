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
