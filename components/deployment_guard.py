"""DeploymentGuard: the step between data validation and training.

1. Stops the run when ExampleValidator found anomalies in span N: nothing is
   trained or pushed, and the error names every anomaly.
2. Measures, on span N (fresh data neither model has seen), the AUC of the
   version serving now (`stable`) and of the retained `previous` version.
   This live AUC is the honest, prequential quality of the system. When a
   server is reachable it is measured through gRPC Predict on the `stable`
   and `previous` labels with raw features, as clients call it, so serving
   skew shows too; otherwise from the SavedModels on disk.
3. Rolls back when the serving version's live AUC is below the previous
   version's with confidence (DeLong's paired test on the same rows at
   `rollback_confidence`) or by more than `rollback_tolerance`: `stable`
   returns to the previous version and the bad one is unloaded and marked
   (MLMD, history, the serving directory).
4. Hands the model serving now (after any rollback) to Trainer (warm start)
   and PairedGate (the model the candidate must not be worse than) as a Model
   artifact, so both follow what really serves rather than the newest
   blessed model.
"""

import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import types
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts
from tfx.utils import io_utils

from components import live_ranking
from components.deployment import DeploymentState
from models import features as F
from models import export
from models.records import count_records, iter_record_batches
from models.metrics import auc
from models.statistics import decide, delong
from serving.model_config import PREVIOUS, STABLE, Deployment

REPORT_FILE = "live_evaluation.json"
LIVE_BATCH = 8192  # rows per scoring call (one gRPC Predict of ~1 MB when a server is up)


class LiveEvaluation(types.Artifact):
    """AUC of the deployed versions on a span they have not seen."""

    TYPE_NAME = "increc.LiveEvaluation"  # namespace.Type, as Kubeflow v2 requires


class DataAnomaliesError(RuntimeError):
    """Span N broke the curated schema; the run stops before training."""


def anomaly_messages(anomalies: types.Artifact) -> List[str]:
    """Readable lines for every anomaly ExampleValidator recorded, by split."""
    lines = []
    for split in artifact_utils.decode_split_names(anomalies.split_names):
        path = os.path.join(anomalies.uri, f"Split-{split}", "SchemaDiff.pb")
        if not tf.io.gfile.exists(path):
            continue
        result = anomalies_pb2.Anomalies.FromString(io_utils.read_bytes_file(path))
        for feature, info in sorted(result.anomaly_info.items()):
            reasons = "; ".join(r.description or r.short_description for r in info.reason)
            lines.append(f"split {split}, column '{feature}': {info.short_description}: {reasons or info.description}")
        if result.HasField("dataset_anomaly_info"):
            info = result.dataset_anomaly_info
            lines.append(f"split {split}, dataset: {info.short_description}: {info.description}")
    return lines


def example_patterns(examples: types.Artifact) -> List[str]:
    """File patterns of every split of an Examples artifact."""
    return [os.path.join(artifact_utils.get_split_uri([examples], split), "*")
            for split in artifact_utils.decode_split_names(examples.split_names)]


def server_scorer(client, model_name: str, label: str, categorical, numeric, ids_only: bool = True):
    """Click probabilities from gRPC Predict on a version label, for (records, users, items) of a batch. With
    `ids_only`, the request carries only the ids and the version looks the features up in its snapshot, as a
    client calling with ids alone gets them; a version without a snapshot (pushed before there was one) is
    sent the logged features."""
    import grpc

    logged = {"on": not ids_only}

    def score(records: List[bytes], users: np.ndarray, items: np.ndarray) -> np.ndarray:
        if not logged["on"]:
            try:
                out = client.predict(model_name, {F.USER_ID: users, F.ITEM_ID: items}, label=label)
                return np.asarray(out["probability"]).ravel()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                logged["on"] = True
        inputs = export.serving_inputs(records, categorical, numeric)
        return np.asarray(client.predict(model_name, inputs, label=label)["probability"]).ravel()
    return score


def saved_model_scorer(signatures, ids_only: bool = True):
    """Click probabilities from a loaded SavedModel's signatures, for (records, users, items) of a batch."""
    if ids_only and "recommend" in signatures:  # a version with a feature snapshot
        def score(records, users, items):
            out = export.call_signature(signatures["serving_default"], user_id=tf.constant(users),
                                        item_id=tf.constant(items))
            return out["probability"].numpy().ravel()
        return score
    regress = signatures["regress"]
    return lambda records, users, items: regress(inputs=tf.constant(records))["outputs"].numpy().ravel()


class LoadedVersions:
    """Each version's SavedModel signatures, loaded once for everything one guard run scores with them."""

    def __init__(self, state: DeploymentState):
        self.state, self._loaded = state, {}

    def __call__(self, version: int):
        if version not in self._loaded:
            self._loaded[version] = tf.saved_model.load(self.state.version_dir(version)).signatures
        return self._loaded[version]


