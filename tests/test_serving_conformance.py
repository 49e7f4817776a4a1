"""tf-serving-reference.md, bullet by bullet, against a real server process.

One server over several small SavedModels: TF1 half_plus_two in a
zero-padded version directory (`00000123`, as in TF Serving's own test
data), a TF2 module with two signatures, a TF1 graph that counts its session
runs, and a labelled model with two versions. Talked to with the official
gRPC stubs, plain HTTP and raw sockets.
"""
from __future__ import annotations

import base64
import json
import random
import re

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from serving import flags as flags_lib
from tests.serving_helpers import (ServerProcess, http, make_tf1_counting, make_tf1_half_plus_two, make_tf2,
                                   raw_http)

MAX_REQUEST_BYTES = 300_000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    make_tf1_half_plus_two(root / "half" / "00000123")
    (root / "half" / "not-a-version").mkdir()
    make_tf2(root / "multi" / "1")
    make_tf1_counting(root / "counting" / "1")
    make_tf1_half_plus_two(root / "lab" / "1", b=2.0)
    make_tf1_half_plus_two(root / "lab" / "2", b=3.0)
    entries = "".join(f'  config {{ name: "{n}" base_path: "{root / n}" model_platform: "tensorflow" }}\n'
                      for n in ("half", "multi", "counting"))
    entries += (f'  config {{ name: "lab" base_path: "{root / "lab"}" model_platform: "tensorflow"\n'
                '    model_version_policy { all {} }\n'
                '    version_labels { key: "stable" value: 1 }\n'
                '    version_labels { key: "canary-v2.x" value: 2 }\n'
                '    version_labels { key: "ghost" value: 9 } }\n')
    (root / "models.config").write_text("model_config_list {\n" + entries + "}\n")
    (root / "monitoring.config").write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    return root


@pytest.fixture(scope="module")
def server(models):
    with ServerProcess(f"--model_config_file={models / 'models.config'}",
                       f"--monitoring_config_file={models / 'monitoring.config'}",
                       "--allow_version_labels_for_unavailable_models",
                       f"--max_request_bytes={MAX_REQUEST_BYTES}") as s:
        yield s


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


def rest(server, method, path, body=None, headers=None):
    """(status, parsed JSON or text, headers)."""
    status, got_headers, text = http(method, server.rest_url + path, body, headers)
    try:
        return status, json.loads(text), got_headers
    except ValueError:
        return status, text, got_headers


def grpc_error(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def predict_request(name, inputs, **spec):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def x(*values):
    return {"x": np.array(values, np.float32)}


def example(**features) -> tf.train.Example:
    feature = {k: tf.train.Feature(float_list=tf.train.FloatList(value=[v])) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feature))


# --- §3 version directories (more in test_serving_versions.py) ---

def test_zero_padded_version_directory_serves_as_its_number(server, stubs):
    status, body, _ = rest(server, "GET", "/v1/models/half")
    assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["123"]
    assert rest(server, "POST", "/v1/models/half/versions/123:predict", {"instances": [2.0]})[1] == \
        {"predictions": [3.0]}
    prediction, _ = stubs
    response = prediction.Predict(predict_request("half", x(4.0), version=123), timeout=30)
    assert response.model_spec.version.value == 123 and tf.make_ndarray(response.outputs["y"]).tolist() == [4.0]


# --- §1 REST routing and errors ---

