"""Resource faults: a full disk and I/O errors, on the primary and on a replica.

What the tests hold walcast to (README.md, "Resource faults"):
- a failure is never silent: the writing client gets an SQLite error, or the
  status of the side that cannot write says so (last_error names the cause);
- no acknowledged commit is lost: every transaction whose COMMIT returned is in
  the primary's database and, once the fault is gone, on the replica;
- the primary's database passes integrity_check and its log verifies, during
  the fault and after it;
- a replica that cannot write keeps serving its last consistent state to stock
  SQLite readers, and converges byte-identical once the fault is gone.

A full disk is a small tmpfs (the tests run as root) filled with a ballast file
and freed by deleting it. Where mounting is not permitted, the same tests run
with tests/faultfs.c failing writes to that directory with ENOSPC instead. I/O
errors come from tests/faultfs.c, an LD_PRELOAD shim compiled here with gcc,
which fails writes and syncs of files matching a pattern while a trigger file
exists: the tests create it to inject and remove it to heal.

Environment:
- WALCAST_RESFAULT_ROUNDS: how many times the intermittent-fault test runs
  (default 1; `make test-resource-faults-long` runs 20).
- WALCAST_RESFAULT_NO_MOUNT: do not mount a tmpfs; use the faultfs fallback.
"""
import json
import os
import re
import subprocess

import pytest

import wc
# cluster and port are pytest fixtures, used by name.
from test_replica import ACCOUNTS, BALANCE, INVARIANT_Q, INVARIANT_SETUP, PlainReader, cluster, port  # noqa: F401

LEDGER_WRITER = os.path.join(wc.HERE, "ledger_writer.py")
FAULTFS_C = os.path.join(wc.HERE, "faultfs.c")
SETUP = INVARIANT_SETUP + "CREATE TABLE ledger(n INTEGER PRIMARY KEY);"
ENOSPC_TEXT = "No space left on device"
ROUNDS = int(os.environ.get("WALCAST_RESFAULT_ROUNDS", "1"))
EIO_TEXT = "Input/output error"


# --- fault injection ------------------------------------------------------------

@pytest.fixture(scope="session")
def faultfs(tmp_path_factory):
    """tests/faultfs.c compiled into a shared object for LD_PRELOAD."""
    out = str(tmp_path_factory.mktemp("faultfs") / "faultfs.so")
    p = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", out, FAULTFS_C, "-ldl", "-lpthread"],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"cannot compile {FAULTFS_C}:\n{p.stderr}"
    return out


class Faults:
    """faultfs settings for the processes a test starts from now on (through the
    environment they inherit), and the trigger that switches faults on and off."""

    def __init__(self, lib, monkeypatch, tmp, pattern, errno="EIO", ops=None, torn=False, prob=None,
                 growth_only=False):
        self.trigger = os.path.join(tmp, "faultfs-on")
        self.log = os.path.join(tmp, "faultfs.log")
        env = {"LD_PRELOAD": lib, "FAULTFS_PATTERN": pattern, "FAULTFS_TRIGGER": self.trigger,
               "FAULTFS_ERRNO": errno, "FAULTFS_LOG": self.log, "FAULTFS_TORN": "1" if torn else "0"}
        if ops:
            env["FAULTFS_OPS"] = ops
        if prob is not None:
            env["FAULTFS_PROB"] = str(prob)
        if growth_only:
            env["FAULTFS_GROWTH_ONLY"] = "1"
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    def on(self):
        open(self.trigger, "w").close()

    def off(self):
        if os.path.exists(self.trigger):
            os.unlink(self.trigger)

    def injected(self):
        """Lines of the shim's log: one per failed call."""
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return f.read().splitlines()


