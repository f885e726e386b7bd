//! The `thaw` CLI against files that are not thaw kernels: each must end with exit code 125 and
//! exactly one line on stderr naming the problem, never a panic.

use std::path::Path;
use std::process::Command;

const THAW: &str = env!("CARGO_BIN_EXE_thaw");
const GUEST: &str = env!("CARGO_BIN_FILE_GUEST_KERNEL_thaw-guest");

fn rejected(args: &[&str]) -> String {
    let output = Command::new(THAW).args(args).output().expect("thaw must start");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(125), "args {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "args {args:?}: expected one line, got {stderr:?}");
    assert!(!stderr.contains("panicked"), "args {args:?}: {stderr}");
    assert!(output.stdout.is_empty(), "args {args:?}: the guest must not have run");
    stderr
}

fn scratch(name: &str, bytes: &[u8]) -> tempfile::TempPath {
    let file = tempfile::Builder::new().prefix(name).tempfile().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    file.into_temp_path()
}

fn kernel_run(path: &Path) -> String {
    rejected(&["run", "--kernel", path.to_str().unwrap()])
}

#[test]
fn rejects_a_host_program() {
    let line = kernel_run(Path::new("/bin/ls"));
    assert!(line.contains("is not ET_EXEC"), "{line}");
}

#[test]
fn rejects_an_empty_file() {
    let empty = scratch("empty", b"");
    assert!(kernel_run(&empty).ends_with("kernel file is empty\n"));
}

#[test]
fn rejects_every_kind_of_truncated_guest_kernel() {
    let guest = std::fs::read(GUEST).unwrap();
    for len in [1, 4, 63, 64, 200, guest.len() / 2, guest.len() - 1] {
        let cut = scratch("truncated", &guest[..len]);
        let line = kernel_run(&cut);
        assert!(line.starts_with("thaw: error: kernel "), "{len}: {line}");
    }
}

#[test]
fn rejects_a_kernel_built_for_another_interface_version() {
    let mut guest = std::fs::read(GUEST).unwrap();
    let note = guest.windows(12).position(|w| w[..8] == *b"Thaw\0\0\0\0").expect("guest has a thaw note");
    guest[note + 8..note + 12].copy_from_slice(&99u32.to_le_bytes());
    let line = kernel_run(&scratch("abi99", &guest));
    let expected =
        format!("kernel speaks thaw interface version 99, this VMM speaks version {}", abi::INTERFACE_VERSION);
    assert!(line.contains(&expected), "{line}");
}

#[test]
fn rejects_missing_files_and_bad_option_values() {
    assert!(kernel_run(Path::new("/nonexistent/kernel")).contains("reading kernel /nonexistent/kernel"));
    assert!(rejected(&["run", "--memory", "1"]).contains("memory size 1 MiB"));
    assert!(rejected(&["run", "--timeout", "0"]).contains("--timeout 0: must be a positive"));
    assert!(rejected(&["run", "--timeout", "NaN"]).contains("--timeout NaN"));
    assert!(rejected(&["qemu", "--kernel", "/bin/ls"]).contains("is not ET_EXEC"));
}
