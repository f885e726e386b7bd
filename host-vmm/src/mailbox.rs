//! The host side of the invoke mailbox (`abi::invoke`): queued requests in, responses out.
//!
//! Every guest-supplied address and length is checked before use: buffers must lie in guest
//! memory (vm-memory's checked accessors enforce it) and within the size caps, or the VM fails
//! with a [`GuestError`] naming the field and value.

use std::collections::VecDeque;
use std::time::Instant;

use crate::memory::GuestRam;
use abi::hypercall::HYPERCALL_PAGE_GPA;
use abi::invoke::{self, NextReply, NextRequest, Range, Response};
use vm_memory::{Bytes, GuestAddress};

use crate::outcome::{FunctionResponse, FunctionStatus, GuestError};

/// What INVOKE_NEXT gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// This reply, now.
    Reply(NextReply),
    /// Nothing yet: the guest waits (parks) in its call until [`Mailbox::deliver`] answers it.
    Park,
}

/// Requests waiting for the guest, and the responses it gave.
#[derive(Debug, Default)]
pub struct Mailbox {
    pending: VecDeque<Vec<u8>>,
    /// Serve one request per run: stop the run after each response, and park the guest when no
    /// request is queued instead of telling it there are no more.
    one_at_a_time: bool,
    /// The buffer of a guest parked in INVOKE_NEXT.
    parked: Option<NextRequest>,
    handed_out: Option<Instant>,
    /// When the guest took its first request.
    pub first_request_at: Option<Instant>,
    /// When the first response arrived.
    pub first_response_at: Option<Instant>,
    /// Responses, in request order.
    pub responses: Vec<FunctionResponse>,
    /// What the function's init wrote to stderr (INIT_OUTPUT), in a VM that booted cold.
    pub init_stderr: Vec<u8>,
}

fn field_error(what: &str, detail: String) -> GuestError {
    GuestError::Mailbox(format!("{what}: {detail}"))
}

