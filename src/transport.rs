//! NNG sockets and endpoint addresses.
//!
//! A primary listens on two sockets: PUB at the endpoint the user configures,
//! where every committed transaction and a heartbeat go out, and REP at the
//! catch-up address derived from it, where replicas ask for what they missed and
//! for snapshots. Replicas dial both. Only the endpoint is configured; the
//! catch-up address is derived:
//!
//! - `tcp://HOST:PORT` -> `tcp://HOST:PORT+1`
//! - `ipc:///PATH`     -> `ipc:///PATH.catchup`
//!
//! With a key set, every message goes through `seal.rs` on its way out and in.

use crate::seal::{Channel, Nonce, Sealer, NONCE_LEN, OVERHEAD};
use crate::signal::Signal;
use nng::options::{
    protocol::pubsub::Subscribe, protocol::reqrep::ResendTime, Options, ReconnectMaxTime, ReconnectMinTime, RecvBufferSize, RecvMaxSize,
    RecvTimeout, SendBufferSize, SendTimeout,
};
use nng::{Protocol, Socket};
use std::borrow::Cow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A checked endpoint: the PUB address and the derived catch-up address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub catchup: String,
}

/// Validates an endpoint URL and derives its catch-up address. The error names
/// what is wrong.
pub fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let url = url.trim();
    let bad = |why: &str| format!("invalid walcast_endpoint '{url}': {why}; expected tcp://HOST:PORT or ipc:///PATH");
    if let Some(rest) = url.strip_prefix("tcp://") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.is_empty() {
            return Err(bad("no host (use 0.0.0.0 to listen on every interface)"));
        }
        if host.contains('/') || host.contains(' ') {
            return Err(bad("malformed host"));
        }
        let p: u32 = port.parse().map_err(|_| bad(&format!("port '{port}' is not a number")))?;
        if p == 0 || p >= 65535 {
            return Err(bad(&format!("port {p} is out of range 1..65534 (the catch-up socket uses port+1)")));
        }
        return Ok(Endpoint { url: url.into(), catchup: format!("tcp://{host}:{}", p + 1) });
    }
    if let Some(path) = url.strip_prefix("ipc://") {
        if path.is_empty() {
            return Err(bad("no path"));
        }
        // sun_path holds 107 bytes plus a NUL, and the catch-up path is longer.
        if path.len() + ".catchup".len() > 107 {
            return Err(bad("path too long for a Unix socket (at most 99 bytes)"));
        }
        return Ok(Endpoint { url: url.into(), catchup: format!("ipc://{path}.catchup") });
    }
    Err(bad("unknown scheme"))
}

/// The default endpoint of a primary: a Unix socket beside the database, so
/// nothing reaches the network unless a tcp:// endpoint is asked for.
pub fn default_endpoint(db_path: &str) -> String {
    let p = std::path::Path::new(db_path);
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().map(|d| d.join(p)).unwrap_or(p.to_path_buf()) };
    format!("ipc://{}-walcast.sock", abs.display())
}

/// Live messages queued per replica, at the primary and at the replica (each
/// at most `wire::LIVE_CHUNK_BYTES` of pages).
const LIVE_QUEUE: i32 = 64;

/// The largest message a replica accepts (NNG drops bigger ones before they
/// are allocated): the largest message walcast sends, sealed.
pub const MAX_RECEIVED: usize = crate::wire::MAX_MESSAGE + OVERHEAD;
/// The largest catch-up request the primary accepts.
pub const MAX_REQUEST: usize = 4096;

/// The number of connections a socket has now, kept up to date by NNG.
fn count_pipes(sock: &Socket) -> Arc<AtomicI64> {
    let n = Arc::new(AtomicI64::new(0));
    let count = n.clone();
    let _ = sock.pipe_notify(move |_, ev| match ev {
        nng::PipeEvent::AddPost => {
            count.fetch_add(1, Ordering::AcqRel);
        }
        nng::PipeEvent::RemovePost => {
            count.fetch_sub(1, Ordering::AcqRel);
        }
        _ => {}
    });
    n
}

fn nng_err(what: &str, url: &str, e: nng::Error) -> String {
    format!("{what} {url}: {e}")
}

/// The primary's two listening sockets.
pub struct PrimarySockets {
    pub publish: Socket,
    pub catchup: Socket,
    /// Replicas connected to the PUB socket now.
    pub replicas: Arc<AtomicI64>,
    pub sealer: Sealer,
}

/// Catch-up and bootstrap move messages of up to `wire::MAX_MESSAGE` many times
/// a second, and NNG allocates (and zeroes) each one with malloc. glibc serves
/// a block that big with a fresh mmap, so every message paid page faults and
/// the kernel's zeroing (half of a catch-up's time, measured), until the process
/// has freed a bigger block: glibc's mmap threshold then rises to that size
/// (mallopt(3), M_MMAP_THRESHOLD, "dynamic") and later messages reuse heap
/// memory. This frees one such block on purpose, once per socket set, rather
/// than leave it to chance (capture's buffers used to do it by accident). The
/// process's own allocations up to that size then come from the heap too, as
/// after any free of a block that big.
fn let_messages_reuse_heap_memory() {
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        // Allocated without being touched (calloc of fresh mmap memory), freed at once.
        std::hint::black_box(vec![0u8; crate::wire::MAX_MESSAGE + (64 << 10)]);
    }
}

