//! Device options of the commands that boot or restore a VM. Each command takes only the groups
//! it honours: `thaw run` and `thaw snapshot` boot ([`BootDevices`]), `thaw restore` restores
//! ([`RestoreDevices`]), and `thaw invoke` does either, so it takes both.

use std::path::{Path, PathBuf};

use abi::devices::DeviceKind;
use clap::Args;
use host_vmm::virtio::vsock::Services;
use host_vmm::virtio::{ConsoleSink, VolumeFile, VolumeSource};
use host_vmm::{Function, Image, VmConfig};

/// A device option that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// `--devices block`: the block device comes with a bundle's data volume.
    #[error("a block device comes with a data volume: pack the function with --data-dir")]
    BlockByHand,
    /// `--devices` names no device thaw has.
    #[error("unknown device {0:?}; known devices: console, entropy, vsock")]
    Unknown(String),
    /// `--service` is not `PORT=SOCKET`.
    #[error("{0:?} is not PORT=SOCKET")]
    NotService(String),
    /// `--service`'s port is not a number.
    #[error("{text:?}: port {port:?} is not a number")]
    ServicePort {
        /// The whole option.
        text: String,
        /// The port as given.
        port: String,
    },
    /// `--service`'s socket path is empty.
    #[error("{0:?}: the socket path is empty")]
    ServicePath(String),
    /// `--service`/`--vsock-uds` for a cold-booted VM without vsock.
    #[error(
        "--service/--vsock-uds: the VM has no vsock device (add --devices vsock, or pack the function with --connect)"
    )]
    NoVsock,
    /// `--service`/`--vsock-uds` for an image taken without vsock.
    #[error(
        "--service/--vsock-uds: the image has no vsock device (pack with --connect, or take the snapshot with --devices vsock)"
    )]
    ImageNoVsock,
    /// `--console` for an image taken without a console.
    #[error("--console: the image has no console device (take the snapshot with --devices console)")]
    ImageNoConsole,
    /// `--devices` for a restore.
    #[error("--devices applies to cold boots; a restored VM has the devices its image was taken with")]
    DevicesOnRestore,
    /// `--eager-devices` for a cold boot.
    #[error("--eager-devices applies to restores; a cold-booted VM attaches its devices as it boots")]
    EagerOnBoot,
    /// `--move-devices` for a cold boot.
    #[error("--move-devices applies to restores")]
    MoveOnBoot,
}

/// `--console`, `--service` and `--vsock-uds`: what the VM's devices reach on the host.
#[derive(Args, Debug, Default)]
pub struct Backends {
    /// Write what the guest sends to its virtio console to FILE ("-": thaw's stderr): the
    /// guest's log and, for a function, its stderr. A cold boot gains a console for it.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// The host Unix socket that the guest's vsock connections to PORT reach (repeatable).
    #[arg(long = "service", value_name = "PORT=SOCKET", value_parser = parse_service)]
    services: Vec<(u32, PathBuf)>,
    /// Connections to any other port P reach the Unix socket PATH_P (Firecracker's convention).
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
}

/// `--devices`: the devices a cold-booted VM starts with.
#[derive(Args, Debug, Default)]
pub struct BootDevices {
    /// Virtio devices to boot with, comma-separated: console, entropy, vsock. A function's
    /// bundle adds what it needs: block for its data volume, vsock for its --connect ports.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_kind)]
    devices: Vec<DeviceKind>,
}

/// `--eager-devices` (and the hidden `--move-devices`): how a restored VM's devices come back.
#[derive(Args, Debug, Default)]
pub struct RestoreDevices {
    /// Attach every device's backend when the VM is restored instead of on its first use (to
    /// measure what lazy attachment saves).
    #[arg(long)]
    eager_devices: bool,
    /// Place a restored VM's devices this many register windows further into the device
    /// window than the original VM had them (tests that guests follow moved devices).
    #[arg(long, value_name = "SLOTS", default_value_t = 0, hide = true)]
    move_devices: u64,
}

/// Parses a `--devices` entry.
pub fn parse_kind(name: &str) -> Result<DeviceKind, DevicesError> {
    match DeviceKind::from_name(name) {
        Some(kind @ (DeviceKind::Console | DeviceKind::Entropy | DeviceKind::Vsock)) => Ok(kind),
        Some(DeviceKind::Block) => Err(DevicesError::BlockByHand),
        None => Err(DevicesError::Unknown(name.into())),
    }
}

