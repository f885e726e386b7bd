//! Taking a function's snapshot: cold-boot it, run its init, stop it at its checkpoint, write
//! the image, and record its working set into it.
//!
//! The working set ([`crate::recording`]) needs a VM restored from the image, so the image is
//! written twice: once without it to a temporary file beside the output (restored from, then
//! removed), and once with it to the output. Both writes are atomic renames, so a reader never
//! sees half an image, and a failed recording leaves no image behind.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::image::GuestMetadata;
use abi::workingset::Run;

use crate::function::Function;
use crate::kernel::KernelImage;
use crate::mailbox::Mailbox;
use crate::outcome::Outcome;
use crate::recording::{self, Recording};
use crate::snapshot::{Image, SnapshotError, WriteStats};
use crate::virtio::{Backends, ConsoleSink};
use crate::vm::{BootTimings, CheckpointMode, Vm, VmConfig, VmmError};

/// How a snapshot went.
#[derive(Debug)]
pub struct Captured {
    /// What the image holds.
    pub stats: WriteStats,
    /// From VM creation to the checkpoint.
    pub boot_and_init: Duration,
    /// The recorded working set, unless it was skipped.
    pub working_set: Option<Recording>,
    /// What the function's init wrote to stderr.
    pub init_stderr: Vec<u8>,
}

/// The first lines of what a function wrote, as one line for an error: at most three non-empty
/// lines, trimmed and joined with " | ", control characters shown as `?` (the guest wrote them:
/// no terminal escapes reach an operator's screen), cut at 300 characters. That is a JavaScript
/// error's message and innermost frames, or a Rust panic's place and message.
pub fn first_lines(stderr: &[u8]) -> String {
    const MOST: usize = 300;
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).take(3).collect();
    let joined: String = lines.join(" | ").chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    match joined.char_indices().nth(MOST) {
        Some((cut, _)) => format!("{}...", &joined[..cut]),
        None => joined,
    }
}

/// Cold-boots `function` on `kernel` with the devices (and device settings) of `devices`, runs
/// it to its checkpoint within `timeout`, and writes its image to `output`. With a `sample`
/// request, records the pages that request touches into the image first. The guest's own log is
/// kept and written to `log` only when the function ends before its checkpoint.
pub fn snapshot_function(
    kernel: &KernelImage,
    function: &Function,
    output: &Path,
    timeout: Duration,
    devices: VmConfig,
    sample: Option<Vec<u8>>,
    log: &mut dyn Write,
) -> Result<Captured, VmmError> {
    let config = function.boot_config(devices, timeout, Vec::new());
    let started = Instant::now();
    let mut timings = BootTimings::default();
    let mut vm = Vm::boot(kernel, &config, &mut timings)?;
    let mut guest_log = Vec::new();
    let mut mailbox = Mailbox::default();
    let (outcome, _) = vm.run(&mut guest_log, &mut mailbox, timeout, CheckpointMode::Capture, &mut timings)?;
    let init_stderr = mailbox.init_stderr;
    if !matches!(outcome, Outcome::Checkpointed) {
        // A failed init's stderr came with its failure.
        let stderr = mailbox.responses.pop().map(|r| r.stderr).unwrap_or_default();
        let _ = log.write_all(&guest_log).and_then(|()| log.write_all(&stderr));
        return Err(VmmError::NoCheckpoint { outcome, said: first_lines(&stderr) });
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
    let Some(sample) = sample else {
        let stats = vm.snapshot(output, guest, volume, Vec::new())?;
        return Ok(Captured { stats, boot_and_init, working_set: None, init_stderr });
    };
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let draft = crate::files::Draft::new_in(dir, ".thaw-draft-", ".snap")
        .map_err(|source| SnapshotError::Io { path: dir.to_path_buf(), source })?;
    // What goes wrong with the draft is reported under the output's name.
    let renamed = |e: VmmError| match e {
        VmmError::Snapshot(e) => VmmError::Snapshot(e.renamed(draft.path(), output)),
        e => e,
    };
    vm.snapshot(draft.path(), guest.clone(), volume, Vec::new()).map_err(renamed)?;
    let image = Arc::new(Image::open(draft.path()).map_err(|e| renamed(e.into()))?);
    // The sample must leave no trace outside its VM: its console output is kept in memory and
    // dropped, and it reaches no host service (its data volume is the image's own).
    let isolated =
        Backends { console: ConsoleSink::Buffer(Default::default()), volume: None, services: Default::default() };
    let sample_config = VmConfig { backends: isolated, ..config };
    let recording = recording::record(&image, &sample_config, sample, &mut std::io::sink()).map_err(renamed)?;
    let runs: Vec<Run> = recording.runs.clone();
    let stats = vm.snapshot(output, guest, volume, runs)?;
    drop((image, draft));
    Ok(Captured { stats, boot_and_init, working_set: Some(recording), init_stderr })
}

#[cfg(test)]
mod tests {
    use super::first_lines;

    #[test]
    fn a_failed_inits_stderr_becomes_one_safe_line() {
        assert_eq!(first_lines(b""), "");
        assert_eq!(
            first_lines(b"SyntaxError: unexpected token\n    at /app/index.js:2:12\n\n"),
            "SyntaxError: unexpected token | at /app/index.js:2:12"
        );
        assert_eq!(first_lines(b"a\nb\nc\nd\n"), "a | b | c");
        assert_eq!(first_lines(b"\x1b[2Jcleared\r\x07"), "?[2Jcleared??");
        let long = first_lines(&[b'x'; 400]);
        assert_eq!((long.len(), long.ends_with("...")), (303, true));
        assert_eq!(first_lines(&[0xff, b'!']), "\u{fffd}!");
    }
}
