"""Relaying replicas (`PRAGMA walcast_relay`), end to end, as real processes.

A relay is a replica that passes the live stream on at an endpoint of its own
and forwards its replicas' catch-up requests to its primary, so that a primary
serves one connection however many replicas hang below it. Its replicas verify
every frame themselves, exactly as when they follow the primary directly.
"""
import os

import pytest

import wc
from test_keys import KEY, keyed_primary, keyed_replica
from test_replica import cluster, commit_many, port, read, summary, tcp  # noqa: F401 (fixtures)


def relay_status(db):
    return wc.status(db).get("relay") or {}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_replicas_of_a_relay_converge_byte_identical(cluster, tmp_path, port, key):
    """With a key, the relay passes sealed messages and requests on as they are."""
    tmp = str(tmp_path)
    primary, relay, below = (os.path.join(tmp, n) for n in ("primary.db", "relay.db", "below.db"))
    rport = wc.free_port_pair()
    if key:
        pn = keyed_primary(cluster, primary, port, key)
    else:
        pn = cluster.primary(primary, port)
    commit_many(primary, 20, per_txn=20)

    rn = keyed_replica(cluster, relay, port, key, name="relay")
    assert rn.rows(f"PRAGMA walcast_relay = '{tcp(rport)}'") == [[tcp(rport)]]
    assert rn.rows("PRAGMA walcast_relay") == [[tcp(rport)]]
    cluster.converge(primary, relay)
    wc.wait_for(lambda: relay_status(relay).get("endpoint") == tcp(rport), timeout=10,
                what=lambda: f"the relay listening: {wc.status(relay)}")

    # A new replica of the relay bootstraps through it (its snapshot comes from
    # the primary, passed on), then follows the relayed live stream.
    bn = keyed_replica(cluster, below, rport, key, name="below")
    cluster.converge(primary, below)
    assert summary(below) == summary(primary, load=True)
    assert bn.status()["bootstraps"] >= 1, bn.status()
    catch_ups = bn.status()["catch_ups"]
    commit_many(primary, 30)
    cluster.converge(primary, below)
    st = bn.status()
    assert st["endpoint"] == tcp(rport) and st["state"] == "streaming", st
    assert st["rejected_messages"] == 0, st
    # Those came on the relayed live stream, not by catch-up.
    assert st["catch_ups"] == catch_ups, st
    # One connection at the primary: the relay's. One at the relay.
    wc.wait_for(lambda: relay_status(relay).get("replicas") == 1, timeout=10, what=lambda: f"{wc.status(relay)}")
    assert pn.status()["replicas"] == 1, pn.status()
    cluster.identical(primary, below)
    cluster.identical(primary, relay)

    # The relay restarts from its conf (role, endpoint and relay persist); its
    # replica catches up what it missed meanwhile, through it.
    rn.kill()
    commit_many(primary, 10, per_txn=5)
    cluster.node(relay, name="relay2")
    cluster.converge(primary, relay)
    cluster.converge(primary, below)
    commit_many(primary, 10)
    cluster.converge(primary, below)
    cluster.identical(primary, below)


def test_bad_relay_values_change_nothing_and_a_relay_that_cannot_listen_says_so(cluster, tmp_path, port):
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    commit_many(primary, 5)
    rn = cluster.replica(replica, port)
    cluster.converge(primary, replica)
    conf = read(replica + "-walcast-conf")

    r = rn.sql("PRAGMA walcast_relay = 'tcp://127.0.0.1'")
    assert "invalid walcast_relay 'tcp://127.0.0.1': no port" in r.get("error", ""), r
    p = wc.shell("PRAGMA walcast_relay = 'http://x';", db=replica, check=False)
    assert p.returncode != 0 and "invalid walcast_relay" in p.stderr, (p.stdout, p.stderr)
    r = rn.sql(f"PRAGMA walcast_relay = '{tcp(port)}'")
    assert "is this database's walcast_endpoint" in r.get("error", ""), r
    assert read(replica + "-walcast-conf") == conf
    assert rn.rows("PRAGMA walcast_relay") == [["off"]]
    assert wc.status(replica).get("relay") is None

    # An address another socket holds (the primary's catch-up port): apply goes
    # on, and the status and stderr say why the replica does not relay.
    busy = f"tcp://127.0.0.1:{port + 1}"
    assert rn.rows(f"PRAGMA walcast_relay = '{busy}'") == [[busy]]
    wc.wait_for(lambda: "cannot listen" in (relay_status(replica).get("error") or ""), timeout=10,
                what=lambda: f"the relay error in the status: {wc.status(replica)}")
    commit_many(primary, 5)
    cluster.converge(primary, replica)
    assert "not relaying" in rn.stderr(), rn.stderr()

    # 'off' stops relaying.
    assert rn.rows("PRAGMA walcast_relay = 'off'") == [["off"]]
    wc.wait_for(lambda: wc.status(replica).get("relay") is None, timeout=10, what=lambda: f"{wc.status(replica)}")
    commit_many(primary, 5)
    cluster.converge(primary, replica)
    cluster.identical(primary, replica)


