//! The `thaw` CLI against files and inputs that are not what it needs (not thaw kernels, or
//! endless): each must end with exit code 125 and exactly one line on stderr naming the
//! problem, never a panic.

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
    let huge = rejected(&["run", "--timeout", "1e100"]);
    assert!(huge.contains("--timeout 1e100: must be a positive number of seconds, at most 31536000"), "{huge}");
    assert!(rejected(&["qemu", "--kernel", "/bin/ls"]).contains("is not ET_EXEC"));
    assert!(rejected(&["run", "--ramdisk", "/nonexistent/r"]).contains("reading ramdisk /nonexistent/r"));
    assert!(rejected(&["qemu", "--ramdisk", "/nonexistent/r"]).contains("reading ramdisk /nonexistent/r"));
}

/// Issue 14, defect 2: a device or a pipe says its size is 0, and was read to the end whatever
/// its length. Each read is now capped by the bytes it reads, and fails at once with one line.
#[test]
fn endless_inputs_are_cut_at_their_cap() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("hello.thaw");
    let bundle = bundle.to_str().unwrap();
    let packed = Command::new(THAW).args(["pack", "--example", "hello", "-o", bundle]).output().unwrap();
    assert!(packed.status.success(), "{}", String::from_utf8_lossy(&packed.stderr));
    for (args, cap) in [
        (vec!["invoke", "/dev/null", "--input", "/dev/zero"], "16777216"),
        (vec!["pack", "/dev/zero", "-o", "/nonexistent/f.thaw"], "268435456"),
        (vec!["run", "--kernel", "/dev/zero"], "268435456"),
        (vec!["run", "--ramdisk", "/dev/zero"], "67108864"),
        (vec!["qemu", "--ramdisk", "/dev/zero"], "67108864"),
        (vec!["qemu", "--input", "/dev/zero", bundle], "16777216"),
    ] {
        let line = rejected(&args);
        assert!(line.contains(&format!("/dev/zero: more than the {cap}-byte limit")), "{args:?}: {line}");
    }
    // Through a pipe, one byte over the request cap is refused rather than sent to the guest.
    let stderr = oversized_request_through_a_pipe("/dev/stdin");
    assert!(stderr.contains("more than the 16777216-byte limit"), "{stderr}");
}

/// Usage errors are thaw's own failure: exit 125 and one line, as for any other bad input.
#[test]
fn usage_errors_exit_125_with_one_line() {
    assert!(rejected(&["pack", "--bogus"]).contains("unexpected argument '--bogus'"));
    assert!(rejected(&["invoke"]).contains("required"));
    // Issue 28, defect 11: the missing arguments are named.
    let missing = rejected(&["snapshot", "x.thaw"]);
    assert!(missing.contains("not provided: --output <FUNCTION.snap> (see --help)"), "{missing}");
    assert!(rejected(&["frobnicate"]).contains("unrecognized subcommand 'frobnicate'"));
    let help = Command::new(THAW).args(["pack", "--help"]).output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--scratch-mib"));
}

#[test]
fn a_wasm_component_is_refused_with_what_to_build_instead() {
    let component = scratch("component", b"\0asm\x0d\0\x01\0");
    let line = rejected(&["pack", component.to_str().unwrap(), "-o", "/nonexistent/c.thaw"]);
    assert!(line.contains("components are not supported yet; build for wasm32-wasip1"), "{line}");
}

/// `thaw invoke --input INPUT` with one byte more than the request cap piped in: its stderr,
/// once it has exited 125.
fn oversized_request_through_a_pipe(input: &str) -> String {
    let mut child = Command::new("sh")
        .args(["-c", &format!("head -c {} /dev/zero | {THAW} invoke /dev/null --input {input}", (16 << 20) + 1)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(125), "{stderr}");
    stderr
}

#[test]
fn a_request_on_standard_input_is_capped_too() {
    let stderr = oversized_request_through_a_pipe("-");
    assert_eq!(stderr, "thaw: error: --input -: the request is larger than 16777216 bytes\n");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef thaw"), ("fish", "complete -c thaw")] {
        let out = Command::new(THAW).args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker) && script.contains("scratch-mib"), "{shell}: {script}");
    }
}

/// Issue 28, defect 8: a token no header can carry is refused at start, as a short one is.
#[test]
fn serve_refuses_an_admin_token_no_request_could_match() {
    let state = tempfile::tempdir().unwrap();
    for token in ["short", "sixteen-or-more-ümlauts", "has a space in the middle"] {
        let file = scratch("token", token.as_bytes());
        let line = rejected(&[
            "serve",
            "--admin-token-file",
            file.to_str().unwrap(),
            "--state-dir",
            state.path().to_str().unwrap(),
        ]);
        assert!(line.contains("the token must be at least 16 printable ASCII characters, with no spaces"), "{line}");
    }
}
