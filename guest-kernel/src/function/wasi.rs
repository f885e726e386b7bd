//! WASI preview 1, every function of it, as docs/WASI.md describes.
//!
//! fd 0 reads the request, fd 1 and fd 2 collect the response and the function's stderr (fd 2
//! goes to the virtio console instead when the VMM asks for it), the preopened directories start
//! at fd 3 (`fs.rs`: an in-memory tree holding the scratch directories, the data volume and
//! `/run/thaw/instance-id`), and fds from 100 are the preopened sockets to host services
//! (`sockets.rs`). Args and env are the manifest's, clocks come from the host parameters page
//! plus the TSC, randomness from the virtio entropy device when the VM has one, else from a
//! ChaCha20 CSPRNG seeded with the host's entropy. Every guest-memory access is bounds-checked
//! against the module's linear memory; a bad pointer gets `EFAULT`, never a trap of ours.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use abi::bundle::{MAX_CONNECTIONS, Manifest};
use abi::invoke::MAX_OUTPUT_BYTES;
use abi::params::HostParams;
use abi::wasi::{self, errno, filetype, rights};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use wasmtime::{Caller, Extern, Linker, ResourceLimiter};

use super::backing::{BlockVolume, GuestFiles, IoTable};
use super::fs::Stat;
use super::sockets::{self, Sockets};
use crate::platform;

type Errno = u16;

/// The standard streams. They start at fds 0-2, and `fd_renumber` and `fd_close` move and close
/// them like any other fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stdio {
    /// The request.
    In,
    /// The response.
    Out,
    /// The function's stderr.
    Err,
}

/// Per-store WASI state.
pub struct WasiCtx {
    /// The most bytes a linear memory may grow to (the manifest's memory).
    memory_limit: usize,
    /// The current request, read through fd 0.
    stdin: Vec<u8>,
    stdin_pos: usize,
    /// What the function wrote to fd 1.
    pub stdout: Vec<u8>,
    /// What the function wrote to fd 2.
    pub stderr: Vec<u8>,
    args: Vec<String>,
    env: Vec<String>,
    rng: ChaCha20Rng,
    clock: platform::Clock,
    /// Where the standard streams are.
    stdio: BTreeMap<u32, Stdio>,
    /// The filesystem and its open files and directories.
    files: GuestFiles,
    /// The sockets to host services.
    sockets: Sockets,
    /// Whether a command's start-up is running up to its first read of stdin.
    pub first_read: FirstRead,
}

/// Where a command initialized up to its first read of stdin stands (docs/FUNCTIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRead {
    /// Not running such a start-up: fd 0 reads the request as usual.
    NotAwaited,
    /// Running the start-up: the first `fd_read` of fd 0 ends init ([`super::at_first_read`])
    /// and then reads the request, with a fresh `fuel` budget; a write to fd 1 before it
    /// abandons the start-up with [`WroteBeforeRead`].
    Awaited {
        /// The manifest's fuel per invocation.
        fuel: Option<u64>,
    },
}

impl WasiCtx {
    /// State for the function `manifest` describes.
    pub fn new(manifest: &Manifest, params: &HostParams) -> Self {
        let sockets = Sockets::new(&manifest.connections);
        let mut env = manifest.env.clone();
        env.extend(sockets.env());
        let clock = platform::Clock::new(params);
        let socket_fds = sockets::FIRST_FD..sockets::FIRST_FD + MAX_CONNECTIONS as u32;
        Self {
            memory_limit: (manifest.memory_mib as usize) << 20,
            stdin: Vec::new(),
            stdin_pos: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            args: manifest.args.clone(),
            env,
            rng: ChaCha20Rng::from_seed(params.entropy),
            clock,
            stdio: BTreeMap::from([(0, Stdio::In), (1, Stdio::Out), (2, Stdio::Err)]),
            files: GuestFiles::new(manifest, &params.instance_id.to_string(), socket_fds, clock, BlockVolume, IoTable),
            sockets,
            first_read: FirstRead::NotAwaited,
        }
    }

    /// Takes fresh entropy, a fresh time base and instance id, as a VM restored from an image
    /// must.
    pub fn reseed(&mut self, params: &HostParams) {
        self.rng = ChaCha20Rng::from_seed(params.entropy);
        self.clock = platform::Clock::new(params);
        self.files.reseed(&params.instance_id.to_string(), self.clock);
    }

    /// Starts an invocation on `request`, with empty output (what init wrote to stdout is no
    /// part of any response).
    pub fn begin(&mut self, request: Vec<u8>) {
        self.stdin = request;
        self.stdin_pos = 0;
        self.stdout.clear();
        self.stderr.clear();
    }

