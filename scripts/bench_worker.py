"""The processes scripts/bench.py measures. Each is a real, separate Debian python3
process; only `writer --kind walcast` loads walcast.

  bench_worker.py writer DB --kind plain|walcast [--port P] [--sync NORMAL|FULL]
      Opens DB (plain: without walcast, WAL mode; walcast: walcast loaded, WAL
      mode, then `PRAGMA walcast_endpoint='tcp://127.0.0.1:P'` and
      `PRAGMA walcast_role='primary'`, so this process publishes), creates
      t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB), prints `ready <json>` and
      serves one JSON command per line of stdin with one JSON line (see OPS).

  bench_worker.py lagreader DB --first A --last B --out FILE [--timeout S]
      Without walcast. Polls `SELECT max(id) FROM t` in a tight loop (each in a
      fresh read transaction: autocommit) and records, for each id in A..B, the
      CLOCK_MONOTONIC time of the first poll that saw it. Prints `ready`, polls
      until it has seen B (or the timeout), writes the times (int64 ns, one per
      id) to FILE and prints one JSON line with the polling statistics.

  bench_worker.py pointreader DB --seconds S --rows N [--seed X]
      Without walcast. Random point reads `SELECT k, v FROM t WHERE id = ?`
      (ids 1..N) in a tight loop for S seconds, each timed; prints one JSON line
      with the latency percentiles.

  bench_worker.py commits DB --kind plain|loaded|walcast --count N [--port P]
      Opens DB as `writer` does (loaded: walcast loaded, no role), makes N
      single-row INSERT commits (synchronous=NORMAL) and prints one JSON line.
      The benchmark runs it under callgrind to count the commit path's
      instructions.

  bench_worker.py backup SRC DST
      Without walcast: SQLite's online backup API copies SRC into DST; prints the
      elapsed seconds.
"""
import argparse
import json
import os
import random
import sqlite3
import sys
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB)"
CTE_ROWS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "INSERT INTO t(k, v) SELECT x, randomblob(?) FROM c")


def now():
    return time.monotonic_ns()


def proc_cpu_ticks():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def percentiles(values):
    """p50/p99/p99.9/max of a list of ints (sorted in place)."""
    if not values:
        return {"n": 0}
    values.sort()
    n = len(values)

    def p(q):
        return values[min(n - 1, int(q * n))]
    return {"n": n, "p50": p(0.5), "p99": p(0.99), "p999": p(0.999), "max": values[-1], "min": values[0],
            "mean": sum(values) / n}


# --- the writer ----------------------------------------------------------------

