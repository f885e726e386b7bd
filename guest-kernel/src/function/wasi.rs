//! The WASI preview1 subset functions run against (`abi::wasi::IMPLEMENTED`), and `ENOSYS` for
//! the rest of preview1. The first call of each unsupported function in a VM adds a note to the
//! function's stderr, so the user sees it next to the function's own messages.
//!
//! fd 0 reads the request, fd 1 and fd 2 collect the response and the function's stderr (fd 2
//! goes to the virtio console instead when the VMM asks for it), fd 3 is `/data` (`fs.rs`), and
//! fds from 100 are the preopened sockets to host services (`sockets.rs`). Args and env come from
//! the manifest, clocks from the host parameters page plus the TSC, randomness from the virtio
//! entropy device when the VM has one, else from a ChaCha20 CSPRNG seeded with the host's
//! entropy. All guest-memory accesses are bounds-checked against the module's linear memory; a
//! bad pointer gets `EFAULT`, never a trap of ours.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;

use abi::bundle::Manifest;
use abi::invoke::MAX_OUTPUT_BYTES;
use abi::params::HostParams;
use abi::wasi::{self, errno};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use wasmtime::{Caller, Engine, Extern, FuncType, Linker, ResourceLimiter, Val, ValType};

use super::fs::Files;
use super::sockets::Sockets;
use crate::platform;

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
    warned: BTreeSet<&'static str>,
    /// The data volume's open files and directories (`/data`, fd 3, when there is one).
    files: Files,
    /// The sockets to host services.
    sockets: Sockets,
}

impl WasiCtx {
    /// State for the function `manifest` describes.
    pub fn new(manifest: &Manifest, params: &HostParams) -> Self {
        let sockets = Sockets::new(&manifest.connections);
        let mut env = manifest.env.clone();
        env.extend(sockets.env());
        env.push(instance_env(params));
        Self {
            memory_limit: (manifest.memory_mib as usize) << 20,
            stdin: Vec::new(),
            stdin_pos: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            args: manifest.args.clone(),
            env,
            rng: ChaCha20Rng::from_seed(params.entropy),
            clock: platform::Clock::new(params),
            warned: BTreeSet::new(),
            files: Files::new(),
            sockets,
        }
    }

    /// Takes fresh entropy and a fresh time base, as a VM restored from an image must.
    pub fn reseed(&mut self, params: &HostParams) {
        self.rng = ChaCha20Rng::from_seed(params.entropy);
        self.clock = platform::Clock::new(params);
        if let Some(last) = self.env.last_mut() {
            *last = instance_env(params);
        }
    }

    /// Starts an invocation on `request`.
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

/// The `THAW_INSTANCE_ID` entry, always the last of the environment.
fn instance_env(params: &HostParams) -> String {
    alloc::format!("THAW_INSTANCE_ID={}", params.instance_id)
}

type Ctx<'a> = Caller<'a, WasiCtx>;

/// The module's linear memory as (memory, bytes), or `None` if it exports none.
fn memory<'a>(caller: &'a mut Ctx<'_>) -> Option<(&'a mut [u8], &'a mut WasiCtx)> {
    let memory = caller.get_export("memory").and_then(Extern::into_memory)?;
    Some(memory.data_and_store_mut(caller))
}

fn slice(mem: &[u8], ptr: i32, len: u32) -> Option<&[u8]> {
    mem.get(ptr as u32 as usize..(ptr as u32 as usize).checked_add(len as usize)?)
}

fn slice_mut(mem: &mut [u8], ptr: i32, len: u32) -> Option<&mut [u8]> {
    mem.get_mut(ptr as u32 as usize..(ptr as u32 as usize).checked_add(len as usize)?)
}

fn put_u32(mem: &mut [u8], ptr: i32, value: u32) -> Option<()> {
    slice_mut(mem, ptr, 4)?.copy_from_slice(&value.to_le_bytes());
    Some(())
}

fn put_u64(mem: &mut [u8], ptr: i32, value: u64) -> Option<()> {
    slice_mut(mem, ptr, 8)?.copy_from_slice(&value.to_le_bytes());
    Some(())
}

fn get_u32(mem: &[u8], ptr: u32) -> Option<u32> {
    Some(u32::from_le_bytes(slice(mem, ptr as i32, 4)?.try_into().ok()?))
}

