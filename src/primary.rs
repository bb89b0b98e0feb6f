//! Per-database state in this process: the role, the replication log, the capture
//! thread, and what the VFS hooks decide.
//!
//! Hot paths (every WAL write, every lock release) check an atomic flag and do
//! nothing else unless the database is a primary. On a primary, a commit claims
//! its commit frame (one 12-byte pwrite, see `claim.rs`) and wakes the capture
//! thread (a non-blocking channel send); it never writes the log, syncs, or
//! waits. Log writes happen on the capture thread, and synchronously only where
//! SQLite is about to destroy WAL content (restart, truncate, delete), which is
//! also where the log is made durable.

use crate::capture::{self, CaptureError, CatchUp, Committed, Imaging, Paths};
use crate::capture_failure::{self, Streak};
use crate::claim::{self, ClaimFile, WalMark};
use crate::conf::{self, Conf, Role};
use crate::log::{hex, LogError, LogWriter, WalCursor};
use crate::vfs::{Connection, PrivateDb};
use libsqlite3_sys as ffi;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a synchronous catch-up (SQL functions, setting the role) waits for
/// writers to let a base image be taken.
const IMAGE_WAIT: Duration = Duration::from_secs(10);
/// How long a promotion waits for the process that applies to the replica to stop.
const PROMOTE_WAIT: Duration = Duration::from_secs(10);
/// What a catch-up says while a base image still waits for writers.
const IMAGE_WAITING: &str = "timed out waiting for writers to finish so that a base image can be taken";
/// The least time between two capture passes while commits stream in.
const CAPTURE_COALESCE: Duration = Duration::from_micros(100);
/// The most it waits, however long the stream.
const CAPTURE_COALESCE_MAX: Duration = Duration::from_millis(2);
/// The commit rate (per second) up to which capture copies each commit at once.
const RATE_LOW: f64 = 1200.0;
/// How long the commit rate is smoothed over.
const RATE_SMOOTHING: Duration = Duration::from_millis(20);

/// The nice value of walcast's background threads: capture, the publisher and
/// its catch-up server, the replica's applier and checkpointer, and the NNG
/// threads they start (threads inherit it). They also run as SCHED_BATCH (see
/// `vfs::lower_thread_priority`). Where the CPU is short, as on a replica
/// whose readers keep every core busy, or a primary whose writers do, the
/// application's threads run first:
/// - at nice 10, a replica's point reads kept their p99 at 1.4-2.0x idle while
///   it applied 10,000 commits/s, against 2.6-3.0x at the same priority
///   (plain SQLite with a local writer: 1.7-1.8x);
/// - as SCHED_BATCH, capture no longer preempts the writer whose commit woke
///   it: with one of 2 cores busy, a paced writer's commit call took 48 µs
///   (p50; plain SQLite 44 µs) against 189 µs at nice 10 alone, when capture,
///   the send and even the replica's apply ran before the call returned.
///
/// The cost, only under contention, is lag: replication gets about a tenth of
/// a core for each busy application thread it shares one with, and waits for
/// the writer to finish its commit call (lag p50 at 1,000 commits/s went from
/// -4 µs to 175 µs there). Where CPU is free it changes nothing.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread to BACKGROUND_NICE and SCHED_BATCH; each
/// background thread calls it first. (Only lowering is allowed without
/// privileges, hence only these threads, which never run application work.)
pub fn yield_to_application() {
    // Advisory: a refusal (a sandbox) leaves the thread as it was.
    let _ = crate::vfs::lower_thread_priority(BACKGROUND_NICE);
}

/// The commit rate capture sees, smoothed over about RATE_SMOOTHING: one pass
/// that finds two commits close together does not make the next one wait, and
/// a stream is recognised within a few tens of milliseconds.
#[derive(Default)]
struct CommitRate {
    per_sec: f64,
}

impl CommitRate {
    /// Takes a pass that found `found` commits `over` the time since the pass
    /// before it.
    fn update(&mut self, found: u64, over: Duration) {
        let over = over.as_secs_f64().max(1e-6);
        let weight = over / (over + RATE_SMOOTHING.as_secs_f64());
        self.per_sec += weight * (found as f64 / over - self.per_sec);
    }
}

/// How long a capture pass waits after the one before, given the commit rate.
/// Up to RATE_LOW commits a second every commit is copied at once
/// (CAPTURE_COALESCE, the least gap between passes); from there the window
/// grows with the cube of the rate to CAPTURE_COALESCE_MAX, reached at about
/// 2.7 times RATE_LOW. Above a few thousand commits a second the primary then
/// copies, publishes and each replica applies (and its readers see a new
/// snapshot) about 500 times a second, each time one transaction with each
/// page once, rather than once or twice per commit: capture and the log's
/// disk writes take a bounded share of the machine, which is what lets the
/// writer keep its speed (with synchronous=FULL, the log's writes delay
/// SQLite's own fsyncs), and readers of a replica keep their page cache
/// between most reads. The cost is at most 2 ms of lag at those rates.
fn coalesce_window(rate: &CommitRate) -> Duration {
    if rate.per_sec <= RATE_LOW {
        return CAPTURE_COALESCE;
    }
    let r = rate.per_sec / RATE_LOW;
    CAPTURE_COALESCE.mul_f64(r * r * r).clamp(CAPTURE_COALESCE, CAPTURE_COALESCE_MAX)
}

/// Writes a walcast message to stderr, where a user finds it, and to SQLite's
/// error log; repeated identical messages are shown once.
pub fn report(msg: &str) {
    static LAST: Mutex<String> = Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if *last != msg {
        eprintln!("walcast: {msg}");
        crate::vfs::sqlite_log(msg);
        *last = msg.to_string();
    }
}

pub enum PragmaOutcome {
    /// Not a pragma walcast handles: let SQLite have it.
    NotOurs,
    Done(Option<String>),
    Fail(String),
}

/// A refusal from a VFS hook: the SQLite result code and the reason.
pub struct HookError {
    pub code: i32,
    pub message: String,
}

struct Inner {
    role: Role,
    log: Option<LogWriter>,
    /// On a primary: the thread that publishes the log and serves catch-up.
    publisher: Option<crate::publish::Publisher>,
    /// On a replica: the thread that applies, or waits to.
    replica: Option<ReplicaThread>,
    /// The capture thread's handle on the database file.
    capture_db: Option<PrivateDb>,
    /// And on the -wal file.
    capture_wal: crate::wal::KeptWal,
    /// The last capture failure, cleared by the next success.
    last_error: Option<String>,
    /// Capture cannot continue (the log is unusable): writes are refused.
    fatal: Option<String>,
    /// This process's current run of capture failures, shared with the other
    /// processes through `<db>-walcast-failure`.
    failure_streak: Option<Streak>,
}

pub struct DbState {
    pub db_path: String,
    wal_path: PathBuf,
    log_path: PathBuf,
    conf_path: PathBuf,
    inner: Mutex<Inner>,
    /// Fast check for the hot paths: the role is primary and capture is usable.
    capturing: AtomicBool,
    /// Set when capture is impossible; writes are refused.
    refusing_writes: AtomicBool,
    /// The role is replica: write transactions are refused.
    replica_role: AtomicBool,
    loaded: AtomicBool,
    wake: crate::signal::Signal,
    /// The capture thread's next pass syncs the log, without waiting for more
    /// commits: a checkpoint started, or a WAL restart left its record unsynced.
    sync_requested: AtomicBool,
    thread_started: AtomicBool,
    /// Main-database handles this process has open on this database.
    open_handles: AtomicUsize,
    claims: OnceLock<Arc<ClaimFile>>,
    /// Where this process has mapped the first wal-index region (0 = not mapped).
    wal_index: AtomicUsize,
    /// The first piece of a frame header SQLite split in two (offset, bytes).
    partial_header: Mutex<Option<(u64, Vec<u8>)>>,
    /// Whether `partial_header` holds a piece (read without its lock).
    partial_pending: AtomicBool,
    /// When this process last read the conf file for a role another process set
    /// (`vfs::coarse_now_ms`).
    conf_checked_ms: AtomicU64,
    /// The wal-index header when this process last took the WAL write lock.
    write_start: Mutex<Option<WalIndexHeader>>,
    /// The page size of the WAL walcast follows (0 = not known yet).
    wal_page_size: std::sync::atomic::AtomicU32,
    claim_path: PathBuf,
    failure_path: PathBuf,
    /// This process's own handle on the database file, holding a SHARED lock,
    /// while it captures (see `pin_db`); closing it releases the lock.
    db_pin: Mutex<Option<PrivateDb>>,
}

