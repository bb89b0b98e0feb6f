//! Capture: keeps the replication log in step with the database's WAL.
//!
//! The log follows the WAL. Its cursor (`WalCursor`) says up to which WAL frame
//! it holds every committed transaction; catching up appends each later commit
//! as one batch. Any walcast process can catch up (the log's lock makes it one at
//! a time, and the cursor makes it idempotent), so the log's order is the WAL's
//! order whichever process committed.
//!
//! When the log cannot be proven to follow from where it stands (its WAL was
//! restarted or removed without walcast, the database file changed while no WAL
//! was open, the page size changed, or the log is new), capture starts a new
//! generation: a base image of the whole database, then transactions again.
//!
//! Memory stays bounded by the database size, not the transaction size: a
//! transaction is read back from the WAL in three streaming passes (validate,
//! find each page's last version, copy), with one bit per page and per frame.

use crate::claim::{ClaimFile, ClaimState, WalMark};
use crate::log::{DbStat, LogError, LogWriter, WalCursor, WalEvent};
use crate::wal::{KeptWal, WalCommit, WalFile, WalPos};
use std::fmt;
use std::io;
use std::path::Path;

/// Reads the database file. Implemented over a VFS handle in production, so that
/// reading never disturbs SQLite's POSIX locks.
pub trait DbReader {
    /// Reads `buf.len()` bytes at `off`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
}

#[derive(Debug)]
pub enum CaptureError {
    /// A base image needs the WAL write lock and a writer holds it: try again.
    Busy,
    Log(LogError),
    Io(io::Error),
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            CaptureError::Busy => write!(f, "database busy: a writer holds the WAL write lock"),
            CaptureError::Log(e) => write!(f, "{e}"),
            CaptureError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<LogError> for CaptureError {
    fn from(e: LogError) -> Self {
        CaptureError::Log(e)
    }
}
impl From<io::Error> for CaptureError {
    fn from(e: io::Error) -> Self {
        CaptureError::Io(e)
    }
}

/// What a catch-up did.
#[derive(Debug, Default, Clone)]
pub struct CatchUp {
    pub transactions: u64,
    pub frames: u64,
    /// Why a new generation was started, if one was.
    pub new_generation: Option<String>,
}

/// How a base image may be taken.
pub enum Imaging<'a> {
    /// The caller already excludes writers (SQLite's thread inside a WAL hook,
    /// holding the write lock or an exclusive lock).
    WritersExcluded(&'a dyn DbReader),
    /// The caller holds no SQLite lock: `lock` must take the WAL write lock without
    /// waiting (Ok(false) = busy), `committed` then read what the wal-index says
    /// is committed, and `unlock` release the lock.
    TakeWriteLock {
        db: &'a dyn DbReader,
        lock: &'a mut dyn FnMut() -> io::Result<bool>,
        committed: &'a mut dyn FnMut() -> Committed,
        unlock: &'a mut dyn FnMut(),
    },
}

impl Imaging<'_> {
    fn db(&self) -> &dyn DbReader {
        match self {
            Imaging::WritersExcluded(db) => *db,
            Imaging::TakeWriteLock { db, .. } => *db,
        }
    }
}

pub struct Paths<'a> {
    pub db: &'a Path,
    pub wal: &'a Path,
    pub committed: Committed,
    /// The WAL file kept open between passes (None: opened each time).
    pub kept_wal: Option<&'a KeptWal>,
}

/// What says which frames of the WAL file are committed. A commit frame in the
/// file past the committed ones was written by a writer that has not committed
/// yet, or that died before it could update the wal-index: SQLite will
/// overwrite it, so capture must not take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Nothing: trust the file, as SQLite's recovery does when no process has
    /// the wal-index open.
    Unknown,
    /// The wal-index: frames up to this one of the WAL with these salts. When
    /// the WAL file has other salts, the wal-index has moved on to a new WAL,
    /// which SQLite does only once the old one is checkpointed completely.
    WalIndex(WalMark),
    /// The WAL was just checkpointed completely (closing): what the database
    /// file holds says which commits were counted.
    Checkpointed,
}

impl Paths<'_> {
    fn open_wal(&self) -> io::Result<Option<WalFile>> {
        match self.kept_wal {
            Some(k) => k.open(self.wal),
            None => WalFile::open(self.wal),
        }
    }

    /// The last frame of `w` that may be captured (None: any). `from` is where
    /// the log stands in `w`, when it does.
    fn limit(&self, w: &WalFile, from: Option<WalPos>, db: &dyn DbReader) -> io::Result<Option<u32>> {
        match self.committed {
            Committed::Unknown => Ok(None),
            Committed::WalIndex(m) if (m.salt1, m.salt2) == (w.header.salt1, w.header.salt2) => Ok(Some(m.frame)),
            Committed::WalIndex(_) | Committed::Checkpointed => last_checkpointed_commit(w, from.unwrap_or(w.start()), db).map(Some),
        }
    }
}

/// The claims of walcast writers (see `claim.rs`); None where nothing claims
/// (unit tests of the log-following logic alone).
pub type Claims<'a> = Option<&'a ClaimFile>;

fn read_claims(claims: Claims) -> Option<ClaimState> {
    claims.map(ClaimFile::read)
}

/// Brings the log up to the last transaction committed in the WAL. The caller
/// holds the log's lock. The transactions a pass copies reach the file in one
/// write at its end.
pub fn catch_up(log: &mut LogWriter, paths: &Paths, imaging: Imaging, claims: Claims) -> Result<CatchUp, CaptureError> {
    let r = catch_up_in_memory(log, paths, imaging, claims);
    // What was copied before an error is as good as before it: write it too.
    let flushed = log.flush();
    let out = r?;
    flushed?;
    Ok(out)
}

