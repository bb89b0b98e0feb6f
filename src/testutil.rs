//! Helpers for the unit tests.

use std::path::PathBuf;

/// A new, empty directory for one test's files, under the system's temporary
/// directory: `walcast-test-<label>-<pid>-<thread>`, so that tests running
/// in parallel (threads of one process) or in two test processes never share
/// one. Whatever an earlier run left there is removed.
pub fn scratch_dir(label: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let digits: String = thread.chars().filter(char::is_ascii_digit).collect();
    let d = std::env::temp_dir().join(format!("walcast-test-{label}-{}-{digits}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
