//! x86-64 specifics: descriptor tables, page-table fix-up and translation, and the switch to
//! ring 3.

pub mod gdt;
pub mod idt;
pub mod paging;
pub mod translate;

use core::arch::asm;

/// The operand of `lgdt` and `lidt`.
#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// RFLAGS for ring 3: IOPL=3 (bits 12-13) and the reserved bit 1; interrupts stay off, since
/// thaw's guest has no interrupt sources.
const USER_RFLAGS: u64 = 0x3002;

/// The privilege level the caller runs at (`cs & 3`). Under PVM `cs` shows the host's selector,
/// but its low two bits are still the CPL.
pub fn current_privilege_level() -> u16 {
    let cs: u16;
    // SAFETY: reading a segment register has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// Lets ring 3 execute SSE: the code Wasmtime compiles uses it (the kernel itself is built
/// soft-float and never does). thaw's VMM sets these bits itself, so under PVM this is two
/// control-register reads; only the BIOS bootloader leaves them clear.
///
/// # Safety
/// Ring 0 only.
pub unsafe fn enable_sse_for_ring3() {
    let (cr0, cr4): (u64, u64);
    // SAFETY: reading control registers in ring 0 has no side effects.
    unsafe {
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    let (want_cr0, want_cr4) = ((cr0 & !CR0_EM) | CR0_MP, cr4 | CR4_OSFXSR | CR4_OSXMMEXCPT);
    if (want_cr0, want_cr4) != (cr0, cr4) {
        // SAFETY: these bits only enable SSE state and exceptions; no instruction that runs in
        // ring 0 uses SSE, and ring 3 has not run yet.
        unsafe {
            asm!("mov cr0, {}", in(reg) want_cr0, options(nostack, preserves_flags));
            asm!("mov cr4, {}", in(reg) want_cr4, options(nostack, preserves_flags));
        }
    }
}

/// Keeps `value` alive through the linker's section garbage collection, as `bootloader_api`
/// does for its config, without emitting any memory access.
pub fn force_use<T>(value: &T) {
    let addr = value as *const T as usize;
    // SAFETY: the instruction only adds zero to a register copy of the address.
    unsafe { asm!("add {0}, 0", in(reg) addr, options(nomem, nostack)) };
}

/// Leaves ring 0 for good: `iretq` into `entry(arg)` at CPL 3 with IOPL=3, on the current stack.
///
/// # Safety
/// The GDT and TSS from [`gdt::load`] and the IDT from [`idt::load`] must be loaded, and the code
/// of `entry`, the current stack and all data ring 3 touches must be user-accessible.
pub unsafe fn enter_ring3(entry: extern "C" fn(u64) -> !, arg: u64) -> ! {
    // SAFETY: per the caller's contract the target is valid in ring 3. The user stack pointer is
    // the current one, aligned down to 16 and then offset by 8 as if `entry` had been called.
    unsafe {
        asm!(
            "mov rax, rsp",
            "and rax, -16",
            "sub rax, 8",
            "push {ss}",
            "push rax",
            "push {rflags}",
            "push {cs}",
            "push rsi",
            "iretq",
            ss = const gdt::USER_DS as u64,
            cs = const gdt::USER_CS as u64,
            rflags = const USER_RFLAGS,
            // rax is scratch: no operand may be allocated to it.
            in("rsi") entry,
            in("rdi") arg,
            options(noreturn)
        )
    }
}
