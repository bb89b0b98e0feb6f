"""Capture and restore are right for every page size SQLite allows."""
import os

import pytest

import wc
from test_workload import check_restores, run_workload


@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
def test_page_size(tmp_path, page_size):
    tmp = str(tmp_path)
    db = os.path.join(tmp, "app.db")
    snaps = os.path.join(tmp, "snaps")
    os.mkdir(snaps)
    run_workload(db, "--seed", str(page_size), "--ops", "60", "--role", "--page-size", str(page_size),
                 "--snapshots", snaps, "--conns", "2")
    assert wc.status(db)["page_size"] == page_size
    check_restores(tmp, db, snaps)
