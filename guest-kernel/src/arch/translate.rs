//! Virtual-to-physical translation by walking 4-level x86-64 page tables, over any way of
//! reading a table entry: the guest reads its live tables through the physical-memory mapping
//! (`phys::virt_to_phys`), and the host's tests read tables that thaw's VMM built
//! (`host-vmm/tests/guest_translate.rs`, which compiles this file for the host).

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The physical address `virt` maps to under the tables rooted at `root` (a CR3 value), with
/// `entry(physical address)` reading one 8-byte table entry; `None` where nothing is mapped.
/// Handles 4 KiB, 2 MiB and 1 GiB pages.
pub fn translate(root: u64, virt: u64, entry: impl Fn(u64) -> u64) -> Option<u64> {
    let mut table = root & ADDR_MASK;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = entry(table + ((virt >> shift) & 0x1ff) * 8);
        if e & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && e & HUGE != 0) {
            let page = 1u64 << shift;
            return Some((e & ADDR_MASK & !(page - 1)) | (virt & (page - 1)));
        }
        table = e & ADDR_MASK;
    }
    None
}
