//! Where direct boot puts things in guest-physical memory.
//!
//! ```text
//!   0x0000_0000 ┌──────────────────────┐ null page: not mapped, so null dereferences fault
//!   0x0000_1000 │ hypercall page       │ abi::hypercall::HYPERCALL_PAGE_GPA
//!   0x0000_2000 │ host parameters      │ abi::params::HOST_PARAMS_GPA: entropy, clock
//!   0x0000_3000 │ boot GDT             │ replaced by the kernel's own GDT in early boot
//!   0x0000_4000 │ page tables          │ PML4, PDPTs, PDs, and the PT of the first 2 MiB
//!   0x0008_0000 │ boot info            │ BootInfo, then its memory-region array
//!   0x000f_f000 │ stack guard page     │ not mapped
//!   0x0010_0000 │ kernel stack         │ grows down from 0x20_0000 (at most 1 MiB)
//!   0x0020_0000 ├──────────────────────┤ kernel LOAD segments, at their physical addresses
//!               │ ramdisk (optional)   │ page-aligned, after the kernel
//!               │ usable memory        │ reported to the kernel as Usable (its heap)
//!   mem_size    └──────────────────────┘
//! ```
//!
//! Virtual memory: all of guest memory is identity-mapped (so the kernel, linked at 0x20_0000,
//! runs where it was loaded) and mapped again at the physical-memory offset the kernel's
//! bootloader config asks for. Every mapping is user-accessible, because the kernel runs in ring
//! 3 after early boot; the VM, not the privilege level, is the isolation boundary.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// The boot GDT.
pub const GDT_GPA: u64 = 0x3000;
/// First page of the page-table area.
pub const PAGE_TABLES_START: u64 = 0x4000;
/// End of the page-table area (exclusive).
pub const PAGE_TABLES_END: u64 = 0x8_0000;
/// The BootInfo struct, followed by its memory regions.
pub const BOOT_INFO_GPA: u64 = 0x8_0000;
/// End of the boot-info area (exclusive); the stack guard page follows.
pub const BOOT_INFO_END: u64 = 0xf_f000;
/// Lowest possible stack bottom.
pub const STACK_AREA_START: u64 = 0x10_0000;
/// Top of the kernel stack (exclusive).
pub const STACK_TOP: u64 = 0x20_0000;
/// Lowest address a kernel segment may occupy.
pub const KERNEL_MIN_ADDR: u64 = 0x20_0000;

/// Smallest guest memory direct boot accepts.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest guest memory direct boot accepts (bounded by the page-table area).
pub const MAX_MEMORY_MIB: u64 = 32 * 1024;

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}
