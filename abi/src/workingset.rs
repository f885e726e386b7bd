//! The recorded working set (REAP): the guest-virtual pages one sample request touched after a
//! restore, as runs of consecutive pages that were read, or written.
//!
//! `thaw snapshot` records it into the image's working-set section (format version 3). A VM
//! restored ahead of its request (pool and reset modes) hands it to the guest, which touches
//! every page before it parks, so the request finds them mapped (under PVM each first touch
//! costs a shadow-page fault). The guest fetches it with the
//! [`WORKING_SET`](crate::hypercall::number::WORKING_SET) hypercall, a page of runs at a time.
//!
//! ```text
//!   one run, 16 bytes:
//!   0   8   start: guest-virtual address of the first page, page-aligned; bit 0 set = written
//!   8   4   pages in the run (at least 1)
//!   12  4   reserved, zero
//! ```
//!
//! Runs are sorted by start, never overlap, and stay in the canonical lower half. A written page
//! is touched for write (its byte read and written back unchanged); the others are read.

use alloc::vec::Vec;

use crate::codec::{u32_at, u64_at};
use crate::hypercall::HYPERCALL_PAGE_SIZE;

/// Bytes of one encoded run.
pub const RUN_LEN: usize = 16;
/// Page size of the runs.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages a working set may hold (4 GiB of touches).
pub const MAX_PAGES: u64 = 1 << 20;
/// Most runs a working set may hold.
pub const MAX_RUNS: usize = 1 << 16;
/// End of the canonical lower half: every page of a run lies below it.
pub const ADDRESS_LIMIT: u64 = 1 << 47;
/// Runs one `WORKING_SET` reply carries at most: the hypercall page holds a u32 count, four
/// reserved bytes, then the runs.
pub const RUNS_PER_CALL: usize = (HYPERCALL_PAGE_SIZE - 8) / RUN_LEN;

const WRITTEN: u64 = 1;

/// Consecutive pages touched the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest-virtual address of the first page.
    pub start: u64,
    /// Pages in the run.
    pub pages: u32,
    /// The request wrote these pages (otherwise it only read them).
    pub written: bool,
}

impl Run {
    /// The first address past the run.
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.pages) * PAGE_SIZE
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.start | if self.written { WRITTEN } else { 0 }).to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }

    /// Decodes one run from exactly [`RUN_LEN`] bytes; checks only what one run can show.
    pub fn decode(bytes: &[u8; RUN_LEN]) -> Result<Self, WorkingSetError> {
        let word = u64_at(bytes, 0);
        let (start, pages) = (word & !(PAGE_SIZE - 1), u32_at(bytes, 8));
        if word & (PAGE_SIZE - 1) & !WRITTEN != 0 || u32_at(bytes, 12) != 0 {
            return Err(WorkingSetError::Reserved { start });
        }
        if pages == 0 || start.checked_add(u64::from(pages) * PAGE_SIZE).is_none_or(|end| end > ADDRESS_LIMIT) {
            return Err(WorkingSetError::OutOfRange { start, pages });
        }
        Ok(Self { start, pages, written: word & WRITTEN != 0 })
    }
}

/// What is wrong with an encoded working set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkingSetError {
    /// The bytes are not whole runs.
    #[error("{0} bytes is not a whole number of {RUN_LEN}-byte runs")]
    Length(usize),
    /// A run sets reserved bits.
    #[error("the run at {start:#x} sets reserved bits")]
    Reserved {
        /// Its start address.
        start: u64,
    },
    /// A run is empty or reaches past the canonical lower half.
    #[error("the run of {pages} pages at {start:#x} is empty or leaves the lower half")]
    OutOfRange {
        /// Its start address.
        start: u64,
        /// Its page count.
        pages: u32,
    },
    /// A run starts before the previous one ends.
    #[error("the run at {start:#x} overlaps or precedes the one before it")]
    Unordered {
        /// Its start address.
        start: u64,
    },
    /// More runs or pages than a working set may hold.
    #[error("{runs} runs of {pages} pages in all, more than the {MAX_RUNS} runs or {MAX_PAGES} pages allowed")]
    TooLarge {
        /// Runs.
        runs: usize,
        /// Pages.
        pages: u64,
    },
}

/// Encodes `runs` (which must already be valid, as [`from_pages`] makes them).
pub fn encode(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_LEN);
    for run in runs {
        run.encode_into(&mut out);
    }
    out
}

/// Decodes and validates a working set.
pub fn decode(bytes: &[u8]) -> Result<Vec<Run>, WorkingSetError> {
    let (chunks, rest) = bytes.as_chunks::<RUN_LEN>();
    if !rest.is_empty() {
        return Err(WorkingSetError::Length(bytes.len()));
    }
    let runs = chunks.iter().map(Run::decode).collect::<Result<Vec<_>, _>>()?;
    let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    if runs.len() > MAX_RUNS || pages > MAX_PAGES {
        return Err(WorkingSetError::TooLarge { runs: runs.len(), pages });
    }
    if let Some(pair) = runs.windows(2).find(|pair| pair[1].start < pair[0].end()) {
        return Err(WorkingSetError::Unordered { start: pair[1].start });
    }
    Ok(runs)
}

/// Total pages in `runs`.
pub fn page_count(runs: &[Run]) -> u64 {
    runs.iter().map(|r| u64::from(r.pages)).sum()
}

