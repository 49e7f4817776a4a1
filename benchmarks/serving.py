"""Serving benchmark: closed-loop gRPC and REST load on the pipeline's model, next to the in-process ceiling.

In one run, on the SavedModel of a work directory's stable version (or any
`--model_dir`), served by `python -m serving` on loopback the way `increc up`
starts it (a models.config with the `stable` label):
  - the in-process ceiling: the serving_default signature called directly
    from 2 threads in a loop (calls/s), before the server starts;
  - closed-loop load (benchmarks/serving_load.py, its own process): 1, 8,
    32 and 128 clients for `--seconds` each, batch 1, on `stable`, over gRPC
    and over REST: requests/s, p50/p99, failures, server CPU per request;
  - a version swap and a rollback done the pipeline's way (new models.config,
    then HandleReloadConfigRequest through ServingClient.apply_deployment)
    under 32 clients, half gRPC and half REST, until at least
    `--swap-requests` requests: failures, and which versions answered;
  - server RSS after `--rss-baseline` requests and after `--rss-requests`;
  - probes of requests that must not get a 5xx (deep nesting, huge numbers,
    invalid UTF-8, odd paths) and a zero-padded version directory.
Prints a table and each goal of the serving issue as met / NOT met against
these figures; writes serving.json, serving.md and serving.png under
benchmarks/results/. Client and server share the machine's cores, so figures
depend on what else runs. Defaults take about 25 minutes on two cores (the
1,000,000-request RSS check most of it).

    python benchmarks/serving.py --work demo-work
    python benchmarks/serving.py --model_dir DIR --seconds 5 --rss-requests 100000
    python benchmarks/serving.py --work demo-work --server-flag=--enable_batching=false
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, print_goals, quiet_tensorflow, write_json  # noqa: E402

MODEL = "increc"
LABEL = "stable"
GOALS = {"grpc_share": 0.60, "grpc_p99_ms": 10.0, "rest_share": 0.50, "swap_requests": 20_000, "rss_mb": 50.0,
         "rss_requests": 1_000_000}


# --- the request ---

def example_inputs(model_dir: str) -> Dict[str, np.ndarray]:
    """One row of the version's warmup request (a real example); made-up values if it has none."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(model_dir, "assets.extra", "tf_serving_warmup_requests")
    if os.path.exists(warmup):
        for record in tf.data.TFRecordDataset(warmup).take(1):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if log.WhichOneof("log_type") == "predict_log":
                return {k: tf.make_ndarray(v)[:1] for k, v in log.predict_log.request.inputs.items()}
    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    return {name: (np.array([b"1"], object) if spec.dtype == tf.string else np.ones([1], spec.dtype.as_numpy_dtype))
            for name, spec in signature.structured_input_signature[1].items()}


