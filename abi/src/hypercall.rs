//! Hypercalls: how the guest asks the VMM for something.
//!
//! A hypercall is a 32-bit `out` to one port of a reserved range. The port selects the call and
//! the 32-bit value written is its only register argument. Calls that carry more data (log
//! bytes, a panic message, a fault report) place it first in the *hypercall page*, a fixed page
//! of guest-physical memory, and pass its length as the argument. Nothing else is read from the
//! guest's registers, so the VMM needs no extra ioctl to serve a call.
//!
//! Decoding ([`Hypercall::decode`]) is separate from handling, which lives in the VMM. Decoding
//! never panics: an unknown number or an out-of-range length becomes a [`DecodeError`].
//!
//! ```text
//!   guest (ring 3)                         VMM
//!   copy bytes → hypercall page            (guest-physical HYPERCALL_PAGE_GPA)
//!   out  PORT_BASE + LOG_WRITE, len  ───▶  KVM_EXIT_IO: decode(port, len), read len bytes
//! ```

/// First port of the hypercall range.
pub const PORT_BASE: u16 = 0x0700;
/// Number of ports in the range; numbers up to `PORT_COUNT - 1` are reserved for thaw.
pub const PORT_COUNT: u16 = 32;

/// Guest-physical address of the hypercall page.
pub const HYPERCALL_PAGE_GPA: u64 = 0x1000;
/// Size of the hypercall page, which bounds every hypercall payload.
pub const HYPERCALL_PAGE_SIZE: usize = 4096;

/// Hypercall numbers: the port is `PORT_BASE + number`.
pub mod number {
    /// Write `len` bytes of UTF-8 log output from the hypercall page.
    pub const LOG_WRITE: u16 = 0;
    /// End the VM; the argument is the exit code.
    pub const EXIT: u16 = 1;
    /// The guest panicked; the hypercall page holds `len` bytes of the one-line message.
    pub const PANIC: u16 = 2;
    /// The guest took a fatal exception; the hypercall page holds a
    /// [`FaultReport`](crate::fault::FaultReport) of `len` bytes.
    pub const FAULT_REPORT: u16 = 3;
    /// The guest reached a boot milestone (see [`Milestone`](super::Milestone)).
    pub const MILESTONE: u16 = 4;
    /// Checkpoint, with fork-like semantics: the VMM may snapshot the VM here. When the `out`
    /// returns, the hypercall page holds a [`CheckpointResult`](super::CheckpointResult) saying
    /// which side of the fork this is, and in a restored VM what to do first. The call's
    /// payload is an [`IoTableLocation`](crate::iotable::IoTableLocation) of `len` bytes (or
    /// `len` is 0).
    pub const CHECKPOINT: u16 = 8;
    /// Invoke mailbox: fetch the next request (see [`crate::invoke`]); the hypercall page holds
    /// a `NextRequest` of `len` bytes, and the VMM answers with a `NextReply` in its place.
    pub const INVOKE_NEXT: u16 = 9;
    /// Invoke mailbox: hand back a response; the hypercall page holds a `Response`.
    pub const INVOKE_RESPOND: u16 = 10;
    /// Fetch the recorded working set (`crate::workingset`) from run number `arg` on; the VMM
    /// answers with [`reply`](crate::workingset::reply)'s layout in the hypercall page.
    pub const WORKING_SET: u16 = 11;
    /// The function failed in its init (a trap, `proc_exit`, its fuel used up), before any
    /// request: the hypercall page holds a `Response` (status trapped or exited) saying how,
    /// with what the function wrote. The VM ends there.
    pub const INIT_FAILED: u16 = 12;
    /// The function's init succeeded and wrote to stderr: the hypercall page holds a `Response`
    /// (status ok) whose stderr range is that output, for the host to show. Sent once, before
    /// the checkpoint, so VMs restored from the image never send it.
    pub const INIT_OUTPUT: u16 = 13;
}

/// Checkpoint result: this is the VM that called checkpoint.
pub const CHECKPOINT_ORIGINAL: u32 = 0;
/// Checkpoint result: this VM was restored from an image; the host parameters page is fresh.
pub const CHECKPOINT_RESTORED: u32 = 1;

