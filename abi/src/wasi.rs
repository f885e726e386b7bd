//! The WASI preview1 surface thaw accepts: every function's name and signature, the errno
//! values, and the flag and type values the calls take and return (file types, rights, open,
//! fd and set-times flags).
//!
//! A function may import any preview1 function listed here, with exactly this signature;
//! `thaw pack` and the VMM reject any other import. The guest implements every one
//! (`guest-kernel/src/function/wasi.rs`; docs/WASI.md says how each behaves).

/// The WASI preview1 import module.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// A wasm value type in a WASI signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValType {
    /// `i32`
    I32,
    /// `i64`
    I64,
}

/// One preview1 function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function {
    /// Its import name.
    pub name: &'static str,
    /// Parameter types.
    pub params: &'static [ValType],
    /// True when it returns an errno (`i32`); only `proc_exit` returns nothing.
    pub returns_errno: bool,
}

use ValType::{I32, I64};

const fn f(name: &'static str, params: &'static [ValType]) -> Function {
    Function { name, params, returns_errno: true }
}

/// Every WASI preview1 function.
pub const FUNCTIONS: &[Function] = &[
    f("args_get", &[I32, I32]),
    f("args_sizes_get", &[I32, I32]),
    f("environ_get", &[I32, I32]),
    f("environ_sizes_get", &[I32, I32]),
    f("clock_res_get", &[I32, I32]),
    f("clock_time_get", &[I32, I64, I32]),
    f("fd_advise", &[I32, I64, I64, I32]),
    f("fd_allocate", &[I32, I64, I64]),
    f("fd_close", &[I32]),
    f("fd_datasync", &[I32]),
    f("fd_fdstat_get", &[I32, I32]),
    f("fd_fdstat_set_flags", &[I32, I32]),
    f("fd_fdstat_set_rights", &[I32, I64, I64]),
    f("fd_filestat_get", &[I32, I32]),
    f("fd_filestat_set_size", &[I32, I64]),
    f("fd_filestat_set_times", &[I32, I64, I64, I32]),
    f("fd_pread", &[I32, I32, I32, I64, I32]),
    f("fd_prestat_get", &[I32, I32]),
    f("fd_prestat_dir_name", &[I32, I32, I32]),
    f("fd_pwrite", &[I32, I32, I32, I64, I32]),
    f("fd_read", &[I32, I32, I32, I32]),
    f("fd_readdir", &[I32, I32, I32, I64, I32]),
    f("fd_renumber", &[I32, I32]),
    f("fd_seek", &[I32, I64, I32, I32]),
    f("fd_sync", &[I32]),
    f("fd_tell", &[I32, I32]),
    f("fd_write", &[I32, I32, I32, I32]),
    f("path_create_directory", &[I32, I32, I32]),
    f("path_filestat_get", &[I32, I32, I32, I32, I32]),
    f("path_filestat_set_times", &[I32, I32, I32, I32, I64, I64, I32]),
    f("path_link", &[I32, I32, I32, I32, I32, I32, I32]),
    f("path_open", &[I32, I32, I32, I32, I32, I64, I64, I32, I32]),
    f("path_readlink", &[I32, I32, I32, I32, I32, I32]),
    f("path_remove_directory", &[I32, I32, I32]),
    f("path_rename", &[I32, I32, I32, I32, I32, I32]),
    f("path_symlink", &[I32, I32, I32, I32, I32]),
    f("path_unlink_file", &[I32, I32, I32]),
    f("poll_oneoff", &[I32, I32, I32, I32]),
    Function { name: "proc_exit", params: &[I32], returns_errno: false },
    f("proc_raise", &[I32]),
    f("sched_yield", &[]),
    f("random_get", &[I32, I32]),
    f("sock_accept", &[I32, I32, I32]),
    f("sock_recv", &[I32, I32, I32, I32, I32, I32]),
    f("sock_send", &[I32, I32, I32, I32, I32]),
    f("sock_shutdown", &[I32, I32]),
];

/// The preview1 function named `name`.
pub fn lookup(name: &str) -> Option<&'static Function> {
    FUNCTIONS.iter().find(|f| f.name == name)
}

