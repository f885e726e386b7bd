//! Mappings of image files that survive the file shrinking under them.
//!
//! Guest memory is a copy-on-write mapping of the image file ([`crate::snapshot`]). If the file
//! is truncated while it is mapped, a page past the new end has nothing behind it: a guest
//! access makes `KVM_RUN` fail with `EFAULT`, and a host access (writing the parameters page,
//! copying a page back for a reset, reading a virtqueue) raises `SIGBUS`, which kills the whole
//! process.
//!
//! Every image mapping is therefore registered here while it lives ([`MappingGuard`]). One
//! process-wide `SIGBUS` handler looks the faulting address up: inside a registered mapping, it
//! maps an anonymous zero page over the faulting page, marks the mapping damaged and returns,
//! so the access completes (reading zeros) instead of killing the process. The mapping's owner
//! asks [`MappingGuard::damaged`] when the access is over and fails only the VM that used it,
//! with an error naming the image. A `SIGBUS` anywhere else goes to the handler that was there
//! before (Rust's own, or the default, which ends the process).
//!
//! The fast path costs nothing: no copy of the image, no check per access. The registry is a
//! fixed table of atomics, the only kind of state a signal handler may touch.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// How many image mappings can be guarded at once: every live VM restored from an image, the
/// spare mappings each image keeps, and one read-only original per image.
pub const MAX_GUARDED: usize = 16384;

/// Why a mapping could not be guarded.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The handler could not be installed.
    #[error("installing the SIGBUS handler that guards image mappings: {0}")]
    Install(std::io::Error),
    /// The table is full.
    #[error("more than {MAX_GUARDED} image mappings at once")]
    Full,
}

/// One registered mapping. `start` is 0 for a free slot and [`CLAIMED`] while it is being
/// filled in; the handler matches only slots whose `start` is an address.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    prot: AtomicI32,
    damaged: AtomicBool,
}

const CLAIMED: usize = 1;

#[allow(clippy::declare_interior_mutable_const)] // only the array's initializer uses it
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    prot: AtomicI32::new(0),
    damaged: AtomicBool::new(false),
};

static SLOTS: [Slot; MAX_GUARDED] = [FREE; MAX_GUARDED];

/// Where the next claim starts looking, so claims do not rescan the taken slots.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The `SIGBUS` action before ours, set once before ours is installed.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// A registered image mapping: while it lives, a `SIGBUS` inside it turns into a zero page and
/// [`MappingGuard::damaged`]. Drop it before the mapping is unmapped (declare it first in the
/// struct that owns both), so that the slot never names an address that is no longer it.
#[derive(Debug)]
pub struct MappingGuard {
    slot: usize,
}

impl MappingGuard {
    /// Guards `len` bytes at `start`, a mapping made with `prot`, installing the handler the
    /// first time.
    pub fn watch(start: *const u8, len: usize, prot: i32) -> Result<Self, GuardError> {
        install()?;
        let (start, end) = (start as usize, (start as usize).saturating_add(len));
        let first = NEXT.load(Ordering::Relaxed);
        for n in 0..MAX_GUARDED {
            let slot = (first + n) % MAX_GUARDED;
            let s = &SLOTS[slot];
            if s.start.compare_exchange(0, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_err() {
                continue;
            }
            s.end.store(end, Ordering::Relaxed);
            s.prot.store(prot, Ordering::Relaxed);
            s.damaged.store(false, Ordering::Relaxed);
            s.start.store(start, Ordering::Release);
            NEXT.store(slot + 1, Ordering::Relaxed);
            return Ok(Self { slot });
        }
        Err(GuardError::Full)
    }

    /// Whether a page of the mapping vanished from its file since it was guarded (and now reads
    /// as zeros).
    pub fn damaged(&self) -> bool {
        SLOTS[self.slot].damaged.load(Ordering::Acquire)
    }
}

impl Drop for MappingGuard {
    fn drop(&mut self) {
        SLOTS[self.slot].start.store(0, Ordering::Release);
    }
}

fn install() -> Result<(), GuardError> {
    let previous = PREVIOUS.get_or_init(|| {
        // SAFETY: an all-zero sigaction is a valid value of the plain C struct.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // SAFETY: as above; sigaction fills it in.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset initializes the mask of our own struct; sigaction installs a
        // handler that touches only atomics and async-signal-safe calls (`on_sigbus`).
        let installed = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, &mut previous)
        };
        if installed == 0 { Ok(previous) } else { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) }
    });
    previous.map(|_| ()).map_err(|errno| GuardError::Install(std::io::Error::from_raw_os_error(errno)))
}

