//! The daemon: builds the layers, mounts, serves the control socket, and unmounts with a
//! bounded flush on `umount`, SIGTERM or SIGINT.

pub mod control;
pub mod rebuild;
mod recovery;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::backend::{source, AttrDefaults};
use crate::cache::{DataCache, SavedFile};
use crate::config::MountConfig;
use crate::core::{Core, CoreConfig};
use crate::fs::BucketFs;
use crate::meta::MetaStore;
use crate::sync::{FlushScope, Uploader, UploaderConfig};
use control::{Command, Response};

/// How long mounting waits for the bucket to answer before giving up.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// `bucketgate mount` without `--foreground`: starts the daemon in the background and
/// returns once the mount is ready, or with the daemon's own error.
pub fn mount_in_background(config: &MountConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("creating cache dir {}", config.cache_dir.display()))?;
    let log_path = config.cache_dir.join("bucketgate.log");
    // One left by a daemon that died scanning would make this wait on the next one.
    rebuild::remove_if_present(&config.cache_dir.join(REBUILDING_FILE))?;
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the bucketgate binary")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--foreground".to_string());
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut command = Process::new(exe);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log handle")?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        command.spawn().context("starting the daemon")?
    };
    let mut deadline = Instant::now() + CHECK_TIMEOUT + Duration::from_secs(10);
    let scanning = config.cache_dir.join(REBUILDING_FILE);
    while Instant::now() < deadline {
        if scanning.exists() {
            // Scanning a big bucket takes as long as it takes; the daemon is alive.
            deadline = Instant::now() + CHECK_TIMEOUT;
        }
        if let Some(status) = child.try_wait().context("watching the daemon")? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "the daemon exited ({status}) before the mount was ready:\n{}",
                log.trim_end()
            );
        }
        if control::request(&config.mountpoint, Command::Status, Duration::from_secs(2))
            .is_ok_and(|r| r.ok)
        {
            println!(
                "mounted {} on {} ({} mode, pid {})",
                config.source,
                config.mountpoint.display(),
                config.mode.as_str(),
                child.id()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the mount was not ready in time; see {}",
        log_path.display()
    )
}

/// Runs a mount in the foreground until unmounted or signalled.
pub fn run_foreground(config: MountConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bucketgate")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

fn open_layers(config: &MountConfig) -> anyhow::Result<(Arc<MetaStore>, Arc<DataCache>, File)> {
    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("creating cache dir {}", config.cache_dir.display()))?;
    std::fs::set_permissions(&config.cache_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing cache dir {}", config.cache_dir.display()))?;
    let lock = lock_cache_dir(&config.cache_dir)?;
    let defaults = attr_defaults(config);
    let store = config.cache_dir.join("meta.db");
    let meta = MetaStore::open(&store, 0o777 & !defaults.umask, defaults.uid, defaults.gid)
        .map_err(|err| {
            anyhow!(
                "opening the metadata store {}: {}",
                store.display(),
                err.message
            )
        })?;
    let unclean = meta
        .state("clean")
        .map_err(|err| anyhow!("{err}"))?
        .as_deref()
        != Some("1");
    let data_dir = config.cache_dir.join("data");
    if unclean {
        // After a crash, clean cached blocks may not have reached the disk: refetch them.
        for ino in meta.drop_clean_blocks().map_err(|err| anyhow!("{err}"))? {
            let path = data_dir.join(ino.to_string());
            if let Err(err) = std::fs::remove_file(&path) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    return Err(err)
                        .with_context(|| format!("removing stale cache file {}", path.display()));
                }
            }
        }
    }
    if unclean && config.mode == crate::config::Mode::WriteThrough {
        forget_unfinished_creates(&meta, &data_dir)?;
    }
    meta.set_state("clean", "0")
        .map_err(|err| anyhow!("{err}"))?;
    for orphan in meta.orphans().map_err(|err| anyhow!("{err}"))? {
        meta.transaction(|tx| meta.delete_inode(tx, orphan))
            .map_err(|err| anyhow!("{err}"))?;
    }
    let saved = saved_cache_files(&meta)?;
    let idle_files = idle_files_loaded_at_most(raise_open_files_limit());
    let cache = DataCache::open(&data_dir, config.cache_size, saved, idle_files)
        .map_err(|err| anyhow!("{err}"))?;
    Ok((Arc::new(meta), Arc::new(cache), lock))
}

