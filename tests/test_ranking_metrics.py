"""Prequential top-K metrics against hand computations on tiny lists."""
from __future__ import annotations

from math import log2

import numpy as np
import pytest

from models.ranking_metrics import ranking_metrics, relevant_items


def test_relevant_items_are_each_users_positives():
    users = np.array(["a", "a", "a", "b", "c"])
    items = np.array(["x", "y", "x", "x", "z"])
    labels = np.array([1, 0, 1, 1, 0])
    assert relevant_items(users, items, labels) == {"a": {"x"}, "b": {"x"}}
    assert relevant_items([], [], []) == {}
    with pytest.raises(ValueError):
        relevant_items(["a"], ["x", "y"], [1, 1])


def test_metrics_match_a_hand_computation():
    relevant = {
        "a": {"x", "y"},
        "b": {"z"},
        "c": set(),   # nothing relevant: not evaluated, whatever it was recommended
        "d": {"w"},   # no recommendation at all: zeros
    }
    recommended = {
        "a": ["x", "q", "y"],
        "b": ["q", "z"],
        "c": ["x"],
        "e": ["x"],   # not in relevant: not evaluated
    }
    result = ranking_metrics(recommended, relevant, ks=(2, 5))

    assert list(result) == ["precision@2", "recall@2", "ndcg@2", "precision@5", "recall@5", "ndcg@5", "users"]
    assert result["users"] == 3  # a, b, d
    # K=2: a's top 2 is [x, q] (one hit at rank 1), b's is [q, z] (one hit at rank 2), d has none.
    assert result["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert result["recall@2"] == pytest.approx((1 / 2 + 1 / 1 + 0) / 3)
    # a: DCG 1/log2(2), IDCG of two hits; b: DCG 1/log2(3), IDCG of one hit.
    ndcg_a = (1 / log2(2)) / (1 / log2(2) + 1 / log2(3))
    ndcg_b = (1 / log2(3)) / (1 / log2(2))
    assert result["ndcg@2"] == pytest.approx((ndcg_a + ndcg_b + 0) / 3)
    # K=5 is longer than every list; precision still divides by 5. a hits at ranks 1 and 3.
    assert result["precision@5"] == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)
    assert result["recall@5"] == pytest.approx((2 / 2 + 1 / 1 + 0) / 3)
    # a's IDCG covers min(5, 2) = 2 hits.
    ndcg_a = (1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3))
    assert result["ndcg@5"] == pytest.approx((ndcg_a + ndcg_b + 0) / 3)


def test_default_cutoffs_are_10_and_50():
    result = ranking_metrics({"a": ["x"]}, {"a": {"x"}})
    assert list(result) == ["precision@10", "recall@10", "ndcg@10", "precision@50", "recall@50", "ndcg@50",
                            "users"]
    assert result["precision@10"] == pytest.approx(1 / 10)
    assert result["precision@50"] == pytest.approx(1 / 50)
    assert result["recall@10"] == result["ndcg@10"] == result["recall@50"] == result["ndcg@50"] == 1.0
    assert result["users"] == 1


def test_a_repeated_item_keeps_its_slot_but_counts_once():
    relevant = {"a": {"x", "y"}}
    result = ranking_metrics({"a": ["x", "x", "y"]}, relevant, ks=(2, 3))
    # K=2: [x, x] finds x once.
    assert result["precision@2"] == pytest.approx(1 / 2)
    assert result["recall@2"] == pytest.approx(1 / 2)
    assert result["ndcg@2"] == pytest.approx((1 / log2(2)) / (1 / log2(2) + 1 / log2(3)))
    # K=3: hits at ranks 1 and 3; the repeat at rank 2 is a miss.
    assert result["precision@3"] == pytest.approx(2 / 3)
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["ndcg@3"] == pytest.approx((1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3)))

    repeated = ranking_metrics({"a": ["x", "x"]}, {"a": {"x"}}, ks=(2,))
    assert repeated["precision@2"] == pytest.approx(1 / 2)
    assert repeated["recall@2"] == repeated["ndcg@2"] == 1.0


def test_nothing_relevant_gives_no_figures():
    for relevant in ({}, {"a": set()}):
        result = ranking_metrics({"a": ["x"]}, relevant, ks=(10,))
        assert result == {"precision@10": None, "recall@10": None, "ndcg@10": None, "users": 0}


def test_cutoffs_must_be_positive():
    with pytest.raises(ValueError):
        ranking_metrics({}, {"a": {"x"}}, ks=(0, 10))
    with pytest.raises(ValueError):
        ranking_metrics({}, {"a": {"x"}}, ks=())
