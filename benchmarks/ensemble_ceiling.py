"""What increc's inputs carry when model families pool: rank averages of increc and its feature-equal peers.

The prequential benchmark's goal "incremental mean live AUC >= the
feature-equal GBM's + 0.01" asks increc's model to beat gradient-boosted
trees on the same inputs by a wide margin. This measures how much AUC there
is to find on those inputs: for every span N >= 2 of a finished prequential
run (its `--scratch` directory), it scores span N's rows with the increc
version that served span N (the Trainer output of span N-1, logged features,
as the prequential report scores it) and with the GBM and logistic regression
given increc's inputs (benchmarks/peers.py, fit on spans 1..N-1), and
reports the AUC of each and of the rank averages of every pair and of all
three. Averaging ranks of different model families cancels some of each
one's errors, so the three-way average is a generous estimate of what one
model could reach. A minute or two a data set; writes JSON and Markdown.

    python benchmarks/prequential.py --modes incremental --ablations '' --scratch RUN
    python benchmarks/ensemble_ceiling.py --scratch RUN
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, quiet_tensorflow, write_report  # noqa: E402
from benchmarks.prequential import DATASETS, mean, serving_models, span_rows  # noqa: E402

MEMBERS = ("increc", "gbm", "logistic_regression_history")


def ranks(scores: np.ndarray) -> np.ndarray:
    """Scores as their rank in [0, 1] (ties share their mean rank), so models on other scales average fairly."""
    from scipy.stats import rankdata

    return rankdata(scores) / len(scores)


def pooled(scores: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Every member alone and the rank average of every pair and of all of them, named 'a + b'."""
    out = dict(scores)
    for size in range(2, len(scores) + 1):
        for names in itertools.combinations(scores, size):
            out[" + ".join(names)] = sum(ranks(scores[n]) for n in names) / size
    return out


def served_model(work: Path, records: Dict[str, Any], span: int) -> str:
    """The Trainer output of the version that served span `span` (records as the report's JSON keeps them)."""
    path = serving_models(records, work).get(str(span))
    if path is None:
        raise SystemExit(f"span {span}: no record of the version that served it in {work}")
    return path


def run_dataset(work: Path, records: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks.peers import FEATURE_PEERS, Inputs
    from models.export import score_examples
    from models.metrics import auc

    rows = span_rows(work)
    spans = sorted(rows)
    per_span = []
    for n in spans[1:]:
        target = rows[n]
        earlier = [rows[s] for s in spans if s < n]
        inputs, labels = Inputs.concat([r["inputs"] for r in earlier]), np.concatenate([r["labels"] for r in earlier])
        scores = {"increc": score_examples(served_model(work, records, n), target["records"])}
        for name in MEMBERS[1:]:
            scores[name] = FEATURE_PEERS[name]().fit(inputs, labels).predict(target["inputs"])
        aucs = {name: auc(target["labels"], s) for name, s in pooled(scores).items()}
        per_span.append({"span": n, "auc": aucs})
        print(f"span {n}: " + ", ".join(f"{k} {v:.4f}" for k, v in aucs.items()), flush=True)
    summary = {name: mean(r["auc"][name] for r in per_span) for name in per_span[0]["auc"]}
    return {"per_span": per_span, "mean_auc": summary}


def markdown(results: Dict[str, Any]) -> str:
    parts = ["# What increc's inputs carry when model families pool", "",
             "Mean AUC over spans 2..N on span N's rows: increc's version that served span N (logged features), and "
             "the GBM and logistic regression on increc's inputs fit on spans 1..N-1; 'a + b' is the average of "
             "their ranks (benchmarks/ensemble_ceiling.py)."]
    for name, result in results["datasets"].items():
        means = result["mean_auc"]
        gbm = means["gbm"]
        rows = [[model, f"{value:.4f}", f"{value - gbm:+.4f}"] for model, value in means.items()]
        parts += ["", f"## {name}", "", markdown_table(["model", "mean AUC", "vs GBM"], rows), "",
                  f"The goal asks increc alone for {gbm + 0.01:.4f} (the GBM's + 0.01)."]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", required=True, help="the --scratch directory of a finished prequential run")
    parser.add_argument("--report", help="that run's JSON report (default: <scratch>.json, then the prequential "
                                         "benchmark's default --out)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of: {', '.join(DATASETS)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ensemble-ceiling.json"))
    args = parser.parse_args()
    scratch = Path(args.scratch)
    candidates = [args.report] if args.report else [str(scratch) + ".json",
                                                     str(REPO / "benchmarks" / "results" / "prequential.json")]
    report = next((c for c in candidates if c and os.path.isfile(c)), None)
    if report is None:
        parser.error(f"--report: no prequential report found (looked for {', '.join(candidates)})")
    with open(report) as f:
        earlier = json.load(f)
    names = [n for n in args.datasets.split(",") if n in earlier.get("datasets", {})]
    if not names:
        parser.error(f"--datasets: none of {args.datasets} is in {report}")
    quiet_tensorflow()
    results: Dict[str, Any] = {"report": report, "datasets": {}}
    for name in names:
        work = scratch / name / "work-incremental"
        if not work.is_dir():
            parser.error(f"--scratch: {work} is missing (run the prequential benchmark with --modes incremental)")
        print(f"== {name}", flush=True)
        records = earlier["datasets"][name]["modes"]["incremental"]["records"]
        results["datasets"][name] = run_dataset(work, records)
    write_report(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
