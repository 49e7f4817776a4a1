"""Warm start: copy every weight of the serving SavedModel into a new model.

TFX hands run_fn the base model's serving directory, not a checkpoint, and
restores nothing itself. The exported SavedModel carries its weights under
stable names (`warm_start_weights`), so they are matched by name. Embedding
tables may have grown (append-only vocabularies): the old rows are copied in
place (an id keeps its index) and the new rows keep their fresh initialisation.
"""
from __future__ import annotations

import logging
import os
from typing import Dict

import tensorflow as tf
from google.protobuf import message
from tensorflow.core.protobuf import trackable_object_graph_pb2

WEIGHTS_ATTRIBUTE = "warm_start_weights"


def has_saved_model(path: str) -> bool:
    return bool(path) and tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))


def load_weights(saved_model_dir: str) -> Dict[str, tf.Tensor]:
    """The base model's weights by name, read straight from its variables checkpoint.

    Loading the whole SavedModel would restore and trace its signatures: ~2 s per
    span, where reading the checkpoint takes milliseconds.
    """
    prefix = os.path.join(saved_model_dir, "variables", "variables")
    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except (tf.errors.OpError, ValueError, message.DecodeError) as e:
        raise ValueError(f"{saved_model_dir}: cannot read its variables ({e})") from e
    holder = next((c.node_id for c in graph.nodes[0].children if c.local_name == WEIGHTS_ATTRIBUTE), None)
    if holder is None:
        raise ValueError(f"{saved_model_dir}: not an increc model (it has no {WEIGHTS_ATTRIBUTE})")
    weights = {}
    for child in graph.nodes[holder].children:
        keys = [a.checkpoint_key for a in graph.nodes[child.node_id].attributes if a.name == "VARIABLE_VALUE"]
        if keys:
            weights[child.local_name] = tf.constant(reader.get_tensor(keys[0]))
    return weights


def copy_into(new_weights: Dict[str, tf.Variable], old_weights: Dict[str, tf.Tensor]) -> Dict[str, str]:
    """Assigns old values into the new variables; returns what happened to each weight."""
    report = {}
    for name, variable in new_weights.items():
        old = old_weights.get(name)
        if old is None:
            report[name] = "new"
            continue
        new_shape, old_shape = variable.shape.as_list(), old.shape.as_list()
        if new_shape == old_shape:
            variable.assign(old)
            report[name] = "copied"
        elif (len(new_shape) == 2 and new_shape[1] == old_shape[1] and new_shape[0] > old_shape[0]):
            # An embedding table that grew: keep old rows by index, new rows stay initialised.
            variable.assign(tf.concat([old, variable[old_shape[0]:]], axis=0))
            report[name] = f"copied {old_shape[0]} rows, {new_shape[0] - old_shape[0]} new"
        else:
            raise ValueError(f"cannot warm-start {name}: shape {old_shape} in the base model, "
                             f"{new_shape} now (a vocabulary shrank or the architecture changed; "
                             f"use --mode full)")
    unused = sorted(set(old_weights) - set(new_weights))
    if unused:
        logging.warning("warm start: base-model weights with no counterpart: %s", ", ".join(unused))
    return report