/// The PUB socket of a live stream, listening at `ep`, and the count of the
/// replicas connected to it.
fn listen_live(ep: &Endpoint) -> Result<(Socket, Arc<AtomicI64>), String> {
    let publish = Socket::new(Protocol::Pub0).map_err(|e| nng_err("cannot create a PUB socket for", &ep.url, e))?;
    let replicas = count_pipes(&publish);
    // A slow replica must never block the publisher: sends that cannot be
    // queued are dropped, and the replica repairs the gap by catch-up.
    let _ = publish.set_opt::<SendTimeout>(Some(Duration::ZERO));
    // Queued messages per replica: enough to ride out a replica's stall of
    // tens of milliseconds at thousands of messages a second, bounded in
    // bytes by the live message size (at most 8 MiB; the replicas' queues
    // share their messages).
    let _ = publish.set_opt::<SendBufferSize>(LIVE_QUEUE);
    remove_stale_ipc(&ep.url);
    publish.listen(&ep.url).map_err(|e| nng_err("cannot listen on", &ep.url, e))?;
    Ok((publish, replicas))
}

impl PrimarySockets {
    pub fn listen(ep: &Endpoint, sealer: Sealer) -> Result<PrimarySockets, String> {
        let_messages_reuse_heap_memory();
        let (publish, replicas) = listen_live(ep)?;
        let catchup = Socket::new(Protocol::Rep0).map_err(|e| nng_err("cannot create a REP socket for", &ep.catchup, e))?;
        // Requests are a few dozen bytes: a peer cannot make the server buffer more.
        catchup.set_opt::<RecvMaxSize>(MAX_REQUEST).map_err(|e| nng_err("cannot limit messages to", &ep.catchup, e))?;
        let _ = catchup.set_opt::<RecvTimeout>(Some(Duration::from_millis(200)));
        let _ = catchup.set_opt::<SendTimeout>(Some(Duration::from_secs(5)));
        remove_stale_ipc(&ep.catchup);
        catchup.listen(&ep.catchup).map_err(|e| nng_err("cannot listen on", &ep.catchup, e))?;
        Ok(PrimarySockets { publish, catchup, replicas, sealer })
    }

    /// Sends on the live stream, sealed when a key is set. A full queue drops
    /// the message (see above).
    pub fn publish(&self, msg: &[u8]) {
        let (m, _) = self.sealer.seal(Channel::Live, &[0; NONCE_LEN], msg);
        let _ = self.publish.send(&m[..]);
    }
}

/// Catch-up requests a relay passes on at once (each on a thread of its own).
const RELAY_REQUESTS_IN_FLIGHT: usize = 8;

/// A relaying replica's sockets: the live stream it receives goes out again
/// on a PUB socket of its own, and catch-up requests to it are passed, as they
/// are (sealed or not), to its own primary's catch-up address, and answered
/// with that reply. Its replicas dial it as they would dial a primary.
///
/// NNG's own device (`nng_device`) would pass the requests on, but closing it
/// shuts its sockets down from NNG's task thread, which then waits for work
/// queued behind itself: with the one task thread walcast builds NNG with,
/// the process's NNG stopped for good. So threads of ours do it, each with a
/// context on either socket.
pub struct RelaySockets {
    pub endpoint: Endpoint,
    publish: Socket,
    /// The REP socket replicas send requests to, and the REQ socket that passes
    /// them on, and the threads' contexts on them.
    catchup: [Socket; 2],
    contexts: Vec<nng::Context>,
    forwarders: Vec<std::thread::JoinHandle<()>>,
    /// Replicas connected to the PUB socket now.
    pub downstream: Arc<AtomicI64>,
}

