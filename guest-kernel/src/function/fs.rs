//! `/data`: the function's read-only data volume, as WASI preopened directory fd 3.
//!
//! Files are read through the block device on demand (`crate::devices::volume_read`); the
//! directory was read and validated at boot. Paths resolve inside the volume only (`..` past the
//! root is `ENOTCAPABLE`), and anything that would write is `EROFS`. Each open file has an entry
//! in the I/O reconnection table with its offset; after a restore its first use checks that the
//! block device and the file are there again (`EIO` if not) before reading on from that offset.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use abi::iotable::HandleKind;
use abi::volume::{self, EntryKind};
use abi::wasi::errno;

use crate::{devices, iotable};

/// The preopened directory's fd.
pub const PREOPEN_FD: u32 = 3;
/// The name the function sees it under.
pub const PREOPEN_NAME: &str = "/data";
/// Most files and directories open at once.
const MAX_OPEN: usize = 64;

const FILETYPE_DIRECTORY: u8 = 3;
const FILETYPE_REGULAR: u8 = 4;
/// The `fd_write` right: asking for it is asking to write, which a read-only volume refuses.
/// (Runtimes ask for path-creation rights on every open, so only this one is checked.)
const RIGHT_FD_WRITE: u64 = 1 << 6;
/// Rights that change the volume: fd_datasync, fd_write, fd_allocate, path_create_directory,
/// path_create_file, path_link_source and _target, path_rename_source and _target,
/// path_filestat_set_size and _set_times, fd_filestat_set_size and _set_times, path_symlink,
/// path_remove_directory, path_unlink_file.
const WRITE_RIGHTS: u64 = (1 << 0)
    | RIGHT_FD_WRITE
    | (1 << 8)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 20)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Rights of an open file or directory: every preview 1 right except those that write.
const READ_RIGHTS: u64 = 0x1fff_ffff & !WRITE_RIGHTS;

/// An open file or directory of the volume.
#[derive(Debug, Clone)]
struct Open {
    /// Its path in the volume ("" for the root).
    path: String,
    dir: bool,
    /// A file's read position.
    offset: u64,
    /// A file's size and where its bytes are in the volume.
    size: u64,
    start: u64,
}

/// The open files and directories of one store.
#[derive(Debug, Default)]
pub struct Files {
    open: BTreeMap<u32, Open>,
}

/// What `fd_filestat_get` and `path_filestat_get` report.
pub struct Stat {
    inode: u64,
    filetype: u8,
    size: u64,
}