/// Takes the cache dir for this process: one mount (or `recover`) per cache dir. The lock
/// lasts while the returned file is open.
pub(crate) fn lock_cache_dir(cache_dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating cache dir {}", cache_dir.display()))?;
    let lock = File::create(cache_dir.join("lock")).context("creating cache lock file")?;
    nix::fcntl::Flock::lock(lock.try_clone().context("lock handle")?, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, err)| anyhow!("cache dir {} is in use by another bucketgate ({err}); give each mount its own --cache-dir", cache_dir.display()))
        .map(std::mem::forget)?;
    Ok(lock)
}

/// Write-through promises the old object or none: a file created and never completed
/// before a crash never existed (an empty object would pass for a finished file).
fn forget_unfinished_creates(meta: &MetaStore, data_dir: &Path) -> anyhow::Result<()> {
    let never_stored = meta.files_never_stored().map_err(|err| anyhow!("{err}"))?;
    for ino in &never_stored {
        meta.transaction(|tx| meta.forget_inode(tx, *ino))
            .map_err(|err| anyhow!("{err}"))?;
        let path = data_dir.join(ino.to_string());
        if let Err(err) = std::fs::remove_file(&path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(err).with_context(|| format!("removing {}", path.display()));
            }
        }
    }
    if !never_stored.is_empty() {
        tracing::info!(
            files = never_stored.len(),
            "dropped files whose creation never completed before the crash"
        );
    }
    Ok(())
}

/// The cache files earlier sessions left with a saved presence map.
fn saved_cache_files(meta: &MetaStore) -> anyhow::Result<Vec<SavedFile>> {
    meta.transaction(|tx| {
        let mut stmt = tx.prepare(
            "SELECT c.ino, c.bitmap, i.dirty FROM cache_blocks c LEFT JOIN inodes i ON i.ino = c.ino",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)? as u64,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Option<i64>>(2)?,
            ))
        })?;
        let mut files = Vec::new();
        for row in rows {
            let (ino, bitmap, dirty) = row?;
            files.push(SavedFile {
                ino,
                bytes: crate::cache::blocks::BlockSet::from_bytes(&bitmap).count()
                    * crate::cache::BLOCK_SIZE,
                // 2: only attributes changed; the bucket holds the data.
                clean: matches!(dirty, None | Some(0) | Some(2)),
            });
        }
        Ok(files)
    })
    .map_err(|err| anyhow!("{err}"))
}

/// Raises this process's soft limit on open files to its hard limit (a shell's soft
/// limit is often 1,024, which a cached mount writing many files at once could reach).
/// Returns the soft limit in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // An unlimited hard limit: the kernel's own ceiling (fs.nr_open) is 1,048,576 by default.
    let target = hard.min(1 << 20);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(err) => {
            tracing::warn!(soft, hard, error = %err, "could not raise the open files limit");
            soft
        }
    }
}

/// Idle cache files kept loaded, one descriptor each: a quarter of the open files limit,
/// at most 1,024. Files being written, read or uploaded are loaded besides.
fn idle_files_loaded_at_most(open_files_limit: u64) -> usize {
    (open_files_limit / 4).clamp(16, 1024) as usize
}

fn attr_defaults(config: &MountConfig) -> AttrDefaults {
    AttrDefaults {
        uid: config.options.uid,
        gid: config.options.gid,
        umask: config.options.umask,
    }
}

