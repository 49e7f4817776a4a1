"""TF Serving's REST API over the same handlers as gRPC (tf-serving-reference.md §1).

JSON is turned into the request protos, the shared handler runs, and the
response proto is turned back into TF Serving's JSON shapes: `predictions`
for row requests, `outputs` for columnar ones, `results` for classify and
regress, `{"error": ...}` with TF Serving's HTTP statuses otherwise.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import math
import re
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     predict_pb2, regression_pb2)

from serving import inference
from serving.errors import ServingError, invalid
from serving.metrics import REQUEST_COUNT, REQUEST_LATENCY

POST_PATH = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
GET_PATH = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
V1 = re.compile(r"(?i)/v1/.*")

FLOAT_TYPES = {tf.float16, tf.bfloat16, tf.float32, tf.float64}
INT_TYPES = {tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64}


# --- JSON <-> tensors ---

def _json_type(value) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, list):
        return "ARRAY"
    if isinstance(value, dict):
        return "OBJECT"
    return "NULL"


def _scalar(value, dtype: tf.DType):
    kind = _json_type(value)
    if dtype == tf.string:
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise invalid(f"Unable to base64 decode: {value['b64']}") from None
        if kind == "STRING":
            return value.encode("utf-8")
    elif dtype in FLOAT_TYPES and kind in ("DOUBLE", "INT"):
        return float(value)
    elif dtype in INT_TYPES and kind == "INT":
        return value
    elif dtype == tf.bool and kind == "BOOL":
        return value
    elif dtype not in FLOAT_TYPES | INT_TYPES | {tf.bool, tf.string}:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {json.dumps(value)} to type: "
                                                          f"{dtype.name} is not supported")
    raise invalid(f"JSON Value: {json.dumps(value)} Type: {kind} is not of expected type: {dtype.name}")


def _to_array(value, dtype: tf.DType) -> np.ndarray:
    """A rectangular nested list of JSON values as a numpy array of dtype."""
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        return _scalar(v, dtype)

    converted = convert(value)
    try:
        array = np.array(converted, dtype=object if dtype == tf.string else dtype.as_numpy_dtype)
    except ValueError:
        raise invalid("Expected tensor to be rectangular (all lists of the same length)") from None
    if dtype == tf.string and array.dtype == object and array.ndim and any(isinstance(x, list) for x in array.flat):
        raise invalid("Expected tensor to be rectangular (all lists of the same length)")
    return array


def _format(value) -> str:
    """One output value as TF Serving writes it: shortest floats with .0, NaN/Infinity, UTF-8 strings."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_format(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (bytes, np.bytes_)):
        return json.dumps(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (np.floating, float)):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        text = repr(value.item() if isinstance(value, np.float64) else value)
        if isinstance(value, (np.float32, np.float16)):
            text = repr(value)  # numpy prints the shortest round-trip form for its own width
            text = re.sub(r"^np\.float\d+\((.*)\)$", r"\1", text)
        return text if any(c in text for c in ".eEn") else text + ".0"
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return json.dumps(value)


def _values(array: np.ndarray, alias: str):
    """Nested Python values keeping numpy scalars (for their shortest form); `*_bytes` strings as b64."""
    if not isinstance(array, np.ndarray) or array.ndim == 0:
        value = array[()] if isinstance(array, np.ndarray) else array
        if isinstance(value, (bytes, np.bytes_)) and alias.endswith("_bytes"):
            return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
        return value
    return [_values(a, alias) for a in array]


# --- request parsing ---