class SmallDisk:
    """A directory on a small tmpfs of its own. `fill()` fills it with a ballast
    file until writes fail with ENOSPC; `free()` deletes the ballast. Without
    permission to mount, faultfs fails writes below the directory with ENOSPC
    between fill() and free() instead."""

    def __init__(self, path, size_mb, faultfs_lib, monkeypatch):
        self.path = path
        os.makedirs(path, exist_ok=True)
        if os.environ.get("WALCAST_RESFAULT_NO_MOUNT"):  # to exercise the fallback
            p = subprocess.CompletedProcess([], 1, "", "WALCAST_RESFAULT_NO_MOUNT is set")
        else:
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", path],
                               capture_output=True, text=True)
        self.mounted = p.returncode == 0
        self.ballast = os.path.join(path, "ballast")
        self.faults = None
        if not self.mounted:
            print(f"cannot mount a tmpfs ({p.stderr.strip()}): faultfs fails writes below {path} with ENOSPC")
            self.faults = Faults(faultfs_lib, monkeypatch, os.path.dirname(path), os.path.join(path, "*"),
                                 errno="ENOSPC", ops="write,pwrite", torn=True, growth_only=True)

    def fill(self):
        if not self.mounted:
            self.faults.on()
            return 0
        n = 0
        with open(self.ballast, "ab") as f:
            for chunk in (1 << 20, 4096):
                try:
                    while True:
                        n += os.write(f.fileno(), b"\0" * chunk)
                except OSError as e:
                    assert e.errno == 28, e
        st = os.statvfs(self.path)
        print(f"filled {self.path} with {n} bytes; {st.f_bavail * st.f_frsize} bytes left")
        # Freeing must free something: the workload must not fill the disk alone.
        assert n > 0, f"{self.path} was full before the ballast was written: make the tmpfs bigger"
        return n

    def free(self):
        if self.mounted:
            if os.path.exists(self.ballast):
                os.unlink(self.ballast)
        else:
            self.faults.off()

    def close(self):
        if self.mounted:
            # Lazily: a process killed at teardown may still hold a file open.
            subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture
def small_disk(tmp_path, faultfs, monkeypatch):
    disks = []

    def make(name="disk", size_mb=32):
        d = SmallDisk(os.path.join(str(tmp_path), name), size_mb, faultfs, monkeypatch)
        disks.append(d)
        return d
    yield make
    for d in disks:
        d.close()


# --- workload and checks ---------------------------------------------------------------

class LedgerWriter:
    """tests/ledger_writer.py: commits until stopped, through failures."""

    def __init__(self, db, tmp, seed=1, pad_max=3000):
        self.db = db
        self.acked_path = os.path.join(tmp, f"acked-{seed}.txt")
        self.errors_path = os.path.join(tmp, f"errors-{seed}.jsonl")
        self.stop_path = os.path.join(tmp, f"stop-{seed}")
        self.stderr_path = os.path.join(tmp, f"writer-{seed}.stderr")
        for p in (self.acked_path, self.errors_path, self.stop_path):
            if os.path.exists(p):
                os.unlink(p)
        with open(self.stderr_path, "w") as err:
            self.p = subprocess.Popen([wc.PYTHON, LEDGER_WRITER, db, self.acked_path, self.errors_path,
                                       self.stop_path, "--seed", str(seed), "--pad-max", str(pad_max)],
                                      env={**os.environ, "PYTHONPATH": wc.HERE}, stdout=subprocess.DEVNULL, stderr=err)

    def acked(self):
        if not os.path.exists(self.acked_path):
            return []
        with open(self.acked_path) as f:
            # A line being written is not complete yet.
            return [int(x) for x in f.read().split("\n")[:-1] if x]

    def errors(self):
        if not os.path.exists(self.errors_path):
            return []
        with open(self.errors_path) as f:
            return [json.loads(x) for x in f.read().split("\n")[:-1] if x]

    def running(self):
        return self.p.poll() is None

    def wait_acked(self, n, timeout=60):
        return wc.wait_for(lambda: len(self.acked()) >= n or not self.running(), timeout=timeout,
                           what=lambda: f"{n} acknowledged commits (have {len(self.acked())}; errors {self.errors()[-3:]})")

    def stderr(self):
        """What walcast reported in the writer's process (capture runs there too)."""
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stop(self):
        open(self.stop_path, "w").close()
        self.p.wait(timeout=120)
        assert self.p.returncode == 0, f"ledger writer failed ({self.p.returncode}):\n{self.stderr()[-3000:]}"


def ledger(db, load=False):
    return set(map(int, wc.shell("SELECT n FROM ledger;", load=load, db=db).stdout.split()))