/// Every WASI preview1 errno value, numbered as the specification numbers them.
pub mod errno {
    /// Success.
    pub const SUCCESS: u16 = 0;
    /// Argument list too long.
    pub const TOOBIG: u16 = 1;
    /// Permission denied.
    pub const ACCES: u16 = 2;
    /// Address in use.
    pub const ADDRINUSE: u16 = 3;
    /// Address not available.
    pub const ADDRNOTAVAIL: u16 = 4;
    /// Address family not supported.
    pub const AFNOSUPPORT: u16 = 5;
    /// Resource unavailable, try again.
    pub const AGAIN: u16 = 6;
    /// Connection already in progress.
    pub const ALREADY: u16 = 7;
    /// Bad file descriptor.
    pub const BADF: u16 = 8;
    /// Bad message.
    pub const BADMSG: u16 = 9;
    /// Device or resource busy.
    pub const BUSY: u16 = 10;
    /// Operation canceled.
    pub const CANCELED: u16 = 11;
    /// No child processes.
    pub const CHILD: u16 = 12;
    /// Connection aborted.
    pub const CONNABORTED: u16 = 13;
    /// Connection refused.
    pub const CONNREFUSED: u16 = 14;
    /// Connection reset.
    pub const CONNRESET: u16 = 15;
    /// Resource deadlock would occur.
    pub const DEADLK: u16 = 16;
    /// Destination address required.
    pub const DESTADDRREQ: u16 = 17;
    /// Mathematics argument out of domain of function.
    pub const DOM: u16 = 18;
    /// Reserved.
    pub const DQUOT: u16 = 19;
    /// File exists.
    pub const EXIST: u16 = 20;
    /// Bad address.
    pub const FAULT: u16 = 21;
    /// File too large.
    pub const FBIG: u16 = 22;
    /// Host is unreachable.
    pub const HOSTUNREACH: u16 = 23;
    /// Identifier removed.
    pub const IDRM: u16 = 24;
    /// Illegal byte sequence.
    pub const ILSEQ: u16 = 25;
    /// Operation in progress.
    pub const INPROGRESS: u16 = 26;
    /// Interrupted function.
    pub const INTR: u16 = 27;
    /// Invalid argument.
    pub const INVAL: u16 = 28;
    /// I/O error.
    pub const IO: u16 = 29;
    /// Socket is connected.
    pub const ISCONN: u16 = 30;
    /// Is a directory.
    pub const ISDIR: u16 = 31;
    /// Too many levels of symbolic links.
    pub const LOOP: u16 = 32;
    /// Too many open files.
    pub const MFILE: u16 = 33;
    /// Too many links.
    pub const MLINK: u16 = 34;
    /// Message too large.
    pub const MSGSIZE: u16 = 35;
    /// Reserved.
    pub const MULTIHOP: u16 = 36;
    /// Filename too long.
    pub const NAMETOOLONG: u16 = 37;
    /// Network is down.
    pub const NETDOWN: u16 = 38;
    /// Connection aborted by network.
    pub const NETRESET: u16 = 39;
    /// Network unreachable.
    pub const NETUNREACH: u16 = 40;
    /// Too many files open in system.
    pub const NFILE: u16 = 41;
    /// No buffer space available.
    pub const NOBUFS: u16 = 42;
    /// No such device.
    pub const NODEV: u16 = 43;
    /// No such file or directory.
    pub const NOENT: u16 = 44;
    /// Executable file format error.
    pub const NOEXEC: u16 = 45;
    /// No locks available.
    pub const NOLCK: u16 = 46;
    /// Reserved.
    pub const NOLINK: u16 = 47;
    /// Not enough space.
    pub const NOMEM: u16 = 48;
    /// No message of the desired type.
    pub const NOMSG: u16 = 49;
    /// Protocol not available.
    pub const NOPROTOOPT: u16 = 50;
    /// No space left on device.
    pub const NOSPC: u16 = 51;
    /// Function not supported.
    pub const NOSYS: u16 = 52;
    /// The socket is not connected.
    pub const NOTCONN: u16 = 53;
    /// Not a directory or a symbolic link to a directory.
    pub const NOTDIR: u16 = 54;
    /// Directory not empty.
    pub const NOTEMPTY: u16 = 55;
    /// State not recoverable.
    pub const NOTRECOVERABLE: u16 = 56;
    /// Not a socket.
    pub const NOTSOCK: u16 = 57;
    /// Not supported, or operation not supported on socket.
    pub const NOTSUP: u16 = 58;
    /// Inappropriate I/O control operation.
    pub const NOTTY: u16 = 59;
    /// No such device or address.
    pub const NXIO: u16 = 60;
    /// Value too large to be stored in data type.
    pub const OVERFLOW: u16 = 61;
    /// Previous owner died.
    pub const OWNERDEAD: u16 = 62;
    /// Operation not permitted.
    pub const PERM: u16 = 63;
    /// Broken pipe.
    pub const PIPE: u16 = 64;
    /// Protocol error.
    pub const PROTO: u16 = 65;
    /// Protocol not supported.
    pub const PROTONOSUPPORT: u16 = 66;
    /// Protocol wrong type for socket.
    pub const PROTOTYPE: u16 = 67;
    /// Result too large.
    pub const RANGE: u16 = 68;
    /// Read-only file system.
    pub const ROFS: u16 = 69;
    /// Invalid seek.
    pub const SPIPE: u16 = 70;
    /// No such process.
    pub const SRCH: u16 = 71;
    /// Reserved.
    pub const STALE: u16 = 72;
    /// Connection timed out.
    pub const TIMEDOUT: u16 = 73;
    /// Text file busy.
    pub const TXTBSY: u16 = 74;
    /// Cross-device link.
    pub const XDEV: u16 = 75;
    /// Extension: Capabilities insufficient.
    pub const NOTCAPABLE: u16 = 76;
}

