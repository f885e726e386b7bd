//! Virtio devices: how the VMM tells the guest where its devices are, and the transport state a
//! snapshot keeps for each of them.
//!
//! Devices are virtio-mmio (version 2) register windows inside [`DEVICE_WINDOW_GPA`], a range
//! of guest-physical addresses above any guest RAM that thaw's direct boot maps (identity,
//! user-accessible) into every guest. Inside it the VMM places each device wherever it likes and
//! lists them in the device table, written at [`DEVICE_TABLE_GPA`] before the first run and again
//! before a restored VM runs. A device is named by ([`DeviceKind`], index); the guest looks its
//! devices up by name, never by address, so an image restores under a VMM that places them
//! elsewhere.
//!
//! ```text
//! device table (at DEVICE_TABLE_GPA)
//!   offset  size  field
//!   0       4     magic "THDV"
//!   4       4     entry count (0..=MAX_DEVICES)
//!   8       16*n  entries: kind u16, index u16, reserved u32, register window address u64
//! ```
//!
//! A snapshot stores each device's transport state ([`DeviceState`]) in the image's VM-state
//! section, but never its backend: the VMM attaches the backend on the first queue notification
//! that needs it.

use alloc::vec::Vec;
use core::fmt;

use crate::codec::{u16_at, u32_at, u64_at};

/// Guest-physical start of the device window.
pub const DEVICE_WINDOW_GPA: u64 = 0x10_0000_0000;
/// Size of the device window: one 2 MiB page, room for 512 register windows.
pub const DEVICE_WINDOW_LEN: u64 = 0x20_0000;
/// Size of one device's register window.
pub const REGISTER_WINDOW_LEN: u64 = 0x1000;
/// Guest-physical address of the device table (the second half of the host parameters page).
pub const DEVICE_TABLE_GPA: u64 = crate::params::HOST_PARAMS_GPA + 0x800;
/// `"THDV"`: marks a written device table.
pub const TABLE_MAGIC: u32 = u32::from_le_bytes(*b"THDV");
/// Most devices one VM may have.
pub const MAX_DEVICES: usize = 16;
/// Most queues one device may have.
pub const MAX_QUEUES: usize = 8;
/// Largest queue size any device offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// vsock addressing and thaw's one addition to the virtio-vsock protocol.
pub mod vsock {
    /// The host's CID: guest connections to it reach the host's services.
    pub const HOST_CID: u64 = 2;
    /// The CID every thaw guest has (each VM has its own device, so they need not differ).
    pub const GUEST_CID: u64 = 3;
    /// A notification of this queue (the event queue, which thaw never otherwise uses) means
    /// "the driver is waiting for data": the VMM waits, a bounded time, for a host socket to
    /// become readable before it answers. thaw raises no interrupts, so a polling guest needs
    /// this to wait without spinning through exits.
    pub const WAIT_QUEUE: u16 = 2;
    /// How long the VMM waits on one [`WAIT_QUEUE`] notification, in milliseconds.
    pub const WAIT_MS: u32 = 10;
}

/// What a device is. The discriminant is the virtio device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum DeviceKind {
    /// virtio-console: the guest log, and the function's stderr when the VMM asks for it.
    Console = 3,
    /// virtio-rng: entropy from the host.
    Entropy = 4,
    /// virtio-blk: a read-only data volume.
    Block = 2,
    /// virtio-vsock: guest-initiated connections to host services.
    Vsock = 19,
}

impl DeviceKind {
    /// Every kind.
    pub const ALL: [DeviceKind; 4] = [Self::Console, Self::Entropy, Self::Block, Self::Vsock];

    /// The kind with this virtio device ID.
    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == id)
    }

    /// The virtio device ID.
    pub fn virtio_id(self) -> u32 {
        self as u32
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Entropy => "entropy",
            Self::Block => "block",
            Self::Vsock => "vsock",
        }
    }

    /// The kind with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One row of the device table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEntry {
    /// What the device is.
    pub kind: DeviceKind,
    /// Which one of its kind (0 for the first).
    pub index: u16,
    /// Guest-physical address of its register window, inside the device window.
    pub gpa: u64,
}

/// The devices of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTable {
    /// The devices, in no particular order; (kind, index) pairs are unique.
    pub entries: Vec<DeviceEntry>,
}

