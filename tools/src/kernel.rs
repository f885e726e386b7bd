//! Choosing and validating the kernel a command boots: `--kernel PATH` or the built-in one.

use std::path::PathBuf;
use std::time::Duration;

use host_vmm::KernelImage;

use crate::KernelArgs;
use crate::files::FilesError;

/// A kernel, ramdisk or timeout a command cannot use.
#[derive(Debug, thiserror::Error)]
pub enum KernelArgsError {
    /// The kernel built into thaw is not valid (a broken build).
    #[error("built-in kernel: {0}")]
    BuiltIn(&'static host_vmm::KernelError),
    /// The kernel `--kernel` names is not valid.
    #[error("kernel {name}: {source}")]
    Invalid {
        /// The kernel file, or "built-in kernel".
        name: String,
        /// What is wrong with it.
        source: host_vmm::KernelError,
    },
    /// `--timeout` is not a positive number of seconds, or is past [`MAX_TIMEOUT_SECS`].
    #[error("--timeout {}: must be a positive number of seconds, at most {MAX_TIMEOUT_SECS}", shown(*.0))]
    Timeout(f64),
    /// A file could not be read.
    #[error(transparent)]
    File(#[from] FilesError),
    /// The ramdisk is a function bundle whose code could not be had (`code::own`).
    #[error("ramdisk {}: {source}", path.display())]
    Bundle {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: crate::code::CodeError,
    },
}

/// The guest kernel built with this binary.
pub static BUILT_IN: &[u8] = include_bytes!(env!("CARGO_BIN_FILE_GUEST_KERNEL_thaw-guest"));

/// The built-in kernel, parsed and validated once per process.
pub fn built_in() -> Result<&'static KernelImage, KernelArgsError> {
    static PARSED: std::sync::OnceLock<Result<KernelImage, host_vmm::KernelError>> = std::sync::OnceLock::new();
    PARSED.get_or_init(|| KernelImage::parse(BUILT_IN)).as_ref().map_err(KernelArgsError::BuiltIn)
}

/// Largest kernel file thaw reads.
const MAX_KERNEL_FILE: u64 = 256 << 20;

/// The largest file `--ramdisk` loads.
const MAX_RAMDISK_FILE: u64 = 64 << 20;

/// Reads the file `--ramdisk` names, for a kernel booted on its own. A function bundle there
/// gets this thaw's code, as `thaw invoke` gives it (the bundle rule, `code.rs`).
pub fn load_ramdisk(path: &std::path::Path, args: &KernelArgs) -> Result<Vec<u8>, KernelArgsError> {
    let bytes = crate::files::read_limited(path, MAX_RAMDISK_FILE, "ramdisk", timeout(args)?)?;
    if !bytes.starts_with(&abi::bundle::MAGIC) {
        return Ok(bytes);
    }
    crate::code::own(bytes, &crate::code::CodeCache::user())
        .map(|function| function.bundle)
        .map_err(|source| KernelArgsError::Bundle { path: path.to_path_buf(), source })
}

/// A kernel's bytes and where they came from.
pub struct Kernel {
    /// The ELF bytes.
    pub bytes: Vec<u8>,
    /// The file they were read from, or `None` for the built-in kernel.
    pub path: Option<PathBuf>,
    /// The validated image.
    pub image: KernelImage,
}

/// Reads and validates the kernel `args` names.
pub fn load(args: &KernelArgs) -> Result<Kernel, KernelArgsError> {
    let bytes = match &args.kernel {
        Some(path) => crate::files::read_limited(path, MAX_KERNEL_FILE, "kernel", timeout(args)?)?,
        None => BUILT_IN.to_vec(),
    };
    let image = KernelImage::parse(&bytes).map_err(|source| KernelArgsError::Invalid {
        name: args.kernel.as_ref().map_or("built-in kernel".into(), |p| p.display().to_string()),
        source,
    })?;
    Ok(Kernel { bytes, path: args.kernel.clone(), image })
}

/// The timeout `args` asks for.
pub fn timeout(args: &KernelArgs) -> Result<Duration, KernelArgsError> {
    parse_timeout(args.timeout)
}

/// The longest `--timeout`: a year.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// A `--timeout` value: a positive number of seconds, at most [`MAX_TIMEOUT_SECS`].
pub fn parse_timeout(secs: f64) -> Result<Duration, KernelArgsError> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|t| !t.is_zero() && t.as_secs() <= MAX_TIMEOUT_SECS)
        .ok_or(KernelArgsError::Timeout(secs))
}

/// `secs` as the user would have written it: in exponent form when it is huge (`1e100`, not a
/// hundred digits).
fn shown(secs: f64) -> String {
    if secs.abs() >= 1e15 { format!("{secs:e}") } else { secs.to_string() }
}
