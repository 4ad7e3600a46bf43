"""A self-describing API: every element of lorapool.proto has a comment, server
reflection (grpc.reflection.v1 and v1alpha) serves the file with its comments
(source info), so `grpcurl describe` shows them, and `make proto-check` notices a
stale descriptor set."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOSET = ROOT / "protos/lorapool/v1/lorapool.binpb"
API_FILE = "lorapool/v1/lorapool.proto"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

# FileDescriptorProto / DescriptorProto / ... field numbers used in source info paths
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2


def api_file() -> descriptor_pb2.FileDescriptorProto:
    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes()).file
    (fd,) = [f for f in files if f.name == API_FILE]
    return fd


def leading_comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple, str]:
    return {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}


def documented_elements(fd) -> list[tuple[str, tuple]]:
    """(full name, source path) of every message, field, oneof, enum, enum value,
    service and method."""
    out: list[tuple[str, tuple]] = []

    def enum(e, name, path):
        out.append((name, path))
        for i, v in enumerate(e.value):
            out.append((f"{name}.{v.name}", (*path, ENUM_VALUE, i)))

    def message(m, name, path):
        out.append((name, path))
        for i, f in enumerate(m.field):
            out.append((f"{name}.{f.name}", (*path, MSG_FIELD, i)))
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneof of a proto3 `optional`
                out.append((f"{name}.{o.name}", (*path, MSG_ONEOF, i)))
        for i, n in enumerate(m.nested_type):
            message(n, f"{name}.{n.name}", (*path, MSG_NESTED, i))
        for i, e in enumerate(m.enum_type):
            enum(e, f"{name}.{e.name}", (*path, MSG_ENUM, i))

    for i, m in enumerate(fd.message_type):
        message(m, f"{fd.package}.{m.name}", (FILE_MESSAGE, i))
    for i, e in enumerate(fd.enum_type):
        enum(e, f"{fd.package}.{e.name}", (FILE_ENUM, i))
    for i, s in enumerate(fd.service):
        out.append((f"{fd.package}.{s.name}", (FILE_SERVICE, i)))
        for j, method in enumerate(s.method):
            out.append(
                (f"{fd.package}.{s.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j))
            )
    return out


def field_path(fd, message: str, field: str) -> tuple:
    (i,) = [i for i, m in enumerate(fd.message_type) if m.name == message]
    (j,) = [j for j, f in enumerate(fd.message_type[i].field) if f.name == field]
    return (FILE_MESSAGE, i, MSG_FIELD, j)


# -- the proto itself ------------------------------------------------------------------


def test_every_element_of_the_api_has_a_leading_comment():
    fd = api_file()
    comments = leading_comments(fd)
    elements = documented_elements(fd)
    assert len(elements) > 120  # the walk found the file's contents
    missing = [name for name, path in elements if not comments.get(path)]
    assert not missing, f"no leading comment (buf lint COMMENTS): {missing}"
    # a `-- Section (1-9) --` marker must stand apart (blank line), not be the doc
    sections = [name for name, path in elements if comments[path].startswith("--")]
    assert not sections, sections


def test_rpcs_say_which_errors_they_return():
    fd = api_file()
    comments = leading_comments(fd)
    for j, method in enumerate(fd.service[0].method):
        assert "Errors:" in comments[(FILE_SERVICE, 0, SERVICE_METHOD, j)], method.name


def test_file_options_for_other_languages():
    options = api_file().options
    assert options.go_package == "github.com/lorapool/lorapool/gen/go/lorapool/v1;lorapoolv1"
    assert options.java_package == "dev.lorapool.v1" and options.java_multiple_files
    assert options.csharp_namespace == "LoraPool.V1"


# -- reflection through a real server --------------------------------------------------


@pytest.fixture(scope="module")
def channel(start_server):
    server = start_server()
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def ask(channel, method: str, **request) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request over `method` (v1 and v1alpha messages are the same
    on the wire)."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (reply,) = call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)
    assert not reply.HasField("error_response"), reply.error_response
    return reply


@pytest.mark.parametrize("method", [V1ALPHA, V1])
def test_reflection_serves_the_api_with_its_comments(channel, method):
    services = ask(channel, method, list_services="").list_services_response.service
    assert {
        "lorapool.v1.LoraPoolService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    } <= {s.name for s in services}

    reply = ask(channel, method, file_containing_symbol="lorapool.v1.GenerateRequest")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    (fd,) = [f for f in files if f.name == API_FILE]
    comments = leading_comments(fd)
    temperature = comments[field_path(fd, "SamplingParams", "temperature")]
    assert "greedy" in temperature and "Default" in temperature
    assert "Errors:" in comments[(FILE_SERVICE, 0, SERVICE_METHOD, 0)]  # Generate
    assert fd.options.go_package
    # by file name too, and the descriptors still build a pool
    again = ask(channel, method, file_by_filename=API_FILE).file_descriptor_response
    assert descriptor_pb2.FileDescriptorProto.FromString(again.file_descriptor_proto[0]) == fd
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    assert pool.FindMessageTypeByName("lorapool.v1.SamplingParams").fields_by_name["temperature"]


@pytest.mark.parametrize("symbol", ["grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"])
def test_reflection_describes_the_other_services(channel, symbol):
    reply = ask(channel, V1, file_containing_symbol=symbol)
    pool = descriptor_pool.DescriptorPool()
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    service = pool.FindServiceByName(symbol)
    assert service.methods  # input and output types resolve in the served files


def test_unknown_symbol_is_not_found(channel):
    call = channel.stream_stream(
        V1,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Thing")
    (reply,) = call(iter([request]), timeout=10)
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_no_reflection_closes_v1_too(start_server):
    server = start_server(reflection=False)
    with grpc.insecure_channel(server.target) as ch:
        for method in (V1ALPHA, V1):
            with pytest.raises(grpc.RpcError) as err:
                ask(ch, method, list_services="")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- make proto-check ------------------------------------------------------------------


def proto_check(tree: Path) -> subprocess.CompletedProcess:
    # -o: the copied tree shares this checkout's virtual environment, never reinstalls it
    return subprocess.run(
        ["make", "-o", ".venv/.installed", "proto-check"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_proto_check_notices_a_stale_descriptor_set(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy2(ROOT / "Makefile", tree / "Makefile")
    shutil.copytree(ROOT / "protos", tree / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(ROOT / ".venv", tree / ".venv")
    done = proto_check(tree)
    assert done.returncode == 0, done.stdout + done.stderr

    # a comment changes only the descriptor set's source info, not the stubs
    proto = tree / "protos" / API_FILE
    text = proto.read_text()
    assert "// Softmax temperature" in text
    proto.write_text(text.replace("// Softmax temperature", "// The softmax temperature"))
    done = proto_check(tree)
    assert done.returncode != 0
    assert "lorapool.binpb" in done.stdout + done.stderr
