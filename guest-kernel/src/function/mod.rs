//! Serving a WebAssembly function: load the code the host compiled for it (`abi::engine`),
//! instantiate it against WASI, run its init exports, then answer requests from the invoke
//! mailbox until the VMM has no more.
//!
//! The function contract is in docs/FUNCTIONS.md: a reactor exports `handle` (and optionally
//! `_initialize` and `init`, run once); a command exports `_start`, run in a fresh instance of
//! the compiled module for every request. A command packed with `--init-until-read` instead
//! runs `_start` once at boot, and its first read of stdin is where init ends
//! ([`at_first_read`]): the checkpoint is taken inside that read, which then returns the request.
//!
//! Requests arrive through a [`Transport`]: the invoke mailbox under thaw's VMM, or frames on
//! the serial line under QEMU (`abi::qemu`). Everything else is the same on both.

mod backing;
mod fs;
mod sockets;
mod wasi;

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use abi::bundle::Bundle;
use abi::hypercall::{CheckpointResult, HYPERCALL_PAGE_SIZE, Hypercall, Milestone};
use abi::invoke::{self, NextReply, NextRequest, Range, Response};
use wasmtime::{AsContextMut, Caller, Engine, InstancePre, Linker, Module, Store, Trap, TypedFunc};

use abi::params::HostParams;
use abi::qemu;

use crate::{hypercall, phys, platform, serial};

use wasi::FirstRead;
pub use wasi::WasiCtx;

/// How a module is entered for each request.
enum Entry {
    /// A reactor: `handle` on the instance created at boot.
    Reactor(TypedFunc<(), ()>),
    /// A command: `_start` on a new instance per request, in a new store (a store frees its
    /// instances only when it is dropped), which takes over the WASI state.
    Command(InstancePre<WasiCtx>),
}

/// What a [`Transport::report`] hands the host.
#[derive(Debug, Clone, Copy)]
enum Report {
    /// The answer to a request.
    Response,
    /// How the function's init failed.
    InitFailed,
    /// What a successful init wrote to stderr.
    InitOutput,
}

/// Where requests come from and where responses go.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// The invoke mailbox hypercalls (thaw's VMM).
    Mailbox,
    /// Frames on COM1 (QEMU).
    Serial,
}

/// What a restored VM learns when its checkpoint returns.
struct Restored {
    /// Fresh host parameters: entropy, clock and instance id.
    params: HostParams,
    /// How many working-set runs to touch before the first request.
    warm: u32,
    /// The first request, when the VMM handed it in with the result.
    first_request: Option<Vec<u8>>,
}

impl Transport {
    fn for_platform() -> Self {
        match platform::current() {
            platform::Platform::Thaw => Self::Mailbox,
            platform::Platform::Other => Self::Serial,
        }
    }

    /// The host's entropy and time base.
    fn host_params(self) -> Result<HostParams, String> {
        match self {
            Self::Mailbox => platform::host_params().ok_or_else(|| "the VMM wrote no host parameters page".into()),
            Self::Serial => {
                serial::write(qemu::AWAIT_FRAMES_MARKER.as_bytes());
                serial::write(b"\n");
                expect_tag(qemu::PARAMS_TAG)?;
                let mut bytes = [0u8; HostParams::LEN];
                serial::read_exact(&mut bytes);
                HostParams::decode(&bytes).ok_or_else(|| "the host parameters frame is malformed".into())
            }
        }
    }

    /// Fetches the next request into `buffer`; false when there are no more.
    fn next_request(self, buffer: &mut Vec<u8>) -> Result<bool, String> {
        match self {
            Self::Mailbox => next_from_mailbox(buffer),
            Self::Serial => {
                let mut tag = [0u8; 8];
                serial::read_exact(&mut tag);
                if tag == qemu::END_TAG {
                    return Ok(false);
                }
                if tag != qemu::REQUEST_TAG {
                    return Err(alloc::format!("serial frame tag {tag:02x?} is not a request or end"));
                }
                let mut len = [0u8; 8];
                serial::read_exact(&mut len);
                let len = u64::from_le_bytes(len);
                if len > invoke::MAX_REQUEST_BYTES {
                    return Err(alloc::format!("serial request of {len} bytes exceeds {}", invoke::MAX_REQUEST_BYTES));
                }
                buffer.clear();
                buffer.resize(len as usize, 0);
                serial::read_exact(buffer);
                Ok(true)
            }
        }
    }

