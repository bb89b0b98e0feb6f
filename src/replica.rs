//! The replica role: one process per replica database (elected by an flock on
//! `<db>-walcast-applier`) subscribes to the primary, verifies every frame
//! (database id, generation, frame_no sequence, checksum chain), and applies
//! whole transactions through `apply.rs`. Gaps, duplicates, damaged messages and
//! divergent histories are repaired through catch-up requests, or a snapshot.
//!
//! Files beside the replica database:
//! - `<db>-walcast-replica`: the applied position (db_id, generation, frame_no,
//!   checksum, page size), rewritten after every transaction.
//! - `<db>-walcast-status`: the applier's status, for other processes.

use crate::apply::{ApplyError, ShmLocks, WalAppender};
use crate::frame::FrameHeader;
use crate::log::{hex, now_ms};
use crate::receive::{self, FrameVerdict};
use crate::transport::{parse_endpoint, Endpoint, RelaySockets, ReplicaSockets};
use crate::wire::{self, Body, Header};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// No message for this long: the link is reported down.
const SILENCE: Duration = Duration::from_secs(3);
/// How often a process that does not apply tries to take over.
const TAKEOVER_POLL: Duration = Duration::from_millis(200);
/// Checkpoint the replica's WAL once it holds this many frames not yet copied.
const CHECKPOINT_FRAMES: u32 = 1000;
/// Snapshot page requests a bootstrapping replica keeps in flight (each reply
/// is up to 1 MiB): the primary reads the next pages while the replica writes
/// the last ones, and the link's round trip is not paid once per megabyte.
const SNAPSHOT_REQUESTS_IN_FLIGHT: usize = 4;

/// What the files of the replica look like to the applier: implemented over the
/// VFS in `vfs.rs`.
pub trait ReplicaFiles: Send + Sync {
    type Shm: ShmLocks;
    /// The applier's own shm handle on the database.
    fn open_shm(&self) -> io::Result<Self::Shm>;
    /// Runs SQL on a private connection (through the wrapped VFS, not walcast's);
    /// returns the first column of the first row.
    fn sql(&self, sql: &str) -> Result<Option<String>, String>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub db_id: [u8; 16],
    pub generation: u64,
    pub frame_no: u64,
    pub checksum: u64,
    pub page_size: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Status {
    pub state: &'static str,
    pub position: Option<Position>,
    pub primary_frame_no: u64,
    pub last_error: Option<String>,
    pub last_message: Option<Instant>,
    pub behind_since: Option<Instant>,
    pub applier: bool,
    pub bootstraps: u64,
    pub catchups: u64,
    pub rejected: u64,
    /// Why the last message was refused, and when: kept after the repair
    /// clears `last_error`, so that a refusal is never silent.
    pub last_rejection: Option<(String, Instant)>,
    /// The relay endpoint of this session, its replicas connected now, and why
    /// it cannot listen.
    pub relay: Option<String>,
    pub relay_downstream: Option<Arc<std::sync::atomic::AtomicI64>>,
    pub relay_error: Option<String>,
}

/// Shared between the SQL side (status, wait, endpoint changes) and the thread.
pub struct Shared {
    pub db_path: String,
    pub endpoint: Mutex<Option<String>>,
    pub status: Mutex<Status>,
    /// Signalled, with `status` locked, when the applied position moves.
    applied_cv: Condvar,
    /// Threads in `wait_for`: the applier signals `applied_cv` only when one
    /// waits (a signal is a system call, and most applies have no waiter).
    waiters: AtomicU64,
    /// Bumped when the endpoint changes: the session restarts.
    config_seq: AtomicU64,
    stop: AtomicBool,
    wake: (crossbeam_channel::Sender<()>, crossbeam_channel::Receiver<()>),
    /// The session's sockets, closed by `stop` so that a call waiting for an
    /// unreachable primary (up to 5 s) does not hold up a promotion.
    sockets: Mutex<Option<crate::transport::SocketCloser>>,
}

impl Shared {
    pub fn new(db_path: &str, endpoint: Option<String>) -> Arc<Shared> {
        Arc::new(Shared {
            db_path: db_path.into(),
            endpoint: Mutex::new(endpoint),
            status: Mutex::new(Status { state: "disconnected", ..Default::default() }),
            applied_cv: Condvar::new(),
            waiters: AtomicU64::new(0),
            config_seq: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wake: crossbeam_channel::bounded(1),
            sockets: Mutex::new(None),
        })
    }

    pub fn set_endpoint(&self, ep: Option<String>) {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = ep;
        self.config_seq.fetch_add(1, Ordering::AcqRel);
        self.poke();
    }