impl RelaySockets {
    /// Listens at `ep`, passing catch-up requests on to `upstream`'s catch-up
    /// address.
    pub fn listen(ep: &Endpoint, upstream: &Endpoint) -> Result<RelaySockets, String> {
        let (publish, downstream) = listen_live(ep)?;
        let front = Socket::new(Protocol::Rep0).map_err(|e| nng_err("cannot create a REP socket for", &ep.catchup, e))?;
        front.set_opt::<RecvMaxSize>(MAX_REQUEST).map_err(|e| nng_err("cannot limit messages to", &ep.catchup, e))?;
        let back = Socket::new(Protocol::Req0).map_err(|e| nng_err("cannot create a REQ socket for", &upstream.catchup, e))?;
        back.set_opt::<RecvMaxSize>(MAX_RECEIVED).map_err(|e| nng_err("cannot limit messages from", &upstream.catchup, e))?;
        let _ = back.set_opt::<ReconnectMinTime>(Some(Duration::from_millis(50)));
        let _ = back.set_opt::<ReconnectMaxTime>(Some(Duration::from_millis(500)));
        // The replica asking resends on its own schedule, and each of its
        // resends arrives here as a request of its own: this socket resends
        // only what a broken connection lost, no sooner than a snapshot is built.
        let _ = back.set_opt::<ResendTime>(Some(RESEND_SNAPSHOT));
        remove_stale_ipc(&ep.catchup);
        front.listen(&ep.catchup).map_err(|e| nng_err("cannot listen on", &ep.catchup, e))?;
        back.dial_async(&upstream.catchup).map_err(|e| nng_err("cannot dial", &upstream.catchup, e))?;
        let mut relay = RelaySockets {
            endpoint: ep.clone(),
            publish,
            catchup: [front, back],
            contexts: Vec::new(),
            forwarders: Vec::new(),
            downstream,
        };
        for _ in 0..RELAY_REQUESTS_IN_FLIGHT {
            // Opened here, never while the sockets close (see `OpenContexts`).
            let err = |e| format!("cannot open a relay context: {e}");
            let rep = nng::Context::new(&relay.catchup[0]).map_err(err)?;
            relay.contexts.push(rep.clone());
            let req = nng::Context::new(&relay.catchup[1]).map_err(err)?;
            relay.contexts.push(req.clone());
            let t = std::thread::Builder::new()
                .name("walcast-relay".into())
                .spawn(move || pass_requests_on(rep, req))
                .map_err(|e| format!("cannot start a relay thread: {e}"))?;
            relay.forwarders.push(t);
        }
        Ok(relay)
    }

    /// Passes a live message on as it arrived. A full queue drops it, as a
    /// primary's does: the replica behind repairs the gap by catch-up.
    pub fn forward(&self, raw: &[u8]) {
        let _ = self.publish.send(raw);
    }
}

impl Drop for RelaySockets {
    fn drop(&mut self) {
        self.publish.close();
        // Closing the contexts ends the threads' operations at once; the
        // sockets close once no context is left (see `OpenContexts`).
        for c in &self.contexts {
            c.close();
        }
        for t in self.forwarders.drain(..) {
            let _ = t.join();
        }
        for s in &self.catchup {
            s.close();
        }
    }
}

/// One request at a time: received on a REP context, sent on a REQ context,
/// and its reply sent back, until its contexts are closed. A request that
/// cannot be passed on, or whose reply does not come, is dropped: the replica
/// that sent it asks again, as it does of a primary.
fn pass_requests_on(rep: nng::Context, req: nng::Context) {
    let (tx, done) = crossbeam_channel::bounded(1);
    // The callback only hands the result over: this thread waits for it, so
    // that no operation outlives the Aio (see `Drop for Requests`).
    let Ok(aio) = nng::Aio::new(move |_, res| {
        let _ = tx.send(res);
    }) else {
        return;
    };
    let _ = aio.set_timeout(Some(REPLY_WAIT));
    let closed = |e: &nng::Error| matches!(e, nng::Error::Closed);
    let next = || done.recv().ok();
    loop {
        if rep.recv(&aio).is_err() {
            break;
        }
        let request = match next() {
            Some(nng::AioResult::Recv(Ok(m))) => m,
            Some(nng::AioResult::Recv(Err(e))) if !closed(&e) => continue, // a timeout
            _ => break,
        };
        if req.send(&aio, request).is_err() {
            break;
        }
        match next() {
            Some(nng::AioResult::Send(Ok(()))) => {}
            Some(nng::AioResult::Send(Err((_, e)))) if !closed(&e) => continue,
            _ => break,
        }
        if req.recv(&aio).is_err() {
            break;
        }
        let reply = match next() {
            Some(nng::AioResult::Recv(Ok(m))) => m,
            Some(nng::AioResult::Recv(Err(e))) if !closed(&e) => continue,
            _ => break,
        };
        if rep.send(&aio, reply).is_err() {
            break;
        }
        match next() {
            Some(nng::AioResult::Send(Ok(()))) => {}
            Some(nng::AioResult::Send(Err((_, e)))) if !closed(&e) => continue,
            _ => break,
        }
    }
    rep.close();
    req.close();
    aio.wait();
}

/// How long a `recv` on `sock` (the catch-up server's) waits before it
/// returns TimedOut.
pub fn set_recv_timeout(sock: &Socket, wait: Duration) {
    let _ = sock.set_opt::<RecvTimeout>(Some(wait));
}

/// One catch-up request as the server sees it: the plain request, or why it
/// cannot be read, and the nonce its reply is bound to.
pub fn open_request<'a>(sealer: &Sealer, m: &'a [u8]) -> (Result<Cow<'a, [u8]>, String>, Nonce) {
    match sealer.open(Channel::Request, &[0; NONCE_LEN], m) {
        Ok((plain, nonce)) => (Ok(plain), nonce),
        Err(e) => (Err(e), [0; NONCE_LEN]),
    }
}

