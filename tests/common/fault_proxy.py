"""Fault-injecting HTTP/1.1 proxy for the integration tests (wrapped by tests/common/fault.rs).

Usage: python3 fault_proxy.py --upstream PORT [--port PORT] [--control-port PORT]

Python 3.11 standard library only. Listens on 127.0.0.1:PORT (0: any free port) and forwards
every request to 127.0.0.1:UPSTREAM, except where the current fault rule says otherwise.
A separate control server on 127.0.0.1:CONTROL_PORT sets the rule and reports counters, so
the control side keeps answering whatever the data side is doing (stall, down, ...).

Prints exactly two lines on stdout once both listen: `PORT <n>` then `CONTROL <n>`.
Logs one line per request (and anything unusual) to stderr.

Forwarding: each client request (head + whole body; Content-Length or chunked, an
`Expect: 100-continue` is answered with `100 Continue` by the proxy itself and not sent
upstream) is sent upstream with a Content-Length body on an upstream connection owned by the
client connection (opened lazily, reused while both sides keep alive, re-opened once if a
reused one turns out to be closed). The whole response is read (Content-Length, chunked or
until close; none for HEAD, 1xx, 204, 304) and written back with a Content-Length, so the
client connection stays keep-alive unless the client asked otherwise.

Control protocol (HTTP/1.x, one request per connection, JSON bodies):
  GET  /rule         -> the current rule (with "remaining" when it has a count)
  PUT|POST /rule     body: a rule (below) -> the rule as stored
  GET  /stats        -> counters (below)
  POST /reset        -> rule back to pass, counters zeroed
  POST /clear_stats  -> counters zeroed, rule unchanged
  GET  /health       -> {"ok": true}

Rule: {"action": A, ...filters, ...params}
  action "pass"    forward unchanged.
  action "status"  answer without forwarding: "status" (default 503), "code" (default
                   "SlowDown"), "message"; an S3-style XML <Error> body.
  action "reset"   close the client connection abruptly (SO_LINGER 0: RST), no answer.
  action "stall"   never answer: the request is held until the client closes the
                   connection (then dropped, never forwarded) or a control request changes
                   the rule (then it is forwarded as if passed).
  action "slow"    forward, then wait "delay_ms" before answering, and/or send the response
                   body at "bytes_per_sec".
  action "down"    refuse connections: every new connection is closed with RST right after
                   accept, and requests arriving on already open connections are answered
                   with RST. With "refuse": true the listening socket is closed instead
                   (clients get ECONNREFUSED) and re-opened on the same port when the rule
                   changes. Setting "down" also resets every open client connection.
  "forward": true  (status, reset, stall) forward the request upstream first and apply the
                   fault to its response: the backend did the work, the client never hears.
  Filters (all optional; a request must match every one given):
    "methods": ["PUT", ...]   HTTP methods, case-insensitive
    "query_contains": "s"     substring of the query string (after "?")
    "path_contains": "s"      substring of the path (before "?")
    "count": n                apply to the next n matching requests (for "down": n refused
                              connections), then the rule reverts to pass.
  Filters do not apply to connections refused by "down" (there is no request yet).

Stats: {"total", "forwarded", "faulted", "connections", "refused_connections",
        "by_method": {M: n}, "by_action": {A: n}, "rule": {...},
        "recent": [{"seq", "method", "target", "action", "status", "ms", "body_bytes",
                    "copy_source"}]  (last 50)}
  "total" counts requests read from clients (not refused connections); "forwarded" those
  whose response came from upstream (also "slow" and "forward": true faults); "faulted"
  those a rule matched (other than pass). "status" in recent is what the client got (null
  if nothing: reset, stall, dropped).
"""

import argparse
import asyncio
import collections
import json
import socket
import struct
import sys
import time

UPSTREAM_HOST = "127.0.0.1"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
MAX_HEAD = 256 * 1024
RECENT = 50
ACTIONS = ("pass", "status", "reset", "stall", "slow", "down")


