//! Guest memory that arrives while guests run: the image of a VM restored from a peer
//! ([`crate::remote`]).
//!
//! Such an image is a memfd the length of the image file. At first it holds the metadata, the
//! pages that came with the restore head and the volume; every VM restored from it maps it
//! copy-on-write, as VMs map a local image, so what the memfd holds comes from the shared page
//! cache. The rest arrives two ways:
//! - **On demand.** The image's non-zero runs in each VM's mapping are registered with a
//!   userfaultfd for missing pages ([`Lazy`]); a zero page is a hole in the memfd and reads as
//!   zeros without a fault (one in a gap between merged runs gets the zero page). A thread
//!   resolves the faults: the page is made present in the memfd ([`Filler`]: read from the
//!   [`PageSource`] with the missing pages after it, [`DEMAND_CLUSTER`] at most, unless another
//!   VM or the prefetcher brought it already), and the faulting thread is woken to find it in
//!   the page cache.
//! - **In the background.** One prefetch thread per image reads every missing non-zero page in
//!   large reads into the memfd. Once all are in, the memfd is the image: VMs restored after
//!   that use no userfaultfd at all, and no page is read from the source twice.
//!
//! The userfaultfd is made without `UFFD_USER_MODE_ONLY`: the guest's faults are taken inside
//! KVM, in the kernel, and a user-mode-only descriptor never sees them (the vCPU would fail with
//! `EFAULT`). That needs `/dev/userfaultfd` (tried first) or `CAP_SYS_PTRACE`.
//!
//! A page that cannot be fetched is never handed to the guest as zeros. It is poisoned in the
//! VM's mapping (`UFFDIO_POISON`, Linux 6.6): the access that waited for it fails with `SIGBUS`
//! (host) or KVM's poison signal (guest), which [`crate::guard`] turns into a damaged mapping,
//! and the VM into an error naming the source ([`Lazy::failure`]). On a kernel without poison
//! (before 6.6) the page stays missing and the access waits, until the request's watchdog ends
//! the run (not tried: these machines run 6.18).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::layout::PAGE_SIZE;

/// Most pages one demand fault reads from the source: the faulting page and those after it in
/// the same run of non-zero pages that are still missing. A read costs mostly its round trip.
pub const DEMAND_CLUSTER: u64 = 16;

/// Pages one prefetch read asks for (1 MiB).
pub const PREFETCH_CHUNK: u64 = 256;

/// How long the prefetcher waits after the first VM's memory is attached: the first request
/// runs alone, and gets the CPU and the link (a hello answers within a few milliseconds).
pub const PREFETCH_DELAY: Duration = Duration::from_millis(10);

/// Where the pages of a lazily filled memory come from: the image's guest memory, page by page.
pub trait PageSource: Send + Sync {
    /// Fills `into` (a whole number of pages) with the guest pages from page `first` on.
    fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String>;
    /// What the source is, for error messages ("peer http://10.0.0.2:8080").
    fn describe(&self) -> String;
}

/// Several sources of the same image's pages (the nodes that hold it): a read goes to the one
/// that answered last, and to the others in turn when it fails, so that a holder that dies
/// costs a read its time, not the VM. The read fails only when every source failed; its error
/// names each.
pub struct Holders {
    sources: Vec<Arc<dyn PageSource>>,
    /// The index of the source that answered last.
    current: AtomicUsize,
}

impl Holders {
    /// The sources, tried from the first.
    pub fn new(sources: Vec<Arc<dyn PageSource>>) -> Self {
        Self { sources, current: AtomicUsize::new(0) }
    }
}

impl PageSource for Holders {
    fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String> {
        let start = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for turn in 0..self.sources.len() {
            let index = (start + turn) % self.sources.len();
            let source = &self.sources[index];
            match source.read(first, into) {
                Ok(()) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(());
                }
                Err(why) => {
                    failures.push(if self.sources.len() > 1 { format!("{}: {why}", source.describe()) } else { why })
                }
            }
        }
        Err(if failures.is_empty() { "no holder to read from".into() } else { failures.join("; ") })
    }

    fn describe(&self) -> String {
        match self.sources.as_slice() {
            [only] => only.describe(),
            all => {
                format!("{} holders ({})", all.len(), all.iter().map(|s| s.describe()).collect::<Vec<_>>().join(", "))
            }
        }
    }
}

