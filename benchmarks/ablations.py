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
- the gate: a candidate serves from span N+1 on only if the pipeline's
  PairedGate rule passes on span N's eval split (DeLong's paired test against
  the serving model at `gate_confidence`, `auc_tolerance` as the margin, and
  `min_auc`); each span reports whether it was blessed and why,
- train seconds and examples trained.

Vocabularies and feature scaling come from the backfill's Transform graphs,
so a variant may change anything in the Trainer (model, optimizer, epochs,
replay) but not the features. Not a test; prints a table and writes JSON.

`--aa-check` also trains, on every span where a model serves and from the
same base, a second candidate with another seed (A/A: the gate should bless it against the
first in at least 95% of spans) and one on flipped labels (never blessed),
and prints both as goal lines.

    python benchmarks/ablations.py --work WORK --variants default,adam,no_replay --out results.json
"""
from __future__ import annotations

import argparse
import dataclasses
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
    "embedding_64": {"embedding_dim": 64},
    "deep_128": {"deep_layers": [128, 64]},
    "cross_3": {"cross_layers": 3},
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


AA_SEED_OFFSET = 1000  # the A/A candidate's seed: the variant's seed plus this


def aa_goals(spans: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The A/A check's goals over the spans that ran it: another seed blessed in >= 95%, flipped labels never."""
    checked = [s["aa_check"] for s in spans if s.get("aa_check")]
    if not checked:
        return []
    same = sum(c["another_seed"]["blessed"] for c in checked)
    flipped = sum(c["flipped_labels"]["blessed"] for c in checked)
    return [
        {"goal": "A/A: a candidate trained with another seed is blessed in >= 95% of spans",
         "value": f"{same}/{len(checked)}", "target": ">= 95%", "met": same >= 0.95 * len(checked)},
        {"goal": "a candidate trained on flipped labels is never blessed",
         "value": f"{flipped}/{len(checked)}", "target": "0", "met": flipped == 0},
    ]


def replay(work_dir: str, settings: Dict[str, Any], mode: str, scratch: str,
           auc_tolerance: Optional[float] = None, aa_check: bool = False) -> Dict[str, Any]:
    """Runs run_fn over every span of `work_dir` with `settings`; returns per-span figures."""
    from tfx.components.trainer.fn_args_utils import FnArgs

    from components.paired_gate import paired_decision
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

        def train(name: str, **overrides) -> str:
            run_dir = os.path.join(scratch, f"span-{span}" + (f"-{name}" if name else ""))
            model_dir = os.path.join(run_dir, "Format-Serving")
            fn_args = FnArgs(train_files=train_files, eval_files=split_files(paths["examples"], "eval"),
                             schema_path=schema, transform_output=paths["transform_graph"],
                             transform_graph_path=paths["transform_graph"], serving_model_dir=model_dir,
                             model_run_dir=run_dir, base_model=serving if mode == "incremental" else None,
                             custom_config=dataclasses.replace(config, **overrides).training_run(span).to_custom_config())
            trainer.run_fn(fn_args)
            return model_dir

        eval_labels = labels_of(eval_records)

        def gate(model_dir: str, against: Optional[str]) -> Dict[str, Any]:
            scores = score_examples(model_dir, eval_records)
            value = auc(eval_labels, scores)
            return paired_decision(eval_labels, scores, score_examples(against, eval_records) if against else None,
                                   config.gate_confidence, tolerance,
                                   value_blessed=value is not None and value >= config.min_auc,
                                   indifference=config.gate_indifference)

        # The A/A candidates train first: the main candidate's run then leaves its own replay snapshot.
        extra = {}
        # Only where a model serves: with none, the pipeline's gate compares nothing (TFMA's min_auc decides).
        if aa_check and serving is not None:
            extra = {"another_seed": train("aa", seed=config.seed + AA_SEED_OFFSET),
                     "flipped_labels": train("flipped", flip_train_labels=True)}
        started = time.time()
        model_dir = train("")
        run_seconds = time.time() - started
        with open(os.path.join(os.path.dirname(model_dir), trainer.SUMMARY_FILE)) as f:
            summary = json.load(f)
        candidate = auc(eval_labels, score_examples(model_dir, eval_records))
        verdict = gate(model_dir, serving)
        blessed = verdict["blessed"]
        baseline = verdict["baseline_auc"]
        row = {"span": span, "live_auc": live, "candidate_auc": candidate, "baseline_auc": baseline,
               "blessed": blessed, "gate_reason": verdict["reason"], "gate_difference": verdict["difference"],
               "gate_interval": [verdict["lower"], verdict["upper"]],
               "examples_trained": summary["examples_trained"],
               "train_seconds": round(summary["train_seconds"], 3), "run_seconds": round(run_seconds, 3)}
        if extra:
            # Against the main candidate: same data, same base, same recipe (A/A), or flipped labels.
            row["aa_check"] = {name: {k: v for k, v in gate(path, model_dir).items()
                                      if k in ("blessed", "difference", "lower", "upper", "reason")}
                               for name, path in extra.items()}
        if blessed:
            serving = model_dir
        out.append(row)
        print(f"  span {span}: live {live if live is None else round(live, 4)}  candidate {candidate:.4f}  "
              f"{'blessed' if blessed else 'not blessed'} ({verdict['reason']})  "
              f"train {summary['train_seconds']:.1f}s", flush=True)
        if extra:
            for name, check in row["aa_check"].items():
                print(f"    {name}: {'blessed' if check['blessed'] else 'not blessed'} ({check['reason']})", flush=True)
    live = [s["live_auc"] for s in out if s["live_auc"] is not None]
    return {"settings": settings, "mode": mode, "spans": out, "goals": aa_goals(out),
            "mean_live_auc": sum(live) / len(live) if live else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work directory of a finished incremental backfill")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="an extra variant setting applied to every variant (repeatable)")
    parser.add_argument("--modes", default="incremental")
    parser.add_argument("--aa-check", action="store_true", dest="aa_check",
                        help="also train, per span, a candidate with another seed and one on flipped labels and "
                             "check the gate blesses the first (>= 95%% of spans) and never the second")
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
                run = replay(args.work, dict(VARIANTS[name], **extra), mode, scratch, aa_check=args.aa_check)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            run["variant"] = name
            results["runs"].append(run)
    rows = [[r["variant"], r["mode"], f"{r['mean_live_auc']:.4f}",
             f"{sum(s['blessed'] for s in r['spans'])}/{len(r['spans'])}",
             f"{r['spans'][-1]['train_seconds']:.1f}"] for r in results["runs"]]
    print(markdown_table(["variant", "mode", "mean live AUC", "blessed", "train s (last span)"], rows))
    for run in results["runs"]:
        for goal in run["goals"]:
            print(f"goal ({run['variant']}, {run['mode']}): {goal['goal']}: {goal['value']} "
                  f"(target {goal['target']}) {'met' if goal['met'] else 'NOT MET'}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
