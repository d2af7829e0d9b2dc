//! One place for configuration: command-line flags and a TOML file, merged and validated.
//!
//! Every option has one default, written in [`Defaults`]; a flag wins over the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

use crate::backend::KeyLayout;

/// How writes and reads reach the bucket. See README "Modes and guarantees".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Write-back: close/fsync return once data is durable in the local cache.
    Cached,
    /// As cached, but the cache keeps a full copy and never evicts.
    Sync,
    /// Writes stream to the bucket; close/fsync return once the object is complete there.
    WriteThrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cached => "cached",
            Mode::Sync => "sync",
            Mode::WriteThrough => "write-through",
        }
    }

    /// Whether file data is kept in the local cache after it is uploaded.
    pub fn keeps_data(self) -> bool {
        !matches!(self, Mode::WriteThrough)
    }
}

/// Whether the kernel may read and write cached files itself (FUSE passthrough).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Passthrough {
    /// Where the kernel and the mount's privileges allow it (cached and sync modes).
    Auto,
    /// Every read and write goes through the daemon.
    Off,
}

/// Whether the mount keeps an attribute index per directory in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttrIndexing {
    /// Written after uploads, read by a fresh mount's first listing of a directory.
    On,
    /// Neither written nor read: each listed file's attributes come from its HEAD.
    Off,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("missing `{0}`: give it on the command line or in the config file")]
    Missing(&'static str),
}

/// The written-once defaults; README's option table matches these.
pub struct Defaults;

impl Defaults {
    pub const MODE: Mode = Mode::Cached;
    pub const PASSTHROUGH: Passthrough = Passthrough::Auto;
    pub const ATTR_INDEX: AttrIndexing = AttrIndexing::On;
    pub const CACHE_SIZE: u64 = 10 << 30;
    pub const PART_SIZE: u64 = 8 << 20;
    pub const UPLOAD_CONCURRENCY: usize = 4;
    /// A write-through writer waits on its stream, so it keeps more parts in flight:
    /// writing 1 GiB to s3rver, 4/5/6 parts gave a median of 103/108/111 MiB/s (boto3 at
    /// 8: 130), and the daemon's peak went from 69 to 85 MiB.
    pub const WRITE_THROUGH_UPLOAD_CONCURRENCY: usize = 6;
    pub const UPLOAD_DELAY_MS: u64 = 1000;
    pub const FLUSH_TIMEOUT_SECS: u64 = 300;
    pub const DIRTY_WAIT_SECS: u64 = 60;
    pub const RETRIES: usize = 4;
    pub const REQUEST_TIMEOUT_SECS: u64 = 60;
    /// Listings older than this are checked against the bucket again. Between mountpoint-s3
    /// (1 s) and rclone's directory cache (5 min): other tools' changes show within
    /// seconds, for one LIST per directory in use per period.
    pub const META_TTL_SECS: u64 = 5;
    pub const REGION: &'static str = "us-east-1";
    pub const UMASK: u32 = 0o022;
}

/// The S3 minimum part size: every part but the last must be at least this big.
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The S3 maximum part size.
pub const MAX_PART_SIZE: u64 = 5 << 30;

