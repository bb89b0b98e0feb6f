"""A long-lived process that keeps one database open, for the replica tests.

  replica_node.py DB [--endpoint URL] [--set-role] [--role replica|primary]
                     [--role-first] [--uri] [--plain]

With walcast loaded (the default), a replica is applied, and a primary is
published, only while some process keeps the database open: this process is that
process. It opens DB (through walcast unless --plain), and:

- with --set-role: sets `PRAGMA walcast_endpoint` (when --endpoint is given) and
  then `PRAGMA walcast_role` (--role, default replica); --role-first sets them in
  the other order;
- with --uri: opens `file:DB?walcast_role=ROLE&walcast_endpoint=URL` instead;
- without either: sets nothing (a role set earlier persists).

It then prints one line, `ready <JSON>` (the walcast status, plus
"walcast_role" and "walcast_endpoint" as those pragmas report them; null with
--plain), and serves its standard input: each line is one SQL statement, run on
its connection (isolation_level=None, so BEGIN/COMMIT are the test's), and each
answer is one JSON line, {"rows": [...]} or {"error": "...", "type": "..."}. It
exits when its standard input closes; tests also kill -9 it.
"""
import argparse
import json
import os
import sqlite3
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--endpoint")
    ap.add_argument("--set-role", action="store_true")
    ap.add_argument("--role", default="replica", choices=["replica", "primary"])
    ap.add_argument("--role-first", action="store_true")
    ap.add_argument("--uri", action="store_true")
    ap.add_argument("--plain", action="store_true", help="do not load walcast (a plain reader)")
    a = ap.parse_args()

    try:
        if a.plain:
            c = sqlite3.connect(a.db, isolation_level=None, timeout=30, check_same_thread=False)
        elif a.uri:
            q = {"walcast_role": a.role}
            if a.endpoint:
                q["walcast_endpoint"] = a.endpoint
            c = wc.connect("file:" + urllib.parse.quote(os.path.abspath(a.db)) + "?" + urllib.parse.urlencode(q),
                           uri=True)
        else:
            c = wc.connect(a.db)
        if a.set_role and not a.plain:
            steps = []
            if a.endpoint:
                steps.append(f"PRAGMA walcast_endpoint = '{a.endpoint}'")
            steps.append(f"PRAGMA walcast_role = '{a.role}'")
            if a.role_first:
                steps.reverse()
            for s in steps:
                c.execute(s).fetchall()
        st = None
        if not a.plain:
            st = json.loads(c.execute("PRAGMA walcast_status").fetchone()[0])
            # What the pragmas themselves say (the status may not be written yet).
            st["walcast_role"] = c.execute("PRAGMA walcast_role").fetchone()[0]
            st["walcast_endpoint"] = c.execute("PRAGMA walcast_endpoint").fetchone()[0]
    except Exception as e:  # the test reads this line instead of "ready"
        print("error " + json.dumps({"error": str(e), "type": type(e).__name__}), flush=True)
        return 1
    print("ready " + json.dumps(st), flush=True)

    for line in sys.stdin:
        sql = line.strip()
        if not sql:
            continue
        try:
            rows = [list(r) for r in c.execute(sql).fetchall()]
            out = {"rows": rows}
        except Exception as e:
            out = {"error": str(e), "type": type(e).__name__}
        print(json.dumps(out, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)), flush=True)
    c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
