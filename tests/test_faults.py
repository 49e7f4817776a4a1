"""Faults: kill -9 at every component boundary, Ctrl-C, a full disk on push, SIGTERM of the model server
mid-swap. Real processes throughout.

After any of them the deployment must be what one clean run leaves: at most one
new version, the same vocabularies, replay reservoir and settings, and nothing
half-made ever named by models.config (so never loaded by a server). A model
server stopped in the middle of a swap has answered only from whole versions,
and a restarted one serves what models.config says.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2, prediction_service_pb2_grpc

from components.deployment import DeploymentState
from serving.client import ServingClient
from tests.conftest import REPO, TEST_CONFIG, increc
from tests.serving_helpers import wait_for

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
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants, "the run works in a child process"
    process.send_signal(signal.SIGINT)
    stopped = time.time()
    output, _ = process.communicate(timeout=60)
    assert time.time() - stopped < 10
    assert process.returncode == 130, output[-2000:]
    assert "interrupted" in output and "Traceback" not in output
    record = _history(work)[-1]
    assert record["span"] == 3 and record["status"] == "interrupted"
    assert (work / "serving" / "models.config").read_text() == before
    _, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, f"the run's processes must be gone: {[p.pid for p in alive]}"


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


# --- SIGTERM of the model server in the middle of a version swap, under client load ---

class _Scaled(tf.Module):
    """y = x + b on `serving_default`; `spin` counts to n, a slow request for the warmup file."""

    def __init__(self, b: float):
        super().__init__()
        self.b = tf.Variable(b)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, "x")])
    def predict(self, x):
        return {"y": x + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, "n")])
    def spin(self, n):
        (count,) = tf.while_loop(lambda i: i < n[0], lambda i: (i + 1,), [tf.constant(0, tf.int64)])
        return {"done": n * 0 + count}


def _swap_model(path: Path, b: float, warmup_spins: int = 0) -> Path:
    """A small SavedModel; with warmup_spins, a warmup file of 10 slow requests (a load that takes seconds)."""
    from tensorflow_serving.apis import prediction_log_pb2

    from tests.serving_helpers import write_warmup

    module = _Scaled(b)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.predict, "spin": module.spin})
    if warmup_spins:
        log = prediction_log_pb2.PredictionLog()
        log.predict_log.request.model_spec.signature_name = "spin"
        log.predict_log.request.inputs["n"].CopyFrom(tf.make_tensor_proto(np.array([warmup_spins], np.int64)))
        write_warmup(path, [log] * 10)
    return path


class _Clients:
    """Threads sending gRPC Predict on `stable` back to back; each answer is kept with its input and version."""

    def __init__(self, address: str, threads: int = 4):
        self.address, self.answers, self.failures = address, [], []
        self.sigterm_sent = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        channel = grpc.insecure_channel(self.address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while not self._stop.is_set():
            # 1-3 rows of fresh values, so merged batches must be split back row by row.
            x = rng.uniform(-100, 100, size=int(rng.integers(1, 4))).astype(np.float32)
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.version_label = "m", "stable"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            try:
                response = stub.Predict(request, timeout=30)
            except grpc.RpcError as e:
                self.failures.append((self.sigterm_sent.is_set(), e.code(), e.details()))
                if self.sigterm_sent.is_set():
                    time.sleep(0.05)  # the server is going or gone; keep asking without spinning
                continue
            self.answers.append((x, response.model_spec.version.value, tf.make_ndarray(response.outputs["y"])))
        channel.close()

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


LOADING = get_model_status_pb2.ModelVersionStatus.LOADING


def _version_states(client: ServingClient) -> dict:
    try:
        return {s.version: s.state for s in client.model_status("m").model_version_status}
    except grpc.RpcError:
        return {}


def _wait(condition, timeout: float = 120.0) -> bool:
    """Polls often: the moment to catch lasts only as long as a version's load."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _predict(stub, label: str, x: np.ndarray):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = "m", label
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    response = stub.Predict(request, timeout=30)
    return response.model_spec.version.value, tf.make_ndarray(response.outputs["y"])


