//! The primary's side of the wire: a publisher thread that follows the
//! replication log and sends every committed unit on the PUB socket, and a
//! catch-up server that answers replicas' requests for missed frames and for
//! snapshots from the same log.
//!
//! Neither runs on SQLite's threads. In the publishing process the capture
//! thread sends what it has just appended itself (`Sender`); the
//! publisher thread looks at the log every few milliseconds, for units other
//! processes appended, and sends heartbeats. Only one process per database
//! publishes, elected by an exclusive flock on `<db>-walcast-pub`; when it
//! exits, another takes over.

use crate::claim::ClaimFile;
use crate::logtail::{LogTail, Pos, Unit};
use crate::signal::Signal;
use crate::transport::{Endpoint, PrimarySockets};
use crate::wire::{self, Body, FramesBuilder, PagesBuilder};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// How long the stream must pause before the heartbeat that follows it.
const BEAT_AFTER_ACTIVITY: Duration = Duration::from_millis(20);
/// The least time between two live messages while commits stream in.
const COALESCE: Duration = Duration::from_micros(200);
/// How often the publisher looks at the log without being woken. Processes
/// that append ring the doorbell, so this only bounds the delay for those that
/// cannot (older walcast versions, a claim file that could not be mapped).
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// Without a doorbell of its own, looking is the only way to find them.
const LOOK_EVERY_WITHOUT_DOORBELL: Duration = Duration::from_millis(10);
/// How often the publisher checks that the conf still makes it a primary.
const CONF_CHECK_EVERY: Duration = Duration::from_millis(250);
/// One index entry per this many log bytes (plus one per generation).
const INDEX_STRIDE: u64 = 256 << 10;
/// Log bytes indexed per step.
const INDEX_STEP: u64 = 64 << 20;
/// How long a request may spend indexing what is new before it is answered.
const INDEX_BUDGET: Duration = Duration::from_millis(200);
/// How often the idle catch-up server indexes a step of the older part of
/// the log, while a restarted primary has one,
const IDLE_STEP_EVERY: Duration = Duration::from_millis(200);
/// and what was appended since it last looked, otherwise.
const IDLE_REFRESH_EVERY: Duration = Duration::from_secs(1);
const MAX_SNAPSHOTS: usize = 4;
const SNAPSHOT_IDLE: Duration = Duration::from_secs(60);

/// What the status shows about publishing.
#[derive(Default)]
pub struct PublishStats {
    pub published_frame_no: AtomicU64,
    pub replicas: Arc<AtomicI64>,
    /// This process holds the publisher lock and listens.
    pub listening: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub snapshots_served: AtomicU64,
}

pub struct Publisher {
    stop: Arc<AtomicBool>,
    pub endpoint: Endpoint,
    /// The capture thread's way to send (see `Sender`); also holds the
    /// publisher thread's wake-up and figures.
    pub sender: Sender,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// What the status shows about publishing.
    pub fn stats(&self) -> &PublishStats {
        &self.sender.stats
    }

    /// Wakes the publisher thread to look at the log.
    pub fn wake(&self) {
        self.sender.wake_publisher();
    }
}

/// What a publishing process sends from: its sockets and how far it has read
/// the log.
struct Live {
    sockets: PrimarySockets,
    tail: LogTail,
    log_path: PathBuf,
    /// A heartbeat is owed soon after activity (see the publisher's loop).
    beat_owed: bool,
    last_send: Instant,
}

impl Live {
    /// Sends every unit appended to the log since the last look. Returns
    /// false when the log cannot be read (the error is recorded).
    fn send_new_units(&mut self, name: &str, stats: &PublishStats) -> bool {
        let mut batch = Batch::default();
        self.tail.forget_window();
        let mut readable = true;
        loop {
            match self.tail.next_unit() {
                Ok(Some(u)) => {
                    if let Err(e) = batch.add(&self.sockets, &self.tail, &u) {
                        set_error(stats, name, Some(format!("publishing failed: {e}")));
                    }
                    stats.published_frame_no.store(u.commit.last_frame_no, Ordering::Release);
                    self.beat_owed = true;
                }
                Ok(None) => break,
                Err(e) => {
                    set_error(stats, name, Some(format!("cannot follow {}: {e}", self.log_path.display())));
                    readable = false;
                    break;
                }
            }
        }
        match batch.send(&self.sockets, &self.tail) {
            Ok(true) => self.last_send = Instant::now(),
            Ok(false) => {}
            Err(e) => set_error(stats, name, Some(format!("publishing failed: {e}"))),
        }
        readable
    }

    /// When the publisher thread next looks whether a heartbeat is due, the
    /// last one sent at `last_beat`. While one is owed after a burst, every
    /// BEAT_AFTER_ACTIVITY until the stream has paused that long: the beat
    /// goes out 20-40 ms after the burst's last send, and a stream of 100
    /// commits/s wakes the thread every 20 ms rather than after each commit
    /// (each wake-up costs tens of µs of CPU on a VM). The capture thread may
    /// send, and owe a beat, while the publisher thread sleeps until the next
    /// periodic beat: it wakes that thread when a burst begins.
    fn next_beat_look(&self, last_beat: Instant, now: Instant) -> Instant {
        if self.beat_owed {
            now + BEAT_AFTER_ACTIVITY
        } else {
            last_beat + HEARTBEAT_EVERY
        }
    }
}

/// What the publisher thread and the capture thread share. The capture thread
/// sends what it has just appended to the log itself, when this process
/// publishes: that saves waking the publisher thread for every pass (on small
/// machines a thread's wake-up costs more CPU than the send). Never used on
/// SQLite's threads: sending is network I/O.
#[derive(Clone)]
pub struct Sender {
    /// The sockets and the log position while this process publishes.
    live: Arc<Mutex<Option<Live>>>,
    stats: Arc<PublishStats>,
    wake: Arc<Signal>,
    /// The doorbell in the claim file's shared page (see claim.rs), which
    /// wakes the publisher thread of whichever process publishes. Without it
    /// the publisher finds other processes' appends at its next look
    /// (LOOK_EVERY).
    doorbell: Option<Arc<ClaimFile>>,
    name: Arc<str>,
}

impl Sender {
    /// Sends the units appended since the last send. If the publisher thread
    /// is busy sending, or another process publishes, wakes the publisher
    /// thread instead.
    pub fn send_new_units(&self) {
        if let Ok(mut g) = self.live.try_lock() {
            if let Some(live) = g.as_mut() {
                let beat_was_owed = live.beat_owed;
                if live.send_new_units(&self.name, &self.stats) {
                    let burst_began = live.beat_owed && !beat_was_owed;
                    drop(g);
                    // The publisher thread times the heartbeat that follows
                    // a burst, and may be asleep until the next periodic one:
                    // woken once per burst, not per send.
                    if burst_began {
                        self.wake_publisher();
                    }
                    return;
                }
            }
        }
        self.wake_publisher();
    }

