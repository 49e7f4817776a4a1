"""SpanExampleGen's Beam executor on small files cut into many byte ranges, against a plain reference.

The reference reads the same CSVs with the csv module, joins the side tables
with dicts and cuts the newest 10% by (timestamp, file, line): what the
streaming passes must reproduce exactly, whatever the range size.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import tensorflow as tf
from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
from tfx.types import standard_artifacts

from components import example_gen

HEADER = ["user_id", "item_id", "timestamp", "label", "mood", "score", "year"]


def _write(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def span_dir(tmp_path):
    """Span 1 of two files; the timestamps tie at many seconds (also across files) so the cut lands on a tie."""
    data = tmp_path / "data"
    a = [[f"u{i % 7}", f"i{i % 11}", str(100 + i // 4), str(i % 2), "calm| happy " if i % 3 else "",
          "" if i % 5 == 0 else f"{i / 3:.3f}", "1999" if i % 4 else ""] for i in range(160)]
    a[17][2] = "soon"  # bad timestamp
    a[33][0] = " "  # empty user
    a[40][4] = "multi\nline|mood"  # a quoted newline inside a field
    b = [[f"u{i % 5}", f"i{i % 13}", str(120 + i // 3), "1", "sad", f"{i}", ""] for i in range(90)]
    b[5][3] = "yes"  # bad label
    _write(data / "span-1" / "a.csv", HEADER, a)
    _write(data / "span-1" / "b.csv", HEADER[:4] + ["mood", "score", "year"], b)
    # Side tables: `year` also comes from the span (the span wins); i12 has no item row.
    _write(data / "items.csv", ["item_id", "genres", "year"],
           [[f"i{i}", "Drama|Comedy" if i % 2 else "Horror", "2001"] for i in range(12)])
    _write(data / "users.csv", ["user_id", "age"], [[f"u{i}", str(20 + i)] for i in range(7)])
    return data


def run_executor(data, out, budget: float = 0.05, range_bytes: int = 300, beam_args=None,
                 max_eval_rows: int = 50_000, span=1):
    """Runs the executor as TFX would; returns the (examples, statistics) artifacts."""
    examples, parquet = standard_artifacts.Examples(), standard_artifacts.Examples()
    statistics = standard_artifacts.ExampleStatistics()
    examples.uri, parquet.uri, statistics.uri = f"{out}/examples", f"{out}/parquet", f"{out}/statistics"
    properties = {"data_dir": str(data), "span": span, "eval_fraction": 0.1, "bad_row_budget": budget,
                  "range_bytes": range_bytes, "max_eval_rows": max_eval_rows}
    context = BaseBeamExecutor.Context(beam_pipeline_args=beam_args or ["--direct_running_mode=in_memory"],
                                       tmp_dir=str(Path(str(out)).parent / "tmp") if "://" not in str(out) else None)
    example_gen.Executor(context).Do({}, {"examples": [examples], "examples_parquet": [parquet],
                                          "statistics": [statistics]}, properties)
    return examples


def _features(record: bytes) -> dict:
    example = tf.train.Example.FromString(record)
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        out[name] = [v.decode() if isinstance(v, bytes) else round(v, 3) if isinstance(v, float) else v
                     for v in values]
    return out


def _split(out: Path, split: str):
    files = sorted(str(p) for p in (out / "examples" / f"Split-{split}").iterdir())
    return sorted((_features(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")),
                  key=_order)


def _order(features: dict):
    return features["timestamp"], str(sorted(features.items()))


def _reference(data: Path):
    items = {r["item_id"]: r for r in csv.DictReader(open(data / "items.csv", newline=""))}
    users = {r["user_id"]: r for r in csv.DictReader(open(data / "users.csv", newline=""))}
    rows = []
    for file_index, path in enumerate(sorted((data / "span-1").iterdir())):
        reader = csv.reader(open(path, newline=""))
        header = next(reader)
        line = reader.line_num + 1
        for fields in reader:
            start, line = line, reader.line_num + 1
            row = dict(zip(header, fields))
            if not row["user_id"].strip() or row["label"] not in ("0", "1") or not row["timestamp"].isdigit():
                continue
            joined = dict(items.get(row["item_id"], {}), **users.get(row["user_id"], {}))
            joined.update(row)
            features = {"user_id": [row["user_id"]], "item_id": [row["item_id"]], "timestamp": [int(row["timestamp"])],
                        "label": [int(row["label"])], "age": [float(joined["age"])] if joined.get("age") else [],
                        "score": [round(float(row["score"]), 3)] if row["score"] else [],
                        "year": [float(row["year"])] if row["year"] else [],
                        "mood": [p.strip() for p in row["mood"].split("|") if p.strip()],
                        "genres": [p for p in joined.get("genres", "").split("|") if p]}
            rows.append(((int(row["timestamp"]), file_index, start), features))
    rows.sort(key=lambda r: r[0])
    n_eval = max(1, int(round(len(rows) * 0.1)))
    return (sorted([f for _, f in rows[:-n_eval]], key=_order), sorted([f for _, f in rows[-n_eval:]], key=_order),
            rows)


@pytest.mark.parametrize("range_bytes", [97, 300, 1 << 20])
def test_splits_equal_a_plain_read_joined_and_cut_by_time(span_dir, tmp_path, range_bytes):
    train, evaluation, rows = _reference(span_dir)
    assert rows[-len(evaluation) - 1][0][0] == rows[-len(evaluation)][0][0], "the fixture should cut inside a tie"
    examples = run_executor(span_dir, tmp_path / "out", range_bytes=range_bytes)
    assert _split(tmp_path / "out", "train") == train
    assert _split(tmp_path / "out", "eval") == evaluation
    assert examples.get_int_custom_property("rows") == len(rows)
    assert examples.get_int_custom_property("bad_rows") == 3
    assert examples.get_int_custom_property("eval_rows") == len(evaluation)
    report = json.loads((tmp_path / "out" / "examples" / example_gen.BAD_ROWS_FILE).read_text())
    assert [(Path(b["file"]).name, b["line"]) for b in report["bad_rows"]] == [("a.csv", 19), ("a.csv", 35),
                                                                               ("b.csv", 7)]


def test_the_eval_split_is_capped_at_the_newest_max_eval_rows(span_dir, tmp_path):
    _, _, rows = _reference(span_dir)
    examples = run_executor(span_dir, tmp_path / "out", max_eval_rows=5)
    newest = sorted(rows[-5:], key=lambda r: _order(r[1]))
    assert _split(tmp_path / "out", "eval") == [f for _, f in newest]
    assert examples.get_int_custom_property("train_rows") == len(rows) - 5


def test_too_many_bad_rows_fail_before_anything_is_written(span_dir, tmp_path):
    with pytest.raises(Exception) as error:
        run_executor(span_dir, tmp_path / "out", budget=0.001)
    message = str(error.value)
    assert "3 malformed row(s) out of 250 exceed the bad-row budget" in message
    assert "a.csv, line 19: timestamp 'soon' is not an integer" in message
    assert "b.csv, line 7: label 'yes' is not 0 or 1" in message
    assert not list((tmp_path / "out").rglob("*.gz"))


def test_a_span_file_without_a_label_column_fails_at_once_naming_it(span_dir, tmp_path):
    _write(span_dir / "span-1" / "c.csv", ["user_id", "item_id", "timestamp"], [["u", "i", "1"]])
    with pytest.raises(example_gen.MalformedInputError, match=r"c\.csv, line 1: missing required column\(s\) label"):
        run_executor(span_dir, tmp_path / "out")


def test_a_duplicate_side_table_key_names_file_and_line(span_dir, tmp_path):
    with open(span_dir / "users.csv", "a") as f:
        f.write("u3,99\n")
    with pytest.raises(example_gen.MalformedInputError, match=r"users\.csv, line 9: duplicate user_id 'u3' "
                                                              r"\(first on line 5\)"):
        run_executor(span_dir, tmp_path / "out")


def test_kinds_come_from_every_value():
    import pyarrow as pa

    assert example_gen.kind_of(pa.array(["1", " 2.5", "", "1_000"])) == "numeric"  # Python's own number syntax
    assert example_gen.kind_of(pa.array(["1", "nan"])) == "categorical"  # not finite: not a number feature
    assert example_gen.kind_of(pa.array(["", " "])) == ""
    assert example_gen.kind_of(pa.array(["3", "x"])) == "categorical"


def test_the_multi_processing_runner_writes_the_same_splits(span_dir, tmp_path):
    run_executor(span_dir, tmp_path / "one", range_bytes=200)
    run_executor(span_dir, tmp_path / "two", range_bytes=200,
                 beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    for split in ("train", "eval"):
        assert _split(tmp_path / "two", split) == _split(tmp_path / "one", split)
    assert len(os.listdir(tmp_path / "two" / "examples" / "Split-train")) == \
        len(os.listdir(tmp_path / "one" / "examples" / "Split-train"))


def test_spans_and_examples_on_a_remote_file_system(span_dir, tmp_path):
    """Every read and write goes through TensorFlow's file systems: ram:// stands in for gs:// offline."""
    remote = "ram://increc-test-data"
    for path in span_dir.rglob("*.csv"):
        target = f"{remote}/{path.relative_to(span_dir)}"
        tf.io.gfile.makedirs(os.path.dirname(target))
        tf.io.gfile.copy(str(path), target, overwrite=True)
    run_executor(span_dir, tmp_path / "local")
    run_executor(remote, "ram://increc-test-out", span=None)  # span None: the newest span
    for split in ("train", "eval"):
        files = tf.io.gfile.glob(f"ram://increc-test-out/examples/Split-{split}/*")
        records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
        assert sorted((_features(r) for r in records), key=_order) == _split(tmp_path / "local", split)
        assert tf.io.gfile.exists(f"ram://increc-test-out/statistics/Split-{split}/FeatureStats.pb")