class Writer:
    def __init__(self, a):
        self.kind = a.kind
        self.db = a.db
        if a.kind in ("walcast", "loaded"):
            import wc
            wc.load()
        self.c = sqlite3.connect(a.db, isolation_level=None, timeout=60, check_same_thread=False)
        c = self.c
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"journal_mode is {mode}")
        c.execute(f"PRAGMA synchronous={a.sync}")
        c.execute(SCHEMA)
        if a.kind == "walcast":
            c.execute(f"PRAGMA walcast_endpoint = 'tcp://127.0.0.1:{a.port}'").fetchall()
            c.execute("PRAGMA walcast_role = 'primary'").fetchall()
        self.blob = os.urandom(100)

    def info(self):
        c = self.c
        d = {"kind": self.kind, "pid": os.getpid(), "synchronous": c.execute("PRAGMA synchronous").fetchone()[0],
             "journal_mode": c.execute("PRAGMA journal_mode").fetchone()[0],
             "page_size": c.execute("PRAGMA page_size").fetchone()[0]}
        if self.kind == "walcast":
            d["walcast_role"] = c.execute("PRAGMA walcast_role").fetchone()[0]
            d["frame_no"] = self.frame_no()
        return d

    def frame_no(self):
        if self.kind != "walcast":
            return None
        return self.c.execute("SELECT walcast_frame_no()").fetchone()[0]

    def max_id(self):
        return self.c.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]

    # OPS ------------------------------------------------------------------

    def op_info(self, m):
        return self.info()

    def op_sql(self, m):
        return {"rows": [list(r) for r in self.c.execute(m["sql"]).fetchall()]}

    def op_populate(self, m):
        """m["rows"] rows of m["size"]-byte blobs, one transaction, in SQL."""
        t0 = now()
        self.c.execute("BEGIN")
        self.c.execute(CTE_ROWS, (m["rows"], m.get("size", 100)))
        self.c.execute("COMMIT")
        return {"elapsed": (now() - t0) / 1e9, "max_id": self.max_id(), "frame_no": self.frame_no()}

    def op_commits(self, m):
        """Single-row INSERT commits (autocommit), for m["seconds"]."""
        c, v = self.c, self.blob
        stmt = "INSERT INTO t(k, v) VALUES (?, ?)"
        dur = int(m["seconds"] * 1e9)
        n = 0
        t0 = now()
        end = t0 + dur
        while True:
            for _ in range(64):
                c.execute(stmt, (n, v))
                n += 1
            t = now()
            if t >= end:
                break
        return {"ops": n, "elapsed": (t - t0) / 1e9, **self.drain(t)}

    def op_bulk(self, m):
        """m["rows"] rows inserted in one transaction (executemany of one prepared INSERT)."""
        c, v = self.c, self.blob
        t0 = now()
        c.execute("BEGIN")
        c.executemany("INSERT INTO t(k, v) VALUES (?, ?)", ((i, v) for i in range(m["rows"])))
        c.execute("COMMIT")
        t = now()
        return {"ops": m["rows"], "elapsed": (t - t0) / 1e9, **self.drain(t)}

    def op_mixed(self, m):
        """Random point reads (m["read_frac"]) and single-row UPDATE commits over ids
        1..m["rows"], for m["seconds"]; the same seeded sequence in every run."""
        c, v = self.c, self.blob
        rnd = random.Random(m.get("seed", 7))
        nrows, rf = m["rows"], m.get("read_frac", 0.8)
        read = "SELECT k, v FROM t WHERE id = ?"
        write = "UPDATE t SET k = k + 1, v = ? WHERE id = ?"
        dur = int(m["seconds"] * 1e9)
        n = reads = 0
        t0 = now()
        end = t0 + dur
        while True:
            for _ in range(64):
                i = rnd.randint(1, nrows)
                if rnd.random() < rf:
                    c.execute(read, (i,)).fetchone()
                    reads += 1
                else:
                    c.execute(write, (v, i))
                n += 1
            t = now()
            if t >= end:
                break
        return {"ops": n, "reads": reads, "elapsed": (t - t0) / 1e9, **self.drain(t)}

    def drain(self, t_end):
        """After a timed window: how long until walcast's log holds every commit
        (walcast_frame_no() brings it up to date). Not part of the timed window."""
        if self.kind != "walcast":
            return {}
        f = self.frame_no()
        return {"frame_no": f, "log_drain_s": (now() - t_end) / 1e9, "t_end_ns": t_end}

    def op_paced(self, m):
        """Single-row INSERTs with explicit ids m["first"].., paced at m["rate"]
        commits/s (sleeping, never spinning, on an absolute schedule), m["count"]
        of them; the CLOCK_MONOTONIC time each commit returned goes to m["out"].
        Also returns how long each commit call took (percentiles, ns)."""
        c, v = self.c, self.blob
        first, count, rate = m["first"], m["count"], m["rate"]
        stmt = "INSERT INTO t(id, k, v) VALUES (?, ?, ?)"
        times = array("q", bytes(8 * count))
        calls = array("q", bytes(8 * count))
        period = 1e9 / rate
        cpu0, pt0 = proc_cpu_ticks(), time.process_time()
        t0 = now() + 2_000_000
        sleep = time.sleep
        for i in range(count):
            target = t0 + int(i * period)
            d = target - now()
            if d > 0:
                sleep(d / 1e9)
            t = now()
            c.execute(stmt, (first + i, i, v))
            times[i] = now()
            calls[i] = times[i] - t
        t1 = times[-1] if count else now()
        cpu1, pt1 = proc_cpu_ticks(), time.process_time()
        if m.get("out"):
            with open(m["out"], "wb") as f:
                times.tofile(f)
        return {"ops": count, "elapsed": (t1 - t0) / 1e9, "rate": count / max(1e-9, (t1 - t0) / 1e9),
                "cpu_ticks": cpu1 - cpu0, "process_time": pt1 - pt0, "t_end_ns": t1, "frame_no": self.frame_no(),
                "commit_call": percentiles(calls.tolist())}

    def op_load(self, m):
        """Bulk load: transactions of m["txn_rows"] rows of m["size"]-byte random
        blobs, back to back (or paced at m["mbps"] MB/s of row payload when given),
        for m["seconds"] or until m["frames"] walcast frames / m["txns"]
        transactions. Records each commit's (time, last id) into m["out"]."""
        c = self.c
        rows, size = m["txn_rows"], m["size"]
        txn_payload = rows * size
        interval = txn_payload / (m["mbps"] * 1e6) * 1e9 if m.get("mbps") else 0
        dur = int(m.get("seconds", 1e6) * 1e9)
        frames_goal = m.get("frames")
        txns_goal = m.get("txns")
        f0 = self.frame_no()
        log = array("q")
        cpu0 = time.process_time()
        t0 = now()
        k = 0
        while True:
            if interval:
                d = t0 + int(k * interval) - now()
                if d > 0:
                    time.sleep(d / 1e9)
            c.execute("BEGIN")
            c.execute(CTE_ROWS, (rows, size))
            c.execute("COMMIT")
            t = now()
            k += 1
            log.append(t)
            log.append(self.c.execute("SELECT last_insert_rowid()").fetchone()[0])
            if txns_goal is not None:
                if k >= txns_goal:
                    break
            elif frames_goal is not None:
                if k % 16 == 0 and self.frame_no() - f0 >= frames_goal:
                    break
            elif t - t0 >= dur:
                break
        t_end = now()
        cpu = time.process_time() - cpu0
        f1 = self.frame_no()
        if m.get("out"):
            with open(m["out"], "wb") as f:
                log.tofile(f)
        return {"txns": k, "rows": k * rows, "elapsed": (t_end - t0) / 1e9, "t0_ns": t0, "t_end_ns": t_end,
                "frames": None if f0 is None else f1 - f0, "frame_no": f1, "process_time": cpu,
                "payload_bytes": k * txn_payload, "max_id": self.max_id()}

    def op_bigtxn(self, m):
        """One transaction of m["mb"] MB: 256 KiB random blobs, cache_size=-16000
        (as tests/test_big_transaction.py)."""
        c = self.c
        c.execute("CREATE TABLE IF NOT EXISTS big(id INTEGER PRIMARY KEY, v BLOB)")
        c.execute("PRAGMA cache_size=-16000")
        hwm0 = vm("VmHWM")
        t0 = now()
        c.execute("BEGIN")
        for _ in range(m["mb"] * 4):
            c.execute("INSERT INTO big(v) VALUES (randomblob(262144))")
        c.execute("COMMIT")
        t = now()
        return {"elapsed": (t - t0) / 1e9, "hwm_before_kb": hwm0, "hwm_after_commit_kb": vm("VmHWM"),
                **self.drain(t)}

    def op_status(self, m):
        d = {"hwm_kb": vm("VmHWM"), "rss_kb": vm("VmRSS"), "cpu_ticks": proc_cpu_ticks(),
             "process_time": time.process_time(), "max_id": self.max_id(), "frame_no": self.frame_no(),
             "page_count": self.c.execute("PRAGMA page_count").fetchone()[0]}
        if self.kind == "walcast":
            d["walcast_status"] = json.loads(self.c.execute("PRAGMA walcast_status").fetchone()[0])
        return d

    def op_checkpoint(self, m):
        return {"rows": self.c.execute(f"PRAGMA wal_checkpoint({m.get('mode', 'PASSIVE')})").fetchall()}


