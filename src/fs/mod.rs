//! The thin FUSE adapter: kernel arguments to core calls, core results to replies.
//! Requests run as tasks on the tokio runtime, so the request loop never waits for the
//! bucket; the usually short ones start on the request thread and become tasks only when
//! they have to wait.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

use crate::backend::Kind;
use crate::core::{Attr, Caller, Core, OpenMode, Opened, PageCache, SetAttr, MAX_NAME_BYTES};
use crate::error::{FsError, Level};

pub struct BucketFs {
    core: Arc<Core>,
    runtime: tokio::runtime::Handle,
    /// How long the kernel may cache entries and attributes (never past `--meta-ttl`).
    ttl: Duration,
    backings: Arc<Backings>,
}

/// Cache files registered with the kernel for passthrough: one per inode while any of
/// its passthrough handles is open (the kernel wants the same one for all of them, and
/// it must outlive the open reply).
#[derive(Default)]
struct Backings {
    table: Mutex<BackingTable>,
}

#[derive(Default)]
struct BackingTable {
    by_ino: HashMap<u64, (Arc<BackingId>, u32)>,
    ino_of_fh: HashMap<u64, u64>,
}

impl Backings {
    fn table(&self) -> std::sync::MutexGuard<'_, BackingTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backing id of `ino` for handle `fh`, registering `file` when it has none.
    fn attach(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut table = self.table();
        let id = match table.by_ino.get_mut(&ino) {
            Some((id, handles)) => {
                *handles += 1;
                id.clone()
            }
            None => {
                let id = Arc::new(register()?);
                table.by_ino.insert(ino, (id.clone(), 1));
                id
            }
        };
        table.ino_of_fh.insert(fh, ino);
        Ok(id)
    }

    /// Handle `fh` was released; the inode's backing id goes with its last handle.
    fn detach(&self, fh: u64) {
        let mut table = self.table();
        let Some(ino) = table.ino_of_fh.remove(&fh) else {
            return;
        };
        if let Some((_, handles)) = table.by_ino.get_mut(&ino) {
            *handles -= 1;
            if *handles == 0 {
                table.by_ino.remove(&ino);
            }
        }
    }
}

impl BucketFs {
    pub fn new(core: Arc<Core>, runtime: tokio::runtime::Handle) -> BucketFs {
        let ttl = core.kernel_ttl();
        BucketFs {
            core,
            runtime,
            ttl,
            backings: Arc::default(),
        }
    }

    fn spawn<F>(&self, op: &'static str, work: impl FnOnce(Arc<Core>) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(self.task(op, work));
    }

    /// Runs a request that usually needs no wait (an entry or attributes from the store, a
    /// write into the cache file or an upload's buffer, a read of bytes already fetched) on
    /// the request thread until it finishes or has to wait; a task on the runtime goes on
    /// from there. Handing every such request to a worker thread and back cost more than
    /// its work: context switches were 16 % of the daemon's CPU writing small files.
    /// Requests that sync the disk (close, fsync, namespace changes) stay [`Self::spawn`]:
    /// the request loop must not stall behind a disk flush.
    fn start<F>(&self, op: &'static str, work: impl FnOnce(Arc<Core>) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut task = Box::pin(self.task(op, work));
        // The runtime's context: what the first poll starts (a timer, a socket, a
        // blocking job) registers with this runtime.
        let _runtime = self.runtime.enter();
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        // As in a task, a panic fails this request (its dropped reply answers EIO), not
        // the request loop.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            task.as_mut().poll(&mut context)
        }));
        match polled {
            Ok(std::task::Poll::Ready(())) => {}
            // Its next poll, by the runtime, registers the waker that counts.
            Ok(std::task::Poll::Pending) => {
                self.runtime.spawn(task);
            }
            Err(_) => tracing::error!(op, "request panicked; answered with an error"),
        }
    }

    fn task<F>(
        &self,
        op: &'static str,
        work: impl FnOnce(Arc<Core>) -> F + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let core = self.core.clone();
        async move {
            tracing::trace!(op, "request");
            work(core).await
        }
    }
}

/// One thing the kernel must forget.
enum Notice {
    Entry(u64, Vec<u8>),
    Inode(u64),
}

/// Tells the kernel about outside changes, from a thread of its own: an invalidation
/// waits for the kernel's lock on the directory, which a request being answered (the
/// very lookup that found the change) may hold.
pub struct KernelNotifier {
    notices: std::sync::mpsc::Sender<Notice>,
}

impl KernelNotifier {
    pub fn start(notifier: fuser::Notifier) -> std::io::Result<KernelNotifier> {
        let (tx, rx) = std::sync::mpsc::channel::<Notice>();
        std::thread::Builder::new()
            .name("bucketgate-notify".into())
            .spawn(move || {
                // Ends when the core (the sender's owner) goes.
                for notice in rx {
                    let result = match &notice {
                        Notice::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                        }
                        Notice::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                    };
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "kernel cache invalidation refused");
                    }
                }
            })?;
        Ok(KernelNotifier { notices: tx })
    }

    fn send(&self, notice: Notice) {
        if self.notices.send(notice).is_err() {
            tracing::debug!("kernel notifier stopped");
        }
    }
}

