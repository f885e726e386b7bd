//! The peer `thaw bench --peer wasmtime` measures thaw against: a bundle's function run in this
//! process by Wasmtime (Cranelift, WASI preview 1 from `wasmtime-wasi`), phase by phase as
//! thaw's guest runs it: compile, instantiate, init, handle. Each run instantiates the module
//! anew, runs init and serves the request, as a cold invocation does; the module is compiled
//! once, and that one compile is the compile phase. The function sees the files thaw's guest
//! gives it: its data volume, unpacked once into a temporary directory preopened at its mount
//! (writable, as in the guest, but what one run writes there the next run sees), and its
//! other scratch directories, each an empty temporary directory in every run.

use std::time::Instant;

use host_vmm::function::{Function, FunctionKind};
use wasmtime::{Config, Engine, Instance, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::stats::{Percentiles, Phases};

/// Why the peer could not measure a function.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The function needs devices the peer does not give.
    #[error("--peer wasmtime: the peer runs functions without service connections")]
    Devices,
    /// The function's files could not be laid out on the host.
    #[error("--peer wasmtime: {what}: {error}")]
    Files {
        /// What was being done.
        what: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// The bundle is not valid.
    #[error(transparent)]
    Bundle(#[from] abi::bundle::BundleError),
    /// Wasmtime could not be set up.
    #[error("--peer wasmtime: {0}")]
    Setup(wasmtime::Error),
    /// Wasmtime could not compile the module.
    #[error("--peer wasmtime: compiling: {0}")]
    Compile(wasmtime::Error),
    /// A run failed.
    #[error("--peer wasmtime: run {run}: {why}")]
    Run {
        /// Which run, from 1.
        run: usize,
        /// Why.
        why: Box<PeerError>,
    },
    /// The store refused the fuel.
    #[error("{0}")]
    Fuel(wasmtime::Error),
    /// The module could not be instantiated.
    #[error("instantiating: {0}")]
    Instantiate(wasmtime::Error),
    /// An export failed or trapped.
    #[error("{name}: {error:#}")]
    Call {
        /// The export.
        name: &'static str,
        /// Why.
        error: wasmtime::Error,
    },
    /// An export failed, and the function said why on stderr.
    #[error("{why}; it wrote: {stderr}")]
    Said {
        /// How it failed.
        why: Box<PeerError>,
        /// The start of what it wrote to stderr.
        stderr: String,
    },
    /// The peer's answer differs from thaw's.
    #[error("--peer wasmtime: the peer answered {peer:?}, thaw answered {thaw:?}; they must do the same work")]
    Differs {
        /// The peer's answer.
        peer: String,
        /// Thaw's.
        thaw: String,
    },
}

/// The peer's name and version in reports.
pub const NAME: &str = "Wasmtime 50.0.1, in process";

/// The most output kept from one run, as thaw's guest keeps (16 MiB per stream).
const MAX_OUTPUT: usize = 16 << 20;

/// What a peer run holds: the function's WASI context and its memory limit.
struct Peer {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// Measures `function` serving `request` `runs` times with the peer, after checking that its
/// first answer equals `expected` (thaw's), so both measured the same work.
pub fn measure(
    function: &Function,
    request: &[u8],
    runs: usize,
    expected: &[u8],
) -> Result<Phases<Percentiles>, PeerError> {
    if !function.manifest.connections.is_empty() {
        return Err(PeerError::Devices);
    }
    let parsed = abi::bundle::parse(&function.bundle)?;
    let volume = unpack_volume(function)?;
    let mut config = Config::new();
    config.consume_fuel(function.manifest.fuel.is_some());
    let engine = Engine::new(&config).map_err(PeerError::Setup)?;
    let started = Instant::now();
    let module = Module::new(&engine, parsed.wasm).map_err(PeerError::Compile)?;
    let compile_us = started.elapsed().as_micros() as u64;
    let mut linker = Linker::<Peer>::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |peer| &mut peer.wasi).map_err(PeerError::Setup)?;
    let mut samples = Vec::with_capacity(runs);
    for run in 0..runs {
        let (phases, stdout) = serve(function, volume.as_ref(), &engine, &linker, &module, request)
            .map_err(|e| PeerError::Run { run: run + 1, why: Box::new(e) })?;
        if run == 0 && stdout != expected {
            return Err(PeerError::Differs {
                peer: String::from_utf8_lossy(&stdout).into_owned(),
                thaw: String::from_utf8_lossy(expected).into_owned(),
            });
        }
        samples.push(phases);
    }
    let mut phases = Phases::summarize(samples.iter());
    phases.compile_us = Percentiles::of(std::iter::once(compile_us));
    Ok(phases)
}

/// The function's data volume unpacked into a new temporary directory, if it has one.
fn unpack_volume(function: &Function) -> Result<Option<tempfile::TempDir>, PeerError> {
    let Some((offset, len)) = function.volume else { return Ok(None) };
    let files = |what: &str, error| PeerError::Files { what: what.to_string(), error };
    // `Function::parse` checked that the volume lies in the bundle and parses.
    let bytes = &function.bundle[offset as usize..(offset + len) as usize];
    let directory = abi::volume::parse(bytes).map_err(|e| files("the data volume", std::io::Error::other(e)))?;
    let root = tempfile::tempdir().map_err(|e| files("a directory for the data volume", e))?;
    for entry in &directory.entries {
        let path = root.path().join(&entry.path);
        let written = match entry.kind {
            abi::volume::EntryKind::Directory => std::fs::create_dir_all(&path),
            abi::volume::EntryKind::File => {
                std::fs::write(&path, &bytes[entry.offset as usize..(entry.offset + entry.size) as usize])
            }
        };
        written.map_err(|e| files(&format!("unpacking {}", entry.path), e))?;
    }
    Ok(Some(root))
}

/// One cold invocation: a new instance, its init, the request. Returns the phases and stdout.
fn serve(
    function: &Function,
    volume: Option<&tempfile::TempDir>,
    engine: &Engine,
    linker: &Linker<Peer>,
    module: &Module,
    request: &[u8],
) -> Result<(Phases<u64>, Vec<u8>), PeerError> {
    let manifest = &function.manifest;
    let stdout = MemoryOutputPipe::new(MAX_OUTPUT);
    let stderr = MemoryOutputPipe::new(MAX_OUTPUT);
    let env: Vec<(&str, &str)> = manifest.env.iter().filter_map(|entry| entry.split_once('=')).collect();
    // The manifest's arguments start with argv[0], the function's name, as the guest gives them.
    let args: Vec<&str> = manifest.args.iter().map(String::as_str).collect();
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdin(MemoryInputPipe::new(request.to_vec()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .args(&args)
        .envs(&env);
    let files = |what: &str, error| PeerError::Files { what: what.to_string(), error };
    let mut scratch = Vec::new();
    for dir in manifest.preopens() {
        let (host, perms) = match volume {
            // The volume, also where a scratch directory is mounted with it, as the guest
            // grafts it there (a Python function's, at /).
            Some(volume) if dir == manifest.data_mount => (volume.path().to_path_buf(), FsPerms::ReadWrite),
            _ => {
                let fresh = tempfile::tempdir().map_err(|e| files("a scratch directory", e))?;
                let path = fresh.path().to_path_buf();
                scratch.push(fresh);
                (path, FsPerms::ReadWrite)
            }
        };
        wasi.preopened_dir(&host, dir, perms)
            .map_err(|e| files(&format!("preopening {dir}"), std::io::Error::other(e.to_string())))?;
    }
    let wasi = wasi.build_p1();
    let limits = StoreLimitsBuilder::new().memory_size((manifest.memory_mib as usize) << 20).build();
    let mut store = Store::new(engine, Peer { wasi, limits });
    store.limiter(|peer| &mut peer.limits);
    if let Some(fuel) = manifest.fuel {
        store.set_fuel(fuel).map_err(PeerError::Fuel)?;
    }
    let mut phases = Phases::default();
    let started = Instant::now();
    let instance = linker.instantiate(&mut store, module).map_err(PeerError::Instantiate)?;
    phases.instantiate_us = Some(started.elapsed().as_micros() as u64);
    let started = Instant::now();
    let ran = (|| {
        match function.kind {
            FunctionKind::Reactor => {
                for name in ["_initialize", "init"] {
                    call(&mut store, &instance, name)?;
                }
                phases.init_us = Some(started.elapsed().as_micros() as u64);
                let started = Instant::now();
                call(&mut store, &instance, "handle")?;
                phases.handle_us = Some(started.elapsed().as_micros() as u64);
            }
            FunctionKind::Command => {
                call(&mut store, &instance, "_start")?;
                phases.handle_us = Some(started.elapsed().as_micros() as u64);
            }
        }
        Ok(())
    })();
    if let Err(why) = ran {
        let stderr = host_vmm::capture::first_lines(&stderr.contents());
        return Err(if stderr.is_empty() { why } else { PeerError::Said { why: Box::new(why), stderr } });
    }
    drop(store);
    Ok((phases, stdout.contents().to_vec()))
}

/// Calls the export `name`, if the module has it; `proc_exit(0)` counts as returning.
fn call(store: &mut Store<Peer>, instance: &Instance, name: &'static str) -> Result<(), PeerError> {
    let Some(func) = instance.get_func(&mut *store, name) else {
        return Ok(());
    };
    let func = func.typed::<(), ()>(&*store).map_err(|error| PeerError::Call { name, error })?;
    match func.call(&mut *store, ()) {
        Ok(()) => Ok(()),
        Err(error) => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(wasmtime_wasi::I32Exit(0)) => Ok(()),
            _ => Err(PeerError::Call { name, error }),
        },
    }
}