    /// Ends an invocation, handing back the request buffer for reuse.
    pub fn end(&mut self) -> Vec<u8> {
        self.stdin_pos = 0;
        core::mem::take(&mut self.stdin)
    }

    /// True for an open fd of any kind.
    fn is_open(&self, fd: u32) -> bool {
        self.stdio.contains_key(&fd) || self.sockets.has(fd) || self.files.has(fd)
    }
}

/// The store's limits: linear memory grows up to the manifest's allowance, and growing past it
/// traps ("growth operation limited") instead of returning -1, so a function that outgrows its
/// allowance says so. Instances, tables and memories are not counted: a command instantiates
/// once per request, and the allowance bounds what they use.
impl ResourceLimiter for WasiCtx {
    fn memory_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            return Err(wasmtime::Error::msg("growth operation limited"));
        }
        Ok(maximum.is_none_or(|maximum| desired <= maximum))
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|maximum| desired <= maximum))
    }

    fn instances(&self) -> usize {
        usize::MAX
    }

    fn tables(&self) -> usize {
        usize::MAX
    }

    fn memories(&self) -> usize {
        usize::MAX
    }
}

/// How `proc_exit` ends a call: an error carrying the exit code, which unwinds out of the
/// function like a trap and is told apart from one by its type.
#[derive(Debug)]
pub struct Exit(pub i32);

impl core::fmt::Display for Exit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "exited with code {}", self.0)
    }
}

impl core::error::Error for Exit {}

/// How a start-up run up to the first read of stdin ends when it writes to stdout first: its
/// output would belong to no request, so the command runs whole for every request instead.
#[derive(Debug)]
pub struct WroteBeforeRead;

impl core::fmt::Display for WroteBeforeRead {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("wrote to stdout before its first read of stdin")
    }
}

impl core::error::Error for WroteBeforeRead {}

type Ctx<'a> = Caller<'a, WasiCtx>;

/// Runs a call on the module's linear memory and the WASI state, and returns its errno
/// (`EFAULT` when the module exports no memory).
fn call(caller: &mut Ctx<'_>, f: impl FnOnce(&mut [u8], &mut WasiCtx) -> Result<(), Errno>) -> i32 {
    let Some(memory) = caller.get_export("memory").and_then(Extern::into_memory) else {
        return i32::from(errno::FAULT);
    };
    let (mem, ctx) = memory.data_and_store_mut(caller);
    result(f(mem, ctx))
}

/// The errno a call returns for `outcome`.
fn result(outcome: Result<(), Errno>) -> i32 {
    i32::from(outcome.err().unwrap_or(errno::SUCCESS))
}

fn slice(mem: &[u8], ptr: i32, len: u32) -> Result<&[u8], Errno> {
    let start = ptr as u32 as usize;
    mem.get(start..start.checked_add(len as usize).ok_or(errno::FAULT)?).ok_or(errno::FAULT)
}

fn slice_mut(mem: &mut [u8], ptr: i32, len: u32) -> Result<&mut [u8], Errno> {
    let start = ptr as u32 as usize;
    mem.get_mut(start..start.checked_add(len as usize).ok_or(errno::FAULT)?).ok_or(errno::FAULT)
}

fn put(mem: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), Errno> {
    slice_mut(mem, ptr, bytes.len() as u32)?.copy_from_slice(bytes);
    Ok(())
}

fn put_u32(mem: &mut [u8], ptr: i32, value: u32) -> Result<(), Errno> {
    put(mem, ptr, &value.to_le_bytes())
}

fn put_u64(mem: &mut [u8], ptr: i32, value: u64) -> Result<(), Errno> {
    put(mem, ptr, &value.to_le_bytes())
}

fn get_u32(mem: &[u8], ptr: u32) -> Result<u32, Errno> {
    Ok(u32::from_le_bytes(slice(mem, ptr as i32, 4)?.try_into().map_err(|_| errno::FAULT)?))
}

/// The (pointer, length) pairs of an iovec array.
fn iovecs(mem: &[u8], iovs: i32, count: i32) -> Result<Vec<(u32, u32)>, Errno> {
    (0..count as u32)
        .map(|i| {
            let at = (iovs as u32).checked_add(i.checked_mul(8).ok_or(errno::FAULT)?).ok_or(errno::FAULT)?;
            Ok((get_u32(mem, at)?, get_u32(mem, at.checked_add(4).ok_or(errno::FAULT)?)?))
        })
        .collect()
}