    pub fn poke(&self) {
        let _ = self.wake.0.try_send(());
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.poke();
        if let Some(s) = self.sockets.lock().unwrap_or_else(|e| e.into_inner()).take() {
            s.close();
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The applied frame_no, from this process's applier or from the position
    /// file another process's applier writes.
    pub fn applied_frame_no(&self) -> u64 {
        let st = self.status();
        if st.applier {
            return st.position.map_or(0, |p| p.frame_no);
        }
        drop(st);
        load_position(&position_path(&self.db_path)).map_or(0, |(p, _)| p.frame_no)
    }

    /// Waits until `frame_no` is applied; false at the timeout.
    pub fn wait_for(&self, frame_no: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.applied_frame_no() >= frame_no {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let left = deadline - now;
            // Counted before the status is locked: an applier that moves the
            // position after this thread looked at it then sees the count.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let st = self.status();
            if st.applier {
                let wait = left.min(Duration::from_millis(50));
                let _ = self.applied_cv.wait_timeout_while(st, wait, |st| st.position.map_or(0, |p| p.frame_no) < frame_no);
                self.waiters.fetch_sub(1, Ordering::SeqCst);
            } else {
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                drop(st);
                // Another process applies: its position file is the signal.
                std::thread::sleep(left.min(Duration::from_millis(1)));
            }
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let st = self.status();
        if !st.applier {
            // Another process applies: report what it last wrote.
            let (mut v, age) = crate::status::read(&status_path(&self.db_path)).unwrap_or_else(|| {
                (
                    serde_json::json!({"role": "replica", "state": "disconnected", "last_error": "no process applies to this replica now"}),
                    None,
                )
            });
            if let Some((p, _)) = load_position(&position_path(&self.db_path)) {
                v["applied_frame_no"] = p.frame_no.into();
            }
            // The applier writes its ages as of `updated_unix_ms` (and only when
            // something else changed, or once a second): bring them up to now.
            if let Some(age) = age {
                let behind = v["lag_frames"].as_u64().is_some_and(|n| n > 0);
                for key in ["ms_since_last_message", "ms_since_last_rejection"].into_iter().chain(behind.then_some("lag_ms")) {
                    if let Some(ms) = v[key].as_u64() {
                        v[key] = (ms + age).into();
                    }
                }
            }
            // A status the applier stopped refreshing is history, not news.
            if let Some(age) = age.filter(|a| *a > crate::status::STALE_MS) {
                v["state"] = "disconnected".into();
                v["last_error"] =
                    format!("no process has applied to this replica for {} s (open it with walcast loaded to resume)", age / 1000).into();
            }
            v["applier_in_this_process"] = false.into();
            return v;
        }
        status_value(&st, self.endpoint.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn status_value(st: &Status, endpoint: Option<String>) -> serde_json::Value {
    let applied = st.position.map_or(0, |p| p.frame_no);
    let lag = st.primary_frame_no.saturating_sub(applied);
    serde_json::json!({
        "role": "replica",
        "state": st.state,
        "endpoint": endpoint,
        "applied_frame_no": applied,
        "primary_frame_no": st.primary_frame_no,
        "lag_frames": lag,
        "lag_ms": if lag == 0 { 0 } else { st.behind_since.map_or(0, |t| t.elapsed().as_millis() as u64) },
        "ms_since_last_message": st.last_message.map(|t| t.elapsed().as_millis() as u64),
        "last_error": st.last_error,
        "db_id": st.position.map(|p| hex(&p.db_id)),
        "generation": st.position.map(|p| p.generation),
        "term": st.position.map(|p| crate::log::term_of(p.generation)),
        "checksum": st.position.map(|p| format!("{:016x}", p.checksum)),
        "page_size": st.position.map(|p| p.page_size),
        "bootstraps": st.bootstraps,
        "catch_ups": st.catchups,
        "rejected_messages": st.rejected,
        "last_rejection": st.last_rejection.as_ref().map(|(why, _)| why.clone()),
        "ms_since_last_rejection": st.last_rejection.as_ref().map(|(_, t)| t.elapsed().as_millis() as u64),
        "relay": st.relay.as_ref().map(|url| serde_json::json!({
            "endpoint": url,
            "replicas": st.relay_downstream.as_ref().map_or(0, |n| n.load(Ordering::Acquire).max(0)),
            "error": st.relay_error,
        })),
        "applier_pid": std::process::id(),
        "applier_in_this_process": st.applier,
        "updated_unix_ms": now_ms(),
    })
}

/// What a status says apart from the time: ages grow by themselves (readers
/// add the status's age to them), so only a change in the rest is news.
fn status_figures(v: &serde_json::Value) -> String {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for key in ["updated_unix_ms", "ms_since_last_message", "ms_since_last_rejection", "lag_ms"] {
            o.remove(key);
        }
    }
    v.to_string()
}

pub fn position_path(db: &str) -> PathBuf {
    PathBuf::from(format!("{db}-walcast-replica"))
}

fn conf_path(db: &str) -> PathBuf {
    PathBuf::from(format!("{db}-walcast-conf"))
}

fn load_conf(db: &str) -> Option<crate::conf::Conf> {
    crate::conf::Conf::load(&conf_path(db)).ok()
}

/// Whether the conf lets a process apply now: the role is replica and no
/// promotion is under way.
fn may_apply(db: &str) -> bool {
    load_conf(db).is_none_or(|c| c.role == crate::conf::Role::Replica && !c.promoting)
}

fn status_path(db: &str) -> PathBuf {
    PathBuf::from(format!("{db}-walcast-status"))
}

// ---------------------------------------------------------------------------
// The position file: 8 magic, 16 db_id, 8 generation, 8 frame_no, 8 checksum,
// 4 page size, 1 synced flag, 36 boot id, 8 CRC-64.

const POS_MAGIC: &[u8; 8] = b"WCREPL1\0";
const POS_LEN: usize = 8 + 16 + 8 + 8 + 8 + 4 + 1 + 36 + 8;

fn boot_id() -> [u8; 36] {
    // Read once: it is written into the position at every apply.
    static ID: std::sync::OnceLock<[u8; 36]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut b = [b'?'; 36];
        if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            let s = s.trim().as_bytes();
            let n = s.len().min(36);
            b[..n].copy_from_slice(&s[..n]);
        }
        b
    })
}

fn encode_position(p: &Position, synced: bool) -> [u8; POS_LEN] {
    let mut b = [0u8; POS_LEN];
    b[0..8].copy_from_slice(POS_MAGIC);
    b[8..24].copy_from_slice(&p.db_id);
    b[24..32].copy_from_slice(&p.generation.to_le_bytes());
    b[32..40].copy_from_slice(&p.frame_no.to_le_bytes());
    b[40..48].copy_from_slice(&p.checksum.to_le_bytes());
    b[48..52].copy_from_slice(&p.page_size.to_le_bytes());
    b[52] = synced as u8;
    b[53..89].copy_from_slice(&boot_id());
    let c = crate::log::crc(&b[..89]);
    b[89..97].copy_from_slice(&c.to_le_bytes());
    b
}

/// The recorded position, and whether it can be trusted: it can when the WAL
/// was synced up to it, or when the machine has not restarted since (a process
/// crash loses nothing the kernel already has).
pub fn load_position(path: &Path) -> Option<(Position, bool)> {
    let b = std::fs::read(path).ok()?;
    if b.len() != POS_LEN || &b[0..8] != POS_MAGIC || crate::log::crc(&b[..89]) != u64::from_le_bytes(b[89..97].try_into().unwrap()) {
        return None;
    }
    let p = Position {
        db_id: b[8..24].try_into().unwrap(),
        generation: u64::from_le_bytes(b[24..32].try_into().unwrap()),
        frame_no: u64::from_le_bytes(b[32..40].try_into().unwrap()),
        checksum: u64::from_le_bytes(b[40..48].try_into().unwrap()),
        page_size: u32::from_le_bytes(b[48..52].try_into().unwrap()),
    };
    let trusted = b[52] == 1 || b[53..89] == boot_id();
    Some((p, trusted))
}

fn save_position(f: &File, p: &Position, synced: bool) -> io::Result<()> {
    f.write_all_at(&encode_position(p, synced), 0)?;
    if synced {
        f.sync_data()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The thread

/// Runs the replica role for one database until `Shared::stop`.
pub fn run<F: ReplicaFiles>(shared: Arc<Shared>, files: F, is_open: impl Fn() -> bool) {
    // Below the application's threads, readers included (see
    // `primary::yield_to_application`).
    crate::primary::yield_to_application();
    let lock_path = format!("{}-walcast-applier", shared.db_path);
    // The applier lock, held from one session to the next: a session restarts
    // when the endpoint, relay or key changes, and a process that opened the
    // replica for a moment (a shell) must not take over in between. Released
    // only when this process may no longer apply.
    let mut held: Option<File> = None;
    while !shared.stop.load(Ordering::Acquire) {
        if !is_open() {
            held = None;
            shared.status().applier = false;
            let _ = shared.wake.1.recv_timeout(Duration::from_millis(500));
            continue;
        }
        if !may_apply(&shared.db_path) {
            held = None;
            shared.status().applier = false;
            let _ = shared.wake.1.recv_timeout(TAKEOVER_POLL);
            continue;
        }
        if held.is_none() {
            let lock = match File::options().create(true).truncate(false).write(true).open(&lock_path) {
                Ok(f) => f,
                Err(e) => {
                    set_error(&shared, "error", format!("cannot open {lock_path}: {e}"));
                    let _ = shared.wake.1.recv_timeout(Duration::from_secs(1));
                    continue;
                }
            };
            if lock.try_lock().is_err() {
                shared.status().applier = false;
                let _ = shared.wake.1.recv_timeout(TAKEOVER_POLL);
                continue;
            }
            held = Some(lock);
        }
        shared.status().applier = true;
        let seq = shared.config_seq.load(Ordering::Acquire);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::thread::scope(|scope| {
                let (tx, rx) = crossbeam_channel::bounded::<()>(1);
                let files = &files;
                // Checkpoints run beside the applier: one waits milliseconds
                // for its fsyncs, and frames arriving meanwhile would wait too.
                let spawned = std::thread::Builder::new().name("walcast-checkpoint".into()).spawn_scoped(scope, move || {
                    while rx.recv().is_ok() {
                        // PASSIVE: copies what no reader needs, never waits for one.
                        let _ = files.sql("PRAGMA wal_checkpoint(PASSIVE)");
                    }
                });
                let mut s = Session::new(&shared, files, seq);
                s.checkpoints = spawned.is_ok().then_some(tx);
                s.run(&is_open);
                // Dropping the session (and its sender) ends the checkpointer.
            });
        }));
        if r.is_err() {
            set_error(&shared, "error", "internal error in the replica thread; restarting it".into());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    shared.status().applier = false;
}

/// The state a failed catch-up attempt leaves, from its error.
fn catchup_failure_state(e: &str) -> &'static str {
    if e.contains("no catch-up reply") || e.contains("not sent") {
        "disconnected"
    } else if e.contains("still indexing") {
        // A primary that restarted with a long log says "try again" until it
        // has indexed the part asked for: catch-up under way, not a failure.
        "catching_up"
    } else {
        "error"
    }
}

fn set_error(shared: &Shared, state: &'static str, msg: String) {
    let mut st = shared.status();
    if st.last_error.as_ref() != Some(&msg) {
        crate::primary::report(&format!("{} (replica): {msg}", shared.db_path));
    }
    st.state = state;
    st.last_error = Some(msg);
}

enum Outcome {
    Applied,
    /// Frames are missing before these: catch up.
    Gap,
    /// Something refused; the reason is recorded.
    Rejected(String),
}

/// A WAL transaction of the applier's that is open: it holds the write lock,
/// and frames of a transaction still arriving may follow.
struct Pending {
    next_frame: u64,
    prev_checksum: u64,
    generation: u64,
}

struct Session<'a, F: ReplicaFiles> {
    shared: &'a Shared,
    files: &'a F,
    seq: u64,
    app: Option<WalAppender<F::Shm>>,
    pos: Option<Position>,
    pending: Option<Pending>,
    pos_file: Option<File>,
    need_catchup: bool,
    /// The database this replica follows (from its position, or the conf):
    /// frames of another are refused unless a rebootstrap is requested.
    identity: Option<[u8; 16]>,
    /// The oldest generation this replica accepts: a primary behind it is stale
    /// (an old primary after a failover).
    fence_generation: u64,
    /// `PRAGMA walcast_rebootstrap` asked for a snapshot of whatever the
    /// primary serves.
    force_bootstrap: bool,
    /// The last catch-up was refused (another database, a stale primary): retry
    /// slowly, the operator must act.
    refused: bool,
    /// The conf says this process must stop applying (promotion, role change).
    leave: bool,
    /// The key file as this session read it.
    key_stamp: Option<(u64, i64, i64, u64)>,
    last_conf_check: Instant,
    last_checkpoint: Instant,
    last_status_write: Instant,
    /// `status_figures` of the status last written.
    status_written: String,
    /// Asks the checkpointer thread for a checkpoint (None: checkpoint here).
    checkpoints: Option<crossbeam_channel::Sender<()>>,
    /// Where this replica passes the stream on (`PRAGMA walcast_relay`), as
    /// the conf said when the session started, and its sockets once listening.
    relay_url: Option<String>,
    relay: Option<RelaySockets>,
    relay_retry_at: Instant,
}

impl<'a, F: ReplicaFiles> Session<'a, F> {
    fn new(shared: &'a Shared, files: &'a F, seq: u64) -> Self {
        Session {
            shared,
            files,
            seq,
            app: None,
            pos: None,
            pending: None,
            pos_file: None,
            need_catchup: true,
            identity: None,
            fence_generation: 0,
            force_bootstrap: false,
            refused: false,
            leave: false,
            key_stamp: None,
            last_conf_check: Instant::now(),
            last_checkpoint: Instant::now(),
            last_status_write: Instant::now() - Duration::from_secs(1),
            status_written: String::new(),
            checkpoints: None,
            relay_url: None,
            relay: None,
            relay_retry_at: Instant::now(),
        }
    }