def request_files(inputs: Dict[str, np.ndarray], batch: int, scratch: Path):
    """The batch as a serialized gRPC PredictRequest on `stable` and as a REST `instances` body."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    inputs = {k: np.repeat(v, batch, axis=0) for k, v in inputs.items()}
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = MODEL, LABEL
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))

    def plain(v):
        if isinstance(v, bytes):
            return v.decode()
        return float(v)  # NaN stays NaN: JSON clients of TF Serving may send it literally

    rows = [{k: plain(v[i]) for k, v in inputs.items()} for i in range(batch)]
    (scratch / "request.pb").write_bytes(request.SerializeToString())
    (scratch / "body.json").write_text(json.dumps({"instances": rows}))
    return inputs, scratch / "request.pb", scratch / "body.json"


# --- the in-process ceiling ---

def ceiling(model_dir: str, inputs: Dict[str, np.ndarray], seconds: float, threads: int = 2) -> dict:
    """calls/s of the signature called directly from `threads` threads in a loop (the same batch)."""
    import tensorflow as tf

    signature = tf.saved_model.load(model_dir, tags=["serve"]).signatures["serving_default"]
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    for _ in range(20):
        signature(**tensors)
    single = []
    for _ in range(200):
        started = time.perf_counter()
        signature(**tensors)
        single.append(time.perf_counter() - started)
    counts = [0] * threads
    until = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < until:
            signature(**tensors)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return {"threads": threads, "calls_per_s": round(sum(counts) / elapsed, 1),
            "single_call_p50_ms": round(float(np.median(single)) * 1000, 3)}


# --- the server ---

class Server:
    """`python -m serving` over a models.config with labels, on free loopback ports."""

    def __init__(self, scratch: Path, model_dir: str, extra_flags: List[str]):
        import psutil

        from serving import model_config
        from serving.client import ServingClient

        self.base = scratch / "models" / MODEL
        self.base.mkdir(parents=True)
        # TF Serving's own test models use zero-padded version directories; so does this one.
        self.dirs = {1: self.base / "00000001", 2: self.base / "00000002"}
        shutil.copytree(model_dir, self.dirs[1])
        self.model_dir = model_dir
        self.config_path = str(scratch / "models.config")
        self.deployment = model_config.Deployment(MODEL, str(self.base), [1], {LABEL: 1})
        model_config.write_config(self.config_path, model_config.build_config(self.deployment))
        self.grpc_port, self.rest_port = free_port(), free_port()
        # The flags `increc up` uses, plus the caller's.
        flags = [f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
                 f"--model_config_file={self.config_path}", "--model_config_file_poll_wait_seconds=5",
                 "--file_system_poll_wait_seconds=5", "--allow_version_labels_for_unavailable_models=true",
                 *extra_flags]
        self.log = open(scratch / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "serving", *flags], cwd=REPO, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        self.client = ServingClient(self.grpc_address, timeout=30)
        deadline = time.time() + 300
        while not (self.client.is_reachable(0.5) and self.client.available_versions(MODEL)):
            if time.time() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the server did not start; see {self.log.name}")
        self.ps = psutil.Process(self.process.pid)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_address(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2 ** 20

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def deploy(self, versions: List[int], stable: int) -> None:
        """What the pusher and `increc rollback` do: rewrite models.config, then reload in TF Serving's order."""
        from serving import model_config

        labels = {LABEL: stable}
        if len(versions) > 1:
            labels["previous"] = [v for v in versions if v != stable][0]
        old = model_config.build_config(self.deployment)
        self.deployment = model_config.Deployment(MODEL, str(self.base), versions, labels)
        new = model_config.build_config(self.deployment)
        model_config.write_config(self.config_path, new)
        self.client.apply_deployment(new, current=old, wait_timeout=300)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(server: Server, files, api: str, clients: int, seconds: float = 0.0, min_requests: int = 0,
         max_requests: int = 0, during=None) -> dict:
    """One closed-loop run in its own process; `during()` runs under that load, then the run may end."""
    command = [sys.executable, str(REPO / "benchmarks" / "serving_load.py"), "--api", api,
               "--address", server.grpc_address, "--rest", server.rest_address,
               "--path", f"/v1/models/{MODEL}/labels/{LABEL}:predict", "--request", str(files[0]),
               "--body", str(files[1]), "--clients", str(clients), "--seconds", str(seconds),
               "--min-requests", str(min_requests), "--max-requests", str(max_requests)]
    if during is not None:
        command.append("--wait-for-stop")
    cpu_before = server.cpu_seconds()
    worker = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if during is not None:
        worker.stdout.readline()  # the worker is connected and starts sending
        time.sleep(2.0)
        during()
        worker.stdin.write("stop\n")
        worker.stdin.flush()
    out, _ = worker.communicate()
    if worker.returncode != 0:
        raise SystemExit(f"the load generator failed ({worker.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["server_cpu_ms_per_request"] = round((server.cpu_seconds() - cpu_before) * 1000 / max(1, result["ok"]), 3)
    result.update(api=api, clients=clients)
    return result


# --- requests that must never get a 5xx ---

PROBES = [
    ("POST", f"/v1/models/{MODEL}:predict", b"[" * 10000),
    ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"),
    ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [1e999999, 123456789012345678901234567890]}'),
    ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": ["\xff\xfe\xc3"]}'),
    ("POST", f"/v1/models/{MODEL}:predict", b'"just a string"'),
    ("POST", f"/v1/models/{MODEL}:predict", b'{"inputs": {"user_id": [[["x"]], "y"]}}'),
    ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [{"user_id": null}]}'),
    ("POST", f"/v1/models/{MODEL}:regress", b'{"examples": [{"x": [[1]]}]}'),
    ("POST", f"/v1/models/{MODEL}/versions/99999999999999999999999:predict", b'{"instances": [1]}'),
    ("POST", f"/v1/models/%ff%fe/labels/%00:predict?x=1#y", b'{"instances": [1]}'),
    ("GET", f"/v1/models/{MODEL}/versions/1/metadata?q=%zz", None),
    ("GET", "/v1/models/" + "a" * 5000, None),
    ("DELETE", f"/v1/models/{MODEL}", None),
]


