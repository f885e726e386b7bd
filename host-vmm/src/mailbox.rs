//! The host side of the invoke mailbox (`abi::invoke`): queued requests in, responses out.
//!
//! Every guest-supplied address and length is checked before use: buffers must lie in guest
//! memory (vm-memory's checked accessors enforce it) and within the size caps, or the VM fails
//! with a [`GuestError`] naming the field and value.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use abi::invoke::{self, NextReply, NextRequest, Range, Response};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::exit::GuestError;

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

/// Requests waiting for the guest, and the responses it gave.
#[derive(Debug, Default)]
pub struct Mailbox {
    pending: VecDeque<Vec<u8>>,
    handed_out: Option<Instant>,
    /// When the guest took its first request.
    pub first_request_at: Option<Instant>,
    /// When the first response arrived.
    pub first_response_at: Option<Instant>,
    /// Responses, in request order.
    pub responses: Vec<FunctionResponse>,
}

fn field_error(what: &str, detail: String) -> GuestError {
    GuestError::Mailbox(format!("{what}: {detail}"))
}

fn read_range(mem: &GuestMemoryMmap, range: Range, cap: u64, what: &str) -> Result<Vec<u8>, GuestError> {
    if range.len > cap {
        return Err(field_error(what, format!("length {} exceeds the {cap}-byte limit", range.len)));
    }
    let mut bytes = vec![0; range.len as usize];
    if range.len > 0 {
        mem.read_slice(&mut bytes, GuestAddress(range.gpa)).map_err(|_| {
            field_error(what, format!("range {:#x}+{:#x} is outside guest memory", range.gpa, range.len))
        })?;
    }
    Ok(bytes)
}

impl Mailbox {
    /// A mailbox holding `requests`, served in order.
    pub fn new(requests: Vec<Vec<u8>>) -> Self {
        Self { pending: requests.into(), ..Self::default() }
    }

    /// Serves INVOKE_NEXT: copies the next request into the guest's buffer.
    pub fn next(&mut self, mem: &GuestMemoryMmap, request: &[u8]) -> Result<NextReply, GuestError> {
        let request = NextRequest::decode(request).ok_or_else(|| {
            field_error("next-request", format!("{} bytes, expected {}", request.len(), NextRequest::LEN))
        })?;
        if self.handed_out.is_some() {
            return Err(field_error("next-request", "asked for a request before answering the previous one".into()));
        }
        let Some(bytes) = self.pending.front() else {
            return Ok(NextReply { status: invoke::NEXT_NONE, len: 0 });
        };
        if bytes.len() as u64 > request.capacity {
            return Ok(NextReply { status: invoke::NEXT_TOO_LARGE, len: bytes.len() as u64 });
        }
        mem.write_slice(bytes, GuestAddress(request.buffer_gpa)).map_err(|_| {
            field_error(
                "next-request",
                format!("buffer {:#x}+{:#x} is outside guest memory", request.buffer_gpa, bytes.len()),
            )
        })?;
        let len = bytes.len() as u64;
        self.pending.pop_front();
        let now = Instant::now();
        self.handed_out = Some(now);
        self.first_request_at.get_or_insert(now);
        Ok(NextReply { status: invoke::NEXT_REQUEST, len })
    }

    /// Serves INVOKE_RESPOND: copies the response out of guest memory.
    pub fn respond(&mut self, mem: &GuestMemoryMmap, response: &[u8]) -> Result<(), GuestError> {
        let response = Response::decode(response)
            .ok_or_else(|| field_error("response", format!("{} bytes, expected {}", response.len(), Response::LEN)))?;
        let Some(handed_out) = self.handed_out.take() else {
            return Err(field_error("response", "answered a request it was never given".into()));
        };
        let stdout = read_range(mem, response.stdout, invoke::MAX_OUTPUT_BYTES, "response stdout")?;
        let stderr = read_range(mem, response.stderr, invoke::MAX_OUTPUT_BYTES, "response stderr")?;
        let message = read_range(mem, response.message, invoke::MAX_MESSAGE_BYTES, "response message")?;
        let status = match response.status {
            invoke::STATUS_OK => FunctionStatus::Ok,
            invoke::STATUS_TRAPPED => FunctionStatus::Trapped(String::from_utf8_lossy(&message).into_owned()),
            invoke::STATUS_EXITED => FunctionStatus::Exited(response.exit_code),
            other => {
                return Err(field_error(
                    "response",
                    format!("status {other} is not ok (0), trapped (1) or exited (2)"),
                ));
            }
        };
        self.first_response_at.get_or_insert_with(Instant::now);
        self.responses.push(FunctionResponse { status, stdout, stderr, handle_time: handed_out.elapsed() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn next(buffer_gpa: u64, capacity: u64) -> [u8; 16] {
        NextRequest { buffer_gpa, capacity }.encode()
    }

    #[test]
    fn requests_go_in_and_responses_come_out() {
        let mem = mem();
        let mut mailbox = Mailbox::new(vec![b"{\"name\":\"x\"}".to_vec()]);
        let reply = mailbox.next(&mem, &next(0x8000, 4)).unwrap();
        assert_eq!(reply, NextReply { status: invoke::NEXT_TOO_LARGE, len: 12 });
        let reply = mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        assert_eq!(reply, NextReply { status: invoke::NEXT_REQUEST, len: 12 });
        let mut got = [0u8; 12];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got, b"{\"name\":\"x\"}");
        mem.write_slice(b"out", GuestAddress(0x9000)).unwrap();
        let response = Response {
            status: invoke::STATUS_OK,
            exit_code: 0,
            stdout: Range { gpa: 0x9000, len: 3 },
            stderr: Range::default(),
            message: Range::default(),
        };
        mailbox.respond(&mem, &response.encode()).unwrap();
        assert_eq!(mailbox.responses[0].stdout, b"out");
        assert_eq!(mailbox.responses[0].status, FunctionStatus::Ok);
        assert_eq!(mailbox.next(&mem, &next(0x8000, 64)).unwrap().status, invoke::NEXT_NONE);
    }

    #[test]
    fn hostile_mailbox_use_fails_the_guest() {
        let mem = mem();
        let mut mailbox = Mailbox::new(vec![vec![1; 8]]);
        let e = mailbox.next(&mem, &next(0xffff_fff0, 64)).unwrap_err();
        assert!(e.to_string().contains("outside guest memory"), "{e}");
        assert!(mailbox.next(&mem, &[0; 3]).unwrap_err().to_string().contains("3 bytes, expected 16"));
        let stray = Response {
            status: 0,
            exit_code: 0,
            stdout: Range::default(),
            stderr: Range::default(),
            message: Range::default(),
        };
        assert!(mailbox.respond(&mem, &stray.encode()).unwrap_err().to_string().contains("never given"));
        mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        let huge = Response { stdout: Range { gpa: 0, len: u64::MAX }, ..stray };
        assert!(mailbox.respond(&mem, &huge.encode()).unwrap_err().to_string().contains("exceeds"));
        let mut mailbox = Mailbox::new(vec![vec![1; 8]]);
        mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        let outside = Response { stderr: Range { gpa: 0xfff0, len: 0x100 }, ..stray };
        assert!(mailbox.respond(&mem, &outside.encode()).unwrap_err().to_string().contains("outside guest memory"));
        let mut mailbox = Mailbox::new(vec![vec![1; 8]]);
        mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        let bad_status = Response { status: 9, ..stray };
        assert!(mailbox.respond(&mem, &bad_status.encode()).unwrap_err().to_string().contains("status 9"));
    }
}
