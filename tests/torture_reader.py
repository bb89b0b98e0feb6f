"""A reader that never loads walcast (Debian's python3 sqlite3 module, no
load_extension), checking invariants for as long as a torture test runs.

  torture_reader.py DB STOPFILE QUERY ACCOUNTS TOTAL

QUERY returns one row: count(acct), sum(bal), count(a), count(b), total(a.v),
total(b.v) (test_replica.py's INVARIANT_Q). Every read is one statement, so one
read transaction; every read must show ACCOUNTS accounts holding TOTAL, and a
and b alike. Every 100 reads it runs PRAGMA integrity_check, and every 500 it
closes its connection and opens a new one, as short-lived clients do (so at
times it is the last connection to close, or the first to open after a crash,
and runs SQLite's own WAL recovery or checkpoint-on-close). It stops when
STOPFILE exists and prints one JSON line: reads, distinct states, integrity
checks, anomalies (torn or wrong states, failed integrity checks, errors).
"""
import json
import os
import sqlite3
import sys
import time


def main():
    db, stop, query, accounts, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    reads, checks, reopens, states, anomalies = 0, 0, 0, set(), []

    def connect():
        # mode=rw: a reader never creates the file; timeout: wait for locks as clients do.
        return sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=10, isolation_level=None)

    c = connect()
    deadline = time.monotonic() + 3 * 3600
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            row = c.execute(query).fetchone()
            reads += 1
            states.add(row[2])
            if row[0] != accounts or row[1] != total or row[2] != row[3] or row[4] != row[5]:
                anomalies.append({"read": reads, "row": list(row)})
            if reads % 100 == 0:
                ic = [r[0] for r in c.execute("PRAGMA integrity_check").fetchall()]
                checks += 1
                if ic != ["ok"]:
                    anomalies.append({"read": reads, "integrity_check": ic[:5]})
            if reads % 500 == 0:
                c.close()
                c = connect()
                reopens += 1
        except sqlite3.Error as e:
            anomalies.append({"read": reads, "error": f"{type(e).__name__}: {e}"})
            c.close()
            c = connect()
        # Pacing, not synchronization: leave the two cores to the writer and the applier.
        time.sleep(0.002)
    c.close()
    print(json.dumps({"reads": reads, "states": len(states), "integrity_checks": checks, "reopens": reopens,
                      "anomalies": len(anomalies), "first_anomalies": anomalies[:10]}), flush=True)


if __name__ == "__main__":
    main()
