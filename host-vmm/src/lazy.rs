//! Guest memory that arrives while the guest runs: a VM restored from a peer's image
//! ([`crate::remote`]).
//!
//! The memory is an anonymous private mapping. The pages the guest touches first (the image's
//! working set, and the pages the host writes at every restore) are written into it before the
//! vCPU exists; then the whole range is registered with userfaultfd for missing pages. A
//! handler thread resolves each fault: a page the image's page map says is zero gets the zero
//! page, any other is read from the [`PageSource`] (with the pages after it in the same run,
//! [`DEMAND_CLUSTER`] at most) and copied in. A second thread prefetches every other non-zero
//! page in large reads; when all of them are in, the range is unregistered, and the memory is
//! plain private memory with no thread behind it (a page still missing is zero, as in the
//! image).
//!
//! The userfaultfd is made without `UFFD_USER_MODE_ONLY`: the guest's faults are taken inside
//! KVM, in the kernel, and a user-mode-only descriptor never sees them (the vCPU would fail with
//! `EFAULT`). That needs `/dev/userfaultfd` (tried first) or `CAP_SYS_PTRACE`.
//!
//! A page that cannot be fetched is never handed to the guest as zeros. It is poisoned
//! (`UFFDIO_POISON`, Linux 6.6): the access that waited for it fails with `SIGBUS` (host) or
//! KVM's poison signal (guest), which [`crate::guard`] turns into a damaged mapping, and the VM
//! into an error naming the source ([`Lazy::failure`]). On a kernel without poison the access
//! keeps waiting until the request's watchdog ends the run.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::layout::PAGE_SIZE;

/// Most pages one demand fault reads from the source: the faulting page and those after it in
/// the same run of non-zero pages that are still missing. A read costs mostly its round trip.
pub const DEMAND_CLUSTER: u64 = 16;

/// Pages one prefetch read asks for (1 MiB).
pub const PREFETCH_CHUNK: u64 = 256;

/// Where the pages of a lazily filled memory come from: the image's guest memory, page by page.
pub trait PageSource: Send + Sync {
    /// Fills `into` (a whole number of pages) with the guest pages from page `first` on.
    fn read(&self, first: u64, into: &mut [u8]) -> Result<(), String>;
    /// What the source is, for error messages ("peer http://10.0.0.2:8080").
    fn describe(&self) -> String;
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

/// What the handlers of one memory did, and of all memories of one image when summed
/// ([`LazyStats::add`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LazyStats {
    /// Faults resolved by reading from the source.
    pub demand_faults: u64,
    /// Pages those reads copied in.
    pub demand_pages: u64,
    /// Time spent resolving them, reads included.
    pub demand_time: Duration,
    /// Faults on pages that are zero in the image.
    pub zero_faults: u64,
    /// Pages the prefetcher copied in.
    pub prefetched_pages: u64,
    /// Memories whose every non-zero page arrived (and which were unregistered).
    pub completed: u64,
}

impl LazyStats {
    /// Adds `other` into this one.
    pub fn add(&mut self, other: &LazyStats) {
        self.demand_faults += other.demand_faults;
        self.demand_pages += other.demand_pages;
        self.demand_time += other.demand_time;
        self.zero_faults += other.zero_faults;
        self.prefetched_pages += other.prefetched_pages;
        self.completed += other.completed;
    }
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
    #[repr(C)]
    pub struct Copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
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
    pub const UFFDIO_UNREGISTER: u64 = ior(0x01, size_of::<Range>());
    pub const UFFDIO_WAKE: u64 = ior(0x02, size_of::<Range>());
    pub const UFFDIO_COPY: u64 = iowr(0x03, size_of::<Copy>());
    pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, size_of::<RangeOp>());
    pub const UFFDIO_POISON: u64 = iowr(0x08, size_of::<RangeOp>());
}

/// One page, aligned as `UFFDIO_COPY` wants its source.
#[derive(Clone, Copy, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

fn page_buffer(pages: u64) -> Vec<Page> {
    vec![Page([0; PAGE_SIZE as usize]); pages as usize]
}

