//! One deployed function version while it serves: its image, a bounded queue of requests, and
//! `concurrency` vCPU threads that take requests from the queue. Each thread is a lane of
//! host-vmm's one serving lifecycle (`host_vmm::lane`), which gets its VMs the way the
//! function's mode says. The async side only queues a request and awaits its answer: no VM ever
//! runs on the runtime's threads.
//!
//! When the last handle to a `Deployed` goes (the registry replaced or removed it, and every
//! request that took it has its answer), its queue closes; each thread serves what is still
//! queued, destroys its VM and ends. The server joins the threads when it stops.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use host_vmm::virtio::vsock::Services;
use host_vmm::{FunctionStatus, Image, Lane, Lanes, Mode, Outcome, PoolStats, Served, VmConfig, VmmError};
use tokio::sync::oneshot;

use super::logs::Capture;
use super::metrics::FunctionMetrics;
use super::settings::Serving;

/// How long a new version may take to ready its VMs, at least (its init limit, if longer).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a version could not start, or a request got no answer from its VM.
#[derive(Debug, thiserror::Error)]
pub enum DeployedError {
    /// A vCPU thread could not be started.
    #[error("starting a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// A VM could not be readied for the version.
    #[error("readying a VM: {0}")]
    Ready(VmmError),
    /// The VMs took longer than this to be ready.
    #[error("the VMs were not ready within {} s", .0.as_secs())]
    NotReady(Duration),
    /// The vCPU thread ended before it answered.
    #[error("the vCPU thread serving it ended")]
    ThreadEnded,
    /// The VM could not serve the request.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// vCPU threads of versions that were replaced or removed, for the server to join at its end.
pub type Retired = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// How one request went, from the vCPU thread's side.
#[derive(Debug)]
pub struct Answer {
    /// What the lane reported: the VM's instance id, how the guest ended, the response.
    pub served: Served,
    /// From arriving in the queue to a vCPU thread taking it.
    pub queued: Duration,
    /// From the thread taking it to the answer (a fresh VM's restore included).
    pub took: Duration,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is full.
    Full,
    /// The version is shutting down.
    Closed,
}

struct Job {
    body: Vec<u8>,
    arrived: Instant,
    reply: oneshot::Sender<Result<Answer, DeployedError>>,
}

/// A function version that is serving.
pub struct Deployed {
    /// The version: its bundle's SHA-256.
    pub version: String,
    /// How it is served.
    pub serving: Serving,
    /// What its function has done (shared by all its versions).
    pub metrics: Arc<FunctionMetrics>,
    lanes: Arc<Lanes>,
    /// The stored image its VMs are restored from.
    image: Arc<Image>,
    /// Its file's length when this version started.
    image_len: u64,
    queue: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    retired: Retired,
}

impl Deployed {
    /// Starts serving `image` at `version`, its vsock ports reaching `services`, its vCPU
    /// threads polling `poll` for the next request before they sleep, counting into `metrics`.
    /// Returns once it is ready for traffic: in reset mode every thread has restored and
    /// parked its kept VM, in pool mode the pool has parked a VM. A VM that cannot be readied
    /// fails the start, with why.
    pub fn start(
        version: &str,
        serving: &Serving,
        image: Arc<Image>,
        services: Services,
        poll: Duration,
        metrics: Arc<FunctionMetrics>,
        retired: Retired,
    ) -> Result<Self, DeployedError> {
        let init_timeout = Duration::from_millis(serving.init_timeout_ms);
        let mut config = VmConfig {
            timeout: Duration::from_millis(serving.timeout_ms),
            ready_timeout: init_timeout,
            ..VmConfig::default()
        };
        config.backends.services = services;
        let (config_timeout, remote) = (config.timeout, image.is_remote());
        let lanes = Lanes::start(Arc::clone(&image), config, serving.mode, serving.pool)?;
        let (queue, jobs) = mpsc::sync_channel(serving.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        let (ready, readied) = mpsc::channel();
        let mut threads = Vec::with_capacity(serving.concurrency);
        for index in 0..serving.concurrency {
            let worker = Worker { lane: lanes.lane(), metrics: Arc::clone(&metrics), poll, live: false };
            let (jobs, ready) = (Arc::clone(&jobs), ready.clone());
            let thread = std::thread::Builder::new()
                .name(format!("thaw-vcpu-{index}"))
                .spawn(move || worker.run(&jobs, &ready))
                .map_err(DeployedError::Thread)?;
            threads.push(thread);
        }
        drop(ready);
        // Built before the wait, so that a failed start closes the queue and ends the threads.
        let deployed = Self {
            version: version.to_string(),
            serving: serving.clone(),
            metrics,
            lanes: Arc::clone(&lanes),
            image_len: image_len(&image),
            image,
            queue: Some(queue),
            threads,
            retired,
        };
        // A VM restored from a peer's memory is ready after a few of its page reads, each given
        // half the request's timeout: one not ready in twice that timeout will not be.
        let within = if remote { config_timeout * 2 } else { init_timeout.max(READY_TIMEOUT) };
        let deadline = Instant::now() + within;
        for _ in 0..serving.concurrency {
            match readied.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(DeployedError::Ready(error)),
                Err(_) => return Err(DeployedError::NotReady(within)),
            }
        }
        lanes.fill(1, deadline.saturating_duration_since(Instant::now())).map_err(|e| match e {
            VmmError::PoolSlow { failing: None, .. } => DeployedError::NotReady(within),
            e => DeployedError::Ready(e),
        })?;
        Ok(deployed)
    }

