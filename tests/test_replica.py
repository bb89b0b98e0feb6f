"""Replicas, end to end, as real processes.

A primary is published, and a replica applied, only while some process with
walcast loaded keeps the database open: each test starts long-lived nodes
(tests/replica_node.py) for that, writes to the primary from other processes
(Debian's python3 with walcast, the stock sqlite3 shell with .load), and reads the
replica from processes with and without walcast, and from a second SQLite (apsw,
which bundles its own). "Converged" always means: `walcast_wait(walcast_frame_no()
of the primary)` returns 1 on the replica; "identical" means both files are
byte-identical after `PRAGMA wal_checkpoint(TRUNCATE)` on each (the replica's from
a stock sqlite3 shell without walcast) and the replica passes integrity_check.

Environment:
- WALCAST_REPLICA_BIG_MB: size of the big-transaction test (default 1100, over
  1 GiB; set smaller for a quick run).
- WALCAST_APSW_VENV: where the apsw virtualenv is kept (default
  /tmp/walcast-apsw-venv, created on first use with `pip install apsw`).
"""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import wc

NODE = os.path.join(wc.HERE, "replica_node.py")
BIG_MB = int(os.environ.get("WALCAST_REPLICA_BIG_MB", "1100"))
APSW_VENV = os.environ.get("WALCAST_APSW_VENV", "/tmp/walcast-apsw-venv")
SYSTEM_SQLITE = "3.40.1"

T_SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB);"


def tcp(port):
    return f"tcp://127.0.0.1:{port}"


# --- processes ---------------------------------------------------------------

class Node(wc.LineProcess):
    """One replica_node.py process: keeps a database open, answers SQL on stdin."""

    def __init__(self, db, *args, name="node", env=None, logdir=None):
        self.db = db
        logdir = logdir or os.path.dirname(os.path.abspath(db))
        super().__init__([wc.PYTHON, NODE, db, *args], name, logdir, env=env)

    def sql(self, stmt, timeout=60):
        """Runs one statement in the node; {"rows": [...]} or {"error": ...}."""
        self.send_line(stmt)
        return json.loads(self.line(timeout))

    def rows(self, stmt, timeout=60):
        r = self.sql(stmt, timeout)
        assert "error" not in r, f"{self.name}: {stmt}: {r}\n{self.stderr()}"
        return r["rows"]

    def status(self):
        return json.loads(self.rows("PRAGMA walcast_status")[0][0])


class Cluster:
    """The nodes of one test; all are killed at teardown."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.nodes = []

    def node(self, db, *args, name="node", env=None):
        n = Node(db, *args, name=name, env=env, logdir=self.tmp)
        self.nodes.append(n)
        return n

    def primary(self, db, port=None, setup=T_SCHEMA, role_first=False, name="primary"):
        """Makes db a primary listening on tcp port (or the default endpoint with
        port=None) from a stock shell, then starts the node that keeps it open
        (and so publishes) without any pragma: the role and endpoint persist."""
        ep = [] if port is None else [f"PRAGMA walcast_endpoint = '{tcp(port)}';"]
        role = ["PRAGMA walcast_role = 'primary';"]
        steps = role + ep if role_first else ep + role
        wc.shell("\n".join([setup] + steps), db=db)
        n = self.node(db, name=name)
        assert n.ready.get("walcast_role") == "primary", n.ready
        if port is not None:
            assert n.ready.get("walcast_endpoint") == tcp(port), n.ready
        return n

    def replica(self, db, port=None, *extra, endpoint=None, name="replica", env=None):
        ep = endpoint or tcp(port)
        n = self.node(db, "--endpoint", ep, "--set-role", *extra, name=name, env=env)
        assert n.ready.get("walcast_role") == "replica", n.ready
        return n

    def diag(self, *dbs):
        out = []
        for db in dbs:
            try:
                out.append(f"status of {os.path.basename(db)}: {json.dumps(wc.status(db))}")
            except Exception as e:  # diagnostics only
                out.append(f"status of {os.path.basename(db)}: unavailable: {e}")
        for n in self.nodes:
            out.append(n.stderr(1500))
        return "\n".join(out)

    def converge(self, primary_db, replica_db, timeout=60):
        """Waits (walcast_wait) until the replica applied the primary's last frame."""
        n = wc.frame_no(primary_db)
        t0 = time.monotonic()
        if not wc.walcast_wait(replica_db, n, timeout * 1000):
            raise AssertionError(f"replica did not reach frame_no {n} within {timeout} s\n"
                                 + self.diag(replica_db, primary_db))
        st = wc.status(replica_db)
        assert st["applied_frame_no"] == n, f"applied {st['applied_frame_no']} != primary's {n}: {st}"
        print(f"converged at frame_no {n} in {time.monotonic() - t0:.2f} s")
        return n

    def identical(self, primary_db, replica_db):
        wc.checkpoint_truncate(primary_db)
        checkpoint_replica(replica_db)
        try:
            wc.assert_same_file(primary_db, replica_db)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.diag(replica_db)}")
        wc.integrity_ok(replica_db)

    def close(self):
        for n in self.nodes:
            n.kill()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    yield c
    c.close()


@pytest.fixture
def port():
    return wc.free_port_pair()


def checkpoint_replica(db):
    """wal_checkpoint(TRUNCATE) on the replica from a stock shell without walcast
    (walcast-loaded connections refuse write locks on a replica); retried while
    the applier is busy."""
    last = []

    def once():
        p = wc.shell("PRAGMA busy_timeout=2000; PRAGMA wal_checkpoint(TRUNCATE);", load=False, db=db, check=False)
        out = p.stdout.strip().splitlines()
        last[:] = [p.returncode, p.stdout, p.stderr]
        return p.returncode == 0 and out and out[-1].startswith("0|")
    wc.wait_for(once, timeout=30, what=f"wal_checkpoint(TRUNCATE) of the replica (last: {last})")
    wal = db + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0, "the replica's WAL was not truncated"


def applying(node):
    """Waits until `node` holds the replica's applier lock. Any walcast process
    that opens a replica can apply it: until the node's thread has taken the
    lock, a shell the test runs (walcast_wait, a status) could take it first."""
    wc.wait_for(lambda: node.status()["applier_in_this_process"], timeout=10, what=f"{node.name} applying")


def commit_many(db, n, stmt="INSERT INTO t(k, v) VALUES (abs(random()) % 1000, randomblob(200))", per_txn=1):
    """n transactions on the primary, from one Debian python3 process with walcast."""
    wc.py(f"""
import wc
c = wc.connect({db!r})
for i in range({n}):
    c.execute("BEGIN IMMEDIATE")
    for j in range({per_txn}):
        c.execute({stmt!r})
    c.execute("COMMIT")
""")


