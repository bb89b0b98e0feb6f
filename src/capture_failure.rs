//! `<db>-walcast-failure`: the last capture failure of a primary, shared between
//! the processes that use the database.
//!
//! Every process of a primary captures into the one log, but each keeps its
//! status in memory. Without this file, a process whose log writes or syncs fail
//! would say so only in its own status: another process's `walcast_status`
//! would report all well while commits go unreplicated. The failing process
//! writes this record (at most once a second while the failure lasts, and once
//! more when it recovers); every process's status reads it.
//!
//! The file is created, full size, when a process becomes primary, so that it
//! can be rewritten in place on a full disk. A record is 512 bytes, little-endian:
//! magic `WCFAIL1\0`, pid u32, failures u32, first and last failure and recovery
//! unix ms (u64 each; recovery 0 = not recovered), 4 zero bytes, fatal u8,
//! message length u16, message (UTF-8, at most 457 bytes), zeros, CRC-64 of
//! bytes 0..504.

use crate::log::{crc, now_ms};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"WCFAIL1\0";
const RECORD_LEN: usize = 512;
const CRC_AT: usize = RECORD_LEN - 8;
const MESSAGE_AT: usize = 47;
const MAX_MESSAGE: usize = CRC_AT - MESSAGE_AT;
/// A failure not repeated for this long is no longer going on: its process
/// retries (and rewrites the record) at least once a second while it lasts.
pub const STALE_MS: u64 = 5000;

