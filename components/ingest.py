"""`increc prepare`: turns a raw interaction log into time-ordered spans (DESIGN.md, "Spans on disk").

Adapters read MovieLens (latest CSV, 100K, 1M), MovieTweetings and the
generic CSV contract into one table of interactions plus optional item and
user side tables. The interactions are sorted by time (ties keep source
order) and cut into `DATA/span-<N>/interactions.csv`; side tables are written
once to `DATA/items.csv` and `DATA/users.csv`, where the pipeline's Beam
ExampleGen joins them in. Pure Python: no TensorFlow here.

Malformed input is never dropped silently: it raises `IngestError` naming the
file, the 1-based line and, where there is one, the column.
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
DEFAULT_SPANS = 10  # when neither spans nor span_by is given (the CLI's documented default)
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "label"]
ITEM_COLUMNS = ["item_id", "genres", "year"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation"]
NO_GENRES = "(no genres listed)"
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
INTEGER = re.compile(r"[+-]?\d+")
SPAN_SECONDS = {"day": 86400, "hour": 3600}

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


def _read_csv(path: str, required: Sequence[str]) -> Tuple[List[str], List[Tuple[int, Dict[str, str]]]]:
    """Header and (line, row) of a CSV file with a header; quoted fields may hold commas and newlines."""
    # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
    reader = csv.reader(io.StringIO(_read_text(path, "utf-8-sig"), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise IngestError(f"{path}: the file is empty (a header row is required)") from None
    except csv.Error as e:
        raise IngestError(f"{path}, line 1: unparseable CSV header ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise IngestError(f"{path}, line 1: missing required column(s) {', '.join(missing)} "
                          f"(header: {', '.join(header)})")
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise IngestError(f"{path}, line 1: duplicate column name(s) {', '.join(duplicated)}")
    rows, next_line = [], reader.line_num + 1
    try:
        for record in reader:
            # A quoted field can span lines: the row starts where the previous one ended.
            start, next_line = next_line, reader.line_num + 1
            if not record or all(not v.strip() for v in record):
                continue
            if len(record) != len(header):
                raise IngestError(f"{path}, line {start}: expected {len(header)} fields, found {len(record)}")
            rows.append((start, dict(zip(header, record))))
    except csv.Error as e:
        raise IngestError(f"{path}, line {next_line}: unparseable CSV ({e})") from None
    return header, rows


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


def _outcomes(rows: List[List[str]], ratings: Optional[List[float]] = None) -> List[float]:
    return list(ratings) if ratings is not None else [float(r[3]) for r in rows]


def _label(value: str, path: str, line: int) -> str:
    label = value.strip()
    if label not in ("0", "1"):
        raise IngestError(f"{path}, line {line}, column label: {value!r} is not 0 or 1")
    return label


def _interaction(path: str, line: int, user: str, item: str, timestamp: str, label: str) -> List[str]:
    return [_id(user, "user_id", path, line), _id(item, "item_id", path, line),
            _timestamp(timestamp, path, line), label]


def _side_table(path: str, columns: List[str], numbered_rows: List[Tuple[int, List[str]]], key: str) -> Table:
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
    """(directory, ratings file) for an input that is either the data set's directory or its ratings file."""
    if os.path.isdir(input_path):
        for name in names:
            if os.path.isfile(os.path.join(input_path, name)):
                return input_path, os.path.join(input_path, name)
        raise IngestError(f"{input_path}: no {' or '.join(names)} in this directory")
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
    # The rating is left out of the features: it would give the label away.
    extra = [c for c in header if c not in ("user_id", "item_id", "timestamp", "label", "rating")]
    out, ratings = [], []
    for line, row in rows:
        if "label" in header:
            label = _label(row["label"], path, line)
        else:
            label = _label_from_rating(row["rating"], threshold, path, line)
        if "rating" in header:
            ratings.append(_rating(row["rating"], path, line))
        out.append(_interaction(path, line, row["user_id"], row["item_id"], row["timestamp"], label)
                   + [row[c] for c in extra])
    log = RawLog(Table(INTERACTION_COLUMNS + extra, out), outcomes=_outcomes(out, ratings if ratings else None))
    for name, key, attribute in (("items.csv", "item_id", "items"), ("users.csv", "user_id", "users")):
        side = os.path.join(directory, name)
        if os.path.isfile(side) and os.path.abspath(side) != os.path.abspath(path):
            side_header, side_rows = _read_csv(side, (key,))
            setattr(log, attribute, _side_table(side, side_header, [(line, [r[c] for c in side_header])
                                                                    for line, r in side_rows], key))
    return log


