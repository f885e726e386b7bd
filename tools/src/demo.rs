//! `thaw demo`: the whole idea in one command. Packs the examples, then for hello and heavy-init
//! shows side by side a cold invocation (boot, compile, init, handle), a fresh VM restored from
//! the snapshot on the request path, a VM parked ahead in a pool, and a kept VM reset after each
//! request, and reports the memory each restored instance owns.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use host_vmm::{BootTimings, Function, Image, Instance, Outcome, Pool, Role, RunReport, VmConfig};

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

/// Runs `runs` VMs with `one` and returns the p50 restore-to-response time and the largest
/// private memory seen.
fn measure(runs: usize, mut one: impl FnMut() -> Result<RunReport, String>) -> Result<(Duration, u64), String> {
    let mut times = Vec::with_capacity(runs);
    let mut private = 0;
    for _ in 0..runs {
        let report = one()?;
        if !matches!(report.outcome, Outcome::Exited(0) | Outcome::Answered) || report.responses.is_empty() {
            return Err(format!("a demo VM failed: {}", report.outcome));
        }
        times.push(report.timings.to_response.unwrap_or_default());
        private = private.max(report.private_memory.unwrap_or(0));
    }
    Ok((p50(times), private))
}

/// Serves `runs` requests with `one` (which returns how long the request waited for its answer,
/// or why it did not answer cleanly) and returns the p50.
fn serve(runs: usize, mut one: impl FnMut() -> Result<Duration, String>) -> Result<Duration, String> {
    (0..runs).map(|_| one()).collect::<Result<Vec<_>, _>>().map(p50)
}

/// The time `served` waited for its answer, if the function answered cleanly.
fn answered(served: &host_vmm::Served) -> Result<Duration, String> {
    if served.is_ok() { Ok(served.to_response) } else { Err(format!("a demo VM failed: {}", served.outcome)) }
}

/// Parks `instance` (after its restore or reset).
fn park(instance: &mut Instance) -> Result<(), String> {
    match instance.park(&mut std::io::sink()).map_err(|e| e.to_string())?.0 {
        Outcome::Parked => Ok(()),
        outcome => Err(format!("a demo VM ended before its request: {outcome}")),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `thaw demo` and returns the process exit code.
pub fn run(args: &DemoArgs) -> Result<u8, String> {
    let temp = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let kernel = crate::kernel::built_in()?;
    for name in crate::pack::EXAMPLE_NAMES {
        let bundle = crate::pack::example_bundle(name, 16)?;
        crate::pack::write_atomically(&dir.join(format!("{name}.thaw")), &bundle)?;
        eprintln!("thaw demo: packed {name} ({} KiB)", bundle.len() / 1024);
    }
    let mut rows = Vec::new();
    for name in ["hello", "heavy-init"] {
        let bundle_path = dir.join(format!("{name}.thaw"));
        let function = Function::from_bundle(std::fs::read(&bundle_path).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{name}: {e}"))?;
        let base = VmConfig { measure_memory: true, ..VmConfig::default() };
        let config = function.boot_config(base, Duration::from_secs(60), vec![request(name).to_vec()]);
        let cold_runs = (args.runs / 5).max(3);
        eprintln!("thaw demo: {name}: {cold_runs} cold invocations");
        let (cold, _) = measure(cold_runs, || {
            host_vmm::run_kernel(kernel, &config, &mut std::io::sink()).map_err(|e| e.to_string())
        })?;
        let image_path = dir.join(format!("{name}.snap"));
        let (status, _) = crate::snapshot::snapshot_function(
            &function,
            &image_path,
            Duration::from_secs(60),
            VmConfig::default(),
            Some(request(name).to_vec()),
        )?;
        eprintln!("thaw demo: {name}: {status}");
        let image = Arc::new(Image::open(&image_path).map_err(|e| e.to_string())?);
        let fresh = |image: &Arc<Image>| {
            host_vmm::serve_fresh(image, &config, request(name).to_vec(), &mut std::io::sink())
                .map(|(_, report)| report)
                .map_err(|e| e.to_string())
        };
        eprintln!("thaw demo: {name}: {} fresh VMs restored on the request path", args.runs);
        let (fresh_p50, private) = measure(args.runs, || fresh(&image))?;
        eprintln!("thaw demo: {name}: {} requests to VMs parked in a pool of 2", args.runs);
        let pool = Pool::start(Arc::clone(&image), config.clone(), 2).map_err(|e| e.to_string())?;
        let mut pooled_private = 0;
        let pooled = serve(args.runs, || {
            // Paced below the filler's rate, so each request finds a VM ready, as on a node
            // whose traffic the pool is sized for.
            std::thread::sleep(Duration::from_millis(4));
            let mut instance = pool.take(config.timeout).map_err(|e| e.to_string())?;
            let served = instance.serve(request(name).to_vec(), &mut std::io::sink()).map_err(|e| e.to_string())?;
            pooled_private = pooled_private.max(instance.vm().private_memory().map_err(|e| e.to_string())?);
            pool.discard(instance);
            answered(&served)
        })?;
        drop(pool);
        eprintln!("thaw demo: {name}: {} requests to one kept VM, reset after each", args.runs);
        let mut kept =
            Instance::restore(&image, &config, Role::Kept, &mut BootTimings::default()).map_err(|e| e.to_string())?;
        park(&mut kept)?;
        let reset = serve(args.runs, || {
            let served = kept.serve(request(name).to_vec(), &mut std::io::sink()).map_err(|e| e.to_string())?;
            kept.reset().map_err(|e| e.to_string())?;
            answered(&served)
        })?;
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
