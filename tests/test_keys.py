"""The shared key (`PRAGMA walcast_key`), end to end, as real processes.

- With the same key on both sides, replication works, byte-identical, and the
  key is never shown: not by the pragma, the status, stderr or any file but
  its own key file (mode 0600).
- A replica with no key, with another key, or with a key its primary lacks
  applies nothing and its status names the cause; with the right key it
  converges.
- On the wire (tests/relay.py's tap): no page content is readable; a forged
  frame with a correct CRC and checksum chain is applied by a replica without a
  key (the threat) and refused by one with a key; a recorded catch-up reply
  replayed as the answer to a later request is refused.
"""
import os
import stat

import pytest

import wc
from test_replica import T_SCHEMA, cluster, commit_many, summary, tcp  # noqa: F401 (fixture)

KEY = "5f1e0d2c3b4a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
OTHER_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def keyed_primary(cluster, db, port, key=KEY):
    wc.shell(f"{T_SCHEMA} PRAGMA walcast_key = '{key}'; PRAGMA walcast_endpoint = '{tcp(port)}'; "
             "PRAGMA walcast_role = 'primary';", db=db)
    return cluster.node(db, name="primary")


def keyed_replica(cluster, db, port, key=KEY, name="replica"):
    if key:
        wc.shell(f"PRAGMA walcast_key = '{key}';", db=db)
    return cluster.replica(db, port, name=name)


def refusing(node, words, what):
    return wc.wait_for(lambda: (s := node.status())["state"] in ("error", "catching_up")
                       and all(w in (s["last_error"] or "") for w in words) and s,
                       timeout=20, what=what)


def test_same_key_replicates_and_the_key_is_never_shown(cluster, tmp_path):
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    pn = keyed_primary(cluster, p_db, port)
    rn = keyed_replica(cluster, r_db, port)
    commit_many(p_db, 30, per_txn=3)
    cluster.converge(p_db, r_db)
    cluster.identical(p_db, r_db)

    pst, rst = wc.status(p_db), rn.status()
    assert pst["encryption"] == rst["encryption"] == "xchacha20poly1305", (pst, rst)
    assert pst["key_fingerprint"] == rst["key_fingerprint"] and len(pst["key_fingerprint"]) == 16
    shown = wc.shell("PRAGMA walcast_key;", db=r_db).stdout.strip()
    assert shown == f"on (fingerprint {rst['key_fingerprint']})", shown
    # Never shown anywhere: not a 6-hex-digit piece of it.
    pieces = {KEY[i:i + 6] for i in range(0, len(KEY) - 6)}
    texts = [str(pst), str(rst), shown, pn.stderr(100000), rn.stderr(100000)]
    for f in os.listdir(tmp):
        path = os.path.join(tmp, f)
        if os.path.isfile(path) and not f.endswith("-walcast-key") and os.path.getsize(path) < 1 << 20:
            texts.append(open(path, "rb").read().decode("latin-1"))
    for t in texts:
        assert not any(p in t for p in pieces), "the key leaked"
    for db in (p_db, r_db):
        mode = stat.S_IMODE(os.stat(db + "-walcast-key").st_mode)
        assert mode == 0o600, oct(mode)
        assert open(db + "-walcast-key").read().strip() == KEY

    # A malformed key is refused without echoing it, and changes nothing.
    p = wc.shell("PRAGMA walcast_key = 'abc123abc123';", db=p_db, check=False)
    assert p.returncode != 0 and "64 hex digits" in p.stderr and "abc123" not in p.stderr, p.stderr
    assert open(p_db + "-walcast-key").read().strip() == KEY
    commit_many(p_db, 3)
    cluster.converge(p_db, r_db)


@pytest.mark.parametrize("case", ["replica_without_key", "replica_with_another_key", "primary_without_key"])
def test_key_mismatch_applies_nothing_and_says_why(cluster, tmp_path, case):
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    if case == "primary_without_key":
        cluster.primary(p_db, port)
    else:
        keyed_primary(cluster, p_db, port)
    commit_many(p_db, 10)
    rkey = {"replica_without_key": None, "replica_with_another_key": OTHER_KEY, "primary_without_key": KEY}[case]
    rn = keyed_replica(cluster, r_db, port, key=rkey)
    words = {
        "replica_without_key": ["requires its walcast_key"],
        "replica_with_another_key": ["walcast_key"],
        "primary_without_key": ["unauthenticated"],
    }[case]
    st = refusing(rn, words, f"the replica refusing ({case})\n{cluster.diag(r_db)}")
    assert st["applied_frame_no"] == 0 and st["bootstraps"] == 0, st
    assert wc.shell("SELECT count(*) FROM sqlite_master;", load=False, db=r_db).stdout.strip() == "0"
    # The live stream is refused too, with its own words.
    commit_many(p_db, 3)
    st = rn.status()
    assert st["applied_frame_no"] == 0 and st["bootstraps"] == 0, st

    # The right key, set in another process: the applier picks it up.
    fix = f"PRAGMA walcast_key = '{KEY}';" if case != "primary_without_key" else "PRAGMA walcast_key = 'off';"
    wc.shell(fix, db=r_db)
    cluster.converge(p_db, r_db)
    cluster.identical(p_db, r_db)


