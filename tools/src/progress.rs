//! One status line on stderr while long work runs: shown only when stderr is a terminal,
//! redrawn in place, and erased when the work ends, so pipes and logs never see it.

use std::io::IsTerminal as _;

/// A status line, erased when dropped.
pub struct Status {
    shown: bool,
}

impl Status {
    /// Shows `what` until the returned status is dropped (on a terminal only).
    pub fn show(what: &str) -> Self {
        let status = Self { shown: std::io::stderr().is_terminal() };
        status.update(what);
        status
    }

    /// Replaces the line with `what`.
    pub fn update(&self, what: &str) {
        if self.shown {
            eprint!("\r{what}\x1b[K");
        }
    }
}

impl Drop for Status {
    fn drop(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
        }
    }
}
