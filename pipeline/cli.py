"""The `increc` command line (DESIGN.md, "CLI").

Every command checks its arguments, its config and the files they point at
before it acts (pipeline/config.py, pipeline/preflight.py), with TensorFlow,
Beam and TFX imported only once those checks passed: bad input is refused in
well under a second, with one line naming the flag, key, file, line or
column. Exit status: 0 done, 1 a run or an operation failed (or another
command holds the work directory), 2 a usage or validation error, 130
interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hides CUDA plugin noise at import

FORMATS = ("csv", "movielens", "movielens-100k", "movielens-1m", "movietweetings", "synthetic")
CONFIG_FILE = "config.json"
# Knobs a user may set per run on the command line (the rest come from --config or config.json).
TUNABLE = {
    "epochs": int, "learning_rate": float, "batch_size": int, "replay_fraction": float,
    "auc_tolerance": float, "gate_indifference": float, "rollback_tolerance": float, "gate_confidence": float,
    "rollback_confidence": float, "bad_row_budget": float,
    "keep_versions": int, "serving_address": str, "model_name": str, "optimizer": str,
}
NOT_SAVED_REASON = "is a per-run setting and is never saved; remove it (pass --mode, --force or --config to a run)"
NOT_IN_CONFIG_FILE = {"work_dir": "is given by --work, not by a config file",
                      "data_dir": "is given by --data (the deployment's own: increc config --set data_dir=...)"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DESCRIPTION = ("Incremental learning for a recommender on TFX: prepare spans, run them, serve the model. "
               "Exit status: 0 done; 1 a run failed, or another command holds the work directory; "
               "2 a usage or validation error; 130 interrupted.")


def _quiet(verbose: bool) -> None:
    """TFX, Beam and TF log a great deal; show warnings only unless asked."""
    warnings.filterwarnings("ignore")
    if verbose:
        return
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)  # our progress hook reads INFO lines
    absl_logging.get_absl_handler().setLevel(logging.WARNING)
    for name in ("apache_beam", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Libraries install root handlers at INFO; TFX also warns about things it handles itself
    # (e.g. unsupported MLMD query predicates). Only errors reach the terminal.
    absl_logger = logging.getLogger("absl")
    absl_logger.propagate = False
    errors_only = logging.StreamHandler(sys.stderr)
    errors_only.setLevel(logging.ERROR)
    absl_logger.addHandler(errors_only)


def _note(message: str) -> None:
    print(f"increc: note: {message}", file=sys.stderr, flush=True)


# --- argument types (argparse turns ArgumentTypeError into a one-line usage error, exit 2) ---

def parse_spans(text: str) -> Tuple[int, int]:
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"spans must look like 1-4 or 3, got {text!r}") from None
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"span range {text!r} must satisfy 1 <= A <= B")
    return a, b


def _at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


span_number = _at_least(1, "a span number >= 1")
positive_int = _at_least(1, "an integer >= 1")
version_number = _at_least(0, "a version number >= 0")


def top_k(text: str) -> int:
    value = _at_least(1, "an integer from 1 to 1000")(text)
    if value > 1000:  # models.export.MAX_K: the signature refuses more
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 1000, got {value}")
    return value


def path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a non-empty path")
    return text


def port_number(text: str) -> int:
    value = _at_least(1, "a port from 1 to 65535")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the flag and the problem, then where help is."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# --- the deployment's settings: WORK/config.json, --config, flags ---

def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_path(work: str) -> str:
    from pipeline.config import resolve_path

    return os.path.join(resolve_path(work), CONFIG_FILE)


def read_saved(work: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """(the text of WORK/config.json or None, its settings checked); ConfigError naming the file."""
    from pipeline import files
    from pipeline.config import ConfigError, PER_RUN, check_values, parse_json_object

    path = config_path(work)
    try:
        text = files.read_text(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if text is None:
        return None, {}
    values = parse_json_object(text, path)
    values.pop("work_dir", None)  # earlier versions saved it; the file's own directory is the work directory
    return text, check_values(values, path, forbidden={key: NOT_SAVED_REASON for key in PER_RUN})


def read_config_file(path: str) -> Dict[str, Any]:
    """A --config file's settings, checked; ConfigError naming the file (and line, key, type)."""
    from pipeline.config import ConfigError, check_values, parse_json_object

    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    return check_values(parse_json_object(text, where), where, forbidden=NOT_IN_CONFIG_FILE)


class Loaded:
    """A command's config, built from defaults, WORK/config.json, --config and flags, all checked."""

    def __init__(self, config, saved_text: Optional[str], saved: Dict[str, Any], notes: List[str]):
        self.config, self.saved_text, self.saved, self.notes = config, saved_text, saved, notes
        self.schema_present = False  # whether WORK had a curated schema when a run's checks were made


