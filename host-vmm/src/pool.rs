//! The parked pool: VMs restored from one image and run until they wait for their request,
//! kept ready by a background filler thread, so that a request pays only for its own handling.
//! A VM the filler cannot ready (out of descriptors or memory for a moment) is counted, shown in
//! [`PoolStats::failing`], and tried again after a backoff of 10 ms doubling to 2 s: one
//! transient error never stops the pool.
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
    /// VMs the filler could not restore or park.
    pub fill_failures: u64,
    /// Why the filler's latest attempt failed, while it retries; `None` once one succeeds.
    pub failing: Option<String>,
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
    fill_failures: AtomicU64,
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
    /// Why the filler's latest attempt failed, until one succeeds.
    failing: Arc<Mutex<Option<String>>>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts the filler, which keeps `size` VMs (at least one) parked from `image`, and the
    /// reaper.
    pub fn start(image: Arc<Image>, config: VmConfig, size: usize) -> Result<Self, VmmError> {
        let ready = move || {
            let mut instance = Instance::restore(&image, &config, Role::Ahead, &mut BootTimings::default())?;
            instance.park(&mut std::io::sink())?;
            Ok(instance)
        };
        Self::with_ready(ready, size)
    }

    /// Starts the filler, which keeps `size` VMs (at least one) parked, each made by `ready`,
    /// and the reaper.
    fn with_ready(
        ready: impl FnMut() -> Result<Instance, VmmError> + Send + 'static,
        size: usize,
    ) -> Result<Self, VmmError> {
        let (to_pool, parked) = mpsc::sync_channel(size.max(1));
        let (reaper, used) = mpsc::channel::<Instance>();
        let stop = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let spawn_error = VmmError::Threads;
        let filler = {
            let filler =
                Filler { stop: Arc::clone(&stop), failing: Arc::clone(&failing), counters: Arc::clone(&counters) };
            std::thread::Builder::new()
                .name("thaw-pool-filler".into())
                .spawn(move || filler.run(ready, |instance| instance.vm().warmed_pages(), &to_pool))
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
            failing,
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

    /// Waits until the filler has parked `count` VMs, failing when it stops or `timeout` passes
    /// first (with the filler's last failure, since it retries one for as long as it lasts).
    pub fn wait_filled(&self, count: usize, timeout: Duration) -> Result<(), VmmError> {
        let started = Instant::now();
        while self.counters.filled.load(Ordering::Relaxed) < count as u64 {
            self.check()?;
            if started.elapsed() > timeout {
                let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(VmmError::PoolSlow { within: timeout, failing });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Fails when the filler has stopped.
    pub fn check(&self) -> Result<(), VmmError> {
        if self.threads.first().is_some_and(|filler| filler.is_finished()) { Err(self.stopped()) } else { Ok(()) }
    }

    fn stopped(&self) -> VmmError {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone();
        VmmError::PoolStopped(failing.unwrap_or_else(|| "it exited".into()))
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
            fill_failures: c.fill_failures.load(Ordering::Relaxed),
            failing: self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// The first wait after a failed fill; it doubles after each failure in a row, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between failed fills.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the filler thread shares with its pool.
struct Filler {
    stop: Arc<AtomicBool>,
    failing: Arc<Mutex<Option<String>>>,
    counters: Arc<Counters>,
}

impl Filler {
    /// The filler's loop: `ready` a VM (restored and parked), hand it over, until the pool stops
    /// or is gone. A failure is counted and kept in `failing`, and `ready` is tried again after
    /// a backoff; a success clears it. `warmed` says how many working-set pages a VM touched.
    fn run<T>(
        &self,
        mut ready: impl FnMut() -> Result<T, VmmError>,
        warmed: impl Fn(&T) -> u64,
        to_pool: &SyncSender<T>,
    ) {
        let mut backoff = FIRST_BACKOFF;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match ready() {
                Ok(vm) => {
                    let c = &self.counters;
                    c.filled.fetch_add(1, Ordering::Relaxed);
                    c.fill_nanos.fetch_add(nanos(started.elapsed()), Ordering::Relaxed);
                    c.warmed_pages.fetch_add(warmed(&vm), Ordering::Relaxed);
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    backoff = FIRST_BACKOFF;
                    if to_pool.send(vm).is_err() {
                        return; // the pool is gone
                    }
                }
                Err(e) => {
                    self.counters.fill_failures.fetch_add(1, Ordering::Relaxed);
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    self.wait(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sleeps `time`, or less when the pool stops meanwhile.
    fn wait(&self, time: Duration) {
        let until = Instant::now() + time;
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(FIRST_BACKOFF.min(until.saturating_duration_since(Instant::now())));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 28, defect 2: a filler that failed once (out of descriptors) stopped for good, and
    /// every later request failed. Now it retries with a backoff, says why meanwhile, counts
    /// the failures, and clears the reason once a VM is ready again.
    #[test]
    fn the_filler_retries_after_failures_and_says_why_meanwhile() {
        let filler = Arc::new(Filler {
            stop: Arc::new(AtomicBool::new(false)),
            failing: Arc::new(Mutex::new(None)),
            counters: Arc::new(Counters::default()),
        });
        let (to_pool, parked) = mpsc::sync_channel(1);
        let (attempted, attempts) = mpsc::channel();
        let thread = {
            let filler = Arc::clone(&filler);
            std::thread::spawn(move || {
                let mut calls = 0u32;
                let ready = move || {
                    calls += 1;
                    let _ = attempted.send(calls);
                    if calls <= 3 {
                        return Err(VmmError::Threads(std::io::Error::from_raw_os_error(libc::EMFILE)));
                    }
                    Ok(calls)
                };
                filler.run(ready, |_| 5, &to_pool);
            })
        };
        for expected in 1..=3 {
            assert_eq!(attempts.recv_timeout(Duration::from_secs(10)), Ok(expected));
        }
        let failing = || filler.failing.lock().unwrap().clone();
        let during = failing().unwrap_or_default();
        assert!(during.contains("Too many open files"), "{during:?}");
        assert_eq!(parked.recv_timeout(Duration::from_secs(10)), Ok(4), "the fourth attempt parks a VM");
        assert_eq!(failing(), None, "a success clears the failure");
        let c = &filler.counters;
        assert_eq!((c.fill_failures.load(Ordering::Relaxed), c.warmed_pages.load(Ordering::Relaxed) >= 5), (3, true));
        filler.stop.store(true, Ordering::Relaxed);
        drop(parked);
        thread.join().unwrap();
    }

    /// A pool that can never park a VM is waited for only until its timeout, and then says why
    /// its filler keeps failing, not only that it was slow (before, the reason was lost).
    #[test]
    fn a_pool_that_never_parks_says_why_when_its_wait_ends() {
        let ready = || Err(VmmError::Threads(std::io::Error::from_raw_os_error(libc::EMFILE)));
        let pool = Pool::with_ready(ready, 1).unwrap();
        let e = pool.wait_filled(1, Duration::from_millis(200)).unwrap_err();
        let VmmError::PoolSlow { within, failing: Some(why) } = &e else { panic!("{e}") };
        assert_eq!(*within, Duration::from_millis(200));
        assert!(why.contains("Too many open files"), "{e}");
        assert!(e.to_string().starts_with("the pool parked no VM within 0.2 s: its filler keeps failing: "), "{e}");
    }
}
