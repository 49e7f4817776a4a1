"""Baseline top-K recommenders for the prequential ranking benchmark.

Both are fit on the interactions of spans 1..N-1 and asked, per user, for
the K items to show next. Items the user already interacted with in the fit
data (liked or not) are never recommended: the benchmark rewards finding
new items, not repeating known ones.

- Popularity: items by their number of positive interactions, ties by item
  id so runs repeat; only items with at least one positive are ranked.
- RecentPopularity: Popularity with each positive weighted by `decay` per
  span between its span and the newest fit span (1: Popularity; the weights
  increc's popularity prior uses, `popularity_decay`).
- CoOccurrence: item-to-item. X is the user x item matrix of positives,
  C = X^T X with the diagonal zeroed counts the users who liked both items,
  and cosine normalisation C_ij / sqrt(n_i n_j) (n_i: users who liked i)
  keeps popular items from co-occurring with everything. A user's score for
  j sums the normalised C_ij over the items i they liked. Items scoring 0
  are not ranked by it; the list is completed from Popularity, which also
  serves users with no positives and users the fit data never saw.
- Ease: item-to-item with learnt weights (Steck, "Embarrassingly Shallow
  Autoencoders for Sparse Data", WWW 2019), a strong item-based baseline on
  MovieLens: B minimises |X - XB|^2 + l2 |B|^2 with a zero diagonal, in
  closed form B = -P / diag(P) off the diagonal, P = (X^T X + l2 I)^-1.
  A user's score for j is the sum of B_ij over the items i they liked. The
  inverse is dense in the catalog, so B covers the `max_items` items with
  the most positives; the list is completed from Popularity as above.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import scipy.sparse as sp


def _columns(users: Sequence[str], items: Sequence[str],
             labels: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items = np.asarray(users, dtype=str), np.asarray(items, dtype=str)
    positive = np.asarray(labels) == 1
    if not users.shape == items.shape == positive.shape:
        raise ValueError(f"{users.size} users, {items.size} items and {positive.size} labels")
    return users, items, positive


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


class Popularity:
    def fit(self, users: Sequence[str], items: Sequence[str], labels: Sequence[int],
            weights: Optional[Sequence[float]] = None) -> "Popularity":
        users, items, positive = _columns(users, items, labels)
        weights = np.ones(users.size) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != users.shape:
            raise ValueError(f"{weights.size} weights for {users.size} rows")
        # np.unique returns ids sorted, so a stable sort by count breaks ties by id.
        ids, codes = np.unique(items[positive], return_inverse=True)
        counts = np.bincount(codes, weights=weights[positive], minlength=len(ids))
        self.ranked: List[str] = ids[np.argsort(-counts, kind="stable")].tolist()
        self.seen: Dict[str, Set[str]] = {}
        for user, item in zip(users.tolist(), items.tolist()):
            self.seen.setdefault(user, set()).add(item)
        return self

    def recommend(self, users: Sequence[str], k: int) -> Dict[str, List[str]]:
        _check_k(k)
        return {user: self.complete(user, [], k) for user in users}

    def complete(self, user: str, chosen: List[str], k: int) -> List[str]:
        """`chosen` followed by the most popular items the user has not seen and `chosen` lacks, up to k."""
        skip = self.seen.get(user, set()) | set(chosen)
        result = list(chosen[:k])
        for item in self.ranked:
            if len(result) >= k:
                break
            if item not in skip:
                result.append(item)
        return result


class RecentPopularity(Popularity):
    def __init__(self, decay: float):
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay

    def fit(self, users: Sequence[str], items: Sequence[str], labels: Sequence[int],
            spans: Sequence[int] = ()) -> "RecentPopularity":
        """`spans`: each row's span; a positive of span s weighs decay ** (newest span - s)."""
        spans = np.asarray(spans, dtype=np.int64)
        if spans.size != len(users):
            raise ValueError(f"{spans.size} spans for {len(users)} rows")
        return super().fit(users, items, labels, self.decay ** (spans.max(initial=0) - spans).astype(np.float64))


