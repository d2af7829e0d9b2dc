//! Names the bucket cannot store are refused with a clear errno and a log line, and leave
//! nothing behind: not UTF-8 (EINVAL), over 255 bytes or a key over 1,023 bytes
//! (ENAMETOOLONG), the reserved top-level `.bucketgate` (EPERM).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;

use common::{temp_dir, Mount};

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn names_the_bucket_cannot_store_are_refused_and_leave_nothing_behind() {
    let bucket = temp_dir("bad-names");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let mount = Mount::start(&source, "cached", &[], &[]);

    let not_utf8 = mount.mountpoint.join(OsStr::from_bytes(b"caf\xe9.txt"));
    assert_eq!(errno_of(fs::write(&not_utf8, b"x")), Some(libc::EINVAL));
    assert_eq!(errno_of(fs::create_dir(&not_utf8)), Some(libc::EINVAL));

    assert_eq!(
        errno_of(fs::write(mount.path(".bucketgate"), b"x")),
        Some(libc::EPERM)
    );
    assert_eq!(
        errno_of(fs::create_dir(mount.path(".bucketgate"))),
        Some(libc::EPERM)
    );
    fs::write(mount.path("plain"), b"y").expect("a plain file");
    assert_eq!(
        errno_of(fs::rename(mount.path("plain"), mount.path(".bucketgate"))),
        Some(libc::EPERM)
    );
    // Below the top it is an ordinary name.
    fs::create_dir(mount.path("sub")).expect("mkdir sub");
    fs::write(mount.path("sub/.bucketgate"), b"z").expect("nested .bucketgate");

    assert_eq!(
        errno_of(fs::write(mount.path("n".repeat(256)), b"x")),
        Some(libc::ENAMETOOLONG)
    );
    // Five 200-byte directories, then a file whose key would pass 1,023 bytes.
    let mut dir = String::new();
    for i in 0..5 {
        dir.push_str(&format!("{}{}/", i, "d".repeat(199)));
        fs::create_dir(mount.path(&dir)).expect("a deep directory still fits");
    }
    assert_eq!(
        errno_of(fs::write(
            mount.path(format!("{dir}{}", "f".repeat(30))),
            b"x"
        )),
        Some(libc::ENAMETOOLONG)
    );

    let log = mount.log();
    assert!(log.contains("not UTF-8"), "log names the cause");
    assert!(
        log.contains("is reserved for the gateway"),
        "log names the cause"
    );
    assert!(
        log.contains("is over the bucket's 1023"),
        "log names the cause"
    );
    mount.unmount();

    // Only what succeeded reached the bucket.
    let mut names: Vec<String> = fs::read_dir(bucket.path())
        .expect("list bucket")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".bucketgate" || bucket.path().join(n).join("tmp").exists())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ".bucketgate".to_string(),
            format!("0{}", "d".repeat(199)),
            "plain".to_string(),
            "sub".to_string()
        ]
    );
    assert_eq!(
        fs::read(bucket.path().join("sub/.bucketgate")).expect("nested"),
        b"z"
    );
    assert!(!bucket.path().join(".bucketgate/plain").exists());
}
