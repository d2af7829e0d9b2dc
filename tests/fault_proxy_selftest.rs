//! Checks the fault-injecting proxy (tests/common/fault.rs, fault_proxy.py) on its own:
//! moto behind it, boto3 (no retries) in front of it, no daemon.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault::{FaultProxy, FaultRule};
use common::{run_bounded, temp_dir, unique_name, Moto, LOOPBACK};
use serde_json::{json, Value};

/// Runs a list of S3 ops with boto3 against one endpoint (retries off) and prints one JSON
/// result per op: {"ok": true, ...} or {"ok": false, "kind": exception class, "status",
/// "code" (for S3 errors)}, each with "secs".
const CLIENT_PY: &str = r#"
import json, sys, time
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, read_timeout, ops = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="test", aws_secret_access_key="test",
    config=Config(
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5, read_timeout=read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    ),
)
upload_id = None
results = []
for op in ops:
    op = [upload_id if a == "$upload_id" else a for a in op]
    name, args = op[0], op[1:]
    t = time.monotonic()
    try:
        if name == "put_file":
            bucket, key, src = args
            with open(src, "rb") as f:
                s3.put_object(Bucket=bucket, Key=key, Body=f.read())
            r = {"ok": True}
        elif name == "put":
            bucket, key, text = args
            s3.put_object(Bucket=bucket, Key=key, Body=text.encode())
            r = {"ok": True}
        elif name == "get":
            bucket, key = args[:2]
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            if len(args) > 2:
                with open(args[2], "wb") as f:
                    f.write(body)
            r = {"ok": True, "len": len(body)}
        elif name == "head":
            bucket, key = args
            r = {"ok": True, "len": s3.head_object(Bucket=bucket, Key=key)["ContentLength"]}
        elif name == "create_mpu":
            bucket, key = args
            upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            r = {"ok": True}
        elif name == "upload_part":
            bucket, key, uid, n = args
            s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=int(n), Body=b"p" * 1024)
            r = {"ok": True}
        elif name == "abort_mpu":
            bucket, key, uid = args
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
            r = {"ok": True}
        else:
            raise SystemExit("unknown op " + name)
    except ClientError as e:
        r = {"ok": False, "kind": "ClientError",
             "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
             "code": e.response.get("Error", {}).get("Code")}
    except Exception as e:
        r = {"ok": False, "kind": type(e).__name__, "error": str(e)}
    r["secs"] = time.monotonic() - t
    r["op"] = name
    results.append(r)
print(json.dumps(results))
"#;

/// Run `ops` (JSON array of [op, args...]) with boto3 against `endpoint`; one result each.
fn boto(endpoint: &str, read_timeout_s: f64, ops: Value) -> Vec<Value> {
    let n = ops.as_array().expect("ops is an array").len();
    let what = format!("boto3 client {ops} against {endpoint}");
    let mut no_proxy = std::env::var("NO_PROXY").unwrap_or_default();
    if !no_proxy.is_empty() {
        no_proxy.push(',');
    }
    no_proxy.push_str("127.0.0.1,localhost");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(CLIENT_PY)
        .arg(endpoint)
        .arg(read_timeout_s.to_string())
        .arg(ops.to_string())
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_DEFAULT_PROFILE")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_PROXY", &no_proxy)
        .env("no_proxy", &no_proxy);
    let ran = run_bounded(&mut cmd, &what, Duration::from_secs(60));
    assert!(
        ran.status.success(),
        "{what} failed ({}):\n{}",
        ran.status,
        ran.stderr
    );
    let v: Vec<Value> = serde_json::from_slice(&ran.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: output is not JSON ({e}): {:?}\nstderr:\n{}",
            String::from_utf8_lossy(&ran.stdout),
            ran.stderr
        )
    });
    assert_eq!(v.len(), n, "{what}: one result per op: {v:?}");
    v
}

fn assert_ok(r: &Value, what: &str) {
    assert_eq!(r["ok"], json!(true), "{what}: {r}");
}

