//! One VM's life from an image: restore it, run it until it waits for a request (parked),
//! serve one request, reset it to the image, and destroy it (drop). Every way thaw serves from
//! an image goes through here, so there is one restore path; which steps each mode takes, and
//! when, is decided in one place, the lane (`lane.rs`):
//!
//! ```text
//!  fresh:  restore ─▶ serve ─▶ drop                        (all on the request path but the
//!                                                           memory's reset for the next one)
//!  pool:   restore ─▶ park ···▶ serve ─▶ drop               (park ahead: pool.rs; drop off the path)
//!  reset:  restore ─▶ park ···▶ serve ─▶ reset ···▶ serve ─▶ reset ···▶ …   (one kept VM)
//! ```
//!
//! A serve to a VM still at its checkpoint (fresh, and reset after its first request) hands
//! the request in with the checkpoint's result, so the guest resumes and answers in one run.
//!
//! A VM is reused only after an answer or a timeout. Anything else (the guest kernel panicked,
//! faulted, exited or broke the protocol) may mean its own state is corrupt, so the lane
//! destroys it ([`Served::reusable`]). Even then a reset restores every byte the guest or the
//! host changed, so nothing of one request reaches the next (docs/ARCHITECTURE.md, threat model).

use std::io::Write;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::params::InstanceId;

use crate::mailbox::Mailbox;
use crate::memory::DirtyPages;
use crate::outcome::{FunctionResponse, Outcome};
use crate::snapshot::Image;
use crate::virtio::DeviceStats;
use crate::vm::{BootTimings, CheckpointMode, Role, Vm, VmConfig, VmmError};

/// A VM restored from an image, and where it is in its life. Dropping it destroys the VM
/// ([`Vm::destroy`]).
pub struct Instance {
    image: Arc<Image>,
    config: VmConfig,
    /// Taken out only when the instance drops.
    vm: ManuallyDrop<Vm>,
    mailbox: Mailbox,
    /// Restored or reset, and not run since: its guest is still at its checkpoint.
    at_checkpoint: bool,
    /// Its last request ended so that it may serve again ([`Served::reusable`]).
    reusable: bool,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `vm` is taken exactly once, here, and the instance is never used again.
        let vm = unsafe { ManuallyDrop::take(&mut self.vm) };
        vm.destroy(&self.image);
    }
}

/// How one request went: the one result every way of serving gives ([`crate::lane::Lane::serve`]).
#[derive(Debug)]
pub struct Served {
    /// The instance id of the VM that served it.
    pub instance_id: InstanceId,
    /// [`Outcome::Answered`] when the function answered (`response` says how), otherwise how the
    /// guest ended.
    pub outcome: Outcome,
    /// The function's response.
    pub response: Option<FunctionResponse>,
    /// VM exits during the request (the guest's resume included when it was not parked).
    pub exits: u64,
    /// Minor page faults the serving thread took for it, from its lane's start (0 when the
    /// instance was served without a lane).
    pub page_faults: u64,
    /// Counters of the serving VM's devices.
    pub devices: Vec<DeviceStats>,
    /// Where its time went.
    pub timings: ServeTimings,
}

/// Where a served request's time went.
#[derive(Debug, Clone, Default)]
pub struct ServeTimings {
    /// From the request reaching its lane (or the VM) to its response, or the guest's end:
    /// getting a VM included, and the guest's resume from its checkpoint when it was not parked.
    pub to_response: Duration,
    /// The phases of a restore made on the request's path (fresh mode, or a pool with none
    /// parked).
    pub restored: Option<BootTimings>,
    /// Pool mode: getting a VM, a parked one or, when none was, one restored here.
    pub waited: Option<Duration>,
    /// When the VM was not parked and asked for its request: from the first `KVM_RUN` to the
    /// guest taking it (`None` when the request came with the checkpoint's result).
    pub resume: Option<Duration>,
}

impl Served {
    /// True when the function answered cleanly
    /// ([`crate::outcome::FunctionStatus::is_clean`]), as the stats' status says.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Answered) && self.response.as_ref().is_some_and(|r| r.status.is_clean())
    }

    /// True when the VM may be reset and serve again: the function answered (whatever its
    /// status) or ran out of time. A guest kernel that panicked, faulted, exited or misused the
    /// protocol is not trusted again.
    pub fn reusable(&self) -> bool {
        matches!(self.outcome, Outcome::Answered | Outcome::TimedOut(_))
    }
}

