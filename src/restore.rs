//! Reading a replication log back: `walcast_verify` walks and checks the whole
//! chain; `walcast_restore` rebuilds the database, as of any transaction the log
//! covers, from the log alone. Both verify every frame they read.

use crate::conf::Conf;
use crate::log::{hex, LogError, LogFile, LogState, Record, ScanEnd};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn log_path_of(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-walcast", db.display()))
}
fn conf_path_of(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-walcast-conf", db.display()))
}

/// Opens the log of `db` and checks that it belongs to `db`.
fn open_log_of(db: &Path) -> Result<LogFile, String> {
    let lp = log_path_of(db);
    if !lp.exists() {
        return Err(format!("no replication log at {} (is {} a walcast primary?)", lp.display(), db.display()));
    }
    let lf = LogFile::open(&lp).map_err(|e| e.to_string())?;
    let conf = Conf::load(&conf_path_of(db))?;
    match conf.db_id {
        Some(id) if id != lf.id.db_id => Err(format!(
            "{} belongs to another database (its db_id is {}, {}'s is {})",
            lp.display(),
            hex(&lf.id.db_id),
            db.display(),
            hex(&id)
        )),
        None => Err(format!(
            "{} has no walcast identity ({} is missing), so its log cannot be tied to it",
            db.display(),
            conf_path_of(db).display()
        )),
        Some(_) => Ok(lf),
    }
}

/// One transaction boundary seen in the log.
#[derive(Clone, Copy, Debug)]
struct Boundary {
    last_frame_no: u64,
    generation: u64,
}

/// Where each generation starts, so a restore can begin at its base image.
#[derive(Clone, Copy, Debug)]
struct GenStart {
    generation: u64,
    /// State just before the generation record.
    before: LogState,
    /// The frame_no that completes its base image.
    image_end: Option<u64>,
}

struct Walk {
    end: LogState,
    torn_bytes: u64,
    boundaries: Vec<Boundary>,
    gens: Vec<GenStart>,
}

/// Scans the whole log, verifying it; remembers commit boundaries and
/// generation starts. Boundaries are kept as 16 bytes per transaction.
fn walk(lf: &LogFile) -> Result<Walk, LogError> {
    let mut boundaries = Vec::new();
    let mut gens: Vec<GenStart> = Vec::new();
    let mut prev = lf.id.initial_state();
    let mut snapshot_seen = lf.snapshot.end_offset == crate::log::RECORDS_START;
    let snap = lf.snapshot;
    // Pages of the batch being read: each page appears once per transaction.
    let mut batch_pages = std::collections::HashSet::new();
    let (end, how) = lf.scan_all(|off, rec, st| {
        match rec {
            Record::Frame(h, _) if !batch_pages.insert(h.page_no) => {
                return Err(LogError::Corrupt {
                    path: lf.path.clone(),
                    frame_no: h.frame_no,
                    offset: off,
                    what: format!("page {} appears twice in one transaction", h.page_no),
                });
            }
            Record::Generation(g) => {
                let mut before = prev;
                before.end_offset = off;
                gens.push(GenStart { generation: g.generation, before, image_end: None });
            }
            Record::Commit(c) => {
                batch_pages.clear();
                boundaries.push(Boundary { last_frame_no: c.last_frame_no, generation: st.generation });
                if let Some(g) = gens.last_mut() {
                    if g.image_end.is_none() {
                        g.image_end = Some(c.last_frame_no);
                    }
                }
            }
            _ => {}
        }
        if matches!(rec, Record::Commit(_) | Record::WalEvent(_)) {
            prev = *st;
            if st.end_offset == snap.end_offset {
                if st.last_frame_no != snap.last_frame_no || st.last_checksum != snap.last_checksum {
                    return Err(LogError::Corrupt {
                        path: lf.path.clone(),
                        frame_no: st.last_frame_no,
                        offset: 0,
                        what: format!(
                            "the header's durable point names frame_no {} but the log has {} there",
                            snap.last_frame_no, st.last_frame_no
                        ),
                    });
                }
                snapshot_seen = true;
            }
        }
        Ok(())
    })?;
    if !snapshot_seen {
        return Err(LogError::Corrupt {
            path: lf.path.clone(),
            frame_no: end.last_frame_no,
            offset: snap.end_offset,
            what: format!("the header's durable point (offset {}, frame_no {}) is not in the log", snap.end_offset, snap.last_frame_no),
        });
    }
    let len = lf.file.metadata()?.len();
    let torn_bytes = match how {
        ScanEnd::Clean => 0,
        ScanEnd::Torn { .. } => len - end.end_offset,
    };
    Ok(Walk { end, torn_bytes, boundaries, gens })
}

