//! `thaw bench`: boot many fresh VMs under KVM and report per-phase percentiles, for the kernel
//! alone or serving one request to a function bundle each time (the cold path), or serve from a
//! snapshot image in one of `thaw restore`'s modes. `--floor` measures the floor in the same run
//! (`host_vmm::floor`), and every result is then also given as a multiple of it.
//!
//! A measurement, not a test: it fails only when a run does not end cleanly. Output from the
//! guest is discarded. Numbers go in docs/BENCHMARKS.md together with the command that produced
//! them.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use host_vmm::{FunctionStatus, Outcome, RunReport, VmConfig};

use crate::KernelArgs;
use crate::invoke::OptionalFunctionArgs;

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
    /// Serve a snapshot image in this mode, as `thaw restore --mode` does [default: fresh VMs,
    /// reported phase by phase].
    #[arg(long, value_enum, value_name = "MODE", requires = "function")]
    mode: Option<crate::restore::Mode>,
    /// With --mode pool: how many VMs wait parked.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pool: usize,
    /// With --mode: issue requests at this many per second, as `thaw restore --rate` does (a
    /// pool only helps below its fill rate) [default: each as soon as the last has answered].
    #[arg(long, value_name = "PER_SEC", requires = "mode")]
    rate: Option<f64>,
    /// Measure the floor first (thaw's minimal guest: a fresh VM restored to its first exit, and
    /// a kept VM reset by its dirty log to its first exit) and give every result as a multiple
    /// of it. Alone, measures only the floor.
    #[arg(long)]
    floor: bool,
}

/// The floor's percentiles, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct FloorSummary {
    /// Fresh VM to first exit: p50, p99.
    pub fresh: (u128, u128),
    /// Kept VM reset to first exit: p50, p99.
    pub kept: (u128, u128),
}

impl FloorSummary {
    /// Prints `what`'s p50 and p99 as multiples of the fresh (`kept` false) or kept floor.
    pub fn print_ratio(&self, what: &str, (p50, p99): (u128, u128), kept: bool) {
        let (name, (f50, f99)) = if kept { ("kept-VM", self.kept) } else { ("fresh-VM", self.fresh) };
        let ratio = |x: u128, f: u128| x as f64 / f.max(1) as f64;
        println!(
            "{what}: {:.2}x the {name} floor at p50 ({p50} against {f50} µs), {:.2}x at p99 ({p99} against {f99} µs)",
            ratio(p50, f50),
            ratio(p99, f99)
        );
    }
}

/// Measures the floor `runs` times and prints it.
pub fn floor(runs: usize) -> Result<FloorSummary, String> {
    eprintln!("thaw: bench: measuring the floor ({runs} fresh and {runs} kept runs)");
    let floor = host_vmm::floor::measure(runs).map_err(|e| format!("measuring the floor: {e}"))?;
    let mut summary = FloorSummary { fresh: (0, 0), kept: (0, 0) };
    println!("floor: thaw's minimal guest (4 MiB, one ring-3 store), {runs} runs each; times in microseconds");
    println!("{:<36} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p90", "p99", "max");
    for (name, times, slot) in [
        ("fresh VM restored to its first exit", &floor.fresh, &mut summary.fresh),
        ("kept VM reset by dirty log to exit", &floor.kept, &mut summary.kept),
    ] {
        let mut us: Vec<u128> = times.iter().map(Duration::as_micros).collect();
        us.sort_unstable();
        let max = us.last().copied().unwrap_or(0);
        println!(
            "{name:<36} {:>8} {:>8} {:>8} {max:>8}",
            percentile(&us, 50),
            percentile(&us, 90),
            percentile(&us, 99)
        );
        *slot = (percentile(&us, 50), percentile(&us, 99));
    }
    Ok(summary)
}

/// The `p`th percentile (0-100) of sorted `values`, nearest-rank.
fn percentile(sorted: &[u128], p: usize) -> u128 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn us(d: Option<Duration>) -> Option<u128> {
    d.map(|d| d.as_micros())
}

/// How to read one row from a run.
type Reader = fn(&RunReport) -> Option<u128>;

/// The rows measured, and how to read each from a run.
fn rows(serving: bool) -> Vec<(&'static str, Reader)> {
    let mut rows: Vec<(&'static str, Reader)> = vec![
        ("vm create", |r| us(Some(r.timings.vm_create))),
        ("load", |r| us(Some(r.timings.load))),
        ("vcpu setup", |r| us(Some(r.timings.vcpu_setup))),
        ("ring-0 early boot", |r| us(r.timings.ring0_boot)),
        ("ring 3 to ready", |r| us(r.timings.ring3_to_ready)),
    ];
    if serving {
        rows.extend([
            ("compile", (|r| us(r.timings.compile)) as Reader),
            ("instantiate", |r| us(r.timings.instantiate)),
            ("init", |r| us(r.timings.init)),
            ("handle", |r| us(r.responses.first().map(|x| x.handle_time))),
        ]);
    }
    rows.extend([("total", (|r| us(Some(r.timings.total))) as Reader), ("vm exits", |r| Some(u128::from(r.exits)))]);
    rows
}

