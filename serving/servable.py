"""One loaded version of a SavedModel, and calling its signatures on the request path.

Signatures come from the SavedModel proto (what GetModelMetadata returns) and
run through `tf.saved_model.load(...).signatures`, which works for TF2
functions and TF1 graphs alike. Everything a request needs is computed once
per (version, signature) at load: the input dtypes and shapes, the flat
argument order and the captured variable handles, so a call goes straight to
the function's graph. That skips TF's per-call argument binding, about half
of a batch-1 call's Python time, and is why inputs are checked here instead:
dtypes must match exactly (TF Serving's Session::Run refuses others) and
TF2 signatures keep their declared shapes.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Dict, List, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving.errors import ServingError, failed_precondition, grpc_code, invalid
from serving.tensors import dtype_name

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
PREDICT_METHOD = "tensorflow/serving/predict"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
MAX_COMBINED_CALLS = 16  # MultiInference functions kept per version


def device() -> str:
    """Where models run: the first GPU TensorFlow sees, else the CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/CPU:0"


def read_signature_defs(path: str) -> Dict[str, meta_graph_pb2.SignatureDef]:
    pb = os.path.join(path, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(pb, "rb") as f:
        saved_model.ParseFromString(f.read())
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags or len(saved_model.meta_graphs) == 1:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{pb}: no MetaGraph tagged 'serve'")


def clean_message(message: str) -> str:
    """A TF error's message without the Python stack eager TF adds ("Detected at node ... File ...")."""
    kept, in_stack = [], False
    for line in message.splitlines():
        if line.startswith("Graph execution error:"):
            continue
        if line.startswith("Detected at node") or line.startswith("Detected unsupported operations"):
            in_stack = True
            continue
        if in_stack and (not line.strip() or line.startswith("  ")):
            continue
        in_stack = False
        kept.append(line)
    text = "\n".join(kept).strip()
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text) or message.strip()


def _op_error(e: Exception) -> ServingError:
    if isinstance(e, tf.errors.OpError):
        return ServingError(grpc_code(e.error_code), clean_message(e.message))
    return invalid(clean_message(str(getattr(e, "message", e))))


