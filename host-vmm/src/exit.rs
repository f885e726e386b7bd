//! VM exits: the one function that decides what each exit means, and how a run ends.
//!
//! [`ExitHandler::handle`] maps a `VcpuExit` to an [`ExitAction`]. It serves hypercalls (decoded
//! by `abi`, payloads read from the hypercall page through vm-memory's checked API), the COM1
//! transmitter and the virtio devices' register windows; every other exit is guest misbehaviour and becomes a [`GuestError`] that ends
//! this VM only. It is unit-tested with made-up exits below.

use std::io::{self, Write};
use std::time::Instant;

use crate::memory::GuestRam;
use abi::fault::FaultReport;
use abi::hypercall::{HYPERCALL_PAGE_GPA, Hypercall, Milestone, is_hypercall_port};
use abi::iotable::IoTableLocation;
use abi::workingset::{self, Run};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::mailbox::{Mailbox, Next, write_reply};
use crate::outcome::{GuestError, Outcome};
use crate::output::OutputCap;
use crate::serial::Serial;
use crate::virtio::{DeviceError, Devices};

/// What the run loop does after an exit.
#[derive(Debug)]
pub enum ExitAction {
    /// Run the vCPU again.
    Continue,
    /// The run is over.
    Stop(Outcome),
    /// The guest reached its checkpoint, with its I/O table here (if it keeps one); the run
    /// loop decides (it needs the vCPU).
    Checkpoint(Option<IoTableLocation>),
}

/// Why an exit could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// The guest misbehaved; its VM ends.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Writing guest output on the host failed.
    #[error("writing guest output: {0}")]
    Output(io::Error),
    /// A device backend failed on the host side.
    #[error("virtio device: {0}")]
    Device(DeviceError),
    /// Reading the hypercall page failed (guest memory smaller than the layout needs).
    #[error("reading the hypercall page: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// Longest COM1 line held before it is written out without its newline.
pub const MAX_SERIAL_LINE: usize = 4096;

/// Per-run state the exit handler needs: guest memory, the output sink (the log hypercall's and
/// COM1's bytes, capped by [`OutputCap`]), COM1, milestones, the virtio devices, the invoke
/// mailbox and the working set offered to the guest.
pub struct ExitHandler<'a> {
    mem: &'a GuestRam,
    devices: &'a mut Devices,
    working_set: &'a [Run],
    warmed_pages: u64,
    output: &'a mut dyn Write,
    output_cap: OutputCap,
    serial: Serial,
    serial_line: Vec<u8>,
    milestones: Vec<(Milestone, Instant)>,
    /// Requests for the guest and its responses.
    pub mailbox: &'a mut Mailbox,
}

impl<'a> ExitHandler<'a> {
    /// A handler writing guest output to `output` and serving `devices`, `mailbox` and the
    /// `working_set` runs the guest was told to touch (empty for none).
    pub fn new(
        mem: &'a GuestRam,
        devices: &'a mut Devices,
        working_set: &'a [Run],
        output: &'a mut dyn Write,
        mailbox: &'a mut Mailbox,
    ) -> Self {
        Self {
            mem,
            devices,
            working_set,
            warmed_pages: 0,
            output,
            output_cap: OutputCap::default(),
            serial: Serial::default(),
            serial_line: Vec::new(),
            milestones: Vec::new(),
            mailbox,
        }
    }

    /// When each milestone was reported.
    pub fn milestone(&self, which: Milestone) -> Option<Instant> {
        self.milestones.iter().find(|(m, _)| *m == which).map(|(_, t)| *t)
    }

    /// Working-set pages handed to the guest to touch during this run.
    pub fn warmed_pages(&self) -> u64 {
        self.warmed_pages
    }

    /// Flushes any partial serial line.
    pub fn finish(&mut self) -> Result<(), ExitError> {
        if !self.serial_line.is_empty() {
            let line = std::mem::take(&mut self.serial_line);
            self.emit(&line)?;
        }
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), ExitError> {
        self.output_cap.write(self.output, bytes, "log").map_err(ExitError::Output)
    }

