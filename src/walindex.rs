//! The wal-index (-shm), maintained exactly as SQLite's own WAL writer does
//! (wal.c: `walIndexAppend`, `walCleanupHash`, `walIndexWriteHdr`, `walRestartHdr`),
//! so that frames a replica applier appends to the WAL become visible to stock
//! SQLite readers without them running recovery.
//!
//! The -shm regions are memory shared with other processes that read them (and
//! write the checkpoint info) concurrently, so they are touched only through
//! atomics, never through `&mut [u8]`: `Relaxed` where SQLite uses plain memory
//! accesses, a `SeqCst` fence where it calls `walShmBarrier`, and Release/Acquire
//! where it uses `AtomicStore`/`AtomicLoad`. Every function here assumes the caller
//! holds the shm locks SQLite's writer would hold (WRITE, plus all READ locks for
//! a restart); the layout is a cross-version contract, so this works beneath any
//! SQLite version.

use std::io;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use crate::wal::wal_checksum;

/// Size of one xShmMap region.
pub const REGION_SIZE: usize = 32768;
/// Frames indexed per region (page-number array length, in u32 words).
pub const HASHTABLE_NPAGE: u32 = 4096;
/// Hash slots per region (u16 each): twice the frames, so probe chains stay short.
pub const HASHTABLE_NSLOT: u32 = 8192;
/// Multiplier of `walHash`.
pub const HASHTABLE_HASH_1: u32 = 383;
/// Two WalIndexHdr copies (48 bytes each) plus WalCkptInfo (40 bytes).
pub const WALINDEX_HDR_SIZE: usize = 136;
/// Region 0's page array is shorter because the header takes its first 34 words.
pub const HASHTABLE_NPAGE_ONE: u32 = HASHTABLE_NPAGE - (WALINDEX_HDR_SIZE / 4) as u32;
/// WalIndexHdr.iVersion (WALINDEX_MAX_VERSION); SQLite refuses any other.
pub const WALINDEX_VERSION: u32 = 3_007_000;
/// An aReadMark value meaning "slot unused".
pub const READMARK_NOT_USED: u32 = 0xffff_ffff;
/// Number of aReadMark slots (WAL_NREADER).
pub const WAL_NREADER: u32 = 5;

/// u32 words of one WalIndexHdr copy.
const HDR_WORDS: usize = 12;
/// WalCkptInfo (byte 96): nBackfill, aReadMark[5], aLock[8] (bytes 120..128),
/// nBackfillAttempted, notUsed0.
const N_BACKFILL: usize = 24;
const READ_MARK: usize = 25;
const N_BACKFILL_ATTEMPTED: usize = 32;

/// One 32 KiB region of the -shm mapping, seen through atomics because other
/// processes access it concurrently.
pub struct Region<'a> {
    /// Bytes 0..16384 as 4096 native-endian u32 words (region 0 starts with the
    /// two header copies and the checkpoint info, 136 bytes = 34 words).
    pub words: &'a [AtomicU32],
    /// Bytes 16384..32768: the 8192 hash slots.
    pub hash: &'a [AtomicU16],
}

/// Access to the -shm regions (the unsafe layer builds them from xShmMap).
pub trait Shm {
    /// Region `i`, mapped (and the -shm file extended) if needed.
    fn region(&mut self, i: u32) -> io::Result<Region<'_>>;
}

/// The WalIndexHdr (48 bytes, native byte order), decoded. iVersion, the unused
/// word and aCksum are not kept: `write_header` writes them as SQLite does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    /// iChange: SQLite bumps it on every commit so readers notice a new snapshot.
    pub change: u32,
    pub is_init: bool,
    /// True when the WAL's checksums are on big-endian words (WAL magic & 1).
    pub big_end_cksum: bool,
    /// Page size in bytes, decoded (the stored u16 1 means 65536).
    pub page_size: u32,
    /// Last committed frame readers may use.
    pub mx_frame: u32,
    /// Database size in pages after the last commit.
    pub n_page: u32,
    /// Checksum of frame `mx_frame` (the WAL header's checksum when mx_frame is 0
    /// after a new header was written), where the next frame's chain starts.
    pub frame_cksum: (u32, u32),
    /// Salt-1 and salt-2 as the WAL header states them (big-endian u32s read from
    /// the file), so callers compare them with the WAL header directly. The
    /// wal-index stores the raw header bytes; the conversion happens on read/write.
    pub salt: (u32, u32),
}

