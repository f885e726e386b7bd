//! Wasmtime's platform layer in the guest: what its `no_std` runtime asks of the system it runs
//! on, and the engine configuration that matches what the host compiled (`abi::engine`).
//!
//! The interface, as of Wasmtime 50 (pinned in Cargo.toml; it changes between releases):
//! - `wasmtime_tls_get(slot)` and `wasmtime_tls_set(slot, ptr)`: two pointers of thread-local
//!   state. The guest runs one thread, so they are plain statics.
//! - `fmod` and `fmodf`, which the runtime links against: libm's.
//! - Code memory ([`CodeMemory`]): loaded code must be made executable. Guest memory already is
//!   (no NX under thaw's VMM, and early boot clears it under the BIOS loader), so publishing
//!   is a no-op.
//! - CPU features ([`cpu_feature`]): the engine checks that the features the code was compiled
//!   for are present, from CPUID in ring 3.
//!
//! Without `signals_based_traps`, compiled code checks its own bounds, divisors and stack depth
//! and traps by calling into the runtime, which unwinds to the host call's entry. No trap ever
//! reaches the ring-0 exception handlers.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicPtr, Ordering};

use wasmtime::{Config, CustomCodeMemory};

static TLS: [AtomicPtr<u8>; 2] = [AtomicPtr::new(core::ptr::null_mut()), AtomicPtr::new(core::ptr::null_mut())];

/// Wasmtime's thread-local state (slot 0: the runtime's, slot 1: component-model async state).
#[unsafe(no_mangle)]
extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot).map_or(core::ptr::null_mut(), |p| p.load(Ordering::Relaxed))
}

/// Sets Wasmtime's thread-local state; see [`wasmtime_tls_get`].
#[unsafe(no_mangle)]
extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    if let Some(p) = TLS.get(slot) {
        p.store(ptr, Ordering::Relaxed);
    }
}

#[unsafe(no_mangle)]
extern "C" fn fmod(x: f64, y: f64) -> f64 {
    libm::fmod(x, y)
}

#[unsafe(no_mangle)]
extern "C" fn fmodf(x: f32, y: f32) -> f32 {
    libm::fmodf(x, y)
}

/// Code memory that is executable as it is.
struct CodeMemory;

impl CustomCodeMemory for CodeMemory {
    fn required_alignment(&self) -> usize {
        1
    }

    fn publish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }

    fn unpublish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// Whether the CPU has `feature` (one of the names in `abi::engine::X86_FEATURES`), from
/// CPUID leaf 1; `None` for a name this check does not know.
fn cpu_feature(feature: &str) -> Option<bool> {
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    let bit = match feature {
        "sse3" => 0,
        "ssse3" => 9,
        "fma" => 12,
        "sse4.1" => 19,
        "sse4.2" => 20,
        _ => return None,
    };
    Some(ecx & (1 << bit) != 0)
}

/// The guest's engine configuration, with fuel metering or without as the code was compiled:
/// the settings shared with the host's compiler ([`abi::engine::configure`]), plus what only
/// the runtime needs. A linear memory is allocated with room to grow to `memory_limit` bytes
/// (the function's allowance), so growing it never moves it: a move copies every byte and
/// touches every page of the new block, each a first touch that costs microseconds under PVM.
pub fn config(fuel: bool, memory_limit: usize) -> Config {
    let mut config = Config::new();
    abi::engine::configure(&mut config, fuel)
        .memory_reservation_for_growth(memory_limit as u64)
        // A trap's message is one line: what happened, not where (the guest has no symbols).
        .wasm_backtrace_max_frames(None)
        .with_custom_code_memory(Some(Arc::new(CodeMemory)));
    // SAFETY: floats never cross between compiled code and the soft-float runtime in registers:
    // the code is compiled with the features of `abi::engine::X86_FEATURES`, which inline the
    // float operations it would otherwise call the runtime for, and `cpu_feature` answers
    // truthfully whether the CPU has them.
    unsafe {
        config.x86_float_abi_ok(true);
        config.detect_host_feature(cpu_feature);
    }
    config
}
