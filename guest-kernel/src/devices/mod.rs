//! The guest's virtio devices: under thaw's VMM found by (kind, index) in its device table and
//! driven by the `virtio-drivers` crate over the MMIO transport, polled (the VMM serves each
//! notification before the notifying store returns), and set up once at boot so that a VM
//! restored from a snapshot finds them ready. Under QEMU the same drivers run over the PCI
//! transport against QEMU's own virtio devices (`pci.rs`), a reference for thaw's emulation.
//!
//! After a restore the VMM writes a fresh device table. A device it placed elsewhere is set up
//! again, from scratch, on its first use; a device at the same address is used as it was.
//!
//! - console: the kernel log and the function's stderr, when the VMM sets
//!   `abi::params::FLAG_CONSOLE_LOG` (otherwise they go to the log hypercall and the response);
//! - entropy: `random_get`, when the VM has the device;
//! - block: the function's data volume (`abi::volume`), whose directory is read at boot and
//!   whose files are read on demand (`crate::function::fs` serves them as `/data`);
//! - vsock: streams to host services (`vsock.rs`; `crate::function::sockets` serves them as
//!   preopened sockets). Under QEMU there is none: QEMU's vsock needs the host's vhost-vsock.

mod hal;
mod pci;
pub mod vsock;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use abi::devices::{DEVICE_TABLE_GPA, DeviceKind, DeviceTable, REGISTER_WINDOW_LEN};
use abi::iotable::HandleKind;
use abi::params::{FLAG_CONSOLE_LOG, HostParams};
use abi::volume::{self, Directory};
use spin::Mutex;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::SomeTransport;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

use crate::phys;
use crate::platform::{self, Platform};

pub use hal::ThawHal;

type Transport = SomeTransport<'static>;

/// `Device::gpa` of a device found on the PCI bus (QEMU), which is never relocated.
const ON_PCI: u64 = u64::MAX;
/// The virtio-mmio QueueNotify register's offset.
const QUEUE_NOTIFY: usize = 0x50;

/// Largest piece sent to the console at once (the VMM takes up to 64 KiB per buffer).
const CONSOLE_CHUNK: usize = 4096;

/// A driver and the register window it was set up at.
struct Device<D> {
    kind: DeviceKind,
    gpa: u64,
    driver: Option<D>,
}

// SAFETY: the drivers hold pointers to their register windows and DMA memory, which are valid
// from any context; the guest has one CPU, and every access goes through the `Mutex` below.
unsafe impl<D> Send for Device<D> {}

impl<D> Device<D> {
    const fn none(kind: DeviceKind) -> Self {
        Self { kind, gpa: 0, driver: None }
    }

    /// Follows the device to where `table` says it is; `false` if the VM has none.
    fn locate(&mut self, table: &DeviceTable) -> bool {
        match table.find(self.kind, 0) {
            Some(entry) if entry.gpa == self.gpa => true,
            Some(entry) => {
                // Moved (or new): set it up again on first use. Dropping the old driver would
                // touch the old window, which may now be another device's: forget it instead
                // (its few pages of queue memory stay allocated).
                core::mem::forget(self.driver.take());
                self.gpa = entry.gpa;
                true
            }
            None => {
                core::mem::forget(self.driver.take());
                self.gpa = 0;
                false
            }
        }
    }

    /// The driver, set up now if it is not yet; `None` if the VM has no such device or its
    /// setup failed.
    fn driver(&mut self, setup: fn(Transport) -> Option<D>) -> Option<&mut D> {
        if self.driver.is_none() && self.gpa != 0 && self.gpa != ON_PCI {
            // SAFETY: the VMM's device table (validated by `DeviceTable::decode`) says a device
            // window of this size is at `gpa`, inside the identity-mapped device window.
            let transport = unsafe {
                let header = hal::mmio_window(self.gpa);
                MmioTransport::new(header.cast::<VirtIOHeader>(), REGISTER_WINDOW_LEN as usize)
            };
            self.driver = transport.ok().and_then(|t| setup(t.into()));
        }
        self.driver.as_mut()
    }

    /// Takes a driver set up over PCI.
    fn found_on_pci(&mut self, driver: Option<D>) {
        self.gpa = ON_PCI;
        self.driver = driver;
    }
}

/// Notifies queue `queue` of the device at `gpa` directly, outside its driver (thaw's VMM only;
/// nothing for a device on PCI or none).
fn notify_queue(gpa: u64, queue: u16) {
    if gpa == 0 || gpa == ON_PCI {
        return;
    }
    // SAFETY: `gpa` is a register window from the VMM's validated device table, identity-mapped
    // and uncached; QueueNotify is a 32-bit register at an aligned offset inside it, and a store
    // there has no effect beyond the device's own queue processing.
    unsafe { hal::mmio_window(gpa).add(QUEUE_NOTIFY).cast::<u32>().as_ptr().write_volatile(queue.into()) }
}

