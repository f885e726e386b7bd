//! What every test file shares: running the real `thaw` binary (an artifact dependency of this
//! crate) and keeping what it printed.

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
pub fn run_thaw(args: &[&str]) -> Run {
    let output = Command::new(THAW).args(args).output().expect("thaw must start");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
