"""One loaded version of a SavedModel, and running its signatures the way TF Serving does.

Signatures are taken from the SavedModel proto (what GetModelMetadata returns)
and run through `tf.saved_model.load(...).signatures`, which works for TF2
functions and TF1 graphs alike. Inputs are converted to each signature
input's dtype; TF Serving does no shape check of its own.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Iterable

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving.errors import ServingError, failed_precondition, invalid

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000


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


class Servable:
    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path)
        with tf.device(device()):
            self._loaded = tf.saved_model.load(path, tags=["serve"])
        self._functions = dict(self._loaded.signatures)

    # --- signature lookup ---
    def signature(self, key: str, api: str) -> meta_graph_pb2.SignatureDef:
        key = key or DEFAULT_SIGNATURE
        if key not in self.signature_defs or key == INIT_OP_SIGNATURE or key not in self._functions:
            if api == "predict":
                raise failed_precondition(f'Serving signature key "{key}" not found.')
            raise invalid(f"No signature was found with the name: {key}")
        return self.signature_defs[key]

    def run(self, key: str, inputs: Dict[str, np.ndarray], output_filter: Iterable[str] = ()) -> Dict[str, np.ndarray]:
        """Runs a signature on numpy inputs keyed by alias; returns outputs keyed by alias."""
        key = key or DEFAULT_SIGNATURE
        signature = self.signature_defs[key]
        tensors = {}
        for alias, value in inputs.items():
            dtype = tf.as_dtype(signature.inputs[alias].dtype)
            try:
                tensors[alias] = tf.constant(value, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise invalid(f"Tensor {alias}: cannot convert to {dtype.name}: {e}") from None
        try:
            with tf.device(device()):
                outputs = self._functions[key](**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise invalid(str(getattr(e, "message", e)).strip()) from None
        except tf.errors.OpError as e:
            raise ServingError(_grpc_code(e), e.message) from None
        wanted = list(output_filter) or list(signature.outputs)
        return {alias: outputs[alias].numpy() for alias in wanted}

    # --- warmup ---
    def warmup(self, handle_log) -> int:
        """Replays assets.extra/tf_serving_warmup_requests; any error fails the load (as in TF Serving)."""
        path = os.path.join(self.path, WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        try:
            for record in tf.data.TFRecordDataset(path):
                count += 1
                if count > MAX_WARMUP_RECORDS:
                    raise invalid(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
                log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                handle_log(self, log)
        except tf.errors.DataLossError as e:
            raise ServingError(_grpc_code(e), f"Failed to read warmup file {path}: {e.message}") from None
        return count


def _grpc_code(error: tf.errors.OpError):
    import grpc

    by_value = {c.value[0]: c for c in grpc.StatusCode}
    return by_value.get(error.error_code, grpc.StatusCode.UNKNOWN)


def load(name: str, version: int, path: str, handle_warmup=None) -> Servable:
    started = time.time()
    servable = Servable(name, version, path)
    if handle_warmup is not None:
        n = servable.warmup(handle_warmup)
        if n:
            logging.info("model %s version %d: %d warmup request(s) replayed", name, version, n)
    logging.info("model %s version %d loaded from %s in %.1fs on %s", name, version, path, time.time() - started,
                 device())
    return servable
