//! `thaw run`: boot a kernel under KVM with thaw's VMM.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use host_vmm::exit::ExitError;
use host_vmm::{RunReport, VmConfig, VmmError};

use crate::KernelArgs;

/// Arguments of `thaw run`. The device options speak of the kernel, not of a function.
#[derive(Args, Debug)]
#[command(
    mut_arg("devices", |a| a.help("Virtio devices to boot the kernel with, comma-separated: console, entropy, vsock")),
    mut_arg("console", |a| a.help(
        "Write what the kernel sends to its virtio console to FILE (\"-\": thaw's stderr), adding a console if --devices has none"
    )),
)]
pub struct RunArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    memory: u64,
    /// Load FILE into guest memory as the kernel's ramdisk, for test kernels (thaw's own kernel
    /// finds a function bundle there, which `thaw invoke` places).
    #[arg(long, value_name = "FILE")]
    ramdisk: Option<PathBuf>,
    /// Print how long each boot phase took, in microseconds, on stderr.
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    devices: crate::devices::BootDevices,
    #[command(flatten)]
    backends: crate::devices::Backends,
}

/// Why a kernel could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kernel, ramdisk or timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// A device option.
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    /// The VMM.
    #[error(transparent)]
    Vmm(VmmError),
    /// The guest's output could not be written.
    #[error(transparent)]
    Output(crate::OutputError),
}

/// Runs `thaw run` and returns the process exit code.
pub fn run(args: &RunArgs) -> Result<u8, RunError> {
    let kernel = crate::kernel::load(&args.kernel)?;
    let ramdisk = args.ramdisk.as_deref().map(|path| crate::kernel::load_ramdisk(path, &args.kernel)).transpose()?;
    let mut config = VmConfig {
        memory_mib: args.memory,
        timeout: crate::kernel::timeout(&args.kernel)?,
        ramdisk,
        ..VmConfig::default()
    };
    args.devices.apply(&args.backends, &mut config);
    crate::devices::check_services(&config)?;
    let stdout = std::io::stdout();
    let report = host_vmm::run_kernel(&kernel.image, &config, &mut stdout.lock()).map_err(|e| match e {
        VmmError::Exit(ExitError::Output(e)) => {
            RunError::Output(crate::write_failed("the guest's output to stdout", e))
        }
        e => RunError::Vmm(e),
    })?;
    if args.timings {
        print_timings(&report);
    }
    Ok(crate::finish(&report.outcome))
}

fn print_timings(report: &RunReport) {
    let t = &report.timings;
    let us = |d: Option<std::time::Duration>| d.map_or("-".to_string(), |d| d.as_micros().to_string());
    let rows = [
        ("vm create", us(Some(t.vm_create))),
        ("load", us(Some(t.load))),
        ("vcpu setup", us(Some(t.vcpu_setup))),
        ("ring-0 early boot", us(t.ring0_boot)),
        ("ring 3 to ready", us(t.ring3_to_ready)),
        ("total", us(Some(t.total))),
    ];
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "thaw: boot timings (µs)");
    for (name, value) in rows {
        let _ = writeln!(err, "  {name:<18} {value:>8}");
    }
    let _ = writeln!(err, "  {:<18} {:>8}", "vm exits", report.exits);
}
