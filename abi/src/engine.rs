//! What Wasmtime on the host, which compiles a module ahead of time, and Wasmtime in the guest,
//! which runs the compiled code, must agree on. A compiled module records its engine's
//! settings, and the guest's engine refuses one whose settings differ from its own.
//!
//! The guest kernel is built for `x86_64-unknown-none`, a soft-float target: the runtime passes
//! floats in integer registers and ring 0 never executes SSE (PVM's ring-0 emulator rejects it).
//! Compiled wasm code uses SSE in ring 3. Floats cross between the two only through memory
//! (`ValRaw`), provided the code never calls the runtime for float arithmetic: the x86 features
//! below let Cranelift inline rounding and fused multiply-add, which it would otherwise call out
//! for.

/// The target the host compiles for.
pub const TARGET: &str = "x86_64-unknown-none";

/// Cranelift flags the host enables, each paired with the name the guest's feature check is
/// asked about (Wasmtime's `detect_host_feature`), which it answers from CPUID.
pub const X86_FEATURES: [(&str, &str); 5] = [
    ("has_sse3", "sse3"),
    ("has_ssse3", "ssse3"),
    ("has_sse41", "sse4.1"),
    ("has_sse42", "sse4.2"),
    ("has_fma", "fma"),
];

/// The deepest a wasm call stack may grow, in bytes, checked by the compiled code itself. It
/// fits with room to spare in the guest's 1 MiB stack, on which the runtime and host calls run
/// too.
pub const MAX_WASM_STACK: usize = 256 * 1024;