async fn serve(config: MountConfig) -> anyhow::Result<()> {
    let (meta, cache, _lock) = open_layers(&config)?;
    let connection = source::Connection {
        endpoint: config.endpoint.clone(),
        region: config.region.clone(),
        credentials_file: config.credentials.clone(),
        request_timeout: Some(config.request_timeout),
        retries: config.retries,
    };
    let backend = source::open(&config.source, &connection, attr_defaults(&config))?;
    let check = source::open(
        &config.source,
        &source::Connection {
            retries: 0,
            ..connection.clone()
        },
        attr_defaults(&config),
    )?;
    match tokio::time::timeout(CHECK_TIMEOUT, check.check()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => bail!(
            "cannot reach {}: {}",
            backend.description,
            explain_backend_error(&err)
        ),
        Err(_) => bail!(
            "cannot reach {}: no answer within {CHECK_TIMEOUT:?}; check --endpoint and the network",
            backend.description
        ),
    }
    let layout =
        rebuild::settle_layout(&check, Some(config.key_layout), !config.options.read_only).await?;
    let backend = backend.with_layout(layout);
    if rebuild::store_needs_scan(&meta, layout)? {
        scan_at_mount(&config, &meta, &backend).await?;
    }
    // The directory bucket lists names with their metadata cheaply: no index there.
    let attr_index = config.attr_index == crate::config::AttrIndexing::On
        && layout.lists_lazily()
        && backend.local_root().is_none();
    meta.index_directories(attr_index && !config.options.read_only);
    let uploader = Uploader::new(
        meta.clone(),
        backend.clone(),
        cache.clone(),
        UploaderConfig {
            part_size: config.part_size,
            concurrency: config.upload_concurrency,
            keep_data: config.mode.keeps_data(),
        },
    );
    recover(&meta, &uploader, &backend).await?;
    let uploader_task = tokio::spawn(uploader.clone().run());
    tokio::spawn(start_writeback_of_writes(cache.clone()));
    let core = Arc::new(Core::new(
        CoreConfig {
            mode: config.mode,
            part_size: config.part_size,
            upload_concurrency: config.upload_concurrency,
            upload_delay: config.upload_delay,
            flush_timeout: config.flush_timeout,
            dirty_wait: config.dirty_wait,
            read_only: config.options.read_only,
            defaults: attr_defaults(&config),
            meta_ttl: config.meta_ttl,
            passthrough: config.passthrough == crate::config::Passthrough::Auto,
            attr_index,
        },
        meta.clone(),
        backend.clone(),
        cache,
        uploader.clone(),
    ));
    // Sync mode's background fetch of discovered objects; ends with the runtime.
    tokio::spawn(core.clone().run_prefetch(config.upload_concurrency));
    // Bound before the mount appears, so a client that sees the mount can connect at
    // once (its request waits in the backlog until the mount is up and answers start).
    let socket = control::socket_path(&config.mountpoint);
    let listener = bind_socket(&socket)?;
    let session = match mount(&config, core.clone()) {
        Ok(session) => session,
        Err(err) => {
            if let Err(rm) = std::fs::remove_file(&socket) {
                tracing::debug!(error = %rm, "removing control socket");
            }
            return Err(err);
        }
    };
    core.set_kernel_cache(Arc::new(
        crate::fs::KernelNotifier::start(session.notifier())
            .context("starting the kernel notifier thread")?,
    ));
    tracing::info!(source = %backend.description, mountpoint = %config.mountpoint.display(), mode = config.mode.as_str(), "mounted");
    let mountpoint = config.mountpoint.clone();
    // A thread of its own, not the runtime's: the stat waits for the kernel's INIT, which
    // this runtime serves, and a stuck one must not hold up the runtime's shutdown.
    let (read_ahead_done, read_ahead_set) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        widen_kernel_read_ahead(&mountpoint);
        // Dropping the sender is the signal; nobody may be waiting.
        drop(read_ahead_done);
    });
    let (stop_tx, mut stop_rx) = mpsc::channel::<Option<StopReply>>(4);
    tokio::spawn(serve_control(
        listener,
        core.clone(),
        backend.description.clone(),
        config.flush_timeout,
        stop_tx.clone(),
    ));
    spawn_signal_handlers(stop_tx.clone())?;
    let (flushed, unmounted, reply_to) =
        stop_serving(&config, &core, session, &mut stop_rx, read_ahead_set).await;
    uploader.stop();
    uploader_task.abort();
    if let Err(err) = std::fs::remove_file(&socket) {
        tracing::debug!(error = %err, "removing control socket");
    }
    meta.set_state("clean", "1")
        .map_err(|err| anyhow!("{err}"))?;
    let response = match (&flushed, &unmounted) {
        (_, Err(err)) => Response::failed(err.clone()),
        (Ok(()), Ok(())) => Response {
            ok: true,
            ..Default::default()
        },
        (Err(err), Ok(())) => Response::failed(format!(
            "unmounted, but {err}; they upload at the next mount"
        )),
    };
    if let Some((reply, delivered)) = reply_to {
        answer_stop_request(reply, delivered, response).await;
    }
    tracing::info!("stopped");
    unmounted.map_err(|err| anyhow!("{err}"))?;
    flushed.map_err(|err| anyhow!("{err}"))
}

