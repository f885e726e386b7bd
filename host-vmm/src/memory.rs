//! Guest memory as every part of the VMM sees it, and the record of which pages changed.
//!
//! [`GuestRam`] is vm-memory's mmap backend with an [`AtomicBitmap`]: every write the host makes
//! through vm-memory's checked API (the parameters page, the mailbox, virtio rings and buffers,
//! block reads, vsock data) marks its page. KVM's dirty log sees only what the guest writes; the
//! two together are every page that differs from the image, which is what a kept VM copies back
//! when it is reset ([`DirtyPages`], [`copy_back`]). Nothing here hands out references into guest
//! memory.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

use crate::layout::PAGE_SIZE;

/// Guest memory: one vm-memory mapping whose bitmap records the host's own writes.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Why the dirty pages could not be found or copied back.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// KVM's dirty bitmap has the wrong length for the memory.
    #[error("KVM's dirty log covers {words} words, {expected} expected for {pages} pages")]
    LogLength {
        /// Words KVM returned.
        words: usize,
        /// Words the memory needs.
        expected: usize,
        /// Pages of guest memory.
        pages: u64,
    },
    /// Copying a page run failed.
    #[error("copying {len:#x} bytes back at {gpa:#x}: {detail}")]
    Copy {
        /// Where the run starts.
        gpa: u64,
        /// Its length.
        len: u64,
        /// What failed.
        detail: String,
    },
}

/// Pages that differ from the image: the union of what the guest wrote (KVM's dirty log) and
/// what the host wrote (the memory's bitmap), as runs of consecutive pages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// (first page, page count), in ascending order.
    pub runs: Vec<(u64, u64)>,
}

impl DirtyPages {
    /// Merges KVM's dirty log for `mem` (one bit per page, as `KVM_GET_DIRTY_LOG` returns it)
    /// with the pages the host marked, and clears the host's marks.
    pub fn collect(mem: &GuestRam, kvm_log: &[u64]) -> Result<Self, MemoryError> {
        let pages = mem.iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE;
        let expected = pages.div_ceil(64) as usize;
        if kvm_log.len() != expected {
            return Err(MemoryError::LogLength { words: kvm_log.len(), expected, pages });
        }
        let host = host_bitmap(mem).map(|b| b.get_and_reset()).unwrap_or_default();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (word_index, &guest_word) in kvm_log.iter().enumerate() {
            let mut word = guest_word | host.get(word_index).copied().unwrap_or(0);
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                let page = word_index as u64 * 64 + bit;
                if page >= pages {
                    break;
                }
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        Ok(Self { runs })
    }

    /// How many pages.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|(_, n)| n).sum()
    }
}

fn host_bitmap(mem: &GuestRam) -> Option<&AtomicBitmap> {
    mem.find_region(GuestAddress(0)).map(|region| MmapRegion::bitmap(region))
}

/// Forgets the host's marks, so the next [`DirtyPages::collect`] sees only later writes.
pub fn clear_host_marks(mem: &GuestRam) {
    if let Some(bitmap) = host_bitmap(mem) {
        bitmap.reset();
    }
}

/// Copies `pages` from `original` (the image's memory, mapped read-only, guest-physical address
/// 0 at offset 0) back into `mem`, then clears the host's marks the copy itself made.
pub fn copy_back(mem: &GuestRam, original: &MmapRegion, pages: &DirtyPages) -> Result<(), MemoryError> {
    for &(first, count) in &pages.runs {
        let (gpa, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
        let fail = |detail: String| MemoryError::Copy { gpa, len, detail };
        let from = original.get_slice(gpa as usize, len as usize).map_err(|e| fail(e.to_string()))?;
        let to = mem.get_slice(GuestAddress(gpa), len as usize).map_err(|e| fail(e.to_string()))?;
        from.copy_to_volatile_slice(to);
    }
    clear_host_marks(mem);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn ram(pages: u64) -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)]).unwrap()
    }

    #[test]
    fn host_writes_and_kvm_log_merge_into_runs() {
        let mem = ram(130);
        mem.write_obj(1u32, GuestAddress(5 * PAGE_SIZE + 8)).unwrap();
        mem.write_slice(&[1; 0x1800], GuestAddress(64 * PAGE_SIZE - 0x800)).unwrap(); // pages 63, 64
        let mut log = vec![0u64; 3];
        log[0] = 1 << 4 | 1 << 6; // the guest wrote 4 and 6
        log[2] = 1 << 1; // and 129
        let dirty = DirtyPages::collect(&mem, &log).unwrap();
        assert_eq!(dirty.runs, vec![(4, 3), (63, 2), (129, 1)]);
        assert_eq!(dirty.pages(), 6);
        // The host's marks were taken: a second collect sees only the new log.
        assert_eq!(DirtyPages::collect(&mem, &[0, 0, 0]).unwrap(), DirtyPages::default());
    }

    #[test]
    fn a_log_of_the_wrong_length_is_refused() {
        let e = DirtyPages::collect(&ram(130), &[0, 0]).unwrap_err();
        assert_eq!(e.to_string(), "KVM's dirty log covers 2 words, 3 expected for 130 pages");
    }

    #[test]
    fn copy_back_restores_the_original_bytes_and_clears_its_own_marks() {
        let mem = ram(8);
        let original = MmapRegion::<()>::new(8 * PAGE_SIZE as usize).unwrap();
        original.get_slice(3 * PAGE_SIZE as usize, 16).unwrap().copy_from(&[7u8; 16]);
        mem.write_slice(&[9; 16], GuestAddress(3 * PAGE_SIZE)).unwrap();
        mem.write_slice(&[9; 16], GuestAddress(6 * PAGE_SIZE)).unwrap();
        let dirty = DirtyPages::collect(&mem, &[0]).unwrap();
        copy_back(&mem, &original, &dirty).unwrap();
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(3 * PAGE_SIZE)).unwrap();
        assert_eq!(got, [7; 16]);
        mem.read_slice(&mut got, GuestAddress(6 * PAGE_SIZE)).unwrap();
        assert_eq!(got, [0; 16]);
        assert_eq!(DirtyPages::collect(&mem, &[0]).unwrap(), DirtyPages::default());
    }
}
