//! Wasmtime in the guest (issue 15, first step): a module compiled on the host by Cranelift, for
//! the guest's engine settings (`abi::engine`), runs on the guest kernel's Wasmtime runtime in
//! ring 3 and gives, under KVM and under QEMU, exactly what the same module gives run by
//! Wasmtime on the host: results, float bits, traps, fuel. An artifact compiled with other
//! settings is refused.

use std::fmt::Debug;

use wasmtime::{Config, Engine, Instance, Linker, Module, Store, Trap, WasmParams, WasmResults};

mod common;

use common::{Run, run_thaw};

const KERNEL: &str = env!("CARGO_BIN_FILE_GUEST_KERNEL_test-wasmtime");

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fixtures/engine-probe.wat");

/// The settings compiled code depends on, as the guest's engine sets them, with fuel as given,
/// for running the probe on the host (natively, so without the guest's target). The component
/// model is off, as in the guest's build (`abi::engine::compiler`).
fn config(fuel: bool) -> Config {
    let mut config = Config::new();
    abi::engine::configure(&mut config, fuel).wasm_component_model(false);
    config
}

/// The probe compiled ahead of time for the guest, as `thaw pack` compiles, with fuel as given.
fn compile_for_guest(fuel: bool) -> Vec<u8> {
    let engine = abi::engine::compiler(fuel).expect("the compiler");
    engine.precompile_module(&wat::parse_file(PROBE).expect("the probe")).expect("the probe compiles")
}

fn outcome<R: Debug>(result: wasmtime::Result<R>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(e) => match e.downcast_ref::<Trap>() {
            Some(trap) => format!("trap: {trap}"),
            None => format!("error: {e}"),
        },
    }
}

fn call<P: WasmParams + Debug + Copy, R: WasmResults + Debug>(
    store: &mut Store<()>,
    instance: &Instance,
    name: &str,
    params: P,
) -> String {
    let result = instance.get_typed_func::<P, R>(&mut *store, name).and_then(|f| f.call(&mut *store, params));
    format!("{name}{params:?} = {}\n", outcome(result))
}

/// What test-wasmtime prints, computed by running the probe with Wasmtime on the host: the same
/// calls in the same order.
fn expected_on_the_host() -> String {
    let engine = Engine::new(&config(true)).expect("engine");
    let module = Module::from_file(&engine, PROBE).expect("the probe compiles");
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX).expect("fuel is on");
    let mut linker = Linker::<()>::new(&engine);
    linker.func_wrap("host", "twice", |x: i64| x.wrapping_mul(2)).expect("one definition");
    let instance = linker.instantiate(&mut store, &module).expect("instantiate");
    let mut lines = String::new();
    lines += &call::<(i32, i32), i32>(&mut store, &instance, "add", (2, 3));
    lines += &call::<(i64,), i64>(&mut store, &instance, "host", (20,));
    let floats =
        instance.get_typed_func::<(f64, f32), f64>(&mut store, "floats").map(|f| f.call(&mut store, (2.25, 1.5)));
    lines += &format!("floats bits = {}\n", outcome(floats.and_then(|r| r.map(f64::to_bits))));
    lines += &call::<(i32, i32), i32>(&mut store, &instance, "div", (7, 2));
    lines += &call::<(i32, i32), i32>(&mut store, &instance, "div", (7, 0));
    lines += &call::<(i32,), i32>(&mut store, &instance, "load", (65536,));
    lines += &call::<(), ()>(&mut store, &instance, "unreachable", ());
    lines += &call::<(i64,), i64>(&mut store, &instance, "recurse", (0,));
    lines += &call::<(i32,), i32>(&mut store, &instance, "grow", (3,));
    lines += &call::<(i32,), i32>(&mut store, &instance, "load", (65536,));
    lines += &call::<(i64,), i64>(&mut store, &instance, "spin", (1_000_000,));
    store.set_fuel(1000).expect("fuel is on");
    lines += &call::<(i64,), i64>(&mut store, &instance, "spin", (1_000_000,));
    lines
}

/// Boots test-wasmtime with `artifact` as its ramdisk under KVM and under QEMU at once.
fn both(artifact: &[u8]) -> (Run, Run) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("probe.cwasm");
    std::fs::write(&path, artifact).expect("write the artifact");
    let path = path.to_str().expect("a UTF-8 path");
    std::thread::scope(|s| {
        let qemu = s.spawn(|| run_thaw(&["qemu", "--kernel", KERNEL, "--ramdisk", path, "--timeout", "60"]));
        let kvm = run_thaw(&["run", "--kernel", KERNEL, "--ramdisk", path, "--timeout", "60"]);
        (kvm, qemu.join().expect("qemu run"))
    })
}

fn banner() -> String {
    format!("thaw-guest {} (abi {})\n", env!("CARGO_PKG_VERSION"), abi::INTERFACE_VERSION)
}

#[test]
fn host_compiled_code_runs_in_ring3_as_on_the_host_under_both_hypervisors() {
    let expected = format!("{}{}", banner(), expected_on_the_host());
    // The expectation itself covers what it must: every trap kind, and the float result.
    for trap in [
        "integer divide by zero",
        "out of bounds memory access",
        "unreachable",
        "call stack exhausted",
        "all fuel consumed",
    ] {
        assert!(expected.contains(trap), "the host run has no {trap} trap:\n{expected}");
    }
    let (kvm, qemu) = both(&compile_for_guest(true));
    for (name, run) in [("KVM", &kvm), ("QEMU", &qemu)] {
        assert_eq!(run.stdout, expected, "under {name}: {run:#?}");
        assert_eq!((run.code, run.stderr.as_str()), (Some(0), ""), "under {name}: {run:#?}");
    }
}

#[test]
fn code_compiled_for_other_engine_settings_is_refused_with_the_setting_named() {
    let (kvm, qemu) = both(&compile_for_guest(false));
    for (name, run) in [("KVM", &kvm), ("QEMU", &qemu)] {
        assert_eq!(run.code, Some(4), "under {name}: {run:#?}");
        let line = run.stdout.strip_prefix(&banner()).expect("the banner first");
        assert!(line.starts_with("test-wasmtime: the compiled module does not load: "), "under {name}: {line}");
        assert!(line.contains("without fuel support"), "under {name}: {line}");
    }
}
