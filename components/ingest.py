"""`increc prepare`: turns a raw interaction log into time-ordered spans (DESIGN.md, "Spans on disk").

Adapters read MovieLens (latest CSV, 100K, 1M), MovieTweetings and the
generic CSV contract into one table of interactions plus optional item and
user side tables. The interactions are sorted by time (ties keep source
order) and cut into `DATA/span-<N>/interactions.csv`; side tables are written
once to `DATA/items.csv` and `DATA/users.csv`, where the pipeline's Beam
ExampleGen joins them in. Pure Python: no TensorFlow here.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FORMATS = ("csv", "movielens", "movielens-100k", "movielens-1m", "movietweetings")
DEFAULT_THRESHOLDS = {"movielens": 4.0, "movielens-100k": 4.0, "movielens-1m": 4.0, "movietweetings": 8.0}
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "label"]
ITEM_COLUMNS = ["item_id", "genres", "year"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation"]
NO_GENRES = "(no genres listed)"
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
SPAN_SECONDS = {"day": 86400, "hour": 3600}


class IngestError(ValueError):
    """Raw input that cannot be turned into spans; the message names file, line and column."""


@dataclasses.dataclass
class Table:
    columns: List[str]
    rows: List[List[str]]


@dataclasses.dataclass
class RawLog:
    interactions: Table  # user_id, item_id, timestamp, label, extra feature columns
    items: Optional[Table] = None
    users: Optional[Table] = None


# --- reading ---

def _read_text(path: str, encoding: str) -> str:
    try:
        with open(path, encoding=encoding, newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not valid {encoding} text ({e})") from None


def _read_separated(path: str, separator: str, fields: int, encoding: str = "utf-8",
                    min_fields: Optional[int] = None) -> List[Tuple[int, List[str]]]:
    """(line number, fields) of a headerless file with a plain separator (`::`, tab, `|`)."""
    out = []
    for number, line in enumerate(_read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(separator)
        if len(parts) < (min_fields or fields) or (min_fields is None and len(parts) != fields):
            raise IngestError(f"{path}, line {number}: expected {fields} fields separated by {separator!r}, "
                              f"found {len(parts)}")
        out.append((number, parts))
    return out


def _read_csv(path: str, required: Sequence[str]) -> Tuple[List[str], List[Tuple[int, Dict[str, str]]]]:
    """Header and (line, row) of a CSV file with a header; quoted fields may hold commas and newlines."""
    reader = csv.reader(io.StringIO(_read_text(path, "utf-8"), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise IngestError(f"{path}: the file is empty (a header row is required)") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise IngestError(f"{path}, line 1: missing required column(s) {', '.join(missing)}")
    rows, next_line = [], reader.line_num + 1
    try:
        for record in reader:
            start, next_line = next_line, reader.line_num + 1
            if not record or all(not v.strip() for v in record):
                continue
            if len(record) != len(header):
                raise IngestError(f"{path}, line {start}: expected {len(header)} fields, found {len(record)}")
            rows.append((start, dict(zip(header, record))))
    except csv.Error as e:
        raise IngestError(f"{path}, line {next_line}: unparseable CSV ({e})") from None
    return header, rows


def _timestamp(value: str, path: str, line: int) -> str:
    try:
        return str(int(value.strip()))
    except ValueError:
        raise IngestError(f"{path}, line {line}, column timestamp: {value!r} is not an integer "
                          f"(Unix seconds)") from None


def _label_from_rating(value: str, threshold: float, path: str, line: int) -> str:
    try:
        rating = float(value)
    except ValueError:
        raise IngestError(f"{path}, line {line}, column rating: {value!r} is not a number") from None
    if not math.isfinite(rating):
        raise IngestError(f"{path}, line {line}, column rating: {value!r} is not a number")
    return "1" if rating >= threshold else "0"


def _id(value: str, column: str, path: str, line: int) -> str:
    value = value.strip()
    if not value:
        raise IngestError(f"{path}, line {line}, column {column}: empty {column}")
    return value


def _interaction(path, line, user, item, timestamp, label) -> List[str]:
    return [_id(user, "user_id", path, line), _id(item, "item_id", path, line), _timestamp(timestamp, path, line), label]


def _title_year(title: str) -> str:
    match = YEAR_IN_TITLE.search(title)
    return match.group(1) if match else ""


def _locate(input_path: str, names: Sequence[str]) -> Tuple[str, str]:
    """(directory, ratings file) for an input that is either the data set's directory or its ratings file."""
    if os.path.isdir(input_path):
        for name in names:
            if os.path.exists(os.path.join(input_path, name)):
                return input_path, os.path.join(input_path, name)
        raise IngestError(f"{input_path}: none of {', '.join(names)} found")
    if not os.path.exists(input_path):
        raise IngestError(f"{input_path}: no such file or directory")
    return os.path.dirname(os.path.abspath(input_path)), input_path


