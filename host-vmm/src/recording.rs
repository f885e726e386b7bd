//! Recording a function's working set (REAP): which guest-virtual pages a VM restored from its
//! image touches from its resume through one sample request. [`crate::workingset`] holds what
//! restores do with a recorded one.
//!
//! Under PVM every page a restored guest touches for the first time costs a shadow-page fault,
//! and nothing on the host can map it ahead (`KVM_PRE_FAULT_MEMORY` needs two-dimensional
//! paging). So the image records what a restore and a request touch, and:
//! - a VM restored ahead of its request has its guest touch those pages before it parks
//!   (`guest-kernel/src/workingset.rs`);
//! - a fresh VM gets memory whose working-set pages the host has already copied
//!   ([`crate::memory::populate`]), so each of its faults maps up to 8 of them.
//!
//! The guest maps RAM with 2 MiB pages, whose accessed and dirty bits say too little. So the
//! recording VM, before it first runs, gets a copy of the guest's mappings split into 4 KiB
//! pages with those bits clear, in a memory slot of its own above RAM, and CR3 pointing at it.
//! After the sample request the bits say which 4 KiB pages were read and which were written.
//! The guest's own tables and memory are never changed, and the recording VM is thrown away.
//!
//! Where KVM can map guest memory ahead (`KVM_PRE_FAULT_MEMORY`, two-dimensional paging only),
//! a VM restored ahead also has the working set's guest-physical pages mapped before it runs
//! ([`crate::workingset::pre_fault`]); the guest's touches stay, as they are what works under
//! shadow paging.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use abi::devices::{DEVICE_WINDOW_GPA, DEVICE_WINDOW_LEN};
use abi::workingset::{self, Run};
use vm_memory::GuestAddress;

use crate::instance::{Instance, Served};
use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::memory::GuestRam;
use crate::outcome::Outcome;
use crate::paging::{self, ACCESSED, DIRTY, PageTables};
use crate::snapshot::Image;
use crate::vm::{BootTimings, Role, VmConfig, VmmError};
use crate::workingset::max_mapped;

/// Where the recording tables live: the first 2 MiB boundary past the device window, which lies
/// above all of RAM.
const SCRATCH_GPA: u64 = DEVICE_WINDOW_GPA + DEVICE_WINDOW_LEN;

/// A recorded working set and the sample request that made it.
#[derive(Debug)]
pub struct Recording {
    /// The touched pages, as runs.
    pub runs: Vec<Run>,
    /// How the sample request went.
    pub sample: Served,
    /// From the guest resuming to parking, before the sample.
    pub park: Duration,
}

/// Restores a VM from `image` and, under 4 KiB tables that record what it touches, parks it and
/// serves it `request`. The guest's output goes to `output`. Fails when the guest does not park or
/// does not answer the sample (whatever the function's status).
pub fn record(
    image: &Arc<Image>,
    config: &VmConfig,
    request: Vec<u8>,
    output: &mut dyn Write,
) -> Result<Recording, VmmError> {
    let mut instance = Instance::restore(image, config, Role::Fresh, &mut BootTimings::default())?;
    let root = install_split_tables(&mut instance)?;
    let park = instance.park(output)?;
    let sample = instance.serve(request, output)?;
    if !matches!(sample.outcome, Outcome::Answered) {
        return Err(VmmError::SampleUnanswered(sample.outcome));
    }
    let runs = touched(&instance, root)?;
    Ok(Recording { runs, sample, park })
}

/// Builds the 4 KiB copy of the restored guest's mappings in scratch memory and points CR3 at it.
/// Returns the copy's root.
fn install_split_tables(instance: &mut Instance) -> Result<u64, VmmError> {
    let vm = instance.vm_mut();
    let mem_size = vm.memory_size();
    let cr3 = vm.cr3()?;
    let max = max_mapped(mem_size);
    let leaves = paging::leaves(vm.memory(), cr3, max)?;
    let limit = SCRATCH_GPA + (max / LARGE_PAGE_SIZE + 64) * PAGE_SIZE;
    let mut tables = PageTables::at(SCRATCH_GPA, limit);
    for leaf in &leaves {
        tables.map_split(leaf, mem_size)?;
    }
    let scratch = GuestRam::from_ranges(&[(GuestAddress(SCRATCH_GPA), tables.size_bytes() as usize)])
        .map_err(|e| VmmError::Memory(format!("recording tables: {e}")))?;
    tables.write(&scratch)?;
    vm.add_scratch_memory(scratch)?;
    // Keep CR3's low bits (cache control); only the table address changes.
    vm.set_cr3(tables.root() | (cr3 & (PAGE_SIZE - 1)))?;
    Ok(tables.root())
}

/// The 4 KiB pages of RAM whose entries in the copy rooted at `root` were accessed, with their
/// dirty bits, as runs.
fn touched(instance: &Instance, root: u64) -> Result<Vec<Run>, VmmError> {
    let vm = instance.vm();
    let scratch = vm.scratch_memory().ok_or_else(|| VmmError::Memory("the recording tables are gone".into()))?;
    let leaves = paging::leaves(scratch, root, max_mapped(vm.memory_size()))?;
    let pages = leaves
        .iter()
        .filter(|l| l.size == PAGE_SIZE && l.entry & ACCESSED != 0 && l.phys < vm.memory_size())
        .map(|l| (l.virt, l.entry & DIRTY != 0));
    Ok(workingset::from_pages(pages))
}