/// Where a first request handed in with the checkpoint's result starts in the hypercall page.
pub const CHECKPOINT_REQUEST_OFFSET: usize = CheckpointResult::LEN;
/// The longest request the checkpoint's result carries; a longer one is fetched with
/// INVOKE_NEXT.
pub const CHECKPOINT_REQUEST_MAX: usize = HYPERCALL_PAGE_SIZE - CHECKPOINT_REQUEST_OFFSET;
/// The checkpoint result's request length when it carries no request.
pub const CHECKPOINT_NO_REQUEST: u32 = u32::MAX;

/// What the checkpoint call returns: the VMM writes it at the start of the hypercall page
/// before the `out` returns (the original VM) or before a restored VM first runs.
///
/// ```text
///   offset  size  field
///        0     4  side: CHECKPOINT_ORIGINAL (0) or CHECKPOINT_RESTORED (1)
///        4     4  working-set runs to touch before asking for a request (0 for none)
///        8     4  length of a first request handed in, or CHECKPOINT_NO_REQUEST   (interface 6 on)
///       12     4  zero
///       16   len  the first request's bytes
/// ```
///
/// A guest that finds a first request takes it instead of asking with INVOKE_NEXT, so a VM
/// restored or reset with its request in hand answers after one VM exit instead of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointResult {
    /// This is the VM that called checkpoint.
    Original,
    /// This VM was restored from an image (or reset to it).
    Restored {
        /// Working-set runs to touch before asking for a request (see [`number::WORKING_SET`]).
        warm_runs: u32,
        /// The length of the first request, whose bytes follow from
        /// [`CHECKPOINT_REQUEST_OFFSET`], when one was handed in (at most
        /// [`CHECKPOINT_REQUEST_MAX`]).
        first_request: Option<u32>,
    },
}

/// Why a checkpoint result is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointResultError {
    /// Shorter than [`CheckpointResult::LEN`].
    #[error("checkpoint result: {0} bytes, fewer than its {len}", len = CheckpointResult::LEN)]
    Truncated(usize),
    /// The side is neither original nor restored.
    #[error("checkpoint result {0} is neither original (0) nor restored (1)")]
    UnknownSide(u32),
    /// A first request longer than the result can carry.
    #[error("checkpoint result: a first request of {0} bytes, more than the {CHECKPOINT_REQUEST_MAX} it carries")]
    RequestTooLong(u32),
}

impl CheckpointResult {
    /// Encoded length, without a first request's bytes.
    pub const LEN: usize = 16;

    /// The fixed part of the result.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let (side, warm, request) = match *self {
            Self::Original => (CHECKPOINT_ORIGINAL, 0, CHECKPOINT_NO_REQUEST),
            Self::Restored { warm_runs, first_request } => {
                (CHECKPOINT_RESTORED, warm_runs, first_request.unwrap_or(CHECKPOINT_NO_REQUEST))
            }
        };
        let mut out = [0; Self::LEN];
        out[0..4].copy_from_slice(&side.to_le_bytes());
        out[4..8].copy_from_slice(&warm.to_le_bytes());
        out[8..12].copy_from_slice(&request.to_le_bytes());
        out
    }

    /// Decodes the start of the hypercall page.
    pub fn decode(page: &[u8]) -> Result<Self, CheckpointResultError> {
        let fixed = page.get(..Self::LEN).ok_or(CheckpointResultError::Truncated(page.len()))?;
        let word = |i: usize| crate::codec::u32_at(fixed, 4 * i);
        match word(0) {
            CHECKPOINT_ORIGINAL => Ok(Self::Original),
            CHECKPOINT_RESTORED => {
                let first_request = match word(2) {
                    CHECKPOINT_NO_REQUEST => None,
                    len if len as usize <= CHECKPOINT_REQUEST_MAX => Some(len),
                    len => return Err(CheckpointResultError::RequestTooLong(len)),
                };
                Ok(Self::Restored { warm_runs: word(1), first_request })
            }
            side => Err(CheckpointResultError::UnknownSide(side)),
        }
    }

    /// The first request's bytes in `page` (the whole hypercall page), when one was handed in.
    pub fn first_request<'a>(&self, page: &'a [u8]) -> Option<&'a [u8]> {
        match *self {
            Self::Restored { first_request: Some(len), .. } => {
                page.get(CHECKPOINT_REQUEST_OFFSET..CHECKPOINT_REQUEST_OFFSET + len as usize)
            }
            _ => None,
        }
    }
}

