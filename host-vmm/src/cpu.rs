//! Putting the vCPU in 64-bit mode at the kernel's entry, and the CPUID it sees.
//!
//! Direct boot skips real mode entirely: the vCPU starts with paging, PAE and long mode on, CS a
//! 64-bit code segment from the boot GDT, CR3 at our page tables, RSP at the top of the kernel
//! stack and RDI pointing to the BootInfo, the state the `bootloader` crate hands a kernel.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::GDT_GPA;

/// Boot GDT: null, 64-bit code (0x08), data (0x10), and a 64-bit TSS descriptor (0x18) that
/// only satisfies VM entry; the kernel replaces all of it in early boot.
const BOOT_GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// CPUID leaf 1, ECX: a hypervisor is present.
const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;

/// Why the vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Writing the boot GDT failed.
    #[error("writing the boot GDT: {0}")]
    Gdt(#[from] vm_memory::GuestMemoryError),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { op, source }
}

/// The supported CPUID with the hypervisor bit set and KVM's own hypervisor leaves replaced by
/// thaw's: the signature and the interface version.
pub fn thaw_cpuid(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<_> =
        supported.iter().filter(|e| !(0x4000_0000..=0x4000_00ff).contains(&e.function)).copied().collect();
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= CPUID_HYPERVISOR_BIT;
    }
    let (ebx, ecx, edx) = abi::cpuid::signature_registers();
    entries.push(kvm_cpuid_entry2 {
        function: abi::cpuid::HYPERVISOR_LEAF,
        eax: abi::cpuid::INTERFACE_LEAF,
        ebx,
        ecx,
        edx,
        ..Default::default()
    });
    entries.push(kvm_cpuid_entry2 {
        function: abi::cpuid::INTERFACE_LEAF,
        eax: abi::INTERFACE_VERSION,
        ..Default::default()
    });
    entries
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers for 64-bit mode with paging rooted at `cr3`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment { limit: 0x67, type_: 0xb, s: 0, g: 0, db: 0, ..segment(TSS_SELECTOR, 0xb, false) };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Writes the boot GDT and sets every register the kernel starts with.
pub fn setup_long_mode(
    vcpu: &VcpuFd,
    mem: &GuestRam,
    cr3: u64,
    entry: u64,
    stack_pointer: u64,
    boot_info: u64,
) -> Result<(), CpuError> {
    for (i, descriptor) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(GDT_GPA + i as u64 * 8))?;
    }
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs, cr3)).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs { rip: entry, rsp: stack_pointer, rdi: boot_info, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_replaces_hypervisor_leaves_with_thaws() {
        let supported = [
            kvm_cpuid_entry2 { function: 1, ecx: 0x1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x4000_0000, ebx: 0x4b4d564b, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x4000_0001, eax: 0xffff, ..Default::default() },
        ];
        let out = thaw_cpuid(&supported);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].ecx, 0x1 | CPUID_HYPERVISOR_BIT);
        let leaf = out.iter().find(|e| e.function == abi::cpuid::HYPERVISOR_LEAF).unwrap();
        assert_eq!(abi::cpuid::signature_from_registers(leaf.ebx, leaf.ecx, leaf.edx), abi::cpuid::SIGNATURE);
        let version = out.iter().find(|e| e.function == abi::cpuid::INTERFACE_LEAF).unwrap();
        assert_eq!(version.eax, abi::INTERFACE_VERSION);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default(), 0x3000);
        assert_eq!(s.cr3, 0x3000);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!((s.cs.l, s.cs.db, s.cs.selector), (1, 0, CODE_SELECTOR));
    }
}
