//! `thaw restore`: serve N requests from VMs restored from one image (or from an in-memory
//! template of it), in one of three modes (a fresh VM per request, a parked pool, or kept VMs
//! reset after each request), and report latency percentiles, the per-phase breakdown, page
//! faults, the private memory of each instance and the throughput. `--responses` writes every
//! response, so a batch can be checked and not only timed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use host_vmm::{Image, Instance, Lanes, Mode, REWRITTEN_PAGES, Served, VmConfig};

use crate::stats::{BatchStats, Floor, Measured, PoolSummary, RequestStats, Status, us};

/// Why a batch could not be served, or did not serve cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// `--count 0` or `--concurrency 0`.
    #[error("--count and --concurrency must be at least 1")]
    NoWork,
    /// `--mode pool --pool 0`.
    #[error("--pool 0: a pool needs at least one parked VM")]
    EmptyPool,
    /// `--verify` in pool mode.
    #[error("--verify checks the kept VMs of --mode reset or the reused memory of --mode fresh")]
    VerifyPool,
    /// `--rate` is not a positive number.
    #[error("--rate {0}: must be a positive number of requests per second")]
    Rate(f64),
    /// `--hold` outside fresh mode.
    #[error("--hold keeps the fresh VMs of --mode fresh; pool and reset modes keep their own")]
    HoldMode,
    /// `--requests` names an empty file.
    #[error("{}: no requests in it (one per line)", .0.display())]
    NoRequests(PathBuf),
    /// `--responses` could not be opened.
    #[error("--responses {}: {source}", path.display())]
    Responses {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--responses` could not be written.
    #[error("writing --responses: {0}")]
    ResponsesWrite(std::io::Error),
    /// A worker's VM failed.
    #[error("a restored VM failed: {0}")]
    VmFailed(Box<RestoreError>),
    /// The memory a fresh VM found could not be checked.
    #[error("verify: after {served} fresh VMs, {source}")]
    Unverified {
        /// Requests served before.
        served: usize,
        /// Why.
        source: host_vmm::VmmError,
    },
    /// `--verify` found memory that differs from the image.
    #[error("verify: {what} differs from the image in guest pages {pages:?}")]
    Differs {
        /// Whose memory, after what.
        what: String,
        /// The guest pages that differ and should not.
        pages: Vec<u64>,
    },
    /// Some requests did not answer cleanly.
    #[error(
        "{count} of {total} requests did not answer cleanly (the first: {first}); the summary counts only the clean ones"
    )]
    Unclean {
        /// How many.
        count: usize,
        /// Of how many.
        total: usize,
        /// The first's number and why.
        first: String,
    },
    /// The timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// A device option.
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    /// A file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The request.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// The image.
    #[error(transparent)]
    Image(#[from] host_vmm::snapshot::SnapshotError),
    /// The peer holding the image.
    #[error(transparent)]
    Peer(#[from] crate::remote::PeerError),
    /// `--holder` with an image file.
    #[error(
        "--holder names another server that holds an image restored from a server (http://NODE:PORT/v1/images/VERSION), not a file"
    )]
    HolderOfFile,
    /// An option a restore from a peer cannot take.
    #[error("{0} needs the image on this machine; restoring from a peer takes --mode fresh or pool")]
    PeerMode(&'static str),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] host_vmm::VmmError),
    /// The syscall allow-list.
    #[error(transparent)]
    Seccomp(#[from] host_vmm::seccomp::SeccompError),
    /// The stats.
    #[error(transparent)]
    Stats(#[from] crate::stats::StatsError),
    /// The summary could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// `--mode`: its values and what each does, for `--help` and completions.
pub fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(Mode::ALL.map(|mode| PossibleValue::new(mode.name()).help(mode.about())))
        .try_map(|name| name.parse::<Mode>())
}

/// Arguments of `thaw restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot image, from `thaw snapshot`; or one a `thaw serve` holds,
    /// http://HOST:PORT/v1/images/VERSION (VERSION: the function's version there), whose pages
    /// are then read from that server as the guest touches them.
    #[arg(value_name = "FUNCTION.snap|URL")]
    image: PathBuf,
    /// With an image a server holds: a file holding that server's admin token.
    #[arg(long, value_name = "FILE", env = "THAW_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// With an image a server holds: another server that serves the same version (repeatable).
    /// Pages are read from the one that answered last, and from the others when it fails.
    #[arg(long = "holder", value_name = "URL")]
    holders: Vec<String>,
    /// With an image a server holds: read only the pages guests touch, not the rest of the
    /// image in the background (to measure what demand paging costs).
    #[arg(long)]
    no_prefetch: bool,
    /// How many requests.
    #[arg(long, value_name = "N", default_value_t = 1)]
    count: usize,
    /// How many requests are served at once (worker threads; in reset mode, kept VMs).
    #[arg(long, value_name = "C", default_value_t = 1)]
    concurrency: usize,
    /// Where each request's VM comes from.
    #[arg(long, value_parser = mode_parser(), default_value_t = Mode::Fresh)]
    mode: Mode,
    /// With --mode pool: how many VMs wait parked.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pool: usize,
    /// Restore from an in-memory template (a sealed memfd) loaded from the image once.
    #[arg(long)]
    template: bool,
    /// With --mode fresh: keep every VM (its memory, vCPU and KVM objects) until all have
    /// answered, so all --count VMs are alive at once; reports the peak.
    #[arg(long)]
    hold: bool,
    /// The request body, the same for every request.
    #[arg(long, value_name = "STRING", conflicts_with = "input", required_unless_present_any = ["input", "requests"])]
    data: Option<String>,
    /// Read the request body from this file ("-": standard input).
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Read the request bodies from FILE, one per line, used in turn (instead of --data or
    /// --input).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "input"])]
    requests: Option<PathBuf>,
    /// Write every response to FILE, one JSON line per request in the order they finished:
    /// its number, how it ended, its stdout and stderr, and what it cost (docs/API.md, "Stats").
    #[arg(long, value_name = "FILE")]
    responses: Option<PathBuf>,
    /// After the last request, compare all of guest memory with the image, and fail if any
    /// page differs other than those the host rewrites for every request. With --mode reset:
    /// each kept VM, reset once more. With --mode fresh: one more fresh VM, restored into the
    /// memory an earlier one left (fresh VMs reuse it once every page they changed is copied
    /// back).
    #[arg(long)]
    verify: bool,
    /// Print the summary as one JSON object on stdout instead of text (docs/API.md, "Stats").
    #[arg(long)]
    json: bool,
    /// Wall-clock limit per request, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    timeout: f64,
    /// Measure the floor first (see `thaw bench --floor`) and give restore to response as a
    /// multiple of it: the fresh-VM floor in fresh mode, the kept-VM floor in pool and reset.
    #[arg(long)]
    floor: bool,
    /// Issue requests at this many per second (open loop: a request that finds every worker
    /// busy counts its wait) instead of each as soon as a worker is free.
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    #[command(flatten)]
    devices: crate::devices::RestoreDevices,
    #[command(flatten)]
    backends: crate::devices::Backends,
    #[command(flatten)]
    seccomp: crate::SeccompArgs,
}

/// Measure a kept or pooled VM's private memory (a read of /proc/self/smaps, about a
/// millisecond) on every this-many-th request of a worker, so the measurement does not
/// dominate the throughput it sits beside.
const MEMORY_SAMPLE_EVERY: usize = 50;

/// On a terminal, one line on stderr counting the requests answered, redrawn five times a
/// second until the batch ends, then erased.
fn progress(run: &Run<'_>, finished: &AtomicBool) {
    let total = run.args.count;
    let status = crate::progress::Status::show(&format!("thaw: 0/{total} requests answered"));
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        status.update(&format!("thaw: {}/{total} requests answered", lock(&run.samples).len()));
    }
}