/// The reply to a request whose envelope had `nonce`, bound to it.
pub fn seal_reply(sealer: &Sealer, nonce: &Nonce, reply: &[u8]) -> Vec<u8> {
    sealer.seal(Channel::Reply, nonce, reply).0.into_owned()
}

/// A socket file left by a process that died cannot be listened on again;
/// only the process holding the publisher lock calls this.
fn remove_stale_ipc(url: &str) {
    if let Some(path) = url.strip_prefix("ipc://") {
        let _ = std::fs::remove_file(path);
    }
}

/// How long the REQ socket waits for a reply before NNG sends the request
/// again. A lost request or reply costs this much, so it is short for what the
/// primary answers at once (frames, snapshot pages: at most ~200 ms of indexing
/// and a 1 MiB read); a slower answer only costs a duplicate request, whose
/// reply NNG discards. Starting a snapshot can take the primary seconds, and
/// each resend would build another, so that request waits longer.
const RESEND: Duration = Duration::from_millis(500);
const RESEND_SNAPSHOT: Duration = Duration::from_secs(2);

/// A replica's two dialing sockets. Dials are asynchronous: NNG keeps
/// reconnecting in the background while the primary is away.
pub struct ReplicaSockets {
    pub subscribe: Socket,
    /// Live messages, as NNG's receive callback hands them over (see `recv_live`).
    live: LiveQueue,
    /// The receive in progress on `subscribe`; dropping it stops it.
    _live_aio: nng::Aio,
    pub request: Socket,
    pub sealer: Sealer,
    /// Connections of the SUB socket to the primary now: 0 as soon as a link
    /// is cut, before any silence is noticed.
    pub connected: Arc<AtomicI64>,
    /// Catch-up replies that were damaged (or did not open) and were asked
    /// for again, and the last reason, for the replica's status.
    damaged: std::sync::Mutex<(u64, Option<String>)>,
    /// The request contexts open now (see `OpenContexts`).
    contexts: Arc<std::sync::Mutex<OpenContexts>>,
}

/// A socket must never close while a context of it opens or closes, in NNG
/// 1.4: a context opened during the close stays in the socket's list, and the
/// close waits for that list to empty, for good; a context whose last
/// reference goes during the close is finalized after the socket's protocol
/// state is freed, and NNG aborts the process (pthread_mutex_lock: Invalid
/// argument). So `SocketCloser` closes the contexts of a request set, which
/// ends its operations at once, and leaves the request socket to the
/// applier, which closes it once the set is gone; and no context opens once
/// it has closed.
#[derive(Default)]
struct OpenContexts {
    closed: bool,
    open: Vec<nng::Context>,
}

/// Closes a replica's sockets from another thread: a receive or a catch-up
/// call blocked on an unreachable primary returns at once.
#[derive(Clone)]
pub struct SocketCloser {
    subscribe: Socket,
    request: Socket,
    contexts: Arc<std::sync::Mutex<OpenContexts>>,
}

impl SocketCloser {
    pub fn close(&self) {
        self.subscribe.close();
        let mut c = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        c.closed = true;
        for ctx in &c.open {
            ctx.close();
        }
        // With a request set open, its owner closes the socket after it (see
        // `OpenContexts`).
        if c.open.is_empty() {
            self.request.close();
        }
    }
}

/// See `Drop for Requests`: the live receive's callback returns before its
/// Aio goes.
impl Drop for ReplicaSockets {
    fn drop(&mut self) {
        self.subscribe.close();
        self._live_aio.wait();
    }
}

impl ReplicaSockets {
    pub fn closer(&self) -> SocketCloser {
        SocketCloser { subscribe: self.subscribe.clone(), request: self.request.clone(), contexts: self.contexts.clone() }
    }

