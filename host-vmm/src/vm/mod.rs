//! One VM: create it, restore it from an image or boot a kernel into it, run it to an
//! [`Outcome`], and reset it.
//!
//! The parts, by concern:
//! - [`config`]: how to run a VM ([`VmConfig`]);
//! - [`boot`]: direct boot of a kernel ELF ([`Vm::boot`], [`BootPlan`], [`run_kernel`]);
//! - this file: the VM itself, restoring it from an image ([`Vm::restore`]), resetting a kept
//!   one ([`Vm::reset`]) and writing its image ([`Vm::snapshot`]);
//! - [`run`]: the run loop ([`Vm::run`]) through [`ExitHandler::handle`](crate::exit::ExitHandler::handle) under a watchdog;
//! - [`measure`]: per-phase timings, reports, private memory, page faults.
//!
//! Errors here are host-side ([`VmmError`]); what the guest does is in the outcome.

mod boot;
mod config;
mod measure;
mod run;

pub use boot::{BootError, BootPlan, DEFAULT_PHYSICAL_MEMORY_OFFSET, run_kernel};
pub use config::VmConfig;
pub use measure::{BootTimings, REWRITTEN_PAGES, RunReport, thread_minor_faults};
pub use run::CheckpointMode;
pub(crate) use run::complete_pending_io;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use abi::devices::DEVICE_TABLE_GPA;
use abi::hypercall::{CHECKPOINT_REQUEST_MAX, CHECKPOINT_REQUEST_OFFSET, CheckpointResult, HYPERCALL_PAGE_GPA};
use abi::image::GuestMetadata;
use abi::iotable::IoTableLocation;
use abi::params::{FLAG_CONSOLE_LOG, HOST_PARAMS_GPA, HostParams, InstanceId};
use abi::workingset::Run;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::cpu::CpuError;
use crate::exit::ExitError;
use crate::host::{self, HostError};
use crate::layout;
use crate::memory::{self, DirtyPages, GuestRam, MemoryError};
use crate::outcome::Outcome;
use crate::paging::PagingError;
use crate::snapshot::{self, Image, MemoryWatch, SnapshotError, WriteStats};
use crate::virtio::{Backends, DeviceError, DeviceStats, Devices, VolumeFile, VolumeSource};

