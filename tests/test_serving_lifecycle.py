"""Versions coming and going on a live server: polling, hot swaps under load, bad versions, config reloads."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import flags as flags_lib, launcher, model_config
from serving.client import END, ServingClient, rest_predict
from tests.serving_helpers import ServerProcess, copy_version, http, make_tf1_half_plus_two, write_warmup


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Three versions of y = 0.5x + b (b = 2, 3, 4) built once, copied in by each test."""
    root = tmp_path_factory.mktemp("builds")
    return {b: make_tf1_half_plus_two(root / f"b{b}", b=float(b)) for b in (2, 3, 4)}


def grpc_predict(address, x=2.0, label=None, version=None):
    channel = grpc.insecure_channel(address)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    if label:
        request.model_spec.version_label = label
    if version:
        request.model_spec.version.value = version
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([x], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    channel.close()
    return float(tf.make_ndarray(response.outputs["y"])[0])


class Load:
    """Background clients over REST and gRPC; counts answers and failures (bounded in time)."""

    def __init__(self, server, seconds=60.0, label=None, model="m", inputs=None):
        self.server, self.label, self.until = server, label, time.time() + seconds
        self.model = model
        self.inputs = inputs if inputs is not None else {"x": np.array([2.0], np.float32)}
        self.body = {"instances": [{k: (v[0].decode() if isinstance(v[0], bytes) else float(v[0]))
                                    for k, v in self.inputs.items()}]}
        if len(self.inputs) == 1:
            self.body = {"instances": [float(next(iter(self.inputs.values()))[0])]}
        self.answers, self.failures = [], []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._rest), threading.Thread(target=self._grpc)]

    def _rest(self):
        while not self._stop.is_set() and time.time() < self.until:
            try:
                body = rest_predict(self.server.rest_url, self.model, self.body, label=self.label)
                self.answers.append(body["predictions"][0])
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                self.failures.append(repr(e))

    def _grpc(self):
        client = ServingClient(self.server.grpc_address, timeout=30)
        while not self._stop.is_set() and time.time() < self.until:
            try:
                outputs = client.predict(self.model, self.inputs, label=self.label)
                self.answers.append(float(next(iter(outputs.values())).ravel()[0]))
            except Exception as e:  # noqa: BLE001
                self.failures.append(repr(e))
        client.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join()


def wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_polling_hot_swap_under_load_loses_no_request(builds, tmp_path):
    base = tmp_path / "m"
    copy_version(builds[2], base, 1)
    with ServerProcess(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1") as server:
        assert grpc_predict(server.grpc_address) == 3.0
        with Load(server) as load:
            time.sleep(1.0)
            copy_version(builds[3], base, 2)
            assert wait_for(lambda: load.answers and load.answers[-1] == 4.0)
            time.sleep(1.0)
        assert load.failures == [], load.failures[:3]
        assert set(load.answers) == {3.0, 4.0} and len(load.answers) > 20
        status = json.loads(http("GET", server.rest_url + "/v1/models/m")[2])["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "END")]

        # A corrupt version never serves; the failure shows in status and the old version keeps serving.
        broken = base / ".incoming"
        shutil.copytree(builds[4], broken)
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        broken.rename(base / "3")
        assert wait_for(lambda: any(s["version"] == "3" and s["state"] == "END" for s in json.loads(
            http("GET", server.rest_url + "/v1/models/m")[2])["model_version_status"]))
        status = {s["version"]: s for s in json.loads(http("GET", server.rest_url + "/v1/models/m")[2])["model_version_status"]}
        assert status["3"]["status"]["error_code"] != "OK" and status["3"]["status"]["error_message"]
        assert status["2"]["state"] == "AVAILABLE"
        assert grpc_predict(server.grpc_address) == 4.0
        assert http("POST", server.rest_url + "/v1/models/m/versions/3:predict", {"instances": [1.0]})[0] == 404


def test_a_failing_warmup_file_fails_the_load(builds, tmp_path):
    base = tmp_path / "m"
    copy_version(builds[2], base, 1)
    bad = tmp_path / "bad"
    shutil.copytree(builds[3], bad)
    (bad / "assets.extra").mkdir()
    (bad / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"\x00garbage, not TFRecord")
    with ServerProcess(f"--model_base_path={base}", "--model_name=m", "--file_system_poll_wait_seconds=1") as server:
        copy_version(bad, base, 2)
        client = ServingClient(server.grpc_address)
        assert wait_for(lambda: any(s.version == 2 and s.state == END for s in client.model_status("m").model_version_status))
        (state,) = [s for s in client.model_status("m").model_version_status if s.version == 2]
        assert "warmup" in state.status.error_message.lower()
        assert grpc_predict(server.grpc_address) == 3.0


def specific(base, versions, labels):
    return model_config.build_config(model_config.Deployment("m", str(base), versions, labels))


def test_reload_config_labels_and_apply_deployment(builds, tmp_path):
    base = tmp_path / "m"
    for version, b in ((1, 2), (2, 3), (3, 4)):
        copy_version(builds[b], base, version)
    config_path = tmp_path / "models.config"
    model_config.write_config(str(config_path), specific(base, [1], {}))
    with ServerProcess(f"--model_config_file={config_path}") as server:
        client = ServingClient(server.grpc_address, timeout=60)
        assert client.available_versions("m") == [1]
        # A label may only point at a loaded version.
        with pytest.raises(grpc.RpcError) as info:
            client.reload_config(specific(base, [1, 2], {"stable": 2}))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "which is not currently available for inference" in info.value.details()
        client.reload_config(specific(base, [1], {"stable": 1}))
        # apply_deployment moves stable to a version the server has not loaded yet, in TF Serving's order.
        with Load(server, label="stable") as load:
            client.apply_deployment(specific(base, [2, 1], {"stable": 2, "previous": 1}),
                                    current=specific(base, [1], {"stable": 1}))
            time.sleep(0.5)
        assert load.failures == [] and set(load.answers) == {3.0, 4.0}
        assert grpc_predict(server.grpc_address, label="previous") == 3.0
        assert grpc_predict(server.grpc_address, label="stable") == 4.0
        # The new config replaces the old one: versions left out unload, other models go.
        other = model_server_config_pb2.ModelServerConfig()
        other.CopyFrom(specific(base, [3], {}))
        other.model_config_list.config[0].name = "n"
        client.reload_config(other)
        assert client.available_versions("n") == [3]
        with pytest.raises(grpc.RpcError) as info:
            grpc_predict(server.grpc_address)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_labels_in_a_startup_config_and_config_file_polling(builds, tmp_path):
    base = tmp_path / "m"
    for version, b in ((1, 2), (2, 3)):
        copy_version(builds[b], base, version)
    config_path = tmp_path / "models.config"
    model_config.write_config(str(config_path), specific(base, [1, 2], {"stable": 1, "previous": 2}))
    # As in TF Serving, labels in the startup config need the flag.
    refused = ServerProcess.__new__(ServerProcess)
    with pytest.raises(RuntimeError, match="not currently available"):
        ServerProcess.__init__(refused, f"--model_config_file={config_path}", rest=False)
    with ServerProcess(f"--model_config_file={config_path}", "--allow_version_labels_for_unavailable_models",
                       "--model_config_file_poll_wait_seconds=1") as server:
        assert grpc_predict(server.grpc_address, label="stable") == 3.0
        model_config.write_config(str(config_path), specific(base, [1, 2], {"stable": 2, "previous": 1}))
        assert wait_for(lambda: grpc_predict(server.grpc_address, label="stable") == 4.0)
        config_path.write_text("model_config_list { broken")
        time.sleep(2.5)
        assert grpc_predict(server.grpc_address, label="stable") == 4.0, "a bad config edit keeps the last good one"


def _warmup_logs():
    from tensorflow_serving.apis import prediction_log_pb2

    example = tf.train.Example(features=tf.train.Features(feature={"x": tf.train.Feature(
        float_list=tf.train.FloatList(value=[2.0]))}))
    predict = prediction_log_pb2.PredictionLog()
    predict.predict_log.request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.signature_name = "classify_x_to_y"
    classify.classify_log.request.input.example_list.examples.append(example)
    regress = prediction_log_pb2.PredictionLog()
    regress.regress_log.request.model_spec.signature_name = "regress_x_to_y"
    regress.regress_log.request.input.example_list.examples.append(example)
    multi = prediction_log_pb2.PredictionLog()
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y", "tensorflow/serving/regress")):
        task = multi.multi_inference_log.request.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = "w", signature, method
    multi.multi_inference_log.request.input.example_list.examples.append(example)
    return {"predict": predict, "classify": classify, "regress": regress, "multi": multi,
            "session_run": prediction_log_pb2.PredictionLog(session_run_log=prediction_log_pb2.SessionRunLog())}


def test_warmup_rules(builds, tmp_path):
    """Every request kind replays; too many records, another log kind, a failing request or a corrupt file
    each keep that version out of service with TF Serving's code, while the good version serves."""
    logs = _warmup_logs()
    staged = {}
    failing_predict = type(logs["predict"])()
    failing_predict.CopyFrom(logs["predict"])
    failing_predict.predict_log.request.inputs["nope"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    for version, records in ((1, [logs["predict"], logs["classify"], logs["regress"], logs["multi"]]),
                             (2, [logs["predict"]] * 1001), (3, [logs["session_run"]]), (4, [failing_predict]),
                             (5, None)):
        staged[version] = tmp_path / f"v{version}"
        shutil.copytree(builds[2], staged[version])
        if records is None:
            (staged[version] / "assets.extra").mkdir()
            (staged[version] / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"\x00 not a TFRecord file at all")
        else:
            write_warmup(staged[version], records)
    base = tmp_path / "w"
    copy_version(staged[1], base, 1)
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "w" base_path: "{base}" model_platform: "tensorflow" '
                      f'model_version_policy {{ all {{}} }} }} }}\n')
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    with ServerProcess(f"--model_config_file={config}", "--file_system_poll_wait_seconds=1",
                       f"--monitoring_config_file={monitoring}") as server:
        metrics = http("GET", server.rest_url + "/monitoring/prometheus/metrics")[2]
        assert re.search(r':tensorflow:serving:model_warmup_latency_count\{model_path="[^"]*/1",status="OK"\} 1', metrics)
        for version in (2, 3, 4, 5):
            copy_version(staged[version], base, version)
        client = ServingClient(server.grpc_address)

        def states():
            return {s.version: s for s in client.model_status("w").model_version_status}

        assert wait_for(lambda: all(v in states() and states()[v].state == END for v in (2, 3, 4, 5)), timeout=120)
        codes = {v: states()[v].status.error_code for v in (2, 3, 4, 5)}
        from tensorflow.core.protobuf import error_codes_pb2

        assert codes == {2: error_codes_pb2.INVALID_ARGUMENT, 3: error_codes_pb2.UNIMPLEMENTED,
                         4: error_codes_pb2.INVALID_ARGUMENT, 5: error_codes_pb2.DATA_LOSS}
        assert "1000" in states()[2].status.error_message
        body = json.loads(http("POST", server.rest_url + "/v1/models/w/versions/1:predict", {"instances": [2.0]})[2])
        assert body == {"predictions": [3.0]}


def test_batching_merges_concurrent_requests(builds, tmp_path):
    base = tmp_path / "m"
    copy_version(builds[2], base, 1)
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 100000 }\n")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    with ServerProcess(f"--model_base_path={base}", "--model_name=m", "--enable_batching=true",
                       f"--batching_parameters_file={params}", f"--monitoring_config_file={monitoring}") as server:
        results = {}

        def call(i):
            results[i] = grpc_predict(server.grpc_address, x=float(i))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: 0.5 * i + 2.0 for i in range(8)}
        metrics = http("GET", server.rest_url + "/monitoring/prometheus/metrics")[2]
        assert ":tensorflow:serving:batching_session:merged_batch_count" in metrics

        # REST Predict goes through the same batcher, and merges with gRPC calls.
        def merged():
            text = http("GET", server.rest_url + "/monitoring/prometheus/metrics")[2]
            found = re.search(r'merged_request_count\{model_name="m"\} (\d+)', text)
            return int(found.group(1)) if found else 0

        before = merged()

        def rest_call(i):
            results[("rest", i)] = rest_predict(server.rest_url, "m", {"instances": [float(i)]})["predictions"][0]

        threads = [threading.Thread(target=rest_call, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=call, args=(i + 10,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(results[("rest", i)] == 0.5 * i + 2.0 for i in range(8))
        assert all(results[i + 10] == 0.5 * (i + 10) + 2.0 for i in range(4))
        assert merged() - before >= 2


def test_startup_fails_clearly_when_the_only_version_is_corrupt(tmp_path):
    base = tmp_path / "m" / "1"
    base.mkdir(parents=True)
    (base / "saved_model.pb").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="did not become available"):
        ServerProcess(f"--model_base_path={tmp_path / 'm'}", "--model_name=m", rest=False)


def test_flags_take_tf_serving_command_lines():
    flags = flags_lib.parse(["--port", "9000", "--rest_api_port=9001", "--model_name=x", "--model_base_path=/m",
                             "--enable_batching", "--enable_model_warmup=false", "--tensorflow_session_parallelism=2"])
    assert (flags.port, flags.rest_api_port, flags.model_name, flags.enable_batching, flags.enable_model_warmup) == \
        (9000, 9001, "x", True, False)
    assert flags.host == "127.0.0.1" and flags.file_system_poll_wait_seconds == 1
    for bad, message in ((["--model_base_path=/m", "--bogus=1"], "unknown flag --bogus"),
                         (["--port=x", "--model_base_path=/m"], "expected an integer"),
                         ([], "required")):
        with pytest.raises(flags_lib.FlagError, match=message):
            flags_lib.parse(bad)
    argv = flags_lib.to_argv(flags)
    assert "--rest_api_port=9001" in argv and not any(a.startswith("--host") for a in argv)


def test_tfserving_backend_needs_the_binary(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="tensorflow_model_server is not on PATH"):
        launcher.command(flags_lib.parse(["--model_base_path=/m"]))
