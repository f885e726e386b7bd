//! thaw's JavaScript runtime: a thaw function (a WASI reactor) that runs a JavaScript module on
//! QuickJS-NG, so that the engine's start-up and the module's top level are the function's
//! init, and land in the snapshot.
//!
//! `thaw pack handler.js` bundles this runtime with the function's files as its data volume and
//! names the entry module in `THAW_JS_ENTRY`. Then:
//! - `init` creates the engine and its context, installs the globals, and evaluates the entry
//!   module, with the imports between the function's own files; the module exports its handler
//!   as `handle` or as its default export;
//! - `handle` reads the request from stdin, calls the handler with it as a string, drives the
//!   promise it may return to its end, and writes the answer to stdout: a string as it is, a
//!   `Uint8Array` or an `ArrayBuffer` as bytes, `undefined` or `null` as nothing, and anything
//!   else as JSON.
//!
//! The globals beyond the language's own are `console`, UTF-8 `TextEncoder`/`TextDecoder` and
//! `crypto` ([`install_globals`]). `Math.random` is the runtime's, seeded afresh in every
//! request ([`math_random`]).
//!
//! A JavaScript error, thrown at the top level or by the handler, is written to stderr with its
//! stack, and the function then traps: thaw reports it as the function's failure (exit 104).

use std::cell::{Cell, RefCell};
use std::io::{Read as _, Write as _};

use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::prelude::Rest;
use rquickjs::{
    ArrayBuffer, CatchResultExt as _, CaughtError, Coerced, Context, Ctx, Function, Module, Object, Persistent,
    Runtime, TypedArray, Value,
};

/// The environment variable that names the entry module, an absolute path in the guest.
const ENTRY_VARIABLE: &str = "THAW_JS_ENTRY";

/// What `init` made and `handle` uses.
struct Loaded {
    /// The engine; it must outlive the context and the handler.
    _runtime: Runtime,
    context: Context,
    handler: Persistent<Function<'static>>,
}

thread_local! {
    /// The loaded function (wasm32-wasip1 has one thread).
    static LOADED: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    /// `Math.random`'s state, seeded on its first use in each request (`None` until then).
    static RANDOM: Cell<Option<u64>> = const { Cell::new(None) };
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    /// WASI's `random_get`: fills `len` bytes at `buf` from the host's entropy.
    #[link_name = "random_get"]
    fn wasi_random_get(buf: *mut u8, len: usize) -> i32;
}

/// Fills `bytes` from the host's entropy (WASI `random_get`).
fn random_bytes(bytes: &mut [u8]) {
    // SAFETY: `bytes` is writable for its whole length while the call runs.
    let errno = unsafe { wasi_random_get(bytes.as_mut_ptr(), bytes.len()) };
    if errno != 0 {
        fail(&format!("thaw-js: random_get failed with WASI errno {errno}"));
    }
}

/// `Math.random`, replacing QuickJS-NG's: that one is seeded from the clock when the context is
/// created, in init, so every VM restored from one snapshot would give the same sequence. This
/// one is seeded from WASI's `random_get` on its first use in each request (thaw gives every
/// restored VM its own entropy), and steps with SplitMix64.
fn math_random() -> f64 {
    let state = RANDOM.get().unwrap_or_else(|| {
        let mut seed = [0u8; 8];
        random_bytes(&mut seed);
        u64::from_le_bytes(seed)
    });
    let state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    RANDOM.set(Some(state));
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
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

/// Resolves and loads the function's own modules: a specifier that starts with `./`, `../` or
/// `/`, resolved against the importing module's directory, naming a `.js` or `.mjs` file.
struct Files;

impl Resolver for Files {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        if !(name.starts_with("./") || name.starts_with("../") || name.starts_with('/')) {
            return Err(rquickjs::Error::new_resolving_message(
                base,
                name,
                "only the function's own files can be imported (./, ../ or /); bundle npm packages into one file first (esbuild --bundle --format=esm)",
            ));
        }
        let mut path: Vec<&str> = if name.starts_with('/') {
            Vec::new()
        } else {
            base.rsplit_once('/').map_or("", |(dir, _)| dir).split('/').filter(|p| !p.is_empty()).collect()
        };
        for part in name.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    path.pop();
                }
                part => path.push(part),
            }
        }
        Ok(format!("/{}", path.join("/")))
    }
}

impl Loader for Files {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js>> {
        if !(name.ends_with(".js") || name.ends_with(".mjs")) {
            return Err(rquickjs::Error::new_loading_message(name, "a module is a .js or .mjs file"));
        }
        let source = std::fs::read(name).map_err(|e| rquickjs::Error::new_loading_message(name, e.to_string()))?;
        Module::declare(ctx.clone(), name, source)
    }
}

