//! The I/O reconnection table: the guest runtime's open I/O handles, kept in guest memory so a
//! snapshot carries them and `thaw inspect` can show them.
//!
//! Each handle the runtime opens on something outside the VM (the console, a file on the data
//! volume, a vsock connection) has an entry saying what it is and what reconnecting it needs.
//! At checkpoint nothing is in flight: every device request completes inside the exit that made
//! it. After a restore the guest turns every `Active` entry into `ReconnectPending`, and the
//! first use of such a handle reconnects it (sets its device up again if the VMM moved it,
//! reopens the file at its offset, connects to the port again) and makes it `Active` again.
//!
//! The guest tells the VMM where the table is in the checkpoint hypercall's payload
//! ([`IoTableLocation`]); the VMM records it in the image's guest metadata.
//!
//! ```text
//! header (16 bytes): magic "THIO", version u16 (1), entry size u16 (256), capacity u32, count u32
//! entry (256 bytes): fd u32, kind u8, state u8, reserved u16, offset u64, port u32,
//!                    path length u16, reserved u16, path (UTF-8, at most 232 bytes)
//! ```

use alloc::string::String;
use alloc::vec::Vec;

use crate::codec::{u32_at, u64_at};

/// `"THIO"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"THIO");
/// The table layout version.
pub const VERSION: u16 = 1;
/// Header size.
pub const HEADER_LEN: usize = 16;
/// Size of one entry.
pub const ENTRY_LEN: usize = 256;
/// Longest path an entry holds.
pub const MAX_PATH: usize = ENTRY_LEN - 24;
/// Most entries a table holds.
pub const CAPACITY: usize = 32;
/// Size of a full table.
pub const TABLE_LEN: usize = HEADER_LEN + CAPACITY * ENTRY_LEN;

/// What a handle is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandleKind {
    /// A stream to the virtio console (the function's stderr).
    ConsoleStream = 1,
    /// A file on the data volume, read at `offset`.
    DataFile = 2,
    /// A vsock stream to a host service on `port`.
    VsockStream = 3,
}

/// Where a handle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandleState {
    /// Closed: the entry is kept for the record until its slot is reused.
    Closed = 0,
    /// Connected and usable.
    Active = 1,
    /// Restored from a snapshot; reconnected on first use.
    ReconnectPending = 2,
}

impl HandleKind {
    fn from_u8(v: u8) -> Option<Self> {
        [Self::ConsoleStream, Self::DataFile, Self::VsockStream].into_iter().find(|k| *k as u8 == v)
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConsoleStream => "console-stream",
            Self::DataFile => "data-file",
            Self::VsockStream => "vsock-stream",
        }
    }
}

impl HandleState {
    fn from_u8(v: u8) -> Option<Self> {
        [Self::Closed, Self::Active, Self::ReconnectPending].into_iter().find(|s| *s as u8 == v)
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Active => "active",
            Self::ReconnectPending => "reconnect-pending",
        }
    }
}

/// One handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The WASI file descriptor.
    pub fd: u32,
    /// What it is.
    pub kind: HandleKind,
    /// Where it stands.
    pub state: HandleState,
    /// For a data file: the read offset to resume at.
    pub offset: u64,
    /// For a vsock stream: the host port.
    pub port: u32,
    /// For a data file: its path on the volume.
    pub path: String,
}

