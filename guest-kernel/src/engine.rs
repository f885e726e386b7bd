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
//! - Linear memories ([`LinearMemories`]): thaw allocates each at the function's
//!   allowance from the heap, so it never moves when it grows. A move would copy every byte and
//!   touch every page of the new block, each a first touch that costs microseconds under PVM.
//!   A dropped memory's block is kept as the spare for the next one ([`SPARE`]) instead of
//!   going back to the heap, where the small allocations that follow a drop would land at the
//!   start of the hole and leave no room for the next memory of the same size.
//!
//! Without `signals_based_traps`, compiled code checks its own bounds, divisors and stack depth
//! and traps by calling into the runtime, which unwinds to the host call's entry. No trap ever
//! reaches the ring-0 exception handlers.

use alloc::alloc::Layout;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};

use wasmtime::{Config, CustomCodeMemory, LinearMemory, MemoryCreator, MemoryType};

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

/// The block of the last linear memory dropped, with its layout: the next memory of that layout
/// takes it (a command instantiates once more after a start-up it abandoned, and every memory is
/// the function's whole allowance).
static SPARE: spin::Mutex<Option<(Block, Layout)>> = spin::Mutex::new(None);

/// A block of heap memory that no one else uses.
struct Block(NonNull<u8>);

// SAFETY: the block is plain heap memory, owned by whoever holds this value; the guest runs one
// thread.
unsafe impl Send for Block {}

/// Makes linear memories of a fixed capacity: the function's allowance.
struct LinearMemories {
    /// The allowance, in bytes.
    limit: usize,
}

/// One linear memory: a block of the heap (`layout`), whose first `len` bytes are accessible,
/// each zeroed when it became so.
struct FixedMemory {
    base: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the memory is plain heap memory owned by this value; Wasmtime serializes access to it
// through its store, and the guest runs one thread.
unsafe impl Send for FixedMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for FixedMemory {}

// SAFETY: each memory is its own heap block (fresh, or the spare no other memory holds), zeroed
// as it becomes accessible, never moved, and given up only when Wasmtime drops it.
unsafe impl MemoryCreator for LinearMemories {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        _reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if guard_size_in_bytes != 0 {
            return Err(alloc::format!("{guard_size_in_bytes} bytes of guard pages asked for; thaw has none"));
        }
        // The limiter refuses growth past the allowance; a minimum past it is refused when the
        // host validates the module.
        let capacity = self.limit.max(minimum).max(1);
        let layout = Layout::from_size_align(capacity, 4096).map_err(|e| alloc::format!("{capacity} bytes: {e}"))?;
        let spare = SPARE.lock().take_if(|(_, spare)| *spare == layout).map(|(block, _)| block.0);
        let base = match spare {
            Some(base) => base,
            // SAFETY: the layout's size is at least 1.
            None => NonNull::new(unsafe { alloc::alloc::alloc(layout) })
                .ok_or_else(|| alloc::format!("no {capacity} bytes of heap for a linear memory"))?,
        };
        let mut memory = FixedMemory { base, len: 0, layout };
        memory.grow_to(minimum).map_err(|e| alloc::format!("{e}"))?;
        Ok(Box::new(memory))
    }
}

// SAFETY: the memory is page-aligned, grows in place up to its capacity, and what becomes
// accessible is zeroed first.
unsafe impl LinearMemory for FixedMemory {
    fn byte_size(&self) -> usize {
        self.len
    }

    fn byte_capacity(&self) -> usize {
        self.layout.size()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.layout.size() {
            return Err(wasmtime::Error::msg("growth operation limited"));
        }
        if new_size > self.len {
            // SAFETY: `len..new_size` lies inside the allocation.
            unsafe { self.base.as_ptr().add(self.len).write_bytes(0, new_size - self.len) };
        }
        self.len = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

impl Drop for FixedMemory {
    fn drop(&mut self) {
        let replaced = SPARE.lock().replace((Block(self.base), self.layout));
        if let Some((old, layout)) = replaced {
            // SAFETY: the block was allocated in `new_memory` with this layout and is freed once:
            // it left the spare slot here, and no memory holds it.
            unsafe { alloc::alloc::dealloc(old.0.as_ptr(), layout) };
        }
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
/// the runtime needs: linear memories are [`LinearMemories`] of `memory_limit` bytes (the
/// function's allowance).
pub fn config(fuel: bool, memory_limit: usize) -> Config {
    let mut config = Config::new();
    config.with_host_memory(Arc::new(LinearMemories { limit: memory_limit }));
    abi::engine::configure(&mut config, fuel)
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
