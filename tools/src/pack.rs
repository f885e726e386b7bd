//! `thaw pack`: validate a wasm (or WAT) function, compile it ahead of time for the guest's
//! engine (`abi::engine`), and write both as a bundle; a JavaScript or Python function is packed
//! as its runtime's wasm with the function's files as its data volume (`js.rs`, `python.rs`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use abi::bundle::{self, Connection, GuestPathError, Manifest};
use clap::Args;
use host_vmm::function::{self, FunctionKind};

use crate::code::{self, Code, CodeCache, CodeError};
use crate::files::{FilesError, READ_WITHIN, read_limited, write_atomically};
use crate::js::JsError;
use crate::python::PyError;

/// Why a function could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Neither a file nor `--example`.
    #[error("give a .wasm or .wat file, or --example NAME")]
    NoInput,
    /// `--example` names no built-in example.
    #[error("no example {0}")]
    NoExample(String),
    /// The input is neither a wasm module nor WAT.
    #[error("{input}: not a wasm module, and not valid WAT: {message}")]
    NotWasm {
        /// The file, or "example NAME".
        input: String,
        /// The WAT parser's error on one line.
        message: String,
    },
    /// What went wrong packing `input`.
    #[error("{input}: {source}")]
    Input {
        /// The file, or "example NAME".
        input: String,
        /// What went wrong.
        source: Box<PackError>,
    },
    /// The module is not a function thaw runs.
    #[error(transparent)]
    Function(#[from] function::FunctionError),
    /// The module could not be compiled.
    #[error(transparent)]
    Code(#[from] CodeError),
    /// The bundle or its manifest is not valid.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// `--connect` is not `NAME=PORT`.
    #[error("{0:?} is not NAME=PORT")]
    NotConnection(String),
    /// `--connect`'s port is not a number.
    #[error("{text:?}: port {port:?} is not a number from 1 to 4294967294")]
    ConnectionPort {
        /// The whole option.
        text: String,
        /// The port as given.
        port: String,
    },
    /// `--data-dir`'s guest path is not UTF-8.
    #[error("--data-dir {spec}: the guest path {mount} is not UTF-8")]
    DataMountUtf8 {
        /// The whole option.
        spec: String,
        /// The guest path, lossily.
        mount: String,
    },
    /// `--data-dir`'s guest path is not a valid one.
    #[error("--data-dir {spec}: {source}")]
    DataMount {
        /// The whole option.
        spec: String,
        /// What is wrong with the path.
        source: GuestPathError,
    },
    /// A directory of `--data-dir` could not be read.
    #[error("--data-dir {}: {source}", path.display())]
    DataDirUnreadable {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name in `--data-dir` is not UTF-8.
    #[error("--data-dir: {} has a name that is not UTF-8: {name:?}", dir.display())]
    DataDirName {
        /// The directory holding it.
        dir: PathBuf,
        /// The name.
        name: OsString,
    },
    /// `--data-dir` holds more than a volume takes.
    #[error("--data-dir {}: more than 1 GiB of files", .0.display())]
    DataDirTooLarge(PathBuf),
    /// `--data-dir` holds a symlink, device or socket.
    #[error("--data-dir: {} is neither a regular file nor a directory (symlinks and devices are not packed)", .0.display())]
    DataDirEntry(PathBuf),
    /// The volume could not be built from `--data-dir`.
    #[error("--data-dir {}: {source}", dir.display())]
    Volume {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: abi::volume::VolumeError,
    },
    /// `--scratch-mib` is out of range.
    #[error("--scratch-mib {0}: outside 1..={max} MiB", max = bundle::MAX_SCRATCH_MIB)]
    ScratchMib(u32),
    /// `--scratch-dir` given more often than a function may have.
    #[error("--scratch-dir: given {0} times, more than the {max} in-memory directories a function may have", max = bundle::MAX_SCRATCH_DIRS)]
    ScratchDirCount(usize),
    /// A `--scratch-dir` is not a valid guest path.
    #[error("--scratch-dir {dir}: {source}")]
    ScratchDir {
        /// The directory.
        dir: String,
        /// What is wrong with it.
        source: GuestPathError,
    },
    /// A `--scratch-dir` given twice.
    #[error("--scratch-dir {0}: given twice")]
    ScratchDirTwice(String),
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FilesError),
    /// JavaScript that cannot be packed as given.
    #[error(transparent)]
    Js(#[from] JsError),
    /// Python that cannot be packed as given.
    #[error(transparent)]
    Python(#[from] PyError),
}

/// Linear memory a wasm function gets unless `--memory` says otherwise, in MiB.
const DEFAULT_MEMORY_MIB: u32 = 16;

/// Arguments of `thaw pack`.
#[derive(Args, Debug)]
pub struct PackArgs {
    /// The function: a core wasm module for wasm32-wasip1 (.wasm) or its text form (.wat); or
    /// JavaScript or Python: a module (.js, .mjs, .py), or a directory of modules and the files
    /// they read, which the function sees at /app (a directory with handler.py or main.py, or
    /// only .py files, is Python; a Python function's requirements.txt is installed with pip).
    #[arg(value_name = "FUNCTION.wasm|.wat|.js|.py|DIR", required_unless_present = "example")]
    input: Option<PathBuf>,
    /// JavaScript or Python in a directory: its entry module, relative to the directory
    /// [default: index.js or index.mjs; handler.py or main.py].
    #[arg(long, value_name = "FILE")]
    entry: Option<String>,
    /// JavaScript: bundle the entry module and the npm packages it imports into one module
    /// first, with esbuild (the function's node_modules/.bin/esbuild, else the one on PATH).
    #[arg(long)]
    bundle: bool,
    /// Pack one of the example functions built into thaw instead of a file.
    #[arg(long, value_name = "NAME", conflicts_with = "input", value_parser = clap::builder::PossibleValuesParser::new(EXAMPLE_NAMES))]
    example: Option<String>,
    /// The function's name [default: the input's file stem].
    #[arg(long)]
    name: Option<String>,
    /// An environment variable the function sees (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// An argument the function sees after its name (repeatable).
    #[arg(long = "arg", value_name = "A")]
    args: Vec<String>,
    /// Most linear memory the function may use, in MiB [default: 16; 128 for JavaScript and
    /// Python].
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(bundle::MAX_MEMORY_MIB)))]
    memory: Option<u32>,
    /// Instruction budget per invocation (Wasmtime fuel: about one unit per wasm instruction)
    /// [default: no limit].
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// A directory to ship with the function as a data volume (regular files and directories
    /// only; at most 1 GiB), which the function sees at GUEST_PATH [default: /data]. The volume
    /// is read-only on the host side, but the function may write over its files: the changes
    /// live in the VM's memory and vanish with it. DIR:GUEST_PATH is split at the last ':' only
    /// when what follows it starts with '/', so a directory name with colons still works.
    #[arg(long, value_name = "DIR[:GUEST_PATH]")]
    data_dir: Option<PathBuf>,
    /// An in-memory directory preopened for the function, which may create, write and delete
    /// files under it; they live in the VM's memory and vanish with it (repeatable; given at
    /// least once, it replaces the default set) [default: / and /tmp].
    #[arg(long = "scratch-dir", value_name = "PATH")]
    scratch_dirs: Vec<String>,
    /// Preopen no in-memory directory.
    #[arg(long, conflicts_with = "scratch_dirs")]
    no_scratch_dirs: bool,
    /// Most memory the in-memory files, directories and names may take, in MiB (it is added to
    /// the VM's memory).
    #[arg(long, value_name = "MIB", default_value_t = bundle::DEFAULT_SCRATCH_MIB)]
    scratch_mib: u32,
    /// A host service the function talks to (repeatable): the function gets a socket fd, named
    /// by the environment variable THAW_CONNECT_<NAME>, that connects to vsock port PORT of the
    /// host on first use (serve it with `thaw invoke|restore --service PORT=SOCKET`).
    #[arg(long = "connect", value_name = "NAME=PORT", value_parser = parse_connection)]
    connections: Vec<Connection>,
    /// A request the function answers, carried in the bundle: `thaw snapshot` records the
    /// working set with it unless told otherwise [default: for --example, the example's
    /// documented request; otherwise none, and snapshot uses the empty request].
    #[arg(long, value_name = "STRING")]
    sample_data: Option<String>,
    /// A command (a module exporting _start): run its start-up, up to its first read of stdin,
    /// once as its init, which `thaw snapshot` captures; each request then continues from inside
    /// that read. What it computed before the read, random seeds included, is shared by every VM
    /// restored from one image (docs/FUNCTIONS.md) [default: the whole command runs per request;
    /// a Python function is always packed so].
    #[arg(long)]
    init_until_read: bool,
    /// Where to write the bundle [default: NAME.thaw in the current directory, NAME being the
    /// function's name].
    #[arg(short, long, value_name = "FUNCTION.thaw")]
    output: Option<PathBuf>,
}

