//! Restoring a VM from an image a peer holds: the restore head it sends first, and the image a
//! node makes of it (issue 31; MITOSIS's remote fork, over HTTP).
//!
//! The head is everything a VM needs before its first instruction, in one answer: the image's
//! metadata (registers, devices, the working set's list), the image's page map (which pages
//! are not zero), the bytes of the pages the guest and the host touch first (the working set,
//! the page tables that map it, the pages the host writes at every restore, the I/O table), and
//! the data volume. Every other page is read from the peer when the guest touches it
//! ([`crate::lazy`]).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "THAWHEAD"
//!      8     4  format version (1)
//!     12     4  reserved, 0
//!     16     8  the image file's length
//!     24     8  metadata bytes (M)
//!     32     8  runs of non-zero pages (N)
//!     40     8  runs of pages sent (S)
//!     48     8  volume bytes (V)
//!     56     M  the image's metadata, as in the file
//!          16N  non-zero runs: first page, page count (u64 each), ascending, disjoint
//!          16S  runs sent, the same way
//!      4096×Σ  the sent pages' bytes, in run order
//!            V  the data volume
//!           32  SHA-256 of everything before it
//! ```
//!
//! All integers are little-endian. A head is someone else's input: [`Head::decode`] checks the
//! checksum, every length against the bytes there are, every run against guest memory, and
//! the metadata with the image parser, before anything is used.

use sha2::{Digest, Sha256};

use crate::layout::PAGE_SIZE;
use crate::snapshot::{self, Image, SnapshotError};
use abi::hypercall::HYPERCALL_PAGE_GPA;
use abi::image;
use abi::params::HOST_PARAMS_GPA;

/// The head's magic.
const MAGIC: &[u8; 8] = b"THAWHEAD";
/// The format this thaw writes and reads.
pub const HEAD_VERSION: u32 = 1;
const FIXED_LEN: usize = 56;
const CHECKSUM_LEN: usize = 32;

/// Most pages one page request may ask for (4 MiB).
pub const MAX_PAGES_PER_READ: u64 = 1024;

/// Why a head could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The head is malformed.
    #[error("restore head: {0}")]
    Head(String),
    /// The image behind it is not one this thaw restores.
    #[error(transparent)]
    Image(#[from] SnapshotError),
}

fn bad(detail: impl Into<String>) -> RemoteError {
    RemoteError::Head(detail.into())
}

pub use crate::snapshot::Head;

