//! virtio-blk, read-only: the function's data volume, read from a region of a host file (the
//! bundle on a cold boot, the image after a restore) that is opened on the first read.
//!
//! Requests are checked before anything is read: a header of 16 bytes, a writable status byte,
//! reads of whole sectors (at most 1 MiB) inside the volume. A malformed request fails the VM; a
//! read outside the volume or a write gets an I/O error status, as a disk would answer.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::memory::GuestRam;
use abi::devices::DeviceKind;

use super::queue::Queue;
use super::{DeviceError, DeviceModel, VolumeFile, VolumeSource};

/// VIRTIO_BLK_F_RO: the device is read-only.
const F_RO: u64 = 1 << 5;
/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The sector size.
const SECTOR: u64 = 512;
/// Largest read one request may ask for.
const MAX_READ: u64 = 1 << 20;
/// What GET_ID answers.
const ID: &[u8] = b"thaw-data-volume";

/// The block device.
pub struct Block {
    source: Option<VolumeSource>,
    file: Option<File>,
    config: [u8; 24],
}

impl Block {
    /// A device over `source` (`None`: an empty disk, as after a restore without the volume).
    pub fn new(source: Option<VolumeSource>) -> Self {
        let sectors = source.as_ref().map_or(0, |s| s.len / SECTOR);
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        Self { source, file: None, config }
    }

    fn capacity(&self) -> u64 {
        self.source.as_ref().map_or(0, |s| s.len / SECTOR * SECTOR)
    }

    /// Reads `len` bytes at byte `at` of the volume.
    fn read(&mut self, at: u64, len: u64) -> Result<Vec<u8>, DeviceError> {
        self.attach()?;
        let (Some(file), Some(source)) = (&self.file, &self.source) else { return Ok(Vec::new()) };
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, source.offset + at).map_err(|e| DeviceError::Backend {
            kind: DeviceKind::Block,
            reason: format!("reading the volume: {e}"),
        })?;
        Ok(bytes)
    }

    /// Serves one request; returns its status and the data to return.
    fn request(&mut self, kind: u32, sector: u64, data_len: u64) -> Result<(u8, Vec<u8>), DeviceError> {
        Ok(match kind {
            T_IN => {
                let fits = sector
                    .checked_mul(SECTOR)
                    .and_then(|at| at.checked_add(data_len))
                    .is_some_and(|end| end <= self.capacity());
                if !data_len.is_multiple_of(SECTOR) || data_len > MAX_READ || !fits {
                    (S_IOERR, Vec::new())
                } else {
                    (S_OK, self.read(sector * SECTOR, data_len)?)
                }
            }
            T_OUT => (S_IOERR, Vec::new()),
            T_FLUSH => (S_OK, Vec::new()),
            T_GET_ID => (S_OK, ID[..ID.len().min(data_len as usize)].to_vec()),
            _ => (S_UNSUPP, Vec::new()),
        })
    }
}