/// Boot milestones the guest reports so the VMM can time each boot phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Milestone {
    /// Early boot is done and the kernel now runs in ring 3.
    Ring3Entered = 1,
    /// The kernel is initialized and about to run its main function's work.
    Ready = 2,
    /// The function's code (compiled by the host ahead of time) is loaded into the engine.
    Compiled = 3,
    /// The module is instantiated.
    Instantiated = 4,
    /// The function's init exports have run; it is ready for requests.
    Initialized = 5,
}

impl Milestone {
    /// Decodes a milestone argument.
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Ring3Entered),
            2 => Some(Self::Ready),
            3 => Some(Self::Compiled),
            4 => Some(Self::Instantiated),
            5 => Some(Self::Initialized),
            _ => None,
        }
    }
}

/// A decoded hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hypercall {
    /// Log output of `len` bytes waits in the hypercall page.
    LogWrite {
        /// Payload length in bytes, at most [`HYPERCALL_PAGE_SIZE`].
        len: usize,
    },
    /// The guest is done.
    Exit {
        /// The guest's exit code.
        code: u32,
    },
    /// The guest panicked; its message of `len` bytes waits in the hypercall page.
    Panic {
        /// Payload length in bytes, at most [`HYPERCALL_PAGE_SIZE`].
        len: usize,
    },
    /// The guest took a fatal exception; its report of `len` bytes waits in the hypercall page.
    FaultReport {
        /// Payload length in bytes, at most [`HYPERCALL_PAGE_SIZE`].
        len: usize,
    },
    /// The guest reached a boot milestone.
    Milestone(Milestone),
    /// Fetch the next request; a `NextRequest` of `len` bytes waits in the hypercall page.
    InvokeNext {
        /// Payload length in bytes.
        len: usize,
    },
    /// Hand back a response; a `Response` of `len` bytes waits in the hypercall page.
    InvokeRespond {
        /// Payload length in bytes.
        len: usize,
    },
    /// Fetch working-set runs from number `first` on (see [`number::WORKING_SET`]).
    WorkingSet {
        /// Index of the first run wanted.
        first: u32,
    },
    /// Checkpoint here (see [`number::CHECKPOINT`]).
    Checkpoint {
        /// Payload length: 0, or the I/O table location's.
        len: usize,
    },
    /// The function's init failed; a `Response` of `len` bytes waits in the hypercall page.
    InitFailed {
        /// Payload length in bytes.
        len: usize,
    },
    /// What the function's init wrote to stderr; a `Response` of `len` bytes waits in the
    /// hypercall page.
    InitOutput {
        /// Payload length in bytes.
        len: usize,
    },
}

/// Why a port access in the hypercall range is not a valid hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The port is outside the hypercall range.
    #[error("port {0:#x} is not a hypercall port")]
    NotHypercallPort(u16),
    /// The number is reserved but has no meaning in this interface version.
    #[error("unknown hypercall number {0}")]
    UnknownNumber(u16),
    /// A payload length larger than the hypercall page.
    #[error("hypercall {number} passed payload length {len}, more than the {HYPERCALL_PAGE_SIZE}-byte hypercall page")]
    PayloadTooLong {
        /// The hypercall number.
        number: u16,
        /// The length the guest passed.
        len: u32,
    },
    /// A milestone value this interface does not define.
    #[error("unknown boot milestone {0}")]
    UnknownMilestone(u32),
    /// The access was not a 4-byte `out`.
    #[error("hypercall {number} was a {width}-byte access; hypercalls are 4-byte `out`")]
    BadAccess {
        /// The hypercall number.
        number: u16,
        /// The access width in bytes.
        width: usize,
    },
}

