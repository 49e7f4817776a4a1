"""Server-side batching of Predict calls: concurrent requests for one version and signature run as one call.

TF Serving's BatchingParameters, with its defaults for fields a
`--batching_parameters_file` leaves out (max_batch_size 1000,
batch_timeout_micros 0, max_enqueued_batches 10) except num_batch_threads,
which is 1 here: with Python's GIL a second batch thread only adds thread
switches (README, Serving). Calls merge when they agree on servable,
signature, output filter, dtypes and non-batch dimensions; others run alone.

Batches are formed on the event loop that received the requests and handed
to a batch thread whole, so a batch costs two thread wake-ups (one there,
one back) whatever its size; handing over each request woke the batch
thread once per request, which on a busy machine cost more than the model.
A free thread gets what is queued at once, unless requests are still
arriving: then the batch waits (a loop iteration at a time, at most
MAX_GATHER_SECONDS) for the others, so a lone client waits for nobody.
With batch_timeout_micros above 0 a batch waits that long for company,
as in TF Serving. When a merged call fails or its outputs cannot be split
by rows, each call is rerun alone, so one bad request fails only itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import re
import threading
import time
from typing import List, Optional

import grpc

from serving import tensors
from serving.errors import ServingError

BATCHES_MERGED = "/tensorflow/serving/batching_session/merged_batch_count"
REQUESTS_MERGED = "/tensorflow/serving/batching_session/merged_request_count"
WRAPPED_RUNS = "/tensorflow/serving/batching_session/wrapped_run_count"
MAX_GATHER_SECONDS = 0.002  # how long a batch may wait for requests that are still arriving


@dataclasses.dataclass
class BatchingParameters:
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = 1
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
    __slots__ = ("call", "future", "key", "rows", "enqueued")

    def __init__(self, call, future: asyncio.Future):
        self.call, self.future = call, future
        self.enqueued = time.monotonic()
        self.key, self.rows = _merge_key(call)


def _merge_key(call):
    """(what must agree for calls to merge, rows); a key of None never merges."""
    firsts = set()
    parts = []
    for alias, (dtype, dims) in call.layout().items():
        if not dims or dtype is None:
            return None, 1
        firsts.add(dims[0])
        parts.append((alias, dtype, tuple(dims[1:])))
    if len(firsts) != 1:
        return None, 1
    return (id(call.servable), call.signature.key, call.outputs, tuple(sorted(parts))), firsts.pop()


class Batcher:
    """Use from the event loop's thread: `await batcher.submit(call)` gives the call's outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, params: Optional[BatchingParameters] = None, metrics=None,
                 on_run=None):
        self.loop = loop
        self.params = params or BatchingParameters()
        self.metrics = metrics
        self._on_run = on_run or (lambda call, seconds: None)
        self._queue: List[_Item] = []
        self._queued_rows = 0
        self._busy = 0  # batches handed to threads and not back yet
        self._scheduled = False
        self._arrivals = 0  # submissions so far, and at the last look
        self._seen = 0
        self._work: "queue.SimpleQueue" = queue.SimpleQueue()
        self.batches_run = 0
        self._threads = [threading.Thread(target=self._work_loop, name=f"batch-{i}", daemon=True)
                         for i in range(self.params.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    # --- on the event loop ---
    def submit(self, call) -> asyncio.Future:
        item = _Item(call, self.loop.create_future())
        if self._queued_rows + item.rows > self.params.max_enqueued_batches * self.params.max_batch_size \
                and self._queue:
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               "The batch scheduling queue to which this task was submitted is full")
        self._queue.append(item)
        self._queued_rows += item.rows
        self._arrivals += 1
        self._schedule()
        return item.future

    def _schedule(self, delay: float = 0.0) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        if delay > 0:
            self.loop.call_later(delay, self._flush)
        else:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hands the next batch to a free thread, or waits a little for the requests still coming."""
        self._scheduled = False
        if not self._queue or self._busy >= len(self._threads):
            return  # a thread coming back calls this again
        head = self._queue[0]
        waited = time.monotonic() - head.enqueued
        arriving = self._arrivals - self._seen > 0 and len(self._queue) > 1
        self._seen = self._arrivals
        timeout = self.params.batch_timeout_micros / 1e6
        if head.key is not None and self._rows_like(head) < self.params.max_batch_size:
            if waited < timeout:
                self._schedule(timeout - waited)
                return
            if arriving and waited < MAX_GATHER_SECONDS:
                self._schedule()
                return
        batch, rows = [head], head.rows
        if head.key is not None:
            rest = []
            for item in self._queue[1:]:
                if item.key == head.key and rows + item.rows <= self.params.max_batch_size:
                    batch.append(item)
                    rows += item.rows
                else:
                    rest.append(item)
            self._queue = rest
        else:
            self._queue = self._queue[1:]
        self._queued_rows -= rows
        self._busy += 1
        self._work.put(batch)
        if self._queue:
            self._schedule()

    def _rows_like(self, head: _Item) -> int:
        return sum(item.rows for item in self._queue if item.key == head.key)

    def _settle(self, batch: List[_Item], results: list) -> None:
        self._busy -= 1
        for item, (outputs, error) in zip(batch, results):
            if item.future.done():  # the caller gave up (deadline, disconnect)
                continue
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(outputs)
        if self._queue:
            self._schedule()

    def stop(self) -> None:
        for _ in self._threads:
            self._work.put(None)

    # --- in a batch thread ---
    def _work_loop(self) -> None:
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                results = self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every caller gets an answer
                results = [(None, e)] * len(batch)
            try:
                self.loop.call_soon_threadsafe(self._settle, batch, results)
            except RuntimeError:
                return  # the loop is closed: the server is stopping

    def _run_alone(self, item: _Item):
        if self.metrics is not None:
            self.metrics.increment(WRAPPED_RUNS, {})
        started = time.perf_counter()
        try:
            outputs = item.call.run()
        except Exception as e:  # noqa: BLE001 - the caller gets it
            return None, e
        self._on_run(item.call, time.perf_counter() - started)
        return outputs, None

    def _run(self, batch: List[_Item]) -> list:
        if len(batch) == 1:
            return [self._run_alone(batch[0])]
        first = batch[0].call
        started = time.perf_counter()
        try:
            merged = {alias: tensors.concat(alias, [item.call.source(alias) for item in batch], first.max_bytes)
                      for alias in first.layout()}
            outputs = first.signature(merged, first.outputs)
            total = sum(item.rows for item in batch)
            if any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
                raise ValueError("outputs do not have the batch's rows")
        except Exception as e:  # noqa: BLE001 - rerun alone so only a bad request fails
            logging.debug("merged call of %d requests failed (%s); running them one by one", len(batch), e)
            return [self._run_alone(item) for item in batch]
        seconds = time.perf_counter() - started
        self.batches_run += 1
        if self.metrics is not None:
            self.metrics.increment(BATCHES_MERGED, {"model_name": first.name})
            self.metrics.increment(REQUESTS_MERGED, {"model_name": first.name}, len(batch))
            self.metrics.increment(WRAPPED_RUNS, {})
        results, start = [], 0
        for item in batch:
            end = start + item.rows
            self._on_run(item.call, seconds)
            results.append(({alias: value[start:end] for alias, value in outputs.items()}, None))
            start = end
        return results