def test_statistics_are_what_tfdv_computes_from_the_written_examples(span_dir, tmp_path):
    import tensorflow_data_validation as tfdv

    run_executor(span_dir, tmp_path / "out")
    for split in ("train", "eval"):
        ours = tfdv.load_stats_binary(str(tmp_path / "out" / "statistics" / f"Split-{split}" / "FeatureStats.pb"))
        files = sorted((tmp_path / "out" / "examples" / f"Split-{split}").iterdir())
        theirs = tfdv.generate_statistics_from_tfrecord(data_location=[str(f) for f in files][0] if len(files) == 1
                                                        else str(files[0].parent / "*"))
        ours, theirs = ours.datasets[0], theirs.datasets[0]
        assert ours.num_examples == theirs.num_examples > 0
        by_name = lambda d: {f.path.step[0]: f for f in d.features}  # noqa: E731
        assert by_name(ours).keys() == by_name(theirs).keys()
        for name, feature in by_name(theirs).items():
            mine = by_name(ours)[name]
            assert mine.type == feature.type, name
            if feature.HasField("num_stats"):
                assert mine.num_stats.common_stats.num_non_missing == feature.num_stats.common_stats.num_non_missing
                assert (mine.num_stats.min, mine.num_stats.max) == (feature.num_stats.min, feature.num_stats.max), name
            else:
                assert mine.string_stats.common_stats.num_non_missing == \
                    feature.string_stats.common_stats.num_non_missing, name
                assert mine.string_stats.unique == feature.string_stats.unique, name


