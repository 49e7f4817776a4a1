"""History features from the Beam pipeline equal the plain definition, in one go and appended span by span.

The reference below is the one-row-at-a-time definition prepare used before
it ran on Beam: every row sees the counts and outcome sums of strictly earlier
seconds only. Real data sets, a synthetic log with many rows per second, runs
of a few thousand rows (state carried from run to run), batches appended in
the second the previous one ended, and Beam's multi-process runner must all
give exactly its values.
"""
from __future__ import annotations

import csv
import hashlib
import math
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from components import history, ingest, synthetic
from tests.conftest import REPO, movietweetings_dir

ML_LATEST_SMALL = [REPO / "data" / "ml-latest-small", REPO.parent / "shared" / "data" / "ml-latest-small"]
SMALL_RUNS = {"part_rows": 5_000, "rows_per_run": 50_000}  # several parts and runs on small logs


class Reference:
    """The definition, one row at a time: counts and outcome sums per user and item, and overall."""

    def __init__(self):
        self.stats: Dict[str, Dict[str, Tuple[int, float]]] = {"user": {}, "item": {}}
        self.recent: Dict[str, List[str]] = {}  # every item of each user, in time and source order
        self.seen, self.total = 0, 0.0

    def features(self, user: str, item: str) -> List[str]:
        prior = self.total / self.seen if self.seen else None
        values = []
        for kind, key in (("user", user), ("item", item)):
            count, summed = self.stats[kind].get(key, (0, 0.0))
            weight = history.PRIOR_WEIGHTS[kind]
            values += [f"{math.log1p(count):.4f}",
                       "" if prior is None else f"{(summed + weight * prior) / (count + weight):.4f}"]
        return values + ["|".join(self.recent.get(user, [])[-history.RECENT_ITEMS:])]

    def add(self, user: str, item: str, outcome: float) -> None:
        for kind, key in (("user", user), ("item", item)):
            count, summed = self.stats[kind].get(key, (0, 0.0))
            self.stats[kind][key] = (count + 1, summed + outcome)
        self.recent.setdefault(user, []).append(item)
        self.seen, self.total = self.seen + 1, self.total + outcome


def reference(rows: List[Tuple[str, str, int, float]]) -> Tuple[List[List[str]], Reference]:
    """Features of (user, item, timestamp, outcome) rows in source order, returned in (timestamp, source) order."""
    ordered = sorted(rows, key=lambda r: r[2])  # stable: ties keep source order
    state, out, start = Reference(), [], 0
    while start < len(ordered):
        end = start
        while end < len(ordered) and ordered[end][2] == ordered[start][2]:
            end += 1
        out += [[r[0], r[1], str(r[2])] + state.features(r[0], r[1]) for r in ordered[start:end]]
        for r in ordered[start:end]:
            state.add(r[0], r[1], r[3])
        start = end
    return out, state


def prepared_rows(data: Path) -> List[List[str]]:
    """(user, item, timestamp, the four features) of every row of every span, in span and file order."""
    out = []
    for span in ingest.span_dirs(str(data)):
        for path in ingest.span_files(str(data), span):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    out.append([row["user_id"], row["item_id"], row["timestamp"]]
                               + [row[c] for c in history.HISTORY_COLUMNS])
    return out


def digest(data: Path) -> Dict[str, str]:
    return {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(data.rglob("*")) if p.is_file()}


def movietweetings_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        fields = (line.rstrip("\n").split("::") for line in f if line.strip())
        return [(u, i, int(t), float(r)) for u, i, r, t in fields]


def synthetic_raw(tmp_path: Path, rows: int = 12_000) -> Tuple[Path, List[Tuple[str, str, int, float]]]:
    """A synthetic log squeezed into an hour: several rows in most seconds."""
    spec = synthetic.Spec(rows=rows, users=800, items=300, seed=7, days=1 / 24, chunk_rows=1_000)
    raw = tmp_path / "raw"
    synthetic.write_raw(spec, str(raw))
    with open(raw / "interactions.csv", newline="") as f:
        source = [(r["user_id"], r["item_id"], int(r["timestamp"]), float(r["rating"])) for r in csv.DictReader(f)]
    return raw, source


# --- one go ---

