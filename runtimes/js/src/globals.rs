//! The globals a function sees beyond the language's own, and their native halves: `console`,
//! `Math.random`, the Web globals of `web.js` (`TextEncoder`, `TextDecoder`, `crypto`, timers,
//! `structuredClone`) over the UTF-8 and entropy helpers here, and `URL` and `URLSearchParams`
//! (`url.js`).

use std::cell::Cell;
use std::io::Write as _;

use rquickjs::prelude::Rest;
use rquickjs::{ArrayBuffer, Coerced, Ctx, Function, Object, TypedArray, Value};

thread_local! {
    /// `Math.random`'s state, seeded on its first use in each request (`None` until then).
    static RANDOM: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether a timer was set since the timers were last cancelled: until one is, a request
    /// never calls into `web.js`'s timers.
    static TIMERS_SET: Cell<bool> = const { Cell::new(false) };
}

/// Whether a timer may be waiting ([`TIMERS_SET`]).
pub fn timers_set() -> bool {
    TIMERS_SET.get()
}

/// Records that the timers were all cancelled.
pub fn timers_cancelled() {
    TIMERS_SET.set(false);
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
        crate::fail(&format!("thaw-js: random_get failed with WASI errno {errno}"));
    }
}

/// Forgets `Math.random`'s state, so that its next use in this request seeds it afresh.
pub fn reseed_math_random() {
    RANDOM.set(None);
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

/// `TextEncoder.encode`'s native half: `text` as UTF-8.
pub fn encode_utf8<'js>(ctx: Ctx<'js>, text: String) -> rquickjs::Result<TypedArray<'js, u8>> {
    TypedArray::new(ctx, text.into_bytes())
}

/// `value` as an `ArrayBuffer`, if it is one. (rquickjs's `ArrayBuffer::from_value` finds out by
/// asking the engine for the buffer, which throws a `TypeError`, stack trace and all, for
/// anything else, and leaves it pending.)
pub fn array_buffer(value: Value<'_>) -> Option<ArrayBuffer<'_>> {
    // SAFETY: only reads the class of `value`, a live value of this context.
    let is_buffer = unsafe { rquickjs::qjs::JS_IsArrayBuffer(value.as_raw()) };
    is_buffer.then(|| ArrayBuffer::from_value(value)).flatten()
}

/// The bytes of a `Uint8Array` or an `ArrayBuffer`, copied; `None` for any other value.
pub fn bytes_of(value: &Value<'_>) -> Option<Vec<u8>> {
    if let Ok(array) = TypedArray::<u8>::from_value(value.clone()) {
        // SAFETY: the bytes are copied out before any JavaScript runs again.
        return Some(unsafe { array.as_bytes() }.map(<[u8]>::to_vec).unwrap_or_default());
    }
    let buffer = array_buffer(value.clone())?;
    // SAFETY: as above.
    Some(unsafe { buffer.as_bytes() }.map(<[u8]>::to_vec).unwrap_or_default())
}

/// `TextDecoder.decode`'s native half: the bytes of a `Uint8Array` or an `ArrayBuffer` as
/// text, invalid UTF-8 replaced (U+FFFD), as the WHATWG decoder does by default.
pub fn decode_utf8(bytes: Value<'_>) -> rquickjs::Result<String> {
    match bytes_of(&bytes) {
        Some(raw) => Ok(String::from_utf8_lossy(&raw).into_owned()),
        None => Err(rquickjs::Error::new_from_js_message(
            "value",
            "Uint8Array",
            "TextDecoder.decode takes a Uint8Array or an ArrayBuffer",
        )),
    }
}

/// `crypto`'s native half: `count` bytes (at most 64 KiB) of the host's entropy.
fn random_u8<'js>(ctx: Ctx<'js>, count: usize) -> rquickjs::Result<TypedArray<'js, u8>> {
    let mut bytes = vec![0; count.min(65536)];
    random_bytes(&mut bytes);
    TypedArray::new(ctx, bytes)
}

/// Installs the globals: `console`, whose every method writes one line to stderr (stdout is the
/// response); a `Math.random` that differs in every restored VM ([`math_random`]); and the Web
/// globals of `web.js`. Returns the runtime's handle on the timers (`next`, `fire`, `cancel`).
pub fn install<'js>(ctx: &Ctx<'js>) -> rquickjs::Result<Object<'js>> {
    let math: Object = ctx.globals().get("Math")?;
    // Named as the one it replaces: test262 checks `Math.random.name`.
    math.set("random", Function::new(ctx.clone(), math_random)?.with_name("random")?)?;
    let native = Object::new(ctx.clone())?;
    native.set("encode", Function::new(ctx.clone(), encode_utf8)?)?;
    native.set("decode", Function::new(ctx.clone(), decode_utf8)?)?;
    native.set("random", Function::new(ctx.clone(), random_u8)?)?;
    native.set("timerSet", Function::new(ctx.clone(), || TIMERS_SET.set(true))?)?;
    let web: Function = ctx.eval(include_str!("web.js"))?;
    let timers: Object = web.call((native,))?;
    let url: Function = ctx.eval(include_str!("url.js"))?;
    url.call::<_, ()>(())?;
    let console = Object::new(ctx.clone())?;
    for method in ["log", "info", "debug", "warn", "error", "trace"] {
        console.set(method, Function::new(ctx.clone(), console_write)?)?;
    }
    ctx.globals().set("console", console)?;
    Ok(timers)
}

/// Work a handler almost always does, done once in init on values of the runtime's own, so that
/// what the engine builds on its first use of each (atoms, object shapes, its parsers' state) is
/// in the snapshot instead of being built again in every request from a restored or reset VM.
/// It touches no state a function can see.
const WARM_UP: &str = r#"(() => {
  const request = JSON.parse('{"name":"warm","n":1.5,"list":[1,"two",null,true],"nested":{"a":{}}}');
  const { name, n = 0 } = request;
  const text = `Hello, ${name ?? "world"}! ${n.toFixed(1)} ${String(request.list.length)}`;
  JSON.stringify({ greeting: text, list: request.list.map((x) => x), nested: request.nested });
  Object.keys(request).join(",").split(",").indexOf("name");
  text.toUpperCase().replace(/l+/g, "L").trim().startsWith("H");
  return Promise.resolve(text).then((x) => x.length);
})"#;

/// Runs [`WARM_UP`] and the jobs it queues.
pub fn warm_up(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let warm: Function = ctx.eval(WARM_UP)?;
    warm.call::<_, Value>(())?;
    while ctx.execute_pending_job() {}
    Ok(())
}