    fn db(&self) -> &str {
        &self.shared.db_path
    }

    fn state(&self, state: &'static str) {
        self.shared.status().state = state;
    }

    fn run(&mut self, is_open: &dyn Fn() -> bool) {
        let ep = self.shared.endpoint.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(url) = ep else {
            set_error(self.shared, "disconnected", "no endpoint: set PRAGMA walcast_endpoint = 'tcp://HOST:PORT' (the primary's)".into());
            let _ = self.shared.wake.1.recv_timeout(Duration::from_secs(1));
            return;
        };
        let ep = match parse_endpoint(&url) {
            Ok(e) => e,
            Err(e) => {
                set_error(self.shared, "error", e);
                let _ = self.shared.wake.1.recv_timeout(Duration::from_secs(1));
                return;
            }
        };
        // The key is read when a session starts; a changed key file starts a new one.
        self.key_stamp = crate::seal::key_stamp(self.db());
        let sealer = match crate::seal::Sealer::load(self.db()) {
            Ok(s) => s,
            Err(e) => {
                set_error(self.shared, "error", e);
                let _ = self.shared.wake.1.recv_timeout(Duration::from_secs(1));
                return;
            }
        };
        let socks = match ReplicaSockets::dial(&ep, sealer) {
            Ok(s) => s,
            Err(e) => {
                set_error(self.shared, "error", e);
                let _ = self.shared.wake.1.recv_timeout(Duration::from_secs(1));
                return;
            }
        };
        *self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()) = Some(socks.closer());
        if self.shared.stop.load(Ordering::Acquire) {
            return; // stopped before the sockets could be closed
        }
        if let Err(e) = self.open_files() {
            set_error(self.shared, "error", e);
            let _ = self.shared.wake.1.recv_timeout(Duration::from_secs(1));
            return;
        }
        self.relay_url = load_conf(self.db()).and_then(|c| c.relay);
        self.start_relay(&ep);
        self.write_status();
        let mut retry_at = Instant::now();
        while !self.shared.stop.load(Ordering::Acquire)
            && !self.leave
            && is_open()
            && self.shared.config_seq.load(Ordering::Acquire) == self.seq
        {
            if self.need_catchup && Instant::now() >= retry_at {
                self.refused = false;
                let r = self.catch_up(&socks, &ep);
                match r {
                    Ok(()) => self.need_catchup = false,
                    Err(_) if self.shared.stop.load(Ordering::Acquire) => break, // sockets closed by stop
                    Err(e) => {
                        set_error(self.shared, catchup_failure_state(&e), e);
                        retry_at = Instant::now() + if self.refused { Duration::from_secs(2) } else { Duration::from_millis(500) };
                    }
                }
                self.write_status();
            }
            match socks.recv_live(Duration::from_millis(100)) {
                Ok(Some(msg)) => self.receive(&socks, msg.as_slice()),
                Ok(None) => {}
                Err(_) if self.shared.stop.load(Ordering::Acquire) => break,
                Err(e) => {
                    set_error(self.shared, "disconnected", format!("receive failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            self.housekeeping(socks.connected.load(Ordering::Acquire) == 0);
            if self.relay.is_none() && self.relay_url.is_some() && Instant::now() >= self.relay_retry_at {
                self.start_relay(&ep);
            }
        }
        *self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop_relay();
        self.shutdown();
    }

    /// Listens at the relay endpoint, if one is set. A failure (the address in
    /// use, say) does not stop apply: it is reported, shown in the status, and
    /// tried again every second.
    fn start_relay(&mut self, upstream: &Endpoint) {
        let Some(url) = self.relay_url.clone() else { return };
        let r = parse_endpoint(&url).and_then(|ep| {
            if ep.url == upstream.url {
                return Err(format!("the relay endpoint {url} is the endpoint this replica follows"));
            }
            RelaySockets::listen(&ep, upstream)
        });
        let mut st = self.shared.status();
        match r {
            Ok(r) => {
                st.relay_downstream = Some(r.downstream.clone());
                st.relay_error = None;
                self.relay = Some(r);
            }
            Err(e) => {
                self.relay_retry_at = Instant::now() + Duration::from_secs(1);
                if st.relay_error.as_deref() != Some(e.as_str()) {
                    crate::primary::report(&format!("{}: not relaying: {e}", self.db()));
                }
                st.relay_error = Some(e);
            }
        }
        st.relay = Some(url);
    }

    fn stop_relay(&mut self) {
        self.relay = None;
        let mut st = self.shared.status();
        st.relay = None;
        st.relay_downstream = None;
        st.relay_error = None;
    }

    /// The position and the database's page size, at the start of a session.
    fn open_files(&mut self) -> Result<(), String> {
        let pp = position_path(self.db());
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&pp)
            .map_err(|e| format!("cannot open {}: {e}", pp.display()))?;
        self.pos_file = Some(f);
        let recorded = load_position(&pp);
        // Who the replica follows survives an untrusted position: only the
        // WAL's unsynced end is in doubt, not whose copy it is.
        let conf = load_conf(self.db());
        self.identity = recorded.map(|(p, _)| p.db_id).or_else(|| conf.as_ref().and_then(|c| c.db_id));
        self.fence_generation = recorded.map_or(0, |(p, _)| p.generation);
        self.force_bootstrap = conf.is_some_and(|c| c.rebootstrap);
        self.pos = match recorded {
            Some((p, true)) => Some(p),
            Some((_, false)) => {
                crate::primary::report(&format!(
                    "{}: the machine restarted since the replica last synced its WAL; it bootstraps again rather than trust what the crash may have lost",
                    self.db()
                ));
                None
            }
            None => None,
        };
        self.hold_database_open()?;
        if let Some(p) = self.pos {
            self.open_appender(p.page_size)?;
        }
        let mut st = self.shared.status();
        st.position = self.pos;
        st.state = "catching_up";
        Ok(())
    }

    /// Keeps a read lock on the database file, as every open SQLite connection
    /// in WAL mode does, so that no other connection's close checkpoints and
    /// deletes the WAL (or the wal-index) beneath the applier.
    fn hold_database_open(&self) -> Result<(), String> {
        self.files.sql("SELECT count(*) FROM sqlite_master").map(|_| ()).map_err(|e| format!("cannot read {}: {e}", self.db()))
    }

    fn open_appender(&mut self, page_size: u32) -> Result<(), String> {
        if self.app.as_ref().map(|a| a.page_size()) == Some(page_size) {
            return Ok(());
        }
        self.app = None;
        let shm = self.files.open_shm().map_err(|e| format!("cannot open the wal-index of {}: {e}", self.db()))?;
        let wal_path = format!("{}-wal", self.db());
        let wal = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| format!("cannot open {wal_path}: {e}"))?;
        self.app = Some(WalAppender::new(shm, wal, page_size));
        Ok(())
    }

    /// A message of the live stream: opened (authenticated and decrypted when a
    /// key is set), then handled.
    fn receive(&mut self, socks: &ReplicaSockets, raw: &[u8]) {
        match socks.open_live(raw) {
            Ok(m) => self.on_message(&m, raw),
            Err(e) => {
                self.shared.status().last_message = Some(Instant::now());
                self.reject(format!("discarded a message: {e}"));
            }
        }
    }

    /// `raw`: the message as it arrived, which a relay passes on.
    fn on_message(&mut self, m: &[u8], raw: &[u8]) {
        self.shared.status().last_message = Some(Instant::now());
        let (h, body) = match wire::decode(m) {
            Ok(x) => x,
            Err(e) => {
                self.reject(format!("discarded a message: {e}"));
                return;
            }
        };
        // A relay passes on what opened and decoded (its CRC checks), before
        // applying it, so that it adds no apply time to its replicas' lag;
        // they verify every frame as this replica does.
        if let Some(r) = &self.relay {
            r.forward(raw);
        }
        match body {
            Body::Heartbeat { last_frame_no, last_checksum, .. } => {
                self.note_primary(last_frame_no);
                let Some(p) = self.pos else { return };
                if h.db_id != p.db_id || h.generation < p.generation || last_frame_no != p.frame_no || self.pending.is_some() {
                    // Everything published before the heartbeat has arrived by
                    // now, or was lost. A primary behind the replica may have
                    // another history: the catch-up server decides.
                    self.need_catchup = true;
                } else if last_checksum != p.checksum {
                    self.need_catchup = true;
                } else if !self.need_catchup {
                    self.state("streaming");
                }
            }
            Body::Frames { primary_last, page_size, frames } => {
                self.note_primary(primary_last);
                if self.need_catchup {
                    return;
                }
                match self.apply_frames(&h, page_size, &frames) {
                    Outcome::Applied => {
                        if !self.need_catchup {
                            self.state("streaming");
                        }
                    }
                    Outcome::Gap => self.need_catchup = true,
                    Outcome::Rejected(why) => self.reject(why),
                }
            }
            _ => {}
        }
    }

    fn reject(&mut self, why: String) {
        {
            let mut st = self.shared.status();
            st.rejected += 1;
            st.last_rejection = Some((why.clone(), Instant::now()));
        }
        set_error(self.shared, "catching_up", why);
        self.abort_pending();
        self.need_catchup = true;
    }

    fn note_primary(&self, last: u64) {
        let mut st = self.shared.status();
        st.primary_frame_no = last;
        let applied = st.position.map_or(0, |p| p.frame_no);
        if st.primary_frame_no > applied {
            st.behind_since.get_or_insert_with(Instant::now);
        }
    }

    fn abort_pending(&mut self) {
        if self.pending.take().is_some() {
            if let Some(a) = self.app.as_mut() {
                a.abort();
            }
        }
    }

    /// Verifies frames and applies every transaction they complete.
    fn apply_frames(&mut self, h: &Header, page_size: u32, frames: &[(FrameHeader, &[u8])]) -> Outcome {
        let Some(pos) = self.pos else { return Outcome::Gap };
        let current_gen = self.pending.as_ref().map_or(pos.generation, |p| p.generation);
        if let Err(why) = receive::check_frames_message(h, page_size, &pos.db_id, current_gen, pos.page_size) {
            return Outcome::Rejected(why);
        }
        let (mut expected, mut prev) = match &self.pending {
            Some(p) => (p.next_frame, p.prev_checksum),
            None => (pos.frame_no + 1, pos.checksum),
        };
        // Every transaction completed by this message becomes visible at once, at
        // the end (one header write, one position write).
        let mut done: Option<Position> = None;
        let outcome = 'frames: {
            for (i, (fh, page)) in frames.iter().enumerate() {
                let skips_base_image =
                    self.pending.is_none() && h.generation > pos.generation && !(i == 0 && h.flags & wire::FLAG_GENERATION_START != 0);
                match receive::judge_frame(fh, page, expected, prev, skips_base_image) {
                    FrameVerdict::Duplicate => continue,
                    // Catch-up continues from here, also inside a transaction.
                    FrameVerdict::Gap => break 'frames Outcome::Gap,
                    FrameVerdict::Refuse(why) => break 'frames Outcome::Rejected(why),
                    FrameVerdict::Apply => {}
                }
                if self.pending.is_none() {
                    if let Err(e) = self.begin() {
                        break 'frames Outcome::Rejected(e);
                    }
                    self.pending = Some(Pending { next_frame: expected, prev_checksum: prev, generation: h.generation });
                }
                let app = self.app.as_mut().unwrap();
                if let Err(e) = app.append(fh.page_no, page, fh.size_after) {
                    break 'frames Outcome::Rejected(format!("cannot write the replica's WAL: {e}"));
                }
                prev = fh.checksum;
                expected += 1;
                let p = self.pending.as_mut().unwrap();
                p.next_frame = expected;
                p.prev_checksum = prev;
                if fh.size_after != 0 {
                    done = Some(Position {
                        db_id: pos.db_id,
                        generation: p.generation,
                        frame_no: fh.frame_no,
                        checksum: fh.checksum,
                        page_size,
                    });
                }
            }
            Outcome::Applied
        };
        let in_txn = self.pending.as_ref().is_some_and(|p| done.is_none_or(|d| p.next_frame > d.frame_no + 1));
        if let Some(d) = done {
            let app = self.app.as_mut().unwrap();
            // A transaction that is still arriving keeps the write lock.
            let r = if in_txn && matches!(outcome, Outcome::Applied | Outcome::Gap) { app.publish() } else { app.commit() };
            if let Err(e) = r {
                self.pending = None;
                return Outcome::Rejected(format!("cannot commit to the replica's WAL: {e}"));
            }
            if !app.in_txn() {
                self.pending = None;
            }
            self.applied(d);
        }
        if let Outcome::Rejected(_) = outcome {
            self.abort_pending();
        }
        outcome
    }

