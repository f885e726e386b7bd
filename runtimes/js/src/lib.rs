//! thaw's JavaScript runtime: a thaw function (a WASI reactor) that runs a JavaScript module on
//! QuickJS-NG, so that the engine's start-up and the module's top level are the function's
//! init, and land in the snapshot.
//!
//! `thaw pack handler.js` bundles this runtime with the function's files as its data volume and
//! names the entry module in `THAW_JS_ENTRY`. Then:
//! - `init` creates the engine and its context, installs the globals ([`globals`]), and
//!   evaluates the entry module with the imports it names ([`modules`]); the module exports its
//!   handler as `handle` or as its default export, and may export `config`;
//! - `handle` reads the request from stdin, calls the handler with it (a string, or a
//!   `Uint8Array` when `config.request` is `"bytes"`), runs the promise jobs and timers until
//!   the promise it may return settles, and writes the answer to stdout: a string as it is, a
//!   `Uint8Array` or an `ArrayBuffer` as bytes, `undefined` or `null` as nothing, and anything
//!   else as JSON.
//!
//! A JavaScript error, thrown at the top level, by the handler or by a timer, is written to
//! stderr with its stack, and the function then traps: thaw reports it as the function's
//! failure (exit 104).

mod fs;
mod globals;
mod modules;

use std::cell::RefCell;
use std::io::{Read as _, Write as _};
use std::time::Duration;

use rquickjs::promise::PromiseState;
use rquickjs::{
    CatchResultExt as _, CaughtError, Coerced, Context, Ctx, Function, Module, Object, Persistent, Runtime, TypedArray,
    Value,
};

/// The environment variable that names the entry module, an absolute path in the guest.
const ENTRY_VARIABLE: &str = "THAW_JS_ENTRY";

/// What `init` made and `handle` uses.
struct Loaded {
    /// The engine; it must outlive the context and the handler.
    _runtime: Runtime,
    context: Context,
    handler: Persistent<Function<'static>>,
    /// The runtime's handle on the timers (`web.js`).
    timers: Persistent<Object<'static>>,
    /// Whether the handler takes the request as bytes (`config.request: "bytes"`).
    bytes: bool,
}

thread_local! {
    /// The loaded function (wasm32-wasip1 has one thread).
    static LOADED: RefCell<Option<Loaded>> = const { RefCell::new(None) };
}

/// Writes `message` to stderr and traps, which thaw reports as the function's failure.
fn fail(message: &str) -> ! {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{message}").and_then(|()| stderr.flush());
    std::process::abort()
}

/// A caught JavaScript error as its name, message and stack; any other thrown value as a string.
fn describe(error: CaughtError<'_>) -> String {
    match error {
        CaughtError::Exception(exception) => {
            let name: Option<String> = exception.get("name").ok();
            let mut text =
                format!("{}: {}", name.as_deref().unwrap_or("Error"), exception.message().unwrap_or_default());
            if let Some(stack) = exception.stack().filter(|s| !s.is_empty()) {
                text.push('\n');
                text.push_str(stack.trim_end());
            }
            text
        }
        CaughtError::Value(value) => {
            format!("uncaught {}", value.get::<Coerced<String>>().map_or_else(|_| "value".into(), |s| s.0))
        }
        CaughtError::Error(error) => error.to_string(),
    }
}

/// Calls the timer hook `name` (`web.js`: `next`, `fire` or `cancel`) with `argument`.
fn timer_hook<'js, R: rquickjs::FromJs<'js>>(
    ctx: &Ctx<'js>,
    timers: &Object<'js>,
    name: &str,
    argument: bool,
) -> Result<R, String> {
    let hook: Function = timers.get(name).map_err(|e| e.to_string())?;
    hook.call((argument,)).catch(ctx).map_err(describe)
}

/// `performance.now()`: milliseconds on the clock the timers are due by.
fn now(ctx: &Ctx<'_>) -> Result<f64, String> {
    let performance: Object = ctx.globals().get("performance").map_err(|e| e.to_string())?;
    let now: Function = performance.get("now").map_err(|e| e.to_string())?;
    now.call(()).map_err(|e| e.to_string())
}

/// `value`'s own value, or, for a promise, what it settles to: the promise jobs run, and while
/// the promise is pending, the earliest timer is waited for and run. `what` names the promise
/// in the error when it can never settle.
fn settle<'js>(ctx: &Ctx<'js>, timers: &Object<'js>, value: Value<'js>, what: &str) -> Result<Value<'js>, String> {
    let Some(promise) = value.as_promise().cloned() else { return Ok(value) };
    loop {
        while ctx.execute_pending_job() {}
        if promise.state() != PromiseState::Pending {
            return match promise.result::<Value>() {
                Some(result) => result.catch(ctx).map_err(describe),
                None => Err(format!("{what} is still pending")),
            };
        }
        let due: f64 = if globals::timers_set() { timer_hook(ctx, timers, "next", false)? } else { -1.0 };
        if due < 0.0 {
            return Err(format!("{what} never settled: no promise job or timer was left to run"));
        }
        let wait = due - now(ctx)?;
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait / 1000.0));
        }
        timer_hook::<bool>(ctx, timers, "fire", true)?;
    }
}

/// Runs the promise jobs and the timers due by now, then cancels the timers still waiting: what
/// the function left to do when init or a request ends.
fn finish<'js>(ctx: &Ctx<'js>, timers: &Object<'js>) -> Result<(), String> {
    loop {
        while ctx.execute_pending_job() {}
        if !globals::timers_set() || !timer_hook::<bool>(ctx, timers, "fire", false)? {
            break;
        }
    }
    if globals::timers_set() {
        timer_hook::<()>(ctx, timers, "cancel", false)?;
        globals::timers_cancelled();
    }
    Ok(())
}

