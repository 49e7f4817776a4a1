"""What the benchmarks are built on: the peer models and the per-span lookups in MLMD."""
from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.peers import (GradientBoostedTrees, Inputs, LogisticFeatures, LogisticIds, Popularity,
                             PopularityHistory, parse_examples)
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


def synthetic_inputs(rng, rows, users=200, items=150):
    """Inputs shaped like increc's: ids, a single- and a multi-valued categorical, numbers with gaps.

    The label depends on a user effect, an item effect (the same in every call), the occupation, one genre
    and the history mean."""
    effects = np.random.default_rng(0)
    user_effect, item_effect = effects.normal(size=users), effects.normal(size=items)
    u, i = rng.integers(0, users, rows), rng.integers(0, items, rows)
    occupation = rng.choice(["a", "b", "c", ""], rows)
    genres = [tuple(rng.choice(["Drama", "Comedy", "Horror", "War"], rng.integers(0, 3), replace=False))
              for _ in range(rows)]
    history_mean = rng.normal(size=rows)
    year = rng.normal(size=rows)
    history_mean[rng.random(rows) < 0.1] = np.nan
    year[rng.random(rows) < 0.3] = np.nan
    horror = np.array(["Horror" in g for g in genres])
    logit = user_effect[u] + item_effect[i] + 1.5 * (occupation == "b") - 1.5 * horror + 1.5 * np.nan_to_num(history_mean)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    inputs = Inputs([f"u{x}" for x in u], [f"i{x}" for x in i],
                    {"occupation": [(o,) if o else () for o in occupation], "genres": genres},
                    {"item_history_mean": history_mean, "year": year})
    return inputs, labels, logit


def test_gbm_learns_from_ids_categorical_and_numeric_inputs():
    rng = np.random.default_rng(1)
    train, labels, _ = synthetic_inputs(rng, 12000)
    test, test_labels, test_logit = synthetic_inputs(np.random.default_rng(2), 5000)
    for encoding in GradientBoostedTrees.ID_ENCODINGS:
        model = GradientBoostedTrees(id_encoding=encoding).fit(train, labels)
        scores = model.predict(test)
        # Trees approximate the additive logit of the true model in steps: within a few points of it.
        assert auc(test_labels, test_logit) - auc(test_labels, scores) < 0.035, f"{encoding}: close to the true model"
        assert {"occupation", "genres=Horror", "genres_count", "item_history_mean", "year"} <= set(model.columns)
        ids_only = GradientBoostedTrees(id_encoding=encoding).fit(Inputs(train.users, train.items), labels)
        assert auc(test_labels, scores) > auc(test_labels, ids_only.predict(Inputs(test.users, test.items))) + 0.1
    assert {"user_rate", "item_count"} <= set(model.columns)


def test_gbm_codes_the_most_frequent_ids_and_lumps_the_rest():
    rng = np.random.default_rng(7)
    users = np.array([f"u{k}" for k in range(400)], dtype=object)[np.minimum(rng.geometric(0.01, 6000) - 1, 399)]
    inputs = Inputs(users, np.full(6000, "i"), {"occupation": [(f"o{k % 300}",) for k in range(6000)]}, {})
    model = GradientBoostedTrees(max_iter=5).fit(inputs, rng.integers(0, 2, 6000))
    matrix = model._matrix(Inputs(["u0", "never-seen"], ["i", "i"], {"occupation": [("o1",), ()]}, {}))
    assert model.columns[:3] == ["user_id", "item_id", "occupation"]
    assert matrix[0, 0] < 254 and matrix[1, 0] == 254, "unseen ids share the 'other' code"
    assert matrix[1, 2] != matrix[1, 2], "no value is missing (NaN)"
    codes = model._matrix(inputs)[:, 0]
    assert len(np.unique(codes)) == 255 and codes.max() == 254
    kept = set(users[codes < 254])
    counts = {u: (users == u).sum() for u in set(users)}
    assert min(counts[u] for u in kept) >= max(counts[u] for u in set(users) - kept)


