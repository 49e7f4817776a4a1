"""Replay reservoir: a bounded, uniform sample of the training examples of earlier spans.

Incremental training on span N alone forgets; replaying a sample of older
spans keeps what was learnt. The reservoir (Algorithm R) holds at most
`capacity` serialized tf.Examples, each earlier example equally likely to be
in it, at a cost per span that does not grow with history. It lives in the
work directory as one snapshot per span (models/spans.py): the run for span N
starts from the snapshot of the span before and writes `after-span-N`, so a
rerun of span N gives the same reservoir as one clean run.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, List, Optional

import numpy as np
import tensorflow as tf

from models import spans
from models.records import read_records

RECORDS = "reservoir.tfrecord.gz"
STATE = "reservoir.json"
SNAPSHOTS_KEPT = 3  # a rerun of span N needs only the snapshot of the span before it


class Reservoir:
    def __init__(self, capacity: int, seed: int = 0, examples: Optional[List[bytes]] = None, seen: int = 0):
        self.capacity = int(capacity)
        self.seed = seed
        self.examples: List[bytes] = list(examples or [])
        self.seen = seen

    @classmethod
    def load(cls, directory: Optional[str], capacity: int, seed: int = 0) -> "Reservoir":
        """The reservoir saved in a directory (empty when there is none)."""
        state_path = os.path.join(directory, STATE) if directory else None
        if state_path is None or not tf.io.gfile.exists(state_path):
            return cls(capacity, seed)
        with tf.io.gfile.GFile(state_path) as f:
            state = json.load(f)
        return cls(capacity, seed, read_records([os.path.join(directory, RECORDS)]), int(state["seen"]))

    @classmethod
    def before(cls, store: str, span: int, capacity: int, seed: int = 0) -> "Reservoir":
        """What the reservoir held when span `span` arrived: the newest earlier span's snapshot.

        Work directories from before per-span snapshots kept one reservoir in
        the store itself; it is the base until the first snapshot exists.
        """
        base = spans.base_snapshot(store, span)
        return cls.load(base if base is not None else store, capacity, seed)

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, n: int, seed: int) -> List[bytes]:
        """n examples drawn without replacement (all of them when n >= size)."""
        n = min(int(n), len(self.examples))
        if n <= 0:
            return []
        rng = np.random.default_rng(seed)
        return [self.examples[i] for i in rng.choice(len(self.examples), size=n, replace=False)]

    def absorb(self, batches: Iterable[List[bytes]]) -> None:
        """Adds examples, given in batches (Algorithm R). Only the reservoir is held: each batch is drawn
        against vectorised and dropped."""
        rng = np.random.default_rng([self.seed, self.seen])
        for batch in batches:
            room = max(0, self.capacity - len(self.examples))
            self.examples.extend(batch[:room])
            rest = batch[room:]
            if rest:
                # The k-th example ever seen replaces a random slot with probability capacity / k.
                seen = self.seen + room + np.arange(1, len(rest) + 1)
                slots = rng.integers(0, seen)
                for i in np.flatnonzero(slots < self.capacity):
                    self.examples[slots[i]] = rest[i]
            self.seen += len(batch)

    def save(self, store: str, span: int) -> str:
        """Writes the `after-span-N` snapshot: into a temporary directory, renamed into place."""
        tf.io.gfile.makedirs(store)
        tmp = os.path.join(store, f".tmp-{uuid.uuid4().hex}")
        tf.io.gfile.makedirs(tmp)
        with tf.io.TFRecordWriter(os.path.join(tmp, RECORDS), options="GZIP") as writer:
            for example in self.examples:
                writer.write(example)
        with tf.io.gfile.GFile(os.path.join(tmp, STATE), "w") as f:
            json.dump({"seen": self.seen, "capacity": self.capacity, "span": span}, f)
        target = spans.snapshot_dir(store, span)
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)  # a rerun of the span: the same content again
        tf.io.gfile.rename(tmp, target)
        spans.prune(store, span, SNAPSHOTS_KEPT)
        return target
