//! The function's filesystem: one tree in guest memory, writable, that the function reaches
//! through its preopened directories (fds from [`FIRST_PREOPEN`]: the manifest's scratch
//! directories, by default `/` and `/tmp`, then the data volume's mount point, by default
//! `/data`). `/run/thaw/instance-id` holds the VM's instance id.
//!
//! The data volume is grafted into the tree at boot, from its directory: its files are read
//! through the [`Volume`] on demand until the function first changes one, which copies it into
//! memory. Each fd open on a file still read from the volume has an entry in the I/O
//! reconnection table ([`Handles`]); after a restore, its first read checks that the volume and
//! the file are there again (`EIO` if not).
//!
//! Everything written lives in the VM's memory and goes with it: a restored or reset VM starts
//! from the tree as it was at the checkpoint. What the function adds (file bytes, nodes, names)
//! is counted against the manifest's scratch allowance, and going past it is `ENOSPC`.
//!
//! Paths resolve inside the directory they are given with: an absolute path, a `..` past it or a
//! symlink out of it is `EPERM`, as in Wasmtime. Errnos follow Wasmtime's preview 1 on Linux.
//! Rights are not enforced per fd (`fd_fdstat_set_rights` is `ENOTSUP`, as in Wasmtime): a file
//! opened without the write right is read-only, and the rights reported follow the open mode.
//!
//! What the tree needs from outside it comes through three small traits, [`Volume`], [`Handles`]
//! and [`Clock`]: the guest implements them over its block device, its I/O table and its TSC
//! clock (`backing.rs`), and the host's tests over fakes (`host-vmm/tests/guest_fs.rs`, which
//! compiles this file for the host). So this file must never name anything of the kernel's
//! (`crate::`): only `alloc`, `core` and `abi`.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use abi::iotable::{Handle, HandleKind};
use abi::volume::{Directory, EntryKind};
use abi::wasi::{errno, fdflags, filetype, lookupflags, rights};

/// The first preopened directory's fd.
pub const FIRST_PREOPEN: u32 = 3;
/// Where the instance id is, as a file of 32 hex digits and no newline.
pub const INSTANCE_DIR: &str = "/run/thaw";
const INSTANCE_FILE: &str = "instance-id";
/// Most files and directories open at once.
const MAX_OPEN: usize = 1024;
/// Most symlinks one path resolution follows.
const MAX_SYMLINKS: u32 = 40;
/// What a node costs the scratch allowance besides its bytes and name.
const NODE_COST: u64 = 128;
/// Longest file or symlink name.
const MAX_NAME: usize = 255;

/// A WASI errno (`abi::wasi::errno`).
pub type Errno = u16;

/// The data volume, which files not yet changed are read from.
pub trait Volume {
    /// Runs `f` on the volume's directory; `None` when the VM has no volume.
    fn with_directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Option<R>;

    /// Reads `out.len()` bytes of the volume at byte `offset`; false if it cannot.
    fn read(&self, offset: u64, out: &mut [u8]) -> bool;

    /// Makes sure the volume can be read (after a restore, its device may have to be set up
    /// again); false if it cannot.
    fn ready(&self) -> bool;
}

/// The I/O reconnection table (`abi::iotable`): one handle per fd open on a volume file.
pub trait Handles {
    /// Records an `Active` handle for `fd`; false when the table is full.
    fn open(&mut self, fd: u32, kind: HandleKind, offset: u64, port: u32, path: &str) -> bool;

    /// Marks `fd`'s handle closed.
    fn close(&mut self, fd: u32);

    /// Records the read offset of `fd`'s handle.
    fn set_offset(&mut self, fd: u32, offset: u64);

    /// Before using `fd`: when its handle waits to reconnect after a restore, runs `step` and,
    /// if it succeeds, makes the handle `Active` again. Returns `step`'s error, or `Ok` when
    /// nothing was needed.
    fn reconnect(&mut self, fd: u32, step: impl FnOnce(&Handle) -> Result<(), Errno>) -> Result<(), Errno>;
}

/// The wall clock that stamps the times files carry.
pub trait Clock {
    /// Nanoseconds since the Unix epoch.
    fn realtime_ns(&self) -> u64;
}

/// A file's bytes: still on the data volume, or in memory.
#[derive(Debug)]
enum Content {
    Volume { start: u64, size: u64, path: String },
    Memory(Vec<u8>),
}

#[derive(Debug)]
enum Kind {
    Dir { entries: BTreeMap<String, u64>, parent: u64 },
    File(Content),
    Symlink(String),
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    nlink: u64,
    atim: u64,
    mtim: u64,
    ctim: u64,
}

impl Node {
    fn filetype(&self) -> u8 {
        match self.kind {
            Kind::Dir { .. } => filetype::DIRECTORY,
            Kind::File(_) => filetype::REGULAR_FILE,
            Kind::Symlink(_) => filetype::SYMBOLIC_LINK,
        }
    }

    fn size(&self) -> u64 {
        match &self.kind {
            Kind::Dir { entries, .. } => entries.len() as u64,
            Kind::File(Content::Volume { size, .. }) => *size,
            Kind::File(Content::Memory(bytes)) => bytes.len() as u64,
            Kind::Symlink(target) => target.len() as u64,
        }
    }
}