/// A `hashed` mount with a new store: the namespace comes from a scan of the whole bucket
/// (local metadata is authoritative; listings show hash prefixes). While it runs, a
/// `rebuilding` file in the cache dir tells `mount` the daemon is busy, not stuck.
async fn scan_at_mount(
    config: &MountConfig,
    meta: &Arc<MetaStore>,
    backend: &crate::backend::Backend,
) -> anyhow::Result<()> {
    let busy = config.cache_dir.join(REBUILDING_FILE);
    File::create(&busy).with_context(|| format!("creating {}", busy.display()))?;
    tracing::info!(layout = %backend.layout(), "new metadata store: scanning the bucket");
    let result = rebuild::rebuild(
        meta.clone(),
        backend,
        attr_defaults(config),
        rebuild::PARALLEL_LISTINGS,
        |_| {},
    )
    .await;
    if let Err(err) = std::fs::remove_file(&busy) {
        tracing::warn!(error = %err, "removing {}", busy.display());
    }
    let report = result?;
    tracing::info!(
        objects = report.objects,
        directories = report.directories,
        bytes = report.bytes,
        skipped = report.skipped,
        elapsed = ?report.elapsed,
        "namespace rebuilt from the bucket"
    );
    Ok(())
}

/// Present in the cache dir while a mount scans the bucket.
const REBUILDING_FILE: &str = "rebuilding";

/// Cleans up after an earlier run that stopped without ending its uploads.
async fn recover(
    meta: &MetaStore,
    uploader: &Uploader,
    backend: &crate::backend::Backend,
) -> anyhow::Result<()> {
    if let Some(root) = backend.local_root() {
        recovery::sweep_local_tmp(root);
    }
    let requeued = meta
        .requeue_dirty()
        .map_err(|err| anyhow::anyhow!("queueing uploads of changed files: {err}"))?;
    if requeued > 0 {
        tracing::info!(
            requeued,
            "queued uploads of files changed while an earlier run stopped"
        );
    }
    let started = std::time::SystemTime::now();
    let streams = tokio::time::timeout(
        RECOVERY_TIMEOUT,
        recovery::settle_streams(meta, uploader, backend, started),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {RECOVERY_TIMEOUT:?}")));
    if let Err(err) = streams {
        bail!(
            "settling the write-through uploads an earlier run left unrecorded: {err}. \
             Until they are, their files' local copies could overwrite what their closes \
             stored; mount again once the bucket answers"
        );
    }
    match tokio::time::timeout(
        RECOVERY_TIMEOUT,
        recovery::abort_abandoned_uploads(meta, uploader, backend, started),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        // Not fatal: the ledger keeps the keys and the next mount tries again.
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "could not abort multipart uploads left by an earlier run; will retry at the next mount");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("aborting uploads left by an earlier run took over {RECOVERY_TIMEOUT:?}; will retry at the next mount");
            Ok(())
        }
    }
}

/// How long cleaning up after an earlier run may delay a mount.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

fn explain_backend_error(err: &opendal::Error) -> String {
    let text = err.to_string();
    let says = |code: &str| text.contains(code);
    if err.kind() == opendal::ErrorKind::NotFound || says("NoSuchBucket") {
        format!("the bucket does not exist: check its name, --region and --endpoint ({err})")
    } else if err.kind() == opendal::ErrorKind::PermissionDenied
        || says("InvalidAccessKeyId")
        || says("SignatureDoesNotMatch")
    {
        format!("access denied: check the credentials ({err})")
    } else if says("failed to load signing credential") {
        format!("no usable credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (OSS: OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET) or pass --credentials FILE ({err})")
    } else {
        text
    }
}

