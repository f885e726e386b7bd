//! The syscall allow-list of every thaw process that runs VMs (`thaw invoke`, `restore`,
//! `serve`), and the one of `thaw serve`'s registry puller ([`install_puller`]), built with
//! rust-vmm's seccompiler.
//!
//! [`install`] runs once setup is done: arguments read, files opened, listeners bound. It
//! applies the list to every thread at once (`SECCOMP_FILTER_FLAG_TSYNC`), and threads started
//! later (vCPU threads, pool fillers, the watchdog) inherit it. A syscall that is not on the
//! list is never made: the kernel sends the thread SIGSYS instead, whose handler ([`on_sigsys`])
//! writes one line naming the call to stderr and ends the whole process by SIGSYS, as the
//! filter's own kill would, but saying why. A guest that escaped into a vCPU thread could then
//! do no more than thaw itself does: KVM ioctls, memory, files it may open, Unix sockets, and
//! threads. It could not execute a program, start a process, trace, mount, or load anything
//! into the kernel.
//!
//! Four calls are narrowed by their arguments:
//! - `ioctl`: KVM's (type `0xAE`), plus the few file and terminal requests std makes;
//! - `clone`: threads only (`CLONE_THREAD`). `clone3` takes its flags in memory, which a filter
//!   cannot read, so it fails with `ENOSYS`, and glibc then falls back to `clone`;
//! - `socket`: Unix sockets only (vsock connections to host services);
//! - `prctl`: thread names only.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules could not be compiled (a bug in this list).
    #[error("building the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// Calls allowed with any arguments.
const ALLOWED: &[i64] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_memfd_create,
    // Files and descriptors.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    // Sockets (created only as Unix sockets, below; thaw serve's listener exists already).
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_socketpair,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    // Waiting.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    // Threads and signals (the watchdog kicks vCPU threads with a real-time signal).
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Time, identity, randomness.
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// KVM's ioctl type (the `0xAE` of `_IO(KVMIO, n)`), in bits 8-15 of the request.
const KVMIO: u64 = 0xAE;

/// Requests std and the terminal make outside KVM's.
const OTHER_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::TCGETS, libc::TIOCGWINSZ];

/// Calls that change files: on the list of a process that runs VMs, not on the puller's.
const CHANGES_FILES: &[i64] = &[
    libc::SYS_ftruncate,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
];

/// Which process a list is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// A process that runs VMs: KVM, files, Unix sockets.
    Vmm,
    /// `thaw serve`'s registry puller: IP and Unix sockets (name resolution included), files
    /// read but never written or created, and no KVM.
    Puller,
    /// `thaw serve`: a VMM's list, with userfaultfd for the memory of images peers hold, whose
    /// pages its peer fetcher reads for it.
    Agent,
    /// A process that runs VMs whose memory a peer holds (`thaw restore URL`): the agent's
    /// list, with IP sockets to reach the peer itself.
    VmmWithPeer,
}

/// Installs the allow-list of a process that runs VMs on every thread of the process, once: a
/// second call does nothing (installing a filter takes calls the list itself forbids).
pub fn install() -> Result<(), SeccompError> {
    install_profile(Profile::Vmm)
}

/// Installs the allow-list of `thaw serve`'s registry puller, which speaks to registries over
/// the network and runs nothing else: IP sockets, files only read, no KVM, no programs.
pub fn install_puller() -> Result<(), SeccompError> {
    install_profile(Profile::Puller)
}

/// Installs the allow-list of `thaw serve`: a VMM's, with userfaultfd.
pub fn install_agent() -> Result<(), SeccompError> {
    install_profile(Profile::Agent)
}

/// Installs the allow-list of a process that runs VMs restored from a peer's image
/// (`crate::remote`): a VMM's, with IP sockets and userfaultfd.
pub fn install_with_peer() -> Result<(), SeccompError> {
    install_profile(Profile::VmmWithPeer)
}

fn install_profile(profile: Profile) -> Result<(), SeccompError> {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return Ok(());
    }
    report_refusals()?;
    // The clone3 filter first: the allow-list forbids the prctl and seccomp calls that
    // installing one more filter makes.
    for program in [clone3_unavailable()?, allow_list(profile)?] {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    *installed = true;
    Ok(())
}

/// Installs [`on_sigsys`] as the process's SIGSYS handler.
fn report_refusals() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value (no flags, an empty mask) that the lines
    // below fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (it only calls
    // write, sigaction and raise); the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Install(format!("the SIGSYS handler: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// The SIGSYS handler: a call off the list was refused (`SECCOMP_RET_TRAP`). Writes