fn catch_up_in_memory(log: &mut LogWriter, paths: &Paths, imaging: Imaging, claims: Claims) -> Result<CatchUp, CaptureError> {
    log.refresh()?;
    let mut out = CatchUp::default();
    let wal = paths.open_wal()?;
    // Before the first read: reading ahead past what is committed reads frames
    // being written, or left over from before a restart (up to 1 MiB a pass).
    if let (Some(w), Committed::WalIndex(m)) = (&wal, paths.committed) {
        if (m.salt1, m.salt2) == (w.header.salt1, w.header.salt2) {
            w.limit_read_ahead(m.frame);
        }
    }
    let claim_state = read_claims(claims);
    // A WAL change walcast announced before a crash: what the WAL file holds
    // now says whether it happened.
    let cursor = match (log.state.cursor, &wal) {
        (WalCursor::Switching { to, .. }, Some(w)) if w.contains(&to)? => WalCursor::InWal(to),
        (WalCursor::Switching { from, .. }, _) => WalCursor::InWal(from),
        (WalCursor::Ending { from, .. }, Some(w)) if w.contains(&from)? => WalCursor::InWal(from),
        (WalCursor::Ending { stat, .. }, None) => WalCursor::Ended(stat),
        (WalCursor::Ending { from, .. }, Some(_)) => WalCursor::InWal(from),
        (WalCursor::Starting { to, .. }, Some(w)) if w.contains(&to)? => WalCursor::InWal(to),
        (WalCursor::Starting { stat, .. }, _) => WalCursor::Ended(stat),
        (c, _) => c,
    };
    log.state.cursor = cursor;
    let mut problem = match (cursor, &wal) {
        (WalCursor::Switching { .. } | WalCursor::Ending { .. } | WalCursor::Starting { .. }, _) => unreachable!("resolved above"),
        (WalCursor::Unknown, _) => Some(if log.state.generation == log.id.base_generation && log.id.base_generation != 0 {
            format!(
                "promoted from a replica that had applied up to frame_no {}: term {} starts with a base image",
                log.id.first_frame_no - 1,
                crate::log::term_of(log.id.base_generation)
            )
        } else if log.state.generation == 0 {
            "replication started: base image of the database".to_string()
        } else {
            "the log records no WAL position to continue from".to_string()
        }),
        (WalCursor::InWal(pos), Some(w)) => {
            if !w.contains(&pos)? {
                Some(format!(
                    "the WAL was restarted or rewritten without walcast (expected salts {:08x}/{:08x} with frame {}; found salts {:08x}/{:08x})",
                    pos.salt1, pos.salt2, pos.frame, w.header.salt1, w.header.salt2
                ))
            } else if w.header.page_size != log.state.page_size {
                Some(format!("page size changed from {} to {}", log.state.page_size, w.header.page_size))
            } else {
                None
            }
        }
        (WalCursor::InWal(_), None) => Some("the WAL was removed without walcast".to_string()),
        (WalCursor::Ended(stat), w) => {
            let now = DbStat::of(paths.db)?;
            if now != stat {
                Some("the database file changed while its WAL was closed (a write without walcast)".to_string())
            } else {
                w.as_ref().map(|w| format!("a WAL (salts {:08x}/{:08x}) was started without walcast", w.header.salt1, w.header.salt2))
            }
        }
    };
    if problem.is_none() {
        if let Some(cs) = claim_state.filter(|c| c.unhandled_foreign()) {
            problem = Some(format!(
                "a process without walcast wrote to the database (WAL frames up to {} of salts {:08x}/{:08x})",
                cs.foreign.frame, cs.foreign.salt1, cs.foreign.salt2
            ));
        }
    }
    if problem.is_none() {
        if let (WalCursor::InWal(pos), Some(w)) = (log.state.cursor, &wal) {
            let limit = paths.limit(w, Some(pos), imaging.db())?;
            if let Some(l) = limit {
                w.limit_read_ahead(l);
            }
            problem = append_commits(log, w, pos, limit, claims, claim_state, &mut out)?;
        }
    }
    if let Some(reason) = problem {
        new_generation(log, paths, wal.as_ref(), imaging, claims, &reason)?;
        out.new_generation = Some(reason);
    }
    Ok(out)
}

/// Appends every commit in `w` after `pos`. Returns why a new generation is
/// needed instead, when a commit was not written by walcast.
fn append_commits(
    log: &mut LogWriter,
    w: &WalFile,
    mut pos: WalPos,
    limit: Option<u32>,
    claims: Claims,
    mut claim_state: Option<ClaimState>,
    out: &mut CatchUp,
) -> Result<Option<String>, CaptureError> {
    let mut page = vec![0u8; w.page_size()];
    let mut scratch = Vec::new();
    // Small transactions are copied checking each frame read against its
    // header; whether the WAL was restarted under them is checked once, at the
    // end, for all of them (salts never come back).
    let mut unchecked = false;
    // Consecutive small commits are merged into one log transaction (see
    // `append_small_transaction`).
    let mut group = Group::default();
    let fsz = w.frame_size();
    let small_frames = (SMALL_TRANSACTION / fsz) as u32;
    let foreign = loop {
        // Up to what the wal-index says is committed, frames are trusted as
        // SQLite's readers trust them, and read only once known to be kept.
        let found = match limit {
            Some(l) => w.next_indexed_commit(&pos, l, &mut group.page_nos, small_frames)?,
            // Without it, each frame is verified (checksum chain) first.
            None => {
                let c = w.next_commit(&pos, &mut scratch)?;
                if let Some(c) = c.filter(|c| c.commit - c.first < small_frames) {
                    for f in c.first..=c.commit {
                        group.page_nos.push(w.read_frame_header(f)?.page_no);
                    }
                }
                c
            }
        };
        let Some(c) = found else { break None };
        if let Some(cs) = claim_state {
            let (s1, s2) = (w.header.salt1, w.header.salt2);
            if !cs.covers(s1, s2, c.commit) {
                // Writers claim a commit before writing it, so a claim read now
                // is complete for every commit already in the WAL.
                claim_state = read_claims(claims);
                if !claim_state.is_some_and(|cs| cs.covers(s1, s2, c.commit)) {
                    break Some(format!(
                        "a process without walcast wrote to the database (the transaction in WAL frames {}..{})",
                        c.first, c.commit
                    ));
                }
            }
        }
        out.transactions += 1;
        let before = std::mem::replace(&mut pos, c.end);
        if c.commit - c.first < small_frames {
            if group.commit.is_some_and(|g| c.commit - g.first >= small_frames) {
                // Too big together: the group so far goes first.
                let new_part = group.page_nos.split_off(group.frames());
                out.frames += group.append(log, w)?;
                group.page_nos = new_part;
                unchecked = true;
            }
            group.commit = Some(WalCommit { first: group.commit.map_or(c.first, |g| g.first), ..c });
            continue;
        }
        if group.commit.is_some() {
            out.frames += group.append(log, w)?;
            unchecked = true;
        }
        if unchecked {
            // A large transaction reaches the file while it is copied, and
            // the units waiting before it with it: check them first.
            still_in_wal(log, w, &before)?;
            unchecked = false;
        }
        // Checks the WAL header itself after copying.
        out.frames += append_streamed_transaction(log, w, &c, &mut page)?;
    };
    if group.commit.is_some() {
        // A commit found but not taken (foreign) left its page numbers.
        group.page_nos.truncate(group.frames());
        out.frames += group.append(log, w)?;
        unchecked = true;
    }
    if unchecked {
        still_in_wal(log, w, &pos)?;
    }
    Ok(foreign)
}

/// Small commits, consecutive in the WAL, to be appended as one log
/// transaction: frames `first..=commit` of `commit`, and the page number of
/// each of those frames.
#[derive(Default)]
struct Group {
    commit: Option<WalCommit>,
    page_nos: Vec<u32>,
}

impl Group {
    fn frames(&self) -> usize {
        self.commit.map_or(0, |c| (c.commit - c.first + 1) as usize)
    }

