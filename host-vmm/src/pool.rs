//! The parked pool: VMs restored from one image and run until they wait for their request,
//! kept ready by a background filler thread, so that a request pays only for its own handling.
//!
//! The filler restores and parks one VM at a time and hands it over a bounded channel: at most
//! `size` VMs wait parked, plus the one being prepared. Keep `size` small: on PVM every live VM
//! mapping the same image makes first touches slower for all of them (DESIGN.md). A request
//! [`try_take`](Pool::try_take)s a parked VM; when requests outrun the filler it finds none and
//! its lane restores one on its own thread (`lane.rs`), counted in [`PoolStats`], rather than
//! queueing behind the filler. Used VMs go to a reaper thread that drops them, so destroying a VM
//! (closing its vCPU and VM, unmapping its memory) happens off the request path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::instance::Instance;
use crate::snapshot::Image;
use crate::vm::{BootTimings, Role, VmConfig, VmmError};

/// What the pool has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// VMs the filler restored and parked.
    pub filled: u64,
    /// Time the filler spent restoring and parking them.
    pub fill_time: Duration,
    /// Requests that found a parked VM waiting.
    pub ready: u64,
    /// Requests that found none parked, and were served by a VM restored on their own thread.
    pub restored_here: u64,
    /// Total time those requests took to get their VM.
    pub restored_here_time: Duration,
    /// Used VMs the reaper destroyed.
    pub destroyed: u64,
    /// Working-set pages the filled VMs' guests touched before parking, in all.
    pub warmed_pages: u64,
}

impl PoolStats {
    /// VMs the filler can park per second of its own work (its sustained rate when it never
    /// waits for room).
    pub fn fill_rate(&self) -> f64 {
        self.filled as f64 / self.fill_time.as_secs_f64().max(1e-9)
    }

    /// Working-set pages each filled VM's guest touched before parking, on average.
    pub fn warmed_pages_per_vm(&self) -> u64 {
        self.warmed_pages / self.filled.max(1)
    }
}

#[derive(Default)]
struct Counters {
    filled: AtomicU64,
    fill_nanos: AtomicU64,
    ready: AtomicU64,
    restored_here: AtomicU64,
    restored_here_nanos: AtomicU64,
    destroyed: AtomicU64,
    warmed_pages: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// VMs parked ahead of requests, for one image.
pub struct Pool {
    /// Behind a lock so that several request threads can take from one pool.
    parked: Option<Mutex<Receiver<Instance>>>,
    reaper: Option<Sender<Instance>>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts the filler, which keeps `size` VMs (at least one) parked from `image`, and the
    /// reaper.
    pub fn start(image: Arc<Image>, config: VmConfig, size: usize) -> Result<Self, VmmError> {
        let (to_pool, parked) = mpsc::sync_channel(size.max(1));
        let (reaper, used) = mpsc::channel::<Instance>();
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let spawn_error = VmmError::Threads;
        let filler = {
            let (stop, failure, counters) = (Arc::clone(&stop), Arc::clone(&failure), Arc::clone(&counters));
            std::thread::Builder::new()
                .name("thaw-pool-filler".into())
                .spawn(move || fill(&image, &config, &to_pool, &stop, &failure, &counters))
                .map_err(spawn_error)?
        };
        let reaper_thread = {
            let counters = Arc::clone(&counters);
            std::thread::Builder::new()
                .name("thaw-pool-reaper".into())
                .spawn(move || {
                    for instance in used {
                        drop(instance);
                        counters.destroyed.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .map_err(spawn_error)?
        };
        Ok(Self {
            parked: Some(Mutex::new(parked)),
            reaper: Some(reaper),
            stop,
            failure,
            counters,
            threads: vec![filler, reaper_thread],
        })
    }

    /// A parked VM, if one waits now. Fails when the filler has stopped.
    pub fn try_take(&self) -> Result<Option<Instance>, VmmError> {
        let Some(parked) = &self.parked else { return Err(self.stopped()) };
        match parked.lock().unwrap_or_else(|p| p.into_inner()).try_recv() {
            Ok(instance) => {
                self.counters.ready.fetch_add(1, Ordering::Relaxed);
                Ok(Some(instance))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(self.stopped()),
        }
    }

    /// Fails when the filler has stopped.
    pub fn check(&self) -> Result<(), VmmError> {
        if self.threads.first().is_some_and(|filler| filler.is_finished()) { Err(self.stopped()) } else { Ok(()) }
    }

    fn stopped(&self) -> VmmError {
        let failure = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        VmmError::PoolStopped(failure.unwrap_or_else(|| "it exited".into()))
    }

    /// Counts a request that found none parked and got a VM restored on its own thread, in
    /// `took`.
    pub(crate) fn count_restored_here(&self, took: Duration) {
        self.counters.restored_here.fetch_add(1, Ordering::Relaxed);
        self.counters.restored_here_nanos.fetch_add(nanos(took), Ordering::Relaxed);
    }

    /// Hands a used VM to the reaper, which destroys it off the request path.
    pub fn discard(&self, instance: Instance) {
        if let Some(reaper) = &self.reaper {
            // A reaper that is gone cannot take it; then it is dropped here.
            let _ = reaper.send(instance);
        }
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> PoolStats {
        let c = &self.counters;
        PoolStats {
            filled: c.filled.load(Ordering::Relaxed),
            fill_time: Duration::from_nanos(c.fill_nanos.load(Ordering::Relaxed)),
            ready: c.ready.load(Ordering::Relaxed),
            restored_here: c.restored_here.load(Ordering::Relaxed),
            restored_here_time: Duration::from_nanos(c.restored_here_nanos.load(Ordering::Relaxed)),
            destroyed: c.destroyed.load(Ordering::Relaxed),
            warmed_pages: c.warmed_pages.load(Ordering::Relaxed),
        }
    }
}

/// The filler's loop: restore, park, hand over, until the pool stops or a VM fails.
fn fill(
    image: &Arc<Image>,
    config: &VmConfig,
    to_pool: &SyncSender<Instance>,
    stop: &AtomicBool,
    failure: &Mutex<Option<String>>,
    counters: &Counters,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let parked = Instance::restore(image, config, Role::Ahead, &mut BootTimings::default())
            .and_then(|mut instance| instance.park(&mut std::io::sink()).map(|_| instance));
        match parked {
            Ok(instance) => {
                counters.filled.fetch_add(1, Ordering::Relaxed);
                counters.fill_nanos.fetch_add(nanos(started.elapsed()), Ordering::Relaxed);
                counters.warmed_pages.fetch_add(instance.vm().warmed_pages(), Ordering::Relaxed);
                if to_pool.send(instance).is_err() {
                    return; // the pool is gone
                }
            }
            Err(e) => {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver drops the parked VMs and fails the filler's next send; dropping
        // the reaper's sender ends its loop.
        self.parked = None;
        self.reaper = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
