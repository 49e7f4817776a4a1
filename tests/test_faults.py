"""Faults: kill -9 at every component boundary, Ctrl-C, a full disk on push. Real processes throughout.

After any of them the deployment must be what one clean run leaves: at most one
new version, the same vocabularies, replay reservoir and settings, and nothing
half-made ever named by models.config (so never loaded by a server).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

from components.deployment import DeploymentState
from tests.conftest import REPO, TEST_CONFIG, increc

BOUNDARIES = ["SpanExampleGen", "Transform", "Trainer", "Evaluator", "ServingPusher"]


def _start(data: Path, work: Path, span: int, config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--data", str(data), "--work", str(work),
                             "--span", str(span), "--config", str(config), "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _executions(work: Path, component: str) -> int:
    """Output directories the component has made (one per output per execution: they appear when it starts)."""
    return sum(1 for _ in (work / "pipeline" / component).glob("*/*"))


def _wait_for(process: subprocess.Popen, work: Path, component: str) -> None:
    before = _executions(work, component)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None and _executions(work, component) == before:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before {component} started:\n{process.stdout.read()[-3000:]}"


def _run_until(data, work, span, config, component: str) -> None:
    """Starts span `span` and kill -9s the command as soon as `component` starts."""
    process = _start(data, work, span, config)
    _wait_for(process, work, component)
    process.kill()
    process.wait()


def _state(work: Path) -> dict:
    """What a rerun must reproduce: vocabularies, the replay reservoir (as examples), the saved settings."""
    def examples(path: Path):
        records = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
        # Compared as parsed protos: the encoder may order an example's map entries differently run to run.
        return sorted(tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True) for r in records)

    return {
        "vocab": {str(p.relative_to(work)): p.read_text() for p in sorted((work / "vocab").rglob("*.vocab"))},
        "replay": {str(p.relative_to(work)): examples(p) for p in sorted((work / "replay").rglob("*.gz"))},
        "config": json.loads((work / "config.json").read_text()),
    }


def _history(work: Path):
    return [json.loads(line) for line in (work / "history.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fault_runs(small_data, tmp_path_factory):
    """Span 1 then span 2 cleanly in one work directory; in another, span 2 killed at every boundary, then rerun."""
    root = tmp_path_factory.mktemp("faults")
    config = root / "config.json"
    config.write_text(json.dumps(dict(TEST_CONFIG, replay_fraction=0.2)))
    clean, faulty = root / "clean", root / "faulty"
    for work in (clean, faulty):
        increc("run", "--data", str(small_data), "--work", str(work), "--span", "1", "--config", str(config),
               "--no-progress")
    increc("run", "--data", str(small_data), "--work", str(clean), "--span", "2", "--config", str(config),
           "--no-progress")
    before = DeploymentState(str(faulty / "serving"), "increc").current()
    models_config = []
    for component in BOUNDARIES:
        _run_until(small_data, faulty, 2, config, component)
        models_config.append((component, DeploymentState(str(faulty / "serving"), "increc").current()))
    increc("run", "--data", str(small_data), "--work", str(faulty), "--span", "2", "--config", str(config),
           "--no-progress")
    return {"clean": clean, "faulty": faulty, "before": before, "after_kills": models_config}


def test_after_kills_at_every_boundary_a_rerun_leaves_what_one_clean_run_leaves(fault_runs):
    clean, faulty = fault_runs["clean"], fault_runs["faulty"]
    assert _state(faulty) == _state(clean)
    ok = [(r["span"], r["status"], r["blessed"], bool(r["pushed_version"])) for r in _history(faulty)
          if r.get("status") == "ok"]
    assert ok == [(r["span"], r["status"], r["blessed"], bool(r["pushed_version"])) for r in _history(clean)]


def test_killed_runs_deploy_nothing_and_the_rerun_adds_one_version(fault_runs):
    faulty, before = fault_runs["faulty"], fault_runs["before"]
    for component, deployment in fault_runs["after_kills"]:
        if component != "ServingPusher":
            assert (deployment.stable, deployment.previous) == (before.stable, before.previous), component
        else:  # killed while pushing: either nothing changed or the push completed, never half
            assert deployment.stable == before.stable or deployment.previous == before.stable
    state = DeploymentState(str(faulty / "serving"), "increc")
    after = state.current()
    assert after.previous == before.stable and after.stable != before.stable
    assert state.versions_on_disk() == sorted([before.stable, after.stable]), "one new version, no leftovers"
    assert state.pushed_span(after.stable) == 2 and _history(faulty)[-1]["pushed_version"] == after.stable
    for version in state.versions_on_disk():
        assert (faulty / "serving" / "increc" / str(version) / "saved_model.pb").exists()


def test_ctrl_c_stops_the_run_within_seconds_and_records_it(small_data, tmp_path, fault_runs):
    work = fault_runs["faulty"]
    before = (work / "serving" / "models.config").read_text()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TEST_CONFIG))
    process = _start(small_data, work, 3, config)
    _wait_for(process, work, "Trainer")
    process.send_signal(signal.SIGINT)
    stopped = time.time()
    output, _ = process.communicate(timeout=60)
    assert time.time() - stopped < 10
    assert process.returncode == 130, output[-2000:]
    assert "interrupted" in output and "Traceback" not in output
    record = _history(work)[-1]
    assert record["span"] == 3 and record["status"] == "interrupted"
    assert (work / "serving" / "models.config").read_text() == before
    leftover = subprocess.run(["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True).stdout
    assert not leftover.strip(), "the run's processes must be gone"


def test_a_full_disk_during_a_push_publishes_nothing_and_names_the_error(tmp_path, monkeypatch):
    from tfx.utils import io_utils

    model = tmp_path / "model"
    tf.saved_model.save(tf.Module(), str(model))
    state = DeploymentState(str(tmp_path / "serving"), "m")
    first = state.push(str(model), None, keep_versions=5)
    config_before = (tmp_path / "serving" / "models.config").read_text()
    real_copy = io_utils.copy_dir

    def copy_until_full(source, destination, *args, **kwargs):
        real_copy(source, destination, *args, **kwargs)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", destination)

    monkeypatch.setattr(io_utils, "copy_dir", copy_until_full)
    with pytest.raises(OSError, match="No space left on device"):
        state.push(str(model), state.current(), keep_versions=5)
    assert (tmp_path / "serving" / "models.config").read_text() == config_before
    assert state.versions_on_disk() == [first.version]
    assert not [p.name for p in (tmp_path / "serving" / "m").iterdir() if not p.name.isdigit()], "no staging left"