def invariant_holds(db, load=False):
    out = wc.shell(INVARIANT_Q + ";", load=load, db=db).stdout.strip().split("|")
    assert out[:2] == [str(ACCOUNTS), str(ACCOUNTS * BALANCE)] and out[2] == out[3] and out[4] == out[5], \
        f"invariant broken in {db}: {out}"


def error_summary(errors):
    """{(exception, SQLite error name, message): count}."""
    out = {}
    for e in errors:
        k = (e["type"], e["code"], e["msg"])
        out[k] = out.get(k, 0) + 1
    return out


def follows(primary, replica, timeout=60):
    """Waits until the replica applied what the primary's log held at the call
    (while a writer goes on; Cluster.converge wants a quiet primary)."""
    n = wc.frame_no(primary)
    assert wc.walcast_wait(replica, n, timeout * 1000), f"replica did not reach frame_no {n}: {wc.status(replica)}"
    return n


def clean_status(db):
    """walcast_status from a process without the fault shim."""
    p = wc.py("import json, sys, wc; c = wc.connect(sys.argv[1]);"
              "print(c.execute('PRAGMA walcast_status').fetchone()[0])", db, env={"LD_PRELOAD": ""})
    return json.loads(p.stdout)


def verify_ok(db, scratch=None):
    """walcast_verify(db) succeeds. With `scratch` (a database file elsewhere),
    it is called from a connection to that file, so that it checks what the log
    holds without first bringing the log up to date (which a connection to db
    does, and which fails while the log cannot be written)."""
    p = wc.shell(f"SELECT walcast_verify('{db}');", db=scratch or db, check=False)
    assert p.returncode == 0 and '"ok":true' in p.stdout, f"walcast_verify({db}): {p.stdout} {p.stderr}"
    return json.loads(p.stdout.strip())


def restored_equals(db, tmp):
    """The log alone rebuilds the database, byte for byte."""
    out = os.path.join(tmp, "restored.db")
    if os.path.exists(out):
        os.unlink(out)
    wc.checkpoint_truncate(db)
    wc.restore(db, out)
    wc.assert_same_file(db, out)


# --- 1. disk full on the primary ------------------------------------------------------

def test_primary_disk_full(cluster, small_disk, tmp_path, port):
    """The primary's database, WAL and log share a small tmpfs, filled while a
    writer commits and a replica (elsewhere) follows."""
    tmp = str(tmp_path)
    disk = small_disk("primary-disk", size_mb=64)
    primary, replica = os.path.join(disk.path, "primary.db"), os.path.join(tmp, "replica.db")
    pn = cluster.primary(primary, port, setup=SETUP)
    cluster.replica(replica, port)
    w = LedgerWriter(primary, tmp, pad_max=1000)
    w.wait_acked(50)
    follows(primary, replica)
    st0 = pn.status()

    disk.fill()
    # The writer keeps trying; wait until it has failed a number of times.
    wc.wait_for(lambda: len(w.errors()) >= 20 or not w.running(), timeout=60,
                what=lambda: f"the writer failing on the full disk (acked {len(w.acked())})")
    acked_full = set(w.acked())
    st_full = pn.status()
    print("primary status while full:", json.dumps(st_full))
    print("writer errors while full:", error_summary(w.errors()))
    # The client is told the disk is full, whichever write found it full
    # (SQLite's own, or walcast's log before SQLite may restart the WAL).
    codes = {e["code"] for e in w.errors()}
    assert codes == {"SQLITE_FULL"}, f"errors other than SQLITE_FULL on a full disk: {error_summary(w.errors())}"
    # Never silent: every acknowledged commit reaches the replica, or the
    # primary's status names the cause.
    def replicated_or_reported():
        st = pn.status()
        if acked_full <= ledger(replica):
            return ("replicated", st)
        if st["last_error"] and ENOSPC_TEXT in st["last_error"]:
            assert st["state"] == "stalled", st
            return ("reported", st)
        return None
    how, st = wc.wait_for(replicated_or_reported, timeout=15,
                          what=lambda: f"acknowledged commits replicated or the failure reported: {pn.status()}")
    print(f"while full: {how}: {json.dumps(st)}")
    assert acked_full <= ledger(primary), "acknowledged commits missing from the primary"
    wc.integrity_ok(primary)
    invariant_holds(primary)
    p = wc.verify(primary, check=False)
    print(f"walcast_verify from a connection to the primary while full: rc {p.returncode} {p.stdout} {p.stderr}")
    # It brings the log up to date first: it succeeds, or names the full disk.
    assert p.returncode == 0 or ENOSPC_TEXT in p.stderr, p.stderr
    verify_ok(primary, scratch=os.path.join(tmp, "scratch.db"))

    disk.free()
    n_free = len(w.acked())
    w.wait_acked(n_free + 50)
    assert w.running()
    w.stop()
    wc.wait_for(lambda: pn.status()["last_error"] is None, timeout=10,
                what=lambda: f"the primary's last_error clearing: {pn.status()}")
    st_after = pn.status()
    print("primary status after freeing:", json.dumps(st_after))
    cluster.converge(primary, replica)
    acked = set(w.acked())
    assert acked <= ledger(primary), sorted(acked - ledger(primary))[:5]
    assert acked <= ledger(replica), sorted(acked - ledger(replica))[:5]
    invariant_holds(replica)
    verify_ok(primary)
    cluster.identical(primary, replica)
    restored_equals(primary, tmp)
    print(f"generation {st0['generation']} -> {st_after['generation']} ({st_after['generation_reason']})")


