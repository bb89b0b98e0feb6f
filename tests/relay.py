#!/usr/bin/env python3
"""A faulty network between a walcast primary and its replicas: a TCP relay for
NNG's SP-over-TCP protocol that damages whole messages.

NNG's tcp transport opens with an 8-byte handshake each way (0x00 'S' 'P' 0x00,
the protocol id as u16 big-endian, 2 reserved zero bytes); after it, every
message is a u64 big-endian length and that many bytes. The relay forwards the
handshakes untouched and then works message by message, in both directions, so
the byte stream stays valid while the messages in it are dropped, duplicated,
reordered (one held back and sent after the next), delayed, truncated (the length
prefix is rewritten to match) or have bits flipped, each at its own rate.

A walcast primary listens on PORT (PUB) and PORT+1 (catch-up REQ/REP); a
replica given the endpoint tcp://HOST:RPORT uses RPORT+1 for catch-up. So the
relay listens on RPORT and RPORT+1 and forwards to PORT and PORT+1: channel
"pub" and channel "catchup". Directions: "down" (primary to replica) and "up"
(replica to primary; on "pub" NNG's SUB sends nothing after the handshake).
REQ/REP messages start with NNG's 4-byte request id, which the relay damages
like any other byte.

It can also cut the link for some seconds (close every connection, and close
every new one at once until the cut ends) or partition it (connections stay up,
every message is discarded).

In a test:

    r = Relay(listen_port=RPORT, target_port=PORT, seed=1).start()
    r.set_rates(drop=0.1, corrupt=0.001)          # both channels
    r.set_rates("pub", truncate=0.01)             # one channel
    r.cut(5)                                      # returns at once
    Relay(..., tap=fn)   # fn(channel, direction, message) -> messages to relay instead
    r.counters()                                  # what it did
    r.close()

From the command line (`relay.py --help`), the same through stdin lines:
`set [pub|catchup] drop=0.1 corrupt=0.001 ...`, `cut SECONDS`, `partition
SECONDS`, `stats`, `quit`. Each answer is one JSON line.
"""
import argparse
import json
import random
import select
import socket
import struct
import sys
import threading
import time

HANDSHAKE = 8
FAULTS = ("drop", "dup", "reorder", "delay", "truncate", "corrupt")
CHANNELS = ("pub", "catchup")
DIRECTIONS = ("down", "up")
COUNTERS = ("seen", "forwarded", "dropped", "partitioned", "duplicated", "reordered", "delayed", "truncated",
            "corrupted", "bytes")
# The largest message the relay accepts; a bigger length means the stream is
# not NNG's, and the connection is closed.
MAX_MESSAGE = 64 << 20


def parse_faults(spec):
    """'drop=0.1,corrupt=0.001' (commas or spaces) -> {"drop": 0.1, ...}; unknown
    names and rates outside 0..1 are refused with a message naming them."""
    out = {}
    for kv in spec.replace(",", " ").split():
        k, sep, v = kv.partition("=")
        k = k.strip()
        if not sep:
            raise ValueError(f"fault '{kv}': expected NAME=VALUE")
        try:
            x = float(v)
        except ValueError:
            raise ValueError(f"fault '{kv}': '{v}' is not a number") from None
        if k in FAULTS:
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"fault '{kv}': a rate must be between 0 and 1")
        elif k in ("delay_ms", "reorder_hold_ms", "corrupt_bits"):
            if x < 0 or (k == "corrupt_bits" and x < 1):
                raise ValueError(f"fault '{kv}': out of range")
        else:
            raise ValueError(f"unknown fault '{k}': expected one of {', '.join(FAULTS)}, "
                             "delay_ms, reorder_hold_ms, corrupt_bits")
        out[k] = x
    return out