impl Instance {
    /// Restores a fresh VM from `image` for `role` (see [`Vm::restore`]). Only a
    /// [`Role::Kept`] VM can be [`reset`](Instance::reset).
    pub fn restore(
        image: &Arc<Image>,
        config: &VmConfig,
        role: Role,
        timings: &mut BootTimings,
    ) -> Result<Self, VmmError> {
        let vm = Vm::restore(image, config, role, timings)?;
        Ok(Self {
            image: Arc::clone(image),
            config: config.clone(),
            vm: ManuallyDrop::new(vm),
            mailbox: Mailbox::parking(),
            at_checkpoint: true,
            reusable: true,
        })
    }

    /// Runs the guest until it waits for its request: it resumes from its checkpoint, reseeds
    /// and sets its clock from the fresh host parameters. Returns how long it took, or
    /// [`VmmError::NotParked`] with how the guest ended instead.
    pub fn park(&mut self, output: &mut dyn Write) -> Result<Duration, VmmError> {
        let started = Instant::now();
        self.at_checkpoint = false;
        let (outcome, _) = self.vm.run(
            output,
            &mut self.mailbox,
            self.config.ready_timeout,
            CheckpointMode::Continue,
            &mut BootTimings::default(),
        )?;
        match outcome {
            Outcome::Parked => Ok(started.elapsed()),
            outcome => {
                self.reusable = false;
                Err(VmmError::NotParked(outcome))
            }
        }
    }

    /// Hands `request` to the guest and runs it until it answers (or ends). A parked guest
    /// takes it at once; one that has not run since its restore or reset resumes first, and
    /// finds a request of up to 4080 bytes in its checkpoint's result (a guest of interface 6
    /// on), which saves the VM exit that would ask for it.
    pub fn serve(&mut self, request: Vec<u8>, output: &mut dyn Write) -> Result<Served, VmmError> {
        let started = Instant::now();
        let was_parked = self.mailbox.is_parked();
        let handed_in = std::mem::take(&mut self.at_checkpoint)
            && self.image.info.guest.interface_version >= abi::FIRST_REQUEST_IN_RESULT_SINCE
            && self.vm.hand_in_first_request(&request)?;
        if handed_in {
            self.mailbox.handed_in();
        } else if let Err(error) = self.mailbox.deliver(self.vm.memory(), request) {
            self.reusable = false;
            return Ok(Served {
                instance_id: self.vm.instance_id(),
                outcome: Outcome::Failed { error, rip: None },
                response: None,
                exits: 0,
                page_faults: 0,
                devices: self.vm.device_stats(),
                timings: ServeTimings { to_response: started.elapsed(), ..ServeTimings::default() },
            });
        }
        let mut timings = BootTimings::default();
        let (outcome, exits) =
            self.vm.run(output, &mut self.mailbox, self.config.timeout, CheckpointMode::Continue, &mut timings)?;
        let to_response = started.elapsed();
        let response = self.mailbox.responses.pop();
        let resume = if was_parked || handed_in { None } else { timings.to_first_request };
        let served = Served {
            instance_id: self.vm.instance_id(),
            outcome,
            response,
            exits,
            page_faults: 0,
            devices: self.vm.device_stats(),
            timings: ServeTimings { to_response, resume, ..ServeTimings::default() },
        };
        self.reusable = served.reusable();
        Ok(served)
    }

    /// Whether its last request ended so that it may serve again ([`Served::reusable`]).
    pub fn reusable(&self) -> bool {
        self.reusable
    }

    /// Resets a kept VM to the image (see [`Vm::reset`], which refuses a VM not restored to be
    /// kept): fresh entropy, a new instance id and the current clock, every changed page copied
    /// back, devices detached. Returns the pages copied back.
    pub fn reset(&mut self) -> Result<DirtyPages, VmmError> {
        let dirty = self.vm.reset(&self.image, &self.config)?;
        self.mailbox = Mailbox::parking();
        self.at_checkpoint = true;
        self.reusable = true;
        Ok(dirty)
    }

    /// The guest pages that differ from the image (see [`Vm::pages_differing_from`]).
    pub fn pages_differing_from_image(&self) -> Result<Vec<u64>, VmmError> {
        self.vm.pages_differing_from(&self.image)
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM, to change it between runs (recording a working set).
    pub(crate) fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }
}
