// `URL` and `URLSearchParams` for thaw's JavaScript runtime, after the WHATWG URL Standard: the
// parser's states for special schemes (http, https, ws, wss, ftp, file) and for others (an
// opaque path, or a path after "//host"), relative references against a base, the standard's
// percent-encode sets, dot segments, default ports and IPv4 numbers. Hosts are ASCII: a host
// with other characters (which needs IDNA) is refused with a TypeError, as an invalid URL is.
// Evaluated once, in init, by globals.rs.
() => {
  const define = (name, value) =>
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: false });

  const SPECIAL = { "ftp:": 21, "file:": null, "http:": 80, "https:": 443, "ws:": 80, "wss:": 443 };
  const isSpecial = (scheme) => scheme in SPECIAL;
  const invalid = (input) => new TypeError(`Invalid URL: ${input}`);

  // Percent-encode sets, as predicates on a code point.
  const C0 = (c) => c < 0x20 || c > 0x7e;
  const FRAGMENT = (c) => C0(c) || c === 0x20 || c === 0x22 || c === 0x3c || c === 0x3e || c === 0x60;
  const QUERY = (c) => C0(c) || c === 0x20 || c === 0x22 || c === 0x23 || c === 0x3c || c === 0x3e;
  const SPECIAL_QUERY = (c) => QUERY(c) || c === 0x27;
  const PATH = (c) => QUERY(c) || c === 0x3f || c === 0x5e || c === 0x60 || c === 0x7b || c === 0x7d;
  const USERINFO = (c) => PATH(c) || c === 0x2f || c === 0x3a || c === 0x3b || c === 0x3d || c === 0x40 ||
    (c >= 0x5b && c <= 0x5d) || c === 0x7c;
  const FORM = (c) => !(
    (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) ||
    c === 0x2a || c === 0x2d || c === 0x2e || c === 0x5f
  );

  const encoder = new TextEncoder();
  const decoder = new TextDecoder();
  const hex = (b) => "%" + b.toString(16).toUpperCase().padStart(2, "0");
  // `text` with every code point in `set` percent-encoded as UTF-8 (a lone surrogate as U+FFFD).
  function encode(text, set, spaceAsPlus = false) {
    let out = "";
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (spaceAsPlus && c === 0x20) out += "+";
      else if (!set(c)) out += ch;
      else for (const b of encoder.encode(ch)) out += hex(b);
    }
    return out;
  }
  // Percent-decodes `text` to its bytes and reads them as UTF-8.
  function decode(text) {
    const bytes = [];
    for (let i = 0; i < text.length; i++) {
      const ch = text[i];
      if (ch === "%" && /^[0-9a-fA-F]{2}$/.test(text.slice(i + 1, i + 3))) {
        bytes.push(parseInt(text.slice(i + 1, i + 3), 16));
        i += 2;
      } else {
        bytes.push(...encoder.encode(ch));
      }
    }
    return decoder.decode(new Uint8Array(bytes));
  }

  // An IPv4 part: decimal, 0x hex or 0 octal; NaN if not a number.
  function ipv4Number(part) {
    if (part === "") return NaN;
    let radix = 10;
    if (/^0[xX]/.test(part)) { part = part.slice(2); radix = 16; }
    else if (part.length > 1 && part[0] === "0") { part = part.slice(1); radix = 8; }
    if (part === "") return 0;
    const digits = radix === 16 ? /^[0-9a-fA-F]+$/ : radix === 8 ? /^[0-7]+$/ : /^[0-9]+$/;
    return digits.test(part) ? parseInt(part, radix) : NaN;
  }
  // The host, parsed: an IPv4 address when its last label is a number, else a lowercased
  // domain of allowed code points.
  function parseHost(input, special, whole) {
    if (input.startsWith("[")) {
      if (!input.endsWith("]") || !/^\[[0-9a-fA-F:.]+\]$/.test(input)) throw invalid(whole);
      return input.toLowerCase();
    }
    if (!special) {
      if (/[\0\t\n\r #/:<>?@[\\\]^|]/.test(input)) throw invalid(whole);
      return encode(input, C0);
    }
    const domain = decode(input).toLowerCase();
    if (domain === "" || /[^\x21-\x7e]/.test(domain) || /[\0\t\n\r #%/:<>?@[\\\]^|]/.test(domain)) {
      throw invalid(whole);
    }
    const labels = domain.split(".");
    if (labels.length > 1 && labels[labels.length - 1] === "") labels.pop();
    const last = labels[labels.length - 1];
    if (!/^([0-9]+|0[xX][0-9a-fA-F]*)$/.test(last)) return domain;
    if (labels.length > 4) throw invalid(whole);
    const numbers = labels.map(ipv4Number);
    if (numbers.some(Number.isNaN)) throw invalid(whole);
    if (numbers.slice(0, -1).some((n) => n > 255) || numbers[numbers.length - 1] >= 256 ** (5 - numbers.length)) {
      throw invalid(whole);
    }
    let address = numbers[numbers.length - 1];
    numbers.slice(0, -1).forEach((n, i) => { address += n * 256 ** (3 - i); });
    return [24, 16, 8, 0].map((shift) => Math.floor(address / 2 ** shift) % 256).join(".");
  }

  const isWindowsLetter = (s) => /^[a-zA-Z][:|]$/.test(s);
  const isSingleDot = (s) => s === "." || s.toLowerCase() === "%2e";
  const isDoubleDot = (s) => ["..", ".%2e", "%2e.", "%2e%2e"].includes(s.toLowerCase());

  // Adds the path segments of `text` to `path` (an array), resolving dot segments.
  function pushPath(record, text) {
    const special = isSpecial(record.scheme);
    const segments = special ? text.split(/[/\\]/) : text.split("/");
    segments.forEach((segment, i) => {
      const last = i === segments.length - 1;
      if (isDoubleDot(segment)) {
        if (record.path.length && !(record.scheme === "file:" && record.path.length === 1 && isWindowsLetter(record.path[0]))) {
          record.path.pop();
        }
        if (last) record.path.push("");
      } else if (isSingleDot(segment)) {
        if (last) record.path.push("");
      } else {
        if (record.scheme === "file:" && record.path.length === 0 && isWindowsLetter(segment)) {
          segment = segment[0] + ":";
        }
        record.path.push(encode(segment, PATH));
      }
    });
  }

  // Parses `input` against `base` (a record or null) into a record, or throws.
  function parse(input, base) {
    const whole = input;
    input = input.replace(/^[\0- ]+|[\0- ]+$/g, "").replace(/[\t\n\r]/g, "");
    const record = { scheme: "", username: "", password: "", host: null, port: null, path: [], opaque: null, query: null, fragment: null };
    let rest = input;
    const hash = rest.indexOf("#");
    if (hash >= 0) { record.fragment = encode(rest.slice(hash + 1), FRAGMENT); rest = rest.slice(0, hash); }
    const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(rest);
    const setQuery = (text, special) => { record.query = encode(text, special ? SPECIAL_QUERY : QUERY); };
    const splitQuery = (text) => {
      const q = text.indexOf("?");
      if (q < 0) return text;
      setQuery(text.slice(q + 1), isSpecial(record.scheme));
      return text.slice(0, q);
    };
    const authority = (text) => {
      // text starts after "//": authority, then path.
      const special = isSpecial(record.scheme);
      const end = text.search(special ? /[/\\?]/ : /[/?]/);
      let auth = end < 0 ? text : text.slice(0, end);
      const after = end < 0 ? "" : text.slice(end);
      const at = auth.lastIndexOf("@");
      if (at >= 0) {
        const info = auth.slice(0, at);
        const colon = info.indexOf(":");
        record.username = encode(colon < 0 ? info : info.slice(0, colon), USERINFO);
        if (colon >= 0) record.password = encode(info.slice(colon + 1), USERINFO);
        auth = auth.slice(at + 1);
      }
      const port = /:([0-9]*)$/.exec(auth);
      let hostText = auth;
      if (port && !auth.endsWith("]")) {
        hostText = auth.slice(0, port.index);
        if (port[1] !== "") {
          const number = parseInt(port[1], 10);
          if (number > 65535) throw invalid(whole);
          record.port = number === SPECIAL[record.scheme] ? null : number;
        }
      } else if (/:[^\]]*$/.test(auth) && !auth.startsWith("[")) {
        throw invalid(whole);
      }
      if (hostText === "" && special && record.scheme !== "file:") throw invalid(whole);
      if (hostText === "" && (record.username || record.password || record.port !== null)) throw invalid(whole);
      record.host = hostText === "" ? "" : parseHost(hostText, special, whole);
      if (record.scheme === "file:" && record.host === "localhost") record.host = "";
      return after;
    };
    if (scheme) {
      record.scheme = scheme[1].toLowerCase() + ":";
      let after = rest.slice(scheme[0].length);
      const special = isSpecial(record.scheme);
      if (special && base && base.scheme === record.scheme && record.scheme !== "file:" && !/^[/\\]{2}/.test(after)) {
        // "http:foo" and "http:/foo" against an http base are relative.
        return relative(after, base, record, whole);
      }
      if (record.scheme === "file:") {
        if (/^[/\\]{2}/.test(after)) {
          after = authority(after.slice(2));
          if (isWindowsLetter(record.host ?? "")) { after = "/" + record.host + after; record.host = ""; }
        } else {
          record.host = "";
          if (base && base.scheme === "file:" && !/^[/\\]/.test(after)) return relative(after, base, record, whole);
        }
        pushPath(record, splitQuery(after).replace(/^[/\\]/, ""));
        return record;
      }
      if (special) {
        after = after.replace(/^[/\\]*/, "");
        after = authority(after);
        pushPath(record, splitQuery(after).replace(/^[/\\]/, ""));
        return record;
      }
      if (after.startsWith("//")) {
        after = authority(after.slice(2));
        after = splitQuery(after);
        if (after !== "") pushPath(record, after.slice(1));
        return record;
      }
      after = splitQuery(after);
      if (after.startsWith("/")) {
        pushPath(record, after.slice(1));
      } else {
        record.opaque = encode(after, C0);
      }
      return record;
    }
    if (!base) throw invalid(whole);
    if (base.opaque !== null) {
      if (rest !== "" || hash < 0) throw invalid(whole);
      return { ...base, path: [], fragment: record.fragment };
    }
    record.scheme = base.scheme;
    return relative(rest, base, record, whole);
  }

  // `rest` (no scheme, no fragment) resolved against `base` into `record`.
  function relative(rest, base, record, whole) {
    const special = isSpecial(record.scheme);
    const slash = special ? /^[/\\]/ : /^\//;
    const doubleSlash = special ? /^[/\\]{2}/ : /^\/\//;
    const inherit = () => {
      record.username = base.username; record.password = base.password;
      record.host = base.host; record.port = base.port;
    };
    const split = (text) => {
      const q = text.indexOf("?");
      if (q < 0) return text;
      record.query = encode(text.slice(q + 1), special ? SPECIAL_QUERY : QUERY);
      return text.slice(0, q);
    };
    if (doubleSlash.test(rest)) {
      const again = parse(`${record.scheme}${rest}`, null);
      again.fragment = record.fragment;
      return again;
    }
    inherit();
    if (slash.test(rest)) {
      pushPath(record, split(rest).slice(1));
      return record;
    }
    if (rest === "") {
      record.path = base.path.slice();
      record.query = base.query;
      return record;
    }
    if (rest.startsWith("?")) {
      record.path = base.path.slice();
      split(rest);
      return record;
    }
    // A file path that starts with a drive letter starts afresh.
    const drive = record.scheme === "file:" && /^[a-zA-Z][:|]([/\\?#]|$)/.test(rest);
    record.path = drive ? [] : base.path.slice(0, -1);
    pushPath(record, split(rest));
    return record;
  }

  const serializePath = (r) => (r.opaque !== null ? r.opaque : r.path.map((s) => "/" + s).join(""));
  function serialize(r, withFragment = true) {
    let out = r.scheme;
    if (r.host !== null) {
      out += "//";
      if (r.username || r.password) out += r.username + (r.password ? ":" + r.password : "") + "@";
      out += r.host + (r.port !== null ? ":" + r.port : "");
    } else if (r.opaque === null && r.path.length > 1 && r.path[0] === "") {
      out += "/.";
    }
    out += serializePath(r);
    if (r.query !== null) out += "?" + r.query;
    if (withFragment && r.fragment !== null) out += "#" + r.fragment;
    return out;
  }

  const records = new WeakMap();
  const linked = new WeakMap();
  // A URL's searchParams: tied to it (linkParams), and parsed again when its query is set.
  let linkParams, resetParams;

  class URLSearchParams {
    #list = [];
    #url = null;
    constructor(init = "") {
      if (typeof init === "object" && init !== null) {
        if (typeof init[Symbol.iterator] === "function") {
          for (const pair of init) {
            const items = [...pair];
            if (items.length !== 2) throw new TypeError("URLSearchParams: each pair must have two items");
            this.#list.push([String(items[0]), String(items[1])]);
          }
        } else {
          for (const key of Object.keys(init)) this.#list.push([key, String(init[key])]);
        }
      } else {
        this.#list = URLSearchParams.#parse(String(init).replace(/^\?/, ""));
      }
    }
    static #parse(text) {
      const list = [];
      for (const part of text.split("&")) {
        if (part === "") continue;
        const eq = part.indexOf("=");
        const name = eq < 0 ? part : part.slice(0, eq);
        const value = eq < 0 ? "" : part.slice(eq + 1);
        list.push([decode(name.replace(/\+/g, " ")), decode(value.replace(/\+/g, " "))]);
      }
      return list;
    }
    static {
      linkParams = (params, url) => { params.#url = url; };
      resetParams = (params, query) => { params.#list = URLSearchParams.#parse(query ?? ""); };
    }
    #update() {
      if (this.#url === null) return;
      const record = records.get(this.#url);
      const text = this.toString();
      record.query = text === "" ? null : text;
    }
    get size() { return this.#list.length; }
    append(name, value) { this.#list.push([String(name), String(value)]); this.#update(); }
    delete(name, value) {
      name = String(name);
      this.#list = this.#list.filter(([n, v]) => n !== name || (value !== undefined && v !== String(value)));
      this.#update();
    }
    get(name) { const found = this.#list.find(([n]) => n === String(name)); return found ? found[1] : null; }
    getAll(name) { return this.#list.filter(([n]) => n === String(name)).map(([, v]) => v); }
    has(name, value) {
      return this.#list.some(([n, v]) => n === String(name) && (value === undefined || v === String(value)));
    }
    set(name, value) {
      name = String(name);
      const at = this.#list.findIndex(([n]) => n === name);
      if (at < 0) this.#list.push([name, String(value)]);
      else {
        this.#list[at] = [name, String(value)];
        this.#list = this.#list.filter(([n], i) => i <= at || n !== name);
      }
      this.#update();
    }
    sort() {
      // Stable, by UTF-16 code units, as the standard says.
      this.#list = this.#list.map((pair, i) => [pair, i]).sort(([a, i], [b, j]) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : i - j)).map(([pair]) => pair);
      this.#update();
    }
    forEach(callback, thisArg) { for (const [n, v] of this.#list) callback.call(thisArg, v, n, this); }
    *entries() { for (const [n, v] of this.#list) yield [n, v]; }
    *keys() { for (const [n] of this.#list) yield n; }
    *values() { for (const [, v] of this.#list) yield v; }
    [Symbol.iterator]() { return this.entries(); }
    toString() { return this.#list.map(([n, v]) => encode(n, FORM, true) + "=" + encode(v, FORM, true)).join("&"); }
    get [Symbol.toStringTag]() { return "URLSearchParams"; }
  }

  class URL {
    constructor(url, base) {
      const baseRecord = base === undefined ? null : parse(String(base), null);
      records.set(this, parse(String(url), baseRecord));
    }
    static canParse(url, base) {
      try { new URL(url, base); return true; } catch { return false; }
    }
    static parse(url, base) {
      try { return new URL(url, base); } catch { return null; }
    }
    get #r() { return records.get(this); }
    get href() { return serialize(this.#r); }
    set href(value) { records.set(this, parse(String(value), null)); this.#sync(); }
    get origin() {
      const r = this.#r;
      if (r.scheme === "blob:") {
        try { return new URL(serializePath(r)).origin; } catch { return "null"; }
      }
      if (!isSpecial(r.scheme) || r.scheme === "file:") return "null";
      return r.scheme + "//" + r.host + (r.port !== null ? ":" + r.port : "");
    }
    get protocol() { return this.#r.scheme; }
    get username() { return this.#r.username; }
    set username(v) { const r = this.#r; if (r.host) r.username = encode(String(v), USERINFO); }
    get password() { return this.#r.password; }
    set password(v) { const r = this.#r; if (r.host) r.password = encode(String(v), USERINFO); }
    get host() { const r = this.#r; return r.host === null ? "" : r.host + (r.port !== null ? ":" + r.port : ""); }
    get hostname() { return this.#r.host ?? ""; }
    set hostname(v) {
      const r = this.#r;
      if (r.opaque === null) { try { r.host = parseHost(String(v), isSpecial(r.scheme), String(v)); } catch {} }
    }
    get port() { const p = this.#r.port; return p === null ? "" : String(p); }
    set port(v) {
      const r = this.#r;
      const digits = /^[0-9]*/.exec(String(v))[0];
      if (r.host === null || r.host === "" || r.scheme === "file:") return;
      if (digits === "") { if (String(v) === "") r.port = null; return; }
      const n = parseInt(digits, 10);
      if (n <= 65535) r.port = n === SPECIAL[r.scheme] ? null : n;
    }
    get pathname() { return serializePath(this.#r); }
    set pathname(v) {
      const r = this.#r;
      if (r.opaque !== null) return;
      r.path = [];
      const text = String(v);
      pushPath(r, isSpecial(r.scheme) ? text.replace(/^[/\\]/, "") : text.replace(/^\//, ""));
    }
    get search() { const q = this.#r.query; return q === null || q === "" ? "" : "?" + q; }
    set search(v) {
      const r = this.#r;
      const text = String(v).replace(/^\?/, "");
      r.query = text === "" ? null : encode(text, isSpecial(r.scheme) ? SPECIAL_QUERY : QUERY);
      this.#sync();
    }
    get searchParams() {
      let params = linked.get(this);
      if (!params) {
        params = new URLSearchParams(this.#r.query ?? "");
        linkParams(params, this);
        linked.set(this, params);
      }
      return params;
    }
    get hash() { const f = this.#r.fragment; return f === null || f === "" ? "" : "#" + f; }
    set hash(v) {
      const text = String(v).replace(/^#/, "");
      this.#r.fragment = text === "" ? null : encode(text, FRAGMENT);
    }
    #sync() { const params = linked.get(this); if (params) resetParams(params, this.#r.query); }
    toString() { return this.href; }
    toJSON() { return this.href; }
    get [Symbol.toStringTag]() { return "URL"; }
  }
  define("URL", URL);
  define("URLSearchParams", URLSearchParams);
}
