//! `thaw invoke`: answer one request from a fresh VM: cold-booted from a bundle (boot, compile,
//! init, handle), or restored from a snapshot image (handle only). The file's magic decides.
//!
//! The response goes to stdout and the function's stderr to stderr. The guest kernel's own log is
//! shown only with `--verbose`, or when the guest itself fails (then without its banner).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use host_vmm::{Function, FunctionResponse, FunctionStatus, Lanes, Mode, Outcome, VmConfig};

use crate::stats::{Device, Measured, RequestStats};

/// Why a request could not be read, served or answered.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The file could not be opened or read.
    #[error("reading {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is neither a bundle nor an image.
    #[error("{}: starts with {start:02x?}, which is neither a function bundle (THAWFUNC) nor a snapshot image (THAWSNAP)", path.display())]
    NotFunction {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        start: Vec<u8>,
    },
    /// The bundle is not a valid function.
    #[error("{}: {source}", path.display())]
    Bundle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: crate::code::CodeError,
    },
    /// Neither `--data` nor `--input`.
    #[error("give the request with --data or --input")]
    NoRequest,
    /// `--input -` could not be read.
    #[error("--input -: reading standard input: {0}")]
    Stdin(std::io::Error),
    /// `--input -` is larger than a request may be.
    #[error("--input -: the request is larger than {0} bytes")]
    StdinTooLarge(u64),
    /// The guest ended cleanly but never answered.
    #[error("the guest exited without answering the request")]
    NoAnswer,
    /// The kernel or the timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// A device option.
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    /// A file to read.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The image.
    #[error(transparent)]
    Image(#[from] host_vmm::snapshot::SnapshotError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] host_vmm::VmmError),
    /// The syscall allow-list.
    #[error(transparent)]
    Seccomp(#[from] host_vmm::seccomp::SeccompError),
    /// The stats.
    #[error(transparent)]
    Stats(#[from] crate::stats::StatsError),
    /// The response could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Arguments of `thaw invoke`.
#[derive(Args, Debug)]
pub struct InvokeArgs {
    /// The function: a bundle from `thaw pack`, or an image from `thaw snapshot`.
    #[arg(value_name = "FUNCTION.thaw|FUNCTION.snap")]
    function: PathBuf,
    /// The request body.
    #[arg(long, value_name = "STRING", conflicts_with = "input", required_unless_present = "input")]
    data: Option<String>,
    /// Read the request body from this file ("-": standard input).
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Print one JSON object on stdout instead of the response: how the request ended, the
    /// response and the function's stderr, per-phase timings (µs), memory, VM exits and
    /// per-device counters (docs/API.md, "Stats").
    #[arg(long)]
    json: bool,
    /// Wall-clock limit for the whole invocation, boot included, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    timeout: f64,
    /// Show the guest kernel's log on stderr.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    boot_devices: crate::devices::BootDevices,
    #[command(flatten)]
    restore_devices: crate::devices::RestoreDevices,
    #[command(flatten)]
    backends: crate::devices::Backends,
    #[command(flatten)]
    seccomp: crate::SeccompArgs,
}

/// An optional function and its request, for commands that boot a kernel alone or serve a
/// function (`thaw qemu`, `thaw bench`).
#[derive(Args, Debug)]
pub struct OptionalFunctionArgs {
    /// A function bundle (or, for `thaw bench`, a snapshot image) to serve one request to
    /// [default: boot the kernel alone].
    #[arg(value_name = "FUNCTION")]
    pub function: Option<PathBuf>,
    /// The request body (with FUNCTION).
    #[arg(long, value_name = "STRING", requires = "function", conflicts_with = "input")]
    pub data: Option<String>,
    /// Read the request body from this file ("-": standard input) (with FUNCTION).
    #[arg(long, value_name = "FILE", requires = "function")]
    pub input: Option<PathBuf>,
}

/// A validated function and the request to serve it.
pub struct FunctionRequest {
    /// The function.
    pub function: Function,
    /// The request body.
    pub request: Vec<u8>,
}

impl OptionalFunctionArgs {
    /// The function and its request, if a function was given.
    /// Its files are read within `within`.
    pub fn load(&self, within: Duration) -> Result<Option<FunctionRequest>, InvokeError> {
        let Some(path) = &self.function else { return Ok(None) };
        let function = load_function(path, within)?;
        let request = request_body(self.data.as_ref(), self.input.as_ref(), within)?;
        Ok(Some(FunctionRequest { function, request }))
    }
}

/// Largest bundle file thaw reads.
pub const MAX_BUNDLE_FILE: u64 = (80 << 20) + abi::volume::MAX_VOLUME_BYTES;

/// Runs `thaw invoke` and returns the process exit code.
pub fn run(args: &InvokeArgs) -> Result<u8, InvokeError> {
    let request = request_body(args.data.as_ref(), args.input.as_ref(), timeout(args)?)?;
    if file_magic(&args.function)? == abi::image::MAGIC {
        return invoke_image(args, request);
    }
    let function = load_function(&args.function, timeout(args)?)?;
    let timeout = timeout(args)?;
    let kernel = crate::kernel::built_in()?;
    let mut config = function.boot_config(VmConfig::default(), timeout, vec![request]);
    args.restore_devices.refuse_on_boot()?;
    args.boot_devices.apply(&args.backends, &mut config);
    crate::devices::add_function_devices(&mut config, &function, &args.function)?;
    crate::confine(&args.seccomp)?;
    let mut kernel_log = Vec::new();
    let report = if args.verbose {
        host_vmm::run_kernel(kernel, &config, &mut std::io::stderr().lock())
    } else {
        host_vmm::run_kernel(kernel, &config, &mut kernel_log)
    }?;
    // A cold boot's init ran here: what it wrote to stderr comes first.
    let _ = std::io::stderr().write_all(&report.init_stderr);
    let outcome = (&report.outcome, report.responses.first());
    finish_invoke(args, outcome, || Ok(Measured::of_run(&report)), &report.devices, &kernel_log)
}

/// The first 8 bytes of `path`, which must be a bundle's or an image's magic. It must be a
/// regular file: an image is mapped, and a FIFO would be read twice (or wait forever).
pub fn file_magic(path: &std::path::Path) -> Result<[u8; 8], InvokeError> {
    use std::io::Read;
    let fail = |source| InvokeError::Unreadable { path: path.to_path_buf(), source };
    let mut magic = [0u8; 8];
    let mut file = host_vmm::files::open_regular(path).map_err(fail)?;
    let n = file.read(&mut magic).map_err(fail)?;
    if magic != abi::image::MAGIC && magic != abi::bundle::MAGIC {
        return Err(InvokeError::NotFunction { path: path.to_path_buf(), start: magic[..n].to_vec() });
    }
    Ok(magic)
}

fn timeout(args: &InvokeArgs) -> Result<Duration, InvokeError> {
    Ok(crate::kernel::parse_timeout(args.timeout)?)
}

/// Serves the request from a fresh VM restored from the image at `args.function`.
fn invoke_image(args: &InvokeArgs, request: Vec<u8>) -> Result<u8, InvokeError> {
    let image = std::sync::Arc::new(host_vmm::Image::open(&args.function)?);
    let mut config = VmConfig { timeout: timeout(args)?, ..VmConfig::default() };
    args.boot_devices.refuse_on_restore()?;
    args.restore_devices.apply(&args.backends, &mut config, &image)?;
    crate::confine(&args.seccomp)?;
    let mut lane = Lanes::start(image, config, Mode::Fresh, 0)?.lane();
    let mut kernel_log = Vec::new();
    let served = if args.verbose {
        lane.serve(request, &mut std::io::stderr().lock())
    } else {
        lane.serve(request, &mut kernel_log)
    }?;
    let measured = || {
        let mut measured = Measured::of_served(&served);
        let private = lane.used().map(|vm| vm.vm().private_memory()).transpose()?;
        measured.memory.private_kib = private.map(|bytes| bytes / 1024);
        Ok(measured)
    };
    finish_invoke(args, (&served.outcome, served.response.as_ref()), measured, &served.devices, &kernel_log)
}

/// Ends `thaw invoke` after a run that ended with `outcome` and `response`: with --json, the
/// request's stats on stdout (its output among them, what `measured` gives, the `devices`);
/// otherwise the response.
fn finish_invoke(
    args: &InvokeArgs,
    (outcome, response): (&Outcome, Option<&FunctionResponse>),
    measured: impl FnOnce() -> Result<Measured, InvokeError>,
    devices: &[host_vmm::virtio::DeviceStats],
    kernel_log: &[u8],
) -> Result<u8, InvokeError> {
    if !args.json {
        return conclude(outcome, response, kernel_log);
    }
    let mut stats = RequestStats::new(outcome, response);
    stats.measured = measured()?;
    stats.devices = devices.iter().map(Device::from).collect();
    crate::stats::print_json(&stats)?;
    settle(outcome, response, kernel_log, |response| Ok(exit_code(&response.status)))
}

/// Ends a one-request run, under either hypervisor: the response if the guest answered and
/// exited cleanly, otherwise the kernel's log (empty if it was already shown) and why it ended.
pub fn conclude(outcome: &Outcome, response: Option<&FunctionResponse>, kernel_log: &[u8]) -> Result<u8, InvokeError> {
    settle(outcome, response, kernel_log, answer)
}

/// [`conclude`], with `respond` giving a clean response's exit code.
fn settle(
    outcome: &Outcome,
    response: Option<&FunctionResponse>,
    kernel_log: &[u8],
    respond: impl FnOnce(&FunctionResponse) -> Result<u8, InvokeError>,
) -> Result<u8, InvokeError> {
    // A failed init is the function's failure, reported like a request's: its response.
    let clean = matches!(outcome, Outcome::Exited(0) | Outcome::Answered | Outcome::InitFailed(_));
    if !clean {
        let _ = std::io::stderr().write_all(&without_banner(kernel_log));
    }
    match (clean, response) {
        (true, Some(response)) => respond(response),
        (true, None) => Err(InvokeError::NoAnswer),
        (false, _) => Ok(crate::finish(outcome)),
    }
}

/// The kernel's log without the lines every boot prints (its version, its devices, that it is
/// ready), which say nothing about a failure; `--verbose` shows them.
fn without_banner(log: &[u8]) -> Vec<u8> {
    let banner = |line: &[u8]| {
        line.starts_with(b"thaw-guest ")
            || line.starts_with(b"thaw-guest: ready ")
            || line.starts_with(b"thaw-guest: virtio ")
    };
    log.split_inclusive(|&b| b == b'\n').filter(|line| !banner(line)).flatten().copied().collect()
}

/// The request body `--data` or `--input` names; a file is read within `within`, and `-` is
/// standard input, read to its end.
pub fn request_body(data: Option<&String>, input: Option<&PathBuf>, within: Duration) -> Result<Vec<u8>, InvokeError> {
    match (data, input) {
        (Some(data), _) => Ok(data.as_bytes().to_vec()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            use std::io::Read as _;
            let limit = abi::invoke::MAX_REQUEST_BYTES;
            let mut body = Vec::new();
            std::io::stdin().lock().take(limit + 1).read_to_end(&mut body).map_err(InvokeError::Stdin)?;
            if body.len() as u64 > limit {
                return Err(InvokeError::StdinTooLarge(limit));
            }
            Ok(body)
        }
        (None, Some(path)) => Ok(crate::files::read_limited(path, abi::invoke::MAX_REQUEST_BYTES, "request", within)?),
        (None, None) => Err(InvokeError::NoRequest),
    }
}

/// Reads and validates a function bundle, within `within`, with code this thaw compiled from
/// its wasm ([`crate::code::own`], the bundle rule).
pub fn load_function(path: &std::path::Path, within: Duration) -> Result<Function, InvokeError> {
    let bytes = crate::files::read_limited(path, MAX_BUNDLE_FILE, "function bundle", within)?;
    let checking = crate::progress::Status::show(&format!("thaw: checking {}'s code...", path.display()));
    let owned = crate::code::own(bytes, &crate::code::CodeCache::user());
    drop(checking);
    owned.map_err(|source| InvokeError::Bundle { path: path.to_path_buf(), source })
}

/// Prints a response and returns the exit code it implies; a response that cannot be written
/// (a closed pipe, a full disk) is an error, so that it is never lost with an exit code of 0.
pub fn answer(response: &FunctionResponse) -> Result<u8, InvokeError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&response.stdout)
        .and_then(|()| stdout.flush())
        .map_err(|e| crate::write_failed("the response to stdout", e))?;
    let _ = std::io::stderr().lock().write_all(&response.stderr);
    Ok(exit_code(&response.status))
}

/// The exit code a function's status implies, after a line on stderr saying why unless it is 0.
fn exit_code(status: &FunctionStatus) -> u8 {
    match status {
        FunctionStatus::Ok | FunctionStatus::Exited(0) => 0,
        FunctionStatus::Trapped(message) => {
            eprintln!("thaw: function trapped: {message}");
            abi::exit_code::FUNCTION_TRAPPED as u8
        }
        FunctionStatus::Exited(code) => {
            eprintln!("thaw: function exited with code {code}");
            abi::exit_code::of_exit(*code) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_guest_s_log_loses_its_banner_and_keeps_the_rest() {
        let log = b"thaw-guest 0.1.0 (abi 9)\nthaw-guest: virtio block (mmio)\nthaw-guest: ready (cpl 3)\n\
            thaw-guest: data volume: bad magic\npanicked at the disco\nunfinished";
        assert_eq!(
            super::without_banner(log),
            b"thaw-guest: data volume: bad magic\npanicked at the disco\nunfinished"
        );
    }
}
