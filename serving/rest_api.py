"""TF Serving's REST API over the same handlers as gRPC (tf-serving-reference.md §1).

Routing, dispatch, status codes and error texts are TF Serving's: only paths
fully matching `(?i)/v1/.*` reach the API (anything else gets the web
server's own 404), the path is matched with its query string, errors are
`{"error": ...}` with TF Serving's HTTP status for the code. A request body
becomes the same checked call gRPC makes (serving/json_tensors.py decodes
it), so Predict over REST resolves its version once and goes through the
batcher like gRPC Predict does.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2, model_pb2,
                                     regression_pb2)

from serving import inference, json_tensors
from serving.errors import ServingError, invalid
from serving.inference import PredictCall
from serving.metrics import EXAMPLE_COUNT_TOTAL, EXAMPLE_COUNTS, REQUEST_COUNT, REQUEST_LATENCY
from serving.servable import DEFAULT_SIGNATURE

# RE2's \d is ASCII; so is re.ASCII's.
POST_PATH = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
                       r":(classify|regress|predict)", re.ASCII)
GET_PATH = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
                      re.ASCII)
V1 = re.compile(r"(?i)/v1/.*", re.ASCII | re.DOTALL)
NOT_FOUND_PAGE = b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"
JSON = "application/json"
INLINE_BYTES = 64 << 10  # larger bodies are decoded off the event loop
INT64_MAX = 2 ** 63 - 1
CORS_HEADERS = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, GET"),
                ("Access-Control-Allow-Headers", "Content-Type")]

Response = Tuple[int, bytes, str, List[Tuple[str, str]]]


def error_response(status: int, message: str) -> Response:
    return status, json_tensors.error_text(message).encode(), JSON, []


def _unquote(text: Optional[str]) -> Optional[str]:
    return None if text is None else urllib.parse.unquote(text, errors="replace")


def model_spec(spec, name: str, version: Optional[str], label: Optional[str], signature: str = "") -> None:
    spec.name = name
    if version is not None:
        number = int(version)
        if number > INT64_MAX:
            raise invalid(f"Failed to convert version: {version} to numeric.")
        spec.version.value = number
    elif label is not None:
        spec.version_label = label
    if signature:
        spec.signature_name = signature


class RestApi:
    def __init__(self, manager, metrics, executor, timeout_ms: int = 30000, monitoring_path: Optional[str] = None,
                 cors: bool = False, max_body_bytes: int = 64 << 20, method_check: bool = False):
        self.manager, self.metrics, self.executor = manager, metrics, executor
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        self.monitoring_path, self.cors, self.max_body_bytes = monitoring_path, cors, max_body_bytes
        self.method_check = method_check

    @property
    def extra_headers(self) -> List[Tuple[str, str]]:
        return CORS_HEADERS if self.cors else []

    async def handle(self, method: str, path: str, headers: Dict[str, str], body: bytes) -> Response:
        if method == "OPTIONS" and self.cors:
            ok = re.match(r"https?://", headers.get("origin", "")) is not None
            return (200 if ok else 400), b"", "text/plain", []
        if self.monitoring_path is not None and path.split("?", 1)[0] == self.monitoring_path:
            if path != self.monitoring_path:
                return 400, f"Unexpected path: {path}. Should be {self.monitoring_path}".encode(), "text/plain", []
            return 200, self.metrics.render().encode(), "text/plain", []
        if not V1.fullmatch(path):
            return 404, NOT_FOUND_PAGE, "text/html", []
        started = time.perf_counter()
        model_name, api = "", ""
        try:
            post = POST_PATH.fullmatch(path) if method == "POST" else None
            get = GET_PATH.fullmatch(path) if method == "GET" and post is None else None
            if post is not None and post.group(4) in ("classify", "regress", "predict"):
                name, version, label, api = post.groups()
                model_name = _unquote(name)
                text = await self._post(api, model_name, version, _unquote(label), body)
            elif get is not None:
                name, version, label, metadata = get.groups()
                if name is None:
                    raise invalid("Missing model name in request.")
                model_name = _unquote(name)
                text = self._metadata(model_name, version, _unquote(label)) if metadata else \
                    self._status(model_name, version)
            else:
                raise invalid(f"Malformed request: {method} {path}")
        except ServingError as e:
            self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": e.code.name})
            return error_response(e.http_status, e.message)
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server keeps serving
            logging.exception("REST %s %s failed", method, path)
            self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": "INTERNAL"})
            return error_response(500, f"Internal error: {type(e).__name__}")
        self.metrics.increment(REQUEST_COUNT, {"model_name": model_name, "status": "OK"})
        self.metrics.observe(REQUEST_LATENCY, {"model_name": model_name, "API": api, "entrypoint": "REST"},
                             (time.perf_counter() - started) * 1e6)
        return 200, text.encode("utf-8", "surrogateescape"), JSON, []

    async def _wait(self, future: asyncio.Future):
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    async def _post(self, verb: str, name: str, version: Optional[str], label: Optional[str], body: bytes) -> str:
        if verb == "predict":
            if len(body) > INLINE_BYTES:
                call, row = await self._wait(self.executor.blocking(self._predict_call, name, version, label, body))
            else:
                call, row = self._predict_call(name, version, label, body)
            outputs = await self._wait(self.executor.predict(call))
            return json_tensors.predict_text(outputs, row)
        if len(body) > INLINE_BYTES:
            call = await self._wait(self.executor.blocking(self._example_call, verb, name, version, label, body))
        else:
            call = self._example_call(verb, name, version, label, body)
        self.metrics.observe(EXAMPLE_COUNTS, {"model": name}, len(call.records))
        self.metrics.increment(EXAMPLE_COUNT_TOTAL, {"model": name}, len(call.records))
        response = await self._wait(self.executor.blocking(call.run))
        if verb == "classify":
            return json_tensors.classify_text(response.result)
        return json_tensors.regress_text(response.result)

    # --- request bodies -> checked calls (TF Serving's order: JSON, signature_name, model, signature, tensors) ---
    def _predict_call(self, name, version, label, body) -> Tuple[PredictCall, bool]:
        request = json_tensors.parse_json(body)
        signature_name = json_tensors.signature_name(request)
        spec = model_pb2.ModelSpec()
        model_spec(spec, name, version, label, signature_name)
        servable = self.manager.resolve(spec)
        key = signature_name or DEFAULT_SIGNATURE
        if key not in servable.signature_defs:
            raise invalid(f'Serving signature name: "{key}" not found in signature def')
        signature = servable.signatures.get(key)
        if signature is None or not signature.input_dtypes:
            raise invalid(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
        arrays, row = json_tensors.predict_arrays(request, signature.input_dtypes)
        inference.check_predict_inputs(signature, arrays)
        for alias, array in arrays.items():
            signature.check(alias, array.shape, signature.input_dtypes[alias])
        return PredictCall(name, servable, signature, (), arrays=arrays, max_bytes=self.max_body_bytes), row

    def _example_call(self, verb, name, version, label, body) -> inference.ExampleCall:
        request = json_tensors.parse_json(body)
        signature_name = json_tensors.signature_name(request)
        proto = (classification_pb2.ClassificationRequest() if verb == "classify"
                 else regression_pb2.RegressionRequest())
        model_spec(proto.model_spec, name, version, label, signature_name)
        json_tensors.fill_input(proto.input, request)
        return inference.prepare_examples(self.manager, proto, verb, self.method_check)

    # --- GET ---
    def _status(self, name: str, version: Optional[str]) -> str:
        request = get_model_status_pb2.GetModelStatusRequest()
        model_spec(request.model_spec, name, version, None)  # a label is ignored, as in TF Serving
        response = inference.get_model_status(self.manager, request)
        return json_format.MessageToJson(response, preserving_proto_field_name=True,
                                         including_default_value_fields=True)

    def _metadata(self, name: str, version: Optional[str], label: Optional[str]) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        model_spec(request.model_spec, name, version, label)
        response = inference.get_model_metadata(self.manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        spec = {"name": response.model_spec.name, "signature_name": "",
                "version": str(response.model_spec.version.value)}
        metadata = json_format.MessageToDict(signature_map, preserving_proto_field_name=True,
                                             including_default_value_fields=True)
        return json.dumps({"model_spec": spec, "metadata": {"signature_def": metadata}}, indent=1)
