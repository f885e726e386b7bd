//! The wall-clock timeout: one timer thread per process that interrupts `KVM_RUN` on the vCPU
//! threads whose deadlines pass.
//!
//! [`Watchdog::arm`] registers the calling thread and its deadline with the timer; dropping the
//! watchdog removes it. Arming costs a lock and, only when the new deadline is the earliest, a
//! wake-up, so a kept VM can arm one per request without starting a thread each time. When a
//! deadline passes, the timer marks that watchdog fired and signals its thread with [`signal`],
//! whose handler does nothing; `KVM_RUN` then returns `EINTR` and the run loop sees the mark.
//! The signal is re-sent every few milliseconds until the watchdog is dropped, so one that lands
//! just before `KVM_RUN` starts is not lost.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the signal is re-sent to a thread whose deadline has passed.
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

/// One armed deadline.
struct Entry {
    thread: libc::pthread_t,
    fired: Arc<AtomicBool>,
}

/// Armed deadlines, keyed by (deadline, sequence number) so equal deadlines stay apart.
#[derive(Default)]
struct Deadlines {
    armed: BTreeMap<(Instant, u64), Entry>,
    next_id: u64,
}

/// The process's timer: its deadlines and the condition variable its thread sleeps on.
struct Timer {
    deadlines: Mutex<Deadlines>,
    wake: Condvar,
}

fn timer() -> io::Result<&'static Timer> {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    static STARTED: OnceLock<Result<(), i32>> = OnceLock::new();
    let timer = TIMER.get_or_init(|| Timer { deadlines: Mutex::new(Deadlines::default()), wake: Condvar::new() });
    let started = STARTED.get_or_init(|| {
        std::thread::Builder::new()
            .name("thaw-watchdog".into())
            .spawn(move || timer_thread(timer))
            .map(drop)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))
    });
    match started {
        Ok(()) => Ok(timer),
        Err(e) => Err(io::Error::from_raw_os_error(*e)),
    }
}

fn timer_thread(timer: &'static Timer) {
    let mut deadlines = timer.deadlines.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        let mut next_wake = None;
        for (&(deadline, _), entry) in &deadlines.armed {
            if deadline > now {
                next_wake = Some(next_wake.map_or(deadline, |w: Instant| w.min(deadline)));
                break;
            }
            entry.fired.store(true, Ordering::SeqCst);
            // SAFETY: the thread that armed this entry removes it (in `Watchdog::drop`, under
            // this lock) before it can exit, so its id is still valid while the entry exists.
            unsafe { libc::pthread_kill(entry.thread, signal()) };
            next_wake = Some(now + RESEND_INTERVAL);
        }
        deadlines = match next_wake {
            None => timer.wake.wait(deadlines).unwrap_or_else(|p| p.into_inner()),
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                timer.wake.wait_timeout(deadlines, wait).unwrap_or_else(|p| p.into_inner()).0
            }
        };
    }
}

/// An armed timeout for the calling thread. Dropping it disarms it.
pub struct Watchdog {
    key: (Instant, u64),
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    /// Arms a timeout of `timeout` for the calling thread.
    pub fn arm(timeout: Duration) -> io::Result<Self> {
        install_handler()?;
        let timer = timer()?;
        let deadline =
            Instant::now().checked_add(timeout).unwrap_or_else(|| Instant::now() + Duration::from_secs(1 << 40));
        let fired = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let mut deadlines = timer.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let key = (deadline, deadlines.next_id);
        deadlines.next_id += 1;
        let earliest = deadlines.armed.keys().next().is_none_or(|first| key < *first);
        deadlines.armed.insert(key, Entry { thread, fired: Arc::clone(&fired) });
        drop(deadlines);
        if earliest {
            timer.wake.notify_one();
        }
        Ok(Self { key, fired })
    }

    /// True once the timeout has passed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(timer) = timer() {
            timer.deadlines.lock().unwrap_or_else(|p| p.into_inner()).armed.remove(&self.key);
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
    fn an_earlier_deadline_armed_after_a_later_one_still_fires_on_time() {
        let late = Watchdog::arm(Duration::from_secs(3600)).unwrap();
        let started = Instant::now();
        let early = std::thread::spawn(|| {
            let dog = Watchdog::arm(Duration::from_millis(20)).unwrap();
            while !dog.fired() {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        early.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!late.fired());
    }

    #[test]
    fn a_disarmed_watchdog_never_fires() {
        let dog = Watchdog::arm(Duration::from_secs(3600)).unwrap();
        drop(dog);
    }
}
