//! Recording a function's working set (REAP): which guest-virtual pages a VM restored from its
//! image touches from its resume through one sample request.
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
//! ([`pre_fault`]); the guest's touches stay, as they are what works under shadow paging.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use abi::devices::{DEVICE_WINDOW_GPA, DEVICE_WINDOW_LEN};
use abi::workingset::{self, Run};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::instance::{Instance, Served};
use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::memory::GuestRam;
use crate::outcome::Outcome;
use crate::paging::{self, ACCESSED, DIRTY, PageTables};
use crate::snapshot::Image;
use crate::vm::{BootTimings, Role, VmConfig, VmmError};

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
    let failed = |what: String| VmmError::Config(format!("recording the working set: {what}"));
    let mut instance = Instance::restore(image, config, Role::Fresh, &mut BootTimings::default())?;
    let root = install_split_tables(&mut instance)?;
    let (outcome, park) = instance.park(output)?;
    if !matches!(outcome, Outcome::Parked) {
        return Err(failed(format!("the restored function ended before taking the sample request: {outcome}")));
    }
    let sample = instance.serve(request, output)?;
    if !matches!(sample.outcome, Outcome::Answered) {
        return Err(failed(format!(
            "the sample request did not answer ({}); give one the function answers (--sample-data), or skip it (--no-working-set)",
            sample.outcome
        )));
    }
    let runs = touched(&instance, root)?;
    Ok(Recording { runs, sample, park })
}

/// Most bytes a guest's tables may map: twice its RAM (the identity and physical-memory maps)
/// with room to spare. More means aliased tables.
fn max_mapped(mem_size: u64) -> u64 {
    mem_size.saturating_mul(4).saturating_add(1 << 30)
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

/// The guest-physical ranges (start, length) behind `runs` under the page tables rooted at
/// `cr3` in `mem`, merged where they touch. Pages the tables do not map are left out.
pub fn physical_ranges(mem: &GuestRam, cr3: u64, runs: &[Run]) -> Result<Vec<(u64, u64)>, VmmError> {
    let mem_size = mem.last_addr().raw_value().saturating_add(1);
    let leaves = paging::leaves(mem, cr3, max_mapped(mem_size))?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for run in runs {
        for page in 0..u64::from(run.pages) {
            let virt = run.start + page * PAGE_SIZE;
            let at = leaves.partition_point(|l| l.virt <= virt);
            let Some(leaf) = at.checked_sub(1).map(|i| &leaves[i]).filter(|l| virt < l.virt + l.size) else {
                continue;
            };
            let gpa = leaf.phys + (virt - leaf.virt);
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
                _ => ranges.push((gpa, PAGE_SIZE)),
            }
        }
    }
    Ok(ranges)
}

/// `KVM_PRE_FAULT_MEMORY`: `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xc040_aed5;

/// Asks KVM to map `ranges` of guest-physical memory for `vcpu` ahead of its run. Only for
/// hosts whose KVM has the capability ([`crate::host::KvmHost::pre_fault`]).
pub fn pre_fault(vcpu: &VcpuFd, ranges: &[(u64, u64)]) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    for &(gpa, size) in ranges {
        let mut range = kvm_bindings::kvm_pre_fault_memory { gpa, size, ..Default::default() };
        while range.size > 0 {
            // SAFETY: a vCPU ioctl on our own fd with a pointer to a live, correctly sized
            // kvm_pre_fault_memory; KVM only advances its gpa and size fields.
            let ret = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_PRE_FAULT_MEMORY, &mut range) };
            if ret < 0 {
                let error = std::io::Error::last_os_error();
                if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                    continue;
                }
                return Err(VmmError::Config(format!(
                    "KVM_PRE_FAULT_MEMORY at guest-physical {:#x} (+{:#x}): {error}",
                    range.gpa, range.size
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn working_set_pages_translate_to_merged_physical_ranges() {
        let mem_size = 8 << 20;
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let offset = 0x1000_0000_0000;
        let mut tables = PageTables::new();
        tables.map_linear(0, mem_size).unwrap();
        tables.map_linear(offset, mem_size).unwrap();
        tables.write(&mem).unwrap();
        let runs = [
            Run { start: 0x20_0000, pages: 2, written: false },
            Run { start: 0x20_2000, pages: 1, written: true },
            Run { start: offset + 0x40_0000, pages: 3, written: false },
            Run { start: 0x7000_0000_0000, pages: 1, written: false }, // unmapped: left out
            Run { start: 0, pages: 1, written: false },                // the null page is unmapped
        ];
        let ranges = physical_ranges(&mem, tables.root(), &runs).unwrap();
        assert_eq!(ranges, vec![(0x20_0000, 0x3000), (0x40_0000, 0x3000)]);
        // Tables that point outside guest memory are an error, not a wild read.
        mem.write_obj(0x10_0000_0000u64 | 0x7, GuestAddress(tables.root())).unwrap();
        assert!(physical_ranges(&mem, tables.root(), &runs).is_err());
    }
}