/// The example functions (Rust, compiled to wasm32-wasip1 by the workspace build), each with
/// the request its documentation gives, which becomes the bundle's sample request.
const EXAMPLES: [(&str, &[u8], &str); 7] = [
    ("hello", include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_HELLO_example_hello")), r#"{"name": "ada"}"#),
    (
        "json-transform",
        include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_JSON_TRANSFORM_example_json_transform")),
        r#"{"customer": "ada", "items": [{"sku": "tea", "price_cents": 350, "quantity": 2}]}"#,
    ),
    ("random", include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_RANDOM_example_random")), "{}"),
    ("heavy-init", include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_HEAVY_INIT_example_heavy_init")), "1000"),
    (
        "text-analysis",
        include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_TEXT_ANALYSIS_example_text_analysis")),
        "Ada wrote to ada@example.org: see https://example.org/notes, then wrote to bob@example.net again.",
    ),
    (
        "data-reader",
        include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_DATA_READER_example_data_reader")),
        r#"{"file": "readme.txt"}"#,
    ),
    ("service-client", include_bytes!(env!("CARGO_CDYLIB_FILE_EXAMPLE_SERVICE_CLIENT_example_service_client")), "ping"),
];
/// The names of the built-in examples.
pub const EXAMPLE_NAMES: [&str; 7] =
    [EXAMPLES[0].0, EXAMPLES[1].0, EXAMPLES[2].0, EXAMPLES[3].0, EXAMPLES[4].0, EXAMPLES[5].0, EXAMPLES[6].0];

/// A bundle of the built-in example `name` with default settings and `memory_mib` of memory,
/// its code from `cache` when it is there.
pub fn example_bundle(name: &str, memory_mib: u32, cache: &CodeCache) -> Result<Vec<u8>, PackError> {
    let (_, wasm, sample) =
        EXAMPLES.iter().find(|(n, ..)| *n == name).ok_or_else(|| PackError::NoExample(name.into()))?;
    let settings = BundleSettings {
        name: name.into(),
        memory_mib,
        fuel: None,
        env: Vec::new(),
        args: Vec::new(),
        connections: Vec::new(),
        sample_request: Some(sample.as_bytes().to_vec()),
        scratch_mib: bundle::DEFAULT_SCRATCH_MIB,
        scratch_dirs: default_scratch_dirs(),
        data_mount: bundle::DEFAULT_DATA_MOUNT.into(),
        init_until_read: false,
    };
    bundle_wasm(&settings, wasm, &[], cache)
        .map(|packed| packed.bundle)
        .map_err(|e| PackError::Input { input: format!("example {name}"), source: Box::new(e) })
}

/// What a bundle holds beside its wasm and data volume.
#[derive(Debug, Clone)]
pub struct BundleSettings {
    /// The function's name, also its first argument.
    pub name: String,
    /// Most linear memory, in MiB.
    pub memory_mib: u32,
    /// Instruction budget per invocation.
    pub fuel: Option<u64>,
    /// `K=V` environment entries.
    pub env: Vec<String>,
    /// Arguments after the name.
    pub args: Vec<String>,
    /// Host services it connects to.
    pub connections: Vec<Connection>,
    /// The request its working set is recorded with.
    pub sample_request: Option<Vec<u8>>,
    /// Most memory its in-memory files may take, in MiB.
    pub scratch_mib: u32,
    /// The in-memory directories preopened for it.
    pub scratch_dirs: Vec<String>,
    /// Where its data volume appears.
    pub data_mount: String,
    /// Whether a command's start-up, up to its first read of stdin, is its init.
    pub init_until_read: bool,
}

/// The in-memory directories a function gets unless told otherwise
/// ([`bundle::DEFAULT_SCRATCH_DIRS`]).
pub fn default_scratch_dirs() -> Vec<String> {
    bundle::DEFAULT_SCRATCH_DIRS.iter().map(|d| d.to_string()).collect()
}

/// A function packed by [`bundle_wasm`].
#[derive(Debug)]
pub struct Packed {
    /// The bundle.
    pub bundle: Vec<u8>,
    /// Its manifest.
    pub manifest: Manifest,
    /// How the function is entered.
    pub kind: FunctionKind,
    /// The code's length in bytes.
    pub code_len: usize,
    /// Whether the code came from the cache rather than the compiler.
    pub cached: bool,
}

/// Validates `wasm` as a function, compiles it (or finds its code in `cache`), and encodes both
/// with `settings` and `volume` (empty for none) as a bundle.
pub fn bundle_wasm(
    settings: &BundleSettings,
    wasm: &[u8],
    volume: &[u8],
    cache: &CodeCache,
) -> Result<Packed, PackError> {
    let kind = function::validate_wasm(wasm, settings.memory_mib)?;
    let Code { bytes: code, cached } = code::compile(wasm, settings.fuel.is_some(), cache)?;
    let manifest = Manifest {
        name: settings.name.clone(),
        wasm_sha256: function::sha256(wasm),
        memory_mib: settings.memory_mib,
        fuel: settings.fuel,
        args: std::iter::once(settings.name.clone()).chain(settings.args.iter().cloned()).collect(),
        env: settings.env.clone(),
        connections: settings.connections.clone(),
        volume_sha256: (!volume.is_empty()).then(|| function::sha256(volume)),
        sample_request: settings.sample_request.clone(),
        code_sha256: Some(function::sha256(&code)),
        scratch_mib: settings.scratch_mib,
        scratch_dirs: settings.scratch_dirs.clone(),
        data_mount: settings.data_mount.clone(),
        init_until_read: settings.init_until_read,
    };
    manifest.validate()?;
    function::check_entry(&manifest, kind)?;
    Ok(Packed { bundle: bundle::encode(&manifest, wasm, &code, volume), manifest, kind, code_len: code.len(), cached })
}

/// Parses a `--connect NAME=PORT` entry (the manifest validates the name and port).
pub fn parse_connection(text: &str) -> Result<Connection, PackError> {
    let (name, port) = text.split_once('=').ok_or_else(|| PackError::NotConnection(text.into()))?;
    let port = port.parse().map_err(|_| PackError::ConnectionPort { text: text.into(), port: port.into() })?;
    Ok(Connection { name: name.into(), port })
}

/// Splits `--data-dir DIR[:GUEST_PATH]` into the directory and where the function sees it: at
/// the last ':' when what follows starts with '/', so that a directory name with colons still
/// works; without a guest path, [`bundle::DEFAULT_DATA_MOUNT`].
pub fn split_data_dir(spec: &OsStr) -> Result<(PathBuf, String), PackError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = spec.as_bytes();
    let Some(colon) = bytes.iter().rposition(|&b| b == b':').filter(|&at| bytes.get(at + 1) == Some(&b'/')) else {
        return Ok((PathBuf::from(spec), bundle::DEFAULT_DATA_MOUNT.into()));
    };
    let (dir, mount) = (OsStr::from_bytes(&bytes[..colon]), OsStr::from_bytes(&bytes[colon + 1..]));
    let spec = spec.display().to_string();
    let Some(mount) = mount.to_str() else {
        return Err(PackError::DataMountUtf8 { spec, mount: mount.display().to_string() });
    };
    bundle::check_guest_path(mount).map_err(|source| PackError::DataMount { spec, source })?;
    Ok((PathBuf::from(dir), mount.into()))
}

/// The in-memory directories `thaw pack`'s flags ask for, each checked, with an error naming the
/// flag and the value.
fn scratch_dirs(args: &PackArgs) -> Result<Vec<String>, PackError> {
    if args.no_scratch_dirs {
        return Ok(Vec::new());
    }
    if args.scratch_dirs.is_empty() {
        return Ok(default_scratch_dirs());
    }
    if args.scratch_dirs.len() > bundle::MAX_SCRATCH_DIRS {
        return Err(PackError::ScratchDirCount(args.scratch_dirs.len()));
    }
    for (i, dir) in args.scratch_dirs.iter().enumerate() {
        bundle::check_guest_path(dir).map_err(|source| PackError::ScratchDir { dir: dir.clone(), source })?;
        if args.scratch_dirs[..i].contains(dir) {
            return Err(PackError::ScratchDirTwice(dir.clone()));
        }
    }
    Ok(args.scratch_dirs.clone())
}

/// Builds a data volume from the tree at `dir`: regular files and directories, with UTF-8 names,
/// but those `left_out` (given each entry's name and whether it is a directory) says to skip.
pub fn volume_from_dir(dir: &Path, left_out: fn(&str, bool) -> bool) -> Result<Vec<u8>, PackError> {
    let (files, dirs) = tree(dir, left_out)?;
    abi::volume::build(&files, &dirs).map_err(|source| PackError::Volume { dir: dir.to_path_buf(), source })
}

/// A tree's files (path in the tree, bytes) and directories.
type Tree = (Vec<(String, Vec<u8>)>, Vec<String>);

/// The tree at `dir`, as [`volume_from_dir`] takes it.
fn tree(dir: &Path, left_out: fn(&str, bool) -> bool) -> Result<Tree, PackError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut total = 0u64;
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, relative)) = pending.pop() {
        let fail = |source| PackError::DataDirUnreadable { path: path.clone(), source };
        for entry in std::fs::read_dir(&path).map_err(fail)? {
            let entry = entry.map_err(fail)?;
            let name =
                entry.file_name().into_string().map_err(|name| PackError::DataDirName { dir: path.clone(), name })?;
            let kind = entry.file_type().map_err(fail)?;
            if left_out(&name, kind.is_dir()) {
                continue;
            }
            let inner = if relative.is_empty() { name } else { format!("{relative}/{name}") };
            if kind.is_dir() {
                dirs.push(inner.clone());
                pending.push((entry.path(), inner));
            } else if kind.is_file() {
                let bytes = read_limited(&entry.path(), abi::volume::MAX_VOLUME_BYTES, "data file", READ_WITHIN)?;
                total += bytes.len() as u64;
                if total > abi::volume::MAX_VOLUME_BYTES {
                    return Err(PackError::DataDirTooLarge(dir.to_path_buf()));
                }
                files.push((inner, bytes));
            } else {
                return Err(PackError::DataDirEntry(entry.path()));
            }
        }
    }
    Ok((files, dirs))
}