/// Host-side failures: the VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A kernel cannot be booted directly with the configuration.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The host refused the dirty-page logging a VM kept to be reset needs.
    #[error("reset mode needs KVM's dirty-page logging, which this host refused ({op}: {source})")]
    DirtyLogRefused {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A VM not restored to be kept was asked to reset.
    #[error("this VM was not created to be reset (no dirty-page log)")]
    NotKept,
    /// An image describes guest memory of a size thaw does not run.
    #[error("image describes {0} bytes of guest memory, outside what thaw runs")]
    ImageMemorySize(u64),
    /// Completing the last exit ran guest code, which it must never do.
    #[error("KVM_RUN ran guest code while completing the checkpoint call")]
    RanWhileCompleting,
    /// The floor guest ended other than with its one store.
    #[error("the floor guest exited with {0}, not its store")]
    FloorExit(String),
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Page tables could not be built.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// The vCPU could not be set up.
    #[error("vCPU setup: {0}")]
    Cpu(#[from] CpuError),
    /// A snapshot could not be taken, written or opened.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The watchdog thread could not start.
    #[error("starting the timeout watchdog: {0}")]
    Watchdog(std::io::Error),
    /// Handling an exit failed on the host side.
    #[error(transparent)]
    Exit(ExitError),
    /// The devices could not be created, restored or attached.
    #[error("virtio devices: {0}")]
    Devices(#[from] DeviceError),
    /// The host could not open KVM or give the guest entropy.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A kept VM's changed pages could not be found or copied back.
    #[error("resetting guest memory: {0}")]
    Reset(#[from] MemoryError),
    /// The function ended before reaching its checkpoint, so there is nothing to snapshot.
    #[error(
        "the function ended before reaching its checkpoint: {outcome}{}",
        if said.is_empty() { String::new() } else { format!("; it wrote: {said}") }
    )]
    NoCheckpoint {
        /// How it ended.
        outcome: Outcome,
        /// The start of what it wrote to stderr, on one line ([`crate::capture::first_lines`]).
        said: String,
    },
    /// A restored VM's guest ended before it waited for its request.
    #[error("a restored VM ended before it waited for its request: {0}")]
    NotParked(Outcome),
    /// A working set's sample request did not answer.
    #[error(
        "recording the working set: the sample request did not answer ({0}); give one the function answers (--sample-data), or skip it (--no-working-set)"
    )]
    SampleUnanswered(Outcome),
    /// A pool's filler stopped, with why.
    #[error("the pool's filler stopped: {0}")]
    PoolStopped(String),
    /// A pool did not park its VMs in time, with why its filler is failing if it is.
    #[error(
        "the pool parked no VM within {:.1} s{}",
        within.as_secs_f64(),
        failing.as_ref().map(|why| format!(": its filler keeps failing: {why}")).unwrap_or_default()
    )]
    PoolSlow {
        /// How long it was waited for.
        within: std::time::Duration,
        /// The filler's last failure, if its last try failed.
        failing: Option<String>,
    },
    /// A fresh VM found no memory an earlier one left (`--verify`).
    #[error("no memory an earlier fresh VM left was there to reuse (the reset needs /proc/self/pagemap)")]
    NoSpareMemory,
    /// Pool mode's VMs have run before they are taken, so none can be compared with the image
    /// before it runs (`--verify`).
    #[error("pool mode has no VM to compare with the image before it runs")]
    NothingToVerify,
    /// A thread of thaw's own could not start.
    #[error("starting a thread: {0}")]
    Threads(std::io::Error),
    /// An image's saved vCPU or device state could not be loaded into a VM.
    #[error("{}: loading its {what}: {source}", path.display())]
    ImageState {
        /// The image.
        path: std::path::PathBuf,
        /// "vCPU state" or "device state".
        what: &'static str,
        /// Why.
        source: Box<VmmError>,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// An error loading `image`'s `what` ("vCPU state", "device state"), naming the image.
fn in_image<'a, E: Into<VmmError>>(image: &'a Image, what: &'static str) -> impl FnOnce(E) -> VmmError + 'a {
    move |e| VmmError::ImageState { path: image.path().to_path_buf(), what, source: Box::new(e.into()) }
}

fn memory_error(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// What a restored VM is for, which decides what its restore prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Restored on the request path to serve one request.
    Fresh,
    /// Restored ahead of its request (a pool): its guest touches the image's working set
    /// before it parks, so the request finds those pages mapped.
    Ahead,
    /// Restored ahead and reset after every request: it touches the working set once, and KVM
    /// logs the pages its guest writes so that a reset can copy them back.
    Kept,
}

/// A VM with one vCPU, booted to its entry point and ready to run. Fields drop in order: the
/// vCPU, then the VM, then the guest memory the VM's slots point into.
pub struct Vm {
    vcpu: VcpuFd,
    vm: VmFd,
    /// Guards `mem` against its image file shrinking under it (restored VMs only); it goes
    /// before `mem`, so it is dropped before the mapping is.
    watch: Option<MemoryWatch>,
    mem: GuestRam,
    /// A second memory slot, above RAM and the device window, holding page tables the host
    /// built (only while a working set is recorded).
    scratch: Option<GuestRam>,
    mem_size: u64,
    /// The working-set runs the guest is told to touch when it resumes (empty for none).
    warm: Vec<Run>,
    /// Working-set pages handed to the guest so far.
    warmed_pages: u64,
    devices: Devices,
    /// Where the guest keeps its I/O reconnection table, as it said at its checkpoint.
    io_table: Option<IoTableLocation>,
    /// KVM logs the pages the guest writes (a VM kept to be reset).
    log_dirty: bool,
    /// The instance id its guest was given by its last restore or reset (0 for a cold boot).
    instance_id: InstanceId,
    /// Its memory goes back to its image for the next fresh VM when it is destroyed
    /// ([`Vm::destroy`]): a VM restored to serve one request.
    spare_memory: bool,
}

/// A kept VM with manual dirty-log protection copies back, at every reset, each page it has
/// written since its restore (or since this limit was last passed): 4 MiB at most, about as long
/// to copy as 60 write faults take under PVM. Past it, the log is cleared and the pages are
/// protected again, so that a function that once wrote much does not copy it all back forever.
const WRITABLE_PAGES_KEPT: u64 = 1024;

/// Creates a VM whose only memory slot is `mem`, on the process's KVM handle. With
/// `log_dirty`, KVM records every page the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`), which a
/// kept VM needs to be reset. Where KVM offers it, the log is also left to thaw to clear
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, [`host::KvmHost::manual_dirty_log`]): KVM otherwise
/// write-protects every logged page again when the log is read, and the guest's next write to
/// each faults into KVM, about 3-7 µs a page under PVM's shadow paging, on the request path
/// (docs/BENCHMARKS.md).
pub(crate) fn create_vm(mem: &GuestRam, mem_size: u64, log_dirty: bool) -> Result<VmFd, VmmError> {
    let vm = host::kvm()?.kvm.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    if log_dirty && host::kvm()?.manual_dirty_log {
        let mut cap =
            kvm_bindings::kvm_enable_cap { cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
        cap.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        vm.enable_cap(&cap).map_err(kvm("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
    }
    let host_addr = mem.get_host_address(GuestAddress(0)).map_err(memory_error)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the region is one mapping of `mem_size` bytes owned by `mem`, which the `Vm` that
    // receives this VM keeps alive and drops only after the VM fd.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
        if log_dirty {
            VmmError::DirtyLogRefused { op: "KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES", source }
        } else {
            VmmError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source }
        }
    })?;
    Ok(vm)
}

