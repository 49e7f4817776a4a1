"""Runs one span with the TFX LocalDagRunner and turns its outcome into a history record.

The record is read back from what the components wrote to MLMD and their
artifacts (live evaluation and rollback test, Evaluator metrics, the
PairedGate's verdict, push), appended
to `WORK/history.jsonl`, and returned for the backfill report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

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


class SpanInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped a span's run; it is recorded as interrupted and nothing half-made serves."""

    exit_status = 130  # the shell's convention for a command stopped by SIGINT

    def __init__(self, message: str, record: Dict[str, Any]):
        super().__init__(message)
        self.record = record


INTERRUPTING = (signal.SIGINT, signal.SIGTERM)


def run_span(config: IncrecConfig, span: int, on_component: Optional[Callable[[str], None]] = None,
             verbose: bool = False) -> Dict[str, Any]:
    """Runs the pipeline for one span; returns its history record.

    The pipeline runs in a child process of its own process group, which this
    one supervises: Ctrl-C or SIGTERM here kills the whole group at once
    (TFX and Beam swallow a KeyboardInterrupt and carry on), records the run
    as interrupted and raises SpanInterrupted. Stopping anywhere is safe:
    every change to the deployment is a rename or a compare-and-swap
    (docs/ARCHITECTURE.md, "Deployment state"), so rerunning the span gives
    what one uninterrupted run gives. The child dies with this process, so a
    kill -9 of `increc run` stops everything too. Raises SpanRunError when the
    pipeline stopped (bad data, anomalies, a failed component).
    """
    if is_remote(config.metadata_path):
        raise ValueError(f"ML Metadata cannot live at {config.metadata_path}: the local runner keeps it in a sqlite "
                         f"file, which must be local; set \"metadata\" in --config to a local path")
    span_dir = os.path.join(config.data_dir, f"span-{span}")
    if not files.isdir(span_dir):
        raise FileNotFoundError(f"no span {span}: {span_dir} does not exist")
    with work_lock(config.work_dir):
        started = time.time()
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_run_in_child,
                                args=(dataclasses.asdict(config), span, started, send, verbose),
                                name=f"increc-span-{span}")
        stopped: List[int] = []
        previous_handlers = _on_signals(lambda signum: stopped.append(signum) or _kill_group(child.pid))
        try:
            child.start()
            send.close()
            outcome = _supervise(child, receive, stopped, on_component)
        finally:
            _restore_signals(previous_handlers)
            if child.is_alive():
                _kill_group(child.pid)
            child.join()
        if stopped:
            record = {"span": span, "mode": config.mode, "time": round(started, 3), "status": "interrupted",
                      "error": f"interrupted by {signal.Signals(stopped[0]).name}",
                      "run_seconds": round(time.time() - started, 3), "pushed_version": None}
            append_history(config, record)
            raise SpanInterrupted(f"span {span}: interrupted by {signal.Signals(stopped[0]).name}; "
                                  f"nothing half-made was deployed, run the span again", record)
        if outcome is None:
            record = {"span": span, "mode": config.mode, "time": round(started, 3), "status": "failed",
                      "error": f"the run's process died (exit code {child.exitcode})",
                      "run_seconds": round(time.time() - started, 3), "pushed_version": None}
            append_history(config, record)
            raise SpanRunError(f"span {span}: {record['error']}", record)
        record, error = outcome
        if error is not None:
            raise SpanRunError(f"span {span}: {error}", record)
        return record


def _supervise(child, receive, stopped: List[int], on_component) -> Optional[tuple]:
    """Relays the child's progress until it ends; returns (record, error or None), or None if it sent none."""
    outcome = None
    while not stopped:
        if receive.poll(0.2):
            try:
                kind, *payload = receive.recv()
            except EOFError:
                break
            if kind == "component" and on_component is not None:
                on_component(payload[0])
            elif kind == "outcome":
                outcome = tuple(payload)
        elif not child.is_alive():
            break
    return outcome


def _on_signals(handler):
    """Installs `handler(signum)` for Ctrl-C and SIGTERM; returns what to restore (nothing off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {signum: signal.signal(signum, lambda n, _: handler(n)) for signum in INTERRUPTING}


def _restore_signals(previous) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def _kill_group(pid: Optional[int]) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_in_child(fields: Dict[str, Any], span: int, started: float, send, verbose: bool) -> None:
    """The pipeline run itself, in the supervised child process."""
    os.setsid()  # a process group of its own: a terminal's Ctrl-C reaches the supervisor, which stops the group
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    config = IncrecConfig(**fields)
    from pipeline.cli import _quiet

    _quiet(verbose)
    progress = _ComponentNames(send)
    logging.getLogger("absl").addHandler(progress)
    try:
        record, error = _run_pipeline(config, span, started)
    finally:
        logging.getLogger("absl").removeHandler(progress)
    send.send(("outcome", record, error))
    send.close()


def _run_pipeline(config: IncrecConfig, span: int, started: float):
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipeline import outcome, timeline
    from pipeline.pipeline import create_pipeline

    pipeline = create_pipeline(config, span)
    skip_tfx_self_packaging(config.resolved_beam_args())
    cache_beam_signatures()
    error: Optional[BaseException] = None
    try:
        LocalDagRunner().run(pipeline)
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
    return record, (record["error"] if error is not None else None)


def skip_tfx_self_packaging(beam_args) -> None:
    """On the DirectRunner, stops TFX from packaging its own install before every Beam component.

    Given any Beam args without a dependency option, TFX copies its install tree (~49 MB) to a new temp
    directory and builds an sdist there, ~2.5 s per component, so that remote workers can import it; the
    directories are never removed, so a daily deployment fills its disk. DirectRunner workers are this
    machine's Python and never read the package. Remote runners keep the behaviour (docs/ARCHITECTURE.md,
    "Beam runners and file systems"). Called in the per-span child process, so it touches no other run.
    """
    from components.ingest import beam_options

    if not beam_options(beam_args)[1]:
        return
    from tfx.utils import dependency_utils

    dependency_utils.make_beam_dependency_flags = list  # the args as given


def cache_beam_signatures() -> None:
    """Makes Beam look up each DoFn method's arguments once per process instead of on every use.

    Beam reads them with `inspect.signature` whenever it builds a bundle
    processor or checks a DoFn for state: ~170,000 calls for a 10,000-row
    span, over ~560 distinct functions, 5-8 s of a 40 s run. A function's
    arguments do not change, so plain functions and bound methods (keyed by
    their function) are looked up once; other callables go to Beam as before.
    Copies are returned, so no caller can change the cached lists. Applies to
    this process only: pipeline construction and the in-process DirectRunner.
    """
    from apache_beam.transforms import core

    lookup = core.get_function_args_defaults
    if getattr(lookup, "increc_cached", False):
        return
    known: Dict[Any, tuple] = {}

    def cached(f):
        if inspect.ismethod(f):
            key = (f.__func__, True)
        elif inspect.isfunction(f):
            key = (f, False)
        else:
            return lookup(f)
        found = known.get(key)
        if found is None:
            found = known[key] = lookup(f)
        return list(found[0]), list(found[1])

    cached.increc_cached = True
    core.get_function_args_defaults = cached


class _ComponentNames(logging.Handler):
    """Sends the name of each component the LocalDagRunner starts to the supervisor (for the progress bar)."""

    def __init__(self, send):
        super().__init__(logging.INFO)
        self.send = send

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Component ") and message.endswith(" is running."):
            self.send.send(("component", message[len("Component "):-len(" is running.")]))


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when its supervisor dies, so kill -9 of `increc run` stops the run too."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
