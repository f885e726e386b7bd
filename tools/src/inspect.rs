//! `thaw inspect`: what a snapshot image holds, after validating all of it, or what a function
//! bundle's manifest says, after validating its framing and manifest.

use std::path::PathBuf;

use abi::image::{ImageInfo, record};
use clap::Args;
use kvm_bindings::kvm_regs;
use serde_json::json;
use zerocopy::FromBytes;

/// Arguments of `thaw inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The snapshot image, from `thaw snapshot`, or a function bundle, from `thaw pack`.
    #[arg(value_name = "FUNCTION.snap|FUNCTION.thaw")]
    image: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn record_name(kind: u32) -> &'static str {
    match kind {
        record::REGS => "regs",
        record::SREGS => "sregs",
        record::XSAVE => "xsave",
        record::XCRS => "xcrs",
        record::MSRS => "msrs",
        record::EVENTS => "events",
        record::MP_STATE => "mp_state",
        record::LAPIC => "lapic",
        _ => "unknown",
    }
}

/// Why a file could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Its size could not be read.
    #[error("{}: {source}", path.display())]
    Metadata {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle is not valid.
    #[error("{}: {source}", path.display())]
    Bundle {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: abi::bundle::BundleError,
    },
    /// The file is neither kind.
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// The image is not valid.
    #[error(transparent)]
    Image(#[from] host_vmm::snapshot::SnapshotError),
    /// A file.
    #[error(transparent)]
    File(#[from] crate::files::FilesError),
    /// The JSON.
    #[error(transparent)]
    Stats(#[from] crate::stats::StatsError),
    /// The report could not be written.
    #[error(transparent)]
    Output(#[from] crate::OutputError),
}

/// Runs `thaw inspect` and returns the process exit code.
pub fn run(args: &InspectArgs) -> Result<u8, InspectError> {
    if crate::invoke::file_magic(&args.image)? == abi::bundle::MAGIC {
        return inspect_bundle(args);
    }
    let image = host_vmm::Image::open(&args.image)?;
    let stored = image.stored_bytes()?;
    let info: &ImageInfo = &image.info;
    let file_len = std::fs::metadata(&args.image)
        .map_err(|source| InspectError::Metadata { path: args.image.clone(), source })?
        .len();
    let guest = info.guest_memory_size();
    let rip = info
        .vcpu
        .iter()
        .find(|r| r.kind == record::REGS)
        .and_then(|r| kvm_regs::read_from_bytes(&r.bytes).ok())
        .map_or(0, |regs| regs.rip);
    let page = abi::image::PAGE_SIZE;
    let handles = image.io_table()?;
    let kind_name = |kind: u16| abi::devices::DeviceKind::from_id(kind).map_or("unknown", |k| k.name());
    if args.json {
        let devices: Vec<_> = image
            .devices
            .iter()
            .map(|d| {
                json!({
                    "kind": kind_name(d.kind),
                    "index": d.index,
                    "status": d.status,
                    "driver_features": d.driver_features,
                    "ready_queues": d.queues.iter().filter(|q| q.ready).count(),
                })
            })
            .collect();
        let handles: Vec<_> = handles
            .iter()
            .map(|h| {
                json!({
                    "fd": h.fd,
                    "kind": h.kind.name(),
                    "state": h.state.name(),
                    "offset": h.offset,
                    "port": h.port,
                    "path": h.path,
                })
            })
            .collect();
        let sections: Vec<_> = info
            .sections
            .iter()
            .map(|(kind, offset, len)| json!({ "kind": kind.name(), "offset": offset, "length": len }))
            .collect();
        let ranges: Vec<_> = info
            .memory
            .iter()
            .map(|r| json!({ "gpa": r.gpa, "length": r.len, "file_offset": r.file_offset }))
            .collect();
        let records: Vec<&str> = info.vcpu.iter().map(|r| record_name(r.kind)).collect();
        let runs: Vec<_> = info
            .working_set
            .iter()
            .map(|r| json!({ "start": r.start, "pages": r.pages, "written": r.written }))
            .collect();
        let shown = json!({
            "path": args.image.display().to_string(),
            "format_version": info.version,
            "architecture": "x86-64",
            "file_bytes": file_len,
            "checksum": format!("{:#010x}", info.checksum),
            "checksum_ok": true,
            "sections": sections,
            "function": {
                "name": info.guest.function_name,
                "wasm_sha256": hex::encode(info.guest.wasm_sha256),
                "runtime_version": info.guest.runtime_version,
            },
            "io_table": { "gpa": info.guest.io_table_gpa, "length": info.guest.io_table_len, "handles": handles },
            "devices": devices,
            "memory": { "guest_bytes": guest, "pages": guest / page, "nonzero_pages": stored / page, "ranges": ranges },
            "vcpu": { "rip": rip, "records": records },
            "working_set": {
                "pages": abi::workingset::page_count(&info.working_set),
                "written_pages": written_pages(&info.working_set),
                "runs": runs,
            },
        });
        crate::stats::print_json(&shown)?;
        return Ok(0);
    }
    outln!("{}: thaw snapshot image, format version {}, x86-64", args.image.display(), info.version)?;
    outln!("  file        {file_len} bytes, {} KiB stored (the rest are holes)", (info.metadata_len + stored) / 1024)?;
    outln!("  checksum    {:#010x}, ok; every section and memory range validated", info.checksum)?;
    outln!("  function    {} (wasm sha256 {})", info.guest.function_name, hex::encode(info.guest.wasm_sha256))?;
    outln!("  runtime     {}", info.guest.runtime_version)?;
    match info.guest.io_table_len {
        0 => outln!("  io table    none")?,
        len => outln!(
            "  io table    {len} bytes at guest address {:#x}, {} handle(s)",
            info.guest.io_table_gpa,
            handles.len()
        )?,
    }
    for h in &handles {
        let target = match h.kind {
            abi::iotable::HandleKind::ConsoleStream => "the console".to_string(),
            abi::iotable::HandleKind::DataFile => format!("/data/{} at offset {}", h.path, h.offset),
            abi::iotable::HandleKind::VsockStream => format!("host port {}", h.port),
        };
        outln!("              fd {:<3} {:<15} {:<18} {target}", h.fd, h.kind.name(), h.state.name())?;
    }
    if let Some((offset, len)) = info.volume {
        outln!("  volume      {len} bytes at file offset {offset:#x} (the data volume, read by the block device)")?;
    }
    if image.devices.is_empty() {
        outln!("  devices     none")?;
    }
    for (i, d) in image.devices.iter().enumerate() {
        outln!(
            "  {:<11} {} {}: status {:#x}, features {:#x}, {} of {} queues ready",
            if i == 0 { "devices" } else { "" },
            kind_name(d.kind),
            d.index,
            d.status,
            d.driver_features,
            d.queues.iter().filter(|q| q.ready).count(),
            d.queues.len()
        )?;
    }
    outln!(
        "  memory      {} MiB of guest memory: {} pages, {} non-zero ({} KiB)",
        guest >> 20,
        guest / page,
        stored / page,
        stored / 1024
    )?;
    for r in &info.memory {
        outln!("              guest {:#x}+{:#x} at file offset {:#x}", r.gpa, r.len, r.file_offset)?;
    }
    match abi::workingset::page_count(&info.working_set) {
        0 => outln!("  working set none recorded (VMs restored ahead touch nothing before their request)")?,
        pages => {
            outln!(
                "  working set {pages} pages ({} written) in {} runs, touched by VMs restored ahead before their request",
                written_pages(&info.working_set),
                info.working_set.len()
            )?;
            const SHOWN: usize = 8;
            for r in info.working_set.iter().take(SHOWN) {
                let how = if r.written { "written" } else { "read" };
                outln!("              {:#x}+{} pages, {how}", r.start, r.pages)?;
            }
            if info.working_set.len() > SHOWN {
                outln!("              … {} more runs (--json lists them all)", info.working_set.len() - SHOWN)?;
            }
        }
    }
    let names: Vec<&str> = info.vcpu.iter().map(|r| record_name(r.kind)).collect();
    outln!("  vcpu        rip {rip:#x}; records: {}", names.join(", "))?;
    outln!("  sections")?;
    for (kind, offset, len) in &info.sections {
        outln!("    {:<16} offset {offset:>8}  length {len:>8}", kind.name())?;
    }
    Ok(0)
}

/// Pages of `runs` that the sample request wrote.
fn written_pages(runs: &[abi::workingset::Run]) -> u64 {
    runs.iter().filter(|r| r.written).map(|r| u64::from(r.pages)).sum()
}

/// Shows what a function bundle's manifest says, with its filesystem settings and the
/// directories the guest preopens, and whether its code is this thaw's. The framing, CRC and
/// manifest are validated; the SHA-256s and the module are checked when the bundle is run.
fn inspect_bundle(args: &InspectArgs) -> Result<u8, InspectError> {
    let path = &args.image;
    let bytes =
        crate::files::read_limited(path, crate::invoke::MAX_BUNDLE_FILE, "function bundle", crate::files::READ_WITHIN)?;
    let parsed = abi::bundle::parse(&bytes).map_err(|source| InspectError::Bundle { path: path.clone(), source })?;
    let version = bytes.get(8..12).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
    let m = &parsed.manifest;
    // Whether the code is what this thaw makes from the wasm (the bundle rule, `code.rs`); when
    // the cache does not know, it is settled when the bundle runs.
    let own = crate::code::is_own(&parsed, &crate::code::CodeCache::user()).ok().flatten();
    let preopens: Vec<_> = m.preopens().into_iter().zip(3..).map(|(dir, fd)| (fd, dir)).collect();
    if args.json {
        let connections: Vec<_> = m.connections.iter().map(|c| json!({ "name": c.name, "port": c.port })).collect();
        let preopens: Vec<_> = preopens.iter().map(|(fd, dir)| json!({ "fd": fd, "path": dir })).collect();
        let shown = json!({
            "path": path.display().to_string(),
            "format_version": version,
            "file_bytes": bytes.len(),
            "function": { "name": m.name, "wasm_bytes": parsed.wasm.len(), "wasm_sha256": hex::encode(m.wasm_sha256) },
            "code": { "bytes": parsed.code.len(), "sha256": m.code_sha256.as_ref().map(hex::encode), "own": own },
            "memory_mib": m.memory_mib,
            "fuel": m.fuel,
            "init_until_read": m.init_until_read,
            "args": m.args,
            "env": m.env,
            "connections": connections,
            "sample_request_bytes": m.sample_request.as_ref().map(Vec::len),
            "volume": {
                "bytes": parsed.volume_len,
                "present": parsed.volume.is_some(),
                "sha256": m.volume_sha256.as_ref().map(hex::encode),
            },
            "scratch_mib": m.scratch_mib,
            "scratch_dirs": m.scratch_dirs,
            "data_mount": m.data_mount,
            "preopens": preopens,
        });
        crate::stats::print_json(&shown)?;
        return Ok(0);
    }
    let defaults = if version < abi::bundle::FORMAT_VERSION_WITH_FILESYSTEM {
        format!(" (the defaults: format version {version} carries none)")
    } else {
        String::new()
    };
    outln!("{}: thaw function bundle, format version {version}", path.display())?;
    outln!("  file        {} bytes; framing, checksum and manifest validated", bytes.len())?;
    outln!("  function    {} ({} bytes of wasm, sha256 {})", m.name, parsed.wasm.len(), hex::encode(m.wasm_sha256))?;
    match &m.code_sha256 {
        Some(sha) => {
            let own = match own {
                Some(true) => "compiled by this thaw from the wasm",
                Some(false) => "not what this thaw compiles from the wasm, so it never runs: thaw runs its own",
                None => "thaw runs it only if it is what thaw compiles from the wasm, and its own otherwise",
            };
            outln!("  code        {} bytes (sha256 {}); {own}", parsed.code.len(), hex::encode(sha))?
        }
        None => outln!("  code        none: thaw compiles the wasm when it runs")?,
    }
    let fuel = m.fuel.map_or("no limit".to_string(), |f| format!("{f} per invocation"));
    outln!("  memory      {} MiB of linear memory; fuel {fuel}", m.memory_mib)?;
    if m.init_until_read {
        outln!("  init        a command's start-up, up to its first read of stdin (--init-until-read)")?;
    }
    outln!("  args        {:?}", m.args)?;
    outln!("  env         {:?}", m.env)?;
    for (i, c) in m.connections.iter().enumerate() {
        outln!("  {:<11} {} on vsock port {}", if i == 0 { "connections" } else { "" }, c.name, c.port)?;
    }
    match &m.sample_request {
        Some(sample) => outln!("  sample      {} bytes", sample.len())?,
        None => outln!("  sample      none")?,
    }
    match m.scratch_dirs.as_slice() {
        [] => outln!("  scratch     none preopened; in-memory files up to {} MiB{defaults}", m.scratch_mib)?,
        dirs => outln!("  scratch     {} with in-memory files up to {} MiB{defaults}", dirs.join(", "), m.scratch_mib)?,
    }
    match (&m.volume_sha256, parsed.volume) {
        (None, _) => outln!("  data mount  {}{defaults}; no data volume", m.data_mount)?,
        (Some(sha), volume) => outln!(
            "  data mount  {}{defaults}: a {}-byte volume{} (sha256 {})",
            m.data_mount,
            parsed.volume_len,
            if volume.is_some() { "" } else { ", left out of this file" },
            hex::encode(sha)
        )?,
    }
    match preopens.as_slice() {
        [] => outln!("  preopens    none")?,
        dirs => {
            let dirs: Vec<String> = dirs.iter().map(|(fd, dir)| format!("fd {fd} {dir}")).collect();
            outln!("  preopens    {}", dirs.join(", "))?
        }
    }
    Ok(0)
}
