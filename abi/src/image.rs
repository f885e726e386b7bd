//! The snapshot image (`.snap`), format version 3: a checkpointed VM that any node can map and
//! restore, with the function's data volume if it has one, and the working set a sample request
//! touched. Version 2 images (no working set) are still read.
//!
//! ```text
//!   offset  size  field
//!   0       8     magic "THAWSNAP"
//!   8       4     format version (FORMAT_VERSION; independent of the crate version)
//!   12      4     architecture (ELF machine number: 62 = x86-64)
//!   16      4     flags (none defined yet; must be 0)
//!   20      4     header length (128)
//!   24      8     total length: the file's exact length
//!   32      4     section count (1..=MAX_SECTIONS)
//!   36      4     reserved, zero
//!   40      8     metadata length: header + section table + every section except memory data
//!   48      4     CRC-32 (IEEE) of the metadata, computed with this field zero
//!   52      76    reserved, zero
//!   128     32*n  section table: kind u32, reserved u32, offset u64, length u64, reserved u64
//!   ...           sections, 8-byte aligned, in table order, none overlapping
//!   ...           memory data, page-aligned, after all metadata; zero pages are holes
//!   ...           the data volume, if any: page-aligned, after the memory data
//! ```
//!
//! Nothing in an image is a host pointer: sections are located by file offsets and memory by
//! guest-physical addresses, so an image can be mapped anywhere. The metadata is covered by the
//! CRC; the memory data is not (it is mapped, not read), but every memory-map entry is checked to
//! lie inside the file, so mapping it cannot fault past the end.
//!
//! Sections ([`SectionKind`]):
//! - vCPU state: TLV records ([`VcpuRecord`]) holding KVM's register structures as bytes;
//! - VM state: TLV records for VM-wide state ([`vm_record`]): the virtio devices' transport state;
//! - guest metadata ([`GuestMetadata`]), including the interface version the guest speaks;
//! - memory map: [`MemoryRange`] entries;
//! - working set: the pages a sample request touched after a restore ([`crate::workingset`]
//!   runs; empty when none was recorded, and always empty in version 2);
//! - volume (optional): where the data volume (`crate::volume`) lies in the file, which the
//!   restored VM's block device reads lazily.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::codec::{crc32, magic, put_string, u32_at, u64_at};
use crate::workingset::{self, Run};
use alloc::string::ToString;

/// The image magic.
pub const MAGIC: [u8; 8] = magic::IMAGE;
/// The image format version this code writes.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this code reads: version 2 differs only in having no working set.
pub const OLDEST_FORMAT_VERSION: u32 = 2;
/// Architecture field for x86-64 (its ELF machine number).
pub const ARCH_X86_64: u32 = 62;
/// Header size.
pub const HEADER_LEN: usize = 128;
/// Size of one section-table entry.
pub const SECTION_ENTRY_LEN: usize = 32;
/// Most sections an image may have.
pub const MAX_SECTIONS: usize = 16;
/// Most bytes of metadata (everything but memory data).
pub const MAX_METADATA_BYTES: u64 = 16 << 20;
/// Size of one memory-map entry.
pub const MEMORY_RANGE_LEN: usize = 24;
/// Page size: memory data and guest ranges are aligned to it.
pub const PAGE_SIZE: u64 = 4096;
/// Most guest memory an image may describe.
pub const MAX_GUEST_MEMORY: u64 = 64 << 30;

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum SectionKind {
    /// vCPU 0's state: [`VcpuRecord`]s.
    VcpuState = 1,
    /// VM-wide state: records in the same TLV framing (may be empty).
    VmState = 2,
    /// [`GuestMetadata`].
    GuestMetadata = 3,
    /// [`MemoryRange`] entries.
    MemoryMap = 4,
    /// The recorded working set: [`crate::workingset`] runs (empty in version 2).
    WorkingSet = 5,
    /// The data volume's place in the file: file offset u64, length u64 (optional).
    Volume = 6,
}

impl SectionKind {
    /// Every kind, in the order a writer lays them out.
    pub const ALL: [SectionKind; 6] =
        [Self::VcpuState, Self::VmState, Self::GuestMetadata, Self::MemoryMap, Self::WorkingSet, Self::Volume];

    fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == value)
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::VcpuState => "vcpu-state",
            Self::VmState => "vm-state",
            Self::GuestMetadata => "guest-metadata",
            Self::MemoryMap => "memory-map",
            Self::WorkingSet => "working-set",
            Self::Volume => "volume",
        }
    }
}

/// One stretch of guest memory stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// Guest-physical start, page-aligned.
    pub gpa: u64,
    /// Length in bytes, a non-zero multiple of the page size.
    pub len: u64,
    /// Where the bytes start in the file, page-aligned.
    pub file_offset: u64,
}

