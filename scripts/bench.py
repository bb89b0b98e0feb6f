#!/usr/bin/python3
"""walcast's benchmark harness: writes BENCHMARKS.md and BENCHMARKS-lag.png.

  /usr/bin/python3 scripts/bench.py [--scale smoke|full] [--out BENCHMARKS.md]
                                    [--only SECTION[,SECTION...]] [--keep]

`make bench` runs it at full scale. BENCH_SCALE (smoke or full) sets the scale when
--scale is not given. The plot is written beside the report (`<out minus .md>-lag.png`).

Every measured client is a real process (scripts/bench_worker.py, and the replica
nodes of tests/replica_node.py). A plain baseline process never loads walcast; a
walcast writer loads it and holds a primary open (so it also captures and
publishes), with the replicas attached over tcp loopback and converged before
timing starts. Plain and walcast runs alternate (ABAB...), and each figure is the
median over the repetitions; every repetition is printed in the report too.

This process (the orchestrator) never loads walcast: it reads replicas, when it
needs to, as a plain SQLite reader.

Sections (--only): overhead, commitpath (instructions per commit, with callgrind),
lag, throughput, catchup, fanout, memory, readers.
"""
import argparse
import atexit
import bisect
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import wc  # noqa: E402  (paths and free_port_pair only: this process never loads walcast)

PY = wc.PYTHON
WORKER = os.path.join(HERE, "bench_worker.py")
NODE = os.path.join(ROOT, "tests", "replica_node.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
MB = 1e6

SECTIONS = ["overhead", "commitpath", "lag", "throughput", "catchup", "fanout", "memory", "readers"]

SCALES = {
    # Tiny sizes: every section runs and reports, in well under a minute.
    "smoke": dict(
        reps=1, commit_reps=1,
        cg_commits=(20, 60),
        commit_seconds=0.25, bulk_rows=5000, mixed_rows=2000, mixed_seconds=0.25,
        lag_counts={100: 30, 1000: 200, 10000: 1000}, lag_reps=1,
        tp_seconds=0.6, tp_txn_rows=64, tp_reps=1, tp_search=[0.5],
        catchup_bytes=8 << 20, catchup_txn_rows=64, catchup_reps=1,
        fanout=[1, 4], fanout_rate=1000, fanout_count=300, fanout_reps=1,
        mem_mb=[4], mem_reps=1,
        reader_rows=2000, reader_seconds=0.3, reader_rate=10000, reader_reps=1,
    ),
    # The sizes.
    "full": dict(
        reps=3, commit_reps=5,
        cg_commits=(1000, 4000),
        commit_seconds=3.0, bulk_rows=1_000_000, mixed_rows=100_000, mixed_seconds=3.0,
        lag_counts={100: 2000, 1000: 15000, 10000: 60000}, lag_reps=3,
        tp_seconds=8.0, tp_txn_rows=1000, tp_reps=3, tp_search=[0.75, 0.5, 0.35, 0.25, 0.15, 0.1],
        catchup_bytes=GIB, catchup_txn_rows=1000, catchup_reps=3,
        fanout=[1, 4, 16], fanout_rate=1000, fanout_count=10000, fanout_reps=3,
        mem_mb=[128, 1024], mem_reps=3,
        reader_rows=100_000, reader_seconds=5.0, reader_rate=10000, reader_reps=3,
    ),
}

ROW_PAYLOAD = 4000  # bytes per row in bulk loads: about one 4 KiB page per row


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def now():
    return time.monotonic_ns()


# --- processes -------------------------------------------------------------------

_procs = []
STDERR_LINES = {}  # distinct stderr lines of every process -> (count, first process)


class Proc(wc.LineProcess):
    """A worker or node process (wc.LineProcess) with JSON commands, the start and
    ready times, CPU and memory readings, and its stderr collected for the report."""

    failure = RuntimeError

    def __init__(self, argv, name, logdir, json_cmds=True, ready_timeout=120):
        self.json_cmds = json_cmds
        self.t_start = now()
        super().__init__(argv, name, logdir, ready_timeout=ready_timeout)
        self.t_ready = now()
        _procs.append(self)

    def send(self, cmd):
        self.send_line(json.dumps(cmd) if self.json_cmds else cmd)

    def recv(self, timeout=600):
        r = json.loads(self.line(timeout))
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"{self.name}: {r}\n{self.stderr()}")
        return r

    def call(self, cmd, timeout=600):
        self.send(cmd)
        return self.recv(timeout)

    def sql(self, stmt, timeout=600):
        """For replica_node.py processes: one statement, its rows."""
        return self.call(stmt, timeout)["rows"]

    def stat_ticks(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def thread_cpu_ns(self):
        """CPU time (ns) of each of the process's threads, summed by thread name
        (the first field of /proc/PID/task/TID/schedstat: ns, not 10 ms ticks)."""
        out = {}
        base = f"/proc/{self.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/comm") as f:
                    name = f.read().strip()
                with open(f"{base}/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended
            out[name] = out.get(name, 0) + ns
        return out

    def vm(self, key="VmHWM"):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def wait_exit(self, timeout=600):
        self.p.wait(timeout=timeout)

    def kill(self):
        super().kill()
        self._collect()

    def close(self, timeout=120):
        super().close(timeout, strict=False)
        self._collect()

    def _collect(self):
        if getattr(self, "_collected", False):
            return
        self._collected = True
        self._err.close()
        try:
            with open(self.stderr_path, errors="replace") as f:
                for line in f:
                    line = _normalize(line.rstrip())
                    if line:
                        c, who = STDERR_LINES.get(line, (0, self.name))
                        STDERR_LINES[line] = (c + 1, who)
        except OSError:
            pass


_WORKDIR = [None]


def _normalize(line):
    """Stderr lines with this run's paths and ports folded, so that repeats count."""
    import re
    if _WORKDIR[0]:
        line = line.replace(_WORKDIR[0], "<workdir>")
    line = re.sub(r"<workdir>/run\d+/", "<workdir>/run*/", line)
    line = re.sub(r"tcp://127\.0\.0\.1:\d+", "tcp://127.0.0.1:<port>", line)
    line = re.sub(r"replica\d+\.db", "replicaN.db", line)
    return line


def _kill_all():
    for p in _procs:
        try:
            if p.alive():
                p.p.send_signal(signal.SIGKILL)
                p.p.wait()
        except Exception:
            pass


atexit.register(_kill_all)


class Bench:
    def __init__(self, scale, workdir):
        self.s = SCALES[scale]
        self.scale = scale
        self.dir = workdir
        self._n = 0

    def path(self, name):
        self._n += 1
        d = os.path.join(self.dir, f"run{self._n:04d}")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, name)

    def cleanup(self, *paths):
        for p in paths:
            d = os.path.dirname(p)
            shutil.rmtree(d, ignore_errors=True)
        os.sync()  # the next run does not pay for this one's writeback

    # processes
    def writer(self, kind, db, sync="NORMAL", port=None):
        argv = [PY, WORKER, "writer", db, "--kind", kind, "--sync", sync]
        if kind == "walcast":
            argv += ["--port", str(port)]
        w = Proc(argv, f"writer-{kind}", os.path.dirname(db))
        if kind == "walcast":
            assert w.ready["walcast_role"] == "primary", w.ready
        assert w.ready["journal_mode"] == "wal", w.ready
        return w

    def replica(self, db, port, name="replica"):
        n = Proc([PY, NODE, db, "--endpoint", f"tcp://127.0.0.1:{port}", "--set-role"], name, os.path.dirname(db),
                 json_cmds=False)
        assert n.ready and n.ready.get("walcast_role") == "replica", n.ready
        return n

    def reopen_replica(self, db, name="replica-restarted"):
        return Proc([PY, NODE, db], name, os.path.dirname(db), json_cmds=False)

    def converge(self, w, nodes, timeout=300):
        """walcast_wait(walcast_frame_no() of the primary) on every replica node."""
        n = w.call({"op": "sql", "sql": "SELECT walcast_frame_no()"})["rows"][0][0]
        for node in nodes:
            r = node.sql(f"SELECT walcast_wait({n}, {int(timeout * 1000)})", timeout=timeout + 30)
            if r != [[1]]:
                st = node.sql("PRAGMA walcast_status")
                raise RuntimeError(f"{node.name} did not reach frame_no {n} within {timeout} s: {st}\n"
                                   f"{node.stderr()}\n{w.stderr()}")
        return n

    def cluster(self, kind, sync="NORMAL", replicas=1, prepare=None, relayed=False):
        """A writer process and, for walcast, `replicas` replica nodes, converged.
        prepare(w) runs on the writer before the replicas are attached. relayed:
        the first replica relays (`PRAGMA walcast_relay`) and the others follow
        it, so that the primary serves one connection; readers then read the
        last replica, two hops from the primary."""
        db = self.path("primary.db")
        port = wc.free_port_pair() if kind == "walcast" else None
        w = self.writer(kind, db, sync, port)
        if prepare:
            prepare(w)
        nodes = []
        relay_port = None
        if kind == "walcast":
            for i in range(replicas):
                follows = relay_port or port
                nodes.append(self.replica(os.path.join(os.path.dirname(db), f"replica{i + 1}.db"), follows,
                                          name=f"replica{i + 1}"))
                if relayed and i == 0:
                    relay_port = wc.free_port_pair()
                    nodes[0].sql(f"PRAGMA walcast_relay = 'tcp://127.0.0.1:{relay_port}'")
            self.converge(w, nodes)
        c = Cluster(self, db, port, w, nodes)
        c.relay = nodes[0] if relay_port else None
        return c


class Cluster:
    def __init__(self, bench, db, port, w, nodes):
        self.bench, self.db, self.port, self.w, self.nodes = bench, db, port, w, nodes
        self.relay = None

    @property
    def dir(self):
        return os.path.dirname(self.db)

    def read_db(self):
        """What a reader reads: the first replica (the last, below the relay,
        when relayed), or the plain database itself."""
        if not self.nodes:
            return self.db
        return (self.nodes[-1] if self.relay else self.nodes[0]).p.args[2]

    def close(self):
        for n in self.nodes:
            n.close()
        self.w.close()
        self.bench.cleanup(self.db)


