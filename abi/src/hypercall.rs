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

use core::fmt;

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
    /// returns, the hypercall page's first u32 says which side of the fork this is
    /// ([`CHECKPOINT_ORIGINAL`](super::CHECKPOINT_ORIGINAL) or
    /// [`CHECKPOINT_RESTORED`](super::CHECKPOINT_RESTORED)); in a restored VM the second u32
    /// is the number of working-set runs the guest should touch before it asks for a request
    /// ([`WORKING_SET`]; 0 for none), and the third the length of a first request handed in
    /// with the result ([`CHECKPOINT_REQUEST_OFFSET`](super::CHECKPOINT_REQUEST_OFFSET)). The
    /// hypercall page holds an
    /// [`IoTableLocation`](crate::iotable::IoTableLocation) of `len` bytes (or `len` is 0).
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

/// In a restored VM's checkpoint result (interface 6 on), the third u32: the length of the
/// first request, whose bytes the VMM put in the hypercall page from
/// [`CHECKPOINT_REQUEST_OFFSET`], or [`CHECKPOINT_NO_REQUEST`]. The guest takes such a request
/// instead of asking for it with INVOKE_NEXT, so a VM restored or reset with its request in hand
/// answers after one VM exit instead of two. The fourth u32 is zero.
pub const CHECKPOINT_REQUEST_OFFSET: usize = 16;
/// The longest request the checkpoint's result carries; a longer one is fetched with
/// INVOKE_NEXT.
pub const CHECKPOINT_REQUEST_MAX: usize = HYPERCALL_PAGE_SIZE - CHECKPOINT_REQUEST_OFFSET;
/// The checkpoint result's third u32 when it carries no request.
pub const CHECKPOINT_NO_REQUEST: u32 = u32::MAX;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The port is outside the hypercall range.
    NotHypercallPort(u16),
    /// The number is reserved but has no meaning in this interface version.
    UnknownNumber(u16),
    /// A payload length larger than the hypercall page.
    PayloadTooLong {
        /// The hypercall number.
        number: u16,
        /// The length the guest passed.
        len: u32,
    },
    /// A milestone value this interface does not define.
    UnknownMilestone(u32),
    /// The access was not a 4-byte `out`.
    BadAccess {
        /// The hypercall number.
        number: u16,
        /// The access width in bytes.
        width: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotHypercallPort(port) => write!(f, "port {port:#x} is not a hypercall port"),
            Self::UnknownNumber(n) => write!(f, "unknown hypercall number {n}"),
            Self::PayloadTooLong { number, len } => write!(
                f,
                "hypercall {number} passed payload length {len}, more than the {HYPERCALL_PAGE_SIZE}-byte hypercall page"
            ),
            Self::UnknownMilestone(v) => write!(f, "unknown boot milestone {v}"),
            Self::BadAccess { number, width } => {
                write!(f, "hypercall {number} was a {width}-byte access; hypercalls are 4-byte `out`")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

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
}