impl Stat {
    /// The 64-byte `filestat` encoding.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[8..16].copy_from_slice(&self.inode.to_le_bytes());
        b[16] = self.filetype;
        b[24..32].copy_from_slice(&1u64.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

type Errno = u16;

impl Files {
    /// The preopened `/data` when the VM has a data volume, otherwise nothing.
    pub fn new() -> Self {
        let mut files = Self::default();
        if devices::with_volume(|_| ()).is_some() {
            let root = Open { path: String::new(), dir: true, offset: 0, size: 0, start: 0 };
            files.open.insert(PREOPEN_FD, root);
        }
        files
    }

    fn get(&mut self, fd: u32) -> Result<&mut Open, Errno> {
        self.open.get_mut(&fd).ok_or(errno::BADF)
    }

    /// `fd_prestat_get`: the name length of the preopened directory.
    pub fn prestat(&self, fd: u32) -> Result<u32, Errno> {
        match self.open.get(&fd) {
            Some(o) if fd == PREOPEN_FD && o.dir && o.path.is_empty() => Ok(PREOPEN_NAME.len() as u32),
            _ => Err(errno::BADF),
        }
    }

    /// `fd_fdstat_get`: the filetype and the rights.
    pub fn fdstat(&self, fd: u32) -> Result<(u8, u64), Errno> {
        let o = self.open.get(&fd).ok_or(errno::BADF)?;
        Ok((if o.dir { FILETYPE_DIRECTORY } else { FILETYPE_REGULAR }, READ_RIGHTS))
    }

    /// The volume path `rel` names from directory `dir`.
    fn resolve(&mut self, dir: u32, rel: &[u8]) -> Result<String, Errno> {
        let base = self.get(dir)?;
        if !base.dir {
            return Err(errno::NOTDIR);
        }
        let rel = core::str::from_utf8(rel).map_err(|_| errno::INVAL)?;
        let mut parts: Vec<&str> = base.path.split('/').filter(|p| !p.is_empty()).collect();
        for part in rel.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop().ok_or(errno::NOTCAPABLE)?;
                }
                name => parts.push(name),
            }
        }
        let path = parts.join("/");
        if !path.is_empty() && volume::check_path(&path).is_err() {
            return Err(errno::NAMETOOLONG);
        }
        Ok(path)
    }

    /// Looks `path` up: (inode, kind, start, size); the root is a directory.
    fn lookup(path: &str) -> Result<(u64, EntryKind, u64, u64), Errno> {
        devices::with_volume(|dir| {
            if path.is_empty() {
                return Ok((1, EntryKind::Directory, 0, 0));
            }
            let index = dir.entries.binary_search_by(|e| e.path.as_str().cmp(path)).map_err(|_| errno::NOENT)?;
            let e = &dir.entries[index];
            Ok((index as u64 + 2, e.kind, e.offset, e.size))
        })
        .unwrap_or(Err(errno::NOENT))
    }

    /// `path_open`, read-only: returns the new fd.
    pub fn open(&mut self, dir: u32, rel: &[u8], oflags: u16, rights: u64) -> Result<u32, Errno> {
        const CREAT: u16 = 1;
        const DIRECTORY: u16 = 2;
        const EXCL: u16 = 4;
        const TRUNC: u16 = 8;
        let path = self.resolve(dir, rel)?;
        if oflags & (CREAT | EXCL | TRUNC) != 0 || rights & RIGHT_FD_WRITE != 0 {
            return Err(errno::ROFS);
        }
        let (_, kind, start, size) = Self::lookup(&path)?;
        let is_dir = kind == EntryKind::Directory;
        if oflags & DIRECTORY != 0 && !is_dir {
            return Err(errno::NOTDIR);
        }
        if self.open.len() >= MAX_OPEN {
            return Err(errno::MFILE);
        }
        let fd = (PREOPEN_FD + 1..).find(|fd| !self.open.contains_key(fd)).ok_or(errno::MFILE)?;
        if !is_dir && !iotable::open(fd, HandleKind::DataFile, 0, 0, &path) {
            return Err(errno::MFILE);
        }
        self.open.insert(fd, Open { path, dir: is_dir, offset: 0, size, start });
        Ok(fd)
    }

    /// `fd_close`.
    pub fn close(&mut self, fd: u32) -> Result<(), Errno> {
        let open = self.open.remove(&fd).ok_or(errno::BADF)?;
        if !open.dir {
            iotable::close(fd);
        }
        Ok(())
    }

    /// The open file `fd`, reconnected first if a restore left it pending.
    fn file(&mut self, fd: u32) -> Result<&mut Open, Errno> {
        let open = self.get(fd)?;
        if open.dir {
            return Err(errno::ISDIR);
        }
        let path = open.path.clone();
        iotable::reconnect(fd, |_| {
            if devices::block_ready() && Self::lookup(&path).is_ok() { Ok(()) } else { Err(errno::IO) }
        })?;
        self.get(fd)
    }

    /// `fd_read` of a file into `out`; returns the bytes read.
    pub fn read(&mut self, fd: u32, out: &mut [u8]) -> Result<usize, Errno> {
        let open = self.file(fd)?;
        let n = (open.size.saturating_sub(open.offset)).min(out.len() as u64) as usize;
        if n > 0 && !devices::volume_read(open.start + open.offset, &mut out[..n]) {
            return Err(errno::IO);
        }
        open.offset += n as u64;
        iotable::set_offset(fd, open.offset);
        Ok(n)
    }

    /// `fd_seek`: returns the new offset.
    pub fn seek(&mut self, fd: u32, delta: i64, whence: u8) -> Result<u64, Errno> {
        let open = self.file(fd)?;
        let base = match whence {
            0 => 0,
            1 => open.offset,
            2 => open.size,
            _ => return Err(errno::INVAL),
        };
        let target = i128::from(base) + i128::from(delta);
        open.offset = u64::try_from(target).map_err(|_| errno::INVAL)?;
        iotable::set_offset(fd, open.offset);
        Ok(open.offset)
    }

    /// `fd_tell`.
    pub fn tell(&mut self, fd: u32) -> Result<u64, Errno> {
        Ok(self.file(fd)?.offset)
    }

    /// `fd_filestat_get`.
    pub fn stat_fd(&mut self, fd: u32) -> Result<Stat, Errno> {
        let open = self.get(fd)?;
        let (path, dir) = (open.path.clone(), open.dir);
        if !dir {
            self.file(fd)?; // reconnects the file after a restore
        }
        Self::stat(&path)
    }

    /// `path_filestat_get`.
    pub fn stat_path(&mut self, dir: u32, rel: &[u8]) -> Result<Stat, Errno> {
        let path = self.resolve(dir, rel)?;
        Self::stat(&path)
    }

    fn stat(path: &str) -> Result<Stat, Errno> {
        let (inode, kind, _, size) = Self::lookup(path)?;
        let filetype = if kind == EntryKind::Directory { FILETYPE_DIRECTORY } else { FILETYPE_REGULAR };
        Ok(Stat { inode, filetype, size })
    }

    /// `fd_readdir`: the directory's entries from `cookie` on, encoded as WASI dirents, cut at
    /// `limit` bytes (a full buffer tells the caller to ask again).
    pub fn readdir(&mut self, fd: u32, cookie: u64, limit: usize) -> Result<Vec<u8>, Errno> {
        let open = self.get(fd)?;
        if !open.dir {
            return Err(errno::NOTDIR);
        }
        let dir = open.path.clone();
        let mut out = Vec::new();
        devices::with_volume(|volume| {
            let entries = volume
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.path.rsplit_once('/').map_or("", |(parent, _)| parent) == dir);
            for (n, (index, e)) in entries.enumerate().skip(cookie as usize) {
                let name = volume::file_name(&e.path);
                let filetype = if e.kind == EntryKind::Directory { FILETYPE_DIRECTORY } else { FILETYPE_REGULAR };
                out.extend_from_slice(&(n as u64 + 1).to_le_bytes());
                out.extend_from_slice(&(index as u64 + 2).to_le_bytes());
                out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                out.extend_from_slice(&[filetype, 0, 0, 0]);
                out.extend_from_slice(name.as_bytes());
                if out.len() >= limit {
                    break;
                }
            }
        });
        out.truncate(limit);
        Ok(out)
    }
}