# --- on the wire ----------------------------------------------------------------------

def crc64_xz(data, _table=[]):
    """CRC-64/XZ (the checksum of wire.rs and frame.rs), for forging messages."""
    if not _table:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xC96C5795D7870F42 if c & 1 else c >> 1
            _table.append(c)
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c = _table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFFFFFFFFF


def forged_frames_message(st, page_no, page):
    """A FRAMES message an attacker without the key can build: the replica's next
    frame, chained from its checksum (shown in its status), with a valid CRC."""
    import struct
    frame_no = st["applied_frame_no"] + 1
    prev = int(st["checksum"], 16)
    size_after = st.get("db_pages_hint", 0)
    checksum = crc64_xz(struct.pack("<QQII", prev, frame_no, page_no, size_after) + page)
    header = b"WCM1" + bytes([1, 0, 0, 0]) + bytes.fromhex(st["db_id"]) + struct.pack("<Q", st["generation"])
    body = struct.pack("<QII", frame_no, len(page), 1) + struct.pack("<QIIQ", frame_no, page_no, size_after, checksum) + page
    msg = header + body
    return msg + struct.pack("<Q", crc64_xz(msg)), frame_no


class Tap:
    """Watches and rewrites what the relay carries (see Relay's tap)."""

    def __init__(self):
        import threading
        self.lock = threading.Lock()
        self.seen = []          # (channel, direction, message)
        self.forge_live = None  # a message to send instead of the next live one; then drop the live stream
        self.hold_live = False
        self.replay_reply = None  # a recorded reply payload to answer every catch-up request with

    def __call__(self, channel, direction, msg):
        with self.lock:
            self.seen.append((channel, direction, msg))
            if channel == "pub" and direction == "down":
                if self.forge_live is not None:
                    m, self.forge_live, self.hold_live = self.forge_live, None, True
                    return [m]
                if self.hold_live:
                    return []
            if channel == "catchup" and direction == "down" and self.replay_reply is not None:
                return [msg[:4] + self.replay_reply]  # NNG's request id, then the old reply
            return [msg]


def pair_through_relay(cluster, tmp, name, key, tap):
    from relay import Relay
    p_db, r_db = os.path.join(tmp, f"{name}-p.db"), os.path.join(tmp, f"{name}-r.db")
    port, rport = wc.free_port_pair(), wc.free_port_pair()
    if key:
        keyed_primary(cluster, p_db, port)
    else:
        cluster.primary(p_db, port)
    relay = Relay(listen_port=rport, target_port=port, tap=tap).start()
    rn = keyed_replica(cluster, r_db, rport, key=key, name=f"{name}-replica")
    return p_db, r_db, rn, relay


