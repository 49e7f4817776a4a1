"""What one pipeline run measured and decided, read back from MLMD and the artifacts.

Artifacts are found through the run's `pipeline_run` context; an artifact's
URI is `<pipeline_root>/<node_id>/<output_key>/<execution_id>`, which tells
which component produced it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import tensorflow as tf
from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2

from pipeline.config import IncrecConfig

OVERALL = ()


def _store(config: IncrecConfig) -> metadata_store.MetadataStore:
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = config.metadata_path
    connection.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(connection)


def _custom(artifact, key: str):
    if artifact is None or key not in artifact.custom_properties:
        return None
    value = artifact.custom_properties[key]
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _artifact_json(artifact, name: str):
    """A JSON file a component left in its output artifact, or None."""
    if artifact is None:
        return None
    path = os.path.join(artifact.uri, name)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _artifacts_of_run(store, run, root: str) -> Dict[Tuple[str, str], Any]:
    """{(node_id, output_key): newest LIVE artifact} of one pipeline_run context."""
    found: Dict[Tuple[str, str], Any] = {}
    for artifact in store.get_artifacts_by_context(run.id):
        if artifact.state != metadata_store_pb2.Artifact.LIVE or not artifact.uri.startswith(root):
            continue
        parts = artifact.uri[len(root):].split("/")
        if len(parts) < 3:
            continue
        key = (parts[0], parts[1])
        if key not in found or artifact.id > found[key].id:
            found[key] = artifact
    return found


def _run_started_at(config: IncrecConfig, started: float):
    """(store, the first pipeline_run context that began after `started`), or (None, None)."""
    if not os.path.exists(config.metadata_path):
        return None, None
    store = _store(config)
    runs = [c for c in store.get_contexts_by_type("pipeline_run")
            if c.create_time_since_epoch >= int(started * 1000) - 1000]
    if not runs:
        return store, None
    return store, min(runs, key=lambda c: c.create_time_since_epoch)


def run_artifacts(config: IncrecConfig, started: float) -> Dict[Tuple[str, str], Any]:
    """{(node_id, output_key): newest LIVE artifact} of the run that began at `started`."""
    store, run = _run_started_at(config, started)
    if run is None:
        return {}
    return _artifacts_of_run(store, run, config.pipeline_root.rstrip("/") + "/")


def artifacts_by_span(config: IncrecConfig) -> Dict[int, Dict[Tuple[str, str], Any]]:
    """{span: artifacts of the newest run that ingested it} over the whole work directory (benchmarks)."""
    if not os.path.exists(config.metadata_path):
        return {}
    store = _store(config)
    root = config.pipeline_root.rstrip("/") + "/"
    by_span: Dict[int, Dict[Tuple[str, str], Any]] = {}
    for run in sorted(store.get_contexts_by_type("pipeline_run"), key=lambda c: c.create_time_since_epoch):
        artifacts = _artifacts_of_run(store, run, root)
        span = _custom(artifacts.get(("SpanExampleGen", "examples")), "span")
        if span is not None:
            by_span[int(span)] = artifacts
    return by_span


def component_windows(config: IncrecConfig, started: float) -> Dict[str, Tuple[float, float]]:
    """{component: (start, end) epoch seconds} of the run that began at `started`, from MLMD execution times."""
    store, run = _run_started_at(config, started)
    if run is None:
        return {}
    executions = store.get_executions_by_context(run.id)
    types = {t.id: t.name for t in store.get_execution_types_by_id(list({e.type_id for e in executions}))}
    windows: Dict[str, Tuple[float, float]] = {}
    for execution in executions:
        node = types.get(execution.type_id, str(execution.type_id)).rsplit(".", 1)[-1]
        windows[node] = (execution.create_time_since_epoch / 1000, execution.last_update_time_since_epoch / 1000)
    return windows


def component_seconds(config: IncrecConfig, started: float) -> Dict[str, float]:
    """{component: seconds} of the run that began at `started`."""
    return {node: round(end - start, 3) for node, (start, end) in component_windows(config, started).items()}


def evaluator_aucs(evaluation_uri: str) -> Tuple[Optional[float], Optional[float], Dict[str, Any]]:
    """(candidate AUC, baseline AUC, other overall and per-slice metrics) from the Evaluator output."""
    import tensorflow_model_analysis as tfma

    candidate = baseline = None
    metrics: Dict[str, Any] = {}
    for per_slice in tfma.load_metrics(evaluation_uri):
        slice_key = tfma.slicer.deserialize_slice_key(per_slice.slice_key)
        slice_name = "overall" if slice_key == OVERALL else ",".join(f"{k}={v}" for k, v in slice_key)
        for kv in per_slice.metric_keys_and_values:
            key = kv.key
            if key.is_diff:
                continue
            if not kv.value.HasField("double_value"):
                continue
            value = kv.value.double_value.value
            model = key.model_name or "candidate"
            metrics.setdefault(slice_name, {}).setdefault(model, {})[key.name] = value
            if slice_key == OVERALL and key.name == "auc":
                if model == "baseline":
                    baseline = value
                else:
                    candidate = value
    return candidate, baseline, metrics


def collect(config: IncrecConfig, span: int, started: float) -> Dict[str, Any]:
    """The history record of the newest run of `span` (fields of DESIGN.md's report, plus detail)."""
    from components.deployment_guard import REPORT_FILE
    from components.paired_gate import GATE_FILE
    from models.trainer import SUMMARY_FILE

    artifacts = run_artifacts(config, started)
    get = artifacts.get
    record: Dict[str, Any] = {
        "span": span, "mode": config.mode, "time": round(started, 3), "status": "ok",
        "live_auc": None, "previous_auc": None, "candidate_auc": None, "baseline_auc": None,
        "blessed": False, "pushed_version": None, "rolled_back": False, "serving_version": None,
        "examples_trained": 0, "train_seconds": 0.0, "run_seconds": 0.0,
    }
    examples = get(("SpanExampleGen", "examples"))
    if examples is not None:
        record["rows"] = _custom(examples, "rows")
        record["bad_rows"] = _custom(examples, "bad_rows")

    report = _artifact_json(get(("DeploymentGuard", "live_evaluation")), REPORT_FILE)
    if report is not None:
        record.update(live_auc=report.get("live_auc"), previous_auc=report.get("previous_auc"),
                      serving_version=report.get("serving_version"),
                      live_version=report.get("rolled_back_version", report.get("serving_version")),
                      previous_version=report.get("previous_version"),
                      rolled_back=bool(report.get("rolled_back")),
                      live_measured_by=report.get("measured_by"))
        if report.get("rolled_back"):
            record.update(rolled_back_version=report["rolled_back_version"],
                          restored_version=report["restored_version"])
        if report.get("rollback_test") is not None:
            record["rollback_test"] = report["rollback_test"]
        for key in ("live_auc_logged_features", "feature_lookup_gap", "ranking"):
            if report.get(key) is not None:
                record[key] = report[key]

    model = get(("Trainer", "model"))
    summary = _artifact_json(model, SUMMARY_FILE)
    if summary is not None:
        record.update(candidate_model=os.path.join(model.uri, "Format-Serving"),
                      examples_trained=summary["examples_trained"],
                      train_seconds=round(summary["train_seconds"], 3),
                      replayed_examples=summary["replayed_examples"],
                      warm_started_from=summary["warm_started_from"],
                      caught_up_spans=summary.get("caught_up_spans", []),
                      caught_up_examples=summary.get("caught_up_examples", 0))

    evaluation = get(("Evaluator", "evaluation"))
    if evaluation is not None:
        candidate, baseline, metrics = evaluator_aucs(evaluation.uri)
        record.update(candidate_auc=candidate, baseline_auc=baseline, metrics=metrics)
    blessing = get(("Evaluator", "blessing"))
    if blessing is not None:
        record["blessed"] = _custom(blessing, "blessed") == 1
    # The PairedGate's verdict is what the Pusher acted on; its AUCs are exact and on the same rows.
    gate_blessing = get(("PairedGate", "blessing"))
    gate = _artifact_json(gate_blessing, GATE_FILE)
    if gate_blessing is not None:
        record["blessed"] = _custom(gate_blessing, "blessed") == 1
    if gate is not None:
        record["gate"] = gate
        if gate.get("compared"):
            record.update(candidate_auc=gate["candidate_auc"], baseline_auc=gate["baseline_auc"])

    pushed = get(("ServingPusher", "pushed_model"))
    if pushed is not None and _custom(pushed, "pushed") == 1:
        record["pushed_version"] = _custom(pushed, "pushed_version")
        record["serving_version"] = record["pushed_version"]
        record["forced_push"] = bool(_custom(pushed, "forced"))
    elif pushed is not None and _custom(pushed, "already_pushed_version") is not None:
        # An earlier, stopped run of this span had pushed it: that version is the span's push.
        record["pushed_version"] = _custom(pushed, "already_pushed_version")
        record["serving_version"] = record["pushed_version"]
        record["pushed_by_earlier_run"] = True
    record["finished"] = round(time.time(), 3)
    return record