/// Whether the module's `config` asks for the request as bytes.
fn wants_bytes(module: &Module<'_, rquickjs::module::Evaluated>) -> Result<bool, String> {
    let config: Value = module.get("config").map_err(|e| e.to_string())?;
    if config.is_undefined() {
        return Ok(false);
    }
    let Some(config) = config.as_object() else {
        return Err("the export config must be an object, such as { request: \"bytes\" }".to_string());
    };
    let request: Value = config.get("request").map_err(|e| e.to_string())?;
    match request.as_string().map(|s| s.to_string()) {
        None if request.is_undefined() => Ok(false),
        Some(Ok(kind)) if kind == "string" => Ok(false),
        Some(Ok(kind)) if kind == "bytes" => Ok(true),
        _ => Err(format!(
            "config.request must be \"string\" or \"bytes\", not {}",
            request.get::<Coerced<String>>().map_or_else(|_| "that".into(), |s| s.0)
        )),
    }
}

/// Installs the globals, evaluates the entry module (its top-level promise settled, the timers
/// it left due run), and returns its handler, the timers' handle, and whether it wants bytes.
fn load<'js>(ctx: &Ctx<'js>, entry: &str) -> Result<(Function<'js>, Object<'js>, bool), String> {
    let timers = globals::install(ctx).map_err(|e| format!("installing the globals: {e}"))?;
    let source = std::fs::read(entry).map_err(|e| format!("reading {entry}: {e}"))?;
    let module = Module::declare(ctx.clone(), entry, source).catch(ctx).map_err(describe)?;
    let (module, evaluated) = module.eval().catch(ctx).map_err(describe)?;
    settle(ctx, &timers, evaluated.into_value(), "the module's top level")?;
    finish(ctx, &timers)?;
    globals::warm_up(ctx).map_err(|e| format!("warming the engine up: {e}"))?;
    let bytes = wants_bytes(&module).map_err(|e| format!("{entry}: {e}"))?;
    for export in ["handle", "default"] {
        let value: Value = module.get(export).catch(ctx).map_err(describe)?;
        if let Some(function) = value.into_function() {
            return Ok((function, timers, bytes));
        }
    }
    Err(format!("{entry} exports no handler: export a function named handle, or a default function"))
}

/// The function's init: the engine, the globals and the entry module's top level.
#[unsafe(no_mangle)]
pub extern "C" fn init() {
    let Ok(entry) = std::env::var(ENTRY_VARIABLE) else {
        fail(&format!("thaw-js: {ENTRY_VARIABLE} names no entry module (pack the function with `thaw pack FILE.js`)"));
    };
    let runtime = Runtime::new().unwrap_or_else(|e| fail(&format!("thaw-js: starting the engine: {e}")));
    runtime.set_loader(modules::Files, modules::Files);
    let context = Context::full(&runtime).unwrap_or_else(|e| fail(&format!("thaw-js: creating a context: {e}")));
    let loaded = context.with(|ctx| {
        load(&ctx, &entry)
            .map(|(handler, timers, bytes)| (Persistent::save(&ctx, handler), Persistent::save(&ctx, timers), bytes))
    });
    let (handler, timers, bytes) = loaded.unwrap_or_else(|e| fail(&e));
    // A collection now sets the engine's next one well past what init allocated, so that a
    // request starting from the snapshot does not begin one over the whole of init's heap.
    runtime.run_gc();
    LOADED.with_borrow_mut(|slot| *slot = Some(Loaded { _runtime: runtime, context, handler, timers, bytes }));
}

/// The handler's answer as the bytes of the response.
fn response<'js>(ctx: &Ctx<'js>, answer: Value<'js>) -> Result<Vec<u8>, String> {
    if answer.is_undefined() || answer.is_null() {
        return Ok(Vec::new());
    }
    if let Some(s) = answer.as_string() {
        return s.to_string().map(String::into_bytes).map_err(|e| e.to_string());
    }
    if let Some(bytes) = globals::bytes_of(&answer) {
        return Ok(bytes);
    }
    match ctx.json_stringify(answer).catch(ctx).map_err(describe)? {
        Some(json) => json.to_string().map(String::into_bytes).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}

/// Calls the handler with `request`, settles what it returns, and runs what it left due.
fn call<'js>(ctx: &Ctx<'js>, loaded: &Loaded, request: Vec<u8>) -> Result<Vec<u8>, String> {
    let handler = loaded.handler.clone().restore(ctx).map_err(|e| e.to_string())?;
    let timers = loaded.timers.clone().restore(ctx).map_err(|e| e.to_string())?;
    let returned: Value = if loaded.bytes {
        let request = TypedArray::<u8>::new(ctx.clone(), request).map_err(|e| e.to_string())?;
        handler.call((request,))
    } else {
        handler.call((String::from_utf8_lossy(&request).into_owned(),))
    }
    .catch(ctx)
    .map_err(describe)?;
    let answer = settle(ctx, &timers, returned, "the handler's promise")?;
    finish(ctx, &timers)?;
    response(ctx, answer)
}

/// Answers one request: stdin is the request, stdout the response.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    globals::reseed_math_random();
    let mut request = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut request) {
        fail(&format!("thaw-js: reading the request: {e}"));
    }
    let answered = LOADED.with_borrow(|loaded| {
        let Some(loaded) = loaded else { return Err("thaw-js: the function was not initialized".to_string()) };
        loaded.context.with(|ctx| call(&ctx, loaded, request))
    });
    match answered {
        Ok(bytes) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
                fail(&format!("thaw-js: writing the response: {e}"));
            }
        }
        Err(e) => fail(&e),
    }
}
