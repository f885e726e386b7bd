//! The IDT: 32 exception gates whose handlers report the fault and end the VM.
//!
//! Each vector has a tiny assembly stub that pushes a dummy error code where the CPU does not,
//! then the vector number, and jumps to a common path that calls [`exception_entry`] with a
//! pointer to the resulting [`ExceptionFrame`]. The IDT holds only the 32 exception vectors:
//! thaw's guest never enables interrupts, and any other vector would arrive as #GP.
//!
//! Handlers run in ring 0, which PVM emulates one instruction at a time; they are fatal and
//! short. They never try to resume the faulting code.

use core::arch::{asm, global_asm};
use core::mem::size_of;

use abi::fault::FaultReport;

use super::DescriptorTablePointer;
use super::gdt::{DOUBLE_FAULT_IST, KERNEL_CS};

global_asm!(
    r#"
    .section .text.thaw_exceptions, "ax"
    .macro thaw_exc_noerr n
    thaw_exc_\n:
        push 0
        push \n
        jmp thaw_exc_common
    .endm
    .macro thaw_exc_err n
    thaw_exc_\n:
        push \n
        jmp thaw_exc_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    thaw_exc_noerr \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    thaw_exc_err \n
    .endr
    thaw_exc_common:
        mov rdi, rsp
        and rsp, -16
        call {entry}
        ud2

    .section .rodata.thaw_exceptions, "a"
    .balign 8
    .global thaw_exception_stubs
    thaw_exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad thaw_exc_\n
    .endr
    "#,
    entry = sym exception_entry,
);

unsafe extern "C" {
    /// The 32 stub addresses, in vector order (defined in the assembly above).
    static thaw_exception_stubs: [u64; 32];
}

/// What the stub and the CPU leave on the stack, lowest address first.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// One 16-byte interrupt gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

impl Gate {
    const MISSING: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, attributes: 0, offset_mid: 0, offset_high: 0, _reserved: 0 };

    fn new(handler: u64, ist: u8) -> Self {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            _reserved: 0,
        }
    }
}

static mut IDT: [Gate; 32] = [Gate::MISSING; 32];

/// Fills and loads the IDT.
///
/// # Safety
/// Ring 0 only, after [`super::gdt::load`] (the gates use its code selector and IST slot).
pub unsafe fn load() {
    let idt = &raw mut IDT;
    // SAFETY: nothing else runs; the stub table is defined by our assembly and has 32 entries.
    unsafe {
        let stubs = &raw const thaw_exception_stubs;
        for vector in 0..32 {
            let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
            (*idt)[vector] = Gate::new((*stubs)[vector], ist);
        }
        let pointer = DescriptorTablePointer { limit: (size_of::<[Gate; 32]>() - 1) as u16, base: idt as u64 };
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags));
    }
}

/// Where the IDT lives. Ring 3 can write it (every page is user-accessible): the
/// `test-triple-fault` kernel uses this to show that a guest wrecking its own IDT ends only its
/// own VM.
pub fn table_address() -> u64 {
    (&raw const IDT) as u64
}

/// Called by the common stub, in ring 0, with the frame it built.
///
/// # Safety
/// `frame` points to the stub's [`ExceptionFrame`].
unsafe extern "C" fn exception_entry(frame: *const ExceptionFrame) -> ! {
    // SAFETY: per the contract the frame is on our ring-0 stack, written by the stub and the CPU.
    let frame = unsafe { frame.read() };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects, and we are in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::platform::report_fault(&FaultReport {
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        cr2,
    })
}
