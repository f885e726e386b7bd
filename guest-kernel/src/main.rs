//! The kernel thaw ships: boots, prints its banner and ready line, then serves the function in
//! its ramdisk if it has one, or exits 0.

#![no_std]
#![no_main]

extern crate alloc;

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    // Exercise the heap once so a broken allocator fails here, loudly, not in a later request.
    let values: alloc::vec::Vec<u64> = (1..=64).collect();
    assert_eq!(values.iter().sum::<u64>(), 64 * 65 / 2, "heap self-check");
    guest_kernel::report_ready();
    match guest_kernel::boot::ramdisk() {
        Some(bundle) => guest_kernel::function::serve(bundle),
        None => 0,
    }
}
