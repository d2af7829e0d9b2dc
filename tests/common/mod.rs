//! Integration-test harness: a real S3-protocol server (moto) on 127.0.0.1, a direct S3
//! side-channel to inspect and change buckets without going through a mount, and real FUSE
//! mounts of the `bucketgate` daemon.
//!
//! Use from a test file with `mod common;`. Every wait here is bounded in time and count;
//! failures panic with a message saying what failed, including the daemon's or moto's log.
//! Nothing here talks to any address but 127.0.0.1.
//!
//! Needs (installed by `.ci/run`): `moto_server` and `boto3` for python3, `fusermount3`, and
//! `/dev/fuse` (root).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod fault;
pub mod posix;

/// The only host anything in the harness talks to.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const REGION: &str = "us-east-1";
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";
/// Where the mount keeps directories' attribute indexes.
pub const ATTR_INDEX_PREFIX: &str = ".bucketgate/attr-index/";

/// How long moto may take to answer after spawning.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a mount may take to show up in /proc/self/mountinfo.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `bucketgate umount` and the daemon's exit after it may take (each).
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one boto3 helper call may take (moto's GETs are slow on big objects).
const HELPER_TIMEOUT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(100);

const S3_HELPER_PY: &str = include_str!("s3_helper.py");

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, valid S3 bucket name starting with a sanitized `prefix`:
/// lowercase letters, digits and `-`, 3..=63 characters.
pub fn unique_name(prefix: &str) -> String {
    let mut p: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    p.truncate(30);
    let p = p.trim_matches('-');
    let p = if p.is_empty() { "t" } else { p };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{p}-{}-{n}-{nanos:x}", std::process::id());
    assert!(
        (3..=63).contains(&name.len()),
        "unique_name produced an invalid bucket name {name:?}"
    );
    name
}

/// A fresh temp dir under the system temp dir, named for the harness.
pub fn temp_dir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bucketgate-test-{what}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a temp dir for {what}: {e}"))
}

/// What a bounded subprocess run produced.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Run `cmd` to completion with stdout/stderr captured (through files, so a chatty child
/// cannot block on a full pipe), killing it and panicking if it takes longer than `timeout`.
/// `what` names the command in failure messages. Does not check the exit status.
pub fn run_bounded(cmd: &mut Command, what: &str, timeout: Duration) -> Ran {
    let mut out =
        tempfile::tempfile().unwrap_or_else(|e| panic!("{what}: temp file for stdout: {e}"));
    let mut err =
        tempfile::tempfile().unwrap_or_else(|e| panic!("{what}: temp file for stderr: {e}"));
    cmd.stdin(Stdio::null())
        .stdout(
            out.try_clone()
                .unwrap_or_else(|e| panic!("{what}: dup stdout file: {e}")),
        )
        .stderr(
            err.try_clone()
                .unwrap_or_else(|e| panic!("{what}: dup stderr file: {e}")),
        );
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: spawning {cmd:?} failed: {e}"));
    let status = match wait_bounded(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = wait_bounded(&mut child, Duration::from_secs(10));
            let stderr = read_back(&mut err);
            panic!(
                "{what}: {cmd:?} did not finish within {timeout:?}; killed it. stderr:\n{stderr}"
            );
        }
    };
    let mut stdout = Vec::new();
    out.seek(SeekFrom::Start(0))
        .and_then(|_| out.read_to_end(&mut stdout))
        .unwrap_or_else(|e| panic!("{what}: reading captured stdout: {e}"));
    let stderr = read_back(&mut err);
    Ran {
        status,
        stdout,
        stderr,
    }
}

fn read_back(f: &mut File) -> String {
    let mut buf = Vec::new();
    let _ = f
        .seek(SeekFrom::Start(0))
        .and_then(|_| f.read_to_end(&mut buf));
    String::from_utf8_lossy(&buf).into_owned()
}

/// Poll `child` until it exits or `timeout` passes (bounded in time and count).
/// Returns None if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let step = Duration::from_millis(20);
    let max_polls = timeout.as_millis() / step.as_millis() + 1;
    let deadline = Instant::now() + timeout;
    for _ in 0..=max_polls {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(step);
    }
    None
}