    /// Offers the host a checkpoint (under thaw's VMM). Returns what a restored copy learns
    /// (`None` in the original VM).
    fn checkpoint(self) -> Result<Option<Restored>, String> {
        match self {
            Self::Serial => Ok(None),
            Self::Mailbox => {
                crate::devices::vsock::quiesce();
                let io_table = crate::iotable::location().encode();
                hypercall::with_payload(&io_table, |len| Hypercall::Checkpoint { len });
                // SAFETY: the VMM wrote the result into the hypercall page (over the payload)
                // before the `out` returned (the original VM) or before the restored VM first
                // ran. It is copied out here, before any other hypercall reuses the page.
                let page = unsafe { core::slice::from_raw_parts(phys::hypercall_page(), HYPERCALL_PAGE_SIZE) };
                let result = CheckpointResult::decode(page).map_err(|e| e.to_string())?;
                match result {
                    CheckpointResult::Original => Ok(None),
                    CheckpointResult::Restored { warm_runs, .. } => {
                        let first_request = result.first_request(page).map(<[u8]>::to_vec);
                        let params = self.host_params()?;
                        Ok(Some(Restored { params, warm: warm_runs, first_request }))
                    }
                }
            }
        }
    }

    /// Hands back the answer to the current request.
    fn respond(self, status: u32, exit_code: u32, stdout: &[u8], stderr: &[u8], message: &[u8]) {
        self.report(Report::Response, status, exit_code, stdout, stderr, message);
    }

    /// Tells the host the function failed in its init (trapped or exited), with what it wrote,
    /// and ends the VM: the function's failure, not the kernel's.
    fn init_failed(self, status: u32, exit_code: u32, stdout: &[u8], stderr: &[u8], message: &[u8]) -> ! {
        self.report(Report::InitFailed, status, exit_code, stdout, stderr, message);
        platform::exit(0)
    }

    /// Hands the host what a successful init wrote to stderr, before the checkpoint: shown by
    /// `thaw snapshot` and a cold `thaw invoke`, never by the VMs restored from the image.
    fn init_output(self, stderr: &[u8]) {
        self.report(Report::InitOutput, invoke::STATUS_OK, 0, &[], stderr, &[]);
    }

    fn report(self, kind: Report, status: u32, exit_code: u32, stdout: &[u8], stderr: &[u8], message: &[u8]) {
        let message = &message[..message.len().min(invoke::MAX_MESSAGE_BYTES as usize)];
        match self {
            Self::Mailbox => {
                let response = Response {
                    status,
                    exit_code,
                    stdout: range(stdout),
                    stderr: range(stderr),
                    message: range(message),
                };
                hypercall::with_payload(&response.encode(), |len| match kind {
                    Report::Response => Hypercall::InvokeRespond { len },
                    Report::InitFailed => Hypercall::InitFailed { len },
                    Report::InitOutput => Hypercall::InitOutput { len },
                });
            }
            Self::Serial => {
                let marker = match kind {
                    Report::Response => qemu::RESPONSE_MARKER,
                    Report::InitFailed => qemu::INIT_FAILED_MARKER,
                    Report::InitOutput => qemu::INIT_OUTPUT_MARKER,
                };
                let mut line = alloc::format!("{marker}{status} {exit_code} ");
                for (i, bytes) in [stdout, stderr, message].into_iter().enumerate() {
                    let _ = qemu::write_hex(&mut line, bytes);
                    line.push(if i == 2 { '\n' } else { ' ' });
                }
                serial::write(line.as_bytes());
            }
        }
    }
}

fn expect_tag(expected: [u8; 8]) -> Result<(), String> {
    let mut tag = [0u8; 8];
    serial::read_exact(&mut tag);
    if tag == expected { Ok(()) } else { Err(alloc::format!("serial frame tag {tag:02x?}, expected {expected:02x?}")) }
}

