"""SpanExampleGen: one span of raw interaction CSV into tf.Examples, with Beam, in bounded memory.

What the stock CsvExampleGen does not do and increc needs:
- quoted fields that hold commas or newlines, with errors that name file and line;
- `|`-separated values become multi-valued categoricals;
- the optional `items.csv` / `users.csv` side tables are joined in;
- malformed rows are counted and dropped under a bad-row budget, and the run
  fails, naming the rows, when the budget is exceeded;
- the eval split is the newest `eval_fraction` of the span by time (at most
  `max_eval_rows`), not a hash.

The span's files are cut into byte ranges (components/csv_reader.py) and
every pass is a ParDo over those ranges; only per-range summaries travel
between passes, so no worker holds the span (docs/ARCHITECTURE.md,
"Streaming ingestion"):
  1. count   newlines and quotes per range: where each range's records start;
  2. survey  good and bad rows, each column's kind, rows per second (the
             bad-row budget is enforced here, before anything is encoded);
             the rows per second give the exact eval cut;
  3. encode  rows joined with the side tables into Arrow batches, turned into
             tf.Examples by tfx-bsl's encoder, written per range as gzipped
             TFRecord files of the train and eval splits.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tensorflow as tf
from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, component_spec, standard_artifacts

from components import csv_reader, timestamps
from models import features as F
from models.records import SPAN_FILE

REQUIRED_COLUMNS = (F.USER_ID, F.ITEM_ID, F.TIMESTAMP, F.LABEL)
SIDE_TABLES = {"items.csv": F.ITEM_ID, "users.csv": F.USER_ID}
BAD_ROWS_FILE = "bad_rows.json"
SPLIT_ROWS_FILE = "split_rows.json"  # rows per split; the Trainer reads it instead of counting records
SHOWN_BAD_ROWS = 5
LISTED_BAD_ROWS = 1000  # bad rows named in the report; the count is always exact
ENCODE_BATCH = 32768  # rows per Arrow batch handed to the encoder
DEFAULT_MAX_EVAL_ROWS = 50_000
RECORD_PREFIX = "data_tfrecord"
PARQUET_PREFIX = "data_parquet"


class MalformedInputError(ValueError):
    """Raised when a span or side table cannot be read, or too many rows are bad."""


# --- values ---

def is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def combine_kinds(kinds) -> str:
    seen = set(k for k in kinds if k)
    if "categorical" in seen:
        return "categorical"
    return "numeric" if seen else ""


def kind_of(values: pa.Array) -> str:
    """'numeric' when every non-empty value is a finite number, 'categorical' when one is not, '' when all are empty."""
    values = pc.utf8_trim_whitespace(values)
    present = values.filter(pc.greater(pc.utf8_length(values), 0))
    if len(present) == 0:
        return ""
    try:
        numbers = pc.cast(present, pa.float64())
        if pc.all(pc.is_finite(numbers)).as_py():
            return "numeric"
    except pa.ArrowInvalid:
        pass
    # Arrow's number syntax is narrower than Python's float(): ask Python before calling it text.
    return "numeric" if all(is_number(v) for v in present.to_pylist()) else "categorical"


def column_kinds(columns: Dict[str, pa.Array]) -> Dict[str, str]:
    """The kind of each column from all of its values; an all-empty column is categorical."""
    return {name: kind_of(values) or "categorical" for name, values in columns.items()}


# --- the span's files ---

@dataclasses.dataclass(frozen=True)
class SpanFile:
    index: int
    header: csv_reader.Header

    def column(self, name: str) -> int:
        return self.header.columns.index(name)


def span_files(pattern: str, range_bytes: int) -> Tuple[List[SpanFile], List[Tuple[int, csv_reader.ByteRange]]]:
    """The span's CSV files (headers checked) and their byte ranges; fails at once naming a bad file."""
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
        raise MalformedInputError(f"no span file matches {pattern}")
    files, ranges = [], []
    for index, path in enumerate(paths):
        try:
            header = csv_reader.read_header(path, REQUIRED_COLUMNS)
        except csv_reader.CsvError as e:
            raise MalformedInputError(str(e)) from None
        files.append(SpanFile(index, header))
        ranges += [(index, r) for r in csv_reader.plan_ranges(header, range_bytes)]
    return files, ranges