fn mount(config: &MountConfig, core: Arc<Core>) -> anyhow::Result<fuser::BackgroundSession> {
    let mut options = vec![
        fuser::MountOption::FSName(config.source.clone()),
        fuser::MountOption::Subtype("bucketgate".to_string()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if config.options.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if config.options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let fs = BucketFs::new(core, tokio::runtime::Handle::current());
    fuser::spawn_mount(fs, &config.mountpoint, &fuse_config).with_context(|| {
        format!(
            "mounting on {} (is fuse3 installed and the directory empty and not mounted?)",
            config.mountpoint.display()
        )
    })
}

/// Kernel read-ahead of the mount, in KiB: one FUSE read request of `max_pages` (the 1 MiB
/// that `init` asks for).
const KERNEL_READ_AHEAD_KB: u64 = 1024;

/// Serves until a stop request, then flushes and unmounts; returns the flush's and the
/// unmount's outcome and where the answer goes. The daemon never exits leaving a dead
/// mount behind: a `bucketgate umount` of a busy mount is refused and the mount keeps
/// serving (as umount(8) does), and a signal detaches a busy mount (a lazy unmount: new
/// opens no longer reach it) and serves the files still open there until they close, for
/// at most `flush-timeout`, then flushes what they wrote.
async fn stop_serving(
    config: &MountConfig,
    core: &Core,
    session: fuser::BackgroundSession,
    stop_rx: &mut mpsc::Receiver<Option<StopReply>>,
    read_ahead_set: tokio::sync::oneshot::Receiver<()>,
) -> (
    crate::error::FsResult<()>,
    Result<(), String>,
    Option<StopReply>,
) {
    let mut read_ahead_set = Some(read_ahead_set);
    loop {
        let request = next_stop_request(stop_rx, &session).await;
        if session.guard.is_finished() {
            tracing::info!("unmounted from outside; flushing before exit");
            return (flush_before_exit(config, core).await, Ok(()), request);
        }
        let flushed = flush_before_exit(config, core).await;
        if let Some(set) = read_ahead_set.take() {
            // Its stat of the mount point holds the mount while it runs: an unmount right
            // after the mount (a remount in a test, a quick restart) failed with EBUSY.
            if tokio::time::timeout(READ_AHEAD_WAIT, set).await.is_err() {
                tracing::debug!("the read-ahead setter is still busy; unmounting anyway");
            }
        }
        match unmount_while_busy(&config.mountpoint).await {
            Unmount::Done => return (flushed, session_ended(config, session.join()), request),
            // Not root: fusermount does it, and reports a busy mount itself.
            Unmount::NotPermitted => {
                return (
                    flushed,
                    session_ended(config, session.umount_and_join()),
                    request,
                )
            }
            Unmount::Busy => {}
        }
        let Some((reply, delivered)) = request else {
            return serve_detached(config, core, session, stop_rx).await;
        };
        tracing::warn!(
            "unmount refused: {} is busy; still mounted and serving",
            config.mountpoint.display()
        );
        let refused = Response::failed(format!(
            "could not unmount {}: it is busy (a process has a file open or its working \
                 directory there); it stays mounted and working. End that process, then run \
                 `bucketgate umount` again, or stop the daemon with SIGTERM to detach it \
                 (open files keep working until closed)",
            config.mountpoint.display()
        ));
        answer_stop_request(reply, delivered, refused).await;
    }
}

/// The next request to stop: `Some` from `bucketgate umount` (with where the answer
/// goes), `None` for a signal or once the session ended (the mount went away).
async fn next_stop_request(
    stop_rx: &mut mpsc::Receiver<Option<StopReply>>,
    session: &fuser::BackgroundSession,
) -> Option<StopReply> {
    loop {
        tokio::select! {
            request = stop_rx.recv() => return request.flatten(),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if session.guard.is_finished() {
                    return None;
                }
            }
        }
    }
}

async fn flush_before_exit(config: &MountConfig, core: &Core) -> crate::error::FsResult<()> {
    let flushed = core
        .flush_all(config.flush_timeout, FlushScope::Everything)
        .await;
    if let Err(err) = &flushed {
        tracing::error!(
            "{err}; the changes stay journaled in {} and upload at the next mount",
            config.cache_dir.display()
        );
    }
    flushed
}

fn session_ended(config: &MountConfig, ended: std::io::Result<()>) -> Result<(), String> {
    ended.map_err(|err| {
        tracing::error!(error = %err, "unmount failed");
        format!(
            "could not unmount {}: {err}; a process may have a file open or its working \
             directory there: end it, then run `fusermount3 -u {}` (or `umount -l`)",
            config.mountpoint.display(),
            config.mountpoint.display()
        )
    })
}

/// A signal found the mount busy: detaches it, serves the files still open on it until
/// the last one closes (the session ends), another signal comes, or `flush-timeout`
/// passes, then flushes what they wrote.
async fn serve_detached(
    config: &MountConfig,
    core: &Core,
    session: fuser::BackgroundSession,
    stop_rx: &mut mpsc::Receiver<Option<StopReply>>,
) -> (
    crate::error::FsResult<()>,
    Result<(), String>,
    Option<StopReply>,
) {
    let mountpoint = config.mountpoint.display();
    if let Err(err) = nix::mount::umount2(&config.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        tracing::error!(error = %err, "detaching the busy mount {mountpoint} failed");
        return (
            flush_before_exit(config, core).await,
            session_ended(config, Err(err.into())),
            None,
        );
    }
    tracing::warn!(
        "{mountpoint} was busy: detached it; files still open there keep working until \
         closed (at most {:?}), then the daemon flushes them and exits",
        config.flush_timeout
    );
    let reply_to = match tokio::time::timeout(
        config.flush_timeout,
        next_stop_request(stop_rx, &session),
    )
    .await
    {
        // The last open file closed: the session ended.
        Ok(request) if session.guard.is_finished() => request,
        Ok(request) => {
            tracing::warn!("stopping now: files still open on the detached mount get errors");
            request
        }
        Err(_) => {
            tracing::warn!(
                "open files kept the detached mount past {:?}; stopping: they get errors now",
                config.flush_timeout
            );
            None
        }
    };
    let flushed = flush_before_exit(config, core).await;
    if session.guard.is_finished() {
        return (flushed, session_ended(config, session.join()), reply_to);
    }
    // Still in use: the kernel ends the connection when this process exits.
    drop(session);
    (flushed, Ok(()), reply_to)
}

async fn answer_stop_request(
    reply: tokio::sync::oneshot::Sender<Response>,
    delivered: tokio::sync::oneshot::Receiver<()>,
    response: Response,
) {
    if reply.send(response).is_err() {
        tracing::debug!("umount client went away");
    } else if tokio::time::timeout(Duration::from_secs(5), delivered)
        .await
        .is_err()
    {
        tracing::debug!("umount client did not take the answer in time");
    }
}

enum Unmount {
    Done,
    Busy,
    /// Not root (or another refusal): the FUSE session's own unmount is up next.
    NotPermitted,
}

/// Unmounts, retrying while the kernel says the mount is busy (someone holds it for a
/// moment: a stat in flight, a process leaving the directory), so a quick unmount does
/// not fail on a passing user. Bounded by [`UNMOUNT_BUSY_WAIT`].
async fn unmount_while_busy(mountpoint: &Path) -> Unmount {
    let deadline = tokio::time::Instant::now() + UNMOUNT_BUSY_WAIT;
    loop {
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(()) => return Unmount::Done,
            Err(nix::errno::Errno::EBUSY) => return Unmount::Busy,
            Err(err) => {
                tracing::debug!(error = %err, "unmount of {}", mountpoint.display());
                return Unmount::NotPermitted;
            }
        }
    }
}

