"""PredictionService and ModelService over gRPC, with the official tensorflow_serving.apis stubs."""
from __future__ import annotations

import time

import grpc
from tensorflow_serving.apis import (model_management_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)
from tensorflow.core.protobuf import error_codes_pb2

from serving import inference
from serving.errors import ServingError
from serving.metrics import REQUEST_COUNT, REQUEST_LATENCY

COUNTED = {"Predict", "Classify", "Regress"}  # TF Serving counts these gRPC calls only


def _call(servicer, api: str, handler, request, context):
    started = time.time()
    name = getattr(getattr(request, "model_spec", None), "name", "")
    try:
        response = handler(servicer.manager, request)
    except ServingError as e:
        if api in COUNTED:
            servicer.metrics.increment(REQUEST_COUNT, {"model_name": name, "status": e.code.name})
        context.abort(e.code, e.grpc_message())
    except Exception as e:  # noqa: BLE001 - a bug must not take the server down
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"[:1024])
    if api in COUNTED:
        servicer.metrics.increment(REQUEST_COUNT, {"model_name": name, "status": "OK"})
        servicer.metrics.observe(REQUEST_LATENCY, {"model_name": name, "API": api, "entrypoint": "GRPC"},
                                 (time.time() - started) * 1e6)
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager, metrics, batcher=None):
        self.manager, self.metrics, self.batcher = manager, metrics, batcher

    def Predict(self, request, context):
        handler = self.batcher.predict if self.batcher else inference.predict
        return _call(self, "Predict", handler, request, context)

    def Classify(self, request, context):
        return _call(self, "Classify", inference.classify, request, context)

    def Regress(self, request, context):
        return _call(self, "Regress", inference.regress, request, context)

    def MultiInference(self, request, context):
        return _call(self, "MultiInference", inference.multi_inference, request, context)

    def GetModelMetadata(self, request, context):
        return _call(self, "GetModelMetadata", inference.get_model_metadata, request, context)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager, metrics):
        self.manager, self.metrics = manager, metrics

    def GetModelStatus(self, request, context):
        return _call(self, "GetModelStatus", inference.get_model_status, request, context)

    def HandleReloadConfigRequest(self, request, context):
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.manager.set_config(request.config)
        except ServingError as e:
            response.status.error_code = error_codes_pb2.Code.Value(e.code.name)
            response.status.error_message = e.message
            context.abort(e.code, e.grpc_message())
        return response


def serve(manager, metrics, host: str, port: int, max_message_bytes: int, batcher=None, workers: int = 16):
    from concurrent import futures

    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, metrics, batcher), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager, metrics), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    server.start()
    return server, bound