def check_interaction(fields: List[str], at: Tuple[int, int, int, int]) -> str:
    """Why an interaction row is malformed, or '' (at: positions of user, item, timestamp, label)."""
    user, item, timestamp, label = at
    if not fields[user].strip():
        return f"empty {F.USER_ID}"
    if not fields[item].strip():
        return f"empty {F.ITEM_ID}"
    try:
        seconds = int(fields[timestamp])
    except ValueError:
        return f"timestamp {fields[timestamp]!r} is not an integer (Unix seconds)"
    if seconds < 0:
        return f"timestamp {seconds} is negative; timestamps are seconds since 1970-01-01 UTC"
    if seconds >= timestamps.LATEST:
        unit = timestamps.Timestamps().unit_of(seconds)
        hint = f"it looks like {timestamps.UNITS[unit]}" if unit else "it is past 2100"
        return f"timestamp {seconds}: {hint}; spans hold seconds (increc prepare converts other units)"
    if fields[label].strip() not in ("0", "1"):
        return f"label {fields[label]!r} is not 0 or 1"
    return ""


@dataclasses.dataclass
class RowBatch:
    """Up to ENCODE_BATCH good rows of a range, column by column, and the bad rows met on the way."""

    lines: np.ndarray
    columns: Dict[str, pa.Array]  # every column of the file, as text
    timestamps: np.ndarray
    labels: np.ndarray
    bad: List[Tuple[int, str]]

    def __len__(self) -> int:
        return len(self.lines)


def read_batches(span_file: SpanFile, byte_range: csv_reader.ByteRange,
                 position: csv_reader.RangePosition) -> Iterator[RowBatch]:
    lines, rows, bad = [], [], []
    try:
        for line, fields, reason in csv_reader.read_range(span_file.header, byte_range, position):
            if fields is None:
                bad.append((line, reason))
                continue
            lines.append(line)
            rows.append(fields)
            if len(rows) >= ENCODE_BATCH:
                yield _checked_batch(span_file, lines, rows, bad)
                lines, rows, bad = [], [], []
    except csv_reader.CsvError as e:
        raise MalformedInputError(str(e)) from None
    if rows or bad:
        yield _checked_batch(span_file, lines, rows, bad)