/// aSalt words hold the WAL header's 4 bytes memcpy'd, i.e. big-endian bytes.
fn salt_to_word(s: u32) -> u32 {
    u32::from_ne_bytes(s.to_be_bytes())
}
fn salt_from_word(w: u32) -> u32 {
    u32::from_be_bytes(w.to_ne_bytes())
}

/// aCksum: walChecksumBytes over the first 40 bytes in native order, seed 0.
fn header_cksum(w: &[u32; HDR_WORDS]) -> (u32, u32) {
    let mut b = [0u8; 40];
    for (chunk, x) in b.chunks_exact_mut(4).zip(w) {
        chunk.copy_from_slice(&x.to_ne_bytes());
    }
    wal_checksum(cfg!(target_endian = "big"), &b, (0, 0))
}

impl IndexHeader {
    /// The in-memory image of a header as `walIndexWriteHdr` writes it.
    fn to_words(self) -> [u32; HDR_WORDS] {
        // szPage: the page size's bits 8..15 with 65536 folded into bit 0.
        let sz = (((self.page_size & 0xff00) | (self.page_size >> 16)) as u16).to_ne_bytes();
        let mut w = [
            WALINDEX_VERSION,
            0,
            self.change,
            u32::from_ne_bytes([self.is_init as u8, self.big_end_cksum as u8, sz[0], sz[1]]),
            self.mx_frame,
            self.n_page,
            self.frame_cksum.0,
            self.frame_cksum.1,
            salt_to_word(self.salt.0),
            salt_to_word(self.salt.1),
            0,
            0,
        ];
        (w[10], w[11]) = header_cksum(&w);
        w
    }
}

/// Reads the header as `walIndexTryHdr` does: copy 1, barrier, copy 2; accepted
/// only if both copies are equal, isInit is set and the checksum is right. None
/// means a writer is mid-update or the index needs recovery. Also None for an
/// iVersion other than 3007000, which SQLite refuses to use (SQLITE_CANTOPEN).
pub fn read_header(r0: &Region) -> Option<IndexHeader> {
    let h1: [u32; HDR_WORDS] = std::array::from_fn(|i| r0.words[i].load(Relaxed));
    fence(Ordering::SeqCst);
    let h2: [u32; HDR_WORDS] = std::array::from_fn(|i| r0.words[HDR_WORDS + i].load(Relaxed));
    let b3 = h1[3].to_ne_bytes();
    if h1 != h2 || b3[0] == 0 || header_cksum(&h1) != (h1[10], h1[11]) || h1[0] != WALINDEX_VERSION {
        return None;
    }
    let sz = u16::from_ne_bytes([b3[2], b3[3]]) as u32;
    Some(IndexHeader {
        change: h1[2],
        is_init: true,
        big_end_cksum: b3[1] != 0,
        page_size: (sz & 0xfe00) + ((sz & 1) << 16),
        mx_frame: h1[4],
        n_page: h1[5],
        frame_cksum: (h1[6], h1[7]),
        salt: (salt_from_word(h1[8]), salt_from_word(h1[9])),
    })
}