def cpu_snapshot():
    """Machine-wide busy and steal CPU seconds (/proc/stat), and the CPU seconds of
    this process and its reaped children (os.times)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    t = os.times()
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK, "steal": steal / CLK_TCK,
            "ours": t.user + t.system + t.children_user + t.children_system, "wall": time.monotonic()}


def cpu_delta(a, b):
    d = {k: b[k] - a[k] for k in a}
    d["others"] = max(0.0, d["busy"] - d["ours"])
    return d


def alternate(rep, kinds):
    """ABAB...: every repetition runs each kind once, in the same order."""
    return list(kinds)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def median_threads(runs, side):
    """Per thread name, the median over the runs of r[side] (CPU per commit by
    thread, from lag_on); a thread missing from a run counts as 0."""
    names = sorted({n for r in runs for n in r[side]})
    return {n: median([r[side].get(n, 0.0) for r in runs]) for n in names}


def pct(values, q):
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


# --- 1. primary overhead ----------------------------------------------------------------

def sec_overhead(b):
    s = b.s
    workloads = [
        ("insert_normal", "single-row INSERT commits, synchronous=NORMAL", "NORMAL",
         {"op": "commits", "seconds": s["commit_seconds"]}, None, s["commit_reps"], 0.90),
        ("insert_full", "single-row INSERT commits, synchronous=FULL", "FULL",
         {"op": "commits", "seconds": s["commit_seconds"]}, None, s["commit_reps"], 0.97),
        ("bulk", f"{s['bulk_rows']:,}-row bulk INSERT in one transaction", "NORMAL",
         {"op": "bulk", "rows": s["bulk_rows"]}, None, s["reps"], 0.95),
        ("mixed", "mixed: 80% point reads, 20% single-row UPDATE commits", "NORMAL",
         {"op": "mixed", "seconds": s["mixed_seconds"], "rows": s["mixed_rows"], "read_frac": 0.8}, s["mixed_rows"],
         s["commit_reps"], 0.95),
    ]
    out = []
    for key, title, sync, cmd, populate, reps, goal in workloads:
        runs = {"plain": [], "walcast": []}
        for rep in range(reps):
            for kind in alternate(rep, ["plain", "walcast"]):
                prep = (lambda w, n=populate: w.call({"op": "populate", "rows": n, "size": 100})) if populate else None
                c = b.cluster(kind, sync=sync, prepare=prep)
                try:
                    r = c.w.call(cmd, timeout=3600)
                    r["rate"] = r["ops"] / r["elapsed"]
                    if kind == "walcast":
                        b.converge(c.w, c.nodes)
                        r["replica_drain_s"] = (now() - r["t_end_ns"]) / 1e9
                    runs[kind].append(r)
                    log(f"overhead {key} rep {rep + 1}/{reps} {kind}: {r['rate']:,.0f} ops/s"
                        + (f" (log drain {r['log_drain_s'] * 1e3:.1f} ms, replica drain "
                           f"{r['replica_drain_s'] * 1e3:.0f} ms)" if kind == "walcast" else ""))
                finally:
                    c.close()
        p = median([r["rate"] for r in runs["plain"]])
        w = median([r["rate"] for r in runs["walcast"]])
        out.append({"key": key, "title": title, "sync": sync, "cmd": cmd, "runs": runs, "plain": p, "walcast": w,
                    "ratio": w / p, "goal": goal,
                    "log_drain_ms": median([r["log_drain_s"] * 1e3 for r in runs["walcast"]]),
                    "replica_drain_ms": median([r["replica_drain_s"] * 1e3 for r in runs["walcast"]])})
    return out


# --- 1b. the commit path, in instructions --------------------------------------------------

CG_KINDS = [("plain", "plain SQLite"), ("loaded", "walcast loaded, no role (the VFS passes everything through)"),
            ("walcast", "walcast primary (no replica attached)")]


def callgrind_main_thread_ir(prefix):
    """The instructions callgrind counted on a process's first thread (its run
    with --separate-threads=yes writes that thread's counts to PREFIX-01)."""
    with open(prefix + "-01") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {prefix}-01")


def sec_commitpath(b):
    """Instructions per single-row commit on the application thread, as
    callgrind counts them: a count, not a time, so the machine's noise does not
    move it. The difference of a short and a long run cancels start-up."""
    vg = shutil.which("valgrind")
    if not vg:
        raise RuntimeError("valgrind is not installed (make bench-deps installs it)")
    lo, hi = b.s["cg_commits"]
    # Python's hash seed changes its own instruction counts from run to run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = {"lo": lo, "hi": hi, "per_commit": {}}
    for kind, _ in CG_KINDS:
        irs = {}
        for n in (lo, hi):
            db = b.path("cg.db")
            prefix = os.path.join(os.path.dirname(db), "callgrind.out")
            argv = [vg, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={prefix}",
                    PY, WORKER, "commits", db, "--kind", kind, "--count", str(n)]
            if kind == "walcast":
                argv += ["--port", str(wc.free_port_pair())]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
            irs[n] = callgrind_main_thread_ir(prefix)
            b.cleanup(db)
        out["per_commit"][kind] = (irs[hi] - irs[lo]) / (hi - lo)
        log(f"commitpath {kind}: {out['per_commit'][kind]:,.0f} instructions per commit")
    return out


# --- 2. replication lag -------------------------------------------------------------------

def lag_run(b, kind, rate, count, replicas=1, first=1):
    """One paced run: the writer commits `count` rows at `rate`/s, a plain reader
    process polls the replica (or, for plain, the same database). Returns the lag
    samples (ns) and the run's facts."""
    c = b.cluster(kind, replicas=replicas)
    try:
        return lag_on(b, c, rate, count, first)
    finally:
        c.close()


def lag_on(b, c, rate, count, first=1, extra=None):
    last = first + count - 1
    seen_path = os.path.join(c.dir, "seen.bin")
    commit_path = os.path.join(c.dir, "commit.bin")
    reader = Proc([PY, WORKER, "lagreader", c.read_db(), "--first", str(first), "--last", str(last), "--out",
                   seen_path, "--timeout", str(count / rate + 120)], "lagreader", c.dir)
    t0 = c.w.stat_ticks()
    relay0 = c.relay.stat_ticks() if c.relay else None
    threads0 = [p.thread_cpu_ns() for p in [c.w] + c.nodes[:1]]
    r = c.w.call({"op": "paced", "rate": rate, "count": count, "first": first, "out": commit_path},
                 timeout=count / rate + 300)
    rr = reader.recv(timeout=180)
    reader.close()
    if c.nodes:
        b.converge(c.w, c.nodes)
    t1 = c.w.stat_ticks()
    relay_cpu_s = (c.relay.stat_ticks() - relay0) / CLK_TCK if c.relay else None
    # CPU per commit (µs) of each thread of the writer and of the first replica.
    threads = [{name: (ns - before.get(name, 0)) / count / 1e3 for name, ns in p.thread_cpu_ns().items()}
               for p, before in zip([c.w] + c.nodes[:1], threads0)]
    commits = array("q")
    with open(commit_path, "rb") as f:
        commits.fromfile(f, count)
    seen = array("q")
    with open(seen_path, "rb") as f:
        seen.fromfile(f, count)
    lags = sorted(s - t for s, t in zip(seen, commits) if s)
    missing = sum(1 for s in seen if not s)
    hist = rr["hist"]
    total = sum(hist)
    acc, gap_p99 = 0, None
    for i, h in enumerate(hist):
        acc += h
        if gap_p99 is None and acc >= 0.99 * total:
            gap_p99 = 1 << i  # upper bound of the bucket
    gap_max = 1 << max(i for i, h in enumerate(hist) if h) if total else None
    res = {"rate_target": rate, "rate": r["rate"], "count": count, "missing": missing, "n": len(lags),
           "p50": pct(lags, 0.5), "p99": pct(lags, 0.99), "p999": pct(lags, 0.999), "max": lags[-1] if lags else None,
           "min": lags[0] if lags else None, "early": sum(1 for x in lags if x <= 0) / max(1, len(lags)),
           "poll_ns": rr["elapsed"] * 1e9 / max(1, rr["polls"]),
           "gap_p99_ns": gap_p99, "gap_max_ns": gap_max,
           "cpu_s": (t1 - t0) / CLK_TCK, "process_time": r["process_time"], "lags": lags,
           "call_p50": r["commit_call"].get("p50"), "call_p99": r["commit_call"].get("p99"),
           "relay_cpu_s": relay_cpu_s, "writer_threads": threads[0],
           "replica_threads": threads[1] if len(threads) > 1 else {}}
    return res


def sec_lag(b):
    s = b.s
    out = []
    for rate, count in s["lag_counts"].items():
        runs = {"plain": [], "walcast": []}
        for rep in range(s["lag_reps"]):
            for kind in alternate(rep, ["plain", "walcast"]):
                r = lag_run(b, kind, rate, count)
                runs[kind].append(r)
                log(f"lag {rate}/s rep {rep + 1} {kind}: p50 {r['p50'] / 1e3:.0f} us p99 {r['p99'] / 1e3:.0f} us "
                    f"max {r['max'] / 1e3:.0f} us (poll {r['poll_ns'] / 1e3:.1f} us, achieved {r['rate']:.0f}/s, "
                    f"missing {r['missing']})")
        row = {"rate": rate, "count": count, "runs": runs}
        for kind in runs:
            for k in ("p50", "p99", "p999", "max", "poll_ns", "rate", "gap_p99_ns", "gap_max_ns", "early", "call_p50",
                      "call_p99"):
                row[f"{kind}_{k}"] = median([r[k] for r in runs[kind]])
            for side in ("writer_threads", "replica_threads"):
                row[f"{kind}_{side}"] = median_threads(runs[kind], side)
            row[f"{kind}_pooled"] = sorted(x for r in runs[kind] for x in r["lags"])
            row[f"{kind}_missing"] = sum(r["missing"] for r in runs[kind])
        for kind in runs:
            for r in runs[kind]:
                del r["lags"]
        out.append(row)
    return out


# --- 3. throughput --------------------------------------------------------------------

def throughput_trial(b, kind, seconds, txn_rows, mbps=None):
    """The writer loads transactions of txn_rows x 4000-byte rows for `seconds`
    (back to back, or paced at `mbps` MB/s of row payload); this process samples
    the replica's max(id) as a plain reader every 20 ms."""
    c = b.cluster(kind)
    try:
        samples = []
        stop = threading.Event()
        rc = None
        if kind == "walcast":
            rc = sqlite3.connect(c.read_db(), isolation_level=None, timeout=60, check_same_thread=False)

            def sample():
                while not stop.is_set():
                    m = rc.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
                    samples.append((now(), m))
                    time.sleep(0.02)
            th = threading.Thread(target=sample, daemon=True)
            th.start()
        log_path = os.path.join(c.dir, "txns.bin")
        cmd = {"op": "load", "seconds": seconds, "txn_rows": txn_rows, "size": ROW_PAYLOAD, "out": log_path}
        if mbps:
            cmd["mbps"] = mbps
        r = c.w.call(cmd, timeout=seconds + 600)
        res = {"kind": kind, "mbps_target": mbps, "elapsed": r["elapsed"], "txns": r["txns"],
               "payload_mbps": r["payload_bytes"] / r["elapsed"] / MB}
        if kind == "walcast":
            page_size = c.w.ready["page_size"]
            res["page_mbps"] = r["frames"] * page_size / r["elapsed"] / MB
            res["page_per_payload"] = r["frames"] * page_size / r["payload_bytes"]
            # Drain: until the replica shows the last row (or 120 s).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if samples and samples[-1][1] >= r["max_id"]:
                    break
                time.sleep(0.01)
            stop.set()
            th.join()
            rc.close()
            t_done = next((t for t, m in samples if m >= r["max_id"]), None)
            # (0 when the last row showed before the writer had finished its bookkeeping)
            res["drain_s"] = None if t_done is None else max(0.0, (t_done - r["t_end_ns"]) / 1e9)
            res["replica_mbps"] = (None if t_done is None else
                                   r["frames"] * page_size / ((t_done - r["t0_ns"]) / 1e9) / MB)
            txlog = array("q")
            with open(log_path, "rb") as f:
                txlog.fromfile(f, 2 * r["txns"])
            ct, last_ids = txlog[0::2], txlog[1::2]
            lagser = []
            for t, m in samples:
                if t > r["t_end_ns"]:
                    break
                i = bisect.bisect_right(last_ids, m)
                lag = (t - ct[i]) / 1e9 if i < len(ct) and ct[i] <= t else 0.0
                lagser.append(((t - r["t0_ns"]) / 1e9, lag))
            half = [x for x in lagser if x[0] >= r["elapsed"] / 2]
            res["lag_max_s"] = max((x[1] for x in lagser), default=0.0)
            res["lag_end_s"] = lagser[-1][1] if lagser else 0.0
            res["lag_slope"] = slope(half)
            res["keeps_up"] = (res["drain_s"] is not None and res["drain_s"] <= 1.0 + 0.05 * r["elapsed"]
                               and (res["lag_slope"] is None or res["lag_slope"] <= 0.05))
        return res
    finally:
        c.close()