/// Why lazily filled memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A userfaultfd call failed.
    #[error("userfaultfd: {op}: {source}{hint}")]
    Uffd {
        /// The call.
        op: &'static str,
        /// Its error.
        source: io::Error,
        /// What to do about it, when known.
        hint: &'static str,
    },
    /// The memory could not be mapped or written.
    #[error("lazily filled guest memory: {0}")]
    Memory(String),
    /// A preloaded page lies outside the memory.
    #[error("a preloaded run of {count} pages at page {first:#x} lies outside the {pages} pages of guest memory")]
    Outside {
        /// Its first page.
        first: u64,
        /// Its length in pages.
        count: u64,
        /// Pages of guest memory.
        pages: u64,
    },
}

/// What was read for one image, on demand and by its prefetcher.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LazyStats {
    /// Faults resolved by reading from the source.
    pub demand_faults: u64,
    /// Pages those reads brought.
    pub demand_pages: u64,
    /// Time spent resolving them, reads included.
    pub demand_time: Duration,
    /// Faults on pages that are zero in the image.
    pub zero_faults: u64,
    /// Pages the prefetcher brought.
    pub prefetched_pages: u64,
    /// Every non-zero page of the image is here.
    pub complete: bool,
}

/// The ioctls of `<linux/userfaultfd.h>`, which the libc crate does not carry.
mod uapi {
    const fn iowr(nr: u64, size: usize) -> u64 {
        (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
    }
    const fn ior(nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
    }
    pub const UFFD_API: u64 = 0xAA;
    pub const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;
    pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const MSG_LEN: usize = 32;

    #[repr(C)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }
    /// `uffdio_zeropage` and `uffdio_poison` have the same layout.
    #[repr(C)]
    pub struct RangeOp {
        pub range: Range,
        pub mode: u64,
        pub done: i64,
    }
    pub const UFFDIO_API: u64 = iowr(0x3F, size_of::<Api>());
    pub const UFFDIO_REGISTER: u64 = iowr(0x00, size_of::<Register>());
    pub const UFFDIO_WAKE: u64 = ior(0x02, size_of::<Range>());
    pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, size_of::<RangeOp>());
    pub const UFFDIO_POISON: u64 = iowr(0x08, size_of::<RangeOp>());
}

/// One page, aligned for the reads and writes of whole pages.
#[derive(Clone, Copy, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

fn page_buffer(pages: u64) -> Vec<Page> {
    vec![Page([0; PAGE_SIZE as usize]); pages as usize]
}

fn uffd_error(op: &'static str) -> LazyError {
    let source = io::Error::last_os_error();
    let hint = match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            " (faults inside KVM need a userfaultfd that is not user-mode only: give thaw read access to /dev/userfaultfd, or CAP_SYS_PTRACE)"
        }
        Some(libc::ENOENT | libc::ENOSYS) => {
            " (this kernel has no userfaultfd; restoring from a peer needs Linux 5.11 or later)"
        }
        _ => "",
    };
    LazyError::Uffd { op, source, hint }
}

/// A new userfaultfd that sees faults taken in the kernel: through `/dev/userfaultfd`, else the
/// system call (which needs `CAP_SYS_PTRACE` for that).
fn open_uffd() -> Result<OwnedFd, LazyError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(device) = std::fs::File::open("/dev/userfaultfd") {
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new
        // descriptor or -1; nothing is read from or written to our memory.
        let fd = unsafe { libc::ioctl(device.as_raw_fd(), uapi::USERFAULTFD_IOC_NEW as _, flags) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: userfaultfd(2) takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(uffd_error("creating a userfaultfd"));
    }
    // SAFETY: as above: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A ready userfaultfd, and whether it poisons: the API handshake asks for
/// `UFFD_FEATURE_POISON`, and a kernel without it refuses the handshake, which leaves the
/// descriptor unusable, so a second one is made without.
fn ready_uffd() -> Result<(OwnedFd, bool), LazyError> {
    for features in [uapi::UFFD_FEATURE_POISON, 0] {
        let uffd = open_uffd()?;
        let mut api = uapi::Api { api: uapi::UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly the `uffdio_api` struct we pass.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), uapi::UFFDIO_API as _, &mut api) } == 0 {
            return Ok((uffd, features != 0));
        }
        if features == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    Err(uffd_error("UFFDIO_API"))
}