/// The (pointer, length) pairs of an iovec array.
fn iovecs(mem: &[u8], iovs: i32, count: i32) -> Option<Vec<(u32, u32)>> {
    (0..count as u32)
        .map(|i| {
            let at = (iovs as u32).checked_add(i.checked_mul(8)?)?;
            Some((get_u32(mem, at)?, get_u32(mem, at.checked_add(4)?)?))
        })
        .collect()
}

fn code(result: Option<u16>) -> i32 {
    i32::from(result.unwrap_or(errno::FAULT))
}

fn fd_write(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, nwritten: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    let out = match fd {
        1 => &mut ctx.stdout,
        2 if crate::devices::console_log() => return console_write(mem, iovs, count, nwritten),
        2 => &mut ctx.stderr,
        _ if ctx.sockets.has(fd as u32) => return socket_send(mem, ctx, fd, iovs, count, nwritten),
        _ => return i32::from(errno::BADF),
    };
    code((|| {
        let mut total = 0u32;
        for (ptr, len) in iovecs(mem, iovs, count)? {
            let bytes = slice(mem, ptr as i32, len)?;
            if (out.len() + bytes.len()) as u64 > MAX_OUTPUT_BYTES {
                return Some(errno::IO);
            }
            out.extend_from_slice(bytes);
            total = total.wrapping_add(len);
        }
        put_u32(mem, nwritten, total)?;
        Some(errno::SUCCESS)
    })())
}

/// `fd_write` to the virtio console (fd 2 when the VMM asked for it).
fn console_write(mem: &mut [u8], iovs: i32, count: i32, nwritten: i32) -> i32 {
    code((|| {
        let mut total = 0u32;
        for (ptr, len) in iovecs(mem, iovs, count)? {
            if !crate::devices::stderr_write(slice(mem, ptr as i32, len)?) {
                return Some(errno::IO);
            }
            total = total.wrapping_add(len);
        }
        put_u32(mem, nwritten, total)?;
        Some(errno::SUCCESS)
    })())
}

/// `fd_write` and `sock_send` on a socket: sends every buffer.
fn socket_send(mem: &mut [u8], ctx: &mut WasiCtx, fd: i32, iovs: i32, count: i32, nwritten: i32) -> i32 {
    code((|| {
        let mut total = 0u32;
        for (ptr, len) in iovecs(mem, iovs, count)? {
            if let Err(e) = ctx.sockets.send(fd as u32, slice(mem, ptr as i32, len)?) {
                return Some(e);
            }
            total = total.wrapping_add(len);
        }
        put_u32(mem, nwritten, total)?;
        Some(errno::SUCCESS)
    })())
}

