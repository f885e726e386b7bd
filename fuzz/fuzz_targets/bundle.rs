//! Fuzz target: a function bundle as `thaw invoke`, `thaw snapshot` and `thaw serve` load it
//! (`host_vmm::Function::from_bundle`): the header, the manifest, the wasm module's digest and
//! validation, the compiled code's digest, the data volume's digest and directory. Any input is refused with an error or
//! accepted; none may panic.
//!
//! Mutated bytes rarely keep a CRC or a SHA-256 right, which would stop every input at the
//! first check. So before loading, the target rewrites the digests the input claims to the
//! ones its bytes have, wherever the header's lengths say they are, and the checks past them
//! are fuzzed too. The digest checks themselves are covered by the unit tests.

#![no_main]

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Rewrites the wasm, code and volume SHA-256 in the manifest and the header's CRC to match the
/// bytes, where the header's lengths point inside the input.
fn fix_digests(b: &mut [u8]) -> Option<()> {
    let manifest_len = u32_at(b, 16)?;
    let wasm_len = u64_at(b, 24)?;
    let manifest_end = 64usize.checked_add(manifest_len)?;
    let wasm_end = manifest_end.checked_add(wasm_len)?;
    let code_len = u64_at(b, 52)?;
    let code_at = if code_len == 0 { wasm_end } else { wasm_end.checked_next_multiple_of(4096)? };
    let code_end = code_at.checked_add(code_len)?;
    let wasm = host_vmm::function::sha256(b.get(manifest_end..wasm_end)?);
    let code = host_vmm::function::sha256(b.get(code_at..code_end)?);
    let volume = host_vmm::function::sha256(b.get(code_end..)?);
    let name_len = usize::from(u16::from_le_bytes(b.get(64..66)?.try_into().ok()?));
    let wasm_digest = 66 + name_len;
    if wasm_digest + 32 <= manifest_end {
        b[wasm_digest..wasm_digest + 32].copy_from_slice(&wasm);
    }
    // The manifest ends with the code's digest, then (version 6) the filesystem settings, then
    // the volume's digest, each when present.
    let mut end = manifest_end;
    let volume_len = u64_at(b, 44)?;
    if volume_len > 0 && end >= wasm_digest + 64 {
        b[end - 32..end].copy_from_slice(&volume);
        end -= 32;
    }
    if u32_at(b, 8)? >= abi::bundle::FORMAT_VERSION_WITH_FILESYSTEM as usize {
        let settings = b.get(64..end).and_then(filesystem_len);
        end = settings.and_then(|len| end.checked_sub(len)).unwrap_or(0);
    }
    if code_len > 0 && end >= wasm_digest + 64 {
        b[end - 32..end].copy_from_slice(&code);
    }
    let crc = abi::codec::crc32(&[&b[..40], b.get(64..manifest_end)?]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    Some(())
}

/// The length of the filesystem settings that end a version 6 manifest without its volume
/// digest, as the manifest's own decoder reads them (the digests do not affect decoding).
fn filesystem_len(manifest: &[u8]) -> Option<usize> {
    let m = abi::bundle::Manifest::decode(manifest, abi::bundle::FORMAT_VERSION_WITH_FILESYSTEM).ok()?;
    let strings: usize = m.scratch_dirs.iter().chain([&m.data_mount]).map(|s| 2 + s.len()).sum();
    Some(4 + 2 + strings)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    let _ = fix_digests(&mut bytes);
    let _ = host_vmm::Function::from_bundle(bytes);
});
