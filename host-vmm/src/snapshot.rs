//! Snapshot images on the host: capturing a checkpointed VM into an image file, and opening one
//! for restore.
//!
//! The format is `abi::image` (docs/FORMAT.md). vCPU state is stored as KVM's own structures,
//! converted to and from bytes with zerocopy (no `unsafe`, and a record of the wrong size is an
//! error naming it). Memory is written sparsely: all-zero pages are never written, so they are
//! holes in the file and cost neither disk nor page cache. The file is written to a temporary
//! name, fsynced, made read-only and renamed into place: a reader never sees half an image.

use std::fs::File;
use std::io::Read;
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::guard::MappingGuard;
use crate::lazy::{Filler, Lazy, LazyStats, PageSource};
use crate::memory::{self, GuestRam};
use abi::devices::DeviceState;
use abi::image::{self, GuestMetadata, ImageInfo, ImageWriter, MemoryRange, VcpuRecord, record, vm_record};
use kvm_bindings::{Msrs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use kvm_ioctls::{SyncReg, VcpuFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap};
use zerocopy::{FromBytes, IntoBytes};

/// The MSRs a snapshot keeps: the TSC, and what a 64-bit kernel may have programmed.
const MSRS: [u32; 10] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// Why a snapshot could not be taken, written or opened.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The image file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The image is invalid.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: image::ImageError,
    },
    /// A vCPU record is missing or has the wrong size.
    #[error("image vcpu-state section: {0}")]
    Record(String),
    /// The image is valid but this VMM cannot restore it.
    #[error("{0}")]
    Incompatible(String),
    /// Guest memory could not be read or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A page of an image a peer holds could not be read from it: the VM that needed it
    /// cannot go on.
    #[error("restoring from {peer}: {why}")]
    Peer {
        /// The peer.
        peer: String,
        /// What failed.
        why: String,
    },
    /// Memory filled from a peer could not be set up.
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
    /// A restore head is malformed.
    #[error("{0}")]
    Head(String),
    /// The image file shrank (or lost pages) while its memory was mapped: the VM that found a
    /// page missing cannot go on, nor can later ones from the same file.
    #[error(
        "{}: the image file changed while VMs were restored from it ({now} bytes now, {needed} needed); replace it and restore again",
        path.display()
    )]
    Changed {
        /// The image.
        path: PathBuf,
        /// Its length now (0 when it cannot be read).
        now: u64,
        /// The length its memory needs.
        needed: u64,
    },
}

impl SnapshotError {
    /// This error with the file `draft` (a temporary name) called `destination`, the name the
    /// user gave: error messages never show temporary names.
    pub fn renamed(self, draft: &Path, destination: &Path) -> Self {
        let rename = |path: PathBuf| if path == draft { destination.to_path_buf() } else { path };
        match self {
            Self::Io { path, source } => Self::Io { path: rename(path), source },
            Self::Image { path, source } => Self::Image { path: rename(path), source },
            Self::Changed { path, now, needed } => Self::Changed { path: rename(path), now, needed },
            e => e,
        }
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, source }
}

/// Reads the vCPU's state into image records. The vCPU must be stopped with no instruction in
/// flight (see `Vm::run`'s checkpoint handling).
pub fn capture_vcpu(vcpu: &VcpuFd) -> Result<Vec<VcpuRecord>, SnapshotError> {
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let entries: Vec<kvm_msr_entry> = MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Record(format!("MSR list: {e:?}")))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    let msr_bytes: Vec<u8> = msrs.as_slice()[..read].iter().flat_map(|e| e.as_bytes().to_vec()).collect();
    Ok(vec![
        VcpuRecord { kind: record::REGS, bytes: regs.as_bytes().to_vec() },
        VcpuRecord { kind: record::SREGS, bytes: sregs.as_bytes().to_vec() },
        VcpuRecord { kind: record::XSAVE, bytes: xsave.region.as_bytes().to_vec() },
        VcpuRecord { kind: record::XCRS, bytes: xcrs.as_bytes().to_vec() },
        VcpuRecord { kind: record::MSRS, bytes: msr_bytes },
        VcpuRecord { kind: record::EVENTS, bytes: events.as_bytes().to_vec() },
        VcpuRecord { kind: record::MP_STATE, bytes: mp_state.as_bytes().to_vec() },
    ])
}

