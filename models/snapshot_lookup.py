"""The feature snapshot inside a SavedModel: id -> row -> feature values, the catalog, the pairs seen.

Ids are hash tables initialised from asset files (copied into the SavedModel's
`assets/`); values are non-trainable variables (in its checkpoint, not its
graph), each with one extra last row: the value for an id the snapshot does
not know. Everything is plain TensorFlow, so a stock tensorflow_model_server
loads it.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import tensorflow as tf

from models.feature_snapshot import FeatureSnapshot, IdTable


def _id_table(ids: List[bytes], path: str) -> tf.lookup.StaticHashTable:
    bad = next((i for i in ids if b"\n" in i or b"\r" in i), None)
    if bad is not None:
        raise ValueError(f"id {bad!r} holds a line break; ids must be single-line text")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(b"".join(i + b"\n" for i in ids))
    initializer = tf.lookup.TextFileInitializer(
        tf.saved_model.Asset(path), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
        tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
    return tf.lookup.StaticHashTable(initializer, default_value=-1)


class IdFeatures(tf.Module):
    """One kind of id (users or items): its rows and the features of each."""

    def __init__(self, kind: str, table: IdTable, asset_dir: str):
        super().__init__(name=f"{kind}_features")
        self.size = len(table)
        self.table = _id_table(table.ids(), os.path.join(asset_dir, f"{kind}_ids.txt"))
        self.values = {}
        for f in table.categorical:
            self.values[f] = tf.Variable(np.append(table.values[f], b"").astype(object), trainable=False,
                                         dtype=tf.string, name=f)
        for f in table.numeric:
            self.values[f] = tf.Variable(np.append(table.values[f], table.defaults[f]).astype(np.float32),
                                         trainable=False, name=f)

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """Row of each id; -1 for an id the snapshot does not know."""
        return self.table.lookup(ids)

    def gather(self, rows: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Feature values of rows (-1: the unknown-id values)."""
        safe = tf.where(rows < 0, tf.cast(self.size, rows.dtype), rows)
        return {f: tf.gather(v, safe) for f, v in self.values.items()}


class SnapshotLookup(tf.Module):
    def __init__(self, snapshot: FeatureSnapshot, asset_dir: str):
        super().__init__(name="feature_snapshot")
        tf.io.gfile.makedirs(asset_dir)
        self.users = IdFeatures("user", snapshot.users, asset_dir)
        self.items = IdFeatures("item", snapshot.items, asset_dir)
        self.item_popularity = snapshot.items.recent.astype(np.float32)  # decayed interactions (export only)
        self.item_ids = tf.Variable(np.array(snapshot.items.ids(), dtype=object), trainable=False,
                                    dtype=tf.string, name="catalog")
        splits, seen = snapshot.seen_by_user()
        # One more, empty row: what an unknown user (or a request not excluding anything) has seen.
        self.seen_splits = tf.Variable(np.append(splits, splits[-1]), trainable=False, dtype=tf.int64,
                                       name="seen_splits")
        # int32: item rows fit, and this is the one table that grows with every row ever seen.
        self.seen_items = tf.Variable(seen, trainable=False, dtype=tf.int32, name="seen_items")

    def seen(self, user_rows: tf.Tensor) -> tf.RaggedTensor:
        """Item rows each user row interacted with; none for row -1."""
        seen = tf.RaggedTensor.from_row_splits(self.seen_items, self.seen_splits, validate=False)
        rows = tf.gather(seen, tf.where(user_rows < 0, tf.cast(self.users.size, user_rows.dtype), user_rows))
        return tf.cast(rows, tf.int64)
