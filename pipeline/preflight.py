"""Checks that need the file system, made before TensorFlow, Beam or TFX is imported.

Every command runs these before it acts, so a typo, a missing span or a
column that does not fit the deployment's schema is refused in well under a
second with one line naming the flag, file, line or column, instead of after
the 15-30 s it takes TFX to start and reach the component that would fail.
What a config value must be is checked by the config object itself
(pipeline/config.py); this module checks what the values point at:

- the work directory: present (commands that only read a deployment), or a
  directory that can be created (run, backfill);
- the data directory and its spans: every span asked for exists and holds
  CSV files whose headers have the required columns and, once the
  deployment has a curated schema (`WORK/schema/schema.pbtxt`), exactly the
  schema's columns together with the side tables' (`items.csv`, `users.csv`);
  without a schema yet, every span of the run has the first one's columns;
- the side tables: readable, their key present, non-empty and unique;
- paths the run writes at its end (`--report`) and the MLMD sqlite file.

Local paths are read with plain file calls, CSVs with the pipeline's own
reader (components/csv_reader.py); URLs (gs://, ...) go through tf.io.gfile,
which costs TensorFlow's import.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pipeline import files
from pipeline.config import IncrecConfig, is_remote

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label")  # as components/example_gen (which loads TF)
SIDE_TABLES = {"items.csv": "item_id", "users.csv": "user_id"}  # as components/example_gen
NOT_FEATURES = ("user_id", "item_id", "timestamp", "label")
HEADER_PROBE_BYTES = 1 << 20
SIDE_TABLE_SCAN_BYTES = 64 << 20  # side tables up to this size are read whole (keys present and unique)
SHOWN_COLUMNS = 12


class UsageError(ValueError):
    """Input a user can fix (a flag, a config value, a file, a column): exit status 2, one line."""


# --- the file system, local or remote ---

def _gfile():
    import tensorflow as tf

    return tf.io.gfile


exists, isdir = files.exists, files.isdir


def _glob(pattern: str) -> List[str]:
    return sorted(_gfile().glob(pattern) if is_remote(pattern) else glob.glob(pattern))


def _listdir(path: str) -> List[str]:
    return [n.rstrip("/") for n in (_gfile().listdir(path) if is_remote(path) else os.listdir(path))]


def _read_bytes(path: str, limit: int) -> bytes:
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read(limit)
    with open(path, "rb") as f:
        return f.read(limit)


def _size(path: str) -> int:
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


# --- directories ---

def work_dir_present(work_dir: str) -> None:
    """For commands that read a deployment: the work directory must exist (nothing is created)."""
    if is_remote(work_dir):
        return  # a bucket's "directory" exists once something is in it; the command says what it misses
    if not os.path.exists(work_dir):
        raise UsageError(f"--work {work_dir}: no such directory (nothing is deployed there)")
    if not os.path.isdir(work_dir):
        raise UsageError(f"--work {work_dir}: not a directory")


def creatable_dir(path: str, flag: str) -> None:
    """A directory that exists and is writable, or can be made (its nearest existing parent is writable)."""
    if is_remote(path):
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: cannot be created ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot be created ({parent} is not writable)")


def writable_file(path: str, flag: str) -> None:
    """A file the command writes at its end (the backfill report): checked now, not after hours of runs."""
    if is_remote(path):
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")
    creatable_dir(os.path.dirname(os.path.abspath(path)), flag)


def data_dir_present(data_dir: str, flag: str = "--data") -> None:
    if not exists(data_dir):
        raise UsageError(f"{flag} {data_dir}: no such directory")
    if not isdir(data_dir):
        raise UsageError(f"{flag} {data_dir}: not a directory")


def metadata_local(config: IncrecConfig) -> None:
    """The local runner keeps ML Metadata in a sqlite file, which must be on a local disk."""
    if is_remote(config.metadata_path):
        if config.metadata:
            raise UsageError(f"metadata must be a local file path (ML Metadata is a sqlite file), "
                             f"got {config.metadata}")
        raise UsageError(f"--work {config.work_dir} is not on a local disk, so ML Metadata (a sqlite file) needs a "
                         f"local path: set \"metadata\" in --config (or increc config --set metadata=PATH)")
    if config.metadata:
        if isdir(config.metadata_path):
            raise UsageError(f"metadata {config.metadata}: is a directory (give the sqlite file's path)")
        creatable_dir(os.path.dirname(config.metadata_path), "metadata")


# --- CSV headers ---

def read_header(path: str, required: Sequence[str] = ()) -> Tuple[List[str], bool]:
    """(columns, whether a data row follows) of a CSV file, read by the pipeline's own reader; UsageError
    naming the file and line."""
    from components import csv_reader

    try:
        header = csv_reader.read_header(path, required)
        first = csv_reader.ByteRange(path, 0, header.data_start,
                                     min(_size(path), header.data_start + HEADER_PROBE_BYTES))
        has_rows = next(csv_reader.read_range(header, first), None) is not None
    except csv_reader.CsvError as e:
        raise UsageError(str(e)) from None
    return header.columns, has_rows


# --- side tables ---

def side_tables(data_dir: str) -> Dict[str, List[str]]:
    """{file name: its columns} of the side tables in data_dir, each checked as SpanExampleGen will."""
    out = {}
    for name, key in SIDE_TABLES.items():
        path = os.path.join(data_dir, name)
        if not exists(path):
            continue
        columns, _ = read_header(path, (key,))
        if not is_remote(path) and _size(path) <= SIDE_TABLE_SCAN_BYTES:
            _check_side_rows(path, columns, key)
        out[name] = columns
    return out


def _check_side_rows(path: str, columns: List[str], key: str) -> None:
    """Every record of a (local) side table: the header's width, a key, and no key twice."""
    from components import csv_reader

    at, first_line = columns.index(key), {}
    try:
        _, records = csv_reader.read_file(path, (key,))
        for line, fields, reason in records:
            if fields is None:
                raise UsageError(f"{path}, line {line}: {reason}")
            value = fields[at].strip()
            if not value:
                raise UsageError(f"{path}, line {line}, column {key}: empty {key}")
            if value in first_line:
                raise UsageError(f"{path}, line {line}, column {key}: duplicate {key} {value!r} "
                                 f"(first on line {first_line[value]})")
            first_line[value] = line
    except csv_reader.CsvError as e:
        raise UsageError(str(e)) from None