def test_gbm_and_logistic_regression_take_unseen_values_and_missing_numbers():
    rng = np.random.default_rng(3)
    train, labels, _ = synthetic_inputs(rng, 5000)
    unseen = Inputs(["never-seen", "u1", "never-seen"], ["never-seen", "i1", "i1"],
                    {"occupation": [("new-occupation",), (), ("a",)], "genres": [("Western",), (), ("Drama", "War")]},
                    {"item_history_mean": np.array([np.nan, 0.5, np.nan]), "year": np.array([np.nan] * 3)})
    for model in (GradientBoostedTrees(), GradientBoostedTrees(id_encoding="rates"), LogisticFeatures()):
        scores = model.fit(train, labels).predict(unseen)
        assert scores.shape == (3,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()


def test_gbm_learns_a_target_that_only_a_history_feature_explains():
    rng = np.random.default_rng(4)
    rows = 8000
    history = rng.normal(size=rows)
    labels = (history + 0.3 * rng.normal(size=rows) > 0).astype(int)
    inputs = Inputs(rng.choice([f"u{k}" for k in range(50)], rows), rng.choice([f"i{k}" for k in range(50)], rows),
                    {}, {"user_history_mean": history, "noise": rng.normal(size=rows)})
    train = Inputs(inputs.users[:6000], inputs.items[:6000], {}, {k: v[:6000] for k, v in inputs.numeric.items()})
    model = GradientBoostedTrees().fit(train, labels[:6000])
    held_out = Inputs(inputs.users[6000:], inputs.items[6000:], {}, {k: v[6000:] for k, v in inputs.numeric.items()})
    assert auc(labels[6000:], model.predict(held_out)) > 0.95
    without = Inputs(held_out.users, held_out.items, {}, {"user_history_mean": np.full(2000, np.nan),
                                                          "noise": held_out.numeric["noise"]})
    assert auc(labels[6000:], model.predict(without)) < 0.6, "the history feature is what it uses"


def test_logistic_regression_with_features_beats_ids_only_and_popularity_follows_the_history_mean():
    rng = np.random.default_rng(5)
    train, labels, _ = synthetic_inputs(rng, 10000)
    test, test_labels, _ = synthetic_inputs(np.random.default_rng(6), 4000)
    with_features = auc(test_labels, LogisticFeatures().fit(train, labels).predict(test))
    ids_only = auc(test_labels, LogisticIds().fit(train.users, train.items, labels).predict(test.users, test.items))
    assert with_features > ids_only + 0.1
    popularity = PopularityHistory().fit(train, labels).predict(test)
    current = test.numeric["item_history_mean"]
    np.testing.assert_array_equal(popularity[~np.isnan(current)], current[~np.isnan(current)])
    assert np.isfinite(popularity).all()
    no_history = Inputs(test.users, test.items)
    fitted = PopularityHistory().fit(Inputs(train.users, train.items), labels).predict(no_history)
    id_only = Popularity().fit(train.users, train.items, labels)
    np.testing.assert_allclose(fitted, id_only.predict(test.users, test.items))


def test_examples_parse_into_inputs():
    import tensorflow as tf

    def example(user, item, label, genres, year):
        feature = {"user_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[user.encode()])),
                   "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode()])),
                   "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                   "genres": tf.train.Feature(bytes_list=tf.train.BytesList(value=[g.encode() for g in genres])),
                   "year": tf.train.Feature(float_list=tf.train.FloatList(value=year))}
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    inputs, labels = parse_examples([example("u1", "i1", 1, ["Drama", "War"], [1999.0]),
                                     example("u2", "i1", 0, [], [])], ["genres"], ["year", "user_history"])
    assert list(inputs.users) == ["u1", "u2"] and list(labels) == [1, 0]
    assert inputs.categorical["genres"] == [("Drama", "War"), ()]
    np.testing.assert_array_equal(inputs.numeric["year"], [1999.0, np.nan])
    assert np.isnan(inputs.numeric["user_history"]).all(), "a feature an example lacks is missing"
    both = Inputs.concat([inputs, inputs])
    assert len(both) == 4 and both.categorical["genres"][2] == ("Drama", "War")


def test_the_feature_peers_get_the_side_features_increc_trains_on(tmp_path):
    import json

    from benchmarks.prequential import model_features

    (tmp_path / "schema").mkdir()
    (tmp_path / "schema" / "schema.pbtxt").write_text("\n".join(
        f'feature {{ name: "{name}" type: {kind} }}' for name, kind in
        [("user_id", "BYTES"), ("item_id", "BYTES"), ("timestamp", "INT"), ("label", "INT"), ("genres", "BYTES"),
         ("year", "FLOAT"), ("user_history", "FLOAT"), ("item_history_mean", "FLOAT"),
         ("user_recent_items", "BYTES")]))
    # The recent items only with the setting that puts them in the model.
    assert model_features(tmp_path) == (["genres"], ["item_history_mean", "user_history", "year"])
    (tmp_path / "config.json").write_text(json.dumps({"recent_items": True}))
    assert model_features(tmp_path) == (["genres", "user_recent_items"], ["item_history_mean", "user_history", "year"])
    (tmp_path / "config.json").write_text(json.dumps({"ignored_features": ["year"]}))
    assert model_features(tmp_path) == (["genres"], ["item_history_mean", "user_history"])
    (tmp_path / "config.json").write_text(json.dumps({"side_features": False}))
    assert model_features(tmp_path) == ([], [])


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
        windows = outcome.component_windows(config, record["time"])
        assert windows["SpanExampleGen"][1] <= windows["Transform"][0] <= windows["Transform"][1] \
            <= windows["Trainer"][0], "components run one after another: the scale benchmark's per-component memory"


def test_the_report_scores_new_and_returning_users_with_the_version_that_served_each_span(shared_run):
    # The report's records carry paths relative to the work directory so the JSON travels; the segment
    # table must still find each serving version's model (it printed '-' for increc when it did not).
    from benchmarks.prequential import latest_records, served_segments, span_rows

    work = shared_run["work"]
    records = latest_records(work)
    assert not os.path.isabs(records[1]["candidate_model"])
    segments = served_segments({"records": records}, span_rows(work), work)
    assert sorted(segments) == [2, 3], "span 1 had no serving version; 2 and 3 were served by a pushed one"
    for span, segment in segments.items():
        # The live AUC with logged features is the same version scored on the same rows by the guard.
        assert segment["auc"] == pytest.approx(records[span]["live_auc_logged_features"], abs=1e-4)
        assert segment["auc_new_users"] is not None or segment["auc_returning_users"] is not None


def test_scale_judges_memory_growth_on_the_same_users_and_items():
    from benchmarks.scale import GIB, goals, parse_size

    assert parse_size("5000000@1000000") == (5_000_000, 1_000_000) and parse_size("10000") == (10_000, 10_000)

    def size(rows, catalog, gib):
        label = str(rows) if rows == catalog else f"{rows}@{catalog}"
        span = {"seconds": 100.0, "components": {}, "peak_rss_bytes": int(gib * GIB)}
        return {"rows": rows, "catalog_rows": catalog, "label": label, "spans": [span, span]}

    lines = goals([size(1_000_000, 1_000_000, 1.6), size(5_000_000, 1_000_000, 1.7), size(5_000_000, 5_000_000, 2.4)])
    growth = [line for line in lines if "5M-row span" in line]
    assert len(growth) == 1 and growth[0].startswith("met") and "1.06x" in growth[0]
    assert any(line.startswith("for comparison") and "2.40 GiB" in line for line in lines)
    lines = goals([size(1_000_000, 1_000_000, 1.6), size(5_000_000, 1_000_000, 1.9)])
    assert [line for line in lines if "5M-row span" in line][0].startswith("NOT met")


def test_the_list_baselines_split_new_from_returning_users_and_give_each_hybrid_half_its_list():
    from benchmarks.recommend_baselines import fit_all, score_span
    from components.live_ranking import PositiveSample

    # Span 1: r1 likes a, r2 likes a and b, and twelve items x0..x11 are liked twice each, so b (once) is
    # not in popularity's top 10; span 2: newcomer n likes d, which at decay 0.25 weighs 1 against their 0.5.
    # Span 3 (scored): r1 likes b, n2 (new) likes d.
    filler = [(f"f{i}{j}", f"x{i}") for i in range(12) for j in range(2)]
    users = np.array(["r1", "r2", "r2"] + [u for u, _ in filler] + ["n"])
    items = np.array(["a", "a", "b"] + [x for _, x in filler] + ["d"])
    labels = np.ones(users.size, np.int64)
    spans = np.array([1] * (users.size - 1) + [2])
    fitted = fit_all(users, items, labels, spans, decay=0.25, l2=0.1, max_items=100)
    assert fitted["newcomer_popularity"].ranked[0] == "d", "d was liked by a newcomer in the newest span"
    assert fitted["ease"].recommend(["r1"], 1) == {"r1": ["b"]}, "r1 liked a, which goes with b"
    sample = PositiveSample()
    sample.add(np.array([b"r1", b"n2"], dtype=object), np.array([b"b", b"d"], dtype=object), np.array([1, 1]))
    scored = score_span(fitted, sample, set(users.tolist()))
    assert scored["ease"]["users_all"] == 2 and scored["ease"]["users_new"] == 1
    assert scored["popularity"]["recall@10_all"] == 0.0, "b and d, liked once each, are not in its top 10"
    assert scored["ease"]["recall@10_returning"] == 1.0 and scored["ease"]["recall@10_new"] == 0.0
    hybrid = scored["ease + newcomer_popularity"]
    assert hybrid["recall@10_new"] == scored["newcomer_popularity"]["recall@10_new"] == 1.0
    assert hybrid["recall@10_returning"] == 1.0 and hybrid["recall@10_all"] == 1.0


def test_the_ensemble_ceiling_averages_ranks_of_every_combination_and_finds_the_served_version(tmp_path):
    from benchmarks.ensemble_ceiling import pooled, served_model

    labels = np.array([0, 0, 1, 1, 0, 1])
    # Each model gets one pair wrong, a different pair, and they score on different scales.
    scores = {"a": np.array([0.1, 0.2, 0.9, 0.3, 0.4, 0.8]), "b": np.array([-5.0, 3.0, 9.0, 8.0, -4.0, 2.0])}
    out = pooled(scores)
    assert set(out) == {"a", "b", "a + b"}
    np.testing.assert_array_equal(out["a"], scores["a"])
    assert auc(labels, out["a + b"]) > max(auc(labels, scores["a"]), auc(labels, scores["b"]))
    assert len(pooled({"a": scores["a"], "b": scores["b"], "c": scores["a"]})) == 7, "three alone, three pairs, one"

    records = {"1": {"pushed_version": 11, "candidate_model": "m/1"},
               "2": {"pushed_version": 12, "candidate_model": "m/2", "live_version": 11},
               "3": {"pushed_version": None, "candidate_model": "m/3", "live_version": 12}}
    assert served_model(tmp_path, records, 2) == str(tmp_path / "m/1")
    assert served_model(tmp_path, records, 3) == str(tmp_path / "m/2"), "span 3's candidate was never pushed"
    with pytest.raises(SystemExit, match="span 4"):
        served_model(tmp_path, records, 4)
