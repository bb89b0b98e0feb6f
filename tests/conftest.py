import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wc  # noqa: E402


def pytest_sessionstart(session):
    if not os.path.exists(wc.EXT + ".so"):
        raise pytest.UsageError(f"{wc.EXT}.so is missing: run `make` first")


@pytest.fixture
def tmpdir_path(tmp_path):
    return str(tmp_path)