pub fn path(db: &str) -> PathBuf {
    PathBuf::from(format!("{db}-walcast-failure"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub pid: u32,
    pub failures: u32,
    pub first_ms: u64,
    pub last_ms: u64,
    /// 0 while the failure lasts.
    pub recovered_ms: u64,
    /// Capture stopped for good in that process (the log is unusable).
    pub fatal: bool,
    pub message: String,
}

impl Failure {
    /// Whether the failure is going on at `now_ms`.
    pub fn ongoing(&self, now_ms: u64) -> bool {
        self.recovered_ms == 0 && (self.fatal || now_ms.saturating_sub(self.last_ms) < STALE_MS)
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.pid.to_le_bytes());
        b[12..16].copy_from_slice(&self.failures.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_ms.to_le_bytes());
        b[24..32].copy_from_slice(&self.last_ms.to_le_bytes());
        b[32..40].copy_from_slice(&self.recovered_ms.to_le_bytes());
        b[44] = self.fatal as u8;
        let mut n = self.message.len().min(MAX_MESSAGE);
        while !self.message.is_char_boundary(n) {
            n -= 1;
        }
        b[45..47].copy_from_slice(&(n as u16).to_le_bytes());
        b[MESSAGE_AT..MESSAGE_AT + n].copy_from_slice(&self.message.as_bytes()[..n]);
        let c = crc(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// None for an empty, torn or foreign record.
    fn decode(b: &[u8]) -> Option<Failure> {
        if b.len() < RECORD_LEN || &b[0..8] != MAGIC || crc(&b[..CRC_AT]).to_le_bytes() != b[CRC_AT..RECORD_LEN] {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let n = (u16::from_le_bytes([b[45], b[46]]) as usize).min(MAX_MESSAGE);
        Some(Failure {
            pid: u32_at(8),
            failures: u32_at(12),
            first_ms: u64_at(16),
            last_ms: u64_at(24),
            recovered_ms: u64_at(32),
            fatal: b[44] != 0,
            message: String::from_utf8_lossy(&b[MESSAGE_AT..MESSAGE_AT + n]).into_owned(),
        })
    }

    pub fn to_json(&self, now_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "in_this_process": self.pid == std::process::id(),
            "error": self.message,
            "fatal": self.fatal,
            "failures": self.failures,
            "first_failed_unix_ms": self.first_ms,
            "last_failed_unix_ms": self.last_ms,
            "recovered_unix_ms": if self.recovered_ms == 0 { None } else { Some(self.recovered_ms) },
            "ongoing": self.ongoing(now_ms),
        })
    }
}

/// Creates the file, full size, if it is missing (so that a record can later be
/// written in place on a full disk).
pub fn prepare(path: &Path) -> io::Result<()> {
    let f = File::options().write(true).create(true).truncate(false).open(path)?;
    if f.metadata()?.len() < RECORD_LEN as u64 {
        f.write_all_at(&[0u8; RECORD_LEN], 0)?;
    }
    Ok(())
}

/// Overwrites the record in place (no sync: it reports, it does not protect data).
pub fn write(path: &Path, f: &Failure) -> io::Result<()> {
    File::options().write(true).create(true).truncate(false).open(path)?.write_all_at(&f.encode(), 0)
}

pub fn read(path: &Path) -> Option<Failure> {
    let mut b = [0u8; RECORD_LEN];
    File::open(path).ok()?.read_exact_at(&mut b, 0).ok()?;
    Failure::decode(&b)
}

/// This process's current run of capture failures, and when it last wrote the
/// record.
#[derive(Debug)]
pub struct Streak {
    pub record: Failure,
    /// A sync of the log failed: only a successful sync ends the run.
    pub sync_failed: bool,
    written: Option<std::time::Instant>,
}

impl Streak {
    /// Counts a failure and rewrites the record when the message changed, the
    /// failure became fatal, or a second has passed.
    pub fn failed(streak: &mut Option<Streak>, path: &Path, message: &str, fatal: bool, syncing: bool) {
        let now = now_ms();
        let s = streak.get_or_insert_with(|| Streak {
            record: Failure {
                pid: std::process::id(),
                failures: 0,
                first_ms: now,
                last_ms: now,
                recovered_ms: 0,
                fatal,
                message: message.to_string(),
            },
            sync_failed: false,
            written: None,
        });
        s.sync_failed |= syncing;
        let changed = s.record.message != message || s.record.fatal != fatal;
        s.record.failures = s.record.failures.saturating_add(1);
        s.record.last_ms = now;
        s.record.fatal = fatal;
        s.record.message = message.to_string();
        if changed || s.written.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
            s.written = Some(std::time::Instant::now());
            let _ = write(path, &s.record);
        }
    }

    /// Ends the run: the record says when capture succeeded again.
    pub fn recovered(streak: &mut Option<Streak>, path: &Path) {
        if let Some(mut s) = streak.take() {
            s.record.recovered_ms = now_ms().max(1);
            let _ = write(path, &s.record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Failure {
        Failure {
            pid: 42,
            failures: 3,
            first_ms: 1000,
            last_ms: 2000,
            recovered_ms: 0,
            fatal: false,
            message: "capture failed, will retry: Input/output error (os error 5)".into(),
        }
    }

    #[test]
    fn record_round_trips_and_damage_is_ignored() {
        let f = sample();
        let b = f.encode();
        assert_eq!(Failure::decode(&b), Some(f));
        for i in [0, 9, 50, CRC_AT + 1] {
            let mut d = b;
            d[i] ^= 1;
            assert_eq!(Failure::decode(&d), None, "damage at byte {i}");
        }
        assert_eq!(Failure::decode(&[0u8; RECORD_LEN]), None, "an empty (prepared) file holds no record");
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let f = Failure { message: "é".repeat(400), ..sample() };
        let back = Failure::decode(&f.encode()).unwrap();
        assert!(back.message.len() <= MAX_MESSAGE && f.message.starts_with(&back.message));
    }

    #[test]
    fn ongoing_until_recovered_or_stale() {
        let f = sample();
        assert!(f.ongoing(2000 + STALE_MS - 1));
        assert!(!f.ongoing(2000 + STALE_MS), "not repeated for {STALE_MS} ms");
        assert!(!Failure { recovered_ms: 2500, ..f.clone() }.ongoing(2600));
        assert!(Failure { fatal: true, ..f }.ongoing(u64::MAX), "a fatal failure does not go stale");
    }

    #[test]
    fn streak_writes_then_marks_recovery() {
        let d = crate::testutil::scratch_dir("failure");
        let p = d.join("x.db-walcast-failure");
        prepare(&p).unwrap();
        assert_eq!(read(&p), None);
        let mut s = None;
        Streak::failed(&mut s, &p, "disk full", false, false);
        Streak::failed(&mut s, &p, "disk full", false, false);
        let r = read(&p).unwrap();
        assert_eq!((r.pid, r.message.as_str(), r.recovered_ms), (std::process::id(), "disk full", 0));
        Streak::failed(&mut s, &p, "I/O error", false, false);
        assert_eq!(read(&p).unwrap().failures, 3, "a new message is written at once");
        Streak::recovered(&mut s, &p);
        let r = read(&p).unwrap();
        assert!(r.recovered_ms > 0 && !r.ongoing(now_ms()) && s.is_none());
        prepare(&p).unwrap();
        assert!(read(&p).is_some(), "prepare keeps an existing record");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