def _checked_batch(span_file: SpanFile, lines: List[int], rows: List[List[str]], bad: List[Tuple[int, str]]) -> RowBatch:
    """The interaction checks, column at a time; rows that fail go to `bad` with check_interaction's reason."""
    names = span_file.header.columns
    values = list(zip(*rows)) if rows else [() for _ in names]
    columns = {name: pa.array(column, pa.string()) for name, column in zip(names, values)}
    ok = np.ones(len(rows), bool)
    for name in (F.USER_ID, F.ITEM_ID):
        ok &= pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(columns[name])), 0).to_numpy(zero_copy_only=False)
    seconds, parsed = _integers(columns[F.TIMESTAMP])
    label = pc.utf8_trim_whitespace(columns[F.LABEL])
    ok &= parsed & (seconds >= 0) & (seconds < timestamps.LATEST)
    ok &= pc.is_in(label, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    labels = pc.equal(label, "1").to_numpy(zero_copy_only=False).astype(np.int64)
    if not ok.all():
        at = tuple(span_file.column(c) for c in REQUIRED_COLUMNS)
        bad = sorted(bad + [(lines[i], check_interaction(rows[i], at)) for i in np.flatnonzero(~ok)])
        keep = pa.array(ok)
        columns = {name: column.filter(keep) for name, column in columns.items()}
        seconds, labels = seconds[ok], labels[ok]
    return RowBatch(np.array(lines, np.int64)[ok] if rows else np.zeros(0, np.int64), columns, seconds,
                    labels, bad)


def _integers(values: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(int64 values, which parsed) with Python's int() syntax; 0 where a value is not an integer."""
    try:
        return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False), np.ones(len(values), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out, parsed = np.zeros(len(values), np.int64), np.ones(len(values), bool)
    for i, text in enumerate(values.to_pylist()):
        try:
            out[i] = int(text)
        except (ValueError, OverflowError):
            parsed[i] = False
    return out, parsed


# --- side tables ---

class SideTable:
    """A side table in columnar form (Arrow), joined to rows by vectorised key lookup."""

    def __init__(self, path: str, key: str):
        try:
            header, records = csv_reader.read_file(path, (key,))
            at = header.columns.index(key)
            keys, values, first_line = [], [[] for _ in header.columns], {}
            for line, fields, reason in records:
                if fields is None:
                    raise MalformedInputError(f"{path}, line {line}: {reason}")
                value = fields[at].strip()
                if not value:
                    raise MalformedInputError(f"{path}, line {line}: empty {key}")
                if value in first_line:
                    raise MalformedInputError(f"{path}, line {line}: duplicate {key} {value!r} "
                                              f"(first on line {first_line[value]})")
                first_line[value] = line
                keys.append(value)
                for column, field in zip(values, fields):
                    column.append(field)
        except csv_reader.CsvError as e:
            raise MalformedInputError(str(e)) from None
        self.key = key
        self.columns = {name: pa.array(column, pa.string())
                        for name, column in zip(header.columns, values) if name != key}
        self.kinds = column_kinds(self.columns)
        self.keys = pa.array(keys, pa.string())

    def lookup(self, keys: pa.Array) -> Dict[str, pa.Array]:
        """Each feature column's value for each key; '' where the key is not in the table."""
        index = pc.index_in(keys, value_set=self.keys)
        return {name: pc.fill_null(column.take(index), "") for name, column in self.columns.items()}


def load_side_tables(input_base: str) -> Dict[str, SideTable]:
    tables = {}
    for name, key in SIDE_TABLES.items():
        path = os.path.join(input_base, name)
        if tf.io.gfile.exists(path):
            tables[key] = SideTable(path, key)
    return tables


# --- pass 2: survey ---

@dataclasses.dataclass
class Survey:
    """What a pass over rows learnt: counts, bad rows, column kinds, and rows per timestamp."""

    rows: int = 0
    bad: int = 0
    listed_bad: List[Tuple[str, int, str]] = dataclasses.field(default_factory=list)  # (file, line, reason)
    kinds: Dict[str, str] = dataclasses.field(default_factory=dict)  # the span's own feature columns
    # Distinct timestamps and their row counts. Bounded by the span's duration in seconds, not its rows.
    seconds: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    per_second: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def merge(self, other: "Survey") -> "Survey":
        self.rows += other.rows
        self.bad += other.bad
        self.listed_bad = heapq.nsmallest(LISTED_BAD_ROWS, self.listed_bad + other.listed_bad)
        for column, kind in other.kinds.items():
            self.kinds[column] = combine_kinds([self.kinds.get(column, ""), kind])
        self.seconds, self.per_second = _count_seconds(np.concatenate([self.seconds, other.seconds]),
                                                       np.concatenate([self.per_second, other.per_second]))
        return self


def _count_seconds(values: np.ndarray, weights: Optional[np.ndarray] = None):
    seconds, inverse = np.unique(values, return_inverse=True)
    counts = np.bincount(inverse, weights=weights, minlength=len(seconds)) if len(seconds) else np.zeros(0)
    return seconds, counts.astype(np.int64)


def survey_range(span_file: SpanFile, byte_range, position) -> Survey:
    survey = Survey()
    extra = [c for c in span_file.header.columns if c not in REQUIRED_COLUMNS]
    survey.kinds = {c: "categorical" if c in F.ITEM_LIST_FEATURES else "" for c in extra}
    for batch in read_batches(span_file, byte_range, position):
        survey.bad += len(batch.bad)
        room = LISTED_BAD_ROWS - len(survey.listed_bad)
        survey.listed_bad += [(span_file.header.path, line, reason) for line, reason in batch.bad[:max(0, room)]]
        if not len(batch):
            continue
        survey.rows += len(batch)
        for column in extra:
            if survey.kinds[column] != "categorical":
                survey.kinds[column] = combine_kinds([survey.kinds[column], kind_of(batch.columns[column])])
        survey.merge(Survey(seconds=batch.timestamps, per_second=np.ones(len(batch), np.int64)))
    return survey


class _MergeSurveys(beam.CombineFn):
    def create_accumulator(self):
        return Survey()

    def add_input(self, accumulator, survey):
        return accumulator.merge(survey[1])

    def merge_accumulators(self, accumulators):
        merged = Survey()
        for a in accumulators:
            merged.merge(a)
        return merged

    def extract_output(self, accumulator):
        return accumulator


def budget_error(survey: Survey, budget: float) -> Optional[str]:
    """The error message when the bad rows exceed the budget, else None."""
    total = survey.rows + survey.bad
    allowed = int(math.floor(total * budget))
    if survey.bad <= allowed:
        return None
    shown = "\n".join(f"  {path}, line {line}: {reason}" for path, line, reason in survey.listed_bad[:SHOWN_BAD_ROWS])
    more = f"\n  ... and {survey.bad - SHOWN_BAD_ROWS} more" if survey.bad > SHOWN_BAD_ROWS else ""
    return (f"{survey.bad} malformed row(s) out of {total} exceed the bad-row budget "
            f"({budget:.2%} of the span = {allowed} row(s)):\n{shown}{more}")


def _checked(survey: Survey, budget: float, report_path: str) -> Survey:
    message = budget_error(survey, budget)
    if message:
        raise MalformedInputError(message)
    if survey.rows == 0:
        raise MalformedInputError("the span has no readable rows")
    tf.io.gfile.makedirs(os.path.dirname(report_path))
    with tf.io.gfile.GFile(report_path, "w") as f:
        json.dump({"rows": survey.rows, "bad_rows_count": survey.bad,
                   "bad_rows": [{"file": p, "line": n, "reason": r} for p, n, r in survey.listed_bad]}, f)
    return survey


# --- the exact eval cut ---

@dataclasses.dataclass(frozen=True)
class Cut:
    """The eval split: every row newer than `second`, and the last `ties_in_eval` rows at `second`
    in (file, range, line) order. `second` None: no eval rows."""

    second: Optional[int]
    ties_in_eval: int = 0


def eval_rows(rows: int, eval_fraction: float, max_eval_rows: int) -> int:
    """The newest eval_fraction of the span, at most max_eval_rows: enough to rank candidates
    (the AUC's standard error at 50k rows is ~0.003) without evaluation growing with the span."""
    return 0 if rows < 2 else min(max_eval_rows, max(1, int(round(rows * eval_fraction))))


def eval_cut(survey: Survey, eval_fraction: float, max_eval_rows: int) -> Cut:
    wanted = eval_rows(survey.rows, eval_fraction, max_eval_rows)
    if wanted == 0:
        return Cut(None)
    newer = 0
    for second, count in zip(survey.seconds[::-1], survey.per_second[::-1]):
        if newer + count >= wanted:
            return Cut(int(second), int(wanted - newer))
        newer += int(count)
    raise AssertionError("fewer rows per second than surveyed")


def ties_in_range(keyed_survey, cut: Cut) -> Tuple[Tuple[int, int], int]:
    """((file, range), how many of the range's rows fall in the cut's second)."""
    key, survey = keyed_survey
    at = np.searchsorted(survey.seconds, cut.second) if cut.second is not None else len(survey.seconds)
    found = at < len(survey.seconds) and survey.seconds[at] == cut.second
    return key, int(survey.per_second[at]) if found else 0


def train_ties(ties: Dict[Tuple[int, int], int], key: Tuple[int, int], cut: Cut) -> int:
    """How many of this range's rows at the cut second stay in train (the later ranges' ties go to eval first)."""
    later = sum(n for k, n in ties.items() if k > key)
    own = ties.get(key, 0)
    return own - min(own, max(0, cut.ties_in_eval - later))


# --- pass 3: encode and write ---

# Columns use the types tfx-bsl decodes tf.Examples into (large lists, large binaries), so Transform's
# Parquet reader and TFDV see the same schema whichever way a batch was made.

def _single(values: pa.Array, kind: pa.DataType) -> pa.Array:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, values.cast(kind))


def _categorical(values: pa.Array) -> pa.Array:
    """`A|B` strings as lists of their stripped, non-empty parts."""
    parts = pc.split_pattern(values, F.MULTI_VALUE_SEPARATOR)
    flat = pc.utf8_trim_whitespace(parts.flatten())
    keep = pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(parts).to_numpy()
    counts = np.bincount(parents[keep], minlength=len(values))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return pa.LargeListArray.from_arrays(offsets, flat.filter(pa.array(keep)).cast(pa.large_binary()))


def _numeric(values: pa.Array) -> pa.Array:
    """Numbers as one-element float lists (float32 of the float64 value, as tf.train.FloatList stores
    Python floats); empty values as empty lists."""
    trimmed = pc.utf8_trim_whitespace(values)
    present = pc.greater(pc.utf8_length(trimmed), 0)
    try:
        numbers = pc.cast(trimmed.filter(present), pa.float64())
    except pa.ArrowInvalid:  # a number in Python's wider syntax
        numbers = pa.array([float(v) for v in trimmed.filter(present).to_pylist()], pa.float64())
    counts = present.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return pa.LargeListArray.from_arrays(offsets, numbers.cast(pa.float32()))


class _EncodeRange(beam.DoFn):
    """Pass 3: a range's rows joined, encoded and written to this range's own train and eval files."""

    def __init__(self, files: List[SpanFile], input_base: str, split_dirs: Dict[str, Dict[str, str]]):
        self._files = files
        self._input_base = input_base
        self._split_dirs = split_dirs

    def setup(self):
        from tfx_bsl.coders import example_coder

        self._tables = load_side_tables(self._input_base)
        self._encoder = example_coder.RecordBatchToExamplesEncoder()

    def process(self, element, positions, survey: Survey, cut: Cut, ties: Dict[Tuple[int, int], int]):
        file_index, byte_range = element
        key = (file_index, byte_range.index)
        kinds = dict(survey.kinds)
        for table in self._tables.values():
            for column, kind in table.kinds.items():
                kinds.setdefault(column, kind)  # the span's own columns win
        ties_to_train = train_ties(ties, key, cut)
        writers = _RangeFiles(self._split_dirs, file_index, byte_range.index)
        counts = {"train": 0, "eval": 0}
        try:
            for batch in read_batches(self._files[file_index], byte_range, positions[key]):
                if not len(batch):
                    continue
                table, is_eval = self._encode(batch, kinds, cut, ties_to_train)
                ties_to_train = max(0, ties_to_train - int((batch.timestamps == cut.second).sum()))
                for split, rows in (("train", ~is_eval), ("eval", is_eval)):
                    if rows.any():
                        part = table.filter(pa.array(rows))
                        writers.write(split, part, self._encoder.encode(part))
                        counts[split] += part.num_rows
                        # TFDV's statistics of the same Arrow batches, in the same pass (no second read).
                        yield beam.pvalue.TaggedOutput(split, part)
            writers.commit()
        finally:
            writers.close()
        yield counts

    def _encode(self, batch: RowBatch, kinds, cut: Cut, ties_to_train: int) -> Tuple[pa.RecordBatch, np.ndarray]:
        """The batch as an Arrow record batch of tf.Example features, and which of its rows are eval rows."""
        raw = dict(batch.columns)
        for key, table in self._tables.items():
            for column, values in table.lookup(pc.utf8_trim_whitespace(raw[key])).items():
                raw.setdefault(column, values)
        seconds = batch.timestamps
        arrays = [_single(pc.utf8_trim_whitespace(raw[F.USER_ID]), pa.large_binary()),
                  _single(pc.utf8_trim_whitespace(raw[F.ITEM_ID]), pa.large_binary()),
                  _single(pa.array(seconds), pa.int64()), _single(pa.array(batch.labels), pa.int64())]
        names = [F.USER_ID, F.ITEM_ID, F.TIMESTAMP, F.LABEL]
        for column in sorted(kinds):
            # A column of another file of the span, or of a side table without this key: empty here.
            values = raw.get(column, pa.array([""] * len(batch), pa.string()))
            arrays.append(_numeric(values) if kinds[column] == "numeric" else _categorical(values))
            names.append(column)
        is_eval = np.zeros(len(batch), bool)
        if cut.second is not None:
            # Rows newer than the cut second, and the cut second's rows beyond those that stay in train.
            tie = seconds == cut.second
            is_eval = (seconds > cut.second) | (tie & (np.cumsum(tie) > ties_to_train))
        return pa.RecordBatch.from_arrays(arrays, names), is_eval


class _RangeFiles:
    """A range's rows per split, as gzipped TFRecord tf.Examples and as the same columns in Parquet.

    Each file is written under a temporary name and renamed into place only
    when the range is complete, so a retried or killed worker leaves no half file.
    """

    TFRECORD_OPTIONS = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=1)  # ~1.5x faster, ~same size

    def __init__(self, split_dirs: Dict[str, Dict[str, str]], file_index: int, range_index: int):
        stem = f"{file_index:04d}-{range_index:05d}"
        self._final = {}
        for split, directory in split_dirs[EXAMPLES].items():
            self._final[(EXAMPLES, split)] = os.path.join(directory, f"{RECORD_PREFIX}-{stem}.gz")
        for split, directory in split_dirs[EXAMPLES_PARQUET].items():
            self._final[(EXAMPLES_PARQUET, split)] = os.path.join(directory, f"{PARQUET_PREFIX}-{stem}.parquet")
        self._tmp = {key: os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
                     for key, path in self._final.items()}
        self._open: Dict[Tuple[str, str], object] = {}

    def write(self, split: str, part: pa.RecordBatch, records: List[bytes]) -> None:
        tfrecord, parquet = (EXAMPLES, split), (EXAMPLES_PARQUET, split)
        if tfrecord not in self._open:
            tf.io.gfile.makedirs(os.path.dirname(self._tmp[tfrecord]))
            tf.io.gfile.makedirs(os.path.dirname(self._tmp[parquet]))
            self._open[tfrecord] = tf.io.TFRecordWriter(self._tmp[tfrecord], options=self.TFRECORD_OPTIONS)
            # Parquet is assembled in memory (one range, a few MB compressed): pyarrow cannot write into a GFile.
            buffer = pa.BufferOutputStream()
            self._open[parquet] = (buffer, pq.ParquetWriter(buffer, part.schema))
        for record in records:
            self._open[tfrecord].write(record)
        self._open[parquet][1].write_table(pa.Table.from_batches([part]))

    def _close_all(self) -> None:
        for key, handle in self._open.items():
            if key[0] == EXAMPLES_PARQUET:
                buffer, writer = handle
                writer.close()
                with tf.io.gfile.GFile(self._tmp[key], "wb") as f:
                    f.write(buffer.getvalue().to_pybytes())
            else:
                handle.close()

    def commit(self) -> None:
        self._close_all()
        for key in self._open:
            tf.io.gfile.rename(self._tmp[key], self._final[key], overwrite=True)
        self._open = {}

    def close(self) -> None:
        """Drops what a failed range wrote (after commit, nothing is left to drop)."""
        self._close_all()
        for key in self._open:
            tf.io.gfile.remove(self._tmp[key])
        self._open = {}


