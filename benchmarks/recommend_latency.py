"""Recommend latency benchmark: p50/p99 of the `recommend` signature over gRPC at 10k and 100k items (not a test).

For each catalog size N it builds a deployment the way an operator would, with
increc's own commands, in a temporary directory:
  - a synthetic log of two spans (`increc prepare --format synthetic`, users
    N/3). The synthetic world's popularity is Zipf-like and a share of its
    items only arrive during the log, so span 1 of a log over N items sees
    well under half of them; the log is drawn from a world of
    `--items-factor` x N items and `--rows-factor` x N rows instead, which
    leaves about N items in span 1 (10 and 6: ~10.7k and ~97k);
  - span 1 run by `increc run` with `{"epochs": 1}` (the model's quality does
    not matter here, only its shape), which pushes one version; the catalog
    size reported is the number of items in that version's snapshot
    (`assets/item_ids.txt`), not N;
  - in process, before any server starts: the version's `recommend`
    signature loaded with tf.saved_model.load and called directly, one user a
    call (k 10, exclude_seen true, side features empty: the snapshot's);
  - `increc serve` over the work directory's models.config (gRPC only), then
    sequential single-user Predict requests on `stable` with signature_name
    `recommend` and only `user_id` in them (k and exclude_seen left to the
    signature's defaults: ids only), a different user each request, about
    `--unseen-share` of them ids the model never saw; `--warmup` requests
    first, then `--requests` timed ones. The server is stopped with SIGTERM.
Client and server share the machine's cores, so gRPC latency includes the
client's own gRPC work. Prints a table and the goal against this run's
figures; writes recommend-latency.json and recommend-latency.md under
`--out-dir`. About 8 minutes on two cores with the default sizes, most of it
the two pipeline runs.

    python benchmarks/recommend_latency.py
    python benchmarks/recommend_latency.py --sizes 10000 --requests 300 --keep
    python benchmarks/recommend_latency.py --scratch DIR --keep   # a second run reuses DIR's deployments
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
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

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, print_goals, quiet_tensorflow, write_json  # noqa: E402

MODEL = "increc"
LABEL = "stable"
SIGNATURE = "recommend"
DEFAULT_K = 10  # the signature's default; what an ids-only request gets
GOAL = {"p99_ms": 20.0, "items": 100_000}
HEAVY_CALLS = 21  # in-process calls for each of the heaviest users (the first one not counted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> Dict[str, str]:
    # This checkout's code in every child process, whatever the environment has installed.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")


def increc(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"increc {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return done.stdout


# --- the deployment ---

def stable_version(work: Path) -> Optional[Path]:
    """The version directory the work directory's models.config labels stable, if any."""
    config = work / "serving" / "models.config"
    if not config.exists():
        return None
    from serving import model_config

    for entry in model_config.read_config(str(config)).model_config_list.config:
        if entry.name == MODEL and LABEL in entry.version_labels:
            path = Path(entry.base_path) / str(entry.version_labels[LABEL])
            return path if (path / "saved_model.pb").exists() else None
    return None


def lines(path: Path) -> List[str]:
    return [line for line in path.read_text().split("\n") if line]


