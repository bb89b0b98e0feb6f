//! The wire format: every message walcast sends over NNG.
//!
//! A message is a fixed header, a body that depends on its kind, and a CRC-64/XZ
//! of everything before it. All integers are little-endian:
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 4    | magic `WCM1`                                       |
//! | 4      | 1    | kind                                               |
//! | 5      | 1    | flags                                              |
//! | 6      | 2    | reserved (0)                                       |
//! | 8      | 16   | db_id (zero in a request from a replica with none) |
//! | 24     | 8    | generation                                         |
//! | 32     | ...  | body                                               |
//! | end-8  | 8    | CRC-64/XZ of bytes 0..end-8                        |
//!
//! The message CRC catches damage in transit before anything is decoded; every
//! frame is then also checked against the checksum chain (`frame.rs`), which a
//! message CRC alone cannot do (a whole, intact message can still be stale,
//! duplicated or out of order).

use crate::frame::{FrameHeader, FRAME_HEADER_LEN};

pub const MAGIC: &[u8; 4] = b"WCM1";
pub const HEADER_LEN: usize = 32;
pub const TRAILER_LEN: usize = 8;

/// Frames of one generation: a live transaction (or a chunk of a big one) on the
/// PUB socket, or a catch-up reply.
pub const KIND_FRAMES: u8 = 1;
/// The primary's position, at least once a second on the PUB socket.
pub const KIND_HEARTBEAT: u8 = 2;
/// Request: frames after (frame_no, checksum).
pub const KIND_REQ_FRAMES: u8 = 3;
/// Request: start a snapshot of the current database.
pub const KIND_REQ_SNAPSHOT: u8 = 4;
/// Request: pages of a snapshot.
pub const KIND_REQ_PAGES: u8 = 5;
/// Reply: the replica must bootstrap from a snapshot, and why.
pub const KIND_NEED_SNAPSHOT: u8 = 6;
/// Reply: a snapshot was started.
pub const KIND_SNAPSHOT: u8 = 7;
/// Reply: pages of a snapshot.
pub const KIND_PAGES: u8 = 8;
/// Reply: the request could not be served (the reason is in the body).
pub const KIND_ERROR: u8 = 9;

/// FRAMES flag: the first frame starts a generation (its base image).
pub const FLAG_GENERATION_START: u8 = 1;

/// Upper bound on the page bytes one message carries; a bigger transaction is
/// sent in several messages, so memory stays bounded on both sides.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Pages per message on the live stream. Smaller than catch-up replies (which
/// are asked for, few at a time, so the round trips are what counts): a live
/// message waits in queues that hold a number of messages (NNG's, at the
/// primary and at each replica), and this bounds their bytes.
pub const LIVE_CHUNK_BYTES: usize = 128 << 10;
/// What a replica accepts at most (NNG's receive limit): a chunk of 64 KiB pages
/// plus headers, with room to spare.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub db_id: [u8; 16],
    pub generation: u64,
}