/// The state the handler and the prefetcher share.
struct Shared {
    uffd: OwnedFd,
    /// The mapping's first byte and its length in pages.
    base: u64,
    pages: u64,
    /// The image's non-zero pages, as sorted runs (first page, count).
    nonzero: Vec<(u64, u64)>,
    /// One bit per page: copied in (by either thread, or preloaded).
    present: Vec<AtomicU64>,
    source: Arc<dyn PageSource>,
    /// The first read that failed, which fails every later one at once.
    failure: Mutex<Option<String>>,
    /// Whether the kernel took `UFFD_FEATURE_POISON`.
    poison: bool,
    stopping: AtomicBool,
    demand_faults: AtomicU64,
    demand_pages: AtomicU64,
    demand_nanos: AtomicU64,
    zero_faults: AtomicU64,
    prefetched_pages: AtomicU64,
    completed: AtomicBool,
}

/// The handler and prefetcher of one lazily filled memory. Drop it after the VM (so no vCPU
/// waits on a fault) and before the mapping.
pub struct Lazy {
    shared: Arc<Shared>,
    /// Written to stop the handler.
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy").field("pages", &self.shared.pages).field("stats", &self.stats()).finish()
    }
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

/// Makes `ram` (`pages` pages at `base`, anonymous and private, with `preloaded` already
/// written) fill itself on demand from `source`: every page of `nonzero` not in `preloaded`
/// is read when touched, and by a prefetcher meanwhile; every other page is zero.
pub fn fill_on_demand(
    base: u64,
    pages: u64,
    nonzero: Vec<(u64, u64)>,
    preloaded: &[(u64, u64)],
    source: Arc<dyn PageSource>,
) -> Result<Lazy, LazyError> {
    let (uffd, poison) = ready_uffd()?;
    let present: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let shared = Arc::new(Shared {
        uffd,
        base,
        pages,
        nonzero,
        present,
        source,
        failure: Mutex::new(None),
        poison,
        stopping: AtomicBool::new(false),
        demand_faults: AtomicU64::new(0),
        demand_pages: AtomicU64::new(0),
        demand_nanos: AtomicU64::new(0),
        zero_faults: AtomicU64::new(0),
        prefetched_pages: AtomicU64::new(0),
        completed: AtomicBool::new(false),
    });
    for &(first, count) in preloaded {
        if first.checked_add(count).is_none_or(|end| end > pages) {
            return Err(LazyError::Outside { first, count, pages });
        }
        (first..first + count).for_each(|page| shared.mark(page));
    }
    let mut register = uapi::Register {
        range: uapi::Range { start: base, len: pages * PAGE_SIZE },
        mode: uapi::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; the range is a mapping the
    // caller owns and keeps until after the `Lazy` is dropped.
    if unsafe { libc::ioctl(shared.uffd.as_raw_fd(), uapi::UFFDIO_REGISTER as _, &mut register) } != 0 {
        return Err(uffd_error("UFFDIO_REGISTER"));
    }
    // SAFETY: eventfd returns a new descriptor or -1.
    let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if stop < 0 {
        return Err(LazyError::Memory(format!("eventfd: {}", io::Error::last_os_error())));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    let stop = unsafe { OwnedFd::from_raw_fd(stop) };
    let spawn = |name: &str, work: fn(&Shared, RawFd), stop: RawFd| {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&shared, stop))
            .map_err(|e| LazyError::Memory(format!("starting the {name} thread: {e}")))
    };
    let handler = spawn("thaw-faults", serve_faults, stop.as_raw_fd())?;
    // The prefetcher is not joined: it stops at its next chunk once `stopping` is set, and a
    // copy into a range that is no longer registered fails harmlessly.
    spawn("thaw-prefetch", prefetch, -1)?;
    Ok(Lazy { shared, stop, handler: Some(handler) })
}

impl Lazy {
    /// Why a page could not be fetched, if one could not: the memory then holds a poisoned
    /// page, and the VM that touched it cannot go on.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What the handler and the prefetcher did so far.
    pub fn stats(&self) -> LazyStats {
        let s = &self.shared;
        LazyStats {
            demand_faults: s.demand_faults.load(Ordering::Relaxed),
            demand_pages: s.demand_pages.load(Ordering::Relaxed),
            demand_time: Duration::from_nanos(s.demand_nanos.load(Ordering::Relaxed)),
            zero_faults: s.zero_faults.load(Ordering::Relaxed),
            prefetched_pages: s.prefetched_pages.load(Ordering::Relaxed),
            completed: u64::from(s.completed.load(Ordering::Relaxed)),
        }
    }

