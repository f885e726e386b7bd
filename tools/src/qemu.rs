//! `thaw qemu`: boot a kernel under QEMU (TCG) from a BIOS disk image made with the
//! `bootloader` crate, optionally serving one request to a function, and report the end exactly
//! as `thaw run` or `thaw invoke` would.
//!
//! The guest has no hypercalls here: it prints on COM1 (QEMU's stdout), exits through
//! `isa-debug-exit`, and reports a panic, fault or function response as one marker line
//! (`abi::qemu`). The host parameters and the request travel the other way as frames on COM1
//! (QEMU's stdin). Marker lines are turned back into the outcome instead of being printed, so
//! what the user sees matches the KVM commands.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use abi::devices::DeviceKind;
use abi::fault::FaultReport;
use abi::params::{FLAG_CONSOLE_LOG, HostParams};
use abi::qemu::{self, FAULT_MARKER, PANIC_MARKER, RESPONSE_MARKER, guest_code_from_qemu_status};
use clap::Args;
use host_vmm::{FunctionResponse, FunctionStatus, GuestError, Outcome};

use crate::KernelArgs;
use crate::invoke::OptionalFunctionArgs;

/// Why a guest could not be run under QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// No temporary directory.
    #[error("creating a temporary directory: {0}")]
    TempDir(std::io::Error),
    /// A file for QEMU could not be written.
    #[error("writing the {what} for QEMU: {source}")]
    Write {
        /// "ramdisk", "volume", "built-in kernel".
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The bootloader could not build the disk image.
    #[error("building the BIOS disk image: {0}")]
    DiskImage(String),
    /// QEMU could not be started.
    #[error("starting {program}: {source} (install QEMU: apt-get install qemu-system-x86)")]
    Start {
        /// The QEMU binary.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU's stdout was not piped.
    #[error("QEMU's stdout was not captured")]
    NoStdout,
    /// QEMU could not be waited for.
    #[error("waiting for QEMU: {0}")]
    Wait(std::io::Error),
    /// QEMU ended without the guest's exit code.
    #[error("QEMU ended ({0}) without the guest exiting through isa-debug-exit")]
    NoExitCode(std::process::ExitStatus),
    /// No entropy for the guest's parameters.
    #[error(transparent)]
    Entropy(#[from] host_vmm::host::HostError),
    /// The kernel, ramdisk or timeout.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelArgsError),
    /// The function, its request, or its answer.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// The guest's output could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Arguments of `thaw qemu`.
#[derive(Args, Debug)]
pub struct QemuArgs {
    #[command(flatten)]
    function: OptionalFunctionArgs,
    /// Show the guest kernel's log on stderr when serving a function.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Guest memory in MiB [default: 128, or what the function needs].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// The QEMU binary to run.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// QEMU's own virtio devices for the guest (PCI), comma-separated: console, entropy. A
    /// bundle with a data volume also gets a block device.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = crate::devices::parse_kind)]
    devices: Vec<DeviceKind>,
    /// Send the function's stderr, and the guest's log from the function's start, to the virtio
    /// console, appended to FILE.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Load FILE into guest memory as the kernel's ramdisk, for test kernels booted without a
    /// FUNCTION (whose bundle is the ramdisk otherwise).
    #[arg(long, value_name = "FILE", conflicts_with = "function")]
    ramdisk: Option<PathBuf>,
}

/// What a serial line meant.
enum Line {
    /// Ordinary guest output.
    Output(String),
    /// The guest's end.
    Outcome(Outcome),
    /// A function's response.
    Response(FunctionResponse),
    /// The guest is ready for the request frames.
    AwaitFrames,
    /// The function's init failed, as this response says.
    InitFailed(FunctionResponse),
    /// What the function's init wrote to stderr.
    InitOutput(Vec<u8>),
}

fn unreadable(what: &str, text: &str) -> Line {
    Line::Outcome(Outcome::Failed {
        error: GuestError::UnexpectedExit(format!("unreadable {what} {text:?}")),
        rip: None,
    })
}

/// Classifies one serial line.
fn classify(line: String) -> Line {
    if let Some(message) = line.strip_prefix(PANIC_MARKER) {
        return Line::Outcome(Outcome::Panicked(message.to_string()));
    }
    if let Some(text) = line.strip_prefix(FAULT_MARKER) {
        return match FaultReport::parse_text(text) {
            Some(report) => Line::Outcome(Outcome::Faulted(report)),
            None => unreadable("fault report", text),
        };
    }
    if line == qemu::AWAIT_FRAMES_MARKER {
        return Line::AwaitFrames;
    }
    if let Some(text) = line.strip_prefix(RESPONSE_MARKER) {
        return parse_response(text).map_or_else(|| unreadable("response", text), Line::Response);
    }
    if let Some(text) = line.strip_prefix(qemu::INIT_OUTPUT_MARKER) {
        return parse_response(text).map_or_else(|| unreadable("init output", text), |r| Line::InitOutput(r.stderr));
    }
    if let Some(text) = line.strip_prefix(qemu::INIT_FAILED_MARKER) {
        return parse_response(text).map_or_else(|| unreadable("init failure", text), Line::InitFailed);
    }
    Line::Output(line)
}

fn parse_response(text: &str) -> Option<FunctionResponse> {
    let fields: Vec<&str> = text.split(' ').collect();
    let [status, code, stdout, stderr, message] = fields.as_slice() else { return None };
    let message = String::from_utf8_lossy(&qemu::parse_hex(message)?).into_owned();
    let status = match (status.parse::<u32>().ok()?, code.parse::<u32>().ok()?) {
        (abi::invoke::STATUS_OK, _) => FunctionStatus::Ok,
        (abi::invoke::STATUS_TRAPPED, _) => FunctionStatus::Trapped(message),
        (abi::invoke::STATUS_EXITED, code) => FunctionStatus::Exited(code),
        _ => return None,
    };
    Some(FunctionResponse {
        status,
        stdout: qemu::parse_hex(stdout)?,
        stderr: qemu::parse_hex(stderr)?,
        handle_time: Duration::ZERO,
    })
}

/// The frames a function's guest reads from COM1: host parameters (with `flags`), the request,
/// the end.
fn request_frames(request: &[u8], flags: u32) -> Result<Vec<u8>, QemuError> {
    let mut entropy = [0u8; 32];
    host_vmm::host::entropy(&mut entropy)?;
    let wall_clock_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    // QEMU's TSC rate is not known here, so the guest's clocks stay at this base under QEMU.
    let params = HostParams { instance_id: Default::default(), entropy, wall_clock_ns, tsc_khz: 0, flags };
    let mut frames = Vec::with_capacity(request.len() + 100);
    frames.extend_from_slice(&qemu::PARAMS_TAG);
    frames.extend_from_slice(&params.encode());
    frames.extend_from_slice(&qemu::REQUEST_TAG);
    frames.extend_from_slice(&(request.len() as u64).to_le_bytes());
    frames.extend_from_slice(request);
    frames.extend_from_slice(&qemu::END_TAG);
    Ok(frames)
}

/// Runs `thaw qemu` and returns the process exit code.
pub fn run(args: &QemuArgs) -> Result<u8, QemuError> {
    let kernel = crate::kernel::load(&args.kernel)?;
    let timeout = crate::kernel::timeout(&args.kernel)?;
    let (function, request) = match args.function.load(crate::kernel::timeout(&args.kernel)?)? {
        Some(f) => (Some(f.function), Some(f.request)),
        None => (None, None),
    };
    let memory = args.memory.unwrap_or(function.as_ref().map_or(128, |f| f.vm_memory_mib().max(128)));
    let dir = tempfile::tempdir().map_err(QemuError::TempDir)?;
    let write = |what: &'static str, bytes: &[u8]| {
        let path = dir.path().join(what);
        std::fs::write(&path, bytes).map(|()| path).map_err(|source| QemuError::Write { what, source })
    };
    // The guest's ramdisk is the bundle without its data volume, which QEMU serves as a disk.
    let ramdisk = match (&function, &args.ramdisk) {
        (Some(f), _) => Some(write("ramdisk", f.ramdisk())?),
        (None, Some(path)) => Some(write("ramdisk", &crate::kernel::load_ramdisk(path, &args.kernel)?)?),
        (None, None) => None,
    };
    let mut devices: Vec<String> = Vec::new();
    if let Some(f) = &function
        && let Some((offset, len)) = f.volume
    {
        let volume = write("volume", &f.bundle[offset as usize..(offset + len) as usize])?;
        devices.push("-drive".into());
        devices.push(format!("file={},if=none,id=volume,format=raw,readonly=on", volume.display()));
        devices.push("-device".into());
        devices.push("virtio-blk-pci,drive=volume,disable-legacy=on".into());
    }
    if args.devices.contains(&DeviceKind::Entropy) {
        devices.extend(["-device".into(), "virtio-rng-pci,disable-legacy=on".into()]);
    }
    if args.devices.contains(&DeviceKind::Console) || args.console.is_some() {
        let sink = args.console.clone().unwrap_or_else(|| dir.path().join("console"));
        devices.push("-chardev".into());
        devices.push(format!("file,id=console,path={},append=on", sink.display()));
        devices.extend(["-device".into(), "virtio-serial-pci,disable-legacy=on".into()]);
        devices.extend(["-device".into(), "virtconsole,chardev=console".into()]);
    }
    let flags = if args.console.is_some() { FLAG_CONSOLE_LOG } else { 0 };
    let kernel_path = match &kernel.path {
        Some(path) => path.clone(),
        None => write("thaw-guest", &kernel.bytes)?,
    };
    let image = dir.path().join("disk.img");
    build_disk_image(&kernel_path, ramdisk.as_deref(), &image)?;
    let mut child = Command::new(&args.qemu)
        // `max`: every x86 feature TCG emulates, SSSE3 and SSE4 among them, which code compiled for
        // the guest's Wasmtime needs (abi::engine::X86_FEATURES); QEMU's default CPU lacks them.
        .args(["-accel", "tcg", "-cpu", "max", "-m", &format!("{memory}M")])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", &format!("isa-debug-exit,iobase={:#x},iosize=0x04", abi::qemu::ISA_DEBUG_EXIT_PORT)])
        .arg("-drive")
        .arg(format!("format=raw,file={}", image.display()))
        .args(&devices)
        .stdin(if request.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| QemuError::Start { program: args.qemu.clone(), source })?;
    let mut pending = request.zip(child.stdin.take());
    let mut frame_error = None;
    let serving = function.is_some();
    let (mut kernel_log, mut log_cap) = (Vec::new(), host_vmm::output::OutputCap::default());
    let mut write_error = None;
    let mut responses = Vec::new();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let outcome = supervise(child, timeout, |line, reported| match classify(line) {
        Line::Output(text) if serving && !args.verbose => {
            let _ = log_cap.write(&mut kernel_log, format!("{text}\n").as_bytes(), "log");
        }
        Line::Output(text) if serving => {
            let _ = writeln!(err, "{text}");
        }
        Line::Output(text) => {
            if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
                write_error.get_or_insert(e);
            }
        }
        Line::Outcome(outcome) => *reported = reported.take().or(Some(outcome)),
        Line::Response(response) => responses.push(response),
        Line::InitOutput(stderr) => {
            let _ = err.write_all(&stderr);
        }
        Line::InitFailed(response) => {
            *reported = reported.take().or(Some(Outcome::InitFailed(response.status.clone())));
            responses.push(response);
        }
        Line::AwaitFrames => {
            // Built now, so the guest's clock starts from the time it is actually served.
            match pending.take().map(|(request, stdin)| (request_frames(&request, flags), stdin)) {
                Some((Ok(frames), mut stdin)) => {
                    // A thread, so a large request cannot block the loop draining QEMU's output.
                    std::thread::spawn(move || {
                        let _ = stdin.write_all(&frames);
                    });
                }
                Some((Err(e), _)) => frame_error = Some(e),
                None => {}
            }
        }
    })?;
    if let Some(e) = frame_error {
        return Err(e);
    }
    if let Some(e) = write_error {
        return Err(crate::write_failed("the guest's output to stdout", e).into());
    }
    drop((out, err));
    if serving {
        Ok(crate::invoke::conclude(&outcome, responses.first(), &kernel_log)?)
    } else {
        Ok(crate::finish(&outcome))
    }
}

/// Builds a BIOS-bootable disk image of `kernel` (and `ramdisk`) at `image`, with the
/// bootloader's own logging off so the serial line carries only what the kernel prints.
fn build_disk_image(kernel: &Path, ramdisk: Option<&Path>, image: &Path) -> Result<(), QemuError> {
    let mut config = bootloader::BootConfig::default();
    config.frame_buffer_logging = false;
    config.serial_logging = false;
    let mut boot = bootloader::BiosBoot::new(kernel);
    boot.set_boot_config(&config);
    if let Some(ramdisk) = ramdisk {
        boot.set_ramdisk(ramdisk);
    }
    boot.create_disk_image(image).map_err(|e| QemuError::DiskImage(format!("{e:#}")))
}

/// Streams QEMU's serial output line by line into `on_line`, enforces the timeout, and decides
/// the outcome: a reported one, else the `isa-debug-exit` code.
fn supervise(
    mut child: Child,
    timeout: Duration,
    mut on_line: impl FnMut(String, &mut Option<Outcome>),
) -> Result<Outcome, QemuError> {
    let stdout = child.stdout.take().ok_or(QemuError::NoStdout)?;
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if lines_tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut reported = None;
    let status = loop {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(20)) {
            on_line(line, &mut reported);
        }
        if let Some(status) = child.try_wait().map_err(QemuError::Wait)? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    let _ = reader.join();
    for line in lines.try_iter() {
        on_line(line, &mut reported);
    }
    let Some(status) = status else {
        return Ok(Outcome::TimedOut(timeout));
    };
    match (reported, status.code().and_then(guest_code_from_qemu_status)) {
        (Some(outcome), _) => Ok(outcome),
        (None, Some(code)) => Ok(Outcome::Exited(code)),
        (None, None) => Err(QemuError::NoExitCode(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lines_become_outcomes_and_responses() {
        let outcome = |line: &str| match classify(line.to_string()) {
            Line::Outcome(o) => Some(o),
            _ => None,
        };
        assert!(
            matches!(outcome("thaw-guest: panic: boom at a.rs:1:1"), Some(Outcome::Panicked(m)) if m == "boom at a.rs:1:1")
        );
        let report = FaultReport { vector: 6, rip: 0x20_0000, cs: 0x23, ..Default::default() };
        let mut text = String::from(FAULT_MARKER);
        report.write_text(&mut text).unwrap();
        assert!(matches!(outcome(&text), Some(Outcome::Faulted(r)) if r == report));
        assert!(matches!(outcome("thaw-guest: fault: garbage"), Some(Outcome::Failed { .. })));
        assert!(matches!(classify("thaw-guest: ready (cpl 3)".into()), Line::Output(_)));
        let Line::Response(r) = classify("thaw-guest: response: 1 0 6869 - 626f6f6d".into()) else {
            panic!("no response")
        };
        assert_eq!(
            (r.stdout.as_slice(), r.stderr.as_slice(), r.status),
            (&b"hi"[..], &b""[..], FunctionStatus::Trapped("boom".into()))
        );
        assert!(matches!(classify("thaw-guest: response: 0 0 zz - -".into()), Line::Outcome(Outcome::Failed { .. })));
    }
}
