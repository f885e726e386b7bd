//! Files a command reads whole or writes atomically, each error naming the file and what it
//! was for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use host_vmm::files::FileError;

/// A file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The system refused to read it.
    #[error("reading {what} {}: {source}", path.display())]
    Unreadable {
        /// What the file is for ("kernel", "bundle").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It was read, but is larger than its limit or did not end in time.
    #[error("{what} {}: {source}", path.display())]
    Refused {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: FileError,
    },
    /// It could not be written.
    #[error("writing {}: {source}", path.display())]
    Unwritable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The handler that removes half-written files on SIGTERM could not be installed.
    #[error("watching for SIGTERM: {0}")]
    Signals(std::io::Error),
}

/// How long a command without a `--timeout` of its own waits for a file it reads whole (a FIFO
/// whose writer never comes).
pub const READ_WITHIN: Duration = Duration::from_secs(30);

/// Reads a file (or a pipe, a FIFO, a device) of at most `limit` bytes within `within`
/// ([`host_vmm::files::read_capped`]), naming it in every error.
pub fn read_limited(path: &Path, limit: u64, what: &'static str, within: Duration) -> Result<Vec<u8>, FilesError> {
    host_vmm::files::read_capped(path, limit, within).map_err(|e| match e {
        FileError::Io(source) => FilesError::Unreadable { what, path: path.to_path_buf(), source },
        source => FilesError::Refused { what, path: path.to_path_buf(), source },
    })
}

/// Writes `bytes` to `path` atomically, and only as a regular file (`host_vmm::files`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    host_vmm::files::write_atomically(path, bytes)
        .map_err(|source| FilesError::Unwritable { path: path.to_path_buf(), source })
}

/// Removes this process's half-written files if it is stopped by SIGTERM
/// ([`host_vmm::files::remove_drafts_on_signal`]).
pub fn remove_drafts_on_signal() -> Result<(), FilesError> {
    host_vmm::files::remove_drafts_on_signal().map_err(FilesError::Signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_the_file_and_what_it_is_for() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.thaw");
        let e = read_limited(&missing, 10, "function bundle", READ_WITHIN).unwrap_err().to_string();
        assert!(e.starts_with(&format!("reading function bundle {}: ", missing.display())), "{e}");
        let large = dir.path().join("large");
        std::fs::write(&large, [0; 11]).unwrap();
        let e = read_limited(&large, 10, "request", READ_WITHIN).unwrap_err().to_string();
        assert_eq!(e, format!("request {}: more than the 10-byte limit", large.display()));
        assert_eq!(read_limited(&large, 11, "request", READ_WITHIN).unwrap(), [0; 11]);
        let e = write_atomically(&dir.path().join("no/such/dir/out"), b"x").unwrap_err().to_string();
        assert!(e.starts_with(&format!("writing {}: ", dir.path().join("no/such/dir/out").display())), "{e}");
    }
}
