//! thaw's guest kernel: a no_std unikernel that does only early boot in ring 0 and runs
//! everything else in ring 3.
//!
//! The KVM on thaw's machines (PVM) emulates guest ring 0 one instruction at a time, about
//! 6000x slower than native, while ring 3 runs natively. So ring 0 does the minimum
//! ([`boot::start`]): make the page tables usable from ring 3 if the loader did not, load a GDT with user segments, a TSS with an I/O permission bitmap and an IDT, then
//! `iretq` to ring 3 with IOPL=3. After that no privileged instruction runs; the kernel talks to
//! the VMM only through hypercalls (`out` to reserved ports) and ends through the exit hypercall.
//! Exceptions still enter ring 0, where the handlers report them and end the VM.
//!
//! The same ELF boots under thaw's VMM (direct boot, which fills in a `BootInfo`) and under QEMU
//! (the `bootloader` crate's BIOS image). [`platform`] hides the difference: hypercalls under
//! thaw, COM1 and `isa-debug-exit` elsewhere.
//!
//! Kernels built on this library use [`kernel_main!`] to name their main function.

#![no_std]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod console;
pub mod devices;
pub mod engine;
pub mod function;
pub mod heap;
pub mod hypercall;
pub mod iotable;
mod panic;
pub mod phys;
pub mod platform;
pub mod serial;
pub mod workingset;

#[doc(hidden)]
pub use bootloader_api;

/// Where the loader must map all of physical memory (PML4 slot 32). It is fixed, not dynamic,
/// so that addresses are the same under both hypervisors, and it stays clear of PML4 slot 256,
/// which PVM reserves.
pub const PHYSICAL_MEMORY_OFFSET: u64 = 0x0000_1000_0000_0000;

/// Start of the range where the BIOS bootloader may place dynamic mappings (kernel stack, boot
/// info): PML4 slot 257, above the slot PVM reserves, and far from the low addresses the test
/// kernels use as known-unmapped.
pub const DYNAMIC_RANGE_START: u64 = 0xffff_8080_0000_0000;

/// Size of the boot stack, which ring 3 keeps using after the drop: generous, because the wasm
/// runtime and the functions' host calls run on it. 1 MiB is the most thaw's direct boot
/// supports; a guard page below it turns an overflow into a clear #PF report.
pub const KERNEL_STACK_SIZE: u64 = 1024 * 1024;

/// What the kernel asks of its loader. thaw's VMM reads the same config from the ELF's
/// `.bootloader-config` section.
pub const BOOTLOADER_CONFIG: bootloader_api::BootloaderConfig = {
    use bootloader_api::config::Mapping;
    let mut config = bootloader_api::BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::FixedAddress(PHYSICAL_MEMORY_OFFSET));
    config.mappings.dynamic_range_start = Some(DYNAMIC_RANGE_START);
    config.kernel_stack_size = KERNEL_STACK_SIZE;
    config
};

/// The interface version this kernel speaks, declared in an ELF note the VMM checks before it
/// loads anything.
#[used]
#[unsafe(link_section = ".note.thaw")]
pub static ABI_NOTE: abi::note::AbiNote = abi::note::AbiNote::new(abi::INTERFACE_VERSION);

/// Declares `main` (a `fn() -> u32` returning the exit code) as the kernel's main function,
/// run in ring 3 after early boot.
#[macro_export]
macro_rules! kernel_main {
    ($main:path) => {
        $crate::bootloader_api::entry_point!(__thaw_entry, config = &$crate::BOOTLOADER_CONFIG);

        fn __thaw_entry(boot_info: &'static mut $crate::bootloader_api::BootInfo) -> ! {
            $crate::boot::start(boot_info, $main)
        }
    };
}

/// Reports that the kernel is ready: tells the VMM (for its boot timings) and prints the ready
/// line with the privilege level the caller runs at.
pub fn report_ready() {
    platform::milestone(abi::hypercall::Milestone::Ready);
    println!("thaw-guest: ready (cpl {})", arch::current_privilege_level());
}
