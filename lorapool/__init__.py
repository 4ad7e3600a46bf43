"""lorapool: serve thousands of LoRA fine-tunes of one base model.

The in-process API, for Python programs that host the engine themselves::

    import asyncio
    from lorapool import Engine, EngineConfig, GenerationRequest, SamplingParams

    async def main():
        engine = Engine(EngineConfig(model_dir="path/to/checkpoint", adapter_dirs=["adapters"]))
        await engine.start()
        request = GenerationRequest(
            request_id="r1",
            prompt="The market opened",
            adapter_id="adapter-003",
            params=SamplingParams(max_new_tokens=32),
        )
        async for event in engine.generate(request):
            print(event.text, end="", flush=True)
        await engine.stop()

    asyncio.run(main())

Clients of a running server use `LoraPoolClient` / `AsyncLoraPoolClient`. Names are
imported on first use, so `import lorapool` stays light (no torch for a client).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # the engine, in-process
    "Engine": "lorapool.server.engine.engine",
    "EngineConfig": "lorapool.server.engine.engine",
    # requests and results
    "GenerationRequest": "lorapool.types",
    "SamplingParams": "lorapool.types",
    "TokenEvent": "lorapool.types",
    "TokenLogprob": "lorapool.types",
    "FinishReason": "lorapool.types",
    "Usage": "lorapool.types",
    "AdapterInfo": "lorapool.types",
    "AdapterState": "lorapool.types",
    "EngineStats": "lorapool.types",
    # errors
    "LoraPoolError": "lorapool.errors",
    "InvalidRequest": "lorapool.errors",
    "AdapterNotFound": "lorapool.errors",
    "AdapterIncompatible": "lorapool.errors",
    "AdapterTooLarge": "lorapool.errors",
    "QueueFull": "lorapool.errors",
    "Draining": "lorapool.errors",
    "SourceUnavailable": "lorapool.errors",
    # clients of a running server
    "LoraPoolClient": "lorapool.client",
    "AsyncLoraPoolClient": "lorapool.client",
    "LoraPoolClientError": "lorapool.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorapool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