@pytest.mark.parametrize("method,path,body,status,message", [
    ("POST", "/v1/models/half:PREDICT", {"instances": [1.0]}, 400, "Malformed request: POST /v1/models/half:PREDICT"),
    ("POST", "/v1/models/half:predict?x=1", {"instances": [1.0]}, 400,
     "Malformed request: POST /v1/models/half:predict?x=1"),
    ("GET", "/v1/models/half?x=1", None, 404, "Could not find any versions of model half?x=1"),
    ("GET", "/v1/models/half/metadata?x=1", None, 400, "Malformed request: GET /v1/models/half/metadata?x=1"),
    ("GET", "/v1/models/half/versions/7", None, 404, "Could not find version 7 of model half"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/models/half:predict", None, 400, "Malformed request: GET /v1/models/half:predict"),
    ("DELETE", "/v1/models/half", None, 400, "Malformed request: DELETE /v1/models/half"),
    ("OPTIONS", "/v1/models/half", None, 400, "Malformed request: OPTIONS /v1/models/half"),
    ("POST", "/v1/models/half/versions/99999999999999999999:predict", {"instances": [1.0]}, 400,
     "Failed to convert version: 99999999999999999999 to numeric."),
    ("POST", "/v1/models/half/versions/7:predict", {"instances": [1.0]}, 404,
     "Servable not found for request: Specific(half, 7)"),
    ("POST", "/v1/models/lab/labels/ghost:predict", {"instances": [1.0]}, 404,
     "Servable not found for request: Specific(lab, 9)"),
    ("POST", "/v1/models/half:classify", {"signature_name": "nope", "examples": [{"x": 1.0}]}, 400,
     "No signature was found with the name: nope"),
    ("POST", "/v1/models/half:classify", {"examples": [{"x": 1.0}]}, 400,
     "No classification inputs found in SignatureDef"),
    ("POST", "/v1/models/nope:predict", "{not json", 400, "JSON Parse error: Missing a name for object member."),
    ("POST", "/v1/models/half:predict", "   ", 400, "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/half:predict", "[1, 2]", 400, "JSON Value: [1,2] Is not object"),
    ("POST", "/v1/models/half:predict", '{"instances": [1.0,]}', 400, "JSON Parse error: Invalid value. at offset: 19"),
    ("POST", "/v1/models/multi:predict", {"signature_name": "__saved_model_init_op", "instances": [1]}, 400,
     "Failed to get input map for signature: __saved_model_init_op"),
])
def test_rest_error_texts_and_statuses(server, method, path, body, status, message):
    got_status, got, headers = rest(server, method, path, body)
    assert got_status == status and message in got["error"], got
    assert headers["Content-Type"] == "application/json"


def test_rest_paths_are_case_insensitive_and_url_decoded(server):
    assert rest(server, "POST", "/V1/MODELS/half:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}
    assert rest(server, "POST", "/v1/models/h%61lf:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}
    status, body, headers = rest(server, "GET", "/v2/models/half")
    assert status == 404 and headers["Content-Type"].startswith("text/html")


def test_head_gets_a_status_without_a_body(server):
    answer = raw_http(server.rest_port, b"HEAD /v1/models/half HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest_of_it = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and rest_of_it == b""


# --- §1 predict bodies ---

@pytest.mark.parametrize("path,body,message", [
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": "x"}], "inputs": {}},
     "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    ("/v1/models/half:predict", {"instances": 3.0}, "Excepting 'instances' to be an list/array"),
    ("/v1/models/half:predict", {"instances": []}, "No values in 'instances' array"),
    ("/v1/models/multi:predict", {"instances": [[1.0, 2.0]]},
     "instances is a plain list, but expecting list of objects as multiple input tensors required"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0]}]},
     "Failed to process element: 0 of 'instances' list. JSON object: {\"a\":[1.0,2.0]} keys must be equal to: a,s"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": "x"}, [1.0]]},
     "Expecting object but got list at item 1 of input list"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": "x"}, {"a": [1.0], "s": "y"}]},
     "Expecting tensor size: 2 but got: 1"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": "x", "z": 1}]},
     "JSON object: does not have named input: z"),
    ("/v1/models/multi:predict", {"inputs": {"a": [[1.0, 2.0], [3.0]], "s": ["x", "y"]}},
     "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    ("/v1/models/multi:predict", {"inputs": {"a": [[1.0, 2.0], 3.0], "s": ["x", "y"]}},
     "JSON Value: 3.0 found at incorrect level: 2 in the JSON DOM. Expected at level: 2"),
    ("/v1/models/multi:predict", {"inputs": [1.0]},
     "inputs is a plain value/list, but expecting an object as multiple input tensors required"),
    ("/v1/models/multi:predict", {"signature_name": "double", "instances": [1.5]},
     "JSON Value: 1.5 Type: Number is not of expected type: int64"),
    ("/v1/models/multi:predict", {"signature_name": "double", "instances": [True]},
     "JSON Value: true Type: True is not of expected type: int64"),
    ("/v1/models/half:predict", {"instances": [16777217]},
     "Cannot convert JSON value: 16777217 to float without loss of precision."),
    ("/v1/models/half:predict", {"instances": [1e39]}, "Cannot convert JSON value: 1e+39 to float without loss"),
    ("/v1/models/half:predict", {"instances": [None]}, "JSON Value: null Type: Null is not of expected type: float"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": {"b64": 1}}]},
     "not formatted correctly for base64 data"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0], "s": {"b64": "!!!"}}]}, "Unable to base64 decode"),
    ("/v1/models/multi:predict", {"instances": [{"a": [1.0, 2.0, 3.0], "s": "x"}]},
     "Input a of signature serving_default must have shape [?,2], got [1, 3]"),
])
def test_rest_predict_body_errors(server, path, body, message):
    status, got, _ = rest(server, "POST", path, body)
    assert status == 400 and message in got["error"], got


