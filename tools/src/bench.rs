//! `thaw bench`: boot a kernel many times under KVM and report per-phase percentiles.
//!
//! A measurement, not a test: it fails only when a boot does not exit 0. The guest's output is
//! discarded. Numbers go in docs/BENCHMARKS.md together with the command that produced them.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use host_vmm::{Outcome, VmConfig};

use crate::KernelArgs;

/// Arguments of `thaw bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    memory: u64,
    /// Number of boots to measure.
    #[arg(long, value_name = "N", default_value_t = 200)]
    runs: usize,
}

/// The `p`th percentile (0-100) of sorted `values`, nearest-rank.
fn percentile(sorted: &[u128], p: usize) -> u128 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Runs `thaw bench` and returns the process exit code.
pub fn run(args: &BenchArgs) -> Result<u8, String> {
    if args.runs == 0 {
        return Err("--runs 0: need at least one run".into());
    }
    let kernel = crate::kernel::load(&args.kernel)?;
    let config = VmConfig {
        memory_mib: args.memory,
        timeout: crate::kernel::timeout(&args.kernel)?,
        ramdisk: None,
        requests: Vec::new(),
    };
    let rows = ["vm create", "load", "vcpu setup", "ring-0 early boot", "ring 3 to ready", "total", "vm exits"];
    let mut samples: Vec<Vec<u128>> = vec![Vec::with_capacity(args.runs); rows.len()];
    let mut err = std::io::stderr().lock();
    for i in 0..args.runs {
        let report = host_vmm::run_kernel(&kernel.image, &config, &mut std::io::sink()).map_err(|e| e.to_string())?;
        if !matches!(report.outcome, Outcome::Exited(0)) {
            return Err(format!("run {}: {}", i + 1, report.outcome));
        }
        let t = &report.timings;
        let us = |d: Option<Duration>| d.unwrap_or(Duration::ZERO).as_micros();
        let values = [
            us(Some(t.vm_create)),
            us(Some(t.load)),
            us(Some(t.vcpu_setup)),
            us(t.ring0_boot),
            us(t.ring3_to_ready),
            us(Some(t.total)),
            u128::from(report.exits),
        ];
        for (column, value) in samples.iter_mut().zip(values) {
            column.push(value);
        }
        if (i + 1) % 50 == 0 || i + 1 == args.runs {
            let _ = write!(err, "\rthaw: bench: {}/{} boots", i + 1, args.runs);
        }
    }
    let _ = writeln!(err);
    println!("{} boots, {} MiB guest memory; times in microseconds", args.runs, args.memory);
    println!("{:<20} {:>8} {:>8} {:>8} {:>8}", "phase", "p50", "p90", "p99", "max");
    for (name, column) in rows.iter().zip(samples.iter_mut()) {
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