    /// Starts a WAL transaction, waiting briefly for a checkpoint or a
    /// recovering reader that holds the write lock.
    fn begin(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let app = self.app.as_mut().ok_or("no appender")?;
            match app.begin() {
                Ok(()) => return Ok(()),
                Err(ApplyError::Busy) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
                Err(ApplyError::NeedsRecovery) if Instant::now() < deadline => {
                    // A SQLite reader rebuilds the wal-index from the WAL file.
                    self.files.sql("SELECT count(*) FROM sqlite_master")?;
                }
                Err(ApplyError::ForeignWrite(w)) => {
                    self.pos = None;
                    return Err(format!("{w}; the replica bootstraps again"));
                }
                Err(e) => return Err(format!("cannot start a transaction on the replica: {e}")),
            }
        }
    }

    fn applied(&mut self, p: Position) {
        self.pos = Some(p);
        self.fence_generation = self.fence_generation.max(p.generation);
        if let Some(f) = &self.pos_file {
            if let Err(e) = save_position(f, &p, false) {
                set_error(self.shared, "error", format!("cannot record the applied position: {e}"));
            }
        }
        {
            let mut st = self.shared.status();
            st.position = Some(p);
            if st.primary_frame_no <= p.frame_no {
                st.behind_since = None;
                st.primary_frame_no = p.frame_no;
            }
        }
        if self.shared.waiters.load(Ordering::SeqCst) > 0 {
            self.shared.applied_cv.notify_all();
        }
    }

