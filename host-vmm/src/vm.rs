//! One VM: create it, load the kernel by direct boot, run it to an [`Outcome`].
//!
//! [`Vm::boot`] does everything up to the first `KVM_RUN`; [`Vm::run`] runs the vCPU through
//! [`ExitHandler::handle`] under a [`Watchdog`]. [`run_kernel`] does both and reports per-phase
//! timings. Errors here are host-side ([`VmmError`]); what the guest does is in the outcome.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use abi::devices::{DEVICE_TABLE_GPA, DeviceKind};
use abi::hypercall::Milestone;
use abi::hypercall::{CHECKPOINT_ORIGINAL, CHECKPOINT_RESTORED, HYPERCALL_PAGE_GPA};
use abi::image::GuestMetadata;
use abi::iotable::IoTableLocation;
use abi::params::{FLAG_CONSOLE_LOG, HOST_PARAMS_GPA, HostParams};
use bootloader_api::config::Mapping;
use bootloader_api::info::{MemoryRegion, MemoryRegionKind};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

use crate::bootinfo::{self, BootParams};
use crate::cpu::{self, CpuError};
use crate::exit::{ExitAction, ExitError, ExitHandler};
use crate::host::{self, HostError};
use crate::kernel::KernelImage;
use crate::layout::{self, BOOT_INFO_END, BOOT_INFO_GPA, PAGE_SIZE, STACK_AREA_START, STACK_TOP};
use crate::mailbox::{FunctionResponse, Mailbox};
use crate::memory::{self, DirtyPages, GuestRam, MemoryError};
use crate::outcome::Outcome;
use crate::paging::{PageTables, PagingError};
use crate::snapshot::{self, Image, SnapshotError, WriteStats};
use crate::virtio::{Backends, DeviceError, DeviceStats, Devices};
use crate::watchdog::Watchdog;
use abi::workingset::Run;

/// The guest pages a restore and a reset write fresh every time, so they never equal the
/// image: the hypercall page (the checkpoint call's result), and the page holding the host
/// parameters (instance id, entropy, clock) and the device table.
pub const REWRITTEN_PAGES: [u64; 2] = [HYPERCALL_PAGE_GPA / PAGE_SIZE, HOST_PARAMS_GPA / PAGE_SIZE];

/// Where physical memory is mapped when the kernel asks for a dynamic address: PML4 slot 32.
pub const DEFAULT_PHYSICAL_MEMORY_OFFSET: u64 = 0x0000_1000_0000_0000;

/// How to run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Wall-clock limit for the run, from the first `KVM_RUN`.
    pub timeout: Duration,
    /// Bytes to load as the kernel's ramdisk.
    pub ramdisk: Option<Vec<u8>>,
    /// Requests to hand the guest through the invoke mailbox, in order.
    pub requests: Vec<Vec<u8>>,
    /// Measure the VM's private memory before tearing it down (reads /proc/self/smaps).
    pub measure_memory: bool,
    /// The virtio devices a booted VM gets (a restored VM gets the image's).
    pub devices: Vec<DeviceKind>,
    /// What the devices attach to, when they first need it. A restored VM's block device reads
    /// the image's own data volume unless `backends.volume` names another.
    pub backends: Backends,
    /// Ask the guest to send the function's stderr and its log to the console device.
    pub console_log: bool,
    /// Attach every device backend before the guest runs, instead of on first use.
    pub eager_devices: bool,
    /// Where a restored VM's devices start in the device window, in register windows (0 puts
    /// them where a booted VM has them; anything else moves them, which the guest must follow).
    pub device_slot: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            timeout: Duration::from_secs(10),
            ramdisk: None,
            requests: Vec::new(),
            measure_memory: false,
            devices: Vec::new(),
            backends: Backends::default(),
            console_log: false,
            eager_devices: false,
            device_slot: 0,
        }
    }
}

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
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
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
    #[error("the function ended before reaching its checkpoint: {0}")]
    NoCheckpoint(Outcome),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

fn memory_error(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

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
    /// Guest memory private to this VM when it ended (pages it wrote, copied on write or freshly
    /// allocated), if [`VmConfig::measure_memory`] asked for it.
    pub private_memory: Option<u64>,
    /// Minor page faults the vCPU thread took during the run.
    pub page_faults: u64,
    /// Per-device counters: backend attachment, exits, notifications.
    pub devices: Vec<DeviceStats>,
}

