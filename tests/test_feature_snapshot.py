"""The feature snapshot a version looks ids up in: newest features per id, popularity, pairs seen, per span."""
from __future__ import annotations

import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from models.feature_snapshot import FeatureSnapshot, owner_of, side_table_columns, merge_sorted

CATEGORICAL, NUMERIC = ["country", "genres"], ["age", "item_history", "user_history"]
SIDE = {"user": ["country", "age"], "item": ["genres"]}


def example(user, item, ts, label, **features) -> bytes:
    feature = {"user_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[user.encode()])),
               "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode()])),
               "timestamp": tf.train.Feature(int64_list=tf.train.Int64List(value=[ts])),
               "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    for name, value in features.items():
        if isinstance(value, float):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_columns_belong_to_the_user_the_item_or_the_request():
    assert owner_of("country", SIDE) == "user" and owner_of("user_history", SIDE) == "user"
    assert owner_of("genres", SIDE) == "item" and owner_of("item_history_mean", SIDE) == "item"
    assert owner_of("device", SIDE) is None


def test_side_table_headers_name_their_columns(tmp_path):
    (tmp_path / "items.csv").write_text("\ufeffitem_id,genres,year\n1,Drama,1999\n")
    (tmp_path / "users.csv").write_text('"user_id","age"\nu,3\n')
    assert side_table_columns(str(tmp_path)) == {"user": ["age"], "item": ["genres", "year"]}


def test_newest_features_counts_and_pairs_carry_across_spans(tmp_path):
    span1 = [example("u1", "i1", 10, 1, country=["de"], age=30.0, user_history=0.0, genres=["Drama"],
                     item_history=0.0),
             example("u1", "i2", 20, 0, country=["de"], age=31.0, user_history=0.69, genres=["Comedy"],
                     item_history=0.0),
             example("u2", "i1", 15, 1, country=["fr"], age=50.0, user_history=0.0, genres=["Drama", "War"],
                     item_history=0.69)]
    snapshot = FeatureSnapshot(CATEGORICAL, NUMERIC, SIDE)
    # Out of time order and in two batches: the newest row still wins.
    snapshot.absorb([[span1[1]], [span1[0], span1[2]]])
    snapshot.end_span(1, 0.5)
    snapshot.save(str(tmp_path), 1)

    later = FeatureSnapshot.before(str(tmp_path), 2, CATEGORICAL, NUMERIC, SIDE)
    later.absorb([[example("u3", "i2", 30, 1, country=["it"], age=20.0, user_history=0.0, genres=["Comedy"],
                           item_history=0.69),
                   example("u2", "i3", 40, 1, country=["fr"], age=51.0, user_history=0.69, genres=[],
                           item_history=0.0)]])
    later.end_span(2, 0.5)
    later.save(str(tmp_path), 2)
    loaded = FeatureSnapshot.load(str(tmp_path / "after-span-2"), CATEGORICAL, NUMERIC, SIDE)

    users, items = loaded.users, loaded.items
    assert users.ids() == [b"u1", b"u2", b"u3"] and items.ids() == [b"i2", b"i1", b"i3"]  # first appearance
    u1, u2 = users.rows[b"u1"], users.rows[b"u2"]
    assert users.values["age"][u1] == 31.0 and users.values["country"][u1] == b"de"
    assert users.values["age"][u2] == 51.0 and math.isclose(users.values["user_history"][u2], 0.69, rel_tol=1e-6)
    assert items.values["genres"][items.rows[b"i1"]] == b"Drama|War"
    assert "genres" not in users.values and "age" not in items.values
    assert items.count.tolist() == [2, 2, 1] and items.positives.tolist() == [1, 2, 1]
    # Recent popularity: span 1's interactions at half weight beside span 2's.
    assert items.recent.tolist() == [0.5 * 1 + 1, 0.5 * 2 + 0, 0.5 * 0 + 1]
    splits, seen = loaded.seen_by_user()
    by_user = {users.ids()[u]: sorted(items.ids()[i] for i in seen[splits[u]:splits[u + 1]]) for u in range(3)}
    assert by_user == {b"u1": [b"i1", b"i2"], b"u2": [b"i1", b"i3"], b"u3": [b"i2"]}
    # Unknown ids look like the new ids of the newest span that had any: here only u3 (age 20, no history).
    assert users.defaults["age"] == 20.0 and users.defaults["user_history"] == 0.0


def test_a_rerun_of_a_span_starts_from_the_snapshot_before_it(tmp_path):
    first = FeatureSnapshot(CATEGORICAL, NUMERIC, SIDE)
    first.absorb([[example("u1", "i1", 10, 1, country=["de"], age=30.0)]])
    first.end_span(1, 0.5)
    first.save(str(tmp_path), 1)
    for _ in range(2):  # span 2 twice: the second run must not count span 2's rows twice
        again = FeatureSnapshot.before(str(tmp_path), 2, CATEGORICAL, NUMERIC, SIDE)
        again.absorb([[example("u1", "i1", 20, 1, country=["de"], age=30.0)]])
        again.end_span(2, 0.5)
        again.save(str(tmp_path), 2)
    loaded = FeatureSnapshot.load(str(tmp_path / "after-span-2"), CATEGORICAL, NUMERIC, SIDE)
    assert loaded.items.count.tolist() == [2] and loaded.items.recent.tolist() == [0.5 + 1]
    assert np.isnan(loaded.users.values["user_history"][0])  # never logged: no value


def test_popularity_decays_once_per_span_in_between(tmp_path):
    """A span with no snapshot of its own (a skipped day) still counts as a span of decay."""
    first = FeatureSnapshot(CATEGORICAL, NUMERIC, SIDE)
    first.absorb([[example("u1", "i1", 10, 1), example("u2", "i1", 11, 0), example("u2", "i2", 12, 1)]])
    first.end_span(1, 0.25)
    first.save(str(tmp_path), 1)
    later = FeatureSnapshot.before(str(tmp_path), 3, CATEGORICAL, NUMERIC, SIDE)
    later.absorb([[example("u3", "i2", 30, 1)]])
    later.end_span(3, 0.25)
    assert later.items.recent.tolist() == [2 * 0.25 ** 2, 1 * 0.25 ** 2 + 1]
    assert later.items.count.tolist() == [2, 2]  # all-time counts do not decay
    with pytest.raises(ValueError, match="span 2 folded into a feature snapshot of span 3"):
        later.end_span(2, 0.25)


def test_a_snapshot_without_recent_popularity_reads_as_undecayed(tmp_path):
    """Snapshots saved before recent popularity was kept load with every interaction counted in full."""
    old = FeatureSnapshot(CATEGORICAL, NUMERIC, SIDE)
    old.absorb([[example("u1", "i1", 10, 1), example("u2", "i1", 11, 1)]])
    old.end_span(1, 0.5)
    directory = old.save(str(tmp_path), 1)
    items = pq.read_table(os.path.join(directory, "items.parquet"))
    pq.write_table(items.drop(["_recent"]), os.path.join(directory, "items.parquet"))
    loaded = FeatureSnapshot.load(directory, CATEGORICAL, NUMERIC, SIDE)
    assert loaded.items.recent.tolist() == [2.0]


def test_a_users_recent_items_include_their_newest_interaction(tmp_path):
    """Logged lists hold the items before each row; what the user's next request should see includes the
    row's own item, oldest dropped past RECENT_ITEMS."""
    from models import features as F

    older = "|".join(f"o{k}" for k in range(F.RECENT_ITEMS))
    snapshot = FeatureSnapshot(["user_recent_items"], [], {})
    snapshot.absorb([[example("u1", "i9", 20, 1, user_recent_items=["a", "b"]),
                      example("u1", "b", 10, 1, user_recent_items=["a"]),
                      example("u2", "x", 5, 0, user_recent_items=older.split("|")),
                      example("u3", "y", 5, 1, user_recent_items=[])]])
    users = snapshot.users
    recent = {u: users.values["user_recent_items"][users.rows[u]] for u in (b"u1", b"u2", b"u3")}
    assert recent == {b"u1": b"a|b|i9", b"u2": "|".join(older.split("|")[1:] + ["x"]).encode(), b"u3": b"y"}


def test_pairs_merge_into_the_sorted_history_as_a_full_unique_would():
    rng = np.random.default_rng(3)
    seen = np.zeros(0, np.int64)
    everything = []
    for size in (0, 1, 50, 5000, 3):  # empty, single, overlapping and disjoint batches
        new = np.unique(rng.integers(0, 4000, size).astype(np.int64) << 32 | rng.integers(0, 9, size))
        everything.append(new)
        seen = merge_sorted(seen, new)
        np.testing.assert_array_equal(seen, np.unique(np.concatenate(everything)))
    assert seen.dtype == np.int64


def test_seen_items_per_user_survive_many_batches_and_are_int32(tmp_path):
    snapshot = FeatureSnapshot(CATEGORICAL, NUMERIC, SIDE)
    rng = np.random.default_rng(5)
    rows = [(f"u{u}", f"i{i}") for u, i in zip(rng.integers(0, 30, 400), rng.integers(0, 50, 400))]
    snapshot.absorb([[example(u, i, 10, 1)] for u, i in rows])  # 400 batches: merged 16 at a time
    snapshot.end_span(1, 0.5)
    splits, seen = snapshot.seen_by_user()
    assert seen.dtype == np.int32 and splits.dtype == np.int64 and splits[-1] == len(seen)
    users, items = snapshot.users.ids(), snapshot.items.ids()
    got = {(users[u].decode(), items[i].decode()) for u in range(len(users)) for i in seen[splits[u]:splits[u + 1]]}
    assert got == set(rows)
    assert all(list(seen[splits[u]:splits[u + 1]]) == sorted(seen[splits[u]:splits[u + 1]]) for u in range(len(users)))
