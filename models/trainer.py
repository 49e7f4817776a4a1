"""run_fn for the TFX Trainer: warm start from the serving model, train on span N + replay, export.

Transform runs with materialize=False: the Trainer reads raw tf.Examples and
applies the Transform layer itself, which lets replayed examples of older
spans go through the current vocabularies exactly like new ones.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
from tfx.components.trainer.fn_args_utils import FnArgs  # noqa: E402
from tfx.utils import io_utils  # noqa: E402
from tensorflow_metadata.proto.v0 import schema_pb2  # noqa: E402

from models import catch_up, export, features as F, ranking_model, replay, retrieval_model, spans, warm_start  # noqa: E402
from models.feature_snapshot import FeatureSnapshot, owner_of, side_table_columns  # noqa: E402
from models.snapshot_lookup import SnapshotLookup  # noqa: E402
from models.records import count_records, iter_record_batches, patterns_by_span, record_dataset  # noqa: E402
from models.preprocessing import vocabulary_assets  # noqa: E402
from models.training import TrainingRun, TrainingSettings  # noqa: E402

SUMMARY_FILE = "training_summary.json"


def model_spec(schema_path: str, transform_output_dir: str, settings: TrainingSettings) -> ranking_model.ModelSpec:
    schema = io_utils.parse_pbtxt_file(schema_path, schema_pb2.Schema())
    categorical, numeric = F.split_columns(schema)
    rows = {}
    for feature, path in vocabulary_assets(transform_output_dir).items():
        with tf.io.gfile.GFile(path, "rb") as f:
            rows[feature] = settings.oov_buckets + len(f.read().splitlines())
    missing = [f for f in list(F.ID_FEATURES) + categorical if f not in rows and settings.model_uses(f)]
    if missing:
        raise ValueError(f"Transform output has no vocabulary for {missing}")
    return ranking_model.ModelSpec.of(settings, rows, categorical, numeric)


TRANSFORM_BATCH = 8192  # records per Transform-layer call: below a few thousand, per-call overhead dominates
SHUFFLE_BUFFER = 100_000  # serialized records held for shuffling (~20 MB); a 10k-row span is shuffled whole


def make_transform(tft_layer, raw_spec, flip_labels: bool = False, teacher=None, distillation_weight: float = 0.0):
    """Serialized tf.Examples -> (transformed features, label), traced once and shared by every dataset.

    Traced on its own, the Transform layer takes a fraction of a second; traced
    inside each tf.data map function it took seconds per dataset. With a
    teacher, the features carry the soft target too.
    """
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def transform(serialized):
        features = tft_layer(tf.io.parse_example(serialized, raw_spec))
        label = tf.reshape(features.pop(F.LABEL), [-1])
        if flip_labels:
            label = 1 - label
        if teacher is not None:
            soft = tf.reshape(teacher(inputs=serialized)["outputs"], [-1])
            features[ranking_model.TARGET] = ((1.0 - distillation_weight) * tf.cast(label, tf.float32)
                                              + distillation_weight * soft)
        return features, label

    return transform


def make_dataset(patterns: List[str], transform, batch_size: int, shuffle_seed=None,
                 replayed: Sequence[bytes] = (), records_in_files: Optional[int] = None) -> tf.data.Dataset:
    """Batches of (transformed features, label) streamed from the TFRecord files, never the whole span in memory.

    Records are shuffled as bytes, transformed TRANSFORM_BATCH at a time (one
    Transform-layer call per chunk, far cheaper than one per training batch),
    then cut into training batches. Replayed examples of earlier spans are
    spread evenly over the chunks and shuffled into each: every record and
    every replayed example once an epoch. (`sample_from_datasets` mixes one
    record at a time at ~40 us each, which tripled the training time of a
    1M-row span.) `records_in_files` is the number of records the patterns
    hold, where the caller has counted them already.
    """
    records = record_dataset(patterns)
    if shuffle_seed is not None:
        records = records.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    if not len(replayed):
        chunks = records.batch(TRANSFORM_BATCH)
    else:
        span_rows = count_records(patterns) if records_in_files is None else records_in_files
        from_span = max(1, round(TRANSFORM_BATCH * span_rows / (span_rows + len(replayed))))
        from_replay = -(-len(replayed) // max(1, -(-span_rows // from_span)))
        replay = tf.data.Dataset.from_tensor_slices(tf.constant(list(replayed), tf.string))
        replay = replay.shuffle(len(replayed), seed=shuffle_seed, reshuffle_each_iteration=True).batch(from_replay)
        # Once the replay is spent (its last chunks), the span's remaining chunks get none.
        replay = replay.concatenate(tf.data.Dataset.from_tensors(tf.constant([], tf.string)).repeat())
        chunks = tf.data.Dataset.zip((records.batch(from_span), replay)).map(
            lambda own, old: tf.random.shuffle(tf.concat([own, old], 0), seed=shuffle_seed))
    chunks = chunks.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if batch_size < TRANSFORM_BATCH:
        chunks = chunks.flat_map(_split_into(batch_size))
    return chunks.prefetch(tf.data.AUTOTUNE)


def largest_batch(batch_size: int) -> Optional[int]:
    """The most rows a batch of make_dataset(..., batch_size) holds: batch_size where batches are cut from
    the transform chunks, None where they are the chunks themselves (with their share of the replay)."""
    return batch_size if batch_size < TRANSFORM_BATCH else None


def training_batch_size(examples: int, batch_size: int, max_steps_per_epoch: int) -> int:
    """batch_size, or larger when an epoch would otherwise take more than max_steps_per_epoch steps."""
    if max_steps_per_epoch <= 0:
        return batch_size
    return max(batch_size, -(-examples // max_steps_per_epoch))


def _split_into(batch_size: int):
    """flat_map function: a transformed chunk as consecutive batches of batch_size rows.

    Sparse features are sliced through their ragged form, whose row splits make
    a slice cost its own rows, not the whole chunk's.
    """
    def split(features, label):
        rows = tf.shape(label, out_type=tf.int64)[0]
        ragged = {k: tf.RaggedTensor.from_sparse(v) for k, v in features.items() if isinstance(v, tf.SparseTensor)}

        def piece(i):
            start = i * batch_size
            end = tf.minimum(start + batch_size, rows)
            out = {k: v[start:end] for k, v in features.items() if k not in ragged}
            out.update({k: v[start:end].to_sparse() for k, v in ragged.items()})
            return out, label[start:end]

        return tf.data.Dataset.range((rows + batch_size - 1) // batch_size).map(piece)
    return split


def train_step(model: ranking_model.RankingModel, element_spec, retrieval=None, max_rows: Optional[int] = None) -> Any:
    """One optimisation step on a (features, labels[, sample_weight]) batch, minimising the model's
    compute_loss (the TFRS Ranking task's loss, which also updates the task's metrics) plus, with a
    retrieval model, its Retrieval task's loss on the same batch; returns the ranking loss.

    Traced once per model: the optimizer's slots exist before tracing, the
    signature is the dataset's (batch and sparse dimensions free, so a batch
    whose sparse features are wider does not retrace), and autograph is off
    (nothing here branches on tensors; converting Keras' layer code costs
    about a second). The two models share no weights, so the retrieval loss
    does not change what the ranking model learns.
    """
    variables = model.trainable_variables + (retrieval.trainable_variables if retrieval is not None else [])
    optimizer = model.optimizer
    optimizer.build(variables)

    @tf.function(input_signature=[element_spec], autograph=False)
    def step(batch):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch, training=True)
            total = loss + tf.add_n(model.losses) if model.losses else loss
            if retrieval is not None:
                total += retrieval.compute_loss(batch, training=True, max_rows=max_rows)
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return loss

    return step


def _epoch_scores(model: ranking_model.RankingModel, losses: List[Any], rows: List[int]) -> Dict[str, float]:
    """The batches' mean loss per example, and the task's metrics over them."""
    if not rows:
        return {}
    loss = float(np.dot(np.asarray([float(x) for x in losses], np.float64), rows) / sum(rows))
    return dict({"loss": loss}, **model.task_metrics())


def fit(model: ranking_model.RankingModel, dataset: tf.data.Dataset, epochs: int,
        retrieval=None, max_rows: Optional[int] = None) -> Dict[str, List[float]]:
    """Trains for `epochs` passes; returns each epoch's training loss and the task's metrics (AUC).

    A span's training is a few hundred cheap steps, so per-model set-up is most
    of its cost: Keras' fit (a heavier step, traced again on new sparse shapes)
    took ~1.5 s per span against ~0.2 s of optimisation. Losses are read once per
    epoch, so steps are not made to wait on each other. `max_rows`: no batch of
    `dataset` is larger, where that is known (largest_batch).
    """
    step = train_step(model, dataset.element_spec, retrieval, max_rows)
    history: Dict[str, List[float]] = {}
    for _ in range(epochs):
        model.reset_task_metrics()
        losses, rows = [], []
        for batch in dataset:
            losses.append(step(batch))
            rows.append(int(batch[1].shape[0]))
        for name, value in _epoch_scores(model, losses, rows).items():
            history.setdefault(name, []).append(value)
    return history


def validate(model: ranking_model.RankingModel, dataset: tf.data.Dataset) -> Dict[str, float]:
    """The task's loss and metrics on the eval split, in large batches.

    Traced without autograph like the training step: called eagerly, the first
    batch converted the task's metric updates with autograph, ~2.5 s for a
    pass that then takes a tenth of a second.
    """
    @tf.function(input_signature=[dataset.element_spec], autograph=False)
    def step(batch):
        return model.compute_loss(batch, training=False)

    model.reset_task_metrics()
    losses, rows = [], []
    for batch in dataset:
        losses.append(step(batch))
        rows.append(int(batch[1].shape[0]))
    return _epoch_scores(model, losses, rows)


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


class _Phases:
    """Seconds spent in each phase of run_fn, for the training summary."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self._last = time.time()

    def done(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def build_snapshot(run: TrainingRun, span: int, patterns: List[str], snapshot: FeatureSnapshot) -> FeatureSnapshot:
    """Folds this run's examples into `snapshot`: incremental, this span's into the newest earlier
    snapshot; full, every span's in span order, so popularity decays as it would have span by span."""
    by_span = patterns_by_span(patterns) if run.mode == "full" else None
    if not by_span:
        by_span = {span: patterns}  # incremental, or artifacts that do not say their span: all as this span
    for each, files in by_span.items():
        snapshot.absorb(iter_record_batches(files, TRANSFORM_BATCH))
        snapshot.end_span(each, run.settings.popularity_decay)
    return snapshot


def run_fn(fn_args: FnArgs) -> None:
    run = TrainingRun.from_custom_config(fn_args.custom_config)  # every setting checked; no defaults here
    settings = run.settings
    started = time.time()
    phases = _Phases()
    tf.keras.utils.set_random_seed(settings.seed)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    raw_spec = tf_transform_output.raw_feature_spec()
    tft_layer = tf_transform_output.transform_features_layer()
    spec = model_spec(fn_args.schema_path, fn_args.transform_output, settings)

    span_examples = count_records(fn_args.train_files)
    if not span_examples:
        raise ValueError(f"no training examples in {fn_args.train_files}")
    has_eval = count_records(fn_args.eval_files) > 0
    phases.done("count")

    span = run.span if run.span is not None else spans.newest_span(run.data_dir)
    # Spans whose candidates were not pushed since the base model's span (models/catch_up.py).
    caught_up_spans, caught_up_files = [], []
    if run.mode == "incremental":
        catch_up.record_span(run.replay_dir, span, fn_args.train_files)
        caught_up_spans, caught_up_files = catch_up.since_base(run.replay_dir, span, fn_args.base_model)
    caught_up_examples = count_records(caught_up_files) if caught_up_files else 0
    train_files = list(fn_args.train_files) + caught_up_files
    phases.done("catch_up")
    reservoir: Optional[replay.Reservoir] = None
    replayed: List[bytes] = []
    if run.mode == "incremental":
        reservoir = replay.Reservoir.before(run.replay_dir, span, settings.replay_capacity, settings.seed)
        replayed = reservoir.sample(round(settings.replay_fraction * span_examples),
                                    seed=len(reservoir) + span_examples)
    phases.done("replay_sample")

    model = ranking_model.build(spec, settings.learning_rate, settings.optimizer)
    plain = make_transform(tft_layer, raw_spec)
    first = plain(tf.constant(next(iter_record_batches(fn_args.train_files, 2))))[0]
    model(first)  # create the weights
    retrieval = retrieval_model.build(spec.vocab_rows, settings.embedding_dim)
    retrieval(first)
    weights = dict(ranking_model.weights_by_name(model), **retrieval_model.weights_by_name(retrieval))

    base = fn_args.base_model if run.mode == "incremental" else None
    warm_report = {}
    teacher = None
    if base and warm_start.has_saved_model(base):
        warm_report = warm_start.copy_into(weights, warm_start.load_weights(base))
        logging.info("warm start from %s: %s", base, warm_report)
        if settings.distillation_weight > 0:
            teacher = tf.saved_model.load(base).signatures["regress"]
    elif base:
        logging.info("no serving model at %s: training from scratch", base)
    phases.done("build_and_warm_start")

    run_name = f"span-{span}"
    log_dir = os.path.join(run.tensorboard_dir, "train", f"{run_name}-{int(started)}")
    batch_size = training_batch_size(span_examples + caught_up_examples + len(replayed), settings.batch_size,
                                     settings.max_steps_per_epoch)
    flip = settings.flip_train_labels
    training = plain if not (flip or teacher) else make_transform(tft_layer, raw_spec, flip, teacher,
                                                                   settings.distillation_weight)
    train_ds = make_dataset(train_files, training, batch_size, shuffle_seed=settings.seed,
                            replayed=replayed, records_in_files=span_examples + caught_up_examples)
    eval_ds = make_dataset(fn_args.eval_files, plain, TRANSFORM_BATCH) if has_eval else None
    fit_started = time.time()
    history = fit(model, train_ds, settings.epochs, retrieval, max_rows=largest_batch(batch_size))
    train_seconds = time.time() - fit_started
    phases.done("fit")
    # Validation and curves come after training, outside the measured train seconds.
    validation = validate(model, eval_ds) if eval_ds is not None else {}
    write_curves(log_dir, history, validation)
    phases.done("validate")

    categorical, numeric = spec.categorical, spec.numeric
    side_columns = side_table_columns(run.data_dir)
    snapshot = build_snapshot(run, span, list(fn_args.train_files) + list(fn_args.eval_files),
                              FeatureSnapshot.before(run.features_dir, span, categorical, numeric, side_columns)
                              if run.mode == "incremental" else FeatureSnapshot(categorical, numeric, side_columns))
    phases.done("feature_snapshot")

    with tempfile.TemporaryDirectory() as assets:
        lookup = SnapshotLookup(snapshot, assets)
        owners = {f: owner_of(f, side_columns) for f in categorical + numeric}
        module = export.ExportModule(model, tft_layer, raw_spec, categorical, numeric, retrieval, lookup, owners)
        tf.saved_model.save(module, fn_args.serving_model_dir, signatures=module.signatures())
    snapshot.save(run.features_dir, span)
    warmup = next(iter_record_batches(fn_args.eval_files if has_eval else fn_args.train_files, export.WARMUP_EXAMPLES))
    export.write_warmup(fn_args.serving_model_dir, warmup, categorical, numeric)
    phases.done("export")

    if reservoir is not None:
        reservoir.absorb(iter_record_batches(fn_args.train_files))
        reservoir.save(run.replay_dir, span)
    phases.done("replay_absorb")

    summary = {
        "examples_trained": span_examples + caught_up_examples + len(replayed),
        "span_examples": span_examples,
        "caught_up_spans": caught_up_spans,
        "caught_up_examples": caught_up_examples,
        "replayed_examples": len(replayed),
        "train_seconds": train_seconds,
        "batch_size": batch_size,
        "phase_seconds": phases.seconds,
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