fn find<'a>(records: &'a [VcpuRecord], kind: u32, name: &str) -> Result<&'a [u8], SnapshotError> {
    records
        .iter()
        .find(|r| r.kind == kind)
        .map(|r| r.bytes.as_slice())
        .ok_or_else(|| SnapshotError::Record(format!("no {name} record")))
}

fn decode<T: FromBytes>(records: &[VcpuRecord], kind: u32, name: &str) -> Result<T, SnapshotError> {
    let bytes = find(records, kind, name)?;
    T::read_from_bytes(bytes).map_err(|_| {
        SnapshotError::Record(format!("{name} record is {} bytes, expected {}", bytes.len(), std::mem::size_of::<T>()))
    })
}

/// The CR3 the vCPU records hold: where the saved guest's page tables start.
pub fn saved_cr3(records: &[VcpuRecord]) -> Result<u64, SnapshotError> {
    Ok(decode::<kvm_sregs>(records, record::SREGS, "sregs")?.cr3)
}

/// Sets the vCPU's state from image records, validating each record's size first. With
/// `sync_regs`, the general registers and the pending events go in the vCPU's shared run
/// structure, and the next `KVM_RUN` applies them: each vCPU ioctl costs several microseconds
/// of trapped MSR reads under nested virtualization (docs/BENCHMARKS.md), and a kept VM does
/// this at every reset. Nothing reads them back before that run.
pub fn restore_vcpu(vcpu: &mut VcpuFd, records: &[VcpuRecord], sync_regs: bool) -> Result<(), SnapshotError> {
    let regs: kvm_regs = decode(records, record::REGS, "regs")?;
    let sregs: kvm_sregs = decode(records, record::SREGS, "sregs")?;
    let region: [u32; 1024] = decode(records, record::XSAVE, "xsave")?;
    let xcrs: kvm_xcrs = decode(records, record::XCRS, "xcrs")?;
    let events: kvm_vcpu_events = decode(records, record::EVENTS, "events")?;
    let mp_state: kvm_mp_state = decode(records, record::MP_STATE, "mp_state")?;
    let msr_bytes = find(records, record::MSRS, "msrs")?;
    let entries = <[kvm_msr_entry]>::ref_from_bytes(msr_bytes)
        .map_err(|_| SnapshotError::Record(format!("msrs record of {} bytes is not whole entries", msr_bytes.len())))?;
    if entries.len() > MSRS.len() {
        return Err(SnapshotError::Record(format!("{} MSRs, more than the {} thaw saves", entries.len(), MSRS.len())));
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let xsave = kvm_xsave { region, ..Default::default() };
    // SAFETY: `xsave` is a plain legacy-size kvm_xsave (no extra area); the kernel validates its
    // contents against the vCPU's supported features.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    let msrs = Msrs::from_entries(entries).map_err(|e| SnapshotError::Record(format!("MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        let index = entries.get(written).map_or(0, |e| e.index);
        return Err(SnapshotError::Record(format!("KVM refused MSR {index:#x} ({written} of {} set)", entries.len())));
    }
    vcpu.set_mp_state(mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    if sync_regs {
        let staged = vcpu.sync_regs_mut();
        staged.regs = regs;
        staged.events = events;
        vcpu.set_sync_dirty_reg(SyncReg::Register);
        vcpu.set_sync_dirty_reg(SyncReg::VcpuEvents);
        return Ok(());
    }
    vcpu.set_vcpu_events(&events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// What writing an image produced.
#[derive(Debug, Clone, Copy)]
pub struct WriteStats {
    /// Guest memory described, in bytes.
    pub guest_memory: u64,
    /// Pages written (the rest are holes).
    pub pages_written: u64,
    /// The file's length (its apparent size; holes take no disk).
    pub file_len: u64,
}

/// The VM-state records for `devices` (none when there are no devices).
pub fn device_records(devices: &[DeviceState]) -> Vec<VcpuRecord> {
    if devices.is_empty() {
        return Vec::new();
    }
    vec![VcpuRecord { kind: vm_record::DEVICES, bytes: DeviceState::encode_all(devices) }]
}

/// Everything an image holds besides memory and the data volume.
#[derive(Debug)]
pub struct State {
    /// The captured vCPU state.
    pub vcpu: Vec<VcpuRecord>,
    /// The VM-state records.
    pub vm: Vec<VcpuRecord>,
    /// The guest's metadata.
    pub guest: GuestMetadata,
    /// The recorded working set (empty for none).
    pub working_set: Vec<abi::workingset::Run>,
}

/// Writes an image of `mem`, `state` and the data volume (empty for none) to `path`,
/// atomically and read-only.
pub fn write_image(
    path: &Path,
    mem: &GuestRam,
    mem_size: u64,
    state: State,
    volume: &[u8],
) -> Result<WriteStats, SnapshotError> {
    let io = |source| SnapshotError::Io { path: path.to_path_buf(), source };
    let writer = ImageWriter {
        vcpu: state.vcpu,
        vm: state.vm,
        guest: state.guest,
        memory: vec![MemoryRange { gpa: 0, len: mem_size, file_offset: 0 }],
        volume_len: volume.len() as u64,
        working_set: state.working_set,
    };
    let (metadata, layout) = writer.encode(mem_size);
    let data_start = layout.data_start;
    let destination = crate::files::destination(path).map_err(io)?;
    let draft = crate::files::Draft::beside(&destination).map_err(io)?;
    let file = draft.file();
    file.write_all_at(&metadata, 0).map_err(io)?;
    let mut page = vec![0u8; image::PAGE_SIZE as usize];
    let mut pages_written = 0;
    for gpa in (0..mem_size).step_by(image::PAGE_SIZE as usize) {
        mem.read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| SnapshotError::Memory(format!("reading {gpa:#x}: {e}")))?;
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(&page, data_start + gpa).map_err(io)?;
            pages_written += 1;
        }
    }
    if !volume.is_empty() {
        file.write_all_at(volume, layout.volume_start).map_err(io)?;
    }
    let file_len = layout.file_len;
    file.set_len(file_len).map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(io)?;
    file.sync_all().map_err(io)?;
    draft.persist(&destination).map_err(io)?;
    Ok(WriteStats { guest_memory: mem_size, pages_written, file_len })
}

/// What a peer that holds an image sends first, the restore head: what an image a peer holds
/// is made of here ([`Image::from_head`]). Its format, and how it is made and checked, are
/// `crate::remote`'s; only a head made there (of an image, or decoded and checked) exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The image file's length.
    pub(crate) file_len: u64,
    /// The image's metadata, as at the start of its file.
    pub(crate) metadata: Vec<u8>,
    /// Runs of pages that are not zero in the image (first page, count).
    pub(crate) nonzero: Vec<(u64, u64)>,
    /// Runs of pages whose bytes came with the head.
    pub(crate) sent: Vec<(u64, u64)>,
    /// Their bytes, in run order.
    pub(crate) pages: Vec<u8>,
    /// The data volume (empty when the image has none).
    pub(crate) volume: Vec<u8>,
}