/// The bytes of an iovec array, gathered.
fn gather(mem: &[u8], iovs: i32, count: i32) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    for (ptr, len) in iovecs(mem, iovs, count)? {
        let bytes = slice(mem, ptr as i32, len)?;
        if (out.len() + bytes.len()) as u64 > MAX_OUTPUT_BYTES {
            return Err(errno::FBIG);
        }
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// Fills the buffers of an iovec array from `read`, which returns how many bytes it put in the
/// buffer it was given; stops at the first short read. Returns the total.
fn scatter(
    mem: &mut [u8],
    iovs: i32,
    count: i32,
    mut read: impl FnMut(&mut [u8]) -> Result<usize, Errno>,
) -> Result<u32, Errno> {
    let mut total = 0u32;
    for (ptr, len) in iovecs(mem, iovs, count)? {
        let n = read(slice_mut(mem, ptr as i32, len)?)?;
        total = total.saturating_add(n as u32);
        if n < len as usize {
            break;
        }
    }
    Ok(total)
}

/// `fd_write`; a write to stdout ends a start-up awaiting its first read ([`WroteBeforeRead`]).
fn fd_write(caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, nwritten: i32) -> wasmtime::Result<i32> {
    let ctx = caller.data();
    if matches!(ctx.first_read, FirstRead::Awaited { .. }) && ctx.stdio.get(&(fd as u32)) == Some(&Stdio::Out) {
        return Err(wasmtime::Error::new(WroteBeforeRead));
    }
    Ok(write(caller, fd, iovs, count, nwritten))
}

/// Writes to any fd: a standard stream, a socket or a file.
fn write(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, nwritten: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        let n = match ctx.stdio.get(&fd).copied() {
            Some(stream @ (Stdio::Out | Stdio::Err)) => {
                let bytes = gather(mem, iovs, count)?;
                if stream == Stdio::Err && crate::devices::console_log() {
                    if !crate::devices::stderr_write(&bytes) {
                        return Err(errno::IO);
                    }
                } else {
                    let out = if stream == Stdio::Out { &mut ctx.stdout } else { &mut ctx.stderr };
                    if (out.len() + bytes.len()) as u64 > MAX_OUTPUT_BYTES {
                        return Err(errno::IO);
                    }
                    out.extend_from_slice(&bytes);
                }
                bytes.len()
            }
            Some(Stdio::In) => return Err(errno::BADF),
            None if ctx.sockets.has(fd) => {
                let mut total = 0;
                for (ptr, len) in iovecs(mem, iovs, count)? {
                    ctx.sockets.send(fd, slice(mem, ptr as i32, len)?)?;
                    total += len as usize;
                }
                total
            }
            None => ctx.files.write(fd, None, &gather(mem, iovs, count)?)?,
        };
        put_u32(mem, nwritten, n as u32)
    })
}

fn fd_pwrite(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, offset: i64, nwritten: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        if ctx.stdio.contains_key(&fd) || ctx.sockets.has(fd) {
            return Err(errno::SPIPE);
        }
        let n = ctx.files.write(fd, Some(offset as u64), &gather(mem, iovs, count)?)?;
        put_u32(mem, nwritten, n as u32)
    })
}

/// `fd_read` and `sock_recv` on a socket: waits for bytes and spreads them over the buffers.
fn socket_recv(mem: &mut [u8], ctx: &mut WasiCtx, fd: u32, iovs: i32, count: i32) -> Result<u32, Errno> {
    const MAX_READ: u32 = 64 << 10;
    let buffers = iovecs(mem, iovs, count)?;
    let want = buffers.iter().fold(0u32, |sum, (_, len)| sum.saturating_add(*len)).min(MAX_READ);
    if want == 0 {
        return Ok(0);
    }
    let mut bytes = alloc::vec![0u8; want as usize];
    let n = ctx.sockets.recv(fd, &mut bytes)?;
    let mut rest = &bytes[..n];
    for (ptr, len) in buffers {
        let take = rest.len().min(len as usize);
        put(mem, ptr as i32, &rest[..take])?;
        rest = &rest[take..];
    }
    Ok(n as u32)
}

fn fd_read(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, nread: i32) -> i32 {
    let ctx = caller.data();
    if let FirstRead::Awaited { fuel } = ctx.first_read
        && ctx.stdio.get(&(fd as u32)) == Some(&Stdio::In)
    {
        caller.data_mut().first_read = FirstRead::NotAwaited;
        super::at_first_read(&mut caller, fuel);
    }
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        let n = match ctx.stdio.get(&fd) {
            Some(Stdio::In) => scatter(mem, iovs, count, |buf| {
                let rest = &ctx.stdin[ctx.stdin_pos..];
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                ctx.stdin_pos += n;
                Ok(n)
            })?,
            Some(_) => return Err(errno::BADF),
            None if ctx.sockets.has(fd) => socket_recv(mem, ctx, fd, iovs, count)?,
            None => scatter(mem, iovs, count, |buf| ctx.files.read(fd, None, buf))?,
        };
        put_u32(mem, nread, n)
    })
}