# --- the Beam pipeline ---

def _with_range(fn):
    """Calls fn(span_file, byte_range, position, *args) for a (file index, range) element."""
    def call(element, files, positions, *args):
        file_index, byte_range = element
        return fn(files[file_index], byte_range, positions[(file_index, byte_range.index)], *args)
    return call


def build_span_pipeline(pipeline, files: List[SpanFile], ranges, input_base: str,
                        split_dirs: Dict[str, Dict[str, str]],
                        statistics_paths: Dict[str, str], eval_fraction: float, max_eval_rows: int, budget: float,
                        report_path: str):
    """The passes; returns the PCollection of per-range {"train": n, "eval": n} counts."""
    import tensorflow_data_validation as tfdv

    elements = (pipeline
                | "Ranges" >> beam.Create(ranges)
                | "Spread" >> beam.Reshuffle())  # fan the ranges out over workers on distributed runners
    counts = (elements
              | "Count" >> beam.Map(lambda e: ((e[0], e[1].index), csv_reader.count_range(e[1])))
              | "AllCounts" >> beam.combiners.ToDict())
    positions = beam.pvalue.AsSingleton(counts | "Positions" >> beam.Map(_positions))
    range_surveys = elements | "Survey" >> beam.Map(
        lambda e, files, positions: ((e[0], e[1].index), _with_range(survey_range)(e, files, positions)),
        files, positions)
    survey = (range_surveys
              | "MergeSurveys" >> beam.CombineGlobally(_MergeSurveys())
              | "CheckBudget" >> beam.Map(_checked, budget, report_path))
    cut = beam.pvalue.AsSingleton(survey | "EvalCut" >> beam.Map(eval_cut, eval_fraction, max_eval_rows))
    ties = (range_surveys
            | "TiesAtCut" >> beam.Map(ties_in_range, cut)
            | "AllTies" >> beam.combiners.ToDict())
    encoded = (elements
               | "Encode" >> beam.ParDo(_EncodeRange(files, input_base, split_dirs), positions,
                                        beam.pvalue.AsSingleton(survey), cut, beam.pvalue.AsSingleton(ties))
               .with_outputs(*statistics_paths, main="counts"))
    for split, path in statistics_paths.items():
        _ = (encoded[split]
             | f"Statistics[{split}]" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
             | f"WriteStatistics[{split}]" >> beam.Map(_write_statistics, path))
    return encoded.counts


