//! The one JSON schema for what serving requests did and cost, shared by `thaw invoke --json`
//! (one request), `thaw restore --json` and `thaw bench --json` (a batch's percentiles),
//! `thaw restore --responses` (one line per request) and the error bodies of `thaw serve`.
//! The same measurement tables print the text summaries, so text and JSON cannot drift apart.
//! docs/API.md documents the schema.

use std::time::Duration;

use host_vmm::virtio::DeviceStats;
use host_vmm::{FunctionResponse, FunctionStatus, Outcome, RunReport, Served};
use serde::{Deserialize, Serialize};

/// Measurements that could not be taken or printed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The floor's runs failed.
    #[error("measuring the floor: {0}")]
    Floor(host_vmm::VmmError),
    /// The floor was asked for zero runs.
    #[error("measuring the floor: no runs")]
    NoRuns,
    /// The stats could not be written as JSON.
    #[error("serializing the stats: {0}")]
    Json(#[from] serde_json::Error),
    /// They could not be printed.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The function answered (or exited 0).
    Ok,
    /// The function trapped.
    Trapped,
    /// The function exited with a code other than 0.
    Exited,
    /// No answer within the timeout.
    TimedOut,
    /// The guest failed (panicked, faulted, or ended without answering), or the host could not
    /// run it.
    Failed,
}

/// Percentiles of one measurement over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// The median.
    pub p50: u64,
    /// The 90th percentile.
    pub p90: u64,
    /// The 99th percentile.
    pub p99: u64,
    /// The largest value.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `values`, or `None` if there are none: exact up to 2047, within 0.1%
    /// above (an HdrHistogram with three significant digits).
    pub fn of(values: impl Iterator<Item = u64>) -> Option<Self> {
        // Auto-resizing: it grows to the largest value recorded.
        let mut histogram = hdrhistogram::Histogram::<u64>::new(3).ok()?;
        for value in values {
            histogram.record(value).ok()?;
        }
        if histogram.is_empty() {
            return None;
        }
        let at = |q: f64| histogram.value_at_quantile(q);
        Some(Self { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: histogram.max() })
    }
}

/// Declares a group of optional measurements: a struct generic over what each holds (one
/// value, or a batch's [`Percentiles`]), with each field's label in text tables.
macro_rules! measurements {
    ($(#[$meta:meta])* $name:ident { $($(#[$doc:meta])* $field:ident: $label:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name<T> {
            $($(#[$doc])* #[serde(skip_serializing_if = "Option::is_none")] pub $field: Option<T>,)*
        }

        impl<T> Default for $name<T> {
            fn default() -> Self {
                Self { $($field: None,)* }
            }
        }

        impl $name<u64> {
            /// The percentiles of each measurement over the samples that have it.
            pub fn summarize<'a>(samples: impl Iterator<Item = &'a Self> + Clone) -> $name<Percentiles> {
                $name { $($field: Percentiles::of(samples.clone().filter_map(|s| s.$field)),)* }
            }
        }

        impl $name<Percentiles> {
            /// Each measurement present, with its label.
            pub fn rows(&self) -> Vec<(&'static str, Percentiles)> {
                [$(($label, self.$field),)*].into_iter().filter_map(|(l, p)| Some((l, p?))).collect()
            }
        }
    };
}

measurements! {
    /// Where a request's time went, in microseconds. A phase its path does not have is absent.
    Phases {
        /// From the request's arrival (or its VM's restore) to its response.
        to_response_us: "to response (µs)",
        /// Waiting in the queue for a vCPU thread (`thaw serve`).
        queue_us: "queued (µs)",
        /// Waiting for the pool to park a VM.
        pool_wait_us: "waited for the pool (µs)",
        /// Cold boot: writing the kernel, page tables and boot info into guest memory.
        kernel_load_us: "kernel load (µs)",
        /// Restore: mapping the image's memory.
        memory_map_us: "memory map (µs)",
        /// Creating the VM and its memory slot.
        vm_create_us: "vm create (µs)",
        /// Creating the vCPU and setting its CPUID.
        vcpu_create_us: "vcpu create (µs)",
        /// Restore: setting the vCPU state and writing fresh host parameters.
        state_set_us: "state set (µs)",
        /// Cold boot: the first `KVM_RUN` to ring 3.
        ring0_boot_us: "ring-0 early boot (µs)",
        /// Cold boot: ring 3 to the runtime being ready.
        ring3_to_ready_us: "ring 3 to ready (µs)",
        /// Cold boot: compiling the module.
        compile_us: "compile (µs)",
        /// Cold boot: instantiating it.
        instantiate_us: "instantiate (µs)",
        /// Cold boot: the function's init exports.
        init_us: "init (µs)",
        /// Restore: the guest's resume from its checkpoint to taking the request.
        resume_us: "resume to request (µs)",
        /// The function's `handle`.
        handle_us: "handle (µs)",
        /// Reset mode, after the answer: copying the changed pages back and loading the
        /// image's state again.
        reset_us: "reset (µs)",
        /// The whole run, or the whole request in `thaw serve`.
        total_us: "total (µs)",
    }
}

measurements! {
    /// What a request cost in memory.
    Memory {
        /// Guest memory private to its VM (pages written, copied on write or allocated).
        private_kib: "private memory (KiB)",
        /// Minor page faults its vCPU thread took.
        page_faults: "page faults",
        /// Reset mode: pages the request changed, copied back by the reset.
        dirty_pages: "dirty pages",
    }
}

measurements! {
    /// What a request cost in VM exits and device work.
    Exits {
        /// VM exits.
        vm: "vm exits",
        /// Of them, exits served by virtio devices.
        devices: "device exits",
        /// Device backends attached (on first use).
        backends_attached: "backends attached",
    }
}

/// The measurements of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Where its time went.
    pub phases: Phases<u64>,
    /// Its memory.
    pub memory: Memory<u64>,
    /// Its exits.
    pub exits: Exits<u64>,
}

