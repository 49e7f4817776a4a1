"""PredictionService and ModelService on grpc.aio, with the official tensorflow_serving.apis stubs.

Handlers run on the server's event loop: decoding, checks and encoding
happen there, and the model runs in the executor (batched Predict, or a
thread pool), so no request holds a thread while it waits. Errors carry TF
Serving's status code and message, cut at 1024 characters.
"""
from __future__ import annotations

import logging
import time

import grpc
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import inference
from serving.errors import ServingError
from serving.metrics import EXAMPLE_COUNT_TOTAL, EXAMPLE_COUNTS, REQUEST_COUNT, REQUEST_LATENCY

MAX_SEND_BYTES = 2 ** 31 - 1  # TF Serving's INT32_MAX; what is received is bounded by --max_request_bytes


class _Service:
    def __init__(self, manager, metrics, executor, max_bytes: int, method_check: bool):
        self.manager, self.metrics, self.executor = manager, metrics, executor
        self.max_bytes, self.method_check = max_bytes, method_check

    async def _fail(self, context, api: str, name: str, error: Exception, counted: bool):
        if isinstance(error, ServingError):
            code, message = error.code, error.grpc_message()
        else:
            logging.error("gRPC %s failed", api, exc_info=error)
            code, message = grpc.StatusCode.INTERNAL, f"Internal error: {type(error).__name__}"
        if counted:
            self.metrics.increment(REQUEST_COUNT, {"model_name": name, "status": code.name})
        await context.abort(code, message)

    def _succeeded(self, api: str, name: str, started: float) -> None:
        self.metrics.increment(REQUEST_COUNT, {"model_name": name, "status": "OK"})
        self.metrics.observe(REQUEST_LATENCY, {"model_name": name, "API": api, "entrypoint": "GRPC"},
                             (time.perf_counter() - started) * 1e6)


class PredictionService(_Service, prediction_service_pb2_grpc.PredictionServiceServicer):
    async def Predict(self, request, context):
        started = time.perf_counter()
        try:
            call = inference.prepare_predict(self.manager, request, self.max_bytes)
            response = inference.predict_response(call, await self.executor.predict(call))
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            await self._fail(context, "Predict", request.model_spec.name, e, counted=True)
        self._succeeded("Predict", request.model_spec.name, started)
        return response

    async def _examples(self, request, context, api: str):
        started = time.perf_counter()
        name = request.model_spec.name
        try:
            call = inference.prepare_examples(self.manager, request, api.lower(), self.method_check)
            self.metrics.observe(EXAMPLE_COUNTS, {"model": name}, len(call.records))
            self.metrics.increment(EXAMPLE_COUNT_TOTAL, {"model": name}, len(call.records))
            response = await self.executor.blocking(call.run)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, api, name, e, counted=True)
        self._succeeded(api, name, started)
        return response

    async def Classify(self, request, context):
        return await self._examples(request, context, "Classify")

    async def Regress(self, request, context):
        return await self._examples(request, context, "Regress")

    async def MultiInference(self, request, context):
        try:
            return await self.executor.blocking(inference.multi_inference, self.manager, request, self.method_check)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "MultiInference", "", e, counted=False)

    async def GetModelMetadata(self, request, context):
        try:
            return inference.get_model_metadata(self.manager, request)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "GetModelMetadata", "", e, counted=False)


class ModelService(_Service, model_service_pb2_grpc.ModelServiceServicer):
    async def GetModelStatus(self, request, context):
        try:
            return inference.get_model_status(self.manager, request)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "GetModelStatus", "", e, counted=False)

    async def HandleReloadConfigRequest(self, request, context):
        response = model_management_pb2.ReloadConfigResponse()
        try:
            await self.executor.blocking(self.manager.set_config, request.config)
        except ServingError as e:
            # TF Serving returns the status and also writes it into the response.
            response.status.error_code = error_codes_pb2.Code.Value(e.code.name)
            response.status.error_message = e.message
            await context.abort(e.code, e.grpc_message())
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "HandleReloadConfigRequest", "", e, counted=False)
        return response


async def serve(manager, metrics, executor, host: str, port: int, max_message_bytes: int,
                method_check: bool = False):
    """Starts the gRPC server on the running loop; returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", MAX_SEND_BYTES),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    args = (manager, metrics, executor, max_message_bytes, method_check)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(*args), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(*args), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    return server, bound
