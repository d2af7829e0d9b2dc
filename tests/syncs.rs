//! What a durable close asks of the disk, seen from outside with strace: the metadata
//! store's commits sync with fdatasync(), never fsync(). SQLite's bundled build uses
//! fsync() unless built with HAVE_FDATASYNC (.cargo/config.toml), and fsync() also wrote
//! the log file's inode at every commit.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{temp_dir, wait_bounded, Mount};

/// Calls of each traced syscall in an `strace -c` summary.
fn calls(summary: &str, syscall: &str) -> u64 {
    summary
        .lines()
        .find(|line| line.split_whitespace().last() == Some(syscall))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn cached_closes_sync_with_fdatasync_only() {
    let bucket = temp_dir("syncs-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(&source, "cached", &["--upload-delay", "1h"], &[]);
    let out = temp_dir("syncs-strace");
    let summary_path = out.path().join("summary");
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&summary_path)
        .args(["-p", &mount.pid().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace is needed (apt-get install -y strace)");
    // strace says "Process N attached" for each thread it traces.
    let stderr = strace.stderr.take().expect("strace stderr");
    let (attached_tx, attached) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("attached") && attached_tx.send(()).is_err() {
                return;
            }
        }
    });
    attached
        .recv_timeout(Duration::from_secs(10))
        .expect("strace attached to the daemon within 10 s");
    // The daemon's other threads are attached right after the first.
    std::thread::sleep(Duration::from_millis(200));
    let files = 20;
    let started = Instant::now();
    for i in 0..files {
        fs::write(mount.path(format!("f{i}")), format!("file {i}")).expect("write");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("stopping strace");
    wait_bounded(&mut strace, Duration::from_secs(20)).expect("strace exits");
    let summary = fs::read_to_string(&summary_path).expect("strace summary");
    let fdatasyncs = calls(&summary, "fdatasync");
    assert!(
        fdatasyncs >= 2 * files,
        "each close syncs its data and its commit:\n{summary}"
    );
    assert_eq!(calls(&summary, "fsync"), 0, "fsync() seen:\n{summary}");
    mount.unmount();
}
