"""ServingPusher: pushes a blessed model as a new TF Serving version.

Unlike the stock Pusher it
- never lets a watching server see a partial version: the model is copied
  into a hidden directory (TF Serving skips non-numeric names) and renamed
  into place, which is atomic on one file system;
- keeps versions strictly increasing, even for two pushes within a second;
- updates `models.config` (new version `stable`, the one before `previous`)
  and, when a server is reachable, tells it through HandleReloadConfigRequest;
- keeps at most `keep_versions` version directories, never one a label names.
"""

import logging
import os
import time
import uuid
from typing import List

import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts
from tfx.utils import io_utils

from serving import model_config


def next_version(base_path: str) -> int:
    existing = model_config.version_dirs(base_path)
    return max([int(time.time())] + [v + 1 for v in existing])


def publish(saved_model_dir: str, base_path: str) -> int:
    """Copies a SavedModel in as a new version directory, atomically; returns the version."""
    if not tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
        raise ValueError(f"{saved_model_dir} holds no SavedModel (saved_model.pb is missing)")
    tf.io.gfile.makedirs(base_path)
    staging = os.path.join(base_path, f".incoming-{uuid.uuid4().hex}")
    try:
        io_utils.copy_dir(saved_model_dir, staging)
    except Exception:
        _remove_tree(staging)
        raise
    while True:
        version = next_version(base_path)
        try:
            tf.io.gfile.rename(staging, os.path.join(base_path, str(version)))
            return version
        except (OSError, tf.errors.OpError):
            if not tf.io.gfile.exists(os.path.join(base_path, str(version))):
                _remove_tree(staging)
                raise
            # Another push took this number in the meantime: take the next one.


def _remove_tree(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def prune(base_path: str, keep: int, protected: List[int]) -> List[int]:
    """Deletes the oldest unlabelled versions beyond `keep`; returns what was deleted."""
    versions = model_config.version_dirs(base_path)
    deletable = [v for v in versions if v not in set(protected)]
    excess = max(0, len(versions) - max(keep, len(protected)))
    removed = sorted(deletable)[:excess]
    for version in removed:
        _remove_tree(os.path.join(base_path, str(version)))
    return removed


def notify_server(address: str, new_config, old_config) -> str:
    """Tells a running server about the new config; a missing server is not an error."""
    from serving.client import ServingClient

    if not address:
        return "no serving address configured; a server reads models.config when it starts"
    client = ServingClient(address, timeout=5.0)
    try:
        if not client.is_reachable():
            return "no server reachable; it reads models.config when it starts"
        client.apply_deployment(new_config, current=old_config, wait_timeout=120.0)
        return f"server at {address} reloaded"
    finally:
        client.close()


@component
def ServingPusher(
    model: InputArtifact[standard_artifacts.Model],
    model_blessing: InputArtifact[standard_artifacts.ModelBlessing],
    pushed_model: OutputArtifact[standard_artifacts.PushedModel],
    model_name: Parameter[str],
    model_base_path: Parameter[str],
    models_config_path: Parameter[str],
    keep_versions: Parameter[int],
    serving_address: Parameter[str],
    force: Parameter[int],
) -> None:
    blessed = model_blessing.get_int_custom_property("blessed") == 1
    if not blessed and not force:
        logging.info("model not blessed: not pushed")
        pushed_model.set_int_custom_property("pushed", 0)
        return
    version = publish(os.path.join(model.uri, "Format-Serving"), model_base_path)
    old_config = model_config.read_config(models_config_path) if tf.io.gfile.exists(models_config_path) else None
    deployment = model_config.promote(models_config_path, model_name, model_base_path, version)
    try:
        outcome = notify_server(serving_address, model_config.build_config(deployment), old_config)
    except Exception as e:  # noqa: BLE001 - the push itself succeeded; the server catches up from the file
        outcome = f"server reload failed ({e}); models.config is updated"
    # Old versions go only after the server has let go of them.
    removed = prune(model_base_path, keep_versions, list(deployment.labels.values()))
    logging.info("pushed version %d (%s); pruned %s", version, outcome, removed)
    pushed_model.set_int_custom_property("pushed", 1)
    pushed_model.set_int_custom_property("pushed_version", version)
    pushed_model.set_string_custom_property("pushed_destination", os.path.join(model_base_path, str(version)))
    pushed_model.set_int_custom_property("forced", int(bool(force and not blessed)))
    pushed_model.set_string_custom_property("server", outcome)
