"""The TFRS retrieval (two-tower) model that picks `recommend`'s candidates.

A query tower (the user id's embedding, plus the mean of the candidate
tower's embeddings of the user's recent items, which Transform maps into
item rows only with the `recent_items` setting) and a candidate tower (the item id's embedding), scored by their
dot product and trained with TFRS' Retrieval task (in-batch softmax) on the
positive rows of the same batches as the ranking model, in the same steps.
Cheap to score against a whole catalog (one matrix product), so it narrows a
catalog of any size to a few hundred candidates that the ranking model then
orders. Layers have fixed names: warm start matches
weights by name, like the ranking model's.
"""
from __future__ import annotations

from typing import Dict, List

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as F


class RetrievalModel(tfrs.models.Model):
    def __init__(self, user_rows: int, item_rows: int, dim: int):
        super().__init__(name="retrieval_model")
        self.query_tower = tf.keras.layers.Embedding(user_rows, dim, name="retrieval_user_embedding")
        self.candidate_tower = tf.keras.layers.Embedding(item_rows, dim, name="retrieval_item_embedding")
        # The same item twice in a batch is not its own negative.
        self.task = tfrs.tasks.Retrieval(remove_accidental_hits=True)

    def named_layers(self) -> List[tf.keras.layers.Layer]:
        return [self.query_tower, self.candidate_tower]

    def query(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """The user's embedding, plus the mean embedding of their recent items: the candidate tower's own,
        so "recently watched X" points at items near X, and a user the id table has not learnt (new,
        or with few rows) is placed by what they watched."""
        query = self.query_tower(features[F.index_name(F.USER_ID)])
        for feature in F.ITEM_LIST_FEATURES:
            items = features.get(F.item_rows_name(feature))
            if items is None:
                continue
            pooled = tf.math.unsorted_segment_mean(self.candidates(items.values), items.indices[:, 0],
                                                   tf.shape(query, out_type=tf.int64)[0])  # 0 for no items
            query = query + pooled
        return query

    def candidates(self, item_index: tf.Tensor) -> tf.Tensor:
        return self.candidate_tower(item_index)

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """In-batch softmax over the batch's items, counted on positive rows only (label as the weight)."""
        features, labels = inputs[0], inputs[1]
        weight = tf.cast(tf.reshape(labels, [-1]), tf.float32)
        return self.task(self.query(features),
                         self.candidates(features[F.index_name(F.ITEM_ID)]),
                         sample_weight=weight, compute_metrics=False,
                         candidate_ids=features[F.index_name(F.ITEM_ID)])

    def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """Dot-product score of each row's (user, item)."""
        return tf.reduce_sum(self.query(features) * self.candidates(features[F.index_name(F.ITEM_ID)]), axis=1)


def build(vocab_rows: Dict[str, int], dim: int) -> RetrievalModel:
    return RetrievalModel(vocab_rows[F.USER_ID], vocab_rows[F.ITEM_ID], dim)


def weights_by_name(model: RetrievalModel) -> Dict[str, tf.Variable]:
    return {f"{layer.name}.{i}": w for layer in model.named_layers() for i, w in enumerate(layer.weights)}
