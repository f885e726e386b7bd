//! Test kernel: writes to an unmapped address from ring 3, which must end as a #PF report.

#![no_std]
#![no_main]

guest_kernel::kernel_main!(main);

/// Canonical, in PML4 slot 23, which neither loader maps.
const UNMAPPED: u64 = 0x0000_0bad_c0de_0000;

fn main() -> u32 {
    guest_kernel::println!(
        "test-fault: writing to {UNMAPPED:#x} from cpl {}",
        guest_kernel::arch::current_privilege_level()
    );
    // SAFETY: none; this store is meant to fault. It is done in assembly so the compiler makes no
    // assumptions about it.
    unsafe { core::arch::asm!("mov byte ptr [{}], 1", in(reg) UNMAPPED, options(nostack)) };
    guest_kernel::println!("test-fault: the write did not fault");
    1
}
