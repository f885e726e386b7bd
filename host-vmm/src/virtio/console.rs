//! virtio-console: the guest's log, and the function's stderr when the VMM asks for it, written
//! to a host sink in the order the guest sent it.
//!
//! Only the transmit queue does anything. The receive queue takes the driver's buffers and
//! keeps them, because thaw gives guests no console input; notifying it attaches nothing.

use std::io::Write;

use crate::memory::GuestRam;
use crate::output::OutputCap;
use abi::devices::DeviceKind;

use super::queue::Queue;
use super::{ConsoleSink, DeviceError, DeviceModel};

/// The port-0 receive queue.
const RECEIVEQ: u32 = 0;
/// Most bytes taken from one transmit chain.
const MAX_CHAIN: usize = 64 << 10;

/// The console device.
pub struct Console {
    sink: ConsoleSink,
    attached: Option<Box<dyn Write + Send>>,
    /// What this device has written so far, capped ([`OutputCap`]).
    cap: OutputCap,
}

impl Console {
    /// A console that will write to `sink` once attached.
    pub fn new(sink: ConsoleSink) -> Self {
        Self { sink, attached: None, cap: OutputCap::default() }
    }
}

/// Appends to a shared buffer.
struct BufferWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("console buffer lock poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DeviceModel for Console {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Console
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[64, 64]
    }

    fn notify(&mut self, index: u32, queues: &mut [Queue], mem: &GuestRam) -> Result<(), DeviceError> {
        if index == RECEIVEQ {
            return Ok(());
        }
        let queue = super::queue(queues, index)?;
        while let Some(chain) = queue.pop(mem)? {
            let bytes = chain.read_all(mem, MAX_CHAIN)?;
            self.attach()?;
            if let Some(sink) = self.attached.as_mut() {
                self.cap
                    .write(sink, &bytes, "console")
                    .map_err(|e| DeviceError::Backend { kind: DeviceKind::Console, reason: e.to_string() })?;
            }
            queue.add_used(mem, chain.head, 0)?;
        }
        Ok(())
    }

    fn attach(&mut self) -> Result<(), DeviceError> {
        if self.attached.is_some() {
            return Ok(());
        }
        let sink: Box<dyn Write + Send> = match &self.sink {
            ConsoleSink::Stderr => Box::new(std::io::stderr()),
            ConsoleSink::File(path) => Box::new(crate::files::open_output(path, true).map_err(|e| {
                DeviceError::Backend { kind: DeviceKind::Console, reason: format!("{}: {e}", path.display()) }
            })?),
            ConsoleSink::Buffer(buffer) => Box::new(BufferWriter(buffer.clone())),
        };
        self.attached = Some(sink);
        Ok(())
    }

    fn attached(&self) -> bool {
        self.attached.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{DATA, descriptor, memory, offer, ready_queue};
    use std::sync::{Arc, Mutex};

    #[test]
    fn transmits_in_order_and_attaches_once_on_first_output() {
        let mem = memory();
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let mut console = Console::new(ConsoleSink::Buffer(buffer.clone()));
        let mut queues = [ready_queue(8), ready_queue(8)];
        offer(&mem, &[]);
        console.notify(RECEIVEQ, &mut queues, &mem).unwrap();
        assert!(!console.attached(), "receive buffers need no backend");

        vm_memory::Bytes::write_slice(&mem, b"one\ntwo\n", vm_memory::GuestAddress(DATA)).unwrap();
        descriptor(&mem, 0, DATA, 4, 0, 0);
        descriptor(&mem, 1, DATA + 4, 4, 0, 0);
        offer(&mem, &[0, 1]);
        console.notify(1, &mut queues, &mem).unwrap();
        assert!(console.attached());
        assert_eq!(buffer.lock().unwrap().as_slice(), b"one\ntwo\n");
    }

    /// Issue 14, defect 4: the console's capture grew without end.
    #[test]
    fn console_output_is_capped_per_device_and_the_drop_is_said() {
        use crate::output::MAX_GUEST_OUTPUT;
        let mem = memory();
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let mut console = Console::new(ConsoleSink::Buffer(buffer.clone()));
        let mut queues = [ready_queue(8), ready_queue(8)];
        vm_memory::Bytes::write_slice(&mem, &[b'z'; 4096], vm_memory::GuestAddress(DATA)).unwrap();
        descriptor(&mem, 0, DATA, 4096, 0, 0);
        for round in 0..2 * MAX_GUEST_OUTPUT / 4096 {
            // Offer descriptor 0 again in the next slot of the available ring.
            let avail = crate::virtio::queue::tests::AVAIL;
            vm_memory::Bytes::write_obj(&mem, 0u16, vm_memory::GuestAddress(avail + 4 + 2 * (round as u64 % 8)))
                .unwrap();
            vm_memory::Bytes::write_obj(&mem, (round + 1) as u16, vm_memory::GuestAddress(avail + 2)).unwrap();
            console.notify(1, &mut queues, &mem).unwrap();
        }
        let notice = format!("\n[thaw: the guest's console passed {MAX_GUEST_OUTPUT} bytes; the rest is dropped]\n");
        let kept = buffer.lock().unwrap();
        assert_eq!(kept.len(), MAX_GUEST_OUTPUT + notice.len());
        assert!(kept.ends_with(notice.as_bytes()));
    }

    #[test]
    fn an_unopenable_sink_is_a_backend_error() {
        let mut console = Console::new(ConsoleSink::File("/nonexistent-dir/console.log".into()));
        let error = console.attach().unwrap_err();
        assert!(!error.is_guest_error());
        assert!(error.to_string().contains("/nonexistent-dir/console.log"), "{error}");
    }
}