/// Runs the function in `bundle` (the ramdisk: reserved memory that nothing writes) until the
/// host has no more requests; returns the exit code.
pub fn serve(bundle: &'static [u8]) -> u32 {
    let bundle = match abi::bundle::parse(bundle) {
        Ok(bundle) => bundle,
        Err(e) => panic!("function bundle: {e}"),
    };
    match run(&bundle, Transport::for_platform()) {
        Ok(never) => match never {},
        Err(message) => panic!("function {}: {message}", bundle.manifest.name),
    }
}

fn run(bundle: &Bundle<'static>, transport: Transport) -> Result<core::convert::Infallible, String> {
    let params = transport.host_params()?;
    crate::devices::set_params(&params);
    let manifest = &bundle.manifest;
    let engine = Engine::new(&crate::engine::config(manifest.fuel.is_some(), (manifest.memory_mib as usize) << 20))
        .map_err(|e| alloc::format!("the engine: {e}"))?;
    let module = load(&engine, bundle)?;
    platform::milestone(Milestone::Compiled);

    let mut store = new_store(&engine, WasiCtx::new(manifest, &params));
    let mut linker = Linker::new(&engine);
    wasi::define(&mut linker).map_err(|e| alloc::format!("defining WASI: {e}"))?;

    let has = |name: &str| module.get_export(name).is_some();
    let entry = if has("handle") {
        set_fuel(&mut store, manifest.fuel)?;
        let instance = match linker.instantiate(&mut store, &module) {
            Ok(instance) => instance,
            // A start function that traps or exits is the function's failure, as in init; so is
            // a module whose tables or memories this VM cannot hold (issue 28).
            Err(error) => {
                let during = if error.is::<Trap>() || error.is::<wasi::Exit>() {
                    "in its start function"
                } else {
                    "instantiating the module"
                };
                let (status, exit_code, message) = ending(Err(error));
                let ctx = store.data();
                let message = alloc::format!("{during}: {message}");
                transport.init_failed(status, exit_code, &ctx.stdout, &ctx.stderr, message.as_bytes());
            }
        };
        platform::milestone(Milestone::Instantiated);
        for init in ["_initialize", "init"] {
            if has(init) {
                let func = instance
                    .get_typed_func::<(), ()>(&mut store, init)
                    .map_err(|e| alloc::format!("export {init}: {e}"))?;
                set_fuel(&mut store, manifest.fuel)?;
                if let Err(error) = func.call(&mut store, ()) {
                    let (status, exit_code, message) = ending(Err(error));
                    let ctx = store.data();
                    let message = alloc::format!("in {init}: {message}");
                    transport.init_failed(status, exit_code, &ctx.stdout, &ctx.stderr, message.as_bytes());
                }
            }
        }
        Entry::Reactor(
            instance
                .get_typed_func::<(), ()>(&mut store, "handle")
                .map_err(|e| alloc::format!("export handle: {e}"))?,
        )
    } else if has("_start") {
        let pre = linker.instantiate_pre(&module).map_err(|e| alloc::format!("linking the module: {e}"))?;
        platform::milestone(Milestone::Instantiated);
        Entry::Command(pre)
    } else {
        return Err("the module exports neither handle nor _start".into());
    };
    let mut first_request = None;
    let mut request = Vec::new();
    let answered = match &entry {
        Entry::Command(pre) if manifest.init_until_read => {
            start_until_read(pre, &mut store, transport, manifest, &params)?
        }
        _ => false,
    };
    if !answered {
        first_request = end_init(transport, store.data_mut())?;
    }
    loop {
        match first_request.take() {
            Some(first) => request = first,
            None if transport.next_request(&mut request)? => {}
            None => break,
        }
        store.data_mut().begin(core::mem::take(&mut request));
        if let Entry::Command(_) = entry {
            store = new_store(&engine, store.into_data());
        }
        set_fuel(&mut store, manifest.fuel)?;
        let result = match &entry {
            Entry::Reactor(handle) => handle.call(&mut store, ()),
            Entry::Command(pre) => pre
                .instantiate(&mut store)
                .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start")?.call(&mut store, ())),
        };
        let (status, exit_code, message) = ending(result);
        let ctx = store.data_mut();
        transport.respond(status, exit_code, &ctx.stdout, &ctx.stderr, message.as_bytes());
        request = ctx.end();
    }
    // No more requests: the VM is about to be discarded, so exit here instead of returning and
    // dropping the store, module and engine, which would only fault in pages for nothing.
    platform::exit(0)
}