fn fd_pread(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, offset: i64, nread: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        if ctx.stdio.contains_key(&fd) || ctx.sockets.has(fd) {
            return Err(errno::SPIPE);
        }
        let mut at = offset as u64;
        let n = scatter(mem, iovs, count, |buf| {
            let n = ctx.files.read(fd, Some(at), buf)?;
            at += n as u64;
            Ok(n)
        })?;
        put_u32(mem, nread, n)
    })
}

fn fd_close(mut caller: Ctx<'_>, fd: i32) -> i32 {
    let fd = fd as u32;
    let ctx = caller.data_mut();
    let outcome = if ctx.stdio.remove(&fd).is_some() {
        ctx.files.release(fd);
        Ok(())
    } else if ctx.sockets.has(fd) {
        ctx.sockets.close(fd)
    } else {
        ctx.files.close(fd)
    };
    result(outcome)
}

/// The errno of a socket call on `fd`, which is not a socket: `ENOTSOCK` for another open fd.
fn not_a_socket(ctx: &WasiCtx, fd: u32) -> Errno {
    if ctx.is_open(fd) { errno::NOTSOCK } else { errno::BADF }
}

fn sock_send(caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, _flags: i32, nwritten: i32) -> i32 {
    if !caller.data().sockets.has(fd as u32) {
        return i32::from(not_a_socket(caller.data(), fd as u32));
    }
    write(caller, fd, iovs, count, nwritten)
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn sock_recv(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, _flags: i32, nread: i32, flags_out: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        if !ctx.sockets.has(fd) {
            return Err(not_a_socket(ctx, fd));
        }
        put(mem, flags_out, &[0, 0])?;
        let n = socket_recv(mem, ctx, fd, iovs, count)?;
        put_u32(mem, nread, n)
    })
}

fn sock_shutdown(mut caller: Ctx<'_>, fd: i32, how: i32) -> i32 {
    const BOTH: i32 = 3;
    let ctx = caller.data_mut();
    let outcome = if !ctx.sockets.has(fd as u32) {
        Err(not_a_socket(ctx, fd as u32))
    } else if how != BOTH {
        // The vsock driver closes both directions at once; half-closing is not offered.
        Err(errno::INVAL)
    } else {
        ctx.sockets.close(fd as u32)
    };
    result(outcome)
}

/// `sock_accept`: the function's sockets are connections it opened, which accept nothing.
fn sock_accept(mut caller: Ctx<'_>, fd: i32, _flags: i32, _fd_out: i32) -> i32 {
    let ctx = caller.data_mut();
    i32::from(if ctx.sockets.has(fd as u32) { errno::NOTSUP } else { not_a_socket(ctx, fd as u32) })
}

fn fd_fdstat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        let (filetype, flags, base, inheriting) = match ctx.stdio.get(&fd) {
            Some(Stdio::In) => (filetype::CHARACTER_DEVICE, 0, rights::FD_READ, rights::FD_READ),
            Some(_) => (filetype::CHARACTER_DEVICE, 0, rights::FD_WRITE, rights::FD_WRITE),
            None if let Ok((filetype, rights)) = ctx.sockets.fdstat(fd) => (filetype, 0, rights, 0),
            None => ctx.files.fdstat(fd)?,
        };
        let mut stat = [0u8; 24];
        stat[0] = filetype;
        stat[2..4].copy_from_slice(&flags.to_le_bytes());
        stat[8..16].copy_from_slice(&base.to_le_bytes());
        stat[16..24].copy_from_slice(&inheriting.to_le_bytes());
        put(mem, buf, &stat)
    })
}

fn fd_fdstat_set_flags(mut caller: Ctx<'_>, fd: i32, flags: i32) -> i32 {
    let ctx = caller.data_mut();
    result(ctx.files.set_flags(fd as u32, flags as u16))
}

/// Rights are not kept per fd (as in Wasmtime): changing them is `ENOTSUP`.
fn fd_fdstat_set_rights(mut caller: Ctx<'_>, fd: i32, _base: i64, _inheriting: i64) -> i32 {
    i32::from(if caller.data_mut().is_open(fd as u32) { errno::NOTSUP } else { errno::BADF })
}

fn fd_prestat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let len = ctx.files.prestat(fd as u32)?.len() as u32;
        let mut prestat = [0u8; 8]; // tag 0: a directory
        prestat[4..8].copy_from_slice(&len.to_le_bytes());
        put(mem, buf, &prestat)
    })
}

