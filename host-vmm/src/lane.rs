//! The serving lifecycle, in one place: how a VM is made ready for a request, serves it, and is
//! put back, in each [`Mode`]. `thaw invoke`, `restore`, `bench`, `demo` and `serve` are loops
//! over a [`Lane`]; nothing above host-vmm restores, parks, resets or discards a VM itself.
//!
//! ```text
//!  mode    ready (ahead of requests)        serve (on the request's path)     put back (after the answer)
//!  fresh   -                                restore ─▶ run                    destroy; its memory goes back
//!                                                                             to the image for the next
//!  pool    the pool's filler parks VMs      take a parked VM ─▶ run           hand it to the pool's reaper
//!          (pool.rs)                        (none parked: restore ─▶ run,
//!                                           as fresh does)
//!  reset   restore ─▶ park, once            run                               reset it to the image; replace
//!                                                                             it when its guest broke
//! ```
//!
//! Every lane of one image shares a [`Lanes`]: the image, how its VMs run, the mode and, in pool
//! mode, the pool. Each lane serves one request at a time, on the thread that calls it.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::instance::{Instance, Served};
use crate::memory::DirtyPages;
use crate::pool::{Pool, PoolStats};
use crate::snapshot::Image;
use crate::vm::{BootTimings, Role, VmConfig, VmmError, thread_minor_faults};

/// How a lane gets a VM for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A fresh VM restored on the request path, destroyed after its answer.
    Fresh,
    /// A VM restored and parked ahead by a background filler, destroyed off the request path
    /// after its answer. A request that finds none parked restores one itself, as fresh does.
    Pool,
    /// One kept VM per lane, reset to the image after every request (its changed pages copied
    /// back, fresh entropy and instance id); the next request comes in with its resume.
    Reset,
}

impl Mode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [Mode; 3] = [Mode::Fresh, Mode::Pool, Mode::Reset];

    /// Its name on the command line, in settings and in stats.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Pool => "pool",
            Self::Reset => "reset",
        }
    }

    /// One line on what it does, for `--help`.
    pub fn about(self) -> &'static str {
        match self {
            Self::Fresh => "a fresh VM restored on the request path, destroyed after its answer",
            Self::Pool => {
                "VMs restored and parked ahead by a background filler, destroyed off the request path; a request that finds none parked restores its own"
            }
            Self::Reset => {
                "one kept VM per worker, reset to the image after every request (its changed pages copied back, fresh entropy and instance id)"
            }
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|mode| mode.name() == s).ok_or_else(|| format!("{s:?} is not fresh, pool or reset"))
    }
}

/// What every lane of one image shares.
pub struct Lanes {
    image: Arc<Image>,
    config: VmConfig,
    mode: Mode,
    /// Pool mode's parked VMs.
    pool: Option<Pool>,
}

impl Lanes {
    /// Lanes serving `image` in `mode`, each VM run as `config` says. Pool mode starts the
    /// pool's filler, which keeps `pool` VMs parked (at least one).
    pub fn start(image: Arc<Image>, config: VmConfig, mode: Mode, pool: usize) -> Result<Arc<Self>, VmmError> {
        let pool = match mode {
            Mode::Pool => Some(Pool::start(Arc::clone(&image), config.clone(), pool)?),
            Mode::Fresh | Mode::Reset => None,
        };
        Ok(Arc::new(Self { image, config, mode, pool }))
    }

    /// A new lane, with no VM of its own yet.
    pub fn lane(self: &Arc<Self>) -> Lane {
        Lane { lanes: Arc::clone(self), ready: None, used: None }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// In pool mode: waits until the filler has parked `count` VMs (traffic then finds the pool
    /// as on a node that has been up), as [`Pool::wait_filled`].
    pub fn fill(&self, count: usize, timeout: Duration) -> Result<(), VmmError> {
        self.pool.as_ref().map_or(Ok(()), |pool| pool.wait_filled(count, timeout))
    }

    /// What the pool has done so far (pool mode).
    pub fn pool_stats(&self) -> Option<PoolStats> {
        self.pool.as_ref().map(Pool::stats)
    }
}

/// How a VM was put back after its request.
#[derive(Debug, Default)]
pub struct PutBack {
    /// Reset mode: how long the reset took, and the pages it copied back.
    pub reset: Option<(Duration, DirtyPages)>,
    /// Reset mode: the guest did not end so that its VM may serve again, so the VM was
    /// destroyed and another restored and parked in its place.
    pub replaced: bool,
    /// Reset mode: how long readying the replacement took, when it was readied.
    pub readied: Option<Duration>,
}

/// One request at a time through one image's lifecycle: ready, serve, put back.
pub struct Lane {
    lanes: Arc<Lanes>,
    /// Reset mode: the kept VM, parked or reset, waiting for its next request.
    ready: Option<Instance>,
    /// The VM that served the last request, until it is put back.
    used: Option<Instance>,
}

impl Lane {
    /// Readies the lane ahead of its next request: in reset mode, restores and parks a kept VM
    /// if it has none. Returns how long that took, or `None` when there was nothing to do.
    pub fn ready(&mut self) -> Result<Option<Duration>, VmmError> {
        if self.lanes.mode != Mode::Reset || self.ready.is_some() {
            return Ok(None);
        }
        let started = Instant::now();
        self.ready = Some(self.restore_parked()?);
        Ok(Some(started.elapsed()))
    }

