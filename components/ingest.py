"""`increc prepare`: turns a raw interaction log into time-ordered spans (DESIGN.md, "Spans on disk").

Adapters read MovieLens (latest CSV, 100K, 1M), MovieTweetings, the generic
CSV contract and the synthetic generator into batches of interactions (numpy
columns), plus optional item and user side tables. A Beam pipeline then adds
the history features (components/history.py), orders the rows by (timestamp,
source order) and writes them as part files, `DATA/span-<N>/interactions-<k>.csv`
with k = 00000, 00001, ... in time order, every part with its header.

Streaming: the generic CSV is read as byte ranges inside Beam, the synthetic
log is generated chunk by chunk inside Beam; the small public data sets are
read in memory and handed to Beam in batches. Rows are grouped by time into
parts (about PART_ROWS rows), so no element holds a span. On the DirectRunner
a log whose order is known up front (synthetic, in-memory data sets) runs as
several pipelines of about ROWS_PER_RUN rows each, the history state carried
from one to the next, so memory does not grow with the log.

`append` adds a raw batch as the next span(s) after the last one, starting
from the newest history snapshot; earlier spans are never touched. Whatever
goes wrong, DATA is left as it was: everything is written to a staging
directory inside DATA and moved into place only once the whole input checked
out.

Malformed input is never dropped silently: it raises `IngestError` naming the
file, the 1-based line and, where there is one, the column.

Timestamps are seconds since 1970-01-01 UTC from 1990 to 2100
(components/timestamps.py). A log in milliseconds, microseconds or
nanoseconds is recognised from its first value and divided down to seconds,
with a note; a value in another unit, a negative one, one before 1990 (unless
`allow_old_timestamps`) or one past 2100 is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf

from components import csv_reader, synthetic
from components import history as H
from components.history import HISTORY_COLUMNS
from components.timestamps import UNITS, Timestamps

FORMATS = ("csv", "movielens", "movielens-100k", "movielens-1m", "movietweetings", "synthetic")
DEFAULT_THRESHOLDS = {"movielens": 4.0, "movielens-100k": 4.0, "movielens-1m": 4.0, "movietweetings": 8.0,
                      "synthetic": 4.0}
DEFAULT_SPANS = 10  # when neither spans nor span_by is given (the CLI's documented default)
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "label"]
ITEM_COLUMNS = ["item_id", "genres", "year"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation"]
NO_GENRES = "(no genres listed)"
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
INTEGER = re.compile(r"[+-]?\d+")
SPAN_SECONDS = {"day": 86400, "hour": 3600}
MANIFEST = "manifest.json"
SIDE_TABLES = ("items.csv", "users.csv")
LEGACY_HISTORY_FILE = "history_state.json"  # what earlier versions kept instead of DATA/history/
STAGING_PREFIX = ".staging-"

BATCH_ROWS = 65_536  # rows per Beam element: large enough for numpy, small enough to move around
PART_ROWS = 262_144  # rows per part file (rows sharing a second always share a part)
ROWS_PER_RUN = 4 * PART_ROWS  # DirectRunner: rows per pipeline run for sources whose order is known up front
SHOWN_BAD_ROWS = 5  # bad rows an error names (the count is always exact)

# u.item's 19 genre flag columns, in file order. "unknown" is the flag for "no genre".
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]

# MovieLens 1M stores occupations as codes; names keep them categorical (a
# numeric column would be read as a number by the pipeline) and match 100K's.
ML1M_OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]


class IngestError(ValueError):
    """Raw input that cannot be turned into spans; the message names file, line and column."""


@dataclasses.dataclass
class Table:
    columns: List[str]
    rows: List[List[str]]


@dataclasses.dataclass
class RawLog:
    interactions: Table  # user_id, item_id, timestamp, label, then extra feature columns
    items: Optional[Table] = None
    users: Optional[Table] = None
    # Per interaction, the rating when the source has one (else the label): what history features average.
    outcomes: Optional[List[float]] = None
    path: str = ""  # the interactions file, and the line of every interaction in it (for errors found later)
    lines: Optional[List[int]] = None


# --- reading ---

def _read_text(path: str, encoding: str) -> str:
    try:
        with open(path, encoding=encoding, newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not valid {encoding} text ({e})") from None


def _read_separated(path: str, separator: str, fields: Sequence[int],
                    encoding: str = "utf-8") -> List[Tuple[int, List[str]]]:
    """(line number, fields) of a headerless file with a plain separator (`::`, tab, `|`).

    Splits on "\\n" only: str.splitlines() would also break at characters such
    as U+0085, which latin-1 titles can contain, and shift every line number.
    """
    out = []
    for number, line in enumerate(_read_text(path, encoding).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # blank lines (the file's last newline included) are not rows
        parts = line.split(separator)
        if len(parts) not in fields:
            expected = " or ".join(str(f) for f in fields)
            raise IngestError(f"{path}, line {number}: expected {expected} fields separated by {separator!r}, "
                              f"found {len(parts)}")
        out.append((number, parts))
    return out


def _read_csv(path: str, required: Sequence[str]) -> Tuple[List[str], Iterator[Tuple[int, Dict[str, str]]]]:
    """Header and (line, row) of a CSV file through the shared reader; any bad record raises IngestError."""
    try:
        header, records = csv_reader.read_file(path, required)
    except csv_reader.CsvError as e:
        raise IngestError(str(e)) from None

    def rows() -> Iterator[Tuple[int, Dict[str, str]]]:
        try:
            for line, fields, reason in records:
                if fields is None:
                    raise IngestError(f"{path}, line {line}: {reason}")
                yield line, dict(zip(header.columns, fields))
        except csv_reader.CsvError as e:
            raise IngestError(str(e)) from None

    return header.columns, rows()


# --- checking values ---

def _id(value: str, column: str, path: str, line: int) -> str:
    # Ids stay strings (MovieTweetings' "0104257" keeps its zero); only surrounding
    # blanks go, as the pipeline's ExampleGen strips them too.
    value = value.strip()
    if not value:
        raise IngestError(f"{path}, line {line}, column {column}: empty {column}")
    return value


def _timestamp(value: str, path: str, line: int) -> str:
    if not INTEGER.fullmatch(value.strip()):
        raise IngestError(f"{path}, line {line}, column timestamp: {value!r} is not an integer (Unix seconds)")
    return str(int(value))


def _rating(value: str, path: str, line: int) -> float:
    try:
        rating = float(value)
    except ValueError:
        rating = math.nan
    if not math.isfinite(rating):
        raise IngestError(f"{path}, line {line}, column rating: {value!r} is not a number")
    return rating


def _label_from_rating(value: str, threshold: float, path: str, line: int) -> str:
    return "1" if _rating(value, path, line) >= threshold else "0"


def _label(value: str, path: str, line: int) -> str:
    label = value.strip()
    if label not in ("0", "1"):
        raise IngestError(f"{path}, line {line}, column label: {value!r} is not 0 or 1")
    return label


def _interaction(path: str, line: int, user: str, item: str, timestamp: str, label: str) -> List[str]:
    return [_id(user, "user_id", path, line), _id(item, "item_id", path, line),
            _timestamp(timestamp, path, line), label]


def _side_table(path: str, columns: List[str], numbered_rows: Iterator[Tuple[int, List[str]]], key: str) -> Table:
    """A side table; the pipeline's join needs every key present and unique."""
    at, first_seen, rows = columns.index(key), {}, []
    for line, row in numbered_rows:
        row[at] = _id(row[at], key, path, line)
        if row[at] in first_seen:
            raise IngestError(f"{path}, line {line}, column {key}: duplicate {key} {row[at]!r} "
                              f"(first on line {first_seen[row[at]]})")
        first_seen[row[at]] = line
        rows.append(row)
    return Table(columns, rows)