def load_config(args) -> Loaded:
    """The deployment's saved settings, then --config, then flags: each layer checked where it comes from.

    Nothing is written: the first run saves the result (save_config) once it
    holds the work directory's lock; after that, --config and flags are
    one-off overrides for the command that got them.
    """
    from pipeline.config import ConfigError, IncrecConfig, check_value, resolve_path

    saved_text, values = read_saved(args.work)
    saved = dict(values)
    notes: List[str] = []
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for key in TUNABLE:
        value = getattr(args, key, None)
        if value is not None:
            try:
                values[key] = check_value(key, value)
            except ConfigError as e:
                raise ConfigError(f"{_flag(key)} {e.problem}", key, e.problem) from None
    saved_data = values.get("data_dir")
    if getattr(args, "data", None):
        if saved_text is not None and saved_data and resolve_path(args.data) != resolve_path(saved_data):
            notes.append(f"--data {args.data} is used for this command only; the deployment's data directory is "
                         f"{saved_data} (increc config --work {args.work} --set data_dir=... changes it)")
        values["data_dir"] = args.data
    values.setdefault("data_dir", args.work)
    values["work_dir"] = args.work
    if getattr(args, "mode", None):
        values["mode"] = args.mode
    if getattr(args, "force", False):
        values["force_push"] = True
    try:
        config = IncrecConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"config: {e}") from None
    return Loaded(config, saved_text, saved, notes)


def save_config(config) -> None:
    """Writes the deployment's settings (atomically): only the first run that holds the lock calls this."""
    from pipeline import files

    files.write_text(os.path.join(config.work_dir, CONFIG_FILE),
                     json.dumps(config.saved_settings(), indent=2, sort_keys=True) + "\n")


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval_text(test: Optional[Dict[str, Any]]) -> str:
    """A paired AUC test as 'difference [lower, upper]' ('-' when nothing was compared)."""
    if not test or test.get("difference") is None:
        return "-"
    if test.get("lower") is None:
        return f"{test['difference']:+.4f}"
    return f"{test['difference']:+.4f} [{test['lower']:+.4f}, {test['upper']:+.4f}]"


def gate_text(record: Dict[str, Any]) -> str:
    """The paired gate's verdict in a line: the AUC difference, its interval and the reason."""
    gate = record.get("gate")
    if not gate:
        return ""
    if gate.get("difference") is None:
        return f"gate: {gate['reason']}"
    level = f"{100 * gate['confidence']:g}% interval " if gate.get("lower") is not None else ""
    return f"gate {level}{interval_text(gate)}: {gate['reason']}"


def span_line(record: Dict[str, Any]) -> str:
    if record.get("event") == "rollback":
        return f"manual rollback: v{record['rolled_back_version']} -> v{record['restored_version']}"
    if record.get("status") != "ok":
        return f"span {record['span']}: STOPPED - {record.get('error', 'unknown error')}"
    decision = "blessed" if record["blessed"] else "NOT blessed"
    push = f"pushed v{record['pushed_version']}" if record["pushed_version"] else "not pushed"
    if record.get("forced_push"):
        push += " (forced)"
    rolled = ""
    if record.get("rolled_back"):
        rolled = f"ROLLED BACK v{record['rolled_back_version']} -> v{record['restored_version']}; "
    caught_up = record.get("caught_up_spans")
    caught_up = f" (with span{'s' if len(caught_up) > 1 else ''} {', '.join(map(str, caught_up))})" if caught_up else ""
    gate = f" [{gate_text(record)}]" if record.get("gate") else ""
    ranking = record.get("ranking") or {}
    recall = f", recall@10 {_fmt(ranking.get('recall@10'))}" if ranking.get("users") else ""
    return (f"span {record['span']}: live AUC {_fmt(record['live_auc'])} (previous {_fmt(record['previous_auc'])})"
            f"{recall}, {rolled}"
            f"candidate AUC {_fmt(record['candidate_auc'])} vs baseline {_fmt(record['baseline_auc'])}: "
            f"{decision}, {push}; serving v{_fmt(record['serving_version'])}; "
            f"{record['examples_trained']} examples{caught_up}, train {record['train_seconds']:.1f}s, "
            f"run {record['run_seconds']:.1f}s{gate}")


