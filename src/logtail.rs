//! Reading committed units (transactions and base images) out of a replication
//! log that other threads and processes keep appending to: the publisher follows
//! its tail, the catch-up server looks frames up in it, snapshots are built from it.
//!
//! Only complete units count: a unit is the frames between an optional
//! generation record and a commit record, and a unit whose commit record is not
//! yet in the file is not there. Frame checksums are not re-verified here; every
//! replica verifies the chain of what it receives.

use std::fs::File;
use std::io;
use std::path::Path;

use crate::frame::{FrameHeader, FRAME_HEADER_LEN};
use crate::log::{
    self, CommitRecord, LogFile, COMMIT_LEN, MAX_REASON, RECORDS_START, TAG_COMMIT, TAG_FRAME, TAG_GENERATION, TAG_WAL_EVENT, WAL_EVENT_LEN,
};

/// Where a reader stands: at a unit boundary, with what is known there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub offset: u64,
    pub generation: u64,
    pub page_size: u32,
    pub last_frame_no: u64,
    pub last_checksum: u64,
    pub db_pages: u32,
}

/// One complete unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Offset of its first F record.
    pub frames_offset: u64,
    /// Offset just past its commit record.
    pub end: u64,
    pub generation: u64,
    pub page_size: u32,
    /// It is the base image that starts `generation`.
    pub gen_start: bool,
    pub first_frame_no: u64,
    /// The checksum of the frame before it.
    pub prev_checksum: u64,
    pub commit: CommitRecord,
}

impl Unit {
    pub fn frame_count(&self) -> u64 {
        self.commit.last_frame_no + 1 - self.first_frame_no
    }
    pub fn record_len(&self) -> u64 {
        1 + FRAME_HEADER_LEN as u64 + self.page_size as u64
    }
    /// Offset of the F record of `frame_no`, which must be in this unit.
    pub fn frame_offset(&self, frame_no: u64) -> u64 {
        self.frames_offset + (frame_no - self.first_frame_no) * self.record_len()
    }
}

pub struct LogTail {
    /// Shared, so that a reader positioned elsewhere costs no system call.
    file: std::sync::Arc<File>,
    pub db_id: [u8; 16],
    pub pos: Pos,
    /// Bytes read ahead for `next_unit`, from `window_at`: one read serves the
    /// record headers of many small units. Its first `window_len` bytes are
    /// the log's; the buffers keep their length, so that a read ahead does
    /// not zero 64 KiB first (4% of the capture thread's CPU at 1,000
    /// commits/s).
    window: Vec<u8>,
    window_len: usize,
    window_at: u64,
    /// The buffer the next read ahead goes into (the window's last one).
    spare: Vec<u8>,
}

fn corrupt(off: u64, what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("replication log is damaged at byte {off}: {}", what.into()))
}

impl Clone for LogTail {
    /// Another reader of the same file, without the read-ahead bytes.
    fn clone(&self) -> LogTail {
        LogTail {
            file: self.file.clone(),
            db_id: self.db_id,
            pos: self.pos,
            window: Vec::new(),
            window_len: 0,
            window_at: 0,
            spare: Vec::new(),
        }
    }
}

