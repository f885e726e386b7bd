//! Virtio devices over the MMIO transport, with backends attached lazily.
//!
//! A VM's [`Devices`] place each device's register window in the device window
//! (`abi::devices`), answer the guest's MMIO exits there, and serve queue notifications
//! synchronously: the guest polls its used rings, so no interrupt controller is needed and none
//! exists. A device's backend (the console's sink, the host's entropy source) is not opened
//! when the device is created or restored but on the first notification that needs it, so a
//! request that never touches a device pays nothing for it. [`DeviceStats`] record, per device,
//! whether and when its backend was attached and how many exits and notifications it served.
//!
//! A snapshot keeps each device's transport state ([`abi::devices::DeviceState`]), never its
//! backend; [`Devices::restore`] checks that state against the device and guest memory.

pub mod block;
pub mod console;
pub mod entropy;
pub mod mmio;
pub mod queue;
pub mod vsock;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use abi::devices::{
    DEVICE_WINDOW_GPA, DEVICE_WINDOW_LEN, DeviceEntry, DeviceKind, DeviceState, DeviceTable, MAX_DEVICES,
    REGISTER_WINDOW_LEN,
};

use self::mmio::MmioDevice;
use self::queue::{Queue, QueueError};

/// Queue `index` of `queues`.
fn queue(queues: &mut [Queue], index: u32) -> Result<&mut Queue, DeviceError> {
    queues.get_mut(index as usize).ok_or(DeviceError::NoSuchQueue(index))
}

/// What went wrong with a device. [`DeviceError::Backend`] is the host's problem; every other
/// variant is the guest's, and fails its VM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A register access at an offset, width or direction the transport does not allow.
    #[error("{} of {size} byte(s) at register offset {offset:#x}", if *.write { "write" } else { "read" })]
    Register {
        /// Offset in the register window.
        offset: u64,
        /// Access width.
        size: usize,
        /// True for a store.
        write: bool,
    },
    /// A queue index the device does not have.
    #[error("queue {0} does not exist")]
    NoSuchQueue(u32),
    /// Setup of a queue that is ready.
    #[error("queue {0} was changed while ready")]
    QueueLive(u32),
    /// A register value or saved field the device cannot take.
    #[error("{0} {1:#x} is not allowed")]
    State(&'static str, u64),
    /// A queue misused.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// More devices than the device window holds from their first slot.
    #[error(
        "{count} devices from slot {first_slot}: at most {MAX_DEVICES}, inside the {}-slot device window",
        DEVICE_WINDOW_LEN / REGISTER_WINDOW_LEN
    )]
    TooMany {
        /// How many were asked for.
        count: usize,
        /// The first slot.
        first_slot: u64,
    },
    /// The backend could not be attached or used (host side).
    #[error("{kind} backend: {reason}")]
    Backend {
        /// The device.
        kind: DeviceKind,
        /// What failed.
        reason: String,
    },
}

impl DeviceError {
    /// True when the guest caused it (its VM fails); false for host-side failures.
    pub fn is_guest_error(&self) -> bool {
        !matches!(self, Self::Backend { .. } | Self::TooMany { .. })
    }
}

/// A device model: what a console or entropy device does with its queues. The transport
/// ([`MmioDevice`]) does everything else.
pub trait DeviceModel: Send {
    /// What the device is.
    fn kind(&self) -> DeviceKind;
    /// Device-specific feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64 {
        0
    }
    /// The maximum size of each queue, one entry per queue.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// The configuration space.
    fn config(&self) -> &[u8] {
        &[]
    }
    /// Serves a notification of queue `index` (one of `queues`, which the transport checked is
    /// ready), attaching the backend first if it is needed.
    fn notify(&mut self, index: u32, queues: &mut [Queue], mem: &GuestRam) -> Result<(), DeviceError>;
    /// Attaches the backend now.
    fn attach(&mut self) -> Result<(), DeviceError>;
    /// Whether the backend is attached.
    fn attached(&self) -> bool;
}

/// Where the console's output goes once it is attached.
#[derive(Debug, Clone, Default)]
pub enum ConsoleSink {
    /// thaw's standard error.
    #[default]
    Stderr,
    /// A file, created (or appended to) on attach.
    File(PathBuf),
    /// A buffer in this process (for library users and tests).
    Buffer(Arc<Mutex<Vec<u8>>>),
}

