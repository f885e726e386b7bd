//! 4-level page tables built on the host and written into guest memory, and a walker that reads
//! a guest's own tables.
//!
//! A cold boot gets two linear mappings of all guest memory, both user-accessible (see
//! [`crate::layout`]): the identity map, with 2 MiB pages except in the first 2 MiB, where 4 KiB
//! pages leave the null page and the stack guard page unmapped; and the physical-memory map at
//! the offset the kernel asked for, all 2 MiB pages.
//!
//! Recording a working set ([`crate::workingset`]) walks a restored guest's tables
//! ([`leaves`]) and rebuilds the same mappings with 4 KiB pages elsewhere
//! ([`PageTables::at`]), so that the accessed and dirty bits say which 4 KiB pages a request
//! touched.

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_END, PAGE_TABLES_START, STACK_AREA_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
/// Set by the processor (or a shadow-paging hypervisor) when a walk uses the entry.
pub const ACCESSED: u64 = 1 << 5;
/// Set in a leaf entry when the page is written through it.
pub const DIRTY: u64 = 1 << 6;
const WRITE_THROUGH: u64 = 1 << 3;
const NO_EXECUTE: u64 = 1 << 63;
const CACHE_DISABLE: u64 = 1 << 4;
const FLAGS: u64 = PRESENT | WRITABLE | USER;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// PML4 slot PVM reserves: guest accesses there fault even when mapped.
const PVM_RESERVED_SLOT: u64 = 256;