fn fd_prestat_dir_name(mut caller: Ctx<'_>, fd: i32, path: i32, len: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let name = ctx.files.prestat(fd as u32)?;
        if (len as u32 as usize) < name.len() {
            return Err(errno::NAMETOOLONG);
        }
        put(mem, path, name.as_bytes())
    })
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_open(
    mut caller: Ctx<'_>,
    dir: i32,
    lookup: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    rights: i64,
    _inheriting: i64,
    fdflags: i32,
    fd_out: i32,
) -> i32 {
    call(&mut caller, |mem, ctx| {
        let name = slice(mem, path, path_len as u32)?;
        let fd = ctx.files.open(dir as u32, lookup as u32, name, oflags as u16, rights as u64, fdflags as u16)?;
        put_u32(mem, fd_out, fd)
    })
}

fn fd_seek(mut caller: Ctx<'_>, fd: i32, delta: i64, whence: i32, new_offset: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        if ctx.stdio.contains_key(&(fd as u32)) || ctx.sockets.has(fd as u32) {
            return Err(errno::SPIPE);
        }
        let whence = u8::try_from(whence).map_err(|_| errno::INVAL)?;
        let offset = ctx.files.seek(fd as u32, delta, whence)?;
        put_u64(mem, new_offset, offset)
    })
}

fn fd_tell(mut caller: Ctx<'_>, fd: i32, offset: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        if ctx.stdio.contains_key(&(fd as u32)) || ctx.sockets.has(fd as u32) {
            return Err(errno::SPIPE);
        }
        let at = ctx.files.tell(fd as u32)?;
        put_u64(mem, offset, at)
    })
}

fn fd_filestat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let fd = fd as u32;
        let stat = match ctx.sockets.fdstat(fd) {
            Ok((filetype, _)) => Stat { filetype, ..Stat::default() },
            Err(_) if ctx.stdio.contains_key(&fd) => Stat { filetype: filetype::CHARACTER_DEVICE, ..Stat::default() },
            Err(_) => ctx.files.stat_fd(fd)?,
        };
        put(mem, buf, &stat.encode())
    })
}

fn fd_filestat_set_size(mut caller: Ctx<'_>, fd: i32, size: i64) -> i32 {
    let ctx = caller.data_mut();
    result(ctx.files.set_size(fd as u32, size as u64))
}

fn fd_filestat_set_times(mut caller: Ctx<'_>, fd: i32, atim: i64, mtim: i64, flags: i32) -> i32 {
    let ctx = caller.data_mut();
    let outcome = ctx.files.set_times_fd(fd as u32, atim as u64, mtim as u64, flags as u16);
    result(outcome)
}

fn fd_advise(mut caller: Ctx<'_>, fd: i32, _offset: i64, _len: i64, advice: i32) -> i32 {
    let ctx = caller.data_mut();
    let outcome = ctx
        .files
        .check_file(fd as u32)
        .and_then(|()| if (0..=5).contains(&advice) { Ok(()) } else { Err(errno::INVAL) });
    result(outcome)
}

/// `fd_allocate` is `ENOTSUP` on a file, as in Wasmtime: a write or `fd_filestat_set_size`
/// grows a file.
fn fd_allocate(mut caller: Ctx<'_>, fd: i32, _offset: i64, _len: i64) -> i32 {
    i32::from(caller.data_mut().files.check_file(fd as u32).err().unwrap_or(errno::NOTSUP))
}

/// `fd_sync` and `fd_datasync`: memory is as durable as this filesystem gets.
fn fd_sync(mut caller: Ctx<'_>, fd: i32) -> i32 {
    i32::from(if caller.data_mut().files.has(fd as u32) { errno::SUCCESS } else { errno::BADF })
}

/// `fd_renumber` moves files, directories and the standard streams; sockets keep their fds.
fn fd_renumber(mut caller: Ctx<'_>, from: i32, to: i32) -> i32 {
    let ctx = caller.data_mut();
    let (from, to) = (from as u32, to as u32);
    let outcome = (|| {
        if !ctx.is_open(from) || !ctx.is_open(to) || ctx.sockets.has(from) || ctx.sockets.has(to) {
            return Err(errno::BADF);
        }
        if from == to {
            return Ok(());
        }
        if ctx.stdio.remove(&to).is_some() {
            ctx.files.release(to);
        } else {
            ctx.files.close(to)?;
        }
        match ctx.stdio.remove(&from) {
            Some(stream) => {
                ctx.files.release(from);
                ctx.files.hold(to);
                ctx.stdio.insert(to, stream);
                Ok(())
            }
            None => ctx.files.renumber(from, to),
        }
    })();
    result(outcome)
}

fn fd_readdir(mut caller: Ctx<'_>, fd: i32, buf: i32, len: i32, cookie: i64, used: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let bytes = ctx.files.readdir(fd as u32, cookie as u64, len as u32 as usize)?;
        put(mem, buf, &bytes)?;
        put_u32(mem, used, bytes.len() as u32)
    })
}

