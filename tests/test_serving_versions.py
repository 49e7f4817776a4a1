"""Version directories are found the way TF Serving finds them (tf-serving-reference.md §3).

Names parse with absl::SimpleAtoi semantics, so TF Serving's own test models,
whose version directories are zero-padded (`00000123`), load as version 123;
anything that does not parse (staging directories, `1_000`) is skipped.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving.model_manager import parse_version
from tests.serving_helpers import ServerProcess, make_tf1_half_plus_two


@pytest.mark.parametrize("name,version", [
    ("00000123", 123), ("01", 1), ("7", 7), (" 8 ", 8), ("+9", 9), ("-3", -3), ("9223372036854775807", 2 ** 63 - 1),
    ("9223372036854775808", None), ("1_000", None), ("12a", None), ("", None), (".staging-4", None),
    ("\u0661\u0662", None), ("0x10", None),
])
def test_version_directory_names_parse_like_simple_atoi(name, version):
    assert parse_version(name) == version


def predict_request(name: str, value: float) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([value], np.float32)))
    return request


def test_model_base_path_with_tf_servings_own_layout_starts(tmp_path):
    """The issue's first report: --model_name/--model_base_path over `00000123` must start and serve."""
    base = tmp_path / "half_plus_two"
    make_tf1_half_plus_two(base / "00000123")
    (base / ".staging-7").mkdir()
    with ServerProcess("--model_name=default", f"--model_base_path={base}", rest=False) as server:
        channel = grpc.insecure_channel(server.grpc_address)
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "default"
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
        assert [(s.version, s.state) for s in status.model_version_status] == \
            [(123, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request("default", 2.0), timeout=30)
        assert response.model_spec.version.value == 123
        channel.close()
