//! What `thaw serve` counts for each function, across its versions, and how `GET /metrics`
//! writes it: the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use host_vmm::PoolStats;
use serde::Serialize;

/// Upper bounds of the latency buckets, in seconds: 50 µs to 30 s.
const BUCKETS: [f64; 14] = [0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// A latency histogram with [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; written cumulatively).
    counts: [AtomicU64; BUCKETS.len()],
    /// Observations above the last bound.
    over: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        match BUCKETS.iter().position(|&bound| seconds <= bound) {
            Some(index) => self.counts[index].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// One function's counters, gauges and histograms. Every version of the function shares them,
/// so they run on across deploys (and end with a delete).
#[derive(Debug, Default, Serialize)]
pub struct FunctionMetrics {
    /// Requests the function answered without error.
    pub ok: AtomicU64,
    /// Requests where the function trapped or exited non-zero.
    pub function_errors: AtomicU64,
    /// Requests that ran out of time.
    pub timeouts: AtomicU64,
    /// Requests whose VM failed (the guest kernel, or the host could not run it).
    pub vm_failures: AtomicU64,
    /// Requests refused with a full queue.
    pub rejected: AtomicU64,
    /// Kept VMs destroyed and replaced because their guest kernel failed.
    pub replaced: AtomicU64,
    /// Kept VMs reset to the image after a request.
    pub resets: AtomicU64,
    /// VMs that could not be restored (or reset).
    pub restore_failures: AtomicU64,
    /// Requests queued or being served now.
    pub in_flight: AtomicI64,
    /// Requests waiting in the queue now.
    pub queued: AtomicI64,
    /// VMs the vCPU threads hold now (kept VMs, or fresh VMs while they serve).
    pub live_vms: AtomicI64,
    /// From a request's arrival to its answer.
    #[serde(skip)]
    pub request: Histogram,
    /// The function's own handling of a request.
    #[serde(skip)]
    pub handle: Histogram,
    /// Readying a VM: a fresh VM's restore, or a kept VM's reset.
    #[serde(skip)]
    pub restore: Histogram,
    /// The last lines the function and its guest wrote (kept beside the metrics, as they too
    /// run on across versions).
    #[serde(skip)]
    pub logs: super::logs::LogRing,
}

/// A metric of every function: its name, its help, and where each function's value is.
type Row<T> = (&'static str, &'static str, fn(&FunctionMetrics) -> &T);
/// A metric of each pool: its name, its type, its help, and its value.
type PoolRow = (&'static str, &'static str, &'static str, fn(&PoolStats) -> f64);

/// Writes `# HELP` and `# TYPE` for a metric.
fn describe(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One function's name, metrics, and its serving version's pool, if it has one.
pub struct Sample<'a> {
    /// The function.
    pub name: &'a str,
    /// Its metrics.
    pub metrics: &'a FunctionMetrics,
    /// Its pool's statistics (pool mode).
    pub pool: Option<PoolStats>,
}

/// The metrics of `functions` as Prometheus text.
pub fn render(functions: &[Sample<'_>]) -> String {
    let mut out = String::new();
    let label = |name: &str| format!("function=\"{name}\"");
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let gauge = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0);

    describe(&mut out, "thaw_requests_total", "counter", "Requests by function and how they ended.");
    for f in functions {
        let m = f.metrics;
        for (outcome, value) in [
            ("ok", load(&m.ok)),
            ("function_error", load(&m.function_errors)),
            ("timeout", load(&m.timeouts)),
            ("vm_failure", load(&m.vm_failures)),
            ("rejected", load(&m.rejected)),
        ] {
            let _ = writeln!(out, "thaw_requests_total{{{},outcome=\"{outcome}\"}} {value}", label(f.name));
        }
    }
    let counters: [Row<AtomicU64>; 2] = [
        ("thaw_vms_replaced_total", "Kept VMs destroyed and replaced because their guest kernel failed.", |m| {
            &m.replaced
        }),
        ("thaw_resets_total", "Kept VMs reset to the image after a request.", |m| &m.resets),
    ];
    for (name, help, field) in counters {
        describe(&mut out, name, "counter", help);
        for f in functions {
            let _ = writeln!(out, "{name}{{{}}} {}", label(f.name), load(field(f.metrics)));
        }
    }
    let name = "thaw_restore_failures_total";
    describe(
        &mut out,
        name,
        "counter",
        "VMs that could not be restored, reset or parked, the pool's filler's included.",
    );
    for f in functions {
        let filler = f.pool.as_ref().map_or(0, |p| p.fill_failures);
        let _ = writeln!(out, "{name}{{{}}} {}", label(f.name), load(&f.metrics.restore_failures) + filler);
    }
    let gauges: [Row<AtomicI64>; 3] = [
        ("thaw_in_flight", "Requests queued or being served.", |m| &m.in_flight),
        ("thaw_queue_depth", "Requests waiting for a vCPU thread.", |m| &m.queued),
        ("thaw_live_vms", "VMs held by vCPU threads (parked pool VMs are thaw_pool_parked).", |m| &m.live_vms),
    ];
    for (name, help, field) in gauges {
        describe(&mut out, name, "gauge", help);
        for f in functions {
            let _ = writeln!(out, "{name}{{{}}} {}", label(f.name), gauge(field(f.metrics)));
        }
    }
    let histograms: [Row<Histogram>; 3] = [
        ("thaw_request_duration_seconds", "From a request's arrival to its answer.", |m| &m.request),
        ("thaw_handle_duration_seconds", "The function's own handling of a request.", |m| &m.handle),
        ("thaw_restore_duration_seconds", "Readying a VM: a fresh restore, or a kept VM's reset.", |m| &m.restore),
    ];
    for (name, help, field) in histograms {
        describe(&mut out, name, "histogram", help);
        for f in functions {
            field(f.metrics).write(&mut out, name, &label(f.name));
        }
    }
    let pools: Vec<(&str, &PoolStats)> =
        functions.iter().filter_map(|f| f.pool.as_ref().map(|p| (f.name, p))).collect();
    let pool_metrics: [PoolRow; 5] = [
        ("thaw_pool_parked", "gauge", "VMs parked and waiting for a request.", |p| {
            p.filled.saturating_sub(p.ready) as f64
        }),
        ("thaw_pool_filled_total", "counter", "VMs the pool's filler restored and parked.", |p| p.filled as f64),
        ("thaw_pool_fill_seconds_total", "counter", "Time the filler spent; filled / this is its fill rate.", |p| {
            p.fill_time.as_secs_f64()
        }),
        (
            "thaw_pool_fill_failures_total",
            "counter",
            "VMs the pool's filler could not restore or park (it retries, backing off to 2 s).",
            |p| p.fill_failures as f64,
        ),
        (
            "thaw_pool_restored_here_total",
            "counter",
            "Requests that found no parked VM, and were served by one restored on their own thread.",
            |p| p.restored_here as f64,
        ),
    ];
    for (name, kind, help, value) in pool_metrics {
        describe(&mut out, name, kind, help);
        for (function, pool) in &pools {
            let _ = writeln!(out, "{name}{{{}}} {}", label(function), value(pool));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_every_line_is_prometheus_text() {
        let metrics = FunctionMetrics::default();
        metrics.ok.fetch_add(3, Ordering::Relaxed);
        metrics.request.observe(Duration::from_micros(80));
        metrics.request.observe(Duration::from_micros(900));
        metrics.request.observe(Duration::from_secs(60));
        let pool = PoolStats { filled: 5, ready: 3, restored_here: 1, ..PoolStats::default() };
        let text = render(&[Sample { name: "hello", metrics: &metrics, pool: Some(pool) }]);
        assert!(text.contains("thaw_requests_total{function=\"hello\",outcome=\"ok\"} 3\n"), "{text}");
        assert!(text.contains("thaw_request_duration_seconds_bucket{function=\"hello\",le=\"0.0001\"} 1\n"));
        assert!(text.contains("thaw_request_duration_seconds_bucket{function=\"hello\",le=\"0.001\"} 2\n"));
        assert!(text.contains("thaw_request_duration_seconds_bucket{function=\"hello\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("thaw_request_duration_seconds_count{function=\"hello\"} 3\n"));
        assert!(text.contains("thaw_pool_parked{function=\"hello\"} 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{line}");
            assert!(series.ends_with('}'), "{line}");
        }
    }
}
