//! Opening, scanning and verifying a replication log whose bytes are arbitrary
//! (a damaged or hostile `<db>-walcast`): LogFile::open + scan_all,
//! walcast_verify's walk, and LogWriter::open without and with repair. Each must
//! report or accept, never panic; what it accepts must be consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use walcast::log::{LogFile, LogWriter, Record};

static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let (db, log) = PATHS.get_or_init(|| {
        let db = walcast_fuzz::scratch_path("scan.db");
        let log = PathBuf::from(format!("{}-walcast", db.display()));
        (db, log)
    });
    let mut bytes = bytes.to_vec();
    // Most inputs get their checksums repaired, so that the checks behind them are reached.
    if mode & 1 == 0 {
        walcast_fuzz::fix_log(&mut bytes);
    }
    std::fs::write(log, &bytes).unwrap();
    let len = bytes.len() as u64;

    if let Ok(lf) = LogFile::open(log) {
        let scanned = lf.scan_all(|_, rec, st| {
            if let Record::Frame(_, page) = rec {
                assert_eq!(page.len(), st.page_size as usize);
            }
            Ok(())
        });
        if let Ok((st, _)) = scanned {
            assert!(st.end_offset <= len);
        }
    }
    let _ = walcast::restore::verify(db);
    if let Ok((w, _)) = LogWriter::open(log, false) {
        assert!(w.state.end_offset <= len);
    }
    if let Ok((w, _)) = LogWriter::open(log, true) {
        // A log repaired once opens again to the same state.
        let again = LogWriter::open(log, false).map(|(w2, _)| (w2.state.end_offset, w2.state.last_frame_no));
        assert_eq!(again.ok(), Some((w.state.end_offset, w.state.last_frame_no)), "a repaired log does not reopen as it was left");
    }
});
