//! Validating the guest kernel ELF before anything of it is loaded.
//!
//! The file is untrusted input: every offset and size is checked against the file and against
//! thaw's memory layout, and every failure is one [`KernelError`] line saying what is wrong with
//! which value. Nothing here panics on any input (see the hostile-input tests below).
//!
//! A kernel thaw accepts is a 64-bit little-endian x86-64 `ET_EXEC` (linked at a fixed address,
//! so no relocation is needed), declares thaw's interface version in its `.note.thaw` note, and
//! carries a `bootloader_api` config in `.bootloader-config`.

use abi::note::{AbiNote, NoteError};
use bootloader_api::BootloaderConfig;
use object::LittleEndian;
use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};

use crate::layout::KERNEL_MIN_ADDR;

/// The most LOAD segments a kernel may have.
const MAX_SEGMENTS: usize = 16;
/// The most memory a kernel image may occupy.
const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// What is wrong with a kernel file.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file has no bytes.
    #[error("kernel file is empty")]
    Empty,
    /// The file does not start with the ELF magic.
    #[error("not an ELF file: it starts with {0:02x?}, not 7f 45 4c 46")]
    NotElf(Vec<u8>),
    /// The ELF header is unreadable or describes the wrong kind of file.
    #[error("ELF header: {0}")]
    Header(String),
    /// The kernel is not a fixed-address executable.
    #[error(
        "ELF type {0} is not ET_EXEC: thaw boots kernels linked at a fixed address (a position-independent executable or a library is not a thaw kernel)"
    )]
    NotExecutable(u16),
    /// The program or section headers cannot be read.
    #[error("ELF {what}: {reason}")]
    Table {
        /// Which table.
        what: &'static str,
        /// Why it is unreadable.
        reason: String,
    },
    /// The interface-version note is missing.
    #[error("no .note.thaw section: this is not a thaw guest kernel")]
    MissingAbiNote,
    /// The interface-version note is malformed.
    #[error(".note.thaw: {0}")]
    BadAbiNote(NoteError),
    /// The kernel speaks another interface version.
    #[error(
        "kernel speaks thaw interface version {kernel}, this VMM speaks version {vmm}; rebuild the kernel against this abi"
    )]
    AbiMismatch {
        /// The kernel's version.
        kernel: u32,
        /// Ours.
        vmm: u32,
    },
    /// The bootloader config is missing or unreadable.
    #[error(".bootloader-config: {0}")]
    BootloaderConfig(String),
    /// A LOAD segment is unusable.
    #[error("LOAD segment {index} (address {addr:#x}): {reason}")]
    Segment {
        /// Index among the LOAD segments.
        index: usize,
        /// Its virtual address.
        addr: u64,
        /// What is wrong.
        reason: String,
    },
    /// The image as a whole is unusable.
    #[error("kernel image: {0}")]
    Image(String),
}

/// A loadable piece of the kernel: `data` goes at `addr`, followed by zeros up to `mem_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical (and virtual) load address.
    pub addr: u64,
    /// Bytes taken from the file.
    pub data: Vec<u8>,
    /// Size in memory, at least `data.len()`.
    pub mem_size: u64,
}

/// A validated kernel, ready to load.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// Entry point (virtual address, identity-mapped).
    pub entry: u64,
    /// LOAD segments, sorted by address, non-overlapping, all at or above
    /// [`KERNEL_MIN_ADDR`].
    pub segments: Vec<Segment>,
    /// What the kernel asks of its loader.
    pub config: BootloaderConfig,
}

