"""The `lorapool` command. Each subcommand lives in the module that owns the idea;
this file only wires them into one argparse tree (imports stay lazy so that
`lorapool generate` does not import torch)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "serve": ("lorapool.server.transport.cli", "start the gRPC server"),
    "make-demo": ("lorapool.demo.cli", "write a random-init model and PEFT adapters"),
    "generate": ("lorapool.client.commands", "stream a generation to stdout"),
    "complete": ("lorapool.client.commands", "one-shot completion"),
    "adapters": ("lorapool.client.commands", "list | load | unload adapters"),
    "stats": ("lorapool.client.commands", "pool and scheduler statistics"),
    "bench": ("lorapool.client.bench", "load generator with a ghz-style report"),
}


# Subcommands from these packages need the `server` extra; the modules it brings
# (import names) are probed before such a subcommand is imported, since some are
# imported lazily deep inside.
SERVER_PACKAGES = ("lorapool.server.", "lorapool.demo.", "lorapool.memory.")
SERVER_EXTRA_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "xxhash",
    "numpy",
    "grpc_reflection",
    "prometheus_client",
)


def _import_command(name: str, module_path: str):
    """The subcommand's module; None, after one line naming what to install, when
    a third-party module it needs is missing (a missing lorapool module re-raises)."""
    server_side = module_path.startswith(SERVER_PACKAGES)
    try:
        if server_side:
            for dep in SERVER_EXTRA_MODULES:
                if importlib.util.find_spec(dep) is None:
                    raise ModuleNotFoundError(f"No module named {dep!r}", name=dep)
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "lorapool":
            raise
        extra = "'lorapool[server]'" if server_side else "lorapool"
        print(
            f"lorapool {name}: Python module {missing!r} is not installed; "
            f"install it with: pip install {extra}",
            file=sys.stderr,
        )
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lorapool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits
        return 2
    name = argv[0]
    module = _import_command(name, COMMANDS[name][0])
    if module is None:
        return 2
    cmd_parser = argparse.ArgumentParser(prog=f"lorapool {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser, name)
    args = cmd_parser.parse_args(argv[1:])
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
