//! `thaw snapshot`: cold-boot a function, run its init, write the VM at its checkpoint to an
//! image that `thaw invoke` restores from, and record the working set of a sample request into
//! it (`host_vmm::capture`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use host_vmm::VmConfig;

/// Why a function could not be snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshotting the function in `path` failed.
    #[error("{}: {source}", path.display())]
    Function {
        /// Its bundle.
        path: PathBuf,
        /// Why.
        source: Box<SnapshotError>,
    },
    /// The kernel or the timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// A device option.
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    /// A file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The bundle.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] host_vmm::VmmError),
}

/// Arguments of `thaw snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The function bundle, from `thaw pack`.
    #[arg(value_name = "FUNCTION.thaw")]
    function: PathBuf,
    /// Where to write the image.
    #[arg(short, long, value_name = "FUNCTION.snap")]
    output: PathBuf,
    /// Wall-clock limit for booting and initializing, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    timeout: f64,
    /// The sample request whose touched pages become the image's working set, which VMs
    /// restored ahead of their request (pool and reset modes) touch before it arrives
    /// [default: the bundle's sample request (`thaw pack --sample-data`), or the empty request].
    #[arg(long, value_name = "STRING", conflicts_with = "no_working_set")]
    sample_data: Option<String>,
    /// Record no working set (the sample request is not run).
    #[arg(long)]
    no_working_set: bool,
    #[command(flatten)]
    devices: crate::devices::BootDevices,
    #[command(flatten)]
    backends: crate::devices::Backends,
}

/// Runs `thaw snapshot` and returns the process exit code.
pub fn run(args: &SnapshotArgs) -> Result<u8, SnapshotError> {
    crate::files::remove_drafts_on_signal()?;
    let timeout = crate::kernel::parse_timeout(args.timeout)?;
    let function = crate::invoke::load_function(&args.function, timeout)?;
    let mut config = VmConfig::default();
    args.devices.apply(&args.backends, &mut config);
    crate::devices::add_function_devices(&mut config, &function, &args.function)?;
    let (sample, source) = match (&args.sample_data, &function.manifest.sample_request) {
        _ if args.no_working_set => (None, ""),
        (Some(data), _) => (Some(data.clone().into_bytes()), "--sample-data"),
        (None, Some(bundled)) => (Some(bundled.clone()), "the bundle's sample request"),
        (None, None) => (Some(Vec::new()), "the empty request"),
    };
    let working = crate::progress::Status::show(&format!(
        "thaw: snapshotting {}: booting it, running its init{}...",
        function.manifest.name,
        if sample.is_some() { " and recording its working set" } else { "" }
    ));
    let snapshotted = snapshot_function(&function, &args.output, timeout, config, sample);
    drop(working);
    let (status, init_stderr) =
        snapshotted.map_err(|e| SnapshotError::Function { path: args.function.clone(), source: Box::new(e) })?;
    // What init wrote to stderr: the one run of init the author sees.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), &init_stderr);
    let output = args.output.display();
    if source.is_empty() {
        eprintln!("thaw: {status}, in {output}");
    } else {
        eprintln!("thaw: {status}, in {output} (working set of {source})");
    }
    Ok(0)
}

/// Snapshots `function` on the built-in kernel into `output` (see
/// [`host_vmm::capture::snapshot_function`]), recording the working set of `sample` unless it
/// is `None`. Returns a one-line summary (which does not name `output`, perhaps a temporary
/// file), and what the function's init wrote to stderr.
pub fn snapshot_function(
    function: &host_vmm::Function,
    output: &Path,
    timeout: Duration,
    devices: VmConfig,
    sample: Option<Vec<u8>>,
) -> Result<(String, Vec<u8>), SnapshotError> {
    let kernel = crate::kernel::built_in()?;
    let captured = host_vmm::capture::snapshot_function(
        kernel,
        function,
        output,
        timeout,
        devices,
        sample,
        &mut std::io::stderr(),
    )?;
    let stats = captured.stats;
    let working_set = match &captured.working_set {
        None => "no working set".to_string(),
        Some(r) => {
            let pages = abi::workingset::page_count(&r.runs);
            let written: u64 = r.runs.iter().filter(|run| run.written).map(|run| u64::from(run.pages)).sum();
            format!("a working set of {pages} pages ({written} written) in {} runs", r.runs.len())
        }
    };
    let summary = format!(
        "snapshot of {} after {} ms of boot and init: {} MiB of guest memory, {} non-zero pages ({} KiB), {working_set}",
        function.manifest.name,
        captured.boot_and_init.as_millis(),
        stats.guest_memory >> 20,
        stats.pages_written,
        stats.pages_written * 4,
    );
    Ok((summary, captured.init_stderr))
}
