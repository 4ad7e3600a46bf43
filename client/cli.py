"""The `lorapool` command. Each subcommand lives in the module that owns the idea;
this file only wires them into one argparse tree (imports stay lazy so that
`lorapool generate` does not import torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "serve": ("lorapool.server.transport.app", "start the gRPC server"),
    "make-demo": ("lorapool.demo.cli", "write a random-init model and PEFT adapters"),
    "generate": ("lorapool.client.commands", "stream a generation to stdout"),
    "complete": ("lorapool.client.commands", "one-shot completion"),
    "adapters": ("lorapool.client.commands", "list | load | unload adapters"),
    "stats": ("lorapool.client.commands", "pool and scheduler statistics"),
    "bench": ("lorapool.client.bench", "load generator with a ghz-style report"),
}


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
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"lorapool {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser, name)
    args = cmd_parser.parse_args(argv[1:])
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