/// Ends init: hands the host what init wrote to stderr, then offers the checkpoint. This is the
/// init-less boot point: a snapshot taken here skips everything before it on every request. A
/// restored copy gets fresh entropy, clock and instance id, and must not reuse ours; it returns
/// the first request when the VMM handed one in with the resume.
fn end_init(transport: Transport, ctx: &mut WasiCtx) -> Result<Option<Vec<u8>>, String> {
    if !ctx.stderr.is_empty() {
        transport.init_output(&ctx.stderr);
        ctx.stderr.clear();
    }
    platform::milestone(Milestone::Initialized);
    let Some(restored) = transport.checkpoint()? else { return Ok(None) };
    crate::devices::restored(&restored.params);
    ctx.reseed(&restored.params);
    // Restored ahead of its request: map what the request will touch before asking for it.
    crate::workingset::touch(restored.warm);
    Ok(restored.first_request)
}

/// Runs a command packed with `--init-until-read` from `_start` until its first read of stdin,
/// where [`at_first_read`] ends init and takes the first request, and then to its end, which
/// answers that request: true. A command that writes to stdout before reading, or ends without
/// reading, is run whole for every request as any command is: `store` is then fresh, and false.
/// One that fails before reading fails its init.
fn start_until_read(
    pre: &InstancePre<WasiCtx>,
    store: &mut Store<WasiCtx>,
    transport: Transport,
    manifest: &abi::bundle::Manifest,
    params: &HostParams,
) -> Result<bool, String> {
    store.data_mut().first_read = FirstRead::Awaited { fuel: manifest.fuel };
    set_fuel(&mut *store, manifest.fuel)?;
    let result = pre
        .instantiate(&mut *store)
        .and_then(|instance| instance.get_typed_func::<(), ()>(&mut *store, "_start")?.call(&mut *store, ()));
    if store.data().first_read == FirstRead::NotAwaited {
        let (status, exit_code, message) = ending(result);
        let ctx = store.data_mut();
        transport.respond(status, exit_code, &ctx.stdout, &ctx.stderr, message.as_bytes());
        ctx.end();
        return Ok(true);
    }
    let why = match result {
        Err(error) if error.is::<wasi::WroteBeforeRead>() => "wrote to stdout before its first read of stdin",
        Err(error) if !error.downcast_ref::<wasi::Exit>().is_some_and(|exit| exit.0 == 0) => {
            let (status, exit_code, message) = ending(Err(error));
            let ctx = store.data();
            let message = alloc::format!("before its first read of stdin: {message}");
            transport.init_failed(status, exit_code, &ctx.stdout, &ctx.stderr, message.as_bytes());
        }
        // Returned, or exited with code 0.
        _ => "ended without reading stdin",
    };
    let mut fresh = WasiCtx::new(manifest, params);
    fresh.stderr = alloc::format!(
        "thaw: the command {why}, so its start-up runs on every request (--init-until-read has no effect)\n"
    )
    .into_bytes();
    *store = new_store(pre.module().engine(), fresh);
    Ok(false)
}

/// The first `fd_read` of stdin by a command running [`start_until_read`]: ends init there
/// ([`end_init`]: the checkpoint), then takes the first request as stdin, with a fresh fuel
/// budget, and the read goes on to return it. With no request to answer (the VM that took the
/// snapshot), the VM ends here.
fn at_first_read(caller: &mut Caller<'_, WasiCtx>, fuel: Option<u64>) {
    let transport = Transport::for_platform();
    let taken = end_init(transport, caller.data_mut()).and_then(|first| {
        let mut request = Vec::new();
        match first {
            Some(first) => request = first,
            None if transport.next_request(&mut request)? => {}
            None => platform::exit(0),
        }
        caller.data_mut().begin(request);
        set_fuel(&mut *caller, fuel)
    });
    if let Err(message) = taken {
        panic!("the command's first read of stdin: {message}");
    }
}

/// A store for the function's instances, limited as [`WasiCtx`] says.
fn new_store(engine: &Engine, ctx: WasiCtx) -> Store<WasiCtx> {
    let mut store = Store::new(engine, ctx);
    store.limiter(|ctx| ctx);
    store
}

