"""Replication through a faulty network: a primary and replicas connected through
tests/relay.py, which drops, duplicates, reorders, delays, truncates and
bit-flips NNG messages on both the PUB and the catch-up channel, and cuts or
partitions the link, while a workload commits on the primary.

What must hold: no bad frame is ever applied (stock sqlite3 readers check an
invariant and integrity_check on the replica all along, and the end is
byte-identical to the primary), the replica's status shows the trouble while it
lasts and never says `streaming` while nothing arrives, and the replica
converges once the faults stop.

Environment (`make netfaults` sets longer values):
- WALCAST_NETFAULTS_SECONDS: how long the loss-and-corruption phase lasts at
  least (default 15); it goes on until damaged messages reached both replicas.
- WALCAST_NETFAULTS_RATES: the faults of the issue's scenario, on both channels
  (default: 10% loss, 0.1% corruption, and some of the rest).
- WALCAST_NETFAULTS_HEAVY: heavier faults for a second replica's PUB channel.
- WALCAST_NETFAULTS_CUTS: how many link cuts and how many partitions (default 1
  each); WALCAST_NETFAULTS_CUT_SECONDS: how long each lasts (default 7: the
  replica says `disconnected` after 3 s of silence, or 5 s when a catch-up
  request was waiting for its reply).
- WALCAST_NETFAULTS_CUT_EVERY: during the loss-and-corruption phase, also cut
  the issue replica's link every so many seconds (default 0: never).
- WALCAST_NETFAULTS_SEED: the relays' seed (default 1).
"""
import json
import os
import threading
import time

import pytest

import wc
from relay import Relay, parse_faults
from test_keys import KEY
from test_replica import (INVARIANT_SETUP, T_SCHEMA, PlainReader, cluster, commit_many, finish,  # noqa: F401
                          invariant_writer, run_workload, tcp)

SECONDS = float(os.environ.get("WALCAST_NETFAULTS_SECONDS", "15"))
RATES = parse_faults(os.environ.get(
    "WALCAST_NETFAULTS_RATES", "drop=0.1,corrupt=0.001,dup=0.02,reorder=0.02,delay=0.02,truncate=0.002"))
HEAVY = parse_faults(os.environ.get(
    "WALCAST_NETFAULTS_HEAVY", "drop=0.3,dup=0.2,reorder=0.2,corrupt=0.05,truncate=0.01,delay=0.05"))
CUTS = int(os.environ.get("WALCAST_NETFAULTS_CUTS", "1"))
CUT_SECONDS = float(os.environ.get("WALCAST_NETFAULTS_CUT_SECONDS", "7"))
CUT_EVERY = float(os.environ.get("WALCAST_NETFAULTS_CUT_EVERY", "0"))
SEED = int(os.environ.get("WALCAST_NETFAULTS_SEED", "1"))

# The replica reports `disconnected` after this much silence (replica.rs).
SILENCE_S = 3.0
# What the replica says when a message or a catch-up reply was damaged.
DAMAGE_WORDS = ("checksum mismatch", "too short", "damaged", "bad catch-up reply", "bad snapshot reply",
                "chain broken", "does not match the message length")


class StatusMonitor:
    """Samples a replica node's own status (its applier's, live) every 50 ms
    from a thread. While it runs, nothing else may talk to the node."""

    def __init__(self, node, every=0.05):
        self.node, self.every = node, every
        self.samples = []  # (monotonic time, status)
        self.error = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                st = self.node.status()
            except Exception as e:  # the node died: the test reports it
                self.error = e
                return
            with self._lock:
                self.samples.append((time.monotonic(), st))
            self._stop.wait(self.every)

    def latest(self):
        with self._lock:
            return self.samples[-1][1] if self.samples else {}

    def between(self, t0, t1=float("inf")):
        with self._lock:
            return [(t, s) for t, s in self.samples if t0 <= t <= t1]

    def wait(self, cond, timeout, what):
        def ok():
            assert self.error is None, f"the replica node failed: {self.error}"
            st = self.latest()
            return st if st and cond(st) else None
        return wc.wait_for(ok, timeout=timeout, what=lambda: f"{what}; last status: {json.dumps(self.latest())}\n"
                                                    f"{self.node.stderr(2000)}")

    def stop(self):
        self._stop.set()
        self._t.join(timeout=30)
        assert self.error is None, f"the replica node failed: {self.error}"