def _positions(counts: Dict[Tuple[int, int], Tuple[int, int]]) -> Dict[Tuple[int, int], csv_reader.RangePosition]:
    out = {}
    for file_index in sorted({f for f, _ in counts}):
        indices = sorted(r for f, r in counts if f == file_index)
        for index, position in zip(indices, csv_reader.positions([counts[(file_index, r)] for r in indices])):
            out[(file_index, index)] = position
    return out


def newest_span(data_dir: str) -> int:
    spans = [int(name.rstrip("/")[5:]) for name in tf.io.gfile.listdir(data_dir)
             if name.startswith("span-") and name.rstrip("/")[5:].isdigit()] if tf.io.gfile.isdir(data_dir) else []
    if not spans:
        raise MalformedInputError(f"no span-<N> directory in {data_dir}")
    return max(spans)


class Executor(base_beam_executor.BaseBeamExecutor):
    """Beam executor behind SpanExampleGen."""

    def Do(self, input_dict, output_dict, exec_properties):
        self._log_startup(input_dict, output_dict, exec_properties)
        examples = artifact_utils.get_single_instance(output_dict[EXAMPLES])
        parquet = artifact_utils.get_single_instance(output_dict[EXAMPLES_PARQUET])
        statistics = artifact_utils.get_single_instance(output_dict[STATISTICS])
        data_dir = exec_properties[DATA_DIR]
        span = exec_properties.get(SPAN)
        span = newest_span(data_dir) if span is None else int(span)
        files, ranges = span_files(os.path.join(data_dir, f"span-{span}", "*.csv"),
                                   int(exec_properties.get(RANGE_BYTES) or csv_reader.DEFAULT_RANGE_BYTES))
        load_side_tables(data_dir)  # a broken side table fails here, before any Beam work

        splits = ["train", "eval"]
        for artifact in (examples, parquet, statistics):
            artifact.split_names = artifact_utils.encode_split_names(splits)
            artifact.span = span
            artifact.set_int_custom_property("span", span)
        split_dirs = {key: {s: artifact_utils.get_split_uri([artifact], s) for s in splits}
                      for key, artifact in ((EXAMPLES, examples), (EXAMPLES_PARQUET, parquet))}
        statistics_paths = {s: os.path.join(artifact_utils.get_split_uri([statistics], s), STATISTICS_FILE)
                            for s in splits}
        report_path = os.path.join(examples.uri, BAD_ROWS_FILE)
        with self._make_beam_pipeline() as pipeline:
            counts = build_span_pipeline(pipeline, files, ranges, data_dir, split_dirs, statistics_paths,
                                         float(exec_properties[EVAL_FRACTION]), int(exec_properties[MAX_EVAL_ROWS]),
                                         float(exec_properties[BAD_ROW_BUDGET]), report_path)
            _ = (counts
                 | "SplitTotals" >> beam.CombineGlobally(_add_counts)
                 | "WriteTotals" >> beam.Map(_write_json, os.path.join(examples.uri, SPLIT_ROWS_FILE)))

        _write_json({"span": span}, os.path.join(examples.uri, SPAN_FILE))
        examples_utils.set_payload_format(examples, example_gen_pb2.FORMAT_TF_EXAMPLE)
        examples_utils.set_file_format(examples, "tfrecords_gzip")
        examples_utils.set_payload_format(parquet, example_gen_pb2.FORMAT_PARQUET)
        examples_utils.set_file_format(parquet, example_gen_pb2.FileFormat.Name(example_gen_pb2.FILE_FORMAT_PARQUET))
        with tf.io.gfile.GFile(report_path) as f:
            report = json.load(f)
        with tf.io.gfile.GFile(os.path.join(examples.uri, SPLIT_ROWS_FILE)) as f:
            split_rows = json.load(f)
        examples.set_int_custom_property("rows", report["rows"])
        examples.set_int_custom_property("bad_rows", report["bad_rows_count"])
        for split, n in split_rows.items():
            examples.set_int_custom_property(f"{split}_rows", n)