/// Publishes a header as `walIndexWriteHdr` does (iVersion 3007000, isInit 1,
/// fresh aCksum): copy 2 first, barrier, then copy 1, so a reader that sees
/// both copies equal (it reads copy 1 first) never sees a torn header.
pub fn write_header(r0: &Region, h: &IndexHeader) {
    let w = IndexHeader { is_init: true, ..*h }.to_words();
    for (i, x) in w.iter().enumerate() {
        r0.words[HDR_WORDS + i].store(*x, Relaxed);
    }
    fence(Ordering::SeqCst);
    for (i, x) in w.iter().enumerate() {
        r0.words[i].store(*x, Relaxed);
    }
}

/// nBackfill: frames already copied into the database (SQLite's AtomicLoad).
pub fn n_backfill(r0: &Region) -> u32 {
    r0.words[N_BACKFILL].load(Acquire)
}
/// Sets nBackfill (SQLite's AtomicStore).
pub fn set_n_backfill(r0: &Region, v: u32) {
    r0.words[N_BACKFILL].store(v, Release);
}
/// aReadMark[i], i < 5: the mxFrame a reader holding READ lock i uses.
pub fn read_mark(r0: &Region, i: u32) -> u32 {
    r0.words[READ_MARK + i as usize].load(Acquire)
}
/// Sets aReadMark[i] (SQLite's AtomicStore).
pub fn set_read_mark(r0: &Region, i: u32, v: u32) {
    r0.words[READ_MARK + i as usize].store(v, Release);
}
/// Sets nBackfillAttempted (SQLite's AtomicStore in the checkpointer).
pub fn set_n_backfill_attempted(r0: &Region, v: u32) {
    r0.words[N_BACKFILL_ATTEMPTED].store(v, Release);
}

/// What `walRestartHdr` does once the writer holds WRITE and all READ locks 1..4
/// and every frame was backfilled: salts (salt-1 + 1, `salt2`), mx_frame 0, header
/// published, then nBackfill = 0, nBackfillAttempted = 0, aReadMark[1] = 0 and
/// marks 2..4 unused. The caller then writes the new WAL header itself, with the
/// checkpoint sequence + 1 and these salts, before the first frame (as
/// `walFrames` does when mxFrame is 0), and sets `h.frame_cksum` to that header's
/// checksum for the next frame's chain.
pub fn restart_header(r0: &Region, h: &mut IndexHeader, salt2: u32) {
    h.mx_frame = 0;
    h.salt = (h.salt.0.wrapping_add(1), salt2);
    h.is_init = true;
    write_header(r0, h);
    set_n_backfill(r0, 0);
    r0.words[N_BACKFILL_ATTEMPTED].store(0, Relaxed);
    r0.words[READ_MARK + 1].store(0, Relaxed);
    for i in 2..WAL_NREADER as usize {
        r0.words[READ_MARK + i].store(READMARK_NOT_USED, Relaxed);
    }
}

/// `walFramePage`: the region whose page array and hash table index `frame`.
pub fn frame_region(frame: u32) -> u32 {
    (frame + HASHTABLE_NPAGE - HASHTABLE_NPAGE_ONE - 1) / HASHTABLE_NPAGE
}

/// `walHashGet`: where region `i`'s page array starts in `words`, and iZero, the
/// frame before its first one (hash slot value N means frame iZero + N).
fn hash_loc(i: u32) -> (usize, u32) {
    if i == 0 {
        (WALINDEX_HDR_SIZE / 4, 0)
    } else {
        (0, HASHTABLE_NPAGE_ONE + (i - 1) * HASHTABLE_NPAGE)
    }
}

/// `walHash`: home slot of a page number (u32 arithmetic wraps, as in C).
fn wal_hash(page_no: u32) -> usize {
    (page_no.wrapping_mul(HASHTABLE_HASH_1) & (HASHTABLE_NSLOT - 1)) as usize
}
fn next_hash(key: usize) -> usize {
    (key + 1) & (HASHTABLE_NSLOT as usize - 1)
}

fn corrupt(what: &str, region: u32) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("wal-index corrupt (SQLITE_CORRUPT): {what} in region {region}"))
}

