//! The guest's virtio drivers (the `virtio-drivers` crate the guest kernel uses) against thaw's
//! device emulation, in one host process: a test HAL hands the drivers DMA memory from a fake
//! guest memory and bounce buffers for what they share, and a test transport turns each register
//! access into the MMIO access the VMM's exit handler would serve (`Devices::read`/`write`).
//! So the drivers see exactly what a guest sees, without a VM, and a snapshot of the devices'
//! state can be restored under a driver that keeps running.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use abi::devices::DeviceKind;
use host_vmm::memory::GuestRam;
use host_vmm::virtio::vsock::Services;
use host_vmm::virtio::{Backends, ConsoleSink, Devices, VolumeFile, VolumeSource};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::device::socket::{VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Size of the fake guest memory.
const MEMORY: u64 = 16 << 20;

/// The fake guest memory and its bump allocator, one per test thread (a HAL has no `self`).
struct Arena {
    mem: GuestRam,
    next: u64,
}

thread_local! {
    static ARENA: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

fn arena_memory() -> GuestRam {
    ARENA.with(|a| {
        let mut a = a.borrow_mut();
        let arena = a.get_or_insert_with(|| Arena {
            mem: GuestRam::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap(),
            next: PAGE_SIZE as u64,
        });
        arena.mem.clone()
    })
}

/// Allocates `len` bytes of guest memory, page-aligned; never freed (tests are short).
fn allocate(len: usize) -> u64 {
    arena_memory();
    ARENA.with(|a| {
        let mut a = a.borrow_mut();
        let arena = a.as_mut().unwrap();
        let gpa = arena.next;
        arena.next += (len.max(1) as u64).next_multiple_of(PAGE_SIZE as u64);
        assert!(arena.next <= MEMORY, "the test arena is full");
        gpa
    })
}

struct TestHal;

// SAFETY: DMA regions are disjoint, page-aligned ranges of the fake guest memory, mapped for the
// thread's lifetime, whose host address the drivers use and whose guest address the devices use:
// the same bytes. Shared buffers are copied into such a region (and back, for the device's
// writes), so the device never sees memory outside the fake guest memory.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let gpa = allocate(pages * PAGE_SIZE);
        let host = arena_memory().get_host_address(GuestAddress(gpa)).unwrap();
        (gpa, NonNull::new(host).unwrap())
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the test transport serves registers itself")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let gpa = allocate(len);
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the driver passes a buffer valid for reads of its length.
            let bytes = unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), len) };
            arena_memory().write_slice(bytes, GuestAddress(gpa)).unwrap();
        }
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the driver passes back the buffer it shared, valid for writes.
            let bytes = unsafe { std::slice::from_raw_parts_mut(buffer.as_ptr().cast::<u8>(), buffer.len()) };
            arena_memory().read_slice(bytes, GuestAddress(paddr)).unwrap();
        }
    }
}

/// A register window served by `Devices`, as the VMM's exit handler serves it.
struct TestTransport {
    devices: Rc<RefCell<Devices>>,
    mem: GuestRam,
    base: u64,
}

impl TestTransport {
    fn new(devices: &Rc<RefCell<Devices>>, kind: DeviceKind) -> Self {
        let base = devices.borrow().table().find(kind, 0).unwrap().gpa;
        Self { devices: devices.clone(), mem: arena_memory(), base }
    }

    fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.devices.borrow_mut().read(self.base + offset, &mut data).unwrap().unwrap();
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        let result = self.devices.borrow_mut().write(self.base + offset, &value.to_le_bytes(), &self.mem);
        result.unwrap().unwrap_or_else(|e| panic!("register {offset:#x} = {value:#x}: {e}"));
    }
}

