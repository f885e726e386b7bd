//! The ELF note in which a guest kernel declares the interface version it speaks.
//!
//! The kernel places one [`AbiNote`] in a section named [`SECTION_NAME`]. The VMM reads it before
//! loading anything and refuses a kernel without it, or with another version.
//!
//! ```text
//!   offset  size  field
//!   0       4     namesz = 5
//!   4       4     descsz = 4
//!   8       4     type   = NOTE_TYPE_ABI_VERSION
//!   12      8     name   = "Thaw\0" padded to 8
//!   20      4     desc   = interface version (little-endian u32)
//! ```

/// Name of the ELF section holding the note.
pub const SECTION_NAME: &str = ".note.thaw";
/// The note's owner name, NUL-terminated.
pub const NOTE_NAME: [u8; 5] = *b"Thaw\0";
/// Note type of the interface-version note.
pub const NOTE_TYPE_ABI_VERSION: u32 = 1;
/// Encoded size of an [`AbiNote`].
pub const NOTE_LEN: usize = 24;

/// The note as laid out in the kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct AbiNote {
    /// Length of `name` without padding: 5.
    pub namesz: u32,
    /// Length of the descriptor: 4.
    pub descsz: u32,
    /// [`NOTE_TYPE_ABI_VERSION`].
    pub note_type: u32,
    /// `"Thaw\0"`, padded with zeros to a 4-byte multiple.
    pub name: [u8; 8],
    /// The interface version the kernel speaks.
    pub version: u32,
}

impl AbiNote {
    /// The note declaring `version`.
    pub const fn new(version: u32) -> Self {
        Self {
            namesz: NOTE_NAME.len() as u32,
            descsz: 4,
            note_type: NOTE_TYPE_ABI_VERSION,
            name: [b'T', b'h', b'a', b'w', 0, 0, 0, 0],
            version,
        }
    }

    /// Parses the note from the bytes of its section.
    pub fn parse(bytes: &[u8]) -> Result<Self, NoteError> {
        let field = |i: usize| -> Result<u32, NoteError> {
            bytes
                .get(i..i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(NoteError::Truncated(bytes.len()))
        };
        let (namesz, descsz, note_type) = (field(0)?, field(4)?, field(8)?);
        let mut name = [0; 8];
        name.copy_from_slice(bytes.get(12..20).ok_or(NoteError::Truncated(bytes.len()))?);
        let version = field(20)?;
        let note = Self { namesz, descsz, note_type, name, version };
        let expected = Self::new(version);
        if note.namesz != expected.namesz || note.name != expected.name {
            return Err(NoteError::WrongOwner);
        }
        if note.note_type != expected.note_type || note.descsz != expected.descsz {
            return Err(NoteError::WrongType { note_type, descsz });
        }
        Ok(note)
    }
}

/// Why a section does not hold a valid interface-version note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The section is shorter than a note.
    #[error("note is {0} bytes, shorter than the {NOTE_LEN} a thaw note needs")]
    Truncated(usize),
    /// The note's owner is not "Thaw".
    #[error("note owner is not \"Thaw\"")]
    WrongOwner,
    /// The note is not an interface-version note.
    #[error("note type {note_type} with {descsz}-byte descriptor is not an interface-version note")]
    WrongType {
        /// The type found.
        note_type: u32,
        /// The descriptor size found.
        descsz: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// The on-disk layout is part of the interface: pin it byte for byte.
    #[test]
    fn note_layout_is_golden() {
        let golden: [u8; NOTE_LEN] =
            [5, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'T', b'h', b'a', b'w', 0, 0, 0, 0, 7, 0, 0, 0];
        assert_eq!(core::mem::size_of::<AbiNote>(), NOTE_LEN);
        assert_eq!(AbiNote::parse(&golden), Ok(AbiNote::new(7)));
    }

    #[test]
    fn parse_rejects_foreign_or_short_notes() {
        let mut bytes = [5, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'G', b'N', b'U', 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(AbiNote::parse(&bytes), Err(NoteError::WrongOwner));
        bytes[12..16].copy_from_slice(b"Thaw");
        bytes[8] = 3;
        assert_eq!(AbiNote::parse(&bytes), Err(NoteError::WrongType { note_type: 3, descsz: 4 }));
        assert_eq!(AbiNote::parse(&bytes[..10]), Err(NoteError::Truncated(10)));
    }

    #[test]
    fn every_note_error_message_is_pinned() {
        let cases = [
            (NoteError::Truncated(10), "note is 10 bytes, shorter than the 24 a thaw note needs"),
            (NoteError::WrongOwner, r#"note owner is not "Thaw""#),
            (
                NoteError::WrongType { note_type: 3, descsz: 4 },
                "note type 3 with 4-byte descriptor is not an interface-version note",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