/// A WAT error on one line: the message and where, without the source excerpt.
fn one_line(error: &wat::Error) -> String {
    let text = error.to_string();
    let message = text.lines().next().unwrap_or_default();
    let location = text.lines().find_map(|l| l.trim().strip_prefix("--> <anon>:"));
    match location {
        Some(line_col) => format!("{message} at line:column {line_col}"),
        None => message.to_string(),
    }
}

/// The language of a function's source, which decides the runtime it is packed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// A wasm module or its text form: the function itself.
    Wasm,
    /// JavaScript, on the runtime built into thaw.
    JavaScript,
    /// Python, on CPython for WASI.
    Python,
}

impl Language {
    /// The language of the function at `input` whose module `--entry` may name: Python for a
    /// `.py` file or a directory with a Python module ([`crate::python::is_python`]),
    /// JavaScript for a `.js` or `.mjs` file or another directory, and wasm otherwise.
    pub fn of(input: &Path, entry: Option<&str>) -> Self {
        if crate::python::is_python(input, entry) {
            Self::Python
        } else if crate::js::is_javascript(input) {
            Self::JavaScript
        } else {
            Self::Wasm
        }
    }
}

/// Runs `thaw pack` and returns the process exit code.
pub fn run(args: &PackArgs) -> Result<u8, PackError> {
    crate::files::remove_drafts_on_signal()?;
    let example = args.example.as_ref().and_then(|name| EXAMPLES.iter().find(|(n, ..)| n == name));
    let source = args.input.as_deref().filter(|_| example.is_none());
    let language = source.map_or(Language::Wasm, |path| Language::of(path, args.entry.as_deref()));
    if let (Some(path), Language::JavaScript | Language::Python) = (source, language) {
        if args.data_dir.is_some() {
            return Err(match language {
                Language::Python => PyError::DataDir.into(),
                _ => JsError::DataDir.into(),
            });
        }
        let options = SourceOptions {
            entry: args.entry.clone(),
            env: args.env.clone(),
            memory: args.memory,
            bundle: args.bundle,
            sample: None,
        };
        return pack(args, from_source(path, language, &options)?);
    }
    if args.entry.is_some() {
        return Err(JsError::EntryWithFile.into());
    }
    if args.bundle {
        return Err(JsError::BundleNotJavaScript.into());
    }
    let (source, input, stem) = match (&args.input, example) {
        (_, Some((name, wasm, _))) => (wasm.to_vec(), format!("example {name}"), name.to_string()),
        (Some(path), None) => {
            let source = read_limited(path, bundle::MAX_WASM_BYTES as u64 * 4, "function", READ_WITHIN)?;
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (source, path.display().to_string(), stem)
        }
        (None, None) => return Err(PackError::NoInput),
    };
    let is_wat = args.input.as_ref().is_some_and(|p| p.extension().is_some_and(|e| e == "wat"));
    let is_text = is_wat || !source.starts_with(b"\0asm");
    let wasm = if is_text {
        wat::parse_bytes(&source)
            .map_err(|e| PackError::NotWasm { input: input.clone(), message: one_line(&e) })?
            .into_owned()
    } else {
        source
    };
    let (data_dir, data_mount) = match &args.data_dir {
        Some(spec) => split_data_dir(spec.as_os_str()).map(|(dir, mount)| (Some(dir), mount))?,
        None => (None, bundle::DEFAULT_DATA_MOUNT.into()),
    };
    let volume = data_dir.as_deref().map(|dir| volume_from_dir(dir, |_, _| false)).transpose()?.unwrap_or_default();
    let memory_mib = args.memory.unwrap_or(DEFAULT_MEMORY_MIB);
    let sample = example.map(|(_, _, sample)| sample.to_string());
    pack(
        args,
        Packing {
            wasm,
            input,
            stem,
            volume,
            data_mount,
            env: args.env.clone(),
            args: Vec::new(),
            memory_mib,
            sample,
            init_until_read: args.init_until_read,
            language: None,
        },
    )
}