/// Options of `bucketgate mount`, as flags. Every field is optional so the TOML file can
/// supply it; [`MountConfig::resolve`] merges and validates.
#[derive(Debug, Clone, Default, Args)]
pub struct MountArgs {
    /// Bucket to mount: a local directory, fs:///abs/path, s3://BUCKET[/PREFIX],
    /// oss://BUCKET[/PREFIX] or memory://
    pub source: Option<String>,
    /// Directory to mount on
    pub mountpoint: Option<PathBuf>,
    /// cached (default), sync or write-through
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Local cache directory (default: one per mount point under /var/cache/bucketgate)
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// auto (default): a file whose bytes are all in the cache is read and written by
    /// the kernel itself (FUSE passthrough; needs kernel 6.9+ and root); off: never
    #[arg(long, value_enum)]
    pub passthrough: Option<Passthrough>,
    /// on (default): keep one small index object per directory with the attributes of
    /// the files stored there, so a fresh mount lists it without a HEAD per file; off:
    /// neither write nor read one
    #[arg(long, value_enum)]
    pub attr_index: Option<AttrIndexing>,
    /// How paths map to keys: plain (default; key = path) or hashed[:N] (key = first N
    /// hex chars of the path's MD5, `/`, path; N 1..8, default 4)
    #[arg(long)]
    pub key_layout: Option<String>,
    /// Cache size limit, e.g. 512M, 20G (default 10G)
    #[arg(long)]
    pub cache_size: Option<String>,
    /// First multipart part size, e.g. 8M (grows as a file grows; minimum 5M)
    #[arg(long)]
    pub part_size: Option<String>,
    /// Parts uploaded in parallel per file, and files uploaded in parallel (default 4; 6 in
    /// write-through)
    #[arg(long)]
    pub upload_concurrency: Option<usize>,
    /// Quiet period before a written file is uploaded in cached/sync mode, e.g. 1s, 500ms
    #[arg(long)]
    pub upload_delay: Option<String>,
    /// How long `umount`/SIGTERM wait for uploads before unmounting anyway, e.g. 300s
    #[arg(long)]
    pub flush_timeout: Option<String>,
    /// How long a writer waits for uploads to make room when unsent data fills the cache,
    /// before it gets ENOSPC, e.g. 60s
    #[arg(long)]
    pub dirty_wait: Option<String>,
    /// Retries of a failed bucket request (the first after 250 ms, each later pause 3x the one before, with jitter; default 4)
    #[arg(long)]
    pub retries: Option<usize>,
    /// Time limit of one bucket request, e.g. 60s
    #[arg(long)]
    pub request_timeout: Option<String>,
    /// How long directory listings and attributes are trusted before they are checked
    /// against the bucket again, e.g. 5s, 1m, 0 (every access) or never (default 5s)
    #[arg(long)]
    pub meta_ttl: Option<String>,
    /// S3/OSS endpoint URL, e.g. http://127.0.0.1:9000
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Region (default us-east-1)
    #[arg(long)]
    pub region: Option<String>,
    /// Credentials file (TOML with access_key_id and secret_access_key; mode 0600)
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// TOML config file; flags win over it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stay in the foreground (systemd, debugging)
    #[arg(long)]
    pub foreground: bool,
    /// Mount options: allow_other, uid=N, gid=N, umask=NNN, ro
    #[arg(short = 'o', value_delimiter = ',')]
    pub options: Vec<String>,
}

/// The TOML file's shape: the same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    source: Option<String>,
    mountpoint: Option<PathBuf>,
    mode: Option<Mode>,
    cache_dir: Option<PathBuf>,
    passthrough: Option<Passthrough>,
    attr_index: Option<AttrIndexing>,
    key_layout: Option<String>,
    cache_size: Option<String>,
    part_size: Option<String>,
    upload_concurrency: Option<usize>,
    upload_delay: Option<String>,
    flush_timeout: Option<String>,
    dirty_wait: Option<String>,
    retries: Option<usize>,
    request_timeout: Option<String>,
    meta_ttl: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    credentials: Option<PathBuf>,
    options: Option<Vec<String>>,
}

/// Options given with `-o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub allow_other: bool,
    pub read_only: bool,
    /// Owner of objects without uid metadata (default: the daemon's user).
    pub uid: u32,
    pub gid: u32,
    /// Applied to objects without mode metadata.
    pub umask: u32,
}

/// The merged, validated configuration of one mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub source: String,
    pub mountpoint: PathBuf,
    pub mode: Mode,
    pub cache_dir: PathBuf,
    pub passthrough: Passthrough,
    pub attr_index: AttrIndexing,
    pub key_layout: KeyLayout,
    pub cache_size: u64,
    pub part_size: u64,
    pub upload_concurrency: usize,
    pub upload_delay: Duration,
    pub flush_timeout: Duration,
    pub dirty_wait: Duration,
    pub retries: usize,
    pub request_timeout: Duration,
    /// How long listings are trusted; `None`: forever (never checked again).
    pub meta_ttl: Option<Duration>,
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: Option<PathBuf>,
    pub options: MountOptions,
    pub foreground: bool,
}