# --- the curated schema ---

def schema_columns(schema_path: str) -> Optional[List[str]]:
    """The feature names of the deployment's curated schema, or None before the first span made one."""
    if not exists(schema_path):
        return None
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    try:
        text = _read_bytes(schema_path, 64 << 20).decode("utf-8")
        schema = text_format.Parse(text, schema_pb2.Schema())
    except (UnicodeDecodeError, text_format.ParseError) as e:
        raise UsageError(f"{schema_path}: not a readable schema, the data contract the first span set "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return [feature.name for feature in schema.feature]


# --- spans ---

def span_numbers(data_dir: str) -> List[int]:
    names = _listdir(data_dir) if isdir(data_dir) else []
    return sorted(int(n[5:]) for n in names if n.startswith("span-") and n[5:].isdigit()
                  and isdir(os.path.join(data_dir, n)))


def _ranges(numbers: List[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out) or "none"


def _listed(columns: Iterable[str]) -> str:
    columns = list(columns)
    shown = ", ".join(columns[:SHOWN_COLUMNS])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > SHOWN_COLUMNS else "")


def check_spans(config: IncrecConfig, spans: Sequence[int], data_flag: str = "--data") -> None:
    """The run's spans: present, CSV files with rows, headers that fit the schema (or the first span)."""
    data_dir_present(config.data_dir, data_flag)
    present = span_numbers(config.data_dir)
    missing = [s for s in spans if s not in present]
    if missing:
        what = f"span {missing[0]}" if len(missing) == 1 else f"spans {_ranges(missing)}"
        raise UsageError(f"{data_flag} {config.data_dir}: no {what} (span-<N>/ directories there: "
                         f"{_ranges(present)})")
    tables = side_tables(config.data_dir)
    side = {column for name, columns in tables.items() for column in columns if column != SIDE_TABLES[name]}
    schema = schema_columns(config.schema_path)
    expected, source = (set(schema), f"the schema ({config.schema_path})") if schema is not None else (None, "")
    for span in spans:
        files = _glob(os.path.join(config.data_dir, f"span-{span}", "*.csv"))
        if not files:
            raise UsageError(f"{os.path.join(config.data_dir, f'span-{span}')}: no *.csv files in span {span}")
        rows = False
        for path in files:
            columns, has_rows = read_header(path, REQUIRED_COLUMNS)
            rows = rows or has_rows
            if expected is None:  # no schema yet: the first span of this run sets it
                expected, source = set(columns) | side, f"span {span}'s columns ({os.path.basename(path)})"
                continue
            _fits(path, columns, side, expected, source)
        if not rows:
            raise UsageError(f"{os.path.join(config.data_dir, f'span-{span}')}: span {span} has no rows "
                             f"(its CSV files hold only a header)")
    if expected is not None:
        _side_tables_fit(config.data_dir, tables, expected, source)
        _ignored_features_known(config, expected)


def _fits(path: str, columns: List[str], side: set, expected: set, source: str) -> None:
    """A span file's columns, with the side tables', are exactly the expected ones."""
    extra = [c for c in columns if c not in expected]
    if extra:
        raise UsageError(f"{path}, line 1: column {extra[0]!r} is not in {source}: {_listed(sorted(expected))}")
    absent = sorted(expected - set(columns) - side)
    if absent:
        raise UsageError(f"{path}, line 1: no column {absent[0]!r}, which {source} has "
                         f"(not in {' or '.join(SIDE_TABLES)} either)")


def _side_tables_fit(data_dir: str, tables: Dict[str, List[str]], expected: set, source: str) -> None:
    for name, columns in tables.items():
        extra = [c for c in columns if c not in expected]
        if extra:
            raise UsageError(f"{os.path.join(data_dir, name)}, line 1: column {extra[0]!r} is not in {source}")


def _ignored_features_known(config: IncrecConfig, expected: set) -> None:
    features = sorted(c for c in expected if c not in NOT_FEATURES)
    for name in config.ignored_features:
        if name not in features:
            raise UsageError(f"ignored_features names {name!r}, which is not a side feature of the data "
                             f"(features: {_listed(features)})")


# --- increc prepare ---

def check_prepare(args) -> None:
    """prepare's flags and, for the generic CSV, the input's header: what can be told before Beam starts.

    components/ingest.py makes the same checks (and reads every row); these
    only answer sooner, before TensorFlow and Beam are imported.
    """
    import math

    from components.timestamps import Timestamps

    if args.format == "synthetic":
        if args.input:
            raise UsageError("--format synthetic generates its log; it takes no --input")
        for flag in ("rows", "users", "items"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
        if not (math.isfinite(args.days) and args.days > 0):
            raise UsageError(f"--days must be a positive number, got {args.days}")
        if args.start is not None:
            problem = Timestamps(args.allow_old_timestamps).span_problem(
                "--start", args.start, args.start + int(round(args.days * 86400)))
            if problem:
                raise UsageError(problem)
    elif not args.input:
        raise UsageError(f"--format {args.format} needs --input")
    if args.spans is not None and args.spans < 1:
        raise UsageError(f"--spans must be at least 1, got {args.spans}")
    if args.label_threshold is not None and not math.isfinite(args.label_threshold):
        raise UsageError(f"--label-threshold must be a finite number, got {args.label_threshold}")
    if exists(args.out) and not isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if args.format == "synthetic" or is_remote(args.input):
        return
    if not os.path.exists(args.input):
        raise UsageError(f"--input {args.input}: no such file or directory")
    if args.format == "csv":
        path = os.path.join(args.input, "interactions.csv") if os.path.isdir(args.input) else args.input
        if not os.path.exists(path):
            raise UsageError(f"{args.input}: no interactions.csv in this directory")
        columns, _ = read_header(path, ("user_id", "item_id", "timestamp"))
        if "label" not in columns and "rating" not in columns:
            raise UsageError(f"{path}, line 1: needs a 'label' (0/1) or a 'rating' column")
        if "label" in columns and args.label_threshold is not None:
            raise UsageError(f"{path}, line 1: has a 'label' column already; --label-threshold turns ratings "
                             f"into labels, so leave it out")
        if "label" not in columns and args.label_threshold is None:
            raise UsageError(f"{path}: has ratings but no labels; pass --label-threshold")


# --- the model's shape on an incremental run ---

# Settings that shape the model's weights: an incremental run copies every weight of the serving model, which
# was trained with the deployment's saved values, so a different one cannot warm-start (or, for oov_buckets,
# would shift every id's embedding row).
MODEL_SHAPE = ("embedding_dim", "side_embedding_dim", "oov_buckets", "deep_layers", "side_features",
               "ignored_features")


def model_shape_unchanged(config: IncrecConfig, saved: Dict[str, object]) -> None:
    """An incremental run of a deployment that has trained keeps the saved model-shape settings."""
    from pipeline.config import defaults

    if config.mode != "incremental" or not exists(config.schema_path):
        return
    base = defaults()
    for key in MODEL_SHAPE:
        was = saved.get(key, base[key])
        now = getattr(config, key)
        if now != was:
            raise UsageError(f"{key} {now} differs from the deployment's {was}, which the serving model was trained "
                             f"with; an incremental run warm-starts from it, so pass --mode full to retrain with "
                             f"{key} {now} (or leave {key} as it is)")
