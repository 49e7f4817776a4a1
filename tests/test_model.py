"""The ranking model and its training loop on small inputs: id biases, left-out features, distillation, warm start."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from models import features as F
from models import ranking_model
from models.trainer import make_dataset, make_transform
from models.training import TrainingSettings


def spec(**overrides) -> ranking_model.ModelSpec:
    """A small model; every other setting is TrainingSettings' default."""
    settings = TrainingSettings(**dict(dict(embedding_dim=4, side_embedding_dim=2, deep_layers=[8]), **overrides))
    return ranking_model.ModelSpec.of(settings, {"user_id": 20, "item_id": 30, "genres": 10}, ["genres"], ["year"])


def batch(users, items, years):
    n = len(users)
    return {F.index_name(F.USER_ID): tf.constant(users, tf.int64), F.index_name(F.ITEM_ID): tf.constant(items, tf.int64),
            F.index_name("genres"): tf.sparse.from_dense(tf.constant([[1, 2]] * n, tf.int64)),
            F.numeric_name("year"): tf.constant(np.reshape(years, [n, 1]), tf.float32)}


def test_id_bias_adds_a_learnt_scalar_per_user_and_item_to_the_logit():
    model = ranking_model.build(spec(), 0.1)
    features = batch([3, 4], [5, 5], [0.0, 0.0])
    before = model(features).numpy()
    weights = ranking_model.weights_by_name(model)
    assert {"user_id_bias.0", "item_id_bias.0"} <= set(weights), "biases are warm-started by name"
    assert not np.any(weights["user_id_bias.0"].numpy()), "biases start at zero"
    weights["user_id_bias.0"].assign(tf.tensor_scatter_nd_update(weights["user_id_bias.0"], [[3]], [[5.0]]))
    np.testing.assert_allclose(model(features).numpy() - before, [5.0, 0.0], atol=1e-5)

    without = ranking_model.build(spec(id_bias=False), 0.1)
    without(features)
    assert not any(name.endswith("_bias.0") for name in ranking_model.weights_by_name(without))


def test_ignored_features_do_not_reach_the_model():
    model = ranking_model.build(spec(ignored_features=["year"]), 0.1)
    low, high = model(batch([1], [1], [-3.0])).numpy(), model(batch([1], [1], [3.0])).numpy()
    np.testing.assert_array_equal(low, high)
    assert "year" not in model.numeric and model.categorical == ["genres"]
    used = ranking_model.build(spec(), 0.1)
    assert used(batch([1], [1], [-3.0])).numpy() != used(batch([1], [1], [3.0])).numpy()
    ids_only = ranking_model.build(spec(side_features=False), 0.1)
    assert ids_only.categorical == [] and ids_only.numeric == []


