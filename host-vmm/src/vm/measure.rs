//! What a run measured: per-phase timings ([`BootTimings`]), the run's report ([`RunReport`]),
//! a VM's private memory and the pages that differ from its image, and page faults.

use std::time::Duration;

use abi::hypercall::HYPERCALL_PAGE_GPA;
use abi::params::HOST_PARAMS_GPA;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

use super::{Vm, VmmError, memory_error};
use crate::layout::PAGE_SIZE;
use crate::outcome::{FunctionResponse, Outcome};
use crate::snapshot::Image;
use crate::virtio::DeviceStats;

/// The guest pages a restore and a reset write fresh every time, so they never equal the
/// image: the hypercall page (the checkpoint call's result), and the page holding the host
/// parameters (instance id, entropy, clock) and the device table.
pub const REWRITTEN_PAGES: [u64; 2] = [HYPERCALL_PAGE_GPA / PAGE_SIZE, HOST_PARAMS_GPA / PAGE_SIZE];

/// How long each boot phase took.
#[derive(Debug, Clone, Default)]
pub struct BootTimings {
    /// Opening KVM, creating the VM and its memory slot.
    pub vm_create: Duration,
    /// Writing the kernel, page tables and boot info into guest memory.
    pub load: Duration,
    /// Creating the vCPU and setting its CPUID (and, on a cold boot, its registers).
    pub vcpu_setup: Duration,
    /// After a restore: setting the vCPU state from the image and writing fresh host parameters.
    pub state_set: Option<Duration>,
    /// From the first `KVM_RUN` to the guest's ring-3 milestone.
    pub ring0_boot: Option<Duration>,
    /// From the ring-3 milestone to the ready milestone.
    pub ring3_to_ready: Option<Duration>,
    /// From ready to the function's module being compiled.
    pub compile: Option<Duration>,
    /// From compiled to instantiated.
    pub instantiate: Option<Duration>,
    /// From instantiated to the function's init exports having run.
    pub init: Option<Duration>,
    /// From the first `KVM_RUN` to the guest taking its first request: after a restore, the
    /// guest resuming from its checkpoint (reseeding, and faulting in the pages it touches).
    pub to_first_request: Option<Duration>,
    /// From the start (VM creation, or restore) to the first response.
    pub to_response: Option<Duration>,
    /// From the start to the end of the run.
    pub total: Duration,
}

/// The result of a run.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest ended.
    pub outcome: Outcome,
    /// Per-phase timings.
    pub timings: BootTimings,
    /// VM exits taken.
    pub exits: u64,
    /// The function's responses, in request order.
    pub responses: Vec<FunctionResponse>,
    /// What the function's init wrote to stderr, when it booted cold in this run.
    pub init_stderr: Vec<u8>,
    /// Guest memory private to this VM when it ended (pages it wrote, copied on write or freshly
    /// allocated), if [`VmConfig::measure_memory`] asked for it.
    pub private_memory: Option<u64>,
    /// Minor page faults the vCPU thread took during the run.
    pub page_faults: u64,
    /// Per-device counters: backend attachment, exits, notifications.
    pub devices: Vec<DeviceStats>,
}

impl Vm {
    /// The guest pages whose bytes differ from `image`'s memory, in ascending order. Right
    /// after a restore or reset these are at most [`REWRITTEN_PAGES`].
    pub fn pages_differing_from(&self, image: &Image) -> Result<Vec<u64>, VmmError> {
        let original = image.original_memory()?;
        let (mut ours, mut theirs) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        let mut differing = Vec::new();
        for page in 0..self.mem_size / PAGE_SIZE {
            let gpa = page * PAGE_SIZE;
            self.mem.read_slice(&mut ours, GuestAddress(gpa)).map_err(memory_error)?;
            original.get_slice(gpa as usize, PAGE_SIZE as usize).map_err(memory_error)?.copy_to(&mut theirs[..]);
            if ours != theirs {
                differing.push(page);
            }
        }
        Ok(differing)
    }

    /// Guest memory private to this VM: the `Anonymous` pages of its guest-memory mapping
    /// (written after a restore, or touched at all on a cold boot). Pages still shared with the
    /// image's page cache are not counted. Reads /proc/self/smaps.
    pub fn private_memory(&self) -> Result<u64, VmmError> {
        let start = self.mem.get_host_address(GuestAddress(0)).map_err(memory_error)? as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps")
            .map_err(|e| VmmError::Memory(format!("/proc/self/smaps: {e}")))?;
        let mut in_mapping = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, _)) = range.split_once('-')
                && let Ok(from) = u64::from_str_radix(from, 16)
            {
                in_mapping = from == start;
                continue;
            }
            if in_mapping && let Some(kb) = line.strip_prefix("Anonymous:") {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                return Ok(kb * 1024);
            }
        }
        Err(VmmError::Memory(format!("guest memory mapping at {start:#x} not found in /proc/self/smaps")))
    }
}

/// Minor page faults the calling thread has taken so far.
pub fn thread_minor_faults() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-parameter; getrusage only writes it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to our rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } == 0 { usage.ru_minflt as u64 } else { 0 }
}