    /// Queues `body`; the receiver gets the answer (or why the VM could not give one).
    pub fn submit(&self, body: Vec<u8>) -> Result<oneshot::Receiver<Result<Answer, DeployedError>>, Rejected> {
        let (reply, answer) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(Rejected::Closed)?;
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(Job { body, arrived: Instant::now(), reply }) {
            Ok(()) => Ok(answer),
            Err(error) => {
                self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                match error {
                    TrySendError::Full(_) => {
                        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                        Err(Rejected::Full)
                    }
                    TrySendError::Disconnected(_) => Err(Rejected::Closed),
                }
            }
        }
    }

    /// Refuses a request, counted as rejected, when its queue is full now, so that its body
    /// need not be read. An early answer only: [`Deployed::submit`] decides. A queue of 0 (a
    /// request is taken only by a thread that waits for one) is never full here.
    pub fn admit(&self) -> Result<(), Rejected> {
        let queued = usize::try_from(self.metrics.queued.load(Ordering::Relaxed)).unwrap_or(0);
        if self.serving.queue > 0 && queued >= self.serving.queue {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(Rejected::Full);
        }
        Ok(())
    }

    /// VMs alive for its function now: those vCPU threads hold, and this version's pool's.
    pub fn live_vms(&self) -> u64 {
        let pooled =
            self.pool_stats().map_or(0, |stats| (stats.filled + stats.restored_here).saturating_sub(stats.destroyed));
        u64::try_from(self.metrics.live_vms.load(Ordering::Relaxed)).unwrap_or(0) + pooled
    }

    /// The stored image its VMs are restored from.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Whether the stored image its VMs are restored from still has the length it was opened
    /// with: a file cut short under it can no longer be restored from.
    pub fn image_intact(&self) -> bool {
        image_len(&self.image) == self.image_len
    }

    /// What this version's pool has done (pool mode).
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.lanes.pool_stats()
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        // Closing the queue ends each thread once it has served what is queued.
        self.queue = None;
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.append(&mut self.threads);
    }
}

/// One vCPU thread's state.
struct Worker {
    lane: Lane,
    metrics: Arc<FunctionMetrics>,
    /// How long it polls for the next request before it sleeps.
    poll: Duration,
    /// Its lane holds a VM, counted in `metrics.live_vms`: a kept VM (reset mode), or the VM
    /// that served last, until it is put back. A pool's VMs are counted by the pool.
    live: bool,
}

