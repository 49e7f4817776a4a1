"""run_fn for the TFX Trainer: warm start from the serving model, train on span N + replay, export.

Transform runs with materialize=False: the Trainer reads raw tf.Examples and
applies the Transform layer itself, which lets replayed examples of older
spans go through the current vocabularies exactly like new ones.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402
from tfx.utils import io_utils  # noqa: E402
from tensorflow_metadata.proto.v0 import schema_pb2  # noqa: E402

from models import export, features as F, ranking_model, replay, warm_start  # noqa: E402
from models.metrics import auc  # noqa: E402
from models.records import read_records  # noqa: E402
from models.preprocessing import vocabulary_assets  # noqa: E402

SUMMARY_FILE = "training_summary.json"


def model_spec(schema_path: str, transform_output_dir: str, config) -> ranking_model.ModelSpec:
    schema = io_utils.parse_pbtxt_file(schema_path, schema_pb2.Schema())
    categorical, numeric = F.split_columns(schema)
    oov = int(config["oov_buckets"])
    rows = {}
    for feature, path in vocabulary_assets(transform_output_dir).items():
        with tf.io.gfile.GFile(path, "rb") as f:
            rows[feature] = oov + len(f.read().splitlines())
    missing = [f for f in list(F.ID_FEATURES) + categorical if f not in rows]
    if missing:
        raise ValueError(f"Transform output has no vocabulary for {missing}")
    return ranking_model.ModelSpec(
        vocab_rows=rows, categorical=categorical, numeric=numeric,
        embedding_dim=int(config["embedding_dim"]), side_embedding_dim=int(config["side_embedding_dim"]),
        cross_layers=int(config["cross_layers"]), deep_layers=list(config["deep_layers"]),
        id_bias=bool(config.get("id_bias", True)), side_features=bool(config.get("side_features", True)),
        ignored_features=list(config.get("ignored_features", [])))


TRANSFORM_BATCH = 8192


def transform_examples(examples: List[bytes], tft_layer, raw_spec) -> Dict[str, Any]:
    """The Transform layer applied once to every example, in large batches.

    Far cheaper than mapping it over each training batch in tf.data, whose
    tracing and per-batch work cost more than training on a 10k-row span.
    """
    chunks = [tft_layer(tf.io.parse_example(tf.constant(examples[i:i + TRANSFORM_BATCH], tf.string), raw_spec))
              for i in range(0, len(examples), TRANSFORM_BATCH)]
    out = {}
    for name in chunks[0]:
        parts = [chunk[name] for chunk in chunks]
        if isinstance(parts[0], tf.SparseTensor):
            out[name] = tf.sparse.concat(0, parts, expand_nonconcat_dims=True) if len(parts) > 1 else parts[0]
        else:
            out[name] = tf.concat(parts, 0)
    return out


def make_dataset(examples: List[bytes], tft_layer, raw_spec, batch_size: int, shuffle_seed=None,
                 flip_labels: bool = False, teacher=None, distillation_weight: float = 0.0) -> tf.data.Dataset:
    """Batches of (transformed features, label); with a teacher, the features carry the soft target too."""
    features = transform_examples(examples, tft_layer, raw_spec)
    label = tf.reshape(features.pop(F.LABEL), [-1])
    if flip_labels:
        label = 1 - label
    if teacher is not None:
        features[ranking_model.TARGET] = ((1.0 - distillation_weight) * tf.cast(label, tf.float32)
                                          + distillation_weight * tf.constant(teacher, tf.float32))
    ds = tf.data.Dataset.from_tensor_slices((features, label))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(examples), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(2)


def _scores(logits: List[Any], labels: List[Any]) -> Dict[str, float]:
    """Mean cross-entropy and exact AUC of logits against 0/1 labels."""
    logit = np.concatenate([np.asarray(x, np.float64).ravel() for x in logits])
    label = np.concatenate([np.asarray(y, np.float64).ravel() for y in labels])
    # log(1 + e^l) - y * l, written to stay finite for large |l|
    loss = np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit)))
    value = auc(label, logit)
    return dict({"loss": float(loss.mean())}, **({"auc": value} if value is not None else {}))


def train_step(model: ranking_model.RankingModel, element_spec) -> Any:
    """One optimisation step on a (features, labels) batch, returning the batch's logits.

    Traced once per model: the optimizer's slots exist before tracing, the
    signature is the dataset's (batch and sparse dimensions free, so a batch
    whose sparse features are wider does not retrace), and autograph is off
    (nothing here branches on tensors; converting Keras' layer code costs
    about a second).
    """
    variables = model.trainable_variables
    optimizer = model.optimizer
    optimizer.build(variables)

    @tf.function(input_signature=list(element_spec), autograph=False)
    def step(features, labels):
        with tf.GradientTape() as tape:
            loss, logits = model.loss_and_logits(features, labels, training=True)
            if model.losses:
                loss += tf.add_n(model.losses)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return logits

    return step


def fit(model: ranking_model.RankingModel, dataset: tf.data.Dataset, epochs: int) -> Dict[str, List[float]]:
    """Trains for `epochs` passes; returns each epoch's training loss and AUC.

    A span's training is a few hundred cheap steps, so per-model set-up is most
    of its cost: Keras' fit (a heavier step, traced again on new sparse shapes)
    took ~1.5 s per span against ~0.2 s of optimisation. Metrics are computed in
    numpy once per epoch, outside the traced step.
    """
    step = train_step(model, dataset.element_spec)
    history: Dict[str, List[float]] = {}
    for _ in range(epochs):
        logits, labels = [], []
        for features, label in dataset:
            logits.append(step(features, label))
            labels.append(label)
        for name, value in _scores(logits, labels).items():
            history.setdefault(name, []).append(value)
    return history


def validate(model: ranking_model.RankingModel, dataset: tf.data.Dataset) -> Dict[str, float]:
    """Loss and AUC on the eval split, computed eagerly in large batches: no step to trace."""
    logits, labels = [], []
    for features, label in dataset:
        logits.append(model(features, training=False))
        labels.append(label)
    return _scores(logits, labels) if labels else {}


def write_curves(log_dir: str, per_epoch: Dict[str, List[float]], validation: Dict[str, float]) -> None:
    """TensorBoard scalars as Keras' callback lays them out: train/epoch_<metric> per epoch,
    validation/epoch_<metric> at the last epoch."""
    with tf.summary.create_file_writer(os.path.join(log_dir, "train")).as_default():
        for name, values in per_epoch.items():
            for epoch, value in enumerate(values):
                tf.summary.scalar(f"epoch_{name}", value, step=epoch)
    if validation:
        last = max((len(v) for v in per_epoch.values()), default=1) - 1
        with tf.summary.create_file_writer(os.path.join(log_dir, "validation")).as_default():
            for name, value in validation.items():
                tf.summary.scalar(f"epoch_{name}", value, step=last)


def run_fn(fn_args: FnArgs) -> None:
    config = fn_args.custom_config
    started = time.time()
    tf.keras.utils.set_random_seed(int(config["seed"]))
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    raw_spec = tf_transform_output.raw_feature_spec()
    tft_layer = tf_transform_output.transform_features_layer()
    spec = model_spec(fn_args.schema_path, fn_args.transform_output, config)

    train = read_records(fn_args.train_files)
    evaluation = read_records(fn_args.eval_files)
    if not train:
        raise ValueError(f"no training examples in {fn_args.train_files}")

    reservoir = None
    replayed: List[bytes] = []
    if config["mode"] == "incremental" and float(config["replay_fraction"]) > 0:
        reservoir = replay.Reservoir(config["replay_dir"], int(config["replay_capacity"]), int(config["seed"]))
        replayed = reservoir.sample(round(float(config["replay_fraction"]) * len(train)), seed=len(reservoir) + len(train))

    model = ranking_model.build(spec, float(config["learning_rate"]), config["optimizer"])
    model(next(iter(make_dataset(train[:2], tft_layer, raw_spec, 2)))[0])  # create the weights

    base = fn_args.base_model if config["mode"] == "incremental" else None
    warm_report = {}
    teacher = None
    distillation_weight = float(config.get("distillation_weight", 0.0))
    if base and warm_start.has_saved_model(base):
        warm_report = warm_start.copy_into(ranking_model.weights_by_name(model), warm_start.load_weights(base))
        logging.info("warm start from %s: %s", base, warm_report)
        if distillation_weight > 0:
            teacher = export.score_examples(base, train + replayed)
    elif base:
        logging.info("no serving model at %s: training from scratch", base)

    run_name = f"span-{config['span']}" if config.get("span") is not None else os.path.basename(fn_args.model_run_dir)
    log_dir = os.path.join(config["tensorboard_dir"], "train", f"{run_name}-{int(started)}")
    train_ds = make_dataset(train + replayed, tft_layer, raw_spec, int(config["batch_size"]),
                            shuffle_seed=int(config["seed"]), flip_labels=bool(config.get("flip_train_labels")),
                            teacher=teacher, distillation_weight=distillation_weight)
    eval_ds = make_dataset(evaluation, tft_layer, raw_spec, TRANSFORM_BATCH) if evaluation else None
    fit_started = time.time()
    history = fit(model, train_ds, int(config["epochs"]))
    train_seconds = time.time() - fit_started
    # Validation and curves come after training, outside the measured train seconds.
    validation = validate(model, eval_ds) if eval_ds is not None else {}
    write_curves(log_dir, history, validation)

    categorical, numeric = spec.categorical, spec.numeric
    module = export.ExportModule(model, tft_layer, raw_spec, categorical, numeric)
    tf.saved_model.save(module, fn_args.serving_model_dir, signatures=module.signatures())
    export.write_warmup(fn_args.serving_model_dir, evaluation or train, categorical, numeric)

    if reservoir is not None or config["mode"] == "incremental":
        reservoir = reservoir or replay.Reservoir(config["replay_dir"], int(config["replay_capacity"]), int(config["seed"]))
        reservoir.absorb(";".join(sorted(fn_args.train_files)), train)

    summary = {
        "examples_trained": len(train) + len(replayed),
        "span_examples": len(train),
        "replayed_examples": len(replayed),
        "train_seconds": train_seconds,
        "warm_started_from": base if warm_report else None,
        "warm_start": warm_report,
        "distilled": teacher is not None,
        "vocab_rows": spec.vocab_rows,
        "final_metrics": dict({k: float(v[-1]) for k, v in history.items()},
                              **{f"val_{k}": float(v) for k, v in validation.items()}),
        "tensorboard_run": log_dir,
    }
    with tf.io.gfile.GFile(os.path.join(os.path.dirname(fn_args.serving_model_dir), SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