impl Measured {
    /// A cold boot's measurements.
    pub fn of_run(report: &RunReport) -> Self {
        let t = &report.timings;
        let opt = |d: Option<Duration>| d.map(us);
        let phases = Phases {
            kernel_load_us: Some(us(t.load)),
            vm_create_us: Some(us(t.vm_create)),
            vcpu_create_us: Some(us(t.vcpu_setup)),
            ring0_boot_us: opt(t.ring0_boot),
            ring3_to_ready_us: opt(t.ring3_to_ready),
            compile_us: opt(t.compile),
            instantiate_us: opt(t.instantiate),
            init_us: opt(t.init),
            handle_us: opt(report.responses.first().map(|r| r.handle_time)),
            total_us: Some(us(t.total)),
            ..Phases::default()
        };
        let memory = Memory {
            private_kib: report.private_memory.map(|b| b / 1024),
            page_faults: Some(report.page_faults),
            dirty_pages: None,
        };
        Self { phases, memory, exits: Exits::of(report.exits, &report.devices) }
    }

    /// A request served from an image: to its response, the phases of a restore on its path,
    /// its wait for a pool, its resume and its handle. Private memory is left to the caller,
    /// which measures it only where it is worth a read of /proc/self/smaps.
    pub fn of_served(served: &Served) -> Self {
        let t = &served.timings;
        let restored = t.restored.as_ref();
        let phases = Phases {
            to_response_us: Some(us(t.to_response)),
            pool_wait_us: t.waited.map(us),
            memory_map_us: restored.map(|r| us(r.load)),
            vm_create_us: restored.map(|r| us(r.vm_create)),
            vcpu_create_us: restored.map(|r| us(r.vcpu_setup)),
            state_set_us: restored.and_then(|r| r.state_set).map(us),
            resume_us: t.resume.map(us),
            handle_us: served.response.as_ref().map(|r| us(r.handle_time)),
            ..Phases::default()
        };
        let memory = Memory { page_faults: Some(served.page_faults), ..Memory::default() };
        Self { phases, memory, exits: Exits::of(served.exits, &served.devices) }
    }
}