/// Read a whole log file as text, or say why it could not be read.
pub fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<could not read log {}: {e}>", path.display()),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// `NO_PROXY` value that keeps loopback traffic away from any proxy set in the environment.
fn no_proxy_value() -> String {
    let mut v = std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .unwrap_or_default();
    if !v.is_empty() {
        v.push(',');
    }
    v.push_str("127.0.0.1,localhost");
    v
}

/// A minimal HTTP/1.1 request to 127.0.0.1:`port` with an empty body, unsigned.
/// Returns (status code, response text).
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((LOOPBACK, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status line in {text:?}")))?;
    Ok((code, text))
}

// ---------------------------------------------------------------------------------------
// moto
// ---------------------------------------------------------------------------------------

/// What HEAD of an object says, as boto3 parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    pub size: u64,
    /// User metadata: `x-amz-meta-` stripped, names lowercased (boto3's `Metadata`).
    pub metadata: BTreeMap<String, String>,
    /// ETag without the surrounding quotes.
    pub etag: String,
    pub content_type: Option<String>,
    /// None for STANDARD (servers omit the header for it).
    pub storage_class: Option<String>,
}

/// A moto S3 server on 127.0.0.1, killed (that PID only) on drop. Objects live in its
/// memory: they are gone when it stops.
pub struct Moto {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    child: Child,
    dir: TempDir,
    log_path: PathBuf,
    helper: PathBuf,
}

impl Moto {
    /// Start moto on a free loopback port and wait (at most 30 s) until it answers HTTP.
    pub fn start() -> Moto {
        Self::start_with_env(&[])
    }

