"""The TFRS ranking model: id embeddings + side features, a DCN-v2 cross stack beside a deep tower.

Inputs are Transform's outputs: `<id>_index` (int64 [batch]), `<cat>_index`
(sparse int64 [batch, n], averaged as an embedding bag) and `<num>_z`
(float [batch, 1]). The model returns logits; serving applies the sigmoid.
Every layer has a fixed name: warm start matches weights by those names.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as F

# Optional feature of a training batch: the soft target (label blended with a teacher's probability).
TARGET = "__distillation_target__"


@dataclasses.dataclass
class ModelSpec:
    vocab_rows: Dict[str, int]  # rows of each embedding table: oov buckets + vocabulary size
    categorical: List[str]
    numeric: List[str]
    embedding_dim: int = 32
    side_embedding_dim: int = 8
    cross_layers: int = 2
    deep_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32])
    id_bias: bool = True  # a learnt scalar per user and per item added to the logit (the "wide" part)
    side_features: bool = True  # False: ids only (an ablation)
    ignored_features: List[str] = dataclasses.field(default_factory=list)  # side features left out (ablations)


class EmbeddingBag(tf.keras.layers.Layer):
    """Mean of the embeddings of a sparse set of indices; zeros for an empty set."""

    def __init__(self, rows: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.dim = rows, dim

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.rows, self.dim),
            initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05))
        super().build(input_shape)

    def call(self, ids: tf.SparseTensor):
        return tf.nn.safe_embedding_lookup_sparse(self.embeddings, ids, combiner="mean")


class RankingModel(tfrs.models.Model):
    def __init__(self, spec: ModelSpec):
        super().__init__(name="ranking_model")
        self.spec = spec
        self.id_embeddings = {
            f: tf.keras.layers.Embedding(spec.vocab_rows[f], spec.embedding_dim, name=f"{f}_embedding")
            for f in F.ID_FEATURES
        }
        # Biases start at zero, so a warm start from a model without them changes nothing at first.
        self.id_biases = {
            f: tf.keras.layers.Embedding(spec.vocab_rows[f], 1, embeddings_initializer="zeros", name=f"{f}_bias")
            for f in F.ID_FEATURES
        } if spec.id_bias else {}
        used = (lambda f: f not in spec.ignored_features) if spec.side_features else (lambda f: False)
        self.categorical = [f for f in spec.categorical if used(f)]
        self.numeric = [f for f in spec.numeric if used(f)]
        self.side_embeddings = {
            f: EmbeddingBag(spec.vocab_rows[f], spec.side_embedding_dim, name=f"{f}_embedding")
            for f in self.categorical
        }
        self.cross = [tfrs.layers.dcn.Cross(name=f"cross_{i}") for i in range(spec.cross_layers)]
        self.deep = [tf.keras.layers.Dense(units, activation="relu", name=f"deep_{i}")
                     for i, units in enumerate(spec.deep_layers)]
        self.head = tf.keras.layers.Dense(1, name="head")
        self.cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.AUC(name="auc", from_logits=True)],
        )

    def named_layers(self) -> List[tf.keras.layers.Layer]:
        return (list(self.id_embeddings.values()) + list(self.id_biases.values())
                + list(self.side_embeddings.values()) + self.cross + self.deep + [self.head])

    def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        parts = [self.id_embeddings[f](features[F.index_name(f)]) for f in F.ID_FEATURES]
        parts += [self.side_embeddings[f](features[F.index_name(f)]) for f in self.categorical]
        parts += [tf.cast(features[F.numeric_name(f)], tf.float32) for f in self.numeric]
        x0 = tf.concat(parts, axis=1)
        crossed = x0
        for layer in self.cross:
            crossed = layer(x0, crossed)
        deep = x0
        for layer in self.deep:
            deep = layer(deep)
        logit = self.head(tf.concat([crossed, deep], axis=1))
        for f, bias in self.id_biases.items():
            logit += bias(features[F.index_name(f)])
        return tf.squeeze(logit, axis=1)

    def loss_and_logits(self, features: Dict[str, tf.Tensor], labels: tf.Tensor,
                        training: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
        """Mean cross-entropy and the logits, metrics untouched (the Trainer's loop keeps its own)."""
        features = dict(features)
        target = features.pop(TARGET, None)
        logits = self(features, training=training)
        # Distillation: the loss is taken against the label blended with the serving model's probability.
        target = tf.cast(labels, tf.float32) if target is None else target
        return self.cross_entropy(tf.expand_dims(target, 1), tf.expand_dims(logits, 1)), logits

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """Keras' hook (fit/evaluate): the same loss, and the task's metrics updated on the real labels."""
        features, labels = inputs
        loss, logits = self.loss_and_logits(features, labels, training=training)
        self.task(labels=tf.cast(labels, tf.float32), predictions=logits)
        return loss


def build(spec: ModelSpec, learning_rate: float, optimizer: str = "adagrad") -> RankingModel:
    model = RankingModel(spec)
    optimizers = {
        "adam": tf.keras.optimizers.Adam,
        "adagrad": tf.keras.optimizers.Adagrad,
    }
    if optimizer not in optimizers:
        raise ValueError(f"optimizer must be one of {sorted(optimizers)}, got {optimizer!r}")
    model.compile(optimizer=optimizers[optimizer](learning_rate=learning_rate))
    return model


def weights_by_name(model: RankingModel) -> Dict[str, tf.Variable]:
    """Stable names for every trainable weight: '<layer>/<index>'."""
    out = {}
    for layer in model.named_layers():
        for i, weight in enumerate(layer.weights):
            out[f"{layer.name}.{i}"] = weight
    return out
