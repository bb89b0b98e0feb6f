#!/usr/bin/env bash
# walcast demo: a primary and a replica in two processes over tcp loopback.
# Rows written on the primary (from the stock sqlite3 shell and from Python)
# appear on the replica, where a sqlite3 that never loaded walcast reads them.
# Then the log is verified and restored.
set -euo pipefail
cd "$(dirname "$0")/.."
EXT=./target/release/libwalcast
OUT=demo-out
PORT=${WALCAST_DEMO_PORT:-7070}
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. A replica process: Python loads walcast and follows tcp://127.0.0.1:$PORT"
# The replica applies while a process with walcast loaded keeps it open; this
# one stays until the demo closes the fifo it waits on.
mkfifo "$OUT/replica.stop"
/usr/bin/python3 -c '
import sqlite3, sys
ext, db, port, stop = sys.argv[1:5]
boot = sqlite3.connect(":memory:"); boot.enable_load_extension(True); boot.load_extension(ext); boot.close()
c = sqlite3.connect(db, isolation_level=None)
c.execute(f"PRAGMA walcast_endpoint = \x27tcp://127.0.0.1:{port}\x27")
print("replica role:", c.execute("PRAGMA walcast_role = \x27replica\x27").fetchone()[0], flush=True)
open(stop).read()
' "$EXT" "$OUT/replica.db" "$PORT" "$OUT/replica.stop" &
REPLICA_PID=$!
exec 3>"$OUT/replica.stop"
trap 'exec 3>&-; wait $REPLICA_PID 2>/dev/null || true; rm -f "$OUT/replica.stop"' EXIT

say "2. The stock sqlite3 shell makes a database the primary, listening on tcp://127.0.0.1:$PORT"
sqlite3 -batch -bail <<SQL
.load $EXT
.open $OUT/primary.db
PRAGMA walcast_endpoint = 'tcp://127.0.0.1:$PORT';
PRAGMA walcast_role = 'primary';
CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);
INSERT INTO orders(item, qty) VALUES ('apples', 3), ('pears', 5), ('plums', 7);
SQL

say "3. Python writes more on the primary, then waits on the replica for its frame_no (read-your-writes)"
/usr/bin/python3 - "$EXT" "$OUT/primary.db" "$OUT/replica.db" <<'PY'
import sqlite3, sys
ext, primary, replica = sys.argv[1:4]
boot = sqlite3.connect(":memory:"); boot.enable_load_extension(True); boot.load_extension(ext); boot.close()
p = sqlite3.connect(primary, isolation_level=None)
for i in range(5):
    p.execute("INSERT INTO orders(item, qty) VALUES (?, ?)", (f"batch-{i}", i))
n = p.execute("SELECT walcast_frame_no()").fetchone()[0]
r = sqlite3.connect(replica, isolation_level=None)
ok = r.execute("SELECT walcast_wait(?, 10000)", (n,)).fetchone()[0]
print(f"primary committed frame_no {n}; walcast_wait on the replica returned {ok}")
print("rows on the replica:", r.execute("SELECT count(*) FROM orders").fetchone()[0])
print("primary status:", p.execute("PRAGMA walcast_status").fetchone()[0])
print("replica status:", r.execute("PRAGMA walcast_status").fetchone()[0])
PY

say "4. A sqlite3 shell that never loaded walcast reads the replica"
sqlite3 -batch "$OUT/replica.db" "SELECT id, item, qty FROM orders ORDER BY id;"

say "5. Writes on the replica are refused"
sqlite3 -batch <<SQL || true
.load $EXT
.open $OUT/replica.db
INSERT INTO orders(item, qty) VALUES ('nope', 0);
SQL

say "6. Status from any process with walcast loaded (the replica's comes from the process that applies)"
sqlite3 -batch -bail <<SQL
.load $EXT
.open $OUT/replica.db
PRAGMA walcast_status;
SQL

say "7. The primary's log verifies, and restores the database byte for byte"
sqlite3 -batch -bail <<SQL
.load $EXT
.open $OUT/primary.db
PRAGMA wal_checkpoint(TRUNCATE);
SELECT walcast_verify('$OUT/primary.db');
SELECT walcast_restore('$OUT/primary.db', '$OUT/restored.db');
SQL
cmp "$OUT/primary.db" "$OUT/restored.db" && echo "restored.db is byte-identical to primary.db"
say "Files beside the databases"
ls -l "$OUT"