    pub fn dial(ep: &Endpoint, sealer: Sealer) -> Result<ReplicaSockets, String> {
        let_messages_reuse_heap_memory();
        let subscribe = Socket::new(Protocol::Sub0).map_err(|e| nng_err("cannot create a SUB socket for", &ep.url, e))?;
        subscribe.set_opt::<Subscribe>(vec![]).map_err(|e| nng_err("cannot subscribe to", &ep.url, e))?;
        let connected = count_pipes(&subscribe);
        subscribe.set_opt::<RecvMaxSize>(MAX_RECEIVED).map_err(|e| nng_err("cannot limit messages from", &ep.url, e))?;
        // Messages wait here only between two of `receive_live`'s receives;
        // the applier's queue is its channel. Either, when full, drops a
        // message and the replica catches up. At most 8 MiB.
        let _ = subscribe.set_opt::<RecvBufferSize>(LIVE_QUEUE);
        let _ = subscribe.set_opt::<ReconnectMinTime>(Some(Duration::from_millis(50)));
        let _ = subscribe.set_opt::<ReconnectMaxTime>(Some(Duration::from_millis(500)));
        subscribe.dial_async(&ep.url).map_err(|e| nng_err("cannot dial", &ep.url, e))?;
        let (live, _live_aio) = receive_live(&subscribe).map_err(|e| nng_err("cannot receive from", &ep.url, e))?;
        let request = Socket::new(Protocol::Req0).map_err(|e| nng_err("cannot create a REQ socket for", &ep.catchup, e))?;
        request.set_opt::<RecvMaxSize>(MAX_RECEIVED).map_err(|e| nng_err("cannot limit messages from", &ep.catchup, e))?;
        let _ = request.set_opt::<ReconnectMinTime>(Some(Duration::from_millis(50)));
        let _ = request.set_opt::<ReconnectMaxTime>(Some(Duration::from_millis(500)));
        let _ = request.set_opt::<ResendTime>(Some(RESEND));
        let _ = request.set_opt::<SendTimeout>(Some(Duration::from_secs(2)));
        let _ = request.set_opt::<RecvTimeout>(Some(Duration::from_secs(5)));
        request.dial_async(&ep.catchup).map_err(|e| nng_err("cannot dial", &ep.catchup, e))?;
        Ok(ReplicaSockets {
            subscribe,
            live,
            _live_aio,
            request,
            sealer,
            connected,
            damaged: Default::default(),
            contexts: Default::default(),
        })
    }

    /// The next live message, waiting at most `wait`: Ok(None) when none came.
    /// An error once the socket is closed.
    pub fn recv_live(&self, wait: Duration) -> Result<Option<nng::Message>, nng::Error> {
        let deadline = Instant::now() + wait;
        loop {
            match self.live.messages.try_recv() {
                Ok(Ok(m)) => return Ok(Some(m)),
                Ok(Err(e)) => return Err(e),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Err(nng::Error::Closed),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Raised after each message is queued: one raised since the
            // look above returns at once.
            self.live.arrived.wait(Some(left));
        }
    }

    /// One request and its reply, which must answer this very request when a
    /// key is set. NNG resends on a lost reply; a damaged one is asked for
    /// again here.
    pub fn call(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        // A snapshot is built before its reply goes out: ask again later.
        let snapshot = msg.get(4) == Some(&crate::wire::KIND_REQ_SNAPSHOT);
        let _ = self.request.set_opt::<ResendTime>(Some(if snapshot { RESEND_SNAPSHOT } else { RESEND }));
        let mut retries = 0;
        loop {
            let (m, nonce) = self.sealer.seal(Channel::Request, &[0; NONCE_LEN], msg);
            self.request.send(&m[..]).map_err(|(_, e)| format!("catch-up request not sent: {e}"))?;
            let reply = self.request.recv().map_err(|e| format!("no catch-up reply: {e}"))?;
            if let Some(opened) = self.open_reply(&nonce, reply.as_slice(), &mut retries) {
                return opened;
            }
        }
    }

    /// Opens the reply to the request sealed with `nonce`: Some(reply or
    /// error) for the caller, or None when it was damaged and should be asked
    /// for again (counted in `retries`, and recorded for the status).
    fn open_reply(&self, nonce: &Nonce, reply: &[u8], retries: &mut u32) -> Option<Result<Vec<u8>, String>> {
        let opened = self
            .sealer
            .open(Channel::Reply, nonce, reply)
            .map(|(plain, _)| plain.into_owned())
            .map_err(|e| format!("bad catch-up reply: {e}"));
        let why = match &opened {
            Err(e) => Some(e.clone()),
            Ok(plain) => damaged(plain),
        };
        match why {
            Some(why) if *retries < DAMAGE_RETRIES => {
                *retries += 1;
                let mut d = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
                d.0 += 1;
                d.1 = Some(why.clone());
                drop(d);
                crate::primary::report(&format!("catch-up: {why}; asking again"));
                None
            }
            _ => Some(opened),
        }
    }

    /// Closes a request context (its operation ends at once) and forgets it
    /// (see `OpenContexts`).
    fn forget_context(&self, ctx: &nng::Context) {
        let mut c = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        ctx.close();
        c.open.retain(|x| x != ctx);
    }

    /// Up to `depth` catch-up requests in flight at once (see `Requests`).
    pub fn requests<T>(&self, depth: usize) -> Result<Requests<'_, T>, String> {
        Requests::new(self, depth)
    }

