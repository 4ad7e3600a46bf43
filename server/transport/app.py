"""`lorapool serve`: the engine behind LoraPoolService on grpc.aio, with the
standard health service, server reflection, Prometheus metrics and graceful
shutdown on SIGTERM/SIGINT.

Start-up: the port opens at once with health NOT_SERVING; the model loads off the
event loop; health turns SERVING when the engine runs. Shutdown: health goes
NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish within the grace
period, then the rest are cancelled and the server stops.

Start-up problems an operator can fix (a busy port, a broken checkpoint folder, an
unreadable key file) make `lorapool serve` print one line `lorapool serve: ...` and
exit 2, with nothing left running."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorapool.errors import LoraPoolError
from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService, SourcePolicy
from lorapool.server.transport.auth import ApiKeyInterceptor
from lorapool.server.transport.decode import DecodeGuardInterceptor
from lorapool.server.transport.servicer import LoraPoolServicer
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

log = logging.getLogger("lorapool.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
MAX_MESSAGE_BYTES = 64 * 2**20


class StartupError(Exception):
    """A start-up problem the operator can fix; the message says what and how, in
    one line."""


@dataclass
class ServerConfig:
    engine: object  # EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    api_key: str | None = None  # inference RPCs
    admin_api_key: str | None = None  # LoadAdapter / UnloadAdapter (and everything else)
    # LoadAdapter sources allowed (SourcePolicy rules); None: the adapter roots and hf://
    adapter_source_allow: list[str] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int = 0  # 0 = no /metrics endpoint
    metrics_host: str | None = None  # default: host
    reflection: bool = True
    grace_s: float = 30.0
    extra_options: list = field(default_factory=list)


class LoraPoolServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        interceptors = []
        if config.api_key or config.admin_api_key:
            interceptors.append(ApiKeyInterceptor(config.api_key, config.admin_api_key))
        interceptors.append(DecodeGuardInterceptor())  # inside auth: keys are checked first
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a second server on a busy port fails, not shares
                *config.extra_options,
            ],
        )
        self.metrics = Metrics()
        policy = config.adapter_source_allow
        self.service = LoraPoolService(
            None, self.metrics, SourcePolicy(policy) if policy is not None else None
        )
        pb_grpc.add_LoraPoolServiceServicer_to_server(LoraPoolServicer(self.service), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
            )
        self._stopped = asyncio.Event()
        self._metrics_http = None  # (httpd, thread) of the /metrics endpoint

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
        from lorapool.server.engine.engine import Engine

        c = self.config
        creds = None
        if c.tls_cert and c.tls_key:
            creds = grpc.ssl_server_credentials([(_read(c.tls_key), _read(c.tls_cert))])
        if c.metrics_port:  # bound first: a busy port fails before the model loads
            metrics_host = c.metrics_host or c.host
            try:
                self._metrics_http = self.metrics.serve(c.metrics_port, metrics_host)
            except OSError as exc:
                problem = _bind_problem("metrics", metrics_host, c.metrics_port, exc)
                raise StartupError(problem) from None
        self.port = self._add_port(c.host, c.port, creds)
        await self._set_serving(False)
        await self.grpc.start()
        log.info("listening on %s:%d (model loading)", c.host, self.port)
        if self._metrics_http is not None:
            log.info("metrics on http://%s:%d/metrics", metrics_host, c.metrics_port)
        loop = asyncio.get_running_loop()
        try:
            self.engine = await loop.run_in_executor(None, Engine, c.engine)
        except LoraPoolError:
            raise  # a broken checkpoint: its message says what to do
        except (ValueError, OSError) as exc:  # settings the engine refuses
            raise StartupError(f"cannot load the model: {exc}") from exc
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

    def _add_port(self, host: str, port: int, creds) -> int:
        """Bind the gRPC port, or raise StartupError saying why it cannot be. The
        port is probed with a plain socket first, so a busy one is reported in one
        line and not through grpc's own error log."""
        if port:
            _probe_port("gRPC", host, port)
        address = f"{host}:{port}"
        try:
            if creds is not None:
                return self.grpc.add_secure_port(address, creds)
            return self.grpc.add_insecure_port(address)
        except RuntimeError as exc:  # lost a race with another process, or a bad host
            raise StartupError(f"cannot listen on {address} for gRPC ({exc})") from None

    async def _abandon(self) -> None:
        """Undo a start that failed: nothing stays bound or running."""
        try:
            await self.grpc.stop(None)
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                self.service.engine = None
                await engine.stop()
            if self._metrics_http is not None:
                httpd, _thread = self._metrics_http
                self._metrics_http = None
                await asyncio.get_running_loop().run_in_executor(None, httpd.shutdown)
                httpd.server_close()
            self._stopped.set()

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
        if self._metrics_http is not None:  # free the port for a server started after this one
            httpd, _thread = self._metrics_http
            self._metrics_http = None
            await asyncio.get_running_loop().run_in_executor(None, httpd.shutdown)  # waits a poll
            httpd.server_close()
        self._stopped.set()

    def cut_drain(self) -> None:
        """A second signal: cancel in-flight requests instead of waiting for them."""
        log.info("second signal: cancelling in-flight requests")
        if self.engine is not None:
            self.engine.cut_drain()

    async def wait(self) -> None:
        await self._stopped.wait()


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {path} ({exc.strerror or exc})") from None