/// True when `port` is in the hypercall range.
pub fn is_hypercall_port(port: u16) -> bool {
    (PORT_BASE..PORT_BASE + PORT_COUNT).contains(&port)
}

impl Hypercall {
    /// Decodes an `out` of `data` to `port`.
    pub fn decode(port: u16, data: &[u8]) -> Result<Self, DecodeError> {
        if !is_hypercall_port(port) {
            return Err(DecodeError::NotHypercallPort(port));
        }
        let number = port - PORT_BASE;
        let arg = match *data {
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => return Err(DecodeError::BadAccess { number, width: data.len() }),
        };
        let payload = |len: u32| {
            if len as usize > HYPERCALL_PAGE_SIZE {
                Err(DecodeError::PayloadTooLong { number, len })
            } else {
                Ok(len as usize)
            }
        };
        match number {
            number::LOG_WRITE => Ok(Self::LogWrite { len: payload(arg)? }),
            number::EXIT => Ok(Self::Exit { code: arg }),
            number::PANIC => Ok(Self::Panic { len: payload(arg)? }),
            number::FAULT_REPORT => Ok(Self::FaultReport { len: payload(arg)? }),
            number::MILESTONE => {
                Milestone::from_u32(arg).map(Self::Milestone).ok_or(DecodeError::UnknownMilestone(arg))
            }
            number::CHECKPOINT => Ok(Self::Checkpoint { len: payload(arg)? }),
            number::INVOKE_NEXT => Ok(Self::InvokeNext { len: payload(arg)? }),
            number::INVOKE_RESPOND => Ok(Self::InvokeRespond { len: payload(arg)? }),
            number::WORKING_SET => Ok(Self::WorkingSet { first: arg }),
            number::INIT_FAILED => Ok(Self::InitFailed { len: payload(arg)? }),
            number::INIT_OUTPUT => Ok(Self::InitOutput { len: payload(arg)? }),
            other => Err(DecodeError::UnknownNumber(other)),
        }
    }