def test_distillation_trains_against_the_label_blended_with_the_teacher(tmp_path):
    raw_spec = {F.LABEL: tf.io.FixedLenFeature([1], tf.int64), "x": tf.io.FixedLenFeature([1], tf.float32)}
    path = str(tmp_path / "examples.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for label, x in ((1, 0.2), (0, 0.6)):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                F.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=[x]))})).SerializeToString())
    layer = lambda parsed: {F.LABEL: tf.reshape(parsed[F.LABEL], [-1]), "x": parsed["x"]}  # noqa: E731
    # The teacher reads its probability from the example itself: 0.2 for the first, 0.6 for the second.
    teacher = lambda inputs: {"outputs": tf.io.parse_example(inputs, raw_spec)["x"]}  # noqa: E731
    soft = make_transform(layer, raw_spec, teacher=teacher, distillation_weight=0.25)
    features, labels = next(iter(make_dataset([path], soft, 2)))
    np.testing.assert_allclose(features[ranking_model.TARGET].numpy(), [0.75 * 1 + 0.25 * 0.2, 0.25 * 0.6])
    np.testing.assert_array_equal(labels.numpy(), [1, 0])
    plain, _ = next(iter(make_dataset([path], make_transform(layer, raw_spec), 2)))
    assert ranking_model.TARGET not in plain

    model = ranking_model.build(spec(), 0.1)
    inputs = batch([1, 2], [1, 2], [0.0, 1.0])
    logits = model(inputs)
    target = tf.constant([0.8, 0.1])
    loss = model.compute_loss((dict(inputs, **{ranking_model.TARGET: target}), tf.constant([1, 0])))
    expected = tf.keras.losses.BinaryCrossentropy(from_logits=True)(target[:, None], logits[:, None])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    hard = model.compute_loss((inputs, tf.constant([1, 0])))
    assert float(hard) != pytest.approx(float(loss))
    # The task's metrics measure the real labels, not the blended target: one positive per call.
    model.reset_task_metrics()
    model.compute_loss((dict(inputs, **{ranking_model.TARGET: target}), tf.constant([1, 0])))
    auc = model.task.metrics[0]
    assert float(auc.true_positives[0] + auc.false_negatives[0]) == 1.0


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ranking_model.build(spec(), 0.1, "sgd-with-hope")


def test_training_curves_are_written_where_tensorboard_looks(tmp_path):
    from models.trainer import write_curves

    write_curves(str(tmp_path), {"loss": [0.7, 0.6], "auc": [0.6, 0.7]}, {"loss": 0.65, "auc": 0.68})
    found = {}
    for split in ("train", "validation"):
        for events in (tmp_path / split).glob("events.out.tfevents*"):
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                for value in event.summary.value:
                    found[(split, value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert found == pytest.approx({("train", "epoch_loss", 0): 0.7, ("train", "epoch_loss", 1): 0.6,
                                   ("train", "epoch_auc", 0): 0.6, ("train", "epoch_auc", 1): 0.7,
                                   ("validation", "epoch_loss", 1): 0.65, ("validation", "epoch_auc", 1): 0.68})


def synthetic(n: int, genre_width: int, seed: int) -> tf.data.Dataset:
    """Rows whose label is the parity of the user id; genres `genre_width` wide."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 20, n)
    genres = tf.sparse.from_dense(tf.constant(rng.integers(1, 10, (n, genre_width)), tf.int64))
    features = {F.index_name(F.USER_ID): tf.constant(users, tf.int64),
                F.index_name(F.ITEM_ID): tf.constant(rng.integers(1, 30, n), tf.int64),
                F.index_name("genres"): genres,
                F.numeric_name("year"): tf.constant(rng.normal(size=(n, 1)), tf.float32)}
    return tf.data.Dataset.from_tensor_slices((features, tf.constant(users % 2, tf.int64)))


def test_the_train_step_is_traced_once_whatever_the_batch_shapes():
    from models.trainer import train_step

    # Batches of different sizes and sparse widths: Keras' fit traced such a step again.
    dataset = synthetic(300, 1, 0).batch(64).concatenate(synthetic(200, 3, 1).batch(64))
    model = ranking_model.build(spec(), 0.1)
    model(next(iter(dataset))[0])
    step = train_step(model, dataset.element_spec)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    for batch in dataset:
        assert step(batch).shape == []
    assert step.experimental_get_tracing_count() == 1
    assert any(not np.array_equal(before[v.name], v.numpy()) for v in model.trainable_variables)


def test_the_training_step_minimises_the_ranking_tasks_loss_and_updates_its_metrics():
    import tensorflow_recommenders as tfrs

    from models.trainer import train_step

    dataset = synthetic(64, 2, 0).batch(64)
    batch = next(iter(dataset))
    features, labels = batch
    model = ranking_model.build(spec(), 0.1)
    logits = model(features)
    task_loss = model.task(labels=tf.cast(labels, tf.float32)[:, None], predictions=logits[:, None],
                           compute_metrics=False)
    cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)(
        tf.cast(labels, tf.float32)[:, None], logits[:, None])
    assert float(task_loss) == pytest.approx(float(cross_entropy), rel=1e-6), "binary cross-entropy on the label"
    assert float(model.compute_loss(batch)) == pytest.approx(float(task_loss), rel=1e-6)

    model.reset_task_metrics()
    assert model.task_metrics() == {"auc": 0.0}
    step = train_step(model, dataset.element_spec)
    assert float(step(batch)) == pytest.approx(float(task_loss), rel=1e-5), "the step reports the task's loss"
    assert model.task_metrics()["auc"] > 0, "training updates the task's metrics"
    assert float(model.compute_loss(batch)) < float(task_loss), "and lowers that loss"

    # The gradient comes from the task: a task whose loss ignores the predictions leaves every weight as it is.
    frozen = ranking_model.build(spec(), 0.1)
    frozen(features)
    frozen.task = tfrs.tasks.Ranking(loss=lambda y_true, y_pred, sample_weight=None: 0.0 * tf.reduce_sum(y_pred))
    before = [v.numpy().copy() for v in frozen.trainable_variables]
    train_step(frozen, dataset.element_spec)(batch)
    for was, variable in zip(before, frozen.trainable_variables):
        np.testing.assert_array_equal(was, variable.numpy())


def test_sample_weights_reach_the_tasks_loss():
    model = ranking_model.build(spec(), 0.1)
    inputs = batch([1, 2, 3], [1, 2, 3], [0.0, 1.0, -1.0])
    labels = tf.constant([1, 0, 1])
    weights = tf.constant([1.0, 0.0, 2.0])
    logits = model(inputs)[:, None]
    expected = model.task(labels=tf.cast(labels, tf.float32)[:, None], predictions=logits, sample_weight=weights,
                          compute_metrics=False)
    weighted = model.compute_loss((inputs, labels, weights))
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)
    assert float(weighted) != pytest.approx(float(model.compute_loss((inputs, labels))))


def test_fit_learns_and_reports_loss_and_auc_per_epoch():
    from models.trainer import fit, validate

    tf.keras.utils.set_random_seed(0)
    model = ranking_model.build(spec(), 0.1)
    train = synthetic(2000, 2, 0).shuffle(2000, seed=0).batch(64)
    model(next(iter(train))[0])
    history = fit(model, train, epochs=4)
    assert set(history) == {"loss", "auc"} and all(len(v) == 4 for v in history.values())
    assert history["loss"][-1] < history["loss"][0]
    held_out = validate(model, synthetic(500, 2, 7).batch(256))
    assert held_out["auc"] > 0.9, "the parity of the user id is learnable from the user embedding and bias"
    assert held_out["loss"] < np.log(2)


def test_warm_start_reads_exported_weights_by_name_and_refuses_other_models(tmp_path):
    from models import warm_start

    model = ranking_model.build(spec(), 0.1)
    model(batch([1], [1], [0.0]))
    weights = ranking_model.weights_by_name(model)
    exported = tf.Module()
    setattr(exported, warm_start.WEIGHTS_ATTRIBUTE, weights)
    exported.unrelated = tf.Variable([1.0, 2.0])
    tf.saved_model.save(exported, str(tmp_path / "increc"))
    read = warm_start.load_weights(str(tmp_path / "increc"))
    assert sorted(read) == sorted(weights)
    for name, variable in weights.items():
        np.testing.assert_array_equal(read[name].numpy(), variable.numpy())

    other = tf.Module()
    other.v = tf.Variable(1.0)
    tf.saved_model.save(other, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not an increc model"):
        warm_start.load_weights(str(tmp_path / "other"))
    (tmp_path / "broken" / "variables").mkdir(parents=True)
    (tmp_path / "broken" / "variables" / "variables.index").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken: cannot read its variables"):
        warm_start.load_weights(str(tmp_path / "broken"))


def test_the_training_stream_yields_every_record_once_per_epoch_with_the_replay_mixed_in(tmp_path, monkeypatch):
    from models import trainer

    monkeypatch.setattr(trainer, "TRANSFORM_BATCH", 16)  # several chunks, each cut into batches
    raw_spec = {F.LABEL: tf.io.FixedLenFeature([1], tf.int64), "id": tf.io.FixedLenFeature([1], tf.int64),
                "tags": tf.io.VarLenFeature(tf.int64)}

    def example(i: int) -> bytes:
        return tf.train.Example(features=tf.train.Features(feature={
            F.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2])),
            "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
            "tags": tf.train.Feature(int64_list=tf.train.Int64List(value=list(range(i, i + i % 4))))})).SerializeToString()

    paths = []
    for part in range(3):
        paths.append(str(tmp_path / f"part-{part}.gz"))
        with tf.io.TFRecordWriter(paths[-1], options="GZIP") as writer:
            for i in range(part * 30, part * 30 + 30):
                writer.write(example(i))
    layer = lambda parsed: {F.LABEL: tf.reshape(parsed[F.LABEL], [-1]), "id": tf.reshape(parsed["id"], [-1]),  # noqa: E731
                            "tags": parsed["tags"]}
    replayed = [example(i) for i in range(1000, 1012)]
    dataset = make_dataset(paths, make_transform(layer, raw_spec), 7, shuffle_seed=3, replayed=replayed)
    for _ in range(2):  # two epochs, reshuffled
        seen = []
        for features, labels in dataset:
            assert len(labels) <= trainer.largest_batch(7) == 7, "the bound the retrieval loss relies on"
            tags = tf.sparse.to_dense(features["tags"], default_value=-1).numpy()
            for row, i in enumerate(features["id"].numpy()):
                assert [t for t in tags[row] if t >= 0] == list(range(i, i + i % 4)), "sparse rows stay with their row"
                assert labels.numpy()[row] == i % 2
                seen.append(int(i))
        assert sorted(seen) == list(range(90)) + list(range(1000, 1012))
    # Batches as large as a chunk are the chunks, plus their share of the replay: no bound below that.
    assert trainer.largest_batch(16) is None


def test_record_counts_come_from_the_example_gen_when_it_left_them(tmp_path):
    from models.records import count_records

    split = tmp_path / "examples" / "Split-train"
    split.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(split / "part.gz"), options="GZIP") as writer:
        for i in range(7):
            writer.write(b"%d" % i)
    pattern = str(split / "*")
    assert count_records([pattern]) == 7  # no counts file: the records are read
    (tmp_path / "examples" / "split_rows.json").write_text('{"train": 7000000, "eval": 3}')
    assert count_records([pattern]) == 7000000, "SpanExampleGen's count is used without reading the span"


def test_the_retrieval_query_adds_the_candidate_embeddings_of_recent_items():
    from models import retrieval_model

    model = retrieval_model.build({F.USER_ID: 5, F.ITEM_ID: 7}, 4)
    users = tf.constant([1, 2, 3], tf.int64)
    # User 1 recently had items 2 and 5, user 2 nothing, user 3 item 6.
    recent = tf.SparseTensor(indices=[[0, 0], [0, 1], [2, 0]], values=tf.constant([2, 5, 6], tf.int64),
                             dense_shape=[3, 2])
    query = model.query({F.index_name(F.USER_ID): users, F.item_rows_name(F.USER_RECENT_ITEMS): recent}).numpy()
    user, item = model.query_tower.embeddings.numpy(), model.candidate_tower.embeddings.numpy()
    np.testing.assert_allclose(query[0], user[1] + (item[2] + item[5]) / 2, rtol=1e-6)
    np.testing.assert_allclose(query[1], user[2], rtol=1e-6)
    np.testing.assert_allclose(query[2], user[3] + item[6], rtol=1e-6)
    # Data without recent items: the user's embedding alone.
    np.testing.assert_allclose(model.query({F.index_name(F.USER_ID): users}).numpy(), user[[1, 2, 3]], rtol=1e-6)


def test_recent_items_are_left_out_unless_the_setting_asks_for_them():
    rows = {F.USER_ID: 5, F.ITEM_ID: 7, F.USER_RECENT_ITEMS: 9}
    off = ranking_model.ModelSpec.of(TrainingSettings(), rows, [F.USER_RECENT_ITEMS], [])
    on = ranking_model.ModelSpec.of(TrainingSettings(recent_items=True), rows, [F.USER_RECENT_ITEMS], [])
    assert F.USER_RECENT_ITEMS in off.ignored_features and F.USER_RECENT_ITEMS not in on.ignored_features


def _transform_outputs(tmp_path, settings: dict):
    """What preprocessing_fn outputs, run by tf.Transform's Beam API on a few rows with these settings."""
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from models.preprocessing import preprocessing_fn

    spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.ITEM_ID: tf.io.FixedLenFeature([], tf.string),
            F.TIMESTAMP: tf.io.FixedLenFeature([], tf.int64), F.LABEL: tf.io.FixedLenFeature([], tf.int64),
            "genres": tf.io.VarLenFeature(tf.string), F.USER_RECENT_ITEMS: tf.io.VarLenFeature(tf.string)}
    rows = [{F.USER_ID: b"u1", F.ITEM_ID: b"i1", F.TIMESTAMP: 1, F.LABEL: 1, "genres": [b"drama"],
             F.USER_RECENT_ITEMS: []},
            {F.USER_ID: b"u1", F.ITEM_ID: b"i2", F.TIMESTAMP: 2, F.LABEL: 0, "genres": [b"comedy"],
             F.USER_RECENT_ITEMS: [b"i1"]}]
    config = {"vocab_dir": str(tmp_path / "vocab"), "span": 1, "settings": settings}
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    with tft_beam.Context(temp_dir=str(tmp_path / "tft"), force_tf_compat_v1=False):
        (transformed, _), _ = ((rows, metadata) | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: preprocessing_fn(inputs, config)))
    return set(transformed[0])


def test_transform_leaves_out_the_side_features_the_models_do_not_read(tmp_path):
    # Unused, user_recent_items (ten ids a row) would cost vocabulary analysis and lookups per batch.
    off = _transform_outputs(tmp_path / "off", {})
    assert F.index_name("genres") in off
    assert not {F.index_name(F.USER_RECENT_ITEMS), F.item_rows_name(F.USER_RECENT_ITEMS)} & off
    on = _transform_outputs(tmp_path / "on", {"recent_items": True})
    assert {F.index_name(F.USER_RECENT_ITEMS), F.item_rows_name(F.USER_RECENT_ITEMS)} <= on
    ignored = _transform_outputs(tmp_path / "ignored", {"ignored_features": ["genres"]})
    assert F.index_name("genres") not in ignored and F.index_name(F.ITEM_ID) in ignored


def test_retrieval_loss_costs_linear_time_in_the_batch_and_equals_the_task_loss_per_block(monkeypatch):
    """In-batch negatives are taken per block of rows: a batch of at most a block gets the TFRS task's own
    loss, a larger one the sum of the task's loss over its blocks, so a large batch costs no more per row."""
    from models import retrieval_model

    model = retrieval_model.build({"user_id": 50, "item_id": 40}, 4)
    users = tf.constant(np.arange(10) % 7, tf.int64)
    items = tf.constant([3, 5, 3, 8, 9, 1, 2, 5, 7, 6], tf.int64)
    labels = tf.constant([[1], [1], [0], [1], [1], [1], [0], [1], [1], [1]], tf.int64)
    features = {F.index_name(F.USER_ID): users, F.index_name(F.ITEM_ID): items}

    def task_loss(at):
        at = tf.constant(at)
        return float(model.task(model.query({F.index_name(F.USER_ID): tf.gather(users, at)}),
                                model.candidates(tf.gather(items, at)),
                                sample_weight=tf.cast(tf.reshape(tf.gather(labels, at), [-1]), tf.float32),
                                candidate_ids=tf.gather(items, at), compute_metrics=False))

    whole = float(model.compute_loss((features, labels)))
    assert whole == pytest.approx(task_loss(list(range(10))), rel=1e-5)
    # A caller that knows its batches fit one block skips the loop (whose gradient is costly to trace) and
    # gets the same loss.
    assert float(model.compute_loss((features, labels), max_rows=10)) == pytest.approx(whole, rel=1e-6)

    def has_loop(max_rows):
        graph = tf.function(lambda: model.compute_loss((features, labels), max_rows=max_rows)).get_concrete_function().graph
        return any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())

    assert has_loop(None) and not has_loop(10) and has_loop(retrieval_model.NEGATIVES_BLOCK + 1)
    monkeypatch.setattr(retrieval_model, "NEGATIVES_BLOCK", 4)
    blocked = float(model.compute_loss((features, labels)))
    per_block = task_loss([0, 1, 2, 3]) + task_loss([4, 5, 6, 7]) + task_loss([8, 9])
    assert blocked == pytest.approx(per_block, rel=1e-5) and blocked != pytest.approx(whole, rel=1e-3)
    assert float(model.compute_loss((features, labels), max_rows=10)) == pytest.approx(blocked, rel=1e-6), \
        "batches larger than a block are still cut into blocks"
    with tf.GradientTape() as tape:
        loss = model.compute_loss((features, labels))
    gradients = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in gradients), "every block's rows train the towers"