impl DeviceModel for Block {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Block
    }

    fn features(&self) -> u64 {
        F_RO
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[64]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn notify(&mut self, index: u32, queues: &mut [Queue], mem: &GuestRam) -> Result<(), DeviceError> {
        let queue = super::queue(queues, index)?;
        while let Some(chain) = queue.pop(mem)? {
            let header = chain.read_all(mem, 16)?;
            if header.len() < 16 {
                return Err(DeviceError::State("block request header length", header.len() as u64));
            }
            let writable = chain.writable_len();
            if writable == 0 {
                return Err(DeviceError::State("block request without a status byte: writable length", 0));
            }
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            let (status, data) = self.request(kind, sector, writable - 1)?;
            let written = chain.write_at(mem, 0, &data)?;
            chain.write_at(mem, writable - 1, &[status])?;
            queue.add_used(mem, chain.head, written + 1)?;
        }
        Ok(())
    }

    fn attach(&mut self) -> Result<(), DeviceError> {
        if self.file.is_some() {
            return Ok(());
        }
        let Some(source) = &self.source else { return Ok(()) };
        let backend = |reason: String| DeviceError::Backend { kind: DeviceKind::Block, reason };
        let file = match &source.file {
            VolumeFile::Path(path) => File::open(path).map_err(|e| backend(format!("{}: {e}", path.display())))?,
            VolumeFile::Open(file) => {
                file.try_clone().map_err(|e| backend(format!("duplicating the volume's file: {e}")))?
            }
        };
        self.file = Some(file);
        Ok(())
    }

    fn attached(&self) -> bool {
        self.file.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{DATA, descriptor, memory, offer, ready_queue};
    use std::io::Write;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    /// A device over a 4-sector volume at offset 100 of a temporary file; sector n holds byte n.
    fn device() -> (Block, tempfile::NamedTempFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0xee; 100]).unwrap();
        for n in 0..4u8 {
            file.write_all(&[n; 512]).unwrap();
        }
        let source = VolumeSource { file: VolumeFile::Path(file.path().into()), offset: 100, len: 2048 };
        (Block::new(Some(source)), file)
    }

    /// Offers one request: header, `data_len` writable bytes, status byte. Returns the status.
    fn request(block: &mut Block, mem: &GuestRam, kind: u32, sector: u64, data_len: u32) -> u8 {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(DATA)).unwrap();
        descriptor(mem, 0, DATA, 16, NEXT, 1);
        descriptor(mem, 1, DATA + 0x100, data_len, WRITE | NEXT, 2);
        descriptor(mem, 2, DATA + 0x100 + u64::from(data_len), 1, WRITE, 0);
        offer(mem, &[0]);
        let mut q = ready_queue(8);
        block.notify(0, std::slice::from_mut(&mut q), mem).unwrap();
        mem.read_obj::<u8>(GuestAddress(DATA + 0x100 + u64::from(data_len))).unwrap()
    }

    #[test]
    fn reads_sectors_from_the_region_and_attaches_on_first_read() {
        let mem = memory();
        let (mut block, _file) = device();
        assert_eq!(&block.config()[0..8], &4u64.to_le_bytes());
        assert_eq!(request(&mut block, &mem, T_GET_ID, 0, 20), S_OK);
        assert!(!block.attached(), "GET_ID needs no backend");
        assert_eq!(request(&mut block, &mem, T_IN, 2, 1024), S_OK);
        assert!(block.attached());
        let mut data = vec![0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA + 0x100)).unwrap();
        assert!(data[..512].iter().all(|&b| b == 2) && data[512..].iter().all(|&b| b == 3));
    }

    #[test]
    fn out_of_range_partial_and_write_requests_get_an_error_status() {
        let mem = memory();
        let (mut block, _file) = device();
        assert_eq!(request(&mut block, &mem, T_IN, 3, 1024), S_IOERR, "past the end");
        assert_eq!(request(&mut block, &mem, T_IN, u64::MAX / 256, 512), S_IOERR, "sector overflows");
        assert_eq!(request(&mut block, &mem, T_IN, 0, 100), S_IOERR, "not whole sectors");
        assert_eq!(request(&mut block, &mem, T_OUT, 0, 512), S_IOERR, "read-only");
        assert_eq!(request(&mut block, &mem, 77, 0, 512), S_UNSUPP);
        assert!(!block.attached(), "refused requests attach nothing");
    }

    #[test]
    fn malformed_requests_fail_the_guest() {
        let mem = memory();
        let (mut block, _file) = device();
        descriptor(&mem, 0, DATA, 8, 0, 0);
        offer(&mem, &[0]);
        let e = block.notify(0, &mut [ready_queue(8)], &mem).unwrap_err();
        assert!(e.is_guest_error() && e.to_string().contains("header length"), "{e}");
        descriptor(&mem, 0, DATA, 16, 0, 0);
        let e = block.notify(0, &mut [ready_queue(8)], &mem).unwrap_err();
        assert!(e.to_string().contains("status byte"), "{e}");
    }

    #[test]
    fn an_open_file_is_duplicated_and_a_missing_one_is_a_backend_error() {
        let mem = memory();
        let (_, file) = device();
        let open = Arc::new(File::open(file.path()).unwrap());
        let mut block = Block::new(Some(VolumeSource { file: VolumeFile::Open(open), offset: 100, len: 2048 }));
        assert_eq!(request(&mut block, &mem, T_IN, 1, 512), S_OK);
        let missing = VolumeSource { file: VolumeFile::Path("/nonexistent/volume".into()), offset: 0, len: 512 };
        let e = Block::new(Some(missing)).attach().unwrap_err();
        assert!(!e.is_guest_error() && e.to_string().contains("/nonexistent/volume"), "{e}");
    }
}
