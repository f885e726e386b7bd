//! Finding virtio devices on QEMU's PCI bus 0 through the legacy configuration ports
//! (`0xcf8`/`0xcfc`, opened to ring 3 by the TSS I/O bitmap). Only used outside thaw's VMM,
//! which has no PCI bus: there, those ports end the VM.

use alloc::vec::Vec;

use abi::devices::DeviceKind;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::SomeTransport;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};

use super::hal::ThawHal;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration access through the legacy I/O ports.
struct PortCam;

fn address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device) << 11)
        | (u32::from(df.function) << 8)
        | u32::from(offset & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        let value: u32;
        // SAFETY: the configuration ports only select and read PCI configuration registers;
        // the TSS bitmap opens them to ring 3 and the guest has one CPU.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") CONFIG_ADDRESS, in("eax") address(df, offset), options(nomem, nostack));
            core::arch::asm!("in eax, dx", in("dx") CONFIG_DATA, out("eax") value, options(nomem, nostack));
        }
        value
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as for `read_word`; the writes go to the device's configuration registers.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") CONFIG_ADDRESS, in("eax") address(df, offset), options(nomem, nostack));
            core::arch::asm!("out dx, eax", in("dx") CONFIG_DATA, in("eax") data, options(nomem, nostack));
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// Every virtio console, entropy and block device on bus 0, with memory decoding and bus
/// mastering enabled, as transports ready for a driver.
pub fn virtio_devices() -> Vec<(DeviceKind, SomeTransport<'static>)> {
    let mut root = PciRoot::new(PortCam);
    let functions: Vec<_> = root.enumerate_bus(0).collect();
    let mut found = Vec::new();
    for (df, info) in functions {
        let kind = match virtio_drivers::transport::pci::virtio_device_type(&info) {
            Some(DeviceType::Console) => DeviceKind::Console,
            Some(DeviceType::EntropySource) => DeviceKind::Entropy,
            Some(DeviceType::Block) => DeviceKind::Block,
            _ => continue,
        };
        root.set_command(df, Command::MEMORY_SPACE | Command::BUS_MASTER);
        if let Ok(transport) = PciTransport::new::<ThawHal, PortCam>(&mut root, df) {
            found.push((kind, transport.into()));
        }
    }
    found
}
