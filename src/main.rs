//! The `bucketgate` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bucketgate::config::{MountArgs, MountConfig};
use bucketgate::daemon::{self, control};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bucketgate",
    version,
    about = "Mount an object-storage bucket as a POSIX filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Mount a bucket
    Mount(Box<MountArgs>),
    /// Flush every change to the bucket, then unmount (non-zero exit if data stays unflushed)
    Umount {
        mountpoint: PathBuf,
    },
    /// Return once every byte written so far is in the bucket
    Flush {
        mountpoint: PathBuf,
    },
    /// Show mode, cache use, dirty files, uploads in flight, last errors
    Status {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Read objects back and check them against their stored crc64 (exit 1 on a mismatch)
    Verify(VerifyArgs),
    /// Rebuild the local metadata store of a cache dir from the bucket (lost cache disk,
    /// new host); refuses while the cache dir holds changes not yet uploaded
    /// Check PATH (default: the whole mount) against the bucket now: other tools' added,
    /// replaced and deleted objects show at once
    Refresh {
        mountpoint: PathBuf,
        /// A file or directory inside the mount point (directories: recursively)
        path: Option<String>,
    },
    Recover(RecoverArgs),
}

#[derive(clap::Args)]
struct RecoverArgs {
    /// The bucket: s3://BUCKET[/PREFIX], oss://BUCKET[/PREFIX] or a directory
    source: String,
    /// Cache dir to rebuild (the one the mount will use)
    #[arg(long, required_unless_present = "mountpoint")]
    cache_dir: Option<PathBuf>,
    /// The mount point the cache dir is for, when the mount uses the default cache dir
    #[arg(long)]
    mountpoint: Option<PathBuf>,
    /// plain or hashed[:N]; default: what the bucket records (plain without a marker)
    #[arg(long)]
    key_layout: Option<String>,
    /// Discard changes in the cache dir that never reached the bucket
    #[arg(long)]
    force: bool,
    /// Listings in flight at once (lower it for a slow or rate-limited endpoint)
    #[arg(long, default_value_t = daemon::rebuild::PARALLEL_LISTINGS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: u16,
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// How to reach a SOURCE outside a mount.
#[derive(clap::Args)]
struct ConnectionArgs {
    /// S3/OSS endpoint URL
    #[arg(long)]
    endpoint: Option<String>,
    /// Region (default us-east-1)
    #[arg(long)]
    region: Option<String>,
    /// Credentials file
    #[arg(long)]
    credentials: Option<PathBuf>,
}

impl ConnectionArgs {
    fn connection(&self) -> bucketgate::backend::source::Connection {
        bucketgate::backend::source::Connection {
            endpoint: self.endpoint.clone(),
            region: self
                .region
                .clone()
                .unwrap_or_else(|| bucketgate::config::Defaults::REGION.to_string()),
            credentials_file: self.credentials.clone(),
            request_timeout: Some(Duration::from_secs(60)),
            retries: 4,
        }
    }
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// A mount point (its daemon does the reading) or a SOURCE: s3://BUCKET[/PREFIX],
    /// oss://BUCKET[/PREFIX] or a directory
    target: String,
    /// Only objects under this path (inside the mount point, or relative to the bucket)
    path: Option<String>,
    /// (SOURCE only)
    #[command(flatten)]
    connection: ConnectionArgs,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BUCKETGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or the journal would keep the escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Long enough for a big flush; the daemon bounds its own wait with --flush-timeout.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Mount(args) => {
            let config = MountConfig::resolve(&args)?;
            if config.foreground {
                init_logging();
                daemon::run_foreground(config)
            } else {
                daemon::mount_in_background(&config)
            }
        }
        Commands::Umount { mountpoint } => {
            let response =
                control::request(&mountpoint, control::Command::Unmount, CONTROL_TIMEOUT)?;
            if !response.ok {
                bail!(
                    "{}",
                    response.error.unwrap_or_else(|| "unmount failed".into())
                );
            }
            Ok(())
        }
        Commands::Flush { mountpoint } => {
            let response = control::request(&mountpoint, control::Command::Flush, CONTROL_TIMEOUT)?;
            if !response.ok {
                bail!(
                    "{}",
                    response.error.unwrap_or_else(|| "flush failed".into())
                );
            }
            Ok(())
        }
        Commands::Status { mountpoint, json } => {
            let response = control::request(
                &mountpoint,
                control::Command::Status,
                Duration::from_secs(30),
            )?;
            let status = response.status.context("the daemon sent no status")?;
            if json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Commands::Verify(args) => verify(args),
        Commands::Recover(args) => {
            init_logging();
            recover(args)
        }
        Commands::Refresh { mountpoint, path } => refresh(&mountpoint, path.as_deref()),
    }
}

/// `bucketgate refresh`: the daemon lists now, and the tally is printed.
fn refresh(mountpoint: &std::path::Path, path: Option<&str>) -> anyhow::Result<()> {
    let path = relative_to_mount(mountpoint, path.unwrap_or(""));
    let response = control::request(
        mountpoint,
        control::Command::Refresh { path },
        CONTROL_TIMEOUT,
    )?;
    if !response.ok {
        bail!(
            "{}",
            response.error.unwrap_or_else(|| "refresh failed".into())
        );
    }
    let report: bucketgate::core::RefreshReport =
        serde_json::from_value(response.status.context("the daemon sent no report")?)
            .context("decoding the daemon's report")?;
    println!(
        "refreshed {} directories: {} added, {} replaced, {} deleted, {} conflicts",
        report.directories, report.added, report.replaced, report.deleted, report.conflicts
    );
    if report.truncated {
        println!(
            "stopped after {} directories; refresh a narrower PATH for the rest",
            bucketgate::core::MAX_REFRESH_DIRS
        );
    }
    Ok(())
}

/// Owner and mode for objects without metadata, outside a mount: the caller's.
fn own_defaults() -> bucketgate::backend::AttrDefaults {
    bucketgate::backend::AttrDefaults {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        umask: bucketgate::config::Defaults::UMASK,
    }
}

/// `bucketgate recover`: rebuilds a cache dir's metadata from the bucket.
fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    let cache_dir = match (&args.cache_dir, &args.mountpoint) {
        (Some(dir), _) => std::path::absolute(dir).context("--cache-dir")?,
        (None, Some(mountpoint)) => bucketgate::config::default_cache_dir(
            &std::path::absolute(mountpoint).context("--mountpoint")?,
        ),
        (None, None) => bail!("give --cache-dir or --mountpoint"),
    };
    let layout = args
        .key_layout
        .as_deref()
        .map(bucketgate::backend::KeyLayout::parse)
        .transpose()
        .map_err(|message| anyhow::anyhow!("invalid value for `key-layout`: {message}"))?;
    let options = daemon::rebuild::RecoverOptions {
        cache_dir: cache_dir.clone(),
        layout,
        force: args.force,
        defaults: own_defaults(),
        parallel: usize::from(args.parallel),
    };
    let backend = bucketgate::backend::source::open(
        &args.source,
        &args.connection.connection(),
        options.defaults,
    )?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut shown: Option<std::time::Instant> = None;
    let report = runtime.block_on(daemon::rebuild::recover_cache_dir(
        backend,
        &options,
        move |report| {
            if shown.is_some_and(|at| at.elapsed() < Duration::from_millis(200)) {
                return;
            }
            shown = Some(std::time::Instant::now());
            eprint!(
                "\rrecovering: {} objects, {} directories, {:.1} MiB",
                report.objects,
                report.directories,
                report.bytes as f64 / (1u64 << 20) as f64
            );
        },
    ))?;
    eprintln!();
    println!(
        "recovered {} objects, {} directories, {:.1} MiB in {:.1}s into {}{}",
        report.objects,
        report.directories,
        report.bytes as f64 / (1u64 << 20) as f64,
        report.elapsed.as_secs_f64(),
        cache_dir.display(),
        if report.skipped > 0 {
            format!(
                " ({} keys the mount cannot address were left alone)",
                report.skipped
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `bucketgate verify`: through a running daemon when TARGET is its mount point, else
/// straight against the SOURCE.
fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let mut progress = Progress::default();
    let mountpoint = PathBuf::from(&args.target);
    let report = if control::socket_path(&mountpoint).exists() {
        let path = relative_to_mount(&mountpoint, args.path.as_deref().unwrap_or(""));
        let response = control::request_with_progress(
            &mountpoint,
            control::Command::Verify { path },
            CONTROL_TIMEOUT,
            |value| {
                if let Ok(report) = serde_json::from_value(value.clone()) {
                    progress.show(&report);
                }
            },
        )?;
        if !response.ok {
            bail!(
                "{}",
                response.error.unwrap_or_else(|| "verify failed".into())
            );
        }
        serde_json::from_value(response.status.context("the daemon sent no report")?)
            .context("decoding the daemon's report")?
    } else {
        let backend = bucketgate::backend::source::open(
            &args.target,
            &args.connection.connection(),
            own_defaults(),
        )?;
        let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        let path = args.path.clone().unwrap_or_default();
        runtime.block_on(async {
            // PATH is a path of the mount: find its keys with the bucket's own layout.
            let layout = daemon::rebuild::settle_layout(&backend, None, false).await?;
            let backend = backend.with_layout(layout);
            bucketgate::scrub::scrub(&backend, &path, |report| progress.show(report)).await
        })?
    };
    progress.finish();
    println!(
        "checked {} objects ({:.1} MiB): {} ok, {} mismatched, {} without checksum, {} unreadable",
        report.checked,
        report.bytes as f64 / (1u64 << 20) as f64,
        report.ok,
        report.mismatched.len(),
        report.without_checksum,
        report.errors.len()
    );
    for key in &report.mismatched {
        println!("MISMATCH {key}");
    }
    for error in &report.errors {
        println!("UNREADABLE {error}");
    }
    if !report.clean() {
        bail!("some objects failed verification");
    }
    Ok(())
}

/// A PATH given inside the mount point, as the bucket-relative path the daemon wants.
fn relative_to_mount(mountpoint: &std::path::Path, path: &str) -> String {
    let absolute = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let given = std::path::Path::new(path);
    given
        .strip_prefix(&absolute)
        .unwrap_or(given)
        .to_string_lossy()
        .trim_matches('/')
        .to_string()
}

/// The progress line on stderr, redrawn at most five times a second.
#[derive(Default)]
struct Progress {
    shown: Option<std::time::Instant>,
}

impl Progress {
    fn show(&mut self, report: &bucketgate::scrub::ScrubReport) {
        if self
            .shown
            .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.shown = Some(std::time::Instant::now());
        eprint!(
            "\rverifying: {}/{} objects, {:.1} MiB, {} mismatched",
            report.checked,
            report.total,
            report.bytes as f64 / (1u64 << 20) as f64,
            report.mismatched.len()
        );
    }

    fn finish(&self) {
        if self.shown.is_some() {
            eprintln!();
        }
    }
}

fn print_status(status: &serde_json::Value) {
    let field = |name: &str| status.get(name).cloned().unwrap_or(serde_json::Value::Null);
    let mib = |name: &str| field(name).as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    println!(
        "source:            {}",
        field("source").as_str().unwrap_or("?")
    );
    println!(
        "mode:              {}",
        field("mode").as_str().unwrap_or("?")
    );
    println!(
        "cache:             {:.1} MiB used of {:.1} MiB",
        mib("cache_used_bytes"),
        mib("cache_limit_bytes")
    );
    println!(
        "dirty:             {} files, {:.1} MiB",
        field("dirty_files"),
        mib("dirty_bytes")
    );
    println!("pending changes:   {}", field("pending"));
    println!("uploads in flight: {}", field("uploads_in_flight"));
    println!(
        "passthrough:       {} ({} handles served by the kernel)",
        if field("passthrough").as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        field("passthrough_handles")
    );
    if let Some(errors) = field("last_errors").as_array().filter(|e| !e.is_empty()) {
        println!("last errors:");
        for error in errors {
            println!("  {}", error.as_str().unwrap_or("?"));
        }
    }
}

/// Part buffers are megabytes each and come and go on many threads. A fixed mmap
/// threshold makes glibc map and unmap them instead of keeping freed ones in per-thread
/// arenas, which otherwise grows the daemon's memory well past what is in use.
fn bound_allocator_retention() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread.
    let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if accepted == 0 {
        eprintln!("bucketgate: note: could not set the allocator's mmap threshold");
    }
}

fn main() -> ExitCode {
    bound_allocator_retention();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bucketgate: {err:#}");
            ExitCode::FAILURE
        }
    }
}
