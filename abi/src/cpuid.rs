//! How a guest recognizes thaw's VMM: the hypervisor CPUID leaves it reports.

/// CPUID leaf holding the hypervisor signature in EBX, ECX, EDX (and the highest hypervisor
/// leaf in EAX), as KVM, Hyper-V and QEMU's TCG do.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// CPUID leaf whose EAX holds [`INTERFACE_VERSION`](crate::INTERFACE_VERSION).
pub const INTERFACE_LEAF: u32 = 0x4000_0001;
/// The 12-byte signature thaw's VMM reports in EBX, ECX, EDX of [`HYPERVISOR_LEAF`].
pub const SIGNATURE: [u8; 12] = *b"ThawThawThaw";

/// Splits [`SIGNATURE`] into the (EBX, ECX, EDX) values of the leaf.
pub const fn signature_registers() -> (u32, u32, u32) {
    let s = SIGNATURE;
    (
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    )
}

/// Reassembles a signature from the (EBX, ECX, EDX) values of the leaf.
pub fn signature_from_registers(ebx: u32, ecx: u32, edx: u32) -> [u8; 12] {
    let mut sig = [0; 12];
    sig[0..4].copy_from_slice(&ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&edx.to_le_bytes());
    sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_survives_the_register_split() {
        let (b, c, d) = signature_registers();
        assert_eq!(signature_from_registers(b, c, d), SIGNATURE);
    }
}
