#!/usr/bin/env bash
# Mounts a local-directory bucket, writes through the mount, and shows the objects.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fusermount3 >/dev/null || { apt-get update && apt-get install -y fuse3; }
cargo build --release
bucket=$(mktemp -d) mnt=$(mktemp -d)
./target/release/bucketgate mount "$bucket" "$mnt" --cache-dir "$(mktemp -d)"
echo hello > "$mnt/hello.txt"; mkdir "$mnt/docs"; ln -s hello.txt "$mnt/docs/link"
ls -lR "$mnt"
./target/release/bucketgate flush "$mnt"
./target/release/bucketgate status "$mnt"
echo "objects in the bucket ($bucket):"; find "$bucket" | sort
./target/release/bucketgate umount "$mnt"
