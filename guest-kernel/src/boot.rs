//! The boot path: ring-0 early boot, the drop to ring 3, and the ring-3 half of start-up.
//!
//! Ring 0 is emulated instruction by instruction under PVM, so [`start`] runs a few hundred
//! instructions and nothing else: no heap, no formatting, no loops over memory unless the loader left the page tables supervisor-only (the BIOS bootloader does;
//! thaw's VMM does not).

use core::sync::atomic::{AtomicPtr, Ordering};

use bootloader_api::BootInfo;

use crate::{arch, console, heap, phys, platform, println};

/// The boot info, handed from ring 0 to ring 3.
static BOOT_INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());

/// The ramdisk the loader placed in memory (a function bundle), if any.
pub fn ramdisk() -> Option<&'static [u8]> {
    // SAFETY: `start` stored a pointer to the `'static` boot info before ring 3 ran.
    let boot_info = unsafe { BOOT_INFO.load(Ordering::Acquire).as_ref()? };
    let addr = boot_info.ramdisk_addr.into_option()?;
    // SAFETY: the loader mapped `ramdisk_len` bytes at `ramdisk_addr` and reserved them
    // (reported as non-usable memory), so nothing else writes them.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, boot_info.ramdisk_len as usize) })
}

/// Kernel entry (ring 0): early boot, then ring 3, where `main` runs. Never returns: the kernel
/// ends through the platform's exit.
pub fn start(boot_info: &'static mut BootInfo, main: fn() -> u32) -> ! {
    arch::force_use(&crate::ABI_NOTE);
    let Some(phys_offset) = boot_info.physical_memory_offset.into_option() else {
        panic!("loader did not map physical memory");
    };
    phys::set_physical_memory_offset(phys_offset);
    let cr3: u64;
    // SAFETY: reading CR3 in ring 0 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    phys::set_page_table_root(cr3);
    // Detect the hypervisor now: only ring-0 CPUID sees thaw's leaves under PVM.
    platform::current();
    BOOT_INFO.store(boot_info, Ordering::Release);

    // SAFETY: we run in ring 0 on the loader's page tables, with physical memory mapped at
    // `phys_offset` as the boot info says; nothing else runs, so nothing observes the tables,
    // GDT or IDT while they change.
    unsafe {
        arch::paging::make_user_accessible(phys_offset, start as *const () as u64);
        arch::enable_sse_for_ring3();
        arch::gdt::load();
        arch::idt::load();
    }
    // SAFETY: the GDT, TSS (RSP0 and I/O bitmap) and IDT are loaded, and the code, stack and data
    // ring 3 touches are user-accessible.
    unsafe { arch::enter_ring3(ring3_main, main as usize as u64) }
}

/// The first ring-3 code: heap, devices, banner, main, exit.
extern "C" fn ring3_main(main: u64) -> ! {
    platform::milestone(abi::hypercall::Milestone::Ring3Entered);
    console::init_console();
    // SAFETY: `start` stored a pointer to the `'static` boot info before dropping here, and
    // nothing mutates it any more.
    let boot_info = unsafe { &*BOOT_INFO.load(Ordering::Acquire) };
    if let Err(e) = heap::init(&boot_info.memory_regions, phys::physical_memory_offset()) {
        panic!("heap: {e}");
    }
    crate::devices::init();
    println!("thaw-guest {} (abi {})", env!("CARGO_PKG_VERSION"), abi::INTERFACE_VERSION);
    // SAFETY: `start` passed a `fn() -> u32` as this argument.
    let main: fn() -> u32 = unsafe { core::mem::transmute(main as usize) };
    let code = main();
    platform::exit(code)
}