/// What the guest recorded about itself at checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMetadata {
    /// The guest/VMM interface version the checkpointed guest speaks
    /// ([`INTERFACE_VERSION`](crate::INTERFACE_VERSION) when it was taken).
    pub interface_version: u32,
    /// The function's name.
    pub function_name: String,
    /// SHA-256 of the function's wasm.
    pub wasm_sha256: [u8; 32],
    /// Guest-physical address of the I/O reconnection table (0 when there is none).
    pub io_table_gpa: u64,
    /// Its length in bytes.
    pub io_table_len: u64,
    /// The guest runtime's version string.
    pub runtime_version: String,
}

/// Record kinds of the vCPU-state section. Each record's bytes are the named KVM structure as
/// the kernel's ABI lays it out; the host checks each length against that structure.
pub mod record {
    /// `struct kvm_regs`.
    pub const REGS: u32 = 1;
    /// `struct kvm_sregs`.
    pub const SREGS: u32 = 2;
    /// `struct kvm_xsave` (the legacy 4 KiB area).
    pub const XSAVE: u32 = 3;
    /// `struct kvm_xcrs`.
    pub const XCRS: u32 = 4;
    /// MSRs: a sequence of (index u32, reserved u32, value u64).
    pub const MSRS: u32 = 5;
    /// `struct kvm_vcpu_events`.
    pub const EVENTS: u32 = 6;
    /// `struct kvm_mp_state`.
    pub const MP_STATE: u32 = 7;
    /// `struct kvm_lapic_state`, when the VM has a local APIC.
    pub const LAPIC: u32 = 8;
}

/// Record kinds of the VM-state section.
pub mod vm_record {
    /// Every virtio device's transport state:
    /// [`DeviceState::encode_all`](crate::devices::DeviceState::encode_all). Absent when the VM
    /// has no devices.
    pub const DEVICES: u32 = 1;
}

/// One TLV record of a state section: kind u32, length u32, bytes padded to 8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuRecord {
    /// One of [`record`].
    pub kind: u32,
    /// The structure's bytes.
    pub bytes: Vec<u8>,
}

/// What is wrong with an image. Every variant names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The file is shorter than a header.
    #[error("image is {0} bytes, shorter than its {HEADER_LEN}-byte header (truncated?)")]
    TooShort(u64),
    /// Not a snapshot image.
    #[error(fmt = fmt_bad_magic)]
    BadMagic([u8; 8]),
    /// A format version this code does not read.
    #[error(
        "image format version {0} is not supported (this thaw reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// An image for another architecture.
    #[error("image architecture {0} is not x86-64 ({ARCH_X86_64}): it was taken on another kind of machine")]
    WrongArchitecture(u32),
    /// A header field with an impossible value.
    #[error("image header: {field} is {value}, expected {expected}")]
    Header {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What it must be.
        expected: &'static str,
    },
    /// The file's length differs from the header's.
    #[error("image file is {actual} bytes but its header declares {declared} (truncated or padded)")]
    LengthMismatch {
        /// Bytes present.
        actual: u64,
        /// Bytes declared.
        declared: u64,
    },
    /// The metadata checksum does not match.
    #[error("image metadata checksum {stored:#010x} does not match the computed {computed:#010x} (corrupted)")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// A section-table entry is unusable.
    #[error("image section {index}: {reason}")]
    Section {
        /// Index in the table.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A required section is missing.
    #[error("image has no {0} section")]
    MissingSection(&'static str),
    /// A section's contents are malformed.
    #[error("image {section} section: {reason}")]
    Content {
        /// The section.
        section: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// [`ImageError::BadMagic`]'s message, which names a function bundle given in an image's place.
fn fmt_bad_magic(m: &[u8; 8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if *m == magic::BUNDLE {
        f.write_str(
            "this is a function bundle (from `thaw pack`), not a snapshot image: make one with `thaw snapshot BUNDLE -o IMAGE.snap`",
        )
    } else {
        write!(f, "image magic {m:02x?} is not \"THAWSNAP\": not a thaw snapshot")
    }
}

/// A validated image's metadata, borrowing nothing: what a restore needs besides the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's format version.
    pub version: u32,
    /// vCPU 0's state records.
    pub vcpu: Vec<VcpuRecord>,
    /// VM-wide state records.
    pub vm: Vec<VcpuRecord>,
    /// The guest's own account of itself.
    pub guest: GuestMetadata,
    /// Where guest memory lives in the file, sorted by guest address.
    pub memory: Vec<MemoryRange>,
    /// Bytes of metadata at the start of the file (memory data starts at or after this).
    pub metadata_len: u64,
    /// The section table: (kind, file offset, length), in table order.
    pub sections: Vec<(SectionKind, u64, u64)>,
    /// The metadata CRC-32, verified.
    pub checksum: u32,
    /// Where the data volume is in the file (offset, length), if the image has one.
    pub volume: Option<(u64, u64)>,
    /// The pages a sample request touched after a restore (empty when none was recorded).
    pub working_set: Vec<Run>,
}

impl ImageInfo {
    /// Guest memory the image describes: the end of its highest range.
    pub fn guest_memory_size(&self) -> u64 {
        self.memory.iter().map(|r| r.gpa + r.len).max().unwrap_or(0)
    }
}

fn encode_records(records: &[VcpuRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&r.kind.to_le_bytes());
        out.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.bytes);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

fn decode_records(bytes: &[u8], section: &'static str) -> Result<Vec<VcpuRecord>, ImageError> {
    let bad = |reason: String| ImageError::Content { section, reason };
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if bytes.len() - at < 8 {
            return Err(bad(alloc::format!("record header at offset {at} runs past the end")));
        }
        let (kind, len) = (u32_at(bytes, at), u32_at(bytes, at + 4) as usize);
        let end = at + 8 + len;
        if end > bytes.len() {
            return Err(bad(alloc::format!("record {kind} at offset {at} claims {len} bytes, past the end")));
        }
        if records.iter().any(|r: &VcpuRecord| r.kind == kind) {
            return Err(bad(alloc::format!("record {kind} appears twice")));
        }
        records.push(VcpuRecord { kind, bytes: bytes[at + 8..end].to_vec() });
        at = end.next_multiple_of(8);
    }
    Ok(records)
}

impl GuestMetadata {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.interface_version.to_le_bytes());
        put_string(&mut out, &self.function_name);
        out.extend_from_slice(&self.wasm_sha256);
        out.extend_from_slice(&self.io_table_gpa.to_le_bytes());
        out.extend_from_slice(&self.io_table_len.to_le_bytes());
        put_string(&mut out, &self.runtime_version);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, ImageError> {
        let mut cursor = Cursor { bytes, at: 0 };
        let interface_version = u32_at(cursor.take(4, "interface version")?, 0);
        let function_name = cursor.string("function name")?;
        let mut wasm_sha256 = [0; 32];
        wasm_sha256.copy_from_slice(cursor.take(32, "wasm sha256")?);
        let io_table_gpa = u64_at(cursor.take(8, "io table address")?, 0);
        let io_table_len = u64_at(cursor.take(8, "io table length")?, 0);
        let runtime_version = cursor.string("runtime version")?;
        if cursor.at != bytes.len() {
            return Err(bad_metadata("unexpected bytes after the last field".into()));
        }
        if io_table_gpa.checked_add(io_table_len).is_none_or(|end| end > MAX_GUEST_MEMORY) {
            return Err(bad_metadata("io table range overflows guest memory".into()));
        }
        Ok(Self { interface_version, function_name, wasm_sha256, io_table_gpa, io_table_len, runtime_version })
    }
}

/// The error for guest metadata that is wrong in the way `reason` says.
fn bad_metadata(reason: String) -> ImageError {
    ImageError::Content { section: "guest-metadata", reason }
}

/// Reads the guest metadata's fields in order, never past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ImageError> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| bad_metadata(alloc::format!("{what} runs past the end")))?;
        self.at += n;
        Ok(slice)
    }

    fn string(&mut self, what: &str) -> Result<String, ImageError> {
        let len = self.take(2, what)?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        let bytes = self.take(len, what)?;
        core::str::from_utf8(bytes).map(String::from).map_err(|_| bad_metadata(alloc::format!("{what} is not UTF-8")))
    }
}

