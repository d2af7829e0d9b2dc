//! A fault-injecting HTTP proxy (tests/common/fault_proxy.py) to put between the daemon
//! and moto: pass requests through, or answer with S3 errors, reset connections, stall,
//! slow down, or refuse connections, for all requests or only matching ones, and count
//! what it did so tests can assert that retries really happened.
//!
//! ```ignore
//! let moto = Moto::start();
//! let proxy = FaultProxy::start(moto.port);
//! // point the daemon at proxy.endpoint() (or use proxy.mount_args())
//! proxy.set(FaultRule::status(503, "SlowDown").count(2).query_contains("partNumber="));
//! ...
//! assert_eq!(proxy.stats().faulted, 2);
//! ```
//!
//! The proxy listens on 127.0.0.1 only, and is controlled over its own control port
//! (plain HTTP, JSON), so the control side answers whatever the data side is doing. The
//! protocol is documented at the top of fault_proxy.py. Every wait here is bounded.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::{read_log, tail, temp_dir, wait_bounded, LOOPBACK, REGION};

const FAULT_PROXY_PY: &str = include_str!("fault_proxy.py");
/// How long the proxy may take to print its ports after spawning.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy does with a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Forward unchanged.
    Pass,
    /// Answer `status` with an S3 XML error `code` without forwarding.
    Status {
        status: u16,
        code: String,
        message: Option<String>,
    },
    /// Close the client connection with a TCP RST, no answer.
    Reset,
    /// Never answer (until the client closes, or the rule is changed: then forward).
    Stall,
    /// Forward, then wait `delay_ms` before answering and/or send the body at
    /// `bytes_per_sec`.
    Slow {
        delay_ms: u64,
        bytes_per_sec: Option<u64>,
    },
    /// Refuse connections: RST right after accept (`refuse: false`), or close the
    /// listening socket so connects fail with ECONNREFUSED (`refuse: true`; the port is
    /// listened on again when the rule changes). Open connections are reset too.
    Down { refuse: bool },
}

/// The proxy's current rule: an action plus filters. Build with the constructors and chain
/// the filter methods, e.g.
/// `FaultRule::status(503, "SlowDown").count(3).methods(&["PUT"]).query_contains("partNumber=")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub action: FaultAction,
    /// Apply to the next N matching requests (for `Down`: N refused connections), then
    /// revert to pass. None: until changed.
    pub count: Option<u64>,
    /// HTTP methods to match (any if empty).
    pub methods: Vec<String>,
    pub query_contains: Option<String>,
    pub path_contains: Option<String>,
    /// Status/Reset/Stall: forward to the backend first, then fault the response (the
    /// backend did the work, the client never hears of it).
    pub after_forward: bool,
}

impl FaultRule {
    fn new(action: FaultAction) -> FaultRule {
        FaultRule {
            action,
            count: None,
            methods: Vec::new(),
            query_contains: None,
            path_contains: None,
            after_forward: false,
        }
    }

    /// Forward everything.
    pub fn pass() -> FaultRule {
        Self::new(FaultAction::Pass)
    }

    /// Answer an S3 XML error: e.g. `(503, "SlowDown")`, `(500, "InternalError")`,
    /// `(403, "InvalidAccessKeyId")`.
    pub fn status(status: u16, code: &str) -> FaultRule {
        Self::new(FaultAction::Status {
            status,
            code: code.to_string(),
            message: None,
        })
    }

    pub fn reset() -> FaultRule {
        Self::new(FaultAction::Reset)
    }

    pub fn stall() -> FaultRule {
        Self::new(FaultAction::Stall)
    }

    /// Delay each matching response by `ms` milliseconds.
    pub fn slow_ms(ms: u64) -> FaultRule {
        Self::new(FaultAction::Slow {
            delay_ms: ms,
            bytes_per_sec: None,
        })
    }

    /// Send matching response bodies at `bytes_per_sec`.
    pub fn throttle(bytes_per_sec: u64) -> FaultRule {
        Self::new(FaultAction::Slow {
            delay_ms: 0,
            bytes_per_sec: Some(bytes_per_sec),
        })
    }