def serve_writer(a):
    try:
        w = Writer(a)
        info = w.info()
    except Exception as e:
        print("error " + json.dumps({"error": str(e), "type": type(e).__name__}), flush=True)
        return 1
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        m = json.loads(line)
        try:
            out = getattr(w, "op_" + m["op"])(m)
        except Exception as e:
            out = {"error": str(e), "type": type(e).__name__}
        print(json.dumps(out), flush=True)
    w.c.close()
    return 0


# --- readers (never load walcast) ------------------------------------------------

def lagreader(a):
    c = sqlite3.connect(a.db, isolation_level=None, timeout=60, check_same_thread=False)
    first, last = a.first, a.last
    n = last - first + 1
    seen = array("q", bytes(8 * n))
    q = "SELECT max(id) FROM t"
    hist = [0] * 64  # log2 histogram of the gaps between polls (ns)
    print("ready", flush=True)
    ex = c.execute
    t_start = prev = now()
    deadline = t_start + int(a.timeout * 1e9)
    polls = 0
    top = first - 1
    while True:
        m = ex(q).fetchone()[0] or 0
        t = now()
        polls += 1
        hist[(t - prev).bit_length()] += 1
        prev = t
        if m > top:
            hi = min(m, last)
            for i in range(max(top + 1, first), hi + 1):
                seen[i - first] = t
            top = m
            if top >= last:
                break
        if t > deadline:
            break
    t_end = now()
    with open(a.out, "wb") as f:
        seen.tofile(f)
    print(json.dumps({"polls": polls, "elapsed": (t_end - t_start) / 1e9, "hist": hist, "top": top,
                      "complete": top >= last}), flush=True)
    return 0