fn assert_connection_error(r: &Value, what: &str) {
    assert_eq!(r["ok"], json!(false), "{what} must fail: {r}");
    let kind = r["kind"].as_str().unwrap_or("");
    assert!(
        kind != "ClientError" && !kind.contains("Timeout"),
        "{what}: want a connection error, got {r}"
    );
}

#[test]
fn fault_proxy_injects_faults() {
    let t_start = Instant::now();
    let moto = Moto::start();
    let bucket = unique_name("fault-proxy");
    moto.create_bucket(&bucket);
    let proxy = FaultProxy::start(moto.port);
    assert_eq!(
        proxy.endpoint(),
        format!("http://127.0.0.1:{}", proxy.port())
    );
    let ep = proxy.endpoint();
    let dir = temp_dir("fault-selftest");

    // Pass-through: a 6 MiB object byte-exact both ways, plus a small one for later.
    let big: Vec<u8> = (0..6u64 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = dir.path().join("big.in");
    let dst = dir.path().join("big.out");
    std::fs::write(&src, &big).unwrap();
    let r = boto(
        &ep,
        30.0,
        json!([
            ["put_file", bucket, "big", src.to_str().unwrap()],
            ["get", bucket, "big", dst.to_str().unwrap()],
            ["put", bucket, "small", "hello"],
            ["head", bucket, "big"],
        ]),
    );
    r.iter().for_each(|r| assert_ok(r, "pass-through"));
    let got = std::fs::read(&dst).unwrap();
    assert!(got == big, "GET through the proxy returned different bytes");
    assert_eq!(r[3]["len"], json!(big.len()), "HEAD through the proxy");
    assert_eq!(moto.get_object(&bucket, "big").len(), big.len());
    let s = proxy.stats();
    assert_eq!((s.total, s.forwarded, s.faulted), (4, 4, 0), "{s:#?}");
    assert_eq!(s.by_method.get("PUT"), Some(&2));

    // status 503 SlowDown, twice, then pass again.
    proxy.clear_stats();
    proxy.set(FaultRule::status(503, "SlowDown").count(2));
    let r = boto(
        &ep,
        30.0,
        json!([
            ["get", bucket, "small"],
            ["get", bucket, "small"],
            ["get", bucket, "small"]
        ]),
    );
    for (i, r) in r[..2].iter().enumerate() {
        assert_eq!(
            (&r["status"], &r["code"]),
            (&json!(503), &json!("SlowDown")),
            "request {i}: {r}"
        );
    }
    assert_ok(&r[2], "third GET after count 2");
    assert_eq!(r[2]["len"], json!(5));
    let s = proxy.stats();
    assert_eq!((s.total, s.forwarded, s.faulted), (3, 1, 2), "{s:#?}");
    assert_eq!(s.by_action.get("status"), Some(&2), "{s:#?}");
    assert_eq!(s.rule["action"], json!("pass"), "count exhausted: {s:#?}");
    assert_eq!(s.recent_count("GET", "/small", "status"), 2);

    // reset: a connection error, nothing forwarded.
    proxy.clear_stats();
    proxy.set(FaultRule::reset().count(1));
    let r = boto(
        &ep,
        30.0,
        json!([["get", bucket, "small"], ["get", bucket, "small"]]),
    );
    assert_connection_error(&r[0], "GET under reset");
    assert_ok(&r[1], "GET after the reset");
    let s = proxy.stats();
    assert_eq!((s.total, s.forwarded, s.faulted), (2, 1, 1), "{s:#?}");

    // stall: the client times out; the control side answers meanwhile.
    proxy.clear_stats();
    proxy.set(FaultRule::stall());
    let ep2 = ep.clone();
    let b2 = bucket.clone();
    let stalled = std::thread::spawn(move || boto(&ep2, 2.0, json!([["get", b2, "small"]])));
    proxy.wait_for("the stalled request", Duration::from_secs(15), |s| {
        s.total == 1
    });
    let t = Instant::now();
    let s = proxy.stats();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "control endpoint slow while stalling"
    );
    assert_eq!(s.forwarded, 0, "{s:#?}");
    let r = stalled.join().expect("stalled client thread");
    assert_eq!(r[0]["ok"], json!(false), "{:?}", r[0]);
    assert!(
        r[0]["kind"].as_str().unwrap_or("").contains("Timeout"),
        "want a read timeout: {}",
        r[0]
    );
    assert!(r[0]["secs"].as_f64().unwrap() >= 1.9, "{}", r[0]);
    // The abandoned request is dropped, not forwarded.
    proxy.wait_for("the stall recorded", Duration::from_secs(5), |s| {
        s.recent_count("GET", "/small", "stall") == 1
    });
    proxy.set(FaultRule::pass());
    assert_eq!(proxy.stats().forwarded, 0);

    // down: connections reset at accept; then back up.
    proxy.clear_stats();
    proxy.set(FaultRule::down());
    let r = boto(&ep, 30.0, json!([["get", bucket, "small"]]));
    assert_connection_error(&r[0], "GET while down");
    let s = proxy.stats();
    assert!(s.refused_connections >= 1, "{s:#?}");
    assert_eq!(s.total, 0, "{s:#?}");
    // refuse: nothing listens (ECONNREFUSED), then the same port again.
    proxy.set(FaultRule::refuse());
    let addr = SocketAddr::from((LOOPBACK, proxy.port()));
    let e = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect_err("connect while refusing");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    proxy.set(FaultRule::pass());
    let r = boto(&ep, 30.0, json!([["get", bucket, "small"]]));
    assert_ok(&r[0], "GET after down/refuse");

    // slow: ≥ 0.8 s for the delayed request.
    proxy.set(FaultRule::slow_ms(800).count(1));
    let r = boto(
        &ep,
        30.0,
        json!([["get", bucket, "small"], ["get", bucket, "small"]]),
    );
    assert_ok(&r[0], "slow GET");
    assert_ok(&r[1], "GET after slow");
    let secs = r[0]["secs"].as_f64().unwrap();
    assert!(secs >= 0.8, "slow_ms(800) took only {secs} s");
    assert!(
        r[1]["secs"].as_f64().unwrap() < secs,
        "only the first is slowed: {r:?}"
    );

    // Filters: only UploadPart fails; other requests pass.
    proxy.clear_stats();
    proxy.set(FaultRule::status(500, "InternalError").query_contains("partNumber="));
    let r = boto(
        &ep,
        30.0,
        json!([
            ["create_mpu", bucket, "mp"],
            ["upload_part", bucket, "mp", "$upload_id", "1"],
            ["upload_part", bucket, "mp", "$upload_id", "2"],
            ["put", bucket, "other", "x"],
            ["abort_mpu", bucket, "mp", "$upload_id"],
        ]),
    );
    assert_ok(&r[0], "CreateMultipartUpload");
    for r in &r[1..3] {
        assert_eq!(
            (&r["status"], &r["code"]),
            (&json!(500), &json!("InternalError")),
            "UploadPart: {r}"
        );
    }
    assert_ok(&r[3], "PutObject under a partNumber= filter");
    assert_ok(&r[4], "AbortMultipartUpload under a partNumber= filter");
    let s = proxy.stats();
    assert_eq!((s.total, s.forwarded, s.faulted), (5, 3, 2), "{s:#?}");
    assert_eq!(s.recent_count("PUT", "partNumber=", "status"), 2, "{s:#?}");

    // Method filter + after_forward: the backend stores the object, the client sees 503.
    proxy.set(
        FaultRule::status(503, "SlowDown")
            .methods(&["put"])
            .after_forward()
            .count(1),
    );
    let r = boto(
        &ep,
        30.0,
        json!([["get", bucket, "small"], ["put", bucket, "fwd", "abc"]]),
    );
    assert_ok(&r[0], "GET under a PUT-only rule");
    assert_eq!(r[1]["status"], json!(503), "{}", r[1]);
    assert_eq!(
        moto.head_object(&bucket, "fwd").map(|h| h.size),
        Some(3),
        "after_forward: the backend has the object"
    );

    proxy.reset();
    let s = proxy.stats();
    assert_eq!((s.total, s.rule["action"].clone()), (0, json!("pass")));
    assert!(proxy.log().contains("rule set"), "{}", proxy.log());
    eprintln!("fault proxy self-test took {:?}", t_start.elapsed());
}
