// The `node:fs` subset of thaw's JavaScript runtime, written over the native file calls of
// fs.rs (`native`), which throw Node-style errors (`code`, `syscall`, `path`). Returns the
// module's exports; `node:fs/promises` is the `promises` export.
(native) => {
  const path = (p, name) => {
    if (typeof p !== "string") throw new TypeError(`${name}: the path must be a string, not ${typeof p}`);
    return p;
  };
  const encodingOf = (options) => (typeof options === "string" ? options : options?.encoding ?? null);
  const text = (encoding, name) => {
    if (encoding === null || encoding === undefined || encoding === "buffer") return false;
    if (/^utf-?8$/i.test(encoding)) return true;
    throw new TypeError(`${name}: only the utf8 encoding is supported, not ${encoding}`);
  };
  const bytes = (data, name) => {
    if (typeof data === "string") return native.encode(data);
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    throw new TypeError(`${name}: the data must be a string, an ArrayBuffer or a typed array`);
  };

  function readFileSync(file, options) {
    const raw = native.read(path(file, "readFileSync"));
    return text(encodingOf(options), "readFileSync") ? native.decode(raw) : raw;
  }
  function writeFileSync(file, data, options) {
    const append = typeof options === "object" && options !== null && String(options.flag ?? "w").startsWith("a");
    native.write(path(file, "writeFileSync"), bytes(data, "writeFileSync"), append);
  }
  function appendFileSync(file, data) {
    native.write(path(file, "appendFileSync"), bytes(data, "appendFileSync"), true);
  }
  function existsSync(file) {
    return typeof file === "string" && native.exists(file);
  }
  function readdirSync(dir) {
    return native.list(path(dir, "readdirSync"));
  }
  function mkdirSync(dir, options) {
    const recursive = options?.recursive === true;
    native.mkdir(path(dir, "mkdirSync"), recursive);
    return recursive ? dir : undefined;
  }
  function statSync(file) {
    const [kind, size, mtimeMs] = native.stat(path(file, "statSync"));
    return {
      size,
      mtimeMs,
      mtime: new Date(mtimeMs),
      isFile: () => kind === "file",
      isDirectory: () => kind === "directory",
      isSymbolicLink: () => false,
    };
  }
  function rmSync(file, options) {
    try {
      native.remove(path(file, "rmSync"), options?.recursive === true, "rm");
    } catch (error) {
      if (!(options?.force === true && error.code === "ENOENT")) throw error;
    }
  }
  function unlinkSync(file) {
    native.remove(path(file, "unlinkSync"), false, "unlink");
  }
  function rmdirSync(dir) {
    native.remove(path(dir, "rmdirSync"), false, "rmdir");
  }
  function renameSync(from, to) {
    native.rename(path(from, "renameSync"), path(to, "renameSync"));
  }

  const sync = { readFileSync, writeFileSync, appendFileSync, existsSync, readdirSync, mkdirSync, statSync, rmSync, unlinkSync, rmdirSync, renameSync };
  const promised = (f) => async (...args) => f(...args);
  const promises = {
    readFile: promised(readFileSync),
    writeFile: promised(writeFileSync),
    appendFile: promised(appendFileSync),
    readdir: promised(readdirSync),
    mkdir: promised(mkdirSync),
    stat: promised(statSync),
    rm: promised(rmSync),
    unlink: promised(unlinkSync),
    rmdir: promised(rmdirSync),
    rename: promised(renameSync),
  };
  return { ...sync, promises };
}
