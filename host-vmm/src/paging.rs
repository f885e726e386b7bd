//! The guest's initial 4-level page tables, built on the host and written into guest memory.
//!
//! Two linear mappings of all guest memory, both user-accessible (see [`crate::layout`]):
//! the identity map, with 2 MiB pages except in the first 2 MiB, where 4 KiB pages leave the null
//! page and the stack guard page unmapped; and the physical-memory map at the offset the kernel
//! asked for, all 2 MiB pages.

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_END, PAGE_TABLES_START, STACK_AREA_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
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
}

/// Page tables under construction. Table `i` will live at `PAGE_TABLES_START + i * 4 KiB`;
/// table 0 is the PML4.
pub struct PageTables {
    tables: Vec<[u64; 512]>,
}

impl Default for PageTables {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTables {
    /// Empty tables: a PML4 with nothing mapped.
    pub fn new() -> Self {
        Self { tables: vec![[0; 512]] }
    }

    /// Guest-physical address of the PML4 (the value for CR3).
    pub fn root(&self) -> u64 {
        PAGE_TABLES_START
    }

    fn gpa(index: usize) -> u64 {
        PAGE_TABLES_START + index as u64 * PAGE_SIZE
    }

    /// The table an entry points to, created if absent.
    fn child(&mut self, table: usize, slot: usize) -> Result<usize, PagingError> {
        let entry = self.tables[table][slot];
        if entry & PRESENT != 0 {
            return Ok(((entry & ADDR_MASK) - PAGE_TABLES_START) as usize / PAGE_SIZE as usize);
        }
        if Self::gpa(self.tables.len() + 1) > PAGE_TABLES_END {
            return Err(PagingError::OutOfSpace((PAGE_TABLES_END - PAGE_TABLES_START) / 1024));
        }
        self.tables.push([0; 512]);
        let index = self.tables.len() - 1;
        self.tables[table][slot] = Self::gpa(index) | FLAGS;
        Ok(index)
    }

    fn slot(virt: u64, level: u32) -> usize {
        ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
    }

    /// Maps the 2 MiB page at `virt` to `phys`.
    fn map_large(&mut self, virt: u64, phys: u64) -> Result<(), PagingError> {
        let pdpt = self.child(0, Self::slot(virt, 4))?;
        let pd = self.child(pdpt, Self::slot(virt, 3))?;
        self.tables[pd][Self::slot(virt, 2)] = phys | FLAGS | HUGE;
        Ok(())
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
            mem.write_slice(&bytes, GuestAddress(Self::gpa(i)))?;
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
            table = ((entry & ADDR_MASK) - PAGE_TABLES_START) as usize / PAGE_SIZE as usize;
        }
        None
    }
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