class Writer:
    """Commits on the primary from Debian python3 processes, batch after batch,
    until stopped: `batch` invariant transactions (tests/test_replica.py), then a
    pause of `pause` s (a paced load, so that the replica streams live between
    faults rather than catching up all the time), and with `randomized` also the
    randomized workload (VACUUM, schema changes, big spilling transactions,
    checkpoints) and updates of bigger rows."""

    def __init__(self, primary, seed, batch=100, pause=0.3, randomized=False):
        self.primary, self.seed, self.batch, self.pause, self.randomized = primary, seed, batch, pause, randomized
        self.batches, self.error = 0, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        i = 0
        try:
            while not self._stop.is_set():
                s = self.seed * 1000 + i
                finish(invariant_writer(self.primary, self.batch, seed=s))
                if self.randomized and i % 2 == 1:
                    run_workload(self.primary, "--seed", str(s), "--ops", "30")
                    commit_many(self.primary, 30, stmt="UPDATE t SET v = randomblob(700) WHERE id = "
                                                      "(SELECT id FROM t ORDER BY random() LIMIT 1)")
                i += 1
                self.batches = i
                self._stop.wait(self.pause)  # pacing the load, not synchronization
        except Exception as e:  # the test reports it
            self.error = e

    def stop(self):
        self._stop.set()
        self._t.join(timeout=600)
        assert self.error is None, f"the writer failed: {self.error}"


def through_relay(cluster, primary_port, name, db, **rates):
    """A relay in front of the primary's two ports and a replica node that dials it."""
    rport = wc.free_port_pair()
    relay = Relay(rport, primary_port, seed=SEED + len(cluster.nodes)).start()
    relay.set_rates(**rates)
    cluster.relays = getattr(cluster, "relays", []) + [relay]
    node = cluster.replica(db, endpoint=tcp(rport), name=name)
    return relay, node


@pytest.fixture
def relays_closed(cluster):
    yield
    for r in getattr(cluster, "relays", []):
        r.close()


def show(counters):
    keys = ("seen", "dropped", "partitioned", "duplicated", "reordered", "delayed", "truncated", "corrupted")
    return {k: {n: v[n] for n in keys if v[n]} for k, v in counters.items() if k != "events"} | \
        {"events": counters["events"]}


def lying_samples(samples):
    """Samples that say `streaming` although nothing arrived for longer than the
    replica's own silence limit (plus the 100 ms it takes to notice)."""
    return [s for _, s in samples if s.get("state") == "streaming"
            and (s.get("ms_since_last_message") or 0) > SILENCE_S * 1000 + 600]


# --- (a) + (c): loss and corruption ------------------------------------------------