def _top_positive(scores: np.ndarray, k: int) -> List[np.ndarray]:
    """Per row, the columns of its k highest positive scores, best first, ties by column."""
    if k < scores.shape[1]:
        kth = np.partition(scores, -k, axis=1)[:, -k]  # each row's k-th largest score
        candidates = (scores >= kth[:, None]) & (scores > 0)
    else:
        candidates = scores > 0
    rows, cols = np.nonzero(candidates)
    order = np.lexsort((cols, -scores[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    # Ties at the k-th score can leave a row more than k candidates: keep the first k.
    starts = np.searchsorted(rows, np.arange(len(scores)))
    ends = np.minimum(np.searchsorted(rows, np.arange(len(scores)), side="right"), starts + k)
    return [cols[start:end] for start, end in zip(starts, ends)]


class CoOccurrence:
    def __init__(self, chunk_size: int = 512):
        # Scores are dense for chunk_size users at a time: chunk_size x items floats.
        self.chunk_size = chunk_size

    def fit(self, users: Sequence[str], items: Sequence[str], labels: Sequence[int]) -> "CoOccurrence":
        users, items, positive = _columns(users, items, labels)
        self.popularity = Popularity().fit(users, items, labels)
        user_ids, user_codes = np.unique(users, return_inverse=True)
        self.item_ids, item_codes = np.unique(items, return_inverse=True)  # sorted: column order is id order
        self.user_index: Dict[str, int] = {user: row for row, user in enumerate(user_ids.tolist())}
        shape = (len(user_ids), len(self.item_ids))

        self.seen = sp.csr_matrix((np.ones(users.size), (user_codes, item_codes)), shape=shape)
        liked = sp.csr_matrix((np.ones(int(positive.sum())), (user_codes[positive], item_codes[positive])),
                              shape=shape)
        liked.data[:] = 1.0  # a positive repeated in the log counts once
        self.liked = liked

        together = (liked.T @ liked).tocsr()
        together = (together - sp.diags(together.diagonal())).tocsr()  # an item does not recommend itself
        together.eliminate_zeros()
        likers = np.asarray(liked.sum(axis=0)).ravel()
        scale = np.divide(1.0, np.sqrt(likers), out=np.zeros_like(likers), where=likers > 0)
        self.similarity = (sp.diags(scale) @ together @ sp.diags(scale)).tocsr()
        return self

    def recommend(self, users: Sequence[str], k: int) -> Dict[str, List[str]]:
        _check_k(k)
        known = [user for user in dict.fromkeys(users) if user in self.user_index]
        chosen: Dict[str, List[str]] = {}
        for start in range(0, len(known), self.chunk_size):
            chunk = known[start:start + self.chunk_size]
            rows = np.array([self.user_index[user] for user in chunk])
            scores = (self.liked[rows] @ self.similarity).toarray()
            # Equal sums come out a few ulps apart depending on the order of their terms; rounded, they tie
            # and break by item id.
            np.round(scores, 9, out=scores)
            seen = self.seen[rows].tocoo()
            scores[seen.row, seen.col] = 0.0  # seen items score 0, which is never ranked
            for user, cols in zip(chunk, _top_positive(scores, k)):
                chosen[user] = self.item_ids[cols].tolist()
        return {user: self.popularity.complete(user, chosen.get(user, []), k) for user in users}


class Ease:
    def __init__(self, l2: float = 100.0, max_items: int = 8000):
        if l2 <= 0 or max_items < 1:
            raise ValueError(f"l2 must be > 0 and max_items >= 1, got {l2} and {max_items}")
        self.l2, self.max_items = l2, max_items

    def fit(self, users: Sequence[str], items: Sequence[str], labels: Sequence[int]) -> "Ease":
        users, items, positive = _columns(users, items, labels)
        self.popularity = Popularity().fit(users, items, labels)
        self.item_ids = np.array(self.popularity.ranked[: self.max_items])
        column = {item: j for j, item in enumerate(self.item_ids.tolist())}
        self.user_ids = sorted(set(users[positive].tolist()))
        row = {user: i for i, user in enumerate(self.user_ids)}
        kept = [(row[u], column[i]) for u, i in zip(users[positive].tolist(), items[positive].tolist())
                if i in column]
        rows, cols = (np.array(v, dtype=np.int64) for v in zip(*kept)) if kept else (np.zeros(0, np.int64),) * 2
        liked = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(self.user_ids), self.item_ids.size))
        liked.data[:] = 1.0  # a positive repeated in the log counts once
        self.liked = liked
        gram = (liked.T @ liked).toarray()
        gram[np.diag_indices_from(gram)] += self.l2
        inverse = np.linalg.inv(gram)
        self.weights = -inverse / np.diag(inverse)  # column j divided by P_jj
        np.fill_diagonal(self.weights, 0.0)
        self.row = row
        return self

    def recommend(self, users: Sequence[str], k: int) -> Dict[str, List[str]]:
        _check_k(k)
        out: Dict[str, List[str]] = {}
        for user in users:
            chosen: List[str] = []
            if user in self.row:
                scores = np.asarray(self.liked[self.row[user]] @ self.weights).ravel()
                seen = self.popularity.seen.get(user, set())
                for j in np.argsort(-scores, kind="stable"):  # ties by popularity rank
                    if len(chosen) >= k or scores[j] <= 0:
                        break
                    if self.item_ids[j] not in seen:
                        chosen.append(str(self.item_ids[j]))
            out[user] = self.popularity.complete(user, chosen, k)
        return out
