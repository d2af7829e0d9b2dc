#!/usr/bin/env bash
# Times `bucketgate recover` and measures its peak RSS for buckets of growing size, in
# both key layouts, on a moto S3 server on 127.0.0.1 and on the embedded directory bucket.
#
#   scripts/recover-bench.sh [COUNT...]        (default: 10000 30000 100000)
#
# Objects are created through moto's in-process backend (the server runs in the same
# Python process), which takes seconds for 100,000 objects instead of the minutes that
# 100,000 PUTs would; recover then lists them over HTTP like any S3 client. Each object is
# `dir-NNN/file-NNNNNN.dat` (1,000 files per directory, 64 bytes, s3fs metadata).
# Needs: python3 with moto and boto3, GNU time, a release build (built if missing).
set -euo pipefail

cd "$(dirname "$0")/.."
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(10000 30000 100000)
[ -x target/release/bucketgate ] || cargo build --release
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }
work=$(mktemp -d /tmp/bucketgate-recover-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

python3 - "$work" "${counts[@]}" <<'EOF'
import hashlib, logging, os, re, subprocess, sys, time
import boto3
from moto.server import ThreadedMotoServer
from moto.s3.models import s3_backends

work, counts = sys.argv[1], [int(c) for c in sys.argv[2:]]
binary = os.path.abspath("target/release/bucketgate")
port = 5000 + os.getpid() % 2000
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
backend = s3_backends["123456789012"]["global"]
# No backtraces: symbolizing one loads the debug info and would dominate peak RSS.
env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
           NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", BUCKETGATE_LOG="warn",
           RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
# moto is one Python process: listings beyond 2 only queue behind its interpreter lock, and
# at 100,000 keys (a page costs moto ~0.5 s of CPU, it scans every key) 16 queued pages
# pass OpenDAL's 10 s I/O timeout. Real S3 serves the default 16 in parallel.
S3_PARALLEL = os.environ.get("S3_PARALLEL", "2")
BODY = b"x" * 64

def key(layout, path):
    if layout == "plain":
        return path
    n = int(layout.split(":")[1])
    return hashlib.md5(path.rstrip("/").encode()).hexdigest()[:n] + "/" + path

def paths(count):
    for i in range(count):
        yield f"dir-{i // 1000:03}/file-{i:06}.dat"

def fill_s3(bucket, layout, count):
    s3.create_bucket(Bucket=bucket)
    if layout != "plain":
        backend.put_object(bucket, ".bucketgate/layout", layout.encode())
    for path in paths(count):
        obj = backend.put_object(bucket, key(layout, path), BODY)
        obj.set_metadata({"mode": "33188", "uid": "0", "gid": "0", "mtime": "1600000000"})

def fill_local(root, layout, count):
    os.makedirs(root)
    if layout != "plain":
        os.makedirs(f"{root}/.bucketgate")
        with open(f"{root}/.bucketgate/layout", "w") as f:
            f.write(layout)
    for path in paths(count):
        full = f"{root}/{key(layout, path)}"
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(BODY)

def recover(source, cache, extra):
    cmd = ["/usr/bin/time", "-v", binary, "recover", source, "--cache-dir", cache] + extra
    started = time.monotonic()
    ran = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if ran.returncode != 0:
        sys.exit(f"recover failed:\n{ran.stdout}\n{ran.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", ran.stderr).group(1))
    # The gateway's own work, apart from waiting on the server.
    cpu = sum(float(re.search(rf"{what} time \(seconds\): ([\d.]+)", ran.stderr).group(1))
              for what in ("User", "System"))
    summary = ran.stdout.strip().splitlines()[-1].split(" into ")[0]
    return wall, cpu, rss, summary

print(f"{'bucket':<6} {'layout':<9} {'objects':>8} {'fill s':>7} {'recover s':>10} {'CPU s':>6} {'peak RSS MiB':>13}  summary")
for count in counts:
    for kind in ("s3", "local"):
        for layout in ("plain", "hashed:4"):
            tag = f"{kind}-{layout.replace(':', '')}-{count}"
            started = time.monotonic()
            if kind == "s3":
                bucket = f"bench-{tag}".lower()
                fill_s3(bucket, layout, count)
                source = f"s3://{bucket}"
                extra = ["--endpoint", endpoint, "--parallel", S3_PARALLEL]
            else:
                source, extra = f"{work}/{tag}", []
                fill_local(source, layout, count)
            fill = time.monotonic() - started
            wall, cpu, rss, summary = recover(source, f"{work}/cache-{tag}", extra)
            print(f"{kind:<6} {layout:<9} {count:>8} {fill:>7.1f} {wall:>10.1f} {cpu:>6.1f} {rss / 1024:>13.1f}  {summary}", flush=True)
            if kind == "s3":
                for obj in list(backend.buckets[bucket].keys.keys()):
                    backend.delete_object(bucket, obj)
                s3.delete_bucket(Bucket=bucket)
server.stop()
EOF