def test_loss_and_corruption_never_apply_a_bad_frame(cluster, relays_closed, tmp_path):
    """Two replicas through two relays: one with the issue's faults (10% loss,
    0.1% corruption, and some duplication, reordering, delay and truncation) on
    both channels, the other with heavy faults on its live (PUB) channel only, so
    that most damage meets the live path's verification rather than being lost
    in catch-up. A paced workload runs on the primary for at least
    WALCAST_NETFAULTS_SECONDS; stock sqlite3 readers check the invariant and
    integrity_check on both replicas all along. Then the faults stop: both
    converge byte-identical, with integrity_check ok."""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary = os.path.join(tmp, "primary.db")
    dbs = {"issue": os.path.join(tmp, "replica-issue.db"), "heavy": os.path.join(tmp, "replica-heavy.db")}
    cluster.primary(primary, port, setup=INVARIANT_SETUP + T_SCHEMA)
    commit_many(primary, 5, per_txn=20)
    relays, nodes = {}, {}
    # The heavy replica joins on a clean link; the joins through its
    # faults (its snapshot and catch-up go through them).
    relays["heavy"], nodes["heavy"] = through_relay(cluster, port, "replica-heavy", dbs["heavy"])
    relays["issue"], nodes["issue"] = through_relay(cluster, port, "replica-issue", dbs["issue"], **RATES)
    for db in dbs.values():
        cluster.converge(primary, db)

    readers = {k: PlainReader(db) for k, db in dbs.items()}
    monitors = {k: StatusMonitor(n) for k, n in nodes.items()}
    before = {k: m.wait(lambda s: s.get("state") == "streaming", 30, f"{k} streaming") for k, m in monitors.items()}
    relays["heavy"].set_rates("pub", **HEAVY)
    t0 = time.monotonic()
    writer = Writer(primary, SEED, randomized=True)

    def damage_reached(k):
        c = relays[k].counters()
        return sum(c[f"{ch}/down"]["corrupted"] + c[f"{ch}/down"]["truncated"] for ch in ("pub", "catchup"))

    next_cut = [t0 + CUT_EVERY if CUT_EVERY else float("inf")]

    def fault_phase_over():
        now = time.monotonic()
        if now >= next_cut[0]:  # with WALCAST_NETFAULTS_CUT_EVERY, cuts on top of the rates
            relays["issue"].cut(CUT_SECONDS)
            next_cut[0] = now + CUT_EVERY
        # At least SECONDS, and until damaged messages reached both replicas:
        # 0.1% of the few dozen messages a second this load sends is one every ~10 s.
        return (now - t0 >= SECONDS and damage_reached("issue") >= 1 and damage_reached("heavy") >= 3
                and writer.batches >= 1)

    try:
        wc.wait_for(fault_phase_over, timeout=SECONDS + 120,
                    what=lambda: f"damaged messages delivered: {[relays[k].counters()['total'] for k in relays]}")
        during = {k: m.latest() for k, m in monitors.items()}
    finally:
        writer.stop()
        t_faults_end = time.monotonic()
        for r in relays.values():
            r.clear()
    t_clean = time.monotonic()
    for k, db in dbs.items():
        cluster.converge(primary, db, timeout=120)
    converged_s = time.monotonic() - t_clean
    for m in monitors.values():
        m.stop()
    reads = {k: r.stop_and_check() for k, r in readers.items()}
    for db in dbs.values():
        cluster.identical(primary, db)

    print(f"faults for {t_faults_end - t0:.1f} s, {writer.batches} writer batches, primary at frame_no "
          f"{wc.frame_no(primary)}; both converged {converged_s:.1f} s after the faults stopped; "
          f"stock sqlite3 readers (reads, states): {reads}")
    for k in relays:
        c = relays[k].counters()
        samples = monitors[k].between(t0, t_faults_end)
        errors = sorted({s.get("last_error") for _, s in samples if s.get("last_error")})
        st = nodes[k].status()
        print(f"[{k}] relay: {json.dumps(show(c))}")
        print(f"[{k}] status during: {json.dumps(during[k])}")
        up_to_date = sum(1 for _, s in samples if s["state"] == "streaming" and s["lag_frames"] == 0)
        print(f"[{k}] states seen: {sorted({s['state'] for _, s in samples})}; up to date in "
              f"{100 * up_to_date / max(1, len(samples)):.0f}% of {len(samples)} samples; max lag "
              f"{max(s['lag_frames'] for _, s in samples)} frames, {max(s['lag_ms'] for _, s in samples)} ms; "
              f"distinct errors: {len(errors)}, e.g. {errors[:6]}")
        print(f"[{k}] status after: {json.dumps(st)}")
        with open(nodes[k].stderr_path, errors="replace") as f:
            damage_logged = sum(1 for line in f if any(w in line for w in DAMAGE_WORDS))
        print(f"[{k}] rejected_messages {st['rejected_messages']}, catch_ups {st['catch_ups']}, "
              f"last_rejection {st.get('last_rejection')!r}, {damage_logged} damage errors in stderr")
    for k in relays:  # every figure is printed before any assertion
        c = relays[k].counters()
        samples = monitors[k].between(t0, t_faults_end)
        errors = sorted({s.get("last_error") for _, s in samples if s.get("last_error")})
        st = settled_status(nodes[k])
        # Damage was injected and reached the replica...
        assert damage_reached(k) >= (1 if k == "issue" else 3), c
        assert c["total"]["dropped"] > 0 and c["total"]["duplicated"] > 0 and c["total"]["reordered"] > 0, c
        if c["events"]["cuts"] == 0:
            # One connection per channel all along: truncated messages had their
            # length prefix rewritten, so NNG never saw a broken stream.
            assert c["events"]["connections"] == 2, c
        # ... and the replica said so while it lasted.
        assert st["catch_ups"] > before[k]["catch_ups"], (before[k], st)
        assert any(s["state"] != "streaming" or s.get("lag_frames", 0) > 0 for _, s in samples), \
            f"[{k}] the status never showed trouble"
        if k == "heavy":  # the faults are mostly losses, which are not errors
            assert st["rejected_messages"] > before[k]["rejected_messages"], (before[k], st)
            # last_error lasts only until the catch-up that repairs the damage
            # succeeds (milliseconds here); last_rejection stays.
            assert any(w in (st.get("last_rejection") or "") for w in DAMAGE_WORDS), \
                f"[{k}] the status does not name the damaged messages: {st}"
        assert not lying_samples(monitors[k].samples), lying_samples(monitors[k].samples)[:3]
        # Converged: streaming, nothing behind, and the error cleared.
        assert st["state"] == "streaming" and st["lag_frames"] == 0, st