def _add_counts(counts) -> Dict[str, int]:
    total = {"train": 0, "eval": 0}
    for c in counts:
        for split, n in c.items():
            total[split] += n
    return total


def _write_statistics(statistics, path: str) -> None:
    """A DatasetFeatureStatisticsList where ExampleValidator and SchemaGen read it (tf.io.gfile, any file system)."""
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(statistics.SerializeToString())


def _write_json(value, path: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f)


DATA_DIR, SPAN, EVAL_FRACTION, MAX_EVAL_ROWS, BAD_ROW_BUDGET, RANGE_BYTES = (
    "data_dir", "span", "eval_fraction", "max_eval_rows", "bad_row_budget", "range_bytes")
EXAMPLES, EXAMPLES_PARQUET, STATISTICS = "examples", "examples_parquet", "statistics"
STATISTICS_FILE = "FeatureStats.pb"  # where StatisticsGen puts a split's statistics


class SpanExampleGenSpec(types.ComponentSpec):
    PARAMETERS = {
        DATA_DIR: component_spec.ExecutionParameter(type=str),
        SPAN: component_spec.ExecutionParameter(type=int, optional=True),  # absent: the newest span
        EVAL_FRACTION: component_spec.ExecutionParameter(type=float),
        MAX_EVAL_ROWS: component_spec.ExecutionParameter(type=int),
        BAD_ROW_BUDGET: component_spec.ExecutionParameter(type=float),
        RANGE_BYTES: component_spec.ExecutionParameter(type=int),
    }
    INPUTS = {}
    OUTPUTS = {
        EXAMPLES: component_spec.ChannelParameter(type=standard_artifacts.Examples),
        EXAMPLES_PARQUET: component_spec.ChannelParameter(type=standard_artifacts.Examples),
        STATISTICS: component_spec.ChannelParameter(type=standard_artifacts.ExampleStatistics),
    }