def test_rest_predict_formats(server):
    # A scalar is a valid columnar input; a single output comes back bare.
    assert rest(server, "POST", "/v1/models/half:predict", {"inputs": 2.0})[1] == {"outputs": 3.0}
    # b64 without padding decodes, and `*_bytes` outputs come back as b64.
    status, body, _ = rest(server, "POST", "/v1/models/multi:predict",
                           {"instances": [{"a": [1.0, 2.0], "s": {"b64": "aGk"}}]})
    assert status == 200 and body["predictions"][0]["echo_bytes"] == {"b64": base64.b64encode(b"hi").decode()}
    # Bytes that are not UTF-8 pass through a JSON string unchanged, as with rapidjson.
    answer = http("POST", server.rest_url + "/v1/models/multi:predict",
                  b'{"instances": [{"a": [1.0, 2.0], "s": "\xff\xfe"}]}')
    assert answer[0] == 200 and json.loads(answer[2])["predictions"][0]["echo_bytes"] == {"b64": "//4="}
    # Integers past 64 bits are doubles, as rapidjson reads them.
    assert rest(server, "POST", "/v1/models/half:predict",
                {"instances": [12345678901234567890123]})[1]["predictions"][0] == pytest.approx(6.17283950e21)


# --- no request gets a 5xx ---

def _fuzz_bodies():
    yield b"[" * 10000
    yield b'{"instances": ' + b"[" * 5000 + b"1.0" + b"]" * 5000 + b"}"
    yield b'{"instances": ' + b"[" * 900 + b"1.0" + b"]" * 900 + b"}"
    yield b'{"inputs": {"a": ' + b"[" * 900 + b"]" * 900 + b', "s": "x"}}'
    yield b'{"instances": [1e999999]}'
    yield b'{"instances": [-1e999999]}'
    yield b'{"instances": [' + b"9" * 5000 + b"]}"
    yield b'{"instances": [' + b"9" * 25 + b"]}"
    yield b'{"signature_name": "double", "instances": [' + b"9" * 25 + b"]}"
    yield b'{"instances": ["\xff\xfe\xc3"]}'
    yield b'\xff\xfe{"instances": [1.0]}'
    yield b'{"instances": ["\\ud800"]}'
    yield b'{"instances": [{"a": [1.0, 2.0], "s": "\\udc80"}]}'
    yield b'"just a string"'
    yield b"null"
    yield b"12"
    yield b'{"instances": {"x": 1}}'
    yield b'{"inputs": {"a": [[[["x"]]]], "s": [1]}}'
    yield b'{"instances": [{"a": null, "s": null}]}'
    yield b'{"instances": [{"a": {"b64": "AAAA"}, "s": [[]]}]}'
    yield b'{"inputs": {"a": [], "s": []}}'
    yield b'{"inputs": {"a": [[]], "s": [[]]}}'
    yield b'{"signature_name": null, "instances": [1]}'
    yield b'{"signature_name": "double", "instances": [18446744073709551615]}'
    yield b'{"signature_name": "double", "inputs": -9223372036854775809}'
    yield b'{"examples": [{"x": [1, 2.0]}], "context": []}'
    yield b'{"examples": [{"x": 18446744073709551615}]}'
    yield b'{"examples": [{"x": {"b64": "%%%"}}]}'
    yield b'{"examples": [{"x": 1e300}]}'
    yield b"\x00" * 100


