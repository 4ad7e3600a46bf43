"""The API as a tool nobody on the project wrote sees it: buf (`buf curl` over
gRPC with server reflection, `buf lint`). buf knows nothing of the generated
Python stubs: it learns the schema from the running server's reflection, so
these tests fail when reflection, the JSON mapping of a request or the error
details stop working for other languages. buf on PATH is used; without it, the
version pinned in tests/tools/package-lock.json is installed with npm (once, into
.cache/tools); the tests are skipped only when neither buf nor npm is there."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from npm import have_npm, npm_ci

from lorapool.client import LoraPoolClient

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent / "tools"
SERVICE = "lorapool.v1.LoraPoolService"
REFLECT_PROTOCOLS = ("grpc-v1", "grpc-v1alpha")


@pytest.fixture(scope="module")
def buf() -> str:
    found = shutil.which("buf")
    if found:
        return found
    if not have_npm():
        pytest.skip("needs buf on PATH, or node and npm to install it")
    return str(npm_ci(TOOLS, ROOT / ".cache/tools") / ".bin/buf")


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine={"max_new_tokens_limit": 64})


def buf_curl(
    buf: str, server, *args: str, data: dict | None = None, method: str = "", check: bool = True
):
    """`buf curl` over gRPC (HTTP/2 without TLS) against `server`; the schema comes
    from the server's reflection unless --reflect-protocol says which version."""
    url = f"http://{server.target}/{method}" if method else f"http://{server.target}"
    cmd = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def json_stream(text: str) -> list[dict]:
    """The JSON objects buf curl prints one after another (one per streamed message)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := _skip_space(text, i)) < len(text):
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_buf_lists_services_and_methods_through_reflection(buf, server, protocol):
    reflect = ("--reflect-protocol", protocol)
    services = buf_curl(buf, server, *reflect, "--list-services").stdout.split()
    assert {SERVICE, "grpc.health.v1.Health"} <= set(services)
    methods = buf_curl(buf, server, *reflect, "--list-methods").stdout.split()
    assert {f"{SERVICE}/{m}" for m in ("Generate", "Complete", "Tokenize", "GetStats")} <= set(
        methods
    )


def test_buf_tokenizes_and_streams_a_generation_like_the_python_client(buf, server):
    tokens = buf_curl(
        buf, server, data={"text": "river", "return_tokens": True}, method=f"{SERVICE}/Tokenize"
    )
    tokenized = json.loads(tokens.stdout)
    assert tokenized["tokenIds"] and len(tokenized["tokens"]) == len(tokenized["tokenIds"])

    request = {
        "adapter_id": "adapter-003",
        "input_ids": {"ids": [5, 6, 7, 8]},  # the TokenIds wrapper, as proto3 JSON has it
        "params": {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0},
    }
    messages = json_stream(buf_curl(buf, server, data=request, method=f"{SERVICE}/Generate").stdout)
    assert len(messages) > 1  # streamed, not one reply
    streamed = [t for m in messages for t in m.get("tokenIds", [])]
    assert messages[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["promptTokens"] == 4
    with LoraPoolClient(server.target, timeout=60) as client:
        reply = client.complete(
            input_ids=[5, 6, 7, 8],
            adapter_id="adapter-003",
            max_new_tokens=6,
            ignore_eos=True,
            temperature=0.0,
        )
    assert streamed == reply.token_ids  # greedy: the same tokens whichever client asks


def test_buf_sees_the_error_info_reason_and_field(buf, server):
    done = buf_curl(
        buf,
        server,
        data={"adapter_id": "no-such-adapter", "prompt": "river"},
        method=f"{SERVICE}/Generate",
        check=False,
    )
    assert done.returncode != 0
    error = json.loads(done.stderr[done.stderr.index("{") :])
    assert error["code"] == "not_found"
    details = {d["type"]: d["value"] for d in error["details"]}
    info = error_details_pb2.ErrorInfo.FromString(_b64(details["google.rpc.ErrorInfo"]))
    assert info.reason == "ADAPTER_NOT_FOUND"
    assert info.metadata["adapter_id"] == "no-such-adapter"


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))  # buf omits the padding


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_the_reflected_descriptor_carries_the_field_comments(buf, server, protocol):
    """What `grpcurl describe lorapool.v1.GenerateRequest` prints comes from these
    bytes: the file with its source info, asked for here by buf over reflection."""
    version = protocol.removeprefix("grpc-")
    reply = buf_curl(
        buf,
        server,
        data={"file_containing_symbol": "lorapool.v1.GenerateRequest"},
        method=f"grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
    )
    (answer,) = json_stream(reply.stdout)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(_b64(raw))
        for raw in answer["fileDescriptorResponse"]["fileDescriptorProto"]
    ]
    (fd,) = [f for f in files if f.name == "lorapool/v1/lorapool.proto"]
    (m,) = [i for i, msg in enumerate(fd.message_type) if msg.name == "GenerateRequest"]
    fields = {f.name: j for j, f in enumerate(fd.message_type[m].field)}
    comments = {tuple(loc.path): loc.leading_comments for loc in fd.source_code_info.location}
    message_path = (4, m)  # FileDescriptorProto.message_type
    assert "Generate and Complete take the same fields" in comments[message_path]
    assert "Text to tokenize" in comments[(*message_path, 2, fields["prompt"])]
    assert "Default (empty): the base model" in comments[(*message_path, 2, fields["adapter_id"])]


# -- buf lint --------------------------------------------------------------------------


def buf_lint(buf: str, protos: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [buf, "lint", "--error-format", "json"],
        cwd=protos,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_buf_lint_standard_and_comments_is_clean(buf):
    config = (ROOT / "protos/buf.yaml").read_text()
    assert "STANDARD" in config and "COMMENTS" in config
    done = buf_lint(buf, ROOT / "protos")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_notices_an_undocumented_field(buf, tmp_path):
    """The lint configuration is in force: a field stripped of its comment fails it."""
    tree = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", tree, ignore=shutil.ignore_patterns("__pycache__"))
    proto = tree / "lorapool/v1/lorapool.proto"
    text = proto.read_text()
    doc = "  // Higher runs first and is preempted last. Default 0.\n  int32 priority = 3;\n"
    assert text.count(doc) >= 1
    proto.write_text(text.replace(doc, "  int32 priority = 3;\n", 1))
    done = buf_lint(buf, tree)
    assert done.returncode != 0
    findings = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert any(f["type"] == "COMMENT_FIELD" for f in findings), done.stdout
