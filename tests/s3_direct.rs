//! The upload janitor against a moto S3 server on 127.0.0.1: it lists the multipart uploads
//! a crashed writer leaves open (under a prefix, relative to the source prefix) and aborts
//! them; errors name the bucket. Uploads are checked with boto3, not with the janitor.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bucketgate::backend::s3_direct::S3Direct;
use bucketgate::backend::source::{Connection, Source};
use common::{unique_name, Moto, ACCESS_KEY, REGION, SECRET_KEY};

/// A connection to `moto` with its keys in a private credentials file, so the test needs
/// no process-wide environment.
fn connection(moto: &Moto, dir: &Path) -> Connection {
    let creds = dir.join("creds.toml");
    std::fs::write(
        &creds,
        format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
    )
    .expect("writing the credentials file");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the credentials file");
    Connection {
        endpoint: Some(moto.endpoint.clone()),
        region: REGION.to_string(),
        credentials_file: Some(creds),
        request_timeout: Some(Duration::from_secs(30)),
        retries: 1,
    }
}

fn janitor(source: &str, connection: &Connection) -> S3Direct {
    let source = Source::parse(source).expect("parsing the source");
    S3Direct::for_source(&source, connection)
        .expect("building the janitor")
        .expect("an S3 source has a janitor")
}

/// (key, upload id) pairs, sorted.
fn listed(uploads: &[bucketgate::backend::s3_direct::PendingUpload]) -> Vec<(String, String)> {
    let mut pairs: Vec<_> = uploads
        .iter()
        .map(|u| (u.key.clone(), u.upload_id.clone()))
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
async fn lists_and_aborts_uploads_under_a_prefix() {
    let moto = Moto::start();
    let dir = common::temp_dir("janitor");
    let bucket = unique_name("janitor");
    moto.create_bucket(&bucket);
    let a1 = moto.create_multipart_upload(&bucket, "a/one.bin");
    let a2 = moto.create_multipart_upload(&bucket, "a/sub/two.bin");
    moto.create_multipart_upload(&bucket, "b/three.bin");
    assert_eq!(moto.list_multipart_uploads(&bucket), 3);

    let janitor = janitor(&format!("s3://{bucket}"), &connection(&moto, dir.path()));
    let uploads = janitor.list("a/").await.expect("listing under a/");
    let mut expected = vec![
        ("a/one.bin".to_string(), a1),
        ("a/sub/two.bin".to_string(), a2),
    ];
    expected.sort();
    assert_eq!(listed(&uploads), expected);
    // moto (5.2) answers a fixed Initiated, 2010-11-10T20:48:33Z, for every upload; real S3
    // the start time. Either way it must have been parsed, not defaulted.
    let since_2010 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_262_304_000);
    assert!(
        uploads
            .iter()
            .all(|u| u.initiated >= since_2010 && u.initiated <= SystemTime::now()),
        "initiated times parsed: {uploads:?}"
    );

    for upload in &uploads {
        janitor.abort(upload).await.expect("aborting");
    }
    assert_eq!(moto.list_multipart_uploads(&bucket), 1, "only b/ is left");
    assert!(janitor.list("a/").await.expect("relisting").is_empty());
    // Aborting again is not an error: the upload is gone either way.
    janitor.abort(&uploads[0]).await.expect("aborting twice");
    let rest = janitor.list("").await.expect("listing everything");
    assert_eq!(
        rest.iter().map(|u| u.key.as_str()).collect::<Vec<_>>(),
        ["b/three.bin"]
    );
}

#[tokio::test]
async fn keys_are_relative_to_the_source_prefix() {
    let moto = Moto::start();
    let dir = common::temp_dir("janitor");
    let bucket = unique_name("janitor-pfx");
    moto.create_bucket(&bucket);
    let inside = moto.create_multipart_upload(&bucket, "pfx/a/x.bin");
    moto.create_multipart_upload(&bucket, "pfxother/a/y.bin");
    moto.create_multipart_upload(&bucket, "a/z.bin");

    let janitor = janitor(
        &format!("s3://{bucket}/pfx"),
        &connection(&moto, dir.path()),
    );
    let uploads = janitor.list("").await.expect("listing the whole source");
    assert_eq!(listed(&uploads), [("a/x.bin".to_string(), inside)]);
    janitor.abort(&uploads[0]).await.expect("aborting");
    assert_eq!(
        moto.list_multipart_uploads(&bucket),
        2,
        "only pfx/a/x.bin went"
    );
}

#[tokio::test]
async fn a_missing_bucket_is_named_in_the_error() {
    let moto = Moto::start();
    let dir = common::temp_dir("janitor");
    let bucket = unique_name("janitor-missing");
    let janitor = janitor(&format!("s3://{bucket}"), &connection(&moto, dir.path()));
    let err = janitor
        .list("")
        .await
        .expect_err("listing a missing bucket fails")
        .to_string();
    assert!(
        err.contains(&bucket) && err.contains("NoSuchBucket"),
        "{err}"
    );
}

#[test]
fn sources_without_multipart_uploads_have_no_janitor() {
    let connection = Connection::default();
    for source in ["memory://", "/tmp", "oss://bucket/prefix"] {
        let source = Source::parse(source).expect("parsing the source");
        assert!(
            S3Direct::for_source(&source, &connection)
                .expect("no error")
                .is_none(),
            "{source:?}"
        );
    }
}
