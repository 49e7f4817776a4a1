"""The pipeline's own exported model behind the embedded server: `increc up`, REST, gRPC, `increc predict`."""
from __future__ import annotations

import json
import re

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import regression_pb2

from components.deployment import DeploymentState
from serving.client import ServingClient, rest_predict
from tests.conftest import increc
from tests.serving_helpers import free_port


def test_increc_up_serves_the_pushed_model_over_rest_and_grpc(shared_run):
    work = shared_run["work"]
    grpc_port, rest_port = free_port(), free_port()
    up = increc("up", "--work", str(work), "--port", str(grpc_port), "--rest-port", str(rest_port))
    try:
        # The example queries send ids only: the model looks the features up in its snapshot.
        rest_line = next(line for line in up.stdout.splitlines() if line.startswith("REST  stable, ids only:"))
        grpc_line = next(line for line in up.stdout.splitlines() if line.startswith("gRPC  stable, ids only:"))
        rest_score = json.loads(rest_line.split(":", 1)[1])["outputs"][0]
        grpc_score = float(re.search(r"probability=([0-9.]+)", grpc_line).group(1))
        assert 0 < rest_score < 1 and abs(rest_score - grpc_score) < 1e-5
        assert "curl -s -X POST" in up.stdout and "increc down" in up.stdout
        recommend_line = next(line for line in up.stdout.splitlines() if "recommend for user" in line)
        assert len(recommend_line.split(":", 1)[1].split(",")) == 10

        deployment = DeploymentState(str(work / "serving"), "increc").current()
        client = ServingClient(f"127.0.0.1:{grpc_port}", timeout=30)
        assert client.available_versions("increc") == sorted(deployment.versions)
        # The tf.Example signature answers TF Serving's Regress API with the same score as the raw one.
        eval_dir = sorted((work / "pipeline" / "SpanExampleGen" / "examples").iterdir())[0] / "Split-eval"
        record = next(iter(tf.data.TFRecordDataset(sorted(map(str, eval_dir.iterdir())), compression_type="GZIP")))
        request = regression_pb2.RegressionRequest()
        request.model_spec.name, request.model_spec.signature_name = "increc", "regress"
        request.model_spec.version_label = "stable"
        request.input.example_list.examples.append(tf.train.Example.FromString(record.numpy()))
        regressed = client.prediction.Regress(request, timeout=30).result.regressions[0].value
        from models.export import serving_inputs
        raw = client.predict("increc", serving_inputs([record.numpy()], ["genres"], ["year"]), label="stable")
        assert abs(float(raw["probability"][0]) - regressed) < 1e-5
        if deployment.previous:
            previous = client.predict("increc", serving_inputs([record.numpy()], ["genres"], ["year"]), label="previous")
            assert 0 < float(previous["probability"][0]) < 1

        out = increc("predict", "--work", str(work), "--user", "1", "--item", "1074638", "--item", "0000000",
                     "--address", f"127.0.0.1:{grpc_port}")
        assert re.search(r"user 1 item 1074638: 0\.\d+", out.stdout) and "item 0000000" in out.stdout
        again = increc("up", "--work", str(work), "--port", str(free_port()), "--rest-port", str(free_port()))
        assert "server already running" in again.stdout and f"gRPC 127.0.0.1:{grpc_port}" in again.stdout
        body = {"instances": [{"user_id": "1", "item_id": "x", "genres": "", "year": float("nan")}]}
        assert 0 < rest_predict(f"http://127.0.0.1:{rest_port}", "increc", body)["predictions"][0] < 1

        # recommend with ids only: gRPC (optional inputs left out), REST (columnar, optional inputs empty), CLI.
        user = "1"
        grpc_top = client.predict("increc", {"user_id": np.array([b"1"], dtype=object)}, label="stable",
                                  signature="recommend")
        assert grpc_top["item_ids"].shape == (1, 10) and all(grpc_top["item_ids"][0])
        rest_top = rest_predict(f"http://127.0.0.1:{rest_port}", "increc", {
            "signature_name": "recommend", "inputs": {"user_id": [user], "k": [10], "exclude_seen": [True]}},
            label="stable")["outputs"]
        assert [i.encode() for i in rest_top["item_ids"][0]] == list(grpc_top["item_ids"][0])
        np.testing.assert_allclose(rest_top["scores"][0], grpc_top["scores"][0], rtol=1e-5)
        shown = increc("recommend", "--work", str(work), "--user", user, "-k", "3",
                       "--address", f"127.0.0.1:{grpc_port}").stdout.splitlines()
        assert [line.split()[2] for line in shown] == [i.decode() for i in grpc_top["item_ids"][0][:3]]
        # A user nobody has seen gets a list too (cold start), not an error.
        cold = client.predict("increc", {"user_id": np.array([b"never-seen"], dtype=object),
                                         "k": np.array([5], np.int32)}, label="stable", signature="recommend")
        assert cold["item_ids"].shape == (1, 5) and all(cold["item_ids"][0])
    finally:
        down = increc("down", "--work", str(work))
    assert "server stopped" in down.stdout
