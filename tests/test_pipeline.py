"""The incremental TFX pipeline, end to end on small real data (one shared 3-span backfill)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from components.deployment import DeploymentState
from models import features as F
from models.feature_snapshot import FeatureSnapshot
from models.training import TrainingSettings
from serving import model_config
from tests.conftest import TEST_CONFIG, TEST_SPANS, increc

REPORT_FIELDS = {"span", "live_auc", "previous_auc", "candidate_auc", "baseline_auc", "blessed", "pushed_version",
                 "rolled_back", "serving_version", "examples_trained", "train_seconds", "run_seconds"}


def history(work: Path):
    return [json.loads(line) for line in (work / "history.jsonl").read_text().splitlines() if line.strip()]


def weights(saved_model_dir: str):
    loaded = tf.saved_model.load(saved_model_dir)
    return {k: v.numpy() for k, v in loaded.warm_start_weights.items()}


def span_train_ids(data: Path, span: int, column: str, eval_fraction: float = 0.1):
    """Ids in the train split of a span (its first 90% by time), as the ExampleGen cuts it."""
    with open(data / f"span-{span}" / "interactions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["timestamp"].strip().isdigit()]
    rows.sort(key=lambda r: int(r["timestamp"]))
    n_train = len(rows) - max(1, round(len(rows) * eval_fraction))
    return {r[column] for r in rows[:n_train]}


def test_backfill_report_has_the_design_schema(shared_run):
    report = shared_run["report"]
    assert report["mode"] == "incremental"
    assert [s["span"] for s in report["spans"]] == list(range(1, TEST_SPANS + 1))
    for span in report["spans"]:
        assert REPORT_FIELDS <= set(span)
        assert span["status"] == "ok", span
        assert span["examples_trained"] > 0 and span["run_seconds"] >= span["train_seconds"] > 0
        assert span["candidate_auc"] is not None and 0 <= span["candidate_auc"] <= 1
    first = report["spans"][0]
    assert first["live_auc"] is None and first["baseline_auc"] is None
    assert first["blessed"] and first["pushed_version"], "the first span is blessed without a baseline"
    for span in report["spans"][1:]:
        assert span["live_auc"] is not None and span["baseline_auc"] is not None
    live = [s["live_auc"] for s in report["spans"] if s["live_auc"] is not None]
    assert report["mean_live_auc"] == pytest.approx(sum(live) / len(live))
    assert "span 1:" in shared_run["stdout"] and "candidate AUC" in shared_run["stdout"]


def test_runs_do_not_package_tfx_into_the_temp_directory(shared_run):
    # TFX would otherwise copy and package its own install (~49 MB) into a new temp directory before
    # every Beam component and never remove it: a daily deployment would fill its disk.
    left = sorted(str(p.relative_to(shared_run["tmpdir"])) for p in shared_run["tmpdir"].rglob("*")
                  if p.name == "setup.py" or p.name.startswith("tfx_ephemeral"))
    assert left == [], left


def test_malformed_row_within_budget_is_dropped_and_counted(shared_run):
    first = history(shared_run["work"])[0]
    assert first["bad_rows"] == 1
    assert first["rows"] == 1499


def test_later_spans_warm_start_from_the_version_serving_then(shared_run):
    work = shared_run["work"]
    records = history(work)
    pushed = [r["pushed_version"] for r in records]
    for i, record in enumerate(records[1:], start=1):
        serving_then = next(v for v in reversed(pushed[:i]) if v)
        assert record["live_version"] == serving_then
        assert record["warm_started_from"], f"span {record['span']} trained from scratch"
        base, served = weights(record["warm_started_from"]), weights(str(work / "serving" / "increc" / str(serving_then)))
        assert base.keys() == served.keys()
        for name in base:
            np.testing.assert_array_equal(base[name], served[name])


def test_rows_of_ids_absent_from_the_new_span_are_untouched(shared_run):
    data, work = shared_run["data"], shared_run["work"]
    newest = max(r["span"] for r in history(work))
    vocab = (work / "vocab" / f"after-span-{newest}" / "user_id.vocab").read_text().splitlines()
    index = {v: i for i, v in enumerate(vocab)}
    oov = json.loads((work / "config.json").read_text())["oov_buckets"]
    for record in history(work)[1:]:
        before = weights(record["warm_started_from"])["user_id_embedding.0"]
        after = weights(record["candidate_model"])["user_id_embedding.0"]
        present = span_train_ids(data, record["span"], F.USER_ID)
        absent = [oov + index[u] for u in index if u not in present and oov + index[u] < before.shape[0]]
        trained = [oov + index[u] for u in present if u in index and oov + index[u] < before.shape[0]]
        assert absent and trained
        np.testing.assert_array_equal(after[absent], before[absent])
        assert not np.array_equal(after[trained], before[trained]), "present ids should have been trained"
        assert after.shape[0] >= before.shape[0]


def test_vocabularies_only_grow(shared_run):
    work = shared_run["work"]
    transform_dirs = sorted((work / "pipeline" / "Transform" / "transform_graph").iterdir(), key=lambda p: int(p.name))
    assert len(transform_dirs) == TEST_SPANS
    for feature in ("user_id", "item_id", "genres"):
        vocabularies = [(d / "transform_fn" / "assets" / f"{feature}.vocab").read_text().splitlines()
                        for d in transform_dirs]
        for older, newer in zip(vocabularies, vocabularies[1:]):
            assert newer[: len(older)] == older, f"{feature}: an id moved"
            assert len(newer) >= len(older)
        assert len(vocabularies[-1]) > len(vocabularies[0]) or feature == "genres"


def test_every_pushed_version_loads_and_answers(shared_run):
    work = shared_run["work"]
    base = work / "serving" / "increc"
    versions = model_config.versions_on_disk(str(base))
    pushed = [r["pushed_version"] for r in history(work) if r["pushed_version"]]
    assert versions == sorted(pushed) and len(versions) >= 1
    assert versions == sorted(set(versions)), "versions must be strictly increasing"
    for version in versions:
        model = tf.saved_model.load(str(base / str(version)))
        out = model.signatures["serving_default"](
            user_id=tf.constant(["1", "no-such-user"]), item_id=tf.constant(["1074638", "x"]),
            genres=tf.constant(["Drama|Comedy", ""]), year=tf.constant([2012.0, float("nan")]))
        p = out["probability"].numpy()
        assert p.shape == (2,) and np.all((p > 0) & (p < 1))
        assert (base / str(version) / "assets.extra" / "tf_serving_warmup_requests").exists()
    deployment = DeploymentState(str(work / "serving"), "increc").current()
    assert deployment.stable == pushed[-1]
    if len(pushed) > 1:
        assert deployment.previous == pushed[-2]


def test_a_pushed_version_carries_its_vocabularies(shared_run, tmp_path):
    # Served versions outlive the pipeline's artifacts: with the Transform outputs out of reach, a copy of
    # the version still loads and scores as before.
    import shutil

    work = shared_run["work"]
    version = DeploymentState(str(work / "serving"), "increc").current().stable
    copy = tmp_path / "copy"
    shutil.copytree(work / "serving" / "increc" / str(version), copy)
    inputs = dict(user_id=tf.constant(["1", "no-such-user"]), item_id=tf.constant(["1074638", "x"]),
                  genres=tf.constant(["Drama|Comedy", ""]), year=tf.constant([2012.0, float("nan")]))
    before = tf.saved_model.load(str(copy)).signatures["serving_default"](**inputs)["probability"].numpy()
    transform, hidden = work / "pipeline" / "Transform", work / "pipeline" / "Transform.hidden"
    transform.rename(hidden)
    try:
        after = tf.saved_model.load(str(copy)).signatures["serving_default"](**inputs)["probability"].numpy()
    finally:
        hidden.rename(transform)
    np.testing.assert_allclose(after, before, rtol=1e-6)
    assert {"user_id.vocab", "item_id.vocab", "genres.vocab"} <= {p.name for p in (copy / "assets").iterdir()}


def test_raw_and_example_signatures_agree(shared_run):
    from models.export import serving_inputs

    work = shared_run["work"]
    version = DeploymentState(str(work / "serving"), "increc").current().stable
    model = tf.saved_model.load(str(work / "serving" / "increc" / str(version)))
    examples_dir = sorted((work / "pipeline" / "SpanExampleGen" / "examples").iterdir())[-1] / "Split-eval"
    records = [r.numpy() for r in tf.data.TFRecordDataset(sorted(map(str, examples_dir.iterdir())), compression_type="GZIP")]
    records = records[:64]
    from_examples = model.signatures["regress"](inputs=tf.constant(records))["outputs"].numpy()
    raw = serving_inputs(records, ["genres"], ["year"])
    from_raw = model.signatures["serving_default"](**{k: tf.constant(v) for k, v in raw.items()})["probability"].numpy()
    np.testing.assert_allclose(from_raw, from_examples, rtol=1e-5, atol=1e-6)
    scores = model.signatures["classify"](inputs=tf.constant(records))["scores"].numpy()
    np.testing.assert_allclose(scores[:, 1], from_examples, rtol=1e-5, atol=1e-6)


def test_tensorboard_has_a_run_per_span_and_a_timeline(shared_run):
    runs = list((shared_run["work"] / "tensorboard" / "train").iterdir())
    assert len(runs) == TEST_SPANS
    assert all(any(p.name.startswith("events.out.tfevents") for p in r.rglob("*")) for r in runs)
    steps = {}
    for events in (shared_run["work"] / "tensorboard" / "timeline").glob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                steps.setdefault(value.tag, set()).add(event.step)
    assert steps["auc/candidate_auc"] >= set(range(1, TEST_SPANS + 1))
    assert steps["auc/live_auc"] >= set(range(2, TEST_SPANS + 1))
    assert {"decision/pushed", "decision/rolled_back", "decisions"} <= set(steps)
    # The paired gate compares from span 2 on, the rollback test once a previous version exists (span 3).
    assert steps["gate/difference"] >= set(range(2, TEST_SPANS + 1)) and steps["gate/upper"] == steps["gate/lower"]
    assert steps["rollback_test/difference"] >= set(range(3, TEST_SPANS + 1))
    # Top-K of the serving version's recommend on each span's positives, once a version serves.
    assert steps["ranking/recall_at_10"] >= set(range(2, TEST_SPANS + 1)) and "ranking/ndcg_at_50" in steps


# --- runs that must not change what serves; they reuse the shared work directory after it is done ---

def _serving_state(work: Path):
    config = (work / "serving" / "models.config").read_text()
    return config, model_config.versions_on_disk(str(work / "serving" / "increc"))


def test_schema_anomaly_stops_the_run_and_pushes_nothing(shared_run, tmp_path):
    data, work = shared_run["data"], shared_run["work"]
    before = _serving_state(work)
    # Span 6: a 'year' column of text where the schema has numbers.
    rows = [r for r in csv.reader(open(data / "span-4" / "interactions.csv", newline=""))][1:]
    with open(data / "span-4" / "interactions.csv", newline="") as f:
        header = next(csv.reader(f))
    from tests.conftest import write_span
    write_span(data, 6, [r + ["nineteen-ninety"] for r in rows], header=tuple(header) + ("year",))
    result = increc("run", "--data", str(data), "--work", str(work), "--span", "6", "--no-progress",
                    "--config", str(shared_run["config"]), check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "does not match the schema" in out and "'year'" in out, out[-3000:]
    assert _serving_state(work) == before
    record = history(work)[-1]
    assert record["span"] == 6 and record["status"] == "failed" and record["pushed_version"] is None
    assert not list((work / "pipeline").glob("Trainer/model/*/Format-Serving")) or \
        record.get("candidate_model") is None


def test_missing_required_column_names_file_and_column(shared_run):
    data, work = shared_run["data"], shared_run["work"]
    before = _serving_state(work)
    from tests.conftest import write_span
    path = write_span(data, 7, [["1", "2", "1"]], header=("user_id", "item_id", "timestamp"))
    result = increc("run", "--data", str(data), "--work", str(work), "--span", "7", "--no-progress",
                    "--config", str(shared_run["config"]), check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert str(path) in out and "label" in out, out[-3000:]
    assert _serving_state(work) == before


def flipped_config(shared_run, tmp_path) -> Path:
    """The shared settings with flipped training labels, trained long enough to be clearly worse: one epoch
    from a warm start moves the model about 0.02 AUC, within the noise of 150 eval rows."""
    config = dict(json.loads(shared_run["config"].read_text()), flip_train_labels=True, epochs=6,
                  gate_indifference=0.004)
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps(config))
    return flipped


def test_candidate_trained_on_flipped_labels_is_not_blessed_or_pushed(shared_run, tmp_path):
    data, work = shared_run["data"], shared_run["work"]
    before = _serving_state(work)
    flipped = flipped_config(shared_run, tmp_path)
    increc("run", "--data", str(data), "--work", str(work), "--span", "4", "--no-progress", "--config", str(flipped))
    record = history(work)[-1]
    assert record["span"] == 4 and record["status"] == "ok"
    assert record["candidate_auc"] < record["baseline_auc"] - 0.002
    assert record["blessed"] is False and record["pushed_version"] is None
    assert _serving_state(work) == before
    saved = json.loads((work / "config.json").read_text())
    assert "flip_train_labels" not in saved, "a one-off switch must not stick to the work directory"
    # The paired gate refused it: worse with confidence, the whole 99% interval below 0.
    gate = record["gate"]
    assert gate["compared"] and gate["blessed"] is False and gate["paired_blessed"] is False
    assert gate["confidence"] == 0.99 and gate["margin"] == pytest.approx(0.02)
    assert gate["indifference"] == pytest.approx(0.004)  # the flipped run's own setting (default 0.005)
    assert gate["reason"].startswith("below min_auc") and "worse by more than 0.004 with confidence" in gate["reason"]
    assert gate["lower"] <= gate["difference"] <= gate["upper"] < 0
    assert gate["p_value"] < 0.01
    assert gate["difference"] == pytest.approx(gate["candidate_auc"] - gate["baseline_auc"])
    assert (record["candidate_auc"], record["baseline_auc"]) == (gate["candidate_auc"], gate["baseline_auc"])
    table = increc("history", "--work", str(work)).stdout
    interval = f"{gate['difference']:+.4f} [{gate['lower']:+.4f}, {gate['upper']:+.4f}]"
    assert "gate_difference" in table.splitlines()[0] and interval in table
    assert f"span 4: gate 99% interval {interval}: {gate['reason']}" in table


def test_a_rejected_span_is_trained_on_by_the_next_candidate(shared_run, tmp_path):
    """Span 4's candidate is refused; the run of span 5 warm-starts from span 3's version and trains on 4 and 5."""
    data, work = shared_run["data"], shared_run["work"]
    last = history(work)[-1]
    if not (last["span"] == 4 and last["status"] == "ok" and not last["blessed"]):
        flipped = flipped_config(shared_run, tmp_path)
        increc("run", "--data", str(data), "--work", str(work), "--span", "4", "--no-progress", "--config", str(flipped))
        assert history(work)[-1]["blessed"] is False
    rejected = history(work)[-1]
    serving = model_config.read_deployment(str(work / "serving" / "models.config"), "increc").stable
    result = increc("run", "--data", str(data), "--work", str(work), "--span", "5", "--no-progress",
                    "--config", str(shared_run["config"]))
    record = history(work)[-1]
    assert record["span"] == 5 and record["status"] == "ok" and record["mode"] == "incremental"
    assert record["caught_up_spans"] == [4]
    assert record["live_version"] == serving
    train_rows = {s: r["rows"] - max(1, round(r["rows"] * 0.1)) for s, r in ((4, rejected), (5, record))}
    assert record["caught_up_examples"] == train_rows[4]
    assert record["examples_trained"] == train_rows[4] + train_rows[5] > rejected["examples_trained"]
    assert "(with span 4)" in result.stdout
    lines = increc("history", "--work", str(work)).stdout.splitlines()
    column = lines[0].index("caught_up")
    span_5 = [line for line in lines if line.startswith("5 ") and "incremental" in line][-1]
    assert span_5[column:].split()[0] == "4"


def test_gate_decision_on_real_scores(shared_run):
    """The gate's rule on what the pushed versions score on span 3's eval rows (models/statistics.py's DeLong)."""
    from components.paired_gate import paired_decision, score_rows

    work = shared_run["work"]
    records = [r for r in history(work) if r["span"] <= TEST_SPANS and r.get("pushed_version")]
    assert len(records) >= 2
    old, new = (str(work / "serving" / "increc" / str(r["pushed_version"])) for r in records[-2:])
    examples = sorted((work / "pipeline" / "SpanExampleGen" / "examples").iterdir(), key=lambda p: int(p.name))
    eval_rows = [str(examples[TEST_SPANS - 1] / "Split-eval" / "*")]
    labels, candidate, baseline = score_rows(eval_rows, new, old)
    assert len(labels) == len(candidate) == len(baseline) > 100
    # Two real models on the same rows: the decision is DeLong's with the configured level and margin.
    from models.statistics import decide, delong
    gate = paired_decision(labels, candidate, baseline, 0.99, 0.02)
    expected = decide(delong(labels, candidate, baseline, 0.99), 0.99, 0.02)
    assert gate["blessed"] == expected.blessed and gate["reason"] == expected.reason
    assert gate["lower"] < gate["difference"] < gate["upper"] and gate["compared"]
    # The same model against itself: no difference, blessed.
    same = paired_decision(labels, candidate, candidate, 0.99, 0.02)
    assert same["blessed"] and same["difference"] == 0 and same["reason"].startswith("not shown worse")
    # Its scores reversed (a flipped model): worse by more than the margin (with AUCs this close to chance,
    # not necessarily with 99% confidence on 150 rows).
    flipped = paired_decision(labels, 1 - candidate, candidate, 0.99, 0.02)
    assert not flipped["blessed"] and "by more than the margin 0.02" in flipped["reason"]
    assert flipped["difference"] == pytest.approx(1 - 2 * gate["candidate_auc"])
    # TFMA's value threshold refused: never blessed, whatever the paired test says.
    below = paired_decision(labels, candidate, candidate, 0.99, 0.02, value_blessed=False)
    assert not below["blessed"] and below["paired_blessed"] and below["reason"].startswith("below min_auc")
    # Nothing serving: only TFMA's verdict.
    first = paired_decision(labels, candidate, None, 0.99, 0.02)
    assert first["blessed"] and not first["compared"] and first["reason"] == "no serving model to compare with"


def test_full_mode_retrains_from_scratch_on_every_span(shared_run):
    data, work = shared_run["data"], shared_run["work"]
    increc("run", "--data", str(data), "--work", str(work), "--span", "5", "--mode", "full", "--no-progress",
           "--config", str(shared_run["config"]))
    record = history(work)[-1]
    assert record["span"] == 5 and record["mode"] == "full" and record["status"] == "ok"
    assert record["warm_started_from"] is None
    # The train splits of every span up to 5 that was ingested (the newest ingestion of each).
    rows = {r["span"]: r["rows"] for r in history(work) if r["span"] <= 5 and r.get("rows")}
    assert set(rows) >= {1, 2, 3, 5}
    assert record["examples_trained"] == sum(n - max(1, round(n * 0.1)) for n in rows.values())
    # The feature snapshot is folded span by span, so recommend's popularity decays as an incremental
    # run's would: each span's interactions weigh popularity_decay per span since.
    snapshot = FeatureSnapshot.load(str(work / "features" / "after-span-5"), [], [], {})
    decay = TrainingSettings().popularity_decay
    expected: dict = {}
    for span in rows:
        with open(data / f"span-{span}" / "interactions.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["timestamp"].isdigit():  # span 1's malformed row is dropped
                    expected[row["item_id"]] = expected.get(row["item_id"], 0.0) + decay ** (5 - span)
    recent = dict(zip((i.decode() for i in snapshot.items.ids()), snapshot.items.recent.tolist()))
    assert recent.keys() == expected.keys()
    assert all(abs(recent[i] - expected[i]) < 1e-9 for i in expected)


def test_recent_items_reach_the_model_when_the_setting_is_on(tmp_path):
    # Prepared data carries user_recent_items; with recent_items on, Transform gives it a vocabulary and
    # the pushed version's score moves with the recent items a request sends.
    data, work, config = tmp_path / "data", tmp_path / "work", tmp_path / "config.json"
    increc("prepare", "--format", "synthetic", "--rows", "6000", "--users", "300", "--items", "200", "--seed", "3",
           "--days", "4", "--spans", "2", "--out", str(data))
    config.write_text(json.dumps(dict(TEST_CONFIG, recent_items=True)))
    increc("backfill", "--data", str(data), "--work", str(work), "--spans", "1-2", "--config", str(config),
           "--no-progress")
    records = history(work)
    assert [r["status"] for r in records] == ["ok", "ok"] and records[1]["warm_started_from"]
    vocabulary = (work / "vocab" / "after-span-2" / f"{F.USER_RECENT_ITEMS}.vocab").read_text().splitlines()
    assert len(vocabulary) > 100
    version = DeploymentState(str(work / "serving"), "increc").current().stable
    score = tf.saved_model.load(str(work / "serving" / "increc" / str(version))).signatures["serving_default"]
    # Every other input empty or NaN: "the snapshot's value", as TF Serving fills what a request leaves out.
    inputs = {name: tf.fill([2], "" if spec.dtype == tf.string else float("nan"))
              for name, spec in score.structured_input_signature[1].items()}
    items = vocabulary[:20]
    inputs.update(user_id=tf.constant(["u1", "u1"]), item_id=tf.constant(["i1", "i1"]),
                  user_recent_items=tf.constant(["|".join(items[:10]), "|".join(items[10:])]))
    p = score(**inputs)["probability"].numpy()
    assert p[0] != p[1]


def test_kubeflow_spec_compiles_and_names_every_component(shared_run, tmp_path):
    out = tmp_path / "increc.json"
    increc("compile", "--target", "kubeflow", "--work", str(shared_run["work"]), "--data", str(shared_run["data"]),
           "--output", str(out), "--image", "registry.example/increc:test")
    spec = json.loads(out.read_text())
    tasks = set(spec["pipelineSpec"]["root"]["dag"]["tasks"])
    assert tasks == {"SpanExampleGen", "ImportSchemaGen", "ExampleValidator", "DeploymentGuard",
                     "Transform", "Trainer", "Evaluator", "PairedGate", "ServingPusher"}
    images = {e["container"]["image"] for e in spec["pipelineSpec"]["deploymentSpec"]["executors"].values()
              if "container" in e}
    assert images == {"registry.example/increc:test"}


def test_live_aucs_of_a_large_span_come_from_a_repeatable_uniform_sample(shared_run):
    from components.deployment_guard import live_scores
    from models.records import count_records
    from serving.model_config import STABLE

    work = shared_run["work"]
    state = DeploymentState(str(work / "serving"), "increc")
    examples = sorted((work / "pipeline" / "SpanExampleGen" / "examples").iterdir(), key=lambda p: int(p.name))[-1]
    patterns = [str(split / "*") for split in examples.glob("Split-*")]
    versions = [("live_auc", STABLE, state.current().stable)]
    total = count_records(patterns)

    whole, labels, _ = live_scores(state, versions, patterns)
    assert whole["examples"] == total == len(labels) and not whole["sampled"]
    cap = total // 4
    first, sample, scores = live_scores(state, versions, patterns, max_rows=cap, seed=3)
    again, same, same_scores = live_scores(state, versions, patterns, max_rows=cap, seed=3)
    assert first["sampled"] and 0.5 * cap < first["examples"] < 1.5 * cap
    assert len(sample) == first["examples"] and 0 < sample.mean() < 1, "both classes in the sample"
    np.testing.assert_array_equal(sample, same)
    np.testing.assert_array_equal(scores["live_auc"], same_scores["live_auc"])
    assert first["live_auc"] == again["live_auc"] and abs(first["live_auc"] - whole["live_auc"]) < 0.1
