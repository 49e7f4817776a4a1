"""Running request work off the event loop that serves gRPC and REST.

Predict goes through the Batcher when batching is on; everything else that
calls a model or blocks (Predict without batching, Classify, Regress,
MultiInference, config reloads) runs in a thread pool, whose results come
back through one mailbox drained by one loop wake-up however many arrived.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Callable, Optional

from serving.metrics import RUNTIME_LATENCY

RUNTIME = "TF1"  # TF Serving's runtime label for SavedModels run by TensorFlow


class _Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, future: asyncio.Future, result, error) -> None:
        with self._lock:
            self._items.append((future, result, error))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for future, result, error in items:
            if future.done():  # the caller gave up (deadline, disconnect)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


class Executor:
    def __init__(self, loop: asyncio.AbstractEventLoop, batcher=None, metrics=None, threads: int = 16):
        self.loop, self.batcher, self.metrics = loop, batcher, metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="serving")
        self._mailbox = _Mailbox(loop)

    def record_runtime(self, call, seconds: float, api: str = "Predict") -> None:
        if self.metrics is not None:
            self.metrics.observe(RUNTIME_LATENCY, {"model_name": call.name, "API": api, "runtime": RUNTIME},
                                 seconds * 1e6)

    def predict(self, call) -> asyncio.Future:
        """A future of a PredictCall's outputs, batched with concurrent calls when batching is on."""
        if self.batcher is not None:
            return self.batcher.submit(call)
        future = self.loop.create_future()
        self._pool.submit(self._run_call, call, future)
        return future

    def _run_call(self, call, future) -> None:
        started = time.perf_counter()
        try:
            outputs = call.run()
        except Exception as e:  # noqa: BLE001 - handed to the awaiting request
            self._mailbox.put(future, None, e)
            return
        self.record_runtime(call, time.perf_counter() - started)
        self._mailbox.put(future, outputs, None)

    def blocking(self, function: Callable, *args) -> asyncio.Future:
        """A future of `function(*args)`, run in the thread pool."""
        future = self.loop.create_future()

        def run():
            try:
                result = function(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                self._mailbox.put(future, None, e)
                return
            self._mailbox.put(future, result, None)

        self._pool.submit(run)
        return future

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_executor(loop, enable_batching: bool, batching_file: str = "", metrics=None,
                  threads: Optional[int] = None) -> Executor:
    from serving.batching import Batcher, parse_parameters

    executor = Executor(loop, None, metrics, threads or 16)
    if enable_batching:
        executor.batcher = Batcher(loop, parse_parameters(batching_file), metrics, on_run=executor.record_runtime)
    return executor
