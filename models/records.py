"""Reading serialized tf.Examples from gzipped TFRecord files, in bounded batches."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional

import numpy as np
import tensorflow as tf

READ_BATCH = 65536


def record_files(patterns: List[str]) -> List[str]:
    """The files matching the patterns, in sorted order."""
    return sorted(f for p in patterns for f in tf.io.gfile.glob(p))


def record_dataset(patterns: List[str]) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(record_files(patterns), compression_type="GZIP")


def iter_record_batches(patterns: List[str], batch: int = READ_BATCH) -> Iterator[List[bytes]]:
    """The records as lists of at most `batch`: one record at a time costs ~80 us each in Python."""
    files = record_files(patterns)
    if not files:
        return
    for chunk in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch):
        yield chunk.numpy().tolist()


def read_records(patterns: List[str]) -> List[bytes]:
    """Every record, in sorted file order. Only for inputs known to be small (tests, benchmarks, reservoir)."""
    return [record for batch in iter_record_batches(patterns) for record in batch]


SPLIT_ROWS_FILE = "split_rows.json"  # written by SpanExampleGen next to its Split-* directories
SPAN_FILE = "span.json"  # the span an Examples artifact holds, also written by SpanExampleGen


def patterns_by_span(patterns: List[str]) -> Optional[Dict[int, List[str]]]:
    """`<examples>/Split-<name>/*` patterns grouped by the span of their Examples artifact; None where an
    artifact does not say its span (one from before SpanExampleGen wrote it, or not SpanExampleGen's)."""
    out: Dict[int, List[str]] = {}
    for pattern in patterns:
        path = os.path.join(os.path.dirname(os.path.dirname(pattern)), SPAN_FILE)
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            out.setdefault(int(json.load(f)["span"]), []).append(pattern)
    return dict(sorted(out.items()))


def count_records(patterns: List[str]) -> int:
    """Records matching `<examples>/Split-<name>/*` patterns: from SpanExampleGen's counts where it left
    them, else by reading the files."""
    known = 0
    unknown = []
    for pattern in patterns:
        split_dir = os.path.dirname(pattern)
        counts = os.path.join(os.path.dirname(split_dir), SPLIT_ROWS_FILE)
        split = os.path.basename(split_dir)[len("Split-"):]
        if os.path.basename(pattern) == "*" and split_dir.rsplit("/", 1)[-1].startswith("Split-") \
                and tf.io.gfile.exists(counts):
            with tf.io.gfile.GFile(counts) as f:
                rows = json.load(f)
            if split in rows:
                known += int(rows[split])
                continue
        unknown.append(pattern)
    return known + _read_and_count(unknown)


def _read_and_count(patterns: List[str]) -> int:
    files = record_files(patterns)
    if not files:
        return 0
    # Counted in batches: a reduce step per record costs ~50 us, per batch nothing.
    records = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(READ_BATCH)
    return int(records.reduce(np.int64(0), lambda n, batch: n + tf.shape(batch, out_type=tf.int64)[0]))
