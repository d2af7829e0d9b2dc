//! Seeded model-based test: a pseudo-random sequence of namespace and data operations runs
//! through a real mount, and after every step the mount is compared with an in-memory
//! reference model (names, kinds, sizes, contents, and the exact errno of every failing
//! call). Remounts (same cache dir, or a fresh one so the tree comes back from the bucket
//! alone) are part of the sequence. After the final clean unmount the bucket itself is
//! compared with the model.
//!
//! On a mismatch the test prints the seed, the step, the operation, what differs, then
//! shrinks the operation list by replaying reduced lists on fresh mounts (bounded in count
//! and time) and prints the smallest failing list, numbered and as shell commands.
//!
//! `BUCKETGATE_MODEL_SEED=N` (decimal or 0x hex) and `BUCKETGATE_MODEL_OPS=N` override the
//! fixed per-test seeds and operation counts.
//!
//! Daemon bugs this test found (all fixed; the fixed-seed runs pass):
//! 1. A file renamed over an uploaded file, then moved away or unlinked before its copy,
//!    left the replaced file's old object behind (it came back after a fresh-cache
//!    remount). Renames now always delete the replaced object; deletes honour every inode
//!    that still needs a key.
//! 2. write-through: a file reopened after a staged upload read zeros where its data was
//!    (a saved block map outlived the cache file it described).
//! 3. write-through: a change right after a create was sometimes lost (same cause).
//! 4. `umount` hung retrying a directory marker in a hot loop: flushes ignored the retry
//!    backoff.
//! 5. cached, small cache: evicting a file while an upload still held it, or between
//!    eviction and forgetting its block map, made files read zeros.
//!
//! A rarer write-through failure (seed 0xb0c4e7a70003, step 1714, a path truncate reading
//! zeros) was seen once before eviction and discard were made safe against concurrent
//! users, and not reproduced since.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::IntoRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{force_unmount, tail, temp_dir, unique_name, Moto, Mount};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The daemon's cache block size: offsets and lengths near multiples of it are favoured.
const BLOCK: u64 = MIB;
/// Names are drawn from a small pool so that collisions (EEXIST, EISDIR, ...) are common.
const NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "f", "g"];
/// Keep the tree small.
const MAX_ENTRIES: usize = 25;
/// Directories at most this deep (files one deeper).
const MAX_DIR_DEPTH: usize = 2;
/// Full content compare every this many steps (and after every remount).
const FULL_COMPARE_EVERY: usize = 50;
/// A single step (one operation and its checks) may take this long before the watchdog
/// kills the daemon, so a hung FUSE call turns into a failure instead of a hung test.
const STEP_TIMEOUT: Duration = Duration::from_secs(150);
/// Shrinking budget.
const SHRINK_MAX_REPLAYS: usize = 60;
const SHRINK_MAX_TIME: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------
// PRNG and data
// ---------------------------------------------------------------------------------------

/// splitmix64: tiny, seedable, good enough for test generation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct` percent.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The bytes of one write: `(seed + i * mul) % 251`. The period (251) is prime, so data
/// shifted by any power-of-two distance differs; `tests/model.rs`'s shell listing
/// regenerates it with a python one-liner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pattern {
    seed: u8,
    mul: u8,
}