/// Shared between the workers.
struct Run<'a> {
    args: &'a RestoreArgs,
    requests: Vec<Vec<u8>>,
    next: AtomicUsize,
    samples: Mutex<Vec<Measured>>,
    /// How many requests ended each way.
    statuses: Mutex<std::collections::BTreeMap<Status, usize>>,
    held: Mutex<Vec<Instance>>,
    failure: Mutex<Option<RestoreError>>,
    /// Requests that did not answer cleanly.
    unclean: Mutex<Vec<String>>,
    responses: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    replaced: AtomicUsize,
    /// With --verify: each kept VM's requests, and the pages differing from the image after
    /// its final reset.
    verified: Mutex<Vec<(usize, Vec<u64>)>>,
    /// When the batch started (the --rate schedule's origin).
    started: Instant,
}

impl Run<'_> {
    /// The next request number, or `None` when all are taken or a worker failed.
    fn next_request(&self) -> Option<usize> {
        if lock(&self.failure).is_some() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.args.count).then_some(n)
    }

    /// Waits until request `number` is due under --rate, and returns when it arrived: now when
    /// it was waited for (or there is no --rate), its due time when the workers are behind.
    fn arrive(&self, number: usize) -> Instant {
        let Some(rate) = self.args.rate else { return Instant::now() };
        let due = self.started + Duration::from_secs_f64(number as f64 / rate);
        let now = Instant::now();
        if due <= now {
            return due;
        }
        std::thread::sleep(due - now);
        Instant::now()
    }

    fn fail(&self, problem: RestoreError) {
        lock(&self.failure).get_or_insert(problem);
    }

    /// The body of request `number`: the same --data or --input for all, or the lines of
    /// --requests in turn.
    fn body(&self, number: usize) -> Vec<u8> {
        self.requests.get(number % self.requests.len().max(1)).cloned().unwrap_or_default()
    }

    /// Records a served request (its line in --responses, and its sample when the function
    /// answered cleanly). A request that did not answer cleanly is counted, and the batch goes
    /// on; false when the record itself could not be written.
    fn record(&self, number: usize, served: &Served, measured: Measured) -> bool {
        let (status, _, error) = crate::stats::ending(&served.outcome, served.response.as_ref());
        *lock(&self.statuses).entry(status).or_default() += 1;
        if let Some(file) = &self.responses {
            let mut stats = RequestStats::new(&served.outcome, served.response.as_ref());
            stats.request = Some(number);
            stats.measured = measured.clone();
            if let Err(e) = writeln!(lock(file), "{}", stats.to_json()) {
                self.fail(RestoreError::ResponsesWrite(e));
                return false;
            }
        }
        if served.is_ok() {
            lock(&self.samples).push(measured);
        } else {
            lock(&self.unclean).push(format!("request {number}: {}", error.unwrap_or_default()));
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One worker: a lane of its own, readied once (in reset mode, its kept VM restored and parked,
/// touching its working set), serving requests until none are left, each VM put back after its
/// answer is recorded.
fn worker(run: &Run<'_>, lanes: &Arc<Lanes>) -> Result<(), RestoreError> {
    let mut lane = lanes.lane();
    lane.ready()?;
    let mut served_here = 0usize;
    while let Some(number) = run.next_request() {
        let queued = run.arrive(number).elapsed();
        let served = lane.serve(run.body(number), &mut std::io::sink())?;
        let mut sample = Measured::of_served(&served);
        sample.phases.to_response_us = Some(us(served.timings.to_response + queued));
        if lanes.mode() == Mode::Fresh || served_here.is_multiple_of(MEMORY_SAMPLE_EVERY) {
            let used = lane.used().map(|vm| vm.vm().private_memory()).transpose()?;
            sample.memory.private_kib = used.map(|bytes| bytes / 1024);
        }
        served_here += 1;
        if run.args.hold {
            lock(&run.held).extend(lane.hold());
        } else {
            let put_back = lane.put_back()?;
            if let Some((took, dirty)) = put_back.reset {
                sample.phases.reset_us = Some(us(took));
                sample.memory.dirty_pages = Some(dirty.pages());
            }
            if put_back.replaced {
                run.replaced.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !run.record(number, &served, sample) {
            return Ok(());
        }
    }
    if run.args.verify && lanes.mode() == Mode::Reset {
        let differing = lane.pages_differing_from_image()?;
        lock(&run.verified).push((served_here, differing));
    }
    Ok(())
}

/// Restores one more fresh VM, which must find the memory an earlier fresh VM left, and checks
/// that memory against the image before the guest runs.
fn verify_reused_memory(lanes: &Arc<Lanes>, served: usize) -> Result<(), RestoreError> {
    let differing =
        lanes.lane().pages_differing_from_image().map_err(|source| RestoreError::Unverified { served, source })?;
    check_memory(&format!("after {served} fresh VMs, the memory they left for the next"), &differing)
}

/// Fails unless `differing` (pages of `what` that differ from the image) holds only pages the
/// host rewrites for every request, and says so.
fn check_memory(what: &str, differing: &[u64]) -> Result<(), RestoreError> {
    let unexpected: Vec<u64> = differing.iter().copied().filter(|p| !REWRITTEN_PAGES.contains(p)).collect();
    if !unexpected.is_empty() {
        return Err(RestoreError::Differs { what: what.into(), pages: unexpected });
    }
    eprintln!(
        "thaw: verify: {what} equals the image except pages {differing:?}, which the host rewrites for every request"
    );
    Ok(())
}

impl RestoreArgs {
    /// What `thaw bench IMAGE --mode MODE` serves: `runs` requests with the body `--data` or
    /// `--input` gives, one at a time, at `rate` per second if given, reported as JSON if `json`.
    pub fn for_bench(
        image: PathBuf,
        (data, input): (Option<String>, Option<PathBuf>),
        (mode, pool): (Mode, usize),
        runs: usize,
        timeout: f64,
        rate: Option<f64>,
        json: bool,
    ) -> Self {
        Self {
            image,
            token_file: None,
            holders: Vec::new(),
            no_prefetch: false,
            count: runs,
            concurrency: 1,
            mode,
            pool,
            template: false,
            hold: false,
            data,
            input,
            requests: None,
            responses: None,
            verify: false,
            json,
            timeout,
            floor: false,
            rate,
            devices: crate::devices::RestoreDevices::default(),
            backends: crate::devices::Backends::default(),
            seccomp: crate::SeccompArgs { no_seccomp: false },
        }
    }
}

/// Runs `thaw restore` and returns the process exit code.
pub fn run(args: &RestoreArgs) -> Result<u8, RestoreError> {
    let floor = if args.floor { Some(Floor::measure(args.count.min(500))?) } else { None };
    serve_batch(args, floor)
}

/// Serves the batch `args` describes and reports on it, with the ratio to `floor` if given.
pub fn serve_batch(args: &RestoreArgs, floor: Option<Floor>) -> Result<u8, RestoreError> {
    if args.count == 0 || args.concurrency == 0 {
        return Err(RestoreError::NoWork);
    }
    if args.mode == Mode::Pool && args.pool == 0 {
        return Err(RestoreError::EmptyPool);
    }
    if args.verify && args.mode == Mode::Pool {
        return Err(RestoreError::VerifyPool);
    }
    if let Some(rate) = args.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(RestoreError::Rate(rate));
    }
    if args.hold && args.mode != Mode::Fresh {
        return Err(RestoreError::HoldMode);
    }
    let requests = match &args.requests {
        Some(path) => {
            let text = crate::files::read_limited(
                path,
                64 << 20,
                "request list",
                crate::kernel::parse_timeout(args.timeout)?,
            )?;
            let lines: Vec<Vec<u8>> =
                text.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
            if lines.is_empty() {
                return Err(RestoreError::NoRequests(path.clone()));
            }
            lines
        }
        None => vec![crate::invoke::request_body(
            args.data.as_ref(),
            args.input.as_ref(),
            crate::kernel::parse_timeout(args.timeout)?,
        )?],
    };
    let peer = crate::remote::is_peer_address(&args.image);
    if !peer && !args.holders.is_empty() {
        return Err(RestoreError::HolderOfFile);
    }
    let refused =
        [(args.mode == Mode::Reset, "--mode reset"), (args.template, "--template"), (args.verify, "--verify")];
    if let Some((_, option)) = refused.iter().find(|(given, _)| peer && *given) {
        return Err(RestoreError::PeerMode(option));
    }
    let head_started = Instant::now();
    let image = if peer {
        let mut urls = vec![args.image.to_string_lossy().into_owned()];
        urls.extend(args.holders.iter().cloned());
        let deadline = crate::kernel::parse_timeout(args.timeout)?;
        let (head, holders) = crate::remote::from_holders(&urls, args.token_file.as_deref(), deadline)?;
        Image::from_head(head, Arc::new(holders), !args.no_prefetch)?
    } else {
        Image::open(&args.image)?
    };
    let head_us = head_started.elapsed().as_micros() as u64;
    let image = Arc::new(if args.template { image.to_template()? } else { image });
    let timeout = crate::kernel::parse_timeout(args.timeout)?;
    let mut config = VmConfig { timeout, ..VmConfig::default() };
    args.devices.apply(&args.backends, &mut config, &image)?;
    let responses = match &args.responses {
        None => None,
        Some(path) => Some(Mutex::new(std::io::BufWriter::new(
            host_vmm::files::open_output(path, false)
                .map_err(|source| RestoreError::Responses { path: path.clone(), source })?,
        ))),
    };
    if peer {
        crate::confine_with(&args.seccomp, host_vmm::seccomp::install_with_peer)?;
    } else {
        crate::confine(&args.seccomp)?;
    }
    let lanes = Lanes::start(Arc::clone(&image), config, args.mode, args.pool)?;
    // Traffic starts once the pool is full, as it would on a node that has been up.
    lanes.fill(args.pool, timeout)?;
    let run = Run {
        args,
        requests,
        next: AtomicUsize::new(0),
        samples: Mutex::new(Vec::with_capacity(args.count)),
        statuses: Mutex::default(),
        held: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        unclean: Mutex::new(Vec::new()),
        responses,
        replaced: AtomicUsize::new(0),
        verified: Mutex::new(Vec::new()),
        started: Instant::now(),
    };
    let workers = args.concurrency.min(args.count);
    let started = run.started;
    let finished = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    if let Err(problem) = worker(&run, &lanes) {
                        run.fail(problem);
                    }
                })
            })
            .collect();
        // Only a terminal shows it, so a batch measured into a pipe has no extra thread.
        if args.count > 1 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            s.spawn(|| progress(&run, &finished));
        }
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        finished.store(true, Ordering::Relaxed);
        if let Some(panicked) = joined.into_iter().find_map(Result::err) {
            std::panic::resume_unwind(panicked);
        }
    });
    let wall = started.elapsed();
    let pool_stats = lanes.pool_stats();
    let peak_alive = lock(&run.held).len();
    drop(run.held);
    if let Some(file) = &run.responses {
        lock(file).flush().map_err(RestoreError::ResponsesWrite)?;
    }
    if let Some(problem) = run.failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(RestoreError::VmFailed(Box::new(problem)));
    }
    if args.verify && args.mode == Mode::Fresh {
        verify_reused_memory(&lanes, args.count)?;
    }
    for (served, differing) in run.verified.into_inner().unwrap_or_else(|p| p.into_inner()) {
        check_memory(&format!("after {served} requests and a reset, the kept VM's memory"), &differing)?;
    }
    // The VMs go, and with them what their memories read from a peer is counted.
    drop(lanes);
    let samples = run.samples.into_inner().unwrap_or_else(|p| p.into_inner());
    let unclean = run.unclean.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut stats = BatchStats::new(args.mode.name(), Some(image.info.guest.function_name.clone()), args.count);
    stats.source = Some(
        if peer {
            "peer"
        } else if args.template {
            "template"
        } else {
            "file"
        }
        .into(),
    );
    stats.remote = image.peer_stats().map(|lazy| crate::stats::RemoteSummary {
        head_us,
        demand_faults: lazy.demand_faults,
        demand_pages: lazy.demand_pages,
        demand_us_per_fault: (lazy.demand_time.as_micros() as u64).checked_div(lazy.demand_faults).unwrap_or(0),
        zero_page_faults: lazy.zero_faults,
        prefetched_pages: lazy.prefetched_pages,
        image_complete: lazy.complete,
    });
    stats.concurrency = args.concurrency;
    stats.alive_at_once = if args.hold { peak_alive } else { workers };
    stats.wall_ms = wall.as_millis() as u64;
    stats.requests_per_s = (samples.len() as f64 / wall.as_secs_f64().max(1e-9)).round() as u64;
    stats.statuses = run.statuses.into_inner().unwrap_or_else(|p| p.into_inner());
    stats.replaced = run.replaced.into_inner();
    stats.pool = pool_stats.map(|p| PoolSummary {
        size: args.pool,
        filled: p.filled,
        fill_rate_per_s: p.fill_rate().round() as u64,
        warmed_pages_per_vm: p.warmed_pages_per_vm(),
        ready: p.ready,
        restored_here: p.restored_here,
        restored_here_ms: p.restored_here_time.as_millis() as u64,
    });
    stats.summarize(&samples);
    if let (Some(floor), Some(to_response)) = (&floor, stats.phases.to_response_us) {
        stats.floor = Some(floor.stats.versus(to_response, args.mode != Mode::Fresh));
    }
    if args.json {
        crate::stats::print_json(&stats)?;
    } else if !samples.is_empty() {
        if let Some(floor) = &floor {
            out!("{}", floor.table())?;
        }
        out!("{}", summary(args, &stats))?;
    }
    match unclean.first() {
        None => Ok(0),
        Some(first) => Err(RestoreError::Unclean { count: unclean.len(), total: args.count, first: first.clone() }),
    }
}