/// A decoded message. Page bytes are borrowed from the message buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Body<'a> {
    /// `primary_last`: the last frame_no the primary had committed when it sent
    /// this. Frames are consecutive.
    Frames {
        primary_last: u64,
        page_size: u32,
        frames: Vec<(FrameHeader, &'a [u8])>,
    },
    Heartbeat {
        last_frame_no: u64,
        last_checksum: u64,
        unix_ms: u64,
    },
    ReqFrames {
        after_frame_no: u64,
        after_checksum: u64,
    },
    ReqSnapshot,
    /// Pages `from_page..until_page` of a snapshot (the reply may end sooner:
    /// its `next_page` says where).
    ReqPages {
        snapshot_id: u64,
        from_page: u32,
        until_page: u32,
    },
    NeedSnapshot {
        reason: String,
    },
    Snapshot {
        snapshot_id: u64,
        frame_no: u64,
        checksum: u64,
        page_size: u32,
        db_pages: u32,
    },
    /// Pages of snapshot `snapshot_id`, in page order; pages the primary's image
    /// lacks (the lock page) are absent. `next_page` is where the next request
    /// continues; past `db_pages` the snapshot is complete.
    Pages {
        snapshot_id: u64,
        next_page: u32,
        page_size: u32,
        pages: Vec<(u32, &'a [u8])>,
    },
    Error {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn crc(b: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(b);
    d.sum64()
}

/// Builds one message; `finish` appends the CRC.
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    pub fn new(h: &Header, capacity: usize) -> Builder {
        let mut buf = Vec::with_capacity(HEADER_LEN + capacity + TRAILER_LEN);
        buf.extend_from_slice(MAGIC);
        buf.push(h.kind);
        buf.push(h.flags);
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&h.db_id);
        buf.extend_from_slice(&h.generation.to_le_bytes());
        Builder { buf }
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn text(&mut self, s: &str) -> &mut Self {
        let b = &s.as_bytes()[..s.len().min(4096)];
        self.u32(b.len() as u32).bytes(b)
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Overwrites a u32 written earlier (a count known only at the end).
    pub fn patch_u32(&mut self, at: usize, v: u32) {
        self.buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn finish(mut self) -> Vec<u8> {
        let c = crc(&self.buf);
        self.buf.extend_from_slice(&c.to_le_bytes());
        self.buf
    }
}

/// A FRAMES message being filled: the frame count is patched in at the end.
pub struct FramesBuilder {
    b: Builder,
    count_at: usize,
    count: u32,
    page_size: u32,
    limit: usize,
}

impl FramesBuilder {
    /// `expected` bytes of frames to come, at most: the buffer is allocated once,
    /// at the size the message will have (up to `CHUNK_BYTES`).
    pub fn new(db_id: [u8; 16], generation: u64, flags: u8, primary_last: u64, page_size: u32, expected: usize) -> FramesBuilder {
        let mut b = Builder::new(&Header { kind: KIND_FRAMES, flags, db_id, generation }, 16 + expected.min(CHUNK_BYTES));
        b.u64(primary_last).u32(page_size);
        let count_at = b.len();
        b.u32(0);
        FramesBuilder { b, count_at, count: 0, page_size, limit: CHUNK_BYTES }
    }
    /// A message of at most `limit` bytes of frames (below `CHUNK_BYTES`).
    pub fn with_limit(mut self, limit: usize) -> FramesBuilder {
        self.limit = limit.min(CHUNK_BYTES);
        self
    }
    pub fn push(&mut self, h: &FrameHeader, page: &[u8]) {
        debug_assert_eq!(page.len(), self.page_size as usize);
        self.b.bytes(&h.encode()).bytes(page);
        self.count += 1;
    }
    /// True when one more page would take the message past its limit.
    pub fn full(&self) -> bool {
        self.count > 0 && (self.count as usize + 1) * (FRAME_HEADER_LEN + self.page_size as usize) > self.limit
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.b.patch_u32(self.count_at, self.count);
        self.b.finish()
    }
}

pub fn heartbeat(db_id: [u8; 16], generation: u64, last_frame_no: u64, last_checksum: u64, unix_ms: u64) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_HEARTBEAT, flags: 0, db_id, generation }, 24);
    b.u64(last_frame_no).u64(last_checksum).u64(unix_ms);
    b.finish()
}

pub fn req_frames(db_id: [u8; 16], generation: u64, after_frame_no: u64, after_checksum: u64) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_REQ_FRAMES, flags: 0, db_id, generation }, 16);
    b.u64(after_frame_no).u64(after_checksum);
    b.finish()
}

pub fn req_snapshot(db_id: [u8; 16], generation: u64) -> Vec<u8> {
    Builder::new(&Header { kind: KIND_REQ_SNAPSHOT, flags: 0, db_id, generation }, 0).finish()
}

