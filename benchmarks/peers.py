"""The peers increc is measured against: models that know user and item ids and nothing else.

- Popularity: each item's positive rate, smoothed towards the global rate
  by `prior_weight` pseudo-interactions (unseen items get the global rate).
- LogisticIds: scikit-learn's LogisticRegression (its defaults) on one-hot
  user and item ids; unseen ids contribute nothing.

Both are retrained from scratch on spans 1..N-1 before scoring span N, like
full retraining.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


class Popularity:
    def __init__(self, prior_weight: float = 5.0):
        self.prior_weight = prior_weight
        self.rates: Dict[str, float] = {}
        self.global_rate = 0.5

    def fit(self, users: Sequence[str], items: Sequence[str], labels: np.ndarray) -> "Popularity":
        labels = np.asarray(labels, dtype=np.float64)
        self.global_rate = float(labels.mean()) if labels.size else 0.5
        positives: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for item, label in zip(items, labels):
            positives[item] = positives.get(item, 0.0) + label
            counts[item] = counts.get(item, 0) + 1
        prior = self.prior_weight * self.global_rate
        self.rates = {i: (positives[i] + prior) / (counts[i] + self.prior_weight) for i in counts}
        return self

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.array([self.rates.get(i, self.global_rate) for i in items], dtype=np.float64)


class LogisticIds:
    def __init__(self, **kwargs):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import OneHotEncoder

        self.encoder = OneHotEncoder(handle_unknown="ignore")
        self.model = LogisticRegression(max_iter=1000, **kwargs)

    @staticmethod
    def _columns(users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.column_stack([np.asarray(users, dtype=object), np.asarray(items, dtype=object)])

    def fit(self, users: Sequence[str], items: Sequence[str], labels: np.ndarray) -> "LogisticIds":
        self.model.fit(self.encoder.fit_transform(self._columns(users, items)), np.asarray(labels))
        return self

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return self.model.predict_proba(self.encoder.transform(self._columns(users, items)))[:, 1]


PEERS = {"popularity": Popularity, "logistic_regression": LogisticIds}
