"""Append-only vocabularies for Transform.

TFT recomputes a vocabulary on every run, so the same id could land on a new
row of the embedding table and a warm-started model would be wrong. Here a
vocabulary only grows: ids seen before keep their index forever, new ids are
appended (most frequent first), and the result is stored in the work
directory for the next span. Index layout of a looked-up value:

    [0, oov_buckets)                  hash buckets for values not in the vocabulary
    oov_buckets + line_number         known values

so known indices never move when the vocabulary grows.
"""
from __future__ import annotations

import collections
import os
import uuid
from typing import List, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam

from models import features as F


def read_vocabulary(path: str) -> List[str]:
    if not path or not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path, "rb") as f:
        return [line.decode("utf-8") for line in f.read().splitlines()]


def merge(previous: List[str], counts: List[Tuple[bytes, int]]) -> List[str]:
    """previous + the new values, most frequent first (ties by value), previous order untouched."""
    known = set(previous)
    new = {}
    for value, count in counts:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if text in known or "\n" in text or "\r" in text:
            continue  # a value with a line break cannot live in a text vocabulary: it stays OOV
        new[text] = new.get(text, 0) + count
    return previous + [v for v, _ in sorted(new.items(), key=lambda vc: (-vc[1], vc[0]))]


def write_atomically(path: str, lines: List[str]) -> None:
    directory = os.path.dirname(path)
    tf.io.gfile.makedirs(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))
    tf.io.gfile.rename(tmp, path, overwrite=True)


class AppendOnlyVocabulary(tft_beam.experimental.PTransformAnalyzer):
    """Analyzer: batches of values -> path of the merged vocabulary (a Transform asset)."""

    def __init__(self, feature: str, store_dir: str):
        super().__init__()
        self._feature = feature
        self._store_path = os.path.join(store_dir, F.vocab_asset_name(feature))

    def expand(self, pcoll):
        feature, store_path, temp_dir = self._feature, self._store_path, self.base_temp_dir
        # Read when the pipeline is built, before any analyzer of this run writes the store.
        previous = read_vocabulary(store_path)

        def write(counts):
            merged = merge(previous, counts)
            asset_path = os.path.join(temp_dir, F.vocab_asset_name(feature))
            write_atomically(asset_path, merged)
            # The store is only ever extended, so rerunning a span is harmless.
            write_atomically(store_path, merged)
            return np.array(asset_path.encode("utf-8"), dtype=object)

        # Counted per batch, then merged: one Beam element per value would cost more than the rest of Transform.
        return (pcoll
                | "CountBatch" >> beam.Map(lambda batch: collections.Counter(batch[0].tolist()))
                | "CountAll" >> beam.CombineGlobally(_SumCounters())
                | "Merge" >> beam.Map(lambda counts: write(list(counts.items()))))


class _SumCounters(beam.CombineFn):
    """Value counts merged in place: the accumulator holds one entry per distinct value, never the rows."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, accumulator, counts):
        accumulator.update(counts)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, accumulator):
        return accumulator


class PreviousVocabularySize(beam.PTransform):
    """Analyzer: the size of the stored vocabulary before this run (values seen in earlier spans)."""

    def __init__(self, feature: str, store_dir: str):
        super().__init__()
        self._store_path = os.path.join(store_dir, F.vocab_asset_name(feature))

    def expand(self, pcoll):
        size = len(read_vocabulary(self._store_path))
        return pcoll.pipeline | "Size" >> beam.Create([np.array(size, dtype=np.int64)])


def append_only_vocabulary(values: tf.Tensor, feature: str, store_dir: str):
    """Runs the analyzers on a 1-D string tensor; returns (vocabulary path, previous size) tensors."""
    (path,) = tft.experimental.ptransform_analyzer(
        inputs=[values],
        ptransform=AppendOnlyVocabulary(feature, store_dir),
        output_dtypes=[tf.string],
        output_shapes=[[]],
        output_asset_default_values=[b"__tracing_placeholder__"],  # TF cannot open an empty table file
        name=f"vocabulary_{feature}",
    )
    (previous_size,) = tft.experimental.ptransform_analyzer(
        inputs=[values],
        ptransform=PreviousVocabularySize(feature, store_dir),
        output_dtypes=[tf.int64],
        output_shapes=[[]],
        name=f"previous_vocabulary_size_{feature}",
    )
    return path, previous_size


def lookup(values: tf.Tensor, vocabulary_path: tf.Tensor, oov_buckets: int) -> tf.Tensor:
    """Index of each value with the OOV-first layout described above."""
    known = tft.apply_vocabulary(values, deferred_vocab_filename_tensor=vocabulary_path, default_value=-1)
    oov = tf.strings.to_hash_bucket_fast(values, oov_buckets)
    return tf.where(known < 0, oov, known + oov_buckets)
