//! Status files: what one process knows (the replica's applier, the primary's
//! publisher), written as JSON beside the database for the other processes'
//! `walcast_status`, which would otherwise see only their own memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A status older than this is history: its writer rewrites it several times
/// a second while it works.
pub const STALE_MS: u64 = 3000;

/// Replaces the file at `path` with `v` (atomically, through a temporary file
/// and a rename). On a full disk, where no new file fits, overwrites the old
/// one in place (its blocks exist), padded with spaces, which JSON ignores.
pub fn write(path: &Path, v: &serde_json::Value) {
    let tmp = crate::conf::temp_beside(path);
    let text = v.to_string();
    if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
    if let Ok(f) = File::options().write(true).open(path) {
        let old_len = f.metadata().map_or(0, |m| m.len() as usize);
        let mut b = text.into_bytes();
        if b.len() < old_len {
            b.resize(old_len, b' ');
        }
        let _ = f.write_all_at(&b, 0);
    }
}

/// The status at `path` and its age in ms (from its `updated_unix_ms`), if
/// the file exists and holds a JSON object.
pub fn read(path: &Path) -> Option<(serde_json::Value, Option<u64>)> {
    let v = serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).ok()?).ok()?;
    if !v.is_object() {
        return None;
    }
    let age = v["updated_unix_ms"].as_u64().map(|t| crate::log::now_ms().saturating_sub(t));
    Some((v, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_read_with_its_age() {
        let d = std::env::temp_dir().join(format!("walcast-status-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("x.db-walcast-status");
        assert!(read(&p).is_none());
        write(&p, &serde_json::json!({"state": "streaming", "updated_unix_ms": crate::log::now_ms()}));
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["x.db-walcast-status"], "no temporary file left, none named after x alone");
        let (v, age) = read(&p).unwrap();
        assert_eq!(v["state"], "streaming");
        assert!(age.unwrap() < STALE_MS);
        std::fs::write(&p, "[1, 2]").unwrap();
        assert!(read(&p).is_none(), "not a status object");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