    /// New connections are reset right after accept (and open ones reset now).
    pub fn down() -> FaultRule {
        Self::new(FaultAction::Down { refuse: false })
    }

    /// The listening socket is closed: connects fail with ECONNREFUSED.
    pub fn refuse() -> FaultRule {
        Self::new(FaultAction::Down { refuse: true })
    }

    pub fn count(mut self, n: u64) -> FaultRule {
        self.count = Some(n);
        self
    }

    pub fn methods(mut self, methods: &[&str]) -> FaultRule {
        self.methods = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        self
    }

    pub fn query_contains(mut self, s: &str) -> FaultRule {
        self.query_contains = Some(s.to_string());
        self
    }

    pub fn path_contains(mut self, s: &str) -> FaultRule {
        self.path_contains = Some(s.to_string());
        self
    }

    pub fn after_forward(mut self) -> FaultRule {
        self.after_forward = true;
        self
    }

    /// For `Status`: the `<Message>` of the error.
    pub fn message(mut self, m: &str) -> FaultRule {
        if let FaultAction::Status { message, .. } = &mut self.action {
            *message = Some(m.to_string());
        }
        self
    }

    /// For `Slow`: also throttle the body (or, with `throttle`, also delay).
    pub fn bytes_per_sec(mut self, rate: u64) -> FaultRule {
        if let FaultAction::Slow { bytes_per_sec, .. } = &mut self.action {
            *bytes_per_sec = Some(rate);
        }
        self
    }

    pub fn delay_ms(mut self, ms: u64) -> FaultRule {
        if let FaultAction::Slow { delay_ms, .. } = &mut self.action {
            *delay_ms = ms;
        }
        self
    }

    /// The rule as the control endpoint takes it.
    pub fn to_json(&self) -> Value {
        let mut v = match &self.action {
            FaultAction::Pass => json!({"action": "pass"}),
            FaultAction::Status {
                status,
                code,
                message,
            } => {
                let mut v = json!({"action": "status", "status": status, "code": code});
                if let Some(m) = message {
                    v["message"] = json!(m);
                }
                v
            }
            FaultAction::Reset => json!({"action": "reset"}),
            FaultAction::Stall => json!({"action": "stall"}),
            FaultAction::Slow {
                delay_ms,
                bytes_per_sec,
            } => {
                let mut v = json!({"action": "slow", "delay_ms": delay_ms});
                if let Some(r) = bytes_per_sec {
                    v["bytes_per_sec"] = json!(r);
                }
                v
            }
            FaultAction::Down { refuse } => json!({"action": "down", "refuse": refuse}),
        };
        if let Some(n) = self.count {
            v["count"] = json!(n);
        }
        if !self.methods.is_empty() {
            v["methods"] = json!(self.methods);
        }
        if let Some(q) = &self.query_contains {
            v["query_contains"] = json!(q);
        }
        if let Some(p) = &self.path_contains {
            v["path_contains"] = json!(p);
        }
        if self.after_forward {
            v["forward"] = json!(true);
        }
        v
    }
}

/// One request (or refused connection) as the proxy recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestRecord {
    /// Sequence number of the request (None for a connection refused by `down`).
    pub seq: Option<u64>,
    pub method: Option<String>,
    /// Path and query as sent.
    pub target: Option<String>,
    /// `pass`, `status`, `reset`, `stall`, `slow`, `down`, with `+forwarded` for
    /// `after_forward` faults and `+upstream-error` when the backend failed (502).
    pub action: String,
    /// What the client got; None if nothing (reset, stall, refused).
    pub status: Option<u16>,
    pub ms: u64,
    /// Bytes of the request's body.
    #[serde(default)]
    pub body_bytes: u64,
    /// The request's `x-amz-copy-source` (a CopyObject), if any.
    #[serde(default)]
    pub copy_source: Option<String>,
}

