//! One deployed function version while it serves: its image, a bounded queue of requests, and
//! `concurrency` vCPU threads that take requests from the queue. Each thread gets its VMs the
//! way the function's mode says, through host-vmm's one lifecycle (`Instance`, `Pool`,
//! `serve_fresh`). The async side only queues a request and awaits its answer: no VM ever runs
//! on the runtime's threads.
//!
//! When the last handle to a `Deployed` goes (the registry replaced or removed it, and every
//! request that took it has its answer), its queue closes; each thread serves what is still
//! queued, destroys its VM and ends. The server joins the threads when it stops.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abi::params::InstanceId;
use host_vmm::virtio::vsock::Services;
use host_vmm::{
    BootTimings, FunctionResponse, FunctionStatus, Image, Instance, Outcome, Pool, PoolStats, Role, VmConfig,
};
use tokio::sync::oneshot;

use super::logs::Capture;
use super::metrics::FunctionMetrics;
use super::settings::Serving;
use crate::restore::Mode;

/// How long a new version may take to ready its VMs.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// vCPU threads of versions that were replaced or removed, for the server to join at its end.
pub type Retired = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// How one request went, from the vCPU thread's side.
#[derive(Debug)]
pub struct Answer {
    /// How the guest ended the run.
    pub outcome: Outcome,
    /// The function's response, when it answered.
    pub response: Option<FunctionResponse>,
    /// The instance id of the VM that served it.
    pub instance_id: InstanceId,
    /// From arriving in the queue to a vCPU thread taking it.
    pub queued: Duration,
    /// From the thread taking it to the answer (a fresh VM's restore included).
    pub served: Duration,
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
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// A function version that is serving.
pub struct Deployed {
    /// The version: its bundle's SHA-256.
    pub version: String,
    /// How it is served.
    pub serving: Serving,
    /// What its function has done (shared by all its versions).
    pub metrics: Arc<FunctionMetrics>,
    pool: Option<Arc<Pool>>,
    queue: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    retired: Retired,
}

impl Deployed {
    /// Starts serving `image` at `version`, its vsock ports reaching `services`, its vCPU
    /// threads polling `poll` for the next request before they sleep, counting into `metrics`: the pool's filler (pool
    /// mode) and the vCPU threads. Returns once it is ready for traffic: in reset mode every
    /// thread has restored and parked its kept VM, in pool mode the pool has parked a VM. A VM
    /// that cannot be readied fails the start, with why.
    pub fn start(
        version: &str,
        serving: &Serving,
        image: Arc<Image>,
        services: Services,
        poll: Duration,
        metrics: Arc<FunctionMetrics>,
        retired: Retired,
    ) -> Result<Self, String> {
        let mut config = VmConfig { timeout: Duration::from_millis(serving.timeout_ms), ..VmConfig::default() };
        config.backends.services = services;
        let pool = match serving.mode {
            Mode::Pool => Some(Arc::new(
                Pool::start(Arc::clone(&image), config.clone(), serving.pool).map_err(|e| e.to_string())?,
            )),
            _ => None,
        };
        let (queue, jobs) = mpsc::sync_channel(serving.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        let (ready, readied) = mpsc::channel();
        let mut threads = Vec::with_capacity(serving.concurrency);
        for index in 0..serving.concurrency {
            let worker = Worker {
                mode: serving.mode,
                image: Arc::clone(&image),
                config: config.clone(),
                pool: pool.clone(),
                metrics: Arc::clone(&metrics),
                poll,
                kept: None,
            };
            let (jobs, ready) = (Arc::clone(&jobs), ready.clone());
            let thread = std::thread::Builder::new()
                .name(format!("thaw-vcpu-{index}"))
                .spawn(move || worker.run(&jobs, &ready))
                .map_err(|e| format!("starting a vCPU thread: {e}"))?;
            threads.push(thread);
        }
        drop(ready);
        // Built before the wait, so that a failed start closes the queue and ends the threads.
        let deployed = Self {
            version: version.to_string(),
            serving: serving.clone(),
            metrics,
            pool,
            queue: Some(queue),
            threads,
            retired,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let late = || format!("the VMs were not ready within {} s", READY_TIMEOUT.as_secs());
        for _ in 0..serving.concurrency {
            match readied.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(format!("readying a VM: {error}")),
                Err(_) => return Err(late()),
            }
        }
        while deployed.pool_stats().is_some_and(|stats| stats.filled == 0) {
            if Instant::now() > deadline {
                return Err(late());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(deployed)
    }

    /// Queues `body`; the receiver gets the answer (or why the VM could not give one).
    pub fn submit(&self, body: Vec<u8>) -> Result<oneshot::Receiver<Result<Answer, String>>, Rejected> {
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

    /// VMs alive for its function now: those vCPU threads hold, and this version's pool's.
    pub fn live_vms(&self) -> u64 {
        let pooled = self.pool_stats().map_or(0, |stats| stats.filled.saturating_sub(stats.destroyed));
        u64::try_from(self.metrics.live_vms.load(Ordering::Relaxed)).unwrap_or(0) + pooled
    }

    /// What this version's pool has done (pool mode).
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.pool.as_ref().map(|pool| pool.stats())
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
    mode: Mode,
    image: Arc<Image>,
    config: VmConfig,
    pool: Option<Arc<Pool>>,
    metrics: Arc<FunctionMetrics>,
    /// How long it polls for the next request before it sleeps.
    poll: Duration,
    /// Reset mode: the kept VM (parked after its restore, at its checkpoint after a reset).
    kept: Option<Instance>,
}

/// What a served request leaves for after its answer is sent.
enum After {
    /// Nothing.
    Nothing,
    /// Reset the kept VM (its next request comes in with its resume).
    Reset,
    /// Destroy the VM (a kept one is replaced before the next request).
    Destroy(Instance),
    /// Hand the VM to the pool's reaper.
    Discard(Instance),
}

impl Worker {
    fn run(mut self, jobs: &Mutex<Receiver<Job>>, ready: &mpsc::Sender<Result<(), String>>) {
        let readied = if self.mode == Mode::Reset { self.ensure_kept().map(|_| ()) } else { Ok(()) };
        let _ = ready.send(readied);
        loop {
            if self.mode == Mode::Reset && self.kept.is_none() {
                // Ahead of the request: a failure here is reported with the next request.
                let _ = self.ensure_kept();
            }
            let job = next_job(&jobs.lock().unwrap_or_else(|p| p.into_inner()), self.poll);
            let Ok(job) = job else { break };
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let queued = job.arrived.elapsed();
            let started = Instant::now();
            let mut output = Capture::default();
            let (result, after) = match self.serve(job.body, &mut output) {
                Ok((outcome, response, instance_id, after)) => {
                    let answer = Answer { outcome, response, instance_id, queued, served: started.elapsed() };
                    (Ok(answer), after)
                }
                Err(error) => {
                    self.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
                    (Err(error), After::Nothing)
                }
            };
            if let Ok(answer) = &result {
                self.count(answer);
                let logs = &self.metrics.logs;
                if let Some(response) = &answer.response {
                    self.metrics.handle.observe(response.handle_time);
                    logs.add(answer.instance_id, "stderr", &response.stderr);
                }
                logs.add(answer.instance_id, "console", &output.finish());
            }
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = job.reply.send(result);
            self.after(after);
        }
        if self.kept.take().is_some() {
            self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn count(&self, answer: &Answer) {
        let c = &self.metrics;
        let counter = match (&answer.outcome, answer.response.as_ref().map(|r| &r.status)) {
            (Outcome::Answered, Some(FunctionStatus::Ok | FunctionStatus::Exited(0))) => &c.ok,
            (Outcome::Answered, _) => &c.function_errors,
            (Outcome::TimedOut(_), _) => &c.timeouts,
            _ => &c.vm_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn ensure_kept(&mut self) -> Result<&mut Instance, String> {
        if self.kept.is_none() {
            let started = Instant::now();
            let restored = Instance::restore(&self.image, &self.config, Role::Kept, &mut BootTimings::default())
                .map_err(|e| e.to_string())
                .and_then(|mut instance| park(&mut instance).map(|()| instance));
            let instance = restored.inspect_err(|_| {
                self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
            })?;
            self.metrics.restore.observe(started.elapsed());
            self.metrics.live_vms.fetch_add(1, Ordering::Relaxed);
            self.kept = Some(instance);
        }
        self.kept.as_mut().ok_or_else(|| "no kept VM".to_string())
    }

    /// Serves `body` the mode's way; returns the outcome, the response, the instance id and
    /// what to do once the answer is sent.
    fn serve(
        &mut self,
        body: Vec<u8>,
        sink: &mut Capture,
    ) -> Result<(Outcome, Option<FunctionResponse>, InstanceId, After), String> {
        match self.mode {
            Mode::Reset => {
                let instance = self.ensure_kept()?;
                let instance_id = instance.vm().instance_id();
                let served = instance.serve(body, sink).map_err(|e| e.to_string());
                let served = match served {
                    Ok(served) => served,
                    Err(error) => {
                        self.drop_kept();
                        return Err(error);
                    }
                };
                // A timeout is not reused either: the VM is destroyed and replaced.
                let after = if matches!(served.outcome, Outcome::Answered) {
                    After::Reset
                } else {
                    self.metrics.replaced.fetch_add(1, Ordering::Relaxed);
                    self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
                    self.kept.take().map_or(After::Nothing, After::Destroy)
                };
                Ok((served.outcome, served.response, instance_id, after))
            }
            Mode::Pool => {
                let pool = self.pool.as_ref().ok_or("pool mode without a pool")?;
                let mut instance = pool.take(self.config.timeout).map_err(|e| e.to_string())?;
                let instance_id = instance.vm().instance_id();
                let served = instance.serve(body, sink).map_err(|e| e.to_string())?;
                Ok((served.outcome, served.response, instance_id, After::Discard(instance)))
            }
            Mode::Fresh => {
                self.metrics.live_vms.fetch_add(1, Ordering::Relaxed);
                let served = host_vmm::serve_fresh(&self.image, &self.config, body, sink).map_err(|e| e.to_string());
                let (instance, report) = match served {
                    Ok(served) => served,
                    Err(error) => {
                        self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
                        self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                        return Err(error);
                    }
                };
                let t = &report.timings;
                self.metrics.restore.observe(t.load + t.vm_create + t.vcpu_setup + t.state_set.unwrap_or_default());
                let instance_id = instance.vm().instance_id();
                let response = report.responses.into_iter().next();
                Ok((report.outcome, response, instance_id, After::Destroy(instance)))
            }
        }
    }

    fn drop_kept(&mut self) {
        if self.kept.take().is_some() {
            self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
            self.metrics.replaced.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn after(&mut self, after: After) {
        match after {
            After::Nothing => {}
            After::Reset => {
                let started = Instant::now();
                let reset = match self.kept.as_mut() {
                    Some(instance) => instance.reset().map(drop).map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                if reset.is_ok() {
                    self.metrics.resets.fetch_add(1, Ordering::Relaxed);
                    self.metrics.restore.observe(started.elapsed());
                } else {
                    self.metrics.restore_failures.fetch_add(1, Ordering::Relaxed);
                    self.drop_kept();
                }
            }
            After::Destroy(instance) => {
                drop(instance);
                if self.mode == Mode::Fresh {
                    self.metrics.live_vms.fetch_sub(1, Ordering::Relaxed);
                }
            }
            After::Discard(instance) => {
                if let Some(pool) = &self.pool {
                    pool.discard(instance);
                }
            }
        }
    }
}

/// Runs a restored or reset VM until its guest waits for a request.
fn park(instance: &mut Instance) -> Result<(), String> {
    match instance.park(&mut std::io::sink()).map_err(|e| e.to_string())? {
        (Outcome::Parked, _) => Ok(()),
        (outcome, _) => Err(format!("the restored function did not wait for a request: {outcome}")),
    }
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