impl Exits<u64> {
    /// `vm` exits, and the device exits and attached backends in `devices`.
    pub fn of(vm: u64, devices: &[DeviceStats]) -> Self {
        Self {
            vm: Some(vm),
            devices: Some(devices.iter().map(|d| d.exits).sum()),
            backends_attached: Some(devices.iter().filter(|d| d.attached_after.is_some()).count() as u64),
        }
    }
}

/// One device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// What the device is: console, entropy, block or vsock.
    pub kind: String,
    /// Which one of its kind.
    pub index: u16,
    /// Whether its backend was attached.
    pub attached: bool,
    /// When, from the start of the run.
    pub attached_after_us: Option<u64>,
    /// MMIO exits it served.
    pub exits: u64,
    /// Queue notifications among them.
    pub notifications: u64,
}

impl From<&DeviceStats> for Device {
    fn from(d: &DeviceStats) -> Self {
        Self {
            kind: d.kind.to_string(),
            index: d.index,
            attached: d.attached_after.is_some(),
            attached_after_us: d.attached_after.map(|t| t.as_micros() as u64),
            exits: d.exits,
            notifications: d.notifications,
        }
    }
}

/// One request: how it ended, what it answered, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStats {
    /// Its number in a batch (`--responses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<usize>,
    /// How it ended.
    pub status: Status,
    /// The function's exit code: 0 unless it exited with another.
    pub exit_code: u32,
    /// Why it did not answer cleanly, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The id of the VM instance that served it: 32 hex digits (`abi::params::InstanceId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The response (the function's stdout), as UTF-8 with invalid bytes replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// The function's stderr, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// What it cost.
    #[serde(flatten)]
    pub measured: Measured,
    /// Per-device counters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
}

/// How a request that ended as `outcome` with `response` ended: its status, the function's
/// exit code, and why it did not answer cleanly. Allocates only for a request that failed, so
/// the paths that serve requests can ask before deciding whether they need the whole stats.
pub fn ending(outcome: &Outcome, response: Option<&FunctionResponse>) -> (Status, u32, Option<String>) {
    match (outcome, response.map(|r| &r.status)) {
        (Outcome::Answered | Outcome::Exited(0), Some(FunctionStatus::Ok | FunctionStatus::Exited(0))) => {
            (Status::Ok, 0, None)
        }
        (_, Some(FunctionStatus::Trapped(message))) => {
            (Status::Trapped, 0, Some(format!("the function trapped: {message}")))
        }
        (_, Some(FunctionStatus::Exited(code))) => {
            (Status::Exited, *code, Some(format!("the function exited with code {code}")))
        }
        (Outcome::TimedOut(_), _) => (Status::TimedOut, 0, Some(outcome.to_string())),
        (Outcome::Answered | Outcome::Exited(0), None) => {
            (Status::Failed, 0, Some("the guest ended without answering the request".into()))
        }
        (outcome, _) => (Status::Failed, 0, Some(outcome.to_string())),
    }
}

impl RequestStats {
    /// A request that ended as `outcome` with `response`, with its output.
    pub fn new(outcome: &Outcome, response: Option<&FunctionResponse>) -> Self {
        let (status, exit_code, error) = ending(outcome, response);
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Self {
            request: None,
            status,
            exit_code,
            error,
            instance_id: None,
            stdout: response.map(|r| text(&r.stdout)),
            stderr: response.map(|r| text(&r.stderr)),
            measured: Measured::default(),
            devices: Vec::new(),
        }
    }

    /// A request the host could not serve, with why.
    pub fn host_failure(why: &str) -> Self {
        let mut stats = Self::new(&Outcome::Answered, None);
        stats.error = Some(why.to_string());
        stats
    }

    /// One JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"serializing the stats: {e}\"}}"))
    }
}

/// A pool's work during a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// VMs it keeps parked.
    pub size: usize,
    /// VMs its filler parked.
    pub filled: u64,
    /// VMs parked per second of the filler's work.
    pub fill_rate_per_s: u64,
    /// Working-set pages each parked VM touched ahead.
    pub warmed_pages_per_vm: u64,
    /// Requests that found a VM ready.
    pub ready: u64,
    /// Requests that found none parked, and were served by a VM restored on their own thread.
    pub restored_here: u64,
    /// The time those requests took to get their VM, in all.
    pub restored_here_ms: u64,
}

