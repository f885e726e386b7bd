//! The wall-clock timeout: a thread that interrupts `KVM_RUN` on the vCPU thread.
//!
//! When the deadline passes, the watchdog marks itself fired and signals the vCPU thread with
//! [`signal`], whose handler does nothing; `KVM_RUN` then returns `EINTR` and the run loop sees
//! the mark. The signal is re-sent every few milliseconds until the watchdog is dropped, so one
//! that lands just before `KVM_RUN` starts is not lost.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a fired watchdog re-sends its signal.
const RESEND_INTERVAL: Duration = Duration::from_millis(5);

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int) {}

fn install_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let errno = *INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // async-signal-safe (it does nothing). No SA_RESTART, so KVM_RUN returns EINTR.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal(), &action, std::ptr::null_mut())
        };
        if rc == 0 { 0 } else { io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL) }
    });
    match errno {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

struct Shared {
    done: Mutex<bool>,
    wake: Condvar,
    fired: AtomicBool,
}

/// An armed timeout for the calling thread. Dropping it disarms it.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a timeout of `timeout` for the calling thread.
    pub fn arm(timeout: Duration) -> io::Result<Self> {
        install_handler()?;
        let shared = Arc::new(Shared { done: Mutex::new(false), wake: Condvar::new(), fired: AtomicBool::new(false) });
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("thaw-watchdog".into()).spawn(move || {
            let done = theirs.done.lock().unwrap_or_else(|p| p.into_inner());
            let (mut done, _) =
                theirs.wake.wait_timeout_while(done, timeout, |d| !*d).unwrap_or_else(|p| p.into_inner());
            if *done {
                return;
            }
            theirs.fired.store(true, Ordering::SeqCst);
            while !*done {
                // SAFETY: `target` is the thread that owns this watchdog; it joins us in `drop`
                // before it can exit, so the thread id is still valid.
                unsafe { libc::pthread_kill(target, signal()) };
                done = theirs.wake.wait_timeout(done, RESEND_INTERVAL).unwrap_or_else(|p| p.into_inner()).0;
            }
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// True once the timeout has passed.
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn fires_after_the_timeout_and_interrupts_a_blocking_call() {
        let dog = Watchdog::arm(Duration::from_millis(20)).unwrap();
        assert!(!dog.fired());
        // A blocking call that only a signal ends early: read from a pipe nobody writes.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let started = Instant::now();
        let mut byte = 0u8;
        // SAFETY: reading one byte into a valid one-byte buffer from our own pipe.
        let n = unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) };
        assert_eq!(n, -1, "read must be interrupted");
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EINTR));
        assert!(dog.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
        // SAFETY: closing the descriptors we opened.
        unsafe { libc::close(fds[0]) };
        // SAFETY: as above.
        unsafe { libc::close(fds[1]) };
    }

    #[test]
    fn a_disarmed_watchdog_never_fires() {
        let dog = Watchdog::arm(Duration::from_secs(3600)).unwrap();
        drop(dog);
    }
}
