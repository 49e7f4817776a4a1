"""The `models.config` file (text ModelServerConfig) that TF Serving reads.

increc keeps one model per work directory with a `specific` version policy
holding the current (`stable`) and the retained (`previous`) version. The file
is the source of truth for what should serve: both servers (embedded and real)
read it. This module only parses and writes the format; what a deployment's
file says is changed only through components/deployment.py
(docs/ARCHITECTURE.md, "Deployment state").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from typing import Dict, List, Optional

import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

STABLE = "stable"
PREVIOUS = "previous"
CANARY = "canary"


@dataclasses.dataclass
class Deployment:
    """What one model's config entry says should serve."""

    model_name: str
    base_path: str
    versions: List[int]
    labels: Dict[str, int]

    @property
    def stable(self) -> Optional[int]:
        return self.labels.get(STABLE)

    @property
    def previous(self) -> Optional[int]:
        return self.labels.get(PREVIOUS)


# absl::SimpleAtoi on a directory name: optional ASCII whitespace around an optional sign and ASCII digits.
_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*", re.ASCII)
INT64_MAX = 2 ** 63 - 1


def parse_version(name: str) -> Optional[int]:
    """The version number a directory name stands for, as TF Serving parses it (`00000123` is 123), else None."""
    match = _ATOI.fullmatch(name)
    if match is None:
        return None
    number = int(match.group(1))
    return number if -INT64_MAX - 1 <= number <= INT64_MAX else None


def version_dirs(base_path: str) -> Dict[int, str]:
    """{version: directory name} of the children of base_path whose names parse as int64 versions.

    Anything else is skipped silently, like TF Serving does (so hidden
    staging directories never load). Two names for one number (`1`, `01`):
    the first in sorted order wins, with a warning.
    """
    if not tf.io.gfile.isdir(base_path):
        return {}
    found: Dict[int, str] = {}
    for name in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(base_path)):
        number = parse_version(name)
        if number is None or not tf.io.gfile.isdir(os.path.join(base_path, name)):
            continue
        if number in found:
            logging.warning("%s: directories %r and %r are both version %d; using %r", base_path, found[number],
                            name, number, found[number])
            continue
        found[number] = name
    return found


def versions_on_disk(base_path: str) -> List[int]:
    """The version numbers under base_path, ascending (as TF Serving sees them)."""
    return sorted(version_dirs(base_path))


def read_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a text ModelServerConfig: {e}") from e
    return config


def write_config(path: str, config: model_server_config_pb2.ModelServerConfig) -> None:
    """Write atomically so a polling server never reads half a file."""
    directory = os.path.dirname(path)
    tf.io.gfile.makedirs(directory)
    tmp = os.path.join(directory, f".models.config.{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text_format.MessageToString(config))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def build_config(deployment: Deployment) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = deployment.model_name
    entry.base_path = deployment.base_path if "://" in deployment.base_path else os.path.abspath(deployment.base_path)
    entry.model_platform = "tensorflow"
    entry.model_version_policy.specific.versions.extend(sorted(set(deployment.versions), reverse=True))
    for label, version in sorted(deployment.labels.items()):
        entry.version_labels[label] = version
    return config


def read_deployment(path: str, model_name: str) -> Optional[Deployment]:
    """The entry for model_name in the config at path, or None when there is none yet."""
    if not tf.io.gfile.exists(path):
        return None
    config = read_config(path)
    for entry in config.model_config_list.config:
        if entry.name == model_name:
            policy = entry.model_version_policy
            versions = list(policy.specific.versions) if policy.HasField("specific") else []
            return Deployment(
                model_name=entry.name,
                base_path=entry.base_path,
                versions=sorted(versions, reverse=True),
                labels=dict(entry.version_labels),
            )
    return None

