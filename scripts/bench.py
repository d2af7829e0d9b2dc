#!/usr/bin/env python3
"""bucketgate benchmark driver (run through scripts/bench.sh).

Starts an S3-protocol server on 127.0.0.1 (s3rver by default, moto as a fallback), then runs
workloads W1..W8 of issue 5 on every target: a plain local directory, a direct boto3 client
(no FUSE), bucketgate in `cached` and `write-through` mode, and s3fs / rclone mount when
installed. Each figure is the median over --runs runs; every run uses a fresh bucket and
fresh cache directories. Every wait is bounded; only processes started here are stopped,
by PID, and only mount points made here are unmounted.
"""
import argparse, concurrent.futures as cf, io, json, os, platform, random, shutil, signal
import re, statistics, subprocess, sys, tempfile, time, urllib.request

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

MiB = 1 << 20
S3RVER_KEY = ("S3RVER", "S3RVER")
# garage wants "GK" + 24 hex digits and a 64-hex-digit secret
GARAGE_KEY = ("GK" + "0b" * 12, "5e" * 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release", "bucketgate")
T_MOUNT = 30        # seconds a mount may take to become ready
T_BUCKET = 600      # seconds the bucket may take to agree after a workload
POLL = 0.1
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(cmd, timeout=60, **kw):
    return subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- server
class ServerDisk:
    """A journaled ext4 of its own for the server's objects: a sparse image in the work dir on a
    loop device with direct I/O (no second page cache of the image file). This VM's root
    ext4 has no journal, and without one ext4 checks, for every new inode, the deletion
    time of each free inode it passes: one target's cleanup (thousands of files) slowed the
    next target's server-side creates for up to 6 minutes (a quarter of s3rver's samples in
    `recently_deleted` over a rename; see BENCHMARKS.md, tenth session). Needs root."""

    SIZE_GIB = 16  # sparse; a target's objects are freed after its run

    def __init__(self, work):
        self.image = os.path.join(work, "server-disk.img")
        self.path = os.path.join(work, "server-disk")
        self.device = None

    def mount(self):
        """The mount point, or None (said why) when it cannot be made."""
        try:
            with open(self.image, "wb") as f:
                f.truncate(self.SIZE_GIB << 30)
            sh(["mkfs.ext4", "-q", "-F", self.image], timeout=120, check=True)
            self.device = sh(["losetup", "--find", "--show", "--direct-io=on", self.image],
                             check=True).stdout.strip()
            os.makedirs(self.path)
            sh(["mount", self.device, self.path], check=True)
            return self.path
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            log(f"  no filesystem of its own for the server ({detail!r}); its data goes in the work dir")
            self.unmount()
            return None

    def unmount(self):
        if os.path.ismount(self.path) and sh(["umount", self.path], timeout=120).returncode != 0:
            log(f"  could not unmount {self.path}; left it and {self.device} in place")
            return
        if self.device:
            sh(["losetup", "-d", self.device], timeout=60)
            self.device = None
        if os.path.exists(self.image):
            os.unlink(self.image)


class Server:
    """The S3-protocol server of the run, started here and stopped by PID. `access`/`secret`
    are its credentials (each kind wants its own form of key)."""

    def __init__(self, kind, work, s3rver_dir, data_root=None, garage_bin=None):
        self.kind, self.work = kind, work
        self.port = 20000 + os.getpid() % 20000
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(work, f"{kind}.log")
        # moto takes any key
        self.access, self.secret = S3RVER_KEY if kind == "s3rver" else GARAGE_KEY
        data = os.path.join(data_root or work, f"{kind}-data")
        if kind == "s3rver":
            os.makedirs(data)
            js = os.path.join(s3rver_dir, "node_modules", "s3rver", "bin", "s3rver.js")
            cmd = ["node", "--openssl-legacy-provider", js, "-d", data, "-a", "127.0.0.1",
                   "-p", str(self.port), "--no-vhost-buckets"]
        elif kind == "garage":
            self.garage = [garage_bin, "-c", self.garage_config(data)]
            cmd = self.garage + ["server"]
        else:
            cmd = ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_listening()
        if kind == "garage":
            self.garage_setup()
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                     retries={"max_attempts": 3}, max_pool_connections=32,
                     # s3rver stores aws-chunked framing as object bytes: plain payloads only
                     request_checksum_calculation="when_required",
                     response_checksum_validation="when_required")
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id=self.access, aws_secret_access_key=self.secret,
                               config=cfg)

    def wait_listening(self):
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is up
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"{self.kind} did not start; log: {self.log_path}")
                time.sleep(0.2)

    def garage_config(self, data):
        """One node, one copy of each block, no compression (the bench's bytes are random),
        no fsync (s3rver does not sync either): the server's own cost per request and byte."""
        path = os.path.join(self.work, "garage.toml")
        with open(path, "w") as f:
            f.write(f"""metadata_dir = "{data}/meta"
data_dir = "{data}/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{self.port + 1}"
rpc_public_addr = "127.0.0.1:{self.port + 1}"
rpc_secret = "{os.urandom(32).hex()}"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:{self.port}"
root_domain = ".s3.localhost"
""")
        return path

    def garage_setup(self):
        """A fresh garage node serves nothing until it has a layout; then the bench's key,
        allowed to create buckets."""
        node = self.garage_cli("node", "id", "-q").split("@")[0].strip()
        self.garage_cli("layout", "assign", "-z", "dc1", "-c", "100G", node)
        self.garage_cli("layout", "apply", "--version", "1")
        self.garage_cli("key", "import", "--yes", "-n", "bench", self.access, self.secret)
        self.garage_cli("key", "allow", "--create-bucket", self.access)

    def garage_cli(self, *args):
        r = sh(self.garage + list(args), timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"garage {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def request_count(self):
        """Lines of the server log that record a request (s3rver and garage log one each)."""
        pat = {"s3rver": r"info: \S+ \d{3} \d+ms ",
               "garage": r"generic_server: \S+ (\(key \S+\) )?(GET|PUT|POST|DELETE|HEAD) "}.get(self.kind)
        if pat is None:
            return None
        pat = re.compile(pat)
        with open(self.log_path, errors="replace") as f:
            return sum(1 for line in f if pat.search(ANSI.sub("", line)))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # helpers on the bucket
    def count(self, bucket, prefix):
        n, tok = 0, None
        while True:
            kw = dict(Bucket=bucket, Prefix=prefix)
            if tok:
                kw["ContinuationToken"] = tok
            r = self.s3.list_objects_v2(**kw)
            n += sum(1 for o in r.get("Contents", []) if not o["Key"].endswith("/"))
            if not r.get("IsTruncated"):
                return n
            tok = r["NextContinuationToken"]

    def size(self, bucket, key):
        try:
            return self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except Exception:
            return None


def wait_until(pred, what, timeout=T_BUCKET):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


# ---------------------------------------------------------------- targets
class Target:
    """A mount (or a plain directory). `mount()` makes a fresh one on an existing bucket."""
    name = "?"
    fuse = True

    def __init__(self, srv, work, bucket):
        self.srv, self.work, self.bucket = srv, work, bucket
        self.proc, self.mnt, self.n = None, None, 0

    def cmd(self, mnt, cache):
        raise NotImplementedError

    def env(self):
        return dict(os.environ)

    def mount(self):
        self.n += 1
        self.mnt = os.path.join(self.work, f"mnt-{self.name}-{self.n}")
        cache = os.path.join(self.work, f"cache-{self.name}-{self.n}")
        os.makedirs(self.mnt)
        os.makedirs(cache)
        logf = open(os.path.join(self.work, f"{self.name}-{self.n}.log"), "w")
        self.proc = subprocess.Popen(self.cmd(self.mnt, cache), env=self.env(), stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + T_MOUNT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.time() > deadline:
                self.umount()
                raise RuntimeError(f"{self.name} did not mount; see {logf.name}")
            time.sleep(0.1)
        return self.mnt

    def hwm_kib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, AttributeError):
            return None

    def flush(self):
        """Return once the bucket has what was written (bucketgate only knows this itself)."""

    def umount(self):
        if self.mnt and os.path.ismount(self.mnt):
            try:
                sh(["fusermount3", "-u", self.mnt], timeout=120)
            except subprocess.TimeoutExpired:
                pass
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.mnt and os.path.ismount(self.mnt):
            sh(["fusermount3", "-uz", self.mnt], timeout=30)
        self.proc = None


class Local(Target):
    name, fuse = "local-disk", False

    def mount(self):
        self.n += 1
        self.mnt = os.path.join(self.work, f"local-{self.n}")
        if self.n == 1:
            os.makedirs(self.mnt)
        else:  # same data, "remounted": keep the directory of the previous mount
            os.rename(os.path.join(self.work, f"local-{self.n - 1}"), self.mnt)
        return self.mnt

    def umount(self):
        pass

    def hwm_kib(self):
        return None


class Bucketgate(Target):
    def __init__(self, mode, *a):
        super().__init__(*a)
        self.mode = mode
        self.name = f"bucketgate-{mode}"

    def env(self):
        e = dict(os.environ, AWS_ACCESS_KEY_ID=self.srv.access, AWS_SECRET_ACCESS_KEY=self.srv.secret,
                 AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                 BUCKETGATE_LOG="warn", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        return e

    def cmd(self, mnt, cache):
        # BENCH_BUCKETGATE_ARGS: extra mount flags, e.g. "--attr-index off" for an A/B run
        return [BIN, "mount", f"s3://{self.bucket}", mnt, "--mode", self.mode,
                "--cache-dir", cache, "--endpoint", self.srv.endpoint, "--foreground",
                *os.environ.get("BENCH_BUCKETGATE_ARGS", "").split()]

    def flush(self):
        r = sh([BIN, "flush", self.mnt], timeout=T_BUCKET, env=self.env())
        if r.returncode != 0:
            raise RuntimeError(f"bucketgate flush failed: {r.stderr}")


class S3fs(Target):
    name = "s3fs"

    def cmd(self, mnt, cache):
        pw = os.path.join(self.work, "s3fs.passwd")
        with open(pw, "w") as f:
            f.write(f"{self.srv.access}:{self.srv.secret}\n")
        os.chmod(pw, 0o600)
        return ["s3fs", self.bucket, mnt, "-f", "-o", f"url={self.srv.endpoint}",
                "-o", "use_path_request_style", "-o", f"passwd_file={pw}",
                "-o", f"use_cache={cache}", "-o", "endpoint=us-east-1"]


class Rclone(Target):
    def __init__(self, cache_mode, *a):
        super().__init__(*a)
        self.cache_mode = cache_mode
        self.name = f"rclone-{cache_mode}"

    def env(self):
        e = dict(os.environ)
        e.pop("AWS_CA_BUNDLE", None)  # rclone 1.60's S3 client fails on a custom CA bundle
        return dict(e, RCLONE_CONFIG_BENCH_TYPE="s3",
                    RCLONE_CONFIG_BENCH_PROVIDER="Other",
                    RCLONE_CONFIG_BENCH_ENDPOINT=self.srv.endpoint,
                    RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=self.srv.access,
                    RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=self.srv.secret,
                    RCLONE_CONFIG_BENCH_REGION="us-east-1",
                    RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
                    RCLONE_CONFIG=os.path.join(self.work, "rclone-none.conf"))

    def cmd(self, mnt, cache):
        return ["rclone", "mount", f"bench:{self.bucket}", mnt, "--vfs-cache-mode",
                self.cache_mode, "--cache-dir", cache]


# ---------------------------------------------------------------- workloads on a path
def write_file(path, data, chunk=MiB):
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        mv = memoryview(data)
        for off in range(0, len(data), chunk):
            f.write(mv[off:off + chunk])
    return time.perf_counter() - t0


def read_file(path, chunk=MiB):
    buf = bytearray(chunk)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return time.perf_counter() - t0, n


def random_reads(path, size, seconds):
    rnd = random.Random(5)
    fd = os.open(path, os.O_RDONLY)
    try:
        n, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(64):
                os.pread(fd, 4096, rnd.randrange(size // 4096) * 4096)
                n += 1
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)
    finally:
        os.close(fd)


def ls_l(path):
    t0 = time.perf_counter()
    r = subprocess.run(["ls", "-l", path], stdout=subprocess.DEVNULL, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ls -l {path} failed")
    return dt


def run_mount_target(tg, srv, bucket, data, nfiles, rand_s, small):
    """One run of W1..W8 on a mount target. Returns {metric: value}."""
    size = len(data)
    m = {}
    mnt = tg.mount()
    big = os.path.join(mnt, "big.bin")
    # W1: sequential write, until close, then until the object is complete in the bucket
    t0 = time.perf_counter()
    write_file(big, data)
    t_close = time.perf_counter() - t0
    if tg.fuse:
        tg.flush()
        wait_until(lambda: srv.size(bucket, "big.bin") == size, "big.bin complete in bucket")
    else:
        fd = os.open(big, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    t_bucket = time.perf_counter() - t0
    m["W1 write MiB/s (close)"] = size / MiB / t_close
    m["W1 write MiB/s (in bucket)"] = size / MiB / t_bucket
    m["W8 VmHWM MiB (W1 write)"] = (tg.hwm_kib() or 0) / 1024 or None
    # W4: small files, until closed and until in the bucket
    d = os.path.join(mnt, "small")
    os.mkdir(d)
    t0 = time.perf_counter()
    for i in range(nfiles):
        with open(os.path.join(d, f"f{i:05}.dat"), "wb") as f:
            f.write(small)
    t_close = time.perf_counter() - t0
    if tg.fuse:
        tg.flush()
        wait_until(lambda: srv.count(bucket, "small/") == nfiles, "small files in bucket")
    m["W4 files/s (close)"] = nfiles / t_close
    m["W4 files/s (in bucket)"] = nfiles / (time.perf_counter() - t0)
    hwm_write = tg.hwm_kib()
    tg.umount()
    # fresh mount, empty cache: W5 cold and warm, W2 cold read, W3 warm read, W6, W7
    mnt = tg.mount()
    big = os.path.join(mnt, "big.bin")
    if not tg.fuse:
        os.sync()
        for p in [big] + [os.path.join(mnt, "small", x) for x in os.listdir(os.path.join(mnt, "small"))]:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    m["W5 ls -l s (cold)"] = ls_l(os.path.join(mnt, "small"))
    m["W5 ls -l s (warm)"] = min(ls_l(os.path.join(mnt, "small")) for _ in range(3))
    dt, n = read_file(big)
    if n != size:
        raise RuntimeError(f"{tg.name}: read {n} bytes of {size}")
    m["W2 cold read MiB/s"] = size / MiB / dt
    dt, n = read_file(big)
    m["W3 warm read MiB/s"] = size / MiB / dt
    m["W6 4K random read IOPS"] = random_reads(big, size, rand_s)
    # W7: rename the small-file directory, until return and until the bucket agrees
    t0 = time.perf_counter()
    try:
        os.rename(os.path.join(mnt, "small"), os.path.join(mnt, "small2"))
        m["W7 rename s (return)"] = time.perf_counter() - t0
        if tg.fuse:
            tg.flush()
            wait_until(lambda: srv.count(bucket, "small2/") == nfiles
                       and srv.count(bucket, "small/") == 0, "rename in bucket")
        m["W7 rename s (bucket agrees)"] = time.perf_counter() - t0
    except OSError as e:
        log(f"  {tg.name}: directory rename failed: {e}")
        m["W7 rename s (return)"] = None
        m["W7 rename s (bucket agrees)"] = None
    hwm_all = tg.hwm_kib()
    m["W8 VmHWM MiB (whole run)"] = (max(hwm_write or 0, hwm_all or 0) / 1024) or None
    tg.umount()
    return m


def run_direct(srv, bucket, data, nfiles, rand_s, small):
    """The same bytes through boto3 with no FUSE: multipart with 8 threads, 16-way small PUTs."""
    s3, size, m = srv.s3, len(data), {}
    tc = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                        max_concurrency=8, use_threads=True)
    t0 = time.perf_counter()
    s3.upload_fileobj(io.BytesIO(data), bucket, "big.bin", Config=tc)
    dt = time.perf_counter() - t0
    if srv.size(bucket, "big.bin") != size:
        raise RuntimeError("direct: stored object has the wrong size")
    m["W1 write MiB/s (close)"] = m["W1 write MiB/s (in bucket)"] = size / MiB / dt
    pool = cf.ThreadPoolExecutor(16)
    t0 = time.perf_counter()
    list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"small/f{i:05}.dat", Body=small),
                  range(nfiles)))
    m["W4 files/s (close)"] = m["W4 files/s (in bucket)"] = nfiles / (time.perf_counter() - t0)
    # One PUT after another: the most a writer can get whose close waits for its object
    # (write-through) on this server, whatever the gateway does.
    t0 = time.perf_counter()
    for i in range(nfiles):
        s3.put_object(Bucket=bucket, Key=f"serial/f{i:05}.dat", Body=small)
    m["W4 files/s (one PUT at a time)"] = nfiles / (time.perf_counter() - t0)

    def listing():
        t0 = time.perf_counter()
        pg = s3.get_paginator("list_objects_v2")
        n = sum(len(p.get("Contents", [])) for p in pg.paginate(Bucket=bucket, Prefix="small/", Delimiter="/"))
        assert n == nfiles, n
        return time.perf_counter() - t0
    m["W5 ls -l s (cold)"] = listing()
    m["W5 ls -l s (warm)"] = min(listing() for _ in range(3))

    def ranged(off):
        r = s3.get_object(Bucket=bucket, Key="big.bin", Range=f"bytes={off}-{min(off + 8 * MiB, size) - 1}")
        body, n = r["Body"], 0
        while True:
            b = body.read(MiB)
            if not b:
                return n
            n += len(b)
    for label in ("W2 cold read MiB/s", "W3 warm read MiB/s"):
        t0 = time.perf_counter()
        n = sum(cf.ThreadPoolExecutor(8).map(ranged, range(0, size, 8 * MiB)))
        assert n == size, n
        m[label] = size / MiB / (time.perf_counter() - t0)
    rnd, n = random.Random(5), 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < rand_s:
        off = rnd.randrange(size // 4096) * 4096
        s3.get_object(Bucket=bucket, Key="big.bin", Range=f"bytes={off}-{off + 4095}")["Body"].read()
        n += 1
    m["W6 4K random read IOPS"] = n / (time.perf_counter() - t0)

    def move(i):
        s3.copy_object(Bucket=bucket, Key=f"small2/f{i:05}.dat",
                       CopySource={"Bucket": bucket, "Key": f"small/f{i:05}.dat"})
        s3.delete_object(Bucket=bucket, Key=f"small/f{i:05}.dat")
    t0 = time.perf_counter()
    list(pool.map(move, range(nfiles)))
    m["W7 rename s (return)"] = m["W7 rename s (bucket agrees)"] = time.perf_counter() - t0
    m["W8 VmHWM MiB (W1 write)"] = m["W8 VmHWM MiB (whole run)"] = None
    pool.shutdown()
    return m


# ---------------------------------------------------------------- report
METRICS = [  # name, higher is better, reference ("direct" or "local")
    ("W1 write MiB/s (close)", True, "local"),
    ("W1 write MiB/s (in bucket)", True, "direct"),
    ("W2 cold read MiB/s", True, "direct"),
    ("W3 warm read MiB/s", True, "local"),
    ("W4 files/s (close)", True, "local"),
    ("W4 files/s (in bucket)", True, "direct"),
    ("W4 files/s (one PUT at a time)", True, None),
    ("W5 ls -l s (cold)", False, "direct"),
    ("W5 ls -l s (warm)", False, "local"),
    ("W6 4K random read IOPS", True, "local"),
    ("W7 rename s (return)", False, "local"),
    ("W7 rename s (bucket agrees)", False, "direct"),
    ("W8 VmHWM MiB (W1 write)", False, None),
    ("W8 VmHWM MiB (whole run)", False, None),
]


def fmt(v):
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(v, ref, higher):
    if v is None or not ref:
        return "n/a"
    return f"{(v / ref if higher else ref / v):.2f}×"


# metric: (text, {mode: check(value, ref, best_peer) -> bool}); ratios as in the issue
TARGETS = {
    "W1 write MiB/s (close)": ("cached ≥ 0.7× local disk", {"cached": lambda v, r, p: v >= 0.7 * r}),
    "W1 write MiB/s (in bucket)": ("write-through ≥ 0.9× direct and ≥ 1.0× best peer",
                                   {"write-through": lambda v, r, p: v >= 0.9 * r and v >= p}),
    "W2 cold read MiB/s": ("≥ 0.9× direct and ≥ 1.0× best peer",
                           {m: (lambda v, r, p: v >= 0.9 * r and v >= p) for m in ("cached", "write-through")}),
    "W3 warm read MiB/s": ("cached ≥ 0.8× local disk", {"cached": lambda v, r, p: v >= 0.8 * r}),
    "W4 files/s (in bucket)": ("≥ 2× best peer", {m: (lambda v, r, p: v >= 2 * p) for m in ("cached", "write-through")}),
    "W5 ls -l s (cold)": ("≤ 1.2× direct listing", {m: (lambda v, r, p: v <= 1.2 * r) for m in ("cached", "write-through")}),
    "W5 ls -l s (warm)": ("≤ 1.5× local disk", {m: (lambda v, r, p: v <= 1.5 * r) for m in ("cached", "write-through")}),
    "W6 4K random read IOPS": ("≥ best peer", {m: (lambda v, r, p: v >= p) for m in ("cached", "write-through")}),
    "W7 rename s (return)": ("cached < 1 s", {"cached": lambda v, r, p: v < 1.0}),
    "W7 rename s (bucket agrees)": ("≤ 0.5× best peer", {m: (lambda v, r, p: v <= 0.5 * p) for m in ("cached", "write-through")}),
    "W8 VmHWM MiB (W1 write)": ("≤ 96 MiB", {m: (lambda v, r, p: v <= 96) for m in ("cached", "write-through")}),
}


def verdict(name, bg, v, ref, peer):
    checks = TARGETS.get(name, ("", {}))[1]
    mode = bg[len("bucketgate-"):]
    if mode not in checks:
        return "-"
    try:
        return "met" if checks[mode](v, ref, peer) else "**missed**"
    except TypeError:  # a figure is missing
        return "n/a"


def medians(runs):
    results = {}
    for t, rs in runs.items():
        results[t] = {}
        for name, _, _ in METRICS:
            vals = [x[name] for x in rs if x.get(name) is not None]
            results[t][name] = statistics.median(vals) if vals else None
    return results


def report(results, order, peers):
    """results[target][metric] = median. Ratios > 1 always mean 'better than the reference'."""
    lines = []
    head = ["workload"] + order
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for name, _, _ in METRICS:
        lines.append("| " + " | ".join([name] + [fmt(results.get(t, {}).get(name)) for t in order]) + " |")
    lines.append("")
    lines.append("Ratios of bucketgate to the reference (direct client or local disk, column `ref`) and "
                 "to the best peer measured in this run; **above 1.00× means bucketgate is better** "
                 "(for times and memory the ratio is inverted: ref/value).")
    lines.append("")
    lines.append("| workload | ref | best peer | cached ×ref | cached ×best peer | write-through ×ref | write-through ×best peer | target (issue 5) | cached | write-through |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, higher, refk in METRICS:
        ref_t = {"direct": "direct-boto3", "local": "local-disk", None: None}[refk]
        ref = results.get(ref_t, {}).get(name) if ref_t else None
        pv = [(results[p].get(name), p) for p in peers if p in results and results[p].get(name) is not None]
        best = (max if higher else min)(pv) if pv else (None, None)
        row = [name, f"{ref_t} {fmt(ref)}" if ref_t else "-", f"{best[1]} {fmt(best[0])}" if best[1] else "n/a"]
        verdicts = []
        for bg in ("bucketgate-cached", "bucketgate-write-through"):
            v = results.get(bg, {}).get(name)
            row += [ratio(v, ref, higher), ratio(v, best[0], higher)]
            verdicts.append(verdict(name, bg, v, ref, best[0]))
        row += [TARGETS.get(name, ("-",))[0]] + verdicts
        lines.append("| " + " | ".join(row) + " |")
    # Cells whose guarantee puts a floor under them: set against what that floor allows.
    bounds = [
        ("bucketgate-cached", "W1 write MiB/s (close)", "local-disk", "W1 write MiB/s (in bucket)",
         "Cached W1 until close against local disk until `fsync`", "MiB/s",
         "a cached close returns once the bytes are fsync'd, DESIGN.md"),
        ("bucketgate-write-through", "W4 files/s (in bucket)", "direct-boto3", "W4 files/s (one PUT at a time)",
         "Write-through W4 against the direct client's PUTs one after another", "files/s",
         "a write-through close returns once its object is stored"),
    ]
    for target, metric, base_target, base_metric, what, unit, why in bounds:
        v = results.get(target, {}).get(metric)
        base = results.get(base_target, {}).get(base_metric)
        if v and base:
            lines.append("")
            lines.append(f"{what} ({fmt(base)} {unit}; {why}): {ratio(v, base, True)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- profile (--profile)
def cpu_s(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def server_gets(srv, since_line):
    """GET-like requests (status 200/206 with a body) in the server log since a line: count, bytes."""
    pat = re.compile(r"info: (\S+) (\d{3}) (\d+)ms (\d+)(b|kb|mb|gb)", re.I)
    mult = {"b": 1, "kb": 1024, "mb": MiB, "gb": 1 << 30}
    n = nbytes = 0
    reqs = busy_ms = 0
    with open(srv.log_path, errors="replace") as f:
        lines = f.readlines()[since_line:]
    for line in lines:
        mm = pat.search(ANSI.sub("", line))
        if not mm:
            continue
        reqs += 1
        busy_ms += int(mm.group(3))
        b = float(mm.group(4)) * mult[mm.group(5).lower()]
        if b > 4096:
            n += 1
            nbytes += b
    return reqs, n, nbytes, busy_ms / 1000


def log_lines(srv):
    with open(srv.log_path, errors="replace") as f:
        return sum(1 for _ in f)


def profile(a, srv, work, data):
    """Where the time goes for W1/W2/W3 on bucketgate (each mode): wall time, CPU seconds of
    the daemon and of the server, server requests, and (second pass) the daemon's syscalls."""
    size = len(data)
    out = []
    for mode in a.profile_modes.split(","):
        for strace in (False, True):
            bucket = f"prof-{mode}-{int(strace)}"
            srv.s3.create_bucket(Bucket=bucket)
            tw = os.path.join(work, bucket)
            os.makedirs(tw)
            tg = Bucketgate(mode, srv, tw, bucket)
            res = {}

            def phase(name, fn):
                st = None
                if strace:
                    sf = os.path.join(tw, f"strace-{name}.txt")
                    st = subprocess.Popen(["strace", "-c", "-f", "-o", sf, "-p", str(tg.proc.pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)  # let strace attach to every thread
                l0 = log_lines(srv)
                d0, s0, w0 = cpu_s(tg.proc.pid), cpu_s(srv.proc.pid), time.perf_counter()
                fn()
                w = time.perf_counter() - w0
                d, s_ = cpu_s(tg.proc.pid) - d0, cpu_s(srv.proc.pid) - s0
                reqs, gets, gbytes, busy = server_gets(srv, l0)
                line = (f"{mode:13} {name:26} {'strace ' if strace else '       '}"
                        f"wall {w:6.2f} s  {(size / MiB / w) if name[:2] in ('W1', 'W2', 'W3') else 0:7.1f} MiB/s  daemon CPU {d:6.2f} s ({100 * d / w:4.0f}%)  "
                        f"server CPU {s_:6.2f} s ({100 * s_ / w:4.0f}%)  requests {reqs}  "
                        f"body>4K {gets} avg {gbytes / max(gets, 1) / MiB:.2f} MiB  "
                        f"in flight {busy / w:.1f} (sum of request times / wall)")
                if st:
                    st.send_signal(signal.SIGINT)
                    try:
                        st.wait(30)
                    except subprocess.TimeoutExpired:
                        st.kill()
                        st.wait(5)
                    with open(sf) as f:
                        top = [l.rstrip() for l in f.readlines()[:14]]
                    line += "\n    " + "\n    ".join(top)
                log(line)
                out.append(line)

            if "W5" in a.profile_phases:
                mnt = tg.mount()
                d = os.path.join(mnt, "small")
                os.mkdir(d)

                def w4():
                    for i in range(a.files):
                        with open(os.path.join(d, f"f{i:05}.dat"), "wb") as f:
                            f.write(b"x" * 16384)
                    tg.flush()
                phase(f"W4 {a.files} files+flush", w4)
                tg.umount()
                mnt = tg.mount()
                phase("W5 ls -l cold", lambda: ls_l(os.path.join(mnt, "small")))
                phase("W5 ls -l warm", lambda: ls_l(os.path.join(mnt, "small")))
                tg.umount()
            if "W1" not in a.profile_phases:
                continue
            mnt = tg.mount()
            big = os.path.join(mnt, "big.bin")

            def w1():
                write_file(big, data)
                tg.flush()
            phase("W1 write+flush", w1)
            tg.umount()
            mnt = tg.mount()
            big = os.path.join(mnt, "big.bin")
            os.stat(big)
            phase("W2 cold read", lambda: read_file(big))
            phase("W3 warm read", lambda: read_file(big))
            tg.umount()
    return out


def free_run(srv, bucket, target_work):
    """Deletes a measured run's objects, bucket and caches (the mount is gone already)."""
    try:
        pages = srv.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                srv.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        srv.s3.delete_bucket(Bucket=bucket)
    except Exception as e:  # a leftover bucket only costs disk
        log(f"  could not delete bucket {bucket}: {e!r}")
    if os.path.isdir(target_work) and not any(
            os.path.ismount(os.path.join(target_work, d)) for d in os.listdir(target_work)):
        shutil.rmtree(target_work, ignore_errors=True)


SETTLE_S = 5  # free page reporting hands freed memory back to the host after ~2 s


def settle_memory():
    """Puts every target on the same footing: the page cache dropped and the freed memory
    given back to the host. On these VMs (free page reporting) page cache that grows into
    memory the host took back costs ~2.5 s of system time per GiB, and memory freed
    moments before (the previous target's caches, deleted) costs a tenth of that, so the
    target that ran right after a large delete wrote its big file up to 3x faster (local
    disk W1: 578 MiB/s in run 1, 1,808 and 1,912 in runs 2-3, each after rclone-full's
    cleanup). Needs root; skipped (and said so) otherwise."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1\n")
    except OSError as e:
        log(f"  memory not settled before the target ({e}); figures may depend on target order")
        return
    time.sleep(SETTLE_S)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rand-seconds", type=float, default=20)
    ap.add_argument("--server", default="s3rver", choices=["s3rver", "garage", "moto"])
    ap.add_argument("--s3rver-dir", required=True)
    ap.add_argument("--garage-bin", default="")
    ap.add_argument("--targets", default="")
    ap.add_argument("--no-settle", action="store_true",
                    help="do not drop the page cache and wait before each target")
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--server-disk", default="own", choices=["own", "work"],
                    help="s3rver's data on a journaled ext4 of its own (root) or in the work dir")
    ap.add_argument("--profile", action="store_true", help="profile W1-W3 of bucketgate instead")
    ap.add_argument("--profile-modes", default="cached,write-through")
    ap.add_argument("--profile-phases", default="W1,W5", help="W1 (W1-W3 on the big file), W5 (W4 files, W5 ls)")
    a = ap.parse_args()
    # timeout(1) sends SIGTERM: unwind through the finally blocks (unmount, stop the server)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="bucketgate-bench.", dir=a.work)
    log(f"work dir {work}")
    disk = ServerDisk(work)
    data_root = disk.mount() if a.server != "moto" and a.server_disk == "own" else None
    if a.server == "moto":
        where = f"{a.server}'s memory"
    elif data_root:
        where = "a journaled ext4 of its own (sparse image, loop device with direct I/O)"
    else:
        where = f"the work dir's filesystem ({fs_type(work)})"
    log(f"server data on {where}")
    try:
        srv = Server(a.server, work, a.s3rver_dir, data_root, a.garage_bin)
    except BaseException:
        disk.unmount()
        raise
    try:
        complete = run_bench(a, work, srv, where)
    finally:
        srv.stop()
        disk.unmount()
    if not complete or os.environ.get("BENCH_KEEP"):
        log(f"kept {work} (logs of the server and every mount)")
    else:
        shutil.rmtree(work, ignore_errors=True)


def fs_type(path):
    r = sh(["df", "--output=fstype", path], timeout=30)
    return r.stdout.split()[-1] if r.returncode == 0 and r.stdout.split() else "unknown"


def run_bench(a, work, srv, where):
    """The profile or the table, on a running server; False when a target failed."""
    data = os.urandom(a.size_mib * MiB)
    small = os.urandom(16 * 1024)
    if a.profile:
        lines = profile(a, srv, work, data)
        with open(a.json_out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return True
    order = ["local-disk", "direct-boto3", "bucketgate-cached", "bucketgate-write-through"]
    peers = []
    if shutil.which("s3fs"):
        peers.append("s3fs")
    if shutil.which("rclone"):
        peers += ["rclone-writes", "rclone-full"]
    order += peers
    if a.targets:
        keep = a.targets.split(",")
        order = [t for t in order if t in keep]
        peers = [p for p in peers if p in keep]

    def make(t, bucket):
        tw = os.path.join(work, f"{t}-{bucket}")
        os.makedirs(tw)
        if t == "local-disk":
            return Local(srv, tw, bucket)
        if t.startswith("bucketgate-"):
            return Bucketgate(t[len("bucketgate-"):], srv, tw, bucket)
        if t == "s3fs":
            return S3fs(srv, tw, bucket)
        return Rclone(t[len("rclone-"):], srv, tw, bucket)

    runs = {t: [] for t in order}
    extra = {"requests": {}}
    live = []
    try:
        for r in range(a.runs):
            for t in order:
                bucket = f"b{r}-{t.replace('_', '-')}"[:63]
                if not a.no_settle:
                    settle_memory()
                srv.s3.create_bucket(Bucket=bucket)
                log(f"run {r + 1}/{a.runs} {t} (bucket {bucket})")
                req0 = srv.request_count()
                try:
                    if t == "direct-boto3":
                        m = run_direct(srv, bucket, data, a.files, a.rand_seconds, small)
                    else:
                        tg = make(t, bucket)
                        live.append(tg)
                        m = run_mount_target(tg, srv, bucket, data, a.files, a.rand_seconds, small)
                except Exception as e:  # one target failing must not lose the others
                    log(f"  {t} failed: {e!r}")
                    m = {}
                    if t != "direct-boto3":
                        tg.umount()
                req1 = srv.request_count()
                extra["requests"].setdefault(t, []).append(None if req0 is None else req1 - req0)
                log(f"  {t}: {extra['requests'][t][-1]} requests to the server (with the bench's own polling)")
                log("  " + ", ".join(f"{k}={fmt(v)}" for k, v in m.items()))
                runs[t].append(m)
                if m and not os.environ.get("BENCH_KEEP"):
                    # A full run writes ~2 GiB per target and run: free it once measured.
                    free_run(srv, bucket, os.path.join(work, f"{t}-{bucket}"))
            # after every complete run: the medians so far, so a run cut short still reports
            with open(a.json_out + ".partial.md", "w") as f:
                f.write(f"(after {r + 1} of {a.runs} runs)\n\n" + report(medians(runs), order, peers) + "\n")
    finally:
        for tg in live:
            try:
                tg.umount()
            except Exception:
                pass
    results = medians(runs)
    table = report(results, order, peers)
    with open(a.json_out, "w") as f:
        json.dump({"results": results, "runs": runs, "order": order, "peers": peers,
                   "server": a.server, "server data": where, "args": vars(a), "extra": extra},
                  f, indent=1)
    print(f"Server data on {where}.\n")
    print(table)
    return all(m for rs in runs.values() for m in rs)


if __name__ == "__main__":
    main()