/// How long an unmount retries a busy mount point.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(3);

/// How long an unmount waits for [`widen_kernel_read_ahead`] to be done with the mount.
const READ_AHEAD_WAIT: Duration = Duration::from_secs(5);

/// Raises the kernel's read-ahead for the mount to [`KERNEL_READ_AHEAD_KB`]. The kernel
/// sizes a sequential reader's FUSE requests by it, and a FUSE server cannot raise it at
/// INIT beyond the default 128 KiB: 1 MiB reads then arrive as eight 128 KiB requests
/// (measured: 512 vs 64 requests for 64 MiB). Best effort (needs root; a value an
/// administrator raised further is kept).
fn widen_kernel_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    // The stat returns once the kernel's INIT is answered: set before, it would be cut
    // back to what INIT negotiated.
    let dev = match std::fs::metadata(mountpoint) {
        Ok(meta) => meta.dev(),
        Err(err) => {
            tracing::debug!(error = %err, "stat of the mount point for its read-ahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let current = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    if current.is_some_and(|kb| kb >= KERNEL_READ_AHEAD_KB) {
        return;
    }
    match std::fs::write(&path, KERNEL_READ_AHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(%path, kb = KERNEL_READ_AHEAD_KB, "kernel read-ahead raised"),
        Err(err) => {
            tracing::info!(%path, error = %err, "could not raise the kernel's read-ahead for the mount; sequential reads arrive in 128 KiB requests")
        }
    }
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another bucketgate already serves this mount point ({})",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context("securing control socket")?;
    Ok(listener)
}

/// Where the umount answer goes, and how the daemon learns it was written out.
type StopReply = (
    tokio::sync::oneshot::Sender<Response>,
    tokio::sync::oneshot::Receiver<()>,
);
type StopSender = mpsc::Sender<Option<StopReply>>;

async fn serve_control(
    listener: UnixListener,
    core: Arc<Core>,
    source: String,
    flush_timeout: Duration,
    stop: StopSender,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::error!(error = %err, "control socket accept failed");
                return;
            }
        };
        let (core, source, stop) = (core.clone(), source.clone(), stop.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let mut delivered = None;
            let response = match serde_json::from_str::<Command>(line.trim()) {
                Ok(Command::Status) => {
                    Response::of_report(core.status(&source).map_err(|e| e.to_string()))
                }
                Ok(Command::Flush) => {
                    match core.flush_all(flush_timeout, FlushScope::Changes).await {
                        Ok(()) => Response {
                            ok: true,
                            ..Default::default()
                        },
                        Err(err) => Response::failed(err.to_string()),
                    }
                }
                Ok(Command::Unmount) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
                    delivered = Some(written_tx);
                    if stop.send(Some((tx, written_rx))).await.is_err() {
                        Response::failed("daemon is already stopping")
                    } else {
                        rx.await
                            .unwrap_or(Response::failed("daemon stopped without answering"))
                    }
                }
                Ok(Command::Verify { path }) => {
                    verify_for_client(core.backend(), &path, &mut write).await
                }
                Ok(Command::Refresh { path }) => {
                    Response::of_report(core.refresh(&path).await.map_err(|e| e.to_string()))
                }
                Err(err) => Response::failed(format!("bad request: {err}")),
            };
            let mut text =
                serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".to_string());
            text.push('\n');
            if let Err(err) = write.write_all(text.as_bytes()).await {
                tracing::debug!(error = %err, "control client went away");
            }
            if let Some(done) = delivered {
                // The daemon waits for this before exiting, so the answer is not lost.
                if done.send(()).is_err() {
                    tracing::debug!("daemon stopped before the answer was written");
                }
            }
        });
    }
}