fn path_filestat_get(mut caller: Ctx<'_>, dir: i32, lookup: i32, path: i32, path_len: i32, buf: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let stat = ctx.files.stat_path(dir as u32, lookup as u32, slice(mem, path, path_len as u32)?)?;
        put(mem, buf, &stat.encode())
    })
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_filestat_set_times(
    mut caller: Ctx<'_>,
    dir: i32,
    lookup: i32,
    path: i32,
    path_len: i32,
    atim: i64,
    mtim: i64,
    flags: i32,
) -> i32 {
    call(&mut caller, |mem, ctx| {
        let path = slice(mem, path, path_len as u32)?;
        ctx.files.set_times_path(dir as u32, lookup as u32, path, (atim as u64, mtim as u64), flags as u16)
    })
}

fn path_create_directory(mut caller: Ctx<'_>, dir: i32, path: i32, path_len: i32) -> i32 {
    call(&mut caller, |mem, ctx| ctx.files.mkdir(dir as u32, slice(mem, path, path_len as u32)?))
}

fn path_remove_directory(mut caller: Ctx<'_>, dir: i32, path: i32, path_len: i32) -> i32 {
    call(&mut caller, |mem, ctx| ctx.files.rmdir(dir as u32, slice(mem, path, path_len as u32)?))
}

fn path_unlink_file(mut caller: Ctx<'_>, dir: i32, path: i32, path_len: i32) -> i32 {
    call(&mut caller, |mem, ctx| ctx.files.unlink(dir as u32, slice(mem, path, path_len as u32)?))
}

fn path_symlink(mut caller: Ctx<'_>, target: i32, target_len: i32, dir: i32, path: i32, path_len: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let target = slice(mem, target, target_len as u32)?;
        ctx.files.symlink(target, dir as u32, slice(mem, path, path_len as u32)?)
    })
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_readlink(mut caller: Ctx<'_>, dir: i32, path: i32, path_len: i32, buf: i32, buf_len: i32, used: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let target = ctx.files.readlink(dir as u32, slice(mem, path, path_len as u32)?)?;
        let n = target.len().min(buf_len as u32 as usize);
        put(mem, buf, &target.as_bytes()[..n])?;
        put_u32(mem, used, n as u32)
    })
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_link(
    mut caller: Ctx<'_>,
    old_dir: i32,
    lookup: i32,
    old: i32,
    old_len: i32,
    new_dir: i32,
    new: i32,
    new_len: i32,
) -> i32 {
    call(&mut caller, |mem, ctx| {
        let old = slice(mem, old, old_len as u32)?;
        let new = slice(mem, new, new_len as u32)?;
        ctx.files.hard_link(old_dir as u32, lookup as u32, old, new_dir as u32, new)
    })
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_rename(mut caller: Ctx<'_>, old_dir: i32, old: i32, old_len: i32, new_dir: i32, new: i32, new_len: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let old = slice(mem, old, old_len as u32)?;
        let new = slice(mem, new, new_len as u32)?;
        ctx.files.rename(old_dir as u32, old, new_dir as u32, new)
    })
}

/// Writes a NUL-terminated string table: pointers at `ptrs`, bytes at `buf`.
fn put_strings(caller: &mut Ctx<'_>, list: impl Fn(&WasiCtx) -> &Vec<String>, ptrs: i32, buf: i32) -> i32 {
    call(caller, |mem, ctx| {
        let mut at = buf as u32;
        for (i, s) in list(ctx).iter().enumerate() {
            put_u32(mem, (ptrs as u32).checked_add(i as u32 * 4).ok_or(errno::FAULT)? as i32, at)?;
            put(mem, at as i32, s.as_bytes())?;
            put(mem, at.checked_add(s.len() as u32).ok_or(errno::FAULT)? as i32, &[0])?;
            at = at.checked_add(s.len() as u32 + 1).ok_or(errno::FAULT)?;
        }
        Ok(())
    })
}

fn put_sizes(caller: &mut Ctx<'_>, list: impl Fn(&WasiCtx) -> &Vec<String>, count: i32, size: i32) -> i32 {
    call(caller, |mem, ctx| {
        let list = list(ctx);
        put_u32(mem, count, list.len() as u32)?;
        put_u32(mem, size, list.iter().map(|s| s.len() as u32 + 1).sum())
    })
}

const REALTIME: u32 = 0;
const MONOTONIC: u32 = 1;

/// The time of clock `id` now, in ns; the CPU-time clocks are `EBADF`, as in Wasmtime.
fn now(clock: &platform::Clock, id: u32) -> Result<u64, Errno> {
    match id {
        REALTIME => Ok(clock.realtime_ns()),
        MONOTONIC => Ok(clock.monotonic_ns()),
        2 | 3 => Err(errno::BADF),
        _ => Err(errno::INVAL),
    }
}

