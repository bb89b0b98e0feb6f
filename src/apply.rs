//! Applying verified transactions to a replica beneath unmodified SQLite readers.
//!
//! The applier behaves exactly like a SQLite writer connection (see
//! `../shared/reference/sqlite-wal.md`): it takes the WAL write lock through the
//! VFS's shm primitives, restarts the WAL when a checkpoint has backfilled all of
//! it and no reader uses it, appends frames with SQLite's salts and checksums,
//! indexes each in the wal-index hash tables, and publishes the transaction by
//! writing the wal-index header (copy 2, barrier, copy 1). Readers that started
//! before keep their snapshot; readers that start after see the whole
//! transaction. Nothing is visible before `commit`, so a transaction whose frames
//! do not all arrive and verify is never seen.

use crate::wal::{wal_checksum, WalHeader, WAL_FRAME_HEADER_LEN, WAL_HEADER_LEN};
use crate::walindex::{self, IndexHeader, Shm};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// shm lock slots, as SQLite numbers them.
pub const WRITE_LOCK: u32 = 0;
pub const READ_LOCK_1: u32 = 4;

/// The shm lock primitives of a file handle of the applier's own.
pub trait ShmLocks: Shm {
    /// Tries to take `n` lock slots from `slot`, without waiting. Ok(false): busy.
    fn try_lock(&mut self, slot: u32, n: u32, exclusive: bool) -> io::Result<bool>;
    fn unlock(&mut self, slot: u32, n: u32, exclusive: bool);
}

#[derive(Debug)]
pub enum ApplyError {
    /// Another connection holds the write lock (a checkpoint or a recovering
    /// reader): try again shortly.
    Busy,
    /// The wal-index has no valid header: a SQLite reader must rebuild it.
    NeedsRecovery,
    /// The WAL changed beneath the applier: something other than walcast wrote.
    ForeignWrite(String),
    Io(io::Error),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Busy => f.write_str("the WAL write lock is busy"),
            ApplyError::NeedsRecovery => f.write_str("the wal-index needs recovery"),
            ApplyError::ForeignWrite(w) => write!(f, "the replica was written without walcast: {w}"),
            ApplyError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for ApplyError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::WouldBlock {
            return ApplyError::Busy;
        }
        ApplyError::Io(e)
    }
}

/// What the applier last committed, to notice writes made behind its back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Committed {
    salt: (u32, u32),
    mx_frame: u32,
    frame_cksum: (u32, u32),
}

struct Txn {
    /// The header as last published (before the first transaction, or at the
    /// last `publish`).
    base: IndexHeader,
    /// The header being built.
    hdr: IndexHeader,
    /// WAL frames appended so far beyond `base.mx_frame`.
    frames: u32,
    running: (u32, u32),
    /// The last transaction end among them: (frames, checksum, database pages).
    commit_point: Option<(u32, (u32, u32), u32)>,
    buf: Vec<u8>,
    buf_offset: u64,
    /// A write of this transaction's frames failed: it must not publish, since
    /// frames it would make visible may not be in the file.
    write_failed: bool,
}

pub struct WalAppender<S: ShmLocks> {
    pub shm: S,
    wal: File,
    page_size: u32,
    txn: Option<Txn>,
    last: Option<Committed>,
    /// The salt-2 source for restarts (any value that differs per restart).
    salt_seed: u32,
    /// Writes the frames of a big transaction while the applier goes on;
    /// started at the first one.
    writer: Option<WalWriter>,
}

/// Bytes of frames buffered before a write to the WAL file.
const FLUSH_AT: usize = 256 << 10;
/// Buffers of `FLUSH_AT` bytes handed to the WAL writer and not written yet.
const WRITES_IN_FLIGHT: usize = 2;

/// A thread that writes buffers of frames to the WAL, so that copying them
/// into the page cache (for a snapshot, a gigabyte; on a VM, first touches of
/// memory that cost more than the copy itself) runs beside the applier's
/// receiving, verifying and indexing rather than after it. Only writes made
/// before a transaction's end go here: the end is written on the applier's
/// thread once these are done, so a small transaction pays no handoff.
struct WalWriter {
    to_write: crossbeam_channel::Sender<(Vec<u8>, u64)>,
    /// Each buffer back once written (to be filled again), or the write's error.
    written: crossbeam_channel::Receiver<(Vec<u8>, io::Result<()>)>,
    in_flight: usize,
    spare: Vec<Vec<u8>>,
}

