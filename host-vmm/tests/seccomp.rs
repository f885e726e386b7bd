//! The syscall allow-list (`host_vmm::seccomp`) under real VMs: a vCPU thread that runs the
//! floor guest, fresh and kept (restored, run, reset), works under the filter, and a call off the
//! list made on that thread kills the whole process with SIGSYS, after one line naming the call.
//!
//! A filter cannot be removed once installed, so each case runs this test binary again as a
//! child process ([`child`]) and looks at how it ended.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

/// Set in the child's environment: what it does under the filter.
const CHILD: &str = "THAW_SECCOMP_CHILD";

/// How the child doing `what` ended, and what it wrote to stderr.
fn run_child(what: &str) -> (ExitStatus, String) {
    assert!(std::path::Path::new("/dev/kvm").exists(), "this test runs VMs under KVM and needs /dev/kvm");
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads", "1", "--nocapture"])
        .env(CHILD, what)
        .output()
        .unwrap();
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The child's work; a no-op when the test runs on its own, outside a child.
#[test]
fn child() {
    let Ok(what) = std::env::var(CHILD) else { return };
    host_vmm::seccomp::install().unwrap();
    std::thread::Builder::new()
        .name("thaw-vcpu-0".into())
        .spawn(move || {
            host_vmm::floor::measure(3).unwrap();
            if what == "forbidden" {
                // SAFETY: execve with a valid path and empty argument lists; the filter kills
                // the process before the kernel looks at them.
                unsafe {
                    let argv = [std::ptr::null::<libc::c_char>()];
                    libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), argv.as_ptr(), argv.as_ptr());
                }
                eprintln!("execve returned under the filter");
                std::process::exit(3);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn vms_run_under_the_filter() {
    let (status, stderr) = run_child("normal");
    assert!(status.success(), "{status:?}: {stderr}");
}

#[test]
fn a_call_off_the_list_on_a_vcpu_thread_kills_the_process_saying_which() {
    let (status, stderr) = run_child("forbidden");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {stderr}");
    let line = format!("thaw: system call {} is not on thaw's allow-list", libc::SYS_execve);
    assert!(stderr.contains(&line), "{stderr}");
    assert!(!stderr.contains("execve returned"), "{stderr}");
}