/// What is wrong with a table read from guest memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoTableError {
    /// A header field with an impossible value.
    #[error("I/O table header: {0} is {1:#x}")]
    Header(&'static str, u64),
    /// An entry field with an impossible value.
    #[error("I/O table entry {index}: {field} is {value:#x}")]
    Entry {
        /// The entry's index.
        index: usize,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// An empty table's bytes.
pub fn empty() -> [u8; TABLE_LEN] {
    let mut b = [0u8; TABLE_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
    b[8..12].copy_from_slice(&(CAPACITY as u32).to_le_bytes());
    b
}

/// Writes `handles` (at most [`CAPACITY`]; paths truncated to [`MAX_PATH`] bytes) into `table`.
pub fn encode_into(table: &mut [u8; TABLE_LEN], handles: &[Handle]) {
    *table = empty();
    let count = handles.len().min(CAPACITY);
    table[12..16].copy_from_slice(&(count as u32).to_le_bytes());
    for (i, h) in handles.iter().take(count).enumerate() {
        encode_entry(table, i, h);
    }
}

/// Rewrites entry `index` (below the table's count and [`CAPACITY`]) with `h`, leaving the rest.
pub fn encode_entry(table: &mut [u8; TABLE_LEN], index: usize, h: &Handle) {
    let Some(e) = table.get_mut(HEADER_LEN + index * ENTRY_LEN..HEADER_LEN + (index + 1) * ENTRY_LEN) else {
        return;
    };
    e.fill(0);
    e[0..4].copy_from_slice(&h.fd.to_le_bytes());
    e[4] = h.kind as u8;
    e[5] = h.state as u8;
    e[8..16].copy_from_slice(&h.offset.to_le_bytes());
    e[16..20].copy_from_slice(&h.port.to_le_bytes());
    let mut path_len = h.path.len().min(MAX_PATH);
    while !h.path.is_char_boundary(path_len) {
        path_len -= 1;
    }
    e[20..22].copy_from_slice(&(path_len as u16).to_le_bytes());
    e[24..24 + path_len].copy_from_slice(&h.path.as_bytes()[..path_len]);
}

/// Reads and validates a table (from guest memory: hostile).
pub fn decode(b: &[u8]) -> Result<Vec<Handle>, IoTableError> {
    if b.len() < HEADER_LEN {
        return Err(IoTableError::Header("length", b.len() as u64));
    }
    if u32_at(b, 0) != MAGIC {
        return Err(IoTableError::Header("magic", u32_at(b, 0).into()));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(IoTableError::Header("version", version.into()));
    }
    let entry_len = u16::from_le_bytes([b[6], b[7]]) as usize;
    if entry_len != ENTRY_LEN {
        return Err(IoTableError::Header("entry size", entry_len as u64));
    }
    let (capacity, count) = (u32_at(b, 8) as usize, u32_at(b, 12) as usize);
    if capacity > CAPACITY || b.len() < HEADER_LEN + capacity * ENTRY_LEN {
        return Err(IoTableError::Header("capacity", capacity as u64));
    }
    if count > capacity {
        return Err(IoTableError::Header("count", count as u64));
    }
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let e = &b[HEADER_LEN + index * ENTRY_LEN..HEADER_LEN + (index + 1) * ENTRY_LEN];
        let bad = |field, value: u64| IoTableError::Entry { index, field, value };
        let kind = HandleKind::from_u8(e[4]).ok_or(bad("kind", e[4].into()))?;
        let state = HandleState::from_u8(e[5]).ok_or(bad("state", e[5].into()))?;
        let path_len = u16::from_le_bytes([e[20], e[21]]) as usize;
        if path_len > MAX_PATH {
            return Err(bad("path length", path_len as u64));
        }
        let path =
            core::str::from_utf8(&e[24..24 + path_len]).map_err(|_| bad("path (not UTF-8) length", path_len as u64))?;
        handles.push(Handle {
            fd: u32_at(e, 0),
            kind,
            state,
            offset: u64_at(e, 8),
            port: u32_at(e, 16),
            path: path.into(),
        });
    }
    Ok(handles)
}

/// Where the table is, as the checkpoint hypercall's payload: guest-physical address u64 and
/// length u64 (both 0 when the guest keeps no table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTableLocation {
    /// Guest-physical address of the table.
    pub gpa: u64,
    /// Its length in bytes (at most [`TABLE_LEN`]).
    pub len: u64,
}

impl IoTableLocation {
    /// Encoded size.
    pub const LEN: usize = 16;

    /// The payload bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a payload; `None` if it has the wrong size or a length above [`TABLE_LEN`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let location = Self { gpa: u64_at(b, 0), len: u64_at(b, 8) };
        (location.len <= TABLE_LEN as u64 && location.gpa.checked_add(location.len).is_some()).then_some(location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn handles() -> Vec<Handle> {
        vec![
            Handle {
                fd: 2,
                kind: HandleKind::ConsoleStream,
                state: HandleState::Active,
                offset: 0,
                port: 0,
                path: String::new(),
            },
            Handle {
                fd: 4,
                kind: HandleKind::DataFile,
                state: HandleState::ReconnectPending,
                offset: 4096,
                port: 0,
                path: "words/en.txt".into(),
            },
        ]
    }

    #[test]
    fn round_trips() {
        let mut table = empty();
        encode_into(&mut table, &handles());
        assert_eq!(decode(&table).unwrap(), handles());
        assert_eq!(decode(&empty()).unwrap(), vec![]);
    }

    #[test]
    fn one_entry_can_be_rewritten_alone() {
        let mut table = empty();
        let mut h = handles();
        encode_into(&mut table, &h);
        h[1].offset = 8192;
        encode_entry(&mut table, 1, &h[1]);
        assert_eq!(decode(&table).unwrap(), h);
    }

    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        let mut table = empty();
        let mut h = handles();
        h[1].path = "é".repeat(200);
        encode_into(&mut table, &h);
        let decoded = decode(&table).unwrap();
        assert!(decoded[1].path.len() <= MAX_PATH && decoded[1].path.chars().all(|c| c == 'é'));
    }

    #[test]
    fn hostile_tables_are_refused() {
        let mut good = empty();
        encode_into(&mut good, &handles());
        let cases: [(usize, u8, &str); 7] = [
            (0, b'X', "magic"),
            (4, 9, "version"),
            (6, 1, "entry size"),
            (8, 200, "capacity"),
            (12, 40, "count"),
            (HEADER_LEN + 4, 9, "kind"),
            (HEADER_LEN + 5, 7, "state"),
        ];
        for (at, value, what) in cases {
            let mut bad = good;
            bad[at] = value;
            assert!(decode(&bad).is_err(), "{what}");
        }
        let mut long_path = good;
        long_path[HEADER_LEN + ENTRY_LEN + 20..HEADER_LEN + ENTRY_LEN + 22].copy_from_slice(&300u16.to_le_bytes());
        assert!(matches!(decode(&long_path), Err(IoTableError::Entry { field: "path length", .. })));
        let mut not_utf8 = good;
        not_utf8[HEADER_LEN + ENTRY_LEN + 24] = 0xff;
        assert!(decode(&not_utf8).is_err());
        assert!(decode(&good[..HEADER_LEN + ENTRY_LEN]).is_err(), "capacity past the bytes given");
        assert!(decode(&good[..4]).is_err());
    }

    #[test]
    fn locations_are_checked() {
        let l = IoTableLocation { gpa: 0x1000, len: TABLE_LEN as u64 };
        assert_eq!(IoTableLocation::decode(&l.encode()), Some(l));
        assert_eq!(IoTableLocation::decode(&IoTableLocation { gpa: 0, len: 1 << 20 }.encode()), None);
        assert_eq!(IoTableLocation::decode(&IoTableLocation { gpa: u64::MAX, len: 2 }.encode()), None);
        assert_eq!(IoTableLocation::decode(&[0; 8]), None);
    }

    #[test]
    fn every_io_table_error_message_is_pinned() {
        let cases = [
            (IoTableError::Header("magic", 0x1234), "I/O table header: magic is 0x1234"),
            (IoTableError::Entry { index: 3, field: "kind", value: 9 }, "I/O table entry 3: kind is 0x9"),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