    /// Start moto with authentication deferred: set up buckets and keys (with
    /// [`Moto::create_access_key`]), then call [`Moto::enforce_auth`]; from then on it
    /// checks access keys and SigV4 signatures.
    pub fn start_with_auth() -> Moto {
        Self::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "100")])
    }

    /// Uses up moto's free requests until a request signed with a key it does not know
    /// is refused. (Unsigned requests are never checked, and never counted.)
    pub fn enforce_auth(&self) {
        self.helper("enforce_auth", &[]);
    }

    fn start_with_env(env: &[(&str, &str)]) -> Moto {
        let dir = temp_dir("moto");
        let helper = dir.path().join("s3_helper.py");
        std::fs::write(&helper, S3_HELPER_PY).expect("writing s3_helper.py into moto's temp dir");
        // The port is free when probed but could be taken before moto binds it; then moto
        // exits at once and we try another port (a bounded number of times).
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let port = free_port();
            let log_path = dir.path().join(format!("moto-{attempt}.log"));
            let mut child = spawn_moto(port, &log_path, env);
            match wait_moto_ready(&mut child, port) {
                Ok(()) => {
                    return Moto {
                        endpoint: format!("http://127.0.0.1:{port}"),
                        port,
                        child,
                        dir,
                        log_path,
                        helper,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = wait_bounded(&mut child, Duration::from_secs(10));
                    failures.push(format!(
                        "attempt {attempt} on port {port}: {why}\nlog:\n{}",
                        tail(&read_log(&log_path), 40)
                    ));
                }
            }
        }
        panic!("moto_server did not start:\n{}", failures.join("\n----\n"));
    }

    /// moto's own log (requests and tracebacks).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Create `name` (us-east-1). moto accepts unsigned requests, so this is a plain
    /// HTTP PUT: no python start-up cost.
    pub fn create_bucket(&self, name: &str) {
        let (code, text) = http_request(
            self.port,
            "PUT",
            &format!("/{name}"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| {
            panic!(
                "create_bucket({name}): PUT to {} failed: {e}",
                self.endpoint
            )
        });
        assert_eq!(
            code, 200,
            "create_bucket({name}): moto answered {code}:\n{text}"
        );
    }

    /// Flags that point the daemon at this server.
    pub fn mount_args(&self) -> Vec<String> {
        vec![
            "--endpoint".to_string(),
            self.endpoint.clone(),
            "--region".to_string(),
            REGION.to_string(),
        ]
    }

    /// Environment for the daemon: moto's dummy credentials, and nothing that would make an
    /// SDK look for credentials anywhere but the environment.
    pub fn env() -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".to_string(), ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET_KEY.to_string()),
            ("AWS_REGION".to_string(), REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
        ]
    }

    /// Run one s3_helper.py op and parse its JSON output.
    fn helper(&self, op: &str, args: &[&str]) -> serde_json::Value {
        let what = format!("s3 helper {op} {args:?} against {}", self.endpoint);
        let no_config = self.dir.path().join("no-aws-config");
        let no_proxy = no_proxy_value();
        let mut cmd = Command::new("python3");
        cmd.arg(&self.helper)
            .arg(&self.endpoint)
            .arg(op)
            .args(args)
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_DEFAULT_PROFILE")
            .env("AWS_CONFIG_FILE", &no_config)
            .env("AWS_SHARED_CREDENTIALS_FILE", &no_config)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_PROXY", &no_proxy)
            .env("no_proxy", &no_proxy);
        let ran = run_bounded(&mut cmd, &what, HELPER_TIMEOUT);
        assert!(
            ran.status.success(),
            "{what} failed ({}):\n{}\nmoto log tail:\n{}",
            ran.status,
            ran.stderr,
            tail(&self.log(), 20)
        );
        serde_json::from_slice(&ran.stdout).unwrap_or_else(|e| {
            panic!(
                "{what}: stdout is not JSON ({e}): {:?}\nstderr:\n{}",
                String::from_utf8_lossy(&ran.stdout),
                ran.stderr
            )
        })
    }

    /// An IAM user allowed every S3 action, and its access key: `(id, secret)`. Takes three
    /// requests (see [`Moto::start_with_auth`]).
    pub fn create_access_key(&self) -> (String, String) {
        let v = self.helper("create_access_key", &[]);
        let field = |name: &str| {
            v[name]
                .as_str()
                .unwrap_or_else(|| panic!("create_access_key: no {name} in {v}"))
                .to_string()
        };
        (field("id"), field("secret"))
    }

    /// Every key under `prefix` (all pages), in the server's (lexicographic) order, but
    /// the directories' attribute indexes: bookkeeping the mount writes on its own time,
    /// which [`Moto::attr_index_keys`] lists for the tests about them.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = self.all_keys(bucket, prefix);
        keys.retain(|key| !key.starts_with(ATTR_INDEX_PREFIX));
        keys
    }

    /// The keys of the attribute indexes in `bucket`.
    pub fn attr_index_keys(&self, bucket: &str) -> Vec<String> {
        self.all_keys(bucket, ATTR_INDEX_PREFIX)
    }

    fn all_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let v = self.helper("list_keys", &[bucket, prefix]);
        serde_json::from_value(v).expect("list_keys: helper output is not a list of strings")
    }

    /// The whole body of `key`. Panics if it does not exist.
    pub fn get_object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let dest = tempfile::NamedTempFile::new_in(self.dir.path())
            .expect("get_object: creating a temp file for the body");
        let dest_s = dest
            .path()
            .to_str()
            .expect("temp path is UTF-8")
            .to_string();
        self.helper("get_object", &[bucket, key, &dest_s]);
        std::fs::read(dest.path())
            .unwrap_or_else(|e| panic!("get_object({bucket}/{key}): reading downloaded body: {e}"))
    }

    /// HEAD `key`: None if it does not exist.
    pub fn head_object(&self, bucket: &str, key: &str) -> Option<HeadInfo> {
        let v = self.helper("head_object", &[bucket, key]);
        if v.is_null() {
            return None;
        }
        let what = format!("head_object({bucket}/{key}) output {v}");
        Some(HeadInfo {
            size: v["size"]
                .as_u64()
                .unwrap_or_else(|| panic!("{what}: no size")),
            metadata: serde_json::from_value(v["metadata"].clone())
                .unwrap_or_else(|e| panic!("{what}: metadata is not a string map: {e}")),
            etag: v["etag"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no etag"))
                .to_string(),
            content_type: v["content_type"].as_str().map(str::to_string),
            storage_class: v["storage_class"].as_str().map(str::to_string),
        })
    }

    /// PUT `key` with `body` and user metadata (names as given; S3 lowercases them).
    /// Returns the ETag without quotes.
    pub fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: &[u8],
        metadata: &[(&str, &str)],
    ) -> String {
        self.put_object_as(bucket, key, body, metadata, None)
    }

    /// [`Moto::put_object`] with a `Content-Type` (the server's default without one).
    pub fn put_object_as(
        &self,
        bucket: &str,
        key: &str,
        body: &[u8],
        metadata: &[(&str, &str)],
        content_type: Option<&str>,
    ) -> String {
        let mut src = tempfile::NamedTempFile::new_in(self.dir.path())
            .expect("put_object: creating a temp file for the body");
        src.write_all(body)
            .and_then(|_| src.flush())
            .expect("put_object: writing the body to a temp file");
        let src_s = src.path().to_str().expect("temp path is UTF-8").to_string();
        let meta: BTreeMap<&str, &str> = metadata.iter().copied().collect();
        let meta_json = serde_json::to_string(&meta).expect("put_object: encoding metadata");
        let mut args = vec![bucket, key, &src_s, &meta_json];
        args.extend(content_type);
        let v = self.helper("put_object", &args);
        v.as_str()
            .unwrap_or_else(|| {
                panic!("put_object({bucket}/{key}): helper output {v} is not an ETag")
            })
            .to_string()
    }

    /// DELETE `key` (succeeds whether or not it existed).
    pub fn delete_object(&self, bucket: &str, key: &str) {
        self.helper("delete_object", &[bucket, key]);
    }

    /// How many multipart uploads are in progress (all pages).
    pub fn list_multipart_uploads(&self, bucket: &str) -> usize {
        let v = self.helper("list_multipart_uploads", &[bucket]);
        v.as_u64().unwrap_or_else(|| {
            panic!("list_multipart_uploads({bucket}): helper output {v} is not a count")
        }) as usize
    }

    /// Start a multipart upload of `key` with one uploaded part and leave it open.
    /// Returns its upload ID.
    pub fn create_multipart_upload(&self, bucket: &str, key: &str) -> String {
        let v = self.helper("create_multipart_upload", &[bucket, key]);
        v.as_str()
            .unwrap_or_else(|| {
                panic!("create_multipart_upload({bucket}/{key}): helper output {v} is not an upload ID")
            })
            .to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if wait_bounded(&mut self.child, Duration::from_secs(10)).is_none() {
            eprintln!(
                "moto_server pid {} did not exit within 10 s of SIGKILL",
                self.child.id()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "---- moto log ({}), last 40 lines ----\n{}",
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind((LOOPBACK, 0)).expect("binding 127.0.0.1:0 to find a free port");
    l.local_addr()
        .expect("local_addr of the probe listener")
        .port()
}

fn spawn_moto(port: u16, log_path: &Path, env: &[(&str, &str)]) -> Child {
    let log = File::create(log_path)
        .unwrap_or_else(|e| panic!("creating moto log {}: {e}", log_path.display()));
    let log2 = log.try_clone().expect("dup moto log file");
    let port_s = port.to_string();
    let mut cmd = Command::new("moto_server");
    cmd.args(["-H", "127.0.0.1", "-p", &port_s])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    match cmd.spawn() {
        Ok(c) => c,
        // moto installed but its script not on PATH: run the same entry point as a module.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let log = File::options()
                .append(true)
                .open(log_path)
                .expect("reopening moto log");
            let log2 = log.try_clone().expect("dup moto log file");
            Command::new("python3")
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port_s])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .unwrap_or_else(|e2| {
                    panic!("spawning moto: `moto_server` not found ({e}); `python3 -m moto.server` failed: {e2}. Run .ci/run or `pip install 'moto[server]' boto3`.")
                })
        }
        Err(e) => panic!("spawning moto_server: {e}"),
    }
}

