"""Scale benchmark: what a span costs at 10k, 100k, 1M and 5M rows (not a test).

For each size it generates a synthetic log of two spans of that many rows
(`increc prepare --format synthetic`), runs span 1 (schema inference, training
from scratch), starts the model server over the work directory, and runs span 2
(the steady state: live AUC through the server, warm start, gate against the
serving model, push). Each run is a fresh `increc run` process, as a scheduler
would start it. It reports seconds per component (from ML Metadata), seconds and
rows per second end to end, and the peak RSS of the run's whole process tree
(Beam workers included), then prints the goals against its own figures and
writes JSON, a Markdown table and a log-log PNG under benchmarks/results/.

    python benchmarks/scale.py                          # 10k, 100k, 1M, 5M rows a span
    python benchmarks/scale.py --sizes 10000,100000     # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_json  # noqa: E402

# ROWS[@CATALOG]: a span of ROWS rows whose users and items are those of a CATALOG-row log (default ROWS).
# 5000000@1000000 is five times the rows from the same users and items as the 1M log: how memory grows
# with the span alone; plain 5000000 also has five times the users and items (bigger model and tables).
DEFAULT_SIZES = "10000,100000,1000000,5000000@1000000,5000000"
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRss:
    """Samples the RSS of a process and all its descendants; keeps the largest total.

    It also keeps each process's last CPU seconds: their sum is the run's CPU
    time, which says what a span costs even when other jobs share the cores.
    """

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self._root = psutil.Process(pid)
        self._every = every
        self.peak = 0
        self.timeline: List[Tuple[float, int]] = []  # (epoch seconds, total RSS): peaks per component
        self._cpu: Dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self._root] + self._root.children(recursive=True)
                total = 0
                for p in processes:
                    try:
                        total += p.memory_info().rss
                        times = p.cpu_times()
                        self._cpu[p.pid] = times.user + times.system
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                self.timeline.append((time.time(), total))
            except psutil.Error:
                pass
            self._stop.wait(self._every)

    def peak_between(self, start: float, end: float) -> int:
        return max((total for t, total in self.timeline if start <= t <= end), default=0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())


def increc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, check=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True)


def measured_run(data: str, work: str, span: int, config: str) -> Dict[str, Any]:
    """One `increc run` process: wall seconds, peak RSS of its tree, and its history record."""
    command = [sys.executable, "-m", "pipeline.cli", "run", "--data", data, "--work", work, "--span", str(span),
               "--config", config, "--no-progress"]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRss(process.pid)
    output, _ = process.communicate()
    peak = rss.stop()
    seconds = time.time() - started
    load = os.getloadavg()[1]  # the 5-minute load average: how busy the cores were with this and other jobs
    if process.returncode != 0:
        raise RuntimeError(f"span {span} of {data} failed:\n{output[-3000:]}")
    from pipeline.config import IncrecConfig
    from pipeline.local_runner import read_history
    from pipeline.outcome import component_windows

    record = read_history(work)[-1]
    windows = component_windows(IncrecConfig(data_dir=data, work_dir=work), record["time"])
    components = {node: round(end - start, 3) for node, (start, end) in windows.items()}
    # Components run one after another in the span's process, so the tree's RSS inside a
    # component's window is that component's (plus what earlier ones left allocated).
    component_rss = {node: rss.peak_between(start, end) for node, (start, end) in windows.items()}
    return {"span": span, "rows": record.get("rows"), "seconds": round(seconds, 1), "peak_rss_bytes": peak,
            "cpu_seconds": round(rss.cpu_seconds, 1), "load_average": round(load, 2),
            "components": components, "component_peak_rss_bytes": component_rss, "live_auc": record.get("live_auc"), "candidate_auc": record.get("candidate_auc"),
            "blessed": record.get("blessed"), "train_seconds": record.get("train_seconds"),
            "examples_trained": record.get("examples_trained"), "output": output.strip().splitlines()[-1:]}


def summary(run: Dict[str, Any]) -> str:
    return (f"{run['seconds']} s ({run['cpu_seconds']} CPU s, load {run['load_average']}), "
            f"peak RSS {run['peak_rss_bytes'] / GIB:.2f} GiB")


def parse_size(text: str) -> Tuple[int, int]:
    rows, _, catalog = text.partition("@")
    return int(rows), int(catalog or rows)


def size_label(rows: int, catalog: int) -> str:
    return str(rows) if catalog == rows else f"{rows}@{catalog}"


def catalog_of(catalog_rows: int) -> Tuple[int, int]:
    """(users, items) of a synthetic log of `catalog_rows` rows a span."""
    return max(1000, catalog_rows // 16), max(500, catalog_rows // 50)


def run_size(rows: int, catalog_rows: int, scratch: Path, seed: int, keep: bool = False) -> Dict[str, Any]:
    label = size_label(rows, catalog_rows)
    data, work = scratch / f"data-{label}", scratch / f"work-{label}"
    users, items = catalog_of(catalog_rows)
    started = time.time()
    increc("prepare", "--format", "synthetic", "--rows", str(2 * rows), "--users", str(users), "--items", str(items),
           "--seed", str(seed), "--spans", "2", "--out", str(data), "--overwrite")
    prepare_seconds = time.time() - started
    port = free_port()
    config = scratch / f"config-{label}.json"
    config.write_text(json.dumps({"serving_address": f"127.0.0.1:{port}"}))
    first = measured_run(str(data), str(work), 1, str(config))
    print(f"  {label} rows, span 1: {summary(first)}", flush=True)
    increc("up", "--work", str(work), "--port", str(port), "--rest-port", str(free_port()))
    try:
        second = measured_run(str(data), str(work), 2, str(config))
    finally:
        increc("down", "--work", str(work))
    print(f"  {label} rows, span 2: {summary(second)}", flush=True)
    if not keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "catalog_rows": catalog_rows, "label": label, "users": users, "items": items,
            "prepare_seconds": round(prepare_seconds, 1),
            "spans": [first, second]}


def label_of(result: Dict[str, Any]) -> str:
    return result.get("label", str(result["rows"]))


def goals(results: List[Dict[str, Any]]) -> List[str]:
    """The issue's goals against the steady-state span (span 2) of each size."""
    by_size = {label_of(r): r["spans"][1] for r in results}
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"{'met' if ok else 'NOT met'}: {text}")

    if "1000000" in by_size:
        run = by_size["1000000"]
        check(run["seconds"] <= 300, f"1M-row span end to end <= 300 s ({run['seconds']:.0f} s, "
                                     f"{1_000_000 / run['seconds']:.0f} rows/s)")
        example_gen = run["components"].get("SpanExampleGen")
        if example_gen:
            check(1_000_000 / example_gen >= 20_000, f"SpanExampleGen >= 20,000 rows/s "
                                                     f"({1_000_000 / example_gen:.0f} rows/s)")
        check(run["peak_rss_bytes"] <= 4 * GIB, f"peak RSS of a 1M-row span <= 4 GiB "
                                                f"({run['peak_rss_bytes'] / GIB:.2f} GiB)")
        one_m = run["peak_rss_bytes"] / GIB
        same_catalog = by_size.get(size_label(5_000_000, 1_000_000))
        if same_catalog:
            big = same_catalog["peak_rss_bytes"] / GIB
            check(big <= 1.1 * one_m, f"peak RSS of a 5M-row span <= 1.1 x a 1M-row span's, same users and items "
                                      f"({big:.2f} vs {one_m:.2f} GiB, {big / one_m:.2f}x)")
        scaled = by_size.get("5000000")
        if scaled:
            big = scaled["peak_rss_bytes"] / GIB
            lines.append(f"for comparison: 5M rows with 5x the users and items: {big:.2f} GiB ({big / one_m:.2f}x); "
                         f"the model's tables and the feature snapshot grow with the catalog, not the span")
        if "100000" in by_size:
            per_row_1m = run["seconds"] / 1_000_000
            per_row_100k = by_size["100000"]["seconds"] / 100_000
            check(per_row_1m <= 1.3 * per_row_100k, f"cost per row at 1M <= 1.3 x at 100k "
                                                    f"({per_row_1m * 1e6:.0f} vs {per_row_100k * 1e6:.0f} us/row)")
    if "10000" in by_size:
        seconds = by_size["10000"]["seconds"]
        check(seconds < 40, f"a 10k-row span end to end < 40 s ({seconds:.1f} s)")
    return lines


