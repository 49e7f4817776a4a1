"""Prequential benchmark: increc incremental vs full retraining, a frozen model and five peers.

On the same time-ordered spans of each data set, in one run:
  - incremental: the default pipeline (`increc backfill`), with a model server
    up from span 2 on, so every push is loaded by a live server;
  - full: the same pipeline with `--mode full` (retrained from scratch on spans 1..N);
  - frozen: the model trained on span 1, never updated;
  - peers retrained on spans 1..N-1 (benchmarks/peers.py): popularity and
    logistic_regression on ids only; popularity_history, logistic_regression_history
    and gbm (gradient-boosted trees) on exactly increc's inputs: the ids, the side
    features and the history features of the tf.Examples the pipeline trained on.
For every span N >= 2 it reports the AUC on span N of the model that existed
before span N arrived (for increc, the version serving when span N landed:
the live AUC), train seconds, run seconds and examples trained. All models
are scored on the same rows (span N's ExampleGen output, both splits).
Optionally it replays the Trainer with other settings over the incremental
run (benchmarks/ablations.py). Writes JSON, a Markdown table and a PNG, and
prints the goals of issue 5 against its own figures. Not a test: a full run
takes about an hour on two cores.

    python benchmarks/prequential.py                       # both data sets, 10 spans
    python benchmarks/prequential.py --datasets movietweetings --spans 4 --ablations ""
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, quiet_tensorflow, write_report  # noqa: E402

DATASETS = {
    "movietweetings": {"format": "movietweetings", "input": REPO / "data" / "movietweetings-100k",
                       "label_threshold": 8.0},
    "movielens": {"format": "movielens", "input": REPO.parent / "shared" / "data" / "ml-latest-small",
                  "label_threshold": 4.0},
}
MODELS = ("incremental", "full", "frozen", "popularity", "logistic_regression", "popularity_history",
          "logistic_regression_history", "gbm")
RANKERS = ("incremental", "full", "popularity", "recent_popularity", "cooccurrence")  # models with a top-K list
RANKING_METRICS = ("recall@10", "ndcg@10", "precision@10", "recall@50", "ndcg@50")
DEFAULT_ABLATIONS = "no_history_features,adam,no_replay,distill_0.5"


def increc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, check=check,
                          env=dict(os.environ, TF_USE_LEGACY_KERAS="1", PYTHONWARNINGS="ignore"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_records(work: Path) -> Dict[int, Dict[str, Any]]:
    """Each span's newest history record, its paths made relative to WORK so the report travels."""
    from pipeline.local_runner import read_history

    def relative(value: Any) -> Any:
        inside = isinstance(value, str) and value.startswith(str(work) + os.sep)
        return os.path.relpath(value, work) if inside else value

    return {r["span"]: {k: relative(v) for k, v in r.items()} for r in read_history(str(work))
            if r.get("span") is not None}


def run_mode(data: Path, work: Path, mode: str, spans: int, serve: bool, extra: List[str]) -> Dict[str, Any]:
    """Backfills spans 1..spans in `mode`; with `serve`, a server is up over WORK from span 2 on."""
    from pipeline import outcome
    from pipeline.config import IncrecConfig

    port, rest_port = free_port(), free_port()
    common = ["--data", str(data), "--work", str(work), "--mode", mode, "--no-progress",
              "--serving-address", f"127.0.0.1:{port}" if serve else "", *extra]
    started = time.time()
    increc("run", "--span", "1", *common, check=False)
    first_wall = time.time() - started  # one `increc run` as a cron job would start it, imports included
    served = serve and increc("up", "--work", str(work), "--port", str(port), "--rest-port", str(rest_port),
                              check=False).returncode == 0
    try:
        if spans > 1:
            increc("backfill", "--spans", f"2-{spans}", *common, check=False)
    finally:
        if served:
            increc("down", "--work", str(work), check=False)
    config = IncrecConfig(data_dir=str(data), work_dir=str(work))
    records = latest_records(work)
    for record in records.values():
        record["component_seconds"] = outcome.component_seconds(config, record["time"])
    return {"records": records, "served": served, "wall_seconds": time.time() - started,
            "span_1_command_seconds": round(first_wall, 3)}


