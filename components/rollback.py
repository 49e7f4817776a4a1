"""Rolling back: `stable` goes back to a retained version, the bad one is unloaded and never used again.

A rollback is a config change: `models.config` is rewritten (the truth a
server reads when it starts) and, when a server is reachable, the same config
goes through HandleReloadConfigRequest, in TF Serving's order: the version
being restored is loaded before the label moves, so no request is dropped.
Rolled-back versions are listed in `WORK/serving/rolled_back.json`; they are
never restored, warm-started from or used as a baseline again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, Optional

import tensorflow as tf

from serving import model_config

ROLLED_BACK_FILE = "rolled_back.json"


class RollbackRefused(ValueError):
    """There is nothing sensible to roll back to; nothing was changed."""


@dataclasses.dataclass
class Rollback:
    bad_version: int
    restored_version: int
    server: str


def rolled_back_versions(serving_dir: str) -> Dict[int, dict]:
    path = os.path.join(serving_dir, ROLLED_BACK_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return {int(k): v for k, v in json.load(f).items()}


def _mark(serving_dir: str, version: int, details: dict) -> None:
    marked = rolled_back_versions(serving_dir)
    marked[version] = details
    tmp = os.path.join(serving_dir, ROLLED_BACK_FILE + ".tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump({str(k): v for k, v in sorted(marked.items())}, f, indent=2)
    tf.io.gfile.rename(tmp, os.path.join(serving_dir, ROLLED_BACK_FILE), overwrite=True)


def roll_back(models_config_path: str, model_name: str, serving_address: Optional[str],
              to_version: Optional[int] = None, reason: str = "manual", **details) -> Rollback:
    serving_dir = os.path.dirname(models_config_path)
    deployment = model_config.read_deployment(models_config_path, model_name)
    if deployment is None or deployment.stable is None:
        raise RollbackRefused(f"nothing is deployed for model {model_name} ({models_config_path} has no stable version)")
    bad = deployment.stable
    target = to_version if to_version is not None else deployment.previous
    marked = rolled_back_versions(serving_dir)
    if target is None:
        raise RollbackRefused(f"no previous version to roll back to: version {bad} is the only one retained "
                              f"(name one with --to VERSION)")
    if target == bad:
        raise RollbackRefused(f"version {target} is already the stable version")
    if target in marked:
        raise RollbackRefused(f"version {target} was rolled back on {time.strftime('%Y-%m-%d %H:%M', time.gmtime(marked[target]['time']))} "
                              f"and is not restored again")
    if target not in model_config.version_dirs(deployment.base_path):
        on_disk = ", ".join(map(str, model_config.version_dirs(deployment.base_path))) or "none"
        raise RollbackRefused(f"unknown version {target}: not under {deployment.base_path} (versions on disk: {on_disk})")

    old_config = model_config.build_config(deployment)
    restored = model_config.Deployment(model_name, deployment.base_path, versions=[target],
                                       labels={model_config.STABLE: target})
    new_config = model_config.build_config(restored)
    # The file first: a server polling it must never read the old labels back after the reload.
    model_config.write_config(models_config_path, new_config)
    server = "no server reachable; it reads models.config when it starts"
    if serving_address:
        from serving.client import ServingClient

        client = ServingClient(serving_address, timeout=10.0)
        try:
            if client.is_reachable():
                client.apply_deployment(new_config, current=old_config, wait_timeout=180.0)
                server = f"server at {serving_address} now serves version {target} as stable"
        finally:
            client.close()
    _mark(serving_dir, bad, dict(details, time=time.time(), restored=target, reason=reason))
    return Rollback(bad_version=bad, restored_version=target, server=server)
