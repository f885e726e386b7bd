//! What the function's filesystem (`fs.rs`) needs from the kernel, in the guest: the data volume
//! on the virtio block device (`crate::devices`), the handles of open volume files in the I/O
//! reconnection table (`crate::iotable`), and the platform's wall clock.
//!
//! `fs.rs` is generic over these ([`fs::Volume`], [`fs::Handles`], [`fs::Clock`]) so that the
//! host can test it against fakes (`host-vmm/tests/guest_fs.rs`). This file only forwards to the
//! kernel's modules: it must never hold state or decide anything itself, or the host's tests
//! would no longer test what the guest runs.

use abi::iotable::{Handle, HandleKind};
use abi::volume::Directory;

use super::fs::{self, Errno, Files};
use crate::{devices, iotable, platform};

/// The function's filesystem as the guest runs it.
pub type GuestFiles = Files<BlockVolume, IoTable, platform::Clock>;

/// The data volume, read through the virtio block device.
#[derive(Debug, Clone, Copy)]
pub struct BlockVolume;

impl fs::Volume for BlockVolume {
    fn with_directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Option<R> {
        devices::with_volume(f)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> bool {
        devices::volume_read(offset, out)
    }

    fn ready(&self) -> bool {
        devices::block_ready()
    }
}

/// The kernel's I/O reconnection table, which every snapshot carries.
#[derive(Debug, Clone, Copy)]
pub struct IoTable;

impl fs::Handles for IoTable {
    fn open(&mut self, fd: u32, kind: HandleKind, offset: u64, port: u32, path: &str) -> bool {
        iotable::open(fd, kind, offset, port, path)
    }

    fn close(&mut self, fd: u32) {
        iotable::close(fd);
    }

    fn set_offset(&mut self, fd: u32, offset: u64) {
        iotable::set_offset(fd, offset);
    }

    fn reconnect(&mut self, fd: u32, step: impl FnOnce(&Handle) -> Result<(), Errno>) -> Result<(), Errno> {
        iotable::reconnect(fd, step)
    }
}

impl fs::Clock for platform::Clock {
    fn realtime_ns(&self) -> u64 {
        // The inherent method: TSC time since the host's wall-clock base.
        platform::Clock::realtime_ns(self)
    }
}
