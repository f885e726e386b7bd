//! `thaw qemu`: boot a kernel under QEMU (TCG) from a BIOS disk image made with the
//! `bootloader` crate, and report its end exactly as `thaw run` would.
//!
//! The guest has no hypercalls here: it prints on COM1 (QEMU's stdout), exits through
//! `isa-debug-exit`, and reports a panic or fault as one marker line (`abi::qemu`). Marker lines
//! are turned back into the outcome instead of being printed, so stdout and the reason line match
//! `thaw run` for the same kernel.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use abi::fault::FaultReport;
use abi::qemu::{FAULT_MARKER, PANIC_MARKER, guest_code_from_qemu_status};
use clap::Args;
use host_vmm::{GuestError, Outcome};

use crate::KernelArgs;

/// Arguments of `thaw qemu`.
#[derive(Args, Debug)]
pub struct QemuArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,
    /// The QEMU binary to run.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: String,
}

/// What the guest reported on a marker line.
fn marker_outcome(line: &str) -> Option<Outcome> {
    if let Some(message) = line.strip_prefix(PANIC_MARKER) {
        return Some(Outcome::Panicked(message.to_string()));
    }
    let text = line.strip_prefix(FAULT_MARKER)?;
    Some(match FaultReport::parse_text(text) {
        Some(report) => Outcome::Faulted(report),
        None => Outcome::Failed {
            error: GuestError::UnexpectedExit(format!("unreadable fault report {text:?}")),
            rip: None,
        },
    })
}

/// Runs `thaw qemu` and returns the process exit code.
pub fn run(args: &QemuArgs) -> Result<u8, String> {
    let kernel = crate::kernel::load(&args.kernel)?;
    let timeout = crate::kernel::timeout(&args.kernel)?;
    let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;
    let kernel_path = match &kernel.path {
        Some(path) => path.clone(),
        None => {
            let path = dir.path().join("thaw-guest");
            std::fs::write(&path, &kernel.bytes).map_err(|e| format!("writing the built-in kernel: {e}"))?;
            path
        }
    };
    let image = dir.path().join("disk.img");
    build_disk_image(&kernel_path, &image)?;
    let child = Command::new(&args.qemu)
        .args(["-accel", "tcg", "-m", &format!("{}M", args.memory)])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", &format!("isa-debug-exit,iobase={:#x},iosize=0x04", abi::qemu::ISA_DEBUG_EXIT_PORT)])
        .arg("-drive")
        .arg(format!("format=raw,file={}", image.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e} (install QEMU: apt-get install qemu-system-x86)", args.qemu))?;
    let outcome = supervise(child, timeout)?;
    Ok(crate::finish(&outcome))
}

/// Builds a BIOS-bootable disk image of `kernel` at `image`, with the bootloader's own logging
/// off so the serial line carries only what the kernel prints.
fn build_disk_image(kernel: &Path, image: &Path) -> Result<(), String> {
    let mut config = bootloader::BootConfig::default();
    config.frame_buffer_logging = false;
    config.serial_logging = false;
    bootloader::BiosBoot::new(kernel)
        .set_boot_config(&config)
        .create_disk_image(image)
        .map_err(|e| format!("building the BIOS disk image: {e:#}"))
}

/// Streams QEMU's serial output, enforces the timeout, and decides the outcome.
fn supervise(mut child: Child, timeout: Duration) -> Result<Outcome, String> {
    let stdout = child.stdout.take().ok_or("QEMU's stdout was not captured")?;
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
    let mut out = std::io::stdout().lock();
    let mut forward = |line: String, reported: &mut Option<Outcome>| match marker_outcome(&line) {
        Some(outcome) => *reported = reported.take().or(Some(outcome)),
        None => {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let status = loop {
        match lines.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => forward(line, &mut reported),
            Err(mpsc::RecvTimeoutError::Disconnected) | Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for QEMU: {e}"))? {
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
        forward(line, &mut reported);
    }
    let Some(status) = status else {
        return Ok(Outcome::TimedOut(timeout));
    };
    match (reported, status.code().and_then(guest_code_from_qemu_status)) {
        (Some(outcome), _) => Ok(outcome),
        (None, Some(code)) => Ok(Outcome::Exited(code)),
        (None, None) => Err(format!("QEMU ended ({status}) without the guest exiting through isa-debug-exit")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lines_become_outcomes() {
        assert!(
            matches!(marker_outcome("thaw-guest: panic: boom at a.rs:1:1"), Some(Outcome::Panicked(m)) if m == "boom at a.rs:1:1")
        );
        let report = FaultReport { vector: 6, rip: 0x20_0000, cs: 0x23, ..Default::default() };
        let mut text = String::from(FAULT_MARKER);
        report.write_text(&mut text).unwrap();
        assert!(matches!(marker_outcome(&text), Some(Outcome::Faulted(r)) if r == report));
        assert!(matches!(marker_outcome("thaw-guest: fault: garbage"), Some(Outcome::Failed { .. })));
        assert!(marker_outcome("thaw-guest: ready (cpl 3)").is_none());
    }
}