def live_scores(state: DeploymentState, versions: List[tuple], patterns: List[str], client=None, categorical=(),
                numeric=(), max_rows: Optional[int] = None, seed: int = 0,
                positives: Optional[live_ranking.PositiveSample] = None,
                loaded: Optional[LoadedVersions] = None):
    """(report, labels, {name: scores}): the AUC on the span of each (name, server label, version[, ids_only]),
    scored batch by batch as the records stream past.

    Only labels and scores (numbers) are kept, never the span's examples (and,
    with `positives`, the positives of a bounded sample of users). A span of
    more than `max_rows` rows is measured on a uniform sample of about that
    many, drawn with `seed` (the span), so a rerun measures the same rows.
    """
    out: Dict[str, Optional[float]] = {"measured_by": "server" if client is not None else "saved_model"}
    scorers = {}
    loaded = loaded or LoadedVersions(state)
    for name, label, version, *mode in versions:
        ids_only = mode[0] if mode else True
        out[name] = None
        if state.version_dir(version) is not None:
            scorers[name] = (server_scorer(client, state.model_name, label, categorical, numeric, ids_only)
                             if client is not None else saved_model_scorer(loaded(version), ids_only))
    labels, scores = [], {name: [] for name in scorers}
    rows = 0
    span_rows = count_records(patterns) if max_rows else 0
    keep = min(1.0, max_rows / span_rows) if span_rows else 1.0
    rng = np.random.default_rng(seed)
    for batch in iter_record_batches(patterns, LIVE_BATCH):
        users, items, batch_labels = export.ids_and_labels(batch)  # parsed once for every use below
        if positives is not None:
            positives.add(users, items, batch_labels)
        if keep < 1.0:
            picked = np.flatnonzero(rng.random(len(batch)) < keep)
            if not len(picked):
                continue
            batch = [batch[i] for i in picked]
            users, items, batch_labels = users[picked], items[picked], batch_labels[picked]
        labels.append(batch_labels.astype(np.int8))
        for name, score in scorers.items():
            scores[name].append(score(batch, users, items).astype(np.float32))
        rows += len(batch)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    all_scores = {name: np.concatenate(parts) for name, parts in scores.items() if parts}
    for name in scorers:
        out[name] = auc(all_labels, all_scores[name]) if labels else None
    out["examples"] = rows
    out["sampled"] = keep < 1.0
    return out, all_labels, all_scores


def live_ranking_of(state: DeploymentState, version: int, label: str, client,
                    positives: live_ranking.PositiveSample, loaded: LoadedVersions) -> Optional[dict]:
    """Top-K metrics of `recommend` of the serving version on span N's positives (None: it has no recommend)."""
    import grpc

    if client is not None:
        recommend = live_ranking.server_recommender(client, state.model_name, label)
    else:
        recommend = live_ranking.saved_model_recommender(loaded(version))
        if recommend is None:
            return None
    try:
        return live_ranking.evaluate(recommend, positives)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
            return None  # a version pushed before `recommend` existed
        raise


def rollback_test(labels: np.ndarray, stable_scores: np.ndarray, previous_scores: np.ndarray,
                  confidence: float, margin: float) -> dict:
    """DeLong's paired test of the serving version (a) against the previous one (b) on the same live rows.

    `roll_back` is true when `stable` is worse with `confidence` or by more
    than `margin`: the gate's rule (models/statistics.decide), so a version
    is not rolled back on noise, nor kept when it is clearly worse.
    """
    comparison = delong(labels, stable_scores, previous_scores, confidence)
    decision = decide(comparison, confidence, margin)
    test = {"confidence": confidence, "margin": margin, "roll_back": not decision.blessed,
            "reason": decision.reason, "difference": None, "se": None, "lower": None, "upper": None,
            "p_value": None}
    if comparison is not None:
        test.update(difference=comparison.difference, se=comparison.se, lower=comparison.lower,
                    upper=comparison.upper, p_value=comparison.p_value)
    return test


def reachable_client(address: str):
    from serving.client import ServingClient

    client = ServingClient(address, timeout=60.0)
    if client.is_reachable(wait=2.0):
        return client
    client.close()
    return None


