//! Test kernel: panics in ring 3 after printing one line.

#![no_std]
#![no_main]

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    guest_kernel::println!("test-panic: about to panic");
    panic!("deliberate test panic (code {})", 42)
}
