//! The catch-up server (src/publish.rs, CatchupServer::handle) fed arbitrary
//! request messages against a small real log: every request gets a reply that
//! is a well-formed message of at most wire::MAX_MESSAGE bytes; nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use walcast::publish::{CatchupServer, PublishStats};
use walcast::wire::{self, Body};
use walcast_fuzz::{SampleLog, SAMPLE_DB_ID};

static LOG: OnceLock<(PathBuf, SampleLog)> = OnceLock::new();

/// Message flags (see walcast_fuzz::split_messages): which repairs to make.
const KEEP_CRC: u8 = 1;
const SET_DB_ID: u8 = 2;
const SET_SNAPSHOT_ID: u8 = 4;
const SET_CHECKSUM: u8 = 8;

fuzz_target!(|data: &[u8]| {
    let (path, sample) = LOG.get_or_init(|| {
        let p = walcast_fuzz::scratch_path("catchup.log");
        let s = walcast_fuzz::write_sample_log(&p);
        (p, s)
    });
    // A new server per input, so that a crash reproduces from its input alone.
    let mut server = CatchupServer::open(path).unwrap();
    let stats = PublishStats::default();
    let mut snapshot_id = 0u64;
    for (flags, m) in walcast_fuzz::split_messages(data).into_iter().take(32) {
        let mut m = m.to_vec();
        if m.len() >= wire::HEADER_LEN + wire::TRAILER_LEN {
            let body = wire::HEADER_LEN;
            if flags & SET_DB_ID != 0 {
                m[8..24].copy_from_slice(&SAMPLE_DB_ID);
            }
            if flags & SET_SNAPSHOT_ID != 0 && m[4] == wire::KIND_REQ_PAGES && m.len() >= body + 8 + wire::TRAILER_LEN {
                m[body..body + 8].copy_from_slice(&snapshot_id.to_le_bytes());
            }
            if flags & SET_CHECKSUM != 0 && m[4] == wire::KIND_REQ_FRAMES && m.len() >= body + 16 + wire::TRAILER_LEN {
                let n = u64::from_le_bytes(m[body..body + 8].try_into().unwrap());
                if let Some(c) = sample.checksums.get(&n) {
                    m[body + 8..body + 16].copy_from_slice(&c.to_le_bytes());
                }
            }
            if flags & KEEP_CRC == 0 {
                walcast_fuzz::fix_message_crc(&mut m);
            }
        }
        let asked = match wire::decode(&m) {
            Ok((_, Body::ReqFrames { after_frame_no, after_checksum })) => Some((after_frame_no, after_checksum)),
            _ => None,
        };
        let reply = server.handle(&m, &stats);
        assert!(reply.len() <= wire::MAX_MESSAGE, "reply of {} bytes", reply.len());
        let (h, body) = wire::decode(&reply).unwrap_or_else(|e| panic!("the server sent a malformed reply: {e}"));
        assert_eq!(h.db_id, SAMPLE_DB_ID);
        match body {
            Body::Snapshot { snapshot_id: id, .. } => snapshot_id = id,
            Body::Frames { frames, .. } => {
                // Frames answer a frames request, and continue the replica's chain.
                let (n, c) = asked.expect("frames in reply to something else");
                if let Some((first, page)) = frames.first() {
                    assert_eq!(first.frame_no, n + 1);
                    assert!(first.chains_from(c, page));
                }
                for w in frames.windows(2) {
                    assert_eq!(w[1].0.frame_no, w[0].0.frame_no + 1);
                    assert!(w[1].0.chains_from(w[0].0.checksum, w[1].1));
                }
            }
            Body::Pages { .. } | Body::NeedSnapshot { .. } | Body::Error { .. } => {}
            other => panic!("the server replied with {other:?}"),
        }
    }
});