impl MountConfig {
    /// Merges flags over the TOML file (if any) and validates every value.
    pub fn resolve(args: &MountArgs) -> Result<MountConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let source = args
            .source
            .clone()
            .or(file.source)
            .ok_or(ConfigError::Missing("source"))?;
        let mountpoint = args
            .mountpoint
            .clone()
            .or(file.mountpoint)
            .ok_or(ConfigError::Missing("mountpoint"))?;
        let mountpoint = absolute(&mountpoint, "mountpoint")?;
        let cache_dir = match args.cache_dir.clone().or(file.cache_dir) {
            Some(dir) => absolute(&dir, "cache-dir")?,
            None => default_cache_dir(&mountpoint),
        };
        let key_layout = pick(
            "key-layout",
            &args.key_layout,
            &file.key_layout,
            KeyLayout::Plain,
            KeyLayout::parse,
        )?;
        let cache_size = pick(
            "cache-size",
            &args.cache_size,
            &file.cache_size,
            Defaults::CACHE_SIZE,
            parse_size,
        )?;
        let part_size = pick(
            "part-size",
            &args.part_size,
            &file.part_size,
            Defaults::PART_SIZE,
            parse_size,
        )?;
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(ConfigError::Invalid {
                key: "part-size",
                message: format!(
                    "{part_size} bytes is outside 5M..5G, the range S3 and OSS accept"
                ),
            });
        }
        let mode = args.mode.or(file.mode).unwrap_or(Defaults::MODE);
        let upload_concurrency = args
            .upload_concurrency
            .or(file.upload_concurrency)
            .unwrap_or(if mode == Mode::WriteThrough {
                Defaults::WRITE_THROUGH_UPLOAD_CONCURRENCY
            } else {
                Defaults::UPLOAD_CONCURRENCY
            });
        if !(1..=64).contains(&upload_concurrency) {
            return Err(ConfigError::Invalid {
                key: "upload-concurrency",
                message: format!("{upload_concurrency} is outside 1..64"),
            });
        }
        let upload_delay = pick(
            "upload-delay",
            &args.upload_delay,
            &file.upload_delay,
            Duration::from_millis(Defaults::UPLOAD_DELAY_MS),
            parse_duration,
        )?;
        let flush_timeout = pick(
            "flush-timeout",
            &args.flush_timeout,
            &file.flush_timeout,
            Duration::from_secs(Defaults::FLUSH_TIMEOUT_SECS),
            parse_duration,
        )?;
        let dirty_wait = pick(
            "dirty-wait",
            &args.dirty_wait,
            &file.dirty_wait,
            Duration::from_secs(Defaults::DIRTY_WAIT_SECS),
            parse_duration,
        )?;
        let request_timeout = pick(
            "request-timeout",
            &args.request_timeout,
            &file.request_timeout,
            Duration::from_secs(Defaults::REQUEST_TIMEOUT_SECS),
            parse_duration,
        )?;
        if request_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "request-timeout",
                message: "must be more than 0s".to_string(),
            });
        }
        let meta_ttl = pick(
            "meta-ttl",
            &args.meta_ttl,
            &file.meta_ttl,
            Some(Duration::from_secs(Defaults::META_TTL_SECS)),
            parse_ttl,
        )?;
        let retries = args.retries.or(file.retries).unwrap_or(Defaults::RETRIES);
        if retries > 100 {
            return Err(ConfigError::Invalid {
                key: "retries",
                message: format!("{retries} is outside 0..100"),
            });
        }
        let mut option_words = file.options.unwrap_or_default();
        option_words.extend(args.options.iter().cloned());
        let options = parse_mount_options(&option_words)?;
        Ok(MountConfig {
            source,
            mountpoint,
            mode,
            cache_dir,
            passthrough: args
                .passthrough
                .or(file.passthrough)
                .unwrap_or(Defaults::PASSTHROUGH),
            attr_index: args
                .attr_index
                .or(file.attr_index)
                .unwrap_or(Defaults::ATTR_INDEX),
            key_layout,
            cache_size,
            part_size,
            upload_concurrency,
            upload_delay,
            flush_timeout,
            dirty_wait,
            retries,
            request_timeout,
            meta_ttl,
            endpoint: args.endpoint.clone().or(file.endpoint),
            region: args
                .region
                .clone()
                .or(file.region)
                .unwrap_or_else(|| Defaults::REGION.to_string()),
            credentials: args.credentials.clone().or(file.credentials),
            options,
            foreground: args.foreground,
        })
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|err| ConfigError::Parse {
        path: path.to_path_buf(),
        message: err.to_string(),
    })
}