impl WalWriter {
    fn start(wal: &File) -> io::Result<WalWriter> {
        let wal = wal.try_clone()?;
        let (to_write, jobs) = crossbeam_channel::bounded::<(Vec<u8>, u64)>(WRITES_IN_FLIGHT);
        let (done, written) = crossbeam_channel::bounded(WRITES_IN_FLIGHT);
        std::thread::Builder::new().name("walcast-walwrite".into()).spawn(move || {
            // Ends when the appender drops its sender.
            for (buf, offset) in jobs {
                let r = wal.write_all_at(&buf, offset);
                if done.send((buf, r)).is_err() {
                    return;
                }
            }
        })?;
        Ok(WalWriter { to_write, written, in_flight: 0, spare: vec![] })
    }

    /// Hands `buf` over to be written at `offset`; returns an empty buffer to
    /// fill next. Waits while WRITES_IN_FLIGHT are not written yet.
    fn write(&mut self, buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        while self.in_flight >= WRITES_IN_FLIGHT {
            self.wait_one()?;
        }
        self.to_write.send((buf, offset)).map_err(|_| io::Error::other("the WAL writer thread is gone"))?;
        self.in_flight += 1;
        Ok(self.spare.pop().unwrap_or_default())
    }

    fn wait_one(&mut self) -> io::Result<()> {
        let (mut buf, r) = self.written.recv().map_err(|_| io::Error::other("the WAL writer thread is gone"))?;
        self.in_flight -= 1;
        buf.clear();
        self.spare.push(buf);
        r
    }

