"""Serving benchmark: REST and gRPC predict against the pipeline's model, next to a direct in-process call.

For batch 1 and batch 64 it measures p50/p99 latency and throughput of
  - a direct call of the SavedModel's serving_default signature (the floor),
  - gRPC Predict through the embedded server,
  - REST :predict through the embedded server,
then counts failed requests while a new version is swapped in under load.
Loopback only, bounded loops. Prints a table and writes JSON.

    python benchmarks/serving.py --work demo-work --out benchmarks/results/serving.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from serving import model_config  # noqa: E402
from serving.client import ServingClient, rest_predict  # noqa: E402


def percentiles(seconds):
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "requests": len(ms), "throughput_rps": len(ms) / sum(seconds)}


def timed(call, n):
    call()  # warm
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def batch_inputs(model_dir: str, batch: int):
    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    rng = np.random.default_rng(0)
    inputs = {}
    for name, spec in signature.structured_input_signature[1].items():
        if spec.dtype == tf.string:
            inputs[name] = np.array([str(rng.integers(1, 5000)).encode() for _ in range(batch)], dtype=object)
        else:
            inputs[name] = rng.normal(2000, 10, batch).astype(np.float32)
    return signature, inputs


def rest_body(inputs):
    names = list(inputs)
    return {"instances": [{k: (inputs[k][i].decode() if isinstance(inputs[k][i], bytes) else float(inputs[k][i]))
                           for k in names} for i in range(len(inputs[names[0]]))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="a work directory: benchmark its stable version")
    parser.add_argument("--model_dir", help="or a SavedModel version directory of the pipeline's model")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    if args.model_dir:
        model_dir = args.model_dir
    elif args.work:
        d = model_config.read_deployment(os.path.join(args.work, "serving", "models.config"), "increc")
        model_dir = os.path.join(d.base_path, str(d.stable))
    else:
        parser.error("give --work or --model_dir")

    scratch = Path(tempfile.mkdtemp(prefix="increc-serving-bench-"))
    base = scratch / "m"
    shutil.copytree(model_dir, base / "1")
    grpc_port, rest_port = 18500, 18501
    server = subprocess.Popen([sys.executable, "-m", "serving", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                               "--model_name=m", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = ServingClient(f"127.0.0.1:{grpc_port}", timeout=30)
    deadline = time.time() + 120
    while not (client.is_reachable(0.5) and client.available_versions("m")):
        if time.time() > deadline or server.poll() is not None:
            raise SystemExit("server did not start")
    results = {"model_dir": model_dir, "device": tf.config.list_logical_devices("GPU") and "GPU" or "CPU", "runs": []}
    try:
        for batch in (1, 64):
            signature, inputs = batch_inputs(model_dir, batch)
            tensors = {k: tf.constant(v) for k, v in inputs.items()}
            body = rest_body(inputs)
            n = args.requests if batch == 1 else max(50, args.requests // 3)
            for path, call in (
                ("direct", lambda: signature(**tensors)),
                ("grpc", lambda: client.predict("m", inputs)),
                ("rest", lambda: rest_predict(f"http://127.0.0.1:{rest_port}", "m", body)),
            ):
                figures = percentiles(timed(call, n))
                figures.update(path=path, batch=batch, examples_per_second=figures["throughput_rps"] * batch)
                results["runs"].append(figures)
                print(f"{path:>6} batch {batch:>2}: p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  "
                      f"{figures['throughput_rps']:8.1f} req/s  {figures['examples_per_second']:9.1f} examples/s")

        # Swap under load: two client threads while version 2 is copied in.
        _, inputs = batch_inputs(model_dir, 1)
        body = rest_body(inputs)
        failures, answers, stop = [], [], threading.Event()

        def hammer(kind):
            c = ServingClient(f"127.0.0.1:{grpc_port}", timeout=30)
            while not stop.is_set():
                try:
                    if kind == "grpc":
                        c.predict("m", inputs)
                    else:
                        rest_predict(f"http://127.0.0.1:{rest_port}", "m", body)
                    answers.append(kind)
                except Exception as e:  # noqa: BLE001 - counted
                    failures.append(repr(e))

        threads = [threading.Thread(target=hammer, args=(k,)) for k in ("grpc", "rest")]
        for t in threads:
            t.start()
        time.sleep(1)
        shutil.copytree(model_dir, base / ".incoming")
        os.rename(base / ".incoming", base / "2")
        deadline = time.time() + 60
        while 2 not in client.available_versions("m") or 1 in client.available_versions("m"):
            if time.time() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        results["swap"] = {"requests": len(answers), "failed": len(failures), "errors": failures[:5]}
        print(f"swap under load: {len(answers)} requests, {len(failures)} failed")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
