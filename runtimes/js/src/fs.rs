//! The built-in modules `node:fs` and `node:fs/promises` (also importable as `fs` and
//! `fs/promises`): the file calls functions reach for first, over WASI through `std::fs`, on
//! the files the guest gives the function (its own at `/app`, read-only, and the scratch
//! directories). The JavaScript half is `fs.js`; the native calls here throw errors shaped as
//! Node's (`code`, `syscall`, `path`, and a message such as
//! `ENOENT: no such file or directory, open '/app/x'`).

use std::io::{ErrorKind, Write as _};

use rquickjs::module::{Declarations, Exports, ModuleDef};
use rquickjs::prelude::List;
use rquickjs::{Ctx, Exception, Function, Object, TypedArray, Value};

use crate::globals::{bytes_of, decode_utf8, encode_utf8};

/// The exports of `node:fs` besides `default`, which is all of them.
const FS_EXPORTS: [&str; 12] = [
    "readFileSync",
    "writeFileSync",
    "appendFileSync",
    "existsSync",
    "readdirSync",
    "mkdirSync",
    "statSync",
    "rmSync",
    "unlinkSync",
    "rmdirSync",
    "renameSync",
    "promises",
];

/// The exports of `node:fs/promises` besides `default`.
const PROMISES_EXPORTS: [&str; 10] =
    ["readFile", "writeFile", "appendFile", "readdir", "mkdir", "stat", "rm", "unlink", "rmdir", "rename"];

/// Node's error code and description for an I/O error.
fn code(error: &std::io::Error) -> (&'static str, &'static str) {
    match error.kind() {
        ErrorKind::NotFound => ("ENOENT", "no such file or directory"),
        ErrorKind::AlreadyExists => ("EEXIST", "file already exists"),
        ErrorKind::PermissionDenied => ("EACCES", "permission denied"),
        ErrorKind::ReadOnlyFilesystem => ("EROFS", "read-only file system"),
        ErrorKind::IsADirectory => ("EISDIR", "illegal operation on a directory"),
        ErrorKind::NotADirectory => ("ENOTDIR", "not a directory"),
        ErrorKind::DirectoryNotEmpty => ("ENOTEMPTY", "directory not empty"),
        ErrorKind::StorageFull | ErrorKind::OutOfMemory => ("ENOSPC", "no space left on device"),
        ErrorKind::InvalidInput | ErrorKind::InvalidFilename => ("EINVAL", "invalid argument"),
        ErrorKind::Unsupported => ("ENOTSUP", "operation not supported"),
        _ => ("EIO", "i/o error"),
    }
}

/// `error`, met by `syscall` on `path`, thrown as a Node-style error.
fn throw(ctx: &Ctx<'_>, error: &std::io::Error, syscall: &str, path: &str) -> rquickjs::Error {
    let (code, description) = code(error);
    let made = Exception::from_message(ctx.clone(), &format!("{code}: {description}, {syscall} '{path}'")).and_then(
        |exception| {
            let object = exception.as_object();
            object.set("code", code)?;
            object.set("syscall", syscall)?;
            object.set("path", path)?;
            Ok(exception)
        },
    );
    match made {
        Ok(exception) => exception.throw(),
        Err(e) => e,
    }
}

fn read<'js>(ctx: Ctx<'js>, path: String) -> rquickjs::Result<TypedArray<'js, u8>> {
    let bytes = std::fs::read(&path).map_err(|e| throw(&ctx, &e, "open", &path))?;
    TypedArray::new(ctx, bytes)
}

fn write<'js>(ctx: Ctx<'js>, path: String, data: Value<'js>, append: bool) -> rquickjs::Result<()> {
    let bytes = bytes_of(&data).unwrap_or_default();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .map_err(|e| throw(&ctx, &e, "open", &path))?;
    file.write_all(&bytes).map_err(|e| throw(&ctx, &e, "write", &path))
}

fn exists(path: String) -> bool {
    std::fs::exists(path).unwrap_or(false)
}

fn list(ctx: Ctx<'_>, path: String) -> rquickjs::Result<Vec<String>> {
    let entries = std::fs::read_dir(&path).map_err(|e| throw(&ctx, &e, "scandir", &path))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| throw(&ctx, &e, "scandir", &path))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn mkdir(ctx: Ctx<'_>, path: String, recursive: bool) -> rquickjs::Result<()> {
    let made = if recursive { std::fs::create_dir_all(&path) } else { std::fs::create_dir(&path) };
    made.map_err(|e| throw(&ctx, &e, "mkdir", &path))
}

