//! Fuzz target: the small wire records a guest, an image or a bundle hands the host, each
//! decoded the way the host decodes it. The first byte picks the decoder; the rest is its
//! input. Any input is refused or decoded; none may panic.
//!
//! - 0: the I/O reconnection table (an image's, `abi::iotable::decode`), and its location;
//! - 1: the working-set section (`abi::workingset::decode`);
//! - 2: the device-state section (`DeviceState::decode_all`) and the device table;
//! - 3: the data volume (`abi::volume::parse`), a bundle's or an image's;
//! - 4: the bundle manifest, at every bundle version (`Manifest::decode`);
//! - 5: a hypercall (`Hypercall::decode`: port, then the access's bytes);
//! - 6: the mailbox records and the host parameters page;
//! - 7: the fault report, binary and as QEMU's text line, and QEMU's hex fields;
//! - 8: the kernel's abi note (`AbiNote::parse`).

#![no_main]

use abi::devices::{DeviceState, DeviceTable};
use abi::invoke::{NextReply, NextRequest, Response};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else { return };
    match which % 9 {
        0 => {
            let _ = abi::iotable::decode(input);
            let _ = abi::iotable::IoTableLocation::decode(input);
        }
        1 => {
            let _ = abi::workingset::decode(input);
        }
        2 => {
            let _ = DeviceState::decode_all(input);
            let _ = DeviceTable::decode(input);
        }
        3 => {
            let _ = abi::volume::parse(input);
        }
        4 => {
            for version in 1..=abi::bundle::FORMAT_VERSION_WITH_FILESYSTEM {
                let _ = abi::bundle::Manifest::decode(input, version);
            }
        }
        5 => {
            if let [lo, hi, access @ ..] = input {
                let _ = abi::hypercall::Hypercall::decode(u16::from_le_bytes([*lo, *hi]), access);
            }
        }
        6 => {
            let _ = NextRequest::decode(input);
            let _ = NextReply::decode(input);
            let _ = Response::decode(input);
            let _ = abi::params::HostParams::decode(input);
        }
        7 => {
            let _ = abi::fault::FaultReport::decode(input);
            if let Ok(text) = std::str::from_utf8(input) {
                let _ = abi::fault::FaultReport::parse_text(text);
                let _ = abi::qemu::parse_hex(text);
            }
        }
        _ => {
            let _ = abi::note::AbiNote::parse(input);
        }
    }
});
