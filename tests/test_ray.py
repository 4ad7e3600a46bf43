"""`lorapool serve-ray` end to end: one local Ray instance for the module, the tiny
demo on two engine replicas behind Serve's gRPC proxy. Greedy outputs match an
in-process Engine, an adapter's requests stay on one replica, errors keep their
status and ErrorInfo, admin calls reach every replica, GetStats lists each
replica, the fleet's /metrics labels each replica's samples, what a replica
advertises to Serve's router follows its engine, cancelled streams stop on their
replica, and a drain (last: it ends the
shared cluster's service) finishes streams while health says NOT_SERVING. The
router's ranking, the --host hook and the flags are tested without Ray running. The deployment checks an
inference and an admin key (the rules of `lorapool serve`, transport.auth.authorize,
unit-tested here too), so the tests' stubs send them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest

pytest.importorskip("ray.serve")

from conftest import free_port  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from lorapool import convert  # noqa: E402
from lorapool.server.transport.auth import (  # noqa: E402
    ADMIN_METHODS,
    ApiKeys,
    authorize,
)
from lorapool.types import GenerationRequest, SamplingParams  # noqa: E402
from lorapool.v1 import lorapool_pb2 as pb  # noqa: E402
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc  # noqa: E402

REPLICAS = 2
PROMPTS = ["The market opened", "Once upon a time"]
ADAPTERS = ["adapter-000", "adapter-001", "adapter-002", ""]
GREEDY = pb.SamplingParams(max_new_tokens=8, temperature=0.0)
USER_KEY = "ray-user-key-for-tests"
ADMIN_KEY = "ray-admin-key-for-tests"
SERVICE = pb.DESCRIPTOR.services_by_name["LoraPoolService"]
LORAPOOL = str(Path(sys.executable).with_name("lorapool"))


class _SendKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `x-api-key: key` to every call."""

    def __init__(self, key: str):
        self.key = key

    def _with_key(self, details):
        metadata = [*(details.metadata or ()), ("x-api-key", self.key)]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


class Cluster(NamedTuple):
    channel: grpc.Channel  # sends no key
    stub: pb_grpc.LoraPoolServiceStub  # sends the inference key
    admin: pb_grpc.LoraPoolServiceStub  # sends the admin key
    metrics_url: str  # the fleet's /metrics endpoint


