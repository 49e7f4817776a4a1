"""`increc serve`: an embedded model server that speaks TensorFlow Serving's gRPC and REST APIs.

It takes `tensorflow_model_server`'s flags with the same meaning and
defaults, loads SavedModels from `--model_base_path` or a text
`--model_config_file`, and serves PredictionService and ModelService on
`--port` and the REST API on `--rest_api_port`, so existing TF Serving
clients work unchanged. Unlike the real binary it binds 127.0.0.1 unless
`--host` says otherwise and bounds request sizes (`--max_request_bytes`).
It runs SavedModels with TensorFlow in Python (on the GPU when TensorFlow
sees one); it has no TFLite, no TF1 session tuning flags and no SSL.
Requests are decoded and answered on one event loop (grpc.aio and a small
HTTP/1.1 server); models run off it, and concurrent Predict calls run as
one batched call (`--enable_batching`, on by default here, unlike TF
Serving; see flags.py).
`--backend tfserving` hands the same flags to a real `tensorflow_model_server`
on PATH instead.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from serving import flags as flags_lib  # noqa: E402


def _config_from_flags(flags):
    from tensorflow_serving.config import model_server_config_pb2

    from serving import model_config

    if flags.model_config_file:
        return model_config.read_config(flags.model_config_file)
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = flags.model_name
    path = flags.model_base_path
    entry.base_path = path if "://" in path else os.path.abspath(path)
    entry.model_platform = "tensorflow"
    return config


class EmbeddedServer:
    """The running server: model manager, pollers, and one event loop thread serving gRPC and REST."""

    def __init__(self, flags):
        from serving import inference, metrics as metrics_lib
        from serving.model_manager import ModelManager

        self.flags = flags
        self.metrics = metrics_lib.Registry()

        def on_load(path, ok, seconds):
            self.metrics.increment(metrics_lib.LOAD_ATTEMPTS, {"model_path": path, "status": "success" if ok else "fail"})
            if ok:
                self.metrics.increment(metrics_lib.LOAD_LATENCY, {"model_path": path}, int(seconds * 1e6))

        def on_warmup(path, status, seconds):
            self.metrics.observe(metrics_lib.WARMUP_LATENCY, {"model_path": path, "status": status}, seconds * 1e6)

        def warmup(servable, log):
            inference.replay_warmup(servable, log, flags.enable_signature_method_name_check)

        self.manager = ModelManager(
            allow_labels_for_unavailable=flags.allow_version_labels_for_unavailable_models,
            enable_warmup=flags.enable_model_warmup,
            max_load_retries=flags.max_num_load_retries,
            retry_interval_seconds=flags.load_retry_interval_micros / 1e6,
            warmup_handler=warmup,
            on_load=on_load,
            on_warmup=on_warmup,
        )
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.executor = None
        self.grpc_server = None
        self.http_server = None
        self.grpc_port = None
        self.rest_port = None
        self._stop = threading.Event()

    def start(self) -> None:
        flags = self.flags
        # Like TF Serving, the ports open only once every configured model has a version available.
        self.manager.set_config(_config_from_flags(flags))
        self.manager.wait_until_available(flags.file_system_poll_wait_seconds, self._stop)
        if flags.file_system_poll_wait_seconds > 0:
            self.manager.start_polling(flags.file_system_poll_wait_seconds)
        if flags.model_config_file and flags.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._poll_config, daemon=True, name="config-poll").start()
        self.loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=self._run_loop, args=(ready,), daemon=True, name="serving-io").start()
        ready.result()
        logging.warning("serving gRPC on %s:%s%s%s", flags.host, self.grpc_port,
                        f", REST on {flags.host}:{self.rest_port}" if self.rest_port else "",
                        ", batching on" if flags.enable_batching else "")

    def _run_loop(self, ready: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._open_ports())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            ready.set_exception(e)
            return
        ready.set_result(None)
        self.loop.run_forever()

    async def _open_ports(self) -> None:
        from serving import grpc_api, rest_api
        from serving.execution import make_executor
        from serving.http_server import HttpServer
        from serving.metrics import parse_monitoring_config

        flags = self.flags
        self.executor = make_executor(self.loop, flags.enable_batching, flags.batching_parameters_file, self.metrics)
        self.grpc_server, self.grpc_port = await grpc_api.serve(
            self.manager, self.metrics, self.executor, flags.host, flags.port, flags.max_request_bytes,
            flags.enable_signature_method_name_check)
        if flags.rest_api_port:
            monitoring_path = None
            if flags.monitoring_config_file:
                enabled, path = parse_monitoring_config(flags.monitoring_config_file)
                monitoring_path = path if enabled else None
            api = rest_api.RestApi(self.manager, self.metrics, self.executor, flags.rest_api_timeout_in_ms,
                                   monitoring_path, flags.rest_api_enable_cors_support, flags.max_request_bytes,
                                   flags.enable_signature_method_name_check)
            self.http_server = HttpServer(self.loop, api.handle, flags.max_request_bytes, rest_api.error_response,
                                          api.extra_headers)
            try:
                self.rest_port = await self.http_server.start(flags.host, flags.rest_api_port)
            except OSError as e:
                raise OSError(f"cannot bind REST to {flags.host}:{flags.rest_api_port}: {e.strerror}") from None

    def _poll_config(self) -> None:
        from serving import model_config

        last = None
        while not self._stop.wait(self.flags.model_config_file_poll_wait_seconds):
            try:
                mtime = os.stat(self.flags.model_config_file).st_mtime_ns
                if mtime == last:
                    continue
                last = mtime
                self.manager.set_config(model_config.read_config(self.flags.model_config_file))
            except Exception:  # noqa: BLE001 - a bad edit must not stop serving the last good config
                logging.exception("reloading %s failed; keeping the current config", self.flags.model_config_file)

    async def _close_ports(self) -> None:
        if self.http_server is not None:
            await self.http_server.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)

    def stop(self) -> None:
        self._stop.set()
        self.manager.stop()
        if self.loop is not None and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_ports(), self.loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - shutting down anyway
                logging.exception("closing the ports failed")
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.executor is not None:
            self.executor.stop()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        flags = flags_lib.parse(argv)
    except flags_lib.FlagError as e:
        print(str(e), file=sys.stderr)
        return 2
    if flags.backend == "tfserving":
        from serving import launcher

        return launcher.exec_real_server(flags)
    server = EmbeddedServer(flags)
    try:
        server.start()
    except Exception as e:  # noqa: BLE001 - startup failures end the process with a message, like TF Serving
        print(f"increc serve: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
