//! virtio-rng: fills the guest's buffers from the host's getrandom.
//!
//! The backend is the kernel's CSPRNG, so attaching it opens nothing; it is still attached on
//! the first request, like every other backend, so the statistics say whether the guest used it.

use crate::memory::GuestRam;
use abi::devices::DeviceKind;

use super::queue::Queue;
use super::{DeviceError, DeviceModel};

/// Most bytes one request is given, however large its buffers.
const MAX_REQUEST: u64 = 64 << 10;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Entropy {
    attached: bool,
}

impl DeviceModel for Entropy {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Entropy
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[64]
    }

    fn notify(&mut self, index: u32, queues: &mut [Queue], mem: &GuestRam) -> Result<(), DeviceError> {
        let queue = super::queue(queues, index)?;
        while let Some(chain) = queue.pop(mem)? {
            self.attach()?;
            let mut bytes = vec![0u8; chain.writable_len().min(MAX_REQUEST) as usize];
            crate::host::entropy(&mut bytes)
                .map_err(|e| DeviceError::Backend { kind: DeviceKind::Entropy, reason: e.to_string() })?;
            let written = chain.write_all(mem, &bytes)?;
            queue.add_used(mem, chain.head, written)?;
        }
        Ok(())
    }

    fn attach(&mut self) -> Result<(), DeviceError> {
        self.attached = true;
        Ok(())
    }

    fn attached(&self) -> bool {
        self.attached
    }
}