def _bind_problem(what: str, host: str, port: int, exc: OSError) -> str:
    flag = "--metrics-port" if what == "metrics" else "--port"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use on {host} ({what}); stop the other server or pick "
            f"another {flag}"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} ({what}) needs privileges; pick a {flag} above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine ({what}); check --host"
    return f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc})"


def _probe_port(what: str, host: str, port: int) -> None:
    """Raise StartupError when host:port cannot be bound (busy, privileged, no such
    address). SO_REUSEADDR as grpc sets it: a listener conflicts, TIME_WAIT does not."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {host} ({exc.strerror})") from None
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(_bind_problem(what, host, port, exc)) from None


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    env = os.environ.get
    parser.add_argument(
        "--model",
        help="HF checkpoint dir to serve (default: the embedded random-init tiny demo model "
        "and 8 adapters, written first if missing to $LORAPOOL_DEMO_DIR, else "
        "<repo>/.cache/demo or ~/.cache/lorapool/demo)",
    )
    parser.add_argument(
        "--adapters",
        action="append",
        default=[],
        help="directory whose subfolders are PEFT adapters, id = folder name (repeatable)",
    )
    parser.add_argument(
        "--model-name", default="", help="name reported by GetModelInfo (default: the dir name)"
    )
    parser.add_argument("--host", default=env("LORAPOOL_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("LORAPOOL_PORT", "50051")))
    parser.add_argument("--pool-mib", type=float, default=256.0, help="pool size (KV + adapters)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (page)")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="token budget per step")
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--max-waiting", type=int, default=1024, help="admission queue bound")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="limit per request")
    parser.add_argument("--host-cache-mib", type=float, default=1024.0)
    parser.add_argument("--pin", action="append", default=[], help="keep this adapter resident")
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument(
        "--tokenizer",
        help="folder of the tokenizer to use (default: the checkpoint's own; a checkpoint "
        "without one serves token-id requests only)",
    )
    parser.add_argument(
        "--api-key",
        help="key for inference RPCs (x-api-key); visible in ps: prefer LORAPOOL_API_KEY "
        "or --api-key-file",
    )
    parser.add_argument(
        "--api-key-file",
        default=env("LORAPOOL_API_KEY_FILE"),
        help="file holding the inference key",
    )
    parser.add_argument(
        "--admin-api-key",
        help="key for LoadAdapter/UnloadAdapter (and every other RPC); without one they "
        "are refused unless no key is set at all; prefer LORAPOOL_ADMIN_API_KEY or "
        "--admin-api-key-file",
    )
    parser.add_argument(
        "--admin-api-key-file",
        default=env("LORAPOOL_ADMIN_API_KEY_FILE"),
        help="file holding the admin key",
    )
    parser.add_argument(
        "--adapter-source-allow",
        action="append",
        metavar="RULE",
        help="LoadAdapter sources allowed (repeatable): a path prefix, a scheme (hf://) or "
        "a scheme with a prefix (hf://org/); 'none' allows none (default: the --adapters "
        "folders and hf://)",
    )
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("LORAPOOL_METRICS_PORT", "9464")),
        help="Prometheus /metrics port, open without a key (0: off)",
    )
    parser.add_argument(
        "--metrics-host", help="address /metrics binds (default: --host), e.g. 127.0.0.1"
    )
    parser.add_argument(
        "--no-reflection", action="store_true", help="do not offer gRPC server reflection"
    )
    parser.add_argument("--grace", type=float, default=30.0, help="drain period on SIGTERM (s)")
    parser.add_argument("--log-level", default=env("LORAPOOL_LOG_LEVEL", "INFO"))


def config_from_args(args) -> ServerConfig:
    from lorapool.server.engine.engine import EngineConfig

    model, adapters = args.model, list(args.adapters)
    api_key = _key(args.api_key, args.api_key_file, "--api-key", "LORAPOOL_API_KEY")
    admin_key = _key(
        args.admin_api_key, args.admin_api_key_file, "--admin-api-key", "LORAPOOL_ADMIN_API_KEY"
    )
    if api_key and api_key == admin_key:
        raise StartupError("the admin key must differ from the inference key")
    allow = args.adapter_source_allow
    if allow is not None:
        allow = [] if [r.strip().lower() for r in allow] == ["none"] else list(allow)
        try:
            SourcePolicy(allow)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    extra = {}
    if args.tokenizer:
        if "tokenizer_dir" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise StartupError("--tokenizer is not supported by this engine")
        from lorapool.server.engine.tokenizer import TOKENIZER_FILES, has_tokenizer

        if not Path(args.tokenizer).is_dir() or not has_tokenizer(args.tokenizer):
            raise StartupError(
                f"--tokenizer {args.tokenizer} is not a folder holding a tokenizer "
                f"(one of {', '.join(TOKENIZER_FILES)})"
            )
        extra["tokenizer_dir"] = args.tokenizer
    if model is None:
        from lorapool.demo import default_demo_dir, make_demo

        demo_dir = default_demo_dir()
        print(
            f"lorapool serve: no --model, so serving the embedded random-init demo model from "
            f"{demo_dir} (writing it first if missing); --model PATH serves a real checkpoint",
            file=sys.stderr,
            flush=True,
        )
        demo = make_demo(demo_dir, preset="tiny", n_adapters=8)
        model = str(demo.model_dir)
        adapters = adapters or [str(demo.adapters_dir)]
    engine = EngineConfig(
        model_dir=model,
        model_name=args.model_name,
        adapter_dirs=adapters,
        device=args.device,
        dtype=args.dtype,
        pool_mib=args.pool_mib,
        block_size=args.block_size,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_new_tokens_limit=args.max_new_tokens,
        host_cache_mib=args.host_cache_mib,
        pinned=list(args.pin),
        enable_prefix_cache=not args.no_prefix_cache,
        **extra,
    )
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=api_key,
        admin_api_key=admin_key,
        adapter_source_allow=allow,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        reflection=not args.no_reflection,
        grace_s=args.grace,
    )


def _key(value: str | None, path: str | None, flag: str, env_name: str) -> str | None:
    """A key from its flag, its file (--...-file) or its environment variable."""
    if value and path:
        raise StartupError(f"give {flag} or {flag}-file, not both")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError(
                f"cannot read {flag}-file {path} ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        if not value:
            raise StartupError(f"{flag}-file {path} is empty")
        return value
    if value:
        log.warning(
            "%s on the command line is visible to other users (ps); prefer %s or %s-file",
            flag,
            env_name,
            flag,
        )
        return value
    return os.environ.get(env_name) or None


def run(args) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = config_from_args(args)
        asyncio.run(_serve(config))
    except (StartupError, LoraPoolError) as exc:
        # what is wrong and what to do, in one line; the details at debug level
        log.debug("start-up failed", exc_info=True)
        print(f"lorapool serve: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


async def _serve(config: ServerConfig) -> None:
    server = LoraPoolServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("signal received: draining for up to %.0fs (signal again to cut it)", config.grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.cut_drain)
    await server.stop()
    log.info("stopped")