/// The proxy's counters since start (or the last `reset`/`clear_stats`).
#[derive(Debug, Clone, Deserialize)]
pub struct FaultStats {
    /// Requests read from clients.
    pub total: u64,
    /// Requests whose response came from the backend.
    pub forwarded: u64,
    /// Requests a rule other than pass applied to.
    pub faulted: u64,
    /// Client connections served.
    pub connections: u64,
    /// Connections reset at accept by `down`.
    pub refused_connections: u64,
    pub by_method: BTreeMap<String, u64>,
    pub by_action: BTreeMap<String, u64>,
    /// The current rule as the proxy has it (with `remaining` when counted).
    pub rule: Value,
    /// The last 50 requests, oldest first.
    pub recent: Vec<RequestRecord>,
}

impl FaultStats {
    /// How many of `recent` have `method` (any if empty) and a target containing
    /// `target_contains`, and an action starting with `action` (any if empty).
    pub fn recent_count(&self, method: &str, target_contains: &str, action: &str) -> usize {
        self.recent
            .iter()
            .filter(|r| method.is_empty() || r.method.as_deref() == Some(method))
            .filter(|r| {
                r.target
                    .as_deref()
                    .is_some_and(|t| t.contains(target_contains))
                    || (target_contains.is_empty() && r.target.is_none())
            })
            .filter(|r| action.is_empty() || r.action.starts_with(action))
            .count()
    }
}

/// A running fault_proxy.py in front of 127.0.0.1:`upstream`, killed (that PID only) on
/// drop.
pub struct FaultProxy {
    port: u16,
    control_port: u16,
    upstream: u16,
    child: Child,
    log_path: PathBuf,
    _dir: TempDir,
}