def log(msg):
    sys.stderr.write("%s fault_proxy: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class ProtocolError(Exception):
    pass


class ClientGone(Exception):
    pass


class Reader:
    """Buffered reading over an asyncio StreamReader with push-back (via `buf`)."""

    def __init__(self, r):
        self.r = r
        self.buf = bytearray()

    async def fill(self):
        data = await self.r.read(1 << 16)
        if not data:
            raise EOFError
        self.buf += data

    async def readuntil(self, sep, limit):
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise ProtocolError("header section longer than %d bytes" % limit)
            start = max(0, len(self.buf) - len(sep) + 1)
            await self.fill()

    async def readexactly(self, n):
        if len(self.buf) >= n:
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out
        head = bytes(self.buf)
        self.buf.clear()
        try:
            rest = await self.r.readexactly(n - len(head))
        except asyncio.IncompleteReadError as e:
            raise EOFError from e
        return head + rest

    async def readall(self):
        parts = [bytes(self.buf)]
        self.buf.clear()
        while True:
            data = await self.r.read(1 << 20)
            if not data:
                return b"".join(parts)
            parts.append(data)


def parse_head(raw):
    """(first line parts, [(name, value)]) from a header block ending in CRLFCRLF."""
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    first = lines[0]
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError("bad header line %r" % line)
        headers.append((name.strip(), value.strip()))
    return first, headers


def header(headers, name):
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def has_token(headers, name, token):
    token = token.lower()
    for k, v in headers:
        if k.lower() == name.lower():
            if token in (t.strip().lower() for t in v.split(",")):
                return True
    return False


async def read_body(rd, headers, until_close=False):
    """The message body per RFC 9112 framing; chunked is decoded (trailers dropped)."""
    if has_token(headers, "transfer-encoding", "chunked"):
        parts = []
        while True:
            line = await rd.readuntil(b"\r\n", 64 * 1024)
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError as e:
                raise ProtocolError("bad chunk size %r" % line) from e
            if size == 0:
                while True:  # trailers until an empty line
                    t = await rd.readuntil(b"\r\n", MAX_HEAD)
                    if t == b"\r\n":
                        return b"".join(parts)
            parts.append(await rd.readexactly(size))
            if await rd.readexactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
    cl = header(headers, "content-length")
    if cl is not None:
        try:
            n = int(cl.split(",")[0].strip())
        except ValueError as e:
            raise ProtocolError("bad Content-Length %r" % cl) from e
        return await rd.readexactly(n) if n else b""
    if until_close:
        return await rd.readall()
    return b""


def set_rst(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def abort_rst(writer):
    set_rst(writer)
    writer.transport.abort()


class Rule:
    def __init__(self, spec=None):
        spec = dict(spec or {"action": "pass"})
        self.spec = spec
        self.action = spec.get("action", "pass")
        if self.action not in ACTIONS:
            raise ValueError("unknown action %r (want one of %s)" % (self.action, ", ".join(ACTIONS)))
        self.count = spec.get("count")
        if self.count is not None:
            self.count = int(self.count)
            if self.count < 0:
                raise ValueError("count must be >= 0")
        self.methods = [m.upper() for m in spec.get("methods") or []]
        self.query_contains = spec.get("query_contains")
        self.path_contains = spec.get("path_contains")
        self.forward = bool(spec.get("forward", False))
        self.status = int(spec.get("status", 503))
        self.code = spec.get("code", "SlowDown")
        self.message = spec.get("message", "Injected by fault_proxy")
        self.delay_ms = int(spec.get("delay_ms", 0))
        self.bytes_per_sec = spec.get("bytes_per_sec")
        if self.bytes_per_sec is not None:
            self.bytes_per_sec = int(self.bytes_per_sec)
            if self.bytes_per_sec <= 0:
                raise ValueError("bytes_per_sec must be > 0")
        self.refuse = bool(spec.get("refuse", False))

    def describe(self):
        d = dict(self.spec)
        d["action"] = self.action
        if self.count is not None:
            d["remaining"] = self.count
        return d

    def matches(self, method, path, query):
        if self.action == "pass":
            return False
        if self.count is not None and self.count <= 0:
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        if self.query_contains is not None and self.query_contains not in query:
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        return True


class Proxy:
    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.rule = Rule()
        self.changed = asyncio.Event()  # set (and replaced) on every control change
        self.clients = set()
        self.server = None
        self.port = None
        self.seq = 0
        self.clear_stats()

    # ---- state -------------------------------------------------------------------

    def clear_stats(self):
        self.total = 0
        self.forwarded = 0
        self.faulted = 0
        self.connections = 0
        self.refused = 0
        self.by_method = collections.Counter()
        self.by_action = collections.Counter()
        self.recent = collections.deque(maxlen=RECENT)

    def stats(self):
        return {
            "total": self.total,
            "forwarded": self.forwarded,
            "faulted": self.faulted,
            "connections": self.connections,
            "refused_connections": self.refused,
            "by_method": dict(self.by_method),
            "by_action": dict(self.by_action),
            "rule": self.rule.describe(),
            "recent": list(self.recent),
        }

    async def set_rule(self, rule):
        self.rule = rule
        self.changed.set()
        self.changed = asyncio.Event()
        log("rule set: %s" % json.dumps(rule.describe()))
        if rule.action == "down":
            for w in list(self.clients):
                abort_rst(w)
            self.clients.clear()
            if rule.refuse and self.server is not None:
                self.server.close()
                self.server = None
                log("listener on port %d closed (down, refuse)" % self.port)
        if self.server is None and not (rule.action == "down" and rule.refuse):
            await self.listen()

    def take(self, method, path, query):
        """The rule if it applies to this request (consuming one of its count), else None."""
        r = self.rule
        if not r.matches(method, path, query):
            return None
        if r.count is not None:
            r.count -= 1
            if r.count == 0:
                log("rule count exhausted; back to pass")
                self.rule = Rule()
        return r

    def record(self, seq, method, target, action, status, t0, req=None):
        body_bytes, copy_source = req if req else (0, None)
        entry = {
            "seq": seq,
            "method": method,
            "target": target,
            "action": action,
            "status": status,
            "ms": int((time.monotonic() - t0) * 1000),
            "body_bytes": body_bytes,
            "copy_source": copy_source,
        }
        self.recent.append(entry)
        self.by_action[action] += 1
        log("#%d %s %s -> %s %s (%d ms)" % (seq, method, target, action, status, entry["ms"]))

    # ---- listening ---------------------------------------------------------------

    async def listen(self):
        last = None
        for _ in range(50):  # re-binding a port we just closed: bounded retries
            try:
                self.server = await asyncio.start_server(
                    self.on_client,
                    "127.0.0.1",
                    self.port or 0,
                    reuse_address=True,
                    limit=1 << 20,
                )
                self.port = self.server.sockets[0].getsockname()[1]
                return
            except OSError as e:
                last = e
                await asyncio.sleep(0.1)
        log("could not listen on port %s: %s" % (self.port, last))
        raise last

    # ---- data side ---------------------------------------------------------------

    async def on_client(self, r, w):
        rule = self.rule
        if rule.action == "down":
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    log("rule count exhausted; back to pass")
                    self.rule = Rule()
            self.refused += 1
            self.by_action["down"] += 1
            self.recent.append({"seq": None, "method": None, "target": None,
                                "action": "down", "status": None, "ms": 0})
            log("connection refused (down)")
            abort_rst(w)
            return
        self.connections += 1
        self.clients.add(w)
        up = Upstream(self.upstream_port)
        rd = Reader(r)
        try:
            while await self.one_request(rd, w, up):
                pass
        except (EOFError, ConnectionError, ClientGone):
            pass
        except ProtocolError as e:
            log("protocol error from client: %s" % e)
        except Exception as e:  # keep serving other connections whatever happens here
            log("connection handler failed: %r" % e)
        finally:
            self.clients.discard(w)
            up.close()
            if not w.transport.is_closing():
                w.close()

    async def one_request(self, rd, w, up):
        """Serve one request; False when the connection is done."""
        try:
            raw = await rd.readuntil(b"\r\n\r\n", MAX_HEAD)
        except EOFError:
            return False
        first, headers = parse_head(raw)
        parts = first.split(" ")
        if len(parts) != 3:
            raise ProtocolError("bad request line %r" % first)
        method, target, version = parts
        if has_token(headers, "expect", "100-continue") and version == "HTTP/1.1":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
        body = await read_body(rd, headers)
        req = (len(body), header(headers, "x-amz-copy-source"))
        keep = version == "HTTP/1.1" and not has_token(headers, "connection", "close")
        if version == "HTTP/1.0" and has_token(headers, "connection", "keep-alive"):
            keep = True

        t0 = time.monotonic()
        self.seq += 1
        seq = self.seq
        self.total += 1
        self.by_method[method] += 1
        path, _, query = target.partition("?")
        if self.rule.action == "down":
            self.faulted += 1
            self.record(seq, method, target, "down", None, t0, req)
            abort_rst(w)
            raise ClientGone
        rule = self.take(method, path, query)
        action = rule.action if rule else "pass"
        if rule:
            self.faulted += 1

        fwd_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        fwd_headers.append(("Content-Length", str(len(body))))

        if rule and not rule.forward and action == "status":
            resp = error_response(rule, method, target)
            w.write(resp)
            await w.drain()
            self.record(seq, method, target, action, rule.status, t0, req)
            return keep
        if rule and not rule.forward and action == "reset":
            self.record(seq, method, target, action, None, t0, req)
            abort_rst(w)
            raise ClientGone
        if rule and not rule.forward and action == "stall":
            if not await self.stall(rd, seq, method, target):
                self.record(seq, method, target, "stall", None, t0, req)
                raise ClientGone
            log("#%d released by a rule change; forwarding" % seq)

        try:
            status, rheaders, rbody = await up.exchange(method, target, fwd_headers, body)
        except (OSError, EOFError, ProtocolError, asyncio.IncompleteReadError) as e:
            log("#%d upstream failed: %r; answering 502" % (seq, e))
            w.write(simple_error(502, "BadGateway", "fault_proxy: upstream failed: %r" % e, keep))
            await w.drain()
            self.record(seq, method, target, action + "+upstream-error", 502, t0, req)
            return keep
        self.forwarded += 1

        if rule and rule.forward:
            if action == "status":
                w.write(error_response(rule, method, target))
                await w.drain()
                self.record(seq, method, target, action + "+forwarded", rule.status, t0, req)
                return keep
            if action == "reset":
                self.record(seq, method, target, action + "+forwarded", None, t0, req)
                abort_rst(w)
                raise ClientGone
            if action == "stall":
                if not await self.stall(rd, seq, method, target):
                    self.record(seq, method, target, "stall+forwarded", None, t0, req)
                    raise ClientGone

        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        out = [(k, v) for k, v in rheaders if k.lower() not in HOP_BY_HOP]
        if not no_body:
            out = [(k, v) for k, v in out if k.lower() != "content-length"]
            out.append(("Content-Length", str(len(rbody))))
        out.append(("Connection", "keep-alive" if keep else "close"))
        head = "HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Status"))
        head += "".join("%s: %s\r\n" % kv for kv in out) + "\r\n"

        if rule and action == "slow" and rule.delay_ms:
            await asyncio.sleep(rule.delay_ms / 1000.0)
        w.write(head.encode("latin-1"))
        if not no_body:
            if rule and action == "slow" and rule.bytes_per_sec:
                await throttled_write(w, rbody, rule.bytes_per_sec)
            else:
                w.write(rbody)
        await w.drain()
        self.record(seq, method, target, action, status, t0, req)
        return keep

    async def stall(self, rd, seq, method, target):
        """Hold until the client goes (False) or a control change (True)."""
        log("#%d %s %s stalled" % (seq, method, target))
        while True:
            changed = self.changed
            read = asyncio.ensure_future(rd.r.read(1 << 16))
            wait_changed = asyncio.ensure_future(changed.wait())
            done, _ = await asyncio.wait({read, wait_changed}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                wait_changed.cancel()
                try:
                    data = read.result()
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    log("#%d client closed the stalled connection" % seq)
                    return False
                rd.buf += data  # a pipelined request: keep it for later
                continue
            read.cancel()
            try:
                await read
            except asyncio.CancelledError:
                pass
            except (ConnectionError, OSError):
                return False
            if read.done() and not read.cancelled():
                data = read.result()
                if not data:
                    return False
                rd.buf += data
            return True


async def throttled_write(w, body, rate):
    step = max(1, rate // 10)  # ten slices a second
    t0 = time.monotonic()
    sent = 0
    mv = memoryview(body)
    while sent < len(body):
        n = min(step, len(body) - sent)
        w.write(mv[sent:sent + n])
        await w.drain()
        sent += n
        due = t0 + sent / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 304: "Not Modified", 307: "Temporary Redirect",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 412: "Precondition Failed", 416: "Range Not Satisfiable",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def xml_escape(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def error_response(rule, method, target):
    path = target.partition("?")[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>%s</Code><Message>%s</Message><Resource>%s</Resource>"
        "<RequestId>fault-proxy</RequestId></Error>"
        % (xml_escape(rule.code), xml_escape(rule.message), xml_escape(path))
    ).encode()
    head = "HTTP/1.1 %d %s\r\n" % (rule.status, REASONS.get(rule.status, "Status"))
    head += "Content-Type: application/xml\r\nx-amz-request-id: fault-proxy\r\n"
    if rule.status == 503:
        head += "Retry-After: 0\r\n"
    if method == "HEAD":  # no body, as S3 does for HEAD errors
        return (head + "Content-Length: 0\r\n\r\n").encode()
    return (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body


def simple_error(status, code, message, keep):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>'
        % (xml_escape(code), xml_escape(message))
    ).encode()
    head = "HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n" % (
        status, REASONS.get(status, "Status"), len(body), "keep-alive" if keep else "close")
    return head.encode() + body


class Upstream:
    """One client connection's upstream connection, opened lazily and reused."""

    def __init__(self, port):
        self.port = port
        self.r = None
        self.w = None

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None

    async def exchange(self, method, target, headers, body):
        reused = self.w is not None
        try:
            return await self._exchange(method, target, headers, body)
        except (OSError, EOFError) as e:
            self.close()
            if not reused:
                raise
            log("reused upstream connection failed (%r); retrying on a new one" % e)
            return await self._exchange(method, target, headers, body)

    async def _exchange(self, method, target, headers, body):
        if self.w is None:
            r, self.w = await asyncio.wait_for(
                asyncio.open_connection(UPSTREAM_HOST, self.port, limit=1 << 20), 10)
            self.r = Reader(r)
        head = "%s %s HTTP/1.1\r\n" % (method, target)
        head += "".join("%s: %s\r\n" % kv for kv in headers)
        head += "Connection: keep-alive\r\n\r\n"
        self.w.write(head.encode("latin-1"))
        if body:
            self.w.write(body)
        await self.w.drain()
        while True:
            raw = await self.r.readuntil(b"\r\n\r\n", MAX_HEAD)
            first, rheaders = parse_head(raw)
            parts = first.split(" ", 2)
            if len(parts) < 2:
                raise ProtocolError("bad status line %r" % first)
            version, status = parts[0], int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue  # interim response: not passed on
            break
        if method == "HEAD" or status in (204, 304):
            rbody = b""
        else:
            rbody = await read_body(self.r, rheaders, until_close=True)
        upstream_keep = version == "HTTP/1.1" and not has_token(rheaders, "connection", "close")
        framed = (header(rheaders, "content-length") is not None
                  or has_token(rheaders, "transfer-encoding", "chunked")
                  or method == "HEAD" or status in (204, 304))
        if not upstream_keep or not framed:
            self.close()
        return status, rheaders, rbody


# ---- control side ---------------------------------------------------------------------


async def on_control(proxy, r, w):
    rd = Reader(r)
    try:
        raw = await asyncio.wait_for(rd.readuntil(b"\r\n\r\n", MAX_HEAD), 10)
        first, headers = parse_head(raw)
        method, target = first.split(" ")[:2]
        body = await asyncio.wait_for(read_body(rd, headers), 10)
        path = target.partition("?")[0]
        code, out = 200, None
        if path == "/rule" and method == "GET":
            out = proxy.rule.describe()
        elif path == "/rule" and method in ("PUT", "POST"):
            try:
                rule = Rule(json.loads(body or b"{}"))
            except (ValueError, TypeError) as e:
                code, out = 400, {"error": str(e)}
            else:
                await proxy.set_rule(rule)
                out = rule.describe()
        elif path == "/stats" and method == "GET":
            out = proxy.stats()
        elif path == "/reset" and method == "POST":
            proxy.clear_stats()
            await proxy.set_rule(Rule())
            out = proxy.stats()
        elif path == "/clear_stats" and method == "POST":
            proxy.clear_stats()
            out = proxy.stats()
        elif path == "/health":
            out = {"ok": True, "port": proxy.port}
        else:
            code, out = 404, {"error": "no such control endpoint %s %s" % (method, path)}
        data = json.dumps(out).encode()
        w.write(("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 "Connection: close\r\n\r\n" % (code, REASONS.get(code, "Status"), len(data))).encode()
                + data)
        await w.drain()
    except Exception as e:
        log("control request failed: %r" % e)
    finally:
        w.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--control-port", type=int, default=0)
    a = ap.parse_args()
    proxy = Proxy(a.upstream)
    proxy.port = a.port or None
    await proxy.listen()
    control = await asyncio.start_server(
        lambda r, w: on_control(proxy, r, w), "127.0.0.1", a.control_port, reuse_address=True)
    cport = control.sockets[0].getsockname()[1]
    sys.stdout.write("PORT %d\nCONTROL %d\n" % (proxy.port, cport))
    sys.stdout.flush()
    log("listening on 127.0.0.1:%d, control on 127.0.0.1:%d, upstream 127.0.0.1:%d"
        % (proxy.port, cport, a.upstream))
    async with control:
        await control.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