/// An opened, fully validated image.
#[derive(Debug)]
pub struct Image {
    file: Arc<File>,
    path: PathBuf,
    /// Its metadata.
    pub info: ImageInfo,
    /// The virtio devices' transport state, decoded from the VM-state section.
    pub devices: Vec<DeviceState>,
    /// What restores from this image made once and share.
    made: Made,
    /// What fills its memory when a peer holds the image ([`Image::from_head`]).
    peer: Option<Arc<Filler>>,
}

/// Most spare memory mappings an image keeps for fresh VMs ([`Image::take_spare`]): one per
/// fresh VM that runs at once is enough, and each keeps its private pages.
const MAX_SPARES: usize = 16;

/// What the VMs restored from one image made once and share.
#[derive(Debug, Default)]
struct Made {
    /// The image's memory mapped read-only: what changed pages are copied back from.
    original: OnceLock<(MemoryWatch, MmapRegion)>,
    /// The working set's guest-physical ranges (start, length), empty when the image's tables
    /// do not map it.
    working_set_ranges: OnceLock<Vec<(u64, u64)>>,
    /// Memory of fresh VMs that are gone, put back to the image's bytes.
    spares: Mutex<Vec<(MemoryWatch, GuestRam)>>,
    /// The restore head a peer is sent ([`crate::remote::encoded_head`]).
    head: OnceLock<Arc<Vec<u8>>>,
}

