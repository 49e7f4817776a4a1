"""A request resolves its model version once, on every API, even when a label moves while it runs.

In-process, with the real ModelManager, real SavedModels and the real
gRPC servicers and REST handler: the manager is only instrumented to count
resolutions and to move the `stable` label right after the first one, which
is what a rollback racing with a request looks like. Were a handler to
resolve twice, its answer would mix the two versions (or its count would
show it).
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, inference_pb2, predict_pb2,
                                     regression_pb2)

from serving import model_config
from serving.execution import make_executor
from serving.grpc_api import PredictionService
from serving.metrics import Registry
from serving.model_manager import ModelManager
from serving.rest_api import RestApi
from tests.serving_helpers import make_tf1_half_plus_two


class LabelMovingManager(ModelManager):
    """Counts resolutions; after the first one, `stable` points at the other version."""

    def __init__(self):
        super().__init__()
        self.resolutions = 0

    def resolve(self, model_spec):
        servable = super().resolve(model_spec)
        self.resolutions += 1
        with self._lock:
            labels = self._models["m"].labels
            labels["stable"] = 2 if labels["stable"] == 1 else 1
        return servable

    def reset(self):
        with self._lock:
            self._models["m"].labels["stable"] = 1
        self.resolutions = 0


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    base = tmp_path_factory.mktemp("resolution") / "m"
    make_tf1_half_plus_two(base / "1", b=2.0)  # y = 0.5x + 2
    make_tf1_half_plus_two(base / "2", b=3.0)  # y = 0.5x + 3
    manager = LabelMovingManager()
    manager.set_config(model_config.build_config(model_config.Deployment("m", str(base), [1, 2], {})))
    config = model_config.build_config(model_config.Deployment("m", str(base), [1, 2], {"stable": 1}))
    manager.set_config(config)
    return manager


@pytest.fixture(params=[True, False], ids=["batching", "no-batching"])
def run(request, manager):
    """Runs a coroutine factory on a fresh loop with an executor; returns what it returns."""
    def go(make):
        async def main():
            executor = make_executor(asyncio.get_running_loop(), request.param, "", Registry())
            try:
                return await make(executor)
            finally:
                executor.stop()
        manager.reset()
        return asyncio.run(main())
    return go


def _example(x: float) -> tf.train.Example:
    return tf.train.Example(features=tf.train.Features(feature={"x": tf.train.Feature(
        float_list=tf.train.FloatList(value=[x]))}))


def test_grpc_predict(manager, run):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = "m", "stable"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([2.0], np.float32)))
    response = run(lambda ex: PredictionService(manager, Registry(), ex, 1 << 20, False).Predict(request, None))
    assert manager.resolutions == 1
    assert (response.model_spec.version.value, tf.make_ndarray(response.outputs["y"]).tolist()) == (1, [3.0])


@pytest.mark.parametrize("verb,body,expected", [
    ("predict", {"instances": [2.0]}, {"predictions": [3.0]}),
    ("classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}, {"results": [[["class", 3.0]]]}),
    ("regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}, {"results": [3.0]}),
])
def test_rest(manager, run, verb, body, expected):
    async def call(executor):
        api = RestApi(manager, Registry(), executor)
        return await api.handle("POST", f"/v1/models/m/labels/stable:{verb}", {}, json.dumps(body).encode())

    status, text, _, _ = run(call)
    assert status == 200 and json.loads(text) == expected  # version 1's answer, not version 2's
    assert manager.resolutions == 1


def test_grpc_classify_regress_multi_inference_and_metadata(manager, run):
    service = lambda ex: PredictionService(manager, Registry(), ex, 1 << 20, False)  # noqa: E731

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name, classify.model_spec.version_label = "m", "stable"
    classify.model_spec.signature_name = "classify_x_to_y"
    classify.input.example_list.examples.append(_example(2.0))
    response = run(lambda ex: service(ex).Classify(classify, None))
    assert manager.resolutions == 1 and response.model_spec.version.value == 1
    assert response.result.classifications[0].classes[0].score == 3.0

    regress = regression_pb2.RegressionRequest()
    regress.model_spec.CopyFrom(classify.model_spec)
    regress.model_spec.signature_name = "regress_x_to_y"
    regress.input.CopyFrom(classify.input)
    response = run(lambda ex: service(ex).Regress(regress, None))
    assert manager.resolutions == 1 and response.result.regressions[0].value == 3.0

    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y", "tensorflow/serving/regress")):
        task = multi.tasks.add()
        task.model_spec.name, task.model_spec.version_label = "m", "stable"
        task.model_spec.signature_name, task.method_name = signature, method
    multi.input.CopyFrom(classify.input)
    response = run(lambda ex: service(ex).MultiInference(multi, None))
    assert manager.resolutions == 1
    assert [r.model_spec.version.value for r in response.results] == [1, 1]
    assert response.results[1].regression_result.regressions[0].value == 3.0

    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name, metadata.model_spec.version_label = "m", "stable"
    response = run(lambda ex: service(ex).GetModelMetadata(metadata, None))
    assert manager.resolutions == 1 and response.model_spec.version.value == 1