@pytest.fixture(scope="module")
def cluster(tiny_demo):
    """A 2-replica serve-ray deployment with both keys; torn down at the end."""
    from lorapool.server.engine.config import EngineConfig
    from lorapool.server.ray.cluster import deploy, shutdown

    port, metrics_port = free_port(), free_port()
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
            api_key=USER_KEY,
            admin_api_key=ADMIN_KEY,
            metrics_port=metrics_port,
            metrics_host="127.0.0.1",
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        user = grpc.intercept_channel(channel, _SendKey(USER_KEY))
        admin = grpc.intercept_channel(channel, _SendKey(ADMIN_KEY))
        yield Cluster(
            channel,
            pb_grpc.LoraPoolServiceStub(user),
            pb_grpc.LoraPoolServiceStub(admin),
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
        channel.close()
    finally:
        shutdown()


def _request(adapter: str, prompt: str, kind=pb.GenerateRequest):
    return kind(adapter_id=adapter, prompt=prompt, params=GREEDY)


async def test_greedy_outputs_match_an_in_process_engine(cluster, make_engine):
    stub = cluster.stub
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
    stub = cluster.stub
    messages = list(stub.Generate(_request("adapter-003", PROMPTS[0]), timeout=60))
    assert len(messages) == GREEDY.max_new_tokens
    assert all(len(m.token_ids) == 1 for m in messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_each_adapters_requests_stay_on_one_replica(cluster):
    stub = cluster.stub
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


def _fleet_stats(stub) -> pb.GetStatsResponse:
    return stub.GetStats(pb.GetStatsRequest(), timeout=30)


def test_cancelled_streams_stop_on_their_replicas(cluster):
    """Serve's proxy alone lets about half of cancelled streams run on; here every
    cancelled Generate is aborted on its replica: nothing runs or waits, no KV page
    stays taken, and far fewer tokens are generated than the streams asked for."""
    stub = cluster.stub
    long = pb.SamplingParams(max_new_tokens=1900, temperature=0.0, ignore_eos=True)
    before = _fleet_stats(stub).generated_tokens
    calls = []
    for i in range(16):
        request = pb.GenerateRequest(adapter_id=ADAPTERS[i % 4], prompt=PROMPTS[i % 2], params=long)
        call = stub.Generate(request, timeout=120)
        next(call)  # generating on its replica
        calls.append(call)
    assert _fleet_stats(stub).running_requests + _fleet_stats(stub).waiting_requests > 0
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + 5.0
    while True:
        stats = _fleet_stats(stub)
        idle = stats.running_requests == 0 and stats.waiting_requests == 0
        if (idle and stats.kv_pages == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for replica in stats.replicas:
        own = replica.stats
        assert (own.running_requests, own.waiting_requests, own.kv_pages) == (0, 0, 0), own
        assert own.free_pages + own.cached_pages + own.adapter_pages == own.total_pages
    generated = stats.generated_tokens - before
    assert generated < len(calls) * long.max_new_tokens // 4, generated


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (name, labels) -> value."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_serve_every_replica_labelled_with_its_id(cluster):
    """One /metrics port for the fleet: each replica's samples carry replica=<id>
    (the ids of GetStats), and a request moves its replica's counters only."""
    replicas = sorted(r.replica_id for r in _fleet_stats(cluster.stub).replicas)
    assert len(replicas) == REPLICAS
    before = _scrape(cluster.metrics_url)
    assert before[("lorapool_replicas_scraped", frozenset())] == REPLICAS
    for replica in replicas:
        assert ("lorapool_pool_pages", frozenset({("owner", "free"), ("replica", replica)})) in (
            before
        )
        info = [k for k in before if k[0] == "lorapool_lora_requests_info"]
        assert any(("replica", replica) in labels for _, labels in info), info
    adapter = "adapter-009"
    cluster.stub.Complete(_request(adapter, PROMPTS[0], pb.CompleteRequest), timeout=60)
    listed = {a.adapter_id: a for a in cluster.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    (holder,) = listed[adapter].replicas
    after = _scrape(cluster.metrics_url)

    def tokens(samples, replica):
        key = frozenset({("adapter", adapter), ("replica", replica)})
        return samples.get(("lorapool_generated_tokens_total", key), 0.0)

    assert tokens(after, holder) - tokens(before, holder) == GREEDY.max_new_tokens
    for other in set(replicas) - {holder}:
        assert tokens(after, other) == tokens(before, other)


def _advertised(replica: str) -> list[str]:
    """What the engine replica advertises to Serve's router (its multiplex cache)."""
    from ray import serve

    from lorapool.server.ray.deployments import APP_NAME, ENGINE_NAME

    handle = serve.get_deployment_handle(ENGINE_NAME, APP_NAME)
    return handle.advertised.remote(replica=replica).result(timeout_s=30)[1]


def test_advertised_adapters_follow_the_engines_residency(cluster):
    """An adapter its engine no longer holds (here unloaded; the same holds for
    the host cache's evictions) leaves the replica's entry in Serve's table within
    a second, and a later request loads it again."""
    adapter = "adapter-016"
    request = _request(adapter, PROMPTS[1], pb.CompleteRequest)
    expected = list(cluster.stub.Complete(request, timeout=60).token_ids)
    listed = {a.adapter_id: a for a in cluster.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    (holder,) = listed[adapter].replicas
    assert adapter in _advertised(holder)
    # one replica holds it: the fleet's UnloadAdapter succeeds
    cluster.admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter), timeout=30)
    deadline = time.monotonic() + 3.0
    while adapter in _advertised(holder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert adapter not in _advertised(holder)
    # held nowhere now: every replica answers NOT_FOUND, and so does the fleet
    unload = pb.UnloadAdapterRequest(adapter_id=adapter)
    assert _error(lambda: cluster.admin.UnloadAdapter(unload, timeout=30)) == (
        grpc.StatusCode.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
    )
    assert list(cluster.stub.Complete(request, timeout=60).token_ids) == expected
    listed = {a.adapter_id: a for a in cluster.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert len(listed[adapter].replicas) == 1
    assert adapter in _advertised(listed[adapter].replicas[0])


class _Multiplexer:
    """What prune_advertised reads of Serve's multiplex cache."""

    def __init__(self, models, loading=()):
        self.models = dict.fromkeys(models)
        self._model_load_tasks = set(loading)
        self._push_multiplexed_replica_info = False


def test_pruning_keeps_what_the_engine_holds_and_what_is_loading():
    from lorapool.server.ray.engine import prune_advertised

    cache = _Multiplexer(["held", "evicted", "loading"], loading=["loading"])
    assert prune_advertised(cache, {"held"}) == ["evicted"]
    assert list(cache.models) == ["held", "loading"] and cache._push_multiplexed_replica_info
    unchanged = _Multiplexer(["held"])
    assert prune_advertised(unchanged, {"held", "other"}) == []
    assert not unchanged._push_multiplexed_replica_info


def test_engine_holdings_count_adapters_of_queued_requests():
    """An adapter evicted from host memory with a request waiting for it stays
    advertised: the engine reloads it for that request."""
    from types import SimpleNamespace

    from lorapool.server.ray.engine import engine_holdings
    from lorapool.types import AdapterState

    infos = [
        SimpleNamespace(adapter_id=a, state=s)
        for a, s in [
            ("known", AdapterState.KNOWN),
            ("host", AdapterState.HOST),
            ("device", AdapterState.DEVICE),
            ("loading", AdapterState.LOADING),
            ("waited-for", AdapterState.KNOWN),
        ]
    ]
    scheduler = SimpleNamespace(
        running=[SimpleNamespace(adapter_id="")],
        waiting=[SimpleNamespace(adapter_id="waited-for")],
    )
    engine = SimpleNamespace(list_adapters=lambda: infos, scheduler=scheduler)
    assert engine_holdings(engine) == {"host", "device", "loading", "waited-for"}


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
    stub = cluster.stub
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
    stub, admin = cluster.stub, cluster.admin
    loaded = admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="adapter-010"), timeout=60)
    assert len(loaded.adapter.replicas) == REPLICAS
    listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert len(listed["adapter-010"].replicas) == REPLICAS
    admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="adapter-010"), timeout=60)
    listed = {a.adapter_id: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert not listed["adapter-010"].replicas
    with pytest.raises(grpc.RpcError) as caught:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter_id="no-such-adapter"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert convert.error_info(caught.value.trailing_metadata()).reason == "ADAPTER_NOT_FOUND"


def test_stats_sum_the_fleet_and_health_serves(cluster):
    channel, stub = cluster.channel, cluster.stub
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.total_pages == REPLICAS * info.total_pages
    assert stats.free_pages + stats.kv_pages + stats.cached_pages + stats.adapter_pages == (
        stats.total_pages
    )
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_stats_list_each_replica_and_sum_to_the_fleet(cluster):
    stub = cluster.stub
    for adapter in ("adapter-012", "adapter-013", "adapter-014"):
        stub.Complete(_request(adapter, PROMPTS[0], pb.CompleteRequest), timeout=60)
    stats = stub.GetStats(pb.GetStatsRequest())
    listed = stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    ids = [r.replica_id for r in stats.replicas]
    assert len(ids) == REPLICAS and len(set(ids)) == REPLICAS and all(ids)
    assert {r for a in listed for r in a.replicas} <= set(ids)  # the same replica ids
    for field in ("total_pages", "free_pages", "adapter_loads", "generated_tokens", "steps"):
        assert getattr(stats, field) == sum(getattr(r.stats, field) for r in stats.replicas)
    assert stats.adapter_loads >= 3  # each adapter placed on the device at least once
    for replica in stats.replicas:
        assert not replica.stats.replicas
        assert replica.stats.total_pages == stats.total_pages // REPLICAS
        own = replica.stats
        assert own.free_pages + own.kv_pages + own.cached_pages + own.adapter_pages == (
            own.total_pages
        )


# -- API keys -----------------------------------------------------------------------------------


def _method(name: str) -> str:
    return f"/{SERVICE.full_name}/{name}"


def _key(key: str) -> tuple:
    return (("x-api-key", key),)


BOTH = ApiKeys.of(USER_KEY, ADMIN_KEY)
USER_ONLY = ApiKeys.of(api_key=USER_KEY)
ADMIN_ONLY = ApiKeys.of(admin_api_key=ADMIN_KEY)
OK, UNAUTH, DENIED = None, "UNAUTHENTICATED", "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("keys", "rpc", "metadata", "expected"),
    [
        # both keys: the inference key opens inference, the admin key everything
        (BOTH, "Complete", _key(USER_KEY), OK),
        (BOTH, "Generate", (("authorization", f"Bearer {USER_KEY}"),), OK),
        (BOTH, "GetStats", (("authorization", f"bearer  {USER_KEY} "),), OK),
        (BOTH, "ListAdapters", _key(ADMIN_KEY), OK),
        (BOTH, "LoadAdapter", _key(ADMIN_KEY), OK),
        (BOTH, "UnloadAdapter", (("authorization", f"Bearer {ADMIN_KEY}"),), OK),
        (BOTH, "Complete", (), UNAUTH),
        (BOTH, "Complete", _key("wrong"), UNAUTH),
        (BOTH, "Tokenize", _key(USER_KEY + "x"), UNAUTH),
        (BOTH, "GetModelInfo", (("authorization", USER_KEY),), UNAUTH),  # no Bearer
        (BOTH, "Generate", (("authorization", "Bearer "),), UNAUTH),
        (BOTH, "LoadAdapter", _key(USER_KEY), DENIED),
        (BOTH, "UnloadAdapter", (("authorization", f"Bearer {USER_KEY}"),), DENIED),
        (BOTH, "LoadAdapter", (), UNAUTH),
        (BOTH, "LoadAdapter", _key("wrong"), UNAUTH),
        # x-api-key wins over authorization; bytes values compare too
        (BOTH, "Complete", (*_key("wrong"), ("authorization", f"Bearer {USER_KEY}")), UNAUTH),
        (BOTH, "Complete", (("x-api-key", USER_KEY.encode()),), OK),
        (BOTH, "Complete", (("x-api-key", b"\xff\xfe"),), UNAUTH),
        # health and reflection stay open
        (BOTH, "/grpc.health.v1.Health/Check", (), OK),
        (BOTH, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", (), OK),
        # no admin key: the admin RPCs are off for everyone
        (USER_ONLY, "Complete", _key(USER_KEY), OK),
        (USER_ONLY, "Complete", (), UNAUTH),
        (USER_ONLY, "LoadAdapter", _key(USER_KEY), DENIED),
        (USER_ONLY, "LoadAdapter", (), DENIED),
        (USER_ONLY, "UnloadAdapter", _key("wrong"), DENIED),
        # no inference key: inference open, admin RPCs need the admin key
        (ADMIN_ONLY, "Complete", (), OK),
        (ADMIN_ONLY, "Generate", _key("anything"), OK),
        (ADMIN_ONLY, "LoadAdapter", _key(ADMIN_KEY), OK),
        (ADMIN_ONLY, "LoadAdapter", (), UNAUTH),
        (ADMIN_ONLY, "UnloadAdapter", _key("anything"), UNAUTH),
    ],
)
def test_authorize_decides_as_lorapool_serve(keys, rpc, metadata, expected):
    method = rpc if rpc.startswith("/") else _method(rpc)
    refusal = authorize(method, metadata, keys)
    if expected is None:
        assert refusal is None
        return
    assert refusal is not None
    assert (refusal.code.name, refusal.reason) == (expected, expected)
    code, details, trailers = refusal.status()
    assert code == refusal.code and details == refusal.message
    assert convert.error_info(trailers).reason == expected
    assert "key" in refusal.message


def test_api_keys_are_checked_and_never_printed():
    with pytest.raises(ValueError):
        ApiKeys.of()
    with pytest.raises(ValueError):
        ApiKeys.of(USER_KEY, USER_KEY)
    assert USER_KEY not in repr(BOTH) and ADMIN_KEY not in repr(BOTH)
    assert ADMIN_METHODS == {_method("LoadAdapter"), _method("UnloadAdapter")}


class _ProxyContext:
    """What Serve's proxy builds a RayServegRPCContext from (grpc.aio's context)."""

    def __init__(self, metadata):
        self.metadata = metadata

    def auth_context(self):
        return {}

    def code(self):
        return None

    def details(self):
        return None

    def invocation_metadata(self):
        return self.metadata

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def trailing_metadata(self):
        return (("request_id", "r-1"),)


@pytest.mark.parametrize("metadata", [(), _key("wrong"), _key(USER_KEY)])
def test_ingress_refuses_every_lorapool_rpc_before_the_engine(metadata):
    """Every LoraPoolService RPC of the ingress checks the key first: a refusal is
    on Serve's gRPC context (code, details, ErrorInfo, Serve's request_id kept)
    and the engine (None here) is never called."""
    from ray.serve.grpc_util import RayServegRPCContext

    from lorapool.server.ray.deployments import LoraPoolIngress

    ingress = LoraPoolIngress(None, BOTH)
    refused = 0
    for method in SERVICE.methods:
        expected = authorize(_method(method.name), metadata, BOTH)
        if expected is None:
            continue  # the inference key on an inference RPC
        context = RayServegRPCContext(_ProxyContext(metadata))
        request = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        call = getattr(ingress, method.name)(getattr(pb, request.name)(), context)
        if method.server_streaming:
            replies = asyncio.run(_drain(call))
            assert replies == [pb.GenerateResponse()]  # one empty message carries the status
        else:
            asyncio.run(call)
        assert context.code() == expected.code, method.name
        assert context.details() == expected.message
        trailers = context.trailing_metadata()
        assert trailers[0] == ("request_id", "r-1")
        assert convert.error_info(trailers).reason == expected.reason
        refused += 1
    assert refused == (len(ADMIN_METHODS) if metadata == _key(USER_KEY) else len(SERVICE.methods))


async def _drain(stream) -> list:
    return [reply async for reply in stream]


def test_keys_are_enforced_end_to_end(cluster):
    """Through Serve's proxy: no key, a wrong key and the inference key on an admin
    RPC are refused with the status and ErrorInfo of `lorapool serve`; health is
    open; the admin key opens the admin RPCs (test_admin_calls_reach_every_replica)."""
    bare = pb_grpc.LoraPoolServiceStub(cluster.channel)
    unauth = (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    complete = _request("adapter-001", PROMPTS[0], pb.CompleteRequest)
    assert _error(lambda: bare.Complete(complete, timeout=30)) == unauth
    assert _error(lambda: bare.Complete(complete, metadata=_key("wrong"), timeout=30)) == unauth
    assert _error(lambda: bare.Generate(_request("adapter-001", PROMPTS[0]), timeout=30)) == unauth
    assert _error(lambda: bare.GetStats(pb.GetStatsRequest(), timeout=30)) == unauth
    load = pb.LoadAdapterRequest(adapter_id="adapter-011")
    assert _error(lambda: cluster.stub.LoadAdapter(load, timeout=30)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    listed = {a.adapter_id: a for a in cluster.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert not listed["adapter-011"].replicas  # the refused load did nothing
    bearer = (("authorization", f"Bearer {USER_KEY}"),)
    assert bare.Complete(complete, metadata=bearer, timeout=60).token_ids
    health = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_serve_ray_reads_keys_as_serve_does(tmp_path):
    """The key options fail start-up the way `lorapool serve`'s do, before Ray starts."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--admin-api-key-file", str(tmp_path / "missing")], "cannot read --admin-api-key-file"),
        (["--api-key-file", str(empty)], "--api-key-file " + str(empty) + " is empty"),
        (["--api-key", "a", "--api-key-file", str(empty)], "not both"),
        (["--api-key", "same", "--admin-api-key", "same"], "must differ"),
    ]
    for flags, message in cases:
        done = subprocess.run(
            [LORAPOOL, "serve-ray", "--model", str(tmp_path), *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr, done.stderr


# -- the request router's ranking, without starting Ray ---------------------------------------


class _Id(NamedTuple):
    unique_id: str


class _Replica(NamedTuple):
    replica_id: _Id


class _Metadata(NamedTuple):
    internal_request_id: str
    multiplexed_model_id: str


class _Pending(NamedTuple):
    metadata: _Metadata


def _router(bound=1.25, floor=2, holders=None):
    """A ReplicaRouter with only the state its ranking reads (Serve's table of
    holders as ReplicaIDs by adapter)."""
    from lorapool.server.ray.router import ReplicaRouter

    router = object.__new__(ReplicaRouter)
    router._bound, router._floor = bound, floor
    router._multiplexed_model_id_to_replica_ids = {
        adapter: {_Id(r) for r in replicas} for adapter, replicas in (holders or {}).items()
    }
    return router


def _route(router, adapter, replicas, request_id):
    """Route like Serve: the first replica of the first rank, then report it routed."""
    candidates = [_Replica(_Id(r)) for r in replicas]
    chosen = router.rank(adapter, candidates)[0][0]
    router.on_request_routed(_Pending(_Metadata(request_id, adapter)), chosen.replica_id, None)
    return chosen.replica_id.unique_id


def test_load_cap_is_bounded_by_the_fleet_mean_with_a_floor():
    from lorapool.server.ray.router import load_cap

    assert load_cap(total=0, replicas=4, bound=1.25, floor=1) == 1
    assert load_cap(total=39, replicas=4, bound=1.25, floor=1) == 13  # 1.25 x 40 / 4 = 12.5
    assert load_cap(total=3, replicas=4, bound=1.25, floor=8) == 8


def test_router_keeps_an_adapter_on_its_holder_until_the_cap_then_spreads(monkeypatch):
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "on_request_routed", lambda *a: None)
    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "on_request_completed", lambda *a: None)
    replicas = ["a", "b", "c", "d"]
    router = _router(floor=2, holders={"hot": ["c"]})
    # a holder Serve knows takes the adapter's requests while within the cap
    assert [_route(router, "hot", replicas, f"h{i}") for i in range(2)] == ["c", "c"]
    # c has 2 in flight, the fleet 2: the cap is max(ceil(1.25 x 3 / 4), 2) = 2 -> spread
    spread = _route(router, "hot", replicas, "h2")
    assert spread != "c"
    # the new holder is remembered before Serve's table knows it, and preferred
    assert _route(router, "hot", replicas, "h3") == spread  # cap 2: spread has 1, c has 2
    # a new adapter goes to the least-loaded replica, then sticks there
    first = _route(router, "new", replicas, "n0")
    assert router._inflight[first] == 1 and first not in {"c", spread}
    assert _route(router, "new", replicas, "n1") == first
    # completions free the count: the original holder takes requests again
    for i in range(2):
        router.on_request_completed(_Id("c"), f"h{i}")
    assert router._inflight["c"] == 0
    assert _route(router, "hot", replicas, "h4") == "c"


def test_router_forgets_unconfirmed_holders_after_the_sticky_period(monkeypatch):
    """A replica the router sent an adapter to counts as its holder for STICKY_S
    only; after that, only Serve's table (which follows the engines) says so."""
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    from lorapool.server.ray import router as module

    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "on_request_routed", lambda *a: None)
    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    replicas = ["a", "b", "c", "d"]
    router = _router(floor=8)
    first = _route(router, "x", replicas, "x0")
    router._inflight = dict.fromkeys(replicas, 0)  # as if it completed

    def holders():
        return [r.replica_id.unique_id for r in router.rank("x", candidates)[0]]

    candidates = [_Replica(_Id(r)) for r in replicas]
    now[0] += module.STICKY_S - 1
    assert holders() == [first]  # still counted as the holder
    now[0] += 2
    ranks = router.rank("x", candidates)
    assert len(ranks[0]) == 2  # no holder any more: two of the least loaded


# -- --host, --address and the signal path, without starting Ray --------------------------------


class _Server:
    """What Serve's add_grpc_address is given: records the addresses added."""

    def __init__(self):
        self.addresses = []

    def add_insecure_port(self, address):
        self.addresses.append(address)


@pytest.mark.parametrize(
    ("host", "bound"),
    [("127.0.0.1", "127.0.0.1:9"), ("::1", "[::1]:9"), ("0.0.0.0", "[::]:9"), ("", "[::]:9")],
)
def test_grpc_host_hook_rebinds_serves_proxy(monkeypatch, host, bound):
    """The worker hook that `--host` installs makes Serve's own start_grpc_server
    bind the given address (Serve binds [::] otherwise)."""
    from ray.serve._private import default_impl

    from lorapool.server.ray.proxy import HOST_ENV, bind_grpc_host

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)
    monkeypatch.setenv(HOST_ENV, host)
    bind_grpc_host()
    server = _Server()
    default_impl.add_grpc_address(server, "[::]:9")
    assert server.addresses == [bound]


def test_serve_ray_flags_reach_deploy_and_sigterm_drains(tiny_demo, monkeypatch):
    """--address, --host, --routing, --grace and the replica options reach deploy;
    SIGTERM drains for --grace, then shuts down (mocked cluster functions)."""
    import os
    import signal
    import threading

    from lorapool.client.cli import command_parser
    from lorapool.server.ray import cli, cluster

    calls = []

    def deploy(engine, **kwargs):
        calls.append(("deploy", kwargs))
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()

    monkeypatch.setattr(cluster, "deploy", deploy)
    monkeypatch.setattr(cluster, "drain", lambda grace: calls.append(("drain", grace)) or 0)
    monkeypatch.setattr(cluster, "shutdown", lambda: calls.append(("shutdown", None)))
    flags = [
        *("--model", str(tiny_demo.model_dir), "--adapters", str(tiny_demo.adapters_dir)),
        *("--replicas", "3", "--replica-cpus", "2", "--replica-gpus", "0.5"),
        *("--port", str(free_port())),
        *("--address", "ray://head:10001", "--host", "127.0.0.1", "--routing", "random"),
        *("--grace", "7", "--load-bound", "1.5", "--load-floor", "4"),
        *("--metrics-port", str(free_port()), "--metrics-host", "127.0.0.1"),
    ]
    args = command_parser("serve-ray", cli).parse_args(flags)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.run(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    (_, kwargs), drained, shut = calls
    assert kwargs["address"] == "ray://head:10001" and kwargs["host"] == "127.0.0.1"
    assert (kwargs["replicas"], kwargs["replica_cpus"], kwargs["routing"]) == (3, 2.0, "random")
    assert (kwargs["load_bound"], kwargs["load_floor"]) == (1.5, 4)
    assert kwargs["replica_gpus"] == 0.5
    assert kwargs["metrics_port"] == int(flags[flags.index("--metrics-port") + 1])
    assert kwargs["metrics_host"] == "127.0.0.1"
    assert drained == ("drain", 7.0) and shut == ("shutdown", None)


# -- drain: must stay the module's last test (the shared cluster refuses work after it) --------


def test_drain_finishes_streams_and_health_says_not_serving(cluster):
    """What SIGTERM does: Health/Watch and Check turn NOT_SERVING, new requests get
    UNAVAILABLE / DRAINING, and a stream under way finishes whole within the grace
    period."""
    import threading

    from lorapool.server.ray.cluster import drain

    health = health_pb2_grpc.HealthStub(cluster.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    params = pb.SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    stream = cluster.stub.Generate(
        pb.GenerateRequest(adapter_id="adapter-015", prompt=PROMPTS[0], params=params), timeout=120
    )
    received = [next(stream)]
    left = []
    draining = threading.Thread(target=lambda: left.append(drain(30.0)))
    draining.start()
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        refused = _request("adapter-015", PROMPTS[1], pb.CompleteRequest)
        assert _error(lambda: cluster.stub.Complete(refused, timeout=30)) == (
            grpc.StatusCode.UNAVAILABLE,
            "DRAINING",
        )
        received += list(stream)
    finally:
        watch.cancel()
        draining.join(timeout=60)
    assert sum(len(m.token_ids) for m in received) == params.max_new_tokens
    assert received[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert left == [0]
