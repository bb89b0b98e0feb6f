"""The benchmark harness (scripts/bench.py) at tiny sizes, so that it cannot rot.

It checks only that the report and the lag plot are produced and hold every
section: no timing is asserted (a goal missed at smoke sizes is not a failure).
"""
import os
import struct
import subprocess
import sys
import zlib

import wc

BENCH = os.path.join(wc.ROOT, "scripts", "bench.py")
SECTIONS = ["## 1. Primary overhead", "## 2. Replication lag", "## 3. Throughput", "## 4. Catch-up and bootstrap",
            "## 5. Fan-out", "## 6. Memory", "## 7. Reader impact"]


def png_size(path):
    """Width and height of a PNG, after checking its signature and every chunk's CRC."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    off, size, kinds = 8, None, []
    while off < len(data):
        n, kind = struct.unpack(">I4s", data[off:off + 8])
        body = data[off + 8:off + 8 + n]
        (crc,) = struct.unpack(">I", data[off + 8 + n:off + 12 + n])
        assert zlib.crc32(kind + body) & 0xffffffff == crc, f"bad CRC in chunk {kind!r} of {path}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        off += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds, kinds
    return size


def test_bench_smoke_writes_report_and_plot(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = dict(os.environ, BENCH_SCALE="smoke")
    p = subprocess.run([wc.PYTHON, BENCH, "--out", str(out), "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600, env=env, cwd=wc.ROOT)
    assert p.returncode == 0, f"bench.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-6000:]}"
    text = out.read_text()
    for heading in ["# walcast benchmarks", "## Goals missed", "## All goals"] + SECTIONS:
        assert heading in text, f"{heading!r} missing from the report:\n{text[:3000]}"
    assert "This section failed" not in text, text
    assert "not measured" not in text, text
    # The machine, the commands and the baseline beside each figure.
    for needle in ["cores (nproc)", "MemTotal", "SQLite", "walcast build", "Command: `BENCH_SCALE=smoke",
                   "| plain", "ratio"]:
        assert needle in text, f"{needle!r} missing from the report"
    # Where the CPU goes: the capture thread and the replica's applier were
    # measured (CPU time, a number, not n/a), at every rate.
    for row in ["| walcast primary: walcast-capture |", "| walcast replica: walcast-replica |"]:
        line = next((x for x in text.splitlines() if x.startswith(row)), None)
        assert line, f"{row!r} missing from the report"
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == 3 and all(float(c.replace(",", "")) > 0 for c in cells), line
    # Fan-out: the writer's threads, for plain and each walcast configuration.
    line = next((x for x in text.splitlines() if x.startswith("| walcast-capture |")), None)
    assert line, "the fan-out section's thread table is missing"
    cells = [c.strip() for c in line.split("|")[2:-1]]
    assert cells[0] == "n/a" and len(cells) == 4 and all(float(c.replace(",", "")) > 0 for c in cells[1:]), line
    assert "The commit path alone (the application thread)" in text
    # The commit path's instructions: a count for each of the three kinds.
    for row in ["| plain SQLite |", "| walcast loaded, no role", "| walcast primary (no replica attached) |"]:
        line = next((x for x in text.splitlines() if x.startswith(row)), None)
        assert line, f"{row!r} missing from the commit path's table"
        assert float(line.split("|")[2].replace(",", "")) > 1000, line
    png = tmp_path / "BENCHMARKS-lag.png"
    assert "BENCHMARKS-lag.png" in text
    w, h = png_size(png)
    assert w >= 300 and h >= 200, (w, h)


def test_builtin_png_writer(tmp_path):
    """The fallback plot (no matplotlib) is a valid PNG."""
    sys.path.insert(0, os.path.join(wc.ROOT, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    path = str(tmp_path / "cdf.png")
    series = [("a", sorted(range(1000, 5_000_000, 997)), "#1f77b4", False),
              ("b", sorted(range(-50, 90_000, 31)), "#d62728", True), ("empty", [], "#2ca02c", False)]
    bench.builtin_cdf_png(series, path)
    assert png_size(path) == (720, 420)