    /// Refuses what a primary this replica must not follow sends: another
    /// database, or a generation older than the replica's (a stale primary,
    /// such as the old primary after a failover). A requested rebootstrap
    /// accepts either.
    fn check_source(&mut self, db_id: &[u8; 16], generation: u64, ep: &Endpoint) -> Result<(), String> {
        if self.force_bootstrap {
            return Ok(());
        }
        if let Some(id) = self.identity.filter(|id| id != db_id) {
            self.refused = true;
            return Err(format!(
                "refused the primary at {}: it serves another database (db_id {}; this replica follows {}). \
                 Point walcast_endpoint at this database's primary, or run PRAGMA walcast_rebootstrap to replace this replica's content with that database",
                ep.url,
                hex(db_id),
                hex(&id)
            ));
        }
        if generation < self.fence_generation {
            self.refused = true;
            return Err(format!(
                "refused the primary at {}: it is at generation {} (term {}), older than this replica's generation {} (term {}), \
                 so it is a stale primary (such as the old primary after a failover). Point walcast_endpoint at the current primary, \
                 or run PRAGMA walcast_rebootstrap to follow this one",
                ep.url,
                generation,
                crate::log::term_of(generation),
                self.fence_generation,
                crate::log::term_of(self.fence_generation)
            ));
        }
        Ok(())
    }