/// Builds runs from touched pages (address, written), in any order and with repeats: a page
/// touched both ways counts as written. Pages outside the lower half are dropped, and the set is
/// capped at [`MAX_PAGES`] (the lowest addresses are kept).
pub fn from_pages(pages: impl IntoIterator<Item = (u64, bool)>) -> Vec<Run> {
    let mut pages: Vec<(u64, bool)> =
        pages.into_iter().map(|(a, w)| (a & !(PAGE_SIZE - 1), w)).filter(|(a, _)| *a < ADDRESS_LIMIT).collect();
    pages.sort_unstable_by_key(|&(a, w)| (a, !w));
    pages.dedup_by_key(|p| p.0);
    pages.truncate(MAX_PAGES as usize);
    let mut runs: Vec<Run> = Vec::new();
    for (start, written) in pages {
        match runs.last_mut() {
            Some(last) if last.end() == start && last.written == written && last.pages < u32::MAX => last.pages += 1,
            _ => runs.push(Run { start, pages: 1, written }),
        }
    }
    runs.truncate(MAX_RUNS);
    runs
}

/// The runs one `WORKING_SET` call from run `first` on answers with: at most
/// [`RUNS_PER_CALL`], none past the end.
pub fn batch(runs: &[Run], first: usize) -> &[Run] {
    let rest = runs.get(first..).unwrap_or(&[]);
    &rest[..rest.len().min(RUNS_PER_CALL)]
}

/// The hypercall page's contents answering a `WORKING_SET` call with `batch` (see [`batch`]):
/// a u32 count, four zero bytes, then the runs. A count of 0 means no more.
pub fn reply(batch: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + batch.len() * RUN_LEN);
    out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&encode(batch));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn pages_merge_into_runs_and_round_trip() {
        let pages = [(0x3000, false), (0x1000, false), (0x2fff, true), (0x1000, true), (0x4000, false), (0x9000, true)];
        let runs = from_pages(pages);
        assert_eq!(
            runs,
            vec![
                Run { start: 0x1000, pages: 2, written: true },
                Run { start: 0x3000, pages: 2, written: false },
                Run { start: 0x9000, pages: 1, written: true },
            ]
        );
        let bytes = encode(&runs);
        assert_eq!(&bytes[..16], &[0x01, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], "golden run encoding");
        assert_eq!(decode(&bytes), Ok(runs.clone()));
        assert_eq!(page_count(&runs), 5);
        assert!(from_pages([(ADDRESS_LIMIT, false)]).is_empty(), "upper-half pages are dropped");
    }

    #[test]
    fn rejects_hostile_encodings_with_the_value() {
        let good = encode(&[Run { start: 0x1000, pages: 1, written: false }]);
        let mut reserved = good.clone();
        reserved[1] |= 0x02; // bit 9 of the start word
        let mut flags = good.clone();
        flags[12] = 1;
        let mut empty = good.clone();
        empty[8] = 0;
        let high = encode(&[Run { start: ADDRESS_LIMIT - 0x1000, pages: 2, written: false }]);
        let unordered =
            encode(&[Run { start: 0x5000, pages: 2, written: false }, Run { start: 0x6000, pages: 1, written: true }]);
        let cases: [(&[u8], &str); 6] = [
            (&good[..15], "15 bytes"),
            (&reserved, "0x1000 sets reserved bits"),
            (&flags, "reserved bits"),
            (&empty, "run of 0 pages at 0x1000"),
            (&high, "leaves the lower half"),
            (&unordered, "run at 0x6000 overlaps"),
        ];
        for (bytes, expected) in cases {
            let message = decode(bytes).unwrap_err().to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let huge = encode(&[Run { start: 0, pages: MAX_PAGES as u32 + 1, written: false }]);
        assert!(matches!(decode(&huge), Err(WorkingSetError::TooLarge { .. })));
    }

    #[test]
    fn replies_page_through_the_runs() {
        let runs: Vec<Run> =
            (0..RUNS_PER_CALL as u64 + 3).map(|i| Run { start: i * 0x2000, pages: 1, written: false }).collect();
        let first = reply(batch(&runs, 0));
        assert_eq!(first.len(), 8 + RUNS_PER_CALL * RUN_LEN);
        assert!(first.len() <= HYPERCALL_PAGE_SIZE);
        assert_eq!(u32_at(&first, 0) as usize, RUNS_PER_CALL);
        let second = reply(batch(&runs, RUNS_PER_CALL));
        assert_eq!(u32_at(&second, 0), 3);
        assert_eq!(decode(&second[8..]).unwrap(), runs[RUNS_PER_CALL..]);
        assert_eq!(reply(batch(&runs, usize::MAX)), vec![0; 8], "past the end: no more");
    }

    #[test]
    fn every_working_set_error_message_is_pinned() {
        let cases = [
            (WorkingSetError::Length(15), "15 bytes is not a whole number of 16-byte runs"),
            (WorkingSetError::Reserved { start: 0x1000 }, "the run at 0x1000 sets reserved bits"),
            (
                WorkingSetError::OutOfRange { start: 0x1000, pages: 0 },
                "the run of 0 pages at 0x1000 is empty or leaves the lower half",
            ),
            (WorkingSetError::Unordered { start: 0x6000 }, "the run at 0x6000 overlaps or precedes the one before it"),
            (
                WorkingSetError::TooLarge { runs: 1, pages: 1_048_577 },
                "1 runs of 1048577 pages in all, more than the 65536 runs or 1048576 pages allowed",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message, "{error:?}");
        }
    }
}
