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

use nng::options::{
    protocol::pubsub::Subscribe, protocol::reqrep::ResendTime, Options, ReconnectMaxTime, ReconnectMinTime, RecvBufferSize, RecvMaxSize,
    RecvTimeout, SendBufferSize, SendTimeout,
};
use nng::{Protocol, Socket};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the catch-up socket accepts at most (NNG's receive limit); every
/// request is far smaller. Replies and live messages are limited to
/// `wire::MAX_MESSAGE` on the replica's sockets.
pub const MAX_REQUEST: usize = 4096;

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

fn nng_err(what: &str, url: &str, e: nng::Error) -> String {
    format!("{what} {url}: {e}")
}

/// The primary's two listening sockets.
pub struct PrimarySockets {
    pub publish: Socket,
    pub catchup: Socket,
    /// Replicas connected to the PUB socket now.
    pub replicas: Arc<AtomicI64>,
}

impl PrimarySockets {
    pub fn listen(ep: &Endpoint) -> Result<PrimarySockets, String> {
        let publish = Socket::new(Protocol::Pub0).map_err(|e| nng_err("cannot create a PUB socket for", &ep.url, e))?;
        let replicas = Arc::new(AtomicI64::new(0));
        let count = replicas.clone();
        let _ = publish.pipe_notify(move |_, ev| match ev {
            nng::PipeEvent::AddPost => {
                count.fetch_add(1, Ordering::AcqRel);
            }
            nng::PipeEvent::RemovePost => {
                count.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        });
        // A slow replica must never block the publisher: sends that cannot be
        // queued are dropped, and the replica repairs the gap by catch-up.
        let _ = publish.set_opt::<SendTimeout>(Some(Duration::ZERO));
        // Queued messages per replica: enough to ride out a scheduling hiccup,
        // few enough that memory stays bounded (messages are at most ~1 MiB).
        let _ = publish.set_opt::<SendBufferSize>(8);
        remove_stale_ipc(&ep.url);
        publish.listen(&ep.url).map_err(|e| nng_err("cannot listen on", &ep.url, e))?;
        let catchup = Socket::new(Protocol::Rep0).map_err(|e| nng_err("cannot create a REP socket for", &ep.catchup, e))?;
        // Requests are a few dozen bytes: a peer cannot make the server buffer more.
        catchup.set_opt::<RecvMaxSize>(MAX_REQUEST).map_err(|e| nng_err("cannot limit messages to", &ep.catchup, e))?;
        let _ = catchup.set_opt::<RecvTimeout>(Some(Duration::from_millis(200)));
        let _ = catchup.set_opt::<SendTimeout>(Some(Duration::from_secs(5)));
        remove_stale_ipc(&ep.catchup);
        catchup.listen(&ep.catchup).map_err(|e| nng_err("cannot listen on", &ep.catchup, e))?;
        Ok(PrimarySockets { publish, catchup, replicas })
    }
}

/// A socket file left by a process that died cannot be listened on again;
/// only the process holding the publisher lock calls this.
fn remove_stale_ipc(url: &str) {
    if let Some(path) = url.strip_prefix("ipc://") {
        let _ = std::fs::remove_file(path);
    }
}

/// A replica's two dialing sockets. Dials are asynchronous: NNG keeps
/// reconnecting in the background while the primary is away.
pub struct ReplicaSockets {
    pub subscribe: Socket,
    pub request: Socket,
}

impl ReplicaSockets {
    pub fn dial(ep: &Endpoint) -> Result<ReplicaSockets, String> {
        let subscribe = Socket::new(Protocol::Sub0).map_err(|e| nng_err("cannot create a SUB socket for", &ep.url, e))?;
        subscribe.set_opt::<Subscribe>(vec![]).map_err(|e| nng_err("cannot subscribe to", &ep.url, e))?;
        subscribe.set_opt::<RecvMaxSize>(crate::wire::MAX_MESSAGE).map_err(|e| nng_err("cannot limit messages from", &ep.url, e))?;
        // At most this many ~1 MiB messages wait in the replica's queue.
        let _ = subscribe.set_opt::<RecvBufferSize>(4);
        let _ = subscribe.set_opt::<ReconnectMinTime>(Some(Duration::from_millis(50)));
        let _ = subscribe.set_opt::<ReconnectMaxTime>(Some(Duration::from_millis(500)));
        subscribe.dial_async(&ep.url).map_err(|e| nng_err("cannot dial", &ep.url, e))?;
        let request = Socket::new(Protocol::Req0).map_err(|e| nng_err("cannot create a REQ socket for", &ep.catchup, e))?;
        request.set_opt::<RecvMaxSize>(crate::wire::MAX_MESSAGE).map_err(|e| nng_err("cannot limit messages from", &ep.catchup, e))?;
        let _ = request.set_opt::<ReconnectMinTime>(Some(Duration::from_millis(50)));
        let _ = request.set_opt::<ReconnectMaxTime>(Some(Duration::from_millis(500)));
        let _ = request.set_opt::<ResendTime>(Some(Duration::from_secs(2)));
        let _ = request.set_opt::<SendTimeout>(Some(Duration::from_secs(2)));
        let _ = request.set_opt::<RecvTimeout>(Some(Duration::from_secs(5)));
        request.dial_async(&ep.catchup).map_err(|e| nng_err("cannot dial", &ep.catchup, e))?;
        Ok(ReplicaSockets { subscribe, request })
    }

    /// One request and its reply. NNG resends on a lost reply.
    pub fn call(&self, msg: &[u8]) -> Result<nng::Message, String> {
        self.request.send(msg).map_err(|(_, e)| format!("catch-up request not sent: {e}"))?;
        self.request.recv().map_err(|e| format!("no catch-up reply: {e}"))
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
}