/// The file a data volume is read from.
#[derive(Debug, Clone)]
pub enum VolumeFile {
    /// A file opened on attach (a bundle).
    Path(PathBuf),
    /// A file already open (an image, or a template's memfd), duplicated on attach.
    Open(Arc<std::fs::File>),
}

/// Where the data volume's bytes are: a region of a file.
#[derive(Debug, Clone)]
pub struct VolumeSource {
    /// The file.
    pub file: VolumeFile,
    /// Where the volume starts in it.
    pub offset: u64,
    /// The volume's length (a multiple of 512).
    pub len: u64,
}

/// The host resources devices attach to. Nothing here is opened until a device needs it.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// The console's sink.
    pub console: ConsoleSink,
    /// The block device's volume.
    pub volume: Option<VolumeSource>,
    /// The host services vsock connections reach.
    pub services: vsock::Services,
}

fn model(kind: DeviceKind, backends: &Backends) -> Result<Box<dyn DeviceModel>, DeviceError> {
    match kind {
        DeviceKind::Console => Ok(Box::new(console::Console::new(backends.console.clone()))),
        DeviceKind::Entropy => Ok(Box::new(entropy::Entropy::default())),
        DeviceKind::Block => Ok(Box::new(block::Block::new(backends.volume.clone()))),
        DeviceKind::Vsock => Ok(Box::new(vsock::Vsock::new(backends.services.clone()))),
    }
}

/// Per-device counters (the `devices` of `thaw invoke --json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStats {
    /// What the device is.
    pub kind: DeviceKind,
    /// Which one of its kind.
    pub index: u16,
    /// When its backend was attached, measured from the start of the run; `None` if never.
    pub attached_after: Option<Duration>,
    /// MMIO exits the device served in this run.
    pub exits: u64,
    /// Queue notifications among them.
    pub notifications: u64,
}

struct Slot {
    gpa: u64,
    device: MmioDevice,
    stats: DeviceStats,
}

/// The devices of one VM, each at its register window. Counters and attach times run from
/// the devices' creation (or restore).
#[derive(Default)]
pub struct Devices {
    slots: Vec<Slot>,
    epoch: Option<Instant>,
}

impl Devices {
    /// Creates `kinds` in their reset state, numbered per kind in order, and places them one
    /// register window apart from the start of the device window.
    pub fn new(kinds: &[DeviceKind], backends: &Backends) -> Result<Self, DeviceError> {
        let mut named = Vec::new();
        for &kind in kinds {
            let index = named.iter().filter(|(k, _)| *k == kind).count() as u16;
            named.push((kind, index));
        }
        Self::place(&named, backends, 0)
    }

    /// Places the devices one register window apart, starting `first_slot` windows into the
    /// device window.
    fn place(named: &[(DeviceKind, u16)], backends: &Backends, first_slot: u64) -> Result<Self, DeviceError> {
        let slots_in_window = DEVICE_WINDOW_LEN / REGISTER_WINDOW_LEN;
        if named.len() > MAX_DEVICES || first_slot + named.len() as u64 > slots_in_window {
            return Err(DeviceError::TooMany { count: named.len(), first_slot });
        }
        let mut slots = Vec::new();
        for (i, &(kind, index)) in named.iter().enumerate() {
            let gpa = DEVICE_WINDOW_GPA + (first_slot + i as u64) * REGISTER_WINDOW_LEN;
            let stats = DeviceStats { kind, index, attached_after: None, exits: 0, notifications: 0 };
            slots.push(Slot { gpa, device: MmioDevice::new(model(kind, backends)?, index), stats });
        }
        Ok(Self { slots, epoch: Some(Instant::now()) })
    }

    /// Recreates the devices a snapshot saved, with `backends` (not attached), after checking
    /// each saved state against its device and `mem`. They are placed one register window
    /// apart from `first_slot` on (0: where the original VM had them); the guest finds them by
    /// name wherever they are.
    pub fn restore(
        states: &[DeviceState],
        backends: &Backends,
        mem: &GuestRam,
        first_slot: u64,
    ) -> Result<Self, DeviceError> {
        let mut named = Vec::new();
        for state in states {
            let kind =
                DeviceKind::from_id(state.kind).ok_or(DeviceError::State("saved device kind", state.kind.into()))?;
            named.push((kind, state.index));
        }
        let mut devices = Self::place(&named, backends, first_slot)?;
        for (slot, state) in devices.slots.iter_mut().zip(states) {
            slot.device.restore(state, mem)?;
        }
        Ok(devices)
    }

