//! The data volume: a read-only tree of files that `thaw pack --data-dir` builds and the guest
//! reads through the virtio block device, where the function sees it as `/data`.
//!
//! ```text
//!   offset  size  field
//!   0       8     magic "THAWVOL\0"
//!   8       4     format version (1)
//!   12      4     entry count (at most MAX_ENTRIES)
//!   16      8     directory length in bytes (at most MAX_DIRECTORY_BYTES)
//!   24      8     total length: a multiple of 512, at most MAX_VOLUME_BYTES
//!   32      4     CRC-32 (IEEE) of header bytes 0..32 followed by the directory
//!   36      28    reserved, zero
//!   64      ...   directory: one entry per file or directory, sorted by path
//!   ...           file data, each file at a 512-byte-aligned offset after the directory
//! ```
//!
//! A directory entry is kind u8 (1 file, 2 directory), a reserved u8, the path length u16,
//! a reserved u32, the data offset u64 and size u64 (both 0 for a directory), then the path's
//! UTF-8 bytes padded to 8. Paths are relative and `/`-separated; no component is empty, `.`
//! or `..`; every parent directory has its own entry; paths are unique and strictly increasing.
//! A reader checks all of that, and that every file lies inside the volume after the
//! directory, before it trusts any entry.

use alloc::string::String;
use alloc::vec::Vec;

use crate::codec::{crc32, magic, u32_at, u64_at};

/// The volume magic.
pub const MAGIC: [u8; 8] = magic::VOLUME;
/// The only format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Header size.
pub const HEADER_LEN: usize = 64;
/// The block size: file data and the volume's length are aligned to it.
pub const SECTOR: u64 = 512;
/// Most entries (files and directories).
pub const MAX_ENTRIES: usize = 4096;
/// Largest directory.
pub const MAX_DIRECTORY_BYTES: u64 = 1 << 20;
/// Largest volume.
pub const MAX_VOLUME_BYTES: u64 = 1 << 30;
/// Longest path.
pub const MAX_PATH_BYTES: usize = 255;
const ENTRY_FIXED: usize = 24;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// One file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Its path, relative to the volume's root.
    pub path: String,
    /// Where a file's bytes start in the volume (0 for a directory).
    pub offset: u64,
    /// A file's size (0 for a directory).
    pub size: u64,
}

/// A validated volume directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// Every entry, sorted by path.
    pub entries: Vec<Entry>,
    /// The volume's length in bytes.
    pub total_len: u64,
}

/// A validated header: what a reader needs to fetch the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Entry count.
    pub count: u32,
    /// Directory length.
    pub directory_len: u64,
    /// The volume's length.
    pub total_len: u64,
    /// The CRC over header bytes 0..32 and the directory.
    pub crc: u32,
}

/// What is wrong with a volume, or with files given to [`build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// Fewer bytes than a header.
    #[error("volume is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort(usize),
    /// Not a volume.
    #[error("volume magic {0:02x?} is not \"THAWVOL\\0\"")]
    BadMagic([u8; 8]),
    /// A version this code does not read.
    #[error("volume format version {0} is not supported (this thaw reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// A header field with an impossible value.
    #[error("volume header: {0} is {1}")]
    Header(&'static str, u64),
    /// The CRC does not match.
    #[error("volume checksum {stored:#010x} does not match the computed {computed:#010x} (corrupted)")]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// A directory entry that breaks a rule.
    #[error("volume entry {index}: {reason}")]
    Entry {
        /// The entry's index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A path given to [`build`] that a volume cannot hold.
    #[error("{0:?}: {1}")]
    Path(String, &'static str),
}

/// Why `path` cannot be a volume path, if it cannot.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err("a volume path must be 1 to 255 bytes");
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("a volume path may not have empty, \".\" or \"..\" components, or start or end with /");
    }
    if path.contains('\0') {
        return Err("a volume path may not contain NUL");
    }
    Ok(())
}

fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

