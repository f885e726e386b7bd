//! `thaw restore`: serve N requests, each from a fresh VM restored from one image (or from an
//! in-memory template of it), and report latency percentiles, the per-phase breakdown, page
//! faults and the private memory of each instance.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;
use host_vmm::{FunctionStatus, Image, Outcome, RunReport, VmConfig};

use crate::invoke::StatsFormat;

/// Arguments of `thaw restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot image, from `thaw snapshot`.
    #[arg(value_name = "FUNCTION.snap")]
    image: PathBuf,
    /// How many requests (and fresh VMs).
    #[arg(long, value_name = "N", default_value_t = 1)]
    count: usize,
    /// How many VMs run at once.
    #[arg(long, value_name = "C", default_value_t = 1)]
    concurrency: usize,
    /// Restore from an in-memory template (a sealed memfd) loaded from the image once.
    #[arg(long)]
    template: bool,
    /// Keep every VM (its memory, vCPU and KVM objects) until all have answered, so all
    /// --count VMs are alive at once; reports the peak.
    #[arg(long)]
    hold: bool,
    /// The request body, the same for every request.
    #[arg(long, value_name = "STRING", conflicts_with = "input", required_unless_present = "input")]
    data: Option<String>,
    /// Read the request body from this file.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Print the summary as one JSON object on stdout instead of text.
    #[arg(long, value_name = "FORMAT")]
    stats: Option<StatsFormat>,
    /// Wall-clock limit per request, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    timeout: f64,
    #[command(flatten)]
    devices: crate::devices::DeviceArgs,
}

/// The `p`th percentile (0-100) of sorted `values`, nearest-rank.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

struct Summary {
    name: &'static str,
    key: &'static str,
    unit: &'static str,
    values: Vec<u64>,
}

/// Runs `thaw restore` and returns the process exit code.
pub fn run(args: &RestoreArgs) -> Result<u8, String> {
    if args.count == 0 || args.concurrency == 0 {
        return Err("--count and --concurrency must be at least 1".into());
    }
    let request = crate::invoke::request_body(args.data.as_ref(), args.input.as_ref())?;
    let image = Image::open(&args.image).map_err(|e| e.to_string())?;
    let image = if args.template { image.to_template().map_err(|e| e.to_string())? } else { image };
    let timeout = crate::kernel::parse_timeout(args.timeout)?;
    let mut config = VmConfig { timeout, requests: vec![request], measure_memory: true, ..VmConfig::default() };
    args.devices.apply_restore(&mut config, &image)?;
    let reports: Mutex<Vec<RunReport>> = Mutex::new(Vec::with_capacity(args.count));
    let held: Mutex<Vec<host_vmm::Vm>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.concurrency.min(args.count) {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < args.count {
                    let result =
                        host_vmm::serve_from_image(&image, &config, &mut std::io::sink()).map(|(vm, report)| {
                            if args.hold {
                                held.lock().unwrap_or_else(|p| p.into_inner()).push(vm);
                            }
                            report
                        });
                    let problem = match &result {
                        Err(e) => Some(e.to_string()),
                        Ok(r) if !matches!(r.outcome, Outcome::Exited(0)) => Some(r.outcome.to_string()),
                        Ok(r) if !matches!(r.responses.first().map(|x| &x.status), Some(FunctionStatus::Ok)) => {
                            Some("the function did not answer cleanly".into())
                        }
                        Ok(_) => None,
                    };
                    match (problem, result) {
                        (None, Ok(report)) => reports.lock().unwrap_or_else(|p| p.into_inner()).push(report),
                        (problem, _) => {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(problem.unwrap_or_default());
                            return;
                        }
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    let peak_alive = held.lock().unwrap_or_else(|p| p.into_inner()).len();
    drop(held);
    if let Some(problem) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(format!("a restored VM failed: {problem}"));
    }
    let reports = reports.into_inner().unwrap_or_else(|p| p.into_inner());
    let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
    let column = |name, key, unit, f: &dyn Fn(&RunReport) -> u64| Summary {
        name,
        key,
        unit,
        values: reports.iter().map(f).collect(),
    };
    let mut rows = [
        column("restore to response", "restore_to_response_us", "µs", &|r| us(r.timings.to_response)),
        column("memory map", "memory_map_us", "µs", &|r| us(Some(r.timings.load))),
        column("vm create", "vm_create_us", "µs", &|r| us(Some(r.timings.vm_create))),
        column("vcpu create", "vcpu_create_us", "µs", &|r| us(Some(r.timings.vcpu_setup))),
        column("state set", "state_set_us", "µs", &|r| us(r.timings.state_set)),
        column("resume to request", "resume_us", "µs", &|r| us(r.timings.to_first_request)),
        column("handle", "handle_us", "µs", &|r| us(r.responses.first().map(|x| x.handle_time))),
        column("page faults", "page_faults", "", &|r| r.page_faults),
        column("private memory", "private_memory_kib", "KiB", &|r| r.private_memory.unwrap_or(0) / 1024),
        column("device exits", "device_exits", "", &|r| r.devices.iter().map(|d| d.exits).sum()),
        column("backends attached", "backends_attached", "", &|r| {
            r.devices.iter().filter(|d| d.attached_after.is_some()).count() as u64
        }),
    ];
    for row in &mut rows {
        row.values.sort_unstable();
    }
    let source = if args.template { "template" } else { "file" };
    if let Some(StatsFormat::Json) = args.stats {
        let fields: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "\"{}\": {{\"p50\": {}, \"p90\": {}, \"p99\": {}, \"max\": {}}}",
                    r.key,
                    percentile(&r.values, 50),
                    percentile(&r.values, 90),
                    percentile(&r.values, 99),
                    r.values.last().copied().unwrap_or(0)
                )
            })
            .collect();
        println!(
            "{{\"function\": \"{}\", \"source\": \"{source}\", \"count\": {}, \"concurrency\": {}, \"alive_at_once\": {}, \"wall_ms\": {}, {}}}",
            image.info.guest.function_name,
            args.count,
            args.concurrency,
            if args.hold { peak_alive } else { args.concurrency.min(args.count) },
            wall.as_millis(),
            fields.join(", ")
        );
        return Ok(0);
    }
    println!(
        "{} restores of {} from a {source}, {} at a time, in {} ms",
        args.count,
        image.info.guest.function_name,
        args.concurrency,
        wall.as_millis()
    );
    if args.hold {
        println!("{peak_alive} VMs were alive at once (held until all had answered)");
    }
    println!("{:<22} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p90", "p99", "max");
    for r in &rows {
        let name = if r.unit.is_empty() { r.name.to_string() } else { format!("{} ({})", r.name, r.unit) };
        println!(
            "{name:<22} {:>8} {:>8} {:>8} {:>8}",
            percentile(&r.values, 50),
            percentile(&r.values, 90),
            percentile(&r.values, 99),
            r.values.last().copied().unwrap_or(0)
        );
    }
    Ok(0)
}
