"""The gRPC front end and start-up against hostile or broken input: the admin role
and the LoadAdapter source allow-list, request bytes that do not decode, a busy
port, broken checkpoint folders and a checkpoint without a tokenizer. Each case runs
for real (a LoraPoolServer on a loopback port, or `lorapool serve` in a subprocess)
and checks that the server stays up and answers."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorapool.convert import error_info
from lorapool.server.service import SourcePolicy
from lorapool.server.transport.decode import ThrottledLog
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

LORAPOOL = str(Path(sys.executable).with_name("lorapool"))
SERVICE = "lorapool.v1.LoraPoolService"
USER_KEY = "user-key-for-tests"
ADMIN_KEY = "admin-key-for-tests"
PARAMS = pb.SamplingParams(max_new_tokens=4, ignore_eos=True)
GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"\x12\x05\xff", b"\x80" * 12]


def md(key: str | None) -> tuple:
    return (("x-api-key", key),) if key else ()


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a unary call, or the iteration of a streaming call, raises."""
    with pytest.raises(grpc.RpcError) as exc:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return exc.value


def status_and_reason(err: grpc.RpcError) -> tuple[str, str]:
    return err.code().name, error_info(err.trailing_metadata()).reason


def health_status(channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def answers(stub, key: str | None = None, **request) -> list[int]:
    """A short completion: the server is up and serving."""
    if "prompt" not in request:
        request.setdefault("input_ids", pb.TokenIds(ids=[5, 6, 7, 8]))
    reply = stub.Complete(
        pb.CompleteRequest(params=PARAMS, **request), metadata=md(key), timeout=30
    )
    assert len(reply.token_ids) == 4
    return list(reply.token_ids)


def reflection_lists_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    return [s.name for s in reply.list_services_response.service]


# -- admin role --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(start_server):
    """Both keys configured."""
    return start_server(api_key=USER_KEY, admin_api_key=ADMIN_KEY)


def test_inference_key_cannot_load_or_unload_the_admin_key_can(keyed, tiny_demo):
    load = pb.LoadAdapterRequest(adapter_id="adapter-000", source=str(tiny_demo.adapter_dirs[1]))
    unload = pb.UnloadAdapterRequest(adapter_id="adapter-000")
    with grpc.insecure_channel(keyed.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        before = answers(stub, USER_KEY, adapter_id="adapter-000")
        for fn, request in [(stub.LoadAdapter, load), (stub.UnloadAdapter, unload)]:
            err = rpc_error(fn, request, metadata=md(USER_KEY), timeout=10)
            assert status_and_reason(err) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
            assert "admin API key" in err.details()
            for metadata in [(), md("wrong"), (("authorization", "Bearer nope"),)]:
                err = rpc_error(fn, request, metadata=metadata, timeout=10)
                assert status_and_reason(err) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        # nothing was replaced: adapter-000 still serves its own weights
        assert answers(stub, USER_KEY, adapter_id="adapter-000") == before
        # no key at all: inference refused with ErrorInfo, health and reflection open
        for fn, request in [
            (stub.Complete, pb.CompleteRequest(input_ids=pb.TokenIds(ids=[5]), params=PARAMS)),
            (stub.Generate, pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5]), params=PARAMS)),
            (stub.GetStats, pb.GetStatsRequest()),
        ]:
            err = rpc_error(fn, request, metadata=md("wrong"), timeout=10)
            assert status_and_reason(err) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        assert health_status(ch) == "SERVING"
        assert SERVICE in reflection_lists_services(ch)
        # the admin key grants everything, also as a bearer token
        bearer = (("authorization", f"Bearer {ADMIN_KEY}"),)
        info = stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id="adapter-004", pin=True), metadata=bearer, timeout=30
        )
        assert info.adapter.pinned
        answers(stub, ADMIN_KEY, adapter_id="adapter-004")
        stub.UnloadAdapter(
            pb.UnloadAdapterRequest(adapter_id="adapter-004"), metadata=md(ADMIN_KEY), timeout=10
        )
        answers(stub, USER_KEY)


def test_without_an_admin_key_admin_rpcs_are_refused_to_everyone(start_server):
    srv = start_server(api_key=USER_KEY)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        for key in (USER_KEY, None, "wrong"):
            err = rpc_error(
                stub.LoadAdapter,
                pb.LoadAdapterRequest(adapter_id="adapter-001"),
                metadata=md(key),
                timeout=10,
            )
            assert status_and_reason(err) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
            assert "no admin key" in err.details() and "--admin-api-key" in err.details()
        answers(stub, USER_KEY)


