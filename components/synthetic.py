"""A synthetic interaction log for scale work: `increc prepare --format synthetic`.

The log is drawn from a small world model, so that it behaves like a real one
where it matters for ingestion and for the model:

- time: rows arrive in time order over `days`, denser in the evening (UTC) and
  growing over the period; many rows share a second at scale;
- heavy tails: item popularity and user activity are Zipf-like;
- arrivals: part of the users and of the catalog exist from the start, the
  rest arrive progressively (an id never occurs before its arrival), and new
  items get a novelty boost for a week;
- taste: users and items have latent vectors; a user's taste drifts linearly
  over the period; a user picks among a few popular candidates the one that
  suits them best (with noise), so what is consumed depends on taste;
- outcome: rating = 1 + Binomial(4, sigmoid(affinity + user and item biases +
  genre affinity + noise)), label = rating >= the threshold; user biases depend
  on the country, taste on the age, item biases on the release year, so the
  side tables carry signal too.

Everything is a pure function of the Spec: the world from (seed, 0), chunk c's
rows from (seed, 1, c). A chunk holds `chunk_rows` consecutive rows in a time
interval of its own (no second is shared by two chunks), so any worker can
generate any chunk alone, and chunk boundaries are valid cut points in time.
Memory is O(users + items + days) for the world plus one chunk at a time.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from typing import Dict, Iterator, List, Optional

import numpy as np

DEFAULT_START = 1_704_067_200  # 2024-01-01 00:00 UTC
GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
          "Biography", "Sport"]
COUNTRIES = ["US", "IN", "BR", "GB", "DE", "FR", "JP", "MX", "CA", "ES", "IT", "NL"]
DIM = 8  # latent taste dimensions
CANDIDATES = 3  # popular items a user chooses among
NOVELTY_SHARE, NOVELTY_DAYS = 0.15, 7  # share of choices made among items that arrived within a week
INITIAL_USERS, INITIAL_ITEMS = 0.35, 0.6  # shares present when the log starts
USER_ZIPF, ITEM_ZIPF = 0.8, 1.0
DRIFT = 0.6  # how far a taste moves over the whole period, relative to its spread


class SpecError(ValueError):
    """Parameters that cannot make a log."""


@dataclasses.dataclass(frozen=True)
class Spec:
    rows: int = 1_000_000
    users: int = 60_000
    items: int = 20_000
    seed: int = 0
    days: float = 30.0
    start: Optional[int] = None  # None: DEFAULT_START (prepare --append: where the data directory ends)
    label_threshold: float = 4.0
    chunk_rows: int = 65_536

    @property
    def duration(self) -> int:
        return int(round(self.days * 86400))

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def check(self) -> "Spec":
        for name in ("rows", "users", "items", "chunk_rows"):
            if getattr(self, name) < 1:
                raise SpecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.days > 0:
            raise SpecError(f"--days must be positive, got {self.days}")
        if self.chunks > self.duration:
            raise SpecError(f"{self.rows} rows do not fit in {self.days} days "
                            f"(each chunk of {self.chunk_rows} rows needs a second of its own)")
        return self


@functools.lru_cache(maxsize=4)
def world(spec: Spec) -> "World":
    """The world of a spec, built once per process (Beam workers generate many chunks of one world)."""
    return World(spec)


class World:
    """Users, items, tastes and the time profile of one log: O(users + items + days) memory."""

    def __init__(self, spec: Spec):
        if spec.start is None:
            spec = dataclasses.replace(spec, start=DEFAULT_START)
        self.spec = spec.check()
        rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,)))
        self.end = spec.start + spec.duration
        self._time_profile()
        self.chunk_starts = self._chunk_starts()

        users, items = spec.users, spec.items
        before = spec.start - 365 * 86400  # who was there before the log starts
        self.user_arrival = self._arrivals(rng, users, INITIAL_USERS, before)
        self.item_arrival = self._arrivals(rng, items, INITIAL_ITEMS, before)
        # Heavy tails: Zipf weights over a random order, so popularity is not arrival order.
        self.user_weights_cum = np.cumsum((rng.permutation(users) + 1.0) ** -USER_ZIPF)
        self.item_weights_cum = np.cumsum((rng.permutation(items) + 1.0) ** -ITEM_ZIPF)

        # Side features with signal: taste depends on age, bias on country, item bias on year.
        self.user_age = np.clip(np.round(16 + rng.gamma(2.2, 9.0, users)), 16, 80).astype(np.int64)
        self.user_country = rng.choice(len(COUNTRIES), users, p=_zipf_probabilities(len(COUNTRIES), 1.1))
        country_effect = rng.normal(0.0, 0.3, len(COUNTRIES))
        self.user_taste = rng.normal(0.0, 0.6, (users, DIM))
        self.user_taste[:, 0] += (self.user_age - 35) / 15 * 0.5
        self.user_drift = rng.normal(0.0, 0.6 * DRIFT, (users, DIM))
        self.user_bias = rng.normal(0.0, 0.5, users) + country_effect[self.user_country]

        self.item_taste = rng.normal(0.0, 0.6, (items, DIM))
        self.genre_axes = rng.normal(0.0, 1.0, (len(GENRES), DIM))
        self.genre_axes /= np.linalg.norm(self.genre_axes, axis=1, keepdims=True)
        self.item_genres = self._genres(rng)
        start_year = int(np.datetime64(spec.start, "s").astype("datetime64[Y]").astype(int) + 1970)
        catalog_year = start_year - np.floor(rng.exponential(10.0, items)).astype(np.int64)
        arrival_year = (self.item_arrival.astype("datetime64[s]").astype("datetime64[Y]").astype(int) + 1970)
        self.item_year = np.where(self.item_arrival > spec.start, arrival_year, np.maximum(catalog_year, 1920))
        self.item_bias = rng.normal(0.0, 0.5, items) + 0.3 * (self.item_year <= start_year - 25)

        self.user_ids = np.array([f"u{k}" for k in range(1, users + 1)], dtype=object)
        self.item_ids = np.array([f"i{k}" for k in range(1, items + 1)], dtype=object)

    # --- time ---

    def _time_profile(self) -> None:
        """Cumulative share of rows per minute: evening peak (UTC), activity growing over the period."""
        spec = self.spec
        minutes = -(-spec.duration // 60)
        m = np.arange(minutes, dtype=np.float64)
        minute_of_day = ((spec.start // 60) + m) % 1440
        growth = 0.7 + 0.6 * m / max(1.0, minutes - 1.0)
        density = growth * (1 + 0.5 * np.sin(2 * np.pi * (minute_of_day / 1440 - 0.5)))  # peak at 18:00
        density[-1] *= (spec.duration - 60 * (minutes - 1)) / 60  # the last minute may be partial
        self._cdf = np.concatenate([[0.0], np.cumsum(density)])
        self._cdf /= self._cdf[-1]

    def _offset(self, quantiles: np.ndarray) -> np.ndarray:
        """Seconds after start below which a share `quantiles` of the rows lies (monotone)."""
        minute = np.clip(np.searchsorted(self._cdf, quantiles, side="right") - 1, 0, len(self._cdf) - 2)
        width = self._cdf[minute + 1] - self._cdf[minute]
        within = np.where(width > 0, (quantiles - self._cdf[minute]) / np.where(width > 0, width, 1.0), 0.0)
        return np.minimum((minute + np.clip(within, 0.0, 1.0)) * 60.0, self.spec.duration - 1e-6)

    def _chunk_starts(self) -> np.ndarray:
        """First second of each chunk's interval, strictly increasing, plus the end of the log."""
        spec = self.spec
        quantiles = np.minimum(np.arange(spec.chunks + 1) * spec.chunk_rows / spec.rows, 1.0)
        starts = spec.start + np.ceil(self._offset(quantiles)).astype(np.int64)
        starts[0], starts[-1] = spec.start, self.end
        for c in range(1, spec.chunks):  # a chunk needs at least one second of its own
            starts[c] = max(starts[c], starts[c - 1] + 1)
        return starts

    def chunk_rows(self, chunk: int) -> range:
        return range(chunk * self.spec.chunk_rows, min(self.spec.rows, (chunk + 1) * self.spec.chunk_rows))

    def timestamps(self, chunk: int) -> np.ndarray:
        """Timestamps of a chunk's rows, non-decreasing, inside the chunk's own interval."""
        rows = self.chunk_rows(chunk)
        quantiles = (np.arange(rows.start, rows.stop) + 0.5) / self.spec.rows
        ts = self.spec.start + np.floor(self._offset(quantiles)).astype(np.int64)
        return np.clip(ts, self.chunk_starts[chunk], self.chunk_starts[chunk + 1] - 1)

    # --- population ---

    def _arrivals(self, rng, count: int, initial_share: float, before: int) -> np.ndarray:
        """Arrival second per id, non-decreasing in the id: ids are numbered in arrival order."""
        initial = max(1, int(round(count * initial_share)))
        later = np.sort(rng.uniform(self.spec.start, self.spec.start + 0.95 * self.spec.duration, count - initial))
        return np.concatenate([np.full(initial, before, dtype=np.int64), np.floor(later).astype(np.int64)])

    def _genres(self, rng) -> np.ndarray:
        """(items, genres) membership: the item's closest genre, plus up to two more that fit it well."""
        scores = self.item_taste @ self.genre_axes.T + rng.normal(0.0, 0.3, (self.spec.items, len(GENRES)))
        ranked = np.argsort(-scores, axis=1)[:, :3]
        top = np.take_along_axis(scores, ranked, axis=1)
        keep = np.ones_like(top, dtype=bool)
        keep[:, 1:] = top[:, 1:] > 0.6
        member = np.zeros((self.spec.items, len(GENRES)), dtype=bool)
        np.put_along_axis(member, ranked, keep, axis=1)
        return member

    def taste(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Users' taste vectors at given seconds (linear drift over the period)."""
        progress = ((ts - self.spec.start) / self.spec.duration)[:, None]
        return self.user_taste[users] + progress * self.user_drift[users]

    # --- rows ---

    def chunk(self, chunk: int) -> Dict[str, np.ndarray]:
        """Chunk `chunk`'s rows as columns: pos (row number), ts, user, item, rating, label, logit.

        `user`/`item` are indices into user_ids/item_ids; `logit` is the true
        score the rating was drawn from (for tests of the signal).
        """
        spec = self.spec
        rows = self.chunk_rows(chunk)
        n = len(rows)
        rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(1, chunk)))
        ts = self.timestamps(chunk)

        arrived_users = np.searchsorted(self.user_arrival, ts, side="right")
        user = _weighted_prefix_draw(self.user_weights_cum, arrived_users, rng.random(n))

        arrived_items = np.searchsorted(self.item_arrival, ts, side="right")
        candidates = np.stack([_weighted_prefix_draw(self.item_weights_cum, arrived_items, rng.random(n))
                               for _ in range(CANDIDATES)], axis=1)
        recent = np.searchsorted(self.item_arrival, np.maximum(ts - NOVELTY_DAYS * 86400, spec.start), side="left")
        novel = (rng.random(n) < NOVELTY_SHARE) & (arrived_items > recent)
        pick = recent + np.floor(rng.random(n) * (arrived_items - recent)).astype(np.int64)
        candidates[novel, 0] = pick[novel]

        taste = self.taste(user, ts)
        affinity = np.einsum("nd,nkd->nk", taste, self.item_taste[candidates])
        choice = np.argmax(1.5 * affinity + rng.gumbel(size=affinity.shape), axis=1)
        item = candidates[np.arange(n), choice]
        member = self.item_genres[item]
        genre_affinity = (taste @ self.genre_axes.T * member).sum(axis=1) / np.maximum(member.sum(axis=1), 1)

        logit = (affinity[np.arange(n), choice] + self.user_bias[user] + self.item_bias[item]
                 + 0.5 * genre_affinity - 0.45)
        probability = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.6, n))))
        rating = 1 + rng.binomial(4, probability)
        return {"pos": np.arange(rows.start, rows.stop, dtype=np.int64), "ts": ts, "user": user, "item": item,
                "rating": rating.astype(np.float64), "label": (rating >= spec.label_threshold).astype(np.int8),
                "logit": logit}

    # --- side tables ---

    def item_rows(self) -> Iterator[List[str]]:
        names = np.array(GENRES, dtype=object)
        for k in range(self.spec.items):
            yield [self.item_ids[k], "|".join(names[self.item_genres[k]]), str(int(self.item_year[k]))]

    def user_rows(self) -> Iterator[List[str]]:
        for k in range(self.spec.users):
            yield [self.user_ids[k], str(int(self.user_age[k])), COUNTRIES[self.user_country[k]]]