/// Clears the pages of `log` (slot 0's, from `KVM_GET_DIRTY_LOG`) from KVM's dirty log and
/// write-protects them again (`KVM_CLEAR_DIRTY_LOG`), for a VM with manual dirty-log protection.
fn clear_dirty_log(vm: &VmFd, log: &[u64]) -> Result<(), VmmError> {
    /// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`, which kvm-ioctls does not wrap.
    const KVM_CLEAR_DIRTY_LOG: u64 =
        (3 << 30) | ((std::mem::size_of::<kvm_bindings::kvm_clear_dirty_log>() as u64) << 16) | (0xae << 8) | 0xc0;
    let mut bitmap = log.to_vec();
    // A slot of at most MAX_MEMORY_MIB has far fewer than u32::MAX pages.
    let num_pages = u32::try_from(bitmap.len() * 64).unwrap_or(u32::MAX);
    let mut clear = kvm_bindings::kvm_clear_dirty_log { slot: 0, num_pages, first_page: 0, ..Default::default() };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `clear` names slot 0 from its first page, and its bitmap holds `num_pages` bits in
    // `bitmap`, which outlives the call; KVM reads the bitmap (and may clear bits in it) and
    // changes only its own state.
    let result = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(vm), KVM_CLEAR_DIRTY_LOG as _, &mut clear) };
    if result < 0 {
        return Err(VmmError::Kvm { op: "KVM_CLEAR_DIRTY_LOG", source: kvm_ioctls::Error::last() });
    }
    Ok(())
}

