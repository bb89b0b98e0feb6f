"""A log damaged on disk is found and named, and the database stays readable."""
import os
import random
import re
import subprocess

import pytest

import wc


def make_primary_with_history(tmp, txns=30):
    db = os.path.join(tmp, "app.db")
    wc.shell("PRAGMA page_size=1024; CREATE TABLE t(x); PRAGMA walcast_role='primary';", db=db)
    script = "\n".join(f"INSERT INTO t VALUES (randomblob({100 + 37 * i}));" for i in range(txns))
    wc.shell(script, db=db)
    return db


def test_every_flipped_byte_is_found_and_named(tmp_path):
    tmp = str(tmp_path)
    db = make_primary_with_history(tmp)
    log = db + "-walcast"
    good = wc.file_bytes(log)
    assert '"ok":true' in wc.verify(db).stdout
    rnd = random.Random(5)
    positions = rnd.sample(range(len(good)), 60) + [0, 300, 600, len(good) - 1]
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << rnd.randrange(8)
        with open(log, "wb") as f:
            f.write(bad)
        p = wc.verify(db, check=False)
        assert p.returncode != 0, f"flip at byte {pos} not found: {p.stdout}"
        assert re.search(r"corrupt at frame_no \d+", p.stderr) or "header" in p.stderr, p.stderr
        # The database itself stays readable, by walcast and by plain SQLite.
        assert wc.shell("SELECT count(*) FROM t;", db=db).stdout.strip() == "30"
    with open(log, "wb") as f:
        f.write(good)
    assert '"ok":true' in wc.verify(db).stdout


def frame_records(data, page_size=1024):
    """(offset, frame_no) of each frame record, walking the log's records as
    README.md describes them."""
    off, out = 512, []
    while off < len(data):
        tag = data[off]
        if tag == ord("F"):
            out.append((off, int.from_bytes(data[off + 1:off + 9], "little")))
            off += 1 + 24 + page_size
        elif tag == ord("G"):
            off += 31 + int.from_bytes(data[off + 29:off + 31], "little") + 8
        elif tag == ord("C"):
            off += 61
        elif tag == ord("W"):
            off += 82
        else:
            raise AssertionError(f"unknown tag {tag} at {off}")
    return out


def test_flip_names_the_right_frame(tmp_path):
    tmp = str(tmp_path)
    db = make_primary_with_history(tmp, txns=5)
    log = db + "-walcast"
    data = bytearray(wc.file_bytes(log))
    # Flip a byte inside the page of frame 3.
    off = dict((n, o) for o, n in frame_records(data))[3]
    data[off + 1 + 24 + 500] ^= 0x10
    with open(log, "wb") as f:
        f.write(data)
    p = wc.verify(db, check=False)
    assert "corrupt at frame_no 3 " in p.stderr, p.stderr
    p = wc.restore(db, os.path.join(tmp, "r.db"), check=False)
    assert "corrupt at frame_no 3 " in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(tmp, "r.db"))


def test_corrupt_tail_found_on_open_refuses_writes_but_reads_work(tmp_path):
    tmp = str(tmp_path)
    db = make_primary_with_history(tmp, txns=5)
    log = db + "-walcast"
    data = bytearray(wc.file_bytes(log))
    # Damage the last frame's page: the log's tail.
    off, frame_no = frame_records(data)[-1]
    data[off + 1 + 24 + 10] ^= 0xFF
    with open(log, "wb") as f:
        f.write(data)
    p = wc.shell("SELECT count(*) FROM t; PRAGMA walcast_status;", db=db, check=False)
    assert p.stdout.splitlines()[0] == "5", p.stdout
    assert '"state":"error"' in p.stdout and f"corrupt at frame_no {frame_no}" in p.stdout, p.stdout
    p = wc.shell("INSERT INTO t VALUES (1);", db=db, check=False)
    assert p.returncode != 0, "a write was accepted though the log cannot record it"
    assert "replication log" in p.stderr, p.stderr
    # Without walcast the database is an ordinary SQLite database.
    assert wc.shell("SELECT count(*) FROM t;", load=False, db=db).stdout.strip() == "5"


def test_truncated_log_is_found_on_open(tmp_path):
    tmp = str(tmp_path)
    db = make_primary_with_history(tmp, txns=5)
    log = db + "-walcast"
    size = os.path.getsize(log)
    os.truncate(log, size // 2)
    p = wc.shell("PRAGMA walcast_status;", db=db, check=False)
    assert "truncated" in p.stdout, p.stdout
    p = wc.verify(db, check=False)
    assert p.returncode != 0 and "truncated" in p.stderr or "corrupt" in p.stderr, p.stderr


def test_log_of_another_database_is_refused(tmp_path):
    tmp = str(tmp_path)
    a = make_primary_with_history(tmp, txns=2)
    b = os.path.join(tmp, "b.db")
    wc.shell("CREATE TABLE u(y); PRAGMA walcast_role='primary'; INSERT INTO u VALUES (1);", db=b)
    wc.shell("PRAGMA walcast_role='off';", db=b)
    conf_b = wc.file_bytes(b + "-walcast-conf")
    os.replace(a + "-walcast", b + "-walcast")
    p = wc.shell("PRAGMA walcast_role='primary';", db=b, check=False)
    assert p.returncode != 0 and "belongs to another database" in p.stderr, p.stderr
    assert wc.file_bytes(b + "-walcast-conf") == conf_b, "a refused role change must change nothing"
    p = wc.verify(b, check=False)
    assert "belongs to another database" in p.stderr, p.stderr
