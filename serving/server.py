"""`increc serve`: an embedded model server that speaks TensorFlow Serving's gRPC and REST APIs.

It takes `tensorflow_model_server`'s flags with the same meaning and
defaults, loads SavedModels from `--model_base_path` or a text
`--model_config_file`, and serves PredictionService and ModelService on
`--port` and the REST API on `--rest_api_port`, so existing TF Serving
clients work unchanged. Unlike the real binary it binds 127.0.0.1 unless
`--host` says otherwise and bounds request sizes (`--max_request_bytes`).
It runs SavedModels with TensorFlow in Python (on the GPU when TensorFlow
sees one); it has no TFLite, no TF1 session tuning flags and no SSL.
`--backend tfserving` hands the same flags to a real `tensorflow_model_server`
on PATH instead.
"""
from __future__ import annotations

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
    entry.base_path = os.path.abspath(flags.model_base_path)
    entry.model_platform = "tensorflow"
    return config


class EmbeddedServer:
    """The running server: model manager, gRPC and REST front ends, pollers."""

    def __init__(self, flags):
        from serving import inference, metrics as metrics_lib
        from serving.model_manager import ModelManager

        self.flags = flags
        self.metrics = metrics_lib.Registry()

        def on_load(path, ok, seconds):
            self.metrics.increment(metrics_lib.LOAD_ATTEMPTS, {"model_path": path, "status": "success" if ok else "fail"})
            if ok:
                self.metrics.increment(metrics_lib.LOAD_LATENCY, {"model_path": path}, int(seconds * 1e6))

        self.manager = ModelManager(
            allow_labels_for_unavailable=flags.allow_version_labels_for_unavailable_models,
            enable_warmup=flags.enable_model_warmup,
            max_load_retries=flags.max_num_load_retries,
            retry_interval_seconds=flags.load_retry_interval_micros / 1e6,
            warmup_handler=inference.replay_warmup,
            on_load=on_load,
        )
        self.grpc_server = None
        self.http_server = None
        self.grpc_port = None
        self.rest_port = None
        self._stop = threading.Event()

    def start(self) -> None:
        from serving import grpc_api, rest_api
        from serving.metrics import parse_monitoring_config

        flags = self.flags
        # Like TF Serving, the ports open only once the configured models are available.
        self.manager.set_config(_config_from_flags(flags))
        if flags.file_system_poll_wait_seconds > 0:
            self.manager.start_polling(flags.file_system_poll_wait_seconds)
        if flags.model_config_file and flags.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._poll_config, daemon=True, name="config-poll").start()

        batcher = None
        if flags.enable_batching:
            from serving.batching import Batcher, parse_parameters

            max_batch, timeout = parse_parameters(flags.batching_parameters_file)
            batcher = Batcher(self.manager, max_batch, timeout, self.metrics)
        self.grpc_server, self.grpc_port = grpc_api.serve(self.manager, self.metrics, flags.host, flags.port,
                                                          flags.max_request_bytes, batcher)
        if flags.rest_api_port:
            monitoring_path = None
            if flags.monitoring_config_file:
                enabled, path = parse_monitoring_config(flags.monitoring_config_file)
                monitoring_path = path if enabled else None
            api = rest_api.RestApi(self.manager, self.metrics, flags.rest_api_timeout_in_ms, monitoring_path,
                                   flags.rest_api_enable_cors_support, flags.max_request_bytes)
            self.http_server = rest_api.serve(api, flags.host, flags.rest_api_port)
            self.rest_port = self.http_server.server_address[1]
            threading.Thread(target=self.http_server.serve_forever, daemon=True, name="rest").start()
        logging.warning("serving gRPC on %s:%s%s", flags.host, self.grpc_port,
                        f", REST on {flags.host}:{self.rest_port}" if self.rest_port else "")

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

    def stop(self) -> None:
        self._stop.set()
        self.manager.stop()
        if self.http_server is not None:
            self.http_server.shutdown()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=2)


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
