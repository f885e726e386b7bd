//! Fuzz target: the guest kernel ELF loader (`host_vmm::KernelImage::parse`): headers, segments,
//! the abi note and the bootloader config, all checked before anything is loaded. Any input is
//! refused with an error or accepted; none may panic. Seeded with a real kernel, stripped.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = host_vmm::KernelImage::parse(data);
});
