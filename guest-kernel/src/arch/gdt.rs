//! The GDT with kernel and user segments, and the TSS with its I/O permission bitmap.
//!
//! Ring-3 port I/O is checked against the TSS I/O permission bitmap even with IOPL=3 under PVM,
//! so the bitmap opens exactly the ports the guest uses from ring 3: the hypercall range, COM1,
//! QEMU's `isa-debug-exit`, and the PCI configuration ports (QEMU only). Every other port
//! faults. The TSS also gives the ring-0 stack
//! exceptions from ring 3 arrive on (RSP0) and a separate stack for double faults (IST1).
//!
//! Everything is built at compile time except the three addresses only known at run time.

use core::arch::asm;
use core::mem::size_of;

use abi::hypercall::{PORT_BASE, PORT_COUNT};
use abi::qemu::{COM1_PORT, ISA_DEBUG_EXIT_PORT};

use super::DescriptorTablePointer;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector.
const TSS_SEL: u16 = 0x28;

/// Ports ring 3 may use, as inclusive ranges. A 4-byte access checks the bits of all four ports
/// it spans, so 4-byte ranges extend three ports past their last port (the VMM rejects those
/// extra ports as unknown).
const ALLOWED_PORTS: [(u16, u16); 4] = [
    (PORT_BASE, PORT_BASE + PORT_COUNT - 1 + 3),
    (COM1_PORT, COM1_PORT + 7),
    (ISA_DEBUG_EXIT_PORT, ISA_DEBUG_EXIT_PORT + 3),
    // PCI configuration (address at 0xcf8, data at 0xcfc), used under QEMU only.
    (0xcf8, 0xcff),
];
/// Bitmap bytes needed to cover the highest allowed port; ports past the bitmap are denied.
const IOMAP_BYTES: usize = max_allowed_port() as usize / 8 + 1;

const fn max_allowed_port() -> u16 {
    let mut max = 0;
    let mut i = 0;
    while i < ALLOWED_PORTS.len() {
        if ALLOWED_PORTS[i].1 > max {
            max = ALLOWED_PORTS[i].1;
        }
        i += 1;
    }
    max
}

/// The 64-bit TSS (Intel SDM vol. 3, 8.7). Packed: `rsp0` sits at offset 4.
#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// The TSS immediately followed by its I/O bitmap and the required all-ones terminator byte.
#[repr(C, packed)]
struct TssWithIoMap {
    tss: Tss,
    iomap: [u8; IOMAP_BYTES + 1],
}

const fn build_iomap() -> [u8; IOMAP_BYTES + 1] {
    let mut map = [0xff; IOMAP_BYTES + 1];
    let mut r = 0;
    while r < ALLOWED_PORTS.len() {
        let mut port = ALLOWED_PORTS[r].0;
        while port <= ALLOWED_PORTS[r].1 {
            map[port as usize / 8] &= !(1 << (port % 8));
            port += 1;
        }
        r += 1;
    }
    map
}

static mut TSS: TssWithIoMap = TssWithIoMap {
    tss: Tss {
        _reserved0: 0,
        rsp0: 0,
        rsp1: 0,
        rsp2: 0,
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: size_of::<Tss>() as u16,
    },
    iomap: build_iomap(),
};

/// Flat 64-bit descriptors: kernel code, kernel data, user data, user code; then the two-slot
/// TSS descriptor, filled in at run time.
static mut GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff, // kernel code: present, DPL 0, long mode
    0x00cf_9200_0000_ffff, // kernel data: present, DPL 0, writable
    0x00cf_f200_0000_ffff, // user data: present, DPL 3, writable
    0x00af_fa00_0000_ffff, // user code: present, DPL 3, long mode
    0,
    0,
];

/// A stack used only in ring 0.
#[repr(C, align(16))]
struct Stack([u8; 16 * 1024]);

/// Where exceptions from ring 3 land (TSS.RSP0).
static mut RING0_STACK: Stack = Stack([0; 16 * 1024]);
/// Where double faults land (IST1), even if RSP0's stack is the problem.
static mut DOUBLE_FAULT_STACK: Stack = Stack([0; 16 * 1024]);

/// IST slot (1-based) the double-fault gate uses.
pub const DOUBLE_FAULT_IST: u8 = 1;

/// Loads the GDT, reloads every segment register and loads the TSS.
///
/// # Safety
/// Ring 0 only, once, before anything relies on the old GDT.
pub unsafe fn load() {
    let tss = &raw mut TSS;
    let ring0_top = (&raw const RING0_STACK) as u64 + size_of::<Stack>() as u64;
    let df_top = (&raw const DOUBLE_FAULT_STACK) as u64 + size_of::<Stack>() as u64;
    let base = tss as u64;
    let limit = size_of::<TssWithIoMap>() as u64 - 1;
    // SAFETY: nothing else runs; the writes go through raw pointers to our own statics, unaligned
    // where the packed TSS requires it.
    unsafe {
        (&raw mut (*tss).tss.rsp0).write_unaligned(ring0_top);
        let mut ist = [0u64; 7];
        ist[DOUBLE_FAULT_IST as usize - 1] = df_top;
        (&raw mut (*tss).tss.ist).write_unaligned(ist);
        let gdt = &raw mut GDT;
        (*gdt)[5] = (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89 << 40 // present, 64-bit available TSS
            | (limit >> 16 & 0xf) << 48
            | (base >> 24 & 0xff) << 56;
        (*gdt)[6] = base >> 32;
        let pointer = DescriptorTablePointer { limit: (size_of::<[u64; 7]>() - 1) as u16, base: gdt as u64 };
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov {tmp:x}, 0",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "ltr {tss:x}",
            ptr = in(reg) &raw const pointer,
            cs = const KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = out(reg) _,
        );
    }
}
