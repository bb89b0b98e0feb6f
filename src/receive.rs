//! The replica's checks on what it receives, as pure functions: whether a
//! FRAMES message fits the replica's position, what to do with each of its
//! frames, and whether each reply of a snapshot copy is well formed. The replica
//! thread (`replica.rs`) calls them; so do the fuzz targets (`fuzz/`), which feed
//! them arbitrary bytes.

use crate::frame::{FrameHeader, MAX_FRAME_NO};
use crate::log::hex;
use crate::wire::{self, Body, Header};

/// Message-level checks of a FRAMES message: the database, the generation
/// (`current_gen` is that of the transaction in progress, or of the position)
/// and the page size must be the replica's.
pub fn check_frames_message(h: &Header, page_size: u32, db_id: &[u8; 16], current_gen: u64, replica_page_size: u32) -> Result<(), String> {
    if h.db_id != *db_id {
        return Err(format!("refused frames of another database (db_id {}; this replica follows {})", hex(&h.db_id), hex(db_id)));
    }
    if h.generation < current_gen {
        return Err(format!("refused frames of old generation {} (the replica is at generation {current_gen})", h.generation));
    }
    if page_size != replica_page_size {
        return Err(format!("refused frames with {page_size}-byte pages (the replica has {replica_page_size}-byte pages)"));
    }
    Ok(())
}

/// What the replica does with one received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameVerdict {
    /// Already applied or pending: skip it.
    Duplicate,
    /// Frames are missing before it: catch up from the replica's position.
    Gap,
    /// The next frame, and it verifies.
    Apply,
    /// Never applied; the reason.
    Refuse(String),
}

/// Judges one frame against the next expected frame_no and the checksum it must
/// chain from. `skips_base_image`: the frame would start a new generation
/// without being the first frame of its base image.
pub fn judge_frame(fh: &FrameHeader, page: &[u8], expected: u64, prev: u64, skips_base_image: bool) -> FrameVerdict {
    if fh.frame_no < expected {
        return FrameVerdict::Duplicate;
    }
    if fh.frame_no > MAX_FRAME_NO {
        return FrameVerdict::Refuse(format!("refused frame_no {}: past any history", fh.frame_no));
    }
    if fh.frame_no > expected || skips_base_image {
        return FrameVerdict::Gap;
    }
    if !fh.chains_from(prev, page) {
        return FrameVerdict::Refuse(format!("refused frame_no {}: checksum chain broken (a bad frame is never applied)", fh.frame_no));
    }
    if fh.page_no == 0 {
        return FrameVerdict::Refuse(format!("refused frame_no {}: page_no 0", fh.frame_no));
    }
    FrameVerdict::Apply
}

/// The start of a snapshot, from the SNAPSHOT reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotStart {
    pub db_id: [u8; 16],
    pub generation: u64,
    pub snapshot_id: u64,
    pub frame_no: u64,
    pub checksum: u64,
    pub page_size: u32,
    pub db_pages: u32,
}

/// Reads the reply to a snapshot request.
pub fn snapshot_reply(reply: &[u8]) -> Result<SnapshotStart, String> {
    let (h, body) = wire::decode(reply).map_err(|e| format!("bad snapshot reply: {e}"))?;
    match body {
        Body::Snapshot { frame_no, .. } if frame_no > MAX_FRAME_NO => {
            Err(format!("refused a snapshot at frame_no {frame_no}: past any history"))
        }
        Body::Snapshot { snapshot_id, frame_no, checksum, page_size, db_pages } => {
            Ok(SnapshotStart { db_id: h.db_id, generation: h.generation, snapshot_id, frame_no, checksum, page_size, db_pages })
        }
        Body::Error { reason } => Err(format!("the primary cannot make a snapshot: {reason}")),
        _ => Err("unexpected snapshot reply".into()),
    }
}

/// Pages `from..until` of a snapshot: one page request.
pub type PageRange = (u32, u32);

