"""Helpers shared by the tests and by the workload processes they start.

Everything runs as real processes: Debian's /usr/bin/python3 (whose sqlite3
module can load extensions) and the stock sqlite3 shell.
"""
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.environ.get("WALCAST_EXT") or os.path.join(ROOT, "target", "release", "libwalcast")
PYTHON = "/usr/bin/python3"
SQLITE3 = os.environ.get("WALCAST_SQLITE3", "sqlite3")
HERE = os.path.dirname(os.path.abspath(__file__))

_loaded = False


def load():
    """Loads walcast into this process (its VFS becomes the default)."""
    global _loaded
    if not _loaded:
        c = sqlite3.connect(":memory:")
        c.enable_load_extension(True)
        c.load_extension(EXT)
        c.close()
        _loaded = True


def connect(path, timeout=30.0, uri=False):
    load()
    return sqlite3.connect(path, isolation_level=None, timeout=timeout, uri=uri, check_same_thread=False)


def shell(script, load=True, db=None, check=True, cwd=None, timeout=300):
    """Runs the stock sqlite3 shell on `script`. With load, the script starts with
    `.load` then `.open db` (the order the README's quick start gives)."""
    # Like any real client, wait for a lock rather than fail at once: walcast's
    # own background work (a base image) holds the write lock briefly.
    # .open starts a new connection without the earlier .timeout: set it again.
    lines = [".timeout 10000"]
    if load:
        lines.append(f".load {EXT}")
    if db is not None:
        lines += [f".open {db}", ".timeout 10000"]
    lines.append(script)
    p = subprocess.run([SQLITE3, "-batch", "-bail"], input="\n".join(lines) + "\n", capture_output=True,
                       text=True, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sqlite3 failed ({p.returncode}): {p.stderr}\nscript:\n{script}")
    return p


def py(code, *args, check=True, timeout=600, env=None, cwd=None):
    """Runs Python code in a new Debian python3 process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = HERE
    if env:
        e.update(env)
    p = subprocess.run([PYTHON, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"python child failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def status(db):
    out = shell("PRAGMA walcast_status;", db=db).stdout.strip()
    return json.loads(out)


def checkpoint_truncate(db):
    """Checkpoints everything into the database file (no other connection may be open)."""
    out = shell("PRAGMA wal_checkpoint(TRUNCATE);", db=db).stdout.strip()
    assert out == "0|0|0" or out.startswith("0|"), f"checkpoint did not complete: {out}"


def restore(db, out, frame_no=None, check=True):
    arg = "" if frame_no is None else f", {int(frame_no)}"
    return shell(f"SELECT walcast_restore('{db}', '{out}'{arg});", db=db, check=check)


def verify(db, check=True):
    return shell(f"SELECT walcast_verify('{db}');", db=db, check=check)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_file(a, b, chunk=1 << 22):
    """Compares two files byte for byte, in bounded memory."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                first = off + next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
                raise AssertionError(f"{a} ({sa} bytes) and {b} ({sb} bytes) differ first at byte {first} "
                                     f"(page {first // 4096 + 1} if 4096-byte pages)")
            if not x:
                return
            off += len(x)


def integrity_ok(path):
    out = shell("PRAGMA integrity_check;", load=False, db=path).stdout.strip()
    assert out == "ok", f"integrity_check of {path}: {out}"


def wait_for(cond, timeout=10.0, what="condition"):
    """Polls cond until it returns something true, and returns that. `what`
    names what is awaited in the error; a callable is called then, so that a
    status it shows is the one at the timeout, not at the start."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


def wait_for_status(get, ok, timeout=10.0, what="condition"):
    """Polls get() (a status) until ok(status) holds, and returns that status,
    so that what a test checks next is the status that met the condition."""
    def met():
        s = get()
        return s if ok(s) else None
    return wait_for(met, timeout, what)


# --- replica tests ---------------------------------------------------------

_ports_handed_out = set()


def free_port_pair(lo=20000, hi=32000):
    """A TCP port P on 127.0.0.1 such that P and P+1 are both free now (a primary
    listens on P, its catch-up socket on P+1), never handed out twice in this
    process. Below Linux's ephemeral range, so outgoing connections don't take it."""
    import random
    import socket
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(1000):
        p = rnd.randrange(lo, hi - 1)
        if p in _ports_handed_out or p + 1 in _ports_handed_out or p - 1 in _ports_handed_out:
            continue
        socks = []
        try:
            for q in (p, p + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", q))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _ports_handed_out.update((p, p + 1))
        return p
    raise AssertionError("no free pair of TCP ports")


def frame_no(db):
    """The primary's last committed frame_no (walcast_frame_no(), in a new shell)."""
    return int(shell("SELECT walcast_frame_no();", db=db).stdout.strip())


def walcast_wait(db, frame_no, timeout_ms):
    """`SELECT walcast_wait(frame_no, timeout_ms)` on the replica db, in a new shell
    with walcast loaded: True once frame_no is applied, False at the timeout."""
    out = shell(f"SELECT walcast_wait({int(frame_no)}, {int(timeout_ms)});", db=db,
                timeout=timeout_ms / 1000 + 60).stdout.strip()
    assert out in ("0", "1"), f"walcast_wait returned {out!r}"
    return out == "1"


class LineProcess:
    """A child process that prints `ready [JSON]`, then answers each line it reads
    on stdin with one line, until stdin closes: the tests' replica nodes and the
    benchmark's workers. Its stderr goes to a file in `logdir`."""

    failure = AssertionError

    def __init__(self, argv, name, logdir, env=None, ready_timeout=60):
        self.name = name
        e = dict(os.environ)
        e["PYTHONPATH"] = HERE
        e.update(env or {})
        self.stderr_path = os.path.join(logdir, f"{name}-{time.monotonic_ns()}.stderr")
        self._err = open(self.stderr_path, "w")
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                  env=e, bufsize=1)
        self._q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.line(ready_timeout)
        if not line.startswith("ready"):
            self.kill()
            raise self.failure(f"{name} ({' '.join(argv[2:])}) did not start: {line}\n{self.stderr()}")
        rest = line[len("ready"):].strip()
        self.ready = json.loads(rest) if rest else None

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def _read(self):
        for line in self.p.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def line(self, timeout):
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise self.failure(f"{self.name}: no answer within {timeout} s\n{self.stderr()}")
        if line is None:
            raise self.failure(f"{self.name} exited with {self.p.wait()}\n{self.stderr()}")
        return line

    def send_line(self, s):
        assert "\n" not in s
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()

    def kill(self):
        """kill -9."""
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def close(self, timeout=30, strict=True):
        """Closes stdin: the process exits. One that does not is killed, and with
        `strict` that is a failure."""
        if self.alive():
            try:
                self.p.stdin.close()
                self.p.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.kill()
                if strict:
                    raise self.failure(f"{self.name} did not exit after stdin closed\n{self.stderr()}")
        self.p.wait()

    def stderr(self, n=3000):
        try:
            self._err.flush()
            with open(self.stderr_path, errors="replace") as f:
                return f"--- {self.name} (pid {self.pid}) stderr ---\n" + f.read()[-n:]
        except (OSError, ValueError):
            return ""