/// Why the page tables cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The requested physical-memory offset is unusable.
    #[error("physical-memory offset {offset:#x}: {reason}")]
    BadOffset {
        /// The offset the kernel asked for.
        offset: u64,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The page-table area is full.
    #[error("page tables need more than the {0} KiB reserved for them")]
    OutOfSpace(u64),
    /// Writing the tables to guest memory failed.
    #[error("writing page tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    /// A guest's own page table could not be read.
    #[error("guest page table at {gpa:#x}: {reason}")]
    Walk {
        /// Where the table (or entry) was.
        gpa: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Page tables under construction. Table `i` will live at `base + i * 4 KiB`, below `limit`;
/// table 0 is the PML4.
pub struct PageTables {
    tables: Vec<[u64; 512]>,
    base: u64,
    limit: u64,
}

impl Default for PageTables {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTables {
    /// Empty tables in the cold-boot page-table area: a PML4 with nothing mapped.
    pub fn new() -> Self {
        Self::at(PAGE_TABLES_START, PAGE_TABLES_END)
    }

    /// Empty tables to live in `[base, limit)` of guest-physical memory.
    pub fn at(base: u64, limit: u64) -> Self {
        Self { tables: vec![[0; 512]], base, limit }
    }

    /// Guest-physical address of the PML4 (the value for CR3).
    pub fn root(&self) -> u64 {
        self.base
    }

    /// Bytes the tables take in guest memory.
    pub fn size_bytes(&self) -> u64 {
        self.tables.len() as u64 * PAGE_SIZE
    }

    fn gpa(&self, index: usize) -> u64 {
        self.base + index as u64 * PAGE_SIZE
    }

    fn index(&self, entry: u64) -> usize {
        ((entry & ADDR_MASK) - self.base) as usize / PAGE_SIZE as usize
    }

    /// The table an entry points to, created if absent.
    fn child(&mut self, table: usize, slot: usize) -> Result<usize, PagingError> {
        let entry = self.tables[table][slot];
        if entry & PRESENT != 0 {
            return Ok(self.index(entry));
        }
        if self.gpa(self.tables.len() + 1) > self.limit {
            return Err(PagingError::OutOfSpace((self.limit - self.base) / 1024));
        }
        self.tables.push([0; 512]);
        let index = self.tables.len() - 1;
        self.tables[table][slot] = self.gpa(index) | FLAGS;
        Ok(index)
    }

    /// Sets the entry for `virt` at `level` (3: a 1 GiB leaf, 2: 2 MiB, 1: 4 KiB) to `entry`,
    /// creating the tables above it.
    fn set(&mut self, virt: u64, level: u32, entry: u64) -> Result<(), PagingError> {
        let mut table = 0;
        for upper in (level + 1..=4).rev() {
            table = self.child(table, Self::slot(virt, upper))?;
        }
        self.tables[table][Self::slot(virt, level)] = entry;
        Ok(())
    }

    /// Maps `leaf` again: split into 4 KiB pages, accessed and dirty bits clear, when all of it
    /// lies in guest RAM below `ram_end`; copied as it is otherwise (a device window).
    pub fn map_split(&mut self, leaf: &Leaf, ram_end: u64) -> Result<(), PagingError> {
        let in_ram = leaf.phys.checked_add(leaf.size).is_some_and(|end| end <= ram_end);
        if !in_ram {
            let level = match leaf.size {
                PAGE_SIZE => 1,
                LARGE_PAGE_SIZE => 2,
                _ => 3,
            };
            return self.set(leaf.virt, level, leaf.entry);
        }
        let keep = PRESENT | WRITABLE | USER | WRITE_THROUGH | CACHE_DISABLE | NO_EXECUTE;
        for offset in (0..leaf.size).step_by(PAGE_SIZE as usize) {
            self.set(leaf.virt + offset, 1, (leaf.phys + offset) | (leaf.entry & keep))?;
        }
        Ok(())
    }

    fn slot(virt: u64, level: u32) -> usize {
        ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
    }

    /// Maps the 2 MiB page at `virt` to `phys`.
    fn map_large(&mut self, virt: u64, phys: u64) -> Result<(), PagingError> {
        self.set(virt, 2, phys | FLAGS | HUGE)
    }

    /// Maps `[0, mem_size)` at `virt_base`. In the identity map (`virt_base == 0`) the first
    /// 2 MiB use 4 KiB pages so the null page and the stack guard page stay unmapped.
    pub fn map_linear(&mut self, virt_base: u64, mem_size: u64) -> Result<(), PagingError> {
        let mut phys = 0;
        while phys < mem_size {
            let virt = virt_base + phys;
            if virt == 0 {
                let pdpt = self.child(0, 0)?;
                let pd = self.child(pdpt, 0)?;
                let pt = self.child(pd, 0)?;
                for (i, entry) in self.tables[pt].iter_mut().enumerate() {
                    let page = i as u64 * PAGE_SIZE;
                    let unmapped = page == 0 || page == STACK_AREA_START - PAGE_SIZE;
                    *entry = if unmapped { 0 } else { page | FLAGS };
                }
            } else {
                self.map_large(virt, phys)?;
            }
            phys += LARGE_PAGE_SIZE;
        }
        Ok(())
    }

    /// Identity-maps the device window (`abi::devices`), uncached, so the guest reaches every
    /// register window the VMM may place there, now or after a restore.
    pub fn map_device_window(&mut self) -> Result<(), PagingError> {
        use abi::devices::{DEVICE_WINDOW_GPA, DEVICE_WINDOW_LEN};
        const _: () =
            assert!(DEVICE_WINDOW_LEN == LARGE_PAGE_SIZE && DEVICE_WINDOW_GPA.is_multiple_of(LARGE_PAGE_SIZE));
        self.map_large(DEVICE_WINDOW_GPA, DEVICE_WINDOW_GPA | CACHE_DISABLE)
    }

    /// Checks that the kernel's physical-memory offset can hold a map of `mem_size` bytes.
    pub fn check_offset(offset: u64, mem_size: u64) -> Result<(), PagingError> {
        let bad = |reason| Err(PagingError::BadOffset { offset, reason });
        if !offset.is_multiple_of(LARGE_PAGE_SIZE) {
            return bad("not 2 MiB aligned");
        }
        let Some(end) = offset.checked_add(mem_size) else { return bad("the map would overflow") };
        if end > 0x0000_8000_0000_0000 {
            return bad("the map would leave the canonical lower half");
        }
        if offset < mem_size {
            return bad("the map would overlap the identity map of guest memory");
        }
        let reserved = PVM_RESERVED_SLOT << 39;
        if offset < reserved + (1 << 39) && end > reserved {
            return bad("the map would touch PML4 slot 256, which PVM reserves");
        }
        Ok(())
    }

    /// Writes every table into guest memory.
    pub fn write(&self, mem: &GuestRam) -> Result<(), PagingError> {
        for (i, table) in self.tables.iter().enumerate() {
            let mut bytes = [0u8; 4096];
            for (chunk, entry) in bytes.as_chunks_mut::<8>().0.iter_mut().zip(table) {
                *chunk = entry.to_le_bytes();
            }
            mem.write_slice(&bytes, GuestAddress(self.gpa(i)))?;
        }
        Ok(())
    }

    /// Translates `virt` by walking the tables (for tests and diagnostics).
    pub fn translate(&self, virt: u64) -> Option<u64> {
        let mut table = 0;
        for level in (1..=4).rev() {
            let entry = self.tables[table][Self::slot(virt, level)];
            if entry & PRESENT == 0 || entry & USER == 0 {
                return None;
            }
            if level == 2 && entry & HUGE != 0 {
                return Some((entry & ADDR_MASK & !(LARGE_PAGE_SIZE - 1)) + (virt & (LARGE_PAGE_SIZE - 1)));
            }
            if level == 1 {
                return Some((entry & ADDR_MASK) + (virt & (PAGE_SIZE - 1)));
            }
            table = self.index(entry);
        }
        None
    }
}

/// One present, user-accessible leaf of a guest's page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The virtual address it maps.
    pub virt: u64,
    /// The physical address it maps to.
    pub phys: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// The entry itself (flags included).
    pub entry: u64,
}

/// Every present, user-accessible leaf of the tables rooted at `root` in `mem`, in address
/// order. The tables are the guest's: an entry pointing outside `mem` is an error naming it, and
/// the walk stops with an error once the leaves map more than `max_bytes`, so tables that alias
/// themselves cannot make it run for long.
pub fn leaves(mem: &GuestRam, root: u64, max_bytes: u64) -> Result<Vec<Leaf>, PagingError> {
    Ok(leaves_and_tables(mem, root, max_bytes)?.0)
}

/// [`leaves`], and the guest-physical address of every table the walk read.
pub fn leaves_and_tables(mem: &GuestRam, root: u64, max_bytes: u64) -> Result<(Vec<Leaf>, Vec<u64>), PagingError> {
    let mut out = Vec::new();
    let mut tables = Vec::new();
    let mut mapped = 0u64;
    walk(mem, root & ADDR_MASK, 4, 0, max_bytes, &mut mapped, &mut (&mut out, &mut tables))?;
    Ok((out, tables))
}

fn walk(
    mem: &GuestRam,
    table: u64,
    level: u32,
    base: u64,
    max_bytes: u64,
    mapped: &mut u64,
    out: &mut (&mut Vec<Leaf>, &mut Vec<u64>),
) -> Result<(), PagingError> {
    out.1.push(table);
    let mut bytes = [0u8; 4096];
    mem.read_slice(&mut bytes, GuestAddress(table))
        .map_err(|e| PagingError::Walk { gpa: table, reason: format!("level {level} table unreadable: {e}") })?;
    let span = 1u64 << (12 + 9 * (level - 1));
    for (slot, chunk) in bytes.as_chunks::<8>().0.iter().enumerate() {
        let entry = u64::from_le_bytes(*chunk);
        if entry & PRESENT == 0 || entry & USER == 0 {
            continue;
        }
        let mut virt = base + slot as u64 * span;
        if level == 4 && slot >= 256 {
            virt |= 0xffff_0000_0000_0000; // sign-extend the upper half
        }
        if level == 1 || (level <= 3 && entry & HUGE != 0) {
            *mapped = mapped.saturating_add(span);
            if *mapped > max_bytes {
                return Err(PagingError::Walk {
                    gpa: table,
                    reason: format!("the tables map more than {max_bytes} bytes (aliased tables?)"),
                });
            }
            let phys = entry & ADDR_MASK & !(span - 1);
            out.0.push(Leaf { virt, phys, size: span, entry });
        } else if level > 1 {
            walk(mem, entry & ADDR_MASK, level - 1, virt, max_bytes, mapped, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFSET: u64 = 0x0000_1000_0000_0000;

    #[test]
    fn both_maps_translate_and_guard_pages_stay_unmapped() {
        let mem = 3 << 30; // spans several PDs
        let mut pt = PageTables::new();
        pt.map_linear(0, mem).unwrap();
        pt.map_linear(OFFSET, mem).unwrap();
        assert_eq!(pt.translate(0), None, "null page must be unmapped");
        assert_eq!(pt.translate(STACK_AREA_START - 1), None, "stack guard page must be unmapped");
        for addr in [0x1000, 0x20_1234, 0x4000_0000, mem - 1] {
            assert_eq!(pt.translate(addr), Some(addr));
            assert_eq!(pt.translate(OFFSET + addr), Some(addr));
        }
        assert_eq!(pt.translate(OFFSET), Some(0), "the physical map includes page 0");
        pt.map_device_window().unwrap();
        let window = abi::devices::DEVICE_WINDOW_GPA;
        assert_eq!(pt.translate(window + 0x1234), Some(window + 0x1234));
        assert_eq!(pt.translate(window + abi::devices::DEVICE_WINDOW_LEN), None);
    }

    #[test]
    fn a_guest_mapping_is_walked_and_split_into_small_pages() {
        let mem_size = 8 << 20;
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let mut pt = PageTables::new();
        pt.map_linear(0, mem_size).unwrap();
        pt.map_linear(OFFSET, mem_size).unwrap();
        pt.map_device_window().unwrap();
        pt.write(&mem).unwrap();
        let found = leaves(&mem, pt.root(), 1 << 30).unwrap();
        let window = abi::devices::DEVICE_WINDOW_GPA;
        assert_eq!(found.iter().filter(|l| l.size == LARGE_PAGE_SIZE).count(), 3 + 4 + 1, "identity, physmap, window");
        assert_eq!(found.iter().filter(|l| l.size == PAGE_SIZE).count(), 510, "the first 2 MiB less two pages");
        assert!(found.windows(2).all(|w| w[0].virt < w[1].virt), "in address order");

        let base = window + abi::devices::DEVICE_WINDOW_LEN;
        let mut split = PageTables::at(base, base + (64 << 20));
        for leaf in &found {
            split.map_split(leaf, mem_size).unwrap();
        }
        let scratch = GuestRam::from_ranges(&[(GuestAddress(base), split.size_bytes() as usize)]).unwrap();
        split.write(&scratch).unwrap();
        let small = leaves(&scratch, split.root(), 1 << 30).unwrap();
        assert_eq!(small.iter().filter(|l| l.size == PAGE_SIZE).count(), 510 + 3 * 512 + 4 * 512);
        assert_eq!(small.iter().filter(|l| l.size == LARGE_PAGE_SIZE).count(), 1, "the device window stays whole");
        for addr in [0x1000, 0x20_1234, mem_size - 1, OFFSET, OFFSET + 0x40_0010] {
            assert_eq!(split.translate(addr), pt.translate(addr), "{addr:#x}");
        }
        assert!(small.iter().all(|l| l.entry & (ACCESSED | DIRTY) == 0), "bits start clear");
    }

    #[test]
    fn tables_that_alias_themselves_stop_the_walk_with_an_error() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let self_entry = (PAGE_TABLES_START | FLAGS).to_le_bytes();
        for slot in 0..512u64 {
            mem.write_slice(&self_entry, GuestAddress(PAGE_TABLES_START + slot * 8)).unwrap();
        }
        let e = leaves(&mem, PAGE_TABLES_START, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("map more than 1073741824 bytes"), "{e}");
        let e = leaves(&mem, 0x10_0000, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("guest page table at 0x100000: level 4 table unreadable"), "{e}");
    }

    #[test]
    fn rejects_offsets_that_collide() {
        let mem = 64 << 20;
        assert!(PageTables::check_offset(OFFSET, mem).is_ok());
        for bad in [OFFSET + 0x1000, 0, 256 << 39, u64::MAX - 0x1f_ffff, 0x0000_7fff_ffe0_0000] {
            assert!(PageTables::check_offset(bad, mem).is_err(), "{bad:#x} accepted");
        }
    }

    #[test]
    fn the_table_area_bounds_memory_size() {
        let mut pt = PageTables::new();
        assert!(pt.map_linear(0, 32 << 30).is_ok());
        assert!(pt.map_linear(OFFSET, 32 << 30).is_ok());
        assert!(matches!(pt.map_linear(OFFSET << 1, 64 << 30), Err(PagingError::OutOfSpace(_))));
    }
}
