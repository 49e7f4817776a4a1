"""The synthetic log: deterministic, in time order, heavy-tailed, with arrivals, drift and a learnable label."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from components import synthetic

SPEC = synthetic.Spec(rows=200_000, users=20_000, items=5_000, seed=11, days=20, chunk_rows=16_384)


@pytest.fixture(scope="module")
def log():
    """SPEC's rows as columns, chunk after chunk, and its world."""
    world = synthetic.World(SPEC)
    chunks = [world.chunk(c) for c in range(SPEC.chunks)]
    return world, {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def test_a_seed_gives_the_same_log_in_any_process_and_another_seed_another(log):
    world, rows = log
    again = synthetic.World(SPEC)  # built afresh, as a Beam worker would
    for chunk in (0, 5, SPEC.chunks - 1):  # any chunk alone, in any order
        fresh = again.chunk(chunk)
        mine = slice(chunk * SPEC.chunk_rows, chunk * SPEC.chunk_rows + len(fresh["pos"]))
        for name in fresh:
            assert np.array_equal(fresh[name], rows[name][mine]), name
    other = synthetic.World(dataclasses.replace(SPEC, seed=12)).chunk(0)
    assert not np.array_equal(other["item"], rows["item"][:SPEC.chunk_rows])
    assert len(rows["pos"]) == SPEC.rows and np.array_equal(rows["pos"], np.arange(SPEC.rows))


def test_time_runs_forward_and_chunks_never_share_a_second(log):
    world, rows = log
    ts = rows["ts"]
    assert np.all(np.diff(ts) >= 0)
    start = synthetic.DEFAULT_START
    assert ts[0] >= start and ts[-1] < start + SPEC.duration
    last_of_chunk = ts[SPEC.chunk_rows - 1::SPEC.chunk_rows]
    first_of_next = ts[SPEC.chunk_rows::SPEC.chunk_rows]
    assert np.all(last_of_chunk[:len(first_of_next)] < first_of_next), "a chunk boundary is a new second"
    # Busier evenings than nights, and more activity at the end of the period than at its start.
    hours = (ts // 3600) % 24
    assert np.mean(hours >= 18) > 1.2 * np.mean(hours < 6)
    day = (ts - start) // 86400
    assert np.sum(day == day.max() - 1) > 1.3 * np.sum(day == 0)


def test_ids_never_appear_before_they_arrive_and_new_ones_keep_coming(log):
    world, rows = log
    assert np.all(world.user_arrival[rows["user"]] <= rows["ts"])
    assert np.all(world.item_arrival[rows["item"]] <= rows["ts"])
    start = synthetic.DEFAULT_START
    late_users = world.user_arrival > start + SPEC.duration // 2
    late_items = world.item_arrival > start + SPEC.duration // 2
    assert late_users.mean() > 0.2 and late_items.mean() > 0.1
    assert np.isin(np.flatnonzero(late_users), rows["user"]).mean() > 0.3, "users arriving late do show up"
    assert np.isin(np.flatnonzero(late_items), rows["item"]).mean() > 0.3, "and so do new items"


def test_popularity_and_activity_are_heavy_tailed(log):
    world, rows = log
    item_counts = np.bincount(rows["item"], minlength=SPEC.items)
    user_counts = np.bincount(rows["user"], minlength=SPEC.users)
    assert synthetic.top_share(item_counts, 0.01) > 0.3, "the top 1% of items take a large share"
    assert synthetic.top_share(user_counts, 0.01) > 0.15
    assert np.median(item_counts[item_counts > 0]) < item_counts.mean() / 3


def test_tastes_drift_and_the_label_has_signal(log):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    world, rows = log
    users = np.arange(100)
    start, end = synthetic.DEFAULT_START, synthetic.DEFAULT_START + SPEC.duration
    moved = np.linalg.norm(world.taste(users, np.full(100, end)) - world.taste(users, np.full(100, start)), axis=1)
    assert np.median(moved) > 0.5, "a user's taste at the end of the period is not the one at its start"

    ratings, label = rows["rating"], rows["label"]
    assert set(np.unique(ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.array_equal(label, (ratings >= 4).astype(np.int8)) and 0.3 < label.mean() < 0.6
    # A logistic regression on the true affinity separates the labels; chance would be 0.5.
    half = len(label) // 2
    model = LogisticRegression().fit(rows["logit"][:half, None], label[:half])
    assert roc_auc_score(label[half:], model.predict_proba(rows["logit"][half:, None])[:, 1]) > 0.75


def test_side_tables_carry_genres_years_ages_and_countries():
    world = synthetic.World(synthetic.Spec(rows=1_000, users=300, items=200, seed=1))
    items = list(world.item_rows())
    users = list(world.user_rows())
    assert [r[0] for r in items] == [f"i{k}" for k in range(1, 201)]
    genres = [r[1].split("|") for r in items]
    assert all(1 <= len(g) <= 3 and set(g) <= set(synthetic.GENRES) for g in genres)
    assert any(len(g) > 1 for g in genres), "multi-valued"
    assert all(1920 <= int(r[2]) <= 2024 for r in items)
    assert all(16 <= int(r[1]) <= 80 and r[2] in synthetic.COUNTRIES for r in users)


def test_parameters_that_cannot_make_a_log_are_refused():
    with pytest.raises(synthetic.SpecError, match="--rows must be at least 1"):
        synthetic.World(synthetic.Spec(rows=0))
    with pytest.raises(synthetic.SpecError, match="--days must be positive"):
        synthetic.World(synthetic.Spec(days=0))


# --- prepare --format synthetic ---

def _examples(data, span: int, out):
    """SpanExampleGen's executor over one span: every tf.Example it writes, train and eval."""
    import tensorflow as tf

    from tests.test_example_gen import run_executor

    run_executor(data, out, budget=0.0, range_bytes=1 << 20, span=span)
    records = [r.numpy() for r in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(f"{out}/examples/Split-*/*")),
                                                           compression_type="GZIP")]
    return [tf.train.Example.FromString(r).features.feature for r in records]


def test_prepare_makes_a_data_directory_the_pipeline_reads(tmp_path):
    import json

    from sklearn.metrics import roc_auc_score

    from components import history, ingest
    from tests.conftest import increc

    data = tmp_path / "data"
    result = increc("prepare", "--format", "synthetic", "--rows", "30000", "--users", "3000", "--items", "800",
                    "--seed", "5", "--days", "10", "--spans", "2", "--out", str(data))
    assert "30000 rows in 2 spans" in result.stdout and "run 1/1" in result.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    assert sorted(p.name for p in data.iterdir()) == ["history", "items.csv", "manifest.json", "span-1", "span-2",
                                                      "users.csv"]
    assert manifest["synthetic"]["seed"] == 5 and manifest["label_threshold"] == 4.0
    assert (data / "users.csv").read_text().splitlines()[0] == "user_id,age,country"

    features = _examples(data, 2, tmp_path / "examples")
    assert len(features) == manifest["spans"][1]["rows"]
    assert any(len(f["genres"].bytes_list.value) > 1 for f in features), "genres are multi-valued"
    for name, kind in (("year", "float_list"), ("age", "float_list"), ("country", "bytes_list"),
                       ("user_history_mean", "float_list"), ("item_history", "float_list")):
        assert all(f[name].WhichOneof("kind") == kind for f in features), name
    # What the log knew about the user predicts the label: history features carry signal.
    label = [f["label"].int64_list.value[0] for f in features]
    mean = [f["user_history_mean"].float_list.value[0] for f in features]
    assert roc_auc_score(label, mean) > 0.6

    # The same log as a raw CSV through the generic adapter gives the same spans, row for row.
    spec = synthetic.Spec(rows=30_000, users=3_000, items=800, seed=5, days=10)
    synthetic.write_raw(spec, str(tmp_path / "raw"))
    ingest.prepare("csv", str(tmp_path / "raw"), str(tmp_path / "from-csv"), spans=2, label_threshold=4)
    for span in (1, 2):
        mine = "".join(open(p).read().split("\n", 1)[1] for p in ingest.span_files(str(data), span))
        theirs = "".join(open(p).read().split("\n", 1)[1]
                         for p in ingest.span_files(str(tmp_path / "from-csv"), span))
        assert mine == theirs
    assert history.newest_snapshot(str(data)).features("u1", "i1") == \
        history.newest_snapshot(str(tmp_path / "from-csv")).features("u1", "i1")

    # More of the same world, appended: it starts where the data directory ends.
    appended = ingest.prepare("synthetic", None, str(data), spans=1, append=True,
                              synthetic_spec=synthetic.Spec(rows=2_000, users=3_000, items=800, seed=6, days=1))
    assert [s["span"] for s in appended["spans"]] == [1, 2, 3]
    assert appended["spans"][2]["min_timestamp"] >= appended["spans"][1]["max_timestamp"]
    assert appended["synthetic"]["start"] == manifest["spans"][1]["max_timestamp"]

    refused = increc("prepare", "--format", "synthetic", "--input", str(tmp_path), "--out", str(tmp_path / "x"),
                     check=False)
    assert refused.returncode == 2 and "takes no --input" in refused.stderr
