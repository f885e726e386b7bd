//! A split virtqueue, seen from the device side, over guest memory the guest controls.
//!
//! Everything here is read from or written to guest memory through vm-memory's checked API, and
//! every guest-supplied value is checked before it is used: the queue size against the
//! device's maximum, the ring addresses against guest memory and their alignment, each
//! descriptor's buffer against guest memory, descriptor chains against loops (a chain may not
//! be longer than the queue), and the available index against running ahead of the queue. A
//! violation is a [`QueueError`], which fails the guest's VM and nothing else.
//!
//! thaw's devices offer neither indirect descriptors nor event-index notification, so neither
//! appears here. The driver polls the used ring: no interrupt is ever raised.

use crate::memory::GuestRam;
use abi::devices::QueueState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Descriptor flag: the chain continues at `next`.
const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect table (not offered, so refused).
const DESC_F_INDIRECT: u16 = 4;

/// A queue the guest set up wrongly, or a chain it built wrongly.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The size is 0, not a power of two, or above the device's maximum.
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    Size {
        /// The size the guest chose.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// A ring is misaligned or not inside guest memory.
    #[error("{ring} at {addr:#x} ({len} bytes) is misaligned or outside guest memory")]
    Ring {
        /// Which ring.
        ring: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Its length for this queue size.
        len: u64,
    },
    /// The driver notified a queue that is not ready.
    #[error("notification for a queue that is not ready")]
    NotReady,
    /// The available index moved further than the queue holds.
    #[error("available index {avail} is {ahead} entries ahead of the device's {next}, more than the queue size {size}")]
    AvailAhead {
        /// The guest's available index.
        avail: u16,
        /// The device's next index.
        next: u16,
        /// How far ahead.
        ahead: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor index at or past the queue size.
    #[error("descriptor index {index} is outside the queue (size {size})")]
    DescriptorIndex {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain longer than the queue: it loops.
    #[error("descriptor chain starting at {head} is longer than the queue size {size}: it loops")]
    ChainLoop {
        /// The chain's head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's buffer is not inside guest memory.
    #[error("descriptor buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    Buffer {
        /// The buffer's guest-physical address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// An indirect descriptor, which thaw's devices do not offer.
    #[error("indirect descriptor {index}: the feature was not offered")]
    Indirect {
        /// The descriptor index.
        index: u16,
    },
    /// A readable buffer after a writable one, against the virtio rules.
    #[error("descriptor chain starting at {head} has a device-readable buffer after a writable one")]
    Order {
        /// The chain's head.
        head: u16,
    },
    /// Guest memory could not be accessed although the range was checked.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address, checked to lie in guest memory with `len` bytes.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True when the device writes it (false: the device reads it).
    pub writable: bool,
}

/// A descriptor chain taken from the available ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor's index, returned in the used ring.
    pub head: u16,
    /// The buffers, readable ones first.
    pub descriptors: Vec<Descriptor>,
}

impl Chain {
    /// Everything the device may read, concatenated, up to `limit` bytes.
    pub fn read_all(&self, mem: &GuestRam, limit: usize) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::new();
        for d in self.descriptors.iter().filter(|d| !d.writable) {
            let take = (d.len as usize).min(limit - out.len());
            let start = out.len();
            out.resize(start + take, 0);
            mem.read_slice(&mut out[start..], GuestAddress(d.addr)).map_err(|_| QueueError::Memory(d.addr))?;
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.descriptors.iter().filter(|d| d.writable).map(|d| u64::from(d.len)).sum()
    }

    /// Writes `bytes` into the writable buffers in order; returns how many fit.
    pub fn write_all(&self, mem: &GuestRam, bytes: &[u8]) -> Result<u32, QueueError> {
        self.write_at(mem, 0, bytes)
    }

    /// Writes `bytes` into the writable buffers, starting `offset` bytes into them; returns how
    /// many fit.
    pub fn write_at(&self, mem: &GuestRam, mut offset: u64, mut bytes: &[u8]) -> Result<u32, QueueError> {
        let mut written = 0u32;
        for d in self.descriptors.iter().filter(|d| d.writable) {
            if bytes.is_empty() {
                break;
            }
            if offset >= u64::from(d.len) {
                offset -= u64::from(d.len);
                continue;
            }
            let n = (d.len as usize - offset as usize).min(bytes.len());
            let at = d.addr + offset;
            mem.write_slice(&bytes[..n], GuestAddress(at)).map_err(|_| QueueError::Memory(at))?;
            offset = 0;
            bytes = &bytes[n..];
            written += n as u32;
        }
        Ok(written)
    }
}

/// A queue's transport state plus the device's maximum size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// The state the driver set and the device's ring positions.
    pub state: QueueState,
    /// The largest size the device accepts.
    pub max_size: u16,
}

impl Queue {
    /// A queue of at most `max_size` entries, not yet set up.
    pub fn new(max_size: u16) -> Self {
        Self { state: QueueState::default(), max_size }
    }

    /// Checks what the driver set: size and rings. Called when the driver makes the queue ready
    /// and for every ready queue a snapshot restores.
    pub fn validate(&self, mem: &GuestRam) -> Result<(), QueueError> {
        let size = self.state.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::Size { size, max: self.max_size });
        }
        let n = u64::from(size);
        // (ring, address, length for this size, alignment), as the virtio spec lays them out.
        for (ring, addr, len, align) in [
            ("descriptor table", self.state.desc, 16 * n, 16),
            ("available ring", self.state.avail, 6 + 2 * n, 2),
            ("used ring", self.state.used, 6 + 8 * n, 4),
        ] {
            if !addr.is_multiple_of(align) || !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(QueueError::Ring { ring, addr, len });
            }
        }
        Ok(())
    }

    fn read_u16(mem: &GuestRam, addr: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(addr)).map(u16::from_le).map_err(|_| QueueError::Memory(addr))
    }

    /// Takes the next available chain, or `None` when the driver has offered nothing new.
    pub fn pop(&mut self, mem: &GuestRam) -> Result<Option<Chain>, QueueError> {
        if !self.state.ready {
            return Err(QueueError::NotReady);
        }
        let size = self.state.size;
        let avail = Self::read_u16(mem, self.state.avail + 2)?;
        let ahead = avail.wrapping_sub(self.state.next_avail);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > size {
            return Err(QueueError::AvailAhead { avail, next: self.state.next_avail, ahead, size });
        }
        let slot = u64::from(self.state.next_avail % size);
        let head = Self::read_u16(mem, self.state.avail + 4 + 2 * slot)?;
        let chain = self.chain(mem, head)?;
        self.state.next_avail = self.state.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    fn chain(&self, mem: &GuestRam, head: u16) -> Result<Chain, QueueError> {
        let size = self.state.size;
        let mut descriptors = Vec::new();
        let mut index = head;
        loop {
            if index >= size {
                return Err(QueueError::DescriptorIndex { index, size });
            }
            if descriptors.len() == usize::from(size) {
                return Err(QueueError::ChainLoop { head, size });
            }
            let at = self.state.desc + 16 * u64::from(index);
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, GuestAddress(at)).map_err(|_| QueueError::Memory(at))?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { index });
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(QueueError::Buffer { addr, len });
            }
            let writable = flags & DESC_F_WRITE != 0;
            if !writable && descriptors.iter().any(|d: &Descriptor| d.writable) {
                return Err(QueueError::Order { head });
            }
            descriptors.push(Descriptor { addr, len, writable });
            if flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, descriptors });
            }
            index = next;
        }
    }

    /// Returns a chain to the driver with `len` bytes written, and publishes the new used index.
    pub fn add_used(&mut self, mem: &GuestRam, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.state.next_used % self.state.size);
        let entry = self.state.used + 4 + 8 * slot;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(entry)).map_err(|_| QueueError::Memory(entry))?;
        self.state.next_used = self.state.next_used.wrapping_add(1);
        let idx = self.state.used + 2;
        mem.write_obj(self.state.next_used.to_le(), GuestAddress(idx)).map_err(|_| QueueError::Memory(idx))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const DATA: u64 = 0x8000;

    /// 64 KiB of fake guest memory.
    pub fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    pub fn ready_queue(size: u16) -> Queue {
        let mut q = Queue::new(256);
        q.state = QueueState { size, ready: true, desc: DESC, avail: AVAIL, used: USED, ..QueueState::default() };
        q
    }

    /// Writes descriptor `index`.
    pub fn descriptor(mem: &GuestRam, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Offers `heads` in the available ring, starting at slot 0.
    pub fn offer(mem: &GuestRam, heads: &[u16]) {
        for (slot, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot as u64)).unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn pops_a_chain_and_returns_it_used() {
        let mem = memory();
        let mut q = ready_queue(8);
        q.validate(&mem).unwrap();
        mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
        descriptor(&mem, 0, DATA, 5, DESC_F_NEXT, 1);
        descriptor(&mem, 1, DATA + 0x100, 16, DESC_F_WRITE, 0);
        offer(&mem, &[0]);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.read_all(&mem, 64).unwrap(), b"hello");
        assert_eq!(chain.read_all(&mem, 3).unwrap(), b"hel");
        assert_eq!(chain.writable_len(), 16);
        assert_eq!(chain.write_all(&mem, b"0123456789abcdefXYZ").unwrap(), 16);
        q.add_used(&mem, chain.head, 16).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 16);
        assert_eq!(q.pop(&mem).unwrap(), None);
    }

    #[test]
    fn queue_size_above_the_maximum_or_not_a_power_of_two_is_refused() {
        let mem = memory();
        for size in [0, 3, 512, u16::MAX] {
            let q = ready_queue(size);
            assert!(matches!(q.validate(&mem), Err(QueueError::Size { .. })), "size {size}");
        }
    }

    #[test]
    fn rings_outside_guest_memory_or_misaligned_are_refused() {
        let mem = memory();
        let cases = [
            (0xfff0, AVAIL, USED),       // descriptor table runs past the end
            (DESC, 0x1_0000, USED),      // available ring starts past the end
            (DESC, AVAIL, 0xfffc),       // used ring past the end
            (DESC + 8, AVAIL, USED),     // misaligned descriptor table
            (DESC, AVAIL, USED + 2),     // misaligned used ring
            (u64::MAX - 7, AVAIL, USED), // wraps around
        ];
        for (desc, avail, used) in cases {
            let mut q = ready_queue(8);
            q.state.desc = desc;
            q.state.avail = avail;
            q.state.used = used;
            assert!(matches!(q.validate(&mem), Err(QueueError::Ring { .. })), "{desc:#x} {avail:#x} {used:#x}");
        }
    }

    #[test]
    fn descriptor_addresses_outside_guest_memory_are_refused() {
        let mem = memory();
        for (addr, len) in [(0x1_0000, 1), (0xffff, 2), (u64::MAX, 1), (0, u32::MAX)] {
            let mut q = ready_queue(8);
            descriptor(&mem, 0, addr, len, 0, 0);
            offer(&mem, &[0]);
            assert_eq!(q.pop(&mem), Err(QueueError::Buffer { addr, len }));
        }
    }

    #[test]
    fn looping_chains_are_refused() {
        let mem = memory();
        let mut q = ready_queue(4);
        descriptor(&mem, 0, DATA, 1, DESC_F_NEXT, 1);
        descriptor(&mem, 1, DATA, 1, DESC_F_NEXT, 0);
        offer(&mem, &[0]);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainLoop { head: 0, size: 4 }));
        let mut q = ready_queue(4);
        descriptor(&mem, 2, DATA, 1, DESC_F_NEXT, 2);
        offer(&mem, &[2]);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainLoop { head: 2, size: 4 }));
    }

    #[test]
    fn bad_indices_indirect_and_misordered_chains_are_refused() {
        let mem = memory();
        let mut q = ready_queue(4);
        offer(&mem, &[9]);
        assert_eq!(q.pop(&mem), Err(QueueError::DescriptorIndex { index: 9, size: 4 }));
        let mut q = ready_queue(4);
        descriptor(&mem, 0, DATA, 1, DESC_F_NEXT, 7);
        offer(&mem, &[0]);
        assert_eq!(q.pop(&mem), Err(QueueError::DescriptorIndex { index: 7, size: 4 }));
        let mut q = ready_queue(4);
        descriptor(&mem, 0, DATA, 16, DESC_F_INDIRECT, 0);
        offer(&mem, &[0]);
        assert_eq!(q.pop(&mem), Err(QueueError::Indirect { index: 0 }));
        let mut q = ready_queue(4);
        descriptor(&mem, 0, DATA, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        descriptor(&mem, 1, DATA, 1, 0, 0);
        offer(&mem, &[0]);
        assert_eq!(q.pop(&mem), Err(QueueError::Order { head: 0 }));
    }

    #[test]
    fn an_available_index_running_ahead_is_refused() {
        let mem = memory();
        let mut q = ready_queue(4);
        mem.write_obj(5u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(q.pop(&mem), Err(QueueError::AvailAhead { avail: 5, next: 0, ahead: 5, size: 4 }));
        let mut q = ready_queue(4);
        q.state.ready = false;
        assert_eq!(q.pop(&mem), Err(QueueError::NotReady));
    }

    #[test]
    fn a_used_ring_past_the_end_of_memory_fails_cleanly() {
        // A used ring that validated, then memory that cannot hold it (a restored queue checked
        // against a smaller VM): the write fails with an error instead of touching the host.
        let small = GuestRam::from_ranges(&[(GuestAddress(0), 0x3000)]).unwrap();
        let mut q = ready_queue(4);
        assert!(matches!(q.validate(&small), Err(QueueError::Ring { ring: "used ring", .. })));
        assert_eq!(q.add_used(&small, 0, 1), Err(QueueError::Memory(USED + 4)));
    }
}
