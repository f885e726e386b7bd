//! The kernel heap: a linked-list allocator behind a spin lock, over the largest usable memory
//! region the loader reported, reached through the physical-memory mapping.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;

use bootloader_api::info::{MemoryRegion, MemoryRegionKind};
use linked_list_allocator::Heap;
use spin::Mutex;

struct KernelHeap(Mutex<Heap>);

// SAFETY: `Heap` hands out disjoint, suitably aligned blocks from memory it owns exclusively
// (given to it once in `init`); the mutex serializes all access to it.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.lock().allocate_first_fit(layout).map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator returned, with its layout.
            unsafe { self.0.lock().deallocate(ptr, layout) };
        }
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap(Mutex::new(Heap::empty()));

/// Why the heap could not be set up.
#[derive(Debug)]
pub enum HeapError {
    /// The loader reported no usable memory.
    NoUsableMemory,
}

impl fmt::Display for HeapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoUsableMemory => write!(f, "the loader reported no usable memory region"),
        }
    }
}

/// Gives the largest usable region to the heap and returns its size in bytes.
pub fn init(regions: &[MemoryRegion], phys_offset: u64) -> Result<usize, HeapError> {
    let region = regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable && r.end > r.start)
        .max_by_key(|r| r.end - r.start)
        .ok_or(HeapError::NoUsableMemory)?;
    let size = (region.end - region.start) as usize;
    // SAFETY: the loader reports the region as usable RAM that nothing else uses, and maps all
    // physical memory at `phys_offset`; `init` runs once, before the first allocation.
    unsafe { HEAP.0.lock().init((phys_offset + region.start) as *mut u8, size) };
    Ok(size)
}
