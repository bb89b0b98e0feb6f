//! Reading SQLite's -wal file: its header, frame headers, SQLite's own frame
//! checksums, and the committed transactions it holds.
//!
//! Only frames whose salts match the WAL header and whose checksums chain are
//! trusted, exactly the rule SQLite's own recovery applies; a transaction is
//! committed when its commit frame (one with a non-zero database size) is valid.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

pub const WAL_HEADER_LEN: usize = 32;
pub const WAL_FRAME_HEADER_LEN: usize = 24;
const WAL_MAGIC: u32 = 0x377f_0682;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// True when checksums are computed on big-endian words (magic 0x377f0683).
    pub big_endian_cksum: bool,
    pub page_size: u32,
    pub ckpt_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub cksum: (u32, u32),
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

impl WalHeader {
    /// Parses and validates a WAL header; None when it is not a valid one.
    pub fn parse(b: &[u8]) -> Option<WalHeader> {
        if b.len() < WAL_HEADER_LEN {
            return None;
        }
        let magic = be32(b, 0);
        if magic & !1 != WAL_MAGIC || be32(b, 4) != 3_007_000 {
            return None;
        }
        let big = magic & 1 == 1;
        let raw_size = be32(b, 8);
        let page_size = if raw_size == 1 { 65536 } else { raw_size };
        if !crate::frame::is_page_size(page_size) {
            return None;
        }
        let cksum = (be32(b, 24), be32(b, 28));
        if wal_checksum(big, &b[0..24], (0, 0)) != cksum {
            return None;
        }
        Some(WalHeader { big_endian_cksum: big, page_size, ckpt_seq: be32(b, 12), salt1: be32(b, 16), salt2: be32(b, 20), cksum })
    }
}

/// SQLite's WAL checksum (`walChecksumBytes`): Fibonacci-weighted sums over
/// 32-bit words, read big-endian or little-endian as the WAL magic says.
pub fn wal_checksum(big_endian: bool, data: &[u8], seed: (u32, u32)) -> (u32, u32) {
    debug_assert!(data.len().is_multiple_of(8));
    let (mut s1, mut s2) = seed;
    for pair in data.chunks_exact(8) {
        let (a, b) = if big_endian {
            (u32::from_be_bytes(pair[0..4].try_into().unwrap()), u32::from_be_bytes(pair[4..8].try_into().unwrap()))
        } else {
            (u32::from_le_bytes(pair[0..4].try_into().unwrap()), u32::from_le_bytes(pair[4..8].try_into().unwrap()))
        };
        s1 = s1.wrapping_add(a).wrapping_add(s2);
        s2 = s2.wrapping_add(b).wrapping_add(s1);
    }
    (s1, s2)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalFrameHeader {
    pub page_no: u32,
    /// Database size in pages after the commit, on a commit frame; 0 otherwise.
    pub commit_size: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub cksum: (u32, u32),
}

impl WalFrameHeader {
    pub fn parse(b: &[u8]) -> WalFrameHeader {
        WalFrameHeader {
            page_no: be32(b, 0),
            commit_size: be32(b, 4),
            salt1: be32(b, 8),
            salt2: be32(b, 12),
            cksum: (be32(b, 16), be32(b, 20)),
        }
    }
}

/// A position in one WAL: after frame `frame` (0 = just after the header), whose
/// running checksum is `cksum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalPos {
    pub salt1: u32,
    pub salt2: u32,
    pub frame: u32,
    pub cksum: (u32, u32),
}

/// One committed transaction found in the WAL: frames `first..=commit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalCommit {
    pub first: u32,
    pub commit: u32,
    /// Database size in pages after this transaction.
    pub db_pages: u32,
    /// The position just after the commit frame.
    pub end: WalPos,
}

/// An open -wal file, read with its own descriptor. SQLite takes no POSIX locks on
/// the -wal file, so opening and closing it here cannot disturb SQLite's locks.
pub struct WalFile {
    file: Arc<File>,
    pub header: WalHeader,
    len: u64,
    /// Frames read ahead: a pass over a few small transactions reads the WAL
    /// once instead of once per frame header and page. Never past `read_end`.
    window: std::cell::RefCell<Vec<u8>>,
    window_at: std::cell::Cell<u64>,
    read_end: std::cell::Cell<u64>,
}

