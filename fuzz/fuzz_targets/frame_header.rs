//! The frame header and its checksum chain on arbitrary bytes: decoding and
//! encoding round-trip, and a header chains from `prev` exactly when its
//! checksum is the chain's.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::frame::{frame_checksum, make_frame, FrameHeader, FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + FRAME_HEADER_LEN {
        return;
    }
    let prev = u64::from_le_bytes(data[..8].try_into().unwrap());
    let head: &[u8; FRAME_HEADER_LEN] = data[8..8 + FRAME_HEADER_LEN].try_into().unwrap();
    let page = &data[8 + FRAME_HEADER_LEN..];
    let fh = FrameHeader::decode(head);
    assert_eq!(&fh.encode(), head);
    let right = frame_checksum(prev, fh.frame_no, fh.page_no, fh.size_after, page);
    assert_eq!(fh.chains_from(prev, page), fh.checksum == right);
    let made = make_frame(prev, fh.frame_no, fh.page_no, fh.size_after, page);
    assert!(made.chains_from(prev, page));
    // The chain covers the previous checksum and every header field.
    assert!(!made.chains_from(prev ^ 1, page));
    assert!(!FrameHeader { page_no: fh.page_no ^ 1, ..made }.chains_from(prev, page));
    assert!(!FrameHeader { frame_no: fh.frame_no ^ 1, ..made }.chains_from(prev, page));
    assert!(!FrameHeader { size_after: fh.size_after ^ 1, ..made }.chains_from(prev, page));
});