def slope(pts):
    if len(pts) < 3:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def fmt_trial(r):
    s = f"{r['kind']}: {r.get('page_mbps', r['payload_mbps']):.0f} MB/s"
    if r["kind"] == "walcast":
        s += (f" pages, replica {r['replica_mbps'] or 0:.0f} MB/s, drain {r['drain_s']} s, lag max "
              f"{r['lag_max_s']:.2f} s slope {r['lag_slope']}, keeps up {r['keeps_up']}")
    return s


def sec_throughput(b):
    s = b.s
    runs = {"plain": [], "walcast": []}
    for rep in range(s["tp_reps"]):
        for kind in alternate(rep, ["plain", "walcast"]):
            r = throughput_trial(b, kind, s["tp_seconds"], s["tp_txn_rows"])
            runs[kind].append(r)
            log(f"throughput unpaced rep {rep + 1} {fmt_trial(r)}")
    factor = median([r["page_per_payload"] for r in runs["walcast"]])
    for r in runs["plain"]:
        r["page_mbps"] = r["payload_mbps"] * factor  # same statements, same pages
    fastest = median([r["page_mbps"] for r in runs["walcast"]])
    kept = [r for r in runs["walcast"] if r["keeps_up"]]
    search = []
    best = None
    if len(kept) * 2 > len(runs["walcast"]):
        best = fastest  # kept up, unpaced, in most repetitions (the table shows each)
    else:
        # Pace the writer at fractions of its fastest rate until the replica keeps up.
        lo_fail = fastest
        for frac in s["tp_search"]:
            target_pages = fastest * frac
            r = throughput_trial(b, "walcast", s["tp_seconds"], s["tp_txn_rows"], mbps=target_pages / factor)
            r["fraction"] = frac
            search.append(r)
            log(f"throughput paced at {frac:.2f} x fastest: {fmt_trial(r)}")
            if r["keeps_up"]:
                best = r["page_mbps"]
                # One step between the highest rate kept up with and the lowest missed.
                mid = (target_pages + lo_fail) / 2
                r2 = throughput_trial(b, "walcast", s["tp_seconds"], s["tp_txn_rows"], mbps=mid / factor)
                r2["fraction"] = mid / fastest
                search.append(r2)
                log(f"throughput paced at {mid / fastest:.2f} x fastest: {fmt_trial(r2)}")
                if r2["keeps_up"]:
                    best = max(best, r2["page_mbps"])
                break
            lo_fail = target_pages
    return {"runs": runs, "search": search, "fastest": fastest,
            "plain": median([r["page_mbps"] for r in runs["plain"]]), "best": best, "factor": factor,
            "txn_rows": s["tp_txn_rows"], "seconds": s["tp_seconds"]}


# --- 4. catch-up and bootstrap ------------------------------------------------------------

