"""With no role set, walcast changes nothing: the same statements give the same
results and byte-identical files with and without walcast loaded."""
import os
import subprocess

import pytest

import wc

SCENARIO = """
PRAGMA journal_mode={mode};
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
  INSERT INTO t(v) SELECT printf('%0500d', i) FROM n;
BEGIN; DELETE FROM t WHERE id % 2 = 0; ROLLBACK;
BEGIN; SAVEPOINT a; UPDATE t SET v = 'x' WHERE id < 100; ROLLBACK TO a; UPDATE t SET v = 'y' WHERE id < 10; RELEASE a; COMMIT;
CREATE TEMP TABLE tmp AS SELECT * FROM t WHERE id < 500;
SELECT count(*), sum(length(v)) FROM temp.tmp;
PRAGMA temp_store=FILE;
SELECT count(*) FROM (SELECT v FROM t ORDER BY v DESC LIMIT 2000);
ATTACH 'other.db' AS other;
CREATE TABLE other.o AS SELECT id, v FROM t WHERE id % 3 = 0;
SELECT count(*) FROM other.o;
DETACH other;
DELETE FROM t WHERE id > 1000;
VACUUM;
PRAGMA wal_checkpoint(TRUNCATE);
PRAGMA page_count;
PRAGMA integrity_check;
SELECT count(*), sum(id) FROM t;
"""


def run_scenario(tmp, mode, load):
    d = os.path.join(tmp, f"{mode}-{'walcast' if load else 'plain'}")
    os.mkdir(d)
    p = wc.shell(SCENARIO.format(mode=mode), load=load, db="app.db", cwd=d)
    return d, p.stdout


@pytest.mark.parametrize("mode", ["delete", "wal", "truncate", "persist"])
def test_same_results_and_bytes_as_plain_sqlite(tmp_path, mode):
    tmp = str(tmp_path)
    d1, out1 = run_scenario(tmp, mode, load=True)
    d2, out2 = run_scenario(tmp, mode, load=False)
    assert out1 == out2
    for name in ("app.db", "other.db"):
        wc.assert_same_file(os.path.join(d1, name), os.path.join(d2, name))
    assert sorted(os.listdir(d1)) == sorted(os.listdir(d2)), "walcast left files behind"


CONNECTIONS = r"""
import sqlite3, sys, wc
if sys.argv[1] == "walcast":
    wc.load()
a = sqlite3.connect("app.db", isolation_level=None, timeout=0)
b = sqlite3.connect("app.db", isolation_level=None, timeout=0)
a.execute(f"PRAGMA journal_mode={sys.argv[2]}")
a.execute("CREATE TABLE t(x)")
a.execute("BEGIN IMMEDIATE")
a.execute("INSERT INTO t VALUES (1)")
try:
    b.execute("INSERT INTO t VALUES (2)")
    print("b wrote while a held the write lock")
except sqlite3.OperationalError as e:
    print("b:", e)
print("b sees", b.execute("SELECT count(*) FROM t").fetchone())
a.execute("COMMIT")
b.execute("INSERT INTO t VALUES (3)")
print("a sees", a.execute("SELECT group_concat(x) FROM t").fetchone())
print(a.execute("PRAGMA journal_mode").fetchone())
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_several_connections_and_processes(tmp_path, mode):
    tmp = str(tmp_path)
    outs = []
    for kind in ("walcast", "plain"):
        d = os.path.join(tmp, kind)
        os.mkdir(d)
        p = subprocess.run([wc.PYTHON, "-c", CONNECTIONS, kind, mode], cwd=d, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": wc.HERE})
        assert p.returncode == 0, p.stderr
        # A second process, the stock shell, writes and reads the same file.
        q = wc.shell("INSERT INTO t VALUES (4); SELECT group_concat(x) FROM t;", load=kind == "walcast", db="app.db", cwd=d)
        outs.append((p.stdout, q.stdout))
        assert not [f for f in os.listdir(d) if "walcast" in f]
    assert outs[0] == outs[1]
    assert "database is locked" in outs[0][0]
    wc.assert_same_file(os.path.join(tmp, "walcast", "app.db"), os.path.join(tmp, "plain", "app.db"))


def test_vfs_stays_registered_after_the_loading_connection_closes(tmp_path):
    p = wc.py("""
import sqlite3, wc
c = sqlite3.connect(":memory:")
c.enable_load_extension(True)
c.load_extension(wc.EXT)
c.close()
d = sqlite3.connect("file:x.db?vfs=walcast", uri=True)
print(d.execute("SELECT walcast_status()").fetchone()[0][:9])
""", timeout=60, cwd=str(tmp_path))
    assert p.stdout.startswith('{"'), p.stdout