/// What VMs restored from an image a peer holds read from it (`thaw restore URL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteSummary {
    /// Microseconds from asking for the restore head to an image made of it.
    pub head_us: u64,
    /// Faults resolved by reading from the peer.
    pub demand_faults: u64,
    /// Pages those reads brought.
    pub demand_pages: u64,
    /// Microseconds each of those faults took on average, the read included.
    pub demand_us_per_fault: u64,
    /// Faults on pages that are zero in the image (resolved here, without the peer).
    pub zero_page_faults: u64,
    /// Pages the prefetcher brought.
    pub prefetched_pages: u64,
    /// Every non-zero page of the image had arrived by the end.
    pub image_complete: bool,
}

/// The peer measured in the same run (`thaw bench --peer`): the same function's phases run by
/// another runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peer, with its version.
    pub name: String,
    /// Percentiles of its phases (compile, instantiate, init, handle), in microseconds.
    pub phases: Phases<Percentiles>,
}

impl PeerStats {
    /// thaw's p50 in each phase both measured, against the peer's, as a text table.
    pub fn versus(&self, thaw: &Phases<Percentiles>) -> String {
        use std::fmt::Write;
        let thaw = thaw.rows();
        let mut out =
            format!("against {} (p50, µs):\n{:<18} {:>9} {:>9} {:>11}\n", self.name, "", "thaw", "peer", "thaw/peer");
        for (label, peer) in self.phases.rows() {
            if let Some((_, ours)) = thaw.iter().find(|(l, _)| *l == label) {
                let ratio = ours.p50 as f64 / peer.p50.max(1) as f64;
                let _ = writeln!(out, "{label:<18} {:>9} {:>9} {:>10.2}x", ours.p50, peer.p50, ratio);
            }
        }
        out
    }
}

/// The floor measured in the same run (`--floor`), and the batch as a multiple of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorStats {
    /// The fresh-VM floor (a fresh VM restored to its first exit), µs.
    pub fresh: Percentiles,
    /// The kept-VM floor (a kept VM reset by its dirty log to its first exit), µs.
    pub kept: Percentiles,
    /// The batch against one of them (absent when only the floor was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versus: Option<Versus>,
}

/// A batch's time to response against a floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versus {
    /// Which floor: "fresh" or "kept".
    pub against: String,
    /// The batch's p50, µs.
    pub p50: u64,
    /// The batch's p99, µs.
    pub p99: u64,
    /// The batch's p50 over the floor's.
    pub p50_ratio: f64,
    /// The batch's p99 over the floor's.
    pub p99_ratio: f64,
}

impl FloorStats {
    /// `batch` as a multiple of the fresh (`kept` false) or kept floor.
    pub fn versus(&self, batch: Percentiles, kept: bool) -> Self {
        let floor = if kept { self.kept } else { self.fresh };
        let ratio = |x: u64, f: u64| (x as f64 / f.max(1) as f64 * 100.0).round() / 100.0;
        let versus = Versus {
            against: if kept { "kept" } else { "fresh" }.into(),
            p50: batch.p50,
            p99: batch.p99,
            p50_ratio: ratio(batch.p50, floor.p50),
            p99_ratio: ratio(batch.p99, floor.p99),
        };
        Self { versus: Some(versus), ..self.clone() }
    }

    /// One line saying how far `what` is from the floor, if a batch was compared.
    pub fn describe(&self, what: &str) -> Option<String> {
        let v = self.versus.as_ref()?;
        let floor = if v.against == "kept" { self.kept } else { self.fresh };
        Some(format!(
            "{what}: {:.2}x the {}-VM floor at p50 ({} against {} µs), {:.2}x at p99 ({} against {} µs)",
            v.p50_ratio, v.against, v.p50, floor.p50, v.p99_ratio, v.p99, floor.p99
        ))
    }
}

/// The floor, measured (`--floor` of `thaw bench` and `thaw restore`).
#[derive(Debug, Clone)]
pub struct Floor {
    /// Its percentiles.
    pub stats: FloorStats,
    runs: usize,
}

