//! Helpers shared by the fuzz targets and the seed generator: splitting one
//! fuzz input into several messages, repairing checksums so that mutated inputs
//! get past the CRC checks to the code behind them, and a small real log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use walcast::frame::{frame_checksum, FRAME_HEADER_LEN};
use walcast::log::{DbStat, LogWriter, WalEvent};
use walcast::wal::WalPos;
use walcast::wire;

pub fn crc(b: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(b);
    d.sum64()
}

/// One fuzz input holds several messages, each `flags (1) | length (u16 LE) | bytes`;
/// the flags say which repairs the target makes before use.
pub fn split_messages(data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 3 <= data.len() {
        let flags = data[at];
        let n = u16::from_le_bytes([data[at + 1], data[at + 2]]) as usize;
        let end = (at + 3 + n).min(data.len());
        out.push((flags, &data[at + 3..end]));
        at = end;
    }
    out
}

pub fn join_messages(msgs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (flags, m) in msgs {
        let n = m.len().min(u16::MAX as usize);
        out.push(*flags);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&m[..n]);
    }
    out
}

/// Recomputes a message's trailing CRC.
pub fn fix_message_crc(msg: &mut [u8]) {
    if msg.len() >= wire::HEADER_LEN + wire::TRAILER_LEN {
        let end = msg.len() - wire::TRAILER_LEN;
        let c = crc(&msg[..end]);
        msg[end..].copy_from_slice(&c.to_le_bytes());
    }
}

/// Rewrites the frame checksums of a FRAMES message so that they chain from
/// `prev` (as a primary that lies but knows the chain would), then its CRC.
pub fn fix_frames_message(msg: &mut [u8], mut prev: u64) {
    let body = wire::HEADER_LEN;
    if msg.len() < body + 16 + wire::TRAILER_LEN || msg[4] != wire::KIND_FRAMES {
        fix_message_crc(msg);
        return;
    }
    let ps = u32::from_le_bytes(msg[body + 8..body + 12].try_into().unwrap()) as usize;
    let end = msg.len() - wire::TRAILER_LEN;
    let mut at = body + 16;
    while ps > 0 && ps <= 65536 && at + FRAME_HEADER_LEN + ps <= end {
        let h = &msg[at..at + FRAME_HEADER_LEN];
        let c = frame_checksum(
            prev,
            u64::from_le_bytes(h[0..8].try_into().unwrap()),
            u32::from_le_bytes(h[8..12].try_into().unwrap()),
            u32::from_le_bytes(h[12..16].try_into().unwrap()),
            &msg[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + ps],
        );
        msg[at + 16..at + 24].copy_from_slice(&c.to_le_bytes());
        prev = c;
        at += FRAME_HEADER_LEN + ps;
    }
    fix_message_crc(msg);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Makes a mutated log file verify as far as its structure allows: the header
/// slots' CRCs, every record's CRC, the frames' checksum chain and the commit
/// records' chain checksum are recomputed; frame numbers, sizes, tags and
/// lengths stay as the fuzzer left them.
pub fn fix_log(b: &mut [u8]) {
    if b.len() < 512 {
        return;
    }
    for slot in [0usize, 256] {
        let c = crc(&b[slot..slot + 248]);
        b[slot + 248..slot + 256].copy_from_slice(&c.to_le_bytes());
    }
    let mut prev = u64_at(b, 40);
    let mut page_size = 0usize;
    let mut at = 512;
    while at < b.len() {
        match b[at] {
            b'G' => {
                if at + 31 > b.len() {
                    return;
                }
                let reason = u16::from_le_bytes([b[at + 29], b[at + 30]]) as usize;
                let len = 31 + reason + 8;
                if reason > 1024 || at + len > b.len() {
                    return;
                }
                let c = crc(&b[at..at + 31 + reason]);
                b[at + 31 + reason..at + len].copy_from_slice(&c.to_le_bytes());
                page_size = u32::from_le_bytes(b[at + 17..at + 21].try_into().unwrap()) as usize;
                at += len;
            }
            b'F' => {
                if !(512..=65536).contains(&page_size) {
                    return;
                }
                let len = 1 + FRAME_HEADER_LEN + page_size;
                if at + len > b.len() {
                    return;
                }
                let h = &b[at + 1..at + 1 + FRAME_HEADER_LEN];
                let c = frame_checksum(
                    prev,
                    u64_at(h, 0),
                    u32::from_le_bytes(h[8..12].try_into().unwrap()),
                    u32::from_le_bytes(h[12..16].try_into().unwrap()),
                    &b[at + 1 + FRAME_HEADER_LEN..at + len],
                );
                b[at + 17..at + 25].copy_from_slice(&c.to_le_bytes());
                prev = c;
                at += len;
            }
            b'C' => {
                if at + 61 > b.len() {
                    return;
                }
                b[at + 9..at + 17].copy_from_slice(&prev.to_le_bytes());
                let c = crc(&b[at..at + 53]);
                b[at + 53..at + 61].copy_from_slice(&c.to_le_bytes());
                at += 61;
            }
            b'W' => {
                if at + 82 > b.len() {
                    return;
                }
                let c = crc(&b[at..at + 74]);
                b[at + 74..at + 82].copy_from_slice(&c.to_le_bytes());
                at += 82;
            }
            _ => return,
        }
    }
}

/// A scratch file for this process, on tmpfs when there is one.
pub fn scratch_path(name: &str) -> PathBuf {
    let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("walcast-fuzz-{}-{name}", std::process::id()))
}

