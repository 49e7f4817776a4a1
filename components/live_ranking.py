"""Prequential top-K quality: what `recommend` of the version serving when span N arrived gave its users,
against the items they liked in span N.

The DeploymentGuard streams span N once; this keeps the positives of at most
`MAX_USERS` users, those with the smallest hash of their id (the same users
on a rerun, and memory bounded by them, not by the span), then asks the
serving version for each user's top 50 (seen items excluded, ids only, as a
client would) and scores precision, recall and NDCG at 10 and 50
(models/ranking_metrics.py).
"""
from __future__ import annotations

import heapq
import zlib
from typing import Callable, Dict, List, Optional, Set

import numpy as np

from models.ranking_metrics import ranking_metrics

MAX_USERS = 1000
KS = (10, 50)
USERS_PER_CALL = 64


class PositiveSample:
    """Positives (user -> items liked) of at most `max_users` users, picked by the smallest crc32 of the id."""

    def __init__(self, max_users: int = MAX_USERS):
        self.max_users = max_users
        self.items: Dict[str, Set[str]] = {}
        self._heap: List[tuple] = []  # (-hash, user): the largest kept hash on top

    def add(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> None:
        for user, item in zip(users[labels == 1].tolist(), items[labels == 1].tolist()):
            user, item = user.decode(), item.decode()
            if user in self.items:
                self.items[user].add(item)
                continue
            key = zlib.crc32(user.encode())
            if len(self._heap) < self.max_users:
                heapq.heappush(self._heap, (-key, user))
            elif key < -self._heap[0][0]:
                _, dropped = heapq.heapreplace(self._heap, (-key, user))
                del self.items[dropped]
            else:
                continue
            self.items[user] = {item}


def evaluate(recommend: Callable[[List[str], int], Dict[str, List[str]]], sample: PositiveSample) -> Optional[dict]:
    """Ranking metrics of `recommend(users, k)` against the sample's positives; None without positives."""
    users = sorted(sample.items)
    if not users:
        return None
    recommended: Dict[str, List[str]] = {}
    for start in range(0, len(users), USERS_PER_CALL):
        recommended.update(recommend(users[start:start + USERS_PER_CALL], max(KS)))
    out = ranking_metrics(recommended, sample.items, KS)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def _lists(item_ids: np.ndarray, users: List[str]) -> Dict[str, List[str]]:
    return {user: [i.decode() for i in row if i] for user, row in zip(users, item_ids)}


def server_recommender(client, model_name: str, label: str):
    def recommend(users: List[str], k: int) -> Dict[str, List[str]]:
        inputs = {"user_id": np.array([u.encode() for u in users], dtype=object), "k": np.array([k], np.int32),
                  "exclude_seen": np.array([True])}
        out = client.predict(model_name, inputs, label=label, signature="recommend")
        return _lists(out["item_ids"], users)
    return recommend


def saved_model_recommender(signatures):
    """`recommend` of a loaded SavedModel's signatures; None when the version has none (pushed before it
    existed)."""
    import tensorflow as tf

    from models.export import call_signature

    if "recommend" not in signatures:
        return None

    def recommend(users: List[str], k: int) -> Dict[str, List[str]]:
        out = call_signature(signatures["recommend"], user_id=tf.constant(users), k=tf.constant([k]),
                             exclude_seen=tf.constant([True]))
        return _lists(out["item_ids"].numpy(), users)
    return recommend
