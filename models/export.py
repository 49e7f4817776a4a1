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

import keyword
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as F
from models import ranking_model, retrieval_model
from models.snapshot_lookup import SnapshotLookup
from models.warm_start import WEIGHTS_ATTRIBUTE

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SCORE_BATCH = 2048
WARMUP_EXAMPLES = 4


MAX_K = 1000  # the most items one recommend row may ask for (requests are bounded)
DEFAULT_K = 10
RECOMMEND_CANDIDATES = 200  # retrieved per user for the ranking model to order


def signature_function(body, required: List[tf.TensorSpec], optional: List[Tuple[tf.TensorSpec, tf.Tensor]]):
    """A tf.function of named tensor inputs, the optional ones with default values.

    `tf.saved_model.save` records the defaults in the SignatureDef, and TF
    Serving's Predict fills an input a request leaves out from them. Python
    needs real parameter names for that, so the function is written out.
    """
    names = [s.name for s in required] + [s.name for s, _ in optional]
    bad = [n for n in names if not n.isidentifier() or keyword.iskeyword(n)]
    if bad:
        raise ValueError(f"feature names {bad} cannot be signature inputs: use letters, digits and _")
    params = names[:len(required)] + [f"{n}=_defaults[{i}]" for i, n in enumerate(names[len(required):])]
    source = (f"def signature({', '.join(params)}):\n"
              f"    return _body(dict({', '.join(f'{n}={n}' for n in names)}))\n")
    scope = {"_body": body, "_defaults": [d for _, d in optional]}
    exec(source, scope)  # noqa: S102 - names checked above; nothing user-supplied is executed
    return tf.function(scope["signature"], input_signature=required + [s for s, _ in optional], autograph=False)