impl Pattern {
    fn bytes(self, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let mul = u32::from(self.mul);
        let mut v = u32::from(self.seed) % 251;
        for _ in 0..len {
            out.push(v as u8);
            v += mul;
            if v >= 251 {
                v -= 251;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// operations
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    /// `pwrite` at each chunk's offset.
    Plain,
    /// `O_APPEND`: every chunk goes to the end, offsets are ignored.
    Append,
    /// `O_TRUNC` at open, then `pwrite` at each chunk's offset.
    Trunc,
}

#[derive(Clone, Copy, Debug)]
struct Chunk {
    off: u64,
    len: u64,
    pat: Pattern,
}

#[derive(Clone, Debug)]
enum Op {
    /// `open(O_WRONLY|O_CREAT[|O_EXCL])`, close.
    Create {
        path: String,
        excl: bool,
    },
    /// open for writing (`O_CREAT` if `create`), write the chunks in order on one
    /// descriptor (`fsync` after chunk `fsync_after` if set), close.
    Write {
        path: String,
        create: bool,
        mode: WriteMode,
        chunks: Vec<Chunk>,
        fsync_after: Option<usize>,
    },
    /// `truncate(path)` or open + `ftruncate` + close.
    Truncate {
        path: String,
        len: u64,
        via_fd: bool,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// `open(O_RDONLY)`, `fsync`, close (files and directories).
    Fsync {
        path: String,
    },
    /// Clean unmount, then mount again on the same cache dir or a fresh one.
    Remount {
        fresh_cache: bool,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { path, excl } => {
                write!(f, "create {path}{}", if *excl { " O_EXCL" } else { "" })
            }
            Op::Write {
                path,
                create,
                mode,
                chunks,
                fsync_after,
            } => {
                write!(f, "write {path}")?;
                if *create {
                    write!(f, " O_CREAT")?;
                }
                match mode {
                    WriteMode::Plain => {}
                    WriteMode::Append => write!(f, " O_APPEND")?,
                    WriteMode::Trunc => write!(f, " O_TRUNC")?,
                }
                for (i, c) in chunks.iter().enumerate() {
                    if *mode == WriteMode::Append {
                        write!(f, " [+{} bytes", c.len)?;
                    } else {
                        write!(f, " [{} bytes @{}", c.len, c.off)?;
                    }
                    write!(f, " pat {}/{}]", c.pat.seed, c.pat.mul)?;
                    if *fsync_after == Some(i) {
                        write!(f, " fsync")?;
                    }
                }
                Ok(())
            }
            Op::Truncate { path, len, via_fd } => write!(
                f,
                "{} {path} to {len}",
                if *via_fd { "ftruncate" } else { "truncate" }
            ),
            Op::Rename { from, to } => write!(f, "rename {from} -> {to}"),
            Op::Unlink { path } => write!(f, "unlink {path}"),
            Op::Mkdir { path } => write!(f, "mkdir {path}"),
            Op::Rmdir { path } => write!(f, "rmdir {path}"),
            Op::Fsync { path } => write!(f, "fsync {path}"),
            Op::Remount { fresh_cache } => write!(
                f,
                "remount ({} cache dir)",
                if *fresh_cache { "FRESH" } else { "same" }
            ),
        }
    }
}

/// Shell functions the printed reproduction uses.
const SHELL_PRELUDE: &str = r#"# M=mountpoint S=source (bucket) C=cache dir; mode as in the test
pat() { python3 -c 'import sys;s,m,n=map(int,sys.argv[1:]);sys.stdout.buffer.write(bytes((s+i*m)%251 for i in range(n)))' "$@"; }
pw() { dd of="$1" bs=64K seek="$2" oflag=seek_bytes conv=notrunc status=none; }   # pwrite stdin at offset"#;

impl Op {
    /// Roughly equivalent shell commands (same resulting tree and errors; the syscall
    /// sequence can differ slightly, e.g. O_TRUNC becomes `: >`).
    fn shell(&self, mode: &str) -> String {
        let q = |p: &str| format!("\"$M/{p}\"");
        match self {
            Op::Create { path, excl } => {
                if *excl {
                    format!("(set -C; : > {})", q(path))
                } else {
                    format!(": >> {}", q(path))
                }
            }
            Op::Write {
                path,
                create,
                mode: wm,
                chunks,
                fsync_after,
            } => {
                let mut parts = Vec::new();
                if !create {
                    parts.push(format!("test -e {}", q(path)));
                }
                if *wm == WriteMode::Trunc {
                    parts.push(format!(": > {}", q(path)));
                }
                for (i, c) in chunks.iter().enumerate() {
                    if *wm == WriteMode::Append {
                        parts.push(format!(
                            "pat {} {} {} >> {}",
                            c.pat.seed,
                            c.pat.mul,
                            c.len,
                            q(path)
                        ));
                    } else {
                        parts.push(format!(
                            "pat {} {} {} | pw {} {}",
                            c.pat.seed,
                            c.pat.mul,
                            c.len,
                            q(path),
                            c.off
                        ));
                    }
                    if *fsync_after == Some(i) {
                        parts.push(format!("sync {}", q(path)));
                    }
                }
                parts.join(" && ")
            }
            Op::Truncate { path, len, .. } => format!("truncate -c -s {len} {}", q(path)),
            Op::Rename { from, to } => format!("mv -T {} {}", q(from), q(to)),
            Op::Unlink { path } => format!("unlink {}", q(path)),
            Op::Mkdir { path } => format!("mkdir {}", q(path)),
            Op::Rmdir { path } => format!("rmdir {}", q(path)),
            Op::Fsync { path } => format!("sync {}", q(path)),
            Op::Remount { fresh_cache } => format!(
                "bucketgate umount \"$M\" && bucketgate mount \"$S\" \"$M\" --mode {mode} --cache-dir {}",
                if *fresh_cache {
                    "\"$(mktemp -d)\""
                } else {
                    "\"$C\""
                }
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// the reference model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
}

/// The tree as it should be: relative paths ("a/b") to nodes; the root is implicit.
#[derive(Clone, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
}

type Res = Result<(), i32>;

fn parent_of(path: &str) -> &str {
    path.rfind('/').map(|i| &path[..i]).unwrap_or("")
}

fn depth(path: &str) -> usize {
    if path.is_empty() {
        0
    } else {
        path.matches('/').count() + 1
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether `anc` is a proper ancestor of `path`.
fn is_ancestor(anc: &str, path: &str) -> bool {
    path.len() > anc.len() && path.starts_with(anc) && path.as_bytes()[anc.len()] == b'/'
}

impl Model {
    fn is_dir(&self, path: &str) -> bool {
        path.is_empty() || matches!(self.nodes.get(path), Some(Node::Dir))
    }

    fn file_len(&self, path: &str) -> Option<u64> {
        match self.nodes.get(path) {
            Some(Node::File(d)) => Some(d.len() as u64),
            _ => None,
        }
    }

    fn total_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::File(d) => d.len() as u64,
                Node::Dir => 0,
            })
            .sum()
    }

    /// Path resolution of every component but the last, as the kernel does it.
    fn resolve_parent(&self, path: &str) -> Res {
        let comps: Vec<&str> = path.split('/').collect();
        let mut cur = String::new();
        for c in &comps[..comps.len() - 1] {
            cur = join(&cur, c);
            match self.nodes.get(&cur) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir) => {}
            }
        }
        Ok(())
    }

    /// Everything strictly below `dir`.
    fn descendants(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{dir}/");
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn has_children(&self, dir: &str) -> bool {
        !self.descendants(dir).is_empty()
    }

    /// Open for writing, as `open(2)` would: EISDIR for directories, ENOENT without
    /// O_CREAT, EEXIST with O_EXCL.
    fn open_write(&mut self, path: &str, create: bool, excl: bool, trunc: bool) -> Res {
        self.resolve_parent(path)?;
        match self.nodes.get_mut(path) {
            None if create => {
                self.nodes.insert(path.to_string(), Node::File(Vec::new()));
                Ok(())
            }
            None => Err(libc::ENOENT),
            Some(_) if create && excl => Err(libc::EEXIST),
            Some(Node::Dir) => Err(libc::EISDIR),
            Some(Node::File(d)) => {
                if trunc {
                    d.clear();
                }
                Ok(())
            }
        }
    }

    fn file_mut(&mut self, path: &str) -> &mut Vec<u8> {
        match self.nodes.get_mut(path) {
            Some(Node::File(d)) => d,
            other => panic!("model: {path} is not a file after open: {other:?}"),
        }
    }

    /// Apply `op`; returns what the call should return. Remount changes nothing.
    fn apply(&mut self, op: &Op) -> Res {
        match op {
            Op::Create { path, excl } => self.open_write(path, true, *excl, false),
            Op::Write {
                path,
                create,
                mode,
                chunks,
                ..
            } => {
                self.open_write(path, *create, false, *mode == WriteMode::Trunc)?;
                let d = self.file_mut(path);
                for c in chunks {
                    let bytes = c.pat.bytes(c.len);
                    let off = if *mode == WriteMode::Append {
                        d.len()
                    } else {
                        c.off as usize
                    };
                    if c.len == 0 {
                        // A zero-length write does not extend the file.
                        continue;
                    }
                    if d.len() < off + bytes.len() {
                        d.resize(off + bytes.len(), 0);
                    }
                    d[off..off + bytes.len()].copy_from_slice(&bytes);
                }
                Ok(())
            }
            Op::Truncate { path, len, .. } => {
                self.resolve_parent(path)?;
                match self.nodes.get_mut(path) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(d)) => {
                        d.resize(*len as usize, 0);
                        Ok(())
                    }
                }
            }
            Op::Rename { from, to } => self.rename(from, to),
            Op::Unlink { path } => {
                self.resolve_parent(path)?;
                match self.nodes.get(path) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(_)) => {
                        self.nodes.remove(path);
                        Ok(())
                    }
                }
            }
            Op::Mkdir { path } => {
                self.resolve_parent(path)?;
                if self.nodes.contains_key(path) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(path.clone(), Node::Dir);
                Ok(())
            }
            Op::Rmdir { path } => {
                self.resolve_parent(path)?;
                match self.nodes.get(path) {
                    None => Err(libc::ENOENT),
                    Some(Node::File(_)) => Err(libc::ENOTDIR),
                    Some(Node::Dir) if self.has_children(path) => Err(libc::ENOTEMPTY),
                    Some(Node::Dir) => {
                        self.nodes.remove(path);
                        Ok(())
                    }
                }
            }
            Op::Fsync { path } => {
                self.resolve_parent(path)?;
                if self.nodes.contains_key(path) {
                    Ok(())
                } else {
                    Err(libc::ENOENT)
                }
            }
            Op::Remount { .. } => Ok(()),
        }
    }

    /// rename(2) in the order Linux checks: both parents, the source, ancestry (EINVAL
    /// moving a directory below itself, ENOTEMPTY when the target is an ancestor of the
    /// source), same inode (no-op), kind mismatch, non-empty target directory.
    fn rename(&mut self, from: &str, to: &str) -> Res {
        self.resolve_parent(from)?;
        self.resolve_parent(to)?;
        let src_is_dir = match self.nodes.get(from) {
            None => return Err(libc::ENOENT),
            Some(n) => *n == Node::Dir,
        };
        if is_ancestor(from, to) {
            return Err(libc::EINVAL);
        }
        if is_ancestor(to, from) {
            return Err(libc::ENOTEMPTY);
        }
        if from == to {
            return Ok(());
        }
        match self.nodes.get(to) {
            None => {}
            Some(Node::Dir) if !src_is_dir => return Err(libc::EISDIR),
            Some(Node::File(_)) if src_is_dir => return Err(libc::ENOTDIR),
            Some(Node::Dir) if self.has_children(to) => return Err(libc::ENOTEMPTY),
            Some(_) => {}
        }
        let moved: Vec<String> = if src_is_dir {
            self.descendants(from)
        } else {
            Vec::new()
        };
        let node = self.nodes.remove(from).expect("source checked above");
        self.nodes.insert(to.to_string(), node);
        for old in moved {
            let n = self.nodes.remove(&old).expect("descendant listed above");
            let new = format!("{to}{}", &old[from.len()..]);
            self.nodes.insert(new, n);
        }
        Ok(())
    }

    /// Files whose contents `op` may have changed (after it was applied).
    fn touched(&self, op: &Op) -> Vec<String> {
        let mut out = Vec::new();
        match op {
            Op::Create { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fsync { path } => out.push(path.clone()),
            Op::Rename { from, to } => {
                out.push(from.clone());
                out.push(to.clone());
                out.extend(self.descendants(to));
            }
            _ => {}
        }
        out.retain(|p| matches!(self.nodes.get(p), Some(Node::File(_))));
        out
    }
}

