"""Running the server over a work directory, and querying it: `increc up`, `down`, `predict`.

`up` starts the embedded server in the background over `WORK/serving/models.config`
(the same flags a real tensorflow_model_server would take), waits until the
stable version answers, and leaves its pid and log in `WORK/serving/`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

PID_FILE = "server.pid"
LOG_FILE = "server.log"


def server_flags(config, grpc_port: int, rest_port: int) -> List[str]:
    return [f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--model_config_file={config.models_config_path}",
            "--model_config_file_poll_wait_seconds=5", "--file_system_poll_wait_seconds=5",
            # models.config carries labels; TF Serving only accepts them at startup with this flag.
            "--allow_version_labels_for_unavailable_models=true"]


def running(config) -> Optional[dict]:
    """{"pid", "port", "rest_port"} of the server `up` started for this work directory, if it still runs."""
    pid_path = os.path.join(config.serving_dir, PID_FILE)
    if not os.path.exists(pid_path):
        return None
    with open(pid_path) as f:
        info = json.load(f)
    return info if _alive(info["pid"]) else None


def start(config, grpc_port: int = 8500, rest_port: int = 8501, timeout: float = 180.0) -> dict:
    """Starts the server in the background (or finds the one already up); returns its pid and ports."""
    from components.deployment import DeploymentState
    from serving.client import ServingClient

    if DeploymentState(config.serving_dir, config.model_name).current() is None:
        raise FileNotFoundError(f"nothing deployed yet: {config.models_config_path} names no version of "
                                f"{config.model_name} (run a span first)")
    existing = running(config)
    if existing is not None:
        return dict(existing, already_running=True)
    pid_path = os.path.join(config.serving_dir, PID_FILE)
    log = open(os.path.join(config.serving_dir, LOG_FILE), "a")
    process = subprocess.Popen([sys.executable, "-m", "serving", *server_flags(config, grpc_port, rest_port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3"))
    info = {"pid": process.pid, "port": grpc_port, "rest_port": rest_port}
    with open(pid_path, "w") as f:
        json.dump(info, f)
    client = ServingClient(f"127.0.0.1:{grpc_port}", timeout=5)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            os.remove(pid_path)
            raise RuntimeError(f"the server exited ({process.returncode}); see {log.name}")
        if client.is_reachable(wait=0.5) and client.available_versions(config.model_name):
            return info
        time.sleep(0.5)
    stop(config)
    raise TimeoutError(f"the server did not come up within {timeout:.0f}s; see {log.name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop(config) -> bool:
    pid_path = os.path.join(config.serving_dir, PID_FILE)
    info = running(config)
    if os.path.exists(pid_path):
        os.remove(pid_path)
    if info is None:
        return False
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.1)
    return True


F_USER, F_ITEM = "user_id", "item_id"


def inputs_for(config, pairs: List[tuple]) -> Dict[str, np.ndarray]:
    """serving_default inputs for (user_id, item_id) pairs: side features joined from the data directory,
    history features as they stand after its last interaction."""
    import pyarrow as pa

    from components.example_gen import SideTable
    from components.history import HISTORY_COLUMNS, newest_snapshot
    from models.features import ITEM_LIST_FEATURES

    inputs = {"user_id": np.array([u.encode() for u, _ in pairs], dtype=object),
              "item_id": np.array([i.encode() for _, i in pairs], dtype=object)}
    for name, key, position in (("items.csv", "item_id", 1), ("users.csv", "user_id", 0)):
        path = os.path.join(config.data_dir, name)
        if not os.path.exists(path):
            continue
        table = SideTable(path, key)
        values = table.lookup(pa.array([pair[position] for pair in pairs], pa.string()))
        for column, kind in table.kinds.items():
            texts = values[column].to_pylist()
            if kind == "numeric":
                inputs[column] = np.array([float(v) if v.strip() else np.nan for v in texts], dtype=np.float32)
            else:
                inputs[column] = np.array([v.encode() for v in texts], dtype=object)
    snapshot = newest_snapshot(config.data_dir)  # the history after the newest span
    if snapshot is not None:
        rows = [snapshot.features(user, item) for user, item in pairs]
        for i, column in enumerate(HISTORY_COLUMNS):
            if column in ITEM_LIST_FEATURES:  # text; the other history features are numbers
                inputs[column] = np.array([r[i].encode() for r in rows], dtype=object)
            else:
                inputs[column] = np.array([float(r[i]) if r[i] else np.nan for r in rows], dtype=np.float32)
    return inputs


def newest_pairs(config, rows: int = 1) -> List[tuple]:
    """(user_id, item_id) of the newest `rows` interactions: the end of the newest span's last part files."""
    import collections

    from components import csv_reader, ingest

    spans = ingest.span_dirs(config.data_dir)
    if not spans:
        raise FileNotFoundError(f"no spans in {config.data_dir}")
    pairs: List[tuple] = []
    for path in reversed(ingest.span_files(config.data_dir, spans[-1])):  # file-name order is time order
        header, records = csv_reader.read_file(path, ("user_id", "item_id"))
        user, item = header.columns.index("user_id"), header.columns.index("item_id")
        tail = collections.deque(((f[user], f[item]) for _, f, _ in records if f is not None), maxlen=rows)
        pairs = list(tail) + pairs
        if len(pairs) >= rows:
            break
    return pairs[-rows:]