/// What is wrong with a device table or a device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The table's magic is missing.
    #[error("device table magic {0:#010x} is not \"THDV\"")]
    BadMagic(u32),
    /// More entries than [`MAX_DEVICES`], or more than fit the bytes given.
    #[error("device table claims {0} entries, more than {MAX_DEVICES} or than it holds")]
    Count(u32),
    /// An entry's kind is not a device thaw knows.
    #[error("device kind {0} is not one thaw knows")]
    UnknownKind(u16),
    /// Two entries share a (kind, index).
    #[error("device {0} {1} appears twice")]
    Duplicate(DeviceKind, u16),
    /// A register window outside the device window or not page-aligned.
    #[error(
        "device {0} {1} at {2:#x}: not a page-aligned window inside {DEVICE_WINDOW_GPA:#x}..{end:#x}",
        end = DEVICE_WINDOW_GPA + DEVICE_WINDOW_LEN
    )]
    Address(DeviceKind, u16, u64),
    /// Saved device state that is malformed.
    #[error("saved device state: {0} is {1:#x}")]
    State(&'static str, u64),
}

impl DeviceTable {
    /// Bytes the encoding of `n` entries takes.
    pub const fn encoded_len(n: usize) -> usize {
        8 + 16 * n
    }

    /// The device named (kind, index), if present.
    pub fn find(&self, kind: DeviceKind, index: u16) -> Option<&DeviceEntry> {
        self.entries.iter().find(|e| e.kind == kind && e.index == index)
    }

    /// Checks what [`decode`](Self::decode) checks, for a table about to be written.
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.entries.len() > MAX_DEVICES {
            return Err(DeviceError::Count(self.entries.len() as u32));
        }
        for (i, e) in self.entries.iter().enumerate() {
            let inside = e.gpa >= DEVICE_WINDOW_GPA
                && e.gpa
                    .checked_add(REGISTER_WINDOW_LEN)
                    .is_some_and(|end| end <= DEVICE_WINDOW_GPA + DEVICE_WINDOW_LEN);
            if !inside || !e.gpa.is_multiple_of(REGISTER_WINDOW_LEN) {
                return Err(DeviceError::Address(e.kind, e.index, e.gpa));
            }
            if self.entries[..i].iter().any(|o| o.kind == e.kind && o.index == e.index) {
                return Err(DeviceError::Duplicate(e.kind, e.index));
            }
            if self.entries[..i].iter().any(|o| o.gpa == e.gpa) {
                return Err(DeviceError::Address(e.kind, e.index, e.gpa));
            }
        }
        Ok(())
    }

    /// The encoding described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::encoded_len(self.entries.len()));
        out.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.kind as u16).to_le_bytes());
            out.extend_from_slice(&e.index.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&e.gpa.to_le_bytes());
        }
        out
    }

    /// Decodes and validates a table.
    pub fn decode(b: &[u8]) -> Result<Self, DeviceError> {
        if b.len() < 8 {
            return Err(DeviceError::Count(0));
        }
        if u32_at(b, 0) != TABLE_MAGIC {
            return Err(DeviceError::BadMagic(u32_at(b, 0)));
        }
        let count = u32_at(b, 4);
        if count as usize > MAX_DEVICES || b.len() < Self::encoded_len(count as usize) {
            return Err(DeviceError::Count(count));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = 8 + 16 * i;
            let kind = u16::from_le_bytes([b[at], b[at + 1]]);
            let index = u16::from_le_bytes([b[at + 2], b[at + 3]]);
            let kind = DeviceKind::from_id(kind).ok_or(DeviceError::UnknownKind(kind))?;
            entries.push(DeviceEntry { kind, index, gpa: u64_at(b, at + 8) });
        }
        let table = Self { entries };
        table.validate()?;
        Ok(table)
    }
}

/// One queue's transport state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    /// The size the driver chose (0 until it chose).
    pub size: u16,
    /// Whether the driver set QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available ring.
    pub avail: u64,
    /// Guest-physical address of the used ring.
    pub used: u64,
    /// The next available-ring index the device will read.
    pub next_avail: u16,
    /// The next used-ring index the device will write.
    pub next_used: u16,
}

/// One device's transport state, as a snapshot keeps it. No backend state: files, sockets and
/// sinks are reattached after a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Device ID ([`DeviceKind`] as u16).
    pub kind: u16,
    /// Which one of its kind.
    pub index: u16,
    /// The device status register.
    pub status: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The queue the driver last selected.
    pub queue_select: u32,
    /// Every queue, in index order (at most [`MAX_QUEUES`]).
    pub queues: Vec<QueueState>,
}

