"""Prequential top-K metrics: how well the top of a recommendation list finds what a user liked next.

A recommender fit on spans 1..N-1 recommends K items per user; span N's
positives are what each user actually liked (`relevant_items`). Per user,
with hits counted in the first K recommendations:

- precision@K = hits / K (K, not the list's length: a short list is not
  rewarded for being short);
- recall@K = hits / number of relevant items;
- NDCG@K = DCG / IDCG with binary gains, DCG = sum of 1 / log2(rank + 1)
  over the hits (rank 1 first), IDCG the DCG of min(K, relevant) hits at
  the top.

`ranking_metrics` averages them over the users with at least one relevant
item; a user without a recommendation list scores zero. An item repeated
in a list keeps its slot but only its first occurrence can be a hit, so a
list cannot score more by repeating what it got right.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np


def relevant_items(users: Sequence[str], items: Sequence[str], labels: Sequence[int]) -> Dict[str, Set[str]]:
    """Per user, the items with label 1; users with only negatives have no entry."""
    if not len(users) == len(items) == len(labels):
        raise ValueError(f"{len(users)} users, {len(items)} items and {len(labels)} labels")
    relevant: Dict[str, Set[str]] = {}
    for user, item, label in zip(users, items, labels):
        if label == 1:
            relevant.setdefault(str(user), set()).add(str(item))
    return relevant


def _hits(recommended: Iterable[str], relevant: Set[str], depth: int) -> np.ndarray:
    """Whether each of the first `depth` recommendations is a relevant item seen there for the first time."""
    shown: Set[str] = set()
    hits: List[bool] = []
    for item in itertools.islice(recommended, depth):
        hits.append(item in relevant and item not in shown)
        shown.add(item)
    return np.array(hits, dtype=bool)


def ranking_metrics(recommended: Mapping[str, Sequence[str]], relevant: Mapping[str, Set[str]],
                    ks: Sequence[int] = (10, 50)) -> Dict[str, Optional[float]]:
    """Mean precision@K, recall@K and NDCG@K for each K, and `users`, how many users were evaluated.

    Keys are `precision@K`, `recall@K`, `ndcg@K` for each K in order, then
    `users`. With no user to evaluate every metric is None and `users` 0.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    names = [f"{metric}@{k}" for k in ks for metric in ("precision", "recall", "ndcg")]
    evaluated = [user for user, items in relevant.items() if items]
    if not evaluated:
        return {**{name: None for name in names}, "users": 0}

    depth = max(ks)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))  # rank r (from 1) is discounted by log2(r + 1)
    totals = dict.fromkeys(names, 0.0)
    for user in evaluated:
        wanted = relevant[user]
        hits = _hits(recommended.get(user, ()), wanted, depth)
        for k in ks:
            top = hits[:k]
            found = int(top.sum())
            totals[f"precision@{k}"] += found / k
            totals[f"recall@{k}"] += found / len(wanted)
            ideal = discounts[:min(k, len(wanted))].sum()
            totals[f"ndcg@{k}"] += discounts[:top.size][top].sum() / ideal
    return {**{name: float(total / len(evaluated)) for name, total in totals.items()}, "users": len(evaluated)}