/// Watches one mapping of an image's memory for pages that vanish from the file under it
/// ([`crate::guard`]): a truncated image costs the VMs that use it one clear error each, not
/// the process.
#[derive(Debug)]
pub(crate) struct MemoryWatch {
    guard: MappingGuard,
    file: Arc<File>,
    path: PathBuf,
    needed: u64,
    /// The fault handler of a mapping of an image a peer holds, while the image is not all
    /// here.
    lazy: Option<Lazy>,
}

impl MemoryWatch {
    /// [`SnapshotError::Changed`] when a page of the mapping vanished from the file while the
    /// host touched it, or, when the caller has a reason to suspect it (`KVM_RUN`'s `EFAULT`,
    /// a guest that ended oddly), when the file is now shorter than the memory it maps. The
    /// file's length is looked at only then: the request path pays one atomic load.
    pub(crate) fn check(&self, suspect: bool) -> Result<(), SnapshotError> {
        let damaged = self.guard.damaged();
        if let Some(lazy) = &self.lazy {
            let failure = lazy.failure();
            if damaged || failure.is_some() {
                let why = failure.unwrap_or_else(|| "a page could not be read".into());
                return Err(SnapshotError::Peer { peer: self.path.display().to_string(), why });
            }
            return Ok(());
        }
        if !damaged && !suspect {
            return Ok(());
        }
        let now = self.file.metadata().map_or(0, |m| m.len());
        if damaged || now < self.needed {
            return Err(SnapshotError::Changed { path: self.path.clone(), now, needed: self.needed });
        }
        Ok(())
    }
}

impl Image {
    /// Opens `path` read-only (a regular file only: it is mapped) and validates everything but
    /// the memory bytes, checking the file's length before anything is mapped.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let io = |source| SnapshotError::Io { path: path.to_path_buf(), source };
        let mut file = crate::files::open_regular(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // The header says how long the metadata is: read that much, not the 16 MiB it may be
        // at most (a few KiB for a real image), and let the parser judge the length.
        let mut metadata = Vec::new();
        let header = image::HEADER_LEN as u64;
        (&mut file).take(header).read_to_end(&mut metadata).map_err(io)?;
        let declared = metadata.get(40..48).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
        let want = declared.clamp(header, file_len.min(image::MAX_METADATA_BYTES).max(header));
        (&mut file).take(want - metadata.len() as u64).read_to_end(&mut metadata).map_err(io)?;
        Self::validated(file, path.to_path_buf(), &metadata, file_len)
    }