impl Head {
    /// The head of `image`, as its holder sends it.
    pub fn of(image: &Image) -> Result<Self, RemoteError> {
        if !image.wait_complete(std::time::Duration::ZERO) {
            // Its holes would read as zero pages that are not.
            return Err(bad(format!("{}: not all of the image is here yet", image.path().display())));
        }
        let info = &image.info;
        let range = info.memory[0];
        let memory_pages = range.len / PAGE_SIZE;
        let nonzero = merge(
            image
                .data_extents(false)?
                .into_iter()
                .filter(|&(start, _)| start >= range.file_offset)
                .map(|(start, end)| {
                    let first = (start - range.file_offset) / PAGE_SIZE;
                    let last = (end - range.file_offset).div_ceil(PAGE_SIZE).min(memory_pages);
                    (first, last.saturating_sub(first))
                })
                .collect(),
        );
        let mut wanted = vec![HYPERCALL_PAGE_GPA / PAGE_SIZE, HOST_PARAMS_GPA / PAGE_SIZE];
        let io_table = info.guest.io_table_gpa / PAGE_SIZE;
        wanted.extend(io_table..(info.guest.io_table_gpa + info.guest.io_table_len).div_ceil(PAGE_SIZE));
        if !info.working_set.is_empty() {
            let (_watch, mem) = image.map_memory()?;
            let cr3 = snapshot::saved_cr3(&info.vcpu)?;
            if let Ok((ranges, tables)) = crate::workingset::physical_ranges_and_tables(&mem, cr3, &info.working_set) {
                for (gpa, len) in ranges {
                    wanted.extend(gpa / PAGE_SIZE..(gpa + len) / PAGE_SIZE);
                }
                wanted.extend(tables.iter().map(|gpa| gpa / PAGE_SIZE));
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let zero = |page: u64| !contains(&nonzero, page);
        let sent = merge(wanted.into_iter().filter(|&p| p < memory_pages && !zero(p)).map(|p| (p, 1)).collect());
        let mut pages = Vec::new();
        for &(first, count) in &sent {
            pages.extend(image.read_guest(first * PAGE_SIZE, count * PAGE_SIZE)?);
        }
        let volume = match info.volume {
            Some((offset, len)) => image.read_file(offset, len)?,
            None => Vec::new(),
        };
        let metadata = image.read_file(0, info.metadata_len)?;
        let file_len = image.file_len()?;
        Ok(Self { file_len, metadata, nonzero, sent, pages, volume })
    }

    /// The head's bytes ([module docs](self)).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.metadata.len() + self.pages.len() + self.volume.len() + 4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&HEAD_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for n in [
            self.file_len,
            self.metadata.len() as u64,
            self.nonzero.len() as u64,
            self.sent.len() as u64,
            self.volume.len() as u64,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.metadata);
        for &(first, count) in self.nonzero.iter().chain(&self.sent) {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out.extend_from_slice(&self.pages);
        out.extend_from_slice(&self.volume);
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// Decodes and validates a head: the checksum, every length, every run against the guest
    /// memory its metadata describes, and the metadata itself.
    pub fn decode(bytes: &[u8]) -> Result<Self, RemoteError> {
        if bytes.len() < FIXED_LEN + CHECKSUM_LEN {
            return Err(bad(format!("{} bytes, shorter than its fixed part", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a thaw restore head (wrong magic)"));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(bad("its SHA-256 does not match: the answer was damaged or cut short"));
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
        if version != HEAD_VERSION {
            return Err(bad(format!("format version {version}, this thaw reads {HEAD_VERSION}")));
        }
        let (file_len, metadata_len, nonzero_runs, sent_runs, volume_len) =
            (word(16), word(24), word(32), word(40), word(48));
        if metadata_len > image::MAX_METADATA_BYTES {
            return Err(bad(format!("{metadata_len} bytes of metadata, more than {}", image::MAX_METADATA_BYTES)));
        }
        let mut at = FIXED_LEN;
        let mut take = |len: u64, what: &str| -> Result<&[u8], RemoteError> {
            let end = usize::try_from(len).ok().and_then(|len| at.checked_add(len)).filter(|&end| end <= body.len());
            let end = end.ok_or_else(|| bad(format!("{what} ({len} bytes) runs past the end of the head")))?;
            let taken = &body[at..end];
            at = end;
            Ok(taken)
        };
        let metadata = take(metadata_len, "the metadata")?.to_vec();
        let nonzero = runs(take(nonzero_runs.saturating_mul(16), "the non-zero runs")?);
        let sent = runs(take(sent_runs.saturating_mul(16), "the sent runs")?);
        let sent_pages = sent.iter().try_fold(0u64, |sum, &(_, count)| sum.checked_add(count));
        let sent_pages = sent_pages.ok_or_else(|| bad("the sent runs overflow"))?;
        let pages = take(sent_pages.saturating_mul(PAGE_SIZE), "the sent pages")?.to_vec();
        let volume = take(volume_len, "the volume")?.to_vec();
        if at != body.len() {
            return Err(bad(format!("{} bytes after the volume", body.len() - at)));
        }
        let info = image::parse(&metadata, file_len).map_err(|e| bad(format!("its metadata: {e}")))?;
        if info.metadata_len != metadata_len {
            return Err(bad(format!("{metadata_len} bytes of metadata, which says it is {}", info.metadata_len)));
        }
        let memory_pages = info.guest_memory_size() / PAGE_SIZE;
        check_runs(&nonzero, memory_pages, "non-zero")?;
        check_runs(&sent, memory_pages, "sent")?;
        if let Some(&(first, _)) =
            sent.iter().find(|&&(first, count)| (first..first + count).any(|p| !contains(&nonzero, p)))
        {
            return Err(bad(format!("the sent run at page {first:#x} holds a page the page map says is zero")));
        }
        let expected_volume = info.volume.map_or(0, |(_, len)| len);
        if volume_len != expected_volume {
            return Err(bad(format!("{volume_len} bytes of volume, the image's is {expected_volume}")));
        }
        Ok(Self { file_len, metadata, nonzero, sent, pages, volume })
    }
}

/// The encoded head of `image`, made the first time and kept with the image.
pub fn encoded_head(image: &Image) -> Result<std::sync::Arc<Vec<u8>>, RemoteError> {
    if let Some(head) = image.head_cache().get() {
        return Ok(std::sync::Arc::clone(head));
    }
    let head = std::sync::Arc::new(Head::of(image)?.encode());
    Ok(std::sync::Arc::clone(image.head_cache().get_or_init(|| head)))
}

/// `count` pages of `image`'s guest memory from page `first`, as a holder sends them: at most
/// [`MAX_PAGES_PER_READ`], all inside guest memory.
pub fn pages(image: &Image, first: u64, count: u64) -> Result<Vec<u8>, RemoteError> {
    let pages = image.info.guest_memory_size() / PAGE_SIZE;
    if count == 0 || count > MAX_PAGES_PER_READ || first.checked_add(count).is_none_or(|end| end > pages) {
        return Err(bad(format!(
            "{count} pages from page {first:#x}: ask for 1 to {MAX_PAGES_PER_READ} pages inside the image's {pages}"
        )));
    }
    Ok(image.read_guest(first * PAGE_SIZE, count * PAGE_SIZE)?)
}

/// Runs from their encoded bytes (16 each).
fn runs(bytes: &[u8]) -> Vec<(u64, u64)> {
    bytes
        .as_chunks::<16>()
        .0
        .iter()
        .map(|run| {
            let (first, count) = run.split_at(8);
            (
                u64::from_le_bytes(first.try_into().unwrap_or_default()),
                u64::from_le_bytes(count.try_into().unwrap_or_default()),
            )
        })
        .collect()
}

/// Fails unless `runs` are non-empty each, ascending, disjoint and inside `pages`.
fn check_runs(runs: &[(u64, u64)], pages: u64, what: &str) -> Result<(), RemoteError> {
    let mut next = 0;
    for &(first, count) in runs {
        let end = first.checked_add(count).filter(|&end| count > 0 && first >= next && end <= pages);
        next = end.ok_or_else(|| {
            bad(format!("the {what} run of {count} pages at page {first:#x} is empty, out of order, or outside the {pages} pages of guest memory"))
        })?;
    }
    Ok(())
}

/// Whether `page` lies in one of the sorted `runs`.
pub(crate) fn contains(runs: &[(u64, u64)], page: u64) -> bool {
    let at = runs.partition_point(|&(first, _)| first <= page);
    at.checked_sub(1).is_some_and(|i| page < runs[i].0 + runs[i].1)
}

/// Sorted runs with touching ones merged.
fn merge(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|&(_, count)| count > 0);
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (first, count) in runs {
        match merged.last_mut() {
            Some((start, len)) if *start + *len >= first => *len = (*len).max(first + count - *start),
            _ => merged.push((first, count)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Head {
        let writer = image::ImageWriter {
            vcpu: vec![],
            vm: vec![],
            guest: image::GuestMetadata {
                interface_version: abi::INTERFACE_VERSION,
                function_name: "hello".into(),
                wasm_sha256: [5; 32],
                io_table_gpa: 0,
                io_table_len: 0,
                runtime_version: "thaw-guest".into(),
            },
            memory: vec![image::MemoryRange { gpa: 0, len: 64 * PAGE_SIZE, file_offset: 0 }],
            volume_len: 0,
            working_set: vec![],
        };
        let (metadata, layout) = writer.encode(64 * PAGE_SIZE);
        Head {
            file_len: layout.file_len,
            metadata,
            nonzero: vec![(1, 3), (10, 2)],
            sent: vec![(2, 1)],
            pages: vec![7; 4096],
            volume: Vec::new(),
        }
    }

    #[test]
    fn a_head_round_trips_and_its_fixed_part_is_golden() {
        let head = sample();
        let bytes = head.encode();
        assert_eq!(&bytes[..16], b"THAWHEAD\x01\0\0\0\0\0\0\0");
        let counts: Vec<u64> = bytes[24..56].chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(counts, [head.metadata.len() as u64, 2, 1, 0]);
        assert_eq!(bytes.len(), 56 + head.metadata.len() + 3 * 16 + 4096 + 32);
        assert_eq!(Head::decode(&bytes).unwrap(), head);
    }

    #[test]
    fn runs_merge_and_are_found() {
        assert_eq!(merge(vec![(5, 1), (1, 2), (3, 2), (9, 0)]), vec![(1, 5)]);
        assert!(contains(&[(1, 2), (8, 1)], 2) && contains(&[(1, 2), (8, 1)], 8));
        assert!(!contains(&[(1, 2), (8, 1)], 3) && !contains(&[(1, 2), (8, 1)], 0));
    }

    #[test]
    fn hostile_heads_get_one_clear_error_each() {
        let good = sample().encode();
        let error = |bytes: &[u8]| Head::decode(bytes).unwrap_err().to_string();
        assert!(error(&good[..40]).contains("shorter than its fixed part"));
        let mut flipped = good.clone();
        flipped[70] ^= 1;
        assert!(error(&flipped).contains("SHA-256 does not match"));
        let mut cut = good[..good.len() - 33].to_vec();
        cut.extend_from_slice(&Sha256::digest(&cut));
        assert!(error(&cut).contains("runs past the end"), "{}", error(&cut));
        let resealed = |head: &Head| head.encode();
        let mut outside = sample();
        outside.nonzero = vec![(1, 3), (10, 1 << 40)];
        assert!(error(&resealed(&outside)).contains("outside the"));
        let mut unordered = sample();
        unordered.nonzero = vec![(10, 2), (1, 3)];
        assert!(error(&resealed(&unordered)).contains("out of order"));
        let mut zero = sample();
        zero.sent = vec![(5, 1)];
        assert!(error(&resealed(&zero)).contains("page map says is zero"));
        let mut volume = sample();
        volume.volume = vec![1; 10];
        assert!(error(&resealed(&volume)).contains("bytes of volume"));
    }
}