def run_spans(config, spans: List[int], show_progress: bool = True, verbose: bool = False) -> List[Dict[str, Any]]:
    """Runs spans in order with a progress bar that names the running component; stops at an interrupt."""
    from tqdm import tqdm

    from pipeline.local_runner import SpanInterrupted, SpanRunError, run_span

    records = []
    bar = tqdm(total=len(spans), unit="span", disable=not show_progress, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} spans [{elapsed}<{remaining}{postfix}]")
    try:
        for span in spans:
            bar.set_description(f"span {span}")
            try:
                record = run_span(config, span, on_component=bar.set_postfix_str, verbose=verbose)
            except SpanRunError as e:
                record = e.record
            except SpanInterrupted as e:
                bar.write(span_line(e.record))
                raise
            records.append(record)
            bar.write(span_line(record))
            bar.update(1)
    finally:
        bar.close()
    return records


RANKING_SHOWN = ("precision@10", "recall@10", "ndcg@10", "recall@50", "ndcg@50")


def ranking_text(record: Dict[str, Any]) -> str:
    ranking = record.get("ranking") or {}
    if not ranking.get("users"):
        return ""
    return (f"top-K of the serving version on {ranking['users']} users' span positives: "
            + ", ".join(f"{m} {_fmt(ranking.get(m))}" for m in RANKING_SHOWN))


def backfill_report(mode: str, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    fields = ("span", "live_auc", "previous_auc", "candidate_auc", "baseline_auc", "blessed", "pushed_version",
              "rolled_back", "serving_version", "examples_trained", "train_seconds", "run_seconds")
    spans = [{k: r.get(k) for k in fields} for r in records]
    for span, record in zip(spans, records):
        span["status"] = record.get("status", "ok")
        if record.get("error"):
            span["error"] = record["error"]
        if record.get("ranking"):
            span["ranking"] = record["ranking"]
    live = [s["live_auc"] for s in spans if s["live_auc"] is not None]
    out = {"mode": mode, "spans": spans, "mean_live_auc": sum(live) / len(live) if live else None}
    for metric in RANKING_SHOWN:
        values = [s["ranking"][metric] for s in spans if (s.get("ranking") or {}).get(metric) is not None]
        out[f"mean_live_{metric}"] = sum(values) / len(values) if values else None
    return out


# --- commands ---

def cmd_prepare(args) -> int:
    from components import synthetic
    from pipeline import preflight

    preflight.check_prepare(args)  # the flags and the input's header, before TensorFlow and Beam load
    spec = None
    if args.format == "synthetic":
        spec = synthetic.Spec(rows=args.rows, users=args.users, items=args.items, seed=args.seed, days=args.days,
                              start=args.start)
    from components import ingest  # TensorFlow and Beam: only once the arguments make sense

    manifest = ingest.prepare(args.format, args.input, args.out, spans=args.spans, span_by=args.span_by,
                              label_threshold=args.label_threshold, overwrite=args.overwrite,
                              history=args.history, append=args.append, synthetic_spec=spec,
                              beam_args=args.beam_args, allow_old_timestamps=args.allow_old_timestamps,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    first, last = manifest["ingests"][-1]["spans"]
    added = [s for s in manifest["spans"] if first <= s["span"] <= last]
    for span in added:
        print(f"span {span['span']}: {span['rows']} rows, {span['positives']} positive, "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(span['min_timestamp']))} .. "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(span['max_timestamp']))} UTC")
    rows = sum(s["rows"] for s in added)
    print(f"{rows} rows in {len(added)} spans under {args.out}"
          + (f" (appended: {len(manifest['spans'])} spans in all)" if args.append else ""))
    return EXIT_OK


def _checked_run(args, spans: List[int]) -> Loaded:
    """The run's config and every check a run needs, made before anything is written or imported."""
    from pipeline import preflight

    loaded = load_config(args)
    config = loaded.config
    preflight.creatable_dir(config.work_dir, "--work")
    preflight.metadata_local(config)
    preflight.check_spans(config, spans)
    if loaded.saved_text is not None:
        preflight.model_shape_unchanged(config, loaded.saved)
    if getattr(args, "report", None):
        preflight.writable_file(args.report, "--report")
    loaded.schema_present = preflight.exists(config.schema_path)
    return loaded


