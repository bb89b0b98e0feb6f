//! `<db>-walcast-conf`: the role and identity walcast keeps beside a database, so
//! that reopening the database keeps its role and the log can be tied to it.
//!
//! A small text file of `key=value` lines, replaced atomically (write, fsync,
//! rename, fsync the directory), and changed only through `Conf::update`,
//! under the flock of `<db>-walcast-conf-lock`:
//!
//! ```text
//! role=primary
//! db_id=4f0c...  (32 hex digits)
//! endpoint=tcp://0.0.0.0:7070
//! relay=tcp://0.0.0.0:7080   (a replica that passes the stream on)
//! ```
//!
//! A replica records there the db_id of the database it follows (from its first
//! bootstrap on), and two one-shot requests: `rebootstrap=1` (replace the
//! replica's content with the primary's, whatever database and generation it
//! serves) and `promoting=1` (appliers stop: a promotion is under way).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// `<path>.tmp-<pid>-<n>`: where a file beside the database is written before
/// it is renamed over `path`. Named after the whole name: `with_extension`
/// would cut it at the first dot, so that `app.db-...` and `app.sqlite-...`
/// would share one temporary file, and one database could get the other's
/// file. Unique to the write: two writers of one file (a replica's applier
/// recording its primary's db_id while a pragma sets its relay) shared
/// `<path>.tmp`, and the second rename found nothing to rename (ENOENT), so
/// the pragma failed.
///
/// A writer killed between writing its temporary file and renaming it leaves
/// the file behind, under a name nobody writes again. The first time a
/// process names one for `path`, it removes those left behind (see
/// `remove_stale_temps`).
pub fn temp_beside(path: &Path) -> std::path::PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static SWEPT: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        if !swept.iter().any(|p| p == path) {
            swept.push(path.to_path_buf());
            remove_stale_temps(path, STALE_TEMP);
        }
    }
    let mut t = path.as_os_str().to_owned();
    t.push(format!(".tmp-{}-{n}", std::process::id()));
    t.into()
}

/// A temporary file this old is left over: a write holds one for the time of
/// a write, an fsync and a rename.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes `<path>.tmp-*` files last modified more than `age` ago. By age, not
/// by whether the process named in them is alive: a process in another PID
/// namespace, sharing the directory, has a pid that means nothing here.
fn remove_stale_temps(path: &Path, age: std::time::Duration) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut prefix = name.to_owned();
    prefix.push(".tmp-");
    let prefix = prefix.as_encoded_bytes();
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if !e.file_name().as_encoded_bytes().starts_with(prefix) {
            continue;
        }
        let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > age));
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Off,
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Off => "off",
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Parses a role as given in `PRAGMA walcast_role` or the URI parameter.
pub fn parse_role(s: &str) -> Result<Role, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "primary" => Ok(Role::Primary),
        "off" | "none" => Ok(Role::Off),
        "replica" => Ok(Role::Replica),
        _ => Err(format!("unknown walcast_role '{}': expected 'primary', 'replica' or 'off'", s)),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conf {
    pub role: Role,
    pub db_id: Option<[u8; 16]>,
    /// Where a primary listens, or the primary a replica follows.
    pub endpoint: Option<String>,
    /// A replica: where it passes the stream on to replicas of its own.
    pub relay: Option<String>,
    /// A replica: the next catch-up takes a snapshot of whatever the primary serves.
    pub rebootstrap: bool,
    /// A replica being promoted: no process may apply.
    pub promoting: bool,
}

