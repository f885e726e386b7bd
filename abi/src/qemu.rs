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

/// Serving a function under QEMU, the invoke mailbox is carried by the serial line. When the
/// guest is ready to read (its UART programmed, so nothing sent is lost to a FIFO reset) it
/// prints [`AWAIT_FRAMES_MARKER`] on a line of its own. The host then writes: a [`PARAMS_TAG`] frame (the 64-byte
/// [`HostParams`](crate::params::HostParams) encoding), one [`REQUEST_TAG`] frame per request
/// (a little-endian u64 length, then the bytes), and an [`END_TAG`]. The guest answers each
/// request with one [`RESPONSE_MARKER`] line: `status exit_code stdout stderr message`, the
/// last three in lowercase hex, `-` when empty.
pub const PARAMS_TAG: [u8; 8] = *b"THAWPRM1";
/// Serial line the guest prints when it is ready to receive frames.
pub const AWAIT_FRAMES_MARKER: &str = "thaw-guest: await-frames";
/// Frame tag of a request.
pub const REQUEST_TAG: [u8; 8] = *b"THAWREQ1";
/// Frame tag ending the requests.
pub const END_TAG: [u8; 8] = *b"THAWEND1";
/// Serial line prefix of a response.
pub const RESPONSE_MARKER: &str = "thaw-guest: response: ";
/// Serial line prefix of a function whose init failed, with the fields of a response line
/// (the hypercall [`INIT_FAILED`](crate::hypercall::number::INIT_FAILED) under thaw).
pub const INIT_FAILED_MARKER: &str = "thaw-guest: init-failed: ";
/// Serial line prefix of what a successful init wrote to stderr, with the fields of a response
/// line (the hypercall [`INIT_OUTPUT`](crate::hypercall::number::INIT_OUTPUT) under thaw).
pub const INIT_OUTPUT_MARKER: &str = "thaw-guest: init-output: ";

/// Writes `bytes` as lowercase hex, or `-` when empty.
pub fn write_hex(w: &mut impl core::fmt::Write, bytes: &[u8]) -> core::fmt::Result {
    if bytes.is_empty() {
        return w.write_str("-");
    }
    bytes.iter().try_for_each(|b| write!(w, "{b:02x}"))
}

/// Reads what [`write_hex`] wrote.
pub fn parse_hex(text: &str) -> Option<alloc::vec::Vec<u8>> {
    if text == "-" {
        return Some(alloc::vec::Vec::new());
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

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
    fn hex_round_trips() {
        let mut text = alloc::string::String::new();
        write_hex(&mut text, &[0, 0xab, 0x10]).unwrap();
        assert_eq!(text, "00ab10");
        assert_eq!(parse_hex(&text), Some(alloc::vec![0, 0xab, 0x10]));
        assert_eq!(parse_hex("-"), Some(alloc::vec![]));
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn qemu_status_decodes_to_guest_code() {
        assert_eq!(guest_code_from_qemu_status(1), Some(0));
        assert_eq!(guest_code_from_qemu_status((101 << 1) | 1), Some(101));
        assert_eq!(guest_code_from_qemu_status(0), None);
        assert_eq!(guest_code_from_qemu_status(2), None);
    }
}