/// A snapshot being copied: the page ranges to ask for, and the checks on each
/// PAGES reply. Ranges split 1..=db_pages into requests of one reply's worth of
/// pages each, so that several can be in flight and answered in any order; a
/// reply that ends early leaves the rest of its range to ask for again. Every
/// accepted reply covers at least one page of its range, so the copy ends after
/// at most db_pages replies, with every page asked for once.
pub struct SnapshotCopy {
    pub db_id: [u8; 16],
    pub snapshot_id: u64,
    pub page_size: u32,
    pub db_pages: u32,
    /// The first page no request has covered yet.
    from: u32,
    /// Rests of ranges whose replies ended early.
    rests: Vec<PageRange>,
}

impl SnapshotCopy {
    pub fn new(s: &SnapshotStart) -> SnapshotCopy {
        SnapshotCopy { db_id: s.db_id, snapshot_id: s.snapshot_id, page_size: s.page_size, db_pages: s.db_pages, from: 1, rests: vec![] }
    }

    /// The next range to ask for, or None once every page has been asked for.
    pub fn next_request(&mut self) -> Option<PageRange> {
        if let Some(r) = self.rests.pop() {
            return Some(r);
        }
        if self.from > self.db_pages {
            return None;
        }
        let until = self.from.saturating_add(wire::pages_per_reply(self.page_size)).min(self.db_pages.saturating_add(1));
        let r = (self.from, until);
        self.from = r.1;
        Some(r)
    }