/// Preview 1 file types (`filetype`).
pub mod filetype {
    /// The type is unknown or none of the others.
    pub const UNKNOWN: u8 = 0;
    /// A block device.
    pub const BLOCK_DEVICE: u8 = 1;
    /// A character device (the standard streams).
    pub const CHARACTER_DEVICE: u8 = 2;
    /// A directory.
    pub const DIRECTORY: u8 = 3;
    /// A regular file.
    pub const REGULAR_FILE: u8 = 4;
    /// A datagram socket.
    pub const SOCKET_DGRAM: u8 = 5;
    /// A stream socket.
    pub const SOCKET_STREAM: u8 = 6;
    /// A symbolic link.
    pub const SYMBOLIC_LINK: u8 = 7;
}

/// Preview 1 rights (`rights`), one bit each, numbered as the specification numbers them.
pub mod rights {
    /// `fd_datasync`.
    pub const FD_DATASYNC: u64 = 1 << 0;
    /// `fd_read` (and `sock_recv`).
    pub const FD_READ: u64 = 1 << 1;
    /// `fd_seek` (which implies `FD_TELL`).
    pub const FD_SEEK: u64 = 1 << 2;
    /// `fd_fdstat_set_flags`.
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    /// `fd_sync`.
    pub const FD_SYNC: u64 = 1 << 4;
    /// `fd_tell`.
    pub const FD_TELL: u64 = 1 << 5;
    /// `fd_write` (and `sock_send`).
    pub const FD_WRITE: u64 = 1 << 6;
    /// `fd_advise`.
    pub const FD_ADVISE: u64 = 1 << 7;
    /// `fd_allocate`.
    pub const FD_ALLOCATE: u64 = 1 << 8;
    /// `path_create_directory`.
    pub const PATH_CREATE_DIRECTORY: u64 = 1 << 9;
    /// `path_open` with `oflags::CREAT`.
    pub const PATH_CREATE_FILE: u64 = 1 << 10;
    /// `path_link`, on the source directory.
    pub const PATH_LINK_SOURCE: u64 = 1 << 11;
    /// `path_link`, on the target directory.
    pub const PATH_LINK_TARGET: u64 = 1 << 12;
    /// `path_open`.
    pub const PATH_OPEN: u64 = 1 << 13;
    /// `fd_readdir`.
    pub const FD_READDIR: u64 = 1 << 14;
    /// `path_readlink`.
    pub const PATH_READLINK: u64 = 1 << 15;
    /// `path_rename`, on the source directory.
    pub const PATH_RENAME_SOURCE: u64 = 1 << 16;
    /// `path_rename`, on the target directory.
    pub const PATH_RENAME_TARGET: u64 = 1 << 17;
    /// `path_filestat_get`.
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    /// Changing a file's size through a path (`path_open` with `oflags::TRUNC`).
    pub const PATH_FILESTAT_SET_SIZE: u64 = 1 << 19;
    /// `path_filestat_set_times`.
    pub const PATH_FILESTAT_SET_TIMES: u64 = 1 << 20;
    /// `fd_filestat_get`.
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    /// `fd_filestat_set_size`.
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    /// `fd_filestat_set_times`.
    pub const FD_FILESTAT_SET_TIMES: u64 = 1 << 23;
    /// `path_symlink`.
    pub const PATH_SYMLINK: u64 = 1 << 24;
    /// `path_remove_directory`.
    pub const PATH_REMOVE_DIRECTORY: u64 = 1 << 25;
    /// `path_unlink_file`.
    pub const PATH_UNLINK_FILE: u64 = 1 << 26;
    /// `poll_oneoff` on the fd's read and write readiness.
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    /// `sock_shutdown`.
    pub const SOCK_SHUTDOWN: u64 = 1 << 28;
    /// `sock_accept`.
    pub const SOCK_ACCEPT: u64 = 1 << 29;
    /// Every right preview 1 defines.
    pub const ALL: u64 = (1 << 30) - 1;
    /// What a preopened directory has: Wasmtime's set, which userlands expect.
    pub const PREOPEN: u64 = PATH_CREATE_DIRECTORY
        | PATH_CREATE_FILE
        | PATH_LINK_SOURCE
        | PATH_LINK_TARGET
        | PATH_OPEN
        | FD_READDIR
        | PATH_READLINK
        | PATH_RENAME_SOURCE
        | PATH_RENAME_TARGET
        | PATH_FILESTAT_GET
        | PATH_FILESTAT_SET_TIMES
        | FD_FILESTAT_GET
        | FD_FILESTAT_SET_TIMES
        | PATH_SYMLINK
        | PATH_REMOVE_DIRECTORY
        | PATH_UNLINK_FILE;
    /// What files and directories opened in a preopened directory may have (Wasmtime's
    /// inheriting set).
    pub const PREOPEN_INHERITING: u64 = PREOPEN
        | FD_DATASYNC
        | FD_READ
        | FD_SEEK
        | FD_FDSTAT_SET_FLAGS
        | FD_SYNC
        | FD_TELL
        | FD_WRITE
        | FD_ADVISE
        | FD_ALLOCATE
        | FD_FILESTAT_SET_SIZE
        | POLL_FD_READWRITE;
}

