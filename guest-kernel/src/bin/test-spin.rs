//! Test kernel: spins forever in ring 3, which must end with the host's timeout.

#![no_std]
#![no_main]

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    guest_kernel::println!("test-spin: spinning forever");
    loop {
        core::hint::spin_loop();
    }
}
