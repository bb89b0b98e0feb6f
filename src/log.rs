//! The replication log: `<db>-walcast`, an append-only file of generations,
//! frames and commit records. See README.md ("Files on disk") for the layout.
//!
//! Layout: two 256-byte header slots (the newer valid one wins, so a torn header
//! write never loses the log), then records from offset 512, each starting with a
//! one-byte tag:
//! - `G` generation: starts a new generation; a base image batch follows.
//! - `F` frame: a walcast frame (see `frame.rs`) whose page has the generation's
//!   page size.
//! - `C` commit: closes a batch (one transaction, or a base image) and records
//!   the WAL position it was captured from.
//! - `W` WAL event: a WAL was started or ended (truncated/deleted) by walcast.
//!
//! The log is valid up to its last complete unit (a `G`..`C` or frames..`C`
//! batch, or a `W`). A batch cut short at the end of the file is a torn append
//! (a crash mid-write) and is dropped; anything else that does not verify is
//! corruption, reported with the first bad frame_no and its offset.

use crate::frame::{chain_seed, FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_NO};
use crate::wal::WalPos;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const LOG_MAGIC: &[u8; 8] = b"WALCAST\0";
pub const LOG_VERSION: u32 = 1;
const SLOT_LEN: u64 = 256;
pub const RECORDS_START: u64 = 512;

pub const TAG_FRAME: u8 = b'F';
pub const TAG_COMMIT: u8 = b'C';
pub const TAG_GENERATION: u8 = b'G';
pub const TAG_WAL_EVENT: u8 = b'W';

pub(crate) const COMMIT_LEN: usize = 1 + 8 + 8 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 8 + 8;
pub(crate) const WAL_EVENT_LEN: usize = 82;
pub(crate) const MAX_REASON: usize = 1024;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn crc(bytes: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(bytes);
    d.sum64()
}

/// What identifies the state of the database file while no WAL is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DbStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

impl DbStat {
    pub fn of(path: &Path) -> io::Result<DbStat> {
        let m = std::fs::metadata(path)?;
        Ok(DbStat { size: m.len(), mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(), ino: m.ino() })
    }
}

/// Where the log stands relative to the database's WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalCursor {
    /// Nothing proves where the log stands: the next capture starts a generation.
    Unknown,
    /// The log holds every transaction of this WAL up to this position.
    InWal(WalPos),
    /// The log holds everything; the WAL was then truncated or deleted by walcast,
    /// leaving the database file in this state.
    Ended(DbStat),
    /// The log holds all of the WAL at `from`; walcast was about to start the WAL
    /// `to` over it. Resolved by which of the two the WAL file holds.
    Switching { from: WalPos, to: WalPos },
    /// The log holds all of the WAL at `from`; walcast was about to truncate or
    /// delete it. Resolved by whether the WAL file still holds it.
    Ending { from: WalPos, stat: DbStat },
    /// The log holds everything and no WAL existed (database file in state
    /// `stat`); walcast was about to start the WAL `to`. Resolved by whether the
    /// WAL file holds it.
    Starting { to: WalPos, stat: DbStat },
}

/// The state of a log at a record boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogState {
    /// Offset just past the last complete unit.
    pub end_offset: u64,
    pub last_frame_no: u64,
    pub last_checksum: u64,
    pub generation: u64,
    /// Offset of the current generation's `G` record (0 = none yet).
    pub gen_offset: u64,
    pub page_size: u32,
    /// Database size in pages after the last batch.
    pub db_pages: u32,
    pub cursor: WalCursor,
    /// Batches (transactions and base images) since the log began or since the
    /// state was loaded from a header snapshot.
    pub batches: u64,
}

/// What a log continues from. A new database's log starts at frame_no 1 from
/// its db_id's chain seed, in generation 0; the log of a promoted replica
/// continues the history it had applied: its last frame_no, that frame's
/// checksum, and a generation of the next term (see `next_term_generation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogIdentity {
    pub db_id: [u8; 16],
    pub first_frame_no: u64,
    pub seed: u64,
    /// The generation before the log's first generation record.
    pub base_generation: u64,
}

/// Generations are numbered `term << 32 | n`: a primary starts generations
/// n = 1, 2, ... within its term, and a promotion starts the next term. So
/// every generation of a promoted primary is newer than any generation the old
/// primary can still start after the failover, and replicas that followed the
/// new primary refuse the old one's.
pub const TERM_SHIFT: u32 = 32;

pub fn term_of(generation: u64) -> u64 {
    generation >> TERM_SHIFT
}

/// The largest generation a log header may record: 2^30 terms of 2^32
/// generations, and no arithmetic on it can overflow.
pub const MAX_GENERATION: u64 = 1 << 62;

/// The base generation of a log that a promotion starts after `generation`:
/// its first generation record is then term + 1, n = 1.
pub fn next_term_base(generation: u64) -> u64 {
    (term_of(generation) + 1) << TERM_SHIFT
}

impl LogIdentity {
    pub fn new(db_id: [u8; 16]) -> LogIdentity {
        LogIdentity { db_id, first_frame_no: 1, seed: chain_seed(&db_id), base_generation: 0 }
    }

    /// The identity of a log that continues a history applied up to
    /// (`frame_no`, `checksum`) in `generation`, in the next term.
    pub fn continuing(db_id: [u8; 16], generation: u64, frame_no: u64, checksum: u64) -> LogIdentity {
        LogIdentity { db_id, first_frame_no: frame_no + 1, seed: checksum, base_generation: next_term_base(generation) }
    }

    pub fn initial_state(&self) -> LogState {
        LogState {
            end_offset: RECORDS_START,
            last_frame_no: self.first_frame_no - 1,
            last_checksum: self.seed,
            generation: self.base_generation,
            gen_offset: 0,
            page_size: 0,
            db_pages: 0,
            cursor: WalCursor::Unknown,
            batches: 0,
        }
    }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug)]
pub enum LogError {
    Io(io::Error),
    /// The log does not verify. `frame_no` is the first bad frame, or for a bad
    /// non-frame record, the frame it follows.
    Corrupt {
        path: PathBuf,
        frame_no: u64,
        offset: u64,
        what: String,
    },
    /// Not a walcast log at all, or an unknown version.
    NotALog {
        path: PathBuf,
        what: String,
    },
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "{e}"),
            LogError::Corrupt { path, frame_no, offset, what } => {
                write!(f, "replication log {} is corrupt at frame_no {} (byte offset {}): {}", path.display(), frame_no, offset, what)
            }
            LogError::NotALog { path, what } => write!(f, "{} is not a usable walcast log: {}", path.display(), what),
        }
    }
}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> Self {
        LogError::Io(e)
    }
}

pub type LogResult<T> = Result<T, LogError>;

// ---------------------------------------------------------------------------
// Header slots

