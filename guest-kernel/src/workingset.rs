//! Touching the recorded working set (`abi::workingset`) before the first request, so that a
//! VM restored ahead of its request has the pages that request will use already mapped.
//!
//! Under PVM every page a restored guest touches for the first time costs a shadow-page fault
//! (about 3 µs); the VMM offers the working set only to VMs it restores ahead (pool and reset
//! modes), so the touches happen off the request path. A read page is read; a written page has
//! one byte read and written back unchanged, which maps it writable without changing it.

use abi::hypercall::Hypercall;
use abi::workingset::{PAGE_SIZE, RUN_LEN, Run};

use crate::{hypercall, phys};

/// Fetches and touches `runs` runs of the working set, a hypercall page of runs at a time.
/// Returns the pages touched.
pub fn touch(runs: u32) -> u64 {
    let mut first = 0u32;
    let mut touched = 0u64;
    while first < runs {
        hypercall::call(Hypercall::WorkingSet { first });
        // SAFETY: the VMM wrote its reply into the hypercall page before the `out` returned; it
        // is read as plain bytes, and nothing else writes the page until the next hypercall.
        let page = unsafe { core::slice::from_raw_parts(phys::hypercall_page(), abi::hypercall::HYPERCALL_PAGE_SIZE) };
        let count = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
        let batch = page[8..].as_chunks::<RUN_LEN>().0;
        if count == 0 || count as usize > batch.len() {
            break;
        }
        for bytes in &batch[..count as usize] {
            // The VMM validated the set when it opened the image; a run it sends that does not
            // decode is skipped rather than trusted.
            if let Ok(run) = Run::decode(bytes) {
                touched += touch_run(&run);
            }
        }
        first += count;
    }
    touched
}

fn touch_run(run: &Run) -> u64 {
    for page in 0..u64::from(run.pages) {
        let byte = (run.start + page * PAGE_SIZE) as *mut u8;
        // SAFETY: the working set lists pages this guest's own page tables map, user-accessible
        // and writable (the sample request touched them in a VM restored from this image). One
        // vCPU and no interrupts: writing back the byte just read changes nothing.
        unsafe {
            let value = byte.read_volatile();
            if run.written {
                byte.write_volatile(value);
            }
        }
    }
    u64::from(run.pages)
}