/// Builds a volume holding `files` (path, contents), with an entry for every directory on their
/// paths and for each of `empty_dirs`.
pub fn build(files: &[(String, Vec<u8>)], empty_dirs: &[String]) -> Result<Vec<u8>, VolumeError> {
    let mut entries: Vec<(EntryKind, &str, &[u8])> = Vec::new();
    for (path, bytes) in files {
        check_path(path).map_err(|r| VolumeError::Path(path.clone(), r))?;
        entries.push((EntryKind::File, path, bytes));
    }
    let mut dirs: Vec<&str> = Vec::new();
    for path in empty_dirs {
        check_path(path).map_err(|r| VolumeError::Path(path.clone(), r))?;
        dirs.push(path);
    }
    for (_, path, _) in &entries {
        let mut p = *path;
        while let Some(up) = parent(p) {
            dirs.push(up);
            p = up;
        }
    }
    let mut more = Vec::new();
    for d in &dirs {
        let mut p = *d;
        while let Some(up) = parent(p) {
            more.push(up);
            p = up;
        }
    }
    dirs.extend(more);
    dirs.sort_unstable();
    dirs.dedup();
    entries.extend(dirs.into_iter().map(|d| (EntryKind::Directory, d, &[][..])));
    entries.sort_by(|a, b| a.1.cmp(b.1));
    if let Some(w) = entries.windows(2).find(|w| w[0].1 == w[1].1) {
        return Err(VolumeError::Path(w[0].1.into(), "appears twice (as a file and a directory, or twice)"));
    }
    if entries.len() > MAX_ENTRIES {
        return Err(VolumeError::Header("entry count", entries.len() as u64));
    }
    let directory_len: usize = entries.iter().map(|(_, p, _)| ENTRY_FIXED + p.len().next_multiple_of(8)).sum();
    let mut offset = (HEADER_LEN + directory_len) as u64;
    let mut directory = Vec::with_capacity(directory_len);
    let mut placed = Vec::new();
    for (kind, path, bytes) in &entries {
        let (at, size) = match kind {
            EntryKind::File => {
                offset = offset.next_multiple_of(SECTOR);
                let at = offset;
                offset += bytes.len() as u64;
                placed.push((at, *bytes));
                (at, bytes.len() as u64)
            }
            EntryKind::Directory => (0, 0),
        };
        directory.push(if *kind == EntryKind::File { 1 } else { 2 });
        directory.push(0);
        directory.extend_from_slice(&(path.len() as u16).to_le_bytes());
        directory.extend_from_slice(&[0; 4]);
        directory.extend_from_slice(&at.to_le_bytes());
        directory.extend_from_slice(&size.to_le_bytes());
        directory.extend_from_slice(path.as_bytes());
        directory.resize(directory.len().next_multiple_of(8), 0);
    }
    let total_len = offset.next_multiple_of(SECTOR).max(SECTOR);
    if directory.len() as u64 > MAX_DIRECTORY_BYTES {
        return Err(VolumeError::Header("directory length", directory.len() as u64));
    }
    if total_len > MAX_VOLUME_BYTES {
        return Err(VolumeError::Header("total length", total_len));
    }
    let mut out = alloc::vec![0u8; total_len as usize];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&(directory.len() as u64).to_le_bytes());
    out[24..32].copy_from_slice(&total_len.to_le_bytes());
    let crc = crc32(&[&out[..32], &directory]);
    out[32..36].copy_from_slice(&crc.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + directory.len()].copy_from_slice(&directory);
    for (at, bytes) in placed {
        out[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }
    Ok(out)
}

/// Validates the header (the first [`HEADER_LEN`] bytes).
pub fn parse_header(b: &[u8]) -> Result<Header, VolumeError> {
    if b.len() < HEADER_LEN {
        return Err(VolumeError::TooShort(b.len()));
    }
    let mut magic = [0; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(VolumeError::BadMagic(magic));
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(VolumeError::UnsupportedVersion(version));
    }
    let count = u32_at(b, 12);
    if count as usize > MAX_ENTRIES {
        return Err(VolumeError::Header("entry count", count.into()));
    }
    let directory_len = u64_at(b, 16);
    if directory_len > MAX_DIRECTORY_BYTES || !directory_len.is_multiple_of(8) {
        return Err(VolumeError::Header("directory length", directory_len));
    }
    let total_len = u64_at(b, 24);
    if total_len > MAX_VOLUME_BYTES
        || !total_len.is_multiple_of(SECTOR)
        || total_len < HEADER_LEN as u64 + directory_len
    {
        return Err(VolumeError::Header("total length", total_len));
    }
    if b[36..HEADER_LEN].iter().any(|&x| x != 0) {
        return Err(VolumeError::Header("reserved bytes", 1));
    }
    Ok(Header { count, directory_len, total_len, crc: u32_at(b, 32) })
}

