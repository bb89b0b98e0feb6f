//! The catch-up server (src/publish.rs) over a damaged log: the sample log with
//! bytes changed, cut short, and (mostly) its checksums repaired so that the
//! damage reaches the indexing, lookups and snapshots behind them. Opening may
//! fail; once open, every request gets a well-formed reply of at most
//! wire::MAX_MESSAGE bytes, and nothing panics or allocates without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use walcast::publish::{CatchupServer, PublishStats};
use walcast::wire::{self, Body};
use walcast_fuzz::SAMPLE_DB_ID;

fn check(reply: &[u8]) -> (wire::Header, Body<'_>) {
    assert!(reply.len() <= wire::MAX_MESSAGE, "reply of {} bytes", reply.len());
    wire::decode(reply).unwrap_or_else(|e| panic!("the server sent a malformed reply: {e}"))
}

static SAMPLE: OnceLock<(PathBuf, Vec<u8>, Vec<(u64, u64)>)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((head, edits)) = data.split_first_chunk::<4>() else { return };
    let (path, original, frames) = SAMPLE.get_or_init(|| {
        let p = walcast_fuzz::scratch_path("damaged.log");
        let s = walcast_fuzz::write_sample_log(&p);
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes, s.checksums.into_iter().collect())
    });
    // head: mode (bit 0: keep the damaged checksums), index step, cut.
    let mut log = original.clone();
    for e in edits.chunks_exact(3).take(64) {
        let at = u16::from_le_bytes([e[0], e[1]]) as usize;
        if let Some(b) = log.get_mut(at) {
            *b ^= e[2];
        }
    }
    let cut = u16::from_le_bytes([head[2], head[3]]) as usize;
    if cut != 0 && cut < log.len() {
        log.truncate(cut);
    }
    if head[0] & 1 == 0 {
        walcast_fuzz::fix_log(&mut log);
    }
    std::fs::write(path, &log).unwrap();
    let step = 1 + head[1] as u64 * 64;
    let Ok(mut server) = CatchupServer::open_in_steps(path, step) else { return };
    let stats = PublishStats::default();
    if head[0] & 2 != 0 {
        server.idle();
    }
    for (n, c) in frames.iter().step_by(1 + (head[0] >> 5) as usize) {
        check(&server.handle(&wire::req_frames(SAMPLE_DB_ID, 0, *n, *c), &stats));
    }
    let snap = server.handle(&wire::req_snapshot(SAMPLE_DB_ID, 0), &stats);
    if let (_, Body::Snapshot { snapshot_id, db_pages, .. }) = check(&snap) {
        let mut from = 1u32;
        for _ in 0..64 {
            let reply = server.handle(&wire::req_pages(SAMPLE_DB_ID, 0, snapshot_id, from, u32::MAX), &stats);
            match check(&reply).1 {
                Body::Pages { next_page, .. } if next_page > from && from <= db_pages => from = next_page,
                _ => break,
            }
        }
    }
});
