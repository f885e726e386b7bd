//! Test kernel: stores to a read-only register of its first virtio device (the magic value),
//! which thaw's VMM must answer by ending this VM with a clear error. Without devices, or under
//! other hypervisors, it says so and exits 0.

#![no_std]
#![no_main]

use guest_kernel::devices;

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    let Some(device) = devices::table().entries.first().copied() else {
        guest_kernel::println!("test-bad-device: no virtio devices");
        return 0;
    };
    guest_kernel::println!("test-bad-device: writing the magic register of {} {}", device.kind, device.index);
    // SAFETY: the VMM's device table puts a register window at this address, identity-mapped;
    // the store only reaches the VMM.
    unsafe { (device.gpa as *mut u32).write_volatile(0x1234) };
    guest_kernel::println!("test-bad-device: the VMM let the store through");
    1
}
