//! Fuzz target: everything a guest can do to the host, through the one function that decides
//! every exit (`host_vmm::exit::ExitHandler::handle`). That is the hypercalls, with the invoke
//! mailbox and their payloads in guest memory, COM1, and the virtio-mmio registers and queues of
//! every device model: console, entropy, block and vsock, including vsock packets. They are
//! driven by fuzzed guest memory and a fuzzed sequence of exits. The devices are either new or
//! restored from a fuzzed device-state section, as an image would hand them over. Whatever the
//! guest does must end in an action or a guest error; it may never panic the host.
//!
//! Input: a flags byte (bit 0: restore the devices from state), a u16 memory length and a u16
//! state length, those bytes, then 8-byte operations: kind, target, a u16 offset and a u32
//! value.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use abi::devices::{DEVICE_WINDOW_GPA, DeviceKind, DeviceState, REGISTER_WINDOW_LEN};
use abi::hypercall::PORT_BASE;
use abi::qemu::COM1_PORT;
use host_vmm::exit::{ExitAction, ExitHandler};
use host_vmm::mailbox::Mailbox;
use host_vmm::memory::GuestRam;
use host_vmm::virtio::{Backends, ConsoleSink, Devices, VolumeFile, VolumeSource};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: the hypercall page, the parameters page and room for rings and buffers.
const MEMORY: usize = 256 << 10;
const KINDS: [DeviceKind; 4] = [DeviceKind::Console, DeviceKind::Entropy, DeviceKind::Block, DeviceKind::Vsock];

/// The backends: the console into memory, a 64 KiB volume file, no vsock services (every
/// connection is refused, after its packet is parsed).
fn backends() -> Backends {
    static VOLUME: OnceLock<Arc<std::fs::File>> = OnceLock::new();
    let volume = VOLUME.get_or_init(|| {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 10).unwrap();
        Arc::new(file)
    });
    Backends {
        console: ConsoleSink::Buffer(Arc::new(Mutex::new(Vec::new()))),
        volume: Some(VolumeSource { file: VolumeFile::Open(Arc::clone(volume)), offset: 0, len: 64 << 10 }),
        services: Default::default(),
    }
}

fn u16_at(b: &[u8], at: usize) -> usize {
    b.get(at..at + 2).map_or(0, |x| usize::from(u16::from_le_bytes([x[0], x[1]])))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (restore, memory_len, state_len) = (data[0] & 1 == 1, u16_at(data, 1), u16_at(data, 3));
    let rest = &data[5..];
    let memory_len = memory_len.min(rest.len());
    let (image, rest) = rest.split_at(memory_len);
    let state_len = state_len.min(rest.len());
    let (state, ops) = rest.split_at(state_len);

    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let mut devices = if restore {
        let Ok(states) = DeviceState::decode_all(state) else { return };
        match Devices::restore(&states, &backends(), &mem, 0) {
            Ok(devices) => devices,
            Err(_) => return,
        }
    } else {
        Devices::new(&KINDS, &backends()).unwrap()
    };
    let mut output = Vec::new();
    let mut mailbox = Mailbox::new(vec![b"{\"name\": \"fuzz\"}".to_vec()]);
    let mut handler = ExitHandler::new(&mem, &mut devices, &[], &mut output, &mut mailbox);
    for op in ops.chunks_exact(8) {
        let (kind, target, offset) = (op[0], op[1], u16_at(op, 2) as u64);
        let value = [op[4], op[5], op[6], op[7]];
        let window = DEVICE_WINDOW_GPA + u64::from(target % 4) * REGISTER_WINDOW_LEN + offset % 0x200;
        let mut read = [0u8; 4];
        let width = 1 + usize::from(target >> 6); // 1 to 4 bytes
        let result = match kind % 6 {
            0 => handler.handle(VcpuExit::IoOut(PORT_BASE + u16::from(target % 32), &value)),
            1 => handler.handle(VcpuExit::IoOut(COM1_PORT + u16::from(target % 8), &value[..1])),
            2 => handler.handle(VcpuExit::MmioWrite(window, &value[..width])),
            3 => handler.handle(VcpuExit::MmioRead(window, &mut read[..width])),
            4 => handler.handle(VcpuExit::IoIn(PORT_BASE + u16::from(target % 32), &mut read)),
            // The guest changes its own memory between exits (ring indexes, descriptors).
            _ => {
                let at = (offset * 4 + u64::from(target) * 0x4_0000) % MEMORY as u64;
                let _ = mem.write_slice(&value, GuestAddress(at));
                Ok(ExitAction::Continue)
            }
        };
        match result {
            Ok(ExitAction::Continue) => {}
            _ => break,
        }
    }
    let _ = handler.finish();
});