/// `[kind, size, mtimeMs]`, kind "file", "directory" or "other".
fn stat(ctx: Ctx<'_>, path: String) -> rquickjs::Result<List<(&'static str, f64, f64)>> {
    let meta = std::fs::metadata(&path).map_err(|e| throw(&ctx, &e, "stat", &path))?;
    let kind = if meta.is_file() {
        "file"
    } else if meta.is_dir() {
        "directory"
    } else {
        "other"
    };
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    Ok(List((kind, meta.len() as f64, modified)))
}

fn remove(ctx: Ctx<'_>, path: String, recursive: bool, syscall: String) -> rquickjs::Result<()> {
    let meta = std::fs::symlink_metadata(&path).map_err(|e| throw(&ctx, &e, &syscall, &path))?;
    let removed = match (meta.is_dir(), syscall.as_str(), recursive) {
        (true, "unlink", _) => Err(std::io::Error::from(ErrorKind::IsADirectory)),
        (true, "rm", false) => Err(std::io::Error::from(ErrorKind::IsADirectory)),
        (true, "rm", true) => std::fs::remove_dir_all(&path),
        (true, _, _) => std::fs::remove_dir(&path),
        (false, "rmdir", _) => Err(std::io::Error::from(ErrorKind::NotADirectory)),
        (false, _, _) => std::fs::remove_file(&path),
    };
    removed.map_err(|e| throw(&ctx, &e, &syscall, &path))
}

fn rename(ctx: Ctx<'_>, from: String, to: String) -> rquickjs::Result<()> {
    std::fs::rename(&from, &to).map_err(|e| throw(&ctx, &e, "rename", &from))
}

/// Evaluates `fs.js` over the native calls: the object of `node:fs`'s exports.
fn exports<'js>(ctx: &Ctx<'js>) -> rquickjs::Result<Object<'js>> {
    let native = Object::new(ctx.clone())?;
    native.set("encode", Function::new(ctx.clone(), encode_utf8)?)?;
    native.set("decode", Function::new(ctx.clone(), decode_utf8)?)?;
    native.set("read", Function::new(ctx.clone(), read)?)?;
    native.set("write", Function::new(ctx.clone(), write)?)?;
    native.set("exists", Function::new(ctx.clone(), exists)?)?;
    native.set("list", Function::new(ctx.clone(), list)?)?;
    native.set("mkdir", Function::new(ctx.clone(), mkdir)?)?;
    native.set("stat", Function::new(ctx.clone(), stat)?)?;
    native.set("remove", Function::new(ctx.clone(), remove)?)?;
    native.set("rename", Function::new(ctx.clone(), rename)?)?;
    let make: Function = ctx.eval(include_str!("fs.js"))?;
    make.call((native,))
}

/// Exports `names` of `object`, and `object` itself as `default`.
fn export_all<'js>(exports: &Exports<'js>, object: Object<'js>, names: &[&str]) -> rquickjs::Result<()> {
    for &name in names {
        exports.export(name, object.get::<_, Value>(name)?)?;
    }
    exports.export("default", object)?;
    Ok(())
}

/// Declares `names` and `default`.
fn declare_all(declarations: &Declarations<'_>, names: &[&str]) -> rquickjs::Result<()> {
    for name in names.iter().chain(&["default"]) {
        declarations.declare(*name)?;
    }
    Ok(())
}

/// `node:fs`.
pub struct Fs;

impl ModuleDef for Fs {
    fn declare<'js>(declarations: &Declarations<'js>) -> rquickjs::Result<()> {
        declare_all(declarations, &FS_EXPORTS)
    }

    fn evaluate<'js>(ctx: &Ctx<'js>, exported: &Exports<'js>) -> rquickjs::Result<()> {
        export_all(exported, exports(ctx)?, &FS_EXPORTS)
    }
}

/// `node:fs/promises`.
pub struct FsPromises;

impl ModuleDef for FsPromises {
    fn declare<'js>(declarations: &Declarations<'js>) -> rquickjs::Result<()> {
        declare_all(declarations, &PROMISES_EXPORTS)
    }

    fn evaluate<'js>(ctx: &Ctx<'js>, exported: &Exports<'js>) -> rquickjs::Result<()> {
        let promises: Object = exports(ctx)?.get("promises")?;
        export_all(exported, promises, &PROMISES_EXPORTS)
    }
}
