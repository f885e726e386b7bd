//! How to run a VM: memory, timeout, requests, devices and their backends.

use std::time::Duration;

use abi::devices::DeviceKind;

use crate::virtio::Backends;

/// How to run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Wall-clock limit for the run, from the first `KVM_RUN`: a boot with its init, or one
    /// request.
    pub timeout: Duration,
    /// Wall-clock limit for readying a restored VM: resuming it from its checkpoint until it
    /// waits for its request ([`Instance::park`](crate::Instance::park)). A request's own limit
    /// may be far shorter than that takes.
    pub ready_timeout: Duration,
    /// Bytes to load as the kernel's ramdisk.
    pub ramdisk: Option<Vec<u8>>,
    /// Requests to hand the guest through the invoke mailbox, in order.
    pub requests: Vec<Vec<u8>>,
    /// Measure the VM's private memory before tearing it down (reads /proc/self/smaps).
    pub measure_memory: bool,
    /// The virtio devices a booted VM gets (a restored VM gets the image's).
    pub devices: Vec<DeviceKind>,
    /// What the devices attach to, when they first need it. A restored VM's block device reads
    /// the image's own data volume unless `backends.volume` names another.
    pub backends: Backends,
    /// Ask the guest to send the function's stderr and its log to the console device.
    pub console_log: bool,
    /// Attach every device backend before the guest runs, instead of on first use.
    pub eager_devices: bool,
    /// Where a restored VM's devices start in the device window, in register windows (0 puts
    /// them where a booted VM has them; anything else moves them, which the guest must follow).
    pub device_slot: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(10),
            ramdisk: None,
            requests: Vec::new(),
            measure_memory: false,
            devices: Vec::new(),
            backends: Backends::default(),
            console_log: false,
            eager_devices: false,
            device_slot: 0,
        }
    }
}
