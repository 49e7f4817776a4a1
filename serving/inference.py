"""The request handlers behind both APIs (tf-serving-reference.md §2), on `tensorflow_serving.apis` protos.

Every API resolves its ModelSpec to a servable exactly once and hands that
servable down, so a label that moves while a request runs cannot make one
request use two versions. Predict is split in three steps so that the
front ends can batch the middle one: `prepare_predict` (resolve, check,
decode the input tensors), running the signature, and `predict_response`.
Errors are ServingError with TF Serving's code and message.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from google.protobuf import any_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, predict_pb2, regression_pb2)

from serving import model_manager as mm, tensors
from serving.errors import failed_precondition, invalid, unimplemented
from serving.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD, Servable, Signature

STATE_ENUM = get_model_status_pb2.ModelVersionStatus.State
DEFAULT_MAX_BYTES = 64 << 20


def _set(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def _fill_spec(response_spec, name: str, servable: Servable, signature: Optional[str]) -> None:
    response_spec.name = name
    response_spec.version.value = servable.version
    if signature is not None:
        response_spec.signature_name = signature or DEFAULT_SIGNATURE


def _require_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise invalid("Missing ModelSpec")


# --- Predict ---

class PredictCall:
    """A checked Predict request: the one servable and signature it resolved to, and its inputs.

    Inputs come as arrays (REST decodes JSON into them) or as the request's
    TensorProtos with their shapes (gRPC), decoded only when the call runs,
    once per batch (tensors.concat), or alone (`inputs`).
    """

    __slots__ = ("name", "servable", "signature", "outputs", "max_bytes", "_sources", "_layout", "_inputs")

    def __init__(self, name: str, servable: Servable, signature: Signature, outputs: tuple,
                 arrays: Optional[Dict[str, np.ndarray]] = None, protos=None, layout=None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.name, self.servable, self.signature, self.outputs = name, servable, signature, outputs
        self.max_bytes = max_bytes
        self._inputs = arrays
        if arrays is not None:
            self._sources = {alias: (value, value.shape) for alias, value in arrays.items()}
            self._layout = {alias: (value.dtype.str, value.shape) for alias, value in arrays.items()}
        else:
            self._sources = {alias: (protos[alias], dims) for alias, (_, dims) in layout.items()}
            self._layout = layout

    @property
    def inputs(self) -> Dict[str, np.ndarray]:
        if self._inputs is None:
            self._inputs = {alias: tensors.to_array(alias, proto, self.max_bytes)
                            for alias, (proto, _) in self._sources.items()}
        return self._inputs

    def layout(self) -> Dict[str, tuple]:
        """{alias: (numpy dtype string or None, shape)}: what decides whether calls can be batched."""
        return self._layout

    def source(self, alias: str) -> tuple:
        return self._sources[alias]

    def run(self) -> Dict[str, np.ndarray]:
        return self.signature(self.inputs, self.outputs)


def check_predict_inputs(signature: Signature, sent) -> None:
    required = set(signature.input_dtypes)
    sent = set(sent)
    if sent != required:
        raise invalid(f"input size does not match signature: {len(sent)}!={len(required)} len({_set(sent)}) != "
                      f"len({_set(required)}). Sent extra: {_set(sent - required)}. "
                      f"Missing but required: {_set(required - sent)}.")


def check_output_filter(signature: Signature, wanted) -> tuple:
    wanted = tuple(wanted)
    for alias in wanted:
        if alias not in signature.definition.outputs:
            raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                          f"set {_set(signature.output_aliases)}.")
    if len(set(wanted)) != len(wanted):
        raise invalid(f"duplicate output tensor alias in output_filter: {_set(wanted)}")
    return wanted


def prepare_predict(manager: mm.ModelManager, request: predict_pb2.PredictRequest,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> PredictCall:
    _require_spec(request)
    spec = request.model_spec
    servable = manager.resolve(spec)
    signature = servable.signature(spec.signature_name, "predict")
    given = dict(request.inputs)
    defaults = signature.definition.defaults if hasattr(signature.definition, "defaults") else {}
    check_predict_inputs(signature, set(given) | {a for a in defaults if a in signature.input_dtypes})
    outputs = check_output_filter(signature, request.output_filter)
    for alias in signature.input_dtypes:
        if alias not in given:  # filled from the signature's defaults
            given[alias] = defaults[alias]
    layout = {}
    for alias, proto in given.items():
        dims, token = tensors.inspect(alias, proto, max_bytes)
        signature.check(alias, dims, proto.dtype)
        layout[alias] = (token, dims)
    return PredictCall(spec.name, servable, signature, outputs, protos=given, layout=layout, max_bytes=max_bytes)


def predict_response(call: PredictCall, outputs: Dict[str, np.ndarray]) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, call.name, call.servable, call.signature.key)
    for alias, value in outputs.items():
        tensors.fill_proto(response.outputs[alias], value)
    return response


def predict(manager: mm.ModelManager, request: predict_pb2.PredictRequest,
            max_bytes: int = DEFAULT_MAX_BYTES) -> predict_pb2.PredictResponse:
    """The whole Predict in the calling thread (warmup; front ends run the middle step their own way)."""
    call = prepare_predict(manager, request, max_bytes)
    return predict_response(call, call.run())


# --- Classify, Regress, MultiInference ---

def serialized_examples(input_proto) -> np.ndarray:
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
    array = np.empty(len(records), dtype=object)
    array[:] = records
    return array


def _definition_text(signature: Signature) -> str:
    return str(signature.definition)


def classify_outputs(signature: Signature, method_check: bool) -> List[str]:
    """TF Serving's PreProcessClassification: which outputs a classify call fetches."""
    definition = signature.definition
    if method_check and definition.method_name != CLASSIFY_METHOD:
        raise invalid(f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
                      f"Was: {definition.method_name}")
    if len(definition.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if len(definition.outputs) not in (1, 2):
        raise invalid(f"Expected one or two output Tensors, found {len(definition.outputs)}")
    if "inputs" not in definition.inputs:
        raise failed_precondition(f"No classification inputs found in SignatureDef: {_definition_text(signature)}")
    outputs = [o for o in ("classes", "scores") if o in definition.outputs]
    if not outputs:
        raise failed_precondition('Expected classification signature outputs to contain at least one of "classes" '
                                  f'or "scores". Signature was: {_definition_text(signature)}')
    return outputs


def regress_outputs(signature: Signature, method_check: bool) -> List[str]:
    """TF Serving's PreProcessRegression."""
    definition = signature.definition
    if method_check and definition.method_name != REGRESS_METHOD:
        raise invalid(f"Expected regression signature method_name to be {REGRESS_METHOD}. "
                      f"Was: {definition.method_name}")
    if len(definition.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if len(definition.outputs) != 1:
        raise invalid("Expected one output Tensor.")
    if "inputs" not in definition.inputs:
        raise failed_precondition(f"No regression inputs found in SignatureDef: {_definition_text(signature)}")
    if "outputs" not in definition.outputs:
        raise failed_precondition(f"No regression outputs found in SignatureDef: {_definition_text(signature)}")
    return ["outputs"]


def _shape(value: np.ndarray) -> str:
    return "[" + ",".join(map(str, value.shape)) + "]"


def fill_classifications(outputs: Dict[str, np.ndarray], n: int, result) -> None:
    """TF Serving's PostProcessClassificationResult."""
    classes, scores = outputs.get("classes"), outputs.get("scores")
    for name, value, kind in (("classes", classes, "O"), ("scores", scores, "f")):
        if value is None:
            continue
        if value.ndim != 2:
            raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {_shape(value)}")
        if kind == "O" and value.dtype != object:
            raise invalid(f"Expected classes Tensor of DT_STRING. Got: {value.dtype}")
        if kind == "f" and value.dtype != np.float32:
            raise invalid(f"Expected scores Tensor of DT_FLOAT. Got: {value.dtype}")
        if value.shape[0] != n:
            raise invalid(f"Expected {name} output batch size of {n}. Got: {value.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                      f"{scores.shape[1]}")
    width = (classes if classes is not None else scores).shape[1]
    labels = classes.tolist() if classes is not None else None
    values = scores.tolist() if scores is not None else None
    for i in range(n):
        row = result.classifications.add()
        for j in range(width):
            entry = row.classes.add()
            if labels is not None:
                entry.label = labels[i][j].decode("utf-8", "replace") if isinstance(labels[i][j], bytes) else labels[i][j]
            if values is not None:
                entry.score = values[i][j]


def fill_regressions(outputs: Dict[str, np.ndarray], n: int, result) -> None:
    """TF Serving's PostProcessRegressionResult."""
    values = outputs["outputs"]
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise invalid(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                      f"{_shape(values)}")
    if values.dtype != np.float32:
        raise invalid(f"Expected output Tensor of DT_FLOAT. Got: {values.dtype}")
    if values.shape[0] != n:
        raise invalid(f"Input batch size did not match output batch size: {n} vs. {values.shape[0]}")
    for value in values.reshape(-1).tolist():
        result.regressions.add().value = value


class ExampleCall:
    """A checked Classify or Regress request, resolved once."""

    def __init__(self, api: str, name: str, servable: Servable, signature: Signature, records: np.ndarray,
                 outputs: List[str]):
        self.api, self.name, self.servable, self.signature = api, name, servable, signature
        self.records, self.outputs = records, outputs

    def run(self):
        (alias,) = self.signature.input_dtypes
        outputs = self.signature({alias: self.records}, self.outputs)
        if self.api == "classify":
            response = classification_pb2.ClassificationResponse()
            fill_classifications(outputs, len(self.records), response.result)
        else:
            response = regression_pb2.RegressionResponse()
            fill_regressions(outputs, len(self.records), response.result)
        _fill_spec(response.model_spec, self.name, self.servable, self.signature.key)
        return response


def prepare_examples(manager: mm.ModelManager, request, api: str, method_check: bool = False) -> ExampleCall:
    """Classify and Regress: resolve, check the signature's structure, serialize the examples."""
    _require_spec(request)
    servable = manager.resolve(request.model_spec)
    signature = servable.signature(request.model_spec.signature_name, api)
    outputs = (classify_outputs if api == "classify" else regress_outputs)(signature, method_check)
    return ExampleCall(api, request.model_spec.name, servable, signature, serialized_examples(request.input), outputs)


def classify(manager: mm.ModelManager, request: classification_pb2.ClassificationRequest, method_check=False):
    return prepare_examples(manager, request, "classify", method_check).run()


def regress(manager: mm.ModelManager, request: regression_pb2.RegressionRequest, method_check=False):
    return prepare_examples(manager, request, "regress", method_check).run()


def multi_inference(manager: mm.ModelManager, request: inference_pb2.MultiInferenceRequest, method_check=False):
    """TF Serving's RunMultiInference: every task on the same examples, in one call of the model."""
    first = request.tasks[0].model_spec if request.tasks else None
    servable = manager.resolve(first if first is not None else predict_pb2.PredictRequest().model_spec)
    name, keys, plans, input_name = (first.name if first is not None else ""), set(), [], None
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid("Found ModelSpec with an empty model name.")
        if task.model_spec.name != name:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        key = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if key in keys:
            raise invalid(f"Duplicate evaluation of signature: {key}")
        keys.add(key)
        signature = servable.signatures.get(key)
        if signature is None:
            raise invalid(f"Requested signature not found in model graph: {key}")
        if task.method_name == CLASSIFY_METHOD:
            outputs = classify_outputs(signature, method_check)
        elif task.method_name == REGRESS_METHOD:
            outputs = regress_outputs(signature, method_check)
        else:
            raise unimplemented(f"Unsupported signature method_name: {task.method_name}")
        tensor = signature.definition.inputs["inputs"].name
        if input_name is not None and tensor != input_name:
            raise invalid("Input tensor must be the same for all Signatures.")
        input_name = tensor
        plans.append((task, key, outputs))
    records = serialized_examples(request.input)
    response = inference_pb2.MultiInferenceResponse()
    if not plans:
        return response
    results = servable.run_combined([(key, outputs) for _, key, outputs in plans], records)
    for (task, key, _), outputs in zip(plans, results):
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD:
            fill_classifications(outputs, len(records), result.classification_result)
        else:
            fill_regressions(outputs, len(records), result.regression_result)
        _fill_spec(result.model_spec, name, servable, key)
    return response


# --- metadata and status ---

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
    _fill_spec(response.model_spec, request.model_spec.name, servable, None)
    packed = any_pb2.Any()
    packed.Pack(signature_map)
    response.metadata["signature_def"].CopyFrom(packed)
    return response


def get_model_status(manager: mm.ModelManager, request: get_model_status_pb2.GetModelStatusRequest):
    from tensorflow.core.protobuf import error_codes_pb2

    _require_spec(request)
    if not request.model_spec.name:
        raise invalid("ModelSpec has no name specified.")
    version = request.model_spec.version.value if request.model_spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state in manager.status(request.model_spec.name, version):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = STATE_ENUM.Value(state.state)
        entry.status.error_code = error_codes_pb2.Code.Value(state.error_code)
        entry.status.error_message = state.error_message
    return response


# --- warmup ---

def replay_warmup(servable: Servable, log, method_check: bool = False) -> None:
    """Runs one warmup PredictionLog's request against a servable that is not serving yet."""
    kind = log.WhichOneof("log_type")
    pinned = _Pinned(servable)
    if kind in ("predict_log", "classify_log", "regress_log"):
        # TF Serving runs warmup on the bundle itself: a request needs no ModelSpec.
        getattr(log, kind).request.model_spec.SetInParent()
    if kind == "predict_log":
        predict(pinned, log.predict_log.request)
    elif kind == "classify_log":
        classify(pinned, log.classify_log.request, method_check)
    elif kind == "regress_log":
        regress(pinned, log.regress_log.request, method_check)
    elif kind == "multi_inference_log":
        multi_inference(pinned, log.multi_inference_log.request, method_check)
    else:
        raise unimplemented(f"Unsupported log_type for warmup: {kind}")


class _Pinned:
    """A stand-in manager that resolves every ModelSpec to the version being warmed up."""

    def __init__(self, servable: Servable):
        self.servable = servable

    def resolve(self, model_spec) -> Servable:
        return self.servable
