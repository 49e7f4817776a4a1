"""The spans a run trains on besides its own (models/catch_up.py) and the rollback's paired test."""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from components.deployment_guard import rollback_test
from models import catch_up


def write_split(root, span):
    """A gzipped TFRecord train split of two records for `span`; returns its file pattern."""
    split = root / f"examples-{span}" / "Split-train"
    split.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(split / "data.gz"), options="GZIP") as writer:
        writer.write(b"a")
        writer.write(b"b")
    return str(split / "*")


def base_model(root, span):
    """A model directory as the DeploymentGuard hands it on: saved_model.pb and, for a push, its record."""
    path = root / f"base-{span}"
    (path / "assets.extra").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"")
    if span is not None:
        (path / catch_up.PUSH_RECORD).write_text(json.dumps({"span": span, "time": 0}))
    return str(path)


def test_spans_since_the_base_models_span_are_caught_up(tmp_path):
    store = str(tmp_path / "replay")
    patterns = {span: write_split(tmp_path, span) for span in (1, 2, 3, 4, 5)}
    for span, pattern in patterns.items():
        catch_up.record_span(store, span, [pattern])
    assert catch_up.recorded_spans(store) == [1, 2, 3, 4, 5]
    # Pushed for span 2: the run of span 5 also trains on 3 and 4 (not 5, its own; not 1 or 2, seen).
    assert catch_up.since_base(store, 5, base_model(tmp_path, 2)) == ([3, 4], [patterns[3], patterns[4]])
    assert catch_up.since_base(store, 5, base_model(tmp_path, 4)) == ([], [])
    # Nothing serving: every recorded earlier span; a version increc did not push: none.
    assert catch_up.since_base(store, 3, None)[0] == [1, 2]
    assert catch_up.since_base(store, 3, base_model(tmp_path, None)) == ([], [])
    # A rerun of span 3 points its record at the new Examples.
    again = write_split(tmp_path / "rerun", 3)
    catch_up.record_span(store, 3, [again])
    assert catch_up.since_base(store, 5, base_model(tmp_path / "b", 2)) == ([3, 4], [again, patterns[4]])
    # Examples that are gone are skipped, not an error.
    tf.io.gfile.rmtree(str(tmp_path / "examples-4"))
    assert catch_up.since_base(store, 5, base_model(tmp_path / "c", 2))[0] == [3]


def test_rollback_test_rolls_back_a_version_that_is_clearly_worse_and_keeps_noise():
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.4
    good = labels + rng.normal(size=2000)
    test = rollback_test(labels, -good, good, 0.99, 0.005)  # a flipped version against a good one
    assert test["roll_back"] and test["upper"] < 0 and "worse with confidence" in test["reason"]
    similar = good + 0.01 * rng.normal(size=2000)
    test = rollback_test(labels, similar, good, 0.99, 0.005)
    assert not test["roll_back"] and test["reason"].startswith("not shown worse")
    assert test["lower"] < test["difference"] < test["upper"] and abs(test["difference"]) < 0.005
