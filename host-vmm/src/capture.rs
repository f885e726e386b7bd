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
        let _ = log.write_all(&guest_log);
        return Err(VmmError::NoCheckpoint(outcome));
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
