"""`lorapool serve`: the engine behind LoraPoolService on grpc.aio, with the
standard health service, server reflection, Prometheus metrics and graceful
shutdown on SIGTERM/SIGINT.

Start-up: the port opens at once with health NOT_SERVING; the model loads off the
event loop; health turns SERVING when the engine runs. Shutdown: health goes
NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish within the grace
period, then the rest are cancelled and the server stops."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorapool.server.metrics import Metrics
from lorapool.server.service import LoraPoolService
from lorapool.server.transport.auth import ApiKeyInterceptor
from lorapool.server.transport.servicer import LoraPoolServicer
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

log = logging.getLogger("lorapool.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraPoolService"].full_name
MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass
class ServerConfig:
    engine: object  # EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int = 0  # 0 = no /metrics endpoint
    grace_s: float = 30.0
    extra_options: list = field(default_factory=list)


class LoraPoolServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                *config.extra_options,
            ],
        )
        self.metrics = Metrics()
        self.service = LoraPoolService(None, self.metrics)
        pb_grpc.add_LoraPoolServiceServicer_to_server(LoraPoolServicer(self.service), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self._stopped = asyncio.Event()
        self._metrics_http = None  # (httpd, thread) of the /metrics endpoint

    async def start(self) -> int:
        """Open the port, load the model, start the engine. Returns the port."""
        from lorapool.server.engine.engine import Engine

        c = self.config
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            creds = grpc.ssl_server_credentials(
                [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())]
            )
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        await self._set_serving(False)
        await self.grpc.start()
        log.info("listening on %s:%d (model loading)", c.host, self.port)
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(None, Engine, c.engine)
        await self.engine.start()
        self.metrics.attach(self.engine)
        self.service.engine = self.engine
        if c.metrics_port:
            self._metrics_http = self.metrics.serve(c.metrics_port, c.host)
            log.info("metrics on http://%s:%d/metrics", c.host, c.metrics_port)
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
    parser.add_argument("--api-key", default=env("LORAPOOL_API_KEY"))
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument(
        "--metrics-port", type=int, default=int(env("LORAPOOL_METRICS_PORT", "9464"))
    )
    parser.add_argument("--grace", type=float, default=30.0, help="drain period on SIGTERM (s)")
    parser.add_argument("--log-level", default=env("LORAPOOL_LOG_LEVEL", "INFO"))


def config_from_args(args) -> ServerConfig:
    from lorapool.server.engine.engine import EngineConfig

    model, adapters = args.model, list(args.adapters)
    if model is None:
        import sys

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
    )
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
    )


def run(args) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = config_from_args(args)
    asyncio.run(_serve(config))
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
