"""Backfill benchmark: `increc backfill` over the MovieTweetings spans in incremental and in full mode.

Prints a per-span table and writes JSON with live AUC, candidate AUC, train
and run seconds per span for both modes. Not a test: it takes a while
(about a minute per span per mode on two cores).

    python benchmarks/backfill.py --spans 1-10 --out benchmarks/results/backfill.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import write_json  # noqa: E402


def increc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, check=True,
                   env=dict(os.environ, TF_USE_LEGACY_KERAS="1", PYTHONWARNINGS="ignore"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(REPO / "data" / "movietweetings-100k"))
    parser.add_argument("--format", default="movietweetings")
    parser.add_argument("--num-spans", type=int, default=10, dest="num_spans")
    parser.add_argument("--spans", default="1-10", help="which spans to run, A-B")
    parser.add_argument("--modes", default="incremental,full")
    parser.add_argument("--config", help="IncrecConfig JSON applied to every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "backfill.json"))
    parser.add_argument("--scratch", help="directory for data and work dirs (default: a temporary one)")
    args = parser.parse_args()

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="increc-bench-"))
    data = scratch / "data"
    increc("prepare", "--format", args.format, "--input", args.input, "--out", str(data),
           "--spans", str(args.num_spans), "--overwrite")
    results = {"input": args.input, "spans": args.spans, "modes": {}}
    for mode in args.modes.split(","):
        work = scratch / f"work-{mode}"
        report = scratch / f"report-{mode}.json"
        extra = ["--config", args.config] if args.config else []
        started = time.time()
        increc("backfill", "--data", str(data), "--work", str(work), "--spans", args.spans, "--mode", mode,
               "--report", str(report), *extra)
        results["modes"][mode] = dict(json.loads(report.read_text()), wall_seconds=time.time() - started)

    print(f"\n{'span':>4} " + " ".join(f"{m[:4]}_{k:<13}" for m in results["modes"] for k in
                                        ("live_auc", "cand_auc", "train_s", "run_s")))
    spans = [s["span"] for s in next(iter(results["modes"].values()))["spans"]]
    for i, span in enumerate(spans):
        cells = []
        for report in results["modes"].values():
            s = report["spans"][i]
            for key in ("live_auc", "candidate_auc", "train_seconds", "run_seconds"):
                value = s.get(key)
                cells.append(f"{value:<18.4f}" if isinstance(value, float) else f"{'-':<18}")
        print(f"{span:>4} " + " ".join(cells))
    for mode, report in results["modes"].items():
        print(f"{mode}: mean live AUC {report['mean_live_auc']}, wall {report['wall_seconds']:.0f}s")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
