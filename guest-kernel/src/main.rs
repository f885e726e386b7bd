#![no_std]
#![no_main]
use guest_kernel as _;
bootloader_api::entry_point!(main);
fn main(_b: &'static mut bootloader_api::BootInfo) -> ! { loop {} }