impl Worker {
    fn run(mut self, jobs: &Mutex<Receiver<Job>>, ready: &mpsc::Sender<Result<(), VmmError>>) {
        let _ = ready.send(self.ready());
        loop {
            // Ahead of the request: a failure here is met again by the request, which reports it.
            let _ = self.ready();
            let job = next_job(&jobs.lock().unwrap_or_else(|p| p.into_inner()), self.poll);
            let Ok(job) = job else { break };
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let queued = job.arrived.elapsed();
            let started = Instant::now();
            let mut output = Capture::default();
            let result = match self.lane.serve(job.body, &mut output) {
                Ok(served) => Ok(Answer { served, queued, took: started.elapsed() }),
                Err(error) => {
                    self.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
                    self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                    Err(DeployedError::Vmm(error))
                }
            };
            if let Ok(answer) = &result {
                self.count(answer);
                let (logs, id) = (&self.metrics.logs, answer.served.instance_id);
                if let Some(response) = &answer.served.response {
                    self.metrics.handle.observe(response.handle_time);
                    logs.add(id, "stderr", &response.stderr);
                }
                logs.add(id, "console", &output.finish());
                if let Some(t) = &answer.served.timings.restored {
                    self.metrics.restore.observe(t.load + t.vm_create + t.vcpu_setup + t.state_set.unwrap_or_default());
                }
            }
            self.count_live();
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = job.reply.send(result);
            self.put_back();
        }
        // The thread ends, and its lane's VMs with it.
        if self.live {
            self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Readies its lane (reset mode: a kept VM restored and parked, when it has none).
    fn ready(&mut self) -> Result<(), VmmError> {
        match self.lane.ready() {
            Ok(Some(took)) => {
                self.metrics.restore.observe(took);
                self.count_live();
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => {
                self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Puts back the VM that served, after its answer went out.
    fn put_back(&mut self) {
        match self.lane.put_back() {
            Ok(put_back) => {
                if let Some((took, _)) = put_back.reset {
                    self.metrics.resets.fetch_add(1, Ordering::Relaxed);
                    self.metrics.restore.observe(took);
                }
                if put_back.replaced {
                    self.metrics.replaced.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(took) = put_back.readied {
                    self.metrics.restore.observe(took);
                }
            }
            Err(_) => {
                self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count_live();
    }

    /// Counts whether its lane holds a VM now in `metrics.live_vms`.
    fn count_live(&mut self) {
        let live = self.lane.lanes().mode() != Mode::Pool && self.lane.holds_vm();
        if live != self.live {
            let counter = &self.metrics.live_vms;
            if live {
                counter.fetch_add(1, Ordering::Relaxed)
            } else {
                counter.fetch_sub(1, Ordering::Relaxed)
            };
            self.live = live;
        }
    }

    fn count(&self, answer: &Answer) {
        let c = &self.metrics;
        let served = &answer.served;
        let counter = match (&served.outcome, served.response.as_ref().map(|r| &r.status)) {
            (Outcome::Answered, Some(FunctionStatus::Ok | FunctionStatus::Exited(0))) => &c.ok,
            (Outcome::Answered, _) => &c.function_errors,
            (Outcome::TimedOut(_), _) => &c.timeouts,
            _ => &c.vm_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The length of `image`'s file now (0 when it cannot be read).
fn image_len(image: &Image) -> u64 {
    image.file().metadata().map_or(0, |m| m.len())
}

/// The next job: polled for up to `window`, yielding the core to any other thread that is
/// ready to run, then waited for. A sleeping thread takes about 25 µs to wake on a virtual
/// machine whose idle cores halt (docs/BENCHMARKS.md), and the polling saves most of that for
/// the next request of a busy function; the one thread holding the queue's lock polls, the
/// others sleep.
fn next_job(jobs: &Receiver<Job>, window: Duration) -> Result<Job, mpsc::RecvError> {
    let started = Instant::now();
    loop {
        match jobs.try_recv() {
            Ok(job) => return Ok(job),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) if started.elapsed() < window => std::thread::yield_now(),
            Err(mpsc::TryRecvError::Empty) => return jobs.recv(),
        }
    }
}