/// The `SIGBUS` handler: a fault inside a guarded mapping gets a zero page and marks the
/// mapping; any other goes to the previous action.
extern "C" fn on_sigbus(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a handler installed with SA_SIGINFO; for
    // SIGBUS its address is the faulting one.
    let address = unsafe { (*info).si_addr() } as usize;
    if replace_page(address) {
        return;
    }
    match PREVIOUS.get() {
        Some(Ok(previous)) if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN => {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
                // signature, and it gets exactly what the kernel gave us.
                let handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
                let handler: extern "C" fn(i32) = unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal);
            }
        }
        _ => {
            // No handler before ours: restore the default action and return, so the access
            // faults again and the process ends by SIGBUS as it would have without us.
            // SAFETY: an all-zero sigaction with SIG_DFL (0) is the default action.
            unsafe {
                let default: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            }
        }
    }
}

/// Maps a zero page over the page at `address` if a guarded mapping holds it, and marks that
/// mapping damaged. Async-signal-safe: atomics, `mmap`, and errno saved around it.
fn replace_page(address: usize) -> bool {
    let page = address & !(crate::layout::PAGE_SIZE as usize - 1);
    for slot in &SLOTS {
        let start = slot.start.load(Ordering::Acquire);
        if start <= CLAIMED || address < start || address >= slot.end.load(Ordering::Relaxed) {
            continue;
        }
        // SAFETY: errno is thread-local; reading and restoring it keeps the interrupted code's.
        let errno = unsafe { *libc::__errno_location() };
        // SAFETY: the page lies inside a live mapping this process made and registered; mapping
        // anonymous memory over it with MAP_FIXED replaces only that page, which has no file
        // page behind it any more. Nothing holds a reference into guest memory (vm-memory's
        // accessors are volatile copies), so no Rust value changes under anyone.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                crate::layout::PAGE_SIZE as usize,
                slot.prot.load(Ordering::Relaxed),
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        slot.damaged.store(true, Ordering::Release);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A real file of `pages` pages of 0xab, mapped private read-write like guest memory.
    fn mapped(pages: usize) -> (tempfile::NamedTempFile, *mut u8, usize) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![0xab; pages * 4096]).unwrap();
        let len = pages * 4096;
        // SAFETY: a fresh private mapping of our own file; the test unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(file.as_file()),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        (file, ptr.cast(), len)
    }

    #[test]
    fn a_page_that_left_its_file_reads_as_zeros_and_marks_only_its_mapping() {
        let (file, ptr, len) = mapped(4);
        let (other_file, other, other_len) = mapped(1);
        let guard = MappingGuard::watch(ptr, len, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        let other_guard = MappingGuard::watch(other, other_len, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        // SAFETY: reads inside the live mapping (volatile: the page may change under us).
        assert_eq!(unsafe { ptr.add(4096).read_volatile() }, 0xab);
        assert!(!guard.damaged());
        file.as_file().set_len(4096).unwrap();
        // SAFETY: as above; page 2 is now past the end of the file.
        assert_eq!(unsafe { ptr.add(2 * 4096 + 7).read_volatile() }, 0);
        // SAFETY: as above; a write after the replacement lands in the zero page.
        unsafe { ptr.add(3 * 4096).write_volatile(5) };
        // SAFETY: as above.
        assert_eq!(unsafe { ptr.add(3 * 4096).read_volatile() }, 5);
        assert!(guard.damaged());
        assert!(!other_guard.damaged());
        // Page 0 is still the file's.
        // SAFETY: as above.
        assert_eq!(unsafe { ptr.read_volatile() }, 0xab);
        drop((guard, other_guard));
        // SAFETY: both mappings are ours and nothing uses them any more.
        unsafe {
            libc::munmap(ptr.cast(), len);
            libc::munmap(other.cast(), other_len);
        }
        drop(other_file);
    }

    #[test]
    fn slots_are_reused_after_their_guard_is_dropped() {
        let taken: Vec<_> =
            (0..3).map(|n| MappingGuard::watch((0x1000 * (n + 1)) as *const u8, 16, 0).unwrap()).collect();
        let slots: Vec<_> = taken.iter().map(|g| g.slot).collect();
        drop(taken);
        for slot in slots {
            assert_eq!(SLOTS[slot].start.load(Ordering::Relaxed), 0);
        }
    }
}