struct ReplicaThread {
    shared: Arc<crate::replica::Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ReplicaThread {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The wal-index header fields a writer needs: the last committed frame, the
/// WAL's salts and its page size.
#[derive(Clone, Copy, Debug)]
pub struct WalIndexHeader {
    pub max_frame: u32,
    /// The checksum of the last committed frame.
    pub frame_cksum: (u32, u32),
    pub salt1: u32,
    pub salt2: u32,
    pub page_size: u32,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<DbState>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<DbState>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The state of a database this process has opened through walcast.
pub fn lookup(db_path: &str) -> Option<Arc<DbState>> {
    registry().lock().unwrap_or_else(|e| e.into_inner()).get(db_path).cloned()
}

fn get_or_create(db_path: &str) -> Arc<DbState> {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.entry(db_path.to_string())
        .or_insert_with(|| {
            Arc::new(DbState {
                db_path: db_path.to_string(),
                wal_path: format!("{db_path}-wal").into(),
                log_path: format!("{db_path}-walcast").into(),
                conf_path: format!("{db_path}-walcast-conf").into(),
                inner: Mutex::new(Inner {
                    role: Role::Off,
                    log: None,
                    publisher: None,
                    replica: None,
                    capture_db: None,
                    capture_wal: Default::default(),
                    last_error: None,
                    fatal: None,
                    failure_streak: None,
                }),
                replica_role: AtomicBool::new(false),
                capturing: AtomicBool::new(false),
                refusing_writes: AtomicBool::new(false),
                loaded: AtomicBool::new(false),
                wake: Default::default(),
                sync_requested: AtomicBool::new(false),
                thread_started: AtomicBool::new(false),
                open_handles: AtomicUsize::new(0),
                claims: OnceLock::new(),
                wal_index: AtomicUsize::new(0),
                wal_page_size: Default::default(),
                conf_checked_ms: AtomicU64::new(0),
                partial_header: Mutex::new(None),
                partial_pending: AtomicBool::new(false),
                write_start: Mutex::new(None),
                claim_path: format!("{db_path}-walcast-claim").into(),
                failure_path: capture_failure::path(db_path),
                db_pin: Mutex::new(None),
            })
        })
        .clone()
}

/// Called when SQLite opens a main database file through walcast.
pub fn on_main_db_open(
    db_path: &str,
    uri_role: Option<&str>,
    uri_endpoint: Option<String>,
    readonly: bool,
) -> Result<Arc<DbState>, String> {
    let state = get_or_create(db_path);
    state.open_handles.fetch_add(1, Ordering::AcqRel);
    let r = open_main_db(&state, db_path, uri_role, uri_endpoint, readonly);
    if r.is_err() {
        state.main_db_closed();
    } else {
        state.pin_db();
    }
    r.map(|_| state)
}

fn open_main_db(
    state: &Arc<DbState>,
    db_path: &str,
    uri_role: Option<&str>,
    uri_endpoint: Option<String>,
    readonly: bool,
) -> Result<(), String> {
    // The first open in this process resumes the role recorded beside the database.
    if !state.loaded.swap(true, Ordering::AcqRel) {
        match Conf::load(&state.conf_path) {
            Ok(c) if c.role == Role::Primary => {
                let mut g = state.lock();
                if let Err(e) = state.activate(&mut g, None) {
                    state.set_fatal(&mut g, e);
                }
            }
            Ok(c) if c.role == Role::Replica => {
                let mut g = state.lock();
                state.start_replica(&mut g, c.endpoint);
            }
            Ok(_) => {}
            Err(e) => report(&format!("{db_path}: {e}")),
        }
    }
    if let Some(e) = uri_endpoint {
        state.set_endpoint(&e).map_err(|e| format!("{db_path}: {e} (URI parameter walcast_endpoint)"))?;
    }
    if let Some(r) = uri_role {
        let role = conf::parse_role(r).map_err(|e| format!("{db_path}: {e} (URI parameter walcast_role)"))?;
        if role == Role::Primary && readonly {
            return Err(format!("{db_path}: walcast_role=primary needs a read-write connection"));
        }
        state.set_role(role).map_err(|e| format!("{db_path}: {e}"))?;
    }
    Ok(())
}

/// What `PRAGMA walcast_key` and the status show of the key: whether one is
/// set and its fingerprint, never the key.
fn key_state(db_path: &str) -> String {
    match crate::seal::Sealer::load(db_path) {
        Ok(s) => s.fingerprint().map_or_else(|| "off".to_string(), |f| format!("on (fingerprint {f})")),
        Err(e) => format!("error: {e}"),
    }
}

/// The figures of the process that publishes, from its status file; a
/// status it stopped refreshing means no process publishes now.
fn add_publisher_status(v: &mut serde_json::Value, db_path: &str, own_error: Option<String>) {
    match crate::status::read(&crate::publish::status_path(db_path)) {
        Some((s, Some(age))) if age <= crate::status::STALE_MS && s["publishing"] == true => {
            for k in ["publisher_pid", "replicas", "published_frame_no", "snapshots_served"] {
                v[k] = s[k].clone();
            }
            v["publish_error"] = s["publish_error"].clone();
        }
        last => {
            v["publisher_pid"] = serde_json::Value::Null;
            v["replicas"] = 0.into(); // nothing listens for them
            let why = last.and_then(|(s, _)| s["publish_error"].as_str().map(str::to_string)).or(own_error);
            v["publish_error"] = match why {
                Some(e) => format!("no process publishes this database now; the last failure: {e}"),
                None => "no process publishes this database now (a process that has it open with walcast loaded publishes)".into(),
            }
            .into();
        }
    }
}

fn add_key_status(v: &mut serde_json::Value, db_path: &str) {
    match crate::seal::Sealer::load(db_path) {
        Ok(s) => {
            v["encryption"] = if s.is_on() { "xchacha20poly1305" } else { "off" }.into();
            v["key_fingerprint"] = s.fingerprint().into();
        }
        Err(e) => v["encryption"] = format!("error: {e}").into(),
    }
}

/// The answer to a walcast pragma on a database walcast cannot replicate.
pub fn pragma_on_unreplicable(name: &str, what: &str) -> PragmaOutcome {
    if name.to_ascii_lowercase().starts_with("walcast_") {
        PragmaOutcome::Fail(format!("PRAGMA {name} cannot be used on {what}; walcast replicates only database files"))
    } else {
        PragmaOutcome::NotOurs
    }
}

impl DbState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While this process captures the database and has it open, it holds a
    /// SHARED lock on the file of its own, the lock every connection in WAL mode
    /// holds from its first read until it closes. Without it, a process without
    /// walcast that closes its connection while this process's connections have
    /// not read yet would be the last reader, and would checkpoint and delete the
    /// WAL behind walcast's back: detected, but a new generation, and a base
    /// image for every replica.
    fn pin_db(&self) {
        if !self.is_capturing() || self.open_handles.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pin = self.db_pin.lock().unwrap_or_else(|e| e.into_inner());
        if pin.is_none() {
            *pin = self.shared_lock();
        }
    }

    /// A handle of its own on the database file holding a SHARED lock, if one
    /// can be had (a database that cannot be opened is capture's to report; a
    /// connection's EXCLUSIVE lock refuses it until the next pass).
    fn shared_lock(&self) -> Option<PrivateDb> {
        PrivateDb::open(&self.db_path).ok().filter(|h| h.lock_shared())
    }

    fn unpin_db(&self) {
        *self.db_pin.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A connection of this process asks for an EXCLUSIVE lock on the database
    /// file (`lock` takes it): to checkpoint and delete the WAL as it closes
    /// last, or for exclusive locking mode. This process's pin must not stand in
    /// its way (the unix VFS refuses EXCLUSIVE while another handle of the same
    /// process holds SHARED), so it is released first, and taken again if the
    /// lock is refused.
    pub fn exclusive_db_lock(&self, lock: impl FnOnce() -> i32) -> i32 {
        let mut pin = self.db_pin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(held) = pin.take() else {
            drop(pin);
            return lock();
        };
        drop(held); // closing it releases its SHARED lock
        let rc = lock();
        if rc != ffi::SQLITE_OK {
            *pin = self.shared_lock();
        }
        rc
    }

    /// Capture stops in this process (another role, or a fatal error).
    fn stop_capturing(&self) {
        self.capturing.store(false, Ordering::Release);
        self.unpin_db();
    }

    /// A main-database handle of this process on this database was closed.
    pub fn main_db_closed(&self) {
        if self.open_handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.unpin_db();
            // The last one: a replica applier hands over to another process.
            if let Some(r) = self.lock().replica.as_ref() {
                r.shared.poke();
            }
        }
    }

    /// Why a write transaction on this database must be refused, if it must.
    pub fn refuse_replica_write(&self) -> Option<String> {
        if !self.replica_role.load(Ordering::Acquire) {
            return None;
        }
        // Promoted by another process since?
        self.follow_role_of_other_processes();
        if !self.replica_role.load(Ordering::Acquire) {
            return None;
        }
        let ep = Conf::load(&self.conf_path).ok().and_then(|c| c.endpoint).unwrap_or_else(|| "(no endpoint set)".into());
        Some(format!("{} is a read-only walcast replica of the primary at {ep}: write there", self.db_path))
    }

    /// Starts the replica thread (the caller holds the state lock).
    fn start_replica(self: &Arc<Self>, g: &mut Inner, endpoint: Option<String>) {
        g.role = Role::Replica;
        g.log = None;
        g.publisher = None;
        self.stop_capturing();
        self.refusing_writes.store(false, Ordering::Release);
        self.replica_role.store(true, Ordering::Release);
        if let Some(r) = &g.replica {
            r.shared.set_endpoint(endpoint);
            return;
        }
        let shared = crate::replica::Shared::new(&self.db_path, endpoint);
        let me = Arc::downgrade(self);
        let files = crate::vfs::VfsReplicaFiles::new(&self.db_path);
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("walcast-replica".into())
            .spawn(move || {
                crate::replica::run(sh, files, move || me.upgrade().is_some_and(|s| s.open_handles.load(Ordering::Acquire) > 0));
            })
            .ok();
        g.replica = Some(ReplicaThread { shared, thread });
    }

    /// Sets the endpoint, as `PRAGMA walcast_endpoint = ...` does: persisted,
    /// and applied at once to a running publisher or replica.
    pub fn set_endpoint(&self, url: &str) -> Result<String, String> {
        let ep = crate::transport::parse_endpoint(url)?;
        let mut g = self.lock();
        Conf::update(&self.conf_path, |c| {
            c.endpoint = Some(ep.url.clone());
            Ok(())
        })?;
        if let Some(r) = &g.replica {
            r.shared.set_endpoint(Some(ep.url.clone()));
        }
        if g.publisher.is_some() {
            g.publisher = Some(self.new_publisher(ep.clone()));
        }
        Ok(ep.url)
    }

    fn endpoint(&self) -> Option<String> {
        Conf::load(&self.conf_path).ok().and_then(|c| c.endpoint)
    }

    /// A publisher thread for this database; the claim file's doorbell wakes
    /// it (see claim.rs).
    fn new_publisher(&self, ep: crate::transport::Endpoint) -> crate::publish::Publisher {
        crate::publish::start(&self.db_path, self.log_path.clone(), ep, self.claims.get().cloned())
    }

    fn start_publisher(&self, g: &mut Inner) {
        if g.publisher.is_some() {
            return;
        }
        let url = self.endpoint().unwrap_or_else(|| crate::transport::default_endpoint(&self.db_path));
        match crate::transport::parse_endpoint(&url) {
            Ok(ep) => g.publisher = Some(self.new_publisher(ep)),
            Err(e) => report(&format!("{}: not publishing: {e}", self.db_path)),
        }
    }

    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    fn set_fatal(&self, g: &mut Inner, msg: String) {
        report(&format!("{}: replication stopped, writes to this database are refused: {msg}", self.db_path));
        Streak::failed(&mut g.failure_streak, &self.failure_path, &msg, true, false);
        g.fatal = Some(msg);
        g.log = None;
        self.stop_capturing();
        self.refusing_writes.store(g.role == Role::Primary, Ordering::Release);
    }

    // -- role --------------------------------------------------------------

    /// Sets the role, as `PRAGMA walcast_role = ...` does. On error nothing has
    /// changed.
    pub fn set_role(&self, role: Role) -> Result<Role, String> {
        let mut g = self.lock();
        match role {
            Role::Off => {
                Conf::update(&self.conf_path, |c| {
                    c.role = Role::Off;
                    Ok(())
                })?;
                self.stop_capturing();
                self.refusing_writes.store(false, Ordering::Release);
                self.replica_role.store(false, Ordering::Release);
                g.role = Role::Off;
                g.log = None;
                g.publisher = None;
                g.replica = None;
                g.fatal = None;
                g.last_error = None;
                Ok(Role::Off)
            }
            Role::Replica => {
                let c = Conf::load(&self.conf_path)?;
                if g.role == Role::Replica && g.replica.is_some() {
                    return Ok(Role::Replica);
                }
                if c.role == Role::Primary || g.role == Role::Primary {
                    return self.demote(&mut g);
                }
                if c.role != Role::Replica {
                    // Only a new, empty database or an existing replica may
                    // become one: bootstrapping replaces the whole content.
                    let tables = Connection::open(&self.db_path)
                        .and_then(|conn| conn.query_text("SELECT count(*) FROM sqlite_master"))
                        .map_err(|e| format!("cannot read {}: {e}", self.db_path))?
                        .unwrap_or_default();
                    if tables != "0" {
                        return Err(format!(
                            "{} already has content ({tables} schema objects) and is not a replica; a replica starts from a new, empty database",
                            self.db_path
                        ));
                    }
                }
                let endpoint = Conf::update(&self.conf_path, |c| {
                    c.role = Role::Replica;
                    Ok(c.endpoint.clone())
                })?;
                let me = lookup(&self.db_path).ok_or("database state is gone")?;
                me.start_replica(&mut g, endpoint);
                Ok(Role::Replica)
            }
            Role::Primary => {
                if g.role == Role::Primary && g.fatal.is_none() && g.log.is_some() {
                    return Ok(Role::Primary);
                }
                let mut c = Conf::load(&self.conf_path)?;
                if c.role == Role::Replica || g.role == Role::Replica {
                    self.promote(&mut g)?;
                    drop(g);
                    return self.catch_up_now().map(|_| Role::Primary).map_err(|e| {
                        format!(
                            "{} is promoted to primary, but the base image that starts its term is not written yet ({e}); capture retries in the background",
                            self.db_path
                        )
                    });
                }
                let existing_log = self.check_existing_log(&c)?;
                ensure_wal_mode(&self.db_path)?;
                if existing_log.is_none() || c.db_id.is_none() {
                    c.db_id = Some(conf::random_id().map_err(|e| format!("cannot make a database id: {e}"))?);
                }
                let db_id = c.db_id;
                let before_role = Conf::update(&self.conf_path, |now| {
                    let before_role = now.role;
                    now.role = Role::Primary;
                    now.db_id = db_id;
                    Ok(before_role)
                })?;
                c.role = Role::Primary;
                g.fatal = None;
                let r = self.activate(&mut g, Some(&c));
                drop(g);
                // The role is only reported once the log can rebuild the database.
                match r.and_then(|_| self.catch_up_now()) {
                    Ok(()) => Ok(Role::Primary),
                    Err(e) => {
                        let mut g = self.lock();
                        self.stop_capturing();
                        self.refusing_writes.store(false, Ordering::Release);
                        g.role = before_role;
                        g.log = None;
                        // Keep the new identity: the log just created carries it.
                        let _ = Conf::update(&self.conf_path, |now| {
                            now.role = before_role;
                            Ok(())
                        });
                        Err(e)
                    }
                }
            }
        }
    }

    /// Demotes a primary to a replica (`walcast_role='replica'` on a primary):
    /// capture and publishing stop, in this process at once and in others
    /// within a quarter second, and the log is moved aside, not deleted: it may
    /// hold writes the new primary never saw. The replica knows no position, so
    /// it bootstraps from the primary it is pointed at (same db_id only), which
    /// replaces any such divergent writes rather than merging them.
    fn demote(&self, g: &mut Inner) -> Result<Role, String> {
        let aside = PathBuf::from(format!("{}.demoted-{}", self.log_path.display(), crate::log::now_ms()));
        let before = Conf::update(&self.conf_path, |c| {
            let before = c.clone();
            c.role = Role::Replica;
            // The endpoint was where this primary listened, not a primary to follow.
            c.endpoint = None;
            c.promoting = false;
            c.rebootstrap = false;
            Ok(before)
        })?;
        g.log = None;
        g.publisher = None;
        g.fatal = None;
        g.last_error = None;
        self.stop_capturing();
        if self.log_path.exists() {
            if let Err(e) = std::fs::rename(&self.log_path, &aside) {
                let _ = Conf::update(&self.conf_path, |c| {
                    c.role = before.role;
                    c.endpoint = before.endpoint.clone();
                    c.promoting = before.promoting;
                    c.rebootstrap = before.rebootstrap;
                    Ok(())
                });
                if let Err(e) = self.activate(g, None) {
                    self.set_fatal(g, e);
                }
                return Err(format!("cannot move the log {} aside: {e}", self.log_path.display()));
            }
            report(&format!(
                "{}: demoted to a replica; the log was moved to {} (it holds this primary's history, including any writes the new primary lacks)",
                self.db_path,
                aside.display()
            ));
        }
        let _ = std::fs::remove_file(crate::replica::position_path(&self.db_path));
        let me = lookup(&self.db_path).ok_or("database state is gone")?;
        me.start_replica(g, None);
        Ok(Role::Replica)
    }

    /// Promotes a replica to primary (`walcast_role='primary'` on a replica).
    /// Appliers stop (the conf says `promoting`, and this process takes the
    /// applier lock once they have); a log is created that continues the
    /// applied history: the next frame_no, chained from the last applied
    /// checksum, in a new term. Its first generation is a base image of the
    /// replica as applied. Replicas that follow the new primary then refuse
    /// everything the old primary sends (an older generation).
    fn promote(&self, g: &mut Inner) -> Result<(), String> {
        if self.log_path.exists() {
            return Err(format!(
                "cannot promote {}: a replication log {} already exists beside it; move it aside first",
                self.db_path,
                self.log_path.display()
            ));
        }
        let endpoint = Conf::update(&self.conf_path, |c| {
            c.promoting = true;
            Ok(c.endpoint.clone())
        })?;
        // Stop this process's applier, then wait for any other to stop.
        g.replica = None;
        let undo = |g: &mut Inner, why: String| -> Result<(), String> {
            let _ = Conf::update(&self.conf_path, |c| {
                c.promoting = false;
                Ok(())
            });
            if let Some(me) = lookup(&self.db_path) {
                me.start_replica(g, endpoint.clone());
            }
            Err(format!("cannot promote {}: {why}; it stays a replica", self.db_path))
        };
        let lock_path = format!("{}-walcast-applier", self.db_path);
        let lock = match File::options().create(true).truncate(false).write(true).open(&lock_path) {
            Ok(f) => f,
            Err(e) => return undo(g, format!("cannot open {lock_path}: {e}")),
        };
        let deadline = Instant::now() + PROMOTE_WAIT;
        while lock.try_lock().is_err() {
            if Instant::now() >= deadline {
                return undo(g, format!("another process still applies to it after {} s", PROMOTE_WAIT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some((pos, _)) = crate::replica::load_position(&crate::replica::position_path(&self.db_path)) else {
            return undo(g, "it has no applied position (it never completed a bootstrap)".into());
        };
        let id = crate::log::LogIdentity::continuing(pos.db_id, pos.generation, pos.frame_no, pos.checksum);
        if id.base_generation > crate::log::MAX_GENERATION {
            return undo(g, format!("its generation {} is at the last term a log can record", pos.generation));
        }
        // Created beside, then renamed: a crash leaves either no log or a whole one.
        let tmp = PathBuf::from(format!("{}.promoting", self.log_path.display()));
        let _ = std::fs::remove_file(&tmp);
        if let Err(e) = LogWriter::create_with(&tmp, id)
            .map_err(|e| e.to_string())
            .and_then(|_| std::fs::rename(&tmp, &self.log_path).map_err(|e| e.to_string()))
        {
            let _ = std::fs::remove_file(&tmp);
            return undo(g, format!("cannot create {}: {e}", self.log_path.display()));
        }
        let promoted =
            Conf { role: Role::Primary, db_id: Some(pos.db_id), endpoint: None, relay: None, rebootstrap: false, promoting: false };
        if let Err(e) = Conf::update(&self.conf_path, |c| {
            *c = promoted.clone();
            Ok(())
        }) {
            let _ = std::fs::remove_file(&self.log_path);
            return undo(g, e);
        }
        let _ = std::fs::remove_file(crate::replica::position_path(&self.db_path));
        self.replica_role.store(false, Ordering::Release);
        report(&format!(
            "{}: promoted to primary, continuing after frame_no {} in term {} (it followed {})",
            self.db_path,
            pos.frame_no,
            crate::log::term_of(id.base_generation),
            endpoint.as_deref().unwrap_or("no endpoint")
        ));
        let r = self.activate(g, Some(&promoted));
        drop(lock);
        r
    }

    /// Validates the log beside the database, if there is one, against the conf's
    /// identity, so that setting the role on a database with a foreign or corrupt
    /// log fails before anything changes.
    fn check_existing_log(&self, c: &Conf) -> Result<Option<()>, String> {
        if !self.log_path.exists() {
            return Ok(None);
        }
        let lf = crate::log::LogFile::open(&self.log_path).map_err(|e| e.to_string())?;
        match c.db_id {
            None => Err(format!(
                "{} exists but {} does not tie it to this database: it may belong to another database; move it aside to start a new log",
                self.log_path.display(),
                self.conf_path.display()
            )),
            Some(id) if id != lf.id.db_id => Err(foreign_log_message(&self.log_path, &lf.id.db_id, &id)),
            Some(_) => Ok(Some(())),
        }
    }

    /// Opens (or creates) the log, reconciles it with the database, and starts
    /// capturing. The caller holds the state lock.
    fn activate(&self, g: &mut Inner, conf: Option<&Conf>) -> Result<(), String> {
        let c = match conf {
            Some(c) => c.clone(),
            None => Conf::load(&self.conf_path)?,
        };
        g.role = Role::Primary;
        let db_id = c.db_id.ok_or_else(|| format!("{} has no db_id", self.conf_path.display()))?;
        ensure_wal_mode(&self.db_path)?;
        let log = if self.log_path.exists() {
            let (log, report_) = open_log_locked(&self.log_path)?;
            if log.id.db_id != db_id {
                return Err(foreign_log_message(&self.log_path, &log.id.db_id, &db_id));
            }
            if let Some((at, n)) = report_.torn_tail {
                report(&format!(
                    "{}: dropped a torn append of {n} bytes at offset {at} (a crash mid-write); the WAL supplies what it held",
                    self.log_path.display()
                ));
            }
            if let Some(g) = report_.garbage_tail {
                report(&format!(
                    "{}: cut off an unsynced tail that did not verify ({g}), as left by a power loss; the WAL supplies what it held",
                    self.log_path.display()
                ));
            }
            if let Some(p) = report_.header_problem {
                report(&format!("{}: {p}; using the other header slot", self.log_path.display()));
            }
            log
        } else {
            let db_id = if conf.is_some() {
                db_id
            } else {
                // Resuming a primary whose log is gone: its history is lost, so
                // the new log gets a new identity (frame_no restarts at 1, and
                // nothing may mistake it for the old history).
                let fresh = conf::random_id().map_err(|e| format!("cannot make a database id: {e}"))?;
                Conf::update(&self.conf_path, |now| {
                    *now = Conf { role: Role::Primary, db_id: Some(fresh), endpoint: now.endpoint.clone(), ..Default::default() };
                    Ok(())
                })?;
                report(&format!("{}: the replication log is missing; starting a new log with a new db_id", self.db_path));
                fresh
            };
            LogWriter::create(&self.log_path, db_id).map_err(|e| format!("cannot create {}: {e}", self.log_path.display()))?
        };
        if self.claims.get().is_none() {
            let c = ClaimFile::open(&self.claim_path).map_err(|e| format!("cannot open {}: {e}", self.claim_path.display()))?;
            let _ = self.claims.set(Arc::new(c));
        }
        // Full size now, while there is room: a failure is recorded in place.
        if let Err(e) = capture_failure::prepare(&self.failure_path) {
            report(&format!("cannot create {}: {e}", self.failure_path.display()));
        }
        g.log = Some(log);
        g.fatal = None;
        self.refusing_writes.store(false, Ordering::Release);
        self.capturing.store(true, Ordering::Release);
        self.pin_db();
        // The capture thread reconciles the log with the database at once:
        // recovering from the WAL what was committed but not yet logged, or
        // starting a generation. Hooks and SQL functions catch up synchronously.
        self.start_thread();
        self.start_publisher(g);
        self.wake.raise();
        Ok(())
    }

    fn start_thread(&self) {
        let Some(me) = lookup(&self.db_path) else { return };
        if self.thread_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let spawned = std::thread::Builder::new().name("walcast-capture".into()).spawn(move || loop {
            // A panic must not end capture for the life of the process.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Arc::clone(&me).capture_thread())).is_err() {
                report(&format!("{}: internal error in the capture thread; restarting it", me.db_path));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        if let Err(e) = spawned {
            self.thread_started.store(false, Ordering::Release);
            report(&format!("{}: cannot start the capture thread: {e}", self.db_path));
        }
    }

    /// The capture thread: woken after each write transaction (and once a second,
    /// to notice writes made without walcast), it brings the log up to the WAL.
    fn capture_thread(self: Arc<Self>) {
        // Below the application's threads (see `yield_to_application`).
        yield_to_application();
        let mut last_run = Instant::now() - CAPTURE_COALESCE_MAX;
        // The window for the next pass, from the rate the passes saw.
        let mut rate = CommitRate::default();
        let mut window = CAPTURE_COALESCE;
        loop {
            // While this process has the database open, look once a second for
            // writes made without walcast. Once it has closed it, touch nothing
            // until it is opened again.
            if self.open_handles.load(Ordering::Acquire) > 0 {
                self.wake.wait(Some(Duration::from_secs(1)));
            } else {
                self.wake.wait(None);
            }
            if !self.is_capturing() || self.open_handles.load(Ordering::Acquire) == 0 {
                let mut g = self.lock();
                g.capture_db = None;
                g.capture_wal.forget();
                drop(g);
                self.unpin_db();
                continue;
            }
            // Taken again after a connection's EXCLUSIVE lock (see exclusive_db_lock).
            self.pin_db();
            // A sync asked for is wanted before the checkpoint that asked for
            // it ends: this pass does not wait for more commits.
            let sync = self.sync_requested.swap(false, Ordering::AcqRel);
            // Under a stream of commits, copy several per pass: the fixed cost
            // of a pass (locks, opening the WAL) is then shared, and the
            // publisher sends (and replicas apply) fewer, larger messages.
            // The window grows with the stream (see `coalesce_window`). An
            // isolated commit is copied at once.
            let since = last_run.elapsed();
            if since < window && !sync {
                std::thread::sleep(window - since);
            }
            let interval = last_run.elapsed();
            last_run = Instant::now();
            // A base image waits for writers; give up after a short while and
            // try again at the next wake-up rather than spin.
            for attempt in 0..50 {
                let mut g = self.lock();
                match self.catch_up_locked(&mut g, false) {
                    Err(CaptureError::Busy) => {
                        drop(g);
                        std::thread::sleep(Duration::from_millis(1 + attempt / 5));
                    }
                    r => {
                        // This thread sends what it captured (not SQLite's:
                        // see `publish::Sender`), without the state lock.
                        let sender = g.publisher.as_ref().map(|p| p.sender.clone());
                        drop(g);
                        if let (Ok(_), Some(s)) = (&r, sender) {
                            s.send_new_units();
                        }
                        // After the send: what this pass captured reaches the
                        // replicas without waiting for the disk.
                        if sync && r.is_ok() {
                            self.sync_log();
                        }
                        rate.update(r.map_or(0, |c| c.transactions), interval);
                        window = coalesce_window(&rate);
                        break;
                    }
                }
            }
        }
    }

    /// One catch-up attempt with the state lock held. Records the outcome.
    /// `wake_publisher`: false when the caller sends what was captured itself.
    fn catch_up_locked(&self, g: &mut Inner, wake_publisher: bool) -> Result<CatchUp, CaptureError> {
        if g.fatal.is_some() || g.role != Role::Primary {
            return Ok(CatchUp::default());
        }
        let Inner { log, capture_db, capture_wal, .. } = g;
        let Some(log) = log.as_mut() else { return Ok(CatchUp::default()) };
        let r = (|| {
            let _locked = log.lock().map_err(CaptureError::Io)?;
            // The handle is kept between passes (opening a file costs system
            // calls on every pass); its wal-index mapping is not (see below).
            if capture_db.is_none() {
                *capture_db = Some(PrivateDb::open(&self.db_path).map_err(CaptureError::Io)?);
            }
            let db = capture_db.as_ref().unwrap();
            // Read what is committed before reading the WAL: a commit that
            // lands in between is taken at the next wake-up.
            // (No WAL, nothing to bound: then do not create a wal-index either.)
            let read_mark = || db.wal_index_mark().map_or(Committed::Unknown, Committed::WalIndex);
            let wal_exists = capture_wal.file(&self.wal_path).map_err(CaptureError::Io)?.is_some();
            let committed = if wal_exists { read_mark() } else { Committed::Unknown };
            let paths = Paths { db: std::path::Path::new(&self.db_path), wal: &self.wal_path, committed, kept_wal: Some(capture_wal) };
            let mut lock = || db.try_lock_writer();
            let mut committed = read_mark;
            let mut unlock = || db.unlock_writer();
            let imaging = Imaging::TakeWriteLock { db, lock: &mut lock, committed: &mut committed, unlock: &mut unlock };
            let r = capture::catch_up(log, &paths, imaging, self.claim_file());
            log.start_writeback();
            // Holding a wal-index mapping between passes would keep this
            // process's -shm open after the application closed the database.
            db.unlock_writer();
            db.release_shm();
            r
        })();
        self.record(g, r, false, wake_publisher)
    }

    /// Makes the log durable, when the capture thread was asked to (see
    /// `sync_requested`). Records the outcome like a catch-up that syncs.
    fn sync_log(&self) {
        let mut g = self.lock();
        if g.fatal.is_some() || g.role != Role::Primary {
            return;
        }
        let Some(log) = g.log.as_mut() else { return };
        let r = log.lock().map_err(CaptureError::Io).and_then(|_locked| match log.is_durable() {
            true => Ok(CatchUp::default()),
            false => log.sync().map(|_| CatchUp::default()).map_err(CaptureError::Log),
        });
        let _ = self.record(&mut g, r, true, false);
    }

    /// `syncs`: the operation syncs the log (before and after a WAL change), so
    /// its success ends a run of failures that included a failed sync; an
    /// append that succeeds does not. `wake_publisher`: wake the publisher
    /// thread to send what was appended (false: the caller sends it).
    fn record(&self, g: &mut Inner, r: Result<CatchUp, CaptureError>, syncs: bool, wake_publisher: bool) -> Result<CatchUp, CaptureError> {
        match &r {
            Ok(c) => {
                g.last_error = None;
                if syncs || g.failure_streak.as_ref().is_some_and(|s| !s.sync_failed) {
                    Streak::recovered(&mut g.failure_streak, &self.failure_path);
                }
                if let Some(p) = g.publisher.as_ref().filter(|_| wake_publisher) {
                    p.wake();
                }
                if let Some(reason) = &c.new_generation {
                    let generation = g.log.as_ref().map(|l| l.state.generation).unwrap_or(0);
                    if generation > 1 {
                        report(&format!("{}: new generation {generation}: {reason}", self.db_path));
                    }
                }
            }
            Err(CaptureError::Busy) => {}
            Err(CaptureError::Log(e @ (LogError::Corrupt { .. } | LogError::NotALog { .. }))) => {
                let msg = e.to_string();
                self.set_fatal(g, msg);
            }
            Err(e) => {
                let msg = format!("capture failed, will retry: {e}");
                report(&format!("{}: {msg}", self.db_path));
                // Only a failed fsync needs a sync to end it: a write that failed
                // before it (or in an operation that syncs nothing) is ended by
                // the next capture that succeeds.
                let sync_failed = syncs && g.log.as_ref().is_none_or(|l| l.sync_data_failed());
                Streak::failed(&mut g.failure_streak, &self.failure_path, &msg, false, sync_failed);
                g.last_error = Some(msg);
            }
        }
        r
    }

    /// Brings the log up to date now (SQL functions call this, so what they
    /// report includes every transaction committed before the call). Waits,
    /// bounded, for writers when a base image is needed.
    pub fn catch_up_now(&self) -> Result<(), String> {
        self.catch_up_within(IMAGE_WAIT)
    }

    fn catch_up_within(&self, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            let mut g = self.lock();
            match self.catch_up_once(&mut g) {
                Err(None) if Instant::now() < deadline => {
                    drop(g);
                    std::thread::sleep(Duration::from_millis(2));
                }
                r => return r.map_err(|e| e.unwrap_or_else(|| IMAGE_WAITING.into())),
            }
        }
    }

    /// One catch-up attempt with the state lock held: Err(None) while a base
    /// image waits for writers.
    fn catch_up_once(&self, g: &mut Inner) -> Result<(), Option<String>> {
        if let Some(f) = &g.fatal {
            return Err(Some(format!("replication stopped: {f}")));
        }
        if g.role != Role::Primary {
            return Err(Some(format!("{} is not a walcast primary (walcast_role is '{}')", self.db_path, g.role.as_str())));
        }
        match self.catch_up_locked(g, true) {
            Ok(_) => Ok(()),
            Err(CaptureError::Busy) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        }
    }

    pub fn last_frame_no(&self) -> Result<u64, String> {
        if let Some(r) = self.replica_shared() {
            return Ok(r.applied_frame_no());
        }
        self.catch_up_now()?;
        let g = self.lock();
        Ok(g.log.as_ref().map(|l| l.state.last_frame_no).unwrap_or(0))
    }

    pub fn replica_shared(&self) -> Option<Arc<crate::replica::Shared>> {
        self.follow_role_of_other_processes();
        self.lock().replica.as_ref().map(|r| r.shared.clone())
    }

    pub fn status_json(&self) -> String {
        if let Some(r) = self.replica_shared() {
            let mut v = r.status_json();
            v["database"] = self.db_path.clone().into();
            if v.get("endpoint").is_none_or(|e| e.is_null()) {
                v["endpoint"] = self.endpoint().into();
            }
            v["rebootstrap_requested"] = Conf::load(&self.conf_path).is_ok_and(|c| c.rebootstrap).into();
            add_key_status(&mut v, &self.db_path);
            return v.to_string();
        }
        // Up to date, unless a base image is waiting for writers: the status then
        // shows where the log stands, without waiting.
        // One lock for the attempt and the report: a capture pass in between
        // could clear the error this attempt recorded, and the status would
        // show an error with state `capturing`.
        let mut g = self.lock();
        let pending =
            if self.is_capturing() { self.catch_up_once(&mut g).err().map(|e| e.unwrap_or_else(|| IMAGE_WAITING.into())) } else { None };
        let conf = Conf::load(&self.conf_path).ok();
        let now = crate::log::now_ms();
        // Another process's capture failure that goes on: its commits are not
        // being logged, whatever this process manages.
        let failure = if g.role == Role::Primary { capture_failure::read(&self.failure_path) } else { None };
        let elsewhere = failure.as_ref().filter(|f| f.pid != std::process::id() && f.ongoing(now)).map(|f| {
            format!(
                "capture is failing in process {} ({} failures since {} ms ago): {}",
                f.pid,
                f.failures,
                now.saturating_sub(f.first_ms),
                f.message
            )
        });
        let mut v = serde_json::json!({
            "role": g.role.as_str(),
            "database": self.db_path,
            "log": self.log_path.to_string_lossy(),
            "state": if g.fatal.is_some() {
                "error"
            } else if g.role == Role::Primary && (g.last_error.is_some() || elsewhere.is_some()) {
                // Capture failed and retries (a full disk, an I/O error): new
                // transactions are not in the log yet.
                "stalled"
            } else if g.role == Role::Primary {
                "capturing"
            } else {
                "off"
            },
            "last_error": g.fatal.clone().or_else(|| g.last_error.clone()).or(pending).or(elsewhere),
            "last_capture_failure": failure.map(|f| f.to_json(now)),
        });
        if let Some(id) = conf.as_ref().and_then(|c| c.db_id) {
            v["db_id"] = hex(&id).into();
        }
        add_key_status(&mut v, &self.db_path);
        if let Some(p) = &g.publisher {
            v["endpoint"] = p.endpoint.url.clone().into();
            v["catchup_endpoint"] = p.endpoint.catchup.clone().into();
            let own_error = p.stats().last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if p.stats().listening.load(Ordering::Acquire) {
                v["publishing"] = true.into();
                v["publisher_pid"] = std::process::id().into();
                v["replicas"] = p.stats().replicas.load(Ordering::Acquire).into();
                v["published_frame_no"] = p.stats().published_frame_no.load(Ordering::Acquire).into();
                v["snapshots_served"] = p.stats().snapshots_served.load(Ordering::Acquire).into();
                v["publish_error"] = own_error.into();
            } else {
                // Another process publishes: its figures come from its status file.
                v["publishing"] = false.into();
                add_publisher_status(&mut v, &self.db_path, own_error);
            }
        } else {
            v["endpoint"] = conf.and_then(|c| c.endpoint).into();
        }
        if let Some(log) = &g.log {
            let s = &log.state;
            v["generation"] = s.generation.into();
            v["term"] = crate::log::term_of(s.generation).into();
            v["frame_no"] = s.last_frame_no.into();
            v["checksum"] = format!("{:016x}", s.last_checksum).into();
            v["db_pages"] = s.db_pages.into();
            v["page_size"] = s.page_size.into();
            v["log_bytes"] = log.file_len().unwrap_or(0).into();
            v["wal"] = match s.cursor {
                WalCursor::InWal(p) => {
                    serde_json::json!({"salt1": format!("{:08x}", p.salt1), "salt2": format!("{:08x}", p.salt2), "frame": p.frame})
                }
                WalCursor::Ended(_) | WalCursor::Ending { .. } => "none (checkpointed and removed)".into(),
                WalCursor::Switching { to, .. } | WalCursor::Starting { to, .. } => {
                    serde_json::json!({"salt1": format!("{:08x}", to.salt1), "salt2": format!("{:08x}", to.salt2), "frame": 0})
                }
                WalCursor::Unknown => serde_json::Value::Null,
            };
            v["generation_reason"] = log.generation_reason.clone().into();
        } else if let Ok(m) = std::fs::metadata(&self.log_path) {
            v["log_bytes"] = m.len().into();
        }
        v.to_string()
    }

    // -- pragmas -----------------------------------------------------------

    pub fn pragma(&self, name: &str, value: Option<&str>, readonly: bool) -> PragmaOutcome {
        let lname = name.to_ascii_lowercase();
        match (lname.as_str(), value) {
            ("walcast_role", Some(_)) if readonly => {
                PragmaOutcome::Fail(format!("cannot set walcast_role on a read-only connection to {}", self.db_path))
            }
            ("walcast_role", None) => {
                self.follow_role_of_other_processes();
                PragmaOutcome::Done(Some(self.lock().role.as_str().to_string()))
            }
            ("walcast_role", Some(v)) => match conf::parse_role(v).and_then(|r| self.set_role(r)) {
                Ok(r) => PragmaOutcome::Done(Some(r.as_str().to_string())),
                Err(e) => PragmaOutcome::Fail(e),
            },
            ("walcast_status", None) => PragmaOutcome::Done(Some(self.status_json())),
            ("walcast_endpoint", None) => {
                let g = self.lock();
                let shown = g.publisher.as_ref().map(|p| p.endpoint.url.clone());
                drop(g);
                PragmaOutcome::Done(shown.or_else(|| self.endpoint()))
            }
            ("walcast_endpoint", Some(_)) if readonly => {
                PragmaOutcome::Fail(format!("cannot set walcast_endpoint on a read-only connection to {}", self.db_path))
            }
            ("walcast_endpoint", Some(v)) => match self.set_endpoint(v) {
                Ok(url) => PragmaOutcome::Done(Some(url)),
                Err(e) => PragmaOutcome::Fail(e),
            },
            ("walcast_status", Some(_)) => PragmaOutcome::Fail("walcast_status is read-only".into()),
            ("walcast_relay", None) => {
                PragmaOutcome::Done(Some(Conf::load(&self.conf_path).ok().and_then(|c| c.relay).unwrap_or_else(|| "off".into())))
            }
            ("walcast_relay", Some(_)) if readonly => {
                PragmaOutcome::Fail(format!("cannot set walcast_relay on a read-only connection to {}", self.db_path))
            }
            ("walcast_relay", Some(v)) => match self.set_relay(v) {
                Ok(url) => PragmaOutcome::Done(Some(url.unwrap_or_else(|| "off".into()))),
                Err(e) => PragmaOutcome::Fail(e),
            },
            ("walcast_key", None) => PragmaOutcome::Done(Some(key_state(&self.db_path))),
            ("walcast_key", Some(_)) if readonly => {
                PragmaOutcome::Fail(format!("cannot set walcast_key on a read-only connection to {}", self.db_path))
            }
            ("walcast_key", Some(v)) => match self.set_key(v) {
                Ok(()) => PragmaOutcome::Done(Some(key_state(&self.db_path))),
                Err(e) => PragmaOutcome::Fail(e),
            },
            ("walcast_rebootstrap", _) if readonly => {
                PragmaOutcome::Fail(format!("cannot use walcast_rebootstrap on a read-only connection to {}", self.db_path))
            }
            ("walcast_rebootstrap", Some(v)) => {
                PragmaOutcome::Fail(format!("walcast_rebootstrap takes no value (got '{v}'): run PRAGMA walcast_rebootstrap;"))
            }
            ("walcast_rebootstrap", None) => match self.request_rebootstrap() {
                Ok(()) => PragmaOutcome::Done(Some("requested".into())),
                Err(e) => PragmaOutcome::Fail(e),
            },
            (n, _) if n.starts_with("walcast_") => PragmaOutcome::Fail(format!(
                "unknown pragma '{name}': walcast has walcast_role, walcast_endpoint, walcast_key, walcast_relay, walcast_status and walcast_rebootstrap"
            )),
            ("journal_mode", Some(v)) if !v.trim().eq_ignore_ascii_case("wal") && self.lock().role == Role::Primary => {
                PragmaOutcome::Fail(format!(
                    "{} is a replication primary and must stay in WAL mode (journal_mode={v} refused); set PRAGMA walcast_role='off' first",
                    self.db_path
                ))
            }
            ("locking_mode", Some(v)) if v.trim().eq_ignore_ascii_case("exclusive") && self.lock().role == Role::Primary => {
                PragmaOutcome::Fail(format!(
                    "{} is a replication primary: locking_mode=exclusive would hide its WAL from walcast; set PRAGMA walcast_role='off' first",
                    self.db_path
                ))
            }
            _ => PragmaOutcome::NotOurs,
        }
    }

    /// `PRAGMA walcast_key = '<64 hex digits>'` or `'off'`: the shared key that
    /// seals every message (see `seal.rs`), kept in `<db>-walcast-key` (mode
    /// 0600). The publisher and the applier of this process restart with it at
    /// once; other processes notice the changed file within a quarter second.
    fn set_key(&self, v: &str) -> Result<(), String> {
        let key = match v.trim() {
            "" | "off" | "OFF" | "none" => None,
            other => Some(crate::seal::parse_key(other)?),
        };
        crate::seal::store_key(&self.db_path, key.as_ref())
            .map_err(|e| format!("cannot write {}: {e}", crate::seal::key_path(&self.db_path).display()))?;
        let mut g = self.lock();
        if let Some(p) = g.publisher.take() {
            let ep = p.endpoint.clone();
            drop(p);
            g.publisher = Some(self.new_publisher(ep));
        }
        if let Some(r) = &g.replica {
            let ep = r.shared.endpoint.lock().unwrap_or_else(|e| e.into_inner()).clone();
            r.shared.set_endpoint(ep);
        }
        Ok(())
    }

    /// `PRAGMA walcast_relay = 'tcp://HOST:PORT'` (or `'off'`): a replica passes
    /// the stream it receives on to replicas of its own there, and their
    /// catch-up requests to its primary (see `transport::RelaySockets`).
    /// Persisted; the applier, in whichever process, restarts its session
    /// with it. Taken while the database is a replica.
    fn set_relay(&self, v: &str) -> Result<Option<String>, String> {
        let relay = match v.trim() {
            "" | "off" | "OFF" | "none" => None,
            other => {
                let ep = crate::transport::parse_endpoint(other).map_err(|e| e.replace("walcast_endpoint", "walcast_relay"))?;
                Some(ep.url)
            }
        };
        let g = self.lock();
        Conf::update(&self.conf_path, |c| {
            if relay.is_some() && relay == c.endpoint {
                return Err(format!(
                    "walcast_relay '{}' is this database's walcast_endpoint: a replica relays at an address of its own",
                    relay.clone().unwrap_or_default()
                ));
            }
            c.relay = relay.clone();
            Ok(())
        })?;
        if let Some(r) = &g.replica {
            let ep = r.shared.endpoint.lock().unwrap_or_else(|e| e.into_inner()).clone();
            r.shared.set_endpoint(ep);
        }
        Ok(relay)
    }

    /// `PRAGMA walcast_rebootstrap`: the replica's next catch-up replaces its
    /// content with a snapshot of whatever its primary serves, even another
    /// database or an older generation, which it otherwise refuses. Persisted,
    /// so that whichever process applies carries it out; cleared once done.
    fn request_rebootstrap(&self) -> Result<(), String> {
        self.follow_role_of_other_processes();
        Conf::update(&self.conf_path, |c| {
            if c.role != Role::Replica {
                return Err(format!(
                    "{} is not a walcast replica (walcast_role is '{}'): only a replica can rebootstrap",
                    self.db_path,
                    c.role.as_str()
                ));
            }
            c.rebootstrap = true;
            Ok(())
        })?;
        if let Some(r) = self.lock().replica.as_ref() {
            r.shared.poke();
        }
        Ok(())
    }

    // -- VFS hooks ---------------------------------------------------------

    fn refuse(&self) -> HookError {
        let why = self.lock().fatal.clone().unwrap_or_else(|| "replication is stopped".into());
        HookError {
            code: ffi::SQLITE_READONLY,
            message: format!(
                "{}: write refused because the replication log cannot record it: {why}. \
                 Fix or move the log aside, or PRAGMA walcast_role='off' to write without replication",
                self.db_path
            ),
        }
    }

    /// SQLite writes to the WAL: `write` performs the write. Offset 0 is a new
    /// WAL header: SQLite is restarting the WAL and will overwrite frames, so the
    /// log captures them and is made durable first. A commit frame's header is
    /// claimed before it is written.
    pub fn wal_write(&self, off: u64, data: &[u8], wal_index: impl FnOnce() -> Option<WalIndexHeader>, write: impl FnOnce() -> i32) -> i32 {
        if self.refusing_writes.load(Ordering::Acquire) {
            let e = self.refuse();
            report(&e.message);
            return e.code;
        }
        if !self.is_capturing() {
            return write();
        }
        if off == 0 && data.len() >= 32 {
            let header = &data[..32];
            if let Some(h) = crate::wal::WalHeader::parse(header) {
                self.wal_page_size.store(h.page_size, Ordering::Release);
            }
            return self.around_wal_change("restarting the WAL", capture::WalChange::Restart(header), write, |log, claims, _| {
                capture::after_wal_started(log, claims, header)
            });
        }
        // A frame header normally arrives as one 24-byte write. With sector
        // padding (psow=0), SQLite splits a write that crosses its sync point, so
        // a header can arrive in two pieces: keep the first piece and claim when
        // the second completes it (the frame is not valid before then).
        // Every frame's writes come here: no lock and no allocation unless a
        // header was split.
        let header = if data.len() >= 24 && !self.partial_pending.load(Ordering::Acquire) {
            <[u8; 24]>::try_from(data).ok().map(|h| (off, h))
        } else {
            self.join_split_header(off, data)
        };
        if let Some((at, h)) = header {
            if h[4..8] != [0, 0, 0, 0] {
                // The header of a commit frame (its database size is non-zero).
                // The wal-index as this writer found it when it took the write
                // lock is as good as reading it again: only this writer changes
                // it before the commit, and a restart (new salts) reads as a
                // new WAL either way.
                self.claim_commit_frame(at, &h, self.write_start_header().or_else(wal_index));
            }
        }
        write()
    }

    /// `wal_write`'s path for a write shorter than a frame header, or the one
    /// after it: the header, once its second piece completes it.
    fn join_split_header(&self, off: u64, data: &[u8]) -> Option<(u64, [u8; 24])> {
        let mut partial = self.partial_header.lock().unwrap_or_else(|e| e.into_inner());
        let header = match partial.take() {
            Some((at, mut first)) if at + first.len() as u64 == off && first.len() + data.len() >= 24 => {
                first.extend_from_slice(&data[..24 - first.len()]);
                <[u8; 24]>::try_from(first).ok().map(|h| (at, h))
            }
            _ if data.len() < 24 && !data.is_empty() => {
                *partial = Some((off, data.to_vec()));
                None
            }
            _ => <[u8; 24]>::try_from(data).ok().map(|h| (off, h)),
        };
        self.partial_pending.store(partial.is_some(), Ordering::Release);
        header
    }

    /// SQLite truncates the WAL (`truncate` does it).
    pub fn wal_truncate(&self, size: u64, truncate: impl FnOnce() -> i32) -> i32 {
        if !self.is_capturing() {
            return truncate();
        }
        if size == 0 {
            self.around_wal_change("truncating the WAL", capture::WalChange::End, truncate, |log, _, paths| {
                capture::after_wal_ended(log, paths)
            })
        } else {
            // journal_size_limit trims the file after a restart; what it cuts was
            // captured at the restart.
            truncate()
        }
    }

    /// SQLite deletes the WAL (`delete` does it).
    pub fn wal_delete(&self, delete: impl FnOnce() -> i32) -> i32 {
        if !self.is_capturing() {
            return delete();
        }
        self.around_wal_change("deleting the WAL", capture::WalChange::End, delete, |log, _, paths| capture::after_wal_ended(log, paths))
    }

    /// Before SQLite writes the database file. In WAL mode only checkpoints do; a
    /// page 1 that says "rollback journal" means a write that would bypass the WAL.
    pub fn before_db_write(&self, off: u64, data: &[u8]) -> Result<(), HookError> {
        if off == 0 && data.len() >= 100 && data[18] == 1 && (self.is_capturing() || self.refusing_writes.load(Ordering::Acquire)) {
            return Err(HookError {
                code: ffi::SQLITE_READONLY,
                message: format!(
                    "{}: a rollback-journal write to a replication primary was refused; the database must stay in WAL mode",
                    self.db_path
                ),
            });
        }
        Ok(())
    }

    /// Runs an operation that destroys WAL content, with the log locked
    /// throughout: capture and sync first, then the operation, then (if it
    /// succeeded) record what became of the WAL. Runs on SQLite's thread, which
    /// excludes other writers.
    fn around_wal_change<A>(&self, what: &str, change: capture::WalChange, op: impl FnOnce() -> i32, after: A) -> i32
    where
        A: FnOnce(&mut LogWriter, capture::Claims, &Paths) -> Result<(), CaptureError>,
    {
        let mut g = self.lock();
        if g.fatal.is_some() || g.role != Role::Primary || g.log.is_none() {
            drop(g);
            return op();
        }
        // What was committed when this thread took the WAL write lock: SQLite has
        // since reset the wal-index for the new WAL, but the old WAL's frames up
        // to that point are what was committed.
        let committed = match self.write_start_mark() {
            Some(m) if what != "deleting the WAL" => Committed::WalIndex(m),
            _ => Committed::Unknown,
        };
        let paths = Paths { db: std::path::Path::new(&self.db_path), wal: &self.wal_path, committed, kept_wal: None };
        let claims = self.claim_file();
        let log = g.log.as_mut().unwrap();
        let locked = match log.lock() {
            Ok(l) => l,
            Err(e) => {
                report(&format!("{}: cannot lock the replication log before {what}: {e}", self.db_path));
                return ffi::SQLITE_IOERR_LOCK;
            }
        };
        let restart = matches!(change, capture::WalChange::Restart(_));
        let pre = PrivateDb::open(&self.db_path)
            .map_err(CaptureError::Io)
            .and_then(|db| capture::before_wal_change(log, &paths, &db, claims, change));
        if let Err(e) = self.record(&mut g, pre, true, true) {
            drop(locked);
            report(&format!("{}: capture failed before {what}, so it was refused: {e}", self.db_path));
            // A full disk is SQLITE_FULL to the client, as SQLite's own writes say.
            return if is_disk_full(&e) { ffi::SQLITE_FULL } else { ffi::SQLITE_IOERR_WRITE };
        }
        let rc = op();
        if rc == ffi::SQLITE_OK {
            if let Some(log) = g.log.as_mut() {
                let post = after(log, claims, &paths);
                // A restart's records, left unsynced (see `before_wal_change`),
                // are synced by the capture thread's next pass: it comes when
                // this transaction releases the write lock.
                if restart && !log.is_durable() {
                    self.sync_requested.store(true, Ordering::Release);
                }
                let _ = self.record(&mut g, post.map(|_| CatchUp::default()), true, true);
            }
        }
        drop(locked);
        rc
    }

    /// Another process may have set or cleared the role since this one opened the
    /// database: follow the conf file, read at most four times a second, so
    /// that this process's writes are captured (and claimed) once it says so.
    fn follow_role_of_other_processes(&self) {
        let now = crate::vfs::coarse_now_ms();
        let last = self.conf_checked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 250 || self.conf_checked_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return;
        }
        let Ok(c) = Conf::load(&self.conf_path) else { return };
        let mut g = self.lock();
        if g.fatal.is_some() || c.role == g.role {
            return;
        }
        match c.role {
            Role::Primary => {
                // A replica promoted by another process: stop applying here.
                g.replica = None;
                self.replica_role.store(false, Ordering::Release);
                if let Err(e) = self.activate(&mut g, None) {
                    self.set_fatal(&mut g, e);
                }
            }
            Role::Off => {
                self.stop_capturing();
                self.replica_role.store(false, Ordering::Release);
                g.role = Role::Off;
                g.log = None;
                g.publisher = None;
                g.replica = None;
            }
            Role::Replica => {
                if let Some(me) = lookup(&self.db_path) {
                    me.start_replica(&mut g, c.endpoint);
                }
            }
        }
    }

    /// The WAL write lock was just taken: remember what the wal-index said was
    /// committed then (see `around_wal_change`).
    pub fn write_lock_acquired(&self, wal_index: impl FnOnce() -> Option<WalIndexHeader>) {
        self.follow_role_of_other_processes();
        if self.is_capturing() {
            *self.write_start.lock().unwrap_or_else(|e| e.into_inner()) = wal_index();
        }
    }

    /// The wal-index header this process found when it last took the WAL
    /// write lock (None once released).
    fn write_start_header(&self) -> Option<WalIndexHeader> {
        *self.write_start.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_start_mark(&self) -> Option<WalMark> {
        let h = self.write_start_header()?;
        Some(WalMark { salt1: h.salt1, salt2: h.salt2, frame: h.max_frame })
    }

    /// Records where this process mapped the first wal-index region.
    pub fn wal_index_mapped(&self, addr: usize) {
        self.wal_index.store(addr, Ordering::Release);
    }

    /// The claim file, once this process has opened it.
    fn claim_file(&self) -> Option<&ClaimFile> {
        self.claims.get().map(|c| &**c)
    }

    pub fn wal_index_addr(&self) -> usize {
        self.wal_index.load(Ordering::Acquire)
    }

    /// Before SQLite writes the header of a commit frame at WAL offset `off`
    /// (the writer holds the WAL write lock): claim it, after checking that the
    /// WAL's last commit before this transaction was claimed too.
    fn claim_commit_frame(&self, off: u64, frame_header: &[u8], wal_index: Option<WalIndexHeader>) {
        let Some(claims) = self.claims.get() else { return };
        let be = |at: usize| u32::from_be_bytes(frame_header[at..at + 4].try_into().unwrap());
        let salts = (be(8), be(12));
        if salts == (0, 0) && be(16) == 0 && be(20) == 0 {
            // While a transaction rewrites spilled frames, SQLite first writes
            // frame headers without salts or checksums, then rewrites them all
            // before commit (walRewriteChecksums): the claim is made then.
            return;
        }
        let page_size = match self.wal_page_size.load(Ordering::Acquire) {
            0 => match wal_index.map(|h| h.page_size).filter(|p| *p != 0) {
                Some(p) => p,
                None => match crate::wal::WalFile::open(&self.wal_path) {
                    Ok(Some(w)) => w.header.page_size,
                    _ => return,
                },
            },
            p => p,
        };
        let per = 24 + page_size as u64;
        if off < 32 || !(off - 32).is_multiple_of(per) {
            return;
        }
        let frame = ((off - 32) / per + 1) as u32;
        // The wal-index still describes the WAL as it was before this
        // transaction, unless this transaction starts a new WAL.
        let wal_last = match wal_index {
            Some(h) if (h.salt1, h.salt2) == salts => h.max_frame,
            _ => 0,
        };
        let state = claims.read();
        let (claim, foreign) = claim::on_commit_frame(&state, salts, wal_last, frame);
        if let Some(f) = foreign {
            claims.write_foreign(f, state.foreign_count.wrapping_add(1));
            report(&format!(
                "{}: transactions written without walcast found in the WAL (up to frame {}); the log starts a new generation",
                self.db_path, f.frame
            ));
        }
        claims.write_claim(claim);
    }

    /// A connection of this process took the checkpoint lock. A checkpoint that
    /// copies the whole WAL lets the next writer restart it, and the log must
    /// be durable before that: the capture thread syncs it now, while the
    /// checkpoint does its own I/O, so that the restart on SQLite's thread
    /// finds nothing left to sync.
    pub fn checkpoint_started(&self) {
        if self.is_capturing() {
            self.sync_requested.store(true, Ordering::Release);
            self.wake.raise();
        }
    }

    /// After the WAL write lock is released: wake the capture thread. Never blocks.
    pub fn after_write_lock_released(&self) {
        // The mark belongs to the write lock just released.
        if let Ok(mut m) = self.write_start.try_lock() {
            *m = None;
        }
        if self.is_capturing() {
            self.wake.raise();
        }
    }
}

fn is_disk_full(e: &CaptureError) -> bool {
    let io = match e {
        CaptureError::Io(e) | CaptureError::Log(LogError::Io(e)) => e,
        _ => return false,
    };
    matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

fn foreign_log_message(path: &std::path::Path, log_id: &[u8; 16], db_id: &[u8; 16]) -> String {
    format!(
        "{} belongs to another database (its db_id is {}, this database's is {}); move it aside",
        path.display(),
        hex(log_id),
        hex(db_id)
    )
}

/// Opens a log for writing with its lock held, cutting off a torn append.
fn open_log_locked(path: &std::path::Path) -> Result<(LogWriter, crate::log::OpenReport), String> {
    // The lock must be held while a torn tail is cut, so that no other process is
    // appending to it: open without repair, lock, then reopen with repair.
    let (mut probe, _) = LogWriter::open(path, false).map_err(|e| e.to_string())?;
    let _locked = probe.lock().map_err(|e| e.to_string())?;
    LogWriter::open(path, true).map_err(|e| e.to_string())
}

/// Switches a database to WAL mode if it is not already, with a connection of
/// walcast's own; fails with SQLite's reason when it cannot.
fn ensure_wal_mode(db_path: &str) -> Result<(), String> {
    // Bytes 18 and 19 of the header are 2 in WAL mode.
    if let Ok(db) = PrivateDb::open(db_path) {
        let mut h = [0u8; 20];
        if db.size().unwrap_or(0) >= 20 && db.read_at(&mut h, 0).is_ok() && h[18] == 2 && h[19] == 2 {
            return Ok(());
        }
    }
    let conn = Connection::open(db_path).map_err(|e| format!("cannot open {db_path} to switch it to WAL mode: {e}"))?;
    let mode =
        conn.query_text("PRAGMA journal_mode=WAL").map_err(|e| format!("cannot switch {db_path} to WAL mode: {e}"))?.unwrap_or_default();
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "cannot switch {db_path} to WAL mode: SQLite kept journal_mode '{mode}' (a read-only or in-memory database cannot use WAL)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_waits_longer_only_as_the_commit_rate_grows() {
        let us = Duration::from_micros;
        let window_after = |passes: &[(u64, Duration)]| {
            let mut rate = CommitRate::default();
            for &(found, over) in passes {
                rate.update(found, over);
            }
            coalesce_window(&rate)
        };
        // An isolated commit after a quiet second: copied at once.
        assert_eq!(window_after(&[(1, Duration::from_secs(1))]), CAPTURE_COALESCE);
        // 1,000 commits a second, with jitter (two commits 100 µs apart now and
        // then): each is still copied at once.
        let mut paced = vec![(1, us(1000)); 200];
        for i in (0..200).step_by(10) {
            paced[i] = (1, us(100));
            paced[i + 1] = (1, us(900));
        }
        assert_eq!(window_after(&paced), CAPTURE_COALESCE);
        // Twice RATE_LOW for a while: eight times the least window.
        let twice = vec![(1, Duration::from_secs_f64(0.5 / RATE_LOW)); 2000];
        let w = window_after(&twice);
        assert!(w > CAPTURE_COALESCE * 7 && w <= CAPTURE_COALESCE * 8, "{w:?}");
        // A stream of 10,000 a second: the longest, within 20 ms of it starting.
        let stream = vec![(20, us(2000)); 10];
        assert_eq!(window_after(&[(1, Duration::from_secs(1))].iter().chain(&stream).copied().collect::<Vec<_>>()), CAPTURE_COALESCE_MAX);
        // And back to quiet: at once again.
        let mut then_quiet = stream.clone();
        then_quiet.push((1, Duration::from_millis(500)));
        assert_eq!(window_after(&then_quiet), CAPTURE_COALESCE);
    }
}