/// How far frame reads look ahead.
const READ_AHEAD: u64 = 1 << 20;

/// Opens the -wal file for reading; Ok(None) when there is none.
fn open_wal_file(path: &Path) -> io::Result<Option<File>> {
    match crate::log::open_noatime(std::fs::OpenOptions::new().read(true), path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The -wal file kept open from one capture pass to the next: opening it on
/// every pass cost a path lookup, an open and a close, a sixth of the capture
/// thread's time at 1,000 commits/s. It is kept only while that file is still
/// linked: SQLite deletes the WAL when its last connection closes (or the
/// journal mode changes), and a WAL made after that is another file. A WAL
/// restarted in place is the same file; each pass reads its header again.
#[derive(Default)]
pub struct KeptWal {
    file: RefCell<Option<Arc<File>>>,
}

impl KeptWal {
    /// The -wal file now at `path`; None when there is none.
    pub fn file(&self, path: &Path) -> io::Result<Option<Arc<File>>> {
        let mut kept = self.file.borrow_mut();
        if let Some(f) = kept.as_ref() {
            if f.metadata().is_ok_and(|m| m.nlink() > 0) {
                return Ok(Some(f.clone()));
            }
        }
        *kept = None;
        *kept = open_wal_file(path)?.map(Arc::new);
        Ok(kept.clone())
    }

    /// Like `WalFile::open`, through the kept file.
    pub fn open(&self, path: &Path) -> io::Result<Option<WalFile>> {
        match self.file(path)? {
            Some(f) => WalFile::read(f),
            None => Ok(None),
        }
    }

    /// Closes the kept file (the application closed the database).
    pub fn forget(&self) {
        *self.file.borrow_mut() = None;
    }
}

impl WalFile {
    /// Opens the WAL; Ok(None) when it is missing, empty or has no valid header.
    pub fn open(path: &Path) -> io::Result<Option<WalFile>> {
        match open_wal_file(path)? {
            Some(file) => WalFile::read(Arc::new(file)),
            None => Ok(None),
        }
    }

    /// The WAL in `file` as it is now; Ok(None) when it is empty or has no
    /// valid header.
    pub fn read(file: Arc<File>) -> io::Result<Option<WalFile>> {
        let len = file.metadata()?.len();
        let mut hdr = [0u8; WAL_HEADER_LEN];
        if len < WAL_HEADER_LEN as u64 {
            return Ok(None);
        }
        file.read_exact_at(&mut hdr, 0)?;
        Ok(WalHeader::parse(&hdr).map(|header| WalFile {
            file,
            header,
            len,
            window: Default::default(),
            window_at: Default::default(),
            read_end: std::cell::Cell::new(u64::MAX),
        }))
    }

    pub fn page_size(&self) -> usize {
        self.header.page_size as usize
    }

    /// Reads ahead no further than frame `frame` (what the wal-index says is
    /// committed): frames past it may be being written, or be left over.
    pub fn limit_read_ahead(&self, frame: u32) {
        self.read_end.set(self.frame_offset(frame + 1));
    }

    /// `read_exact_at` through the read-ahead window.
    fn read_frames_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut w = self.window.borrow_mut();
        let at = self.window_at.get();
        let end = off + buf.len() as u64;
        if off < at || end > at + w.len() as u64 {
            // Forward reads look ahead; a backward walk (last_versions) looks behind.
            let start = if off < at { end.saturating_sub(READ_AHEAD).min(off) } else { off };
            let want = if off < at { end - start } else { self.read_end.get().min(off + READ_AHEAD).max(end) - start };
            w.resize(want as usize, 0);
            let n = crate::log::read_full_at(&self.file, &mut w, start)?;
            w.truncate(n);
            self.window_at.set(start);
            if start + (n as u64) < end {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "WAL ends inside a frame"));
            }
        }
        let from = (off - self.window_at.get()) as usize;
        buf.copy_from_slice(&w[from..from + buf.len()]);
        Ok(())
    }

    pub fn start(&self) -> WalPos {
        WalPos { salt1: self.header.salt1, salt2: self.header.salt2, frame: 0, cksum: self.header.cksum }
    }

    fn frame_offset(&self, frame: u32) -> u64 {
        WAL_HEADER_LEN as u64 + (frame as u64 - 1) * (WAL_FRAME_HEADER_LEN + self.page_size()) as u64
    }

    /// Frames wholly present in the file (valid or not).
    pub fn frames_in_file(&self) -> u32 {
        let per = (WAL_FRAME_HEADER_LEN + self.page_size()) as u64;
        (self.len.saturating_sub(WAL_HEADER_LEN as u64) / per) as u32
    }

    pub fn read_frame_header(&self, frame: u32) -> io::Result<WalFrameHeader> {
        let mut b = [0u8; WAL_FRAME_HEADER_LEN];
        self.read_frames_at(&mut b, self.frame_offset(frame))?;
        Ok(WalFrameHeader::parse(&b))
    }

    /// The size of one frame: header and page.
    pub fn frame_size(&self) -> usize {
        WAL_FRAME_HEADER_LEN + self.page_size()
    }

    /// Reads only the page of a frame.
    pub fn read_page(&self, frame: u32, page: &mut [u8]) -> io::Result<()> {
        self.read_frames_at(page, self.frame_offset(frame) + WAL_FRAME_HEADER_LEN as u64)
    }

    /// True when `pos` is a real position in this WAL: same salts, and the frame it
    /// names is present with exactly that running checksum.
    pub fn contains(&self, pos: &WalPos) -> io::Result<bool> {
        if pos.salt1 != self.header.salt1 || pos.salt2 != self.header.salt2 {
            return Ok(false);
        }
        // The header read at open must still be the one on disk: a restart by a
        // process without walcast rewrites it.
        let mut hdr = [0u8; WAL_HEADER_LEN];
        if self.file.read_exact_at(&mut hdr, 0).is_err() || WalHeader::parse(&hdr) != Some(self.header) {
            return Ok(false);
        }
        if pos.frame == 0 {
            return Ok(pos.cksum == self.header.cksum);
        }
        if pos.frame > self.frames_in_file() {
            return Ok(false);
        }
        // One header, read on its own: through the read-ahead window, a frame
        // just behind it would read a megabyte behind it.
        let mut b = [0u8; WAL_FRAME_HEADER_LEN];
        self.file.read_exact_at(&mut b, self.frame_offset(pos.frame))?;
        let h = WalFrameHeader::parse(&b);
        Ok(h.salt1 == pos.salt1 && h.salt2 == pos.salt2 && h.cksum == pos.cksum)
    }

    /// The next committed transaction after `from`, validating every frame's salts
    /// and checksum on the way; None when no valid commit frame follows (yet).
    /// `scratch` is reused buffer space.
    pub fn next_commit(&self, from: &WalPos, scratch: &mut Vec<u8>) -> io::Result<Option<WalCommit>> {
        let mut ck = from.cksum;
        let n = self.frames_in_file();
        scratch.resize(self.frame_size(), 0);
        let mut frame = from.frame;
        while frame < n {
            frame += 1;
            // A frame being written concurrently, or left over from a rolled-back
            // transaction, fails one of these checks: that is the end of the log.
            if self.read_frames_at(scratch, self.frame_offset(frame)).is_err() {
                return Ok(None);
            }
            let (head, page) = scratch.split_at(WAL_FRAME_HEADER_LEN);
            let h = WalFrameHeader::parse(head);
            if h.salt1 != self.header.salt1 || h.salt2 != self.header.salt2 || h.page_no == 0 {
                return Ok(None);
            }
            ck = wal_checksum(self.header.big_endian_cksum, &head[0..8], ck);
            ck = wal_checksum(self.header.big_endian_cksum, page, ck);
            if ck != h.cksum {
                return Ok(None);
            }
            if h.commit_size != 0 {
                return Ok(Some(WalCommit {
                    first: from.frame + 1,
                    commit: frame,
                    db_pages: h.commit_size,
                    end: WalPos { salt1: h.salt1, salt2: h.salt2, frame, cksum: ck },
                }));
            }
        }
        Ok(None)
    }

    /// The next commit after `from`, at or before frame `committed`, which the
    /// wal-index says SQLite committed. SQLite's readers trust such frames
    /// without checking their checksums, and so does this: it reads only frame
    /// headers, one small read each, and checks their salts. It reads no page,
    /// so a pass over many commits that rewrite the same pages reads each page
    /// once, later, and only its last version. The running checksum at the
    /// commit is the one its frame header records.
    ///
    /// Appends the page number of each frame to `page_nos` while the
    /// transaction is at most `collect_up_to` frames; a longer one leaves
    /// `page_nos` as it found it (its caller streams it instead).
    pub fn next_indexed_commit(
        &self,
        from: &WalPos,
        committed: u32,
        page_nos: &mut Vec<u32>,
        collect_up_to: u32,
    ) -> io::Result<Option<WalCommit>> {
        let start = page_nos.len();
        let last = committed.min(self.frames_in_file());
        let mut b = [0u8; WAL_FRAME_HEADER_LEN];
        let mut frame = from.frame;
        while frame < last {
            frame += 1;
            self.file.read_exact_at(&mut b, self.frame_offset(frame))?;
            let h = WalFrameHeader::parse(&b);
            if h.salt1 != self.header.salt1 || h.salt2 != self.header.salt2 || h.page_no == 0 {
                // Not this WAL's frame: the WAL was restarted under the pass,
                // which its final check of the WAL header finds.
                page_nos.truncate(start);
                return Ok(None);
            }
            if frame - from.frame <= collect_up_to {
                page_nos.push(h.page_no);
            } else {
                page_nos.truncate(start);
            }
            if h.commit_size != 0 {
                return Ok(Some(WalCommit {
                    first: from.frame + 1,
                    commit: frame,
                    db_pages: h.commit_size,
                    end: WalPos { salt1: h.salt1, salt2: h.salt2, frame, cksum: h.cksum },
                }));
            }
        }
        page_nos.truncate(start);
        Ok(None)
    }

    /// Reads whole frames from `first` on into `buf`, from the file itself (not
    /// through the read-ahead window).
    pub fn read_frames_direct(&self, first: u32, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, self.frame_offset(first))
    }

    /// The position after the last valid commit in the WAL, at or before frame
    /// `limit` when one is given.
    pub fn last_commit(&self, page: &mut Vec<u8>, limit: Option<u32>) -> io::Result<(WalPos, Option<u32>)> {
        let mut pos = self.start();
        let mut db_pages = None;
        while let Some(c) = self.next_commit(&pos, page)? {
            if limit.is_some_and(|l| c.commit > l) {
                break;
            }
            pos = c.end;
            db_pages = Some(c.db_pages);
        }
        Ok((pos, db_pages))
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builds WAL files the way SQLite writes them, for tests.
    use super::*;

    pub struct WalBuilder {
        pub bytes: Vec<u8>,
        pub page_size: u32,
        ck: (u32, u32),
        salt: (u32, u32),
    }

    impl WalBuilder {
        pub fn new(page_size: u32, salt1: u32, salt2: u32) -> WalBuilder {
            let mut h = vec![0u8; 32];
            h[0..4].copy_from_slice(&WAL_MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&3_007_000u32.to_be_bytes());
            h[8..12].copy_from_slice(&(if page_size == 65536 { 1 } else { page_size }).to_be_bytes());
            h[16..20].copy_from_slice(&salt1.to_be_bytes());
            h[20..24].copy_from_slice(&salt2.to_be_bytes());
            let ck = wal_checksum(false, &h[0..24], (0, 0));
            h[24..28].copy_from_slice(&ck.0.to_be_bytes());
            h[28..32].copy_from_slice(&ck.1.to_be_bytes());
            WalBuilder { bytes: h, page_size, ck, salt: (salt1, salt2) }
        }

        pub fn frame(&mut self, pgno: u32, commit_size: u32, fill: u8) -> &mut Self {
            let mut head = [0u8; 24];
            head[0..4].copy_from_slice(&pgno.to_be_bytes());
            head[4..8].copy_from_slice(&commit_size.to_be_bytes());
            head[8..12].copy_from_slice(&self.salt.0.to_be_bytes());
            head[12..16].copy_from_slice(&self.salt.1.to_be_bytes());
            let page = vec![fill; self.page_size as usize];
            self.ck = wal_checksum(false, &head[0..8], self.ck);
            self.ck = wal_checksum(false, &page, self.ck);
            head[16..20].copy_from_slice(&self.ck.0.to_be_bytes());
            head[20..24].copy_from_slice(&self.ck.1.to_be_bytes());
            self.bytes.extend_from_slice(&head);
            self.bytes.extend_from_slice(&page);
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::WalBuilder;
    use super::*;

    fn write(bytes: &[u8]) -> (std::path::PathBuf, WalFile) {
        let dir = crate::testutil::scratch_dir("wal");
        let p = dir.join("x.db-wal");
        std::fs::write(&p, bytes).unwrap();
        let w = WalFile::open(&p).unwrap().unwrap();
        (p, w)
    }

    #[test]
    fn a_kept_wal_is_read_again_each_time_and_reopened_once_replaced() {
        let dir = crate::testutil::scratch_dir("kept-wal");
        let p = dir.join("k.db-wal");
        let kept = KeptWal::default();
        assert!(kept.open(&p).unwrap().is_none(), "no WAL yet");
        let mut b = WalBuilder::new(512, 1, 2);
        b.frame(1, 1, 1);
        std::fs::write(&p, &b.bytes).unwrap();
        let first = kept.file(&p).unwrap().unwrap();
        assert_eq!(kept.open(&p).unwrap().unwrap().frames_in_file(), 1);
        // Appended to and restarted in place: the same file, read again.
        b.frame(1, 1, 2);
        std::fs::write(&p, &b.bytes).unwrap();
        assert_eq!(kept.open(&p).unwrap().unwrap().frames_in_file(), 2);
        let restarted = WalBuilder::new(512, 3, 4);
        std::fs::write(&p, &restarted.bytes).unwrap();
        let w = kept.open(&p).unwrap().unwrap();
        assert_eq!((w.header.salt1, w.frames_in_file()), (3, 0));
        assert!(Arc::ptr_eq(&first, &kept.file(&p).unwrap().unwrap()), "the same file stays open");
        // Deleted, then created again: another file, opened again.
        std::fs::remove_file(&p).unwrap();
        assert!(kept.open(&p).unwrap().is_none(), "a deleted WAL is not read through the kept descriptor");
        let mut other = WalBuilder::new(512, 5, 6);
        other.frame(1, 1, 3).frame(2, 2, 4);
        std::fs::write(&p, &other.bytes).unwrap();
        let w = kept.open(&p).unwrap().unwrap();
        assert_eq!((w.header.salt1, w.frames_in_file()), (5, 2));
        // Replaced by a rename while open.
        let q = dir.join("k.db-wal.new");
        std::fs::write(&q, &WalBuilder::new(1024, 7, 8).bytes).unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert_eq!(kept.open(&p).unwrap().unwrap().header.salt1, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_wal_is_opened_without_access_time_updates() {
        let (p, w) = write(&WalBuilder::new(512, 1, 2).bytes);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*w.file);
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).map(|f| i64::from_str_radix(f.trim(), 8).unwrap()).unwrap();
        assert_ne!(flags & libc::O_NOATIME as i64, 0, "O_NOATIME on {}: {info}", p.display());
    }

    #[test]
    fn finds_commits_and_stops_at_uncommitted_tail() {
        let mut b = WalBuilder::new(512, 11, 22);
        b.frame(1, 0, 1).frame(2, 3, 2).frame(3, 0, 3).frame(1, 4, 4).frame(2, 0, 5);
        let (_p, w) = write(&b.bytes);
        let mut page = Vec::new();
        let c1 = w.next_commit(&w.start(), &mut page).unwrap().unwrap();
        assert_eq!((c1.first, c1.commit, c1.db_pages), (1, 2, 3));
        let c2 = w.next_commit(&c1.end, &mut page).unwrap().unwrap();
        assert_eq!((c2.first, c2.commit, c2.db_pages), (3, 4, 4));
        assert!(w.next_commit(&c2.end, &mut page).unwrap().is_none());
        assert!(w.contains(&c2.end).unwrap());
        let (last, pages) = w.last_commit(&mut page, None).unwrap();
        assert_eq!((last, pages), (c2.end, Some(4)));
    }

    #[test]
    fn a_corrupt_frame_ends_the_valid_log() {
        let mut b = WalBuilder::new(512, 1, 2);
        b.frame(1, 1, 1).frame(1, 1, 2);
        let at = 32 + 24 + 512 + 24 + 100; // inside the second frame's page
        b.bytes[at] ^= 0xff;
        let (_p, w) = write(&b.bytes);
        let (last, _) = w.last_commit(&mut Vec::new(), None).unwrap();
        assert_eq!(last.frame, 1);
    }
}