    fn call(&self, socks: &ReplicaSockets, req: &[u8]) -> Result<Vec<u8>, String> {
        let r = socks.call(req);
        self.note_damaged(socks);
        let m = r?;
        self.shared.status().last_message = Some(Instant::now());
        Ok(m)
    }

    /// Replies that were damaged and asked for again: repaired, but never silent.
    fn note_damaged(&self, socks: &ReplicaSockets) {
        let (damaged, why) = socks.take_damaged();
        if damaged > 0 {
            let mut st = self.shared.status();
            st.rejected += damaged;
            st.last_rejection = why.map(|w| (format!("catch-up: {w}"), Instant::now()));
        }
    }

    /// Fetches what is missing through the catch-up socket until up to date.
    fn catch_up(&mut self, socks: &ReplicaSockets, ep: &Endpoint) -> Result<(), String> {
        self.state("catching_up");
        self.shared.status().catchups += 1;
        let r = self.catch_up_inner(socks, ep);
        if r.is_err() {
            // Do not hold the WAL write lock while the primary is away.
            self.abort_pending();
        }
        r
    }

    fn catch_up_inner(&mut self, socks: &ReplicaSockets, ep: &Endpoint) -> Result<(), String> {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.force_bootstrap {
                self.bootstrap(socks, ep, "requested by PRAGMA walcast_rebootstrap")?;
                continue;
            }
            let req = match (&self.pos, &self.pending) {
                (Some(p), Some(pd)) => wire::req_frames(p.db_id, pd.generation, pd.next_frame - 1, pd.prev_checksum),
                (Some(p), None) => wire::req_frames(p.db_id, p.generation, p.frame_no, p.checksum),
                (None, _) => wire::req_frames([0; 16], 0, 0, 0),
            };
            self.write_status_if_due();
            let reply = self.call(socks, &req).map_err(|e| format!("{e} (catch-up address {})", ep.catchup))?;
            let (h, body) = wire::decode(&reply).map_err(|e| format!("bad catch-up reply: {e}"))?;
            if matches!(body, Body::Frames { .. } | Body::NeedSnapshot { .. }) {
                self.check_source(&h.db_id, h.generation, ep)?;
            }
            match body {
                Body::Frames { primary_last, page_size, frames } => {
                    self.note_primary(primary_last);
                    if frames.is_empty() {
                        if self.pending.is_none() {
                            self.state("streaming");
                            self.shared.status().last_error = None;
                            return Ok(());
                        }
                        return Err("the primary sent no frames to finish a transaction".into());
                    }
                    match self.apply_frames(&h, page_size, &frames) {
                        // Caught up with what the primary had: the live stream
                        // (queued meanwhile) carries on from here.
                        Outcome::Applied if self.pending.is_none() && self.pos.is_some_and(|p| p.frame_no >= primary_last) => {
                            self.state("streaming");
                            self.shared.status().last_error = None;
                            return Ok(());
                        }
                        Outcome::Applied => {}
                        Outcome::Gap => return Err("catch-up reply does not continue the replica's position".into()),
                        Outcome::Rejected(why) => {
                            let mut st = self.shared.status();
                            st.rejected += 1;
                            st.last_rejection = Some((why.clone(), Instant::now()));
                            drop(st);
                            return Err(why);
                        }
                    }
                }
                Body::NeedSnapshot { reason } => self.bootstrap(socks, ep, &reason)?,
                Body::Error { reason } => return Err(format!("the primary refused: {reason}")),
                _ => return Err("unexpected catch-up reply".into()),
            }
        }
    }

