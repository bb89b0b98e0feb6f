//! Status files: what one process knows (the replica's applier, the primary's
//! publisher), written as JSON beside the database for the other processes'
//! `walcast_status`, which would otherwise see only their own memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// A status older than this is history: its writer rewrites it at least once
/// a second (REFRESH) while it works.
pub const STALE_MS: u64 = 3000;
/// A status file is rewritten at most this often while what it says changes,
pub const WRITE_EVERY: Duration = Duration::from_millis(250);
/// and at least this often, well within STALE_MS, while it does not.
pub const REFRESH: Duration = Duration::from_millis(1000);

/// Writes `v` to the file at `path`. An existing file is overwritten in
/// place, padded with spaces (which JSON ignores) to at least its old length:
/// no new inode and no rename at each write. Creating a temporary file and
/// renaming it over the old one, four times a second, was 40% of a
/// publisher's CPU at 100 commits/s (the old inode's blocks freed each time,
/// and trimmed on a `discard` mount). A new file is made through a temporary
/// file and a rename, so that it is never seen empty. A reader that reads
/// while a write is under way can see a mix of both: the object's `crc`
/// (CRC-64 of the object without it, as hex) tells, and `read` reads again.
/// On a full disk an in-place write of a status no longer than the old one
/// still succeeds (its blocks exist).
pub fn write(path: &Path, v: &serde_json::Value) {
    let text = with_crc(v);
    if let Ok(f) = File::options().write(true).open(path) {
        let old_len = f.metadata().map_or(0, |m| m.len() as usize);
        let mut b = text.into_bytes();
        if b.len() < old_len {
            b.resize(old_len, b' ');
        }
        let _ = f.write_all_at(&b, 0);
        return;
    }
    let tmp = crate::conf::temp_beside(path);
    if std::fs::write(&tmp, &text).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// `v` as JSON text, with its `crc` (see `write`).
fn with_crc(v: &serde_json::Value) -> String {
    let Some(obj) = v.as_object() else { return v.to_string() };
    let mut obj = obj.clone();
    obj.remove("crc");
    let crc = crc_of(&obj);
    obj.insert("crc".into(), crc.into());
    serde_json::Value::Object(obj).to_string()
}

/// The object in `bytes`, if its `crc` matches (a status without one, from
/// an older walcast, is taken as it is).
fn parse_checked(bytes: &[u8]) -> Option<serde_json::Value> {
    let mut v = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    let obj = v.as_object_mut()?;
    if let Some(crc) = obj.remove("crc") {
        if crc.as_str() != Some(crc_of(obj).as_str()) {
            return None;
        }
    }
    Some(v)
}

/// The `crc` of a status object without one: CRC-64 of its JSON text, hex.
fn crc_of(obj: &serde_json::Map<String, serde_json::Value>) -> String {
    let text = serde_json::to_string(obj).unwrap_or_default();
    format!("{:016x}", crate::log::crc(text.as_bytes()))
}

/// The status at `path` and its age in ms (from its `updated_unix_ms`), if
/// the file exists and holds a JSON object. A read that met a write under
/// way is made again, a few times.
pub fn read(path: &Path) -> Option<(serde_json::Value, Option<u64>)> {
    let mut v = None;
    for _ in 0..4 {
        v = parse_checked(&std::fs::read(path).ok()?);
        if v.is_some() {
            break;
        }
    }
    let v = v?;
    let age = v["updated_unix_ms"].as_u64().map(|t| crate::log::now_ms().saturating_sub(t));
    Some((v, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_read_with_its_age() {
        let d = crate::testutil::scratch_dir("status");
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

    /// A status is rewritten in place, on the same inode, shorter ones padded;
    /// a read that sees a mix of two writes is refused by the crc, and a
    /// status without one (an older walcast's) is read as it is.
    #[test]
    fn rewritten_in_place_and_a_torn_read_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let d = crate::testutil::scratch_dir("status-inplace");
        let p = d.join("x.db-walcast-pub-status");
        let long = serde_json::json!({"published_frame_no": 123456789u64, "publish_error": "a long error message", "updated_unix_ms": 1});
        let short = serde_json::json!({"published_frame_no": 7u64, "publish_error": null, "updated_unix_ms": 2});
        write(&p, &long);
        let ino = std::fs::metadata(&p).unwrap().ino();
        let long_text = std::fs::read(&p).unwrap();
        write(&p, &short);
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino, "the same file, not a new one renamed over it");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), long_text.len() as u64, "padded to the old length");
        let (v, _) = read(&p).unwrap();
        assert_eq!(v["published_frame_no"], 7);
        assert!(v.get("crc").is_none(), "the crc is the file's, not the status's");
        let short_text = std::fs::read(&p).unwrap();
        assert!(short_text.ends_with(b" "), "padded with spaces");

        // A reader that met a write half-way: the new text's head (frame 191),
        // the old text's tail (frame 111). The mix is valid JSON (frame 111,
        // with the new text's crc).
        let a = with_crc(&serde_json::json!({"published_frame_no": 111u64, "updated_unix_ms": 5}));
        let b = with_crc(&serde_json::json!({"published_frame_no": 191u64, "updated_unix_ms": 5}));
        let cut = a.find("111").unwrap() + 1;
        let torn = format!("{}{}", &b[..cut], &a[cut..]);
        assert!(serde_json::from_str::<serde_json::Value>(&torn).is_ok(), "the mix parses: {torn}");
        assert!(parse_checked(torn.as_bytes()).is_none(), "but its crc does not match");
        assert_eq!(parse_checked(a.as_bytes()).unwrap()["published_frame_no"], 111);

        std::fs::write(&p, r#"{"state": "streaming", "updated_unix_ms": 3}"#).unwrap();
        assert_eq!(read(&p).unwrap().0["state"], "streaming", "a status without a crc");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