/// What an image's filler and the handlers of its VMs share.
struct Fill {
    /// The memfd, and where guest memory starts in it.
    file: Arc<File>,
    offset: u64,
    pages: u64,
    /// The image's non-zero pages, as sorted runs (first page, count).
    nonzero: Vec<(u64, u64)>,
    /// One bit per page: the memfd holds it.
    present: Vec<AtomicU64>,
    source: Arc<dyn PageSource>,
    /// The first read that failed, which fails every later one at once.
    failure: Mutex<Option<String>>,
    /// Set when the image goes: the prefetcher stops.
    stopping: AtomicBool,
    demand_faults: AtomicU64,
    demand_pages: AtomicU64,
    demand_nanos: AtomicU64,
    zero_faults: AtomicU64,
    prefetched_pages: AtomicU64,
    /// Every non-zero page is in the memfd.
    complete: AtomicBool,
    /// When the first VM's memory was attached.
    first_attach: std::sync::OnceLock<Instant>,
}

impl Fill {
    fn mark(&self, page: u64) {
        self.present[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    fn is_present(&self, page: u64) -> bool {
        self.present[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The run of non-zero pages holding `page`, if it is not zero.
    fn run_of(&self, page: u64) -> Option<(u64, u64)> {
        let index = self.nonzero.partition_point(|&(first, _)| first <= page).checked_sub(1)?;
        let (first, count) = self.nonzero[index];
        (page < first + count).then_some((first, count))
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads pages `first`.. (as many as `buffer` holds) from the source and writes those the
    /// memfd does not hold yet into it. On failure, the first failure is kept and returned.
    fn fetch(&self, first: u64, buffer: &mut [Page]) -> Result<u64, String> {
        use zerocopy::IntoBytes;
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        let read =
            self.source.read(first, buffer.as_mut_bytes()).or_else(|_| self.source.read(first, buffer.as_mut_bytes()));
        let written =
            read.and_then(|()| self.write(first, buffer).map_err(|e| format!("writing the image's memfd: {e}")));
        written.map_err(|why| {
            let why = format!("reading guest pages {first:#x}+{}: {why}", buffer.len());
            self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why).clone()
        })
    }

    /// Writes the pages of `buffer` (from page `first`) that the memfd does not hold. Returns
    /// how many it wrote.
    fn write(&self, first: u64, buffer: &[Page]) -> io::Result<u64> {
        use zerocopy::IntoBytes;
        let mut written = 0;
        let mut at = 0;
        while at < buffer.len() {
            if self.is_present(first + at as u64) {
                at += 1;
                continue;
            }
            let mut end = at + 1;
            while end < buffer.len() && !self.is_present(first + end as u64) {
                end += 1;
            }
            let offset = self.offset + (first + at as u64) * PAGE_SIZE;
            self.file.write_all_at(buffer[at..end].as_bytes(), offset)?;
            (first + at as u64..first + end as u64).for_each(|page| self.mark(page));
            written += (end - at) as u64;
            at = end;
        }
        Ok(written)
    }
}

/// Fills one image's memfd from a [`PageSource`]: on demand for its VMs' faults ([`Lazy`]),
/// and by a prefetch thread meanwhile. Dropping it stops the prefetcher.
pub struct Filler {
    fill: Arc<Fill>,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler").field("source", &self.fill.source.describe()).field("stats", &self.stats()).finish()
    }
}

impl Filler {
    /// A filler for `file`, whose guest memory of `pages` pages starts at `offset`: the pages
    /// of `nonzero` are not zero, those of `sent` the file holds already, and every other
    /// non-zero page is read from `source`: when a VM touches it, and, with `prefetch`, by a
    /// prefetch thread started now.
    pub fn start(
        file: Arc<File>,
        (offset, pages): (u64, u64),
        nonzero: Vec<(u64, u64)>,
        sent: &[(u64, u64)],
        source: Arc<dyn PageSource>,
        prefetch: bool,
    ) -> Result<Self, LazyError> {
        let present: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let fill = Arc::new(Fill {
            file,
            offset,
            pages,
            nonzero,
            present,
            source,
            failure: Mutex::new(None),
            stopping: AtomicBool::new(false),
            demand_faults: AtomicU64::new(0),
            demand_pages: AtomicU64::new(0),
            demand_nanos: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            prefetched_pages: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            first_attach: std::sync::OnceLock::new(),
        });
        for &(first, count) in sent {
            if first.checked_add(count).is_none_or(|end| end > pages) {
                return Err(LazyError::Outside { first, count, pages });
            }
            (first..first + count).for_each(|page| fill.mark(page));
        }
        if prefetch {
            let prefetcher = Arc::clone(&fill);
            // Not joined: it stops at its next chunk once the image is gone.
            std::thread::Builder::new()
                .name("thaw-prefetch".into())
                .spawn(move || prefetch_all(&prefetcher))
                .map_err(|e| LazyError::Memory(format!("starting the prefetch thread: {e}")))?;
        }
        Ok(Self { fill })
    }

    /// Makes the mapping of the memfd's guest memory at `base` (private) fill itself: `None`
    /// once every page is in, when it needs nothing.
    pub fn attach(&self, base: u64) -> Result<Option<Lazy>, LazyError> {
        if self.fill.complete.load(Ordering::Acquire) {
            return Ok(None);
        }
        self.fill.first_attach.get_or_init(Instant::now);
        let (uffd, poison) = ready_uffd()?;
        for (first, count) in registered(&self.fill.nonzero) {
            let mut register = uapi::Register {
                range: uapi::Range { start: base + first * PAGE_SIZE, len: count * PAGE_SIZE },
                mode: uapi::UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; the range lies in a
            // mapping the caller owns and keeps until after the `Lazy` is dropped.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), uapi::UFFDIO_REGISTER as _, &mut register) } != 0 {
                return Err(uffd_error("UFFDIO_REGISTER"));
            }
        }
        // SAFETY: eventfd returns a new descriptor or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(LazyError::Memory(format!("eventfd: {}", io::Error::last_os_error())));
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let faults =
            Arc::new(Faults { uffd, base, poison, poisoned: AtomicBool::new(false), fill: Arc::clone(&self.fill) });
        let (handler_faults, stop_fd) = (Arc::clone(&faults), stop.as_raw_fd());
        let handler = std::thread::Builder::new()
            .name("thaw-faults".into())
            .spawn(move || serve_faults(&handler_faults, stop_fd))
            .map_err(|e| LazyError::Memory(format!("starting the fault handler: {e}")))?;
        Ok(Some(Lazy { faults, stop, handler: Some(handler) }))
    }

    /// What was read so far, for the image's VMs and by its prefetcher.
    pub fn stats(&self) -> LazyStats {
        let f = &self.fill;
        LazyStats {
            demand_faults: f.demand_faults.load(Ordering::Relaxed),
            demand_pages: f.demand_pages.load(Ordering::Relaxed),
            demand_time: Duration::from_nanos(f.demand_nanos.load(Ordering::Relaxed)),
            zero_faults: f.zero_faults.load(Ordering::Relaxed),
            prefetched_pages: f.prefetched_pages.load(Ordering::Relaxed),
            complete: f.complete.load(Ordering::Relaxed),
        }
    }

    /// Why a read failed, if one did: the first failure, which fails every later read.
    pub fn failure(&self) -> Option<String> {
        self.fill.failure()
    }

    /// Waits until every non-zero page is in (or a read failed, or `timeout` passed); returns
    /// whether all are in.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        while !self.fill.complete.load(Ordering::Acquire) {
            if started.elapsed() > timeout || self.fill.failure().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.fill.stopping.store(true, Ordering::Release);
    }
}

/// Most ranges one mapping registers: each splits the mapping, and a process has a bounded
/// number of mappings (`vm.max_map_count`).
const MAX_REGISTERED: usize = 256;

/// The ranges of a mapping to register for missing pages: the image's non-zero runs, so that a
/// zero page is never a userfault (the memfd has a hole there, which reads as zeros), with
/// runs across the smallest gaps merged until there are [`MAX_REGISTERED`] at most (a zero page
/// in a merged gap is resolved with the zero page).
fn registered(nonzero: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut ranges = nonzero.to_vec();
    let mut gap = 1;
    while ranges.len() > MAX_REGISTERED {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (first, count) in ranges {
            match merged.last_mut() {
                Some((start, len)) if first - (*start + *len) < gap => *len = first + count - *start,
                _ => merged.push((first, count)),
            }
        }
        ranges = merged;
        gap *= 2;
    }
    ranges
}

/// What one VM's fault handler has.
struct Faults {
    uffd: OwnedFd,
    /// The mapping's first byte.
    base: u64,
    /// Whether the kernel took `UFFD_FEATURE_POISON`.
    poison: bool,
    /// A page of this mapping could not be fetched and was poisoned.
    poisoned: AtomicBool,
    fill: Arc<Fill>,
}

/// The fault handler of one VM's mapping. Drop it after the VM (so no vCPU waits on a fault)
/// and before the mapping.
pub struct Lazy {
    faults: Arc<Faults>,
    /// Written to stop the handler.
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy").field("base", &self.faults.base).finish_non_exhaustive()
    }
}

impl Lazy {
    /// Why a page of this mapping could not be fetched, if one could not: the mapping then
    /// holds a poisoned page, and the VM that touched it cannot go on.
    pub fn failure(&self) -> Option<String> {
        self.faults.poisoned.load(Ordering::Acquire).then(|| self.faults.fill.failure().unwrap_or_default())
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local buffer to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

impl Faults {
    fn range_op(&self, request: u64, page: u64) -> io::Result<()> {
        let range = uapi::Range { start: self.base + page * PAGE_SIZE, len: PAGE_SIZE };
        let mut op = uapi::RangeOp { range, mode: 0, done: 0 };
        // SAFETY: the request is one of ZEROPAGE or POISON, which read and write the struct we
        // pass, and act only on the registered range inside our mapping.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), request as _, &mut op) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn wake(&self, page: u64) {
        let mut range = uapi::Range { start: self.base + page * PAGE_SIZE, len: PAGE_SIZE };
        // SAFETY: UFFDIO_WAKE reads the range we pass and wakes threads waiting on it.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), uapi::UFFDIO_WAKE as _, &mut range) };
    }

    /// Resolves a fault at `page`.
    fn resolve(&self, page: u64) {
        let fill = &self.fill;
        if page >= fill.pages {
            return;
        }
        let Some((first, count)) = fill.run_of(page) else {
            fill.zero_faults.fetch_add(1, Ordering::Relaxed);
            if self.range_op(uapi::UFFDIO_ZEROPAGE, page).is_err() {
                self.wake(page); // mapped meanwhile (EEXIST)
            }
            return;
        };
        if !fill.is_present(page) {
            let started = Instant::now();
            let mut end = page + 1;
            while end < (first + count).min(page + DEMAND_CLUSTER) && !fill.is_present(end) {
                end += 1;
            }
            match fill.fetch(page, &mut page_buffer(end - page)) {
                Ok(written) => {
                    fill.demand_faults.fetch_add(1, Ordering::Relaxed);
                    fill.demand_pages.fetch_add(written, Ordering::Relaxed);
                    fill.demand_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    self.poisoned.store(true, Ordering::Release);
                    if self.poison {
                        let _ = self.range_op(uapi::UFFDIO_POISON, page);
                    }
                    return;
                }
            }
        }
        // The memfd holds the page now: the faulting thread finds it in the page cache.
        self.wake(page);
    }
}

/// The handler thread: reads fault messages until `stop` is written or the descriptor fails.
fn serve_faults(faults: &Faults, stop: RawFd) {
    let mut messages = [0u8; uapi::MSG_LEN * 16];
    loop {
        let mut fds = [
            libc::pollfd { fd: faults.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll reads and writes the two pollfd structs of the local array.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        // SAFETY: reads at most `messages.len()` bytes into the local buffer.
        let n = unsafe { libc::read(faults.uffd.as_raw_fd(), messages.as_mut_ptr().cast(), messages.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return,
            }
        }
        for message in messages[..n as usize].as_chunks::<{ uapi::MSG_LEN }>().0 {
            if message[0] != uapi::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let address = u64::from_ne_bytes(message[16..24].try_into().unwrap_or_default());
            faults.resolve(address.saturating_sub(faults.base) / PAGE_SIZE);
        }
    }
}

/// The prefetch thread: reads every missing non-zero page into the memfd, in chunks, from
/// [`PREFETCH_DELAY`] after the first VM's memory is attached.
fn prefetch_all(fill: &Fill) {
    while fill.first_attach.get().is_none_or(|attached| attached.elapsed() < PREFETCH_DELAY) {
        if fill.stopping.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut buffer = page_buffer(PREFETCH_CHUNK);
    for &(run_first, run_count) in &fill.nonzero {
        let mut at = run_first;
        while at < run_first + run_count {
            if fill.stopping.load(Ordering::Acquire) {
                return;
            }
            let end = (run_first + run_count).min(at + PREFETCH_CHUNK);
            // Skip what is in already (the pages sent with the head, those faulted in).
            if (at..end).all(|page| fill.is_present(page)) {
                at = end;
                continue;
            }
            match fill.fetch(at, &mut buffer[..(end - at) as usize]) {
                Ok(written) => fill.prefetched_pages.fetch_add(written, Ordering::Relaxed),
                Err(_) => return, // kept for the VMs that need a page it could not read
            };
            at = end;
        }
    }
    fill.complete.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose page `n` is filled with the byte `n + 1`, counting its reads, failing
    /// from read `fail_after` on.
    struct Pattern {
        reads: AtomicUsize,
        fail_after: usize,
    }

    impl PageSource for Pattern {
        fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String> {
            if self.reads.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
                return Err("connection reset".into());
            }
            for (i, page) in into.chunks_mut(PAGE_SIZE as usize).enumerate() {
                page.fill((first + i as u64 + 1) as u8);
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "the test pattern".into()
        }
    }

    /// A memfd of `pages` pages after one page of "metadata", and a private mapping of its
    /// memory, as an image a peer holds is mapped.
    fn image(pages: u64) -> (Arc<File>, vm_memory::mmap::MmapRegion) {
        let memfd = memfd::MemfdOptions::default().create("thaw-test").unwrap().into_file();
        memfd.set_len((pages + 1) * PAGE_SIZE).unwrap();
        let file = Arc::new(memfd);
        let region = vm_memory::mmap::MmapRegionBuilder::new((pages * PAGE_SIZE) as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(vm_memory::FileOffset::new(file.try_clone().unwrap(), PAGE_SIZE))
            .build()
            .unwrap();
        (file, region)
    }

    fn byte_at(region: &vm_memory::mmap::MmapRegion, page: u64) -> u8 {
        use vm_memory::VolatileMemory;
        region.get_ref::<u8>((page * PAGE_SIZE + 7) as usize).unwrap().load()
    }

    fn filler(
        file: &Arc<File>,
        pages: u64,
        nonzero: Vec<(u64, u64)>,
        sent: &[(u64, u64)],
        fail_after: usize,
    ) -> Filler {
        let source = Arc::new(Pattern { reads: AtomicUsize::new(0), fail_after });
        Filler::start(Arc::clone(file), (PAGE_SIZE, pages), nonzero, sent, source, true).unwrap()
    }

    #[test]
    fn a_holder_that_fails_hands_the_read_to_the_next_and_all_failing_names_each() {
        let dead: Arc<dyn PageSource> = Arc::new(Pattern { reads: AtomicUsize::new(0), fail_after: 0 });
        let alive: Arc<dyn PageSource> = Arc::new(Pattern { reads: AtomicUsize::new(0), fail_after: usize::MAX });
        let holders = Holders::new(vec![Arc::clone(&dead), alive]);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        holders.read(4, &mut page).unwrap();
        assert_eq!(page[0], 5);
        holders.read(6, &mut page).unwrap();
        assert_eq!(holders.current.load(Ordering::Relaxed), 1, "the one that answered is asked first");
        let none = Holders::new(vec![Arc::clone(&dead), dead]);
        let why = none.read(0, &mut page).unwrap_err();
        assert_eq!(why, "the test pattern: connection reset; the test pattern: connection reset");
    }

    #[test]
    fn registered_ranges_are_the_non_zero_runs_merged_across_the_smallest_gaps() {
        assert_eq!(registered(&[(1, 2), (5, 1)]), [(1, 2), (5, 1)]);
        let many: Vec<(u64, u64)> = (0..1000).map(|i| (i * 10 + if i % 2 == 0 { 0 } else { 5 }, 1)).collect();
        let ranges = registered(&many);
        assert!(ranges.len() <= MAX_REGISTERED, "{}", ranges.len());
        for &(first, count) in &many {
            assert!(ranges.iter().any(|&(start, len)| first >= start && first + count <= start + len));
        }
    }

    #[test]
    fn pages_arrive_on_touch_zero_pages_stay_zero_and_the_image_completes() {
        let (file, region) = image(600);
        // The "sent" page 10 holds 0xee in the memfd: a fetch over it would show.
        file.write_all_at(&[0xee; PAGE_SIZE as usize], PAGE_SIZE + 10 * PAGE_SIZE).unwrap();
        let filler = filler(&file, 600, vec![(10, 10), (100, 400)], &[(10, 1)], usize::MAX);
        let lazy = filler.attach(region.as_ptr() as u64).unwrap().unwrap();
        assert_eq!(byte_at(&region, 10), 0xee, "a page sent with the head is not fetched");
        assert_eq!(byte_at(&region, 11), 12);
        assert_eq!(byte_at(&region, 499), 244); // (499 + 1) as u8
        assert_eq!(byte_at(&region, 5), 0);
        assert_eq!(byte_at(&region, 599), 0);
        assert!(filler.wait_complete(Duration::from_secs(10)), "{:?}", filler.stats());
        for page in (100..500).step_by(37) {
            assert_eq!(byte_at(&region, page), (page + 1) as u8);
        }
        let stats = filler.stats();
        assert_eq!(stats.demand_pages + stats.prefetched_pages, 409, "{stats:?}");
        assert!(lazy.failure().is_none());
        // A mapping made now needs no handler, and reads the memfd.
        drop(lazy);
        assert!(filler.attach(region.as_ptr() as u64).unwrap().is_none());
        let (_, second) = {
            let region = vm_memory::mmap::MmapRegionBuilder::new((600 * PAGE_SIZE) as usize)
                .with_mmap_prot(libc::PROT_READ)
                .with_mmap_flags(libc::MAP_PRIVATE)
                .with_file_offset(vm_memory::FileOffset::new(file.try_clone().unwrap(), PAGE_SIZE))
                .build()
                .unwrap();
            ((), region)
        };
        assert_eq!(byte_at(&second, 250), 251);
    }

    #[test]
    fn a_page_that_cannot_be_read_is_never_zero_and_names_the_source() {
        let (file, region) = image(64);
        let guard =
            crate::guard::MappingGuard::watch(region.as_ptr(), region.size(), libc::PROT_READ | libc::PROT_WRITE)
                .unwrap();
        let filler = filler(&file, 64, vec![(0, 64)], &[], 0);
        let lazy = filler.attach(region.as_ptr() as u64).unwrap().unwrap();
        // The read waits for the handler, which fails to fetch and poisons the page: the
        // guard turns the SIGBUS into a zero page and a damaged mapping.
        let _ = byte_at(&region, 3);
        assert!(guard.damaged(), "the access must not complete as if the page were there");
        let failure = lazy.failure().unwrap();
        // The first read that failed is the one named (the prefetcher's, or the fault's).
        assert!(failure.starts_with("reading guest pages 0x") && failure.ends_with(": connection reset"), "{failure}");
        assert!(!filler.stats().complete);
        drop(lazy);
        drop(guard);
    }
}