/// Creates vCPU 0 with thaw's CPUID (built once per process).
pub(crate) fn create_vcpu(vm: &VmFd) -> Result<VcpuFd, VmmError> {
    let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(&host::kvm()?.cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Writes a fresh host parameters page (new entropy, the wall clock, the TSC rate, the flags
/// `config` asks for) and the device table. A restored VM gets a new random instance id; a
/// cold boot's is 0. Returns the id written.
fn write_host_params(
    mem: &GuestRam,
    vcpu: &VcpuFd,
    restored: bool,
    config: &VmConfig,
    devices: &Devices,
) -> Result<InstanceId, VmmError> {
    let (entropy, fresh_id) = host::entropy_and_instance_id()?;
    let instance_id = if restored { fresh_id } else { InstanceId::default() };
    let wall_clock_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let tsc_khz = host::tsc_khz(vcpu);
    let flags = if config.console_log { FLAG_CONSOLE_LOG } else { 0 };
    let params = HostParams { instance_id, entropy, wall_clock_ns, tsc_khz, flags };
    mem.write_slice(&params.encode(), GuestAddress(HOST_PARAMS_GPA)).map_err(memory_error)?;
    mem.write_slice(&devices.table().encode(), GuestAddress(DEVICE_TABLE_GPA)).map_err(memory_error)?;
    Ok(instance_id)
}

/// Memory for a VM that serves one request: a spare mapping an earlier one left, already
/// back to the image's bytes with its working set mapped; or else a new copy-on-write mapping
/// of the image whose working-set pages the host copies now ([`memory::populate`]). Either way
/// KVM finds those pages mapped writable on the host, so each guest fault maps up to 8 of them
/// at once; without that every page the request touches costs a fault of its own.
fn fresh_memory(image: &Image) -> Result<(MemoryWatch, GuestRam), VmmError> {
    if let Some(spare) = image.take_spare() {
        return Ok(spare);
    }
    let (watch, mem) = image.map_memory()?;
    let ranges = image.working_set_ranges(|| {
        snapshot::saved_cr3(&image.info.vcpu)
            .ok()
            .and_then(|cr3| crate::workingset::physical_ranges(&mem, cr3, &image.info.working_set).ok())
            .unwrap_or_default()
    });
    memory::populate(&mem, ranges);
    Ok((watch, mem))
}

impl Vm {
    /// Creates a VM from a snapshot image: its memory mapped copy-on-write from the file, and
    /// then the image's state loaded as [`Vm::load_state`] does. What else it prepares depends
    /// on its [`Role`]: a [`Role::Kept`] VM can be [`reset`](Vm::reset) to the image after it
    /// has run.
    pub fn restore(image: &Image, config: &VmConfig, role: Role, timings: &mut BootTimings) -> Result<Self, VmmError> {
        let log_dirty = role == Role::Kept;
        if log_dirty && image.is_remote() {
            image.original_memory()?; // the error that says why
        }
        let warm = if role == Role::Fresh { Vec::new() } else { image.info.working_set.clone() };
        let started = Instant::now();
        let mem_size = image.info.guest_memory_size();
        if !(layout::MIN_MEMORY_MIB << 20..=layout::MAX_MEMORY_MIB << 20).contains(&mem_size) {
            return Err(VmmError::ImageMemorySize(mem_size));
        }
        let (watch, mem) = if role == Role::Fresh { fresh_memory(image)? } else { image.map_memory()? };
        timings.load = started.elapsed();
        let started = Instant::now();
        let vm = create_vm(&mem, mem_size, log_dirty)?;
        timings.vm_create = started.elapsed();
        let started = Instant::now();
        let vcpu = create_vcpu(&vm)?;
        timings.vcpu_setup = started.elapsed();
        let started = Instant::now();
        let mut restored = Self {
            vcpu,
            vm,
            watch: Some(watch),
            mem,
            scratch: None,
            mem_size,
            warm,
            warmed_pages: 0,
            devices: Devices::default(),
            io_table: None,
            log_dirty,
            instance_id: InstanceId::default(),
            spare_memory: role == Role::Fresh,
        };
        restored.load_state(image, config)?;
        if !restored.warm.is_empty() && host::kvm()?.pre_fault {
            // Best effort: the guest touches the same pages before it parks, so a mapping KVM
            // could not make ahead costs time, never correctness.
            let cr3 = restored.cr3()?;
            if let Ok(ranges) = crate::workingset::physical_ranges(&restored.mem, cr3, &restored.warm) {
                let _ = crate::workingset::pre_fault(&restored.vcpu, &ranges);
            }
        }
        timings.state_set = Some(started.elapsed());
        Ok(restored)
    }

    /// Loads everything of `image` but its memory: the vCPU state, the devices' transport
    /// state (backends detached, unless `config.eager_devices`), fresh host parameters (a new
    /// instance id, entropy, the clock, the device table), and "restored" as the checkpoint
    /// call's result, with the number of working-set runs the guest should touch.
    fn load_state(&mut self, image: &Image, config: &VmConfig) -> Result<(), VmmError> {
        let sync_regs = host::kvm()?.sync_regs;
        snapshot::restore_vcpu(&mut self.vcpu, &image.info.vcpu, sync_regs).map_err(in_image(image, "vCPU state"))?;
        self.devices = Devices::default();
        if !image.devices.is_empty() {
            // The image holds the data volume; a caller may point the block device elsewhere.
            let own = image.info.volume.map(|(offset, len)| VolumeSource {
                file: VolumeFile::Open(Arc::clone(image.file())),
                offset,
                len,
            });
            let volume = config.backends.volume.clone().or(own);
            let backends = Backends { volume, ..config.backends.clone() };
            self.devices = Devices::restore(&image.devices, &backends, &self.mem, config.device_slot)
                .map_err(in_image(image, "device state"))?;
            if config.eager_devices {
                self.devices.attach_all()?;
            }
        }
        self.instance_id = write_host_params(&self.mem, &self.vcpu, true, config, &self.devices)?;
        self.write_checkpoint_result(None)?;
        self.io_table = (image.info.guest.io_table_len > 0)
            .then_some(IoTableLocation { gpa: image.info.guest.io_table_gpa, len: image.info.guest.io_table_len });
        self.check_memory(false)
    }

    /// Puts `request` in the checkpoint's result of a VM restored or reset and not run since,
    /// whose guest (interface 6 on) takes it from there instead of asking with INVOKE_NEXT.
    /// Returns false, having written nothing, for a request longer than the result holds.
    pub(crate) fn hand_in_first_request(&self, request: &[u8]) -> Result<bool, VmmError> {
        let Some(len) = u32::try_from(request.len()).ok().filter(|&len| len as usize <= CHECKPOINT_REQUEST_MAX) else {
            return Ok(false);
        };
        let at = GuestAddress(HYPERCALL_PAGE_GPA).unchecked_add(CHECKPOINT_REQUEST_OFFSET as u64);
        self.mem.write_slice(request, at).map_err(memory_error)?;
        self.write_checkpoint_result(Some(len))?;
        Ok(true)
    }

    /// Writes a restored VM's checkpoint result: the working-set runs its guest touches, and
    /// the length of a `first_request` handed in.
    fn write_checkpoint_result(&self, first_request: Option<u32>) -> Result<(), VmmError> {
        let warm_runs = u32::try_from(self.warm.len()).unwrap_or(u32::MAX);
        let result = CheckpointResult::Restored { warm_runs, first_request };
        self.mem.write_slice(&result.encode(), GuestAddress(HYPERCALL_PAGE_GPA)).map_err(memory_error)
    }

    /// Puts a VM restored from `image` with `log_dirty` back in the state a fresh restore
    /// would give it, without touching its mappings: every page the guest or the host wrote
    /// since the last restore or reset is copied back from the image, the instruction behind
    /// the last exit is completed, and the image's state is loaded again ([`Vm::load_state`]:
    /// a new instance id and fresh entropy). Pages the guest only read stay mapped, which is
    /// what makes a kept VM fast. Returns the pages copied back.
    pub fn reset(&mut self, image: &Image, config: &VmConfig) -> Result<DirtyPages, VmmError> {
        if !self.log_dirty {
            return Err(VmmError::NotKept);
        }
        complete_pending_io(&mut self.vcpu)?;
        let log = self
            .vm
            .get_dirty_log(0, self.mem_size as usize)
            .map_err(|source| VmmError::DirtyLogRefused { op: "KVM_GET_DIRTY_LOG", source })?;
        let dirty = DirtyPages::collect(&self.mem, &log)?;
        memory::copy_back(&self.mem, image.original_memory()?, &dirty)?;
        image.check_original()?;
        if dirty.pages() > WRITABLE_PAGES_KEPT && host::kvm()?.manual_dirty_log {
            clear_dirty_log(&self.vm, &log)?;
        }
        // The working set was touched after the restore and stays mapped: touching it again
        // would only dirty pages the next reset must copy back.
        self.warm.clear();
        // Dropping the old devices closes whatever their backends had open.
        self.load_state(image, config)?;
        Ok(dirty)
    }

    /// Destroys the VM: its vCPU and the VM first, then its devices (closing what their
    /// backends had open). The memory of a VM restored to serve one request goes back to
    /// `image`, the image it was restored from, for the next fresh VM ([`Image::put_back`]);
    /// any other is unmapped.
    pub(crate) fn destroy(self, image: &Image) {
        let Self { vcpu, vm, watch, mem, scratch, devices, spare_memory, .. } = self;
        drop(vcpu);
        drop(vm);
        drop(devices);
        drop(scratch);
        if let (true, Some(watch)) = (spare_memory, watch) {
            image.put_back(watch, mem);
        }
    }

    /// [`SnapshotError::Changed`] when the image file this VM's memory maps changed under it
    /// (see [`MemoryWatch::check`]).
    pub(crate) fn check_memory(&self, suspect: bool) -> Result<(), VmmError> {
        self.watch.as_ref().map_or(Ok(()), |watch| Ok(watch.check(suspect)?))
    }

    /// The instance id its guest was given by its last restore or reset (0 for a cold boot).
    pub fn instance_id(&self) -> InstanceId {
        self.instance_id
    }

    /// Guest memory, for the lifecycle's mailbox.
    pub(crate) fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// Guest memory size in bytes.
    pub(crate) fn memory_size(&self) -> u64 {
        self.mem_size
    }

    /// The guest's CR3: where its page tables are.
    pub(crate) fn cr3(&self) -> Result<u64, VmmError> {
        Ok(self.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?.cr3)
    }

    /// Points the guest's CR3 at other page tables.
    pub(crate) fn set_cr3(&self, cr3: u64) -> Result<(), VmmError> {
        let mut sregs = self.vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        sregs.cr3 = cr3;
        self.vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
    }

    /// Adds `scratch` (one region, above RAM and the device window) as memory slot 1. The VM
    /// owns it from now on.
    pub(crate) fn add_scratch_memory(&mut self, scratch: GuestRam) -> Result<(), VmmError> {
        let region = scratch.iter().next().ok_or_else(|| VmmError::Memory("empty scratch memory".into()))?;
        let (gpa, len) = (region.start_addr().raw_value(), region.len());
        if gpa < self.mem_size.max(abi::devices::DEVICE_WINDOW_GPA + abi::devices::DEVICE_WINDOW_LEN) {
            return Err(VmmError::Memory(format!("scratch memory at {gpa:#x} overlaps RAM or the device window")));
        }
        let host_addr = scratch.get_host_address(GuestAddress(gpa)).map_err(memory_error)?;
        let slot = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is one mapping of `len` bytes owned by `scratch`, which this `Vm`
        // keeps (field `scratch`) and drops only after the VM fd.
        unsafe { self.vm.set_user_memory_region(slot) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION (scratch)"))?;
        self.scratch = Some(scratch);
        Ok(())
    }

    /// The scratch memory slot, if one was added.
    pub(crate) fn scratch_memory(&self) -> Option<&GuestRam> {
        self.scratch.as_ref()
    }

    /// Working-set pages the guest was handed to touch since its restore.
    pub fn warmed_pages(&self) -> u64 {
        self.warmed_pages
    }

    /// Counters of this VM's devices.
    pub fn device_stats(&self) -> Vec<DeviceStats> {
        self.devices.stats()
    }

    /// Writes an image of this VM, which must have stopped at its checkpoint
    /// ([`Outcome::Checkpointed`]), to `path`, with its data `volume` (empty for none). The I/O
    /// table location in `guest` is replaced by the one the guest gave at its checkpoint.
    /// `working_set` is the recorded working set (empty for none).
    pub fn snapshot(
        &self,
        path: &Path,
        mut guest: GuestMetadata,
        volume: &[u8],
        working_set: Vec<Run>,
    ) -> Result<WriteStats, VmmError> {
        let io_table = self.io_table.unwrap_or_default();
        (guest.io_table_gpa, guest.io_table_len) = (io_table.gpa, io_table.len);
        let vcpu = snapshot::capture_vcpu(&self.vcpu)?;
        let vm = snapshot::device_records(&self.devices.states());
        let state = snapshot::State { vcpu, vm, guest, working_set };
        Ok(snapshot::write_image(path, &self.mem, self.mem_size, state, volume)?)
    }
}