# --- (b): link cuts and partitions --------------------------------------------------

def test_link_cuts_show_disconnected_and_converge(cluster, relays_closed, tmp_path):
    """A workload runs while the link is cut (every connection closed, new ones
    refused) and partitioned (connections up, nothing passes) for
    WALCAST_NETFAULTS_CUT_SECONDS at a time: the replica's status says
    `disconnected` during each (and never `streaming` once SILENCE has passed),
    another process's view of the status agrees, and the replica catches up after
    each, ending byte-identical with consistent reads all along."""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port, setup=INVARIANT_SETUP)
    relay, node = through_relay(cluster, port, "replica", replica)
    cluster.converge(primary, replica)
    reader = PlainReader(replica)
    mon = StatusMonitor(node)
    writer = Writer(primary, SEED + 7)
    figures = []
    try:
        for i, kind in enumerate(["cut", "partition"] * CUTS):
            start = mon.latest().get("applied_frame_no", 0)
            mon.wait(lambda s: s["state"] == "streaming" and s["applied_frame_no"] > start, 60,
                     f"{kind} {i}: the replica streaming the workload before the fault")
            t_cut = time.monotonic()
            getattr(relay, kind)(CUT_SECONDS)
            down = mon.wait(lambda s: s["state"] == "disconnected", CUT_SECONDS, f"{kind} {i}: 'disconnected'")
            t_down = time.monotonic()
            # Another process reads the applier's status file (or finds it stale).
            elsewhere = wc.wait_for_status(lambda: wc.status(replica), lambda s: s["state"] == "disconnected",
                                           timeout=CUT_SECONDS, what=f"{kind} {i}: 'disconnected' in another process")
            assert relay.cutting() or relay.partitioned(), f"{kind} {i}: seen elsewhere only after the fault ended"
            wc.wait_for(lambda: not (relay.cutting() or relay.partitioned()), timeout=CUT_SECONDS + 1,
                        what="the fault's end")
            t_end = time.monotonic()
            during = mon.between(t_down, t_end)
            back = mon.wait(lambda s: s["state"] == "streaming" and s["applied_frame_no"] > down["applied_frame_no"],
                            60, f"{kind} {i}: streaming and applying again")
            t_back = time.monotonic()
            assert not [s for _, s in during if s["state"] == "streaming"], \
                f"{kind} {i}: 'streaming' while the link was down: {[s for _, s in during if s['state'] == 'streaming'][:2]}"
            late = mon.between(t_cut + SILENCE_S + 0.5, t_end)
            assert not [s for _, s in late if s["state"] == "streaming"], late[:2]
            assert "primary" in (down.get("last_error") or "") or "catch-up" in (down.get("last_error") or ""), down
            figures.append(f"{kind} {i}: disconnected after {t_down - t_cut:.1f} s ({down['last_error']}), "
                           f"other process: {elsewhere['last_error']!r}, streaming again {t_back - t_end:.1f} s after the end "
                           f"(catch_ups {back['catch_ups']})")
    finally:
        writer.stop()
    cluster.converge(primary, replica, timeout=60)
    mon.stop()
    checks, states = reader.stop_and_check()
    cluster.identical(primary, replica)
    c = relay.counters()
    print("\n".join(figures))
    print(f"relay: {json.dumps(show(c))}; stock sqlite3: {checks} reads, {states} states")
    assert not lying_samples(mon.samples), lying_samples(mon.samples)[:3]
    assert c["events"]["cuts"] == CUTS and c["events"]["partitions"] == CUTS, c
    assert c["total"]["partitioned"] > 0, c


