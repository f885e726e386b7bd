//! The virtio-mmio (version 2) register window of one device: feature negotiation, status,
//! queue setup and notification, and the device's configuration space.
//!
//! Every access comes from the guest and is checked: registers are 32-bit and aligned,
//! read-only registers refuse writes, queue setup is validated when the driver makes a queue
//! ready, and a restored transport state is validated against the device and guest memory
//! before the VM runs. Notifications are served synchronously, inside the exit that carries
//! them, so the used ring is up to date when the guest's store returns and the guest can poll
//! it: no interrupt is ever raised.

use crate::memory::GuestRam;
use abi::devices::{DeviceKind, DeviceState, MAX_QUEUES};

use super::queue::Queue;
use super::{DeviceError, DeviceModel};

/// "virt", the magic value register.
const MAGIC: u32 = 0x7472_6976;
/// Vendor ID: the ASCII bytes "thw" (little-endian).
const VENDOR_ID: u32 = 0x0077_6874;
/// VIRTIO_F_VERSION_1: every thaw device is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    /// The driver found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The driver knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One device: its register state, its queues and its model.
pub struct MmioDevice {
    /// The device model (console, entropy, ...), which owns the backend.
    pub model: Box<dyn DeviceModel>,
    /// Which one of its kind.
    pub index: u16,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    queue_select: u32,
    queues: Vec<Queue>,
}

impl MmioDevice {
    /// A device in its reset state.
    pub fn new(model: Box<dyn DeviceModel>, index: u16) -> Self {
        let queues = model.queue_max_sizes().iter().map(|&max| Queue::new(max)).collect();
        Self {
            model,
            index,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
        }
    }

    /// What the device is.
    pub fn kind(&self) -> DeviceKind {
        self.model.kind()
    }

    fn device_features(&self) -> u64 {
        self.model.features() | VIRTIO_F_VERSION_1
    }

