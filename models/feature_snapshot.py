"""The feature snapshot a version carries: what a request with ids alone is scored with.

Each pushed SavedModel answers `serving_default` and `recommend` from ids
alone by looking up the user's and the item's features as they stood at the
end of its span. This module keeps that state from span to span, in the work
directory (`WORK/features/after-span-N/`, per-span snapshots as models/spans.py
describes, written by the Trainer):

- users and items in order of first appearance (rows only ever appended), each
  with the features of its newest interaction and that interaction's time;
- per item the number of interactions and of positive ones, and its recent
  popularity: interactions with each earlier span's weighed down by
  `popularity_decay` per span since (what recommend's popularity prior reads);
- the (user, item) pairs seen, as row numbers: what `recommend` excludes.

Whose feature is a column: the columns of `DATA/users.csv` and names starting
`user_` belong to the user, those of `DATA/items.csv` and names starting
`item_` to the item; any other column is request context and is not looked
up. History features are those logged with the id's newest interaction (what
the log knew just before it), so they lag the true end-of-span value by that
interaction; a user's recent items (`user_recent_items`) get that
interaction's item added, so they do not. An id the snapshot does not know
gets, for each numeric feature, the mean value new ids arrived with in the
newest span that had any (a new user's history count is 0, its mean the
global one), and no categorical value.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from models import features as F
from models import spans

USERS, ITEMS, SEEN, META = "users.parquet", "items.parquet", "seen.parquet", "meta.json"
SIDE_TABLES = {"user": "users.csv", "item": "items.csv"}
KINDS = ("user", "item")
SNAPSHOTS_KEPT = 3
FORMAT = 1


def owner_of(column: str, side_columns: Dict[str, Sequence[str]]) -> Optional[str]:
    """'user', 'item' or None (request context) for a feature column."""
    for kind in KINDS:
        if column in side_columns.get(kind, ()) or column.startswith(f"{kind}_"):
            return kind
    return None


def side_table_columns(data_dir: str) -> Dict[str, List[str]]:
    """The feature columns of DATA/users.csv and DATA/items.csv (their header, the key left out)."""
    out: Dict[str, List[str]] = {}
    for kind, name in SIDE_TABLES.items():
        path = os.path.join(data_dir, name)
        if not tf.io.gfile.exists(path):
            continue
        with tf.io.gfile.GFile(path, "rb") as f:
            header = f.readline().decode("utf-8-sig").strip()
        key = F.USER_ID if kind == "user" else F.ITEM_ID
        out[kind] = [c.strip().strip('"') for c in header.split(",") if c.strip().strip('"') != key]
    return out


def merge_sorted(seen: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Sorted unique `seen` with sorted unique `new` folded in, sorted and unique. Costs one copy of
    `seen` (np.unique over both would sort a concatenated copy: three times the memory)."""
    if not len(seen):
        return new
    at = np.searchsorted(seen, new)
    fresh = new[(at == len(seen)) | (seen[np.minimum(at, len(seen) - 1)] != new)]
    return np.insert(seen, np.searchsorted(seen, fresh), fresh)


