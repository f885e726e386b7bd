// The Web globals of thaw's JavaScript runtime, written in JavaScript over the runtime's native
// helpers (`native`: encode, decode, random and timerSet, from globals.rs). Evaluated once, in init; what it
// returns is the runtime's own handle on the timers, which functions cannot reach.
(native) => {
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

  // Timers, on performance.now's clock. The runtime runs them while the answer is pending (waiting
  // for the earliest), then those already due; the rest are cancelled with the request.
  const timers = new Map();
  let lastId = 0;
  const schedule = (name, callback, delay, args, repeat) => {
    if (typeof callback !== "function") {
      throw new TypeError(`${name}: the callback must be a function, not ${typeof callback}`);
    }
    delay = Number(delay);
    delay = Number.isFinite(delay) && delay > 0 ? delay : 0;
    const id = ++lastId;
    native.timerSet();
    timers.set(id, { id, callback, args, delay, repeat, due: performance.now() + delay });
    return id;
  };
  const earliest = () => {
    let first;
    for (const timer of timers.values()) {
      if (first === undefined || timer.due < first.due) first = timer;
    }
    return first;
  };
  const clear = (id) => { timers.delete(Number(id)); };

  const DataCloneError = (what) => {
    const error = new Error(`structuredClone: ${what} cannot be cloned`);
    error.name = "DataCloneError";
    return error;
  };
  const TYPED = [Int8Array, Uint8Array, Uint8ClampedArray, Int16Array, Uint16Array, Int32Array, Uint32Array,
    Float32Array, Float64Array, BigInt64Array, BigUint64Array];
  const ERRORS = { Error, EvalError, RangeError, ReferenceError, SyntaxError, TypeError, URIError };
  // The structured clone algorithm for the values a function holds: primitives, plain objects and
  // arrays (own enumerable string keys), Date, RegExp, Map, Set, ArrayBuffer, typed arrays,
  // DataView, errors and primitive wrappers, with shared and cyclic references kept. Functions,
  // symbols, promises and weak collections are a DataCloneError, as on the Web.
  function structuredClone(value, options) {
    if (options !== undefined && options !== null && options.transfer !== undefined && [...options.transfer].length) {
      throw DataCloneError("a transfer list");
    }
    const seen = new Map();
    const copyKeys = (from, to) => {
      for (const key of Object.keys(from)) to[key] = clone(from[key]);
      return to;
    };
    const clone = (v) => {
      if (typeof v === "symbol") throw DataCloneError(`the symbol ${String(v)}`);
      if (typeof v === "function") throw DataCloneError(`the function ${v.name || "(anonymous)"}`);
      if (v === null || typeof v !== "object") return v;
      if (seen.has(v)) return seen.get(v);
      const keep = (copy) => { seen.set(v, copy); return copy; };
      if (Array.isArray(v)) return copyKeys(v, keep(new Array(v.length)));
      if (v instanceof Date) return keep(new Date(v.getTime()));
      if (v instanceof RegExp) return keep(new RegExp(v.source, v.flags));
      if (v instanceof ArrayBuffer) return keep(v.slice(0));
      if (v instanceof DataView) return keep(new DataView(clone(v.buffer), v.byteOffset, v.byteLength));
      for (const Typed of TYPED) {
        if (v instanceof Typed) return keep(new Typed(clone(v.buffer), v.byteOffset, v.length));
      }
      if (v instanceof Map) {
        const copy = keep(new Map());
        for (const [key, item] of v) copy.set(clone(key), clone(item));
        return copy;
      }
      if (v instanceof Set) {
        const copy = keep(new Set());
        for (const item of v) copy.add(clone(item));
        return copy;
      }
      if (v instanceof Error) {
        const Kind = ERRORS[v.name] ?? Error;
        const copy = keep(new Kind(String(v.message)));
        if ("stack" in v) copy.stack = String(v.stack);
        if ("cause" in v) copy.cause = clone(v.cause);
        return copy;
      }
      if (v instanceof Boolean || v instanceof Number || v instanceof String || v instanceof BigInt) {
        return keep(Object(v.valueOf()));
      }
      const tag = Object.prototype.toString.call(v);
      if (tag !== "[object Object]") throw DataCloneError(`a ${tag.slice(8, -1)}`);
      return copyKeys(v, keep({}));
    };
    return clone(value);
  }

  define("TextEncoder", TextEncoder);
  define("TextDecoder", TextDecoder);
  define("crypto", crypto);
  define("setTimeout", (callback, delay, ...args) => schedule("setTimeout", callback, delay, args, false));
  define("setInterval", (callback, delay, ...args) => schedule("setInterval", callback, delay, args, true));
  define("clearTimeout", clear);
  define("clearInterval", clear);
  define("structuredClone", structuredClone);

  return {
    // When the earliest timer is due, on performance.now's clock, or -1 if none is waiting.
    next() {
      const first = earliest();
      return first === undefined ? -1 : first.due;
    },
    // Runs the earliest timer if it is due now, or with `waited` in any case (the runtime waited
    // for it as long as the clock lets it: under QEMU the guest's clock stands still); says
    // whether it ran one.
    fire(waited) {
      const first = earliest();
      if (first === undefined || (!waited && first.due > performance.now())) return false;
      if (first.repeat) {
        first.due = performance.now() + Math.max(first.delay, 1);
      } else {
        timers.delete(first.id);
      }
      first.callback(...first.args);
      return true;
    },
    // Cancels every timer.
    cancel() { timers.clear(); },
  };
}
