//! The run loop: the vCPU runs until the guest ends, parks, answers or reaches its
//! checkpoint, every exit decided by [`ExitHandler::handle`], under the process's watchdog.

use std::io::Write;
use std::time::{Duration, Instant};

use abi::hypercall::{CheckpointResult, HYPERCALL_PAGE_GPA, Milestone};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::{BootTimings, Vm, VmmError, memory_error};
use crate::exit::{ExitAction, ExitError, ExitHandler};
use crate::mailbox::Mailbox;
use crate::outcome::Outcome;
use crate::watchdog::Watchdog;

/// What the run loop does when the guest reaches its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Tell the guest it is the original and let it run on (a cold invocation).
    Continue,
    /// Stop there with [`Outcome::Checkpointed`], the `out` completed, so the VM can be
    /// snapshotted with no instruction in flight.
    Capture,
}

impl Vm {
    /// Runs the vCPU until the guest ends or `timeout` passes, writing its output to `output`
    /// and serving `mailbox`.
    pub fn run(
        &mut self,
        output: &mut dyn Write,
        mailbox: &mut Mailbox,
        timeout: Duration,
        checkpoint: CheckpointMode,
        timings: &mut BootTimings,
    ) -> Result<(Outcome, u64), VmmError> {
        let watchdog = Watchdog::arm(timeout).map_err(VmmError::Watchdog)?;
        let mut handler = ExitHandler::new(&self.mem, &mut self.devices, &self.warm, output, mailbox);
        let mut exits = 0u64;
        let run_started = Instant::now();
        let mut outcome = loop {
            if watchdog.fired() {
                break Outcome::TimedOut(timeout);
            }
            match self.vcpu.run() {
                Ok(exit) => {
                    exits += 1;
                    match handler.handle(exit) {
                        Ok(ExitAction::Continue) => {}
                        Ok(ExitAction::Stop(outcome)) => break outcome,
                        Ok(ExitAction::Checkpoint(io_table)) if checkpoint == CheckpointMode::Capture => {
                            self.io_table = io_table;
                            complete_pending_io(&mut self.vcpu)?;
                            break Outcome::Checkpointed;
                        }
                        Ok(ExitAction::Checkpoint(_)) => {
                            let result = CheckpointResult::Original.encode();
                            self.mem.write_slice(&result, GuestAddress(HYPERCALL_PAGE_GPA)).map_err(memory_error)?;
                        }
                        Err(ExitError::Guest(error)) => break Outcome::Failed { error, rip: None },
                        Err(e) => return Err(VmmError::Exit(e)),
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    // A page of memory filled from a peer that could not be read is poisoned,
                    // and KVM's signal for it lands here: the guest must not run on.
                    self.watch.as_ref().map_or(Ok(()), |watch| watch.check(false))?;
                }
                Err(e) => {
                    // EFAULT: guest memory the vCPU touched has no page behind it, which for
                    // a restored VM means its image file shrank.
                    self.watch.as_ref().map_or(Ok(()), |watch| watch.check(true))?;
                    return Err(VmmError::Kvm { op: "KVM_RUN", source: e });
                }
            }
        };
        drop(watchdog);
        // A page that vanished from the image while the host touched it reads as zeros, and
        // under PVM one the guest touched may end it in any way (ring 0 is emulated, and the
        // emulator's failed read is not an EFAULT): what the VM did is not its function's. The
        // file is looked at unless the guest answered or parked, the request path's endings.
        let suspect = !matches!(outcome, Outcome::Answered | Outcome::Parked);
        self.watch.as_ref().map_or(Ok(()), |watch| watch.check(suspect))?;
        handler.finish().map_err(VmmError::Exit)?;
        self.warmed_pages += handler.warmed_pages();
        if let Outcome::Failed { rip, .. } = &mut outcome {
            *rip = self.vcpu.get_regs().ok().map(|r| r.rip);
        }
        let between = |from: Milestone, to: Milestone| {
            handler.milestone(from).zip(handler.milestone(to)).map(|(a, b)| b.saturating_duration_since(a))
        };
        timings.ring0_boot = handler.milestone(Milestone::Ring3Entered).map(|t| t - run_started);
        timings.ring3_to_ready = between(Milestone::Ring3Entered, Milestone::Ready);
        timings.compile = between(Milestone::Ready, Milestone::Compiled);
        timings.instantiate = between(Milestone::Compiled, Milestone::Instantiated);
        timings.init = between(Milestone::Instantiated, Milestone::Initialized);
        timings.to_first_request = handler.mailbox.first_request_at.map(|t| t.saturating_duration_since(run_started));
        Ok((outcome, exits))
    }
}

/// Finishes the instruction behind the last exit without running any more guest code, so the
/// vCPU's state is consistent (KVM completes port I/O only on the next `KVM_RUN`).
pub(crate) fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VmmError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(VmmError::Kvm { op: "KVM_RUN (completing the checkpoint call)", source: e }),
        Ok(()) => Err(VmmError::RanWhileCompleting),
    }
}