@pytest.mark.parametrize("keyed", [False, True], ids=["without_key", "with_key"])
def test_on_the_wire(cluster, tmp_path, keyed):
    tmp = str(tmp_path)
    tap = Tap()
    p_db, r_db, rn, relay = pair_through_relay(cluster, tmp, "w", KEY if keyed else None, tap)
    try:
        secret = b"WALCAST-SECRET-" * 40
        wc.py(f"""
import wc
c = wc.connect({p_db!r})
for i in range(20):
    c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (i, {secret!r}))
""")
        cluster.converge(p_db, r_db)
        cluster.identical(p_db, r_db)
        carried = b"".join(m for _, _, m in tap.seen)
        assert len(carried) > 20 * len(secret), "the tap saw the traffic"
        # Readable without a key (the threat), not with one.
        assert (b"WALCAST-SECRET-" in carried) == (not keyed)

        # A forged frame: the replica's next frame_no, chained from its last
        # checksum, a valid CRC; its page is one of the replica's own pages with
        # the secret text replaced.
        st = rn.status()
        with open(r_db, "rb") as f:
            data = f.read()
        page_size = st["page_size"]
        page_no = next(i + 1 for i in range(len(data) // page_size) if b"WALCAST-SECRET-" in data[i * page_size:(i + 1) * page_size])
        page = data[(page_no - 1) * page_size:page_no * page_size].replace(b"WALCAST-SECRET-", b"FORGED-BY-MITM!", 1)
        st["db_pages_hint"] = len(data) // page_size
        forged, frame_no = forged_frames_message(st, page_no, page)
        rejected = st["rejected_messages"]
        tap.forge_live = forged
        forged_rows = "SELECT count(*) FROM t WHERE instr(v, 'FORGED-BY-MITM!') > 0;"
        if not keyed:
            # Applied: nothing but the key tells a forged frame from a real one.
            wc.wait_for(lambda: rn.status()["applied_frame_no"] == frame_no, timeout=10,
                        what=lambda: f"the forged frame applied without a key\n{cluster.diag(r_db)}")
            assert wc.shell(forged_rows, load=False, db=r_db).stdout.strip() == "1"
        else:
            s2 = wc.wait_for(lambda: (s := rn.status())["rejected_messages"] > rejected and s, timeout=10,
                             what=lambda: f"the forged frame refused\n{cluster.diag(r_db)}")
            assert "unauthenticated" in (s2["last_rejection"] or ""), s2
            assert s2["applied_frame_no"] == st["applied_frame_no"], s2
            assert wc.shell(forged_rows, load=False, db=r_db).stdout.strip() == "0"

            # A recorded catch-up reply (from the bootstrap) replayed as the
            # answer to every later request: refused as not answering it.
            old = next(m for ch, d, m in tap.seen if ch == "catchup" and d == "down")
            commit_many(p_db, 2)  # held back from the live stream: the replica must ask
            with tap.lock:
                tap.replay_reply = old[4:]
                tap.forge_live = forged  # refused again, which sends the replica asking
            s3 = wc.wait_for(lambda: (s := rn.status())["state"] == "error"
                             and "failed authentication" in (s["last_error"] or "") and s, timeout=20,
                             what=lambda: f"the replayed reply refused\n{cluster.diag(r_db)}")
            assert "replayed" in s3["last_error"] and s3["applied_frame_no"] == st["applied_frame_no"], s3
        # The attack ends; the replica converges on the primary's history.
        with tap.lock:
            tap.forge_live, tap.hold_live, tap.replay_reply = None, False, None
        commit_many(p_db, 3)
        cluster.converge(p_db, r_db)
        cluster.identical(p_db, r_db)
        assert wc.shell(forged_rows, load=False, db=r_db).stdout.strip() == "0"
    finally:
        relay.close()


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_oversized_messages_are_dropped_before_they_are_allocated(cluster, tmp_path):
    """A peer that sends 64 MiB messages (the limit is 4 MiB + the envelope) on
    both sockets: NNG drops each connection before allocating the message, the
    replica's peak memory does not grow by the message size, and it converges."""
    tmp = str(tmp_path)
    big = bytes(64 << 20)

    class Flood:
        armed = 0
        lock = __import__("threading").Lock()

        def __call__(self, channel, direction, msg):
            with self.lock:
                if direction == "down" and self.armed > 0:
                    self.armed -= 1
                    return [msg[:4] + big if channel == "catchup" else big]
            return [msg]

    flood = Flood()
    p_db, r_db, rn, relay = pair_through_relay(cluster, tmp, "o", None, flood)
    try:
        commit_many(p_db, 10)
        cluster.converge(p_db, r_db)
        before = peak_rss_mb(rn.p.pid)
        connections = relay.counters()["events"]["connections"]
        with flood.lock:
            flood.armed = 6
        commit_many(p_db, 10)  # live messages to replace, and catch-up replies once they are lost
        wc.wait_for(lambda: flood.armed == 0 or commit_many(p_db, 1), timeout=60, what="six oversized messages sent")
        commit_many(p_db, 3)
        cluster.converge(p_db, r_db)
        cluster.identical(p_db, r_db)
        grew = peak_rss_mb(rn.p.pid) - before
        print(f"replica peak RSS grew by {grew:.1f} MB after six 64 MiB messages; relay: {relay.counters()}")
        assert grew < 32, f"the replica's peak RSS grew by {grew:.1f} MB"
        assert relay.counters()["events"]["connections"] > connections, "the oversized messages ended connections"
    finally:
        relay.close()
