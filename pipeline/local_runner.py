"""Runs one span with the TFX LocalDagRunner and turns its outcome into a history record.

The record is read back from what the components wrote to MLMD and their
artifacts (live evaluation, Evaluator metrics and blessing, push), appended
to `WORK/history.jsonl`, and returned for the backfill report.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Set

from pipeline import files
from pipeline.config import IncrecConfig, is_remote


class SpanRunError(RuntimeError):
    """A span's run stopped; the message says why in a user's terms."""

    def __init__(self, message: str, record: Dict[str, Any]):
        super().__init__(message)
        self.record = record


class WorkBusyError(RuntimeError):
    """Another process holds the work directory's lock."""


_held_locks: Set[str] = set()  # work directories whose lock this process holds


@contextlib.contextmanager
def work_lock(work_dir: str):
    """One run at a time per work directory (a second one would race on versions and vocabularies).

    Re-entrant within a process: the CLI takes the lock before it saves the
    deployment's settings and holds it across a whole backfill, and each
    span's run_span takes it again without waiting on itself.

    A file lock needs a local work directory; on a remote one (gs://...) the
    scheduler that starts the runs (Kubeflow, cron) keeps them one at a time.
    """
    key = work_dir if is_remote(work_dir) else os.path.realpath(work_dir)
    if is_remote(work_dir) or key in _held_locks:
        yield
        return
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkBusyError(f"another increc command holds {work_dir}; wait for it to finish") from None
        _held_locks.add(key)
        try:
            yield
        finally:
            _held_locks.discard(key)


def append_history(config: IncrecConfig, record: Dict[str, Any]) -> None:
    """Adds a line to history.jsonl (rewritten whole and renamed into place: object stores cannot append)."""
    text = files.read_text(config.history_path) or ""
    files.write_text(config.history_path, text + json.dumps(record, sort_keys=True) + "\n")


def read_history(work_dir: str) -> List[Dict[str, Any]]:
    text = files.read_text(os.path.join(work_dir, "history.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _root_cause(error: BaseException) -> str:
    """The innermost message of a chained error (Beam and TFX wrap the executor's own)."""
    from components.deployment_guard import DataAnomaliesError
    from components.example_gen import MalformedInputError

    seen = error
    while seen is not None:
        if isinstance(seen, (DataAnomaliesError, MalformedInputError)):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for marker in ("MalformedInputError: ", "DataAnomaliesError: "):
        if marker in text:
            return text.split(marker, 1)[1].split(" [while running", 1)[0].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def run_span(config: IncrecConfig, span: int) -> Dict[str, Any]:
    """Runs the pipeline for one span; returns its history record (raises SpanRunError on a stop)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from tfx import v1 as tfx

    from pipeline import outcome, timeline
    from pipeline.pipeline import create_pipeline

    if is_remote(config.metadata_path):
        raise ValueError(f"ML Metadata cannot live at {config.metadata_path}: the local runner keeps it in a sqlite "
                         f"file, which must be local; set \"metadata\" in --config to a local path")
    span_dir = os.path.join(config.data_dir, f"span-{span}")
    if not files.isdir(span_dir):
        raise FileNotFoundError(f"no span {span}: {span_dir} does not exist")
    with work_lock(config.work_dir):
        started = time.time()
        pipeline = create_pipeline(config, span)
        error: Optional[BaseException] = None
        try:
            tfx.orchestration.LocalDagRunner().run(pipeline)
        except Exception as e:  # noqa: BLE001 - reported below with its root cause
            error = e
        record = outcome.collect(config, span, started)
        record["run_seconds"] = round(time.time() - started, 3)
        if error is not None:
            record["status"] = "failed"
            record["error"] = _root_cause(error)
            logging.debug("span %d failed", span, exc_info=error)
        append_history(config, record)
        timeline.record_span(config.tensorboard_dir, record)
        if error is not None:
            raise SpanRunError(f"span {span}: {record['error']}", record) from error
        return record
