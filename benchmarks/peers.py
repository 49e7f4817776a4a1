"""The peers increc is measured against, each retrained from scratch on spans 1..N-1 before scoring span N.

Id-only peers (they see user and item ids and nothing else):

- Popularity: each item's positive rate, smoothed towards the global rate
  by `prior_weight` pseudo-interactions (unseen items get the global rate).
- LogisticIds: scikit-learn's LogisticRegression (its defaults) on one-hot
  user and item ids; unseen ids contribute nothing.

Feature-equal peers (they see exactly increc's inputs: the ids, the
categorical and numeric side features and the four history features, read
from the same tf.Examples the pipeline trained on; see `Inputs`):

- PopularityHistory: the item's mean outcome so far, as the history feature
  `item_history_mean` carries it at each row. That is popularity kept
  current to the second (span N's earlier rows included) instead of
  refitted once per span; there is nothing to fit. Where a row has no such
  value (nothing was known yet) it ranks as an average item; inputs
  without the feature get the id-only Popularity.
- LogisticFeatures: logistic regression on one-hot ids, multi-hot
  categorical side features and standardised numeric features (a missing
  number becomes the training mean, as in increc's Transform, plus an
  indicator that it was missing).
- GradientBoostedTrees: scikit-learn's HistGradientBoostingClassifier.
  Its native categorical support takes at most 255 categories, far fewer
  than there are users or items, so each id becomes the ordinal code of
  the 254 most frequent ids of the training spans, every other id (and
  any id unseen in training) one shared "other" code (`id_encoding=
  "codes"`). Frequency and target encodings of the ids are the other
  option (`id_encoding="rates"`: the id's count and its positive rate
  smoothed towards the global rate by `prior_weight` pseudo-rows, out of 5
  folds on the training rows, count 0 and the global rate for an unseen
  id). They are not the default: the history features already are such
  encodings, computed from what was known before each row, and encodings
  over the whole training window let a training row see its ids' later
  outcomes, which no row of the scored span can (on MovieTweetings they
  scored below the codes). Single-valued categorical side features are
  native categoricals the same way (254 most frequent values, then
  "other"; no value is missing); multi-valued ones (genres) become
  indicator columns of their `max_indicators` most frequent values plus
  the number of values. Numbers go in as they are, NaN where missing (the
  trees learn which side missing rows go). The hyperparameters are fixed
  defaults, not tuned on the scored spans: learning rate 0.05, up to 400
  trees of 31 leaves, 40 rows a leaf, L2 1.0, early stopping on a random
  10% of the training rows (never on the span being scored). It runs one
  thread by default.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ITEM_HISTORY_MEAN = "item_history_mean"


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


# --- the inputs of feature-equal peers ---

@dataclasses.dataclass
class Inputs:
    """Rows of increc's model inputs: ids, categorical side features (each row a tuple of values: a
    multi-valued feature such as genres holds several, a missing one none) and numeric side features
    (NaN where missing; the first value where a row has several, as increc's Transform takes)."""

    users: np.ndarray  # object (str)
    items: np.ndarray  # object (str)
    categorical: Dict[str, List[Tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    numeric: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.users = np.asarray(self.users, dtype=object)
        self.items = np.asarray(self.items, dtype=object)
        self.numeric = {k: np.asarray(v, dtype=np.float64) for k, v in self.numeric.items()}
        rows = len(self.users)
        for name, values in [("items", self.items), *self.categorical.items(), *self.numeric.items()]:
            if len(values) != rows:
                raise ValueError(f"{rows} users but {len(values)} values of {name}")

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def concat(cls, parts: Sequence["Inputs"]) -> "Inputs":
        if not parts:
            raise ValueError("no inputs to concatenate")
        return cls(np.concatenate([p.users for p in parts]), np.concatenate([p.items for p in parts]),
                   {k: [v for p in parts for v in p.categorical[k]] for k in parts[0].categorical},
                   {k: np.concatenate([p.numeric[k] for p in parts]) for k in parts[0].numeric})


def parse_examples(records: Sequence[bytes], categorical: Sequence[str],
                   numeric: Sequence[str]) -> Tuple[Inputs, np.ndarray]:
    """(Inputs, labels) of serialized tf.Examples as SpanExampleGen writes them."""
    import tensorflow as tf

    users, items, labels = [], [], []
    cats: Dict[str, List[Tuple[str, ...]]] = {name: [] for name in categorical}
    nums: Dict[str, List[float]] = {name: [] for name in numeric}
    for record in records:
        feature = tf.train.Example.FromString(record).features.feature
        users.append(feature["user_id"].bytes_list.value[0].decode())
        items.append(feature["item_id"].bytes_list.value[0].decode())
        labels.append(feature["label"].int64_list.value[0])
        for name, values in cats.items():
            values.append(tuple(v.decode() for v in feature[name].bytes_list.value) if name in feature else ())
        for name, values in nums.items():
            if name in feature:
                f = feature[name]
                given = f.float_list.value or f.int64_list.value
                values.append(float(given[0]) if given else np.nan)
            else:
                values.append(np.nan)
    return Inputs(users, items, cats, {k: np.array(v) for k, v in nums.items()}), np.array(labels, dtype=np.int64)


def _codes(keys: np.ndarray, index) -> np.ndarray:
    """Positions of `keys` in a pandas Index, -1 for keys not in it."""
    return index.get_indexer(keys)


def _value_counts(rows: List[Tuple[str, ...]]) -> List[Tuple[str, int]]:
    counts: Dict[str, int] = {}
    for values in rows:
        for v in values:
            counts[v] = counts.get(v, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


class PopularityHistory:
    def __init__(self, prior_weight: float = 5.0):
        self.fallback = Popularity(prior_weight)
        self.typical: Optional[float] = None

    def fit(self, inputs: Inputs, labels: np.ndarray) -> "PopularityHistory":
        self.fallback.fit(inputs.users, inputs.items, labels)
        current = inputs.numeric.get(ITEM_HISTORY_MEAN)
        known = current[~np.isnan(current)] if current is not None else np.zeros(0)
        self.typical = float(known.mean()) if known.size else None
        return self

    def predict(self, inputs: Inputs) -> np.ndarray:
        current = inputs.numeric.get(ITEM_HISTORY_MEAN)
        if current is None or self.typical is None:
            return self.fallback.predict(inputs.users, inputs.items)
        # Only a row that came before anything was known lacks the mean: it ranks as an average item.
        return np.where(np.isnan(current), self.typical, current)


class LogisticFeatures:
    def __init__(self, **kwargs):
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(max_iter=1000, **kwargs)

    def _fit_encoding(self, inputs: Inputs) -> None:
        import pandas as pd

        self.ids = {name: pd.Index(pd.unique(values)) for name, values in (("user", inputs.users),
                                                                            ("item", inputs.items))}
        self.vocabularies = {name: pd.Index([v for v, _ in _value_counts(rows)])
                             for name, rows in inputs.categorical.items()}
        self.means, self.scales, self.indicators = {}, {}, []
        for name, values in inputs.numeric.items():
            known = values[~np.isnan(values)]
            self.means[name] = float(known.mean()) if known.size else 0.0
            self.scales[name] = float(known.std()) if known.size and known.std() > 0 else 1.0
            if known.size < values.size:
                self.indicators.append(name)

    def _matrix(self, inputs: Inputs):
        from scipy import sparse

        rows = len(inputs)
        blocks = []
        for name, values in (("user", inputs.users), ("item", inputs.items)):
            codes = _codes(values, self.ids[name])
            seen = codes >= 0
            blocks.append(sparse.csr_matrix((np.ones(seen.sum()), (np.flatnonzero(seen), codes[seen])),
                                            shape=(rows, len(self.ids[name]))))
        for name, index in self.vocabularies.items():
            row_of = np.repeat(np.arange(rows), [len(v) for v in inputs.categorical[name]])
            flat = np.array([v for values in inputs.categorical[name] for v in values], dtype=object)
            codes = _codes(flat, index) if flat.size else np.zeros(0, dtype=np.int64)
            seen = codes >= 0
            matrix = sparse.csr_matrix((np.ones(seen.sum()), (row_of[seen], codes[seen])), shape=(rows, len(index)))
            matrix.sum_duplicates()
            matrix.data[:] = 1.0
            blocks.append(matrix)
        dense = []
        for name in self.means:
            values = inputs.numeric[name]
            dense.append((np.where(np.isnan(values), self.means[name], values) - self.means[name]) / self.scales[name])
        dense += [np.isnan(inputs.numeric[name]).astype(np.float64) for name in self.indicators]
        if dense:
            blocks.append(sparse.csr_matrix(np.column_stack(dense)))
        return sparse.hstack(blocks, format="csr")

    def fit(self, inputs: Inputs, labels: np.ndarray) -> "LogisticFeatures":
        self._fit_encoding(inputs)
        self.model.fit(self._matrix(inputs), np.asarray(labels))
        return self

    def predict(self, inputs: Inputs) -> np.ndarray:
        return self.model.predict_proba(self._matrix(inputs))[:, 1]


class _IdEncoder:
    """An id's count and smoothed positive rate on the training rows; out of fold for the training rows."""

    def __init__(self, prior_weight: float, folds: int):
        self.prior_weight, self.folds = prior_weight, folds

    def fit_transform(self, keys: np.ndarray, labels: np.ndarray, fold: np.ndarray) -> np.ndarray:
        import pandas as pd

        codes, uniques = pd.factorize(keys)
        self.index = pd.Index(uniques)
        labels = labels.astype(np.float64)
        self.prior = float(labels.mean())
        self.count = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
        self.sum = np.bincount(codes, weights=labels, minlength=len(uniques))
        out = np.empty((len(keys), 2))
        for f in range(self.folds):
            held = fold == f
            count = self.count - np.bincount(codes[held], minlength=len(uniques))
            summed = self.sum - np.bincount(codes[held], weights=labels[held], minlength=len(uniques))
            out[held] = self._encode(count[codes[held]], summed[codes[held]])
        return out

    def _encode(self, count: np.ndarray, summed: np.ndarray) -> np.ndarray:
        rate = (summed + self.prior_weight * self.prior) / (count + self.prior_weight)
        return np.column_stack([np.log1p(count), rate])

    def transform(self, keys: np.ndarray) -> np.ndarray:
        codes = _codes(keys, self.index)
        seen = codes >= 0
        # Out-of-fold counts saw (folds - 1) / folds of the rows: scale whole-set counts the same way.
        share = (self.folds - 1) / self.folds
        count = np.where(seen, self.count[np.maximum(codes, 0)] * share, 0.0)
        summed = np.where(seen, self.sum[np.maximum(codes, 0)] * share, 0.0)
        return self._encode(count, summed)


class GradientBoostedTrees:
    MAX_CATEGORIES = 255  # HistGradientBoosting's native categorical limit (max_bins)

    ID_ENCODINGS = ("codes", "rates")

    def __init__(self, id_encoding: str = "codes", prior_weight: float = 5.0, folds: int = 5,
                 max_indicators: int = 32, seed: int = 0, threads: int = 1, **params):
        if id_encoding not in self.ID_ENCODINGS:
            raise ValueError(f"id_encoding is one of {', '.join(self.ID_ENCODINGS)}, not {id_encoding!r}")
        self.id_encoding = id_encoding
        self.prior_weight, self.folds, self.max_indicators, self.seed = prior_weight, folds, max_indicators, seed
        # One thread by default: on a busy machine OpenMP threads that wait for a core cost more than they save.
        self.threads = threads
        self.params = dict(learning_rate=0.05, max_iter=400, max_leaf_nodes=31, min_samples_leaf=40,
                           l2_regularization=1.0, early_stopping=True, validation_fraction=0.1,
                           n_iter_no_change=20, random_state=seed)
        self.params.update(params)
        self.columns: List[str] = []

    def _fit_categorical(self, inputs: Inputs) -> None:
        import pandas as pd

        self.single: Dict[str, object] = {}
        self.multi: Dict[str, object] = {}
        for name, rows in inputs.categorical.items():
            ranked = [v for v, _ in _value_counts(rows)]
            if max((len(v) for v in rows), default=0) <= 1:
                self.single[name] = pd.Index(ranked[: self.MAX_CATEGORIES - 1])
            else:
                self.multi[name] = pd.Index(ranked[: self.max_indicators])

    def _top_codes(self, values: np.ndarray, index) -> np.ndarray:
        """Native categorical codes: a value's rank among the most frequent, the rest as one 'other'."""
        codes = _codes(values, index).astype(np.float64)
        codes[codes < 0] = self.MAX_CATEGORIES - 1
        return codes

    def _fit_ids(self, inputs: Inputs, labels: np.ndarray) -> List[np.ndarray]:
        import pandas as pd

        ids = {"user_id": inputs.users, "item_id": inputs.items}
        if self.id_encoding == "codes":
            self.id_codes = {}
            for name, values in ids.items():
                counts = pd.Series(values).value_counts(sort=False)
                ranked = counts.index[np.lexsort((counts.index.astype(str), -counts.to_numpy()))]
                self.id_codes[name] = pd.Index(ranked[: self.MAX_CATEGORIES - 1])
            return self._ids(inputs)
        fold = np.random.default_rng(self.seed).integers(0, self.folds, len(inputs))
        self.encoders = {name: _IdEncoder(self.prior_weight, self.folds) for name in ids}
        return [self.encoders[name].fit_transform(values, labels, fold) for name, values in ids.items()]

    def _ids(self, inputs: Inputs) -> List[np.ndarray]:
        ids = {"user_id": inputs.users, "item_id": inputs.items}
        if self.id_encoding == "codes":
            return [self._top_codes(values, self.id_codes[name]) for name, values in ids.items()]
        return [self.encoders[name].transform(values) for name, values in ids.items()]

    def _id_names(self) -> Tuple[List[str], List[bool]]:
        if self.id_encoding == "codes":
            return ["user_id", "item_id"], [True, True]
        return ["user_count", "user_rate", "item_count", "item_rate"], [False] * 4

    def _side(self, inputs: Inputs) -> Tuple[List[np.ndarray], List[str], List[bool]]:
        columns, names, categorical = [], [], []
        for name, index in self.single.items():
            rows = inputs.categorical[name]
            codes = self._top_codes(np.array([v[0] if v else "" for v in rows], dtype=object), index)
            codes[np.array([not v for v in rows], dtype=bool)] = np.nan
            columns.append(codes), names.append(name), categorical.append(True)
        for name, index in self.multi.items():
            rows = inputs.categorical[name]
            row_of = np.repeat(np.arange(len(rows)), [len(v) for v in rows])
            flat = np.array([v for values in rows for v in values], dtype=object)
            codes = _codes(flat, index) if flat.size else np.zeros(0, dtype=np.int64)
            seen = codes >= 0
            hot = np.zeros((len(rows), len(index)))
            hot[row_of[seen], codes[seen]] = 1.0
            columns += list(hot.T)
            names += [f"{name}={v}" for v in index]
            columns.append(np.array([len(v) for v in rows], dtype=np.float64))
            names.append(f"{name}_count")
            categorical += [False] * (len(index) + 1)
        for name, values in inputs.numeric.items():
            columns.append(values), names.append(name), categorical.append(False)
        return columns, names, categorical

    def fit(self, inputs: Inputs, labels: np.ndarray) -> "GradientBoostedTrees":
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        labels = np.asarray(labels)
        ids = self._fit_ids(inputs, labels)
        self._fit_categorical(inputs)
        side, names, categorical = self._side(inputs)
        id_names, id_categorical = self._id_names()
        self.columns = [*id_names, *names]
        matrix = np.column_stack([*ids, *side])
        mask = np.array(id_categorical + categorical)
        self.model = HistGradientBoostingClassifier(categorical_features=mask if mask.any() else None,
                                                    **self.params)
        with threadpool_limits(self.threads):
            self.model.fit(matrix, labels)
        return self

    def _matrix(self, inputs: Inputs) -> np.ndarray:
        side, _, _ = self._side(inputs)
        return np.column_stack([*self._ids(inputs), *side])

    def predict(self, inputs: Inputs) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads):
            return self.model.predict_proba(self._matrix(inputs))[:, 1]


PEERS = {"popularity": Popularity, "logistic_regression": LogisticIds}
FEATURE_PEERS = {"popularity_history": PopularityHistory, "logistic_regression_history": LogisticFeatures,
                 "gbm": GradientBoostedTrees}
