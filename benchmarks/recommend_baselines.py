"""How far a top-K list can get on each data set's spans: list recommenders alone, new and returning users apart.

The prequential benchmark compares increc's `recommend` with popularity and
item co-occurrence. This asks the question behind its goal "recall@10 >=
1.3 x popularity's": what do stronger list recommenders reach on the same
users and positives? On the spans `increc prepare` makes, for every span N
>= 2 and the users the DeploymentGuard samples (components/live_ranking.py),
each recommender is fit on spans 1..N-1 and scored on span N's positives:

- popularity, recent_popularity (decayed as increc's popularity prior is),
  cooccurrence: as in the prequential report (benchmarks/recommenders.py);
- newcomer_popularity: recent popularity over the positives users gave in
  the span they first appeared in, i.e. what people like when they are new;
- ease: EASE item-to-item weights (benchmarks/recommenders.py);
- hybrids: EASE for users with earlier positives, a popularity list for the
  rest (a new user has nothing else to go on without side features).

Recall@10 is reported overall and for new users (no row in an earlier span)
and returning users apart. No TensorFlow and no pipeline: a minute or two a
data set on two cores. Writes JSON and Markdown; not a test.

    python benchmarks/recommend_baselines.py                     # MovieLens latest-small
    python benchmarks/recommend_baselines.py --datasets movietweetings,movielens
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_report  # noqa: E402
from benchmarks.prequential import DATASETS, increc, mean, positive_sample  # noqa: E402
from benchmarks.recommenders import CoOccurrence, Ease, Popularity, RecentPopularity  # noqa: E402
from components.live_ranking import KS, PositiveSample  # noqa: E402
from models.ranking_metrics import ranking_metrics  # noqa: E402
from models.training import TrainingSettings  # noqa: E402

RECOMMENDERS = ("popularity", "recent_popularity", "newcomer_popularity", "cooccurrence", "ease",
                "ease + recent_popularity", "ease + newcomer_popularity")


def read_spans(data: Path) -> Dict[int, Dict[str, np.ndarray]]:
    """{span: users, items, labels} from the CSV files `increc prepare` wrote."""
    import pandas as pd

    out = {}
    for directory in sorted(glob.glob(str(data / "span-*")), key=lambda d: int(d.rsplit("-", 1)[1])):
        frame = pd.concat([pd.read_csv(path, usecols=["user_id", "item_id", "label"], dtype={"user_id": str,
                                                                                           "item_id": str})
                           for path in sorted(glob.glob(os.path.join(directory, "*.csv")))])
        out[int(directory.rsplit("-", 1)[1])] = {"users": frame["user_id"].to_numpy(str),
                                                 "items": frame["item_id"].to_numpy(str),
                                                 "labels": frame["label"].to_numpy(np.int64)}
    return out


def fit_all(users: np.ndarray, items: np.ndarray, labels: np.ndarray, spans: np.ndarray, decay: float,
            l2: float, max_items: int) -> Dict[str, Any]:
    """The single recommenders, fit on spans 1..N-1 (rows of every earlier span, each with its span)."""
    first_span: Dict[str, int] = {}
    for user, span in zip(users.tolist(), spans.tolist()):
        first_span[user] = min(span, first_span.get(user, span))
    as_newcomer = np.array([first_span[u] == s for u, s in zip(users.tolist(), spans.tolist())])
    # Only newcomers' positives count; every row still marks its item as seen by its user.
    newcomer_labels = np.where(as_newcomer, labels, 0)
    return {"popularity": Popularity().fit(users, items, labels),
            "recent_popularity": RecentPopularity(decay).fit(users, items, labels, spans),
            "newcomer_popularity": RecentPopularity(decay).fit(users, items, newcomer_labels, spans),
            "cooccurrence": CoOccurrence().fit(users, items, labels),
            "ease": Ease(l2, max_items).fit(users, items, labels)}


def score_span(fitted: Dict[str, Any], sample: PositiveSample, known: set) -> Dict[str, Dict[str, Any]]:
    users = sorted(sample.items)
    lists = {name: model.recommend(users, max(KS)) for name, model in fitted.items()}
    liked_before = set(fitted["ease"].row)
    for fallback in ("recent_popularity", "newcomer_popularity"):
        lists[f"ease + {fallback}"] = {u: lists["ease" if u in liked_before else fallback][u] for u in users}
    groups = {"all": users, "new": [u for u in users if u not in known],
              "returning": [u for u in users if u in known]}
    out = {}
    for name, recommended in lists.items():
        row: Dict[str, Any] = {}
        for group, members in groups.items():
            metrics = ranking_metrics({u: recommended[u] for u in members}, {u: sample.items[u] for u in members},
                                      KS)
            row[f"recall@10_{group}"] = metrics["recall@10"]
            row[f"users_{group}"] = metrics["users"]
            if group == "all":
                row["ndcg@10"] = metrics["ndcg@10"]
        out[name] = row
    return out


def run_dataset(data: Path, decay: float, l2: float, max_items: int) -> Dict[str, Any]:
    spans = read_spans(data)
    per_span = []
    for n in sorted(spans)[1:]:
        earlier = [s for s in spans if s < n]
        users = np.concatenate([spans[s]["users"] for s in earlier])
        items = np.concatenate([spans[s]["items"] for s in earlier])
        labels = np.concatenate([spans[s]["labels"] for s in earlier])
        row_spans = np.concatenate([np.full(spans[s]["users"].size, s) for s in earlier])
        sample = positive_sample(spans[n]["users"], spans[n]["items"], spans[n]["labels"])
        fitted = fit_all(users, items, labels, row_spans, decay, l2, max_items)
        scored = score_span(fitted, sample, set(users.tolist()))
        per_span.append({"span": n, "models": scored})
        print(f"span {n}: {scored['popularity']['users_all']} users "
              f"({scored['popularity']['users_new']} new); recall@10 "
              + ", ".join(f"{name} {row['recall@10_all']:.4f}" for name, row in scored.items()), flush=True)
    summary = {name: {key: mean(r["models"][name][key] for r in per_span)
                      for key in ("recall@10_all", "recall@10_new", "recall@10_returning", "ndcg@10")}
               for name in RECOMMENDERS}
    best = max(RECOMMENDERS, key=lambda name: summary[name]["recall@10_all"])
    target = 1.3 * summary["popularity"]["recall@10_all"]
    return {"per_span": per_span, "summary": summary, "best": best, "target_1_3x_popularity": target,
            "new_user_share": mean(r["models"]["popularity"]["users_new"] / r["models"]["popularity"]["users_all"]
                                   for r in per_span)}


def markdown(results: Dict[str, Any]) -> str:
    parts = ["# What list recommenders reach on the spans' positives",
             "", "Mean over spans 2..N of recall@10 (and NDCG@10) on span N's positives, fit on spans 1..N-1, "
             "for the users the DeploymentGuard samples; new users have no row in an earlier span "
             f"(benchmarks/recommend_baselines.py; decay {results['decay']}, EASE l2 {results['l2']} over the "
             f"{results['max_items']} most liked items)."]
    for name, result in results["datasets"].items():
        rows = [[model] + [f"{v:.4f}" if v is not None else "-" for v in
                           (s["recall@10_all"], s["recall@10_new"], s["recall@10_returning"], s["ndcg@10"])]
                for model, s in result["summary"].items()]
        parts += ["", f"## {name}", "", f"New users: {result['new_user_share']:.0%} of the users evaluated per span "
                  "on average.", "",
                  markdown_table(["recommender", "recall@10", "new users", "returning users", "NDCG@10"], rows), "",
                  f"Best: {result['best']}, {result['summary'][result['best']]['recall@10_all']:.4f}; "
                  f"1.3 x popularity's recall@10 is {result['target_1_3x_popularity']:.4f}."]
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="movielens", help=f"comma-separated, of: {', '.join(DATASETS)}")
    parser.add_argument("--movielens", default=str(DATASETS["movielens"]["input"]),
                        help="the MovieLens latest-small directory")
    parser.add_argument("--spans", type=int, default=10, help="time-ordered spans per data set")
    parser.add_argument("--l2", type=float, default=100.0, help="EASE's L2 weight")
    parser.add_argument("--max-items", type=int, default=8000, dest="max_items",
                        help="items EASE weighs (the most liked; its inverse is dense in them)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recommend-baselines.json"))
    args = parser.parse_args()
    names = args.datasets.split(",")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"--datasets: unknown data set {unknown[0]!r} (known: {', '.join(DATASETS)})")
    DATASETS["movielens"]["input"] = Path(args.movielens)
    decay = TrainingSettings().popularity_decay
    results: Dict[str, Any] = {"spans": args.spans, "decay": decay, "l2": args.l2, "max_items": args.max_items,
                               "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="increc-recommend-baselines-") as scratch:
        for name in names:
            spec, data = DATASETS[name], Path(scratch) / name
            increc("prepare", "--format", spec["format"], "--input", str(spec["input"]), "--out", str(data),
                   "--spans", str(args.spans), "--label-threshold", str(spec["label_threshold"]), "--overwrite")
            print(f"== {name}", flush=True)
            results["datasets"][name] = run_dataset(data, decay, args.l2, args.max_items)
    write_report(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