# --- adapters ---

def read_generic_csv(input_path: str, threshold: Optional[float]) -> RawLog:
    directory, path = _locate(input_path, ["interactions.csv"])
    header, rows = _read_csv(path, ("user_id", "item_id", "timestamp"))
    if "label" not in header and "rating" not in header:
        raise IngestError(f"{path}, line 1: needs a 'label' (0/1) or a 'rating' column")
    if "label" not in header and threshold is None:
        raise IngestError(f"{path}: has ratings but no labels; pass --label-threshold")
    extra = [c for c in header if c not in ("user_id", "item_id", "timestamp", "label", "rating")]
    out = []
    for line, row in rows:
        if "label" in header:
            label = row["label"].strip()
            if label not in ("0", "1"):
                raise IngestError(f"{path}, line {line}, column label: {label!r} is not 0 or 1")
        else:
            label = _label_from_rating(row["rating"], threshold, path, line)
        out.append(_interaction(path, line, row["user_id"], row["item_id"], row["timestamp"], label)
                   + [row[c] for c in extra])
    log = RawLog(Table(INTERACTION_COLUMNS + extra, out))
    for name, key, attribute in (("items.csv", "item_id", "items"), ("users.csv", "user_id", "users")):
        side = os.path.join(directory, name)
        if os.path.exists(side) and os.path.abspath(side) != os.path.abspath(path):
            side_header, side_rows = _read_csv(side, (key,))
            seen = {}
            for line, row in side_rows:
                k = _id(row[key], key, side, line)
                if k in seen:
                    raise IngestError(f"{side}, line {line}, column {key}: duplicate {key} {k!r} "
                                      f"(first on line {seen[k]})")
                seen[k] = line
            setattr(log, attribute, Table(side_header, [[row[c] for c in side_header] for _, row in side_rows]))
    return log


def read_movielens(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.csv"])
    _, rows = _read_csv(path, ("userId", "movieId", "rating", "timestamp"))
    interactions = [_interaction(path, line, r["userId"], r["movieId"], r["timestamp"],
                                 _label_from_rating(r["rating"], threshold, path, line)) for line, r in rows]
    items = None
    movies = os.path.join(directory, "movies.csv")
    if os.path.exists(movies):
        _, movie_rows = _read_csv(movies, ("movieId", "title", "genres"))
        items = Table(ITEM_COLUMNS, [[r["movieId"].strip(), "" if r["genres"] == NO_GENRES else r["genres"],
                                      _title_year(r["title"])] for _, r in movie_rows])
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items)


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


def read_movielens_100k(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["u.data"])
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in _read_separated(path, "\t", 4)]
    items = users = None
    item_path = os.path.join(directory, "u.item")
    if os.path.exists(item_path):
        rows = []
        for line, p in _read_separated(item_path, "|", 5 + len(ML100K_GENRES), encoding="latin-1"):
            flags = p[5:5 + len(ML100K_GENRES)]
            genres = [g for g, flag in zip(ML100K_GENRES, flags) if flag.strip() == "1" and g != "unknown"]
            release = p[2].strip()
            rows.append([p[0].strip(), "|".join(genres), release[-4:] if re.search(r"\d{4}$", release) else ""])
        items = Table(ITEM_COLUMNS, rows)
    user_path = os.path.join(directory, "u.user")
    if os.path.exists(user_path):
        users = Table(USER_COLUMNS, [[p[0].strip(), p[1].strip(), p[2].strip(), p[3].strip()]
                                     for _, p in _read_separated(user_path, "|", 5, encoding="latin-1")])
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users)


def read_movielens_1m(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.dat"])
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in _read_separated(path, "::", 4, encoding="latin-1")]
    items = users = None
    movies = os.path.join(directory, "movies.dat")
    if os.path.exists(movies):
        items = Table(ITEM_COLUMNS, [[p[0].strip(), p[2].strip(), _title_year(p[1])]
                                     for _, p in _read_separated(movies, "::", 3, encoding="latin-1")])
    user_path = os.path.join(directory, "users.dat")
    if os.path.exists(user_path):
        # UserID::Gender::Age::Occupation::Zip
        users = Table(USER_COLUMNS, [[p[0].strip(), p[2].strip(), p[1].strip(), p[3].strip()]
                                     for _, p in _read_separated(user_path, "::", 5, encoding="latin-1")])
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users)