def test_no_body_or_path_gets_a_5xx(server):
    """Deep nesting, huge numbers, invalid UTF-8, wrong types, odd paths: all 4xx with a JSON error."""
    paths = ["/v1/models/half:predict", "/v1/models/multi:predict", "/v1/models/half:regress",
             "/v1/models/half:classify", "/v1/models/multi/versions/1:predict"]
    answers = []
    for body in _fuzz_bodies():
        for path in paths:
            status, _, text = http("POST", server.rest_url + path, body)
            answers.append((status, path, body[:40]))
            assert status < 500, (status, path, body[:80], text[:300])
            assert "error" in json.loads(text) or status == 200
    # Mutations of a valid body: flipped, cut and inserted bytes (seeded, so failures reproduce).
    rng = random.Random(20240801)
    valid = json.dumps({"instances": [{"a": [1.0, 2.0], "s": "abc"}, {"a": [3.5, -1e10], "s": "d"}]}).encode()
    for _ in range(300):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            kind, at = rng.random(), rng.randrange(len(body))
            if kind < 0.4:
                body[at] = rng.randrange(256)
            elif kind < 0.7:
                del body[at:at + rng.randint(1, 8)]
            else:
                body[at:at] = rng.choice([b"[", b"]", b"{", b"}", b",", b'"', b"\\", b"1e999", b"NaN", b"\xff"])
        status, _, text = http("POST", server.rest_url + "/v1/models/multi:predict", bytes(body))
        assert status < 500, (bytes(body), text[:300])
    for path in ["/v1/models/%ff%fe/labels/%00:predict?x=1#y", "/v1/models/" + "a" * 5000,
                 "/v1/models/half/versions/1/metadata?q=%zz", "/v1/models/half/labels/%2F%3A:predict",
                 "/v1/models//versions/1", "/v1/models/half/versions/-1", "/v1/" + "%" * 100]:
        for method in ("GET", "POST"):
            status, _, text = http(method, server.rest_url + path, b'{"instances": [1.0]}' if method == "POST" else None)
            assert status < 500, (method, path, status, text[:300])
    assert rest(server, "POST", "/v1/models/half:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}


# --- §1 classify / regress bodies ---

@pytest.mark.parametrize("body,message", [
    ({"signature_name": "regress_x_to_y", "examples": {}}, "Expecting 'examples' value to be an list/array"),
    ({"signature_name": "regress_x_to_y", "examples": []}, "'examples' value is an empty array"),
    ({"signature_name": "regress_x_to_y", "examples": [[1.0]]}, "Example must be JSON object but got JSON Array"),
    ({"signature_name": "regress_x_to_y", "examples": [{"x": None}]},
     "Feature: x has element with unexpected JSON type: Null"),
    ({"signature_name": "regress_x_to_y", "examples": [{"x": [1.0, "a"]}]},
     "Unexpected element type in feature: x expecting type: float"),
    ({"signature_name": "regress_x_to_y", "examples": [{"x": 18446744073709551615}]},
     "Feature: x has uint64 element. Only int64 is supported."),
    ({"signature_name": "regress_x_to_y", "context": [1], "examples": [{}]},
     "Example must be JSON object but got JSON Array"),
])
def test_rest_classify_regress_body_errors(server, body, message):
    status, got, _ = rest(server, "POST", "/v1/models/half:regress", body)
    assert status == 400 and message in got["error"], got


def test_model_errors_reach_the_client_without_a_python_traceback(server):
    # An integer feature where the model parses floats: TensorFlow's own error, cleaned.
    status, got, _ = rest(server, "POST", "/v1/models/half:regress",
                          {"signature_name": "regress_x_to_y", "examples": [{"x": 2}]})
    assert status == 400 and "Data types don't match" in got["error"]
    assert 'File "' not in got["error"] and "Traceback" not in got["error"] and "[Op:" not in got["error"]


# --- §2 gRPC ---

def test_grpc_model_spec_resolution_errors(stubs):
    prediction, _ = stubs
    nameless = predict_request("", x(1.0))
    assert grpc_error(prediction.Predict, nameless) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                        "ModelSpec has no name specified.")
    assert grpc_error(prediction.Predict, predict_request("half", x(1.0), version=7)) == \
        (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(half, 7)")
    assert grpc_error(prediction.Predict, predict_request("lab", x(1.0), version_label="ghost")) == \
        (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(lab, 9)")
    long_name = "m" * 2000
    code, details = grpc_error(prediction.Predict, predict_request(long_name, x(1.0)))
    assert code == grpc.StatusCode.NOT_FOUND and details.endswith("...TRUNCATED") and len(details) == 1024 + 12


def test_grpc_predict_input_errors(stubs):
    prediction, _ = stubs
    extra = predict_request("half", {"x": np.array([1.0], np.float32), "z": np.array([1.0], np.float32)})
    assert grpc_error(prediction.Predict, extra) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}. Missing but required: {}.")
    code, details = grpc_error(prediction.Predict, predict_request("half", {"x": np.array([1.0], np.float64)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "float" in details and "double" in details
    bad = predict_request("half", x(1.0, 2.0))
    bad.inputs["x"].ClearField("tensor_content")
    bad.inputs["x"].float_val.extend([1.0, 2.0, 3.0])
    assert grpc_error(prediction.Predict, bad) == (grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error: x")
    # A tiny proto may claim a huge shape; it is refused, not allocated.
    huge = predict_request("half", x(1.0))
    huge.inputs["x"].tensor_shape.dim[0].size = 10 ** 12
    huge.inputs["x"].ClearField("tensor_content")
    huge.inputs["x"].float_val.append(1.0)
    code, details = grpc_error(prediction.Predict, huge)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tensor parsing error: x")
    twice = predict_request("multi", {"a": np.ones((1, 2), np.float32), "s": np.array([b"a"], object)})
    twice.output_filter.extend(["sum", "sum"])
    assert grpc_error(prediction.Predict, twice)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Messages past --max_request_bytes are refused by gRPC itself.
    too_big = predict_request("half", x(*([1.0] * (MAX_REQUEST_BYTES // 4 + 10))))
    assert grpc_error(prediction.Predict, too_big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_predict_fills_typed_fields_and_the_model_spec(stubs):
    prediction, _ = stubs
    request = predict_request("multi", {"a": np.ones((2, 2), np.float32), "s": np.array([b"a", b"bc"], object)})
    response = prediction.Predict(request, timeout=30)
    assert list(response.outputs["sum"].float_val) == [2.0, 2.0] and not response.outputs["sum"].tensor_content
    assert list(response.outputs["echo_bytes"].string_val) == [b"a", b"bc"]
    assert (response.model_spec.name, response.model_spec.version.value, response.model_spec.signature_name) == \
        ("multi", 1, "serving_default")


def test_grpc_classify_regress_structure_errors(stubs):
    prediction, _ = stubs
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "half"  # serving_default has no `inputs`
    request.input.example_list.examples.append(example(x=1.0))
    code, details = grpc_error(prediction.Classify, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("No classification inputs found")
    request.model_spec.signature_name = "classify_x_to_y"
    result = prediction.Classify(request, timeout=30)
    assert result.model_spec.signature_name == "classify_x_to_y" and result.model_spec.version.value == 123


def test_grpc_metadata_and_status(stubs):
    prediction, models = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def", "other"])
    request.model_spec.name = "half"
    assert grpc_error(prediction.GetModelMetadata, request) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                 "Metadata field other is not supported")
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "lab"
    status_request.model_spec.version_label = "stable"  # ignored, as TF Serving does
    status = models.GetModelStatus(status_request, timeout=30).model_version_status
    assert [s.version for s in status] == [2, 1]
    status_request.model_spec.version.value = 5
    assert grpc_error(models.GetModelStatus, status_request) == (grpc.StatusCode.NOT_FOUND,
                                                                 "Could not find version 5 of model lab")


def test_reload_config_refuses_bad_configs_without_changing_anything(stubs, models):
    _, model_service = stubs

    def reload(config):
        return grpc_error(model_service.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest(
            config=config))

    custom = model_server_config_pb2.ModelServerConfig()
    custom.custom_model_config.Pack(model_server_config_pb2.ModelConfig())
    code, details = reload(custom)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Only ModelConfigList is currently supported" in details
    for change in ({"base_path": "relative/path"}, {"model_platform": "pytorch"}):
        config = model_server_config_pb2.ModelServerConfig()
        entry = config.model_config_list.config.add(name="half", base_path=str(models / "half"),
                                                    model_platform="tensorflow")
        for key, value in change.items():
            setattr(entry, key, value)
        assert reload(config)[0] == grpc.StatusCode.INVALID_ARGUMENT
    duplicate = model_server_config_pb2.ModelServerConfig()
    for _ in range(2):
        duplicate.model_config_list.config.add(name="half", base_path=str(models / "half"), model_platform="tensorflow")
    assert reload(duplicate)[0] == grpc.StatusCode.INVALID_ARGUMENT
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "multi"
    assert model_service.GetModelStatus(status_request, timeout=30).model_version_status[0].version == 1


def _multi(*tasks):
    request = inference_pb2.MultiInferenceRequest()
    for name, signature, method in tasks:
        task = request.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = name, signature, method
    request.input.example_list.examples.extend([example(x=2.0), example(x=4.0)])
    return request


CLASSIFY, REGRESS = "tensorflow/serving/classify", "tensorflow/serving/regress"


def _runs(prediction) -> float:
    response = prediction.Predict(predict_request("counting", x(0.0), signature_name="count"), timeout=30)
    return float(tf.make_ndarray(response.outputs["count"])[0])


def test_multi_inference_runs_every_task_in_one_session_call(stubs):
    prediction, _ = stubs
    before = _runs(prediction)
    response = prediction.MultiInference(_multi(("counting", "classify", CLASSIFY), ("counting", "regress", REGRESS)),
                                         timeout=30)
    assert _runs(prediction) - before == 1.0  # the shared op ran once: one call, like one Session::Run
    classified, regressed = response.results
    assert [c.classes[0].score for c in classified.classification_result.classifications] == [3.0, 4.0]
    assert [r.value for r in regressed.regression_result.regressions] == [3.0, 4.0]
    assert [(r.model_spec.name, r.model_spec.signature_name, r.model_spec.version.value) for r in response.results] \
        == [("counting", "classify", 1), ("counting", "regress", 1)]


@pytest.mark.parametrize("tasks,code,message", [
    ((("half", "classify_x_to_y", CLASSIFY), ("", "regress_x_to_y", REGRESS)),
     grpc.StatusCode.INVALID_ARGUMENT, "Found ModelSpec with an empty model name."),
    ((("half", "classify_x_to_y", CLASSIFY), ("multi", "regress_x_to_y", REGRESS)),
     grpc.StatusCode.INVALID_ARGUMENT, "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    ((("half", "regress_x_to_y", REGRESS), ("half", "regress_x_to_y", REGRESS)),
     grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: regress_x_to_y"),
    ((("half", "nope", REGRESS),), grpc.StatusCode.INVALID_ARGUMENT, "Requested signature not found in model graph: nope"),
    ((("half", "regress_x_to_y", ""),), grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: "),
    ((("ghost", "regress_x_to_y", REGRESS),), grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(ghost)"),
    ((), grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
])
def test_multi_inference_errors(stubs, tasks, code, message):
    prediction, _ = stubs
    assert grpc_error(prediction.MultiInference, _multi(*tasks)) == (code, message)


# --- §3 labels ---

def test_labels(server, stubs):
    assert rest(server, "POST", "/v1/models/lab/labels/stable:predict", {"instances": [2.0]})[1] == \
        {"predictions": [3.0]}
    # REST labels take [^/:]+, URL-decoded; not only \w+.
    assert rest(server, "POST", "/v1/models/lab/labels/canary-v2%2Ex:predict", {"instances": [2.0]})[1] == \
        {"predictions": [4.0]}
    status, body, _ = rest(server, "GET", "/v1/models/lab/labels/canary-v2.x/metadata")
    assert status == 200 and body["model_spec"]["version"] == "2"
    # Status through a label ignores the label, even an unknown one; versions come newest first.
    for label in ("stable", "nobody"):
        status, body, _ = rest(server, "GET", f"/v1/models/lab/labels/{label}")
        assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["2", "1"]
    prediction, _ = stubs
    response = prediction.Predict(predict_request("lab", x(2.0), version_label="canary-v2.x"), timeout=30)
    assert response.model_spec.version.value == 2 and tf.make_ndarray(response.outputs["y"]).tolist() == [4.0]


# --- §4 metrics ---

def test_metrics_text_format(server, stubs):
    prediction, _ = stubs
    rest(server, "POST", "/v1/models/half:predict", {"instances": [1.0]})
    rest(server, "GET", "/v1/models/half")
    prediction.Predict(predict_request("half", x(1.0)), timeout=30)
    status, text, headers = rest(server, "GET", "/monitoring/prometheus/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "# HELP" not in text
    types = dict(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))
    assert types[":tensorflow:serving:request_count"] == "counter"
    assert types[":tensorflow:serving:request_latency"] == "histogram"
    assert types[":tensorflow:serving:runtime_latency"] == "histogram"
    assert types[":tensorflow:cc:saved_model:load_attempt_count"] == "counter"
    series = '{model_name="half",API="predict",entrypoint="REST"'
    buckets = re.findall(r"^:tensorflow:serving:request_latency_bucket" + re.escape(series) + r',le="([^"]+)"} (\d+)$',
                         text, re.M)
    # Exponential(10, 1.8, 33) microseconds, cumulative, closed by +Inf; then _sum and _count.
    assert len(buckets) == 34 and buckets[0][0] == "10" and buckets[1][0] == "18" and buckets[-1][0] == "+Inf"
    counts = [int(c) for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] >= 1
    count = re.search(r"^:tensorflow:serving:request_latency_count" + re.escape(series) + r"} (\d+)$", text, re.M)
    assert int(count.group(1)) == counts[-1]
    assert re.search(r'^:tensorflow:serving:request_latency_count\{model_name="half",API="Predict",'
                     r'entrypoint="GRPC"} \d+$', text, re.M)
    assert ':tensorflow:serving:request_latency_bucket{model_name="half",API="",entrypoint="REST",le="10"}' in text
    assert ':tensorflow:serving:runtime_latency_count{model_name="half",API="Predict",runtime="TF1"}' in text
    status, text, headers = rest(server, "GET", "/monitoring/prometheus/metrics?x=1")
    assert status == 400 and headers["Content-Type"].startswith("text/plain")
    assert text == "Unexpected path: /monitoring/prometheus/metrics?x=1. Should be /monitoring/prometheus/metrics"


# --- HTTP/1.1 details of the REST port ---

def test_keep_alive_pipelining_expect_and_chunked(server):
    body = b'{"instances": [2.0]}'
    request = (b"POST /v1/models/half:predict HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\n\r\n" + body)
    chunked = (b"POST /v1/models/half:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"ins\r\n" + hex(len(body) - 5)[2:].encode() + b"\r\n" + body[5:] + b"\r\n0\r\n\r\n")
    last = b"GET /v1/models/half HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw_http(server.rest_port, request + chunked + last)
    assert answer.count(b"HTTP/1.1 200 OK") == 3 and answer.count(b'{"predictions":[3.0]}') == 2
    assert answer.index(b'"predictions"') < answer.index(b"model_version_status")


def test_expect_100_continue(server):
    import socket

    body = b'{"instances": [2.0]}'
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/half:predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = b""
        while b'{"predictions":[3.0]}' not in answer:
            chunk = sock.recv(1024)
            assert chunk
            answer += chunk


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /v1/models/half:predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"POST /v1/models/half:predict HTTP/1.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"GET /v1/models/half HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"NOT A REQUEST\r\n\r\n", b"400"),
    (b"POST /v1/models/half:predict HTTP/1.1\r\nContent-Length: " + str(MAX_REQUEST_BYTES + 1).encode() +
     b"\r\n\r\n" + b" " * (MAX_REQUEST_BYTES + 1), b"413"),
    (b"POST /v1/models/half:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
])
def test_malformed_http_gets_a_4xx_and_the_server_keeps_serving(server, request_bytes, status):
    answer = raw_http(server.rest_port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"Content-Type: application/json" in answer.split(b"\r\n\r\n")[0]
    assert rest(server, "POST", "/v1/models/half:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}


# --- flags ---

def test_batching_is_on_by_default_and_spelled_out_for_the_real_server():
    assert flags_lib.parse(["--model_base_path=/m"]).enable_batching is True
    off = flags_lib.parse(["--model_base_path=/m", "--enable_batching=false"])
    assert off.enable_batching is False and "--enable_batching=false" not in flags_lib.to_argv(off)
    assert "--enable_batching=true" in flags_lib.to_argv(flags_lib.parse(["--model_base_path=/m"]))
    assert flags_lib.parse(["--model_base_path=/m", "--enable_signature_method_name_check"]) \
        .enable_signature_method_name_check is True


# --- CORS, the REST timeout, batching off ---

@pytest.fixture(scope="module")
def edge_server(tmp_path_factory):
    from tests.serving_helpers import make_slow

    root = tmp_path_factory.mktemp("edge")
    make_tf1_half_plus_two(root / "half" / "1")
    make_slow(root / "slow" / "1")
    (root / "models.config").write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{n}" base_path: "{root / n}" model_platform: "tensorflow" }}\n'
        for n in ("half", "slow")) + "}\n")
    (root / "monitoring.config").write_text("prometheus_config { enable: true }\n")
    with ServerProcess(f"--model_config_file={root / 'models.config'}", "--rest_api_enable_cors_support",
                       "--rest_api_timeout_in_ms=200", "--enable_batching=false",
                       f"--monitoring_config_file={root / 'monitoring.config'}") as s:
        yield s


def test_cors(edge_server):
    status, headers, text = http("OPTIONS", edge_server.rest_url + "/v1/models/half",
                                 headers={"Origin": "https://example.com"})
    assert status == 200 and text == "" and headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Allow-Methods"] == "POST, GET"
    assert headers["Access-Control-Allow-Headers"] == "Content-Type"
    for origin in ({"Origin": "ftp://example.com"}, {}):
        status, _, text = http("OPTIONS", edge_server.rest_url + "/v1/models/half", headers=origin)
        assert status == 400 and text == ""
    status, headers, _ = http("POST", edge_server.rest_url + "/v1/models/half:predict", {"instances": [2.0]})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"


def test_rest_timeout_is_deadline_exceeded(edge_server):
    status, headers, text = http("POST", edge_server.rest_url + "/v1/models/slow:predict", {"instances": [100000]})
    assert status == 504 and headers["Content-Type"] == "application/json" and "error" in json.loads(text)
    assert rest(edge_server, "POST", "/v1/models/half:predict", {"instances": [2.0]})[1] == {"predictions": [3.0]}


def test_batching_can_be_turned_off(edge_server):
    import threading

    results = {}

    def call(i):
        results[i] = rest(edge_server, "POST", "/v1/models/half:predict", {"instances": [float(i)]})[1]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: {"predictions": [0.5 * i + 2.0]} for i in range(8)}
    metrics = http("GET", edge_server.rest_url + "/monitoring/prometheus/metrics")[2]
    assert "batching_session" not in metrics and ":tensorflow:serving:runtime_latency_count" in metrics
