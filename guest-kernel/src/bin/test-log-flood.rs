//! Test kernel: writes far more than the host keeps, a COM1 line with no newline and then
//! 8 MiB through the log, and exits 0. The host must keep its ceiling and say so.

#![no_std]
#![no_main]

guest_kernel::kernel_main!(main);

fn main() -> u32 {
    guest_kernel::println!("test-log-flood: flooding");
    guest_kernel::serial::write(&[b'y'; 8192]);
    let mut line = [b'x'; 1024];
    line[1023] = b'\n';
    for _ in 0..8192 {
        guest_kernel::console::write_log(&line);
    }
    0
}