def sec_catchup(b):
    s = b.s
    txn_rows = s["catchup_txn_rows"]
    txns = -(-s["catchup_bytes"] // (txn_rows * 4096))
    runs = {"plain": [], "walcast": []}
    for rep in range(s["catchup_reps"]):
        for kind in alternate(rep, ["plain", "walcast"]):
            c = b.cluster(kind)
            try:
                if kind == "walcast":
                    node = c.nodes[0]
                    rdb = c.read_db()
                    a0 = node.sql("SELECT walcast_frame_no()")[0][0]
                    node.close()
                    c.nodes = []
                    r = c.w.call({"op": "load", "txns": txns, "txn_rows": txn_rows, "size": ROW_PAYLOAD},
                                 timeout=3600)
                    target = r["frame_no"]
                    ps = c.w.ready["page_size"]
                    behind = (target - a0) * ps
                    t0 = now()
                    n2 = b.reopen_replica(rdb)
                    c.nodes.append(n2)
                    ok = n2.sql(f"SELECT walcast_wait({target}, 600000)", timeout=700)
                    t1 = now()
                    st = json.loads(n2.sql("PRAGMA walcast_status")[0][0])
                    st_p = c.w.call({"op": "status"})
                    db_bytes = st_p["page_count"] * ps
                    # The caught-up node is stopped first: its background
                    # checkpoint of the gigabyte it just applied would otherwise
                    # take one of the two cores from the bootstrap.
                    ts = now()
                    n2.close()
                    c.nodes.remove(n2)
                    stop_s = (now() - ts) / 1e9
                    # Bootstrap: a new, empty replica of the same primary.
                    t2 = now()
                    n3 = b.replica(os.path.join(c.dir, "fresh.db"), c.port, name="replica-fresh")
                    c.nodes.append(n3)
                    ok3 = n3.sql(f"SELECT walcast_wait({target}, 600000)", timeout=700)
                    t3 = now()
                    st3 = json.loads(n3.sql("PRAGMA walcast_status")[0][0])
                    res = {"behind_bytes": behind, "catchup_s": (t1 - t0) / 1e9,
                           "catchup_from_ready_s": (t1 - n2.t_ready) / 1e9,
                           "catchup_mbps": behind / ((t1 - t0) / 1e9) / MB, "caught_up": ok == [[1]],
                           "catch_ups": st.get("catch_ups"), "bootstraps_on_catchup": st.get("bootstraps"),
                           "db_bytes": db_bytes, "bootstrap_s": (t3 - t2) / 1e9,
                           "bootstrap_from_ready_s": (t3 - n3.t_ready) / 1e9, "bootstrapped": ok3 == [[1]],
                           "bootstraps": st3.get("bootstraps"), "write_mbps": behind / r["elapsed"] / MB,
                           "caught_up_stop_s": stop_s,
                           "txns": r["txns"]}
                    log(f"catchup rep {rep + 1} walcast: {behind / MB:.0f} MB behind caught up in "
                        f"{res['catchup_s']:.2f} s = {res['catchup_mbps']:.0f} MB/s (catch_ups {res['catch_ups']}, "
                        f"bootstraps {res['bootstraps_on_catchup']}); bootstrap of {db_bytes / MB:.0f} MB in "
                        f"{res['bootstrap_s']:.2f} s")
                else:
                    r = c.w.call({"op": "load", "txns": txns, "txn_rows": txn_rows, "size": ROW_PAYLOAD},
                                 timeout=3600)
                    st_p = c.w.call({"op": "status"})
                    db_bytes = st_p["page_count"] * c.w.ready["page_size"]
                    c.w.call({"op": "checkpoint", "mode": "TRUNCATE"})
                    dst = os.path.join(c.dir, "backup.db")
                    p = subprocess.run([PY, WORKER, "backup", c.db, dst], capture_output=True, text=True,
                                       timeout=3600)
                    if p.returncode != 0:
                        raise RuntimeError(f"backup failed: {p.stderr}")
                    bk = json.loads(p.stdout)
                    res = {"write_s": r["elapsed"], "payload_bytes": r["payload_bytes"], "db_bytes": db_bytes,
                           "backup_s": bk["elapsed"], "txns": r["txns"]}
                    log(f"catchup rep {rep + 1} plain: wrote {r['payload_bytes'] / MB:.0f} MB payload in "
                        f"{r['elapsed']:.2f} s; backup of {db_bytes / MB:.0f} MB in {bk['elapsed']:.2f} s")
                runs[kind].append(res)
            finally:
                c.close()
    w = runs["walcast"]
    # Plain's write rate in MB/s of page data: its payload rate times the page data
    # walcast captured per payload byte for the same statements.
    factor = median([x["behind_bytes"] / (x["txns"] * txn_rows * ROW_PAYLOAD) for x in w])
    for x in runs["plain"]:
        x["write_mbps"] = x["payload_bytes"] * factor / x["write_s"] / MB
    return {"runs": runs, "txns": txns, "txn_rows": txn_rows,
            "catchup_mbps": median([x["catchup_mbps"] for x in w]),
            "bootstrap_s": median([x["bootstrap_s"] for x in w]),
            "behind_bytes": median([x["behind_bytes"] for x in w]),
            "db_bytes": median([x["db_bytes"] for x in w]),
            "walcast_write_mbps": median([x["write_mbps"] for x in w]),
            "plain_write_mbps": median([x["write_mbps"] for x in runs["plain"]]),
            "plain_backup_s": median([x["backup_s"] for x in runs["plain"]]),
            "plain_db_bytes": median([x["db_bytes"] for x in runs["plain"]])}


# --- 5. fan-out ---------------------------------------------------------------------------

def fanout_config(cfg):
    """"walcast16" -> (16, False); "walcast16r" -> (16, True): through a relay."""
    relayed = cfg.endswith("r")
    return int(cfg[len("walcast"):len(cfg) - relayed]), relayed


def sec_fanout(b):
    s = b.s
    # The most replicas again, through a relay: the first replica relays, the
    # others follow it.
    configs = ["plain"] + [f"walcast{n}" for n in s["fanout"]] + [f"walcast{max(s['fanout'])}r"]
    runs = {k: [] for k in configs}
    for rep in range(s["fanout_reps"]):
        for cfg in alternate(rep, configs):
            kind = "plain" if cfg == "plain" else "walcast"
            n, relayed = (0, False) if cfg == "plain" else fanout_config(cfg)
            c = b.cluster(kind, replicas=n, relayed=relayed)
            try:
                r = lag_on(b, c, s["fanout_rate"], s["fanout_count"])
                st = c.w.call({"op": "status"})
                r["replicas_seen"] = (st.get("walcast_status") or {}).get("replicas")
                r["cpu_per_commit_us"] = r["cpu_s"] / r["count"] * 1e6
                r["pt_per_commit_us"] = r["process_time"] / r["count"] * 1e6
                r["relay_cpu_per_commit_us"] = r["relay_cpu_s"] / r["count"] * 1e6 if relayed else None
                if relayed:
                    rst = json.loads(c.relay.sql("PRAGMA walcast_status")[0][0])
                    r["relay_replicas_seen"] = (rst.get("relay") or {}).get("replicas")
                del r["lags"]
                runs[cfg].append(r)
                log(f"fanout rep {rep + 1} {cfg}: CPU/commit {r['cpu_per_commit_us']:.1f} us (/proc), "
                    f"{r['pt_per_commit_us']:.1f} us (in-process clock); lag p99 {r['p99'] / 1e3:.0f} us; "
                    f"replicas connected {r['replicas_seen']}"
                    + (f"; relay CPU/commit {r['relay_cpu_per_commit_us']:.1f} us, replicas connected to it "
                       f"{r['relay_replicas_seen']}" if relayed else ""))
            finally:
                c.close()
    out = {"runs": runs, "configs": configs, "rate": s["fanout_rate"], "count": s["fanout_count"]}
    for cfg in configs:
        out[cfg] = {k: median([r[k] for r in runs[cfg]]) for k in
                    ("cpu_per_commit_us", "pt_per_commit_us", "p50", "p99", "p999", "max", "rate", "poll_ns",
                     "relay_cpu_per_commit_us")}
        out[cfg]["writer_threads"] = median_threads(runs[cfg], "writer_threads")
    return out


def fanout_thread_table(f):
    """The writer's CPU per commit by thread, for each fan-out configuration:
    which threads pay for each added replica."""
    app = "application thread (runs SQLite)"
    groups = {cfg: dict(thread_groups(f[cfg]["writer_threads"], app)) for cfg in f["configs"]}
    names = []
    for cfg in f["configs"]:
        names += [n for n in groups[cfg] if n not in names]
    labels = []
    for cfg in f["configs"]:
        if cfg == "plain":
            labels.append("plain SQLite")
        else:
            n, relayed = fanout_config(cfg)
            labels.append(f"{n} through a relay" if relayed else f"{n} replica(s)")
    L = ["**Where the primary's CPU goes**: CPU time per commit of each thread of the writer process (µs; "
         "`/proc/PID/task/TID/schedstat`, as in section 2's table; medians over the repetitions). The application "
         "thread runs SQLite and walcast's part of each commit (the commit path). Capture hands what it appended "
         "to NNG's PUB socket, which writes it to each replica's connection from the capture thread, or from "
         "NNG's task thread for a connection still busy with the previous message. On loopback, each of those "
         "writes also runs the receiving side's TCP processing.", "",
         "| thread | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in names:
        L.append(f"| {name} | " + " | ".join(f1(groups[cfg].get(name)) for cfg in f["configs"]) + " |")
    L.append("| **all threads** | " + " | ".join(f1(sum(groups[cfg].values())) for cfg in f["configs"]) + " |")
    L.append("")
    direct = [c for c in f["configs"] if c != "plain" and not fanout_config(c)[1]]
    if len(direct) > 1:
        lo, hi = groups[direct[0]].get(app), groups[direct[-1]].get(app)
        if lo and hi:
            L.append(f"The commit path alone (the application thread): {f1(lo)} µs per commit with "
                     f"{fanout_config(direct[0])[0]} replica(s), {f1(hi)} µs with {fanout_config(direct[-1])[0]}: "
                     f"{f3(hi / lo)}x.")
            L.append("")
    return L


# --- 6. memory ------------------------------------------------------------------------------

def sec_memory(b):
    s = b.s
    out = []
    for mb in s["mem_mb"]:
        runs = {"plain": [], "walcast": []}
        for rep in range(s["mem_reps"]):
            for kind in alternate(rep, ["plain", "walcast"]):
                c = b.cluster(kind)
                try:
                    res = {}
                    if kind == "walcast":
                        res["replica_hwm_before_kb"] = c.nodes[0].vm("VmHWM")
                    res["writer_hwm_before_kb"] = c.w.vm("VmHWM")
                    r = c.w.call({"op": "bigtxn", "mb": mb}, timeout=7200)
                    res["commit_s"] = r["elapsed"]
                    if kind == "walcast":
                        b.converge(c.w, c.nodes, timeout=1800)
                        res["replica_s"] = (now() - r["t_end_ns"]) / 1e9
                        res["replica_hwm_kb"] = c.nodes[0].vm("VmHWM")
                        # The replica's baseline: a plain process (replica_node.py --plain)
                        # that opens the same replica database and reads all of it.
                        pr = Proc([PY, NODE, c.read_db(), "--plain"], "plain-reader", c.dir, json_cmds=False)
                        pr.sql("SELECT count(*), sum(length(v)) FROM big", timeout=1800)
                        res["plain_reader_hwm_kb"] = pr.vm("VmHWM")
                        pr.close()
                    res["writer_hwm_kb"] = c.w.vm("VmHWM")
                    runs[kind].append(res)
                    log(f"memory {mb} MB rep {rep + 1} {kind}: writer peak {res['writer_hwm_kb'] / 1024:.1f} MB"
                        + (f", replica node peak {res['replica_hwm_kb'] / 1024:.1f} MB, plain reader "
                           f"{res['plain_reader_hwm_kb'] / 1024:.1f} MB" if kind == "walcast" else ""))
                finally:
                    c.close()
        w, p = runs["walcast"], runs["plain"]
        out.append({"mb": mb, "runs": runs,
                    "primary_walcast_mb": median([x["writer_hwm_kb"] / 1024 for x in w]),
                    "primary_plain_mb": median([x["writer_hwm_kb"] / 1024 for x in p]),
                    "replica_walcast_mb": median([x["replica_hwm_kb"] / 1024 for x in w]),
                    "replica_before_mb": median([x["replica_hwm_before_kb"] / 1024 for x in w]),
                    "replica_plain_mb": median([x["plain_reader_hwm_kb"] / 1024 for x in w]),
                    "commit_walcast_s": median([x["commit_s"] for x in w]),
                    "commit_plain_s": median([x["commit_s"] for x in p]),
                    "replica_s": median([x["replica_s"] for x in w])})
    return out


# --- 7. reader impact ---------------------------------------------------------------------

def copy_database(src, dst):
    """A copy of `src` in WAL mode, as SQLite's backup API makes it (this process
    reads a replica as any stock SQLite client does)."""
    a, z = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(z)
        z.execute("PRAGMA journal_mode=wal")
    finally:
        a.close()
        z.close()


def sec_readers(b):
    s = b.s
    rows, secs, rate = s["reader_rows"], s["reader_seconds"], s["reader_rate"]
    runs = {f"{k}_{st}": [] for k in ("plain", "walcast") for st in ("idle", "busy", "static")}
    for rep in range(s["reader_reps"]):
        for kind in alternate(rep, ["plain", "walcast"]):
            c = b.cluster(kind, prepare=lambda w: w.call({"op": "populate", "rows": rows, "size": 100}))
            try:
                if c.nodes:
                    b.converge(c.w, c.nodes)
                # "static": the same reads of a copy that nothing writes, while
                # the writer (and the replica) run as in "busy": what sharing
                # the machine costs the reader, apart from the file changing.
                static = os.path.join(c.dir, "static-copy.db")
                copy_database(c.read_db(), static)
                for state in alternate(rep, ["idle", "busy", "static"]):
                    db = static if state == "static" else c.read_db()
                    argv = [PY, WORKER, "pointreader", db, "--seconds", str(secs), "--rows", str(rows),
                            "--seed", str(rep)]
                    if state != "idle":
                        count = int(rate * (secs + 1.5))
                        first = c.w.call({"op": "sql", "sql": "SELECT max(id) FROM t"})["rows"][0][0] + 1
                        c.w.send({"op": "paced", "rate": rate, "count": count, "first": first})
                        time.sleep(0.5)
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 120)
                    if p.returncode != 0:
                        raise RuntimeError(f"pointreader failed: {p.stderr}")
                    r = json.loads(p.stdout)
                    if state != "idle":
                        wr = c.w.recv(timeout=secs + 600)
                        r["writer_rate"] = wr["rate"]
                        if c.nodes:
                            b.converge(c.w, c.nodes)
                    runs[f"{kind}_{state}"].append(r)
                    log(f"readers rep {rep + 1} {kind} {state}: p50 {r['p50'] / 1e3:.1f} us p99 {r['p99'] / 1e3:.1f} "
                        f"us p99.9 {r['p999'] / 1e3:.1f} us max {r['max'] / 1e3:.0f} us ({r['n']} reads"
                        + (f", writer {r['writer_rate']:.0f}/s" if state != "idle" else "") + ")")
            finally:
                c.close()
    out = {"runs": runs, "rows": rows, "seconds": secs, "rate": rate}
    for k, v in runs.items():
        out[k] = {q: median([r[q] for r in v]) for q in ("p50", "p99", "p999", "max", "n")}
        if not k.endswith("idle"):
            out[k]["writer_rate"] = median([r["writer_rate"] for r in v])
    return out


# --- plot -----------------------------------------------------------------------------------

def plot_lag(lag, path, force_builtin=False):
    """CDF of the lag at each rate (log x), walcast solid, plain-SQLite floor dashed."""
    series = []
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, row in enumerate(lag):
        col = colors[i % len(colors)]
        series.append((f"walcast, {row['rate']:,} commits/s", row["walcast_pooled"], col, False))
        series.append((f"plain SQLite (same file), {row['rate']:,}/s", row["plain_pooled"], col, True))
    if not force_builtin:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None
        if plt is not None:
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6), dpi=100)
            for label, xs, col, dashed in series:
                if not xs:
                    continue
                us_ = [max(x / 1e3, 1.0) for x in xs]  # lags of 1 µs or less (even negative) drawn at 1 µs
                n = len(us_)
                style = dict(color=col, linestyle="--" if dashed else "-", linewidth=1.0 if dashed else 1.7,
                             label=label)
                ax.step(us_, [(k + 1) / n for k in range(n)], where="post", **style)
                # Tail: the fraction of commits whose lag exceeds x (down to one commit).
                ax2.step(us_, [max((n - k - 1) / n, 0.5 / n) for k in range(n)], where="post", **style)
            for a_ in (ax, ax2):
                a_.set_xscale("log")
                a_.grid(True, which="both", alpha=0.3)
                a_.axvline(300, color="grey", linewidth=0.9, linestyle=":")
                a_.axvline(2000, color="grey", linewidth=0.9, linestyle=":")
                a_.set_xlabel("lag (µs): commit returned on the primary -> row visible to a reader of the replica")
            ax.set_ylim(0, 1.0)
            ax.set_ylabel("fraction of commits with lag ≤ x (CDF)")
            ax.text(300, 0.5, " p50 goal\n (300 µs)", fontsize=8, color="dimgrey")
            ax.text(2000, 0.25, " p99 goal\n (2 ms)", fontsize=8, color="dimgrey")
            ax2.set_yscale("log")
            ax2.set_ylabel("fraction of commits with lag > x (tail, log scale)")
            ax2.axhline(0.01, color="grey", linewidth=0.9, linestyle=":")
            ax2.axhline(0.001, color="grey", linewidth=0.9, linestyle=":")
            ax2.text(ax2.get_xlim()[0], 0.01, " p99", fontsize=8, color="dimgrey", va="bottom")
            ax2.text(ax2.get_xlim()[0], 0.001, " p99.9", fontsize=8, color="dimgrey", va="bottom")
            fig.suptitle("walcast replication lag over tcp loopback, all repetitions pooled. Solid: walcast "
                         "replica; dashed: the same writer and reader on one plain SQLite file (the method's floor)",
                         fontsize=10)
            handles, labels = ax.get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
            fig.tight_layout(rect=(0, 0.1, 1, 0.95))
            fig.savefig(path)
            plt.close(fig)
            return "matplotlib"
    builtin_cdf_png(series, path)
    return "builtin"


