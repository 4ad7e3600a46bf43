"""`lorapool serve-ray`: LoraPoolService on Ray Serve, N engine replicas behind one
gRPC port, routed by adapter affinity. Starts a local Ray instance (or joins
--address), serves until SIGTERM/SIGINT, then shuts Serve and Ray down."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading

from lorapool.server.transport.cli import (
    add_engine_flags,
    add_key_flags,
    add_model_flags,
    add_source_rule_flag,
    engine_config,
    model_and_adapters,
    read_keys,
    source_rules,
    tokenizer_settings,
)
from lorapool.server.transport.startup import StartupError, probe_port

log = logging.getLogger("lorapool.ray")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_flags(parser)
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port")
    parser.add_argument(
        "--host",
        default="0.0.0.0",
        help="address the gRPC proxy listens on (0.0.0.0: every interface), e.g. 127.0.0.1",
    )
    parser.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port")
    parser.add_argument("--http-host", default="127.0.0.1", help="Serve's HTTP proxy address")
    parser.add_argument(
        "--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per engine replica"
    )
    parser.add_argument(
        "--replica-gpus",
        type=float,
        default=0.0,
        help="Ray GPUs per engine replica (1 with --device cuda: one GPU each)",
    )
    parser.add_argument(
        "--address",
        help="join this Ray cluster: auto, or ray://head:10001 (default: start a local Ray "
        "instance)",
    )
    parser.add_argument(
        "--routing",
        choices=("affinity", "random"),
        default="affinity",
        help="affinity: an adapter's requests go to replicas holding it; random: by load "
        "only (for comparison)",
    )
    parser.add_argument(
        "--load-bound",
        type=float,
        default=1.25,
        help="affinity: a replica holding the adapter takes the request while its in-flight "
        "stays within this times the fleet's mean, else the least-loaded replica loads it",
    )
    parser.add_argument(
        "--load-floor",
        type=int,
        default=8,
        help="affinity: in-flight a holder may always reach (no spreading below it)",
    )
    parser.add_argument("--grace", type=float, default=30.0, help="drain period on SIGTERM (s)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("LORAPOOL_METRICS_PORT", "9464")),
        help="Prometheus /metrics port of the whole fleet (every replica's samples, labelled "
        "replica=<id>), open without a key; 0 = off (env LORAPOOL_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host", help="address /metrics binds (default: --host), e.g. 127.0.0.1"
    )
    add_engine_flags(parser)
    add_source_rule_flag(parser)
    add_key_flags(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if importlib.util.find_spec("ray") is None:
        print(
            "lorapool serve-ray: Python module 'ray' is not installed; install it with: "
            "pip install 'lorapool[ray]'",
            file=sys.stderr,
        )
        return 2
    try:
        if args.replicas < 1:
            raise StartupError("--replicas must be at least 1")
        api_key, admin_key = read_keys(args)
        allow = source_rules(args.adapter_source_allow)
        tokenizer = tokenizer_settings(args.tokenizer)
        model, adapters = model_and_adapters(args.model, list(args.adapters))
        engine = engine_config(args, model, adapters, tokenizer)
        if args.grace < 0:
            raise StartupError("--grace must be at least 0")
        if args.replica_cpus < 0 or args.replica_gpus < 0:
            raise StartupError("--replica-cpus and --replica-gpus must be at least 0")
        if args.load_bound < 1 or args.load_floor < 1:
            raise StartupError("--load-bound and --load-floor must be at least 1")
        probe_port("gRPC", args.host, args.port)
        if args.metrics_port:
            probe_port("metrics", args.metrics_host or args.host, args.metrics_port)
    except StartupError as exc:
        print(f"lorapool serve-ray: {exc}", file=sys.stderr, flush=True)
        return 2

    from lorapool.server.ray.cluster import deploy, drain, shutdown

    stop = threading.Event()
    try:
        deploy(
            engine,
            replicas=args.replicas,
            port=args.port,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
            http_port=args.http_port,
            address=args.address,
            source_allow=allow,
            api_key=api_key,
            admin_api_key=admin_key,
            routing=args.routing,
            load_bound=args.load_bound,
            load_floor=args.load_floor,
            host=args.host,
            http_host=args.http_host,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
        # after ray.init, whose own SIGTERM handler would end the process at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        keys = "API keys checked" if api_key or admin_key else "no API key: every RPC open"
        print(
            f"lorapool serve-ray: {args.replicas} replicas on {args.host}:{args.port} ({keys})",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        log.info("signal received: draining for up to %.0fs", args.grace)
        try:
            left = drain(args.grace)
            log.info("drained (%d calls still under way): shutting down", left)
        except Exception as exc:  # shut down all the same
            log.warning("drain failed (%s): shutting down", exc)
    finally:
        shutdown()
    print("lorapool serve-ray: stopped", file=sys.stderr, flush=True)
    return 0
