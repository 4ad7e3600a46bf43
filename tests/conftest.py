"""Shared fixtures: the tiny demo model with its adapters, and engines built on it."""

from __future__ import annotations

import pytest

DEMO_ADAPTERS = 20


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The tiny demo model and DEMO_ADAPTERS adapters (adapter-000 ... adapter-019)."""
    from lorapool.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), preset="tiny", n_adapters=DEMO_ADAPTERS)


@pytest.fixture
async def make_engine(tiny_demo):
    """Factory: `await make_engine(pool_pages=..., **EngineConfig fields)` returns a
    started Engine on the tiny demo; every engine is stopped at teardown. pool_pages
    sizes the pool in pages instead of MiB."""
    from lorapool.server.engine.engine import Engine, EngineConfig

    engines = []

    async def factory(pool_pages: int | None = None, **overrides):
        overrides.setdefault("model_dir", str(tiny_demo.model_dir))
        overrides.setdefault("adapter_dirs", [str(tiny_demo.adapters_dir)])
        engine = Engine(EngineConfig(**overrides))
        if pool_pages is not None:
            page_bytes = engine.pool.page_bytes
            overrides["pool_mib"] = pool_pages * page_bytes / 2**20
            engine = Engine(EngineConfig(**overrides))
            assert engine.pool.num_pages == pool_pages
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop()


@pytest.fixture(scope="session")
def tiny_qwen2_demo(tmp_path_factory):
    """The tiny demo as Qwen2 (q/k/v biases, tied embeddings) with 6 adapters."""
    from lorapool.demo import make_demo

    return make_demo(
        tmp_path_factory.mktemp("demo-qwen2"), preset="tiny", arch="qwen2", n_adapters=6
    )


# -- gRPC servers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A LoraPoolServer on its own event loop in a daemon thread, so that blocking
    clients, asyncio clients on the test's loop and subprocesses can all call it.
    `target` is host:port; `call(coro)` runs a coroutine on the server's loop."""

    def __init__(self, config):
        import asyncio
        import threading

        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._create(config))
        self.port = self.call(self.server.start(), timeout=120)
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _create(config):
        from lorapool.server.transport.app import LoraPoolServer

        return LoraPoolServer(config)  # grpc.aio wants the server made on its loop

    def submit(self, coro):
        """Schedule coro on the server's loop; returns a concurrent.futures.Future."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout: float = 30.0):
        return self.submit(coro).result(timeout)

    @property
    def stopped(self) -> bool:
        return self.server._stopped.is_set()

    def close(self, grace_s: float = 1.0) -> None:
        if self.thread.is_alive():
            if not self.stopped:
                self.call(self.server.stop(grace_s), timeout=grace_s + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def start_server(tiny_demo):
    """Factory: `start_server(engine={EngineConfig overrides}, **ServerConfig fields)`
    returns a started ServerThread on the tiny demo (port 0 picks a free port);
    every server of the module is stopped at teardown."""
    from lorapool.server.engine.engine import EngineConfig
    from lorapool.server.transport.app import ServerConfig

    servers: list[ServerThread] = []

    def factory(engine: dict | None = None, **server_fields) -> ServerThread:
        engine = dict(engine or {})
        engine.setdefault("model_dir", str(tiny_demo.model_dir))
        engine.setdefault("adapter_dirs", [str(tiny_demo.adapters_dir)])
        server_fields.setdefault("port", 0)
        server_fields.setdefault("grace_s", 5.0)
        server = ServerThread(ServerConfig(engine=EngineConfig(**engine), **server_fields))
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