static CONSOLE: Mutex<Device<VirtIOConsole<ThawHal, Transport>>> = Mutex::new(Device::none(DeviceKind::Console));
static ENTROPY: Mutex<Device<VirtIORng<ThawHal, Transport>>> = Mutex::new(Device::none(DeviceKind::Entropy));
static BLOCK: Mutex<Device<VirtIOBlk<ThawHal, Transport>>> = Mutex::new(Device::none(DeviceKind::Block));
/// The data volume's directory, read at boot.
static VOLUME: Mutex<Option<Directory>> = Mutex::new(None);
/// The VMM asked for the log and stderr on the console, and there is one.
static CONSOLE_LOG: AtomicBool = AtomicBool::new(false);

fn setup_console(t: Transport) -> Option<VirtIOConsole<ThawHal, Transport>> {
    VirtIOConsole::new(t).ok()
}

fn setup_entropy(t: Transport) -> Option<VirtIORng<ThawHal, Transport>> {
    VirtIORng::new(t).ok()
}

fn setup_block(t: Transport) -> Option<VirtIOBlk<ThawHal, Transport>> {
    VirtIOBlk::new(t).ok()
}

/// The VMM's current device table (empty outside thaw's VMM or when it wrote none).
pub fn table() -> DeviceTable {
    if platform::current() != Platform::Thaw {
        return DeviceTable::default();
    }
    let at = (phys::physical_memory_offset() + DEVICE_TABLE_GPA) as *const u8;
    // SAFETY: the device table lies in the host parameters page, guest RAM reserved for the
    // VMM, mapped through the physical-memory offset; the VMM wrote it before the guest ran.
    let bytes = unsafe { core::slice::from_raw_parts(at, DeviceTable::encoded_len(abi::devices::MAX_DEVICES)) };
    DeviceTable::decode(bytes).unwrap_or_default()
}

/// Finds the devices and sets up their drivers. Runs once, after the heap, at boot. The host
/// parameters' flags take effect when the function starts ([`set_params`]), under both
/// hypervisors alike (QEMU guests receive them only then).
pub fn init() {
    if platform::current() == Platform::Thaw {
        let table = table();
        if CONSOLE.lock().locate(&table) {
            let _ = CONSOLE.lock().driver(setup_console);
        }
        if ENTROPY.lock().locate(&table) {
            let _ = ENTROPY.lock().driver(setup_entropy);
        }
        BLOCK.lock().locate(&table);
        if vsock::VSOCK.lock().locate(&table) {
            let _ = vsock::VSOCK.lock().driver(vsock::setup);
        }
    } else {
        for (kind, transport) in pci::virtio_devices() {
            match kind {
                DeviceKind::Console => CONSOLE.lock().found_on_pci(setup_console(transport)),
                DeviceKind::Entropy => ENTROPY.lock().found_on_pci(setup_entropy(transport)),
                DeviceKind::Block => BLOCK.lock().found_on_pci(setup_block(transport)),
                DeviceKind::Vsock => {}
            }
        }
    }
    let transport = if platform::current() == Platform::Thaw { "mmio" } else { "pci" };
    for (name, found) in [
        ("console", CONSOLE.lock().driver.is_some()),
        ("entropy", ENTROPY.lock().driver.is_some()),
        ("block", BLOCK.lock().gpa != 0),
        ("vsock", vsock::VSOCK.lock().driver.is_some()),
    ] {
        if found {
            crate::println!("thaw-guest: virtio {name} ({transport})");
        }
    }
    if BLOCK.lock().gpa != 0 {
        match read_directory() {
            Ok(directory) => *VOLUME.lock() = Some(directory),
            Err(e) => crate::println!("thaw-guest: data volume: {e}"),
        }
    }
}

/// Takes the flags of the host parameters the function starts with.
pub fn set_params(params: &HostParams) {
    apply_flags(params);
}

/// Reads and validates the data volume's header and directory.
fn read_directory() -> Result<Directory, alloc::string::String> {
    let mut header = [0u8; volume::HEADER_LEN];
    if !volume_read(0, &mut header) {
        return Err("the block device could not be read".into());
    }
    let parsed = volume::parse_header(&header).map_err(|e| alloc::format!("{e}"))?;
    let mut dir = alloc::vec![0u8; parsed.directory_len as usize];
    if !volume_read(volume::HEADER_LEN as u64, &mut dir) {
        return Err("the block device could not be read".into());
    }
    volume::parse_directory(&parsed, &header, &dir).map_err(|e| alloc::format!("{e}"))
}