# A tiny PNG writer for machines without matplotlib: the same CDF, raster only,
# with digit labels on the decades of the x axis (µs).

_DIGITS = {  # 3x5 bitmaps
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111",
}


def _hex(c):
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


def builtin_cdf_png(series, path, w=720, h=420):
    import math
    px = bytearray(b"\xff" * (w * h * 3))

    def put(x, y, col):
        if 0 <= x < w and 0 <= y < h:
            i = (y * w + x) * 3
            px[i:i + 3] = bytes(col)

    left, right, top, bottom = 50, w - 20, 20, h - 40
    allx = [x for _, xs, _, _ in series for x in xs]
    lo = 0 if not allx else math.floor(math.log10(max(min(allx) / 1e3, 1.0)))
    hi = 1 if not allx else max(lo + 1, math.ceil(math.log10(max(max(allx) / 1e3, 10.0))))

    def xpix(us):
        v = (math.log10(max(us, 1.0)) - lo) / (hi - lo)
        return int(left + min(max(v, 0.0), 1.0) * (right - left))

    def ypix(f):
        return int(bottom - f * (bottom - top))

    grid = (220, 220, 220)
    for d in range(lo, hi + 1):
        x = xpix(10 ** d)
        for y in range(top, bottom + 1):
            put(x, y, grid)
        label = str(10 ** d) if d < 7 else f"1{'0' * d}"
        for k, ch in enumerate(label):
            bits = _DIGITS[ch]
            for j in range(15):
                if bits[j] == "1":
                    for sx in range(2):
                        for sy in range(2):
                            put(x - len(label) * 4 + k * 8 + (j % 3) * 2 + sx, bottom + 8 + (j // 3) * 2 + sy,
                                (0, 0, 0))
    for q in (0.25, 0.5, 0.75, 1.0):
        for x in range(left, right + 1):
            put(x, ypix(q), grid)
    for x in range(left, right + 1):
        put(x, bottom, (0, 0, 0))
    for y in range(top, bottom + 1):
        put(left, y, (0, 0, 0))
    for _, xs, col, dashed in series:
        if not xs:
            continue
        rgb = _hex(col)
        n = len(xs)
        prev = None
        for k in range(0, n, max(1, n // 4000)):
            p = (xpix(xs[k] / 1e3), ypix((k + 1) / n))
            if prev is not None:
                x0, y0 = prev
                x1, y1 = p
                steps = max(abs(x1 - x0), abs(y1 - y0), 1)
                for t in range(steps + 1):
                    x = x0 + (x1 - x0) * t // steps
                    y = y0 + (y1 - y0) * t // steps
                    if not dashed or (x + y) % 6 < 3:
                        put(x, y, rgb)
                        put(x, y + 1, rgb)
            prev = p
        if prev is not None:
            x, y = prev
            for xx in range(x, right + 1):
                if not dashed or xx % 6 < 3:
                    put(xx, ypix(1.0), rgb)
    raw = b"".join(b"\x00" + bytes(px[r * w * 3:(r + 1) * w * 3]) for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# --- the report ---------------------------------------------------------------------------------

def machine():
    def read(p):
        try:
            with open(p) as f:
                return f.read()
        except OSError:
            return ""
    cpu = next((line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), "unknown")
    mem = next((line.split(":", 1)[1].strip() for line in read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), "unknown")
    mem_gib = f"{int(mem.split()[0]) / (1 << 20):.1f} GiB" if mem != "unknown" else mem

    def git(*a):
        p = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else "unknown"
    so = wc.EXT + ".so"
    try:
        with open(so, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:12]
        st = os.stat(so)
        build = (f"`{os.path.relpath(so, ROOT)}` (cargo --release), {st.st_size / 1e6:.1f} MB, built "
                 f"{datetime.datetime.fromtimestamp(st.st_mtime).strftime('%Y-%m-%d %H:%M:%S')}, sha256 {sha}")
    except OSError:
        build = "missing"
    dirty = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    shell_v = subprocess.run([wc.SQLITE3, "--version"], capture_output=True, text=True).stdout.split()
    return {
        "cores": os.cpu_count(), "cpu": cpu, "mem": mem_gib, "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version, "sqlite_shell": shell_v[0] if shell_v else "unknown",
        "python": platform.python_version(), "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(dirty), "dirty_files": dirty.replace("\n", "; "), "build": build,
        "loadavg": read("/proc/loadavg").split()[:3],
    }


class Goals:
    def __init__(self):
        self.items = []

    def add(self, section, what, measured, op, target, unit, fmt):
        if measured is None:
            met, by = False, "not measured"
        elif op == ">=":
            met = measured >= target
            by = "" if met else (f"short by {fmt(target - measured)}{unit} "
                                 f"({(target - measured) / target:.1%} below the goal)")
        else:
            met = measured <= target
            by = "" if met else f"over by {fmt(measured - target)}{unit} ({measured / target:.2f}x the goal)"
        g = {"section": section, "what": what, "measured": measured, "op": op, "target": target, "unit": unit,
             "fmt": fmt, "met": met, "by": by}
        self.items.append(g)
        return g

    def cell(self, g):
        if g["measured"] is None:
            return "**not measured**"
        return "yes" if g["met"] else f"**NO**, {g['by']}"


def f2(x):
    return "n/a" if x is None else f"{x:.2f}"


def f3(x):
    return "n/a" if x is None else f"{x:.3f}"


def f0(x):
    return "n/a" if x is None else f"{x:,.0f}"


def f1(x):
    return "n/a" if x is None else f"{x:,.1f}"


def us(ns):
    return "n/a" if ns is None else (f"{ns / 1e3:,.0f}" if abs(ns) >= 10_000 else f"{ns / 1e3:,.1f}")


def runs_list(xs, fmt=f0):
    return ", ".join(fmt(x) for x in xs)


def thread_groups(threads, app):
    """A process's CPU per commit by thread, NNG's threads summed, its main
    thread named `app`; as (name, µs) in a fixed order."""
    groups = {}
    for name, v in threads.items():
        # Thread names are cut to 15 characters.
        key = ("NNG's threads" if name.startswith("nng:") else app if name == "python3"
               else "walcast-checkpoint" if name == "walcast-checkpo" else name)
        groups[key] = groups.get(key, 0.0) + v
    order = [app, "walcast-capture", "walcast-publish", "walcast-catchup", "walcast-replica", "walcast-checkpoint",
             "NNG's threads"]
    return sorted(groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def thread_cpu_table(lag):
    """Where the CPU goes, per commit, on the writer and the replica at each rate."""
    rates = [r["rate"] for r in lag]
    rows = {}

    def add(label, rate, v):
        rows.setdefault(label, {})[rate] = v

    for r in lag:
        plain_app = sum(r["plain_writer_threads"].values())
        add("plain SQLite: the writer process (its one thread)", r["rate"], plain_app)
        w = thread_groups(r["walcast_writer_threads"], "application thread (runs SQLite)")
        for name, v in w:
            add(f"walcast primary: {name}", r["rate"], v)
        total = sum(v for _, v in w)
        add("walcast primary: **all threads, beyond plain**", r["rate"], total - plain_app)
        rep = thread_groups(r["walcast_replica_threads"], "main thread (replica_node.py)")
        for name, v in rep:
            add(f"walcast replica: {name}", r["rate"], v)
        add("walcast replica: **all threads**", r["rate"], sum(v for _, v in rep))
    L = ["**Where the CPU goes**: CPU time per commit of each thread of the writer process and of the replica "
         "process (µs; `/proc/PID/task/TID/schedstat`, from the start of the paced run until the replica "
         "converged, divided by the commits; medians over the repetitions). walcast's threads run at nice 10, "
         "SCHED_BATCH. Above about 1,200 commits/s capture copies several commits per pass, so the cost per "
         "commit falls with the rate.", "",
         "| thread | " + " | ".join(f"{x:,}/s" for x in rates) + " |",
         "|---|" + "---|" * len(rates)]
    for label, by_rate in rows.items():
        L.append(f"| {label} | " + " | ".join(f1(by_rate.get(x)) for x in rates) + " |")
    L.append("")
    return L


def render(res, errors, meta, args, goals, plot_how, plot_name, elapsed):
    m = meta
    L = []
    cmd_base = f"BENCH_SCALE={args.scale} /usr/bin/python3 scripts/bench.py"

    def section_cmd(name):
        return f"`{cmd_base} --only {name} --out /tmp/{name}.md`"
    L.append("# walcast benchmarks")
    L.append("")
    invocation = (f"`/usr/bin/python3 scripts/bench.py --scale {args.scale}"
                  + (f" --only {args.only}" if args.only else "") + f" --out {os.path.basename(args.out)}`")
    L.append(f"Generated by " + (f"`make bench` ({invocation})" if not args.only else invocation)
             + f" on {m['date']}, in {elapsed / 60:.1f} minutes, at commit "
             f"`{m['commit']}`" + (f" **with uncommitted changes** to {m['dirty_files']}" if m["dirty"] else "")
             + f". Scale: **{args.scale}**" + (" (tiny sizes: a smoke test of the harness, not a measurement)"
                                               if args.scale == "smoke" else "") + ".")
    L.append("")
    L.append("| machine | |")
    L.append("|---|---|")
    L.append(f"| cores (nproc) | {m['cores']} |")
    L.append(f"| CPU | {m['cpu']} |")
    L.append(f"| memory (MemTotal) | {m['mem']} |")
    L.append(f"| kernel | {m['kernel']} |")
    L.append(f"| SQLite | {m['sqlite']} (Debian's python3 `sqlite3` module, used by every process here); "
             f"shell {m['sqlite_shell']} |")
    L.append(f"| Python | {m['python']} (/usr/bin/python3) |")
    L.append(f"| walcast build | {m['build']} |")
    L.append(f"| load average at start | {' '.join(m['loadavg'])} |")
    L.append("")
    L.append("## How to read this")
    L.append("")
    L.append("- Every client is a real, separate process (`scripts/bench_worker.py`, and `tests/replica_node.py` for "
             "replicas). The **plain** process never loads walcast: SQLite in WAL mode. The **walcast** process loads "
             "it, and its database is a primary (`PRAGMA walcast_endpoint='tcp://127.0.0.1:P'; PRAGMA "
             "walcast_role='primary'`) with one replica node attached over tcp loopback and converged "
             "(`walcast_wait`) before timing starts. The writer process holds the primary open, so walcast's capture "
             "and publisher threads run in it, and its replica applies in another process on the same 2 cores.")
    L.append("- Same process kind, same statements. Plain and walcast runs alternate (plain, walcast, plain, walcast, "
             "...), each on a fresh database; a figure is the median over the repetitions listed beside it.")
    L.append("- **ratio = walcast / plain** from the same run. For rates, higher is better; for CPU, time and "
             "memory, lower is.")
    L.append("- MB = 10^6 bytes; GiB = 2^30. \"Page data\" is walcast frames x page size (4096).")
    L.append("- Each section's command is given; `make bench` runs them all. Nothing is dropped: every "
             "repetition's figure is in the tables.")
    L.append("")
    if m.get("load"):
        L.append("The machine was not reserved for this run. CPU seconds used while each section ran, by this run's "
                 "processes and by everything else (from `/proc/stat` and the run's own `os.times()`), out of "
                 f"{m['cores']} cores x the wall time; steal is time the hypervisor took:")
        L.append("")
        L.append("| section | wall (s) | this run's CPU (s) | other processes' CPU (s) | steal (s) |")
        L.append("|---|---|---|---|---|")
        for name, d in m["load"].items():
            L.append(f"| {name} | {d['wall']:.0f} | {d['ours']:.1f} | {d['others']:.1f} | {d['steal']:.1f} |")
        L.append("")
    missed = [g for g in goals.items if not g["met"]]
    L.append("## Goals missed")
    L.append("")
    if errors:
        for name, tb in errors.items():
            L.append(f"- **Section `{name}` failed** (see its section); its goals are not measured.")
    if not missed:
        L.append("None: every goal below was met in this run.")
    for g in missed:
        L.append(f"- **{g['section']}** {g['what']}: {fmt_measured(g)} against a goal of "
                 f"{g['op'].replace('>=', '≥').replace('<=', '≤')} {g['fmt'](g['target'])}{g['unit']}: {g['by']}.")
    L.append("")
    L.append("## All goals")
    L.append("")
    L.append("| section | goal | measured | target | met? |")
    L.append("|---|---|---|---|---|")
    for g in goals.items:
        L.append(f"| {g['section']} | {g['what']} | {fmt_measured(g)} | "
                 f"{g['op'].replace('>=', '≥').replace('<=', '≤')} {g['fmt'](g['target'])}{g['unit']} | "
                 f"{goals.cell(g)} |")
    L.append("")

    def err(name):
        if name in errors:
            L.append("**This section failed:**")
            L.append("")
            L.append("```")
            L.append(errors[name].strip()[-4000:])
            L.append("```")
            L.append("")
            return True
        if name not in res:
            L.append("Not run in this invocation (`--only`).")
            L.append("")
            return True
        return False

    def section_head(heading, name):
        """A section's heading and command; False when it has nothing more to show."""
        L.append(heading)
        L.append("")
        L.append(f"Command: {section_cmd(name)}")
        L.append("")
        return not err(name)

    # 1
    if section_head("## 1. Primary overhead", "overhead"):
        L.append("The writer process runs the workload on its own database; walcast's has a replica attached. "
                 "Figures are operations per second as the writer sees them (the timed window ends when the last "
                 "commit returns). walcast's capture runs beside the writer and its work may end after the window: "
                 "the two right-hand columns say how long after the window walcast's log held every commit "
                 "(`walcast_frame_no()`), and the replica had applied it. Statements:")
        L.append("")
        L.append("- commits: `INSERT INTO t(k, v) VALUES (?, ?)` (100-byte blob), autocommit, for "
                 f"{res['overhead'][0]['cmd']['seconds']} s;")
        L.append("- bulk: `BEGIN`; `executemany(\"INSERT INTO t(k, v) VALUES (?, ?)\")` of the rows; `COMMIT` "
                 "(rows/s);")
        L.append("- mixed: over a table of " + f"{SCALES[args.scale]['mixed_rows']:,} rows, 80% "
                 "`SELECT k, v FROM t WHERE id = ?` and 20% `UPDATE t SET k = k + 1, v = ? WHERE id = ?` "
                 "(autocommit), random ids, the same seeded sequence in every run (operations/s).")
        L.append("")
        L.append("| workload | plain (ops/s) | walcast (ops/s) | ratio | goal | met? | log holds all (ms after) | "
                 "replica applied all (ms after) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in res["overhead"]:
            g = r["goal_item"]
            L.append(f"| {r['title']} | {f0(r['plain'])} | {f0(r['walcast'])} | **{f3(r['ratio'])}** | "
                     f"≥ {r['goal']:.2f} | {goals.cell(g)} | {f1(r['log_drain_ms'])} | {f0(r['replica_drain_ms'])} |")
        L.append("")
        L.append("Every repetition (ops/s, in the order run):")
        L.append("")
        for r in res["overhead"]:
            L.append(f"- {r['title']}: plain {runs_list([x['rate'] for x in r['runs']['plain']])}; walcast "
                     f"{runs_list([x['rate'] for x in r['runs']['walcast']])}")
        L.append("")
    if section_head("### The commit path, in instructions", "commitpath"):
        cp = res["commitpath"]
        L.append("What walcast adds to each commit on the application's own thread, counted rather than timed: "
                 "callgrind (valgrind) counts the instructions that thread executes for single-row INSERT commits "
                 f"(synchronous=NORMAL, `bench_worker.py commits`), a {cp['hi']:,}-commit run minus a "
                 f"{cp['lo']:,}-commit run, divided by {cp['hi'] - cp['lo']:,}. A count does not move with the "
                 "machine's noise, but it is not time: cache misses, waits and the other threads' work (capture, "
                 "NNG, the replica process, all sharing the 2 cores in the table above) are not in it. The primary "
                 "here has no replica attached: replicas cost the capture thread, not this one (section 5).")
        L.append("")
        L.append("| | instructions per commit | vs plain |")
        L.append("|---|---|---|")
        base = cp["per_commit"]["plain"]
        for kind, title in CG_KINDS:
            v = cp["per_commit"][kind]
            L.append(f"| {title} | {v:,.0f} | {v / base:.3f} |")
        L.append("")

    # 2
    if section_head("## 2. Replication lag", "lag"):
        L.append("The writer commits single-row INSERTs with explicit ids, paced at the rate (sleeping on an "
                 "absolute schedule, never spinning), and records `time.monotonic_ns()` (CLOCK_MONOTONIC, one clock "
                 "for every process) as each commit returns. A separate reader process, without walcast, polls the "
                 "replica with `SELECT max(id) FROM t` in a tight loop, each poll its own read transaction, and "
                 "records when each id first shows. Lag = seen - committed. Its resolution is the polling period "
                 "(below). The reader's tight loop keeps one of the machine's cores busy; the writer, walcast's "
                 "threads and the replica's applier share what is left. The **plain** column runs the same writer "
                 "and reader on one plain SQLite file: the floor "
                 "of this method on this machine. A lag can be zero or negative: the row is visible before the "
                 "commit call has returned to the writer (SQLite publishes a commit in the wal-index and then "
                 "returns; when the writer's thread is descheduled in between, even walcast's threads and the "
                 "replica can finish first). The table gives the share of such commits; the plot draws them at "
                 "1 µs. Figures are medians over the repetitions of each percentile, in µs.")
        L.append("")
        L.append("**Commit call**: how long the writer's `execute()` of each commit took, what the application "
                 "waits for (p50 / p99, µs). It shows what walcast costs a paced writer where throughput figures "
                 "cannot: work that runs on SQLite's thread, or that preempts it, before the call returns.")
        L.append("")
        L.append("| rate (commits/s) | achieved | commits per run | walcast p50 | p99 | p99.9 | max | plain p50 "
                 "| p99 | "
                 "p99.9 | max | poll period (walcast / plain) | p99 gap between polls | seen before the commit "
                 "returned | unseen | commit call p50 (walcast / plain) | commit call p99 (walcast / plain) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["lag"]:
            L.append(f"| {r['rate']:,} | {f0(r['walcast_rate'])} | {r['count']:,} | **{us(r['walcast_p50'])}** | "
                     f"**{us(r['walcast_p99'])}** | {us(r['walcast_p999'])} | {us(r['walcast_max'])} | "
                     f"{us(r['plain_p50'])} | {us(r['plain_p99'])} | {us(r['plain_p999'])} | {us(r['plain_max'])} | "
                     f"{us(r['walcast_poll_ns'])} / {us(r['plain_poll_ns'])} | ≤ {us(r['walcast_gap_p99_ns'])} / "
                     f"≤ {us(r['plain_gap_p99_ns'])} | {r['walcast_early']:.1%} / {r['plain_early']:.1%} | "
                     f"{r['walcast_missing']} / {r['plain_missing']} | "
                     f"{us(r['walcast_call_p50'])} / {us(r['plain_call_p50'])} | "
                     f"{us(r['walcast_call_p99'])} / {us(r['plain_call_p99'])} |")
        L.append("")
        L.extend(thread_cpu_table(res["lag"]))
        L.append("| goal (1,000 commits/s) | walcast | plain floor | ratio | target | met? |")
        L.append("|---|---|---|---|---|---|")
        r1k = next((r for r in res["lag"] if r["rate"] == 1000), None)
        if r1k:
            for q, g in (("p50", r1k["goal_p50"]), ("p99", r1k["goal_p99"])):
                p = r1k[f"plain_{q}"]
                ratio = r1k[f"walcast_{q}"] / p if p and p > 0 else None
                L.append(f"| {q} | {us(r1k[f'walcast_{q}'])} µs | {us(p)} µs | {f2(ratio)} | "
                         f"≤ {g['fmt'](g['target'])} µs | "
                         f"{goals.cell(g)} |")
        L.append("")
        L.append(f"![lag distribution]({plot_name})")
        L.append("")
        L.append(f"`{plot_name}`: the CDF of every lag sample, all repetitions pooled (drawn with {plot_how}).")
        L.append("")
        L.append("Every repetition (walcast p50 / p99 / p99.9 / max, µs):")
        L.append("")
        for r in res["lag"]:
            for kind in ("walcast", "plain"):
                L.append(f"- {r['rate']:,}/s {kind}: " + " | ".join(
                    f"{us(x['p50'])} / {us(x['p99'])} / {us(x['p999'])} / {us(x['max'])} (achieved {x['rate']:.0f}/s, "
                    f"poll {us(x['poll_ns'])} µs, max gap ≤ {us(x['gap_max_ns'])} µs, commit call p50 "
                    f"{us(x['call_p50'])} µs)" for x in r["runs"][kind]))
        L.append("")

    # 3
    if section_head("## 3. Throughput", "throughput"):
        t = res["throughput"]
        L.append(f"The writer loads transactions of {t['txn_rows']:,} rows of {ROW_PAYLOAD:,}-byte random blobs "
                 f"(`WITH RECURSIVE ... INSERT INTO t(k, v) SELECT x, randomblob({ROW_PAYLOAD}) FROM c`), back to "
                 f"back for {t['seconds']} s: the primary's fastest bulk load. This process samples the replica's "
                 "`max(id)` every 20 ms as a plain reader; lag at a sample = its time minus the commit time of the "
                 "oldest transaction not yet visible. **Keeps up** means: the replica shows the last row within "
                 "1 s + 5% of the window after the writer stops, and the lag's slope over the window's second half "
                 "is at most 0.05 s/s (not growing). When it does not keep up at full speed, the writer is paced at "
                 "fractions of that speed until it does. Page data: walcast frames x 4096; plain's rate uses the "
                 f"page data walcast captured per payload byte for the same statements ({f3(t['factor'])}).")
        L.append("")
        L.append("| | MB/s of page data |")
        L.append("|---|---|")
        L.append(f"| plain SQLite, fastest bulk load | {f0(t['plain'])} |")
        ratio = t["fastest"] / t["plain"] if t["plain"] and t["fastest"] else None
        L.append(f"| walcast primary, fastest bulk load | {f0(t['fastest'])} (ratio to plain **{f3(ratio)}**) |")
        nk = sum(1 for r in t["runs"]["walcast"] if r["keeps_up"])
        L.append(f"| highest rate the replica kept up with | **{f0(t['best'])}** (unpaced: kept up in {nk} of "
                 f"{len(t['runs']['walcast'])} repetitions) |")
        L.append(f"| goal: keeps up with the walcast primary's fastest bulk load | "
                 f"{goals.cell(t['goal_item'])} |")
        L.append("")
        L.append("Every trial:")
        L.append("")
        L.append("| trial | target | primary MB/s (page data) | replica MB/s (to last row visible) | "
                 "drain after stop (s) | "
                 "max lag (s) | lag slope, 2nd half (s/s) | keeps up |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in t["runs"]["plain"]:
            L.append(f"| plain, unpaced | - | {f0(r['page_mbps'])} | - | - | - | - | - |")
        for r in t["runs"]["walcast"] + t["search"]:
            tgt = "unpaced" if not r.get("fraction") else f"{r['fraction']:.2f} x fastest"
            L.append(f"| walcast | {tgt} | {f0(r['page_mbps'])} | {f0(r['replica_mbps'])} | {f2(r['drain_s'])} | "
                     f"{f2(r['lag_max_s'])} | {f3(r['lag_slope'])} | {'yes' if r['keeps_up'] else 'no'} |")
        L.append("")

    # 4
    if section_head("## 4. Catch-up and bootstrap", "catchup"):
        c = res["catchup"]
        L.append(f"Catch-up: a converged replica node is stopped (stdin closed), the primary commits {c['txns']} "
                 f"transactions of {c['txn_rows']:,} x {ROW_PAYLOAD:,}-byte rows ({c['behind_bytes'] / MB:,.0f} MB of "
                 "page data), the node is started again and runs `walcast_wait(primary's frame_no)`; the time runs "
                 "from starting the node process to that call returning (process start included). Bootstrap: a "
                 f"new, empty replica of the same primary ({c['db_bytes'] / MB:,.0f} MB database), timed the same "
                 "way, once the caught-up node has stopped (its background checkpoint of the gigabyte it applied "
                 "would otherwise take one of the 2 cores from the bootstrap: 5.6-6.4 s with it on 2026-12-06). Plain SQLite baselines: the same transactions written by a plain process (MB/s of page "
                 "data), and SQLite's online backup API (`Connection.backup`) copying that plain database into a "
                 "new file.")
        L.append("")
        L.append("| | walcast | plain SQLite | ratio | goal | met? |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| catch-up rate, MB/s of page data (plain: writing the same transactions) | "
                 f"**{f0(c['catchup_mbps'])}** | {f0(c['plain_write_mbps'])} | "
                 f"{f3(c['catchup_mbps'] / c['plain_write_mbps'] if c['plain_write_mbps'] else None)} | ≥ 300 | "
                 f"{goals.cell(c['goal_catchup'])} |")
        L.append(f"| bootstrap, s (plain: online backup of a database of {c['plain_db_bytes'] / MB:,.0f} MB) | "
                 f"**{f2(c['bootstrap_s'])}** | {f2(c['plain_backup_s'])} | "
                 f"{f3(c['bootstrap_s'] / c['plain_backup_s'] if c['plain_backup_s'] else None)} | ≤ 5 | "
                 f"{goals.cell(c['goal_bootstrap'])} |")
        L.append(f"| the primary's own write rate for those transactions, MB/s | {f0(c['walcast_write_mbps'])} | "
                 f"{f0(c['plain_write_mbps'])} | "
                 f"{f3(c['walcast_write_mbps'] / c['plain_write_mbps'] if c['plain_write_mbps'] else None)} | | |")
        L.append("")
        L.append("Every repetition:")
        L.append("")
        for x in c["runs"]["walcast"]:
            L.append(f"- walcast: {x['behind_bytes'] / MB:,.0f} MB behind, caught up in {x['catchup_s']:.2f} s "
                     f"({x['catchup_from_ready_s']:.2f} s from the node's ready line) = {x['catchup_mbps']:,.0f} MB/s"
                     f" (catch_ups {x['catch_ups']}, bootstraps {x['bootstraps_on_catchup']}); the caught-up node "
                     f"stopped in {x.get('caught_up_stop_s', 0):.2f} s; bootstrap of "
                     f"{x['db_bytes'] / MB:,.0f} MB in {x['bootstrap_s']:.2f} s ({x['bootstrap_from_ready_s']:.2f} s "
                     f"from ready; bootstraps {x['bootstraps']})")
        for x in c["runs"]["plain"]:
            L.append(f"- plain: wrote in {x['write_s']:.2f} s ({x['write_mbps']:,.0f} MB/s); backup of "
                     f"{x['db_bytes'] / MB:,.0f} MB in {x['backup_s']:.2f} s")
        L.append("")

    # 5
    if section_head("## 5. Fan-out", "fanout"):
        f = res["fanout"]
        L.append(f"The writer commits {f['count']:,} single-row INSERTs paced at {f['rate']:,}/s with N replica nodes "
                 "attached (each its own process), converged first. CPU per commit: utime+stime of the writer "
                 "process (which runs walcast's capture and publisher threads) from `/proc/PID/stat` before and "
                 "after, until every replica has converged, divided by the commits; the next column is the "
                 "writer's own CLOCK_PROCESS_CPUTIME_ID over the paced loop (ns resolution, a cross-check of the "
                 "10 ms ticks). Lag p99 as in section 2, read from the first replica; plain: the same writer and "
                 "reader on one plain file.")
        L.append("")
        L.append("**Through a relay**: the first replica relays (`PRAGMA walcast_relay`), the other replicas "
                 "follow it rather than the primary, and the primary serves one connection; lag is read from the "
                 "last replica, two hops away. The relay is a replica process like the others, on the same 2 "
                 "cores: its CPU per commit is in the last column (it does the per-replica sends the primary "
                 "does when every replica connects to it).")
        L.append("")
        L.append("| | CPU per commit (µs, /proc) | CPU per commit (µs, in-process clock) | vs plain | vs 1 replica "
                 "| lag p50 (µs) "
                 "| lag p99 (µs) | lag max (µs) | achieved rate | relay's CPU per commit (µs) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        base = f["plain"]["cpu_per_commit_us"]
        one = f[f["configs"][1]]["cpu_per_commit_us"] if len(f["configs"]) > 1 else None
        for cfg in f["configs"]:
            x = f[cfg]
            if cfg == "plain":
                label = "plain SQLite"
            else:
                n, relayed = fanout_config(cfg)
                label = (f"walcast, {n} replicas through a relay (1 relay, {n - 1} below it)" if relayed
                         else f"walcast, {n} replica(s)")
            L.append(f"| {label} | {f1(x['cpu_per_commit_us'])} | {f1(x['pt_per_commit_us'])} | "
                     f"{f3(x['cpu_per_commit_us'] / base if base else None)} | "
                     f"{f3(x['cpu_per_commit_us'] / one if one and cfg != 'plain' else None)} | {us(x['p50'])} | "
                     f"{us(x['p99'])} | {us(x['max'])} | {f0(x['rate'])} | {f1(x.get('relay_cpu_per_commit_us'))} |")
        L.append("")
        L.append(f"Goal: the primary's CPU per commit grows ≤ 5% from 1 to {fanout_config(f['configs'][-1])[0]} "
                 f"replicas. Each replica connected to the primary: {goals.cell(f['goal_item'])}. Through a relay: "
                 f"{goals.cell(f['goal_relayed'])}.")
        L.append("")
        L.extend(fanout_thread_table(f))
        L.append("Every repetition (CPU per commit µs /proc, in-process; lag p99 µs):")
        L.append("")
        for cfg in f["configs"]:
            L.append(f"- {cfg}: " + " | ".join(f"{f1(x['cpu_per_commit_us'])}, {f1(x['pt_per_commit_us'])}; "
                                               f"p99 {us(x['p99'])}"
                                               + (f"; relay {f1(x['relay_cpu_per_commit_us'])}"
                                                  if x.get("relay_cpu_per_commit_us") is not None else "")
                                               for x in f["runs"][cfg]))
        L.append("")

    # 6
    if section_head("## 6. Memory", "memory"):
        L.append("Peak RSS (VmHWM from `/proc/PID/status`). Primary: the writer process commits one transaction "
                 "of 256 KiB `randomblob`s with `cache_size=-16000` (walcast: captured, published and applied by "
                 "the replica before the figure is read); plain: the same transaction in a plain process. Replica: "
                 "the replica node process (tests/replica_node.py with walcast: it applies the transaction) against "
                 "a plain process (`replica_node.py --plain`) that opens the same replica database and reads all of "
                 "it (`SELECT count(*), sum(length(v)) FROM big`). Both are Debian python3 processes; the "
                 "difference is walcast's cost.")
        L.append("")
        L.append("| transaction | process | walcast (MB) | plain (MB) | above plain (MB) | ratio | goal | met? |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in res["memory"]:
            L.append(f"| {r['mb']:,} MB | primary (writer) | {f1(r['primary_walcast_mb'])} | "
                     f"{f1(r['primary_plain_mb'])} | "
                     f"**{f1(r['primary_walcast_mb'] - r['primary_plain_mb'])}** | "
                     f"{f3(r['primary_walcast_mb'] / r['primary_plain_mb'])} | ≤ +32 | "
                     f"{goals.cell(r['goal_primary'])} |")
            L.append(f"| {r['mb']:,} MB | replica (applier; {f1(r['replica_before_mb'])} MB before the transaction) | "
                     f"{f1(r['replica_walcast_mb'])} | {f1(r['replica_plain_mb'])} | "
                     f"**{f1(r['replica_walcast_mb'] - r['replica_plain_mb'])}** | "
                     f"{f3(r['replica_walcast_mb'] / r['replica_plain_mb'])} | ≤ +32 | "
                     f"{goals.cell(r['goal_replica'])} |")
        L.append("")
        L.append("Every repetition (peak MB):")
        L.append("")
        for r in res["memory"]:
            w_ = r["runs"]["walcast"]
            L.append(f"- {r['mb']:,} MB: primary walcast {runs_list([x['writer_hwm_kb'] / 1024 for x in w_], f1)}; "
                     f"primary plain {runs_list([x['writer_hwm_kb'] / 1024 for x in r['runs']['plain']], f1)}; "
                     f"replica node {runs_list([x['replica_hwm_kb'] / 1024 for x in r['runs']['walcast']], f1)}; "
                     f"plain reader {runs_list([x['plain_reader_hwm_kb'] / 1024 for x in r['runs']['walcast']], f1)}; "
                     f"commit s walcast {runs_list([x['commit_s'] for x in r['runs']['walcast']], f2)}, plain "
                     f"{runs_list([x['commit_s'] for x in r['runs']['plain']], f2)}; replica applied "
                     f"{runs_list([x['replica_s'] for x in r['runs']['walcast']], f2)} s after the commit")
        L.append("")

    # 7
    if section_head("## 7. Reader impact", "readers"):
        r = res["readers"]
        L.append(f"A reader process without walcast runs random point reads `SELECT k, v FROM t WHERE id = ?` over "
                 f"{r['rows']:,} rows in a tight loop for {r['seconds']} s, timing each. **walcast**: it reads the "
                 f"replica, idle, then while the replica applies {r['rate']:,} commits/s (single-row INSERTs paced on "
                 "the primary). **plain**: it reads a plain SQLite file, idle, then while a plain writer process "
                 f"commits {r['rate']:,}/s to that same file. Latencies in µs, medians over repetitions.")
        L.append("")
        L.append("**Static copy**: the same reads, while the same writes go on, of a copy of the database that "
                 "nothing writes (made with SQLite's backup API before the runs). The machine is shared as in busy, "
                 "but the file read does not change: on 2 cores the primary's writer, walcast's threads and the "
                 "replica's applier all run beside the reader. What busy adds to it is what the changing file costs "
                 "the reader: SQLite empties a reader's page cache whenever it finds a new snapshot, and looks up "
                 "each page in the WAL first.")
        L.append("")
        L.append("| | idle p50 | idle p99 | busy p50 | busy p99 | busy p99.9 | busy max | writer rate | busy/idle p99 "
                 "| goal | met? | static copy p99 | static copy/idle p99 |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for kind in ("walcast", "plain"):
            i, bz, st = r[f"{kind}_idle"], r[f"{kind}_busy"], r[f"{kind}_static"]
            ratio = bz["p99"] / i["p99"] if i["p99"] else None
            st_ratio = st["p99"] / i["p99"] if i["p99"] and st["p99"] else None
            label = ("walcast replica, applying" if kind == "walcast" else "plain SQLite, local writer")
            L.append(f"| {label} | {us(i['p50'])} | {us(i['p99'])} | {us(bz['p50'])} | {us(bz['p99'])} | "
                     f"{us(bz['p999'])} | "
                     f"{us(bz['max'])} | {f0(bz['writer_rate'])}/s | **{f2(ratio)}** | "
                     + ("≤ 1.20 | " + goals.cell(r["goal_item"]) if kind == "walcast" else "(reference) | ")
                     + f" | {us(st['p99'])} | {f2(st_ratio)} |")
        L.append("")
        L.append("Every repetition (p50 / p99 µs):")
        L.append("")
        for k, v in r["runs"].items():
            L.append(f"- {k}: " + " | ".join(f"{us(x['p50'])} / {us(x['p99'])}" for x in v))
        L.append("")

    L.append("## walcast messages and other stderr output")
    L.append("")
    if STDERR_LINES:
        L.append("Distinct lines written to stderr by the processes of this run (count, first process):")
        L.append("")
        L.append("```")
        for line, (n, who) in list(STDERR_LINES.items())[:60]:
            L.append(f"{n:5d}x [{who}] {line[:300]}")
        if len(STDERR_LINES) > 60:
            L.append(f"... and {len(STDERR_LINES) - 60} more distinct lines")
        L.append("```")
    else:
        L.append("None: no process wrote to stderr.")
    L.append("")
    return "\n".join(L)


def fmt_measured(g):
    if g["measured"] is None:
        return "not measured"
    return f"{g['fmt'](g['measured'])}{g['unit']}"


def evaluate(res, goals, only):
    if "overhead" in res:
        for r in res["overhead"]:
            unit = {"mixed": "ops/s", "bulk": "rows/s"}.get(r["key"], "commits/s")
            r["goal_item"] = goals.add("1. overhead", f"{r['title']}: walcast/plain {unit}", r["ratio"], ">=",
                                       r["goal"], "x", f3)
    elif "overhead" in only:
        for what, t in (("single-row INSERT commits, synchronous=NORMAL", 0.90),
                        ("single-row INSERT commits, synchronous=FULL", 0.97), ("1M-row bulk insert", 0.95),
                        ("mixed read/write", 0.95)):
            goals.add("1. overhead", what, None, ">=", t, "x", f3)
    if "lag" in res:
        r1k = next((r for r in res["lag"] if r["rate"] == 1000), None)
        if r1k:
            r1k["goal_p50"] = goals.add("2. lag", "p50 at 1,000 commits/s", r1k["walcast_p50"] / 1e3, "<=", 300,
                                        " µs", f0)
            r1k["goal_p99"] = goals.add("2. lag", "p99 at 1,000 commits/s", r1k["walcast_p99"] / 1e3, "<=", 2000,
                                        " µs", f0)
    elif "lag" in only:
        goals.add("2. lag", "p50 at 1,000 commits/s", None, "<=", 300, " µs", f0)
        goals.add("2. lag", "p99 at 1,000 commits/s", None, "<=", 2000, " µs", f0)
    if "throughput" in res:
        t = res["throughput"]
        t["goal_item"] = goals.add("3. throughput", "replica keeps up with the primary's fastest bulk load "
                                   "(highest rate kept up with / fastest, MB/s of page data)",
                                   None if t["best"] is None and t["fastest"] is None else
                                   (t["best"] or 0) / t["fastest"], ">=", 1.0, "x", f3)
    elif "throughput" in only:
        goals.add("3. throughput", "replica keeps up with the primary's fastest bulk load", None, ">=", 1.0, "x", f3)
    if "catchup" in res:
        c = res["catchup"]
        c["goal_catchup"] = goals.add("4. catch-up", f"catch-up of a replica {c['behind_bytes'] / GIB:.2f} GiB behind",
                                      c["catchup_mbps"], ">=", 300, " MB/s", f0)
        c["goal_bootstrap"] = goals.add("4. bootstrap", f"bootstrap of a {c['db_bytes'] / GIB:.2f} GiB database",
                                        c["bootstrap_s"], "<=", 5, " s", f2)
    elif "catchup" in only:
        goals.add("4. catch-up", "catch-up of a replica 1 GiB behind", None, ">=", 300, " MB/s", f0)
        goals.add("4. bootstrap", "bootstrap of a 1 GiB database", None, "<=", 5, " s", f2)
    if "fanout" in res:
        f = res["fanout"]
        a = f[f["configs"][1]]
        n = fanout_config(f["configs"][-1])[0]

        def growth(cfg):
            z = f[cfg]
            return z["cpu_per_commit_us"] / a["cpu_per_commit_us"] if a["cpu_per_commit_us"] else None
        f["goal_item"] = goals.add("5. fan-out", f"primary CPU per commit, {n} replicas / 1 replica, each "
                                   "connected to the primary", growth(f"walcast{n}"), "<=", 1.05, "x", f3)
        f["goal_relayed"] = goals.add("5. fan-out", f"primary CPU per commit, {n} replicas through a relay / 1 "
                                      "replica", growth(f"walcast{n}r"), "<=", 1.05, "x", f3)
    elif "fanout" in only:
        goals.add("5. fan-out", "primary CPU per commit, 16 replicas / 1 replica, each connected to the primary",
                  None, "<=", 1.05, "x", f3)
        goals.add("5. fan-out", "primary CPU per commit, 16 replicas through a relay / 1 replica", None, "<=", 1.05,
                  "x", f3)
    if "memory" in res:
        for r in res["memory"]:
            r["goal_primary"] = goals.add("6. memory", f"primary peak RSS above plain, {r['mb']:,} MB transaction",
                                          r["primary_walcast_mb"] - r["primary_plain_mb"], "<=", 32, " MB", f1)
            r["goal_replica"] = goals.add("6. memory", f"replica peak RSS above plain, {r['mb']:,} MB transaction",
                                          r["replica_walcast_mb"] - r["replica_plain_mb"], "<=", 32, " MB", f1)
    elif "memory" in only:
        goals.add("6. memory", "peak RSS above plain, 1 GB transaction", None, "<=", 32, " MB", f1)
    if "readers" in res:
        r = res["readers"]
        i, bz = r["walcast_idle"], r["walcast_busy"]
        r["goal_item"] = goals.add("7. readers", f"replica point-read p99 applying {r['rate']:,} commits/s / idle",
                                   bz["p99"] / i["p99"] if i["p99"] else None, "<=", 1.2, "x", f2)
    elif "readers" in only:
        goals.add("7. readers", "replica point-read p99 applying 10,000 commits/s / idle", None, "<=", 1.2, "x", f2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("BENCH_SCALE", "smoke"))
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--workdir", help="where the databases go (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--plot", choices=["auto", "builtin"], default=os.environ.get("BENCH_PLOT", "auto"))
    args = ap.parse_args()
    if args.scale not in SCALES:
        ap.error(f"unknown scale {args.scale}")
    if not os.path.exists(wc.EXT + ".so"):
        sys.exit(f"{wc.EXT}.so is missing: run `make` first")
    only = SECTIONS if not args.only else [x.strip() for x in args.only.split(",")]
    for x in only:
        if x not in SECTIONS:
            ap.error(f"unknown section {x}; expected one of {', '.join(SECTIONS)}")
    args.out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot_path = os.path.splitext(args.out)[0] + "-lag.png"
    meta = machine()
    meta["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="walcast-bench-"))
    os.makedirs(workdir, exist_ok=True)
    _WORKDIR[0] = workdir
    b = Bench(args.scale, workdir)
    t_start = time.monotonic()
    res, errors, load = {}, {}, {}
    fns = {"overhead": sec_overhead, "commitpath": sec_commitpath, "lag": sec_lag, "throughput": sec_throughput, "catchup": sec_catchup,
           "fanout": sec_fanout, "memory": sec_memory, "readers": sec_readers}
    log(f"scale {args.scale}, sections {','.join(only)}, workdir {workdir}")
    try:
        for name in only:
            c0 = cpu_snapshot()
            log(f"== {name}")
            try:
                res[name] = fns[name](b)
            except Exception:
                errors[name] = traceback.format_exc()
                log(f"section {name} FAILED:\n{errors[name]}")
                _kill_all()
            d = cpu_delta(c0, cpu_snapshot())
            load[name] = d
            log(f"== {name} took {d['wall']:.0f} s; CPU s: ours {d['ours']:.1f}, other processes {d['others']:.1f}, "
                f"steal {d['steal']:.1f}")
    finally:
        _kill_all()
        for p in _procs:
            p._collect()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    goals = Goals()
    evaluate(res, goals, only)
    plot_how = "not drawn"
    if "lag" in res:
        plot_how = plot_lag(res["lag"], plot_path, force_builtin=args.plot == "builtin")
    elapsed = time.monotonic() - t_start
    meta["load"] = load
    text = render(res, errors, meta, args, goals, plot_how, os.path.basename(plot_path), elapsed)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    log(f"wrote {args.out}" + (f" and {plot_path} ({plot_how})" if "lag" in res else "") +
        f" in {elapsed:.0f} s")
    missed = [g for g in goals.items if not g["met"]]
    for g in missed:
        log(f"goal missed: {g['section']} {g['what']}: {fmt_measured(g)} ({g['by']})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
