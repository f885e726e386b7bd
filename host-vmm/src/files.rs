//! Files thaw creates (images, bundles): written atomically, as a temporary file in the
//! destination's directory that is synced and then renamed over it, and only where a regular
//! file belongs. A destination that is a symbolic link is written through: the file it names is
//! replaced and the link stays. One that is anything else but a regular file (a device, a FIFO,
//! a directory, a socket) is refused, so that `-o /dev/null` never replaces a device node.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Most symbolic links followed from a destination (Linux's own limit).
const MAX_LINKS: usize = 40;

/// The path an atomic write to `path` must replace: `path` itself, or the file the symbolic
/// links starting at it name. An error, naming what is there, for anything that is not a
/// regular file or missing.
pub fn destination(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let metadata = match std::fs::symlink_metadata(&current) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            other => other?,
        };
        let kind = metadata.file_type();
        if kind.is_file() {
            return Ok(current);
        }
        if !kind.is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {}, not a regular file; thaw writes only regular files",
                    current.display(),
                    describe(&kind)
                ),
            ));
        }
        let target = std::fs::read_link(&current)?;
        current = match current.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: more than {MAX_LINKS} symbolic links", path.display()),
    ))
}

/// What a file that is neither regular nor a link is, in words.
fn describe(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something"
    }
}

/// A new temporary file in the directory of `destination` (from [`destination`]), to be
/// renamed over it with `persist` once written and synced. Dropped unpersisted, it is removed.
pub fn draft(destination: &Path) -> io::Result<tempfile::NamedTempFile> {
    let dir = destination.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    tempfile::NamedTempFile::new_in(dir)
}

/// Writes `bytes` to `path` atomically (see the module's doc).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let destination = destination(path)?;
    let mut file = draft(&destination)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(&destination).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_written_through_and_anything_irregular_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/target.thaw");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.thaw");
        std::os::unix::fs::symlink("sub/target.thaw", &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");

        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `name` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let refused = write_atomically(&fifo, b"x").unwrap_err().to_string();
        assert!(refused.ends_with("is a FIFO, not a regular file; thaw writes only regular files"), "{refused}");
        assert!(destination(dir.path()).unwrap_err().to_string().contains("is a directory"));
        assert!(destination(Path::new("/dev/null")).unwrap_err().to_string().contains("is a character device"));

        let missing = dir.path().join("new.thaw");
        assert_eq!(destination(&missing).unwrap(), missing);
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink("loop", &looped).unwrap();
        assert!(destination(&looped).unwrap_err().to_string().contains("more than 40 symbolic links"));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(left.len(), 1, "no draft is left behind");
    }
}
