"""The per-span timeline in TensorBoard (`WORK/tensorboard/timeline`): AUCs, decisions, pushes, rollbacks.

One step per span: live AUC of the serving and the previous version,
candidate and baseline AUC, the paired gate's AUC difference with its
interval and p-value, the rollback test's difference and interval, the
number of spans caught up, and 0/1 markers for blessed, pushed and rolled
back, plus a text line of what was decided and why.
"""
from __future__ import annotations

import os
from typing import Any, Dict


def record_span(tensorboard_dir: str, record: Dict[str, Any]) -> None:
    import tensorflow as tf

    span = record.get("span")
    if span is None:
        return
    writer = tf.summary.create_file_writer(os.path.join(tensorboard_dir, "timeline"))
    with writer.as_default(step=int(span)):
        for key in ("live_auc", "previous_auc", "candidate_auc", "baseline_auc"):
            if record.get(key) is not None:
                tf.summary.scalar(f"auc/{key}", record[key])
        for key, value in (record.get("ranking") or {}).items():
            if key != "users" and value is not None:
                tf.summary.scalar(f"ranking/{key.replace('@', '_at_')}", value)
        gate = record.get("gate") or {}
        for key in ("difference", "lower", "upper", "p_value"):
            if gate.get(key) is not None:
                tf.summary.scalar(f"gate/{key}", gate[key])
        test = record.get("rollback_test") or {}
        for key in ("difference", "lower", "upper", "p_value"):
            if test.get(key) is not None:
                tf.summary.scalar(f"rollback_test/{key}", test[key])
        tf.summary.scalar("decision/caught_up_spans", float(len(record.get("caught_up_spans") or [])))
        tf.summary.scalar("decision/blessed", float(bool(record.get("blessed"))))
        tf.summary.scalar("decision/pushed", float(record.get("pushed_version") is not None))
        tf.summary.scalar("decision/rolled_back", float(bool(record.get("rolled_back"))))
        tf.summary.scalar("cost/train_seconds", float(record.get("train_seconds") or 0))
        tf.summary.scalar("cost/run_seconds", float(record.get("run_seconds") or 0))
        tf.summary.scalar("cost/examples_trained", float(record.get("examples_trained") or 0))
        events = []
        if record.get("rolled_back"):
            events.append(f"rolled back v{record['rolled_back_version']} -> v{record['restored_version']}")
        if record.get("pushed_version"):
            events.append(f"pushed v{record['pushed_version']}")
        if gate.get("reason"):
            events.append(f"gate: {'blessed' if gate.get('blessed') else 'not blessed'}, {gate['reason']}")
        if record.get("caught_up_spans"):
            events.append("caught up span(s) " + ", ".join(map(str, record["caught_up_spans"])))
        if record.get("status") != "ok":
            events.append(f"stopped: {record.get('error', '')}")
        tf.summary.text("decisions", "; ".join(events) or "no change")
    writer.close()
