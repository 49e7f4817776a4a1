"""The exported SavedModel and its signatures.

- `serving_default`: raw feature tensors, one value per example (user_id,
  item_id, each categorical side feature as a `|`-separated string, each
  numeric side feature as a float with NaN for missing) -> `probability`.
- `regress` / `classify`: serialized tf.Examples under `inputs`, the shape TF
  Serving's Regress and Classify APIs expect (`outputs`; `scores`+`classes`).
  TFMA evaluates through `regress`.
- `transform_features`: serialized tf.Examples -> `user_is_new`, for TFMA slicing.
Both raw and tf.Example paths meet in the same Transform layer and model, so
they score an interaction identically.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import tensorflow as tf

from models import features as F
from models import ranking_model
from models.warm_start import WEIGHTS_ATTRIBUTE

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SCORE_BATCH = 2048
WARMUP_EXAMPLES = 4


class ExportModule(tf.Module):
    def __init__(self, model, tft_layer, raw_feature_spec, categorical: List[str], numeric: List[str]):
        super().__init__()
        # The Keras model stays out of the saved object graph (a bound method is not tracked):
        # tracking it makes the save trace every layer for Keras' own loader, ~2 s per export
        # that nothing here reads. Its weights are saved through WEIGHTS_ATTRIBUTE, by name.
        self._logits = model.__call__
        self.tft_layer = tft_layer
        setattr(self, WEIGHTS_ATTRIBUTE, ranking_model.weights_by_name(model))
        self._categorical = list(categorical)
        self._numeric = list(numeric)
        # Clients do not send the label or the timestamp.
        self._request_spec = {k: v for k, v in raw_feature_spec.items() if k not in F.NON_FEATURES}

    def _score_raw(self, raw: Dict[str, tf.Tensor]) -> tf.Tensor:
        batch = tf.shape(raw[F.USER_ID], out_type=tf.int64)[0]
        raw = dict(raw)
        raw[F.LABEL] = tf.zeros([batch, 1], tf.int64)
        raw[F.TIMESTAMP] = tf.zeros([batch, 1], tf.int64)
        transformed = self.tft_layer(raw)
        transformed.pop(F.LABEL, None)
        return tf.sigmoid(self._logits(transformed))

    def _parse(self, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return tf.io.parse_example(serialized, self._request_spec)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        raw_specs = {F.USER_ID: tf.TensorSpec([None], tf.string, F.USER_ID),
                     F.ITEM_ID: tf.TensorSpec([None], tf.string, F.ITEM_ID)}
        raw_specs.update({f: tf.TensorSpec([None], tf.string, f) for f in self._categorical})
        raw_specs.update({f: tf.TensorSpec([None], tf.float32, f) for f in self._numeric})

        @tf.function(input_signature=[raw_specs], autograph=False)
        def serving_default(inputs):
            raw = {f: tf.reshape(inputs[f], [-1, 1]) for f in F.ID_FEATURES}
            for f in self._categorical:
                parts = tf.strings.strip(tf.strings.split(inputs[f], F.MULTI_VALUE_SEPARATOR))
                raw[f] = tf.ragged.boolean_mask(parts, parts != "").to_sparse()
            for f in self._numeric:
                present = tf.logical_not(tf.math.is_nan(inputs[f]))
                raw[f] = tf.RaggedTensor.from_row_lengths(
                    tf.boolean_mask(inputs[f], present), tf.cast(present, tf.int64)).to_sparse()
            return {"probability": self._score_raw(raw)}

        example_spec = tf.TensorSpec([None], tf.string, "inputs")

        @tf.function(input_signature=[example_spec], autograph=False)
        def regress(inputs):
            return {"outputs": self._score_raw(self._parse(inputs))}

        @tf.function(input_signature=[example_spec], autograph=False)
        def classify(inputs):
            p = self._score_raw(self._parse(inputs))
            classes = tf.tile(tf.constant([["0", "1"]]), tf.stack([tf.shape(p)[0], 1]))
            return {"scores": tf.stack([1.0 - p, p], axis=1), "classes": classes}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "examples")], autograph=False)
        def transform_features(examples):
            raw = self._parse(examples)
            batch = tf.shape(raw[F.USER_ID], out_type=tf.int64)[0]
            raw[F.LABEL] = tf.zeros([batch, 1], tf.int64)
            raw[F.TIMESTAMP] = tf.zeros([batch, 1], tf.int64)
            return {F.USER_IS_NEW: self.tft_layer(raw)[F.USER_IS_NEW]}

        # serving_default takes a dict, so its concrete function is traced from the specs.
        return {
            "serving_default": serving_default.get_concrete_function(raw_specs),
            "regress": regress,
            "classify": classify,
            "transform_features": transform_features,
        }


def score_examples(saved_model_dir: str, records: List[bytes]) -> np.ndarray:
    """Click probabilities of an exported model's `regress` signature for serialized tf.Examples."""
    regress = tf.saved_model.load(saved_model_dir).signatures["regress"]
    scores = [regress(inputs=tf.constant(records[i:i + SCORE_BATCH]))["outputs"].numpy().ravel()
              for i in range(0, len(records), SCORE_BATCH)]
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)


def labels(examples: List[bytes]) -> np.ndarray:
    """The 0/1 label of each serialized tf.Example."""
    parsed = tf.io.parse_example(tf.constant(examples, tf.string), {F.LABEL: tf.io.FixedLenFeature([], tf.int64)})
    return parsed[F.LABEL].numpy()


def serving_inputs(examples: List[bytes], categorical: List[str], numeric: List[str]) -> Dict[str, np.ndarray]:
    """serving_default inputs (numpy) for serialized tf.Examples: what a client would send."""
    spec = {f: tf.io.FixedLenFeature([], tf.string) for f in F.ID_FEATURES}
    spec.update({f: tf.io.RaggedFeature(tf.string) for f in categorical})
    spec.update({f: tf.io.RaggedFeature(tf.float32) for f in numeric})
    parsed = tf.io.parse_example(tf.constant(examples, tf.string), spec)
    out = {f: parsed[f].numpy() for f in F.ID_FEATURES}
    for f in categorical:
        out[f] = tf.strings.reduce_join(parsed[f], axis=1, separator=F.MULTI_VALUE_SEPARATOR).numpy()
    for f in numeric:
        # The first value; NaN is how a missing number is sent.
        out[f] = parsed[f].to_tensor(default_value=np.nan, shape=[None, 1]).numpy()[:, 0].astype(np.float32)
    return out


def write_warmup(saved_model_dir: str, examples: List[bytes], categorical: List[str], numeric: List[str]) -> None:
    """A TF Serving warmup file, so a fresh version's first real request is not slow."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = serving_inputs(examples[:WARMUP_EXAMPLES], categorical, numeric)
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name="serving_default"))
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())
