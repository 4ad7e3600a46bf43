"""The end-to-end side of bench_grpc.py: `lorapool serve` in a subprocess with the
same engine settings, driven from this process by `lorapool bench`'s run_bench
(AsyncLoraPoolClient, one Generate stream per request); CPU seconds counted for
the server and this client together."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import warm_requests
from cpu_time import proc_cpu_s, self_cpu_s
from grpc_workload import bench_config, engine_config, server_flags, summary, trace_adapters

from lorapool.client.bench import run_bench_async

LORAPOOL = str(Path(sys.executable).with_name("lorapool"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, paths, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        LORAPOOL, "serve", *server_flags(engine_config(args, paths)),
        "--port", str(port), "--metrics-port", "0", "--grace", "5", "--log-level", "WARNING",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


async def wait_serving(client, proc, timeout: float = 300.0) -> None:
    from lorapool.client import LoraPoolClientError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorapool serve exited with {proc.returncode}")
        try:
            if await client.health(timeout=2) == "SERVING":
                return
        except LoraPoolClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"lorapool serve not SERVING after {timeout:.0f}s")


async def server_run(args, target: str, proc, vocab: int) -> dict:
    from lorapool.client import AsyncLoraPoolClient

    async with AsyncLoraPoolClient(target, timeout=600, retries=0) as client:
        await wait_serving(client, proc)
        for adapter_id in trace_adapters(args):
            await client.load_adapter(adapter_id)

        async def warm(kwargs: dict) -> None:
            async for _ in client.generate(**kwargs):
                pass

        await asyncio.gather(*(warm(w) for w in warm_requests(vocab)))
        stats0 = await client.stats()
        cpu0, server0 = self_cpu_s(), proc_cpu_s(proc.pid)
        report = await run_bench_async(target, bench_config(args, vocab))
        cpu, server1 = self_cpu_s() - cpu0, proc_cpu_s(proc.pid)
        stats1 = await client.stats()
    both = None if server0 is None or server1 is None else cpu + server1 - server0
    return summary(report, stats0, stats1, both)


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode
