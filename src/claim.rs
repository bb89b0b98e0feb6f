//! `<db>-walcast-claim`: which WAL frames walcast wrote, so that a transaction
//! written by a process without walcast is recognized even while it still sits
//! in the WAL walcast follows.
//!
//! Every walcast writer, while holding the WAL write lock and just before SQLite
//! writes a commit frame, records that frame here (no system call, no fsync). It
//! first compares the WAL's last commit (from the wal-index) with the last claim:
//! a commit in between was written without walcast, and is recorded as foreign.
//! The capture side reads the file; a commit it finds in the WAL past the last
//! claim, or a foreign record it has not handled yet, starts a new generation.
//!
//! The file is mapped shared by every walcast process (one page, little-endian
//! 32-bit words), so that a claim costs a writer a few stores rather than a
//! system call per commit: magic "WCCLAIM2" (words 0-1); claimed WAL salt-1,
//! salt-2 and frame (2-4); foreign salt-1, salt-2 and frame (5-7); the number
//! of foreign detections (8, written by writers); the number handled (9,
//! written by the capture, under the log lock); a sequence number (10) that
//! writers make odd while they change words 2-8, so that a reader never takes
//! half of one claim and half of another. Writers and capture write disjoint
//! words. Nothing here is ever synced: claims matter only while the WAL they
//! name exists, and a process that finds a WAL it cannot account for starts a
//! new generation.
//!
//! Words 11 and 12 are the publisher's doorbell, not claims: a process that
//! appended to the log and does not publish bumps word 11 and, when word 12
//! (the threads asleep on it) is not zero, wakes them (a futex, which works
//! across processes on a shared mapping). The publishing process's publisher
//! thread sleeps on it, so that what another process commits goes out at once
//! rather than at the publisher's next look at the log. Older walcast versions
//! leave both words alone (zero); a process that dies asleep leaves word 12
//! counted, which only costs the ringers a system call.

use crate::vfs::SharedWords;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

const MAGIC: &[u8; 8] = b"WCCLAIM2";
/// The file's length: one page, all of it mapped.
const LEN: usize = 4096;
const CLAIMED: usize = 2;
const FOREIGN: usize = 5;
const FOREIGN_COUNT: usize = 8;
const HANDLED_COUNT: usize = 9;
const SEQ: usize = 10;
const DOORBELL: usize = 11;
const DOORBELL_SLEEPERS: usize = 12;

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
    words: SharedWords,
}

impl ClaimFile {
    /// Opens (creating or upgrading) the claim file and maps it.
    pub fn open(path: &Path) -> io::Result<ClaimFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut magic = [0u8; 8];
        let n = file.read_at(&mut magic, 0)?;
        if n < 8 || &magic != MAGIC {
            // An older walcast's file has the same words at the same places,
            // without the sequence number: keep what it says. Anything else
            // (new, or not a claim file) starts with no claims, which can only
            // make a commit already in the WAL look foreign (a new generation).
            if &magic != b"WCCLAIM1" {
                file.write_all_at(&[0u8; 4 * (SEQ + 1)], 0)?;
            }
            file.write_all_at(MAGIC, 0)?;
        }
        if file.metadata()?.len() < LEN as u64 {
            file.set_len(LEN as u64)?;
        }
        let words = SharedWords::map(&file, LEN)?;
        Ok(ClaimFile { words })
    }

    /// Rings the publisher's doorbell (see the module's comment).
    pub fn ring(&self) {
        self.words.word(DOORBELL).fetch_add(1, Ordering::SeqCst);
        if self.words.word(DOORBELL_SLEEPERS).load(Ordering::SeqCst) != 0 {
            self.words.wake_all(DOORBELL);
        }
    }

    /// How many times the doorbell has rung (wrapping): read before looking at
    /// the log, then passed to `wait_for_ring`.
    pub fn rings(&self) -> u32 {
        self.words.word(DOORBELL).load(Ordering::SeqCst)
    }

    /// Sleeps until the doorbell rings after `seen` (a value of `rings`), or
    /// `timeout` passes. A ring since `seen` returns at once: a ringer that
    /// found no sleeper counted bumped the word before this thread counted
    /// itself, so the futex finds the word changed.
    pub fn wait_for_ring(&self, seen: u32, timeout: std::time::Duration) {
        let sleepers = self.words.word(DOORBELL_SLEEPERS);
        sleepers.fetch_add(1, Ordering::SeqCst);
        if self.rings() == seen {
            self.words.wait_while(DOORBELL, seen, timeout);
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    fn get(&self, i: usize) -> u32 {
        u32::from_le(self.words.word(i).load(Ordering::Relaxed))
    }

    fn put(&self, i: usize, v: u32) {
        self.words.word(i).store(v.to_le(), Ordering::Relaxed);
    }

    fn mark(&self, at: usize) -> WalMark {
        WalMark { salt1: self.get(at), salt2: self.get(at + 1), frame: self.get(at + 2) }
    }

    fn put_mark(&self, at: usize, m: WalMark) {
        self.put(at, m.salt1);
        self.put(at + 1, m.salt2);
        self.put(at + 2, m.frame);
    }

    /// The claims as they stand: never a mix of two writers' updates. A
    /// sequence number that stays odd was left by a writer that died
    /// half-way; after a while its words are taken as they are (a torn claim
    /// can only fail to cover a commit, which costs a new generation).
    pub fn read(&self) -> ClaimState {
        let seq = self.words.word(SEQ);
        let mut spins = 0u32;
        loop {
            let before = seq.load(Ordering::Acquire);
            let state = ClaimState {
                claimed: self.mark(CLAIMED),
                foreign: self.mark(FOREIGN),
                foreign_count: self.get(FOREIGN_COUNT),
                handled_count: u32::from_le(self.words.word(HANDLED_COUNT).load(Ordering::Acquire)),
            };
            fence(Ordering::Acquire);
            let after = seq.load(Ordering::Relaxed);
            let stable = before == after && before.is_multiple_of(2);
            spins += 1;
            if stable || (before == after && spins > 10_000) {
                return state;
            }
            std::hint::spin_loop();
        }
    }

    /// Changes words 2-8 (writers hold the WAL write lock, so there is one at
    /// a time): the sequence number is odd meanwhile.
    fn update(&self, f: impl FnOnce()) {
        let seq = self.words.word(SEQ);
        // Odd even if a writer died with it odd: the next even value ends this update.
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        f();
        seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Records a claim (writers, and the capture after a base image; both with
    /// the WAL write lock held).
    pub fn write_claim(&self, m: WalMark) {
        self.update(|| self.put_mark(CLAIMED, m));
    }

    /// Records foreign frames (writers, with the WAL write lock held).
    pub fn write_foreign(&self, m: WalMark, count: u32) {
        self.update(|| {
            self.put_mark(FOREIGN, m);
            self.put(FOREIGN_COUNT, count);
        });
    }

    /// Records that the capture has handled `count` foreign detections (log lock held).
    pub fn write_handled(&self, count: u32) {
        self.words.word(HANDLED_COUNT).store(count.to_le(), Ordering::Release);
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

    /// A claim file's path in a scratch directory `name`, no file there yet.
    fn fresh_claim_path(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let d = crate::testutil::scratch_dir(name);
        let p = d.join("x.db-walcast-claim");
        (d, p)
    }

    #[test]
    fn the_doorbell_wakes_a_sleeper_of_another_mapping() {
        let (d, p) = fresh_claim_path("doorbell");
        let (publisher, other) = (ClaimFile::open(&p).unwrap(), ClaimFile::open(&p).unwrap());
        // Rung before the wait: the wait returns at once.
        let seen = publisher.rings();
        other.ring();
        publisher.wait_for_ring(seen, std::time::Duration::from_secs(3600));
        assert_ne!(publisher.rings(), seen);
        // Rung while it sleeps: it wakes (its timeout is an hour).
        let publisher = std::sync::Arc::new(publisher);
        let (done, woke) = crossbeam_channel::bounded(1);
        let sleeper = {
            let (publisher, seen) = (publisher.clone(), publisher.rings());
            std::thread::spawn(move || {
                publisher.wait_for_ring(seen, std::time::Duration::from_secs(3600));
                done.send(()).unwrap();
            })
        };
        while other.words.word(DOORBELL_SLEEPERS).load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        other.ring();
        assert!(woke.recv_timeout(std::time::Duration::from_secs(60)).is_ok(), "the ring did not wake the sleeper");
        sleeper.join().unwrap();
        assert_eq!(other.words.word(DOORBELL_SLEEPERS).load(Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn claims_and_foreign_detection() {
        let (_, p) = fresh_claim_path("claim");
        let c = ClaimFile::open(&p).unwrap();
        assert_eq!(c.read(), ClaimState::default());
        let s = ClaimState { claimed: WalMark { salt1: 1, salt2: 2, frame: 10 }, ..Default::default() };
        // The last commit before our transaction is ours: nothing foreign.
        assert_eq!(on_commit_frame(&s, (1, 2), 10, 13).1, None);
        // Frames 11..12 committed by someone else.
        assert_eq!(on_commit_frame(&s, (1, 2), 12, 15).1, Some(WalMark { salt1: 1, salt2: 2, frame: 12 }));
        // A WAL we did not start.
        assert!(on_commit_frame(&s, (7, 8), 3, 5).1.is_some());
        // A fresh WAL (restarted by this very transaction).
        assert_eq!(on_commit_frame(&s, (7, 8), 0, 2).1, None);
        c.write_claim(WalMark { salt1: 1, salt2: 2, frame: 15 });
        c.write_foreign(WalMark { salt1: 1, salt2: 2, frame: 12 }, 1);
        c.write_handled(0);
        let r = c.read();
        assert!(r.unhandled_foreign() && r.covers(1, 2, 15) && !r.covers(1, 2, 16));
        // Another mapping (another process) sees the same claims at once.
        let other = ClaimFile::open(&p).unwrap();
        assert_eq!(other.read(), r);
        // A writer that died half-way left the sequence number odd: readers
        // still get an answer, and the next writer's update completes.
        c.words.word(SEQ).fetch_add(1, Ordering::Relaxed);
        assert_eq!(other.read(), r);
        other.write_claim(WalMark { salt1: 1, salt2: 2, frame: 20 });
        assert_eq!(c.words.word(SEQ).load(Ordering::Relaxed) % 2, 0);
        assert!(c.read().covers(1, 2, 20));
    }
}
