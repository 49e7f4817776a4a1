"""ServingPusher: pushes a blessed model as a new TF Serving version.

Unlike the stock Pusher it
- never lets a watching server see a partial version, keeps versions strictly
  increasing, writes `models.config` (new version `stable`, the one before
  `previous`) and tells a running server, all through the deployment's one
  owner (components/deployment.py);
- pushes only onto the deployment the DeploymentGuard resolved for this run:
  if models.config changed since (a manual rollback, another run), it refuses
  and changes nothing;
- keeps at most `keep_versions` version directories, never one a label names;
- pushes a span once: a rerun of a span whose earlier run was stopped after
  its push (the version records its span) leaves that push in place.
"""

import json
import logging
import os

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

from components.deployment import DeploymentState
from components.deployment_guard import REPORT_FILE, LiveEvaluation, resolved_deployment


@component
def ServingPusher(
    model: InputArtifact[standard_artifacts.Model],
    model_blessing: InputArtifact[standard_artifacts.ModelBlessing],
    live_evaluation: InputArtifact[LiveEvaluation],
    pushed_model: OutputArtifact[standard_artifacts.PushedModel],
    model_name: Parameter[str],
    serving_dir: Parameter[str],
    keep_versions: Parameter[int],
    serving_address: Parameter[str],
    force: Parameter[int],
) -> None:
    blessed = model_blessing.get_int_custom_property("blessed") == 1
    if not blessed and not force:
        logging.info("model not blessed: not pushed")
        pushed_model.set_int_custom_property("pushed", 0)
        return
    state = DeploymentState(serving_dir, model_name, serving_address)
    with tf.io.gfile.GFile(os.path.join(live_evaluation.uri, REPORT_FILE)) as f:
        report = json.load(f)
    if report.get("already_pushed_version") is not None:
        # An earlier run of this span was stopped after its push: the span is deployed once, not twice.
        version = report["already_pushed_version"]
        logging.info("span %s already pushed as version %d by an earlier run: not pushed again", report["span"], version)
        pushed_model.set_int_custom_property("pushed", 0)
        pushed_model.set_int_custom_property("already_pushed_version", version)
        return
    expected = resolved_deployment(state, report)
    pushed = state.push(os.path.join(model.uri, "Format-Serving"), expected, keep_versions, span=report.get("span"))
    logging.info("pushed version %d (%s); pruned %s", pushed.version, pushed.server, pushed.removed)
    pushed_model.set_int_custom_property("pushed", 1)
    pushed_model.set_int_custom_property("pushed_version", pushed.version)
    pushed_model.set_string_custom_property("pushed_destination", os.path.join(state.base_path, str(pushed.version)))
    pushed_model.set_int_custom_property("forced", int(bool(force and not blessed)))
    pushed_model.set_string_custom_property("server", pushed.server)
