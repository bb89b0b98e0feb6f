"""A writer for the resource-fault tests that keeps writing through failures.

  ledger_writer.py DB ACKED ERRORS STOP [--seed N] [--pad-max BYTES]

Opens DB with walcast loaded and commits transactions until the file STOP
exists. Each transaction moves money between two accounts of `acct` (the sum
stays), inserts equal values into `a` and `b` (tests/test_replica.py's
INVARIANT_SETUP) and inserts its number into `ledger`. After COMMIT returns,
the number is appended to ACKED: an acknowledged commit. A failing statement is
rolled back and recorded as one JSON line in ERRORS (the number, the exception,
SQLite's error name and message) and the writer goes on, as an application
retrying would. Exits 0 when STOP appears.
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wc  # noqa: E402

ACCOUNTS = 100


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("acked")
    ap.add_argument("errors")
    ap.add_argument("stop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pad-max", type=int, default=3000)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    c = wc.connect(a.db, timeout=5)
    c.execute("CREATE TABLE IF NOT EXISTS ledger(n INTEGER PRIMARY KEY)")
    start = (c.execute("SELECT max(n) FROM ledger").fetchone()[0] or 0) + 1
    acked = open(a.acked, "a", buffering=1)
    errors = open(a.errors, "a", buffering=1)
    i = start
    while not os.path.exists(a.stop):
        x, y, amt = rnd.randrange(1, ACCOUNTS + 1), rnd.randrange(1, ACCOUNTS + 1), rnd.randint(1, 50)
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("UPDATE acct SET bal = bal - ? WHERE id = ?", (amt, x))
            c.execute("INSERT INTO a(v, pad) VALUES (?, randomblob(?))", (amt, rnd.randint(10, a.pad_max)))
            c.execute("UPDATE acct SET bal = bal + ? WHERE id = ?", (amt, y))
            c.execute("INSERT INTO b(v, pad) VALUES (?, randomblob(?))", (amt, rnd.randint(10, a.pad_max)))
            c.execute("INSERT INTO ledger(n) VALUES (?)", (i,))
            c.execute("COMMIT")
        except Exception as e:
            errors.write(json.dumps({"n": i, "type": type(e).__name__, "code": getattr(e, "sqlite_errorname", None),
                                     "msg": str(e), "t": time.time()}) + "\n")
            try:
                if c.in_transaction:
                    c.execute("ROLLBACK")
            except Exception:
                pass
            # An application backs off before retrying a failed write; this
            # only keeps the error file from growing by thousands of lines.
            time.sleep(0.02)
        else:
            acked.write(f"{i}\n")
        i += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
