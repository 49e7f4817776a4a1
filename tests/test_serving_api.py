"""The embedded server's gRPC and REST APIs against TF Serving's documented behaviour.

One server process over three small SavedModels (a TF1 graph with
classify/regress signatures, a TF2 module with two signatures, a Keras
model), talked to with the official gRPC stubs and plain HTTP.
"""
from __future__ import annotations

import base64
import ipaddress
import json

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from tests.serving_helpers import ServerProcess, http, make_keras, make_tf1_half_plus_two, make_tf2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tf1_half_plus_two(root / "half" / "123")
    make_tf2(root / "multi" / "1")
    make_keras(root / "keras" / "7")
    config = root / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{n}" base_path: "{root / n}" model_platform: "tensorflow" }}\n'
        for n in ("half", "multi", "keras")) + "}\n")
    monitoring = root / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    return root


@pytest.fixture(scope="module")
def server(models):
    with ServerProcess(f"--model_config_file={models / 'models.config'}",
                       f"--monitoring_config_file={models / 'monitoring.config'}",
                       "--max_request_bytes=200000") as s:
        yield s


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc_address)
    return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))


def post(server, path, body):
    status, headers, text = http("POST", server.rest_url + path, body)
    return status, (json.loads(text) if text.strip().startswith(("{", "[")) else text), headers


def example(**features) -> tf.train.Example:
    feature = {k: tf.train.Feature(float_list=tf.train.FloatList(value=[v])) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feature))


# --- REST predict ---

def test_rest_predict_row_and_columnar(server):
    status, body, headers = post(server, "/v1/models/half:predict", {"instances": [2.0, 3.0, 4.0]})
    assert status == 200 and body == {"predictions": [3.0, 3.5, 4.0]}
    assert headers["Content-Type"] == "application/json"
    assert post(server, "/v1/models/half:predict", {"inputs": [2.0, 3.0, 4.0]})[1] == {"outputs": [3.0, 3.5, 4.0]}
    assert post(server, "/v1/models/half:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]})[1] == \
        {"predictions": [[2.5, 3.0], [3.5, 4.0]]}
    # Whole numbers keep their .0, as TF Serving prints them.
    assert '"predictions":[3.0' in http("POST", server.rest_url + "/v1/models/half:predict", {"instances": [2.0]})[2]


def test_rest_predict_several_inputs_and_outputs_with_b64(server):
    s = base64.b64encode(b"\xff\x00hi").decode()
    status, body, _ = post(server, "/v1/models/multi/versions/1:predict",
                           {"instances": [{"a": [1.0, 2.0], "s": {"b64": s}}, {"a": [3.0, 4.0], "s": "abc"}]})
    assert status == 200
    first, second = body["predictions"]
    assert first["sum"] == 3.0 and first["length"] == 4 and first["echo_bytes"] == {"b64": s}
    assert second == {"sum": 7.0, "length": 3, "echo_bytes": {"b64": base64.b64encode(b"abc").decode()}}
    status, body, _ = post(server, "/v1/models/multi:predict", {"inputs": {"a": [[1.0, 1.0]], "s": ["x"], "extra": 1}})
    assert status == 200 and body["outputs"]["sum"] == [2.0]
    status, body, _ = post(server, "/v1/models/multi:predict", {"signature_name": "double", "instances": [1, 2]})
    assert body == {"predictions": [2, 4]}


def test_rest_predict_keras_model(server):
    status, body, _ = post(server, "/v1/models/keras:predict", {"instances": [[1.0, 2.0, 3.0]]})
    assert status == 200 and body["predictions"] == [[6.0]]


def test_rest_nan_infinity_and_trailing_bytes(server):
    status, _, text = http("POST", server.rest_url + "/v1/models/half:predict",
                           '{"instances": [NaN, Infinity, -Infinity]} trailing garbage')
    assert status == 200 and text == '{"predictions":[NaN,Infinity,-Infinity]}'


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/models/half:predict", "", 400, "JSON Parse error: The document is empty"),
    ("/v1/models/half:predict", "{bad", 400, "JSON Parse error:"),
    ("/v1/models/half:predict", {"instance": [1.0]}, 400, "Missing 'inputs' or 'instances' key"),
    ("/v1/models/half:predict", {"signature_name": 3, "instances": [1.0]}, 400, "'signature_name' key must be a string value."),
    ("/v1/models/half:predict", {"signature_name": "foo", "instances": [1.0]}, 400,
     'Serving signature name: "foo" not found in signature def'),
    ("/v1/models/half:predict", {"instances": ["a"]}, 400, 'JSON Value: "a" Type: String is not of expected type: float'),
    ("/v1/models/nope:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(nope)"),
    ("/v1/models/half/versions/9:predict", {"instances": [1.0]}, 404, "Servable not found for request: Specific(half, 9)"),
    ("/v1/models/half/labels/nolabel:predict", {"instances": [1.0]}, 400, "Unrecognized servable version label: nolabel"),
    ("/v1/models/multi:predict", {"inputs": {"a": [[1.0, 1.0]]}}, 400, "Missing named input: s in 'inputs' object."),
    ("/v1/models/..%2F..%2Fetc:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(../../etc)"),
])
def test_rest_errors_have_tf_serving_texts_and_statuses(server, path, body, status, message):
    got_status, got, headers = post(server, path, body)
    assert got_status == status and message in got["error"], got
    assert headers["Content-Type"] == "application/json"