/// `fd_read` and `sock_recv` on a socket: waits for bytes and spreads them over the buffers.
fn socket_recv(mem: &mut [u8], ctx: &mut WasiCtx, fd: i32, iovs: i32, count: i32, nread: i32) -> i32 {
    const MAX_READ: u32 = 64 << 10;
    code((|| {
        let buffers = iovecs(mem, iovs, count)?;
        let want = buffers.iter().fold(0u32, |sum, (_, len)| sum.saturating_add(*len)).min(MAX_READ);
        let mut bytes = alloc::vec![0u8; want as usize];
        let n = if want == 0 {
            0
        } else {
            match ctx.sockets.recv(fd as u32, &mut bytes) {
                Ok(n) => n,
                Err(e) => return Some(e),
            }
        };
        let mut rest = &bytes[..n];
        for (ptr, len) in buffers {
            let take = rest.len().min(len as usize);
            slice_mut(mem, ptr as i32, take as u32)?.copy_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        put_u32(mem, nread, n as u32)?;
        Some(errno::SUCCESS)
    })())
}

fn fd_read(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, nread: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    if ctx.sockets.has(fd as u32) {
        return socket_recv(mem, ctx, fd, iovs, count, nread);
    }
    if fd != 0 {
        return code((|| {
            let mut total = 0u32;
            for (ptr, len) in iovecs(mem, iovs, count)? {
                let n = match ctx.files.read(fd as u32, slice_mut(mem, ptr as i32, len)?) {
                    Ok(n) => n,
                    Err(e) => return Some(e),
                };
                total += n as u32;
                if n < len as usize {
                    break;
                }
            }
            put_u32(mem, nread, total)?;
            Some(errno::SUCCESS)
        })());
    }
    code((|| {
        let mut total = 0u32;
        for (ptr, len) in iovecs(mem, iovs, count)? {
            let rest = &ctx.stdin[ctx.stdin_pos..];
            let n = rest.len().min(len as usize);
            slice_mut(mem, ptr as i32, n as u32)?.copy_from_slice(&rest[..n]);
            ctx.stdin_pos += n;
            total += n as u32;
        }
        put_u32(mem, nread, total)?;
        Some(errno::SUCCESS)
    })())
}

fn fd_close(mut caller: Ctx<'_>, fd: i32) -> i32 {
    if (0..=2).contains(&fd) {
        return i32::from(errno::SUCCESS);
    }
    let ctx = caller.data_mut();
    let result = if ctx.sockets.has(fd as u32) { ctx.sockets.close(fd as u32) } else { ctx.files.close(fd as u32) };
    i32::from(result.err().unwrap_or(errno::SUCCESS))
}

/// The errno of a socket call on `fd`, which is not a socket: `ENOTSOCK` for another open fd.
fn not_a_socket(ctx: &WasiCtx, fd: i32) -> i32 {
    let open = (0..=2).contains(&fd) || ctx.files.fdstat(fd as u32).is_ok();
    i32::from(if open { errno::NOTSOCK } else { errno::BADF })
}

fn sock_send(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, _flags: i32, nwritten: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    if !ctx.sockets.has(fd as u32) {
        return not_a_socket(ctx, fd);
    }
    socket_send(mem, ctx, fd, iovs, count, nwritten)
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn sock_recv(mut caller: Ctx<'_>, fd: i32, iovs: i32, count: i32, _flags: i32, nread: i32, flags_out: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    if !ctx.sockets.has(fd as u32) {
        return not_a_socket(ctx, fd);
    }
    if slice_mut(mem, flags_out, 2).map(|f| f.fill(0)).is_none() {
        return i32::from(errno::FAULT);
    }
    socket_recv(mem, ctx, fd, iovs, count, nread)
}

fn sock_shutdown(mut caller: Ctx<'_>, fd: i32, how: i32) -> i32 {
    const BOTH: i32 = 3;
    let ctx = caller.data_mut();
    if !ctx.sockets.has(fd as u32) {
        return not_a_socket(ctx, fd);
    }
    if how != BOTH {
        // The vsock driver closes both directions at once; half-closing is not offered.
        return i32::from(errno::INVAL);
    }
    i32::from(ctx.sockets.close(fd as u32).err().unwrap_or(errno::SUCCESS))
}

fn fd_fdstat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    const CHARACTER_DEVICE: u8 = 2;
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;
    let (filetype, rights, inheriting) = match fd {
        0 => (CHARACTER_DEVICE, RIGHT_FD_READ, 0),
        1 | 2 => (CHARACTER_DEVICE, RIGHT_FD_WRITE, 0),
        _ if let Ok((filetype, rights)) = caller.data().sockets.fdstat(fd as u32) => (filetype, rights, 0),
        _ => match caller.data().files.fdstat(fd as u32) {
            Ok((filetype, rights)) => (filetype, rights, rights),
            Err(e) => return i32::from(e),
        },
    };
    let Some((mem, _)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    code((|| {
        let stat = slice_mut(mem, buf, 24)?;
        stat.fill(0);
        stat[0] = filetype;
        stat[8..16].copy_from_slice(&rights.to_le_bytes());
        stat[16..24].copy_from_slice(&inheriting.to_le_bytes());
        Some(errno::SUCCESS)
    })())
}

fn fd_prestat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    let len = match ctx.files.prestat(fd as u32) {
        Ok(len) => len,
        Err(e) => return i32::from(e),
    };
    code((|| {
        let prestat = slice_mut(mem, buf, 8)?;
        prestat.fill(0); // tag 0: a directory
        prestat[4..8].copy_from_slice(&len.to_le_bytes());
        Some(errno::SUCCESS)
    })())
}

fn fd_prestat_dir_name(mut caller: Ctx<'_>, fd: i32, path: i32, len: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    if let Err(e) = ctx.files.prestat(fd as u32) {
        return i32::from(e);
    }
    let name = super::fs::PREOPEN_NAME.as_bytes();
    if (len as u32 as usize) < name.len() {
        return i32::from(errno::NAMETOOLONG);
    }
    code(slice_mut(mem, path, name.len() as u32).map(|dest| {
        dest.copy_from_slice(name);
        errno::SUCCESS
    }))
}

#[allow(clippy::too_many_arguments)] // the WASI signature
fn path_open(
    mut caller: Ctx<'_>,
    dir: i32,
    _dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    rights: i64,
    _inheriting: i64,
    _fdflags: i32,
    fd_out: i32,
) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    code((|| {
        let name = slice(mem, path, path_len as u32)?;
        match ctx.files.open(dir as u32, name, oflags as u16, rights as u64) {
            Ok(fd) => put_u32(mem, fd_out, fd).map(|()| errno::SUCCESS),
            Err(e) => Some(e),
        }
    })())
}

