//! The virtio-drivers HAL for thaw's guest: DMA memory from the kernel heap, device registers
//! through the identity-mapped device window.
//!
//! Guest-physical addresses are what the VMM reads: the heap lives in the physical-memory
//! mapping, so a heap pointer's physical address is its offset from that mapping, and a heap
//! block is physically contiguous. Buffers are shared in place (the VMM reads guest memory
//! directly), so sharing costs nothing; callers pass heap buffers only (see
//! [`super::console_write`]).

use core::alloc::Layout;
use core::ptr::NonNull;

use abi::devices::{DEVICE_WINDOW_GPA, DEVICE_WINDOW_LEN};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

use crate::phys;

/// The HAL.
pub struct ThawHal;

fn dma_layout(pages: usize) -> Layout {
    match Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE) {
        Ok(layout) => layout,
        Err(_) => panic!("virtio: a DMA region of {pages} pages is too large"),
    }
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing else uses until
// `dma_dealloc` frees it, with its physical address from the linear physical-memory mapping
// (so the device sees the same bytes); `mmio_phys_to_virt` returns addresses mapped to the
// requested physical range (identity for the device window, the physical-memory mapping
// otherwise); `share` returns the physical address of the caller's own buffer, which stays
// valid while shared.
unsafe impl Hal for ThawHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(dma_layout(pages)) };
        let Some(ptr) = NonNull::new(ptr) else { panic!("virtio: out of memory for {pages} DMA pages") };
        (phys::virt_to_phys(ptr.as_ptr()), ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller passes back a region `dma_alloc` returned for `pages` pages.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), dma_layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        let virt = if (DEVICE_WINDOW_GPA..DEVICE_WINDOW_GPA + DEVICE_WINDOW_LEN).contains(&paddr) {
            paddr
        } else {
            phys::physical_memory_offset() + paddr
        };
        match NonNull::new(virt as *mut u8) {
            Some(ptr) => ptr,
            None => panic!("virtio: device registers at physical address 0"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        phys::virt_to_phys(buffer.as_ptr().cast::<u8>())
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The virtual address of the register window at `gpa`.
///
/// # Safety
/// `gpa` must be a device's register window inside the device window.
pub(super) unsafe fn mmio_window(gpa: u64) -> NonNull<u8> {
    // SAFETY: per the contract.
    unsafe { ThawHal::mmio_phys_to_virt(gpa, abi::devices::REGISTER_WINDOW_LEN as usize) }
}