# --- 2. disk full on a replica ---------------------------------------------------------

def test_replica_disk_full(cluster, small_disk, tmp_path, port):
    """The replica's files on a small tmpfs, filled while the primary (elsewhere)
    commits and stock sqlite3 readers check the invariant on the replica."""
    tmp = str(tmp_path)
    disk = small_disk("replica-disk", size_mb=96)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(disk.path, "replica.db")
    cluster.primary(primary, port, setup=SETUP)
    rn = cluster.replica(replica, port)
    w = LedgerWriter(primary, tmp, pad_max=1000)
    w.wait_acked(50)
    follows(primary, replica)
    reader = PlainReader(replica)

    disk.fill()
    n_full = len(w.acked())
    w.wait_acked(n_full + 100)  # the primary is not affected
    st = wc.wait_for_status(rn.status, lambda s: s["last_error"] and ENOSPC_TEXT in s["last_error"], timeout=20,
                            what=lambda: f"the replica reporting the full disk: {rn.status()}")
    print("replica status while full (applier):", json.dumps(st))
    # Other processes read the status the applier writes beside the replica,
    # on the same full disk: it must say so there too, not "streaming".
    other = wc.wait_for_status(lambda: wc.status(replica), lambda s: s["last_error"] and ENOSPC_TEXT in s["last_error"],
                               timeout=10, what=lambda: f"another process's status naming the full disk: {wc.status(replica)}")
    print("replica status while full (another process):", json.dumps(other))
    assert other["state"] in ("error", "catching_up"), other
    # Stopped visibly: behind the primary, and saying why.
    wc.wait_for(lambda: rn.status()["lag_frames"] > 0, timeout=10, what=lambda: f"lag_frames > 0: {rn.status()}")
    st = rn.status()
    assert st["state"] in ("error", "catching_up"), st
    applied = st["applied_frame_no"]
    assert applied < wc.frame_no(primary)
    # It keeps serving its last consistent state.
    wc.integrity_ok(replica)
    invariant_holds(replica)
    assert ledger(replica) <= set(w.acked()) | ledger(primary)

    disk.free()
    replica_recovered(cluster, primary, replica, rn, w, reader, "freeing")