/// Where direct boot puts the pieces a kernel's config decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Where physical memory is mapped, if the kernel asked for it.
    pub physical_memory_offset: Option<u64>,
    /// Lowest byte of the kernel stack.
    pub stack_bottom: u64,
    /// Guest address of the ramdisk, if any.
    pub ramdisk_addr: Option<u64>,
    /// First byte of memory the kernel may use freely.
    pub usable_start: u64,
}

impl BootPlan {
    /// Checks `kernel` and `config` against the memory layout and decides where things go.
    pub fn new(kernel: &KernelImage, config: &VmConfig) -> Result<Self, VmmError> {
        let mib = config.memory_mib;
        if !(layout::MIN_MEMORY_MIB..=layout::MAX_MEMORY_MIB).contains(&mib) {
            return Err(VmmError::Config(format!(
                "memory size {mib} MiB is outside the supported {}..={} MiB",
                layout::MIN_MEMORY_MIB,
                layout::MAX_MEMORY_MIB
            )));
        }
        let mem_size = mib << 20;
        let unsupported = |what: &str| {
            VmmError::Config(format!("kernel's bootloader config: {what} is not supported by thaw's direct boot"))
        };
        let mappings = &kernel.config.mappings;
        if mappings.page_table_recursive.is_some() {
            return Err(unsupported("a recursive page-table mapping"));
        }
        for (name, mapping) in [
            ("kernel_stack", &mappings.kernel_stack),
            ("boot_info", &mappings.boot_info),
            ("ramdisk_memory", &mappings.ramdisk_memory),
        ] {
            if let Mapping::FixedAddress(addr) = mapping {
                return Err(unsupported(&format!("a fixed {name} address ({addr:#x})")));
            }
        }
        let physical_memory_offset = match mappings.physical_memory {
            None => None,
            Some(Mapping::Dynamic) => Some(DEFAULT_PHYSICAL_MEMORY_OFFSET),
            Some(Mapping::FixedAddress(offset)) => Some(offset),
        };
        if let Some(offset) = physical_memory_offset {
            PageTables::check_offset(offset, mem_size)?;
        }
        let stack_size = layout::align_up(kernel.config.kernel_stack_size, PAGE_SIZE).unwrap_or(u64::MAX);
        if stack_size > STACK_TOP - STACK_AREA_START {
            return Err(VmmError::Config(format!(
                "kernel asks for a {} KiB stack; direct boot supports at most {} KiB",
                kernel.config.kernel_stack_size / 1024,
                (STACK_TOP - STACK_AREA_START) / 1024
            )));
        }
        let kernel_end = layout::align_up(kernel.end(), PAGE_SIZE).unwrap_or(u64::MAX);
        let ramdisk_len = config.ramdisk.as_ref().map_or(0, |r| r.len() as u64);
        let usable_start = layout::align_up(kernel_end.saturating_add(ramdisk_len), PAGE_SIZE).unwrap_or(u64::MAX);
        if usable_start >= mem_size {
            return Err(VmmError::Config(format!(
                "the kernel and ramdisk end at {usable_start:#x}, beyond the {mib} MiB of guest memory; give the VM more memory"
            )));
        }
        Ok(Self {
            mem_size,
            physical_memory_offset,
            stack_bottom: STACK_TOP - stack_size,
            ramdisk_addr: config.ramdisk.as_ref().map(|_| kernel_end),
            usable_start,
        })
    }

    /// The memory map the kernel is given.
    pub fn regions(&self) -> Vec<MemoryRegion> {
        vec![
            MemoryRegion { start: 0, end: self.usable_start, kind: MemoryRegionKind::Bootloader },
            MemoryRegion { start: self.usable_start, end: self.mem_size, kind: MemoryRegionKind::Usable },
        ]
    }
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
}

/// What the run loop does when the guest reaches its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Tell the guest it is the original and let it run on (a cold invocation).
    Continue,
    /// Stop there with [`Outcome::Checkpointed`], the `out` completed, so the VM can be
    /// snapshotted with no instruction in flight.
    Capture,
}

