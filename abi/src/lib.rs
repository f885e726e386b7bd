//! The contract between thaw's guest kernel and its VMM.
//!
//! Everything both sides must agree on lives here and nowhere else: the interface version, the
//! hypercall ports and their arguments, the hypervisor CPUID signature, the ELF note a kernel uses
//! to declare the interface it speaks, the fault report a guest sends when it dies, the host
//! parameters page and device table, the I/O reconnection table, the invoke mailbox, the recorded working set, the function bundle format, the WASI surface functions
//! may import, and the conventions used when the same kernel runs under QEMU instead.
//!
//! This crate holds plain data and its encoding, decoding and validation only ([`codec`] is its
//! ground floor: the checksum, the magics and the little-endian readers). Its core is `no_std`
//! and builds for both sides. Its errors implement `core::error::Error` (derived by thiserror,
//! without its `std` feature), so the host needs no `std` feature to use them. Two features
//! reach beyond plain data, each for the crates that need it: `engine` (the Wasmtime settings
//! host and guest share, no_std, which the guest's runtime enables) and `compile` (Cranelift
//! compiling for the guest, with Wasmtime's `std`, which only the host tools enable). Cargo
//! resolves the guest kernel's artifact build apart from the host's, so `compile` never reaches
//! the guest.

#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

pub mod bundle;
pub mod codec;
pub mod cpuid;
pub mod devices;
pub mod engine;
pub mod fault;
pub mod hypercall;
pub mod image;
pub mod invoke;
pub mod iotable;
pub mod note;
pub mod params;
pub mod qemu;
pub mod volume;
pub mod wasi;
pub mod workingset;

/// Version of the guest/VMM interface defined by this crate.
///
/// Bump it on any change that makes an old guest and a new VMM (or the reverse) disagree: a new
/// hypercall meaning, a changed struct layout, a moved fixed address. It is independent of the
/// crate version. A guest declares it in its [`note`]; the VMM refuses a kernel that declares any
/// other value.
pub const INTERFACE_VERSION: u32 = 6;

/// The oldest interface version whose images this VMM still restores. Version 5 only added the
/// working-set hypercall, which a version-4 guest never makes; version 6 only added the first
/// request handed in with the checkpoint's result, which the VMM gives only to a version-6 guest.
pub const OLDEST_IMAGE_INTERFACE_VERSION: u32 = 4;

/// The first interface version whose guests take their first request from the checkpoint's
/// result ([`hypercall::CHECKPOINT_REQUEST_OFFSET`]).
pub const FIRST_REQUEST_IN_RESULT_SINCE: u32 = 6;

/// Process exit status conventions shared by `thaw run` and `thaw qemu`.
pub mod exit_code {
    /// The guest panicked. Under QEMU the guest's panic handler exits with this code.
    pub const PANIC: u32 = 101;
    /// The guest took a CPU exception, which its handlers report and treat as fatal.
    pub const FAULT: u32 = 102;
    /// The guest misbehaved in a way the VMM caught: a triple fault, an unknown port or
    /// address, a malformed hypercall.
    pub const GUEST_FAILURE: u32 = 103;
    /// The function trapped (`thaw invoke`); the trap message is on stderr.
    pub const FUNCTION_TRAPPED: u32 = 104;
    /// The guest or its function exited with a code above 100, which would read as one of
    /// thaw's own codes or, past 255, wrap around (256 would become 0); the code is on stderr.
    pub const EXIT_OUT_OF_RANGE: u32 = 105;
    /// The guest ran past its wall-clock timeout (the same value `timeout(1)` uses).
    pub const TIMEOUT: u32 = 124;
    /// thaw itself failed before or around the guest: an invalid kernel, KVM or QEMU
    /// unavailable, a bad option value.
    pub const HOST_ERROR: u32 = 125;

    /// The process exit code for a guest's or a function's own exit `code`: the code itself
    /// from 0 to 100, [`EXIT_OUT_OF_RANGE`] above, so that a failure never reads as success or
    /// as one of thaw's codes.
    pub const fn of_exit(code: u32) -> u32 {
        if code <= 100 { code } else { EXIT_OUT_OF_RANGE }
    }
}
