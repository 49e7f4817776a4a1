"""Which versions of which models are loaded, and how that changes (tf-serving-reference.md §3).

- Versions are the children of a model's base path whose names parse as
  numbers the way TF Serving parses them (`00000123` is 123); base paths may
  be any URI tf.io.gfile reads. The version policy (`latest{N}` by default,
  `all`, `specific`) picks the aspired ones.
- Swaps preserve availability: new versions load (and warm up) before old
  ones unload, and a version that fails to load never serves while the old
  one keeps serving; the failure stays visible in model status as END.
- Version labels must point at an AVAILABLE version, with TF Serving's
  `--allow_version_labels_for_unavailable_models` exception.
- A poll thread rescans base paths every `--file_system_poll_wait_seconds`.
- Once stopped (SIGTERM), no load starts, a load in progress is abandoned at
  its next warmup request, and a config change in flight moves no label, so
  the process exits without first finishing a version it will never serve.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import grpc
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from serving import servable as servable_lib
from serving.model_config import parse_version, version_dirs  # noqa: F401 - TF Serving's directory rules
from serving.errors import ServingError, failed_precondition, invalid, not_found

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclasses.dataclass
class VersionState:
    state: str = START
    error_code: str = "OK"
    error_message: str = ""
    servable: Optional[servable_lib.Servable] = None
    attempts: int = 0
    last_attempt: float = 0.0


@dataclasses.dataclass
class Model:
    config: model_server_config_pb2.ModelConfig
    versions: Dict[int, VersionState] = dataclasses.field(default_factory=dict)
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # gs://, s3://, hdfs://: what tf.io.gfile reads


def aspired_versions(config: model_server_config_pb2.ModelConfig, on_disk: List[int]) -> List[int]:
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(on_disk)
    if kind == "specific":
        return sorted(v for v in set(policy.specific.versions) if v in on_disk)
    keep = max(1, policy.latest.num_versions) if kind == "latest" else 1
    return sorted(on_disk)[-keep:]


class ModelManager:
    def __init__(self, allow_labels_for_unavailable: bool = False, enable_warmup: bool = True,
                 max_load_retries: int = 5, retry_interval_seconds: float = 60.0,
                 warmup_handler: Optional[Callable] = None, on_load: Optional[Callable] = None,
                 on_warmup: Optional[Callable] = None):
        self._models: Dict[str, Model] = {}
        self._lock = threading.RLock()  # guards _models
        self._sync_lock = threading.Lock()  # one config change or rescan at a time
        self._allow_unavailable_labels = allow_labels_for_unavailable
        self._enable_warmup = enable_warmup
        self._max_retries = max_load_retries
        self._retry_interval = retry_interval_seconds
        self._warmup_handler = warmup_handler
        self._on_load = on_load or (lambda path, ok, seconds: None)
        self._on_warmup = on_warmup
        self._stop = threading.Event()

    # --- configuration ---
    def set_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Replaces the whole config (models not in it are unloaded); blocks until loads settle."""
        if config.WhichOneof("config") != "model_config_list":
            raise invalid("ServerModelConfig type not supported by HandleReloadConfigRequest. "
                          "Only ModelConfigList is currently supported")
        entries = list(config.model_config_list.config)
        names = [e.name for e in entries]
        for entry in entries:
            if not entry.name:
                raise invalid("ModelConfig has no name")
            if names.count(entry.name) > 1:
                raise invalid(f"Illegal to list model {entry.name} multiple times in config list")
            if not (os.path.isabs(entry.base_path) or _URI.match(entry.base_path)):
                raise invalid(f"Expected model {entry.name} to have an absolute path or URI; got base_path()="
                              f"{entry.base_path}")
            if entry.model_platform and entry.model_platform != "tensorflow":
                raise invalid(f"Model {entry.name} has unsupported platform {entry.model_platform}")
        with self._sync_lock:
            # Labels are checked against what is loaded now, before this config adds anything.
            for entry in entries:
                self._check_labels(entry)
            with self._lock:
                current = self._models
                self._models = {}
                for entry in entries:
                    model = current.get(entry.name) or Model(config=entry)
                    model.config = entry
                    self._models[entry.name] = model
                removed = [m for n, m in current.items() if n not in self._models]
            for model in removed:
                for state in model.versions.values():
                    state.servable, state.state = None, END
            failures, aspired = [], {}
            for entry in entries:
                failed, aspired[entry.name] = self._load_aspired(entry.name, new_model=entry.name not in current)
                failures += failed
            if self._stop.is_set():
                # Stopped mid-swap: labels stay where they are and nothing is unloaded.
                raise ServingError(grpc.StatusCode.CANCELLED, "the server is shutting down; the config was not applied")
            # Labels move once the new versions are in and before any old one goes,
            # so a label never points at a version being unloaded.
            with self._lock:
                for entry in entries:
                    self._models[entry.name].labels = dict(entry.version_labels)
            for entry in entries:
                if aspired[entry.name] is not None:
                    self._release_unaspired(self._models[entry.name], entry.name, aspired[entry.name])
        if failures:
            raise ServingError(grpc.StatusCode.UNKNOWN,
                               f"{len(failures)} model(s) did not become available: {{{', '.join(failures)}}}")

    def _check_labels(self, entry: model_server_config_pb2.ModelConfig) -> None:
        model = self._models.get(entry.name)
        for label, version in entry.version_labels.items():
            available = model is not None and version in model.versions and model.versions[version].state == AVAILABLE
            if available:
                continue
            unchanged_or_new = model is None or model.labels.get(label, version) == version
            if self._allow_unavailable_labels and unchanged_or_new:
                continue
            raise failed_precondition(f"Request to assign label to version {version} of model {entry.name}, "
                                      f"which is not currently available for inference")

    # --- loading ---
    def rescan(self) -> None:
        """Picks up new and removed version directories of every model: loads first, then unloads."""
        with self._sync_lock:
            for name in list(self._models):
                _, aspired = self._load_aspired(name, new_model=False)
                model = self._models.get(name)
                if model is not None and aspired is not None and not self._stop.is_set():
                    self._release_unaspired(model, name, aspired)

    def _load_aspired(self, name: str, new_model: bool) -> Tuple[List[str], Optional[List[int]]]:
        """Loads the aspired versions not loaded yet; returns (failures of a new model, aspired versions)."""
        with self._lock:
            model = self._models.get(name)
        if model is None:
            return [], None
        base = model.config.base_path
        if not tf.io.gfile.isdir(base):
            message = f"Could not find base path {base} for servable {name} with error NOT_FOUND: {base} not found"
            logging.error(message)
            return ([f"{{name: {name} }} due to error: {message}"] if new_model else []), None
        dirs = version_dirs(base)
        on_disk = sorted(dirs)
        if not on_disk:
            logging.warning("No versions of servable %s found under base path %s. Did you forget to name your "
                            "leaf directory as a number (eg. '/1/')?", name, base)
        aspired = aspired_versions(model.config, on_disk)
        failures = []
        for version in sorted(aspired, reverse=True):
            if self._stop.is_set():
                break  # a stopping server starts no load
            state = model.versions.get(version)
            if state is not None and state.state == AVAILABLE:
                continue
            if state is not None and state.state == END and not self._should_retry(state):
                continue
            error = self._load(model, name, version, os.path.join(base, dirs[version]))
            if error and new_model:
                failures.append(f"{{name: {name} version: {version}}} due to error: {error}")
        return failures, aspired

    def _release_unaspired(self, model: Model, name: str, aspired: List[int]) -> None:
        """TF Serving's AvailabilityPreservingPolicy: never leave a model with nothing to serve.

        The lowest unaspired AVAILABLE version unloads when no version is
        aspired, when an aspired one is AVAILABLE, or when another unaspired
        one is still AVAILABLE; so a failed new version keeps the old one up.
        """
        while True:
            ready = {v for v, s in model.versions.items() if s.state == AVAILABLE}
            unaspired = sorted(ready - set(aspired))
            if not unaspired:
                return
            if aspired and not (ready & set(aspired)) and len(unaspired) == 1:
                return
            state = model.versions[unaspired[0]]
            with self._lock:
                state.state = UNLOADING
                state.servable = None
                state.state = END
            logging.info("model %s version %d unloaded", name, unaspired[0])

    def _should_retry(self, state: VersionState) -> bool:
        return state.attempts <= self._max_retries and time.time() - state.last_attempt >= self._retry_interval

    def _load(self, model: Model, name: str, version: int, path: str) -> Optional[str]:
        with self._lock:
            state = model.versions.setdefault(version, VersionState())
            state.state, state.attempts, state.last_attempt = LOADING, state.attempts + 1, time.time()
        started = time.time()
        try:
            handler = self._warmup_handler if self._enable_warmup else None
            loaded = servable_lib.load(name, version, path, handler, self._on_warmup, stopping=self._stop.is_set)
        except servable_lib.LoadAbandoned as e:
            logging.info("model %s version %d: %s", name, version, e.message)
            with self._lock:
                state.state, state.error_code, state.error_message, state.servable = END, e.code.name, e.message, None
            return e.message
        except Exception as e:  # noqa: BLE001 - any load failure is reported in status, old versions keep serving
            message = servable_lib.clean_message(getattr(e, "message", None) or str(e)) or type(e).__name__
            code = e.code.name if isinstance(e, ServingError) else "UNKNOWN"
            logging.error("model %s version %d failed to load: %s", name, version, message)
            with self._lock:
                state.state, state.error_code, state.error_message, state.servable = END, code, message, None
            self._on_load(path, False, time.time() - started)
            return message
        with self._lock:
            state.servable, state.state, state.error_code, state.error_message = loaded, AVAILABLE, "OK", ""
        self._on_load(path, True, time.time() - started)
        return None

    def wait_until_available(self, poll_seconds: float, stop: threading.Event) -> None:
        """Blocks, rescanning, until every model has an AVAILABLE version (TF Serving's startup).

        A model whose base path holds no version yet keeps the server from
        opening its ports, as in TF Serving, until one appears.
        """
        while not stop.is_set():
            with self._lock:
                waiting = [name for name, model in self._models.items()
                           if not any(s.state == AVAILABLE for s in model.versions.values())]
            if not waiting:
                return
            logging.warning("waiting for a version of %s to become available", ", ".join(sorted(waiting)))
            if stop.wait(max(poll_seconds, 1.0)):
                return
            self.rescan()

    def start_polling(self, seconds: float) -> None:
        if seconds <= 0:
            return

        def loop():
            while not self._stop.wait(seconds):
                try:
                    self.rescan()
                except Exception:  # noqa: BLE001 - polling must survive a bad directory
                    logging.exception("file system poll failed")

        threading.Thread(target=loop, name="fs-poll", daemon=True).start()

    def stop(self) -> None:
        """No load starts after this, and one in progress is abandoned at its next warmup request."""
        self._stop.set()

    # --- lookups ---
    def model_names(self) -> List[str]:
        with self._lock:
            return list(self._models)

    def resolve(self, model_spec) -> servable_lib.Servable:
        """The servable a ModelSpec names (TF Serving's ServableRequestFromModelSpec)."""
        name = model_spec.name
        if not name:
            raise invalid("ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            model = self._models.get(name)
            if choice == "version_label":
                label = model_spec.version_label
                if model is None or label not in model.labels:
                    raise invalid(f"Unrecognized servable version label: {label}")
                return self._specific(model, name, model.labels[label])
            if choice == "version":
                return self._specific(model, name, model_spec.version.value)
            if model is not None:
                available = [v for v, s in model.versions.items() if s.state == AVAILABLE and s.servable]
                if available:
                    return model.versions[max(available)].servable
        raise not_found(f"Servable not found for request: Latest({name})")

    @staticmethod
    def _specific(model: Optional[Model], name: str, version: int) -> servable_lib.Servable:
        state = model.versions.get(version) if model is not None else None
        if state is None or state.state != AVAILABLE or state.servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return state.servable

    def status(self, name: str, version: Optional[int] = None) -> List[Tuple[int, VersionState]]:
        """(version, state) newest first; NOT_FOUND like TF Serving when there is nothing to show."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in model.versions:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(version, dataclasses.replace(model.versions[version]))]
            return [(v, dataclasses.replace(s)) for v, s in sorted(model.versions.items(), reverse=True)]
