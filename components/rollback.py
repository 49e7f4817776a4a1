"""Rolling back from the command line: the calls `increc rollback` and `increc status` make.

The deployment's state has one owner, components/deployment.py; this keeps the
CLI's entry points.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from components.deployment import DeploymentState, Rollback, RollbackRefused  # noqa: F401 - re-exported


def rolled_back_versions(serving_dir: str) -> Dict[int, dict]:
    return DeploymentState(serving_dir, "").rolled_back()


def roll_back(models_config_path: str, model_name: str, serving_address: Optional[str],
              to_version: Optional[int] = None, reason: str = "manual", **details) -> Rollback:
    state = DeploymentState(os.path.dirname(models_config_path), model_name, serving_address)
    return state.roll_back(to_version, reason, **details)
