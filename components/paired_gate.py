"""PairedGate: blesses a candidate only when it is not shown worse than the model serving now.

TFMA's Evaluator compares two AUCs as two numbers: on ~1,000 eval rows, where
an AUC's standard error is ~0.015, a fixed tolerance of a few thousandths
refuses good candidates and passes bad ones by chance. This gate scores the
same eval rows with both models and applies DeLong's paired test
(models/statistics.py), which accounts for the sample size and for the
correlation of two models scoring the same rows:

- not blessed when the candidate is worse by more than `indifference`
  (`gate_indifference`) with `confidence` (the one-sided upper bound of
  candidate - serving AUC is below -indifference), or worse by more than
  `margin` (`auc_tolerance`) whatever the evidence;
- not blessed when TFMA's value threshold did not bless (`min_auc`: better
  than chance);
- on the first span (nothing serving) TFMA's verdict alone decides.

It writes `gate.json` (both AUCs, the difference, its interval, the
p-value, level, margin and a one-line reason) into its ModelBlessing, which
the ServingPusher reads.
"""

import json
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from models import export
from models.records import iter_record_batches
from models.statistics import decide, delong

GATE_FILE = "gate.json"
SCORE_BATCH = 8192  # rows per scoring call; only labels and scores are kept


def saved_model_dir(model: standard_artifacts.Model) -> Optional[str]:
    """The SavedModel in a Model artifact, or None (the DeploymentGuard's is empty when nothing serves)."""
    path = os.path.join(model.uri, "Format-Serving")
    return path if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")) else None


def score_rows(patterns, candidate_dir: str, baseline_dir: Optional[str]
               ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(labels, candidate scores, baseline scores or None) of the rows, streamed batch by batch."""
    candidate = tf.saved_model.load(candidate_dir).signatures["regress"]
    baseline = tf.saved_model.load(baseline_dir).signatures["regress"] if baseline_dir else None
    labels, scores_a, scores_b = [], [], []
    for batch in iter_record_batches(patterns, SCORE_BATCH):
        records = tf.constant(batch)
        labels.append(export.labels(batch).astype(np.int8))
        scores_a.append(candidate(inputs=records)["outputs"].numpy().ravel())
        if baseline is not None:
            scores_b.append(baseline(inputs=records)["outputs"].numpy().ravel())
    if not labels:
        return np.zeros(0, np.int8), np.zeros(0, np.float32), (np.zeros(0, np.float32) if baseline else None)
    return (np.concatenate(labels), np.concatenate(scores_a),
            np.concatenate(scores_b) if baseline is not None else None)


def paired_decision(labels, candidate_scores, baseline_scores, confidence: float, margin: float,
                    value_blessed: bool = True, indifference: float = 0.0) -> dict:
    """The gate's verdict as the JSON it writes: candidate (a) against the serving model (b) on the same rows.

    `baseline_scores` None: nothing serves, so only TFMA's value threshold
    (`value_blessed`) decides. The interval is two-sided at `confidence`; the
    rule uses the one-sided bound at `confidence` (models/statistics.decide).
    """
    out = {"confidence": confidence, "margin": margin, "indifference": indifference, "value_blessed": bool(value_blessed), "rows": int(len(labels)),
           "candidate_auc": None, "baseline_auc": None, "difference": None, "se": None, "lower": None,
           "upper": None, "p_value": None, "compared": False}
    if baseline_scores is None:
        paired_ok, reason = True, "no serving model to compare with"
    else:
        comparison = delong(labels, candidate_scores, baseline_scores, confidence)
        decision = decide(comparison, confidence, margin, indifference)
        paired_ok, reason = decision.blessed, decision.reason
        if comparison is not None:
            out.update(candidate_auc=comparison.auc_a, baseline_auc=comparison.auc_b,
                       difference=comparison.difference, se=comparison.se, lower=comparison.lower,
                       upper=comparison.upper, p_value=comparison.p_value, compared=True)
    if not value_blessed:
        reason = f"below min_auc (TFMA value threshold); {reason}"
    out.update(blessed=bool(value_blessed and paired_ok), paired_blessed=bool(paired_ok), reason=reason)
    return out


@component
def PairedGate(
    examples: InputArtifact[standard_artifacts.Examples],
    model: InputArtifact[standard_artifacts.Model],
    baseline_model: InputArtifact[standard_artifacts.Model],
    value_blessing: InputArtifact[standard_artifacts.ModelBlessing],
    blessing: OutputArtifact[standard_artifacts.ModelBlessing],
    confidence: Parameter[float],
    margin: Parameter[float],
    indifference: Parameter[float],
) -> None:
    candidate_dir = saved_model_dir(model)
    if candidate_dir is None:
        raise ValueError(f"the candidate model {model.uri} holds no SavedModel (Format-Serving/saved_model.pb)")
    patterns = [os.path.join(artifact_utils.get_split_uri([examples], "eval"), "*")]
    labels, scores_a, scores_b = score_rows(patterns, candidate_dir, saved_model_dir(baseline_model))
    value_blessed = value_blessing.get_int_custom_property("blessed") == 1
    gate = paired_decision(labels, scores_a, scores_b, confidence, margin, value_blessed, indifference)
    gate["span"] = examples.get_int_custom_property("span")
    with tf.io.gfile.GFile(os.path.join(blessing.uri, GATE_FILE), "w") as f:
        json.dump(gate, f, indent=2)
    # The marker files and properties TFX's own Evaluator leaves, so stock consumers read it too.
    with tf.io.gfile.GFile(os.path.join(blessing.uri, "BLESSED" if gate["blessed"] else "NOT_BLESSED"), "w") as f:
        f.write("")
    blessing.set_int_custom_property("blessed", int(gate["blessed"]))
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    blessing.set_string_custom_property("reason", gate["reason"])