def read_movietweetings(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.dat"])
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in _read_separated(path, "::", 4)]
    items = None
    for name in ("movies.dat", "items.dat"):
        movies = os.path.join(directory, name)
        if os.path.exists(movies):
            # Some titles are missing genres entirely: the third field may be absent.
            rows = []
            for _, p in _read_separated(movies, "::", 3, min_fields=2):
                rows.append([p[0].strip(), p[2].strip() if len(p) > 2 else "", _title_year(p[1])])
            items = Table(ITEM_COLUMNS, rows)
            break
    # users.dat maps ids to Twitter ids: nothing to learn from, not kept.
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items)


READERS = {"csv": read_generic_csv, "movielens": read_movielens, "movielens-100k": read_movielens_100k,
           "movielens-1m": read_movielens_1m, "movietweetings": read_movietweetings}


# --- cutting spans ---

def span_boundaries(timestamps: np.ndarray, spans: Optional[int], span_by: Optional[str]) -> List[np.ndarray]:
    """Index arrays (into time-sorted rows) of each span."""
    n = len(timestamps)
    if spans is not None:
        if spans < 1:
            raise IngestError(f"--spans must be at least 1, got {spans}")
        if spans > n:
            raise IngestError(f"cannot cut {n} rows into {spans} spans")
        return [chunk for chunk in np.array_split(np.arange(n), spans)]
    buckets = timestamps // SPAN_SECONDS[span_by]
    _, starts = np.unique(buckets, return_index=True)
    return [idx for idx in np.split(np.arange(n), starts[1:])]


def span_dirs(data_dir: str) -> List[int]:
    """Span numbers present under data_dir, ascending."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(int(name[5:]) for name in os.listdir(data_dir)
                  if name.startswith("span-") and name[5:].isdigit()
                  and os.path.isdir(os.path.join(data_dir, name)))


def _write_table(path: str, table: Table) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        writer.writerows(table.rows)


def prepare(fmt: str, input_path: str, out_dir: str, spans: Optional[int] = None, span_by: Optional[str] = None,
            label_threshold: Optional[float] = None, overwrite: bool = False) -> dict:
    """Reads a raw log and writes spans, side tables and manifest.json; returns the manifest."""
    if fmt not in READERS:
        raise IngestError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if spans is None and span_by is None:
        spans = 10
    if spans is not None and span_by is not None:
        raise IngestError("give either --spans or --span-by, not both")
    if span_by is not None and span_by not in SPAN_SECONDS:
        raise IngestError(f"--span-by must be day or hour, got {span_by!r}")
    if span_dirs(out_dir) and not overwrite:
        raise IngestError(f"{out_dir} already holds spans; pass --overwrite to replace them")
    threshold = label_threshold if label_threshold is not None else DEFAULT_THRESHOLDS.get(fmt)
    log = READERS[fmt](input_path, threshold)
    rows = log.interactions.rows
    if not rows:
        raise IngestError(f"{input_path}: no interactions")

    timestamps = np.array([int(r[2]) for r in rows], dtype=np.int64)
    order = np.argsort(timestamps, kind="stable")
    timestamps = timestamps[order]
    sorted_rows = [rows[i] for i in order]

    os.makedirs(out_dir, exist_ok=True)
    for number in span_dirs(out_dir):
        shutil.rmtree(os.path.join(out_dir, f"span-{number}"))
    for name in ("items.csv", "users.csv"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))

    manifest_spans = []
    for number, index in enumerate(span_boundaries(timestamps, spans, span_by), start=1):
        span_rows = [sorted_rows[i] for i in index]
        os.makedirs(os.path.join(out_dir, f"span-{number}"))
        relative = f"span-{number}/interactions.csv"
        _write_table(os.path.join(out_dir, relative), Table(log.interactions.columns, span_rows))
        manifest_spans.append({"span": number, "rows": len(span_rows),
                               "positives": sum(r[3] == "1" for r in span_rows),
                               "min_timestamp": int(timestamps[index[0]]),
                               "max_timestamp": int(timestamps[index[-1]]), "path": relative})
    if log.items is not None:
        _write_table(os.path.join(out_dir, "items.csv"), log.items)
    if log.users is not None:
        _write_table(os.path.join(out_dir, "users.csv"), log.users)
    manifest = {"format": fmt, "source": input_path, "label_threshold": threshold, "spans": manifest_spans,
                "rows": len(rows), "items_table": log.items is not None, "users_table": log.users is not None}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
