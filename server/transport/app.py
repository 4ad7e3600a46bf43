"""The gRPC server's lifecycle: the engine behind LoraPoolService on grpc.aio,
with the standard health service, server reflection, Prometheus metrics and a
graceful drain. The command line that builds a ServerConfig is
server/transport/cli.py.

Start-up: the port opens at once with health NOT_SERVING; the model loads off the
event loop; health turns SERVING when the engine runs. Shutdown: health goes
NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish within the grace
period, then the rest are cancelled and the server stops.

Start-up problems an operator can fix (a busy port, unreadable TLS files) raise
StartupError after closing whatever had been opened.

TLS: `tls_cert` and `tls_key` serve TLS; `tls_client_ca` adds mutual TLS, where a
client must present a certificate signed by that CA bundle or its handshake fails
(the call never reaches the service, so no key or ErrorInfo is involved)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from lorapool.errors import LoraPoolError
from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService, SourcePolicy
from lorapool.server.transport.auth import ApiKeyInterceptor
from lorapool.server.transport.decode import DecodeGuardInterceptor
from lorapool.server.transport.servicer import LoraPoolServicer
from lorapool.server.transport.startup import StartupError, bind_problem, probe_port, read_file
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig
    from lorapool.server.engine.engine import Engine

__all__ = ["LoraPoolServer", "ServerConfig", "StartupError"]

log = logging.getLogger("lorapool.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass
class ServerConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    api_key: str | None = None  # inference RPCs
    admin_api_key: str | None = None  # LoadAdapter / UnloadAdapter (and everything else)
    # LoadAdapter sources allowed (SourcePolicy rules); None: the adapter roots and hf://
    adapter_source_allow: list[str] | None = None
    tls_cert: str | None = None  # PEM certificate chain: serve TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates it signed
    metrics_port: int = 0  # 0 = no /metrics endpoint
    metrics_host: str | None = None  # default: host
    reflection: bool = True
    grace_s: float = 30.0
    extra_options: list[tuple[str, Any]] = field(default_factory=list)


class LoraPoolServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine: Engine | None = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self.grpc = self._grpc_server(config)
        self.metrics = Metrics()
        policy = config.adapter_source_allow
        self.service = LoraPoolService(
            None, self.metrics, SourcePolicy(policy) if policy is not None else None
        )
        pb_grpc.add_LoraPoolServiceServicer_to_server(LoraPoolServicer(self.service), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if config.reflection:
            enable_reflection(self.grpc)
        self._stopped = asyncio.Event()
        self._metrics_http = None  # (httpd, thread) of the /metrics endpoint

    @staticmethod
    def _grpc_server(config: ServerConfig) -> grpc.aio.Server:
        interceptors = []
        if config.api_key or config.admin_api_key:
            interceptors.append(ApiKeyInterceptor(config.api_key, config.admin_api_key))
        interceptors.append(DecodeGuardInterceptor())  # inside auth: keys are checked first
        return grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a second server on a busy port fails, not shares
                *config.extra_options,
            ],
        )

    async def start(self) -> int:
        """Open the ports, load the model, start the engine. Returns the port.

        Raises StartupError (a busy port, unreadable TLS files) or the engine's
        LoraPoolError (a broken checkpoint) after closing whatever it had opened."""
        try:
            return await self._start()
        except BaseException:
            await self._abandon()
            raise

    async def _start(self) -> int:
        # imported before the port opens, so that health checks never wait on torch
        from lorapool.server.engine.engine import Engine

        c = self.config
        creds = server_credentials(c)
        metrics_host = self._open_metrics()  # first: a busy port fails before the model loads
        self.port = self._add_port(c.host, c.port, creds)
        await self._set_serving(False)
        await self.grpc.start()
        log.info("listening on %s:%d (model loading)", c.host, self.port)
        if self._metrics_http is not None:
            log.info("metrics on http://%s:%d/metrics", metrics_host, c.metrics_port)
        self.engine = await self._load_engine(Engine)
        await self.engine.start()
        self.metrics.attach(self.engine)
        self.service.engine = self.engine
        await self._set_serving(True)
        log.info(
            "serving %s on %s:%d (%d pages of %d bytes)",
            self.engine.spec.arch,
            c.host,
            self.port,
            self.engine.pool.num_pages,
            self.engine.pool.page_bytes,
        )
        return self.port

    def _open_metrics(self) -> str | None:
        """Bind the /metrics endpoint when a port is set; returns its host."""
        c = self.config
        if not c.metrics_port:
            return None
        metrics_host = c.metrics_host or c.host
        try:
            self._metrics_http = self.metrics.serve(c.metrics_port, metrics_host)
        except OSError as exc:
            problem = bind_problem("metrics", metrics_host, c.metrics_port, exc)
            raise StartupError(problem) from None
        return metrics_host

    def _add_port(self, host: str, port: int, creds: grpc.ServerCredentials | None) -> int:
        """Bind the gRPC port, or raise StartupError saying why it cannot be. The
        port is probed with a plain socket first, so a busy one is reported in one
        line and not through grpc's own error log."""
        if port:
            probe_port("gRPC", host, port)
        address = f"{host}:{port}"
        try:
            if creds is not None:
                return self.grpc.add_secure_port(address, creds)
            return self.grpc.add_insecure_port(address)
        except RuntimeError as exc:  # lost a race with another process, or a bad host
            raise StartupError(f"cannot listen on {address} for gRPC ({exc})") from None

    async def _load_engine(self, engine_class: type[Engine]) -> Engine:
        """The engine, built off the event loop so that health checks are answered
        while the model loads."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, engine_class, self.config.engine)
        except LoraPoolError:
            raise  # a broken checkpoint: its message says what to do
        except (ValueError, OSError) as exc:  # settings the engine refuses
            raise StartupError(f"cannot load the model: {exc}") from exc

    async def _abandon(self) -> None:
        """Undo a start that failed: nothing stays bound or running."""
        try:
            await self.grpc.stop(None)
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                self.service.engine = None
                await engine.stop()
            await self._close_metrics()
            self._stopped.set()

    async def _close_metrics(self) -> None:
        """Free the /metrics port, e.g. for a server started after this one."""
        if self._metrics_http is None:
            return
        httpd, _thread = self._metrics_http
        self._metrics_http = None
        await asyncio.get_running_loop().run_in_executor(None, httpd.shutdown)  # waits a poll
        httpd.server_close()

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish
        within the grace period, cancel the rest, stop."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            await self.engine.drain(grace)
        await self.grpc.stop(1.0)
        if self.engine is not None:
            await self.engine.stop()
        await self._close_metrics()
        self._stopped.set()

    def cut_drain(self) -> None:
        """A second signal: cancel in-flight requests instead of waiting for them."""
        log.info("second signal: cancelling in-flight requests")
        if self.engine is not None:
            self.engine.cut_drain()

    async def wait(self) -> None:
        await self._stopped.wait()


def server_credentials(c: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files (None: plaintext). With a client
    CA, the handshake requires a client certificate signed by it. Raises
    StartupError for an unreadable file or a half-given TLS configuration."""
    if bool(c.tls_cert) != bool(c.tls_key):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    if c.tls_client_ca and not c.tls_cert:
        raise StartupError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
    if not (c.tls_cert and c.tls_key):
        return None
    pair = [(read_file(c.tls_key), read_file(c.tls_cert))]
    if not c.tls_client_ca:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=read_file(c.tls_client_ca), require_client_auth=True
    )


# -- server reflection ------------------------------------------------------------------
# grpc.reflection.v1 and v1alpha, answered from a pool of the served files. The API's
# file goes out with its comments (source info), from the descriptor set `make proto`
# writes beside the stubs, so `grpcurl describe` shows the documentation.

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProtos with source info, by file name; empty when the
    descriptor set is not installed (reflection then serves the files bare)."""
    try:
        data = resources.files("lorapool.v1").joinpath("lorapool.binpb").read_bytes()
    except OSError:
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file under the v1 package (the
    two protocols differ only in the package name)."""
    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    fd.name, fd.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    fd.ClearField("options")

    def v1(name: str) -> str:
        return name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")

    for message in fd.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = v1(f.type_name)
    for method in fd.service[0].method:
        method.input_type, method.output_type = v1(method.input_type), v1(method.output_type)
    return fd


class _ReflectionServicer(reflection.aio.ReflectionServicer):
    """The stock servicer, with the files of `documented` sent with their comments
    (a pool's descriptors drop source info)."""

    def __init__(self, service_names, pool, documented: dict[str, bytes]):
        super().__init__(service_names, pool=pool)
        self._documented = documented

    async def ServerReflectionInfo(self, request_iterator, context):
        async for response in super().ServerReflectionInfo(request_iterator, context):
            files = response.file_descriptor_response.file_descriptor_proto
            for i, raw in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                files[i] = self._documented.get(name, raw)
            yield response


def enable_reflection(server: grpc.aio.Server) -> None:
    """Serves grpc.reflection.v1alpha and grpc.reflection.v1 on `server`."""
    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        pool.Add(fd)
    pool.Add(_v1_reflection_file())
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = _ReflectionServicer(names, pool, documented_files())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # the v1 messages are v1alpha's on the wire
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