    /// The table the guest finds its devices in.
    pub fn table(&self) -> DeviceTable {
        let entries = self
            .slots
            .iter()
            .map(|s| DeviceEntry { kind: s.device.kind(), index: s.device.index, gpa: s.gpa })
            .collect();
        DeviceTable { entries }
    }

    /// Every device's transport state, for a snapshot.
    pub fn states(&self) -> Vec<DeviceState> {
        self.slots.iter().map(|s| s.device.state()).collect()
    }

    /// Attaches every backend now (`--eager-devices`).
    pub fn attach_all(&mut self) -> Result<(), DeviceError> {
        let epoch = *self.epoch.get_or_insert_with(Instant::now);
        for slot in &mut self.slots {
            if !slot.device.model.attached() {
                slot.device.model.attach()?;
                slot.stats.attached_after = Some(epoch.elapsed());
            }
        }
        Ok(())
    }

    /// The counters of every device.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.slots.iter().map(|s| s.stats.clone()).collect()
    }

    fn slot(&mut self, addr: u64) -> Option<(&mut Slot, u64)> {
        self.slots.iter_mut().find(|s| (s.gpa..s.gpa + REGISTER_WINDOW_LEN).contains(&addr)).map(|s| {
            let offset = addr - s.gpa;
            (s, offset)
        })
    }

    /// Serves a guest load at `addr`. `None` when no device is there.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Option<Result<(), DeviceError>> {
        let (slot, offset) = self.slot(addr)?;
        slot.stats.exits += 1;
        Some(slot.device.read(offset, data))
    }

    /// Serves a guest store at `addr`. `None` when no device is there.
    pub fn write(&mut self, addr: u64, data: &[u8], mem: &GuestRam) -> Option<Result<(), DeviceError>> {
        let epoch = self.epoch;
        let (slot, offset) = self.slot(addr)?;
        slot.stats.exits += 1;
        let result = slot.device.write(offset, data, mem).and_then(|notify| match notify {
            None => Ok(()),
            Some(queue) => {
                slot.stats.notifications += 1;
                let was_attached = slot.device.model.attached();
                let result = slot.device.notify(queue, mem);
                if !was_attached && slot.device.model.attached() {
                    slot.stats.attached_after = Some(epoch.map_or(Duration::ZERO, |e| e.elapsed()));
                }
                result
            }
        });
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::memory;

    #[test]
    fn places_devices_apart_and_names_them_per_kind() {
        let devices =
            Devices::new(&[DeviceKind::Console, DeviceKind::Entropy, DeviceKind::Entropy], &Backends::default())
                .unwrap();
        let table = devices.table();
        table.validate().unwrap();
        assert_eq!(table.find(DeviceKind::Entropy, 1).unwrap().gpa, DEVICE_WINDOW_GPA + 2 * REGISTER_WINDOW_LEN);
        assert!(Devices::new(&[DeviceKind::Entropy; MAX_DEVICES + 1], &Backends::default()).is_err());
    }

    #[test]
    fn accesses_between_devices_find_nothing_and_counters_count() {
        let mem = memory();
        let mut devices = Devices::new(&[DeviceKind::Entropy], &Backends::default()).unwrap();
        let mut data = [0u8; 4];
        assert!(devices.read(DEVICE_WINDOW_GPA + REGISTER_WINDOW_LEN, &mut data).is_none());
        devices.read(DEVICE_WINDOW_GPA, &mut data).unwrap().unwrap();
        assert_eq!(u32::from_le_bytes(data), 0x7472_6976);
        assert!(devices.write(DEVICE_WINDOW_GPA + 0x50, &0u32.to_le_bytes(), &mem).unwrap().is_err());
        let stats = &devices.stats()[0];
        assert_eq!((stats.exits, stats.notifications, stats.attached_after), (2, 1, None));
    }

    #[test]
    fn restore_refuses_unknown_kinds() {
        let mem = memory();
        let state = DeviceState { kind: 99, ..DeviceState::default() };
        assert!(Devices::restore(&[state], &Backends::default(), &mem, 0).is_err());
        let entropy =
            DeviceState { kind: DeviceKind::Entropy as u16, queues: vec![Default::default()], ..Default::default() };
        let moved = Devices::restore(std::slice::from_ref(&entropy), &Backends::default(), &mem, 7).unwrap();
        assert_eq!(moved.table().entries[0].gpa, DEVICE_WINDOW_GPA + 7 * REGISTER_WINDOW_LEN);
        assert!(Devices::restore(&[entropy], &Backends::default(), &mem, 512).is_err());
    }
}
