"""The `increc` command line (DESIGN.md, "CLI")."""
from __future__ import annotations

import argparse
import dataclasses
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
    "auc_tolerance": float, "rollback_tolerance": float, "bad_row_budget": float,
    "keep_versions": int, "serving_address": str, "model_name": str, "optimizer": str,
}


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


def load_config(args):
    """The work directory's saved config, then --config, then command-line knobs."""
    from pipeline import files
    from pipeline.config import IncrecConfig, resolve_path

    values: Dict[str, Any] = {}
    saved = files.read_text(os.path.join(resolve_path(args.work), CONFIG_FILE))
    if saved is not None:
        values.update(json.loads(saved))
    if getattr(args, "config", None):
        with open(args.config) as f:
            values.update(json.load(f))
    known = {f.name for f in dataclasses.fields(IncrecConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"increc: unknown config key(s) {', '.join(unknown)}")
    values["work_dir"] = args.work
    if getattr(args, "data", None):
        values["data_dir"] = args.data
    values.setdefault("data_dir", args.work)
    for key in TUNABLE:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if getattr(args, "mode", None):
        values["mode"] = args.mode
    if getattr(args, "force", False):
        values["force_push"] = True
    try:
        config = IncrecConfig(**values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"increc: bad config: {e}")
    return config


def save_config(config) -> None:
    from pipeline import files

    persistent = dataclasses.asdict(config)
    # One-off switches do not stick to the work directory.
    for key in ("force_push", "flip_train_labels", "mode"):
        persistent.pop(key, None)
    files.write_text(os.path.join(config.work_dir, CONFIG_FILE), json.dumps(persistent, indent=2, sort_keys=True))


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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
    return (f"span {record['span']}: live AUC {_fmt(record['live_auc'])} (previous {_fmt(record['previous_auc'])}), "
            f"{rolled}"
            f"candidate AUC {_fmt(record['candidate_auc'])} vs baseline {_fmt(record['baseline_auc'])}: "
            f"{decision}, {push}; serving v{_fmt(record['serving_version'])}; "
            f"{record['examples_trained']} examples, train {record['train_seconds']:.1f}s, run {record['run_seconds']:.1f}s")


class _ComponentProgress(logging.Handler):
    """Shows the running component in the progress bar, from the LocalDagRunner's log lines."""

    def __init__(self, bar):
        super().__init__(logging.INFO)
        self.bar = bar

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Component ") and message.endswith(" is running."):
            self.bar.set_postfix_str(message[len("Component "):-len(" is running.")])


def run_spans(config, spans: List[int], show_progress: bool = True) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    from pipeline.local_runner import SpanRunError, run_span

    records = []
    bar = tqdm(total=len(spans), unit="span", disable=not show_progress, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} spans [{elapsed}<{remaining}{postfix}]")
    hook = _ComponentProgress(bar)
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(hook)
    try:
        for span in spans:
            bar.set_description(f"span {span}")
            try:
                record = run_span(config, span)
            except SpanRunError as e:
                record = e.record
            records.append(record)
            bar.write(span_line(record))
            bar.update(1)
    finally:
        absl_logger.removeHandler(hook)
        bar.close()
    return records


def backfill_report(mode: str, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    fields = ("span", "live_auc", "previous_auc", "candidate_auc", "baseline_auc", "blessed", "pushed_version",
              "rolled_back", "serving_version", "examples_trained", "train_seconds", "run_seconds")
    spans = [{k: r.get(k) for k in fields} for r in records]
    for span, record in zip(spans, records):
        span["status"] = record.get("status", "ok")
        if record.get("error"):
            span["error"] = record["error"]
    live = [s["live_auc"] for s in spans if s["live_auc"] is not None]
    return {"mode": mode, "spans": spans, "mean_live_auc": sum(live) / len(live) if live else None}


# --- commands ---

def cmd_prepare(args) -> int:
    from components import synthetic

    if args.format == "synthetic":
        if args.input:
            raise ValueError("--format synthetic generates its log; it takes no --input")
        spec = synthetic.Spec(rows=args.rows, users=args.users, items=args.items, seed=args.seed, days=args.days,
                              start=args.start)
    elif not args.input:
        raise ValueError(f"--format {args.format} needs --input")
    else:
        spec = None
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
    return 0


def cmd_run(args) -> int:
    config = load_config(args)
    save_config(config)
    records = run_spans(config, [args.span], show_progress=not args.no_progress)
    return 0 if records[0].get("status") == "ok" else 1


def cmd_backfill(args) -> int:
    config = load_config(args)
    save_config(config)
    first, last = args.spans
    records = run_spans(config, list(range(first, last + 1)), show_progress=not args.no_progress)
    report = backfill_report(config.mode, records)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.report}")
    print(f"mean live AUC over spans {first}-{last}: {_fmt(report['mean_live_auc'])}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def cmd_history(args) -> int:
    from pipeline.local_runner import read_history

    records = read_history(args.work)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no history in {args.work}")
        return 0
    header = ("span", "mode", "status", "live_auc", "previous_auc", "candidate_auc", "baseline_auc",
              "blessed", "pushed", "rolled_back", "serving", "trained", "train_s", "run_s")
    rows = [header]
    for r in records:
        if r.get("event") == "rollback":
            rows.append(("-", "manual", "rollback", "-", "-", "-", "-", "-", "-", "yes",
                         _fmt(r.get("restored_version")), "0", "-", "-"))
            continue
        rows.append((str(r["span"]), r.get("mode", "-"), r.get("status", "ok"), _fmt(r.get("live_auc")),
                     _fmt(r.get("previous_auc")), _fmt(r.get("candidate_auc")), _fmt(r.get("baseline_auc")),
                     "yes" if r.get("blessed") else "no", _fmt(r.get("pushed_version")),
                     "yes" if r.get("rolled_back") else "no", _fmt(r.get("serving_version")),
                     str(r.get("examples_trained", 0)), _fmt(r.get("train_seconds"), 1), _fmt(r.get("run_seconds"), 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in records:
        if r.get("error"):
            print(f"span {r['span']}: {r['error']}")
    return 0


def cmd_status(args) -> int:
    from pipeline.local_runner import read_history
    from serving import model_config

    config = load_config(args)
    deployment = model_config.read_deployment(config.models_config_path, config.model_name)
    on_disk = model_config.version_dirs(config.model_base_path)
    print(f"work directory: {config.work_dir}")
    print(f"model: {config.model_name}  base path: {config.model_base_path}")
    print(f"versions on disk: {', '.join(map(str, on_disk)) or 'none'}")
    if deployment is None:
        print("nothing deployed yet")
    else:
        labels = ", ".join(f"{k} -> {v}" for k, v in sorted(deployment.labels.items()))
        print(f"configured versions: {', '.join(map(str, deployment.versions))}; labels: {labels}")
    from components.rollback import rolled_back_versions

    for version, details in sorted(rolled_back_versions(config.serving_dir).items()):
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
    loaded = _loaded_versions(config)
    if loaded is not None:
        print(f"server at {config.serving_address}: " + (", ".join(f"v{v} {s}" for v, s in loaded) or "no versions"))
    else:
        print(f"no server reachable at {config.serving_address}")
    history = read_history(config.work_dir)[-5:]
    if history:
        print("last decisions:")
        for r in history:
            print("  " + span_line(r))
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
    from pipeline import kubeflow_runner

    config = load_config(args)
    path = kubeflow_runner.compile_pipeline(config, args.output, image=args.image,
                                            first_span=args.first_span)
    print(f"Kubeflow Pipelines (v2) spec written to {path}")
    return 0


def cmd_tensorboard(args) -> int:
    from pipeline.config import IncrecConfig

    logdir = IncrecConfig(data_dir=args.work, work_dir=args.work).tensorboard_dir
    if not os.path.isdir(logdir):
        raise SystemExit(f"increc: no TensorBoard logs under {logdir} (run a span first)")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", args.host, "--port", str(args.port)]
    print(f"TensorBoard on http://{args.host}:{args.port} over {logdir}")
    os.execv(sys.executable, command)
    return 0


def cmd_rollback(args) -> int:
    from components.rollback import RollbackRefused, roll_back
    from pipeline.local_runner import append_history, work_lock

    config = load_config(args)
    with work_lock(config.work_dir):
        try:
            done = roll_back(config.models_config_path, config.model_name, config.serving_address,
                             to_version=args.to, reason="manual")
        except RollbackRefused as e:
            print(f"increc rollback: refused: {e}", file=sys.stderr)
            return 2
        append_history(config, {"event": "rollback", "span": None, "status": "ok", "manual": True,
                                "rolled_back": True, "rolled_back_version": done.bad_version,
                                "restored_version": done.restored_version, "serving_version": done.restored_version,
                                "time": round(time.time(), 3)})
    print(f"rolled back: version {done.bad_version} -> {done.restored_version} is stable ({done.server})")
    return 0


def cmd_up(args) -> int:
    from pipeline import serving_ops

    config = load_config(args)
    info = serving_ops.start(config, args.port, args.rest_port)
    state = "already running" if info.get("already_running") else "started"
    print(f"server {state} for {config.model_name} over {config.models_config_path}: gRPC 127.0.0.1:{info['port']}, "
          f"REST http://127.0.0.1:{info['rest_port']} (pid {info['pid']}, log {config.serving_dir}/server.log)")
    for line in serving_ops.demo_queries(config, info["port"], info["rest_port"]):
        print(line)
    return 0


def cmd_down(args) -> int:
    from pipeline import serving_ops

    stopped = serving_ops.stop(load_config(args))
    print("server stopped" if stopped else "no server was running for this work directory")
    return 0


def cmd_predict(args) -> int:
    from pipeline import serving_ops
    from serving.client import ServingClient

    config = load_config(args)
    inputs = serving_ops.inputs_for(config, [(args.user, item) for item in args.item])
    client = ServingClient(args.address or config.serving_address)
    if not client.is_reachable(wait=3):
        raise RuntimeError(f"no server at {args.address or config.serving_address}; start one with `increc up`")
    version = None if args.version is None else args.version
    label = None if version is not None else args.label
    scores = client.predict(config.model_name, inputs, version=version, label=label)["probability"]
    for item, score in zip(args.item, scores):
        print(f"user {args.user} item {item}: {float(score):.6f}")
    return 0


def cmd_serve(argv: List[str]) -> int:
    from serving import server

    return server.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="increc", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show TFX, Beam and TensorFlow logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="cut a raw interaction log into time-ordered spans (or append one)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--input", help="the raw log (a file, or the data set's directory); not for synthetic")
    p.add_argument("--out", required=True, help="DATA directory to write span-<N>/ into")
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
        p.add_argument("--work", required=True, help="the deployment's work directory")
        if data:
            p.add_argument("--data", required=True, help="DATA directory with span-<N>/")
        p.add_argument("--config", help="JSON file of IncrecConfig fields")

    def run_args(p):
        p.add_argument("--mode", choices=("incremental", "full"))
        p.add_argument("--force", action="store_true", help="push even when not blessed (operators, tests)")
        p.add_argument("--no-progress", action="store_true", dest="no_progress")
        for key, kind in TUNABLE.items():
            p.add_argument(f"--{key.replace('_', '-')}", type=kind, dest=key)

    p = sub.add_parser("run", help="one pipeline run for span N")
    work_args(p)
    p.add_argument("--span", type=int, required=True)
    run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("backfill", help="run spans A..B in order and write a report")
    work_args(p)
    p.add_argument("--spans", type=parse_spans, required=True, help="A-B")
    p.add_argument("--report", help="write the backfill report (JSON) here")
    run_args(p)
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("history", help="history.jsonl as a table")
    p.add_argument("--work", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("status", help="versions, labels, live AUC and the last decisions")
    work_args(p, data=False)
    p.add_argument("--serving-address", dest="serving_address")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("compile", help="write a Kubeflow Pipelines v2 spec")
    work_args(p)
    p.add_argument("--target", choices=("kubeflow",), default="kubeflow")
    p.add_argument("--output", default="increc-kubeflow.json")
    p.add_argument("--image", default="increc:latest", help="container image with increc installed")
    p.add_argument("--first-span", action="store_true", dest="first_span",
                   help="compile the first-span shape (schema inference, no baseline)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tensorboard", help="TensorBoard over WORK/tensorboard")
    p.add_argument("--work", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(func=cmd_tensorboard)

    p = sub.add_parser("rollback", help="put the previous (or a named) version back as stable")
    work_args(p, data=False)
    p.add_argument("--to", type=int, help="the version to restore (default: the previous one)")
    p.add_argument("--serving-address", dest="serving_address")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("up", help="start the embedded server over WORK/serving in the background")
    work_args(p, data=False)
    p.add_argument("--data", help="DATA directory (for the example queries; default: the one the runs used)")
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--rest-port", type=int, default=8501, dest="rest_port")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the server `increc up` started")
    work_args(p, data=False)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("predict", help="score items for a user over gRPC")
    work_args(p, data=False)
    p.add_argument("--data", help="DATA directory with the side tables (default: the one the runs used)")
    p.add_argument("--user", required=True)
    p.add_argument("--item", required=True, action="append", help="repeat for several items")
    p.add_argument("--label", default="stable")
    p.add_argument("--version", type=int)
    p.add_argument("--address", help="gRPC address (default: the config's serving_address)")
    p.set_defaults(func=cmd_predict)

    sub.add_parser("serve", help="TF-Serving-compatible model server (takes tensorflow_model_server flags)",
                   add_help=False)
    return parser


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
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"increc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
