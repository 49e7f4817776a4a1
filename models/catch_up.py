"""No span's learning lost: the spans a run trains on besides its own.

A candidate that is not blessed is not pushed, so the next run warm-starts
from a model that never saw that span. The rule (docs/ARCHITECTURE.md, "No
lost spans"): a run trains on every span since the one its base (warm-start)
model was trained on. Each pushed version records its span
(`PUSH_RECORD`, written by components/deployment.py); each incremental run
records where its span's train split lives (`WORK/replay/examples/span-N.json`,
rewritten by a rerun of the span). A run for span N with a base model pushed
for span S then also streams the recorded train splits of spans S+1..N-1
through today's Transform layer: the vocabularies only grow, so the ids of
those spans keep their rows. With no base model (nothing serves) every
recorded earlier span is caught up; a base that records no span (a version
increc did not push) catches up nothing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from typing import List, Optional, Tuple

import tensorflow as tf

PUSH_RECORD = os.path.join("assets.extra", "increc_push.json")
INDEX = "examples"  # under the replay store: where each span's train split lives
RECORD = re.compile(r"span-(\d+)\.json$")


def record_span(store: str, span: int, train_files: List[str]) -> None:
    """Records the file patterns of span N's train split (temp file + rename: a crash leaves the old record)."""
    directory = os.path.join(store, INDEX)
    tf.io.gfile.makedirs(directory)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump({"span": int(span), "train_files": list(train_files)}, f)
    tf.io.gfile.rename(tmp, os.path.join(directory, f"span-{int(span)}.json"), overwrite=True)


def recorded_spans(store: str) -> List[int]:
    directory = os.path.join(store, INDEX)
    names = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    return sorted(int(m.group(1)) for m in map(RECORD.match, names) if m)


def base_span(base_model: Optional[str]) -> Optional[int]:
    """The span the base model was pushed for; 0 with no base model (it has seen nothing); None when unknown."""
    if not base_model or not tf.io.gfile.exists(os.path.join(base_model, "saved_model.pb")):
        return 0
    path = os.path.join(base_model, PUSH_RECORD)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        span = json.load(f).get("span")
    return int(span) if span is not None else None


def since_base(store: str, span: int, base_model: Optional[str]) -> Tuple[List[int], List[str]]:
    """(spans, their train-split file patterns) that the run for `span` trains on besides its own."""
    base = base_span(base_model)
    if base is None:
        logging.info("the base model %s records no span: no earlier span is caught up", base_model)
        return [], []
    caught_up, patterns = [], []
    for earlier in recorded_spans(store):
        if not base < earlier < span:
            continue
        with tf.io.gfile.GFile(os.path.join(store, INDEX, f"span-{earlier}.json")) as f:
            files = json.load(f)["train_files"]
        if not any(tf.io.gfile.glob(p) for p in files):
            logging.warning("span %d's train split is gone (%s): not caught up", earlier, files)
            continue
        caught_up.append(earlier)
        patterns.extend(files)
    return caught_up, patterns