    /// Waits until every buffer handed over is written: the first error, if any.
    fn wait_all(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        while self.in_flight > 0 {
            if let Err(e) = self.wait_one() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl<S: ShmLocks> WalAppender<S> {
    pub fn new(shm: S, wal: File, page_size: u32) -> Self {
        let seed = crate::conf::random_id().map(|b| u32::from_le_bytes(b[0..4].try_into().unwrap())).unwrap_or(0x9e37_79b9);
        WalAppender { shm, wal, page_size, txn: None, last: None, salt_seed: seed, writer: None }
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn in_txn(&self) -> bool {
        self.txn.is_some()
    }

    /// The committed wal-index header, if valid.
    pub fn header(&mut self) -> io::Result<Option<IndexHeader>> {
        let r0 = self.shm.region(0)?;
        for _ in 0..100 {
            if let Some(h) = walindex::read_header(&r0) {
                return Ok(Some(h));
            }
            std::hint::spin_loop();
        }
        Ok(None)
    }

    /// Frames in the WAL not yet copied into the database file.
    pub fn unbackfilled(&mut self) -> io::Result<u32> {
        let Some(h) = self.header()? else { return Ok(0) };
        let r0 = self.shm.region(0)?;
        Ok(h.mx_frame.saturating_sub(walindex::n_backfill(&r0)))
    }

    /// Starts a transaction: takes the WAL write lock and restarts the WAL if
    /// SQLite's writer would.
    pub fn begin(&mut self) -> Result<(), ApplyError> {
        assert!(self.txn.is_none());
        if !self.shm.try_lock(WRITE_LOCK, 1, true)? {
            return Err(ApplyError::Busy);
        }
        match self.begin_locked() {
            Ok(t) => {
                self.txn = Some(t);
                Ok(())
            }
            Err(e) => {
                self.shm.unlock(WRITE_LOCK, 1, true);
                Err(e)
            }
        }
    }

    fn begin_locked(&mut self) -> Result<Txn, ApplyError> {
        let Some(mut hdr) = self.header()? else { return Err(ApplyError::NeedsRecovery) };
        if hdr.mx_frame > 0 && hdr.page_size != self.page_size {
            return Err(ApplyError::ForeignWrite(format!("the WAL has {}-byte pages, the replica {}", hdr.page_size, self.page_size)));
        }
        if let Some(l) = self.last {
            let now = Committed { salt: hdr.salt, mx_frame: hdr.mx_frame, frame_cksum: hdr.frame_cksum };
            // A checkpoint that restarted the WAL (TRUNCATE, RESTART) leaves no
            // frames and the next salts; anything else is someone else's write.
            let restarted = hdr.mx_frame == 0 && hdr.salt.0 == l.salt.0.wrapping_add(1);
            if now != l && !restarted {
                return Err(ApplyError::ForeignWrite(format!(
                    "the WAL's last commit moved from frame {} to frame {} since walcast's last transaction",
                    l.mx_frame, hdr.mx_frame
                )));
            }
        }
        let mut wal_header = None;
        // walRestartLog: once a checkpoint copied every frame and no reader uses
        // the WAL, start it over instead of letting it grow.
        let restart = hdr.mx_frame > 0 && walindex::n_backfill(&self.shm.region(0)?) == hdr.mx_frame;
        if restart && self.shm.try_lock(READ_LOCK_1, 4, true)? {
            self.salt_seed = self.salt_seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let seed = self.salt_seed;
            walindex::restart_header(&self.shm.region(0)?, &mut hdr, seed);
            self.shm.unlock(READ_LOCK_1, 4, true);
        }
        if hdr.mx_frame == 0 {
            // A new WAL header at offset 0, as walFrames writes for the first frame.
            let mut old = [0u8; WAL_HEADER_LEN];
            let n = self.wal.read_at(&mut old, 0).unwrap_or(0);
            let old = if n == WAL_HEADER_LEN { WalHeader::parse(&old) } else { None };
            let ckpt_seq = old.map_or(0, |o| o.ckpt_seq.wrapping_add(1));
            // The salts must differ from the old header's, so that none of its
            // frames can pass as part of the new WAL.
            let salt1 = match old {
                Some(o) if o.salt1 == hdr.salt.0 => hdr.salt.0.wrapping_add(1),
                _ if hdr.salt == (0, 0) => self.salt_seed | 1,
                _ => hdr.salt.0,
            };
            self.salt_seed = self.salt_seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            hdr.salt = (salt1, self.salt_seed);
            let big = cfg!(target_endian = "big");
            let mut b = [0u8; WAL_HEADER_LEN];
            b[0..4].copy_from_slice(&(0x377f_0682u32 | big as u32).to_be_bytes());
            b[4..8].copy_from_slice(&3_007_000u32.to_be_bytes());
            b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
            b[12..16].copy_from_slice(&ckpt_seq.to_be_bytes());
            b[16..20].copy_from_slice(&hdr.salt.0.to_be_bytes());
            b[20..24].copy_from_slice(&hdr.salt.1.to_be_bytes());
            let ck = wal_checksum(big, &b[0..24], (0, 0));
            b[24..28].copy_from_slice(&ck.0.to_be_bytes());
            b[28..32].copy_from_slice(&ck.1.to_be_bytes());
            hdr.big_end_cksum = big;
            hdr.frame_cksum = ck;
            hdr.page_size = self.page_size;
            wal_header = Some(b);
        }
        let base = hdr;
        let mut t =
            Txn { base, hdr, frames: 0, running: hdr.frame_cksum, commit_point: None, buf: Vec::new(), buf_offset: 0, write_failed: false };
        t.buf_offset = WAL_HEADER_LEN as u64 + base.mx_frame as u64 * (WAL_FRAME_HEADER_LEN as u64 + self.page_size as u64);
        if let Some(b) = wal_header {
            self.wal.write_all_at(&b, 0)?;
        }
        Ok(t)
    }

    /// Appends one frame; `commit_size` is the database size in pages on a
    /// transaction's last frame, 0 otherwise. Several transactions may be
    /// appended between `begin` and `commit`.
    pub fn append(&mut self, page_no: u32, page: &[u8], commit_size: u32) -> Result<(), ApplyError> {
        let ps = self.page_size as usize;
        let t = self.txn.as_mut().expect("append outside a transaction");
        assert_eq!(page.len(), ps);
        let mut fh = [0u8; WAL_FRAME_HEADER_LEN];
        fh[0..4].copy_from_slice(&page_no.to_be_bytes());
        fh[4..8].copy_from_slice(&commit_size.to_be_bytes());
        fh[8..12].copy_from_slice(&t.hdr.salt.0.to_be_bytes());
        fh[12..16].copy_from_slice(&t.hdr.salt.1.to_be_bytes());
        let big = t.hdr.big_end_cksum;
        let ck = wal_checksum(big, &fh[0..8], t.running);
        let ck = wal_checksum(big, page, ck);
        fh[16..20].copy_from_slice(&ck.0.to_be_bytes());
        fh[20..24].copy_from_slice(&ck.1.to_be_bytes());
        t.running = ck;
        t.buf.extend_from_slice(&fh);
        t.buf.extend_from_slice(page);
        t.frames += 1;
        if commit_size != 0 {
            t.commit_point = Some((t.frames, ck, commit_size));
        }
        let frame = t.base.mx_frame + t.frames;
        let base_mx = t.base.mx_frame;
        if t.buf.len() >= FLUSH_AT {
            if let Err(e) = self.write_behind() {
                self.txn.as_mut().unwrap().write_failed = true;
                return Err(e.into());
            }
        }
        walindex::append(&mut self.shm, base_mx, frame, page_no)?;
        Ok(())
    }

    /// Hands the buffered frames to the WAL writer thread.
    fn write_behind(&mut self) -> io::Result<()> {
        if self.writer.is_none() {
            self.writer = Some(WalWriter::start(&self.wal)?);
        }
        let t = self.txn.as_mut().unwrap();
        let w = self.writer.as_mut().unwrap();
        let len = t.buf.len() as u64;
        let next = w.write(std::mem::take(&mut t.buf), t.buf_offset)?;
        t.buf = next;
        t.buf_offset += len;
        Ok(())
    }

    /// Writes every frame appended so far: waits for the writer thread, then
    /// writes the rest here.
    fn flush(&mut self) -> io::Result<()> {
        let waited = self.writer.as_mut().map_or(Ok(()), |w| w.wait_all());
        let t = self.txn.as_mut().unwrap();
        if waited.is_err() || t.write_failed {
            t.write_failed = true;
            return Err(waited.err().unwrap_or_else(|| io::Error::other("an earlier write of the transaction's frames failed")));
        }
        if !t.buf.is_empty() {
            self.wal.write_all_at(&t.buf, t.buf_offset)?;
            t.buf_offset += t.buf.len() as u64;
            t.buf.clear();
        }
        Ok(())
    }

    /// Makes every transaction appended in full visible to readers that start
    /// from now on, keeping the write lock (a transaction still arriving goes on
    /// after them). One header write for any number of transactions.
    pub fn publish(&mut self) -> Result<(), ApplyError> {
        if let Err(e) = self.flush() {
            self.abort();
            return Err(e.into());
        }
        let t = self.txn.as_mut().expect("publish outside a transaction");
        let Some((k, cksum, pages)) = t.commit_point.take() else { return Ok(()) };
        let mut h = t.hdr;
        h.mx_frame = t.base.mx_frame + k;
        h.n_page = pages;
        h.change = t.base.change.wrapping_add(1);
        h.frame_cksum = cksum;
        h.is_init = true;
        t.base = h;
        t.frames -= k;
        walindex::write_header(&self.shm.region(0)?, &h);
        self.last = Some(Committed { salt: h.salt, mx_frame: h.mx_frame, frame_cksum: h.frame_cksum });
        Ok(())
    }

    /// Publishes what is complete and releases the write lock; frames of a
    /// transaction not yet complete are dropped.
    pub fn commit(&mut self) -> Result<(), ApplyError> {
        self.publish()?;
        self.abort();
        Ok(())
    }

    /// Drops the transaction in progress: its frames lie past the committed end
    /// of the WAL, where no reader looks, and the next transaction overwrites them.
    pub fn abort(&mut self) {
        // A write still in flight must not land after the lock is released,
        // on frames of the next transaction.
        if let Some(w) = &mut self.writer {
            let _ = w.wait_all();
        }
        if self.txn.take().is_some() {
            self.shm.unlock(WRITE_LOCK, 1, true);
        }
    }

    /// Forgets what the applier last committed (after a legitimate outside
    /// change, such as a bootstrap that rebuilt the database).
    pub fn forget_last(&mut self) {
        self.last = None;
    }

    pub fn sync_wal(&self) -> io::Result<()> {
        self.wal.sync_data()
    }
}

impl<S: ShmLocks> Drop for WalAppender<S> {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walindex::tests::MemShm;

    /// Locks that are always free.
    impl ShmLocks for MemShm {
        fn try_lock(&mut self, _: u32, _: u32, _: bool) -> io::Result<bool> {
            Ok(true)
        }
        fn unlock(&mut self, _: u32, _: u32, _: bool) {}
    }

    /// A big transaction whose frames the writer thread fails to write
    /// (/dev/full) is never published, though it completes.
    #[test]
    fn a_failed_write_behind_publishes_nothing() {
        let mut shm = MemShm::default();
        let h = IndexHeader {
            change: 1,
            is_init: true,
            big_end_cksum: false,
            page_size: 4096,
            mx_frame: 3,
            n_page: 3,
            frame_cksum: (1, 2),
            salt: (3, 4),
        };
        walindex::write_header(&shm.region(0).unwrap(), &h);
        let wal = std::fs::OpenOptions::new().write(true).read(true).open("/dev/full").unwrap();
        let mut app = WalAppender::new(shm, wal, 4096);
        app.begin().unwrap();
        let page = [7u8; 4096];
        let mut failed = false;
        for n in 1..=200u32 {
            if app.append(n, &page, if n % 50 == 0 { n } else { 0 }).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || app.commit().is_err(), "a failed write must surface");
        if failed {
            assert!(app.commit().is_err(), "and the transaction must not publish");
        }
        assert!(!app.in_txn());
        assert_eq!(app.header().unwrap().unwrap().mx_frame, 3, "nothing was published");
    }
}
