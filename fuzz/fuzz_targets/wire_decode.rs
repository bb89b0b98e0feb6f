//! wire::decode on arbitrary bytes, every kind: it must refuse or decode, never
//! panic, and what it decodes must be well formed and re-encode to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::wire::{self, Body, FramesBuilder, PagesBuilder};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else { return };
    let mut msg = msg.to_vec();
    // Most inputs get a correct CRC, so that the decoding behind it is reached.
    if mode & 1 == 0 {
        walcast_fuzz::fix_message_crc(&mut msg);
    }
    let Ok((h, body)) = wire::decode(&msg) else { return };
    let re = match &body {
        Body::Frames { primary_last, page_size, frames } => {
            let mut fb = FramesBuilder::new(h.db_id, h.generation, h.flags, *primary_last, *page_size, 0);
            for (fh, page) in frames {
                assert_eq!(page.len(), *page_size as usize);
                fb.push(fh, page);
            }
            fb.finish()
        }
        Body::Pages { snapshot_id, next_page, page_size, pages } => {
            let mut pb = PagesBuilder::new(h.db_id, h.generation, *snapshot_id, *page_size);
            let mut prev = 0;
            for (n, page) in pages {
                assert!(*n > prev && *n < *next_page);
                assert_eq!(page.len(), *page_size as usize);
                prev = *n;
                pb.push(*n, page);
            }
            pb.finish(*next_page)
        }
        Body::Heartbeat { last_frame_no, last_checksum, unix_ms } => {
            wire::heartbeat(h.db_id, h.generation, *last_frame_no, *last_checksum, *unix_ms)
        }
        Body::ReqFrames { after_frame_no, after_checksum } => wire::req_frames(h.db_id, h.generation, *after_frame_no, *after_checksum),
        Body::ReqSnapshot => wire::req_snapshot(h.db_id, h.generation),
        Body::ReqPages { snapshot_id, from_page, until_page } => wire::req_pages(h.db_id, h.generation, *snapshot_id, *from_page, *until_page),
        Body::Snapshot { snapshot_id, frame_no, checksum, page_size, db_pages } => {
            wire::snapshot(h.db_id, h.generation, *snapshot_id, *frame_no, *checksum, *page_size, *db_pages)
        }
        // Reasons are decoded lossily (invalid UTF-8 becomes U+FFFD): no round trip.
        Body::NeedSnapshot { reason } | Body::Error { reason } => {
            assert!(reason.len() <= 3 * 4096);
            return;
        }
    };
    // Flags and the reserved bytes are carried, not interpreted, by the other kinds.
    let mut expect = msg.clone();
    if h.kind != wire::KIND_FRAMES {
        expect[5] = 0;
    }
    expect[6] = 0;
    expect[7] = 0;
    walcast_fuzz::fix_message_crc(&mut expect);
    assert_eq!(re, expect, "decode then encode changed a {:?} message", h.kind);
});
