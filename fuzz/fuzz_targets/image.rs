//! Fuzz target: a snapshot image's metadata as `thaw invoke`, `thaw restore` and `thaw serve`
//! open it (`host_vmm::Image::open`, then its I/O table): the header, the section table, the
//! vCPU records, the device-state and working-set sections, the memory ranges against the
//! file's length. Any input is refused with an error or opened; none may panic.
//!
//! The input is the file's first bytes (the metadata). The file is a sparse memfd as long as
//! the header says the file is (up to 64 GiB; it costs nothing), so that the memory ranges of a
//! real image fit. The metadata CRC is rewritten to match the mutated bytes, so that the checks
//! past it are fuzzed too.

#![no_main]

use std::io::Write;
use std::os::fd::FromRawFd;

/// Longest file an input may claim.
const MAX_FILE_LEN: u64 = 64 << 30;

fn fix_checksum(b: &mut [u8]) -> Option<()> {
    let len = usize::try_from(u64::from_le_bytes(b.get(40..48)?.try_into().ok()?)).ok()?;
    if len > b.len() || len < 52 {
        return None;
    }
    b[48..52].fill(0);
    let crc = abi::codec::crc32(&[&b[..len]]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    Some(())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut metadata = data.to_vec();
    let _ = fix_checksum(&mut metadata);
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"thaw-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&metadata).unwrap();
    let claimed = metadata.get(24..32).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let len = if claimed <= MAX_FILE_LEN { claimed.max(metadata.len() as u64) } else { metadata.len() as u64 };
    file.set_len(len).unwrap();
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{fd}"));
    if let Ok(image) = host_vmm::Image::open(&path) {
        let _ = image.io_table();
        let _ = image.stored_bytes();
    }
});
