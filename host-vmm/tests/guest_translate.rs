//! The guest's page-table walk (`guest-kernel/src/arch/translate.rs`, compiled here for the host)
//! against page tables built by thaw's VMM and written into a fake guest memory: the guest must
//! translate every address the VMM mapped to where the VMM mapped it, and nothing else.

#[path = "../../guest-kernel/src/arch/translate.rs"]
mod translate;

use host_vmm::memory::GuestRam;
use host_vmm::paging::PageTables;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 << 20;
const OFFSET: u64 = 0x0000_1000_0000_0000;

fn tables() -> (PageTables, GuestRam) {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut tables = PageTables::new();
    tables.map_linear(0, MEM).unwrap();
    tables.map_linear(OFFSET, MEM).unwrap();
    tables.map_device_window().unwrap();
    tables.write(&mem).unwrap();
    (tables, mem)
}

fn guest_translate(tables: &PageTables, mem: &GuestRam, virt: u64) -> Option<u64> {
    translate::translate(tables.root(), virt, |entry| mem.read_obj::<u64>(GuestAddress(entry)).unwrap())
}

#[test]
fn the_guest_walk_agrees_with_the_vmm_for_every_mapping() {
    let (tables, mem) = tables();
    let window = abi::devices::DEVICE_WINDOW_GPA;
    let mapped =
        [0x1000, 0x10_0000, 0x1f_ffff, 0x20_0000, 0x20_1234, MEM - 1, OFFSET, OFFSET + 0x5678, OFFSET + MEM - 1];
    for virt in mapped.into_iter().chain([window, window + 0x1_2345]) {
        let expected = tables.translate(virt).unwrap();
        assert_eq!(guest_translate(&tables, &mem, virt), Some(expected), "{virt:#x}");
    }
    assert_eq!(guest_translate(&tables, &mem, 0x20_1234), Some(0x20_1234), "identity map (2 MiB pages)");
    assert_eq!(guest_translate(&tables, &mem, 0x1234), Some(0x1234), "identity map (4 KiB pages)");
    assert_eq!(guest_translate(&tables, &mem, OFFSET + 0x30_0001), Some(0x30_0001), "physical-memory map");
}

#[test]
fn unmapped_addresses_translate_to_nothing() {
    let (tables, mem) = tables();
    let guard = host_vmm::layout::STACK_AREA_START - 0x1000;
    for virt in [0, 0x0fff, guard, guard + 0xfff, MEM, OFFSET + MEM, 0xffff_8000_0000_0000, u64::MAX] {
        assert_eq!(guest_translate(&tables, &mem, virt), None, "{virt:#x}");
        assert_eq!(tables.translate(virt), None, "{virt:#x}");
    }
}

#[test]
fn one_gib_pages_are_walked_too() {
    // A hand-made table: PML4 -> PDPT whose entry 1 is a 1 GiB page at 3 GiB.
    let mem: GuestRam = GuestRam::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
    mem.write_obj(0x1000u64 | 0x7, GuestAddress(0)).unwrap();
    mem.write_obj((3u64 << 30) | 0x87, GuestAddress(0x1000 + 8)).unwrap();
    let read = |entry| mem.read_obj::<u64>(GuestAddress(entry)).unwrap();
    assert_eq!(translate::translate(0, (1 << 30) + 0x12345, read), Some((3 << 30) + 0x12345));
    assert_eq!(translate::translate(0, 2 << 30, read), None);
}