/// What `thaw pack` and `thaw deploy` pack a JavaScript or Python function with, as `thaw
/// pack`'s flags of those names would.
#[derive(Debug, Default)]
pub struct SourceOptions {
    /// The entry module of a directory.
    pub entry: Option<String>,
    /// `K=V` environment entries, after the runtime's own.
    pub env: Vec<String>,
    /// Most linear memory, in MiB (the language's default when `None`).
    pub memory: Option<u32>,
    /// Whether esbuild bundles the npm packages a JavaScript function imports.
    pub bundle: bool,
    /// The request the bundle carries for `thaw snapshot`'s working set.
    pub sample: Option<String>,
}

/// What packs the function in `language` at `path` (a file, or a directory with its entry
/// module) with `options`.
fn from_source(path: &Path, language: Language, options: &SourceOptions) -> Result<Packing, PackError> {
    if language != Language::JavaScript && options.bundle {
        return Err(JsError::BundleNotJavaScript.into());
    }
    let mut packing = match language {
        Language::Python => python(path, options.entry.as_deref())?,
        _ => javascript(path, options.entry.as_deref(), options.bundle)?,
    };
    packing.env.extend(options.env.iter().cloned());
    packing.memory_mib = options.memory.unwrap_or(packing.memory_mib);
    packing.sample = options.sample.clone();
    Ok(packing)
}

