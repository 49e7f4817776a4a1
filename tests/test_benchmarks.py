"""What the benchmarks are built on: the peer models and the per-span lookups in MLMD."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.peers import LogisticIds, Popularity
from models.metrics import auc


def test_popularity_is_the_smoothed_positive_rate_of_each_item():
    items = ["a"] * 10 + ["b"] * 10 + ["c"]
    labels = np.array([1] * 9 + [0] + [1] + [0] * 9 + [1])
    model = Popularity(prior_weight=5.0).fit(["u"] * len(items), items, labels)
    rate = 11 / 21
    scores = model.predict(["x"] * 4, ["a", "b", "c", "never-seen"])
    np.testing.assert_allclose(scores, [(9 + 5 * rate) / 15, (1 + 5 * rate) / 15, (1 + 5 * rate) / 6, rate])
    assert scores[0] > scores[3] > scores[1]


def test_logistic_regression_on_ids_learns_user_and_item_effects():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 4000)
    items = rng.integers(0, 30, 4000)
    logits = (users - 10) / 4 + (items - 15) / 6
    labels = (rng.random(4000) < 1 / (1 + np.exp(-logits))).astype(int)
    model = LogisticIds().fit([f"u{u}" for u in users], [f"i{i}" for i in items], labels)
    test_users, test_items = rng.integers(0, 20, 2000), rng.integers(0, 30, 2000)
    test_logits = (test_users - 10) / 4 + (test_items - 15) / 6
    test_labels = (rng.random(2000) < 1 / (1 + np.exp(-test_logits))).astype(int)
    scores = model.predict([f"u{u}" for u in test_users], [f"i{i}" for i in test_items])
    assert auc(test_labels, scores) > 0.8
    assert auc(test_labels, test_logits) - auc(test_labels, scores) < 0.02, "close to the true model"
    unseen = model.predict(["new", "u19"], ["new", "i29"])
    assert unseen[1] > unseen[0], "unseen ids fall back to the intercept"


def test_each_span_run_is_found_in_mlmd_with_its_component_times(shared_run):
    from pipeline import outcome
    from pipeline.config import IncrecConfig
    from pipeline.local_runner import read_history

    work = shared_run["work"]
    config = IncrecConfig(data_dir=str(shared_run["data"]), work_dir=str(work))
    by_span = outcome.artifacts_by_span(config)
    assert sorted(by_span) == [1, 2, 3]
    uris = set()
    for span, artifacts in by_span.items():
        examples = artifacts[("SpanExampleGen", "examples")]
        assert examples.custom_properties["span"].int_value == span
        assert ("Transform", "transform_graph") in artifacts and ("Trainer", "model") in artifacts
        uris.add(examples.uri)
    assert len(uris) == 3, "one ingestion per span"

    for record in read_history(str(work)):
        seconds = outcome.component_seconds(config, record["time"])
        assert {"SpanExampleGen", "Transform", "Trainer", "Evaluator", "ServingPusher"} <= set(seconds)
        assert seconds["Trainer"] >= record["train_seconds"] > 0
        assert sum(seconds.values()) <= record["run_seconds"] + 1