class SpanExampleGen(base_beam_component.BaseBeamComponent):
    """ExampleGen for one span directory `span-<N>/` of the data contract.

    Outputs, all from one pass over the span:
    - `examples`: gzipped TFRecord tf.Examples (Trainer, Evaluator, DeploymentGuard);
    - `examples_parquet`: the same rows as Parquet columns, which Transform's
      analysis reads ~5x faster than TFRecords (no per-record decoding in Python);
    - `statistics`: TFDV's GenerateStatistics over the same Arrow batches, so
      ExampleValidator and SchemaGen get what StatisticsGen would compute
      without another pass over the span.
    """

    SPEC_CLASS = SpanExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, data_dir: str, span: Optional[int], eval_fraction: float, bad_row_budget: float,
                 max_eval_rows: int = DEFAULT_MAX_EVAL_ROWS, range_bytes: int = csv_reader.DEFAULT_RANGE_BYTES):
        super().__init__(spec=SpanExampleGenSpec(
            data_dir=data_dir, span=span, eval_fraction=eval_fraction, max_eval_rows=max_eval_rows,
            bad_row_budget=bad_row_budget, range_bytes=range_bytes,
            examples=types.Channel(type=standard_artifacts.Examples),
            examples_parquet=types.Channel(type=standard_artifacts.Examples),
            statistics=types.Channel(type=standard_artifacts.ExampleStatistics)))
