"""What an integrating team expects of the Python clients: typed sampling options,
request ids on the stream, finish reasons by name in JSON, errors with their field
violations, mutual TLS, and retries on UNAVAILABLE for the idempotent calls only.

Most tests run against a real server on the tiny demo; the retry tests use a small
in-process gRPC server of their own. Servers that require a client certificate
(`lorapool serve --tls-client-ca`) are tested in tests/test_tls.py.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import write_pki

from lorapool.client import (
    AsyncLoraPoolClient,
    LoraPoolClient,
    LoraPoolClientError,
    SamplingParams,
    cli,
)
from lorapool.client.channel import NEVER_RETRIED, SERVICE, service_config
from lorapool.client.client import generation_request
from lorapool.client.commands import to_jsonable
from lorapool.convert import Completion, event_from_proto, event_to_proto
from lorapool.types import FinishReason, TokenEvent, Usage
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(start_server):
    """A real plaintext server on the tiny demo."""
    return start_server(engine={"max_new_tokens_limit": 64})


@pytest.fixture(scope="module")
def tls_server(start_server, pki):
    """The same on TLS: it presents a certificate from the test CA and, without
    tls_client_ca, does not ask for a client certificate, so clients with and
    without one are served."""
    return start_server(
        engine={"max_new_tokens_limit": 64},
        tls_cert=str(pki["server"]),
        tls_key=str(pki["server_key"]),
    )


# -- sampling options ------------------------------------------------------------------------


def test_sampling_params_object_is_sent_whole_and_keywords_only_as_given():
    params = SamplingParams(max_new_tokens=5, temperature=0.0, seed=0, stop=["\n"])
    msg = generation_request(pb.GenerateRequest, "hi", None, "", "", 0, {}, params)
    wire = msg.params
    assert wire.max_new_tokens == 5 and list(wire.stop) == ["\n"]
    # every field goes, defaults included, so the server's defaults never apply
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        assert wire.HasField(name), name
    assert wire.seed == 0 and wire.top_p == 1.0

    # keywords override the object's fields; None leaves the object's value
    msg = generation_request(
        pb.CompleteRequest, "hi", None, "", "", 0, {"seed": 7, "top_k": None}, params
    )
    assert msg.params.seed == 7 and msg.params.max_new_tokens == 5

    # keywords alone: only those given are sent (the old behaviour, unchanged)
    msg = generation_request(pb.GenerateRequest, "hi", None, "", "", 0, {"max_new_tokens": 3})
    assert msg.params.max_new_tokens == 3
    assert not msg.params.HasField("temperature") and not msg.params.HasField("seed")

    with pytest.raises(TypeError):
        generation_request(pb.GenerateRequest, "hi", None, "", "", 0, {}, {"seed": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        generation_request(pb.GenerateRequest, "hi", None, "", "", 0, {"temprature": 1.0}, params)


def test_generate_and_complete_take_sampling_params(server):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with LoraPoolClient(server.target, timeout=60) as client:
        events = list(client.generate("river stone light", sampling=params))
        assert sum(len(e.token_ids) for e in events) == 6
        assert events[-1].finish_reason == FinishReason.LENGTH
        old = list(client.generate("river stone light", max_new_tokens=6, ignore_eos=True))
        assert [e.token_ids for e in old] == [e.token_ids for e in events]  # greedy: the same

        done = client.complete("river stone light", sampling=params, max_new_tokens=4)
        assert len(done.token_ids) == 4 and done.finish_reason == FinishReason.LENGTH
        assert done.token_ids == [t for e in events for t in e.token_ids][:4]


async def test_async_client_takes_sampling_params(server):
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    async with AsyncLoraPoolClient(server.target, timeout=60) as client:
        events = [e async for e in client.generate("a b", sampling=params, request_id="as-1")]
        assert events[-1].request_id == "as-1" and events[-1].usage.completion_tokens == 3
        done = await client.complete("a b", sampling=params)
        assert done.usage.completion_tokens == 3 and done.request_id


# -- request ids -----------------------------------------------------------------------------


def test_token_event_request_id_from_the_wire():
    last = TokenEvent([], "", [], FinishReason.EOS, Usage(1, 1))
    back = event_from_proto(event_to_proto(last, "rid-9"))
    assert back.request_id == "rid-9" and back == last  # request_id takes no part in ==
    assert event_from_proto(event_to_proto(TokenEvent([1], "x"), "rid-9")).request_id == ""


def test_stream_and_completion_carry_the_request_id(server):
    with LoraPoolClient(server.target, timeout=60) as client:
        events = list(client.generate("river", max_new_tokens=2, request_id="req-42"))
        assert events[-1].request_id == "req-42"
        assert all(e.request_id == "" for e in events[:-1])
        picked = list(client.generate("river", max_new_tokens=2))[-1].request_id
        assert picked  # the server's own id when the caller sent none
        assert client.complete("river", max_new_tokens=2, request_id="c-1").request_id == "c-1"
        assert client.complete("river", max_new_tokens=2).request_id


# -- finish reasons by name ------------------------------------------------------------------


def test_to_jsonable_writes_finish_reasons_by_name():
    done = Completion("x", [1], FinishReason.LENGTH, Usage(1, 1), request_id="r")
    out = json.loads(json.dumps(to_jsonable(done)))
    assert out["finish_reason"] == "LENGTH" and out["request_id"] == "r"
    event = TokenEvent([], "", [], FinishReason.STOP, Usage(), request_id="r")
    assert json.loads(json.dumps(to_jsonable(event)))["finish_reason"] == "STOP"
    assert FinishReason.LENGTH == 1  # still an IntEnum


def test_cli_json_names_finish_reasons(server, capsys):
    base = ["--target", server.target, "river stone", "--max-new-tokens", "3", "--ignore-eos"]
    assert cli.main(["complete", *base, "--json", "--request-id", "cli-1"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["finish_reason"] == "LENGTH" and done["request_id"] == "cli-1"
    assert cli.main(["generate", *base, "--json", "--request-id", "cli-2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["finish_reason"] == "LENGTH" and lines[-1]["request_id"] == "cli-2"
    assert {line["finish_reason"] for line in lines[:-1]} == {"NONE"}


# -- errors ----------------------------------------------------------------------------------


def test_errors_carry_reason_metadata_and_field_violations(server):
    with LoraPoolClient(server.target, timeout=60) as client:
        with pytest.raises(LoraPoolClientError) as caught:
            client.complete("river", sampling=SamplingParams(max_new_tokens=2, temperature=-1.0))
        err = caught.value
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_REQUEST"
        assert err.metadata["field"] == "params.temperature"
        ((field, description),) = err.field_violations
        assert field == "params.temperature" and "temperature" in description

        with pytest.raises(LoraPoolClientError) as caught:
            client.complete("river", adapter_id="no-such-adapter", max_new_tokens=1)
        assert caught.value.reason == "ADAPTER_NOT_FOUND" and caught.value.field_violations == []
        assert caught.value.metadata["adapter_id"] == "no-such-adapter"

    # documented as not a grpc.RpcError: `code` stays an attribute
    assert not isinstance(err, grpc.RpcError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.details, again.reason) == (err.code, err.details, err.reason)
    assert again.field_violations == err.field_violations and str(again) == str(err)


# -- TLS -------------------------------------------------------------------------------------


def test_tls_with_a_client_certificate_from_paths_or_bytes(tls_server, pki):
    target = tls_server.target
    with LoraPoolClient(
        target,
        root_certificates=pki["ca"],
        tls_cert=str(pki["client"]),
        tls_key=pki["client_key"],
        timeout=60,
    ) as client:
        assert client.health() == "SERVING"
        assert client.complete("river", max_new_tokens=2).usage.completion_tokens == 2
    with LoraPoolClient(target, root_certificates=pki["ca"].read_bytes(), timeout=60) as client:
        assert client.stats().total_pages > 0  # the server does not require a client cert
    with LoraPoolClient(target, timeout=5, retries=0) as plain:
        with pytest.raises(LoraPoolClientError) as err:
            plain.stats()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError):
        LoraPoolClient(target, tls_cert=pki["client"])  # a certificate without its key


def test_cli_tls_flags(tls_server, pki, capsys):
    argv = [
        "complete", "--target", tls_server.target, "--tls-ca", str(pki["ca"]),
        "--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"]),
        "river", "--max-new-tokens", "2", "--ignore-eos", "--json",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "LENGTH"
    assert cli.main(argv[:6] + argv[8:]) == 2  # --tls-cert without --tls-key
    assert "--tls-cert and --tls-key" in capsys.readouterr().err


# -- retries ---------------------------------------------------------------------------------


def test_service_config_retries_the_idempotent_calls_with_backoff():
    with LoraPoolClient("127.0.0.1:1", retries=3) as client:
        config = json.loads(dict(client.options)["grpc.service_config"])
        assert dict(client.options)["grpc.enable_retries"] == 1
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    for method in ("ListAdapters", "GetStats", "GetModelInfo", "Tokenize"):
        assert (SERVICE, method) in names
    assert ("grpc.health.v1.Health", "Check") in names
    assert not names & {(SERVICE, m) for m in ("Complete", "LoadAdapter", "UnloadAdapter")}
    assert set(NEVER_RETRIED) == {"Complete", "LoadAdapter", "UnloadAdapter"}
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] == 4
    assert policy["backoffMultiplier"] > 1 and policy["initialBackoff"] < policy["maxBackoff"]
    assert json.loads(service_config(0)) == {"methodConfig": []}


class StartingUp(pb_grpc.LoraPoolServiceServicer, health_pb2_grpc.HealthServicer):
    """Every call is refused with UNAVAILABLE `failures` times, as a server that is
    still starting refuses them; then it answers. Counts the attempts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: Counter[str] = Counter()

    def _attempt(self, method: str, context) -> None:
        self.attempts[method] += 1
        if self.attempts[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "loading")

    def Check(self, request, context):
        self._attempt("Check", context)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def ListAdapters(self, request, context):
        self._attempt("ListAdapters", context)
        return pb.ListAdaptersResponse()

    def GetStats(self, request, context):
        self._attempt("GetStats", context)
        return pb.GetStatsResponse(total_pages=7)

    def GetModelInfo(self, request, context):
        self._attempt("GetModelInfo", context)
        return pb.GetModelInfoResponse(model_name="m")

    def Tokenize(self, request, context):
        self._attempt("Tokenize", context)
        return pb.TokenizeResponse(token_ids=[1])

    def Complete(self, request, context):
        self._attempt("Complete", context)
        return pb.CompleteResponse(text="x")

    def LoadAdapter(self, request, context):
        self._attempt("LoadAdapter", context)
        return pb.LoadAdapterResponse()

    def UnloadAdapter(self, request, context):
        self._attempt("UnloadAdapter", context)
        return pb.UnloadAdapterResponse()


