//! The transmit side of a 16550 UART at COM1, enough for a guest that prints on the serial
//! line before (or instead of) using the log hypercall.
//!
//! Transmitted bytes are handed back to the caller; the line status register always reports an
//! empty transmitter, so a polling guest never waits. Receive, interrupts and modem control are
//! not emulated: their registers read as zero and writes to them are ignored.

use abi::qemu::COM1_PORT;

/// Offset of the transmit holding register (or divisor latch low while DLAB is set).
const THR: u16 = 0;
/// Offset of the line control register; bit 7 is DLAB.
const LCR: u16 = 3;
/// Offset of the line status register.
const LSR: u16 = 5;
/// LSR: transmit holding register empty and transmitter idle.
const LSR_IDLE: u8 = 0x60;
const DLAB: u8 = 0x80;

/// COM1's register file, as far as it is emulated.
#[derive(Debug, Default)]
pub struct Serial {
    lcr: u8,
}

impl Serial {
    /// True for COM1's eight ports.
    pub fn owns(port: u16) -> bool {
        (COM1_PORT..COM1_PORT + 8).contains(&port)
    }

    /// Handles a guest write; returns the byte transmitted, if any.
    pub fn write(&mut self, port: u16, value: u8) -> Option<u8> {
        match port - COM1_PORT {
            THR if self.lcr & DLAB == 0 => Some(value),
            LCR => {
                self.lcr = value;
                None
            }
            _ => None,
        }
    }

    /// Handles a guest read.
    pub fn read(&self, port: u16) -> u8 {
        match port - COM1_PORT {
            LCR => self.lcr,
            LSR => LSR_IDLE,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_only_with_dlab_clear() {
        let mut s = Serial::default();
        assert_eq!(s.write(COM1_PORT, b'a'), Some(b'a'));
        s.write(COM1_PORT + LCR, DLAB);
        assert_eq!(s.write(COM1_PORT, 1), None, "divisor latch write is not output");
        s.write(COM1_PORT + LCR, 0x03);
        assert_eq!(s.write(COM1_PORT, b'b'), Some(b'b'));
        assert_eq!(s.read(COM1_PORT + LSR), LSR_IDLE);
    }
}