impl KernelImage {
    /// End (exclusive) of the highest segment.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.addr + s.mem_size).max().unwrap_or(KERNEL_MIN_ADDR)
    }

    /// Validates `bytes` as a thaw kernel.
    pub fn parse(bytes: &[u8]) -> Result<Self, KernelError> {
        if bytes.is_empty() {
            return Err(KernelError::Empty);
        }
        if !bytes.starts_with(&elf::ELFMAG) {
            return Err(KernelError::NotElf(bytes.iter().take(4).copied().collect()));
        }
        let header = FileHeader64::<LittleEndian>::parse(bytes).map_err(|e| KernelError::Header(e.to_string()))?;
        let ident = header.e_ident();
        if ident.class != elf::ELFCLASS64 {
            return Err(KernelError::Header(format!("class {} is not 64-bit", ident.class)));
        }
        if ident.data != elf::ELFDATA2LSB {
            return Err(KernelError::Header("big-endian ELF; x86-64 kernels are little-endian".into()));
        }
        let endian = header.endian().map_err(|e| KernelError::Header(e.to_string()))?;
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(KernelError::Header(format!("machine {machine} is not x86-64 ({})", elf::EM_X86_64)));
        }
        let kind = header.e_type(endian);
        if kind != elf::ET_EXEC {
            return Err(KernelError::NotExecutable(kind));
        }

        let tables = [
            ("program header", header.e_phoff(endian), header.e_phnum(endian), header.e_phentsize(endian)),
            ("section header", header.e_shoff(endian), header.e_shnum(endian), header.e_shentsize(endian)),
        ];
        for (what, offset, count, entry_size) in tables {
            let size = u64::from(count) * u64::from(entry_size);
            if offset.checked_add(size).is_none_or(|end| end > bytes.len() as u64) {
                return Err(KernelError::Table {
                    what: "headers",
                    reason: format!(
                        "the {what} table at {offset:#x}+{size:#x} extends past the end of the {}-byte file (truncated?)",
                        bytes.len()
                    ),
                });
            }
        }
        let sections = header
            .sections(endian, bytes)
            .map_err(|e| KernelError::Table { what: "section headers", reason: e.to_string() })?;
        let section_data = |name: &str| -> Result<Option<&[u8]>, KernelError> {
            let Some((_, section)) = sections.section_by_name(endian, name.as_bytes()) else {
                return Ok(None);
            };
            section
                .data(endian, bytes)
                .map(Some)
                .map_err(|e| KernelError::Table { what: "section data", reason: format!("{name}: {e}") })
        };
        let note = section_data(abi::note::SECTION_NAME)?.ok_or(KernelError::MissingAbiNote)?;
        let note = AbiNote::parse(note).map_err(KernelError::BadAbiNote)?;
        if note.version != abi::INTERFACE_VERSION {
            return Err(KernelError::AbiMismatch { kernel: note.version, vmm: abi::INTERFACE_VERSION });
        }
        let config = section_data(".bootloader-config")?.ok_or_else(|| {
            KernelError::BootloaderConfig(
                "section missing; declare the entry point with bootloader_api::entry_point!".into(),
            )
        })?;
        let config = BootloaderConfig::deserialize(config).map_err(|e| KernelError::BootloaderConfig(e.into()))?;

        let segments = load_segments(header, endian, bytes)?;
        let entry = header.e_entry(endian);
        let in_code = segments.iter().any(|s| (s.addr..s.addr + s.data.len() as u64).contains(&entry));
        if !in_code {
            return Err(KernelError::Image(format!("entry point {entry:#x} is not inside any loaded segment")));
        }
        Ok(Self { entry, segments, config })
    }
}

