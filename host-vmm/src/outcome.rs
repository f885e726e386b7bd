//! How a guest's run ended ([`Outcome`]), how the function answered ([`FunctionResponse`]), and
//! the guest behaviour that ends its VM ([`GuestError`]). The exit handler, the mailbox and the
//! devices decide these; the callers of a run read them.

use std::time::Duration;

use abi::fault::{FAULT_REPORT_LEN, FaultReport};
use abi::hypercall::DecodeError;

use crate::virtio::DeviceError;

/// How one invocation ended, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionStatus {
    /// `handle` (or `_start`) returned.
    Ok,
    /// The function trapped with this message.
    Trapped(String),
    /// The function called `proc_exit` with this code.
    Exited(u32),
}

impl FunctionStatus {
    /// True when the function answered cleanly: it returned, or exited with code 0 (a command
    /// that ends with `proc_exit(0)`, as Python's `os._exit(0)` does).
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Ok | Self::Exited(0))
    }
}

/// One invocation's result.
#[derive(Debug, Clone)]
pub struct FunctionResponse {
    /// How it ended.
    pub status: FunctionStatus,
    /// What it wrote to stdout: the response.
    pub stdout: Vec<u8>,
    /// What it wrote to stderr.
    pub stderr: Vec<u8>,
    /// From handing over the request to receiving the response.
    pub handle_time: Duration,
}

/// How a guest's run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest called exit with this code.
    Exited(u32),
    /// The guest panicked with this message.
    Panicked(String),
    /// The guest took a fatal CPU exception.
    Faulted(FaultReport),
    /// The guest was still running when its wall-clock timeout passed.
    TimedOut(Duration),
    /// The guest reached its checkpoint and the VMM stopped it there to take a snapshot.
    Checkpointed,
    /// The guest waits in INVOKE_NEXT for a request that has not arrived (it is parked).
    Parked,
    /// The guest answered its request, and the VMM stopped it there (one request per run).
    Answered,
    /// The function failed in its init, before any request: it trapped (fuel counts) or
    /// exited. What it wrote is the run's response, as for a request.
    InitFailed(FunctionStatus),
    /// The guest did something the VMM does not allow.
    Failed {
        /// What it did.
        error: GuestError,
        /// Where, if the vCPU's registers could be read.
        rip: Option<u64>,
    },
}

impl Outcome {
    /// The exit status `thaw` reports for this outcome: the guest's own code (low 8 bits) when
    /// it exited, otherwise one of [`abi::exit_code`].
    pub fn exit_code(&self) -> u8 {
        let code = match self {
            Self::Exited(code) => abi::exit_code::of_exit(*code),
            Self::Checkpointed | Self::Parked | Self::Answered => 0,
            Self::Panicked(_) => abi::exit_code::PANIC,
            Self::Faulted(_) => abi::exit_code::FAULT,
            Self::TimedOut(_) => abi::exit_code::TIMEOUT,
            Self::Failed { .. } => abi::exit_code::GUEST_FAILURE,
            Self::InitFailed(FunctionStatus::Trapped(_)) => abi::exit_code::FUNCTION_TRAPPED,
            Self::InitFailed(FunctionStatus::Exited(code)) => abi::exit_code::of_exit(*code),
            Self::InitFailed(FunctionStatus::Ok) => abi::exit_code::GUEST_FAILURE,
        };
        code as u8
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "guest exited with code {code}"),
            Self::Checkpointed => write!(f, "guest stopped at its checkpoint"),
            Self::Parked => write!(f, "guest waits for its request"),
            Self::Answered => write!(f, "guest answered its request"),
            // The guest's message names the export: "in init: ...".
            Self::InitFailed(FunctionStatus::Trapped(message)) => write!(f, "the function trapped {message}"),
            Self::InitFailed(FunctionStatus::Exited(code)) => {
                write!(f, "the function exited in its init with code {code}")
            }
            Self::InitFailed(FunctionStatus::Ok) => write!(f, "the function's init failed"),
            Self::Panicked(message) => write!(f, "guest panicked: {message}"),
            Self::Faulted(report) => write!(f, "guest fault: {report}"),
            Self::TimedOut(t) => write!(f, "guest timed out after {:.1} s", t.as_secs_f64()),
            Self::Failed { error, rip: Some(rip) } => write!(f, "guest failed: {error} (rip {rip:#x})"),
            Self::Failed { error, rip: None } => write!(f, "guest failed: {error}"),
        }
    }
}

/// Guest behaviour that ends its VM.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// KVM_EXIT_SHUTDOWN: an exception the guest's IDT could not deliver.
    #[error("triple fault: the guest took an exception it had no working handler for")]
    TripleFault,
    /// Port I/O outside COM1 and the hypercall range.
    #[error("{} of {size} byte(s) on unknown I/O port {port:#x}", if *.write { "write" } else { "read" })]
    UnknownPort {
        /// The port.
        port: u16,
        /// True for `out`.
        write: bool,
        /// Access width.
        size: usize,
    },
    /// An access to guest-physical memory that is neither RAM nor a device.
    #[error("{} of {size} byte(s) at unmapped guest-physical address {addr:#x}", if *.write { "write" } else { "read" })]
    UnknownMmio {
        /// The guest-physical address.
        addr: u64,
        /// True for a store.
        write: bool,
        /// Access width.
        size: usize,
    },
    /// A virtio device refused what the guest did.
    #[error("virtio device register at {addr:#x}: {error}")]
    Device {
        /// The guest-physical address accessed.
        addr: u64,
        /// What was wrong.
        error: DeviceError,
    },
    /// A port access in the hypercall range that is not a valid hypercall.
    #[error("malformed hypercall: {0}")]
    Hypercall(DecodeError),
    /// A checkpoint whose I/O table location is malformed or outside guest memory.
    #[error("checkpoint: the I/O table location ({len}-byte payload) is malformed or outside guest memory")]
    IoTableLocation {
        /// The payload length.
        len: usize,
    },
    /// A fault report with the wrong length.
    #[error("malformed fault report: {0} bytes, expected {FAULT_REPORT_LEN}")]
    FaultReportLength(usize),
    /// The guest halted; thaw's guest must end through the exit hypercall.
    #[error("the guest executed hlt instead of the exit hypercall")]
    Halted,
    /// KVM could not emulate an instruction.
    #[error("KVM internal error: an instruction could not be emulated (under PVM, SSE in ring 0 does this)")]
    InternalError,
    /// VM entry failed.
    #[error("VM entry failed: hardware reason {reason:#x}")]
    FailEntry {
        /// The hardware entry failure reason.
        reason: u64,
    },
    /// Misuse of the invoke mailbox.
    #[error("invoke mailbox: {0}")]
    Mailbox(String),
    /// Any other exit.
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_abi() {
        assert_eq!(Outcome::Exited(3).exit_code(), 3);
        assert_eq!(Outcome::Exited(100).exit_code(), 100);
        for out_of_range in [101, 104, 124, 125, 256, 256 + 4, u32::MAX] {
            assert_eq!(Outcome::Exited(out_of_range).exit_code(), 105, "{out_of_range}");
        }
        assert_eq!(Outcome::Panicked(String::new()).exit_code(), 101);
        assert_eq!(Outcome::TimedOut(Duration::from_secs(1)).exit_code(), 124);
        assert_eq!(Outcome::InitFailed(FunctionStatus::Trapped(String::new())).exit_code(), 104);
        assert_eq!(Outcome::InitFailed(FunctionStatus::Exited(7)).exit_code(), 7);
        assert_eq!(Outcome::InitFailed(FunctionStatus::Exited(256)).exit_code(), 105);
    }
}