fn clock_time_get(mut caller: Ctx<'_>, id: i32, _precision: i64, time: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let now = now(&ctx.clock, id as u32)?;
        put_u64(mem, time, now)
    })
}

/// Both clocks count nanoseconds from the TSC.
fn clock_res_get(mut caller: Ctx<'_>, id: i32, resolution: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        now(&ctx.clock, id as u32)?;
        put_u64(mem, resolution, 1)
    })
}

/// `poll_oneoff`: fd subscriptions are ready at once (stdio and files never block, and a socket
/// read waits in `fd_read`), with the bytes left to read; clock subscriptions wait until the
/// earliest of them if nothing else is ready. The guest has no timer interrupt, so waiting
/// spins on the TSC; where the clocks stand still (under QEMU) the earliest timeout fires at once.
fn poll_oneoff(mut caller: Ctx<'_>, subs: i32, events: i32, count: i32, nevents: i32) -> i32 {
    const SUBSCRIPTION: u32 = 48;
    const EVENT: u32 = 32;
    const CLOCK: u8 = 0;
    const FD_READ: u8 = 1;
    const ABSTIME: u16 = 1;
    call(&mut caller, |mem, ctx| {
        if count <= 0 {
            return Err(errno::INVAL);
        }
        // (userdata, type, errno, bytes ready) of ready subscriptions; clock deadlines, on the
        // monotonic clock.
        let mut ready: Vec<(u64, u8, Errno, u64)> = Vec::new();
        let mut clocks: Vec<(u64, u64)> = Vec::new();
        for i in 0..count as u32 {
            let at = (subs as u32).checked_add(i * SUBSCRIPTION).ok_or(errno::FAULT)?;
            let sub = slice(mem, at as i32, SUBSCRIPTION)?;
            let userdata = u64::from_le_bytes(sub[0..8].try_into().map_err(|_| errno::FAULT)?);
            let tag = sub[8];
            let word = |at: usize| u64::from_le_bytes(sub[at..at + 8].try_into().unwrap_or([0; 8]));
            let id = word(16) as u32;
            match tag {
                CLOCK => {
                    let (timeout, flags) = (word(24), u16::from_le_bytes([sub[40], sub[41]]));
                    match now(&ctx.clock, id) {
                        Ok(current) => {
                            let wait = if flags & ABSTIME != 0 { timeout.saturating_sub(current) } else { timeout };
                            clocks.push((userdata, ctx.clock.monotonic_ns().saturating_add(wait)));
                        }
                        Err(e) => ready.push((userdata, CLOCK, e, 0)),
                    }
                }
                FD_READ | 2 => {
                    let (error, bytes) = match ctx.stdio.get(&id) {
                        Some(Stdio::In) if tag == FD_READ => (errno::SUCCESS, (ctx.stdin.len() - ctx.stdin_pos) as u64),
                        Some(Stdio::Out | Stdio::Err) if tag != FD_READ => (errno::SUCCESS, 0),
                        Some(_) => (errno::BADF, 0),
                        None if ctx.sockets.has(id) => (errno::SUCCESS, 0),
                        None if tag == FD_READ => {
                            ctx.files.readable(id).map_or_else(|e| (e, 0), |n| (errno::SUCCESS, n))
                        }
                        None => (ctx.files.check_file(id).err().unwrap_or(errno::SUCCESS), 0),
                    };
                    ready.push((userdata, tag, error, bytes));
                }
                _ => return Err(errno::INVAL),
            }
        }
        let deadline = clocks.iter().map(|&(_, deadline)| deadline).min().unwrap_or(0);
        if ready.is_empty() {
            while ctx.clock.runs() && ctx.clock.monotonic_ns() < deadline {
                core::hint::spin_loop();
            }
        }
        // A clock that stands still (under QEMU) fires its earliest timeout at once when nothing
        // else is ready.
        let current = if ctx.clock.runs() || !ready.is_empty() { ctx.clock.monotonic_ns() } else { deadline };
        ready.extend(clocks.iter().filter(|&&(_, deadline)| deadline <= current).map(|&(u, _)| (u, CLOCK, 0, 0)));
        for (i, (userdata, tag, error, bytes)) in ready.iter().enumerate() {
            let mut event = [0u8; EVENT as usize];
            event[0..8].copy_from_slice(&userdata.to_le_bytes());
            event[8..10].copy_from_slice(&error.to_le_bytes());
            event[10] = *tag;
            event[16..24].copy_from_slice(&bytes.to_le_bytes());
            put(mem, (events as u32).checked_add(i as u32 * EVENT).ok_or(errno::FAULT)? as i32, &event)?;
        }
        put_u32(mem, nevents, ready.len() as u32)
    })
}