@pytest.fixture
def starting_up():
    service = StartingUp(failures=2)
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_LoraPoolServiceServicer_to_server(service, srv)
    health_pb2_grpc.add_HealthServicer_to_server(service, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield service, f"127.0.0.1:{port}"
    srv.stop(None)


def test_idempotent_calls_retry_unavailable_and_the_others_do_not(starting_up):
    service, target = starting_up
    with LoraPoolClient(target, timeout=10) as client:  # default retries=3: 4 attempts
        assert client.health() == "SERVING"
        assert client.list_adapters() == []
        assert client.stats().total_pages == 7
        assert client.model_info().model_name == "m"
        assert client.tokenize("x").token_ids == [1]
        for method in ("Check", "ListAdapters", "GetStats", "GetModelInfo", "Tokenize"):
            assert service.attempts[method] == 3, method  # two refusals, then served
        for call in (
            lambda: client.complete("x", max_new_tokens=1),
            lambda: client.load_adapter("a", "/a"),
            lambda: client.unload_adapter("a"),
        ):
            with pytest.raises(LoraPoolClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        for method in NEVER_RETRIED:
            assert service.attempts[method] == 1, method

    service.attempts.clear()
    with LoraPoolClient(target, timeout=10, retries=0) as plain:
        with pytest.raises(LoraPoolClientError):
            plain.stats()
    assert service.attempts["GetStats"] == 1


async def test_async_client_retries_too(starting_up):
    service, target = starting_up
    async with AsyncLoraPoolClient(target, timeout=10) as client:
        assert (await client.stats()).total_pages == 7
        with pytest.raises(LoraPoolClientError):
            await client.complete("x")
    assert (service.attempts["GetStats"], service.attempts["Complete"]) == (3, 1)