def read_movielens(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.csv"])
    _, rows = _read_csv(path, ("userId", "movieId", "rating", "timestamp"))
    interactions = [_interaction(path, line, r["userId"], r["movieId"], r["timestamp"],
                                 _label_from_rating(r["rating"], threshold, path, line)) for line, r in rows]
    items = None
    movies = os.path.join(directory, "movies.csv")
    if os.path.isfile(movies):
        _, movie_rows = _read_csv(movies, ("movieId", "title", "genres"))
        items = _side_table(movies, ITEM_COLUMNS, [
            (line, [r["movieId"], "" if r["genres"].strip() == NO_GENRES else r["genres"].strip(),
                    _title_year(r["title"])]) for line, r in movie_rows], "item_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items,
                  outcomes=[_rating(r["rating"], path, line) for line, r in rows])


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
        items = _side_table(item_path, ITEM_COLUMNS, rows, "item_id")
    user_path = os.path.join(directory, "u.user")
    if os.path.isfile(user_path):
        # id|age|gender|occupation|zip: the zip code is left out (identifying, not a taste).
        users = _side_table(user_path, USER_COLUMNS, [
            (line, [p[0], p[1].strip(), p[2].strip(), p[3].strip()])
            for line, p in _read_separated(user_path, "|", [5], encoding="latin-1")], "user_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users, outcomes=outcomes)


def read_movielens_1m(input_path: str, threshold: float) -> RawLog:
    directory, path = _locate(input_path, ["ratings.dat"])
    records = _read_separated(path, "::", [4], encoding="latin-1")
    interactions = [_interaction(path, line, p[0], p[1], p[3], _label_from_rating(p[2], threshold, path, line))
                    for line, p in records]
    outcomes = [_rating(p[2], path, line) for line, p in records]
    items = users = None
    movies = os.path.join(directory, "movies.dat")
    if os.path.isfile(movies):
        items = _side_table(movies, ITEM_COLUMNS, [
            (line, [p[0], p[2].strip(), _title_year(p[1])])
            for line, p in _read_separated(movies, "::", [3], encoding="latin-1")], "item_id")
    user_path = os.path.join(directory, "users.dat")
    if os.path.isfile(user_path):
        # UserID::Gender::Age::Occupation::Zip; the zip code is left out.
        rows = []
        for line, p in _read_separated(user_path, "::", [5], encoding="latin-1"):
            code = p[3].strip()
            occupation = ML1M_OCCUPATIONS[int(code)] if code.isdigit() and int(code) < len(ML1M_OCCUPATIONS) \
                else code
            rows.append((line, [p[0], p[2].strip(), p[1].strip(), occupation]))
        users = _side_table(user_path, USER_COLUMNS, rows, "user_id")
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, users=users, outcomes=outcomes)


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
            items = _side_table(movies, ITEM_COLUMNS, [
                (line, [p[0], p[2].strip() if len(p) > 2 else "", _title_year(p[1])])
                for line, p in _read_separated(movies, "::", [2, 3])], "item_id")
            break
    # users.dat only maps user ids to Twitter ids: nothing to learn from, so no users table.
    return RawLog(Table(INTERACTION_COLUMNS, interactions), items=items, outcomes=outcomes)


READERS = {"csv": read_generic_csv, "movielens": read_movielens, "movielens-100k": read_movielens_100k,
           "movielens-1m": read_movielens_1m, "movietweetings": read_movietweetings}


# --- history features ---

# What the log already knew about a row's user and item when it happened: the
# features a feature store serves at request time, logged with the interaction.
HISTORY_COLUMNS = ["user_history", "user_history_mean", "item_history", "item_history_mean"]
PRIOR_WEIGHTS = {"user": 2.0, "item": 5.0}  # pseudo-interactions at the global mean that smooth a short history
HISTORY_FILE = "history_state.json"  # the history after the last interaction: what clients send features from


class History:
    """Running counts and outcome sums per user and per item: what a feature store knows at a moment."""

    def __init__(self):
        self.stats: Dict[str, Dict[str, Tuple[int, float]]] = {"user": {}, "item": {}}
        self.seen, self.total = 0, 0.0

    def features(self, user: str, item: str) -> List[str]:
        """HISTORY_COLUMNS for an interaction of `user` with `item` now."""
        prior = self.total / self.seen if self.seen else None
        values = []
        for kind, key in (("user", user), ("item", item)):
            count, summed = self.stats[kind].get(key, (0, 0.0))
            weight = PRIOR_WEIGHTS[kind]
            values += [f"{math.log1p(count):.4f}",
                       "" if prior is None else f"{(summed + weight * prior) / (count + weight):.4f}"]
        return values

    def add(self, user: str, item: str, outcome: float) -> None:
        for kind, key in (("user", user), ("item", item)):
            count, summed = self.stats[kind].get(key, (0, 0.0))
            self.stats[kind][key] = (count + 1, summed + outcome)
        self.seen, self.total = self.seen + 1, self.total + outcome

    def to_json(self) -> dict:
        return {"seen": self.seen, "total": self.total,
                "user": {k: list(v) for k, v in self.stats["user"].items()},
                "item": {k: list(v) for k, v in self.stats["item"].items()}}

    @classmethod
    def from_json(cls, state: dict) -> "History":
        history = cls()
        history.seen, history.total = int(state["seen"]), float(state["total"])
        for kind in ("user", "item"):
            history.stats[kind] = {k: (int(c), float(t)) for k, (c, t) in state[kind].items()}
        return history


def history_features(rows: List[List[str]], timestamps: np.ndarray,
                     outcomes: Sequence[float]) -> Tuple[List[List[str]], History]:
    """HISTORY_COLUMNS of every time-sorted row, and the history after the last one.

    Only interactions with a strictly earlier timestamp count, so rows that share
    a timestamp never see each other's outcome. A mean is empty (missing) until
    anything at all has been seen.
    """
    history = History()
    out: List[List[str]] = []
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and timestamps[end] == timestamps[start]:
            end += 1
        out += [history.features(row[0], row[1]) for row in rows[start:end]]
        for row, outcome in zip(rows[start:end], outcomes[start:end]):
            history.add(row[0], row[1], outcome)
        start = end
    return out, history


def read_history_state(data_dir: str) -> Optional[History]:
    """The history after a data directory's last interaction (HISTORY_FILE), if prepare wrote one."""
    path = os.path.join(data_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return History.from_json(json.load(f))


# --- cutting spans ---

def span_boundaries(timestamps: np.ndarray, spans: Optional[int], span_by: Optional[str]) -> List[np.ndarray]:
    """Index arrays, into time-sorted rows, of each span in order."""
    n = len(timestamps)
    if spans is not None:
        if spans < 1:
            raise IngestError(f"--spans must be at least 1, got {spans}")
        if spans > n:
            raise IngestError(f"cannot cut {n} rows into {spans} spans (more spans than rows)")
        return list(np.array_split(np.arange(n), spans))
    # Floor division buckets by UTC day/hour; only buckets with data become spans.
    buckets = timestamps // SPAN_SECONDS[span_by]
    _, starts = np.unique(buckets, return_index=True)
    return list(np.split(np.arange(n), starts[1:]))


def span_dirs(data_dir: str) -> List[int]:
    """Span numbers present under data_dir (`span-<N>/` directories), ascending."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(int(name[5:]) for name in os.listdir(data_dir)
                  if name.startswith("span-") and name[5:].isdigit()
                  and os.path.isdir(os.path.join(data_dir, name)))


def _write_table(path: str, table: Table) -> None:
    # The csv module quotes values with commas, quotes or newlines, so they read back unchanged.
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        writer.writerows(table.rows)


def prepare(fmt: str, input_path: str, out_dir: str, spans: Optional[int] = None, span_by: Optional[str] = None,
            label_threshold: Optional[float] = None, overwrite: bool = False, history: bool = True) -> dict:
    """Reads a raw log and writes spans, side tables and manifest.json under out_dir; returns the manifest.

    With `history`, every interaction also gets HISTORY_COLUMNS (see history_features).
    """
    if fmt not in READERS:
        raise IngestError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if spans is not None and span_by is not None:
        raise IngestError("give either --spans or --span-by, not both")
    if spans is None and span_by is None:
        spans = DEFAULT_SPANS
    if span_by is not None and span_by not in SPAN_SECONDS:
        raise IngestError(f"--span-by must be day or hour, got {span_by!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise IngestError(f"{out_dir}: exists and is not a directory")
    if span_dirs(out_dir) and not overwrite:
        raise IngestError(f"{out_dir} already holds spans {span_dirs(out_dir)}; pass --overwrite to replace them")
    threshold = label_threshold if label_threshold is not None else DEFAULT_THRESHOLDS.get(fmt)
    threshold = None if threshold is None else float(threshold)

    # Everything is read and checked before anything under out_dir changes.
    log = READERS[fmt](input_path, threshold)
    rows = log.interactions.rows
    if not rows:
        raise IngestError(f"{input_path}: no interactions")
    timestamps = np.array([int(r[2]) for r in rows], dtype=np.int64)
    order = np.argsort(timestamps, kind="stable")  # stable: equal timestamps keep source order
    timestamps = timestamps[order]
    sorted_rows = [rows[i] for i in order]
    columns = list(log.interactions.columns)
    if history:
        clashing = [c for c in HISTORY_COLUMNS if c in columns]
        if clashing:
            raise IngestError(f"{input_path}: already has column(s) {', '.join(clashing)}; "
                              f"pass --no-history-features to keep them as they are")
        outcomes = log.outcomes if log.outcomes is not None else _outcomes(rows)
        features, history_state = history_features(sorted_rows, timestamps, [outcomes[i] for i in order])
        sorted_rows = [row + extra for row, extra in zip(sorted_rows, features)]
        columns += HISTORY_COLUMNS
    cuts = span_boundaries(timestamps, spans, span_by)

    os.makedirs(out_dir, exist_ok=True)
    # Old spans and side tables go, so a shorter new cut leaves no stale span behind.
    for number in span_dirs(out_dir):
        shutil.rmtree(os.path.join(out_dir, f"span-{number}"))
    for name in ("items.csv", "users.csv", HISTORY_FILE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))

    manifest_spans = []
    for number, index in enumerate(cuts, start=1):
        span_rows = [sorted_rows[i] for i in index]
        relative = f"span-{number}/interactions.csv"
        os.makedirs(os.path.join(out_dir, f"span-{number}"))
        _write_table(os.path.join(out_dir, relative), Table(columns, span_rows))
        manifest_spans.append({"span": number, "rows": len(span_rows),
                               "positives": sum(r[3] == "1" for r in span_rows),
                               "min_timestamp": int(timestamps[index[0]]),
                               "max_timestamp": int(timestamps[index[-1]]), "path": relative})
    if log.items is not None:
        _write_table(os.path.join(out_dir, "items.csv"), log.items)
    if log.users is not None:
        _write_table(os.path.join(out_dir, "users.csv"), log.users)
    if history:
        with open(os.path.join(out_dir, HISTORY_FILE), "w", encoding="utf-8") as f:
            json.dump(history_state.to_json(), f)
    manifest = {"format": fmt, "source": input_path, "label_threshold": threshold, "spans": manifest_spans,
                "rows": len(rows), "items_table": log.items is not None, "users_table": log.users is not None,
                "history_features": HISTORY_COLUMNS if history else []}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest
