"""Setting, reporting and persisting the role; bad input gets a clear error and
changes nothing."""
import json
import os
import stat
import subprocess

import pytest

import wc


def walcast_files(tmp):
    return sorted(f for f in os.listdir(tmp) if "walcast" in f)


def test_role_persists_and_can_be_turned_off(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    assert wc.shell("PRAGMA walcast_role;", db=db).stdout.strip() == "off"
    wc.shell("CREATE TABLE t(x); PRAGMA walcast_role='primary';", db=db)
    # Reopening keeps the role, in the shell and in Python.
    assert wc.shell("PRAGMA walcast_role;", db=db).stdout.strip() == "primary"
    out = wc.py(f"import wc; print(wc.connect({db!r}).execute('PRAGMA walcast_role').fetchone()[0])").stdout
    assert out.strip() == "primary"
    wc.shell("INSERT INTO t VALUES (1);", db=db)
    n = int(wc.shell("SELECT walcast_frame_no();", db=db).stdout)
    assert wc.shell("PRAGMA walcast_role='off';", db=db).stdout.strip() == "off"
    wc.shell("INSERT INTO t VALUES (2);", db=db)
    assert wc.shell("PRAGMA walcast_role;", db=db).stdout.strip() == "off"
    p = wc.shell("SELECT walcast_frame_no();", db=db, check=False)
    assert "not a walcast primary" in p.stderr, p.stderr
    # Back to primary: the write made while off is caught by a new generation,
    # and frame numbering continues.
    wc.shell("PRAGMA walcast_role='primary';", db=db)
    st = wc.status(db)
    assert st["generation"] == 2 and st["frame_no"] > n, st
    wc.checkpoint_truncate(db)
    wc.restore(db, os.path.join(tmp, "r.db"))
    wc.assert_same_file(db, os.path.join(tmp, "r.db"))


def test_uri_parameter_sets_the_role(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.py(f"""
import wc
c = wc.connect("file:{db}?walcast_role=primary", uri=True)
c.execute("CREATE TABLE t(x)")
c.execute("INSERT INTO t VALUES (1)")
assert c.execute("PRAGMA walcast_role").fetchone()[0] == "primary"
assert c.execute("SELECT walcast_frame_no()").fetchone()[0] > 0
""")
    assert wc.status(db)["role"] == "primary"
    p = wc.py(f"""
import wc, sqlite3
try:
    wc.connect("file:{db}?walcast_role=bogus", uri=True).execute("select 1")
except sqlite3.OperationalError as e:
    print("refused:", e)
""", check=True)
    assert "refused" in p.stdout and "unknown walcast_role 'bogus'" in p.stderr, (p.stdout, p.stderr)


def test_a_new_empty_database_can_be_a_primary(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "new.db")
    wc.shell("PRAGMA walcast_role='primary'; CREATE TABLE t(x); INSERT INTO t VALUES (42);", db=db)
    wc.checkpoint_truncate(db)
    wc.restore(db, os.path.join(tmp, "r.db"))
    wc.assert_same_file(db, os.path.join(tmp, "r.db"))


def test_status_is_one_json_object(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); PRAGMA walcast_role='primary'; INSERT INTO t VALUES (1);", db=db)
    st = wc.status(db)
    for key in ("role", "db_id", "generation", "frame_no", "checksum", "log_bytes"):
        assert key in st, st
    assert st["role"] == "primary" and len(st["db_id"]) == 32 and st["log_bytes"] > 0
    same = json.loads(wc.shell("SELECT walcast_status();", db=db).stdout)
    assert same["frame_no"] == st["frame_no"]


@pytest.mark.parametrize("value", ["'bogus'", "''", "42"])
def test_unknown_role_is_refused_and_changes_nothing(tmp_path, value):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x);", db=db)
    p = wc.shell(f"PRAGMA walcast_role={value};", db=db, check=False)
    assert p.returncode != 0 and "walcast_role" in p.stderr, p.stderr
    assert walcast_files(tmp) == []
    assert wc.shell("PRAGMA journal_mode;", db=db).stdout.strip() == "delete"


def test_replica_role_on_a_database_with_content_is_refused_and_changes_nothing(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); INSERT INTO t VALUES (1);", db=db)
    before = wc.file_bytes(db)
    p = wc.shell("PRAGMA walcast_endpoint='tcp://127.0.0.1:7999'; PRAGMA walcast_role='replica';", db=db, check=False)
    assert p.returncode != 0 and "already has content" in p.stderr and "not a replica" in p.stderr, p.stderr
    assert wc.file_bytes(db) == before
    assert wc.shell("PRAGMA walcast_role;", db=db).stdout.strip() == "off"


def test_role_on_memory_or_temp_database_is_refused(tmp_path):
    tmp = str(tmp_path)
    # The shell's own :memory: database, and a :memory: database opened after .load.
    p = wc.shell("PRAGMA walcast_role='primary';", check=False, cwd=tmp)
    assert p.returncode != 0 and "in memory" in p.stderr, p.stderr
    p = wc.shell("PRAGMA walcast_role='primary';", db=":memory:", check=False, cwd=tmp)
    assert p.returncode != 0 and "walcast" in p.stderr, p.stderr
    # A temporary (unnamed) database, and the temp schema.
    p = wc.shell("PRAGMA walcast_role='primary';", db="''", check=False, cwd=tmp)
    assert p.returncode != 0 and "temporary" in p.stderr, p.stderr
    db = os.path.join(tmp, "app.db")
    p = wc.shell("CREATE TEMP TABLE x(y); PRAGMA temp.walcast_role='primary';", db=db, check=False)
    assert p.returncode != 0 and "temp" in p.stderr, p.stderr
    assert wc.shell("PRAGMA walcast_role;", db=db).stdout.strip() == "off"
    assert [f for f in os.listdir(tmp) if "walcast" in f] == []


def test_read_only_connection_cannot_set_the_role(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "ro.db")
    wc.shell("CREATE TABLE t(x);", load=False, db=db)
    p = wc.shell("PRAGMA walcast_role='primary';", db=f"--readonly {db}", check=False)
    assert p.returncode != 0 and "read-only connection" in p.stderr, p.stderr
    assert walcast_files(tmp) == []
    assert wc.shell("PRAGMA journal_mode;", load=False, db=db).stdout.strip() == "delete"


def test_read_only_file_cannot_switch_to_wal(tmp_path):
    tmp = str(tmp_path)
    sub = os.path.join(tmp, "ro")
    os.mkdir(sub)
    db = os.path.join(sub, "ro.db")
    wc.shell("CREATE TABLE t(x);", load=False, db=db)
    # root ignores permission bits; an immutable file stops root too.
    made_immutable = False
    if os.geteuid() == 0:
        made_immutable = subprocess.run(["chattr", "+i", db], capture_output=True).returncode == 0
        if not made_immutable:
            pytest.skip("cannot make a file read-only for root here (no chattr +i)")
    else:
        os.chmod(db, stat.S_IRUSR)
        os.chmod(sub, stat.S_IRUSR | stat.S_IXUSR)
    try:
        p = wc.shell("PRAGMA walcast_role='primary';", db=db, check=False)
        assert p.returncode != 0 and "WAL" in p.stderr, p.stderr
    finally:
        if made_immutable:
            subprocess.run(["chattr", "-i", db])
        os.chmod(sub, stat.S_IRWXU)
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)
    assert [f for f in os.listdir(sub) if "walcast" in f] == []