fn fd_seek(mut caller: Ctx<'_>, fd: i32, delta: i64, whence: i32, new_offset: i32) -> i32 {
    if (0..=2).contains(&fd) || caller.data().sockets.has(fd as u32) {
        return i32::from(errno::SPIPE);
    }
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    match u8::try_from(whence).map_err(|_| errno::INVAL).and_then(|w| ctx.files.seek(fd as u32, delta, w)) {
        Ok(offset) => code(put_u64(mem, new_offset, offset).map(|()| errno::SUCCESS)),
        Err(e) => i32::from(e),
    }
}

fn fd_tell(mut caller: Ctx<'_>, fd: i32, offset: i32) -> i32 {
    if (0..=2).contains(&fd) || caller.data().sockets.has(fd as u32) {
        return i32::from(errno::SPIPE);
    }
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    match ctx.files.tell(fd as u32) {
        Ok(at) => code(put_u64(mem, offset, at).map(|()| errno::SUCCESS)),
        Err(e) => i32::from(e),
    }
}

fn put_stat(mem: &mut [u8], buf: i32, stat: Result<super::fs::Stat, u16>) -> i32 {
    match stat {
        Ok(stat) => code(slice_mut(mem, buf, 64).map(|dest| {
            dest.copy_from_slice(&stat.encode());
            errno::SUCCESS
        })),
        Err(e) => i32::from(e),
    }
}

fn fd_filestat_get(mut caller: Ctx<'_>, fd: i32, buf: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    let socket = ctx.sockets.fdstat(fd as u32).ok();
    if (0..=2).contains(&fd) || socket.is_some() {
        let mut stat = [0u8; 64];
        stat[16] = socket.map_or(2, |(filetype, _)| filetype); // a socket, or a character device
        return code(slice_mut(mem, buf, 64).map(|dest| {
            dest.copy_from_slice(&stat);
            errno::SUCCESS
        }));
    }
    put_stat(mem, buf, ctx.files.stat_fd(fd as u32))
}

fn path_filestat_get(mut caller: Ctx<'_>, dir: i32, _flags: i32, path: i32, path_len: i32, buf: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    let Some(name) = slice(mem, path, path_len as u32) else { return i32::from(errno::FAULT) };
    let stat = ctx.files.stat_path(dir as u32, name);
    put_stat(mem, buf, stat)
}

fn fd_readdir(mut caller: Ctx<'_>, fd: i32, buf: i32, len: i32, cookie: i64, used: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    match ctx.files.readdir(fd as u32, cookie as u64, len as u32 as usize) {
        Ok(bytes) => code((|| {
            slice_mut(mem, buf, bytes.len() as u32)?.copy_from_slice(&bytes);
            put_u32(mem, used, bytes.len() as u32)?;
            Some(errno::SUCCESS)
        })()),
        Err(e) => i32::from(e),
    }
}

/// Writes a NUL-terminated string table: pointers at `ptrs`, bytes at `buf`.
fn put_strings(caller: &mut Ctx<'_>, list: impl Fn(&WasiCtx) -> &Vec<String>, ptrs: i32, buf: i32) -> i32 {
    let Some((mem, ctx)) = memory(caller) else { return i32::from(errno::FAULT) };
    code((|| {
        let mut at = buf as u32;
        for (i, s) in list(ctx).iter().enumerate() {
            put_u32(mem, (ptrs as u32).checked_add(i as u32 * 4)? as i32, at)?;
            let dest = slice_mut(mem, at as i32, s.len() as u32 + 1)?;
            dest[..s.len()].copy_from_slice(s.as_bytes());
            dest[s.len()] = 0;
            at = at.checked_add(s.len() as u32 + 1)?;
        }
        Some(errno::SUCCESS)
    })())
}

fn put_sizes(caller: &mut Ctx<'_>, list: impl Fn(&WasiCtx) -> &Vec<String>, count: i32, size: i32) -> i32 {
    let Some((mem, ctx)) = memory(caller) else { return i32::from(errno::FAULT) };
    let list = list(ctx);
    let bytes: usize = list.iter().map(|s| s.len() + 1).sum();
    code((|| {
        put_u32(mem, count, list.len() as u32)?;
        put_u32(mem, size, bytes as u32)?;
        Some(errno::SUCCESS)
    })())
}

