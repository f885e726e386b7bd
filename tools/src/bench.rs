//! `thaw bench`: boot many fresh VMs under KVM and report per-phase percentiles, for the kernel
//! alone or serving one request to a function bundle each time (the cold path).
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
    /// Number of VMs to measure.
    #[arg(long, value_name = "N", default_value_t = 200)]
    runs: usize,
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
    if let Some(path) = &args.function.function
        && crate::invoke::file_magic(path)? == abi::image::MAGIC
    {
        let image = std::sync::Arc::new(host_vmm::Image::open(path).map_err(|e| e.to_string())?);
        let request = crate::invoke::request_body(args.function.data.as_ref(), args.function.input.as_ref())?;
        let config = VmConfig { timeout: crate::kernel::timeout(&args.kernel)?, ..VmConfig::default() };
        let what = format!("restores of {}", image.info.guest.function_name);
        let memory_mib = image.info.guest_memory_size() >> 20;
        return measure(args.runs, &what, memory_mib, &restore_rows(), || {
            host_vmm::serve_fresh(&image, &config, request.clone(), &mut std::io::sink()).map(|(_, report)| report)
        });
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
    measure(args.runs, &what, config.memory_mib, &rows(function.is_some()), || {
        host_vmm::run_kernel(&kernel.image, &config, &mut std::io::sink())
    })
}

/// Runs `runs` VMs with `one`, requiring each to end cleanly with clean answers, and prints the
/// percentiles of `rows`.
fn measure(
    runs: usize,
    what: &str,
    memory_mib: u64,
    rows: &[(&'static str, Reader)],
    mut one: impl FnMut() -> Result<RunReport, host_vmm::VmmError>,
) -> Result<u8, String> {
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
    Ok(0)
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
