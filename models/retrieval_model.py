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

from typing import Dict, List, Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as F

# Each positive row's softmax is over the items of its block of this many rows (its in-batch negatives).
NEGATIVES_BLOCK = 1024


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

    def compute_loss(self, inputs, training: bool = False, max_rows: Optional[int] = None) -> tf.Tensor:
        """In-batch softmax over the items of each block of NEGATIVES_BLOCK rows, counted on positive rows
        only (label as the weight): the sum of the TFRS task's loss over the blocks.

        The task scores every row against every row of what it is given, so its cost grows with the
        square of the batch; large spans train in large batches (max_steps_per_epoch), and at 4,500 rows
        a step took 280 ms instead of 4 x 18 ms. A batch of at most a block is one block: the loss is the
        task's own. `max_rows`, where the caller knows no batch is larger, lets a batch that fits one block
        skip the loop: a loop's gradient costs ~0.3 s to trace, most of a small span's training.
        """
        features, labels = inputs[0], inputs[1]
        weight = tf.cast(tf.reshape(labels, [-1]), tf.float32)
        ids = features[F.index_name(F.ITEM_ID)]
        queries, candidates = self.query(features), self.candidates(ids)
        if max_rows is not None and max_rows <= NEGATIVES_BLOCK:
            return self.task(queries, candidates, sample_weight=weight, compute_metrics=False, candidate_ids=ids)
        rows = tf.shape(queries)[0]
        blocks = (rows + NEGATIVES_BLOCK - 1) // NEGATIVES_BLOCK

        def block_loss(i, total):
            at = tf.range(i * NEGATIVES_BLOCK, tf.minimum((i + 1) * NEGATIVES_BLOCK, rows))
            return i + 1, total + self.task(tf.gather(queries, at), tf.gather(candidates, at),
                                            sample_weight=tf.gather(weight, at), compute_metrics=False,
                                            candidate_ids=tf.gather(ids, at))

        return tf.while_loop(lambda i, _: i < blocks, block_loss, [tf.constant(0), tf.constant(0.0)])[1]

    def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """Dot-product score of each row's (user, item)."""
        return tf.reduce_sum(self.query(features) * self.candidates(features[F.index_name(F.ITEM_ID)]), axis=1)


def build(vocab_rows: Dict[str, int], dim: int) -> RetrievalModel:
    return RetrievalModel(vocab_rows[F.USER_ID], vocab_rows[F.ITEM_ID], dim)


def weights_by_name(model: RetrievalModel) -> Dict[str, tf.Variable]:
    return {f"{layer.name}.{i}": w for layer in model.named_layers() for i, w in enumerate(layer.weights)}