fn read_range(mem: &GuestRam, range: Range, cap: u64, what: &str) -> Result<Vec<u8>, GuestError> {
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

/// Writes the reply to INVOKE_NEXT over its request in the hypercall page.
pub fn write_reply(mem: &GuestRam, reply: NextReply) -> Result<(), GuestError> {
    mem.write_slice(&reply.encode(), GuestAddress(HYPERCALL_PAGE_GPA))
        .map_err(|e| field_error("next-request", format!("writing the reply: {e}")))
}

impl Mailbox {
    /// A mailbox holding `requests`, served in order; when they run out the guest is told
    /// there are no more.
    pub fn new(requests: Vec<Vec<u8>>) -> Self {
        Self { pending: requests.into(), ..Self::default() }
    }

    /// A mailbox for a VM that serves requests one at a time as they come: the run stops after
    /// each response, and when no request is queued the guest parks in INVOKE_NEXT until
    /// [`Mailbox::deliver`] hands it one.
    pub fn parking() -> Self {
        Self { one_at_a_time: true, ..Self::default() }
    }

    /// True when the run stops after each response.
    pub fn stops_after_response(&self) -> bool {
        self.one_at_a_time
    }

    /// True while the guest waits in INVOKE_NEXT.
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// Queues `request`. A parked guest gets it now: its buffer is filled and its reply
    /// written, so the next `KVM_RUN` completes its call.
    pub fn deliver(&mut self, mem: &GuestRam, request: Vec<u8>) -> Result<(), GuestError> {
        self.pending.push_back(request);
        if let Some(parked) = self.parked.take() {
            let reply = self.answer(mem, parked)?;
            write_reply(mem, reply)?;
        }
        Ok(())
    }

    /// Records that the guest was handed its request with its checkpoint's result
    /// ([`crate::vm::Vm::hand_in_first_request`]): it answers without asking for it.
    pub fn handed_in(&mut self) {
        let now = Instant::now();
        self.handed_out = Some(now);
        self.first_request_at.get_or_insert(now);
    }

    /// Serves INVOKE_NEXT: copies the next request into the guest's buffer, or parks the guest.
    pub fn next(&mut self, mem: &GuestRam, request: &[u8]) -> Result<Next, GuestError> {
        let request = NextRequest::decode(request).ok_or_else(|| {
            field_error("next-request", format!("{} bytes, expected {}", request.len(), NextRequest::LEN))
        })?;
        if self.handed_out.is_some() {
            return Err(field_error("next-request", "asked for a request before answering the previous one".into()));
        }
        if self.pending.is_empty() && self.one_at_a_time {
            self.parked = Some(request);
            return Ok(Next::Park);
        }
        self.answer(mem, request).map(Next::Reply)
    }

    fn answer(&mut self, mem: &GuestRam, request: NextRequest) -> Result<NextReply, GuestError> {
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
    pub fn respond(&mut self, mem: &GuestRam, response: &[u8]) -> Result<(), GuestError> {
        let Some(handed_out) = self.handed_out.take() else {
            return Err(field_error("response", "answered a request it was never given".into()));
        };
        let mut response = read_response(mem, response, "response")?;
        response.handle_time = handed_out.elapsed();
        self.first_response_at.get_or_insert_with(Instant::now);
        self.responses.push(response);
        Ok(())
    }

    /// Serves INIT_OUTPUT: copies out what a successful init wrote to stderr.
    pub fn init_output(&mut self, mem: &GuestRam, response: &[u8]) -> Result<(), GuestError> {
        let response = read_response(mem, response, "init output")?;
        if response.status != FunctionStatus::Ok {
            return Err(field_error("init output", "only an init that succeeded sends its output".into()));
        }
        self.init_stderr = response.stderr;
        Ok(())
    }

    /// Serves INIT_FAILED: copies out how the function's init failed (trapped or exited, with
    /// what it wrote), keeps it as the run's response, and returns its status.
    pub fn init_failed(&mut self, mem: &GuestRam, response: &[u8]) -> Result<FunctionStatus, GuestError> {
        let response = read_response(mem, response, "init failure")?;
        if response.status == FunctionStatus::Ok {
            return Err(field_error("init failure", "status 0 (ok) is not a failure".into()));
        }
        let status = response.status.clone();
        self.responses.push(response);
        Ok(status)
    }
}

/// Decodes a `Response` of the guest's (`what` names it in errors) and copies its output out of
/// guest memory.
fn read_response(mem: &GuestRam, response: &[u8], what: &str) -> Result<FunctionResponse, GuestError> {
    let response = Response::decode(response)
        .ok_or_else(|| field_error(what, format!("{} bytes, expected {}", response.len(), Response::LEN)))?;
    let stdout = read_range(mem, response.stdout, invoke::MAX_OUTPUT_BYTES, "response stdout")?;
    let stderr = read_range(mem, response.stderr, invoke::MAX_OUTPUT_BYTES, "response stderr")?;
    let message = read_range(mem, response.message, invoke::MAX_MESSAGE_BYTES, "response message")?;
    let status = match response.status {
        invoke::STATUS_OK => FunctionStatus::Ok,
        invoke::STATUS_TRAPPED => FunctionStatus::Trapped(String::from_utf8_lossy(&message).into_owned()),
        invoke::STATUS_EXITED => FunctionStatus::Exited(response.exit_code),
        other => {
            return Err(field_error(what, format!("status {other} is not ok (0), trapped (1) or exited (2)")));
        }
    };
    Ok(FunctionResponse { status, stdout, stderr, handle_time: std::time::Duration::ZERO })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn next(buffer_gpa: u64, capacity: u64) -> [u8; 16] {
        NextRequest { buffer_gpa, capacity }.encode()
    }

    #[test]
    fn requests_go_in_and_responses_come_out() {
        let mem = mem();
        let mut mailbox = Mailbox::new(vec![b"{\"name\":\"x\"}".to_vec()]);
        let reply = mailbox.next(&mem, &next(0x8000, 4)).unwrap();
        assert_eq!(reply, Next::Reply(NextReply { status: invoke::NEXT_TOO_LARGE, len: 12 }));
        let reply = mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        assert_eq!(reply, Next::Reply(NextReply { status: invoke::NEXT_REQUEST, len: 12 }));
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
        assert_eq!(
            mailbox.next(&mem, &next(0x8000, 64)).unwrap(),
            Next::Reply(NextReply { status: invoke::NEXT_NONE, len: 0 })
        );
    }

    #[test]
    fn a_parked_guest_gets_its_request_when_it_is_delivered() {
        let mem = mem();
        let mut mailbox = Mailbox::parking();
        assert_eq!(mailbox.next(&mem, &next(0x8000, 64)).unwrap(), Next::Park);
        assert!(mailbox.is_parked());
        mailbox.deliver(&mem, b"late".to_vec()).unwrap();
        assert!(!mailbox.is_parked());
        let reply = NextReply::decode(&{
            let mut page = [0u8; NextReply::LEN];
            mem.read_slice(&mut page, GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
            page
        })
        .unwrap();
        assert_eq!(reply, NextReply { status: invoke::NEXT_REQUEST, len: 4 });
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got, b"late");
        // Asking again before answering is misuse, parked or not.
        assert!(mailbox.next(&mem, &next(0x8000, 64)).unwrap_err().to_string().contains("before answering"));
    }

    #[test]
    fn a_request_too_large_for_the_parked_buffer_is_offered_again() {
        let mem = mem();
        let mut mailbox = Mailbox::parking();
        assert_eq!(mailbox.next(&mem, &next(0x8000, 2)).unwrap(), Next::Park);
        mailbox.deliver(&mem, b"longer".to_vec()).unwrap();
        let reply = mailbox.next(&mem, &next(0x8000, 64)).unwrap();
        assert_eq!(reply, Next::Reply(NextReply { status: invoke::NEXT_REQUEST, len: 6 }));
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

    #[test]
    fn an_inits_output_is_kept_apart_from_the_responses_and_must_say_ok() {
        let mem = mem();
        mem.write_slice(b"ready\n", GuestAddress(0x9000)).unwrap();
        let mut mailbox = Mailbox::default();
        let ok = Response {
            status: invoke::STATUS_OK,
            exit_code: 0,
            stdout: Range::default(),
            stderr: Range { gpa: 0x9000, len: 6 },
            message: Range::default(),
        };
        mailbox.init_output(&mem, &ok.encode()).unwrap();
        assert_eq!(mailbox.init_stderr, b"ready\n");
        assert!(mailbox.responses.is_empty());
        let trapped = Response { status: invoke::STATUS_TRAPPED, ..ok };
        let e = mailbox.init_output(&mem, &trapped.encode()).unwrap_err();
        assert_eq!(e.to_string(), "invoke mailbox: init output: only an init that succeeded sends its output");
        let beyond = Response { stderr: Range { gpa: u64::MAX - 2, len: 6 }, ..ok };
        assert!(mailbox.init_output(&mem, &beyond.encode()).is_err());
    }

    #[test]
    fn an_init_failure_is_kept_as_the_runs_response_and_ok_is_no_failure() {
        let mem = mem();
        mem.write_slice(b"boom", GuestAddress(0x9000)).unwrap();
        let mut mailbox = Mailbox::default();
        let trapped = Response {
            status: invoke::STATUS_TRAPPED,
            exit_code: 0,
            stdout: Range::default(),
            stderr: Range { gpa: 0x9000, len: 4 },
            message: Range { gpa: 0x9000, len: 4 },
        };
        assert_eq!(mailbox.init_failed(&mem, &trapped.encode()).unwrap(), FunctionStatus::Trapped("boom".into()));
        assert_eq!(mailbox.responses[0].stderr, b"boom");
        let ok = Response { status: invoke::STATUS_OK, ..trapped };
        let e = mailbox.init_failed(&mem, &ok.encode()).unwrap_err();
        assert_eq!(e.to_string(), "invoke mailbox: init failure: status 0 (ok) is not a failure");
        assert!(mailbox.init_failed(&mem, &[0; 5]).unwrap_err().to_string().contains("5 bytes, expected 56"));
    }
}