/// An open file or directory.
#[derive(Debug)]
struct Open {
    ino: u64,
    read: bool,
    write: bool,
    flags: u16,
    offset: u64,
    /// The name a preopened directory is given to the function under.
    preopen: Option<String>,
}

/// What `fd_filestat_get` and `path_filestat_get` report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stat {
    /// The inode.
    pub ino: u64,
    /// The file type.
    pub filetype: u8,
    /// Hard links.
    pub nlink: u64,
    /// Bytes.
    pub size: u64,
    /// Access, modification and status change times, in ns since the epoch.
    pub times: [u64; 3],
}

impl Stat {
    /// The 64-byte `filestat` encoding.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[8..16].copy_from_slice(&self.ino.to_le_bytes());
        b[16] = self.filetype;
        b[24..32].copy_from_slice(&self.nlink.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        for (i, t) in self.times.iter().enumerate() {
            b[40 + i * 8..48 + i * 8].copy_from_slice(&t.to_le_bytes());
        }
        b
    }
}

/// Where a path led: the directory holding its last component, that component, and the node
/// it names, if any.
struct Found {
    parent: u64,
    name: String,
    ino: Option<u64>,
    /// The path ended in `/`.
    slash: bool,
}

/// The tree and the open files of one function, over the data volume `V`, the I/O table `H`
/// and the clock `C`.
#[derive(Debug)]
pub struct Files<V, H, C> {
    nodes: BTreeMap<u64, Node>,
    next_ino: u64,
    /// Bytes the function has added, and the most it may.
    used: u64,
    cap: u64,
    open: BTreeMap<u32, Open>,
    /// fds that belong to sockets.
    reserved: core::ops::Range<u32>,
    /// fds the standard streams were moved to.
    held: BTreeSet<u32>,
    /// The data volume, the I/O reconnection table and the wall clock.
    volume: V,
    handles: H,
    clock: C,
    /// The node of `/run/thaw/instance-id`, which a restore rewrites.
    instance_ino: u64,
}

const ROOT: u64 = 1;

impl<V: Volume, H: Handles, C: Clock> Files<V, H, C> {
    /// The tree the manifest describes: its scratch directories and the data volume (when
    /// `volume` has a directory) at its mount point, each preopened, and `/run/thaw/instance-id`.
    /// `reserved` are the socket fds, which files never take.
    pub fn new(
        manifest: &abi::bundle::Manifest,
        instance_id: &str,
        reserved: core::ops::Range<u32>,
        clock: C,
        volume: V,
        handles: H,
    ) -> Self {
        let root =
            Node { kind: Kind::Dir { entries: BTreeMap::new(), parent: ROOT }, nlink: 2, atim: 0, mtim: 0, ctim: 0 };
        let mut files = Self {
            nodes: BTreeMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            used: 0,
            cap: u64::MAX,
            open: BTreeMap::new(),
            reserved,
            held: BTreeSet::new(),
            volume,
            handles,
            clock,
            instance_ino: 0,
        };
        if let Some(entries) = files.volume.with_directory(|dir| dir.entries.clone()) {
            let mount = files.mkdir_all(&manifest.data_mount);
            for e in &entries {
                let (parent, name) = match e.path.rsplit_once('/') {
                    Some((parent, name)) => (files.mkdir_all_under(mount, parent), name),
                    None => (mount, e.path.as_str()),
                };
                if files.dir_entries(parent).is_some_and(|d| d.contains_key(name)) {
                    continue; // a directory made for a deeper entry already
                }
                let kind = match e.kind {
                    EntryKind::Directory => Kind::Dir { entries: BTreeMap::new(), parent },
                    EntryKind::File => {
                        Kind::File(Content::Volume { start: e.offset, size: e.size, path: e.path.clone() })
                    }
                };
                let ino = files.add(kind);
                files.link(parent, name, ino);
            }
        }
        let run = files.mkdir_all(INSTANCE_DIR);
        files.instance_ino = files.add(Kind::File(Content::Memory(instance_id.as_bytes().to_vec())));
        files.link(run, INSTANCE_FILE, files.instance_ino);
        for (fd, dir) in (FIRST_PREOPEN..).zip(manifest.preopens()) {
            let ino = files.mkdir_all(dir);
            let open = Open { ino, read: true, write: false, flags: 0, offset: 0, preopen: Some(dir.to_string()) };
            files.open.insert(fd, open);
        }
        // What the function adds from here on counts.
        files.used = 0;
        files.cap = u64::from(manifest.scratch_mib) << 20;
        files
    }

    /// A restored VM's fresh instance id and time base.
    pub fn reseed(&mut self, instance_id: &str, clock: C) {
        self.clock = clock;
        // Nothing to rewrite if init removed it.
        if let Some(Node { kind: Kind::File(content), .. }) = self.nodes.get_mut(&self.instance_ino) {
            *content = Content::Memory(instance_id.as_bytes().to_vec());
        }
    }

    fn now(&self) -> u64 {
        self.clock.realtime_ns()
    }

