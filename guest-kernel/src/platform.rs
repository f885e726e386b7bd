//! Which hypervisor the kernel runs under, and the few operations that differ between them.
//!
//! | operation | under thaw | elsewhere (QEMU) |
//! |---|---|---|
//! | log output (`console.rs`) | log hypercall | COM1 |
//! | exit | exit hypercall | `isa-debug-exit` |
//! | panic, fault | panic / fault-report hypercall | marker line on COM1, then `isa-debug-exit` |
//! | boot milestones | milestone hypercall | nothing |
//!
//! Detection reads the hypervisor CPUID leaf once, in ring 0 during early boot. It cannot move to
//! ring 3: under PVM, CPUID executed in ring 3 is not trapped, so it returns the outer
//! hypervisor's leaves (`KVMKVMKVM`), never the ones thaw's VMM sets with `KVM_SET_CPUID2`
//! (measured; ring-0 CPUID is emulated and sees thaw's).

use core::fmt::Write;
use core::sync::atomic::{AtomicU8, Ordering};

use abi::exit_code;
use abi::fault::FaultReport;
use abi::hypercall::{Hypercall, Milestone};
use abi::params::{HOST_PARAMS_GPA, HostParams};
use abi::qemu::{FAULT_MARKER, ISA_DEBUG_EXIT_PORT, PANIC_MARKER};

use crate::phys::physical_memory_offset;
use crate::{hypercall, serial};

/// The hypervisor the kernel runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Platform {
    /// thaw's VMM: its CPUID signature was found.
    Thaw = 1,
    /// Any other hypervisor or none (QEMU's TCG in practice).
    Other = 2,
}

/// The detected platform, or 0 before detection.
static PLATFORM: AtomicU8 = AtomicU8::new(0);

/// Reads the hypervisor CPUID leaf and tells whether this is thaw's VMM.
pub fn detect() -> Platform {
    use core::arch::x86_64::__cpuid;
    let hypervisor_present = __cpuid(1).ecx & (1 << 31) != 0;
    if !hypervisor_present {
        return Platform::Other;
    }
    let leaf = __cpuid(abi::cpuid::HYPERVISOR_LEAF);
    if abi::cpuid::signature_from_registers(leaf.ebx, leaf.ecx, leaf.edx) == abi::cpuid::SIGNATURE {
        Platform::Thaw
    } else {
        Platform::Other
    }
}

/// The platform, detected on the first call, which must be in ring 0 (see the module docs).
pub fn current() -> Platform {
    match PLATFORM.load(Ordering::Relaxed) {
        1 => Platform::Thaw,
        2 => Platform::Other,
        _ => {
            let platform = detect();
            PLATFORM.store(platform as u8, Ordering::Relaxed);
            platform
        }
    }
}

/// The host parameters page, if the VMM wrote one (only thaw's VMM does).
pub fn host_params() -> Option<HostParams> {
    if current() != Platform::Thaw {
        return None;
    }
    let page = (physical_memory_offset() + HOST_PARAMS_GPA) as *const u8;
    // SAFETY: the page is guest RAM reserved for the VMM's parameters, mapped through the
    // physical-memory offset; the VMM wrote it before the guest ran and does not change it now.
    HostParams::decode(unsafe { core::slice::from_raw_parts(page, HostParams::LEN) })
}

/// Reads the time-stamp counter (allowed in ring 3: CR4.TSD is clear).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Wall-clock and monotonic time from the host's time base and the TSC.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ns: u64,
    base_tsc: u64,
    tsc_khz: u64,
}

impl Clock {
    /// A clock based at the host's wall-clock time, counting from now.
    pub fn new(params: &HostParams) -> Self {
        Self { base_ns: params.wall_clock_ns, base_tsc: rdtsc(), tsc_khz: params.tsc_khz }
    }

    /// Nanoseconds since the clock was created (0 forever if the TSC rate is unknown).
    pub fn monotonic_ns(&self) -> u64 {
        if self.tsc_khz == 0 {
            return 0;
        }
        let ticks = u128::from(rdtsc().wrapping_sub(self.base_tsc));
        (ticks * 1_000_000 / u128::from(self.tsc_khz)) as u64
    }

    /// False when the TSC rate is unknown (under QEMU), so the clocks stand still.
    pub fn runs(&self) -> bool {
        self.tsc_khz != 0
    }

    /// Nanoseconds since the Unix epoch.
    pub fn realtime_ns(&self) -> u64 {
        self.base_ns.saturating_add(self.monotonic_ns())
    }
}

/// Tells the VMM a boot milestone was reached (a no-op elsewhere).
pub fn milestone(milestone: Milestone) {
    if current() == Platform::Thaw {
        hypercall::call(Hypercall::Milestone(milestone));
    }
}

/// Ends the VM with `code`.
pub fn exit(code: u32) -> ! {
    match current() {
        Platform::Thaw => hypercall::call(Hypercall::Exit { code }),
        _ => {
            // SAFETY: the TSS bitmap opens this port; without the device the write is ignored.
            unsafe {
                core::arch::asm!("out dx, eax", in("dx") ISA_DEBUG_EXIT_PORT, in("eax") code, options(nomem, nostack))
            };
        }
    }
    // Only reached if nobody ended the VM. No `hlt` here: it is privileged.
    loop {
        core::hint::spin_loop();
    }
}

/// A fixed-size text buffer for panic messages and fault reports: no heap in a dying kernel.
pub(crate) struct TextBuffer {
    bytes: [u8; 512],
    len: usize,
}

impl TextBuffer {
    pub(crate) const fn new() -> Self {
        Self { bytes: [0; 512], len: 0 }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for TextBuffer {
    /// Appends what fits, with newlines flattened so the text stays one line.
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.bytes.len() {
                break;
            }
            self.bytes[self.len] = if b == b'\n' { b' ' } else { b };
            self.len += 1;
        }
        Ok(())
    }
}

/// Reports a panic message (one line) and ends the VM.
pub fn report_panic(message: &[u8]) -> ! {
    match current() {
        Platform::Thaw => hypercall::with_payload(message, |len| Hypercall::Panic { len }),
        _ => {
            serial::init();
            serial::write(PANIC_MARKER.as_bytes());
            serial::write(message);
            serial::write(b"\n");
        }
    }
    exit(exit_code::PANIC)
}

/// Reports a fatal exception and ends the VM. Called in ring 0 by the exception handlers.
pub fn report_fault(report: &FaultReport) -> ! {
    match current() {
        Platform::Thaw => hypercall::with_payload(&report.encode(), |len| Hypercall::FaultReport { len }),
        _ => {
            let mut text = TextBuffer::new();
            let _ = report.write_text(&mut text);
            serial::write(FAULT_MARKER.as_bytes());
            serial::write(text.as_bytes());
            serial::write(b"\n");
        }
    }
    exit(exit_code::FAULT)
}