fn absolute(path: &Path, key: &'static str) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|err| ConfigError::Invalid {
        key,
        message: err.to_string(),
    })
}

/// One cache directory per mount point, so two mounts never share a cache.
pub fn default_cache_dir(mountpoint: &Path) -> PathBuf {
    let digest = md5::compute_hex(mountpoint.to_string_lossy().as_bytes());
    PathBuf::from("/var/cache/bucketgate").join(&digest[..16])
}

/// The flag's text, else the file's, parsed; else the default. Errors name the key.
fn pick<T>(
    key: &'static str,
    flag: &Option<String>,
    file: &Option<String>,
    default: T,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    match flag.as_ref().or(file.as_ref()) {
        Some(text) => parse(text).map_err(|message| ConfigError::Invalid { key, message }),
        None => Ok(default),
    }
}

/// Parses `123`, `64K`, `8M`, `10G`, `1T` (binary units; an optional `iB`/`B` suffix).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let stripped = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let number: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{trimmed}` is not a size; write e.g. 512M, 10G or a byte count"))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{trimmed}` is too large"))
}

/// Parses `500ms`, `2s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let bad = || format!("`{trimmed}` is not a duration; write e.g. 500ms, 2s, 5m");
    let (digits, unit_ms) = if let Some(n) = trimmed.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = trimmed.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = trimmed.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = trimmed.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (trimmed, 1000)
    };
    let number: u64 = digits.trim().parse().map_err(|_| bad())?;
    Ok(Duration::from_millis(
        number.checked_mul(unit_ms).ok_or_else(bad)?,
    ))
}

/// Parses a TTL: a duration (`0` included), or `never` for one that never expires.
pub fn parse_ttl(text: &str) -> Result<Option<Duration>, String> {
    if text.trim().eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    parse_duration(text)
        .map(Some)
        .map_err(|message| format!("{message}, 0 or never"))
}

fn parse_mount_options(words: &[String]) -> Result<MountOptions, ConfigError> {
    let mut options = MountOptions {
        allow_other: false,
        read_only: false,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        umask: Defaults::UMASK,
    };
    let invalid = |message: String| ConfigError::Invalid {
        key: "options",
        message,
    };
    for word in words.iter().map(|w| w.trim()).filter(|w| !w.is_empty()) {
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        };
        match (name, value) {
            ("allow_other", None) => options.allow_other = true,
            ("ro", None) => options.read_only = true,
            ("rw", None) => options.read_only = false,
            ("uid", Some(v)) => options.uid = v.parse().map_err(|_| invalid(format!("uid=`{v}` is not a number")))?,
            ("gid", Some(v)) => options.gid = v.parse().map_err(|_| invalid(format!("gid=`{v}` is not a number")))?,
            ("umask", Some(v)) => {
                let umask = u32::from_str_radix(v, 8).map_err(|_| invalid(format!("umask=`{v}` is not octal")))?;
                if umask > 0o777 {
                    return Err(invalid(format!("umask=`{v}` is above 777")));
                }
                options.umask = umask;
            }
            _ => {
                return Err(invalid(format!(
                    "unknown mount option `{word}`; accepted: allow_other, ro, rw, uid=N, gid=N, umask=NNN"
                )))
            }
        }
    }
    Ok(options)
}