/// Validates the directory that follows `header_bytes` (the volume's first [`HEADER_LEN`] bytes,
/// already accepted by [`parse_header`] as `header`).
pub fn parse_directory(header: &Header, header_bytes: &[u8], dir: &[u8]) -> Result<Directory, VolumeError> {
    if dir.len() as u64 != header.directory_len || header_bytes.len() < 32 {
        return Err(VolumeError::Header("directory length", dir.len() as u64));
    }
    let computed = crc32(&[&header_bytes[..32], dir]);
    if computed != header.crc {
        return Err(VolumeError::Checksum { stored: header.crc, computed });
    }
    let data_start = (HEADER_LEN as u64 + header.directory_len).next_multiple_of(SECTOR);
    let mut entries: Vec<Entry> = Vec::with_capacity(header.count as usize);
    let mut at = 0usize;
    for index in 0..header.count as usize {
        let bad = |reason: String| VolumeError::Entry { index, reason };
        let fixed = dir.get(at..at + ENTRY_FIXED).ok_or_else(|| bad("runs past the directory".into()))?;
        let kind = match fixed[0] {
            1 => EntryKind::File,
            2 => EntryKind::Directory,
            other => return Err(bad(alloc::format!("kind {other} is neither a file (1) nor a directory (2)"))),
        };
        let path_len = u16::from_le_bytes([fixed[2], fixed[3]]) as usize;
        let (offset, size) = (u64_at(fixed, 8), u64_at(fixed, 16));
        let path_bytes = dir
            .get(at + ENTRY_FIXED..at + ENTRY_FIXED + path_len)
            .ok_or_else(|| bad("path runs past the directory".into()))?;
        let path = core::str::from_utf8(path_bytes).map_err(|_| bad("path is not UTF-8".into()))?;
        check_path(path).map_err(|r| bad(alloc::format!("path {path:?}: {r}")))?;
        if let Some(previous) = entries.last()
            && previous.path.as_str() >= path
        {
            return Err(bad(alloc::format!("path {path:?} does not sort after {:?}", previous.path)));
        }
        if let Some(up) = parent(path)
            && !entries.iter().any(|e| e.kind == EntryKind::Directory && e.path == up)
        {
            return Err(bad(alloc::format!("path {path:?} has no directory entry for {up:?}")));
        }
        match kind {
            EntryKind::Directory if offset != 0 || size != 0 => {
                return Err(bad(alloc::format!("directory {path:?} has data at {offset} ({size} bytes)")));
            }
            EntryKind::File
                if offset < data_start
                    || !offset.is_multiple_of(SECTOR)
                    || offset.checked_add(size).is_none_or(|end| end > header.total_len) =>
            {
                return Err(bad(alloc::format!(
                    "file {path:?} at {offset} ({size} bytes) is not sector-aligned inside the volume's data"
                )));
            }
            _ => {}
        }
        entries.push(Entry { kind, path: path.into(), offset, size });
        at += ENTRY_FIXED + path_len.next_multiple_of(8);
    }
    if at != dir.len() {
        return Err(VolumeError::Header("directory bytes after the last entry", (dir.len() - at) as u64));
    }
    Ok(Directory { entries, total_len: header.total_len })
}

/// Validates a whole volume held in memory.
pub fn parse(volume: &[u8]) -> Result<Directory, VolumeError> {
    let header = parse_header(volume)?;
    if volume.len() as u64 != header.total_len {
        return Err(VolumeError::Header("length present", volume.len() as u64));
    }
    let dir = &volume[HEADER_LEN..HEADER_LEN + header.directory_len as usize];
    parse_directory(&header, &volume[..HEADER_LEN], dir)
}

impl Directory {
    /// The entry at `path` (relative, already checked with [`check_path`]).
    pub fn lookup(&self, path: &str) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|i| &self.entries[i])
    }

    /// The entries directly inside `dir` ("" for the root), in path order.
    pub fn children<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| parent(&e.path).unwrap_or("") == dir)
    }
}