def test_with_only_an_admin_key_inference_stays_open(start_server):
    srv = start_server(admin_api_key=ADMIN_KEY)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        answers(stub)
        err = rpc_error(
            stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id="adapter-001"), timeout=10
        )
        assert status_and_reason(err) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id="adapter-001"), metadata=md(ADMIN_KEY), timeout=30
        )


# -- LoadAdapter source allow-list -------------------------------------------------------------


@pytest.fixture(scope="module")
def outside(tmp_path_factory, tiny_demo) -> Path:
    """A folder outside the adapter roots holding a valid copy of adapter-001."""
    root = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_demo.adapter_dirs[1], root / "copy")
    return root


def test_sources_outside_the_allow_list_are_refused_before_reading(
    start_server, tiny_demo, outside
):
    srv = start_server()  # no keys: the allow-list still holds
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        before = answers(stub, adapter_id="adapter-000")
        refused = [
            str(outside / "copy"),  # a valid adapter, outside the roots
            str(outside / "nowhere"),  # NOT_FOUND if it were read
            f"file://{outside / 'copy'}",
            f"{tiny_demo.adapters_dir}/../{outside.name}/copy",
            "../../../../../../etc",
            "~/adapters/x",
            "s3://bucket/adapter",
            "hf://org/../../etc",
        ]
        for source in refused:
            err = rpc_error(
                stub.LoadAdapter,
                pb.LoadAdapterRequest(adapter_id="adapter-000", source=source),
                timeout=10,
            )
            assert status_and_reason(err) == ("PERMISSION_DENIED", "SOURCE_NOT_ALLOWED"), source
            assert "--adapter-source-allow" in err.details()
            for server_path in (str(tiny_demo.adapters_dir), str(Path.cwd()), str(Path.home())):
                if server_path not in source:
                    assert server_path not in err.details(), (source, err.details())
        # adapter-000 was not replaced; a source under the root still loads
        assert answers(stub, adapter_id="adapter-000") == before
        stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id="alias-2", source=str(tiny_demo.adapter_dirs[2])),
            timeout=30,
        )
        answers(stub, adapter_id="alias-2")


def test_explicit_allow_rules_replace_the_default(start_server, tiny_demo, outside):
    srv = start_server(adapter_source_allow=[str(outside), "hf://trusted-org/"])
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LoraPoolServiceStub(ch)
        stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id="from-outside", source=str(outside / "copy")),
            timeout=30,
        )
        answers(stub, adapter_id="from-outside")
        for source in [
            str(tiny_demo.adapter_dirs[3]),  # the roots are no longer in the list
            "hf://other-org/repo",
            "hf://trusted-org-evil/repo",
            "hf://trusted-org/../x/y",
        ]:
            err = rpc_error(
                stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="x", source=source), timeout=10
            )
            assert status_and_reason(err) == ("PERMISSION_DENIED", "SOURCE_NOT_ALLOWED"), source
            assert str(outside) not in err.details()
        # allowed by the rule, then asked of the hub (offline here): not a permission error
        err = rpc_error(
            stub.LoadAdapter,
            pb.LoadAdapterRequest(adapter_id="y", source="hf://trusted-org/a/b"),
            timeout=30,
        )
        assert err.code() != grpc.StatusCode.PERMISSION_DENIED
        answers(stub)


def test_source_policy_rules():
    policy = SourcePolicy(["/srv/adapters", "hf://org/", "hf://x/repo"])
    assert policy.allows("/srv/adapters/a") and policy.allows("file:///srv/adapters/a/")
    assert not policy.allows("/srv/adapters-2/a") and not policy.allows("/srv/adapters/../a")
    assert policy.allows("hf://org/r") and policy.allows("hf://x/repo@v2")
    assert not policy.allows("hf://x/repo2") and not policy.allows("hf://orgy/r")
    assert policy.describe() == "hf://org/, hf://x/repo, 1 local directory"
    assert not SourcePolicy([]).allows("/srv/adapters/a")
    assert SourcePolicy(["file://"]).allows("/anywhere")
    with pytest.raises(ValueError):
        SourcePolicy(["hf://org/../x"])


# -- undecodable request bytes -----------------------------------------------------------------