    /// Validates an image whose first bytes are `metadata` and whose file is `file_len` bytes:
    /// everything but the memory bytes.
    fn validated(file: File, path: PathBuf, metadata: &[u8], file_len: u64) -> Result<Self, SnapshotError> {
        let path = path.as_path();
        let info = image::parse(metadata, file_len)
            .map_err(|source| SnapshotError::Image { path: path.to_path_buf(), source })?;
        if !(abi::OLDEST_IMAGE_INTERFACE_VERSION..=abi::INTERFACE_VERSION).contains(&info.guest.interface_version) {
            return Err(SnapshotError::Incompatible(format!(
                "{}: the image's guest speaks thaw interface version {}, this VMM restores versions {} to {}; take the snapshot again",
                path.display(),
                info.guest.interface_version,
                abi::OLDEST_IMAGE_INTERFACE_VERSION,
                abi::INTERFACE_VERSION
            )));
        }
        if info.memory.len() != 1 || info.memory[0].gpa != 0 {
            return Err(SnapshotError::Incompatible(format!(
                "{}: this thaw restores images with one memory range starting at 0, not {} ranges",
                path.display(),
                info.memory.len()
            )));
        }
        let mut devices = Vec::new();
        for r in &info.vm {
            match r.kind {
                vm_record::DEVICES => {
                    devices = DeviceState::decode_all(&r.bytes).map_err(|e| {
                        SnapshotError::Incompatible(format!("{}: image vm-state section: {e}", path.display()))
                    })?
                }
                other => {
                    return Err(SnapshotError::Incompatible(format!(
                        "{}: image vm-state record kind {other} is not one this thaw knows",
                        path.display()
                    )));
                }
            }
        }
        Ok(Self { file: Arc::new(file), path: path.to_path_buf(), info, devices, made: Made::default(), peer: None })
    }

