//! The WASI preview1 surface thaw accepts: every function's name and signature, and errno
//! values.
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
}
