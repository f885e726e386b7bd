//! Preopened sockets: one per service connection in the manifest (`thaw pack --connect
//! NAME=PORT`), at fds from [`FIRST_FD`] in manifest order, each named to the function by the
//! environment variable `THAW_CONNECT_<NAME>=<fd>`.
//!
//! A socket connects to its host port on first use, so `init` may already use it; it then has an
//! entry in the I/O reconnection table. After a restore the host's end is gone: the next use
//! drops the old stream and connects again, transparently, or fails with the reason
//! (`ECONNREFUSED` when nothing serves the port any more), and a later use tries again.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use abi::bundle::Connection;
use abi::iotable::HandleKind;
use abi::wasi::errno;

use crate::devices::vsock::{self, StreamError};
use crate::iotable;

/// The first socket's fd (files under `/data` take fds below it).
pub const FIRST_FD: u32 = 100;

const FILETYPE_SOCKET_STREAM: u8 = 6;
/// fd_read, fd_write, poll_fd_readwrite, sock_shutdown.
const RIGHTS: u64 = (1 << 1) | (1 << 6) | (1 << 27) | (1 << 28);

type Errno = u16;

struct Socket {
    name: String,
    port: u32,
    /// The stream's local port, once connected.
    local: Option<u32>,
}

/// The function's sockets.
#[derive(Default)]
pub struct Sockets {
    by_fd: BTreeMap<u32, Socket>,
}

fn errno(e: StreamError) -> Errno {
    match e {
        StreamError::Refused => errno::CONNREFUSED,
        StreamError::Reset => errno::CONNRESET,
        StreamError::NotConnected => errno::NOTCONN,
        StreamError::Closed => errno::PIPE,
        StreamError::NoDevice | StreamError::Io => errno::IO,
    }
}

impl Sockets {
    /// The sockets of `connections`, not yet connected.
    pub fn new(connections: &[Connection]) -> Self {
        let by_fd = connections
            .iter()
            .zip(FIRST_FD..)
            .map(|(c, fd)| (fd, Socket { name: c.name.clone(), port: c.port, local: None }))
            .collect();
        Self { by_fd }
    }

    /// The `THAW_CONNECT_<NAME>=<fd>` environment entries.
    pub fn env(&self) -> Vec<String> {
        self.by_fd.iter().map(|(fd, s)| alloc::format!("THAW_CONNECT_{}={fd}", s.name)).collect()
    }

    /// True when `fd` is one of the sockets.
    pub fn has(&self, fd: u32) -> bool {
        self.by_fd.contains_key(&fd)
    }

    /// `fd_fdstat_get`: the filetype and rights.
    pub fn fdstat(&self, fd: u32) -> Result<(u8, u64), Errno> {
        self.by_fd.get(&fd).map(|_| (FILETYPE_SOCKET_STREAM, RIGHTS)).ok_or(errno::BADF)
    }

    /// The connected stream of `fd`: (host port, local port), connecting it first if it is
    /// not yet, or again if a restore left it pending.
    fn stream(&mut self, fd: u32) -> Result<(u32, u32), Errno> {
        let socket = self.by_fd.get_mut(&fd).ok_or(errno::BADF)?;
        iotable::reconnect(fd, |_| {
            if let Some(old) = socket.local.take() {
                vsock::forget(socket.port, old);
            }
            socket.local = Some(vsock::connect(socket.port).map_err(errno)?);
            Ok::<(), Errno>(())
        })?;
        let local = match socket.local {
            Some(local) => local,
            None => {
                let local = vsock::connect(socket.port).map_err(errno)?;
                if !iotable::open(fd, HandleKind::VsockStream, 0, socket.port, &socket.name) {
                    vsock::close(socket.port, local);
                    return Err(errno::MFILE);
                }
                socket.local = Some(local);
                local
            }
        };
        Ok((socket.port, local))
    }

    /// `fd_write` and `sock_send`: sends all of `bytes`.
    pub fn send(&mut self, fd: u32, bytes: &[u8]) -> Result<(), Errno> {
        let (port, local) = self.stream(fd)?;
        vsock::send(port, local, bytes).map_err(errno)
    }

    /// `fd_read` and `sock_recv`: receives what has arrived, waiting for some; 0 at the end.
    pub fn recv(&mut self, fd: u32, out: &mut [u8]) -> Result<usize, Errno> {
        let (port, local) = self.stream(fd)?;
        vsock::recv(port, local, out).map_err(errno)
    }

    /// `fd_close` and `sock_shutdown` of both directions: closes the stream; the fd stays, and
    /// its next use connects again.
    pub fn close(&mut self, fd: u32) -> Result<(), Errno> {
        let socket = self.by_fd.get_mut(&fd).ok_or(errno::BADF)?;
        if let Some(local) = socket.local.take() {
            vsock::close(socket.port, local);
            iotable::close(fd);
        }
        Ok(())
    }
}
