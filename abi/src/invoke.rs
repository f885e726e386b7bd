//! The invoke mailbox: how the guest takes requests and hands back responses.
//!
//! ```text
//!   guest                                           VMM
//!   NextRequest{buffer_gpa, capacity} → page
//!   out INVOKE_NEXT, 16                ──────────▶  copies the request into the buffer,
//!                                      ◀──────────  writes NextReply{status, len} → page
//!   ... runs the function ...
//!   Response{status, code, stdout, stderr, message} → page
//!   out INVOKE_RESPOND, 56             ──────────▶  copies the three byte ranges out
//! ```
//!
//! Buffers are guest-physical ranges the VMM reads and writes through checked accessors only.
//! Both sides enforce the size caps below: the VMM refuses a request the guest's buffer cannot
//! hold (status [`NEXT_TOO_LARGE`]) and a response range above its cap (the VM fails).

use crate::codec::{u32_at, u64_at};

/// Largest request, on both sides.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Largest stdout or stderr a response may carry.
pub const MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// Largest trap message.
pub const MAX_MESSAGE_BYTES: u64 = 64 << 10;

/// [`NextReply::status`]: a request was copied in.
pub const NEXT_REQUEST: u32 = 0;
/// [`NextReply::status`]: no more requests; the guest should exit 0.
pub const NEXT_NONE: u32 = 1;
/// [`NextReply::status`]: the request is larger than the buffer; `len` says how large.
pub const NEXT_TOO_LARGE: u32 = 2;

/// [`Response::status`]: `handle` returned normally.
pub const STATUS_OK: u32 = 0;
/// [`Response::status`]: the function trapped; the message says why.
pub const STATUS_TRAPPED: u32 = 1;
/// [`Response::status`]: the function called `proc_exit`; `exit_code` holds its code.
pub const STATUS_EXITED: u32 = 2;

/// Guest → VMM: where to put the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRequest {
    /// Guest-physical address of the buffer.
    pub buffer_gpa: u64,
    /// Its size in bytes.
    pub capacity: u64,
}

impl NextRequest {
    /// Encoded size.
    pub const LEN: usize = 16;

    /// The encoding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..8].copy_from_slice(&self.buffer_gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.capacity.to_le_bytes());
        b
    }

    /// Decodes exactly [`Self::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::LEN).then_some(())?;
        Some(Self { buffer_gpa: u64_at(b, 0), capacity: u64_at(b, 8) })
    }
}

/// VMM → guest: what happened to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextReply {
    /// [`NEXT_REQUEST`], [`NEXT_NONE`] or [`NEXT_TOO_LARGE`].
    pub status: u32,
    /// The request's length.
    pub len: u64,
}

impl NextReply {
    /// Encoded size.
    pub const LEN: usize = 16;

    /// The encoding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes exactly [`Self::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::LEN).then_some(())?;
        Some(Self { status: u32_at(b, 0), len: u64_at(b, 8) })
    }
}

/// A guest-physical byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    /// Start.
    pub gpa: u64,
    /// Length.
    pub len: u64,
}

/// Guest → VMM: the result of one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// [`STATUS_OK`], [`STATUS_TRAPPED`] or [`STATUS_EXITED`].
    pub status: u32,
    /// The `proc_exit` code when exited.
    pub exit_code: u32,
    /// What the function wrote to fd 1.
    pub stdout: Range,
    /// What the function wrote to fd 2.
    pub stderr: Range,
    /// The trap message, UTF-8.
    pub message: Range,
}

impl Response {
    /// Encoded size.
    pub const LEN: usize = 56;

    /// The encoding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.exit_code.to_le_bytes());
        for (i, r) in [self.stdout, self.stderr, self.message].iter().enumerate() {
            b[8 + i * 16..16 + i * 16].copy_from_slice(&r.gpa.to_le_bytes());
            b[16 + i * 16..24 + i * 16].copy_from_slice(&r.len.to_le_bytes());
        }
        b
    }

    /// Decodes exactly [`Self::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::LEN).then_some(())?;
        let range = |i: usize| Range { gpa: u64_at(b, 8 + i * 16), len: u64_at(b, 16 + i * 16) };
        Some(Self {
            status: u32_at(b, 0),
            exit_code: u32_at(b, 4),
            stdout: range(0),
            stderr: range(1),
            message: range(2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_structs_round_trip() {
        let next = NextRequest { buffer_gpa: 0x40_0000, capacity: 4096 };
        assert_eq!(NextRequest::decode(&next.encode()), Some(next));
        let reply = NextReply { status: NEXT_TOO_LARGE, len: 1 << 30 };
        assert_eq!(NextReply::decode(&reply.encode()), Some(reply));
        let resp = Response {
            status: STATUS_EXITED,
            exit_code: 3,
            stdout: Range { gpa: 1, len: 2 },
            stderr: Range { gpa: 3, len: 4 },
            message: Range { gpa: 5, len: 6 },
        };
        assert_eq!(Response::decode(&resp.encode()), Some(resp));
        assert_eq!(Response::decode(&resp.encode()[..55]), None);
        assert_eq!(NextRequest::decode(&[0; 17]), None);
        assert_eq!(NextReply::decode(&[0; 15]), None);
    }

    #[test]
    fn mailbox_layouts_are_golden() {
        let next = NextRequest { buffer_gpa: 0x0102_0304_0506_0708, capacity: 0x10 };
        assert_eq!(next.encode(), [8, 7, 6, 5, 4, 3, 2, 1, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        let reply = NextReply { status: NEXT_TOO_LARGE, len: 0x0a0b };
        assert_eq!(reply.encode(), [2, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0x0a, 0, 0, 0, 0, 0, 0]);
        let resp = Response {
            status: STATUS_TRAPPED,
            exit_code: 7,
            stdout: Range { gpa: 0x11, len: 0x12 },
            stderr: Range { gpa: 0x21, len: 0x22 },
            message: Range { gpa: 0x31, len: 0x32 },
        };
        let mut golden = [0u8; Response::LEN];
        for (at, byte) in [(0, 1), (4, 7), (8, 0x11), (16, 0x12), (24, 0x21), (32, 0x22), (40, 0x31), (48, 0x32)] {
            golden[at] = byte;
        }
        assert_eq!(resp.encode(), golden);
    }
}