    fn add(&mut self, kind: Kind) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = self.now();
        let nlink = if matches!(kind, Kind::Dir { .. }) { 2 } else { 0 };
        self.nodes.insert(ino, Node { kind, nlink, atim: now, mtim: now, ctim: now });
        ino
    }

    fn dir_entries(&self, ino: u64) -> Option<&BTreeMap<String, u64>> {
        match &self.nodes.get(&ino)?.kind {
            Kind::Dir { entries, .. } => Some(entries),
            _ => None,
        }
    }

    fn link(&mut self, dir: u64, name: &str, ino: u64) {
        let now = self.now();
        if let Some(Node { kind: Kind::Dir { entries, .. }, mtim, ctim, .. }) = self.nodes.get_mut(&dir) {
            entries.insert(name.to_string(), ino);
            (*mtim, *ctim) = (now, now);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink += if matches!(node.kind, Kind::Dir { .. }) { 0 } else { 1 };
        }
    }

    /// The directory at absolute path `path`, made with its parents if missing.
    fn mkdir_all(&mut self, path: &str) -> u64 {
        self.mkdir_all_under(ROOT, path)
    }

    fn mkdir_all_under(&mut self, mut dir: u64, path: &str) -> u64 {
        for name in path.split('/').filter(|c| !c.is_empty()) {
            dir = match self.dir_entries(dir).and_then(|d| d.get(name)).copied() {
                Some(ino) if self.dir_entries(ino).is_some() => ino,
                _ => {
                    let ino = self.add(Kind::Dir { entries: BTreeMap::new(), parent: dir });
                    self.link(dir, name, ino);
                    ino
                }
            };
        }
        dir
    }

    /// Charges `bytes` more to the scratch allowance.
    fn charge(&mut self, bytes: u64) -> Result<(), Errno> {
        let used = self.used.checked_add(bytes).ok_or(errno::NOSPC)?;
        if used > self.cap {
            return Err(errno::NOSPC);
        }
        self.used = used;
        Ok(())
    }

    fn refund(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    fn get(&self, fd: u32) -> Result<&Open, Errno> {
        self.open.get(&fd).ok_or(errno::BADF)
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(errno::NOENT)
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.dir_entries(ino).is_some()
    }

    /// Fails with `ENOENT`, as Linux does, when directory `dir` was removed while an fd held
    /// it: such a directory takes no new entries (nothing could ever reach or free them).
    fn check_live(&self, dir: u64) -> Result<(), Errno> {
        match self.node(dir)? {
            Node { kind: Kind::Dir { .. }, nlink: 0, .. } => Err(errno::NOENT),
            _ => Ok(()),
        }
    }

    /// True for an fd this filesystem has open.
    pub fn has(&self, fd: u32) -> bool {
        self.open.contains_key(&fd)
    }

    /// `fd_prestat_get` and `fd_prestat_dir_name`: the preopened directory's name.
    pub fn prestat(&self, fd: u32) -> Result<&str, Errno> {
        self.get(fd)?.preopen.as_deref().ok_or(errno::BADF)
    }

    /// `fd_fdstat_get`: the file type, flags, rights and inheriting rights.
    pub fn fdstat(&self, fd: u32) -> Result<(u8, u16, u64, u64), Errno> {
        let open = self.get(fd)?;
        if open.preopen.is_some() {
            return Ok((filetype::DIRECTORY, 0, rights::PREOPEN, rights::PREOPEN_INHERITING));
        }
        let filetype = self.node(open.ino)?.filetype();
        let mut base = rights::ALL;
        if filetype == filetype::DIRECTORY {
            base &= !(rights::FD_SEEK | rights::FD_FILESTAT_SET_SIZE | rights::PATH_FILESTAT_SET_SIZE);
        }
        if !open.read {
            base &= !(rights::FD_READ | rights::FD_READDIR);
        }
        if !open.write {
            base &= !rights::FD_WRITE;
        }
        Ok((filetype, open.flags, base, base))
    }

    /// `fd_fdstat_set_flags`: only `APPEND` and `NONBLOCK` change; the sync flags are `EINVAL`.
    pub fn set_flags(&mut self, fd: u32, flags: u16) -> Result<(), Errno> {
        self.file(fd)?;
        if flags & (fdflags::DSYNC | fdflags::RSYNC | fdflags::SYNC) != 0 {
            return Err(errno::INVAL);
        }
        let open = self.open.get_mut(&fd).ok_or(errno::BADF)?;
        open.flags = flags & (fdflags::APPEND | fdflags::NONBLOCK);
        Ok(())
    }

    /// The directory behind fd `dir`.
    fn dir_fd(&self, dir: u32) -> Result<u64, Errno> {
        let ino = self.get(dir)?.ino;
        if self.is_dir(ino) { Ok(ino) } else { Err(errno::NOTDIR) }
    }

    /// Resolves `path` from directory fd `dir`, following a final symlink when `follow` says so
    /// (or the path ends in `/`).
    fn walk(&self, dir: u32, path: &[u8], follow: bool) -> Result<Found, Errno> {
        let base = self.dir_fd(dir)?;
        let path = core::str::from_utf8(path).map_err(|_| errno::ILSEQ)?;
        if path.is_empty() {
            return Err(errno::NOENT);
        }
        if path.contains('\0') {
            return Err(errno::INVAL);
        }
        if path.starts_with('/') {
            return Err(errno::PERM);
        }
        let slash = path.ends_with('/');
        let mut queue: VecDeque<String> = path.split('/').filter(|c| !c.is_empty()).map(String::from).collect();
        let mut stack = alloc::vec![base];
        let mut links = 0;
        while let Some(name) = queue.pop_front() {
            let cur = *stack.last().unwrap_or(&base);
            let last = queue.is_empty();
            match name.as_str() {
                "." if last => return Ok(Found { parent: cur, name, ino: Some(cur), slash }),
                "." => {}
                ".." => {
                    if stack.len() == 1 {
                        return Err(errno::PERM);
                    }
                    stack.pop();
                    if last {
                        let now = *stack.last().unwrap_or(&base);
                        return Ok(Found { parent: now, name, ino: Some(now), slash });
                    }
                }
                _ => {
                    if name.len() > MAX_NAME {
                        return Err(errno::NAMETOOLONG);
                    }
                    let entries = self.dir_entries(cur).ok_or(errno::NOTDIR)?;
                    let Some(&ino) = entries.get(&name) else {
                        return if last {
                            Ok(Found { parent: cur, name, ino: None, slash })
                        } else {
                            Err(errno::NOENT)
                        };
                    };
                    match &self.node(ino)?.kind {
                        Kind::Symlink(target) if !last || follow || slash => {
                            links += 1;
                            if links > MAX_SYMLINKS {
                                return Err(errno::LOOP);
                            }
                            if target.starts_with('/') {
                                return Err(errno::PERM);
                            }
                            if target.ends_with('/') && last {
                                queue.push_front(".".into());
                            }
                            for part in target.split('/').filter(|c| !c.is_empty()).rev() {
                                queue.push_front(part.into());
                            }
                        }
                        _ if last => return Ok(Found { parent: cur, name, ino: Some(ino), slash }),
                        Kind::Dir { .. } => stack.push(ino),
                        _ => return Err(errno::NOTDIR),
                    }
                }
            }
        }
        // Only "." and ".." components, handled above, or an empty target.
        let cur = *stack.last().unwrap_or(&base);
        Ok(Found { parent: cur, name: ".".into(), ino: Some(cur), slash })
    }

    fn new_fd(&self) -> Result<u32, Errno> {
        if self.open.len() >= MAX_OPEN {
            return Err(errno::MFILE);
        }
        (FIRST_PREOPEN..)
            .find(|fd| !self.open.contains_key(fd) && !self.reserved.contains(fd) && !self.held.contains(fd))
            .ok_or(errno::MFILE)
    }

    /// `path_open`: returns the new fd.
    #[allow(clippy::too_many_arguments)] // the WASI call's arguments
    pub fn open(
        &mut self,
        dir: u32,
        lookup: u32,
        path: &[u8],
        oflags: u16,
        base: u64,
        flags: u16,
    ) -> Result<u32, Errno> {
        use abi::wasi::oflags::{CREAT, DIRECTORY, EXCL, TRUNC};
        if flags & (fdflags::DSYNC | fdflags::RSYNC | fdflags::SYNC) != 0 {
            return Err(errno::NOTSUP);
        }
        if oflags & DIRECTORY != 0 && oflags & (CREAT | EXCL | TRUNC) != 0 {
            return Err(errno::INVAL);
        }
        // With `CREAT` and `EXCL`, a final symlink is never followed: it exists (POSIX, Linux).
        let exclusive = oflags & CREAT != 0 && oflags & EXCL != 0;
        let found = self.walk(dir, path, lookup & lookupflags::SYMLINK_FOLLOW != 0 && !exclusive)?;
        let write = base & rights::FD_WRITE != 0 || oflags & (CREAT | TRUNC) != 0;
        let read = base & rights::FD_READ != 0 || base & rights::FD_WRITE == 0;
        let ino = match found.ino {
            Some(_) if exclusive => return Err(errno::EXIST),
            Some(ino) => ino,
            None if oflags & CREAT != 0 => {
                if found.slash {
                    return Err(errno::ISDIR);
                }
                self.check_live(found.parent)?;
                self.charge(NODE_COST + found.name.len() as u64)?;
                let ino = self.add(Kind::File(Content::Memory(Vec::new())));
                self.link(found.parent, &found.name, ino);
                ino
            }
            None => return Err(errno::NOENT),
        };
        let node = self.node(ino)?;
        match node.kind {
            Kind::Symlink(_) => return Err(if oflags & DIRECTORY != 0 { errno::NOTDIR } else { errno::LOOP }),
            Kind::Dir { .. } if write => return Err(errno::ISDIR),
            Kind::File(_) if oflags & DIRECTORY != 0 || found.slash => return Err(errno::NOTDIR),
            _ => {}
        }
        let fd = self.new_fd()?;
        if oflags & TRUNC != 0 {
            self.resize(ino, 0)?;
        }
        // A file still on the volume (not truncated just now) reads it through a handle.
        if let Some(Node { kind: Kind::File(Content::Volume { path, .. }), .. }) = self.nodes.get(&ino)
            && !self.handles.open(fd, HandleKind::DataFile, 0, 0, path)
        {
            return Err(errno::MFILE);
        }
        let flags = flags & (fdflags::APPEND | fdflags::NONBLOCK);
        self.open.insert(fd, Open { ino, read, write, flags, offset: 0, preopen: None });
        Ok(fd)
    }

    /// `fd_close`. Closing a preopened directory is allowed, as everywhere.
    pub fn close(&mut self, fd: u32) -> Result<(), Errno> {
        let open = self.open.remove(&fd).ok_or(errno::BADF)?;
        if matches!(self.nodes.get(&open.ino), Some(Node { kind: Kind::File(Content::Volume { .. }), .. })) {
            self.handles.close(fd);
        }
        self.collect(open.ino);
        Ok(())
    }

    /// Keeps `fd`, where a standard stream now is, from being given to a file.
    pub fn hold(&mut self, fd: u32) {
        self.held.insert(fd);
    }

    /// Gives `fd` back.
    pub fn release(&mut self, fd: u32) {
        self.held.remove(&fd);
    }

    /// `fd_renumber` of a file or directory to `to`, which the caller closed first.
    pub fn renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        let open = self.open.remove(&from).ok_or(errno::BADF)?;
        if let Some(Node { kind: Kind::File(Content::Volume { path, .. }), .. }) = self.nodes.get(&open.ino) {
            self.handles.close(from);
            self.handles.open(to, HandleKind::DataFile, open.offset, 0, path);
        }
        self.open.insert(to, open);
        Ok(())
    }

    /// Frees a node that no directory and no fd holds any more.
    fn collect(&mut self, ino: u64) {
        let unlinked = self.nodes.get(&ino).is_some_and(|n| n.nlink == 0);
        if unlinked && !self.open.values().any(|o| o.ino == ino) {
            let bytes = match self.nodes.remove(&ino).map(|n| n.kind) {
                Some(Kind::File(Content::Memory(bytes))) => bytes.len() as u64,
                Some(Kind::Symlink(target)) => target.len() as u64,
                _ => 0,
            };
            self.refund(NODE_COST + bytes);
        }
    }

    /// The open file `fd` (not a directory).
    fn file(&self, fd: u32) -> Result<(&Open, u64), Errno> {
        let open = self.get(fd)?;
        match self.node(open.ino)?.kind {
            Kind::File(_) => Ok((open, open.ino)),
            _ => Err(errno::ISDIR),
        }
    }

    /// Reads the file `ino` at `offset` into `out`; returns the bytes read.
    fn read_at(&mut self, fd: u32, ino: u64, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
        let now = self.now();
        let node = self.nodes.get_mut(&ino).ok_or(errno::BADF)?;
        node.atim = now;
        match &node.kind {
            Kind::File(Content::Memory(bytes)) => {
                let from = bytes.len().min(usize::try_from(offset).unwrap_or(usize::MAX));
                let n = (bytes.len() - from).min(out.len());
                out[..n].copy_from_slice(&bytes[from..from + n]);
                Ok(n)
            }
            Kind::File(Content::Volume { start, size, path }) => {
                let (start, size) = (*start, *size);
                let volume = &self.volume;
                self.handles.reconnect(fd, |_| {
                    let there = volume.with_directory(|v| v.entries.iter().any(|e| e.path == *path)).unwrap_or(false);
                    if volume.ready() && there { Ok(()) } else { Err(errno::IO) }
                })?;
                let n = size.saturating_sub(offset).min(out.len() as u64) as usize;
                if n > 0 && !self.volume.read(start + offset, &mut out[..n]) {
                    return Err(errno::IO);
                }
                Ok(n)
            }
            _ => Err(errno::ISDIR),
        }
    }

    /// `fd_read` (`at` = `None`, from and advancing the offset) and `fd_pread`.
    pub fn read(&mut self, fd: u32, at: Option<u64>, out: &mut [u8]) -> Result<usize, Errno> {
        let (open, ino) = self.file(fd)?;
        if !open.read {
            return Err(errno::BADF);
        }
        let offset = at.unwrap_or(open.offset);
        let n = self.read_at(fd, ino, offset, out)?;
        if at.is_none() {
            let open = self.open.get_mut(&fd).ok_or(errno::BADF)?;
            open.offset = offset + n as u64;
            if matches!(self.nodes.get(&ino), Some(Node { kind: Kind::File(Content::Volume { .. }), .. })) {
                self.handles.set_offset(fd, offset + n as u64);
            }
        }
        Ok(n)
    }

    /// The file `ino`'s bytes in memory, copied from the volume first if they are still there.
    fn bytes_mut(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        let volume = match &self.node(ino)?.kind {
            Kind::File(Content::Volume { start, size, .. }) => Some((*start, *size)),
            Kind::File(Content::Memory(_)) => None,
            _ => return Err(errno::ISDIR),
        };
        if let Some((start, size)) = volume {
            self.charge(size)?;
            let mut bytes = alloc::vec![0u8; size as usize];
            if size > 0 && !self.volume.read(start, &mut bytes) {
                self.refund(size);
                return Err(errno::IO);
            }
            self.keep_in_memory(ino, bytes);
        }
        match self.nodes.get_mut(&ino) {
            Some(Node { kind: Kind::File(Content::Memory(bytes)), .. }) => Ok(bytes),
            _ => Err(errno::BADF),
        }
    }

    /// Makes `bytes` the content of the file `ino`, in memory from now on. A volume file is no
    /// longer read from the volume, so the fds open on it give up their handles.
    fn keep_in_memory(&mut self, ino: u64, bytes: Vec<u8>) {
        let Some(Node { kind: Kind::File(content), .. }) = self.nodes.get_mut(&ino) else { return };
        let was_volume = matches!(content, Content::Volume { .. });
        *content = Content::Memory(bytes);
        if was_volume {
            for (&fd, _) in self.open.iter().filter(|(_, open)| open.ino == ino) {
                self.handles.close(fd);
            }
        }
    }

    /// Sets the file `ino`'s size, zero-filling growth.
    fn resize(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        let mut old = self.node(ino)?.size();
        if size == 0 && matches!(self.node(ino)?.kind, Kind::File(Content::Volume { .. })) {
            // Truncating a volume file needs none of its bytes.
            self.keep_in_memory(ino, Vec::new());
            old = 0;
        }
        if size > old {
            self.charge(size - old)?;
        }
        let now = self.now();
        let headroom = self.cap.saturating_sub(self.used) as usize;
        let bytes = match self.bytes_mut(ino) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.refund(size.saturating_sub(old));
                return Err(e);
            }
        };
        // Grow the buffer by doubling, so appends stay cheap, but never past what the allowance
        // has left: the heap holds the allowance, not twice it.
        let len = size as usize;
        if len > bytes.capacity() {
            let target = len.max(bytes.capacity().saturating_mul(2)).min(len.saturating_add(headroom));
            bytes.reserve_exact(target - bytes.len());
        }
        bytes.resize(len, 0);
        if size < old {
            self.refund(old - size);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            (node.mtim, node.ctim) = (now, now);
        }
        Ok(())
    }

    /// `fd_write` (`at` = `None`: at the offset, or the end with `APPEND`) and `fd_pwrite`;
    /// returns the bytes written.
    pub fn write(&mut self, fd: u32, at: Option<u64>, data: &[u8]) -> Result<usize, Errno> {
        let (open, ino) = self.file(fd)?;
        if !open.write {
            return Err(errno::BADF);
        }
        let append = open.flags & fdflags::APPEND != 0;
        let offset = match at {
            Some(at) => at,
            None if append => self.node(ino)?.size(),
            None => open.offset,
        };
        let end = offset.checked_add(data.len() as u64).ok_or(errno::FBIG)?;
        // Writing nothing changes nothing (write(2) on Linux): no growth to `offset`, no copy
        // of a volume file, no new times. Only the offset moves, to the end under `APPEND`.
        if !data.is_empty() {
            if end > self.node(ino)?.size() {
                self.resize(ino, end)?;
            }
            let bytes = self.bytes_mut(ino)?;
            bytes[offset as usize..end as usize].copy_from_slice(data);
            let now = self.now();
            if let Some(node) = self.nodes.get_mut(&ino) {
                (node.mtim, node.ctim) = (now, now);
            }
        }
        if at.is_none() {
            let open = self.open.get_mut(&fd).ok_or(errno::BADF)?;
            open.offset = end;
        }
        Ok(data.len())
    }

    /// `fd_seek`: returns the new offset.
    pub fn seek(&mut self, fd: u32, delta: i64, whence: u8) -> Result<u64, Errno> {
        let (open, ino) = self.file(fd)?;
        let base = match whence {
            0 => 0,
            1 => open.offset,
            2 => self.node(ino)?.size(),
            _ => return Err(errno::INVAL),
        };
        let target = u64::try_from(i128::from(base) + i128::from(delta)).map_err(|_| errno::INVAL)?;
        let volume = matches!(self.node(ino)?.kind, Kind::File(Content::Volume { .. }));
        self.open.get_mut(&fd).ok_or(errno::BADF)?.offset = target;
        if volume {
            self.handles.set_offset(fd, target);
        }
        Ok(target)
    }

    /// `fd_tell`.
    pub fn tell(&self, fd: u32) -> Result<u64, Errno> {
        Ok(self.file(fd)?.0.offset)
    }

    /// `fd_advise` and `fd_allocate` (which is `ENOTSUP`, as in Wasmtime) check the fd is a file;
    /// `fd_sync` and `fd_datasync` succeed on any open file or directory: memory is as durable
    /// as this filesystem gets.
    pub fn check_file(&self, fd: u32) -> Result<(), Errno> {
        self.file(fd).map(|_| ())
    }

    /// `fd_filestat_set_size`.
    pub fn set_size(&mut self, fd: u32, size: u64) -> Result<(), Errno> {
        let (open, ino) = self.file(fd)?;
        if !open.write {
            return Err(errno::BADF);
        }
        self.resize(ino, size)
    }

    fn stat_of(&self, ino: u64) -> Result<Stat, Errno> {
        let node = self.node(ino)?;
        Ok(Stat {
            ino,
            filetype: node.filetype(),
            nlink: node.nlink,
            size: node.size(),
            times: [node.atim, node.mtim, node.ctim],
        })
    }

    /// `fd_filestat_get`.
    pub fn stat_fd(&self, fd: u32) -> Result<Stat, Errno> {
        self.stat_of(self.get(fd)?.ino)
    }

    /// `path_filestat_get`.
    pub fn stat_path(&self, dir: u32, lookup: u32, path: &[u8]) -> Result<Stat, Errno> {
        let found = self.walk(dir, path, lookup & lookupflags::SYMLINK_FOLLOW != 0)?;
        let ino = found.ino.ok_or(errno::NOENT)?;
        if found.slash && !self.is_dir(ino) {
            return Err(errno::NOTDIR);
        }
        self.stat_of(ino)
    }

    fn set_times(&mut self, ino: u64, atim: u64, mtim: u64, flags: u16) -> Result<(), Errno> {
        use abi::wasi::fstflags::{ATIM, ATIM_NOW, MTIM, MTIM_NOW};
        if flags & (ATIM | ATIM_NOW) == ATIM | ATIM_NOW || flags & (MTIM | MTIM_NOW) == MTIM | MTIM_NOW {
            return Err(errno::INVAL);
        }
        if flags & !(ATIM | ATIM_NOW | MTIM | MTIM_NOW) != 0 {
            return Err(errno::INVAL);
        }
        let now = self.now();
        let node = self.nodes.get_mut(&ino).ok_or(errno::NOENT)?;
        if flags & ATIM != 0 {
            node.atim = atim;
        } else if flags & ATIM_NOW != 0 {
            node.atim = now;
        }
        if flags & MTIM != 0 {
            node.mtim = mtim;
        } else if flags & MTIM_NOW != 0 {
            node.mtim = now;
        }
        node.ctim = now;
        Ok(())
    }

    /// `fd_filestat_set_times`.
    pub fn set_times_fd(&mut self, fd: u32, atim: u64, mtim: u64, flags: u16) -> Result<(), Errno> {
        let ino = self.get(fd)?.ino;
        self.set_times(ino, atim, mtim, flags)
    }

    /// `path_filestat_set_times`.
    pub fn set_times_path(
        &mut self,
        dir: u32,
        lookup: u32,
        path: &[u8],
        times: (u64, u64),
        flags: u16,
    ) -> Result<(), Errno> {
        let ino = self.walk(dir, path, lookup & lookupflags::SYMLINK_FOLLOW != 0)?.ino.ok_or(errno::NOENT)?;
        self.set_times(ino, times.0, times.1, flags)
    }

    /// `path_create_directory`.
    pub fn mkdir(&mut self, dir: u32, path: &[u8]) -> Result<(), Errno> {
        let found = self.walk(dir, path, false)?;
        if found.ino.is_some() {
            return Err(errno::EXIST);
        }
        self.check_live(found.parent)?;
        self.charge(NODE_COST + found.name.len() as u64)?;
        let ino = self.add(Kind::Dir { entries: BTreeMap::new(), parent: found.parent });
        self.link(found.parent, &found.name, ino);
        Ok(())
    }

    /// Takes `name` out of directory `parent`.
    fn unlink_entry(&mut self, parent: u64, name: &str) -> Option<u64> {
        let now = self.now();
        let Node { kind: Kind::Dir { entries, .. }, mtim, ctim, .. } = self.nodes.get_mut(&parent)? else {
            return None;
        };
        let ino = entries.remove(name)?;
        (*mtim, *ctim) = (now, now);
        self.refund(name.len() as u64);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink = if matches!(node.kind, Kind::Dir { .. }) { 0 } else { node.nlink.saturating_sub(1) };
            node.ctim = now;
        }
        Some(ino)
    }

    /// `path_remove_directory`.
    pub fn rmdir(&mut self, dir: u32, path: &[u8]) -> Result<(), Errno> {
        let found = self.walk(dir, path, false)?;
        let ino = found.ino.ok_or(errno::NOENT)?;
        if found.name == "." || found.name == ".." {
            return Err(if found.name == "." { errno::INVAL } else { errno::NOTEMPTY });
        }
        match self.dir_entries(ino) {
            None => return Err(errno::NOTDIR),
            Some(entries) if !entries.is_empty() => return Err(errno::NOTEMPTY),
            Some(_) => {}
        }
        if self.open.values().any(|o| o.ino == ino && o.preopen.is_some()) {
            return Err(errno::BUSY);
        }
        self.unlink_entry(found.parent, &found.name);
        self.collect(ino);
        Ok(())
    }

    /// `path_unlink_file`.
    pub fn unlink(&mut self, dir: u32, path: &[u8]) -> Result<(), Errno> {
        let found = self.walk(dir, path, false)?;
        let ino = found.ino.ok_or(errno::NOENT)?;
        if self.is_dir(ino) {
            return Err(errno::ISDIR);
        }
        if found.slash {
            return Err(errno::NOTDIR);
        }
        self.unlink_entry(found.parent, &found.name);
        self.collect(ino);
        Ok(())
    }

    /// `path_symlink`: a link named `path` in `dir` whose target is `target`.
    pub fn symlink(&mut self, target: &[u8], dir: u32, path: &[u8]) -> Result<(), Errno> {
        let target = core::str::from_utf8(target).map_err(|_| errno::ILSEQ)?;
        let found = self.walk(dir, path, false)?;
        if found.ino.is_some() {
            return Err(errno::EXIST);
        }
        if found.slash {
            return Err(errno::NOENT);
        }
        if target.is_empty() {
            return Err(errno::NOENT);
        }
        if target.starts_with('/') {
            return Err(errno::PERM);
        }
        self.check_live(found.parent)?;
        self.charge(NODE_COST + (found.name.len() + target.len()) as u64)?;
        let ino = self.add(Kind::Symlink(target.into()));
        self.link(found.parent, &found.name, ino);
        Ok(())
    }

    /// `path_readlink`: the target of the symlink at `path`.
    pub fn readlink(&self, dir: u32, path: &[u8]) -> Result<String, Errno> {
        let ino = self.walk(dir, path, false)?.ino.ok_or(errno::NOENT)?;
        match &self.node(ino)?.kind {
            Kind::Symlink(target) => Ok(target.clone()),
            _ => Err(errno::INVAL),
        }
    }

    /// `path_link`: a hard link named `new` in `new_dir` to the file at `old` in `old_dir`.
    pub fn hard_link(&mut self, old_dir: u32, lookup: u32, old: &[u8], new_dir: u32, new: &[u8]) -> Result<(), Errno> {
        let from = self.walk(old_dir, old, lookup & lookupflags::SYMLINK_FOLLOW != 0)?;
        let ino = from.ino.ok_or(errno::NOENT)?;
        if self.is_dir(ino) {
            return Err(errno::PERM);
        }
        if from.slash {
            return Err(errno::NOTDIR);
        }
        let to = self.walk(new_dir, new, false)?;
        if to.ino.is_some() {
            return Err(errno::EXIST);
        }
        if to.slash {
            return Err(errno::NOENT);
        }
        self.check_live(to.parent)?;
        self.charge(to.name.len() as u64)?;
        self.link(to.parent, &to.name, ino);
        Ok(())
    }

    /// True when directory `ancestor` is `ino` or holds it, at any depth.
    fn contains(&self, ancestor: u64, mut ino: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match &self.nodes.get(&ino).map(|n| &n.kind) {
                Some(Kind::Dir { parent, .. }) if *parent != ino => ino = *parent,
                _ => return false,
            }
        }
    }

    /// `path_rename`.
    pub fn rename(&mut self, old_dir: u32, old: &[u8], new_dir: u32, new: &[u8]) -> Result<(), Errno> {
        let from = self.walk(old_dir, old, false)?;
        let ino = from.ino.ok_or(errno::NOENT)?;
        if from.name == "." || from.name == ".." {
            return Err(errno::BUSY);
        }
        let is_dir = self.is_dir(ino);
        let to = self.walk(new_dir, new, false)?;
        if (from.slash || to.slash) && !is_dir {
            return Err(errno::NOTDIR);
        }
        if to.name == "." || to.name == ".." {
            return Err(errno::BUSY);
        }
        if is_dir && self.contains(ino, to.parent) {
            return Err(errno::INVAL);
        }
        self.check_live(to.parent)?;
        if let Some(target) = to.ino {
            if target == ino {
                return Ok(());
            }
            match (is_dir, self.dir_entries(target)) {
                (true, Some(entries)) if !entries.is_empty() => return Err(errno::NOTEMPTY),
                (true, None) => return Err(errno::NOTDIR),
                (false, Some(_)) => return Err(errno::ISDIR),
                _ => {}
            }
            self.unlink_entry(to.parent, &to.name);
            self.collect(target);
        }
        self.charge(to.name.len() as u64)?;
        self.unlink_entry(from.parent, &from.name);
        self.link(to.parent, &to.name, ino);
        if let Some(Node { kind: Kind::Dir { parent, .. }, nlink, .. }) = self.nodes.get_mut(&ino) {
            (*parent, *nlink) = (to.parent, 2);
        }
        Ok(())
    }

    /// `fd_readdir`: the directory's entries from `cookie` on, `.` and `..` first, encoded as
    /// WASI dirents and cut at `limit` bytes (a full buffer tells the caller to ask again).
    pub fn readdir(&self, fd: u32, cookie: u64, limit: usize) -> Result<Vec<u8>, Errno> {
        let open = self.get(fd)?;
        let ino = open.ino;
        let Some(Kind::Dir { entries, parent }) = self.nodes.get(&ino).map(|n| &n.kind) else {
            return Err(errno::NOTDIR);
        };
        let dots = [(".", ino), ("..", *parent)];
        let all = dots.into_iter().chain(entries.iter().map(|(name, &ino)| (name.as_str(), ino)));
        let mut out = Vec::new();
        for (n, (name, ino)) in all.enumerate().skip(usize::try_from(cookie).unwrap_or(usize::MAX)) {
            let filetype = self.nodes.get(&ino).map_or(0, Node::filetype);
            out.extend_from_slice(&(n as u64 + 1).to_le_bytes());
            out.extend_from_slice(&ino.to_le_bytes());
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&[filetype, 0, 0, 0]);
            out.extend_from_slice(name.as_bytes());
            if out.len() >= limit {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// How many bytes a read of `fd` would return now (for `poll_oneoff`).
    pub fn readable(&self, fd: u32) -> Result<u64, Errno> {
        let (open, ino) = self.file(fd)?;
        Ok(self.node(ino)?.size().saturating_sub(open.offset))
    }
}