/// The metadata part of an image, with memory-map file offsets relative to the first byte after
/// the metadata (the writer fixes them up when it knows where memory data starts).
pub struct ImageWriter {
    /// vCPU state records.
    pub vcpu: Vec<VcpuRecord>,
    /// VM state records.
    pub vm: Vec<VcpuRecord>,
    /// Guest metadata.
    pub guest: GuestMetadata,
    /// Guest ranges to store, with `file_offset` relative to the start of the memory data.
    pub memory: Vec<MemoryRange>,
    /// The data volume's length (0 for none); its bytes follow the memory data.
    pub volume_len: u64,
    /// The recorded working set (empty for none).
    pub working_set: Vec<Run>,
}

/// Where [`ImageWriter::encode`] put things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Where memory data starts (page-aligned).
    pub data_start: u64,
    /// Where the data volume starts (page-aligned; the file's end when there is none).
    pub volume_start: u64,
    /// The file's total length.
    pub file_len: u64,
}

impl ImageWriter {
    /// Encodes the metadata. Returns the metadata bytes and the [`Layout`]: where the memory
    /// data (`memory_data_len` bytes) and the volume must be written; the memory map and the
    /// volume section inside already point there.
    pub fn encode(&self, memory_data_len: u64) -> (Vec<u8>, Layout) {
        let mut sections: Vec<(SectionKind, Vec<u8>)> = alloc::vec![
            (SectionKind::VcpuState, encode_records(&self.vcpu)),
            (SectionKind::VmState, encode_records(&self.vm)),
            (SectionKind::GuestMetadata, self.guest.encode()),
            (SectionKind::MemoryMap, Vec::new()), // filled below, once offsets are known
            (SectionKind::WorkingSet, workingset::encode(&self.working_set)),
        ];
        if self.volume_len > 0 {
            sections.push((SectionKind::Volume, alloc::vec![0; 16])); // filled below
        }
        let table_end = HEADER_LEN + SECTION_ENTRY_LEN * sections.len();
        let map_len = self.memory.len() * MEMORY_RANGE_LEN;
        let mut offsets = Vec::new();
        let mut at = table_end;
        for (kind, bytes) in &sections {
            let len = if *kind == SectionKind::MemoryMap { map_len } else { bytes.len() };
            offsets.push((at, len));
            at = (at + len).next_multiple_of(8);
        }
        let metadata_len = at as u64;
        let data_start = metadata_len.next_multiple_of(PAGE_SIZE);
        let volume_start = (data_start + memory_data_len).next_multiple_of(PAGE_SIZE);
        let file_len = if self.volume_len > 0 { volume_start + self.volume_len } else { data_start + memory_data_len };
        let mut out = alloc::vec![0u8; at];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&ARCH_X86_64.to_le_bytes());
        out[20..24].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[24..32].copy_from_slice(&file_len.to_le_bytes());
        out[32..36].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        out[40..48].copy_from_slice(&metadata_len.to_le_bytes());
        for (i, ((kind, bytes), (offset, len))) in sections.iter().zip(&offsets).enumerate() {
            let entry = HEADER_LEN + i * SECTION_ENTRY_LEN;
            out[entry..entry + 4].copy_from_slice(&(*kind as u32).to_le_bytes());
            out[entry + 8..entry + 16].copy_from_slice(&(*offset as u64).to_le_bytes());
            out[entry + 16..entry + 24].copy_from_slice(&(*len as u64).to_le_bytes());
            if *kind == SectionKind::MemoryMap {
                for (j, r) in self.memory.iter().enumerate() {
                    let e = offset + j * MEMORY_RANGE_LEN;
                    out[e..e + 8].copy_from_slice(&r.gpa.to_le_bytes());
                    out[e + 8..e + 16].copy_from_slice(&r.len.to_le_bytes());
                    out[e + 16..e + 24].copy_from_slice(&(data_start + r.file_offset).to_le_bytes());
                }
            } else if *kind == SectionKind::Volume {
                out[*offset..offset + 8].copy_from_slice(&volume_start.to_le_bytes());
                out[offset + 8..offset + 16].copy_from_slice(&self.volume_len.to_le_bytes());
            } else {
                out[*offset..offset + len].copy_from_slice(bytes);
            }
        }
        let crc = crc32(&[&out]);
        out[48..52].copy_from_slice(&crc.to_le_bytes());
        (out, Layout { data_start, volume_start, file_len })
    }
}

