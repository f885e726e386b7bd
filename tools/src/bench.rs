//! `thaw bench`: boot many fresh VMs under KVM and report per-phase percentiles, for the kernel
//! alone or serving one request to a function bundle each time (the cold path), or serve from a
//! snapshot image in one of `thaw restore`'s modes. `--floor` measures the floor in the same run
//! (`host_vmm::floor`), and every result is then also given as a multiple of it.
//!
//! A measurement, not a test: it fails only when a run does not end cleanly. Output from the
//! guest is discarded. Numbers go in docs/BENCHMARKS.md together with the command that produced
//! them.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use host_vmm::{Mode, Outcome, RunReport, VmConfig};

use crate::KernelArgs;
use crate::invoke::OptionalFunctionArgs;
use crate::stats::{BatchStats, Floor, Measured, RequestStats, Status};

/// Why a benchmark could not run, or a run did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `--runs 0`.
    #[error("--runs 0: need at least one run")]
    NoRuns,
    /// `--peer` in a thaw built without the `peer` feature.
    #[error(
        "--peer: this thaw was built without the peer; build it with `--features peer` (for example `cargo install --locked --path tools --features peer`)"
    )]
    NoPeer,
    /// `--kernel` or `--memory` with an image.
    #[error("--kernel and --memory apply to cold boots; {} is a snapshot image, which keeps the kernel and memory it was taken with", .0.display())]
    BootOptionsOnImage(PathBuf),
    /// `--mode` with a bundle.
    #[error("--mode serves a snapshot image; {} is not one", .0.display())]
    ModeOnBundle(PathBuf),
    /// `--peer` with an image.
    #[error("--peer measures cold invocations of a bundle; {} is a snapshot image", .0.display())]
    PeerOnImage(PathBuf),
    /// A run did not end cleanly.
    #[error("run {run}: {why}")]
    Unclean {
        /// Which run, from 1.
        run: usize,
        /// How it ended.
        why: String,
    },
    /// The kernel or the timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// A device option.
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    /// The function or its request.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// Serving from an image.
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] host_vmm::VmmError),
    /// The peer.
    #[cfg(feature = "peer")]
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    /// The stats.
    #[error(transparent)]
    Stats(#[from] crate::stats::StatsError),
    /// The report could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Arguments of `thaw bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    function: OptionalFunctionArgs,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Guest memory in MiB [default: 64, or what the function needs].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Number of VMs (or, with --mode, requests) to measure.
    #[arg(long, value_name = "N", default_value_t = 200)]
    runs: usize,
    /// Serve a snapshot image in this mode, as `thaw restore --mode` does [default: fresh].
    #[arg(long, value_parser = crate::restore::mode_parser(), value_name = "MODE", requires = "function")]
    mode: Option<Mode>,
    /// With --mode pool: how many VMs wait parked.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pool: usize,
    /// With --mode: issue requests at this many per second, as `thaw restore --rate` does
    /// [default: each as soon as the last has answered].
    #[arg(long, value_name = "PER_SEC", requires = "mode")]
    rate: Option<f64>,
    /// Measure the floor first (thaw's minimal guest: a fresh VM restored to its first exit, and
    /// a kept VM reset by its dirty log to its first exit) and give every result as a multiple
    /// of it. Alone, measures only the floor.
    #[arg(long)]
    floor: bool,
    /// Also run the function PEER's way, in this process, as many times, and set thaw's phases
    /// against it (cold invocations of a bundle only). wasmtime: Wasmtime with Cranelift and
    /// WASI preview 1, as its own users run a module (in a thaw built with `--features peer`).
    #[arg(long, value_enum, value_name = "PEER", requires = "function", conflicts_with = "mode")]
    peer: Option<Peer>,
    /// Print the results as one JSON object on stdout instead of text (docs/API.md, "Stats").
    #[arg(long)]
    json: bool,
}

/// A runtime `--peer` measures thaw against.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Peer {
    /// Wasmtime (Cranelift, WASI preview 1) in this process.
    Wasmtime,
}

/// Runs `thaw bench` and returns the process exit code.
pub fn run(args: &BenchArgs) -> Result<u8, BenchError> {
    if args.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    if args.peer.is_some() && !cfg!(feature = "peer") {
        return Err(BenchError::NoPeer);
    }
    let floor = if args.floor { Some(Floor::measure(args.runs)?) } else { None };
    let Some(path) = &args.function.function else {
        return match floor {
            Some(floor) => floor_only(args, &floor),
            None => boot_batch(args, None, None),
        };
    };
    let is_image = crate::invoke::file_magic(path)? == abi::image::MAGIC;
    if is_image && (args.kernel.kernel.is_some() || args.memory.is_some()) {
        return Err(BenchError::BootOptionsOnImage(path.clone()));
    }
    if !is_image {
        if args.mode.is_some() {
            return Err(BenchError::ModeOnBundle(path.clone()));
        }
        return boot_batch(args, args.function.load(crate::kernel::timeout(&args.kernel)?)?, floor);
    }
    if args.peer.is_some() {
        return Err(BenchError::PeerOnImage(path.clone()));
    }
    let restore = crate::restore::RestoreArgs::for_bench(
        path.clone(),
        (args.function.data.clone(), args.function.input.clone()),
        (args.mode.unwrap_or(Mode::Fresh), args.pool),
        args.runs,
        args.kernel.timeout,
        args.rate,
        args.json,
    );
    Ok(crate::restore::serve_batch(&restore, floor)?)
}