fn load_segments(
    header: &FileHeader64<LittleEndian>,
    endian: LittleEndian,
    bytes: &[u8],
) -> Result<Vec<Segment>, KernelError> {
    let headers = header
        .program_headers(endian, bytes)
        .map_err(|e| KernelError::Table { what: "program headers", reason: e.to_string() })?;
    let mut segments = Vec::new();
    let mut total: u64 = 0;
    for ph in headers.iter().filter(|ph| ph.p_type(endian) == elf::PT_LOAD) {
        let index = segments.len();
        let addr = ph.p_vaddr(endian);
        let bad = |reason: String| KernelError::Segment { index, addr, reason };
        if index == MAX_SEGMENTS {
            return Err(bad(format!("more than {MAX_SEGMENTS} LOAD segments")));
        }
        let (offset, file_size, mem_size) = (ph.p_offset(endian), ph.p_filesz(endian), ph.p_memsz(endian));
        if ph.p_paddr(endian) != addr {
            return Err(bad(format!("physical address {:#x} differs from the virtual address", ph.p_paddr(endian))));
        }
        if file_size > mem_size {
            return Err(bad(format!("file size {file_size:#x} exceeds memory size {mem_size:#x}")));
        }
        if addr < KERNEL_MIN_ADDR {
            return Err(bad(format!("below {KERNEL_MIN_ADDR:#x}, where thaw's boot structures live")));
        }
        if mem_size > MAX_IMAGE_BYTES || addr.checked_add(mem_size).is_none_or(|end| end > 1 << 46) {
            return Err(bad(format!("memory size {mem_size:#x} is too large")));
        }
        let file_end = offset.checked_add(file_size).filter(|&end| end <= bytes.len() as u64);
        let Some(file_end) = file_end else {
            return Err(bad(format!(
                "file bytes {offset:#x}+{file_size:#x} extend past the end of the {}-byte file (truncated?)",
                bytes.len()
            )));
        };
        total += mem_size;
        if total > MAX_IMAGE_BYTES {
            return Err(bad(format!("the image exceeds {MAX_IMAGE_BYTES} bytes")));
        }
        let data = bytes[offset as usize..file_end as usize].to_vec();
        segments.push(Segment { addr, data, mem_size });
    }
    if segments.is_empty() {
        return Err(KernelError::Image("no LOAD segments".into()));
    }
    segments.sort_by_key(|s| s.addr);
    for pair in segments.windows(2) {
        if pair[0].addr + pair[0].mem_size > pair[1].addr {
            return Err(KernelError::Image(format!("segments at {:#x} and {:#x} overlap", pair[0].addr, pair[1].addr)));
        }
    }
    Ok(segments)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 x86-64 executable with one LOAD segment and the given sections.
    /// Enough to exercise every check without a real kernel.
    pub(crate) fn build_elf(e_type: u16, load: (u64, &[u8], u64), sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut names = Vec::new();
        for (name, _) in sections.iter().copied().chain([(".shstrtab", &[][..])]) {
            names.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        let mut out = vec![0u8; 64 + 56];
        let mut section_offsets = Vec::new();
        let seg_offset = out.len() as u64;
        out.extend_from_slice(load.1);
        for (_, data) in sections {
            section_offsets.push(out.len() as u64);
            out.extend_from_slice(data);
        }
        let shstr_offset = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        let shnum = sections.len() + 2;
        // Null section header, then one per section, then .shstrtab.
        out.extend_from_slice(&[0u8; 64]);
        let mut sh = |name: u32, kind: u32, offset: u64, size: u64| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[48..56].copy_from_slice(&1u64.to_le_bytes());
            out.extend_from_slice(&h);
        };
        for (i, (_, data)) in sections.iter().enumerate() {
            sh(names[i], elf::SHT_PROGBITS, section_offsets[i], data.len() as u64);
        }
        sh(names[sections.len()], elf::SHT_STRTAB, shstr_offset, shstrtab.len() as u64);

        let h = &mut out[..64];
        h[0..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[24..32].copy_from_slice(&load.0.to_le_bytes()); // entry: start of the segment
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        h[40..48].copy_from_slice(&shoff.to_le_bytes());
        h[52..54].copy_from_slice(&64u16.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        h[58..60].copy_from_slice(&64u16.to_le_bytes());
        h[60..62].copy_from_slice(&(shnum as u16).to_le_bytes());
        h[62..64].copy_from_slice(&((shnum - 1) as u16).to_le_bytes());
        let p = &mut out[64..120];
        p[0..4].copy_from_slice(&elf::PT_LOAD.to_le_bytes());
        p[4..8].copy_from_slice(&(elf::PF_R | elf::PF_X).to_le_bytes());
        p[8..16].copy_from_slice(&seg_offset.to_le_bytes());
        p[16..24].copy_from_slice(&load.0.to_le_bytes());
        p[24..32].copy_from_slice(&load.0.to_le_bytes());
        p[32..40].copy_from_slice(&(load.1.len() as u64).to_le_bytes());
        p[40..48].copy_from_slice(&load.2.to_le_bytes());
        p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        out
    }

    fn note(version: u32) -> Vec<u8> {
        let n = AbiNote::new(version);
        let mut v = Vec::new();
        for x in [n.namesz, n.descsz, n.note_type] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&n.name);
        v.extend_from_slice(&n.version.to_le_bytes());
        v
    }

    pub(crate) fn valid_kernel() -> Vec<u8> {
        let config = BootloaderConfig::new_default().serialize();
        build_elf(
            elf::ET_EXEC,
            (0x20_0000, &[0xf4; 16], 0x2000),
            &[(".note.thaw", &note(abi::INTERFACE_VERSION)), (".bootloader-config", &config)],
        )
    }

    fn error(bytes: &[u8]) -> String {
        KernelImage::parse(bytes).expect_err("must be rejected").to_string()
    }

    #[test]
    fn accepts_a_well_formed_kernel() {
        let k = KernelImage::parse(&valid_kernel()).unwrap();
        assert_eq!(k.entry, 0x20_0000);
        assert_eq!(k.segments, vec![Segment { addr: 0x20_0000, data: vec![0xf4; 16], mem_size: 0x2000 }]);
        assert_eq!(k.end(), 0x20_2000);
    }

    #[test]
    fn rejects_empty_and_non_elf_files() {
        assert_eq!(error(&[]), "kernel file is empty");
        assert!(error(b"#!/bin/sh\n").starts_with("not an ELF file: it starts with [23, 21, 2f, 62]"));
    }

    #[test]
    fn rejects_position_independent_executables() {
        let mut k = valid_kernel();
        k[16] = elf::ET_DYN as u8;
        assert!(error(&k).starts_with("ELF type 3 is not ET_EXEC"));
    }

    #[test]
    fn rejects_every_truncation_without_panicking() {
        let k = valid_kernel();
        for len in 1..k.len() {
            assert!(KernelImage::parse(&k[..len]).is_err(), "truncated to {len} bytes was accepted");
        }
        let cut = &k[..k.len() - 10];
        assert!(error(cut).contains(&format!("extends past the end of the {}-byte file (truncated?)", cut.len())));
    }

    #[test]
    fn survives_every_single_byte_corruption() {
        let k = valid_kernel();
        for i in 0..k.len() {
            for value in [0x00, 0xff, 0x80] {
                let mut bad = k.clone();
                bad[i] = value;
                let _ = KernelImage::parse(&bad); // must not panic
            }
        }
    }

    #[test]
    fn rejects_missing_or_foreign_abi_note() {
        let config = BootloaderConfig::new_default().serialize();
        let no_note = build_elf(elf::ET_EXEC, (0x20_0000, &[0; 4], 4), &[(".bootloader-config", &config)]);
        assert_eq!(error(&no_note), "no .note.thaw section: this is not a thaw guest kernel");
        let old = build_elf(
            elf::ET_EXEC,
            (0x20_0000, &[0; 4], 4),
            &[(".note.thaw", &note(abi::INTERFACE_VERSION + 1)), (".bootloader-config", &config)],
        );
        assert!(
            error(&old).starts_with(&format!("kernel speaks thaw interface version {}", abi::INTERFACE_VERSION + 1))
        );
    }

    #[test]
    fn rejects_segments_in_the_boot_area_or_bigger_than_their_file() {
        let config = BootloaderConfig::new_default().serialize();
        let note = note(abi::INTERFACE_VERSION);
        let sections: [(&str, &[u8]); 2] = [(".note.thaw", &note), (".bootloader-config", &config)];
        let low = build_elf(elf::ET_EXEC, (0x1000, &[0; 4], 4), &sections);
        assert!(error(&low).contains("below 0x200000"));
        let mut shrunk = build_elf(elf::ET_EXEC, (0x20_0000, &[0; 8], 8), &sections);
        shrunk[64 + 40..64 + 48].copy_from_slice(&4u64.to_le_bytes()); // memsz < filesz
        assert!(error(&shrunk).contains("file size 0x8 exceeds memory size 0x4"));
    }
}