/// Rows of a restore: what replaces boot, compile and init.
fn restore_rows() -> Vec<(&'static str, Reader)> {
    vec![
        ("memory map", |r| us(Some(r.timings.load))),
        ("vm create", |r| us(Some(r.timings.vm_create))),
        ("vcpu create", |r| us(Some(r.timings.vcpu_setup))),
        ("state set", |r| us(r.timings.state_set)),
        ("resume to request", |r| us(r.timings.to_first_request)),
        ("handle", |r| us(r.responses.first().map(|x| x.handle_time))),
        ("total", |r| us(Some(r.timings.total))),
        ("vm exits", |r| Some(u128::from(r.exits))),
    ]
}

/// Runs `thaw bench` and returns the process exit code.
pub fn run(args: &BenchArgs) -> Result<u8, String> {
    if args.runs == 0 {
        return Err("--runs 0: need at least one run".into());
    }
    let floor = if args.floor { Some(floor(args.runs)?) } else { None };
    if floor.is_some() && args.function.function.is_none() {
        return Ok(0);
    }
    if let (Some(mode), Some(path)) = (args.mode, &args.function.function) {
        if crate::invoke::file_magic(path)? != abi::image::MAGIC {
            return Err(format!("--mode serves a snapshot image; {} is not one", path.display()));
        }
        let restore = crate::restore::RestoreArgs::for_bench(
            path.clone(),
            (args.function.data.clone(), args.function.input.clone()),
            mode,
            args.pool,
            args.runs,
            args.kernel.timeout,
            args.rate,
        );
        return crate::restore::serve_batch(&restore, floor);
    }
    if let Some(path) = &args.function.function
        && crate::invoke::file_magic(path)? == abi::image::MAGIC
    {
        let image = std::sync::Arc::new(host_vmm::Image::open(path).map_err(|e| e.to_string())?);
        let request = crate::invoke::request_body(args.function.data.as_ref(), args.function.input.as_ref())?;
        let config = VmConfig { timeout: crate::kernel::timeout(&args.kernel)?, ..VmConfig::default() };
        let what = format!("restores of {}", image.info.guest.function_name);
        let memory_mib = image.info.guest_memory_size() >> 20;
        let total = measure(args.runs, &what, memory_mib, &restore_rows(), || {
            host_vmm::serve_fresh(&image, &config, request.clone(), &mut std::io::sink()).map(|(_, report)| report)
        })?;
        if let Some(floor) = floor {
            floor.print_ratio("restore to response", total, false);
        }
        return Ok(0);
    }
    let kernel = crate::kernel::load(&args.kernel)?;
    let (function, request) = match args.function.load()? {
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
        crate::devices::add_function_devices(&mut config, function, path);
    }
    let what =
        function.as_ref().map_or("kernel boots".to_string(), |f| format!("cold invocations of {}", f.manifest.name));
    let total = measure(args.runs, &what, config.memory_mib, &rows(function.is_some()), || {
        host_vmm::run_kernel(&kernel.image, &config, &mut std::io::sink())
    })?;
    if let Some(floor) = floor {
        floor.print_ratio(if function.is_some() { "cold invocation" } else { "kernel boot" }, total, false);
    }
    Ok(0)
}

/// Runs `runs` VMs with `one`, requiring each to end cleanly with clean answers, and prints the
/// percentiles of `rows`. Returns the p50 and p99 of the `total` row.
fn measure(
    runs: usize,
    what: &str,
    memory_mib: u64,
    rows: &[(&'static str, Reader)],
    mut one: impl FnMut() -> Result<RunReport, host_vmm::VmmError>,
) -> Result<(u128, u128), String> {
    let mut samples: Vec<Vec<u128>> = vec![Vec::with_capacity(runs); rows.len()];
    let mut err = std::io::stderr().lock();
    for i in 0..runs {
        let report = one().map_err(|e| e.to_string())?;
        if !matches!(report.outcome, Outcome::Exited(0) | Outcome::Answered) {
            return Err(format!("run {}: {}", i + 1, report.outcome));
        }
        if report.responses.iter().any(|r| r.status != FunctionStatus::Ok) {
            return Err(format!("run {}: the function did not answer cleanly", i + 1));
        }
        for ((name, read), column) in rows.iter().zip(samples.iter_mut()) {
            column.push(read(&report).ok_or_else(|| format!("run {}: no {name} measurement", i + 1))?);
        }
        if (i + 1) % 50 == 0 || i + 1 == runs {
            let _ = write!(err, "\rthaw: bench: {}/{runs} VMs", i + 1);
        }
    }
    let _ = writeln!(err);
    println!("{runs} {what}, {memory_mib} MiB guest memory; times in microseconds");
    println!("{:<20} {:>8} {:>8} {:>8} {:>8}", "phase", "p50", "p90", "p99", "max");
    for ((name, _), column) in rows.iter().zip(samples.iter_mut()) {
        column.sort_unstable();
        let max = column.last().copied().unwrap_or(0);
        println!(
            "{name:<20} {:>8} {:>8} {:>8} {max:>8}",
            percentile(column, 50),
            percentile(column, 90),
            percentile(column, 99)
        );
    }
    let total = rows.iter().zip(&samples).find(|((name, _), _)| *name == "total").map(|(_, c)| c);
    Ok(total.map_or((0, 0), |c| (percentile(c, 50), percentile(c, 99))))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u128> = (1..=100).collect();
        assert_eq!(
            (percentile(&v, 50), percentile(&v, 90), percentile(&v, 99), percentile(&v, 100)),
            (50, 90, 99, 100)
        );
        assert_eq!(percentile(&[7], 50), 7);
    }
}
