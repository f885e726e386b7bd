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

/// Sets on `config` every setting the compiled code depends on, as both the host's compiler and
/// the guest's runtime must: explicit bounds, divisor and stack checks instead of signals and
/// guard pages (the guest has neither), linear memory as plain heap memory that never moves (so
/// compiled code may keep its base in a register), the stack limit, and fuel metering exactly
/// when the function has a fuel budget (metering costs time in every loop, and a function
/// without a budget is bounded by its timeout instead).
#[cfg(feature = "engine")]
pub fn configure(config: &mut wasmtime::Config, fuel: bool) -> &mut wasmtime::Config {
    config
        .signals_based_traps(false)
        .memory_init_cow(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_may_move(false)
        .consume_fuel(fuel)
        .max_wasm_stack(MAX_WASM_STACK)
}

/// The host's engine that compiles for the guest (`precompile_module` gives what a bundle
/// carries as its code), with fuel metering or without: [`configure`],
/// the guest's target and x86 features, and the component model off. A compiled module records
/// the wasm proposals its engine enabled, and the guest's runtime is built without the component
/// model, which the host's build may have (Cargo unifies the features of every crate that uses
/// Wasmtime, the peer's `wasmtime-wasi` among them). It is turned off through the feature set,
/// which exists whether or not Wasmtime was built with the component model.
#[cfg(feature = "compile")]
#[allow(unsafe_code)] // Cranelift's flags can only be set unsafely: the one block says why it holds.
pub fn compiler(fuel: bool) -> wasmtime::Result<wasmtime::Engine> {
    let mut config = wasmtime::Config::new();
    configure(&mut config, fuel).wasm_features(wasmtime::WasmFeatures::COMPONENT_MODEL, false).target(TARGET)?;
    for (flag, _) in X86_FEATURES {
        // SAFETY: the code runs only where the guest's engine has checked these features
        // (`detect_host_feature` in guest-kernel's engine).
        unsafe { config.cranelift_flag_enable(flag) };
    }
    wasmtime::Engine::new(&config)
}