def replica_recovered(cluster, primary, replica, rn, w, reader, after):
    """Once the fault is gone: the replica follows again, streams with no error,
    holds every acknowledged commit, and is byte-identical; the stock readers
    saw consistent states throughout."""
    follows(primary, replica)
    w.stop()
    cluster.converge(primary, replica)
    checks, states = reader.stop_and_check()
    print(f"stock sqlite3 read the replica {checks} times ({states} states) through the fault")
    # Converged through catch-up, it says so at its next message (a heartbeat
    # within 500 ms): wait for that rather than sample one instant.
    st = wc.wait_for(lambda: (s := rn.status())["state"] == "streaming" and s["last_error"] is None and s, timeout=10,
                     what=lambda: f"the replica streaming with no error after {after}: {rn.status()}")
    print(f"replica status after {after}:", json.dumps(st))
    acked = set(w.acked())
    assert acked <= ledger(replica), sorted(acked - ledger(replica))[:5]
    cluster.identical(primary, replica)


# --- 3. I/O errors on the primary's log ---------------------------------------------

PRIMARY_LOG_FAULTS = {
    # every write to the log fails
    "write": dict(ops="write,pwrite"),
    # ... after writing half its bytes, as a filling disk does
    "write_torn": dict(ops="write,pwrite", torn=True),
    # one write in three fails, torn (WALCAST_RESFAULT_ROUNDS runs, `make test-resource-faults-long`)
    **{f"write_intermittent{i if i else ''}": dict(ops="write,pwrite", torn=True, prob=0.3) for i in range(ROUNDS)},
    # fsync and fdatasync fail (the log syncs before SQLite restarts the WAL)
    "fsync": dict(ops="fsync,fdatasync"),
}


@pytest.mark.parametrize("kind", list(PRIMARY_LOG_FAULTS))
def test_primary_log_io_errors(cluster, faultfs, monkeypatch, tmp_path, port, kind):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    f = PRIMARY_LOG_FAULTS[kind]
    faults = Faults(faultfs, monkeypatch, tmp, "*/primary.db-walcast", ops=f["ops"], torn=f.get("torn", False),
                    prob=f.get("prob"))
    pn = cluster.primary(primary, port, setup=SETUP)
    cluster.replica(replica, port)
    w = LedgerWriter(primary, tmp, pad_max=1000)
    w.wait_acked(50)
    follows(primary, replica)
    st0 = pn.status()

    faults.on()
    n_on = len(w.acked())
    n_err = len(w.errors())
    # Commits fail, or the status says capture is failing, or (a fault that a
    # retry got past) walcast reported it on the stderr of a process that captures.
    def noticed():
        st = pn.status()
        if st["last_error"] and EIO_TEXT in st["last_error"]:
            assert st["state"] in ("stalled", "error"), st
            return "status"
        if len(w.errors()) > n_err:
            return "client error"
        if EIO_TEXT in pn.stderr() or EIO_TEXT in w.stderr():
            return "stderr"
        return None
    how = wc.wait_for(noticed, timeout=30, what=lambda: f"the fault noticed: {pn.status()}")
    print(f"{kind}: the fault was first noticed through the {how}")
    if kind in ("write", "write_torn"):
        # A process the fault does not touch, whose own capture succeeds, still
        # reports that another process's capture is failing.
        def seen_elsewhere():
            st = clean_status(primary)
            return st if st["state"] == "stalled" and EIO_TEXT in (st["last_error"] or "") else None
        st = wc.wait_for(seen_elsewhere, timeout=30, what=lambda: f"a clean process seeing the fault: {clean_status(primary)}")
        assert "capture is failing in process" in st["last_error"] and st["last_capture_failure"]["ongoing"], st
        print(f"{kind}: a clean process's status under the fault: {json.dumps(st)}")
    # Let the fault last a while under load.
    wc.wait_for(lambda: len(w.errors()) >= n_err + 20 or len(w.acked()) >= n_on + 300, timeout=30,
                what="the writer going on under the fault")
    acked_fault = set(w.acked())
    injected = faults.injected()
    print(f"{kind}: {len(injected)} faults injected, e.g. {injected[:2]}")
    print(f"{kind}: writer errors: {error_summary(w.errors())}")
    print(f"{kind}: primary status under the fault: {json.dumps(pn.status())}")
    assert injected, "faultfs injected nothing"

    def replicated_or_reported():
        st = pn.status()
        if acked_fault <= ledger(replica):
            return ("replicated", st)
        if st["last_error"] and EIO_TEXT in st["last_error"]:
            return ("reported", st)
        return None
    how, st = wc.wait_for(replicated_or_reported, timeout=15,
                          what=lambda: f"acknowledged commits replicated or the failure reported: {pn.status()}")
    print(f"{kind}: under the fault: {how}")
    assert acked_fault <= ledger(primary), "acknowledged commits missing from the primary"
    wc.integrity_ok(primary)
    p = wc.shell(f"SELECT walcast_verify('{primary}');", db=os.path.join(tmp, "scratch.db"), check=False)
    if p.returncode != 0:
        # The one damage a failed write may leave: a header slot written
        # half-way. The other slot is valid, and the next sync rewrites it.
        # (The faults go on while this runs: read what was injected up to now.)
        slot_faults = [x for x in faults.injected() if int(re.search(r" off (-?\d+)", x).group(1)) in range(0, 512)]
        assert re.search(r"header slot \d is damaged", p.stderr) and slot_faults, \
            f"walcast_verify under the fault: {p.stdout} {p.stderr}"
        print(f"{kind}: walcast_verify under the fault: {p.stderr.strip()} (after {slot_faults[0]})")

    faults.off()
    n_off = len(w.acked())
    w.wait_acked(n_off + 50)
    w.stop()
    wc.wait_for(lambda: pn.status()["last_error"] is None, timeout=10,
                what=lambda: f"the primary's last_error clearing: {pn.status()}")
    st = pn.status()
    print(f"{kind}: primary status after healing: {json.dumps(st)}")
    assert st["state"] == "capturing", st
    # Every process's status keeps the failure as history, with its recovery
    # (a failed sync is recovered only by a sync in that process: until then,
    # it is history once not repeated for 5 s).
    clean = wc.wait_for(lambda: (lambda st: st if st["state"] == "capturing" else None)(clean_status(primary)),
                        timeout=15, what=lambda: f"a clean process's status after healing: {clean_status(primary)}")
    failure = clean["last_capture_failure"]
    assert clean["last_error"] is None and failure and EIO_TEXT in failure["error"] and not failure["ongoing"], clean
    assert failure["recovered_unix_ms"] or kind == "fsync", clean
    cluster.converge(primary, replica)
    acked = set(w.acked())
    assert acked <= ledger(primary), sorted(acked - ledger(primary))[:5]
    assert acked <= ledger(replica), sorted(acked - ledger(replica))[:5]
    invariant_holds(replica)
    cluster.identical(primary, replica)  # its checkpoint ends the WAL: the log syncs
    verify_ok(primary)
    restored_equals(primary, tmp)
    print(f"{kind}: generation {st0['generation']} -> {st['generation']} ({st['generation_reason']})")


