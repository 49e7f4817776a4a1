"""The TFRS ranking model: id embeddings + side features, a DCN-v2 cross stack beside a deep tower.

Inputs are Transform's outputs: `<id>_index` (int64 [batch]), `<cat>_index`
(sparse int64 [batch, n], averaged as an embedding bag) and `<num>_z`
(float [batch, 1]). The model returns logits; serving applies the sigmoid.
Every layer has a fixed name: warm start matches weights by those names.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import tensorflow as tf
import tensorflow_recommenders as tfrs

from models import features as F
from models.training import TrainingSettings

# Optional feature of a training batch: the soft target (label blended with a teacher's probability).
TARGET = "__distillation_target__"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's shape: its settings (no defaults here: they are TrainingSettings') and the data's columns."""

    vocab_rows: Dict[str, int]  # rows of each embedding table: oov buckets + vocabulary size
    categorical: List[str]
    numeric: List[str]
    embedding_dim: int
    side_embedding_dim: int
    cross_layers: int
    deep_layers: List[int]
    id_bias: bool  # a learnt scalar per user and per item added to the logit (the "wide" part)
    ignored_features: List[str]  # side features the model leaves out (TrainingSettings.model_uses)

    @classmethod
    def of(cls, settings: TrainingSettings, vocab_rows: Dict[str, int], categorical: List[str],
           numeric: List[str]) -> "ModelSpec":
        return cls(vocab_rows=dict(vocab_rows), categorical=list(categorical), numeric=list(numeric),
                   embedding_dim=settings.embedding_dim, side_embedding_dim=settings.side_embedding_dim,
                   cross_layers=settings.cross_layers, deep_layers=list(settings.deep_layers),
                   id_bias=settings.id_bias,
                   ignored_features=[f for f in list(categorical) + list(numeric) if not settings.model_uses(f)])


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
        self.categorical = [f for f in spec.categorical if f not in spec.ignored_features]
        self.numeric = [f for f in spec.numeric if f not in spec.ignored_features]
        self.side_embeddings = {
            f: EmbeddingBag(spec.vocab_rows[f], spec.side_embedding_dim, name=f"{f}_embedding")
            for f in self.categorical
        }
        self.cross = [tfrs.layers.dcn.Cross(name=f"cross_{i}") for i in range(spec.cross_layers)]
        self.deep = [tf.keras.layers.Dense(units, activation="relu", name=f"deep_{i}")
                     for i, units in enumerate(spec.deep_layers)]
        self.head = tf.keras.layers.Dense(1, name="head")
        # The one loss the model trains with (binary cross-entropy of the logit) and its training metrics.
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.AUC(name="auc", from_logits=True, num_thresholds=1000)],
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

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """The Ranking task's loss on a batch, updating the task's metrics: what TFRS' train_step and the
        Trainer's own loop (models/trainer.py) both minimise.

        `inputs` is (features, labels) or (features, labels, sample_weight). With distillation the
        features carry the soft target (TARGET): the loss is taken against it, while the metrics
        still measure the real labels.
        """
        features, labels, sample_weight = (tuple(inputs) + (None,))[:3]
        features = dict(features)
        target = features.pop(TARGET, None)
        logits = tf.expand_dims(self(features, training=training), 1)
        labels = tf.expand_dims(tf.cast(labels, tf.float32), 1)
        if target is None:
            return self.task(labels=labels, predictions=logits, sample_weight=sample_weight, training=training)
        loss = self.task(labels=tf.expand_dims(target, 1), predictions=logits, sample_weight=sample_weight,
                         training=training, compute_metrics=False)
        for metric in self.task.metrics:
            metric.update_state(labels, logits, sample_weight=sample_weight)
        return loss

    def reset_task_metrics(self) -> None:
        for metric in self.task.metrics:
            metric.reset_state()

    def task_metrics(self) -> Dict[str, float]:
        """The task's metrics since they were last reset (AUC by name)."""
        return {metric.name: float(metric.result()) for metric in self.task.metrics}


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