def ids_only_body(inputs: Dict[str, np.ndarray], signature: str = "serving_default", **knobs) -> dict:
    """A columnar REST body with the ids and every optional feature input sent empty (looked up by the model):
    TF Serving's REST API wants every input named."""
    body = {F_USER: [inputs[F_USER][0].decode()]}
    if signature == "serving_default":
        body[F_ITEM] = [inputs[F_ITEM][0].decode()]
    body.update({k: [v] for k, v in knobs.items()})
    features = [k for k in inputs if k not in (F_USER, F_ITEM)]
    body.update({k: [] for k in features})
    out = {"inputs": body}
    if signature != "serving_default":
        out["signature_name"] = signature
    return out


def demo_queries(config, grpc_port: int, rest_port: int) -> List[str]:
    """A REST and a gRPC prediction and recommendation, with ids only, plus the commands to make them by hand."""
    from serving.client import ServingClient, rest_predict

    inputs = inputs_for(config, newest_pairs(config))
    user = inputs[F_USER][0].decode()
    score_body = ids_only_body(inputs)
    rest = rest_predict(f"http://127.0.0.1:{rest_port}", config.model_name, score_body, label="stable")
    client = ServingClient(f"127.0.0.1:{grpc_port}")
    grpc_answer = client.predict(config.model_name, {F_USER: inputs[F_USER], F_ITEM: inputs[F_ITEM]}, label="stable")
    try:
        top = client.predict(config.model_name, {F_USER: inputs[F_USER]}, label="stable", signature="recommend")
        top_items = ", ".join(i.decode() for i in top["item_ids"][0] if i)
    except Exception as e:  # a version pushed before `recommend` existed
        top_items = f"(no recommend signature: {e})"
    client.close()
    # The user's own features (and request context) are optional inputs of recommend too; item features are not.
    from models.feature_snapshot import owner_of, side_table_columns

    side = side_table_columns(config.data_dir)
    recommend_body = ids_only_body({k: v for k, v in inputs.items() if owner_of(k, side) != "item"}, "recommend",
                                   k=10, exclude_seen=True)
    return [
        f"REST  stable, ids only: {json.dumps(rest)}",
        f"gRPC  stable, ids only: probability={float(grpc_answer['probability'][0]):.6f}",
        f"gRPC  stable, recommend for user {user}: {top_items}",
        "",
        "query it yourself:",
        f"  curl -s http://127.0.0.1:{rest_port}/v1/models/{config.model_name}",
        f"  curl -s -X POST http://127.0.0.1:{rest_port}/v1/models/{config.model_name}/labels/stable:predict "
        f"-d '{json.dumps(score_body)}'",
        f"  curl -s -X POST http://127.0.0.1:{rest_port}/v1/models/{config.model_name}/labels/stable:predict "
        f"-d '{json.dumps(recommend_body)}'",
        f"  increc recommend --work {config.work_dir} --user {user} -k 10      # over gRPC",
        f"  increc predict --work {config.work_dir} --user {user} "
        f"--item {inputs[F_ITEM][0].decode()}      # over gRPC",
        f"  increc status --work {config.work_dir}",
        f"  increc down --work {config.work_dir}      # stop the server",
    ]