def guard(examples, anomalies, schema_path: str, state: DeploymentState, rollback_tolerance: float,
          rollback_confidence: float = 0.99, max_live_rows: Optional[int] = None) -> dict:
    """Everything the component does, as a plain function; returns the live-evaluation report.

    `serving_version`/`previous_version`: what served when the span arrived,
    the model the run warm-starts from and gates against. `deployed_stable`/
    `deployed_previous`: models.config as this run leaves it (after any
    rollback); the ServingPusher pushes only if it still says so. A rerun of a
    span whose earlier run was stopped after its push finds that push as
    `stable` (`already_pushed_version`): the run then measures and trains from
    the version before it, and the Pusher does not push the span twice.
    """
    problems = anomaly_messages(anomalies)
    span = examples.get_int_custom_property("span")
    if problems:
        raise DataAnomaliesError(
            f"span {span} does not match the schema; nothing was trained or pushed:\n  " + "\n  ".join(problems))

    deployment = state.current()
    stable = deployment.stable if deployment is not None else None
    previous = deployment.previous if deployment is not None else None
    report = {"span": span, "serving_version": None, "previous_version": None, "live_auc": None,
              "previous_auc": None, "examples": 0, "rolled_back": False, "deployed_stable": stable,
              "deployed_previous": previous, "already_pushed_version": None}
    if stable is not None and state.pushed_span(stable) == span:
        report["already_pushed_version"] = stable
        versions = [("live_auc", PREVIOUS, previous)] if previous is not None else []
        serving, before = previous, None
    else:
        versions = [("live_auc", STABLE, stable), ("previous_auc", PREVIOUS, previous)] if stable is not None else []
        serving, before = stable, previous
    if not versions:
        return report
    categorical, numeric = F.split_columns(tfdv.load_schema_text(schema_path))
    client = reachable_client(state.serving_address) if state.serving_address else None
    # The serving version once more with the features the log carries: how far ids-only lookups fall behind.
    serving_label = versions[0][1]
    versions = versions + [("live_auc_logged_features", serving_label, serving, False)]
    positives = live_ranking.PositiveSample()
    loaded = LoadedVersions(state)
    try:
        measured, labels, scores = live_scores(state, versions, example_patterns(examples), client, categorical,
                                               numeric, max_live_rows, seed=span, positives=positives,
                                               loaded=loaded)
        report.update(measured)
        report["ranking"] = live_ranking_of(state, serving, serving_label, client, positives, loaded)
    finally:
        if client is not None:
            client.close()
    if report["live_auc"] is not None and report["live_auc_logged_features"] is not None:
        report["feature_lookup_gap"] = report["live_auc_logged_features"] - report["live_auc"]
    report.update(serving_version=serving, previous_version=before)
    live, previous_auc = report["live_auc"], report["previous_auc"]
    if "live_auc" in scores and "previous_auc" in scores:
        test = rollback_test(labels, scores["live_auc"], scores["previous_auc"], rollback_confidence,
                             rollback_tolerance)
        report["rollback_test"] = test
        if test["roll_back"]:
            done = state.roll_back(reason="live AUC regressed", expected=deployment, span=span, live_auc=live,
                                   previous_auc=previous_auc, test=test["reason"])
            logging.warning("span %s: version %d rolled back to version %d: %s (%s)", span, done.bad_version,
                            done.restored_version, test["reason"], done.server)
            report.update(rolled_back=True, rolled_back_version=done.bad_version,
                          restored_version=done.restored_version, serving_version=done.restored_version,
                          deployed_stable=done.restored_version, deployed_previous=None)
    return report


def resolved_deployment(state: DeploymentState, report: dict) -> Optional[Deployment]:
    """models.config as the guard left it (None: nothing deployed): what the Pusher may push onto."""
    stable, previous = report.get("deployed_stable"), report.get("deployed_previous")
    if stable is None:
        return None
    labels = {STABLE: stable, **({PREVIOUS: previous} if previous is not None else {})}
    return Deployment(state.model_name, state.base_path, sorted(set(labels.values()), reverse=True), labels)


@component
def DeploymentGuard(
    examples: InputArtifact[standard_artifacts.Examples],
    anomalies: InputArtifact[standard_artifacts.ExampleAnomalies],
    schema: InputArtifact[standard_artifacts.Schema],
    serving_model: OutputArtifact[standard_artifacts.Model],
    live_evaluation: OutputArtifact[LiveEvaluation],
    serving_dir: Parameter[str],
    model_name: Parameter[str],
    serving_address: Parameter[str],
    rollback_tolerance: Parameter[float],
    rollback_confidence: Parameter[float],
    max_live_rows: Parameter[int],
) -> None:
    state = DeploymentState(serving_dir, model_name, serving_address)
    report = guard(examples, anomalies, os.path.join(schema.uri, "schema.pbtxt"), state, rollback_tolerance,
                   rollback_confidence, max_live_rows)
    stable_dir = state.version_dir(report["serving_version"])
    if stable_dir:
        io_utils.copy_dir(stable_dir, os.path.join(serving_model.uri, "Format-Serving"))

    for key, value in report.items():
        if value is None or isinstance(value, dict):  # the rollback test is in the JSON report
            continue
        if isinstance(value, bool):
            live_evaluation.set_int_custom_property(key, int(value))
        elif isinstance(value, str):
            live_evaluation.set_string_custom_property(key, value)
        elif isinstance(value, float):
            live_evaluation.set_float_custom_property(key, value)
        else:
            live_evaluation.set_int_custom_property(key, int(value))
    with tf.io.gfile.GFile(os.path.join(live_evaluation.uri, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