    fn payload(&self, len: usize) -> Result<Vec<u8>, ExitError> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(HYPERCALL_PAGE_GPA)).map_err(ExitError::Memory)?;
        Ok(buf)
    }

    /// Decides what `exit` means. The one place exits are interpreted.
    pub fn handle(&mut self, exit: VcpuExit) -> Result<ExitAction, ExitError> {
        match exit {
            VcpuExit::IoOut(port, data) if is_hypercall_port(port) => {
                let call = Hypercall::decode(port, data).map_err(GuestError::Hypercall)?;
                self.hypercall(call)
            }
            VcpuExit::IoOut(port, data) if Serial::owns(port) && data.len() == 1 => {
                if let Some(byte) = self.serial.write(port, data[0]) {
                    self.serial_line.push(byte);
                    if byte == b'\n' || self.serial_line.len() >= MAX_SERIAL_LINE {
                        self.finish()?;
                    }
                }
                Ok(ExitAction::Continue)
            }
            VcpuExit::IoIn(port, data) if Serial::owns(port) && data.len() == 1 => {
                data[0] = self.serial.read(port);
                Ok(ExitAction::Continue)
            }
            VcpuExit::IoOut(port, data) => Err(GuestError::UnknownPort { port, write: true, size: data.len() }.into()),
            VcpuExit::IoIn(port, data) => Err(GuestError::UnknownPort { port, write: false, size: data.len() }.into()),
            VcpuExit::MmioRead(addr, data) => {
                let size = data.len();
                match self.devices.read(addr, data) {
                    Some(result) => device_result(addr, result),
                    None => Err(GuestError::UnknownMmio { addr, write: false, size }.into()),
                }
            }
            VcpuExit::MmioWrite(addr, data) => match self.devices.write(addr, data, self.mem) {
                Some(result) => device_result(addr, result),
                None => Err(GuestError::UnknownMmio { addr, write: true, size: data.len() }.into()),
            },
            VcpuExit::Shutdown => Err(GuestError::TripleFault.into()),
            VcpuExit::Hlt => Err(GuestError::Halted.into()),
            VcpuExit::InternalError => Err(GuestError::InternalError.into()),
            VcpuExit::FailEntry(reason, _cpu) => Err(GuestError::FailEntry { reason }.into()),
            other => Err(GuestError::UnexpectedExit(format!("{other:?}")).into()),
        }
    }

    fn hypercall(&mut self, call: Hypercall) -> Result<ExitAction, ExitError> {
        match call {
            Hypercall::LogWrite { len } => {
                let bytes = self.payload(len)?;
                self.emit(&bytes)?;
                Ok(ExitAction::Continue)
            }
            Hypercall::Exit { code } => Ok(ExitAction::Stop(Outcome::Exited(code))),
            Hypercall::Panic { len } => {
                let message = String::from_utf8_lossy(&self.payload(len)?).into_owned();
                Ok(ExitAction::Stop(Outcome::Panicked(message)))
            }
            Hypercall::FaultReport { len } => {
                let report = FaultReport::decode(&self.payload(len)?).ok_or(GuestError::FaultReportLength(len))?;
                Ok(ExitAction::Stop(Outcome::Faulted(report)))
            }
            Hypercall::Milestone(m) => {
                if self.milestone(m).is_none() {
                    self.milestones.push((m, Instant::now()));
                }
                Ok(ExitAction::Continue)
            }
            Hypercall::Checkpoint { len: 0 } => Ok(ExitAction::Checkpoint(None)),
            Hypercall::Checkpoint { len } => {
                let location = IoTableLocation::decode(&self.payload(len)?)
                    .filter(|l| self.mem.check_range(GuestAddress(l.gpa), l.len as usize))
                    .ok_or(GuestError::IoTableLocation { len })?;
                Ok(ExitAction::Checkpoint((location.len > 0).then_some(location)))
            }
            Hypercall::InvokeNext { len } => match self.mailbox.next(self.mem, &self.payload(len)?)? {
                Next::Reply(reply) => {
                    write_reply(self.mem, reply)?;
                    Ok(ExitAction::Continue)
                }
                Next::Park => Ok(ExitAction::Stop(Outcome::Parked)),
            },
            Hypercall::InitOutput { len } => {
                self.mailbox.init_output(self.mem, &self.payload(len)?)?;
                Ok(ExitAction::Continue)
            }
            Hypercall::InitFailed { len } => {
                let status = self.mailbox.init_failed(self.mem, &self.payload(len)?)?;
                Ok(ExitAction::Stop(Outcome::InitFailed(status)))
            }
            Hypercall::InvokeRespond { len } => {
                self.mailbox.respond(self.mem, &self.payload(len)?)?;
                if self.mailbox.stops_after_response() {
                    return Ok(ExitAction::Stop(Outcome::Answered));
                }
                Ok(ExitAction::Continue)
            }
            Hypercall::WorkingSet { first } => {
                let batch = workingset::batch(self.working_set, first as usize);
                let reply = workingset::reply(batch);
                self.mem.write_slice(&reply, GuestAddress(HYPERCALL_PAGE_GPA)).map_err(ExitError::Memory)?;
                self.warmed_pages += workingset::page_count(batch);
                Ok(ExitAction::Continue)
            }
            other => Err(GuestError::UnexpectedExit(format!("hypercall {other:?} is not served yet")).into()),
        }
    }
}

