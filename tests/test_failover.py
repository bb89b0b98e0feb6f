"""Identity, fencing and failover, end to end, as real processes.

- A replica pointed at another database's primary refuses it, says so in its
  status, and re-bootstraps only after `PRAGMA walcast_rebootstrap`
  (test_replica.py::test_divergent_history_rebootstraps[other_primary]).
- Promotion: `PRAGMA walcast_role='primary'` on a replica continues the frame
  numbering in a new term; replicas re-pointed at it follow; a replica that
  follows it refuses the old primary, which goes on taking writes; the old
  primary, demoted, re-bootstraps instead of merging its divergent writes.
  This follows README's "Failover" procedure step by step.
"""
import glob
import os
import time

import wc
from test_replica import T_SCHEMA, applying, cluster, commit_many, summary, tcp  # noqa: F401 (fixture)


def rows(node, sql):
    return node.rows(sql)


def test_failover_procedure(cluster, tmp_path):
    tmp = str(tmp_path)
    old_db, r1_db, r2_db = (os.path.join(tmp, n) for n in ("old.db", "r1.db", "r2.db"))
    port_old, port_new = wc.free_port_pair(), wc.free_port_pair()
    old = cluster.primary(old_db, port_old)
    commit_many(old_db, 40, per_txn=3)
    r1 = cluster.replica(r1_db, port_old, name="r1")
    r2 = cluster.replica(r2_db, port_old, name="r2")
    cluster.converge(old_db, r1_db)
    cluster.converge(old_db, r2_db)
    before = wc.status(old_db)
    applied = r1.status()["applied_frame_no"]
    assert applied == before["frame_no"] and before["term"] == 0

    # Step 1: the old primary stops taking writes (here: it stays up, and will
    # take divergent writes later, the worst case).
    # Step 2: promote r1, then give it an endpoint to listen on.
    r = r1.sql("PRAGMA walcast_role = 'primary'")
    assert r.get("rows") == [["primary"]], f"{r}\n{cluster.diag(r1_db)}"
    assert rows(r1, f"PRAGMA walcast_endpoint = '{tcp(port_new)}'") == [[tcp(port_new)]]
    st = wc.status(r1_db)
    assert st["role"] == "primary" and st["state"] == "capturing", st
    assert st["db_id"] == before["db_id"], "a promoted replica keeps the database's identity"
    assert st["term"] == 1 and st["generation"] == (1 << 32) + 1, st
    assert "promoted" in st["generation_reason"], st
    assert st["frame_no"] > applied, "frame numbering continues after the last applied frame"
    verify = wc.shell(f"SELECT walcast_verify('{r1_db}');", db=r1_db).stdout
    assert '"ok":true' in verify.replace(" ", ""), verify
    assert f'"first_frame_no":{applied + 1}' in verify.replace(" ", ""), verify
    # It takes writes now, through walcast, from another process.
    commit_many(r1_db, 10, per_txn=2)

    # Step 3: point the other replicas at the new primary.
    assert rows(r2, f"PRAGMA walcast_endpoint = '{tcp(port_new)}'") == [[tcp(port_new)]]
    cluster.converge(r1_db, r2_db)
    cluster.identical(r1_db, r2_db)
    assert r2.status()["term"] == 1

    # The old primary takes writes the new one never sees.
    commit_many(old_db, 25, stmt="INSERT INTO t(k, v) VALUES (-7, randomblob(300))", per_txn=2)
    assert wc.frame_no(old_db) > applied

    # A replica following the new primary refuses the old one: its status says
    # why, and its database is unchanged.
    want = summary(r2_db)
    applied_r2 = r2.status()["applied_frame_no"]
    assert rows(r2, f"PRAGMA walcast_endpoint = '{tcp(port_old)}'") == [[tcp(port_old)]]
    st = wc.wait_for(lambda: (s := r2.status())["state"] == "error" and "stale primary" in (s["last_error"] or "") and s,
                     timeout=20, what=lambda: f"r2 refusing the old primary\n{cluster.diag(r2_db)}")
    assert "term 0" in st["last_error"] and "term 1" in st["last_error"], st
    assert st["applied_frame_no"] == applied_r2 and st["term"] == 1, st
    assert summary(r2_db) == want
    assert wc.shell("SELECT count(*) FROM t WHERE k = -7;", load=False, db=r2_db).stdout.strip() == "0"
    # back to the new primary: it continues
    assert rows(r2, f"PRAGMA walcast_endpoint = '{tcp(port_new)}'") == [[tcp(port_new)]]
    commit_many(r1_db, 5)
    cluster.converge(r1_db, r2_db)

    # Step 4: demote the old primary; it re-bootstraps from the new one and its
    # divergent writes are gone (kept only in its moved-aside log).
    r = old.sql("PRAGMA walcast_role = 'replica'")
    assert r.get("rows") == [["replica"]], r
    assert rows(old, f"PRAGMA walcast_endpoint = '{tcp(port_new)}'") == [[tcp(port_new)]]
    assert glob.glob(old_db + "-walcast.demoted-*"), "the demoted primary's log is kept aside"
    assert not os.path.exists(old_db + "-walcast")
    cluster.converge(r1_db, old_db)
    st = old.status()
    assert st["role"] == "replica" and st["bootstraps"] >= 1 and st["term"] == 1, st
    cluster.identical(r1_db, old_db)
    assert wc.shell("SELECT count(*) FROM t WHERE k = -7;", load=False, db=old_db).stdout.strip() == "0"
    # Writes to it are refused now; it follows the new primary.
    r = old.sql("INSERT INTO t(k) VALUES (1)")
    assert "readonly" in r.get("error", ""), r
    commit_many(r1_db, 5)
    cluster.converge(r1_db, old_db)
    cluster.converge(r1_db, r2_db)
    cluster.identical(r1_db, r2_db)


