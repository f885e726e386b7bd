//! The host parameters page: what the VMM tells the guest about the outside world before it runs.
//!
//! The VMM writes it at [`HOST_PARAMS_GPA`] before the first `KVM_RUN`, and writes a fresh one
//! into every VM restored from an image before it runs (the restore parameters). The guest seeds
//! its CSPRNG from the entropy and bases its WASI clocks on the wall-clock time and TSC
//! frequency, again after every restore, so no two clones share random state or a stale clock.

use crate::codec::{u32_at, u64_at, u128_at};

/// Guest-physical address of the page.
pub const HOST_PARAMS_GPA: u64 = 0x2000;
/// `"THPR"`: marks a written page.
pub const MAGIC: u32 = u32::from_le_bytes(*b"THPR");

/// [`HostParams::flags`]: send the function's stderr and the guest log to the virtio console
/// (when the VM has one) instead of the response and the log hypercall.
pub const FLAG_CONSOLE_LOG: u32 = 1 << 0;

/// A VM's instance id: 128 random bits from the host's getrandom for every VM restored from an
/// image, so that no two VMs share one, in one process, across processes or across hosts; 0 for
/// a cold-booted VM (whose init runs before any snapshot). Shown as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct InstanceId(pub u128);

impl core::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The page's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostParams {
    /// This VM's instance id.
    pub instance_id: InstanceId,
    /// 32 bytes from the host's getrandom, fresh for every VM.
    pub entropy: [u8; 32],
    /// Wall-clock time (nanoseconds since the Unix epoch) just before the guest was started.
    pub wall_clock_ns: u64,
    /// The guest TSC frequency in kHz, or 0 if the VMM does not know it.
    pub tsc_khz: u64,
    /// `FLAG_*` bits; unknown bits are ignored.
    pub flags: u32,
}

impl HostParams {
    /// Encoded size.
    pub const LEN: usize = 72;

    /// The encoding: magic, flags u32, entropy, wall clock, TSC kHz, the instance id's low 64
    /// bits, then its high 64 bits (appended in interface version 5: a guest that reads only
    /// the first 64 bytes sees the low half).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..40].copy_from_slice(&self.entropy);
        b[40..48].copy_from_slice(&self.wall_clock_ns.to_le_bytes());
        b[48..56].copy_from_slice(&self.tsc_khz.to_le_bytes());
        b[56..72].copy_from_slice(&self.instance_id.0.to_le_bytes());
        b
    }

    /// Decodes the page; `None` unless the magic is present.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::LEN || b[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let mut entropy = [0; 32];
        entropy.copy_from_slice(&b[8..40]);
        let instance_id = InstanceId(u128_at(b, 56));
        Some(Self { instance_id, entropy, wall_clock_ns: u64_at(b, 40), tsc_khz: u64_at(b, 48), flags: u32_at(b, 4) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_requires_the_magic() {
        let p = HostParams {
            instance_id: InstanceId(7 << 70 | 5),
            entropy: [9; 32],
            wall_clock_ns: 1_700_000_000_000_000_000,
            tsc_khz: 2_000_000,
            flags: FLAG_CONSOLE_LOG,
        };
        assert_eq!(HostParams::decode(&p.encode()), Some(p));
        assert_eq!(HostParams::decode(&[0; HostParams::LEN]), None);
        assert_eq!(HostParams::decode(&p.encode()[..64]), None, "too short");
        // A guest that reads the first 64 bytes (an image's guest from before the high half)
        // finds the low half where it always was.
        assert_eq!(p.encode()[56..64], 5u64.to_le_bytes());
        assert_eq!(alloc::format!("{}", p.instance_id), "00000000000001c00000000000000005");
    }

    #[test]
    fn the_page_layout_is_golden() {
        let p = HostParams {
            instance_id: InstanceId(0x0f << 64 | 0x0e),
            entropy: [0xee; 32],
            wall_clock_ns: 0x0a0b,
            tsc_khz: 0x0c0d,
            flags: FLAG_CONSOLE_LOG,
        };
        let mut golden = [0u8; HostParams::LEN];
        golden[0..4].copy_from_slice(b"THPR");
        golden[4] = 1;
        golden[8..40].fill(0xee);
        golden[40..42].copy_from_slice(&[0x0b, 0x0a]);
        golden[48..50].copy_from_slice(&[0x0d, 0x0c]);
        golden[56] = 0x0e;
        golden[64] = 0x0f;
        assert_eq!(p.encode(), golden);
    }
}