    /// Replaces the replica's content with a snapshot of the primary, as one
    /// transaction: readers see the old database until the last page is in.
    fn bootstrap(&mut self, socks: &ReplicaSockets, ep: &Endpoint, reason: &str) -> Result<(), String> {
        // Whether this bootstrap carries out a `walcast_rebootstrap` request: a
        // request made while another bootstrap runs must outlive it.
        let requested = self.force_bootstrap;
        self.abort_pending();
        self.state("bootstrapping");
        crate::primary::report(&format!("{}: bootstrapping from a snapshot: {reason}", self.db()));
        let (db_id, generation) = self.pos.map_or(([0; 16], 0), |p| (p.db_id, p.generation));
        let reply = self.call(socks, &wire::req_snapshot(db_id, generation))?;
        let snap = receive::snapshot_reply(&reply)?;
        let page_size = snap.page_size;
        self.check_source(&snap.db_id, snap.generation, ep)?;
        // Until the snapshot is committed the file names no position: a crash
        // in between must bootstrap again, not apply frames onto a half-known state.
        if let Some(f) = &self.pos_file {
            f.set_len(0).map_err(|e| format!("cannot reset the applied position: {e}"))?;
        }
        self.pos = None;
        self.shared.status().position = None;
        self.prepare_db(page_size)?;
        self.open_appender(page_size)?;
        self.app.as_mut().unwrap().forget_last();
        self.begin()?;
        let r = (|| {
            // The last page received is held back: it is appended last, with
            // the database size that ends the transaction.
            let mut held: Option<(u32, Vec<u8>)> = None;
            let mut copy = receive::SnapshotCopy::new(&snap);
            let mut requests = socks.requests(SNAPSHOT_REQUESTS_IN_FLIGHT)?;
            loop {
                while requests.has_room() {
                    let Some(range) = copy.next_request() else { break };
                    requests.send(range, wire::req_pages(snap.db_id, snap.generation, snap.snapshot_id, range.0, range.1))?;
                }
                let reply = requests.next_reply();
                self.note_damaged(socks);
                let Some((range, reply)) = reply? else { break };
                self.shared.status().last_message = Some(Instant::now());
                self.write_status_if_due();
                let app = self.app.as_mut().unwrap();
                for (n, page) in copy.accept(range, &reply)? {
                    match &mut held {
                        Some((hn, hp)) => {
                            app.append(*hn, hp, 0).map_err(|e| e.to_string())?;
                            *hn = n;
                            hp.copy_from_slice(page);
                        }
                        None => held = Some((n, page.to_vec())),
                    }
                }
            }
            let (hn, hp) = held.ok_or("the snapshot holds no pages")?;
            let app = self.app.as_mut().unwrap();
            app.append(hn, &hp, snap.db_pages).map_err(|e| e.to_string())?;
            app.commit().map_err(|e| e.to_string())
        })();
        if let Err(e) = r {
            self.app.as_mut().unwrap().abort();
            return Err(e);
        }
        {
            // The snapshot is in: what follows fetches the frames committed
            // since it was taken, and `walcast_wait` may already return.
            let mut st = self.shared.status();
            st.bootstraps += 1;
            st.state = "catching_up";
        }
        // The snapshot's generation may be older than the fence when a
        // rebootstrap was asked for: the operator chose this primary.
        self.fence_generation = snap.generation;
        self.identity = Some(snap.db_id);
        self.force_bootstrap = false;
        // Record whom the replica follows, and that the request is done, before
        // the position says the bootstrap is complete.
        let recorded = crate::conf::Conf::update(&conf_path(self.db()), |c| {
            c.db_id = Some(snap.db_id);
            if requested {
                c.rebootstrap = false;
            }
            Ok(())
        });
        if let Err(e) = recorded {
            crate::primary::report(&format!("{}: cannot record the followed db_id: {e}", self.db()));
        }
        self.applied(Position {
            db_id: snap.db_id,
            generation: snap.generation,
            frame_no: snap.frame_no,
            checksum: snap.checksum,
            page_size,
        });
        Ok(())
    }

