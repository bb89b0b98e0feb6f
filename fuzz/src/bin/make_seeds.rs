//! Writes seed corpora for every fuzz target under the directory given (default
//! `corpus`): real messages, real log files, and the catch-up exchanges of a
//! replica bootstrapping from and following a small real log.
use std::path::{Path, PathBuf};
use walcast::log::LogWriter;
use walcast::publish::{CatchupServer, PublishStats};
use walcast::wire::{self, Body};
use walcast_fuzz::{join_messages, write_sample_log, SAMPLE_DB_ID};

/// Where the sample log's first frame record starts: after the header and a
/// generation record with an 11-byte reason.
const FIRST_FRAME: usize = 512 + 31 + 11 + 8;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let log = walcast_fuzz::scratch_path("seed.log");
    let sample = write_sample_log(&log);
    let log_bytes = std::fs::read(&log).unwrap();

    // Log files: the whole sample, and its prefixes up to each sync (smaller inputs).
    put(&dir, "log_scan", "sample", &[&[0u8][..], &log_bytes].concat());
    put(&dir, "log_tail", "sample", &[&[0u8][..], &log_bytes].concat());
    put(&dir, "log_tail", "sample-from-header", &[&[2u8][..], &log_bytes].concat());
    for cut in [FIRST_FRAME + 3 * 537 + 61, 4096] {
        let part = &log_bytes[..cut.min(log_bytes.len())];
        put(&dir, "log_scan", &format!("prefix-{cut}"), &[&[0u8][..], part].concat());
        put(&dir, "log_tail", &format!("prefix-{cut}"), &[&[0u8][..], part].concat());
    }

    // A replica's exchange with the catch-up server: new, then bootstrapping,
    // then catching up from the snapshot's position and from a few others.
    let mut server = CatchupServer::open(&log).unwrap();
    let stats = PublishStats::default();
    let mut requests: Vec<Vec<u8>> = vec![wire::req_frames([0; 16], 0, 0, 0), wire::req_snapshot([0; 16], 0)];
    let snap = server.handle(&requests[1], &stats);
    let Ok((h, Body::Snapshot { snapshot_id, frame_no, checksum, db_pages, .. })) = wire::decode(&snap) else { panic!("no snapshot") };
    let mut replies = vec![(0u8, snap.clone())];
    let mut from = 1;
    while from <= db_pages {
        let req = wire::req_pages(h.db_id, h.generation, snapshot_id, from, u32::MAX);
        let reply = server.handle(&req, &stats);
        let Ok((_, Body::Pages { next_page, .. })) = wire::decode(&reply) else { panic!("no pages") };
        requests.push(req);
        replies.push((0, reply));
        from = next_page;
    }
    for (n, c) in [(frame_no, checksum), (0, sample.checksums[&0]), (3, sample.checksums[&3]), (20, sample.checksums[&20])] {
        let req = wire::req_frames(SAMPLE_DB_ID, h.generation, n, c);
        let reply = server.handle(&req, &stats);
        requests.push(req);
        replies.push((0, reply));
    }
    let catchup: Vec<(u8, Vec<u8>)> = requests.iter().map(|r| (0u8, r.clone())).collect();
    put(&dir, "catchup_request", "exchange", &join_messages(&catchup));
    // With the repairs that let a mutated request reach the log: db_id, snapshot id, checksum.
    let repaired: Vec<(u8, Vec<u8>)> = requests.iter().map(|r| (2 | 4 | 8, r.clone())).collect();
    put(&dir, "catchup_request", "exchange-repaired", &join_messages(&repaired));
    for (i, r) in requests.iter().enumerate() {
        put(&dir, "wire_decode", &format!("request-{i}"), &[&[0u8][..], r].concat());
    }

    // The replica side: the snapshot, its pages, then the frames committed
    // after the snapshot (as the catch-up server sends them) and a heartbeat.
    let mut stream: Vec<(u8, Vec<u8>)> = replies[..replies.len() - 4].to_vec();
    let (mut w, _) = LogWriter::open(&log, true).unwrap();
    let mut live = Vec::new();
    let (mut n, mut c) = (frame_no, checksum);
    for t in 0..3u32 {
        w.begin_batch();
        w.add_frame(2, 0, &[t as u8; 1024]).unwrap();
        w.add_frame(1 + t, 6, &[7; 1024]).unwrap();
        w.commit(6, None).unwrap();
        let reply = server.handle(&wire::req_frames(SAMPLE_DB_ID, h.generation, n, c), &stats);
        let Ok((_, Body::Frames { frames, .. })) = wire::decode(&reply) else { panic!("no frames") };
        (n, c) = frames.last().map(|f| (f.0.frame_no, f.0.checksum)).unwrap();
        live.push((0u8, reply));
    }
    stream.extend(live.iter().cloned());
    stream.push((0, wire::heartbeat(SAMPLE_DB_ID, h.generation, n, c, 1)));
    put(&dir, "replica_stream", "bootstrap", &join_messages(&stream));
    let chained: Vec<(u8, Vec<u8>)> = stream.iter().map(|(_, m)| (2u8, m.clone())).collect();
    put(&dir, "replica_stream", "bootstrap-chained", &join_messages(&chained));
    for (i, (_, r)) in replies.iter().chain(live.iter()).enumerate() {
        put(&dir, "wire_decode", &format!("reply-{i}"), &[&[0u8][..], r].concat());
    }
    put(&dir, "wire_decode", "heartbeat", &[&[0u8][..], &wire::heartbeat(SAMPLE_DB_ID, 2, 3, 4, 5)].concat());
    put(&dir, "wire_decode", "error", &[&[0u8][..], &wire::error(SAMPLE_DB_ID, 2, "no such snapshot")].concat());
    put(&dir, "wire_decode", "need-snapshot", &[&[0u8][..], &wire::need_snapshot(SAMPLE_DB_ID, 2, "new replica")].concat());

    // Frame headers: the chain seed, then a real frame record of the log.
    let first_frame = &log_bytes[FIRST_FRAME..FIRST_FRAME + 1 + 24 + 512];
    put(&dir, "frame_header", "first", &[&sample.checksums[&0].to_le_bytes()[..], &first_frame[1..]].concat());
    // The sealed envelope: messages of each kind (head: key byte, channel and
    // change, bound nonce byte, change position).
    put(&dir, "seal_open", "heartbeat", &[&[1u8, 0, 0, 3][..], &wire::heartbeat(SAMPLE_DB_ID, 2, 3, 4, 5)].concat());
    put(&dir, "seal_open", "request", &[&[2u8, 4, 9, 200][..], &requests[2]].concat());
    put(&dir, "seal_open", "reply", &[&[3u8, 8, 1, 77][..], &replies[1].1].concat());
    // The two-part index: small steps, idle calls between frames requests and a snapshot.
    let ops: Vec<u8> = (0..40u8).flat_map(|i| [i % 5, i.wrapping_mul(7), i & 1]).collect();
    put(&dir, "catchup_index", "steps-64", &[&[32u8, 0][..], &ops].concat());
    put(&dir, "catchup_index", "steps-2k", &[&[0u8, 4][..], &ops].concat());
    // A damaged log: no change; a flipped frame header byte; a cut.
    put(&dir, "catchup_damaged_log", "intact", &[0u8, 1, 0, 0]);
    put(&dir, "catchup_damaged_log", "frame-header", &[0u8, 4, 0, 0, (FIRST_FRAME + 9) as u8, (FIRST_FRAME + 9 >> 8) as u8, 0x40]);
    put(&dir, "catchup_damaged_log", "cut", &[2u8, 0, 0x40, 0x1f]);
    let _ = std::fs::remove_file(&log);
    println!("seeds written under {}", dir.display());
}