// ---------------------------------------------------------------------------------------
// operation generation
// ---------------------------------------------------------------------------------------

/// Per-test knobs.
#[derive(Clone)]
struct Config {
    name: &'static str,
    mode: &'static str,
    s3: bool,
    seed: u64,
    ops: usize,
    /// Largest file the generator makes.
    max_file: u64,
    /// Percent of writes/truncates that may be large (up to ~1.5 MiB per chunk).
    big_pct: u64,
    /// Stop generating large writes once the tree holds this many bytes.
    max_total: u64,
    /// Remounts spread evenly over the run (every other one with a fresh cache).
    remounts: usize,
    extra_args: Vec<&'static str>,
    /// Time budget of the generated run (the op loop stops early, loudly, past it).
    budget: Duration,
}

struct Gen<'a> {
    rng: Rng,
    cfg: &'a Config,
}

impl Gen<'_> {
    fn files(m: &Model) -> Vec<String> {
        m.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::File(_)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn dirs(m: &Model) -> Vec<String> {
        m.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A directory (root included) whose children may be at most `max_child_depth` deep.
    fn dir(&mut self, m: &Model, max_child_depth: usize) -> String {
        let mut dirs: Vec<String> = Self::dirs(m)
            .into_iter()
            .filter(|d| depth(d) < max_child_depth)
            .collect();
        // The root is picked at least as often as any other directory.
        dirs.push(String::new());
        dirs.push(String::new());
        self.rng.pick(&dirs).clone()
    }

    fn name(&mut self) -> &'static str {
        NAMES[self.rng.below(NAMES.len() as u64) as usize]
    }

    /// A name in a directory, new or not.
    fn fresh_path(&mut self, m: &Model, max_depth: usize) -> String {
        let d = self.dir(m, max_depth);
        join(&d, self.name())
    }

    /// A path whose resolution fails: below a file (ENOTDIR) or a missing directory.
    fn broken_path(&mut self, m: &Model) -> String {
        let files = Self::files(m);
        if !files.is_empty() && self.rng.pct(50) {
            let f = self.rng.pick(&files).clone();
            return join(&f, self.name());
        }
        let mut p = self.fresh_path(m, MAX_DIR_DEPTH);
        p.push_str("/x");
        p
    }

    /// Mostly an existing file; sometimes a directory, a new name or a broken path.
    fn file_path(&mut self, m: &Model, pct_existing: u64) -> String {
        let files = Self::files(m);
        let dirs = Self::dirs(m);
        let r = self.rng.below(100);
        if r < pct_existing && !files.is_empty() {
            self.rng.pick(&files).clone()
        } else if r < pct_existing + 6 && !dirs.is_empty() {
            self.rng.pick(&dirs).clone()
        } else if r < 96 {
            self.fresh_path(m, MAX_DIR_DEPTH + 1)
        } else {
            self.broken_path(m)
        }
    }

    fn len(&mut self, small_only: bool) -> u64 {
        let r = self.rng.below(100);
        if r < 50 {
            self.rng.range(0, 4 * KIB)
        } else if r < 78 || small_only {
            self.rng.range(0, 64 * KIB)
        } else if r < 100 - self.cfg.big_pct {
            self.rng.range(0, 300 * KIB)
        } else {
            self.rng.range(300 * KIB, 1536 * KIB)
        }
    }

    /// An offset relative to a file of `size` bytes.
    fn offset(&mut self, size: u64) -> u64 {
        let r = self.rng.below(100);
        if r < 25 {
            0
        } else if r < 50 {
            self.rng.range(0, size)
        } else if r < 68 {
            size
        } else if r < 84 {
            size + self.rng.range(1, 200 * KIB)
        } else if self.cfg.max_file > BLOCK {
            // Around a block boundary.
            let k = self.rng.range(1, (self.cfg.max_file / BLOCK).max(1));
            (k * BLOCK + self.rng.range(0, 8 * KIB)).saturating_sub(4 * KIB)
        } else {
            let k = self.rng.range(1, 4);
            (k * 64 * KIB + self.rng.range(0, 8 * KIB)).saturating_sub(4 * KIB)
        }
    }

    fn pattern(&mut self) -> Pattern {
        Pattern {
            seed: self.rng.below(251) as u8,
            mul: self.rng.range(1, 250) as u8,
        }
    }

    /// Clamp a write so the file stays within `max_file`.
    fn clamp(&mut self, off: u64, len: u64) -> (u64, u64) {
        let max = self.cfg.max_file;
        let off = if off >= max {
            self.rng.range(0, max / 2)
        } else {
            off
        };
        (off, len.min(max - off))
    }

    fn write(&mut self, m: &Model) -> Op {
        let path = self.file_path(m, 86);
        let small_only = m.total_bytes() > self.cfg.max_total;
        let mode = match self.rng.below(100) {
            0..=64 => WriteMode::Plain,
            65..=84 => WriteMode::Append,
            _ => WriteMode::Trunc,
        };
        let create_pct = if m.nodes.len() < 12 { 75 } else { 30 };
        let create = self.rng.pct(create_pct) && m.nodes.len() < MAX_ENTRIES;
        let mut size = match mode {
            WriteMode::Trunc => 0,
            _ => m.file_len(&path).unwrap_or(0),
        };
        let n = match self.rng.below(100) {
            0..=59 => 1,
            60..=84 => 2,
            _ => 3,
        };
        let mut chunks = Vec::new();
        for i in 0..n {
            let len = self.len(small_only);
            let off = match mode {
                WriteMode::Append => size,
                _ if i > 0 && self.rng.pct(60) => size, // sequential after the last chunk
                _ => self.offset(size),
            };
            let (off, len) = if mode == WriteMode::Append {
                (size, len.min(self.cfg.max_file.saturating_sub(size)))
            } else {
                self.clamp(off, len)
            };
            size = size.max(off + len);
            let pat = self.pattern();
            chunks.push(Chunk { off, len, pat });
        }
        let fsync_after = self.rng.pct(15).then(|| self.rng.below(n) as usize);
        Op::Write {
            path,
            create,
            mode,
            chunks,
            fsync_after,
        }
    }

    fn truncate(&mut self, m: &Model) -> Op {
        let path = self.file_path(m, 88);
        let size = m.file_len(&path).unwrap_or(0);
        let r = self.rng.below(100);
        let len = if r < 20 {
            0
        } else if r < 50 {
            self.rng.range(0, size)
        } else if r < 80 {
            size + self.len(m.total_bytes() > self.cfg.max_total)
        } else {
            self.offset(size)
        };
        Op::Truncate {
            path,
            len: len.min(self.cfg.max_file),
            via_fd: self.rng.pct(50),
        }
    }

    fn rename(&mut self, m: &Model) -> Op {
        let files = Self::files(m);
        let dirs = Self::dirs(m);
        let r = self.rng.below(100);
        let from = if r < 60 && !files.is_empty() {
            self.rng.pick(&files).clone()
        } else if r < 88 && !dirs.is_empty() {
            self.rng.pick(&dirs).clone()
        } else {
            self.file_path(m, 0)
        };
        let from_is_dir = m.is_dir(&from) && !from.is_empty();
        // How deep the moved subtree reaches below `from`.
        let sub_depth = m
            .descendants(&from)
            .iter()
            .map(|d| depth(d) - depth(&from))
            .max()
            .unwrap_or(0);
        let r = self.rng.below(100);
        let to = if from_is_dir && r < 5 {
            // Into its own subtree: EINVAL.
            join(&from, self.name())
        } else if from_is_dir && r < 8 && depth(&from) > 1 {
            // Onto its own ancestor: ENOTEMPTY.
            parent_of(&from).to_string()
        } else if r < 40 {
            // Over an existing entry (usually the same kind).
            let same = if from_is_dir { &dirs } else { &files };
            let pool = if self.rng.pct(85) && !same.is_empty() {
                same
            } else if !files.is_empty() {
                &files
            } else {
                &dirs
            };
            if pool.is_empty() {
                self.fresh_path(m, MAX_DIR_DEPTH + 1)
            } else {
                self.rng.pick(pool).clone()
            }
        } else if r < 95 {
            let max_depth = if from_is_dir {
                (MAX_DIR_DEPTH + 1).saturating_sub(sub_depth).max(1)
            } else {
                MAX_DIR_DEPTH + 1
            };
            self.fresh_path(m, max_depth)
        } else {
            self.broken_path(m)
        };
        // Keep the tree within its depth: a directory moved deeper than allowed goes to
        // the root instead.
        let to = if from_is_dir && depth(&to) + sub_depth > MAX_DIR_DEPTH + 1 {
            self.name().to_string()
        } else {
            to
        };
        Op::Rename { from, to }
    }

    fn next_op(&mut self, m: &Model, step: usize) -> Op {
        let every = self.cfg.ops / (self.cfg.remounts + 1);
        if self.cfg.remounts > 0 && every > 0 && step > 0 && step.is_multiple_of(every) {
            let nth = step / every;
            if nth <= self.cfg.remounts {
                return Op::Remount {
                    fresh_cache: nth.is_multiple_of(2),
                };
            }
        }
        let full = m.nodes.len() >= MAX_ENTRIES;
        let sparse = m.nodes.len() < 10;
        loop {
            let r = self.rng.below(100);
            // Grow a small tree: removals are rerolled more often while it is small.
            if sparse && (74..=92).contains(&r) && self.rng.pct(60) {
                continue;
            }
            let op = match r {
                0..=33 => self.write(m),
                34..=44 => self.truncate(m),
                45..=52 if !full => Op::Create {
                    path: self.fresh_path(m, MAX_DIR_DEPTH + 1),
                    excl: self.rng.pct(40),
                },
                53..=59 if !full => Op::Mkdir {
                    path: if self.rng.pct(85) {
                        self.fresh_path(m, MAX_DIR_DEPTH)
                    } else {
                        self.broken_path(m)
                    },
                },
                60..=73 => self.rename(m),
                74..=83 => Op::Unlink {
                    path: self.file_path(m, 85),
                },
                84..=92 => {
                    let dirs = Self::dirs(m);
                    let path = if self.rng.pct(70) && !dirs.is_empty() {
                        self.rng.pick(&dirs).clone()
                    } else {
                        self.file_path(m, 60)
                    };
                    Op::Rmdir { path }
                }
                93..=99 => Op::Fsync {
                    path: self.file_path(m, 80),
                },
                _ => continue,
            };
            // A write with O_CREAT on a missing name also adds an entry.
            if full {
                if let Op::Write {
                    path, create: true, ..
                } = &op
                {
                    if !m.nodes.contains_key(path) {
                        continue;
                    }
                }
            }
            return op;
        }
    }
}

