"""SpanExampleGen: reads one span of raw interaction CSV into tf.Examples with Beam.

What the stock CsvExampleGen does not do and increc needs:
- quoted fields that hold commas or newlines, with errors that name file and line;
- `|`-separated values become multi-valued categoricals;
- the optional `items.csv` / `users.csv` side tables are joined in (in Beam);
- malformed rows are counted and dropped under a bad-row budget, and the run
  fails, naming the rows, when the budget is exceeded;
- the eval split is the last `eval_fraction` of the span by time, not a hash.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import tensorflow as tf
from tfx.components.example_gen import base_example_gen_executor
from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from models import features as F

REQUIRED_COLUMNS = (F.USER_ID, F.ITEM_ID, F.TIMESTAMP, F.LABEL)
SIDE_TABLES = {"items.csv": F.ITEM_ID, "users.csv": F.USER_ID}
BAD_ROWS_FILE = "bad_rows.jsonl"
SHOWN_BAD_ROWS = 5


class MalformedInputError(ValueError):
    """Raised when a span or side table cannot be read, or too many rows are bad."""


# --- reading CSV files (pure Python, used inside Beam DoFns) ---

def read_csv(path: str, required: Tuple[str, ...]) -> Iterator[Tuple[int, Optional[Dict[str, str]], str]]:
    """Yields (line, row or None, reason) for every record of a CSV file.

    `line` is the 1-based line where the record starts, so a quoted field with
    newlines still points at the right place. A missing required column fails
    at once: no row of such a file can be read.
    """
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MalformedInputError(f"{path}: the file is empty (a header row is required)")
    except csv.Error as e:
        raise MalformedInputError(f"{path}, line 1: unreadable header: {e}")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise MalformedInputError(
            f"{path}: missing required column(s) {', '.join(missing)} (header: {', '.join(header)})")
    if len(set(header)) != len(header):
        raise MalformedInputError(f"{path}: duplicate column names in header: {', '.join(header)}")
    next_line = reader.line_num + 1
    while True:
        start = next_line
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            next_line = reader.line_num + 1
            yield start, None, f"unparseable CSV: {e}"
            continue
        next_line = reader.line_num + 1
        if not record or all(not v.strip() for v in record):
            continue  # blank lines are not rows
        if len(record) != len(header):
            yield start, None, f"expected {len(header)} fields, found {len(record)}"
            continue
        yield start, dict(zip(header, record)), ""


def check_interaction(row: Dict[str, str]) -> str:
    """Returns why an interaction row is malformed, or '' when it is fine."""
    for column in (F.USER_ID, F.ITEM_ID):
        if not row[column].strip():
            return f"empty {column}"
    try:
        int(row[F.TIMESTAMP].strip())
    except ValueError:
        return f"timestamp {row[F.TIMESTAMP]!r} is not an integer (Unix seconds)"
    if row[F.LABEL].strip() not in ("0", "1"):
        return f"label {row[F.LABEL]!r} is not 0 or 1"
    return ""


def is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def column_kinds(rows: List[Dict[str, str]], columns: List[str]) -> Dict[str, str]:
    """'numeric' for a column whose every non-empty value is a number, else 'categorical'."""
    return {c: _combine_kinds(_value_kind(r.get(c, "").strip()) for r in rows) or "categorical" for c in columns}


def to_example(row: Dict[str, str], kinds: Dict[str, str]) -> tf.train.Example:
    feature = {
        F.USER_ID: _bytes([row[F.USER_ID].strip()]),
        F.ITEM_ID: _bytes([row[F.ITEM_ID].strip()]),
        F.TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row[F.TIMESTAMP])])),
        F.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row[F.LABEL])])),
    }
    for column, kind in kinds.items():
        value = (row.get(column) or "").strip()
        if kind == "numeric":
            floats = [float(value)] if value else []
            feature[column] = tf.train.Feature(float_list=tf.train.FloatList(value=floats))
        else:
            parts = [p.strip() for p in value.split(F.MULTI_VALUE_SEPARATOR)] if value else []
            feature[column] = _bytes([p for p in parts if p])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _bytes(values: List[str]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))


def read_side_table(path: str, key: str) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """A side table as {key: row}, and its feature columns. Bad side-table rows fail at once."""
    table = {}
    columns: List[str] = []
    for line, row, reason in read_csv(path, (key,)):
        if row is None:
            raise MalformedInputError(f"{path}, line {line}: {reason}")
        k = row[key].strip()
        if not k:
            raise MalformedInputError(f"{path}, line {line}: empty {key}")
        if k in table:
            raise MalformedInputError(f"{path}, line {line}: duplicate {key} {k!r}")
        table[k] = row
        if not columns:
            columns = [c for c in row if c != key]
    return table, columns


def budget_error(total: int, bad: List[Dict[str, Any]], budget: float) -> Optional[str]:
    """The error message when the bad rows exceed the budget, else None (total: good rows)."""
    allowed = int(math.floor((total + len(bad)) * budget))
    if len(bad) <= allowed:
        return None
    shown = "\n".join(f"  {b['file']}, line {b['line']}: {b['reason']}" for b in bad[:SHOWN_BAD_ROWS])
    more = f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return (f"{len(bad)} malformed row(s) out of {total + len(bad)} exceed the bad-row budget "
            f"({budget:.2%} of the span = {allowed} row(s)):\n{shown}{more}")


# --- the Beam pipeline ---

class _ParseSpan(beam.DoFn):
    def process(self, path):
        for line, row, reason in read_csv(path, REQUIRED_COLUMNS):
            if row is not None:
                reason = check_interaction(row)
            if reason:
                yield beam.pvalue.TaggedOutput("bad", {"file": path, "line": line, "reason": reason})
            else:
                yield (int(row[F.TIMESTAMP]), path, line), row


def _join(keyed_row, items, users):
    key, row = keyed_row
    joined = dict(row)
    for table, id_column in ((items, F.ITEM_ID), (users, F.USER_ID)):
        side = table.get(row[id_column].strip(), {})
        for column, value in side.items():
            if column != id_column and column not in row:
                joined[column] = value
    return key, joined


def _side_table(pipeline, name: str, path: str):
    """A singleton PCollection holding (table, column kinds) of one side table ({} when absent)."""
    key = SIDE_TABLES[name]
    files = [path] if tf.io.gfile.exists(path) else []
    return (pipeline
            | f"Create[{name}]" >> beam.Create(files)
            | f"Read[{name}]" >> beam.Map(_read_side_table_with_kinds, key)
            | f"One[{name}]" >> beam.combiners.ToList()
            | f"Unwrap[{name}]" >> beam.Map(lambda tables: tables[0] if tables else ({}, {})))


def _read_side_table_with_kinds(path, key):
    table, columns = read_side_table(path, key)
    return table, column_kinds(list(table.values()), columns)


def _value_kind(value: str) -> str:
    if not value:
        return ""
    return "numeric" if is_number(value) else "categorical"


def _merge_kinds(span_kinds, items, users):
    """Kinds of every feature column; an all-empty column is categorical. The span's own columns win."""
    kinds = {}
    for side_kinds in (users[1], items[1]):
        kinds.update(side_kinds)
    kinds.update(span_kinds)
    return {c: (k or "categorical") for c, k in sorted(kinds.items())}