    /// Checks the reply to the request for `range`; returns its pages
    /// (borrowed from `reply`). What the reply left of the range is asked for
    /// by a later `next_request`.
    pub fn accept<'a>(&mut self, range: PageRange, reply: &'a [u8]) -> Result<Vec<(u32, &'a [u8])>, String> {
        let (from, until) = range;
        let (h, body) = wire::decode(reply).map_err(|e| format!("bad snapshot reply: {e}"))?;
        if h.db_id != self.db_id {
            return Err("a snapshot page reply names another database".into());
        }
        let (next_page, pages) = match body {
            Body::Pages { snapshot_id, next_page, page_size, pages }
                if snapshot_id == self.snapshot_id && page_size == self.page_size && next_page > from && next_page <= until =>
            {
                (next_page, pages)
            }
            Body::Error { reason } => return Err(format!("snapshot failed: {reason}")),
            _ => return Err("unexpected snapshot page reply".into()),
        };
        // wire::decode saw to it that pages are in order and below next_page.
        if let Some(&(n, _)) = pages.iter().find(|(n, _)| *n < from || *n > self.db_pages) {
            return Err(format!("snapshot page {n} is outside the pages asked for ({from}..{until}, of {})", self.db_pages));
        }
        if next_page < until {
            self.rests.push((next_page, until));
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::make_frame;
    use crate::wire::PagesBuilder;

    fn start(db_pages: u32) -> SnapshotStart {
        SnapshotStart { db_id: [1; 16], generation: 1, snapshot_id: 9, frame_no: 5, checksum: 6, page_size: 512, db_pages }
    }

    #[test]
    fn snapshot_pages_must_be_the_ones_asked_for() {
        let page = [3u8; 512];
        let reply = |next: u32, pages: &[u32]| {
            let mut pb = PagesBuilder::new([1; 16], 1, 9, 512);
            for &n in pages {
                pb.push(n, &page);
            }
            pb.finish(next)
        };
        let per = wire::pages_per_reply(512);
        let mut copy = SnapshotCopy::new(&start(2 * per + 3));
        let (a, b, c) = (copy.next_request().unwrap(), copy.next_request().unwrap(), copy.next_request().unwrap());
        assert_eq!((a, b, c), ((1, per + 1), (per + 1, 2 * per + 1), (2 * per + 1, 2 * per + 4)));
        // Replies in any order; one that ends early leaves the rest to ask for.
        assert_eq!(copy.accept(c, &reply(2 * per + 2, &[2 * per + 1])).unwrap().len(), 1);
        assert_eq!(copy.next_request(), Some((2 * per + 2, 2 * per + 4)));
        assert_eq!(copy.next_request(), None);
        assert_eq!(copy.accept(a, &reply(per + 1, &[1, 2, per])).unwrap().len(), 3);
        // A page before the range asked for (a replayed reply) is refused.
        assert!(copy.accept(b, &reply(per + 2, &[per])).unwrap_err().contains("outside"));
        // So is a reply that does not move forward, or goes past the range, or
        // is of another snapshot.
        assert!(copy.accept(b, &reply(per + 1, &[])).is_err());
        assert!(copy.accept(b, &reply(2 * per + 2, &[per + 1])).is_err());
        assert!(copy.accept(b, &PagesBuilder::new([1; 16], 1, 8, 512).finish(per + 2)).is_err());
        assert_eq!(copy.accept(b, &reply(2 * per + 1, &[per + 1])).unwrap(), vec![(per + 1, &page[..])]);
        assert_eq!(copy.accept((2 * per + 2, 2 * per + 4), &reply(2 * per + 4, &[2 * per + 3])).unwrap().len(), 1);
        assert_eq!(copy.next_request(), None);
        // A page past the snapshot's end is refused.
        let mut copy = SnapshotCopy::new(&start(4));
        let r = copy.next_request().unwrap();
        assert_eq!(r, (1, 5));
        assert!(copy.accept(r, &reply(6, &[5])).is_err(), "page 5 of 4");
        assert!(copy.accept(r, &reply(5, &[3])).is_ok());
        assert_eq!(copy.next_request(), None);
    }

    /// Found by the replica_stream fuzz target: a snapshot at frame_no
    /// u64::MAX became the replica's position, and the next frame_no expected
    /// after it overflowed.
    #[test]
    fn frame_numbers_past_any_history_are_refused() {
        let reply = wire::snapshot([1; 16], 1, 9, u64::MAX, 6, 512, 4);
        assert!(snapshot_reply(&reply).unwrap_err().contains("past any history"));
        assert!(snapshot_reply(&wire::snapshot([1; 16], 1, 9, MAX_FRAME_NO, 6, 512, 4)).is_ok());
        let page = [1u8; 512];
        let f = make_frame(7, MAX_FRAME_NO + 1, 2, 0, &page);
        assert!(matches!(judge_frame(&f, &page, MAX_FRAME_NO + 1, 7, false), FrameVerdict::Refuse(_)));
    }

    #[test]
    fn frames_are_judged_against_the_position() {
        let page = [1u8; 512];
        let f = make_frame(7, 3, 2, 0, &page);
        assert_eq!(judge_frame(&f, &page, 3, 7, false), FrameVerdict::Apply);
        assert_eq!(judge_frame(&f, &page, 4, 7, false), FrameVerdict::Duplicate);
        assert_eq!(judge_frame(&f, &page, 2, 7, false), FrameVerdict::Gap);
        assert_eq!(judge_frame(&f, &page, 3, 7, true), FrameVerdict::Gap);
        assert!(matches!(judge_frame(&f, &page, 3, 8, false), FrameVerdict::Refuse(_)));
        let z = make_frame(7, 3, 0, 0, &page);
        assert!(matches!(judge_frame(&z, &page, 3, 7, false), FrameVerdict::Refuse(_)));
        let h = Header { kind: wire::KIND_FRAMES, flags: 0, db_id: [1; 16], generation: 2 };
        assert!(check_frames_message(&h, 512, &[1; 16], 2, 512).is_ok());
        assert!(check_frames_message(&h, 512, &[2; 16], 2, 512).unwrap_err().contains("another database"));
        assert!(check_frames_message(&h, 512, &[1; 16], 3, 512).unwrap_err().contains("old generation"));
        assert!(check_frames_message(&h, 1024, &[1; 16], 2, 512).unwrap_err().contains("pages"));
    }
}
