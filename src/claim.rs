//! `<db>-walcast-claim`: which WAL frames walcast wrote, so that a transaction
//! written by a process without walcast is recognized even while it still sits
//! in the WAL walcast follows.
//!
//! Every walcast writer, while holding the WAL write lock and just before SQLite
//! writes a commit frame, records that frame here (one pwrite, no fsync). It
//! first compares the WAL's last commit (from the wal-index) with the last claim:
//! a commit in between was written without walcast, and is recorded as foreign.
//! The capture side reads the file; a commit it finds in the WAL past the last
//! claim, or a foreign record it has not handled yet, starts a new generation.
//!
//! Layout (little-endian, 40 bytes): magic "WCCLAIM1"; claimed WAL salt-1,
//! salt-2 and frame (u32 each); foreign salt-1, salt-2 and frame; the number of
//! foreign detections (written by writers) and the number handled (written by
//! the capture, under the log lock). Writers and capture write disjoint bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"WCCLAIM1";
const LEN: usize = 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalMark {
    pub salt1: u32,
    pub salt2: u32,
    pub frame: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimState {
    /// The last commit frame a walcast writer wrote (or the start of a WAL it
    /// started, or the position of the last base image).
    pub claimed: WalMark,
    /// Frames at or before this one, in that WAL, include writes made without
    /// walcast.
    pub foreign: WalMark,
    pub foreign_count: u32,
    pub handled_count: u32,
}

impl ClaimState {
    /// True when every commit up to `frame` of the WAL with these salts is known
    /// to come from walcast.
    pub fn covers(&self, salt1: u32, salt2: u32, frame: u32) -> bool {
        self.claimed.salt1 == salt1 && self.claimed.salt2 == salt2 && frame <= self.claimed.frame
    }

    pub fn unhandled_foreign(&self) -> bool {
        self.foreign_count != self.handled_count
    }
}

pub struct ClaimFile {
    file: File,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl ClaimFile {
    pub fn open(path: &Path) -> io::Result<ClaimFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if file.metadata()?.len() < LEN as u64 {
            let mut b = [0u8; LEN];
            b[0..8].copy_from_slice(MAGIC);
            file.write_all_at(&b, 0)?;
        }
        Ok(ClaimFile { file })
    }

    pub fn read(&self) -> io::Result<ClaimState> {
        let mut b = [0u8; LEN];
        self.file.read_exact_at(&mut b, 0)?;
        if &b[0..8] != MAGIC {
            return Err(io::Error::other("claim file has a bad magic number"));
        }
        let mark = |at| WalMark { salt1: u32_at(&b, at), salt2: u32_at(&b, at + 4), frame: u32_at(&b, at + 8) };
        Ok(ClaimState { claimed: mark(8), foreign: mark(20), foreign_count: u32_at(&b, 32), handled_count: u32_at(&b, 36) })
    }

    /// Records a claim (writers, and the capture after a base image; both with
    /// the WAL write lock held).
    pub fn write_claim(&self, m: WalMark) -> io::Result<()> {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&m.salt1.to_le_bytes());
        b[4..8].copy_from_slice(&m.salt2.to_le_bytes());
        b[8..12].copy_from_slice(&m.frame.to_le_bytes());
        self.file.write_all_at(&b, 8)
    }

    /// Records foreign frames (writers, with the WAL write lock held).
    pub fn write_foreign(&self, m: WalMark, count: u32) -> io::Result<()> {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&m.salt1.to_le_bytes());
        b[4..8].copy_from_slice(&m.salt2.to_le_bytes());
        b[8..12].copy_from_slice(&m.frame.to_le_bytes());
        b[12..16].copy_from_slice(&count.to_le_bytes());
        self.file.write_all_at(&b, 20)
    }

    /// Records that the capture has handled `count` foreign detections (log lock held).
    pub fn write_handled(&self, count: u32) -> io::Result<()> {
        self.file.write_all_at(&count.to_le_bytes(), 36)
    }
}

/// What a writer about to write the commit frame `frame` of the WAL with
/// `salts` must record, given the WAL's last commit before its transaction
/// (`wal_last`, from the wal-index) and the current claims.
pub fn on_commit_frame(state: &ClaimState, salts: (u32, u32), wal_last: u32, frame: u32) -> (WalMark, Option<WalMark>) {
    let claim = WalMark { salt1: salts.0, salt2: salts.1, frame };
    let foreign = if wal_last == 0 || state.covers(salts.0, salts.1, wal_last) {
        None
    } else {
        Some(WalMark { salt1: salts.0, salt2: salts.1, frame: wal_last })
    };
    (claim, foreign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_and_foreign_detection() {
        let d = std::env::temp_dir().join(format!("walcast-claim-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("x.db-walcast-claim");
        let _ = std::fs::remove_file(&p);
        let c = ClaimFile::open(&p).unwrap();
        assert_eq!(c.read().unwrap(), ClaimState::default());
        let s = ClaimState { claimed: WalMark { salt1: 1, salt2: 2, frame: 10 }, ..Default::default() };
        // The last commit before our transaction is ours: nothing foreign.
        assert_eq!(on_commit_frame(&s, (1, 2), 10, 13).1, None);
        // Frames 11..12 committed by someone else.
        assert_eq!(on_commit_frame(&s, (1, 2), 12, 15).1, Some(WalMark { salt1: 1, salt2: 2, frame: 12 }));
        // A WAL we did not start.
        assert!(on_commit_frame(&s, (7, 8), 3, 5).1.is_some());
        // A fresh WAL (restarted by this very transaction).
        assert_eq!(on_commit_frame(&s, (7, 8), 0, 2).1, None);
        c.write_claim(WalMark { salt1: 1, salt2: 2, frame: 15 }).unwrap();
        c.write_foreign(WalMark { salt1: 1, salt2: 2, frame: 12 }, 1).unwrap();
        c.write_handled(0).unwrap();
        let r = c.read().unwrap();
        assert!(r.unhandled_foreign() && r.covers(1, 2, 15) && !r.covers(1, 2, 16));
    }
}
