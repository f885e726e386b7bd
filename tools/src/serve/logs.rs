//! The last lines each function wrote, per invocation: its stderr and its guest's console and
//! log output, in a bounded ring that `GET /v1/functions/{name}/logs` reads.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use abi::params::InstanceId;
use serde::Serialize;

/// Lines a function keeps.
pub const MAX_LINES: usize = 1000;
/// Longest line kept, in bytes; a longer one is cut.
const MAX_LINE_BYTES: usize = 2048;
/// Most console and log output kept from one invocation, in bytes.
pub const MAX_CAPTURE_BYTES: usize = 64 << 10;

/// One line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line {
    /// The instance id of the VM that wrote it (32 hex digits).
    pub instance: String,
    /// `stderr` (the function's), or `console` (the guest's console and log output).
    pub stream: &'static str,
    /// The line, without its newline; invalid UTF-8 is replaced.
    pub text: String,
}

/// A function's last [`MAX_LINES`] lines.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: Mutex<VecDeque<Line>>,
}

impl LogRing {
    /// Adds what one invocation on `instance` wrote to `stream`.
    pub fn add(&self, instance: InstanceId, stream: &'static str, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let instance = instance.to_string();
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        for line in bytes.strip_suffix(b"\n").unwrap_or(bytes).split(|&b| b == b'\n') {
            let mut text = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE_BYTES)]).into_owned();
            if line.len() > MAX_LINE_BYTES {
                text.push_str(" [cut]");
            }
            if lines.len() == MAX_LINES {
                lines.pop_front();
            }
            lines.push_back(Line { instance: instance.clone(), stream, text });
        }
    }

    /// The last `count` lines, oldest first.
    pub fn last(&self, count: usize) -> Vec<Line> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().skip(lines.len().saturating_sub(count)).cloned().collect()
    }
}

/// What one invocation's guest wrote to its console and log, up to [`MAX_CAPTURE_BYTES`]; the
/// rest is counted and said to be dropped.
#[derive(Debug, Default)]
pub struct Capture {
    bytes: Vec<u8>,
    dropped: u64,
}

impl Capture {
    /// What was kept, with a last line saying how much was dropped, if any.
    pub fn finish(mut self) -> Vec<u8> {
        if self.dropped > 0 {
            if !self.bytes.ends_with(b"\n") && !self.bytes.is_empty() {
                self.bytes.push(b'\n');
            }
            self.bytes.extend_from_slice(format!("[{} more bytes of output dropped]\n", self.dropped).as_bytes());
        }
        self.bytes
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = MAX_CAPTURE_BYTES.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..buf.len().min(room)]);
        self.dropped += buf.len().saturating_sub(room) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_lines_cut_to_size() {
        let ring = LogRing::default();
        ring.add(InstanceId(1), "stderr", b"one\ntwo\n");
        ring.add(InstanceId(2), "console", &[b'x'; MAX_LINE_BYTES + 5]);
        let last = ring.last(2);
        assert_eq!(last[0], Line { instance: InstanceId(1).to_string(), stream: "stderr", text: "two".into() });
        assert_eq!(last[1].text.len(), MAX_LINE_BYTES + " [cut]".len());
        for i in 0..MAX_LINES {
            ring.add(InstanceId(3), "stderr", format!("{i}\n").as_bytes());
        }
        let all = ring.last(usize::MAX);
        assert_eq!(all.len(), MAX_LINES);
        assert_eq!(all[0].text, "0");
    }

    #[test]
    fn a_capture_keeps_its_cap_and_says_what_it_dropped() {
        let mut capture = Capture::default();
        capture.write_all(&vec![b'a'; MAX_CAPTURE_BYTES + 10]).unwrap();
        let kept = capture.finish();
        assert!(kept.ends_with(b"\n[10 more bytes of output dropped]\n"));
    }
}
