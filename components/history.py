"""History features, computed with Beam, with their state carried from span to span.

What the log already knew about a row's user and item when it happened (the
features a feature store serves at request time, logged with the interaction):

- `user_history`, `item_history`: ln(1 + number of earlier interactions);
- `user_history_mean`, `item_history_mean`: (sum of their outcomes + w * prior)
  / (count + w), w = 2 for users and 5 for items, prior = the mean outcome of
  every earlier interaction (empty while there is none);
- `user_recent_items`: the user's last RECENT_ITEMS item ids, oldest first,
  `|`-joined (the user's interests as they stood: a multi-valued categorical
  feature the model pools, and the feature snapshot serves by user);
- "earlier" is a strictly earlier timestamp: rows that share a second never
  see each other. The outcome is the rating where the source has one, else
  the label. Values are written with four decimals.

How, on any Beam runner: elements are numpy column batches. A per-second
table (rows, outcome sum), combined globally, gives every row's prior. Users
(and items) are grouped by a stable bucket of their id, crc32(utf-8) mod B;
each bucket reads its own shard of the previous snapshot, sorts its rows by
(id, timestamp, position), takes cumulative counts and sums up to each row's
second, and writes its shard of the new snapshot. Sums of outcomes are exact
(so every value equals the one-row-at-a-time definition) when they are
multiples of a power of two, as 0/1 labels, integer and half-star ratings are;
other ratings may differ in the last bits of a float.

A snapshot, `DATA/history/after-span-<N>/`, is the state after span N:
`meta.json` (rows seen, outcome total, the last second and what was known
just before it, the bucket count) and per bucket `user-<b>-of-<B>.parquet`
and `item-...` (id, count, sum, and the count and sum before the last
second; users also their recent items, through and before the last second).
Keeping "before the last second" apart lets the next batch start in the
second the previous one ended, and its rows still not see each other.
Snapshots are written under a temporary name and renamed, and never changed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from models import features as F

HISTORY_COLUMNS = ["user_history", "user_history_mean", "item_history", "item_history_mean", F.USER_RECENT_ITEMS]
RECENT_ITEMS = F.RECENT_ITEMS  # item ids in user_recent_items
PRIOR_WEIGHTS = {"user": 2.0, "item": 5.0}  # pseudo-interactions at the global mean that smooth a short history
KINDS = ("user", "item")
DEFAULT_BUCKETS = 16
SNAPSHOTS = "history"
SNAPSHOT_NAME = re.compile(r"after-span-(\d+)$")
META = "meta.json"
STATE_FORMAT = 1
HASH = "crc32(utf-8) mod buckets"


# --- state ---

@dataclasses.dataclass
class Globals:
    """What the whole log knew: rows seen and their outcome total, overall and before the last second."""

    buckets: int = DEFAULT_BUCKETS
    seen: int = 0
    total: float = 0.0
    last_timestamp: Optional[int] = None
    seen_before_last: int = 0
    total_before_last: float = 0.0

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "hash": HASH, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, meta: dict) -> "Globals":
        if meta.get("format") != STATE_FORMAT or meta.get("hash") != HASH:
            raise ValueError(f"history state of format {meta.get('format')!r} ({meta.get('hash')!r}); "
                             f"this version reads format {STATE_FORMAT} ({HASH})")
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})

    def advance(self, table: "TimestampTable") -> "Globals":
        """The globals after the rows that `table` summarises (all at or after last_timestamp)."""
        if not len(table.ts):
            return dataclasses.replace(self)
        last = int(table.ts[-1])
        out = dataclasses.replace(self, last_timestamp=last, seen=self.seen + int(table.count.sum()),
                                  total=self.total + float(table.sum.sum()))
        if last != self.last_timestamp:
            seen_before, total_before = self.before(table, table.ts[-1:])
            out.seen_before_last, out.total_before_last = int(seen_before[0]), float(total_before[0])
        return out

    def before(self, table: "TimestampTable", ts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rows seen and their outcome total strictly before each timestamp (each one in `table`)."""
        at = np.searchsorted(table.ts, ts)
        cum_count = np.concatenate([[0], np.cumsum(table.count)])[at]
        cum_sum = np.concatenate([[0.0], np.cumsum(table.sum)])[at]
        at_last = _equals(ts, self.last_timestamp)
        seen = np.where(at_last, self.seen_before_last, self.seen) + cum_count
        total = np.where(at_last, self.total_before_last, self.total) + cum_sum
        return seen, total


