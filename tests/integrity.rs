//! crc64 integrity: uploads store the checksum with the object, reads of a whole object
//! check it, an object changed behind the gateway's back is refused (EIO and a log line
//! naming the key), and `bucketgate verify` finds it, through a mount or straight from
//! the bucket.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use bucketgate::integrity::crc64;
use common::posix::pattern;
use common::{bucketgate, temp_dir, xattr, Moto, Mount};

const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Flips one byte of a file in place: the bytes change, the stored checksum does not.
fn corrupt_in_place(path: &Path, offset: u64) {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open object for corruption");
    let mut byte = [0u8; 1];
    use std::io::Read;
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut byte).expect("read byte");
    file.seek(SeekFrom::Start(offset)).expect("seek back");
    file.write_all(&[byte[0] ^ 0x5a]).expect("write byte");
}

fn read_errno(path: &Path) -> Option<i32> {
    fs::read(path).err().and_then(|e| e.raw_os_error())
}

#[test]
fn a_corrupted_object_is_refused_and_reported_by_verify() {
    let bucket = temp_dir("integrity-bucket");
    let source = bucket.path().to_str().expect("utf-8").to_string();
    let small = pattern(3 << 20, 7);
    let big = pattern(12 << 20, 11);
    {
        let mount = Mount::start(&source, "cached", &["--part-size", "5M"], &[]);
        fs::write(mount.path("small.bin"), &small).expect("write small");
        fs::create_dir(mount.path("dir")).expect("mkdir");
        fs::write(mount.path("dir/big.bin"), &big).expect("write big");
        mount.unmount();
    }
    // Both the single-PUT and the multipart object carry the crc64 of their bytes.
    for (key, data) in [("small.bin", &small), ("dir/big.bin", &big)] {
        assert_eq!(
            xattr(&bucket.path().join(key), "bucketgate-crc64"),
            Some(crc64(data).to_string()),
            "stored crc64 of {key}"
        );
    }
    let ok = bucketgate(&["verify", &source], VERIFY_TIMEOUT);
    assert!(ok.status.success(), "verify of a sound bucket: {ok:?}");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("2 ok, 0 mismatched"), "{out}");

    corrupt_in_place(&bucket.path().join("dir/big.bin"), 9 << 20);

    let bad = bucketgate(&["verify", &source], VERIFY_TIMEOUT);
    assert!(
        !bad.status.success(),
        "verify must fail on a corrupted object"
    );
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("1 ok, 1 mismatched"), "{out}");
    assert!(out.contains("MISMATCH dir/big.bin"), "{out}");

    // A fresh cache: the mount reads the object from the bucket and must refuse it.
    let mount = Mount::start(&source, "cached", &[], &[]);
    assert_eq!(
        fs::read(mount.path("small.bin")).expect("sound object"),
        small
    );
    assert_eq!(read_errno(&mount.path("dir/big.bin")), Some(libc::EIO));
    // Still refused on a second read, although most blocks were fetched before.
    assert_eq!(read_errno(&mount.path("dir/big.bin")), Some(libc::EIO));
    let log = mount.log();
    assert!(
        log.contains("dir/big.bin: crc64 mismatch"),
        "the log names the key: {}",
        common::tail(&log, 20)
    );
    // verify through the daemon, limited to a path inside the mount.
    let mnt = mount.mountpoint.to_str().expect("utf-8").to_string();
    let through = bucketgate(&["verify", &mnt, &format!("{mnt}/dir")], VERIFY_TIMEOUT);
    assert!(
        !through.status.success(),
        "verify through the daemon: {through:?}"
    );
    let out = String::from_utf8_lossy(&through.stdout);
    assert!(out.contains("checked 1 objects"), "{out}");
    assert!(out.contains("MISMATCH dir/big.bin"), "{out}");
    // Rewriting the file replaces the bad object.
    fs::write(mount.path("dir/big.bin"), &small).expect("rewrite");
    assert_eq!(
        fs::read(mount.path("dir/big.bin")).expect("rewritten"),
        small
    );
    mount.unmount();
    let ok = bucketgate(&["verify", &source], VERIFY_TIMEOUT);
    assert!(ok.status.success(), "after the rewrite: {ok:?}");
}

#[test]
fn s3_objects_carry_their_crc64_and_write_through_reads_check_it() {
    let moto = Moto::start();
    let bucket = common::unique_name("integrity");
    moto.create_bucket(&bucket);
    let data = pattern(2 << 20, 3);
    {
        let mount = Mount::s3(&moto, &bucket, "cached", &[]);
        fs::write(mount.path("a.bin"), &data).expect("write");
        mount.unmount();
    }
    let head = moto.head_object(&bucket, "a.bin").expect("object a.bin");
    assert_eq!(
        head.metadata.get("bucketgate-crc64"),
        Some(&crc64(&data).to_string()),
        "{head:?}"
    );
    // A write-through stream (multipart) gets its crc64 once complete, in place.
    let streamed = pattern(12 << 20, 8);
    {
        let mount = Mount::s3(&moto, &bucket, "write-through", &["--part-size", "5M"]);
        fs::write(mount.path("streamed.bin"), &streamed).expect("stream");
        mount.unmount();
    }
    let head = moto
        .head_object(&bucket, "streamed.bin")
        .expect("streamed.bin");
    assert_eq!(
        head.metadata.get("bucketgate-crc64"),
        Some(&crc64(&streamed).to_string()),
        "{head:?}"
    );
    assert!(
        head.metadata.contains_key("mode"),
        "attributes kept: {head:?}"
    );
    let mut verify = std::process::Command::new(env!("CARGO_BIN_EXE_bucketgate"));
    verify
        .args(["verify", &format!("s3://{bucket}")])
        .args(moto.mount_args())
        .envs(Moto::env());
    let ran = common::run_bounded(&mut verify, "verify s3", VERIFY_TIMEOUT);
    let out = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{out} {}", ran.stderr);
    assert!(
        out.contains("2 ok, 0 mismatched, 0 without checksum"),
        "{out}"
    );
    // An object whose stored checksum does not match its bytes (written by some other
    // tool that copied the metadata but not the data).
    let wrong = crc64(b"something else").to_string();
    moto.put_object(&bucket, "bad.bin", &data, &[("bucketgate-crc64", &wrong)]);
    let mount = Mount::s3(&moto, &bucket, "write-through", &[]);
    assert_eq!(fs::read(mount.path("a.bin")).expect("sound object"), data);
    assert_eq!(read_errno(&mount.path("bad.bin")), Some(libc::EIO));
    assert!(mount.log().contains("bad.bin: crc64 mismatch"));
    mount.unmount();
}