class ExportModule(tf.Module):
    def __init__(self, model, tft_layer, raw_feature_spec, categorical: List[str], numeric: List[str],
                 retrieval, lookup: SnapshotLookup, owners: Dict[str, Optional[str]]):
        super().__init__()
        # The Keras model stays out of the saved object graph (a bound method is not tracked):
        # tracking it makes the save trace every layer for Keras' own loader, ~2 s per export
        # that nothing here reads. Its weights are saved through WEIGHTS_ATTRIBUTE, by name.
        self._logits = model.__call__
        self._query = retrieval.query
        # The Transform layer is a Keras model too: only what it loaded (the transform graph, its tables and
        # vocabulary assets) is tracked, so the save neither traces the layer for Keras' loader (~6 s
        # per export) nor loses the assets.
        self._apply_transform = tft_layer.__call__
        self.transform_graph = tft_layer._saved_model_loader_tracked_dict  # noqa: SLF001 - see above
        setattr(self, WEIGHTS_ATTRIBUTE, dict(ranking_model.weights_by_name(model),
                                              **retrieval_model.weights_by_name(retrieval)))
        self._categorical = list(categorical)
        self._numeric = list(numeric)
        # Clients do not send the label or the timestamp.
        self._request_spec = {k: v for k, v in raw_feature_spec.items() if k not in F.NON_FEATURES}
        self.lookup = lookup
        self._owners = dict(owners)
        index = tfrs.layers.factorized_top_k.BruteForce(name="retrieval_index")
        # The candidate tower learnt with in-batch negatives, which are drawn as often as an item is
        # interacted with, so its score is about log p(item | user) - log p(item): the log of each item's
        # recent popularity is added back (a last coordinate the query meets with a 1), which turns the
        # score into the user's log-propensity to interact with the item now. Recent, not all-time:
        # popularity moves from span to span (models/feature_snapshot.py, popularity_decay).
        prior = tf.math.log1p(tf.constant(lookup.item_popularity, tf.float32))[:, tf.newaxis]
        index.index(tf.concat([self._catalog_embeddings(retrieval), prior], axis=1),
                    tf.range(lookup.items.size, dtype=tf.int64))
        # Like the ranking model, the index (a Keras model) stays out of the object graph and only its
        # variables are tracked: saving it as a child traced its call for Keras' loader, ~5 s per export.
        self._top_k = index.__call__
        self.index_variables = list(index.variables)

    # --- scoring ---

    def _transform(self, raw: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        batch = tf.shape(raw[F.USER_ID], out_type=tf.int64)[0]
        raw = dict(raw)
        raw[F.LABEL] = tf.zeros([batch, 1], tf.int64)
        raw[F.TIMESTAMP] = tf.zeros([batch, 1], tf.int64)
        transformed = self._apply_transform(raw)
        transformed.pop(F.LABEL, None)
        return transformed

    def _score_raw(self, raw: Dict[str, tf.Tensor]) -> tf.Tensor:
        return tf.sigmoid(self._logits(self._transform(raw)))

    def _raw_from_client(self, values: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Client-form values (one per row: ids, `|`-joined categoricals, floats with NaN) -> raw features."""
        raw = {f: tf.reshape(values[f], [-1, 1]) for f in F.ID_FEATURES}
        for f in self._categorical:
            parts = tf.strings.strip(tf.strings.split(values[f], F.MULTI_VALUE_SEPARATOR))
            raw[f] = tf.ragged.boolean_mask(parts, parts != "").to_sparse()
        for f in self._numeric:
            present = tf.logical_not(tf.math.is_nan(values[f]))
            raw[f] = tf.RaggedTensor.from_row_lengths(
                tf.boolean_mask(values[f], present), tf.cast(present, tf.int64)).to_sparse()
        return raw

    def _empty(self, feature: str, rows: tf.Tensor) -> tf.Tensor:
        """No value, for each of `rows` rows."""
        if feature in self._categorical:
            return tf.fill([rows], "")
        return tf.fill([rows], float("nan"))

    def _with_given(self, feature: str, given: tf.Tensor, fallback: tf.Tensor) -> tf.Tensor:
        """The request's values where it sent one per row; the snapshot's where it sent none."""
        rows = tf.shape(fallback)[0]

        def sent():
            check = tf.debugging.assert_equal(
                tf.shape(given)[0], rows, message=f"{feature}: send one value per row, or none")
            with tf.control_dependencies([check]):
                return tf.identity(given)

        return tf.cond(tf.size(given) > 0, sent, lambda: fallback)

    def _looked_up(self, users: tf.Tensor, items: tf.Tensor) -> Dict[str, tf.Tensor]:
        rows = tf.shape(users)[0]
        found = dict(self.lookup.users.gather(self.lookup.users.rows(users)))
        found.update(self.lookup.items.gather(self.lookup.items.rows(items)))
        return {f: found[f] if f in found else self._empty(f, rows) for f in self._categorical + self._numeric}

    def _catalog_embeddings(self, retrieval) -> tf.Tensor:
        ids = self.lookup.item_ids
        chunks = []
        for start in range(0, self.lookup.items.size, SCORE_BATCH):
            items = ids[start:start + SCORE_BATCH]
            users = tf.fill(tf.shape(items), "")
            values = dict(self._looked_up(users, items), **{F.USER_ID: users, F.ITEM_ID: items})
            index = self._transform(self._raw_from_client(values))[F.index_name(F.ITEM_ID)]
            chunks.append(retrieval.candidates(index))
        return tf.concat(chunks, axis=0)

    # --- signatures ---

    def _feature_specs(self, names: List[str]) -> List[Tuple[tf.TensorSpec, tf.Tensor]]:
        """Optional inputs for side features: empty by default, which means "use the snapshot"."""
        out = []
        for f in names:
            dtype = tf.string if f in self._categorical else tf.float32
            out.append((tf.TensorSpec([None], dtype, f), tf.constant([], dtype)))
        return out

    def _serving_default(self, inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        users, items = inputs[F.USER_ID], inputs[F.ITEM_ID]
        values = self._looked_up(users, items)
        for f in self._categorical + self._numeric:
            values[f] = self._with_given(f, inputs[f], values[f])
        values.update({F.USER_ID: users, F.ITEM_ID: items})
        return {"probability": self._score_raw(self._raw_from_client(values))}

    def _recommend(self, inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Top k items for each user: retrieval narrows the catalog, the ranking model orders the rest."""
        users = inputs[F.USER_ID]
        batch = tf.shape(users)[0]
        k = tf.broadcast_to(inputs["k"], [batch])
        exclude = tf.broadcast_to(inputs["exclude_seen"], [batch])
        checks = [tf.debugging.assert_greater_equal(k, 1, message="k must be at least 1"),
                  tf.debugging.assert_less_equal(k, MAX_K, message=f"k must be at most {MAX_K}")]
        with tf.control_dependencies(checks):
            k_max = tf.cast(tf.reduce_max(tf.concat([k, [1]], 0)), tf.int64)
        lookup = self.lookup
        catalog = tf.constant(lookup.items.size, tf.int64)

        # The user's own features: snapshot, overridden by what the request sent.
        user_rows = lookup.users.rows(users)
        no_item = tf.fill([batch], "")
        looked_up = self._looked_up(users, no_item)
        user_values = {f: v for f, v in looked_up.items() if self._owners.get(f) != "item"}
        for f in list(user_values):
            if f in inputs:
                user_values[f] = self._with_given(f, inputs[f], user_values[f])

        # Retrieval over the whole catalog, seen items pushed to the bottom.
        query = self._query(self._transform(self._raw_from_client(dict(
            looked_up, **user_values, **{F.USER_ID: users, F.ITEM_ID: no_item}))))
        # Each user's seen item rows, ascending (the snapshot keeps them sorted), then rows no item has.
        seen = lookup.seen(tf.where(exclude, user_rows, -tf.ones_like(user_rows))).to_tensor(
            default_value=tf.int64.max)
        seen_count = tf.shape(seen, out_type=tf.int64)[1]
        seen_sorted = tf.concat([seen, tf.fill([batch, 1], tf.constant(tf.int64.max, tf.int64))], axis=1)
        wanted = tf.minimum(tf.maximum(k_max, RECOMMEND_CANDIDATES), catalog)
        fetched = tf.minimum(wanted + seen_count, catalog)
        query = tf.concat([query, tf.ones([batch, 1])], axis=1)  # meets the popularity coordinate
        scores, rows = self._top_k(query, k=tf.cast(fetched, tf.int32))
        # Membership by binary search: comparing every candidate with every seen item costs
        # candidates x seen, ~50 ms for a user with thousands of items.
        at = tf.minimum(tf.searchsorted(seen_sorted, rows, out_type=tf.int64), seen_count)
        excluded = tf.equal(tf.gather(seen_sorted, at, batch_dims=1), rows)
        top_retrieved, keep = tf.math.top_k(tf.where(excluded, -1e30, scores), k=tf.cast(wanted, tf.int32))
        candidates = tf.gather(rows, keep, batch_dims=1)  # [batch, wanted]
        valid = tf.logical_not(tf.gather(excluded, keep, batch_dims=1))
        # p(interacts with item | user), normalised over the user's candidates.
        propensity = tf.nn.softmax(tf.where(valid, top_retrieved, -1e30), axis=1)

        # Ranking of each user's candidates: the probability of a positive outcome if they interact.
        per_user = tf.shape(candidates)[1]
        flat_items = tf.gather(lookup.item_ids, tf.reshape(candidates, [-1]))
        flat_users = tf.repeat(users, per_user)
        values = self._looked_up(flat_users, flat_items)
        values.update({f: tf.repeat(v, per_user) for f, v in user_values.items()})
        values.update({F.USER_ID: flat_users, F.ITEM_ID: flat_items})
        positive = tf.reshape(self._score_raw(self._raw_from_client(values)), [batch, per_user])
        # What a recommendation is for: an interaction with a positive outcome.
        combined = tf.where(valid, propensity * positive, -1.0)
        top, order = tf.math.top_k(combined, k=tf.cast(tf.minimum(k_max, tf.cast(per_user, tf.int64)), tf.int32))
        ids = tf.gather(tf.gather(lookup.item_ids, candidates), order, batch_dims=1)
        # Beyond a row's own k, or once the catalog runs out: no item.
        position = tf.range(tf.shape(order, out_type=tf.int64)[1])
        filled = tf.logical_and(position[tf.newaxis, :] < tf.expand_dims(tf.cast(k, tf.int64), 1), top >= 0.0)
        return {"item_ids": tf.where(filled, ids, ""), "scores": tf.where(filled, top, 0.0)}

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        ids = [tf.TensorSpec([None], tf.string, F.USER_ID), tf.TensorSpec([None], tf.string, F.ITEM_ID)]
        features = self._categorical + self._numeric
        serving_default = signature_function(self._serving_default, ids, self._feature_specs(features))

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
            return {F.USER_IS_NEW: self._apply_transform(raw)[F.USER_IS_NEW]}

        knobs = [(tf.TensorSpec([None], tf.int32, "k"), tf.constant([DEFAULT_K], tf.int32)),
                 (tf.TensorSpec([None], tf.bool, "exclude_seen"), tf.constant([True]))]
        context = [f for f in features if self._owners.get(f) != "item"]
        recommend = signature_function(self._recommend, ids[:1], knobs + self._feature_specs(context))
        return {"serving_default": serving_default, "regress": regress, "classify": classify,
                "transform_features": transform_features, "recommend": recommend}

    def _parse(self, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return tf.io.parse_example(serialized, self._request_spec)


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
    """A TF Serving warmup file, so a fresh version's first real request is not slow: a serving_default
    request with features, one with ids alone, and a recommend request."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = serving_inputs(examples[:WARMUP_EXAMPLES], categorical, numeric)
    requests = [("serving_default", inputs),
                ("serving_default", {F.USER_ID: inputs[F.USER_ID], F.ITEM_ID: inputs[F.ITEM_ID]}),
                ("recommend", {F.USER_ID: inputs[F.USER_ID]})]
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for signature, values in requests:
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, value in values.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def call_signature(signature, **given):
    """Calls a loaded signature with the inputs given; an optional side-feature input left out is sent empty
    (the snapshot's value), as TF Serving fills it from the signature's defaults."""
    specs = signature.structured_input_signature[1]
    inputs = dict(given)
    for name, spec in specs.items():
        if name not in inputs:
            inputs[name] = tf.zeros([0], spec.dtype)
    return signature(**inputs)


def ids_and_labels(examples: List[bytes]):
    """(user_id, item_id, label) numpy arrays of serialized tf.Examples."""
    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.ITEM_ID: tf.io.FixedLenFeature([], tf.string),
            F.LABEL: tf.io.FixedLenFeature([], tf.int64)}
    parsed = tf.io.parse_example(tf.constant(examples, tf.string), spec)
    return parsed[F.USER_ID].numpy(), parsed[F.ITEM_ID].numpy(), parsed[F.LABEL].numpy()
