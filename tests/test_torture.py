"""Crash torture: kill -9 at random instants of the primary's writer (which is
also its publisher) and of the replica's applier, during the randomized workload
(workload.py --invariants --sync full), with readers checking invariants all
along on the primary and on the replicas, none of which loaded walcast.

After every kill:
- the log chain verifies (walcast_verify);
- every transaction whose COMMIT returned (the workload's --commit-log) is on
  the primary and on every replica;
- every replica applies the primary's last frame, timed from the moment the
  primary is back (its new process has reconciled the log) or the last commit,
  whichever is later; the bound is 2 s (collected over the run, asserted at the
  end, so that a long run reports the whole distribution);
- each replica is byte-identical to the primary after wal_checkpoint(TRUNCATE)
  on both, and passes integrity_check; walcast-loaded connections (the nodes)
  see the invariants too.

Environment:
- WALCAST_TORTURE_ITERATIONS: kills of each kind (default 4; `make torture`: 200).
- WALCAST_TORTURE_SEED: the random instants and workloads (default 11).
- WALCAST_TORTURE_KEEP: where a failing test's databases, logs and stderr are
  copied (default torture-failures/ at the repository root).
- WALCAST_TORTURE_REPORT: a file the figures of each test are appended to (JSON lines).
- WALCAST_TORTURE_LOG_GB: before the primary kills, grow the primary's log to
  this many GB (default 0; `make torture`: 5), so that restarts face a long log.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import wc
from test_replica import (INVARIANT_Q, INVARIANT_SETUP, ACCOUNTS, BALANCE, T_SCHEMA, PlainReader, checkpoint_replica,
                          cluster, finish, ledger_ids, port, tcp, workload)  # noqa: F401 (cluster, port: fixtures)

ITERATIONS = int(os.environ.get("WALCAST_TORTURE_ITERATIONS", "4"))
SEED = int(os.environ.get("WALCAST_TORTURE_SEED", "11"))
KEEP = os.environ.get("WALCAST_TORTURE_KEEP") or os.path.join(wc.ROOT, "torture-failures")
REPORT = os.environ.get("WALCAST_TORTURE_REPORT")
LOG_GB = float(os.environ.get("WALCAST_TORTURE_LOG_GB", "0"))
BOUND_S = 2.0  # the convergence bound
READER = os.path.join(wc.HERE, "torture_reader.py")


class PythonReader:
    """torture_reader.py: Debian's python3 without walcast, checking invariants."""

    def __init__(self, db, tmp, name):
        self.stop_file = os.path.join(tmp, f"stop-{name}")
        self.name = name
        self.p = subprocess.Popen([wc.PYTHON, READER, db, self.stop_file, INVARIANT_Q, str(ACCOUNTS),
                                   str(ACCOUNTS * BALANCE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self):
        open(self.stop_file, "w").close()
        out, err = self.p.communicate(timeout=300)
        assert self.p.returncode == 0, f"reader {self.name} failed:\n{err}"
        return json.loads(out.strip().splitlines()[-1])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Readers:
    """Stock sqlite3 shells (test_replica.PlainReader) and python readers, all
    without walcast; stop() checks that none saw an anomaly."""

    def __init__(self, tmp, shells=(), pythons=()):
        self.shells = {os.path.basename(db): PlainReader(db) for db in shells}
        self.pythons = [PythonReader(db, tmp, f"py-{os.path.basename(db)}") for db in pythons]

    def stop(self):
        figures = {}
        try:
            for name, r in self.shells.items():
                reads, states = r.stop_and_check()
                figures[f"sqlite3 shell on {name}"] = {"reads": reads, "states": states, "anomalies": 0}
            for r in self.pythons:
                res = r.stop()
                figures[r.name] = res
                assert res["anomalies"] == 0, f"{r.name} saw anomalies: {res}"
                assert res["states"] >= 2, f"{r.name} saw only {res['states']} states: it did not read during the run"
        finally:
            self.kill()
        return figures

    def kill(self):
        for r in self.shells.values():
            r.stopped.set()
        for r in self.pythons:
            r.kill()


@pytest.fixture
def cleanup():
    """Callables run at teardown, pass or fail (the readers' processes)."""
    fns = []
    yield fns
    for fn in fns:
        fn()


@contextlib.contextmanager
def kept_on_failure(tmp, cluster, name):
    """On failure, copies the test's directory (databases, logs, the nodes'
    stderr, commit logs) to KEEP/<name>-<time> and names it in the error."""
    try:
        yield
    except BaseException as e:
        cluster.close()
        dest = os.path.join(KEEP, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            shutil.copytree(tmp, dest)
            where = f"(databases, logs and stderr kept in {dest})"
        except OSError as copy_error:
            where = f"(could not keep the files: {copy_error})"
        if isinstance(e, AssertionError):
            raise AssertionError(f"{e}\n{where}") from e
        raise


def drop_logs(cluster, tmp):
    """A passing long run leaves no GBs of logs behind (pytest keeps its last
    three temporary directories)."""
    cluster.close()
    for name in os.listdir(tmp):
        if name.endswith(("-walcast", "-wal")):
            os.remove(os.path.join(tmp, name))


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def distribution(xs):
    return {"n": len(xs), "p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99), "max": max(xs) if xs else None}


def report(name, figures):
    print(f"{name}: {json.dumps(figures)}")
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def wait_applied(nodes, n, t0):
    """Runs walcast_wait(n) in each node at once (one thread per node); returns
    the seconds from t0 to each node having applied frame n."""
    import threading
    done, errors = {}, []

    def one(node):
        try:
            r = node.rows(f"SELECT walcast_wait({n}, 30000)", timeout=60)
            if r != [[1]]:
                errors.append(f"{node.name} did not apply frame {n} within 30 s: {node.status()}\n{node.stderr()}")
            done[node.name] = time.monotonic() - t0
        except Exception as e:  # reported below, in the test's thread
            errors.append(f"{node.name}: {e}")
    threads = [threading.Thread(target=one, args=(nd,)) for nd in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)
    return done


def checkpoint_primary(node):
    """wal_checkpoint(TRUNCATE) through a walcast connection that has the primary
    open, retried while a reader holds the WAL."""
    last = []

    def once():
        r = node.sql("PRAGMA wal_checkpoint(TRUNCATE)")
        last[:] = [r]
        return "rows" in r and r["rows"][0][0] == 0
    wc.wait_for(once, timeout=30, what=f"wal_checkpoint(TRUNCATE) of the primary (last: {last})")


def assert_invariants(node):
    """The invariants as a walcast-loaded connection sees them, and integrity_check."""
    row = node.rows(INVARIANT_Q)[0]
    assert row[0] == ACCOUNTS and row[1] == ACCOUNTS * BALANCE and row[2] == row[3] and row[4] == row[5], \
        f"{node.name} (walcast loaded) sees broken invariants: {row}"
    ic = node.rows("PRAGMA integrity_check")
    assert ic == [["ok"]], f"{node.name}: integrity_check {ic}"


def identical(primary_node, primary, replicas):
    """Byte-identical after wal_checkpoint(TRUNCATE) on each; integrity_check
    from a stock shell (the primary's comes from assert_invariants)."""
    checkpoint_primary(primary_node)
    for r in replicas:
        checkpoint_replica(r)
        wc.assert_same_file(primary, r)
        wc.integrity_ok(r)


def acknowledged(commit_log):
    with open(commit_log) as f:
        return set(map(int, f.read().split()))


def assert_present(acked, dbs, what, fig):
    """Every acknowledged commit's ledger row is in every db (read without walcast)."""
    for db in dbs:
        missing = acked - ledger_ids(db)
        fig["lost"] += len(missing)
        assert not missing, f"{what}: {len(missing)} acknowledged commits missing from {db}: {sorted(missing)[:5]}"


def keep_small(node, db, limit=8 << 20):
    """Long runs must not fill the disk (the log keeps every transaction, and a
    VACUUM copies the whole database into it): once the database passes limit
    bytes, empties the workload's bulk table and the oldest half of a and b (the
    same rows of both, in one transaction, so the invariants hold), then
    VACUUM; all through walcast, so captured and replicated like the rest."""
    if os.path.getsize(db) < limit:
        return
    for stmt in ("BEGIN IMMEDIATE", "DELETE FROM t",
                 "DELETE FROM a WHERE n < (SELECT max(n) / 2 FROM a)",
                 "DELETE FROM b WHERE n < (SELECT max(n) / 2 FROM a)", "COMMIT", "VACUUM"):
        node.rows(stmt)


def grow_log(node, log, gb):
    """Commits 64 MB transactions into the bulk table t, each followed by
    emptying it, until the log holds `gb` GB: all captured and replicated."""
    while os.path.getsize(log) < gb * (1 << 30):
        node.rows("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 16000) "
                  "INSERT INTO t(k, v) SELECT x, randomblob(4000) FROM c")
        node.rows("DELETE FROM t")


def test_primary_writer_killed(cluster, tmp_path, port, cleanup):
    """kill -9 of the only walcast process that has the primary open: the
    workload writer, which is also the publisher (so a kill sometimes lands in
    the middle of a send). replica1 follows all along; replica2's node is killed
    too in about a third of the iterations and restarted only once the primary
    is back, so it must catch up from the new primary process."""
    rnd = random.Random(SEED)
    tmp = str(tmp_path)
    primary = os.path.join(tmp, "primary.db")
    r1, r2 = os.path.join(tmp, "replica1.db"), os.path.join(tmp, "replica2.db")
    wc.shell(INVARIANT_SETUP + T_SCHEMA + f"PRAGMA walcast_endpoint = '{tcp(port)}'; PRAGMA walcast_role = 'primary';",
             db=primary)
    fig = {"iterations": 0, "primary_kills": 0, "replica2_kills": 0, "acknowledged": 0, "lost": 0,
           "commits_after_restart": 0, "generations": None, "bootstraps_after_first": 0}
    conv, conv_lagging, slow, iteration_s = [], [], [], []
    with kept_on_failure(tmp, cluster, "primary-killed"):
        pn = cluster.node(primary, name="primary-setup")
        nodes = {r1: cluster.replica(r1, port, name="replica1"), r2: cluster.replica(r2, port, name="replica2")}
        grow_log(pn, primary + "-walcast", LOG_GB)
        n = int(pn.rows("SELECT walcast_frame_no()")[0][0])
        wait_applied(nodes.values(), n, time.monotonic())
        fig["log_bytes_at_start"] = os.path.getsize(primary + "-walcast")
        # Bootstrap counters are per process: the first snapshot of the original nodes.
        baseline = {nd.name: nd.status()["bootstraps"] for nd in nodes.values()}
        pn.close()
        readers = Readers(tmp, shells=[primary, r1], pythons=[primary, r2])
        cleanup.append(readers.kill)
        all_acked = set()
        for i in range(ITERATIONS):
            t_start = time.monotonic()
            commits = os.path.join(tmp, f"commits-{i}.txt")
            open(commits, "w").close()
            start = nodes[r1].status()["applied_frame_no"]
            w = workload(primary, "--seed", str(1000 + i), "--ops", "100000", "--sync", "full", "--invariants",
                         "--commit-log", commits)
            wc.wait_for(lambda: (os.path.getsize(commits) > 0 and nodes[r1].status()["applied_frame_no"] > start)
                        or w.poll() is not None, timeout=60, what="the writer committing and replica1 following")
            assert w.poll() is None, w.stderr.read()
            lagging = rnd.random() < 0.35
            if lagging:  # replica2 dies at a random instant too, and misses the rest
                time.sleep(rnd.uniform(0.0, 0.3))
                nodes[r2].kill()
                fig["replica2_kills"] += 1
            time.sleep(rnd.uniform(0.0, 0.8))  # a random instant, not a synchronization
            w.send_signal(signal.SIGKILL)
            w.communicate()
            fig["primary_kills"] += 1
            acked = acknowledged(commits)
            all_acked |= acked

            # The primary is back: a new process reconciles the log with the WAL
            # (walcast_frame_no brings it up to date) and publishes.
            pn = cluster.node(primary, name=f"primary{i}")
            verified = json.loads(pn.rows(f"SELECT walcast_verify('{primary}')")[0][0])
            assert verified.get("ok") is True, verified
            if lagging:
                nodes[r2] = cluster.node(r2, name=f"replica2-{i}")
            if rnd.random() < 0.5:  # and sometimes takes a commit of its own at once
                for stmt in ("BEGIN IMMEDIATE", "UPDATE acct SET bal = bal - 7 WHERE id = 1",
                             "UPDATE acct SET bal = bal + 7 WHERE id = 2",
                             "INSERT INTO a(v, pad) VALUES (7, randomblob(100))",
                             "INSERT INTO b(v, pad) VALUES (7, randomblob(100))", "COMMIT"):
                    pn.rows(stmt)
                fig["commits_after_restart"] += 1
            n = int(pn.rows("SELECT walcast_frame_no()")[0][0])
            t0 = time.monotonic()  # the primary is back, with its last commit
            times = wait_applied(nodes.values(), n, t0)
            for r, nd in nodes.items():
                (conv_lagging if (lagging and r == r2) else conv).append(times[nd.name])
                if times[nd.name] > BOUND_S:
                    slow.append((i, nd.name, round(times[nd.name], 3)))

            assert_present(acked, [primary, r1, r2], f"iteration {i}", fig)
            fig["acknowledged"] += len(acked)
            for nd in [pn, *nodes.values()]:
                assert_invariants(nd)
            identical(pn, primary, [r1, r2])
            keep_small(pn, primary)
            pn.close()
            iteration_s.append(time.monotonic() - t_start)
            fig["iterations"] += 1
        # The whole run: nothing acknowledged is missing anywhere, and every
        # replica node resumed without a new snapshot.
        pn = cluster.node(primary, name="primary-last")
        assert_present(all_acked, [primary, r1, r2], "after the run", fig)
        fig["generations"] = json.loads(pn.rows("PRAGMA walcast_status")[0][0])["generation"]
        fig["log_bytes_at_end"] = os.path.getsize(primary + "-walcast")
        fig["bootstraps_after_first"] = sum(nd.status()["bootstraps"] - baseline.get(nd.name, 0)
                                            for nd in nodes.values())
        fig["readers"] = readers.stop()
        fig["iteration_s"] = distribution(iteration_s)
        fig["convergence_s"] = distribution(conv)
        fig["convergence_after_catch_up_s"] = distribution(conv_lagging)
        fig["over_bound"] = slow
        report("primary_writer_killed", fig)
        assert not slow, f"replicas took longer than {BOUND_S} s to converge (iteration, node, s): {slow}"
    drop_logs(cluster, tmp)


def test_applier_killed(cluster, tmp_path, port, cleanup):
    """kill -9 of the replica's applier (the process holding the flock on
    replica.db-walcast-applier, named by the status's applier_pid) while the
    workload's transactions arrive. Half the time another process that has the
    replica open takes over; otherwise it is the only one, and a restarted
    process resumes from the replica's recorded position."""
    rnd = random.Random(SEED + 1)
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    fig = {"iterations": 0, "applier_kills": 0, "takeovers": 0, "restarts": 0, "acknowledged": 0, "lost": 0,
           "bootstraps_after_first": 0}
    conv, takeover_s, slow, bootstraps, iteration_s = [], [], [], [], []
    with kept_on_failure(tmp, cluster, "applier-killed"):
        pn = cluster.primary(primary, port, setup=INVARIANT_SETUP + T_SCHEMA)
        nodes = [cluster.replica(replica, port, name="replicaA"), cluster.node(replica, name="replicaB")]
        n = int(pn.rows("SELECT walcast_frame_no()")[0][0])
        wait_applied(nodes, n, time.monotonic())
        readers = Readers(tmp, shells=[replica], pythons=[replica, primary])
        cleanup.append(readers.kill)
        all_acked = set()
        for i in range(ITERATIONS):
            t_start = time.monotonic()
            commits = os.path.join(tmp, f"commits-{i}.txt")
            open(commits, "w").close()
            start = nodes[0].status()["applied_frame_no"]
            w = workload(primary, "--seed", str(5000 + i), "--ops", str(rnd.randint(40, 150)), "--sync", "full",
                         "--invariants", "--commit-log", commits)
            wc.wait_for(lambda: nodes[0].status()["applied_frame_no"] > start or w.poll() is not None, timeout=60,
                        what="the replica applying the writer's transactions")
            time.sleep(rnd.uniform(0.0, 0.4))  # a random instant, not a synchronization
            pid = wc.wait_for(lambda: nodes[0].status().get("applier_pid"), timeout=5, what="an applier_pid")
            (applier,) = [nd for nd in nodes if nd.pid == pid] or [None]
            assert applier is not None, f"applier_pid {pid} is none of the nodes {[nd.pid for nd in nodes]}"
            others = [nd for nd in nodes if nd is not applier]
            takeover = rnd.random() < 0.5
            if not takeover:  # the applier is the only process with the replica open when it dies
                for nd in others:
                    nd.close()
            applier.kill()
            t_kill = time.monotonic()
            fig["applier_kills"] += 1
            if takeover:
                survivor = others[0]
                wc.wait_for(lambda: survivor.status()["applier_in_this_process"], timeout=10,
                            what=lambda: f"{survivor.name} taking over\n{cluster.diag(replica)}")
                takeover_s.append(time.monotonic() - t_kill)
                nodes = [survivor]
                fig["takeovers"] += 1
            else:
                nodes = [cluster.node(replica, name=f"replica-restarted{i}")]
                fig["restarts"] += 1
            out = finish(w)
            t0 = time.monotonic()  # the writer's last commit returned just before it exited
            assert "workload done" in out, out
            acked = acknowledged(commits)
            all_acked |= acked
            n = int(pn.rows("SELECT walcast_frame_no()")[0][0])
            times = wait_applied(nodes, n, t0)
            conv.extend(times.values())
            slow.extend((i, name, round(s, 3)) for name, s in times.items() if s > BOUND_S)
            st = nodes[0].status()
            assert st["applier_in_this_process"] and st["applier_pid"] == nodes[0].pid, st
            bootstraps.append(st["bootstraps"])

            assert_present(acked, [primary, replica], f"iteration {i}", fig)
            fig["acknowledged"] += len(acked)
            assert_invariants(pn)
            assert_invariants(nodes[0])
            identical(pn, primary, [replica])
            keep_small(pn, primary)
            iteration_s.append(time.monotonic() - t_start)
            # Two processes have the replica open again for the next kill.
            nodes.append(cluster.node(replica, name=f"replica-spare{i}"))
            fig["iterations"] += 1
        assert_present(all_acked, [primary, replica], "after the run", fig)
        fig["bootstraps_after_first"] = sum(bootstraps)
        fig["readers"] = readers.stop()
        fig["iteration_s"] = distribution(iteration_s)
        fig["convergence_s"] = distribution(conv)
        fig["takeover_s"] = distribution(takeover_s)
        fig["over_bound"] = slow
        report("applier_killed", fig)
        assert not slow, f"the replica took longer than {BOUND_S} s to converge (iteration, node, s): {slow}"
        assert fig["bootstraps_after_first"] == 0, \
            f"a killed applier's successor bootstrapped again instead of resuming: {bootstraps}"
    drop_logs(cluster, tmp)
