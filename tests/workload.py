"""Randomized workload generator: run as a separate process against a database.

  workload.py DB --seed S --ops N [--role] [--page-size P] [--conns K]
              [--snapshots DIR] [--commit-log FILE] [--sync normal|full]
              [--no-checkpoints] [--no-vacuum] [--invariants]

Inserts, updates and deletes of random sizes, rolled-back transactions,
savepoints, big transactions that spill pages into the WAL before commit and
rewrite them, every checkpoint mode, VACUUM (which shrinks the database), schema
changes, across several connections. Every committed transaction adds a row to
`ledger`; with --commit-log its number is appended to FILE after COMMIT returns,
so a test can check that no committed transaction was lost. With --snapshots, at
random points the database is checkpointed into its file and copied to
DIR/snap-<frame_no>.db (frame_no from walcast_frame_no()).

With --invariants (the database must already have test_replica.py's
INVARIANT_SETUP tables: acct, a, b), every committed transaction also moves an
amount between two accounts, debited right after BEGIN and credited at the end,
and inserts that amount into `a` at the start and into `b` at the end. A reader
that ever sees a part of a transaction (count(a) != count(b), or a different
sum of balances) has seen it torn.
"""
import argparse
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--role", action="store_true", help="set walcast_role='primary' at start")
    ap.add_argument("--page-size", type=int, default=0)
    ap.add_argument("--conns", type=int, default=3)
    ap.add_argument("--snapshots")
    ap.add_argument("--commit-log")
    ap.add_argument("--sync", default="normal")
    ap.add_argument("--no-checkpoints", action="store_true")
    ap.add_argument("--no-vacuum", action="store_true")
    ap.add_argument("--plain", action="store_true", help="do not load walcast")
    ap.add_argument("--invariants", action="store_true", help="every commit also keeps acct, a and b invariant")
    a = ap.parse_args()
    rnd = random.Random(a.seed)

    def open_conn():
        if a.plain:
            import sqlite3
            c = sqlite3.connect(a.db, isolation_level=None, timeout=60)
        else:
            c = wc.connect(a.db, timeout=60)
        c.execute(f"PRAGMA synchronous={a.sync}")
        return c

    first = open_conn()
    if a.page_size:
        first.execute(f"PRAGMA page_size={a.page_size}")
    first.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
    first.execute("CREATE INDEX IF NOT EXISTS t_k ON t(k)")
    first.execute("CREATE TABLE IF NOT EXISTS ledger(n INTEGER PRIMARY KEY, who TEXT)")
    if a.role:
        r = first.execute("PRAGMA walcast_role='primary'").fetchone()
        assert r == ("primary",), r
    conns = [first] + [open_conn() for _ in range(a.conns - 1)]
    commit_log = os.open(a.commit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if a.commit_log else None
    who = f"{os.getpid()}-{a.seed}"
    next_n = [a.seed * 10_000_000]

    def blob():
        return rnd.randbytes(rnd.choice([8, 100, 700, 3000, 9000, 30000]))

    pending = {}  # connection -> (credited account, amount) of its open transaction

    def begin(c):
        c.execute("BEGIN IMMEDIATE")
        if a.invariants:
            x, y, amt = rnd.randint(1, 100), rnd.randint(1, 100), rnd.randint(1, 50)
            c.execute("UPDATE acct SET bal = bal - ? WHERE id = ?", (amt, x))
            c.execute("INSERT INTO a(v, pad) VALUES (?, randomblob(?))", (amt, rnd.choice([10, 400, 3000, 9000])))
            pending[c] = (y, amt)

    def ledger(c):
        next_n[0] += 1
        c.execute("INSERT INTO ledger(n, who) VALUES (?, ?)", (next_n[0], who))
        if a.invariants:
            y, amt = pending.pop(c)
            c.execute("UPDATE acct SET bal = bal + ? WHERE id = ?", (amt, y))
            c.execute("INSERT INTO b(v, pad) VALUES (?, randomblob(?))", (amt, rnd.choice([10, 400, 3000])))
        return next_n[0]

    def committed(n):
        if commit_log is not None:
            os.write(commit_log, f"{n}\n".encode())

    def max_id(c):
        return c.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]

    def op_insert(c):
        begin(c)
        for _ in range(rnd.randint(1, 20)):
            c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (rnd.randint(0, 1000), blob()))
        n = ledger(c)
        c.execute("COMMIT")
        committed(n)

    def op_update(c):
        begin(c)
        m = max_id(c)
        for _ in range(rnd.randint(1, 10)):
            c.execute("UPDATE t SET v = ?, k = k + 1 WHERE id = ?", (blob(), rnd.randint(1, m + 1)))
        n = ledger(c)
        c.execute("COMMIT")
        committed(n)

    def op_delete(c):
        begin(c)
        m = max_id(c)
        lo = rnd.randint(1, m + 1)
        c.execute("DELETE FROM t WHERE id BETWEEN ? AND ?", (lo, lo + rnd.randint(0, 40)))
        n = ledger(c)
        c.execute("COMMIT")
        committed(n)

    def op_rollback(c):
        begin(c)
        for _ in range(rnd.randint(1, 30)):
            c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (-1, blob()))
        c.execute("UPDATE t SET k = -2 WHERE id % 7 = 0")
        c.execute("ROLLBACK")

    def op_savepoint(c):
        begin(c)
        c.execute("SAVEPOINT a")
        c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (-3, blob()))
        c.execute("SAVEPOINT b")
        c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (-4, blob()))
        c.execute("ROLLBACK TO b")
        c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (5, blob()))
        c.execute("RELEASE b")
        c.execute("ROLLBACK TO a")
        c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (6, blob()))
        c.execute("RELEASE a")
        n = ledger(c)
        c.execute("COMMIT")
        committed(n)

    def op_big(c):
        # A tiny page cache makes SQLite spill dirty pages into the WAL before
        # commit, then rewrite some of them in place: each page must appear once
        # in the log's transaction, with its final content.
        c.execute("PRAGMA cache_size=4")
        begin(c)
        start = max_id(c)
        for _ in range(rnd.randint(100, 600)):
            c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (rnd.randint(0, 1000), rnd.randbytes(rnd.choice([500, 3000, 6000]))))
        c.execute("UPDATE t SET v = randomblob(length(v)), k = k + 7 WHERE id > ? AND id % 3 = 0", (start,))
        c.execute("SAVEPOINT s")
        c.execute("DELETE FROM t WHERE id > ? AND id % 5 = 0", (start,))
        c.execute("ROLLBACK TO s")
        c.execute("RELEASE s")
        n = ledger(c)
        c.execute("COMMIT")
        c.execute("PRAGMA cache_size=-2000")
        committed(n)

    def op_big_rollback(c):
        c.execute("PRAGMA cache_size=4")
        begin(c)
        for _ in range(rnd.randint(100, 400)):
            c.execute("INSERT INTO t(k, v) VALUES (?, ?)", (-9, rnd.randbytes(3000)))
        c.execute("ROLLBACK")
        c.execute("PRAGMA cache_size=-2000")

    def op_checkpoint(c):
        if a.no_checkpoints:
            return
        mode = rnd.choice(["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
        c.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

    def op_vacuum(c):
        if a.no_vacuum:
            return
        c.execute("DELETE FROM t WHERE id % 4 = 0")
        c.execute("VACUUM")

    def op_schema(c):
        name = f"aux{rnd.randint(0, 3)}"
        if rnd.random() < 0.5:
            # One transaction: a second workload process may drop the table
            # between two autocommit statements ("no such table").
            begin(c)
            c.execute(f"CREATE TABLE IF NOT EXISTS {name}(x)")
            c.execute(f"INSERT INTO {name} VALUES (randomblob(200))")
            n = ledger(c)
            c.execute("COMMIT")
            committed(n)
        else:
            c.execute(f"DROP TABLE IF EXISTS {name}")

    def snapshot(c):
        for other in conns:
            if other is not c and other.in_transaction:
                return
        busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return
        frame_no = c.execute("SELECT walcast_frame_no()").fetchone()[0]
        shutil.copyfile(a.db, os.path.join(a.snapshots, f"snap-{frame_no}.db"))

    ops = [(op_insert, 30), (op_update, 15), (op_delete, 8), (op_rollback, 6), (op_savepoint, 6),
           (op_big, 3), (op_big_rollback, 2), (op_checkpoint, 8), (op_vacuum, 1), (op_schema, 3)]
    names, weights = zip(*ops)
    for i in range(a.ops):
        c = rnd.choice(conns)
        op = rnd.choices(names, weights)[0]
        op(c)
        if a.snapshots and rnd.random() < 0.05:
            snapshot(c)
    for c in conns:
        c.close()
    print("workload done", flush=True)


if __name__ == "__main__":
    main()