def test_database_locked_by_a_reader_cannot_switch_to_wal(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); INSERT INTO t VALUES (1);", load=False, db=db)
    reader = subprocess.Popen([wc.SQLITE3, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reader.stdin.write("BEGIN; SELECT count(*) FROM t;\n")
    reader.stdin.flush()
    assert reader.stdout.readline().strip() == "1"
    try:
        p = wc.shell("PRAGMA walcast_role='primary';", db=db, check=False, timeout=60)
        assert p.returncode != 0 and "WAL" in p.stderr and "locked" in p.stderr, p.stderr
    finally:
        reader.stdin.write("COMMIT;\n.quit\n")
        reader.stdin.flush()
        reader.wait(timeout=30)
    assert walcast_files(tmp) == []
    assert wc.shell("PRAGMA journal_mode;", load=False, db=db).stdout.strip() == "delete"


def test_functions_fail_clearly_on_a_connection_not_on_walcast(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); PRAGMA walcast_role='primary';", db=db)
    # A database opened before walcast was loaded: the shell's `sqlite3 app.db`.
    p = subprocess.run([wc.SQLITE3, "-batch", db], input=f".load {wc.EXT}\nSELECT walcast_frame_no();\n",
                       capture_output=True, text=True)
    assert "opened on the 'unix' VFS" in p.stderr or "before walcast was loaded" in p.stderr, p.stderr
    p = subprocess.run([wc.SQLITE3, "-batch", db], input=f".load {wc.EXT}\nPRAGMA walcast_role='primary';\n",
                       capture_output=True, text=True)
    assert p.returncode != 0 and "before walcast was loaded" in p.stderr, p.stderr
    for fn in ("walcast_frame_no()", "walcast_status()", f"walcast_verify('{db}')", f"walcast_restore('{db}', 'x.db')"):
        p = wc.shell(f"SELECT {fn};", check=False, cwd=tmp)
        assert p.returncode != 0 and "in memory" in p.stderr, (fn, p.stderr)


def test_restore_refuses_existing_files_and_uncovered_frames(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); PRAGMA walcast_role='primary'; INSERT INTO t VALUES (1);", db=db)
    last = int(wc.shell("SELECT walcast_frame_no();", db=db).stdout)
    existing = os.path.join(tmp, "exists.db")
    open(existing, "w").write("keep me")
    p = wc.restore(db, existing, check=False)
    assert p.returncode != 0 and "already exists" in p.stderr, p.stderr
    assert open(existing).read() == "keep me"
    for bad in (last + 1, 0, -5):
        p = wc.restore(db, os.path.join(tmp, f"r{bad}.db"), bad, check=False)
        assert p.returncode != 0 and "not covered" in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(tmp, f"r{bad}.db"))
    p = wc.restore(db, os.path.join(tmp, "r1.db"), 1, check=False)
    assert p.returncode != 0 and "base image" in p.stderr, p.stderr
    p = wc.shell(f"SELECT walcast_verify('{tmp}/nope.db');", db=db, check=False)
    assert p.returncode != 0 and "nope.db" in p.stderr, p.stderr


def test_a_primary_whose_log_was_removed_starts_a_new_identity(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x); PRAGMA walcast_role='primary'; INSERT INTO t VALUES (1);", db=db)
    old = wc.status(db)
    os.remove(db + "-walcast")
    p = wc.shell("INSERT INTO t VALUES (2); PRAGMA walcast_status;", db=db)
    new = json.loads(p.stdout)
    assert new["db_id"] != old["db_id"] and new["generation"] == 1, (old, new)
    assert "missing" in p.stderr
    wc.checkpoint_truncate(db)
    wc.restore(db, os.path.join(tmp, "r.db"))
    wc.assert_same_file(db, os.path.join(tmp, "r.db"))


def test_a_process_already_open_follows_a_role_set_by_another(tmp_path):
    """An application that opened the database before the role was set starts
    capturing its own writes, instead of looking like a writer without walcast."""
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.shell("CREATE TABLE t(x);", db=db)
    app = subprocess.Popen([wc.PYTHON, "-c", f"""
import sys, time, wc
c = wc.connect({db!r})
c.execute("PRAGMA journal_mode=WAL")
c.execute("INSERT INTO t VALUES (1)")
print("open", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 10
while c.execute("PRAGMA walcast_role").fetchone()[0] != "primary":
    assert time.monotonic() < deadline, "the role set by another process was not followed"
    time.sleep(0.01)
for i in range(20):
    c.execute("INSERT INTO t VALUES (?)", (i,))
print(c.execute("PRAGMA walcast_status").fetchone()[0], flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": wc.HERE})
    try:
        assert app.stdout.readline().strip() == "open"
        wc.shell("PRAGMA walcast_role='primary';", db=db)
        app.stdin.write("\n")
        app.stdin.flush()
        st = json.loads(app.stdout.readline())
        app.wait(timeout=60)
    finally:
        app.kill()
    assert st["role"] == "primary" and st["generation"] == 1, st
    wc.checkpoint_truncate(db)
    wc.restore(db, os.path.join(tmp, "r.db"))
    wc.assert_same_file(db, os.path.join(tmp, "r.db"))
