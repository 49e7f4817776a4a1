"""`recommend` and ids-only scoring in every pushed version, and the top-K metrics the runs record."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Set

import numpy as np
import pytest
import tensorflow as tf

from components.deployment import DeploymentState
from models.export import call_signature
from models.feature_snapshot import FeatureSnapshot, side_table_columns
from serving import model_config
from tests.conftest import increc


def versions(work: Path):
    base = work / "serving" / "increc"
    return [(v, base / str(v)) for v in model_config.versions_on_disk(str(base))]


def pushed_span(version_dir: Path) -> int:
    return json.loads((version_dir / "assets.extra" / "increc_push.json").read_text())["span"]


def snapshot_of(work: Path, data: Path, span: int) -> FeatureSnapshot:
    return FeatureSnapshot.load(str(work / "features" / f"after-span-{span}"), ["genres"], ["year"],
                                side_table_columns(str(data)))


def recommend(model, users, k=10, exclude_seen=True):
    out = call_signature(model.signatures["recommend"], user_id=tf.constant(users), k=tf.constant([k]),
                         exclude_seen=tf.constant([exclude_seen]))
    return out["item_ids"].numpy(), out["scores"].numpy()


def interactions_up_to(data: Path, span: int) -> Dict[str, Set[str]]:
    """user -> items of every well-formed row of spans 1..span (what the version for `span` has seen)."""
    seen: Dict[str, Set[str]] = {}
    for s in range(1, span + 1):
        with open(data / f"span-{s}" / "interactions.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["timestamp"].strip().isdigit():
                    seen.setdefault(row["user_id"], set()).add(row["item_id"])
    return seen


def test_every_pushed_version_recommends_top_k_unseen_items(shared_run):
    work, data = shared_run["work"], shared_run["data"]
    assert versions(work)
    for version, path in versions(work):
        model = tf.saved_model.load(str(path))
        assert "recommend" in model.signatures, f"version {version} has no recommend signature"
        seen = interactions_up_to(data, pushed_span(path))
        catalog = {i for items in seen.values() for i in items}
        # The users with the most interactions: the exclusion matters most for them.
        heavy = sorted(seen, key=lambda u: -len(seen[u]))[:20]
        ids, scores = recommend(model, heavy, k=10)
        for row, user in enumerate(heavy):
            got = [i.decode() for i in ids[row] if i]
            assert len(got) == 10 and len(set(got)) == 10 and set(got) <= catalog
            assert not set(got) & seen[user], f"user {user!r} was recommended items they had seen"
            assert list(scores[row]) == sorted(scores[row], reverse=True) and all(0 < v < 1 for v in scores[row])
        # Asked to, it may recommend seen items: the ranking then runs over the whole catalog.
        with_seen, _ = recommend(model, heavy[:1], k=10, exclude_seen=False)
        assert all(with_seen[0])


def test_k_per_row_cold_start_and_bounds(shared_run):
    work = shared_run["work"]
    version = DeploymentState(str(work / "serving"), "increc").current().stable
    model = tf.saved_model.load(str(work / "serving" / "increc" / str(version)))
    out = call_signature(model.signatures["recommend"], user_id=tf.constant(["1", "never-seen-user"]),
                         k=tf.constant([3, 5]), exclude_seen=tf.constant([True]))
    ids = out["item_ids"].numpy()
    assert ids.shape == (2, 5)
    assert all(ids[0][:3]) and not any(ids[0][3:])  # a row asking for 3 is padded after 3
    assert all(ids[1])  # a user never seen gets a list, not an error
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be at most 1000"):
        recommend(model, ["1"], k=1001)
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be at least 1"):
        recommend(model, ["1"], k=0)


def test_ids_alone_score_with_the_snapshot_and_sent_features_override_it(shared_run):
    work, data = shared_run["work"], shared_run["data"]
    version, path = versions(work)[-1]
    model = tf.saved_model.load(str(path))
    snapshot = snapshot_of(work, data, pushed_span(path))
    users, items = snapshot.users.ids()[:5], snapshot.items.ids()[:5]
    item_rows = [snapshot.items.rows[i] for i in items]
    serve = model.signatures["serving_default"]
    ids_only = call_signature(serve, user_id=tf.constant(users), item_id=tf.constant(items))["probability"].numpy()
    # The same features sent explicitly: the snapshot's own values.
    explicit = {"genres": tf.constant(snapshot.items.values["genres"][item_rows]),
                "year": tf.constant(snapshot.items.values["year"][item_rows])}
    sent = call_signature(serve, user_id=tf.constant(users), item_id=tf.constant(items),
                          **explicit)["probability"].numpy()
    np.testing.assert_allclose(ids_only, sent, rtol=1e-6)
    other = call_signature(serve, user_id=tf.constant(users), item_id=tf.constant(items),
                           genres=tf.constant(["Horror"] * 5))["probability"].numpy()
    assert not np.allclose(other, ids_only)
    with pytest.raises(tf.errors.InvalidArgumentError, match="genres: send one value per row, or none"):
        call_signature(serve, user_id=tf.constant(users), item_id=tf.constant(items), genres=tf.constant(["x"]))


def test_runs_record_top_k_metrics_and_the_ids_only_gap(shared_run):
    work = shared_run["work"]
    records = [json.loads(line) for line in (work / "history.jsonl").read_text().splitlines() if line.strip()]
    measured = [r for r in records if r.get("live_auc") is not None]
    assert measured, "no span was measured against a serving version"
    for r in measured:
        ranking = r["ranking"]
        assert ranking["users"] > 0
        for key in ("precision@10", "recall@10", "ndcg@10", "precision@50", "recall@50", "ndcg@50"):
            assert 0.0 <= ranking[key] <= 1.0
        assert ranking["recall@50"] >= ranking["recall@10"]
        assert r["feature_lookup_gap"] == pytest.approx(r["live_auc_logged_features"] - r["live_auc"])
    report = shared_run["report"]
    assert any(s.get("ranking") for s in report["spans"]) and report["mean_live_recall@10"] is not None
    status = increc("status", "--work", str(work))
    assert "recall@10" in status.stdout
    table = increc("history", "--work", str(work)).stdout.splitlines()
    header = table[0].split()
    assert {"live_auc", "logged_auc", "recall@10"} <= set(header)
    last = next(line.split() for line in reversed(table) if line.startswith(f"{measured[-1]['span']} "))
    assert last[header.index("recall@10")] == f"{measured[-1]['ranking']['recall@10']:.4f}"