def _title_year(title: str) -> str:
    match = YEAR_IN_TITLE.search(title)
    return match.group(1) if match else ""


def _locate(input_path: str, names: Sequence[str]) -> Tuple[str, str]:
    """(directory, ratings file) for an input that is either the data set's directory or its ratings file.

    Through tf.io.gfile, so a streamed input may live on gs:// or any file system TensorFlow reads.
    """
    if tf.io.gfile.isdir(input_path):
        for name in names:
            if _is_file(os.path.join(input_path, name)):
                return input_path, os.path.join(input_path, name)
        raise IngestError(f"{input_path}: no {' or '.join(names)} in this directory")
    if not tf.io.gfile.exists(input_path):
        raise IngestError(f"{input_path}: no such file or directory")
    return os.path.dirname(input_path) or ".", input_path


def _is_file(path: str) -> bool:
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


# --- adapters of the small public data sets (read in memory) ---

def read_movielens(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.csv"])
    _, records = _read_csv(path, ("userId", "movieId", "rating", "timestamp"))
    rows = list(records)
    interactions = [_interaction(path, line, r["userId"], r["movieId"], r["timestamp"],
                                 _label_from_rating(r["rating"], threshold, path, line)) for line, r in rows]
    items = None
    movies = os.path.join(directory, "movies.csv")
    if os.path.isfile(movies):
        _, movie_rows = _read_csv(movies, ("movieId", "title", "genres"))
        items = _side_table(movies, ITEM_COLUMNS, (
            (line, [r["movieId"], "" if r["genres"].strip() == NO_GENRES else r["genres"].strip(),
                    _title_year(r["title"])]) for line, r in movie_rows), "item_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items,
                  outcomes=[_rating(r["rating"], path, line) for line, r in rows],
                  path=path, lines=[line for line, _ in rows])


def read_movielens_100k(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["u.data"])
    records = _read_separated(path, "\t", [4])
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in records]
    outcomes = [_rating(p[2], path, line) for line, p in records]
    items = users = None
    item_path = os.path.join(directory, "u.item")
    if os.path.isfile(item_path):
        # id|title|release date|video release date|IMDb URL|19 genre flags
        rows = []
        for line, p in _read_separated(item_path, "|", [5 + len(ML100K_GENRES)], encoding="latin-1"):
            genres = [g for g, flag in zip(ML100K_GENRES, p[5:]) if flag.strip() == "1" and g != "unknown"]
            rows.append((line, [p[0], "|".join(genres), _title_year(p[1])]))
        items = _side_table(item_path, ITEM_COLUMNS, iter(rows), "item_id")
    user_path = os.path.join(directory, "u.user")
    if os.path.isfile(user_path):
        # id|age|gender|occupation|zip: the zip code is left out (identifying, not a taste).
        users = _side_table(user_path, USER_COLUMNS, (
            (line, [p[0], p[1].strip(), p[2].strip(), p[3].strip()])
            for line, p in _read_separated(user_path, "|", [5], encoding="latin-1")), "user_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users, outcomes=outcomes,
                  path=path, lines=[line for line, _ in records])


def read_movielens_1m(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.dat"])
    records = _read_separated(path, "::", [4], encoding="latin-1")
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in records]
    outcomes = [_rating(p[2], path, line) for line, p in records]
    items = users = None
    movies = os.path.join(directory, "movies.dat")
    if os.path.isfile(movies):
        items = _side_table(movies, ITEM_COLUMNS, (
            (line, [p[0], p[2].strip(), _title_year(p[1])])
            for line, p in _read_separated(movies, "::", [3], encoding="latin-1")), "item_id")
    user_path = os.path.join(directory, "users.dat")
    if os.path.isfile(user_path):
        # UserID::Gender::Age::Occupation::Zip; the zip code is left out.
        rows = []
        for line, p in _read_separated(user_path, "::", [5], encoding="latin-1"):
            code = p[3].strip()
            occupation = ML1M_OCCUPATIONS[int(code)] if code.isdigit() and int(code) < len(ML1M_OCCUPATIONS) \
                else code
            rows.append((line, [p[0], p[2].strip(), p[1].strip(), occupation]))
        users = _side_table(user_path, USER_COLUMNS, iter(rows), "user_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users, outcomes=outcomes,
                  path=path, lines=[line for line, _ in records])


def read_movietweetings(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.dat"])
    records = _read_separated(path, "::", [4])
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in records]
    outcomes = [_rating(p[2], path, line) for line, p in records]
    items = None
    # The snapshots call the file movies.dat; the project's README calls it items.dat.
    for name in ("movies.dat", "items.dat"):
        movies = os.path.join(directory, name)
        if os.path.isfile(movies):
            # A title without genres may also lack the third field.
            items = _side_table(movies, ITEM_COLUMNS, (
                (line, [p[0], p[2].strip() if len(p) > 2 else "", _title_year(p[1])])
                for line, p in _read_separated(movies, "::", [2, 3])), "item_id")
            break
    # users.dat only maps user ids to Twitter ids: nothing to learn from, so no users table.
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, outcomes=outcomes,
                  path=path, lines=[line for line, _ in records])


READERS = {"movielens": read_movielens, "movielens-100k": read_movielens_100k,
           "movielens-1m": read_movielens_1m, "movietweetings": read_movietweetings}


# --- writing CSV text ---

_NEEDS_QUOTES = re.compile(r'[",\r\n]')