/// `path_open`'s open flags (`oflags`).
pub mod oflags {
    /// Create the file if it does not exist.
    pub const CREAT: u16 = 1 << 0;
    /// Fail unless the path names a directory.
    pub const DIRECTORY: u16 = 1 << 1;
    /// With `CREAT`: fail if the file exists.
    pub const EXCL: u16 = 1 << 2;
    /// Truncate the file to size 0.
    pub const TRUNC: u16 = 1 << 3;
}

/// File descriptor flags (`fdflags`).
pub mod fdflags {
    /// Writes go to the end of the file.
    pub const APPEND: u16 = 1 << 0;
    /// Data integrity on every write.
    pub const DSYNC: u16 = 1 << 1;
    /// Non-blocking.
    pub const NONBLOCK: u16 = 1 << 2;
    /// Read integrity, as far as `DSYNC` or `SYNC` asks.
    pub const RSYNC: u16 = 1 << 3;
    /// File integrity on every write.
    pub const SYNC: u16 = 1 << 4;
}

/// Which times the set-times calls change (`fstflags`).
pub mod fstflags {
    /// Set the access time to the value given.
    pub const ATIM: u16 = 1 << 0;
    /// Set the access time to now.
    pub const ATIM_NOW: u16 = 1 << 1;
    /// Set the modification time to the value given.
    pub const MTIM: u16 = 1 << 2;
    /// Set the modification time to now.
    pub const MTIM_NOW: u16 = 1 << 3;
}

/// How the path calls resolve their path (`lookupflags`).
pub mod lookupflags {
    /// Follow a symlink that the path ends in.
    pub const SYMLINK_FOLLOW: u32 = 1 << 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_preview1() {
        assert_eq!(FUNCTIONS.len(), 46);
        assert_eq!(lookup("fd_write").unwrap().params, &[I32, I32, I32, I32]);
        assert!(lookup("nope").is_none());
        assert_eq!(errno::NOSPC, 51);
        assert_eq!(errno::NOTCAPABLE, 76);
    }

    #[test]
    fn flag_bits_are_the_specifications() {
        assert_eq!((filetype::DIRECTORY, filetype::REGULAR_FILE, filetype::SYMBOLIC_LINK), (3, 4, 7));
        assert_eq!((rights::FD_READ, rights::FD_WRITE, rights::FD_READDIR), (1 << 1, 1 << 6, 1 << 14));
        assert_eq!((rights::PATH_FILESTAT_SET_SIZE, rights::FD_FILESTAT_SET_SIZE), (1 << 19, 1 << 22));
        assert_eq!(rights::SOCK_ACCEPT << 1, rights::ALL + 1, "rights end at bit 29");
        assert_eq!((oflags::CREAT, oflags::DIRECTORY, oflags::EXCL, oflags::TRUNC), (1, 2, 4, 8));
        assert_eq!((fdflags::APPEND, fdflags::NONBLOCK, fdflags::SYNC), (1, 4, 16));
        assert_eq!((fstflags::ATIM, fstflags::ATIM_NOW, fstflags::MTIM, fstflags::MTIM_NOW), (1, 2, 4, 8));
    }

    #[test]
    fn preopen_rights_are_wasmtimes_sets() {
        let preopen = (9..=18).chain([20, 21, 23, 24, 25, 26]).fold(0u64, |set, bit| set | 1 << bit);
        assert_eq!(rights::PREOPEN, preopen);
        let inheriting = (0..=8).chain([22, 27]).fold(preopen, |set, bit| set | 1 << bit);
        assert_eq!(rights::PREOPEN_INHERITING, inheriting);
    }
}
