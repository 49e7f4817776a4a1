"""Automatic rollback on a live server with clients: a forced bad version is put back on the next span."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from components.deployment import DeploymentState
from serving.client import ServingClient
from tests.conftest import TEST_CONFIG, increc
from tests.serving_helpers import free_port
from tests.test_serving_lifecycle import Load


def history(work: Path):
    return [json.loads(line) for line in (work / "history.jsonl").read_text().splitlines() if line.strip()]


def deployment(work: Path):
    return DeploymentState(str(work / "serving"), "increc").current()


def weights(path):
    return {k: v.numpy() for k, v in tf.saved_model.load(str(path)).warm_start_weights.items()}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollback-config")
    grpc_port = free_port()
    normal = dict(TEST_CONFIG, serving_address=f"127.0.0.1:{grpc_port}")
    (root / "normal.json").write_text(json.dumps(normal))
    (root / "bad.json").write_text(json.dumps(dict(normal, flip_train_labels=True)))
    return {"normal": root / "normal.json", "bad": root / "bad.json", "grpc_port": grpc_port}


def run(data, work, span, config, *extra):
    return increc("run", "--data", str(data), "--work", str(work), "--span", str(span), "--no-progress",
                  "--config", str(config), *extra)


class ServerUp:
    """`increc up` over a work directory on the port the pipeline's config points at; `increc down` after."""

    def __init__(self, work: Path, grpc_port: int):
        self.work, self.grpc_port, self.rest_port = work, grpc_port, free_port()

    @property
    def rest_url(self):
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_address(self):
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self):
        increc("up", "--work", str(self.work), "--port", str(self.grpc_port), "--rest-port", str(self.rest_port))
        return self

    def __exit__(self, *exc):
        increc("down", "--work", str(self.work))


def test_regressed_version_is_rolled_back_on_the_next_span_without_dropping_requests(small_data, configs, tmp_path):
    work = tmp_path / "work"
    refused = increc("rollback", "--work", str(work), check=False)
    assert refused.returncode == 2 and "nothing is deployed" in refused.stderr

    run(small_data, work, 1, configs["normal"])
    good = deployment(work).stable
    refused = increc("rollback", "--work", str(work), check=False)
    assert refused.returncode == 2 and "no previous version to roll back to" in refused.stderr

    with ServerUp(work, configs["grpc_port"]) as server:
        # An operator forces a candidate trained on flipped labels past the gate.
        run(small_data, work, 2, configs["bad"], "--force")
        forced = history(work)[-1]
        assert forced["blessed"] is False and forced["forced_push"] and forced["pushed_version"]
        bad = forced["pushed_version"]
        client = ServingClient(server.grpc_address, timeout=30)
        assert client.available_versions("increc") == sorted([good, bad])

        inputs = {"user_id": np.array([b"1"], object), "item_id": np.array([b"1074638"], object),
                  "genres": np.array([b"Drama|Comedy"], object), "year": np.array([2012.0], np.float32)}
        with Load(server, seconds=300, label="stable", model="increc", inputs=inputs) as load:
            run(small_data, work, 3, configs["normal"])
        assert load.failures == [], load.failures[:3]
        assert len(load.answers) > 10

        record = history(work)[-1]
        assert record["rolled_back"] is True and record["live_measured_by"] == "server"
        assert record["rolled_back_version"] == bad and record["restored_version"] == good
        assert record["live_auc"] < record["previous_auc"] - 0.005
        assert record["live_version"] == bad
        # The run then warm-started from, and gated against, the restored version.
        restored = weights(work / "serving" / "increc" / str(good))
        for name, value in weights(record["warm_started_from"]).items():
            np.testing.assert_array_equal(value, restored[name])
        assert bad in DeploymentState(str(work / "serving"), "increc").rolled_back()
        current = deployment(work)
        assert current.stable in (good, record["pushed_version"])
        assert bad not in current.versions
        assert bad not in client.available_versions("increc"), "the bad version is unloaded"
        status = {s.version: s.state for s in client.model_status("increc").model_version_status}
        assert status.get(bad) == 50  # END

        refused = increc("rollback", "--work", str(work), "--to", str(bad), check=False)
        assert refused.returncode == 2 and "is not restored again" in refused.stderr
        refused = increc("rollback", "--work", str(work), "--to", "12345", check=False)
        assert refused.returncode == 2 and "unknown version 12345" in refused.stderr

    # models.config is the truth: a restarted server serves what the rollback left.
    with ServerUp(work, configs["grpc_port"]) as server:
        client = ServingClient(server.grpc_address, timeout=30)
        assert bad not in client.available_versions("increc")
        assert deployment(work).stable in client.available_versions("increc")
    table = increc("history", "--work", str(work)).stdout
    assert "rolled_back" in table.splitlines()[0] and "yes" in table.splitlines()[3]
    status = increc("status", "--work", str(work)).stdout
    assert f"v{bad} rolled back to v{good}: live AUC regressed" in status


def test_rollback_decided_without_a_server_applies_when_it_starts(small_data, configs, tmp_path):
    work = tmp_path / "work"
    run(small_data, work, 1, configs["normal"])
    good = deployment(work).stable
    run(small_data, work, 2, configs["bad"], "--force")
    bad = deployment(work).stable
    run(small_data, work, 3, configs["normal"])  # no server on the configured port
    record = history(work)[-1]
    assert record["rolled_back"] and record["live_measured_by"] == "saved_model"
    assert deployment(work).stable in (good, record["pushed_version"]) and bad not in deployment(work).versions
    with ServerUp(work, configs["grpc_port"]) as server:
        client = ServingClient(server.grpc_address, timeout=30)
        available = client.available_versions("increc")
        assert bad not in available and deployment(work).stable in available
    # A manual rollback with --to, then the same refusal for a version that was rolled back.
    if record["pushed_version"]:
        out = increc("rollback", "--work", str(work), "--to", str(good))
        assert f"-> {good} is stable" in out.stdout
        assert deployment(work).stable == good
