"""Writes made to the primary's file by a process without walcast."""
import json
import os
import subprocess

import wc


def make_primary(tmp):
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); INSERT INTO t VALUES (1); PRAGMA walcast_role='primary';", db=db)
    return db


def walcast_process(db, script):
    """A Debian python3 process with walcast that opens db as `c`, then runs
    script, which waits for the test at each sys.stdin.readline()."""
    return subprocess.Popen([wc.PYTHON, "-c", f"import sys, wc\nc = wc.connect({db!r})\n{script}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": wc.HERE})


def go_on(p):
    """Lets a walcast_process past its next sys.stdin.readline()."""
    p.stdin.write("\n")
    p.stdin.flush()


def check_log_equals_db(tmp, db, name):
    wc.checkpoint_truncate(db)
    out = os.path.join(tmp, name)
    wc.restore(db, out)
    wc.assert_same_file(db, out)
    wc.integrity_ok(out)


def test_plain_sqlite3_write_while_no_walcast_process_is_open(tmp_path):
    tmp = str(tmp_path)
    db = make_primary(tmp)
    # Stock sqlite3 without walcast: it writes, checkpoints and removes the WAL.
    wc.shell("INSERT INTO t VALUES (2), (3);", load=False, db=db)
    st = wc.status(db)
    assert st["generation"] == 2, st
    assert "without walcast" in st["generation_reason"], st
    wc.shell("INSERT INTO t VALUES (4);", db=db)
    check_log_equals_db(tmp, db, "r.db")
    assert wc.shell("SELECT count(*) FROM t;", load=False, db=os.path.join(tmp, "r.db")).stdout.strip() == "4"


def test_plain_sqlite3_truncating_the_wal_under_a_walcast_process(tmp_path):
    tmp = str(tmp_path)
    db = make_primary(tmp)
    holder = walcast_process(db, """
c.execute("INSERT INTO t VALUES (10)")
print("ready", flush=True)
sys.stdin.readline()
c.execute("INSERT INTO t VALUES (11)")
print(c.execute("SELECT walcast_frame_no()").fetchone()[0], flush=True)
sys.stdin.readline()
""")
    try:
        assert holder.stdout.readline().strip() == "ready"
        wc.shell("INSERT INTO t VALUES (20); PRAGMA wal_checkpoint(TRUNCATE);", load=False, db=db)
        go_on(holder)
        assert int(holder.stdout.readline())
        go_on(holder)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    st = wc.status(db)
    assert st["generation"] >= 2, st
    check_log_equals_db(tmp, db, "r.db")
    assert wc.shell("SELECT group_concat(x) FROM (SELECT x FROM t ORDER BY x);", load=False,
                    db=os.path.join(tmp, "r.db")).stdout.strip() == "1,10,11,20"


def test_plain_reader_closing_last_leaves_the_wal_to_walcast(tmp_path):
    """A process with walcast has the primary open but has not read it yet (so
    SQLite holds no lock on the file for it), the writer died, and a stock shell
    reads and closes: SQLite's last-connection-closes checkpoint would delete
    the WAL behind walcast's back, costing a new generation and a base image.
    walcast's own SHARED lock keeps it from being the last connection."""
    tmp = str(tmp_path)
    db = make_primary(tmp)
    holder = walcast_process(db, """
print(c.execute("SELECT walcast_frame_no()").fetchone()[0], flush=True)  # reads no table
sys.stdin.readline()
""")
    try:
        assert int(holder.stdout.readline())
        writer = walcast_process(db, """
c.execute("INSERT INTO t VALUES (2)")
print(c.execute("SELECT walcast_frame_no()").fetchone()[0], flush=True)
sys.stdin.readline()
""")
        n = int(writer.stdout.readline())
        writer.kill()  # no close: the WAL stays, with the commit in it
        writer.wait()
        assert os.path.getsize(db + "-wal") > 0
        assert wc.shell("SELECT count(*) FROM t;", load=False, db=db).stdout.strip() == "2"
        assert os.path.exists(db + "-wal") and os.path.getsize(db + "-wal") > 0, \
            "a plain reader closing last deleted the WAL under a walcast process"
        # Nor can a process without walcast take the primary out of WAL mode.
        p = wc.shell("PRAGMA busy_timeout = 0; PRAGMA journal_mode = DELETE;", load=False, db=db, check=False)
        assert "database is locked" in p.stderr, (p.stdout, p.stderr)
        assert wc.shell("PRAGMA journal_mode;", load=False, db=db).stdout.strip() == "wal"
        go_on(holder)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    st = wc.status(db)
    assert st["generation"] == 1 and st["frame_no"] == n, st
    check_log_equals_db(tmp, db, "r.db")


def test_rollback_journal_write_is_refused_on_a_primary(tmp_path):
    tmp = str(tmp_path)
    db = make_primary(tmp)
    p = wc.shell("PRAGMA journal_mode=DELETE;", db=db, check=False)
    assert p.returncode != 0 and "must stay in WAL mode" in p.stderr, p.stderr
    assert wc.shell("PRAGMA journal_mode;", db=db).stdout.strip() == "wal"


def test_plain_sqlite3_appending_to_the_wal_walcast_follows(tmp_path):
    """A foreign transaction still in the WAL is detected at the next capture."""
    tmp = str(tmp_path)
    db = make_primary(tmp)
    holder = walcast_process(db, """
c.execute("INSERT INTO t VALUES (10)")
print(c.execute("SELECT walcast_frame_no()").fetchone()[0], flush=True)
sys.stdin.readline()
c.execute("INSERT INTO t VALUES (11)")
print(c.execute("PRAGMA walcast_status").fetchone()[0], flush=True)
sys.stdin.readline()
""")
    try:
        int(holder.stdout.readline())
        # The walcast process keeps the WAL open, so plain sqlite3 appends to it.
        wc.shell("INSERT INTO t VALUES (20);", load=False, db=db)
        assert os.path.getsize(db + "-wal") > 0
        go_on(holder)
        st = json.loads(holder.stdout.readline())
        go_on(holder)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert st["generation"] == 2, st
    assert "without walcast" in st["generation_reason"], st
    check_log_equals_db(tmp, db, "r.db")
    assert wc.shell("SELECT group_concat(x) FROM (SELECT x FROM t ORDER BY x);", load=False,
                    db=os.path.join(tmp, "r.db")).stdout.strip() == "1,10,11,20"
