//! The floor: what serving costs on this host with nothing of thaw's guest in it, measured in
//! the same run as thaw's own numbers (`thaw bench --floor`, `thaw restore --floor`), so every
//! benchmark can say how far above the platform it is.
//!
//! The floor guest is thaw's smallest: 4 MiB of memory holding page tables and one instruction
//! of ring-3 code, a store to the device window (an MMIO exit, which needs no TSS). It is written
//! to a real image file and restored through thaw's own mapping, so both floors pay what thaw
//! pays for the platform and nothing for the guest kernel:
//! - **fresh**: map the image copy-on-write, create the VM, its slot and vCPU 0 (with thaw's
//!   CPUID), set the registers, and run to the first exit;
//! - **kept**: one VM whose slot logs dirty pages; complete the last exit, read the dirty log,
//!   copy back what it names, set the registers again, and run to the first exit.

use std::time::{Duration, Instant};

use abi::devices::DEVICE_WINDOW_GPA;
use abi::image::GuestMetadata;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::cpu;
use crate::layout::{KERNEL_MIN_ADDR, STACK_TOP};
use crate::memory::{self, DirtyPages, GuestRam};
use crate::paging::PageTables;
use crate::snapshot::{self, Image};
use crate::vm::{VmmError, complete_pending_io, create_vcpu, create_vm};

/// Guest memory of the floor guest.
const MEM_SIZE: u64 = 4 << 20;
/// `mov byte ptr [rax], 0` (rax holds the device window), then `jmp $` should it ever return.
const CODE: [u8; 5] = [0xc6, 0x00, 0x00, 0xeb, 0xfe];

/// Per-run times of both floors.
#[derive(Debug, Clone, Default)]
pub struct Floor {
    /// A fresh VM restored from the floor image to its first exit.
    pub fresh: Vec<Duration>,
    /// A kept VM reset by its dirty log to its first exit.
    pub kept: Vec<Duration>,
}

/// The floor image and the ring-3 registers its vCPU starts with.
struct Guest {
    image: Image,
    regs: kvm_regs,
    sregs: kvm_sregs,
    _file: tempfile::TempPath,
}

/// Measures both floors `runs` times each, interleaved, after one unmeasured run of each.
pub fn measure(runs: usize) -> Result<Floor, VmmError> {
    let guest = build()?;
    let mut floor = Floor::default();
    let (_watch, mem) = guest.image.map_memory()?;
    let vm = create_vm(&mem, MEM_SIZE, true)?;
    let mut kept = create_vcpu(&vm)?;
    run_to_exit(&mut kept, &guest)?;
    fresh(&guest)?;
    for _ in 0..runs {
        floor.fresh.push(fresh(&guest)?);
        let started = Instant::now();
        complete_pending_io(&mut kept)?;
        let log = vm
            .get_dirty_log(0, MEM_SIZE as usize)
            .map_err(|source| VmmError::Kvm { op: "KVM_GET_DIRTY_LOG", source })?;
        let dirty = DirtyPages::collect(&mem, &log)?;
        memory::copy_back(&mem, guest.image.original_memory()?, &dirty)?;
        run_to_exit(&mut kept, &guest)?;
        floor.kept.push(started.elapsed());
    }
    Ok(floor)
}

/// One fresh VM from the floor image to its first exit.
fn fresh(guest: &Guest) -> Result<Duration, VmmError> {
    let started = Instant::now();
    let (watch, mem) = guest.image.map_memory()?;
    let vm = create_vm(&mem, MEM_SIZE, false)?;
    let mut vcpu = create_vcpu(&vm)?;
    run_to_exit(&mut vcpu, guest)?;
    let took = started.elapsed();
    drop((vcpu, vm, watch, mem));
    Ok(took)
}

/// Sets the floor guest's registers and runs until its store exits.
fn run_to_exit(vcpu: &mut VcpuFd, guest: &Guest) -> Result<(), VmmError> {
    let kvm = |op| move |source| VmmError::Kvm { op, source };
    vcpu.set_sregs(&guest.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&guest.regs).map_err(kvm("KVM_SET_REGS"))?;
    match vcpu.run().map_err(kvm("KVM_RUN"))? {
        VcpuExit::MmioWrite(DEVICE_WINDOW_GPA, _) => Ok(()),
        other => Err(VmmError::FloorExit(format!("{other:?}"))),
    }
}

/// Writes the floor guest's image to a temporary file and opens it.
fn build() -> Result<Guest, VmmError> {
    let memory_error = |e: vm_memory::GuestMemoryError| VmmError::Memory(e.to_string());
    let mem =
        GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).map_err(|e| VmmError::Memory(e.to_string()))?;
    let mut tables = PageTables::new();
    tables.map_linear(0, MEM_SIZE)?;
    tables.map_device_window()?;
    tables.write(&mem)?;
    mem.write_slice(&CODE, GuestAddress(KERNEL_MIN_ADDR)).map_err(memory_error)?;
    let vm = create_vm(&mem, MEM_SIZE, false)?;
    let vcpu = create_vcpu(&vm)?;
    cpu::setup_long_mode(&vcpu, &mem, tables.root(), KERNEL_MIN_ADDR, STACK_TOP - 8, 0)?;
    let mut sregs = vcpu.get_sregs().map_err(|source| VmmError::Kvm { op: "KVM_GET_SREGS", source })?;
    for segment in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        segment.selector |= 3;
        segment.dpl = 3;
    }
    let regs = kvm_regs {
        rip: KERNEL_MIN_ADDR,
        rsp: STACK_TOP - 8,
        rax: DEVICE_WINDOW_GPA,
        rflags: 0x2 | 3 << 12, // IOPL 3, as thaw's guest runs
        ..Default::default()
    };
    let file = tempfile::Builder::new()
        .prefix("thaw-floor-")
        .suffix(".snap")
        .tempfile()
        .map_err(|e| VmmError::Memory(format!("floor image: {e}")))?
        .into_temp_path();
    let guest = GuestMetadata {
        interface_version: abi::INTERFACE_VERSION,
        function_name: "floor".into(),
        wasm_sha256: [0; 32],
        io_table_gpa: 0,
        io_table_len: 0,
        runtime_version: "thaw floor guest".into(),
    };
    let state =
        snapshot::State { vcpu: snapshot::capture_vcpu(&vcpu)?, vm: Vec::new(), guest, working_set: Vec::new() };
    snapshot::write_image(&file, &mem, MEM_SIZE, state, &[])?;
    let image = Image::open(&file)?;
    Ok(Guest { image, regs, sregs, _file: file })
}
