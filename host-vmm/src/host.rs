//! What the host gives every VM, and what it opens once per process: the `/dev/kvm` handle and
//! thaw's CPUID table (built from `KVM_GET_SUPPORTED_CPUID` once, not per VM), fresh entropy
//! from the host's CSPRNG, and instance ids unique on this host.
//!
//! Opening `/dev/kvm` and asking for the supported CPUID cost about 300 µs together on the
//! project's machines, which is why no VM pays for them on the request path.

use std::sync::OnceLock;

use abi::params::InstanceId;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::cpu::thaw_cpuid;

/// Why the host could not give a VM what it needs.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/dev/kvm` could not be opened or queried.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// thaw's CPUID table could not be built.
    #[error("building the CPUID table: {0}")]
    Cpuid(String),
    /// getrandom failed.
    #[error("getrandom for the guest's entropy: {0}")]
    Entropy(std::io::Error),
}

/// The process's KVM handle and thaw's CPUID table, opened on first use.
pub struct KvmHost {
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The CPUID every vCPU gets ([`thaw_cpuid`] of the supported table).
    pub cpuid: CpuId,
    /// KVM can map guest memory ahead (`KVM_CAP_PRE_FAULT_MEMORY`: two-dimensional paging;
    /// never under PVM's shadow paging).
    pub pre_fault: bool,
    /// KVM takes registers in the vCPU's shared run structure, applied by the next `KVM_RUN`
    /// (`KVM_CAP_SYNC_REGS`), which saves the ioctls that would set them.
    pub sync_regs: bool,
    /// KVM leaves a page's dirty bit set, and the page writable, until told otherwise
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): a kept VM's pages, once written, stop faulting.
    pub manual_dirty_log: bool,
}

/// The process's KVM handle and CPUID table. The first call opens `/dev/kvm`; a failure is
/// not cached, so a later call tries again.
pub fn kvm() -> Result<&'static KvmHost, HostError> {
    static HOST: OnceLock<KvmHost> = OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let kvm = Kvm::new().map_err(|source| HostError::Kvm { op: "opening /dev/kvm", source })?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| HostError::Kvm { op: "KVM_GET_SUPPORTED_CPUID", source })?;
    let cpuid =
        CpuId::from_entries(&thaw_cpuid(supported.as_slice())).map_err(|e| HostError::Cpuid(format!("{e:?}")))?;
    let pre_fault = kvm.check_extension_raw(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY.into()) > 0;
    let sync_regs = kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
    // The capability answers with the flags it supports.
    let manual_flags = kvm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    let manual_dirty_log = (manual_flags & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32) != 0;
    Ok(HOST.get_or_init(|| KvmHost { kvm, cpuid, pre_fault, sync_regs, manual_dirty_log }))
}

/// The vCPUs' TSC frequency in kHz (0 if KVM does not say), asked of `vcpu` once per process:
/// thaw never scales a guest's TSC, so every vCPU runs at the host's rate. Each vCPU ioctl
/// costs a few microseconds of trapped MSR reads under nested virtualization
/// (docs/BENCHMARKS.md), and a kept VM would otherwise ask at every reset.
pub fn tsc_khz(vcpu: &kvm_ioctls::VcpuFd) -> u64 {
    static TSC_KHZ: OnceLock<u64> = OnceLock::new();
    *TSC_KHZ.get_or_init(|| vcpu.get_tsc_khz().map_or(0, u64::from))
}

/// Fills `buf` from the host's CSPRNG (getrandom), for a guest's entropy.
pub fn entropy(buf: &mut [u8]) -> Result<(), HostError> {
    getrandom::fill(buf).map_err(|e| HostError::Entropy(e.into()))
}

/// A restored VM's fresh randomness, drawn in one getrandom call: the guest's 32 bytes of
/// entropy and its instance id, 128 bits unique across processes and hosts (a process id and a
/// counter repeat in another PID namespace and after PID reuse).
pub fn entropy_and_instance_id() -> Result<([u8; 32], InstanceId), HostError> {
    let mut random = [0u8; 48];
    entropy(&mut random)?;
    let (mut seed, mut id) = ([0u8; 32], [0u8; 16]);
    seed.copy_from_slice(&random[..32]);
    id.copy_from_slice(&random[32..]);
    Ok((seed, InstanceId(u128::from_le_bytes(id))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_never_repeat_and_use_all_their_bits() {
        let ids: std::collections::BTreeSet<InstanceId> =
            (0..1000).map(|_| entropy_and_instance_id().unwrap().1).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().any(|id| id.0 >> 96 != 0), "the high bits are random too");
    }

    #[test]
    fn entropy_fills_the_whole_buffer() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        entropy(&mut a).unwrap();
        entropy(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }
}