impl Transport for TestTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.read(0x008)).unwrap()
    }

    fn read_device_features(&mut self) -> u64 {
        self.write(0x014, 0);
        let low = self.read(0x010);
        self.write(0x014, 1);
        u64::from(low) | (u64::from(self.read(0x010)) << 32)
    }

    fn write_driver_features(&mut self, features: u64) {
        self.write(0x024, 0);
        self.write(0x020, features as u32);
        self.write(0x024, 1);
        self.write(0x020, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write(0x030, queue.into());
        self.read(0x034)
    }

    fn notify(&mut self, queue: u16) {
        self.write(0x050, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.read(0x070))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write(0x070, status.bits());
    }

    fn set_guest_page_size(&mut self, _: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(&mut self, queue: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr) {
        self.write(0x030, queue.into());
        self.write(0x038, size);
        for (low, addr) in [(0x080, desc), (0x090, driver), (0x0a0, device)] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(0x044, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.write(0x030, queue.into());
        self.write(0x044, 0);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write(0x030, queue.into());
        self.read(0x044) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::from_bits_truncate(self.read(0x060))
    }

    fn read_config_generation(&self) -> u32 {
        self.read(0x0fc)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        let mut bytes = vec![0u8; size_of::<T>()];
        self.devices
            .borrow_mut()
            .read(self.base + 0x100 + offset as u64, &mut bytes)
            .unwrap()
            .map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(&bytes).map_err(|_| virtio_drivers::Error::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(&mut self, _: usize, _: T) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::Unsupported)
    }
}

fn devices(kinds: &[DeviceKind], backends: &Backends) -> Rc<RefCell<Devices>> {
    Rc::new(RefCell::new(Devices::new(kinds, backends).unwrap()))
}

#[test]
fn the_console_driver_writes_through_to_the_sink_and_attaches_it_once() {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let backends = Backends { console: ConsoleSink::Buffer(buffer.clone()), ..Backends::default() };
    let devices = devices(&[DeviceKind::Console], &backends);
    let mut console = VirtIOConsole::<TestHal, _>::new(TestTransport::new(&devices, DeviceKind::Console)).unwrap();
    assert_eq!(devices.borrow().stats()[0].attached_after, None, "setting the driver up attaches nothing");
    console.send_bytes(b"first line\n").unwrap();
    console.send_bytes(b"second line\n").unwrap();
    assert_eq!(buffer.lock().unwrap().as_slice(), b"first line\nsecond line\n");
    assert!(devices.borrow().stats()[0].attached_after.is_some());
}

#[test]
fn the_entropy_driver_gets_host_randomness_and_keeps_going_across_a_snapshot() {
    let devices = devices(&[DeviceKind::Entropy], &Backends::default());
    let mut rng = VirtIORng::<TestHal, _>::new(TestTransport::new(&devices, DeviceKind::Entropy)).unwrap();
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    assert_eq!(rng.request_entropy(&mut a).unwrap(), 64);
    assert_eq!(rng.request_entropy(&mut b).unwrap(), 64);
    assert_ne!(a, b);
    assert_ne!(a, [0u8; 64]);
    // Snapshot the transport state and restore it into new devices: the driver, whose rings live
    // in guest memory, goes on as if nothing happened.
    let states = devices.borrow().states();
    let restored = Devices::restore(&states, &Backends::default(), &arena_memory(), 0).unwrap();
    *devices.borrow_mut() = restored;
    assert_eq!(rng.request_entropy(&mut a).unwrap(), 64);
    assert_ne!(a, b);
}

#[test]
fn the_block_driver_reads_the_volume_region() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&[0xee; 512]).unwrap();
    for sector in 0..8u8 {
        file.write_all(&[sector; 512]).unwrap();
    }
    let volume = VolumeSource { file: VolumeFile::Path(file.path().into()), offset: 512, len: 8 * 512 };
    let devices = devices(&[DeviceKind::Block], &Backends { volume: Some(volume), ..Backends::default() });
    let mut blk = VirtIOBlk::<TestHal, _>::new(TestTransport::new(&devices, DeviceKind::Block)).unwrap();
    assert_eq!(blk.capacity(), 8);
    assert!(blk.readonly());
    let mut data = [0u8; 1024];
    blk.read_blocks(6, &mut data).unwrap();
    assert!(data[..512].iter().all(|&b| b == 6) && data[512..].iter().all(|&b| b == 7));
    assert!(blk.read_blocks(7, &mut data).is_err(), "a read past the end is an I/O error");
    assert!(blk.write_blocks(0, &data[..512]).is_err(), "the volume is read-only");
}

type Manager = VsockConnectionManager<TestHal, TestTransport, 4096>;

fn wait_for(manager: &mut Manager, devices: &Rc<RefCell<Devices>>, want: fn(&VsockEventType) -> bool) {
    let base = devices.borrow().table().find(DeviceKind::Vsock, 0).unwrap().gpa;
    for _ in 0..500 {
        if let Some(event) = manager.poll().unwrap() {
            if want(&event.event_type) {
                return;
            }
            continue;
        }
        // The guest's wait: notify the event queue (abi::devices::vsock::WAIT_QUEUE).
        let mem = arena_memory();
        devices.borrow_mut().write(base + 0x50, &2u32.to_le_bytes(), &mem).unwrap().unwrap();
    }
    panic!("no such event");
}

#[test]
fn the_vsock_driver_talks_to_a_unix_socket_service_within_credit() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("svc_7000")).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        // Far more than the stream's 8 KiB buffer: it has to flow on credit updates.
        let size: usize = line.trim().parse().unwrap();
        writer.write_all(&vec![b'z'; size]).unwrap();
    });
    let backends = Backends {
        services: Services { uds_path: Some(dir.path().join("svc")), ..Services::default() },
        ..Default::default()
    };
    let devices = devices(&[DeviceKind::Vsock], &backends);
    let driver = VirtIOSocket::<TestHal, _, 4096>::new(TestTransport::new(&devices, DeviceKind::Vsock)).unwrap();
    let mut manager = Manager::new_with_capacity(driver, 8192);
    assert_eq!(manager.guest_cid(), 3);

    let host = VsockAddr { cid: 2, port: 7000 };
    manager.connect(host, 1234).unwrap();
    wait_for(&mut manager, &devices, |e| *e == VsockEventType::Connected);
    manager.send(host, 1234, b"100000\n").unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while received.len() < 100_000 {
        let n = manager.recv(host, 1234, &mut chunk).unwrap();
        received.extend_from_slice(&chunk[..n]);
        if n == 0 {
            // Tell the device what was consumed, wait for more, and take every pending event
            // before reading again, as the guest kernel does: a device that sent past the
            // credit would overflow the stream's buffer here.
            manager.update_credit(host, 1234).unwrap();
            wait_for(&mut manager, &devices, |e| matches!(e, VsockEventType::Received { .. }));
            while manager.poll().unwrap().is_some() {}
        }
    }
    assert!(received.iter().all(|&b| b == b'z') && received.len() == 100_000);

    // A port nothing serves: the request is reset.
    manager.connect(VsockAddr { cid: 2, port: 7001 }, 1235).unwrap();
    wait_for(&mut manager, &devices, |e| matches!(e, VsockEventType::Disconnected { .. }));
}