def test_sigterm_during_a_version_swap_under_load_answers_only_from_whole_versions(tmp_path):
    """A server stopped mid-swap never gave a wrong answer, exits cleanly, and restarts on what models.config says."""
    from tests.serving_helpers import ServerProcess

    # The new version replays slow warmup requests (seconds in all) before it may serve, so the SIGTERM lands
    # inside the swap.
    builds = {b: _swap_model(tmp_path / "builds" / f"b{b}", float(b), warmup_spins=30_000 if b == 4 else 0)
              for b in (2, 3, 4)}

    serving = tmp_path / "work" / "serving"
    setup = DeploymentState(str(serving), "m")
    older = setup.push(str(builds[2]), None, keep_versions=5).version
    stable = setup.push(str(builds[3]), setup.current(), keep_versions=5).version
    # The flags `increc up` starts a server with (pipeline/serving_ops.py).
    flags = (f"--model_config_file={setup.models_config_path}", "--model_config_file_poll_wait_seconds=5",
             "--file_system_poll_wait_seconds=5", "--allow_version_labels_for_unavailable_models=true")
    server = ServerProcess(*flags, rest=False)
    state = DeploymentState(str(serving), "m", server.grpc_address)
    watcher = ServingClient(server.grpc_address, timeout=10)
    pushed = {}
    try:
        assert watcher.available_versions("m") == sorted([older, stable])
        with _Clients(server.grpc_address) as clients:
            assert wait_for(lambda: len(clients.answers) >= 20), clients.failures[:3]
            # The swap the Pusher makes: new version directory, models.config, then the server is told.
            pusher = threading.Thread(target=lambda: pushed.update(
                result=state.push(str(builds[4]), state.current(), keep_versions=5)))
            pusher.start()
            loading = lambda: LOADING in {s for v, s in _version_states(watcher).items() if v not in (older, stable)}
            assert _wait(loading), "the server never started loading the pushed version"
            push_finished_before_sigterm = not pusher.is_alive()
            clients.sigterm_sent.set()
            server.process.send_signal(signal.SIGTERM)
            try:
                returncode = server.process.wait(timeout=60)  # a hang guard, not a speed requirement
            except subprocess.TimeoutExpired:
                pytest.fail(f"the server did not exit on SIGTERM:\n{server.read_log()[-3000:]}")
            log = server.read_log()
            pusher.join()
    finally:
        watcher.close()
        server.stop()
    assert returncode == 0 and "Traceback" not in log, log[-3000:]
    assert not push_finished_before_sigterm, "the SIGTERM was meant to land inside the swap"

    new = pushed["result"].version
    # A stopping server abandons the load in progress instead of finishing its warmup first.
    assert f"version {new} loaded" not in log, log[-3000:]
    assert clients.failures and all(after for after, _, _ in clients.failures), \
        f"requests failed before the SIGTERM: {[f for f in clients.failures if not f[0]][:3]}"
    # Once the SIGTERM is sent, requests may only be turned away (refused, or cancelled when they reached a
    # server already closing its port), never answered wrongly.
    assert {code for _, code, _ in clients.failures} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, \
        sorted({(code.name, details) for _, code, details in clients.failures})[:5]

    # Every answer came from a whole version on disk that `stable` named, and is what that SavedModel computes.
    assert set(state.versions_on_disk()) == {older, stable, new}
    signatures = {v: tf.saved_model.load(state.version_dir(v)).signatures["serving_default"] for v in (stable, new)}
    answered = {version for _, version, _ in clients.answers}
    assert answered <= {stable, new}, f"`stable` answered from versions {answered}; it named only {stable}, {new}"
    for x, version, y in clients.answers:
        np.testing.assert_array_equal(y, signatures[version](x=tf.constant(x))["y"].numpy())

    # models.config holds the swap the Pusher wrote; a restarted server serves exactly that.
    deployment = state.current()
    assert (deployment.stable, deployment.previous) == (new, stable) == (pushed["result"].deployment.stable,
                                                                          pushed["result"].deployment.previous)
    with ServerProcess(*flags, rest=False) as restarted:
        client = ServingClient(restarted.grpc_address, timeout=30)
        assert client.available_versions("m") == sorted(deployment.versions)
        channel = grpc.insecure_channel(restarted.grpc_address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        x = np.array([1.5, -7.0], np.float32)
        for label, version in (("stable", new), ("previous", stable)):
            answered_by, y = _predict(stub, label, x)
            assert answered_by == version, label
            np.testing.assert_array_equal(y, signatures[version](x=tf.constant(x))["y"].numpy())
        channel.close()
        client.close()