fn wait_moto_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + MOTO_START_TIMEOUT;
    let max_polls = MOTO_START_TIMEOUT.as_millis() / POLL.as_millis() + 1;
    let mut last = String::from("never polled");
    for _ in 0..max_polls {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("moto exited early with {status}"));
        }
        match http_request(port, "GET", "/", Duration::from_secs(2)) {
            Ok((200, _)) => return Ok(()),
            Ok((code, text)) => last = format!("GET / answered {code}: {}", tail(&text, 5)),
            Err(e) => last = format!("GET / failed: {e}"),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    Err(format!(
        "not ready within {MOTO_START_TIMEOUT:?}; last: {last}"
    ))
}

// ---------------------------------------------------------------------------------------
// mounts
// ---------------------------------------------------------------------------------------

/// A running `bucketgate mount ... --foreground` child with its mountpoint.
///
/// Layout: one temp dir holding `mnt/` (the mountpoint), `cache/` (unless a cache dir was
/// given) and `daemon.log` (the daemon's stdout and stderr). If the test panics, the temp
/// dir is kept and the log's tail printed, so the failure can be looked at.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    root: Option<TempDir>,
}

impl Mount {
    /// Mount `source` with a fresh cache dir.
    pub fn start(source: &str, mode: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Mount {
        Self::launch(source, mode, None, extra_args, env)
    }

    /// Mount `source` using `cache_dir` (which the caller keeps), so a test can unmount or
    /// crash and mount again on the same cache.
    pub fn start_with_cache(
        source: &str,
        mode: &str,
        cache_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        Self::launch(source, mode, Some(cache_dir), extra_args, env)
    }

    /// Mount `source` with a fresh cache, the daemon started with `(soft, hard)` as its
    /// limit on open files (a shell's `ulimit -n`).
    pub fn start_with_open_files_limit(
        source: &str,
        mode: &str,
        limit: (u64, u64),
        extra_args: &[&str],
    ) -> Mount {
        Self::launch_limited(source, mode, None, extra_args, &[], Some(limit))
    }

    /// Mount bucket `bucket` of `moto` (source `s3://BUCKET`), fresh cache.
    pub fn s3(moto: &Moto, bucket: &str, mode: &str, extra: &[&str]) -> Mount {
        Self::s3_launch(moto, bucket, mode, None, extra)
    }

    /// Mount bucket `bucket` of `moto` on an existing cache dir.
    pub fn s3_with_cache(
        moto: &Moto,
        bucket: &str,
        mode: &str,
        cache_dir: &Path,
        extra: &[&str],
    ) -> Mount {
        Self::s3_launch(moto, bucket, mode, Some(cache_dir), extra)
    }

    fn s3_launch(
        moto: &Moto,
        bucket: &str,
        mode: &str,
        cache_dir: Option<&Path>,
        extra: &[&str],
    ) -> Mount {
        Self::s3_via(&moto.mount_args(), bucket, mode, cache_dir, extra)
    }

    /// Mount bucket `bucket` with moto's keys through `endpoint_args` (`--endpoint URL
    /// --region R`: moto's own, or a proxy's in front of it).
    pub fn s3_via(
        endpoint_args: &[String],
        bucket: &str,
        mode: &str,
        cache_dir: Option<&Path>,
        extra: &[&str],
    ) -> Mount {
        let source = format!("s3://{bucket}");
        let mut args: Vec<&str> = endpoint_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let env_owned = Moto::env();
        let env: Vec<(&str, &str)> = env_owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Self::launch(&source, mode, cache_dir, &args, &env)
    }

    fn launch(
        source: &str,
        mode: &str,
        cache_dir: Option<&Path>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        Self::launch_limited(source, mode, cache_dir, extra_args, env, None)
    }

    fn launch_limited(
        source: &str,
        mode: &str,
        cache_dir: Option<&Path>,
        extra_args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<(u64, u64)>,
    ) -> Mount {
        let root = temp_dir("mount");
        // Canonical paths, so they compare equal to what /proc/self/mountinfo shows.
        let root_path = root
            .path()
            .canonicalize()
            .expect("canonicalizing the mount temp dir");
        let mountpoint = root_path.join("mnt");
        std::fs::create_dir(&mountpoint).expect("creating the mountpoint dir");
        let cache_dir = match cache_dir {
            Some(c) => {
                std::fs::create_dir_all(c)
                    .unwrap_or_else(|e| panic!("creating cache dir {}: {e}", c.display()));
                c.canonicalize()
                    .unwrap_or_else(|e| panic!("canonicalizing cache dir {}: {e}", c.display()))
            }
            None => {
                let c = root_path.join("cache");
                std::fs::create_dir(&c).expect("creating the cache dir");
                c
            }
        };
        let log_path = root_path.join("daemon.log");
        let log = File::create(&log_path).expect("creating daemon.log");
        let log2 = log.try_clone().expect("dup daemon.log");
        let no_proxy = no_proxy_value();

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bucketgate"));
        cmd.arg("mount")
            .arg(source)
            .arg(&mountpoint)
            .arg("--mode")
            .arg(mode)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .arg("--foreground")
            .args(extra_args)
            .env("RUST_BACKTRACE", "1")
            .env("NO_PROXY", &no_proxy)
            .env("no_proxy", &no_proxy)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some((soft, hard)) = open_files {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));

        // From here on, Drop cleans up whatever happens.
        let mut m = Mount {
            mountpoint,
            cache_dir,
            log_path,
            child: Some(child),
            root: Some(root),
        };
        m.wait_mounted(&format!("{cmd:?}"));
        m
    }

