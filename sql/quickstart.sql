-- The README's quick start as a script, for the stock sqlite3 shell:
--   sqlite3 < sql/quickstart.sql        (from the repository root, after `make`)
-- It works in a scratch database, quickstart.db, next to where it is run.
.bail on
.load ./target/release/libwalcast
.shell rm -f quickstart.db quickstart.db-* quickstart-copy.db quickstart-then.db
.open quickstart.db
CREATE TABLE t(x);
PRAGMA walcast_role = 'primary';
INSERT INTO t VALUES (1), (2);
INSERT INTO t VALUES (3);
SELECT 'frame_no: ' || walcast_frame_no();
PRAGMA walcast_status;
SELECT walcast_verify('quickstart.db');
PRAGMA wal_checkpoint(TRUNCATE);
SELECT walcast_restore('quickstart.db', 'quickstart-copy.db');
SELECT walcast_restore('quickstart.db', 'quickstart-then.db', walcast_frame_no() - 1);
.open quickstart-then.db
SELECT 'rows as of the frame before the last: ' || group_concat(x) FROM t;
