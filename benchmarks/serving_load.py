"""Closed-loop load on a TF Serving API: N clients, each sending its next request when the last one answers.

Runs in its own process, so the client's Python does not share the server's
interpreter, and spends as little CPU per request as Python allows because
it shares the machine with the server: gRPC calls are chained through
completion callbacks on one channel (about 1.5x the requests/s of a grpc.aio
client on the same cores), REST requests go over keep-alive HTTP/1.1
connections driven by one `selectors` loop. Every client sends the same
pre-serialized request; a request fails on any non-OK gRPC status, non-200
HTTP status, timeout or broken connection. Prints one JSON line: requests,
failures, requests/s, p50/p99 latency and, for gRPC, how many answers each
model version gave.

    python benchmarks/serving_load.py --api grpc --address 127.0.0.1:8500 --clients 32 --seconds 20 \
        --request REQUEST.pb --body BODY.json
"""
from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from typing import List, Optional

PREDICT = "/tensorflow.serving.PredictionService/Predict"


class Run:
    """When to stop, and what happened; shared by the gRPC callbacks and the REST loop."""

    def __init__(self, seconds: float, min_requests: int, max_requests: int, wait_for_stop: bool):
        self.seconds, self.min_requests, self.max_requests = seconds, min_requests, max_requests
        self.stop_requested = threading.Event()
        if not wait_for_stop:
            self.stop_requested.set()
        self.started = self.deadline = 0.0
        self.latencies: List[float] = []
        self.failures = 0
        self.errors: Counter = Counter()
        self.versions: Counter = Counter()
        self.lock = threading.Lock()
        self.active = 0
        self.finished = threading.Event()

    def start(self) -> None:
        self.started = time.perf_counter()
        self.deadline = self.started + self.seconds

    def done(self) -> bool:
        n = len(self.latencies) + self.failures
        if self.max_requests:
            return n >= self.max_requests
        if not self.stop_requested.is_set() or n < self.min_requests:
            return False
        return time.perf_counter() >= self.deadline

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures += 1
            self.errors[what[:200]] += 1

    def client_finished(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self.finished.set()


class GrpcClient:
    """One closed-loop client: the completion callback of a call sends the next one."""

    def __init__(self, run: Run, call, request: bytes, timeout: float):
        self.run, self.call, self.request, self.timeout = run, call, request, timeout

    def send(self) -> None:
        started = time.perf_counter()
        future = self.call.future(self.request, timeout=self.timeout)
        future.add_done_callback(lambda f: self.answered(f, started))

    def answered(self, future, started: float) -> None:
        try:
            response = future.result()
        except Exception as e:  # noqa: BLE001 - every failure is counted, with its status
            code = getattr(e, "code", None)
            self.run.fail(f"{code() if callable(code) else type(e).__name__}: "
                          f"{e.details() if hasattr(e, 'details') else e}")
        else:
            self.run.latencies.append(time.perf_counter() - started)
            self.run.versions[response.model_spec.version.value] += 1
        if self.run.done():
            self.run.client_finished()
        else:
            self.send()


class RestConnection:
    def __init__(self, address, message: bytes):
        self.address, self.message = address, message
        self.sock: Optional[socket.socket] = None
        self.buffer = b""
        self.started = 0.0

    def connect(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def response(self):
        """(status, keep-alive) once a whole response is buffered, else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].split(b"\r\n")
        status = int(head[0].split()[1])
        length, keep = 0, True
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        if len(self.buffer) < end + 4 + length:
            return None
        self.buffer = self.buffer[end + 4 + length:]
        return status, keep


def rest_loop(run: Run, clients: int, address, path: str, body: bytes, timeout: float) -> None:
    """Closed-loop REST clients on one selectors loop (no thread per connection)."""
    host, port = address
    message = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    selector = selectors.DefaultSelector()
    connections = [RestConnection(address, message) for _ in range(clients)]

    def send(conn: RestConnection) -> None:
        conn.started = time.perf_counter()
        try:
            if conn.sock is None:
                conn.connect()
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.sock.sendall(conn.message)
        except OSError as e:
            run.fail(f"REST {type(e).__name__}: {e}")
            drop(conn)
            conn.started = time.perf_counter() + 0.1  # retry shortly
            pending.append(conn)

    def drop(conn: RestConnection) -> None:
        if conn.sock is not None:
            try:
                selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.close()

    pending: List[RestConnection] = []
    for conn in connections:
        send(conn)
    live = clients
    while live:
        now = time.perf_counter()
        for conn in [c for c in pending if c.started <= now]:
            pending.remove(conn)
            if run.done():
                live -= 1
            else:
                send(conn)
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            try:
                chunk = conn.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                run.fail("REST connection closed")
                drop(conn)
            else:
                conn.buffer += chunk
                answer = conn.response()
                if answer is None:
                    continue
                status, keep = answer
                if status == 200:
                    run.latencies.append(time.perf_counter() - conn.started)
                else:
                    run.fail(f"HTTP {status}")
                if not keep:
                    drop(conn)
            if run.done():
                drop(conn)
                live -= 1
            else:
                send(conn)
        now = time.perf_counter()
        for key in list(selector.get_map().values()):
            conn = key.data
            if now - conn.started > timeout:
                run.fail("REST timeout")
                drop(conn)
                send(conn)
    selector.close()
    run.client_finished()


def summary(run: Run, elapsed: float) -> dict:
    ms = sorted(x * 1000 for x in run.latencies)

    def pct(q):
        return round(ms[min(len(ms) - 1, int(len(ms) * q))], 3) if ms else None

    return {"requests": len(ms) + run.failures, "ok": len(ms), "failures": run.failures,
            "seconds": round(elapsed, 3), "rps": round(len(ms) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(ms[-1], 3) if ms else None,
            "errors": dict(run.errors.most_common(5)), "versions": {str(k): v for k, v in run.versions.items()}}


def run_load(args) -> dict:
    import grpc
    from tensorflow_serving.apis import predict_pb2

    with open(args.request, "rb") as f:
        grpc_request = f.read()
    with open(args.body, "rb") as f:
        rest_body = f.read()
    run = Run(args.seconds, args.min_requests, args.max_requests, args.wait_for_stop)
    if args.wait_for_stop:
        # The driver writes a line to stdin once whatever it does under load is done.
        threading.Thread(target=lambda: (sys.stdin.readline(), run.stop_requested.set()), daemon=True).start()
    grpc_clients = {"grpc": args.clients, "rest": 0, "both": (args.clients + 1) // 2}[args.api]
    rest_clients = args.clients - grpc_clients
    channel = grpc.insecure_channel(args.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary(PREDICT, request_serializer=None,
                               response_deserializer=predict_pb2.PredictResponse.FromString)
    run.active = grpc_clients + (1 if rest_clients else 0)
    if args.wait_for_stop:
        print(json.dumps({"ready": True}), flush=True)
    run.start()
    for _ in range(grpc_clients):
        GrpcClient(run, call, grpc_request, args.timeout).send()
    if rest_clients:
        host, port = args.rest.rsplit(":", 1)
        rest_loop(run, rest_clients, (host, int(port)), args.path, rest_body, args.timeout)
    run.finished.wait()
    elapsed = time.perf_counter() - run.started
    channel.close()
    return summary(run, elapsed)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("grpc", "rest", "both"), default="grpc",
                        help="both: half the clients on each")
    parser.add_argument("--address", required=True, help="gRPC host:port")
    parser.add_argument("--rest", default="", help="REST host:port")
    parser.add_argument("--path", default="/v1/models/m:predict", help="REST path")
    parser.add_argument("--request", required=True, help="a file holding a serialized PredictRequest")
    parser.add_argument("--body", required=True, help="a file holding the same request as a REST JSON body")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.0, help="run at least this long")
    parser.add_argument("--min-requests", type=int, default=0, help="and at least this many requests")
    parser.add_argument("--max-requests", type=int, default=0, help="stop at this many requests")
    parser.add_argument("--wait-for-stop", action="store_true", help="and until a line arrives on stdin")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    print(json.dumps(run_load(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
