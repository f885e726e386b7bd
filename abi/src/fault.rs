//! The report a guest sends when it takes a CPU exception.
//!
//! Exceptions are fatal in thaw's guest: its ring-0 handlers fill a [`FaultReport`] and end the
//! VM. Under thaw the report travels through the hypercall page in its binary encoding
//! ([`FaultReport::encode`]); under QEMU it is printed on the serial line after
//! [`FAULT_MARKER`](crate::qemu::FAULT_MARKER) in its text encoding ([`FaultReport::write_text`]).
//! Both sides render it with the same [`Display`](core::fmt::Display), so a fault reads the same
//! under both hypervisors.

use core::fmt;

/// Encoded size of a [`FaultReport`]: eight little-endian u64 values.
pub const FAULT_REPORT_LEN: usize = 64;

/// The CPU state at a fatal exception, as the exception handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultReport {
    /// The exception vector (0-31).
    pub vector: u64,
    /// The error code the CPU pushed, or 0 for vectors without one.
    pub error_code: u64,
    /// The faulting instruction's address.
    pub rip: u64,
    /// The code segment selector at the fault; its low two bits are the privilege level.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// The stack pointer at the fault.
    pub rsp: u64,
    /// The stack segment selector at the fault.
    pub ss: u64,
    /// CR2: the faulting linear address of a page fault.
    pub cr2: u64,
}

/// Field names of the text encoding, in binary-encoding order.
const FIELDS: [&str; 8] = ["vector", "error", "rip", "cs", "rflags", "rsp", "ss", "cr2"];

impl FaultReport {
    fn fields(&self) -> [u64; 8] {
        [self.vector, self.error_code, self.rip, self.cs, self.rflags, self.rsp, self.ss, self.cr2]
    }

    fn from_fields(f: [u64; 8]) -> Self {
        Self { vector: f[0], error_code: f[1], rip: f[2], cs: f[3], rflags: f[4], rsp: f[5], ss: f[6], cr2: f[7] }
    }

    /// The binary encoding sent through the hypercall page.
    pub fn encode(&self) -> [u8; FAULT_REPORT_LEN] {
        let mut out = [0; FAULT_REPORT_LEN];
        for (chunk, value) in out.as_chunks_mut::<8>().0.iter_mut().zip(self.fields()) {
            *chunk = value.to_le_bytes();
        }
        out
    }

    /// Decodes the binary encoding; `None` unless `bytes` is exactly [`FAULT_REPORT_LEN`] long.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != FAULT_REPORT_LEN {
            return None;
        }
        let mut fields = [0; 8];
        for (value, chunk) in fields.iter_mut().zip(bytes.as_chunks::<8>().0) {
            *value = u64::from_le_bytes(*chunk);
        }
        Some(Self::from_fields(fields))
    }

    /// Writes the text encoding: `vector=0xe error=0x6 rip=0x... ...` on one line.
    pub fn write_text(&self, w: &mut impl fmt::Write) -> fmt::Result {
        for (i, (name, value)) in FIELDS.iter().zip(self.fields()).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(w, "{sep}{name}={value:#x}")?;
        }
        Ok(())
    }

    /// Parses the text encoding written by [`write_text`](Self::write_text).
    pub fn parse_text(text: &str) -> Option<Self> {
        let mut fields = [0; 8];
        let mut words = text.split_whitespace();
        for (value, name) in fields.iter_mut().zip(FIELDS) {
            let (key, hex) = words.next()?.split_once('=')?;
            if key != name {
                return None;
            }
            *value = u64::from_str_radix(hex.strip_prefix("0x")?, 16).ok()?;
        }
        words.next().is_none().then(|| Self::from_fields(fields))
    }

    /// The privilege level the faulting code ran at.
    pub fn ring(&self) -> u64 {
        self.cs & 3
    }
}

/// The mnemonic and name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range exceeded",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack-segment fault",
        13 => "#GP general protection fault",
        14 => "#PF page fault",
        16 => "#MF x87 floating-point error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating-point error",
        20 => "#VE virtualization exception",
        21 => "#CP control protection",
        _ => "reserved exception",
    }
}

impl fmt::Display for FaultReport {
    /// One line naming the exception, where it happened and why. The stack pointer is left out
    /// because it depends on where the loader put the stack, which differs between hypervisors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (vector {}) in ring {} at rip {:#x}, error code {:#x}",
            exception_name(self.vector),
            self.vector,
            self.ring(),
            self.rip,
            self.error_code
        )?;
        if self.vector == 14 {
            write!(f, ", cr2 {:#x}", self.cr2)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::String;

    fn sample() -> FaultReport {
        FaultReport {
            vector: 14,
            error_code: 6,
            rip: 0x20_1234,
            cs: 0x23,
            rflags: 0x3002,
            rsp: 0x7000,
            ss: 0x1b,
            cr2: 0xbad_c0de_0000,
        }
    }

    #[test]
    fn binary_encoding_round_trips_and_is_golden() {
        let bytes = sample().encode();
        assert_eq!(&bytes[..16], &[14, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(FaultReport::decode(&bytes), Some(sample()));
        assert_eq!(FaultReport::decode(&bytes[..63]), None);
    }

    #[test]
    fn text_encoding_round_trips() {
        let mut text = String::new();
        sample().write_text(&mut text).unwrap();
        assert_eq!(FaultReport::parse_text(&text), Some(sample()));
        assert_eq!(FaultReport::parse_text("vector=0xe"), None);
        assert_eq!(FaultReport::parse_text(&(text + " extra=0x1")), None);
    }

    #[test]
    fn display_names_vector_ring_rip_and_cr2() {
        let line = std::format!("{}", sample());
        assert_eq!(line, "#PF page fault (vector 14) in ring 3 at rip 0x201234, error code 0x6, cr2 0xbadc0de0000");
    }
}
