//! The catch-up server's two-part index (src/publish.rs): a server that starts
//! `step` bytes before the log's durable point and indexes in steps of `step`
//! bytes, with idle calls where the input puts them, must answer every request
//! as a server that indexed the whole log at once does: the same frames, the
//! same refusals, the same snapshot. It may only add "still indexing" replies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use walcast::publish::{CatchupServer, PublishStats};
use walcast::wire::{self, Body};
use walcast_fuzz::{SampleLog, SAMPLE_DB_ID};

static LOG: OnceLock<(PathBuf, SampleLog)> = OnceLock::new();

fn still_indexing(reply: &[u8]) -> bool {
    matches!(wire::decode(reply), Ok((_, Body::Error { reason })) if reason.contains("still indexing"))
}

/// A reply without its snapshot id (ids differ between servers), pages as CRCs.
fn without_snapshot_id(reply: &[u8]) -> String {
    match wire::decode(reply).unwrap_or_else(|e| panic!("malformed reply: {e}")) {
        (h, Body::Snapshot { frame_no, checksum, page_size, db_pages, .. }) => {
            format!("{h:?} snapshot {frame_no} {checksum} {page_size} {db_pages}")
        }
        (h, Body::Pages { next_page, page_size, pages, .. }) => {
            let pages: Vec<(u32, u64)> = pages.iter().map(|(n, p)| (*n, walcast_fuzz::crc(p))).collect();
            format!("{h:?} pages {next_page} {page_size} {pages:?}")
        }
        (h, Body::Frames { primary_last, page_size, frames }) => {
            let frames: Vec<(u64, u32, u32, u64)> = frames.iter().map(|(f, _)| (f.frame_no, f.page_no, f.size_after, f.checksum)).collect();
            format!("{h:?} frames {primary_last} {page_size} {frames:?}")
        }
        (h, body) => format!("{h:?} {body:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((step, ops)) = data.split_first_chunk::<2>() else { return };
    let step = 1 + u16::from_le_bytes(*step) as u64 * 2;
    let (path, sample) = LOG.get_or_init(|| {
        let p = walcast_fuzz::scratch_path("index.log");
        let s = walcast_fuzz::write_sample_log(&p);
        (p, s)
    });
    let frames: Vec<(u64, u64)> = sample.checksums.iter().map(|(n, c)| (*n, *c)).collect();
    let mut parts = CatchupServer::open_in_steps(path, step).unwrap();
    let mut whole = CatchupServer::open_in_steps(path, u64::MAX).unwrap();
    // Walking back stops at a generation record: index the older part now.
    whole.idle();
    let stats = PublishStats::default();
    let mut snapshots: Option<(u64, u64)> = None;
    for op in ops.chunks_exact(3).take(48) {
        match op[0] % 5 {
            0 | 1 => parts.idle(),
            2 | 3 => {
                // After a frame the log holds (the right or a wrong checksum), or past its end.
                let i = op[1] as usize % (frames.len() + 2);
                let (n, c) = frames.get(i).copied().unwrap_or((frames.len() as u64 + i as u64, 0));
                let c = if op[2] & 1 == 0 { c } else { c ^ (op[2] as u64) << 8 };
                let db_id = if op[2] & 2 == 0 { SAMPLE_DB_ID } else { [0; 16] };
                let req = wire::req_frames(db_id, 0, n, c);
                let (a, b) = (parts.handle(&req, &stats), whole.handle(&req, &stats));
                // A request's time budget for indexing is 200 ms, which a loaded
                // machine can take away: "still indexing" is then a right answer.
                assert!(
                    a == b || still_indexing(&a),
                    "frames after {n}: {} vs {}",
                    without_snapshot_id(&a),
                    without_snapshot_id(&b)
                );
            }
            _ => {
                let Some((ia, ib)) = snapshots.filter(|_| op[1] & 1 == 1) else {
                    let req = wire::req_snapshot(SAMPLE_DB_ID, 0);
                    let (a, b) = (parts.handle(&req, &stats), whole.handle(&req, &stats));
                    if still_indexing(&a) {
                        continue;
                    }
                    assert_eq!(without_snapshot_id(&a), without_snapshot_id(&b));
                    if let (Ok((_, Body::Snapshot { snapshot_id: ia, .. })), Ok((_, Body::Snapshot { snapshot_id: ib, .. }))) =
                        (wire::decode(&a), wire::decode(&b))
                    {
                        snapshots = Some((ia, ib));
                    }
                    continue;
                };
                let from = op[2] as u32 % 48;
                let a = parts.handle(&wire::req_pages(SAMPLE_DB_ID, 0, ia, from, u32::MAX), &stats);
                let b = whole.handle(&wire::req_pages(SAMPLE_DB_ID, 0, ib, from, u32::MAX), &stats);
                assert_eq!(without_snapshot_id(&a), without_snapshot_id(&b), "pages from {from}");
            }
        }
    }
});