def plain(db, sql):
    """A query through the stock sqlite3 shell without walcast."""
    return wc.shell(sql, load=False, db=db).stdout.strip()


def summary(db, load=False):
    """What t holds (count, sum of k, total bytes, a hash-ish of ids)."""
    return wc.shell("SELECT count(*), total(k), total(length(v)), total(id * 7 % 1000003) FROM t;", load=load,
                    db=db).stdout.strip()


def run_workload(db, *args):
    p = subprocess.run([wc.PYTHON, os.path.join(wc.HERE, "workload.py"), db, *args], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"workload failed:\n{p.stdout}\n{p.stderr}"


# --- 1. randomized workload ----------------------------------------------------

def workload(db, *args):
    return subprocess.Popen([wc.PYTHON, os.path.join(wc.HERE, "workload.py"), db, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("page_size,seed,writers", [(4096, 31, 1), (1024, 33, 2), (65536, 35, 1)])
def test_workload_converges_byte_identical(cluster, tmp_path, page_size, seed, writers):
    """The randomized workload (every checkpoint mode, VACUUM, spilling big
    transactions, rollbacks, schema changes), by one or two concurrent writer
    processes; one replica follows from the start, a second joins in the middle
    (its snapshot races live transactions)."""
    tmp = str(tmp_path)
    port = wc.free_port_pair()
    primary = os.path.join(tmp, "primary.db")
    replicas = [os.path.join(tmp, "replica1.db"), os.path.join(tmp, "replica2.db")]
    pn = cluster.primary(primary, port, setup=f"PRAGMA page_size={page_size}; " + T_SCHEMA)
    cluster.replica(replicas[0], port, name="replica1")
    procs = [workload(primary, "--seed", str(seed + k), "--ops", str(500 // writers)) for k in range(writers)]
    # The second replica joins once the workload has committed some transactions.
    wc.wait_for(lambda: wc.frame_no(primary) > 200 or any(p.poll() is not None for p in procs), timeout=60,
                what="the workload's first transactions")
    cluster.replica(replicas[1], port, name="replica2")
    for p in procs:
        finish(p, timeout=600)
    for r in replicas:
        n = cluster.converge(primary, r)
    for r in replicas:
        cluster.identical(primary, r)
    assert plain(replicas[0], "PRAGMA page_size;") == str(page_size)

    # The replicas' WALs were truncated by another process: applying goes on.
    finish(workload(primary, "--seed", str(seed + 10), "--ops", "150"))
    for r in replicas:
        n2 = cluster.converge(primary, r)
        assert n2 > n
    for r in replicas:
        cluster.identical(primary, r)
        assert summary(r) == summary(primary, load=True)

    # Seen from a process that does not apply (the applier's status file, which
    # it rewrites every few hundred ms): settles on "no lag" once idle.
    pst = wc.status(primary)
    st = wc.wait_for_status(lambda: wc.status(replicas[0]),
                            lambda s: s.get("lag_frames") == 0 and s.get("primary_frame_no") == n2, timeout=5,
                            what=lambda: f"lag_frames 0 in the status: {wc.status(replicas[0])}")
    assert st["role"] == "replica" and st["state"] == "streaming", st
    assert st["applier_in_this_process"] is False, st
    assert st["db_id"] == pst["db_id"], (st, pst)
    assert st["applied_frame_no"] == n2, st
    # The publishing process counts both replicas and has published everything.
    wc.wait_for(lambda: pn.status().get("replicas", 0) == 2, timeout=10, what=lambda: f"replicas == 2: {pn.status()}")
    wc.wait_for(lambda: pn.status().get("published_frame_no") == n2, timeout=10,
                what=lambda: f"published_frame_no == {n2}: {pn.status()}")
    # So does any other process's status, from the publisher's status file
    # (which it rewrites every 250 ms: it may lag what the publisher has done).
    other = wc.wait_for_status(lambda: wc.status(primary),
                               lambda s: s.get("replicas") == 2 and s.get("published_frame_no") == n2, timeout=10,
                               what=lambda: f"replicas 2 and published_frame_no {n2} in the status file: {wc.status(primary)}")
    assert other["publishing"] is False and other["publisher_pid"] == pn.pid, other
    assert other["publish_error"] is None, other


# --- 2. late join ----------------------------------------------------------------

def test_late_join_bootstraps_from_snapshot(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port, role_first=True)
    commit_many(primary, 40, per_txn=50)  # 2000 rows before any replica exists
    wc.checkpoint_truncate(primary)       # part of it only in the database file
    commit_many(primary, 5, per_txn=10)   # and part in the WAL

    rn = cluster.replica(replica, port, "--role-first")  # role before endpoint this time
    applying(rn)
    # Once the snapshot is in, the status no longer says `bootstrapping`, even
    # read the moment walcast_wait returns (it said so until the catch-up after
    # the snapshot ended).
    n = wc.frame_no(primary)
    ok, st = rn.rows(f"SELECT walcast_wait({n}, 60000), walcast_status()")[0]
    st = json.loads(st)
    assert ok == 1 and st["bootstraps"] == 1 and st["state"] in ("catching_up", "streaming"), st
    cluster.converge(primary, replica)
    assert summary(replica).startswith("2050|"), summary(replica)
    assert summary(replica) == summary(primary, load=True)
    st = rn.status()
    assert st["applier_in_this_process"] is True, st
    assert st["bootstraps"] >= 1, f"a late joiner must bootstrap from a snapshot: {st}"
    wc.wait_for(lambda: pn.status().get("replicas", 0) >= 1, timeout=10, what=lambda: f"replicas >= 1: {pn.status()}")
    # Live transactions after the snapshot.
    commit_many(primary, 20)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


SCHED_OTHER, SCHED_BATCH = os.SCHED_OTHER, os.SCHED_BATCH


def thread_priorities(pid):
    """{thread name: [(nice value, scheduling policy) of each thread of that
    name]} of a process (/proc/PID/task/TID/stat fields 19 and 41)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out.setdefault(name, []).append((int(fields[16]), int(fields[38])))
    return out


def test_replication_threads_run_below_the_application(cluster, tmp_path, port):
    """Capture, the publisher, the catch-up server, the applier and the NNG
    threads they start run at nice 10 (or lower, when the process was started
    lower) and as SCHED_BATCH, so that an application's readers and writers
    come first where the CPU is short, and a commit's wake-up of capture does
    not preempt the committing thread; the application's own thread keeps its
    priority and policy. NNG runs one task thread (.cargo/config.toml), not
    two per CPU."""
    base = os.nice(0)  # the nodes inherit it, and the policy
    base_policy = os.sched_getscheduler(0)
    background = (max(10, base), SCHED_BATCH if base_policy == SCHED_OTHER else base_policy)
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port)
    rn = cluster.replica(replica, port)
    commit_many(primary, 3)
    cluster.converge(primary, replica)
    expected = {pn: ["walcast-capture", "walcast-publish", "walcast-catchup", "nng:task"],
                rn: ["walcast-replica", "walcast-checkpo", "nng:task"]}
    for node, names in expected.items():
        prio = thread_priorities(node.p.pid)
        for name in names:
            assert set(prio.get(name, [])) == {background}, \
                f"{node.name}: {name} runs at (nice, policy) {prio.get(name)}: {prio}"
        assert set(prio["python3"]) == {(base, base_policy)}, \
            f"{node.name}: the application's thread must keep nice {base} and policy {base_policy}: {prio}"
        assert len(prio["nng:task"]) == 1, f"{node.name}: NNG must run one task thread: {prio}"


# --- 3. replica restart ----------------------------------------------------------

def test_the_applier_keeps_its_lock_when_its_session_restarts(cluster, tmp_path, port):
    """A session restarts whenever the relay, endpoint or key changes. The
    applier lock is held across it: another process that opened the replica
    (a shell, polling for the lock) must not take over in the gap. A prober
    tries the lock without waiting, in a tight loop, while the relay is
    switched on and off 20 times (each a new session): it never gets it."""
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 5)
    rn = cluster.replica(replica, port)
    applying(rn)
    cluster.converge(primary, replica)
    prober = subprocess.Popen([wc.PYTHON, "-c", """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
got = 0
while not os.path.exists(sys.argv[2]):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        continue
    fcntl.flock(fd, fcntl.LOCK_UN)
    got += 1
print(got)
""", replica + "-walcast-applier", os.path.join(tmp, "stop")], stdout=subprocess.PIPE, text=True)
    relay = f"tcp://127.0.0.1:{wc.free_port_pair()}"
    for i in range(20):
        value = relay if i % 2 == 0 else "off"
        assert rn.rows(f"PRAGMA walcast_relay = '{value}'") == [[value]]
        # The new session has started (its status names the relay, or none).
        wc.wait_for(lambda: (wc.status(replica).get("relay") is not None) == (value != "off"), timeout=10,
                    what=f"a session with walcast_relay {value}")
    open(os.path.join(tmp, "stop"), "w").close()
    out, _ = prober.communicate(timeout=30)
    assert out.strip() == "0", f"another process got the applier lock {out.strip()} times between sessions"
    assert rn.status()["applier_in_this_process"] is True
    commit_many(primary, 5)
    cluster.converge(primary, replica)


def test_replica_kill_and_restart_resumes(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 30, per_txn=10)
    rn = cluster.replica(replica, port)
    applying(rn)
    cluster.converge(primary, replica)
    commit_many(primary, 20)
    cluster.converge(primary, replica)
    st1 = rn.status()
    assert st1["bootstraps"] >= 1, st1

    rn.kill()
    commit_many(primary, 50, per_txn=3)  # while no process applies
    commit_many(primary, 1, stmt="UPDATE t SET v = randomblob(300) WHERE id % 5 = 0")
    # No pragma this time: role and endpoint persist beside the replica.
    rn2 = cluster.node(replica, name="replica2")
    assert rn2.ready.get("walcast_role") == "replica", rn2.ready
    assert rn2.ready.get("walcast_endpoint") == tcp(port), rn2.ready
    applying(rn2)
    cluster.converge(primary, replica)
    st2 = rn2.status()
    assert st2["applier_in_this_process"] is True, st2
    assert st2["db_id"] == st1["db_id"] and st2["generation"] == st1["generation"], (st1, st2)
    assert st2["bootstraps"] == 0, \
        f"the restarted replica bootstrapped again instead of resuming from its position (counters are per process): {st2}"
    assert st2["catch_ups"] >= 1, f"frames committed while the replica was down can only come by catch-up: {st2}"
    cluster.identical(primary, replica)


@pytest.mark.parametrize("readers", [False, True], ids=["no_readers", "stock_readers"])
def test_replica_killed_while_applying(cluster, tmp_path, port, readers):
    """kill -9 of the applying process at random instants while transactions
    arrive: each new node resumes from its position without a new bootstrap, and
    the end is byte-identical. With stock_readers, plain sqlite3 shells read all
    along: they never see a partial transaction or an error, though one of them
    may be the last connection while no applier runs, and so run WAL recovery, or
    checkpoint and delete the WAL when it closes, as SQLite does."""
    rnd = random.Random(int(os.environ.get("WALCAST_CRASH_SEED", "7")))
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port, setup=INVARIANT_SETUP)
    rn = cluster.replica(replica, port)
    cluster.converge(primary, replica)
    reader = PlainReader(replica) if readers else None
    writer = invariant_writer(primary, 6000, seed=3)
    bootstraps = []
    try:
        for i in range(6):
            start = rn.status()["applied_frame_no"]
            wc.wait_for(lambda: rn.status()["applied_frame_no"] > start or writer.poll() is not None, timeout=30,
                        what=lambda: f"node {i} applying\n{rn.stderr()}")
            time.sleep(rnd.uniform(0.0, 0.3))  # a random instant, not a synchronization
            if i:
                bootstraps.append((i, rn.status()["bootstraps"]))
            rn.kill()
            rn = cluster.node(replica, name=f"replica{i + 2}")  # resumes: role and endpoint persisted
    finally:
        finish(writer)
    cluster.converge(primary, replica, timeout=90)
    if reader:
        checks, states = reader.stop_and_check()
        print(f"stock sqlite3: {checks} reads, {states} states across the kills")
    bootstraps.append(("last", rn.status()["bootstraps"]))
    assert all(b == 0 for _, b in bootstraps), \
        f"restarted nodes bootstrapped again instead of resuming (node, bootstraps): {bootstraps}"
    cluster.identical(primary, replica)


# --- 4. primary restart ----------------------------------------------------------

def test_primary_that_cannot_listen_says_so_in_every_process(cluster, tmp_path, port):
    """Another program holds the primary's tcp port: the publishing process
    cannot listen, and every process's status says so, not only its own."""
    import socket
    db = os.path.join(str(tmp_path), "primary.db")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    try:
        pn = cluster.primary(db, port)
        st = wc.wait_for_status(pn.status, lambda s: str(port) in (s.get("publish_error") or ""), timeout=10,
                                what=lambda: f"the publisher's error in its own status: {pn.status()}")
        assert st["publishing"] is False and st["replicas"] == 0 and str(port) in st["publish_error"], st
        other = wc.status(db)
        assert other["publisher_pid"] is None, other
        assert other["publish_error"].startswith("no process publishes this database now"), other
        assert str(port) in other["publish_error"], other
        print(f"another process's status: {other['publish_error']}")
    finally:
        squatter.close()
    # Once the port is free, the node publishes, and says so everywhere.
    wc.wait_for(lambda: wc.status(db).get("publisher_pid") == pn.pid, timeout=15,
                what=lambda: f"the node publishing once the port is free: {wc.status(db)}")


def test_primary_restart_replica_reconnects(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port)
    commit_many(primary, 30, per_txn=5)
    rn = cluster.replica(replica, port)
    cluster.converge(primary, replica)
    before = summary(replica)
    b0 = rn.status()["bootstraps"]

    pn.kill()
    # The replica notices, in its own status and in what other processes see.
    wc.wait_for(lambda: rn.status()["state"] == "disconnected", timeout=10,
                what=lambda: f"state 'disconnected' in the applier: {rn.status()}")
    wc.wait_for(lambda: wc.status(replica)["state"] == "disconnected", timeout=10,
                what="state 'disconnected' in another process's status")
    # Reads still work, with and without walcast.
    assert summary(replica) == before
    assert summary(replica, load=True) == before
    wc.integrity_ok(replica)

    # A new primary process: the role and endpoint persisted.
    pn2 = cluster.node(primary, name="primary2")
    assert pn2.ready.get("walcast_role") == "primary" and pn2.ready.get("walcast_endpoint") == tcp(port), pn2.ready
    commit_many(primary, 40, per_txn=2)
    cluster.converge(primary, replica)
    wc.wait_for(lambda: rn.status()["state"] == "streaming", timeout=10, what=lambda: f"streaming again: {rn.status()}")
    assert rn.status()["bootstraps"] == b0, f"a primary restart made the replica bootstrap again: {rn.status()}"
    cluster.identical(primary, replica)


def ledger_ids(db, load=False):
    return set(map(int, wc.shell("SELECT n FROM ledger;", load=load, db=db).stdout.split()))


def test_primary_writer_killed_mid_workload(cluster, tmp_path, port):
    """The only process with the primary open (so its publisher) is the workload
    writer, killed with -9 mid-transaction, three times. A new primary process
    recovers the log; the replica catches up without a new bootstrap, holds
    every acknowledged commit, and is byte-identical."""
    rnd = random.Random(int(os.environ.get("WALCAST_CRASH_SEED", "7")) + 5)
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    wc.shell(f"{T_SCHEMA} PRAGMA walcast_endpoint = '{tcp(port)}'; PRAGMA walcast_role = 'primary';", db=primary)
    rn = cluster.replica(replica, port)
    commits = os.path.join(tmp, "commits.txt")
    b0 = None
    for i in range(3):
        w = workload(primary, "--seed", str(60 + i), "--ops", "100000", "--commit-log", commits, "--sync", "full")
        wc.wait_for(lambda: (os.path.exists(commits) and os.path.getsize(commits) > 0 and
                             rn.status()["applied_frame_no"] > 0) or w.poll() is not None,
                    timeout=60, what="first commits applied")
        start = rn.status()["applied_frame_no"]
        wc.wait_for(lambda: rn.status()["applied_frame_no"] > start or w.poll() is not None, timeout=30,
                    what="the replica following the writer")
        assert w.poll() is None, w.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.5))  # a random instant, not a synchronization
        w.send_signal(signal.SIGKILL)
        w.communicate()
        if b0 is None:
            b0 = rn.status()["bootstraps"]
        # A new primary process: recovers the log from the WAL and publishes.
        pn = cluster.node(primary, name=f"primary{i}")
        cluster.converge(primary, replica)
        acknowledged = set(map(int, open(commits).read().split()))
        missing = acknowledged - ledger_ids(replica)
        assert not missing, f"round {i}: acknowledged commits missing on the replica: {sorted(missing)[:5]}"
        pn.close()
    cluster.node(primary, name="primary-last")
    cluster.converge(primary, replica)
    assert rn.status()["bootstraps"] == b0, f"a primary crash made the replica bootstrap again: {rn.status()}"
    cluster.identical(primary, replica)


# --- 5. applier takeover -----------------------------------------------------------

def test_killed_applier_is_replaced(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 10, per_txn=10)
    a = cluster.replica(replica, port, name="replicaA")
    b = cluster.node(replica, name="replicaB")
    cluster.converge(primary, replica)

    def appliers():
        return [n for n in (a, b) if n.status()["applier_in_this_process"]]
    wc.wait_for(lambda: len(appliers()) == 1, timeout=5,
                what=lambda: f"exactly one applier: {[(n.name, n.status()) for n in (a, b)]}")
    (applier,) = appliers()
    survivor = b if applier is a else a
    st = wc.status(replica)
    if "applier_pid" in st:
        assert st["applier_pid"] == applier.pid, (st, applier.pid)

    # Kill the applier while transactions keep arriving.
    writer = subprocess.Popen([wc.PYTHON, "-c", f"""
import wc
c = wc.connect({primary!r})
for i in range(400):
    c.execute("INSERT INTO t(k, v) VALUES (?, randomblob(500))", (i,))
"""], env={**os.environ, "PYTHONPATH": wc.HERE}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = wc.status(replica)["applied_frame_no"]
        wc.wait_for(lambda: wc.status(replica)["applied_frame_no"] > start + 20 or writer.poll() is not None,
                    timeout=30, what="the replica applying the writer's transactions")
        applier.kill()
        t0 = time.monotonic()
        wc.wait_for(lambda: survivor.status()["applier_in_this_process"], timeout=3,
                    what=lambda: f"{survivor.name} taking over within 3 s\n{cluster.diag(replica)}")
        print(f"takeover after {time.monotonic() - t0:.2f} s")
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    cluster.converge(primary, replica)
    if "applier_pid" in wc.status(replica):
        wc.wait_for(lambda: wc.status(replica)["applier_pid"] == survivor.pid, timeout=5,
                    what=lambda: f"the status naming the new applier {survivor.pid}: {wc.status(replica)}")
    commit_many(primary, 20)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


# --- 6. a long read transaction ------------------------------------------------------

def test_open_read_transaction_does_not_stall_apply(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 1, per_txn=100)
    cluster.replica(replica, port)
    cluster.converge(primary, replica)

    reader = cluster.node(replica, "--plain", name="reader")  # plain SQLite, no walcast
    q = "SELECT count(*), total(k), total(length(v)) FROM t"
    reader.rows("BEGIN")
    snap = reader.rows(q)
    assert snap[0][0] == 100, snap

    commit_many(primary, 1000, stmt="INSERT INTO t(k, v) VALUES (1, randomblob(100))")
    cluster.converge(primary, replica, timeout=90)  # while the read transaction is open
    assert plain(replica, "SELECT count(*) FROM t;") == "1100"  # new readers see it all
    assert reader.rows(q) == snap, "the open read transaction's snapshot changed"
    reader.rows("COMMIT")
    now = reader.rows(q)
    assert now[0][0] == 1100, now
    reader.close()
    cluster.identical(primary, replica)


# --- 7. consistent reads from other SQLites ------------------------------------------

ACCOUNTS, BALANCE = 100, 1000
INVARIANT_Q = ("SELECT (SELECT count(*) FROM acct), (SELECT sum(bal) FROM acct), (SELECT count(*) FROM a), "
               "(SELECT count(*) FROM b), (SELECT total(v) FROM a), (SELECT total(v) FROM b)")


def ensure_apsw():
    """The python of a virtualenv (cached across runs) with apsw, which bundles its
    own SQLite. Created with the machine's default python3 (not Debian's), with pip
    install. Fails, never skips, when it cannot be had."""
    py = os.path.join(APSW_VENV, "bin", "python")
    probe = [py, "-c", "import apsw; print(apsw.sqlite_lib_version())"]
    if os.path.exists(py) and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    base = shutil.which("python3") or sys.executable
    log = []
    for cmd in ([base, "-m", "venv", "--clear", APSW_VENV], [py, "-m", "pip", "install", "-q", "apsw"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        log.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        if p.returncode != 0:
            pytest.fail("cannot install apsw (a second SQLite to read the replica with) into "
                        f"{APSW_VENV}; it needs PyPI:\n" + "\n".join(log), pytrace=False)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.fail("apsw installed but does not import:\n" + "\n".join(log), pytrace=False)
    return py


APSW_READER = r"""
import apsw, json, os, sys, time
db, stop = sys.argv[1], sys.argv[2]
c = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READWRITE)
c.set_busy_timeout(5000) if hasattr(c, "set_busy_timeout") else c.setbusytimeout(5000)
print("reading with SQLite", apsw.sqlite_lib_version(), flush=True)
q = sys.argv[3]
reads, states, bad = 0, set(), []
deadline = time.monotonic() + 200
while not os.path.exists(stop) and time.monotonic() < deadline:
    row = list(c.execute(q).fetchall()[0])
    reads += 1
    states.add(row[2])
    if row[0] != int(sys.argv[4]) or row[1] != int(sys.argv[5]) or row[2] != row[3] or row[4] != row[5]:
        bad.append(row)
ic = [r[0] for r in c.execute("PRAGMA integrity_check")]
print(json.dumps({"version": apsw.sqlite_lib_version(), "reads": reads, "states": len(states), "bad": bad[:5],
                  "nbad": len(bad), "integrity": ic}), flush=True)
"""


INVARIANT_SETUP = (f"CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER);"
                   f"WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < {ACCOUNTS}) "
                   f"INSERT INTO acct SELECT n, {BALANCE} FROM i;"
                   "CREATE TABLE a(n INTEGER PRIMARY KEY, v INTEGER, pad BLOB);"
                   "CREATE TABLE b(n INTEGER PRIMARY KEY, v INTEGER, pad BLOB);")


def invariant_writer(primary, n, seed=7):
    """A Debian python3 process with walcast committing n transactions on the
    primary; each moves money between two accounts (the sum stays) and inserts
    equal values into a and b, with pads of random sizes (page splits)."""
    code = f"""
import random, wc
rnd = random.Random({seed})
c = wc.connect({primary!r})
for i in range({n}):
    x, y, amt = rnd.randrange(1, {ACCOUNTS} + 1), rnd.randrange(1, {ACCOUNTS} + 1), rnd.randint(1, 50)
    c.execute("BEGIN IMMEDIATE")
    c.execute("UPDATE acct SET bal = bal - ? WHERE id = ?", (amt, x))
    c.execute("INSERT INTO a(v, pad) VALUES (?, randomblob(?))", (amt, rnd.choice([10, 400, 3000, 9000])))
    c.execute("UPDATE acct SET bal = bal + ? WHERE id = ?", (amt, y))
    c.execute("INSERT INTO b(v, pad) VALUES (?, randomblob(?))", (amt, rnd.choice([10, 400, 3000])))
    if i % 97 == 0:
        c.execute("DELETE FROM a WHERE n % 11 = 0")
        c.execute("DELETE FROM b WHERE n % 11 = 0")
    c.execute("COMMIT")
"""
    return subprocess.Popen([wc.PYTHON, "-c", code], env={**os.environ, "PYTHONPATH": wc.HERE},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args[:2]} failed ({proc.returncode}):\n{out}\n{err}"
    return out


class PlainReader:
    """Stock sqlite3 shells without walcast, one after another, each checking the
    invariant 150 times (each query one read transaction) and then running
    integrity_check, until stopped."""

    def __init__(self, db):
        self.db = db
        self.stopped = threading.Event()
        self.runs, self.errors = [], []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        script = ".timeout 5000\n" + (INVARIANT_Q + ";\n") * 150 + "PRAGMA integrity_check;\n"
        while not self.stopped.is_set():
            p = subprocess.run([wc.SQLITE3, "-batch", "-bail", self.db], input=script, capture_output=True,
                               text=True, timeout=120)
            if p.returncode != 0:
                self.errors.append(p.stderr + p.stdout[-500:])
                return
            self.runs.append(p.stdout.split())

    def stop_and_check(self):
        """Stops; asserts every read was consistent; returns (reads, distinct states)."""
        self.stopped.set()
        self.t.join(timeout=150)
        assert not self.errors, f"a stock sqlite3 reader failed: {self.errors[0]}"
        bad, states, checks = [], set(), 0
        for lines in self.runs:
            assert lines[-1] == "ok", f"integrity_check during apply: {lines[-5:]}"
            for line in lines[:-1]:
                acct, total, ca, cb, ta, tb = line.split("|")
                checks += 1
                states.add(ca)
                if int(acct) != ACCOUNTS or int(total) != ACCOUNTS * BALANCE or ca != cb or ta != tb:
                    bad.append(line)
        assert not bad, f"stock sqlite3 saw {len(bad)} inconsistent states of {checks}, e.g. {bad[:3]}"
        return checks, len(states)


def test_concurrent_readers_see_consistent_states(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port, setup=INVARIANT_SETUP)
    cluster.replica(replica, port)
    cluster.converge(primary, replica)
    apsw_py = ensure_apsw()

    stop = os.path.join(tmp, "stop-readers")
    apsw_reader = subprocess.Popen([apsw_py, "-c", APSW_READER, replica, stop, INVARIANT_Q, str(ACCOUNTS),
                                    str(ACCOUNTS * BALANCE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = apsw_reader.stdout.readline().strip()
        assert first.startswith("reading with SQLite "), first + apsw_reader.stderr.read()
        apsw_version = first.split()[-1]
        print(f"apsw reads the replica with SQLite {apsw_version}")
        assert apsw_version != SYSTEM_SQLITE, f"apsw uses the system's SQLite {apsw_version}, not its own"
        reader = PlainReader(replica)
        finish(invariant_writer(primary, 1500))
        cluster.converge(primary, replica, timeout=90)
    finally:
        open(stop, "w").close()
        out, err = apsw_reader.communicate(timeout=150)
    checks, states = reader.stop_and_check()
    assert apsw_reader.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    print(f"apsw: {res['reads']} reads, {res['states']} states; stock sqlite3: {checks} reads, {states} states")
    assert res["nbad"] == 0, f"apsw saw inconsistent states: {res}"
    assert res["integrity"] == ["ok"], res
    assert states >= 3, f"the stock readers saw only {states} states: they did not read during apply"
    assert res["states"] >= 3, f"apsw saw only {res['states']} states: it did not read during apply"
    final = plain(replica, INVARIANT_Q + ";").split("|")
    assert final[:2] == [str(ACCOUNTS), str(ACCOUNTS * BALANCE)] and final[2] == final[3], final
    cluster.identical(primary, replica)


# --- 8. faults -------------------------------------------------------------------------
# Lost, duplicated, reordered and damaged messages: tests/test_network_faults.py,
# through tests/relay.py.


# --- 9. divergence ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["other_primary", "primary_files_replaced", "primary_rolled_back"])
def test_divergent_history_rebootstraps(cluster, tmp_path, how):
    """other_primary: the endpoint is pointed at another database with a shorter
    history: refused (status says so, nothing changes) until PRAGMA
    walcast_rebootstrap. primary_files_replaced: the primary's files are replaced by a backup
    of themselves, which then takes different writes past the replica's
    position (same db_id, same frame_nos, other checksums). primary_rolled_back:
    the same, but the backup stays behind the replica's position."""
    tmp = str(tmp_path)
    p1, replica = os.path.join(tmp, "p1.db"), os.path.join(tmp, "replica.db")
    port1 = wc.free_port_pair()
    pn1 = cluster.primary(p1, port1)
    commit_many(p1, 60, per_txn=5)

    if how == "other_primary":
        rn = cluster.replica(replica, port1)
        cluster.converge(p1, replica)
        applied_before = wc.status(replica)["applied_frame_no"]
        b0 = rn.status()["bootstraps"]
        # Another database, with a shorter history, on another port.
        port2 = wc.free_port_pair()
        target = os.path.join(tmp, "p2.db")
        cluster.primary(target, port2, setup="CREATE TABLE other(x); " + T_SCHEMA, name="p2")
        commit_many(target, 3, per_txn=7)
        assert wc.frame_no(target) < applied_before
        before = summary(replica)
        r = rn.sql(f"PRAGMA walcast_endpoint = '{tcp(port2)}'")
        assert "error" not in r, r
        # Refused, visibly, with the replica's content unchanged ...
        st = wc.wait_for(lambda: (s := rn.status())["state"] == "error" and "another database" in (s["last_error"] or "") and s,
                         timeout=20, what=lambda: f"the replica refusing another database's primary\n{cluster.diag(replica)}")
        assert "walcast_rebootstrap" in st["last_error"], st
        assert st["applied_frame_no"] == applied_before and st["bootstraps"] == b0, st
        assert summary(replica) == before
        assert wc.status(replica)["state"] == "error", "other processes see the refusal too"
        # ... until told to re-bootstrap from it.
        assert rn.rows("PRAGMA walcast_rebootstrap") == [["requested"]]
    else:
        # A backup of p1's files, taken while nothing has it open.
        pn1.close()
        backup = os.path.join(tmp, "backup")
        os.mkdir(backup)
        files = [f for f in glob.glob(p1 + "*") if os.path.isfile(f)]
        for f in files:
            shutil.copy2(f, backup)
        pn1 = cluster.node(p1, name="p1-again")
        rn = cluster.replica(replica, port1)
        commit_many(p1, 30, per_txn=5)
        cluster.converge(p1, replica)
        applied_before = wc.status(replica)["applied_frame_no"]
        b0 = rn.status()["bootstraps"]
        # The primary's files are replaced by the backup, which then takes
        # different writes past the replica's position.
        pn1.close()
        for f in glob.glob(p1 + "*"):
            if os.path.isfile(f):
                os.remove(f)
        for f in glob.glob(os.path.join(backup, "*")):
            shutil.copy2(f, tmp)
        cluster.node(p1, name="p1-restored")
        if how == "primary_files_replaced":
            commit_many(p1, 80, stmt="INSERT INTO t(k, v) VALUES (-1, randomblob(900))", per_txn=2)
            assert wc.frame_no(p1) > applied_before
        else:
            commit_many(p1, 2, stmt="INSERT INTO t(k, v) VALUES (-1, randomblob(900))")
            assert wc.frame_no(p1) < applied_before
        target = p1

    pst = wc.status(target)

    def hexnum(x):
        return None if x is None else int(str(x), 16)

    def caught_up():
        st = rn.status()
        return (st.get("db_id") == pst["db_id"] and st.get("applied_frame_no") == pst["frame_no"]
                and (st.get("checksum") is None or hexnum(st["checksum"]) == hexnum(pst["checksum"]))) and st
    st = wc.wait_for(caught_up, timeout=20,
                     what=f"the replica following the new history (the primary now: db_id {pst['db_id']}, frame_no "
                          f"{pst['frame_no']}, checksum {pst['checksum']}; the replica had applied {applied_before})\n"
                          f"{cluster.diag(replica)}")
    assert st["bootstraps"] > b0, f"a divergent history must end in a new bootstrap: {st}"
    cluster.identical(target, replica)
    assert summary(replica) == summary(target, load=True)
    # and it keeps following the new history
    commit_many(target, 10)
    cluster.converge(target, replica)
    cluster.identical(target, replica)


def test_a_rebootstrap_requested_during_a_bootstrap_is_carried_out(cluster, tmp_path, port):
    """A replica's first bootstrap must not consume a `walcast_rebootstrap`
    asked for while it runs (its snapshot was taken before the request): the
    request stays recorded, and a second bootstrap carries it out."""
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    # About 300 MB, so that the first bootstrap lasts long enough to ask during it.
    commit_many(primary, 30, stmt="WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000) "
                                  "INSERT INTO t(k, v) SELECT x, randomblob(10000) FROM n")
    rn = cluster.replica(replica, port)
    st = wc.wait_for_status(rn.status, lambda s: s["state"] == "bootstrapping", timeout=30,
                            what="the first bootstrap under way")
    assert st["bootstraps"] == 0, st
    assert "error" not in rn.sql("PRAGMA walcast_rebootstrap")
    st = rn.status()
    assert st["state"] == "bootstrapping" and st["bootstraps"] == 0, f"asked too late to test anything: {st}"
    # (Without the fix the first bootstrap cleared the request: bootstraps stayed 1.)
    # The counter rises before the bootstrap records the request done and its
    # position: wait for the whole of it.
    wc.wait_for_status(rn.status, lambda s: s["bootstraps"] >= 2 and s["applied_frame_no"] > 0, timeout=60,
                       what="a second bootstrap, for the request")
    st = rn.status()
    assert st["rebootstrap_requested"] is False and st["bootstraps"] == 2, st
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


# --- 10. big transaction ---------------------------------------------------------------

def test_big_transaction_replicates(cluster, tmp_path, port):
    """One transaction of WALCAST_REPLICA_BIG_MB MB (default 1100, over 1 GiB):
    published in chunks, caught up where the PUB queue dropped them, applied as
    one WAL transaction. Both walcast processes stay far below the transaction's
    size in memory: it streams."""
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port, setup="CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB);")
    rn = cluster.replica(replica, port)
    cluster.converge(primary, replica)
    t0 = time.monotonic()
    wc.py(f"""
import wc
c = wc.connect({primary!r})
c.execute("PRAGMA cache_size=-16000")
c.execute("BEGIN")
for i in range({BIG_MB} * 4):
    c.execute("INSERT INTO big(v) VALUES (randomblob(262144))")
c.execute("UPDATE big SET v = randomblob(1000) WHERE id % 97 = 0")
c.execute("COMMIT")
""", timeout=3600)
    t1 = time.monotonic()
    cluster.converge(primary, replica, timeout=120 + BIG_MB // 2)
    print(f"{BIG_MB} MB: committed in {t1 - t0:.1f} s, applied {time.monotonic() - t1:.1f} s later; "
          f"CPU s: primary node {cpu_seconds(pn.pid):.1f}, replica node {cpu_seconds(rn.pid):.1f}")
    peaks = {name: peak_rss_mb(n.pid) for name, n in (("primary node", pn), ("replica node", rn))}
    print(f"peak RSS MB: {peaks}")
    for name, mb in peaks.items():
        assert mb < 160, f"{name} peaked at {mb:.0f} MB during a {BIG_MB} MB transaction: it does not stream"
    cluster.identical(primary, replica)
    assert os.path.getsize(replica) > BIG_MB * 1024 * 1024 * 0.98
    cluster.close()
    for f in glob.glob(os.path.join(tmp, "*.db*")):
        if os.path.isfile(f):
            os.remove(f)


# --- 11. bad input ----------------------------------------------------------------------

def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_bad_input_changes_nothing(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 5, per_txn=5)
    rn = cluster.replica(replica, port)
    cluster.converge(primary, replica)
    pconf, rconf = read(primary + "-walcast-conf"), read(replica + "-walcast-conf")
    before = summary(replica)
    rst = wc.wait_for_status(lambda: wc.status(replica),
                             lambda s: s.get("role") == "replica" and s.get("state") == "streaming",
                             timeout=5, what="the applier's status file")

    # An invalid endpoint, on either side, from the shell and from Python.
    for db in (replica, primary):
        p = wc.shell("PRAGMA walcast_endpoint = 'http://x';", db=db, check=False)
        assert p.returncode != 0 and "invalid walcast_endpoint" in p.stderr, (db, p.stdout, p.stderr)
    r = rn.sql("PRAGMA walcast_endpoint = 'http://x'")
    assert "invalid walcast_endpoint" in r.get("error", ""), r

    # A rebootstrap on a primary, or with a value.
    p = wc.shell("PRAGMA walcast_rebootstrap;", db=primary, check=False)
    assert p.returncode != 0 and "only a replica can rebootstrap" in p.stderr, (p.stdout, p.stderr)
    assert wc.shell("PRAGMA walcast_role;", db=primary).stdout.strip() == "primary"
    r = rn.sql("PRAGMA walcast_rebootstrap = 'yes'")
    assert "takes no value" in r.get("error", ""), r

    # Writes to the replica through walcast: refused as read-only.
    p = wc.py(f"""
import sqlite3, wc
c = wc.connect({replica!r}, timeout=2)
try:
    c.execute("INSERT INTO t(k, v) VALUES (1, x'00')")
except sqlite3.OperationalError as e:
    print("refused:", e)
else:
    print("accepted")
""")
    assert "refused:" in p.stdout and "readonly" in p.stdout, p.stdout
    assert "attempt to write a readonly database" in p.stdout, p.stdout
    r = rn.sql("DELETE FROM t")  # from the applying process itself
    assert "readonly" in r.get("error", ""), r
    p = wc.shell("UPDATE t SET k = 0;", db=replica, check=False)
    assert p.returncode != 0 and "readonly" in p.stderr, (p.stdout, p.stderr)
    p = wc.shell("CREATE TABLE z(x);", db=replica, check=False)
    assert p.returncode != 0 and "readonly" in p.stderr, (p.stdout, p.stderr)

    # Nothing changed.
    assert read(primary + "-walcast-conf") == pconf
    assert read(replica + "-walcast-conf") == rconf
    assert summary(replica) == before
    st = wc.status(replica)
    for k in ("role", "endpoint", "db_id", "generation", "applied_frame_no"):
        assert st.get(k) == rst.get(k), (k, rst, st)
    assert rn.status()["endpoint"] == tcp(port)
    pst = wc.status(primary)
    assert pst["role"] == "primary" and pst["endpoint"] == tcp(port), pst
    # and replication goes on
    commit_many(primary, 5)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


def test_an_idle_replica_rewrites_its_status_once_a_second_and_others_see_ages_grow(cluster, tmp_path, port):
    """A replica's status file tells other processes what its applier knows. An
    idle replica rewrites it about once a second (to show it is alive), not five
    times a second; the ages in it (ms_since_last_message) are brought up to now
    by the reader, so they grow smoothly between writes."""
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port)
    commit_many(primary, 3)
    rn = cluster.replica(replica, port)
    applying(rn)
    cluster.converge(primary, replica)
    wc.wait_for(lambda: wc.status(replica)["state"] == "streaming", timeout=10, what="streaming")
    path = replica + "-walcast-status"
    # Streaming and idle (heartbeats only): count the rewrites over 3.5 s.
    writes, last = 0, os.stat(path).st_mtime_ns
    t_end = time.monotonic() + 3.5
    while time.monotonic() < t_end:
        m = os.stat(path).st_mtime_ns
        if m != last:
            writes, last = writes + 1, m
        time.sleep(0.01)
    assert 2 <= writes <= 5, f"{writes} rewrites of the status in 3.5 s while idle (about 1 a second expected)"
    # No message any more: another process sees the time since the last one grow
    # with the clock, between the applier's writes too.
    pn.kill()
    wc.wait_for(lambda: wc.status(replica)["state"] == "disconnected", timeout=10, what="disconnected")
    # The status and the time in one statement of one process: the shell's
    # own start-up time does not count.
    sql = "SELECT json_extract(walcast_status(), '$.ms_since_last_message'), " \
          "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER);"
    samples = []
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        ms, now_ms = wc.shell(sql, db=replica).stdout.strip().split("|")
        samples.append((int(now_ms), int(ms)))
        time.sleep(0.1)
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        assert abs((b - a) - (t1 - t0)) < 100, f"ms_since_last_message grew {b - a} ms in {t1 - t0} ms: {samples}"


# --- 12. reads work, writes refused, walcast_wait ---------------------------------------

def test_reads_work_writes_refused_and_walcast_wait(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 10, per_txn=3)
    rn = cluster.replica(replica, port)
    n = cluster.converge(primary, replica)

    assert rn.rows("SELECT count(*) FROM t") == [[30]]
    assert plain(replica, "SELECT count(*) FROM t;") == "30"
    r = rn.sql("INSERT INTO t(k, v) VALUES (1, 2)")
    assert "readonly" in r.get("error", ""), r
    assert rn.rows("SELECT count(*) FROM t") == [[30]]

    # walcast_wait, in the applying process and in others.
    assert rn.rows(f"SELECT walcast_wait({n}, 1000)") == [[1]]
    assert wc.walcast_wait(replica, n, 1000) is True
    t0 = time.monotonic()
    assert rn.rows(f"SELECT walcast_wait({n + 10**9}, 300)") == [[0]]
    assert 0.25 <= time.monotonic() - t0 < 5, time.monotonic() - t0
    t0 = time.monotonic()
    assert wc.walcast_wait(replica, n + 10**9, 300) is False
    assert time.monotonic() - t0 >= 0.25

    # Read-your-writes: a waiter for the next frame returns once it is applied.
    waiter = subprocess.Popen([wc.SQLITE3, "-batch", "-bail"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    waiter.stdin.write(f".load {wc.EXT}\n.open {replica}\nSELECT walcast_wait({n + 1}, 30000);\n"
                       "SELECT count(*) FROM t;\n")
    waiter.stdin.close()
    wc.shell("INSERT INTO t(k, v) VALUES (42, 'ryw');", db=primary)
    m = wc.frame_no(primary)
    assert m > n
    waiter.wait(timeout=60)
    out, err = waiter.stdout.read(), waiter.stderr.read()
    assert waiter.returncode == 0, err
    assert out.split() == ["1", "31"], out
    assert wc.walcast_wait(replica, m, 5000)
    assert plain(replica, "SELECT k FROM t WHERE v = 'ryw';") == "42"


# --- extras: URI parameters, the default endpoint -------------------------------------

def test_uri_parameters_and_default_ipc_endpoint(cluster, tmp_path):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    cluster.primary(primary, None)  # no endpoint pragma
    default = f"ipc://{os.path.abspath(primary)}-walcast.sock"
    assert wc.status(primary)["endpoint"] == default
    commit_many(primary, 10, per_txn=10)
    rn = cluster.node(replica, "--uri", "--endpoint", default, name="replica-uri")
    assert rn.ready.get("walcast_role") == "replica", rn.ready
    cluster.converge(primary, replica)
    assert summary(replica) == summary(primary, load=True)
    rn.close()
    # Persisted: a plain reopen (not a URI) still says replica, and a new node applies.
    assert wc.shell("PRAGMA walcast_role;", db=replica).stdout.strip() == "replica"
    rn2 = cluster.node(replica, name="replica-again")
    assert rn2.ready.get("walcast_endpoint") == default, rn2.ready
    commit_many(primary, 5)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


def test_clients_that_hang_up_at_once_never_stop_the_primary_accepting(cluster, tmp_path):
    """A client that connects and closes before the primary has answered (a
    process that became a replica's applier and exited at once, a health
    check, a port scan) fails the connection's handshake. NNG 1.4 then stopped
    accepting on that address for good: every later replica timed out,
    silently (issue found by a flaky test_uri_parameters_and_default_ipc_endpoint).
    walcast builds NNG with the fix (vendor/nng-sys, README)."""
    import socket as pysocket
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    cluster.primary(primary, None)
    st = wc.status(primary)
    commit_many(primary, 5)
    paths = [st["endpoint"][len("ipc://"):], st["catchup_endpoint"][len("ipc://"):]]
    for _ in range(20):
        for p in paths:
            s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            s.connect(p)
            s.close()
    rn = cluster.node(replica, "--endpoint", st["endpoint"], "--set-role", name="replica")
    assert rn.ready.get("walcast_role") == "replica", rn.ready
    commit_many(primary, 5)
    cluster.converge(primary, replica, timeout=20)
    # The live stream too, not only catch-up: the primary counts the replica.
    wc.wait_for(lambda: wc.status(primary)["replicas"] == 1, what="the primary counting 1 replica")
    cluster.identical(primary, replica)