class Executor(base_example_gen_executor.BaseExampleGenExecutor):
    """Beam executor behind SpanExampleGen."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        raise NotImplementedError("SpanExampleGen builds both splits in GenerateExamplesByBeam")

    def GenerateExamplesByBeam(self, pipeline, exec_properties):
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config)
        custom = json.loads(exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY) or "{}")
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        pattern = os.path.join(input_base, input_config.splits[0].pattern)
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise MalformedInputError(f"no span file matches {pattern}")
        eval_fraction = float(custom.get("eval_fraction", 0.1))
        budget = float(custom.get("bad_row_budget", 0.001))
        report_path = custom["_bad_rows_report"]

        side_paths = {name: os.path.join(input_base, name) for name in SIDE_TABLES}
        items = _side_table(pipeline, "items.csv", side_paths["items.csv"])
        users = _side_table(pipeline, "users.csv", side_paths["users.csv"])

        parsed = (pipeline
                  | "SpanFiles" >> beam.Create(files)
                  | "Parse" >> beam.ParDo(_ParseSpan()).with_outputs("bad", main="rows"))
        bad = parsed.bad | "BadToList" >> beam.combiners.ToList()

        # A column's kind is decided over the whole span (side tables: over the
        # whole table), so one odd value cannot flip the type of a single row.
        span_kinds = (parsed.rows
                      | "Values" >> beam.FlatMap(lambda kr: [(c, v.strip()) for c, v in kr[1].items() if c not in REQUIRED_COLUMNS])
                      | "KindPerValue" >> beam.Map(lambda cv: (cv[0], _value_kind(cv[1])))
                      | "KindPerColumn" >> beam.CombinePerKey(_combine_kinds)
                      | "KindsDict" >> beam.combiners.ToDict())
        kinds = (span_kinds
                 | "AllKinds" >> beam.Map(_merge_kinds, beam.pvalue.AsSingleton(items), beam.pvalue.AsSingleton(users)))
        rows = (parsed.rows
                | "JoinSideTables" >> beam.Map(
                    lambda kr, it, us: _join(kr, it[0], us[0]),
                    beam.pvalue.AsSingleton(items), beam.pvalue.AsSingleton(users)))

        count = rows | "Count" >> beam.combiners.Count.Globally()
        _ = (count
             | "CheckBudget" >> beam.Map(_enforce_budget, beam.pvalue.AsSingleton(bad), budget, report_path))

        # The eval split is the newest eval_fraction of the span: rows ordered by
        # (timestamp, file, line), cut at an exact rank.
        cutoff = (rows
                  | "Keys" >> beam.Map(lambda kr: kr[0])
                  | "SortedKeys" >> beam.combiners.ToList()
                  | "Cutoff" >> beam.Map(_eval_cutoff, eval_fraction))
        examples = rows | "ToExample" >> beam.Map(
            lambda kr, k: (kr[0], to_example(kr[1], k)), beam.pvalue.AsSingleton(kinds))
        train, eval_ = (examples
                        | "SplitByTime" >> beam.Partition(
                            lambda ke, n, cut: 1 if ke[0] > cut else 0, 2, beam.pvalue.AsSingleton(cutoff)))
        return {
            "train": train | "TrainValues" >> beam.Map(lambda ke: ke[1]),
            "eval": eval_ | "EvalValues" >> beam.Map(lambda ke: ke[1]),
        }

    def Do(self, input_dict, output_dict, exec_properties):
        examples = artifact_utils.get_single_instance(output_dict[standard_component_specs.EXAMPLES_KEY])
        custom = json.loads(exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY) or "{}")
        report_path = os.path.join(examples.uri, BAD_ROWS_FILE)
        custom["_bad_rows_report"] = report_path
        exec_properties = dict(exec_properties)
        exec_properties[standard_component_specs.CUSTOM_CONFIG_KEY] = json.dumps(custom)
        super().Do(input_dict, output_dict, exec_properties)
        with tf.io.gfile.GFile(report_path) as f:
            report = json.load(f)
        examples.set_int_custom_property("rows", report["rows"])
        examples.set_int_custom_property("bad_rows", len(report["bad_rows"]))


def _combine_kinds(kinds):
    seen = set(k for k in kinds if k)
    if "categorical" in seen:
        return "categorical"
    return "numeric" if seen else ""


def _eval_cutoff(keys, eval_fraction):
    keys = sorted(keys)
    if len(keys) < 2:
        return keys[-1] if keys else None
    n_eval = max(1, int(round(len(keys) * eval_fraction)))
    return keys[len(keys) - n_eval - 1]


def _enforce_budget(total, bad, budget, report_path):
    bad = sorted(bad, key=lambda b: (b["file"], b["line"]))
    message = budget_error(total, bad, budget)
    if message:
        raise MalformedInputError(message)
    tf.io.gfile.makedirs(os.path.dirname(report_path))
    with tf.io.gfile.GFile(report_path, "w") as f:
        json.dump({"rows": total, "bad_rows": bad}, f)
    return total


class SpanExampleGen(FileBasedExampleGen):
    """ExampleGen for one span directory `span-<N>/` of the data contract."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, data_dir: str, span: Optional[int], eval_fraction: float, bad_row_budget: float):
        # span None: the newest span in data_dir (what a scheduled run wants).
        range_config = None
        if span is not None:
            range_config = range_config_pb2.RangeConfig(
                static_range=range_config_pb2.StaticRange(start_span_number=span, end_span_number=span))
        super().__init__(
            input_base=data_dir,
            input_config=example_gen_pb2.Input(splits=[
                example_gen_pb2.Input.Split(name="train", pattern="span-{SPAN}/*.csv"),
                example_gen_pb2.Input.Split(name="eval", pattern="span-{SPAN}/*.csv"),
            ]),
            range_config=range_config,
            custom_config={"eval_fraction": eval_fraction, "bad_row_budget": bad_row_budget},
        )