impl Floor {
    /// Measures the floor `runs` times ([`host_vmm::floor::measure`]).
    pub fn measure(runs: usize) -> Result<Self, StatsError> {
        eprintln!("thaw: bench: measuring the floor ({runs} fresh and {runs} kept runs)");
        let floor = host_vmm::floor::measure(runs).map_err(StatsError::Floor)?;
        let of = |times: &[Duration]| Percentiles::of(times.iter().map(|&d| us(d)));
        match (of(&floor.fresh), of(&floor.kept)) {
            (Some(fresh), Some(kept)) => Ok(Self { stats: FloorStats { fresh, kept, versus: None }, runs }),
            _ => Err(StatsError::NoRuns),
        }
    }

    /// The floor as a text table.
    pub fn table(&self) -> String {
        let heading = format!(
            "floor: thaw's minimal guest (4 MiB, one ring-3 store), {} runs each; times in microseconds\n",
            self.runs
        );
        heading
            + &table(&[
                ("fresh VM restored to its first exit", self.stats.fresh),
                ("kept VM reset by dirty log to exit", self.stats.kept),
            ])
    }
}

/// A batch: what was served, how each request ended, and the percentiles of what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// What was measured: "kernel" (boots alone), "cold" (cold invocations), or the restore
    /// mode: "fresh", "pool" or "reset".
    pub mode: String,
    /// The function's name (absent for kernel boots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Where restores come from: "file", "template" or "peer".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Requests (or VMs) in the batch.
    pub count: usize,
    /// Served at once.
    pub concurrency: usize,
    /// VMs alive at once at the peak.
    pub alive_at_once: usize,
    /// The batch's wall time.
    pub wall_ms: u64,
    /// Its throughput.
    pub requests_per_s: u64,
    /// How many requests ended each way.
    pub statuses: std::collections::BTreeMap<Status, usize>,
    /// Kept VMs destroyed and replaced (their guest ended other than by answering).
    pub replaced: usize,
    /// Percentiles of each phase, over the requests that answered cleanly.
    pub phases: Phases<Percentiles>,
    /// Percentiles of memory.
    pub memory: Memory<Percentiles>,
    /// Percentiles of exits.
    pub exits: Exits<Percentiles>,
    /// The pool's work (pool mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSummary>,
    /// The floor, with --floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<FloorStats>,
    /// The peer, with `thaw bench --peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerStats>,
    /// What was read from the peer holding the image (`thaw restore URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSummary>,
}

impl BatchStats {
    /// A batch of `count` requests to `function` (none for kernel boots), served one at a
    /// time in `mode`, with nothing measured yet.
    pub fn new(mode: &str, function: Option<String>, count: usize) -> Self {
        Self {
            mode: mode.into(),
            function,
            source: None,
            count,
            concurrency: 1,
            alive_at_once: 1,
            wall_ms: 0,
            requests_per_s: 0,
            statuses: std::collections::BTreeMap::new(),
            replaced: 0,
            phases: Phases::default(),
            memory: Memory::default(),
            exits: Exits::default(),
            pool: None,
            floor: None,
            peer: None,
            remote: None,
        }
    }

    /// Sets the phases, memory and exits to the percentiles of `samples`.
    pub fn summarize(&mut self, samples: &[Measured]) {
        self.phases = Phases::summarize(samples.iter().map(|s| &s.phases));
        self.memory = Memory::summarize(samples.iter().map(|s| &s.memory));
        self.exits = Exits::summarize(samples.iter().map(|s| &s.exits));
    }

    /// Every measurement present, with its label, in table order.
    pub fn rows(&self) -> Vec<(&'static str, Percentiles)> {
        let mut rows = self.phases.rows();
        rows.extend(self.memory.rows());
        rows.extend(self.exits.rows());
        rows
    }

    /// The measurements as a text table.
    pub fn table(&self) -> String {
        table(&self.rows())
    }
}

