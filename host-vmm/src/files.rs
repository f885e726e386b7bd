//! Files thaw creates and reads.
//!
//! What it creates (images, bundles) is written atomically, as a temporary file in the
//! destination's directory that is synced and then renamed over it, and only where a regular
//! file belongs. A destination that is a symbolic link is written through: the file it names is
//! replaced and the link stays. One that is anything else but a regular file (a device, a FIFO,
//! a directory, a socket) is refused, so that `-o /dev/null` never replaces a device node.
//!
//! A draft (a file being written, under a temporary name) is removed when it is dropped
//! unpersisted, and also when the process is told to stop: a command that writes drafts calls
//! [`remove_drafts_on_signal`] first, so that SIGTERM, SIGINT or SIGHUP leave no `.tmp` file.
//!
//! What it reads from a path a user gave can never hang it or grow it without bound: a file that
//! must be mapped or seeked (an image, a bundle) is opened without blocking and refused unless
//! it is a regular file ([`open_regular`]); anything read whole (a request, a module, a kernel)
//! may be a pipe or a device, and is read up to a byte limit and within a time limit
//! ([`read_capped`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The system refused.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// It holds more than the reader takes.
    #[error("more than the {limit}-byte limit")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// It did not end in time (a FIFO nobody writes, a pipe that never closes).
    #[error("it did not end within {:.1} s", within.as_secs_f64())]
    TimedOut {
        /// The time it had.
        within: Duration,
    },
}

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

/// Opens `path` to read, without blocking (a FIFO with no writer opens at once), and refuses
/// it, naming what it is, unless it is a regular file.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("is {}, not a regular file", describe(&kind))));
    }
    Ok(file)
}

