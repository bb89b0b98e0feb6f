"""The randomized workload, then: the log verifies, a restore at the last frame is
byte-identical to the primary after wal_checkpoint(TRUNCATE), and restores at
intermediate frame_nos equal the copies taken at those moments."""
import glob
import os
import subprocess

import pytest

import wc


def run_workload(db, *args, check=True):
    p = subprocess.run([wc.PYTHON, os.path.join(wc.HERE, "workload.py"), db, *args], capture_output=True, text=True,
                       timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"workload failed:\n{p.stdout}\n{p.stderr}")
    return p


def check_restores(tmp, db, snapdir=None):
    wc.checkpoint_truncate(db)
    out = os.path.join(tmp, "restored-last.db")
    wc.restore(db, out)
    wc.assert_same_file(db, out)
    wc.integrity_ok(out)
    checked = 0
    if snapdir:
        for snap in sorted(glob.glob(os.path.join(snapdir, "snap-*.db"))):
            frame_no = int(os.path.basename(snap)[5:-3])
            r = os.path.join(tmp, f"restored-{frame_no}.db")
            wc.restore(db, r, frame_no)
            wc.assert_same_file(snap, r)
            checked += 1
    return checked


@pytest.mark.parametrize("page_size,seed", [(4096, 1), (1024, 2), (65536, 3)])
def test_randomized_workload_restores_byte_identical(tmp_path, page_size, seed):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    snaps = os.path.join(tmp, "snaps")
    os.mkdir(snaps)
    run_workload(db, "--seed", str(seed), "--ops", "250", "--role", "--page-size", str(page_size),
                 "--snapshots", snaps)
    v = wc.verify(db).stdout
    assert '"ok":true' in v
    checked = check_restores(tmp, db, snaps)
    assert checked >= 3, "too few snapshots to compare"


def test_two_processes_writing_in_turn(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    snaps = os.path.join(tmp, "snaps")
    os.mkdir(snaps)
    run_workload(db, "--seed", "11", "--ops", "60", "--role", "--snapshots", snaps)
    for seed in (12, 13, 14, 15):
        run_workload(db, "--seed", str(seed), "--ops", "60", "--snapshots", snaps)
    st = wc.status(db)
    assert st["generation"] == 1, st
    check_restores(tmp, db, snaps)


def test_two_processes_writing_concurrently(tmp_path):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    run_workload(db, "--seed", "21", "--ops", "5", "--role")
    procs = [subprocess.Popen([wc.PYTHON, os.path.join(wc.HERE, "workload.py"), db, "--seed", str(s), "--ops", "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (22, 23)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    st = wc.status(db)
    assert st["generation"] == 1, st
    check_restores(tmp, db)


def test_restart_checkpoints_between_commits(tmp_path):
    """After each wal_checkpoint(RESTART) the next writer restarts the WAL and
    overwrites its frames: every commit must reach the log first, however far
    behind the capture thread is."""
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.py(f"""
import wc
c = wc.connect({db!r})
c.execute("CREATE TABLE t(x)")
c.execute("PRAGMA walcast_role='primary'")
for i in range(400):
    c.execute("INSERT INTO t VALUES (randomblob(3000))")
    c.execute("INSERT INTO t VALUES (?)", (i,))
    c.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
""")
    assert wc.status(db)["generation"] == 1
    check_restores(tmp, db)


def test_sector_padding_and_full_sync(tmp_path):
    """With psow=0 and synchronous=FULL, SQLite pads each commit to a sector with
    copies of the commit frame, and splits a write at its sync point, so a frame
    header can arrive in two pieces: every commit is still walcast's own."""
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    wc.py(f"""
import wc
c = wc.connect("file:{db}?psow=0", uri=True)
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=FULL")
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE t(x)")
c.execute("PRAGMA walcast_role='primary'")
for i in range(600):
    c.execute("INSERT INTO t VALUES (?)", (i,))
""")
    st = wc.status(db)
    assert st["generation"] == 1, st
    check_restores(tmp, db)
