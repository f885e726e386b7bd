//! `thaw snapshot`: cold-boot a function, run its init, and write the VM at its checkpoint to an
//! image that `thaw invoke` restores from.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use abi::image::GuestMetadata;
use clap::Args;
use host_vmm::mailbox::Mailbox;
use host_vmm::{BootTimings, CheckpointMode, Outcome, Vm, VmConfig};

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
    #[command(flatten)]
    devices: crate::devices::DeviceArgs,
}

/// Runs `thaw snapshot` and returns the process exit code.
pub fn run(args: &SnapshotArgs) -> Result<u8, String> {
    let function = crate::invoke::load_function(&args.function)?;
    let timeout = crate::kernel::parse_timeout(args.timeout)?;
    let mut config = VmConfig::default();
    args.devices.apply_boot(&mut config)?;
    crate::devices::add_function_devices(&mut config, &function, &args.function);
    let status = snapshot_function(&function, &args.output, timeout, config)
        .map_err(|e| format!("{}: {e}", args.function.display()))?;
    eprintln!("thaw: {status}");
    Ok(0)
}

/// Cold-boots `function` with the devices in `devices` (a config whose memory, ramdisk and
/// timeout are filled in here), stops it at its checkpoint, and writes the image to `output`.
/// Returns a one-line summary.
pub fn snapshot_function(
    function: &host_vmm::Function,
    output: &std::path::Path,
    timeout: Duration,
    devices: VmConfig,
) -> Result<String, String> {
    let kernel = host_vmm::KernelImage::parse(crate::kernel::BUILT_IN).map_err(|e| format!("built-in kernel: {e}"))?;
    let config = VmConfig {
        memory_mib: function.vm_memory_mib(),
        timeout,
        ramdisk: Some(function.ramdisk().to_vec()),
        requests: Vec::new(),
        ..devices
    };
    let started = Instant::now();
    let mut timings = BootTimings::default();
    let mut vm = Vm::boot(&kernel, &config, &mut timings).map_err(|e| e.to_string())?;
    let mut kernel_log = Vec::new();
    let (outcome, _, _) = vm
        .run(&mut kernel_log, Mailbox::default(), timeout, CheckpointMode::Capture, &mut timings)
        .map_err(|e| e.to_string())?;
    if !matches!(outcome, Outcome::Checkpointed) {
        use std::io::Write;
        let _ = std::io::stderr().write_all(&kernel_log);
        let code = crate::finish(&outcome);
        return Err(format!("the function ended before reaching its checkpoint (exit {code})"));
    }
    let boot_and_init = started.elapsed();
    let guest = GuestMetadata {
        interface_version: abi::INTERFACE_VERSION,
        function_name: function.manifest.name.clone(),
        wasm_sha256: function.manifest.wasm_sha256,
        io_table_gpa: 0,
        io_table_len: 0,
        runtime_version: concat!("thaw-guest ", env!("CARGO_PKG_VERSION")).into(),
    };
    let volume =
        function.volume.map_or(&[][..], |(offset, len)| &function.bundle[offset as usize..(offset + len) as usize]);
    let stats = vm.snapshot(output, guest, volume).map_err(|e| e.to_string())?;
    Ok(format!(
        "snapshot of {} after {} ms of boot and init: {} MiB of guest memory, {} non-zero pages ({} KiB) in {}",
        function.manifest.name,
        boot_and_init.as_millis(),
        stats.guest_memory >> 20,
        stats.pages_written,
        stats.pages_written * 4,
        output.display()
    ))
}