impl Default for Conf {
    fn default() -> Self {
        Conf { role: Role::Off, db_id: None, endpoint: None, relay: None, rebootstrap: false, promoting: false }
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Conf {
    /// Reads the conf file; a missing file means role off and no identity.
    pub fn load(path: &Path) -> Result<Conf, String> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Conf::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut conf = Conf::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| format!("{}: malformed line '{line}'", path.display()))?;
            match k.trim() {
                "role" => conf.role = parse_role(v).map_err(|e| format!("{}: {e}", path.display()))?,
                "db_id" => {
                    conf.db_id = Some(parse_hex16(v.trim()).ok_or_else(|| format!("{}: malformed db_id '{}'", path.display(), v.trim()))?)
                }
                "endpoint" => conf.endpoint = Some(v.trim().to_string()).filter(|e| !e.is_empty()),
                "relay" => conf.relay = Some(v.trim().to_string()).filter(|e| !e.is_empty()),
                "rebootstrap" => conf.rebootstrap = v.trim() == "1",
                "promoting" => conf.promoting = v.trim() == "1",
                _ => {} // keys of later versions
            }
        }
        Ok(conf)
    }

    /// Changes the conf file as one step: loads it, lets `change` edit it, and
    /// saves it if `change` returned Ok and changed something. Every writer of
    /// the file goes through here, under an exclusive flock on `<path>-lock`:
    /// without it, two writers (a replica's applier recording its primary's
    /// db_id while a pragma sets its relay, in any two threads or processes)
    /// could both load, and the second save would undo the first one's change.
    ///
    /// `change` is first tried on the conf as it is, without the lock: when it
    /// refuses (Err) or changes nothing, that is the outcome, and nothing is
    /// written, not even the lock file (bad input changes nothing on disk).
    /// Otherwise it runs again on the conf loaded under the lock, and that run
    /// decides. `change` must not update the conf itself.
    pub fn update<T>(path: &Path, change: impl Fn(&mut Conf) -> Result<T, String>) -> Result<T, String> {
        let seen = Conf::load(path)?;
        let mut tried = seen.clone();
        let out = change(&mut tried)?;
        if tried == seen {
            return Ok(out);
        }
        let lock_path = lock_path(path);
        // Opened for reading when it exists but this user may not write it:
        // a flock needs no more.
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .or_else(|_| File::open(&lock_path))
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        lock.lock().map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let before = Conf::load(path)?;
        let mut conf = before.clone();
        let out = change(&mut conf)?;
        if conf != before {
            conf.save(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(out)
    }

    /// Writes the file (atomically: a temporary file, then a rename). Only
    /// `update` calls it, under the lock.
    fn save(&self, path: &Path) -> io::Result<()> {
        let mut text = String::from("# walcast configuration of the database beside this file; written by walcast\n");
        text.push_str(&format!("role={}\n", self.role.as_str()));
        if let Some(id) = self.db_id {
            text.push_str(&format!("db_id={}\n", crate::log::hex(&id)));
        }
        if let Some(e) = &self.endpoint {
            text.push_str(&format!("endpoint={e}\n"));
        }
        if let Some(r) = &self.relay {
            text.push_str(&format!("relay={r}\n"));
        }
        if self.rebootstrap {
            text.push_str("rebootstrap=1\n");
        }
        if self.promoting {
            text.push_str("promoting=1\n");
        }
        let tmp = temp_beside(path);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// `<conf>-lock`: empty; its flock makes each update of the conf one step.
fn lock_path(conf: &Path) -> std::path::PathBuf {
    let mut p = conf.as_os_str().to_owned();
    p.push("-lock");
    p.into()
}

/// 16 random bytes from the kernel, for a new database identity.
pub fn random_id() -> io::Result<[u8; 16]> {
    use std::io::Read;
    let mut id = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_that_differ_after_the_first_dot_get_their_own_temporary_files() {
        let a = temp_beside(Path::new("/d/app.db-walcast-conf"));
        let b = temp_beside(Path::new("/d/app.sqlite-walcast-conf"));
        assert!(a.to_str().unwrap().starts_with("/d/app.db-walcast-conf.tmp-"), "{a:?}");
        assert!(b.to_str().unwrap().starts_with("/d/app.sqlite-walcast-conf.tmp-"), "{b:?}");
        assert_ne!(temp_beside(Path::new("/d/x")), temp_beside(Path::new("/d/x")));
    }

    #[test]
    fn temporary_files_left_by_killed_writers_are_removed() {
        let d = crate::testutil::scratch_dir("conf-stale");
        let p = d.join("app.db-walcast-status");
        let make = |name: &str, age_s: u64| {
            let f = File::create(d.join(name)).unwrap();
            f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age_s)).unwrap();
        };
        make("app.db-walcast-status.tmp-123-4", 120);
        make("app.db-walcast-status.tmp-567-8", 0); // a write under way
        make("app.db-walcast-statusx.tmp-1-1", 120); // another file's
        make("app.db-walcast-status", 120);
        let t = temp_beside(&p);
        assert!(!d.join("app.db-walcast-status.tmp-123-4").exists());
        for kept in ["app.db-walcast-status.tmp-567-8", "app.db-walcast-statusx.tmp-1-1", "app.db-walcast-status"] {
            assert!(d.join(kept).exists(), "{kept}");
        }
        // Once per path and process: a later one left behind stays until the next process.
        make("app.db-walcast-status.tmp-9-9", 120);
        assert_ne!(temp_beside(&p), t);
        assert!(d.join("app.db-walcast-status.tmp-9-9").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    /// Found by running tests/test_relay.py 3 at a time: with one shared
    /// temporary file, one of two concurrent saves failed with ENOENT.
    #[test]
    fn concurrent_saves_of_one_conf_all_succeed() {
        let d = crate::testutil::scratch_dir("conf-race");
        let p = d.join("app.db-walcast-conf");
        let threads: Vec<_> = (0..4u8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let c = Conf { role: Role::Replica, db_id: Some([i; 16]), ..Default::default() };
                        c.save(&p).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(Conf::load(&p).unwrap().role, Role::Replica);
        let left: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind: {left:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    /// Each writer loads the conf, changes one field and saves it: without the
    /// lock, two of them interleave and one change is lost. Here 4 threads
    /// each add 1 to a number kept in the endpoint, 100 times: all 400 count.
    #[test]
    fn concurrent_updates_of_one_conf_lose_no_change() {
        let d = crate::testutil::scratch_dir("conf-update");
        let p = d.join("app.db-walcast-conf");
        let count = |c: &Conf| c.endpoint.as_deref().map_or(0, |e| e.rsplit(':').next().unwrap().parse::<u32>().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        Conf::update(&p, |c| {
                            c.endpoint = Some(format!("tcp://h:{}", count(c) + 1));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count(&Conf::load(&p).unwrap()), 400);
        // A refused change, or one that changes nothing, writes nothing: not
        // the conf, not even the lock file.
        let q = d.join("other.db-walcast-conf");
        let e = Conf::update(&q, |c| {
            c.role = Role::Primary;
            Err::<(), _>("refused".to_string())
        });
        assert_eq!(e.unwrap_err(), "refused");
        let off = |c: &mut Conf| {
            c.role = Role::Off;
            Ok(c.role)
        };
        assert_eq!(Conf::update(&q, off).unwrap(), Role::Off);
        let mut left: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["app.db-walcast-conf", "app.db-walcast-conf-lock"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn round_trip_and_bad_values() {
        let d = crate::testutil::scratch_dir("conf");
        let p = d.join("a.db-walcast-conf");
        let c = Conf { role: Role::Primary, db_id: Some([0xab; 16]), endpoint: Some("tcp://h:1".into()), ..Default::default() };
        c.save(&p).unwrap();
        assert_eq!(Conf::load(&p).unwrap(), c);
        let r =
            Conf { role: Role::Replica, relay: Some("tcp://0.0.0.0:2".into()), rebootstrap: true, promoting: true, ..Default::default() };
        r.save(&p).unwrap();
        assert_eq!(Conf::load(&p).unwrap(), r);
        assert_eq!(Conf::load(&d.join("missing")).unwrap(), Conf::default());
        assert!(parse_role("bogus").unwrap_err().contains("unknown walcast_role 'bogus'"));
        assert_eq!(parse_role(" PRIMARY ").unwrap(), Role::Primary);
    }
}