def probe(server: Server) -> dict:
    answers = []
    for method, path, body in PROBES:
        request = urllib.request.Request(f"http://{server.rest_address}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError as e:
            status = f"{type(e).__name__}"
        answers.append({"method": method, "path": path[:80], "status": status})
    five_xx = [a for a in answers if not isinstance(a["status"], int) or a["status"] >= 500]
    return {"probes": len(answers), "5xx_or_no_answer": five_xx, "answers": answers}


# --- report ---

def goals(results: dict) -> List[tuple]:
    by = {(r["api"], r["clients"]): r for r in results["runs"]}
    ceiling_rps = results["ceiling"]["calls_per_s"]
    out = []
    conformance = results.get("probes")
    if conformance is not None:
        loaded = results.get("zero_padded_version_loaded")
        out.append(("Conformance probes: zero-padded version dir loads, no 5xx",
                    f"loaded={loaded}, {len(conformance['5xx_or_no_answer'])} of {conformance['probes']} probes 5xx",
                    bool(loaded) and not conformance["5xx_or_no_answer"]))
    if ("grpc", 32) in by:
        r = by[("grpc", 32)]
        share = r["rps"] / ceiling_rps
        out.append((f"gRPC batch-1 req/s at 32 clients >= {GOALS['grpc_share']:.0%} of the ceiling",
                    f"{r['rps']:.0f} / {ceiling_rps:.0f} = {share:.0%}", share >= GOALS["grpc_share"]))
        out.append((f"gRPC p99 at 32 clients <= {GOALS['grpc_p99_ms']:.0f} ms", f"{r['p99_ms']:.1f} ms",
                    r["p99_ms"] <= GOALS["grpc_p99_ms"]))
    if ("rest", 32) in by:
        r = by[("rest", 32)]
        share = r["rps"] / ceiling_rps
        out.append((f"REST req/s at 32 clients >= {GOALS['rest_share']:.0%} of the ceiling",
                    f"{r['rps']:.0f} / {ceiling_rps:.0f} = {share:.0%}", share >= GOALS["rest_share"]))
    for phase in ("swap", "rollback"):
        if phase in results:
            r = results[phase]
            out.append((f"0 failed of >= {GOALS['swap_requests']:,} requests during a {phase} (32 clients)",
                        f"{r['failures']} failed of {r['requests']:,}; answers by version {r['versions']}",
                        r["failures"] == 0 and r["requests"] >= GOALS["swap_requests"]))
    if "rss" in results:
        r = results["rss"]
        out.append((f"RSS after {r['requests_end']:,} requests within {GOALS['rss_mb']:.0f} MB of after "
                     f"{r['requests_start']:,}", f"{r['start_mb']:.0f} -> {r['end_mb']:.0f} MB "
                     f"({r['growth_mb']:+.1f} MB)",
                    r["growth_mb"] <= GOALS["rss_mb"] and r["requests_end"] >= GOALS["rss_requests"]))
    failures = sum(r["failures"] for r in results["runs"])
    out.append(("No failed request in the throughput runs", f"{failures} failed", failures == 0))
    return out


def write_reports(results: dict, out_dir: Path) -> None:
    write_json(str(out_dir / "serving.json"), results)
    c = results["ceiling"]
    rows = [[r["api"], r["clients"], f"{r['rps']:.0f}", f"{r['rps'] / c['calls_per_s']:.0%}", f"{r['p50_ms']:.2f}",
             f"{r['p99_ms']:.2f}", r["failures"], f"{r['server_cpu_ms_per_request']:.3f}"] for r in results["runs"]]
    text = [f"# Serving benchmark\n\n{results['conditions']}\n",
            f"In-process ceiling ({c['threads']} threads calling serving_default, batch {results['batch']}): "
            f"{c['calls_per_s']:.0f} calls/s (mean of {c.get('before_runs', c['calls_per_s']):.0f} before the "
            f"load runs and {c.get('after_runs', c['calls_per_s']):.0f} after); one call p50 "
            f"{c['single_call_p50_ms']:.2f} ms.\n",
            markdown_table(["API", "clients", "req/s", "of ceiling", "p50 ms", "p99 ms", "failed",
                            "server CPU ms/req"], rows), "\n## Goals\n",
            markdown_table(["goal", "figure", "met"], [[g, f, "met" if ok else "NOT met"] for g, f, ok in goals(results)])]
    (out_dir / "serving.md").write_text("\n".join(text) + "\n")
    print(f"written {out_dir / 'serving.md'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for api in sorted({r["api"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["api"] == api]
        left.plot([r["clients"] for r in runs], [r["rps"] for r in runs], marker="o", label=api)
        right.plot([r["clients"] for r in runs], [r["p99_ms"] for r in runs], marker="o", label=api)
    left.axhline(c["calls_per_s"], color="gray", linestyle="--", label="in-process ceiling")
    right.axhline(GOALS["grpc_p99_ms"], color="gray", linestyle=":", label="p99 goal")
    for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients (closed loop, batch %d)" % results["batch"])
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_dir / "serving.png", dpi=110)
    print(f"written {out_dir / 'serving.png'}")


def model_dir_of(args) -> str:
    if args.model_dir:
        return args.model_dir
    from components.deployment import DeploymentState

    state = DeploymentState(os.path.join(args.work, "serving"), MODEL)
    deployment = state.current()
    model_dir = state.version_dir(deployment.stable) if deployment is not None else None
    if model_dir is None:
        raise SystemExit(f"{args.work}: no stable version deployed (run `increc backfill` first)")
    return model_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="a work directory: benchmark its stable version")
    parser.add_argument("--model_dir", help="or a SavedModel version directory of the pipeline's model")
    parser.add_argument("--seconds", type=float, default=20.0, help="per load run and for the ceiling")
    parser.add_argument("--clients", default="1,8,32,128", help="concurrent clients per run, comma-separated")
    parser.add_argument("--apis", default="grpc,rest")
    parser.add_argument("--batch", type=int, default=1, help="examples per request")
    parser.add_argument("--swap-requests", type=int, default=GOALS["swap_requests"],
                        help="requests under load around a swap and around a rollback (0: skip)")
    parser.add_argument("--rss-requests", type=int, default=GOALS["rss_requests"], help="0: skip the RSS check")
    parser.add_argument("--rss-baseline", type=int, default=10_000)
    parser.add_argument("--server-flag", action="append", default=[],
                        help="an extra server flag, e.g. --server-flag=--enable_batching=false")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not (args.work or args.model_dir):
        parser.error("give --work or --model_dir")
    quiet_tensorflow()
    model_dir = model_dir_of(args)
    clients = [int(c) for c in args.clients.split(",") if c]
    apis = [a for a in args.apis.split(",") if a]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="increc-serving-bench-"))
    results = {"model_dir": model_dir, "batch": args.batch, "server_flags": args.server_flag,
               "conditions": f"{os.cpu_count()} CPU cores shared by client and server, no GPU"
                             f"{'' if not args.server_flag else '; server flags ' + ' '.join(args.server_flag)}; "
                             f"load average at start {os.getloadavg()[0]:.2f}",
               "runs": []}
    inputs = example_inputs(model_dir)
    inputs, *files = request_files(inputs, args.batch, scratch)
    before = ceiling(model_dir, inputs, args.seconds)
    print(f"in-process ceiling: {before['calls_per_s']:.0f} calls/s from 2 threads "
          f"(one call: p50 {before['single_call_p50_ms']:.2f} ms)", flush=True)
    server = None
    try:
        server = Server(scratch, model_dir, args.server_flag)
        results["zero_padded_version_loaded"] = server.client.available_versions(MODEL) == [1]
        results["probes"] = probe(server)
        load(server, files, "both", 8, seconds=2.0)  # warm both paths
        for api in apis:
            for n in clients:
                r = load(server, files, api, n, seconds=args.seconds)
                results["runs"].append(r)
                print(f"{api:>5} {n:>4} clients: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                      f"p99 {r['p99_ms']:7.2f} ms  failed {r['failures']}  server CPU "
                      f"{r['server_cpu_ms_per_request']:.3f} ms/req", flush=True)
        # The machine's other load drifts: the ceiling is measured again after the runs (server idle) and
        # the goals use the mean of both.
        after = ceiling(model_dir, inputs, args.seconds) if results["runs"] else before
        results["ceiling"] = dict(before, calls_per_s=round((before["calls_per_s"] + after["calls_per_s"]) / 2, 1),
                                  before_runs=before["calls_per_s"], after_runs=after["calls_per_s"])
        print(f"in-process ceiling after the runs: {after['calls_per_s']:.0f} calls/s; goals use the mean, "
              f"{results['ceiling']['calls_per_s']:.0f}", flush=True)
        if args.swap_requests:
            def swap():
                shutil.copytree(model_dir, server.dirs[2].with_name(".incoming"))
                os.rename(server.dirs[2].with_name(".incoming"), server.dirs[2])  # as the pusher publishes
                server.deploy([2, 1], stable=2)

            for phase, action in (("swap", swap), ("rollback", lambda: server.deploy([1], stable=1))):
                r = load(server, files, "both", 32, min_requests=args.swap_requests, during=action)
                results[phase] = r
                print(f"{phase} under 32 clients: {r['requests']} requests, {r['failures']} failed, "
                      f"gRPC answers by version {r['versions']}", flush=True)
        if args.rss_requests:
            first = load(server, files, "both", 32, max_requests=args.rss_baseline)
            start = server.rss_mb()
            started = time.time()
            rest = load(server, files, "both", 32, max_requests=max(0, args.rss_requests - args.rss_baseline))
            end = server.rss_mb()
            served = first["requests"] + rest["requests"]
            results["rss"] = {"requests_start": first["requests"], "requests_end": served,
                              "start_mb": round(start, 1), "end_mb": round(end, 1),
                              "growth_mb": round(end - start, 1), "failures": first["failures"] + rest["failures"],
                              "seconds": round(time.time() - started, 1), "rps": rest["rps"]}
            print(f"RSS: {start:.0f} MB after {first['requests']:,} requests, {end:.0f} MB after {served:,} "
                  f"({results['rss']['failures']} failed, {rest['rps']:.0f} req/s)", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print_goals(goals(results))
    write_reports(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