def test_undecodable_bytes_are_invalid_argument_with_one_log_line(start_server, caplog):
    srv = start_server()
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(srv.target) as ch:
        complete = ch.unary_unary(f"/{SERVICE}/Complete")  # raw bytes in, raw bytes out
        generate = ch.unary_stream(f"/{SERVICE}/Generate")
        reflect = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        for _ in range(10):
            for garbage in GARBAGE:
                for fn, arg in [(complete, garbage), (generate, garbage)]:
                    err = rpc_error(fn, arg, timeout=10)
                    assert status_and_reason(err) == ("INVALID_ARGUMENT", "UNDECODABLE_REQUEST")
                    assert "not a valid lorapool.v1." in err.details()
        err = rpc_error(reflect, iter([GARBAGE[0]]), timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert answers(pb_grpc.LoraPoolServiceStub(ch))
        assert health_status(ch) == "SERVING"
    lines = [r for r in caplog.records if "undecodable request" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]  # 81 calls, rate-limited
    assert all("\n" not in r.getMessage() and not r.exc_info for r in lines)
    assert not [r for r in caplog.records if r.exc_info or "Unexpected" in r.getMessage()]


def test_undecodable_bytes_without_a_key_are_unauthenticated(keyed):
    with grpc.insecure_channel(keyed.target) as ch:
        complete = ch.unary_unary(f"/{SERVICE}/Complete")
        err = rpc_error(complete, GARBAGE[0], timeout=10)
        assert status_and_reason(err) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
        err = rpc_error(complete, GARBAGE[0], metadata=md(USER_KEY), timeout=10)
        assert status_and_reason(err) == ("INVALID_ARGUMENT", "UNDECODABLE_REQUEST")


def test_throttled_log_counts_what_it_drops(caplog):
    now = [0.0]
    throttled = ThrottledLog(10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="lorapool.server")
    assert throttled.warning("bad %d", 1)
    for _ in range(5):
        now[0] += 1
        assert not throttled.warning("bad %d", 2)
    now[0] = 10.0
    assert throttled.warning("bad %d", 3)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad 1", "bad 3 (5 more in the last 10s not logged)"]


# -- `lorapool serve` start-up -----------------------------------------------------------------


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`lorapool serve` expected to fail at start-up."""
    return serve_all([args], timeout)[0]


def serve_all(arg_lists: list, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several `lorapool serve` expected to fail at start-up, run side by side."""
    procs = []
    for args in arg_lists:
        cmd = [LORAPOOL, "serve", "--port", "0", "--metrics-port", "0", *args]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a failed start-up prints; exit status 2, no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("lorapool serve: "), result.stderr
    assert not result.stdout
    return lines[0]


def test_a_second_server_on_a_busy_port_fails_fast(start_server, tiny_demo):
    first = start_server()
    line = one_line(
        serve(
            "--model",
            str(tiny_demo.model_dir),
            "--port",
            str(first.port),
            "--log-level",
            "WARNING",
        )  # fmt: skip
    )
    assert f"port {first.port} is in use" in line and "--port" in line
    with grpc.insecure_channel(first.target) as ch:
        answers(pb_grpc.LoraPoolServiceStub(ch))  # the first one still serves


def test_a_busy_metrics_port_fails_fast_and_leaves_nothing_running(tiny_demo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics_port = busy.getsockname()[1]
        grpc_port = free_port()
        result = serve(
            "--model", str(tiny_demo.model_dir), "--port", str(grpc_port),
            "--metrics-port", str(metrics_port),
        )  # fmt: skip
    line = one_line(result)  # at the default INFO level too: it fails before logging
    assert f"port {metrics_port} is in use" in line and "--metrics-port" in line
    assert "Event loop is closed" not in result.stderr
    with socket.socket() as again:  # the gRPC port was released with the process
        again.bind(("127.0.0.1", grpc_port))


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory, tiny_demo) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint folder, words the one-line error must hold)."""
    root = tmp_path_factory.mktemp("broken-checkpoints")
    model = tiny_demo.model_dir

    def copy(name: str, skip: tuple[str, ...] = ()) -> Path:
        dst = root / name
        shutil.copytree(model, dst, ignore=lambda _d, names: [n for n in names if n in skip])
        return dst

    corrupt = copy("corrupt-config")
    (corrupt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    truncated = copy("truncated-weights")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:64])
    gpt2 = copy("unsupported-arch")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    return {
        "missing": (root / "no-such-folder", "does not exist"),
        "no-weights": (copy("no-weights", skip=("model.safetensors",)), "has no weights"),
        "no-config": (copy("no-config", skip=("config.json",)), "has no config.json"),
        "corrupt-config": (corrupt, "is not valid JSON"),
        "truncated-weights": (truncated, "not a readable safetensors file"),
        "unsupported-arch": (gpt2, "GPT2LMHeadModel"),
    }


def test_a_broken_checkpoint_is_one_line_and_exit_2(broken_checkpoints):
    cases = [broken_checkpoints[name] for name in ("missing", "no-weights", "corrupt-config")]
    results = serve_all([("--model", str(path), "--log-level", "WARNING") for path, _ in cases])
    for (path, words), result in zip(cases, results, strict=True):
        line = one_line(result)
        assert words in line and str(path) in line, line


def test_check_model_dir_names_each_problem(broken_checkpoints, tiny_demo):
    from lorapool.server.model.checkpoint import CheckpointError, check_model_dir, load_spec

    assert check_model_dir(tiny_demo.model_dir) == [tiny_demo.model_dir / "model.safetensors"]
    for path, words in broken_checkpoints.values():
        for check in (check_model_dir, load_spec):  # load_spec checks first
            with pytest.raises(CheckpointError) as exc:
                check(path)
            assert words in str(exc.value) and "\n" not in str(exc.value)
            assert exc.value.status == "FAILED_PRECONDITION"


def test_bad_key_files_and_rules_are_one_line(tiny_demo, tmp_path):
    import argparse

    from lorapool.server.transport import cli

    model = ("--model", str(tiny_demo.model_dir), "--log-level", "WARNING")
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    key = tmp_path / "key"
    key.write_text(USER_KEY)
    cases = [
        (("--api-key-file", str(tmp_path / "missing")), "cannot read --api-key-file"),
        (("--admin-api-key-file", str(empty)), "is empty"),
        (("--api-key-file", str(key), "--admin-api-key-file", str(key)), "must differ"),
        (("--api-key", "k", "--api-key-file", str(key)), "not both"),
        (("--adapter-source-allow", "hf://org/../x"), "--adapter-source-allow"),
        (("--tokenizer", str(tmp_path)), "--tokenizer"),
    ]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, "serve")
    for args, words in cases:
        with pytest.raises(cli.StartupError, match=re.escape(words)):
            cli.config_from_args(parser.parse_args([*model, *args]))
    config = cli.config_from_args(parser.parse_args([*model, "--api-key-file", str(key)]))
    assert config.api_key == USER_KEY and config.admin_api_key is None
    none = parser.parse_args([*model, "--adapter-source-allow", "none"])
    assert cli.config_from_args(none).adapter_source_allow == []
    # through the command: one line, exit 2
    assert "cannot read --api-key-file" in one_line(serve(*model, *cases[0][0]))


@contextlib.contextmanager
def serving(log_path: Path, *args: str):
    """`lorapool serve` in a subprocess, SERVING when this yields its target."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [LORAPOOL, "serve", "--port", str(port), "--metrics-port", "0", "--grace", "5", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(target) as ch:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_path.read_text()
                with contextlib.suppress(grpc.RpcError):
                    if health_status(ch) == "SERVING":
                        break
                assert time.monotonic() < deadline, "not SERVING in time"
                time.sleep(0.2)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tokenizerless(tmp_path_factory, tiny_demo) -> Path:
    """The tiny demo checkpoint without its tokenizer files."""
    tokenizer_files = ("special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt")
    dst = tmp_path_factory.mktemp("no-tokenizer") / "model"
    shutil.copytree(
        tiny_demo.model_dir,
        dst,
        ignore=lambda _d, names: [
            n for n in names if n.startswith("tokenizer") or n in tokenizer_files
        ],
    )
    return dst