def test_a_long_catch_up_keeps_the_status_fresh_for_other_processes(cluster, relays_closed, tmp_path):
    """A catch-up on a slow link lasts longer than a status may go unwritten
    (3 s): other processes must see the replica catching up, never "no process
    has applied to this replica" (its status file was written only once a
    catch-up ended: a 4.5 GB backlog through a lossy link showed a live,
    catching-up replica as abandoned for minutes)."""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    relay, node = through_relay(cluster, port, "replica", replica)
    cluster.converge(primary, replica)
    wc.wait_for(lambda: wc.status(replica)["state"] == "streaming", timeout=10, what="streaming")
    # The replica misses about 24 MB while the link is cut: a catch-up of some
    # 24 requests, each delayed up to 300 ms both ways once the link is back.
    relay.set_rates("catchup", delay=1.0, delay_ms=300)
    relay.cut(4)
    commit_many(primary, 24, stmt="INSERT INTO t(k, v) VALUES (1, randomblob(1000000))")
    target = wc.frame_no(primary)
    assert relay.cutting(), "the backlog took longer to commit than the cut lasted"
    wc.wait_for(lambda: not relay.cutting(), timeout=10, what="the cut's end")
    seen, t0 = [], time.monotonic()
    while True:
        st = wc.status(replica)
        seen.append((round(time.monotonic() - t0, 1), st["state"], st["applied_frame_no"], st.get("last_error")))
        assert "no process has applied" not in (st.get("last_error") or ""), seen
        if st["applied_frame_no"] >= target:
            break
        assert time.monotonic() - t0 < 120, f"no catch-up in 120 s: {seen[-3:]}"
        time.sleep(0.25)
    relay.clear()
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)
    catching = [x for x in seen if x[1] == "catching_up"]
    print(f"caught up in {seen[-1][0]} s; samples: {len(seen)}, catching_up in {len(catching)}")
    assert seen[-1][0] > 4, f"the catch-up took {seen[-1][0]} s, too short to test anything: {seen}"


# --- a snapshot through damage ------------------------------------------------------

@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
def test_snapshot_through_damaged_replies_completes_once(cluster, relays_closed, tmp_path, keyed):
    """A new replica bootstraps a 40 MB database while 5% of its catch-up
    messages (requests and replies) are damaged: each damaged one is asked for
    again, so the snapshot completes in one go. With a shared key a damaged
    message fails authentication instead of its CRC, and is asked for again
    the same way. (When a damaged message
    abandoned the snapshot, an attempt over these ~44 round trips succeeded
    with probability 0.95^88, about 1%, and the next restarted from page 1.)"""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    key = f"PRAGMA walcast_key = '{KEY}';" if keyed else ""
    cluster.primary(primary, port, setup=key + T_SCHEMA)
    commit_many(primary, 40, stmt="INSERT INTO t(k, v) VALUES (1, randomblob(1000000))")
    n = wc.frame_no(primary)
    if keyed:
        wc.shell(key, db=replica)
    relay, node = through_relay(cluster, port, "replica", replica)
    relay.set_rates("catchup", corrupt=0.04, truncate=0.01)
    assert node.rows(f"SELECT walcast_wait({n}, 120000)", timeout=180) == [[1]], cluster.diag(replica)
    st = node.status()
    c = relay.counters()
    damaged = c["catchup/down"]["corrupted"] + c["catchup/down"]["truncated"]
    with open(node.stderr_path, errors="replace") as f:
        log = f.read()
    print(f"relay: {json.dumps(show(c))}; status: {json.dumps(st)}")
    assert damaged + c["catchup/up"]["corrupted"] + c["catchup/up"]["truncated"] > 0, c
    assert log.count("bootstrapping from a snapshot") == 1 and st["bootstraps"] == 1, f"{st}\n{log[-3000:]}"
    assert "asking again" in log, log[-3000:]
    relay.clear()
    commit_many(primary, 10)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


