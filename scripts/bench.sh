#!/usr/bin/env bash
# Benchmark of issue 5: bucketgate (cached, write-through) against a direct S3 client, a
# plain local directory, s3fs and rclone mount, on a local S3-protocol server on 127.0.0.1.
#
#   scripts/bench.sh [--quick] [--runs N] [--size-mib N] [--files N] [--rand-seconds S]
#                    [--server s3rver|garage|moto] [--targets a,b,...] [--out FILE] [--no-settle]
#                    [--install-peers]
#
#   --install-peers  apt-get install fuse3 s3fs rclone, then exit
#   --quick          1 run, 256 MiB, 500 files, 5 s of random reads (a fast check)
#   --profile        instead of the table: bucketgate W1-W3 (each mode) with CPU seconds of
#                    the daemon and the server, server requests, then the same under strace -c
#   --out FILE       where to write the table and machine info (default BENCHMARKS-run.md;
#                    copy the parts you keep into BENCHMARKS.md)
#   --server garage  Garage 2.5.0 (Rust, multi-threaded) instead of s3rver: built with
#                    `cargo install` into $BENCH_GARAGE_DIR (default /tmp/bucketgate-bench-garage)
#                    on first use, about 8 minutes on 2 cores
#   --server-disk own|work
#                    the server's data on a journaled ext4 of its own (default: a sparse image on
#                    a loop device, as root) or in the work dir's filesystem. This VM's root
#                    ext4 has no journal, which makes one target's cleanup slow the next
#                    target's server-side file creation (see BENCHMARKS.md)
#   --no-settle      do not drop the page cache (and wait 5 s) before each target: by default
#                    every target starts with its page cache growing into memory the VM gave
#                    back to the host, whatever ran before it (see BENCHMARKS.md)
#
# The server is s3rver 3.7.1 (Node), installed with npm into $BENCH_S3RVER_DIR (default
# /tmp/bucketgate-bench-s3rver, outside the repo) on first use: its GETs run at ~350 MiB/s
# here, where moto's are ~10 MiB/s and would hide every read figure. Needs python3 with
# boto3, fuse3, and root (or user_allow_other-free FUSE mounts) for the mounts.
# BENCH_BUCKETGATE_ARGS adds flags to the bucketgate mounts (e.g. "--attr-index off").
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 size=1024 files=2000 rand=20 server=s3rver targets="" out=BENCHMARKS-run.md profile=() settle=() disk=own
while [ $# -gt 0 ]; do
  case "$1" in
    --install-peers)
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 s3fs rclone
      exit 0 ;;
    --quick) runs=1 size=256 files=500 rand=5 ;;
    --runs) runs=$2; shift ;;
    --size-mib) size=$2; shift ;;
    --files) files=$2; shift ;;
    --rand-seconds) rand=$2; shift ;;
    --server) server=$2; shift ;;
    --targets) targets=$2; shift ;;
    --out) out=$2; shift ;;
    --profile) profile=(--profile) ;;
    --no-settle) settle=(--no-settle) ;;
    --server-disk) disk=$2; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

command -v fusermount3 >/dev/null || { echo "needs fuse3 (scripts/bench.sh --install-peers)" >&2; exit 1; }
python3 -c 'import boto3' || { echo "needs boto3 for python3 (pip install boto3)" >&2; exit 1; }
[ -x target/release/bucketgate ] || cargo build --release

s3rver_dir=${BENCH_S3RVER_DIR:-/tmp/bucketgate-bench-s3rver}
if [ "$server" = s3rver ] && [ ! -f "$s3rver_dir/node_modules/s3rver/bin/s3rver.js" ]; then
  command -v npm >/dev/null || { echo "needs node and npm for s3rver (or --server moto)" >&2; exit 1; }
  mkdir -p "$s3rver_dir"
  (cd "$s3rver_dir" && timeout 300 npm install --no-audit --no-fund s3rver@3.7.1 >/dev/null)
fi

garage_dir=${BENCH_GARAGE_DIR:-/tmp/bucketgate-bench-garage}
if [ "$server" = garage ] && [ ! -x "$garage_dir/bin/garage" ]; then
  # one node, LMDB metadata; no metrics/k2v/sqlite: less to build
  CARGO_TARGET_DIR="$garage_dir/target" timeout 3600 cargo install --locked --root "$garage_dir" \
    garage@2.5.0 --no-default-features --features bundled-libs,lmdb
fi

json=$(mktemp /tmp/bucketgate-bench.XXXXXX.json)
table=$(mktemp /tmp/bucketgate-bench.XXXXXX.md)
trap 'rm -f "$json" "$table" "$json.partial.md"' EXIT
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date -u +%FT%TZ)
# The driver bounds every wait itself; this is the outer limit of the whole run.
rc=0
timeout -k 30 $((runs * 3600)) python3 scripts/bench.py --runs "$runs" --size-mib "$size" \
  --files "$files" --rand-seconds "$rand" --server "$server" --s3rver-dir "$s3rver_dir" \
  --garage-bin "$garage_dir/bin/garage" \
  --targets "$targets" --server-disk "$disk" --json-out "$json" "${profile[@]}" "${settle[@]}" \
  >"$table" || rc=$?
if [ $rc -ne 0 ]; then
  echo "the driver exited with $rc" >&2
  [ -s "$json.partial.md" ] || exit $rc
  { echo "**Cut short (exit $rc): medians of the runs that completed.**"; echo; cat "$json.partial.md"; } >"$table"
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

{
  echo "## ${profile:+Profile }Run of $start"
  echo
  echo "- command: \`scripts/bench.sh ${profile[*]:+${profile[*]} }${settle[*]:+${settle[*]} }--runs $runs --size-mib $size --files $files --rand-seconds $rand --server $server --server-disk $disk${targets:+ --targets $targets}\` (median of $runs run(s))"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME")"
  echo "- load average before / after: $load_before / $load_after (the machine is shared)"
  case "$server" in
    s3rver) echo "- server: s3rver $(node -e "console.log(require('$s3rver_dir/node_modules/s3rver/package.json').version)") on node $(node --version), 127.0.0.1 (where its data lives: the line above the table)" ;;
    garage) echo "- server: $("$garage_dir/bin/garage" --version 2>/dev/null | head -1) (one node, LMDB metadata, no compression, no fsync), 127.0.0.1" ;;
    moto) echo "- server: moto $(python3 -c 'import moto; print(moto.__version__)'), 127.0.0.1" ;;
  esac
  echo "- peers: $(command -v s3fs >/dev/null && s3fs --version 2>/dev/null | sed -n 1p | awk '{print "s3fs " $(NF-3)}' || echo 'no s3fs'), $(command -v rclone >/dev/null && rclone version 2>/dev/null | sed -n 1p || echo 'no rclone'); bucketgate $(git rev-parse --short HEAD)"
  echo "- direct client: boto3 $(python3 -c 'import boto3; print(boto3.__version__)'), multipart 8 MiB parts x 8 threads, 8 MiB ranged GETs x 8 threads, 16 threads for small PUTs and copy+delete"
  echo
  [ ${#profile[@]} -eq 0 ] || echo '```'
  cat "$table"
  [ ${#profile[@]} -eq 0 ] || echo '```'
  echo
} >>"$out"
cat "$table"
echo "appended to $out" >&2
exit $rc