def test_timestamps_in_another_unit_are_bad_rows_that_say_so(span_dir, tmp_path):
    _write(span_dir / "span-1" / "c.csv", HEADER, [["u1", "i1", "1600000000000", "1", "", "", ""],
                                                  ["u1", "i1", "-5", "1", "", "", ""]])
    with pytest.raises(Exception) as error:
        run_executor(span_dir, tmp_path / "out", budget=0.001)
    assert "c.csv, line 2: timestamp 1600000000000: it looks like milliseconds" in str(error.value)
    assert "c.csv, line 3: timestamp -5 is negative" in str(error.value)


def test_recent_item_lists_are_text_even_when_every_id_looks_like_a_number(tmp_path):
    """A span where no user has two earlier items yet: `user_recent_items` holds single numeric ids,
    which must still be item ids (strings), as in every later span, not a number feature."""
    rows = [[f"u{i % 3}", str(i % 4), str(100 + i), "1", "" if i < 3 else str((i - 3) % 4)] for i in range(12)]
    _write(tmp_path / "data" / "span-1" / "a.csv", ["user_id", "item_id", "timestamp", "label",
                                                    "user_recent_items"], rows)
    run_executor(tmp_path / "data", tmp_path / "out")
    values = [f["user_recent_items"] for f in _split(tmp_path / "out", "train")]
    assert ["0"] in values and all(isinstance(v, str) for vs in values for v in vs)
