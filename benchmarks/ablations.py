"""Ablations: the Trainer's own run_fn replayed over a finished backfill with other settings.

A full pipeline run costs about a minute per span, most of it Beam and TFX
start-up; training is seconds. To compare model and training settings
quickly, this replays `models.trainer.run_fn` span after span over the
artifacts a backfill left in its work directory (each span's ExampleGen
examples and Transform graph, found through MLMD), with a variant's
settings, and measures what the pipeline measures:

- live AUC: the AUC on all of span N of the model that was serving when
  span N arrived (the model of span N-1 if it passed the gate, else the
  one before),
- the gate: a candidate serves from span N+1 on only if its AUC on span N's
  eval split is at least the serving model's minus the tolerance,
- train seconds and examples trained.

Vocabularies and feature scaling come from the backfill's Transform graphs,
so a variant may change anything in the Trainer (model, optimizer, epochs,
replay) but not the features. Not a test; prints a table and writes JSON.

    python benchmarks/ablations.py --work WORK --variants default,adam,no_replay --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, quiet_tensorflow, write_json  # noqa: E402
from components.ingest import HISTORY_COLUMNS  # noqa: E402

# Each variant overrides the work directory's trainer settings (IncrecConfig fields).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "adam": {"optimizer": "adam", "learning_rate": 0.01},
    "no_replay": {"replay_fraction": 0.0},
    "replay_50": {"replay_fraction": 0.5},
    "epochs_1": {"epochs": 1},
    "epochs_4": {"epochs": 4},
    "epochs_8": {"epochs": 8},
    "lr_0.03": {"learning_rate": 0.03},
    "lr_0.3": {"learning_rate": 0.3},
    "no_side_features": {"side_features": False},
    "no_history_features": {"ignored_features": list(HISTORY_COLUMNS)},
    "no_bias": {"id_bias": False},
    "embedding_8": {"embedding_dim": 8},
    "distill_0.5": {"distillation_weight": 0.5},
}


def span_inputs(work_dir: str) -> Dict[int, Dict[str, str]]:
    """{span: {examples, transform_graph, schema}} of the newest run of each span in a work directory."""
    from pipeline import outcome
    from pipeline.config import IncrecConfig

    config = IncrecConfig(data_dir=work_dir, work_dir=work_dir)
    found = {}
    for span, artifacts in outcome.artifacts_by_span(config).items():
        examples = artifacts.get(("SpanExampleGen", "examples"))
        graph = artifacts.get(("Transform", "transform_graph"))
        if examples is not None and graph is not None:
            found[span] = {"examples": examples.uri, "transform_graph": graph.uri}
    if not found:
        raise SystemExit(f"{work_dir}: no finished span runs in its MLMD store")
    return found


def split_files(examples_uri: str, split: str) -> List[str]:
    return [os.path.join(examples_uri, f"Split-{split}", "*")]


def read_split(examples_uri: str, split: str) -> List[bytes]:
    from models.records import read_records

    return read_records(split_files(examples_uri, split))


def replay(work_dir: str, settings: Dict[str, Any], mode: str, scratch: str,
           auc_tolerance: Optional[float] = None) -> Dict[str, Any]:
    """Runs run_fn over every span of `work_dir` with `settings`; returns per-span figures."""
    from tfx.components.trainer.fn_args_utils import FnArgs

    from models.export import labels as labels_of, score_examples
    from models import trainer
    from models.metrics import auc
    from pipeline.config import IncrecConfig

    with open(os.path.join(work_dir, "config.json")) as f:
        saved = json.load(f)
    saved.update(settings, mode=mode, work_dir=os.path.join(scratch, "work"), data_dir=work_dir)
    config = IncrecConfig(**{k: v for k, v in saved.items() if k in IncrecConfig.__dataclass_fields__})
    tolerance = config.auc_tolerance if auc_tolerance is None else auc_tolerance
    spans = span_inputs(work_dir)
    schema = os.path.join(work_dir, "schema", "schema.pbtxt")
    serving: Optional[str] = None
    out = []
    for span in sorted(spans):
        paths = spans[span]
        eval_records = read_split(paths["examples"], "eval")
        everything = read_split(paths["examples"], "train") + eval_records
        live = auc(labels_of(everything), score_examples(serving, everything)) if serving else None
        train_files = split_files(paths["examples"], "train")
        if mode == "full":
            train_files = [f for s in sorted(spans) if s < span for f in split_files(spans[s]["examples"], "train")] \
                + train_files
        run_dir = os.path.join(scratch, f"span-{span}")
        model_dir = os.path.join(run_dir, "Format-Serving")
        fn_args = FnArgs(train_files=train_files, eval_files=split_files(paths["examples"], "eval"),
                         schema_path=schema, transform_output=paths["transform_graph"],
                         transform_graph_path=paths["transform_graph"], serving_model_dir=model_dir,
                         model_run_dir=run_dir, base_model=serving if mode == "incremental" else None,
                         custom_config=config.training_run(span).to_custom_config())
        started = time.time()
        trainer.run_fn(fn_args)
        run_seconds = time.time() - started
        with open(os.path.join(run_dir, trainer.SUMMARY_FILE)) as f:
            summary = json.load(f)
        eval_labels = labels_of(eval_records)
        candidate = auc(eval_labels, score_examples(model_dir, eval_records))
        baseline = auc(eval_labels, score_examples(serving, eval_records)) if serving else None
        blessed = candidate is not None and candidate >= config.min_auc and (
            baseline is None or candidate >= baseline - tolerance)
        if blessed:
            serving = model_dir
        out.append({"span": span, "live_auc": live, "candidate_auc": candidate, "baseline_auc": baseline,
                    "blessed": blessed, "examples_trained": summary["examples_trained"],
                    "train_seconds": round(summary["train_seconds"], 3), "run_seconds": round(run_seconds, 3)})
        print(f"  span {span}: live {live if live is None else round(live, 4)}  candidate {candidate:.4f}  "
              f"{'blessed' if blessed else 'not blessed'}  train {summary['train_seconds']:.1f}s", flush=True)
    live = [s["live_auc"] for s in out if s["live_auc"] is not None]
    return {"settings": settings, "mode": mode, "spans": out,
            "mean_live_auc": sum(live) / len(live) if live else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work directory of a finished incremental backfill")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="an extra variant setting applied to every variant (repeatable)")
    parser.add_argument("--modes", default="incremental")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ablations.json"))
    args = parser.parse_args()
    quiet_tensorflow()
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value)
    results = {"work": os.path.abspath(args.work), "runs": []}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        for mode in args.modes.split(","):
            print(f"{name} ({mode})", flush=True)
            scratch = tempfile.mkdtemp(prefix=f"increc-ablation-{name}-")
            try:
                run = replay(args.work, dict(VARIANTS[name], **extra), mode, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            run["variant"] = name
            results["runs"].append(run)
    rows = [[r["variant"], r["mode"], f"{r['mean_live_auc']:.4f}",
             f"{sum(s['blessed'] for s in r['spans'])}/{len(r['spans'])}",
             f"{r['spans'][-1]['train_seconds']:.1f}"] for r in results["runs"]]
    print(markdown_table(["variant", "mode", "mean live AUC", "blessed", "train s (last span)"], rows))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
