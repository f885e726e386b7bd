//! The guest side of hypercalls: an `out` to the call's port, with any payload placed in the
//! hypercall page first (see `abi::hypercall`). Only meaningful under thaw's VMM.

use abi::hypercall::{HYPERCALL_PAGE_SIZE, Hypercall};

use crate::phys;

/// Issues `call`.
pub fn call(call: Hypercall) {
    let (port, arg) = call.encode();
    // SAFETY: the TSS bitmap opens the hypercall ports to ring 3; the `out` has no effect on
    // this program's memory other than what the VMM does on its behalf (no `nomem`, so the
    // compiler keeps earlier payload writes before it).
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") arg, options(nostack, preserves_flags)) };
}

/// Copies `payload` (truncated to the page) into the hypercall page and issues `make(len)`.
pub fn with_payload(payload: &[u8], make: impl FnOnce(usize) -> Hypercall) {
    let len = payload.len().min(HYPERCALL_PAGE_SIZE);
    // SAFETY: the hypercall page is a page of guest RAM reserved for this use, mapped through the
    // physical-memory offset; `len` fits it. One vCPU, no interrupts: nothing else writes it
    // concurrently.
    unsafe { core::ptr::copy_nonoverlapping(payload.as_ptr(), phys::hypercall_page(), len) };
    call(make(len));
}