pub fn req_pages(db_id: [u8; 16], generation: u64, snapshot_id: u64, from_page: u32, until_page: u32) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_REQ_PAGES, flags: 0, db_id, generation }, 16);
    b.u64(snapshot_id).u32(from_page).u32(until_page);
    b.finish()
}

pub fn need_snapshot(db_id: [u8; 16], generation: u64, reason: &str) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_NEED_SNAPSHOT, flags: 0, db_id, generation }, reason.len() + 4);
    b.text(reason);
    b.finish()
}

pub fn error(db_id: [u8; 16], generation: u64, reason: &str) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_ERROR, flags: 0, db_id, generation }, reason.len() + 4);
    b.text(reason);
    b.finish()
}

pub fn snapshot(
    db_id: [u8; 16],
    generation: u64,
    snapshot_id: u64,
    frame_no: u64,
    checksum: u64,
    page_size: u32,
    db_pages: u32,
) -> Vec<u8> {
    let mut b = Builder::new(&Header { kind: KIND_SNAPSHOT, flags: 0, db_id, generation }, 32);
    b.u64(snapshot_id).u64(frame_no).u64(checksum).u32(page_size).u32(db_pages);
    b.finish()
}

/// The most pages a PAGES reply holds (at least one): a replica asks for
/// ranges of this many pages, so that each comes back in one reply.
pub fn pages_per_reply(page_size: u32) -> u32 {
    (CHUNK_BYTES / (4 + page_size as usize)).max(1) as u32
}

/// A PAGES reply being filled.
pub struct PagesBuilder {
    b: Builder,
    count_at: usize,
    next_at: usize,
    count: u32,
    page_size: u32,
}

impl PagesBuilder {
    pub fn new(db_id: [u8; 16], generation: u64, snapshot_id: u64, page_size: u32) -> PagesBuilder {
        let mut b = Builder::new(&Header { kind: KIND_PAGES, flags: 0, db_id, generation }, CHUNK_BYTES.min(1 << 16));
        b.u64(snapshot_id);
        let next_at = b.len();
        b.u32(0).u32(page_size);
        let count_at = b.len();
        b.u32(0);
        PagesBuilder { b, count_at, next_at, count: 0, page_size }
    }
    pub fn push(&mut self, page_no: u32, page: &[u8]) {
        self.b.u32(page_no).bytes(page);
        self.count += 1;
    }
    pub fn full(&self) -> bool {
        self.count >= pages_per_reply(self.page_size)
    }
    pub fn finish(mut self, next_page: u32) -> Vec<u8> {
        self.b.patch_u32(self.count_at, self.count);
        self.b.patch_u32(self.next_at, next_page);
        self.b.finish()
    }
}

/// Reads fields off a body, failing with a message that names what is short.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.at < n {
            return Err(DecodeError(format!("message ends inside {what}")));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn text(&mut self, what: &str) -> Result<String, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > 4096 {
            return Err(DecodeError(format!("{what} is {n} bytes long")));
        }
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn page_size(&mut self) -> Result<u32, DecodeError> {
        let p = self.u32("page size")?;
        if !crate::frame::is_page_size(p) {
            return Err(DecodeError(format!("invalid page size {p}")));
        }
        Ok(p)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.at != self.b.len() {
            return Err(DecodeError(format!("{} unexpected bytes at the end of the message", self.b.len() - self.at)));
        }
        Ok(())
    }
}

