"""The transport-free service core: every RPC's handling (conversion, validation,
error mapping, metrics) callable without grpc.aio, as another front end uses it."""

from __future__ import annotations

import grpc
import pytest

from lorapool import convert
from lorapool.errors import AdapterNotFound, InvalidRequest, Loading, LoraPoolError
from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService
from lorapool.types import FinishReason
from lorapool.v1 import lorapool_pb2 as pb


def generate_request(**fields) -> pb.GenerateRequest:
    fields.setdefault("input_ids", pb.TokenIds(ids=[5, 6, 7, 8]))
    fields.setdefault("params", pb.SamplingParams(max_new_tokens=6, ignore_eos=True))
    return pb.GenerateRequest(**fields)


def counted(metrics: Metrics, adapter: str, method: str, status: str) -> float:
    value = metrics.registry.get_sample_value(
        "lorapool_requests_total", {"adapter": adapter, "method": method, "status": status}
    )
    return value or 0.0


async def test_stream_and_complete_agree_without_a_transport(make_engine, tiny_demo):
    engine = await make_engine()
    service = LoraPoolService(engine, Metrics())
    adapter = tiny_demo.adapter_dirs[1].name
    request = generate_request(adapter_id=adapter, request_id="s-1")
    replies = [r async for r in service.generate(request)]
    assert all(isinstance(r, pb.GenerateResponse) for r in replies)
    streamed = [t for r in replies for t in r.token_ids]
    assert len(streamed) == 6
    assert replies[-1].finish_reason == int(FinishReason.LENGTH)
    assert replies[-1].request_id == "s-1"
    completion = await service.complete(
        pb.CompleteRequest(adapter_id=adapter, input_ids=request.input_ids, params=request.params)
    )
    assert list(completion.token_ids) == streamed
    assert counted(service.metrics, adapter, "Generate", "OK") == 1
    assert engine.stats().kv_pages == 0


async def test_errors_are_typed_and_counted(make_engine):
    engine = await make_engine()
    service = LoraPoolService(engine, Metrics())
    with pytest.raises(InvalidRequest) as bad:
        async for _ in service.generate(pb.GenerateRequest(prompt="")):
            pass
    code, message, trailers = convert.status_for_error(bad.value)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "empty prompt" in message
    assert convert.error_info(trailers).reason == "INVALID_REQUEST"
    with pytest.raises(AdapterNotFound):
        await service.complete(generate_request(adapter_id="no-such-adapter"))
    with pytest.raises(AdapterNotFound):
        await service.unload_adapter(pb.UnloadAdapterRequest(adapter_id="no-such-adapter"))
    # Ids no source knows share one metric label.
    assert counted(service.metrics, "unknown", "Complete", "NOT_FOUND") == 1
    assert counted(service.metrics, "unknown", "UnloadAdapter", "NOT_FOUND") == 1
    assert counted(service.metrics, "base", "Generate", "INVALID_ARGUMENT") == 1
    stats = await service.get_stats(pb.GetStatsRequest())
    assert stats.kv_pages == 0 and stats.running_requests == 0 and stats.waiting_requests == 0


async def test_every_call_is_unavailable_while_the_model_loads():
    service = LoraPoolService(None, Metrics())
    calls = [
        service.complete(generate_request()),
        service.tokenize(pb.TokenizeRequest(text="hi")),
        service.list_adapters(pb.ListAdaptersRequest()),
        service.get_stats(pb.GetStatsRequest()),
        service.get_model_info(pb.GetModelInfoRequest()),
        service.load_adapter(pb.LoadAdapterRequest(adapter_id="a")),
    ]
    for call in calls:
        with pytest.raises(Loading) as exc:
            await call
        assert exc.value.status == "UNAVAILABLE" and "loading" in str(exc.value)
        assert exc.value.reason == "LOADING"
    with pytest.raises(LoraPoolError):
        async for _ in service.generate(generate_request()):
            pass


async def test_the_package_root_is_the_in_process_api(tiny_demo):
    """The README's example: the engine, requests and results from `lorapool`."""
    from lorapool import Engine, EngineConfig, GenerationRequest, SamplingParams
    from lorapool.server.engine.engine import Engine as EngineClass

    assert Engine is EngineClass
    engine = Engine(
        EngineConfig(model_dir=str(tiny_demo.model_dir), adapter_dirs=[str(tiny_demo.adapters_dir)])
    )
    await engine.start()
    try:
        request = GenerationRequest(
            request_id="r1",
            prompt="river stone",
            adapter_id="adapter-003",
            params=SamplingParams(max_new_tokens=6, ignore_eos=True),
        )
        events = [e async for e in engine.generate(request)]
        assert sum(len(e.token_ids) for e in events) == 6
    finally:
        await engine.stop()


def test_importing_the_package_root_and_its_client_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, lorapool; lorapool.LoraPoolClient; lorapool.SamplingParams; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
