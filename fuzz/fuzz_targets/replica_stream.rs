//! What a replica does with an arbitrary sequence of replies and live messages
//! (src/receive.rs, the checks replica.rs makes): a snapshot reply, its pages
//! replies, then FRAMES messages. A model replica with an in-memory database
//! follows replica.rs's steps; every page and frame the checks let through must
//! be well formed: pages in order within the snapshot, frames consecutive,
//! chained from the applied position, with a page_no and a whole page.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use walcast::receive::{self, FrameVerdict, SnapshotCopy, SnapshotStart};
use walcast::wire::{self, Body};

/// Message flags (see walcast_fuzz::split_messages): which repairs to make.
const KEEP_CRC: u8 = 1;
/// Rewrite a FRAMES message's checksums to chain from the replica's position.
const CHAIN: u8 = 2;

struct Position {
    db_id: [u8; 16],
    generation: u64,
    frame_no: u64,
    checksum: u64,
    page_size: u32,
}

struct Pending {
    next_frame: u64,
    prev_checksum: u64,
    generation: u64,
    pages: Vec<(u32, Vec<u8>)>,
}

enum Phase {
    NeedSnapshot,
    Copying { start: SnapshotStart, copy: SnapshotCopy, range: receive::PageRange, last: u32, pages: Vec<(u32, Vec<u8>)> },
    Streaming,
}

fuzz_target!(|data: &[u8]| {
    let mut phase = Phase::NeedSnapshot;
    let mut pos: Option<Position> = None;
    let mut pending: Option<Pending> = None;
    let mut db: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for (flags, m) in walcast_fuzz::split_messages(data).into_iter().take(64) {
        let mut m = m.to_vec();
        if flags & CHAIN != 0 {
            let prev = pending.as_ref().map(|p| p.prev_checksum).or(pos.as_ref().map(|p| p.checksum)).unwrap_or(0);
            walcast_fuzz::fix_frames_message(&mut m, prev);
        } else if flags & KEEP_CRC == 0 {
            walcast_fuzz::fix_message_crc(&mut m);
        }
        phase = match phase {
            Phase::NeedSnapshot => match receive::snapshot_reply(&m) {
                // A snapshot of no pages is refused (replica.rs: "holds no pages").
                Ok(start) if start.db_pages > 0 => {
                    let mut copy = SnapshotCopy::new(&start);
                    let range = copy.next_request().expect("a snapshot with pages asks for some");
                    Phase::Copying { start, copy, range, last: 0, pages: Vec::new() }
                }
                Ok(_) => Phase::NeedSnapshot,
                Err(_) => Phase::NeedSnapshot,
            },
            // One request at a time, as the simplest replica would ask: pages
            // then come in order.
            Phase::Copying { start, mut copy, range, mut last, mut pages } => {
                let (from, until) = range;
                match copy.accept(range, &m) {
                    Err(_) => Phase::NeedSnapshot,
                    Ok(got) => {
                        for (n, page) in got {
                            assert!(n >= from && n < until && n > last && n <= start.db_pages, "page {n} after {last}, asked {from}..{until}");
                            assert_eq!(page.len(), start.page_size as usize);
                            last = n;
                            pages.push((n, page.to_vec()));
                        }
                        match copy.next_request() {
                            Some(next) => {
                                assert!(next.0 > from && next.0 > last && next.1 > next.0);
                                Phase::Copying { start, copy, range: next, last, pages }
                            }
                            // A snapshot without pages is refused, as replica.rs does.
                            None if pages.is_empty() => Phase::NeedSnapshot,
                            None => {
                                db = pages.into_iter().collect();
                                pending = None;
                                pos = Some(Position {
                                    db_id: start.db_id,
                                    generation: start.generation,
                                    frame_no: start.frame_no,
                                    checksum: start.checksum,
                                    page_size: start.page_size,
                                });
                                Phase::Streaming
                            }
                        }
                    }
                }
            }
            Phase::Streaming => {
                if let Ok((h, Body::Frames { page_size, frames, .. })) = wire::decode(&m) {
                    let p = pos.as_mut().unwrap();
                    let current_gen = pending.as_ref().map_or(p.generation, |t| t.generation);
                    if receive::check_frames_message(&h, page_size, &p.db_id, current_gen, p.page_size).is_ok() {
                        let (mut expected, mut prev) = match &pending {
                            Some(t) => (t.next_frame, t.prev_checksum),
                            None => (p.frame_no + 1, p.checksum),
                        };
                        for (i, (fh, page)) in frames.iter().enumerate() {
                            let skips =
                                pending.is_none() && h.generation > p.generation && !(i == 0 && h.flags & wire::FLAG_GENERATION_START != 0);
                            match receive::judge_frame(fh, page, expected, prev, skips) {
                                FrameVerdict::Duplicate => continue,
                                FrameVerdict::Gap => break,
                                FrameVerdict::Refuse(_) => {
                                    pending = None;
                                    break;
                                }
                                FrameVerdict::Apply => {}
                            }
                            assert_eq!(fh.frame_no, expected);
                            assert!(fh.chains_from(prev, page) && fh.page_no != 0);
                            assert_eq!(page.len(), p.page_size as usize);
                            let t = pending.get_or_insert_with(|| Pending {
                                next_frame: expected,
                                prev_checksum: prev,
                                generation: h.generation,
                                pages: Vec::new(),
                            });
                            t.pages.push((fh.page_no, page.to_vec()));
                            prev = fh.checksum;
                            expected += 1;
                            t.next_frame = expected;
                            t.prev_checksum = prev;
                            if fh.size_after != 0 {
                                let t = pending.take().unwrap();
                                assert!(fh.frame_no > p.frame_no);
                                db.extend(t.pages);
                                db.retain(|&n, _| n <= fh.size_after);
                                *p = Position { generation: t.generation, frame_no: fh.frame_no, checksum: fh.checksum, ..*p };
                            }
                        }
                    }
                }
                Phase::Streaming
            }
        };
    }
});
