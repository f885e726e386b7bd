//! The function bundle (`.thaw`): what `thaw pack` writes. The guest receives it as its ramdisk,
//! without the data volume, which it reads through the block device instead.
//!
//! ```text
//!   offset  size  field
//!   0       8     magic "THAWFUNC"
//!   8       4     format version: 6, which carries compiled code and the function's
//!                 filesystem settings, or 7, which adds flags (a command initialized up to
//!                 its first read). Version 5 (compiled code, no filesystem settings) is
//!                 read and run with the default settings. Older bundles are read (1: plain;
//!                 2: with a data volume; 3: with service connections; 4: with a sample
//!                 request) so they can be inspected, but not run: repack them
//!   12      4     header length (64)
//!   16      4     manifest length
//!   20      4     reserved, zero
//!   24      8     wasm length
//!   32      8     total length = the code's offset (below) + code + volume lengths
//!   40      4     CRC-32 (IEEE) of header bytes 0..40 followed by the manifest
//!   44      8     volume length (zero in version 1)
//!   52      8     code length (from version 5; zero before)
//!   60      4     reserved, zero
//!   64      ...   manifest (below), the wasm module, zero padding up to the next multiple of
//!                 [`CODE_ALIGN`] (from version 5), the compiled code (Wasmtime's artifact for the
//!                 guest's engine, `crate::engine`), then the data volume (`crate::volume`)
//! ```
//!
//! The code starts page-aligned so that the guest, which receives the bundle page-aligned,
//! runs it where it lies instead of copying it.
//!
//! The manifest is a sequence of little-endian fields; a string is a u16 length and UTF-8 bytes:
//! name (string), wasm SHA-256 (32 bytes), memory MiB (u32), fuel (u64, 0 = unlimited),
//! args (u16 count, strings), env (u16 count, `KEY=VALUE` strings), from version 3 the service
//! connections (u16 count, each a name string and a u32 vsock port), in version 4 the sample
//! request (u32 length, at most [`MAX_SAMPLE_BYTES`], and its bytes: what `thaw snapshot`
//! records the working set with), from version 5 the sample request behind a presence byte (0,
//! or 1 followed by the version 4 field) and then the code's SHA-256 (32 bytes), in version 6
//! the filesystem settings: scratch MiB (u32), scratch directories (u16 count, at most
//! [`MAX_SCRATCH_DIRS`], strings) and the data mount (string), in version 7 the flags (u32:
//! bit 0 [`FLAG_INIT_UNTIL_READ`], every other bit zero), and, exactly when the bundle has a
//! volume, the volume's SHA-256 (32 bytes). A manifest from before version 6 reads with the
//! defaults: [`DEFAULT_SCRATCH_MIB`], [`DEFAULT_SCRATCH_DIRS`] and [`DEFAULT_DATA_MOUNT`].
//!
//! The filesystem settings say what the guest's WASI layer preopens, in fd order from 3
//! ([`Manifest::preopens`]): the in-memory (scratch) directories, then the data volume at its
//! mount unless a scratch directory is already there. The scratch filesystem holds at most the
//! scratch MiB of files, directories and names, on the guest heap; the host sizes the VM for it.
//!
//! Every length is checked against the bytes present and against the caps below before use, and
//! every failure names the field and value. The CRC covers metadata only; the wasm, code and
//! volume bytes are covered by the SHA-256s in the manifest, which the host checks before it
//! boots a bundle. A bundle may be handed over without its volume (the bytes stop after the
//! code).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::codec::{crc32, magic, put_string, u32_at, u64_at};

/// The bundle magic.
pub const MAGIC: [u8; 8] = magic::BUNDLE;
/// The bundle format version this code writes for a bundle without a data volume.
pub const FORMAT_VERSION: u32 = 1;
/// The version it writes for a bundle with one.
pub const FORMAT_VERSION_WITH_VOLUME: u32 = 2;
/// The version it writes for a bundle with service connections.
pub const FORMAT_VERSION_WITH_CONNECTIONS: u32 = 3;
/// The version it wrote for a bundle with a sample request.
pub const FORMAT_VERSION_WITH_SAMPLE: u32 = 4;
/// The version it wrote for a bundle with compiled code, before the filesystem settings: still
/// read and run, with the default settings.
pub const FORMAT_VERSION_WITH_CODE: u32 = 5;
/// The version it writes for a bundle with compiled code and the function's filesystem
/// settings: every bundle `thaw pack` writes now without flags.
pub const FORMAT_VERSION_WITH_FILESYSTEM: u32 = 6;
/// The version it writes for a bundle with flags ([`FLAG_INIT_UNTIL_READ`]): the newest it
/// reads.
pub const FORMAT_VERSION_WITH_FLAGS: u32 = 7;
/// Manifest flag (version 7): a command's start-up, up to its first read of stdin, is its init,
/// which a snapshot captures (docs/FUNCTIONS.md).
pub const FLAG_INIT_UNTIL_READ: u32 = 1;
/// Largest compiled code.
pub const MAX_CODE_BYTES: u64 = 256 << 20;
/// Where in a bundle the code may start: its offset is a multiple of this.
pub const CODE_ALIGN: u64 = 4096;

/// The offset of the code in a bundle whose manifest and wasm have these lengths: right after
/// the wasm when there is no code, else at the next multiple of [`CODE_ALIGN`].
fn code_offset(manifest_len: u64, wasm_len: u64, code_len: u64) -> u64 {
    let wasm_end = HEADER_LEN as u64 + manifest_len + wasm_len;
    if code_len == 0 { wasm_end } else { wasm_end.next_multiple_of(CODE_ALIGN) }
}
/// Longest sample request.
pub const MAX_SAMPLE_BYTES: usize = 64 << 10;
/// Header size.
pub const HEADER_LEN: usize = 64;
/// Largest manifest.
pub const MAX_MANIFEST_BYTES: usize = 256 << 10;
/// Largest wasm module.
pub const MAX_WASM_BYTES: usize = 64 << 20;
/// Longest function name.
pub const MAX_NAME_BYTES: usize = 64;
/// Most args, and most env entries.
pub const MAX_LIST_ENTRIES: usize = 256;
/// Longest arg or env entry.
pub const MAX_STRING_BYTES: usize = 4096;
/// Largest linear memory a function may ask for.
pub const MAX_MEMORY_MIB: u32 = 4096;
/// Most service connections.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest connection name.
pub const MAX_CONNECTION_NAME_BYTES: usize = 32;
/// The scratch filesystem's cap, in MiB, for a bundle that names none (before version 6, and
/// `thaw pack`'s default).
pub const DEFAULT_SCRATCH_MIB: u32 = 16;
/// Largest scratch filesystem cap, in MiB.
pub const MAX_SCRATCH_MIB: u32 = 1024;
/// Where the data volume appears for a bundle that names no place.
pub const DEFAULT_DATA_MOUNT: &str = "/data";
/// The in-memory directories preopened for a bundle that names none.
pub const DEFAULT_SCRATCH_DIRS: &[&str] = &["/", "/tmp"];
/// Most preopened in-memory directories.
pub const MAX_SCRATCH_DIRS: usize = 8;
/// Longest guest path ([`check_guest_path`]).
pub const MAX_GUEST_PATH_BYTES: usize = 1024;
/// Longest component of a guest path.
const MAX_GUEST_NAME_BYTES: usize = 255;

/// A host service the function is given a socket to (`thaw pack --connect NAME=PORT`): the
/// guest sees a preopened socket fd, named by the environment variable `THAW_CONNECT_<NAME>`,
/// that connects to vsock port `port` of the host on first use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// 1-32 of `[A-Za-z0-9_]`, unique in the manifest.
    pub name: String,
    /// The host's vsock port: 1 to 2^32 - 2 (2^32 - 1 means "any port" in vsock).
    pub port: u32,
}