def csv_field(value: str) -> str:
    """A field as the csv module's minimal quoting writes it."""
    return '"' + value.replace('"', '""') + '"' if _NEEDS_QUOTES.search(value) else value


_QUOTE_OR_NEWLINE = re.compile(r'["\r\n]')


def csv_line(fields: Sequence[str]) -> str:
    line = ",".join(fields)
    if line.count(",") == len(fields) - 1 and not _QUOTE_OR_NEWLINE.search(line):
        return line  # nothing to quote: the common case, without a look at each field
    return ",".join(csv_field(f) for f in fields)


def _write_text(path: str, chunks: Iterator[str]) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        for chunk in chunks:
            f.write(chunk)


def _table_text(table: Table) -> Iterator[str]:
    yield csv_line(table.columns) + "\n"
    for start in range(0, len(table.rows), BATCH_ROWS):
        yield "".join(csv_line(row) + "\n" for row in table.rows[start:start + BATCH_ROWS])


# --- sources: where the batches come from ---

@dataclasses.dataclass
class OrderedSource:
    """A source whose time order is known before Beam runs: rows by rank, cut points in time.

    `entry_ts`/`entry_rows`: consecutive groups of rows that must stay together
    (one per distinct second, or one per synthetic chunk), ascending in time.
    """

    entry_ts: np.ndarray
    entry_rows: np.ndarray
    make: Callable  # (pipeline, label, rank_lo, rank_hi, spread, scratch dir) -> PCollection of batches
    buckets_for: Callable  # (seconds) -> sorted distinct ts // seconds, for --span-by


