"""The pipeline's own exported model behind the embedded server: `increc up`, REST, gRPC, `increc predict`."""
from __future__ import annotations

import json
import re

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
        rest_line = next(line for line in up.stdout.splitlines() if line.startswith("REST  stable:"))
        grpc_line = next(line for line in up.stdout.splitlines() if line.startswith("gRPC  stable:"))
        rest_score = json.loads(rest_line.split(":", 1)[1])["predictions"][0]
        grpc_score = float(re.search(r"probability=([0-9.]+)", grpc_line).group(1))
        assert 0 < rest_score < 1 and abs(rest_score - grpc_score) < 1e-5
        assert "curl -s -X POST" in up.stdout and "increc down" in up.stdout

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
    finally:
        down = increc("down", "--work", str(work))
    assert "server stopped" in down.stdout