const QUEUE_STATE_LEN: usize = 32;
const DEVICE_STATE_HEADER: usize = 24;

impl DeviceState {
    /// Encodes a list of device states: count u32, reserved u32, then each device as kind u16,
    /// index u16, status u32, driver features u64, queue select u32, queue count u32, and per
    /// queue: size u16, ready u16, next avail u16, next used u16, desc u64, avail u64, used u64.
    pub fn encode_all(devices: &[DeviceState]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(devices.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for d in devices {
            out.extend_from_slice(&d.kind.to_le_bytes());
            out.extend_from_slice(&d.index.to_le_bytes());
            out.extend_from_slice(&d.status.to_le_bytes());
            out.extend_from_slice(&d.driver_features.to_le_bytes());
            out.extend_from_slice(&d.queue_select.to_le_bytes());
            out.extend_from_slice(&(d.queues.len() as u32).to_le_bytes());
            for q in &d.queues {
                out.extend_from_slice(&q.size.to_le_bytes());
                out.extend_from_slice(&u16::from(q.ready).to_le_bytes());
                out.extend_from_slice(&q.next_avail.to_le_bytes());
                out.extend_from_slice(&q.next_used.to_le_bytes());
                out.extend_from_slice(&q.desc.to_le_bytes());
                out.extend_from_slice(&q.avail.to_le_bytes());
                out.extend_from_slice(&q.used.to_le_bytes());
            }
        }
        out
    }

    /// Decodes [`encode_all`](Self::encode_all)'s output. Checks the framing and the field
    /// ranges that need no device knowledge; the VMM checks the rest against each device.
    pub fn decode_all(b: &[u8]) -> Result<Vec<DeviceState>, DeviceError> {
        let short = |at: usize| DeviceError::State("length (truncated at byte)", at as u64);
        if b.len() < 8 {
            return Err(short(b.len()));
        }
        let count = u32_at(b, 0);
        if count as usize > MAX_DEVICES {
            return Err(DeviceError::Count(count));
        }
        let mut at = 8;
        let mut devices = Vec::with_capacity(count as usize);
        for _ in 0..count {
            if b.len() < at + DEVICE_STATE_HEADER {
                return Err(short(b.len()));
            }
            let kind = u16::from_le_bytes([b[at], b[at + 1]]);
            let index = u16::from_le_bytes([b[at + 2], b[at + 3]]);
            if DeviceKind::from_id(kind).is_none() {
                return Err(DeviceError::UnknownKind(kind));
            }
            if devices.iter().any(|d: &DeviceState| d.kind == kind && d.index == index) {
                return Err(DeviceError::Duplicate(DeviceKind::from_id(kind).unwrap_or(DeviceKind::Console), index));
            }
            let queue_count = u32_at(b, at + 20) as usize;
            if queue_count > MAX_QUEUES {
                return Err(DeviceError::State("queue count", queue_count as u64));
            }
            let mut state = DeviceState {
                kind,
                index,
                status: u32_at(b, at + 4),
                driver_features: u64_at(b, at + 8),
                queue_select: u32_at(b, at + 16),
                queues: Vec::with_capacity(queue_count),
            };
            at += DEVICE_STATE_HEADER;
            if b.len() < at + queue_count * QUEUE_STATE_LEN {
                return Err(short(b.len()));
            }
            for _ in 0..queue_count {
                let ready = match u16_at(b, at + 2) {
                    0 => false,
                    1 => true,
                    other => return Err(DeviceError::State("queue ready flag", other.into())),
                };
                state.queues.push(QueueState {
                    size: u16_at(b, at),
                    ready,
                    next_avail: u16_at(b, at + 4),
                    next_used: u16_at(b, at + 6),
                    desc: u64_at(b, at + 8),
                    avail: u64_at(b, at + 16),
                    used: u64_at(b, at + 24),
                });
                at += QUEUE_STATE_LEN;
            }
            devices.push(state);
        }
        if at != b.len() {
            return Err(DeviceError::State("trailing bytes after the last device", (b.len() - at) as u64));
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn table() -> DeviceTable {
        DeviceTable {
            entries: vec![
                DeviceEntry { kind: DeviceKind::Console, index: 0, gpa: DEVICE_WINDOW_GPA },
                DeviceEntry { kind: DeviceKind::Vsock, index: 0, gpa: DEVICE_WINDOW_GPA + 0x3000 },
            ],
        }
    }

    #[test]
    fn table_round_trips_and_finds_by_name() {
        let t = table();
        let decoded = DeviceTable::decode(&t.encode()).unwrap();
        assert_eq!(decoded, t);
        assert_eq!(decoded.find(DeviceKind::Vsock, 0).unwrap().gpa, DEVICE_WINDOW_GPA + 0x3000);
        assert!(decoded.find(DeviceKind::Vsock, 1).is_none());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let good = table().encode();
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(DeviceTable::decode(&bad_magic), Err(DeviceError::BadMagic(_))));
        let mut too_many = good.clone();
        too_many[4..8].copy_from_slice(&17u32.to_le_bytes());
        assert_eq!(DeviceTable::decode(&too_many), Err(DeviceError::Count(17)));
        assert_eq!(DeviceTable::decode(&good[..good.len() - 1]), Err(DeviceError::Count(2)));
        let mut unknown = good.clone();
        unknown[8..10].copy_from_slice(&77u16.to_le_bytes());
        assert_eq!(DeviceTable::decode(&unknown), Err(DeviceError::UnknownKind(77)));
        for gpa in [0, DEVICE_WINDOW_GPA + 1, DEVICE_WINDOW_GPA + DEVICE_WINDOW_LEN, u64::MAX] {
            let mut t = table();
            t.entries[0].gpa = gpa;
            assert!(matches!(DeviceTable::decode(&t.encode()), Err(DeviceError::Address(..))), "{gpa:#x}");
        }
        let mut dup = table();
        dup.entries[1].kind = DeviceKind::Console;
        assert_eq!(DeviceTable::decode(&dup.encode()), Err(DeviceError::Duplicate(DeviceKind::Console, 0)));
        let mut same_window = table();
        same_window.entries[1].gpa = DEVICE_WINDOW_GPA;
        assert!(matches!(DeviceTable::decode(&same_window.encode()), Err(DeviceError::Address(..))));
    }

    fn states() -> Vec<DeviceState> {
        vec![
            DeviceState {
                kind: DeviceKind::Console as u16,
                index: 0,
                status: 0xf,
                driver_features: 1 << 32,
                queue_select: 1,
                queues: vec![
                    QueueState {
                        size: 64,
                        ready: true,
                        desc: 0x10000,
                        avail: 0x10400,
                        used: 0x11000,
                        next_avail: 3,
                        next_used: 3,
                    },
                    QueueState::default(),
                ],
            },
            DeviceState { kind: DeviceKind::Entropy as u16, index: 2, ..DeviceState::default() },
        ]
    }

    #[test]
    fn device_state_round_trips() {
        let s = states();
        assert_eq!(DeviceState::decode_all(&DeviceState::encode_all(&s)).unwrap(), s);
        assert_eq!(DeviceState::decode_all(&DeviceState::encode_all(&[])).unwrap(), vec![]);
    }

    #[test]
    fn truncated_or_malformed_device_state_is_refused() {
        let good = DeviceState::encode_all(&states());
        for cut in 0..good.len() {
            assert!(DeviceState::decode_all(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(DeviceState::decode_all(&extra).is_err());
        let mut ready = good.clone();
        ready[8 + DEVICE_STATE_HEADER + 2] = 7;
        assert_eq!(DeviceState::decode_all(&ready), Err(DeviceError::State("queue ready flag", 7)));
        let mut queues = good.clone();
        queues[8 + 20..8 + 24].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(DeviceState::decode_all(&queues), Err(DeviceError::State("queue count", 9)));
        let mut kind = good;
        kind[8..10].copy_from_slice(&5u16.to_le_bytes());
        assert_eq!(DeviceState::decode_all(&kind), Err(DeviceError::UnknownKind(5)));
    }

    #[test]
    fn every_device_error_message_is_pinned() {
        let cases: [(DeviceError, &str); 6] = [
            (DeviceError::BadMagic(0x1234_5678), r#"device table magic 0x12345678 is not "THDV""#),
            (DeviceError::Count(17), "device table claims 17 entries, more than 16 or than it holds"),
            (DeviceError::UnknownKind(5), "device kind 5 is not one thaw knows"),
            (DeviceError::Duplicate(DeviceKind::Block, 0), "device block 0 appears twice"),
            (
                DeviceError::Address(DeviceKind::Vsock, 1, 0x1234),
                "device vsock 1 at 0x1234: not a page-aligned window inside 0x1000000000..0x1000200000",
            ),
            (DeviceError::State("queue size", 0x1_0000), "saved device state: queue size is 0x10000"),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