/// `walcast_verify(db)`: a JSON summary, or an error naming the first bad frame.
pub fn verify(db: &Path) -> Result<String, String> {
    let lf = open_log_of(db)?;
    if let Some(p) = &lf.header_problem {
        return Err(format!("replication log {} is corrupt at frame_no 0: {p}", lf.path.display()));
    }
    let w = walk(&lf).map_err(|e| e.to_string())?;
    let first = lf.id.first_frame_no;
    Ok(serde_json::json!({
        "ok": true,
        "log": lf.path.to_string_lossy(),
        "db_id": hex(&lf.id.db_id),
        "first_frame_no": first,
        "last_frame_no": w.end.last_frame_no,
        "last_checksum": format!("{:016x}", w.end.last_checksum),
        "frames": w.end.last_frame_no + 1 - first,
        "transactions": w.boundaries.len(),
        "generations": w.end.generation,
        "page_size": w.end.page_size,
        "db_pages": w.end.db_pages,
        "log_bytes": w.end.end_offset,
        "unfinished_tail_bytes": w.torn_bytes,
    })
    .to_string())
}

/// `walcast_restore(db, out [, frame_no])`: writes the database as of `frame_no`
/// (every transaction whose last frame is at or before it; default: all) to a new
/// file `out`. Returns a JSON summary.
pub fn restore(db: &Path, out: &Path, frame_no: Option<i64>) -> Result<String, String> {
    if out.exists() {
        return Err(format!("{} already exists; walcast_restore writes only to a new file", out.display()));
    }
    let lf = open_log_of(db)?;
    let w = walk(&lf).map_err(|e| e.to_string())?;
    let first = lf.id.first_frame_no;
    let last = w.end.last_frame_no;
    let Some(first_image_end) = w.gens.first().and_then(|g| g.image_end) else {
        return Err(format!("{} holds no complete database image yet", lf.path.display()));
    };
    let target = match frame_no {
        None => last,
        Some(n) if n < first as i64 || n as u64 > last => {
            return Err(format!("frame_no {n} is not covered by {}: it holds frame_no {first} to {last}", lf.path.display()))
        }
        Some(n) => n as u64,
    };
    if target < first_image_end {
        return Err(format!(
            "frame_no {target} falls inside the first base image (frame_no {first} to {first_image_end}); the earliest state the log can restore is frame_no {first_image_end}"
        ));
    }
    // The state as of `target`: the last transaction ending at or before it.
    let idx = w.boundaries.partition_point(|b| b.last_frame_no <= target);
    let upto = w.boundaries[idx - 1];
    // Start from the base image of that transaction's generation, or of an earlier
    // one if its own image is not complete by then.
    let gen = w
        .gens
        .iter()
        .rev()
        .find(|g| g.generation <= upto.generation && g.image_end.is_some_and(|e| e <= upto.last_frame_no))
        .copied()
        .ok_or_else(|| format!("no complete base image precedes frame_no {target}"))?;

    let file = OpenOptions::new().write(true).create_new(true).open(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let r = apply(&lf, gen, upto.last_frame_no, &file);
    match r {
        Ok((pages, page_size)) => {
            file.sync_all().map_err(|e| format!("cannot sync {}: {e}", out.display()))?;
            Ok(serde_json::json!({
                "restored": out.to_string_lossy(),
                "frame_no": upto.last_frame_no,
                "generation": upto.generation,
                "pages": pages,
                "page_size": page_size,
            })
            .to_string())
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

/// Applies the log from a generation's start up to the commit of `until`.
fn apply(lf: &LogFile, gen: GenStart, until: u64, out: &File) -> Result<(u32, u32), String> {
    let mut st = gen.before;
    let mut page_size = 0u32;
    let mut size = 0u32;
    let mut written_pages = 0u64; // pages the file holds now
    let mut done = false;
    let stop = "walcast-restore-stop";
    let r = crate::log::scan(&lf.path, &lf.file, &lf.id, &mut st, |_, rec, run| {
        match rec {
            Record::Generation(g) => page_size = g.page_size,
            Record::Frame(h, page) => {
                let off = (h.page_no as u64 - 1) * run.page_size as u64;
                out.write_all_at(page, off).map_err(LogError::Io)?;
                written_pages = written_pages.max(h.page_no as u64);
            }
            Record::Commit(c) => {
                size = c.size_after;
                // A shrinking transaction: cut the file now, so that pages past the
                // end never come back with stale content.
                if (size as u64) < written_pages {
                    out.set_len(size as u64 * run.page_size as u64).map_err(LogError::Io)?;
                    written_pages = size as u64;
                }
                if c.last_frame_no == until {
                    done = true;
                    return Err(LogError::NotALog { path: stop.into(), what: String::new() });
                }
            }
            Record::WalEvent(_) => {}
        }
        Ok(())
    });
    match r {
        Err(LogError::NotALog { path, .. }) if path == Path::new(stop) => {}
        Err(e) => return Err(e.to_string()),
        Ok(_) => {}
    }
    if !done {
        return Err(format!("{} ended before frame_no {until}", lf.path.display()));
    }
    out.set_len(size as u64 * page_size as u64).map_err(|e| e.to_string())?;
    Ok((size, page_size))
}