def settled_status(node, timeout=30):
    """The node's status once it streams with nothing behind. A message the
    fault proxy held back (reordered) can still arrive after the faults stop:
    a stale heartbeat makes the replica ask the catch-up server for a moment
    (state catching_up), then it streams again. One that never settles fails."""
    return wc.wait_for_status(node.status, lambda s: s["state"] == "streaming" and s["lag_frames"] == 0,
                              timeout=timeout, what=lambda: f"{node.name} streaming with nothing behind: {node.status()}")


# --- relays: a faulty link above a walcast relay --------------------------------------

def test_faults_above_a_walcast_relay_never_reach_its_replicas(cluster, relays_closed, tmp_path):
    """primary -> (heavy faults on the live channel) -> a replica that relays
    (`PRAGMA walcast_relay`) -> its replica. The relay passes on only messages
    that open and decode, so the damage stops there (its rejected_messages
    grow, its replica's stay 0); losses, duplicates and reordering pass
    through, and the replica below repairs them by catch-up through the relay.
    Stock sqlite3 readers check the invariant on the replica below all along;
    after the faults stop, both converge byte-identical."""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary, hop, below = (os.path.join(tmp, n) for n in ("primary.db", "hop.db", "below.db"))
    cluster.primary(primary, port, setup=INVARIANT_SETUP + T_SCHEMA)
    commit_many(primary, 5, per_txn=20)
    faults, hop_node = through_relay(cluster, port, "hop", hop)
    relay_port = wc.free_port_pair()
    assert hop_node.rows(f"PRAGMA walcast_relay = '{tcp(relay_port)}'") == [[tcp(relay_port)]]
    below_node = cluster.replica(below, relay_port, name="below")
    for db in (hop, below):
        cluster.converge(primary, db)
    before = {"hop": hop_node.status(), "below": below_node.status()}
    reader = PlainReader(below)
    faults.set_rates("pub", **HEAVY)
    t0 = time.monotonic()
    writer = Writer(primary, SEED)

    def damage_reached_hop():
        c = faults.counters()["pub/down"]
        return c["corrupted"] + c["truncated"]
    try:
        wc.wait_for(lambda: time.monotonic() - t0 >= min(SECONDS, 8) and damage_reached_hop() >= 3
                    and writer.batches >= 1, timeout=SECONDS + 120, what=lambda: f"damage: {faults.counters()['total']}")
    finally:
        writer.stop()
        faults.clear()
    for db in (hop, below):
        cluster.converge(primary, db, timeout=120)
    reads = reader.stop_and_check()
    after = {"hop": settled_status(hop_node), "below": settled_status(below_node)}
    print(f"faults: {json.dumps(show(faults.counters()))}; reads below: {reads}")
    for k in after:
        print(f"[{k}] before: rejected {before[k]['rejected_messages']}, catch_ups {before[k]['catch_ups']}; "
              f"after: {json.dumps(after[k])}")
    assert after["hop"]["rejected_messages"] > before["hop"]["rejected_messages"], after["hop"]
    assert after["below"]["rejected_messages"] == before["below"]["rejected_messages"], after["below"]
    assert after["below"]["catch_ups"] > before["below"]["catch_ups"], after["below"]
    assert after["below"]["state"] == "streaming" and after["below"]["lag_frames"] == 0, after["below"]
    cluster.identical(primary, below)
    cluster.identical(primary, hop)