    /// Catch-up replies asked for again since the last call, and the last reason.
    pub fn take_damaged(&self) -> (u64, Option<String>) {
        std::mem::take(&mut *self.damaged.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A message of the live stream, opened (authenticated and decrypted when
    /// a key is set).
    pub fn open_live<'a>(&self, m: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        self.sealer.open(Channel::Live, &[0; NONCE_LEN], m).map(|(plain, _)| plain)
    }
}

/// How long a pipelined request waits for its reply (NNG resends it every
/// `RESEND` meanwhile), as the REQ socket's receive timeout does for `call`.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Catch-up requests in flight at once, each on a REQ context of its own, so
/// that their replies need not wait for each other: a snapshot's pages are
/// asked for ahead, the primary reads the next ones while the replica writes
/// the last, and a link's round trip is paid once rather than once per reply.
/// Each request carries a tag of the caller's, handed back with its reply.
/// Replies are checked as `call` checks them (a damaged one is asked for again).
pub struct Requests<'a, T> {
    socks: &'a ReplicaSockets,
    slots: Vec<Slot<T>>,
    done: crossbeam_channel::Receiver<(usize, Result<nng::Message, nng::Error>)>,
    in_flight: usize,
}

struct Slot<T> {
    aio: nng::Aio,
    ctx: nng::Context,
    pending: Option<Pending<T>>,
}

/// An Aio's callback holds a reference to it while it runs. Were the owner's
/// reference dropped first, nng-rs would free the Aio at the callback's end,
/// from within it: NNG's thread would wait for itself, for good, and with it
/// whatever else that thread serves (a replica's dialers stopped reconnecting).
/// So every operation is ended first (a closed context or socket ends a pending
/// one, and fails a new one, at once) and the callbacks are waited for.
impl<T> Drop for Requests<'_, T> {
    fn drop(&mut self) {
        // The callbacks (which may still use a context) are waited for before
        // the contexts are forgotten, and so before the socket may close.
        let mut c = self.socks.contexts.lock().unwrap_or_else(|e| e.into_inner());
        for s in &self.slots {
            s.ctx.close();
        }
        for s in &self.slots {
            s.aio.wait();
        }
        c.open.retain(|ctx| !self.slots.iter().any(|s| s.ctx == *ctx));
        // Closed meanwhile: `SocketCloser` left the socket to this set's owner.
        let closed = c.closed;
        drop(c);
        if closed {
            self.socks.request.close();
        }
    }
}

struct Pending<T> {
    tag: T,
    request: Vec<u8>,
    nonce: Nonce,
    retries: u32,
}

impl<'a, T> Requests<'a, T> {
    fn new(socks: &'a ReplicaSockets, depth: usize) -> Result<Requests<'a, T>, String> {
        // A context takes the socket's resend time when it is opened.
        let _ = socks.request.set_opt::<ResendTime>(Some(RESEND));
        let (tx, done) = crossbeam_channel::unbounded();
        // Built up slot by slot: on an error, its Drop ends what was opened.
        let mut r = Requests { socks, slots: Vec::with_capacity(depth), done, in_flight: 0 };
        for i in 0..depth.max(1) {
            let err = |e| format!("cannot open a catch-up request context: {e}");
            let ctx = {
                let mut open = socks.contexts.lock().unwrap_or_else(|e| e.into_inner());
                if open.closed {
                    return Err("catch-up request not sent: the sockets are closed".into());
                }
                let ctx = nng::Context::new(&socks.request).map_err(err)?;
                // Registered at once: a close from now on ends its operations.
                open.open.push(ctx.clone());
                ctx
            };
            let (c, tx) = (ctx.clone(), tx.clone());
            let aio = nng::Aio::new(move |aio, res| {
                // A panic here would abort the process (the callback runs on NNG's thread).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let done = match res {
                        // Sent: now wait for the reply on the same context.
                        nng::AioResult::Send(Ok(())) => match c.recv(&aio) {
                            Ok(()) => return,
                            Err(e) => Err(e),
                        },
                        nng::AioResult::Send(Err((_, e))) => Err(e),
                        nng::AioResult::Recv(r) => r,
                        nng::AioResult::Sleep(_) => return,
                    };
                    let _ = tx.send((i, done));
                }));
            });
            let aio = match aio.and_then(|a| a.set_timeout(Some(REPLY_WAIT)).map(|_| a)) {
                Ok(a) => a,
                Err(e) => {
                    socks.forget_context(&ctx);
                    return Err(err(e));
                }
            };
            r.slots.push(Slot { aio, ctx, pending: None });
        }
        Ok(r)
    }

    /// Whether another request can be sent now.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.slots.len()
    }

    /// Sends `request` on a free context; its reply comes back from `next_reply`
    /// with `tag`. An error when every context is busy (see `has_room`).
    pub fn send(&mut self, tag: T, request: Vec<u8>) -> Result<(), String> {
        let i = self.slots.iter().position(|s| s.pending.is_none()).ok_or("every catch-up request context is busy")?;
        let s = &mut self.slots[i];
        let nonce = start(self.socks, &s.ctx, &s.aio, &request)?;
        s.pending = Some(Pending { tag, request, nonce, retries: 0 });
        self.in_flight += 1;
        Ok(())
    }

    /// The next reply to arrive, with its request's tag; None when no request
    /// is in flight. After an error the caller drops the whole set.
    pub fn next_reply(&mut self) -> Result<Option<(T, Vec<u8>)>, String> {
        loop {
            if self.in_flight == 0 {
                return Ok(None);
            }
            // Every operation ends by REPLY_WAIT (its Aio's timeout); the margin
            // only guards against a callback that never came.
            let (i, r) = self.done.recv_timeout(REPLY_WAIT * 2).map_err(|_| "no catch-up reply: timed out".to_string())?;
            let reply = r.map_err(|e| format!("no catch-up reply: {e}"))?;
            let s = &mut self.slots[i];
            let p = s.pending.as_mut().ok_or("a catch-up reply came for no request")?;
            match self.socks.open_reply(&p.nonce, reply.as_slice(), &mut p.retries) {
                Some(opened) => {
                    let p = s.pending.take().unwrap();
                    self.in_flight -= 1;
                    return opened.map(|r| Some((p.tag, r)));
                }
                // Damaged: the same request again, on the same context.
                None => p.nonce = start(self.socks, &s.ctx, &s.aio, &p.request)?,
            }
        }
    }
}