    /// Appends the group and empties it.
    fn append(&mut self, log: &mut LogWriter, w: &WalFile) -> Result<u64, CaptureError> {
        let Some(c) = self.commit.take() else { return Ok(0) };
        let r = append_small_transaction(log, w, &c, &self.page_nos);
        self.page_nos.clear();
        r
    }
}

/// The transactions copied up to `pos` and not yet written are dropped unless
/// the WAL still holds `pos` (a restart without walcast rewrote the header).
fn still_in_wal(log: &mut LogWriter, w: &WalFile, pos: &WalPos) -> Result<(), CaptureError> {
    if w.contains(pos)? {
        return Ok(());
    }
    log.drop_deferred();
    Err(wal_changed())
}

/// A growable set of small integers, one bit each.
struct BitSet(Vec<u64>);
impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: usize) {
        if i / 64 >= self.0.len() {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }
}

/// Which frames of `first..=last` hold the last version of their page, among pages
/// 1..=db_pages. Walks frame headers backwards.
fn last_versions(w: &WalFile, first: u32, last: u32, db_pages: u32) -> io::Result<(BitSet, u64)> {
    let mut seen = BitSet::new(db_pages as usize + 1);
    let mut keep = BitSet::new((last - first + 1) as usize);
    let mut kept = 0;
    let mut f = last;
    while f >= first {
        let h = w.read_frame_header(f)?;
        if h.page_no <= db_pages && !seen.get(h.page_no as usize) {
            seen.set(h.page_no as usize);
            keep.set((f - first) as usize);
            kept += 1;
        }
        f -= 1;
    }
    Ok((keep, kept))
}

/// Transactions up to this size are read from the WAL in one read and copied
/// from memory; larger ones stream frame by frame.
const SMALL_TRANSACTION: usize = 4 << 20;

fn wal_changed() -> CaptureError {
    CaptureError::Io(io::Error::other("the WAL changed while a transaction was being copied"))
}

/// Writes one transaction as a batch: `copy` hands each kept page (page_no,
/// bytes) to the emitter, in WAL order; the last one carries the database size.
/// The batch closes with the WAL position it came from, once the WAL is seen to
/// still hold it (when `recheck`; else the caller checks). On any error the
/// batch is dropped.
fn write_batch<F>(log: &mut LogWriter, w: &WalFile, c: &WalCommit, kept: u64, recheck: bool, copy: F) -> Result<u64, CaptureError>
where
    F: FnOnce(&mut dyn FnMut(u32, &[u8]) -> Result<(), CaptureError>) -> Result<(), CaptureError>,
{
    log.begin_batch();
    let r = (|| -> Result<(), CaptureError> {
        {
            let mut written = 0;
            let mut emit = |page_no: u32, page: &[u8]| -> Result<(), CaptureError> {
                written += 1;
                let size_after = if written == kept { c.db_pages } else { 0 };
                log.add_frame(page_no, size_after, page)?;
                Ok(())
            };
            copy(&mut emit)?;
        }
        // The frames must still be the ones validated: a restart by a process
        // without walcast would have rewritten the WAL header.
        if recheck && !w.contains(&c.end)? {
            return Err(wal_changed());
        }
        // Written with the pass's other transactions (see `catch_up`).
        log.commit_deferred(c.db_pages, Some(c.end))?;
        Ok(())
    })();
    if r.is_err() {
        log.abort();
    }
    r.map(|_| kept)
}

