"""Clients over TF Serving's own APIs: the same code drives the embedded server and a real one."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Dict, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


class ServingClient:
    def __init__(self, address: str = "127.0.0.1:8500", timeout: float = 10.0):
        self.address, self.timeout = address, timeout
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def is_reachable(self, wait: float = 1.0) -> bool:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
            return True
        except grpc.FutureTimeoutError:
            return False

    def model_status(self, name: str, version: Optional[int] = None) -> get_model_status_pb2.GetModelStatusResponse:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return self.models.GetModelStatus(request, timeout=self.timeout)

    def available_versions(self, name: str):
        try:
            status = self.model_status(name)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return sorted(s.version for s in status.model_version_status if s.state == AVAILABLE)

    def predict(self, name: str, inputs: Dict[str, np.ndarray], version: Optional[int] = None,
                label: Optional[str] = None, signature: str = "serving_default") -> Dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        elif label is not None:
            request.model_spec.version_label = label
        for alias, value in inputs.items():
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
        response = self.prediction.Predict(request, timeout=self.timeout)
        return {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        request = model_management_pb2.ReloadConfigRequest(config=config)
        self.models.HandleReloadConfigRequest(request, timeout=max(self.timeout, 300))

    def apply_deployment(self, config: model_server_config_pb2.ModelServerConfig,
                         current: Optional[model_server_config_pb2.ModelServerConfig] = None,
                         wait_timeout: float = 120.0) -> None:
        """Applies a config whose labels may name versions the server has not loaded yet.

        TF Serving refuses to move a label onto a version that is not
        AVAILABLE, so this first sends the new version lists (plus the
        versions the labels point at now, from `current`) with the labels
        left where they are, waits until the new versions load, then sends
        the full config. No label disappears in between.
        """
        old_labels = {e.name: dict(e.version_labels) for e in (current.model_config_list.config if current else [])}
        staged = model_server_config_pb2.ModelServerConfig()
        staged.CopyFrom(config)
        for entry in staged.model_config_list.config:
            loaded = set(self.available_versions(entry.name))
            for label, version in list(entry.version_labels.items()):
                if version in loaded:
                    continue
                previous = old_labels.get(entry.name, {}).get(label)
                if previous is not None and previous in loaded:
                    entry.version_labels[label] = previous
                    if entry.model_version_policy.HasField("specific") and \
                            previous not in entry.model_version_policy.specific.versions:
                        entry.model_version_policy.specific.versions.append(previous)
                else:
                    del entry.version_labels[label]
        self.reload_config(staged)
        deadline = time.time() + wait_timeout
        for entry in config.model_config_list.config:
            wanted = set(entry.version_labels.values())
            while True:
                status = self.model_status(entry.name)
                states = {s.version: s for s in status.model_version_status}
                failed = [v for v in wanted if v in states and states[v].state == END]
                if failed:
                    raise RuntimeError(f"model {entry.name} version(s) {failed} failed to load: "
                                       f"{states[failed[0]].status.error_message}")
                if all(v in states and states[v].state == AVAILABLE for v in wanted):
                    break
                if time.time() > deadline:
                    raise TimeoutError(f"model {entry.name}: versions {sorted(wanted)} not available after "
                                       f"{wait_timeout:.0f}s")
                time.sleep(0.2)
        self.reload_config(config)


def rest_predict(url: str, model: str, body: dict, label: Optional[str] = None, version: Optional[int] = None,
                 timeout: float = 10.0) -> dict:
    """POST .../v1/models/<model>[/labels/L|/versions/V]:predict and decode the JSON answer."""
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else "") + \
        (f"/labels/{label}" if label is not None and version is None else "") + ":predict"
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')}") from None
