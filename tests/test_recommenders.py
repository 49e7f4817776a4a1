"""The ranking benchmark's baseline recommenders on small hand-made logs."""
from __future__ import annotations

from math import sqrt

import numpy as np
import pytest

from benchmarks.recommenders import CoOccurrence, Ease, Popularity, RecentPopularity


def columns(rows):
    users, items, labels = zip(*rows)
    return list(users), list(items), np.array(labels)


# Positives per item: a 3, b 2, d 1, e 1; c has only negatives.
POPULARITY_LOG = columns([
    ("u1", "a", 1), ("u1", "b", 1), ("u1", "c", 0),
    ("u2", "a", 1), ("u2", "b", 1),
    ("u3", "a", 1), ("u3", "e", 1),
    ("u4", "d", 1), ("u4", "c", 0),
])


def test_popularity_ranks_by_positives_ties_by_id_and_skips_seen_items():
    model = Popularity().fit(*POPULARITY_LOG)
    assert model.recommend(["new"], 10) == {"new": ["a", "b", "d", "e"]}, "c was never liked"
    result = model.recommend(["u1", "u3", "u4", "new"], 2)
    assert result == {"u1": ["d", "e"], "u3": ["b", "d"], "u4": ["a", "b"], "new": ["a", "b"]}
    assert model.recommend(["u1"], 10) == {"u1": ["d", "e"]}, "fewer than k when nothing else is left"
    with pytest.raises(ValueError):
        model.recommend(["u1"], 0)


def test_recent_popularity_weighs_older_spans_down():
    # a: 3 positives in span 1; b: 2 in span 3 (the newest). At decay 0.5, a weighs 3 x 0.25 < 2.
    users, items, labels = POPULARITY_LOG
    spans = [1, 3, 1, 1, 3, 1, 2, 2, 1]
    assert RecentPopularity(0.5).fit(users, items, labels, spans).recommend(["new"], 2) == {"new": ["b", "a"]}
    assert RecentPopularity(1.0).fit(users, items, labels, spans).ranked == Popularity().fit(*POPULARITY_LOG).ranked
    # At 0 only the newest span counts: b alone was liked there, then the rest tie at 0 by id.
    assert RecentPopularity(0.0).fit(users, items, labels, spans).ranked[0] == "b"
    with pytest.raises(ValueError):
        RecentPopularity(0.5).fit(users, items, labels, spans[:3])


# "pop" is liked by four users who like nothing else; x goes with y (twice) and z (once).
CO_OCCURRENCE_LOG = columns([
    ("p1", "pop", 1), ("p2", "pop", 1), ("p3", "pop", 1), ("p4", "pop", 1),
    ("v1", "x", 1), ("v1", "y", 1), ("v1", "z", 1),
    ("v2", "x", 1), ("v2", "y", 1),
    ("t", "x", 1), ("t", "z", 0),   # t saw z and did not like it
    ("w", "y", 1),
    ("n", "pop", 0),                # n liked nothing
])


def test_co_occurrence_puts_related_items_ahead_of_popular_ones():
    model = CoOccurrence().fit(*CO_OCCURRENCE_LOG)
    assert Popularity().fit(*CO_OCCURRENCE_LOG).recommend(["t"], 2)["t"] == ["pop", "y"]
    # t liked x: y scores 2 / sqrt(3 * 2); z would score 1 / sqrt(3 * 1) but t has seen it; then popularity.
    assert model.recommend(["t"], 2) == {"t": ["y", "pop"]}
    assert "z" not in model.recommend(["t"], 10)["t"]
    # w liked y: x scores 2 / sqrt(2 * 3) > z's 1 / sqrt(2 * 1).
    assert 2 / sqrt(2 * 3) > 1 / sqrt(2 * 1)
    assert model.recommend(["w"], 3) == {"w": ["x", "z", "pop"]}


def test_co_occurrence_falls_back_to_popularity():
    model = CoOccurrence().fit(*CO_OCCURRENCE_LOG)
    popularity = Popularity().fit(*CO_OCCURRENCE_LOG)
    users = ["unknown", "n", "p1"]  # never seen, liked nothing, liked only an item nothing co-occurs with
    assert model.recommend(users, 3) == popularity.recommend(users, 3)
    assert model.recommend(["n"], 3)["n"] == ["x", "y", "z"], "n has seen pop"


def reference_co_occurrence(users, items, labels, k):
    """The same recommender written out densely, one user at a time."""
    user_ids, item_ids = sorted(set(users)), sorted(set(items))
    liked = np.zeros((len(user_ids), len(item_ids)))
    seen = np.zeros_like(liked, dtype=bool)
    for user, item, label in zip(users, items, labels):
        seen[user_ids.index(user), item_ids.index(item)] = True
        if label == 1:
            liked[user_ids.index(user), item_ids.index(item)] = 1.0
    together = liked.T @ liked
    np.fill_diagonal(together, 0.0)
    likers = liked.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = np.nan_to_num(together / np.sqrt(np.outer(likers, likers)))
    popularity = Popularity().fit(users, items, labels)
    result = {}
    for row, user in enumerate(user_ids):
        scores = np.round(liked[row] @ similarity, 9)  # equal scores tie, as in the recommender
        ranked = sorted((-scores[j], item_ids[j]) for j in range(len(item_ids))
                        if scores[j] > 0 and not seen[row, j])
        result[user] = popularity.complete(user, [item for _, item in ranked[:k]], k)
    return result


@pytest.mark.parametrize("chunk_size", [1, 7, 512])
def test_co_occurrence_matches_a_dense_reference(chunk_size):
    rng = np.random.default_rng(3)
    # Few items and skewed picks, so scores tie and lists run short.
    users = [f"u{u}" for u in rng.integers(0, 40, 300)]
    items = [f"i{i}" for i in rng.zipf(1.6, 300) % 25]
    labels = (rng.random(300) < 0.6).astype(int)
    expected = reference_co_occurrence(users, items, labels, k=5)
    model = CoOccurrence(chunk_size=chunk_size).fit(users, items, labels)
    assert model.recommend(sorted(set(users)), 5) == expected


def test_ease_weights_are_each_items_ridge_regression_on_the_others():
    users, items, labels = CO_OCCURRENCE_LOG
    model = Ease(l2=0.5).fit(users, items, labels)
    x = model.liked.toarray()
    for j in range(x.shape[1]):
        others = np.delete(np.arange(x.shape[1]), j)
        a = x[:, others]
        expected = np.linalg.solve(a.T @ a + 0.5 * np.eye(others.size), a.T @ x[:, j])
        np.testing.assert_allclose(model.weights[others, j], expected, atol=1e-9)
        assert model.weights[j, j] == 0.0, "an item does not recommend itself"


def test_ease_recommends_related_unseen_items_and_falls_back_to_popularity():
    model = Ease(l2=0.5).fit(*CO_OCCURRENCE_LOG)
    result = model.recommend(["w", "t", "n", "stranger"], 2)
    assert result["w"][0] == "x", "w liked y, which goes with x"
    assert result["t"] == ["y", "pop"], "t liked x: y goes with it; x and z were seen; then the most liked"
    assert result["n"] == ["x", "y"], "n liked nothing: the most liked items n did not see ('pop' was seen)"
    assert result["stranger"] == ["pop", "x"]
    assert Ease(max_items=2).fit(*CO_OCCURRENCE_LOG).item_ids.tolist() == ["pop", "x"], "the most liked items"
    with pytest.raises(ValueError):
        Ease(l2=0)
