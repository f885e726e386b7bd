//! Making the loader's page tables usable from ring 3.
//!
//! x86-64 grants user access only when every level of the walk has the U/S bit. thaw's VMM builds
//! its tables that way; the BIOS bootloader does not. So early boot first probes one walk (the
//! kernel's own code), which costs a handful of instructions, and only when it is supervisor-only
//! sets U/S on every present entry of every table. That full walk touches thousands of entries
//! and is cheap only where ring 0 runs natively, as it does under QEMU.

use core::arch::asm;

const PRESENT: u64 = 1 << 0;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;

fn table(phys_offset: u64, table_phys: u64) -> *mut u64 {
    (phys_offset + (table_phys & ADDR_MASK)) as *mut u64
}

/// True when the walk for `virt` grants user access at every level.
///
/// # Safety
/// Physical memory must be mapped at `phys_offset` and CR3 must hold a valid 4-level table.
unsafe fn walk_is_user(phys_offset: u64, pml4: u64, virt: u64) -> bool {
    let mut table_phys = pml4;
    for level in (1..=4).rev() {
        let index = (virt >> (12 + 9 * (level - 1))) & 0x1ff;
        // SAFETY: the index is below 512 and the table is mapped per the contract.
        let entry = unsafe { table(phys_offset, table_phys).add(index as usize).read_volatile() };
        if entry & (PRESENT | USER) != PRESENT | USER {
            return false;
        }
        if level == 1 || entry & HUGE != 0 {
            return true;
        }
        table_phys = entry;
    }
    true
}

/// Sets U/S and clears NX on every present entry of the table at `table_phys` and below. NX
/// goes because the heap (reached through the physical-memory mapping, which the BIOS loader
/// maps no-execute) holds the code Wasmtime loads; under thaw's VMM, EFER.NXE is off and
/// nothing is no-execute either.
///
/// # Safety
/// As for [`walk_is_user`]; ring 0 only.
unsafe fn set_user(phys_offset: u64, table_phys: u64, level: u32) {
    let entries = table(phys_offset, table_phys);
    for i in 0..512 {
        // SAFETY: `i` is below 512 and the table is mapped per the contract.
        unsafe {
            let slot = entries.add(i);
            let entry = slot.read_volatile();
            if entry & PRESENT == 0 {
                continue;
            }
            if entry & USER == 0 || entry & NO_EXECUTE != 0 {
                slot.write_volatile((entry | USER) & !NO_EXECUTE);
            }
            if level > 1 && entry & HUGE == 0 {
                set_user(phys_offset, entry, level - 1);
            }
        }
    }
}

/// Makes every mapping user-accessible and executable unless `probe` (an address in the
/// kernel's code) already is user-accessible, and turns off SMEP and SMAP so ring-0 handlers may
/// touch those pages.
///
/// # Safety
/// Ring 0 only; physical memory must be mapped at `phys_offset`.
pub unsafe fn make_user_accessible(phys_offset: u64, probe: u64) {
    let (cr3, cr4): (u64, u64);
    // SAFETY: reading control registers in ring 0 has no side effects.
    unsafe {
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    // SAFETY: per the contract; the table is the live one from CR3.
    if unsafe { walk_is_user(phys_offset, cr3, probe) } {
        return;
    }
    // SAFETY: as above; writing CR3 back flushes the TLB, and clearing SMEP/SMAP only widens
    // what ring 0 may access.
    unsafe {
        set_user(phys_offset, cr3, 4);
        if cr4 & (CR4_SMEP | CR4_SMAP) != 0 {
            asm!("mov cr4, {}", in(reg) cr4 & !(CR4_SMEP | CR4_SMAP), options(nostack, preserves_flags));
        }
        asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags));
    }
}
