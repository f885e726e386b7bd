//! The WASI preview1 surface thaw accepts: every function's name and signature, and errno
//! values.
//!
//! A function may import any preview1 function listed here, with exactly this signature;
//! `thaw pack` and the VMM reject any other import. The guest implements a subset for real
//! ([`IMPLEMENTED`]); the rest return `ENOSYS` (and the guest logs the name once).

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

/// The functions the guest implements; every other one returns [`errno::NOSYS`].
pub const IMPLEMENTED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_time_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_filestat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_read",
    "fd_readdir",
    "fd_seek",
    "fd_tell",
    "path_filestat_get",
    "path_open",
    "fd_write",
    "proc_exit",
    "random_get",
    "sched_yield",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// The preview1 function named `name`.
pub fn lookup(name: &str) -> Option<&'static Function> {
    FUNCTIONS.iter().find(|f| f.name == name)
}

/// WASI errno values used by thaw.
pub mod errno {
    /// Success.
    pub const SUCCESS: u16 = 0;
    /// Resource unavailable, try again.
    pub const AGAIN: u16 = 6;
    /// Bad file descriptor.
    pub const BADF: u16 = 8;
    /// Connection refused.
    pub const CONNREFUSED: u16 = 14;
    /// Connection reset.
    pub const CONNRESET: u16 = 15;
    /// Bad address.
    pub const FAULT: u16 = 21;
    /// Invalid argument.
    pub const INVAL: u16 = 28;
    /// I/O error.
    pub const IO: u16 = 29;
    /// Function not supported.
    pub const NOSYS: u16 = 52;
    /// Is a directory.
    pub const ISDIR: u16 = 31;
    /// Too many open files.
    pub const MFILE: u16 = 33;
    /// Filename too long.
    pub const NAMETOOLONG: u16 = 37;
    /// No such file or directory.
    pub const NOENT: u16 = 44;
    /// The socket is not connected.
    pub const NOTCONN: u16 = 53;
    /// Not a directory.
    pub const NOTDIR: u16 = 54;
    /// Not a socket.
    pub const NOTSOCK: u16 = 57;
    /// Broken pipe.
    pub const PIPE: u16 = 64;
    /// Read-only file system.
    pub const ROFS: u16 = 69;
    /// Illegal seek.
    pub const SPIPE: u16 = 70;
    /// Capabilities insufficient.
    pub const NOTCAPABLE: u16 = 76;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implemented_function_is_a_preview1_function() {
        for name in IMPLEMENTED {
            assert!(lookup(name).is_some(), "{name}");
        }
        assert_eq!(FUNCTIONS.len(), 46);
        assert_eq!(lookup("fd_write").unwrap().params, &[I32, I32, I32, I32]);
        assert!(lookup("nope").is_none());
    }
}
