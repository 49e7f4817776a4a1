"""Append-only vocabularies for Transform.

TFT recomputes a vocabulary on every run, so the same id could land on a new
row of the embedding table and a warm-started model would be wrong. Here a
vocabulary only grows: ids seen before keep their index forever, new ids are
appended (most frequent first), and the result is kept in the work
directory, one snapshot per span (models/spans.py), for the next span to
extend. Index layout of a looked-up value:

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
from models import spans


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


SNAPSHOTS_KEPT = 3  # a rerun of span N needs only the snapshot of the span before it


def base_vocabulary(store_dir: str, feature: str, span: int) -> List[str]:
    """The vocabulary a run for `span` extends: the newest earlier span's snapshot.

    Work directories from before per-span snapshots kept one flat file per
    feature; it is the base until the first snapshot exists.
    """
    base = spans.base_snapshot(store_dir, span)
    if base is not None:
        return read_vocabulary(os.path.join(base, F.vocab_asset_name(feature)))
    return read_vocabulary(os.path.join(store_dir, F.vocab_asset_name(feature)))


class AppendOnlyVocabulary(tft_beam.experimental.PTransformAnalyzer):
    """Analyzer: batches of values -> path of the merged vocabulary (a Transform asset).

    The merged vocabulary also goes to the span's snapshot, `after-span-N`,
    which the next span extends. A rerun of span N starts from the same
    earlier snapshot, so it writes the same vocabulary.
    """

    def __init__(self, feature: str, store_dir: str, span: int):
        super().__init__()
        self._feature, self._store_dir, self._span = feature, store_dir, span

    def expand(self, pcoll):
        feature, store_dir, span, temp_dir = self._feature, self._store_dir, self._span, self.base_temp_dir
        previous = base_vocabulary(store_dir, feature, span)
        snapshot = os.path.join(spans.snapshot_dir(store_dir, span), F.vocab_asset_name(feature))

        def write(counts):
            merged = merge(previous, counts)
            asset_path = os.path.join(temp_dir, F.vocab_asset_name(feature))
            write_atomically(asset_path, merged)
            write_atomically(snapshot, merged)
            spans.prune(store_dir, span, SNAPSHOTS_KEPT)
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
    """Analyzer: the size of the vocabulary this span extends (values seen in earlier spans)."""

    def __init__(self, feature: str, store_dir: str, span: int):
        super().__init__()
        self._feature, self._store_dir, self._span = feature, store_dir, span

    def expand(self, pcoll):
        size = len(base_vocabulary(self._store_dir, self._feature, self._span))
        return pcoll.pipeline | "Size" >> beam.Create([np.array(size, dtype=np.int64)])


def append_only_vocabulary(values: tf.Tensor, feature: str, store_dir: str, span: int):
    """Runs the analyzers on a 1-D string tensor; returns (vocabulary path, previous size) tensors."""
    (path,) = tft.experimental.ptransform_analyzer(
        inputs=[values],
        ptransform=AppendOnlyVocabulary(feature, store_dir, span),
        output_dtypes=[tf.string],
        output_shapes=[[]],
        output_asset_default_values=[b"__tracing_placeholder__"],  # TF cannot open an empty table file
        name=f"vocabulary_{feature}",
    )
    (previous_size,) = tft.experimental.ptransform_analyzer(
        inputs=[values],
        ptransform=PreviousVocabularySize(feature, store_dir, span),
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