def _memory_source(log: RawLog) -> OrderedSource:
    """The rows of an in-memory log, ordered by time (ties keep source order), handed to Beam in batches."""
    rows = log.interactions.rows
    timestamps = np.array([int(r[2]) for r in rows], dtype=np.int64)
    order = np.argsort(timestamps, kind="stable")  # stable: equal timestamps keep source order
    outcomes = np.asarray(log.outcomes if log.outcomes is not None else [float(r[3]) for r in rows], dtype=np.float64)
    sorted_ts = timestamps[order]
    seconds, counts = np.unique(sorted_ts, return_counts=True)

    def make(pipeline, label: str, lo: int, hi: int, spread: bool, scratch: str):
        # The batches go to files the workers read: a pipeline's graph is no place for data.
        paths = []
        for start in range(lo, hi, BATCH_ROWS):
            index = order[start:min(hi, start + BATCH_ROWS)]
            picked = [rows[i] for i in index]
            paths.append(os.path.join(scratch, f"batch-{start:012d}.pickle"))
            with tf.io.gfile.GFile(paths[-1], "wb") as f:
                f.write(pickle.dumps({
                    "pos": np.arange(start, start + len(index), dtype=np.int64),
                    "ts": sorted_ts[start:start + len(index)],
                    "user": np.array([r[0] for r in picked], dtype=object),
                    "item": np.array([r[1] for r in picked], dtype=object),
                    "outcome": outcomes[index], "label": np.array([r[3] == "1" for r in picked], dtype=np.int8),
                    "text": np.array([csv_line(r) for r in picked], dtype=object)}, pickle.HIGHEST_PROTOCOL))
        return (_spread(pipeline | f"{label}Files" >> beam.Create(paths, reshuffle=False), spread)
                | f"{label}Read" >> beam.Map(_read_batch))

    return OrderedSource(seconds, counts, make, lambda s: np.unique(seconds // s))


def _read_batch(path: str) -> Dict[str, np.ndarray]:
    with tf.io.gfile.GFile(path, "rb") as f:
        return pickle.loads(f.read())


def _synthetic_source(spec: synthetic.Spec) -> OrderedSource:
    """The synthetic log: Beam workers generate its chunks, each from (seed, chunk) alone."""
    w = synthetic.world(spec)
    first_rows = np.arange(spec.chunks, dtype=np.int64) * spec.chunk_rows

    def make(pipeline, label: str, lo: int, hi: int, spread: bool, scratch: str):
        chunks = [int(c) for c in np.flatnonzero((first_rows >= lo) & (first_rows < hi))]
        return (_spread(pipeline | f"{label}Chunks" >> beam.Create(chunks, reshuffle=False), spread)
                | f"{label}Generate" >> beam.Map(synthetic_batch, spec))

    def buckets_for(seconds: int) -> np.ndarray:
        return np.unique(np.concatenate([np.unique(w.timestamps(c) // seconds) for c in range(spec.chunks)]))

    rows = np.minimum(first_rows + spec.chunk_rows, spec.rows) - first_rows
    return OrderedSource(w.chunk_starts[:-1].copy(), rows, make, buckets_for)


def synthetic_batch(chunk: int, spec: synthetic.Spec) -> Dict[str, np.ndarray]:
    w = synthetic.world(spec)
    rows = w.chunk(chunk)
    users, items = w.user_ids[rows["user"]], w.item_ids[rows["item"]]
    text = [f"{u},{i},{t},{label}" for u, i, t, label in
            zip(users.tolist(), items.tolist(), rows["ts"].tolist(), rows["label"].tolist())]
    return {"pos": rows["pos"], "ts": rows["ts"], "user": users, "item": items, "outcome": rows["rating"],
            "label": rows["label"], "text": np.array(text, dtype=object)}


@dataclasses.dataclass
class CsvSpec:
    """How the generic adapter turns a CSV record into an interaction (checked in the driver)."""

    path: str
    header: csv_reader.Header
    threshold: Optional[float]
    extra: List[str]
    last_timestamp: Optional[int] = None  # an appended batch may not go back before this second
    last_where: str = ""  # where that second is (for the error message)
    timestamps: Timestamps = Timestamps()
    unit: int = 1  # the timestamp column's unit in seconds (1000: milliseconds), from its first value
    unit_line: Optional[int] = None  # the line of that first value


def _csv_spec(input_path: str, threshold: Optional[float], timestamps: Timestamps) -> CsvSpec:
    _, path = _locate(input_path, ["interactions.csv"])
    try:
        header = csv_reader.read_header(path, ("user_id", "item_id", "timestamp"))
    except csv_reader.CsvError as e:
        raise IngestError(str(e)) from None
    columns = header.columns
    if "label" not in columns and "rating" not in columns:
        raise IngestError(f"{path}, line 1: needs a 'label' (0/1) or a 'rating' column")
    if "label" in columns and threshold is not None:
        # The label column is what the pipeline learns from; a threshold would be recorded but never applied.
        raise IngestError(f"{path}, line 1: has a 'label' column already; --label-threshold turns ratings into "
                          f"labels, so leave it out")
    if "label" not in columns and threshold is None:
        raise IngestError(f"{path}: has ratings but no labels; pass --label-threshold")
    # The rating is left out of the features: it would give the label away.
    extra = [c for c in columns if c not in ("user_id", "item_id", "timestamp", "label", "rating")]
    spec = CsvSpec(path, header, threshold, extra, timestamps=timestamps)
    first = _first_timestamp(header)
    if first is not None:
        spec.unit_line, value = first
        spec.unit = timestamps.unit_of(value) or 1
    return spec


def _first_timestamp(header: csv_reader.Header) -> Optional[Tuple[int, int]]:
    """(line, value) of the first integer timestamp in a CSV: it sets the column's unit."""
    size = tf.io.gfile.stat(header.path).length
    probe = csv_reader.ByteRange(header.path, 0, header.data_start, min(size, header.data_start + (1 << 16)))
    at = header.columns.index("timestamp")
    try:
        for line, fields, _ in csv_reader.read_range(header, probe):
            if fields is not None and INTEGER.fullmatch(fields[at].strip()):
                return line, int(fields[at])
    except csv_reader.CsvError:
        pass  # the pipeline's pass names the bad line
    return None


def _seconds(timestamps: Timestamps, value: str, unit: int, unit_line: Optional[int], path: str, line: int) -> str:
    """A checked integer timestamp in the column's unit, as seconds; IngestError naming file, line and column."""
    problem = timestamps.problem(int(value), unit, unit_line)
    if problem:
        raise IngestError(f"{path}, line {line}, column timestamp: {problem}")
    return str(timestamps.seconds(int(value), unit))


def _convert_timestamps(log: RawLog, timestamps: Timestamps) -> int:
    """Checks an in-memory log's timestamps and turns them into seconds; returns the column's unit."""
    rows = log.interactions.rows
    if not rows:
        return 1
    line_of = (lambda i: log.lines[i]) if log.lines else (lambda i: i + 1)
    unit = timestamps.unit_of(int(rows[0][2])) or 1
    for i, row in enumerate(rows):
        row[2] = _seconds(timestamps, row[2], unit, line_of(0), log.path, line_of(i))
    return unit


def _spread(pcoll, spread: bool):
    """Fans a few work items (chunks, byte ranges) out over the workers of a distributed runner."""
    return pcoll | "Spread" >> beam.Reshuffle() if spread else pcoll


def _csv_batches(pipeline, spec: CsvSpec, range_bytes: int, spread: bool):
    """(batches, bad rows) of a generic CSV, read as byte ranges that workers parse independently."""
    ranges = _spread(pipeline | "Ranges" >> beam.Create(csv_reader.plan_ranges(spec.header, range_bytes),
                                                         reshuffle=False), spread)
    where = (ranges
             | "CountRange" >> beam.Map(_count_range)
             | "AllCounts" >> beam.combiners.ToList()
             | "Positions" >> beam.Map(_positions))
    parsed = ranges | "Parse" >> beam.ParDo(ParseRange(spec), beam.pvalue.AsSingleton(where)).with_outputs(
        "bad", main="batches")
    return parsed.batches, parsed.bad


def _count_range(byte_range: csv_reader.ByteRange) -> Tuple[int, Tuple[int, int]]:
    return byte_range.index, csv_reader.count_range(byte_range)


def _positions(counts: List[Tuple[int, Tuple[int, int]]]) -> List[csv_reader.RangePosition]:
    return csv_reader.positions([c for _, c in sorted(counts)])


def _parse_record(spec: CsvSpec, index: Dict[str, int], line: int, fields: List[str]) -> Tuple[list, float]:
    """(the output row, its outcome) of one record; raises IngestError naming file, line and column."""
    path = spec.path
    if "label" in index:
        label = _label(fields[index["label"]], path, line)
    else:
        label = _label_from_rating(fields[index["rating"]], spec.threshold, path, line)
    outcome = _rating(fields[index["rating"]], path, line) if "rating" in index else float(label)
    row = _interaction(path, line, fields[index["user_id"]], fields[index["item_id"]],
                       fields[index["timestamp"]], label)
    row[2] = _seconds(spec.timestamps, row[2], spec.unit, spec.unit_line, path, line)
    if spec.last_timestamp is not None and int(row[2]) < spec.last_timestamp:
        raise IngestError(f"{path}, line {line}, column timestamp: {row[2]} is earlier than {spec.last_timestamp}, "
                          f"the last timestamp already in {spec.last_where}; a batch may only add later rows")
    return row + [fields[index[c]] for c in spec.extra], outcome


class ParseRange(beam.DoFn):
    """Records of one byte range -> batches of rows; bad records go to the 'bad' output as (line, message)."""

    def __init__(self, spec: CsvSpec):
        self.spec = spec

    def process(self, byte_range, positions):
        spec = self.spec
        index = {c: i for i, c in enumerate(spec.header.columns)}
        rows: List[list] = []
        lines: List[int] = []
        outcomes: List[float] = []
        try:
            for line, fields, reason in csv_reader.read_range(spec.header, byte_range, positions[byte_range.index]):
                if fields is None:
                    yield beam.pvalue.TaggedOutput("bad", (line, f"{spec.path}, line {line}: {reason}"))
                    continue
                try:
                    row, outcome = _parse_record(spec, index, line, fields)
                except IngestError as e:
                    yield beam.pvalue.TaggedOutput("bad", (line, str(e)))
                    continue
                rows.append(row)
                lines.append(line)
                outcomes.append(outcome)
                if len(rows) >= BATCH_ROWS:
                    yield _rows_batch(rows, lines, outcomes)
                    rows, lines, outcomes = [], [], []
        except csv_reader.CsvError as e:  # undecodable bytes: the rest of this range cannot be read
            where = re.search(r"line (\d+)", str(e))
            yield beam.pvalue.TaggedOutput("bad", (int(where.group(1)) if where else 0, str(e)))
        if rows:
            yield _rows_batch(rows, lines, outcomes)


def _rows_batch(rows: List[list], lines: List[int], outcomes: List[float]) -> Dict[str, np.ndarray]:
    # The line is the source order: ties in time keep it, as a stable sort of the file would.
    return {"pos": np.array(lines, dtype=np.int64), "ts": np.array([int(r[2]) for r in rows], dtype=np.int64),
            "user": np.array([r[0] for r in rows], dtype=object), "item": np.array([r[1] for r in rows], dtype=object),
            "outcome": np.array(outcomes, dtype=np.float64),
            "label": np.array([r[3] == "1" for r in rows], dtype=np.int8),
            "text": np.array([csv_line(r) for r in rows], dtype=object)}


def _copy_side_table(source: str, key: str, destination: str) -> None:
    """Checks a side table of the generic contract (key present, unique) while copying it row by row."""
    columns, records = _read_csv(source, (key,))
    at, first_seen = columns.index(key), {}

    def text() -> Iterator[str]:
        yield csv_line(columns) + "\n"
        block = []
        for line, row in records:
            values = [row[c] for c in columns]
            values[at] = _id(values[at], key, source, line)
            if values[at] in first_seen:
                raise IngestError(f"{source}, line {line}, column {key}: duplicate {key} {values[at]!r} "
                                  f"(first on line {first_seen[values[at]]})")
            first_seen[values[at]] = line
            block.append(csv_line(values) + "\n")
            if len(block) >= BATCH_ROWS:
                yield "".join(block)
                block = []
        yield "".join(block)

    _write_text(destination, text())


# --- cutting spans and parts ---

@dataclasses.dataclass
class Plan:
    """Where every row goes: its part (by second) and its span (by rank, or by day/hour)."""

    first_span: int
    rows: int
    part_ts: np.ndarray  # part k holds the rows with part_ts[k] <= timestamp < part_ts[k + 1]
    part_rank: np.ndarray  # rows (of this ingest) before part k
    span_rank: Optional[np.ndarray] = None  # --spans: rank where each span starts
    span_seconds: Optional[int] = None  # --span-by: the span of a row is its day/hour among those with rows
    span_buckets: Optional[np.ndarray] = None
    error: str = ""

    def part_of(self, ts: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.part_ts, ts, side="right") - 1

    def span_of(self, rank: np.ndarray, ts: np.ndarray) -> np.ndarray:
        if self.span_seconds:
            return self.first_span + np.searchsorted(self.span_buckets, ts // self.span_seconds)
        return self.first_span + np.searchsorted(self.span_rank, rank, side="right") - 1


def make_plan(entry_ts: np.ndarray, entry_rows: np.ndarray, first_span: int, spans: Optional[int],
              span_by: Optional[str], part_rows: int, buckets: Optional[np.ndarray] = None) -> Plan:
    """Parts of about part_rows rows cut between entries (groups of rows that stay together), and the span cut.

    Equal-size spans follow numpy's array_split over the time-ordered rows;
    --span-by buckets by UTC day/hour, and only buckets with rows become spans.
    """
    rows = int(entry_rows.sum())
    before = (np.cumsum(entry_rows) - entry_rows).astype(np.int64)
    first = np.flatnonzero(np.diff(before // max(1, part_rows), prepend=-1))
    plan = Plan(first_span, rows, entry_ts[first].astype(np.int64), before[first])
    if not rows:
        plan.span_rank = np.zeros(0, np.int64)
        return plan
    if span_by is not None:
        plan.span_seconds = SPAN_SECONDS[span_by]
        plan.span_buckets = np.unique(entry_ts // plan.span_seconds) if buckets is None else buckets
    elif spans > rows:
        plan.error = f"cannot cut {rows} rows into {spans} spans (more spans than rows)"
    else:
        size, extra = divmod(rows, spans)
        plan.span_rank = np.array([s * size + min(s, extra) for s in range(spans)], dtype=np.int64)
    return plan


def _runs(plan: Plan, rows_per_run: Optional[int]) -> List[Tuple[int, int]]:
    """Consecutive part ranges [a, b) of about rows_per_run rows (one range when None)."""
    parts = len(plan.part_ts)
    if rows_per_run is None or not parts:
        return [(0, parts)]
    ranks = np.concatenate([plan.part_rank, [plan.rows]])
    runs, start = [], 0
    while start < parts:
        end = start + 1
        while end < parts and ranks[end + 1] - ranks[start] <= rows_per_run:
            end += 1
        runs.append((start, end))
        start = end
    return runs


# --- the pipeline ---

def _routed(columns: Dict[str, np.ndarray], plan: Plan, tag: str, names: Sequence[str]):
    """(part, (tag, the named columns of its rows)) for each part the rows fall into."""
    if plan.error:
        return
    part = plan.part_of(columns["ts"])
    order = np.argsort(part, kind="stable")
    starts = np.flatnonzero(np.diff(part[order], prepend=-1))
    for start, end in zip(starts, list(starts[1:]) + [len(order)]):
        rows = order[start:end]
        yield int(part[rows[0]]), (tag, {name: columns[name][rows] for name in names})


class WritePart(beam.DoFn):
    """One part's rows, sorted by (timestamp, source order), with their history features, to its span(s)."""

    def __init__(self, staging: str, header: List[str], with_history: bool, old: H.Globals):
        self.staging, self.header, self.with_history, self.old = staging, header, with_history, old

    def process(self, element, plan: Plan, table: H.TimestampTable):
        part, tagged = element
        groups: Dict[str, list] = {"rows": [], **{kind: [] for kind in H.KINDS}}
        for tag, columns in tagged:
            groups[tag].append(columns)
        rows = H.concat(groups["rows"])
        if not rows:
            return
        order = np.lexsort((rows["pos"], rows["ts"]))
        rows = {name: values[order] for name, values in rows.items()}
        text = rows["text"].tolist()
        if self.with_history:
            user, item = (_aligned(groups[kind], rows["pos"]) for kind in H.KINDS)
            seen, total = self.old.before(table, rows["ts"])
            columns = H.feature_columns(user["count"], user["sum"], item["count"], item["sum"], seen, total,
                                        user["recent"])
            columns[-1] = [csv_field(v) for v in columns[-1]]  # item ids: quoted where they need it
            lines = [",".join(fields) + "\n" for fields in zip(text, *columns)]
        else:
            lines = [t + "\n" for t in text]
        rank = plan.part_rank[part] + np.arange(len(text))
        span = plan.span_of(rank, rows["ts"])
        starts = np.flatnonzero(np.diff(span, prepend=-1))
        for start, end in zip(starts, list(starts[1:]) + [len(span)]):
            directory = os.path.join(self.staging, f"span-{span[start]}")
            tf.io.gfile.makedirs(directory)
            with tf.io.gfile.GFile(os.path.join(directory, f"part-{part:06d}.csv"), "w") as f:
                f.write(",".join(self.header) + "\n")
                f.write("".join(lines[start:end]))
            yield {"span": int(span[start]), "part": part, "rows": int(end - start),
                   "positives": int(rows["label"][start:end].sum()),
                   "min_timestamp": int(rows["ts"][start]), "max_timestamp": int(rows["ts"][end - 1])}


def _aligned(pieces, pos: np.ndarray) -> Dict[str, np.ndarray]:
    stats = H.concat(pieces)
    order = np.argsort(stats["pos"])
    at = order[np.searchsorted(stats["pos"], pos, sorter=order)]
    return {name: values[at] for name, values in stats.items() if name not in ("pos", "ts")}



def _write_json(value, path: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f)


class FirstBadFn(beam.CombineFn):
    """(how many bad rows, the first SHOWN_BAD_ROWS of them by line) of (line, message) pairs."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, accumulator, bad):
        count, first = accumulator
        return count + 1, sorted(first + [bad])[:SHOWN_BAD_ROWS]

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (sum(count for count, _ in accumulators),
                sorted(b for _, first in accumulators for b in first)[:SHOWN_BAD_ROWS])

    def extract_output(self, accumulator):
        return accumulator


def _report(_, parts, bad, plan: Plan):
    return {"parts": sorted(parts, key=lambda p: (p["span"], p["part"])), "bad_count": bad[0], "first_bad": bad[1],
            "plan_error": plan.error, "rows": plan.rows}


def _plan_of(table: H.TimestampTable, plan_args: dict) -> Plan:
    return make_plan(table.ts, table.count, **plan_args)


def _write_meta(table: H.TimestampTable, state_dir: str, old: H.Globals) -> None:
    H.write_meta(state_dir, old.advance(table))


def _run_pipeline(options, staging: str, run: int, header: List[str], with_history: bool, old: H.Globals,
                  previous: Optional[str], source: Callable, plan: Optional[Plan], plan_args: dict) -> dict:
    """One Beam pipeline: batches -> history features -> part files, the new history state and a report.

    `source(pipeline)` gives (batches, bad rows or None). Without a `plan`, the
    plan is made inside the pipeline from the per-second table.
    """
    state_dir = os.path.join(staging, f"state-{run}")
    report_path = os.path.join(staging, f"report-{run}.json")
    tf.io.gfile.makedirs(state_dir)
    with beam.Pipeline(options=options) as p:
        batches, bad = source(p)
        table = batches | "PerSecond" >> beam.CombineGlobally(H.TimestampTableFn())
        if plan is None:
            plan_pc = table | "Plan" >> beam.Map(_plan_of, plan_args)
        else:
            plan_pc = p | "Plan" >> beam.Create([plan])
        plan_side, table_side = beam.pvalue.AsSingleton(plan_pc), beam.pvalue.AsSingleton(table)
        by_part = [batches | "RowsByPart" >> beam.FlatMap(_routed, plan_side, "rows", ("pos", "ts", "text", "label"))]
        if with_history:
            for kind in H.KINDS:
                stats = batches | f"{kind.title()}Stats" >> H.RunningStats(kind, previous, state_dir, old, table)
                named = ("pos", "count", "sum", "recent") if kind == "user" else ("pos", "count", "sum")
                by_part.append(stats | f"{kind.title()}ByPart" >> beam.FlatMap(_routed, plan_side, kind, named))
            _ = table | "WriteMeta" >> beam.Map(_write_meta, state_dir, old)
        parts = (by_part
                 | "AllByPart" >> beam.Flatten()
                 | "GroupByPart" >> beam.GroupByKey()
                 | "WriteParts" >> beam.ParDo(WritePart(staging, header, with_history, old), plan_side, table_side))
        if bad is None:
            first_bad = p | "NoBadRows" >> beam.Create([(0, [])])
        else:
            first_bad = bad | "FirstBad" >> beam.CombineGlobally(FirstBadFn())
        _ = (p
             | "One" >> beam.Create([None])
             | "Report" >> beam.Map(_report, beam.pvalue.AsList(parts), beam.pvalue.AsSingleton(first_bad),
                                    plan_side)
             | "WriteReport" >> beam.Map(_write_json, report_path))
    with tf.io.gfile.GFile(report_path) as f:
        report = json.load(f)
    report["state"] = state_dir
    return report


def beam_options(beam_args: Sequence[str]):
    """Beam's PipelineOptions for `beam_args`, and whether they select the local DirectRunner (the default)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return options, "direct" in str(runner).lower()


# --- the data directory ---

def span_dirs(data_dir: str) -> List[int]:
    """Span numbers present under data_dir (`span-<N>/` directories), ascending."""
    if not tf.io.gfile.isdir(data_dir):
        return []
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(data_dir)]
    return sorted(int(n[5:]) for n in names
                  if n.startswith("span-") and n[5:].isdigit() and tf.io.gfile.isdir(os.path.join(data_dir, n)))


def span_files(data_dir: str, span: int) -> List[str]:
    """A span's part files in time order (file-name order)."""
    return sorted(tf.io.gfile.glob(os.path.join(data_dir, f"span-{span}", "*.csv")))


def read_manifest(data_dir: str) -> Optional[dict]:
    path = os.path.join(data_dir, MANIFEST)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


@dataclasses.dataclass
class _Existing:
    """What an ingest starts from: nothing (a fresh prepare), or the data directory it appends to."""

    append: bool
    manifest: Optional[dict]
    last_span: int
    snapshot: Optional[str]

    @property
    def last_timestamp(self) -> Optional[int]:
        spans = (self.manifest or {}).get("spans")
        return spans[-1]["max_timestamp"] if spans else None


def _existing(out_dir: str, append: bool, overwrite: bool, history: bool) -> _Existing:
    if tf.io.gfile.exists(out_dir) and not tf.io.gfile.isdir(out_dir):
        raise IngestError(f"{out_dir}: exists and is not a directory")
    spans = span_dirs(out_dir)
    if not append:
        if spans and not overwrite:
            raise IngestError(f"{out_dir} already holds spans {spans}; pass --overwrite to replace them")
        return _Existing(False, None, 0, None)
    manifest = read_manifest(out_dir)
    if not spans or manifest is None:
        raise IngestError(f"{out_dir}: no spans and {MANIFEST} to append to; prepare it without --append first")
    if bool(manifest.get("history_features")) != history:
        raise IngestError(f"{out_dir} was prepared {'with' if manifest.get('history_features') else 'without'} "
                          f"history features; append the same way")
    snapshot = None
    if history:
        found = H.snapshots(out_dir)
        if not found or found[-1][0] != spans[-1]:
            raise IngestError(f"{out_dir}: no history snapshot after span {spans[-1]}, the last span "
                              f"(expected {H.snapshot_path(out_dir, spans[-1])}); prepare it again without --append")
        snapshot = found[-1][1]
    return _Existing(True, manifest, spans[-1], snapshot)


def _replace(source: str, destination: str) -> None:
    if tf.io.gfile.exists(destination):
        tf.io.gfile.remove(destination)
    tf.io.gfile.rename(source, destination)


def _remove(path: str) -> None:
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


# --- prepare ---

def prepare(fmt: str, input_path: Optional[str], out_dir: str, spans: Optional[int] = None,
            span_by: Optional[str] = None, label_threshold: Optional[float] = None, overwrite: bool = False,
            history: bool = True, append: bool = False, synthetic_spec: Optional[synthetic.Spec] = None,
            beam_args: Sequence[str] = (), progress: Optional[Callable[[str], None]] = None,
            part_rows: int = PART_ROWS, rows_per_run: Optional[int] = ROWS_PER_RUN,
            range_bytes: int = csv_reader.DEFAULT_RANGE_BYTES, allow_old_timestamps: bool = False) -> dict:
    """Reads a raw log and writes spans, side tables, the history snapshot and manifest.json under out_dir.

    Returns the manifest. With `append`, the log becomes the next span(s) after
    the last one in out_dir. With `history`, every interaction also gets
    HISTORY_COLUMNS (components/history.py). `beam_args` are Beam pipeline
    options (the DirectRunner by default). Timestamps before 1990 are refused
    unless `allow_old_timestamps` (components/timestamps.py).
    """
    say = progress or (lambda message: None)
    if not str(out_dir).strip():
        raise IngestError("--out must be a non-empty path (the data directory to write spans into)")
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if spans is not None and span_by is not None:
        raise IngestError("give either --spans or --span-by, not both")
    if spans is None and span_by is None:
        spans = DEFAULT_SPANS
    if span_by is not None and span_by not in SPAN_SECONDS:
        raise IngestError(f"--span-by must be day or hour, got {span_by!r}")
    if spans is not None and spans < 1:
        raise IngestError(f"--spans must be at least 1, got {spans}")
    if label_threshold is not None and not math.isfinite(label_threshold):
        raise IngestError(f"--label-threshold must be a finite number, got {label_threshold}")
    timestamps = Timestamps(allow_old=allow_old_timestamps)
    existing = _existing(out_dir, append, overwrite, history)
    threshold = label_threshold if label_threshold is not None else DEFAULT_THRESHOLDS.get(fmt)
    threshold = None if threshold is None else float(threshold)
    earlier = (existing.manifest or {}).get("label_threshold")
    if earlier is not None and threshold is not None and earlier != threshold:
        raise IngestError(f"{out_dir} was prepared with --label-threshold {earlier:g}; this batch would use "
                          f"{threshold:g} (pass --label-threshold {earlier:g})")
    old = H.read_meta(existing.snapshot) if existing.snapshot else H.Globals()
    # An appended batch may not go back in time (without history features too: spans stay time-ordered).
    last = old.last_timestamp if existing.snapshot else existing.last_timestamp
    last_where = f"{out_dir} (span {existing.last_span})"

    # Read and check whatever can be checked before anything is written.
    ingest: Dict[str, object] = {"format": fmt, "source": input_path, "label_threshold": threshold}
    tables: Dict[str, Callable[[str], None]] = {}  # side table name -> writes it to a path
    csv_spec: Optional[CsvSpec] = None
    if fmt == "synthetic":
        spec = _synthetic_spec(synthetic_spec, threshold, last, last_where, timestamps)
        say(synthetic.describe(spec))
        source, extra = _synthetic_source(spec), []
        ingest.update(source="synthetic", synthetic=dataclasses.asdict(spec))
        for name in SIDE_TABLES:
            tables[name] = lambda path, name=name: synthetic.write_table(spec, name, path, opener=tf.io.gfile.GFile)
    elif fmt == "csv":
        csv_spec = _csv_spec(input_path, threshold, timestamps)
        csv_spec.last_timestamp, csv_spec.last_where = last, last_where
        if csv_spec.unit != 1:
            say(timestamps.note(csv_spec.path, csv_spec.unit))
            ingest["timestamp_unit"] = UNITS[csv_spec.unit]
        source, extra = None, csv_spec.extra
        directory = os.path.dirname(csv_spec.path) or "."
        for name, key in (("items.csv", "item_id"), ("users.csv", "user_id")):
            side = os.path.join(directory, name)
            if _is_file(side) and os.path.basename(csv_spec.path) != name:
                tables[name] = lambda path, side=side, key=key: _copy_side_table(side, key, path)
    else:
        say(f"reading {input_path}")
        log = READERS[fmt](input_path, threshold)
        if not log.interactions.rows:
            raise IngestError(f"{input_path}: no interactions")
        unit = _convert_timestamps(log, timestamps)
        if unit != 1:
            say(timestamps.note(log.path, unit))
            ingest["timestamp_unit"] = UNITS[unit]
        _check_not_late(log, last, last_where)
        source, extra = _memory_source(log), list(log.interactions.columns[len(INTERACTION_COLUMNS):])
        for name, table in (("items.csv", log.items), ("users.csv", log.users)):
            if table is not None:
                tables[name] = lambda path, table=table: _write_text(path, _table_text(table))
    columns = INTERACTION_COLUMNS + extra
    if history:
        clashing = [c for c in HISTORY_COLUMNS if c in columns]
        if clashing:
            raise IngestError(f"{input_path}: already has column(s) {', '.join(clashing)}; "
                              f"pass --no-history-features to keep them as they are")
        columns = columns + HISTORY_COLUMNS
    if existing.manifest is not None and existing.manifest.get("columns", columns) != columns:
        raise IngestError(f"{input_path}: its columns ({', '.join(columns)}) differ from those of the spans in "
                          f"{out_dir} ({', '.join(existing.manifest['columns'])})")
    options, direct = beam_options(beam_args)

    created = not tf.io.gfile.exists(out_dir)
    staging = os.path.join(out_dir, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    tf.io.gfile.makedirs(staging)
    try:
        for name, write in tables.items():
            write(os.path.join(staging, name))
        plan_args = {"first_span": existing.last_span + 1, "spans": spans, "span_by": span_by,
                     "part_rows": part_rows}
        if csv_spec is not None:
            say(f"reading {csv_spec.path} in byte ranges of {range_bytes:,} bytes")
            started = time.time()
            reports = [_run_pipeline(options, staging, 0, columns, history, old, existing.snapshot,
                                     lambda p: _csv_batches(p, csv_spec, range_bytes, not direct), None, plan_args)]
            _check_report(reports[0], csv_spec.path)
            say(f"{reports[0]['rows']:,} rows in {time.time() - started:.1f}s")
        else:
            reports = _run_ordered(source, options, direct, staging, columns, history, old, existing.snapshot,
                                   plan_args, rows_per_run if direct else None, say)
        manifest = _commit(out_dir, staging, reports, existing, history, tables, columns, ingest)
    except BaseException:
        _remove(out_dir if created else staging)
        raise
    return manifest


def _synthetic_spec(given: Optional[synthetic.Spec], threshold: float, last: Optional[int], where: str,
                    timestamps: Timestamps = Timestamps()):
    spec = dataclasses.replace(given or synthetic.Spec(), label_threshold=threshold)
    if spec.start is None:  # an appended log carries on where the data directory ends
        spec = dataclasses.replace(spec, start=last if last is not None else synthetic.DEFAULT_START)
    if not math.isfinite(spec.days):
        raise IngestError(f"--days must be a finite number of days, got {spec.days}")
    try:
        spec.check()
    except synthetic.SpecError as e:
        raise IngestError(str(e)) from None
    problem = timestamps.span_problem("--start", spec.start, spec.start + spec.duration)
    if problem:
        raise IngestError(problem)
    if last is not None and spec.start < last:
        raise IngestError(f"--start {spec.start} is earlier than {last}, the last timestamp already in {where}")
    return spec


def _run_ordered(source: OrderedSource, options, direct: bool, staging: str, columns: List[str], history: bool,
                 old: H.Globals, previous: Optional[str], plan_args: dict, rows_per_run: Optional[int],
                 say) -> List[dict]:
    """A source in known order: planned up front, run as pipelines of about rows_per_run rows each.

    Each run starts from the state the previous one left; parts (and so runs)
    begin at a new second, so rows that share a second share a run.
    """
    buckets = source.buckets_for(SPAN_SECONDS[plan_args["span_by"]]) if plan_args["span_by"] else None
    plan = make_plan(source.entry_ts, source.entry_rows, buckets=buckets, **plan_args)
    if plan.error:
        raise IngestError(plan.error)
    runs = _runs(plan, rows_per_run)
    reports = []
    for run, (a, b) in enumerate(runs):
        lo = int(plan.part_rank[a])
        hi = int(plan.part_rank[b]) if b < len(plan.part_rank) else plan.rows
        started = time.time()
        scratch = os.path.join(staging, f"input-{run}")
        tf.io.gfile.makedirs(scratch)
        report = _run_pipeline(options, staging, run, columns, history, old, previous,
                               lambda p, lo=lo, hi=hi: (source.make(p, "Batches", lo, hi, not direct, scratch), None),
                               plan, plan_args)
        _remove(scratch)
        reports.append(report)
        if previous and previous.startswith(staging):
            _remove(previous)  # an intermediate state: only this run needed it
        previous = report["state"]
        if history:
            old = H.read_meta(previous)
        say(f"run {run + 1}/{len(runs)}: rows {lo:,}-{hi:,} in {time.time() - started:.1f}s")
    return reports


def _check_not_late(log: RawLog, last: Optional[int], where: str) -> None:
    if last is None:
        return
    for i, row in enumerate(log.interactions.rows):
        if int(row[2]) < last:
            line = log.lines[i] if log.lines else i + 1
            raise IngestError(f"{log.path}, line {line}, column timestamp: {row[2]} is earlier than {last}, "
                              f"the last timestamp already in {where}; a batch may only add later rows")


def _check_report(report: dict, path: str) -> None:
    if report["bad_count"]:
        shown = [message for _, message in report["first_bad"]]
        more = report["bad_count"] - len(shown)
        raise IngestError("\n".join(shown) + (f"\n... and {more} more bad row(s)" if more else ""))
    if not report["rows"]:
        raise IngestError(f"{path}: no interactions")
    if report["plan_error"]:
        raise IngestError(report["plan_error"])


def _commit(out_dir: str, staging: str, reports: List[dict], existing: _Existing, history: bool, tables: dict,
            columns: List[str], ingest: dict) -> dict:
    """Moves the staged spans, snapshot and tables into place and writes the manifest: the input checked out."""
    spans: Dict[int, dict] = {}
    for report in reports:
        for part in report["parts"]:
            span = spans.setdefault(part["span"], {"span": part["span"], "rows": 0, "positives": 0,
                                                   "min_timestamp": part["min_timestamp"], "max_timestamp": 0,
                                                   "files": []})
            span["rows"] += part["rows"]
            span["positives"] += part["positives"]
            span["max_timestamp"] = part["max_timestamp"]
            span["files"].append(part["part"])
    if not existing.append:  # a fresh prepare replaces whatever was there
        for number in span_dirs(out_dir):
            _remove(os.path.join(out_dir, f"span-{number}"))
        for name in (*SIDE_TABLES, LEGACY_HISTORY_FILE, H.SNAPSHOTS, MANIFEST):
            _remove(os.path.join(out_dir, name))
    for number, span in sorted(spans.items()):
        staged = os.path.join(staging, f"span-{number}")
        for k, part in enumerate(span["files"]):
            name = f"interactions-{k:05d}.csv"
            tf.io.gfile.rename(os.path.join(staged, f"part-{part:06d}.csv"), os.path.join(staged, name))
        span["files"] = [f"span-{number}/interactions-{k:05d}.csv" for k in range(len(span["files"]))]
        tf.io.gfile.rename(staged, os.path.join(out_dir, f"span-{number}"))
    last_span = max(spans)
    if history:
        tf.io.gfile.makedirs(os.path.join(out_dir, H.SNAPSHOTS))
        tf.io.gfile.rename(reports[-1]["state"], H.snapshot_path(out_dir, last_span))
    for name in tables:
        _replace(os.path.join(staging, name), os.path.join(out_dir, name))
    manifest = dict(existing.manifest or {})
    earlier_spans = manifest.get("spans", [])
    new_spans = [span for _, span in sorted(spans.items())]
    manifest.update(ingest)
    manifest.update({
        "columns": columns, "spans": earlier_spans + new_spans,
        "rows": sum(s["rows"] for s in earlier_spans + new_spans),
        "items_table": tf.io.gfile.exists(os.path.join(out_dir, "items.csv")),
        "users_table": tf.io.gfile.exists(os.path.join(out_dir, "users.csv")),
        "history_features": HISTORY_COLUMNS if history else [],
        "history_state": f"{H.SNAPSHOTS}/after-span-{last_span}" if history else None,
        "ingests": manifest.get("ingests", []) + [dict(ingest, spans=[min(spans), last_span],
                                                       rows=sum(s["rows"] for s in new_spans))]})
    _write_text(os.path.join(staging, MANIFEST), iter([json.dumps(manifest, indent=2) + "\n"]))
    _replace(os.path.join(staging, MANIFEST), os.path.join(out_dir, MANIFEST))
    _remove(staging)
    return manifest