    /// Wakes this process's publisher thread and, through the doorbell, the
    /// publishing one, which may be another process's.
    fn wake_publisher(&self) {
        self.wake.raise();
        if let Some(d) = &self.doorbell {
            d.ring();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `doorbell`: the database's claim file, whose doorbell other processes ring
/// after they append (None: the publisher finds their appends at its next
/// look at the log).
pub fn start(db_path: &str, log_path: PathBuf, endpoint: Endpoint, doorbell: Option<Arc<ClaimFile>>) -> Publisher {
    let stop = Arc::new(AtomicBool::new(false));
    let lock_path = PathBuf::from(format!("{db_path}-walcast-pub"));
    let sender = Sender {
        live: Arc::new(Mutex::new(None)),
        stats: Arc::new(PublishStats::default()),
        wake: Arc::new(Signal::default()),
        doorbell,
        name: db_path.into(),
    };
    let (s2, ep2, name, sender2) = (stop.clone(), endpoint.clone(), db_path.to_string(), sender.clone());
    let thread = std::thread::Builder::new()
        .name("walcast-publish".into())
        .spawn(move || {
            crate::primary::yield_to_application();
            while !s2.load(Ordering::Acquire) {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| publisher_thread(&log_path, &lock_path, &ep2, &s2, &sender2)));
                if r.is_err() {
                    crate::primary::report(&format!("{name}: internal error in the publisher; restarting it"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .ok();
    Publisher { stop, endpoint, sender, thread }
}

/// Whether the database's conf still makes it a primary (an unreadable conf
/// changes nothing).
fn conf_says_primary(db_path: &str) -> bool {
    let path = PathBuf::from(format!("{db_path}-walcast-conf"));
    crate::conf::Conf::load(&path).map_or(true, |c| c.role == crate::conf::Role::Primary)
}

/// `<db>-walcast-pub-status`: the publishing process's figures, for the other
/// processes' status (only one process publishes; each has its own memory).
pub fn status_path(db_path: &str) -> PathBuf {
    PathBuf::from(format!("{db_path}-walcast-pub-status"))
}

/// The figures of the status file that change while publishing: a change is
/// written within `status::WRITE_EVERY`, an unchanged status only refreshed.
#[derive(PartialEq)]
struct StatusFigures {
    replicas: i64,
    published_frame_no: u64,
    snapshots_served: u64,
    error: Option<String>,
}

impl StatusFigures {
    fn of(stats: &PublishStats) -> Self {
        StatusFigures {
            replicas: stats.replicas.load(Ordering::Acquire),
            published_frame_no: stats.published_frame_no.load(Ordering::Acquire),
            snapshots_served: stats.snapshots_served.load(Ordering::Acquire),
            error: stats.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

fn write_status(name: &str, ep: &Endpoint, stats: &PublishStats) {
    let v = serde_json::json!({
        "publisher_pid": std::process::id(),
        "endpoint": ep.url,
        "catchup_endpoint": ep.catchup,
        "publishing": stats.listening.load(Ordering::Acquire),
        "replicas": stats.replicas.load(Ordering::Acquire),
        "published_frame_no": stats.published_frame_no.load(Ordering::Acquire),
        "snapshots_served": stats.snapshots_served.load(Ordering::Acquire),
        "publish_error": stats.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "updated_unix_ms": crate::log::now_ms(),
    });
    crate::status::write(&status_path(name), &v);
}

fn set_error(stats: &PublishStats, name: &str, e: Option<String>) {
    let mut g = stats.last_error.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = &e {
        if g.as_ref() != Some(m) {
            crate::primary::report(&format!("{name}: {m}"));
        }
    }
    *g = e;
}

fn publisher_thread(log_path: &std::path::Path, lock_path: &std::path::Path, ep: &Endpoint, stop: &AtomicBool, shared: &Sender) {
    let (name, wake, stats, live_slot) = (&*shared.name, &*shared.wake, &shared.stats, &*shared.live);
    // Elect this process, or wait for the one that publishes to go away.
    let lock = match File::options().create(true).truncate(false).write(true).open(lock_path) {
        Ok(f) => f,
        Err(e) => {
            set_error(stats, name, Some(format!("cannot open {}: {e}", lock_path.display())));
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        if !conf_says_primary(name) {
            wake.wait(Some(Duration::from_millis(250)));
            continue;
        }
        match lock.try_lock() {
            Ok(()) => break,
            Err(_) => {
                wake.wait(Some(Duration::from_millis(250)));
            }
        }
    }
    // The key is read when publishing starts; a changed key file restarts it.
    let key_stamp = crate::seal::key_stamp(name);
    let sealer = match crate::seal::Sealer::load(name) {
        Ok(s) => s,
        Err(e) => {
            set_error(stats, name, Some(format!("not publishing: {e}")));
            drop(lock);
            wake.wait(Some(Duration::from_secs(1)));
            return;
        }
    };
    let sockets = match PrimarySockets::listen(ep, sealer.clone()) {
        Ok(s) => s,
        Err(e) => {
            set_error(stats, name, Some(e));
            write_status(name, ep, stats);
            drop(lock);
            wake.wait(Some(Duration::from_secs(1)));
            return;
        }
    };
    let mut tail = match LogTail::open(log_path, false) {
        Ok(t) => t,
        Err(e) => {
            set_error(stats, name, Some(format!("cannot read {}: {e}", log_path.display())));
            wake.wait(Some(Duration::from_secs(1)));
            return;
        }
    };
    // Only what is committed from now on goes out live; replicas fetch older
    // frames through catch-up.
    loop {
        match tail.next_unit() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                set_error(stats, name, Some(format!("cannot follow {}: {e}", log_path.display())));
                wake.wait(Some(Duration::from_secs(1)));
                return;
            }
        }
    }
    set_error(stats, name, None);
    stats.replicas.store(0, Ordering::Release);
    let replicas = sockets.replicas.clone();
    stats.listening.store(true, Ordering::Release);
    stats.published_frame_no.store(tail.pos.last_frame_no, Ordering::Release);
    write_status(name, ep, stats);
    let mut last_status_write = Instant::now();

    let server_stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (sock, path, st, ss, n, sealer) =
            (sockets.catchup.clone(), log_path.to_path_buf(), stats.clone(), server_stop.clone(), name.to_string(), sealer);
        std::thread::Builder::new().name("walcast-catchup".into()).spawn(move || {
            while !ss.load(Ordering::Acquire) {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_catchup(&n, &sock, &sealer, &path, &ss, &st)));
                if r.is_err() {
                    crate::primary::report(&format!("{n}: internal error in the catch-up server; restarting it"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
    };

    // From here the capture thread may send too. The guard closes the sockets
    // however this function ends (a panic included), so that a restarted
    // publisher can listen again.
    let live = LiveSlot::fill(
        live_slot,
        Live { sockets, tail, log_path: log_path.to_path_buf(), beat_owed: false, last_send: Instant::now() - COALESCE },
    );
    let mut last_beat = Instant::now() - HEARTBEAT_EVERY;
    let mut last_conf_check = Instant::now();
    let look_every = if shared.doorbell.is_some() { LOOK_EVERY } else { LOOK_EVERY_WITHOUT_DOORBELL };
    let mut status_written = StatusFigures::of(stats);
    // The thread sleeps until the first of: a ring (another process
    // appended), the heartbeat due, the next look, conf check or status
    // write. An idle primary's publisher wakes about 8 times a second, not 100.
    let mut wake_at = Instant::now();
    // Rings counted before each look at the log: one after it ends the next
    // wait at once.
    let mut rings_seen = shared.doorbell.as_ref().map_or(0, |d| d.rings());
    while !stop.load(Ordering::Acquire) {
        let timeout = wake_at.saturating_duration_since(Instant::now());
        if let Some(d) = &shared.doorbell {
            d.wait_for_ring(rings_seen, timeout);
            rings_seen = d.rings();
        } else {
            wake.wait(Some(timeout));
        }
        // A demotion or a role change by another process: stop publishing (a
        // demoted primary must not keep serving its history).
        if last_conf_check.elapsed() >= CONF_CHECK_EVERY {
            last_conf_check = Instant::now();
            if !conf_says_primary(name) || crate::seal::key_stamp(name) != key_stamp {
                break;
            }
        }
        // Under a stream of commits, gather what a short window brings into one
        // message rather than send one per commit: bounded added latency, far
        // fewer messages (and applies) per second. Idle-to-busy sends at once.
        // (Commits this process captures are sent by its capture thread, which
        // gathers them itself; this thread sends what other processes append.)
        let since = live.lock().as_ref().map_or(COALESCE, |l| l.last_send.elapsed());
        if since < COALESCE {
            std::thread::sleep(COALESCE - since);
        }
        let mut g = live.lock();
        let Some(l) = g.as_mut() else { break };
        if !l.send_new_units(name, stats) {
            drop(g);
            wake.wait(Some(Duration::from_secs(1)));
            wake_at = Instant::now();
            continue;
        }
        stats.replicas.store(replicas.load(Ordering::Acquire), Ordering::Release);
        // A heartbeat follows each burst, once nothing has been sent for
        // BEAT_AFTER_ACTIVITY, so that a replica whose last message was lost
        // notices; while commits stream, the next message shows a gap, and a
        // beat every 20 ms was a third of the messages at 100 commits/s. At
        // least one every HEARTBEAT_EVERY, busy or idle.
        if (l.beat_owed && l.last_send.elapsed() >= BEAT_AFTER_ACTIVITY) || last_beat.elapsed() >= HEARTBEAT_EVERY {
            let p = l.tail.pos;
            let hb = wire::heartbeat(l.tail.db_id, p.generation, p.last_frame_no, p.last_checksum, crate::log::now_ms());
            l.sockets.publish(&hb);
            last_beat = Instant::now();
            l.beat_owed = false;
        }
        let beat_look = l.next_beat_look(last_beat, Instant::now());
        drop(g);
        // The status's figures, read once a pass: a change is written within
        // `status::WRITE_EVERY`, an unchanged status refreshed every `status::REFRESH`.
        // Figures that change while this thread sleeps (replicas connecting)
        // are found at its next look.
        let figures = StatusFigures::of(stats);
        let mut status_due =
            last_status_write + if figures == status_written { crate::status::REFRESH } else { crate::status::WRITE_EVERY };
        if Instant::now() >= status_due {
            write_status(name, ep, stats);
            status_written = figures;
            last_status_write = Instant::now();
            status_due = last_status_write + crate::status::REFRESH;
        }
        wake_at = beat_look.min(Instant::now() + look_every).min(last_conf_check + CONF_CHECK_EVERY).min(status_due);
    }
    server_stop.store(true, Ordering::Release);
    // Ends the server's wait for a request at once.
    if let Some(l) = live.lock().as_ref() {
        l.sockets.catchup.close();
    }
    if let Ok(t) = server {
        let _ = t.join();
    }
    stats.listening.store(false, Ordering::Release);
    write_status(name, ep, stats);
    drop(live);
    drop(lock);
}

/// The publisher's `Live`, shared with the capture thread while this process
/// publishes; emptied (its sockets closed) when dropped.
struct LiveSlot<'a> {
    slot: &'a Mutex<Option<Live>>,
}

impl<'a> LiveSlot<'a> {
    fn fill(slot: &'a Mutex<Option<Live>>, live: Live) -> Self {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
        LiveSlot { slot }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Live>> {
        // A capture thread that panicked while sending leaves a usable Live.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LiveSlot<'_> {
    fn drop(&mut self) {
        let live = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(live);
    }
}

/// Units on their way out: the units found in one look at the log go out
/// together, taken from what that look read (or, past its 64 KiB, read again
/// with one read per ~1 MiB) and sent in messages of at most
/// `wire::CHUNK_BYTES` of pages, so that a burst of small transactions costs one
/// message (and one apply) per chunk, not one per transaction. A message holds
/// frames of one generation; a base image starts its own.
#[derive(Default)]
struct Batch {
    span: Option<Span>,
}

/// Consecutive units of one generation, as log offsets.
struct Span {
    from: u64,
    end: u64,
    generation: u64,
    page_size: u32,
    gen_start: bool,
    last_frame_no: u64,
}

impl Batch {
    fn add(&mut self, sockets: &PrimarySockets, tail: &LogTail, u: &Unit) -> io::Result<()> {
        if let Some(s) = &mut self.span {
            if !u.gen_start && s.generation == u.generation && s.page_size == u.page_size {
                s.end = u.end;
                s.last_frame_no = u.commit.last_frame_no;
                return Ok(());
            }
            self.send(sockets, tail)?;
        }
        self.span = Some(Span {
            from: u.frames_offset,
            end: u.end,
            generation: u.generation,
            page_size: u.page_size,
            gen_start: u.gen_start,
            last_frame_no: u.commit.last_frame_no,
        });
        Ok(())
    }

    fn send(&mut self, sockets: &PrimarySockets, tail: &LogTail) -> io::Result<bool> {
        let Some(s) = self.span.take() else { return Ok(false) };
        let flags = if s.gen_start { wire::FLAG_GENERATION_START } else { 0 };
        // The span's records hold its frames, and a little more.
        let expected = (s.end.saturating_sub(s.from) as usize).min(wire::LIVE_CHUNK_BYTES + 64);
        let live = |flags| {
            FramesBuilder::new(tail.db_id, s.generation, flags, s.last_frame_no, s.page_size, expected).with_limit(wire::LIVE_CHUNK_BYTES)
        };
        let mut fb = live(flags);
        tail.frames_just_found(s.from, s.end, s.page_size, |h, page| {
            if fb.full() {
                let full = std::mem::replace(&mut fb, live(0));
                // A full queue drops the message: the replica sees the gap and catches up.
                sockets.publish(&full.finish());
            }
            fb.push(h, page);
            Ok(true)
        })?;
        sockets.publish(&fb.finish());
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Catch-up server

/// A sparse index of the log's units, so that a frame is found without reading
/// the whole log: one entry per `INDEX_STRIDE` bytes and per generation.
///
/// A restarted primary may have gigabytes of log. The index starts at the
/// durable point its header records, so that the newest part (what replicas
/// that were following need) is answered at once, and indexes the older part
/// from the first record in steps afterwards.
struct Index {
    tail: LogTail,
    /// Entries from where `tail` started: (first frame_no of the unit at this
    /// position, position before that unit).
    entries: Vec<(u64, Pos)>,
    /// Position before the current generation's base image.
    gen_start: Option<Pos>,
    last_entry_offset: u64,
    /// The part of the log before where `tail` started, until it is indexed.
    older: Option<OlderPart>,
    /// The unit the last lookup found: a replica catching up inside a big
    /// transaction asks for it again and again.
    recent: Mutex<Option<Unit>>,
}

struct OlderPart {
    reader: LogTail,
    /// Where the newer part starts.
    until: Pos,
    entries: Vec<(u64, Pos)>,
    gen_start: Option<Pos>,
    last_entry_offset: u64,
}

/// Indexes the units `t` reads, up to `until` bytes or the end, reading at most
/// about `budget` bytes; true once it has reached either.
fn index_units(
    t: &mut LogTail,
    until: u64,
    budget: u64,
    entries: &mut Vec<(u64, Pos)>,
    gen_start: &mut Option<Pos>,
    last_entry_offset: &mut u64,
) -> io::Result<bool> {
    let start = t.pos.offset;
    loop {
        if t.pos.offset >= until {
            return Ok(true);
        }
        if t.pos.offset - start >= budget {
            return Ok(false);
        }
        let before = t.pos;
        let Some(u) = t.next_unit()? else { return Ok(true) };
        // `before` may sit on WAL event records: position the entry at them
        // (next_unit skips them again).
        if u.gen_start {
            *gen_start = Some(before);
        }
        if u.gen_start || entries.is_empty() || u.frames_offset - *last_entry_offset >= INDEX_STRIDE {
            entries.push((u.first_frame_no, before));
            *last_entry_offset = u.frames_offset;
        }
    }
}

impl Index {
    /// Replicas that were following are usually a little behind the durable
    /// point (it moves at WAL restarts): the newer part starts up to `walk`
    /// bytes before it, found by walking backwards.
    fn open_walking_back(path: &std::path::Path, walk: u64) -> io::Result<Index> {
        let mut tail = LogTail::open(path, false)?;
        let durable = tail.pos.offset;
        while durable - tail.pos.offset < walk {
            match tail.boundary_before(&tail.pos)? {
                Some(p) => tail.pos = p,
                None => break,
            }
        }
        let first = LogTail::open(path, true)?;
        let older = (first.pos.offset < tail.pos.offset).then(|| OlderPart {
            reader: first,
            until: tail.pos,
            entries: Vec::new(),
            gen_start: None,
            last_entry_offset: 0,
        });
        Ok(Index { tail, entries: Vec::new(), gen_start: None, last_entry_offset: 0, older, recent: Mutex::new(None) })
    }

    /// Indexes units appended since the last call, reading at most about
    /// `budget` bytes; true once the newest part is indexed to the end
    /// (requests can be answered). With `older`, it then indexes a step of the
    /// older part (while idle, or for a request that needs it: other requests
    /// do not wait for it). A primary that restarts with a long log indexes it in
    /// steps, between requests and while idle, so that the server keeps
    /// answering meanwhile.
    fn refresh(&mut self, budget: u64, older: bool) -> io::Result<bool> {
        self.tail.forget_window();
        if !index_units(&mut self.tail, u64::MAX, budget, &mut self.entries, &mut self.gen_start, &mut self.last_entry_offset)? {
            return Ok(false);
        }
        if !older {
            return Ok(true);
        }
        if let Some(o) = self.older.as_mut() {
            if index_units(&mut o.reader, o.until.offset, budget, &mut o.entries, &mut o.gen_start, &mut o.last_entry_offset)? {
                let mut o = self.older.take().unwrap();
                o.entries.append(&mut self.entries);
                self.entries = o.entries;
                self.gen_start = self.gen_start.or(o.gen_start);
            }
        }
        Ok(true)
    }

    /// Why `frame_no` cannot be looked up yet: it lies in the older part of
    /// the log, which is still being indexed.
    fn not_yet(&self, frame_no: u64) -> Option<String> {
        let o = self.older.as_ref()?;
        (frame_no <= o.until.last_frame_no).then(|| {
            format!(
                "the primary is still indexing the older part of its log (at byte {} of {}); try again",
                o.reader.pos.offset, o.until.offset
            )
        })
    }

    fn last(&self) -> Pos {
        self.tail.pos
    }

    fn log_len(&self) -> u64 {
        self.tail.file().metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// A reader positioned just before the unit that holds `frame_no`, and that unit.
    fn find(&self, frame_no: u64) -> io::Result<Option<(LogTail, Unit)>> {
        let mut t = self.tail.clone();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = recent.as_ref().filter(|u| (u.first_frame_no..=u.commit.last_frame_no).contains(&frame_no)) {
            t.pos = Pos {
                offset: u.end,
                generation: u.generation,
                page_size: u.page_size,
                last_frame_no: u.commit.last_frame_no,
                last_checksum: u.commit.checksum,
                db_pages: u.commit.size_after,
            };
            return Ok(Some((t, u.clone())));
        }
        let i = self.entries.partition_point(|(first, _)| *first <= frame_no);
        if i == 0 {
            return Ok(None);
        }
        t.pos = self.entries[i - 1].1;
        while let Some(u) = t.next_unit()? {
            if u.commit.last_frame_no >= frame_no {
                *recent = Some(u.clone());
                return Ok(Some((t, u)));
            }
        }
        Ok(None)
    }
}

struct Snapshot {
    id: u64,
    frame_no: u64,
    checksum: u64,
    generation: u64,
    page_size: u32,
    db_pages: u32,
    /// Offset of the F record holding each page's newest image (index page_no - 1; 0 = none).
    pages: Vec<u64>,
    used: Instant,
}

fn serve_catchup(
    name: &str,
    sock: &nng::Socket,
    sealer: &crate::seal::Sealer,
    path: &std::path::Path,
    stop: &AtomicBool,
    stats: &PublishStats,
) {
    let mut server = match CatchupServer::open(path) {
        Ok(s) => s,
        Err(e) => {
            set_error(stats, name, Some(format!("catch-up server cannot read {}: {e}", path.display())));
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
    };
    let mut idle_wait = None;
    while !stop.load(Ordering::Acquire) {
        // Idle, it indexes what was appended (and, after a restart, the
        // older part of the log, in steps) so that requests find it done.
        // Once only new appends are left, once a second is enough: a request
        // indexes what is missing itself. Stopping closes the socket.
        let wait = if server.indexing_older() { IDLE_STEP_EVERY } else { IDLE_REFRESH_EVERY };
        if idle_wait != Some(wait) {
            crate::transport::set_recv_timeout(sock, wait);
            idle_wait = Some(wait);
        }
        let msg = match sock.recv() {
            Ok(m) => m,
            Err(nng::Error::TimedOut) => {
                server.idle();
                continue;
            }
            Err(nng::Error::Closed) => return,
            Err(_) => continue,
        };
        let (request, nonce) = crate::transport::open_request(sealer, msg.as_slice());
        let Ok(request) = request else {
            // Unsealed, so that the replica can tell its operator why; it names
            // no database.
            let why = if sealer.is_on() {
                "this primary requires its walcast_key: the request was not sealed with it (the replica has no key, or another)"
            } else {
                "this primary has no walcast_key, but the request was encrypted: set the same key on both sides, or none"
            };
            let _ = sock.send(&wire::error([0; 16], 0, why)[..]);
            continue;
        };
        let reply = server.handle(&request, stats);
        let _ = sock.send(&crate::transport::seal_reply(sealer, &nonce, &reply)[..]);
    }
}

/// The catch-up server without its socket: the log index and the snapshots
/// being served. `handle` answers any request, whatever its bytes, with a
/// reply (an ERROR reply for what it refuses).
pub struct CatchupServer {
    index: Index,
    snapshots: VecDeque<Snapshot>,
    next_snapshot_id: u64,
    /// Bytes indexed per step, and walked back from the durable point at open.
    step: u64,
}

impl CatchupServer {
    pub fn open(log_path: &std::path::Path) -> io::Result<CatchupServer> {
        Self::open_in_steps(log_path, INDEX_STEP)
    }

    /// With `step` bytes in place of 64 MiB: tests and fuzz targets exercise
    /// the two-part index on a small log.
    pub fn open_in_steps(log_path: &std::path::Path, step: u64) -> io::Result<CatchupServer> {
        Ok(CatchupServer {
            index: Index::open_walking_back(log_path, step)?,
            snapshots: VecDeque::new(),
            next_snapshot_id: crate::log::now_ms(),
            step,
        })
    }

    /// Indexes a step of the log while no request waits: not only until it
    /// was first indexed, so that a request after a burst of hundreds of MB
    /// does not wait for all of it (a step is cheap when nothing is new).
    pub fn idle(&mut self) {
        let _ = self.index.refresh(self.step, true);
    }

    /// Whether the older part of the log (after a restart) is still to be
    /// indexed.
    fn indexing_older(&self) -> bool {
        self.index.older.is_some()
    }

    /// The reply to one request.
    pub fn handle(&mut self, msg: &[u8], stats: &PublishStats) -> Vec<u8> {
        self.handle_within(msg, stats, INDEX_BUDGET)
    }

    /// `handle`, indexing for at most `budget` before it answers.
    fn handle_within(&mut self, msg: &[u8], stats: &PublishStats, budget: Duration) -> Vec<u8> {
        let index = &mut self.index;
        self.snapshots.retain(|s| s.used.elapsed() < SNAPSHOT_IDLE);
        // Index what is new, within a time budget for a long unindexed log.
        let deadline = Instant::now() + budget;
        // Decoded once for the two questions below; `answer` reports what is
        // wrong with a request that does not decode.
        let request = wire::decode(msg).ok().map(|(_, body)| body);
        let mut refreshed = loop {
            match index.refresh(self.step, false) {
                Ok(true) => break Ok(true),
                Ok(false) if Instant::now() < deadline => {}
                other => break other,
            }
        };
        // A request that needs the older part of the log (frames before the
        // newer part, or a snapshot whose base image lies there) indexes it
        // within the same budget; others do not wait for it.
        if matches!(refreshed, Ok(true)) && index.older.is_some() && request.as_ref().is_some_and(|r| needs_older(index, r)) {
            while index.older.is_some() && Instant::now() < deadline {
                if let Err(e) = index.refresh(self.step, true) {
                    refreshed = Err(e);
                    break;
                }
            }
        }
        match refreshed {
            Err(e) => wire::error(index.tail.db_id, 0, &format!("the primary cannot read its log: {e}")),
            Ok(false) if !request.as_ref().is_some_and(|r| answerable_before_the_end(index, r)) => wire::error(
                index.tail.db_id,
                0,
                &format!("the primary is still indexing its log (at byte {} of {}); try again", index.last().offset, index.log_len()),
            ),
            Ok(_) => match answer(index, msg, &mut self.snapshots, &mut self.next_snapshot_id, stats) {
                Ok(r) => r,
                Err(e) => wire::error(index.tail.db_id, index.last().generation, &e),
            },
        }
    }
}

/// Whether `request` can be answered while the newest part of the log is still to
/// be indexed: frames inside the indexed part (the reply ends where it ends;
/// the replica asks again), or pages of a snapshot already taken. A primary
/// that appends faster than its catch-up thread indexes (that thread runs
/// below the application's) refused them all, and a replica far behind a
/// busy primary caught up only while the writer paused.
fn answerable_before_the_end(index: &Index, request: &Body) -> bool {
    match *request {
        Body::ReqFrames { after_frame_no, .. } => {
            after_frame_no < index.last().last_frame_no && index.not_yet(after_frame_no + 1).is_none()
        }
        Body::ReqPages { .. } => true,
        _ => false,
    }
}

/// Whether `request` asks for something in the part of the log not indexed yet.
fn needs_older(index: &Index, request: &Body) -> bool {
    match *request {
        Body::ReqFrames { after_frame_no, .. } => after_frame_no.checked_add(1).is_some_and(|f| index.not_yet(f).is_some()),
        Body::ReqSnapshot => index.gen_start.is_none(),
        _ => false,
    }
}

fn answer(
    index: &Index,
    msg: &[u8],
    snapshots: &mut VecDeque<Snapshot>,
    next_id: &mut u64,
    stats: &PublishStats,
) -> Result<Vec<u8>, String> {
    let (h, body) = wire::decode(msg).map_err(|e| format!("bad request: {e}"))?;
    let db_id = index.tail.db_id;
    let last = index.last();
    let need = |why: String| Ok(wire::need_snapshot(db_id, last.generation, &why));
    match body {
        Body::ReqFrames { after_frame_no: n, after_checksum: c } => {
            if h.db_id == [0; 16] {
                return need("the replica is new".into());
            }
            if h.db_id != db_id {
                return need(format!(
                    "the replica belongs to another database (db_id {}, the primary's is {})",
                    crate::log::hex(&h.db_id),
                    crate::log::hex(&db_id)
                ));
            }
            if n > last.last_frame_no {
                return need(format!("the replica is ahead of the primary (replica at frame_no {n}, primary at {})", last.last_frame_no));
            }
            if n == last.last_frame_no {
                if c != last.last_checksum {
                    return need(format!("the replica's history differs from the primary's at frame_no {n}"));
                }
                return Ok(FramesBuilder::new(db_id, last.generation, 0, last.last_frame_no, last.page_size.max(512), 0).finish());
            }
            if let Some(why) = index.not_yet(n + 1) {
                return Ok(wire::error(db_id, last.generation, &why));
            }
            let Some((t, u)) = index.find(n + 1).map_err(|e| e.to_string())? else {
                return need(format!("frame_no {} is outside the log's window", n + 1));
            };
            let at_n = if n + 1 == u.first_frame_no { u.prev_checksum } else { t.frame_header(&u, n).map_err(|e| e.to_string())?.checksum };
            if at_n != c {
                return need(format!("the replica's history differs from the primary's at frame_no {n}"));
            }
            let flags = if u.gen_start && n + 1 == u.first_frame_no { wire::FLAG_GENERATION_START } else { 0 };
            let mut fb = FramesBuilder::new(
                db_id,
                u.generation,
                flags,
                last.last_frame_no,
                u.page_size,
                last.offset.saturating_sub(u.frame_offset(n + 1)) as usize,
            );
            // Frames from n + 1 on, across the units that follow, up to the end
            // of what is committed or the next generation.
            t.frames_in_range(u.frame_offset(n + 1), last.offset, u.page_size, |fh, page| {
                if fb.full() {
                    return Ok(false);
                }
                fb.push(fh, page);
                Ok(true)
            })
            .map_err(|e| e.to_string())?;
            Ok(fb.finish())
        }
        Body::ReqSnapshot => {
            let snap = build_snapshot(index, *next_id).map_err(|e| format!("cannot build a snapshot: {e}"))?;
            *next_id += 1;
            stats.snapshots_served.fetch_add(1, Ordering::Relaxed);
            let reply = wire::snapshot(db_id, snap.generation, snap.id, snap.frame_no, snap.checksum, snap.page_size, snap.db_pages);
            if snapshots.len() >= MAX_SNAPSHOTS {
                snapshots.pop_front();
            }
            snapshots.push_back(snap);
            Ok(reply)
        }
        Body::ReqPages { snapshot_id, from_page, until_page } => {
            let Some(s) = snapshots.iter_mut().find(|s| s.id == snapshot_id) else {
                return Ok(wire::error(db_id, last.generation, &format!("snapshot {snapshot_id} expired; start a new one")));
            };
            s.used = Instant::now();
            let t = &index.tail;
            let mut pb = PagesBuilder::new(db_id, s.generation, s.id, s.page_size);
            let mut page = vec![0u8; s.page_size as usize];
            let mut p = from_page.max(1);
            let end = until_page.min(s.db_pages.saturating_add(1));
            // Pages past the last one the log holds are not in the image: skip
            // them at once (a damaged size_after near u32::MAX must not make
            // this loop for billions of pages).
            let held = s.pages.len() as u32;
            while p < end && !pb.full() {
                if p > held {
                    p = end;
                    break;
                }
                let off = s.pages[p as usize - 1];
                if off != 0 {
                    t.page_at(off, &mut page).map_err(|e| e.to_string())?;
                    pb.push(p, &page);
                }
                p += 1;
            }
            Ok(pb.finish(p))
        }
        _ => Err("not a request".into()),
    }
}

/// The newest image of every page of the current generation, as log offsets.
fn build_snapshot(index: &Index, id: u64) -> io::Result<Snapshot> {
    let last = index.last();
    let Some(start) = index.gen_start else {
        if let Some(why) = index.not_yet(0) {
            return Err(io::Error::other(why));
        }
        return Err(io::Error::other("the log holds no base image yet"));
    };
    // Pages past the database's last size are dropped at the end: they need no
    // slot. And the generation's base image holds every page, so a size larger
    // than the log could hold is damage, refused before it sizes an allocation.
    let keep = last.db_pages as usize;
    let room = index.log_len() / last.page_size.max(512) as u64 + 1;
    if keep as u64 > room {
        return Err(io::Error::other(format!(
            "the log is damaged: its last commit says the database has {keep} pages, more than the log holds ({room})"
        )));
    }
    let mut t = index.tail.clone();
    t.pos = start;
    let mut pages: Vec<u64> = Vec::new();
    let mut end = start;
    while t.pos.last_frame_no < last.last_frame_no {
        let Some(u) = t.next_unit()? else { break };
        t.read_frames(&u, u.first_frame_no, u.commit.last_frame_no, |fh, _| {
            let Some(i) = (fh.page_no as usize).checked_sub(1).filter(|i| *i < keep) else { return Ok(true) };
            if i >= pages.len() {
                pages.resize(i + 1, 0);
            }
            pages[i] = u.frame_offset(fh.frame_no);
            Ok(true)
        })?;
        end = t.pos;
    }
    // The index read these units before: only damage makes them differ now.
    if end.last_frame_no != last.last_frame_no || !crate::frame::is_page_size(end.page_size) {
        return Err(io::Error::other(format!(
            "the log is damaged: reading the current generation again ended at frame_no {} (page size {}), not at {}",
            end.last_frame_no, end.page_size, last.last_frame_no
        )));
    }
    pages.truncate(end.db_pages as usize);
    Ok(Snapshot {
        id,
        frame_no: end.last_frame_no,
        checksum: end.last_checksum,
        generation: end.generation,
        page_size: end.page_size,
        db_pages: end.db_pages,
        pages,
        used: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogWriter;

    /// A new log `t.log` of db_id [5; 16] in a fresh scratch directory, its
    /// first generation begun with `page_size`: (directory, log path, writer).
    fn new_log(name: &str, page_size: u32) -> (PathBuf, PathBuf, LogWriter) {
        let dir = crate::testutil::scratch_dir(name);
        let p = dir.join("t.log");
        let mut w = LogWriter::create(&p, [5; 16]).unwrap();
        w.begin_generation(page_size, "test").unwrap();
        (dir, p, w)
    }

    /// A log of 40 one-frame transactions of 4 KiB pages, synced after the
    /// 30th: a restarted primary's header then points at frame 31.
    fn long_log(name: &str) -> (std::path::PathBuf, Vec<u64>) {
        let (_, p, mut w) = new_log(&format!("indextest-{name}"), 4096);
        let mut sums = vec![];
        sums.push(w.add_frame(1, 1, &[0; 4096]).unwrap().checksum);
        w.commit(1, None).unwrap();
        for i in 2..=40u64 {
            w.begin_batch();
            sums.push(w.add_frame(1, 1, &[i as u8; 4096]).unwrap().checksum);
            w.commit(1, None).unwrap();
            if i == 30 {
                w.sync().unwrap();
            }
        }
        (p, sums)
    }

    fn ask(index: &Index, after: u64, checksum: u64) -> String {
        let req = wire::req_frames([5; 16], 1, after, checksum);
        let mut snaps = VecDeque::new();
        let reply = answer(index, &req, &mut snaps, &mut 1, &PublishStats::default()).unwrap();
        match wire::decode(&reply).unwrap().1 {
            Body::Frames { frames, .. } => format!("frames {}", frames.len()),
            Body::Error { reason } => reason.to_string(),
            Body::NeedSnapshot { reason } => format!("snapshot: {reason}"),
            _ => panic!("unexpected reply"),
        }
    }

    /// While this process publishes, the capture thread sends what it has
    /// appended, waking the publisher thread only when a burst begins (for
    /// the heartbeat that follows it); while it does not publish, it
    /// wakes that thread instead (it may be about to publish), and rings the
    /// doorbell of the publishing process, which may be another.
    #[test]
    fn capture_sends_what_it_appended_itself_while_this_process_publishes() {
        use crate::transport::{parse_endpoint, ReplicaSockets};
        let (dir, p, mut w) = new_log("capsend", 4096);
        w.add_frame(1, 1, &[1; 4096]).unwrap();
        w.commit(1, None).unwrap();
        let stats = Arc::new(PublishStats::default());
        let wake = Arc::new(Signal::default());
        let doorbell = Arc::new(ClaimFile::open(&dir.join("t-walcast-claim")).unwrap());
        let publishing_process = ClaimFile::open(&dir.join("t-walcast-claim")).unwrap();
        let sender = Sender {
            live: Arc::new(Mutex::new(None)),
            stats: stats.clone(),
            wake: wake.clone(),
            doorbell: Some(doorbell),
            name: "t".into(),
        };

        let rings = publishing_process.rings();
        sender.send_new_units();
        assert!(wake.wait(Some(Duration::ZERO)), "not publishing here: the publisher thread must be woken");
        assert_eq!(publishing_process.rings(), rings.wrapping_add(1), "and the doorbell rung");

        let ep = parse_endpoint(&format!("ipc://{}/s", dir.display())).unwrap();
        let sockets = PrimarySockets::listen(&ep, crate::seal::Sealer::default()).unwrap();
        let mut tail = LogTail::open(&p, false).unwrap();
        while tail.next_unit().unwrap().is_some() {}
        let replicas = sockets.replicas.clone();
        *sender.live.lock().unwrap() =
            Some(Live { sockets, tail, log_path: p.clone(), beat_owed: false, last_send: Instant::now() - COALESCE });
        let sub = ReplicaSockets::dial(&ep, crate::seal::Sealer::default()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while replicas.load(Ordering::Acquire) < 1 {
            assert!(Instant::now() < deadline, "the subscriber never connected");
            std::thread::sleep(Duration::from_millis(1));
        }

        for i in 2..=3u8 {
            w.begin_batch();
            w.add_frame(1, 1, &[i; 4096]).unwrap();
            w.commit(1, None).unwrap();
        }
        w.flush().unwrap();
        sender.send_new_units();
        // Sent by capture. A burst began: the publisher thread is woken once,
        // to time the heartbeat that follows it.
        assert!(wake.wait(Some(Duration::ZERO)), "the burst's first send wakes the publisher thread");
        assert_eq!(publishing_process.rings(), rings.wrapping_add(2), "through the doorbell it sleeps on");
        assert_eq!(stats.published_frame_no.load(Ordering::Acquire), 3);
        assert!(sender.live.lock().unwrap().as_ref().unwrap().beat_owed);
        w.begin_batch();
        w.add_frame(1, 1, &[4; 4096]).unwrap();
        w.commit(1, None).unwrap();
        w.flush().unwrap();
        sender.send_new_units();
        assert_eq!(stats.published_frame_no.load(Ordering::Acquire), 4);
        assert!(!wake.wait(Some(Duration::ZERO)), "later in the burst: the publisher thread is not woken");
        assert_eq!(publishing_process.rings(), rings.wrapping_add(2), "nor the doorbell rung");
        // The publisher thread, woken, looks again for the heartbeat that
        // follows the burst within 20 ms, not at the next periodic beat.
        {
            let g = sender.live.lock().unwrap();
            let l = g.as_ref().unwrap();
            let (last_beat, now) = (Instant::now(), Instant::now());
            assert_eq!(l.next_beat_look(last_beat, now), now + BEAT_AFTER_ACTIVITY);
            assert!(now + BEAT_AFTER_ACTIVITY < last_beat + HEARTBEAT_EVERY);
        }
        let m = sub.recv_live(Duration::from_secs(10)).unwrap().expect("a message");
        let raw = sub.open_live(&m).unwrap();
        let (_, body) = wire::decode(&raw).unwrap();
        let Body::Frames { frames, primary_last, .. } = body else { panic!("not frames: {body:?}") };
        assert_eq!(primary_last, 3);
        assert_eq!(frames.iter().map(|(h, pg)| (h.frame_no, pg[0])).collect::<Vec<_>>(), vec![(2, 2), (3, 3)]);
        let m = sub.recv_live(Duration::from_secs(10)).unwrap().expect("a second message");
        let raw = sub.open_live(&m).unwrap();
        let (_, body) = wire::decode(&raw).unwrap();
        let Body::Frames { frames, .. } = body else { panic!("not frames: {body:?}") };
        assert_eq!(frames.iter().map(|(h, pg)| (h.frame_no, pg[0])).collect::<Vec<_>>(), vec![(4, 4)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restarted_primary_answers_for_the_newest_frames_before_it_has_indexed_the_rest() {
        let (p, sums) = long_log("restart");
        let record = 1 + 24 + 4096 + crate::log::COMMIT_LEN as u64;
        // The newer part: 12 units walked back from the durable point (frame 30).
        let mut index = Index::open_walking_back(&p, 12 * record).unwrap();
        assert!(index.refresh(u64::MAX, false).unwrap());
        assert!(index.older.is_some(), "the older part is indexed later");
        assert_eq!(ask(&index, 35, sums[34]), "frames 5");
        assert_eq!(ask(&index, 30, sums[29]), "frames 10");
        assert_eq!(ask(&index, 20, sums[19]), "frames 20", "walked back to, not read from the start");
        let reason = ask(&index, 10, sums[9]);
        assert!(reason.contains("still indexing the older part"), "{reason}");
        while index.older.is_some() {
            index.refresh(8 << 10, true).unwrap();
        }
        assert_eq!(ask(&index, 10, sums[9]), "frames 30");
        assert_eq!(ask(&index, 0, crate::frame::chain_seed(&[5; 16])), "frames 40");
        assert!(index.gen_start.is_some(), "the base image's position comes from the older part");
        // Walking back stops at the generation's base image.
        let mut index = Index::open_walking_back(&p, INDEX_STEP).unwrap();
        assert!(index.refresh(u64::MAX, false).unwrap());
        assert_eq!(ask(&index, 1, sums[0]), "frames 39");
        assert!(ask(&index, 0, crate::frame::chain_seed(&[5; 16])).contains("still indexing"));
        // The frame after u64::MAX is nowhere, in the older part least of all
        // (found by fuzzing: it overflowed to frame 0).
        let frames_after = |n: u64| wire::req_frames([5; 16], 1, n, 0);
        assert!(!needs_older(&index, &wire::decode(&frames_after(u64::MAX)).unwrap().1));
        assert!(needs_older(&index, &wire::decode(&frames_after(0)).unwrap().1));
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    /// A primary appending faster than its catch-up thread indexes: a request
    /// for frames inside the indexed part is answered, not refused until the
    /// index reaches the end (which a busy writer kept out of reach).
    #[test]
    fn frames_already_indexed_are_served_while_the_newest_are_still_to_index() {
        let (p, sums) = long_log("prefix");
        let record = 1 + 24 + 4096 + crate::log::COMMIT_LEN as u64;
        // Walked back 2 units from the durable point (frame 30); each step
        // indexes 2 more; no time to index further than one step.
        let mut server = CatchupServer::open_in_steps(&p, 2 * record).unwrap();
        let stats = PublishStats::default();
        fn ask_now(server: &mut CatchupServer, stats: &PublishStats, after: u64, checksum: u64) -> String {
            let reply = server.handle_within(&wire::req_frames([5; 16], 1, after, checksum), stats, Duration::ZERO);
            match wire::decode(&reply).unwrap().1 {
                Body::Frames { frames, primary_last, .. } => format!(
                    "frames {}..={} of {primary_last}",
                    frames.first().map_or(0, |f| f.0.frame_no),
                    frames.last().map_or(0, |f| f.0.frame_no)
                ),
                Body::Error { reason } => reason.to_string(),
                Body::NeedSnapshot { reason } => format!("snapshot: {reason}"),
                _ => panic!("unexpected reply"),
            }
        }
        // Each request indexes one step (2 units) and is answered from what is
        // indexed, though more of the log follows.
        assert_eq!(ask_now(&mut server, &stats, 28, sums[27]), "frames 29..=30 of 30");
        assert_eq!(ask_now(&mut server, &stats, 30, sums[29]), "frames 31..=32 of 32");
        // Pages of a snapshot do not wait for the index either (this one is
        // unknown: the refusal names it, not the indexing).
        let pages = server.handle_within(&wire::req_pages([5; 16], 1, 999, 1, 2), &stats, Duration::ZERO);
        let Body::Error { reason } = wire::decode(&pages).unwrap().1 else { panic!("not an error") };
        assert!(reason.contains("snapshot 999 expired"), "{reason}");
        // A replica at (or past) the indexed end waits for the index.
        // (The pages request indexed a step too: to 34; this one to 36.)
        let at_end = ask_now(&mut server, &stats, 36, sums[35]);
        assert!(at_end.contains("still indexing its log"), "{at_end}");
        assert_eq!(ask_now(&mut server, &stats, 36, sums[35]), "frames 37..=38 of 38");
        assert_eq!(ask_now(&mut server, &stats, 38, sums[37]), "frames 39..=40 of 40");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn snapshot_pages_are_served_by_the_range_asked_for() {
        let (dir, p, mut w) = new_log("snaprange", 512);
        for n in 1..=10u32 {
            // Page 4 is absent from the image, as the lock page is.
            if n != 4 {
                w.add_frame(n, if n == 10 { 10 } else { 0 }, &[n as u8; 512]).unwrap();
            }
        }
        w.commit(10, None).unwrap();
        w.sync().unwrap();
        let mut server = CatchupServer::open(&p).unwrap();
        let stats = PublishStats::default();
        let Ok((_, Body::Snapshot { snapshot_id, .. })) = wire::decode(&server.handle(&wire::req_snapshot([5; 16], 1), &stats)) else {
            panic!("no snapshot")
        };
        let mut pages = |from: u32, until: u32| {
            let reply = server.handle(&wire::req_pages([5; 16], 1, snapshot_id, from, until), &stats);
            let Ok((_, Body::Pages { next_page, pages, .. })) = wire::decode(&reply) else { panic!("no pages") };
            assert!(pages.iter().all(|(n, p)| p[0] == *n as u8));
            (pages.iter().map(|(n, _)| *n).collect::<Vec<_>>(), next_page)
        };
        assert_eq!(pages(2, 6), (vec![2, 3, 5], 6));
        assert_eq!(pages(6, 100), (vec![6, 7, 8, 9, 10], 11));
        assert_eq!(pages(1, 2), (vec![1], 2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_never_sizes_its_page_table_from_damaged_page_numbers() {
        let dir = crate::testutil::scratch_dir("snapshot");
        let p = dir.join("t.log");
        let snapshot = |size_after: u32| {
            let _ = std::fs::remove_file(&p);
            let mut w = LogWriter::create(&p, [5; 16]).unwrap();
            w.begin_generation(512, "test").unwrap();
            w.add_frame(1, 0, &[1; 512]).unwrap();
            // A page number far past the database (a damaged frame header).
            w.add_frame(0x7fff_ffff, 0, &[2; 512]).unwrap();
            w.add_frame(2, size_after, &[3; 512]).unwrap();
            w.commit(size_after, None).unwrap();
            w.sync().unwrap();
            let mut server = CatchupServer::open(&p).unwrap();
            let reply = server.handle(&wire::req_snapshot([5; 16], 1), &PublishStats::default());
            let Ok((_, body)) = wire::decode(&reply) else { panic!("malformed reply") };
            match body {
                Body::Snapshot { db_pages, .. } => format!("snapshot of {db_pages} pages"),
                Body::Error { reason } => reason.to_string(),
                _ => panic!("unexpected reply"),
            }
        };
        // Ignored: it lies past the database's size (a slot for it would be 16 GiB).
        assert_eq!(snapshot(2), "snapshot of 2 pages");
        // A size the log cannot hold is refused, not allocated.
        let reason = snapshot(0x7fff_ffff);
        assert!(reason.contains("the log is damaged") && reason.contains("2147483647 pages"), "{reason}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
