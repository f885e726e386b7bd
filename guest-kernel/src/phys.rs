//! The ground floor of the guest: where physical memory is mapped, how a virtual address
//! translates to the guest-physical one the VMM sees, and the hypercall page. Everything that
//! hands the VMM an address or reads what it wrote builds on this, and it builds on nothing of
//! the kernel's but the page-table walk.

use core::sync::atomic::{AtomicU64, Ordering};

use abi::hypercall::HYPERCALL_PAGE_GPA;

static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
static PAGE_TABLE_ROOT: AtomicU64 = AtomicU64::new(0);

/// Records where physical memory is mapped (early boot, ring 0).
pub fn set_physical_memory_offset(phys_offset: u64) {
    PHYS_OFFSET.store(phys_offset, Ordering::Relaxed);
}

/// Records the page-table root (CR3, read in early boot: ring 3 cannot read it).
pub fn set_page_table_root(cr3: u64) {
    PAGE_TABLE_ROOT.store(cr3, Ordering::Relaxed);
}

/// The virtual address at which physical memory is mapped.
pub fn physical_memory_offset() -> u64 {
    PHYS_OFFSET.load(Ordering::Relaxed)
}

/// How much of the address space above the physical-memory offset counts as the physical-memory
/// mapping (PML4 slots 32 to 63: far more memory than any guest has, and clear of the
/// loader's dynamic range).
const PHYS_MAP_SPAN: u64 = 1 << 44;

/// The guest-physical address behind `ptr`. Heap pointers lie in the physical-memory mapping;
/// anything else (the kernel's statics and stack, which the BIOS loader places on frames of its
/// choosing) is translated by walking the page tables, which are readable from ring 3 through
/// that same mapping. An unmapped address is returned unchanged.
pub fn virt_to_phys(ptr: *const u8) -> u64 {
    let (addr, offset) = (ptr as u64, physical_memory_offset());
    if addr >= offset && addr - offset < PHYS_MAP_SPAN {
        return addr - offset;
    }
    walk(addr).unwrap_or(addr)
}

/// Translates `virt` through the page tables rooted at the recorded CR3.
fn walk(virt: u64) -> Option<u64> {
    let root = PAGE_TABLE_ROOT.load(Ordering::Relaxed);
    if root == 0 {
        return None;
    }
    crate::arch::translate::translate(root, virt, |entry| {
        // SAFETY: `entry` is the address of an entry in a page-table frame reached from CR3;
        // all of physical memory is mapped at the offset, user-accessible.
        unsafe { ((physical_memory_offset() + entry) as *const u64).read_volatile() }
    })
}

/// The hypercall page, seen through the physical-memory mapping.
pub fn hypercall_page() -> *mut u8 {
    (physical_memory_offset() + HYPERCALL_PAGE_GPA) as *mut u8
}