    fn wait_mounted(&mut self, cmdline: &str) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let max_polls = MOUNT_TIMEOUT.as_millis() / 50 + 1;
        for _ in 0..max_polls {
            if is_fuse_mounted(&self.mountpoint) {
                return;
            }
            let child = self
                .child
                .as_mut()
                .expect("mount child present while starting");
            match child.try_wait() {
                Ok(Some(status)) => panic!(
                    "bucketgate exited with {status} before {} was mounted\ncommand: {cmdline}\ndaemon log ({}):\n{}",
                    self.mountpoint.display(),
                    self.log_path.display(),
                    self.log()
                ),
                Ok(None) => {}
                Err(e) => panic!("waiting for bucketgate: {e}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not appear as a fuse mount within {MOUNT_TIMEOUT:?}\ncommand: {cmdline}\ndaemon log ({}):\n{}",
            self.mountpoint.display(),
            self.log_path.display(),
            self.log()
        );
    }

    /// `mountpoint/rel`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        assert!(
            rel.is_relative(),
            "Mount::path wants a relative path, got {}",
            rel.display()
        );
        self.mountpoint.join(rel)
    }

    /// The daemon's stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// `bucketgate status MOUNTPOINT --json`, which must succeed.
    pub fn status_json(&self) -> serde_json::Value {
        let mnt = self.mountpoint.to_str().expect("utf-8 mount point");
        let ran = bucketgate(&["status", mnt, "--json"], Duration::from_secs(30));
        assert!(ran.status.success(), "status: {ran:?}");
        serde_json::from_slice(&ran.stdout).expect("status is JSON")
    }

    /// The daemon's PID (e.g. to send it a signal).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the mountpoint is a fuse mount right now.
    pub fn is_mounted(&self) -> bool {
        is_fuse_mounted(&self.mountpoint)
    }

    /// Clean unmount: `bucketgate umount MOUNTPOINT` must exit 0, then the daemon must exit
    /// (with success) and the mount must be gone, each within a bounded time.
    pub fn unmount(mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bucketgate"));
        cmd.arg("umount").arg(&self.mountpoint);
        let what = format!("bucketgate umount {}", self.mountpoint.display());
        let ran = run_bounded(&mut cmd, &what, UNMOUNT_TIMEOUT);
        assert!(
            ran.status.success(),
            "{what} exited with {}\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            ran.status,
            String::from_utf8_lossy(&ran.stdout),
            ran.stderr,
            self.log()
        );
        let mut child = self
            .child
            .take()
            .expect("mount child present before unmount");
        let status = match wait_bounded(&mut child, UNMOUNT_TIMEOUT) {
            Some(s) => s,
            None => {
                // Put it back so Drop force-unmounts and kills it.
                self.child = Some(child);
                panic!(
                    "bucketgate (pid {}) still running {UNMOUNT_TIMEOUT:?} after `{what}` succeeded\ndaemon log:\n{}",
                    self.pid(),
                    self.log()
                );
            }
        };
        assert!(
            status.success(),
            "bucketgate exited with {status} after `{what}`\ndaemon log:\n{}",
            self.log()
        );
        assert!(
            !is_fuse_mounted(&self.mountpoint),
            "{} is still mounted after `{what}` and the daemon's exit",
            self.mountpoint.display()
        );
    }

    /// After an unmount the test ran itself (one expected to report a failure): waits for
    /// the daemon to exit, and checks the mount point is free.
    pub fn wait_exit(mut self, timeout: Duration) {
        let mut child = self.child.take().expect("mount child present");
        if wait_bounded(&mut child, timeout).is_none() {
            self.child = Some(child);
            panic!(
                "bucketgate (pid {}) still running {timeout:?} after unmounting\ndaemon log:\n{}",
                self.pid(),
                self.log()
            );
        }
        assert!(
            !is_fuse_mounted(&self.mountpoint),
            "{} is still mounted after the daemon's exit",
            self.mountpoint.display()
        );
    }

    /// Simulate a crash: SIGKILL the daemon, then detach the dead mount. The cache dir is
    /// left as the daemon left it (use `start_with_cache` to mount on it again). Returns
    /// the dead daemon's log.
    pub fn crash(mut self) -> String {
        self.kill_daemon();
        force_unmount(&self.mountpoint);
        assert!(
            !is_fuse_mounted(&self.mountpoint),
            "{} is still mounted after killing the daemon and a lazy unmount",
            self.mountpoint.display()
        );
        self.log()
    }

    /// SIGKILLs the daemon and leaves its dead mount in place: until `crash` detaches it,
    /// every access fails (ENOTCONN) instead of reaching the empty directory beneath, so a
    /// writer learns the daemon is gone rather than writing to local disk.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if wait_bounded(&mut child, Duration::from_secs(10)).is_none() {
                panic!(
                    "bucketgate pid {} did not die within 10 s of SIGKILL",
                    child.id()
                );
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            force_unmount(&self.mountpoint);
            let _ = child.kill();
            if wait_bounded(&mut child, Duration::from_secs(10)).is_none() {
                eprintln!(
                    "bucketgate pid {} did not exit within 10 s of SIGKILL",
                    child.id()
                );
            }
        }
        if std::thread::panicking() {
            if let Some(root) = self.root.take() {
                let kept = root.keep();
                eprintln!(
                    "---- kept {} for inspection; daemon log ({}), last 80 lines ----\n{}",
                    kept.display(),
                    self.log_path.display(),
                    tail(&read_log(&self.log_path), 80)
                );
            }
        }
        // Otherwise `root` drops here, after the mount is gone, and removes mnt/, cache/
        // and the log.
    }
}