class Rates:
    """The fault rates of one channel (each a probability per message), and their
    parameters: a delayed message waits uniform(0, delay_ms); a held-back message
    is sent after the next one, or alone after reorder_hold_ms; a corrupted one
    gets 1..corrupt_bits flipped bits."""

    def __init__(self):
        self.drop = self.dup = self.reorder = self.delay = self.truncate = self.corrupt = 0.0
        self.delay_ms = 50.0
        self.reorder_hold_ms = 200.0
        self.corrupt_bits = 3

    def update(self, **kw):
        for k, v in kw.items():
            if k == "corrupt_bits":
                v = int(v)
            setattr(self, k, v)

    def as_dict(self):
        return {k: getattr(self, k) for k in FAULTS + ("delay_ms", "reorder_hold_ms", "corrupt_bits")}


class _Pipe:
    """One relayed connection: a client socket and the upstream socket."""

    def __init__(self, relay, channel, n, client, upstream):
        self.relay, self.channel, self.n = relay, channel, n
        self.client, self.upstream = client, upstream
        self.closed = threading.Event()

    def start(self):
        for direction, src, dst in (("up", self.client, self.upstream), ("down", self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(direction, src, dst), daemon=True,
                             name=f"relay-{self.channel}-{self.n}-{direction}").start()

    def close(self):
        if not self.closed.is_set():
            self.closed.set()
            for s in (self.client, self.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.relay._forget(self)

    def _pump(self, direction, src, dst):
        r = self.relay
        rnd = random.Random(f"{r.seed}/{self.channel}/{self.n}/{direction}")
        buf = bytearray()
        held = None  # (message, held since)
        try:
            # Sockets stay blocking: a slow reader holds up sendall (TCP's
            # backpressure) instead of failing it. select() only lets the loop
            # release a held-back message when nothing else arrives.
            handshake_done = False
            while not self.closed.is_set():
                if select.select([src], [], [], 0.02)[0]:
                    chunk = src.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
                if not handshake_done:
                    if len(buf) < HANDSHAKE:
                        continue
                    dst.sendall(bytes(buf[:HANDSHAKE]))
                    del buf[:HANDSHAKE]
                    handshake_done = True
                while len(buf) >= 8:
                    (n,) = struct.unpack_from(">Q", buf, 0)
                    if n > MAX_MESSAGE:
                        raise ConnectionError(f"message of {n} bytes: not an NNG stream")
                    if len(buf) < 8 + n:
                        break
                    msg = bytes(buf[8:8 + n])
                    del buf[:8 + n]
                    for tapped in (r.tap(self.channel, direction, msg) if r.tap else [msg]):
                        out, held = r._decide(self.channel, direction, rnd, tapped, held)
                        for m in out:
                            dst.sendall(struct.pack(">Q", len(m)) + m)
                if held is not None:
                    hold_s = r._rates[self.channel].reorder_hold_ms / 1000
                    if time.monotonic() - held[1] >= hold_s:
                        # Nothing came after it: a reorder needs a next message.
                        dst.sendall(struct.pack(">Q", len(held[0])) + held[0])
                        held = None
        except (OSError, ConnectionError):
            pass
        finally:
            self.close()


class Relay:
    """Relays listen_port -> target_port (channel "pub") and listen_port+1 ->
    target_port+1 (channel "catchup") on `host`, damaging messages at the rates
    set (all zero at first)."""

    def __init__(self, listen_port, target_port, host="127.0.0.1", target_host=None, seed=0, tap=None, **rates):
        self.host, self.target_host = host, target_host or host
        # tap(channel, direction, message) -> the messages to relay instead (an
        # attacker in the middle: record, forge, replay); before any fault.
        self.tap = tap
        self.ports = {"pub": (listen_port, target_port), "catchup": (listen_port + 1, target_port + 1)}
        self.seed = seed
        self._lock = threading.Lock()
        self._rates = {c: Rates() for c in CHANNELS}
        self._counts = {(c, d): dict.fromkeys(COUNTERS, 0) for c in CHANNELS for d in DIRECTIONS}
        self._events = dict.fromkeys(("connections", "refused", "upstream_failed", "cuts", "partitions"), 0)
        self._pipes = set()
        self._cut_until = 0.0
        self._partition_until = 0.0
        self._listeners = []
        self._n = 0
        self._stop = threading.Event()
        if rates:
            self.set_rates(**rates)

    # --- control ------------------------------------------------------------

    def start(self):
        for channel, (lport, _) in self.ports.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, lport))
            s.listen(64)
            s.settimeout(0.1)
            self._listeners.append(s)
            threading.Thread(target=self._accept, args=(channel, s), daemon=True, name=f"relay-{channel}").start()
        return self

    def close(self):
        self._stop.set()
        for s in self._listeners:
            s.close()
        for p in list(self._pipes):
            p.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def set_rates(self, channel=None, **rates):
        """Sets rates (drop, dup, reorder, delay, truncate, corrupt; and delay_ms,
        reorder_hold_ms, corrupt_bits) on one channel or, without one, on both.
        Unnamed rates keep their value."""
        bad = [k for k in rates if k not in Rates().as_dict()]
        if bad:
            raise ValueError(f"unknown fault {bad[0]!r}")
        if channel is not None and channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}: expected pub or catchup")
        with self._lock:
            for c in ([channel] if channel else CHANNELS):
                self._rates[c].update(**rates)

    def clear(self):
        """Every rate back to zero: a clean network again."""
        self.set_rates(**dict.fromkeys(FAULTS, 0.0))

    def rates(self):
        with self._lock:
            return {c: r.as_dict() for c, r in self._rates.items()}

    def cut(self, seconds):
        """Closes every connection now and closes new ones at once for `seconds`.
        Returns at once."""
        with self._lock:
            self._cut_until = max(self._cut_until, time.monotonic() + seconds)
            self._events["cuts"] += 1
            pipes = list(self._pipes)
        for p in pipes:
            p.close()

    def partition(self, seconds):
        """Keeps connections up but discards every message, both ways, for
        `seconds`. Returns at once."""
        with self._lock:
            self._partition_until = max(self._partition_until, time.monotonic() + seconds)
            self._events["partitions"] += 1

    def cutting(self):
        return time.monotonic() < self._cut_until

    def partitioned(self):
        return time.monotonic() < self._partition_until

    def connections(self):
        with self._lock:
            return len(self._pipes)

    def counters(self):
        """{"total": {...}, "pub/down": {...}, ..., "events": {...}}."""
        with self._lock:
            out = {f"{c}/{d}": dict(v) for (c, d), v in self._counts.items()}
            out["events"] = dict(self._events)
        out["total"] = {k: sum(out[f"{c}/{d}"][k] for c in CHANNELS for d in DIRECTIONS) for k in COUNTERS}
        return out

    # --- work ---------------------------------------------------------------

    def _accept(self, channel, ls):
        while not self._stop.is_set():
            try:
                client, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.cutting():
                with self._lock:
                    self._events["refused"] += 1
                # RST rather than FIN: the link is down, not closing politely.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                up = socket.create_connection((self.target_host, self.ports[channel][1]), timeout=2)
            except OSError:
                with self._lock:
                    self._events["upstream_failed"] += 1
                client.close()
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._n += 1
                p = _Pipe(self, channel, self._n, client, up)
                self._pipes.add(p)
                self._events["connections"] += 1
            p.start()

    def _forget(self, pipe):
        with self._lock:
            self._pipes.discard(pipe)

    def _decide(self, channel, direction, rnd, msg, held):
        """What to send for one message: (messages to send now, held message)."""
        with self._lock:
            r = self._rates[channel]
            drop, dup, reorder, delay, truncate, corrupt = (r.drop, r.dup, r.reorder, r.delay, r.truncate, r.corrupt)
            delay_ms, bits = r.delay_ms, r.corrupt_bits
            partitioned = self.partitioned()
        c = {}
        c["seen"] = 1
        out = []
        if partitioned:
            c["partitioned"] = 1
        elif rnd.random() < drop:
            c["dropped"] = 1
        else:
            if rnd.random() < truncate and msg:
                msg = msg[:rnd.randrange(len(msg))]
                c["truncated"] = 1
            if rnd.random() < corrupt and msg:
                b = bytearray(msg)
                for _ in range(rnd.randint(1, bits)):
                    i = rnd.randrange(len(b) * 8)
                    b[i // 8] ^= 1 << (i % 8)
                msg = bytes(b)
                c["corrupted"] = 1
            if rnd.random() < delay:
                c["delayed"] = 1
                time.sleep(rnd.uniform(0, delay_ms) / 1000)
            copies = 2 if rnd.random() < dup else 1
            if copies == 2:
                c["duplicated"] = 1
            if held is None and rnd.random() < reorder:
                held = (msg, time.monotonic())
                if copies == 2:
                    out.append(msg)
            else:
                out.extend([msg] * copies)
                if held is not None:
                    out.append(held[0])
                    c["reordered"] = 1
                    held = None
        if held is not None and partitioned:
            held = None
        c["forwarded"] = len(out)
        c["bytes"] = sum(len(m) for m in out)
        with self._lock:
            k = self._counts[(channel, direction)]
            for name, v in c.items():
                k[name] += v
        return out, held


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="A faulty TCP relay for NNG's SP-over-TCP (walcast's PUB port and catch-up port+1).",
        epilog="stdin commands, one per line, each answered by one JSON line: "
               "'set [pub|catchup] drop=0.1 corrupt=0.001 ...', 'clear', 'cut SECONDS', 'partition SECONDS', "
               "'stats', 'quit'. Faults: " + ", ".join(FAULTS) + " (probabilities per message), delay_ms, "
               "reorder_hold_ms, corrupt_bits.")
    ap.add_argument("--listen", type=int, required=True, help="port the replica dials (and port+1 for catch-up)")
    ap.add_argument("--target", type=int, required=True, help="the primary's port (and port+1 for catch-up)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--target-host", default="127.0.0.1", help="the primary's address (default 127.0.0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", default="", help="both channels, e.g. drop=0.1,corrupt=0.001,dup=0.01")
    ap.add_argument("--pub-faults", default="", help="the PUB channel only")
    ap.add_argument("--catchup-faults", default="", help="the catch-up channel only")
    ap.add_argument("--stats-every", type=float, default=0, help="print the counters every N seconds")
    a = ap.parse_args(argv)
    try:
        rates = {None: parse_faults(a.faults), "pub": parse_faults(a.pub_faults),
                 "catchup": parse_faults(a.catchup_faults)}
    except ValueError as e:
        ap.error(str(e))
    r = Relay(a.listen, a.target, host=a.host, target_host=a.target_host, seed=a.seed)
    for ch, kw in rates.items():
        r.set_rates(ch, **kw)
    r.start()
    say = lambda obj: print(json.dumps(obj), flush=True)  # noqa: E731
    say({"listening": [a.listen, a.listen + 1], "target": [a.target, a.target + 1], "rates": r.rates()})
    if a.stats_every > 0:
        def tick():
            while True:
                time.sleep(a.stats_every)
                say({"stats": r.counters()["total"]})
        threading.Thread(target=tick, daemon=True).start()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "set":
                ch = args.pop(0) if args and args[0] in CHANNELS else None
                r.set_rates(ch, **parse_faults(" ".join(args)))
                say({"rates": r.rates()})
            elif cmd == "clear":
                r.clear()
                say({"rates": r.rates()})
            elif cmd in ("cut", "partition"):
                secs = float(args[0]) if args else 5.0
                getattr(r, cmd)(secs)
                say({cmd: secs})
            elif cmd == "stats":
                say(r.counters())
            elif cmd == "quit":
                break
            else:
                say({"error": f"unknown command {cmd!r}: set, clear, cut, partition, stats, quit"})
        except (ValueError, IndexError) as e:
            say({"error": str(e)})
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