def test_serve_a_checkpoint_without_tokenizer_for_input_ids(tokenizerless, tiny_demo, tmp_path):
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN_KEY + "\n")
    with serving(
        tmp_path / "serve.log",
        "--model", str(tokenizerless), "--adapters", str(tiny_demo.adapters_dir),
        "--admin-api-key-file", str(key_file),
    ) as target:  # fmt: skip
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LoraPoolServiceStub(ch)
            answers(stub)
            answers(stub, adapter_id="adapter-002")
            err = rpc_error(
                stub.Complete, pb.CompleteRequest(prompt="the city", params=PARAMS), timeout=10
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            answers(stub)
            # the admin key came from the file
            stub.LoadAdapter(
                pb.LoadAdapterRequest(adapter_id="adapter-003"), metadata=md(ADMIN_KEY), timeout=30
            )
            err = rpc_error(
                stub.LoadAdapter, pb.LoadAdapterRequest(adapter_id="adapter-003"), timeout=10
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokenizer_flag_gives_a_tokenizerless_checkpoint_one(tokenizerless, tiny_demo, tmp_path):
    args = ("--model", str(tokenizerless), "--tokenizer", str(tiny_demo.model_dir))
    with serving(tmp_path / "serve.log", *args) as target:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LoraPoolServiceStub(ch)
            answers(stub, prompt="the city")
            assert stub.Tokenize(pb.TokenizeRequest(text="the city"), timeout=10).token_ids


def test_no_reflection_closes_reflection_only(start_server):
    srv = start_server(reflection=False)
    with grpc.insecure_channel(srv.target) as ch:
        err = rpc_error(reflection_lists_services, ch)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert health_status(ch) == "SERVING"
        answers(pb_grpc.LoraPoolServiceStub(ch))
