//! Fuzz target: the vsock device's packet handling (`host_vmm::virtio::vsock::Vsock`) with a
//! live host service behind port 5000, so that connected streams are reached, not only refusals.
//! That covers connection requests, data within and past the credit, credit updates, shutdowns
//! and resets, the service's own data coming back, and the receive and wait queues.
//!
//! The guest is a fake driver with a 64 KiB memory: a receive, a transmit and an event queue of
//! 8 entries each. The input is a sequence of operations:
//! - `0 flags len...`: send one packet, whose 44-byte header and payload come from the input.
//!   Flag bits can set the addresses right (guest CID 3 to host CID 2, stream type, port 5000)
//!   and the length field to the payload's, so that the fuzzer reaches past the first checks;
//! - `1 n size`: offer `n` receive buffers of `size` bytes, and notify the receive queue;
//! - `2`: notify the event queue (the guest waits for data);
//! - `3 at value`: the guest scribbles on its own rings.
//!
//! Whatever the guest sends must end in a packet, a reset or a device error; it may never panic
//! the host, and the host never buffers more than its caps.

#![no_main]

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use abi::devices::QueueState;
use abi::devices::vsock::WAIT_QUEUE;
use host_vmm::memory::GuestRam;
use host_vmm::virtio::DeviceModel;
use host_vmm::virtio::queue::Queue;
use host_vmm::virtio::vsock::{Services, Vsock};
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 64 << 10;
/// Each queue's rings start at its base: descriptors, then the available and used rings at
/// +0x200 and +0x400; its buffers follow at +0x800, 0x200 bytes each.
const BASES: [u64; 3] = [0x1000, 0x4000, 0x7000];
const HEADER_LEN: usize = 44;

/// A Unix socket service that greets every connection and keeps the last 64 open.
fn service() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("service.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let open: Mutex<VecDeque<UnixStream>> = Mutex::new(VecDeque::new());
            for stream in listener.incoming().flatten() {
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(b"welcome to the service\n");
                let mut open = open.lock().unwrap();
                if open.len() == 64 {
                    open.pop_front();
                }
                open.push_back(stream);
            }
        });
        path
    })
    .clone()
}

fn queue(base: u64) -> Queue {
    let mut queue = Queue::new(64);
    queue.state = QueueState {
        size: 8,
        ready: true,
        desc: base,
        avail: base + 0x200,
        used: base + 0x400,
        ..QueueState::default()
    };
    queue
}

/// The fake driver: how many buffers it has offered on each queue.
struct Driver {
    offered: [u16; 3],
}

impl Driver {
    /// Offers one buffer of `len` bytes on queue `q`, holding `bytes` (device-writable when
    /// `bytes` is empty).
    fn offer(&mut self, mem: &GuestRam, q: usize, bytes: &[u8], len: u32) {
        let base = BASES[q];
        let slot = self.offered[q] % 8;
        let addr = base + 0x800 + u64::from(slot) * 0x200;
        let _ = mem.write_slice(&bytes[..bytes.len().min(0x200)], GuestAddress(addr));
        let mut descriptor = [0u8; 16];
        descriptor[0..8].copy_from_slice(&addr.to_le_bytes());
        descriptor[8..12].copy_from_slice(&len.min(0x200).to_le_bytes());
        descriptor[12..14].copy_from_slice(&(if bytes.is_empty() { 2u16 } else { 0 }).to_le_bytes());
        let _ = mem.write_slice(&descriptor, GuestAddress(base + 16 * u64::from(slot)));
        let _ = mem.write_obj(slot, GuestAddress(base + 0x200 + 4 + 2 * u64::from(slot)));
        self.offered[q] = self.offered[q].wrapping_add(1);
        let _ = mem.write_obj(self.offered[q], GuestAddress(base + 0x200 + 2));
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let services = Services { ports: BTreeMap::from([(5000, service())]), uds_path: None };
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let mut queues: Vec<Queue> = BASES.iter().map(|&base| queue(base)).collect();
    let mut device = Vsock::new(services);
    let mut driver = Driver { offered: [0; 3] };
    let mut input = data;
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        let result = match op % 4 {
            0 => {
                let (Some(&flags), Some(&len)) = (input.first(), input.get(1)) else { break };
                let len = usize::from(len);
                let Some(packet) = input.get(2..2 + HEADER_LEN + len) else { break };
                input = &input[2 + HEADER_LEN + len..];
                let mut packet = packet.to_vec();
                if flags & 1 != 0 {
                    packet[0..8].copy_from_slice(&3u64.to_le_bytes()); // from the guest
                    packet[8..16].copy_from_slice(&2u64.to_le_bytes()); // to the host
                    packet[28..30].copy_from_slice(&1u16.to_le_bytes()); // a stream
                }
                if flags & 2 != 0 {
                    packet[20..24].copy_from_slice(&5000u32.to_le_bytes()); // the service's port
                }
                if flags & 4 != 0 {
                    packet[24..28].copy_from_slice(&(len as u32).to_le_bytes());
                }
                driver.offer(&mem, 1, &packet, packet.len() as u32);
                device.notify(1, &mut queues, &mem)
            }
            1 => {
                let (Some(&count), Some(&size)) = (input.first(), input.get(1)) else { break };
                input = &input[2..];
                for _ in 0..count % 8 {
                    driver.offer(&mem, 0, &[], u32::from(size) * 4);
                }
                device.notify(0, &mut queues, &mem)
            }
            2 => device.notify(u32::from(WAIT_QUEUE), &mut queues, &mem),
            _ => {
                let (Some(&at), Some(&value)) = (input.first(), input.get(1)) else { break };
                input = &input[2..];
                let ring = BASES[usize::from(at) % 3] + 0x200 * u64::from(at / 3 % 3);
                let _ = mem.write_obj(u16::from(value), GuestAddress(ring + 2));
                Ok(())
            }
        };
        if result.is_err() {
            break;
        }
    }
});
