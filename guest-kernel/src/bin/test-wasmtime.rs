//! Test kernel: runs a module that Wasmtime compiled on the host (the ramdisk holds the compiled
//! artifact) on the guest's Wasmtime runtime, in ring 3, and prints what each export returned
//! or how it trapped. The host test compares the lines with the same module run on the host.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;

use guest_kernel::println;
use wasmtime::{Engine, Linker, Module, Store, Trap, WasmParams, WasmResults};

guest_kernel::kernel_main!(main);

/// What a call gave: its result, or its trap.
fn outcome<R: core::fmt::Debug>(result: wasmtime::Result<R>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(e) => match e.downcast_ref::<Trap>() {
            Some(trap) => format!("trap: {trap}"),
            None => format!("error: {e}"),
        },
    }
}

/// Calls export `name` with `params` and prints the outcome.
fn call<P: WasmParams + core::fmt::Debug + Copy, R: WasmResults + core::fmt::Debug>(
    store: &mut Store<()>,
    instance: &wasmtime::Instance,
    name: &str,
    params: P,
) {
    let result = instance.get_typed_func::<P, R>(&mut *store, name).and_then(|f| f.call(&mut *store, params));
    println!("{name}{params:?} = {}", outcome(result));
}

fn main() -> u32 {
    let Some(artifact) = guest_kernel::boot::ramdisk() else {
        println!("test-wasmtime: no compiled module in the ramdisk");
        return 2;
    };
    let engine = match Engine::new(&guest_kernel::engine::config(true, 1 << 20)) {
        Ok(engine) => engine,
        Err(e) => {
            println!("test-wasmtime: engine: {e}");
            return 3;
        }
    };
    // SAFETY: the artifact is what the host test compiled with Wasmtime for this engine's
    // settings; deserializing is only as safe as that origin (the engine checks the settings,
    // not the code).
    let module = match unsafe { Module::deserialize(&engine, artifact) } {
        Ok(module) => module,
        Err(e) => {
            println!("test-wasmtime: the compiled module does not load: {}", e.root_cause());
            return 4;
        }
    };
    let mut store = Store::new(&engine, ());
    store.set_fuel(u64::MAX).expect("fuel is on");
    let mut linker = Linker::<()>::new(&engine);
    linker.func_wrap("host", "twice", |x: i64| x.wrapping_mul(2)).expect("one definition");
    let instance = match linker.instantiate(&mut store, &module) {
        Ok(instance) => instance,
        Err(e) => {
            println!("test-wasmtime: instantiate: {e}");
            return 5;
        }
    };
    call::<(i32, i32), i32>(&mut store, &instance, "add", (2, 3));
    call::<(i64,), i64>(&mut store, &instance, "host", (20,));
    let floats =
        instance.get_typed_func::<(f64, f32), f64>(&mut store, "floats").map(|f| f.call(&mut store, (2.25, 1.5)));
    println!("floats bits = {}", outcome(floats.and_then(|r| r.map(f64::to_bits))));
    call::<(i32, i32), i32>(&mut store, &instance, "div", (7, 2));
    call::<(i32, i32), i32>(&mut store, &instance, "div", (7, 0));
    call::<(i32,), i32>(&mut store, &instance, "load", (65536,));
    call::<(), ()>(&mut store, &instance, "unreachable", ());
    call::<(i64,), i64>(&mut store, &instance, "recurse", (0,));
    call::<(i32,), i32>(&mut store, &instance, "grow", (3,));
    call::<(i32,), i32>(&mut store, &instance, "load", (65536,));
    call::<(i64,), i64>(&mut store, &instance, "spin", (1_000_000,));
    store.set_fuel(1000).expect("fuel is on");
    call::<(i64,), i64>(&mut store, &instance, "spin", (1_000_000,));
    0
}