/// The arguments of a `console` call as one line: strings as they are, errors as their name and
/// message, other objects as JSON, anything else as JavaScript's `String` gives it.
fn console_line<'js>(ctx: &Ctx<'js>, args: Rest<Value<'js>>) -> String {
    let shown: Vec<String> = args
        .0
        .into_iter()
        .map(|value| {
            if let Some(s) = value.as_string() {
                return s.to_string().unwrap_or_default();
            }
            if let Some(object) = value.as_object().filter(|_| value.is_error()) {
                let name: String = object.get("name").unwrap_or_else(|_| "Error".into());
                let message: String = object.get("message").unwrap_or_default();
                return format!("{name}: {message}");
            }
            if value.is_object()
                && !value.is_function()
                && let Ok(Some(json)) = ctx.json_stringify(value.clone())
                && let Ok(json) = json.to_string()
            {
                return json;
            }
            value.get::<Coerced<String>>().map_or_else(|_| String::new(), |s| s.0)
        })
        .collect();
    shown.join(" ")
}

/// A `console` method: one line to stderr.
fn console_write<'js>(ctx: Ctx<'js>, args: Rest<Value<'js>>) {
    let line = console_line(&ctx, args);
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
}

/// The native half of `TextEncoder.encode`: `text` as UTF-8.
fn encode_utf8<'js>(ctx: Ctx<'js>, text: String) -> rquickjs::Result<TypedArray<'js, u8>> {
    TypedArray::new(ctx, text.into_bytes())
}

/// The native half of `TextDecoder.decode`: the bytes of a typed array, a `DataView`'s view or
/// an `ArrayBuffer` as text, invalid UTF-8 replaced (U+FFFD), as the WHATWG decoder does by
/// default.
fn decode_utf8<'js>(bytes: Value<'js>) -> rquickjs::Result<String> {
    let text = |raw: Option<&[u8]>| String::from_utf8_lossy(raw.unwrap_or_default()).into_owned();
    if let Ok(array) = TypedArray::<u8>::from_value(bytes.clone()) {
        // SAFETY: the bytes are copied out before any JavaScript runs again.
        return Ok(text(unsafe { array.as_bytes() }));
    }
    if let Some(buffer) = ArrayBuffer::from_value(bytes) {
        // SAFETY: as above.
        return Ok(text(unsafe { buffer.as_bytes() }));
    }
    Err(rquickjs::Error::new_from_js_message(
        "value",
        "Uint8Array",
        "TextDecoder.decode takes a Uint8Array or an ArrayBuffer",
    ))
}

/// The native half of `crypto.getRandomValues` and `crypto.randomUUID`: `count` bytes of the
/// host's entropy.
fn random_u8<'js>(ctx: Ctx<'js>, count: usize) -> rquickjs::Result<TypedArray<'js, u8>> {
    let mut bytes = vec![0; count.min(65536)];
    random_bytes(&mut bytes);
    TypedArray::new(ctx, bytes)
}

/// The Web globals written in JavaScript over the native helpers above, which they then hide.
const WEB_GLOBALS: &str = r#"(native) => {
  const define = (name, value) =>
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: false });
  class TextEncoder {
    get encoding() { return "utf-8"; }
    encode(input = "") { return native.encode(String(input)); }
  }
  class TextDecoder {
    constructor(label = "utf-8") {
      if (!/^\s*(utf-?8|unicode-1-1-utf-8)\s*$/i.test(String(label))) {
        throw new RangeError(`TextDecoder: only utf-8 is supported, not ${label}`);
      }
    }
    get encoding() { return "utf-8"; }
    decode(input) {
      if (input === undefined) return "";
      if (ArrayBuffer.isView(input) && !(input instanceof Uint8Array)) {
        input = new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
      }
      return native.decode(input);
    }
  }
  const crypto = {
    getRandomValues(array) {
      if (!ArrayBuffer.isView(array) || array instanceof Float32Array || array instanceof Float64Array || array instanceof DataView) {
        throw new TypeError("crypto.getRandomValues takes an integer typed array");
      }
      if (array.byteLength > 65536) {
        throw new RangeError(`crypto.getRandomValues: ${array.byteLength} bytes asked, at most 65536`);
      }
      new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(native.random(array.byteLength));
      return array;
    },
    randomUUID() {
      const b = native.random(16);
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
      return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
    },
  };
  define("TextEncoder", TextEncoder);
  define("TextDecoder", TextDecoder);
  define("crypto", crypto);
}"#;