/// `walIndexAppend`: records that WAL frame `frame` holds page `page_no`.
/// `committed_mx_frame` is the writer's mxFrame before this batch (the last
/// committed frame, or the last frame of earlier batches of the same transaction):
/// if the slot is already taken, a writer crashed mid-transaction and its leftovers
/// beyond that frame are removed first (`walCleanupHash`). A region's first frame
/// clears the whole region, so stale data there never matters.
pub fn append(shm: &mut impl Shm, committed_mx_frame: u32, frame: u32, page_no: u32) -> io::Result<()> {
    if frame <= committed_mx_frame || page_no == 0 {
        let msg = format!("wal-index append of frame {frame} (page {page_no}) after mxFrame {committed_mx_frame}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    let i = frame_region(frame);
    let (base, zero) = hash_loc(i);
    let idx = frame - zero;
    let stale = {
        let r = shm.region(i)?;
        if idx == 1 {
            r.words[base..].iter().for_each(|w| w.store(0, Relaxed));
            r.hash.iter().for_each(|s| s.store(0, Relaxed));
        }
        r.words[base + idx as usize - 1].load(Relaxed) != 0
    };
    if stale {
        cleanup_hash(shm, committed_mx_frame)?;
    }
    let r = shm.region(i)?;
    // Linear probing; more collisions than entries means the table is corrupt.
    let mut key = wal_hash(page_no);
    let mut n_collide = idx;
    while r.hash[key].load(Relaxed) != 0 {
        if n_collide == 0 {
            return Err(corrupt("hash table full", i));
        }
        n_collide -= 1;
        key = next_hash(key);
    }
    // Page number first, then the slot with a release store: a concurrent reader
    // that finds the slot also finds the page number.
    r.words[base + ((idx - 1) & (HASHTABLE_NPAGE - 1)) as usize].store(page_no, Relaxed);
    r.hash[key].store(idx as u16, Release);
    Ok(())
}

/// `walCleanupHash`: removes the entries for frames after `mx_frame` from the
/// region holding `mx_frame` (later regions get cleared when first reused). Since
/// those are the newest insertions of a linear-probing table without deletions,
/// the table returns to exactly its state before they were added.
pub fn cleanup_hash(shm: &mut impl Shm, mx_frame: u32) -> io::Result<()> {
    if mx_frame == 0 {
        return Ok(());
    }
    let i = frame_region(mx_frame);
    let (base, zero) = hash_loc(i);
    let limit = mx_frame - zero;
    let r = shm.region(i)?;
    for s in r.hash {
        if s.load(Relaxed) as u32 > limit {
            s.store(0, Relaxed);
        }
    }
    r.words[base + limit as usize..].iter().for_each(|w| w.store(0, Relaxed));
    Ok(())
}

/// `walFindFrame`'s lookup: the newest frame in `min_frame..=mx_frame` holding
/// `page_no`, searching regions newest first. Entries past `mx_frame` (added after
/// a reader's snapshot) are ignored, as SQLite does.
pub fn find_frame(shm: &mut impl Shm, min_frame: u32, mx_frame: u32, page_no: u32) -> io::Result<Option<u32>> {
    if mx_frame == 0 {
        return Ok(None);
    }
    let mut found = 0;
    for i in (frame_region(min_frame)..=frame_region(mx_frame)).rev() {
        let (base, zero) = hash_loc(i);
        let r = shm.region(i)?;
        let mut key = wal_hash(page_no);
        let mut n_collide = HASHTABLE_NSLOT;
        loop {
            let h = r.hash[key].load(Acquire) as u32;
            if h == 0 {
                break;
            }
            let f = h + zero;
            // `get`: in region 0 a corrupt slot value could point past the page
            // array (C would read the hash area); such a slot never matches.
            let p = r.words.get(base + ((h - 1) & (HASHTABLE_NPAGE - 1)) as usize).map(|w| w.load(Relaxed));
            if f <= mx_frame && f >= min_frame && p == Some(page_no) {
                found = f;
            }
            if n_collide == 0 {
                return Err(corrupt("endless hash chain", i));
            }
            n_collide -= 1;
            key = next_hash(key);
        }
        if found != 0 {
            break;
        }
    }
    Ok((found != 0).then_some(found))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;
    use std::process::Command;

    /// An in-memory -shm: regions of zeroed atomics, created on demand.
    #[derive(Default)]
    pub(crate) struct MemShm(Vec<MemRegion>);
    type MemRegion = (Box<[AtomicU32]>, Box<[AtomicU16]>);

    impl Shm for MemShm {
        fn region(&mut self, i: u32) -> io::Result<Region<'_>> {
            while self.0.len() <= i as usize {
                let words = (0..HASHTABLE_NPAGE).map(|_| AtomicU32::new(0)).collect();
                let hash = (0..HASHTABLE_NSLOT).map(|_| AtomicU16::new(0)).collect();
                self.0.push((words, hash));
            }
            let (words, hash) = &self.0[i as usize];
            Ok(Region { words, hash })
        }
    }

    impl MemShm {
        /// Loads a -shm file image (native byte order, as the VFS maps it).
        fn from_bytes(b: &[u8]) -> MemShm {
            let mut s = MemShm::default();
            for (i, reg) in b.chunks_exact(REGION_SIZE).enumerate() {
                let r = s.region(i as u32).unwrap();
                let (w, h) = reg.split_at(REGION_SIZE / 2);
                for (a, c) in r.words.iter().zip(w.chunks_exact(4)) {
                    a.store(u32::from_ne_bytes(c.try_into().unwrap()), Relaxed);
                }
                for (a, c) in r.hash.iter().zip(h.chunks_exact(2)) {
                    a.store(u16::from_ne_bytes(c.try_into().unwrap()), Relaxed);
                }
            }
            s
        }
        /// Region `i` as file bytes.
        fn bytes(&mut self, i: u32) -> Vec<u8> {
            let r = self.region(i).unwrap();
            let mut v: Vec<u8> = r.words.iter().flat_map(|w| w.load(Relaxed).to_ne_bytes()).collect();
            v.extend(r.hash.iter().flat_map(|s| s.load(Relaxed).to_ne_bytes()));
            v
        }
        fn r0(&mut self) -> Region<'_> {
            self.region(0).unwrap()
        }
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    const SCRIPT: &str = r#"
import os, random, shutil, sqlite3, sys
d = sys.argv[1]
db = os.path.join(d, "db")
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA page_size=1024")
assert c.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("PRAGMA cache_size=16")  # big transactions spill frames before commit
c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
c.execute("CREATE TABLE hot(k INTEGER PRIMARY KEY, n INTEGER)")
c.execute("INSERT INTO hot VALUES(1, 0)")
r = random.Random(7)
def bulk(n):
    for _ in range(n):
        c.execute("INSERT INTO t(v) VALUES(?)", (r.randbytes(r.randrange(100, 900)),))
rnd = 0
while os.path.getsize(db + "-wal") < 32 + 9400 * (24 + 1024):
    c.execute("BEGIN"); bulk(300); c.execute("COMMIT")
    for _ in range(100):
        c.execute("UPDATE hot SET n = n + 1")  # the same pages, many times
    c.execute("BEGIN"); bulk(150); c.execute("ROLLBACK")  # spilled, then undone
    c.execute("UPDATE t SET v = randomblob(200) WHERE k % 11 = ?", (rnd % 11,))
    rnd += 1
c.execute("BEGIN"); bulk(600); c.execute("COMMIT")  # beyond every rolled-back frame
c.execute("BEGIN"); bulk(60); c.execute("ROLLBACK")  # leaves valid uncommitted frames
shutil.copyfile(db + "-shm", os.path.join(d, "shm.copy"))
shutil.copyfile(db + "-wal", os.path.join(d, "wal.copy"))
"#;

    struct Frame {
        page_no: u32,
        commit_size: u32,
        cksum: (u32, u32),
    }

    /// Builds a WAL with real SQLite, replays its committed frames through
    /// `append`/`write_header`, and requires SQLite's own -shm byte for byte.
    #[test]
    fn matches_sqlite_wal_index() {
        let py = Path::new("/usr/bin/python3");
        assert!(py.exists(), "/usr/bin/python3 (Debian's, with its sqlite3 module) is required by this test");
        let dir = crate::testutil::scratch_dir("walindex");
        let out = Command::new(py).arg("-c").arg(SCRIPT).arg(&dir).output().expect("running /usr/bin/python3");
        assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
        let shm = std::fs::read(dir.join("shm.copy")).unwrap();
        let wal = std::fs::read(dir.join("wal.copy")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        // The WAL header and the valid frames (salts match, checksums chain).
        let magic = be32(&wal, 0);
        assert_eq!(magic & !1, 0x377f_0682);
        let big = magic & 1 == 1;
        let page_size = be32(&wal, 8);
        let salt = (be32(&wal, 16), be32(&wal, 20));
        let mut ck = wal_checksum(big, &wal[..24], (0, 0));
        assert_eq!(ck, (be32(&wal, 24), be32(&wal, 28)));
        let mut frames = Vec::new();
        for f in wal[32..].chunks_exact(24 + page_size as usize) {
            ck = wal_checksum(big, &f[24..], wal_checksum(big, &f[..8], ck));
            if (be32(f, 8), be32(f, 12)) != salt || ck != (be32(f, 16), be32(f, 20)) {
                break;
            }
            frames.push(Frame { page_no: be32(f, 0), commit_size: be32(f, 4), cksum: ck });
        }
        let n = frames.iter().rposition(|f| f.commit_size != 0).unwrap() + 1;
        assert!(frames.len() > n, "the final rollback should leave valid uncommitted frames");
        frames.truncate(n);
        let mx = n as u32;
        assert!(mx > 9000 && frame_region(mx) >= 2, "{mx} frames do not span three regions");

        // SQLite's own header, as read_header decodes it, against the WAL.
        let mut theirs = MemShm::from_bytes(&shm);
        assert!(shm.len() >= 3 * REGION_SIZE);
        let th = read_header(&theirs.r0()).expect("SQLite's header");
        let last = &frames[n - 1];
        let expect = IndexHeader {
            // iChange counts commits since the wal-index was created; this one was
            // created with this WAL, never restarted, so it is the WAL's commits.
            change: frames.iter().filter(|f| f.commit_size != 0).count() as u32,
            is_init: true,
            big_end_cksum: big,
            page_size,
            mx_frame: mx,
            n_page: last.commit_size,
            frame_cksum: last.cksum,
            salt,
        };
        assert_eq!(th, expect);
        assert_eq!((n_backfill(&theirs.r0()), read_mark(&theirs.r0(), 0)), (0, 0));

        // Replay as a writer would: each transaction appended after the last commit.
        let mut mine = MemShm::default();
        let mut committed = 0;
        let mut change = 0;
        for (i, f) in frames.iter().enumerate() {
            let frame = i as u32 + 1;
            append(&mut mine, committed, frame, f.page_no).unwrap();
            if f.commit_size != 0 {
                committed = frame;
                change += 1;
                let h = IndexHeader { change, mx_frame: frame, n_page: f.commit_size, frame_cksum: f.cksum, ..expect };
                write_header(&mine.r0(), &h);
            }
        }
        assert_eq!(read_header(&mine.r0()), Some(expect));

        // Both header copies byte for byte (aCksum included), then every region's
        // page array and hash table. The checkpoint info (read marks) is SQLite's
        // readers' business. Regions past mx's are never read (cleared on reuse).
        assert_eq!(mine.bytes(0)[..96], theirs.bytes(0)[..96], "header");
        for i in 0..=frame_region(mx) {
            let from = if i == 0 { WALINDEX_HDR_SIZE } else { 0 };
            let (a, b) = (mine.bytes(i), theirs.bytes(i));
            assert!(a[from..] == b[from..], "region {i} differs from SQLite's");
        }

        // find_frame on both indexes agrees with a naive scan, at several snapshots.
        let commits: Vec<u32> = (1..=mx).filter(|&f| frames[f as usize - 1].commit_size != 0).collect();
        let max_page = frames.iter().map(|f| f.page_no).max().unwrap();
        for &snap in [commits[0], commits[commits.len() / 3], 4062, 4063, 8158, 8159, mx].iter() {
            let mut newest = HashMap::new();
            for (i, f) in frames[..snap as usize].iter().enumerate() {
                newest.insert(f.page_no, i as u32 + 1);
            }
            for p in 1..=max_page + 1 {
                let want = newest.get(&p).copied();
                assert_eq!(find_frame(&mut mine, 1, snap, p).unwrap(), want, "page {p} at {snap}");
                assert_eq!(find_frame(&mut theirs, 1, snap, p).unwrap(), want, "page {p} at {snap} (SQLite's)");
            }
        }
    }

    /// A clean index of `pages` (frame i + 1 holds pages[i]), one transaction.
    fn clean(pages: &[u32]) -> MemShm {
        let mut s = MemShm::default();
        for (i, &p) in pages.iter().enumerate() {
            append(&mut s, 0, i as u32 + 1, p).unwrap();
        }
        s
    }

    #[test]
    fn crashed_writer_leftovers_are_cleaned() {
        // (committed, last frame the crashed writer appended): within a region,
        // across into the next one, from a region's last frame, and region 1 to 2.
        for (committed, crashed) in [(10, 25), (4060, 4075), (4062, 4070), (8100, 8200)] {
            let old: Vec<u32> = (1..=committed).map(|f| f % 97 + 1).collect();
            let mut s = clean(&old);
            for f in committed + 1..=crashed {
                append(&mut s, committed, f, 1000 + f).unwrap();
            }
            // The next writer starts again after the committed frames.
            let new: Vec<u32> = (1..=5).map(|k| 500 + k).collect();
            for (k, &p) in new.iter().enumerate() {
                append(&mut s, committed, committed + 1 + k as u32, p).unwrap();
            }
            let mx = committed + new.len() as u32;
            let mut want = clean(&[old, new].concat());
            for i in 0..=frame_region(mx) {
                assert!(s.bytes(i) == want.bytes(i), "region {i} after crash at {crashed}");
            }
            for f in committed + 1..=crashed {
                assert_eq!(find_frame(&mut s, 1, mx, 1000 + f).unwrap(), None);
            }
            assert_eq!(find_frame(&mut s, 1, mx, 503).unwrap(), Some(committed + 3));
            assert_eq!(find_frame(&mut s, 1, mx, committed % 97 + 1).unwrap(), Some(committed));
        }
    }

    #[test]
    fn region_boundaries() {
        let b = HASHTABLE_NPAGE_ONE;
        let map = [(1, 0), (b, 0), (b + 1, 1), (b + 4096, 1), (b + 4097, 2), (b + 8192, 2), (b + 8193, 3)];
        for (f, r) in map {
            assert_eq!(frame_region(f), r, "frame {f}");
        }
        let pages: Vec<u32> = (1..=b + 4097).collect();
        let mut s = clean(&pages);
        for f in [1, b, b + 1, b + 4096, b + 4097] {
            assert_eq!(find_frame(&mut s, 1, b + 4097, f).unwrap(), Some(f));
        }
        // Last slot of region 0's array, first and last of region 1's, first of 2's.
        assert_eq!(s.region(0).unwrap().words[4095].load(Relaxed), b);
        assert_eq!(s.region(1).unwrap().words[0].load(Relaxed), b + 1);
        assert_eq!(s.region(1).unwrap().words[4095].load(Relaxed), b + 4096);
        assert_eq!(s.region(2).unwrap().words[0].load(Relaxed), b + 4097);
        assert_eq!(s.region(1).unwrap().hash[wal_hash(b + 1)].load(Relaxed), 1);
        // A snapshot ending in region 0 does not see region 1's frames.
        assert_eq!(find_frame(&mut s, 1, b, b + 1).unwrap(), None);
        // A snapshot starting in region 1 (min_frame) skips region 0.
        assert_eq!(find_frame(&mut s, b + 1, b + 4097, 5).unwrap(), None);
    }

    #[test]
    fn full_hash_table_is_corruption() {
        let mut s = clean(&[1, 2]);
        s.r0().hash.iter().for_each(|h| h.store(1, Relaxed));
        let e = append(&mut s, 2, 3, 3).unwrap_err();
        assert!(e.kind() == io::ErrorKind::InvalidData && e.to_string().contains("corrupt"), "{e}");
        assert!(find_frame(&mut s, 1, 2, 9).unwrap_err().to_string().contains("corrupt"));
        assert_eq!(append(&mut s, 3, 3, 3).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn header_round_trip_and_rejects() {
        let mut s = MemShm::default();
        assert_eq!(read_header(&s.r0()), None, "all zeros");
        let h = IndexHeader {
            change: 7,
            is_init: true,
            big_end_cksum: false,
            page_size: 65536,
            mx_frame: 12,
            n_page: 40,
            frame_cksum: (0xdead_beef, 0x1234_5678),
            salt: (0x0102_0304, 0xa0b0_c0d0),
        };
        write_header(&s.r0(), &h);
        assert_eq!(read_header(&s.r0()), Some(h));
        let r0 = s.r0();
        // Word 3: isInit, bigEndCksum, szPage (65536 stored as 1); salts as the
        // WAL header's big-endian bytes.
        assert_eq!(r0.words[3].load(Relaxed).to_ne_bytes(), [1, 0, 1u16.to_ne_bytes()[0], 1u16.to_ne_bytes()[1]]);
        assert_eq!(r0.words[8].load(Relaxed).to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(r0.words[0].load(Relaxed), WALINDEX_VERSION);
        r0.words[4].store(13, Relaxed);
        assert_eq!(read_header(&r0), None, "copies differ");
        r0.words[HDR_WORDS + 4].store(13, Relaxed);
        assert_eq!(read_header(&r0), None, "bad checksum");
        write_header(&r0, &IndexHeader { page_size: 4096, ..h });
        assert_eq!(read_header(&r0).unwrap().page_size, 4096);
    }

    #[test]
    fn restart() {
        let mut s = MemShm::default();
        let r0 = s.r0();
        let mut h = IndexHeader {
            change: 3,
            is_init: true,
            big_end_cksum: false,
            page_size: 4096,
            mx_frame: 100,
            n_page: 9,
            frame_cksum: (5, 6),
            salt: (0xffff_ffff, 77),
        };
        write_header(&r0, &h);
        set_n_backfill(&r0, 100);
        set_n_backfill_attempted(&r0, 100);
        for i in 0..WAL_NREADER {
            set_read_mark(&r0, i, if i == 0 { 0 } else { 100 });
        }
        restart_header(&r0, &mut h, 0x5a5a_0001);
        let want = IndexHeader { mx_frame: 0, salt: (0, 0x5a5a_0001), ..h };
        assert_eq!(h, want, "salt-1 + 1 wraps");
        assert_eq!(read_header(&r0), Some(want));
        assert_eq!(n_backfill(&r0), 0);
        assert_eq!(r0.words[N_BACKFILL_ATTEMPTED].load(Relaxed), 0);
        let marks: Vec<u32> = (0..WAL_NREADER).map(|i| read_mark(&r0, i)).collect();
        assert_eq!(marks, [0, 0, READMARK_NOT_USED, READMARK_NOT_USED, READMARK_NOT_USED]);
    }
}