def reused_mode(work: Path, data: Path, previous: Dict[str, Any]) -> Dict[str, Any]:
    """A mode's run as an earlier invocation left it in its work directory (--reuse)."""
    from pipeline import outcome
    from pipeline.config import IncrecConfig

    config = IncrecConfig(data_dir=str(data), work_dir=str(work))
    records = latest_records(work)
    for record in records.values():
        record["component_seconds"] = outcome.component_seconds(config, record["time"])
    return dict({k: v for k, v in previous.items() if k not in ("records", "segments")}, records=records)


def model_features(work: Path):
    """(categorical, numeric) side features increc's model takes in a work directory: the curated
    schema's that its training settings use (TrainingSettings.model_uses: not user_recent_items
    unless recent_items is on, nothing ignored, nothing with side_features off)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    from models import features as F
    from models.training import TRAINING_RULES, TrainingSettings

    schema = text_format.Parse((work / "schema" / "schema.pbtxt").read_text(), schema_pb2.Schema())
    categorical, numeric = F.split_columns(schema)
    config_file = work / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.exists() else {}
    settings = TrainingSettings(**{k: v for k, v in saved.items() if k in TRAINING_RULES})
    return [c for c in categorical if settings.model_uses(c)], [n for n in numeric if settings.model_uses(n)]


def span_rows(work: Path) -> Dict[int, Dict[str, Any]]:
    """{span: records, users, items, labels, inputs} from the ExampleGen output of a work directory
    (inputs: benchmarks.peers.Inputs, the features increc's model takes)."""
    from benchmarks.ablations import read_split, span_inputs
    from benchmarks.peers import parse_examples

    categorical, numeric = model_features(work)
    rows = {}
    for span, paths in span_inputs(str(work)).items():
        records = read_split(paths["examples"], "train") + read_split(paths["examples"], "eval")
        inputs, labels = parse_examples(records, categorical, numeric)
        rows[span] = {"records": records, "users": list(inputs.users), "items": list(inputs.items),
                      "labels": labels, "inputs": inputs}
    return rows


def new_user_mask(rows: Dict[int, Dict[str, Any]], span: int):
    """Rows of span N whose user appears in no earlier span (what the Evaluator slices as user_is_new)."""
    import numpy as np

    seen = {u for s, r in rows.items() if s < span for u in r["users"]}
    return np.array([u not in seen for u in rows[span]["users"]])


def scored(labels, scores, new_users) -> Dict[str, Optional[float]]:
    """AUC overall and on new and on returning users' rows."""
    from models.metrics import auc

    return {"auc": auc(labels, scores), "auc_new_users": auc(labels[new_users], scores[new_users]),
            "auc_returning_users": auc(labels[~new_users], scores[~new_users])}


def frozen_and_peers(work: Path, rows: Dict[int, Dict[str, Any]]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    import numpy as np

    from benchmarks.peers import FEATURE_PEERS, PEERS, Inputs
    from models.export import score_examples
    from pipeline import outcome
    from pipeline.config import IncrecConfig

    spans = sorted(rows)
    config = IncrecConfig(data_dir=str(work), work_dir=str(work))
    first_model = outcome.artifacts_by_span(config)[spans[0]][("Trainer", "model")].uri
    frozen_dir = os.path.join(first_model, "Format-Serving")
    with open(os.path.join(first_model, "training_summary.json")) as f:
        frozen_train = json.load(f)
    out: Dict[str, Dict[int, Dict[str, Any]]] = {"frozen": {}, **{name: {} for name in (*PEERS, *FEATURE_PEERS)}}
    for span in spans[1:]:
        target = rows[span]
        new_users = new_user_mask(rows, span)
        started = time.time()
        out["frozen"][span] = dict(scored(target["labels"], score_examples(frozen_dir, target["records"]), new_users),
                                   train_seconds=0.0, examples_trained=0, run_seconds=round(time.time() - started, 3))
        earlier = [rows[s] for s in spans if s < span]
        users = [u for r in earlier for u in r["users"]]
        items = [i for r in earlier for i in r["items"]]
        labels = np.concatenate([r["labels"] for r in earlier])
        inputs = Inputs.concat([r["inputs"] for r in earlier])
        for name, peer in [*PEERS.items(), *FEATURE_PEERS.items()]:
            started = time.time()
            if name in PEERS:
                model = peer().fit(users, items, labels)
                trained = time.time() - started
                scores = model.predict(target["users"], target["items"])
            else:
                model = peer().fit(inputs, labels)
                trained = time.time() - started
                scores = model.predict(target["inputs"])
            out[name][span] = dict(scored(target["labels"], scores, new_users), train_seconds=round(trained, 3),
                                   examples_trained=len(labels), run_seconds=round(time.time() - started, 3))
        row_spans = np.concatenate([np.full(len(rows[s]["users"]), s) for s in spans if s < span])
        for name, ranking in peer_rankings(users, items, labels, row_spans, target).items():
            out.setdefault(name, {}).setdefault(span, {})
            out[name][span]["ranking"] = ranking
    out["frozen"]["span_1_train_seconds"] = frozen_train["train_seconds"]
    return out


def positive_sample(users, items, labels):
    """The DeploymentGuard's sample of a span's positives (components/live_ranking.py) from its rows."""
    import numpy as np

    from components.live_ranking import PositiveSample

    sample = PositiveSample()
    sample.add(np.array([u.encode() for u in users], dtype=object), np.array([i.encode() for i in items], dtype=object),
               np.asarray(labels))
    return sample


def peer_rankings(users, items, labels, row_spans, target: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Top-K metrics of the popularity, recent popularity (decayed as increc's prior is) and item co-occurrence
    recommenders fit on spans 1..N-1, for the same users and positives the pipeline's DeploymentGuard
    measures `recommend` on (its user sample of span N)."""
    import numpy as np

    from benchmarks.recommenders import CoOccurrence, Popularity, RecentPopularity
    from components.live_ranking import KS
    from models.ranking_metrics import ranking_metrics
    from models.training import TrainingSettings

    sample = positive_sample(target["users"], target["items"], target["labels"])
    wanted = sorted(sample.items)
    fitted = {"popularity": Popularity().fit(users, items, labels),
              "recent_popularity": RecentPopularity(TrainingSettings().popularity_decay).fit(users, items, labels,
                                                                                             row_spans),
              "cooccurrence": CoOccurrence().fit(users, items, labels)}
    return {name: ranking_metrics(model.recommend(wanted, max(KS)), sample.items, KS)
            for name, model in fitted.items()}


def serving_models(records: Dict[Any, Dict[str, Any]], work: Path) -> Dict[Any, str]:
    """{span: the Trainer output of the version serving when the span arrived}, for the spans a pushed version
    served (records' paths are relative to `work`; spans keyed as in `records`)."""
    model_of = {r["pushed_version"]: os.path.join(work, r["candidate_model"]) for r in records.values()
                if r.get("pushed_version") and r.get("candidate_model")}
    return {span: model_of[r["live_version"]] for span, r in records.items() if r.get("live_version") in model_of}


def served_segments(run: Dict[str, Any], rows: Dict[int, Dict[str, Any]], work: Path) -> Dict[int, Dict[str, Any]]:
    """New- and returning-user AUC on span N of the version that served it (its Trainer output; the
    records' paths are relative to `work`)."""
    from models.export import score_examples

    out = {}
    for span, path in serving_models(run["records"], work).items():
        if span in rows and os.path.isdir(path):
            target = rows[span]
            out[span] = scored(target["labels"], score_examples(path, target["records"]), new_user_mask(rows, span))
    return out


def per_span(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per span N >= 2 with every model's AUC and costs."""
    table = []
    modes = result["modes"]
    spans = sorted({s for m in modes.values() for s in m["records"]} - {1})
    for span in spans:
        row: Dict[str, Any] = {"span": span}
        for mode, run in modes.items():
            record = run["records"].get(span, {})
            # AUC with the features logged with each row, as the peers are scored (and as live AUC was measured
            # before versions carried a feature snapshot); auc_ids_only is what a client calling with ids gets.
            logged = record.get("live_auc_logged_features")
            row[mode] = {"auc": logged if logged is not None else record.get("live_auc"),
                         "auc_ids_only": record.get("live_auc"), "train_seconds": record.get("train_seconds"),
                         "run_seconds": record.get("run_seconds"), "examples_trained": record.get("examples_trained"),
                         "blessed": record.get("blessed"), "rolled_back": record.get("rolled_back"),
                         "gate_reason": (record.get("gate") or {}).get("reason"),
                         "caught_up_spans": record.get("caught_up_spans", []),
                         "component_seconds": record.get("component_seconds", {}),
                         "ranking": record.get("ranking")}
            segments = run.get("segments", {}).get(span, {})
            row[mode].update({k: v for k, v in segments.items() if k != "auc"})
        for name, by_span in result["others"].items():
            if span in by_span:
                row[name] = by_span[span]
        table.append(row)
    return table


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(name: str, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"mean_auc": {m: mean(r.get(m, {}).get("auc") for r in rows) for m in MODELS}}
    for segment in ("new_users", "returning_users"):
        summary[f"mean_auc_{segment}"] = {m: mean(r.get(m, {}).get(f"auc_{segment}") for r in rows) for m in MODELS}
    summary["new_user_share"] = mean(r.get("new_user_share") for r in rows)
    summary["mean_auc_ids_only"] = {m: mean(r.get(m, {}).get("auc_ids_only") for r in rows)
                                    for m in ("incremental", "full")}
    for metric in RANKING_METRICS:
        summary[f"mean_{metric}"] = {m: mean((r.get(m, {}).get("ranking") or {}).get(metric) for r in rows)
                                     for m in RANKERS}
    last = rows[-1] if rows else {}
    summary["last_span"] = last.get("span")
    summary["train_seconds_last_span"] = {m: last.get(m, {}).get("train_seconds") for m in MODELS}
    incremental = [r["incremental"] for r in rows if r.get("incremental", {}).get("run_seconds") is not None]
    if incremental:
        runs = [r["run_seconds"] for r in incremental]
        components: Dict[str, List[float]] = {}
        for r in incremental:
            for component, seconds in r["component_seconds"].items():
                components.setdefault(component, []).append(seconds)
        summary["incremental_run_seconds"] = {"mean": statistics.mean(runs), "max": max(runs)}
        summary["incremental_component_seconds"] = {c: round(statistics.mean(v), 2)
                                                    for c, v in sorted(components.items(), key=lambda kv: -sum(kv[1]))}
    return summary


def goals(summaries: Dict[str, Dict[str, Any]], aa_checks: Optional[Dict[str, List[Dict[str, Any]]]] = None
          ) -> List[Dict[str, Any]]:
    out = [dict(g, goal=f"{name}: {g['goal']}") for name, checks in (aa_checks or {}).items() for g in checks]

    def goal(text, value, target, ok):
        out.append({"goal": text, "value": value, "target": target, "met": bool(ok)})

    for name, s in summaries.items():
        auc_ = s["mean_auc"]
        if auc_["incremental"] is not None and auc_["full"] is not None:
            goal(f"{name}: incremental mean AUC >= full-retrain mean - 0.003", round(auc_["incremental"], 4),
                 round(auc_["full"] - 0.003, 4), auc_["incremental"] >= auc_["full"] - 0.003)
        if auc_["incremental"] is not None and auc_["logistic_regression"] is not None:
            goal(f"{name}: incremental mean AUC >= logistic regression's + 0.02", round(auc_["incremental"], 4),
                 round(auc_["logistic_regression"] + 0.02, 4), auc_["incremental"] >= auc_["logistic_regression"] + 0.02)
        if auc_["incremental"] is not None and auc_.get("gbm") is not None:
            goal(f"{name}: incremental mean live AUC >= the feature-equal GBM's + 0.01", round(auc_["incremental"], 4),
                 round(auc_["gbm"] + 0.01, 4), auc_["incremental"] >= auc_["gbm"] + 0.01)
        recall = s.get("mean_recall@10", {})
        if recall.get("incremental") is not None and recall.get("popularity") is not None:
            goal(f"{name}: incremental mean recall@10 >= 1.3 x popularity's", round(recall["incremental"], 4),
                 round(1.3 * recall["popularity"], 4), recall["incremental"] >= 1.3 * recall["popularity"])
        if recall.get("incremental") is not None and recall.get("cooccurrence") is not None:
            goal(f"{name}: incremental mean recall@10 >= item co-occurrence's", round(recall["incremental"], 4),
                 round(recall["cooccurrence"], 4), recall["incremental"] >= recall["cooccurrence"])
        seconds = s["train_seconds_last_span"]
        if seconds.get("incremental") and seconds.get("full"):
            goal(f"{name}: incremental train seconds at span {s['last_span']} <= 0.35 x full retrain's",
                 seconds["incremental"], round(0.35 * seconds["full"], 2),
                 seconds["incremental"] <= 0.35 * seconds["full"])
        if "incremental_run_seconds" in s:
            worst = s["incremental_run_seconds"]["max"]
            goal(f"{name}: one span end to end (landed -> new version serving) <= 90 s", round(worst, 1), 90,
                 worst <= 90)
    return out


def markdown(results: Dict[str, Any]) -> str:
    parts = ["# Prequential benchmark", "",
             "AUC on span N of the model that existed before span N arrived; seconds of that span's run.",
             "Peers are trained on spans 1..N-1: popularity and logistic_regression see the user and item ids "
             "only; popularity_history (the item's mean outcome so far, from the history features), "
             "logistic_regression_history and gbm (gradient-boosted trees) see exactly increc's inputs: ids, side "
             "features and history features (benchmarks/peers.py).", ""]
    for name, result in results["datasets"].items():
        parts += [f"## {name}", ""]
        rows = []
        for r in result["per_span"]:
            cell = lambda m, k="auc", d=4: (f"{r[m][k]:.{d}f}" if r.get(m, {}).get(k) is not None else "-")  # noqa: E731
            rows.append([r["span"]] + [cell(m) for m in MODELS]
                        + [cell("incremental", "train_seconds", 1), cell("full", "train_seconds", 1),
                           cell("incremental", "run_seconds", 1), cell("full", "run_seconds", 1),
                           r.get("incremental", {}).get("examples_trained", "-"),
                           r.get("full", {}).get("examples_trained", "-")])
        s = result["summary"]
        rows.append(["mean"] + [f"{s['mean_auc'][m]:.4f}" if s["mean_auc"][m] is not None else "-" for m in MODELS]
                    + [""] * 6)
        parts.append(markdown_table(["span", *MODELS, "inc train s", "full train s", "inc run s", "full run s",
                                     "inc examples", "full examples"], rows))
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        ids_only = s.get("mean_auc_ids_only", {})
        parts += ["", "increc's AUC above is scored with the features logged with each row, as the peers are. "
                      "Called with ids alone (what a client gets: the features of the serving version's snapshot, "
                      "as of the end of its span), the mean live AUC is "
                      + ", ".join(f"{m} {fmt(ids_only.get(m))}" for m in ("incremental", "full")) + "."]
        rank_cell = lambda r, m, k: fmt((r.get(m, {}).get("ranking") or {}).get(k))  # noqa: E731
        parts += ["", "Top-K on span N's positives (the same sample of at most 1,000 users for every model; "
                      "increc: the `recommend` signature of the version serving when span N arrived, seen items "
                      "excluded; popularity, recent popularity (positives of span s weigh popularity_decay ** (N-1-s), "
                      "as increc's popularity prior does) and co-occurrence fit on spans 1..N-1): "
                      "recall@10 / NDCG@10", "",
                  markdown_table(["span", *RANKERS],
                                 [[r["span"], *[f"{rank_cell(r, m, 'recall@10')} / {rank_cell(r, m, 'ndcg@10')}"
                                                for m in RANKERS]] for r in result["per_span"]]
                                 + [["mean", *[f"{fmt(s['mean_recall@10'][m])} / {fmt(s['mean_ndcg@10'][m])}"
                                               for m in RANKERS]]])]
        parts += ["", "The gate's decision on each incremental span (PairedGate: DeLong's paired test against the "
                      "serving model):", "",
                  markdown_table(["span", "blessed", "caught up", "why"],
                                 [[r["span"], "yes" if r["incremental"].get("blessed") else "no",
                                   ",".join(map(str, r["incremental"].get("caught_up_spans") or [])) or "-",
                                   r["incremental"].get("gate_reason") or "-"]
                                  for r in result["per_span"] if r.get("incremental")])]
        parts += ["", f"Mean AUC by user (new: no interaction in an earlier span; "
                      f"{100 * (s['new_user_share'] or 0):.0f}% of rows on average):", "",
                  markdown_table(["users", *MODELS],
                                 [[segment.replace("_", " "), *[fmt(s[f"mean_auc_{segment}"][m]) for m in MODELS]]
                                  for segment in ("new_users", "returning_users")])]
        if s.get("incremental_component_seconds"):
            parts += ["", "Where an incremental span's time goes (mean seconds per component, MLMD execution times):",
                      "", markdown_table(["component", "seconds"],
                                         [[c, v] for c, v in s["incremental_component_seconds"].items()])]
        if result.get("ablations"):
            parts += ["", "Ablations (the Trainer replayed over this incremental run's spans; "
                      "benchmarks/ablations.py):", "",
                      markdown_table(["variant", "settings", "mean live AUC", "blessed", "train s (last span)"],
                                     [[a["variant"], json.dumps(a["settings"]), f"{a['mean_live_auc']:.4f}",
                                       f"{sum(x['blessed'] for x in a['spans'])}/{len(a['spans'])}",
                                       f"{a['spans'][-1]['train_seconds']:.1f}"] for a in result["ablations"]])]
        parts.append("")
    parts += ["## Goals", "", markdown_table(["goal", "value", "target", "met"],
                                             [[g["goal"], g["value"], g["target"], "yes" if g["met"] else "NO"]
                                              for g in results["goals"]]), ""]
    return "\n".join(parts)


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        table = results["datasets"][name]["per_span"]
        spans = [r["span"] for r in table]
        for model in MODELS:
            axes[row][0].plot(spans, [r.get(model, {}).get("auc") for r in table], marker="o", label=model)
        axes[row][0].set(title=f"{name}: AUC on span N of the model before it", xlabel="span", ylabel="AUC")
        for model, style in (("incremental", "-"), ("full", "-"), ("logistic_regression", ":"),
                             ("logistic_regression_history", ":"), ("gbm", ":")):
            axes[row][1].plot(spans, [r.get(model, {}).get("train_seconds") for r in table], style, marker="o",
                              label=f"{model} train")
        for model in ("incremental", "full"):
            axes[row][1].plot(spans, [r.get(model, {}).get("run_seconds") for r in table], "--", marker="x",
                              label=f"{model} run (pipeline)")
        axes[row][1].set(title=f"{name}: seconds per span", xlabel="span", ylabel="seconds")
        for ax in axes[row]:
            ax.set_xticks(spans)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of: {', '.join(DATASETS)}")
    parser.add_argument("--movielens", default=str(DATASETS["movielens"]["input"]),
                        help="the MovieLens latest-small directory")
    parser.add_argument("--spans", type=int, default=10, help="time-ordered spans per data set")
    parser.add_argument("--modes", default="incremental,full")
    parser.add_argument("--ablations", default=DEFAULT_ABLATIONS,
                        help="variants of benchmarks/ablations.py to replay over the incremental run ('' for none)")
    parser.add_argument("--aa-check", action="store_true", dest="aa_check",
                        help="replay the Trainer over the incremental run with, per span, a candidate of another "
                             "seed (the gate should bless it in >= 95%% of spans) and one on flipped labels (never)")
    parser.add_argument("--no-serve", action="store_false", dest="serve",
                        help="run the incremental backfill without a model server")
    parser.add_argument("--config", help="IncrecConfig JSON applied to every pipeline run")
    parser.add_argument("--scratch", help="directory for data and work directories (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prequential.json"))
    parser.add_argument("--reuse", action="store_true",
                        help="rebuild the report from the work directories in --scratch and the ablations in --out "
                             "of an earlier run, without running the pipelines again")
    args = parser.parse_args()
    if args.reuse and not args.scratch:
        parser.error("--reuse needs the --scratch of the earlier run")
    earlier = {}
    if args.reuse and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
    quiet_tensorflow()
    DATASETS["movielens"]["input"] = Path(args.movielens)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="increc-prequential-"))
    extra = ["--config", os.path.abspath(args.config)] if args.config else []
    results: Dict[str, Any] = {"spans": args.spans, "cpus": os.cpu_count(), "datasets": {}}

    from benchmarks import ablations

    for name in args.datasets.split(","):
        spec = DATASETS[name]
        data = scratch / name / "data"
        result: Dict[str, Any] = {"modes": {}}
        if args.reuse:
            for mode in args.modes.split(","):
                previous = earlier.get("datasets", {}).get(name, {}).get("modes", {}).get(mode, {})
                result["modes"][mode] = reused_mode(scratch / name / f"work-{mode}", data, previous)
        else:
            increc("prepare", "--format", spec["format"], "--input", str(spec["input"]), "--out", str(data),
                   "--spans", str(args.spans), "--label-threshold", str(spec["label_threshold"]), "--overwrite")
            for mode in args.modes.split(","):
                work = scratch / name / f"work-{mode}"
                shutil.rmtree(work, ignore_errors=True)
                print(f"== {name}: {mode}", flush=True)
                result["modes"][mode] = run_mode(data, work, mode, args.spans, args.serve and mode == "incremental",
                                                 extra)
        reference = scratch / name / f"work-{args.modes.split(',')[0]}"
        rows = span_rows(reference)
        result["others"] = frozen_and_peers(reference, rows)
        for mode, run in result["modes"].items():
            run["segments"] = served_segments(run, rows, scratch / name / f"work-{mode}")
        result["per_span"] = per_span(result)
        for row in result["per_span"]:
            row["new_user_share"] = float(new_user_mask(rows, row["span"]).mean())
        result["summary"] = summarize(name, result["per_span"])
        result["ablations"] = earlier.get("datasets", {}).get(name, {}).get("ablations", []) if args.reuse else []
        if args.ablations and "incremental" in result["modes"] and not args.reuse:
            for variant in args.ablations.split(","):
                print(f"== {name}: ablation {variant}", flush=True)
                with tempfile.TemporaryDirectory(prefix="increc-ablation-") as tmp:
                    run = ablations.replay(str(scratch / name / "work-incremental"), ablations.VARIANTS[variant],
                                           "incremental", tmp)
                result["ablations"].append(dict(run, variant=variant))
        if args.aa_check and "incremental" in result["modes"] and not args.reuse:
            print(f"== {name}: A/A check of the gate", flush=True)
            with tempfile.TemporaryDirectory(prefix="increc-aa-") as tmp:
                run = ablations.replay(str(scratch / name / "work-incremental"), {}, "incremental", tmp,
                                       aa_check=True)
            result["aa_check"] = {"spans": run["spans"], "goals": run["goals"]}
        for run in result["modes"].values():
            run["records"] = {str(k): v for k, v in run["records"].items()}
            run["segments"] = {str(k): v for k, v in run["segments"].items()}
        result["others"] = {m: {str(k): v for k, v in by.items()} for m, by in result["others"].items()}
        results["datasets"][name] = result

    results["goals"] = goals({n: r["summary"] for n, r in results["datasets"].items()},
                             {n: r["aa_check"]["goals"] for n, r in results["datasets"].items() if r.get("aa_check")})
    for goal in results["goals"]:
        print(f"goal: {goal['goal']}: {goal['value']} (target {goal['target']}) {'met' if goal['met'] else 'NOT MET'}")
    base = write_report(args.out, results, markdown(results))
    plot(results, base + ".png")
    print(f"written {base}.md and {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