// ---------------------------------------------------------------------------------------
// running operations on the mount
// ---------------------------------------------------------------------------------------

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::EIO => "EIO",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENOSPC => "ENOSPC",
        libc::EBUSY => "EBUSY",
        libc::ENOSYS => "ENOSYS",
        libc::EXDEV => "EXDEV",
        -1 => "<no errno>",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn show(r: &Res) -> String {
    match r {
        Ok(()) => "Ok".to_string(),
        Err(e) => errno_name(*e),
    }
}

/// close(2) with its result: in write-through, close reports upload failures.
fn close_checked(f: File) -> Res {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released from an owned File; nothing else closes it.
    let rc = unsafe { libc::close(fd) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Run one (non-remount) operation against the mount at `root`.
fn exec(op: &Op, root: &Path) -> Res {
    let p = |rel: &str| root.join(rel);
    match op {
        Op::Create { path, excl } => {
            let mut oo = OpenOptions::new();
            oo.write(true);
            if *excl {
                oo.create_new(true);
            } else {
                oo.create(true);
            }
            close_checked(oo.open(p(path)).map_err(errno)?)
        }
        Op::Write {
            path,
            create,
            mode,
            chunks,
            fsync_after,
        } => {
            let mut oo = OpenOptions::new();
            oo.write(true).create(*create);
            match mode {
                WriteMode::Plain => {}
                WriteMode::Append => {
                    oo.append(true);
                }
                WriteMode::Trunc => {
                    oo.truncate(true);
                }
            }
            let mut f = oo.open(p(path)).map_err(errno)?;
            for (i, c) in chunks.iter().enumerate() {
                let bytes = c.pat.bytes(c.len);
                if *mode == WriteMode::Append {
                    f.write_all(&bytes).map_err(errno)?;
                } else {
                    f.write_all_at(&bytes, c.off).map_err(errno)?;
                }
                if *fsync_after == Some(i) {
                    f.sync_all().map_err(errno)?;
                }
            }
            close_checked(f)
        }
        Op::Truncate { path, len, via_fd } => {
            if *via_fd {
                let f = OpenOptions::new()
                    .write(true)
                    .open(p(path))
                    .map_err(errno)?;
                f.set_len(*len).map_err(errno)?;
                close_checked(f)
            } else {
                let c = cpath(&p(path));
                // SAFETY: valid NUL-terminated path.
                let rc = unsafe { libc::truncate(c.as_ptr(), *len as libc::off_t) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(errno(std::io::Error::last_os_error()))
                }
            }
        }
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map_err(errno),
        Op::Unlink { path } => fs::remove_file(p(path)).map_err(errno),
        Op::Mkdir { path } => fs::create_dir(p(path)).map_err(errno),
        Op::Rmdir { path } => fs::remove_dir(p(path)).map_err(errno),
        Op::Fsync { path } => {
            let f = File::open(p(path)).map_err(errno)?;
            f.sync_all().map_err(errno)?;
            close_checked(f)
        }
        Op::Remount { .. } => unreachable!("remount is run by the session"),
    }
}

// ---------------------------------------------------------------------------------------
// comparing a tree with the model
// ---------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Dir,
    File(u64),
    Other(String),
}

/// Every entry below `root` (relative paths), skipping `skip` at the top level.
fn walk(root: &Path, skip: Option<&str>) -> Result<BTreeMap<String, Seen>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    // Bounded: the tree is small; a runaway listing is a failure.
    for _ in 0..10_000 {
        let Some(dir) = stack.pop() else {
            return Ok(out);
        };
        let abs = root.join(&dir);
        let rd = fs::read_dir(&abs).map_err(|e| format!("readdir {dir:?}: {e}"))?;
        for ent in rd {
            let ent = ent.map_err(|e| format!("readdir {dir:?} entry: {e}"))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if dir.is_empty() && Some(name.as_str()) == skip {
                continue;
            }
            let rel = join(&dir, &name);
            let md = fs::symlink_metadata(root.join(&rel))
                .map_err(|e| format!("lstat {rel:?} (listed by readdir): {e}"))?;
            let ft = md.file_type();
            let seen = if ft.is_dir() {
                stack.push(rel.clone());
                Seen::Dir
            } else if ft.is_file() {
                Seen::File(md.len())
            } else {
                Seen::Other(format!(
                    "{:?}{}",
                    ft,
                    if ft.is_symlink() { " (symlink)" } else { "" }
                ))
            };
            if out.insert(rel.clone(), seen).is_some() {
                return Err(format!("readdir listed {rel:?} twice"));
            }
        }
    }
    Err("tree walk did not finish within 10000 directories".to_string())
}