def with_item(recent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each row's recent items (logged: those before the row) with the row's own item added, newest kept:
    the list as it stands after the row, which is what the user's next request should see."""
    sep = F.MULTI_VALUE_SEPARATOR.encode()
    out = np.empty(len(recent), dtype=object)
    out[:] = [sep.join(((r.split(sep) if r else []) + [i])[-F.RECENT_ITEMS:])
              for r, i in zip(recent.tolist(), items.tolist())]
    return out


class IdTable:
    """Ids in order of first appearance with their newest interaction's time and features."""

    def __init__(self, categorical: List[str], numeric: List[str]):
        self.categorical, self.numeric = categorical, numeric
        self.rows: Dict[bytes, int] = {}
        self.ts = np.zeros(0, np.int64)
        self.values = {f: np.zeros(0, object) for f in categorical}
        self.values.update({f: np.zeros(0, np.float32) for f in numeric})
        self.count = np.zeros(0, np.int64)
        self.positives = np.zeros(0, np.int64)
        self.recent = np.zeros(0, np.float64)  # decayed interactions of the spans ended so far
        self._span_count = np.zeros(0, np.int64)  # interactions of the span being absorbed
        # Running sums of the numeric values new ids arrived with (for unknown ids' defaults).
        self.new_sum = {f: 0.0 for f in numeric}
        self.new_rows = {f: 0 for f in numeric}
        self.defaults = {f: float("nan") for f in numeric}

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> List[bytes]:
        return list(self.rows)

    def _grow(self, size: int) -> None:
        extra = size - len(self.ts)
        if extra <= 0:
            return
        self.ts = np.concatenate([self.ts, np.full(extra, np.iinfo(np.int64).min)])
        self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
        self.positives = np.concatenate([self.positives, np.zeros(extra, np.int64)])
        self.recent = np.concatenate([self.recent, np.zeros(extra, np.float64)])
        self._span_count = np.concatenate([self._span_count, np.zeros(extra, np.int64)])
        for f in self.categorical:
            self.values[f] = np.concatenate([self.values[f], np.full(extra, b"", object)])
        for f in self.numeric:
            self.values[f] = np.concatenate([self.values[f], np.full(extra, np.nan, np.float32)])

    def add(self, keys: np.ndarray, ts: np.ndarray, labels: np.ndarray, columns: Dict[str, np.ndarray]) -> np.ndarray:
        """Folds in a batch (any order); returns each row's id row number."""
        known = len(self.rows)
        rows = np.fromiter((self.rows.setdefault(k, len(self.rows)) for k in keys.tolist()), np.int64, len(keys))
        self._grow(len(self.rows))
        first = rows >= known
        for f in self.numeric:
            fresh = columns[f][first]
            fresh = fresh[~np.isnan(fresh)]
            self.new_sum[f] += float(fresh.sum())
            self.new_rows[f] += len(fresh)
        np.add.at(self.count, rows, 1)
        np.add.at(self._span_count, rows, 1)
        np.add.at(self.positives, rows, labels.astype(np.int64))
        order = np.argsort(ts, kind="stable")  # fancy assignment keeps the last of duplicates: the newest
        rows_o, ts_o = rows[order], ts[order]
        newer = ts_o >= self.ts[rows_o]
        self.ts[rows_o[newer]] = ts_o[newer]
        for f, values in columns.items():
            self.values[f][rows_o[newer]] = values[order][newer]
        return rows

    def end_span(self, decay: float) -> None:
        """Earlier spans' popularity weighs `decay` (per span since) beside this span's interactions;
        new ids of this span set the defaults for unknown ids."""
        self.recent = self.recent * decay + self._span_count
        self._span_count = np.zeros_like(self._span_count)
        for f in self.numeric:
            if self.new_rows[f]:
                self.defaults[f] = self.new_sum[f] / self.new_rows[f]
            self.new_sum[f], self.new_rows[f] = 0.0, 0

    def to_arrow(self, key: str) -> pa.Table:
        data = {key: pa.array(self.ids(), pa.binary()), "_ts": self.ts, "_count": self.count,
                "_positives": self.positives, "_recent": self.recent}
        data.update({f: pa.array(self.values[f].tolist(), pa.binary()) for f in self.categorical})
        data.update({f: self.values[f] for f in self.numeric})
        return pa.table(data)

    @classmethod
    def from_arrow(cls, table: pa.Table, key: str, categorical: List[str], numeric: List[str],
                   defaults: Dict[str, float]) -> "IdTable":
        out = cls(categorical, numeric)
        ids = table.column(key).to_pylist()
        out.rows = {k: i for i, k in enumerate(ids)}
        out.ts = table.column("_ts").to_numpy().copy()
        out.count = table.column("_count").to_numpy().copy()
        out.positives = table.column("_positives").to_numpy().copy()
        # Snapshots written before recent popularity was kept: every interaction counts in full.
        out.recent = (table.column("_recent").to_numpy().astype(np.float64) if "_recent" in table.column_names
                      else out.count.astype(np.float64))
        out._span_count = np.zeros(len(ids), np.int64)
        for f in categorical:
            out.values[f] = np.array(table.column(f).to_pylist() if f in table.column_names else [b""] * len(ids),
                                     dtype=object)
        for f in numeric:
            out.values[f] = (table.column(f).to_numpy().astype(np.float32).copy() if f in table.column_names
                             else np.full(len(ids), np.nan, np.float32))
        out.defaults.update({f: float(v) for f, v in defaults.items() if f in numeric})
        return out


class FeatureSnapshot:
    """Users, items and the pairs seen up to a span; see the module docstring."""

    def __init__(self, categorical: List[str], numeric: List[str], side_columns: Dict[str, Sequence[str]]):
        self.categorical, self.numeric = list(categorical), list(numeric)
        self.side_columns = {k: list(v) for k, v in side_columns.items()}
        by = {kind: ([f for f in self.categorical if owner_of(f, self.side_columns) == kind],
                     [f for f in self.numeric if owner_of(f, self.side_columns) == kind]) for kind in KINDS}
        self.users = IdTable(*by["user"])
        self.items = IdTable(*by["item"])
        self._seen = np.zeros(0, np.int64)  # every pair folded in so far: sorted, unique
        self._new: List[np.ndarray] = []  # batches' pairs not yet merged into _seen
        self.span: Optional[int] = None

    # --- building ---

    def absorb(self, batches: Iterable[List[bytes]]) -> None:
        """Folds in serialized tf.Examples (a span's rows, any order), batch by batch."""
        spec = {F.USER_ID: tf.io.FixedLenFeature([], tf.string), F.ITEM_ID: tf.io.FixedLenFeature([], tf.string),
                F.TIMESTAMP: tf.io.FixedLenFeature([], tf.int64, default_value=0),
                F.LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=0)}
        spec.update({f: tf.io.RaggedFeature(tf.string) for f in self.categorical})
        spec.update({f: tf.io.RaggedFeature(tf.float32) for f in self.numeric})
        for batch in batches:
            parsed = tf.io.parse_example(tf.constant(batch, tf.string), spec)
            columns = {f: tf.strings.reduce_join(parsed[f], axis=1, separator=F.MULTI_VALUE_SEPARATOR).numpy()
                       for f in self.categorical}
            columns.update({f: parsed[f].to_tensor(default_value=np.nan, shape=[None, 1]).numpy()[:, 0]
                            for f in self.numeric})
            ts, labels = parsed[F.TIMESTAMP].numpy(), parsed[F.LABEL].numpy()
            for f in F.ITEM_LIST_FEATURES:
                if f in columns:
                    columns[f] = with_item(columns[f], parsed[F.ITEM_ID].numpy())
            users = self.users.add(parsed[F.USER_ID].numpy(), ts, labels,
                                   {f: columns[f] for f in self.users.categorical + self.users.numeric})
            items = self.items.add(parsed[F.ITEM_ID].numpy(), ts, labels,
                                   {f: columns[f] for f in self.items.categorical + self.items.numeric})
            self._new.append(np.unique((users << 32) | items))
            if len(self._new) >= 16:
                self._merge_new()

    def end_span(self, span: int, popularity_decay: float) -> None:
        """Closes `span`: popularity from the snapshot's span decays once per span in between."""
        if self.span is not None and span <= self.span:
            raise ValueError(f"span {span} folded into a feature snapshot of span {self.span}")
        decay = popularity_decay ** (span - self.span) if self.span is not None else 1.0
        self.users.end_span(decay)
        self.items.end_span(decay)
        self.span = span

    def _merge_new(self) -> None:
        if self._new:
            self._seen = merge_sorted(self._seen, np.unique(np.concatenate(self._new)))
            self._new = []

    def seen_pairs(self) -> np.ndarray:
        """Unique (user row << 32 | item row), ascending: grouped by user."""
        self._merge_new()
        return self._seen

    def seen_by_user(self):
        """(row_splits [users + 1] int64, item rows int32): the items each user row interacted with,
        ascending per user. Computed without an int64 copy of the pairs: they are the one piece
        of the snapshot that grows with every row ever seen (docs/ARCHITECTURE.md, memory)."""
        pairs = self.seen_pairs()
        splits = np.searchsorted(pairs, np.arange(len(self.users) + 1, dtype=np.int64) << 32)
        low = 0 if sys.byteorder == "little" else 1  # the item row is the low 32-bit word of each pair
        return splits.astype(np.int64), pairs.view(np.int32)[low::2].copy()

    # --- storage ---

    def save(self, store: str, span: int) -> str:
        tf.io.gfile.makedirs(store)
        tmp = os.path.join(store, f".tmp-{uuid.uuid4().hex}")
        tf.io.gfile.makedirs(tmp)
        pairs = self.seen_pairs()
        for name, table in ((USERS, self.users.to_arrow(F.USER_ID)), (ITEMS, self.items.to_arrow(F.ITEM_ID)),
                            (SEEN, pa.table({"pair": pairs}))):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            with tf.io.gfile.GFile(os.path.join(tmp, name), "wb") as f:
                f.write(sink.getvalue().to_pybytes())
        meta = {"format": FORMAT, "span": span, "categorical": self.categorical, "numeric": self.numeric,
                "side_columns": self.side_columns,
                "defaults": {"user": self.users.defaults, "item": self.items.defaults}}
        with tf.io.gfile.GFile(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
        target = spans.snapshot_dir(store, span)
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)  # a rerun of the span writes the same content again
        tf.io.gfile.rename(tmp, target)
        spans.prune(store, span, SNAPSHOTS_KEPT)
        return target

    @classmethod
    def load(cls, directory: str, categorical: List[str], numeric: List[str],
             side_columns: Dict[str, Sequence[str]]) -> "FeatureSnapshot":
        """A saved snapshot, read for today's columns (a column it lacks is empty for every id)."""
        with tf.io.gfile.GFile(os.path.join(directory, META)) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: feature snapshot of format {meta.get('format')!r}; "
                             f"this version reads format {FORMAT}")
        out = cls(categorical, numeric, side_columns)

        def read(name):
            with tf.io.gfile.GFile(os.path.join(directory, name), "rb") as f:
                return pq.read_table(pa.BufferReader(f.read()))

        out.users = IdTable.from_arrow(read(USERS), F.USER_ID, out.users.categorical, out.users.numeric,
                                      meta["defaults"]["user"])
        out.items = IdTable.from_arrow(read(ITEMS), F.ITEM_ID, out.items.categorical, out.items.numeric,
                                      meta["defaults"]["item"])
        out._seen = read(SEEN).column("pair").to_numpy()
        out.span = meta["span"]
        return out

    @classmethod
    def before(cls, store: str, span: int, categorical: List[str], numeric: List[str],
               side_columns: Dict[str, Sequence[str]]) -> "FeatureSnapshot":
        """What was known when `span` arrived: the newest earlier snapshot, or an empty one."""
        base = spans.base_snapshot(store, span)
        if base is None:
            return cls(categorical, numeric, side_columns)
        return cls.load(base, categorical, numeric, side_columns)