fn encode_slot(id: &LogIdentity, seq: u64, s: &LogState, tail: &LogState) -> [u8; SLOT_LEN as usize] {
    let mut b = [0u8; SLOT_LEN as usize];
    b[0..8].copy_from_slice(LOG_MAGIC);
    b[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    b[16..32].copy_from_slice(&id.db_id);
    b[32..40].copy_from_slice(&id.first_frame_no.to_le_bytes());
    b[40..48].copy_from_slice(&id.seed.to_le_bytes());
    b[48..56].copy_from_slice(&seq.to_le_bytes());
    b[56..64].copy_from_slice(&s.end_offset.to_le_bytes());
    b[64..72].copy_from_slice(&s.last_frame_no.to_le_bytes());
    b[72..80].copy_from_slice(&s.last_checksum.to_le_bytes());
    b[80..88].copy_from_slice(&s.generation.to_le_bytes());
    b[88..96].copy_from_slice(&s.gen_offset.to_le_bytes());
    b[96..100].copy_from_slice(&s.page_size.to_le_bytes());
    b[100..104].copy_from_slice(&s.db_pages.to_le_bytes());
    let zero = WalPos { salt1: 0, salt2: 0, frame: 0, cksum: (0, 0) };
    let (kind, pos, stat, to) = match s.cursor {
        WalCursor::Unknown => (0u32, zero, DbStat::default(), zero),
        WalCursor::InWal(p) => (1, p, DbStat::default(), zero),
        WalCursor::Ended(st) => (2, zero, st, zero),
        WalCursor::Switching { from, to } => (3, from, DbStat::default(), to),
        WalCursor::Ending { from, stat } => (4, from, stat, zero),
        WalCursor::Starting { to, stat } => (5, zero, stat, to),
    };
    b[192..196].copy_from_slice(&to.salt1.to_le_bytes());
    b[196..200].copy_from_slice(&to.salt2.to_le_bytes());
    b[200..204].copy_from_slice(&to.cksum.0.to_le_bytes());
    b[204..208].copy_from_slice(&to.cksum.1.to_le_bytes());
    b[208..216].copy_from_slice(&id.base_generation.to_le_bytes());
    b[104..108].copy_from_slice(&kind.to_le_bytes());
    b[108..112].copy_from_slice(&pos.salt1.to_le_bytes());
    b[112..116].copy_from_slice(&pos.salt2.to_le_bytes());
    b[116..120].copy_from_slice(&pos.frame.to_le_bytes());
    b[120..124].copy_from_slice(&pos.cksum.0.to_le_bytes());
    b[124..128].copy_from_slice(&pos.cksum.1.to_le_bytes());
    b[128..136].copy_from_slice(&stat.size.to_le_bytes());
    b[136..144].copy_from_slice(&stat.mtime_ns.to_le_bytes());
    b[144..152].copy_from_slice(&stat.ino.to_le_bytes());
    // Where the last batch starts: opening the log re-verifies from there, so a
    // damaged tail is found even when it lies before the durable point.
    b[152..160].copy_from_slice(&tail.end_offset.to_le_bytes());
    b[160..168].copy_from_slice(&tail.last_frame_no.to_le_bytes());
    b[168..176].copy_from_slice(&tail.last_checksum.to_le_bytes());
    b[176..184].copy_from_slice(&tail.generation.to_le_bytes());
    b[184..188].copy_from_slice(&tail.page_size.to_le_bytes());
    b[188..192].copy_from_slice(&tail.db_pages.to_le_bytes());
    let c = crc(&b[0..248]);
    b[248..256].copy_from_slice(&c.to_le_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Why a header slot is unusable.
#[derive(Debug)]
enum SlotProblem {
    NotALog,
    BadCrc,
    BadVersion(u32),
    /// Its CRC matches, but it holds what walcast never writes. The text is
    /// read through Debug, in the error message.
    #[allow(dead_code)]
    Malformed(&'static str),
}

fn valid_page_size(p: u32) -> bool {
    p == 0 || crate::frame::is_page_size(p)
}

fn decode_slot(b: &[u8]) -> Result<(LogIdentity, u64, LogState, LogState), SlotProblem> {
    if &b[0..8] != LOG_MAGIC {
        return Err(SlotProblem::NotALog);
    }
    if crc(&b[0..248]) != u64_at(b, 248) {
        return Err(SlotProblem::BadCrc);
    }
    let version = u32_at(b, 8);
    if version != LOG_VERSION {
        return Err(SlotProblem::BadVersion(version));
    }
    let mut db_id = [0u8; 16];
    db_id.copy_from_slice(&b[16..32]);
    let id = LogIdentity { db_id, first_frame_no: u64_at(b, 32), seed: u64_at(b, 40), base_generation: u64_at(b, 208) };
    let pos = WalPos { salt1: u32_at(b, 108), salt2: u32_at(b, 112), frame: u32_at(b, 116), cksum: (u32_at(b, 120), u32_at(b, 124)) };
    let stat = DbStat { size: u64_at(b, 128), mtime_ns: u64_at(b, 136) as i64, ino: u64_at(b, 144) };
    let to = WalPos { salt1: u32_at(b, 192), salt2: u32_at(b, 196), frame: 0, cksum: (u32_at(b, 200), u32_at(b, 204)) };
    let cursor = match u32_at(b, 104) {
        1 => WalCursor::InWal(pos),
        2 => WalCursor::Ended(stat),
        3 => WalCursor::Switching { from: pos, to },
        4 => WalCursor::Ending { from: pos, stat },
        5 => WalCursor::Starting { to, stat },
        _ => WalCursor::Unknown,
    };
    let state = LogState {
        end_offset: u64_at(b, 56),
        last_frame_no: u64_at(b, 64),
        last_checksum: u64_at(b, 72),
        generation: u64_at(b, 80),
        gen_offset: u64_at(b, 88),
        page_size: u32_at(b, 96),
        db_pages: u32_at(b, 100),
        cursor,
        batches: 0,
    };
    let mut tail = state;
    if u64_at(b, 152) >= RECORDS_START && u64_at(b, 152) <= state.end_offset {
        tail.end_offset = u64_at(b, 152);
        tail.last_frame_no = u64_at(b, 160);
        tail.last_checksum = u64_at(b, 168);
        tail.generation = u64_at(b, 176);
        tail.page_size = u32_at(b, 184);
        tail.db_pages = u32_at(b, 188);
    }
    if id.first_frame_no == 0 || id.first_frame_no > MAX_FRAME_NO {
        return Err(SlotProblem::Malformed("first frame_no out of range"));
    }
    if id.base_generation > MAX_GENERATION || state.generation > MAX_GENERATION || tail.generation > MAX_GENERATION {
        return Err(SlotProblem::Malformed("generation out of range"));
    }
    for s in [&state, &tail] {
        if s.last_frame_no > MAX_FRAME_NO || s.last_frame_no + 1 < id.first_frame_no {
            return Err(SlotProblem::Malformed("last frame_no out of range"));
        }
        if !valid_page_size(s.page_size) {
            return Err(SlotProblem::Malformed("invalid page size"));
        }
    }
    Ok((id, u64_at(b, 48), state, tail))
}

type Header = (LogIdentity, u64, LogState, LogState, Option<String>);

/// Reads both header slots. Returns the identity, the newer valid slot's sequence,
/// durable state and last-batch start, and a description of any damaged slot.
fn read_header(path: &Path, file: &File) -> LogResult<Header> {
    let mut b = [0u8; RECORDS_START as usize];
    let len = file.metadata()?.len();
    if len < RECORDS_START {
        return Err(LogError::NotALog { path: path.into(), what: format!("file is {len} bytes, shorter than the 512-byte header") });
    }
    file.read_exact_at(&mut b, 0)?;
    let a = decode_slot(&b[0..256]);
    let c = decode_slot(&b[256..512]);
    let damaged = |i: usize, p: &SlotProblem| format!("header slot {i} is damaged ({p:?})");
    match (a, c) {
        (Ok(x), Ok(y)) => {
            if x.0.db_id != y.0.db_id {
                return Err(LogError::Corrupt {
                    path: path.into(),
                    frame_no: 0,
                    offset: 0,
                    what: "the two header slots name different databases".into(),
                });
            }
            let (id, seq, st, tail) = if x.1 >= y.1 { x } else { y };
            Ok((id, seq, st, tail, None))
        }
        (Ok(x), Err(p)) => Ok((x.0, x.1, x.2, x.3, Some(damaged(1, &p)))),
        (Err(p), Ok(y)) => Ok((y.0, y.1, y.2, y.3, Some(damaged(0, &p)))),
        (Err(SlotProblem::NotALog), Err(SlotProblem::NotALog)) => {
            Err(LogError::NotALog { path: path.into(), what: "no walcast log header (bad magic)".into() })
        }
        (Err(SlotProblem::BadVersion(v)), _) | (_, Err(SlotProblem::BadVersion(v))) => {
            Err(LogError::NotALog { path: path.into(), what: format!("log format version {v}, this walcast reads {LOG_VERSION}") })
        }
        (Err(p), Err(q)) => Err(LogError::Corrupt {
            path: path.into(),
            frame_no: 0,
            offset: 0,
            what: format!("both header slots are damaged ({p:?}, {q:?})"),
        }),
    }
}

// ---------------------------------------------------------------------------
// Records

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    pub last_frame_no: u64,
    pub checksum: u64,
    pub size_after: u32,
    pub wal: Option<WalPos>,
    pub unix_ms: u64,
}

impl CommitRecord {
    pub fn encode(&self) -> [u8; COMMIT_LEN] {
        let mut b = [0u8; COMMIT_LEN];
        b[0] = TAG_COMMIT;
        b[1..9].copy_from_slice(&self.last_frame_no.to_le_bytes());
        b[9..17].copy_from_slice(&self.checksum.to_le_bytes());
        b[17..21].copy_from_slice(&self.size_after.to_le_bytes());
        let (flags, p) = match self.wal {
            Some(p) => (1u32, p),
            None => (0, WalPos { salt1: 0, salt2: 0, frame: 0, cksum: (0, 0) }),
        };
        b[21..25].copy_from_slice(&flags.to_le_bytes());
        b[25..29].copy_from_slice(&p.salt1.to_le_bytes());
        b[29..33].copy_from_slice(&p.salt2.to_le_bytes());
        b[33..37].copy_from_slice(&p.frame.to_le_bytes());
        b[37..41].copy_from_slice(&p.cksum.0.to_le_bytes());
        b[41..45].copy_from_slice(&p.cksum.1.to_le_bytes());
        b[45..53].copy_from_slice(&self.unix_ms.to_le_bytes());
        let c = crc(&b[0..53]);
        b[53..61].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<CommitRecord> {
        if crc(&b[0..53]) != u64_at(b, 53) {
            return None;
        }
        let wal = (u32_at(b, 21) & 1 == 1).then(|| WalPos {
            salt1: u32_at(b, 25),
            salt2: u32_at(b, 29),
            frame: u32_at(b, 33),
            cksum: (u32_at(b, 37), u32_at(b, 41)),
        });
        Some(CommitRecord { last_frame_no: u64_at(b, 1), checksum: u64_at(b, 9), size_after: u32_at(b, 17), wal, unix_ms: u64_at(b, 45) })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationRecord {
    pub generation: u64,
    pub first_frame_no: u64,
    pub page_size: u32,
    pub unix_ms: u64,
    pub reason: String,
}

impl GenerationRecord {
    pub fn encode(&self) -> Vec<u8> {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(MAX_REASON)];
        let mut b = Vec::with_capacity(40 + reason.len());
        b.push(TAG_GENERATION);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.first_frame_no.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.unix_ms.to_le_bytes());
        b.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        b.extend_from_slice(reason);
        let c = crc(&b);
        b.extend_from_slice(&c.to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalEvent {
    /// walcast wrote a new WAL header: the log now follows this WAL from frame 0.
    Started(WalPos, u32 /* checkpoint sequence */),
    /// walcast truncated or deleted the WAL after capturing all of it.
    Ended(DbStat),
    /// walcast captured all of the WAL at `from` and is about to write a new WAL
    /// header `to` over it. Written (and synced) before the write, so that a
    /// crash in between leaves a position that names both possible WALs.
    Switching(WalPos, WalPos),
    /// walcast captured all of the WAL at `from` and is about to truncate or
    /// delete it, leaving the database file in this state.
    Ending(WalPos, DbStat),
    /// No WAL existed (the database file in this state) and walcast is about to
    /// start the WAL `to`.
    Starting(WalPos, DbStat),
}

fn put_pos(b: &mut [u8], at: usize, p: &WalPos, with_frame: bool) {
    b[at..at + 4].copy_from_slice(&p.salt1.to_le_bytes());
    b[at + 4..at + 8].copy_from_slice(&p.salt2.to_le_bytes());
    let mut i = at + 8;
    if with_frame {
        b[i..i + 4].copy_from_slice(&p.frame.to_le_bytes());
        i += 4;
    }
    b[i..i + 4].copy_from_slice(&p.cksum.0.to_le_bytes());
    b[i + 4..i + 8].copy_from_slice(&p.cksum.1.to_le_bytes());
}

fn get_pos(b: &[u8], at: usize, with_frame: bool) -> WalPos {
    let (frame, ck) = if with_frame { (u32_at(b, at + 8), at + 12) } else { (0, at + 8) };
    WalPos { salt1: u32_at(b, at), salt2: u32_at(b, at + 4), frame, cksum: (u32_at(b, ck), u32_at(b, ck + 4)) }
}

fn put_stat(b: &mut [u8], at: usize, st: &DbStat) {
    b[at..at + 8].copy_from_slice(&st.size.to_le_bytes());
    b[at + 8..at + 16].copy_from_slice(&st.mtime_ns.to_le_bytes());
    b[at + 16..at + 24].copy_from_slice(&st.ino.to_le_bytes());
}

fn get_stat(b: &[u8], at: usize) -> DbStat {
    DbStat { size: u64_at(b, at), mtime_ns: u64_at(b, at + 8) as i64, ino: u64_at(b, at + 16) }
}

// WAL event record: tag, kind, `from` position (20 bytes), `to` WAL start (16),
// checkpoint sequence (4), database stat (24), time (8), CRC-64 (8).
impl WalEvent {
    pub fn encode(&self, unix_ms: u64) -> [u8; WAL_EVENT_LEN] {
        let mut b = [0u8; WAL_EVENT_LEN];
        b[0] = TAG_WAL_EVENT;
        match self {
            WalEvent::Started(to, seq) => {
                b[1] = 1;
                put_pos(&mut b, 22, to, false);
                b[38..42].copy_from_slice(&seq.to_le_bytes());
            }
            WalEvent::Ended(st) => {
                b[1] = 2;
                put_stat(&mut b, 42, st);
            }
            WalEvent::Switching(from, to) => {
                b[1] = 3;
                put_pos(&mut b, 2, from, true);
                put_pos(&mut b, 22, to, false);
            }
            WalEvent::Ending(from, st) => {
                b[1] = 4;
                put_pos(&mut b, 2, from, true);
                put_stat(&mut b, 42, st);
            }
            WalEvent::Starting(to, st) => {
                b[1] = 5;
                put_pos(&mut b, 22, to, false);
                put_stat(&mut b, 42, st);
            }
        }
        b[66..74].copy_from_slice(&unix_ms.to_le_bytes());
        let c = crc(&b[0..74]);
        b[74..82].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<WalEvent> {
        if crc(&b[0..74]) != u64_at(b, 74) {
            return None;
        }
        match b[1] {
            1 => Some(WalEvent::Started(get_pos(b, 22, false), u32_at(b, 38))),
            2 => Some(WalEvent::Ended(get_stat(b, 42))),
            3 => Some(WalEvent::Switching(get_pos(b, 2, true), get_pos(b, 22, false))),
            4 => Some(WalEvent::Ending(get_pos(b, 2, true), get_stat(b, 42))),
            5 => Some(WalEvent::Starting(get_pos(b, 22, false), get_stat(b, 42))),
            _ => None,
        }
    }

    /// The log's cursor after this event.
    pub fn cursor(&self) -> WalCursor {
        match *self {
            WalEvent::Started(p, _) => WalCursor::InWal(p),
            WalEvent::Ended(st) => WalCursor::Ended(st),
            WalEvent::Switching(from, to) => WalCursor::Switching { from, to },
            WalEvent::Ending(from, stat) => WalCursor::Ending { from, stat },
            WalEvent::Starting(to, stat) => WalCursor::Starting { to, stat },
        }
    }
}

/// One record as read back, with its offset.
pub enum Record<'a> {
    Generation(GenerationRecord),
    Frame(FrameHeader, &'a [u8]),
    Commit(CommitRecord),
    WalEvent(WalEvent),
}

/// What ended a scan.
#[derive(Debug)]
pub enum ScanEnd {
    /// Clean end of file at a unit boundary.
    Clean,
    /// The file ends inside a unit: a torn append. Bytes from `state.end_offset` on
    /// are not part of the log.
    Torn { at: u64 },
}

/// Reads records from `start` and validates them: the frame sequence, the
/// checksum chain, record checksums and the batch structure. `state` must be the
/// state at `start`; on return it is the state at the last complete unit. Calls
/// `on_record` for every record that validated, as it is read.
pub fn scan<F>(path: &Path, file: &File, id: &LogIdentity, state: &mut LogState, mut on_record: F) -> LogResult<ScanEnd>
where
    F: FnMut(u64, &Record, &LogState) -> LogResult<()>,
{
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(state.end_offset))?;
    let mut r = BufReader::with_capacity(1 << 18, f);
    let mut off = state.end_offset;
    // The running state, including the unit in progress.
    let mut run = *state;
    let mut in_unit = false;
    let mut unit_last_size_after = 0u32;
    let mut page = Vec::new();
    let corrupt = |frame_no: u64, offset: u64, what: String| LogError::Corrupt { path: path.into(), frame_no, offset, what };
    let _ = id;

    loop {
        let mut tag = [0u8; 1];
        if read_full(&mut r, &mut tag)? == 0 {
            break;
        }
        let rec_off = off;
        match tag[0] {
            TAG_FRAME => {
                let mut h = [0u8; FRAME_HEADER_LEN];
                if read_full(&mut r, &mut h)? < FRAME_HEADER_LEN {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                let fh = FrameHeader::decode(&h);
                if run.page_size == 0 {
                    return Err(corrupt(run.last_frame_no + 1, rec_off, "frame before any generation record".into()));
                }
                page.resize(run.page_size as usize, 0);
                if read_full(&mut r, &mut page)? < page.len() {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                if fh.frame_no != run.last_frame_no + 1 {
                    return Err(corrupt(
                        run.last_frame_no + 1,
                        rec_off,
                        format!("expected frame_no {}, found {}", run.last_frame_no + 1, fh.frame_no),
                    ));
                }
                if !fh.chains_from(run.last_checksum, &page) {
                    return Err(corrupt(fh.frame_no, rec_off, "checksum mismatch".into()));
                }
                if fh.page_no == 0 {
                    return Err(corrupt(fh.frame_no, rec_off, "page_no 0".into()));
                }
                if in_unit && unit_last_size_after != 0 {
                    return Err(corrupt(fh.frame_no, rec_off, "frame follows the last frame of its transaction".into()));
                }
                in_unit = true;
                unit_last_size_after = fh.size_after;
                run.last_frame_no = fh.frame_no;
                run.last_checksum = fh.checksum;
                off += 1 + FRAME_HEADER_LEN as u64 + page.len() as u64;
                on_record(rec_off, &Record::Frame(fh, &page), &run)?;
            }
            TAG_COMMIT => {
                let mut b = [0u8; COMMIT_LEN];
                b[0] = TAG_COMMIT;
                if read_full(&mut r, &mut b[1..])? < COMMIT_LEN - 1 {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                let c = CommitRecord::decode(&b)
                    .ok_or_else(|| corrupt(run.last_frame_no, rec_off, "commit record checksum mismatch".into()))?;
                if c.last_frame_no != run.last_frame_no || c.checksum != run.last_checksum {
                    return Err(corrupt(
                        run.last_frame_no,
                        rec_off,
                        format!("commit record names frame_no {} but the batch ends at {}", c.last_frame_no, run.last_frame_no),
                    ));
                }
                if in_unit && unit_last_size_after != c.size_after {
                    return Err(corrupt(run.last_frame_no, rec_off, "transaction's last frame has no size_after".into()));
                }
                run.db_pages = c.size_after;
                if let Some(p) = c.wal {
                    run.cursor = WalCursor::InWal(p);
                }
                run.batches += 1;
                off += COMMIT_LEN as u64;
                in_unit = false;
                unit_last_size_after = 0;
                run.end_offset = off;
                on_record(rec_off, &Record::Commit(c), &run)?;
                *state = run;
            }
            TAG_GENERATION => {
                let mut fixed = [0u8; 30];
                if read_full(&mut r, &mut fixed)? < 30 {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                let reason_len = u16::from_le_bytes([fixed[28], fixed[29]]) as usize;
                if reason_len > MAX_REASON {
                    return Err(corrupt(run.last_frame_no, rec_off, "generation record is malformed".into()));
                }
                let mut rest = vec![0u8; reason_len + 8];
                if read_full(&mut r, &mut rest)? < rest.len() {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                let mut all = Vec::with_capacity(31 + reason_len);
                all.push(TAG_GENERATION);
                all.extend_from_slice(&fixed);
                all.extend_from_slice(&rest[..reason_len]);
                if crc(&all) != u64_at(&rest, reason_len) {
                    return Err(corrupt(run.last_frame_no, rec_off, "generation record checksum mismatch".into()));
                }
                if in_unit {
                    return Err(corrupt(run.last_frame_no, rec_off, "generation record inside a transaction".into()));
                }
                let g = GenerationRecord {
                    generation: u64_at(&fixed, 0),
                    first_frame_no: u64_at(&fixed, 8),
                    page_size: u32_at(&fixed, 16),
                    unix_ms: u64_at(&fixed, 20),
                    reason: String::from_utf8_lossy(&rest[..reason_len]).into_owned(),
                };
                if run.generation.checked_add(1) != Some(g.generation)
                    || g.generation > MAX_GENERATION
                    || run.last_frame_no.checked_add(1) != Some(g.first_frame_no)
                {
                    return Err(corrupt(
                        run.last_frame_no,
                        rec_off,
                        format!("generation {} out of sequence (after generation {})", g.generation, run.generation),
                    ));
                }
                if !crate::frame::is_page_size(g.page_size) {
                    return Err(corrupt(run.last_frame_no, rec_off, format!("invalid page size {}", g.page_size)));
                }
                run.generation = g.generation;
                run.gen_offset = rec_off;
                run.page_size = g.page_size;
                run.cursor = WalCursor::Unknown;
                in_unit = true;
                unit_last_size_after = 0;
                off += (31 + reason_len + 8) as u64;
                on_record(rec_off, &Record::Generation(g), &run)?;
            }
            TAG_WAL_EVENT => {
                let mut b = [0u8; WAL_EVENT_LEN];
                b[0] = TAG_WAL_EVENT;
                if read_full(&mut r, &mut b[1..])? < WAL_EVENT_LEN - 1 {
                    return Ok(ScanEnd::Torn { at: rec_off });
                }
                let e =
                    WalEvent::decode(&b).ok_or_else(|| corrupt(run.last_frame_no, rec_off, "WAL event record checksum mismatch".into()))?;
                if in_unit {
                    return Err(corrupt(run.last_frame_no, rec_off, "WAL event record inside a transaction".into()));
                }
                run.cursor = e.cursor();
                off += WAL_EVENT_LEN as u64;
                run.end_offset = off;
                on_record(rec_off, &Record::WalEvent(e), &run)?;
                *state = run;
            }
            other => {
                return Err(corrupt(run.last_frame_no + 1, rec_off, format!("unknown record tag 0x{other:02x}")));
            }
        }
    }
    if in_unit {
        Ok(ScanEnd::Torn { at: state.end_offset })
    } else {
        Ok(ScanEnd::Clean)
    }
}

/// Opens `path` with `opts` and O_NOATIME, so that reading it does not write
/// its inode: walcast reads the WAL and the log right after they are written,
/// and with relatime every such read would update the access time (an inode
/// write: 7% of the capture thread's samples at 1,000 commits/s). Opened
/// without it where the kernel refuses it (a file another user owns).
pub(crate) fn open_noatime(opts: &OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut with = opts.clone();
    with.custom_flags(libc::O_NOATIME);
    match with.open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => opts.open(path),
        r => r,
    }
}

/// Reads at `off` until `buf` is full or the file ends; returns the bytes read.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Reading a whole log (verify, restore)

pub struct LogFile {
    pub path: PathBuf,
    pub file: File,
    pub id: LogIdentity,
    /// The newest valid header snapshot.
    pub snapshot: LogState,
    /// A damaged header slot, if one is.
    pub header_problem: Option<String>,
}

impl LogFile {
    pub fn open(path: &Path) -> LogResult<LogFile> {
        let file = open_noatime(OpenOptions::new().read(true), path)?;
        // A writer rewrites a header slot at each sync: read the header while no
        // writer holds the lock, so that a slot is never seen half-written.
        file.lock_shared()?;
        let header = read_header(path, &file);
        let _ = file.unlock();
        let (id, _seq, snapshot, _tail, header_problem) = header?;
        Ok(LogFile { path: path.into(), file, id, snapshot, header_problem })
    }

    /// Scans the whole log from its first record.
    pub fn scan_all<F>(&self, on_record: F) -> LogResult<(LogState, ScanEnd)>
    where
        F: FnMut(u64, &Record, &LogState) -> LogResult<()>,
    {
        let mut st = self.id.initial_state();
        let end = scan(&self.path, &self.file, &self.id, &mut st, on_record)?;
        Ok((st, end))
    }
}

// ---------------------------------------------------------------------------
// Writing

/// The writer's view of a log: its identity, its state, and a batch in progress.
/// Only one writer appends at a time: the caller holds the process's mutex and
/// this file's exclusive flock (see `lock`).
pub struct LogWriter {
    pub path: PathBuf,
    file: File,
    /// The same open file description as `file`, for the flock guard.
    lock_file: std::sync::Arc<File>,
    pub id: LogIdentity,
    pub state: LogState,
    /// The state where the last batch starts (for the header's tail check).
    last_batch_start: LogState,
    /// Why the current generation started, when this writer has read or written
    /// its generation record.
    pub generation_reason: Option<String>,
    /// Everything before this offset is known to be durable.
    durable_end: u64,
    /// The last `sync` failed in fsync itself (not in the writes before it).
    sync_data_failed: bool,
    /// Writeback has been started for everything before this offset.
    writeback_end: u64,
    slot_seq: u64,
    pending: Option<Pending>,
    buf: Vec<u8>,
    /// Where `buf` starts in the file.
    buf_offset: u64,
    /// Committed units not yet written (see `commit_deferred`), where they go
    /// in the file, and the state (and last batch start) to go back to if
    /// they cannot be written.
    deferred: Vec<u8>,
    deferred_from: Option<Deferred>,
}

#[derive(Clone, Copy)]
struct Deferred {
    at: u64,
    state: LogState,
    batch_start: LogState,
}

struct Pending {
    start: LogState,
    run: LogState,
    last_size_after: Option<u32>,
}

/// Holds a log's flock; dropping it releases the lock.
pub struct LogLock(std::sync::Arc<File>);

impl Drop for LogLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// What opening a log found at its tail.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// A torn append that was cut off: (offset, bytes dropped).
    pub torn_tail: Option<(u64, u64)>,
    /// What was wrong with an unsynced tail that was cut off.
    pub garbage_tail: Option<String>,
    pub header_problem: Option<String>,
}

const FLUSH_AT: usize = 1 << 20;
/// Appended bytes gathered before their writeback is started.
const WRITEBACK_AT: u64 = 256 << 10;

impl LogWriter {
    /// Creates a new log; fails if the file exists.
    pub fn create(path: &Path, db_id: [u8; 16]) -> LogResult<LogWriter> {
        Self::create_with(path, LogIdentity::new(db_id))
    }

    /// Creates a new log that continues from `id` (a promotion); fails if the
    /// file exists.
    pub fn create_with(path: &Path, id: LogIdentity) -> LogResult<LogWriter> {
        let file = open_noatime(OpenOptions::new().read(true).write(true).create_new(true), path)?;
        let state = id.initial_state();
        let lock_file = std::sync::Arc::new(file.try_clone()?);
        let mut w = LogWriter {
            path: path.into(),
            file,
            lock_file,
            id,
            state,
            last_batch_start: state,
            generation_reason: None,
            durable_end: RECORDS_START,
            sync_data_failed: false,
            writeback_end: RECORDS_START,
            slot_seq: 0,
            pending: None,
            buf: Vec::new(),
            buf_offset: 0,
            deferred: Vec::new(),
            deferred_from: None,
        };
        w.file.write_all_at(&encode_slot(&id, 1, &state, &state), 0)?;
        w.file.write_all_at(&encode_slot(&id, 0, &state, &state), SLOT_LEN)?;
        w.slot_seq = 1;
        w.file.sync_all()?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                let _ = d.sync_all();
            }
        }
        Ok(w)
    }

    /// Opens an existing log and validates its tail from the newest durable header
    /// snapshot. Caller must hold the lock if it wants torn tails cut off
    /// (`repair`); otherwise the state stops at the last complete unit.
    pub fn open(path: &Path, repair: bool) -> LogResult<(LogWriter, OpenReport)> {
        let file = open_noatime(OpenOptions::new().read(true).write(true), path)?;
        let (id, seq, snapshot, tail, header_problem) = read_header(path, &file)?;
        let len = file.metadata()?.len();
        if snapshot.end_offset > len || snapshot.end_offset < RECORDS_START {
            return Err(LogError::Corrupt {
                path: path.into(),
                frame_no: snapshot.last_frame_no,
                offset: len,
                what: format!(
                    "log is truncated: its header records {} durable bytes up to frame_no {}, but the file has {} bytes",
                    snapshot.end_offset, snapshot.last_frame_no, len
                ),
            });
        }
        // Re-verify from the start of the last durable batch, not just from the
        // durable point, so that damage to the log's tail is found on open.
        let mut start = tail;
        start.cursor = snapshot.cursor;
        start.gen_offset = snapshot.gen_offset;
        let lock_file = std::sync::Arc::new(file.try_clone()?);
        let mut w = LogWriter {
            path: path.into(),
            file,
            lock_file,
            id,
            state: start,
            last_batch_start: start,
            generation_reason: None,
            durable_end: snapshot.end_offset,
            sync_data_failed: false,
            writeback_end: snapshot.end_offset,
            slot_seq: seq,
            pending: None,
            buf: Vec::new(),
            buf_offset: 0,
            deferred: Vec::new(),
            deferred_from: None,
        };
        let mut report = OpenReport { header_problem, ..Default::default() };
        w.extend_from_file(repair, &mut report)?;
        if w.state.end_offset < snapshot.end_offset {
            return Err(LogError::Corrupt {
                path: path.into(),
                frame_no: w.state.last_frame_no + 1,
                offset: w.state.end_offset,
                what: format!("the durable part of the log ends early (at byte {} of {})", w.state.end_offset, snapshot.end_offset),
            });
        }
        Ok((w, report))
    }

    /// Reads records other processes appended since our state was taken, and
    /// cuts off a batch one of them left unfinished (it crashed). The caller
    /// holds the lock, so no other process is appending now.
    pub fn refresh(&mut self) -> LogResult<()> {
        let len = self.file.metadata()?.len();
        if len < self.state.end_offset {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                frame_no: self.state.last_frame_no,
                offset: len,
                what: format!("log shrank to {} bytes while walcast had read {} bytes of it", len, self.state.end_offset),
            });
        }
        if len > self.state.end_offset {
            let mut report = OpenReport::default();
            self.extend_from_file(true, &mut report)?;
        }
        Ok(())
    }

    fn extend_from_file(&mut self, repair: bool, report: &mut OpenReport) -> LogResult<()> {
        let mut st = self.state;
        let mut unit_start = self.state;
        let mut last_batch_start = self.last_batch_start;
        let mut reason = None;
        let scanned = scan(&self.path, &self.file, &self.id, &mut st, |_, rec, run| {
            match rec {
                Record::Generation(g) => reason = Some(g.reason.clone()),
                Record::Commit(_) => {
                    last_batch_start = unit_start;
                    unit_start = *run;
                }
                Record::WalEvent(_) => unit_start = *run,
                _ => {}
            }
            Ok(())
        });
        let end = match scanned {
            // Appends are synced only where SQLite destroys WAL content, so after
            // a power loss the part past the last durable point can hold
            // anything. Everything in it is still in the WAL: cut it, like a torn
            // append. Damage before that point is corruption.
            Err(LogError::Corrupt { offset, what, .. }) if repair && offset >= self.durable_end => {
                report.garbage_tail = Some(format!("at byte {offset}: {what}"));
                ScanEnd::Torn { at: offset }
            }
            other => other?,
        };
        if reason.is_some() && st.generation > self.state.generation {
            self.generation_reason = reason;
        }
        self.state = st;
        self.last_batch_start = last_batch_start;
        if let ScanEnd::Torn { .. } = end {
            let len = self.file.metadata()?.len();
            if repair && len > st.end_offset {
                self.file.set_len(st.end_offset)?;
                report.torn_tail = Some((st.end_offset, len - st.end_offset));
            }
        }
        Ok(())
    }

    /// Takes this log's exclusive cross-process lock (flock), released when the
    /// guard is dropped, also when a panic unwinds. Threads of one process are
    /// serialized by the caller's mutex, since flock is per file description.
    /// A batch left in progress by a panic is dropped.
    pub fn lock(&mut self) -> io::Result<LogLock> {
        self.lock_file.lock()?;
        // A batch still pending here was left by a panic that released the
        // lock. It is forgotten, not cut from the file: another process may
        // have cut it and appended units since. The refresh every writer makes
        // after locking cuts it if it is still there.
        self.forget_pending();
        self.drop_deferred();
        Ok(LogLock(self.lock_file.clone()))
    }

    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    // -- batches ----------------------------------------------------------

    fn start_unit(&mut self) {
        debug_assert!(self.pending.is_none());
        self.buf.clear();
        self.buf_offset = self.state.end_offset;
        self.pending = Some(Pending { start: self.state, run: self.state, last_size_after: None });
    }

    /// Starts a new generation; a base image (frames, then `commit`) must follow.
    pub fn begin_generation(&mut self, page_size: u32, reason: &str) -> LogResult<()> {
        self.start_unit();
        let p = self.pending.as_mut().unwrap();
        let g = GenerationRecord {
            generation: p.run.generation + 1,
            first_frame_no: p.run.last_frame_no + 1,
            page_size,
            unix_ms: now_ms(),
            reason: reason.into(),
        };
        p.run.generation = g.generation;
        p.run.gen_offset = self.buf_offset + self.buf.len() as u64;
        p.run.page_size = page_size;
        p.run.cursor = WalCursor::Unknown;
        self.buf.extend_from_slice(&g.encode());
        self.generation_reason = Some(g.reason);
        Ok(())
    }

    /// Starts the batch of one transaction.
    pub fn begin_batch(&mut self) {
        self.start_unit();
    }

    /// Appends a frame to the batch in progress. `size_after` is non-zero only on
    /// the batch's last frame.
    pub fn add_frame(&mut self, page_no: u32, size_after: u32, page: &[u8]) -> LogResult<FrameHeader> {
        let p = self.pending.as_mut().expect("add_frame outside a batch");
        assert_eq!(page.len(), p.run.page_size as usize, "page size differs from the generation's");
        let fh = crate::frame::make_frame(p.run.last_checksum, p.run.last_frame_no + 1, page_no, size_after, page);
        p.run.last_frame_no = fh.frame_no;
        p.run.last_checksum = fh.checksum;
        p.last_size_after = Some(size_after);
        self.buf.push(TAG_FRAME);
        self.buf.extend_from_slice(&fh.encode());
        self.buf.extend_from_slice(page);
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(fh)
    }

    fn flush_buf(&mut self) -> LogResult<()> {
        // Deferred units come first in the file.
        self.flush()?;
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.buf_offset)?;
            self.buf_offset += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Closes the batch in progress with a commit record. The batch is part of the
    /// log once this returns Ok.
    pub fn commit(&mut self, size_after: u32, wal: Option<WalPos>) -> LogResult<LogState> {
        let st = self.commit_deferred(size_after, wal)?;
        self.flush()?;
        Ok(st)
    }

    /// Closes the batch in progress with a commit record, and keeps it in
    /// memory to be written with the units that follow it, by `flush`: one
    /// large write costs the kernel far less than one per transaction. Until
    /// then the unit is in this writer's state only, not in the file.
    pub fn commit_deferred(&mut self, size_after: u32, wal: Option<WalPos>) -> LogResult<LogState> {
        let p = self.pending.as_ref().expect("commit outside a batch");
        if let Some(s) = p.last_size_after {
            assert_eq!(s, size_after, "last frame must carry size_after");
        }
        let c = CommitRecord { last_frame_no: p.run.last_frame_no, checksum: p.run.last_checksum, size_after, wal, unix_ms: now_ms() };
        let mut run = p.run;
        let start = p.start;
        self.buf.extend_from_slice(&c.encode());
        let end = self.buf_offset + self.buf.len() as u64;
        // A large batch may have reached the file in part already: what is
        // left of it goes where it left off.
        let d = *self.deferred_from.get_or_insert(Deferred { at: self.buf_offset, state: start, batch_start: self.last_batch_start });
        debug_assert_eq!(d.at + self.deferred.len() as u64, self.buf_offset, "deferred units are contiguous");
        if self.deferred.is_empty() {
            std::mem::swap(&mut self.deferred, &mut self.buf);
        } else {
            self.deferred.extend_from_slice(&self.buf);
        }
        self.buf.clear();
        run.db_pages = size_after;
        if let Some(w) = wal {
            run.cursor = WalCursor::InWal(w);
        }
        run.batches += 1;
        run.end_offset = end;
        self.last_batch_start = start;
        self.state = run;
        self.pending = None;
        Ok(run)
    }

    /// Writes the units `commit_deferred` kept in memory. On failure they are
    /// dropped: the state goes back to before the first of them, and whatever
    /// of them reached the file is cut off (capture takes them again from the
    /// WAL at its next pass).
    pub fn flush(&mut self) -> LogResult<()> {
        let Some(d) = self.deferred_from else { return Ok(()) };
        match self.file.write_all_at(&self.deferred, d.at) {
            Ok(()) => {
                self.deferred.clear();
                self.deferred_from = None;
                Ok(())
            }
            Err(e) => {
                self.forget_pending();
                self.drop_deferred();
                let _ = self.file.set_len(d.state.end_offset);
                Err(e.into())
            }
        }
    }

    /// Forgets deferred units that were never written (a pass that failed
    /// half-way, or whose source turned out to be stale): the state goes back
    /// to the file's.
    pub fn drop_deferred(&mut self) {
        if let Some(d) = self.deferred_from.take() {
            self.deferred.clear();
            self.state = d.state;
            self.last_batch_start = d.batch_start;
            // Part of a large batch that reached the file is an unfinished
            // batch: `refresh` cuts it (other processes may have appended
            // since, so it is not cut here).
        }
    }

    /// Forgets the batch in progress, in memory only: the state goes back to
    /// before it.
    fn forget_pending(&mut self) -> Option<Pending> {
        let p = self.pending.take()?;
        self.buf.clear();
        self.state = p.start;
        Some(p)
    }

    /// Drops the batch in progress, cutting off whatever of it reached the file.
    pub fn abort(&mut self) {
        if let Some(p) = self.forget_pending() {
            // While deferred units wait, nothing of this batch reached the file
            // (writing any of it writes them first), and the file ends before
            // them: cutting it at the batch's start would extend it instead.
            if self.deferred_from.is_none() {
                // If this fails, the next open or refresh cuts the unfinished batch.
                let _ = self.file.set_len(p.start.end_offset);
            }
        }
    }

    pub fn in_batch(&self) -> bool {
        self.pending.is_some()
    }

    /// Appends a WAL event record.
    pub fn wal_event(&mut self, e: WalEvent) -> LogResult<()> {
        assert!(self.pending.is_none());
        self.flush()?;
        let b = e.encode(now_ms());
        self.file.write_all_at(&b, self.state.end_offset)?;
        self.state.end_offset += b.len() as u64;
        self.state.cursor = e.cursor();
        Ok(())
    }

    /// Starts writing what was appended back to disk, without waiting, once
    /// enough has gathered. The sync that must come before SQLite restarts the
    /// WAL runs on SQLite's thread: this way it finds the log's pages written
    /// (or in flight) rather than megabytes to write, and the disk sees a
    /// steady stream instead of a burst at every restart.
    pub fn start_writeback(&mut self) {
        let end = self.state.end_offset;
        if end < self.writeback_end.max(self.durable_end) + WRITEBACK_AT {
            return;
        }
        let from = self.writeback_end.max(self.durable_end);
        // Advisory: a failure only leaves the work to the next sync.
        let _ = crate::vfs::start_writeback(&self.file, from, end - from);
        self.writeback_end = end;
    }

    /// Whether the last `sync` failed in fsync itself: then what was written
    /// before it may be lost, and only a sync that succeeds ends the failure.
    /// A failed write before the fsync is an ordinary write failure.
    pub fn sync_data_failed(&self) -> bool {
        self.sync_data_failed
    }

    /// Whether everything appended so far is known to be durable: synced by
    /// this writer, or by any writer before this one opened the log. Appends
    /// another process made since are not known to be.
    pub fn is_durable(&self) -> bool {
        self.durable_end >= self.state.end_offset
    }

    /// Makes everything appended so far durable, then records this point in the
    /// older header slot (that slot write becomes durable at the next sync; until
    /// then the other slot still names a durable point).
    pub fn sync(&mut self) -> LogResult<()> {
        self.flush()?;
        self.sync_data_failed = true;
        self.file.sync_data()?;
        self.sync_data_failed = false;
        self.durable_end = self.state.end_offset;
        // Write the slot that is not the newest valid one on disk. Another
        // process may have written a newer slot since we read the header; and a
        // slot write of ours that failed half-way (EIO, a full disk) left that
        // slot damaged, so the next sync must rewrite it, never the other one,
        // which is then the only valid slot.
        let mut b = [0u8; RECORDS_START as usize];
        let (slot, newest) = match self.file.read_exact_at(&mut b, 0).map(|_| (decode_slot(&b[0..256]), decode_slot(&b[256..512]))) {
            Ok((Ok(x), Ok(y))) if x.1 >= y.1 => (1, x.1),
            Ok((Ok(_), Ok(y))) => (0, y.1),
            Ok((Ok(x), Err(_))) => (1, x.1),
            Ok((Err(_), Ok(y))) => (0, y.1),
            _ => ((self.slot_seq + 1) % 2, self.slot_seq),
        };
        let seq = newest.max(self.slot_seq) + 1;
        let mut st = self.state;
        st.batches = 0;
        self.file.write_all_at(&encode_slot(&self.id, seq, &st, &self.last_batch_start), slot * SLOT_LEN)?;
        self.slot_seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        crate::testutil::scratch_dir(&format!("log-{name}")).join(name)
    }

    #[test]
    fn a_promoted_log_continues_the_frame_numbering_and_chain_in_the_next_term() {
        let p = tmp("promoted");
        let id = LogIdentity::continuing([7u8; 16], (2 << 32) | 5, 41, 0xfeed);
        let mut w = LogWriter::create_with(&p, id).unwrap();
        w.begin_generation(512, "promoted").unwrap();
        let f = w.add_frame(1, 1, &[1u8; 512]).unwrap();
        w.commit(1, None).unwrap();
        w.sync().unwrap();
        assert_eq!(f.frame_no, 42);
        assert!(f.chains_from(0xfeed, &[1u8; 512]), "the first frame chains from the last applied checksum");
        let (r, _) = LogWriter::open(&p, false).unwrap();
        assert_eq!(r.id, id, "the identity, base generation included, survives the header");
        assert_eq!(r.state.generation, (3 << 32) | 1);
        assert_eq!(term_of(r.state.generation), 3);
        let (st, end) = LogFile::open(&p).unwrap().scan_all(|_, _, _| Ok(())).unwrap();
        assert_eq!((st.last_frame_no, st.generation), (42, (3 << 32) | 1));
        assert!(matches!(end, ScanEnd::Clean));
    }

    #[test]
    fn generations_past_the_limit_are_refused_in_the_header() {
        // Found by fuzzing: a generation record after generation u64::MAX
        // overflowed the scan. The header now bounds generations.
        let p = tmp("last-term");
        let ok = LogIdentity::continuing([7u8; 16], MAX_GENERATION - (2 << 32), 1, 2);
        assert!(ok.base_generation <= MAX_GENERATION);
        LogWriter::create_with(&p, ok).unwrap();
        assert!(LogFile::open(&p).is_ok());
        let past = LogIdentity::continuing([7u8; 16], MAX_GENERATION, 1, 2);
        std::fs::remove_file(&p).unwrap();
        LogWriter::create_with(&p, past).unwrap();
        let e = LogFile::open(&p).err().expect("a base generation past the limit is refused").to_string();
        assert!(e.contains("generation out of range"), "{e}");
    }

    fn sample(path: &Path) -> LogWriter {
        let mut w = LogWriter::create(path, [7u8; 16]).unwrap();
        w.begin_generation(512, "test").unwrap();
        w.add_frame(1, 0, &[1u8; 512]).unwrap();
        w.add_frame(2, 2, &[2u8; 512]).unwrap();
        w.commit(2, None).unwrap();
        w.begin_batch();
        w.add_frame(2, 2, &[3u8; 512]).unwrap();
        let pos = WalPos { salt1: 1, salt2: 2, frame: 3, cksum: (4, 5) };
        w.commit(2, Some(pos)).unwrap();
        w.wal_event(WalEvent::Ended(DbStat { size: 1024, mtime_ns: 5, ino: 6 })).unwrap();
        w
    }

    #[test]
    fn write_then_read_back() {
        let p = tmp("a.log");
        let w = sample(&p);
        let st = w.state;
        assert_eq!(st.last_frame_no, 3);
        let (w2, rep) = LogWriter::open(&p, true).unwrap();
        assert!(rep.torn_tail.is_none());
        assert_eq!(w2.state.last_frame_no, 3);
        assert_eq!(w2.state.last_checksum, st.last_checksum);
        assert_eq!(w2.state.cursor, WalCursor::Ended(DbStat { size: 1024, mtime_ns: 5, ino: 6 }));
        assert_eq!(w2.state.end_offset, st.end_offset);
    }

    #[test]
    fn deferred_units_reach_the_file_in_one_write_and_an_abort_never_extends_it() {
        let p = tmp("deferred.log");
        let mut w = LogWriter::create(&p, [7u8; 16]).unwrap();
        w.begin_generation(512, "test").unwrap();
        w.add_frame(1, 1, &[1u8; 512]).unwrap();
        w.commit(1, None).unwrap();
        let written = std::fs::metadata(&p).unwrap().len();
        for (i, fill) in [5u8, 6].into_iter().enumerate() {
            w.begin_batch();
            w.add_frame(1, 1, &[fill; 512]).unwrap();
            let pos = WalPos { salt1: 1, salt2: 2, frame: i as u32 + 1, cksum: (3, 4) };
            w.commit_deferred(1, Some(pos)).unwrap();
        }
        let state = w.state;
        assert_eq!(std::fs::metadata(&p).unwrap().len(), written, "deferred units wait in memory");
        // A batch dropped while units wait: the file is neither cut nor extended.
        w.begin_batch();
        w.add_frame(1, 1, &[9u8; 512]).unwrap();
        w.abort();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), written);
        assert_eq!(w.state, state, "the deferred units stay");
        w.flush().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), state.end_offset);
        let (r, rep) = LogWriter::open(&p, true).unwrap();
        assert!(rep.torn_tail.is_none() && rep.garbage_tail.is_none());
        assert_eq!((r.state.last_frame_no, r.state.last_checksum, r.state.cursor), (3, state.last_checksum, state.cursor));

        // Units deferred by a pass that never flushed are forgotten at the next lock.
        w.begin_batch();
        w.add_frame(1, 1, &[7u8; 512]).unwrap();
        w.commit_deferred(1, None).unwrap();
        assert_eq!(w.state.last_frame_no, 4);
        drop(w.lock().unwrap());
        assert_eq!(w.state, state, "back to what the file holds");
        w.begin_batch();
        w.add_frame(1, 1, &[8u8; 512]).unwrap();
        w.commit(1, None).unwrap();
        let (st, end) = LogFile::open(&p).unwrap().scan_all(|_, _, _| Ok(())).unwrap();
        assert_eq!(st.last_frame_no, 4);
        assert!(matches!(end, ScanEnd::Clean));
    }

    #[test]
    fn a_large_batch_after_deferred_units_is_written_where_it_belongs() {
        // A batch past FLUSH_AT reaches the file while it is being built: the
        // units deferred before it go first, and its rest after its start.
        let p = tmp("deferred-large.log");
        let mut w = LogWriter::create(&p, [7u8; 16]).unwrap();
        w.begin_generation(65536, "test").unwrap();
        w.add_frame(1, 1, &vec![1u8; 65536]).unwrap();
        w.commit_deferred(1, None).unwrap();
        for round in 0..2u8 {
            w.begin_batch();
            for i in 0..24u32 {
                w.add_frame(i + 1, if i == 23 { 24 } else { 0 }, &vec![round * 50 + i as u8; 65536]).unwrap();
            }
            w.commit_deferred(24, None).unwrap();
            w.begin_batch();
            w.add_frame(1, 24, &vec![9u8; 65536]).unwrap();
            w.commit_deferred(24, None).unwrap();
        }
        w.flush().unwrap();
        let mut pages = Vec::new();
        let (st, end) = LogFile::open(&p)
            .unwrap()
            .scan_all(|_, r, _| {
                if let Record::Frame(h, pg) = r {
                    pages.push((h.frame_no, pg[0]));
                }
                Ok(())
            })
            .unwrap();
        assert!(matches!(end, ScanEnd::Clean));
        assert_eq!((st.last_frame_no, st.end_offset), (w.state.last_frame_no, w.state.end_offset));
        assert_eq!(pages.len(), 51);
        assert_eq!(pages[1], (2, 0));
        assert_eq!(pages[26], (27, 50));
        assert_eq!(pages[50], (51, 9));
    }

    #[test]
    fn torn_tail_is_cut_off_on_open() {
        let p = tmp("b.log");
        let mut w = sample(&p);
        let good = w.state;
        w.begin_batch();
        w.add_frame(1, 2, &[9u8; 512]).unwrap();
        w.flush_buf().unwrap(); // reaches the file, but no commit record
        let (w2, rep) = LogWriter::open(&p, true).unwrap();
        assert_eq!(w2.state.last_frame_no, good.last_frame_no);
        assert!(rep.torn_tail.is_some());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good.end_offset);
    }

    #[test]
    fn unsynced_garbage_is_cut_but_damage_before_the_durable_point_is_corruption() {
        let p = tmp("d.log");
        let mut w = sample(&p);
        w.sync().unwrap();
        let durable = w.state;
        w.begin_batch();
        w.add_frame(1, 2, &[5u8; 512]).unwrap();
        w.commit(2, None).unwrap();
        // A power loss leaves the unsynced batch as zeros.
        let len = std::fs::metadata(&p).unwrap().len();
        let zeros = vec![0u8; (len - durable.end_offset) as usize];
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all_at(&zeros, durable.end_offset).unwrap();
        let (w2, rep) = LogWriter::open(&p, true).unwrap();
        assert!(rep.garbage_tail.is_some());
        assert_eq!(w2.state.last_frame_no, durable.last_frame_no);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), durable.end_offset);
        // Damage to the last durable batch (the sample ends with a commit record
        // and a WAL event) is an error.
        let mut b = std::fs::read(&p).unwrap();
        b[(durable.end_offset - WAL_EVENT_LEN as u64 - 30) as usize] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(LogWriter::open(&p, true), Err(LogError::Corrupt { .. })));
    }

    #[test]
    fn a_damaged_header_slot_is_rewritten_not_the_valid_one() {
        let p = tmp("slots.log");
        let mut w = sample(&p);
        w.sync().unwrap();
        // The slot just written is damaged, as a slot write that failed
        // half-way (EIO, a full disk) leaves it.
        let newest = w.slot_seq % 2;
        let mut b = std::fs::read(&p).unwrap();
        b[(newest * SLOT_LEN + 40) as usize] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(LogWriter::open(&p, false).unwrap().1.header_problem.is_some());
        // The next sync repairs it instead of overwriting the only valid slot.
        w.sync().unwrap();
        let (_, rep) = LogWriter::open(&p, false).unwrap();
        assert!(rep.header_problem.is_none(), "{:?}", rep.header_problem);
    }

    #[test]
    fn an_unfinished_batch_of_another_process_is_cut_before_appending() {
        let p = tmp("e.log");
        let mut a = sample(&p);
        let (mut b, _) = LogWriter::open(&p, true).unwrap();
        // Process A dies mid-batch after a flush.
        a.begin_batch();
        for i in 0..3000 {
            a.add_frame(1 + i % 2, 0, &[7u8; 512]).unwrap();
        }
        drop(a);
        let _l = b.lock().unwrap();
        b.refresh().unwrap();
        b.begin_batch();
        b.add_frame(1, 2, &[8u8; 512]).unwrap();
        b.commit(2, None).unwrap();
        drop(_l);
        let (c, _) = LogWriter::open(&p, false).unwrap();
        assert_eq!(c.state.last_frame_no, 4);
        let lf = LogFile::open(&p).unwrap();
        assert!(matches!(lf.scan_all(|_, _, _| Ok(())).unwrap().1, ScanEnd::Clean));
    }

    #[test]
    fn a_batch_left_by_a_panic_is_forgotten_without_cutting_what_others_appended() {
        let p = tmp("g.log");
        let mut a = sample(&p);
        let (mut b, _) = LogWriter::open(&p, true).unwrap();
        // A's batch is flushed in part, then a panic releases the lock.
        let la = a.lock().unwrap();
        a.refresh().unwrap();
        a.begin_batch();
        for i in 0..3000 {
            a.add_frame(1 + i % 2, 0, &[7u8; 512]).unwrap();
        }
        drop(la);
        // B cuts A's unfinished batch and appends a transaction.
        let lb = b.lock().unwrap();
        b.refresh().unwrap();
        b.begin_batch();
        b.add_frame(1, 2, &[8u8; 512]).unwrap();
        b.commit(2, None).unwrap();
        drop(lb);
        // A locks again: B's transaction stays, and A continues after it.
        let la = a.lock().unwrap();
        a.refresh().unwrap();
        assert_eq!(a.state.last_frame_no, 4);
        a.begin_batch();
        a.add_frame(2, 2, &[9u8; 512]).unwrap();
        a.commit(2, None).unwrap();
        drop(la);
        let (c, _) = LogWriter::open(&p, false).unwrap();
        assert_eq!(c.state.last_frame_no, 5);
        let lf = LogFile::open(&p).unwrap();
        assert!(matches!(lf.scan_all(|_, _, _| Ok(())).unwrap().1, ScanEnd::Clean));
    }

    /// Found by the log_scan fuzz target: a header slot whose CRC matches but
    /// whose first frame_no was 0 made opening the log subtract past zero.
    #[test]
    fn header_slots_with_impossible_fields_are_damaged_not_a_panic() {
        let p = tmp("f.log");
        let mut w = sample(&p);
        w.sync().unwrap();
        let orig = std::fs::read(&p).unwrap();
        let fields: [(usize, &[u8]); 4] =
            [(32, &0u64.to_le_bytes()), (64, &u64::MAX.to_le_bytes()), (96, &3000u32.to_le_bytes()), (184, &(1u32 << 31).to_le_bytes())];
        for (at, v) in fields {
            let mut b = orig.clone();
            for slot in [0, 256] {
                b[slot + at..slot + at + v.len()].copy_from_slice(v);
                let c = crc(&b[slot..slot + 248]);
                b[slot + 248..slot + 256].copy_from_slice(&c.to_le_bytes());
            }
            std::fs::write(&p, &b).unwrap();
            assert!(matches!(LogFile::open(&p), Err(LogError::Corrupt { .. })), "field at {at}");
            assert!(matches!(LogWriter::open(&p, false), Err(LogError::Corrupt { .. })), "field at {at}");
        }
    }

    #[test]
    fn every_flipped_byte_is_found() {
        let p = tmp("c.log");
        let w = sample(&p);
        let end = w.state.end_offset;
        let orig = std::fs::read(&p).unwrap();
        for at in (RECORDS_START as usize..end as usize).step_by(7) {
            let mut b = orig.clone();
            b[at] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
            let lf = LogFile::open(&p).unwrap();
            let r = lf.scan_all(|_, _, _| Ok(()));
            match r {
                Err(LogError::Corrupt { .. }) => {}
                other => panic!("flip at {at} not found: {:?}", other.map(|(s, e)| (s.last_frame_no, e))),
            }
        }
    }
}
