//! Conventions for running the same kernel under QEMU, where there are no hypercalls.
//!
//! Under QEMU the guest logs on COM1, exits through the `isa-debug-exit` device, and reports a
//! panic or fault as one serial line starting with a marker below. `thaw qemu` turns those lines
//! back into the same outcome `thaw run` reports.

/// I/O port of the first serial port (COM1). thaw's VMM emulates its transmit side too.
pub const COM1_PORT: u16 = 0x3f8;
/// I/O port of QEMU's `isa-debug-exit` device, as `thaw qemu` configures it (4 bytes wide).
pub const ISA_DEBUG_EXIT_PORT: u16 = 0xf4;
/// Serial line prefix of a panic message.
pub const PANIC_MARKER: &str = "thaw-guest: panic: ";
/// Serial line prefix of a fault report in its text encoding.
pub const FAULT_MARKER: &str = "thaw-guest: fault: ";

/// The guest exit code behind a QEMU process exit status.
///
/// `isa-debug-exit` makes QEMU exit with `(value << 1) | 1`, so an odd status carries a guest
/// code of up to 127. An even status means QEMU ended for another reason.
pub fn guest_code_from_qemu_status(status: i32) -> Option<u32> {
    (status & 1 == 1 && status > 0).then_some((status >> 1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_status_decodes_to_guest_code() {
        assert_eq!(guest_code_from_qemu_status(1), Some(0));
        assert_eq!(guest_code_from_qemu_status((101 << 1) | 1), Some(101));
        assert_eq!(guest_code_from_qemu_status(0), None);
        assert_eq!(guest_code_from_qemu_status(2), None);
    }
}