/// True for a service connection's name: 1 to [`MAX_CONNECTION_NAME_BYTES`] of `[A-Za-z0-9_]`.
pub fn is_connection_name(name: &str) -> bool {
    (1..=MAX_CONNECTION_NAME_BYTES).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What is wrong with a path in the guest's filesystem ([`check_guest_path`]); each quotes the
/// path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestPathError {
    /// It does not start with '/'.
    #[error("path {0:?} is not absolute: it must start with '/'")]
    NotAbsolute(String),
    /// It is longer than [`MAX_GUEST_PATH_BYTES`].
    #[error("path {0:?} is {len} bytes, more than {MAX_GUEST_PATH_BYTES}", len = .0.len())]
    TooLong(String),
    /// It holds a NUL byte.
    #[error("path {0:?} holds a NUL")]
    Nul(String),
    /// It has "//" or a trailing '/'.
    #[error("path {0:?} has an empty component (\"//\" or a trailing '/')")]
    EmptyComponent(String),
    /// It has a "." or ".." component.
    #[error("path {path:?} has a {component:?} component")]
    Dots {
        /// The path.
        path: String,
        /// "." or "..".
        component: &'static str,
    },
    /// A component is longer than 255 bytes.
    #[error("path {path:?} has a component of {len} bytes, more than {MAX_GUEST_NAME_BYTES}")]
    LongComponent {
        /// The path.
        path: String,
        /// The component's length.
        len: usize,
    },
}

