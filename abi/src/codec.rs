//! The ground floor of the formats: the checksum every one of them carries, each file format's
//! magic, and the little-endian field helpers the parsers share. Callers check bounds first:
//! the helpers index directly and are only used after a length check.

use alloc::vec::Vec;

/// The first eight bytes of each of thaw's file formats.
pub mod magic {
    /// A function bundle (`thaw pack`).
    pub const BUNDLE: [u8; 8] = *b"THAWFUNC";
    /// A snapshot image (`thaw snapshot`).
    pub const IMAGE: [u8; 8] = *b"THAWSNAP";
    /// A data volume.
    pub const VOLUME: [u8; 8] = *b"THAWVOL\0";
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it) of `chunks` one after another.
pub fn crc32(chunks: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for chunk in chunks {
        hasher.update(chunk);
    }
    hasher.finalize()
}

/// The u16 at `at`.
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The u32 at `at`.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The u64 at `at`.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The u128 at `at`.
pub fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut x = [0; 16];
    x.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(x)
}

/// Appends a string as a u16 length and its bytes (callers cap the length).
pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}