    /// A kept VM, restored and parked: it has resumed from its checkpoint (touching the
    /// working set) and waits for its request.
    fn restore_parked(&self) -> Result<Instance, VmmError> {
        let lanes = &self.lanes;
        let mut instance = Instance::restore(&lanes.image, &lanes.config, Role::Kept, &mut BootTimings::default())?;
        instance.park(&mut std::io::sink())?;
        Ok(instance)
    }

    /// Serves `request` the mode's way, the guest's console going to `output`. A VM still
    /// waiting from the last request is put back first. The VM that served stays with the
    /// lane until [`Lane::put_back`] (or [`Lane::hold`]), so that the answer can go out first.
    pub fn serve(&mut self, request: Vec<u8>, output: &mut dyn Write) -> Result<Served, VmmError> {
        if self.used.is_some() {
            self.put_back()?;
        }
        let started = Instant::now();
        let faults_before = thread_minor_faults();
        let (mut instance, restored, waited) = match (self.lanes.mode, &self.lanes.pool) {
            (Mode::Reset, _) => match self.ready.take() {
                Some(kept) => (kept, None, None),
                None => (self.restore_parked()?, None, None),
            },
            (Mode::Pool, Some(pool)) => match pool.try_take()? {
                Some(parked) => (parked, None, Some(started.elapsed())),
                None => {
                    let (instance, timings) = restore_fresh(&self.lanes)?;
                    pool.count_restored_here(started.elapsed());
                    (instance, Some(timings), Some(started.elapsed()))
                }
            },
            (Mode::Fresh | Mode::Pool, _) => {
                let (instance, timings) = restore_fresh(&self.lanes)?;
                (instance, Some(timings), None)
            }
        };
        let mut served = instance.serve(request, output)?;
        served.timings.to_response = started.elapsed();
        served.page_faults = thread_minor_faults().saturating_sub(faults_before);
        served.timings.restored = restored;
        served.timings.waited = waited;
        self.used = Some(instance);
        Ok(served)
    }

    /// The VM that served the last request, until it is put back.
    pub fn used(&self) -> Option<&Instance> {
        self.used.as_ref()
    }

    /// Whether it holds a VM: a kept one ready, or the one that served last.
    pub fn holds_vm(&self) -> bool {
        self.ready.is_some() || self.used.is_some()
    }

    /// What it shares with the other lanes of its image.
    pub fn lanes(&self) -> &Arc<Lanes> {
        &self.lanes
    }

    /// Takes the VM that served the last request out of the lane, to keep it alive (`thaw
    /// restore --hold`); dropping it destroys it.
    pub fn hold(&mut self) -> Option<Instance> {
        self.used.take()
    }

    /// Puts back the VM that served the last request: in fresh mode destroys it (its memory
    /// goes back to the image for the next fresh VM), in pool mode hands it to the reaper, in
    /// reset mode resets it to the image or, when its guest ended so that it may not serve
    /// again ([`Served::reusable`]), destroys it and readies another. A VM whose reset fails is
    /// destroyed, and the next request restores another.
    pub fn put_back(&mut self) -> Result<PutBack, VmmError> {
        let Some(mut instance) = self.used.take() else { return Ok(PutBack::default()) };
        match (self.lanes.mode, &self.lanes.pool) {
            (Mode::Reset, _) if instance.reusable() => {
                let started = Instant::now();
                let dirty = instance.reset()?;
                self.ready = Some(instance);
                Ok(PutBack { reset: Some((started.elapsed(), dirty)), ..PutBack::default() })
            }
            (Mode::Reset, _) => {
                drop(instance);
                Ok(PutBack { replaced: true, readied: self.ready()?, ..PutBack::default() })
            }
            (Mode::Pool, Some(pool)) => {
                pool.discard(instance);
                Ok(PutBack::default())
            }
            (Mode::Fresh | Mode::Pool, _) => Ok(PutBack::default()),
        }
    }
}

impl Lane {
    /// For `--verify`: the guest pages that differ from the image in the VM this lane's next
    /// request would get, before its guest runs. Reset mode: the kept VM, reset. Fresh mode: a
    /// VM restored now, which must reuse memory an earlier fresh VM left
    /// ([`VmmError::NoSpareMemory`] otherwise). A pool's VMs have run before they are taken,
    /// so pool mode has none to check ([`VmmError::NothingToVerify`]).
    pub fn pages_differing_from_image(&mut self) -> Result<Vec<u64>, VmmError> {
        self.put_back()?;
        match self.lanes.mode {
            Mode::Reset => {
                self.ready()?;
                let kept = self.ready.as_mut().ok_or(VmmError::NothingToVerify)?;
                kept.reset()?;
                kept.pages_differing_from_image()
            }
            Mode::Fresh => {
                let spares = self.lanes.image.spares();
                let (instance, _) = restore_fresh(&self.lanes)?;
                if self.lanes.image.spares() >= spares {
                    return Err(VmmError::NoSpareMemory);
                }
                instance.pages_differing_from_image()
            }
            Mode::Pool => Err(VmmError::NothingToVerify),
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // A used VM of a pool goes to its reaper; any other is destroyed here.
        if let (Some(instance), Some(pool)) = (self.used.take(), &self.lanes.pool) {
            pool.discard(instance);
        }
    }
}

/// Restores a VM for one request, on the request's path: memory an earlier fresh VM left, or a
/// new mapping with the working set copied in ([`Role::Fresh`]).
fn restore_fresh(lanes: &Lanes) -> Result<(Instance, BootTimings), VmmError> {
    let mut timings = BootTimings::default();
    let instance = Instance::restore(&lanes.image, &lanes.config, Role::Fresh, &mut timings)?;
    Ok((instance, timings))
}