def _run(args, spans: List[int]) -> Tuple[Any, List[Dict[str, Any]]]:
    """Checks everything, then, holding the work directory's lock, saves a first run's settings and runs the spans.

    A command refused by a check or by the lock changes nothing in WORK (it is
    not even created); the settings are saved only by the first run, and only
    once it holds the lock.
    """
    from pipeline import preflight
    from pipeline.local_runner import work_lock

    loaded = _checked_run(args, spans)
    with work_lock(loaded.config.work_dir):
        # Another command may have saved the settings or the schema between the checks and the lock.
        saved_now, _ = read_saved(args.work)
        if saved_now != loaded.saved_text or preflight.exists(loaded.config.schema_path) != loaded.schema_present:
            loaded = _checked_run(args, spans)
        for note in loaded.notes:
            _note(note)
        if loaded.saved_text is None:
            save_config(loaded.config)
            _note(f"first run of this deployment: its settings are saved in {config_path(args.work)}; later runs "
                  f"use them, and their flags apply to that run only (increc config --work {args.work} "
                  f"shows and changes them)")
        records = run_spans(loaded.config, spans, show_progress=not args.no_progress, verbose=args.verbose)
    return loaded.config, records


def cmd_run(args) -> int:
    _, records = _run(args, [args.span])
    return EXIT_OK if records[0].get("status") == "ok" else EXIT_FAILED


def cmd_backfill(args) -> int:
    first, last = args.spans
    config, records = _run(args, list(range(first, last + 1)))
    report = backfill_report(config.mode, records)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.report}")
    print(f"mean live AUC over spans {first}-{last}: {_fmt(report['mean_live_auc'])}")
    if report.get("mean_live_recall@10") is not None:
        print(f"mean live recall@10 {_fmt(report['mean_live_recall@10'])}, "
              f"NDCG@10 {_fmt(report['mean_live_ndcg@10'])} (top 10 of `recommend` against each span's positives)")
    return EXIT_OK if all(r.get("status") == "ok" for r in records) else EXIT_FAILED


def cmd_config(args) -> int:
    """Shows the deployment's settings, or changes them (--set key=value, each checked, written atomically)."""
    from pipeline import files, preflight
    from pipeline.config import (ConfigError, IncrecConfig, PER_RUN, check_value, defaults, field_names, parse_text,
                                 shown, suggest)
    from pipeline.local_runner import work_lock

    preflight.work_dir_present(args.work)
    path = config_path(args.work)
    text, saved = read_saved(args.work)
    if not args.set:
        show = {k: v for k, v in dict(defaults(), **saved).items() if k not in PER_RUN}
        if args.json:
            print(json.dumps(show, indent=2, sort_keys=True))
            return EXIT_OK
        if text is None:
            print(f"no settings saved in {args.work} yet (the first run or backfill saves them); the defaults:")
        else:
            print(f"settings of {args.work} ({path}); flags of run and backfill override them for that run only:")
        width = max(len(k) for k in show)
        base = defaults()
        for key in sorted(show):
            origin = ""
            if key not in saved:
                origin = "  (default)" if text is None else "  (default: not in config.json)"
            elif key in base and saved[key] == base[key]:
                origin = "  (default)"
            print(f"  {key.ljust(width)}  {shown(show[key])}{origin}")
        print(f"per run only, never saved: {', '.join(PER_RUN)} (--mode, --force, --config)")
        return EXIT_OK

    if text is None:
        raise ConfigError(f"{path}: no such file: the first run or backfill of {args.work} saves the settings "
                          f"(give them there with flags or --config)")
    known = [k for k in field_names() if k != "work_dir" and k not in PER_RUN]
    changes: Dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip()
        where = f"--set {item}"
        if not sep:
            raise ConfigError(f"{where}: expected key=value")
        if key in PER_RUN:
            raise ConfigError(f"{where}: {key} is a per-run setting and is never saved (give it to run or backfill: "
                              f"--mode, --force, --config)")
        if key == "work_dir":
            raise ConfigError(f"{where}: the work directory is where config.json lives, not a setting")
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} ({suggest(key, known)})")
        try:
            changes[key] = check_value(key, parse_text(key, value))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    with work_lock(args.work):
        text, saved = read_saved(args.work)  # as it is now, under the lock
        before = dict(defaults(), **saved)
        values = dict(saved, **changes)
        try:
            config = IncrecConfig(**dict(values, data_dir=values.get("data_dir", args.work), work_dir=args.work))
        except ConfigError as e:
            raise ConfigError(f"--set: {e}") from None
        if "data_dir" in changes:
            preflight.data_dir_present(config.data_dir, "--set data_dir")
        if "metadata" in changes:
            preflight.metadata_local(config)
        after = config.saved_settings()
        if "data_dir" not in values:
            del after["data_dir"]  # a hand-made config.json without one: the commands' default stays
        files.write_text(path, json.dumps(after, indent=2, sort_keys=True) + "\n")
    for key in sorted(changes):
        if before.get(key) == after[key]:
            print(f"{key}: {shown(after[key])} (unchanged)")
        else:
            print(f"{key}: {shown(before.get(key))} -> {shown(after[key])}")
    print(f"saved in {path}; the next run uses it")
    reshaped = [k for k in preflight.MODEL_SHAPE if k in changes and before.get(k) != after[k]]
    if reshaped and preflight.exists(config.schema_path):
        _note(f"{', '.join(reshaped)} changed the model's shape: the serving model cannot warm-start a model "
              f"of the new shape, so run the next span with --mode full")
    return EXIT_OK