def memory_table(results: List[Dict[str, Any]]) -> str:
    """Peak RSS of the process tree inside each component's window: where the memory goes."""
    components = sorted({c for r in results for s in r["spans"] for c in s.get("component_peak_rss_bytes", {})})
    rows = [[label_of(r), s["span"]] + [round(s["component_peak_rss_bytes"][c] / GIB, 2)
                                         if s["component_peak_rss_bytes"].get(c) else "-" for c in components]
            for r in results for s in r["spans"] if s.get("component_peak_rss_bytes")]
    return markdown_table(["rows", "span"] + components, rows)


def report(results: List[Dict[str, Any]], out_dir: Path) -> None:
    components = sorted({c for r in results for s in r["spans"] for c in s["components"]})
    header = ["rows", "span", "seconds", "rows/s", "CPU s", "load", "peak RSS GiB"] + components
    rows = []
    for r in results:
        for s in r["spans"]:
            rows.append([label_of(r), s["span"], s["seconds"], round(r["rows"] / s["seconds"]), s.get("cpu_seconds", "-"),
                         s.get("load_average", "-"), round(s["peak_rss_bytes"] / GIB, 2)] + [round(s["components"].get(c, 0), 1) for c in components])
    table = markdown_table(header, rows)
    memory = memory_table(results)
    lines = goals(results)
    (out_dir / "scale.md").write_text(
        "# Scale benchmark\n\nROWS@CATALOG: ROWS rows a span from the users and items of a CATALOG-row log.\n\n"
        + table + "\n\n## Peak RSS (GiB) while each component ran\n\n" + memory + "\n\n"
        + "\n".join(f"- {g}" for g in lines) + "\n")
    print(table)
    print(memory)
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = [r for r in results if label_of(r) == str(r["rows"])]  # the lines: users and items grow with rows
    sizes = [r["rows"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for span, style in ((1, "o--"), (2, "o-")):
        left.loglog(sizes, [r["spans"][span - 1]["seconds"] for r in results], style, label=f"span {span} end to end")
        right.loglog(sizes, [r["spans"][span - 1]["peak_rss_bytes"] / GIB for r in results], style,
                     label=f"span {span}")
    for component in ("SpanExampleGen", "Transform", "Trainer", "Evaluator", "PairedGate", "DeploymentGuard"):
        left.loglog(sizes, [max(r["spans"][1]["components"].get(component, 0), 1e-2) for r in results], ".:",
                    label=component)
    left.set(xlabel="rows per span", ylabel="seconds", title="seconds per span (2 cores)")
    right.set(xlabel="rows per span", ylabel="GiB", title="peak RSS of the run (process tree)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scale.png", dpi=120)
    print(f"written {out_dir / 'scale.png'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="rows per span, comma-separated; ROWS@CATALOG takes the users and items of a "
                             "CATALOG-row log")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scratch", help="where data and work directories go (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--keep", action="store_true", help="keep each size's data and work directories")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sizes of an earlier scale.json in --out (measure one size again)")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes: expected ROWS or ROWS@CATALOG, comma-separated; got {args.sizes!r}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="increc-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier: List[Dict[str, Any]] = []
    if args.update and (out_dir / "scale.json").exists():
        measured = {size_label(rows, catalog) for rows, catalog in sizes}
        earlier = [r for r in json.loads((out_dir / "scale.json").read_text())["sizes"] if label_of(r) not in measured]
    results = list(earlier)
    for rows, catalog in sizes:
        print(f"{size_label(rows, catalog)} rows a span:", flush=True)
        results = sorted(results + [run_size(rows, catalog, scratch, args.seed, args.keep)],
                         key=lambda r: (r["rows"], r.get("catalog_rows", r["rows"])))
        write_json(str(out_dir / "scale.json"), {"sizes": results, "goals": goals(results)})
    report(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
