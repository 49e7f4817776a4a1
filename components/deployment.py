"""The deployment's serving state, and its one owner: version directories, models.config, rolled-back versions.

Everything that changes what serves goes through `DeploymentState`: the
ServingPusher pushes, the DeploymentGuard and `increc rollback` roll back,
`increc status` reads. The files are exactly what TF Serving reads
(`WORK/serving/<model>/<version>/`, `WORK/serving/models.config`), plus
`rolled_back.json`, and every change is made so that a crash at any point
leaves a consistent deployment (docs/ARCHITECTURE.md, "Deployment state"):

- a version directory is copied under a hidden name and renamed into place;
  it serves only once models.config names it;
- models.config is written to a temporary file and renamed;
- a push or rollback acts only on the deployment it was planned against
  (compare and swap): if another process changed it in between, it refuses;
- a running server is told through HandleReloadConfigRequest, new versions
  loaded before labels move; a server that is down reads models.config when
  it starts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Dict, List, Optional

import tensorflow as tf
from tfx.utils import io_utils

from models.catch_up import PUSH_RECORD  # which span a version was pushed for
from serving import model_config
from serving.model_config import PREVIOUS, STABLE, Deployment

ROLLED_BACK_FILE = "rolled_back.json"
NO_SERVER = "no server reachable; it reads models.config when it starts"


class DeploymentChanged(RuntimeError):
    """The deployment is not the one this change was planned against; nothing was changed."""


class RollbackRefused(ValueError):
    """There is nothing sensible to roll back to; nothing was changed."""


@dataclasses.dataclass
class Pushed:
    version: int
    deployment: Deployment
    server: str
    removed: List[int]


@dataclasses.dataclass
class Rollback:
    bad_version: int
    restored_version: int
    server: str


class DeploymentState:
    def __init__(self, serving_dir: str, model_name: str, serving_address: Optional[str] = None):
        self.serving_dir = serving_dir
        self.model_name = model_name
        self.serving_address = serving_address
        self.models_config_path = os.path.join(serving_dir, "models.config")
        self.base_path = os.path.join(serving_dir, model_name)

    # --- reading ---
    def current(self) -> Optional[Deployment]:
        """What models.config says serves, or None before the first push."""
        return model_config.read_deployment(self.models_config_path, self.model_name)

    def versions_on_disk(self) -> List[int]:
        return model_config.versions_on_disk(self.base_path)

    def version_dir(self, version: Optional[int]) -> Optional[str]:
        """The SavedModel directory of a version (`00000123` for 123 too), or None when it is not on disk."""
        name = model_config.version_dirs(self.base_path).get(version) if version is not None else None
        path = os.path.join(self.base_path, name) if name is not None else None
        return path if path is not None and tf.io.gfile.exists(os.path.join(path, "saved_model.pb")) else None

    def pushed_span(self, version: Optional[int]) -> Optional[int]:
        """The span a version was pushed for (None for versions increc did not push)."""
        path = self.version_dir(version)
        record = os.path.join(path, PUSH_RECORD) if path else None
        if record is None or not tf.io.gfile.exists(record):
            return None
        with tf.io.gfile.GFile(record) as f:
            return json.load(f).get("span")

    def rolled_back(self) -> Dict[int, dict]:
        path = os.path.join(self.serving_dir, ROLLED_BACK_FILE)
        if not tf.io.gfile.exists(path):
            return {}
        with tf.io.gfile.GFile(path) as f:
            return {int(k): v for k, v in json.load(f).items()}

    # --- changing ---
    def push(self, saved_model_dir: str, expected: Optional[Deployment], keep_versions: int,
             span: Optional[int] = None) -> Pushed:
        """Publishes a SavedModel as the new stable version (the old stable becomes previous).

        `expected` is the deployment the run resolved when it started (None: nothing was
        deployed); if models.config says otherwise now, nothing is changed.
        """
        if not tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
            raise ValueError(f"{saved_model_dir} holds no SavedModel (saved_model.pb is missing)")
        old = self._check_unchanged(expected)
        self._remove_orphans(old)
        version = self._publish(saved_model_dir, {"span": span, "time": round(time.time(), 3)})
        labels = {STABLE: version}
        if old is not None and old.stable is not None:
            labels[PREVIOUS] = old.stable
        new = Deployment(self.model_name, self.base_path, versions=sorted(set(labels.values()), reverse=True),
                         labels=labels)
        server = self._apply(new, old)
        # Old versions go only after the server has let go of them.
        removed = self._prune(keep_versions, list(new.labels.values()))
        return Pushed(version, new, server, removed)

    def roll_back(self, to_version: Optional[int] = None, reason: str = "manual",
                  expected: Optional[Deployment] = None, **details) -> Rollback:
        """`stable` goes back to the previous (or a named) version; the bad one is unloaded and marked."""
        current = self.current()
        if expected is not None:
            current = self._check_unchanged(expected)
        if current is None or current.stable is None:
            raise RollbackRefused(f"nothing is deployed for model {self.model_name} "
                                  f"({self.models_config_path} has no stable version)")
        bad = current.stable
        target = to_version if to_version is not None else current.previous
        marked = self.rolled_back()
        if target is None:
            raise RollbackRefused(f"no previous version to roll back to: version {bad} is the only one retained "
                                  f"(name one with --to VERSION)")
        if target == bad:
            raise RollbackRefused(f"version {target} is already the stable version")
        if target in marked:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(marked[target]["time"]))
            raise RollbackRefused(f"version {target} was rolled back on {when} and is not restored again")
        if self.version_dir(target) is None:
            on_disk = ", ".join(map(str, self.versions_on_disk())) or "none"
            raise RollbackRefused(f"unknown version {target}: not under {self.base_path} (versions on disk: {on_disk})")
        restored = Deployment(self.model_name, self.base_path, versions=[target], labels={STABLE: target})
        server = self._apply(restored, current)
        self._mark(bad, dict(details, time=time.time(), restored=target, reason=reason))
        return Rollback(bad_version=bad, restored_version=target, server=server)

    # --- internals ---
    def _check_unchanged(self, expected: Optional[Deployment]) -> Optional[Deployment]:
        current = self.current()
        was = (expected.stable, expected.previous) if expected is not None else (None, None)
        now = (current.stable, current.previous) if current is not None else (None, None)
        if was != now:
            raise DeploymentChanged(f"the deployment changed during this run (stable/previous were "
                                    f"{_versions(was)}, now {_versions(now)}): nothing was changed; "
                                    f"run the span again")
        return current

    def _remove_orphans(self, current: Optional[Deployment]) -> None:
        """Version directories newer than the stable version that models.config does not name are what a
        crashed push left; they never served. Without this a rerun would leave two new versions."""
        named = set(current.versions) if current is not None else set()
        newest = current.stable if current is not None and current.stable is not None else -1
        for version, name in model_config.version_dirs(self.base_path).items():
            if version > newest and version not in named:
                logging.warning("removing version %d: a push that did not finish left it", version)
                _remove_tree(os.path.join(self.base_path, name))

    def _publish(self, saved_model_dir: str, record: dict) -> int:
        """Copies the SavedModel in as a new version directory; returns the version.

        Locally the copy goes to a hidden directory renamed into place (atomic).
        Object stores (gs://, s3://) cannot rename a directory atomically, so
        there, as TFX's own Pusher does, saved_model.pb is copied last: a
        version without it is not a model yet, for any server.
        """
        tf.io.gfile.makedirs(self.base_path)
        if "://" in self.base_path:
            version = next_version(self.versions_on_disk())
            target = os.path.join(self.base_path, str(version))
            for directory, _, files in tf.io.gfile.walk(saved_model_dir):
                relative = os.path.relpath(directory, saved_model_dir)
                tf.io.gfile.makedirs(os.path.join(target, relative))
                for name in files:
                    if not (relative == "." and name == "saved_model.pb"):
                        tf.io.gfile.copy(os.path.join(directory, name), os.path.join(target, relative, name),
                                         overwrite=True)
            _write_record(target, record)
            tf.io.gfile.copy(os.path.join(saved_model_dir, "saved_model.pb"), os.path.join(target, "saved_model.pb"),
                             overwrite=True)
            return version
        staging = os.path.join(self.base_path, f".incoming-{uuid.uuid4().hex}")
        try:
            io_utils.copy_dir(saved_model_dir, staging)
            _write_record(staging, record)
        except Exception:
            _remove_tree(staging)
            raise
        while True:
            version = next_version(self.versions_on_disk())
            try:
                tf.io.gfile.rename(staging, os.path.join(self.base_path, str(version)))
                return version
            except (OSError, tf.errors.OpError):
                if not tf.io.gfile.exists(os.path.join(self.base_path, str(version))):
                    _remove_tree(staging)
                    raise
                # Another push took this number in the meantime: take the next one.

    def _apply(self, new: Deployment, old: Optional[Deployment]) -> str:
        """Writes models.config, then tells a running server (new versions load before labels move)."""
        new_config = model_config.build_config(new)
        model_config.write_config(self.models_config_path, new_config)
        if not self.serving_address:
            return "no serving address configured; a server reads models.config when it starts"
        from serving.client import ServingClient

        client = ServingClient(self.serving_address, timeout=10.0)
        try:
            if not client.is_reachable():
                return NO_SERVER
            client.apply_deployment(new_config, current=model_config.build_config(old) if old else None,
                                    wait_timeout=180.0)
            return f"server at {self.serving_address} reloaded"
        except Exception as e:  # noqa: BLE001 - models.config is written; the server catches up from it
            return f"server reload failed ({e}); models.config is updated"
        finally:
            client.close()

    def _prune(self, keep: int, protected: List[int]) -> List[int]:
        """Deletes the oldest unlabelled versions beyond `keep`; returns what was deleted."""
        names = model_config.version_dirs(self.base_path)
        deletable = [v for v in names if v not in set(protected)]
        excess = max(0, len(names) - max(keep, len(protected)))
        removed = sorted(deletable)[:excess]
        for version in removed:
            _remove_tree(os.path.join(self.base_path, names[version]))
        return removed

    def _mark(self, version: int, details: dict) -> None:
        marked = self.rolled_back()
        marked[version] = details
        tmp = os.path.join(self.serving_dir, f".{ROLLED_BACK_FILE}.{uuid.uuid4().hex}")
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump({str(k): v for k, v in sorted(marked.items())}, f, indent=2)
        tf.io.gfile.rename(tmp, os.path.join(self.serving_dir, ROLLED_BACK_FILE), overwrite=True)


def next_version(existing: List[int]) -> int:
    """Unix seconds, as TF Serving's own pusher names versions, but strictly above every existing one."""
    return max([int(time.time())] + [v + 1 for v in existing])


def _versions(pair) -> str:
    stable, previous = pair
    return f"v{stable}/v{previous}" if stable is not None else "nothing"


def _write_record(version_dir: str, record: dict) -> None:
    tf.io.gfile.makedirs(os.path.join(version_dir, os.path.dirname(PUSH_RECORD)))
    with tf.io.gfile.GFile(os.path.join(version_dir, PUSH_RECORD), "w") as f:
        json.dump(record, f)


def _remove_tree(path: str) -> None:
    if not tf.io.gfile.exists(path):
        return
    try:
        tf.io.gfile.rmtree(path)
    except tf.errors.NotFoundError:
        # Some file systems (TensorFlow's ram://) list children that a recursive delete then misses:
        # delete file by file, deepest first.
        for directory, _, names in tf.io.gfile.walk(path, topdown=False):
            for name in names:
                tf.io.gfile.remove(os.path.join(directory, name))
            if tf.io.gfile.exists(directory):
                tf.io.gfile.remove(directory)