/// Seals `request` and sends it on `ctx`; the nonce its reply is bound to.
fn start(socks: &ReplicaSockets, ctx: &nng::Context, aio: &nng::Aio, request: &[u8]) -> Result<Nonce, String> {
    let (m, nonce) = socks.sealer.seal(Channel::Request, &[0; NONCE_LEN], request);
    ctx.send(aio, nng::Message::from(&m[..])).map_err(|(_, e)| format!("catch-up request not sent: {e}"))?;
    Ok(nonce)
}

/// The pause before receiving again after a receive error.
const RECEIVE_RETRY: Duration = Duration::from_millis(10);

/// Keeps a receive pending on `sock` and hands what arrives to the returned
/// channel. A blocking receive with a timeout (the applier must wake to look
/// around while nothing comes) arms a timer in NNG for every message, and
/// that wakes NNG's timer thread once per message: on two cores it preempted
/// SQLite's threads more often than anything else. This receive has no timer;
/// the applier waits on the channel instead. A full channel drops the message
/// (as NNG's queue would): the replica sees the gap and catches up.
fn receive_live(sock: &Socket) -> nng::Result<(LiveQueue, nng::Aio)> {
    let (tx, rx) = crossbeam_channel::bounded(LIVE_QUEUE as usize);
    let arrived = Arc::new(Signal::default());
    let queue = LiveQueue { messages: rx, arrived: arrived.clone() };
    let tx = move |m| {
        let _ = tx.try_send(m);
        arrived.raise();
    };
    let rearm = sock.clone();
    let aio = nng::Aio::new(move |aio, res| {
        // A panic here would abort the process (the callback runs on NNG's thread).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let armed = match res {
                nng::AioResult::Recv(Ok(m)) => {
                    tx(Ok(m));
                    rearm.recv_async(&aio)
                }
                // Stopped (the Aio dropped) or the socket closed: no more.
                nng::AioResult::Recv(Err(e @ (nng::Error::Closed | nng::Error::Canceled))) => {
                    tx(Err(e));
                    return;
                }
                // Another error (out of memory): receive again after a pause,
                // not at once, which could spin on NNG's thread for as long
                // as the error lasts.
                nng::AioResult::Recv(Err(_)) => aio.sleep(RECEIVE_RETRY),
                nng::AioResult::Sleep(Ok(())) => rearm.recv_async(&aio),
                _ => return,
            };
            if armed.is_err() {
                tx(Err(nng::Error::Closed));
            }
        }));
    })?;
    sock.recv_async(&aio)?;
    Ok((queue, aio))
}

/// The live messages and the signal raised after each is queued. The applier
/// sleeps on the signal, not in the channel's blocking receive: that one
/// spins and yields the CPU several times before it sleeps, a quarter of the
/// applier's time at 1,000 messages a second (see `signal.rs`).
struct LiveQueue {
    messages: crossbeam_channel::Receiver<Result<nng::Message, nng::Error>>,
    arrived: Arc<Signal>,
}

/// How many times a catch-up reply that is damaged, or does not open (a key
/// set), is asked for again before the caller sees it. The caller gives up the
/// whole catch-up, the transaction in progress or the snapshot on a bad reply,
/// so without this a snapshot of N MiB under a damage rate p per message
/// completes only with probability (1-p)^N: a 200 MiB one at 2% never did (211
/// restarts in 240 s). A reply that stays bad (another key) costs 5 more round
/// trips.
const DAMAGE_RETRIES: u32 = 5;