/// Validates an image's metadata. `metadata` must hold at least the first bytes of the file, as
/// many as the header's metadata length says (when that is at most `min(file_len,
/// MAX_METADATA_BYTES)`); `file_len` is the file's real length.
pub fn parse(metadata: &[u8], file_len: u64) -> Result<ImageInfo, ImageError> {
    if file_len < HEADER_LEN as u64 || metadata.len() < HEADER_LEN {
        return Err(ImageError::TooShort(file_len.min(metadata.len() as u64)));
    }
    let b = metadata;
    let mut magic = [0; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(ImageError::BadMagic(magic));
    }
    let header = |field, value: u64, expected| Err(ImageError::Header { field, value, expected });
    let version = u32_at(b, 8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(ImageError::UnsupportedVersion(version));
    }
    let arch = u32_at(b, 12);
    if arch != ARCH_X86_64 {
        return Err(ImageError::WrongArchitecture(arch));
    }
    if u32_at(b, 16) != 0 {
        return header("flags", u32_at(b, 16).into(), "0 (no flags are defined)");
    }
    if u32_at(b, 20) as usize != HEADER_LEN {
        return header("header length", u32_at(b, 20).into(), "128");
    }
    let declared = u64_at(b, 24);
    if declared != file_len {
        return Err(ImageError::LengthMismatch { actual: file_len, declared });
    }
    let count = u32_at(b, 32) as usize;
    if count == 0 || count > MAX_SECTIONS {
        return header("section count", count as u64, "1..=16");
    }
    if u32_at(b, 36) != 0 || b[52..HEADER_LEN].iter().any(|&x| x != 0) {
        return header("reserved bytes", 1, "zero");
    }
    let metadata_len = u64_at(b, 40);
    let table_end = (HEADER_LEN + count * SECTION_ENTRY_LEN) as u64;
    if metadata_len < table_end || metadata_len > MAX_METADATA_BYTES || metadata_len > file_len {
        return header("metadata length", metadata_len, "between the section table's end and the file length");
    }
    if (metadata.len() as u64) < metadata_len {
        return Err(ImageError::TooShort(metadata.len() as u64));
    }
    let meta = &b[..metadata_len as usize];
    let stored = u32_at(meta, 48);
    let mut zeroed = [0u8; 4];
    let computed = crc32(&[&meta[..48], &mut zeroed, &meta[52..]]);
    if stored != computed {
        return Err(ImageError::Checksum { stored, computed });
    }

    let mut sections: Vec<(SectionKind, usize, usize)> = Vec::new();
    for index in 0..count {
        let e = HEADER_LEN + index * SECTION_ENTRY_LEN;
        let bad = |reason: String| Err(ImageError::Section { index, reason });
        let (kind, offset, len) = (u32_at(meta, e), u64_at(meta, e + 8), u64_at(meta, e + 16));
        let Some(kind) = SectionKind::from_u32(kind) else { return bad(alloc::format!("kind {kind} is unknown")) };
        if u32_at(meta, e + 4) != 0 || u64_at(meta, e + 24) != 0 {
            return bad(alloc::format!("{}: reserved fields are not zero", kind.name()));
        }
        if offset < table_end || offset % 8 != 0 {
            return bad(alloc::format!(
                "{}: offset {offset} is inside the header or table, or not 8-aligned",
                kind.name()
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > metadata_len) {
            return bad(alloc::format!(
                "{}: bytes {offset}+{len} extend past the {metadata_len}-byte metadata",
                kind.name()
            ));
        }
        if sections.iter().any(|s| s.0 == kind) {
            return bad(alloc::format!("{} appears twice", kind.name()));
        }
        let (offset, len) = (offset as usize, len as usize);
        if let Some(other) = sections.iter().find(|s| offset < s.1 + s.2 && s.1 < offset + len) {
            return bad(alloc::format!("{} overlaps the {} section", kind.name(), other.0.name()));
        }
        sections.push((kind, offset, len));
    }
    let section = |kind: SectionKind| -> Result<&[u8], ImageError> {
        let (_, offset, len) =
            sections.iter().find(|s| s.0 == kind).copied().ok_or(ImageError::MissingSection(kind.name()))?;
        Ok(&meta[offset..offset + len])
    };
    let vcpu = decode_records(section(SectionKind::VcpuState)?, "vcpu-state")?;
    let vm = decode_records(section(SectionKind::VmState)?, "vm-state")?;
    let guest = GuestMetadata::decode(section(SectionKind::GuestMetadata)?)?;
    let memory = decode_memory_map(section(SectionKind::MemoryMap)?, metadata_len, file_len)?;
    let working_set = section(SectionKind::WorkingSet)?;
    if version < 3 && !working_set.is_empty() {
        return Err(ImageError::Content { section: "working-set", reason: "must be empty in version 2".into() });
    }
    let working_set = workingset::decode(working_set)
        .map_err(|e| ImageError::Content { section: "working-set", reason: e.to_string() })?;
    let volume = match section(SectionKind::Volume) {
        Err(_) => None,
        Ok(bytes) => Some(decode_volume(bytes, metadata_len, file_len, &memory)?),
    };
    let sections = sections.iter().map(|&(kind, offset, len)| (kind, offset as u64, len as u64)).collect();
    Ok(ImageInfo { version, vcpu, vm, guest, memory, metadata_len, sections, checksum: stored, volume, working_set })
}

/// Checks the volume section: a page-aligned region after the metadata, inside the file,
/// overlapping no memory data, of whole sectors and at most the largest volume.
fn decode_volume(
    bytes: &[u8],
    metadata_len: u64,
    file_len: u64,
    memory: &[MemoryRange],
) -> Result<(u64, u64), ImageError> {
    let bad = |reason: String| Err(ImageError::Content { section: "volume", reason });
    if bytes.len() != 16 {
        return bad(alloc::format!("{} bytes, expected 16 (offset and length)", bytes.len()));
    }
    let (offset, len) = (u64_at(bytes, 0), u64_at(bytes, 8));
    if !offset.is_multiple_of(PAGE_SIZE) || offset < metadata_len {
        return bad(alloc::format!("offset {offset:#x} is not page-aligned after the metadata"));
    }
    if len == 0 || !len.is_multiple_of(crate::volume::SECTOR) || len > crate::volume::MAX_VOLUME_BYTES {
        return bad(alloc::format!("length {len} is not 1 to 1073741824 bytes of whole 512-byte sectors"));
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return bad(alloc::format!("bytes {offset:#x}+{len:#x} extend past the {file_len}-byte file"));
    }
    if let Some(r) = memory.iter().find(|r| offset < r.file_offset + r.len && r.file_offset < offset + len) {
        return bad(alloc::format!("bytes {offset:#x}+{len:#x} overlap the memory data of guest {:#x}", r.gpa));
    }
    Ok((offset, len))
}

fn decode_memory_map(bytes: &[u8], metadata_len: u64, file_len: u64) -> Result<Vec<MemoryRange>, ImageError> {
    let bad = |reason: String| Err(ImageError::Content { section: "memory-map", reason });
    if !bytes.len().is_multiple_of(MEMORY_RANGE_LEN) {
        return bad(alloc::format!("{} bytes is not a whole number of {MEMORY_RANGE_LEN}-byte entries", bytes.len()));
    }
    let mut ranges: Vec<MemoryRange> = bytes
        .as_chunks::<MEMORY_RANGE_LEN>()
        .0
        .iter()
        .map(|c| MemoryRange { gpa: u64_at(c, 0), len: u64_at(c, 8), file_offset: u64_at(c, 16) })
        .collect();
    if ranges.is_empty() {
        return bad("no memory ranges".into());
    }
    for (i, r) in ranges.iter().enumerate() {
        let aligned = r.gpa % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0 && r.file_offset % PAGE_SIZE == 0;
        if !aligned || r.len == 0 {
            return bad(alloc::format!(
                "entry {i} ({:#x}+{:#x} at file {:#x}) is empty or not page-aligned",
                r.gpa,
                r.len,
                r.file_offset
            ));
        }
        if r.gpa.checked_add(r.len).is_none_or(|end| end > MAX_GUEST_MEMORY) {
            return bad(alloc::format!(
                "entry {i} ({:#x}+{:#x}) exceeds {MAX_GUEST_MEMORY} bytes of guest memory",
                r.gpa,
                r.len
            ));
        }
        if r.file_offset < metadata_len {
            return bad(alloc::format!("entry {i}: file offset {:#x} points into the metadata", r.file_offset));
        }
        if r.file_offset.checked_add(r.len).is_none_or(|end| end > file_len) {
            return bad(alloc::format!(
                "entry {i}: file bytes {:#x}+{:#x} extend past the {file_len}-byte file",
                r.file_offset,
                r.len
            ));
        }
    }
    ranges.sort_by_key(|r| r.gpa);
    for pair in ranges.windows(2) {
        if pair[0].gpa + pair[0].len > pair[1].gpa {
            return bad(alloc::format!("guest ranges at {:#x} and {:#x} overlap", pair[0].gpa, pair[1].gpa));
        }
    }
    let mut by_file: Vec<&MemoryRange> = ranges.iter().collect();
    by_file.sort_by_key(|r| r.file_offset);
    for pair in by_file.windows(2) {
        if pair[0].file_offset + pair[0].len > pair[1].file_offset {
            return bad(alloc::format!(
                "file ranges at {:#x} and {:#x} overlap",
                pair[0].file_offset,
                pair[1].file_offset
            ));
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn writer() -> ImageWriter {
        ImageWriter {
            vcpu: vec![
                VcpuRecord { kind: record::REGS, bytes: vec![1; 144] },
                VcpuRecord { kind: record::MP_STATE, bytes: vec![0; 4] },
            ],
            vm: vec![],
            guest: GuestMetadata {
                interface_version: 3,
                function_name: "hello".into(),
                wasm_sha256: [5; 32],
                io_table_gpa: 0x5000,
                io_table_len: 64,
                runtime_version: "thaw-guest 0.1.0".into(),
            },
            memory: vec![
                MemoryRange { gpa: 0, len: 2 * PAGE_SIZE, file_offset: 0 },
                MemoryRange { gpa: 0x10_0000, len: PAGE_SIZE, file_offset: 2 * PAGE_SIZE },
            ],
            volume_len: 0,
            working_set: vec![
                Run { start: 0x20_1000, pages: 3, written: false },
                Run { start: 0x1000_0040_0000, pages: 1, written: true },
            ],
        }
    }

    /// A whole image file: metadata, then three pages of memory data.
    fn image() -> Vec<u8> {
        let (mut bytes, layout) = writer().encode(3 * PAGE_SIZE);
        bytes.resize(layout.file_len as usize, 0xab);
        bytes
    }

    #[test]
    fn a_bundle_given_as_an_image_is_named_for_what_it_is() {
        let e = ImageError::BadMagic(magic::BUNDLE).to_string();
        assert!(e.starts_with("this is a function bundle (from `thaw pack`), not a snapshot image"), "{e}");
    }

    #[test]
    fn a_volume_follows_the_memory_data_and_is_checked() {
        let w = ImageWriter { volume_len: 1024, ..writer() };
        let (mut bytes, layout) = w.encode(3 * PAGE_SIZE);
        assert_eq!(layout.volume_start, layout.data_start + 3 * PAGE_SIZE);
        assert_eq!(layout.file_len, layout.volume_start + 1024);
        bytes.resize(layout.file_len as usize, 0xcd);
        let info = parse_file(&bytes).unwrap();
        assert_eq!(info.volume, Some((layout.volume_start, 1024)));
        assert_eq!(parse_file(&image()).unwrap().volume, None);
        let section = info.sections.iter().find(|s| s.0 == SectionKind::Volume).unwrap().1 as usize;
        let cases: [(u64, u64, &str); 5] = [
            (layout.volume_start + 1, 1024, "page-aligned"),
            (layout.data_start, 1024, "overlap the memory data"),
            (layout.volume_start, 1000, "whole 512-byte sectors"),
            (layout.volume_start, 0, "whole 512-byte sectors"),
            (layout.volume_start + PAGE_SIZE, 1024, "extend past"),
        ];
        for (offset, len, expected) in cases {
            let mut bad = bytes.clone();
            bad[section..section + 8].copy_from_slice(&offset.to_le_bytes());
            bad[section + 8..section + 16].copy_from_slice(&len.to_le_bytes());
            reseal(&mut bad);
            let e = parse_file(&bad).unwrap_err().to_string();
            assert!(e.contains(expected), "{offset:#x}+{len}: {e}");
        }
    }

    fn parse_file(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
        parse(bytes, bytes.len() as u64)
    }

    #[test]
    fn round_trips_and_the_header_is_golden() {
        let bytes = image();
        assert_eq!(&bytes[..16], b"THAWSNAP\x03\0\0\0\x3e\0\0\0");
        let info = parse_file(&bytes).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.working_set, writer().working_set);
        assert_eq!(info.vcpu, writer().vcpu);
        assert_eq!(info.guest, writer().guest);
        assert_eq!(info.memory[0], MemoryRange { gpa: 0, len: 2 * PAGE_SIZE, file_offset: PAGE_SIZE });
        assert_eq!(info.memory[1].file_offset, 3 * PAGE_SIZE);
        assert_eq!(info.guest_memory_size(), 0x10_1000);
        assert!(info.memory.iter().all(|r| r.file_offset % PAGE_SIZE == 0), "memory data is page-aligned");
    }

    #[test]
    fn version_2_images_are_read_and_have_no_working_set() {
        let old = ImageWriter { working_set: vec![], ..writer() };
        let (mut bytes, layout) = old.encode(3 * PAGE_SIZE);
        bytes.resize(layout.file_len as usize, 0);
        bytes[8] = 2;
        reseal(&mut bytes);
        let info = parse_file(&bytes).unwrap();
        assert_eq!((info.version, info.working_set.len()), (2, 0));
        let mut with_set = image();
        with_set[8] = 2;
        reseal(&mut with_set);
        assert!(parse_file(&with_set).unwrap_err().to_string().contains("must be empty in version 2"));
    }

    #[test]
    fn a_hostile_working_set_is_refused_with_its_value() {
        let mut bytes = image();
        let (offset, _) = section_of(&bytes, SectionKind::WorkingSet);
        bytes[offset + 16..offset + 24].copy_from_slice(&0x20_2000u64.to_le_bytes()); // inside run 1
        reseal(&mut bytes);
        let message = parse_file(&bytes).unwrap_err().to_string();
        assert!(message.contains("working-set section: the run at 0x202000 overlaps"), "{message}");
    }

    fn section_of(bytes: &[u8], kind: SectionKind) -> (usize, usize) {
        let info = parse_file(bytes).unwrap();
        let &(_, offset, len) = info.sections.iter().find(|s| s.0 == kind).unwrap();
        (offset as usize, len as usize)
    }

    /// Rewrites the CRC after an edit, so that only the edit itself is judged.
    fn reseal(bytes: &mut [u8]) {
        let metadata_len = u64_at(bytes, 40) as usize;
        if metadata_len > bytes.len() || metadata_len < 52 {
            return; // a corrupted length: leave the checksum to fail
        }
        bytes[48..52].fill(0);
        let crc = crc32(&[&bytes[..metadata_len]]);
        bytes[48..52].copy_from_slice(&crc.to_le_bytes());
    }

    fn entry(index: usize) -> usize {
        HEADER_LEN + index * SECTION_ENTRY_LEN
    }

    fn map_offset(bytes: &[u8]) -> usize {
        u64_at(bytes, entry(3) + 8) as usize
    }

    #[test]
    fn rejects_hostile_images_with_a_message_naming_the_field() {
        type Edit = fn(&mut Vec<u8>);
        let cases: &[(&str, Edit, &str)] = &[
            ("wrong magic", |b| b[0] = b'X', "is not \"THAWSNAP\""),
            ("wrong version", |b| b[8] = 1, "format version 1 is not supported"),
            ("future version", |b| b[8] = 4, "format version 4 is not supported (this thaw reads versions 2 to 3)"),
            ("wrong architecture", |b| b[12] = 183, "architecture 183 is not x86-64"),
            ("unknown flag", |b| b[16] = 1, "flags is 1"),
            ("flipped checksum byte", |b| b[49] ^= 0xff, "checksum"),
            ("flipped metadata byte", |b| b[HEADER_LEN + 5 * SECTION_ENTRY_LEN + 3] ^= 1, "checksum"),
            ("trailing bytes", |b| b.push(0), "but its header declares"),
            (
                "section count zero",
                |b| {
                    b[32] = 0;
                    reseal(b)
                },
                "section count is 0",
            ),
            (
                "unknown section kind",
                |b| {
                    b[entry(1)] = 77;
                    reseal(b)
                },
                "kind 77 is unknown",
            ),
            (
                "duplicate section",
                |b| {
                    b[entry(1)] = 1;
                    reseal(b)
                },
                "vcpu-state appears twice",
            ),
            (
                "section offset past the end",
                |b| {
                    b[entry(2) + 8..entry(2) + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
                    reseal(b)
                },
                "extend past",
            ),
            (
                "section length overflow",
                |b| {
                    b[entry(2) + 16..entry(2) + 24].copy_from_slice(&u64::MAX.to_le_bytes());
                    reseal(b)
                },
                "extend past",
            ),
            (
                "overlapping sections",
                |b| {
                    let vcpu_offset = u64_at(b, entry(0) + 8);
                    b[entry(2) + 8..entry(2) + 16].copy_from_slice(&vcpu_offset.to_le_bytes());
                    reseal(b)
                },
                "overlaps the vcpu-state section",
            ),
            (
                "section inside the table",
                |b| {
                    b[entry(1) + 8..entry(1) + 16].copy_from_slice(&8u64.to_le_bytes());
                    reseal(b)
                },
                "inside the header or table",
            ),
            (
                "memory map past the file length",
                |b| {
                    let at = map_offset(b) + 16;
                    b[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
                    reseal(b)
                },
                "extend past the",
            ),
            (
                "memory range into the metadata",
                |b| {
                    let at = map_offset(b) + 16;
                    b[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
                    reseal(b)
                },
                "points into the metadata",
            ),
            (
                "unaligned memory range",
                |b| {
                    let at = map_offset(b);
                    b[at] = 1;
                    reseal(b)
                },
                "not page-aligned",
            ),
            (
                "overlapping guest ranges",
                |b| {
                    let at = map_offset(b) + MEMORY_RANGE_LEN;
                    b[at..at + 8].copy_from_slice(&PAGE_SIZE.to_le_bytes());
                    reseal(b)
                },
                "overlap",
            ),
            (
                "record past its section",
                |b| {
                    let at = u64_at(b, entry(0) + 8) as usize + 4;
                    b[at..at + 4].copy_from_slice(&100_000u32.to_le_bytes());
                    reseal(b)
                },
                "claims 100000 bytes",
            ),
        ];
        for (name, edit, expected) in cases {
            let mut bytes = image();
            edit(&mut bytes);
            let message = parse_file(&bytes).expect_err(name).to_string();
            assert!(message.contains(expected), "{name}: {message:?} does not contain {expected:?}");
        }
    }

    #[test]
    fn rejects_truncation_at_every_section_boundary_and_every_byte_of_metadata() {
        let bytes = image();
        let metadata_len = u64_at(&bytes, 40) as usize;
        let mut cuts: Vec<usize> = (0..5)
            .flat_map(|i| {
                let offset = u64_at(&bytes, entry(i) + 8) as usize;
                [offset, offset + u64_at(&bytes, entry(i) + 16) as usize]
            })
            .collect();
        cuts.extend(0..metadata_len);
        cuts.push(bytes.len() - 1);
        for cut in cuts {
            assert!(parse_file(&bytes[..cut]).is_err(), "truncated to {cut} bytes was accepted");
        }
    }

    #[test]
    fn survives_every_single_byte_corruption_of_the_metadata() {
        let bytes = image();
        for i in 0..u64_at(&bytes, 40) as usize {
            let mut bad = bytes.clone();
            bad[i] ^= 0x5a;
            reseal(&mut bad);
            let _ = parse_file(&bad); // must not panic
        }
    }

    #[test]
    fn every_image_error_message_is_pinned() {
        let elf = *b"\x7fELF\x02\x01\x01\0";
        let cases: [(ImageError, &str); 11] = [
            (ImageError::TooShort(100), "image is 100 bytes, shorter than its 128-byte header (truncated?)"),
            (
                ImageError::BadMagic(magic::BUNDLE),
                "this is a function bundle (from `thaw pack`), not a snapshot image: make one with `thaw snapshot BUNDLE -o IMAGE.snap`",
            ),
            (
                ImageError::BadMagic(elf),
                r#"image magic [7f, 45, 4c, 46, 02, 01, 01, 00] is not "THAWSNAP": not a thaw snapshot"#,
            ),
            (
                ImageError::UnsupportedVersion(4),
                "image format version 4 is not supported (this thaw reads versions 2 to 3)",
            ),
            (
                ImageError::WrongArchitecture(183),
                "image architecture 183 is not x86-64 (62): it was taken on another kind of machine",
            ),
            (ImageError::Header { field: "flags", value: 1, expected: "0" }, "image header: flags is 1, expected 0"),
            (
                ImageError::LengthMismatch { actual: 4096, declared: 8192 },
                "image file is 4096 bytes but its header declares 8192 (truncated or padded)",
            ),
            (
                ImageError::Checksum { stored: 0, computed: 0xcafe_f00d },
                "image metadata checksum 0x00000000 does not match the computed 0xcafef00d (corrupted)",
            ),
            (
                ImageError::Section { index: 2, reason: "kind 99 is unknown".to_string() },
                "image section 2: kind 99 is unknown",
            ),
            (ImageError::MissingSection("memory"), "image has no memory section"),
            (
                ImageError::Content { section: "working-set", reason: "15 bytes".to_string() },
                "image working-set section: 15 bytes",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
