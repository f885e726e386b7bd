//! `thaw demo`: the whole idea in one command. Packs the examples, then for hello and heavy-init
//! shows side by side a cold invocation (boot, compile, init, handle), a fresh VM restored from
//! the snapshot on the request path, a VM parked ahead in a pool, and a kept VM reset after each
//! request, and reports the memory each restored instance owns.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use host_vmm::{Image, Lanes, Mode, Outcome, RunReport, VmConfig, VmmError};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No temporary directory.
    #[error("creating a temporary directory: {0}")]
    TempDir(std::io::Error),
    /// `--keep`'s directory could not be made.
    #[error("{}: {source}", dir.display())]
    Keep {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A VM did not answer cleanly.
    #[error("a demo VM failed: {0}")]
    Failed(Outcome),
    /// The built-in kernel.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// Packing an example.
    #[error(transparent)]
    Pack(#[from] crate::pack::PackError),
    /// A file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// Reading a bundle back.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// Snapshotting.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Opening an image.
    #[error(transparent)]
    Image(#[from] host_vmm::snapshot::SnapshotError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The table could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Arguments of `thaw demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Requests per mode and function (cold invocations: a fifth of this, at least 3).
    #[arg(long, value_name = "N", default_value_t = 50)]
    runs: usize,
    /// Keep the packed bundles and images in this directory [default: a temporary one].
    #[arg(long, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
}

/// The request each demo function gets.
fn request(name: &str) -> &'static [u8] {
    match name {
        "heavy-init" => b"1000",
        _ => br#"{"name": "demo"}"#,
    }
}

fn p50(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values.get(values.len().saturating_sub(1) / 2).copied().unwrap_or_default()
}

/// Boots `runs` cold VMs with `one` and returns the p50 time to response.
fn cold(runs: usize, mut one: impl FnMut() -> Result<RunReport, VmmError>) -> Result<Duration, DemoError> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let report = one()?;
        if !matches!(report.outcome, Outcome::Exited(0) | Outcome::Answered) || report.responses.is_empty() {
            return Err(DemoError::Failed(report.outcome));
        }
        times.push(report.timings.to_response.unwrap_or_default());
    }
    Ok(p50(times))
}

/// Serves `runs` requests of `name` from `image` in `mode`, and returns the p50 time to
/// response and the largest private memory of a VM that served (not measured in reset mode,
/// whose one VM is reused).
fn restored(
    image: &Arc<Image>,
    config: &VmConfig,
    mode: Mode,
    name: &str,
    runs: usize,
) -> Result<(Duration, u64), DemoError> {
    const POOL: usize = 2;
    let lanes = Lanes::start(Arc::clone(image), config.clone(), mode, POOL)?;
    lanes.fill(POOL, config.timeout)?;
    let mut lane = lanes.lane();
    lane.ready()?;
    let (mut times, mut private) = (Vec::with_capacity(runs), 0);
    for _ in 0..runs {
        if mode == Mode::Pool {
            // Paced below the filler's rate, so each request finds a VM ready, as on a node
            // whose traffic the pool is sized for.
            std::thread::sleep(Duration::from_millis(4));
        }
        let served = lane.serve(request(name).to_vec(), &mut std::io::sink())?;
        if !served.is_ok() {
            return Err(DemoError::Failed(served.outcome));
        }
        times.push(served.timings.to_response);
        if mode != Mode::Reset
            && let Some(used) = lane.used()
        {
            private = private.max(used.vm().private_memory()?);
        }
        lane.put_back()?;
    }
    Ok((p50(times), private))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `thaw demo` and returns the process exit code.
pub fn run(args: &DemoArgs) -> Result<u8, DemoError> {
    let temp = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| DemoError::Keep { dir: dir.clone(), source })?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let kernel = crate::kernel::built_in()?;
    let cache = crate::code::CodeCache::user();
    for name in crate::pack::EXAMPLE_NAMES {
        let bundle = crate::pack::example_bundle(name, 16, &cache)?;
        crate::files::write_atomically(&dir.join(format!("{name}.thaw")), &bundle)?;
        eprintln!("thaw demo: packed {name} ({} KiB)", bundle.len() / 1024);
    }
    let mut rows = Vec::new();
    for name in ["hello", "heavy-init"] {
        let bundle_path = dir.join(format!("{name}.thaw"));
        let function = crate::invoke::load_function(&bundle_path, crate::files::READ_WITHIN)?;
        let base = VmConfig { measure_memory: true, ..VmConfig::default() };
        let config = function.boot_config(base, Duration::from_secs(60), vec![request(name).to_vec()]);
        let cold_runs = (args.runs / 5).max(3);
        eprintln!("thaw demo: {name}: {cold_runs} cold invocations");
        let cold = cold(cold_runs, || host_vmm::run_kernel(kernel, &config, &mut std::io::sink()))?;
        let image_path = dir.join(format!("{name}.snap"));
        let (status, _) = crate::snapshot::snapshot_function(
            &function,
            &image_path,
            Duration::from_secs(60),
            VmConfig::default(),
            Some(request(name).to_vec()),
        )?;
        eprintln!("thaw demo: {name}: {status}");
        let image = Arc::new(Image::open(&image_path)?);
        eprintln!("thaw demo: {name}: {} fresh VMs restored on the request path", args.runs);
        let (fresh_p50, private) = restored(&image, &config, Mode::Fresh, name, args.runs)?;
        eprintln!("thaw demo: {name}: {} requests to VMs parked in a pool of 2", args.runs);
        let (pooled, pooled_private) = restored(&image, &config, Mode::Pool, name, args.runs)?;
        eprintln!("thaw demo: {name}: {} requests to one kept VM, reset after each", args.runs);
        let (reset, _) = restored(&image, &config, Mode::Reset, name, args.runs)?;
        rows.push((name, cold, fresh_p50, pooled, reset, private, pooled_private));
    }
    outln!()?;
    outln!("request to response, p50 ({} requests each; cold: a fifth as many)", args.runs)?;
    outln!(
        "{:<12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>26}",
        "function",
        "cold boot",
        "fresh VM",
        "pool",
        "reset",
        "speed-up",
        "private mem: fresh / pool"
    )?;
    for (name, cold, fresh, pooled, reset, private, pooled_private) in rows {
        let speedup = cold.as_secs_f64() / reset.as_secs_f64().max(1e-9);
        outln!(
            "{name:<12} {:>12} {:>12} {:>12} {:>12} {:>8.0}x {:>22} KiB",
            ms(cold),
            ms(fresh),
            ms(pooled),
            ms(reset),
            speedup,
            format!("{} / {}", private / 1024, pooled_private / 1024)
        )?;
    }
    outln!("speed-up: cold boot against reset; pool and reset serve VMs restored before the request")?;
    if args.keep.is_some() {
        outln!("\nbundles and images kept in {}", dir.display())?;
    }
    Ok(0)
}