    /// Reads `len` bytes of the image's guest memory at `gpa` (holes read as zeros), after
    /// checking the range lies inside one memory range of the image.
    pub fn read_guest(&self, gpa: u64, len: u64) -> Result<Vec<u8>, SnapshotError> {
        let range = self
            .info
            .memory
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|end| end <= r.gpa + r.len))
            .ok_or_else(|| {
                SnapshotError::Memory(format!("{len} bytes at {gpa:#x} are outside the image's guest memory"))
            })?;
        let mut bytes = vec![0; len as usize];
        self.file
            .read_exact_at(&mut bytes, range.file_offset + (gpa - range.gpa))
            .map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
        Ok(bytes)
    }

    /// The guest's I/O reconnection table as it was at the checkpoint (empty when the guest
    /// kept none), validated.
    pub fn io_table(&self) -> Result<Vec<abi::iotable::Handle>, SnapshotError> {
        let guest = &self.info.guest;
        if guest.io_table_len == 0 {
            return Ok(Vec::new());
        }
        if guest.io_table_len > abi::iotable::TABLE_LEN as u64 {
            return Err(SnapshotError::Incompatible(format!(
                "{}: the I/O table is {} bytes, more than {}",
                self.path.display(),
                guest.io_table_len,
                abi::iotable::TABLE_LEN
            )));
        }
        let bytes = self.read_guest(guest.io_table_gpa, guest.io_table_len)?;
        abi::iotable::decode(&bytes).map_err(|e| SnapshotError::Incompatible(format!("{}: {e}", self.path.display())))
    }

    /// An image a peer holds, from the restore head it sent (`crate::remote`): a memfd holds
    /// the metadata, the pages that came with the head and the data volume, at their places in
    /// the file, and every other page is read from `source` into it, when a VM touches it and,
    /// with `prefetch`, by a prefetcher meanwhile ([`crate::lazy`]). Validated as [`Image::open`] validates a
    /// file. Such an image restores fresh and pooled VMs, not kept ones: a reset copies pages
    /// back from the image, which is not all here.
    pub fn from_head(head: Head, source: Arc<dyn PageSource>, prefetch: bool) -> Result<Image, SnapshotError> {
        let info = image::parse(&head.metadata, head.file_len)
            .map_err(|e| SnapshotError::Head(format!("restore head from {}: {e}", source.describe())))?;
        let path = PathBuf::from(source.describe());
        let io = |source| SnapshotError::Io { path: path.clone(), source };
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("thaw-peer-image")
            .map_err(|e| io(std::io::Error::other(e)))?;
        let file = memfd.as_file();
        file.set_len(head.file_len).map_err(io)?;
        file.write_all_at(&head.metadata, 0).map_err(io)?;
        let memory = info.memory[0].file_offset;
        let mut at = 0;
        for &(first, count) in &head.sent {
            let len = (count * image::PAGE_SIZE) as usize;
            file.write_all_at(&head.pages[at..at + len], memory + first * image::PAGE_SIZE).map_err(io)?;
            at += len;
        }
        if let Some((offset, _)) = info.volume {
            file.write_all_at(&head.volume, offset).map_err(io)?;
        }
        // Its length is fixed; its memory is written as pages arrive.
        use memfd::FileSeal::{SealGrow, SealSeal, SealShrink};
        memfd.add_seals(&[SealGrow, SealShrink, SealSeal]).map_err(|e| io(std::io::Error::other(e)))?;
        let file = Arc::new(memfd.into_file());
        let pages = info.guest_memory_size() / image::PAGE_SIZE;
        let filler = Filler::start(Arc::clone(&file), (memory, pages), head.nonzero, &head.sent, source, prefetch)?;
        let mut image = Self::validated(file.try_clone().map_err(io)?, path, &head.metadata, head.file_len)?;
        image.file = file;
        image.peer = Some(Arc::new(filler));
        Ok(image)
    }

    /// Where the encoded restore head is kept once made.
    pub(crate) fn head_cache(&self) -> &OnceLock<Arc<Vec<u8>>> {
        &self.made.head
    }

    /// Whether a peer holds this image's memory ([`Image::from_head`]).
    pub fn is_remote(&self) -> bool {
        self.peer.is_some()
    }

    /// For an image a peer holds: waits until all of it is here (true), a read failed, or
    /// `timeout` passed (false). True at once for any other image.
    pub fn wait_complete(&self, timeout: std::time::Duration) -> bool {
        self.peer.as_ref().is_none_or(|filler| filler.wait_complete(timeout))
    }

    /// Writes this image, once all of it is here, to `path` as `thaw snapshot` writes one: to a
    /// draft beside it, zero pages as holes, synced, read-only, then renamed into place. For an
    /// image a peer holds, this is the local file later VMs are restored from.
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        let io = |source| SnapshotError::Io { path: path.to_path_buf(), source };
        if !self.wait_complete(std::time::Duration::ZERO) {
            return Err(SnapshotError::Memory(format!("{}: not all of the image is here yet", self.path.display())));
        }
        let destination = crate::files::destination(path).map_err(io)?;
        let draft = crate::files::Draft::beside(&destination).map_err(io)?;
        let file = draft.file();
        self.copy_stored(|bytes, at| {
            // Pages a VM read from a hole are zero pages of the memfd: holes again here.
            for (i, page) in bytes.chunks(image::PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, at + (i * image::PAGE_SIZE as usize) as u64).map_err(io)?;
                }
            }
            Ok(())
        })?;
        file.set_len(self.file_len()?).map_err(io)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(io)?;
        file.sync_all().map_err(io)?;
        draft.persist(&destination).map_err(io)?;
        Ok(())
    }

    /// For an image a peer holds: why a read of its pages failed, if one did (then the rest of
    /// it will not arrive).
    pub fn peer_failure(&self) -> Option<String> {
        self.peer.as_ref().and_then(|filler| filler.failure())
    }

    /// For an image a peer holds: what was read from the peer so far.
    pub fn peer_stats(&self) -> Option<LazyStats> {
        self.peer.as_ref().map(|filler| filler.stats())
    }

    /// `len` bytes of the image file at `offset`.
    pub(crate) fn read_file(&self, offset: u64, len: u64) -> Result<Vec<u8>, SnapshotError> {
        let mut bytes = vec![0; len as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
        Ok(bytes)
    }

    /// The image file's length now.
    pub(crate) fn file_len(&self) -> Result<u64, SnapshotError> {
        self.file.metadata().map(|m| m.len()).map_err(|source| SnapshotError::Io { path: self.path.clone(), source })
    }

    /// The open image file (shared; a restored VM's block device reads the data volume from
    /// it at `info.volume`).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Bytes of memory data actually stored (not holes), found without reading the data.
    pub fn stored_bytes(&self) -> Result<u64, SnapshotError> {
        Ok(self.data_extents(false)?.iter().map(|(start, end)| end - start).sum())
    }

    /// The image's path (`memfd:…` for a template).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads this image into an in-memory template (Catalyzer's sfork): a sealed memfd holding
    /// the same bytes, holes included. Children restore from it through the same path as from a
    /// file ([`Vm::restore`](crate::Vm::restore)), with no disk and no filesystem in the way.
    pub fn to_template(&self) -> Result<Image, SnapshotError> {
        let path = PathBuf::from(format!("memfd:thaw-template:{}", self.info.guest.function_name));
        let io = |source| SnapshotError::Io { path: path.clone(), source };
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("thaw-template")
            .map_err(|e| io(std::io::Error::other(e)))?;
        let file_len = self.file.metadata().map_err(io)?.len();
        memfd.as_file().set_len(file_len).map_err(io)?;
        self.copy_stored(|bytes, at| memfd.as_file().write_all_at(bytes, at).map_err(io))?;
        use memfd::FileSeal::{SealGrow, SealSeal, SealShrink, SealWrite};
        memfd.add_seals(&[SealWrite, SealGrow, SealShrink, SealSeal]).map_err(|e| io(std::io::Error::other(e)))?;
        Ok(Image {
            file: Arc::new(memfd.into_file()),
            path,
            info: self.info.clone(),
            devices: self.devices.clone(),
            made: Made::default(),
            peer: self.peer.clone(),
        })
    }

    /// Hands `write` the metadata, then only the stored (non-hole) memory data and volume, each
    /// piece (1 MiB at most) with its offset in the file.
    fn copy_stored(&self, mut write: impl FnMut(&[u8], u64) -> Result<(), SnapshotError>) -> Result<(), SnapshotError> {
        let mut chunks = vec![(0, self.info.metadata_len)];
        chunks.extend(self.data_extents(true)?);
        let mut buf = vec![0u8; 1 << 20];
        for (start, end) in chunks {
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                self.file
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
                write(&buf[..n], at)?;
                at += n as u64;
            }
        }
        Ok(())
    }

    /// The (start, end) file ranges of memory data (and, with `volume`, of the data volume)
    /// actually stored, via `SEEK_DATA`/`SEEK_HOLE`.
    pub(crate) fn data_extents(&self, volume: bool) -> Result<Vec<(u64, u64)>, SnapshotError> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut extents = Vec::new();
        let volume = self.info.volume.filter(|_| volume);
        let regions = self.info.memory.iter().map(|r| (r.file_offset, r.len)).chain(volume);
        for (start, len) in regions {
            let end = (start + len) as i64;
            let mut at = start as i64;
            while at < end {
                // SAFETY: lseek on our own open descriptor; it only moves the file offset.
                let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
                if data < 0 || data >= end {
                    break; // ENXIO: no data after `at`
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
                let hole = if hole < 0 { end } else { hole.min(end) };
                extents.push((data as u64, hole as u64));
                at = hole;
            }
        }
        Ok(extents)
    }

    /// Maps the image's memory copy-on-write: pages come from the shared page cache, writes go
    /// to private memory, and the file is never written. Drop the watch before the mapping
    /// (tuples and structs drop their fields in order).
    pub(crate) fn map_memory(&self) -> Result<(MemoryWatch, GuestRam), SnapshotError> {
        let len = self.info.memory[0].len as usize;
        let bitmap = AtomicBitmap::new(len, NonZeroUsize::new(image::PAGE_SIZE as usize).unwrap_or(NonZeroUsize::MIN));
        let (mut watch, region) = self.map(libc::PROT_READ | libc::PROT_WRITE, bitmap)?;
        if let Some(filler) = &self.peer {
            watch.lazy = filler.attach(region.as_ptr() as u64)?;
        }
        let fail = |e: String| SnapshotError::Memory(format!("{}: {e}", self.path.display()));
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| fail("address overflow".into()))?;
        Ok((watch, GuestRam::from_regions(vec![region]).map_err(|e| fail(e.to_string()))?))
    }

    /// The image's memory, mapped read-only once and shared by every VM restored from this
    /// image: what a kept VM's changed pages are copied back from. An image a peer holds has
    /// none.
    pub fn original_memory(&self) -> Result<&MmapRegion, SnapshotError> {
        if self.peer.is_some() {
            return Err(SnapshotError::Incompatible(format!(
                "{}: a kept VM is reset from its image's bytes, which are not on this node; restore from a peer in fresh or pool mode",
                self.path.display()
            )));
        }
        if let Some((_, region)) = self.made.original.get() {
            return Ok(region);
        }
        let mapped = self.map(libc::PROT_READ, ())?;
        Ok(&self.made.original.get_or_init(|| mapped).1)
    }

    /// [`SnapshotError::Changed`] when a page the original mapping ([`Image::original_memory`])
    /// read had vanished from the file: what was copied from it is zeros, not the image.
    pub(crate) fn check_original(&self) -> Result<(), SnapshotError> {
        self.made.original.get().map_or(Ok(()), |(watch, _)| watch.check(false))
    }

    /// The guest-physical ranges behind the working set, found by `find` the first time.
    pub(crate) fn working_set_ranges(&self, find: impl FnOnce() -> Vec<(u64, u64)>) -> &[(u64, u64)] {
        self.made.working_set_ranges.get_or_init(find)
    }

    /// A mapping of this image's memory that an earlier fresh VM used and
    /// [`put_back`](Image::put_back) restored to the image's bytes, if one is spare.
    pub(crate) fn take_spare(&self) -> Option<(MemoryWatch, GuestRam)> {
        self.made.spares.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Takes back the memory of a VM restored from this image once the VM is gone: every page
    /// no longer the file's is copied back from the image ([`memory::reset_to_image`]), and the
    /// mapping is kept for the next fresh VM, its private pages still mapped. A mapping that
    /// cannot be reset, one past [`MAX_SPARES`], or one of a file that changed, is unmapped
    /// instead.
    pub(crate) fn put_back(&self, watch: MemoryWatch, mem: GuestRam) {
        if self.peer.is_some() || self.spares() >= MAX_SPARES || watch.check(false).is_err() {
            return;
        }
        let Ok(original) = self.original_memory() else { return };
        if memory::reset_to_image(&mem, original).is_ok() && self.check_original().is_ok() {
            let mut spares = self.made.spares.lock().unwrap_or_else(|p| p.into_inner());
            if spares.len() < MAX_SPARES {
                spares.push((watch, mem));
            }
        }
    }

    /// How many mappings are spare (see [`Image::take_spare`]).
    pub fn spares(&self) -> usize {
        self.made.spares.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Maps the image's memory with `prot`, private, and guards the mapping ([`MemoryWatch`]).
    fn map<B: vm_memory::bitmap::Bitmap>(
        &self,
        prot: i32,
        bitmap: B,
    ) -> Result<(MemoryWatch, MmapRegion<B>), SnapshotError> {
        let range = self.info.memory[0];
        let fail =
            |e: String| SnapshotError::Memory(format!("{}: mapping {:#x} bytes: {e}", self.path.display(), range.len));
        let file = self.file.try_clone().map_err(|e| fail(e.to_string()))?;
        let region = MmapRegionBuilder::new_with_bitmap(range.len as usize, bitmap)
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(file, range.file_offset))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let guard = MappingGuard::watch(region.as_ptr(), region.size(), prot).map_err(|e| fail(e.to_string()))?;
        let watch = MemoryWatch {
            guard,
            file: Arc::clone(&self.file),
            path: self.path.clone(),
            needed: range.file_offset + range.len,
            lazy: None,
        };
        Ok((watch, region))
    }
}
