"""Shared fixtures: small real data (MovieTweetings, first rows by time) and one shared pipeline run.

The pipeline tests share one 3-span incremental backfill (module scope would
rerun it per file; session scope runs it once) because a TFX run costs about
a minute per span on two cores.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# As the CLI and `make test` set it: at 2, importing TensorFlow logs CUDA plugin errors on stderr,
# which the one-line-error tests of the CLI would read as extra lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pipeline.local_runner import cache_beam_signatures, skip_tfx_self_packaging  # noqa: E402

# Executors that tests run in this process (ExampleGen, the guard) are on the DirectRunner too,
# and get the per-span child's Beam set-up.
skip_tfx_self_packaging([])
cache_beam_signatures()

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "data" / "movietweetings-100k"
SHARED = REPO.parent / "shared" / "data" / "movietweetings-100k"
ROWS_PER_SPAN = 1500
TEST_SPANS = 3
def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Test-sized training: 1 epoch, in-memory Beam (process start-up dominates on tiny spans). Pushes
# and live evaluation look for a server on a port nobody listens on, never a developer's own
# server on the default 8500.
TEST_CONFIG = {"epochs": 1, "beam_args": ["--direct_running_mode=in_memory"], "replay_fraction": 0.0,
               "serving_address": f"127.0.0.1:{_unused_port()}"}


def movietweetings_dir() -> Path:
    for candidate in (BUNDLED, SHARED):
        if (candidate / "ratings.dat").exists():
            return candidate
    pytest.skip("MovieTweetings data not found")


def increc(*args: str, check: bool = True, timeout: int = 900, env=None) -> subprocess.CompletedProcess:
    """Runs the increc CLI as a user would, in a fresh process (`env`: extra environment variables)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"increc {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def write_span(data_dir: Path, span: int, rows, header=("user_id", "item_id", "timestamp", "label")) -> Path:
    path = data_dir / f"span-{span}" / "interactions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def time_ordered_ratings(n: int):
    """(user, item, timestamp, label) of the first n MovieTweetings ratings by time (label: rating >= 8)."""
    source = movietweetings_dir()
    rows = []
    with open(source / "ratings.dat", encoding="utf-8") as f:
        for line in f:
            user, item, rating, ts = line.strip().split("::")
            rows.append((user, item, int(ts), int(int(rating) >= 8)))
    rows.sort(key=lambda r: r[2])
    return rows[:n]


def write_items(data_dir: Path) -> None:
    source = movietweetings_dir()
    with open(source / "movies.dat", encoding="utf-8") as f, open(data_dir / "items.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["item_id", "genres", "year"])
        for line in f:
            item, title, genres = line.rstrip("\n").split("::")
            year = re.search(r"\((\d{4})\)\s*$", title)
            writer.writerow([item, genres, year.group(1) if year else ""])


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """DATA dir: spans 1-3 of 1500 rows (span 1 has one malformed row), span 4-5 spare good spans."""
    data = tmp_path_factory.mktemp("data")
    rows = time_ordered_ratings(ROWS_PER_SPAN * 5)
    write_items(data)
    for span in range(1, 6):
        chunk = [list(r) for r in rows[(span - 1) * ROWS_PER_SPAN: span * ROWS_PER_SPAN]]
        if span == 1:
            chunk[10][2] = "yesterday"  # malformed timestamp: within the 0.1% budget, dropped and counted
        write_span(data, span, chunk)
    return data


@pytest.fixture(scope="session")
def shared_run(small_data, tmp_path_factory):
    """One incremental backfill over spans 1-3 with replay off; returns its data, work, config, report,
    stdout and the temp directory (TMPDIR) it ran with."""
    work = tmp_path_factory.mktemp("work")
    temp = tmp_path_factory.mktemp("run-tmpdir")
    config = work.parent / "test-config.json"
    config.write_text(json.dumps(TEST_CONFIG))
    report = work / "report.json"
    result = increc("backfill", "--data", str(small_data), "--work", str(work), "--spans", f"1-{TEST_SPANS}",
                    "--config", str(config), "--report", str(report), "--no-progress", env={"TMPDIR": str(temp)})
    return {"data": small_data, "work": work, "config": config, "report": json.loads(report.read_text()),
            "stdout": result.stdout, "tmpdir": temp}
