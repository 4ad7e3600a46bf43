"""`lorapool serve-ray` end to end: one local Ray instance for the module, the tiny
demo on two engine replicas behind Serve's gRPC proxy. Greedy outputs match an
in-process Engine, an adapter's requests stay on one replica, errors keep their
status and ErrorInfo, admin calls reach every replica."""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("ray.serve")

from conftest import free_port  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from lorapool import convert  # noqa: E402
from lorapool.types import GenerationRequest, SamplingParams  # noqa: E402
from lorapool.v1 import lorapool_pb2 as pb  # noqa: E402
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc  # noqa: E402

REPLICAS = 2
PROMPTS = ["The market opened", "Once upon a time"]
ADAPTERS = ["adapter-000", "adapter-001", "adapter-002", ""]
GREEDY = pb.SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    """(channel, stub) of a 2-replica serve-ray deployment; torn down at the end."""
    from lorapool.server.engine.config import EngineConfig
    from lorapool.server.ray.cluster import deploy, shutdown

    port = free_port()
    config = EngineConfig(
        model_dir=str(tiny_demo.model_dir),
        adapter_dirs=[str(tiny_demo.adapters_dir)],
        pool_mib=32,
        host_cache_mib=64,
    )
    try:
        deploy(
            config,
            replicas=REPLICAS,
            port=port,
            replica_cpus=0.5,
            http_port=free_port(),
            num_cpus=2,
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield channel, pb_grpc.LoraPoolServiceStub(channel)
        channel.close()
    finally:
        shutdown()


def _request(adapter: str, prompt: str, kind=pb.GenerateRequest):
    return kind(adapter_id=adapter, prompt=prompt, params=GREEDY)


async def test_greedy_outputs_match_an_in_process_engine(cluster, make_engine):
    _, stub = cluster
    engine = await make_engine(pool_mib=32, host_cache_mib=64)
    for adapter in ADAPTERS:
        for prompt in PROMPTS:
            req = GenerationRequest(
                request_id="r",
                prompt=prompt,
                adapter_id=adapter,
                params=SamplingParams(max_new_tokens=8, temperature=0.0),
            )
            expected = [t async for e in engine.generate(req) for t in e.token_ids]
            streamed = [
                t for m in stub.Generate(_request(adapter, prompt), timeout=60) for t in m.token_ids
            ]
            completed = stub.Complete(_request(adapter, prompt, pb.CompleteRequest), timeout=60)
            assert streamed == expected, (adapter, prompt)
            assert list(completed.token_ids) == expected, (adapter, prompt)


def test_streaming_delivers_one_message_per_token(cluster):
    _, stub = cluster
    messages = list(stub.Generate(_request("adapter-003", PROMPTS[0]), timeout=60))
    assert len(messages) == GREEDY.max_new_tokens
    assert all(len(m.token_ids) == 1 for m in messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_each_adapters_requests_stay_on_one_replica(cluster):
    _, stub = cluster
    used = ["adapter-004", "adapter-005", "adapter-006", "adapter-007"]
    for _ in range(3):
        for adapter in used:
            stub.Complete(_request(adapter, PROMPTS[1], pb.CompleteRequest), timeout=60)
    listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    for adapter in used:
        assert len(listed[adapter].replicas) == 1, listed[adapter]
        assert listed[adapter].requests_served == 3
    holders = {listed[a].replicas[0] for a in used}
    assert holders, "no replica named"
    assert not listed["adapter-019"].replicas  # never used: held nowhere


def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if not isinstance(result, pb.CompleteResponse):
            list(result)
    err = caught.value
    return err.code(), convert.error_info(err.trailing_metadata()).reason


@pytest.mark.parametrize(
    ("adapter", "prompt", "code", "reason"),
    [
        ("no-such-adapter", "hello", grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        ("adapter-001", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        ("", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    ],
)
def test_errors_keep_status_and_error_info(cluster, start_server, adapter, prompt, code, reason):
    _, stub = cluster
    plain = pb_grpc.LoraPoolServiceStub(grpc.insecure_channel(start_server().target))
    for target in (stub, plain):
        assert _error(
            lambda t=target: t.Complete(_request(adapter, prompt, pb.CompleteRequest))
        ) == (
            code,
            reason,
        )
        assert _error(lambda t=target: t.Generate(_request(adapter, prompt))) == (code, reason)


def test_admin_calls_reach_every_replica(cluster):
    _, stub = cluster
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="adapter-010"), timeout=60)
    assert len(loaded.adapter.replicas) == REPLICAS
    listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert len(listed["adapter-010"].replicas) == REPLICAS
    stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="adapter-010"), timeout=60)
    listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert not listed["adapter-010"].replicas
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="no-such-adapter"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert convert.error_info(caught.value.trailing_metadata()).reason == "ADAPTER_NOT_FOUND"


def test_stats_sum_the_fleet_and_health_serves(cluster):
    channel, stub = cluster
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.total_pages == REPLICAS * info.total_pages
    assert stats.free_pages + stats.kv_pages + stats.cached_pages + stats.adapter_pages == (
        stats.total_pages
    )
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