# --- 4. I/O errors on the replica's WAL ------------------------------------------------

@pytest.mark.parametrize("torn", [False, True], ids=["write", "write_torn"])
def test_replica_wal_io_errors(cluster, faultfs, monkeypatch, tmp_path, port, torn):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    faults = Faults(faultfs, monkeypatch, tmp, "*/replica.db-wal", ops="write,pwrite", torn=torn)
    cluster.primary(primary, port, setup=SETUP)
    rn = cluster.replica(replica, port)
    w = LedgerWriter(primary, tmp, pad_max=1000)
    w.wait_acked(50)
    follows(primary, replica)
    reader = PlainReader(replica)

    faults.on()
    n_on = len(w.acked())
    w.wait_acked(n_on + 100)
    st = wc.wait_for_status(rn.status, lambda s: s["last_error"] and EIO_TEXT in s["last_error"], timeout=20,
                            what=lambda: f"the replica reporting the I/O error: {rn.status()}")
    print("replica status under the fault (applier):", json.dumps(st))
    print("replica status under the fault (another process):", json.dumps(wc.status(replica)))
    wc.wait_for(lambda: rn.status()["lag_frames"] > 0, timeout=10, what=lambda: f"lag_frames > 0: {rn.status()}")
    assert rn.status()["state"] in ("error", "catching_up"), rn.status()
    assert faults.injected(), "faultfs injected nothing"
    wc.integrity_ok(replica)
    invariant_holds(replica)

    faults.off()
    replica_recovered(cluster, primary, replica, rn, w, reader, "healing")