/// The name a function's source at `path` gives it: a directory's name, or a file's stem.
fn source_stem(path: &Path) -> String {
    let named = if path.is_dir() {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
    } else {
        path.with_extension("")
    };
    named.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What packs the JavaScript function at `path` (a `.js` or `.mjs` file, or a directory with
/// its `entry`). With `bundle`, the entry is esbuild's bundle of it: in place of a file, or
/// beside a directory's files at [`crate::js::BUNDLED`].
fn javascript(path: &Path, entry: Option<&str>, bundle: bool) -> Result<Packing, PackError> {
    let mut entry = crate::js::entry(path, entry)?;
    let (mut files, mut dirs) = if path.is_dir() {
        tree(path, crate::js::left_out)?
    } else {
        (vec![(entry.clone(), read_limited(path, abi::volume::MAX_VOLUME_BYTES, "function", READ_WITHIN)?)], Vec::new())
    };
    if bundle {
        let dir = path.is_dir().then_some(path);
        let module = crate::js::bundle(&dir.map_or_else(|| path.to_path_buf(), |d| d.join(&entry)), dir)?;
        if dir.is_some() {
            let (parent, _) = crate::js::BUNDLED.split_once('/').unwrap_or_default();
            dirs.push(parent.to_string());
            files.push((crate::js::BUNDLED.to_string(), module));
            entry = crate::js::BUNDLED.to_string();
        } else {
            files[0].1 = module;
        }
    }
    let volume =
        abi::volume::build(&files, &dirs).map_err(|source| PackError::Volume { dir: path.to_path_buf(), source })?;
    Ok(Packing {
        wasm: crate::js::RUNTIME.to_vec(),
        input: path.display().to_string(),
        stem: source_stem(path),
        volume,
        data_mount: crate::js::MOUNT.into(),
        env: vec![format!("{}={}/{entry}", crate::js::ENTRY_VARIABLE, crate::js::MOUNT)],
        args: Vec::new(),
        memory_mib: crate::js::DEFAULT_MEMORY_MIB,
        sample: None,
        init_until_read: false,
        language: Some(format!("JavaScript, entry {}/{entry}", crate::js::MOUNT)),
    })
}

/// What packs the Python function at `path` (a `.py` file, or a directory with its `entry`):
/// CPython for WASI as a command whose start-up, up to the runner's read of the request, is its
/// init; its volume at `/` holds the standard library, the runner, the packages of the
/// function's `requirements.txt`, and the function's files at [`crate::python::MOUNT`].
fn python(path: &Path, entry: Option<&str>) -> Result<Packing, PackError> {
    let entry = crate::python::entry(path, entry)?;
    let runtime = crate::python::Runtime::find()?;
    let own = if path.is_dir() {
        tree(path, crate::python::left_out)?
    } else {
        (vec![(entry.clone(), read_limited(path, abi::volume::MAX_VOLUME_BYTES, "function", READ_WITHIN)?)], Vec::new())
    };
    let volume = python_volume(&runtime, crate::python::requirements(path).as_deref(), own, path)?;
    Ok(Packing {
        wasm: runtime.wasm()?,
        input: path.display().to_string(),
        stem: source_stem(path),
        volume,
        data_mount: "/".into(),
        env: crate::python::environment(&entry),
        args: vec![crate::python::runner_argument()],
        memory_mib: crate::python::DEFAULT_MEMORY_MIB,
        sample: None,
        init_until_read: true,
        language: Some(format!("Python, module {}/{entry}", crate::python::MOUNT)),
    })
}

/// The data volume of a Python function on `runtime`: its [`crate::python::Layout`] (the
/// standard library, the runner, and `requirements`' packages, which pip installs here) and the
/// function's own files, `own`, at [`crate::python::MOUNT`]. `input` names the function in errors.
fn python_volume(
    runtime: &crate::python::Runtime,
    requirements: Option<&Path>,
    own: Tree,
    input: &Path,
) -> Result<Vec<u8>, PackError> {
    // `layout` keeps pip's directory until the volume is built.
    let layout = crate::python::layout(runtime, requirements)?;
    let crate::python::Layout { mut files, mut dirs, ref read, .. } = layout;
    for part in read {
        graft(&mut files, &mut dirs, part.at, tree(&part.dir, part.left_out)?);
    }
    let app = crate::python::MOUNT.trim_start_matches('/');
    dirs.push(app.to_string());
    graft(&mut files, &mut dirs, app, own);
    abi::volume::build(&files, &dirs).map_err(|source| PackError::Volume { dir: input.to_path_buf(), source })
}

/// The bundle of a Python module sent as one file (`thaw serve`'s deploy of `text/x-python`),
/// packed as `thaw pack` packs a single `.py` file without requirements: the module is
/// `/app/NAME.py`, and `settings` gain what the runner needs.
pub fn python_module(source: Vec<u8>, mut settings: BundleSettings, cache: &CodeCache) -> Result<Vec<u8>, PackError> {
    let runtime = crate::python::Runtime::find()?;
    // A function's name has no '/', so this is one file's name.
    let entry = format!("{}.py", settings.name);
    let volume =
        python_volume(&runtime, None, (vec![(entry.clone(), source)], Vec::new()), Path::new(crate::python::MOUNT))?;
    settings.env.splice(0..0, crate::python::environment(&entry));
    settings.args.insert(0, crate::python::runner_argument());
    settings.data_mount = "/".into();
    settings.init_until_read = true;
    Ok(bundle_wasm(&settings, &runtime.wasm()?, &volume, cache)?.bundle)
}

/// Adds `tree`'s files and directories to `files` and `dirs`, under `at`.
fn graft(files: &mut Vec<(String, Vec<u8>)>, dirs: &mut Vec<String>, at: &str, (tree_files, tree_dirs): Tree) {
    files.extend(tree_files.into_iter().map(|(path, bytes)| (format!("{at}/{path}"), bytes)));
    dirs.extend(tree_dirs.into_iter().map(|path| format!("{at}/{path}")));
}

/// The bundle `thaw pack` makes of the JavaScript or Python function at `path` with `options`,
/// named `name`: what `thaw deploy` uploads for one.
pub fn source_bundle(path: &Path, name: &str, options: &SourceOptions) -> Result<Vec<u8>, PackError> {
    let language = Language::of(path, options.entry.as_deref());
    let Packing { wasm, input, volume, data_mount, env, args, memory_mib, sample, init_until_read, .. } =
        from_source(path, language, options)?;
    let settings = BundleSettings {
        name: name.to_string(),
        memory_mib,
        fuel: None,
        env,
        args,
        connections: Vec::new(),
        sample_request: sample.map(String::into_bytes),
        scratch_mib: bundle::DEFAULT_SCRATCH_MIB,
        scratch_dirs: default_scratch_dirs(),
        data_mount,
        init_until_read,
    };
    let packed = bundle_wasm(&settings, &wasm, &volume, &CodeCache::user());
    Ok(packed.map_err(|e| PackError::Input { input, source: Box::new(e) })?.bundle)
}

/// The bundle of a JavaScript function uploaded to `thaw serve` as one module's `source`, packed
/// with `settings` (named as the function is): the module is the function's only file,
/// `/app/NAME.mjs`, and its code comes from `cache`, compiled once per runtime.
pub fn javascript_module(
    source: Vec<u8>,
    mut settings: BundleSettings,
    cache: &CodeCache,
) -> Result<Vec<u8>, PackError> {
    // A function's name has no '/', so this is one file's name.
    let file = format!("{}.mjs", settings.name);
    let volume = abi::volume::build(&[(file.clone(), source)], &[])
        .map_err(|source| PackError::Volume { dir: PathBuf::from(crate::js::MOUNT), source })?;
    settings.env.insert(0, format!("{}={}/{file}", crate::js::ENTRY_VARIABLE, crate::js::MOUNT));
    settings.data_mount = crate::js::MOUNT.into();
    Ok(bundle_wasm(&settings, crate::js::RUNTIME, &volume, cache)?.bundle)
}

/// What `thaw pack` packs, whatever the function's language.
struct Packing {
    wasm: Vec<u8>,
    /// The input as errors name it.
    input: String,
    /// The name unless `--name` gives one.
    stem: String,
    volume: Vec<u8>,
    data_mount: String,
    env: Vec<String>,
    /// The runtime's own arguments, before `--arg`'s.
    args: Vec<String>,
    memory_mib: u32,
    /// The request the bundle carries unless `--sample-data` gives one.
    sample: Option<String>,
    /// Whether the command's start-up is its init.
    init_until_read: bool,
    /// What the summary calls a function in a language thaw runs on its own runtime (the wasm
    /// is then the runtime's); `None` for a wasm function, which is called a reactor or command.
    language: Option<String>,
}

/// Packs `packing` with the rest of `args`, writes the bundle and says what it holds.
fn pack(args: &PackArgs, packing: Packing) -> Result<u8, PackError> {
    let Packing {
        wasm,
        input,
        stem,
        volume,
        data_mount,
        env,
        args: runtime_args,
        memory_mib,
        sample,
        init_until_read,
        language,
    } = packing;
    if !(1..=bundle::MAX_SCRATCH_MIB).contains(&args.scratch_mib) {
        return Err(PackError::ScratchMib(args.scratch_mib));
    }
    let scratch_dirs = scratch_dirs(args)?;
    let settings = BundleSettings {
        name: args.name.clone().unwrap_or(stem),
        memory_mib,
        fuel: args.fuel,
        env,
        args: runtime_args.into_iter().chain(args.args.iter().cloned()).collect(),
        connections: args.connections.clone(),
        sample_request: args.sample_data.clone().or(sample).map(String::into_bytes),
        scratch_mib: args.scratch_mib,
        scratch_dirs,
        data_mount,
        init_until_read: init_until_read || args.init_until_read,
    };
    let started = std::time::Instant::now();
    let compiling = crate::progress::Status::show(&format!("thaw: compiling {}...", settings.name));
    let cache = CodeCache::user();
    let bundled = bundle_wasm(&settings, &wasm, &volume, &cache);
    drop(compiling);
    let Packed { bundle: bytes, manifest, kind, code_len, cached } =
        bundled.map_err(|e| PackError::Input { input, source: Box::new(e) })?;
    let compiled = match cached {
        true => format!("with {code_len} bytes of code from the cache"),
        false => format!("compiled to {code_len} bytes of code in {} ms", started.elapsed().as_millis()),
    };
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from(format!("{}.thaw", manifest.name)));
    write_atomically(&output, &bytes)?;
    let kind = match (language, kind) {
        (Some(language), _) => format!("{language}, on a runtime of"),
        (None, FunctionKind::Reactor) => "reactor,".to_string(),
        (None, FunctionKind::Command) if manifest.init_until_read => {
            "command initialized up to its first read of stdin,".to_string()
        }
        (None, FunctionKind::Command) => "command,".to_string(),
    };
    let mut data = match manifest.scratch_dirs.as_slice() {
        [] => ", no in-memory directories".to_string(),
        dirs => format!(", in-memory files up to {} MiB at {}", manifest.scratch_mib, dirs.join(", ")),
    };
    if !volume.is_empty() {
        data.push_str(&format!(", a {}-byte data volume at {}", volume.len(), manifest.data_mount));
    }
    for c in &manifest.connections {
        data.push_str(&format!(", {} on vsock port {}", c.name, c.port));
    }
    if let Some(sample) = &manifest.sample_request {
        data.push_str(&format!(", a {}-byte sample request", sample.len()));
    }
    eprintln!(
        "thaw: packed {} ({kind} {} bytes of wasm {compiled}, {} MiB memory{data}) into {}",
        manifest.name,
        wasm.len(),
        manifest.memory_mib,
        output.display()
    );
    Ok(0)
}