def pointreader(a):
    c = sqlite3.connect(a.db, isolation_level=None, timeout=60, check_same_thread=False)
    rnd = random.Random(a.seed)
    q = "SELECT k, v FROM t WHERE id = ?"
    ex = c.execute
    ex(q, (1,)).fetchone()
    lat = array("q")
    misses = 0
    t_start = now()
    end = t_start + int(a.seconds * 1e9)
    while True:
        ids = [rnd.randint(1, a.rows) for _ in range(256)]
        for i in ids:
            t0 = now()
            r = ex(q, (i,)).fetchone()
            t1 = now()
            lat.append(t1 - t0)
            if r is None:
                misses += 1
        if t1 >= end:
            break
    vals = lat.tolist()
    out = percentiles(vals)
    out.update({"elapsed": (now() - t_start) / 1e9, "misses": misses})
    print(json.dumps(out), flush=True)
    return 0


def commits(a):
    w = Writer(a)
    c, v = w.c, w.blob
    stmt = "INSERT INTO t(k, v) VALUES (?, ?)"
    for i in range(a.count):
        c.execute(stmt, (i, v))
    print(json.dumps({"commits": a.count, "role": c.execute("PRAGMA walcast_role").fetchone()[0]
                      if a.kind != "plain" else None}), flush=True)
    c.close()
    return 0


def backup(a):
    src = sqlite3.connect(a.src)
    dst = sqlite3.connect(a.dst)
    t0 = now()
    src.backup(dst)
    dst.close()
    t = now()
    print(json.dumps({"elapsed": (t - t0) / 1e9, "bytes": os.path.getsize(a.dst), "hwm_kb": vm("VmHWM")}),
          flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer")
    w.add_argument("db")
    w.add_argument("--kind", choices=["plain", "walcast"], required=True)
    w.add_argument("--port", type=int)
    w.add_argument("--sync", default="NORMAL")
    r = sub.add_parser("lagreader")
    r.add_argument("db")
    r.add_argument("--first", type=int, required=True)
    r.add_argument("--last", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("pointreader")
    p.add_argument("db")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=11)
    n = sub.add_parser("commits")
    n.add_argument("db")
    n.add_argument("--kind", choices=["plain", "loaded", "walcast"], required=True)
    n.add_argument("--count", type=int, required=True)
    n.add_argument("--port", type=int)
    n.add_argument("--sync", default="NORMAL")
    b = sub.add_parser("backup")
    b.add_argument("src")
    b.add_argument("dst")
    a = ap.parse_args()
    return {"writer": serve_writer, "lagreader": lagreader, "pointreader": pointreader, "commits": commits,
            "backup": backup}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