impl LogTail {
    /// Opens a log; `from_start` positions the reader at the first record,
    /// otherwise at the newest durable point its header records.
    pub fn open(path: &Path, from_start: bool) -> io::Result<LogTail> {
        let lf = LogFile::open(path).map_err(|e| io::Error::other(e.to_string()))?;
        let st = if from_start { lf.id.initial_state() } else { lf.snapshot };
        let len = lf.file.metadata()?.len();
        if st.end_offset > len {
            return Err(corrupt(len, format!("the header records {} durable bytes, but the file has {len}", st.end_offset)));
        }
        let pos = Pos {
            offset: st.end_offset.max(RECORDS_START),
            generation: st.generation,
            page_size: st.page_size,
            last_frame_no: st.last_frame_no,
            last_checksum: st.last_checksum,
            db_pages: st.db_pages,
        };
        Ok(LogTail {
            file: std::sync::Arc::new(lf.file),
            db_id: lf.id.db_id,
            pos,
            window: Vec::new(),
            window_len: 0,
            window_at: 0,
            spare: Vec::new(),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads up to `buf.len()` bytes at `off`; returns how many the file had.
    fn read_some(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        log::read_full_at(&self.file, buf, off)
    }

    /// Forgets bytes read ahead: the log's end may have been rewritten (a
    /// dropped batch) since. Call before each look for new units.
    pub fn forget_window(&mut self) {
        self.window_len = 0;
    }

    /// Up to `buf.len()` bytes at `off`, through the read-ahead window.
    fn read_ahead(&mut self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        const AHEAD: usize = 64 << 10;
        let end = self.window_at + self.window_len as u64;
        if off < self.window_at || off + buf.len() as u64 > end {
            let mut w = std::mem::take(&mut self.spare);
            let want = AHEAD.max(buf.len());
            if w.len() < want {
                w.resize(want, 0);
            }
            // One read: at the log's end it returns what there is, and the
            // next look at the end reads again anyway (reading until the
            // buffer is full would ask a second time at once).
            let mut n = read_once_at(&self.file, &mut w, off)?;
            if n > 0 && n < buf.len() {
                n += self.read_some(&mut w[n..buf.len()], off + n as u64)?;
            }
            if n == 0 {
                // Nothing new: keep the window, which still holds the units
                // just found (see `frames_just_found`).
                self.spare = w;
                return Ok(0);
            }
            self.spare = std::mem::replace(&mut self.window, w);
            self.window_len = n;
            self.window_at = off;
        }
        let from = (off - self.window_at) as usize;
        let n = buf.len().min(self.window_len - from);
        buf[..n].copy_from_slice(&self.window[from..from + n]);
        Ok(n)
    }

    /// Finds the next complete unit after `pos` and advances past it (and past
    /// any WAL event records before it). None when the log holds no further
    /// complete unit yet.
    pub fn next_unit(&mut self) -> io::Result<Option<Unit>> {
        let mut off = self.pos.offset;
        let mut generation = self.pos.generation;
        let mut page_size = self.pos.page_size;
        let mut gen_start = false;
        let mut frames_offset = None;
        let mut expect = self.pos.last_frame_no + 1;
        loop {
            let mut head = [0u8; 1 + FRAME_HEADER_LEN];
            let n = self.read_ahead(&mut head, off)?;
            if n == 0 {
                return Ok(None);
            }
            match head[0] {
                TAG_FRAME => {
                    if n < head.len() {
                        return Ok(None);
                    }
                    if page_size == 0 {
                        return Err(corrupt(off, "frame before any generation record"));
                    }
                    let fh = FrameHeader::decode(head[1..].try_into().unwrap());
                    if fh.frame_no != expect {
                        return Err(corrupt(off, format!("expected frame_no {expect}, found {}", fh.frame_no)));
                    }
                    frames_offset.get_or_insert(off);
                    expect += 1;
                    off += 1 + FRAME_HEADER_LEN as u64 + page_size as u64;
                }
                TAG_COMMIT => {
                    let mut b = [0u8; COMMIT_LEN];
                    if self.read_ahead(&mut b, off)? < COMMIT_LEN {
                        return Ok(None);
                    }
                    let c = CommitRecord::decode(&b).ok_or_else(|| corrupt(off, "commit record checksum mismatch"))?;
                    if c.last_frame_no.checked_add(1) != Some(expect) {
                        return Err(corrupt(off, "commit record does not close its frames"));
                    }
                    let unit = Unit {
                        frames_offset: frames_offset.unwrap_or(off),
                        end: off + COMMIT_LEN as u64,
                        generation,
                        page_size,
                        gen_start,
                        first_frame_no: self.pos.last_frame_no + 1,
                        prev_checksum: self.pos.last_checksum,
                        commit: c,
                    };
                    self.pos = Pos {
                        offset: unit.end,
                        generation,
                        page_size,
                        last_frame_no: unit.commit.last_frame_no,
                        last_checksum: unit.commit.checksum,
                        db_pages: unit.commit.size_after,
                    };
                    if unit.frame_count() == 0 {
                        // A commit with no frames carries nothing to replicate.
                        return self.next_unit();
                    }
                    return Ok(Some(unit));
                }
                TAG_GENERATION => {
                    let mut b = vec![0u8; 31 + MAX_REASON + 8];
                    let n = self.read_ahead(&mut b, off)?;
                    if n < 31 {
                        return Ok(None);
                    }
                    let reason_len = u16::from_le_bytes([b[29], b[30]]) as usize;
                    if reason_len > MAX_REASON {
                        return Err(corrupt(off, "generation record is malformed"));
                    }
                    let len = 31 + reason_len + 8;
                    if n < len {
                        return Ok(None);
                    }
                    if log::crc(&b[..31 + reason_len]) != u64::from_le_bytes(b[31 + reason_len..len].try_into().unwrap()) {
                        return Err(corrupt(off, "generation record checksum mismatch"));
                    }
                    generation = u64::from_le_bytes(b[1..9].try_into().unwrap());
                    if generation > log::MAX_GENERATION {
                        return Err(corrupt(off, format!("generation {generation} is out of range")));
                    }
                    page_size = u32::from_le_bytes(b[17..21].try_into().unwrap());
                    if !crate::frame::is_page_size(page_size) {
                        return Err(corrupt(off, format!("invalid page size {page_size}")));
                    }
                    gen_start = true;
                    off += len as u64;
                }
                TAG_WAL_EVENT => {
                    if frames_offset.is_some() || gen_start {
                        return Err(corrupt(off, "WAL event record inside a transaction"));
                    }
                    let mut b = [0u8; WAL_EVENT_LEN];
                    if self.read_ahead(&mut b, off)? < WAL_EVENT_LEN {
                        return Ok(None);
                    }
                    off += WAL_EVENT_LEN as u64;
                    self.pos.offset = off;
                }
                t => return Err(corrupt(off, format!("unknown record tag 0x{t:02x}"))),
            }
        }
    }

    /// Calls `each` for the frames `from..=to` of `unit`, in order, reading in
    /// bounded chunks. Stops early when `each` returns false.
    pub fn read_frames(
        &self,
        unit: &Unit,
        from: u64,
        to: u64,
        mut each: impl FnMut(&FrameHeader, &[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        let rec = unit.record_len() as usize;
        let per_read = (crate::wire::CHUNK_BYTES / rec).max(1);
        // Sized to what is read: most units are a page or two.
        let mut buf = vec![0u8; ((to + 1).saturating_sub(from) as usize).min(per_read) * rec];
        let mut next = from;
        while next <= to {
            let n = ((to - next + 1) as usize).min(per_read);
            let off = unit.frame_offset(next);
            let got = self.read_some(&mut buf[..n * rec], off)?;
            if got < n * rec {
                return Err(corrupt(off, "log ends inside a committed transaction"));
            }
            for i in 0..n {
                let r = &buf[i * rec..(i + 1) * rec];
                if r[0] != TAG_FRAME {
                    return Err(corrupt(off + (i * rec) as u64, "frame record expected"));
                }
                let fh = FrameHeader::decode(r[1..1 + FRAME_HEADER_LEN].try_into().unwrap());
                if fh.frame_no != next + i as u64 {
                    return Err(corrupt(off + (i * rec) as u64, format!("expected frame_no {}, found {}", next + i as u64, fh.frame_no)));
                }
                if !each(&fh, &r[1 + FRAME_HEADER_LEN..])? {
                    return Ok(());
                }
            }
            next += n as u64;
        }
        Ok(())
    }

    /// Calls `each` for every frame record from `from` (the offset of an F
    /// record) up to `end` (a unit boundary), in order, skipping commit and WAL
    /// event records, reading in chunks of about `CHUNK_BYTES`: units that lie
    /// next to each other cost one read, not one per unit. Stops at a generation
    /// record, or when `each` returns false. Returns the offset where it stopped.
    pub fn frames_in_range(
        &self,
        from: u64,
        end: u64,
        page_size: u32,
        mut each: impl FnMut(&FrameHeader, &[u8]) -> io::Result<bool>,
    ) -> io::Result<u64> {
        let rec = 1 + FRAME_HEADER_LEN + page_size as usize;
        let mut buf = vec![0u8; (crate::wire::CHUNK_BYTES + rec).min((end - from) as usize)];
        let mut off = from;
        while off < end {
            let want = buf.len().min((end - off) as usize);
            let got = self.read_some(&mut buf[..want], off)?;
            match walk_records(&buf[..got], off, rec, &mut each)? {
                Walked::Stopped(at) => return Ok(at),
                Walked::Through(0) => return Err(corrupt(off, "log ends inside a committed record")),
                Walked::Through(i) => off += i as u64,
            }
        }
        Ok(off)
    }

    /// `frames_in_range` for the units `next_unit` has just found since
    /// `forget_window`: their bytes are still in the read-ahead window (a
    /// live batch is a few pages), so they are not read a second time.
    pub fn frames_just_found(
        &self,
        from: u64,
        end: u64,
        page_size: u32,
        mut each: impl FnMut(&FrameHeader, &[u8]) -> io::Result<bool>,
    ) -> io::Result<u64> {
        let window_end = self.window_at + self.window_len as u64;
        if from < self.window_at || end > window_end {
            return self.frames_in_range(from, end, page_size, each);
        }
        let at = (from - self.window_at) as usize;
        let bytes = &self.window[at..at + (end - from) as usize];
        match walk_records(bytes, from, 1 + FRAME_HEADER_LEN + page_size as usize, &mut each)? {
            Walked::Stopped(stop) => Ok(stop),
            Walked::Through(i) if i == bytes.len() => Ok(end),
            Walked::Through(i) => Err(corrupt(from + i as u64, "log ends inside a committed record")),
        }
    }

    /// The header (without the page) of one frame of `unit`.
    pub fn frame_header(&self, unit: &Unit, frame_no: u64) -> io::Result<FrameHeader> {
        let mut head = [0u8; 1 + FRAME_HEADER_LEN];
        let off = unit.frame_offset(frame_no);
        if self.read_some(&mut head, off)? < head.len() || head[0] != TAG_FRAME {
            return Err(corrupt(off, "frame record expected"));
        }
        Ok(FrameHeader::decode(head[1..].try_into().unwrap()))
    }

    /// The unit boundary before the unit that ends at `at`: found by walking
    /// backwards over WAL event records, the unit's commit record and its
    /// frames (fixed-size records of `at`'s generation) to the previous
    /// unit's commit record. None where that cannot be told (a generation
    /// record, the first record, anything unexpected). Lets a restarted
    /// primary index the end of a long log without reading all of it.
    pub fn boundary_before(&self, at: &Pos) -> io::Result<Option<Pos>> {
        if at.page_size == 0 {
            return Ok(None);
        }
        let rec = 1 + FRAME_HEADER_LEN as u64 + at.page_size as u64;
        let Some((c_off, c)) = self.commit_ending_at(at.offset)? else { return Ok(None) };
        if c.last_frame_no != at.last_frame_no || c.checksum != at.last_checksum {
            return Ok(None);
        }
        let (mut off, mut expect) = (c_off, c.last_frame_no);
        let mut head = [0u8; 1 + FRAME_HEADER_LEN];
        while off >= RECORDS_START + rec && expect > 0 {
            if self.read_some(&mut head, off - rec)? < head.len() || head[0] != TAG_FRAME {
                break;
            }
            if FrameHeader::decode(head[1..].try_into().unwrap()).frame_no != expect {
                break;
            }
            off -= rec;
            expect -= 1;
        }
        let Some((p_off, p)) = self.commit_ending_at(off)? else { return Ok(None) };
        if p.last_frame_no != expect {
            return Ok(None);
        }
        Ok(Some(Pos {
            offset: p_off + COMMIT_LEN as u64,
            generation: at.generation,
            page_size: at.page_size,
            last_frame_no: p.last_frame_no,
            last_checksum: p.checksum,
            db_pages: p.size_after,
        }))
    }

    /// The commit record that ends at `end`, or before the WAL event records
    /// that end there, with its offset.
    fn commit_ending_at(&self, mut end: u64) -> io::Result<Option<(u64, CommitRecord)>> {
        loop {
            if end >= RECORDS_START + COMMIT_LEN as u64 {
                let mut b = [0u8; COMMIT_LEN];
                if self.read_some(&mut b, end - COMMIT_LEN as u64)? == COMMIT_LEN && b[0] == TAG_COMMIT {
                    if let Some(c) = CommitRecord::decode(&b) {
                        return Ok(Some((end - COMMIT_LEN as u64, c)));
                    }
                }
            }
            if end >= RECORDS_START + WAL_EVENT_LEN as u64 {
                let mut b = [0u8; WAL_EVENT_LEN];
                if self.read_some(&mut b, end - WAL_EVENT_LEN as u64)? == WAL_EVENT_LEN
                    && b[0] == TAG_WAL_EVENT
                    && log::WalEvent::decode(&b).is_some()
                {
                    end -= WAL_EVENT_LEN as u64;
                    continue;
                }
            }
            return Ok(None);
        }
    }

    /// Reads the page of the F record at `record_offset`.
    pub fn page_at(&self, record_offset: u64, page: &mut [u8]) -> io::Result<()> {
        let off = record_offset + 1 + FRAME_HEADER_LEN as u64;
        if self.read_some(page, off)? < page.len() {
            return Err(corrupt(off, "log ends inside a page"));
        }
        Ok(())
    }
}

/// How far `walk_records` went.
enum Walked {
    /// `each` asked to stop at the record at this log offset (or a new
    /// generation starts there).
    Stopped(u64),
    /// It went through this many bytes of whole records.
    Through(usize),
}

/// Calls `each` for every frame record in `buf`, which holds the log's bytes
/// from offset `off`, up to its last whole record.
fn walk_records(buf: &[u8], off: u64, rec: usize, each: &mut impl FnMut(&FrameHeader, &[u8]) -> io::Result<bool>) -> io::Result<Walked> {
    let mut i = 0;
    while i < buf.len() {
        let tag = buf[i];
        let len = match tag {
            TAG_FRAME => rec,
            TAG_COMMIT => COMMIT_LEN,
            TAG_WAL_EVENT => WAL_EVENT_LEN,
            TAG_GENERATION => return Ok(Walked::Stopped(off + i as u64)),
            t => return Err(corrupt(off + i as u64, format!("unknown record tag 0x{t:02x}"))),
        };
        if i + len > buf.len() {
            break; // the record continues past `buf`
        }
        if tag == TAG_FRAME {
            let fh = FrameHeader::decode(buf[i + 1..i + 1 + FRAME_HEADER_LEN].try_into().unwrap());
            if !each(&fh, &buf[i + 1 + FRAME_HEADER_LEN..i + len])? {
                return Ok(Walked::Stopped(off + i as u64));
            }
        }
        i += len;
    }
    Ok(Walked::Through(i))
}

/// One read of up to `buf.len()` bytes at `off` (retried only when
/// interrupted); 0 at the end of the file.
fn read_once_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    loop {
        match file.read_at(buf, off) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogWriter;

    /// A fresh log path in a directory of this test's own (removed by the test).
    fn scratch_log(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = crate::testutil::scratch_dir(name);
        let p = dir.join("t.log");
        (dir, p)
    }

    /// A log in a scratch directory holding one unit: a 512-byte generation
    /// and frame 1 (page 1), committed; its writer stays open for more.
    fn log_of_one_unit(name: &str, db_id: u8) -> (std::path::PathBuf, std::path::PathBuf, LogWriter) {
        let (dir, p) = scratch_log(name);
        let mut w = LogWriter::create(&p, [db_id; 16]).unwrap();
        w.begin_generation(512, "test").unwrap();
        w.add_frame(1, 1, &[1; 512]).unwrap();
        w.commit(1, None).unwrap();
        (dir, p, w)
    }

    #[test]
    fn follows_units_and_ignores_an_unfinished_one() {
        let (dir, p) = scratch_log("tailtest");
        let mut w = LogWriter::create(&p, [3; 16]).unwrap();
        w.begin_generation(512, "test").unwrap();
        w.add_frame(1, 0, &[1; 512]).unwrap();
        w.add_frame(2, 2, &[2; 512]).unwrap();
        w.commit(2, None).unwrap();
        let mut t = LogTail::open(&p, true).unwrap();
        let u = t.next_unit().unwrap().unwrap();
        assert!(u.gen_start);
        assert_eq!((u.first_frame_no, u.commit.last_frame_no, u.generation), (1, 2, 1));
        assert!(t.next_unit().unwrap().is_none());
        w.begin_batch();
        w.add_frame(2, 0, &[3; 512]).unwrap();
        w.add_frame(3, 3, &[4; 512]).unwrap();
        // Written but not committed: not a unit yet.
        assert!(t.next_unit().unwrap().is_none());
        w.commit(3, None).unwrap();
        let u2 = t.next_unit().unwrap().unwrap();
        assert!(!u2.gen_start);
        assert_eq!(u2.prev_checksum, u.commit.checksum);
        let mut seen = vec![];
        t.read_frames(&u2, 4, 4, |h, pg| {
            seen.push((h.frame_no, h.page_no, pg[0]));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(4, 3, 4)]);
        assert_eq!(t.frame_header(&u2, 3).unwrap().page_no, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The live batch is walked from what `next_unit` read (one read of the
    /// log per look, plus one at its end), and gives what a read of the file
    /// gives; a look that finds nothing new keeps those bytes.
    #[test]
    fn units_just_found_are_walked_without_reading_the_log_again() {
        let (dir, p, mut w) = log_of_one_unit("tailtest4", 6);
        let mut t = LogTail::open(&p, true).unwrap();
        assert!(t.next_unit().unwrap().is_some());
        assert!(t.next_unit().unwrap().is_none());
        w.begin_batch();
        w.add_frame(2, 0, &[2; 512]).unwrap();
        w.add_frame(3, 3, &[3; 512]).unwrap();
        w.commit(3, None).unwrap();
        t.forget_window();
        let u = t.next_unit().unwrap().unwrap();
        assert!(t.next_unit().unwrap().is_none(), "the end: nothing new");
        let walk = |from_window: bool| {
            let mut seen = vec![];
            let each = |h: &FrameHeader, pg: &[u8]| {
                seen.push((h.frame_no, h.page_no, pg[0]));
                Ok(true)
            };
            let end = if from_window {
                t.frames_just_found(u.frames_offset, u.end, u.page_size, each)
            } else {
                t.frames_in_range(u.frames_offset, u.end, u.page_size, each)
            };
            assert_eq!(end.unwrap(), u.end);
            seen
        };
        let expected = vec![(2, 2, 2), (3, 3, 3)];
        assert_eq!(walk(false), expected);
        assert_eq!(walk(true), expected);
        // Proof that the window served it: the file's bytes there now differ.
        let mut b = std::fs::read(&p).unwrap();
        let at = u.frames_offset as usize + 1 + FRAME_HEADER_LEN;
        b[at] = 0xee;
        std::fs::write(&p, &b).unwrap();
        assert_eq!(walk(true), expected);
        assert_eq!(walk(false)[0], (2, 2, 0xee));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The read-ahead buffers keep their length: bytes past what the last
    /// read returned (an earlier read's, or zeros) are never taken as the
    /// log's, as when a batch was dropped and a shorter one written instead.
    #[test]
    fn bytes_left_in_the_buffer_past_a_shorter_read_are_not_the_log() {
        let (dir_a, pa, mut wa) = log_of_one_unit("tailwin_a", 7);
        let (dir_b, pb, mut wb) = log_of_one_unit("tailwin_b", 7);
        wb.begin_batch();
        for page in 2..=9u32 {
            wb.add_frame(page, if page == 9 { 9 } else { 0 }, &[0xab; 512]).unwrap();
        }
        wb.commit(9, None).unwrap();
        wa.begin_batch();
        wa.add_frame(2, 2, &[0xcd; 512]).unwrap();
        wa.commit(2, None).unwrap();
        let mut t = LogTail::open(&pb, true).unwrap();
        assert!(t.next_unit().unwrap().is_some());
        let after_first = t.pos;
        assert_eq!(t.next_unit().unwrap().unwrap().frame_count(), 8);
        assert!(t.next_unit().unwrap().is_none());
        // The big batch is replaced by a one-frame unit, in the same file.
        std::fs::write(&pb, std::fs::read(&pa).unwrap()).unwrap();
        t.pos = after_first;
        t.forget_window();
        let u = t.next_unit().unwrap().unwrap();
        assert_eq!((u.frame_count(), u.commit.last_frame_no), (1, 2));
        assert!(t.next_unit().unwrap().is_none(), "the end of the log, not what the buffer held before");
        let mut seen = vec![];
        t.frames_just_found(u.frames_offset, u.end, u.page_size, |h, pg| {
            seen.push((h.page_no, pg[0]));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(2, 0xcd)]);
        let _ = std::fs::remove_dir_all(&dir_a);
        let _ = std::fs::remove_dir_all(&dir_b);
    }

    /// Found by the log_tail fuzz target: a header (CRC intact) naming a
    /// durable end past the file's end made the reader start there; near
    /// u64::MAX its offsets overflowed.
    #[test]
    fn a_header_past_the_end_of_the_file_is_damage() {
        let (dir, p, mut w) = log_of_one_unit("tailtest3", 5);
        w.sync().unwrap();
        assert!(LogTail::open(&p, false).is_ok());
        let mut b = std::fs::read(&p).unwrap();
        for slot in [0, 256] {
            b[slot + 56..slot + 64].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
            let c = log::crc(&b[slot..slot + 248]);
            b[slot + 248..slot + 256].copy_from_slice(&c.to_le_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        let e = LogTail::open(&p, false).err().expect("a header past the file's end is refused");
        assert!(e.to_string().contains("durable bytes"), "{e}");
        assert!(LogTail::open(&p, true).is_ok(), "reading from the first record does not use the header's end");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Found by the log_tail fuzz target: a commit record (CRC intact) naming
    /// frame_no u64::MAX overflowed `last_frame_no + 1` (a panic under `cargo
    /// test` and in fuzz builds, which check overflow; release builds wrapped).
    #[test]
    fn a_commit_record_at_the_last_frame_no_is_damage() {
        let (dir, p, _w) = log_of_one_unit("tailtest2", 4);
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() - COMMIT_LEN;
        b[at + 1..at + 9].copy_from_slice(&u64::MAX.to_le_bytes());
        let c = log::crc(&b[at..at + 53]);
        b[at + 53..at + 61].copy_from_slice(&c.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let e = LogTail::open(&p, true).unwrap().next_unit().unwrap_err();
        assert!(e.to_string().contains("does not close its frames"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