/// Installs the globals a function sees beyond the language's own: `console`, whose every method
/// writes one line to stderr (stdout is the response); a `Math.random` that differs in every
/// restored VM ([`math_random`]); UTF-8 `TextEncoder` and `TextDecoder`; and
/// `crypto.getRandomValues` and `crypto.randomUUID` from the host's entropy.
fn install_globals(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let math: Object = ctx.globals().get("Math")?;
    math.set("random", Function::new(ctx.clone(), math_random)?)?;
    let native = Object::new(ctx.clone())?;
    native.set("encode", Function::new(ctx.clone(), encode_utf8)?)?;
    native.set("decode", Function::new(ctx.clone(), decode_utf8)?)?;
    native.set("random", Function::new(ctx.clone(), random_u8)?)?;
    let web: Function = ctx.eval(WEB_GLOBALS)?;
    web.call::<_, ()>((native,))?;
    let console = Object::new(ctx.clone())?;
    for method in ["log", "info", "debug", "warn", "error", "trace"] {
        console.set(method, Function::new(ctx.clone(), console_write)?)?;
    }
    ctx.globals().set("console", console)
}

/// Evaluates the entry module and returns its handler.
fn load<'js>(ctx: &Ctx<'js>, entry: &str) -> Result<Function<'js>, String> {
    install_globals(ctx).map_err(|e| format!("installing the globals: {e}"))?;
    let source = std::fs::read(entry).map_err(|e| format!("reading {entry}: {e}"))?;
    let module = Module::declare(ctx.clone(), entry, source).catch(ctx).map_err(describe)?;
    let (module, evaluated) = module.eval().catch(ctx).map_err(describe)?;
    evaluated.finish::<()>().catch(ctx).map_err(describe)?;
    for export in ["handle", "default"] {
        let value: Value = module.get(export).catch(ctx).map_err(describe)?;
        if let Some(function) = value.into_function() {
            return Ok(function);
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
    runtime.set_loader(Files, Files);
    let context = Context::full(&runtime).unwrap_or_else(|e| fail(&format!("thaw-js: creating a context: {e}")));
    let handler = context.with(|ctx| load(&ctx, &entry).map(|handler| Persistent::save(&ctx, handler)));
    let handler = handler.unwrap_or_else(|e| fail(&e));
    LOADED.with_borrow_mut(|loaded| *loaded = Some(Loaded { _runtime: runtime, context, handler }));
}

/// The handler's answer as the bytes of the response.
fn response<'js>(ctx: &Ctx<'js>, answer: Value<'js>) -> Result<Vec<u8>, String> {
    if answer.is_undefined() || answer.is_null() {
        return Ok(Vec::new());
    }
    if let Some(s) = answer.as_string() {
        return s.to_string().map(String::into_bytes).map_err(|e| e.to_string());
    }
    if let Ok(bytes) = TypedArray::<u8>::from_value(answer.clone()) {
        // SAFETY: the bytes are copied out before any JavaScript runs again.
        return Ok(unsafe { bytes.as_bytes() }.map(<[u8]>::to_vec).unwrap_or_default());
    }
    if let Some(buffer) = ArrayBuffer::from_value(answer.clone()) {
        // SAFETY: as above.
        return Ok(unsafe { buffer.as_bytes() }.map(<[u8]>::to_vec).unwrap_or_default());
    }
    match ctx.json_stringify(answer).catch(ctx).map_err(describe)? {
        Some(json) => json.to_string().map(String::into_bytes).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}

/// Calls the handler with `request` and drives its promise, if it returns one, to its end.
fn call<'js>(ctx: &Ctx<'js>, handler: &Persistent<Function<'static>>, request: String) -> Result<Vec<u8>, String> {
    let handler = handler.clone().restore(ctx).map_err(|e| e.to_string())?;
    let mut answer: Value = handler.call((request,)).catch(ctx).map_err(describe)?;
    if let Some(promise) = answer.as_promise() {
        answer = promise.finish::<Value>().catch(ctx).map_err(|e| match e {
            CaughtError::Error(rquickjs::Error::WouldBlock) => {
                "the handler's promise never settled: nothing was left to run".to_string()
            }
            e => describe(e),
        })?;
    }
    while ctx.execute_pending_job() {}
    response(ctx, answer)
}

/// Answers one request: stdin is the request, stdout the response.
#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    RANDOM.set(None);
    let mut request = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut request) {
        fail(&format!("thaw-js: reading the request: {e}"));
    }
    let request = String::from_utf8_lossy(&request).into_owned();
    let answered = LOADED.with_borrow(|loaded| {
        let Some(loaded) = loaded else { return Err("thaw-js: the function was not initialized".to_string()) };
        loaded.context.with(|ctx| call(&ctx, &loaded.handler, request))
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
