"""preprocessing_fn for Transform.

Raw features follow the curated schema: user_id, item_id, timestamp and label
are dense with one value; every side feature is variable length (a
categorical may hold several `|`-separated values, a numeric may be missing).
"""
from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_transform as tft

from models import features as F
from models import spans, vocabulary
from models.training import TrainingSettings



def _dense_1d(x):
    if isinstance(x, tf.SparseTensor):
        x = tf.sparse.to_dense(x)
    return tf.reshape(x, [-1])


def _map_values(x: tf.SparseTensor, fn) -> tf.SparseTensor:
    return tf.SparseTensor(indices=x.indices, values=fn(x.values), dense_shape=x.dense_shape)


def preprocessing_fn(inputs, custom_config):
    store_dir = custom_config["vocab_dir"]
    span = spans.span_of(custom_config)
    settings = TrainingSettings(**custom_config.get("settings", {}))
    oov_buckets = settings.oov_buckets
    outputs = {F.LABEL: tf.cast(_dense_1d(inputs[F.LABEL]), tf.int64)}

    id_vocabularies = {}
    for feature in F.ID_FEATURES:
        values = _dense_1d(inputs[feature])
        path, previous_size = vocabulary.append_only_vocabulary(values, feature, store_dir, span)
        id_vocabularies[feature] = path
        index = vocabulary.lookup(values, path, oov_buckets)
        outputs[F.index_name(feature)] = index
        if feature == F.USER_ID:
            # New = not in the vocabulary as it stood before this span.
            outputs[F.USER_IS_NEW] = tf.cast(
                tf.logical_or(index < oov_buckets, index - oov_buckets >= previous_size), tf.int64)

    for feature in sorted(inputs):
        # Side features the models do not read get no vocabulary and no output: on a 1M-row span the
        # unused user_recent_items (10 ids a row) cost ~11 s of Transform and ~35 s of Trainer lookups.
        if feature in F.ID_FEATURES or feature in F.NON_FEATURES or not settings.model_uses(feature):
            continue
        x = inputs[feature]
        if not isinstance(x, tf.SparseTensor):
            x = tf.sparse.from_dense(x) if x.dtype == tf.string else tf.sparse.from_dense(tf.cast(x, tf.float32))
        if x.dtype == tf.string:
            path, _ = vocabulary.append_only_vocabulary(x.values, feature, store_dir, span)
            outputs[F.index_name(feature)] = _map_values(
                x, lambda v, p=path: vocabulary.lookup(v, p, oov_buckets))
            if feature in F.ITEM_LIST_FEATURES:
                item_vocabulary = id_vocabularies[F.ITEM_ID]
                outputs[F.item_rows_name(feature)] = _map_values(
                    x, lambda v, p=item_vocabulary: vocabulary.lookup(v, p, oov_buckets))
        else:
            z = tft.scale_to_z_score(tf.cast(x, tf.float32))
            # A missing value becomes the mean (0 after scaling); the first value counts.
            dense = tf.pad(tf.sparse.to_dense(z), [[0, 0], [0, 1]])
            outputs[F.numeric_name(feature)] = tf.reshape(dense[:, :1], [-1, 1])
    return outputs


def vocabulary_assets(transform_output_dir: str):
    """{feature: vocabulary file} from a Transform output directory."""
    assets = os.path.join(transform_output_dir, "transform_fn", "assets")
    found = {}
    for name in tf.io.gfile.listdir(assets) if tf.io.gfile.exists(assets) else []:
        if name.endswith(".vocab"):
            found[name[: -len(".vocab")]] = os.path.join(assets, name)
    return found
