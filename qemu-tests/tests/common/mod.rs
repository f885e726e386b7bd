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
