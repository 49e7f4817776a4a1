"""Server-side batching of Predict calls: concurrent requests for one version and signature run as one call.

TF Serving's BasicBatchScheduler semantics, with its defaults for fields a
`--batching_parameters_file` leaves out (max_batch_size 1000,
batch_timeout_micros 0, num_batch_threads = CPU count, max_enqueued_batches
10): a batch thread that is free takes every queued call it can merge (same
servable, signature, output filter, dtypes and non-batch dimensions; at most
max_batch_size rows), so under load batches form while the previous one
runs and a lone request waits for nobody. A timeout above 0 makes a free
thread wait that long for company. Calls that cannot be merged run alone.
When a merged call fails or its outputs cannot be split by rows, each call
is rerun alone, so one bad request fails only itself.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
import time
from typing import Deque, List, Optional

import grpc
import numpy as np

from serving.errors import ServingError

BATCHES_MERGED = "/tensorflow/serving/batching_session/merged_batch_count"
REQUESTS_MERGED = "/tensorflow/serving/batching_session/merged_request_count"
WRAPPED_RUNS = "/tensorflow/serving/batching_session/wrapped_run_count"


@dataclasses.dataclass
class BatchingParameters:
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    max_enqueued_batches: int = 10


def parse_parameters(path: str) -> BatchingParameters:
    """A text BatchingParameters file (the tensorflow-serving-api package ships no proto for it)."""
    params = BatchingParameters()
    if not path:
        return params
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"#.*", "", f.read())
    for field in dataclasses.fields(BatchingParameters):
        match = re.search(r"\b" + field.name + r"\s*:?\s*\{\s*value\s*:\s*(\d+)\s*\}", text)
        if match:
            setattr(params, field.name, int(match.group(1)))
    if params.max_batch_size < 1 or params.num_batch_threads < 1:
        raise ValueError(f"{path}: max_batch_size and num_batch_threads must be at least 1")
    return params


class _Item:
    __slots__ = ("call", "deliver", "key", "rows", "enqueued")

    def __init__(self, call, deliver):
        self.call, self.deliver = call, deliver
        self.enqueued = time.monotonic()
        self.key, self.rows = _merge_key(call)


def _merge_key(call):
    """(what must agree for calls to merge, rows); a key of None never merges."""
    firsts = set()
    parts = []
    for alias, value in call.inputs.items():
        if value.ndim == 0:
            return None, 1
        firsts.add(value.shape[0])
        parts.append((alias, value.dtype.str, value.shape[1:]))
    if len(firsts) != 1:
        return None, 1
    return (id(call.servable), call.signature.key, call.outputs, tuple(sorted(parts))), firsts.pop()


class Batcher:
    def __init__(self, params: Optional[BatchingParameters] = None, metrics=None, on_run=None):
        self.params = params or BatchingParameters()
        self.metrics = metrics
        self._on_run = on_run or (lambda call, seconds: None)
        self._pending: Deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.batches_run = 0
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(self.params.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, call, deliver) -> None:
        """Queues a PredictCall; `deliver(outputs, error)` is called from a batch thread when it has run."""
        item = _Item(call, deliver)
        limit = self.params.max_enqueued_batches * self.params.max_batch_size
        with self._cond:
            if self._queued_rows + item.rows > limit and self._pending:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            was_empty = not self._pending
            self._pending.append(item)
            self._queued_rows += item.rows
            # Wake a thread only when there is news for it: work after none, or a full batch.
            # (Waking it per request while it waits for company costs a GIL round trip each.)
            if was_empty or self._queued_rows >= self.params.max_batch_size:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take(self) -> Optional[List[_Item]]:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            head = self._pending[0]
            timeout = self.params.batch_timeout_micros / 1e6
            if timeout > 0 and head.key is not None:
                deadline = head.enqueued + timeout
                while (not self._stopped and self._pending and self._pending[0] is head
                       and sum(i.rows for i in self._pending if i.key == head.key) < self.params.max_batch_size):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending or self._pending[0] is not head:
                    return []  # another thread took it meanwhile
            self._pending.popleft()
            batch, rows, rest = [head], head.rows, collections.deque()
            if head.key is not None:
                while self._pending:
                    item = self._pending.popleft()
                    if item.key == head.key and rows + item.rows <= self.params.max_batch_size:
                        batch.append(item)
                        rows += item.rows
                    else:
                        rest.append(item)
                self._pending = rest
            self._queued_rows -= rows
            if self._pending:
                self._cond.notify()  # what is left is another thread's
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run_alone(self, item: _Item) -> None:
        if self.metrics is not None:
            self.metrics.increment(WRAPPED_RUNS, {})
        started = time.perf_counter()
        try:
            outputs = item.call.run()
        except Exception as e:  # noqa: BLE001 - the caller gets it
            item.deliver(None, e)
            return
        self._on_run(item.call, time.perf_counter() - started)
        item.deliver(outputs, None)

    def _run(self, batch: List[_Item]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        first = batch[0].call
        started = time.perf_counter()
        try:
            merged = {alias: np.concatenate([item.call.inputs[alias] for item in batch])
                      for alias in first.inputs}
            outputs = first.signature(merged, first.outputs)
            total = sum(item.rows for item in batch)
            if any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
                raise ValueError("outputs do not have the batch's rows")
        except Exception as e:  # noqa: BLE001 - rerun alone so only a bad request fails
            logging.debug("merged call of %d requests failed (%s); running them one by one", len(batch), e)
            for item in batch:
                self._run_alone(item)
            return
        seconds = time.perf_counter() - started
        self.batches_run += 1
        if self.metrics is not None:
            name = first.name
            self.metrics.increment(BATCHES_MERGED, {"model_name": name})
            self.metrics.increment(REQUESTS_MERGED, {"model_name": name}, len(batch))
            self.metrics.increment(WRAPPED_RUNS, {})
        start = 0
        for item in batch:
            end = start + item.rows
            self._on_run(item.call, seconds)
            item.deliver({alias: value[start:end] for alias, value in outputs.items()}, None)
            start = end
