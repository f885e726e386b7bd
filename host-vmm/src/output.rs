//! Guest output on its way to the host, with a ceiling: a guest that never stops writing (its
//! log, COM1, its virtio console) must not grow the host's buffers or fill its disk.
//!
//! Each stream of a VM's output passes through its own [`OutputCap`]: the log hypercall and COM1
//! share the exit handler's, per run; the console has its own, per device (devices are made anew
//! by every restore and reset). Past [`MAX_GUEST_OUTPUT`] bytes the rest is dropped, and one line
//! says so where the output goes.

use std::io::{self, Write};

/// Most bytes of one stream a VM writes per run (a request, or a whole cold run).
pub const MAX_GUEST_OUTPUT: usize = 1 << 20;

/// How much of one stream has gone through, and whether the rest is being dropped.
#[derive(Debug, Default)]
pub struct OutputCap {
    passed: usize,
    dropping: bool,
}

impl OutputCap {
    /// Writes what of `bytes` fits under the ceiling to `sink`; the first time something does
    /// not fit, ends with a line naming `stream` and the ceiling.
    pub fn write(&mut self, sink: &mut dyn Write, bytes: &[u8], stream: &str) -> io::Result<()> {
        let room = MAX_GUEST_OUTPUT - self.passed;
        let kept = &bytes[..bytes.len().min(room)];
        self.passed += kept.len();
        sink.write_all(kept)?;
        if kept.len() < bytes.len() && !self.dropping {
            self.dropping = true;
            let newline = if kept.ends_with(b"\n") { "" } else { "\n" };
            writeln!(
                sink,
                "{newline}[thaw: the guest's {stream} passed {MAX_GUEST_OUTPUT} bytes; the rest is dropped]"
            )?;
        }
        sink.flush()
    }

    /// Whether output is being dropped.
    pub fn dropping(&self) -> bool {
        self.dropping
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stops_at_the_ceiling_and_says_so_once() {
        let mut cap = OutputCap::default();
        let mut sink = Vec::new();
        cap.write(&mut sink, &vec![b'a'; MAX_GUEST_OUTPUT - 2], "log").unwrap();
        assert!(!cap.dropping());
        cap.write(&mut sink, b"bcd", "log").unwrap();
        cap.write(&mut sink, b"more", "log").unwrap();
        assert!(cap.dropping());
        let notice = format!("\n[thaw: the guest's log passed {MAX_GUEST_OUTPUT} bytes; the rest is dropped]\n");
        assert_eq!(sink.len(), MAX_GUEST_OUTPUT + notice.len());
        assert!(sink.ends_with(format!("bc{notice}").as_bytes()));
    }
}