/// Runs a scrub for `bucketgate verify`, sending a progress line per object.
async fn verify_for_client(
    backend: &crate::backend::Backend,
    path: &str,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let scrub = crate::scrub::scrub(backend, path, |report| {
        if let Ok(value) = serde_json::to_value(report) {
            // The client may have gone; the scrub still finishes its tally.
            if tx.send(value).is_err() {
                tracing::debug!("verify client went away");
            }
        }
    });
    tokio::pin!(scrub);
    let result = loop {
        tokio::select! {
            result = &mut scrub => break result,
            Some(value) = rx.recv() => send_progress(write, value).await,
        }
    };
    while let Ok(value) = rx.try_recv() {
        send_progress(write, value).await;
    }
    Response::of_report(result.map_err(|err| format!("{err:#}")))
}

async fn send_progress(write: &mut tokio::net::unix::OwnedWriteHalf, value: serde_json::Value) {
    let line = Response {
        ok: true,
        progress: Some(value),
        ..Default::default()
    };
    if let Ok(mut text) = serde_json::to_string(&line) {
        text.push('\n');
        if let Err(err) = write.write_all(text.as_bytes()).await {
            tracing::debug!(error = %err, "verify client went away");
        }
    }
}

fn spawn_signal_handlers(stop: StopSender) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // Every signal counts: a second one ends the wait for files open on a detached mount.
    tokio::spawn(async move {
        for _ in 0..u32::MAX {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: flushing and unmounting"),
                _ = int.recv() => tracing::info!("SIGINT: flushing and unmounting"),
            }
            if stop.send(None).await.is_err() {
                tracing::debug!("already stopped");
                return;
            }
        }
    });
    Ok(())
}

/// How often files being written get their writeback started.
const WRITEBACK_START_INTERVAL: Duration = Duration::from_millis(250);

/// Starts the writeback of files being written, every [`WRITEBACK_START_INTERVAL`]: the
/// fdatasync a close owes then waits for the last fraction of a second's bytes, not for
/// everything written since the open (the disk writes while the writer still writes).
/// Ends with the runtime.
async fn start_writeback_of_writes(cache: Arc<DataCache>) {
    let mut ticks = tokio::time::interval(WRITEBACK_START_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cache = cache.clone();
        // sync_file_range can wait for the disk's queue: not on a runtime thread.
        if let Err(err) =
            tokio::task::spawn_blocking(move || cache.start_writeback_of_writes()).await
        {
            tracing::debug!(error = %err, "starting writeback");
        }
    }
}