/// A tiny MD5 front for places that only need a hex digest.
pub mod md5 {
    use md5::Digest;

    pub fn compute_hex(bytes: &[u8]) -> String {
        let digest = md5::Md5::digest(bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_ttl("never"), Ok(None));
        assert_eq!(parse_ttl("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_ttl("1s"), Ok(Some(Duration::from_secs(1))));
        assert!(parse_ttl("sometimes").unwrap_err().contains("never"));
    }

    #[test]
    fn flag_wins_over_file_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "source = \"memory://\"\nmountpoint = \"/mnt/x\"\nmode = \"sync\"\npart-size = \"16M\"\n")
            .expect("write config");
        let args = MountArgs {
            config: Some(path.clone()),
            mode: Some(Mode::WriteThrough),
            ..Default::default()
        };
        let config = MountConfig::resolve(&args).expect("valid config");
        assert_eq!(config.mode, Mode::WriteThrough);
        assert_eq!(config.part_size, 16 << 20);
        assert_eq!(config.source, "memory://");

        let args = MountArgs {
            config: Some(path.clone()),
            part_size: Some("1M".into()),
            ..Default::default()
        };
        let err = MountConfig::resolve(&args)
            .expect_err("1M part is too small")
            .to_string();
        assert!(err.contains("part-size"), "{err}");

        std::fs::write(
            &path,
            "source = \"memory://\"\nmountpoint = \"/mnt/x\"\ncache-sise = \"1G\"\n",
        )
        .expect("write config");
        let args = MountArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = MountConfig::resolve(&args)
            .expect_err("typo in key")
            .to_string();
        assert!(err.contains("cache-sise"), "{err}");
    }

    #[test]
    fn write_through_keeps_more_parts_in_flight_unless_told() {
        let concurrency = |mode: Mode, flag: Option<usize>| {
            let args = MountArgs {
                source: Some("memory://".into()),
                mountpoint: Some("/mnt/x".into()),
                mode: Some(mode),
                upload_concurrency: flag,
                ..Default::default()
            };
            MountConfig::resolve(&args)
                .expect("valid config")
                .upload_concurrency
        };
        assert_eq!(concurrency(Mode::Cached, None), 4);
        assert_eq!(concurrency(Mode::Sync, None), 4);
        assert_eq!(concurrency(Mode::WriteThrough, None), 6);
        assert_eq!(concurrency(Mode::WriteThrough, Some(2)), 2);
    }

    #[test]
    fn key_layout_from_file_and_flag_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "source = \"memory://\"\nmountpoint = \"/mnt/x\"\nkey-layout = \"hashed:2\"\n",
        )
        .expect("write config");
        let from_file = MountArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let config = MountConfig::resolve(&from_file).expect("valid config");
        assert_eq!(config.key_layout, KeyLayout::Hashed { chars: 2 });
        let flag = MountArgs {
            key_layout: Some("plain".into()),
            ..from_file
        };
        let config = MountConfig::resolve(&flag).expect("valid config");
        assert_eq!(config.key_layout, KeyLayout::Plain);
        for bad in ["hashed:0", "hashed:9", "sharded"] {
            let args = MountArgs {
                config: Some(path.clone()),
                key_layout: Some(bad.into()),
                ..Default::default()
            };
            let err = MountConfig::resolve(&args).expect_err(bad).to_string();
            assert!(err.contains("key-layout") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn mount_options_parse_and_reject_unknown() {
        let words: Vec<String> = ["allow_other", "uid=1000", "gid=100", "umask=027", "ro"]
            .map(String::from)
            .to_vec();
        let options = parse_mount_options(&words).expect("valid options");
        assert!(options.allow_other && options.read_only);
        assert_eq!(
            (options.uid, options.gid, options.umask),
            (1000, 100, 0o027)
        );
        let err = parse_mount_options(&["noatime_please".to_string()])
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("noatime_please"), "{err}");
    }
}