/// Lazily detach whatever is mounted on `mountpoint` (bounded), if anything is.
pub fn force_unmount(mountpoint: &Path) {
    if !is_fuse_mounted(mountpoint) {
        return;
    }
    let ok = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .and_then(|mut c| {
            wait_bounded(&mut c, Duration::from_secs(10)).or_else(|| {
                let _ = c.kill();
                let _ = c.wait();
                None
            })
        })
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok && is_fuse_mounted(mountpoint) {
        // No fusermount3, or it failed: we are root in tests, so umount(8) works too.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether /proc/self/mountinfo lists `mountpoint` (an absolute, canonical path) with a
/// filesystem type of `fuse` or `fuse.*`.
pub fn is_fuse_mounted(mountpoint: &Path) -> bool {
    let info = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(s) => s,
        Err(e) => panic!("reading /proc/self/mountinfo: {e}"),
    };
    let want = mountpoint.as_os_str().to_string_lossy();
    info.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (pre, post) = match (halves.next(), halves.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => return false,
        };
        let mp = match pre.split(' ').nth(4) {
            Some(m) => unescape_mountinfo(m),
            None => return false,
        };
        let fstype = post.split(' ').next().unwrap_or("");
        mp == want && (fstype == "fuse" || fstype.starts_with("fuse."))
    })
}