    /// The driver wrote 0 to the status: back to the state after creation. The backend, if
    /// attached, stays attached.
    fn reset(&mut self) {
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            queue.state = Default::default();
        }
    }

    fn selected(&mut self) -> Result<&mut Queue, DeviceError> {
        let select = self.queue_select;
        self.queues.get_mut(select as usize).ok_or(DeviceError::NoSuchQueue(select))
    }

    /// The selected queue, which the driver may still configure (not ready).
    fn configurable(&mut self) -> Result<&mut Queue, DeviceError> {
        let select = self.queue_select;
        let queue = self.selected()?;
        if queue.state.ready {
            return Err(DeviceError::QueueLive(select));
        }
        Ok(queue)
    }

    /// Serves a read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if offset >= reg::CONFIG {
            let config = self.model.config();
            let start = (offset - reg::CONFIG) as usize;
            let bytes = config.get(start..start + data.len()).ok_or(DeviceError::Register {
                offset,
                size: data.len(),
                write: false,
            })?;
            data.copy_from_slice(bytes);
            return Ok(());
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return Err(DeviceError::Register { offset, size: data.len(), write: false });
        }
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.kind().virtio_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queues.get(self.queue_select as usize).map_or(0, |q| q.max_size.into()),
            reg::QUEUE_READY => self.queues.get(self.queue_select as usize).is_some_and(|q| q.state.ready).into(),
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            // No shared-memory regions: their length reads as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => return Err(DeviceError::Register { offset, size: 4, write: false }),
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    /// Serves a write at `offset`. Returns the queue to serve when the write was a notification.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestRam) -> Result<Option<u32>, DeviceError> {
        if data.len() != 4 || !offset.is_multiple_of(4) || offset >= reg::CONFIG {
            // The config spaces of thaw's devices are read-only.
            return Err(DeviceError::Register { offset, size: data.len(), write: true });
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let set_low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let set_high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => match self.driver_features_select {
                0 => self.driver_features = set_low(self.driver_features),
                1 => self.driver_features = set_high(self.driver_features),
                select => return Err(DeviceError::State("driver feature select", select.into())),
            },
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                let size = u16::try_from(value).map_err(|_| DeviceError::State("queue size", value.into()))?;
                self.configurable()?.state.size = size;
            }
            reg::QUEUE_DESC_LOW => {
                let q = self.configurable()?;
                q.state.desc = set_low(q.state.desc);
            }
            reg::QUEUE_DESC_HIGH => {
                let q = self.configurable()?;
                q.state.desc = set_high(q.state.desc);
            }
            reg::QUEUE_DRIVER_LOW => {
                let q = self.configurable()?;
                q.state.avail = set_low(q.state.avail);
            }
            reg::QUEUE_DRIVER_HIGH => {
                let q = self.configurable()?;
                q.state.avail = set_high(q.state.avail);
            }
            reg::QUEUE_DEVICE_LOW => {
                let q = self.configurable()?;
                q.state.used = set_low(q.state.used);
            }
            reg::QUEUE_DEVICE_HIGH => {
                let q = self.configurable()?;
                q.state.used = set_high(q.state.used);
            }
            reg::QUEUE_READY => {
                let queue = self.selected()?;
                match value {
                    0 => queue.state.ready = false,
                    1 => {
                        queue.validate(mem)?;
                        queue.state.ready = true;
                    }
                    other => return Err(DeviceError::State("queue ready", other.into())),
                }
            }
            reg::QUEUE_NOTIFY => {
                if value as usize >= self.queues.len() {
                    return Err(DeviceError::NoSuchQueue(value));
                }
                return Ok(Some(value));
            }
            reg::INTERRUPT_ACK | reg::SHM_SEL => {}
            reg::STATUS => self.set_status(value),
            _ => return Err(DeviceError::Register { offset, size: 4, write: true }),
        }
        Ok(None)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // Refuse the negotiation (leave FEATURES_OK clear, as the spec says) when the
            // driver accepted a feature that was not offered or is not a modern driver.
            let offered = self.device_features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                value &= !status::FEATURES_OK;
            }
        }
        self.status = value;
    }

    /// Serves a notification of `queue` (returned by [`write`](Self::write)).
    pub fn notify(&mut self, queue: u32, mem: &GuestRam) -> Result<(), DeviceError> {
        if self.status & status::DRIVER_OK == 0 {
            return Err(DeviceError::State("status at notification (DRIVER_OK is not set)", self.status.into()));
        }
        let q = self.queues.get_mut(queue as usize).ok_or(DeviceError::NoSuchQueue(queue))?;
        if !q.state.ready {
            return Err(DeviceError::Queue(super::queue::QueueError::NotReady));
        }
        self.model.notify(queue, &mut self.queues, mem)
    }

    /// The transport state a snapshot keeps.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            kind: self.kind() as u16,
            index: self.index,
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| q.state).collect(),
        }
    }

    /// Takes over a snapshot's transport state after checking it as the registers would have:
    /// the device's queue count, features that were offered, and every ready queue against the
    /// device's maximum size and guest memory.
    pub fn restore(&mut self, state: &DeviceState, mem: &GuestRam) -> Result<(), DeviceError> {
        if state.queues.len() != self.queues.len() || state.queues.len() > MAX_QUEUES {
            return Err(DeviceError::State("saved queue count", state.queues.len() as u64));
        }
        if state.driver_features & !self.device_features() != 0 {
            return Err(DeviceError::State("saved driver features", state.driver_features));
        }
        let known = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK | status::FEATURES_OK | status::FAILED;
        if state.status & !known != 0 {
            return Err(DeviceError::State("saved status", state.status.into()));
        }
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            queue.state = *saved;
            if saved.ready {
                queue.validate(mem)?;
            }
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::entropy::Entropy;
    use crate::virtio::queue::tests::{AVAIL, DATA, DESC, USED, descriptor, memory, offer};

    fn device() -> MmioDevice {
        MmioDevice::new(Box::new(Entropy::default()), 0)
    }

    fn read(d: &mut MmioDevice, offset: u64) -> u32 {
        let mut data = [0; 4];
        d.read(offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn write(d: &mut MmioDevice, mem: &GuestRam, offset: u64, value: u32) -> Result<Option<u32>, DeviceError> {
        d.write(offset, &value.to_le_bytes(), mem)
    }

    /// Drives the device through a driver's initialization, with queue 0 of `size` entries.
    fn initialize(d: &mut MmioDevice, mem: &GuestRam, size: u32) {
        write(d, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER).unwrap();
        write(d, mem, reg::DRIVER_FEATURES_SEL, 1).unwrap();
        write(d, mem, reg::DRIVER_FEATURES, 1).unwrap();
        write(d, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK).unwrap();
        write(d, mem, reg::QUEUE_SEL, 0).unwrap();
        write(d, mem, reg::QUEUE_NUM, size).unwrap();
        write(d, mem, reg::QUEUE_DESC_LOW, DESC as u32).unwrap();
        write(d, mem, reg::QUEUE_DRIVER_LOW, AVAIL as u32).unwrap();
        write(d, mem, reg::QUEUE_DEVICE_LOW, USED as u32).unwrap();
        write(d, mem, reg::QUEUE_READY, 1).unwrap();
        write(d, mem, reg::STATUS, 0xf).unwrap();
    }

    #[test]
    fn identifies_itself_and_negotiates_version_1() {
        let mem = memory();
        let mut d = device();
        assert_eq!(read(&mut d, reg::MAGIC), MAGIC);
        assert_eq!(read(&mut d, reg::VERSION), 2);
        assert_eq!(read(&mut d, reg::DEVICE_ID), 4);
        write(&mut d, &mem, reg::DEVICE_FEATURES_SEL, 1).unwrap();
        assert_eq!(read(&mut d, reg::DEVICE_FEATURES), 1);
        initialize(&mut d, &mem, 8);
        assert_eq!(read(&mut d, reg::STATUS), 0xf);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 1);
        write(&mut d, &mem, reg::STATUS, 0).unwrap();
        assert_eq!(read(&mut d, reg::STATUS), 0);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 0);
    }

    #[test]
    fn features_not_offered_are_refused_at_features_ok() {
        let mem = memory();
        let mut d = device();
        write(&mut d, &mem, reg::DRIVER_FEATURES, 1 << 28).unwrap();
        write(&mut d, &mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK).unwrap();
        assert_eq!(read(&mut d, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn register_accesses_out_of_range_or_misshapen_are_refused() {
        let mem = memory();
        let mut d = device();
        let mut byte = [0u8; 1];
        assert!(matches!(d.read(reg::MAGIC, &mut byte), Err(DeviceError::Register { .. })));
        let mut word = [0u8; 4];
        assert!(matches!(d.read(0x2, &mut word), Err(DeviceError::Register { .. })));
        assert!(matches!(d.read(0x0f0, &mut word), Err(DeviceError::Register { .. })));
        // Entropy has no config space: any config read is out of range.
        assert!(matches!(d.read(reg::CONFIG, &mut word), Err(DeviceError::Register { .. })));
        assert!(matches!(d.read(0xffc, &mut word), Err(DeviceError::Register { .. })));
        assert!(matches!(write(&mut d, &mem, reg::MAGIC, 1), Err(DeviceError::Register { write: true, .. })));
        assert!(matches!(write(&mut d, &mem, reg::CONFIG, 1), Err(DeviceError::Register { write: true, .. })));
        assert!(matches!(d.write(reg::STATUS, &[1, 2], &mem), Err(DeviceError::Register { .. })));
        write(&mut d, &mem, reg::QUEUE_SEL, 5).unwrap();
        assert_eq!(read(&mut d, reg::QUEUE_NUM_MAX), 0);
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_NUM, 8), Err(DeviceError::NoSuchQueue(5))));
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_NOTIFY, 5), Err(DeviceError::NoSuchQueue(5))));
    }

    #[test]
    fn a_queue_set_up_wrongly_is_refused_when_made_ready() {
        let mem = memory();
        let mut d = device();
        write(&mut d, &mem, reg::QUEUE_NUM, 1024).unwrap();
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_READY, 1), Err(DeviceError::Queue(_))));
        write(&mut d, &mem, reg::QUEUE_NUM, 8).unwrap();
        write(&mut d, &mem, reg::QUEUE_DESC_HIGH, 1).unwrap();
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_READY, 1), Err(DeviceError::Queue(_))));
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_NUM, 70_000), Err(DeviceError::State(..))));
    }

    #[test]
    fn notifications_fill_entropy_and_saved_state_restores() {
        let mem = memory();
        let mut d = device();
        assert!(matches!(d.notify(0, &mem), Err(DeviceError::State(..))), "before DRIVER_OK");
        initialize(&mut d, &mem, 8);
        assert!(matches!(write(&mut d, &mem, reg::QUEUE_NUM, 4), Err(DeviceError::QueueLive(_))));
        descriptor(&mem, 0, DATA, 32, 2, 0);
        offer(&mem, &[0]);
        assert_eq!(write(&mut d, &mem, reg::QUEUE_NOTIFY, 0).unwrap(), Some(0));
        assert!(!d.model.attached());
        d.notify(0, &mem).unwrap();
        assert!(d.model.attached());
        let mut random = [0u8; 32];
        vm_memory::Bytes::read_slice(&mem, &mut random, vm_memory::GuestAddress(DATA)).unwrap();
        assert_ne!(random, [0; 32]);

        let saved = d.state();
        let mut fresh = device();
        fresh.restore(&saved, &mem).unwrap();
        assert_eq!(fresh.state(), saved);
        assert!(!fresh.model.attached(), "a restore reattaches nothing");

        let small = crate::memory::GuestRam::from_ranges(&[(vm_memory::GuestAddress(0), 0x2000)]).unwrap();
        assert!(matches!(device().restore(&saved, &small), Err(DeviceError::Queue(_))));
        let mut too_big = saved.clone();
        too_big.queues[0].size = 512;
        assert!(matches!(device().restore(&too_big, &mem), Err(DeviceError::Queue(_))));
        let mut features = saved.clone();
        features.driver_features |= 1 << 40;
        assert!(matches!(device().restore(&features, &mem), Err(DeviceError::State(..))));
        let mut queues = saved;
        queues.queues.push(Default::default());
        assert!(matches!(device().restore(&queues, &mem), Err(DeviceError::State(..))));
    }
}
