//! What every test file shares: running the real `thaw` binary (an artifact dependency of this
//! crate) and keeping what it printed.

use std::path::Path;
use std::process::Command;

/// The `thaw` binary this build produced.
pub const THAW: &str = env!("CARGO_BIN_FILE_TOOLS_thaw");

/// How a `thaw` run ended and what it printed.
#[derive(Debug)]
pub struct Run {
    /// Its exit code (`None` if a signal ended it).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `thaw` with `args` to the end.
#[allow(dead_code)] // each test file compiles this module, and not every one runs thaw this way
pub fn run_thaw(args: &[&str]) -> Run {
    run(Command::new(THAW).args(args))
}

/// Runs `command` to the end.
pub fn run(command: &mut Command) -> Run {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?} must start: {e}"));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Serves `count` requests of `data` from the snapshot image at `image` with `thaw restore` in
/// `mode`, and returns each response's record (`--responses`, written beside the image).
#[allow(dead_code)] // not every test file restores
pub fn restore(image: &str, mode: &str, count: usize, data: &str) -> Vec<serde_json::Value> {
    let responses = std::path::Path::new(image).with_file_name(format!("{mode}.jsonl"));
    let count_text = count.to_string();
    let run = run_thaw(&[
        "restore",
        image,
        "--mode",
        mode,
        "--count",
        &count_text,
        "--data",
        data,
        "--responses",
        responses.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0), "{mode}: {run:#?}");
    let lines = std::fs::read_to_string(&responses).unwrap();
    let records: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), count, "{mode}");
    records
}

/// Answers `data` with `bundle` under KVM and under QEMU at once; both must agree on the
/// response, stderr and exit code. Returns the KVM run.
#[allow(dead_code)] // not every test file runs both
pub fn both(bundle: &str, data: &str) -> Run {
    assert!(Path::new("/dev/kvm").exists(), "thaw invoke boots a guest under KVM and needs /dev/kvm");
    let (kvm, emulated) = std::thread::scope(|s| {
        let emulated = s.spawn(|| run_thaw(&["qemu", bundle, "--data", data, "--timeout", "120"]));
        (run_thaw(&["invoke", bundle, "--data", data]), emulated.join().expect("qemu run"))
    });
    assert_eq!(kvm.stdout, emulated.stdout, "response differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    assert_eq!(kvm.stderr, emulated.stderr, "stderr differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    assert_eq!(kvm.code, emulated.code, "exit code differs\nkvm: {kvm:#?}\nqemu: {emulated:#?}");
    kvm
}

/// Writes `files` (path, text) into a fresh directory: a function's source.
#[allow(dead_code)] // not every test file writes functions
pub fn function(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    dir
}

/// Snapshots `bundle` into `function.snap` in `dir` and returns the image's path.
#[allow(dead_code)] // not every test file snapshots this way
pub fn snapshot(dir: &Path, bundle: &str) -> String {
    let image = dir.join("function.snap");
    let run = run_thaw(&["snapshot", bundle, "-o", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    image.to_str().unwrap().to_string()
}