def test_promotion_is_refused_cleanly(cluster, tmp_path):
    """A replica that never bootstrapped cannot be promoted; nothing changes."""
    tmp = str(tmp_path)
    r_db = os.path.join(tmp, "r.db")
    port = wc.free_port_pair()  # nobody listens
    r = cluster.replica(r_db, port)
    out = r.sql("PRAGMA walcast_role = 'primary'")
    assert "no applied position" in out.get("error", ""), out
    assert rows(r, "PRAGMA walcast_role") == [["replica"]]
    assert not os.path.exists(r_db + "-walcast")
    st = r.status()
    assert st["role"] == "replica" and st["endpoint"] == tcp(port), st


def test_promotion_from_another_process_stops_the_applier(cluster, tmp_path):
    """The process that applies is not the one that promotes: it stops applying,
    and the promoted database takes writes from the first process too."""
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    cluster.primary(p_db, port)
    commit_many(p_db, 20)
    applier = cluster.replica(r_db, port, name="applier")
    applying(applier)
    cluster.converge(p_db, r_db)
    assert applier.status()["applier_in_this_process"] is True
    out = wc.shell("PRAGMA walcast_role = 'primary'; SELECT walcast_frame_no();", db=r_db).stdout.split()
    assert out[0] == "primary", out
    # The old applier process follows: it writes, through walcast, captured.
    wc.wait_for(lambda: "error" not in applier.sql("INSERT INTO t(k) VALUES (42)"), timeout=10,
                what="the former applier process taking writes after the promotion")
    st = applier.status()
    assert st["role"] == "primary" and st["term"] == 1, st
    n = wc.frame_no(r_db)
    assert n > int(out[1])
    verify = wc.shell(f"SELECT walcast_verify('{r_db}');", db=r_db).stdout
    assert '"ok":true' in verify.replace(" ", ""), verify



class UnresponsivePrimary:
    """A catch-up endpoint that completes NNG's connection handshake as a REP
    socket would (so that the request goes out) and then never answers: a
    primary that hangs. `received` counts the bytes received after the handshake."""

    def __init__(self, port):
        import socket
        import threading
        self.received = 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._hold, args=(c,), daemon=True).start()

    def _hold(self, c):
        try:
            c.recv(8)  # the REQ side's SP header
            c.sendall(bytes([0, ord("S"), ord("P"), 0, 0, 0x31, 0, 0]))  # REP0
            while True:
                b = c.recv(65536)
                if not b:
                    return
                self.received += len(b)
        except OSError:
            return

    def close(self):
        self.srv.close()
        for c in self.conns:
            c.close()


def test_promotion_does_not_wait_for_an_unresponsive_primary(cluster, tmp_path):
    """The replica's catch-up request goes to a primary that hangs (connected,
    never answering). Promotion stops the replica's session by closing its
    sockets: it does not wait out the request's 5 s timeout."""
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    pn = cluster.primary(p_db, port)
    commit_many(p_db, 20)
    r = cluster.replica(r_db, port)
    cluster.converge(p_db, r_db)
    pn.close()
    hung_port = wc.free_port_pair()
    hung = UnresponsivePrimary(hung_port + 1)
    try:
        # A new session starts with a catch-up request, which waits for a reply.
        rows(r, f"PRAGMA walcast_endpoint = '{tcp(hung_port)}'")
        wc.wait_for(lambda: hung.received > 0, timeout=10, what="the catch-up request reaching the hung primary")
        t0 = time.monotonic()
        assert rows(r, "PRAGMA walcast_role = 'primary'") == [["primary"]]
        took = time.monotonic() - t0
    finally:
        hung.close()
    print(f"promotion with the catch-up request waiting on a hung primary took {took:.3f} s")
    assert took < 2.5, f"promotion waited {took:.1f} s for the hung primary"
    assert r.status()["term"] == 1