def read_history(work: str) -> List[Dict[str, Any]]:
    """WORK/history.jsonl's records; a line that is not JSON is named (file and line), not a traceback."""
    from pipeline import files, local_runner

    try:
        return local_runner.read_history(work)
    except json.JSONDecodeError as e:
        path = os.path.join(work, "history.jsonl")
        for number, line in enumerate((files.read_text(path) or "").splitlines(), start=1):
            if line.strip() and line.strip() == e.doc.strip():
                raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}, column {e.colno})") from None
        raise ValueError(f"{path}: not a JSON record ({e.msg})") from None


def cmd_history(args) -> int:
    from pipeline import preflight
    preflight.work_dir_present(args.work)
    records = read_history(args.work)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no history in {args.work}")
        return 0
    header = ("span", "mode", "status", "live_auc", "logged_auc", "recall@10", "previous_auc", "candidate_auc",
              "baseline_auc", "gate_difference", "blessed", "pushed", "rolled_back", "serving", "trained", "caught_up",
              "train_s", "run_s")
    rows = [header]
    for r in records:
        if r.get("event") == "rollback":
            rows.append(("-", "manual", "rollback", "-", "-", "-", "-", "-", "-", "-", "-", "-", "yes",
                         _fmt(r.get("restored_version")), "0", "-", "-", "-"))
            continue
        rows.append((str(r["span"]), r.get("mode", "-"), r.get("status", "ok"), _fmt(r.get("live_auc")),
                     _fmt(r.get("live_auc_logged_features")), _fmt((r.get("ranking") or {}).get("recall@10")),
                     _fmt(r.get("previous_auc")), _fmt(r.get("candidate_auc")), _fmt(r.get("baseline_auc")),
                     interval_text(r.get("gate")), "yes" if r.get("blessed") else "no", _fmt(r.get("pushed_version")),
                     "yes" if r.get("rolled_back") else "no", _fmt(r.get("serving_version")),
                     str(r.get("examples_trained", 0)), ",".join(map(str, r.get("caught_up_spans") or [])) or "-",
                     _fmt(r.get("train_seconds"), 1), _fmt(r.get("run_seconds"), 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("live_auc: the serving version called with ids alone (features from its snapshot); logged_auc: the same "
          "version with the features logged with each row; recall@10: its recommend on the span's positives")
    # The tests behind the decisions, one line each: the gate's and any rollback's.
    for r in records:
        if r.get("gate"):
            print(f"span {r['span']}: {gate_text(r)}")
        test = r.get("rollback_test")
        if test:
            verdict = "rolled back" if test.get("roll_back") else "kept"
            print(f"span {r['span']}: rollback test {100 * test['confidence']:g}% interval "
                  f"{interval_text(test)}: {verdict}, {test['reason']}")
    for r in records:
        if r.get("error"):
            print(f"span {r['span']}: {r['error']}")
    return 0


def cmd_status(args) -> int:
    from pipeline import preflight

    preflight.work_dir_present(args.work)
    config = load_config(args).config
    from components.deployment import DeploymentState

    state = DeploymentState(config.serving_dir, config.model_name)
    deployment = state.current()
    on_disk = state.versions_on_disk()
    print(f"work directory: {config.work_dir}")
    print(f"model: {config.model_name}  base path: {config.model_base_path}")
    print(f"versions on disk: {', '.join(map(str, on_disk)) or 'none'}")
    if deployment is None:
        print("nothing deployed yet")
    else:
        labels = ", ".join(f"{k} -> {v}" for k, v in sorted(deployment.labels.items()))
        print(f"configured versions: {', '.join(map(str, deployment.versions))}; labels: {labels}")
    for version, details in sorted(state.rolled_back().items()):
        aucs = ""
        if details.get("live_auc") is not None:
            aucs = f" (live AUC {_fmt(details['live_auc'])} vs previous {_fmt(details['previous_auc'])})"
        print(f"  v{version} rolled back to v{details['restored']}: {details['reason']}{aucs}")
    live_by_version: Dict[int, List[str]] = {}
    for r in read_history(config.work_dir):
        if r.get("live_auc") is not None and r.get("live_version") is not None:
            live_by_version.setdefault(r["live_version"], []).append(f"span {r['span']}: {_fmt(r['live_auc'])}")
    for version, values in sorted(live_by_version.items()):
        print(f"  v{version} live AUC: {'; '.join(values)}")
    loaded = _loaded_versions(config) if config.serving_address else None
    if loaded is not None:
        print(f"server at {config.serving_address}: " + (", ".join(f"v{v} {s}" for v, s in loaded) or "no versions"))
    elif not config.serving_address:
        print("no server address configured (serving_address is empty)")
    else:
        print(f"no server reachable at {config.serving_address}")
    history = read_history(config.work_dir)[-5:]
    if history:
        print("last decisions:")
        for r in history:
            print("  " + span_line(r))
        ranked = [r for r in history if ranking_text(r)]
        if ranked:
            print(f"span {ranked[-1]['span']}: {ranking_text(ranked[-1])}")
    return 0


def _loaded_versions(config) -> Optional[List[Tuple[int, str]]]:
    try:
        from serving.client import ServingClient
    except ImportError:
        return None
    client = ServingClient(config.serving_address, timeout=2.0)
    if not client.is_reachable():
        return None
    try:
        status = client.model_status(config.model_name)
    except Exception:  # noqa: BLE001 - a server without this model
        return []
    from tensorflow_serving.apis import get_model_status_pb2

    names = get_model_status_pb2.ModelVersionStatus.State
    return [(int(v.version), names.Name(v.state)) for v in status.model_version_status]


def cmd_compile(args) -> int:
    from pipeline import preflight

    config = load_config(args).config
    preflight.writable_file(args.output, "--output")
    from pipeline import kubeflow_runner

    path = kubeflow_runner.compile_pipeline(config, args.output, image=args.image,
                                            first_span=args.first_span)
    print(f"Kubeflow Pipelines (v2) spec written to {path}")
    return 0


def cmd_tensorboard(args) -> int:
    from pipeline import preflight
    from pipeline.config import IncrecConfig

    preflight.work_dir_present(args.work)
    logdir = IncrecConfig(data_dir=args.work, work_dir=args.work).tensorboard_dir
    if not preflight.isdir(logdir):
        raise preflight.UsageError(f"no TensorBoard logs under {logdir} (run a span first)")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", args.host, "--port", str(args.port)]
    print(f"TensorBoard on http://{args.host}:{args.port} over {logdir}")
    os.execv(sys.executable, command)
    return 0


def cmd_rollback(args) -> int:
    from pipeline import preflight
    from pipeline.local_runner import append_history, work_lock

    preflight.work_dir_present(args.work)
    config = load_config(args).config
    from components.deployment import DeploymentState, RollbackRefused

    state = DeploymentState(config.serving_dir, config.model_name, config.serving_address)
    with work_lock(config.work_dir):
        try:
            done = state.roll_back(args.to, reason="manual")
        except RollbackRefused as e:
            print(f"increc rollback: refused: {e}", file=sys.stderr)
            return EXIT_USAGE
        append_history(config, {"event": "rollback", "span": None, "status": "ok", "manual": True,
                                "rolled_back": True, "rolled_back_version": done.bad_version,
                                "restored_version": done.restored_version, "serving_version": done.restored_version,
                                "time": round(time.time(), 3)})
    print(f"rolled back: version {done.bad_version} -> {done.restored_version} is stable ({done.server})")
    return 0


def cmd_up(args) -> int:
    from pipeline import preflight

    preflight.work_dir_present(args.work)
    loaded = load_config(args)
    config = loaded.config
    if args.data:
        preflight.data_dir_present(config.data_dir)
    elif not preflight.isdir(config.data_dir):
        raise preflight.UsageError(f"the deployment's data directory {config.data_dir} does not exist (its newest "
                                   f"span gives the example queries); pass --data DATA")
    if args.port == args.rest_port:
        raise preflight.UsageError(f"--port and --rest-port are both {args.port}; give two ports")
    for note in loaded.notes:
        _note(note)
    from pipeline import serving_ops

    info = serving_ops.start(config, args.port, args.rest_port)
    state = "already running" if info.get("already_running") else "started"
    print(f"server {state} for {config.model_name} over {config.models_config_path}: gRPC 127.0.0.1:{info['port']}, "
          f"REST http://127.0.0.1:{info['rest_port']} (pid {info['pid']}, log {config.serving_dir}/server.log)")
    for line in serving_ops.demo_queries(config, info["port"], info["rest_port"]):
        print(line)
    return 0


def cmd_down(args) -> int:
    from pipeline import preflight, serving_ops

    preflight.work_dir_present(args.work)
    stopped = serving_ops.stop(load_config(args).config)
    print("server stopped" if stopped else "no server was running for this work directory")
    return 0


def cmd_predict(args) -> int:
    from pipeline import preflight

    preflight.work_dir_present(args.work)
    loaded = load_config(args)
    config = loaded.config
    if args.data:
        preflight.data_dir_present(config.data_dir)
    _checked_address(args)
    for note in loaded.notes:
        _note(note)
    from pipeline import serving_ops

    client = _serving_client(args, config)
    inputs = serving_ops.inputs_for(config, [(args.user, item) for item in args.item])
    version = None if args.version is None else args.version
    label = None if version is not None else args.label
    scores = client.predict(config.model_name, inputs, version=version, label=label)["probability"]
    for item, score in zip(args.item, scores):
        print(f"user {args.user} item {item}: {float(score):.6f}")
    return 0


def _checked_address(args) -> None:
    """--address, checked before anything heavy is imported."""
    from pipeline.config import ConfigError, check_value

    if args.address is not None:
        try:
            check_value("serving_address", args.address)
        except ConfigError as e:
            raise ConfigError(f"--address {e.problem}") from None


def _serving_client(args, config):
    from serving.client import ServingClient

    client = ServingClient(args.address or config.serving_address)
    if not client.is_reachable(wait=3):
        raise RuntimeError(f"no server at {args.address or config.serving_address}; start one with `increc up`")
    return client


def cmd_recommend(args) -> int:
    """The top k items for a user, from the `recommend` signature over gRPC: ids only."""
    import numpy as np

    from pipeline import preflight

    preflight.work_dir_present(args.work)
    loaded = load_config(args)
    _checked_address(args)
    for note in loaded.notes:
        _note(note)
    client = _serving_client(args, loaded.config)
    inputs = {"user_id": np.array([args.user.encode()], dtype=object), "k": np.array([args.k], np.int32),
              "exclude_seen": np.array([not args.include_seen])}
    label = None if args.version is not None else args.label
    out = client.predict(loaded.config.model_name, inputs, version=args.version, label=label,
                         signature="recommend")
    client.close()
    shown = [(i.decode(), float(s)) for i, s in zip(out["item_ids"][0], out["scores"][0]) if i]
    if not shown:
        print(f"user {args.user}: no items to recommend")
    for rank, (item, score) in enumerate(shown, 1):
        print(f"{rank:>3}. item {item}  {score:.6f}")
    return 0


def cmd_serve(argv: List[str]) -> int:
    from serving import server

    return server.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="increc", description=DESCRIPTION)
    parser.add_argument("--verbose", action="store_true", help="show TFX, Beam and TensorFlow logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="cut a raw interaction log into time-ordered spans (or append one)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--input", type=path, help="the raw log (a file, or the data set's directory); not for synthetic")
    p.add_argument("--out", type=path, required=True, help="DATA directory to write span-<N>/ into")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--spans", type=int, help="number of equal-size spans (default 10)")
    group.add_argument("--span-by", choices=("day", "hour"), dest="span_by")
    p.add_argument("--label-threshold", type=float, dest="label_threshold",
                   help="rating >= this is a positive (default per format)")
    p.add_argument("--append", action="store_true",
                   help="add the log as the next span(s) after the last one in --out; earlier spans stay as they are")
    p.add_argument("--overwrite", action="store_true", help="replace spans already in --out")
    p.add_argument("--no-history-features", action="store_false", dest="history",
                   help="do not add user_history, user_history_mean, item_history, item_history_mean")
    p.add_argument("--beam-arg", action="append", default=[], dest="beam_args", metavar="ARG",
                   help="a Beam pipeline option, e.g. --beam-arg=--runner=FlinkRunner (repeatable)")
    p.add_argument("--allow-old-timestamps", action="store_true", dest="allow_old_timestamps",
                   help="accept timestamps from 1970 on (by default they must fall in 1990-2100)")
    synthetic_log = p.add_argument_group("--format synthetic")
    synthetic_log.add_argument("--rows", type=int, default=1_000_000)
    synthetic_log.add_argument("--users", type=int, default=60_000)
    synthetic_log.add_argument("--items", type=int, default=20_000)
    synthetic_log.add_argument("--seed", type=int, default=0)
    synthetic_log.add_argument("--days", type=float, default=30.0)
    synthetic_log.add_argument("--start", type=int, help="first second, Unix time (default 2024-01-01 00:00 UTC; "
                                                         "with --append, where --out ends)")
    p.set_defaults(func=cmd_prepare)

    def work_args(p, data=True):
        p.add_argument("--work", type=path, required=True, help="the deployment's work directory")
        if data:
            p.add_argument("--data", type=path, required=True, help="DATA directory with span-<N>/")
        p.add_argument("--config", type=path, help="JSON file of IncrecConfig fields")

    def run_args(p):
        p.add_argument("--mode", choices=("incremental", "full"))
        p.add_argument("--force", action="store_true", help="push even when not blessed (operators, tests)")
        p.add_argument("--no-progress", action="store_true", dest="no_progress")
        for key, kind in TUNABLE.items():
            p.add_argument(f"--{key.replace('_', '-')}", type=kind, dest=key)

    p = sub.add_parser("run", help="one pipeline run for span N")
    work_args(p)
    p.add_argument("--span", type=span_number, required=True)
    run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("backfill", help="run spans A..B in order and write a report")
    work_args(p)
    p.add_argument("--spans", type=parse_spans, required=True, help="A-B")
    p.add_argument("--report", type=path, help="write the backfill report (JSON) here")
    run_args(p)
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("config", help="show the deployment's saved settings, or change them with --set")
    p.add_argument("--work", type=path, required=True, help="the deployment's work directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting (repeatable); lists as 64,32 or JSON; null for none")
    p.add_argument("--json", action="store_true", help="print the settings as JSON")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("history", help="history.jsonl as a table")
    p.add_argument("--work", type=path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("status", help="versions, labels, live AUC and the last decisions")
    work_args(p, data=False)
    p.add_argument("--serving-address", dest="serving_address")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("compile", help="write a Kubeflow Pipelines v2 spec")
    work_args(p)
    p.add_argument("--target", choices=("kubeflow",), default="kubeflow")
    p.add_argument("--output", type=path, default="increc-kubeflow.json")
    p.add_argument("--image", default="increc:latest", help="container image with increc installed")
    p.add_argument("--first-span", action="store_true", dest="first_span",
                   help="compile the first-span shape (schema inference, no baseline)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tensorboard", help="TensorBoard over WORK/tensorboard")
    p.add_argument("--work", type=path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=6006)
    p.set_defaults(func=cmd_tensorboard)

    p = sub.add_parser("rollback", help="put the previous (or a named) version back as stable")
    work_args(p, data=False)
    p.add_argument("--to", type=version_number, help="the version to restore (default: the previous one)")
    p.add_argument("--serving-address", dest="serving_address")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("up", help="start the embedded server over WORK/serving in the background")
    work_args(p, data=False)
    p.add_argument("--data", type=path, help="DATA directory (for the example queries; default: the one the runs used)")
    p.add_argument("--port", type=port_number, default=8500)
    p.add_argument("--rest-port", type=port_number, default=8501, dest="rest_port")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the server `increc up` started")
    work_args(p, data=False)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("predict", help="score items for a user over gRPC")
    work_args(p, data=False)
    p.add_argument("--data", type=path, help="DATA directory with the side tables (default: the one the runs used)")
    p.add_argument("--user", required=True)
    p.add_argument("--item", required=True, action="append", help="repeat for several items")
    p.add_argument("--label", default="stable")
    p.add_argument("--version", type=version_number)
    p.add_argument("--address", help="gRPC address (default: the config's serving_address)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("recommend", help="the top k items for a user over gRPC (ids only)")
    work_args(p, data=False)
    p.add_argument("--user", required=True)
    p.add_argument("-k", type=top_k, default=10, help="how many items (1-1000, default 10)")
    p.add_argument("--include-seen", action="store_true", dest="include_seen",
                   help="also recommend items the user already interacted with")
    p.add_argument("--label", default="stable")
    p.add_argument("--version", type=version_number)
    p.add_argument("--address", help="gRPC address (default: the config's serving_address)")
    p.set_defaults(func=cmd_recommend)

    sub.add_parser("serve", help="TF-Serving-compatible model server (takes tensorflow_model_server flags)",
                   add_help=False)
    return parser


def exit_status(error: BaseException) -> Tuple[int, str]:
    """(exit status, one-line message) for an error that reached the top: never a traceback for user input."""
    from pipeline.local_runner import WorkBusyError

    message = str(error).strip() or type(error).__name__
    if isinstance(getattr(error, "exit_status", None), int):  # an error that knows its status (e.g. interrupted: 130)
        return error.exit_status, message
    if isinstance(error, WorkBusyError):
        return EXIT_FAILED, message
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, message  # bad input: a flag, a config value, a file, a row
    if isinstance(error, (RuntimeError, OSError)):
        return EXIT_FAILED, message
    return EXIT_FAILED, f"{type(error).__name__}: {message} (increc --verbose ... shows where)"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return cmd_serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit status
        if args.verbose:
            raise
        status, message = exit_status(e)
        print(f"increc: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
