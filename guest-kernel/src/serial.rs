//! Polling driver for the COM1 16550 UART, used where there are no hypercalls: it transmits the
//! log and, when serving a function under QEMU, receives the request frames.

use abi::qemu::COM1_PORT;

/// Line status register bit: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;

fn outb(port: u16, value: u8) {
    // SAFETY: the TSS bitmap opens COM1's eight ports to ring 3; writing UART registers has no
    // effect on memory.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Programs 115200 baud, 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1_PORT + 1, 0x00); // no interrupts
    outb(COM1_PORT + 3, 0x80); // DLAB on
    outb(COM1_PORT, 0x01); // divisor 1: 115200 baud
    outb(COM1_PORT + 1, 0x00);
    outb(COM1_PORT + 3, 0x03); // DLAB off, 8N1
    outb(COM1_PORT + 2, 0xc7); // FIFOs on and cleared
    outb(COM1_PORT + 4, 0x03); // DTR, RTS
}

/// LSR bit: a received byte is waiting.
const LSR_DATA_READY: u8 = 1 << 0;

/// Reads one byte, waiting for it as long as it takes.
pub fn read_byte() -> u8 {
    while inb(COM1_PORT + 5) & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    inb(COM1_PORT)
}

/// Fills `buf` from the serial line.
pub fn read_exact(buf: &mut [u8]) {
    buf.iter_mut().for_each(|b| *b = read_byte());
}

/// Writes `bytes`, waiting for the transmitter before each one.
pub fn write(bytes: &[u8]) {
    for &b in bytes {
        // A UART that never drains would hang us; give up on the byte after a bounded wait.
        for _ in 0..100_000 {
            if inb(COM1_PORT + 5) & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        outb(COM1_PORT, b);
    }
}