/// Runs `f` on the data volume's directory, if the VM has one.
pub fn with_volume<R>(f: impl FnOnce(&Directory) -> R) -> Option<R> {
    VOLUME.lock().as_ref().map(f)
}

/// Reads `out.len()` bytes of the data volume at byte `offset`; false if there is no block
/// device or a read failed.
pub fn volume_read(offset: u64, out: &mut [u8]) -> bool {
    const CHUNK: u64 = 64 << 10;
    let sector = volume::SECTOR;
    let mut block = BLOCK.lock();
    let Some(driver) = block.driver(setup_block) else { return false };
    let end = offset + out.len() as u64;
    let mut at = offset - offset % sector;
    let mut buffer = alloc::vec![0u8; CHUNK.min((end - at).next_multiple_of(sector)) as usize];
    while at < end {
        let len = CHUNK.min((end - at).next_multiple_of(sector)) as usize;
        if driver.read_blocks((at / sector) as usize, &mut buffer[..len]).is_err() {
            return false;
        }
        // Copy the part of this chunk that lies in [offset, end).
        let from = offset.max(at);
        let to = end.min(at + len as u64);
        out[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&buffer[(from - at) as usize..(to - at) as usize]);
        at += len as u64;
    }
    true
}

/// Makes sure the block device is usable (set up again if the VMM moved it); false if not.
pub fn block_ready() -> bool {
    BLOCK.lock().driver(setup_block).is_some()
}

/// Takes the restored VM's device table and flags: devices the VMM moved are set up again on
/// first use, and every open handle reconnects on its next use.
pub fn restored(params: &HostParams) {
    crate::iotable::restored();
    let table = table();
    CONSOLE.lock().locate(&table);
    ENTROPY.lock().locate(&table);
    BLOCK.lock().locate(&table);
    vsock::VSOCK.lock().locate(&table);
    apply_flags(params);
}

/// The function's stderr, when it goes to the console.
pub const STDERR_FD: u32 = 2;

fn apply_flags(params: &HostParams) {
    let wanted = params.flags & FLAG_CONSOLE_LOG != 0;
    let on = wanted && CONSOLE.lock().gpa != 0;
    CONSOLE_LOG.store(on, Ordering::Relaxed);
    match (on, crate::iotable::state(STDERR_FD)) {
        (true, None) => {
            crate::iotable::open(STDERR_FD, HandleKind::ConsoleStream, 0, 0, "");
        }
        (false, Some(_)) => crate::iotable::close(STDERR_FD),
        _ => {}
    }
}

/// True when the log and the function's stderr go to the console.
pub fn console_log() -> bool {
    CONSOLE_LOG.load(Ordering::Relaxed)
}

/// Writes the function's stderr to the console, reconnecting the stream first after a restore
/// (setting the console up again if the VMM moved it); false if that or the write failed.
pub fn stderr_write(bytes: &[u8]) -> bool {
    let reconnected = crate::iotable::reconnect(STDERR_FD, |_| {
        let mut console = CONSOLE.try_lock().ok_or(())?;
        console.driver(setup_console).map(|_| ()).ok_or(())
    });
    reconnected.is_ok() && console_write(bytes)
}

/// Writes `bytes` to the console; false if there is none or it failed.
pub fn console_write(bytes: &[u8]) -> bool {
    // `try_lock`: a panic while the console is busy must still reach the log hypercall.
    let Some(mut console) = CONSOLE.try_lock() else { return false };
    let Some(driver) = console.driver(setup_console) else { return false };
    // Through a heap buffer: the caller's bytes may be on a stack the physical-memory mapping
    // does not cover.
    let mut buffer = Vec::with_capacity(CONSOLE_CHUNK.min(bytes.len()));
    for chunk in bytes.chunks(CONSOLE_CHUNK) {
        buffer.clear();
        buffer.extend_from_slice(chunk);
        if driver.send_bytes(&buffer).is_err() {
            return false;
        }
    }
    true
}

/// Fills `out` from the entropy device; false if there is none or it failed.
pub fn entropy(out: &mut [u8]) -> bool {
    let mut entropy = ENTROPY.lock();
    let Some(driver) = entropy.driver(setup_entropy) else { return false };
    let mut buffer = alloc::vec![0u8; out.len().min(4096)];
    let mut filled = 0;
    while filled < out.len() {
        let want = (out.len() - filled).min(buffer.len());
        match driver.request_entropy(&mut buffer[..want]) {
            Ok(n) if n > 0 => {
                let n = n.min(want);
                out[filled..filled + n].copy_from_slice(&buffer[..n]);
                filled += n;
            }
            _ => return false,
        }
    }
    true
}