fn clock_time_get(mut caller: Ctx<'_>, id: i32, _precision: i64, time: i32) -> i32 {
    const REALTIME: i32 = 0;
    const MONOTONIC: i32 = 1;
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    let now = match id {
        REALTIME => ctx.clock.realtime_ns(),
        MONOTONIC => ctx.clock.monotonic_ns(),
        _ => return i32::from(errno::INVAL),
    };
    code(put_u64(mem, time, now).map(|()| errno::SUCCESS))
}

fn random_get(mut caller: Ctx<'_>, buf: i32, len: i32) -> i32 {
    let Some((mem, ctx)) = memory(&mut caller) else { return i32::from(errno::FAULT) };
    code((|| {
        let out = slice_mut(mem, buf, len as u32)?;
        if !crate::devices::entropy(out) {
            ctx.rng.fill_bytes(out);
        }
        Some(errno::SUCCESS)
    })())
}

fn proc_exit(_: Ctx<'_>, code: i32) -> wasmtime::Result<()> {
    Err(wasmtime::Error::new(Exit(code)))
}

fn sched_yield(_: Ctx<'_>) -> i32 {
    i32::from(errno::SUCCESS)
}

/// Defines every preview1 function in `linker`.
pub fn define(engine: &Engine, linker: &mut Linker<WasiCtx>) -> wasmtime::Result<()> {
    let m = wasi::MODULE;
    linker.func_wrap(m, "fd_write", fd_write)?;
    linker.func_wrap(m, "fd_read", fd_read)?;
    linker.func_wrap(m, "fd_close", fd_close)?;
    linker.func_wrap(m, "fd_fdstat_get", fd_fdstat_get)?;
    linker.func_wrap(m, "fd_prestat_get", fd_prestat_get)?;
    linker.func_wrap(m, "fd_prestat_dir_name", fd_prestat_dir_name)?;
    linker.func_wrap(m, "path_open", path_open)?;
    linker.func_wrap(m, "fd_seek", fd_seek)?;
    linker.func_wrap(m, "fd_tell", fd_tell)?;
    linker.func_wrap(m, "fd_filestat_get", fd_filestat_get)?;
    linker.func_wrap(m, "path_filestat_get", path_filestat_get)?;
    linker.func_wrap(m, "fd_readdir", fd_readdir)?;
    linker.func_wrap(m, "args_get", |mut c: Ctx<'_>, p: i32, b: i32| put_strings(&mut c, |x| &x.args, p, b))?;
    linker.func_wrap(m, "args_sizes_get", |mut c: Ctx<'_>, n: i32, s: i32| put_sizes(&mut c, |x| &x.args, n, s))?;
    linker.func_wrap(m, "environ_get", |mut c: Ctx<'_>, p: i32, b: i32| put_strings(&mut c, |x| &x.env, p, b))?;
    linker.func_wrap(m, "environ_sizes_get", |mut c: Ctx<'_>, n: i32, s: i32| put_sizes(&mut c, |x| &x.env, n, s))?;
    linker.func_wrap(m, "clock_time_get", clock_time_get)?;
    linker.func_wrap(m, "random_get", random_get)?;
    linker.func_wrap(m, "proc_exit", proc_exit)?;
    linker.func_wrap(m, "sched_yield", sched_yield)?;
    linker.func_wrap(m, "sock_send", sock_send)?;
    linker.func_wrap(m, "sock_recv", sock_recv)?;
    linker.func_wrap(m, "sock_shutdown", sock_shutdown)?;
    for function in wasi::FUNCTIONS.iter().filter(|f| !wasi::IMPLEMENTED.contains(&f.name)) {
        let params = function.params.iter().map(|t| match t {
            wasi::ValType::I32 => ValType::I32,
            wasi::ValType::I64 => ValType::I64,
        });
        let results: &[ValType] = if function.returns_errno { &[ValType::I32] } else { &[] };
        let name = function.name;
        let ty = FuncType::new(engine, params, results.iter().cloned());
        linker.func_new(m, name, ty, move |mut caller, _, results| {
            let ctx = caller.data_mut();
            if ctx.warned.insert(name) {
                let note = alloc::format!("thaw: wasi: {name} is not supported; it returns ENOSYS\n");
                ctx.stderr.extend_from_slice(note.as_bytes());
            }
            if let Some(result) = results.first_mut() {
                *result = Val::I32(i32::from(errno::NOSYS));
            }
            Ok(())
        })?;
    }
    Ok(())
}