/// First difference between two byte strings, described without dumping them.
fn diff_bytes(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected == actual {
        return None;
    }
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    let show = |d: &[u8]| {
        let end = (first + 16).min(d.len());
        format!("{:02x?}", &d[first.min(d.len())..end])
    };
    let mut differing = 0usize;
    for (a, b) in expected.iter().zip(actual) {
        differing += usize::from(a != b);
    }
    Some(format!(
        "expected {} bytes, actual {} bytes; first difference at offset {first} (block {}, +{}); \
         {differing} differing bytes in the common length; expected {} actual {} from there",
        expected.len(),
        actual.len(),
        first as u64 / BLOCK,
        first as u64 % BLOCK,
        show(expected),
        show(actual)
    ))
}

/// Compare names, kinds and sizes of the whole tree; contents of `contents` (all files if
/// None).
fn compare_tree(
    model: &Model,
    seen: &BTreeMap<String, Seen>,
    contents: Option<&BTreeSet<String>>,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for (path, node) in &model.nodes {
        match (node, seen.get(path)) {
            (_, None) => problems.push(format!("{path}: missing (expected {})", kind(node))),
            (Node::Dir, Some(Seen::Dir)) => {}
            (Node::File(d), Some(Seen::File(len))) => {
                if d.len() as u64 != *len {
                    problems.push(format!(
                        "{path}: size {len}, expected {} (diff {})",
                        d.len(),
                        *len as i64 - d.len() as i64
                    ));
                }
            }
            (_, Some(s)) => problems.push(format!("{path}: is {s:?}, expected {}", kind(node))),
        }
    }
    for (path, s) in seen {
        if !model.nodes.contains_key(path) {
            problems.push(format!("{path}: unexpected {s:?}"));
        }
    }
    if problems.is_empty() {
        for (path, node) in &model.nodes {
            let Node::File(expected) = node else { continue };
            if contents.is_some_and(|c| !c.contains(path)) {
                continue;
            }
            match read(path) {
                Ok(actual) => {
                    if let Some(d) = diff_bytes(expected, &actual) {
                        problems.push(format!("{path}: contents differ: {d}"));
                    }
                }
                Err(e) => problems.push(format!("{path}: reading failed: {e}")),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let n = problems.len();
        problems.truncate(12);
        Err(format!(
            "{n} difference(s):\n    {}",
            problems.join("\n    ")
        ))
    }
}

fn kind(n: &Node) -> String {
    match n {
        Node::Dir => "a directory".to_string(),
        Node::File(d) => format!("a file of {} bytes", d.len()),
    }
}

// ---------------------------------------------------------------------------------------
// watchdog
// ---------------------------------------------------------------------------------------

/// Kills the daemon (by its PID) and detaches its mount if one step takes too long, so a
/// hung FUSE request makes the blocked call fail instead of hanging the test.
struct Watchdog {
    state: Arc<Mutex<Option<(Instant, u32, PathBuf)>>>,
    fired: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start() -> Watchdog {
        let state: Arc<Mutex<Option<(Instant, u32, PathBuf)>>> = Arc::new(Mutex::new(None));
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, st) = (state.clone(), fired.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most two hours of 200 ms ticks.
            for _ in 0..36_000 {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let due = {
                    let g = s.lock().unwrap_or_else(|e| e.into_inner());
                    match &*g {
                        Some((deadline, pid, mnt)) if Instant::now() > *deadline => {
                            Some((*pid, mnt.clone()))
                        }
                        _ => None,
                    }
                };
                if let Some((pid, mnt)) = due {
                    eprintln!(
                        "model watchdog: a step took longer than {STEP_TIMEOUT:?}; killing daemon pid {pid} and detaching {}",
                        mnt.display()
                    );
                    f.store(true, Ordering::SeqCst);
                    if pid != 0 {
                        // SAFETY: plain kill(2) of the daemon this test started.
                        unsafe {
                            libc::kill(pid as libc::pid_t, libc::SIGKILL);
                        }
                    }
                    force_unmount(&mnt);
                    *s.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Watchdog {
            state,
            fired,
            stop,
            thread: Some(thread),
        }
    }

    fn arm(&self, mount: &Mount, timeout: Duration) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some((
            Instant::now() + timeout,
            mount.pid(),
            mount.mountpoint.clone(),
        ));
    }

    fn disarm(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether it fired since the last call.
    fn take_fired(&self) -> bool {
        self.fired.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// a session: one bucket, one cache dir, a sequence of mounts
// ---------------------------------------------------------------------------------------

enum Bucket<'a> {
    Local(TempDir),
    S3 { moto: &'a Moto, name: String },
}

struct Session<'a> {
    cfg: &'a Config,
    bucket: Bucket<'a>,
    cache: TempDir,
    mount: Option<Mount>,
    /// Caches of earlier fresh-cache remounts, kept until the end (the old daemon is gone,
    /// but a failure may want to look at them).
    old_caches: Vec<TempDir>,
}

/// Run `f`, turning a panic (a harness assertion, e.g. an unmount exiting non-zero) into an
/// error message.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "<non-string panic>".to_string());
        format!("{what} panicked: {msg}")
    })
}

impl<'a> Session<'a> {
    fn new(cfg: &'a Config, moto: Option<&'a Moto>) -> Session<'a> {
        let bucket = match moto {
            Some(moto) => {
                let name = unique_name(&format!("model-{}", cfg.name));
                moto.create_bucket(&name);
                Bucket::S3 { moto, name }
            }
            None => Bucket::Local(temp_dir(&format!("model-bucket-{}", cfg.name))),
        };
        Session {
            cfg,
            bucket,
            cache: temp_dir(&format!("model-cache-{}", cfg.name)),
            mount: None,
            old_caches: Vec::new(),
        }
    }

    fn mount(&mut self) -> Result<(), String> {
        let cache = self.cache.path().to_path_buf();
        let cfg = self.cfg;
        let m = match &self.bucket {
            Bucket::Local(dir) => {
                let source = dir.path().to_string_lossy().into_owned();
                guarded("mount", || {
                    Mount::start_with_cache(&source, cfg.mode, &cache, &cfg.extra_args, &[])
                })?
            }
            Bucket::S3 { moto, name } => guarded("mount", || {
                Mount::s3_with_cache(moto, name, cfg.mode, &cache, &cfg.extra_args)
            })?,
        };
        self.mount = Some(m);
        Ok(())
    }

    fn unmount(&mut self) -> Result<(), String> {
        match self.mount.take() {
            Some(m) => guarded("clean unmount", || m.unmount()),
            None => Ok(()),
        }
    }

    fn root(&self) -> &Path {
        &self.mount.as_ref().expect("mounted").mountpoint
    }

    fn log_tail(&self) -> String {
        match &self.mount {
            Some(m) => tail(&m.log(), 30),
            None => String::from("<not mounted>"),
        }
    }

    /// The bucket itself matches the model (after a clean unmount).
    fn check_bucket(&self, model: &Model) -> Result<(), String> {
        match &self.bucket {
            Bucket::Local(dir) => {
                let seen = walk(dir.path(), Some(".bucketgate"))?;
                let root = dir.path().to_path_buf();
                compare_tree(model, &seen, None, &mut |p| {
                    fs::read(root.join(p)).map_err(|e| e.to_string())
                })
            }
            Bucket::S3 { moto, name } => {
                let keys = guarded("list_keys", || moto.list_keys(name, ""))?;
                let mut seen = BTreeMap::new();
                let mut problems = Vec::new();
                for k in keys {
                    if k.starts_with(".bucketgate/") {
                        continue;
                    }
                    if let Some(d) = k.strip_suffix('/') {
                        seen.insert(d.to_string(), Seen::Dir);
                    } else {
                        // Size is checked with the contents below.
                        let len = model.file_len(&k).unwrap_or(0);
                        seen.insert(k, Seen::File(len));
                    }
                }
                // Every directory of the model has its marker; a key below a directory
                // also implies it, but bucketgate writes markers, so require them.
                if let Err(e) =
                    compare_tree(
                        model,
                        &seen,
                        Some(&BTreeSet::new()),
                        &mut |_| Ok(Vec::new()),
                    )
                {
                    problems.push(format!("keys: {e}"));
                }
                for (path, node) in &model.nodes {
                    if let (Node::File(expected), Some(Seen::File(_))) = (node, seen.get(path)) {
                        let actual = guarded("get_object", || moto.get_object(name, path))?;
                        if let Some(d) = diff_bytes(expected, &actual) {
                            problems.push(format!("object {path}: {d}"));
                        }
                    }
                }
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems.join("\n"))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// one run: generate (or replay) operations, check after every step
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Failure {
    /// What kind of check failed; shrinking keeps only lists that fail the same way.
    kind: &'static str,
    /// Index of the failing op in the run's list; `ops.len()` for the final checks.
    step: usize,
    what: String,
}

enum Source {
    Generate,
    Replay(Vec<Op>),
}

struct Outcome {
    ops: Vec<Op>,
    result: Result<(), Failure>,
    elapsed: Duration,
    remounts: usize,
    errors_predicted: usize,
}

fn run(cfg: &Config, moto: Option<&Moto>, source: Source, wd: &Watchdog, quiet: bool) -> Outcome {
    let started = Instant::now();
    let mut session = Session::new(cfg, moto);
    let mut model = Model::default();
    let mut gen = Gen {
        rng: Rng::new(cfg.seed),
        cfg,
    };
    let (total, replay) = match source {
        Source::Generate => (cfg.ops, None),
        Source::Replay(ops) => (ops.len(), Some(ops)),
    };
    let mut ops: Vec<Op> = Vec::with_capacity(total);
    let mut remounts = 0;
    let mut errors_predicted = 0;
    macro_rules! outcome {
        ($result:expr) => {
            return Outcome {
                ops,
                result: $result,
                elapsed: started.elapsed(),
                remounts,
                errors_predicted,
            }
        };
    }
    if let Err(what) = session.mount() {
        outcome!(Err(Failure {
            kind: "mount",
            step: 0,
            what
        }));
    }
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    for step in 0..total {
        if replay.is_none() && started.elapsed() > cfg.budget {
            eprintln!(
                "model {}: TIME BUDGET {:?} used up after {step} of {total} ops; checking what ran",
                cfg.name, cfg.budget
            );
            break;
        }
        let op = match &replay {
            Some(list) => list[step].clone(),
            None => gen.next_op(&model, step),
        };
        ops.push(op.clone());
        let mount_ref = session.mount.as_ref().expect("mounted between steps");
        wd.arm(mount_ref, STEP_TIMEOUT);
        let expected = model.apply(&op);
        let mut full = step % FULL_COMPARE_EVERY == FULL_COMPARE_EVERY - 1;
        let actual = match &op {
            Op::Remount { fresh_cache } => {
                remounts += 1;
                full = true;
                let r = session
                    .unmount()
                    .map_err(|w| ("unmount", w))
                    .and_then(|()| {
                        if *fresh_cache {
                            let fresh = temp_dir(&format!("model-cache-{}", cfg.name));
                            let old = std::mem::replace(&mut session.cache, fresh);
                            session.old_caches.push(old);
                        }
                        session.mount().map_err(|w| ("mount", w))
                    });
                if let Err((kind, what)) = r {
                    wd.disarm();
                    outcome!(Err(Failure { kind, step, what }));
                }
                Ok(())
            }
            _ => exec(&op, session.root()),
        };
        if expected.is_err() {
            errors_predicted += 1;
        }
        let mut problem = None;
        if expected != actual {
            problem = Some((
                "errno",
                format!(
                    "the call returned {}, the model expected {}",
                    show(&actual),
                    show(&expected)
                ),
            ));
        } else {
            dirty.extend(model.touched(&op));
            let root = session.root().to_path_buf();
            let check = walk(&root, None).and_then(|seen| {
                compare_tree(
                    &model,
                    &seen,
                    if full { None } else { Some(&dirty) },
                    &mut |p| fs::read(root.join(p)).map_err(|e| e.to_string()),
                )
            });
            if let Err(e) = check {
                problem = Some((
                    "data",
                    format!(
                        "after the call ({}), the mount differs from the model ({} compare): {e}",
                        show(&actual),
                        if full { "full" } else { "incremental" }
                    ),
                ));
            }
            if full {
                dirty.clear();
            }
        }
        wd.disarm();
        if wd.take_fired() {
            problem = Some((
                "watchdog",
                format!(
                    "the step took longer than {STEP_TIMEOUT:?} (watchdog killed the daemon); {}",
                    problem.map(|p| p.1).unwrap_or_default()
                ),
            ));
        }
        if let Some((kind, what)) = problem {
            let what = format!("{what}\n  daemon log tail:\n{}", session.log_tail());
            outcome!(Err(Failure { kind, step, what }));
        }
        if !quiet && step % 500 == 499 {
            eprintln!(
                "model {}: {} ops ok ({} entries, {} KiB, {:.1?})",
                cfg.name,
                step + 1,
                model.nodes.len(),
                model.total_bytes() / KIB,
                started.elapsed()
            );
        }
    }
    // Final checks: full compare, clean unmount, the bucket itself, then a mount on a
    // fresh cache again (the tree comes back from the bucket alone).
    let n = ops.len();
    let root = session.root().to_path_buf();
    let check = walk(&root, None).and_then(|seen| {
        compare_tree(&model, &seen, None, &mut |p| {
            fs::read(root.join(p)).map_err(|e| e.to_string())
        })
    });
    if let Err(e) = check {
        let what = format!("final full compare through the mount: {e}");
        outcome!(Err(Failure {
            kind: "data",
            step: n,
            what
        }));
    }
    if let Err(what) = session.unmount() {
        outcome!(Err(Failure {
            kind: "unmount",
            step: n,
            what
        }));
    }
    if let Err(e) = session.check_bucket(&model) {
        let what = format!("after the final clean unmount, the bucket differs from the model: {e}");
        outcome!(Err(Failure {
            kind: "data",
            step: n,
            what
        }));
    }
    outcome!(Ok(()))
}

// ---------------------------------------------------------------------------------------
// shrinking and reporting
// ---------------------------------------------------------------------------------------

/// Replay reduced op lists on fresh buckets and mounts, keeping any list that still fails:
/// cut to the failing prefix, then drop chunks (halving their size), bounded in replays and
/// time. Returns the smallest failing list with its failure, and how many replays ran.
fn shrink(
    cfg: &Config,
    moto: Option<&Moto>,
    ops: &[Op],
    failure: &Failure,
    wd: &Watchdog,
) -> (Vec<Op>, Option<Failure>, usize) {
    let started = Instant::now();
    let mut best: Vec<Op> = ops[..(failure.step + 1).min(ops.len())].to_vec();
    let mut best_failure;
    let mut replays = 0;
    let try_list = |list: Vec<Op>, replays: &mut usize| -> Option<(Vec<Op>, Failure)> {
        *replays += 1;
        let out = run(cfg, moto, Source::Replay(list), wd, true);
        match out.result {
            Err(f) if f.kind == failure.kind => {
                // Keep only what ran up to the failure.
                let mut l = out.ops;
                l.truncate((f.step + 1).min(l.len()));
                Some((l, f))
            }
            Err(f) => {
                eprintln!(
                    "model {}: shrink: a reduced list failed differently ({}), not kept: {}",
                    cfg.name,
                    f.kind,
                    f.what.lines().next().unwrap_or("")
                );
                None
            }
            Ok(()) => None,
        }
    };
    // Does the prefix fail on its own (on a fresh mount)?
    match try_list(best.clone(), &mut replays) {
        Some((l, f)) => {
            best = l;
            best_failure = Some(f);
        }
        None => {
            eprintln!(
                "model {}: replaying the {} ops up to the failure on a fresh mount did not fail \
                 the same way; the failure may depend on timing. Not shrinking.",
                cfg.name,
                best.len()
            );
            return (best, None, replays);
        }
    }
    // Cheap whole-list passes first: drop every call that fails anyway (the model says
    // so), then every fsync, then every remount.
    type Keep = fn(&Op, &Res) -> bool;
    let passes: [Keep; 3] = [
        |_, r| r.is_ok(),
        |op, _| !matches!(op, Op::Fsync { .. }),
        |op, _| !matches!(op, Op::Remount { .. }),
    ];
    for keep in passes {
        let mut m = Model::default();
        let cand: Vec<Op> = best
            .iter()
            .enumerate()
            .filter(|(i, op)| {
                let r = m.apply(op);
                *i + 1 == best.len() || keep(op, &r)
            })
            .map(|(_, op)| op.clone())
            .collect();
        if cand.len() == best.len() || started.elapsed() > SHRINK_MAX_TIME {
            continue;
        }
        if let Some((l, f)) = try_list(cand, &mut replays) {
            eprintln!(
                "model {}: shrink: {} -> {} ops, still fails",
                cfg.name,
                best.len(),
                l.len()
            );
            best = l;
            best_failure = Some(f);
        }
    }
    let mut chunk = (best.len() / 2).max(1);
    // Bounded by the replay and time budget; the count bound is a backstop.
    'outer: for _ in 0..SHRINK_MAX_REPLAYS * 4 {
        let mut i = 0;
        let mut removed = false;
        while i < best.len() {
            if replays >= SHRINK_MAX_REPLAYS || started.elapsed() > SHRINK_MAX_TIME {
                break 'outer;
            }
            let end = (i + chunk).min(best.len());
            let mut cand = best[..i].to_vec();
            cand.extend_from_slice(&best[end..]);
            if cand.is_empty() {
                i = end;
                continue;
            }
            match try_list(cand, &mut replays) {
                Some((l, f)) => {
                    eprintln!(
                        "model {}: shrink: {} -> {} ops, still fails",
                        cfg.name,
                        best.len(),
                        l.len()
                    );
                    best = l;
                    best_failure = Some(f);
                    removed = true;
                }
                None => i = end,
            }
        }
        if chunk == 1 && !removed {
            break;
        }
        if !removed {
            chunk = (chunk / 2).max(1);
        }
        chunk = chunk.min((best.len() / 2).max(1));
    }
    (best, best_failure, replays)
}

fn listing(cfg: &Config, ops: &[Op]) -> String {
    let mut model = Model::default();
    let mut out = String::new();
    for (i, op) in ops.iter().enumerate() {
        let expect = show(&model.apply(op));
        out.push_str(&format!("  {:>4}. {op}   => {expect}\n", i + 1));
    }
    out.push_str("  as shell commands:\n");
    for line in SHELL_PRELUDE.lines() {
        out.push_str(&format!("    {line}\n"));
    }
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let expect = show(&model.apply(op));
        out.push_str(&format!(
            "    {}   # {}. expect {expect}\n",
            op.shell(cfg.mode),
            i + 1
        ));
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn model_test(mut cfg: Config, moto: Option<&Moto>) {
    if let Some(seed) = env_u64("BUCKETGATE_MODEL_SEED") {
        cfg.seed = seed;
    }
    if let Some(n) = env_u64("BUCKETGATE_MODEL_OPS") {
        cfg.ops = n as usize;
    }
    let wd = Watchdog::start();
    eprintln!(
        "model {}: mode {}, {} backend, seed {:#x}, {} ops",
        cfg.name,
        cfg.mode,
        if cfg.s3 {
            "s3 (moto)"
        } else {
            "local directory"
        },
        cfg.seed,
        cfg.ops
    );
    let out = run(&cfg, moto, Source::Generate, &wd, false);
    let Err(failure) = out.result else {
        eprintln!(
            "model {}: PASSED {} ops ({} remounts, {} calls that had to fail did) in {:.1?}; seed {:#x}",
            cfg.name,
            out.ops.len(),
            out.remounts,
            out.errors_predicted,
            out.elapsed,
            cfg.seed
        );
        return;
    };
    let step_desc = match out.ops.get(failure.step) {
        Some(op) => format!("step {} ({op})", failure.step + 1),
        None => format!("the final checks after {} ops", out.ops.len()),
    };
    eprintln!(
        "\n==== model {} FAILED: mode {}, seed {:#x}, at {step_desc}\n{}\n",
        cfg.name, cfg.mode, cfg.seed, failure.what
    );
    let (min, min_failure, replays) = shrink(&cfg, moto, &out.ops, &failure, &wd);
    let min_desc = match &min_failure {
        Some(f) => format!(
            "minimal failing list ({} ops, after {replays} replays) fails at {}:\n{}",
            min.len(),
            match min.get(f.step) {
                Some(op) => format!("step {} ({op})", f.step + 1),
                None => "the final checks (after the last op: full compare, clean unmount, bucket)"
                    .to_string(),
            },
            f.what
        ),
        None => format!(
            "could not reproduce the same failure on a fresh mount ({replays} replays); the ops up to the failure ({}):",
            min.len()
        ),
    };
    eprintln!(
        "==== model {}: {min_desc}\n{}",
        cfg.name,
        listing(&cfg, &min)
    );
    panic!(
        "model {} (mode {}, seed {:#x}) failed at {step_desc}: {}\n(minimal list: {} ops, printed above; rerun with BUCKETGATE_MODEL_SEED={:#x} BUCKETGATE_MODEL_OPS={})",
        cfg.name,
        cfg.mode,
        cfg.seed,
        failure.what.lines().next().unwrap_or(""),
        min.len(),
        cfg.seed,
        out.ops.len()
    );
}

/// The fixed seeds of the five runs (local cached, sync, write-through; s3 cached,
/// write-through), so CI is deterministic.
const SEEDS: [u64; 5] = [
    0xB0C4_E7A7_0001,
    0xB0C4_E7A7_0002,
    0xB0C4_E7A7_0003,
    0xB0C4_E7A7_0004,
    0xB0C4_E7A7_0005,
];

fn local(name: &'static str, mode: &'static str, seed: u64) -> Config {
    Config {
        name,
        mode,
        s3: false,
        seed,
        ops: 1800,
        max_file: 3 * MIB + 200 * KIB,
        big_pct: 4,
        max_total: 16 * MIB,
        remounts: 5,
        extra_args: vec!["--upload-delay", "50ms"],
        budget: Duration::from_secs(170),
    }
}

fn s3(name: &'static str, mode: &'static str, seed: u64) -> Config {
    Config {
        name,
        mode,
        s3: true,
        seed,
        ops: 300,
        max_file: 160 * KIB,
        big_pct: 0,
        max_total: MIB,
        remounts: 3,
        extra_args: vec!["--upload-delay", "100ms"],
        budget: Duration::from_secs(120),
    }
}

#[test]
fn model_local_cached() {
    let mut cfg = local("local-cached", "cached", SEEDS[0]);
    // A cache smaller than the data: clean blocks get evicted and fetched again.
    cfg.extra_args.extend(["--cache-size", "6M"]);
    model_test(cfg, None);
}

#[test]
fn model_local_sync() {
    model_test(local("local-sync", "sync", SEEDS[1]), None);
}

#[test]
fn model_local_write_through() {
    model_test(
        local("local-write-through", "write-through", SEEDS[2]),
        None,
    );
}

#[test]
fn model_s3_cached_and_write_through() {
    let moto = Moto::start();
    // Run both; report both before failing.
    let results: Vec<(&str, Result<(), String>)> = [
        s3("s3-cached", "cached", SEEDS[3]),
        s3("s3-write-through", "write-through", SEEDS[4]),
    ]
    .into_iter()
    .map(|cfg| {
        let name = cfg.name;
        (name, guarded(name, || model_test(cfg, Some(&moto))))
    })
    .collect();
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e}")))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn model_generator_and_model_are_deterministic() {
    // No mount: the same seed gives the same ops and the same model, and the model agrees
    // with a few hand-checked POSIX answers.
    let cfg = local("unit", "cached", 42);
    let gen_ops = |seed| {
        let mut g = Gen {
            rng: Rng::new(seed),
            cfg: &cfg,
        };
        let mut m = Model::default();
        let mut ops = Vec::new();
        for step in 0..400 {
            let op = g.next_op(&m, step);
            let _ = m.apply(&op);
            ops.push(op.to_string());
        }
        (ops, m.nodes.len(), m.total_bytes())
    };
    // The generated runs keep a populated tree and mostly successful calls.
    for cfg in [
        local("local-cached", "cached", SEEDS[0]),
        local("local-sync", "sync", SEEDS[1]),
        local("local-write-through", "write-through", SEEDS[2]),
        s3("s3-cached", "cached", SEEDS[3]),
        s3("s3-write-through", "write-through", SEEDS[4]),
    ] {
        let mut g = Gen {
            rng: Rng::new(cfg.seed),
            cfg: &cfg,
        };
        let mut m = Model::default();
        let (mut errors, mut entries, mut max_len) = (0usize, 0usize, 0u64);
        for step in 0..cfg.ops {
            let op = g.next_op(&m, step);
            errors += usize::from(m.apply(&op).is_err());
            entries += m.nodes.len();
            max_len = max_len.max(
                m.nodes
                    .values()
                    .map(|n| match n {
                        Node::File(d) => d.len() as u64,
                        Node::Dir => 0,
                    })
                    .max()
                    .unwrap_or(0),
            );
        }
        let avg = entries / cfg.ops;
        eprintln!(
            "generator {}: {errors} of {} calls fail, {avg} entries on average, largest file {max_len}",
            cfg.name, cfg.ops
        );
        assert!(
            errors * 100 < cfg.ops * 40,
            "{}: too many failing calls",
            cfg.name
        );
        assert!(avg >= 5, "{}: tree too small", cfg.name);
        assert!(max_len <= cfg.max_file, "{}: file over the limit", cfg.name);
    }
    assert_eq!(gen_ops(7), gen_ops(7));
    assert_ne!(gen_ops(7).0, gen_ops(8).0);

    let mut m = Model::default();
    let w = |path: &str, off, len| Op::Write {
        path: path.to_string(),
        create: true,
        mode: WriteMode::Plain,
        chunks: vec![Chunk {
            off,
            len,
            pat: Pattern { seed: 1, mul: 3 },
        }],
        fsync_after: None,
    };
    let s = |p: &str| p.to_string();
    assert_eq!(m.apply(&Op::Mkdir { path: s("d") }), Ok(()));
    assert_eq!(m.apply(&w("d/f", 10, 5)), Ok(()));
    assert_eq!(m.file_len("d/f"), Some(15));
    assert_eq!(m.apply(&Op::Rmdir { path: s("d") }), Err(libc::ENOTEMPTY));
    assert_eq!(m.apply(&Op::Unlink { path: s("d") }), Err(libc::EISDIR));
    assert_eq!(m.apply(&Op::Rmdir { path: s("d/f") }), Err(libc::ENOTDIR));
    assert_eq!(m.apply(&w("d/f/x", 0, 1)), Err(libc::ENOTDIR));
    assert_eq!(m.apply(&w("nope/x", 0, 1)), Err(libc::ENOENT));
    assert_eq!(m.apply(&w("d", 0, 1)), Err(libc::EISDIR));
    let mv = |a: &str, b: &str| Op::Rename {
        from: s(a),
        to: s(b),
    };
    assert_eq!(m.apply(&mv("d", "d/e")), Err(libc::EINVAL));
    assert_eq!(m.apply(&mv("d/f", "d")), Err(libc::ENOTEMPTY));
    assert_eq!(m.apply(&Op::Mkdir { path: s("e") }), Ok(()));
    assert_eq!(m.apply(&mv("d/f", "e")), Err(libc::EISDIR));
    assert_eq!(m.apply(&mv("e", "d/f")), Err(libc::ENOTDIR));
    assert_eq!(m.apply(&mv("e", "d")), Err(libc::ENOTEMPTY));
    assert_eq!(m.apply(&mv("d", "e")), Ok(()));
    assert_eq!(m.file_len("e/f"), Some(15));
    assert_eq!(m.apply(&Op::Mkdir { path: s("e") }), Err(libc::EEXIST));
    assert_eq!(
        m.apply(&Op::Create {
            path: s("e/f"),
            excl: true
        }),
        Err(libc::EEXIST)
    );
    assert_eq!(
        m.nodes.get("e/f"),
        Some(&Node::File(
            [vec![0u8; 10], Pattern { seed: 1, mul: 3 }.bytes(5)].concat()
        ))
    );
}