def build(size: int, scratch: Path, args) -> Dict[str, Any]:
    """Data and span 1 of a deployment whose model knows about `size` items; reused if scratch has it."""
    data, work = scratch / f"data-{size}", scratch / f"work-{size}"
    rows, users, items = args.rows_factor * size, max(100, size // 3), args.items_factor * size
    out: Dict[str, Any] = {"items_asked": size, "log_rows": rows, "log_users": users, "world_items": items,
                           "seed": args.seed, "reused": False}
    version = stable_version(work)
    if version is not None:
        out["reused"] = True
        print(f"  reusing {work}", flush=True)
    else:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        started = time.time()
        increc("prepare", "--format", "synthetic", "--rows", str(rows), "--users", str(users), "--items", str(items),
               "--seed", str(args.seed), "--spans", "2", "--out", str(data))
        out["prepare_seconds"] = round(time.time() - started, 1)
        config = scratch / f"config-{size}.json"
        # A port nobody listens on: the push must not reach a server someone else runs on the default one.
        config.write_text(json.dumps({"epochs": 1, "serving_address": f"127.0.0.1:{free_port()}"}))
        started = time.time()
        output = increc("run", "--data", str(data), "--work", str(work), "--span", "1", "--config", str(config),
                        "--no-progress")
        out["run_seconds"] = round(time.time() - started, 1)
        out["run_line"] = output.strip().splitlines()[-1] if output.strip() else ""
        version = stable_version(work)
        if version is None:
            raise SystemExit(f"span 1 of {data} pushed no version:\n{output[-3000:]}")
        print(f"  prepare {out['prepare_seconds']} s, span 1 {out['run_seconds']} s", flush=True)
    out.update(data=str(data), work=str(work), version=int(version.name), version_dir=str(version),
               catalog=len(lines(version / "assets" / "item_ids.txt")),
               model_users=len(lines(version / "assets" / "user_ids.txt")))
    return out


def request_users(version_dir: str, count: int, unseen_share: float, seed: int) -> List[bytes]:
    """A different user a request: known ones in random order, ~unseen_share never-seen ids among them."""
    rng = np.random.default_rng(seed)
    known = lines(Path(version_dir) / "assets" / "user_ids.txt")
    known = [known[i] for i in rng.permutation(len(known))]
    unseen = rng.random(count) < unseen_share
    out, next_known = [], 0
    for i in range(count):
        if unseen[i]:
            out.append(f"never-seen-{seed}-{i}".encode())
        else:
            out.append(known[next_known % len(known)].encode())  # repeats only past the known users
            next_known += 1
    return out


def stats(seconds: List[float], wall: float) -> Dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "max_ms": round(float(ms.max()), 3),
            "requests_per_s": round(len(ms) / wall, 1)}


def heaviest_users(data: str, count: int = 3) -> List[tuple]:
    """(user, distinct items in span 1) of the users with the most: what `recommend` excludes as seen for them."""
    import csv

    items: Dict[str, set] = {}
    for path in sorted((Path(data) / "span-1").glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                items.setdefault(row["user_id"], set()).add(row["item_id"])
    ranked = sorted(items.items(), key=lambda kv: -len(kv[1]))[:count]
    return [(user, len(seen)) for user, seen in ranked]


# --- in process ---

def in_process(version_dir: str, users: List[bytes], warmup: int, heavy: List[tuple]) -> Dict[str, Any]:
    """The signature called directly, one user a call: the model's own time, no server, no gRPC."""
    import tensorflow as tf

    signature = tf.saved_model.load(version_dir).signatures[SIGNATURE]
    specs = signature.structured_input_signature[1]
    # A loaded signature needs every input; the side features empty mean "the snapshot's".
    fixed = {name: tf.zeros([0], spec.dtype) for name, spec in specs.items()}
    fixed.update(k=tf.constant([DEFAULT_K], tf.int32), exclude_seen=tf.constant([True]))
    fixed.pop("user_id")
    returned = None
    timings = []
    started = time.perf_counter()
    for i, user in enumerate(users):
        if i == warmup:
            timings, started = [], time.perf_counter()
        t0 = time.perf_counter()
        out = signature(user_id=tf.constant([user]), **fixed)
        returned = out["item_ids"].numpy()
        timings.append(time.perf_counter() - t0)
    result = stats(timings, time.perf_counter() - started)
    result["items_returned"] = int((returned[0] != b"").sum())
    # The users who have seen the most items, each called alone: exclusion grows with what a user has seen.
    result["heaviest_users"] = []
    for user, seen in heavy:
        calls = []
        for _ in range(HEAVY_CALLS):
            t0 = time.perf_counter()
            signature(user_id=tf.constant([user.encode()]), **fixed)["item_ids"].numpy()
            calls.append(time.perf_counter() - t0)
        result["heaviest_users"].append({"user": user, "seen_items": seen,
                                         "p50_ms": round(float(np.median(calls[1:]) * 1000), 3)})
    return result


# --- over gRPC ---

class Server:
    """`increc serve` over a work directory's models.config, gRPC on a free port, no REST."""

    def __init__(self, work: str, log_path: Path):
        import grpc
        import psutil

        from serving.client import AVAILABLE, ServingClient

        self.port = free_port()
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", f"--port={self.port}", "--rest_api_port=0",
             f"--model_config_file={os.path.join(work, 'serving', 'models.config')}",
             # As `increc up` starts it: models.config labels a version before the server has loaded it.
             "--allow_version_labels_for_unavailable_models=true"],
            cwd=REPO, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        self.client = ServingClient(f"127.0.0.1:{self.port}", timeout=30)
        started = time.time()
        while True:
            if self.process.poll() is not None or time.time() - started > 600:
                self.stop()
                raise SystemExit(f"the server did not start; see {log_path}")
            if self.client.is_reachable(0.5):
                try:
                    status = self.client.model_status(MODEL)
                    if any(s.state == AVAILABLE for s in status.model_version_status):
                        break
                except grpc.RpcError:  # NOT_FOUND until the config is read
                    pass
                time.sleep(0.2)
        self.ready_seconds = round(time.time() - started, 1)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2 ** 20

    def stop(self) -> Optional[int]:
        """SIGTERM, as an operator stops it: the exit status (0 is a clean stop), None if it had to be killed."""
        self.client.close()
        code: Optional[int] = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                code = None
        self.log.close()
        return code


