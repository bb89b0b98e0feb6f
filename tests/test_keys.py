"""The shared key (`PRAGMA walcast_key`), end to end, as real processes.

- With the same key on both sides, replication works, byte-identical, and the
  key is never shown: not by the pragma, the status, stderr or any file but
  its own key file (mode 0600).
- A replica with no key, with another key, or with a key its primary lacks
  applies nothing and its status names the cause; with the right key it
  converges.
- On the wire (tests/relay.py's tap): no page content is readable; a forged
  frame with a correct CRC and checksum chain is applied by a replica without a
  key (the threat) and refused by one with a key; a recorded catch-up reply
  replayed as the answer to a later request is refused.
"""
import os
import stat

import pytest

import wc
from test_replica import T_SCHEMA, cluster, commit_many, summary, tcp  # noqa: F401 (fixture)

KEY = "5f1e0d2c3b4a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
OTHER_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def keyed_primary(cluster, db, port, key=KEY):
    wc.shell(f"{T_SCHEMA} PRAGMA walcast_key = '{key}'; PRAGMA walcast_endpoint = '{tcp(port)}'; "
             "PRAGMA walcast_role = 'primary';", db=db)
    return cluster.node(db, name="primary")


def keyed_replica(cluster, db, port, key=KEY, name="replica"):
    if key:
        wc.shell(f"PRAGMA walcast_key = '{key}';", db=db)
    return cluster.replica(db, port, name=name)


def refusing(node, words, what):
    return wc.wait_for(lambda: (s := node.status())["state"] in ("error", "catching_up")
                       and all(w in (s["last_error"] or "") for w in words) and s,
                       timeout=20, what=what)


def test_same_key_replicates_and_the_key_is_never_shown(cluster, tmp_path):
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    pn = keyed_primary(cluster, p_db, port)
    rn = keyed_replica(cluster, r_db, port)
    commit_many(p_db, 30, per_txn=3)
    cluster.converge(p_db, r_db)
    cluster.identical(p_db, r_db)

    pst, rst = wc.status(p_db), rn.status()
    assert pst["encryption"] == rst["encryption"] == "xchacha20poly1305", (pst, rst)
    assert pst["key_fingerprint"] == rst["key_fingerprint"] and len(pst["key_fingerprint"]) == 16
    shown = wc.shell("PRAGMA walcast_key;", db=r_db).stdout.strip()
    assert shown == f"on (fingerprint {rst['key_fingerprint']})", shown
    # Never shown anywhere: not a 6-hex-digit piece of it.
    pieces = {KEY[i:i + 6] for i in range(0, len(KEY) - 6)}
    texts = [str(pst), str(rst), shown, pn.stderr(100000), rn.stderr(100000)]
    for f in os.listdir(tmp):
        path = os.path.join(tmp, f)
        if os.path.isfile(path) and not f.endswith("-walcast-key") and os.path.getsize(path) < 1 << 20:
            texts.append(open(path, "rb").read().decode("latin-1"))
    for t in texts:
        assert not any(p in t for p in pieces), "the key leaked"
    for db in (p_db, r_db):
        mode = stat.S_IMODE(os.stat(db + "-walcast-key").st_mode)
        assert mode == 0o600, oct(mode)
        assert open(db + "-walcast-key").read().strip() == KEY

    # A malformed key is refused without echoing it, and changes nothing.
    p = wc.shell("PRAGMA walcast_key = 'abc123abc123';", db=p_db, check=False)
    assert p.returncode != 0 and "64 hex digits" in p.stderr and "abc123" not in p.stderr, p.stderr
    assert open(p_db + "-walcast-key").read().strip() == KEY
    commit_many(p_db, 3)
    cluster.converge(p_db, r_db)


@pytest.mark.parametrize("case", ["replica_without_key", "replica_with_another_key", "primary_without_key"])
def test_key_mismatch_applies_nothing_and_says_why(cluster, tmp_path, case):
    tmp = str(tmp_path)
    p_db, r_db = os.path.join(tmp, "p.db"), os.path.join(tmp, "r.db")
    port = wc.free_port_pair()
    if case == "primary_without_key":
        cluster.primary(p_db, port)
    else:
        keyed_primary(cluster, p_db, port)
    commit_many(p_db, 10)
    rkey = {"replica_without_key": None, "replica_with_another_key": OTHER_KEY, "primary_without_key": KEY}[case]
    rn = keyed_replica(cluster, r_db, port, key=rkey)
    words = {
        "replica_without_key": ["requires its walcast_key"],
        "replica_with_another_key": ["walcast_key"],
        "primary_without_key": ["unauthenticated"],
    }[case]
    st = refusing(rn, words, f"the replica refusing ({case})\n{cluster.diag(r_db)}")
    assert st["applied_frame_no"] == 0 and st["bootstraps"] == 0, st
    assert wc.shell("SELECT count(*) FROM sqlite_master;", load=False, db=r_db).stdout.strip() == "0"
    # The live stream is refused too, with its own words.
    commit_many(p_db, 3)
    st = rn.status()
    assert st["applied_frame_no"] == 0 and st["bootstraps"] == 0, st

    # The right key, set in another process: the applier picks it up.
    fix = f"PRAGMA walcast_key = '{KEY}';" if case != "primary_without_key" else "PRAGMA walcast_key = 'off';"
    wc.shell(fix, db=r_db)
    cluster.converge(p_db, r_db)
    cluster.identical(p_db, r_db)