/// Appends small committed transactions, consecutive in the WAL, as one log
/// transaction: `c` runs from the first one's first frame to the last one's
/// commit, and `page_nos` holds the page number of each of its frames (from
/// their headers). Each page once, with its last version: only the frames it
/// keeps are read, consecutive ones together, and each is checked against its
/// header as first read.
///
/// Why merging is safe: a log transaction is applied whole, so a replica moves
/// from the state before the first commit straight to the state after the last,
/// both states the primary committed. Keeping each page's last version among
/// pages up to the last commit's size is exactly what SQLite reads from this
/// WAL after that commit. Why merge: under a stream of commits that each
/// rewrite the same few pages, a pass writes, publishes and applies those pages
/// once rather than once per commit.
fn append_small_transaction(log: &mut LogWriter, w: &WalFile, c: &WalCommit, page_nos: &[u32]) -> Result<u64, CaptureError> {
    if page_nos.len() != (c.commit - c.first + 1) as usize {
        return Err(CaptureError::Io(io::Error::other("internal error: page numbers do not match the frames")));
    }
    let mut seen = std::collections::HashSet::with_capacity(page_nos.len());
    let mut keep = vec![false; page_nos.len()];
    for (i, &p) in page_nos.iter().enumerate().rev() {
        keep[i] = p <= c.db_pages && seen.insert(p);
    }
    let kept = keep.iter().filter(|k| **k).count() as u64;
    let fsz = w.frame_size();
    let mut buf = Vec::new();
    write_batch(log, w, c, kept, false, |emit| {
        let mut i = 0;
        while i < keep.len() {
            if !keep[i] {
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < keep.len() && keep[end] && (end - i) * fsz < READ_RUN {
                end += 1;
            }
            buf.resize((end - i) * fsz, 0);
            w.read_frames_direct(c.first + i as u32, &mut buf)?;
            for (f, &page_no) in buf.chunks_exact(fsz).zip(&page_nos[i..end]) {
                let h = crate::wal::WalFrameHeader::parse(f);
                if (h.salt1, h.salt2) != (w.header.salt1, w.header.salt2) || h.page_no != page_no {
                    return Err(wal_changed());
                }
                emit(page_no, &f[crate::wal::WAL_FRAME_HEADER_LEN..])?;
            }
            i = end;
        }
        Ok(())
    })
}

/// The most `append_small_transaction` reads at once.
const READ_RUN: usize = 256 << 10;

/// Appends a transaction of any size in bounded memory: validated already, its
/// frames are read twice more, headers backwards to find each page's last
/// version, then the kept frames forwards.
fn append_streamed_transaction(log: &mut LogWriter, w: &WalFile, c: &WalCommit, page: &mut [u8]) -> Result<u64, CaptureError> {
    let (keep, kept) = last_versions(w, c.first, c.commit, c.db_pages)?;
    // Read from the file again after the checks: the WAL header must be
    // checked before this batch is taken.
    write_batch(log, w, c, kept, true, |emit| {
        for f in c.first..=c.commit {
            if !keep.get((f - c.first) as usize) {
                continue;
            }
            let h = w.read_frame_header(f)?;
            if (h.salt1, h.salt2) != (w.header.salt1, w.header.salt2) {
                return Err(wal_changed());
            }
            w.read_page(f, page)?;
            emit(h.page_no, page)?;
        }
        Ok(())
    })
}

/// The page size and size in pages recorded in a database header, if the file
/// has one.
fn db_header_geometry(db: &dyn DbReader) -> io::Result<Option<(u32, u32)>> {
    if db.size()? < 100 {
        return Ok(None);
    }
    let mut h = [0u8; 100];
    db.read_at(&mut h, 0)?;
    if &h[0..16] != b"SQLite format 3\0" {
        return Err(io::Error::other("the database file has no SQLite header"));
    }
    let raw = u16::from_be_bytes([h[16], h[17]]) as u32;
    let page_size = if raw == 1 { 65536 } else { raw };
    if !crate::frame::is_page_size(page_size) {
        return Err(io::Error::other(format!("the database header has an invalid page size ({raw})")));
    }
    let change = u32::from_be_bytes(h[24..28].try_into().unwrap());
    let in_header = u32::from_be_bytes(h[28..32].try_into().unwrap());
    let valid_for = u32::from_be_bytes(h[92..96].try_into().unwrap());
    // The in-header size is valid only when version-valid-for matches the change
    // counter (SQLite file format, section 1.3.7).
    let pages = if in_header != 0 && valid_for == change { in_header } else { (db.size()? / page_size as u64) as u32 };
    Ok(Some((page_size, pages)))
}

fn new_generation(
    log: &mut LogWriter,
    paths: &Paths,
    wal: Option<&WalFile>,
    imaging: Imaging,
    claims: Claims,
    reason: &str,
) -> Result<(), CaptureError> {
    match imaging {
        Imaging::WritersExcluded(db) => image_and_claim(log, paths, wal, db, claims, reason),
        Imaging::TakeWriteLock { db, lock, committed, unlock } => {
            if !lock()? {
                return Err(CaptureError::Busy);
            }
            // The WAL seen before the lock may have moved on; read it again, and
            // what is committed, now that no writer can change either.
            let locked_paths = Paths { committed: committed(), ..*paths };
            let r = paths
                .open_wal()
                .map_err(CaptureError::from)
                .and_then(|w| image_and_claim(log, &locked_paths, w.as_ref(), db, claims, reason));
            unlock();
            r
        }
    }
}

/// Takes a base image, then claims its WAL position (writers are excluded, so
/// writing the writers' part of the claim file is safe) and marks every foreign
/// write seen so far as handled: the image contains them.
fn image_and_claim(
    log: &mut LogWriter,
    paths: &Paths,
    wal: Option<&WalFile>,
    db: &dyn DbReader,
    claims: Claims,
    reason: &str,
) -> Result<(), CaptureError> {
    let seen = read_claims(claims);
    take_image(log, paths, wal, db, reason)?;
    if let (Some(c), Some(seen)) = (claims, seen) {
        let mark = match log.state.cursor {
            WalCursor::InWal(p) => WalMark { salt1: p.salt1, salt2: p.salt2, frame: p.frame },
            _ => WalMark::default(),
        };
        c.write_claim(mark);
        c.write_handled(seen.foreign_count);
    }
    Ok(())
}

/// Writes a generation record and a base image of the database as of the last
/// commit in the WAL: every page of the database file, overlaid with the last
/// version of each page in the WAL. Writers must be excluded.
fn take_image(log: &mut LogWriter, paths: &Paths, wal: Option<&WalFile>, db: &dyn DbReader, reason: &str) -> Result<(), CaptureError> {
    let geometry = db_header_geometry(db)?;
    let page_size = match (wal, geometry) {
        (Some(w), _) => w.header.page_size,
        (None, Some((ps, _))) => ps,
        (None, None) => 4096,
    };
    let mut page = vec![0u8; page_size as usize];
    let (wal_end, wal_pages) = match wal {
        Some(w) => {
            let (pos, pages) = w.last_commit(&mut Vec::new(), paths.limit(w, None, db)?)?;
            (Some(pos), pages)
        }
        None => (None, None),
    };
    let db_pages = match (wal_pages, geometry) {
        (Some(p), _) => p,
        (None, Some((ps, pages))) if ps == page_size => pages,
        (None, Some(_)) => (db.size()? / page_size as u64) as u32,
        (None, None) => 0,
    };
    // Pages whose last version is in the WAL, and the frames that hold them.
    let (in_wal, keep, kept) = match (wal, wal_end) {
        (Some(w), Some(end)) if end.frame > 0 => {
            let (keep, kept) = last_versions(w, 1, end.frame, db_pages)?;
            let mut in_wal = BitSet::new(db_pages as usize + 1);
            for f in 1..=end.frame {
                if keep.get((f - 1) as usize) {
                    in_wal.set(w.read_frame_header(f)?.page_no as usize);
                }
            }
            (in_wal, keep, kept)
        }
        _ => (BitSet::new(0), BitSet::new(0), 0),
    };
    let from_file = db_pages as u64 - kept;
    let total = from_file + kept;

    log.begin_generation(page_size, reason)?;
    let r = (|| -> Result<(), CaptureError> {
        let mut written = 0u64;
        let size_for = |written: u64| if written == total { db_pages } else { 0 };
        for pgno in 1..=db_pages {
            if in_wal.get(pgno as usize) {
                continue;
            }
            db.read_at(&mut page, (pgno as u64 - 1) * page_size as u64)?;
            written += 1;
            log.add_frame(pgno, size_for(written), &page)?;
        }
        if let (Some(w), Some(end)) = (wal, wal_end) {
            for f in 1..=end.frame {
                if keep.get((f - 1) as usize) {
                    let h = w.read_frame_header(f)?;
                    w.read_page(f, &mut page)?;
                    written += 1;
                    log.add_frame(h.page_no, size_for(written), &page)?;
                }
            }
            if !w.contains(&end)? {
                return Err(CaptureError::Io(io::Error::other("the WAL changed while the base image was taken")));
            }
        }
        log.commit(db_pages, wal_end)?;
        Ok(())
    })();
    if let Err(e) = r {
        log.abort();
        return Err(e);
    }
    if wal_end.is_none() {
        log.wal_event(WalEvent::Ended(DbStat::of(paths.db)?))?;
    }
    // A base image is the start of the log's history: make it durable now (this
    // is never on the commit path of an ordinary transaction).
    log.sync()?;
    Ok(())
}

/// What SQLite is about to do to the WAL.
pub enum WalChange<'a> {
    /// Write this new 32-byte WAL header over the WAL (a restart).
    Restart(&'a [u8]),
    /// Truncate the WAL to nothing, or delete it.
    End,
}

/// Before SQLite destroys WAL content: capture everything committed in the WAL,
/// record what is about to happen, and make the log durable, all before the
/// change (for a restart, when the log already is, only the record of it
/// waits: the caller has it synced soon after). If the process dies before or
/// after the change, the recorded intent and the WAL file on disk together say
/// where the log stands. Runs on SQLite's thread, which excludes other writers.
pub fn before_wal_change(
    log: &mut LogWriter,
    paths: &Paths,
    db: &dyn DbReader,
    claims: Claims,
    change: WalChange,
) -> Result<CatchUp, CaptureError> {
    let checked;
    let paths = match paths.committed {
        // SQLite restarts, truncates or deletes a WAL only once a checkpoint has
        // copied every committed frame of it into the database file: when the
        // wal-index cannot say (it is closed), the file can.
        Committed::Unknown => {
            checked = Paths { committed: Committed::Checkpointed, ..*paths };
            &checked
        }
        _ => paths,
    };
    let r = catch_up(log, paths, Imaging::WritersExcluded(db), claims)?;
    // A restart destroys only what the log already holds durably when the
    // capture thread synced it during the checkpoint before (see
    // `DbState::checkpoint_started`): then SQLite's thread does not wait for a
    // sync here, and the record of the switch is synced by the capture thread
    // right after. A truncation or deletion ends the WAL: always synced here.
    let durable_before = matches!(change, WalChange::Restart(_)) && log.is_durable();
    let new_wal = match change {
        WalChange::Restart(header) => {
            crate::wal::WalHeader::parse(header).map(|h| WalPos { salt1: h.salt1, salt2: h.salt2, frame: 0, cksum: h.cksum })
        }
        WalChange::End => None,
    };
    match (log.state.cursor, &change, new_wal) {
        (WalCursor::InWal(from), WalChange::Restart(_), Some(to)) => log.wal_event(WalEvent::Switching(from, to))?,
        (WalCursor::Ended(stat), WalChange::Restart(_), Some(to)) => log.wal_event(WalEvent::Starting(to, stat))?,
        (WalCursor::InWal(from), WalChange::End, _) => log.wal_event(WalEvent::Ending(from, DbStat::of(paths.db)?))?,
        _ => {}
    }
    if !durable_before {
        log.sync()?;
    }
    Ok(r)
}

/// The last commit of the WAL after `from` whose pages the database file holds,
/// after a complete checkpoint: the last one SQLite committed (or `from` itself
/// when there is none). A commit frame past it was written by a writer that died
/// before updating the wal-index; SQLite never counted it, and its pages are not
/// in the database file.
fn last_checkpointed_commit(w: &WalFile, from: WalPos, db: &dyn DbReader) -> io::Result<u32> {
    if !w.contains(&from)? {
        return Ok(from.frame);
    }
    let mut commits = Vec::new();
    let mut pos = from;
    let mut scratch = Vec::new();
    while let Some(c) = w.next_commit(&pos, &mut scratch)? {
        pos = c.end;
        commits.push(c);
    }
    let mut wal_page = vec![0u8; w.page_size()];
    let mut db_page = vec![0u8; w.page_size()];
    for c in commits.iter().rev() {
        let mut same = true;
        for f in c.first..=c.commit {
            let h = w.read_frame_header(f)?;
            if h.page_no > c.db_pages {
                continue;
            }
            w.read_page(f, &mut wal_page)?;
            db.read_at(&mut db_page, (h.page_no as u64 - 1) * w.page_size() as u64)?;
            // An earlier frame of the same page may hold an older version: only
            // a page's last version in the transaction must match.
            if wal_page != db_page && last_version_in(w, c, f, h.page_no)? {
                same = false;
                break;
            }
        }
        if same {
            return Ok(c.commit);
        }
    }
    Ok(from.frame)
}

/// True when frame `f` holds the last version of `page_no` within transaction `c`.
fn last_version_in(w: &WalFile, c: &WalCommit, f: u32, page_no: u32) -> io::Result<bool> {
    for later in f + 1..=c.commit {
        if w.read_frame_header(later)?.page_no == page_no {
            return Ok(false);
        }
    }
    Ok(true)
}

/// After SQLite wrote a new WAL header (`header`, 32 bytes): the log now follows
/// that WAL from its start, and walcast claims it.
pub fn after_wal_started(log: &mut LogWriter, claims: Claims, header: &[u8]) -> Result<(), CaptureError> {
    if let Some(h) = crate::wal::WalHeader::parse(header) {
        let pos = WalPos { salt1: h.salt1, salt2: h.salt2, frame: 0, cksum: h.cksum };
        log.wal_event(WalEvent::Started(pos, h.ckpt_seq))?;
        if let Some(c) = claims {
            c.write_claim(WalMark { salt1: h.salt1, salt2: h.salt2, frame: 0 });
        }
    }
    Ok(())
}

/// After SQLite truncated the WAL to nothing or deleted it: record the database
/// file's state, so that a change made while no WAL exists is recognized.
pub fn after_wal_ended(log: &mut LogWriter, paths: &Paths) -> Result<(), CaptureError> {
    if let WalCursor::InWal(_) | WalCursor::Ending { .. } = log.state.cursor {
        log.wal_event(WalEvent::Ended(DbStat::of(paths.db)?))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogFile, Record};
    use crate::wal::testutil::WalBuilder;
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    impl DbReader for File {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            buf.fill(0);
            let mut n = 0;
            while n < buf.len() {
                let k = FileExt::read_at(self, &mut buf[n..], off + n as u64)?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.metadata()?.len())
        }
    }

    fn dir(name: &str) -> PathBuf {
        crate::testutil::scratch_dir(&format!("capture-{name}"))
    }

    /// A database file of `pages` pages of 512 bytes with a valid header.
    fn make_db(path: &Path, pages: u32) {
        let mut b = vec![0u8; 512 * pages as usize];
        for p in 0..pages as usize {
            b[p * 512 + 200] = p as u8 + 100;
        }
        b[0..16].copy_from_slice(b"SQLite format 3\0");
        b[16..18].copy_from_slice(&512u16.to_be_bytes());
        b[18] = 2;
        b[19] = 2;
        b[24..28].copy_from_slice(&1u32.to_be_bytes());
        b[28..32].copy_from_slice(&pages.to_be_bytes());
        b[92..96].copy_from_slice(&1u32.to_be_bytes());
        std::fs::write(path, b).unwrap();
    }

    /// Replays a log into page images, as of its end.
    fn replay(log: &Path) -> BTreeMap<u32, Vec<u8>> {
        let lf = LogFile::open(log).unwrap();
        let mut pages = BTreeMap::new();
        let mut size = 0;
        lf.scan_all(|_, r, _| {
            match r {
                Record::Frame(h, p) => {
                    pages.insert(h.page_no, p.to_vec());
                }
                Record::Commit(c) => size = c.size_after,
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        pages.retain(|k, _| *k <= size);
        pages
    }

    #[test]
    fn base_image_then_transactions_deduplicated() {
        let d = dir("a");
        let (db, wal, logp) = (d.join("x.db"), d.join("x.db-wal"), d.join("x.db-walcast"));
        make_db(&db, 3);
        let mut b = WalBuilder::new(512, 5, 6);
        b.frame(2, 0, 0xA1).frame(4, 4, 0xA2); // txn 1 grows to 4 pages
        std::fs::write(&wal, &b.bytes).unwrap();
        let mut log = LogWriter::create(&logp, [1; 16]).unwrap();
        let f = File::open(&db).unwrap();
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.is_some());
        assert_eq!(log.state.last_frame_no, 4);
        // txn 2 spills page 3 twice and page 1 once; txn 3 is uncommitted.
        b.frame(3, 0, 0xB1).frame(1, 0, 0xB2).frame(3, 4, 0xB3).frame(2, 0, 0xC1);
        std::fs::write(&wal, &b.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert_eq!((r.transactions, r.frames), (1, 2));
        let pages = replay(&logp);
        assert_eq!(pages.len(), 4);
        assert_eq!(pages[&1][0], 0xB2);
        assert_eq!(pages[&2][0], 0xA1);
        assert_eq!(pages[&3][0], 0xB3);
        assert_eq!(pages[&4][0], 0xA2);
        // Nothing new: idempotent.
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert_eq!(r.transactions, 0);
    }

    #[test]
    fn commits_found_in_one_pass_become_one_log_transaction_of_last_versions() {
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("merge");
        let sizes_committed = |log: &mut LogWriter| {
            log.flush().unwrap();
            let mut sizes = Vec::new();
            LogFile::open(&logp)
                .unwrap()
                .scan_all(|_, r, _| {
                    if let Record::Commit(c) = r {
                        sizes.push(c.size_after);
                    }
                    Ok(())
                })
                .unwrap();
            sizes
        };
        let before = (log.state, sizes_committed(&mut log).len());
        // Three commits: the database grows to 3 pages, then shrinks back to
        // 2 (page 3 goes), then page 2 is rewritten.
        b.frame(3, 0, 0xB1).frame(1, 3, 0xB2).frame(1, 2, 0xC1).frame(2, 2, 0xD1);
        std::fs::write(&wal, &b.bytes).unwrap();
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert_eq!((r.transactions, r.frames), (3, 2), "pages 1 and 2, each once");
        let sizes = sizes_committed(&mut log);
        assert_eq!(sizes.len(), before.1 + 1, "one log transaction for the three");
        assert_eq!(sizes.last(), Some(&2), "with the last commit's size");
        assert_eq!(log.state.last_frame_no, before.0.last_frame_no + 2);
        let pages = replay(&logp);
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[&1][0], 0xC1);
        assert_eq!(pages[&2][0], 0xD1);
    }

    /// Random histories of commits (rewrites, growth, shrinking, transactions
    /// big enough to stream), captured in passes that each stop at a random
    /// commit, following the wal-index or not: after every pass, the log
    /// replays to exactly what SQLite reads from the WAL as of that commit.
    #[test]
    fn captured_passes_replay_to_the_committed_state_with_and_without_the_wal_index() {
        let fsz = 512 + crate::wal::WAL_FRAME_HEADER_LEN;
        let small_frames = (SMALL_TRANSACTION / fsz) as u32;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as u32
        };
        for (case, indexed) in [(0, true), (1, false), (2, true), (3, false)] {
            let d = dir(&format!("model-{case}"));
            let (db, wal, logp) = (d.join("x.db"), d.join("x.db-wal"), d.join("x.db-walcast"));
            make_db(&db, 3);
            let mut b = WalBuilder::new(512, 7, 8 + case);
            // The model: each page's last committed byte, and the size.
            let mut model: BTreeMap<u32, u8> = (1..=3).map(|p| (p, 0u8)).collect();
            let mut size = 3u32;
            // Commit boundaries: (commit frame, the model after it).
            let mut commits = Vec::new();
            let mut frames = 0u32;
            let mut fill = 1u8;
            for t in 0..60 {
                // Mostly one to three pages; twice, more than SMALL_TRANSACTION;
                // often half of it, so that a pass's commits together are more
                // than SMALL_TRANSACTION.
                let n = match t {
                    20 | 41 => small_frames + 3,
                    _ if t % 3 == 1 => small_frames / 2,
                    _ => 1 + rand(3),
                };
                let new_size = match rand(10) {
                    0 if size > 2 => size - 1,
                    1 => size + 1,
                    _ => size,
                };
                let mut pages: Vec<u32> = (0..n).map(|_| 1 + rand(new_size.max(2))).collect();
                if new_size > size {
                    pages.push(new_size); // SQLite writes every page it extends into
                }
                for (i, &p) in pages.iter().enumerate() {
                    fill = fill.wrapping_add(1).max(1);
                    let commit = if i + 1 == pages.len() { new_size } else { 0 };
                    b.frame(p, commit, fill);
                    frames += 1;
                    model.insert(p, fill);
                }
                size = new_size;
                model.retain(|p, _| *p <= size);
                commits.push((frames, model.clone()));
            }
            std::fs::write(&wal, &b.bytes).unwrap();
            let mut log = LogWriter::create(&logp, [1; 16]).unwrap();
            let f = File::open(&db).unwrap();
            let mut done = 0;
            let mut first = true;
            while done < commits.len() {
                let upto = (done + 1 + rand(12) as usize).min(commits.len());
                let (frame, expected) = &commits[upto - 1];
                let committed = if indexed {
                    Committed::WalIndex(WalMark { salt1: 7, salt2: 8 + case, frame: *frame })
                } else {
                    // Without a wal-index, everything in the file counts: cut it there.
                    std::fs::write(&wal, &b.bytes[..32 + *frame as usize * fsz]).unwrap();
                    Committed::Unknown
                };
                let paths = Paths { db: &db, wal: &wal, committed, kept_wal: None };
                let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
                if first {
                    // The first pass takes a base image, as of the commit.
                    assert!(r.new_generation.is_some());
                    first = false;
                } else {
                    assert_eq!(r.transactions as usize, upto - done, "case {case}");
                }
                // A page from a frame is filled with one byte; one from the
                // database file is not (0 in the model).
                let got: BTreeMap<u32, u8> =
                    replay(&logp).iter().map(|(p, b)| (*p, if b.iter().all(|x| *x == b[0]) { b[0] } else { 0 })).collect();
                assert_eq!(&got, expected, "case {case}, after commit {upto}");
                done = upto;
            }
        }
    }

    #[test]
    fn claimed_commits_before_a_foreign_one_are_captured_before_the_new_generation() {
        let (db, wal, _logp, mut b, mut log, f) = two_page_primary("claimed-then-foreign");
        let claims = ClaimFile::open(&db.with_extension("db-walcast-claim")).unwrap();
        let generation = log.state.generation;
        // Two claimed commits, then one no walcast writer claimed.
        b.frame(2, 0, 0xB1).frame(1, 2, 0xB2).frame(2, 2, 0xC1).frame(1, 2, 0xD1);
        std::fs::write(&wal, &b.bytes).unwrap();
        claims.write_claim(WalMark { salt1: 5, salt2: 6, frame: 4 });
        let paths = Paths { db: &db, wal: &wal, committed: Committed::WalIndex(WalMark { salt1: 5, salt2: 6, frame: 5 }), kept_wal: None };
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), Some(&claims)).unwrap();
        assert_eq!(r.transactions, 2, "the claimed ones");
        assert!(r.new_generation.unwrap().contains("without walcast"));
        assert_eq!(log.state.generation, generation + 1);
    }

    /// A two-page database with one committed WAL transaction, and a log that
    /// has captured it.
    fn two_page_primary(name: &str) -> (PathBuf, PathBuf, PathBuf, WalBuilder, LogWriter, File) {
        let d = dir(name);
        let (db, wal, logp) = (d.join("x.db"), d.join("x.db-wal"), d.join("x.db-walcast"));
        make_db(&db, 2);
        let mut b = WalBuilder::new(512, 5, 6);
        b.frame(1, 2, 0xA1);
        std::fs::write(&wal, &b.bytes).unwrap();
        let mut log = LogWriter::create(&logp, [1; 16]).unwrap();
        let f = File::open(&db).unwrap();
        catch_up(
            &mut log,
            &Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None },
            Imaging::WritersExcluded(&f),
            None,
        )
        .unwrap();
        (db, wal, logp, b, log, f)
    }

    #[test]
    fn a_pass_whose_wal_was_restarted_under_it_takes_none_of_its_transactions() {
        // The frames still read as valid (their own salts and checksums), but the
        // WAL header changed after they were read: a restart by a process
        // without walcast. The one check at the end of the pass drops them all.
        let (_db, wal, logp, mut b, mut log, _f) = two_page_primary("restarted-under");
        let before = log.state;
        b.frame(2, 2, 0x11).frame(1, 2, 0x12);
        std::fs::write(&wal, &b.bytes).unwrap();
        let w = WalFile::open(&wal).unwrap().unwrap();
        let WalCursor::InWal(pos) = log.state.cursor else { panic!("the log follows the WAL") };
        let mut restarted = b.bytes.clone();
        restarted[16] ^= 1; // salt-1 of the WAL header
        std::fs::write(&wal, &restarted).unwrap();
        let mut out = CatchUp::default();
        let r = append_commits(&mut log, &w, pos, None, None, None, &mut out);
        assert!(matches!(r, Err(CaptureError::Io(_))), "{r:?}");
        assert_eq!(out.transactions, 2, "both were read");
        assert_eq!(log.state, before, "and neither was taken");
        log.flush().unwrap();
        let (st, _) = LogFile::open(&logp).unwrap().scan_all(|_, _, _| Ok(())).unwrap();
        assert_eq!(st.last_frame_no, before.last_frame_no);
    }

    #[test]
    fn small_and_streamed_copies_write_the_same_batch() {
        let d = dir("s");
        let wal = d.join("x.db-wal");
        let mut b = WalBuilder::new(512, 5, 6);
        b.frame(3, 0, 1).frame(1, 0, 2).frame(3, 0, 3).frame(9, 0, 4).frame(2, 8, 5);
        std::fs::write(&wal, &b.bytes).unwrap();
        let w = WalFile::open(&wal).unwrap().unwrap();
        let c = w.next_commit(&w.start(), &mut Vec::new()).unwrap().unwrap();
        let mut logs = Vec::new();
        for (i, small) in [true, false].into_iter().enumerate() {
            let p = d.join(format!("l{i}"));
            let mut log = LogWriter::create(&p, [3; 16]).unwrap();
            log.begin_generation(512, "t").unwrap();
            log.commit(0, None).unwrap();
            let n = if small {
                let page_nos: Vec<u32> = (c.first..=c.commit).map(|f| w.read_frame_header(f).unwrap().page_no).collect();
                append_small_transaction(&mut log, &w, &c, &page_nos).unwrap()
            } else {
                append_streamed_transaction(&mut log, &w, &c, &mut vec![0u8; 512]).unwrap()
            };
            assert_eq!(n, 3, "page 9 is past the end; page 3 once, in its last version");
            log.flush().unwrap();
            let mut frames = Vec::new();
            LogFile::open(&p)
                .unwrap()
                .scan_all(|_, r, _| {
                    if let Record::Frame(h, pg) = r {
                        frames.push((*h, pg.to_vec()));
                    }
                    Ok(())
                })
                .unwrap();
            logs.push(frames);
        }
        assert_eq!(logs[0], logs[1]);
        let pages = replay(&d.join("l0"));
        assert_eq!((pages[&1][0], pages[&2][0], pages[&3][0]), (2, 5, 3));
        assert!(!pages.contains_key(&9));
    }

    #[test]
    fn a_commit_sqlite_never_counted_is_not_captured_when_the_wal_ends() {
        // T is committed and checkpointed into the file. P's commit frame reached
        // the WAL, but its writer died before the wal-index knew of it, so the
        // checkpoint left it out.
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("p");
        b.frame(2, 2, 0x77); // T
        b.frame(1, 2, 0x99); // P
        std::fs::write(&wal, &b.bytes).unwrap();
        let mut file = vec![0xA1u8; 512]; // page 1 as of T (frame 1)
        file.extend_from_slice(&[0x77u8; 512]); // page 2 from T
        std::fs::write(&db, &file).unwrap();
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        before_wal_change(&mut log, &paths, &f, None, WalChange::End).unwrap();
        let pages = replay(&logp);
        assert_eq!(pages[&2][0], 0x77, "T is captured");
        assert_eq!(pages[&1][0], 0xA1, "P is not");
    }

    #[test]
    fn after_a_restart_checkpoint_the_old_wal_is_captured_before_it_is_overwritten() {
        // wal_checkpoint(RESTART) copied everything into the file and reset the
        // wal-index to a new WAL (other salts, no frames); the WAL file still
        // holds the old frames, one commit of which the log has not captured yet.
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("r");
        b.frame(2, 2, 0x55);
        std::fs::write(&wal, &b.bytes).unwrap();
        let mut file = vec![0xA1u8; 512];
        file.extend_from_slice(&[0x55u8; 512]);
        std::fs::write(&db, &file).unwrap();
        let reset = Committed::WalIndex(WalMark { salt1: 6, salt2: 1234, frame: 0 });
        let paths = Paths { db: &db, wal: &wal, committed: reset, kept_wal: None };
        let b2 = WalBuilder::new(512, 6, 1234);
        let r = before_wal_change(&mut log, &paths, &f, None, WalChange::Restart(&b2.bytes[0..32])).unwrap();
        assert_eq!(r.transactions, 1);
        assert_eq!(replay(&logp)[&2][0], 0x55);
    }

    #[test]
    fn a_crash_right_after_starting_a_wal_keeps_the_generation() {
        let (db, wal, logp, _, mut log, f) = two_page_primary("k");
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        std::fs::write(&db, [vec![0xA1u8; 512], vec![100 + 1; 512]].concat()).unwrap();
        before_wal_change(&mut log, &paths, &f, None, WalChange::End).unwrap();
        std::fs::remove_file(&wal).unwrap();
        after_wal_ended(&mut log, &paths).unwrap();
        // A new WAL: the intent is recorded, SQLite writes the header and a
        // commit, and the process dies before recording that the WAL started.
        let mut b = WalBuilder::new(512, 9, 9);
        before_wal_change(&mut log, &paths, &f, None, WalChange::Restart(&b.bytes[0..32])).unwrap();
        b.frame(2, 2, 0x42);
        std::fs::write(&wal, &b.bytes).unwrap();
        drop(log);
        let (mut log, _) = LogWriter::open(&logp, true).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.is_none(), "{:?}", r.new_generation);
        assert_eq!(r.transactions, 1);
        assert_eq!(replay(&logp)[&2][0], 0x42);
    }

    #[test]
    fn a_kept_wal_is_the_file_at_its_path() {
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("kept");
        let kept = KeptWal::default();
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: Some(&kept) };
        b.frame(2, 2, 0xA2);
        std::fs::write(&wal, &b.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert_eq!((r.transactions, r.new_generation), (1, None));
        // Appended to: the same file, read again through the kept descriptor.
        b.frame(1, 2, 0xA3);
        std::fs::write(&wal, &b.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert_eq!((r.transactions, r.new_generation), (1, None));
        // Deleted, then made again by a process without walcast: the new file
        // is read, not the deleted one the descriptor still held.
        std::fs::remove_file(&wal).unwrap();
        let mut b2 = WalBuilder::new(512, 6, 99);
        b2.frame(2, 2, 0xD1);
        std::fs::write(&wal, &b2.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.unwrap().contains("without walcast"));
        assert_eq!(replay(&logp)[&2][0], 0xD1);
    }

    #[test]
    fn foreign_wal_restart_starts_a_generation() {
        let (db, wal, logp, _, mut log, f) = two_page_primary("b");
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        let mut b2 = WalBuilder::new(512, 6, 99);
        b2.frame(2, 2, 0xD1);
        std::fs::write(&wal, &b2.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.unwrap().contains("without walcast"));
        assert_eq!(log.state.generation, 2);
        let pages = replay(&logp);
        assert_eq!(pages[&2][0], 0xD1);
    }

    #[test]
    fn restart_and_end_hooks_keep_continuity() {
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("c");
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        b.frame(2, 2, 0xA2);
        std::fs::write(&wal, &b.bytes).unwrap();
        // A checkpoint copies the WAL into the file; then SQLite restarts the
        // WAL: the hook sees the old WAL still intact.
        let checkpointed = |p1: u8, p2: u8| {
            let mut file = vec![p1; 512];
            file.extend_from_slice(&[p2; 512]);
            std::fs::write(&db, &file).unwrap();
        };
        checkpointed(0xA1, 0xA2);
        let mut b2 = WalBuilder::new(512, 6, 77);
        before_wal_change(&mut log, &paths, &f, None, WalChange::Restart(&b2.bytes[0..32])).unwrap();
        after_wal_started(&mut log, None, &b2.bytes[0..32]).unwrap();
        b2.frame(1, 2, 0xE1);
        std::fs::write(&wal, &b2.bytes).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.is_none());
        assert_eq!(r.transactions, 1);
        checkpointed(0xE1, 0xA2);
        before_wal_change(&mut log, &paths, &f, None, WalChange::End).unwrap();
        std::fs::remove_file(&wal).unwrap();
        after_wal_ended(&mut log, &paths).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.is_none());
        assert_eq!(log.state.generation, 1);
        let pages = replay(&logp);
        assert_eq!((pages[&1][0], pages[&2][0]), (0xE1, 0xA2));
    }

    /// SQLite's thread syncs the log before a restart only when the capture
    /// thread has not already (it syncs when a checkpoint starts): then only
    /// the record of the restart is unsynced, and a power loss that takes it
    /// costs a new generation, never a wrong log.
    #[test]
    fn a_restart_syncs_the_log_only_when_it_is_not_durable_already() {
        let (db, wal, logp, mut b, mut log, f) = two_page_primary("restart-sync");
        let paths = Paths { db: &db, wal: &wal, committed: Committed::Unknown, kept_wal: None };
        let checkpointed = |p1: u8, p2: u8| std::fs::write(&db, [vec![p1; 512], vec![p2; 512]].concat()).unwrap();
        // A commit the log does not hold yet: the hook captures it, and syncs.
        b.frame(2, 2, 0xA2);
        std::fs::write(&wal, &b.bytes).unwrap();
        checkpointed(0xA1, 0xA2);
        let mut b2 = WalBuilder::new(512, 6, 77);
        let r = before_wal_change(&mut log, &paths, &f, None, WalChange::Restart(&b2.bytes[0..32])).unwrap();
        assert_eq!(r.transactions, 1);
        assert!(log.is_durable(), "the hook synced what it captured, and the record of the restart");
        after_wal_started(&mut log, None, &b2.bytes[0..32]).unwrap();
        b2.frame(1, 2, 0xE1);
        std::fs::write(&wal, &b2.bytes).unwrap();
        // The capture thread captures that commit and syncs (the checkpoint started).
        assert_eq!(catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap().transactions, 1);
        log.sync().unwrap();
        let durable_len = std::fs::metadata(&logp).unwrap().len();
        // Checkpointed, with a valid header this time: a base image reads it.
        make_db(&db, 2);
        let mut b3 = WalBuilder::new(512, 7, 88);
        let r = before_wal_change(&mut log, &paths, &f, None, WalChange::Restart(&b3.bytes[0..32])).unwrap();
        assert_eq!(r.transactions, 0);
        assert!(!log.is_durable(), "only the record of the restart is unsynced; no sync on SQLite's thread");
        after_wal_started(&mut log, None, &b3.bytes[0..32]).unwrap();
        b3.frame(2, 2, 0xE3);
        std::fs::write(&wal, &b3.bytes).unwrap();
        // A power loss before the capture thread synced it: the log is back at
        // its durable point, and the WAL it names is gone. A new generation
        // starts from the database as it is, with the new WAL's commit.
        drop(log);
        std::fs::OpenOptions::new().write(true).open(&logp).unwrap().set_len(durable_len).unwrap();
        let (mut log, _) = LogWriter::open(&logp, true).unwrap();
        let r = catch_up(&mut log, &paths, Imaging::WritersExcluded(&f), None).unwrap();
        assert!(r.new_generation.unwrap().contains("without walcast"));
        assert_eq!(log.state.generation, 2);
        let pages = replay(&logp);
        assert_eq!((&pages[&1][0..16], pages[&2][0]), (&b"SQLite format 3\0"[..], 0xE3));
    }

    #[test]
    fn a_database_header_with_an_invalid_page_size_is_an_error() {
        let d = dir("bad_page_size");
        let db = d.join("db");
        for raw in [0u16, 3, 256, 1000] {
            let mut h = vec![0u8; 4096];
            h[0..16].copy_from_slice(b"SQLite format 3\0");
            h[16..18].copy_from_slice(&raw.to_be_bytes());
            std::fs::write(&db, &h).unwrap();
            let e = db_header_geometry(&File::open(&db).unwrap()).unwrap_err().to_string();
            assert!(e.contains(&format!("invalid page size ({raw})")), "{e}");
        }
    }
}