    /// Makes the database file ready to take frames of `page_size`-byte pages
    /// in WAL mode: a new, empty file is set up; an empty database of another
    /// page size is rebuilt; a database with content of another page size is refused.
    fn prepare_db(&mut self, page_size: u32) -> Result<(), String> {
        let sql = |s: &str| self.files.sql(s).map(|v| v.unwrap_or_default());
        let current: u32 = sql("PRAGMA page_size")?.parse().unwrap_or(0);
        let pages: u64 = sql("PRAGMA page_count")?.parse().unwrap_or(0);
        if pages == 0 || current != page_size {
            let tables: u64 = sql("SELECT count(*) FROM sqlite_master")?.parse().unwrap_or(1);
            if pages > 0 && tables > 0 {
                return Err(format!(
                    "the replica has {current}-byte pages and content, the primary has {page_size}-byte pages; move the replica aside to bootstrap a new one"
                ));
            }
            self.app = None;
            if pages > 0 {
                sql("PRAGMA journal_mode=DELETE")?;
            }
            sql(&format!("PRAGMA page_size={page_size}"))?;
            if pages > 0 {
                sql("VACUUM")?;
            }
        }
        let mode = sql("PRAGMA journal_mode=WAL")?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("cannot switch the replica to WAL mode (journal_mode stays '{mode}')"));
        }
        self.hold_database_open()
    }

    fn housekeeping(&mut self, link_down: bool) {
        // Another process may have asked for a rebootstrap, promoted the
        // replica or changed its role.
        if self.last_conf_check.elapsed() >= Duration::from_millis(250) {
            self.last_conf_check = Instant::now();
            match load_conf(self.db()) {
                Some(c) if c.role != crate::conf::Role::Replica || c.promoting => self.leave = true,
                _ if crate::seal::key_stamp(self.db()) != self.key_stamp => self.leave = true,
                Some(c) if c.relay != self.relay_url => self.leave = true,
                Some(c) if c.rebootstrap && !self.force_bootstrap => {
                    self.force_bootstrap = true;
                    self.need_catchup = true;
                }
                _ => {}
            }
        }
        if self.last_checkpoint.elapsed() > Duration::from_millis(100) {
            if let Some(app) = self.app.as_mut() {
                if app.unbackfilled().unwrap_or(0) >= CHECKPOINT_FRAMES {
                    match &self.checkpoints {
                        // Never waits: one already asked for is as good.
                        Some(tx) => {
                            let _ = tx.try_send(());
                        }
                        None if self.pending.is_none() => {
                            let _ = self.files.sql("PRAGMA wal_checkpoint(PASSIVE)");
                        }
                        None => {}
                    }
                }
            }
            self.last_checkpoint = Instant::now();
        }
        {
            let mut st = self.shared.status();
            if st.last_message.is_some_and(|t| t.elapsed() > SILENCE) && st.state == "streaming" {
                st.state = "disconnected";
                st.last_error = Some(format!("no message from the primary for {} s", SILENCE.as_secs()));
            }
            // NNG closed the connection (a cut, the primary gone): say so now,
            // not after SILENCE.
            if link_down && st.state == "streaming" {
                st.state = "disconnected";
                st.last_error = Some("the connection to the primary is down (reconnecting)".into());
            }
        }
        self.write_status_if_due();
    }

    /// A change is written within status::WRITE_EVERY; an unchanged status is
    /// refreshed every status::REFRESH (readers age what it says). Also called
    /// between the requests of a catch-up or a bootstrap, which can last
    /// minutes on a slow link: other processes must not take the replica for
    /// one nobody applies.
    fn write_status_if_due(&mut self) {
        let since = self.last_status_write.elapsed();
        if since >= crate::status::WRITE_EVERY {
            let v = self.status_now();
            if since >= crate::status::REFRESH || status_figures(&v) != self.status_written {
                self.write_status_value(v);
            }
        }
    }

    fn status_now(&self) -> serde_json::Value {
        status_value(&self.shared.status(), self.shared.endpoint.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn write_status(&mut self) {
        let v = self.status_now();
        self.write_status_value(v);
    }

    fn write_status_value(&mut self, v: serde_json::Value) {
        self.last_status_write = Instant::now();
        self.status_written = status_figures(&v);
        // On a full disk too: the status must still say why apply stopped.
        crate::status::write(&status_path(self.db()), &v);
    }

    /// Leaves a position that survives a machine restart: the WAL is synced up
    /// to it.
    fn shutdown(&mut self) {
        self.abort_pending();
        if let (Some(app), Some(p), Some(f)) = (self.app.as_ref(), self.pos, self.pos_file.as_ref()) {
            if app.sync_wal().is_ok() {
                let _ = save_position(f, &p, true);
            }
        }
        self.write_status();
        self.state("disconnected");
    }
}

#[cfg(test)]
mod tests {
    //! Verify before apply: what must be refused is refused before the replica's
    //! files are touched (these files refuse every use).
    use super::*;
    use crate::frame::make_frame;
    use crate::walindex::{Region, Shm};

    struct NoShm;
    impl Shm for NoShm {
        fn region(&mut self, _: u32) -> io::Result<Region<'_>> {
            panic!("the wal-index was touched")
        }
    }
    impl ShmLocks for NoShm {
        fn try_lock(&mut self, _: u32, _: u32, _: bool) -> io::Result<bool> {
            panic!("the wal-index was locked")
        }
        fn unlock(&mut self, _: u32, _: u32, _: bool) {}
    }
    struct NoFiles;
    impl ReplicaFiles for NoFiles {
        type Shm = NoShm;
        fn open_shm(&self) -> io::Result<NoShm> {
            panic!("the wal-index was opened")
        }
        fn sql(&self, _: &str) -> Result<Option<String>, String> {
            panic!("the database was queried")
        }
    }

    const DB: [u8; 16] = [7; 16];
    const PAGE: u32 = 512;

    /// A replica at frame 10 of DB, generation 1<<32 | 3 (term 1).
    fn session<'a>(shared: &'a Shared, files: &'a NoFiles) -> Session<'a, NoFiles> {
        let mut s = Session::new(shared, files, 0);
        let p = Position { db_id: DB, generation: (1 << 32) | 3, frame_no: 10, checksum: 0xabc, page_size: PAGE };
        s.pos = Some(p);
        s.identity = Some(DB);
        s.fence_generation = p.generation;
        s
    }

    /// A message that continues the replica's chain exactly, with a valid CRC,
    /// from (db_id, generation).
    fn next_frames(db_id: [u8; 16], generation: u64) -> Vec<u8> {
        let page = vec![0x5a; PAGE as usize];
        let f = make_frame(0xabc, 11, 2, 5, &page);
        let mut b = wire::FramesBuilder::new(db_id, generation, 0, 11, PAGE, 0);
        b.push(&f, &page);
        b.finish()
    }

    fn apply(s: &mut Session<NoFiles>, msg: &[u8]) -> Outcome {
        let (h, body) = wire::decode(msg).expect("a valid message");
        let Body::Frames { page_size, frames, .. } = body else { panic!("frames expected") };
        s.apply_frames(&h, page_size, &frames)
    }

    #[test]
    fn a_primary_still_indexing_is_catch_up_not_an_error() {
        let indexing = "the primary refused: the primary is still indexing the older part of its log (at byte 1 of 2); try again";
        assert_eq!(catchup_failure_state(indexing), "catching_up");
        assert_eq!(catchup_failure_state("no catch-up reply: Timed out"), "disconnected");
        assert_eq!(catchup_failure_state("the primary refused: snapshot 3 expired; start a new one"), "error");
    }

    #[test]
    fn frames_of_another_database_with_a_valid_crc_are_refused() {
        let (shared, files) = (Shared::new("/nonexistent/r.db", None), NoFiles);
        let mut s = session(&shared, &files);
        let other = [8; 16];
        match apply(&mut s, &next_frames(other, (1 << 32) | 3)) {
            Outcome::Rejected(why) => assert!(why.contains("another database"), "{why}"),
            _ => panic!("frames of another database were not refused"),
        }
        assert_eq!(s.pos.unwrap().frame_no, 10);
    }

    #[test]
    fn frames_of_an_older_generation_with_a_valid_crc_are_refused() {
        let (shared, files) = (Shared::new("/nonexistent/r.db", None), NoFiles);
        let mut s = session(&shared, &files);
        // the old primary after a failover: term 0
        for generation in [3u64, 7, (1 << 32) | 2] {
            match apply(&mut s, &next_frames(DB, generation)) {
                Outcome::Rejected(why) => assert!(why.contains("old generation"), "{why}"),
                _ => panic!("frames of generation {generation} were not refused"),
            }
        }
        assert_eq!(s.pos.unwrap().frame_no, 10);
    }

    #[test]
    fn a_newer_generation_is_taken_only_where_it_starts() {
        let (shared, files) = (Shared::new("/nonexistent/r.db", None), NoFiles);
        let mut s = session(&shared, &files);
        // No generation-start flag: not applied; catch-up must fetch the start.
        assert!(matches!(apply(&mut s, &next_frames(DB, (2 << 32) | 1)), Outcome::Gap));
        assert_eq!(s.pos.unwrap().frame_no, 10);
    }

    #[test]
    fn catch_up_replies_of_a_stale_primary_or_another_database_are_refused() {
        let (shared, files) = (Shared::new("/nonexistent/r.db", None), NoFiles);
        let mut s = session(&shared, &files);
        let ep = parse_endpoint("tcp://127.0.0.1:9").unwrap();
        let e = s.check_source(&DB, 5, &ep).unwrap_err();
        assert!(e.contains("stale primary") && e.contains("term 0") && e.contains("term 1"), "{e}");
        let e = s.check_source(&[9; 16], (1 << 32) | 3, &ep).unwrap_err();
        assert!(e.contains("another database") && e.contains("walcast_rebootstrap"), "{e}");
        assert!(s.check_source(&DB, (1 << 32) | 3, &ep).is_ok());
        assert!(s.check_source(&DB, (2 << 32) | 1, &ep).is_ok(), "a newer term is followed");
        // Told to: anything goes.
        s.force_bootstrap = true;
        assert!(s.check_source(&[9; 16], 1, &ep).is_ok());
    }
}