class Signature:
    """One SignatureDef of a loaded version, with what calling it needs precomputed."""

    def __init__(self, key: str, definition: meta_graph_pb2.SignatureDef, function):
        self.key, self.definition = key, definition
        self.method_name = definition.method_name
        self.input_dtypes = {alias: info.dtype for alias, info in definition.inputs.items()}
        self.output_aliases = sorted(definition.outputs)
        self._function = function
        args, kwargs = function.structured_input_signature
        self._shapes = {alias: (None if spec.shape.rank is None else tuple(spec.shape.as_list()))
                        for alias, spec in kwargs.items() if isinstance(spec, tf.TensorSpec)}
        # The flat argument order is nest's order of the keyword arguments.
        self._order = tf.nest.flatten({alias: alias for alias in kwargs})
        atomic = getattr(function, "_inference_function", None)
        direct = (not args and len(self._shapes) == len(kwargs) and atomic is not None
                  and hasattr(atomic, "call_preflattened"))
        self._call = atomic.call_preflattened if direct else None
        self._captured = list(function.captured_inputs) if direct else []

    def check(self, alias: str, dims, dtype: int) -> None:
        """What Session::Run or the function's input signature would refuse, as INVALID_ARGUMENT."""
        expected = self.input_dtypes[alias]
        if dtype != expected:
            raise invalid(f"Expects arg[{alias}] to be {dtype_name(expected)} but {dtype_name(dtype)} is provided")
        shape = self._shapes.get(alias)
        if shape is not None and (len(shape) != len(dims) or
                                  any(d is not None and d != n for d, n in zip(shape, dims))):
            wanted = "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
            raise invalid(f"Input {alias} of signature {self.key} must have shape {wanted}, got {list(dims)}")

    def __call__(self, arrays: Dict[str, np.ndarray], outputs: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Runs on numpy inputs keyed by alias (already checked); returns numpy outputs keyed by alias."""
        try:
            tensors = {alias: tf.constant(value) if value.dtype != object else tf.constant(value, tf.string)
                       for alias, value in arrays.items()}
            if self._call is not None:
                result = self._call([tensors[alias] for alias in self._order] + self._captured)
            else:
                result = self._function(**tensors)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise _op_error(e) from None
        return {alias: result[alias].numpy() for alias in (outputs or self.output_aliases)}


class Servable:
    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path)
        with tf.device(device()):
            self._loaded = tf.saved_model.load(path, tags=["serve"])
        functions = dict(self._loaded.signatures)
        self.signatures = {key: Signature(key, definition, functions[key])
                           for key, definition in self.signature_defs.items()
                           if key in functions and key != INIT_OP_SIGNATURE}
        self._combined: Dict[tuple, object] = {}
        self._combined_lock = threading.Lock()

    def signature(self, key: str, api: str) -> Signature:
        key = key or DEFAULT_SIGNATURE
        found = self.signatures.get(key)
        if found is None:
            if api == "predict":
                raise failed_precondition(f'Serving signature key "{key}" not found.')
            raise invalid(f"No signature was found with the name: {key}")
        return found

    def run_combined(self, tasks: List[tuple], records: np.ndarray) -> List[Dict[str, np.ndarray]]:
        """Several example signatures on the same serialized examples in one function call (MultiInference).

        `tasks` are (signature key, output aliases). TF1 graphs are pruned
        to the union of the outputs, so shared ops run once, as in TF
        Serving's single Session::Run; TF2 signatures are called from one
        tf.function. Either way the combined function is traced once per
        set of tasks and kept.
        """
        combined = self._combined_function(tuple((key, tuple(outputs)) for key, outputs in tasks))
        try:
            results = combined(tf.constant(records, tf.string))
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise _op_error(e) from None
        return [{alias: value.numpy() for alias, value in result.items()} for result in results]

    def _combined_function(self, tasks: tuple):
        with self._combined_lock:
            function = self._combined.get(tasks)
            if function is not None:
                return function
        prune = getattr(self._loaded, "prune", None)
        if prune is not None:
            feed = self.signature_defs[tasks[0][0]].inputs
            (feed_name,) = [info.name for info in feed.values()]
            fetches = [{alias: self.signature_defs[key].outputs[alias].name for alias in outputs}
                       for key, outputs in tasks]
            pruned = prune(feed_name, fetches)

            def function(records):
                return pruned(records)
        else:
            calls = [(self.signatures[key]._function, next(iter(self.signature_defs[key].inputs)), outputs)
                     for key, outputs in tasks]

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
            def function(records):
                results = []
                for call, alias, outputs in calls:
                    result = call(**{alias: records})
                    results.append({name: result[name] for name in outputs})
                return results
        with self._combined_lock:
            if len(self._combined) >= MAX_COMBINED_CALLS:
                self._combined.pop(next(iter(self._combined)))
            self._combined[tasks] = function
        return function

    # --- warmup ---
    def warmup(self, handle_log, stopping=None) -> int:
        """Replays assets.extra/tf_serving_warmup_requests; any error fails the load (as in TF Serving).

        `stopping()` true abandons the replay between requests: a server being
        stopped does not first finish warming up a version it will never serve.
        """
        path = os.path.join(self.path, WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        try:
            for record in tf.data.TFRecordDataset(path):
                if stopping is not None and stopping():
                    raise LoadAbandoned()
                count += 1
                if count > MAX_WARMUP_RECORDS:
                    raise invalid(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
                log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                handle_log(self, log)
        except tf.errors.DataLossError as e:
            raise ServingError(grpc_code(e.error_code), f"Failed to read warmup file {path}: {e.message}") from None
        return count


class LoadAbandoned(ServingError):
    """The server is stopping; a version still loading is dropped."""

    def __init__(self):
        super().__init__(grpc.StatusCode.CANCELLED, "load abandoned: the server is shutting down")


def load(name: str, version: int, path: str, handle_warmup=None, on_warmup=None, stopping=None) -> Servable:
    started = time.time()
    servable = Servable(name, version, path)
    if handle_warmup is not None:
        warmup_started = time.time()
        status = "OK"
        try:
            n = servable.warmup(handle_warmup, stopping)
        except ServingError as e:
            status = e.code.name
            raise
        except Exception:
            status = "UNKNOWN"
            raise
        finally:
            if on_warmup is not None and os.path.exists(os.path.join(path, WARMUP_FILE)):
                on_warmup(path, status, time.time() - warmup_started)
        if n:
            logging.info("model %s version %d: %d warmup request(s) replayed", name, version, n)
    if stopping is not None and stopping():
        raise LoadAbandoned()
    logging.info("model %s version %d loaded from %s in %.1fs on %s", name, version, path, time.time() - started,
                 device())
    return servable