    /// Waits until every non-zero page is in (or a read failed, or `timeout` passed); returns
    /// whether all are in.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        while !self.shared.completed.load(Ordering::Acquire) {
            if started.elapsed() > timeout || self.failure().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local buffer to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

impl Shared {
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

    fn failed(&self) -> bool {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn fail(&self, why: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(why);
    }

    fn range_op(&self, request: u64, first: u64, count: u64) -> io::Result<()> {
        let range = uapi::Range { start: self.base + first * PAGE_SIZE, len: count * PAGE_SIZE };
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

    /// Copies `pages` (read from the source for pages `first`..) into the mapping, skipping
    /// pages already in. Returns how many it copied.
    fn copy_in(&self, first: u64, pages: &[Page]) -> io::Result<u64> {
        let mut copied = 0;
        let mut at = 0u64;
        while at < pages.len() as u64 {
            if self.is_present(first + at) {
                at += 1;
                continue;
            }
            let mut end = at + 1;
            while end < pages.len() as u64 && !self.is_present(first + end) {
                end += 1;
            }
            let mut copy = uapi::Copy {
                dst: self.base + (first + at) * PAGE_SIZE,
                src: pages[at as usize..].as_ptr() as u64,
                len: (end - at) * PAGE_SIZE,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which lie in `pages` (page
            // aligned, `end - at` pages from index `at`), and writes them into the registered
            // range of our mapping; it also writes the struct's `copy` field.
            let done = unsafe { libc::ioctl(self.uffd.as_raw_fd(), uapi::UFFDIO_COPY as _, &mut copy) };
            let error = (done != 0).then(io::Error::last_os_error);
            let whole = if copy.copy > 0 { copy.copy as u64 / PAGE_SIZE } else { 0 };
            for page in first + at..first + at + whole {
                self.mark(page);
            }
            copied += whole;
            match error {
                None => at = end,
                // The page after the copied ones is in already (the other thread copied it),
                // or the copy was cut short: go on from the first page not copied.
                Some(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.mark(first + at + whole);
                    at += whole + 1;
                }
                Some(e) if e.raw_os_error() == Some(libc::EAGAIN) => at += whole,
                Some(e) => return Err(e),
            }
        }
        Ok(copied)
    }

    /// Resolves a fault at `page`.
    fn resolve(&self, page: u64) {
        if page >= self.pages || self.is_present(page) {
            self.wake(page.min(self.pages.saturating_sub(1)));
            return;
        }
        let Some((first, count)) = self.run_of(page) else {
            self.zero_faults.fetch_add(1, Ordering::Relaxed);
            if self.range_op(uapi::UFFDIO_ZEROPAGE, page, 1).is_err() {
                self.wake(page);
            }
            return;
        };
        let started = Instant::now();
        let mut end = page + 1;
        while end < (first + count).min(page + DEMAND_CLUSTER) && !self.is_present(end) {
            end += 1;
        }
        let mut buffer = page_buffer(end - page);
        let read = if self.failed() {
            Err(String::new())
        } else {
            use zerocopy::IntoBytes;
            self.source.read(page, buffer.as_mut_bytes()).or_else(|_| self.source.read(page, buffer.as_mut_bytes()))
        };
        match read.map_err(|e| e.to_string()).and_then(|()| self.copy_in(page, &buffer).map_err(|e| e.to_string())) {
            Ok(copied) => {
                self.demand_faults.fetch_add(1, Ordering::Relaxed);
                self.demand_pages.fetch_add(copied, Ordering::Relaxed);
                self.demand_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            Err(why) => {
                if !why.is_empty() {
                    self.fail(format!("reading guest page {page:#x} from {}: {why}", self.source.describe()));
                }
                if self.poison {
                    let _ = self.range_op(uapi::UFFDIO_POISON, page, 1);
                }
            }
        }
    }
}

/// The handler thread: reads fault messages until `stop` is written or the descriptor fails.
fn serve_faults(shared: &Shared, stop: RawFd) {
    let mut messages = [0u8; uapi::MSG_LEN * 16];
    loop {
        let mut fds = [
            libc::pollfd { fd: shared.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
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
        let n = unsafe { libc::read(shared.uffd.as_raw_fd(), messages.as_mut_ptr().cast(), messages.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return,
            }
        }
        for message in messages[..n as usize].chunks_exact(uapi::MSG_LEN) {
            if message[0] != uapi::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let address = u64::from_ne_bytes(message[16..24].try_into().unwrap_or_default());
            shared.resolve(address.saturating_sub(shared.base) / PAGE_SIZE);
        }
    }
}

/// The prefetcher thread: reads every missing non-zero page in chunks, then unregisters.
fn prefetch(shared: &Shared, _: RawFd) {
    use zerocopy::IntoBytes;
    let mut buffer = page_buffer(PREFETCH_CHUNK);
    for &(run_first, run_count) in &shared.nonzero {
        let mut at = run_first;
        while at < run_first + run_count {
            if shared.stopping.load(Ordering::Acquire) || shared.failed() {
                return;
            }
            let end = (run_first + run_count).min(at + PREFETCH_CHUNK);
            // Skip what is in already (the preloaded working set, demand-faulted pages).
            if (at..end).all(|page| shared.is_present(page)) {
                at = end;
                continue;
            }
            let pages = &mut buffer[..(end - at) as usize];
            if shared.source.read(at, pages.as_mut_bytes()).is_err() {
                // The demand path retries and reports; the prefetcher only helps.
                return;
            }
            match shared.copy_in(at, pages) {
                Ok(copied) => shared.prefetched_pages.fetch_add(copied, Ordering::Relaxed),
                Err(_) => return,
            };
            at = end;
        }
    }
    let mut range = uapi::Range { start: shared.base, len: shared.pages * PAGE_SIZE };
    // SAFETY: UFFDIO_UNREGISTER reads the range we pass, the one registered; pages still
    // missing are then zero-filled by the kernel on first touch, as the image's are.
    if unsafe { libc::ioctl(shared.uffd.as_raw_fd(), uapi::UFFDIO_UNREGISTER as _, &mut range) } == 0 {
        shared.completed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

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

    fn anonymous(pages: u64) -> vm_memory::mmap::MmapRegion {
        vm_memory::mmap::MmapRegion::build(
            None,
            (pages * PAGE_SIZE) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .unwrap()
    }

    fn byte_at(region: &vm_memory::mmap::MmapRegion, page: u64) -> u8 {
        use vm_memory::VolatileMemory;
        region.get_ref::<u8>((page * PAGE_SIZE + 7) as usize).unwrap().load()
    }

    #[test]
    fn pages_arrive_on_touch_zero_pages_stay_zero_and_the_prefetcher_finishes() {
        let region = anonymous(600);
        let source = Arc::new(Pattern { reads: AtomicUsize::new(0), fail_after: usize::MAX });
        // Non-zero: pages 10..20 and 100..500. Page 10 was preloaded (left zero here, so a
        // copy over it would show).
        let lazy = fill_on_demand(region.as_ptr() as u64, 600, vec![(10, 10), (100, 400)], &[(10, 1)], source).unwrap();
        assert_eq!(byte_at(&region, 10), 0, "a preloaded page is not fetched");
        assert_eq!(byte_at(&region, 11), 12);
        assert_eq!(byte_at(&region, 499), 244); // (499 + 1) as u8
        assert_eq!(byte_at(&region, 5), 0);
        assert_eq!(byte_at(&region, 599), 0);
        assert!(lazy.wait_complete(Duration::from_secs(10)), "{:?}", lazy.stats());
        for page in (100..500).step_by(37) {
            assert_eq!(byte_at(&region, page), (page + 1) as u8);
        }
        let stats = lazy.stats();
        assert_eq!(stats.demand_pages + stats.prefetched_pages, 409, "{stats:?}");
        assert!(lazy.failure().is_none());
    }

    #[test]
    fn a_page_that_cannot_be_read_is_never_zero_and_names_the_source() {
        let region = anonymous(64);
        let guard =
            crate::guard::MappingGuard::watch(region.as_ptr(), region.size(), libc::PROT_READ | libc::PROT_WRITE)
                .unwrap();
        let source = Arc::new(Pattern { reads: AtomicUsize::new(0), fail_after: 0 });
        let lazy = fill_on_demand(region.as_ptr() as u64, 64, vec![(0, 64)], &[], source).unwrap();
        // The read waits for the handler, which fails to fetch and poisons the page: the
        // guard turns the SIGBUS into a zero page and a damaged mapping.
        let _ = byte_at(&region, 3);
        assert!(guard.damaged(), "the access must not complete as if the page were there");
        let failure = lazy.failure().unwrap();
        assert!(failure.contains("guest page 0x3 from the test pattern: connection reset"), "{failure}");
        drop(lazy);
        drop(guard);
    }
}