/// A device access's result as an exit result: the guest's errors fail its VM, backend errors
/// are the host's.
fn device_result(addr: u64, result: Result<(), DeviceError>) -> Result<ExitAction, ExitError> {
    match result {
        Ok(()) => Ok(ExitAction::Continue),
        Err(error) if error.is_guest_error() => Err(GuestError::Device { addr, error }.into()),
        Err(error) => Err(ExitError::Device(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::hypercall::{HYPERCALL_PAGE_SIZE, PORT_BASE, number};
    use abi::qemu::COM1_PORT;

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    fn arg(value: u32) -> [u8; 4] {
        value.to_le_bytes()
    }

    fn handle(mem: &GuestRam, out: &mut Vec<u8>, exit: VcpuExit) -> Result<ExitAction, ExitError> {
        ExitHandler::new(mem, &mut Devices::default(), &[], out, &mut Mailbox::default()).handle(exit)
    }

    fn guest_error(result: Result<ExitAction, ExitError>) -> GuestError {
        match result {
            Err(ExitError::Guest(e)) => e,
            other => panic!("expected a guest error, got {other:?}"),
        }
    }

    #[test]
    fn log_write_copies_the_payload_to_output() {
        let mem = memory();
        mem.write_slice(b"hello\n", GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let mut out = Vec::new();
        let action = handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::LOG_WRITE, &arg(6))).unwrap();
        assert!(matches!(action, ExitAction::Continue));
        assert_eq!(out, b"hello\n");
    }

    #[test]
    fn exit_panic_and_fault_stop_the_run() {
        let mem = memory();
        let mut out = Vec::new();
        let exit = handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::EXIT, &arg(7))).unwrap();
        assert!(matches!(exit, ExitAction::Stop(Outcome::Exited(7))));

        mem.write_slice(b"boom at x.rs:1:2", GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let panic = handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::PANIC, &arg(16))).unwrap();
        assert!(matches!(panic, ExitAction::Stop(Outcome::Panicked(ref m)) if m == "boom at x.rs:1:2"));

        let report =
            FaultReport { vector: 14, error_code: 6, rip: 0x20_1000, cs: 0x23, cr2: 0xbad, ..Default::default() };
        mem.write_slice(&report.encode(), GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let fault = handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::FAULT_REPORT, &arg(64))).unwrap();
        assert!(matches!(fault, ExitAction::Stop(Outcome::Faulted(r)) if r == report));
    }

    #[test]
    fn malformed_hypercalls_fail_the_guest() {
        let mem = memory();
        let mut out = Vec::new();
        let too_long = (HYPERCALL_PAGE_SIZE + 1) as u32;
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::LOG_WRITE, &arg(too_long))));
        assert!(e.to_string().contains("payload length 4097"), "{e}");
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + 30, &arg(0))));
        assert_eq!(e.to_string(), "malformed hypercall: unknown hypercall number 30");
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::EXIT, &[1])));
        assert!(e.to_string().contains("1-byte access"), "{e}");
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(PORT_BASE + number::FAULT_REPORT, &arg(3))));
        assert!(matches!(e, GuestError::FaultReportLength(3)));
        let mut data = [0u8; 4];
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoIn(PORT_BASE, &mut data)));
        assert!(matches!(e, GuestError::UnknownPort { write: false, .. }));
    }

    #[test]
    fn serial_bytes_are_emitted_per_line() {
        let mem = memory();
        let mut out = Vec::new();
        let mut devices = Devices::default();
        {
            let mut mailbox = Mailbox::default();
            let mut h = ExitHandler::new(&mem, &mut devices, &[], &mut out, &mut mailbox);
            for &b in b"hi\nyo" {
                assert!(matches!(h.handle(VcpuExit::IoOut(COM1_PORT, &[b])).unwrap(), ExitAction::Continue));
            }
            let mut lsr = [0u8];
            h.handle(VcpuExit::IoIn(COM1_PORT + 5, &mut lsr)).unwrap();
            assert_eq!(lsr[0] & 0x20, 0x20);
            h.finish().unwrap();
        }
        assert_eq!(out, b"hi\nyo");
    }

    /// Issue 14, defect 4: a guest that logs without end grew the host's buffer without end,
    /// and COM1 without a newline grew the pending line the same way.
    #[test]
    fn a_runs_log_and_serial_lines_are_capped_and_the_drop_is_said() {
        use crate::output::MAX_GUEST_OUTPUT;
        let mem = memory();
        mem.write_slice(&[b'x'; 4096], GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let mut out = Vec::new();
        let mut devices = Devices::default();
        {
            let mut mailbox = Mailbox::default();
            let mut h = ExitHandler::new(&mem, &mut devices, &[], &mut out, &mut mailbox);
            for _ in 0..MAX_SERIAL_LINE + 10 {
                h.handle(VcpuExit::IoOut(COM1_PORT, b"y")).unwrap();
                assert!(h.serial_line.len() < MAX_SERIAL_LINE);
            }
            for _ in 0..2 * MAX_GUEST_OUTPUT / 4096 {
                h.handle(VcpuExit::IoOut(PORT_BASE + number::LOG_WRITE, &arg(4096))).unwrap();
            }
            h.finish().unwrap();
        }
        let notice = format!("\n[thaw: the guest's log passed {MAX_GUEST_OUTPUT} bytes; the rest is dropped]\n");
        assert_eq!(out.len(), MAX_GUEST_OUTPUT + notice.len());
        // The long line went out at its cap; its last 10 bytes came after the log's ceiling.
        assert!(out.starts_with(&[b'y'; MAX_SERIAL_LINE]));
        assert_eq!(out[MAX_SERIAL_LINE], b'x');
        assert!(out.ends_with(notice.as_bytes()));
    }

    #[test]
    fn unknown_ports_mmio_and_cpu_events_fail_the_guest() {
        let mem = memory();
        let mut out = Vec::new();
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(0x80, &[0])));
        assert_eq!(e.to_string(), "write of 1 byte(s) on unknown I/O port 0x80");
        let mut data = [0u8; 8];
        let e = guest_error(handle(&mem, &mut out, VcpuExit::MmioRead(0xfee0_0000, &mut data)));
        assert_eq!(e.to_string(), "read of 8 byte(s) at unmapped guest-physical address 0xfee00000");
        assert!(matches!(guest_error(handle(&mem, &mut out, VcpuExit::Shutdown)), GuestError::TripleFault));
        assert!(matches!(guest_error(handle(&mem, &mut out, VcpuExit::Hlt)), GuestError::Halted));
        assert!(matches!(guest_error(handle(&mem, &mut out, VcpuExit::InternalError)), GuestError::InternalError));
        assert!(matches!(
            guest_error(handle(&mem, &mut out, VcpuExit::FailEntry(0x21, 0))),
            GuestError::FailEntry { reason: 0x21 }
        ));
        assert!(matches!(guest_error(handle(&mem, &mut out, VcpuExit::Unknown)), GuestError::UnexpectedExit(_)));
    }

    #[test]
    fn device_registers_are_served_and_misuse_fails_the_guest() {
        use abi::devices::DEVICE_WINDOW_GPA;
        use abi::devices::DeviceKind;
        let mem = memory();
        let mut out = Vec::new();
        let mut devices = Devices::new(&[DeviceKind::Entropy], &crate::virtio::Backends::default()).unwrap();
        let mut mailbox = Mailbox::default();
        let mut h = ExitHandler::new(&mem, &mut devices, &[], &mut out, &mut mailbox);
        let mut data = [0u8; 4];
        assert!(matches!(h.handle(VcpuExit::MmioRead(DEVICE_WINDOW_GPA, &mut data)).unwrap(), ExitAction::Continue));
        assert_eq!(&data, b"virt");
        let e = guest_error(h.handle(VcpuExit::MmioWrite(DEVICE_WINDOW_GPA + 0x4, &[1, 0, 0, 0])));
        assert_eq!(
            e.to_string(),
            format!(
                "virtio device register at {:#x}: write of 4 byte(s) at register offset 0x4",
                DEVICE_WINDOW_GPA + 4
            )
        );
        let e = guest_error(h.handle(VcpuExit::MmioRead(DEVICE_WINDOW_GPA + 0x1000, &mut data)));
        assert!(matches!(e, GuestError::UnknownMmio { .. }), "no device in the next window");
    }

    #[test]
    fn checkpoint_reports_a_checked_io_table_location() {
        let mem = memory();
        let mut out = Vec::new();
        let call = |len: usize| Hypercall::Checkpoint { len }.encode();
        let (port, arg) = call(0);
        assert!(matches!(
            handle(&mem, &mut out, VcpuExit::IoOut(port, &arg.to_le_bytes())),
            Ok(ExitAction::Checkpoint(None))
        ));
        let inside = IoTableLocation { gpa: 0x2000, len: 0x800 };
        mem.write_slice(&inside.encode(), GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let (port, arg) = call(IoTableLocation::LEN);
        let action = handle(&mem, &mut out, VcpuExit::IoOut(port, &arg.to_le_bytes())).unwrap();
        assert!(matches!(action, ExitAction::Checkpoint(Some(l)) if l == inside));
        let outside = IoTableLocation { gpa: 0x3f00, len: 0x800 };
        mem.write_slice(&outside.encode(), GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(port, &arg.to_le_bytes())));
        assert!(matches!(e, GuestError::IoTableLocation { len: 16 }));
        let (port, arg) = call(3);
        let e = guest_error(handle(&mem, &mut out, VcpuExit::IoOut(port, &arg.to_le_bytes())));
        assert!(matches!(e, GuestError::IoTableLocation { len: 3 }));
    }

    #[test]
    fn working_set_calls_page_through_the_offered_runs() {
        use abi::workingset::{RUNS_PER_CALL, decode};
        let mem = memory();
        let mut out = Vec::new();
        let runs: Vec<Run> =
            (0..RUNS_PER_CALL as u64 + 1).map(|i| Run { start: i << 13, pages: 1, written: i % 2 == 0 }).collect();
        let mut devices = Devices::default();
        let mut mailbox = Mailbox::default();
        let mut h = ExitHandler::new(&mem, &mut devices, &runs, &mut out, &mut mailbox);
        let mut fetch = |first: u32| {
            let (port, arg) = Hypercall::WorkingSet { first }.encode();
            assert!(matches!(h.handle(VcpuExit::IoOut(port, &arg.to_le_bytes())).unwrap(), ExitAction::Continue));
            let mut count = [0u8; 4];
            mem.read_slice(&mut count, GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
            let mut page = vec![0u8; 8 + u32::from_le_bytes(count) as usize * abi::workingset::RUN_LEN];
            mem.read_slice(&mut page, GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
            decode(&page[8..]).unwrap()
        };
        assert_eq!(fetch(0), runs[..RUNS_PER_CALL]);
        assert_eq!(fetch(RUNS_PER_CALL as u32), runs[RUNS_PER_CALL..]);
        assert!(fetch(u32::MAX).is_empty(), "a first run past the end gets none, not an error");
    }

    #[test]
    fn a_serving_mailbox_parks_on_an_empty_queue_and_stops_after_each_response() {
        use abi::invoke::{NextRequest, Range, Response};
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut out = Vec::new();
        let mut devices = Devices::default();
        let mut mailbox = Mailbox::parking();
        let mut h = ExitHandler::new(&mem, &mut devices, &[], &mut out, &mut mailbox);
        let next = NextRequest { buffer_gpa: 0x8000, capacity: 64 }.encode();
        mem.write_slice(&next, GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let (port, len) = Hypercall::InvokeNext { len: next.len() }.encode();
        let action = h.handle(VcpuExit::IoOut(port, &len.to_le_bytes())).unwrap();
        assert!(matches!(action, ExitAction::Stop(Outcome::Parked)));
        h.mailbox.deliver(&mem, b"req".to_vec()).unwrap();
        let response = Response {
            status: 0,
            exit_code: 0,
            stdout: Range::default(),
            stderr: Range::default(),
            message: Range::default(),
        }
        .encode();
        mem.write_slice(&response, GuestAddress(HYPERCALL_PAGE_GPA)).unwrap();
        let (port, len) = Hypercall::InvokeRespond { len: response.len() }.encode();
        let action = h.handle(VcpuExit::IoOut(port, &len.to_le_bytes())).unwrap();
        assert!(matches!(action, ExitAction::Stop(Outcome::Answered)));
        assert_eq!(h.mailbox.responses.len(), 1);
    }

    #[test]
    fn milestones_are_recorded_once() {
        let mem = memory();
        let mut out = Vec::new();
        let mut devices = Devices::default();
        let mut mailbox = Mailbox::default();
        let mut h = ExitHandler::new(&mem, &mut devices, &[], &mut out, &mut mailbox);
        let (port, value) = Hypercall::Milestone(Milestone::Ring3Entered).encode();
        h.handle(VcpuExit::IoOut(port, &arg(value))).unwrap();
        let first = h.milestone(Milestone::Ring3Entered).unwrap();
        h.handle(VcpuExit::IoOut(port, &arg(value))).unwrap();
        assert_eq!(h.milestone(Milestone::Ring3Entered), Some(first));
        assert_eq!(h.milestone(Milestone::Ready), None);
    }
}