impl FaultProxy {
    /// Start the proxy in front of 127.0.0.1:`upstream_port`, passing everything, and
    /// wait (at most 20 s) until it listens.
    pub fn start(upstream_port: u16) -> FaultProxy {
        let dir = temp_dir("fault-proxy");
        let script = dir.path().join("fault_proxy.py");
        std::fs::write(&script, FAULT_PROXY_PY).expect("writing fault_proxy.py");
        let log_path = dir.path().join("fault_proxy.log");
        let log = File::create(&log_path).expect("creating fault_proxy.log");
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(&script)
            .arg("--upstream")
            .arg(upstream_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the two port lines on a thread, so the wait for them is bounded.
        let (tx, rx) = mpsc::channel::<Result<(u16, u16), String>>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut next = |want: &str| -> Result<u16, String> {
                let line = lines
                    .next()
                    .ok_or_else(|| format!("stdout ended before the {want} line"))?
                    .map_err(|e| format!("reading stdout: {e}"))?;
                line.strip_prefix(want)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                    .ok_or_else(|| format!("expected `{want}<n>`, got {line:?}"))
            };
            let r = next("PORT ").and_then(|p| next("CONTROL ").map(|c| (p, c)));
            let _ = tx.send(r);
        });
        let fail = |child: &mut Child, why: String| -> ! {
            let _ = child.kill();
            let _ = wait_bounded(child, Duration::from_secs(10));
            panic!(
                "fault proxy did not start: {why}\nlog:\n{}",
                tail(&read_log(&log_path), 40)
            );
        };
        let (port, control_port) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(ports)) => ports,
            Ok(Err(why)) => fail(&mut child, why),
            Err(_) => fail(
                &mut child,
                format!("no ports printed within {START_TIMEOUT:?}"),
            ),
        };
        let p = FaultProxy {
            port,
            control_port,
            upstream: upstream_port,
            child,
            log_path,
            _dir: dir,
        };
        let health = p.control("GET", "/health", None);
        assert_eq!(
            health["ok"],
            json!(true),
            "fault proxy health: {health}\nlog:\n{}",
            p.log()
        );
        p
    }

    /// The proxy's (data) port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn control_port(&self) -> u16 {
        self.control_port
    }

    pub fn upstream_port(&self) -> u16 {
        self.upstream
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Flags that point the daemon at the proxy (like `Moto::mount_args`).
    pub fn mount_args(&self) -> Vec<String> {
        vec![
            "--endpoint".to_string(),
            self.endpoint(),
            "--region".to_string(),
            REGION.to_string(),
        ]
    }

    /// Make `rule` the current rule (replacing any other; releases stalled requests).
    pub fn set(&self, rule: FaultRule) {
        let body = rule.to_json();
        let got = self.control("PUT", "/rule", Some(&body));
        assert_eq!(
            got["action"], body["action"],
            "fault proxy did not take rule {body}: {got}"
        );
    }

    /// The current rule as the proxy has it (`remaining` shows what is left of a count).
    pub fn rule(&self) -> Value {
        self.control("GET", "/rule", None)
    }

    /// Counters and the recent-requests list.
    pub fn stats(&self) -> FaultStats {
        let v = self.control("GET", "/stats", None);
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("fault proxy stats {v} do not parse: {e}"))
    }

    /// Rule back to pass and counters zeroed.
    pub fn reset(&self) {
        self.control("POST", "/reset", None);
    }

    /// Counters zeroed, rule unchanged.
    pub fn clear_stats(&self) {
        self.control("POST", "/clear_stats", None);
    }

    /// Poll `stats()` (every 50 ms, at most `timeout`) until `pred` holds; panics with the
    /// last stats and the log otherwise.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&FaultStats) -> bool,
    ) -> FaultStats {
        let deadline = Instant::now() + timeout;
        let max_polls = timeout.as_millis() / 50 + 1;
        let mut last = self.stats();
        for _ in 0..max_polls {
            if pred(&last) {
                return last;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            last = self.stats();
        }
        panic!(
            "fault proxy: {what} not seen within {timeout:?}; stats: {last:#?}\nlog tail:\n{}",
            tail(&self.log(), 30)
        );
    }

    /// The proxy's log (one line per request, rule changes, errors).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// One control request; the JSON answer. Panics (with the log) on any failure.
    fn control(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        match self.try_control(method, path, body) {
            Ok(v) => v,
            Err(e) => panic!(
                "fault proxy control {method} {path} failed: {e}\nlog tail:\n{}",
                tail(&self.log(), 30)
            ),
        }
    }

    fn try_control(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let addr = SocketAddr::from((LOOPBACK, self.control_port));
        let mut s = TcpStream::connect_timeout(&addr, CONTROL_TIMEOUT)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(CONTROL_TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(CONTROL_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.control_port,
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("sending: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .map_err(|e| format!("reading the answer: {e}"))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, json_text) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP header end in {text:?}"))?;
        let code = head.split_whitespace().nth(1).unwrap_or("");
        if code != "200" {
            return Err(format!("answered {code}: {json_text}"));
        }
        serde_json::from_str(json_text)
            .map_err(|e| format!("answer {json_text:?} is not JSON: {e}"))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if wait_bounded(&mut self.child, Duration::from_secs(10)).is_none() {
            eprintln!(
                "fault proxy pid {} did not exit within 10 s of SIGKILL",
                self.child.id()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "---- fault proxy log ({}), last 40 lines ----\n{}",
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        }
    }
}

/// moto with a bucket, and a fault proxy in front of it: the setup of every fault test.
pub struct ProxiedBucket {
    pub proxy: FaultProxy,
    pub bucket: String,
    pub moto: super::Moto,
}

impl ProxiedBucket {
    pub fn start(name: &str) -> ProxiedBucket {
        let moto = super::Moto::start();
        let bucket = super::unique_name(name);
        moto.create_bucket(&bucket);
        let proxy = FaultProxy::start(moto.port);
        ProxiedBucket {
            proxy,
            bucket,
            moto,
        }
    }

    /// Mounts the bucket through the proxy (a fresh cache unless `cache_dir` is given).
    pub fn mount(
        &self,
        mode: &str,
        cache_dir: Option<&std::path::Path>,
        extra: &[&str],
    ) -> super::Mount {
        super::Mount::s3_via(
            &self.proxy.mount_args(),
            &self.bucket,
            mode,
            cache_dir,
            extra,
        )
    }
}