/// With --floor alone: the floor.
fn floor_only(args: &BenchArgs, floor: &Floor) -> Result<u8, BenchError> {
    if args.json {
        let mut stats = BatchStats::new("floor", None, args.runs);
        stats.floor = Some(floor.stats.clone());
        crate::stats::print_json(&stats)?;
    } else {
        out!("{}", floor.table())?;
    }
    Ok(0)
}

/// Cold boots: of the kernel alone, or serving one request to `function` each.
fn boot_batch(
    args: &BenchArgs,
    function: Option<crate::invoke::FunctionRequest>,
    floor: Option<Floor>,
) -> Result<u8, BenchError> {
    let kernel = crate::kernel::load(&args.kernel)?;
    let (function, request) = match function {
        Some(f) => (Some(f.function), Some(f.request)),
        None => (None, None),
    };
    let mut config = VmConfig {
        memory_mib: args.memory.unwrap_or(function.as_ref().map_or(64, |f| f.vm_memory_mib())),
        timeout: crate::kernel::timeout(&args.kernel)?,
        ramdisk: function.as_ref().map(|f| f.ramdisk().to_vec()),
        requests: request.into_iter().collect(),
        ..VmConfig::default()
    };
    if let (Some(function), Some(path)) = (&function, &args.function.function) {
        crate::devices::add_function_devices(&mut config, function, path)?;
    }
    let name = function.as_ref().map(|f| f.manifest.name.clone());
    let (mode, what, vs) = match &name {
        Some(name) => ("cold", format!("cold invocations of {name}"), "cold invocation"),
        None => ("kernel", "kernel boots".to_string(), "kernel boot"),
    };
    let mut stats = BatchStats::new(mode, name, args.runs);
    let answer = measure(&mut stats, || host_vmm::run_kernel(&kernel.image, &config, &mut std::io::sink()))?;
    if let (Some(Peer::Wasmtime), Some(function)) = (args.peer, &function) {
        let request = config.requests.first().map_or(&[][..], |r| &r[..]);
        stats.peer = Some(peer(function, request, args.runs, &answer)?);
    }
    let heading = format!("{} {what}, {} MiB guest memory; times in microseconds", args.runs, config.memory_mib);
    report(args, stats, floor, &heading, vs)
}

/// Runs `function` with the peer as many times, checking it answers `answer` as thaw did.
#[cfg(feature = "peer")]
fn peer(
    function: &host_vmm::Function,
    request: &[u8],
    runs: usize,
    answer: &[u8],
) -> Result<crate::stats::PeerStats, BenchError> {
    eprintln!("thaw: bench: the same {runs} runs with {}", crate::peer::NAME);
    let phases = crate::peer::measure(function, request, runs, answer)?;
    Ok(crate::stats::PeerStats { name: crate::peer::NAME.into(), phases })
}

/// Without the `peer` feature there is no peer to run (`run` refuses `--peer` up front).
#[cfg(not(feature = "peer"))]
fn peer(_: &host_vmm::Function, _: &[u8], _: usize, _: &[u8]) -> Result<crate::stats::PeerStats, BenchError> {
    Err(BenchError::NoPeer)
}

/// Prints `stats` (after `heading`, as text) with its total as a multiple of `floor`.
fn report(
    args: &BenchArgs,
    mut stats: BatchStats,
    floor: Option<Floor>,
    heading: &str,
    what: &str,
) -> Result<u8, BenchError> {
    if let (Some(floor), Some(total)) = (&floor, stats.phases.total_us) {
        stats.floor = Some(floor.stats.versus(total, false));
    }
    if args.json {
        crate::stats::print_json(&stats)?;
        return Ok(0);
    }
    if let Some(floor) = &floor {
        out!("{}", floor.table())?;
    }
    outln!("{heading}")?;
    out!("{}", stats.table())?;
    if let Some(line) = stats.floor.as_ref().and_then(|f| f.describe(what)) {
        outln!("{line}")?;
    }
    if let Some(peer) = &stats.peer {
        out!("{}", peer.versus(&stats.phases))?;
    }
    Ok(0)
}

/// Boots `stats.count` VMs with `one`, requiring each to end cleanly with clean answers, and
/// sets `stats` to what they measured. Returns the first run's first response (empty without
/// one).
fn measure(
    stats: &mut BatchStats,
    mut one: impl FnMut() -> Result<RunReport, host_vmm::VmmError>,
) -> Result<Vec<u8>, BenchError> {
    let mut first = None;
    let runs = stats.count;
    let mut samples = Vec::with_capacity(runs);
    let mut err = std::io::stderr().lock();
    let started = Instant::now();
    for i in 0..runs {
        let report = one()?;
        if !matches!(report.outcome, Outcome::Exited(0) | Outcome::Answered) {
            return Err(BenchError::Unclean { run: i + 1, why: report.outcome.to_string() });
        }
        if let Some(response) = report.responses.iter().find(|r| !r.status.is_clean()) {
            let why = RequestStats::new(&report.outcome, Some(response)).error.unwrap_or_default();
            return Err(BenchError::Unclean { run: i + 1, why });
        }
        if first.is_none() {
            first = Some(report.responses.first().map(|r| r.stdout.clone()).unwrap_or_default());
        }
        samples.push(Measured::of_run(&report));
        if (i + 1) % 50 == 0 || i + 1 == runs {
            let _ = write!(err, "\rthaw: bench: {}/{runs} VMs", i + 1);
        }
    }
    let _ = writeln!(err);
    let wall = started.elapsed();
    stats.wall_ms = wall.as_millis() as u64;
    stats.requests_per_s = (runs as f64 / wall.as_secs_f64().max(1e-9)).round() as u64;
    stats.statuses.insert(Status::Ok, runs);
    stats.summarize(&samples);
    Ok(first.unwrap_or_default())
}