/// Why an opened reply should be asked for again: it was damaged in transit,
/// or it is the primary's refusal of a request that was.
fn damaged(reply: &[u8]) -> Option<String> {
    match crate::wire::decode(reply) {
        Err(e) => Some(format!("reply discarded: {e}")),
        Ok((_, crate::wire::Body::Error { reason })) if reason.starts_with("bad request") => {
            Some(format!("request damaged in transit: the primary answered '{reason}'"))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_derived() {
        assert_eq!(parse_endpoint("tcp://127.0.0.1:7070").unwrap().catchup, "tcp://127.0.0.1:7071");
        assert_eq!(parse_endpoint("ipc:///tmp/x.sock").unwrap().catchup, "ipc:///tmp/x.sock.catchup");
        for (bad, why) in [
            ("http://x:1", "unknown scheme"),
            ("tcp://x", "no port"),
            ("tcp://:80", "no host"),
            ("tcp://h:abc", "not a number"),
            ("tcp://h:65535", "out of range"),
            ("ipc://", "no path"),
        ] {
            let e = parse_endpoint(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    /// Request sets dropped the moment their last reply is in (while its
    /// callback may still run): the socket goes on working. Before `Drop for
    /// Requests`, one such drop in some hundreds froze an NNG thread, and a
    /// replica's sockets with it.
    #[test]
    fn request_sets_dropped_at_once_leave_the_socket_working() {
        let dir = crate::testutil::scratch_dir("requests");
        let ep = parse_endpoint(&format!("ipc://{}/s", dir.display())).unwrap();
        let server = PrimarySockets::listen(&ep, Sealer::default()).unwrap();
        let rep = server.catchup.clone();
        let echo = std::thread::spawn(move || {
            while let Ok(m) = rep.recv().or_else(|e| if e == nng::Error::TimedOut { rep.recv() } else { Err(e) }) {
                let _ = rep.send(m);
            }
        });
        let (done, finished) = crossbeam_channel::bounded(1);
        let client_ep = ep.clone();
        // On a thread of its own, so that a frozen socket fails the test
        // instead of hanging it.
        std::thread::spawn(move || {
            let socks = ReplicaSockets::dial(&client_ep, Sealer::default()).unwrap();
            let msg = crate::wire::req_snapshot([1; 16], 1);
            for round in 0..400u32 {
                let mut r = socks.requests::<u32>(4).unwrap();
                for k in 0..4 {
                    r.send(round * 4 + k, msg.clone()).unwrap();
                }
                let mut got = 0;
                while let Some((_, reply)) = r.next_reply().unwrap() {
                    assert_eq!(reply, msg);
                    got += 1;
                }
                assert_eq!(got, 4);
            }
            let last = socks.call(&msg);
            drop(socks);
            let _ = done.send(last == Ok(msg));
        });
        assert_eq!(finished.recv_timeout(std::time::Duration::from_secs(60)), Ok(true), "the request socket froze or failed");
        server.catchup.close();
        server.publish.close();
        echo.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A replica's sockets closed from another thread (a promotion stops the
    /// applier so) while the applier opens and drops request sets: the close
    /// must return, and the process live on. Before `OpenContexts`, NNG's close
    /// waited for good for a context opened during it (3 of 3 runs), and with
    /// only a lock around the opens, NNG aborted the process finalizing a
    /// context closed during the close (6 of 20 runs of the unit tests).
    #[test]
    fn closing_while_contexts_are_opened_never_hangs() {
        let dir = crate::testutil::scratch_dir("contexts-close");
        let ep = parse_endpoint(&format!("ipc://{}/s", dir.display())).unwrap();
        let server = PrimarySockets::listen(&ep, Sealer::default()).unwrap();
        let rep = server.catchup.clone();
        let echo = std::thread::spawn(move || {
            while let Ok(m) = rep.recv().or_else(|e| if e == nng::Error::TimedOut { rep.recv() } else { Err(e) }) {
                let _ = rep.send(m);
            }
        });
        let (done, finished) = crossbeam_channel::bounded(1);
        let client_ep = ep.clone();
        std::thread::spawn(move || {
            let msg = crate::wire::req_snapshot([1; 16], 1);
            for round in 0..300u32 {
                let socks = Arc::new(ReplicaSockets::dial(&client_ep, Sealer::default()).unwrap());
                assert_eq!(socks.call(&msg), Ok(msg.clone()));
                let closer = socks.closer();
                let opener = {
                    let socks = socks.clone();
                    std::thread::spawn(move || {
                        while let Ok(r) = socks.requests::<u32>(4) {
                            drop(r)
                        }
                    })
                };
                for _ in 0..round % 17 {
                    std::thread::yield_now();
                }
                closer.close();
                opener.join().unwrap();
            }
            let _ = done.send(());
        });
        let r = finished.recv_timeout(std::time::Duration::from_secs(120));
        assert!(r.is_ok(), "a close of the request socket never returned");
        server.catchup.close();
        server.publish.close();
        echo.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_replies_are_told_apart() {
        use crate::wire;
        let good = wire::need_snapshot([1; 16], 1, "the replica is new");
        assert_eq!(damaged(&good), None);
        assert_eq!(damaged(&wire::error([1; 16], 1, "snapshot 7 expired; start a new one")), None);
        let mut flipped = good.clone();
        flipped[40] ^= 4;
        assert!(damaged(&flipped).unwrap().contains("checksum mismatch"));
        assert!(damaged(&good[..good.len() - 3]).is_some());
        let refusal = wire::error([1; 16], 1, "bad request: message checksum mismatch (damaged in transit)");
        assert!(damaged(&refusal).unwrap().contains("request damaged in transit"));
    }
}