def over_grpc(server: Server, users: List[bytes], warmup: int) -> Dict[str, Any]:
    """Sequential Predict requests, ids only; requests are built before the clock starts."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    requests = []
    for user in users:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.version_label = MODEL, LABEL
        request.model_spec.signature_name = SIGNATURE
        request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([user], dtype=object)))
        requests.append(request)
    predict = server.client.prediction.Predict
    timings: List[float] = []
    failures: List[str] = []
    response = None
    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    for i, request in enumerate(requests):
        if i == warmup:
            timings, failures = [], []
            cpu_before, started = server.cpu_seconds(), time.perf_counter()
        t0 = time.perf_counter()
        try:
            response = predict(request, timeout=30)
        except grpc.RpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")
            continue
        timings.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    if not timings:
        raise SystemExit(f"every gRPC request failed: {failures[:3]}")
    result = stats(timings, wall)
    result["failures"] = len(failures)
    result["failure_examples"] = sorted(set(failures))[:3]
    result["server_cpu_ms_per_request"] = round((server.cpu_seconds() - cpu_before) * 1000 / len(requests[warmup:]), 3)
    ids = tf.make_ndarray(response.outputs["item_ids"])
    result["items_returned"] = int((ids[0] != b"").sum())
    return result


def measure(size: int, scratch: Path, args) -> Dict[str, Any]:
    print(f"{size:,} items:", flush=True)
    out = build(size, scratch, args)
    print(f"  version {out['version']}: {out['catalog']:,} items, {out['model_users']:,} users", flush=True)
    users = request_users(out["version_dir"], args.warmup + args.requests, args.unseen_share, args.seed)
    out["unseen_requests"] = sum(u.startswith(b"never-seen-") for u in users[args.warmup:])
    out["load_average_before"] = round(os.getloadavg()[0], 2)
    out["in_process"] = in_process(out["version_dir"], users, args.warmup, heaviest_users(out["data"]))
    r = out["in_process"]
    heavy = ", ".join(f"{h['seen_items']:,} seen {h['p50_ms']:.1f} ms" for h in r["heaviest_users"])
    print(f"  in process: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  ({r['requests_per_s']:.0f} calls/s); "
          f"heaviest users: {heavy}", flush=True)
    server = Server(out["work"], scratch / f"server-{size}.log")
    try:
        out["server_ready_seconds"] = server.ready_seconds
        out["grpc"] = over_grpc(server, users, args.warmup)
        out["server_rss_mb"] = round(server.rss_mb(), 1)
    finally:
        out["server_exit_code"] = server.stop()
    out["load_average_after"] = round(os.getloadavg()[0], 2)
    g = out["grpc"]
    print(f"  gRPC: p50 {g['p50_ms']:.2f} ms  p90 {g['p90_ms']:.2f} ms  p99 {g['p99_ms']:.2f} ms  "
          f"({g['requests_per_s']:.0f} req/s, {g['failures']} failed, server CPU "
          f"{g['server_cpu_ms_per_request']:.2f} ms/req); server exit status {out['server_exit_code']}", flush=True)
    # Where this run's temporary directories were says nothing about the figures.
    return {k: v for k, v in out.items() if k not in ("data", "work", "version_dir")}


# --- report ---

def goals(results: dict) -> List[tuple]:
    """(goal, figure, met) against the run's largest size of at least the goal's catalog size."""
    big = [r for r in results["sizes"] if r["items_asked"] >= GOAL["items"]]
    if not big:
        return []
    r = max(big, key=lambda r: r["items_asked"])
    p99 = r["grpc"]["p99_ms"]
    return [(f"recommend p99 <= {GOAL['p99_ms']:.0f} ms at {GOAL['items'] // 1000}k items on these "
             f"{os.cpu_count()} cores",
             f"gRPC p99 {p99:.1f} ms at {r['catalog']:,} items (in process {r['in_process']['p99_ms']:.1f} ms)",
             p99 <= GOAL["p99_ms"] and r["grpc"]["failures"] == 0)]


def write_reports(results: dict, out_dir: Path) -> None:
    write_json(str(out_dir / "recommend-latency.json"), results)
    rows = []
    for r in results["sizes"]:
        g, p = r["grpc"], r["in_process"]
        heaviest = p["heaviest_users"][0] if p["heaviest_users"] else None
        rows.append([f"{r['catalog']:,}", f"{r['model_users']:,}", g["requests"], f"{g['p50_ms']:.2f}",
                     f"{g['p90_ms']:.2f}", f"{g['p99_ms']:.2f}", f"{g['mean_ms']:.2f}", f"{g['requests_per_s']:.0f}",
                     g["failures"], f"{p['p50_ms']:.2f}", f"{p['p99_ms']:.2f}",
                     f"{g['p50_ms'] - p['p50_ms']:.2f}", f"{g['server_cpu_ms_per_request']:.2f}",
                     f"{heaviest['seen_items']:,}: {heaviest['p50_ms']:.1f}" if heaviest else "-",
                     f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f}"])
    text = [f"# Recommend latency\n\n{results['conditions']}\n",
            markdown_table(["items in the model", "users in the model", "requests", "gRPC p50 ms", "p90 ms",
                            "p99 ms", "mean ms", "req/s", "failed", "in-process p50 ms", "in-process p99 ms",
                            "gRPC - in-process p50 ms", "server CPU ms/req",
                            "heaviest user: seen items: in-process ms", "load average before / after"], rows)]
    if goals(results):
        text += ["\n## Goals\n", markdown_table(["goal", "figure", "met"],
                                                 [[g, f, "met" if ok else "NOT met"] for g, f, ok in goals(results)])]
    (out_dir / "recommend-latency.md").write_text("\n".join(text) + "\n")
    print(f"written {out_dir / 'recommend-latency.md'}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="catalog sizes (items), comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per size (and in-process calls)")
    parser.add_argument("--warmup", type=int, default=50, help="requests sent before the timed ones")
    parser.add_argument("--unseen-share", type=float, default=0.1, help="share of requests for never-seen users")
    parser.add_argument("--rows-factor", type=int, default=6, help="rows of the synthetic log per catalog item")
    parser.add_argument("--items-factor", type=int, default=10,
                        help="items of the synthetic world per catalog item (span 1 sees about a tenth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", help="where data and work directories go (default: a temporary directory); "
                                          "a size whose work directory there already serves a version is reused")
    parser.add_argument("--keep", action="store_true", help="keep the data and work directories")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1 or args.requests < 1 or args.warmup < 0 or not 0 <= args.unseen_share < 1:
        parser.error("sizes and --requests must be positive, --warmup >= 0, --unseen-share in [0, 1)")
    quiet_tensorflow()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="increc-recommend-latency-"))
    scratch.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "conditions": f"{os.cpu_count()} CPU cores shared by client and server, no GPU; load average at start "
                      f"{os.getloadavg()[0]:.2f}; sequential single-user requests (batch 1, one client), "
                      f"signature `{SIGNATURE}` on `{LABEL}`, ids only (k {DEFAULT_K}, seen items excluded); "
                      f"{args.warmup} warm-up requests then {args.requests} timed; about {args.unseen_share:.0%} "
                      f"of users never seen; model from span 1 of a synthetic log, 1 epoch",
        "goal": GOAL, "sizes": []}
    try:
        for size in sizes:
            results["sizes"].append(measure(size, scratch, args))
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    results["goals"] = [{"goal": g, "figure": f, "met": ok} for g, f, ok in goals(results)]
    print(markdown_table(["items", "gRPC p50 ms", "p90 ms", "p99 ms", "req/s", "in-process p50 ms", "p99 ms"],
                         [[r["catalog"], r["grpc"]["p50_ms"], r["grpc"]["p90_ms"], r["grpc"]["p99_ms"],
                           r["grpc"]["requests_per_s"], r["in_process"]["p50_ms"], r["in_process"]["p99_ms"]]
                          for r in results["sizes"]]))
    print_goals(goals(results))
    write_reports(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
