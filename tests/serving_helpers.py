"""SavedModels for the serving tests, and a real server process on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import tensorflow as tf

REPO = Path(__file__).resolve().parent.parent


def make_tf1_half_plus_two(path: Path, a: float = 0.5, b: float = 2.0) -> Path:
    """y = a*x + b: `serving_default` on a float tensor, classify/regress signatures that parse tf.Examples."""
    signature_utils = tf.compat.v1.saved_model.signature_def_utils
    graph = tf.Graph()
    with graph.as_default():
        examples = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        parsed = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        x = tf.compat.v1.placeholder(tf.float32, name="x")
        w = tf.compat.v1.Variable(a, name="a")
        c = tf.compat.v1.Variable(b, name="b")
        y = tf.identity(w * x + c, name="y")
        y_examples = w * parsed["x"] + c
        classes = tf.tile(tf.constant([["class"]]), tf.stack([tf.shape(y_examples)[0], 1]))
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
                "serving_default": signature_utils.predict_signature_def({"x": x}, {"y": y}),
                "classify_x_to_y": signature_utils.classification_signature_def(examples, classes, y_examples),
                "regress_x_to_y": signature_utils.regression_signature_def(examples, y_examples),
            })
            builder.save()
    return path


class TwoSignatures(tf.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = tf.Variable(scale)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, "a"), tf.TensorSpec([None], tf.string, "s")])
    def both(self, a, s):
        return {"sum": tf.reduce_sum(a, axis=1) * self.scale, "echo_bytes": s, "length": tf.strings.length(s)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, "n")])
    def double(self, n):
        return {"twice": n * 2}


def make_tf2(path: Path, scale: float = 1.0) -> Path:
    module = TwoSignatures(scale)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.both, "double": module.double})
    return path


class Slow(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, "n")])
    def spin(self, n):
        (count,) = tf.while_loop(lambda i: i < n[0], lambda i: (i + 1,), [tf.constant(0, tf.int64)])
        return {"done": n * 0 + count}


def make_slow(path: Path) -> Path:
    """`serving_default(n)` spins n loop iterations (about a second per 100k on a busy core): a slow model."""
    module = Slow()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.spin})
    return path


def make_tf1_counting(path: Path) -> Path:
    """A TF1 graph whose classify and regress signatures share one stateful op that counts session runs.

    `count` (Predict, input `x` ignored) reads the counter: MultiInference over
    classify + regress adds 1 when both run in one session call, 2 otherwise.
    """
    signature_utils = tf.compat.v1.saved_model.signature_def_utils
    graph = tf.Graph()
    with graph.as_default():
        examples = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        parsed = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        counter = tf.compat.v1.Variable(0.0, name="runs")
        runs = counter.assign_add(1.0)
        with tf.control_dependencies([runs]):
            y = 0.5 * parsed["x"] + 2.0
        classes = tf.tile(tf.constant([["class"]]), tf.stack([tf.shape(y)[0], 1]))
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        read = tf.identity(counter.read_value() + 0.0 * x, name="count")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
                "classify": signature_utils.classification_signature_def(examples, classes, y),
                "regress": signature_utils.regression_signature_def(examples, y),
                "count": signature_utils.predict_signature_def({"x": x}, {"count": read}),
            })
            builder.save()
    return path


def write_warmup(version_dir: Path, logs) -> Path:
    """assets.extra/tf_serving_warmup_requests holding the given PredictionLogs."""
    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path


def make_keras(path: Path) -> Path:
    inputs = tf.keras.Input(shape=(3,), name="features")
    outputs = tf.keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros", name="score")(inputs)
    model = tf.keras.Model(inputs, outputs)
    tf.saved_model.save(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving <flags>` on free loopback ports; waits until the REST port answers."""

    def __init__(self, *flags: str, rest: bool = True, timeout: float = 120):
        self.grpc_port = free_port()
        self.rest_port = free_port() if rest else 0
        args = [sys.executable, "-m", "serving", f"--port={self.grpc_port}", *flags]
        if rest:
            args.append(f"--rest_api_port={self.rest_port}")
        self.log = open(os.devnull if os.environ.get("INCREC_QUIET_TESTS") else Path(os.environ.get("TMPDIR", "/tmp")) / f"serving-{self.grpc_port}.log", "w")
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_log()[-3000:]}")
            try:
                grpc.channel_ready_future(grpc.insecure_channel(self.grpc_address)).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                continue
            if not rest or _accepts(self.rest_port):
                return
        self.stop()
        raise TimeoutError(f"server did not start: {self.read_log()[-3000:]}")

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def read_log(self) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def http(method: str, url: str, body=None, headers=None):
    """(status, headers, text) of one HTTP request, without raising on 4xx/5xx."""
    data = body if isinstance(body, (bytes, type(None))) else (body if isinstance(body, bytes) else
                                                                (json.dumps(body) if not isinstance(body, str) else body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def copy_version(source: Path, base: Path, version, name: str = "") -> Path:
    """Copies a SavedModel in as a new version the way the pusher does (hidden dir, then rename)."""
    staging = base / f".staging-{version}"
    shutil.copytree(source, staging)
    target = base / (name or str(version))
    os.rename(staging, target)
    return target


def raw_http(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Sends raw bytes to 127.0.0.1:port and returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False