/// `thaw: system call N is not on thaw's allow-list ...` to stderr, then ends the process by
/// SIGSYS: the default action, raised again, is delivered as soon as this handler returns.
/// Allocates nothing and calls only async-signal-safe functions.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    /// Where Linux puts a SIGSYS's `si_syscall` in `siginfo_t` on x86-64: after `si_signo`,
    /// `si_errno`, `si_code`, their padding and `si_call_addr`.
    const SI_SYSCALL_OFFSET: usize = 24;
    let number = if info.is_null() {
        None
    } else {
        // SAFETY: the kernel passes a whole siginfo_t (128 bytes) for a SA_SIGINFO handler, and
        // for a seccomp SIGSYS the int at this offset is the call's number.
        Some(unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() })
    };
    let mut line = [0u8; 160];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - at);
        line[at..at + n].copy_from_slice(&bytes[..n]);
        at += n;
    };
    put(b"thaw: system call ");
    let mut digits = [0u8; 11];
    let mut first = digits.len();
    let mut value = number.map_or(0, i32::unsigned_abs);
    loop {
        first -= 1;
        digits[first] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    match number {
        Some(n) if n < 0 => put(b"-"),
        None => put(b"?"),
        Some(_) => {}
    }
    if number.is_some() {
        put(&digits[first..]);
    }
    put(b" is not on thaw's allow-list (host-vmm/src/seccomp.rs); the process ends\n");
    // SAFETY: write, sigaction and raise are async-signal-safe; `line` holds `at` bytes; an
    // all-zero sigaction with SIG_DFL (0) is the default action. The filter allows all three
    // calls (write, rt_sigaction, and the getpid, gettid and tgkill of raise).
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), at);
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &default, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
    }
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// A rule matching when argument `index` compares to `value` by `op`.
fn rule(index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    SeccompRule::new(vec![SeccompCondition::new(index, len, op, value).map_err(build)?]).map_err(build)
}

/// Everything the `profile`'s process does, and nothing else: any other call is refused with
/// SIGSYS ([`on_sigsys`]), which ends the process.
fn allow_list(profile: Profile) -> Result<BpfProgram, SeccompError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let runs_vms = profile != Profile::Puller;
    let changes_files = if runs_vms { CHANGES_FILES } else { &[] };
    let allowed = ALLOWED.iter().chain(changes_files);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed.map(|&call| (call, Vec::new())).collect();
    let mut ioctls = Vec::new();
    if runs_vms {
        ioctls.push(rule(1, Dword, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)?);
    }
    for &request in OTHER_IOCTLS {
        ioctls.push(rule(1, Dword, SeccompCmpOp::Eq, request)?);
    }
    if matches!(profile, Profile::Agent | Profile::VmmWithPeer) {
        // Each VM's memory of an image a peer holds gets a userfaultfd (`crate::lazy`), whose
        // requests are type 0xAA.
        rules.insert(libc::SYS_userfaultfd, Vec::new());
        ioctls.push(rule(1, Dword, SeccompCmpOp::MaskedEq(0xff00), 0xAA << 8)?);
    }
    if profile == Profile::Puller {
        // A file is opened only to be read.
        let writes = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
        rules.insert(libc::SYS_openat, vec![rule(2, Dword, SeccompCmpOp::MaskedEq(writes), 0)?]);
    }
    let families: &[i32] = match profile {
        Profile::Vmm | Profile::Agent => &[libc::AF_UNIX],
        Profile::Puller | Profile::VmmWithPeer => {
            // Name resolution: glibc sends its A and AAAA queries at once, and asks how much
            // a TCP answer holds.
            rules.insert(libc::SYS_sendmmsg, Vec::new());
            rules.insert(libc::SYS_uname, Vec::new());
            ioctls.push(rule(1, Dword, SeccompCmpOp::Eq, libc::FIONREAD)?);
            &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        }
    };
    rules.insert(libc::SYS_ioctl, ioctls);
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(0, Qword, SeccompCmpOp::MaskedEq(thread), thread)?]);
    let sockets = families.iter().map(|&f| rule(0, Dword, SeccompCmpOp::Eq, f as u64)).collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_socket, sockets);
    let names = [libc::PR_SET_NAME, libc::PR_GET_NAME];
    rules.insert(
        libc::SYS_prctl,
        names.iter().map(|&n| rule(0, Dword, SeccompCmpOp::Eq, n as u64)).collect::<Result<_, _>>()?,
    );
    build(rules, SeccompAction::Trap, SeccompAction::Allow)
}

/// `clone3` fails with `ENOSYS` (its flags cannot be checked), so that glibc uses `clone`.
fn clone3_unavailable() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    build(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        assert!(!allow_list(Profile::Vmm).unwrap().is_empty());
        assert!(!allow_list(Profile::Puller).unwrap().is_empty());
        assert!(!allow_list(Profile::VmmWithPeer).unwrap().is_empty());
        assert!(!allow_list(Profile::Agent).unwrap().is_empty());
        assert!(!clone3_unavailable().unwrap().is_empty());
    }
}
