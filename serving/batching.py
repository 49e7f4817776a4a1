"""Server-side request batching (`--enable_batching`): concurrent Predict calls run as one.

Requests for the same model version and signature whose inputs agree on
every dimension but the first wait up to `batch_timeout_micros` for company,
are concatenated along the batch dimension (at most `max_batch_size` rows),
run once, and split back. Anything that cannot be merged runs alone.
"""
from __future__ import annotations

import re
import threading
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

from serving import inference
from serving.servable import DEFAULT_SIGNATURE

BATCHES_MERGED = "/tensorflow/serving/batching_session/merged_batch_count"
REQUESTS_MERGED = "/tensorflow/serving/batching_session/merged_request_count"


def parse_parameters(path: str) -> Tuple[int, float]:
    """(max_batch_size, batch timeout in seconds) from a text BatchingParameters file.

    Read from the text form: the tensorflow-serving-api package ships no
    BatchingParameters proto. TF Serving's defaults apply to absent fields.
    """
    text = ""
    if path:
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"#.*", "", f.read())

    def field(name: str, default: int) -> int:
        match = re.search(name + r"\s*:?\s*\{\s*value\s*:\s*(\d+)\s*\}", text)
        return int(match.group(1)) if match else default

    return field("max_batch_size", 32), field("batch_timeout_micros", 1000) / 1e6


class _Pending:
    def __init__(self, request, rows: int):
        self.request, self.rows = request, rows
        self.done = threading.Event()
        self.response = None
        self.error = None


class Batcher:
    def __init__(self, manager, max_batch_size: int = 32, timeout_seconds: float = 0.001, metrics=None):
        self.manager, self.metrics = manager, metrics
        self.max_batch_size, self.timeout = max_batch_size, timeout_seconds
        self._lock = threading.Lock()
        self._queues: Dict[tuple, List[_Pending]] = {}
        self.batches_run = 0  # how many merged calls ran (for tests and metrics)

    def predict(self, manager, request):
        servable = manager.resolve(request.model_spec)
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        shapes = tuple(sorted((a, tuple(d.size for d in t.tensor_shape.dim[1:]), t.dtype)
                              for a, t in request.inputs.items()))
        first_dims = {t.tensor_shape.dim[0].size for t in request.inputs.values() if t.tensor_shape.dim}
        if len(first_dims) != 1 or request.output_filter:
            return inference.predict(manager, request)
        rows = first_dims.pop()
        queue_key = (servable.name, servable.version, key, shapes)
        pending = _Pending(request, rows)
        with self._lock:
            queue = self._queues.setdefault(queue_key, [])
            queue.append(pending)
            leader = len(queue) == 1
        if leader:
            # The first request waits for others, then runs everybody queued by then.
            threading.Event().wait(self.timeout)
            with self._lock:
                batch = self._queues.pop(queue_key, [])
            self._run(manager, batch)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.response

    def _run(self, manager, batch: List[_Pending]) -> None:
        while batch:
            group, rows = [], 0
            while batch and (not group or rows + batch[0].rows <= self.max_batch_size):
                item = batch.pop(0)
                group.append(item)
                rows += item.rows
            try:
                if len(group) == 1:
                    group[0].response = inference.predict(manager, group[0].request)
                else:
                    self._run_merged(manager, group)
            except Exception as e:  # noqa: BLE001 - handed to every caller in the group
                for item in group:
                    item.error = e
            for item in group:
                item.done.set()

    def _run_merged(self, manager, group: List[_Pending]) -> None:
        from tensorflow_serving.apis import predict_pb2

        merged = predict_pb2.PredictRequest()
        merged.model_spec.CopyFrom(group[0].request.model_spec)
        for alias in group[0].request.inputs:
            parts = [tf.make_ndarray(item.request.inputs[alias]) for item in group]
            merged.inputs[alias].CopyFrom(tf.make_tensor_proto(np.concatenate(parts, axis=0)))
        response = inference.predict(manager, merged)
        self.batches_run += 1
        if self.metrics is not None:
            self.metrics.increment(BATCHES_MERGED, {"model_name": merged.model_spec.name})
            self.metrics.increment(REQUESTS_MERGED, {"model_name": merged.model_spec.name}, len(group))
        start = 0
        for item in group:
            own = predict_pb2.PredictResponse()
            own.model_spec.CopyFrom(response.model_spec)
            for alias, tensor in response.outputs.items():
                value = tf.make_ndarray(tensor)
                own.outputs[alias].CopyFrom(tf.make_tensor_proto(value[start:start + item.rows]))
            item.response = own
            start += item.rows
