//! Encoding `bootloader_api::BootInfo` for direct boot.
//!
//! The kernel receives a pointer to a `BootInfo` exactly as the `bootloader` crate would pass
//! it. The struct is `#[repr(C)]`, so it is encoded field by field at the offsets the compiler
//! gives `bootloader_api`'s own type (`offset_of!`): no mirror struct to drift, no host pointer
//! in guest memory, and no padding bytes read. A test decodes the result as the real type.

use std::mem::{offset_of, size_of};

use bootloader_api::BootInfo;
use bootloader_api::info::{MemoryRegion, MemoryRegionKind};

/// `repr(C)` discriminant of `Optional::Some`.
const OPTIONAL_SOME: u32 = 0;
/// `repr(C)` discriminant of `Optional::None`.
const OPTIONAL_NONE: u32 = 1;

/// What the kernel is told about its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// The memory map.
    pub regions: Vec<MemoryRegion>,
    /// Where all of physical memory is mapped, if the kernel asked for it.
    pub physical_memory_offset: Option<u64>,
    /// (virtual address, length) of the ramdisk, if one was loaded.
    pub ramdisk: Option<(u64, u64)>,
    /// Virtual address of the lowest byte of the kernel stack.
    pub stack_bottom: u64,
    /// Kernel stack size in bytes.
    pub stack_len: u64,
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn put_optional_u64(buf: &mut [u8], offset: usize, value: Option<u64>) {
    match value {
        Some(v) => {
            put(buf, offset, &OPTIONAL_SOME.to_le_bytes());
            put(buf, offset + 8, &v.to_le_bytes());
        }
        None => put(buf, offset, &OPTIONAL_NONE.to_le_bytes()),
    }
}

/// The `bootloader_api` version this VMM was built against, as a kernel built against the
/// same version expects to find it.
fn api_version() -> bootloader_api::config::ApiVersion {
    BootInfo::new(bootloader_api::info::MemoryRegions::from(&mut [][..])).api_version
}

fn region_kind(kind: MemoryRegionKind) -> (u32, u32) {
    match kind {
        MemoryRegionKind::Usable => (0, 0),
        MemoryRegionKind::Bootloader => (1, 0),
        MemoryRegionKind::UnknownUefi(t) => (2, t),
        MemoryRegionKind::UnknownBios(t) => (3, t),
        _ => (1, 0),
    }
}

/// Encodes `params` as a `BootInfo` placed at guest address `gpa`, followed by its memory
/// region array. Returns the bytes to write at `gpa`.
pub fn encode(params: &BootParams, gpa: u64) -> Vec<u8> {
    let info_len = size_of::<BootInfo>().next_multiple_of(8);
    let region_len = size_of::<MemoryRegion>();
    let mut buf = vec![0u8; info_len + region_len * params.regions.len()];

    // api_version: three u16 then a bool, as bootloader_api lays out ApiVersion.
    let version = api_version();
    let at = offset_of!(BootInfo, api_version);
    put(&mut buf, at, &version.version_major().to_le_bytes());
    put(&mut buf, at + 2, &version.version_minor().to_le_bytes());
    put(&mut buf, at + 4, &version.version_patch().to_le_bytes());
    buf[at + 6] = version.pre_release() as u8;

    let at = offset_of!(BootInfo, memory_regions);
    put(&mut buf, at, &(gpa + info_len as u64).to_le_bytes());
    put(&mut buf, at + 8, &(params.regions.len() as u64).to_le_bytes());

    put(&mut buf, offset_of!(BootInfo, framebuffer), &OPTIONAL_NONE.to_le_bytes());
    put_optional_u64(&mut buf, offset_of!(BootInfo, physical_memory_offset), params.physical_memory_offset);
    put(&mut buf, offset_of!(BootInfo, recursive_index), &OPTIONAL_NONE.to_le_bytes());
    put(&mut buf, offset_of!(BootInfo, rsdp_addr), &OPTIONAL_NONE.to_le_bytes());
    put(&mut buf, offset_of!(BootInfo, tls_template), &OPTIONAL_NONE.to_le_bytes());
    put_optional_u64(&mut buf, offset_of!(BootInfo, ramdisk_addr), params.ramdisk.map(|r| r.0));
    put(&mut buf, offset_of!(BootInfo, ramdisk_len), &params.ramdisk.map_or(0, |r| r.1).to_le_bytes());
    put(&mut buf, offset_of!(BootInfo, kernel_stack_bottom), &params.stack_bottom.to_le_bytes());
    put(&mut buf, offset_of!(BootInfo, kernel_stack_len), &params.stack_len.to_le_bytes());

    for (i, region) in params.regions.iter().enumerate() {
        let at = info_len + i * region_len;
        put(&mut buf, at + offset_of!(MemoryRegion, start), &region.start.to_le_bytes());
        put(&mut buf, at + offset_of!(MemoryRegion, end), &region.end.to_le_bytes());
        let (tag, payload) = region_kind(region.kind);
        let kind_at = at + offset_of!(MemoryRegion, kind);
        put(&mut buf, kind_at, &tag.to_le_bytes());
        put(&mut buf, kind_at + 4, &payload.to_le_bytes());
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes our bytes as the real `BootInfo` and checks every field the kernel reads.
    #[test]
    fn encoding_decodes_as_the_real_boot_info() {
        let regions = vec![
            MemoryRegion { start: 0, end: 0x30_0000, kind: MemoryRegionKind::Bootloader },
            MemoryRegion { start: 0x30_0000, end: 0x400_0000, kind: MemoryRegionKind::Usable },
        ];
        let params = BootParams {
            regions: regions.clone(),
            physical_memory_offset: Some(0x1000_0000_0000),
            ramdisk: Some((0x20_8000, 1234)),
            stack_bottom: 0x1e_0000,
            stack_len: 0x2_0000,
        };
        let gpa = 0x8_0000;
        let bytes = encode(&params, gpa);
        // SAFETY: `bytes` holds a fully initialized BootInfo image (every field written, valid
        // enum tags); it is read by value, and the region pointer inside is never dereferenced.
        let info: BootInfo = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(info.physical_memory_offset.into_option(), Some(0x1000_0000_0000));
        assert_eq!(info.ramdisk_addr.into_option(), Some(0x20_8000));
        assert_eq!(info.ramdisk_len, 1234);
        assert!(matches!(info.framebuffer, bootloader_api::info::Optional::None));
        assert_eq!(info.recursive_index.into_option(), None);
        assert_eq!(info.rsdp_addr.into_option(), None);
        assert_eq!((info.kernel_stack_bottom, info.kernel_stack_len), (0x1e_0000, 0x2_0000));
        assert_eq!(info.api_version.version_major(), api_version().version_major());
        let info_len = size_of::<BootInfo>().next_multiple_of(8);
        for (i, expected) in regions.iter().enumerate() {
            let at = info_len + i * size_of::<MemoryRegion>();
            // SAFETY: as above: an initialized MemoryRegion image, read by value.
            let region: MemoryRegion = unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
            assert_eq!(&region, expected);
        }
        // The region pointer is the guest address right after the BootInfo.
        let ptr_at = offset_of!(BootInfo, memory_regions);
        assert_eq!(bytes[ptr_at..ptr_at + 8], (gpa + info_len as u64).to_le_bytes());
        assert_eq!(bytes[ptr_at + 8..ptr_at + 16], 2u64.to_le_bytes());
    }
}
