//! Guest memory as every part of the VMM sees it, and the record of which pages changed.
//!
//! [`GuestRam`] is vm-memory's mmap backend with an [`AtomicBitmap`]: every write the host makes
//! through vm-memory's checked API (the parameters page, the mailbox, virtio rings and buffers,
//! block reads, vsock data) marks its page. KVM's dirty log sees only what the guest writes; the
//! two together are every page that differs from the image, which is what a kept VM copies back
//! when it is reset ([`DirtyPages`], [`copy_back`]).
//!
//! A VM that served one request is gone, but its memory can serve the next fresh VM: every page
//! of its copy-on-write mapping that is no longer the file's (the kernel's page map says which,
//! [`DirtyPages::private`]) is copied back from the image ([`reset_to_image`]). The pages it
//! keeps private were populated ahead ([`populate`]), which is what makes the next VM fast.
//! Nothing here hands out references into guest memory.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

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
    /// The kernel's page map of the mapping could not be read.
    #[error("reading /proc/self/pagemap for guest memory: {0}")]
    PageMap(String),
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

    /// The pages of `mem`, a private (copy-on-write) mapping of a file, that are no longer the
    /// file's: every page the guest or the host wrote, or [`populate`] copied, since the
    /// mapping was made. Reads the kernel's page map (`/proc/self/pagemap`): a page that is
    /// present and not file-backed, or swapped out, is private. Only Linux's page map knows
    /// this; it needs no privilege, since only the flags are read.
    pub fn private(mem: &GuestRam) -> Result<Self, MemoryError> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let map = std::fs::File::open("/proc/self/pagemap").map_err(|e| MemoryError::PageMap(e.to_string()))?;
        for region in mem.iter() {
            let first = region.start_addr().raw_value() / PAGE_SIZE;
            let slice = region
                .get_slice(vm_memory::MemoryRegionAddress(0), region.len() as usize)
                .map_err(|e| MemoryError::PageMap(e.to_string()))?;
            let host_page = slice.ptr_guard().as_ptr() as u64 / PAGE_SIZE;
            let pages = region.len() / PAGE_SIZE;
            // The page map has 8 bytes per page; read it 8192 pages at a time.
            let mut entries = vec![0u8; 8192 * 8];
            for chunk in (0..pages).step_by(8192) {
                let entries = &mut entries[..(pages - chunk).min(8192) as usize * 8];
                map.read_exact_at(entries, (host_page + chunk) * 8).map_err(|e| MemoryError::PageMap(e.to_string()))?;
                for (index, entry) in entries.as_chunks::<8>().0.iter().enumerate() {
                    let entry = u64::from_le_bytes(*entry);
                    if entry & SWAPPED == 0 && (entry & PRESENT == 0 || entry & FILE_OR_SHARED != 0) {
                        continue;
                    }
                    let page = first + chunk + index as u64;
                    match runs.last_mut() {
                        Some((start, count)) if *start + *count == page => *count += 1,
                        _ => runs.push((page, 1)),
                    }
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

/// Puts `mem`, a private mapping of the image whose memory `original` maps, back to the
/// image's bytes: every page that is no longer the file's ([`DirtyPages::private`]) is copied
/// back, and the host's marks are cleared. The pages stay private and mapped. Returns them.
pub fn reset_to_image(mem: &GuestRam, original: &MmapRegion) -> Result<DirtyPages, MemoryError> {
    let private = DirtyPages::private(mem)?;
    copy_back(mem, original, &private)?;
    Ok(private)
}

/// Makes the host map `ranges` (guest-physical start, length) of `mem` writable now, each page
/// copied out of the image (`MADV_POPULATE_WRITE`). Under shadow paging KVM then maps, on each
/// guest fault, up to 8 neighbouring pages the host already maps writable, so a request that
/// touches these ranges takes a fraction of the faults. Best effort: a range outside `mem`, or
/// a kernel without the advice (before 5.14), leaves the pages to fault as before. Returns the
/// bytes populated.
pub fn populate(mem: &GuestRam, ranges: &[(u64, u64)]) -> u64 {
    let mut done = 0;
    for &(gpa, len) in ranges {
        let Ok(len) = usize::try_from(len) else { continue };
        let Ok(slice) = mem.get_slice(GuestAddress(gpa), len) else { continue };
        let ptr = slice.ptr_guard_mut().as_ptr();
        if !(ptr as usize).is_multiple_of(PAGE_SIZE as usize) {
            continue;
        }
        // SAFETY: the advice only faults in pages of a live mapping that `mem` owns (the range
        // was bounds-checked by `get_slice` and is page aligned); it changes no byte the guest or
        // the host can observe, as a private page is copied from the same file contents.
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) } == 0 {
            done += len as u64;
        }
    }
    done
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

    /// `pages` pages of a real file (page N filled with byte N), mapped copy-on-write as guest
    /// memory the way an image is, and read-only as the image's original.
    fn file_backed(pages: u64) -> (tempfile::NamedTempFile, GuestRam, MmapRegion) {
        use std::io::Write;
        use vm_memory::mmap::MmapRegionBuilder;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for page in 0..pages {
            file.write_all(&[page as u8; PAGE_SIZE as usize]).unwrap();
        }
        let len = (pages * PAGE_SIZE) as usize;
        let offset = || vm_memory::FileOffset::new(file.reopen().unwrap(), 0);
        let bitmap = AtomicBitmap::new(len, std::num::NonZeroUsize::new(PAGE_SIZE as usize).unwrap());
        let private = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE)
            .with_file_offset(offset())
            .build()
            .unwrap();
        let mem = GuestRam::from_regions(vec![vm_memory::GuestRegionMmap::new(private, GuestAddress(0)).unwrap()]);
        let original = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_PRIVATE)
            .with_file_offset(offset())
            .build()
            .unwrap();
        (file, mem.unwrap(), original)
    }

    #[test]
    fn pages_no_longer_the_files_are_found_and_reset_from_the_image() {
        let (_file, mem, original) = file_backed(16);
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(9 * PAGE_SIZE)).unwrap(); // read: still the file's
        assert_eq!(byte, [9]);
        mem.write_slice(&[0xee; 8], GuestAddress(3 * PAGE_SIZE + 100)).unwrap();
        mem.write_slice(&[0xee; 8], GuestAddress(4 * PAGE_SIZE)).unwrap();
        assert_eq!(populate(&mem, &[(12 * PAGE_SIZE, 2 * PAGE_SIZE), (99 * PAGE_SIZE, PAGE_SIZE)]), 2 * PAGE_SIZE);
        assert_eq!(DirtyPages::private(&mem).unwrap().runs, vec![(3, 2), (12, 2)]);

        let reset = reset_to_image(&mem, &original).unwrap();
        assert_eq!(reset.runs, vec![(3, 2), (12, 2)]);
        for page in 0..16u64 {
            let mut got = vec![0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut got, GuestAddress(page * PAGE_SIZE)).unwrap();
            assert!(got.iter().all(|&b| b == page as u8), "page {page} was not reset");
        }
        // The pages stay private (mapped for the next VM), and the copy left no host marks.
        assert_eq!(DirtyPages::private(&mem).unwrap().runs, vec![(3, 2), (12, 2)]);
        assert_eq!(DirtyPages::collect(&mem, &[0]).unwrap(), DirtyPages::default());
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