/// `rows` as a text table with a header line.
pub fn table(rows: &[(&str, Percentiles)]) -> String {
    use std::fmt::Write;
    let width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0).max(8);
    let mut out = format!("{:<width$} {:>8} {:>8} {:>8} {:>8}\n", "", "p50", "p90", "p99", "max");
    for (label, p) in rows {
        let _ = writeln!(out, "{label:<width$} {:>8} {:>8} {:>8} {:>8}", p.p50, p.p90, p.p99, p.max);
    }
    out
}

/// `d` in whole microseconds.
pub fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Prints `value` as one JSON line on stdout.
pub fn print_json(value: &impl Serialize) -> Result<(), StatsError> {
    let text = serde_json::to_string(value)?;
    Ok(outln!("{text}")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_for_small_values_and_close_for_large_ones() {
        let p = Percentiles::of(1..=100).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50, 90, 99, 100));
        let p = Percentiles::of((1..=1000).map(|v| v * 1000)).unwrap();
        assert!(p.p50.abs_diff(500_000) <= 500 && p.max.abs_diff(1_000_000) <= 1000, "{p:?}");
        assert_eq!(Percentiles::of([7].into_iter()).unwrap().p50, 7);
        assert_eq!(Percentiles::of(std::iter::empty()), None);
    }

    #[test]
    fn a_request_serializes_only_what_was_measured() {
        let response = FunctionResponse {
            status: FunctionStatus::Exited(3),
            stdout: b"out\xff".to_vec(),
            stderr: b"err".to_vec(),
            handle_time: Duration::from_micros(42),
        };
        let mut stats = RequestStats::new(&Outcome::Answered, Some(&response));
        stats.measured.phases.handle_us = Some(42);
        let json: serde_json::Value = serde_json::from_str(&stats.to_json()).unwrap();
        assert_eq!(json["status"], "exited");
        assert_eq!(json["exit_code"], 3);
        assert_eq!(json["stdout"], "out\u{fffd}");
        assert_eq!(json["phases"], serde_json::json!({ "handle_us": 42 }));
        assert_eq!(json["memory"], serde_json::json!({}));
        assert_eq!(json["error"], "the function exited with code 3");
        assert!(json.get("instance_id").is_none() && json.get("devices").is_none());
        let back: RequestStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, stats);
    }

    #[test]
    fn each_way_a_request_ends_has_its_status() {
        let status = |outcome: Outcome, status: Option<FunctionStatus>| {
            let response = status.map(|status| FunctionResponse {
                status,
                stdout: Vec::new(),
                stderr: Vec::new(),
                handle_time: Duration::ZERO,
            });
            let stats = RequestStats::new(&outcome, response.as_ref());
            (stats.status, stats.error.is_some())
        };
        assert_eq!(status(Outcome::Answered, Some(FunctionStatus::Ok)), (Status::Ok, false));
        assert_eq!(status(Outcome::Exited(0), Some(FunctionStatus::Exited(0))), (Status::Ok, false));
        assert_eq!(status(Outcome::Answered, Some(FunctionStatus::Trapped("x".into()))), (Status::Trapped, true));
        assert_eq!(status(Outcome::TimedOut(Duration::from_secs(1)), None), (Status::TimedOut, true));
        assert_eq!(status(Outcome::Panicked("boom".into()), None), (Status::Failed, true));
        assert_eq!(status(Outcome::Answered, None), (Status::Failed, true));
        assert_eq!(RequestStats::host_failure("KVM_RUN: Bad address").status, Status::Failed);
    }

    #[test]
    fn a_batch_summarizes_each_measurement_over_the_samples_that_have_it() {
        let samples: Vec<Measured> = (1..=10)
            .map(|i| Measured {
                phases: Phases { handle_us: Some(i), reset_us: (i > 5).then_some(i * 10), ..Phases::default() },
                ..Measured::default()
            })
            .collect();
        let phases = Phases::summarize(samples.iter().map(|s| &s.phases));
        assert_eq!(phases.handle_us.unwrap().p50, 5);
        assert_eq!(phases.reset_us.unwrap().p50, 80);
        assert_eq!(phases.total_us, None);
        let labels: Vec<&str> = phases.rows().iter().map(|(l, _)| *l).collect();
        assert_eq!(labels, ["handle (µs)", "reset (µs)"]);
    }
}
