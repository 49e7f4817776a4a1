"""The request handlers behind both APIs: gRPC calls them directly, REST after turning JSON into protos.

Each takes a ModelManager and a `tensorflow_serving.apis` request proto and
returns the response proto, or raises ServingError with TF Serving's code
and message (tf-serving-reference.md §2).
"""
from __future__ import annotations

from typing import List

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, predict_pb2, regression_pb2)

from serving import model_manager as mm
from serving.errors import ServingError, invalid
from serving.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD, Servable

STATE_ENUM = get_model_status_pb2.ModelVersionStatus.State


def _set(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def _fill_spec(response_spec, request_spec, servable: Servable, signature: str) -> None:
    response_spec.name = request_spec.name
    response_spec.version.value = servable.version
    response_spec.signature_name = signature


def _require_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise invalid("Missing ModelSpec")


def predict(manager: mm.ModelManager, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    _require_spec(request)
    servable = manager.resolve(request.model_spec)
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature(key, "predict")
    sent, required = set(request.inputs), set(signature.inputs)
    if sent != required:
        raise invalid(f"input size does not match signature: {len(sent)}!={len(required)} len({_set(sent)}) != "
                      f"len({_set(required)}). Sent extra: {_set(sent - required)}. "
                      f"Missing but required: {_set(required - sent)}.")
    wanted = list(request.output_filter)
    for alias in wanted:
        if alias not in signature.outputs:
            raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                          f"set {_set(signature.outputs)}.")
    if len(set(wanted)) != len(wanted):
        raise invalid(f"duplicate output tensor alias in output_filter: {_set(wanted)}")
    inputs = {alias: tf.make_ndarray(tensor) for alias, tensor in request.inputs.items()}
    outputs = servable.run(key, inputs, wanted)
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, request.model_spec, servable, key)
    for alias, value in outputs.items():
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response


def serialized_examples(input_proto) -> List[bytes]:
    """tf.Examples of a tensorflow.serving.Input as the DT_STRING batch TF Serving feeds (context merged in)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        records = [e.SerializeToString() for e in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        context = input_proto.example_list_with_context.context.SerializeToString()
        records = [context + e.SerializeToString() for e in input_proto.example_list_with_context.examples]
    else:
        records = []
    if not records:
        raise invalid("Input is empty.")
    return records


def _example_signature(servable: Servable, key: str, api: str):
    signature = servable.signature(key, api)
    if len(signature.inputs) != 1:
        raise invalid(f"Expected one input Tensor, found {len(signature.inputs)}.")
    if api == "classify" and not ({"classes", "scores"} & set(signature.outputs)):
        raise invalid("Expected classification signature outputs to contain at least one of classes or scores.")
    if api == "regress" and "outputs" not in signature.outputs:
        raise invalid("No regression outputs found in signature, expected 'outputs'.")
    return signature


def _classify_results(servable: Servable, key: str, records: List[bytes], result) -> None:
    signature = _example_signature(servable, key, "classify")
    (alias,) = signature.inputs
    outputs = servable.run(key, {alias: np.array(records, dtype=object)},
                           [o for o in ("classes", "scores") if o in signature.outputs])
    scores, classes = outputs.get("scores"), outputs.get("classes")
    width = (scores if scores is not None else classes).reshape(len(records), -1).shape[1]
    for i in range(len(records)):
        row = result.classifications.add()
        for j in range(width):
            entry = row.classes.add()
            if classes is not None:
                entry.label = classes.reshape(len(records), -1)[i, j].decode("utf-8", "replace")
            if scores is not None:
                entry.score = float(scores.reshape(len(records), -1)[i, j])


def _regress_results(servable: Servable, key: str, records: List[bytes], result) -> None:
    signature = _example_signature(servable, key, "regress")
    (alias,) = signature.inputs
    values = servable.run(key, {alias: np.array(records, dtype=object)}, ["outputs"])["outputs"]
    values = values.reshape(len(records), -1)
    if values.shape[1] != 1:
        raise invalid(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                      f"{list(values.shape)}")
    for value in values[:, 0]:
        result.regressions.add().value = float(value)


def _example_api(manager: mm.ModelManager, request, api: str, response, fill_results):
    """Classify and Regress: resolve, check the signature, run on the serialized examples."""
    _require_spec(request)
    servable = manager.resolve(request.model_spec)
    key = request.model_spec.signature_name or DEFAULT_SIGNATURE
    servable.signature(key, api)
    fill_results(servable, key, serialized_examples(request.input), response.result)
    _fill_spec(response.model_spec, request.model_spec, servable, key)
    return response


def classify(manager: mm.ModelManager, request: classification_pb2.ClassificationRequest):
    return _example_api(manager, request, "classify", classification_pb2.ClassificationResponse(), _classify_results)


def regress(manager: mm.ModelManager, request: regression_pb2.RegressionRequest):
    return _example_api(manager, request, "regress", regression_pb2.RegressionResponse(), _regress_results)


def multi_inference(manager: mm.ModelManager, request: inference_pb2.MultiInferenceRequest):
    if not request.tasks:
        raise invalid("Found no inference tasks.")
    names = {t.model_spec.name for t in request.tasks}
    if len(names) != 1:
        raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
    signatures = [t.model_spec.signature_name or DEFAULT_SIGNATURE for t in request.tasks]
    if len(set(signatures)) != len(signatures):
        raise invalid("Duplicate evaluation of signature: " + ", ".join(sorted(signatures)))
    records = serialized_examples(request.input)
    servable = manager.resolve(request.tasks[0].model_spec)
    response = inference_pb2.MultiInferenceResponse()
    for task, key in zip(request.tasks, signatures):
        method = task.method_name or servable.signature(key, "classify").method_name
        result = response.results.add()
        if method == CLASSIFY_METHOD:
            _classify_results(servable, key, records, result.classification_result)
        elif method == REGRESS_METHOD:
            _regress_results(servable, key, records, result.regression_result)
        else:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               f"Unsupported signature method_name: {method}")
        _fill_spec(result.model_spec, task.model_spec, servable, key)
    return response


def get_model_metadata(manager: mm.ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest):
    _require_spec(request)
    if not request.metadata_field:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise invalid(f"Metadata field {field} is not supported")
    servable = manager.resolve(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = servable.version
    packed = any_pb2.Any()
    packed.Pack(signature_map)
    response.metadata["signature_def"].CopyFrom(packed)
    return response


def get_model_status(manager: mm.ModelManager, request: get_model_status_pb2.GetModelStatusRequest):
    _require_spec(request)
    if not request.model_spec.name:
        raise invalid("ModelSpec has no name specified.")
    version = request.model_spec.version.value if request.model_spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    from tensorflow.core.protobuf import error_codes_pb2

    for number, state in manager.status(request.model_spec.name, version):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = STATE_ENUM.Value(state.state)
        entry.status.error_code = error_codes_pb2.Code.Value(state.error_code)
        entry.status.error_message = state.error_message
    return response


def replay_warmup(servable: Servable, log) -> None:
    """Runs one warmup PredictionLog's request against a servable that is not serving yet."""
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        request = log.predict_log.request
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        servable.signature(key, "predict")
        servable.run(key, {a: tf.make_ndarray(t) for a, t in request.inputs.items()}, list(request.output_filter))
    elif kind == "classify_log":
        request = log.classify_log.request
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        _classify_results(servable, key, serialized_examples(request.input), classification_pb2.ClassificationResult())
    elif kind == "regress_log":
        request = log.regress_log.request
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        _regress_results(servable, key, serialized_examples(request.input), regression_pb2.RegressionResult())
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"Unsupported log_type for warmup: {kind}")