impl crate::core::KernelCache for KernelNotifier {
    fn forget_entry(&self, parent: u64, name: &[u8]) {
        self.send(Notice::Entry(parent, name.to_vec()));
    }

    fn forget_inode(&self, ino: u64) {
        self.send(Notice::Inode(ino));
    }
}

fn errno(op: &str, err: FsError) -> Errno {
    match err.level {
        Level::Debug => tracing::debug!(op, errno = err.errno, "{}", err.message),
        Level::Error => tracing::error!(op, errno = err.errno, "{}", err.message),
    }
    Errno::from_i32(err.errno)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind: file_type(attr.kind),
        perm: attr.perm as u16,
        nlink: if attr.kind == Kind::Dir { 2 } else { 1 },
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

/// The backing id for a handle the core wants served by the kernel, or `None` when the
/// daemon serves it: no backing file asked for, or the kernel refused it (then nothing
/// more is asked of the kernel, and the core counts the handle as the daemon's).
fn backing_for(
    core: &Core,
    backings: &Backings,
    ino: u64,
    opened: &Opened,
    register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
) -> Option<Arc<BackingId>> {
    let file = opened.backing.as_ref()?;
    match backings.attach(ino, opened.fh, || register(file)) {
        Ok(id) => Some(id),
        Err(err) => {
            core.disable_passthrough(&format!("the kernel refused a backing file: {err}"));
            if let Err(err) = core.passthrough_refused(opened.fh) {
                tracing::error!(fh = opened.fh, "{}", err.message);
            }
            None
        }
    }
}

/// Flags of a handle the daemon serves.
fn open_flags(opened: &Opened) -> FopenFlags {
    match opened.page_cache {
        PageCache::Keep => FopenFlags::FOPEN_KEEP_CACHE,
        PageCache::Bypass => FopenFlags::FOPEN_DIRECT_IO,
    }
}

fn time_of(value: TimeOrNow) -> SystemTime {
    match value {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn name_bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Filesystem for BucketFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // readdirplus: `ls -l` gets names and attributes in one round trip; AUTO lets the
        // kernel use plain readdir where it would not help.
        let plus = fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO;
        if let Err(missing) = config.add_capabilities(plus) {
            tracing::info!(?missing, "kernel lacks readdirplus; using readdir");
        }
        // O_TRUNC arrives with open instead of as a separate truncate first: write-through
        // then keeps the old object until the new one is complete, so a crash or a failed
        // upload never leaves an emptied file in the bucket.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC) {
            tracing::warn!(
                ?missing,
                "kernel lacks atomic O_TRUNC; write-through truncates before writing"
            );
        }
        // Direct I/O handles (see `PageCache::Bypass`) must still allow mmap.
        let direct_io_mmap = config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        self.core.set_direct_io_mmap(direct_io_mmap);
        if self.core.passthrough_wanted() {
            // The cache dir sits on a plain filesystem: one level of stacking.
            let granted = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !granted {
                self.core
                    .disable_passthrough("the kernel lacks FUSE passthrough (needs 6.9+)");
            } else if !direct_io_mmap {
                self.core
                    .disable_passthrough("the kernel lacks mmap of direct I/O files");
            }
        }
        // 1 MiB writes and reads: fewer round trips through the daemon.
        if let Err(max) = config.set_max_write(1 << 20) {
            tracing::debug!(max, "kernel caps max_write");
        }
        if let Err(max) = config.set_max_readahead(1 << 20) {
            if let Err(err) = config.set_max_readahead(max) {
                tracing::debug!(err, "kernel refused read-ahead setting");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_bytes(name);
        let ttl = self.ttl;
        self.start("lookup", move |core| async move {
            match core.lookup(parent.0, &name).await {
                Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno("lookup", err)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        self.start("getattr", move |core| async move {
            match core.getattr(ino.0).await {
                Ok(attr) => reply.attr(&ttl, &file_attr(&attr)),
                Err(err) => reply.error(errno("getattr", err)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time_of),
            fh: fh.map(|f| f.0),
        };
        let ttl = self.ttl;
        self.spawn("setattr", move |core| async move {
            match core.setattr(ino.0, change).await {
                Ok(attr) => reply.attr(&ttl, &file_attr(&attr)),
                Err(err) => reply.error(errno("setattr", err)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", move |core| async move {
            match core.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(err) => reply.error(errno("readlink", err)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name_bytes(name), req.uid(), req.gid());
        let ttl = self.ttl;
        self.spawn("mkdir", move |core| async move {
            match core.mkdir(parent.0, &name, mode & !umask, uid, gid).await {
                Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno("mkdir", err)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        self.spawn("unlink", move |core| async move {
            match core.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("unlink", err)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        self.spawn("rmdir", move |core| async move {
            match core.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("rmdir", err)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target, uid, gid) = (
            name_bytes(link_name),
            name_bytes(target.as_os_str()),
            req.uid(),
            req.gid(),
        );
        let ttl = self.ttl;
        self.spawn("symlink", move |core| async move {
            match core.symlink(parent.0, &name, &target, uid, gid).await {
                Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno("symlink", err)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            // Object stores cannot swap two keys atomically.
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name_bytes(name), name_bytes(newname));
        self.spawn("rename", move |core| async move {
            match core
                .rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await
            {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("rename", err)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // One object is one file: a second name for the same bytes has no object form.
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (mode, pid) = (OpenMode::from_flags(flags.0), req.pid());
        let backings = self.backings.clone();
        let work = move |core: Arc<Core>| async move {
            match core.open(ino.0, mode, pid).await {
                Ok(opened) => {
                    let fh = FileHandle(opened.fh);
                    let register = |file: &std::fs::File| reply.open_backing(file);
                    match backing_for(&core, &backings, ino.0, &opened, register) {
                        Some(id) => reply.opened_passthrough(fh, FopenFlags::empty(), &id),
                        None => reply.opened(fh, open_flags(&opened)),
                    }
                }
                Err(err) => reply.error(errno("open", err)),
            }
        };
        // Truncating a cached file syncs it: not on the request thread.
        if flags.0 & libc::O_TRUNC == 0 {
            self.start("open", work);
        } else {
            self.spawn("open", work);
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name_bytes(name);
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        };
        let ttl = self.ttl;
        let backings = self.backings.clone();
        self.start("create", move |core| async move {
            match core
                .create(parent.0, &name, mode & !umask, flags, caller)
                .await
            {
                Ok((attr, opened)) => {
                    let (fh, attr) = (FileHandle(opened.fh), file_attr(&attr));
                    let register = |file: &std::fs::File| reply.open_backing(file);
                    match backing_for(&core, &backings, attr.ino.0, &opened, register) {
                        Some(id) => reply.created_passthrough(
                            &ttl,
                            &attr,
                            Generation(0),
                            fh,
                            FopenFlags::empty(),
                            &id,
                        ),
                        None => reply.created(&ttl, &attr, Generation(0), fh, open_flags(&opened)),
                    }
                }
                Err(err) => reply.error(errno("create", err)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.start("read", move |core| async move {
            match core.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(err) => reply.error(errno("read", err)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = crate::buffers::Buffer::copy_of(data);
        self.start("write", move |core| async move {
            match core.write(fh.0, offset, &data).await {
                Ok(written) => reply.written(written),
                Err(err) => reply.error(errno("write", err)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let pid = req.pid();
        self.spawn("flush", move |core| async move {
            match core.flush(fh.0, pid).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("flush", err)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.note_release(fh.0);
        let backings = self.backings.clone();
        self.spawn("release", move |core| async move {
            let result = core.release(fh.0).await;
            backings.detach(fh.0);
            match result {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("release", err)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", move |core| async move {
            match core.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno("fsync", err)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(errno("opendir", err)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", move |core| async move {
            match core.readdir(ino.0, fh.0, offset, false).await {
                Ok(listing) => {
                    let entries = listing.entries.iter().enumerate();
                    for (index, entry) in entries.skip(offset as usize) {
                        let next = (index + 1) as u64;
                        if reply.add(
                            INodeNo(entry.ino),
                            next,
                            file_type(entry.kind),
                            OsStr::from_bytes(&entry.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(err) => reply.error(errno("readdir", err)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        self.spawn("readdirplus", move |core| async move {
            match core.readdir(ino.0, fh.0, offset, true).await {
                Ok(listing) => {
                    let entries = listing.entries.iter().enumerate();
                    for (index, entry) in entries.skip(offset as usize) {
                        let Some(attr) = &entry.attr else { continue };
                        let next = (index + 1) as u64;
                        let name = OsStr::from_bytes(&entry.name);
                        if reply.add(
                            INodeNo(entry.ino),
                            next,
                            name,
                            &ttl,
                            &file_attr(attr),
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(err) => reply.error(errno("readdirplus", err)),
            }
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are journaled in SQLite (synchronous=FULL) as they happen.
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // Extended attributes have no object form; say so without log noise.
        reply.error(Errno::ENOTSUP);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOTSUP);
    }

    // The requests below have no object form. fuser's defaults answer them with a
    // warning per request, and some come with every open: Python's `open()` and `less`
    // ask the file `isatty()`, an ioctl the kernel sends here each time. So they are
    // answered at once, on the request thread, without log noise.

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // What a regular file on a local filesystem answers to a terminal ioctl.
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // ENOSYS: the kernel stops asking and answers EOPNOTSUPP itself, so
        // posix_fallocate falls back to writing the range.
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        // ENOSYS: the kernel stops asking and treats the whole file as data for
        // SEEK_DATA and SEEK_HOLE.
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // ENOSYS: the kernel stops asking and reports files always ready, as for a
        // local file.
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // ENOSYS: the kernel stops asking and copies through reads and writes.
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (bytes, block) = self.core.statfs();
        let blocks = bytes / block;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 32,
            1 << 32,
            block as u32,
            MAX_NAME_BYTES as u32,
            block as u32,
        );
    }
}
