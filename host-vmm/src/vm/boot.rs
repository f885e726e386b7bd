//! Direct boot: lay a kernel ELF, its ramdisk, page tables and boot info out in guest memory
//! ([`BootPlan`], [`Vm::boot`]), and run it to the end ([`run_kernel`]).

use std::io::Write;
use std::time::Instant;

use bootloader_api::config::Mapping;
use bootloader_api::info::{MemoryRegion, MemoryRegionKind};
use vm_memory::{Bytes, GuestAddress};

use super::{BootTimings, thread_minor_faults};
use super::{
    CheckpointMode, RunReport, Vm, VmConfig, VmmError, create_vcpu, create_vm, memory_error, write_host_params,
};
use crate::bootinfo::{self, BootParams};
use crate::cpu;
use crate::kernel::KernelImage;
use crate::layout::{self, BOOT_INFO_END, BOOT_INFO_GPA, PAGE_SIZE, STACK_AREA_START, STACK_TOP};
use crate::mailbox::Mailbox;
use crate::memory::GuestRam;
use crate::paging::PageTables;
use crate::virtio::Devices;

/// Why a kernel cannot be booted directly with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The memory size is outside what thaw runs.
    #[error("memory size {0} MiB is outside the supported {min}..={max} MiB", min = layout::MIN_MEMORY_MIB, max = layout::MAX_MEMORY_MIB)]
    MemorySize(u64),
    /// The kernel's bootloader config asks for something direct boot does not do.
    #[error("kernel's bootloader config: {0} is not supported by thaw's direct boot")]
    Unsupported(String),
    /// The kernel asks for a larger stack than direct boot places.
    #[error("kernel asks for a {} KiB stack; direct boot supports at most {} KiB", .0 / 1024, (STACK_TOP - STACK_AREA_START) / 1024)]
    Stack(u64),
    /// The kernel and ramdisk leave no memory over.
    #[error("the kernel and ramdisk end at {end:#x}, beyond the {mib} MiB of guest memory; give the VM more memory")]
    TooLarge {
        /// Where they end.
        end: u64,
        /// The guest memory, in MiB.
        mib: u64,
    },
    /// The boot info is larger than its area.
    #[error("boot info does not fit its area")]
    BootInfo,
}

/// Where physical memory is mapped when the kernel asks for a dynamic address: PML4 slot 32.
pub const DEFAULT_PHYSICAL_MEMORY_OFFSET: u64 = 0x0000_1000_0000_0000;

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
            return Err(BootError::MemorySize(mib).into());
        }
        let mem_size = mib << 20;
        let unsupported = |what: &str| VmmError::from(BootError::Unsupported(what.to_string()));
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
            return Err(BootError::Stack(kernel.config.kernel_stack_size).into());
        }
        let kernel_end = layout::align_up(kernel.end(), PAGE_SIZE).unwrap_or(u64::MAX);
        let ramdisk_len = config.ramdisk.as_ref().map_or(0, |r| r.len() as u64);
        let usable_start = layout::align_up(kernel_end.saturating_add(ramdisk_len), PAGE_SIZE).unwrap_or(u64::MAX);
        if usable_start >= mem_size {
            return Err(BootError::TooLarge { end: usable_start, mib }.into());
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
            return Err(BootError::BootInfo.into());
        }
        mem.write_slice(&info, GuestAddress(BOOT_INFO_GPA)).map_err(memory_error)?;
        // A zero return address above the entry frame, as if the entry point had been called.
        let stack_pointer = STACK_TOP - 8;
        mem.write_obj(0u64, GuestAddress(stack_pointer)).map_err(memory_error)?;
        timings.load = started.elapsed();

        let started = Instant::now();
        let vcpu = create_vcpu(&vm)?;
        cpu::setup_long_mode(&vcpu, &mem, tables.root(), kernel.entry, stack_pointer, BOOT_INFO_GPA)?;
        let instance_id = write_host_params(&mem, &vcpu, false, config, &devices)?;
        timings.vcpu_setup = started.elapsed();
        Ok(Self {
            vcpu,
            vm,
            watch: None,
            mem,
            scratch: None,
            mem_size: plan.mem_size,
            warm: Vec::new(),
            warmed_pages: 0,
            devices,
            io_table: None,
            log_dirty: false,
            instance_id,
            spare_memory: false,
        })
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
    let mut mailbox = Mailbox::new(config.requests.clone());
    let (outcome, exits) = vm.run(output, &mut mailbox, config.timeout, CheckpointMode::Continue, &mut timings)?;
    timings.total = started.elapsed();
    timings.to_response = mailbox.first_response_at.map(|t| t.saturating_duration_since(started));
    let page_faults = thread_minor_faults().saturating_sub(faults_before);
    let private_memory = if config.measure_memory { Some(vm.private_memory()?) } else { None };
    let devices = vm.devices.stats();
    Ok(RunReport {
        outcome,
        timings,
        exits,
        responses: mailbox.responses,
        init_stderr: mailbox.init_stderr,
        private_memory,
        page_faults,
        devices,
    })
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