pub const SAMPLE_DB_ID: [u8; 16] = *b"walcast-fuzz-db!";

/// What `write_sample_log` wrote: the checksum after each frame_no (0 = the seed).
pub struct SampleLog {
    pub checksums: BTreeMap<u64, u64>,
}

fn page(size: usize, fill: u8) -> Vec<u8> {
    (0..size).map(|i| fill ^ (i as u8)).collect()
}

/// A small real log: two generations (512- and 1024-byte pages), base images,
/// small transactions, one of 40 frames, WAL events and header syncs.
pub fn write_sample_log(path: &Path) -> SampleLog {
    let _ = std::fs::remove_file(path);
    let mut w = LogWriter::create(path, SAMPLE_DB_ID).expect("create sample log");
    let mut checksums = BTreeMap::new();
    checksums.insert(0, w.id.seed);
    let mut add = |w: &mut LogWriter, page_no: u32, size_after: u32, p: &[u8]| {
        let fh = w.add_frame(page_no, size_after, p).unwrap();
        checksums.insert(fh.frame_no, fh.checksum);
    };
    let pos = |frame| WalPos { salt1: 11, salt2: 22, frame, cksum: (3, 4) };
    w.begin_generation(512, "fuzz sample").unwrap();
    for p in 1..=3 {
        add(&mut w, p, if p == 3 { 3 } else { 0 }, &page(512, p as u8));
    }
    w.commit(3, None).unwrap();
    w.wal_event(WalEvent::Started(pos(0), 1)).unwrap();
    for t in 0..5u32 {
        w.begin_batch();
        add(&mut w, 2, 0, &page(512, 40 + t as u8));
        add(&mut w, 4 + t, 4 + t, &page(512, 50 + t as u8));
        w.commit(4 + t, Some(pos(2 * t + 2))).unwrap();
    }
    w.sync().unwrap();
    w.begin_batch();
    for p in 1..=40 {
        add(&mut w, p, if p == 40 { 40 } else { 0 }, &page(512, p as u8));
    }
    w.commit(40, Some(pos(52))).unwrap();
    w.wal_event(WalEvent::Ending(pos(52), DbStat { size: 40 * 512, mtime_ns: 1, ino: 2 })).unwrap();
    w.wal_event(WalEvent::Ended(DbStat { size: 40 * 512, mtime_ns: 1, ino: 2 })).unwrap();
    w.sync().unwrap();
    w.begin_generation(1024, "page size changed").unwrap();
    for p in 1..=4 {
        add(&mut w, p, if p == 4 { 4 } else { 0 }, &page(1024, p as u8));
    }
    w.commit(4, None).unwrap();
    for t in 0..3u32 {
        w.begin_batch();
        add(&mut w, 1 + t, 5, &page(1024, 90 + t as u8));
        w.commit(5, Some(pos(t + 1))).unwrap();
    }
    w.sync().unwrap();
    SampleLog { checksums }
}