/// Creates a VM whose only memory slot is `mem`, on the process's KVM handle. With
/// `log_dirty`, KVM records every page the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`), which a
/// kept VM needs to be reset.
pub(crate) fn create_vm(mem: &GuestRam, mem_size: u64, log_dirty: bool) -> Result<VmFd, VmmError> {
    let vm = host::kvm()?.kvm.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
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
            VmmError::Config(format!(
                "reset mode needs KVM's dirty-page logging, which this host refused (KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES: {source})"
            ))
        } else {
            VmmError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source }
        }
    })?;
    Ok(vm)
}

/// Creates vCPU 0 with thaw's CPUID (built once per process).
pub(crate) fn create_vcpu(vm: &VmFd) -> Result<VcpuFd, VmmError> {
    let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(&host::kvm()?.cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Writes a fresh host parameters page (new entropy, the wall clock, the TSC rate,
/// `instance_id`, the flags `config` asks for) and the device table.
fn write_host_params(
    mem: &GuestRam,
    vcpu: &VcpuFd,
    instance_id: u64,
    config: &VmConfig,
    devices: &Devices,
) -> Result<(), VmmError> {
    let mut entropy = [0u8; 32];
    host::entropy(&mut entropy)?;
    let wall_clock_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let tsc_khz = vcpu.get_tsc_khz().map_or(0, u64::from);
    let flags = if config.console_log { FLAG_CONSOLE_LOG } else { 0 };
    let params = HostParams { instance_id, entropy, wall_clock_ns, tsc_khz, flags };
    mem.write_slice(&params.encode(), GuestAddress(HOST_PARAMS_GPA)).map_err(memory_error)?;
    mem.write_slice(&devices.table().encode(), GuestAddress(DEVICE_TABLE_GPA)).map_err(memory_error)
}

impl Vm {
    /// Creates the VM, loads `kernel` by direct boot and sets up the vCPU at its entry point.
    pub fn boot(kernel: &KernelImage, config: &VmConfig, timings: &mut BootTimings) -> Result<Self, VmmError> {
        let plan = BootPlan::new(kernel, config)?;
        let started = Instant::now();
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), plan.mem_size as usize)]).map_err(memory_error)?;
        let vm = create_vm(&mem, plan.mem_size, false)?;
        timings.vm_create = started.elapsed();

        let started = Instant::now();
        for segment in &kernel.segments {
            mem.write_slice(&segment.data, GuestAddress(segment.addr)).map_err(memory_error)?;
        }
        if let (Some(addr), Some(ramdisk)) = (plan.ramdisk_addr, &config.ramdisk) {
            mem.write_slice(ramdisk, GuestAddress(addr)).map_err(memory_error)?;
        }
        let mut tables = PageTables::new();
        tables.map_linear(0, plan.mem_size)?;
        if let Some(offset) = plan.physical_memory_offset {
            tables.map_linear(offset, plan.mem_size)?;
        }
        tables.map_device_window()?;
        tables.write(&mem)?;
        let devices = Devices::new(&config.devices, &config.backends)?;
        let params = BootParams {
            regions: plan.regions(),
            physical_memory_offset: plan.physical_memory_offset,
            ramdisk: plan.ramdisk_addr.zip(config.ramdisk.as_ref().map(|r| r.len() as u64)),
            stack_bottom: plan.stack_bottom,
            stack_len: STACK_TOP - plan.stack_bottom,
        };
        let info = bootinfo::encode(&params, BOOT_INFO_GPA);
        if BOOT_INFO_GPA + info.len() as u64 > BOOT_INFO_END {
            return Err(VmmError::Config("boot info does not fit its area".into()));
        }
        mem.write_slice(&info, GuestAddress(BOOT_INFO_GPA)).map_err(memory_error)?;
        // A zero return address above the entry frame, as if the entry point had been called.
        let stack_pointer = STACK_TOP - 8;
        mem.write_obj(0u64, GuestAddress(stack_pointer)).map_err(memory_error)?;
        timings.load = started.elapsed();

        let started = Instant::now();
        let vcpu = create_vcpu(&vm)?;
        cpu::setup_long_mode(&vcpu, &mem, tables.root(), kernel.entry, stack_pointer, BOOT_INFO_GPA)?;
        write_host_params(&mem, &vcpu, 0, config, &devices)?;
        timings.vcpu_setup = started.elapsed();
        Ok(Self {
            vcpu,
            vm,
            mem,
            scratch: None,
            mem_size: plan.mem_size,
            warm: Vec::new(),
            warmed_pages: 0,
            devices,
            io_table: None,
            log_dirty: false,
        })
    }

    /// Creates a VM from a snapshot image: its memory mapped copy-on-write from the file, and
    /// then the image's state loaded as [`Vm::load_state`] does. What else it prepares depends
    /// on its [`Role`]: a [`Role::Kept`] VM can be [`reset`](Vm::reset) to the image after it
    /// has run.
    pub fn restore(image: &Image, config: &VmConfig, role: Role, timings: &mut BootTimings) -> Result<Self, VmmError> {
        let log_dirty = role == Role::Kept;
        let warm = if role == Role::Fresh { Vec::new() } else { image.info.working_set.clone() };
        let started = Instant::now();
        let mem_size = image.info.guest_memory_size();
        if !(layout::MIN_MEMORY_MIB << 20..=layout::MAX_MEMORY_MIB << 20).contains(&mem_size) {
            return Err(VmmError::Config(format!(
                "image describes {mem_size} bytes of guest memory, outside what thaw runs"
            )));
        }
        let mem = image.map_memory()?;
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
            mem,
            scratch: None,
            mem_size,
            warm,
            warmed_pages: 0,
            devices: Devices::default(),
            io_table: None,
            log_dirty,
        };
        restored.load_state(image, config)?;
        timings.state_set = Some(started.elapsed());
        Ok(restored)
    }

    /// Loads everything of `image` but its memory: the vCPU state, the devices' transport
    /// state (backends detached, unless `config.eager_devices`), fresh host parameters (a new
    /// instance id, entropy, the clock, the device table), and "restored" as the checkpoint
    /// call's result, with the number of working-set runs the guest should touch.
    fn load_state(&mut self, image: &Image, config: &VmConfig) -> Result<(), VmmError> {
        snapshot::restore_vcpu(&self.vcpu, &image.info.vcpu)?;
        self.devices = Devices::default();
        if !image.devices.is_empty() {
            // The image holds the data volume; a caller may point the block device elsewhere.
            let volume = config.backends.volume.clone().or_else(|| image.volume_source());
            let backends = Backends { volume, ..config.backends.clone() };
            self.devices = Devices::restore(&image.devices, &backends, &self.mem, config.device_slot)?;
            if config.eager_devices {
                self.devices.attach_all()?;
            }
        }
        write_host_params(&self.mem, &self.vcpu, host::next_instance_id(), config, &self.devices)?;
        let warm = u32::try_from(self.warm.len()).unwrap_or(u32::MAX);
        self.mem.write_obj([CHECKPOINT_RESTORED, warm], GuestAddress(HYPERCALL_PAGE_GPA)).map_err(memory_error)?;
        self.io_table = (image.info.guest.io_table_len > 0)
            .then_some(IoTableLocation { gpa: image.info.guest.io_table_gpa, len: image.info.guest.io_table_len });
        Ok(())
    }

    /// Puts a VM restored from `image` with `log_dirty` back in the state a fresh restore
    /// would give it, without touching its mappings: every page the guest or the host wrote
    /// since the last restore or reset is copied back from the image, the instruction behind
    /// the last exit is completed, and the image's state is loaded again ([`Vm::load_state`]:
    /// a new instance id and fresh entropy). Pages the guest only read stay mapped, which is
    /// what makes a kept VM fast. Returns the pages copied back.
    pub fn reset(&mut self, image: &Image, config: &VmConfig) -> Result<DirtyPages, VmmError> {
        if !self.log_dirty {
            return Err(VmmError::Config("this VM was not created to be reset (no dirty-page log)".into()));
        }
        complete_pending_io(&mut self.vcpu)?;
        let log = self.vm.get_dirty_log(0, self.mem_size as usize).map_err(|source| {
            VmmError::Config(format!(
                "reset mode needs KVM's dirty-page log, which this host refused (KVM_GET_DIRTY_LOG: {source})"
            ))
        })?;
        let dirty = DirtyPages::collect(&self.mem, &log)?;
        memory::copy_back(&self.mem, image.original_memory()?, &dirty)?;
        // The working set was touched after the restore and stays mapped: touching it again
        // would only dirty pages the next reset must copy back.
        self.warm.clear();
        // Dropping the old devices closes whatever their backends had open.
        self.load_state(image, config)?;
        Ok(dirty)
    }

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

    /// Runs the vCPU until the guest ends or `timeout` passes, writing its output to `output`
    /// and serving `mailbox`.
    pub fn run(
        &mut self,
        output: &mut dyn Write,
        mailbox: Mailbox,
        timeout: Duration,
        checkpoint: CheckpointMode,
        timings: &mut BootTimings,
    ) -> Result<(Outcome, u64, Mailbox), VmmError> {
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
                            self.mem
                                .write_obj(CHECKPOINT_ORIGINAL, GuestAddress(HYPERCALL_PAGE_GPA))
                                .map_err(memory_error)?;
                        }
                        Err(ExitError::Guest(error)) => break Outcome::Failed { error, rip: None },
                        Err(e) => return Err(VmmError::Exit(e)),
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(VmmError::Kvm { op: "KVM_RUN", source: e }),
            }
        };
        drop(watchdog);
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
        Ok((outcome, exits, handler.mailbox))
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
        Ok(()) => Err(VmmError::Config("KVM_RUN ran guest code while completing the checkpoint call".into())),
    }
}