/// Undo the kernel's octal escapes (`\040` for space etc.) in a mountinfo field.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `user.NAME` extended attribute of a file (the directory bucket keeps object metadata
/// there), or `None`.
pub fn xattr(path: &Path, name: &str) -> Option<String> {
    let mut buf = vec![0u8; 256];
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let c_name = std::ffi::CString::new(format!("user.{name}")).expect("name");
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let len = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}

/// Sets `user.NAME` extended attributes, as the directory bucket keeps object metadata
/// (objects written to it straight, as another tool would).
pub fn set_xattrs(path: &Path, attrs: &[(&str, &str)]) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    for (name, value) in attrs {
        let c_name = std::ffi::CString::new(format!("user.{name}")).expect("name");
        // SAFETY: NUL-terminated strings and a buffer that live across the call.
        let rc = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "setxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Runs the `bucketgate` binary with `args`, bounded to `timeout`.
pub fn bucketgate(args: &[&str], timeout: Duration) -> Ran {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bucketgate"));
    cmd.args(args);
    run_bounded(&mut cmd, &format!("bucketgate {}", args.join(" ")), timeout)
}

/// Closes a file and reports the error close() returned (dropping a File ignores it, and
/// close is where write-through and cached mode report a failed flush).
pub fn close_checked(file: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: we own fd (taken from the File) and close it exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The peak resident set (VmHWM) of process `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}