/// The function's code, compiled by the host for this engine, used where it lies in the ramdisk
/// when it is page-aligned there (`abi::bundle::CODE_ALIGN`), else copied. An artifact from
/// another thaw (another Wasmtime, other settings) is refused in one line.
fn load(engine: &Engine, bundle: &Bundle<'static>) -> Result<Module, String> {
    let code = bundle.code;
    if code.is_empty() {
        return Err("the bundle carries no compiled code; repack it with this thaw".into());
    }
    let aligned = (code.as_ptr() as u64).is_multiple_of(abi::bundle::CODE_ALIGN);
    // SAFETY: the code is what `thaw pack` (or `thaw serve`, from the wasm) compiled for this
    // engine's settings, and the host checked its SHA-256 against the manifest before booting.
    // Wasmtime checks the settings and version it records; the code itself runs in ring 3 of
    // this VM, which is the isolation boundary. In place, the bytes outlive the module and are
    // never written: they are the ramdisk, which lives as long as the kernel and which nothing
    // writes.
    let module = unsafe {
        if aligned { Module::deserialize_raw(engine, code.into()) } else { Module::deserialize(engine, code) }
    };
    module.map_err(|e| {
        alloc::format!(
            "the compiled code does not fit this thaw's engine ({}); repack it with this thaw",
            e.root_cause()
        )
    })
}

/// How a call into the function ended: the response status, exit code and trap message.
fn ending(result: wasmtime::Result<()>) -> (u32, u32, String) {
    match result {
        Ok(()) => (invoke::STATUS_OK, 0, String::new()),
        Err(e) => match (e.downcast_ref::<wasi::Exit>(), e.downcast_ref::<Trap>()) {
            (Some(exit), _) => (invoke::STATUS_EXITED, exit.0 as u32, String::new()),
            (None, Some(trap)) => {
                // Wasmtime says "wasm trap: " before what happened; the function's users see what
                // happened.
                let text = trap.to_string();
                (invoke::STATUS_TRAPPED, 0, text.strip_prefix("wasm trap: ").unwrap_or(&text).into())
            }
            (None, None) => (invoke::STATUS_TRAPPED, 0, e.to_string()),
        },
    }
}

/// Gives the store the manifest's fuel for one call (without a budget the code does not meter).
fn set_fuel(mut store: impl AsContextMut, fuel: Option<u64>) -> Result<(), String> {
    match fuel {
        Some(fuel) => store.as_context_mut().set_fuel(fuel).map_err(|e| alloc::format!("setting fuel: {e}")),
        None => Ok(()),
    }
}

/// Fetches the next request from the invoke mailbox into `buffer`; false when there are no more.
fn next_from_mailbox(buffer: &mut Vec<u8>) -> Result<bool, String> {
    loop {
        buffer.clear();
        let capacity = buffer.capacity().max(64 << 10);
        buffer.reserve_exact(capacity);
        let next = NextRequest { buffer_gpa: phys::virt_to_phys(buffer.as_ptr()), capacity: buffer.capacity() as u64 };
        hypercall::with_payload(&next.encode(), |len| Hypercall::InvokeNext { len });
        // SAFETY: the VMM wrote its reply over the request in the hypercall page before the
        // `out` returned; we copy it out before anything else uses the page.
        let reply = unsafe { core::slice::from_raw_parts(phys::hypercall_page(), NextReply::LEN) };
        let Some(reply) = NextReply::decode(reply) else { return Err("unreadable mailbox reply".into()) };
        match reply.status {
            invoke::NEXT_REQUEST if reply.len <= next.capacity => {
                // SAFETY: the VMM wrote `reply.len` bytes, at most the capacity we reserved,
                // into the buffer's spare capacity.
                unsafe { buffer.set_len(reply.len as usize) };
                return Ok(true);
            }
            invoke::NEXT_NONE => return Ok(false),
            invoke::NEXT_TOO_LARGE if reply.len <= invoke::MAX_REQUEST_BYTES && reply.len > next.capacity => {
                buffer.reserve_exact(reply.len as usize);
            }
            status => return Err(alloc::format!("mailbox reply status {status} with length {}", reply.len)),
        }
    }
}

fn range(bytes: &[u8]) -> Range {
    Range { gpa: phys::virt_to_phys(bytes.as_ptr()), len: bytes.len() as u64 }
}
