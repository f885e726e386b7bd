//! Test kernel: issues a hypercall number the interface does not define, which thaw's VMM must
//! answer by ending this VM with a clear error. Under other hypervisors it just exits 0.

#![no_std]
#![no_main]

use guest_kernel::platform::{self, Platform};

guest_kernel::kernel_main!(main);

/// A port inside the hypercall range with no meaning in this interface version.
const UNDEFINED_HYPERCALL_PORT: u16 = abi::hypercall::PORT_BASE + abi::hypercall::PORT_COUNT - 1;

fn main() -> u32 {
    guest_kernel::println!("test-bad-hypercall: calling port {UNDEFINED_HYPERCALL_PORT:#x}");
    if platform::current() == Platform::Thaw {
        // SAFETY: an `out` on a port the TSS bitmap opens; it only reaches the VMM.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") UNDEFINED_HYPERCALL_PORT, in("eax") 0u32, options(nomem, nostack))
        };
        guest_kernel::println!("test-bad-hypercall: the VMM let the call through");
        return 1;
    }
    0
}