/// Checks a path in the guest's filesystem, as a scratch directory or the data mount: absolute,
/// `/` itself or components of 1 to 255 bytes separated by single slashes, none `.` or `..`, no
/// NUL, at most [`MAX_GUEST_PATH_BYTES`] in all.
pub fn check_guest_path(path: &str) -> Result<(), GuestPathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(GuestPathError::NotAbsolute(path.into()));
    };
    if path.len() > MAX_GUEST_PATH_BYTES {
        return Err(GuestPathError::TooLong(path.into()));
    }
    if path.contains('\0') {
        return Err(GuestPathError::Nul(path.into()));
    }
    if rest.is_empty() {
        return Ok(());
    }
    for component in rest.split('/') {
        match component {
            "" => return Err(GuestPathError::EmptyComponent(path.into())),
            "." => return Err(GuestPathError::Dots { path: path.into(), component: "." }),
            ".." => return Err(GuestPathError::Dots { path: path.into(), component: ".." }),
            c if c.len() > MAX_GUEST_NAME_BYTES => {
                return Err(GuestPathError::LongComponent { path: path.into(), len: c.len() });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The default scratch directories, owned.
fn default_scratch_dirs() -> Vec<String> {
    DEFAULT_SCRATCH_DIRS.iter().map(|&d| String::from(d)).collect()
}

/// What a bundle says about its function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The function's name: 1-64 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// SHA-256 of the wasm bytes.
    pub wasm_sha256: [u8; 32],
    /// Most linear memory the module may use, in MiB (1..=[`MAX_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Fuel per invocation (Wasmtime's budget: about one unit per wasm instruction), or `None`
    /// for no limit.
    pub fuel: Option<u64>,
    /// Arguments the function sees through `args_get`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries the function sees through `environ_get`.
    pub env: Vec<String>,
    /// Host services the function connects to (bundle version 3).
    pub connections: Vec<Connection>,
    /// SHA-256 of the data volume, when the bundle has one.
    pub volume_sha256: Option<[u8; 32]>,
    /// A request the function answers, which `thaw snapshot` records the working set with by
    /// default (bundle version 4).
    pub sample_request: Option<Vec<u8>>,
    /// SHA-256 of the compiled code (bundle version 5).
    pub code_sha256: Option<[u8; 32]>,
    /// Most bytes of files, directories and names the in-memory (scratch) filesystem may hold,
    /// in MiB (1..=[`MAX_SCRATCH_MIB`]; bundle version 6, else [`DEFAULT_SCRATCH_MIB`]).
    pub scratch_mib: u32,
    /// In-memory directories preopened for the function, in order (bundle version 6, else
    /// [`DEFAULT_SCRATCH_DIRS`]): at most [`MAX_SCRATCH_DIRS`], each a valid guest path
    /// ([`check_guest_path`]), none twice.
    pub scratch_dirs: Vec<String>,
    /// Where the data volume appears in the guest: a valid guest path, `/` allowed (bundle
    /// version 6, where it is present even without a volume; else [`DEFAULT_DATA_MOUNT`]).
    pub data_mount: String,
    /// A command's start-up, up to its first read of stdin, is its init ([`FLAG_INIT_UNTIL_READ`],
    /// bundle version 7; else false).
    pub init_until_read: bool,
}

/// A parsed bundle borrowing its wasm bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// The manifest.
    pub manifest: Manifest,
    /// The wasm module.
    pub wasm: &'a [u8],
    /// The compiled code (empty before version 5).
    pub code: &'a [u8],
    /// The data volume's length (0 without one).
    pub volume_len: u64,
    /// The data volume, unless the bundle was handed over without it.
    pub volume: Option<&'a [u8]>,
}

/// What is wrong with a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Fewer bytes than a header.
    #[error("bundle is {0} bytes, shorter than its {HEADER_LEN}-byte header (truncated?)")]
    TooShort(usize),
    /// Not a bundle.
    #[error(fmt = fmt_bad_magic)]
    BadMagic([u8; 8]),
    /// A format version this code does not read.
    #[error("bundle format version {0} is not supported (this thaw reads versions 1 to {FORMAT_VERSION_WITH_FLAGS})")]
    UnsupportedVersion(u32),
    /// A header field with an impossible value.
    #[error("bundle header: {field} is {value}, expected {expected}")]
    BadHeader {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What it should be.
        expected: &'static str,
    },
    /// The bytes present do not match the header's total length.
    #[error("bundle is {actual} bytes but its header declares {declared} (truncated, or lengths that lie)")]
    LengthMismatch {
        /// Bytes present.
        actual: u64,
        /// Bytes the header declares.
        declared: u64,
    },
    /// The CRC does not match.
    #[error("bundle checksum {stored:#010x} does not match the computed {computed:#010x} (corrupted)")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// A manifest field runs past the manifest's end.
    #[error("bundle manifest: {0} runs past the end of the manifest")]
    ManifestTruncated(&'static str),
    /// A manifest field is invalid.
    #[error("bundle manifest: {field}: {reason}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Bytes left over after the manifest's last field.
    #[error("bundle manifest: {0} unexpected bytes after the last field")]
    TrailingManifestBytes(usize),
}

/// [`BundleError::BadMagic`]'s message, which names a snapshot image given in a bundle's place.
fn fmt_bad_magic(m: &[u8; 8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if *m == magic::IMAGE {
        f.write_str(
            "this is a snapshot image (from `thaw snapshot`), not a function bundle: give the bundle it was taken from (`thaw pack` writes bundles)",
        )
    } else {
        write!(f, "bundle magic {m:02x?} is not \"THAWFUNC\": not a thaw function bundle")
    }
}

/// Reads manifest fields in order, never past the end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], BundleError> {
        if self.bytes.len() < n {
            return Err(BundleError::ManifestTruncated(field));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, BundleError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, BundleError> {
        Ok(u32_at(self.take(4, field)?, 0))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, BundleError> {
        Ok(u64_at(self.take(8, field)?, 0))
    }

    fn string(&mut self, field: &'static str) -> Result<String, BundleError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(len, field)?;
        core::str::from_utf8(bytes)
            .map(String::from)
            .map_err(|_| BundleError::BadField { field, reason: "not UTF-8".into() })
    }

    /// A u16 count of at most `max` strings, then the strings.
    fn list(&mut self, field: &'static str, max: usize) -> Result<Vec<String>, BundleError> {
        let count = self.u16(field)? as usize;
        if count > max {
            return Err(BundleError::BadField { field, reason: alloc::format!("{count} entries, more than {max}") });
        }
        (0..count).map(|_| self.string(field)).collect()
    }
}

impl Manifest {
    /// Checks every field against the format's rules.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |field, reason: String| Err(BundleError::BadField { field, reason });
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES || !self.name.chars().all(name_ok) {
            return bad("name", alloc::format!("{:?} is not 1-{MAX_NAME_BYTES} of [A-Za-z0-9._-]", self.name));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return bad("memory", alloc::format!("{} MiB is outside 1..={MAX_MEMORY_MIB}", self.memory_mib));
        }
        if self.fuel == Some(0) {
            return bad("fuel", "0 would trap before the first instruction; omit it for no limit".into());
        }
        for (field, list) in [("args", &self.args), ("env", &self.env)] {
            if list.len() > MAX_LIST_ENTRIES {
                return bad(field, alloc::format!("{} entries, more than {MAX_LIST_ENTRIES}", list.len()));
            }
            for entry in list {
                if entry.len() > MAX_STRING_BYTES || entry.contains('\0') {
                    return bad(field, alloc::format!("entry of {} bytes is too long or holds a NUL", entry.len()));
                }
            }
        }
        if let Some(entry) = self.env.iter().find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty())) {
            return bad("env", alloc::format!("{entry:?} is not KEY=VALUE"));
        }
        if let Some(sample) = self.sample_request.as_ref().filter(|s| s.len() > MAX_SAMPLE_BYTES) {
            return bad("sample request", alloc::format!("{} bytes, more than {MAX_SAMPLE_BYTES}", sample.len()));
        }
        if self.connections.len() > MAX_CONNECTIONS {
            return bad(
                "connections",
                alloc::format!("{} entries, more than {MAX_CONNECTIONS}", self.connections.len()),
            );
        }
        for (i, c) in self.connections.iter().enumerate() {
            if !is_connection_name(&c.name) {
                return bad(
                    "connections",
                    alloc::format!("name {:?} is not 1-{MAX_CONNECTION_NAME_BYTES} of [A-Za-z0-9_]", c.name),
                );
            }
            if c.port == 0 || c.port == u32::MAX {
                return bad("connections", alloc::format!("{}: port {} is outside 1..=4294967294", c.name, c.port));
            }
            if self.connections[..i].iter().any(|other| other.name == c.name) {
                return bad("connections", alloc::format!("name {:?} is given twice", c.name));
            }
        }
        self.validate_filesystem()
    }

    /// Checks the filesystem settings: the scratch cap, the scratch directories and the data
    /// mount; and that a manifest without code, whose format cannot carry them, has the defaults.
    fn validate_filesystem(&self) -> Result<(), BundleError> {
        let bad = |field, reason: String| Err(BundleError::BadField { field, reason });
        if !(1..=MAX_SCRATCH_MIB).contains(&self.scratch_mib) {
            return bad("scratch MiB", alloc::format!("{} MiB is outside 1..={MAX_SCRATCH_MIB}", self.scratch_mib));
        }
        if self.scratch_dirs.len() > MAX_SCRATCH_DIRS {
            return bad(
                "scratch dirs",
                alloc::format!("{} entries, more than {MAX_SCRATCH_DIRS}", self.scratch_dirs.len()),
            );
        }
        for (i, dir) in self.scratch_dirs.iter().enumerate() {
            check_guest_path(dir).or_else(|e| bad("scratch dirs", e.to_string()))?;
            if self.scratch_dirs[..i].contains(dir) {
                return bad("scratch dirs", alloc::format!("{dir:?} is given twice"));
            }
        }
        check_guest_path(&self.data_mount).or_else(|e| bad("data mount", e.to_string()))?;
        let defaults = self.scratch_mib == DEFAULT_SCRATCH_MIB
            && self.scratch_dirs.iter().map(String::as_str).eq(DEFAULT_SCRATCH_DIRS.iter().copied())
            && self.data_mount == DEFAULT_DATA_MOUNT;
        if self.code_sha256.is_none() && self.init_until_read {
            return bad(
                "flags",
                "a manifest without compiled code is written in a version before 7, which has no flags".into(),
            );
        }
        if self.code_sha256.is_none() && !defaults {
            return bad(
                "filesystem settings",
                alloc::format!(
                    "{} MiB, {:?}, {:?}: a manifest without compiled code is written in a version before 6, which holds only the defaults",
                    self.scratch_mib,
                    self.scratch_dirs,
                    self.data_mount
                ),
            );
        }
        Ok(())
    }

    /// The directories the guest preopens for the function, in fd order from fd 3: the scratch
    /// directories in order, then the data mount when the bundle has a volume and no scratch
    /// directory is already there.
    pub fn preopens(&self) -> Vec<&str> {
        let mut dirs: Vec<&str> = self.scratch_dirs.iter().map(String::as_str).collect();
        if self.volume_sha256.is_some() && !dirs.contains(&self.data_mount.as_str()) {
            dirs.push(&self.data_mount);
        }
        dirs
    }

    /// The format version a bundle with this manifest is written in.
    pub fn format_version(&self) -> u32 {
        if self.code_sha256.is_some() && self.flags() != 0 {
            FORMAT_VERSION_WITH_FLAGS
        } else if self.code_sha256.is_some() {
            FORMAT_VERSION_WITH_FILESYSTEM
        } else if self.sample_request.is_some() {
            FORMAT_VERSION_WITH_SAMPLE
        } else if !self.connections.is_empty() {
            FORMAT_VERSION_WITH_CONNECTIONS
        } else if self.volume_sha256.is_some() {
            FORMAT_VERSION_WITH_VOLUME
        } else {
            FORMAT_VERSION
        }
    }

    /// The version 7 flags word.
    fn flags(&self) -> u32 {
        if self.init_until_read { FLAG_INIT_UNTIL_READ } else { 0 }
    }

    /// The manifest's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.name);
        out.extend_from_slice(&self.wasm_sha256);
        out.extend_from_slice(&self.memory_mib.to_le_bytes());
        out.extend_from_slice(&self.fuel.unwrap_or(0).to_le_bytes());
        for list in [&self.args, &self.env] {
            out.extend_from_slice(&(list.len() as u16).to_le_bytes());
            for entry in list.iter() {
                put_string(&mut out, entry);
            }
        }
        if self.format_version() >= FORMAT_VERSION_WITH_CONNECTIONS {
            out.extend_from_slice(&(self.connections.len() as u16).to_le_bytes());
            for c in &self.connections {
                put_string(&mut out, &c.name);
                out.extend_from_slice(&c.port.to_le_bytes());
            }
        }
        let version = self.format_version();
        if version >= FORMAT_VERSION_WITH_CODE {
            out.push(u8::from(self.sample_request.is_some()));
        }
        if let Some(sample) = &self.sample_request {
            out.extend_from_slice(&(sample.len() as u32).to_le_bytes());
            out.extend_from_slice(sample);
        }
        if let Some(sha) = &self.code_sha256 {
            out.extend_from_slice(sha);
        }
        if version >= FORMAT_VERSION_WITH_FILESYSTEM {
            out.extend_from_slice(&self.scratch_mib.to_le_bytes());
            out.extend_from_slice(&(self.scratch_dirs.len() as u16).to_le_bytes());
            for dir in &self.scratch_dirs {
                put_string(&mut out, dir);
            }
            put_string(&mut out, &self.data_mount);
        }
        if version >= FORMAT_VERSION_WITH_FLAGS {
            out.extend_from_slice(&self.flags().to_le_bytes());
        }
        if let Some(sha) = &self.volume_sha256 {
            out.extend_from_slice(sha);
        }
        out
    }

    /// Decodes and validates the manifest of a bundle of format `version`.
    pub fn decode(bytes: &[u8], version: u32) -> Result<Self, BundleError> {
        let mut r = Reader { bytes };
        let name = r.string("name")?;
        let mut wasm_sha256 = [0; 32];
        wasm_sha256.copy_from_slice(r.take(32, "wasm sha256")?);
        let memory_mib = r.u32("memory")?;
        let fuel = Some(r.u64("fuel")?).filter(|&f| f != 0);
        let args = r.list("args", MAX_LIST_ENTRIES)?;
        let env = r.list("env", MAX_LIST_ENTRIES)?;
        let mut connections = Vec::new();
        if version >= FORMAT_VERSION_WITH_CONNECTIONS {
            let count = r.u16("connections")? as usize;
            if count > MAX_CONNECTIONS {
                return Err(BundleError::BadField {
                    field: "connections",
                    reason: alloc::format!("{count} entries, more than {MAX_CONNECTIONS}"),
                });
            }
            for _ in 0..count {
                let name = r.string("connections")?;
                let port = r.u32("connections")?;
                connections.push(Connection { name, port });
            }
        }
        let mut sample_request = None;
        let has_sample = match version {
            FORMAT_VERSION_WITH_SAMPLE => true,
            v if v >= FORMAT_VERSION_WITH_CODE => match r.take(1, "sample request")?[0] {
                0 => false,
                1 => true,
                other => {
                    return Err(BundleError::BadField {
                        field: "sample request",
                        reason: alloc::format!("presence byte {other} is neither 0 nor 1"),
                    });
                }
            },
            _ => false,
        };
        if has_sample {
            let len = r.u32("sample request")? as usize;
            if len > MAX_SAMPLE_BYTES {
                return Err(BundleError::BadField {
                    field: "sample request",
                    reason: alloc::format!("{len} bytes, more than {MAX_SAMPLE_BYTES}"),
                });
            }
            sample_request = Some(r.take(len, "sample request")?.to_vec());
        }
        let code_sha256 = if version >= FORMAT_VERSION_WITH_CODE {
            Some(r.take(32, "code sha256")?.try_into().unwrap_or([0; 32]))
        } else {
            None
        };
        let (scratch_mib, scratch_dirs, data_mount) = if version >= FORMAT_VERSION_WITH_FILESYSTEM {
            let scratch_mib = r.u32("scratch MiB")?;
            let scratch_dirs = r.list("scratch dirs", MAX_SCRATCH_DIRS)?;
            (scratch_mib, scratch_dirs, r.string("data mount")?)
        } else {
            (DEFAULT_SCRATCH_MIB, default_scratch_dirs(), DEFAULT_DATA_MOUNT.into())
        };
        let flags = if version >= FORMAT_VERSION_WITH_FLAGS { r.u32("flags")? } else { 0 };
        if flags & !FLAG_INIT_UNTIL_READ != 0 {
            return Err(BundleError::BadField {
                field: "flags",
                reason: alloc::format!("{flags:#x} sets bits this thaw does not know"),
            });
        }
        let volume_sha256 = match r.bytes.len() {
            0 => None,
            32 => Some(r.take(32, "volume sha256")?.try_into().unwrap_or([0; 32])),
            n => return Err(BundleError::TrailingManifestBytes(n)),
        };
        let manifest = Self {
            name,
            wasm_sha256,
            memory_mib,
            fuel,
            args,
            env,
            connections,
            volume_sha256,
            sample_request,
            code_sha256,
            scratch_mib,
            scratch_dirs,
            data_mount,
            init_until_read: flags & FLAG_INIT_UNTIL_READ != 0,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

/// Encodes a bundle. The manifest must [`validate`](Manifest::validate), the wasm must fit
/// [`MAX_WASM_BYTES`], `code` (empty for none) must fit [`MAX_CODE_BYTES`] and be what the
/// manifest's code SHA-256 covers, and `volume` (empty for none) must be a valid volume whose
/// SHA-256 the manifest holds; the caller checks all of that first.
pub fn encode(manifest: &Manifest, wasm: &[u8], code: &[u8], volume: &[u8]) -> Vec<u8> {
    let manifest_bytes = manifest.encode();
    let code_at = code_offset(manifest_bytes.len() as u64, wasm.len() as u64, code.len() as u64);
    let total = code_at + (code.len() + volume.len()) as u64;
    let version = manifest.format_version();
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&version.to_le_bytes());
    header[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    header[24..32].copy_from_slice(&(wasm.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&total.to_le_bytes());
    let crc = crc32(&[&header[..40], &manifest_bytes]);
    header[40..44].copy_from_slice(&crc.to_le_bytes());
    header[44..52].copy_from_slice(&(volume.len() as u64).to_le_bytes());
    header[52..60].copy_from_slice(&(code.len() as u64).to_le_bytes());
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&header);
    out.extend_from_slice(&manifest_bytes);
    out.extend_from_slice(wasm);
    out.resize(code_at as usize, 0);
    out.extend_from_slice(code);
    out.extend_from_slice(volume);
    out
}

/// Parses and validates a bundle's framing and manifest, with or without its volume's bytes. The
/// wasm and volume bytes are returned as they are: checking their hashes and contents is the
/// caller's job.
pub fn parse(bytes: &[u8]) -> Result<Bundle<'_>, BundleError> {
    if bytes.len() < HEADER_LEN {
        return Err(BundleError::TooShort(bytes.len()));
    }
    let mut magic = [0; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(BundleError::BadMagic(magic));
    }
    let version = u32_at(bytes, 8);
    if !(FORMAT_VERSION..=FORMAT_VERSION_WITH_FLAGS).contains(&version) {
        return Err(BundleError::UnsupportedVersion(version));
    }
    let header_len = u32_at(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(BundleError::BadHeader { field: "header length", value: header_len.into(), expected: "64" });
    }
    let manifest_len = u32_at(bytes, 16) as usize;
    if manifest_len > MAX_MANIFEST_BYTES {
        return Err(BundleError::BadHeader {
            field: "manifest length",
            value: manifest_len as u64,
            expected: "at most 262144",
        });
    }
    let wasm_len = u64_at(bytes, 24);
    if wasm_len > MAX_WASM_BYTES as u64 {
        return Err(BundleError::BadHeader { field: "wasm length", value: wasm_len, expected: "at most 67108864" });
    }
    let volume_len = u64_at(bytes, 44);
    if version == FORMAT_VERSION && volume_len != 0 {
        return Err(BundleError::BadHeader { field: "volume length", value: volume_len, expected: "0 in version 1" });
    }
    if version == FORMAT_VERSION_WITH_VOLUME && !(1..=crate::volume::MAX_VOLUME_BYTES).contains(&volume_len) {
        return Err(BundleError::BadHeader {
            field: "volume length",
            value: volume_len,
            expected: "1 to 1073741824 in version 2",
        });
    }
    if version >= FORMAT_VERSION_WITH_CONNECTIONS && volume_len > crate::volume::MAX_VOLUME_BYTES {
        return Err(BundleError::BadHeader {
            field: "volume length",
            value: volume_len,
            expected: "at most 1073741824 from version 3",
        });
    }
    let code_len = u64_at(bytes, 52);
    if version < FORMAT_VERSION_WITH_CODE && code_len != 0 {
        return Err(BundleError::BadHeader { field: "code length", value: code_len, expected: "0 before version 5" });
    }
    if version >= FORMAT_VERSION_WITH_CODE && !(1..=MAX_CODE_BYTES).contains(&code_len) {
        return Err(BundleError::BadHeader {
            field: "code length",
            value: code_len,
            expected: "1 to 268435456 from version 5",
        });
    }
    let declared = u64_at(bytes, 32);
    let code_at = code_offset(manifest_len as u64, wasm_len, code_len);
    let without_volume = code_at + code_len;
    if declared != without_volume + volume_len {
        return Err(BundleError::BadHeader {
            field: "total length",
            value: declared,
            expected: "the code's offset + code length + volume length",
        });
    }
    let present = bytes.len() as u64;
    if present != declared && (volume_len == 0 || present != without_volume) {
        return Err(BundleError::LengthMismatch { actual: present, declared });
    }
    if bytes[20..24] != [0; 4] || bytes[60..HEADER_LEN] != [0; 4] {
        return Err(BundleError::BadHeader { field: "reserved bytes", value: 1, expected: "zero" });
    }
    let manifest_bytes = &bytes[HEADER_LEN..HEADER_LEN + manifest_len];
    let stored = u32_at(bytes, 40);
    let computed = crc32(&[&bytes[..40], manifest_bytes]);
    if stored != computed {
        return Err(BundleError::Checksum { stored, computed });
    }
    let manifest = Manifest::decode(manifest_bytes, version)?;
    // A version 5 manifest reads as version 6 with the default filesystem settings.
    let reads_as = if version == FORMAT_VERSION_WITH_CODE { FORMAT_VERSION_WITH_FILESYSTEM } else { version };
    if manifest.format_version() != reads_as {
        return Err(BundleError::BadHeader {
            field: "format version",
            value: version.into(),
            expected: "7 with code and flags, 6 (or 5) with code and none; before it 1 plain, 2 with a volume only, 3 with connections, 4 with a sample",
        });
    }
    if manifest.volume_sha256.is_some() != (volume_len > 0) {
        return Err(BundleError::BadField {
            field: "volume sha256",
            reason: alloc::format!("present exactly when the volume is, but the volume length is {volume_len}"),
        });
    }
    let wasm_end = HEADER_LEN + manifest_len + wasm_len as usize;
    let (code_at, code_end) = (code_at as usize, (code_at + code_len) as usize);
    if bytes[wasm_end..code_at].iter().any(|&b| b != 0) {
        return Err(BundleError::BadHeader { field: "padding before the code", value: 1, expected: "zero" });
    }
    let volume = (present == declared && volume_len > 0).then(|| &bytes[code_end..]);
    Ok(Bundle {
        manifest,
        wasm: &bytes[HEADER_LEN + manifest_len..wasm_end],
        code: &bytes[code_at..code_end],
        volume_len,
        volume,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn manifest() -> Manifest {
        Manifest {
            name: "hello".into(),
            wasm_sha256: [7; 32],
            memory_mib: 16,
            fuel: Some(1000),
            args: vec!["hello".into(), "--x".into()],
            env: vec!["GREETING=hi".into()],
            connections: Vec::new(),
            volume_sha256: None,
            sample_request: None,
            code_sha256: None,
            scratch_mib: DEFAULT_SCRATCH_MIB,
            scratch_dirs: default_scratch_dirs(),
            data_mount: DEFAULT_DATA_MOUNT.into(),
            init_until_read: false,
        }
    }

    /// [`manifest`] with code and filesystem settings other than the defaults.
    fn manifest_v6() -> Manifest {
        Manifest {
            code_sha256: Some([5; 32]),
            scratch_mib: 32,
            scratch_dirs: vec!["/tmp".into(), "/work".into()],
            data_mount: "/srv".into(),
            ..manifest()
        }
    }

    /// [`manifest`]'s fields up to and including the connections count, as version 5 and 6
    /// encode them.
    const MANIFEST_HEAD: &[u8] = b"\x05\0hello\
        \x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\
        \x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\x07\
        \x10\0\0\0\xe8\x03\0\0\0\0\0\0\
        \x02\0\x05\0hello\x03\0--x\
        \x01\0\x0b\0GREETING=hi\
        \0\0";

    #[test]
    fn an_image_given_as_a_bundle_is_named_for_what_it_is() {
        let mut bytes = alloc::vec![0u8; HEADER_LEN];
        bytes[..8].copy_from_slice(&magic::IMAGE);
        let e = parse(&bytes).unwrap_err().to_string();
        assert!(e.starts_with("this is a snapshot image (from `thaw snapshot`), not a function bundle"), "{e}");
    }

    #[test]
    fn round_trips_and_the_header_is_golden() {
        let wasm = b"\0asm\x01\0\0\0";
        let bytes = encode(&manifest(), wasm, &[], &[]);
        assert_eq!(&bytes[..16], b"THAWFUNC\x01\0\0\0\x40\0\0\0");
        assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926, "the standard CRC-32 check value");
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed, Bundle { manifest: manifest(), wasm, code: &[], volume_len: 0, volume: None });
    }

    #[test]
    fn a_volume_makes_version_2_and_may_be_left_out() {
        let wasm = b"\0asm\x01\0\0\0";
        let volume = crate::volume::build(&[("f".into(), b"x".to_vec())], &[]).unwrap();
        let m = Manifest { volume_sha256: Some([9; 32]), ..manifest() };
        let bytes = encode(&m, wasm, &[], &volume);
        assert_eq!(&bytes[..12], b"THAWFUNC\x02\0\0\0");
        let parsed = parse(&bytes).unwrap();
        assert_eq!(
            (parsed.wasm, parsed.volume, parsed.volume_len),
            (&wasm[..], Some(&volume[..]), volume.len() as u64)
        );
        let stripped = &bytes[..bytes.len() - volume.len()];
        let parsed = parse(stripped).unwrap();
        assert_eq!((parsed.wasm, parsed.volume, parsed.manifest), (&wasm[..], None, m.clone()));
        assert!(parse(&bytes[..bytes.len() - 1]).is_err(), "a partial volume is not a stripped one");
        // The manifest's volume hash and the header's volume length must agree.
        assert!(parse(&encode(&manifest(), wasm, &[], &volume)).unwrap_err().to_string().contains("volume length"));
        let mut v1_with_volume = bytes.clone();
        v1_with_volume[8] = 1;
        assert!(parse(&v1_with_volume).unwrap_err().to_string().contains("volume length"));
    }

    #[test]
    fn rejects_truncation_at_every_length() {
        let bytes = encode(&manifest(), b"\0asm\x01\0\0\0", &[], &[]);
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn rejects_hostile_headers_with_named_fields() {
        let good = encode(&manifest(), b"\0asm\x01\0\0\0", &[], &[]);
        let err = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            edit(&mut b);
            parse(&b).unwrap_err().to_string()
        };
        assert!(err(&|b| b[0] = b'X').contains("is not \"THAWFUNC\""));
        assert!(err(&|b| b[8] = 9).contains("format version 9 is not supported"));
        assert!(err(&|b| b[16..20].copy_from_slice(&u32::MAX.to_le_bytes())).contains("manifest length"));
        assert!(err(&|b| b[24] = 0xff).contains("total length"));
        assert!(err(&|b| b.push(0)).contains("but its header declares"));
        assert!(err(&|b| b[70] ^= 1).contains("checksum"));
        assert!(err(&|b| b[45] = 1).contains("volume length"));
        assert!(err(&|b| b[53] = 1).contains("code length"));
        assert!(err(&|b| b[61] = 1).contains("reserved bytes"));
    }

    #[test]
    fn rejects_invalid_manifests() {
        let mut m = manifest();
        m.name = "bad name".into();
        assert!(m.validate().unwrap_err().to_string().contains("name"));
        let mut m = manifest();
        m.memory_mib = 0;
        assert!(m.validate().unwrap_err().to_string().contains("0 MiB"));
        let mut m = manifest();
        m.env = vec!["NOEQUALS".into()];
        assert!(m.validate().unwrap_err().to_string().contains("is not KEY=VALUE"));
        // A manifest whose string length points past its end.
        let mut bytes = manifest().encode();
        bytes[0] = 200;
        assert_eq!(Manifest::decode(&bytes, FORMAT_VERSION), Err(BundleError::ManifestTruncated("name")));
        let connection = |name: &str, port| Connection { name: name.into(), port };
        for (connections, message) in [
            (vec![connection("db", 0)], "port 0"),
            (vec![connection("db", u32::MAX)], "port 4294967295"),
            (vec![connection("d-b", 1)], "\"d-b\""),
            (vec![connection("db", 1), connection("db", 2)], "given twice"),
            (vec![connection("db", 1); MAX_CONNECTIONS + 1], "more than 16"),
        ] {
            let m = Manifest { connections, ..manifest() };
            assert!(m.validate().unwrap_err().to_string().contains(message), "{message}");
        }
    }

    #[test]
    fn a_sample_request_makes_version_4_and_is_checked() {
        let wasm = b"\0asm\x01\0\0\0";
        let m = Manifest { sample_request: Some(b"{\"name\": \"ada\"}".to_vec()), ..manifest() };
        let bytes = encode(&m, wasm, &[], &[]);
        assert_eq!(&bytes[..12], b"THAWFUNC\x04\0\0\0");
        assert_eq!(parse(&bytes).unwrap().manifest, m);
        let connected = Manifest { connections: vec![Connection { name: "db".into(), port: 5 }], ..m.clone() };
        let volume = crate::volume::build(&[("f".into(), b"x".to_vec())], &[]).unwrap();
        let all = Manifest { volume_sha256: Some([9; 32]), ..connected };
        assert_eq!(parse(&encode(&all, wasm, &[], &volume)).unwrap().manifest, all, "with connections and a volume");
        let empty = Manifest { sample_request: Some(Vec::new()), ..manifest() };
        assert_eq!(parse(&encode(&empty, wasm, &[], &[])).unwrap().manifest, empty, "an empty sample is a sample");
        let big = Manifest { sample_request: Some(vec![b'x'; MAX_SAMPLE_BYTES + 1]), ..manifest() };
        assert!(big.validate().unwrap_err().to_string().contains("sample request: 65537 bytes"));
        // A length past the manifest's end is refused by name.
        let mut hostile = m.encode();
        let at = hostile.len() - m.sample_request.as_ref().unwrap().len() - 4;
        hostile[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            Manifest::decode(&hostile, FORMAT_VERSION_WITH_SAMPLE),
            Err(BundleError::ManifestTruncated("sample request"))
        );
        hostile[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&hostile, FORMAT_VERSION_WITH_SAMPLE).unwrap_err().to_string().contains("4294967295"));
    }

    #[test]
    fn connections_make_version_3_with_or_without_a_volume() {
        let wasm = b"\0asm\x01\0\0\0";
        let connections =
            vec![Connection { name: "db".into(), port: 5000 }, Connection { name: "cache".into(), port: 7 }];
        let m = Manifest { connections, ..manifest() };
        let bytes = encode(&m, wasm, &[], &[]);
        assert_eq!(&bytes[..12], b"THAWFUNC\x03\0\0\0");
        assert_eq!(parse(&bytes).unwrap().manifest, m);
        let volume = crate::volume::build(&[("f".into(), b"x".to_vec())], &[]).unwrap();
        let with_volume = Manifest { volume_sha256: Some([9; 32]), ..m.clone() };
        let both = encode(&with_volume, wasm, &[], &volume);
        let parsed = parse(&both).unwrap();
        assert_eq!((parsed.manifest, parsed.volume), (with_volume, Some(&volume[..])));
        // A version that does not match the manifest's contents is refused.
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(parse(&v2).is_err());
        let mut v3 = encode(&manifest(), wasm, &[], &[]);
        v3[8] = 3;
        assert!(parse(&v3).is_err());
    }

    /// The header of a bundle holding the 8-byte wasm of the tests and `code`, with a manifest
    /// of `manifest_len` bytes and this CRC, in `version`.
    fn golden_header(version: u8, manifest_len: u8, crc: [u8; 4], code: &[u8]) -> Vec<u8> {
        let mut header = b"THAWFUNC".to_vec();
        header.extend_from_slice(&[version, 0, 0, 0, 0x40, 0, 0, 0, manifest_len, 0, 0, 0, 0, 0, 0, 0]);
        header.extend_from_slice(&8u64.to_le_bytes());
        header.extend_from_slice(&(4096 + code.len() as u64).to_le_bytes());
        header.extend_from_slice(&crc);
        header.extend_from_slice(&0u64.to_le_bytes());
        header.extend_from_slice(&(code.len() as u64).to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        header
    }

    #[test]
    fn code_makes_version_6_and_its_bytes_are_golden() {
        let (wasm, code) = (b"\0asm\x01\0\0\0", b"\x7fELF compiled");
        let m = manifest_v6();
        let bytes = encode(&m, wasm, code, &[]);
        // The manifest: the fields of version 5 (no sample: presence byte 0; the code's hash),
        // then the scratch MiB, the scratch dirs and the data mount.
        let manifest_bytes =
            [MANIFEST_HEAD, b"\0", &[5; 32], b"\x20\0\0\0", b"\x02\0\x04\0/tmp\x05\0/work", b"\x04\0/srv"].concat();
        assert_eq!(m.encode(), manifest_bytes);
        let header = golden_header(6, 0x8c, [0x50, 0xd4, 0xb5, 0x82], code);
        assert_eq!(&bytes[..HEADER_LEN], &header[..]);
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + manifest_bytes.len()], &manifest_bytes[..]);
        // The code starts at the first page boundary after the wasm, after zeros.
        let wasm_at = HEADER_LEN + manifest_bytes.len();
        assert_eq!(&bytes[wasm_at..wasm_at + wasm.len()], wasm);
        assert!(bytes[wasm_at + wasm.len()..4096].iter().all(|&b| b == 0));
        assert_eq!((bytes.len(), &bytes[4096..]), (4096 + code.len(), &code[..]));
        let parsed = parse(&bytes).unwrap();
        assert_eq!((parsed.manifest, parsed.wasm, parsed.code), (m.clone(), &wasm[..], &code[..]));

        // With a sample and a volume; the volume may be left out, the code may not. The volume's
        // hash stays last.
        let volume = crate::volume::build(&[("f".into(), b"x".to_vec())], &[]).unwrap();
        let all = Manifest { sample_request: Some(b"hi".to_vec()), volume_sha256: Some([9; 32]), ..m.clone() };
        assert!(all.encode().ends_with(&[&b"\x04\0/srv"[..], &[9; 32]].concat()));
        let bytes = encode(&all, wasm, code, &volume);
        let parsed = parse(&bytes).unwrap();
        assert_eq!((&parsed.manifest, parsed.code, parsed.volume), (&all, &code[..], Some(&volume[..])));
        let stripped = &bytes[..bytes.len() - volume.len()];
        assert_eq!(parse(stripped).unwrap().code, &code[..]);
        assert!(parse(&stripped[..stripped.len() - 1]).is_err(), "a bundle cut inside its code");
        // No scratch directory at all, and the data volume at the root.
        let bare = Manifest { scratch_dirs: Vec::new(), data_mount: "/".into(), ..all };
        assert_eq!(parse(&encode(&bare, wasm, code, &volume)).unwrap().manifest, bare);
    }

    #[test]
    fn init_until_read_makes_version_7_and_its_bytes_are_golden() {
        let (wasm, code) = (b"\0asm\x01\0\0\0", b"\x7fELF compiled");
        let m = Manifest { init_until_read: true, ..manifest_v6() };
        let bytes = encode(&m, wasm, code, &[]);
        // Version 6's fields, then the flags word: bit 0.
        let manifest_bytes = [
            MANIFEST_HEAD,
            b"\0",
            &[5; 32],
            b"\x20\0\0\0",
            b"\x02\0\x04\0/tmp\x05\0/work",
            b"\x04\0/srv",
            b"\x01\0\0\0",
        ]
        .concat();
        assert_eq!(m.encode(), manifest_bytes);
        let header = golden_header(7, 0x90, [0x02, 0xa8, 0x20, 0xa1], code);
        assert_eq!(&bytes[..HEADER_LEN], &header[..]);
        assert_eq!(parse(&bytes).unwrap().manifest, m);
        // With a volume, its hash stays last.
        let with_volume = Manifest { volume_sha256: Some([9; 32]), ..m.clone() };
        assert!(with_volume.encode().ends_with(&[&b"\x01\0\0\0"[..], &[9; 32]].concat()));

        // Without the flag, the same manifest is version 6, byte for byte as before.
        assert_eq!(u32_at(&encode(&manifest_v6(), wasm, code, &[]), 8), 6);
        // Hostile flags: a bit this thaw does not know, and version 7 with no flag set.
        let mut unknown = bytes.clone();
        let flags_at = HEADER_LEN + manifest_bytes.len() - 4;
        unknown[flags_at] = 3;
        let crc = crc32(&[&unknown[..40], &unknown[HEADER_LEN..HEADER_LEN + manifest_bytes.len()]]);
        unknown[40..44].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            parse(&unknown).unwrap_err().to_string(),
            "bundle manifest: flags: 0x3 sets bits this thaw does not know"
        );
        unknown[flags_at] = 0;
        let crc = crc32(&[&unknown[..40], &unknown[HEADER_LEN..HEADER_LEN + manifest_bytes.len()]]);
        unknown[40..44].copy_from_slice(&crc.to_le_bytes());
        assert!(
            parse(&unknown).unwrap_err().to_string().contains("format version is 7, expected 7 with code and flags")
        );
        // A manifest without code cannot carry the flag.
        let codeless = Manifest { init_until_read: true, ..manifest() };
        assert!(codeless.validate().unwrap_err().to_string().contains("flags: a manifest without compiled code"));
    }

    /// A version 5 bundle as the thaw before version 6 wrote it, byte for byte: [`manifest`]
    /// with code, and `code`.
    fn v5_golden(code: &[u8]) -> Vec<u8> {
        let manifest_bytes = [MANIFEST_HEAD, b"\0", &[5; 32]].concat();
        let mut bytes = golden_header(5, 0x73, [0x9d, 0x5e, 0x07, 0x89], code);
        bytes.extend_from_slice(&manifest_bytes);
        bytes.extend_from_slice(b"\0asm\x01\0\0\0");
        bytes.resize(4096, 0);
        bytes.extend_from_slice(code);
        bytes
    }

    #[test]
    fn version_5_bytes_decode_with_the_default_filesystem_settings() {
        let code = b"\x7fELF compiled";
        let bytes = v5_golden(code);
        let parsed = parse(&bytes).unwrap();
        let m = Manifest { code_sha256: Some([5; 32]), ..manifest() };
        assert_eq!((&parsed.manifest, parsed.code), (&m, &code[..]));
        assert_eq!((parsed.manifest.scratch_mib, parsed.manifest.data_mount.as_str()), (16, "/data"));
        assert_eq!(parsed.manifest.scratch_dirs, ["/", "/tmp"]);
        // Written again, it is version 6.
        assert_eq!(encode(&m, b"\0asm\x01\0\0\0", code, &[])[8], 6);
        // The version 6 fields are not read from a version 5 manifest.
        let mut v6_as_v5 = encode(&manifest_v6(), b"\0asm\x01\0\0\0", code, &[]);
        v6_as_v5[8] = 5;
        let crc = crc32(&[&v6_as_v5[..40], &v6_as_v5[HEADER_LEN..HEADER_LEN + manifest_v6().encode().len()]]);
        v6_as_v5[40..44].copy_from_slice(&crc.to_le_bytes());
        assert!(parse(&v6_as_v5).unwrap_err().to_string().contains("unexpected bytes after the last field"));
    }

    #[test]
    fn guest_paths_are_checked_and_each_bad_form_is_named() {
        for good in ["/", "/tmp", "/a/b.c/d", "/.hidden", "/..x", &alloc::format!("/{}", "n".repeat(255))] {
            assert_eq!(check_guest_path(good), Ok(()), "{good}");
        }
        let long = alloc::format!("/{}", ["d"; 513].join("/"));
        for (bad, message) in [
            ("", r#"path "" is not absolute"#),
            ("tmp", r#"path "tmp" is not absolute"#),
            ("//", r#"path "//" has an empty component"#),
            ("/a//b", r#"path "/a//b" has an empty component"#),
            ("/tmp/", r#"path "/tmp/" has an empty component"#),
            ("/a/./b", r#"path "/a/./b" has a "." component"#),
            ("/..", r#"path "/.." has a ".." component"#),
            ("/a\0b", r#"path "/a\0b" holds a NUL"#),
            (&alloc::format!("/{}", "n".repeat(256)), "has a component of 256 bytes, more than 255"),
            (&long, "is 1026 bytes, more than 1024"),
        ] {
            let e = check_guest_path(bad).unwrap_err().to_string();
            assert!(e.contains(message), "{bad:?}: {e}");
        }
        assert_eq!(check_guest_path(&long[..MAX_GUEST_PATH_BYTES]), Ok(()));
    }

    #[test]
    fn rejects_invalid_filesystem_settings_naming_the_field_and_value() {
        let dirs = |dirs: &[&str]| dirs.iter().map(|&d| String::from(d)).collect::<Vec<_>>();
        let nine = dirs(&["/1", "/2", "/3", "/4", "/5", "/6", "/7", "/8", "/9"]);
        for (m, message) in [
            (Manifest { scratch_mib: 0, ..manifest_v6() }, "scratch MiB: 0 MiB is outside 1..=1024"),
            (Manifest { scratch_mib: MAX_SCRATCH_MIB + 1, ..manifest_v6() }, "scratch MiB: 1025 MiB is outside"),
            (Manifest { scratch_dirs: nine.clone(), ..manifest_v6() }, "scratch dirs: 9 entries, more than 8"),
            (Manifest { scratch_dirs: dirs(&["/tmp", "/a", "/tmp"]), ..manifest_v6() }, r#""/tmp" is given twice"#),
            (Manifest { scratch_dirs: dirs(&["/a/../b"]), ..manifest_v6() }, r#"scratch dirs: path "/a/../b""#),
            (Manifest { scratch_dirs: dirs(&["tmp"]), ..manifest_v6() }, r#"scratch dirs: path "tmp" is not"#),
            (Manifest { data_mount: "/data/".into(), ..manifest_v6() }, r#"data mount: path "/data/" has an"#),
            (Manifest { data_mount: String::new(), ..manifest_v6() }, r#"data mount: path "" is not absolute"#),
            (Manifest { scratch_mib: 8, ..manifest() }, "filesystem settings: 8 MiB"),
            (Manifest { data_mount: "/d".into(), ..manifest() }, "version before 6"),
        ] {
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains(message), "{message}: {e}");
        }
        let limits = Manifest { scratch_mib: MAX_SCRATCH_MIB, scratch_dirs: nine[..8].to_vec(), ..manifest_v6() };
        assert_eq!(limits.validate(), Ok(()));
        assert_eq!(Manifest { scratch_mib: 1, scratch_dirs: Vec::new(), ..manifest_v6() }.validate(), Ok(()));
    }

    #[test]
    fn rejects_hostile_filesystem_fields_in_version_6_bytes() {
        let m = manifest_v6();
        let good = m.encode();
        let decode = |bytes: &[u8]| Manifest::decode(bytes, FORMAT_VERSION_WITH_FILESYSTEM);
        assert_eq!(decode(&good), Ok(m.clone()));
        // Every cut inside the new fields is named by the field it cuts.
        let fields_at = good.len() - (4 + 2 + 6 + 7 + 6);
        for (len, field) in [
            (fields_at, "scratch MiB"),
            (fields_at + 3, "scratch MiB"),
            (fields_at + 5, "scratch dirs"),
            (fields_at + 7, "scratch dirs"),
            (fields_at + 18, "scratch dirs"),
            (fields_at + 19, "data mount"),
            (good.len() - 1, "data mount"),
        ] {
            assert_eq!(decode(&good[..len]), Err(BundleError::ManifestTruncated(field)), "{len}");
        }
        // A scratch cap out of range, as the bytes say it.
        let with_mib = |mib: u32| {
            let mut b = good.clone();
            b[fields_at..fields_at + 4].copy_from_slice(&mib.to_le_bytes());
            decode(&b).unwrap_err().to_string()
        };
        assert!(with_mib(0).contains("scratch MiB: 0 MiB is outside 1..=1024"));
        assert!(with_mib(MAX_SCRATCH_MIB + 1).contains("scratch MiB: 1025 MiB is outside 1..=1024"));
        // A directory count past the cap is refused before anything is read for it.
        for count in [9u16, u16::MAX] {
            let mut b = good[..fields_at + 4].to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            let e = decode(&b).unwrap_err().to_string();
            assert!(e.contains(&alloc::format!("scratch dirs: {count} entries, more than 8")), "{e}");
        }
        // A duplicate directory, and a relative data mount, written as bytes.
        let mut b = good[..fields_at + 4].to_vec();
        b.extend_from_slice(b"\x02\0\x04\0/tmp\x04\0/tmp\x04\0/srv");
        assert!(decode(&b).unwrap_err().to_string().contains(r#"scratch dirs: "/tmp" is given twice"#));
        let mut b = good[..good.len() - 4].to_vec();
        b.extend_from_slice(b"srv/");
        assert!(decode(&b).unwrap_err().to_string().contains(r#"data mount: path "srv/" is not absolute"#));
        // Bytes after the data mount that are not a volume hash.
        let mut b = good.clone();
        b.push(0);
        assert_eq!(decode(&b), Err(BundleError::TrailingManifestBytes(1)));
    }

    #[test]
    fn preopens_are_the_scratch_dirs_then_the_data_mount_when_there_is_a_volume() {
        let m = manifest_v6();
        assert_eq!(m.preopens(), ["/tmp", "/work"]);
        let with_volume = Manifest { volume_sha256: Some([9; 32]), ..m.clone() };
        assert_eq!(with_volume.preopens(), ["/tmp", "/work", "/srv"]);
        let defaults = Manifest { volume_sha256: Some([9; 32]), ..manifest() };
        assert_eq!(defaults.preopens(), ["/", "/tmp", "/data"]);
        let shared = Manifest { data_mount: "/work".into(), ..with_volume.clone() };
        assert_eq!(shared.preopens(), ["/tmp", "/work"], "a scratch dir already there is not opened twice");
        let only_data = Manifest { scratch_dirs: Vec::new(), ..with_volume };
        assert_eq!(only_data.preopens(), ["/srv"]);
    }

    #[test]
    fn rejects_hostile_code_fields() {
        let (wasm, code) = (b"\0asm\x01\0\0\0", b"\x7fELF");
        let m = Manifest { code_sha256: Some([5; 32]), ..manifest() };
        let good = encode(&m, wasm, code, &[]);
        let err = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            edit(&mut b);
            parse(&b).unwrap_err().to_string()
        };
        // A code length that disagrees with the total, or is out of range, is named.
        assert!(err(&|b| b[52] = 9).contains("total length"));
        let huge = (MAX_CODE_BYTES + 1).to_le_bytes();
        assert!(err(&|b| b[52..60].copy_from_slice(&huge)).contains("code length is 268435457"));
        assert!(err(&|b| b[60] = 1).contains("reserved bytes"));
        assert!(err(&|b| b[4000] = 1).contains("padding before the code"));
        // Version 6 or 5 without code, and code before version 5.
        let codeless = encode(&m, wasm, &[], &[]);
        assert!(parse(&codeless).unwrap_err().to_string().contains("code length is 0, expected 1 to 268435456"));
        let mut codeless_v5 = codeless.clone();
        codeless_v5[8] = 5;
        assert!(parse(&codeless_v5).unwrap_err().to_string().contains("code length is 0, expected 1 to 268435456"));
        let mut v4 = encode(&manifest(), wasm, code, &[]);
        v4[8] = 4;
        assert!(parse(&v4).unwrap_err().to_string().contains("0 before version 5"));
        // A presence byte other than 0 or 1, in version 5 and in version 6.
        let mut manifest_bytes = m.encode();
        let filesystem_len = 4 + 2 + (2 + 1) + (2 + 4) + (2 + 5);
        let at = manifest_bytes.len() - filesystem_len - 33;
        manifest_bytes[at] = 7;
        let e = Manifest::decode(&manifest_bytes, FORMAT_VERSION_WITH_FILESYSTEM).unwrap_err().to_string();
        assert!(e.contains("presence byte 7"), "{e}");
        let e = Manifest::decode(&manifest_bytes[..at + 33], FORMAT_VERSION_WITH_CODE).unwrap_err().to_string();
        assert!(e.contains("presence byte 7"), "{e}");
        for len in 0..good.len() {
            assert!(parse(&good[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn every_bundle_error_message_is_pinned() {
        let elf = *b"\x7fELF\x02\x01\x01\0";
        let cases: [(BundleError, &str); 10] = [
            (BundleError::TooShort(10), "bundle is 10 bytes, shorter than its 64-byte header (truncated?)"),
            (
                BundleError::BadMagic(magic::IMAGE),
                "this is a snapshot image (from `thaw snapshot`), not a function bundle: give the bundle it was taken from (`thaw pack` writes bundles)",
            ),
            (
                BundleError::BadMagic(elf),
                r#"bundle magic [7f, 45, 4c, 46, 02, 01, 01, 00] is not "THAWFUNC": not a thaw function bundle"#,
            ),
            (
                BundleError::UnsupportedVersion(9),
                "bundle format version 9 is not supported (this thaw reads versions 1 to 7)",
            ),
            (
                BundleError::BadHeader { field: "wasm length", value: 0, expected: "1 to 268435456" },
                "bundle header: wasm length is 0, expected 1 to 268435456",
            ),
            (
                BundleError::LengthMismatch { actual: 100, declared: 200 },
                "bundle is 100 bytes but its header declares 200 (truncated, or lengths that lie)",
            ),
            (
                BundleError::Checksum { stored: 0x1234, computed: 0xdead_beef },
                "bundle checksum 0x00001234 does not match the computed 0xdeadbeef (corrupted)",
            ),
            (BundleError::ManifestTruncated("env"), "bundle manifest: env runs past the end of the manifest"),
            (
                BundleError::BadField { field: "memory", reason: "0 MiB is outside 1..=4096".to_string() },
                "bundle manifest: memory: 0 MiB is outside 1..=4096",
            ),
            (BundleError::TrailingManifestBytes(3), "bundle manifest: 3 unexpected bytes after the last field"),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