/// Decodes and checks a whole message. Never panics, whatever the bytes.
pub fn decode(msg: &[u8]) -> Result<(Header, Body<'_>), DecodeError> {
    if msg.len() < HEADER_LEN + TRAILER_LEN {
        return Err(DecodeError(format!("message of {} bytes is too short", msg.len())));
    }
    if &msg[0..4] != MAGIC {
        return Err(DecodeError("not a walcast message (bad magic: damaged in transit, or another program's)".into()));
    }
    let body_end = msg.len() - TRAILER_LEN;
    if crc(&msg[..body_end]) != u64::from_le_bytes(msg[body_end..].try_into().unwrap()) {
        return Err(DecodeError("message checksum mismatch (damaged in transit)".into()));
    }
    let h = Header {
        kind: msg[4],
        flags: msg[5],
        db_id: msg[8..24].try_into().unwrap(),
        generation: u64::from_le_bytes(msg[24..32].try_into().unwrap()),
    };
    if h.generation > crate::log::MAX_GENERATION {
        return Err(DecodeError(format!("generation {} is out of range", h.generation)));
    }
    let mut r = Reader { b: &msg[HEADER_LEN..body_end], at: 0 };
    let body = match h.kind {
        KIND_FRAMES => {
            let primary_last = r.u64("primary_last")?;
            let page_size = r.page_size()?;
            let count = r.u32("frame count")? as usize;
            let each = FRAME_HEADER_LEN + page_size as usize;
            if count.checked_mul(each) != Some(r.b.len() - r.at) {
                return Err(DecodeError(format!("frame count {count} does not match the message length")));
            }
            let mut frames = Vec::with_capacity(count);
            for _ in 0..count {
                let fh = FrameHeader::decode(r.take(FRAME_HEADER_LEN, "a frame header")?.try_into().unwrap());
                let page = r.take(page_size as usize, "a page")?;
                frames.push((fh, page));
            }
            Body::Frames { primary_last, page_size, frames }
        }
        KIND_HEARTBEAT => Body::Heartbeat { last_frame_no: r.u64("frame_no")?, last_checksum: r.u64("checksum")?, unix_ms: r.u64("time")? },
        KIND_REQ_FRAMES => Body::ReqFrames { after_frame_no: r.u64("frame_no")?, after_checksum: r.u64("checksum")? },
        KIND_REQ_SNAPSHOT => Body::ReqSnapshot,
        KIND_REQ_PAGES => {
            let snapshot_id = r.u64("snapshot id")?;
            let from_page = r.u32("page number")?;
            let until_page = r.u32("end page number")?;
            if until_page <= from_page {
                return Err(DecodeError(format!("an empty page range ({from_page}..{until_page})")));
            }
            Body::ReqPages { snapshot_id, from_page, until_page }
        }
        KIND_NEED_SNAPSHOT => Body::NeedSnapshot { reason: r.text("reason")? },
        KIND_ERROR => Body::Error { reason: r.text("reason")? },
        KIND_SNAPSHOT => Body::Snapshot {
            snapshot_id: r.u64("snapshot id")?,
            frame_no: r.u64("frame_no")?,
            checksum: r.u64("checksum")?,
            page_size: r.page_size()?,
            db_pages: r.u32("page count")?,
        },
        KIND_PAGES => {
            let snapshot_id = r.u64("snapshot id")?;
            let next_page = r.u32("next page")?;
            let page_size = r.page_size()?;
            let count = r.u32("page count")? as usize;
            if count.checked_mul(4 + page_size as usize) != Some(r.b.len() - r.at) {
                return Err(DecodeError(format!("page count {count} does not match the message length")));
            }
            let mut pages = Vec::with_capacity(count);
            let mut prev = 0u32;
            for _ in 0..count {
                let n = r.u32("page number")?;
                if n <= prev {
                    return Err(DecodeError(format!("snapshot pages out of order ({n} after {prev})")));
                }
                if n >= next_page {
                    return Err(DecodeError(format!("snapshot page {n} is past the message's end {next_page}")));
                }
                prev = n;
                pages.push((n, r.take(page_size as usize, "a page")?));
            }
            Body::Pages { snapshot_id, next_page, page_size, pages }
        }
        k => return Err(DecodeError(format!("unknown message kind {k}"))),
    };
    r.end()?;
    Ok((h, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::make_frame;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let page = vec![7u8; 512];
        let f1 = make_frame(1, 10, 3, 0, &page);
        let f2 = make_frame(f1.checksum, 11, 4, 9, &page);
        let mut fb = FramesBuilder::new([1; 16], 2, FLAG_GENERATION_START, 11, 512, 0);
        fb.push(&f1, &page);
        fb.push(&f2, &page);
        let msg = fb.finish();
        let (h, b) = decode(&msg).unwrap();
        assert_eq!(h, Header { kind: KIND_FRAMES, flags: FLAG_GENERATION_START, db_id: [1; 16], generation: 2 });
        match b {
            Body::Frames { primary_last: 11, page_size: 512, frames } => {
                assert_eq!(frames.len(), 2);
                assert_eq!(frames[1].0, f2);
            }
            other => panic!("{other:?}"),
        }
        // Every single-bit flip and every truncation is refused, never a panic.
        for i in 0..msg.len() {
            let mut m = msg.clone();
            m[i] ^= 0x10;
            assert!(decode(&m).is_err(), "flip at {i} accepted");
        }
        for n in 0..msg.len() {
            assert!(decode(&msg[..n]).is_err());
        }
    }

    #[test]
    fn other_kinds_round_trip() {
        let m = heartbeat([2; 16], 1, 5, 6, 7);
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::Heartbeat { last_frame_no: 5, last_checksum: 6, unix_ms: 7 });
        let m = req_frames([0; 16], 0, 9, 8);
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::ReqFrames { after_frame_no: 9, after_checksum: 8 });
        let m = need_snapshot([0; 16], 0, "new replica");
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::NeedSnapshot { reason: "new replica".into() });
        let m = snapshot([0; 16], 3, 4, 5, 6, 1024, 8);
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::Snapshot { snapshot_id: 4, frame_no: 5, checksum: 6, page_size: 1024, db_pages: 8 });
        let page = vec![1u8; 1024];
        let mut pb = PagesBuilder::new([0; 16], 3, 4, 1024);
        pb.push(1, &page);
        pb.push(3, &page);
        let m = pb.finish(9);
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::Pages { snapshot_id: 4, next_page: 9, page_size: 1024, pages: vec![(1, &page[..]), (3, &page[..])] });
        let m = req_pages([0; 16], 3, 4, 10, 20);
        let (_, b) = decode(&m).unwrap();
        assert_eq!(b, Body::ReqPages { snapshot_id: 4, from_page: 10, until_page: 20 });
        assert!(decode(&req_pages([0; 16], 3, 4, 10, 10)).unwrap_err().0.contains("empty page range (10..10)"));
        // A reply fills up at exactly the pages a replica asks for at a time.
        let mut pb = PagesBuilder::new([0; 16], 3, 4, 4096);
        for n in 1..=pages_per_reply(4096) {
            assert!(!pb.full());
            pb.push(n, &[0; 4096]);
        }
        assert!(pb.full() && pb.finish(256).len() <= CHUNK_BYTES + HEADER_LEN + 16 + TRAILER_LEN);
        assert_eq!(pages_per_reply(65536), 15);
    }

    #[test]
    fn hostile_counts_are_refused() {
        // A frame count that would make the decoder allocate or read past the end.
        let mut b = Builder::new(&Header { kind: KIND_FRAMES, flags: 0, db_id: [0; 16], generation: 0 }, 16);
        b.u64(1).u32(4096).u32(u32::MAX);
        assert!(decode(&b.finish()).is_err());
        let mut b = Builder::new(&Header { kind: KIND_FRAMES, flags: 0, db_id: [0; 16], generation: 0 }, 16);
        b.u64(1).u32(3000).u32(0);
        assert!(decode(&b.finish()).unwrap_err().0.contains("page size"));
        // A generation no arithmetic may overflow on (promotion adds a term to it).
        let hb = |g| heartbeat([1; 16], g, 5, 6, 7);
        assert!(decode(&hb(crate::log::MAX_GENERATION)).is_ok());
        assert!(decode(&hb(crate::log::MAX_GENERATION + 1)).unwrap_err().0.contains("generation"));
        assert!(decode(&hb(u64::MAX)).is_err());
    }
}