/// The batch's summary as text: what was served, the pool's work, and the percentiles of every
/// measurement the mode has.
fn summary(args: &RestoreArgs, stats: &BatchStats) -> String {
    use std::fmt::Write;
    let how = match args.mode {
        Mode::Fresh => "restores".to_string(),
        Mode::Pool => format!("requests from a pool of {} parked VMs restored", args.pool),
        Mode::Reset => format!("requests to {} kept VMs reset after each, restored", stats.alive_at_once),
    };
    let mut out = format!(
        "{} {how} of {} from a {}, {} at a time, in {} ms ({} requests/s)\n",
        stats.count,
        stats.function.as_deref().unwrap_or_default(),
        stats.source.as_deref().unwrap_or_default(),
        stats.concurrency,
        stats.wall_ms,
        stats.requests_per_s
    );
    if args.hold {
        let _ = writeln!(out, "{} VMs were alive at once (held until all had answered)", stats.alive_at_once);
    }
    if let Some(p) = &stats.pool {
        let _ = writeln!(
            out,
            "pool: {} VMs parked by the filler at {} per second of its work, each after touching {} working-set pages; {} requests found one ready, {} found none and restored their own ({} ms in all)",
            p.filled, p.fill_rate_per_s, p.warmed_pages_per_vm, p.ready, p.restored_here, p.restored_here_ms
        );
    }
    if let Some(r) = &stats.remote {
        let _ = writeln!(
            out,
            "from the peer: its restore head in {} µs; {} pages read on demand in {} faults ({} µs a fault), {} faults on zero pages, {} pages prefetched; the image is {} here",
            r.head_us,
            r.demand_pages,
            r.demand_faults,
            r.demand_us_per_fault,
            r.zero_page_faults,
            r.prefetched_pages,
            if r.image_complete { "all" } else { "not all" },
        );
    }
    if stats.replaced > 0 {
        let _ = writeln!(
            out,
            "{} kept VMs were destroyed and replaced (their guest ended other than by answering)",
            stats.replaced
        );
    }
    out.push_str(&stats.table());
    if let Some(line) = stats.floor.as_ref().and_then(|f| f.describe("restore to response")) {
        let _ = writeln!(out, "{line}");
    }
    out
}