def test_bundled_movietweetings_in_10_spans_equals_the_reference(tmp_path):
    source, data = movietweetings_dir(), tmp_path / "data"
    manifest = ingest.prepare("movietweetings", str(source), str(data), spans=10, **SMALL_RUNS)
    rows = movietweetings_rows(source / "ratings.dat")
    assert len(rows) == 100_000 and manifest["rows"] == 100_000
    assert [s["rows"] for s in manifest["spans"]] == [10_000] * 10
    assert all(len(s["files"]) >= 2 for s in manifest["spans"]), "parts of about 5,000 rows"
    assert sum(s["positives"] for s in manifest["spans"]) == sum(r[3] >= 8 for r in rows)
    expected, state = reference(rows)
    got = prepared_rows(data)
    assert got == expected, "every row, in time order, with the reference's features"
    assert all(len(r[1]) == 7 for r in got), "IMDb ids keep their leading zeros"
    spans = [[int(r[2]) for r in got[k * 10_000:(k + 1) * 10_000]] for k in range(10)]
    assert all(a[-1] <= b[0] for a, b in zip(spans, spans[1:])), "spans are time-ordered"
    with open(data / "items.csv") as f:
        assert sum(1 for _ in f) == 10_507 and not manifest["users_table"]
    snapshot = history.newest_snapshot(str(data))
    assert (snapshot.globals.seen, snapshot.globals.total) == (state.seen, state.total)
    for user, item in [expected[0][:2], expected[-1][:2], ("nobody", "nothing")]:
        assert snapshot.features(user, item) == state.features(user, item)


def test_movielens_latest_small_equals_the_reference(tmp_path):
    source = next((p for p in ML_LATEST_SMALL if (p / "ratings.csv").exists()), None)
    if source is None:
        pytest.skip("MovieLens latest-small not found")
    ingest.prepare("movielens", str(source), str(tmp_path / "data"), spans=4, **SMALL_RUNS)
    with open(source / "ratings.csv", newline="") as f:
        rows = [(r["userId"], r["movieId"], int(r["timestamp"]), float(r["rating"])) for r in csv.DictReader(f)]
    assert prepared_rows(tmp_path / "data") == reference(rows)[0]


def test_many_rows_per_second_equal_the_reference(tmp_path):
    raw, source = synthetic_raw(tmp_path)
    ties = len(source) - len({ts for _, _, ts, _ in source})
    assert ties > len(source) // 2, "most rows share their second with another"
    # Byte ranges of 20 kB: the CSV is read by many workers' ranges.
    ingest.prepare("csv", str(raw), str(tmp_path / "data"), spans=2, label_threshold=4,
                   range_bytes=20_000, part_rows=1_500)
    assert prepared_rows(tmp_path / "data") == reference(source)[0]


# --- appended batch by batch ---

def _write_batch(directory: Path, header: str, lines: List[str]) -> Path:
    directory.mkdir(parents=True)
    (directory / "interactions.csv").write_text(header + "".join(lines))
    return directory


