//! Test kernel: wipes its own IDT from ring 3, then executes `ud2`. With no gate to deliver #UD
//! (nor the #NP and #DF that follow), the CPU shuts down: a triple fault, which thaw's VMM must
//! report as this VM's failure.

#![no_std]
#![no_main]

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    guest_kernel::println!("test-triple-fault: wiping the IDT");
    let idt = guest_kernel::arch::idt::table_address() as *mut u8;
    // SAFETY: none intended; this destroys the exception gates on purpose. The IDT is 32 gates
    // of 16 bytes in a user-accessible page.
    unsafe { core::ptr::write_bytes(idt, 0, 32 * 16) };
    // SAFETY: as above; this instruction is meant to fault.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    guest_kernel::println!("test-triple-fault: survived");
    1
}