def test_relays_chain(cluster, tmp_path, port):
    """primary -> relay -> relay -> replica: the last one, three hops away,
    bootstraps through both relays and follows the stream they pass on."""
    tmp = str(tmp_path)
    primary = os.path.join(tmp, "primary.db")
    hops = [os.path.join(tmp, f"hop{i}.db") for i in (1, 2, 3)]
    pn = cluster.primary(primary, port)
    commit_many(primary, 10, per_txn=10)
    follows = port
    for i, db in enumerate(hops):
        n = cluster.replica(db, follows, name=f"hop{i + 1}")
        if i < 2:
            follows = wc.free_port_pair()
            assert n.rows(f"PRAGMA walcast_relay = '{tcp(follows)}'") == [[tcp(follows)]]
    cluster.converge(primary, hops[-1])
    commit_many(primary, 20)
    for db in hops:
        cluster.converge(primary, db)
    st = wc.status(hops[-1])
    assert st["state"] == "streaming" and st["bootstraps"] >= 1 and st["rejected_messages"] == 0, st
    assert pn.status()["replicas"] == 1, pn.status()
    cluster.identical(primary, hops[-1])


SET_AND_CHECK = """
import sys, wc
db, pragma, values = sys.argv[1], sys.argv[2], sys.argv[3].split()
c = wc.connect(db)
last = None
for i in range(40):
    now = c.execute(f"PRAGMA {pragma}").fetchone()[0]
    assert last is None or now == last, f"{pragma} set to {last} reads {now}: another process's update undid it"
    last = values[i % len(values)]
    assert c.execute(f"PRAGMA {pragma} = '{last}'").fetchone()[0] == last
"""


def test_pragmas_in_two_processes_at_once_lose_no_setting(tmp_path, port):
    """Each change of the conf loads it, changes one setting and saves it. Two
    processes doing so at once must not undo each other's change (they did
    before changes were made under the conf's lock): one sets walcast_relay,
    the other walcast_endpoint, 40 times each, and each checks before every
    change that its last value still reads back."""
    import threading
    replica = os.path.join(str(tmp_path), "replica.db")
    wc.shell(f"PRAGMA walcast_endpoint = '{tcp(port)}'; PRAGMA walcast_role = 'replica';", db=replica)
    relays = f"tcp://127.0.0.1:{port + 1} tcp://127.0.0.2:{port + 1}"
    endpoints = " ".join(f"tcp://127.0.0.3:{port + i}" for i in range(3))
    failures = []

    def run(pragma, values):
        try:
            wc.py(SET_AND_CHECK, replica, pragma, values, timeout=120)
        except AssertionError as e:
            failures.append(str(e))

    threads = [threading.Thread(target=run, args=a) for a in (("walcast_relay", relays), ("walcast_endpoint", endpoints))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert wc.shell("PRAGMA walcast_relay; PRAGMA walcast_endpoint;", db=replica).stdout.split() == [
        relays.split()[39 % 2], endpoints.split()[39 % 3]]


def test_switching_the_relay_on_and_off_never_stalls_apply(cluster, tmp_path, port):
    """Each change restarts the applier's session, closing the relay's sockets
    while its threads may still be starting (this once hung the applier for
    good); apply must go on after every one."""
    tmp = str(tmp_path)
    primary, replica = os.path.join(tmp, "primary.db"), os.path.join(tmp, "replica.db")
    cluster.primary(primary, port)
    rn = cluster.replica(replica, port)
    ports = [wc.free_port_pair(), wc.free_port_pair()]
    for i in range(30):
        value = "off" if i % 3 == 2 else tcp(ports[i % 2])
        assert rn.rows(f"PRAGMA walcast_relay = '{value}'") == [[value]]
        commit_many(primary, 2)
        cluster.converge(primary, replica, timeout=20)
    cluster.identical(primary, replica)
