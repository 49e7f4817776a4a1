"""Replay reservoir: a bounded, uniform sample of the training examples of earlier spans.

Incremental training on span N alone forgets; replaying a sample of older
spans keeps what was learnt. The reservoir (Algorithm R) holds at most
`capacity` serialized tf.Examples, each earlier example equally likely to be
in it, at a cost per span that does not grow with history. It lives in the
work directory and records which sources (the span's example files) it has
absorbed, so rerunning a span does not count its rows twice.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List

import numpy as np
import tensorflow as tf

from models.records import read_records

RECORDS = "reservoir.tfrecord.gz"
STATE = "reservoir.json"


class Reservoir:
    def __init__(self, directory: str, capacity: int, seed: int = 0):
        self.directory = directory
        self.capacity = int(capacity)
        self.seed = seed
        self.examples: List[bytes] = []
        self.seen = 0
        self.sources: List[str] = []
        state_path = os.path.join(directory, STATE)
        if tf.io.gfile.exists(state_path):
            with tf.io.gfile.GFile(state_path) as f:
                state = json.load(f)
            self.seen, self.sources = int(state["seen"]), list(state["sources"])
            self.examples = read_records([os.path.join(directory, RECORDS)])

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, n: int, seed: int) -> List[bytes]:
        """n examples drawn without replacement (all of them when n >= size)."""
        n = min(int(n), len(self.examples))
        if n <= 0:
            return []
        rng = np.random.default_rng(seed)
        return [self.examples[i] for i in rng.choice(len(self.examples), size=n, replace=False)]

    def absorb(self, source: str, batches: Iterable[List[bytes]]) -> bool:
        """Adds one source's examples, given in batches (Algorithm R), and saves; False when already absorbed.

        Only the reservoir is held: each batch is drawn against vectorised and dropped.
        """
        if source in self.sources:
            return False
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
        self.sources.append(source)
        self._save()
        return True

    def _save(self) -> None:
        tf.io.gfile.makedirs(self.directory)
        records = os.path.join(self.directory, RECORDS)
        tmp = records + ".tmp"
        with tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
            for example in self.examples:
                writer.write(example)
        tf.io.gfile.rename(tmp, records, overwrite=True)
        state_tmp = os.path.join(self.directory, STATE + ".tmp")
        with tf.io.gfile.GFile(state_tmp, "w") as f:
            json.dump({"seen": self.seen, "sources": self.sources, "capacity": self.capacity}, f)
        tf.io.gfile.rename(state_tmp, os.path.join(self.directory, STATE), overwrite=True)