def test_appending_batches_equals_preparing_in_one_go(tmp_path):
    raw, source = synthetic_raw(tmp_path)
    header, *lines = (raw / "interactions.csv").read_text().splitlines(keepends=True)
    # Cut the log in four; each cut falls inside a second, so every batch starts in the second the last one ended.
    cuts = [0]
    for target in (len(lines) // 5, len(lines) // 2, 3 * len(lines) // 4):
        at = target
        while source[at][2] != source[at - 1][2]:
            at += 1
        cuts.append(at)
    cuts.append(len(lines))
    data = tmp_path / "appended"
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        batch = _write_batch(tmp_path / f"batch-{k}", header, lines[a:b])
        if k == 1:
            shutil.copy(raw / "items.csv", batch / "items.csv")  # a batch that brings a catalog replaces it
        manifest = ingest.prepare("csv", str(batch), str(data), spans=2 if k == 2 else 1, label_threshold=4,
                                  append=k > 0, **SMALL_RUNS)
    assert [s["span"] for s in manifest["spans"]] == [1, 2, 3, 4, 5]
    assert [i["spans"] for i in manifest["ingests"]] == [[1, 1], [2, 2], [3, 4], [5, 5]]
    assert manifest["rows"] == len(source) and manifest["items_table"] and not manifest["users_table"]
    assert (data / "items.csv").read_text() == (raw / "items.csv").read_text()
    assert [n for n, _ in history.snapshots(str(data))] == [1, 2, 4, 5], "one immutable snapshot per ingest"

    ingest.prepare("csv", str(raw / "interactions.csv"), str(tmp_path / "one-go"), spans=3, label_threshold=4)
    assert prepared_rows(data) == prepared_rows(tmp_path / "one-go") == reference(source)[0]


def test_append_leaves_earlier_spans_untouched_and_refuses_late_rows(tmp_path):
    source = movietweetings_dir()
    ratings = (source / "ratings.dat").read_text(encoding="utf-8").splitlines(keepends=True)
    ratings.sort(key=lambda line: int(line.rsplit("::", 1)[1]))
    first, second = tmp_path / "first", tmp_path / "second"
    for directory, part in ((first, ratings[:6_000]), (second, ratings[6_000:9_000])):
        directory.mkdir()
        (directory / "ratings.dat").write_text("".join(part), encoding="utf-8")
    data = tmp_path / "data"
    ingest.prepare("movietweetings", str(first), str(data), spans=2)
    before = digest(data)

    ingest.prepare("movietweetings", str(second), str(data), spans=1, append=True)
    after = digest(data)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}, "earlier spans and snapshots are byte for byte"
    assert ingest.span_dirs(str(data)) == [1, 2, 3]
    expected = reference(movietweetings_rows(first / "ratings.dat") + movietweetings_rows(second / "ratings.dat"))[0]
    assert prepared_rows(data) == expected

    # A batch that goes back in time is refused, naming file, line and the last timestamp; DATA stays as it was.
    last = int(ratings[8_999].rsplit("::", 1)[1])
    late = tmp_path / "late"
    late.mkdir()
    (late / "ratings.dat").write_text(f"1::0000001::8::{last}\n2::0000002::9::{last - 1}\n", encoding="utf-8")
    with pytest.raises(ingest.IngestError, match=rf"ratings\.dat, line 2, column timestamp: {last - 1} is earlier "
                                                 rf"than {last}, the last timestamp already in .*span 3"):
        ingest.prepare("movietweetings", str(late), str(data), spans=1, append=True)
    csv_late = _write_batch(tmp_path / "late-csv", "user_id,item_id,timestamp,label\n",
                            [f"u,i,{last},1\n", f"u,i,{last + 5},1\n", f"v,i,{last - 7},0\n"])
    with pytest.raises(ingest.IngestError, match=rf"interactions\.csv, line 4, column timestamp: {last - 7} is "
                                                 rf"earlier than {last}"):
        ingest.prepare("csv", str(csv_late), str(data), spans=1, append=True)
    assert digest(data) == after and sorted(p.name for p in data.iterdir()) == sorted(
        ["history", "manifest.json", "span-1", "span-2", "span-3"]), "nothing left behind"


TOY = {"allow_old_timestamps": True}  # the toy logs below count seconds from 1970 (10, 20, 30)


def test_append_refuses_what_does_not_fit(tmp_path):
    good = _write_batch(tmp_path / "good", "user_id,item_id,timestamp,label\n", ["u,i,10,1\n", "v,i,20,0\n"])
    with pytest.raises(ingest.IngestError, match="no spans and manifest.json to append to"):
        ingest.prepare("csv", str(good), str(tmp_path / "empty"), spans=1, append=True, **TOY)
    data = tmp_path / "data"
    ingest.prepare("csv", str(good), str(data), spans=1, **TOY)
    other = _write_batch(tmp_path / "other", "user_id,item_id,timestamp,label,device\n", ["u,i,30,1,web\n"])
    with pytest.raises(ingest.IngestError, match=r"its columns .* differ from those of the spans"):
        ingest.prepare("csv", str(other), str(data), spans=1, append=True, **TOY)
    with pytest.raises(ingest.IngestError, match="prepared with history features; append the same way"):
        ingest.prepare("csv", str(good), str(data), spans=1, append=True, history=False, **TOY)
    rated = _write_batch(tmp_path / "rated", "user_id,item_id,timestamp,rating\n", ["u,i,30,4\n"])
    ingest.prepare("csv", str(rated), str(data), spans=1, append=True, label_threshold=4, **TOY)
    with pytest.raises(ingest.IngestError, match=r"prepared with --label-threshold 4; this batch would use 3"):
        ingest.prepare("csv", str(rated), str(data), spans=1, append=True, label_threshold=3, **TOY)
    shutil.rmtree(data / "history" / "after-span-2")
    with pytest.raises(ingest.IngestError, match="no history snapshot after span 2"):
        ingest.prepare("csv", str(rated), str(data), spans=1, append=True, label_threshold=4, **TOY)
    # Without history features the spans still only move forward in time.
    ingest.prepare("csv", str(good), str(tmp_path / "plain"), spans=1, history=False, **TOY)
    late = _write_batch(tmp_path / "late", "user_id,item_id,timestamp,label\n", ["u,i,19,1\n"])
    with pytest.raises(ingest.IngestError, match=r"line 2, column timestamp: 19 is earlier than 20"):
        ingest.prepare("csv", str(late), str(tmp_path / "plain"), spans=1, append=True, history=False, **TOY)


