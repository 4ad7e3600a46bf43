"""LoraPoolService on grpc.aio: decode, call the transport-free core
(server/service.py), encode. A typed engine error becomes its gRPC status with a
google.rpc.ErrorInfo reason in the rich details; everything else (validation,
metrics, request logs) is the core's."""

from __future__ import annotations

from lorapool import convert
from lorapool.errors import LoraPoolError
from lorapool.server.service import LoraPoolService
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc


class LoraPoolServicer(pb_grpc.LoraPoolServiceServicer):
    def __init__(self, service: LoraPoolService):
        self.service = service

    async def Generate(self, request, context):
        try:
            async for reply in self.service.generate(request):
                yield reply
        except LoraPoolError as exc:
            await context.abort(*convert.status_for_error(exc))

    async def Complete(self, request, context):
        return await _unary(context, self.service.complete(request))

    async def Tokenize(self, request, context):
        return await _unary(context, self.service.tokenize(request))

    async def LoadAdapter(self, request, context):
        return await _unary(context, self.service.load_adapter(request))

    async def UnloadAdapter(self, request, context):
        return await _unary(context, self.service.unload_adapter(request))

    async def ListAdapters(self, request, context):
        return await _unary(context, self.service.list_adapters(request))

    async def GetStats(self, request, context):
        return await _unary(context, self.service.get_stats(request))

    async def GetModelInfo(self, request, context):
        return await _unary(context, self.service.get_model_info(request))


async def _unary(context, reply):
    try:
        return await reply
    except LoraPoolError as exc:
        await context.abort(*convert.status_for_error(exc))