/// Boots `kernel` and runs it to the end, writing its output to `output`, serving
/// `config.requests` and reporting on the run (memory included if asked) before the VM is torn
/// down.
pub fn run_kernel(kernel: &KernelImage, config: &VmConfig, output: &mut dyn Write) -> Result<RunReport, VmmError> {
    let started = Instant::now();
    let mut timings = BootTimings::default();
    let mut vm = Vm::boot(kernel, config, &mut timings)?;
    let faults_before = thread_minor_faults();
    let mailbox = Mailbox::new(config.requests.clone());
    let (outcome, exits, mailbox) = vm.run(output, mailbox, config.timeout, CheckpointMode::Continue, &mut timings)?;
    timings.total = started.elapsed();
    timings.to_response = mailbox.first_response_at.map(|t| t.saturating_duration_since(started));
    let page_faults = thread_minor_faults().saturating_sub(faults_before);
    let private_memory = if config.measure_memory { Some(vm.private_memory()?) } else { None };
    let devices = vm.devices.stats();
    Ok(RunReport { outcome, timings, exits, responses: mailbox.responses, private_memory, page_faults, devices })
}

/// Minor page faults the calling thread has taken so far.
pub fn thread_minor_faults() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-parameter; getrusage only writes it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to our rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } == 0 { usage.ru_minflt as u64 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tests::valid_kernel;

    fn kernel() -> KernelImage {
        KernelImage::parse(&valid_kernel()).unwrap()
    }

    #[test]
    fn plan_places_ramdisk_after_the_kernel_and_reports_the_rest_usable() {
        let config = VmConfig { ramdisk: Some(vec![1; 5000]), ..VmConfig::default() };
        let plan = BootPlan::new(&kernel(), &config).unwrap();
        assert_eq!(plan.ramdisk_addr, Some(0x20_2000));
        assert_eq!(plan.usable_start, 0x20_4000);
        assert_eq!(plan.regions()[1], MemoryRegion { start: 0x20_4000, end: 64 << 20, kind: MemoryRegionKind::Usable });
    }

    #[test]
    fn plan_rejects_bad_memory_sizes_and_stacks() {
        for mib in [0, 3, layout::MAX_MEMORY_MIB + 1] {
            let e = BootPlan::new(&kernel(), &VmConfig { memory_mib: mib, ..VmConfig::default() }).unwrap_err();
            assert!(e.to_string().contains(&format!("memory size {mib} MiB")), "{e}");
        }
        let mut big_stack = kernel();
        big_stack.config.kernel_stack_size = 4 << 20;
        assert!(BootPlan::new(&big_stack, &VmConfig::default()).unwrap_err().to_string().contains("4096 KiB stack"));
        let huge_ramdisk = VmConfig { memory_mib: 4, ramdisk: Some(vec![0; 3 << 20]), ..VmConfig::default() };
        assert!(BootPlan::new(&kernel(), &huge_ramdisk).unwrap_err().to_string().contains("give the VM more memory"));
    }
}