ITEM_COLUMNS = ["item_id", "genres", "year"]
USER_COLUMNS = ["user_id", "age", "country"]


def _zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    weights = (np.arange(n) + 1.0) ** -exponent
    return weights / weights.sum()


def _weighted_prefix_draw(cumulative: np.ndarray, arrived: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Index drawn among the first `arrived` ids with probability proportional to their weight."""
    arrived = np.maximum(arrived, 1)
    drawn = np.searchsorted(cumulative, uniform * cumulative[arrived - 1], side="right")
    return np.minimum(drawn, arrived - 1)


def write_table(spec: Spec, name: str, path: str, opener=open) -> None:
    """items.csv or users.csv of the world, written in blocks of rows."""
    w = world(spec)
    columns, rows = {"items.csv": (ITEM_COLUMNS, w.item_rows), "users.csv": (USER_COLUMNS, w.user_rows)}[name]
    with opener(path, "w") as f:
        f.write(",".join(columns) + "\n")
        block: List[str] = []
        for row in rows():
            block.append(",".join(row) + "\n")
            if len(block) >= 65536:
                f.write("".join(block))
                block = []
        f.write("".join(block))


def write_raw(spec: Spec, directory: str) -> None:
    """The log as a raw data set of the generic contract: interactions.csv (with ratings) and the side tables.

    What `prepare --format csv --label-threshold T` reads; the same rows and
    features as `prepare --format synthetic` with that spec.
    """
    os.makedirs(directory, exist_ok=True)
    w = world(spec)
    with open(os.path.join(directory, "interactions.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for c in range(spec.chunks):
            rows = w.chunk(c)
            writer.writerows(zip(w.user_ids[rows["user"]], w.item_ids[rows["item"]], rows["ts"].tolist(),
                                 rows["rating"].astype(np.int64).tolist()))
    for name in ("items.csv", "users.csv"):
        write_table(spec, name, os.path.join(directory, name))


def describe(spec: Spec) -> str:
    return (f"synthetic log: {spec.rows} rows, {spec.users} users, {spec.items} items, "
            f"{spec.days:g} days from {spec.start}, seed {spec.seed}")


def top_share(counts: np.ndarray, share: float) -> float:
    """Fraction of all rows that the top `share` of ids hold (for checking heavy tails)."""
    ranked = np.sort(counts)[::-1]
    top = max(1, int(math.ceil(len(ranked) * share)))
    return float(ranked[:top].sum() / max(1, ranked.sum()))
