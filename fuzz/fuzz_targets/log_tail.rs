//! Reading committed units out of a replication log whose bytes are arbitrary
//! (src/logtail.rs, what the publisher, the catch-up server and snapshots use):
//! open, next_unit, read_frames, frame_header, frames_in_range, page_at. Each
//! must report or return, never panic or allocate without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use walcast::logtail::LogTail;

static PATH: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let path = PATH.get_or_init(|| walcast_fuzz::scratch_path("tail.log"));
    let mut bytes = bytes.to_vec();
    if mode & 1 == 0 {
        walcast_fuzz::fix_log(&mut bytes);
    }
    std::fs::write(path, &bytes).unwrap();
    let Ok(mut t) = LogTail::open(path, mode & 2 == 0) else { return };
    for _ in 0..64 {
        let Ok(Some(u)) = t.next_unit() else { break };
        assert!(u.end <= bytes.len() as u64 && u.frames_offset < u.end);
        assert!(u.first_frame_no <= u.commit.last_frame_no);
        let mut seen = 0u64;
        let _ = t.read_frames(&u, u.first_frame_no, u.commit.last_frame_no, |fh, page| {
            assert_eq!(fh.frame_no, u.first_frame_no + seen);
            assert_eq!(page.len(), u.page_size as usize);
            seen += 1;
            Ok(true)
        });
        let _ = t.frame_header(&u, u.commit.last_frame_no);
        let _ = t.frames_in_range(u.frames_offset, u.end, u.page_size, |_, page| {
            assert_eq!(page.len(), u.page_size as usize);
            Ok(true)
        });
        let mut page = vec![0u8; u.page_size as usize];
        let _ = t.page_at(u.frames_offset, &mut page);
    }
});