# --- the state ---

def test_running_stats_exclude_the_same_second_and_carry_the_last_one():
    # Previous state: u had 2 rows (sum 7) overall, one of them (outcome 3) in its last second, 50.
    # Items: u had a (before 50) and b (at 50).
    shard = history.Shard(np.array(["u"], dtype=object), np.array([2]), np.array([7.0]), np.array([1]),
                          np.array([4.0]), np.array(["a|b"], dtype=object), np.array(["a"], dtype=object))
    key = np.array(["v", "u", "u", "u", "v"], dtype=object)
    ts = np.array([60, 50, 60, 50, 70])
    pos = np.array([4, 0, 3, 1, 2])
    outcome = np.array([1.0, 5.0, 2.0, 4.0, 2.0])
    items = np.array(["x", "c", "e", "d", "y"], dtype=object)
    count, summed, recent, new = history.running_stats(shard, key, ts, pos, outcome, last=50, new_last=70,
                                                       items=items)
    # u at 50 sees only what came before 50 (1 row, 4.0); at 60 all of 50 (2 + 2 rows, 7 + 9).
    assert count.tolist() == [0, 1, 4, 1, 1] and summed.tolist() == [0.0, 4.0, 16.0, 4.0, 1.0]
    assert recent.tolist() == ["", "a", "a|b|c|d", "a", "x"]
    assert new.key.tolist() == ["u", "v"] and new.count.tolist() == [5, 2] and new.sum.tolist() == [18.0, 3.0]
    assert new.count_before_last.tolist() == [5, 1] and new.sum_before_last.tolist() == [18.0, 1.0]
    assert new.recent.tolist() == ["a|b|c|d|e", "x|y"] and new.recent_before_last.tolist() == ["a|b|c|d|e", "x"]
    # Rows in any order give the same answer.
    shuffled = np.array([3, 0, 4, 1, 2])
    again = history.running_stats(shard, key[shuffled], ts[shuffled], pos[shuffled], outcome[shuffled], 50, 70,
                                  items[shuffled])
    assert again[0].tolist() == count[shuffled].tolist() and again[3].key.tolist() == new.key.tolist()
    assert again[2].tolist() == recent[shuffled].tolist() and again[3].recent.tolist() == new.recent.tolist()
    # Only the newest RECENT_ITEMS are kept.
    many = history.running_stats(history.Shard.empty(), np.array(["w"] * 12, dtype=object), np.arange(12),
                                 np.arange(12), np.zeros(12), None, 11, np.array([f"i{k}" for k in range(12)],
                                                                                 dtype=object))
    assert many[2][-1] == "|".join(f"i{k}" for k in range(1, 11)) and many[3].recent[0].startswith("i2|")


def test_snapshot_shards_round_trip_and_buckets_are_stable(tmp_path):
    shard = history.Shard(np.array(["a", "b,c", "ü"], dtype=object), np.array([1, 2, 3]), np.array([0.5, 1.5, 2.25]),
                          np.array([1, 0, 3]), np.array([0.5, 0.0, 2.25]), np.array(["x|y", "", "z"], dtype=object),
                          np.array(["x", "", ""], dtype=object))
    history.write_shard(str(tmp_path), "user", 3, 16, shard)
    back = history.read_shard(str(tmp_path), "user", 3, 16)
    for name in history.Shard.COLUMNS:
        assert getattr(back, name).tolist() == getattr(shard, name).tolist()
    g = history.Globals(buckets=16, seen=6, total=4.25, last_timestamp=99, seen_before_last=3, total_before_last=2.0)
    history.write_meta(str(tmp_path), g)
    assert history.read_meta(str(tmp_path)) == g
    # The bucket of an id is part of the state's format: crc32 of its UTF-8 bytes, the same in every process.
    assert history.bucket_of(np.array(["u1", "0104257", "ü"], dtype=object), 16).tolist() == [6, 3, 5]


def test_multiprocessing_runner_writes_the_same_bytes(tmp_path):
    spec = synthetic.Spec(rows=6_000, users=500, items=200, seed=3, days=1, chunk_rows=1_000)
    ingest.prepare("synthetic", None, str(tmp_path / "in-memory"), spans=2, synthetic_spec=spec)
    ingest.prepare("synthetic", None, str(tmp_path / "processes"), spans=2, synthetic_spec=spec,
                   beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert digest(tmp_path / "processes") == digest(tmp_path / "in-memory")
