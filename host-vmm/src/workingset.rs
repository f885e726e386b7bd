//! What restores do with a recorded working set ([`crate::recording`] records it): find the
//! guest-physical pages behind its guest-virtual runs, so that a fresh VM's memory can have them
//! copied in before its guest runs ([`crate::memory::populate`]), and, where KVM can map guest
//! memory ahead (`KVM_PRE_FAULT_MEMORY`, two-dimensional paging only), map them for a VM restored
//! ahead ([`pre_fault`]).

use abi::workingset::Run;
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, GuestMemoryBackend};

use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;
use crate::paging::{self, PagingError};

/// Why a working set could not be translated or mapped ahead.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The guest's page tables could not be walked.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// `KVM_PRE_FAULT_MEMORY` failed.
    #[error("KVM_PRE_FAULT_MEMORY at guest-physical {gpa:#x} (+{size:#x}): {source}")]
    PreFault {
        /// Where.
        gpa: u64,
        /// How much was left to map.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// Most bytes a guest's tables may map: twice its RAM (the identity and physical-memory maps)
/// with room to spare. More means aliased tables.
pub(crate) fn max_mapped(mem_size: u64) -> u64 {
    mem_size.saturating_mul(4).saturating_add(1 << 30)
}

/// Guest-physical ranges: (start, length), in bytes.
pub type Ranges = Vec<(u64, u64)>;

/// The guest-physical ranges (start, length) behind `runs` under the page tables rooted at
/// `cr3` in `mem`, merged where they touch. Pages the tables do not map are left out.
pub fn physical_ranges(mem: &GuestRam, cr3: u64, runs: &[Run]) -> Result<Vec<(u64, u64)>, WorkingSetError> {
    Ok(physical_ranges_and_tables(mem, cr3, runs)?.0)
}

/// [`physical_ranges`], and the guest-physical address of every page table the translation
/// read.
pub fn physical_ranges_and_tables(
    mem: &GuestRam,
    cr3: u64,
    runs: &[Run],
) -> Result<(Ranges, Vec<u64>), WorkingSetError> {
    let mem_size = mem.last_addr().raw_value().saturating_add(1);
    let (leaves, tables) = paging::leaves_and_tables(mem, cr3, max_mapped(mem_size))?;
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
    Ok((ranges, tables))
}

/// `KVM_PRE_FAULT_MEMORY`: `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xc040_aed5;

/// Asks KVM to map `ranges` of guest-physical memory for `vcpu` ahead of its run. Only for
/// hosts whose KVM has the capability ([`crate::host::KvmHost::pre_fault`]).
pub fn pre_fault(vcpu: &VcpuFd, ranges: &[(u64, u64)]) -> Result<(), WorkingSetError> {
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
                return Err(WorkingSetError::PreFault { gpa: range.gpa, size: range.size, source: error });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::PageTables;
    use vm_memory::{Bytes, GuestAddress};

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