/// Opens `path` to write output to (appended, or replacing what it held), created if missing,
/// without blocking on it: a FIFO or a socket, which could stall the writer (a vCPU thread, a
/// batch's worker) for ever, is refused; a regular file or a character device (a terminal,
/// `/dev/null`) is taken, and written to blocking as usual.
pub fn open_output(path: &Path, append: bool) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |kind: std::fs::FileType| -> io::Result<()> {
        if kind.is_fifo() || kind.is_socket() {
            let what = format!("is {}; give a regular file or a terminal", describe(&kind));
            return Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        }
        Ok(())
    };
    // Looked at first, for the message: opening a FIFO with no reader fails with ENXIO.
    if let Ok(metadata) = std::fs::metadata(path) {
        refuse(metadata.file_type())?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    refuse(file.metadata()?.file_type())?;
    let flags = if append { libc::O_APPEND } else { 0 };
    // SAFETY: fcntl on our own descriptor; it only clears O_NONBLOCK again.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Reads all of `path`, which may be a regular file, a pipe, a FIFO or a device: at most `limit`
/// bytes (counted as they are read: a pipe's size says nothing), and only for `within`: a FIFO
/// whose writer never comes, or a stream that never ends, is an error once the time is up.
pub fn read_capped(path: &Path, limit: u64, within: Duration) -> Result<Vec<u8>, FileError> {
    let deadline = Instant::now() + within;
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let len = file.metadata()?.len();
    if len > limit {
        return Err(FileError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        wait_readable(&file, deadline, within)?;
        match file.read(&mut chunk) {
            Ok(0) => return Ok(bytes),
            Ok(n) if (bytes.len() + n) as u64 > limit => return Err(FileError::TooLarge { limit }),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `file` has something to read or has ended, at most until `deadline`. Linux
/// reports a FIFO whose writer has not come yet as neither, so it is waited for too.
fn wait_readable(file: &File, deadline: Instant, within: Duration) -> Result<(), FileError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd of our own, valid for the call.
    match unsafe { libc::poll(&mut poll, 1, ms) } {
        0 => Err(FileError::TimedOut { within }),
        n if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted => {
            Err(io::Error::last_os_error().into())
        }
        _ => Ok(()),
    }
}

/// The paths of the drafts alive in this process.
static DRAFTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn drafts() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    DRAFTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A file being written under a temporary name: removed when dropped unpersisted, or when the
/// process is told to stop ([`remove_drafts_on_signal`]).
#[derive(Debug)]
pub struct Draft {
    // Forgotten before the file is persisted or removed (fields drop in order).
    registered: Registered,
    file: tempfile::NamedTempFile,
}

/// A draft's entry in [`DRAFTS`], taken out when dropped.
#[derive(Debug)]
struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        drafts().retain(|path| *path != self.0);
    }
}

impl Draft {
    /// A new draft in `dir`, named `prefix`, random characters, `suffix`.
    pub fn new_in(dir: &Path, prefix: &str, suffix: &str) -> io::Result<Self> {
        let file = tempfile::Builder::new().prefix(prefix).suffix(suffix).tempfile_in(dir)?;
        drafts().push(file.path().to_path_buf());
        Ok(Self { registered: Registered(file.path().to_path_buf()), file })
    }

    /// A new draft beside `destination` (from [`destination`]), to be renamed over it with
    /// [`Draft::persist`] once written and synced.
    pub fn beside(destination: &Path) -> io::Result<Self> {
        let dir = destination.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::new_in(dir, ".tmp", "")
    }

    /// The open file.
    pub fn file(&self) -> &File {
        self.file.as_file()
    }

    /// Its temporary name.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Renames it to `destination`, where it stays.
    pub fn persist(self, destination: &Path) -> io::Result<()> {
        let Self { registered, file } = self;
        drop(registered);
        file.persist(destination).map(drop).map_err(|e| e.error)
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP remove every [`Draft`] alive and then end the process as
/// the signal would have (exit status 128 + its number). Call it before the process starts any
/// other thread: it blocks those signals in this thread, every thread started later inherits
/// that, and one thread of its own waits for them.
pub fn remove_drafts_on_signal() -> io::Result<()> {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialize.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is our own; sigemptyset/sigaddset only write it, and pthread_sigmask only
    // changes this thread's mask.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        return Err(io::Error::from_raw_os_error(blocked));
    }
    std::thread::Builder::new().name("thaw-signals".into()).spawn(move || {
        loop {
            let mut signal = 0;
            // SAFETY: waits for one of the signals in our own set, which every thread blocks.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                for path in drafts().iter() {
                    let _ = std::fs::remove_file(path);
                }
                std::process::exit(128 + signal);
            }
        }
    })?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (see the module's doc).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let destination = destination(path)?;
    let draft = Draft::beside(&destination)?;
    draft.file().write_all(bytes)?;
    draft.file().sync_all()?;
    draft.persist(&destination)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &Path) -> PathBuf {
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `name` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        fifo
    }

    /// Issue 14, defects 2 and 6: reads trusted a file's size (0 for a pipe or a device) and
    /// waited forever for a FIFO's writer.
    #[test]
    fn reads_stop_at_their_byte_limit_and_their_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let second = Duration::from_secs(1);
        let e = read_capped(Path::new("/dev/zero"), 1 << 20, second).unwrap_err();
        assert_eq!(e.to_string(), "more than the 1048576-byte limit");
        let fifo = fifo(dir.path());
        let started = Instant::now();
        let e = read_capped(&fifo, 1 << 20, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.to_string(), "it did not end within 0.3 s");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A writer that comes later is waited for.
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(fifo, b"late but whole").unwrap();
            })
        };
        assert_eq!(read_capped(&fifo, 1 << 20, Duration::from_secs(30)).unwrap(), b"late but whole");
        writer.join().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_capped(&file, 5, second).unwrap(), b"12345");
        assert_eq!(read_capped(&file, 4, second).unwrap_err().to_string(), "more than the 4-byte limit");

        assert!(open_regular(&file).is_ok());
        for append in [true, false] {
            let e = open_output(&fifo, append).unwrap_err().to_string();
            assert_eq!(e, "is a FIFO; give a regular file or a terminal");
            assert!(open_output(Path::new("/dev/null"), append).is_ok());
        }
        open_output(&file, true).unwrap().write_all(b"67").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"1234567");
        open_output(&file, false).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert_eq!(e, "is a FIFO, not a regular file");
        assert_eq!(open_regular(dir.path()).unwrap_err().to_string(), "is a directory, not a regular file");
    }

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

        let fifo = fifo(dir.path());
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