def parse_json(body: bytes) -> Any:
    text = body.decode("utf-8", "replace")
    if not text.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        # raw_decode ignores trailing bytes after the value, as rapidjson does here.
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except json.JSONDecodeError as e:
        raise invalid(f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
    if not isinstance(value, dict):
        raise invalid("JSON Parse error: the request body must be a JSON object")
    return value


def model_spec(spec, name: str, version: Optional[str], label: Optional[str], signature: str = "") -> None:
    spec.name = name
    if version is not None:
        try:
            spec.version.value = int(version)
        except ValueError:
            raise invalid(f"Failed to convert version: {version} to numeric.") from None
    elif label is not None:
        spec.version_label = label
    if signature:
        spec.signature_name = signature


class RestApi:
    def __init__(self, manager, metrics, timeout_ms: int = 30000, monitoring_path: Optional[str] = None,
                 cors: bool = False, max_body_bytes: int = 64 << 20):
        self.manager, self.metrics = manager, metrics
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        self.monitoring_path, self.cors, self.max_body_bytes = monitoring_path, cors, max_body_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rest")

    # Returns (status, body, content type).
    def handle(self, method: str, path: str, body: bytes) -> Tuple[int, str, str]:
        if self.monitoring_path is not None and path.split("?", 1)[0] == self.monitoring_path:
            if path != self.monitoring_path:
                return 400, json.dumps({"error": f"Unexpected path: {path}"}), "application/json"
            return 200, self.metrics.render(), "text/plain; version=0.0.4"
        if not V1.fullmatch(path):
            return 404, "<html><body><h1>404 Not Found</h1></body></html>", "text/html"
        started = time.time()
        model_name, api = "", ""
        try:
            post, get = POST_PATH.fullmatch(path), GET_PATH.fullmatch(path)
            if method == "POST" and post:
                name, version, label, verb = post.groups()
                model_name, api = urllib.parse.unquote(name), verb
                if verb not in ("classify", "regress", "predict"):
                    raise invalid(f"Malformed request: {method} {path}")
                label = urllib.parse.unquote(label) if label is not None else None
                future = self._pool.submit(getattr(self, f"_{verb}"), model_name, version, label, body)
                try:
                    text = future.result(timeout=self.timeout)
                except concurrent.futures.TimeoutError:
                    raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            elif method == "GET" and get:
                name, version, label, metadata = get.groups()
                if name is None:
                    raise invalid("Missing model name in request.")
                model_name = urllib.parse.unquote(name)
                text = self._metadata(model_name, version, label) if metadata else self._status(model_name, version)
            else:
                raise invalid(f"Malformed request: {method} {path}")
        except ServingError as e:
            self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": e.code.name})
            return e.http_status, json.dumps({"error": e.message}), "application/json"
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server keeps serving
            logging.exception("REST %s %s failed", method, path)
            self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": "INTERNAL"})
            return 500, json.dumps({"error": f"{type(e).__name__}: {e}"}), "application/json"
        self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": "OK"})
        self.metrics.observe(REQUEST_LATENCY, {"model_name": model_name, "API": api, "entrypoint": "REST"},
                             (time.time() - started) * 1e6)
        return 200, text, "application/json"

    # --- endpoints ---
    def _status(self, name: str, version: Optional[str]) -> str:
        request = get_model_status_pb2.GetModelStatusRequest()
        model_spec(request.model_spec, name, version, None)  # a label is ignored, as in TF Serving
        response = inference.get_model_status(self.manager, request)
        return json_format.MessageToJson(response, preserving_proto_field_name=True,
                                         including_default_value_fields=True)

    def _metadata(self, name: str, version: Optional[str], label: Optional[str]) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        model_spec(request.model_spec, name, version, label and urllib.parse.unquote(label))
        response = inference.get_model_metadata(self.manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        spec = {"name": response.model_spec.name, "signature_name": "",
                "version": str(response.model_spec.version.value)}
        metadata = json_format.MessageToDict(signature_map, preserving_proto_field_name=True,
                                             including_default_value_fields=True)
        return json.dumps({"model_spec": spec, "metadata": {"signature_def": metadata}}, indent=1)

    def _request_header(self, body: bytes):
        request = parse_json(body)
        signature = request.get("signature_name", "")
        if not isinstance(signature, str):
            raise invalid("'signature_name' key must be a string value.")
        return request, signature

    def _predict(self, name, version, label, body) -> str:
        request, signature = self._request_header(body)
        proto = predict_pb2.PredictRequest()
        model_spec(proto.model_spec, name, version, label, signature)
        servable = self.manager.resolve(proto.model_spec)
        key = signature or "serving_default"
        if key not in servable.signature_defs or key == "__saved_model_init_op":
            raise invalid(f'Serving signature name: "{key}" not found in signature def')
        inputs = servable.signature_defs[key].inputs
        dtypes = {alias: tf.as_dtype(info.dtype) for alias, info in inputs.items()}
        if "instances" in request:
            row = True
            arrays = self._from_rows(request["instances"], dtypes)
        elif "inputs" in request:
            row = False
            arrays = self._from_columns(request["inputs"], dtypes)
        else:
            raise invalid("Missing 'inputs' or 'instances' key")
        for alias, array in arrays.items():
            proto.inputs[alias].CopyFrom(tf.make_tensor_proto(array, dtype=dtypes[alias]))
        response = inference.predict(self.manager, proto)
        outputs = {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}
        if not row:
            if len(outputs) == 1:
                (alias, value), = outputs.items()
                return '{"outputs":' + _format(_values(value, alias)) + "}"
            return '{"outputs":' + _format({a: _values(v, a) for a, v in outputs.items()}) + "}"
        sizes = set()
        for alias, value in outputs.items():
            if value.ndim == 0:
                raise invalid(f"Tensor name: {alias} has no shape information ")
            sizes.add(value.shape[0])
        if len(sizes) > 1:
            raise invalid("Batch size for output tensors must be the same: " + str(sorted(sizes)))
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return '{"predictions":' + _format(_values(value, alias)) + "}"
        n = sizes.pop() if sizes else 0
        rows = [{a: _values(v[i], a) for a, v in outputs.items()} for i in range(n)]
        return '{"predictions":' + _format(rows) + "}"

    @staticmethod
    def _from_rows(instances, dtypes) -> Dict[str, np.ndarray]:
        if not isinstance(instances, list) or not instances:
            raise invalid("'instances' must be a non-empty JSON array")
        names = set(dtypes)
        columns: Dict[str, List[Any]] = {n: [] for n in names}
        for instance in instances:
            named = isinstance(instance, dict) and not (set(instance) == {"b64"})
            if len(names) > 1 or named:
                if not isinstance(instance, dict) or set(instance) != names:
                    raise invalid(f"Expected the object keys of each instance to be the input names "
                                  f"{sorted(names)}, got {sorted(instance) if isinstance(instance, dict) else instance}")
                for n in names:
                    columns[n].append(instance[n])
            else:
                columns[next(iter(names))].append(instance)
        arrays = {n: _to_array(v, dtypes[n]) for n, v in columns.items()}
        for n, array in arrays.items():
            if array.dtype == object and any(isinstance(x, list) for x in array.ravel()):
                raise invalid(f"Expecting tensors of input '{n}' to be of the same shape in every instance")
        return arrays

    @staticmethod
    def _from_columns(inputs, dtypes) -> Dict[str, np.ndarray]:
        names = set(dtypes)
        if isinstance(inputs, dict) and set(inputs) != {"b64"}:
            for n in sorted(names):
                if n not in inputs:
                    raise invalid(f"Missing named input: {n} in 'inputs' object.")
            return {n: _to_array(inputs[n], dtypes[n]) for n in names}
        if len(names) != 1:
            raise invalid("'inputs' must be an object keyed by input name when the signature has several inputs")
        (n,) = names
        return {n: _to_array(inputs, dtypes[n])}

    def _examples(self, request: dict, verb: str):
        if "examples" not in request:
            raise invalid(f"JSON Value: {json.dumps(request)} When method is {verb}, key 'examples' is expected "
                          f"and was not found")
        examples = request["examples"]
        if not isinstance(examples, list):
            raise invalid("'examples' must be a JSON array of objects")
        from tensorflow_serving.apis import input_pb2

        proto = input_pb2.Input()
        if "context" in request:
            target = proto.example_list_with_context
            _fill_example(target.context, request["context"])
        else:
            target = proto.example_list
        for example in examples:
            _fill_example(target.examples.add(), example)
        return proto

    def _classify(self, name, version, label, body) -> str:
        request, signature = self._request_header(body)
        proto = classification_pb2.ClassificationRequest()
        model_spec(proto.model_spec, name, version, label, signature)
        proto.input.CopyFrom(self._examples(request, "classify"))
        response = inference.classify(self.manager, proto)
        results = [[[c.label, np.float32(c.score)] for c in row.classes] for row in response.result.classifications]
        return '{"results":' + _format(results) + "}"

    def _regress(self, name, version, label, body) -> str:
        request, signature = self._request_header(body)
        proto = regression_pb2.RegressionRequest()
        model_spec(proto.model_spec, name, version, label, signature)
        proto.input.CopyFrom(self._examples(request, "regress"))
        response = inference.regress(self.manager, proto)
        return '{"results":' + _format([np.float32(r.value) for r in response.result.regressions]) + "}"


def _fill_example(example, features: Any) -> None:
    if not isinstance(features, dict):
        raise invalid("Each example must be a JSON object of feature name to value(s)")
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        kinds = {_json_type(v) if not (isinstance(v, dict) and set(v) == {"b64"}) else "STRING" for v in values}
        if not values:
            continue
        if len(kinds) != 1 or kinds & {"NULL", "ARRAY", "OBJECT"}:
            raise invalid(f"Feature {name}: values must all be numbers, integers, booleans or strings (got "
                          f"{json.dumps(value)})")
        kind = kinds.pop()
        feature = example.features.feature[name]
        if kind == "DOUBLE":
            feature.float_list.value.extend(values)
        elif kind in ("INT", "BOOL"):
            feature.int64_list.value.extend(int(v) for v in values)
        else:
            feature.bytes_list.value.extend(
                base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode("utf-8") for v in values)


def make_handler(api: RestApi):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "increc-serving"

        def log_message(self, *args):  # requests are counted in metrics, not logged line by line
            pass

        def _reply(self, status: int, text: str, content_type: str) -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if api.cors:
                self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > api.max_body_bytes:
                # Read and drop the body (without keeping it) so the client gets the answer, not a reset.
                remaining = length if length <= 16 * api.max_body_bytes else 0
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                self.close_connection = True
                self._reply(413, json.dumps({"error": f"Request body of {length} bytes exceeds the limit of "
                                                      f"{api.max_body_bytes} bytes"}), "application/json")
                return
            body = self.rfile.read(length) if length else b""
            status, text, content_type = api.handle(method, self.path, body)
            self._reply(status, text, content_type)

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_OPTIONS(self):
            if not api.cors:
                self._dispatch("OPTIONS")
                return
            ok = re.match(r"https?://", self.headers.get("Origin", "")) is not None
            self.send_response(200 if ok else 400)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "POST, GET")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def serve(api: RestApi, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(api))
    server.daemon_threads = True
    return server
