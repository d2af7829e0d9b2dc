//! Checks the test harness's S3 side (moto + boto3 helpers) on its own, without the daemon.

mod common;

use common::{unique_name, Moto};

#[test]
fn moto_side_channel_round_trip() {
    let moto = Moto::start();
    assert!(
        moto.endpoint.starts_with("http://127.0.0.1:"),
        "endpoint {}",
        moto.endpoint
    );
    assert_eq!(moto.endpoint, format!("http://127.0.0.1:{}", moto.port));

    let bucket = unique_name("Harness_Selftest");
    assert!(
        bucket.starts_with("harness-selftest-"),
        "bucket name {bucket}"
    );
    moto.create_bucket(&bucket);
    assert!(
        moto.list_keys(&bucket, "").is_empty(),
        "a new bucket is empty"
    );
    assert_eq!(moto.head_object(&bucket, "missing"), None);

    let key = "dir one/file+%.txt";
    let body = b"hello, bucket\n\x00\xff";
    let etag = moto.put_object(&bucket, key, body, &[("mode", "33188"), ("UID", "1000")]);
    assert_eq!(etag, md5_hex(body), "single-part ETag is the body's MD5");

    let head = moto
        .head_object(&bucket, key)
        .expect("object just written must exist");
    assert_eq!(head.size, body.len() as u64);
    assert_eq!(head.etag, etag);
    assert_eq!(head.metadata.get("mode").map(String::as_str), Some("33188"));
    assert_eq!(
        head.metadata.get("uid").map(String::as_str),
        Some("1000"),
        "metadata names come back lowercased"
    );
    assert_eq!(head.metadata.len(), 2, "metadata {:?}", head.metadata);

    assert_eq!(moto.get_object(&bucket, key), body.to_vec());

    moto.put_object(&bucket, "dir one/", b"", &[]);
    moto.put_object(&bucket, "other", b"x", &[]);
    assert_eq!(moto.list_keys(&bucket, ""), vec!["dir one/", key, "other"]);
    assert_eq!(moto.list_keys(&bucket, "dir one/"), vec!["dir one/", key]);

    assert_eq!(moto.list_multipart_uploads(&bucket), 0);

    moto.delete_object(&bucket, key);
    assert_eq!(moto.head_object(&bucket, key), None);
    assert_eq!(moto.list_keys(&bucket, ""), vec!["dir one/", "other"]);
    moto.delete_object(&bucket, key); // deleting a missing key is not an error in S3
}

#[test]
fn unique_names_differ_and_are_valid() {
    let a = unique_name("x");
    let b = unique_name("x");
    assert_ne!(a, b);
    let long = unique_name(&"A".repeat(200));
    for n in [&a, &b, &long] {
        assert!((3..=63).contains(&n.len()), "{n}");
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{n}"
        );
    }
}

#[test]
fn mountinfo_lookup_does_not_match_unmounted_dirs() {
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(!common::is_fuse_mounted(dir.path()));
    assert!(
        !common::is_fuse_mounted(std::path::Path::new("/")),
        "/ is not a fuse mount"
    );
}

/// MD5 computed by python (which the harness needs anyway), so this test does not depend
/// on the crate's own dependencies.
fn md5_hex(body: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir for md5");
    let p = dir.path().join("body");
    std::fs::write(&p, body).expect("writing body for md5");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c")
        .arg("import hashlib,sys; print(hashlib.md5(open(sys.argv[1],'rb').read()).hexdigest())")
        .arg(&p);
    let ran = common::run_bounded(&mut cmd, "python3 md5", std::time::Duration::from_secs(30));
    assert!(ran.status.success(), "python3 md5 failed: {}", ran.stderr);
    String::from_utf8_lossy(&ran.stdout).trim().to_string()
}