/// The name of an entry: its last path component.
pub fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn files() -> Vec<(String, Vec<u8>)> {
        vec![
            ("words/en.txt".to_string(), b"hello\nworld\n".to_vec()),
            ("readme".to_string(), b"data volume".to_vec()),
            ("words/deep/x.bin".to_string(), vec![7; 1000]),
            ("empty".to_string(), Vec::new()),
        ]
    }

    #[test]
    fn builds_and_reads_back_every_file_and_directory() {
        let volume = build(&files(), &["spare".into()]).unwrap();
        assert_eq!(volume.len() as u64 % SECTOR, 0);
        let dir = parse(&volume).unwrap();
        let paths: Vec<&str> = dir.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["empty", "readme", "spare", "words", "words/deep", "words/deep/x.bin", "words/en.txt"]);
        for (path, bytes) in files() {
            let e = dir.lookup(&path).unwrap();
            assert_eq!(e.kind, EntryKind::File);
            assert_eq!(&volume[e.offset as usize..(e.offset + e.size) as usize], &bytes[..], "{path}");
        }
        assert_eq!(dir.lookup("words").unwrap().kind, EntryKind::Directory);
        assert!(dir.lookup("nope").is_none());
        let root: Vec<&str> = dir.children("").map(|e| file_name(&e.path)).collect();
        assert_eq!(root, ["empty", "readme", "spare", "words"]);
        let words: Vec<&str> = dir.children("words").map(|e| file_name(&e.path)).collect();
        assert_eq!(words, ["deep", "en.txt"]);
        assert_eq!(parse(&build(&[], &[]).unwrap()).unwrap().entries, vec![]);
    }

    #[test]
    fn bad_paths_are_refused_when_building() {
        for path in ["", "/abs", "a//b", "a/../b", "./a", "trailing/", &"x".repeat(256)] {
            assert!(matches!(build(&[(path.to_string(), vec![])], &[]), Err(VolumeError::Path(..))), "{path:?}");
        }
        let clash = vec![("a".to_string(), vec![]), ("a/b".to_string(), vec![])];
        assert!(matches!(build(&clash, &[]), Err(VolumeError::Path(..))));
    }

    #[test]
    fn every_corrupted_directory_byte_is_caught() {
        let volume = build(&files(), &[]).unwrap();
        let header = parse_header(&volume).unwrap();
        let end = HEADER_LEN + header.directory_len as usize;
        for at in 0..end {
            let mut bad = volume.clone();
            bad[at] ^= 0x41;
            assert!(parse(&bad).is_err(), "byte {at} flipped and accepted");
        }
        for cut in [0, 10, HEADER_LEN, end, volume.len() - 1] {
            assert!(parse(&volume[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Rewrites the directory of `volume` through `edit` and fixes the CRC, so the structural
    /// checks (not the checksum) must catch the problem.
    fn with_directory(volume: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let header = parse_header(volume).unwrap();
        let mut dir = volume[HEADER_LEN..HEADER_LEN + header.directory_len as usize].to_vec();
        edit(&mut dir);
        let mut out = volume.to_vec();
        out[HEADER_LEN..HEADER_LEN + dir.len()].copy_from_slice(&dir);
        let crc = crc32(&[&out[..32], &dir]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn structurally_hostile_directories_are_refused_even_with_a_valid_checksum() {
        let volume = build(&[("a".to_string(), b"xyz".to_vec()), ("b".to_string(), b"q".to_vec())], &[]).unwrap();
        type Edit = fn(&mut Vec<u8>);
        let cases: [(&str, Edit); 7] = [
            ("unknown kind", |d| d[0] = 9),
            ("file before the data", |d| d[8..16].copy_from_slice(&64u64.to_le_bytes())),
            ("unaligned file", |d| d[8..16].copy_from_slice(&513u64.to_le_bytes())),
            ("file past the end", |d| d[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
            ("unsorted", |d| d[24] = b'c'),
            ("dot-dot path", |d| {
                d[2..4].copy_from_slice(&2u16.to_le_bytes());
                d[24..26].copy_from_slice(b"..");
            }),
            ("path runs past", |d| d[2..4].copy_from_slice(&300u16.to_le_bytes())),
        ];
        for (what, edit) in cases {
            assert!(matches!(parse(&with_directory(&volume, edit)), Err(VolumeError::Entry { .. })), "{what}");
        }
        let orphan = build(&[("d/f".to_string(), vec![1])], &[]).unwrap();
        // Turn the directory "d" into a file named "c": "d/f" then has no parent entry.
        let orphan = with_directory(&orphan, |d| {
            d[0] = 1;
            d[8..16].copy_from_slice(&512u64.to_le_bytes());
            d[24] = b'c';
        });
        assert!(matches!(parse(&orphan), Err(VolumeError::Entry { index: 1, .. })));
    }

    #[test]
    fn every_volume_error_message_is_pinned() {
        let cases: [(VolumeError, &str); 7] = [
            (VolumeError::TooShort(10), "volume is 10 bytes, shorter than its 64-byte header"),
            (
                VolumeError::BadMagic(*b"THAWVOL\x01"),
                r#"volume magic [54, 48, 41, 57, 56, 4f, 4c, 01] is not "THAWVOL\0""#,
            ),
            (
                VolumeError::UnsupportedVersion(2),
                "volume format version 2 is not supported (this thaw reads version 1)",
            ),
            (VolumeError::Header("directory length", 7), "volume header: directory length is 7"),
            (
                VolumeError::Checksum { stored: 1, computed: 2 },
                "volume checksum 0x00000001 does not match the computed 0x00000002 (corrupted)",
            ),
            (
                VolumeError::Entry { index: 0, reason: "kind 3 is neither a file (1) nor a directory (2)".to_string() },
                "volume entry 0: kind 3 is neither a file (1) nor a directory (2)",
            ),
            (
                VolumeError::Path("a/../b".to_string(), "a volume path may not contain NUL"),
                r#""a/../b": a volume path may not contain NUL"#,
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