@dataclasses.dataclass
class Shard:
    """Per id of one bucket: count and outcome sum, and the part of them from before the last second."""

    key: np.ndarray  # object (str)
    count: np.ndarray  # int64
    sum: np.ndarray  # float64
    count_before_last: np.ndarray
    sum_before_last: np.ndarray
    recent: np.ndarray  # object (str): the last RECENT_ITEMS items, `|`-joined (users; "" for items)
    recent_before_last: np.ndarray  # the same strictly before the last second

    COLUMNS = ("key", "count", "sum", "count_before_last", "sum_before_last", "recent", "recent_before_last")
    TEXT = ("key", "recent", "recent_before_last")

    @classmethod
    def empty(cls) -> "Shard":
        return cls(np.array([], dtype=object), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0),
                   np.array([], dtype=object), np.array([], dtype=object))

    def __len__(self) -> int:
        return len(self.key)


def shard_name(kind: str, bucket: int, buckets: int) -> str:
    return f"{kind}-{bucket:05d}-of-{buckets:05d}.parquet"


def write_shard(directory: str, kind: str, bucket: int, buckets: int, shard: Shard) -> None:
    table = pa.table({c: pa.array(getattr(shard, c).tolist(), pa.string()) if c in Shard.TEXT else getattr(shard, c)
                      for c in Shard.COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with tf.io.gfile.GFile(os.path.join(directory, shard_name(kind, bucket, buckets)), "wb") as f:
        f.write(sink.getvalue().to_pybytes())


def read_shard(directory: str, kind: str, bucket: int, buckets: int) -> Shard:
    with tf.io.gfile.GFile(os.path.join(directory, shard_name(kind, bucket, buckets)), "rb") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    def text(column: str) -> np.ndarray:
        out = np.empty(table.num_rows, dtype=object)
        # State written before recent items were kept: no item is known as recent.
        out[:] = table.column(column).to_pylist() if column in table.column_names else ""
        return out

    return Shard(*(text(c) if c in Shard.TEXT else table.column(c).to_numpy() for c in Shard.COLUMNS))


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Stable bucket of each id (crc32 of its UTF-8 bytes): the same in every process, run and version."""
    codes, uniques = pd.factorize(keys)
    per_unique = np.fromiter((zlib.crc32(k.encode("utf-8")) for k in uniques), dtype=np.int64, count=len(uniques))
    return (per_unique % buckets)[codes]


def write_meta(directory: str, globals_: Globals, **extra) -> None:
    with tf.io.gfile.GFile(os.path.join(directory, META), "w") as f:
        json.dump({**globals_.to_json(), **extra}, f, indent=2)
        f.write("\n")


def read_meta(directory: str) -> Globals:
    with tf.io.gfile.GFile(os.path.join(directory, META)) as f:
        return Globals.from_json(json.load(f))


def snapshots(data_dir: str) -> List[Tuple[int, str]]:
    """(span, path) of every complete snapshot under DATA/history, oldest first."""
    root = os.path.join(data_dir, SNAPSHOTS)
    if not tf.io.gfile.isdir(root):
        return []
    found = []
    for name in tf.io.gfile.listdir(root):
        match = SNAPSHOT_NAME.match(name.rstrip("/"))
        path = os.path.join(root, name.rstrip("/"))
        if match and tf.io.gfile.exists(os.path.join(path, META)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def snapshot_path(data_dir: str, span: int) -> str:
    return os.path.join(data_dir, SNAPSHOTS, f"after-span-{span}")


class Snapshot:
    """A snapshot read for lookups: the features a request for (user, item) gets now, after its last row."""

    def __init__(self, path: str):
        self.path = path
        self.globals = read_meta(path)
        self._shards: Dict[Tuple[str, int], Dict[str, Tuple[int, float, str]]] = {}

    def stats(self, kind: str, key: str) -> Tuple[int, float, str]:
        """(count, outcome sum, recent items) of an id after the snapshot's last row."""
        bucket = int(bucket_of(np.array([key], dtype=object), self.globals.buckets)[0])
        if (kind, bucket) not in self._shards:
            shard = read_shard(self.path, kind, bucket, self.globals.buckets)
            self._shards[kind, bucket] = dict(zip(shard.key.tolist(), zip(shard.count.tolist(), shard.sum.tolist(),
                                                                          shard.recent.tolist())))
        return self._shards[kind, bucket].get(key, (0, 0.0, ""))

    def features(self, user: str, item: str) -> List[str]:
        """HISTORY_COLUMNS for an interaction of `user` with `item` after the snapshot's last row."""
        (user_count, user_sum, recent), (item_count, item_sum, _) = self.stats("user", user), self.stats("item", item)
        g = self.globals
        columns = feature_columns(np.array([user_count]), np.array([user_sum]), np.array([item_count]),
                                  np.array([item_sum]), np.array([g.seen]), np.array([g.total]),
                                  np.array([recent], dtype=object))
        return [c[0] for c in columns]


def newest_snapshot(data_dir: str) -> Optional[Snapshot]:
    found = snapshots(data_dir)
    return Snapshot(found[-1][1]) if found else None


# --- the per-second table ---

@dataclasses.dataclass
class TimestampTable:
    """Rows and outcome sum per second, seconds ascending."""

    ts: np.ndarray
    count: np.ndarray
    sum: np.ndarray

    @classmethod
    def of(cls, ts: np.ndarray, outcome: np.ndarray) -> "TimestampTable":
        seconds, where = np.unique(ts, return_inverse=True)
        return cls(seconds, np.bincount(where, minlength=len(seconds)).astype(np.int64),
                   np.bincount(where, weights=outcome, minlength=len(seconds)))

    @classmethod
    def merged(cls, tables: Sequence["TimestampTable"]) -> "TimestampTable":
        tables = [t for t in tables if len(t.ts)]
        if len(tables) == 1:
            return tables[0]
        if not tables:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        seconds, where = np.unique(np.concatenate([t.ts for t in tables]), return_inverse=True)
        counts = np.bincount(where, np.concatenate([t.count for t in tables]), len(seconds))
        return cls(seconds, counts.astype(np.int64), np.bincount(where, np.concatenate([t.sum for t in tables]),
                                                                 len(seconds)))


class TimestampTableFn(beam.CombineFn):
    """Combines batches (their `ts` and `outcome` columns) into one TimestampTable."""

    def create_accumulator(self):
        return []

    def add_input(self, tables, batch):
        tables.append(TimestampTable.of(batch["ts"], batch["outcome"]))
        return [TimestampTable.merged(tables)] if len(tables) >= 16 else tables

    def merge_accumulators(self, accumulators):
        return [TimestampTable.merged([t for tables in accumulators for t in tables])]

    def extract_output(self, tables):
        return TimestampTable.merged(tables)


# --- running stats per id ---

def running_stats(shard: Shard, key: np.ndarray, ts: np.ndarray, pos: np.ndarray, outcome: np.ndarray,
                  last: Optional[int], new_last: Optional[int], items: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Shard]:
    """Count, outcome sum and (given each row's `items`) recent items of each row's id strictly before the
    row's second, and the shard after all rows.

    Rows may come in any order; results are in the rows' order. `last` is the
    previous state's last second (rows there see the state as it was before
    it); `new_last` is the last second of the whole batch, all buckets.
    """
    held = len(shard)
    codes, uniques = pd.factorize(np.concatenate([shard.key, key]) if held else key)
    ids = len(uniques)
    base = {name: (np.full(ids, "", dtype=object) if name in Shard.TEXT else
                   np.zeros(ids, dtype=getattr(shard, name).dtype)) for name in Shard.COLUMNS[1:]}
    for name in base:
        base[name][:held] = getattr(shard, name)  # the shard's keys are unique: codes 0..held-1, in order
    row_code = codes[held:]
    order = np.lexsort((pos, ts, row_code))
    c, t, o = row_code[order], ts[order], outcome[order]
    n = len(c)
    index = np.arange(n)
    new_id = np.ones(n, dtype=bool)
    new_id[1:] = c[1:] != c[:-1]
    new_second = new_id.copy()
    new_second[1:] |= t[1:] != t[:-1]
    id_first = np.maximum.accumulate(np.where(new_id, index, 0)) if n else index
    second_first = np.maximum.accumulate(np.where(new_second, index, 0)) if n else index
    cum = np.concatenate([[0.0], np.cumsum(o)])
    at_last = _equals(t, last)
    count = np.where(at_last, base["count_before_last"][c], base["count"][c]) + (second_first - id_first)
    summed = np.where(at_last, base["sum_before_last"][c], base["sum"][c]) + (cum[second_first] - cum[id_first])

    added = np.bincount(c, minlength=ids).astype(np.int64)
    new = Shard(uniques.astype(object), base["count"] + added,
                base["sum"] + np.bincount(c, weights=o, minlength=ids), base["count_before_last"],
                base["sum_before_last"], base["recent"], base["recent_before_last"])
    if new_last != last:
        in_last = _equals(t, new_last)
        new.count_before_last = new.count - np.bincount(c[in_last], minlength=ids)
        new.sum_before_last = new.sum - np.bincount(c[in_last], weights=o[in_last], minlength=ids)
    out_recent = None
    if items is not None:
        recent = _recent_items(new, c, t, items[order], last, new_last)
        out_recent = np.empty(n, dtype=object)
        out_recent[order] = recent
    keep = np.argsort(new.key, kind="stable")  # ids sorted: the same bytes whatever the order rows came in
    new = Shard(*(getattr(new, name)[keep] for name in Shard.COLUMNS))

    out_count, out_sum = np.empty(n, np.int64), np.empty(n)
    out_count[order], out_sum[order] = count, summed
    return out_count, out_sum, out_recent, new


def _recent_items(shard: Shard, codes: np.ndarray, ts: np.ndarray, items: np.ndarray, last: Optional[int],
                  new_last: Optional[int]) -> List[str]:
    """Each row's user's last RECENT_ITEMS items strictly before the row's second (rows sorted by id code,
    then time), updating the shard's recent lists (indexed by code) in place.

    A loop in Python, over the rows of one bucket: a list per user, a few
    microseconds a row.
    """
    sep = F.MULTI_VALUE_SEPARATOR
    out: List[str] = []
    n = len(codes)
    start = 0
    while start < n:
        code = int(codes[start])
        end = start
        while end < n and codes[end] == code:
            end += 1
        through = shard.recent[code]
        earlier = through.split(sep) if through else []  # at most RECENT_ITEMS, oldest first
        pending: List[str] = []  # the items of the current second, which its rows do not see
        second, visible = None, ""
        for row in range(start, end):
            if ts[row] != second:
                earlier = (earlier + pending)[-RECENT_ITEMS:]
                pending, second = [], ts[row]
                # Rows in the previous state's last second see that state as it was before the second.
                visible = shard.recent_before_last[code] if ts[row] == last else sep.join(earlier)
            out.append(visible)
            pending.append(str(items[row]))
        if new_last != last:
            # The new last second is this batch's: what came before it is everything but its rows.
            shard.recent_before_last[code] = sep.join((earlier if second == new_last else earlier + pending)
                                                      [-RECENT_ITEMS:])
        shard.recent[code] = sep.join((earlier + pending)[-RECENT_ITEMS:])
        start = end
    if new_last != last:
        # Ids without rows in this batch: all they have is from before the new last second.
        moved = np.ones(len(shard.key), dtype=bool)
        moved[np.unique(codes)] = False
        shard.recent_before_last[moved] = shard.recent[moved]
    return out


def _equals(values: np.ndarray, second: Optional[int]) -> np.ndarray:
    return np.zeros(len(values), dtype=bool) if second is None else values == second


class RunningStats(beam.PTransform):
    """Batches -> per-row (pos, ts, count, sum) of one kind of id; writes that kind's shards of the new snapshot.

    Every bucket forms a group, rows or not, so the new snapshot carries every
    shard of the previous one.
    """

    def __init__(self, kind: str, previous: Optional[str], out_dir: str, old: Globals, table):
        super().__init__()
        self.kind, self.previous, self.out_dir, self.old, self.table = kind, previous, out_dir, old, table

    def expand(self, batches):
        buckets = self.old.buckets
        pieces = batches | "ByBucket" >> beam.FlatMap(_pieces_by_bucket, self.kind, buckets)
        every = batches.pipeline | "EveryBucket" >> beam.Create([(b, None) for b in range(buckets)], reshuffle=False)
        return ((pieces, every)
                | "Flatten" >> beam.Flatten()
                | "GroupByBucket" >> beam.GroupByKey()
                | "Stats" >> beam.ParDo(_RunningStatsFn(self.kind, self.previous, self.out_dir, self.old),
                                        beam.pvalue.AsSingleton(self.table)))


def _pieces_by_bucket(batch: Dict[str, np.ndarray], kind: str, buckets: int) -> Iterator[Tuple[int, dict]]:
    bucket = bucket_of(batch[kind], buckets)
    order = np.argsort(bucket, kind="stable")
    starts = np.flatnonzero(np.diff(bucket[order], prepend=-1))
    for start, end in zip(starts, list(starts[1:]) + [len(order)]):
        rows = order[start:end]
        piece = {"pos": batch["pos"][rows], "ts": batch["ts"][rows], "key": batch[kind][rows],
                 "outcome": batch["outcome"][rows]}
        if kind == "user":
            piece["items"] = batch["item"][rows]  # for the user's recent items
        yield int(bucket[rows[0]]), piece


class _RunningStatsFn(beam.DoFn):
    def __init__(self, kind: str, previous: Optional[str], out_dir: str, old: Globals):
        self.kind, self.previous, self.out_dir, self.old = kind, previous, out_dir, old

    def process(self, element, table: TimestampTable):
        bucket, pieces = element
        pieces = [p for p in pieces if p is not None]
        buckets = self.old.buckets
        shard = read_shard(self.previous, self.kind, bucket, buckets) if self.previous else Shard.empty()
        columns = [("pos", np.int64), ("ts", np.int64), ("key", object), ("outcome", np.float64)]
        if self.kind == "user":
            columns.append(("items", object))
        rows = {name: np.concatenate([p[name] for p in pieces]) if pieces else np.zeros(0, dtype)
                for name, dtype in columns}
        new_last = self.old.advance(table).last_timestamp
        count, summed, recent, new = running_stats(shard, rows["key"], rows["ts"], rows["pos"], rows["outcome"],
                                                   self.old.last_timestamp, new_last, rows.get("items"))
        write_shard(self.out_dir, self.kind, bucket, buckets, new)
        if len(count):
            out = {"pos": rows["pos"], "ts": rows["ts"], "count": count, "sum": summed}
            if recent is not None:
                out["recent"] = recent
            yield out


# --- formatting ---

def feature_columns(user_count: np.ndarray, user_sum: np.ndarray, item_count: np.ndarray, item_sum: np.ndarray,
                    seen: np.ndarray, total: np.ndarray, user_recent: np.ndarray) -> List[List[str]]:
    """HISTORY_COLUMNS as text, one list per column, with the arithmetic of the definition above."""
    known = seen > 0
    prior = np.divide(total, seen, out=np.zeros(len(seen)), where=known)
    columns = []
    for kind, count, summed in (("user", user_count, user_sum), ("item", item_count, item_sum)):
        weight = PRIOR_WEIGHTS[kind]
        counts, where = np.unique(count, return_inverse=True)
        logs = np.array([f"{math.log1p(c):.4f}" for c in counts.tolist()], dtype=object)
        means = (summed + weight * prior) / (count + weight)
        columns.append(logs[where].tolist())
        columns.append(["%.4f" % m if k else "" for m, k in zip(means.tolist(), known.tolist())])
    columns.append(list(user_recent))
    return columns


def concat(batches: Iterable[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    batches = list(batches)
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]} if batches else {}