    /// The port and argument that encode this call (used by the guest, and by tests).
    pub fn encode(self) -> (u16, u32) {
        let (number, arg) = match self {
            Self::LogWrite { len } => (number::LOG_WRITE, len as u32),
            Self::Exit { code } => (number::EXIT, code),
            Self::Panic { len } => (number::PANIC, len as u32),
            Self::FaultReport { len } => (number::FAULT_REPORT, len as u32),
            Self::Milestone(m) => (number::MILESTONE, m as u32),
            Self::InvokeNext { len } => (number::INVOKE_NEXT, len as u32),
            Self::InvokeRespond { len } => (number::INVOKE_RESPOND, len as u32),
            Self::Checkpoint { len } => (number::CHECKPOINT, len as u32),
            Self::WorkingSet { first } => (number::WORKING_SET, first),
            Self::InitFailed { len } => (number::INIT_FAILED, len as u32),
            Self::InitOutput { len } => (number::INIT_OUTPUT, len as u32),
        };
        (PORT_BASE + number, arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn every_call_round_trips_through_its_port() {
        let calls = [
            Hypercall::LogWrite { len: 17 },
            Hypercall::Exit { code: 3 },
            Hypercall::Panic { len: HYPERCALL_PAGE_SIZE },
            Hypercall::FaultReport { len: 64 },
            Hypercall::Milestone(Milestone::Ready),
            Hypercall::WorkingSet { first: 255 },
            Hypercall::InitFailed { len: 56 },
            Hypercall::InitOutput { len: 56 },
        ];
        for call in calls {
            let (port, arg) = call.encode();
            assert_eq!(Hypercall::decode(port, &arg.to_le_bytes()), Ok(call));
        }
    }

    #[test]
    fn checkpoint_results_round_trip() {
        let results = [
            CheckpointResult::Original,
            CheckpointResult::Restored { warm_runs: 0, first_request: None },
            CheckpointResult::Restored { warm_runs: 7, first_request: Some(0) },
            CheckpointResult::Restored { warm_runs: u32::MAX, first_request: Some(CHECKPOINT_REQUEST_MAX as u32) },
        ];
        for result in results {
            assert_eq!(CheckpointResult::decode(&result.encode()), Ok(result));
        }
    }

    #[test]
    fn checkpoint_result_layout_is_pinned() {
        let result = CheckpointResult::Restored { warm_runs: 3, first_request: Some(5) };
        assert_eq!(result.encode(), [1, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(CheckpointResult::Original.encode(), [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        let mut page = [0u8; HYPERCALL_PAGE_SIZE];
        page[..16].copy_from_slice(&result.encode());
        page[16..21].copy_from_slice(b"hello");
        assert_eq!(result.first_request(&page), Some(&b"hello"[..]));
        assert_eq!(CheckpointResult::Original.first_request(&page), None);
    }

    #[test]
    fn hostile_checkpoint_results_are_refused() {
        let mut page = CheckpointResult::Restored { warm_runs: 1, first_request: None }.encode();
        page[8..12].copy_from_slice(&(CHECKPOINT_REQUEST_MAX as u32 + 1).to_le_bytes());
        assert_eq!(
            CheckpointResult::decode(&page),
            Err(CheckpointResultError::RequestTooLong(CHECKPOINT_REQUEST_MAX as u32 + 1))
        );
        page[0] = 2;
        assert_eq!(CheckpointResult::decode(&page), Err(CheckpointResultError::UnknownSide(2)));
        assert_eq!(CheckpointResult::decode(&page[..15]), Err(CheckpointResultError::Truncated(15)));
        // A length that fits the result but not a short buffer gives no request, not a panic.
        let result = CheckpointResult::Restored { warm_runs: 0, first_request: Some(4000) };
        assert_eq!(result.first_request(&[0u8; 100]), None);
    }

    #[test]
    fn decode_rejects_malformed_calls() {
        let out = |n: u16, arg: u32| Hypercall::decode(PORT_BASE + n, &arg.to_le_bytes());
        assert_eq!(out(number::LOG_WRITE, 4097), Err(DecodeError::PayloadTooLong { number: 0, len: 4097 }));
        assert_eq!(out(number::CHECKPOINT, 0), Ok(Hypercall::Checkpoint { len: 0 }));
        assert_eq!(out(7, 0), Err(DecodeError::UnknownNumber(7)));
        assert_eq!(out(31, 0), Err(DecodeError::UnknownNumber(31)));
        assert_eq!(out(number::MILESTONE, 9), Err(DecodeError::UnknownMilestone(9)));
        assert_eq!(Hypercall::decode(PORT_BASE, &[1]), Err(DecodeError::BadAccess { number: 0, width: 1 }));
        assert_eq!(Hypercall::decode(PORT_BASE + PORT_COUNT, &[0; 4]), Err(DecodeError::NotHypercallPort(0x720)));
    }

    #[test]
    fn every_checkpoint_result_error_message_is_pinned() {
        let cases = [
            (CheckpointResultError::Truncated(15), "checkpoint result: 15 bytes, fewer than its 16"),
            (CheckpointResultError::UnknownSide(2), "checkpoint result 2 is neither original (0) nor restored (1)"),
            (
                CheckpointResultError::RequestTooLong(4081),
                "checkpoint result: a first request of 4081 bytes, more than the 4080 it carries",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }

    #[test]
    fn every_decode_error_message_is_pinned() {
        let cases = [
            (DecodeError::NotHypercallPort(0x720), "port 0x720 is not a hypercall port"),
            (DecodeError::UnknownNumber(7), "unknown hypercall number 7"),
            (
                DecodeError::PayloadTooLong { number: 0, len: 4097 },
                "hypercall 0 passed payload length 4097, more than the 4096-byte hypercall page",
            ),
            (DecodeError::UnknownMilestone(9), "unknown boot milestone 9"),
            (
                DecodeError::BadAccess { number: 0, width: 1 },
                "hypercall 0 was a 1-byte access; hypercalls are 4-byte `out`",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