def test_rest_malformed_routes(server):
    assert http("GET", server.rest_url + "/v2/anything")[0] == 404
    status, _, text = http("GET", server.rest_url + "/v1/models")
    assert status == 400 and json.loads(text)["error"] == "Missing model name in request."
    status, _, text = http("PUT", server.rest_url + "/v1/models/half", b"{}")
    assert status == 400 and "Malformed request: PUT /v1/models/half" in json.loads(text)["error"]


def test_rest_classify_and_regress_use_results(server):
    status, body, _ = post(server, "/v1/models/half:classify",
                           {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert status == 200 and body == {"results": [[["class", 3.0]]]}
    status, body, _ = post(server, "/v1/models/half:regress",
                           {"signature_name": "regress_x_to_y", "context": {"x": 4.0}, "examples": [{}]})
    assert status == 200 and body == {"results": [4.0]}
    status, body, _ = post(server, "/v1/models/half:regress", {"signature_name": "regress_x_to_y"})
    assert status == 400 and "key 'examples' is expected and was not found" in body["error"]


def test_rest_status_and_metadata(server):
    status, _, text = http("GET", server.rest_url + "/v1/models/half")
    assert status == 200
    assert json.loads(text) == {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    # A label in a status path is ignored: even an unknown one answers with every version.
    assert json.loads(http("GET", server.rest_url + "/v1/models/half/labels/whatever")[2]) == json.loads(text)
    status, _, text = http("GET", server.rest_url + "/v1/models/half/versions/5")
    assert status == 404 and json.loads(text)["error"] == "Could not find version 5 of model half"
    status, _, text = http("GET", server.rest_url + "/v1/models/multi/metadata")
    metadata = json.loads(text)
    assert status == 200 and metadata["model_spec"] == {"name": "multi", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "double", "__saved_model_init_op"} <= set(signatures)
    assert signatures["double"]["inputs"]["n"]["dtype"] == "DT_INT64"


# --- gRPC ---

def predict_request(name, values, **spec):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(values, np.float32)))
    return request


def grpc_error(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def test_grpc_predict(stubs):
    prediction, _ = stubs
    response = prediction.Predict(predict_request("half", [2.0, 4.0], version=123), timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [3.0, 4.0]
    assert response.model_spec.name == "half" and response.model_spec.version.value == 123
    assert response.model_spec.signature_name == "serving_default"


def test_grpc_predict_errors(stubs):
    prediction, _ = stubs
    assert grpc_error(prediction.Predict, predict_request("half", [1.0], signature_name="foo")) == \
        (grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "foo" not found.')
    assert grpc_error(prediction.Predict, predict_request("ghost", [1.0])) == \
        (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(ghost)")
    assert grpc_error(prediction.Predict, predict_request("half", [1.0], version_label="gone")) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: gone")
    assert grpc_error(prediction.Predict, predict_pb2.PredictRequest()) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    empty = predict_pb2.PredictRequest()
    empty.model_spec.name = "half"
    assert grpc_error(prediction.Predict, empty) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input size does not match signature: 0!=1 len({}) != len({x}). Sent extra: {}. Missing but required: {x}.")
    filtered = predict_request("half", [1.0])
    filtered.output_filter.append("z")
    code, details = grpc_error(prediction.Predict, filtered)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found in signature: z" in details


def test_grpc_output_filter_on_several_outputs(stubs):
    prediction, _ = stubs
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "multi"
    request.inputs["a"].CopyFrom(tf.make_tensor_proto(np.ones((2, 2), np.float32)))
    request.inputs["s"].CopyFrom(tf.make_tensor_proto(np.array([b"a", b"bc"], object)))
    request.output_filter.append("length")
    response = prediction.Predict(request, timeout=30)
    assert list(response.outputs) == ["length"] and tf.make_ndarray(response.outputs["length"]).tolist() == [1, 2]


def test_grpc_classify_regress_and_multi_inference(stubs):
    prediction, _ = stubs
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "half", "classify_x_to_y"
    request.input.example_list.examples.extend([example(x=2.0), example(x=6.0)])
    response = prediction.Classify(request, timeout=30)
    assert [(c.classes[0].label, c.classes[0].score) for c in response.result.classifications] == \
        [("class", 3.0), ("class", 5.0)]
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name, regress.model_spec.signature_name = "half", "regress_x_to_y"
    regress.input.example_list.examples.append(example(x=8.0))
    assert prediction.Regress(regress, timeout=30).result.regressions[0].value == 6.0
    regress.model_spec.signature_name = "nope"
    assert grpc_error(prediction.Regress, regress) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                        "No signature was found with the name: nope")
    regress.model_spec.signature_name = "regress_x_to_y"
    regress.input.example_list.ClearField("examples")
    assert grpc_error(prediction.Regress, regress) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")

    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y", "tensorflow/serving/regress")):
        task = multi.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = "half", signature, method
    multi.input.example_list.examples.append(example(x=2.0))
    results = prediction.MultiInference(multi, timeout=30).results
    assert results[0].classification_result.classifications[0].classes[0].score == 3.0
    assert results[1].regression_result.regressions[0].value == 3.0
    multi.tasks[0].method_name = "tensorflow/serving/predict"
    assert grpc_error(prediction.MultiInference, multi)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_metadata_and_status(stubs):
    prediction, models = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half"
    response = prediction.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {"serving_default", "classify_x_to_y", "regress_x_to_y"}
    assert response.model_spec.version.value == 123
    del request.metadata_field[:]
    assert grpc_error(prediction.GetModelMetadata, request) == (
        grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "keras"
    status = models.GetModelStatus(status_request, timeout=30).model_version_status
    assert [(s.version, s.state) for s in status] == [(7, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    status_request.model_spec.name = "nobody"
    assert grpc_error(models.GetModelStatus, status_request) == (
        grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nobody")


# --- operations ---

def test_metrics_use_tf_serving_names(server):
    post(server, "/v1/models/half:predict", {"instances": [1.0]})
    post(server, "/v1/models/metrics-probe:predict", {"instances": [1.0]})
    status, headers, text = http("GET", server.rest_url + "/monitoring/prometheus/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "# TYPE :tensorflow:serving:request_count counter" in text and "# HELP" not in text
    assert ':tensorflow:serving:request_count{model_name="half",status="OK"}' in text
    assert ':tensorflow:serving:request_count{model_name="metrics-probe",status="NOT_FOUND"} 1' in text
    assert ':tensorflow:serving:request_latency_bucket{model_name="half",API="predict",entrypoint="REST",le="+Inf"}' in text
    assert ':tensorflow:cc:saved_model:load_attempt_count{model_path=' in text
    assert http("GET", server.rest_url + "/monitoring/prometheus/metrics?x=1")[0] == 400


def test_request_size_is_bounded_and_server_keeps_serving(server):
    status, _, text = http("POST", server.rest_url + "/v1/models/half:predict",
                           json.dumps({"instances": [1.0] * 100000}).encode())
    assert status == 413 and "exceeds the limit" in text
    assert post(server, "/v1/models/half:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}


def test_binds_loopback_by_default(server):
    import psutil

    listening = {c.laddr for c in psutil.Process(server.process.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    ports = {addr.port: ipaddress.ip_address(addr.ip) for addr in listening}
    for port in (server.grpc_port, server.rest_port):
        ip = ports[port]
        ip = getattr(ip, "ipv4_mapped", None) or ip
        assert ip.is_loopback, f"port {port} listens on {ip}"
