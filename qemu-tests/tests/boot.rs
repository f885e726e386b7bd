//! Each test kernel boots under `thaw run` (KVM) and `thaw qemu` (QEMU TCG); both must print the
//! same output, give the same reason line and exit with the same code.

use std::path::Path;
use std::process::Command;

mod common;

use common::{Run, run_thaw};

/// The test kernels, built for x86_64-unknown-none by this crate's artifact dependency.
fn kernel(name: &str) -> &'static str {
    match name {
        "thaw-guest" => env!("CARGO_BIN_FILE_GUEST_KERNEL_thaw-guest"),
        "test-panic" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-panic"),
        "test-fault" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-fault"),
        "test-spin" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-spin"),
        "test-bad-hypercall" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-bad-hypercall"),
        "test-triple-fault" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-triple-fault"),
        "test-bad-device" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-bad-device"),
        "test-log-flood" => env!("CARGO_BIN_FILE_GUEST_KERNEL_test-log-flood"),
        other => panic!("no test kernel {other}"),
    }
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test boots a guest under KVM and needs /dev/kvm, which this machine lacks"
    );
}

fn require_qemu() {
    let found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "this test boots a guest under QEMU and needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
}

fn thaw(hypervisor: &str, kernel_name: &str, timeout: &str) -> Run {
    match hypervisor {
        "run" => require_kvm(),
        _ => require_qemu(),
    }
    run_thaw(&[hypervisor, "--kernel", kernel(kernel_name), "--timeout", timeout])
}

/// Boots `kernel_name` under both hypervisors at once, checks they agree, and returns the KVM run.
fn both(kernel_name: &str, timeout: &str) -> Run {
    let (kvm, qemu) = std::thread::scope(|s| {
        let qemu = s.spawn(|| thaw("qemu", kernel_name, timeout));
        (thaw("run", kernel_name, timeout), qemu.join().expect("qemu run"))
    });
    assert_eq!(kvm.stdout, qemu.stdout, "guest output differs between KVM and QEMU\nkvm: {kvm:#?}\nqemu: {qemu:#?}");
    assert_eq!(kvm.code, qemu.code, "exit code differs between KVM and QEMU\nkvm: {kvm:#?}\nqemu: {qemu:#?}");
    assert_eq!(kvm.stderr, qemu.stderr, "reason differs between KVM and QEMU\nkvm: {kvm:#?}\nqemu: {qemu:#?}");
    kvm
}

fn banner() -> String {
    format!("thaw-guest {} (abi {})\n", env!("CARGO_PKG_VERSION"), abi::INTERFACE_VERSION)
}

#[test]
fn shipped_kernel_reaches_ready_in_ring3_under_both_hypervisors() {
    let run = both("thaw-guest", "30");
    assert_eq!(run.stdout, format!("{}thaw-guest: ready (cpl 3)\n", banner()));
    assert_eq!(run.code, Some(0));
    assert_eq!(run.stderr, "");
}

#[test]
fn panic_is_reported_with_message_and_location_under_both_hypervisors() {
    let run = both("test-panic", "30");
    assert_eq!(run.stdout, format!("{}test-panic: about to panic\n", banner()));
    assert_eq!(run.code, Some(abi::exit_code::PANIC as i32));
    assert!(
        run.stderr.starts_with(
            "thaw: guest panicked: deliberate test panic (code 42) at guest-kernel/src/bin/test-panic.rs:"
        ),
        "{run:#?}"
    );
}

#[test]
fn ring3_page_fault_is_reported_with_vector_rip_and_cr2_under_both_hypervisors() {
    let run = both("test-fault", "30");
    assert_eq!(run.code, Some(abi::exit_code::FAULT as i32));
    let line = run.stderr.trim_end();
    assert!(line.starts_with("thaw: guest fault: #PF page fault (vector 14) in ring 3 at rip 0x"), "{run:#?}");
    assert!(line.ends_with("error code 0x6, cr2 0xbadc0de0000"), "{run:#?}");
}

#[test]
fn spinning_guest_is_stopped_by_the_timeout_under_both_hypervisors() {
    // Long enough for QEMU's firmware and bootloader to reach the kernel on a loaded machine.
    let run = both("test-spin", "20");
    assert_eq!(run.stdout, format!("{}test-spin: spinning forever\n", banner()));
    assert_eq!(run.code, Some(abi::exit_code::TIMEOUT as i32));
    assert_eq!(run.stderr, "thaw: guest timed out after 20.0 s\n");
}

/// Issue 14, defect 4: a guest that writes without end (its log, COM1 without a newline) grew
/// the host's buffers without end. A run's log stops at its ceiling, with one line saying so.
#[test]
fn a_guest_flooding_its_log_is_cut_at_the_ceiling_under_kvm() {
    let ceiling = 1 << 20; // 1 MiB per stream and run, as the README says
    let run = thaw("run", "test-log-flood", "60");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let notice = format!("[thaw: the guest's log passed {ceiling} bytes; the rest is dropped]\n");
    // COM1 lines go out at 4096 bytes without their newline.
    let head = format!("{}test-log-flood: flooding\n{}xxx", banner(), "y".repeat(8192));
    assert!(run.stdout.starts_with(&head), "{}", &run.stdout[..200]);
    assert!(run.stdout.ends_with(&notice), "{}", &run.stdout[run.stdout.len() - 200..]);
    // The ceiling, then the notice, on a line of its own.
    assert!((0..=1).contains(&(run.stdout.len() - notice.len() - ceiling)), "{} bytes", run.stdout.len());
}

#[test]
fn undefined_hypercall_fails_only_that_vm_under_kvm() {
    let run = thaw("run", "test-bad-hypercall", "10");
    assert_eq!(run.code, Some(abi::exit_code::GUEST_FAILURE as i32), "{run:#?}");
    assert!(
        run.stderr.starts_with("thaw: guest failed: malformed hypercall: unknown hypercall number 31 (rip 0x"),
        "{run:#?}"
    );
}

#[test]
fn triple_fault_fails_only_that_vm_under_kvm() {
    let run = thaw("run", "test-triple-fault", "10");
    assert_eq!(run.stdout, format!("{}test-triple-fault: wiping the IDT\n", banner()));
    assert_eq!(run.code, Some(abi::exit_code::GUEST_FAILURE as i32), "{run:#?}");
    assert!(run.stderr.starts_with("thaw: guest failed: triple fault: "), "{run:#?}");
    assert!(run.stderr.contains("(rip 0x"), "{run:#?}");
}

#[test]
fn a_guest_misusing_a_virtio_device_fails_only_its_vm_under_kvm() {
    require_kvm();
    let run = |devices: &[&str]| {
        let mut args = vec!["run", "--kernel", kernel("test-bad-device"), "--timeout", "10"];
        args.extend_from_slice(devices);
        run_thaw(&args)
    };
    let hostile = run(&["--devices", "entropy,console"]);
    assert_eq!(hostile.code, Some(abi::exit_code::GUEST_FAILURE as i32), "{hostile:#?}");
    assert!(
        hostile.stderr.starts_with(&format!(
            "thaw: guest failed: virtio device register at {:#x}: write of 4 byte(s) at register offset 0x0 (rip 0x",
            abi::devices::DEVICE_WINDOW_GPA
        )),
        "{hostile:#?}"
    );
    assert!(hostile.stdout.ends_with("test-bad-device: writing the magic register of entropy 0\n"), "{hostile:#?}");
    let without = run(&[]);
    assert_eq!(without.code, Some(0), "{without:#?}");
    assert!(without.stdout.ends_with("test-bad-device: no virtio devices\n"), "{without:#?}");
}