fn random_get(mut caller: Ctx<'_>, buf: i32, len: i32) -> i32 {
    call(&mut caller, |mem, ctx| {
        let out = slice_mut(mem, buf, len as u32)?;
        if !crate::devices::entropy(out) {
            ctx.rng.fill_bytes(out);
        }
        Ok(())
    })
}

fn proc_exit(_: Ctx<'_>, code: i32) -> wasmtime::Result<()> {
    Err(wasmtime::Error::new(Exit(code)))
}

/// `proc_raise`: there are no signals to raise.
fn proc_raise(_: Ctx<'_>, _signal: i32) -> i32 {
    i32::from(errno::NOTSUP)
}

fn sched_yield(_: Ctx<'_>) -> i32 {
    i32::from(errno::SUCCESS)
}

/// Defines every preview 1 function in `linker`.
pub fn define(linker: &mut Linker<WasiCtx>) -> wasmtime::Result<()> {
    let m = wasi::MODULE;
    linker.func_wrap(m, "args_get", |mut c: Ctx<'_>, p: i32, b: i32| put_strings(&mut c, |x| &x.args, p, b))?;
    linker.func_wrap(m, "args_sizes_get", |mut c: Ctx<'_>, n: i32, s: i32| put_sizes(&mut c, |x| &x.args, n, s))?;
    linker.func_wrap(m, "environ_get", |mut c: Ctx<'_>, p: i32, b: i32| put_strings(&mut c, |x| &x.env, p, b))?;
    linker.func_wrap(m, "environ_sizes_get", |mut c: Ctx<'_>, n: i32, s: i32| put_sizes(&mut c, |x| &x.env, n, s))?;
    linker.func_wrap(m, "clock_res_get", clock_res_get)?;
    linker.func_wrap(m, "clock_time_get", clock_time_get)?;
    linker.func_wrap(m, "fd_advise", fd_advise)?;
    linker.func_wrap(m, "fd_allocate", fd_allocate)?;
    linker.func_wrap(m, "fd_close", fd_close)?;
    linker.func_wrap(m, "fd_datasync", fd_sync)?;
    linker.func_wrap(m, "fd_fdstat_get", fd_fdstat_get)?;
    linker.func_wrap(m, "fd_fdstat_set_flags", fd_fdstat_set_flags)?;
    linker.func_wrap(m, "fd_fdstat_set_rights", fd_fdstat_set_rights)?;
    linker.func_wrap(m, "fd_filestat_get", fd_filestat_get)?;
    linker.func_wrap(m, "fd_filestat_set_size", fd_filestat_set_size)?;
    linker.func_wrap(m, "fd_filestat_set_times", fd_filestat_set_times)?;
    linker.func_wrap(m, "fd_pread", fd_pread)?;
    linker.func_wrap(m, "fd_prestat_get", fd_prestat_get)?;
    linker.func_wrap(m, "fd_prestat_dir_name", fd_prestat_dir_name)?;
    linker.func_wrap(m, "fd_pwrite", fd_pwrite)?;
    linker.func_wrap(m, "fd_read", fd_read)?;
    linker.func_wrap(m, "fd_readdir", fd_readdir)?;
    linker.func_wrap(m, "fd_renumber", fd_renumber)?;
    linker.func_wrap(m, "fd_seek", fd_seek)?;
    linker.func_wrap(m, "fd_sync", fd_sync)?;
    linker.func_wrap(m, "fd_tell", fd_tell)?;
    linker.func_wrap(m, "fd_write", fd_write)?;
    linker.func_wrap(m, "path_create_directory", path_create_directory)?;
    linker.func_wrap(m, "path_filestat_get", path_filestat_get)?;
    linker.func_wrap(m, "path_filestat_set_times", path_filestat_set_times)?;
    linker.func_wrap(m, "path_link", path_link)?;
    linker.func_wrap(m, "path_open", path_open)?;
    linker.func_wrap(m, "path_readlink", path_readlink)?;
    linker.func_wrap(m, "path_remove_directory", path_remove_directory)?;
    linker.func_wrap(m, "path_rename", path_rename)?;
    linker.func_wrap(m, "path_symlink", path_symlink)?;
    linker.func_wrap(m, "path_unlink_file", path_unlink_file)?;
    linker.func_wrap(m, "poll_oneoff", poll_oneoff)?;
    linker.func_wrap(m, "proc_exit", proc_exit)?;
    linker.func_wrap(m, "proc_raise", proc_raise)?;
    linker.func_wrap(m, "random_get", random_get)?;
    linker.func_wrap(m, "sched_yield", sched_yield)?;
    linker.func_wrap(m, "sock_accept", sock_accept)?;
    linker.func_wrap(m, "sock_recv", sock_recv)?;
    linker.func_wrap(m, "sock_send", sock_send)?;
    linker.func_wrap(m, "sock_shutdown", sock_shutdown)?;
    Ok(())
}