/// Parses a `--service PORT=SOCKET` entry.
fn parse_service(text: &str) -> Result<(u32, PathBuf), DevicesError> {
    let (port, path) = text.split_once('=').ok_or_else(|| DevicesError::NotService(text.into()))?;
    let port = port.parse().map_err(|_| DevicesError::ServicePort { text: text.into(), port: port.into() })?;
    if path.is_empty() {
        return Err(DevicesError::ServicePath(text.into()));
    }
    Ok((port, path.into()))
}

/// Gives a cold-booted VM for `function` (its bundle at `path`) the devices its bundle needs:
/// a block device over its data volume, and vsock for its service connections.
pub fn add_function_devices(config: &mut VmConfig, function: &Function, path: &Path) -> Result<(), DevicesError> {
    if let Some((offset, len)) = function.volume {
        config.devices.push(DeviceKind::Block);
        config.backends.volume = Some(VolumeSource { file: VolumeFile::Path(path.to_path_buf()), offset, len });
    }
    if !function.manifest.connections.is_empty() && !config.devices.contains(&DeviceKind::Vsock) {
        config.devices.push(DeviceKind::Vsock);
    }
    check_services(config)
}

/// `--service` and `--vsock-uds` reach the guest through its vsock device: without one they
/// would do nothing, so they are refused.
pub fn check_services(config: &VmConfig) -> Result<(), DevicesError> {
    let services = &config.backends.services;
    if (!services.ports.is_empty() || services.uds_path.is_some()) && !config.devices.contains(&DeviceKind::Vsock) {
        return Err(DevicesError::NoVsock);
    }
    Ok(())
}

impl BootDevices {
    /// Sets up `config` for a cold boot: these devices, and a console if `backends` writes one.
    pub fn apply(&self, backends: &Backends, config: &mut VmConfig) {
        config.devices = self.devices.clone();
        if backends.console.is_some() && !config.devices.contains(&DeviceKind::Console) {
            config.devices.push(DeviceKind::Console);
        }
        backends.apply(config);
    }

    /// Refuses `--devices` for a restore: a restored VM has the devices its image was taken with.
    pub fn refuse_on_restore(&self) -> Result<(), DevicesError> {
        if self.devices.is_empty() {
            return Ok(());
        }
        Err(DevicesError::DevicesOnRestore)
    }
}

impl RestoreDevices {
    /// Sets up `config` for a restore from `image`, which decides the devices (and holds the
    /// data volume, which the VMM finds there itself).
    pub fn apply(&self, backends: &Backends, config: &mut VmConfig, image: &Image) -> Result<(), DevicesError> {
        let devices = &image.devices;
        if backends.console.is_some() && !devices.iter().any(|d| d.kind == DeviceKind::Console as u16) {
            return Err(DevicesError::ImageNoConsole);
        }
        let has_vsock = devices.iter().any(|d| d.kind == DeviceKind::Vsock as u16);
        if (!backends.services.is_empty() || backends.vsock_uds.is_some()) && !has_vsock {
            return Err(DevicesError::ImageNoVsock);
        }
        config.device_slot = self.move_devices;
        config.eager_devices = self.eager_devices;
        backends.apply(config);
        Ok(())
    }

    /// Refuses these options for a cold boot, whose devices start attached where they are.
    pub fn refuse_on_boot(&self) -> Result<(), DevicesError> {
        match (self.eager_devices, self.move_devices) {
            (true, _) => Err(DevicesError::EagerOnBoot),
            (_, 1..) => Err(DevicesError::MoveOnBoot),
            _ => Ok(()),
        }
    }
}

impl Backends {
    fn apply(&self, config: &mut VmConfig) {
        config.backends.services =
            Services { ports: self.services.iter().cloned().collect(), uds_path: self.vsock_uds.clone() };
        if let Some(path) = &self.console {
            config.console_log = true;
            config.backends.console =
                if path.as_os_str() == "-" { ConsoleSink::Stderr } else { ConsoleSink::File(path.clone()) };
        }
    }
}
